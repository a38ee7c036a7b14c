#![no_main]
//! Secret files are attacker-influenced (a pod can write its own volume): the type and label
//! parsers must take anything. The first byte picks the file name heuristics.
use libfuzzer_sys::fuzz_target;

const NAMES: &[&str] = &[
    "/var/run/secrets/kubernetes.io/serviceaccount/token",
    "/root/.aws/credentials",
    "/etc/kubernetes/admin.conf",
    "/home/u/.ssh/id_ed25519",
    "/root/.vault-token",
    "/home/u/.netrc",
    "/home/u/.git-credentials",
    "/home/u/.docker/config.json",
];

fuzz_target!(|data: &[u8]| {
    let Some((&sel, rest)) = data.split_first() else { return };
    let path = NAMES[sel as usize % NAMES.len()];
    let _ = credwatch::credential::analyze(path, rest);
    if let Ok(s) = std::str::from_utf8(rest) {
        let _ = credwatch::credential::jwt_claims(s);
    }
});
