//! Every way into the kernel a credential use can take, end to end with real probes: io_uring,
//! TCP Fast Open, Unix sockets, a racing thread, floods of re-reads, 32-bit code, spoofed DNS,
//! credentials in the environment and on the command line, reading another process's memory,
//! and the cloud metadata service (in a network namespace of the test's own: no packet ever
//! leaves this machine).

use std::{
    collections::BTreeMap,
    io::Read,
    net::{TcpListener, UdpSocket},
    path::{Path, PathBuf},
    process::Command,
    time::Duration,
};

use credwatch::event::{Body, Event, EventKind, ExecInfo, ProcessAccess};
use credwatch_tests::{
    Actor, Agent, Stopped, TestCgroup, clickhouse::TestClickHouse, expected_fingerprint,
    pod_cgroup, unique, workdir,
};

const ACTOR: &str = env!("CARGO_BIN_EXE_cw-actor");
const KEY: &str = "test-fleet-key-not-secret";

fn actor() -> Actor {
    Actor::new(ACTOR)
}

fn watching(path: &Path, extra: &str) -> String {
    format!(
        "[secrets]\ncatalog = false\npaths = [\"{}\"]\n[fingerprint]\nkey = \"{KEY}\"\n{extra}\n",
        path.display()
    )
}

fn token(dir: &Path, value: &str) -> PathBuf {
    let p = dir.join("token");
    std::fs::write(&p, value).unwrap();
    p
}

/// A listener that accepts (and drops) connections until the test ends.
fn accepting() -> (TcpListener, u16) {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = l.local_addr().unwrap().port();
    let l2 = l.try_clone().unwrap();
    std::thread::spawn(move || for _ in l2.incoming() {});
    (l, port)
}

fn closed_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn suppressed(s: &Stopped, reason: &str) -> u64 {
    s.stats["suppressed"][reason]
        .as_u64()
        .unwrap_or_else(|| panic!("stats file has suppressed.{reason}: {}", s.stats))
}

fn exec_of(s: &Stopped, pid: u32) -> &ExecInfo {
    let execs: Vec<&ExecInfo> = s
        .of(EventKind::Exec, pid)
        .into_iter()
        .filter_map(|e| match &e.body {
            Body::Exec(x) => Some(&**x),
            _ => None,
        })
        .collect();
    assert!(!execs.is_empty(), "no exec event for pid {pid}");
    execs[execs.len() - 1]
}

fn accesses(s: &Stopped, reader: u32) -> Vec<(&Event, &ProcessAccess)> {
    s.events
        .iter()
        .filter(|e| e.process.tgid == reader)
        .filter_map(|e| match &e.body {
            Body::ProcessAccess(a) => Some((e, &**a)),
            _ => None,
        })
        .collect()
}

#[test]
#[ignore = "privileged: real probes (cargo xtask test runs it as root)"]
fn io_uring_opens_are_reads_by_the_submitting_process() {
    let w = workdir();
    let token = token(w.path(), "fake-test-token-uring");
    let agent = Agent::start(&watching(&token, ""));
    let runs: Vec<(&str, u32)> = ["inline", "async", "sqpoll"]
        .iter()
        .map(|how| (*how, actor().uring_open(&token, how).pid()))
        .collect();
    let (fixed, out) = actor().uring_open(&token, "fixed").run();
    assert_eq!(out.trim(), "uring fixed slot 0");
    let s = agent.stop();
    for (how, pid) in runs {
        let reads = s.reads(pid);
        assert_eq!(reads.len(), 1, "{how}: {reads:#?}");
        let (e, r) = reads[0];
        // An io-wq worker or the SQ thread opened it; the submitting process is named.
        assert_eq!(e.process.tgid, pid, "{how}");
        assert_eq!(e.process.exe, ACTOR, "{how}");
        assert_eq!(r.secret.syscall, "io_uring_openat", "{how}");
        assert_eq!(r.secret.path.as_deref(), token.to_str(), "{how}");
        assert_eq!(r.secret.opened_as, token.display().to_string(), "{how}");
        assert!(r.secret.fd >= 0, "{how}: {}", r.secret.fd);
        assert_eq!(
            r.credential.fingerprint,
            expected_fingerprint(KEY, b"fake-test-token-uring")
        );
    }
    // Into a fixed-file slot there is no fd to match by inode: counted, said so.
    assert!(s.reads(fixed).is_empty());
    assert!(suppressed(&s, "io_uring_fixed_slot") >= 1);
}

