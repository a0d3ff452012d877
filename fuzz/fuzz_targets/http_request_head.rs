//! Request heads from the network: never panic; a parsed head's framing is unambiguous.
#![no_main]
use libfuzzer_sys::fuzz_target;
use weft_dataplane::http::{BodyKind, RequestHead, ResponseHead};

fuzz_target!(|data: &[u8]| {
    if let Ok(Some((head, used))) = RequestHead::parse(data, 60 * 1024, 100) {
        assert!(used <= data.len());
        let _ = (head.method(), head.path(), head.host(), head.connection_tokens());
        if head.body == BodyKind::Chunked {
            assert!(head.header("content-length").is_none());
        }
    }
    let _ = ResponseHead::parse(data, 64 * 1024, data.first().is_some_and(|b| b & 1 == 1));
});
