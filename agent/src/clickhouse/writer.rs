//! The ClickHouse writer: the pipeline hands it rows through one bounded queue; a thread of
//! its own batches them by rows, bytes and age and inserts each batch with a dedup token.
//! A batch ClickHouse does not acknowledge goes to the spool, and while the spool holds
//! anything new batches queue up behind it there (so delivery stays in order); the spool is
//! drained oldest first with backoff. The pipeline never waits on ClickHouse: in the live
//! agent a full queue counts dropped rows (`replay` waits instead, it has no kernel to keep up
//! with).

use std::{
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering::Relaxed},
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

use anyhow::{Context, Result};
use clickhouse::{Client, RowOwned, RowWrite};
use serde::{Serialize, de::DeserializeOwned};
use tokio::sync::mpsc;
use tracing::{info, warn};

use super::{
    client,
    rows::{AlertRow, ApproxSize, EventRow},
    spool::{Spool, TableKind},
};
use crate::{alert::Alert, clickhouse::Config as Cfg, event::Event};

/// Rows cross the queue in chunks of this many, not one by one.
const CHUNK: usize = 1024;

enum Chunk {
    Events(Vec<EventRow>),
    Alerts(Vec<AlertRow>),
}

/// Counters the agent reports (stats file, metrics).
#[derive(Debug, Default)]
pub struct WriterStats {
    pub rows_written: AtomicU64,
    pub batches_written: AtomicU64,
    pub insert_failures: AtomicU64,
    pub rows_spooled: AtomicU64,
    pub spool_batches: AtomicU64,
    pub spool_bytes: AtomicU64,
    /// Lost to a full queue (live agent only) or a failing spool write.
    pub rows_dropped: AtomicU64,
    /// Lost to the spool's size bound.
    pub spool_dropped: AtomicU64,
    /// Unix seconds of the oldest spooled batch, 0 when the spool is empty.
    pub spool_oldest: AtomicU64,
}

#[derive(Debug, Clone, Copy, Default, serde::Serialize)]
pub struct WriterCounts {
    pub rows_written: u64,
    pub batches_written: u64,
    pub insert_failures: u64,
    pub rows_spooled: u64,
    pub spool_batches: u64,
    pub spool_bytes: u64,
    pub rows_dropped: u64,
    /// Age of the oldest batch waiting in the spool.
    pub lag_seconds: u64,
}

impl WriterStats {
    pub fn snapshot(&self) -> WriterCounts {
        WriterCounts {
            rows_written: self.rows_written.load(Relaxed),
            batches_written: self.batches_written.load(Relaxed),
            insert_failures: self.insert_failures.load(Relaxed),
            rows_spooled: self.rows_spooled.load(Relaxed),
            spool_batches: self.spool_batches.load(Relaxed),
            spool_bytes: self.spool_bytes.load(Relaxed),
            rows_dropped: self.rows_dropped.load(Relaxed) + self.spool_dropped.load(Relaxed),
            lag_seconds: match self.spool_oldest.load(Relaxed) {
                0 => 0,
                t => unix_now().saturating_sub(t),
            },
        }
    }
}

/// The pipeline's handle.
pub struct ClickHouseSink {
    tx: Option<mpsc::Sender<Chunk>>,
    events: Vec<EventRow>,
    alerts: Vec<AlertRow>,
    /// Wait for queue space instead of dropping (replay).
    wait: bool,
    alert_ids: crate::enrich::IdGen,
    pub stats: Arc<WriterStats>,
    thread: Option<JoinHandle<()>>,
}

impl ClickHouseSink {
    /// Starts the writer thread. `wait`: block when the queue is full (replay) instead of
    /// counting drops (live agent).
    pub fn start(cfg: &Cfg, node: &str, state_dir: &std::path::Path, wait: bool) -> Result<Self> {
        let spool = Spool::open(
            &state_dir.join("spool"),
            cfg.spool_max_bytes,
            cfg.spool_full,
        )?;
        if !spool.is_empty() {
            info!(
                batches = spool.len(),
                rows = spool.rows(),
                "ClickHouse spool from an earlier run: delivering it first"
            );
        }
        let (tx, rx) = mpsc::channel((cfg.queue_rows / CHUNK).max(1));
        let stats = Arc::new(WriterStats::default());
        let mut w = Writer {
            client: client(cfg)?,
            cfg: cfg.clone(),
            spool,
            stats: stats.clone(),
            token_prefix: format!("{node}:{}", crate::enrich::IdGen::new().next_id()),
            seq: 0,
            retry_at: Instant::now(),
            backoff: Duration::from_millis(250),
            down_since: None,
        };
        let migrate = cfg.migrate_on_start.then(|| cfg.clone());
        let thread = crate::spawn_runtime_thread("clickhouse", async move {
            // Before the first insert; unreachable now is fine: batches wait in the spool.
            if let Some(cfg) = migrate {
                match super::migrate(&cfg).await {
                    Ok(v) => info!(version = v, "ClickHouse schema ready"),
                    Err(e) => warn!("ClickHouse schema not applied: {e:#}"),
                }
            }
            w.run(rx).await
        })
        .context("starting the ClickHouse writer")?;
        Ok(ClickHouseSink {
            tx: Some(tx),
            events: Vec::with_capacity(CHUNK),
            alerts: Vec::new(),
            wait,
            alert_ids: crate::enrich::IdGen::new(),
            stats,
            thread: Some(thread),
        })
    }

