//! Kernel sensors, end to end: real probes in this kernel, real processes, exact fields.

use std::{
    net::{TcpListener, UdpSocket},
    os::unix::fs::{MetadataExt, PermissionsExt},
    path::Path,
    process::Command,
};

use credwatch_tests::{Agent, TestCgroup, actor, bpf_available, unique, workdir};
use serde_json::Value;

const ACTOR: &str = env!("CARGO_BIN_EXE_cw-actor");

fn config_watching(path: &Path) -> String {
    format!(
        "[secrets]\ncatalog = false\npaths = [\"{}\"]\n",
        path.display()
    )
}

fn one_read<'a>(s: &'a credwatch_tests::Stopped, pid: u32, what: &str) -> &'a Value {
    let reads = s.of("secret_read", pid);
    assert_eq!(
        reads.len(),
        1,
        "{what}: expected exactly one secret_read for pid {pid}, got {reads:#?}"
    );
    reads[0]
}

#[test]
fn secret_reads_are_matched_by_inode_whatever_the_path() {
    if !bpf_available("secret_reads_are_matched_by_inode_whatever_the_path") {
        return;
    }
    let w = workdir();
    let dir = w.path().join("secrets");
    std::fs::create_dir(&dir).unwrap();
    let token = dir.join("token");
    std::fs::write(&token, "fake-test-token-0001").unwrap();
    let ino = std::fs::metadata(&token).unwrap().ino();
    let dev = std::fs::metadata(&token).unwrap().dev();
    let other = dir.join("not-a-secret");
    std::fs::write(&other, "public").unwrap();
    std::os::unix::fs::symlink(&token, w.path().join("link")).unwrap();
    std::fs::hard_link(&token, w.path().join("hardlink")).unwrap();
    let mnt = w.path().join("mnt");
    std::fs::create_dir(&mnt).unwrap();

    let agent = Agent::start(&config_watching(&token));
    let t = token.to_str().unwrap();
    let abs = actor(ACTOR, &["open", t]).0;
    let rel = actor(ACTOR, &["open-rel", dir.to_str().unwrap(), "token"]).0;
    let sym = actor(ACTOR, &["open", w.path().join("link").to_str().unwrap()]).0;
    let hard = actor(
        ACTOR,
        &["open", w.path().join("hardlink").to_str().unwrap()],
    )
    .0;
    let dirfd = actor(ACTOR, &["openat", dir.to_str().unwrap(), "token"]).0;
    let proc_root = format!("/proc/self/root{t}");
    let via_proc = actor(ACTOR, &["open", &proc_root]).0;
    let o2 = actor(ACTOR, &["openat2", t]).0;
    let unwatched = actor(ACTOR, &["open", other.to_str().unwrap()]).0;
    // A private mount namespace where the secrets dir is bind-mounted somewhere else, the way
    // a container sees a volume.
    let script = format!(
        "mount --bind {} {} && exec {ACTOR} open {}/token",
        dir.display(),
        mnt.display(),
        mnt.display()
    );
    let ns = Command::new("unshare")
        .args(["-m", "--propagation", "private", "sh", "-c", &script])
        .output()
        .unwrap();
    assert!(
        ns.status.success(),
        "unshare: {}",
        String::from_utf8_lossy(&ns.stderr)
    );
    // unshare and sh exec in place, so the actor keeps unshare's pid; find it by its event.
    let s = agent.stop();

    for (pid, what, opened_as) in [
        (abs, "absolute", t.to_owned()),
        (rel, "relative", "token".to_owned()),
        (sym, "symlink", w.path().join("link").display().to_string()),
        (
            hard,
            "hardlink",
            w.path().join("hardlink").display().to_string(),
        ),
        (dirfd, "dirfd openat", "token".to_owned()),
        (via_proc, "/proc/self/root", proc_root.clone()),
        (o2, "openat2", t.to_owned()),
    ] {
        let e = one_read(&s, pid, what);
        assert_eq!(e["process"]["pid"], pid, "{what}");
        assert_eq!(e["process"]["comm"], "cw-actor", "{what}");
        assert_eq!(e["secret"]["inode"], ino, "{what}");
        assert_eq!(e["secret"]["dev"], dev, "{what}");
        assert_eq!(e["secret"]["path"], t, "{what}");
        assert_eq!(e["secret"]["opened_as"], opened_as.as_str(), "{what}");
        assert_eq!(e["secret"]["access"], "read", "{what}");
        assert_eq!(e["workload"]["kind"], "host", "{what}");
    }
    assert_eq!(one_read(&s, o2, "openat2")["secret"]["syscall"], "openat2");
    assert_eq!(one_read(&s, dirfd, "dirfd")["secret"]["syscall"], "openat");
    assert!(
        s.of("secret_read", unwatched).is_empty(),
        "an unwatched file produced an event"
    );

    let bind_path = format!("{}/token", mnt.display());
    let in_ns: Vec<_> = s
        .kind("secret_read")
        .into_iter()
        .filter(|e| e["secret"]["opened_as"] == bind_path.as_str())
        .collect();
    assert_eq!(
        in_ns.len(),
        1,
        "bind-mounted read in a private mount namespace"
    );
    assert_eq!(in_ns[0]["secret"]["inode"], ino);
    assert_eq!(in_ns[0]["process"]["comm"], "cw-actor");
    // Nothing leaks the secret's content.
    let all = std::fs::read_to_string(s.dir.path().join("events.ndjson")).unwrap();
    assert!(!all.contains("fake-test-token-0001"));
}

