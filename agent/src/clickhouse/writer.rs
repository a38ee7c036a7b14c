//! The ClickHouse writer: the pipeline hands it rows through two bounded queues, one for
//! events and one for alerts; a thread of its own batches them by rows, bytes and age and
//! inserts each batch with a dedup token. Alerts never wait behind events: their queue is
//! read first, a full alert queue holds alerts in the pipeline's own bounded backlog
//! instead of dropping them, and the spool drops event batches before alert batches.
//!
//! A batch ClickHouse does not acknowledge goes to the spool, and while the spool holds
//! anything new batches queue up behind it there (so delivery stays in order); the spool is
//! drained oldest first with backoff. Before a spooled batch that may have been applied is
//! sent again, the writer asks ClickHouse whether its first and last rows are stored (see
//! `schema.rs`): dedup then does not depend on the server's block window. A batch
//! ClickHouse refuses for good (a data error, not an outage) is quarantined, never retried
//! forever at the head of the spool.
//!
//! On shutdown everything in memory is spooled first (synced to disk within milliseconds,
//! an insert in flight is abandoned and its batch spooled too); only then is the spool
//! delivered, for a few seconds at most: a slow ClickHouse and a SIGKILL after the grace
//! period lose nothing. The pipeline never waits on ClickHouse: in the live agent a full
//! event queue counts dropped rows (`replay` waits instead, it has no kernel to keep up
//! with).

use std::{
    collections::{HashSet, VecDeque},
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
use tokio::sync::{mpsc, watch};
use tracing::{info, warn};

use super::{
    client,
    rows::{AlertRow, ApproxSize, EventRow, RowKey},
    spool::{Spool, TableKind},
};
use crate::{alert::Alert, clickhouse::Config as Cfg, event::Event};

/// Rows cross the queue in chunks of this many, not one by one.
const CHUNK: usize = 1024;
/// Alert rows cross the queue in chunks of at most this many…
const ALERT_CHUNK: usize = 128;
/// …the alert queue holds this many chunks (4 096 rows, ~30 MiB at ~7 KB a row)…
const ALERT_QUEUE_CHUNKS: usize = 32;
/// …and the pipeline keeps this many more alert rows when even that is full (~60 MiB; by
/// then the event queue has been dropping for a while).
const ALERT_BACKLOG_ROWS: usize = 8192;
/// After shutdown spooled everything, how long the writer still tries to deliver the spool.
const SHUTDOWN_DRAIN: Duration = Duration::from_secs(5);

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
    /// Alert rows lost (only past the alert backlog, or a failing spool write).
    pub alert_rows_dropped: AtomicU64,
    /// Lost to the spool's size bound.
    pub spool_dropped: AtomicU64,
    /// Unix seconds of the oldest spooled batch, 0 when the spool is empty.
    pub spool_oldest: AtomicU64,
    /// Batches (and their rows) ClickHouse refused for good, set aside in the quarantine.
    pub batches_quarantined: AtomicU64,
    pub rows_quarantined: AtomicU64,
    /// Spooled batches found already stored (an insert applied whose answer was lost).
    pub batches_already_stored: AtomicU64,
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
    pub alert_rows_dropped: u64,
    pub batches_quarantined: u64,
    pub rows_quarantined: u64,
    pub batches_already_stored: u64,
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
            alert_rows_dropped: self.alert_rows_dropped.load(Relaxed),
            batches_quarantined: self.batches_quarantined.load(Relaxed),
            rows_quarantined: self.rows_quarantined.load(Relaxed),
            batches_already_stored: self.batches_already_stored.load(Relaxed),
            lag_seconds: match self.spool_oldest.load(Relaxed) {
                0 => 0,
                t => unix_now().saturating_sub(t),
            },
        }
    }
}

