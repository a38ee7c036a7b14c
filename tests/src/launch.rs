//! Starting and stopping a real `credwatch run`: shared by the integration tests (through
//! the harness) and `cargo xtask bench`, which includes this file as a module. Depends on
//! std and libc only, so xtask can build before the agent (and its probes) can.

use std::{
    io::{BufRead, BufReader},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::{Arc, Mutex, mpsc},
    time::{Duration, Instant},
};

/// What to start.
pub struct Launch<'a> {
    pub bin: &'a Path,
    /// Written to `<work>/credwatch.toml`.
    pub config: &'a str,
    /// Config, events, stats and (unless `state_dir`) state go here.
    pub work: &'a Path,
    pub state_dir: Option<&'a Path>,
    /// `--events <work>/events.ndjson`.
    pub events: bool,
    /// `--stats-file <work>/stats.json`.
    pub stats: bool,
    pub extra_args: &'a [&'a str],
    /// `CREDWATCH_LOG`; `None` keeps the caller's or `info`.
    pub log: Option<&'a str>,
    /// More environment for the agent.
    pub env: &'a [(&'a str, &'a str)],
    pub ready_timeout: Duration,
}

/// A running agent: its stderr and stdout lines are collected by threads of their own (the
/// agent never blocks on a full pipe).
pub struct AgentProcess {
    child: Child,
    pub stderr: Arc<Mutex<Vec<String>>>,
    /// Stdout lines (alerts) with the time each arrived.
    pub stdout: Arc<Mutex<Vec<(Instant, String)>>>,
    stdout_reader: Option<std::thread::JoinHandle<()>>,
}

impl Launch<'_> {
    pub fn events_path(&self) -> PathBuf {
        self.work.join("events.ndjson")
    }

    pub fn stats_path(&self) -> PathBuf {
        self.work.join("stats.json")
    }

    /// Starts `credwatch run` and waits for "credwatch ready" (the probes are attached).
    pub fn start(&self) -> Result<AgentProcess, String> {
        let cfg = self.work.join("credwatch.toml");
        std::fs::write(&cfg, self.config).map_err(|e| format!("writing {cfg:?}: {e}"))?;
        let state = self
            .state_dir
            .map(Path::to_path_buf)
            .unwrap_or_else(|| self.work.join("state"));
        let mut cmd = Command::new(self.bin);
        cmd.arg("run")
            .arg("--config")
            .arg(&cfg)
            .arg("--state-dir")
            .arg(state);
        if self.events {
            cmd.arg("--events").arg(self.events_path());
        }
        if self.stats {
            cmd.arg("--stats-file").arg(self.stats_path());
        }
        let log = self
            .log
            .map(str::to_owned)
            .or_else(|| std::env::var("CREDWATCH_LOG").ok())
            .unwrap_or_else(|| "info".into());
        let mut child = cmd
            .args(self.extra_args)
            .env("CREDWATCH_LOG", log)
            .envs(self.env.iter().copied())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| format!("spawning {}: {e}", self.bin.display()))?;
        let stderr = Arc::new(Mutex::new(Vec::new()));
        let (ready_tx, ready_rx) = mpsc::channel();
        let err = child.stderr.take().expect("piped");
        let sink = stderr.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(err).lines().map_while(Result::ok) {
                if line.contains("credwatch ready") {
                    let _ = ready_tx.send(());
                }
                sink.lock().unwrap().push(line);
            }
        });
        let out = child.stdout.take().expect("piped");
        let stdout = Arc::new(Mutex::new(Vec::new()));
        let out_sink = stdout.clone();
        let stdout_reader = std::thread::spawn(move || {
            for line in BufReader::new(out).lines().map_while(Result::ok) {
                out_sink.lock().unwrap().push((Instant::now(), line));
            }
        });
        let mut agent = AgentProcess {
            child,
            stderr,
            stdout,
            stdout_reader: Some(stdout_reader),
        };
        if ready_rx.recv_timeout(self.ready_timeout).is_err() {
            agent.kill9();
            return Err(format!(
                "credwatch did not become ready; stderr:\n{}",
                agent.stderr_text()
            ));
        }
        Ok(agent)
    }
}

impl AgentProcess {
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn stderr_text(&self) -> String {
        self.stderr.lock().unwrap().join("\n")
    }

    pub fn stdout_text(&self) -> String {
        self.stdout
            .lock()
            .unwrap()
            .iter()
            .map(|(_, l)| format!("{l}\n"))
            .collect()
    }

    /// SIGTERM and a clean exit within `timeout` (then the output readers are done).
    pub fn stop(&mut self, timeout: Duration) -> Result<(), String> {
        // SAFETY: signalling our own child.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let deadline = Instant::now() + timeout;
        let status = loop {
            if let Some(s) = self.child.try_wait().map_err(|e| e.to_string())? {
                break s;
            }
            if Instant::now() > deadline {
                self.kill9();
                return Err(format!(
                    "credwatch did not exit on SIGTERM; stderr:\n{}",
                    self.stderr_text()
                ));
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        if let Some(r) = self.stdout_reader.take() {
            let _ = r.join();
        }
        if !status.success() {
            return Err(format!(
                "credwatch exited with {status}; stderr:\n{}",
                self.stderr_text()
            ));
        }
        Ok(())
    }

    /// SIGKILL: no flush, no goodbye (a crash or an OOM kill).
    pub fn kill9(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for AgentProcess {
    fn drop(&mut self) {
        self.kill9();
    }
}
