//! Credential holders with real clients and real probes: each way a credential is really
//! used becomes exactly one `credential_use` with its attribution (ssh reads its key after
//! connecting, git's helper reads for its parent, a script's `$(cat token)`, forked
//! workers, the environment, an SDK that reads once and connects later), a replay of the
//! recorded events attributes the same uses, and a normal node day — the kubelet reading
//! and rotating a pod's token — raises nothing.

use std::{
    collections::BTreeSet,
    io::{BufRead, BufReader, Read, Write},
    net::{TcpListener, TcpStream},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use credwatch::{
    alert::AlertKind,
    credential::CredentialType,
    event::{Attribution, Body, CredentialUse, Event, EventKind},
};
use credwatch_tests::{
    Actor, Agent, CID_A, CID_B, PodVolume, Stopped, TestCgroup, UID_A, UID_B, credwatch,
    expected_fingerprint, fake_sa_token, kubelet_fixture_port, ok, pod_cgroup, unique, workdir,
};

const ACTOR: &str = env!("CARGO_BIN_EXE_cw-actor");
const KEY: &str = "test-fleet-key-not-secret";

fn actor() -> Actor {
    Actor::new(ACTOR)
}

fn config(paths: &[&Path], extra: &str) -> String {
    let list: Vec<String> = paths
        .iter()
        .map(|p| format!("\"{}\"", p.display()))
        .collect();
    format!(
        "[secrets]\ncatalog = false\npaths = [{}]\n[fingerprint]\nkey = \"{KEY}\"\n{extra}\n",
        list.join(", ")
    )
}

fn write(dir: &Path, name: &str, content: &str) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, content).unwrap();
    p
}

/// An HTTP server answering `200 ok` to everything, forever; its port.
fn http_ok() -> u16 {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = l.local_addr().unwrap().port();
    std::thread::spawn(move || {
        for c in l.incoming() {
            let Ok(mut c) = c else { continue };
            std::thread::spawn(move || {
                let _ = read_head(&mut c);
                let _ = c.write_all(
                    b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok",
                );
            });
        }
    });
    port
}

fn read_head(c: &mut TcpStream) -> String {
    let mut req = Vec::new();
    let mut b = [0u8; 4096];
    while !req.windows(4).any(|w| w == b"\r\n\r\n") {
        match c.read(&mut b) {
            Ok(0) | Err(_) => break,
            Ok(n) => req.extend_from_slice(&b[..n]),
        }
    }
    String::from_utf8_lossy(&req).into_owned()
}

/// (use event, use) of every credential use.
fn uses(s: &Stopped) -> Vec<(&Event, &CredentialUse)> {
    s.uses(None)
}

/// The one use of the credential with this fingerprint; fails with the uses seen.
fn only_use<'a>(s: &'a Stopped, fp: &str) -> (&'a Event, &'a CredentialUse) {
    let u: Vec<_> = uses(s)
        .into_iter()
        .filter(|(_, u)| u.credential.fingerprint == fp)
        .collect();
    assert_eq!(u.len(), 1, "expected one use of {fp}: {u:#?}");
    u[0]
}

fn port_of(u: &CredentialUse) -> u16 {
    u.dst.port
}

fn wait_port(port: u16) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(Instant::now() < deadline, "nothing listens on {port}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn run(cmd: &mut Command) -> u32 {
    let child = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    let pid = child.id();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "{cmd:?}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    pid
}

struct Sshd(Child);