/// The pipeline's handle.
pub struct ClickHouseSink {
    events_tx: Option<mpsc::Sender<Vec<EventRow>>>,
    alerts_tx: Option<mpsc::Sender<Vec<AlertRow>>>,
    events: Vec<EventRow>,
    alerts: Vec<AlertRow>,
    /// Alert chunks the alert queue had no room for yet, oldest first.
    alert_backlog: VecDeque<Vec<AlertRow>>,
    alert_backlog_rows: usize,
    /// Wait for queue space instead of dropping (replay).
    wait: bool,
    alert_ids: crate::enrich::IdGen,
    pub stats: Arc<WriterStats>,
    stop: watch::Sender<bool>,
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
        let (events_tx, events_rx) = mpsc::channel((cfg.queue_rows / CHUNK).max(1));
        let (alerts_tx, alerts_rx) = mpsc::channel(ALERT_QUEUE_CHUNKS);
        let (stop, stop_rx) = watch::channel(false);
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
            stop: stop_rx,
            attempted: HashSet::new(),
            schema_pending: false,
        };
        let migrate = cfg.migrate_on_start.then(|| cfg.clone());
        let thread = crate::spawn_runtime_thread("clickhouse", async move {
            w.run(migrate, events_rx, alerts_rx).await
        })
        .context("starting the ClickHouse writer")?;
        Ok(ClickHouseSink {
            events_tx: Some(events_tx),
            alerts_tx: Some(alerts_tx),
            events: Vec::with_capacity(CHUNK),
            alerts: Vec::new(),
            alert_backlog: VecDeque::new(),
            alert_backlog_rows: 0,
            wait,
            alert_ids: crate::enrich::IdGen::new(),
            stats,
            stop,
            thread: Some(thread),
        })
    }

    pub fn event(&mut self, ev: &Event) {
        self.events.push(EventRow::from(ev));
        if self.events.len() >= CHUNK {
            let rows = std::mem::replace(&mut self.events, Vec::with_capacity(CHUNK));
            self.send_events(rows);
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
            self.send_events(rows);
        }
        if !self.alerts.is_empty() {
            let mut rows = std::mem::take(&mut self.alerts);
            while !rows.is_empty() {
                let rest = rows.split_off(rows.len().min(ALERT_CHUNK));
                self.alert_backlog_rows += rows.len();
                self.alert_backlog.push_back(rows);
                rows = rest;
            }
        }
        self.send_alerts(self.wait);
    }

    fn send_events(&mut self, rows: Vec<EventRow>) {
        let Some(tx) = &self.events_tx else { return };
        let n = rows.len() as u64;
        let r = if self.wait {
            tx.blocking_send(rows).map_err(|_| ())
        } else {
            tx.try_send(rows).map_err(|_| ())
        };
        if r.is_err() {
            self.stats.rows_dropped.fetch_add(n, Relaxed);
        }
    }

    /// Moves the alert backlog into the alert queue, as far as it has room (`block`: all
    /// of it).
    fn send_alerts(&mut self, block: bool) {
        let Some(tx) = &self.alerts_tx else { return };
        while let Some(rows) = self.alert_backlog.pop_front() {
            let n = rows.len();
            let sent = if block {
                tx.blocking_send(rows).map_err(|_| None)
            } else {
                tx.try_send(rows).map_err(|e| match e {
                    mpsc::error::TrySendError::Full(rows) => Some(rows),
                    mpsc::error::TrySendError::Closed(_) => None,
                })
            };
            match sent {
                Ok(()) => self.alert_backlog_rows -= n,
                Err(Some(rows)) => {
                    self.alert_backlog.push_front(rows);
                    break;
                }
                Err(None) => {
                    self.alert_backlog_rows -= n;
                    self.stats.alert_rows_dropped.fetch_add(n as u64, Relaxed);
                }
            }
        }
        while self.alert_backlog_rows > ALERT_BACKLOG_ROWS {
            let Some(rows) = self.alert_backlog.pop_front() else {
                break;
            };
            self.alert_backlog_rows -= rows.len();
            self.stats
                .alert_rows_dropped
                .fetch_add(rows.len() as u64, Relaxed);
        }
    }

    /// Flushes, stops the writer's live inserts, hands it the rest and waits until it spooled
    /// everything (then it delivers the spool for a few seconds at most).
    pub fn finish(&mut self) {
        // A stopping agent: an insert in flight is abandoned (its batch spooled) instead of
        // holding the queues until its timeout. A replay instead delivers all it queued
        // (the queues close below; spooling a whole queue at once could overflow the spool).
        if !self.wait {
            let _ = self.stop.send(true);
        }
        self.flush();
        self.send_alerts(true);
        self.events_tx = None;
        self.alerts_tx = None;
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

/// Why an insert did not go through.
#[derive(Debug)]
enum Failure {
    /// ClickHouse is down, slow, overloaded, or its schema or credentials need an operator:
    /// the batch waits in the spool.
    Transient(anyhow::Error),
    /// ClickHouse refused this batch's data: sending it again cannot help.
    Permanent(anyhow::Error),
    /// The agent is stopping: the batch is spooled as it is.
    Stopping,
}

/// ClickHouse error codes that are about the data of the insert itself.
const DATA_ERRORS: &[u32] = &[
    6,   // CANNOT_PARSE_TEXT
    26,  // CANNOT_PARSE_QUOTED_STRING
    27,  // CANNOT_PARSE_INPUT_ASSERTION_FAILED
    32,  // ATTEMPT_TO_READ_AFTER_EOF
    33,  // CANNOT_READ_ALL_DATA
    38,  // CANNOT_PARSE_DATE
    41,  // CANNOT_PARSE_DATETIME
    53,  // TYPE_MISMATCH
    69,  // ARGUMENT_OUT_OF_BOUND
    70,  // CANNOT_CONVERT_TYPE
    72,  // CANNOT_PARSE_NUMBER
    117, // INCORRECT_DATA
    128, // TOO_LARGE_ARRAY_SIZE
    131, // TOO_LARGE_STRING_SIZE
    321, // VALUE_IS_OUT_OF_RANGE_OF_DATA_TYPE
    349, // CANNOT_INSERT_NULL_IN_ORDINARY_COLUMN
    467, // CANNOT_PARSE_BOOL
];

/// Sorts an insert error into "retry later" and "never".
fn classify(e: anyhow::Error) -> Failure {
    use clickhouse::error::Error as E;
    let permanent = e.chain().any(|c| match c.downcast_ref::<E>() {
        Some(E::BadResponse(m)) => error_code(m).is_some_and(|c| DATA_ERRORS.contains(&c)),
        // Rows this build cannot even serialize.
        Some(E::SequenceMustHaveLength | E::Custom(_) | E::VariantDiscriminatorIsOutOfBound(_)) => {
            true
        }
        _ => false,
    });
    if permanent {
        Failure::Permanent(e)
    } else {
        Failure::Transient(e)
    }
}

/// `Code: 117. DB::Exception: …` → 117.
fn error_code(message: &str) -> Option<u32> {
    let rest = &message[message.find("Code: ")? + 6..];
    let end = rest.find(|c: char| !c.is_ascii_digit())?;
    rest[..end].parse().ok()
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
    stop: watch::Receiver<bool>,
    /// Tokens of spooled batches whose insert was tried in this run.
    attempted: HashSet<String>,
    /// The schema is still being applied: no inserts yet.
    schema_pending: bool,
}

/// How an insert may run: until when, and whether stopping abandons it.
#[derive(Clone, Copy)]
struct Attempt {
    deadline: Instant,
    cancellable: bool,
}

impl Writer {
    fn live(&self) -> Attempt {
        Attempt {
            deadline: Instant::now() + self.cfg.timeout,
            cancellable: true,
        }
    }

    /// `migrate`: apply the schema first (`migrate_on_start`). It runs beside the loop, so
    /// a slow ClickHouse does not keep the queues from being read (or the agent from
    /// stopping); until it is done, batches wait in the spool.
    async fn run(
        &mut self,
        migrate: Option<Cfg>,
        mut events_rx: mpsc::Receiver<Vec<EventRow>>,
        mut alerts_rx: mpsc::Receiver<Vec<AlertRow>>,
    ) {
        let mut events: Batch<EventRow> = Batch::default();
        let mut alerts: Batch<AlertRow> = Batch::default();
        let mut tick = tokio::time::interval(Duration::from_millis(100));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut stop = self.stop.clone();
        let (mut events_open, mut alerts_open) = (true, true);
        let mut migration = migrate.map(|cfg| Box::pin(async move { super::migrate(&cfg).await }));
        self.schema_pending = migration.is_some();
        self.publish_spool();
        while events_open || alerts_open {
            tokio::select! {
                biased;
                _ = async { let _ = stop.wait_for(|s| *s).await; } => break,
                r = async { migration.as_mut().expect("guarded").await }, if migration.is_some() => {
                    match r {
                        Ok(v) => info!(version = v, "ClickHouse schema ready"),
                        Err(e) => warn!("ClickHouse schema not applied: {e:#}"),
                    }
                    migration = None;
                    self.schema_pending = false;
                }
                chunk = alerts_rx.recv(), if alerts_open => match chunk {
                    // Batched like events (at most `flush_interval` late): an insert per
                    // alert would make a part per alert in an alert storm. The SOC's
                    // real-time feeds are the alert sinks, not this table.
                    Some(rows) => {
                        add(&mut alerts, rows);
                        if self.full(&alerts) {
                            self.flush(TableKind::Alerts, &mut alerts).await;
                        }
                    }
                    None => alerts_open = false,
                },
                chunk = events_rx.recv(), if events_open => match chunk {
                    Some(rows) => {
                        add(&mut events, rows);
                        if self.full(&events) {
                            self.flush(TableKind::Events, &mut events).await;
                        }
                    }
                    None => events_open = false,
                },
                _ = tick.tick() => {
                    if self.aged(&alerts) {
                        self.flush(TableKind::Alerts, &mut alerts).await;
                    }
                    if self.aged(&events) {
                        self.flush(TableKind::Events, &mut events).await;
                    }
                    self.drain_spool(Duration::from_millis(500), None).await;
                }
            }
        }
        // Shutdown. What the pipeline still hands over (the queues close right after the
        // stop), then everything to disk before any insert is tried.
        while let Some(rows) = alerts_rx.recv().await {
            add(&mut alerts, rows);
        }
        while let Some(rows) = events_rx.recv().await {
            add(&mut events, rows);
        }
        self.spool_batch(TableKind::Alerts, &mut alerts, false);
        self.spool_batch(TableKind::Events, &mut events, false);
        self.publish_spool();
        // Then, briefly, delivery: killed now, nothing is lost. A schema still being
        // applied is given that time too (a short replay can end before it is done).
        self.retry_at = Instant::now();
        let deadline = Instant::now() + SHUTDOWN_DRAIN;
        if let Some(m) = migration {
            let left = deadline.saturating_duration_since(Instant::now());
            match tokio::time::timeout(left, m).await {
                Ok(Ok(v)) => info!(version = v, "ClickHouse schema ready"),
                Ok(Err(e)) => warn!("ClickHouse schema not applied: {e:#}"),
                Err(_) => warn!("ClickHouse schema not applied before exit"),
            }
            self.schema_pending = false;
        }
        self.drain_spool(SHUTDOWN_DRAIN, Some(deadline)).await;
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

    fn take<T>(b: &mut Batch<T>) -> Vec<T> {
        b.bytes = 0;
        b.started = None;
        std::mem::take(&mut b.rows)
    }

    /// To the spool without an insert (shutdown, or behind a non-empty spool).
    fn spool_batch<T: Serialize>(&mut self, table: TableKind, b: &mut Batch<T>, attempted: bool) {
        if b.rows.is_empty() {
            return;
        }
        let rows = Self::take(b);
        let token = self.next_token();
        self.spool_rows(table, &token, &rows, attempted);
    }

    fn spool_rows<T: Serialize>(
        &mut self,
        table: TableKind,
        token: &str,
        rows: &[T],
        attempted: bool,
    ) {
        match self.spool.push(table, token, rows, attempted) {
            Ok(()) => {
                self.stats
                    .rows_spooled
                    .fetch_add(rows.len() as u64, Relaxed);
            }
            Err(e) => {
                tracing::error!("{e:#}; {} rows dropped", rows.len());
                let counter = match table {
                    TableKind::Events => &self.stats.rows_dropped,
                    TableKind::Alerts => &self.stats.alert_rows_dropped,
                };
                counter.fetch_add(rows.len() as u64, Relaxed);
            }
        }
        self.publish_spool();
    }

    async fn flush<T>(&mut self, table: TableKind, b: &mut Batch<T>)
    where
        T: RowOwned + RowWrite + Serialize + DeserializeOwned,
    {
        if b.rows.is_empty() {
            return;
        }
        let rows = Self::take(b);
        let token = self.next_token();
        // Behind a non-empty spool (or during backoff) new data waits its turn on disk.
        let mut attempted = false;
        if self.spool.is_empty() && Instant::now() >= self.retry_at && !self.schema_pending {
            attempted = true;
            match self.insert(table, &token, &rows, self.live()).await {
                Ok(()) => return self.delivered(rows.len()),
                Err(Failure::Permanent(e)) => return self.quarantine_new(table, &token, &rows, &e),
                Err(Failure::Transient(e)) => self.failed(&e),
                Err(Failure::Stopping) => {}
            }
        }
        self.spool_rows(table, &token, &rows, attempted);
    }

    /// `deadline`: at shutdown, the end of the delivery attempt (inserts not abandoned).
    async fn drain_spool(&mut self, budget: Duration, deadline: Option<Instant>) {
        if self.schema_pending && deadline.is_none() {
            return;
        }
        let start = Instant::now();
        while !self.spool.is_empty() && start.elapsed() < budget {
            if Instant::now() < self.retry_at {
                // Live: come back at the next tick. At shutdown: wait out the backoff if
                // the deadline allows.
                match deadline {
                    Some(d) if self.retry_at < d => {
                        tokio::time::sleep_until(self.retry_at.into()).await;
                    }
                    _ => break,
                }
            }
            if deadline.is_none() && *self.stop.borrow() {
                break;
            }
            let attempt = match deadline {
                Some(d) => Attempt {
                    deadline: d,
                    cancellable: false,
                },
                None => self.live(),
            };
            let table = match self.spool.oldest() {
                Some(e) => e.table,
                None => break,
            };
            let r = match table {
                TableKind::Events => self.retry_oldest::<EventRow>(table, attempt).await,
                TableKind::Alerts => self.retry_oldest::<AlertRow>(table, attempt).await,
            };
            // Live: the next tick tries again. At shutdown: again after the backoff, while
            // the deadline allows.
            if r.is_err() && deadline.is_none_or(|d| Instant::now() >= d) {
                break;
            }
        }
        if self.spool.is_empty() {
            self.attempted.clear();
        }
        self.publish_spool();
    }

    async fn retry_oldest<T>(&mut self, table: TableKind, attempt: Attempt) -> Result<(), ()>
    where
        T: RowOwned + RowWrite + Serialize + DeserializeOwned + RowKey,
    {
        let batch = match self.spool.read_oldest::<T>() {
            Ok(Some(b)) => b,
            Ok(None) => return Err(()),
            Err(e) => {
                self.spool.quarantine_oldest(&format!("unreadable ({e:#})"));
                self.count_quarantine();
                return Ok(());
            }
        };
        let n = batch.rows.len();
        // Applied already, its answer lost? Then it is not sent again.
        if batch.attempted || self.attempted.contains(&batch.token) {
            match self.already_stored(table, &batch.rows, attempt).await {
                Ok(true) => {
                    self.spool.pop_oldest();
                    self.stats.batches_already_stored.fetch_add(1, Relaxed);
                    self.delivered(n);
                    return Ok(());
                }
                Ok(false) => {}
                Err(Failure::Transient(e)) | Err(Failure::Permanent(e)) => {
                    self.failed(&e);
                    return Err(());
                }
                Err(Failure::Stopping) => return Err(()),
            }
        }
        if self.attempted.len() < 65536 {
            self.attempted.insert(batch.token.clone());
        }
        if let Err(e) = self.spool.mark_oldest_tried() {
            // Without the mark a crash could send it twice later: better to wait.
            self.failed(&e.context("marking a spooled batch as tried"));
            return Err(());
        }
        match self.insert(table, &batch.token, &batch.rows, attempt).await {
            Ok(()) => {
                self.spool.pop_oldest();
                self.delivered(n);
                Ok(())
            }
            Err(Failure::Permanent(e)) => {
                self.spool
                    .quarantine_oldest(&format!("refused by ClickHouse ({e:#})"));
                self.count_quarantine();
                Ok(())
            }
            Err(Failure::Transient(e)) => {
                self.failed(&e);
                Err(())
            }
            Err(Failure::Stopping) => Err(()),
        }
    }

    fn quarantine_new<T: Serialize>(
        &mut self,
        table: TableKind,
        token: &str,
        rows: &[T],
        e: &anyhow::Error,
    ) {
        match self.spool.quarantine_rows(
            table,
            token,
            rows,
            &format!("refused by ClickHouse ({e:#})"),
        ) {
            Ok(()) => self.count_quarantine(),
            Err(err) => {
                tracing::error!(
                    "ClickHouse refused a batch ({e:#}) and it could not be quarantined ({err:#}): \
                     {} rows dropped",
                    rows.len()
                );
                self.stats
                    .rows_dropped
                    .fetch_add(rows.len() as u64, Relaxed);
            }
        }
    }

    fn count_quarantine(&self) {
        let (batches, rows, dropped) = self.spool.quarantined();
        self.stats.batches_quarantined.store(batches, Relaxed);
        self.stats.rows_quarantined.store(rows, Relaxed);
        self.stats
            .spool_dropped
            .store(self.spool.dropped_rows + dropped, Relaxed);
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
        let (_, _, q_dropped) = self.spool.quarantined();
        self.stats
            .spool_dropped
            .store(self.spool.dropped_rows + q_dropped, Relaxed);
        let oldest = self
            .spool
            .oldest()
            .and_then(|e| e.created.duration_since(std::time::UNIX_EPOCH).ok())
            .map(|d| d.as_secs().max(1))
            .unwrap_or(0);
        self.stats.spool_oldest.store(oldest, Relaxed);
    }

    /// Runs `fut` within the attempt's deadline, abandoned when the agent stops (if the
    /// attempt may be).
    async fn bounded<F, R>(&self, what: &str, attempt: Attempt, fut: F) -> Result<R, Failure>
    where
        F: std::future::Future<Output = Result<R>>,
    {
        let left = attempt
            .deadline
            .saturating_duration_since(Instant::now())
            .min(self.cfg.timeout);
        let mut stop = self.stop.clone();
        let stopped = async move {
            if attempt.cancellable {
                let _ = stop.wait_for(|s| *s).await;
            } else {
                std::future::pending::<()>().await;
            }
        };
        tokio::select! {
            r = tokio::time::timeout(left, fut) => match r {
                Ok(r) => r.map_err(classify),
                Err(_) => Err(Failure::Transient(anyhow::anyhow!("{what}: no answer within {left:?}"))),
            },
            _ = stopped => Err(Failure::Stopping),
        }
    }

    async fn insert<T>(
        &self,
        table: TableKind,
        token: &str,
        rows: &[T],
        attempt: Attempt,
    ) -> Result<(), Failure>
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
            ins.end().await?;
            Ok(())
        };
        let what = format!("inserting {} rows into {}", rows.len(), table.as_str());
        self.bounded(&what, attempt, async {
            fut.await
                .map_err(|e: clickhouse::error::Error| anyhow::Error::new(e).context(what.clone()))
        })
        .await
    }

    /// True when the batch's first and last rows (node, id, within its time range) are in
    /// `table`: it was applied before (see `schema.rs`).
    async fn already_stored<T: RowKey>(
        &self,
        table: TableKind,
        rows: &[T],
        attempt: Attempt,
    ) -> Result<bool, Failure> {
        let (Some(first), Some(last)) = (rows.first(), rows.last()) else {
            return Ok(true);
        };
        let (lo, hi) = rows
            .iter()
            .map(RowKey::row_ts_ns)
            .fold((i64::MAX, i64::MIN), |(lo, hi), t| (lo.min(t), hi.max(t)));
        let want: u64 = if first.row_id() == last.row_id() {
            1
        } else {
            2
        };
        let q = self
            .client
            .query(&format!(
                "SELECT uniqExact(id) FROM {} WHERE node = ? AND id IN (?, ?) \
                 AND ts BETWEEN fromUnixTimestamp64Nano(?) AND fromUnixTimestamp64Nano(?)",
                table.as_str()
            ))
            .bind(first.row_node())
            .bind(first.row_id())
            .bind(last.row_id())
            .bind(lo)
            .bind(hi);
        let found = self
            .bounded("checking a spooled batch", attempt, async {
                q.fetch_one::<u64>()
                    .await
                    .context("asking whether a spooled batch is stored")
            })
            .await?;
        tracing::debug!(
            table = table.as_str(),
            found,
            want,
            first = first.row_id(),
            last = last.row_id(),
            "spooled batch: already stored?"
        );
        if found > 0 && found < want {
            warn!(
                table = table.as_str(),
                rows = rows.len(),
                "a spooled batch is partly stored: sending it again (its token deduplicates \
                 what the server still remembers)"
            );
        }
        Ok(found == want)
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn insert_errors_are_sorted_into_retry_and_never() {
        let bad = |m: &str| {
            anyhow::Error::new(clickhouse::error::Error::BadResponse(m.into())).context("inserting")
        };
        let permanent = |e| matches!(classify(e), Failure::Permanent(_));
        assert!(permanent(bad(
            "Code: 117. DB::Exception: Incorrect data. (INCORRECT_DATA)"
        )));
        assert!(permanent(bad(
            "Code: 27. DB::Exception: Cannot parse input. (CANNOT_PARSE_INPUT_ASSERTION_FAILED)"
        )));
        for transient in [
            "Code: 202. DB::Exception: Too many simultaneous queries. (TOO_MANY_SIMULTANEOUS_QUERIES)",
            "Code: 252. DB::Exception: Too many parts. (TOO_MANY_PARTS)",
            "Code: 516. DB::Exception: Authentication failed. (AUTHENTICATION_FAILED)",
            "Code: 60. DB::Exception: Table credwatch.events does not exist. (UNKNOWN_TABLE)",
            "no code at all",
        ] {
            assert!(!permanent(bad(transient)), "{transient}");
        }
        assert!(!permanent(anyhow::anyhow!("connection refused")));
        assert_eq!(error_code("x Code: 241. DB::Exception"), Some(241));
    }
}
