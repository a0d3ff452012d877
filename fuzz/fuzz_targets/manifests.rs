//! Manifest sets: any text validates or errs, never panics.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(s) = std::str::from_utf8(data) else { return };
    let _ = weft_controlplane::manifest::parse_set(&[("fuzz.yaml".to_string(), s.to_string())]);
    let _ = weft_dataplane::config::parse("fuzz.yaml", s, 1);
});
