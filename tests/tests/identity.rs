//! Workload identity, secret inventory and credential use, end to end: kubelet-style cgroup
//! trees, a recorded kubelet PodList served over HTTP, kubelet volume layouts, real probes.

use std::{net::TcpListener, process::Command};

use credwatch_tests::{
    Agent, CID_A, PodVolume, TestCgroup, UID_A, actor, bpf_available, expected_fingerprint,
    fake_sa_token, kubelet_fixture_port, pod_cgroup, read_ndjson, unique, workdir,
};
use serde_json::Value;

const ACTOR: &str = env!("CARGO_BIN_EXE_cw-actor");
const KEY: &str = "test-fleet-key-not-secret";

fn kube_config(port: u16, kubelet_root: &std::path::Path, extra: &str) -> String {
    format!(
        "[secrets]\ncatalog = true\n{extra}\n[kubernetes]\nkubelet_url = \"http://127.0.0.1:{port}\"\nkubelet_root = \"{}\"\ntrust_domain = \"cluster.local\"\n[fingerprint]\nkey = \"{KEY}\"\n",
        kubelet_root.display()
    )
}

/// Runs the actor steps in a private mount namespace where the pod's volume is bind-mounted
/// at the in-container path, inside the pod's cgroup: what a container process sees.
fn in_pod(vol: &std::path::Path, mount_at: &std::path::Path, cg: &TestCgroup, steps: &str) -> u32 {
    std::fs::create_dir_all(mount_at).unwrap();
    let script = format!(
        "mount --bind {} {} && exec {ACTOR} join-cgroup {} + {steps}",
        vol.display(),
        mount_at.display(),
        cg.path.display()
    );
    let child = Command::new("unshare")
        .args(["-m", "--propagation", "private", "sh", "-c", &script])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // unshare and sh exec in place: the actor keeps this pid.
    let pid = child.id();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "pod actor failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    pid
}

fn uses_key(e: &Value) -> (u64, String, String, u64, String) {
    (
        e["process"]["tgid"].as_u64().unwrap(),
        e["credential"]["fingerprint"].as_str().unwrap().to_owned(),
        e["dst"]["ip"].as_str().unwrap().to_owned(),
        e["dst"]["port"].as_u64().unwrap(),
        e["read_event"].as_str().unwrap().to_owned(),
    )
}

#[test]
fn pod_reading_its_token_then_connecting_is_a_credential_use() {
    if !bpf_available("pod_reading_its_token_then_connecting_is_a_credential_use") {
        return;
    }
    let w = workdir();
    let kubelet = w.path().join("kubelet");
    let token = fake_sa_token("payments", "payments-api", "api-7f9c", UID_A, 1);
    let vol = PodVolume::create(&kubelet, UID_A, "kube-api-access-a", &token);
    let cg = pod_cgroup(UID_A, CID_A);
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let mount_at = w
        .path()
        .join("podroot/var/run/secrets/kubernetes.io/serviceaccount");

    let agent = Agent::start(&kube_config(kubelet_fixture_port(), &kubelet, ""));
    let pid = in_pod(
        &vol.dir,
        &mount_at,
        &cg,
        &format!(
            "open {}/token + connect tcp 127.0.0.1:{port}",
            mount_at.display()
        ),
    );
    let s = agent.stop();

    let reads = s.of("secret_read", pid);
    assert_eq!(reads.len(), 1, "{reads:#?}\n{}", s.stderr);
    let r = reads[0];
    let wl = &r["workload"];
    assert_eq!(wl["kind"], "pod");
    assert_eq!(wl["namespace"], "payments");
    assert_eq!(wl["pod"], "api-7f9c");
    assert_eq!(wl["pod_uid"], UID_A);
    assert_eq!(wl["service_account"], "payments-api");
    assert_eq!(
        wl["spiffe_id"],
        "spiffe://cluster.local/ns/payments/sa/payments-api"
    );
    assert_eq!(wl["container_id"], CID_A);
    assert_eq!(wl["id"], "pod:payments/api-7f9c");
    assert_eq!(
        r["secret"]["opened_as"],
        format!("{}/token", mount_at.display())
    );
    assert_eq!(r["secret"]["path"], vol.dir.join("token").to_str().unwrap());
    let c = &r["credential"];
    assert_eq!(c["type"], "k8s_sa_token");
    assert_eq!(
        c["fingerprint"],
        expected_fingerprint(KEY, token.as_bytes())
    );
    assert_eq!(c["labels"]["service_account"], "payments-api");
    assert_eq!(c["labels"]["pod"], "api-7f9c");
    assert_eq!(c["owner"]["kind"], "pod");
    assert_eq!(c["owner"]["namespace"], "payments");
    assert_eq!(c["owner"]["pod"], "api-7f9c");
    assert_eq!(c["owner"]["source"], "kubelet_volume");

    let uses = s.of("credential_use", pid);
    assert_eq!(uses.len(), 1, "{uses:#?}");
    let u = uses[0];
    assert_eq!(u["dst"]["ip"], "127.0.0.1");
    assert_eq!(u["dst"]["port"], port);
    assert_eq!(u["dst"]["proto"], "tcp");
    assert_eq!(u["result"], "ok");
    assert_eq!(u["workload"]["pod"], "api-7f9c");
    assert_eq!(u["credential"]["fingerprint"], c["fingerprint"]);
    assert_eq!(u["read_event"], r["id"]);

    // No secret value anywhere: not the token, not its signature part.
    let raw = std::fs::read_to_string(s.dir.path().join("events.ndjson")).unwrap();
    for text in [&raw, &s.stderr, &s.stdout] {
        assert!(!text.contains(&token));
        assert!(!text.contains(token.rsplit('.').next().unwrap()));
    }

    // Replay of the recorded stream reproduces exactly the same credential uses.
    let replayed = s.dir.path().join("replayed.ndjson");
    let out = Command::new(credwatch_tests::credwatch_bin())
        .arg("replay")
        .arg(s.dir.path().join("events.ndjson"))
        .arg("--events")
        .arg(&replayed)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "replay failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let live: Vec<_> = s.kind("credential_use").into_iter().map(uses_key).collect();
    let again: Vec<_> = read_ndjson(&replayed)
        .iter()
        .filter(|e| e["kind"] == "credential_use")
        .map(uses_key)
        .collect();
    assert!(!live.is_empty());
    assert_eq!(live, again);
    drop(listener);
}

