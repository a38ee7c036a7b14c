//! Harness for the privileged integration tests: starts the real `credwatch` binary with a
//! test config, lets the test drive real processes (`cw-actor`), then stops the agent and
//! hands back the NDJSON events it wrote.
//!
//! Privileged tests call [`bpf_available`] first. Off a root machine they skip with a reason;
//! with `CREDWATCH_REQUIRE_BPF=1` (set by `cargo xtask test` under `CI=true`) they fail.

use std::{
    io::{BufRead, BufReader},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use serde_json::Value;

pub mod clickhouse;

pub fn credwatch_bin() -> PathBuf {
    std::env::var_os("CREDWATCH_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/debug/credwatch"))
}

/// True when this process can load BPF programs. Panics (fails the test) instead of
/// skipping when `CREDWATCH_REQUIRE_BPF=1`.
pub fn bpf_available(test: &str) -> bool {
    let required = std::env::var("CREDWATCH_REQUIRE_BPF").is_ok_and(|v| v == "1");
    let reason = if unsafe { libc::geteuid() } != 0 {
        Some("not running as root".to_owned())
    } else if !Path::new("/sys/kernel/btf/vmlinux").exists() {
        Some("kernel has no BTF (/sys/kernel/btf/vmlinux)".to_owned())
    } else if !credwatch_bin().exists() {
        Some(format!(
            "agent binary {} not built (run `cargo xtask test`)",
            credwatch_bin().display()
        ))
    } else {
        None
    };
    match reason {
        None => true,
        Some(r) if required => panic!("{test}: BPF tests are required here but cannot run: {r}"),
        Some(r) => {
            eprintln!("SKIPPED {test}: {r}");
            false
        }
    }
}

pub struct Agent {
    child: Child,
    pub dir: Option<tempfile::TempDir>,
    stderr: Arc<Mutex<Vec<String>>>,
    /// Stdout lines (alerts) with the time each arrived.
    stdout: Arc<Mutex<Vec<(Instant, String)>>>,
    stdout_reader: Option<std::thread::JoinHandle<()>>,
}

impl Agent {
    /// Starts `credwatch run` with `config` and waits until its probes are attached.
    pub fn start(config: &str) -> Agent {
        Self::start_with(config, &[])
    }

    pub fn start_with(config: &str, extra: &[&str]) -> Agent {
        Self::spawn(config, extra, None)
    }

    /// With a state dir that outlives this agent (a restart keeps what it learned).
    pub fn start_with_state(config: &str, state_dir: &Path) -> Agent {
        Self::spawn(config, &[], Some(state_dir))
    }

