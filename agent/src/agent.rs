//! `credwatch run`: the live agent. One task owns every stage; the ring buffer is drained
//! on the probes' wake-ups and on a short timer, so no per-event wake-up is needed.

use std::{
    fs,
    io::Write,
    os::unix::fs::{OpenOptionsExt, PermissionsExt},
    path::{Path, PathBuf},
    time::Duration,
};

use anyhow::{Context, Result, bail};
use credwatch_common::PROBE_NAMES;
use tokio::{
    io::{Interest, unix::AsyncFd},
    signal::unix::{SignalKind, signal},
    sync::watch,
};
use tracing::{debug, error, info, warn};

use crate::{
    baseline::Baselines,
    clickhouse::ClickHouseSink,
    config::Config,
    correlate::Correlator,
    credential::Fingerprinter,
    decode::decode,
    detect::Detectors,
    dns::NameCache,
    enrich::{BootClock, EnrichStats, Enricher, IdGen},
    inventory::Inventory,
    kubelet::{KubeletClient, PodDirectory},
    metrics::{AgentSnapshot, Metrics},
    pipeline::{NdjsonSink, Pipeline},
    probes::{SensorOptions, Sensors},
    process::ProcessTable,
    sinks::AlertSinks,
    workload::WorkloadResolver,
};

#[derive(Clone, Debug)]
pub struct RunOptions {
    pub state_dir: PathBuf,
    /// `--events FILE` (`-` for stdout).
    pub events: Option<PathBuf>,
    /// Counters (events, drops) written here periodically and at exit.
    pub stats_file: Option<PathBuf>,
    /// Alerts as JSON lines (`-` for stdout, the default).
    pub alerts: PathBuf,
}

/// The fingerprint key: from config, else a per-node key generated once under the state dir
/// (fingerprints then compare across restarts but not across nodes).
pub fn fingerprint_key(cfg: &Config, state_dir: &Path) -> Result<Vec<u8>> {
    if let Some(path) = &cfg.fingerprint.key_file {
        let key = fs::read(path).with_context(|| format!("reading fingerprint.key_file {path}"))?;
        if key.len() < 16 {
            bail!(
                "fingerprint.key_file {path} holds {} bytes; use at least 16",
                key.len()
            );
        }
        return Ok(key);
    }
    if let Some(k) = &cfg.fingerprint.key {
        return Ok(k.as_bytes().to_vec());
    }
    let path = state_dir.join("fingerprint.key");
    if let Ok(k) = fs::read(&path) {
        return Ok(k);
    }
    let mut key = [0u8; 32];
    getrandom::fill(&mut key).map_err(|e| anyhow::anyhow!("generating fingerprint key: {e}"))?;
    let mut f = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&path)
        .with_context(|| format!("creating {}", path.display()))?;
    f.write_all(&key)
        .with_context(|| format!("writing {}", path.display()))?;
    Ok(key.to_vec())
}

/// `CREDWATCH_NODE` (a DaemonSet passes `spec.nodeName` there), else `node` from the
/// config, else the host name.
pub fn node_name(cfg: &Config) -> String {
    if let Ok(n) = std::env::var("CREDWATCH_NODE")
        && !n.trim().is_empty()
    {
        return n.trim().to_owned();
    }
    if let Some(n) = &cfg.node {
        return n.clone();
    }
    fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_owned())
        .unwrap_or_else(|_| "unknown".into())
}

fn ensure_state_dir(dir: &Path) -> Result<()> {
    fs::create_dir_all(dir).with_context(|| format!("creating state dir {}", dir.display()))?;
    let _ = fs::set_permissions(dir, fs::Permissions::from_mode(0o700));
    Ok(())
}

pub fn inventory_from_config(cfg: &Config, fp: Fingerprinter) -> Result<Inventory> {
    let paths: Vec<String> = cfg
        .secrets
        .paths
        .iter()
        .map(|p| p.get_ref().clone())
        .collect();
    let dirs: Vec<String> = cfg
        .secrets
        .watch_dirs
        .iter()
        .map(|p| p.get_ref().clone())
        .collect();
    let host_root = std::env::var_os("CREDWATCH_HOST_ROOT")
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
        .or_else(|| cfg.secrets.host_root.as_ref().map(PathBuf::from));
    Ok(Inventory::new(
        &paths,
        cfg.secrets.catalog,
        &dirs,
        &cfg.kubernetes.kubelet_root,
        cfg.secrets.max_read_bytes,
        fp,
    )?
    .with_host_root(host_root))
}

