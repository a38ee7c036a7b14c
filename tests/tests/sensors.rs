//! Kernel sensors, end to end: real probes in this kernel, real processes, exact fields.

use std::{
    net::{TcpListener, UdpSocket},
    os::unix::fs::{MetadataExt, PermissionsExt},
    path::Path,
    process::Command,
};

use credwatch::event::{Body, EventKind, SecretRead, WorkloadKind};
use credwatch_tests::{Actor, Agent, Stopped, TestCgroup, in_mount_namespace, unique, workdir};

const ACTOR: &str = env!("CARGO_BIN_EXE_cw-actor");

fn actor() -> Actor {
    Actor::new(ACTOR)
}

fn config_watching(path: &Path) -> String {
    format!(
        "[secrets]\ncatalog = false\npaths = [\"{}\"]\n",
        path.display()
    )
}

fn one_read<'a>(
    s: &'a Stopped,
    pid: u32,
    what: &str,
) -> (&'a credwatch::event::Event, &'a SecretRead) {
    let reads = s.reads(pid);
    assert_eq!(
        reads.len(),
        1,
        "{what}: expected exactly one secret_read for pid {pid}, got {reads:#?}"
    );
    reads[0]
}

#[test]
#[ignore = "privileged: real probes (cargo xtask test runs it as root)"]
fn secret_reads_are_matched_by_inode_whatever_the_path() {
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

    let agent = Agent::start(&config_watching(&token));
    let t = token.to_str().unwrap();
    let abs = actor().open(&token).pid();
    let rel = actor().open_relative(&dir, "token").pid();
    let sym = actor().open(w.path().join("link")).pid();
    let hard = actor().open(w.path().join("hardlink")).pid();
    let dirfd = actor().openat(&dir, "token").pid();
    let proc_root = format!("/proc/self/root{t}");
    let via_proc = actor().open(&proc_root).pid();
    let o2 = actor().openat2(&token).pid();
    let unwatched = actor().open(&other).pid();
    // A private mount namespace where the secrets dir is bind-mounted somewhere else, the way
    // a container sees a volume.
    let (in_ns, _) = in_mount_namespace(&actor().open(mnt.join("token")), &[(&dir, &mnt)]);
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
        (in_ns, "bind mount", mnt.join("token").display().to_string()),
    ] {
        let (e, r) = one_read(&s, pid, what);
        assert_eq!(e.process.pid, pid, "{what}");
        assert_eq!(e.process.comm, "cw-actor", "{what}");
        assert_eq!(r.secret.inode, ino, "{what}");
        assert_eq!(r.secret.dev, dev, "{what}");
        assert_eq!(r.secret.path.as_deref(), Some(t), "{what}");
        assert_eq!(r.secret.opened_as, opened_as, "{what}");
        assert_eq!(r.secret.opened_as_status, None, "{what}");
        assert_eq!(r.secret.access, "read", "{what}");
        assert_eq!(e.workload.kind, WorkloadKind::Host, "{what}");
    }
    assert_eq!(one_read(&s, o2, "openat2").1.secret.syscall, "openat2");
    assert_eq!(one_read(&s, dirfd, "dirfd").1.secret.syscall, "openat");
    assert!(
        s.reads(unwatched).is_empty(),
        "an unwatched file produced an event"
    );
    // Nothing leaks the secret's content.
    assert!(!s.all_output().contains("fake-test-token-0001"));
}

#[test]
#[ignore = "privileged: real probes (cargo xtask test runs it as root)"]
fn connects_report_destination_protocol_and_result() {
    let l4 = TcpListener::bind("127.0.0.1:0").unwrap();
    let l6 = TcpListener::bind("[::1]:0").unwrap();
    let (p4, p6) = (
        l4.local_addr().unwrap().port(),
        l6.local_addr().unwrap().port(),
    );
    // A port that was just free: nothing listens, connect is refused.
    let free = |a: &str| TcpListener::bind(a).unwrap().local_addr().unwrap().port();
    let (closed, closed6) = (free("127.0.0.1:0"), free("[::1]:0"));
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
        .map(|(proto, addr, ..)| actor().connect(proto, addr).pid())
        .collect();
    let s = agent.stop();
    for ((proto, _, ip, port, result), pid) in cases.iter().zip(pids) {
        let c = s.connects(pid);
        assert_eq!(c.len(), 1, "{proto} {ip}:{port}: {c:#?}");
        let (e, c) = c[0];
        assert_eq!(c.dst.ip.map(|i| i.to_string()).as_deref(), Some(*ip));
        assert_eq!(c.via, "connect");
        assert_eq!(c.dst.port, *port);
        assert_eq!(c.dst.proto, proto.trim_end_matches("-nonblocking"));
        assert_eq!(c.result, *result, "{proto} {ip}:{port}");
        assert_eq!(e.process.comm, "cw-actor");
    }
    drop((l4, l6));
}