impl Drop for Sshd {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
#[ignore = "privileged: real probes and a real sshd (cargo xtask test runs it as root)"]
fn ssh_reads_its_key_after_connecting() {
    let w = workdir();
    let d = w.path();
    let keygen = |f: &Path| {
        run(Command::new("ssh-keygen")
            .args(["-q", "-t", "ed25519", "-N", "", "-C", "fake-test-key", "-f"])
            .arg(f));
    };
    let (host_key, key) = (d.join("host_key"), d.join("id_ed25519"));
    keygen(&host_key);
    keygen(&key);
    std::fs::copy(d.join("id_ed25519.pub"), d.join("authorized_keys")).unwrap();
    let port = free_port();
    let cfg = write(
        d,
        "sshd_config",
        &format!(
            "Port {port}\nListenAddress 127.0.0.1\nHostKey {}\nAuthorizedKeysFile {}\n\
             PidFile none\nStrictModes no\nUsePAM no\nPermitRootLogin yes\n\
             PasswordAuthentication no\nKbdInteractiveAuthentication no\nLogLevel ERROR\n",
            host_key.display(),
            d.join("authorized_keys").display()
        ),
    );
    std::fs::create_dir_all("/run/sshd").unwrap();
    let _sshd = Sshd(
        Command::new("/usr/sbin/sshd")
            .args(["-D", "-e", "-f"])
            .arg(&cfg)
            // Its log says so when the readiness probe below hangs up.
            .stderr(Stdio::null())
            .spawn()
            .expect("sshd (openssh-server; cargo xtask test installs it)"),
    );
    wait_port(port);

    let agent = Agent::start(&config(&[&key], ""));
    let pid = run(Command::new("ssh")
        .args(["-F", "/dev/null", "-i"])
        .arg(&key)
        .args(["-p", &port.to_string()])
        .args([
            "-o",
            "StrictHostKeyChecking=no",
            "-o",
            "UserKnownHostsFile=/dev/null",
            "-o",
            "BatchMode=yes",
            "-o",
            "IdentitiesOnly=yes",
            "root@127.0.0.1",
            "true",
        ]));
    let s = agent.stop();
    let fp = expected_fingerprint(
        KEY,
        std::fs::read_to_string(&key).unwrap().trim().as_bytes(),
    );
    let (e, u) = only_use(&s, &fp);
    assert_eq!(e.process.tgid, pid, "the ssh client");
    assert_eq!(u.attribution, Attribution::ConnectedThenRead);
    assert_eq!(u.credential.kind, CredentialType::SshPrivateKey);
    assert_eq!(port_of(u), port);
}

/// A git repository served over dumb HTTP that asks for Basic auth (user `bob`, password
/// `fake-git-password`) before anything.
fn git_server(repo: &Path) -> u16 {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = l.local_addr().unwrap().port();
    let root = repo.to_path_buf();
    let expected = format!(
        "Basic {}",
        base64::Engine::encode(
            &base64::engine::general_purpose::STANDARD,
            "bob:fake-git-password"
        )
    );
    std::thread::spawn(move || {
        for c in l.incoming() {
            let Ok(mut c) = c else { continue };
            let (root, expected) = (root.clone(), expected.clone());
            std::thread::spawn(move || {
                loop {
                    let head = read_head(&mut c);
                    if head.is_empty() {
                        return;
                    }
                    let path = head.split_whitespace().nth(1).unwrap_or("/").to_owned();
                    let authorized = head
                        .lines()
                        .any(|l| l.trim().strip_prefix("Authorization: ") == Some(&expected));
                    let reply = if !authorized {
                        b"HTTP/1.1 401 Unauthorized\r\nWWW-Authenticate: Basic realm=\"git\"\r\nContent-Length: 0\r\n\r\n".to_vec()
                    } else {
                        let rel = path
                            .trim_start_matches("/repo.git/")
                            .split('?')
                            .next()
                            .unwrap_or("");
                        match std::fs::read(root.join(rel)) {
                            Ok(body) if !rel.contains("..") => {
                                let mut r = format!(
                                    "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: {}\r\n\r\n",
                                    body.len()
                                )
                                .into_bytes();
                                r.extend(body);
                                r
                            }
                            _ => b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n".to_vec(),
                        }
                    };
                    if c.write_all(&reply).is_err() {
                        return;
                    }
                }
            });
        }
    });
    port
}

#[test]
#[ignore = "privileged: real probes and real git (cargo xtask test runs it as root)"]
fn gits_credential_helper_reads_for_the_process_that_connects() {
    let w = workdir();
    let d = w.path();
    let src = d.join("src");
    let git = |dir: &Path, args: &[&str]| {
        run(Command::new("git")
            .current_dir(dir)
            .env("HOME", d)
            .args(["-c", "user.name=t", "-c", "user.email=t@example.invalid"])
            .args(args));
    };
    std::fs::create_dir_all(&src).unwrap();
    git(&src, &["init", "-q"]);
    write(&src, "README", "hello\n");
    git(&src, &["add", "README"]);
    git(&src, &["commit", "-qm", "first"]);
    git(d, &["clone", "-q", "--bare", "src", "repo.git"]);
    git(&d.join("repo.git"), &["update-server-info"]);
    let port = git_server(&d.join("repo.git"));
    let stored = format!("http://bob:fake-git-password@127.0.0.1:{port}\n");
    let creds = write(d, ".git-credentials", &stored);

    let agent = Agent::start(&config(&[&creds], ""));
    git(
        d,
        &[
            "-c",
            "credential.helper=store",
            "clone",
            "-q",
            &format!("http://127.0.0.1:{port}/repo.git"),
            "clone",
        ],
    );
    let s = agent.stop();
    assert!(d.join("clone/README").exists(), "the clone worked");
    // (As it was: the helper rewrites the file once the password worked.)
    let fp = expected_fingerprint(KEY, stored.as_bytes());
    let (e, u) = only_use(&s, &fp);
    assert!(
        e.process.exe.ends_with("git-remote-http"),
        "the use is the process that connects: {e:#?}"
    );
    assert_eq!(u.attribution, Attribution::Helper);
    assert_eq!(u.credential.kind, CredentialType::GitCredentials);
    assert_eq!(port_of(u), port);
    let reader = u.via_pid.expect("the helper's pid");
    let read = s.reads(reader);
    assert!(!read.is_empty(), "the helper {reader} read the file");
}

#[test]
#[ignore = "privileged: real probes and real curl (cargo xtask test runs it as root)"]
fn curl_and_a_script_read_then_connect() {
    let w = workdir();
    let d = w.path();
    let port = http_ok();
    let header = write(
        d,
        "auth-header",
        "Authorization: Bearer fake-curl-token-0001\n",
    );
    let token = write(d, "token", "fake-script-token-0001\n");
    let agent = Agent::start(&config(&[&header, &token], ""));
    let url = format!("http://127.0.0.1:{port}/");
    let curl = run(Command::new("curl")
        .args(["-sf", "-o", "/dev/null", "-H"])
        .arg(format!("@{}", header.display()))
        .arg(&url));
    // The value read by one child, used by a sibling; then the same with the connecting
    // command last, which bash runs in its own process.
    let script = format!(
        "T=$(cat {}); curl -sf -o /dev/null -H \"Authorization: Bearer $T\" {url}; true",
        token.display()
    );
    run(Command::new("bash").args(["-c", &script]));
    let last = format!(
        "T=$(cat {}); curl -sf -o /dev/null -H \"Authorization: Bearer $T\" {url}x",
        token.display()
    );
    run(Command::new("bash").args(["-c", &last]));
    let s = agent.stop();

    let fp = expected_fingerprint(KEY, std::fs::read(&header).unwrap().trim_ascii());
    let (e, u) = only_use(&s, &fp);
    assert_eq!(e.process.tgid, curl);
    assert_eq!(u.attribution, Attribution::ReadThenConnect);

    // One use per script of its token, both attributed to the script (the same value on
    // curl's command line is the file's credential, not a second one).
    let fp = expected_fingerprint(KEY, b"fake-script-token-0001");
    let script_uses: Vec<_> = uses(&s)
        .into_iter()
        .filter(|(_, u)| u.credential.fingerprint == fp)
        .collect();
    assert_eq!(script_uses.len(), 2, "{script_uses:#?}");
    for (e, u) in script_uses {
        assert_eq!(u.attribution, Attribution::Script);
        assert!(e.process.exe.ends_with("/curl"), "{e:#?}");
        assert_eq!(
            u.secret.as_ref().and_then(|s| s.path.as_deref()),
            token.to_str()
        );
        let reader = u.via_pid.expect("the sibling that read it");
        assert!(!s.reads(reader).is_empty());
    }
}

#[test]
#[ignore = "privileged: real probes and real clients (cargo xtask test runs it as root)"]
fn kubectl_and_the_aws_cli_use_their_files() {
    let w = workdir();
    let d = w.path();
    let port = http_ok();
    let kubeconfig = write(
        d,
        "kubeconfig",
        &format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- cluster:\n    server: http://127.0.0.1:{port}\n  name: test\n\
             contexts:\n- context:\n    cluster: test\n    user: test\n  name: test\ncurrent-context: test\n\
             users:\n- name: test\n  user:\n    token: fake-kube-token-0001\n"
        ),
    );
    let aws_creds = write(
        d,
        "aws-credentials",
        "[default]\naws_access_key_id = AKIAFAKEFAKEFAKE0001\naws_secret_access_key = fakeAwsSecretKeyForTests2222222222222222\n",
    );
    let agent = Agent::start(&config(&[&kubeconfig, &aws_creds], ""));
    run(Command::new("kubectl")
        .arg("--kubeconfig")
        .arg(&kubeconfig)
        .args(["get", "--raw", "/healthz"]));
    // The aws CLI answers any non-AWS body with an error; the use is what matters.
    let _ = Command::new("aws")
        .args(["sts", "get-caller-identity", "--endpoint-url"])
        .arg(format!("http://127.0.0.1:{port}"))
        .env("AWS_SHARED_CREDENTIALS_FILE", &aws_creds)
        .env("AWS_CONFIG_FILE", "/dev/null")
        .env("AWS_DEFAULT_REGION", "us-east-1")
        .env("AWS_EC2_METADATA_DISABLED", "true")
        .env_remove("AWS_ACCESS_KEY_ID")
        .env_remove("AWS_SECRET_ACCESS_KEY")
        .output()
        .expect("aws CLI");
    let s = agent.stop();
    let (_, u) = only_use(&s, &expected_fingerprint(KEY, b"fake-kube-token-0001"));
    assert_eq!(u.credential.kind, CredentialType::Kubeconfig);
    assert_eq!(u.attribution, Attribution::ReadThenConnect);
    assert_eq!(port_of(u), port);
    let (e, u) = only_use(
        &s,
        &expected_fingerprint(KEY, b"fakeAwsSecretKeyForTests2222222222222222"),
    );
    assert_eq!(u.credential.kind, CredentialType::AwsAccessKey);
    assert_eq!(u.attribution, Attribution::ReadThenConnect);
    assert_eq!(port_of(u), port);
    assert!(e.process.exe.ends_with("/aws"), "the CLI: {e:#?}");
}

