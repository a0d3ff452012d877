//! Path normalization: idempotent, always absolute, never leaves an encoded separator.
#![no_main]
use libfuzzer_sys::fuzz_target;
use weft_api::authz::normalize_path;

fuzz_target!(|data: &[u8]| {
    let Ok(s) = std::str::from_utf8(data) else { return };
    if let Ok(p) = normalize_path(s) {
        assert!(p.starts_with('/'));
        assert!(!p.contains("//") && !p.split('/').any(|seg| seg == "." || seg == ".."));
        assert_eq!(normalize_path(&p).as_deref(), Ok(&*p), "idempotent");
    }
});
