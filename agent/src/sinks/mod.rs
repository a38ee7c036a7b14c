//! Alert sinks besides `--alerts`: rotating files (written in line with the pipeline — local
//! disk), webhooks and syslog (each on its own task with its own bounded queue, on a thread
//! of their own, so a slow or dead receiver never holds up the pipeline or another sink;
//! what a sink cannot take is counted, not waited for).

pub mod file;
pub mod ocsf;
pub mod syslog;
pub mod webhook;

use std::{
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering::Relaxed},
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

use anyhow::{Context, Result};
use serde::Deserialize;
use tokio::sync::{mpsc, watch};
use tracing::warn;

use crate::{
    alert::Alert,
    config::{Checker, Validate},
    metrics::SinkCounts,
};

/// How long `finish` gives remote sinks to deliver what is queued.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);

/// Alert output format.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AlertFormat {
    /// credwatch's own alert JSON.
    #[default]
    Json,
    /// OCSF 1.3 Detection Finding (class 2004).
    Ocsf,
}

/// `[alerts]`: where alerts go besides `--alerts`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Format of the `--alerts` output (stdout by default).
    #[serde(default)]
    pub format: AlertFormat,
    #[serde(default)]
    pub file: Vec<file::Config>,
    #[serde(default)]
    pub webhook: Vec<webhook::Config>,
    #[serde(default)]
    pub syslog: Vec<syslog::Config>,
}

impl Validate for Config {
    fn validate(&self, c: &mut Checker) {
        c.each("file", &self.file);
        c.each("webhook", &self.webhook);
        c.each("syslog", &self.syslog);
    }
}

fn default_timeout() -> Duration {
    Duration::from_secs(5)
}
fn default_queue() -> usize {
    10_000
}

#[derive(Debug, Default)]
pub struct Counters {
    pub sent: AtomicU64,
    pub failed: AtomicU64,
    pub dropped: AtomicU64,
    pub queued: AtomicU64,
}

/// Remote tasks stop retrying once this holds a deadline that has passed.
pub type Shutdown = watch::Receiver<Option<Instant>>;

pub fn past_deadline(s: &Shutdown) -> bool {
    s.borrow().is_some_and(|d| Instant::now() >= d)
}

/// Waits `d`, or less when shutdown begins (then there is no time for backoff).
pub async fn backoff(d: Duration, s: &mut Shutdown) {
    if s.borrow().is_some() {
        return;
    }
    tokio::select! {
        _ = tokio::time::sleep(d) => {}
        _ = s.changed() => {}
    }
}

/// Exponential backoff between retries: 250 ms doubling to 30 s.
#[derive(Debug, Clone, Copy)]
pub struct Backoff {
    next: Duration,
}

impl Default for Backoff {
    fn default() -> Self {
        Backoff {
            next: Duration::from_millis(250),
        }
    }
}

impl Backoff {
    /// The wait before the next attempt; each call doubles the one after.
    pub fn step(&mut self) -> Duration {
        let d = self.next;
        self.next = (self.next * 2).min(Duration::from_secs(30));
        d
    }

    pub fn reset(&mut self) {
        *self = Backoff::default();
    }
}

/// The bytes an alert is sent as, in `f`.
pub fn render(a: &Alert, f: AlertFormat) -> Vec<u8> {
    match f {
        AlertFormat::Json => serde_json::to_vec(a),
        AlertFormat::Ocsf => serde_json::to_vec(&ocsf::detection_finding(a)),
    }
    .unwrap_or_default()
}

/// How one delivery attempt went.
pub enum Attempt {
    Sent,
    /// Worth trying again (network error, 5xx, 429).
    Retry(String),
    /// Will not get better (a 4xx): dropped at once.
    Give(String),
}

/// A remote receiver (webhook, syslog). [`run_remote`] does the queueing, retries,
/// backoff, counting and shutdown for all of them.
pub trait Deliver {
    /// For logs and metric labels: never a secret (see `webhook::redact`).
    fn name(&self) -> String;
    fn max_attempts(&self) -> u32;
    fn encode(&self, a: &Alert) -> Vec<u8>;
    fn deliver(&mut self, body: &[u8]) -> impl Future<Output = Attempt> + Send;
}

/// Delivers queued alerts one by one until the queue closes; each gets `max_attempts`
/// with backoff, and what cannot be delivered (or is still queued at the shutdown
/// deadline) is counted as dropped.
pub async fn run_remote<D: Deliver>(
    mut d: D,
    mut rx: mpsc::Receiver<Arc<Alert>>,
    c: Arc<Counters>,
    mut shutdown: Shutdown,
) {
    let name = d.name();
    let mut failing = false;
    while let Some(a) = rx.recv().await {
        c.queued.fetch_sub(1, Relaxed);
        let body = d.encode(&a);
        let mut wait = Backoff::default();
        let mut attempt = 0;
        loop {
            if past_deadline(&shutdown) {
                c.dropped.fetch_add(1, Relaxed);
                break;
            }
            attempt += 1;
            match d.deliver(&body).await {
                Attempt::Sent => {
                    c.sent.fetch_add(1, Relaxed);
                    failing = false;
                    break;
                }
                Attempt::Retry(why) | Attempt::Give(why) if attempt >= d.max_attempts() => {
                    c.failed.fetch_add(1, Relaxed);
                    c.dropped.fetch_add(1, Relaxed);
                    warn!(sink = %name, "alert dropped after {attempt} attempts: {why}");
                    break;
                }
                Attempt::Give(why) => {
                    c.failed.fetch_add(1, Relaxed);
                    c.dropped.fetch_add(1, Relaxed);
                    warn!(sink = %name, "alert rejected: {why}");
                    break;
                }
                Attempt::Retry(why) => {
                    c.failed.fetch_add(1, Relaxed);
                    if !failing {
                        warn!(sink = %name, "delivery failing, retrying: {why}");
                        failing = true;
                    }
                    backoff(wait.step(), &mut shutdown).await;
                }
            }
        }
    }
}

