#![no_main]
//! Ring-buffer records: the decoder must reject any length or kind it does not expect
//! (exec records carry variable-length environment and argv, fingerprinted in decode).
use std::sync::LazyLock;

use credwatch::credential::Fingerprinter;
use libfuzzer_sys::fuzz_target;

static FP: LazyLock<Fingerprinter> =
    LazyLock::new(|| Fingerprinter::new(b"fuzz-fingerprint-key-not-secret!"));

fuzz_target!(|data: &[u8]| {
    let _ = credwatch::decode::decode(data, &FP);
});