    pub fn event(&mut self, ev: &Event) {
        self.events.push(EventRow::from(ev));
        if self.events.len() >= CHUNK {
            let rows = std::mem::replace(&mut self.events, Vec::with_capacity(CHUNK));
            self.send(Chunk::Events(rows));
        }
    }

    pub fn alert(&mut self, a: &Alert) {
        let id = self.alert_ids.next_id();
        self.alerts.push(AlertRow::new(a, id));
    }

    /// Hands what is buffered to the writer (the pipeline calls it on every drain).
    pub fn flush(&mut self) {
        if !self.events.is_empty() {
            let rows = std::mem::take(&mut self.events);
            self.send(Chunk::Events(rows));
        }
        if !self.alerts.is_empty() {
            let rows = std::mem::take(&mut self.alerts);
            self.send(Chunk::Alerts(rows));
        }
    }

    fn send(&mut self, c: Chunk) {
        let Some(tx) = &self.tx else { return };
        let n = match &c {
            Chunk::Events(r) => r.len(),
            Chunk::Alerts(r) => r.len(),
        } as u64;
        let r = if self.wait {
            tx.blocking_send(c).map_err(|_| ())
        } else {
            tx.try_send(c).map_err(|_| ())
        };
        if r.is_err() {
            self.stats.rows_dropped.fetch_add(n, Relaxed);
        }
    }

