//! Prometheus `/metrics` and `/healthz`. The agent's loop publishes one [`AgentSnapshot`]
//! per second (the same numbers as `--stats-file`); scrapes encode the latest snapshot, so
//! serving metrics never touches the pipeline.

use std::{
    collections::BTreeMap,
    net::SocketAddr,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use anyhow::{Context, Result};
use http_body_util::Full;
use hyper::{Request, Response, body::Bytes, service::service_fn};
use hyper_util::rt::TokioIo;
use prometheus_client::{
    collector::Collector,
    encoding::{DescriptorEncoder, EncodeMetric},
    metrics::{counter::ConstCounter, gauge::ConstGauge},
    registry::Registry,
};
use serde::Serialize;
use tracing::{debug, warn};

use crate::{
    clickhouse::writer::WriterCounts,
    config::{Checker, Validate},
    pipeline::PipelineStats,
};

/// `[metrics]`.
#[derive(Debug, Clone, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Prometheus `/metrics` and `/healthz`; `""` turns them off. Localhost by default.
    #[serde(default = "default_listen")]
    pub listen: String,
}

fn default_listen() -> String {
    "127.0.0.1:9464".into()
}

impl Default for Config {
    fn default() -> Self {
        Config {
            listen: default_listen(),
        }
    }
}

impl Config {
    /// Where to listen: `listen`, with its address replaced by `CREDWATCH_METRICS_ADDRESS`
    /// when set (a DaemonSet passes the pod IP from the downward API, so the listener is
    /// not on every interface of a host-network pod). `None`: metrics off.
    pub fn listen_addr(&self) -> Result<Option<SocketAddr>> {
        if self.listen.is_empty() {
            return Ok(None);
        }
        let mut addr: SocketAddr = self
            .listen
            .parse()
            .with_context(|| format!("metrics.listen {:?}", self.listen))?;
        if let Ok(ip) = std::env::var("CREDWATCH_METRICS_ADDRESS")
            && !ip.trim().is_empty()
        {
            let ip = ip.trim().trim_start_matches('[').trim_end_matches(']');
            addr.set_ip(
                ip.parse()
                    .with_context(|| format!("CREDWATCH_METRICS_ADDRESS {ip:?}"))?,
            );
        }
        Ok(Some(addr))
    }
}

impl Validate for Config {
    fn validate(&self, c: &mut Checker) {
        c.check(
            self.listen.is_empty() || self.listen.parse::<std::net::SocketAddr>().is_ok(),
            "listen",
            format_args!(
                "must be ADDRESS:PORT like 127.0.0.1:9464, or \"\" (got {:?})",
                self.listen
            ),
        );
    }
}

/// Delivery counters of one alert sink.
#[derive(Debug, Clone, Default, Serialize)]
pub struct SinkCounts {
    pub name: String,
    pub sent: u64,
    pub failed: u64,
    pub dropped: u64,
    pub queued: u64,
}

/// Everything the agent reports about itself (stats file and metrics).
#[derive(Debug, Clone, Default, Serialize)]
pub struct AgentSnapshot {
    pub pipeline: PipelineStats,
    pub drops: BTreeMap<&'static str, u64>,
    /// Records the probes counted instead of sending (repeats past their budget, DNS
    /// answers nobody asked for…), by reason.
    pub suppressed: BTreeMap<&'static str, u64>,
    /// Cgroups whose secret opens went over their per-second budget, worst first.
    pub cgroups_over_budget: Vec<BudgetOverrun>,
    pub ring_decode_errors: u64,
    pub unmatched_dir_opens: u64,
    pub secret_non_reads: u64,
    pub dns_unparsed: u64,
    pub inventory_secrets: usize,
    pub watched_dirs: usize,
    /// Secrets and watched directories the kernel maps could not take: reads of them are not
    /// seen until there is room.
    pub inventory_unwatched: usize,
    /// What inventory scans left out (caps, FIFOs and devices, foreign symlinks).
    pub inventory_scan: crate::inventory::ScanStats,
    /// Watched-directory rescans (each on the scanner thread), ever.
    pub inventory_dir_rescans: u64,
    /// Secret reads that waited for their directory's rescan, and those that stopped
    /// waiting before it finished (timeout, full hold queue).
    pub reads_held: u64,
    pub reads_held_released_early: u64,
    pub processes: usize,
    /// Live processes evicted from a full process table (fork floods), ever.
    pub processes_dropped: u64,
    /// cgroup ids that resolved to no cgroup (lookups, ever).
    pub cgroups_unresolved: u64,
    pub pods: usize,
    pub sinks: Vec<SinkCounts>,
    pub ring_size_bytes: u64,
    /// Largest backlog one drain found in the last minute.
    pub ring_peak_bytes: u64,
    /// The ring secret opens and process-memory reads have to themselves.
    pub secret_ring_size_bytes: u64,
    pub secret_ring_peak_bytes: u64,
    /// What sees opens (`file_open` or `syscalls`), chosen at start.
    pub open_hook: &'static str,
}

