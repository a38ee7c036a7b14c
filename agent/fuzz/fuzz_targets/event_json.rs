#![no_main]
//! `credwatch replay` input: NDJSON from files an operator may not have written. Whatever
//! parses must come back unchanged through the agent's own serializer and parser: the
//! replayed event is the recorded one.
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(ev) = serde_json::from_slice::<credwatch::event::Event>(data) {
        let line = serde_json::to_string(&ev).expect("an event always serializes");
        let back: credwatch::event::Event =
            serde_json::from_str(&line).expect("what the agent writes it can read");
        assert_eq!(back, ev, "{line}");
    }
});