#[test]
#[ignore = "privileged: real probes (cargo xtask test runs it as root)"]
fn io_uring_and_fast_open_connects_name_their_destination() {
    let (_l, open) = accepting();
    let closed = closed_port();
    let agent = Agent::start("[secrets]\ncatalog = false\n");
    let (ok_pid, out) = actor().uring_connect(format!("127.0.0.1:{open}")).run();
    assert_eq!(out.trim(), "uring connect ok");
    let refused = actor().uring_connect(format!("127.0.0.1:{closed}")).pid();
    let (tfo, out) = actor().fastopen(format!("127.0.0.1:{open}")).run();
    assert!(out.starts_with("fastopen sent"), "{out}");
    let s = agent.stop();
    for (pid, port, via, result) in [
        (ok_pid, open, "io_uring", "ok"),
        (refused, closed, "io_uring", "refused"),
        (tfo, open, "fastopen", "sent"),
    ] {
        let c = s.connects(pid);
        assert_eq!(c.len(), 1, "{via} to {port}: {c:#?}");
        let c = c[0].1;
        assert_eq!(
            c.dst.socket_addr(),
            Some(([127, 0, 0, 1], port).into()),
            "{via}"
        );
        assert_eq!((&*c.dst.proto, &*c.via, &*c.result), ("tcp", via, result));
    }
}

#[test]
#[ignore = "privileged: real probes (cargo xtask test runs it as root)"]
fn a_thread_rewriting_the_sockaddr_cannot_forge_the_destination() {
    let (_a, pa) = accepting();
    let (_b, pb) = accepting();
    let agent = Agent::start("[secrets]\ncatalog = false\n");
    let (pid, out) = actor()
        .connect_race(format!("127.0.0.1:{pa}"), format!("127.0.0.1:{pb}"), 300)
        .run();
    let s = agent.stop();
    let reached: Vec<u16> = out.trim().split(',').map(|p| p.parse().unwrap()).collect();
    assert_eq!(reached.len(), 300);
    let mut reported: Vec<(i64, u16)> = s
        .connects(pid)
        .iter()
        .map(|(e, c)| (e.ts.unix_nanos(), c.dst.port))
        .collect();
    reported.sort();
    let reported: Vec<u16> = reported.into_iter().map(|(_, p)| p).collect();
    // Exactly where each socket went, whatever the buffer said by the time connect returned.
    assert_eq!(reported, reached);
    let to_b = reached.iter().filter(|p| **p == pb).count();
    eprintln!("race: {to_b} of 300 connects reached the second port");
    assert!(
        to_b > 0 && to_b < 300,
        "the flipping thread never raced the connects; the test proved nothing"
    );
}

#[test]
#[ignore = "privileged: real probes (cargo xtask test runs it as root)"]
fn unix_socket_connects_name_the_socket_file() {
    let w = workdir();
    let path = w.path().join("agent.sock");
    let _l = std::os::unix::net::UnixListener::bind(&path).unwrap();
    let agent = Agent::start("[secrets]\ncatalog = false\n");
    let (pid, out) = actor().unix_connect(&path).run();
    assert_eq!(out.trim(), "connected");
    let missing = actor().unix_connect(w.path().join("nobody.sock")).pid();
    let s = agent.stop();
    let c = s.connects(pid);
    assert_eq!(c.len(), 1, "{c:#?}");
    let c = c[0].1;
    assert_eq!(c.dst.path.as_deref(), path.to_str());
    assert_eq!(c.dst.ip, None);
    assert_eq!((&*c.dst.proto, &*c.result), ("unix", "ok"));
    // No socket file, no peer: nothing was reached.
    assert!(s.connects(missing).is_empty());
}