#[derive(Debug, Clone, Serialize)]
pub struct BudgetOverrun {
    pub cgroup_id: u64,
    /// Opens counted but not sent since the agent started.
    pub opens: u64,
}

#[derive(Debug, Default)]
struct Shared {
    snapshot: Option<AgentSnapshot>,
    published: Option<Instant>,
}

/// The agent's side: publish snapshots; the server's side: encode them.
#[derive(Debug, Clone, Default)]
pub struct Metrics {
    shared: Arc<Mutex<Shared>>,
}

/// A snapshot older than this means the agent's loop is stuck: `/healthz` says so.
const STALE: Duration = Duration::from_secs(10);

impl Metrics {
    pub fn publish(&self, s: AgentSnapshot) {
        if let Ok(mut g) = self.shared.lock() {
            g.snapshot = Some(s);
            g.published = Some(Instant::now());
        }
    }

    fn healthy(&self) -> bool {
        self.shared
            .lock()
            .ok()
            .and_then(|g| g.published)
            .is_some_and(|t| t.elapsed() < STALE)
    }

    /// OpenMetrics text of the latest snapshot.
    pub fn render(&self) -> String {
        let mut registry = Registry::default();
        registry.register_collector(Box::new(self.clone()));
        let mut out = String::new();
        if let Err(e) = prometheus_client::encoding::text::encode(&mut out, &registry) {
            warn!("encoding metrics: {e}");
        }
        out
    }
}

fn counter(
    enc: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    label: &str,
    values: impl IntoIterator<Item = (String, u64)>,
) -> std::fmt::Result {
    let c = ConstCounter::new(0u64);
    let mut fam = enc.encode_descriptor(name, help, None, c.metric_type())?;
    for (k, v) in values {
        let labels = [(label.to_owned(), k)];
        ConstCounter::new(v).encode(fam.encode_family(&labels)?)?;
    }
    Ok(())
}

fn counter1(enc: &mut DescriptorEncoder, name: &str, help: &str, v: u64) -> std::fmt::Result {
    let c = ConstCounter::new(v);
    c.encode(enc.encode_descriptor(name, help, None, c.metric_type())?)
}

fn gauge(enc: &mut DescriptorEncoder, name: &str, help: &str, v: i64) -> std::fmt::Result {
    let g = ConstGauge::new(v);
    g.encode(enc.encode_descriptor(name, help, None, g.metric_type())?)
}