#[test]
#[ignore = "privileged: real probes (cargo xtask test runs it as root)"]
fn held_inherited_environment_and_fifty_destinations() {
    let w = workdir();
    let d = w.path();
    let port = http_ok();
    let token = write(d, "token", "fake-holder-token-0001");
    let listeners: Vec<TcpListener> = (0..50)
        .map(|_| TcpListener::bind("127.0.0.1:0").unwrap())
        .collect();
    let ports: Vec<u16> = listeners
        .iter()
        .map(|l| l.local_addr().unwrap().port())
        .collect();
    let agent = Agent::start(&config(&[&token], "[holders]\nwindow = \"1s\"\n"));
    let addr = format!("127.0.0.1:{port}");
    // Reads once, connects later (an SDK).
    let held = actor()
        .open(&token)
        .sleep_ms(1500)
        .connect("tcp", &addr)
        .pid();
    // Reads, then a worker forked without exec connects.
    let (_, out) = actor().open(&token).fork().connect("tcp", &addr).run();
    let worker: u32 = out
        .lines()
        .find_map(|l| l.strip_prefix("child "))
        .and_then(|p| p.trim().parse().ok())
        .expect("the worker's pid");
    // Given in its environment.
    let secret = "fakeAwsSecretKeyForTests3333333333333333";
    let env = actor()
        .env("AWS_SECRET_ACCESS_KEY", secret)
        .connect("tcp", &addr)
        .pid();
    // One reader, fifty destinations, each connected twice.
    let many = actor().open(&token).connect_each("127.0.0.1", &ports).pid();
    let s = agent.stop();

    let of = |pid: u32| -> Vec<&CredentialUse> {
        uses(&s)
            .into_iter()
            .filter(|(e, _)| e.process.tgid == pid)
            .map(|(_, u)| u)
            .collect()
    };
    let u = of(held);
    assert_eq!(u.len(), 1, "{u:#?}");
    assert_eq!(u[0].attribution, Attribution::Held);
    assert!(u[0].read_ts < s.of(EventKind::Connect, held)[0].ts);
    let u = of(worker);
    assert_eq!(u.len(), 1, "{u:#?}");
    assert_eq!(u[0].attribution, Attribution::Inherited);
    let u = of(env);
    assert_eq!(u.len(), 1, "{u:#?}");
    assert_eq!(u[0].attribution, Attribution::Exec);
    assert_eq!(
        u[0].credential.fingerprint,
        expected_fingerprint(KEY, secret.as_bytes())
    );
    assert_eq!(u[0].credential.kind, CredentialType::AwsAccessKey);
    let u = of(many);
    let reached: BTreeSet<u16> = u.iter().map(|u| u.dst.port).collect();
    assert_eq!(u.len(), 50, "one use per destination, not per connect");
    assert_eq!(reached, ports.iter().copied().collect());
    assert!(!s.all_output().contains(secret));

    // The recorded events, replayed, attribute the same uses.
    let input = s.dir.path().join("replay-input.ndjson");
    std::fs::copy(s.dir.path().join("events.ndjson"), &input).unwrap();
    let cfg = write(
        d,
        "replay.toml",
        &config(&[&token], "[holders]\nwindow = \"1s\"\n"),
    );
    let out_events = d.join("replayed.ndjson");
    ok(&credwatch(&[
        "replay",
        "--config",
        cfg.to_str().unwrap(),
        "--events",
        out_events.to_str().unwrap(),
        input.to_str().unwrap(),
    ]));
    let key = |e: &Event| match &e.body {
        Body::CredentialUse(u) => Some((
            e.process.tgid,
            u.attribution,
            u.credential.fingerprint.clone(),
            u.dst.to_string(),
        )),
        _ => None,
    };
    let live: BTreeSet<_> = s.events.iter().filter_map(key).collect();
    let replayed: BTreeSet<_> = credwatch_tests::read_events(&out_events)
        .iter()
        .filter_map(key)
        .collect();
    assert_eq!(replayed, live);
    drop(listeners);
}