pub async fn run(cfg: Config, opts: RunOptions) -> Result<()> {
    ensure_state_dir(&opts.state_dir)?;
    let fp = Fingerprinter::new(&fingerprint_key(&cfg, &opts.state_dir)?);
    let mut inventory = inventory_from_config(&cfg, fp)?;
    inventory.rescan();

    let mut sensors = Sensors::load(&SensorOptions {
        ring_bytes: cfg.sensors.ring_bytes,
        wake_bytes: cfg.sensors.wake_bytes,
        ..SensorOptions::default()
    })?;
    sensors.sync_inodes(&inventory.file_keys(), &inventory.dir_keys())?;
    let ring = sensors.take_ring().context("ring buffer already taken")?;
    // SAFETY: the RingBuf owns its map fd for its whole life and always returns the same fd.
    let mut ring = unsafe { AsyncFd::register_with_interest(ring, Interest::READABLE) }
        .map_err(|e| anyhow::anyhow!("polling the ring buffer: {}", e.into_parts().1))?;

    let events = opts.events.as_deref().map(NdjsonSink::open).transpose()?;
    let alerts = NdjsonSink::open(&opts.alerts)?;
    let clickhouse = match &cfg.clickhouse {
        Some(ch) => {
            if ch.migrate_on_start {
                match crate::clickhouse::migrate(ch).await {
                    Ok(v) => info!(version = v, "ClickHouse schema ready"),
                    // Unreachable now is fine: batches wait in the spool.
                    Err(e) => warn!("ClickHouse schema not applied: {e:#}"),
                }
            }
            Some(ClickHouseSink::start(
                ch,
                &node_name(&cfg),
                &opts.state_dir,
                false,
            )?)
        }
        None => None,
    };
    let mut pipeline = Pipeline::new(
        Correlator::new(cfg.correlate.window),
        Detectors::new(
            &cfg.detect.options(),
            cfg.policy()?,
            Baselines::open(
                &opts.state_dir,
                cfg.detect.learning_period,
                cfg.detect.max_baselines,
            )?,
        ),
        events,
        Some(alerts),
    );
    if let Some(ch) = clickhouse {
        pipeline = pipeline.with_clickhouse(ch);
    }
    let pipeline = pipeline.with_sinks(
        AlertSinks::start(&cfg.alerts, &node_name(&cfg))?,
        cfg.alerts.format,
    );
    let metrics = Metrics::default();
    if !cfg.metrics.listen.is_empty() {
        let addr = cfg.metrics.listen.parse()?;
        match crate::metrics::serve(addr, metrics.clone()).await {
            Ok(bound) => info!("metrics on http://{bound}/metrics"),
            // Monitoring without metrics beats no monitoring; /healthz probes will say so.
            Err(e) => warn!("{e:#}; running without /metrics"),
        }
    }
    let ids = IdGen::new();
    let mut enricher = Enricher {
        node: node_name(&cfg).into(),
        clock: BootClock::now(),
        procs: ProcessTable::new("/proc", 1 << 20),
        workloads: WorkloadResolver::new(
            sensors.cgroup2_root.clone(),
            &cfg.kubernetes.trust_domain,
        ),
        pods: PodDirectory::default(),
        names: NameCache::new(1 << 16),
        inventory,
        inventory_dirty: false,
        pod_miss: None,
        stats: EnrichStats::default(),
        owners: Default::default(),
    };

    // After attaching: processes started from here on are seen by the probes.
    let procs = enricher.procs.bootstrap();
    debug!(processes = procs, "process table loaded from /proc");
    let mut live = Live {
        enricher,
        pipeline,
        ids,
        batch: Vec::with_capacity(256),
        decode_errors: 0,
        ring_peak: 0,
        ring_size: u64::from(cfg.sensors.ring_bytes),
        ring_fill: match crate::probes::RingFill::new(std::os::fd::AsFd::as_fd(ring.get_ref())) {
            Ok(f) => Some(f),
            Err(e) => {
                warn!("{e:#}; ring fill not reported");
                None
            }
        },
    };

    let (pods_tx, mut pods_rx) = watch::channel(PodDirectory::default());
    // A DaemonSet without host networking reaches its kubelet at the node IP, which only the
    // pod's environment knows (`status.hostIP`).
    let kubelet_url = std::env::var("CREDWATCH_KUBELET_URL")
        .ok()
        .filter(|u| !u.trim().is_empty())
        .or_else(|| cfg.kubernetes.kubelet_url.clone());
    if let Some(url) = &kubelet_url {
        let client = KubeletClient::new(
            url,
            cfg.kubernetes.token_path.clone(),
            cfg.kubernetes.ca_file.as_deref(),
            cfg.kubernetes.insecure_skip_tls_verify,
        )?;
        // First list before "ready", so the first events already carry pod names.
        match tokio::time::timeout(Duration::from_secs(5), client.fetch()).await {
            Ok(Ok(dir)) => live.enricher.pods = dir,
            Ok(Err(e)) => {
                warn!("kubelet pod list unavailable, pods are named by uid until it returns: {e:#}")
            }
            Err(_) => warn!("kubelet pod list timed out; pods are named by uid until it returns"),
        }
        let miss = std::sync::Arc::new(tokio::sync::Notify::new());
        live.enricher.pod_miss = Some(miss.clone());
        tokio::spawn(refresh_pods(
            client,
            cfg.kubernetes.refresh_interval,
            miss,
            pods_tx,
        ));
    }

    let mut sigterm = signal(SignalKind::terminate()).context("installing SIGTERM handler")?;
    let mut sigint = signal(SignalKind::interrupt()).context("installing SIGINT handler")?;
    let mut drain_tick = tokio::time::interval(cfg.sensors.drain_interval);
    // The inventory was scanned just before attaching: the first periodic rescan is one
    // period from now, not immediately.
    let mut rescan_tick = tokio::time::interval_at(
        tokio::time::Instant::now() + cfg.secrets.rescan_interval,
        cfg.secrets.rescan_interval,
    );
    let mut stats_tick = tokio::time::interval(Duration::from_secs(1));
    let mut last_drops = [0u64; PROBE_NAMES.len()];

    info!(
        secrets = live.enricher.inventory.len(),
        watched_dirs = live.enricher.inventory.dir_keys().len(),
        programs = sensors.attached.len(),
        "credwatch ready"
    );

    loop {
        tokio::select! {
            guard = ring.readable_mut() => {
                let mut guard = guard.context("ring buffer poll")?;
                live.drain(guard.get_inner_mut());
                guard.clear_ready();
            }
            _ = drain_tick.tick() => {
                live.drain(ring.get_mut());
                live.pipeline.flush();
            }
            _ = rescan_tick.tick() => {
                // Records already in the ring refer to the inventory as it was.
                live.drain(ring.get_mut());
                if live.enricher.inventory.rescan() {
                    live.enricher.inventory_dirty = true;
                }
            }
            _ = stats_tick.tick() => {
                live.pipeline.checkpoint();
                live.enricher.clock = BootClock::now();
                sensors.flush_probe_logs();
                live.enricher.procs.evict_exited(BootClock::boot_now());
                match sensors.drops() {
                    Ok(d) => {
                        for (i, (now, before)) in d.iter().zip(last_drops.iter()).enumerate() {
                            if now > before {
                                warn!(probe = PROBE_NAMES[i], dropped = now - before, total = now, "probe records dropped (ring buffer full)");
                            }
                        }
                        last_drops = d;
                    }
                    Err(e) => warn!("reading drop counters: {e}"),
                }
                let snap = live.snapshot(last_drops);
                if let Some(path) = &opts.stats_file {
                    write_stats(path, &snap);
                }
                metrics.publish(snap);
                live.ring_peak = 0;
            }
            Ok(()) = pods_rx.changed() => {
                live.enricher.pods = pods_rx.borrow_and_update().clone();
            }
            _ = sigterm.recv() => break,
            _ = sigint.recv() => break,
        }
        if live.enricher.inventory_dirty {
            live.enricher.inventory_dirty = false;
            if let Err(e) = sensors.sync_inodes(
                &live.enricher.inventory.file_keys(),
                &live.enricher.inventory.dir_keys(),
            ) {
                error!("updating kernel inode maps: {e:#}");
            }
        }
    }

    // Flush what the probes already produced before detaching.
    live.drain(ring.get_mut());
    live.pipeline.finish();
    let drops = sensors.drops().unwrap_or(last_drops);
    if let Some(path) = &opts.stats_file {
        write_stats(path, &live.snapshot(drops));
    }
    let total_drops: u64 = drops.iter().sum();
    info!(events = ?live.pipeline.stats().events, drops = total_drops, "credwatch stopped");
    Ok(())
}

