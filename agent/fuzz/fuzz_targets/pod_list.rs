#![no_main]
//! The kubelet's /pods body.
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = credwatch::kubelet::PodDirectory::from_pod_list(data);
});