impl Collector for Metrics {
    fn encode(&self, mut enc: DescriptorEncoder) -> std::fmt::Result {
        let Some(s) = self.shared.lock().ok().and_then(|g| g.snapshot.clone()) else {
            return Ok(());
        };
        let e = &mut enc;
        counter(
            e,
            "credwatch_events",
            "Events through the pipeline, by kind.",
            "kind",
            s.pipeline.events.iter().map(|(k, v)| (k.to_string(), *v)),
        )?;
        counter(
            e,
            "credwatch_alerts",
            "Alert lines emitted (new and count updates), by rule.",
            "alert",
            s.pipeline.alerts.iter().map(|(k, v)| (k.to_string(), *v)),
        )?;
        counter(
            e,
            "credwatch_probe_drops",
            "Probe records lost because the ring buffer was full, by probe.",
            "probe",
            s.drops.iter().map(|(k, v)| (k.to_string(), *v)),
        )?;
        counter(
            e,
            "credwatch_probe_suppressed",
            "Records the probes counted instead of sending, by reason.",
            "reason",
            s.suppressed.iter().map(|(k, v)| (k.to_string(), *v)),
        )?;
        counter1(
            e,
            "credwatch_alerts_allowlisted",
            "Findings silenced by [[allow]] entries.",
            s.pipeline.alerts_allowlisted,
        )?;
        counter1(
            e,
            "credwatch_ring_decode_errors",
            "Ring buffer records that could not be decoded.",
            s.ring_decode_errors,
        )?;
        counter1(
            e,
            "credwatch_output_write_failures",
            "Event/alert lines the local outputs could not write (full disk, closed pipe).",
            s.pipeline.events_write_failures + s.pipeline.alerts_write_failures,
        )?;
        gauge(
            e,
            "credwatch_ring_size_bytes",
            "Size of the probes' ring buffer.",
            s.ring_size_bytes as i64,
        )?;
        gauge(
            e,
            "credwatch_ring_peak_bytes",
            "Largest backlog a drain found in the ring during the last minute (drops start \
             when it reaches the ring size).",
            s.ring_peak_bytes as i64,
        )?;
        gauge(
            e,
            "credwatch_secret_ring_size_bytes",
            "Size of the ring secret opens have to themselves.",
            s.secret_ring_size_bytes as i64,
        )?;
        gauge(
            e,
            "credwatch_secret_ring_peak_bytes",
            "Largest backlog a drain found in the secrets ring during the last minute.",
            s.secret_ring_peak_bytes as i64,
        )?;
        gauge(
            e,
            "credwatch_inventory_secrets",
            "Secret files known to the inventory.",
            s.inventory_secrets as i64,
        )?;
        gauge(
            e,
            "credwatch_watched_dirs",
            "Directories watched for new secrets.",
            s.watched_dirs as i64,
        )?;
        gauge(
            e,
            "credwatch_inventory_unwatched",
            "Secrets and watched directories the kernel maps could not take (their reads are \
             not seen).",
            s.inventory_unwatched as i64,
        )?;
        gauge(
            e,
            "credwatch_inventory_capped",
            "Secret files left out by the per-root, per-home and per-pod caps at the last scan.",
            (s.inventory_scan.capped_per_root
                + s.inventory_scan.capped_per_home
                + s.inventory_scan.capped_per_pod) as i64,
        )?;
        gauge(
            e,
            "credwatch_inventory_not_regular",
            "Names matching a secret glob that are not regular files (FIFOs, devices), skipped.",
            s.inventory_scan.not_regular as i64,
        )?;
        gauge(
            e,
            "credwatch_processes",
            "Processes tracked.",
            s.processes as i64,
        )?;
        counter1(
            e,
            "credwatch_processes_dropped",
            "Live processes evicted from a full process table.",
            s.processes_dropped,
        )?;
        gauge(
            e,
            "credwatch_pods",
            "Pods known from the kubelet.",
            s.pods as i64,
        )?;
        gauge(
            e,
            "credwatch_baselines",
            "Learned (workload, credential) profiles.",
            s.pipeline.baselines as i64,
        )?;
        let sink = |f: fn(&SinkCounts) -> u64| {
            s.sinks
                .iter()
                .map(move |c| (c.name.clone(), f(c)))
                .collect::<Vec<_>>()
        };
        counter(
            e,
            "credwatch_sink_sent",
            "Alerts delivered, by sink.",
            "sink",
            sink(|c| c.sent),
        )?;
        counter(
            e,
            "credwatch_sink_failures",
            "Failed delivery attempts, by sink.",
            "sink",
            sink(|c| c.failed),
        )?;
        counter(
            e,
            "credwatch_sink_dropped",
            "Alerts a sink gave up on (queue full or retries exhausted), by sink.",
            "sink",
            sink(|c| c.dropped),
        )?;
        {
            let g = ConstGauge::new(0i64);
            let mut fam = e.encode_descriptor(
                "credwatch_sink_queue_depth",
                "Alerts waiting for a sink.",
                None,
                g.metric_type(),
            )?;
            for c in &s.sinks {
                let labels = [("sink".to_owned(), c.name.clone())];
                ConstGauge::new(c.queued as i64).encode(fam.encode_family(&labels)?)?;
            }
        }
        {
            let g = ConstGauge::new(1i64);
            let mut fam = e.encode_descriptor(
                "credwatch_open_hook",
                "1 for the hook set that sees opens (file_open: fexit on security_file_open; \
                 syscalls: the open syscalls' tracepoints).",
                None,
                g.metric_type(),
            )?;
            let labels = [("hook".to_owned(), s.open_hook.to_owned())];
            g.encode(fam.encode_family(&labels)?)?;
        }
        if let Some(ch) = &s.pipeline.clickhouse {
            clickhouse_metrics(e, ch)?;
        }
        Ok(())
    }
}