// ---------------------------------------------------------------------------------------
// A normal node day, and the same reads by a process that is no node agent.

fn kubernetes(kubelet_root: &Path, port: u16, extra: &str) -> String {
    format!(
        "[secrets]\ncatalog = true\nrescan_interval = \"1h\"\n[kubernetes]\nkubelet_url = \"http://127.0.0.1:{port}\"\n\
         kubelet_root = \"{}\"\ntrust_domain = \"cluster.local\"\n[fingerprint]\nkey = \"{KEY}\"\n{extra}\n",
        kubelet_root.display()
    )
}

#[test]
#[ignore = "privileged: real probes (cargo xtask test runs it as root)"]
fn the_kubelet_maintaining_and_rotating_a_token_raises_nothing() {
    let w = workdir();
    let kubelet_root = w.path().join("kubelet");
    let port = kubelet_fixture_port();
    let t1 = fake_sa_token("payments", "payments-api", "api-7f9c", UID_A, 1);
    let t2 = fake_sa_token("payments", "payments-api", "api-7f9c", UID_A, 2);
    let mut vol = PodVolume::create(&kubelet_root, UID_A, "kube-api-access-a", &t1);
    let api = http_ok();
    let pod = pod_cgroup(UID_A, CID_A);
    let kubelet_cg = TestCgroup::create(&format!(
        "{}/system.slice/kubelet.service",
        unique("cwtest")
    ));
    // The stand-in is this test's actor binary, declared as the node's kubelet.
    let standin = w.path().join("bin-kubelet");
    std::fs::copy(ACTOR, &standin).unwrap();
    let extra = format!(
        "[detect]\nlearning_period = \"3s\"\n[[node_agent]]\nworkload = \"unit:kubelet.service\"\nexe = [\"{}\"]\n",
        standin.display()
    );
    let agent = Agent::start(&kubernetes(&kubelet_root, port, &extra));
    let token = vol.dir.join("token");
    let dst = format!("127.0.0.1:{api}");
    let use_token = || {
        actor()
            .join_cgroup(&pod)
            .open(&token)
            .connect("tcp", &dst)
            .pid()
    };
    // Learning.
    use_token();
    // The kubelet keeps the volume: reads what is there (its atomic writer compares
    // before it writes), and later rotates the token.
    Actor::new(&standin)
        .join_cgroup(&kubelet_cg)
        .open(&token)
        .pid();
    std::thread::sleep(Duration::from_secs(4));
    // Learned; the kubelet rotates, then reads the new token back.
    vol.rotate(&t2);
    Actor::new(&standin)
        .join_cgroup(&kubelet_cg)
        .open(&token)
        .pid();
    // The pod uses the rotated token where it always did.
    let after = use_token();
    let s = agent.stop();
    assert!(
        s.alerts.is_empty(),
        "a normal day raised alerts: {:#?}",
        s.alerts
    );
    let maintenance = s
        .kind(EventKind::SecretRead)
        .into_iter()
        .filter(|e| e.is_maintenance())
        .count();
    assert_eq!(maintenance, 2, "both kubelet reads are maintenance");
    let u = s.uses(Some(after));
    assert_eq!(u.len(), 1, "{u:#?}");
    assert_eq!(
        u[0].1.credential.fingerprint,
        expected_fingerprint(KEY, t2.as_bytes())
    );
}