#[test]
#[ignore = "privileged: real probes (cargo xtask test runs it as root)"]
fn rereads_are_counted_exactly_and_other_cgroups_lose_nothing() {
    const OPENS: u64 = 100_000;
    const OTHERS: usize = 40;
    let w = workdir();
    let token = token(w.path(), "fake-test-token-flood");
    let flooder = TestCgroup::create(&unique("cwtest-flood"));
    let quiet = TestCgroup::create(&unique("cwtest-quiet"));
    let agent = Agent::start(&watching(&token, ""));
    let flood = actor().join_cgroup(&flooder).flood(&token, OPENS);
    let (tx, rx) = std::sync::mpsc::channel();
    let t = std::thread::spawn(move || tx.send(flood.run()).unwrap());
    // While it floods: other processes in another cgroup read the same secret once each.
    let others: Vec<u32> = (0..OTHERS)
        .map(|_| actor().join_cgroup(&quiet).open(&token).pid())
        .collect();
    let (pid, out) = rx.recv().unwrap();
    t.join().unwrap();
    assert_eq!(out.trim(), format!("flooded {OPENS}"));
    let s = agent.stop();

    let reads = s.reads(pid);
    let total: u64 = reads.iter().map(|(_, r)| 1 + r.secret.repeats).sum();
    eprintln!(
        "flood: {OPENS} opens as {} secret_read events: {:?}",
        reads.len(),
        reads
            .iter()
            .map(|(_, r)| r.secret.repeats)
            .collect::<Vec<_>>()
    );
    assert_eq!(total, OPENS, "every open counted exactly once");
    assert!(
        reads.len() <= 10,
        "{} records for one re-reading process",
        reads.len()
    );
    for p in others {
        assert_eq!(s.reads(p).len(), 1, "pid {p} in the other cgroup");
    }
    assert_eq!(s.stats["drops"]["open"], 0);
}

/// The 32-bit reader, built for the test (`gcc -m32`; `cargo xtask test` installs
/// gcc-multilib).
fn ia32_reader(dir: &Path) -> PathBuf {
    let out = dir.join("reader32");
    let src = format!("{}/fixtures/ia32/reader.c", env!("CARGO_MANIFEST_DIR"));
    let st = Command::new("gcc")
        .args(["-m32", "-O1", "-o"])
        .arg(&out)
        .arg(&src)
        .status()
        .expect("gcc");
    assert!(st.success(), "gcc -m32 failed: is gcc-multilib installed?");
    out
}

#[test]
#[ignore = "privileged: real probes (cargo xtask test runs it as root)"]
fn a_32_bit_process_is_flagged_and_its_reads_are_seen() {
    let w = workdir();
    let token = token(w.path(), "fake-test-token-ia32");
    let bin = ia32_reader(w.path());
    let run = |gap_ms: &str| {
        let st = Command::new(&bin).arg(&token).arg(gap_ms).spawn().unwrap();
        let pid = st.id();
        assert!(st.wait_with_output().unwrap().status.success());
        pid
    };

    // `always`: the compat syscall exit is watched from the start; both opens count.
    let agent = Agent::start(&watching(&token, "[sensors]\nia32 = \"always\"\n"));
    let pid = run("10");
    let s = agent.stop();
    assert_eq!(exec_of(&s, pid).abi.as_deref(), Some("ia32"));
    let reads = s.reads(pid);
    assert!(!reads.is_empty(), "32-bit reads unseen");
    assert!(
        reads
            .iter()
            .all(|(_, r)| r.secret.abi.as_deref() == Some("ia32"))
    );
    assert_eq!(
        reads.iter().map(|(_, r)| 1 + r.secret.repeats).sum::<u64>(),
        2
    );

    // The default (`on_exec`): the first 32-bit exec switches the probe on; what that
    // process opens after it (here 1 s later) is seen.
    let agent = Agent::start(&watching(&token, ""));
    let pid = run("1000");
    let s = agent.stop();
    assert_eq!(exec_of(&s, pid).abi.as_deref(), Some("ia32"));
    let reads = s.reads(pid);
    assert!(!reads.is_empty(), "the read after the switch was not seen");
    assert!(
        reads
            .iter()
            .all(|(_, r)| r.secret.abi.as_deref() == Some("ia32"))
    );
}