#[test]
fn systemd_unit_reading_aws_credentials() {
    if !bpf_available("systemd_unit_reading_aws_credentials") {
        return;
    }
    let w = workdir();
    let aws = w.path().join("home/backup/.aws");
    std::fs::create_dir_all(&aws).unwrap();
    let secret_key = "fakeSecretKeyDoNotUse+EXAMPLE/0000000000";
    let creds = format!(
        "[default]\naws_access_key_id = AKIAFAKEEXAMPLE00001\naws_secret_access_key = {secret_key}\n"
    );
    std::fs::write(aws.join("credentials"), &creds).unwrap();
    let cg = TestCgroup::create(&format!(
        "{}/system.slice/cw-backup.service",
        unique("cwtest")
    ));

    let agent = Agent::start(&format!(
        "[secrets]\ncatalog = false\npaths = [\"{}/credentials\"]\n[fingerprint]\nkey = \"{KEY}\"\n",
        aws.display()
    ));
    let (pid, _) = actor(
        ACTOR,
        &[
            "join-cgroup",
            cg.path.to_str().unwrap(),
            "+",
            "open",
            aws.join("credentials").to_str().unwrap(),
        ],
    );
    let s = agent.stop();

    let reads = s.of("secret_read", pid);
    assert_eq!(reads.len(), 1);
    let r = reads[0];
    assert_eq!(r["workload"]["kind"], "unit");
    assert_eq!(r["workload"]["unit"], "cw-backup.service");
    assert_eq!(r["workload"]["id"], "unit:cw-backup.service");
    assert_eq!(r["credential"]["type"], "aws_access_key");
    assert_eq!(
        r["credential"]["labels"]["access_key_id"],
        "AKIAFAKEEXAMPLE00001"
    );
    assert_eq!(r["credential"]["labels"]["key_kind"], "long_lived");
    assert_eq!(
        r["credential"]["fingerprint"],
        expected_fingerprint(KEY, creds.as_bytes())
    );
    let raw = std::fs::read_to_string(s.dir.path().join("events.ndjson")).unwrap();
    for text in [&raw, &s.stderr, &s.stdout] {
        assert!(!text.contains(secret_key), "secret value leaked");
    }
}

