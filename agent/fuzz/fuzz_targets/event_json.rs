#![no_main]
//! `credwatch replay` input: NDJSON from files an operator may not have written.
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(ev) = serde_json::from_slice::<credwatch::event::Event>(data) {
        let _ = serde_json::to_string(&ev);
    }
});