fn clickhouse_metrics(e: &mut DescriptorEncoder, ch: &WriterCounts) -> std::fmt::Result {
    counter1(
        e,
        "credwatch_clickhouse_rows_written",
        "Rows ClickHouse acknowledged.",
        ch.rows_written,
    )?;
    counter1(
        e,
        "credwatch_clickhouse_insert_failures",
        "Inserts ClickHouse did not acknowledge (the batch went to the spool).",
        ch.insert_failures,
    )?;
    counter1(
        e,
        "credwatch_clickhouse_rows_dropped",
        "Event rows lost: writer queue full or spool full.",
        ch.rows_dropped,
    )?;
    counter1(
        e,
        "credwatch_clickhouse_alert_rows_dropped",
        "Alert rows lost (past the alert queue and backlog, or a failing spool write).",
        ch.alert_rows_dropped,
    )?;
    counter1(
        e,
        "credwatch_clickhouse_batches_quarantined",
        "Batches ClickHouse refused for good (or unreadable spool files), set aside in \
         <state dir>/spool/quarantine.",
        ch.batches_quarantined,
    )?;
    counter1(
        e,
        "credwatch_clickhouse_rows_quarantined",
        "Rows of quarantined batches.",
        ch.rows_quarantined,
    )?;
    gauge(
        e,
        "credwatch_clickhouse_spool_batches",
        "Batches waiting on disk for ClickHouse.",
        ch.spool_batches as i64,
    )?;
    gauge(
        e,
        "credwatch_clickhouse_spool_bytes",
        "Bytes waiting on disk for ClickHouse.",
        ch.spool_bytes as i64,
    )?;
    gauge(
        e,
        "credwatch_clickhouse_lag_seconds",
        "Age of the oldest batch not yet in ClickHouse (0 when caught up).",
        ch.lag_seconds as i64,
    )
}

async fn answer(
    m: Metrics,
    req: Request<hyper::body::Incoming>,
) -> Result<Response<Full<Bytes>>, std::convert::Infallible> {
    let (status, ctype, body) = match req.uri().path() {
        "/metrics" => (
            200,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
            m.render(),
        ),
        "/healthz" if m.healthy() => (200, "text/plain", "ok\n".to_owned()),
        "/healthz" => (503, "text/plain", "agent loop stalled\n".to_owned()),
        _ => (404, "text/plain", "not found\n".to_owned()),
    };
    let resp = Response::builder()
        .status(status)
        .header("content-type", ctype)
        .body(Full::new(Bytes::from(body)));
    Ok(resp.unwrap_or_else(|_| Response::new(Full::new(Bytes::new()))))
}

/// A scrape's request head must arrive within this…
const HEADER_TIMEOUT: Duration = Duration::from_secs(5);
/// …and a connection may live this long (keep-alive included).
const CONNECTION_TIMEOUT: Duration = Duration::from_secs(30);
/// Connections served at once; more wait in the listen backlog.
const MAX_CONNECTIONS: usize = 64;

