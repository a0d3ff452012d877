//! Chunked bodies: any split of the input gives the same result as one piece.
#![no_main]
use libfuzzer_sys::fuzz_target;
use weft_dataplane::http::ChunkedDecoder;

fuzz_target!(|data: &[u8]| {
    let Some((&split, body)) = data.split_first() else { return };
    let whole = {
        let mut d = ChunkedDecoder::new();
        let mut out = Vec::new();
        d.decode(body, &mut out).map(|n| (n, out, d.is_done()))
    };
    let cut = (split as usize).min(body.len());
    let pieces = {
        let mut d = ChunkedDecoder::new();
        let mut out = Vec::new();
        d.decode(&body[..cut], &mut out).and_then(|a| {
            if d.is_done() {
                Ok((a, out, true))
            } else {
                d.decode(&body[cut..], &mut out).map(|b| (a + b, out, d.is_done()))
            }
        })
    };
    match (whole, pieces) {
        (Ok(w), Ok(p)) => assert_eq!(w, p),
        (Err(_), Err(_)) => {}
        (w, p) => panic!("split changed the outcome: {w:?} vs {p:?}"),
    }
});