#[test]
#[ignore = "privileged: real probes (cargo xtask test runs it as root)"]
fn dns_answers_nobody_asked_for_name_nothing() {
    // A resolver at 127.0.9.53 that answers `real.*` itself and has `spoofed.*` answered
    // from 127.0.9.54: an answer from an address the client never asked.
    let server = UdpSocket::bind("127.0.9.53:53").expect("bind 127.0.9.53:53 (needs root)");
    let spoofer = UdpSocket::bind("127.0.9.54:53").expect("bind 127.0.9.54:53");
    let srv = server.try_clone().unwrap();
    std::thread::spawn(move || {
        let mut buf = [0u8; 1500];
        while let Ok((n, from)) = srv.recv_from(&mut buf) {
            let Ok(q) = simple_dns::Packet::parse(&buf[..n]) else {
                continue;
            };
            let mut a = simple_dns::Packet::new_reply(q.id());
            let mut spoof = false;
            for question in &q.questions {
                spoof |= question.qname.to_string().starts_with("spoofed.");
                a.questions.push(question.clone());
                a.answers.push(simple_dns::ResourceRecord::new(
                    question.qname.clone(),
                    simple_dns::CLASS::IN,
                    300,
                    simple_dns::rdata::RData::A(simple_dns::rdata::A {
                        address: u32::from(std::net::Ipv4Addr::new(127, 0, 0, 7)),
                    }),
                ));
            }
            let bytes = a.build_bytes_vec().unwrap();
            let via = if spoof { &spoofer } else { &srv };
            let _ = via.send_to(&bytes, from);
        }
    });
    let agent = Agent::start("[secrets]\ncatalog = false\n");
    actor().dns("127.0.9.53:53", "spoofed.credwatch.test").run();
    actor().dns("127.0.9.53:53", "real.credwatch.test").run();
    let s = agent.stop();
    let names: Vec<&str> = s
        .kind(EventKind::Dns)
        .into_iter()
        .filter_map(|e| match &e.body {
            Body::Dns(d) => Some(d.name.as_str()),
            _ => None,
        })
        .filter(|n| n.ends_with(".credwatch.test"))
        .collect();
    assert_eq!(names, ["real.credwatch.test"]);
    assert!(suppressed(&s, "dns_unsolicited") >= 1);
    drop(server);
}

#[test]
#[ignore = "privileged: real probes (cargo xtask test runs it as root)"]
fn exit_is_reported_when_the_last_thread_is_gone() {
    let agent = Agent::start("[secrets]\ncatalog = false\n");
    let (pid, out, status) = actor().leader_exits(800, 3).run_unchecked();
    assert_eq!(out.trim(), "last thread exiting");
    assert_eq!(status.code(), Some(3));
    let s = agent.stop();
    let exits = s.of(EventKind::Exit, pid);
    assert_eq!(exits.len(), 1, "{exits:#?}");
    assert!(
        matches!(exits[0].body, Body::Exit { code: 3 }),
        "{:?}",
        exits[0].body
    );
    let exec = s.of(EventKind::Exec, pid);
    let lived = exits[0].ts.unix_nanos() - exec[0].ts.unix_nanos();
    assert!(
        lived >= 700_000_000,
        "exit reported {lived} ns after exec: the leader's own exit, not the process's"
    );
}

