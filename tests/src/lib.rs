//! Harness for the integration tests: starts the real `credwatch` binary with a test config,
//! lets the test drive real processes ([`Actor`], the `cw-actor` binary), then stops the agent
//! and hands back what it wrote, parsed into the agent's own types ([`Stopped`]).
//!
//! One gate for everything that needs more than `cargo test` gives: such tests are
//! `#[ignore = "…"]` with a reason, so a plain `cargo test` lists them as ignored (never as
//! passed), and `cargo xtask test` — which builds the agent, installs the test ClickHouse and
//! the deploy tools, and runs as root in CI — runs them all with `--include-ignored`. Inside,
//! [`require_privileges`] fails the test when what it needs is missing: it never skips.

use std::{
    path::{Path, PathBuf},
    process::{Command, Stdio},
    sync::Arc,
    time::{Duration, Instant},
};

use credwatch::{
    alert::Alert,
    event::{Body, Connect, CredentialUse, Event, EventKind, SecretRead},
};
use serde_json::Value;

pub mod clickhouse;

pub fn credwatch_bin() -> PathBuf {
    std::env::var_os("CREDWATCH_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/debug/credwatch"))
}

/// Fails the test (never skips it) unless it can load BPF programs and drive the agent:
/// root, kernel BTF, the built agent binary.
pub fn require_privileges() {
    let problem = if unsafe { libc::geteuid() } != 0 {
        Some("not running as root".to_owned())
    } else if !Path::new("/sys/kernel/btf/vmlinux").exists() {
        Some("kernel has no BTF (/sys/kernel/btf/vmlinux)".to_owned())
    } else {
        require_agent_binary().err()
    };
    if let Some(p) = problem {
        panic!(
            "this privileged test cannot run here: {p} (run it with `cargo xtask test` as root)"
        );
    }
}

/// The agent binary, built by `cargo xtask test` (tests cannot build another package's bin).
pub fn require_agent_binary() -> Result<(), String> {
    let bin = credwatch_bin();
    if bin.exists() {
        Ok(())
    } else {
        Err(format!(
            "agent binary {} not built (`cargo xtask test` builds it)",
            bin.display()
        ))
    }
}

pub mod launch;

/// A running agent under test, with its work dir (config, events, stats, state).
pub struct Agent {
    process: launch::AgentProcess,
    pub dir: Option<tempfile::TempDir>,
    _running: AgentSlot,
}

/// Agents of parallel tests share the node, and all of them see everything. One thing two
/// cannot share: a socket goes into only one agent's metadata sockhash (its sk_msg program
/// owns it), so a test about metadata requests runs its agent alone.
static AGENTS: std::sync::RwLock<()> = std::sync::RwLock::new(());