/// Keeps the pod list fresh: every `every`, and at most once a second when a pod uid was
/// missing from it (a pod newer than the last list).
async fn refresh_pods(
    client: KubeletClient,
    every: Duration,
    miss: std::sync::Arc<tokio::sync::Notify>,
    tx: watch::Sender<PodDirectory>,
) {
    let mut failing = false;
    loop {
        tokio::select! {
            _ = tokio::time::sleep(every) => {}
            _ = miss.notified() => {}
        }
        match client.fetch().await {
            Ok(dir) => {
                failing = false;
                if tx.send(dir).is_err() {
                    return;
                }
            }
            Err(e) if !failing => {
                warn!(
                    "kubelet pod list unavailable, pods are named by uid until it returns: {e:#}"
                );
                failing = true;
            }
            Err(_) => {}
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

/// The stages a drained record goes through, owned by the run loop.
struct Live {
    enricher: Enricher,
    pipeline: Pipeline,
    ids: IdGen,
    batch: Vec<crate::event::Event>,
    decode_errors: u64,
    /// Largest backlog (bytes waiting) a drain found since the last snapshot: how close
    /// the ring came to dropping.
    ring_peak: u64,
    ring_size: u64,
    ring_fill: Option<crate::probes::RingFill>,
}

impl Live {
    fn drain(&mut self, ring: &mut aya::maps::RingBuf<aya::maps::MapData>) {
        if let Some(f) = &self.ring_fill {
            self.ring_peak = self.ring_peak.max(f.bytes());
        }
        while let Some(item) = ring.next() {
            let rec = decode(&item);
            drop(item);
            match rec {
                Ok(rec) => {
                    self.enricher.enrich(&rec, &mut self.ids, &mut self.batch);
                    for ev in self.batch.drain(..) {
                        self.pipeline.handle(ev, &mut self.ids);
                    }
                }
                Err(e) => {
                    self.decode_errors += 1;
                    if self.decode_errors == 1 {
                        error!("undecodable probe record: {e}");
                    }
                }
            }
        }
    }
}

impl Live {
    fn snapshot(&self, drops: [u64; PROBE_NAMES.len()]) -> AgentSnapshot {
        AgentSnapshot {
            pipeline: self.pipeline.stats(),
            drops: PROBE_NAMES.iter().copied().zip(drops).collect(),
            ring_decode_errors: self.decode_errors,
            unmatched_dir_opens: self.enricher.stats.unmatched_dir_opens,
            secret_non_reads: self.enricher.stats.secret_non_reads,
            dns_unparsed: self.enricher.stats.dns_unparsed,
            inventory_secrets: self.enricher.inventory.len(),
            watched_dirs: self.enricher.inventory.dir_keys().len(),
            processes: self.enricher.procs.len(),
            pods: self.enricher.pods.len(),
            sinks: self.pipeline.sink_counts(),
            ring_size_bytes: self.ring_size,
            ring_peak_bytes: self.ring_peak,
        }
    }
}

fn write_stats(path: &Path, stats: &AgentSnapshot) {
    // Write-then-rename so readers never see half a file.
    let tmp = path.with_extension("tmp");
    let res = serde_json::to_vec_pretty(stats)
        .map_err(std::io::Error::other)
        .and_then(|b| fs::write(&tmp, b))
        .and_then(|_| fs::rename(&tmp, path));
    if let Err(e) = res {
        warn!("writing stats file {}: {e}", path.display());
    }
}