#[test]
#[ignore = "privileged: real probes (cargo xtask test runs it as root)"]
fn exec_lineage_cgroup_and_setuid() {
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
    let sh_child = Command::new("sh")
        .args(["-c", &format!("{} ; true", actor().ids().shell())])
        .spawn()
        .unwrap();
    let sh_pid = sh_child.id();
    sh_child.wait_with_output().unwrap();
    let in_cg = actor().join_cgroup(&cg).open(&token).pid();
    let (suid_pid, out) = actor().exec_as(1000, Actor::new(&suid).ids()).run();
    assert_eq!(
        out.trim(),
        "uid=1000 euid=0",
        "the test binary must really be set-uid"
    );
    let setuid_pid = actor().setuid(1000).pid();
    let s = agent.stop();

    // Lineage: the actor's exec names sh as its parent.
    let child_exec: Vec<_> = s
        .kind(EventKind::Exec)
        .into_iter()
        .filter(|e| e.process.ppid == sh_pid)
        .collect();
    assert_eq!(
        child_exec.len(),
        1,
        "one exec whose parent is sh ({sh_pid})"
    );
    let Body::Exec(x) = &child_exec[0].body else {
        unreachable!()
    };
    assert_eq!(x.filename, ACTOR);
    assert_eq!(child_exec[0].process.comm, "cw-actor");
    let sh_exec = s.of(EventKind::Exec, sh_pid);
    assert_eq!(sh_exec.len(), 1);
    assert_eq!(sh_exec[0].process.ppid, std::process::id());

    // cgroup: the id is the directory's inode, the path is relative to the cgroup2 mount.
    let (e, _) = one_read(&s, in_cg, "cgroup");
    assert_eq!(e.workload.cgroup_id, cg.id());
    assert_eq!(e.workload.cgroup.as_deref(), Some(cg.rel.as_str()));

    // Set-uid exec: the exec shows uid 1000 / euid 0 and a priv_change says so.
    let suid_exec = s
        .of(EventKind::Exec, suid_pid)
        .into_iter()
        .find(|e| matches!(&e.body, Body::Exec(x) if x.filename == suid.to_str().unwrap()))
        .expect("exec of the setuid binary");
    assert_eq!((suid_exec.process.uid, suid_exec.process.euid), (1000, 0));
    // (exec_as's own setgid/setuid calls before the exec are priv_changes too.)
    let p: Vec<_> = s
        .of(EventKind::PrivChange, suid_pid)
        .into_iter()
        .filter_map(|e| e.priv_change())
        .filter(|p| p.via == "exec")
        .collect();
    assert_eq!(p.len(), 1, "{p:#?}");
    assert_eq!((p[0].old_euid, p[0].new_euid), (1000, 0));

    // setresuid(2) from root to 1000.
    let p: Vec<_> = s
        .of(EventKind::PrivChange, setuid_pid)
        .into_iter()
        .filter_map(|e| e.priv_change())
        .collect();
    assert_eq!(p.len(), 1, "{p:#?}");
    assert_eq!(p[0].via, "setresuid");
    assert_eq!((p[0].old_uid, p[0].new_uid, p[0].new_euid), (0, 1000, 1000));
}

#[test]
#[ignore = "privileged: real probes (cargo xtask test runs it as root)"]
fn dns_answer_names_the_next_connect() {
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
    let pid = actor()
        .dns("127.0.9.53:53", "api.credwatch.test")
        .connect("tcp", format!("127.0.0.1:{port}"))
        .pid();
    let s = agent.stop();

    let dns: Vec<_> = s
        .kind(EventKind::Dns)
        .into_iter()
        .filter_map(|e| match &e.body {
            Body::Dns(d) if d.name == "api.credwatch.test" => Some(d),
            _ => None,
        })
        .collect();
    assert_eq!(dns.len(), 1, "{:#?}", s.kind(EventKind::Dns));
    assert_eq!(
        dns[0].addrs,
        ["127.0.0.1".parse::<std::net::IpAddr>().unwrap()]
    );
    assert_eq!(dns[0].server, Some("127.0.9.53".parse().unwrap()));
    let connects = s.connects(pid);
    // The unconnected query itself is seen by the sendmsg hook.
    let sends: Vec<_> = connects
        .iter()
        .filter(|(_, c)| c.result == "sent")
        .collect();
    assert_eq!(sends.len(), 1);
    assert_eq!((sends[0].1.dst.port, &*sends[0].1.dst.proto), (53, "udp"));
    let tcp: Vec<_> = connects
        .iter()
        .filter(|(_, c)| c.dst.proto == "tcp")
        .collect();
    assert_eq!(tcp.len(), 1);
    assert_eq!(tcp[0].1.dst.name.as_deref(), Some("api.credwatch.test"));
    drop(server);
}

#[test]
#[ignore = "privileged: real probes (cargo xtask test runs it as root)"]
fn hostile_names_are_escaped_not_trusted() {
    let w = workdir();
    let token = w.path().join("token");
    std::fs::write(&token, "fake-test-token-0004").unwrap();
    // A symlink whose name is not UTF-8 and contains an escape sequence.
    let name = b"bad\xff\x1b[2Jname";
    let link = w
        .path()
        .join(<std::ffi::OsStr as std::os::unix::ffi::OsStrExt>::from_bytes(name));
    std::os::unix::fs::symlink(&token, &link).unwrap();
    // A comm with control characters.
    let evil = w.path().join("ev\x1b[31mil");
    std::fs::copy(ACTOR, &evil).unwrap();

    let agent = Agent::start(&config_watching(&token));
    let pid = actor()
        .open_bytes(link.as_os_str().as_encoded_bytes())
        .pid();
    let pid2 = Actor::new(&evil).open(&token).pid();
    let s = agent.stop();
    let (_, r) = one_read(&s, pid, "non-UTF-8 symlink");
    assert!(
        r.secret.opened_as.ends_with("bad\u{fffd}\\u{1b}[2Jname"),
        "{}",
        r.secret.opened_as
    );
    let (e, _) = one_read(&s, pid2, "comm with escape");
    assert_eq!(e.process.comm, "ev\\u{1b}[31mil");
}