#[test]
fn connects_report_destination_protocol_and_result() {
    if !bpf_available("connects_report_destination_protocol_and_result") {
        return;
    }
    let l4 = TcpListener::bind("127.0.0.1:0").unwrap();
    let l6 = TcpListener::bind("[::1]:0").unwrap();
    let (p4, p6) = (
        l4.local_addr().unwrap().port(),
        l6.local_addr().unwrap().port(),
    );
    // A port that was just free: nothing listens, connect is refused.
    let closed = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let closed6 = TcpListener::bind("[::1]:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let u = UdpSocket::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();

    let agent = Agent::start("[secrets]\ncatalog = false\n");
    let cases = [
        ("tcp", format!("127.0.0.1:{p4}"), "127.0.0.1", p4, "ok"),
        ("tcp", format!("[::1]:{p6}"), "::1", p6, "ok"),
        (
            "tcp",
            format!("127.0.0.1:{closed}"),
            "127.0.0.1",
            closed,
            "refused",
        ),
        ("tcp", format!("[::1]:{closed6}"), "::1", closed6, "refused"),
        ("udp", format!("127.0.0.1:{u}"), "127.0.0.1", u, "ok"),
        ("udp", format!("[::1]:{u}"), "::1", u, "ok"),
        (
            "tcp-nonblocking",
            format!("127.0.0.1:{p4}"),
            "127.0.0.1",
            p4,
            "in_progress",
        ),
    ];
    let pids: Vec<u32> = cases
        .iter()
        .map(|(proto, addr, ..)| actor(ACTOR, &["connect", proto, addr]).0)
        .collect();
    let s = agent.stop();
    for ((proto, _, ip, port, result), pid) in cases.iter().zip(pids) {
        let c = s.of("connect", pid);
        assert_eq!(c.len(), 1, "{proto} {ip}:{port}: {c:#?}");
        assert_eq!(c[0]["dst"]["ip"], *ip);
        assert_eq!(c[0]["dst"]["port"], *port);
        assert_eq!(c[0]["dst"]["proto"], proto.trim_end_matches("-nonblocking"));
        assert_eq!(c[0]["result"], *result, "{proto} {ip}:{port}");
        assert_eq!(c[0]["process"]["comm"], "cw-actor");
    }
    drop((l4, l6));
}

#[test]
fn exec_lineage_cgroup_and_setuid() {
    if !bpf_available("exec_lineage_cgroup_and_setuid") {
        return;
    }
    let w = workdir();
    let token = w.path().join("token");
    std::fs::write(&token, "fake-test-token-0002").unwrap();
    // A set-uid-root copy of the actor, run by uid 1000.
    let suid = w.path().join("cw-actor-suid");
    std::fs::copy(ACTOR, &suid).unwrap();
    std::fs::set_permissions(&suid, std::fs::Permissions::from_mode(0o4755)).unwrap();
    let cg = TestCgroup::create(&unique("credwatch-test"));

    let agent = Agent::start(&config_watching(&token));
    // sh forks a child that execs the actor: lineage sh → cw-actor.
    let sh = Command::new("sh")
        .args(["-c", &format!("{ACTOR} ids; true")])
        .output()
        .unwrap();
    assert!(sh.status.success());
    let sh_child = Command::new("sh")
        .args(["-c", &format!("{ACTOR} ids; true")])
        .spawn()
        .unwrap();
    let sh_pid = sh_child.id();
    sh_child.wait_with_output().unwrap();
    let in_cg = actor(
        ACTOR,
        &[
            "join-cgroup",
            cg.path.to_str().unwrap(),
            "+",
            "open",
            token.to_str().unwrap(),
        ],
    )
    .0;
    let (suid_pid, out) = actor(ACTOR, &["as-user", "1000", suid.to_str().unwrap(), "ids"]);
    assert_eq!(
        out.trim(),
        "uid=1000 euid=0",
        "the test binary must really be set-uid"
    );
    let (setuid_pid, _) = actor(ACTOR, &["setuid", "1000"]);
    let s = agent.stop();

    // Lineage: the actor's exec names sh as its parent.
    let child_exec: Vec<_> = s
        .kind("exec")
        .into_iter()
        .filter(|e| e["process"]["ppid"] == sh_pid)
        .collect();
    assert_eq!(
        child_exec.len(),
        1,
        "one exec whose parent is sh ({sh_pid})"
    );
    assert_eq!(child_exec[0]["exec"]["filename"], ACTOR);
    assert_eq!(child_exec[0]["process"]["comm"], "cw-actor");
    let sh_exec = s.of("exec", sh_pid);
    assert_eq!(sh_exec.len(), 1);
    assert_eq!(sh_exec[0]["process"]["ppid"], std::process::id());

    // cgroup: the id is the directory's inode, the path is relative to the cgroup2 mount.
    let r = one_read(&s, in_cg, "cgroup");
    assert_eq!(r["workload"]["cgroup_id"], cg.id());
    assert_eq!(r["workload"]["cgroup"], cg.rel.as_str());

    // Set-uid exec: the exec shows uid 1000 / euid 0 and a priv_change says so.
    let e = s.of("exec", suid_pid);
    let suid_exec = e
        .iter()
        .find(|e| e["exec"]["filename"] == suid.to_str().unwrap())
        .expect("exec of the setuid binary");
    assert_eq!(suid_exec["process"]["uid"], 1000);
    assert_eq!(suid_exec["process"]["euid"], 0);
    // (as-user's own setgid/setuid calls before the exec are priv_changes too.)
    let p: Vec<_> = s
        .of("priv_change", suid_pid)
        .into_iter()
        .filter(|e| e["priv_change"]["via"] == "exec")
        .collect();
    assert_eq!(p.len(), 1, "{p:#?}");
    assert_eq!(p[0]["priv_change"]["old_euid"], 1000);
    assert_eq!(p[0]["priv_change"]["new_euid"], 0);

    // setresuid(2) from root to 1000.
    let p = s.of("priv_change", setuid_pid);
    assert_eq!(p.len(), 1, "{p:#?}");
    assert_eq!(p[0]["priv_change"]["via"], "setresuid");
    assert_eq!(p[0]["priv_change"]["old_uid"], 0);
    assert_eq!(p[0]["priv_change"]["new_uid"], 1000);
    assert_eq!(p[0]["priv_change"]["new_euid"], 1000);
}

#[test]
fn dns_answer_names_the_next_connect() {
    if !bpf_available("dns_answer_names_the_next_connect") {
        return;
    }
    // A DNS server on a loopback address answering every A query with 127.0.0.1.
    let server = UdpSocket::bind("127.0.9.53:53").expect("bind 127.0.9.53:53 (needs root)");
    let srv = server.try_clone().unwrap();
    std::thread::spawn(move || {
        let mut buf = [0u8; 1500];
        while let Ok((n, from)) = srv.recv_from(&mut buf) {
            let Ok(q) = simple_dns::Packet::parse(&buf[..n]) else {
                continue;
            };
            let mut a = simple_dns::Packet::new_reply(q.id());
            for question in &q.questions {
                a.questions.push(question.clone());
                a.answers.push(simple_dns::ResourceRecord::new(
                    question.qname.clone(),
                    simple_dns::CLASS::IN,
                    300,
                    simple_dns::rdata::RData::A(simple_dns::rdata::A {
                        address: u32::from(std::net::Ipv4Addr::LOCALHOST),
                    }),
                ));
            }
            let _ = srv.send_to(&a.build_bytes_vec().unwrap(), from);
        }
    });
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = l.local_addr().unwrap().port();

    let agent = Agent::start("[secrets]\ncatalog = false\n");
    let (pid, _) = actor(
        ACTOR,
        &[
            "dns",
            "127.0.9.53:53",
            "api.credwatch.test",
            "+",
            "connect",
            "tcp",
            &format!("127.0.0.1:{port}"),
        ],
    );
    let s = agent.stop();

    let dns: Vec<_> = s
        .kind("dns")
        .into_iter()
        .filter(|e| e["dns"]["name"] == "api.credwatch.test")
        .collect();
    assert_eq!(dns.len(), 1, "{:#?}", s.kind("dns"));
    assert_eq!(dns[0]["dns"]["addrs"][0], "127.0.0.1");
    assert_eq!(dns[0]["dns"]["server"], "127.0.9.53");
    // The unconnected query itself is seen by the sendmsg hook.
    let sends: Vec<_> = s
        .of("connect", pid)
        .into_iter()
        .filter(|e| e["result"] == "sent")
        .collect();
    assert_eq!(sends.len(), 1);
    assert_eq!(sends[0]["dst"]["port"], 53);
    assert_eq!(sends[0]["dst"]["proto"], "udp");
    let tcp: Vec<_> = s
        .of("connect", pid)
        .into_iter()
        .filter(|e| e["dst"]["proto"] == "tcp")
        .collect();
    assert_eq!(tcp.len(), 1);
    assert_eq!(tcp[0]["dst"]["name"], "api.credwatch.test");
    drop(server);
}

#[test]
fn flood_events_plus_counted_drops_equal_opens() {
    if !bpf_available("flood_events_plus_counted_drops_equal_opens") {
        return;
    }
    let w = workdir();
    let token = w.path().join("token");
    std::fs::write(&token, "fake-test-token-0003").unwrap();
    // A small ring so the flood must overflow it: drops have to be counted, not hidden.
    let cfg = format!(
        "{}\n[sensors]\nring_bytes = 262144\nwake_bytes = 131072\n",
        config_watching(&token)
    );
    let agent = Agent::start(&cfg);
    const OPENS: u64 = 200_000;
    let (pid, out) = actor(
        ACTOR,
        &["flood", token.to_str().unwrap(), &OPENS.to_string()],
    );
    assert_eq!(out.trim(), format!("flooded {OPENS}"));
    let s = agent.stop();
    let events = s.of("secret_read", pid).len() as u64;
    let drops = s.stats["drops"]["open"]
        .as_u64()
        .expect("stats file has drops.open");
    eprintln!("flood: {events} events + {drops} counted drops for {OPENS} opens");
    assert_eq!(events + drops, OPENS);
}

#[test]
fn hostile_names_are_escaped_not_trusted() {
    if !bpf_available("hostile_names_are_escaped_not_trusted") {
        return;
    }
    let w = workdir();
    let token = w.path().join("token");
    std::fs::write(&token, "fake-test-token-0004").unwrap();
    // A symlink whose name is not UTF-8 and contains an escape sequence.
    let name = b"bad\xff\x1b[2Jname";
    let link = w
        .path()
        .join(<std::ffi::OsStr as std::os::unix::ffi::OsStrExt>::from_bytes(name));
    std::os::unix::fs::symlink(&token, &link).unwrap();
    let hex: String = link
        .as_os_str()
        .as_encoded_bytes()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    // A comm with control characters.
    let evil = w.path().join("ev\x1b[31mil");
    std::fs::copy(ACTOR, &evil).unwrap();

    let agent = Agent::start(&config_watching(&token));
    let (pid, _) = actor(ACTOR, &["open-hex", &hex]);
    let (pid2, _) = actor(evil.to_str().unwrap(), &["open", token.to_str().unwrap()]);
    let s = agent.stop();
    let e = one_read(&s, pid, "non-UTF-8 symlink");
    let opened = e["secret"]["opened_as"].as_str().unwrap();
    assert!(opened.ends_with("bad\u{fffd}\\u{1b}[2Jname"), "{opened}");
    let e = one_read(&s, pid2, "comm with escape");
    assert_eq!(e["process"]["comm"], "ev\\u{1b}[31mil");
}