#[test]
#[ignore = "privileged: real probes and the test ClickHouse (cargo xtask test sets them up)"]
fn environment_and_command_line_credentials_are_fingerprints_only() {
    let ch = TestClickHouse::start();
    let secret_key = "fakeAwsSecretKeyForTests0000000000000000";
    let gh = "ghp_FAKEfakeFAKEfakeFAKEfakeFAKEfake0000";
    let pw = "fake-cli-password-0001";
    let agent = Agent::start(&format!(
        "[secrets]\ncatalog = false\n[fingerprint]\nkey = \"{KEY}\"\n{}",
        ch.config()
    ));
    // `env NAME=value prog`: the value is on env's command line, then in prog's environment.
    // env execs the actor in its own pid; other tests' actors run beside it.
    let mut env_child = Command::new("env")
        .arg(format!("AWS_SECRET_ACCESS_KEY={secret_key}"))
        .arg(format!("GITHUB_TOKEN={gh}"))
        .arg(ACTOR)
        .args(["sleep", "10"])
        .spawn()
        .unwrap();
    let env_pid = env_child.id();
    assert!(env_child.wait().unwrap().success());
    // A shell line with a password option, as a CI step would run it.
    let out = Command::new("sh")
        .args(["-c", &format!("true --password={pw} && true")])
        .output()
        .unwrap();
    assert!(out.status.success());
    let s = agent.stop();

    let holder = s
        .kind(EventKind::Exec)
        .into_iter()
        .find(|e| e.process.exe == ACTOR && e.process.pid == env_pid)
        .expect("the actor's exec");
    let Body::Exec(x) = &holder.body else {
        unreachable!()
    };
    let found: BTreeMap<&str, (&str, &str)> = x
        .env_credentials
        .iter()
        .map(|c| (c.name.as_str(), (c.kind.as_str(), c.fingerprint.as_str())))
        .collect();
    let aws_fp = expected_fingerprint(KEY, secret_key.as_bytes());
    let gh_fp = expected_fingerprint(KEY, gh.as_bytes());
    assert_eq!(
        found["AWS_SECRET_ACCESS_KEY"],
        ("aws_access_key", aws_fp.as_str())
    );
    assert_eq!(found["GITHUB_TOKEN"], ("github_token", gh_fp.as_str()));
    let shell = s
        .kind(EventKind::Exec)
        .into_iter()
        .filter_map(|e| match &e.body {
            Body::Exec(x) if x.argv.iter().any(|a| a.contains("--password=")) => Some(x),
            _ => None,
        })
        .next()
        .expect("the shell line's exec");
    assert_eq!(
        shell.argv_credentials[0].fingerprint,
        expected_fingerprint(KEY, pw.as_bytes())
    );

    // The values themselves: nowhere the agent wrote, and not in ClickHouse.
    let mut everything = s.all_output();
    let tables: Vec<String> = ch.rows(&format!(
        "SELECT name FROM system.tables WHERE database = '{}'",
        ch.database
    ));
    assert!(tables.iter().any(|t| t == "events"), "{tables:?}");
    let mut rows = 0;
    for t in &tables {
        for row in ch.rows::<String>(&format!("SELECT formatRow('JSONEachRow', *) FROM {t}")) {
            everything.push_str(&row);
            rows += 1;
        }
    }
    assert!(rows > 0, "nothing reached ClickHouse");
    assert!(everything.contains(&aws_fp));
    for v in [secret_key, gh, pw] {
        assert!(
            !everything.contains(v),
            "a credential value leaked into the agent's output or ClickHouse"
        );
    }
}

#[test]
#[ignore = "privileged: real probes (cargo xtask test runs it as root)"]
fn reading_another_process_memory_or_environment_names_both() {
    let target = actor()
        .env(
            "AWS_SECRET_ACCESS_KEY",
            "fakeAwsSecretKeyForTests1111111111111111",
        )
        .sleep_ms(4000)
        .spawn();
    let tpid = target.id();
    std::thread::sleep(Duration::from_millis(200));
    let victim_cg = pod_cgroup("0f0f0f0f-0000-4000-8000-00000000000a", &"c".repeat(64));
    std::fs::write(victim_cg.path.join("cgroup.procs"), tpid.to_string()).unwrap();

    let agent = Agent::start("[secrets]\ncatalog = false\n");
    let cat = Command::new("cat")
        .arg(format!("/proc/{tpid}/environ"))
        .output()
        .unwrap();
    assert!(cat.status.success());
    let mem = actor().read_proc(tpid, "mem").pid();
    let (vm, out) = actor().vm_readv(tpid).run();
    assert_eq!(out.trim(), "process_vm_readv 8");
    let pt = actor().ptrace_seize(tpid).pid();
    let own = actor().read_proc("self", "environ").pid();
    let s = agent.stop();
    drop(target);

    let readers: Vec<(&Event, &ProcessAccess)> = s
        .events
        .iter()
        .filter_map(|e| match &e.body {
            Body::ProcessAccess(a) if e.process.comm == "cat" => Some((e, &**a)),
            _ => None,
        })
        .collect();
    assert_eq!(readers.len(), 1, "{readers:#?}");
    let mut cases = vec![(readers[0].1.clone(), "environ")];
    for (pid, access) in [(mem, "mem"), (vm, "process_vm_readv"), (pt, "ptrace_seize")] {
        let a = accesses(&s, pid);
        assert_eq!(a.len(), 1, "{access}: {a:#?}");
        cases.push((a[0].1.clone(), access));
    }
    for (a, access) in cases {
        assert_eq!(a.access, access);
        assert_eq!(a.target.pid, tpid, "{access}");
        assert_eq!(a.target.exe, ACTOR, "{access}");
        assert_eq!(
            a.target.workload.pod_uid.as_deref(),
            Some("0f0f0f0f-0000-4000-8000-00000000000a"),
            "{access}: the target's workload"
        );
    }
    // Its own environment is nobody else's.
    assert!(accesses(&s, own).is_empty());
}