#[test]
#[ignore = "privileged: real probes (cargo xtask test runs it as root)"]
fn the_same_reads_by_something_else_still_alert() {
    let w = workdir();
    let kubelet_root = w.path().join("kubelet");
    let port = kubelet_fixture_port();
    let t1 = fake_sa_token("payments", "payments-api", "api-7f9c", UID_A, 1);
    let vol = PodVolume::create(&kubelet_root, UID_A, "kube-api-access-a", &t1);
    let standin = w.path().join("bin-kubelet");
    std::fs::copy(ACTOR, &standin).unwrap();
    let other_pod = pod_cgroup(UID_B, CID_B);
    let not_kubelet =
        TestCgroup::create(&format!("{}/system.slice/cron.service", unique("cwtest")));
    let extra = format!(
        "[[node_agent]]\nworkload = \"unit:kubelet.service\"\nexe = [\"{}\"]\n",
        standin.display()
    );
    let agent = Agent::start(&kubernetes(&kubelet_root, port, &extra));
    let token = vol.dir.join("token");
    // The kubelet's binary, but in another unit; and in a pod.
    let unit_reader = Actor::new(&standin)
        .join_cgroup(&not_kubelet)
        .open(&token)
        .pid();
    let pod_reader = Actor::new(&standin)
        .join_cgroup(&other_pod)
        .open(&token)
        .pid();
    let s = agent.stop();
    let mismatches = s.alerts_of(AlertKind::OwnerMismatch);
    assert_eq!(mismatches.len(), 2, "{:#?}", s.alerts);
    let readers: BTreeSet<String> = mismatches
        .iter()
        .map(|a| a.workload.id.to_string())
        .collect();
    assert!(readers.contains("unit:cron.service"), "{readers:?}");
    assert!(readers.contains("pod:billing/worker-2"), "{readers:?}");
    for a in &mismatches {
        assert!(a.summary.contains("pod:payments/api-7f9c"), "{}", a.summary);
    }
    assert!(
        s.reads(unit_reader)
            .iter()
            .all(|(e, _)| !e.is_maintenance())
    );
    assert!(s.reads(pod_reader).iter().all(|(e, _)| !e.is_maintenance()));
}