#[test]
fn rotated_token_is_caught_and_old_inode_forgotten() {
    if !bpf_available("rotated_token_is_caught_and_old_inode_forgotten") {
        return;
    }
    let w = workdir();
    let kubelet = w.path().join("kubelet");
    let t1 = fake_sa_token("payments", "payments-api", "api-7f9c", UID_A, 1);
    let t2 = fake_sa_token("payments", "payments-api", "api-7f9c", UID_A, 2);
    let mut vol = PodVolume::create(&kubelet, UID_A, "kube-api-access-a", &t1);
    // Keep the first token's inode reachable after rotation deletes its directory.
    let old_link = w.path().join("old-token");
    std::fs::hard_link(vol.current_token(), &old_link).unwrap();
    let token = vol.dir.join("token");
    let token = token.to_str().unwrap();

    // Periodic rescan effectively off: only the kernel's watched-directory match can catch it.
    let agent = Agent::start(&format!(
        "[secrets]\ncatalog = true\nrescan_interval = \"1h\"\n[kubernetes]\nkubelet_root = \"{}\"\n[fingerprint]\nkey = \"{KEY}\"\n",
        kubelet.display()
    ));
    let before = actor(ACTOR, &["open", token]).0;
    vol.rotate(&t2);
    let after = actor(ACTOR, &["open", token]).0;
    std::thread::sleep(std::time::Duration::from_millis(500));
    let old = actor(ACTOR, &["open", old_link.to_str().unwrap()]).0;
    let again = actor(ACTOR, &["open", token]).0;
    let s = agent.stop();

    let one = |pid: u32| {
        let r = s.of("secret_read", pid);
        assert_eq!(
            r.len(),
            1,
            "pid {pid} (before {before}, after {after}, again {again}): {r:#?}\n{:#?}\n{}\n{}",
            s.kind("secret_read"),
            s.stats,
            s.stderr
        );
        r[0].clone()
    };
    let b = one(before);
    assert_eq!(
        b["credential"]["fingerprint"],
        expected_fingerprint(KEY, t1.as_bytes())
    );
    assert_eq!(b["secret"]["matched"], "file");
    let a = one(after);
    assert_eq!(
        a["credential"]["fingerprint"],
        expected_fingerprint(KEY, t2.as_bytes())
    );
    // Caught through the watched volume directory, not the (1 h) periodic rescan: either
    // this read matched the directory, or the rotation's own write of the new token did
    // and the agent had already added the new inode to the kernel map.
    assert!(
        a["secret"]["matched"] == "watched_dir" || a["secret"]["matched"] == "file",
        "{a:#}"
    );
    assert_ne!(a["secret"]["inode"], b["secret"]["inode"]);
    assert!(
        s.of("secret_read", old).is_empty(),
        "the rotated-out inode is still watched"
    );
    let g = one(again);
    assert_eq!(
        g["secret"]["matched"], "file",
        "the new inode is in the kernel map now"
    );
    assert_eq!(g["secret"]["inode"], a["secret"]["inode"]);
}

#[test]
fn pod_newer_than_the_pod_list_is_named_after_a_refresh() {
    if !bpf_available("pod_newer_than_the_pod_list_is_named_after_a_refresh") {
        return;
    }
    let w = workdir();
    let kubelet = w.path().join("kubelet");
    // A pod uid no other test uses: every agent sees the whole node, and another test's
    // process in pod A would trigger this agent's refresh early.
    const UID_C: &str = "c3c3c3c3-0000-4000-8000-00000000000c";
    let token = fake_sa_token("payments", "payments-api", "api-7f9c", UID_C, 5);
    let vol = PodVolume::create(&kubelet, UID_C, "kube-api-access-a", &token);
    let cg = pod_cgroup(UID_C, CID_A);
    // The kubelet's list predates the pod until the test flips it.
    let empty = br#"{"kind":"PodList","apiVersion":"v1","metadata":{},"items":[]}"#.to_vec();
    let full = std::fs::read(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/fixtures/kubelet-pods.json"
    ))
    .unwrap();
    // The recorded list with pod A's uid swapped for this test's.
    let full = String::from_utf8(full)
        .unwrap()
        .replace(UID_A, UID_C)
        .into_bytes();
    let (port, pod_created) = credwatch_tests::serve_http_switch(empty, full);
    // Periodic refresh far away: only the miss can trigger the second list.
    let cfg = kube_config(port, &kubelet, "").replace(
        "trust_domain = \"cluster.local\"\n",
        "trust_domain = \"cluster.local\"\nrefresh_interval = \"1h\"\n",
    );

    let agent = Agent::start(&cfg);
    let token_path = vol.dir.join("token");
    let open = [
        "join-cgroup",
        cg.path.to_str().unwrap(),
        "+",
        "open",
        token_path.to_str().unwrap(),
    ];
    let first = actor(ACTOR, &open).0;
    std::thread::sleep(std::time::Duration::from_millis(300));
    // The pod appears in the kubelet's list; the next read of an unknown pod asks again.
    pod_created.store(true, std::sync::atomic::Ordering::SeqCst);
    actor(ACTOR, &open);
    std::thread::sleep(std::time::Duration::from_millis(1500));
    let second = actor(ACTOR, &open).0;
    let s = agent.stop();

    let wl = |pid: u32| s.of("secret_read", pid)[0]["workload"].clone();
    let before = wl(first);
    assert_eq!(
        before["id"],
        format!("pod:uid/{UID_C}"),
        "not in the first list yet: named by uid"
    );
    assert_eq!(before["pod_uid"], UID_C);
    let after = wl(second);
    assert_eq!(
        after["id"], "pod:payments/api-7f9c",
        "the miss refreshed the pod list"
    );
    assert_eq!(after["service_account"], "payments-api");
}