enum AgentSlot {
    Shared(#[allow(dead_code)] std::sync::RwLockReadGuard<'static, ()>),
    Alone(#[allow(dead_code)] std::sync::RwLockWriteGuard<'static, ()>),
}

impl Agent {
    /// Starts `credwatch run` with `config` and waits until its probes are attached.
    pub fn start(config: &str) -> Agent {
        Self::start_with(config, &[])
    }

    pub fn start_with(config: &str, extra: &[&str]) -> Agent {
        Self::spawn(config, extra, None)
    }

    /// With no other test's agent running at the same time (see [`AGENTS`]).
    pub fn start_alone(config: &str) -> Agent {
        let slot = AgentSlot::Alone(AGENTS.write().unwrap_or_else(|e| e.into_inner()));
        Self::spawn_in(config, &[], None, slot)
    }

    /// With a state dir that outlives this agent (a restart keeps what it learned).
    pub fn start_with_state(config: &str, state_dir: &Path) -> Agent {
        Self::spawn(config, &[], Some(state_dir))
    }

    fn spawn(config: &str, extra: &[&str], state_dir: Option<&Path>) -> Agent {
        let slot = AgentSlot::Shared(AGENTS.read().unwrap_or_else(|e| e.into_inner()));
        Self::spawn_in(config, extra, state_dir, slot)
    }

    fn spawn_in(config: &str, extra: &[&str], state_dir: Option<&Path>, slot: AgentSlot) -> Agent {
        require_privileges();
        let dir = tempfile::tempdir().expect("tempdir");
        let bin = credwatch_bin();
        let roots = test_cgroup_roots();
        let process = launch::Launch {
            bin: &bin,
            config,
            work: dir.path(),
            state_dir,
            events: true,
            stats: true,
            extra_args: extra,
            log: None,
            env: &[("CREDWATCH_CGROUP_ROOTS", &roots)],
            ready_timeout: Duration::from_secs(60),
        }
        .start()
        .unwrap_or_else(|e| panic!("{e}"));
        Agent {
            process,
            dir: Some(dir),
            _running: slot,
        }
    }

    pub fn pid(&self) -> u32 {
        self.process.pid()
    }

    pub fn stderr_text(&self) -> String {
        self.process.stderr_text()
    }

    pub fn path(&self) -> &Path {
        self.dir.as_ref().expect("agent running").path()
    }

    pub fn events_path(&self) -> PathBuf {
        self.path().join("events.ndjson")
    }

    /// SIGTERM, wait for a clean exit, return everything it wrote.
    pub fn stop(mut self) -> Stopped {
        // Let the drain timer pick up the last records before asking it to stop.
        std::thread::sleep(Duration::from_millis(300));
        self.process
            .stop(Duration::from_secs(60))
            .unwrap_or_else(|e| panic!("{e}"));
        let events = read_events(&self.events_path());
        let stats = std::fs::read(self.path().join("stats.json"))
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
            .unwrap_or(Value::Null);
        let stdout = self.process.stdout_text();
        Stopped {
            events,
            alerts: parse_alerts(&stdout),
            stats,
            stderr: self.stderr_text(),
            stdout,
            dir: self.dir.take().expect("agent running"),
        }
    }

    /// Waits for a stdout line matching `pred`; returns when it arrived.
    pub fn wait_stdout(&self, timeout: Duration, pred: impl Fn(&str) -> bool) -> Option<Instant> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some((t, _)) = self
                .process
                .stdout
                .lock()
                .unwrap()
                .iter()
                .find(|(_, l)| pred(l))
            {
                return Some(*t);
            }
            if Instant::now() > deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// The URL of the agent's metrics endpoint, from its log.
    pub fn metrics_url(&self) -> Option<String> {
        self.process.stderr.lock().unwrap().iter().find_map(|l| {
            let i = l.find("metrics on ")?;
            Some(l[i + "metrics on ".len()..].trim().to_owned())
        })
    }

    /// SIGKILL: no flush, no goodbye (a crash or an OOM kill).
    pub fn kill9(mut self) {
        self.process.kill9();
    }

    /// The last stats file the agent wrote (it writes one every second).
    pub fn stats(&self) -> Value {
        std::fs::read(self.path().join("stats.json"))
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
            .unwrap_or(Value::Null)
    }
}

pub struct Stopped {
    pub events: Vec<Event>,
    /// The alert lines the agent printed on stdout.
    pub alerts: Vec<Alert>,
    /// The agent's stats file (the `--stats-file` JSON).
    pub stats: Value,
    pub stderr: String,
    pub stdout: String,
    pub dir: tempfile::TempDir,
}

impl Stopped {
    /// Events of `kind` from process `tgid`.
    pub fn of(&self, kind: EventKind, tgid: u32) -> Vec<&Event> {
        self.events
            .iter()
            .filter(|e| e.kind() == kind && e.process.tgid == tgid)
            .collect()
    }

    pub fn kind(&self, kind: EventKind) -> Vec<&Event> {
        self.events.iter().filter(|e| e.kind() == kind).collect()
    }

    /// The secret reads of process `tgid`.
    pub fn reads(&self, tgid: u32) -> Vec<(&Event, &SecretRead)> {
        self.events
            .iter()
            .filter(|e| e.process.tgid == tgid)
            .filter_map(|e| match &e.body {
                Body::SecretRead(r) => Some((e, r)),
                _ => None,
            })
            .collect()
    }

    /// The connects of process `tgid`.
    pub fn connects(&self, tgid: u32) -> Vec<(&Event, &Connect)> {
        self.events
            .iter()
            .filter(|e| e.process.tgid == tgid)
            .filter_map(|e| match &e.body {
                Body::Connect(c) => Some((e, c)),
                _ => None,
            })
            .collect()
    }

    /// Every credential use, or those of process `tgid`.
    pub fn uses(&self, tgid: Option<u32>) -> Vec<(&Event, &CredentialUse)> {
        self.events
            .iter()
            .filter(|e| tgid.is_none_or(|t| e.process.tgid == t))
            .filter_map(|e| match &e.body {
                Body::CredentialUse(u) => Some((e, &**u)),
                _ => None,
            })
            .collect()
    }

    /// Alerts of `kind`.
    pub fn alerts_of(&self, kind: credwatch::alert::AlertKind) -> Vec<&Alert> {
        self.alerts.iter().filter(|a| a.alert == kind).collect()
    }

    /// Everything the agent wrote, as text: to check a secret value appears nowhere.
    pub fn all_output(&self) -> String {
        let events =
            std::fs::read_to_string(self.dir.path().join("events.ndjson")).unwrap_or_default();
        let stats = std::fs::read_to_string(self.dir.path().join("stats.json")).unwrap_or_default();
        format!("{events}\n{stats}\n{}\n{}", self.stderr, self.stdout)
    }
}

/// Alert lines as the agent's own type; any other line on stdout fails the test.
pub fn parse_alerts(stdout: &str) -> Vec<Alert> {
    stdout
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not an alert line {l:?}: {e}")))
        .collect()
}

/// A file under tests/fixtures.
/// A TLS server with a fresh self-signed certificate for `host` (an IP or name): the
/// server config, and the certificate's PEM for the client to trust as its CA.
pub fn tls_server(host: &str) -> (Arc<rustls::ServerConfig>, String) {
    let ck = rcgen::generate_simple_self_signed(vec![host.to_owned()]).unwrap();
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let cfg = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(
            vec![ck.cert.der().clone()],
            rustls::pki_types::PrivateKeyDer::Pkcs8(ck.key_pair.serialize_der().into()),
        )
        .unwrap();
    (Arc::new(cfg), ck.cert.pem())
}

pub fn fixture(name: &str) -> String {
    format!("{}/fixtures/{name}", env!("CARGO_MANIFEST_DIR"))
}

/// Runs the agent binary (`replay`, `migrate`, …) to completion.
pub fn credwatch(args: &[&str]) -> std::process::Output {
    require_agent_binary().unwrap_or_else(|e| panic!("{e}"));
    Command::new(credwatch_bin()).args(args).output().unwrap()
}

/// Asserts the run succeeded; its stdout.
pub fn ok(out: &std::process::Output) -> String {
    assert!(
        out.status.success(),
        "credwatch failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A schedule window that excludes the present: one hour, six hours from now (UTC).
pub fn window_excluding_now() -> String {
    let hour = (std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
        / 3600
        + 6)
        % 24;
    format!("daily {hour:02}:00-{:02}:00", (hour + 1) % 24)
}

/// Events in an NDJSON file (the `--events` format), as the agent's own type: a line the
/// agent cannot read back fails the test.
pub fn read_events(path: &Path) -> Vec<Event> {
    let Ok(text) = std::fs::read_to_string(path) else {
        return Vec::new();
    };
    text.lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("bad event line {l:?}: {e}")))
        .collect()
}

/// One `cw-actor` run, built step by step: each step is one syscall sequence, so a test
/// knows which pid did what.
#[derive(Clone, Debug)]
pub struct Actor {
    bin: PathBuf,
    steps: Vec<Vec<String>>,
    env: Vec<(String, String)>,
}

fn s(p: impl AsRef<Path>) -> String {
    p.as_ref().to_string_lossy().into_owned()
}

impl Actor {
    /// `bin` is the actor binary (`env!("CARGO_BIN_EXE_cw-actor")` in a test, or a copy).
    pub fn new(bin: impl Into<PathBuf>) -> Actor {
        Actor {
            bin: bin.into(),
            steps: Vec::new(),
            env: Vec::new(),
        }
    }

    /// Starts with `name=value` in its environment (as a pod's `secretKeyRef` would).
    pub fn env(mut self, name: &str, value: &str) -> Actor {
        self.env.push((name.into(), value.into()));
        self
    }

    fn step(mut self, args: &[String]) -> Actor {
        self.steps.push(args.to_vec());
        self
    }

    /// Moves itself into `cg` first.
    pub fn join_cgroup(self, cg: &TestCgroup) -> Actor {
        self.step(&["join-cgroup".into(), s(&cg.path)])
    }
    /// open(2) by the given path, read a byte, close.
    pub fn open(self, path: impl AsRef<Path>) -> Actor {
        self.step(&["open".into(), s(path)])
    }
    /// chdir(dir), then open(name) relative to it.
    pub fn open_relative(self, dir: impl AsRef<Path>, name: &str) -> Actor {
        self.step(&["open-rel".into(), s(dir), name.into()])
    }
    /// openat(dirfd of `dir`, name).
    pub fn openat(self, dir: impl AsRef<Path>, name: &str) -> Actor {
        self.step(&["openat".into(), s(dir), name.into()])
    }
    pub fn openat2(self, path: impl AsRef<Path>) -> Actor {
        self.step(&["openat2".into(), s(path)])
    }
    /// A path of arbitrary bytes (not UTF-8, control characters).
    pub fn open_bytes(self, path: &[u8]) -> Actor {
        let hex = path.iter().map(|b| format!("{b:02x}")).collect();
        self.step(&["open-hex".into(), hex])
    }
    /// `n` opens of `path` in a loop.
    pub fn flood(self, path: impl AsRef<Path>, n: u64) -> Actor {
        self.step(&["flood".into(), s(path), n.to_string()])
    }
    /// `n` forks whose children exit at once (a fork flood).
    pub fn forks(self, n: u64) -> Actor {
        self.step(&["forks".into(), n.to_string()])
    }
    /// `proto`: `tcp`, `tcp-nonblocking` or `udp` (a connected UDP socket).
    pub fn connect(self, proto: &str, addr: impl std::fmt::Display) -> Actor {
        self.step(&["connect".into(), proto.into(), addr.to_string()])
    }
    /// An A query for `name` sent unconnected to `server`, waiting for the answer.
    pub fn dns(self, server: impl std::fmt::Display, name: &str) -> Actor {
        self.step(&["dns".into(), server.to_string(), name.into()])
    }
    /// IORING_OP_OPENAT of `path`; `how`: `inline`, `async` (an io-wq worker opens it),
    /// `sqpoll` (the kernel's SQ thread submits), `fixed` (into a fixed-file slot).
    pub fn uring_open(self, path: impl AsRef<Path>, how: &str) -> Actor {
        self.step(&["uring-open".into(), s(path), how.into()])
    }
    /// IORING_OP_CONNECT (TCP); prints `uring connect ok` or the error.
    pub fn uring_connect(self, addr: impl std::fmt::Display) -> Actor {
        self.step(&["uring-connect".into(), addr.to_string()])
    }
    /// sendto(MSG_FASTOPEN) on a fresh TCP socket: a connect without connect(2).
    pub fn fastopen(self, addr: impl std::fmt::Display) -> Actor {
        self.step(&["fastopen".into(), addr.to_string()])
    }
    /// `n` connects from one sockaddr buffer that another thread flips between `a` and `b`
    /// (same address, other port); prints the ports really reached, comma-separated.
    pub fn connect_race(
        self,
        a: impl std::fmt::Display,
        b: impl std::fmt::Display,
        n: usize,
    ) -> Actor {
        self.step(&[
            "connect-race".into(),
            a.to_string(),
            b.to_string(),
            n.to_string(),
        ])
    }
    /// The steps after this run in a child forked without exec; prints `child PID`.
    pub fn fork(self) -> Actor {
        self.step(&["fork".into()])
    }
    /// Two TCP connects to each of `ports` on `host`.
    pub fn connect_each(self, host: &str, ports: &[u16]) -> Actor {
        let mut a = vec!["connect-each".into(), host.into()];
        a.extend(ports.iter().map(|p| p.to_string()));
        self.step(&a)
    }
    pub fn unix_connect(self, path: impl AsRef<Path>) -> Actor {
        self.step(&["unix-connect".into(), s(path)])
    }
    /// Moves into the network namespace bound at `path` (`/run/netns/NAME`).
    pub fn join_netns(self, path: impl AsRef<Path>) -> Actor {
        self.step(&["join-netns".into(), s(path)])
    }
    /// Answers `n` HTTP requests on `addr` with `200 {}`; prints `listening` once bound.
    pub fn serve_http(self, addr: impl std::fmt::Display, n: usize) -> Actor {
        self.step(&["serve-http".into(), addr.to_string(), n.to_string()])
    }
    /// Becomes `prog args…` (same pid).
    pub fn exec(self, prog: impl AsRef<Path>, args: &[&str]) -> Actor {
        let mut a = vec!["exec".into(), s(prog)];
        a.extend(args.iter().map(|x| x.to_string()));
        self.step(&a)
    }
    /// Opens `/proc/<pid>/<file>` (`environ`, `mem`); `pid` may be `self`.
    pub fn read_proc(self, pid: impl std::fmt::Display, file: &str) -> Actor {
        self.step(&["read-proc".into(), pid.to_string(), file.into()])
    }
    /// process_vm_readv of 8 bytes of `pid`'s first readable mapping.
    pub fn vm_readv(self, pid: u32) -> Actor {
        self.step(&["vm-readv".into(), pid.to_string()])
    }
    /// PTRACE_SEIZE then detach.
    pub fn ptrace_seize(self, pid: u32) -> Actor {
        self.step(&["ptrace-attach".into(), pid.to_string()])
    }
    /// The main thread exits at once; another thread exits the process with `code` after
    /// `ms`.
    pub fn leader_exits(self, ms: u64, code: i32) -> Actor {
        self.step(&["leader-exits".into(), ms.to_string(), code.to_string()])
    }
    pub fn setuid(self, uid: u32) -> Actor {
        self.step(&["setuid".into(), uid.to_string()])
    }
    /// Prints `uid=… euid=…`.
    pub fn ids(self) -> Actor {
        self.step(&["ids".into()])
    }
    pub fn sleep_ms(self, ms: u64) -> Actor {
        self.step(&["sleep".into(), ms.to_string()])
    }
    /// Drops to `uid` (and gid) and execs `then` (another actor, possibly set-uid): the
    /// steps after this one are `then`'s.
    pub fn exec_as(self, uid: u32, then: Actor) -> Actor {
        let mut args = vec!["as-user".into(), uid.to_string(), s(&then.bin)];
        args.extend(then.args());
        self.step(&args)
    }

    /// The arguments (steps joined by `+`).
    pub fn args(&self) -> Vec<String> {
        let mut out = Vec::new();
        for (i, st) in self.steps.iter().enumerate() {
            if i > 0 {
                out.push("+".into());
            }
            out.extend(st.iter().cloned());
        }
        out
    }

    /// As one shell command line (for `sh -c`, `unshare … sh -c`).
    pub fn shell(&self) -> String {
        let quote = |a: &str| format!("'{}'", a.replace('\'', "'\\''"));
        std::iter::once(s(&self.bin))
            .chain(self.args())
            .map(|a| quote(&a))
            .collect::<Vec<_>>()
            .join(" ")
    }

    fn command(&self) -> Command {
        let mut c = Command::new(&self.bin);
        c.args(self.args())
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        c
    }

    /// Starts it without waiting (a process that has to be there while others act).
    pub fn spawn(&self) -> std::process::Child {
        self.command().spawn().expect("spawn actor")
    }

    /// Runs it to completion; (pid, stdout). A failing actor fails the test.
    pub fn run(&self) -> (u32, String) {
        let child = self.command().spawn().expect("spawn actor");
        let pid = child.id();
        let out = child.wait_with_output().unwrap();
        assert!(
            out.status.success(),
            "actor {:?} failed: {}",
            self.args(),
            String::from_utf8_lossy(&out.stderr)
        );
        (pid, String::from_utf8_lossy(&out.stdout).into_owned())
    }

    pub fn pid(&self) -> u32 {
        self.run().0
    }

    /// Runs it to completion whatever its exit status: (pid, stdout, status).
    pub fn run_unchecked(&self) -> (u32, String, std::process::ExitStatus) {
        let child = self.command().spawn().expect("spawn actor");
        let pid = child.id();
        let out = child.wait_with_output().unwrap();
        (
            pid,
            String::from_utf8_lossy(&out.stdout).into_owned(),
            out.status,
        )
    }
}

/// A cgroup v2 directory created for a test, removed on drop.
pub struct TestCgroup {
    pub path: PathBuf,
    /// Path relative to the cgroup2 mount, as the agent reports it.
    pub rel: String,
}

impl TestCgroup {
    /// Creates `<cgroup2>/<rel>` (intermediate directories too).
    pub fn create(rel: &str) -> TestCgroup {
        let root = cgroup2_root();
        let path = root.join(rel.trim_start_matches('/'));
        std::fs::create_dir_all(&path)
            .unwrap_or_else(|e| panic!("creating cgroup {}: {e}", path.display()));
        TestCgroup {
            path,
            rel: format!("/{}", rel.trim_start_matches('/')),
        }
    }

    pub fn id(&self) -> u64 {
        use std::os::unix::fs::MetadataExt;
        std::fs::metadata(&self.path).unwrap().ino()
    }
}

impl Drop for TestCgroup {
    fn drop(&mut self) {
        // Remove leaf-first; processes have exited by now.
        let root = cgroup2_root();
        let mut p = self.path.clone();
        while p != root && p.starts_with(&root) {
            if std::fs::remove_dir(&p).is_err() {
                break;
            }
            p.pop();
        }
    }
}

pub fn cgroup2_root() -> PathBuf {
    let info = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    for line in info.lines() {
        if let Some((left, right)) = line.split_once(" - ")
            && right.starts_with("cgroup2 ")
        {
            return PathBuf::from(left.split_whitespace().nth(4).unwrap());
        }
    }
    panic!("no cgroup2 mount")
}

/// The cgroup roots an agent under test parses layouts below: the mount's root, and the
/// per-test prefixes this test process builds its kubelet and systemd trees under
/// (`unique("cwtest")`, see [`pod_cgroup`]).
pub fn test_cgroup_roots() -> String {
    format!("/,/cwtest-{}-*", std::process::id())
}

/// A unique name for per-test cgroups, files and ports.
pub fn unique(tag: &str) -> String {
    static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    format!(
        "{tag}-{}-{}",
        std::process::id(),
        N.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
    )
}

/// Serves `body` as the answer to every HTTP request on 127.0.0.1 (the kubelet's `/pods`
/// in tests). Returns the port; the server lives as long as the process.
pub fn serve_http(body: Vec<u8>) -> u16 {
    serve_http_switch(body.clone(), body).0
}

/// Like [`serve_http`], but answers `before` until the returned flag is set, then `after`
/// (a pod list that changes when the test says so).
pub fn serve_http_switch(
    before: Vec<u8>,
    after: Vec<u8>,
) -> (u16, Arc<std::sync::atomic::AtomicBool>) {
    use std::io::{Read, Write};
    let switched = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let flag = switched.clone();
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    std::thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(mut conn) = conn else { continue };
            let mut req = Vec::new();
            let mut buf = [0u8; 4096];
            while !req.windows(4).any(|w| w == b"\r\n\r\n") {
                match conn.read(&mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => req.extend_from_slice(&buf[..n]),
                }
            }
            let body = if flag.load(std::sync::atomic::Ordering::SeqCst) {
                &after
            } else {
                &before
            };
            let head = format!(
                "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                body.len()
            );
            let _ = conn
                .write_all(head.as_bytes())
                .and_then(|_| conn.write_all(body));
        }
    });
    (port, switched)
}