/// Binds `addr` now (so a taken port is a start-up error) and serves on a thread of its
/// own: a slow or hostile client (headers never finished, connections held open) cannot
/// stall the agent's loop, and each connection is bounded in time and number.
pub async fn serve(addr: SocketAddr, m: Metrics) -> Result<SocketAddr> {
    let listener = std::net::TcpListener::bind(addr)
        .with_context(|| format!("binding metrics listener {addr}"))?;
    listener.set_nonblocking(true)?;
    let bound = listener.local_addr()?;
    crate::spawn_runtime_thread("metrics", async move {
        let listener = match tokio::net::TcpListener::from_std(listener) {
            Ok(l) => l,
            Err(e) => {
                warn!("metrics listener: {e}");
                return;
            }
        };
        accept_loop(listener, m).await;
    })
    .context("starting the metrics thread")?;
    Ok(bound)
}

async fn accept_loop(listener: tokio::net::TcpListener, m: Metrics) {
    let slots = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
    loop {
        let Ok(permit) = slots.clone().acquire_owned().await else {
            return;
        };
        let (stream, peer) = match listener.accept().await {
            Ok(x) => x,
            Err(e) => {
                warn!("metrics accept: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let m = m.clone();
        tokio::spawn(async move {
            let _permit = permit;
            let svc = service_fn(move |req| answer(m.clone(), req));
            let conn = hyper::server::conn::http1::Builder::new()
                .timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(HEADER_TIMEOUT)
                .max_buf_size(16 << 10)
                .serve_connection(TokioIo::new(stream), svc);
            match tokio::time::timeout(CONNECTION_TIMEOUT, conn).await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => debug!(%peer, "metrics connection: {e}"),
                Err(_) => debug!(%peer, "metrics connection closed after {CONNECTION_TIMEOUT:?}"),
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use std::io::{Read, Write};

    use super::*;

    fn get(addr: SocketAddr, timeout: Duration) -> std::io::Result<String> {
        let mut c = std::net::TcpStream::connect_timeout(&addr, timeout)?;
        c.set_read_timeout(Some(timeout))?;
        c.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")?;
        let mut out = String::new();
        c.read_to_string(&mut out)?;
        Ok(out)
    }

    /// The agent's loop is busy (here: blocked outright) and a scrape is still answered:
    /// the listener no longer shares the loop's runtime.
    #[test]
    fn metrics_answer_while_the_loop_is_busy() {
        let rt = crate::current_thread_runtime().unwrap();
        let m = Metrics::default();
        m.publish(AgentSnapshot::default());
        let addr = rt
            .block_on(serve("127.0.0.1:0".parse().unwrap(), m))
            .unwrap();
        let scrape = std::thread::spawn(move || get(addr, Duration::from_secs(2)));
        // The loop's thread does not come back to its runtime for 3 s.
        rt.block_on(async { std::thread::sleep(Duration::from_secs(3)) });
        let body = scrape
            .join()
            .unwrap()
            .expect("answered while the loop was busy");
        assert!(body.starts_with("HTTP/1.1 200"), "{body}");
    }

    /// A client that never finishes its request head is cut off after the header timeout
    /// (before, it held the connection, and its task, forever).
    #[test]
    fn a_request_head_that_never_ends_is_cut_off() {
        let rt = crate::current_thread_runtime().unwrap();
        let addr = rt
            .block_on(serve("127.0.0.1:0".parse().unwrap(), Metrics::default()))
            .unwrap();
        let mut c = std::net::TcpStream::connect(addr).unwrap();
        c.write_all(b"GET /metrics HTTP/1.1\r\nX-Slow: ").unwrap();
        c.set_read_timeout(Some(HEADER_TIMEOUT * 3)).unwrap();
        let t = std::time::Instant::now();
        let mut buf = Vec::new();
        let r = c.read_to_end(&mut buf);
        let waited = t.elapsed();
        assert!(r.is_ok(), "closed by the server, not timed out here: {r:?}");
        assert!(
            waited < HEADER_TIMEOUT * 2,
            "closed after {waited:?} ({} bytes)",
            buf.len()
        );
        // Still serving.
        assert!(
            get(addr, Duration::from_secs(2))
                .unwrap()
                .starts_with("HTTP/1.1")
        );
    }
}
