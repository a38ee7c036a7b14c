//! A hostile node: what workloads control (cgroup names, files, symlinks, process counts,
//! paths, timing) must not fool the agent, stall it or make it lose data. One test per
//! finding of the review; each failed on the code before its fix.

use std::{
    os::unix::fs::PermissionsExt,
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use credwatch::event::{EventKind, WorkloadKind};
use credwatch_tests::{
    Actor, Agent, CID_A, PodVolume, Stopped, TestCgroup, UID_A, cgroup2_root, fake_sa_token,
    kubelet_fixture_port, pod_cgroup, unique, workdir,
};

const ACTOR: &str = env!("CARGO_BIN_EXE_cw-actor");
const KEY: &str = "test-fleet-key-not-secret";

fn actor() -> Actor {
    Actor::new(ACTOR)
}

fn stat_u64(s: &Stopped, path: &[&str]) -> u64 {
    let mut v = &s.stats;
    for p in path {
        v = &v[*p];
    }
    v.as_u64()
        .unwrap_or_else(|| panic!("stats has no {path:?}: {:#}", s.stats))
}

/// A user's delegated subtree named like a victim pod's cgroup, and a user unit named like
/// a system service: before, `kubepods` anywhere in the path made it `pod:<victim>` and any
/// `*.service` component made it that unit. Now both are host processes (uid + exe), while
/// the real pod cgroup still resolves to the pod.
#[test]
#[ignore = "privileged: real probes (cargo xtask test runs it as root)"]
fn a_user_slice_named_after_a_pod_or_a_unit_is_neither() {
    let w = workdir();
    let secret = w.path().join("api-token");
    std::fs::write(&secret, "fake-spoof-token").unwrap();
    let user = "user.slice/user-1000.slice/user@1000.service";
    let spoof_pod = TestCgroup::create(&format!(
        "{}/{user}/app.slice/kubepods-besteffort-pod{}.slice/cri-containerd-{CID_A}.scope",
        unique("cwtest"),
        UID_A.replace('-', "_"),
    ));
    let spoof_unit = TestCgroup::create(&format!("{}/{user}/backup.service", unique("cwtest")));
    let real_pod = pod_cgroup(UID_A, CID_A);
    let agent = Agent::start(&format!(
        "[secrets]\ncatalog = false\npaths = [\"{}\"]\n[kubernetes]\nkubelet_url = \"http://127.0.0.1:{}\"\n",
        secret.display(),
        kubelet_fixture_port()
    ));
    let by_pod_spoof = actor().join_cgroup(&spoof_pod).open(&secret).pid();
    let by_unit_spoof = actor().join_cgroup(&spoof_unit).open(&secret).pid();
    let by_pod = actor().join_cgroup(&real_pod).open(&secret).pid();
    let s = agent.stop();
    let workload = |pid: u32| {
        let r = s.reads(pid);
        assert_eq!(r.len(), 1, "pid {pid}: {r:#?}\n{}", s.stderr);
        r[0].0.workload.clone()
    };
    for (pid, what) in [(by_pod_spoof, "pod"), (by_unit_spoof, "unit")] {
        let wl = workload(pid);
        assert_eq!(wl.kind, WorkloadKind::Host, "{what} spoof: {wl:#?}");
        assert_eq!(wl.pod_uid, None, "{what} spoof");
        assert_eq!(wl.unit, None, "{what} spoof");
        assert!(wl.id.starts_with("host:0:"), "{what} spoof: {}", wl.id);
    }
    let wl = workload(by_pod);
    assert_eq!(wl.kind, WorkloadKind::Pod);
    assert_eq!(wl.id, "pod:payments/api-7f9c");
}

/// cgroup ids resolve through a file handle on the cgroup2 mount: no walk of the hierarchy
/// for a new cgroup, and an unknown id is answered without one either (before, each miss
/// re-walked the whole hierarchy, with no depth bound).
#[test]
#[ignore = "privileged: real probes (cargo xtask test runs it as root)"]
fn cgroup_ids_resolve_by_file_handle_without_walking() {
    credwatch_tests::require_privileges();
    let mut paths = credwatch::workload::CgroupPaths::new(cgroup2_root());
    assert!(paths.by_handle(), "open_by_handle_at on the cgroup2 mount");
    // Deep enough that a walk would notice.
    let mut rel = unique("cwtest");
    for i in 0..40 {
        rel.push_str(&format!("/d{i}"));
    }
    let cg = TestCgroup::create(&rel);
    assert_eq!(paths.path(cg.id()), Some(cg.rel.as_str()));
    let t = Instant::now();
    for id in 0..10_000u64 {
        assert_eq!(paths.path(u64::MAX - id), None);
    }
    assert!(t.elapsed() < Duration::from_secs(5), "{:?}", t.elapsed());
    assert_eq!(paths.walks, 0, "no walk");
    assert_eq!(paths.unresolved, 10_000);
}

/// 70 000 key files in one home directory: before, they filled SECRET_INODES (65 536) and
/// the agent did not start. Now that home adds at most `max_per_home`, the agent starts,
/// and a pod's token read is seen.
#[test]
#[ignore = "privileged: real probes (cargo xtask test runs it as root)"]
fn seventy_thousand_key_files_in_a_home_do_not_stop_the_agent() {
    let w = workdir();
    let (token_path, token) = seventy_thousand_keys_and_a_pod_token(w.path());
    let agent = Agent::start(&host_root_config(w.path(), ""));
    let reader = actor().open(&token_path).pid();
    let s = agent.stop();
    let reads = s.reads(reader);
    assert_eq!(reads.len(), 1, "{reads:#?}\n{}", s.stderr);
    assert_eq!(
        reads[0].1.credential.fingerprint,
        credwatch_tests::expected_fingerprint(KEY, token.as_bytes())
    );
    assert_eq!(
        stat_u64(&s, &["inventory_scan", "capped_per_home"]),
        70_000 - 256
    );
    assert_eq!(stat_u64(&s, &["inventory_unwatched"]), 0);
}

/// Caps lifted so the inventory outgrows the kernel map: the sync is partial (pod tokens
/// first), start-up goes on, the shortfall is logged and counted.
#[test]
#[ignore = "privileged: real probes (cargo xtask test runs it as root)"]
fn a_full_kernel_map_is_synced_partially_pod_tokens_first() {
    let w = workdir();
    let (token_path, _) = seventy_thousand_keys_and_a_pod_token(w.path());
    let agent = Agent::start(&host_root_config(
        w.path(),
        "max_per_home = 100000\nmax_per_root = 100000\n",
    ));
    let reader = actor().open(&token_path).pid();
    let s = agent.stop();
    assert_eq!(s.reads(reader).len(), 1, "{}", s.stderr);
    let left_out = stat_u64(&s, &["inventory_unwatched"]);
    assert!(
        left_out >= 70_001 - 65_536,
        "{left_out} left out of the kernel map"
    );
    assert!(s.stderr.contains("kernel inode maps full"), "{}", s.stderr);
}

fn host_root_config(host: &Path, secrets: &str) -> String {
    format!(
        "[secrets]\ncatalog = true\nhost_root = \"{}\"\n{secrets}[kubernetes]\nkubelet_root = \"/var/lib/kubelet\"\n[fingerprint]\nkey = \"{KEY}\"\n",
        host.display()
    )
}

/// `<host>/home/mallory/.ssh/id_00000…69999` and a pod's projected token under
/// `<host>/var/lib/kubelet`; (the token's path as the agent's host sees it, its value).
fn seventy_thousand_keys_and_a_pod_token(host: &Path) -> (PathBuf, String) {
    let ssh = host.join("home/mallory/.ssh");
    std::fs::create_dir_all(&ssh).unwrap();
    for i in 0..70_000 {
        std::fs::write(ssh.join(format!("id_{i:05}")), "fake-key").unwrap();
    }
    let token = fake_sa_token("payments", "payments-api", "api-7f9c", UID_A, 7);
    let vol = PodVolume::create(
        &host.join("var/lib/kubelet"),
        UID_A,
        "kube-api-access-a",
        &token,
    );
    (vol.dir.join("token"), token)
}

/// An executable started by a path that leaves a directory (`…/opt/tools/../../bin/x`) is
/// named by where it really is: before, the workload id kept the `..` path, and a selector
/// like `host:0:…/opt/tools/*` matched it.
#[test]
#[ignore = "privileged: real probes (cargo xtask test runs it as root)"]
fn executables_are_named_by_their_canonical_path() {
    let w = workdir();
    let secret = w.path().join("api-token");
    std::fs::write(&secret, "fake-exe-token").unwrap();
    std::fs::create_dir_all(w.path().join("opt/tools")).unwrap();
    std::fs::create_dir_all(w.path().join("bin")).unwrap();
    let real = w.path().join("bin/x");
    std::fs::copy(ACTOR, &real).unwrap();
    std::fs::set_permissions(&real, std::fs::Permissions::from_mode(0o755)).unwrap();
    let sneaky = w.path().join("opt/tools/../../bin/x");
    let agent = Agent::start(&format!(
        "[secrets]\ncatalog = false\npaths = [\"{}\"]\n",
        secret.display()
    ));
    let pid = Actor::new(&sneaky).open(&secret).pid();
    let s = agent.stop();
    let execs = s.of(EventKind::Exec, pid);
    assert_eq!(execs.len(), 1, "{execs:#?}");
    assert_eq!(execs[0].process.exe, real.to_str().unwrap());
    let reads = s.reads(pid);
    assert_eq!(reads.len(), 1);
    assert_eq!(reads[0].0.process.exe, real.to_str().unwrap());
    assert_eq!(
        reads[0].0.workload.id.as_str(),
        format!("host:0:{}", real.display())
    );
}

/// Opens of a pod's non-secret files (`ca.crt`, `namespace`) in its watched volume used to
/// rescan that directory, inline on the loop, on every open. They are remembered as not
/// secrets after the first rescan; a new token in the directory is still caught, and a
/// connect right after its read is still a credential use (the read waits for the rescan,
/// the process's later records wait behind it).
#[test]
#[ignore = "privileged: real probes (cargo xtask test runs it as root)"]
fn watched_directory_misses_rescan_off_the_loop_once() {
    let w = workdir();
    let kubelet = w.path().join("kubelet");
    let t1 = fake_sa_token("payments", "payments-api", "api-7f9c", UID_A, 1);
    let t2 = fake_sa_token("payments", "payments-api", "api-7f9c", UID_A, 2);
    let mut vol = PodVolume::create(&kubelet, UID_A, "kube-api-access-a", &t1);
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let agent = Agent::start(&format!(
        "[secrets]\ncatalog = true\nrescan_interval = \"1h\"\n[kubernetes]\nkubelet_root = \"{}\"\n[fingerprint]\nkey = \"{KEY}\"\n",
        kubelet.display()
    ));
    actor().flood(vol.dir.join("ca.crt"), 2000).pid();
    vol.rotate(&t2);
    let user = actor()
        .open(vol.dir.join("token"))
        .connect("tcp", format!("127.0.0.1:{port}"))
        .pid();
    let s = agent.stop();
    let rescans = stat_u64(&s, &["inventory_dir_rescans"]);
    assert!(
        rescans <= 3,
        "{rescans} rescans for 2000 opens of ca.crt and one rotation"
    );
    let reads = s.reads(user);
    assert_eq!(reads.len(), 1, "{}", s.stderr);
    assert_eq!(
        reads[0].1.credential.fingerprint,
        credwatch_tests::expected_fingerprint(KEY, t2.as_bytes())
    );
    assert_eq!(s.uses(Some(user)).len(), 1, "read, then connect: a use");
    drop(listener);
}

/// A noisy workload forks as fast as it can, opens an unwatched file as fast as it can and
/// reads its own secret at `CREDWATCH_TEST_FLOOD_READS_PER_S` (default 2 000/s), while
/// another workload reads its secret: every one of those reads arrives. Prints the figures
/// (forks/s, opens/s, drops and where they are counted, agent RSS).
#[test]
#[ignore = "privileged: real probes (cargo xtask test runs it as root)"]
fn a_fork_and_open_flood_does_not_hide_another_workloads_reads() {
    use std::sync::{
        Arc,
        atomic::{AtomicBool, Ordering::Relaxed},
    };
    let w = workdir();
    let victim_secret = w.path().join("victim-token");
    std::fs::write(&victim_secret, "fake-victim-token").unwrap();
    let noisy_secret = w.path().join("noisy-token");
    std::fs::write(&noisy_secret, "fake-noisy-token").unwrap();
    let unwatched = w.path().join("unwatched");
    std::fs::write(&unwatched, "public").unwrap();
    let reads_per_s: u64 = std::env::var("CREDWATCH_TEST_FLOOD_READS_PER_S")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(2000);
    let agent = Agent::start(&format!(
        "[secrets]\ncatalog = false\npaths = [\"{}\", \"{}\"]\n",
        victim_secret.display(),
        noisy_secret.display()
    ));
    let agent_pid = agent.pid();
    let stop = Arc::new(AtomicBool::new(false));
    let flood_for = Duration::from_secs(10);
    let forks = {
        let stop = stop.clone();
        std::thread::spawn(move || {
            let mut n = 0u64;
            while !stop.load(Relaxed) {
                actor().forks(2000).run();
                n += 2000;
            }
            n
        })
    };
    let unwatched_opens = {
        let stop = stop.clone();
        std::thread::spawn(move || {
            let mut n = 0u64;
            while !stop.load(Relaxed) {
                drop(std::fs::File::open(&unwatched).unwrap());
                n += 1;
            }
            n
        })
    };
    let noisy_reads = {
        let stop = stop.clone();
        std::thread::spawn(move || {
            let start = Instant::now();
            let mut n = 0u64;
            while !stop.load(Relaxed) {
                for _ in 0..100 {
                    drop(std::fs::File::open(&noisy_secret).unwrap());
                }
                n += 100;
                let due = Duration::from_secs_f64(n as f64 / reads_per_s as f64);
                if let Some(wait) = due.checked_sub(start.elapsed()) {
                    std::thread::sleep(wait);
                }
            }
            n
        })
    };
    // The victim: a read every 40 ms, each by its own process, through the flood.
    let t = Instant::now();
    let mut victims = Vec::new();
    let mut peak_rss = 0;
    while t.elapsed() < flood_for {
        victims.push(actor().open(&victim_secret).pid());
        peak_rss = peak_rss.max(rss_kib(agent_pid));
        std::thread::sleep(Duration::from_millis(40));
    }
    stop.store(true, Relaxed);
    let elapsed = t.elapsed().as_secs_f64();
    let (forked, opened, noisy) = (
        forks.join().unwrap(),
        unwatched_opens.join().unwrap(),
        noisy_reads.join().unwrap(),
    );
    let s = agent.stop();
    let missing: Vec<u32> = victims
        .iter()
        .copied()
        .filter(|p| s.reads(*p).len() != 1)
        .collect();
    eprintln!(
        "flood figures: {:.0} forks/s, {:.0} unwatched opens/s, {:.0} reads/s of its own secret \
         (noisy workload); {} victim reads, {} missing; probe drops {} (stats `drops`); exit \
         events {}; agent peak RSS {peak_rss} KiB; process table {} entries, {} dropped",
        forked as f64 / elapsed,
        opened as f64 / elapsed,
        noisy as f64 / elapsed,
        victims.len(),
        missing.len(),
        s.stats["drops"],
        s.kind(EventKind::Exit).len(),
        s.stats["processes"],
        s.stats["processes_dropped"],
    );
    assert!(missing.is_empty(), "victim reads lost: {missing:?}");
    assert!(victims.len() > 100);
}

fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        })
        .unwrap_or(0)
}