// ---------------------------------------------------------------------------------------
// Credential theft from process memory, and metadata credential fetches.

#[test]
#[ignore = "privileged: real probes (cargo xtask test runs it as root)"]
fn reading_a_holders_environment_is_credential_theft() {
    let port = kubelet_fixture_port();
    let w = workdir();
    let victim_cg = pod_cgroup(UID_A, CID_A);
    let thief_cg = pod_cgroup(UID_B, CID_B);
    let allowed = w.path().join("node-exporter");
    std::fs::copy("/usr/bin/cat", &allowed).unwrap();
    let extra = format!(
        "[[allow]]\nalert = \"credential_theft\"\nworkload = \"host:0:{}\"\nreason = \"reads /proc for a living\"\n",
        allowed.display()
    );
    let agent = Agent::start(&kubernetes(&w.path().join("kubelet"), port, &extra));
    let mut holder = actor()
        .join_cgroup(&victim_cg)
        .env(
            "AWS_SECRET_ACCESS_KEY",
            "fakeAwsSecretKeyForTests4444444444444444",
        )
        .sleep_ms(4000)
        .spawn();
    let mut bystander = actor().join_cgroup(&victim_cg).sleep_ms(4000).spawn();
    std::thread::sleep(Duration::from_millis(500));
    let (h, b) = (holder.id(), bystander.id());
    let thief = actor().join_cgroup(&thief_cg).read_proc(h, "environ").pid();
    // Near misses: a process holding nothing; a declared tool.
    let curious = actor().join_cgroup(&thief_cg).read_proc(b, "environ").pid();
    run(Command::new(&allowed).arg(format!("/proc/{h}/environ")));
    let s = agent.stop();
    let _ = (
        holder.kill(),
        bystander.kill(),
        holder.wait(),
        bystander.wait(),
    );
    let thefts = s.alerts_of(AlertKind::CredentialTheft);
    assert_eq!(thefts.len(), 1, "{:#?}", s.alerts);
    let a = thefts[0];
    assert_eq!(
        a.workload.id.to_string(),
        "pod:billing/worker-2",
        "the reader"
    );
    assert!(a.summary.contains(&format!("pid {h}")), "{}", a.summary);
    assert!(
        a.summary.contains("pod:payments/api-7f9c"),
        "the target: {}",
        a.summary
    );
    assert!(a.summary.contains("aws_access_key"), "{}", a.summary);
    assert_eq!(a.evidence[0].pid, thief);
    assert!(
        s.alerts
            .iter()
            .all(|a| a.evidence.iter().all(|e| e.pid != curious))
    );
    assert_eq!(s.stats["pipeline"]["alerts_allowlisted"], 1);
}

