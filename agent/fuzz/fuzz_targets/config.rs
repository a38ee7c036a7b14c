#![no_main]
//! Operator-written TOML: errors, never panics.
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(s) = std::str::from_utf8(data) {
        let _ = credwatch::config::Config::parse(s);
    }
});