struct Remote {
    name: String,
    tx: Option<mpsc::Sender<Arc<Alert>>>,
    counters: Arc<Counters>,
}

type Task = std::pin::Pin<Box<dyn Future<Output = ()> + Send>>;

impl Remote {
    /// A bounded queue of `queue` alerts in front of `sender`, whose task joins `tasks`.
    fn start<D: Deliver + Send + 'static>(
        sender: D,
        queue: usize,
        shutdown: &Shutdown,
        tasks: &mut Vec<Task>,
    ) -> Remote {
        let (tx, rx) = mpsc::channel(queue);
        let counters = Arc::new(Counters::default());
        let name = sender.name();
        tasks.push(Box::pin(run_remote(
            sender,
            rx,
            counters.clone(),
            shutdown.clone(),
        )));
        Remote {
            name,
            tx: Some(tx),
            counters,
        }
    }
}

pub struct AlertSinks {
    files: Vec<(file::RotatingFile, Arc<Counters>)>,
    remote: Vec<Remote>,
    shutdown: watch::Sender<Option<Instant>>,
    thread: Option<JoinHandle<()>>,
    done: Option<std::sync::mpsc::Receiver<()>>,
}

impl AlertSinks {
    /// Opens the files and starts the remote senders. Configuration problems (unreadable
    /// secret file, bad address) are start-up errors.
    pub fn start(cfg: &Config, node: &str) -> Result<Self> {
        let mut files = Vec::new();
        for f in &cfg.file {
            files.push((file::RotatingFile::open(f)?, Arc::new(Counters::default())));
        }
        let (shutdown, shutdown_rx) = watch::channel(None);
        let mut remote = Vec::new();
        let mut tasks: Vec<Task> = Vec::new();
        for w in &cfg.webhook {
            let sender = webhook::Webhook::new(w)?;
            remote.push(Remote::start(sender, w.queue, &shutdown_rx, &mut tasks));
        }
        for s in &cfg.syslog {
            let sender = syslog::Syslog::new(s, node)?;
            remote.push(Remote::start(sender, s.queue, &shutdown_rx, &mut tasks));
        }
        let (thread, done) = if tasks.is_empty() {
            (None, None)
        } else {
            let (done_tx, done_rx) = std::sync::mpsc::channel();
            let t = crate::spawn_runtime_thread("alert-sinks", async move {
                let handles: Vec<_> = tasks.into_iter().map(tokio::spawn).collect();
                for h in handles {
                    let _ = h.await;
                }
                let _ = done_tx.send(());
            })
            .context("starting the alert sinks")?;
            (Some(t), Some(done_rx))
        };
        Ok(AlertSinks {
            files,
            remote,
            shutdown,
            thread,
            done,
        })
    }

    /// No sink configured.
    pub fn is_empty(&self) -> bool {
        self.files.is_empty() && self.remote.is_empty()
    }

    pub fn send(&mut self, a: &Alert) {
        for (f, c) in &mut self.files {
            match f.write(a) {
                Ok(()) => c.sent.fetch_add(1, Relaxed),
                Err(_) => c.failed.fetch_add(1, Relaxed),
            };
        }
        let shared = Arc::new(a.clone());
        for r in &self.remote {
            let Some(tx) = &r.tx else { continue };
            match tx.try_send(shared.clone()) {
                Ok(()) => {
                    r.counters.queued.fetch_add(1, Relaxed);
                }
                Err(_) => {
                    r.counters.dropped.fetch_add(1, Relaxed);
                }
            }
        }
    }

    pub fn flush(&mut self) {
        for (f, c) in &mut self.files {
            if f.flush().is_err() {
                c.failed.fetch_add(1, Relaxed);
            }
        }
    }

    /// Closes the queues and gives remote sinks a grace period to deliver them.
    pub fn finish(&mut self) {
        self.flush();
        for r in &mut self.remote {
            r.tx = None;
        }
        let _ = self.shutdown.send(Some(Instant::now() + SHUTDOWN_GRACE));
        if let Some(done) = self.done.take() {
            if done
                .recv_timeout(SHUTDOWN_GRACE + Duration::from_secs(2))
                .is_err()
            {
                warn!("alert sinks still busy after the grace period; leaving them");
            } else if let Some(t) = self.thread.take() {
                let _ = t.join();
            }
        }
    }

    pub fn counts(&self) -> Vec<SinkCounts> {
        let files = self
            .files
            .iter()
            .map(|(f, c)| (format!("file:{}", f.path()), c));
        let remote = self.remote.iter().map(|r| (r.name.clone(), &r.counters));
        files
            .chain(remote)
            .map(|(name, c)| SinkCounts {
                name,
                sent: c.sent.load(Relaxed),
                failed: c.failed.load(Relaxed),
                dropped: c.dropped.load(Relaxed),
                queued: c.queued.load(Relaxed),
            })
            .collect()
    }
}

impl Drop for AlertSinks {
    fn drop(&mut self) {
        if self.done.is_some() {
            self.finish();
        }
    }
}