/// A network namespace of the test's own where 169.254.169.254 is local, with a metadata
/// "service" (a test process) answering in it.
struct MetadataService {
    ns: String,
    server: Child,
}

impl MetadataService {
    fn start(requests: usize) -> MetadataService {
        let ns = unique("cwmd");
        for args in [
            vec!["netns", "add", &ns],
            vec!["-n", &ns, "link", "set", "lo", "up"],
            vec!["-n", &ns, "addr", "add", "169.254.169.254/32", "dev", "lo"],
        ] {
            run(Command::new("ip").args(&args));
        }
        let mut server = actor()
            .join_netns(format!("/run/netns/{ns}"))
            .serve_http("169.254.169.254:80", requests)
            .spawn();
        let mut line = String::new();
        BufReader::new(server.stdout.as_mut().unwrap())
            .read_line(&mut line)
            .unwrap();
        assert_eq!(line.trim(), "listening");
        MetadataService { ns, server }
    }

    fn curl(&self, cg: Option<&TestCgroup>, path: &str) -> u32 {
        let mut a = actor();
        if let Some(cg) = cg {
            a = a.join_cgroup(cg);
        }
        a.join_netns(format!("/run/netns/{}", self.ns))
            .exec(
                "curl",
                &[
                    "-sf",
                    "-o",
                    "/dev/null",
                    &format!("http://169.254.169.254{path}"),
                ],
            )
            .pid()
    }
}

