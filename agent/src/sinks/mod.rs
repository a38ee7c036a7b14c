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
use tokio::sync::{mpsc, watch};
use tracing::warn;

use crate::{
    alert::Alert,
    config::{AlertFormat, Alerts},
    metrics::SinkCounts,
};

/// How long `finish` gives remote sinks to deliver what is queued.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);

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

pub fn render(a: &Alert, f: AlertFormat) -> Vec<u8> {
    match f {
        AlertFormat::Json => serde_json::to_vec(a),
        AlertFormat::Ocsf => serde_json::to_vec(&ocsf::detection_finding(a)),
    }
    .unwrap_or_default()
}

struct Remote {
    name: String,
    tx: Option<mpsc::Sender<Arc<Alert>>>,
    counters: Arc<Counters>,
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
    pub fn start(cfg: &Alerts, node: &str) -> Result<Self> {
        let mut files = Vec::new();
        for f in &cfg.file {
            files.push((file::RotatingFile::open(f)?, Arc::new(Counters::default())));
        }
        let (shutdown, shutdown_rx) = watch::channel(None);
        let mut remote = Vec::new();
        let mut tasks: Vec<std::pin::Pin<Box<dyn Future<Output = ()> + Send>>> = Vec::new();
        for w in &cfg.webhook {
            let (tx, rx) = mpsc::channel(w.queue);
            let counters = Arc::new(Counters::default());
            let sender = webhook::Webhook::new(w)?;
            tasks.push(Box::pin(sender.run(
                rx,
                counters.clone(),
                shutdown_rx.clone(),
            )));
            remote.push(Remote {
                name: format!("webhook:{}", webhook::redact(&w.url)),
                tx: Some(tx),
                counters,
            });
        }
        for s in &cfg.syslog {
            let (tx, rx) = mpsc::channel(s.queue);
            let counters = Arc::new(Counters::default());
            let sender = syslog::Syslog::new(s, node)?;
            tasks.push(Box::pin(sender.run(
                rx,
                counters.clone(),
                shutdown_rx.clone(),
            )));
            remote.push(Remote {
                name: format!("syslog:{}", s.address),
                tx: Some(tx),
                counters,
            });
        }
        let (thread, done) = if tasks.is_empty() {
            (None, None)
        } else {
            let (done_tx, done_rx) = std::sync::mpsc::channel();
            let t = std::thread::Builder::new()
                .name("alert-sinks".into())
                .spawn(move || {
                    match tokio::runtime::Builder::new_current_thread()
                        .enable_all()
                        .build()
                    {
                        Ok(rt) => {
                            rt.block_on(async {
                                let handles: Vec<_> = tasks.into_iter().map(tokio::spawn).collect();
                                for h in handles {
                                    let _ = h.await;
                                }
                            });
                        }
                        Err(e) => tracing::error!("alert sink runtime: {e}"),
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
