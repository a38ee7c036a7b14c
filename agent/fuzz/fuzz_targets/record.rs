#![no_main]
//! Ring-buffer records: the decoder must reject any length or kind it does not expect.
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = credwatch::decode::decode(data);
});
