//! Workload identity, secret inventory and credential use, end to end: kubelet-style cgroup
//! trees, a recorded kubelet PodList served over HTTP, kubelet volume layouts, real probes.

use std::{net::TcpListener, process::Command};

use credwatch::event::{CredentialType, OwnerSource, WorkloadKind};
use credwatch_tests::{
    Actor, Agent, CID_A, PodVolume, TestCgroup, UID_A, expected_fingerprint, fake_sa_token,
    in_mount_namespace, kubelet_fixture_port, pod_cgroup, read_events, unique, workdir,
};

const ACTOR: &str = env!("CARGO_BIN_EXE_cw-actor");
const KEY: &str = "test-fleet-key-not-secret";

fn actor() -> Actor {
    Actor::new(ACTOR)
}

fn kube_config(port: u16, kubelet_root: &std::path::Path, extra: &str) -> String {
    format!(
        "[secrets]\ncatalog = true\n{extra}\n[kubernetes]\nkubelet_url = \"http://127.0.0.1:{port}\"\nkubelet_root = \"{}\"\ntrust_domain = \"cluster.local\"\n[fingerprint]\nkey = \"{KEY}\"\n",
        kubelet_root.display()
    )
}

/// (tgid, fingerprint, destination, read event) of every credential use.
fn uses_key(s: &[credwatch::event::Event]) -> Vec<(u32, String, std::net::SocketAddr, String)> {
    s.iter()
        .filter_map(|e| match &e.body {
            credwatch::event::Body::CredentialUse(u) => Some((
                e.process.tgid,
                u.credential.fingerprint.clone(),
                u.dst.socket_addr().expect("an internet destination"),
                u.read_event.clone(),
            )),
            _ => None,
        })
        .collect()
}

#[test]
#[ignore = "privileged: real probes (cargo xtask test runs it as root)"]
fn pod_reading_its_token_then_connecting_is_a_credential_use() {
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
    let (pid, _) = in_mount_namespace(
        &actor()
            .join_cgroup(&cg)
            .open(mount_at.join("token"))
            .connect("tcp", format!("127.0.0.1:{port}")),
        &[(&vol.dir, &mount_at)],
    );
    let s = agent.stop();

    let reads = s.reads(pid);
    assert_eq!(reads.len(), 1, "{reads:#?}\n{}", s.stderr);
    let (e, r) = reads[0];
    let wl = &e.workload;
    assert_eq!(wl.kind, WorkloadKind::Pod);
    assert_eq!(wl.namespace.as_deref(), Some("payments"));
    assert_eq!(wl.pod.as_deref(), Some("api-7f9c"));
    assert_eq!(wl.pod_uid.as_deref(), Some(UID_A));
    assert_eq!(wl.service_account.as_deref(), Some("payments-api"));
    assert_eq!(
        wl.spiffe_id.as_deref(),
        Some("spiffe://cluster.local/ns/payments/sa/payments-api")
    );
    assert_eq!(wl.container_id.as_deref(), Some(CID_A));
    assert_eq!(wl.id, "pod:payments/api-7f9c");
    assert_eq!(
        r.secret.opened_as,
        mount_at.join("token").display().to_string()
    );
    assert_eq!(
        r.secret.path.as_deref(),
        Some(vol.dir.join("token").to_str().unwrap())
    );
    let c = &r.credential;
    assert_eq!(c.kind, CredentialType::K8sSaToken);
    assert_eq!(c.fingerprint, expected_fingerprint(KEY, token.as_bytes()));
    assert_eq!(c.labels["service_account"], "payments-api");
    assert_eq!(c.labels["pod"], "api-7f9c");
    let owner = c.owner.as_ref().expect("owner");
    assert_eq!(owner.kind, WorkloadKind::Pod);
    assert_eq!(owner.namespace.as_deref(), Some("payments"));
    assert_eq!(owner.pod.as_deref(), Some("api-7f9c"));
    assert_eq!(owner.source, OwnerSource::KubeletVolume);

    let uses = s.uses(Some(pid));
    assert_eq!(uses.len(), 1, "{uses:#?}");
    let (ue, u) = uses[0];
    assert_eq!(u.dst.ip, Some("127.0.0.1".parse().unwrap()));
    assert_eq!(u.dst.port, port);
    assert_eq!(u.dst.proto, "tcp");
    assert_eq!(u.result, "ok");
    assert_eq!(ue.workload.pod.as_deref(), Some("api-7f9c"));
    assert_eq!(u.credential.fingerprint, c.fingerprint);
    assert_eq!(u.read_event, e.id);

    // No secret value anywhere: not the token, not its signature part.
    let all = s.all_output();
    assert!(!all.contains(&token));
    assert!(!all.contains(token.rsplit('.').next().unwrap()));

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
    let live = uses_key(&s.events);
    assert!(!live.is_empty());
    assert_eq!(live, uses_key(&read_events(&replayed)));
    drop(listener);
}