    /// Flushes, closes the queue and waits for the writer to insert or spool everything.
    pub fn finish(&mut self) {
        self.flush();
        self.tx = None;
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for ClickHouseSink {
    fn drop(&mut self) {
        self.finish();
    }
}

struct Batch<T> {
    rows: Vec<T>,
    bytes: usize,
    started: Option<Instant>,
}

impl<T> Default for Batch<T> {
    fn default() -> Self {
        Batch {
            rows: Vec::new(),
            bytes: 0,
            started: None,
        }
    }
}

struct Writer {
    client: Client,
    cfg: Cfg,
    spool: Spool,
    stats: Arc<WriterStats>,
    token_prefix: String,
    seq: u64,
    retry_at: Instant,
    backoff: Duration,
    down_since: Option<Instant>,
}

impl Writer {
    async fn run(&mut self, mut rx: mpsc::Receiver<Chunk>) {
        let mut events: Batch<EventRow> = Batch::default();
        let mut alerts: Batch<AlertRow> = Batch::default();
        let mut tick = tokio::time::interval(Duration::from_millis(100));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        self.publish_spool();
        loop {
            tokio::select! {
                chunk = rx.recv() => match chunk {
                    Some(Chunk::Events(rows)) => {
                        add(&mut events, rows);
                        if self.full(&events) {
                            self.flush(TableKind::Events, &mut events).await;
                        }
                    }
                    Some(Chunk::Alerts(rows)) => {
                        // Batched like events (at most `flush_interval` late): an insert per
                        // alert would make a part per alert in an alert storm. The SOC's
                        // real-time feeds are the alert sinks, not this table.
                        add(&mut alerts, rows);
                        if self.full(&alerts) {
                            self.flush(TableKind::Alerts, &mut alerts).await;
                        }
                    }
                    None => break,
                },
                _ = tick.tick() => {
                    if self.aged(&events) {
                        self.flush(TableKind::Events, &mut events).await;
                    }
                    if self.aged(&alerts) {
                        self.flush(TableKind::Alerts, &mut alerts).await;
                    }
                    self.drain_spool(Duration::from_millis(500)).await;
                }
            }
        }
        // Shutdown: one more attempt for what is in memory, then it waits on disk.
        self.flush(TableKind::Events, &mut events).await;
        self.flush(TableKind::Alerts, &mut alerts).await;
        self.retry_at = Instant::now();
        self.drain_spool(Duration::from_secs(5)).await;
        if !self.spool.is_empty() {
            warn!(
                batches = self.spool.len(),
                rows = self.spool.rows(),
                "ClickHouse not reachable at exit: batches stay in the spool for the next start"
            );
        }
    }

    fn full<T>(&self, b: &Batch<T>) -> bool {
        b.rows.len() >= self.cfg.batch_rows || b.bytes >= self.cfg.batch_bytes
    }

    fn aged<T>(&self, b: &Batch<T>) -> bool {
        b.started
            .is_some_and(|t| t.elapsed() >= self.cfg.flush_interval)
    }

    fn next_token(&mut self) -> String {
        self.seq += 1;
        format!("{}:{}", self.token_prefix, self.seq)
    }

    async fn flush<T>(&mut self, table: TableKind, b: &mut Batch<T>)
    where
        T: RowOwned + RowWrite + Serialize + DeserializeOwned,
    {
        if b.rows.is_empty() {
            return;
        }
        let rows = std::mem::take(&mut b.rows);
        b.bytes = 0;
        b.started = None;
        let token = self.next_token();
        // Behind a non-empty spool (or during backoff) new data waits its turn on disk.
        if self.spool.is_empty() && Instant::now() >= self.retry_at {
            match self.insert(table, &token, &rows).await {
                Ok(()) => return self.delivered(rows.len()),
                Err(e) => self.failed(&e),
            }
        }
        match self.spool.push(table, &token, &rows) {
            Ok(()) => {
                self.stats
                    .rows_spooled
                    .fetch_add(rows.len() as u64, Relaxed);
            }
            Err(e) => {
                tracing::error!("{e:#}; {} rows dropped", rows.len());
                self.stats
                    .rows_dropped
                    .fetch_add(rows.len() as u64, Relaxed);
            }
        }
        self.publish_spool();
    }

    async fn drain_spool(&mut self, budget: Duration) {
        let start = Instant::now();
        while !self.spool.is_empty() && Instant::now() >= self.retry_at && start.elapsed() < budget
        {
            let table = match self.spool.oldest() {
                Some(e) => e.table,
                None => break,
            };
            let r = match table {
                TableKind::Events => self.retry_oldest::<EventRow>(table).await,
                TableKind::Alerts => self.retry_oldest::<AlertRow>(table).await,
            };
            if r.is_err() {
                break;
            }
        }
        self.publish_spool();
    }

    async fn retry_oldest<T>(&mut self, table: TableKind) -> Result<(), ()>
    where
        T: RowOwned + RowWrite + Serialize + DeserializeOwned,
    {
        let (token, rows) = match self.spool.read_oldest::<T>() {
            Ok(Some(b)) => b,
            Ok(None) => return Err(()),
            Err(e) => {
                tracing::error!("unreadable spool batch dropped: {e:#}");
                self.spool.pop_oldest(false);
                return Ok(());
            }
        };
        match self.insert(table, &token, &rows).await {
            Ok(()) => {
                self.spool.pop_oldest(true);
                self.delivered(rows.len());
                Ok(())
            }
            Err(e) => {
                self.failed(&e);
                Err(())
            }
        }
    }

    fn delivered(&mut self, rows: usize) {
        self.stats.rows_written.fetch_add(rows as u64, Relaxed);
        self.stats.batches_written.fetch_add(1, Relaxed);
        self.backoff = Duration::from_millis(250);
        if let Some(t) = self.down_since.take() {
            info!(
                after = ?t.elapsed(),
                spooled_batches = self.spool.len(),
                "ClickHouse is taking inserts again"
            );
        }
    }

    fn failed(&mut self, e: &anyhow::Error) {
        self.stats.insert_failures.fetch_add(1, Relaxed);
        if self.down_since.is_none() {
            warn!("ClickHouse insert failed, spooling until it recovers: {e:#}");
            self.down_since = Some(Instant::now());
        }
        self.retry_at = Instant::now() + self.backoff;
        self.backoff = (self.backoff * 2).min(Duration::from_secs(30));
    }

    fn publish_spool(&self) {
        self.stats
            .spool_batches
            .store(self.spool.len() as u64, Relaxed);
        self.stats.spool_bytes.store(self.spool.bytes(), Relaxed);
        self.stats
            .spool_dropped
            .store(self.spool.dropped_rows, Relaxed);
        let oldest = self
            .spool
            .oldest()
            .and_then(|e| e.created.duration_since(std::time::UNIX_EPOCH).ok())
            .map(|d| d.as_secs().max(1))
            .unwrap_or(0);
        self.stats.spool_oldest.store(oldest, Relaxed);
    }

    async fn insert<T>(&self, table: TableKind, token: &str, rows: &[T]) -> Result<()>
    where
        T: RowOwned + RowWrite,
    {
        let fut = async {
            let mut ins = self
                .client
                .insert::<T>(table.as_str())
                .await?
                .with_setting("insert_deduplication_token", token)
                .with_setting("insert_deduplicate", "1");
            if self.cfg.cluster.is_some() {
                // The token must reach the shard with the rows, not a background sender.
                ins = ins.with_setting("distributed_foreground_insert", "1");
            }
            for r in rows {
                ins.write(r).await?;
            }
            ins.end().await
        };
        match tokio::time::timeout(self.cfg.timeout, fut).await {
            Ok(r) => {
                r.with_context(|| format!("inserting {} rows into {}", rows.len(), table.as_str()))
            }
            Err(_) => anyhow::bail!(
                "inserting into {}: no answer within {:?}",
                table.as_str(),
                self.cfg.timeout
            ),
        }
    }
}

fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

fn add<T: ApproxSize>(b: &mut Batch<T>, rows: Vec<T>) {
    if b.started.is_none() {
        b.started = Some(Instant::now());
    }
    b.bytes += rows.iter().map(ApproxSize::approx_bytes).sum::<usize>();
    if b.rows.is_empty() {
        b.rows = rows;
    } else {
        b.rows.extend(rows);
    }
}
