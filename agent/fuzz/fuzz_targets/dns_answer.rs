#![no_main]
//! UDP payloads from port 53: anyone on the network can send them.
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Some(a) = credwatch::dns::parse_answer(data) {
        let mut cache = credwatch::dns::NameCache::new(4);
        cache.insert(&a, 0);
    }
});