impl Drop for MetadataService {
    fn drop(&mut self) {
        let _ = self.server.kill();
        let _ = self.server.wait();
        let _ = Command::new("ip").args(["netns", "del", &self.ns]).status();
    }
}

#[test]
#[ignore = "privileged: real probes (cargo xtask test runs it as root)"]
fn a_pod_fetching_the_nodes_role_credentials_alerts() {
    let port = kubelet_fixture_port();
    let w = workdir();
    let md = MetadataService::start(4);
    let pod_a = pod_cgroup(UID_A, CID_A);
    let pod_b = pod_cgroup(UID_B, CID_B);
    let extra = "[[allow]]\nalert = \"metadata_credential_fetch\"\nworkload = \"pod:billing/*\"\nreason = \"the node's own agent\"\n";
    let agent = Agent::start_alone(&kubernetes(&w.path().join("kubelet"), port, extra));
    let creds = "/latest/meta-data/iam/security-credentials/node-role";
    let thief = md.curl(Some(&pod_a), creds);
    // Near misses: a pod asking for a non-credential path; the host itself; an allowed pod.
    md.curl(Some(&pod_a), "/latest/meta-data/instance-id");
    md.curl(None, creds);
    md.curl(Some(&pod_b), creds);
    let s = agent.stop();
    let fetches = s.alerts_of(AlertKind::MetadataCredentialFetch);
    assert_eq!(fetches.len(), 1, "{:#?}", s.alerts);
    // The node's role is every workload's to share: fetching it is the finding, not reuse.
    assert!(
        s.alerts_of(AlertKind::TokenReuse).is_empty(),
        "{:#?}",
        s.alerts
    );
    let a = fetches[0];
    assert_eq!(a.workload.id.to_string(), "pod:payments/api-7f9c");
    assert!(a.summary.contains("node-role"), "{}", a.summary);
    assert_eq!(a.evidence[0].pid, thief);
    let c = a.credential.as_ref().expect("the credential fetched");
    assert_eq!(c.kind, CredentialType::CloudMetadata);
    assert_eq!(c.labels["role"], "node-role");
    // The fetcher now holds it.
    let held: Vec<_> = s
        .of(EventKind::MetadataFetch, thief)
        .into_iter()
        .filter_map(|e| match &e.body {
            Body::MetadataFetch(m) => m.credential.clone(),
            _ => None,
        })
        .collect();
    assert_eq!(held.len(), 1);
    assert_eq!(s.stats["pipeline"]["alerts_allowlisted"], 1);
}