/// A network namespace of the test's own where 169.254.169.254 is a local address: the
/// metadata "service" is a process of the test, and nothing leaves the machine.
struct MetadataNetns {
    name: String,
}

impl MetadataNetns {
    fn create() -> MetadataNetns {
        let name = unique("cwmd");
        let ip = |args: &[&str]| {
            let st = Command::new("ip").args(args).status().expect("ip");
            assert!(st.success(), "ip {args:?}");
        };
        ip(&["netns", "add", &name]);
        ip(&["-n", &name, "link", "set", "lo", "up"]);
        ip(&[
            "-n",
            &name,
            "addr",
            "add",
            "169.254.169.254/32",
            "dev",
            "lo",
        ]);
        MetadataNetns { name }
    }

    fn path(&self) -> PathBuf {
        PathBuf::from("/run/netns").join(&self.name)
    }
}

impl Drop for MetadataNetns {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .status();
    }
}

#[test]
#[ignore = "privileged: real probes (cargo xtask test runs it as root)"]
fn a_pods_metadata_requests_are_named_with_their_path() {
    let ns = MetadataNetns::create();
    let mut server = actor()
        .join_netns(ns.path())
        .serve_http("169.254.169.254:80", 2)
        .spawn();
    let mut line = [0u8; 10];
    let n = server.stdout.as_mut().unwrap().read(&mut line).unwrap();
    assert_eq!(&line[..n], b"listening\n");
    let pod = pod_cgroup("0f0f0f0f-0000-4000-8000-00000000000b", &"d".repeat(64));

    let agent = Agent::start_alone("[secrets]\ncatalog = false\n");
    let curl = |args: &[&str]| {
        actor()
            .join_cgroup(&pod)
            .join_netns(ns.path())
            .exec("curl", args)
            .run()
            .0
    };
    let put = curl(&[
        "-sf",
        "-X",
        "PUT",
        "-H",
        "X-aws-ec2-metadata-token-ttl-seconds: 60",
        "http://169.254.169.254/latest/api/token",
    ]);
    let get = curl(&[
        "-sf",
        "http://169.254.169.254/latest/meta-data/iam/security-credentials/node-role",
    ]);
    let s = agent.stop();
    let _ = server.wait();

    for (pid, method, path, role) in [
        (put, "PUT", "/latest/api/token", None),
        (
            get,
            "GET",
            "/latest/meta-data/iam/security-credentials/node-role",
            Some("node-role"),
        ),
    ] {
        let c = s.connects(pid);
        assert_eq!(c.len(), 1, "{c:#?}");
        assert!(
            c[0].1.dst.metadata,
            "the connect is marked as cloud metadata"
        );
        let fetches: Vec<_> = s
            .of(EventKind::MetadataFetch, pid)
            .into_iter()
            .filter_map(|e| match &e.body {
                Body::MetadataFetch(m) => Some((e, m)),
                _ => None,
            })
            .collect();
        assert_eq!(fetches.len(), 1, "{fetches:#?}");
        let (e, m) = fetches[0];
        assert_eq!((m.method.as_str(), m.path.as_str()), (method, path));
        assert_eq!(m.dst.socket_addr(), Some(([169, 254, 169, 254], 80).into()));
        assert_eq!((&*m.provider, m.credentials), ("aws", true));
        assert_eq!(m.role.as_deref(), role);
        assert_eq!(
            e.workload.pod_uid.as_deref(),
            Some("0f0f0f0f-0000-4000-8000-00000000000b")
        );
    }
}
