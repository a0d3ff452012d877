//! Join tokens and SPIFFE IDs from untrusted input: never panic, never verify without the key.
#![no_main]
use libfuzzer_sys::fuzz_target;
use weft_api::{JoinToken, SpiffeId, WorkloadRef};

fuzz_target!(|data: &[u8]| {
    let Ok(s) = std::str::from_utf8(data) else { return };
    let _ = JoinToken::parse_unverified(s);
    // nothing the fuzzer writes carries an HMAC made with this key
    assert!(JoinToken::verify(s, b"fuzz-key-that-no-input-was-signed-with", 0).is_err());
    let _ = s.parse::<SpiffeId>();
    let _ = s.parse::<WorkloadRef>();
    let _ = weft_api::identity::spiffe_of(data);
});