/// An obviously fake, unsigned service-account token shaped like the kubelet's projected
/// ones (bound to a pod).
pub fn fake_sa_token(ns: &str, sa: &str, pod: &str, pod_uid: &str, serial: u32) -> String {
    use base64::Engine as _;
    let e = |v: &str| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(v);
    let claims = serde_json::json!({
        "aud": ["https://kubernetes.default.svc.cluster.local"],
        "exp": 1795000000 + serial,
        "iat": 1794996400 + serial,
        "iss": "https://kubernetes.default.svc.cluster.local",
        "jti": format!("fake-{serial}"),
        "kubernetes.io": {
            "namespace": ns,
            "node": {"name": "node-1", "uid": "00000000-0000-4000-8000-00000000000a"},
            "pod": {"name": pod, "uid": pod_uid},
            "serviceaccount": {"name": sa, "uid": "00000000-0000-4000-8000-00000000000b"}
        },
        "nbf": 1794996400 + serial,
        "sub": format!("system:serviceaccount:{ns}:{sa}")
    });
    format!(
        "{}.{}.{}",
        e(r#"{"alg":"RS256","kid":"fake-test-key"}"#),
        e(&claims.to_string()),
        e("FAKE-SIGNATURE-NOT-REAL")
    )
}

/// A kubelet projected volume laid out exactly as the kubelet's atomic writer does:
/// `..<timestamp>/token`, `..data → ..<timestamp>`, `token → ..data/token`.
pub struct PodVolume {
    pub dir: PathBuf,
    generation: u32,
}

impl PodVolume {
    pub fn create(kubelet_root: &Path, pod_uid: &str, volume: &str, token: &str) -> PodVolume {
        let dir = kubelet_root
            .join("pods")
            .join(pod_uid)
            .join("volumes/kubernetes.io~projected")
            .join(volume);
        std::fs::create_dir_all(&dir).unwrap();
        let mut v = PodVolume { dir, generation: 0 };
        v.write_generation(token);
        std::os::unix::fs::symlink("..data/token", v.dir.join("token")).unwrap();
        std::os::unix::fs::symlink("..data/ca.crt", v.dir.join("ca.crt")).unwrap();
        std::os::unix::fs::symlink("..data/namespace", v.dir.join("namespace")).unwrap();
        v
    }

    fn ts_dir(&self) -> PathBuf {
        self.dir.join(format!(
            "..2026_11_22_10_00_{:02}.{}",
            self.generation,
            1000 + self.generation
        ))
    }

    fn write_generation(&mut self, token: &str) {
        self.generation += 1;
        let ts = self.ts_dir();
        std::fs::create_dir(&ts).unwrap();
        std::fs::write(ts.join("token"), token).unwrap();
        std::fs::write(
            ts.join("ca.crt"),
            "-----BEGIN CERTIFICATE-----\nFAKE\n-----END CERTIFICATE-----\n",
        )
        .unwrap();
        std::fs::write(ts.join("namespace"), "default").unwrap();
        let tmp = self.dir.join("..data_tmp");
        std::os::unix::fs::symlink(ts.file_name().unwrap(), &tmp).unwrap();
        std::fs::rename(&tmp, self.dir.join("..data")).unwrap();
    }

    /// Token rotation: a new timestamped directory, `..data` swapped atomically, the old
    /// directory removed. Returns the old directory's path (already deleted).
    pub fn rotate(&mut self, token: &str) -> PathBuf {
        let old = self.ts_dir();
        self.write_generation(token);
        std::fs::remove_dir_all(&old).unwrap();
        old
    }

    /// Path of the current real token file.
    pub fn current_token(&self) -> PathBuf {
        self.ts_dir().join("token")
    }
}

/// `hmac-sha256:<hex>` of `value` under `key`: what the agent must report.
pub fn expected_fingerprint(key: &str, value: &[u8]) -> String {
    format!(
        "hmac-sha256:{}",
        credwatch::credential::hmac_sha256_hex(key.as_bytes(), value)
    )
}

/// Runs `actor` in a private mount namespace where each (source, target) is bind-mounted
/// first: what a container's process sees of a volume. (pid, stdout); unshare and sh exec
/// in place, so the pid is the actor's.
pub fn in_mount_namespace(actor: &Actor, binds: &[(&Path, &Path)]) -> (u32, String) {
    let mut script = String::new();
    for (src, dst) in binds {
        std::fs::create_dir_all(dst).unwrap();
        script.push_str(&format!(
            "mount --bind '{}' '{}' && ",
            src.display(),
            dst.display()
        ));
    }
    script.push_str("exec ");
    script.push_str(&actor.shell());
    let child = Command::new("unshare")
        .args(["-m", "--propagation", "private", "sh", "-c", &script])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let pid = child.id();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "actor in a mount namespace failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    (pid, String::from_utf8_lossy(&out.stdout).into_owned())
}

/// A temporary directory on the root filesystem (setuid-capable, bind-mountable, reachable
/// by unprivileged uids), unlike a tmpfs /tmp.
pub fn workdir() -> tempfile::TempDir {
    use std::os::unix::fs::PermissionsExt;
    let base = Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/tmp");
    std::fs::create_dir_all(&base).unwrap();
    // Canonical (no `..`): the agent names secrets by their canonical paths.
    let base = base.canonicalize().unwrap();
    let d = tempfile::tempdir_in(base).unwrap();
    std::fs::set_permissions(d.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    d
}

/// Pods in tests/fixtures/kubelet-pods.json: payments/api-7f9c (A) and billing/worker-2 (B).
pub const UID_A: &str = "0a1b2c3d-4e5f-4789-abcd-ef0123456789";
pub const CID_A: &str = "a1a1a1a1a1a1a1a1a1a1a1a1a1a1a1a1a1a1a1a1a1a1a1a1a1a1a1a1a1a1a1a1";
pub const UID_B: &str = "9f8e7d6c-5b4a-4321-8fed-cba987654321";
pub const CID_B: &str = "b2b2b2b2b2b2b2b2b2b2b2b2b2b2b2b2b2b2b2b2b2b2b2b2b2b2b2b2b2b2b2b2";

/// Serves the recorded kubelet PodList; returns its port.
pub fn kubelet_fixture_port() -> u16 {
    serve_http(
        std::fs::read(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/fixtures/kubelet-pods.json"
        ))
        .unwrap(),
    )
}

/// The kubelet's systemd-driver cgroup of a BestEffort pod's container, under a per-test
/// prefix: `<prefix>/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod<uid>.slice/cri-containerd-<id>.scope`.
pub fn pod_cgroup(pod_uid: &str, container_id: &str) -> TestCgroup {
    TestCgroup::create(&format!(
        "{}/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{}.slice/cri-containerd-{container_id}.scope",
        unique("cwtest"),
        pod_uid.replace('-', "_"),
    ))
}
