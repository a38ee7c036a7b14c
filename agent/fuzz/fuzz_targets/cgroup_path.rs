#![no_main]
//! cgroup paths come from the host's cgroupfs: any bytes a container runtime or user can
//! name a directory.
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let path = String::from_utf8_lossy(data);
    let id = credwatch::workload::parse_cgroup_path(&path);
    if let Some(uid) = id.pod_uid {
        assert_eq!(uid.len(), 36);
    }
});