#[test]
#[ignore = "privileged: real probes (cargo xtask test runs it as root)"]
fn systemd_unit_reading_aws_credentials() {
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
    let pid = actor().join_cgroup(&cg).open(aws.join("credentials")).pid();
    let s = agent.stop();

    let reads = s.reads(pid);
    assert_eq!(reads.len(), 1);
    let (e, r) = reads[0];
    assert_eq!(e.workload.kind, WorkloadKind::Unit);
    assert_eq!(e.workload.unit.as_deref(), Some("cw-backup.service"));
    assert_eq!(e.workload.id, "unit:cw-backup.service");
    assert_eq!(r.credential.kind, CredentialType::AwsAccessKey);
    assert_eq!(r.credential.labels["access_key_id"], "AKIAFAKEEXAMPLE00001");
    assert_eq!(r.credential.labels["key_kind"], "long_lived");
    assert_eq!(
        r.credential.fingerprint,
        expected_fingerprint(KEY, creds.as_bytes())
    );
    assert!(!s.all_output().contains(secret_key), "secret value leaked");
}

#[test]
#[ignore = "privileged: real probes (cargo xtask test runs it as root)"]
fn rotated_token_is_caught_and_old_inode_forgotten() {
    let w = workdir();
    let kubelet = w.path().join("kubelet");
    let t1 = fake_sa_token("payments", "payments-api", "api-7f9c", UID_A, 1);
    let t2 = fake_sa_token("payments", "payments-api", "api-7f9c", UID_A, 2);
    let mut vol = PodVolume::create(&kubelet, UID_A, "kube-api-access-a", &t1);
    // Keep the first token's inode reachable after rotation deletes its directory.
    let old_link = w.path().join("old-token");
    std::fs::hard_link(vol.current_token(), &old_link).unwrap();
    let token = vol.dir.join("token");

    // Periodic rescan effectively off: only the kernel's watched-directory match can catch it.
    let agent = Agent::start(&format!(
        "[secrets]\ncatalog = true\nrescan_interval = \"1h\"\n[kubernetes]\nkubelet_root = \"{}\"\n[fingerprint]\nkey = \"{KEY}\"\n",
        kubelet.display()
    ));
    let before = actor().open(&token).pid();
    vol.rotate(&t2);
    let after = actor().open(&token).pid();
    std::thread::sleep(std::time::Duration::from_millis(500));
    let old = actor().open(&old_link).pid();
    let again = actor().open(&token).pid();
    let s = agent.stop();

    let one = |pid: u32| {
        let r = s.reads(pid);
        assert_eq!(
            r.len(),
            1,
            "pid {pid} (before {before}, after {after}, again {again}): {r:#?}\n{:#?}\n{}",
            s.stats,
            s.stderr
        );
        r[0].1.clone()
    };
    let b = one(before);
    assert_eq!(
        b.credential.fingerprint,
        expected_fingerprint(KEY, t1.as_bytes())
    );
    assert_eq!(b.secret.matched, "file");
    let a = one(after);
    assert_eq!(
        a.credential.fingerprint,
        expected_fingerprint(KEY, t2.as_bytes())
    );
    // Caught through the watched volume directory, not the (1 h) periodic rescan: either
    // this read matched the directory, or the rotation's own write of the new token did
    // and the agent had already added the new inode to the kernel map.
    assert!(
        a.secret.matched == "watched_dir" || a.secret.matched == "file",
        "{a:#?}"
    );
    assert_ne!(a.secret.inode, b.secret.inode);
    assert!(
        s.reads(old).is_empty(),
        "the rotated-out inode is still watched"
    );
    let g = one(again);
    assert_eq!(
        g.secret.matched, "file",
        "the new inode is in the kernel map now"
    );
    assert_eq!(g.secret.inode, a.secret.inode);
}

#[test]
#[ignore = "privileged: real probes (cargo xtask test runs it as root)"]
fn pod_newer_than_the_pod_list_is_named_after_a_refresh() {
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
    let open = actor().join_cgroup(&cg).open(vol.dir.join("token"));
    let first = open.pid();
    std::thread::sleep(std::time::Duration::from_millis(300));
    // The pod appears in the kubelet's list; the next read of an unknown pod asks again.
    pod_created.store(true, std::sync::atomic::Ordering::SeqCst);
    open.run();
    std::thread::sleep(std::time::Duration::from_millis(1500));
    let second = open.pid();
    let s = agent.stop();

    let wl = |pid: u32| s.reads(pid)[0].0.workload.clone();
    let before = wl(first);
    assert_eq!(
        before.id.as_str(),
        format!("pod:uid/{UID_C}"),
        "not in the first list yet: named by uid"
    );
    assert_eq!(before.pod_uid.as_deref(), Some(UID_C));
    let after = wl(second);
    assert_eq!(
        after.id, "pod:payments/api-7f9c",
        "the miss refreshed the pod list"
    );
    assert_eq!(after.service_account.as_deref(), Some("payments-api"));
}