    fn spawn(config: &str, extra: &[&str], state_dir: Option<&Path>) -> Agent {
        let dir = tempfile::tempdir().expect("tempdir");
        let cfg = dir.path().join("credwatch.toml");
        std::fs::write(&cfg, config).unwrap();
        let state = state_dir
            .map(Path::to_path_buf)
            .unwrap_or_else(|| dir.path().join("state"));
        let mut child = Command::new(credwatch_bin())
            .arg("run")
            .arg("--config")
            .arg(&cfg)
            .arg("--state-dir")
            .arg(state)
            .arg("--events")
            .arg(dir.path().join("events.ndjson"))
            .arg("--stats-file")
            .arg(dir.path().join("stats.json"))
            .args(extra)
            .env(
                "CREDWATCH_LOG",
                std::env::var("CREDWATCH_LOG").unwrap_or_else(|_| "info".into()),
            )
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawning credwatch");
        let lines = Arc::new(Mutex::new(Vec::new()));
        let (tx, rx) = std::sync::mpsc::channel();
        let err = child.stderr.take().unwrap();
        let sink = lines.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(err).lines().map_while(Result::ok) {
                if line.contains("credwatch ready") {
                    let _ = tx.send(());
                }
                sink.lock().unwrap().push(line);
            }
        });
        let out = child.stdout.take().unwrap();
        let stdout = Arc::new(Mutex::new(Vec::new()));
        let out_sink = stdout.clone();
        let stdout_reader = std::thread::spawn(move || {
            for line in BufReader::new(out).lines().map_while(Result::ok) {
                out_sink.lock().unwrap().push((Instant::now(), line));
            }
        });
        let agent = Agent {
            child,
            dir: Some(dir),
            stderr: lines,
            stdout,
            stdout_reader: Some(stdout_reader),
        };
        if rx.recv_timeout(Duration::from_secs(60)).is_err() {
            panic!(
                "credwatch did not become ready; stderr:\n{}",
                agent.stderr_text()
            );
        }
        agent
    }

    pub fn stderr_text(&self) -> String {
        self.stderr.lock().unwrap().join("\n")
    }

    pub fn path(&self) -> &Path {
        self.dir.as_ref().expect("agent running").path()
    }

    pub fn events_path(&self) -> PathBuf {
        self.path().join("events.ndjson")
    }

    /// SIGTERM, wait for a clean exit, return every event written.
    pub fn stop(mut self) -> Stopped {
        // Let the drain timer pick up the last records before asking it to stop.
        std::thread::sleep(Duration::from_millis(300));
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(60);
        let status = loop {
            if let Some(s) = self.child.try_wait().unwrap() {
                break s;
            }
            if Instant::now() > deadline {
                let _ = self.child.kill();
                panic!(
                    "credwatch did not exit on SIGTERM; stderr:\n{}",
                    self.stderr_text()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        assert!(
            status.success(),
            "credwatch exited with {status}; stderr:\n{}",
            self.stderr_text()
        );
        let events = read_ndjson(&self.events_path());
        let stats = std::fs::read(self.path().join("stats.json"))
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
            .unwrap_or(Value::Null);
        // The agent has exited: its stdout is at EOF and the reader finishes.
        if let Some(r) = self.stdout_reader.take() {
            let _ = r.join();
        }
        let stdout: String = self
            .stdout
            .lock()
            .unwrap()
            .iter()
            .map(|(_, l)| format!("{l}\n"))
            .collect();
        Stopped {
            events,
            stats,
            stderr: self.stderr_text(),
            stdout,
            dir: self.dir.take().expect("agent running"),
        }
    }
}

impl Agent {
    /// Waits for a stdout line matching `pred`; returns when it arrived.
    pub fn wait_stdout(&self, timeout: Duration, pred: impl Fn(&str) -> bool) -> Option<Instant> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some((t, _)) = self.stdout.lock().unwrap().iter().find(|(_, l)| pred(l)) {
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
        self.stderr.lock().unwrap().iter().find_map(|l| {
            let i = l.find("metrics on ")?;
            Some(l[i + "metrics on ".len()..].trim().to_owned())
        })
    }

    /// SIGKILL: no flush, no goodbye (a crash or an OOM kill).
    pub fn kill9(mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// The last stats file the agent wrote (it writes one every second).
    pub fn stats(&self) -> Value {
        std::fs::read(self.path().join("stats.json"))
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
            .unwrap_or(Value::Null)
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub struct Stopped {
    pub events: Vec<Value>,
    pub stats: Value,
    pub stderr: String,
    pub stdout: String,
    pub dir: tempfile::TempDir,
}

impl Stopped {
    /// Events of `kind` from process `tgid`.
    pub fn of(&self, kind: &str, tgid: u32) -> Vec<&Value> {
        self.events
            .iter()
            .filter(|e| e["kind"] == kind && e["process"]["tgid"] == tgid)
            .collect()
    }

    pub fn kind(&self, kind: &str) -> Vec<&Value> {
        self.events.iter().filter(|e| e["kind"] == kind).collect()
    }
}

/// A file under tests/fixtures.
pub fn fixture(name: &str) -> String {
    format!("{}/fixtures/{name}", env!("CARGO_MANIFEST_DIR"))
}

/// Runs the agent binary (`replay`, `migrate`, …) to completion.
pub fn credwatch(args: &[&str]) -> std::process::Output {
    assert!(
        credwatch_bin().exists(),
        "agent binary missing: run `cargo xtask test`"
    );
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

pub fn read_ndjson(path: &Path) -> Vec<Value> {
    let Ok(text) = std::fs::read_to_string(path) else {
        return Vec::new();
    };
    text.lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("bad NDJSON line {l:?}: {e}")))
        .collect()
}

/// Runs the actor (built alongside these tests) and returns (pid, stdout).
pub fn actor(bin: &str, args: &[&str]) -> (u32, String) {
    let child = Command::new(bin)
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn actor");
    let pid = child.id();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "actor {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    (pid, String::from_utf8_lossy(&out.stdout).into_owned())
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
    use hmac::Mac;
    let mut mac = hmac::Hmac::<sha2::Sha256>::new_from_slice(key.as_bytes()).unwrap();
    mac.update(value);
    format!("hmac-sha256:{}", hex::encode(mac.finalize().into_bytes()))
}

/// A temporary directory on the root filesystem (setuid-capable, bind-mountable, reachable
/// by unprivileged uids), unlike a tmpfs /tmp.
pub fn workdir() -> tempfile::TempDir {
    use std::os::unix::fs::PermissionsExt;
    let base = Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/tmp");
    std::fs::create_dir_all(&base).unwrap();
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
