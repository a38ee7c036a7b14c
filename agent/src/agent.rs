//! `credwatch run`: the live agent. One task owns every stage; the ring buffer is drained
//! on the probes' wake-ups and on a short timer, so no per-event wake-up is needed.

use std::{path::PathBuf, sync::Arc, time::Duration};

use anyhow::{Context, Result};
use aya::maps::{MapData, RingBuf};
use credwatch_common::Probe;
use tokio::{
    io::{Interest, unix::AsyncFd},
    signal::unix::{SignalKind, signal},
    sync::{Notify, watch},
};
use tracing::{debug, error, info, warn};

use crate::{
    config::Config,
    credential::Fingerprinter,
    decode::decode,
    enrich::{Enricher, IdGen},
    event::Event,
    inventory::Inventory,
    kubelet::{KubeletClient, PodDirectory},
    metrics::{AgentSnapshot, Metrics},
    pipeline::{NdjsonSink, Pipeline, PipelineBuilder},
    probes::{Drops, RingFill, SensorOptions, Sensors},
    process::ProcessTable,
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

pub async fn run(cfg: Config, opts: RunOptions) -> Result<()> {
    crate::state::private_umask();
    crate::state::ensure_dir(&opts.state_dir)?;
    let fp = Fingerprinter::new(&cfg.fingerprint.load_key(&opts.state_dir)?);
    let mut inventory = Inventory::from_config(&cfg.secrets, &cfg.kubernetes.kubelet_root, fp)?;
    inventory.rescan();

    let mut sensors = Sensors::load(&SensorOptions::from_config(&cfg.sensors))?;
    let synced =
        sensors.sync_inodes(&inventory.file_keys_ranked(), &inventory.dir_keys_ranked())?;
    report_kernel_sync(&synced, 0);
    // Attached: keep only what the loop needs, before any other thread exists (threads
    // copy their creator's capabilities).
    crate::privileges::drop_after_attach()?;
    // From here on scans run off the loop; the loop applies their results.
    inventory.scan_in_background()?;
    let ring = sensors.take_ring().context("ring buffer already taken")?;
    // SAFETY: the RingBuf owns its map fd for its whole life and always returns the same fd.
    let mut ring = unsafe { AsyncFd::register_with_interest(ring, Interest::READABLE) }
        .map_err(|e| anyhow::anyhow!("polling the ring buffer: {}", e.into_parts().1))?;

    let mut pipeline = PipelineBuilder::new(&cfg)
        .state_dir(Some(&opts.state_dir))
        .alerts_to(NdjsonSink::open(&opts.alerts)?);
    if let Some(path) = &opts.events {
        pipeline = pipeline.events_to(NdjsonSink::open(path)?);
    }
    let pipeline = pipeline.build()?;

    let metrics = Metrics::default();
    if let Some(addr) = cfg.metrics.listen_addr()? {
        match crate::metrics::serve(addr, metrics.clone()).await {
            Ok(bound) => info!("metrics on http://{bound}/metrics"),
            // Monitoring without metrics beats no monitoring; /healthz probes will say so.
            Err(e) => warn!("{e:#}; running without /metrics"),
        }
    }

    let mut enricher = Enricher::new(
        cfg.node_name().into(),
        inventory,
        WorkloadResolver::from_config(sensors.cgroup2_root.clone(), &cfg.kubernetes)?,
        // ~370 B a process: 131 072 live processes are ~47 MiB; past it live processes are
        // evicted (and read from /proc again when they show up), never a panic.
        ProcessTable::new("/proc", 1 << 17),
    );
    enricher.set_kernel_left_out(synced.left_out());
    let ring_fill = match RingFill::new(std::os::fd::AsFd::as_fd(ring.get_ref())) {
        Ok(f) => Some(f),
        Err(e) => {
            warn!("{e:#}; ring fill not reported");
            None
        }
    };
    let mut agent = Agent {
        enricher,
        pipeline,
        sensors,
        ids: IdGen::new(),
        batch: Vec::with_capacity(256),
        decode_errors: 0,
        ring_peak: 0,
        ring_size: u64::from(cfg.sensors.ring_bytes),
        ring_fill,
        drops: Drops::default(),
        stats_file: opts.stats_file.clone(),
    };
    // After attaching: processes started from here on are seen by the probes.
    let procs = agent.enricher.bootstrap_processes();
    debug!(processes = procs, "process table loaded from /proc");
    let mut pods_rx = agent.watch_pods(&cfg.kubernetes).await?;

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

    let counts = agent.enricher.counts();
    info!(
        secrets = counts.inventory_secrets,
        watched_dirs = counts.watched_dirs,
        programs = agent.sensors.attached.len(),
        "credwatch ready"
    );

    loop {
        tokio::select! {
            guard = ring.readable_mut() => {
                let mut guard = guard.context("ring buffer poll")?;
                agent.drain(guard.get_inner_mut());
                guard.clear_ready();
            }
            _ = drain_tick.tick() => {
                agent.drain(ring.get_mut());
                agent.pipeline.flush();
            }
            _ = rescan_tick.tick() => {
                // Records already in the ring refer to the inventory as it was.
                agent.drain(ring.get_mut());
                agent.enricher.rescan();
            }
            _ = stats_tick.tick() => agent.every_second(&metrics),
            Some(dir) = next_pods(&mut pods_rx) => agent.enricher.set_pods(dir),
            _ = sigterm.recv() => break,
            _ = sigint.recv() => break,
        }
        agent.sync_kernel_maps();
    }
    agent.shutdown(ring.get_mut());
    Ok(())
}

/// The next pod list, or never when there is no kubelet to ask.
async fn next_pods(rx: &mut Option<watch::Receiver<PodDirectory>>) -> Option<PodDirectory> {
    match rx {
        Some(rx) => match rx.changed().await {
            Ok(()) => Some(rx.borrow_and_update().clone()),
            Err(_) => std::future::pending().await,
        },
        None => std::future::pending().await,
    }
}

/// Keeps the pod list fresh: every `every`, and at most once a second when a pod uid was
/// missing from it (a pod newer than the last list).
async fn refresh_pods(
    client: KubeletClient,
    every: Duration,
    miss: Arc<Notify>,
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
struct Agent {
    enricher: Enricher,
    pipeline: Pipeline,
    sensors: Sensors,
    ids: IdGen,
    batch: Vec<Event>,
    decode_errors: u64,
    /// Largest backlog (bytes waiting) a drain found since the last snapshot: how close
    /// the ring came to dropping.
    ring_peak: u64,
    ring_size: u64,
    ring_fill: Option<RingFill>,
    /// Drop counters as last read.
    drops: Drops,
    stats_file: Option<PathBuf>,
}

impl Agent {
    /// With a kubelet configured: the first pod list (so the first events already carry
    /// pod names), then a task that keeps it fresh.
    async fn watch_pods(
        &mut self,
        cfg: &crate::kubelet::Config,
    ) -> Result<Option<watch::Receiver<PodDirectory>>> {
        let Some(url) = cfg.url() else {
            return Ok(None);
        };
        let client = KubeletClient::from_config(&url, cfg)?;
        match tokio::time::timeout(Duration::from_secs(5), client.fetch()).await {
            Ok(Ok(dir)) => self.enricher.set_pods(dir),
            Ok(Err(e)) => {
                warn!("kubelet pod list unavailable, pods are named by uid until it returns: {e:#}")
            }
            Err(_) => warn!("kubelet pod list timed out; pods are named by uid until it returns"),
        }
        let miss = Arc::new(Notify::new());
        self.enricher.on_pod_miss(miss.clone());
        let (tx, rx) = watch::channel(PodDirectory::default());
        tokio::spawn(refresh_pods(client, cfg.refresh_interval, miss, tx));
        Ok(Some(rx))
    }

    fn drain(&mut self, ring: &mut RingBuf<MapData>) {
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

    /// Applies finished inventory scans: the kernel's inode maps follow, then the reads that
    /// waited for a directory rescan go through the pipeline.
    fn sync_kernel_maps(&mut self) {
        if self.enricher.take_inventory_change() {
            let inv = self.enricher.inventory();
            match self
                .sensors
                .sync_inodes(&inv.file_keys_ranked(), &inv.dir_keys_ranked())
            {
                Ok(r) => {
                    let before = self.enricher.set_kernel_left_out(r.left_out());
                    report_kernel_sync(&r, before);
                }
                Err(e) => error!("updating kernel inode maps: {e:#}"),
            }
        }
        self.enricher.release_held(&mut self.ids, &mut self.batch);
        for ev in self.batch.drain(..) {
            self.pipeline.handle(ev, &mut self.ids);
        }
    }

    /// Baselines to disk, clock and process table upkeep, drop warnings, stats and metrics.
    fn every_second(&mut self, metrics: &Metrics) {
        self.pipeline.checkpoint();
        self.enricher.tick();
        self.sensors.flush_probe_logs();
        match self.sensors.drops() {
            Ok(d) => {
                for p in Probe::ALL {
                    let (now, before) = (d[*p as usize], self.drops[*p as usize]);
                    if now > before {
                        warn!(
                            probe = p.name(),
                            dropped = now - before,
                            total = now,
                            "probe records dropped (ring buffer full)"
                        );
                    }
                }
                self.drops = d;
            }
            Err(e) => warn!("reading drop counters: {e}"),
        }
        let snap = self.snapshot();
        if let Some(path) = &self.stats_file {
            write_stats(path, &snap);
        }
        metrics.publish(snap);
        self.ring_peak = 0;
    }

    /// Flushes what the probes already produced, then every output.
    fn shutdown(mut self, ring: &mut RingBuf<MapData>) {
        self.drain(ring);
        self.enricher
            .release_all_held(&mut self.ids, &mut self.batch);
        for ev in self.batch.drain(..) {
            self.pipeline.handle(ev, &mut self.ids);
        }
        self.pipeline.finish();
        if let Ok(d) = self.sensors.drops() {
            self.drops = d;
        }
        if let Some(path) = &self.stats_file {
            write_stats(path, &self.snapshot());
        }
        let total_drops: u64 = self.drops.iter().sum();
        info!(events = ?self.pipeline.stats().events, drops = total_drops, "credwatch stopped");
    }

    fn snapshot(&self) -> AgentSnapshot {
        let c = self.enricher.counts();
        AgentSnapshot {
            pipeline: self.pipeline.stats(),
            drops: Probe::ALL
                .iter()
                .map(|p| (p.name(), self.drops[*p as usize]))
                .collect(),
            ring_decode_errors: self.decode_errors,
            unmatched_dir_opens: c.stats.unmatched_dir_opens,
            secret_non_reads: c.stats.secret_non_reads,
            dns_unparsed: c.stats.dns_unparsed,
            inventory_secrets: c.inventory_secrets,
            watched_dirs: c.watched_dirs,
            inventory_unwatched: c.inventory_unwatched,
            inventory_scan: c.inventory,
            inventory_dir_rescans: c.dir_rescans,
            reads_held: c.stats.reads_held,
            reads_held_released_early: c.stats.held_released_early,
            processes: c.processes,
            processes_dropped: c.processes_dropped,
            cgroups_unresolved: c.cgroups_unresolved,
            pods: c.pods,
            sinks: self.pipeline.outputs().sinks,
            ring_size_bytes: self.ring_size,
            ring_peak_bytes: self.ring_peak,
        }
    }
}

/// Warns when the kernel maps could not take the whole inventory (and when that changes).
fn report_kernel_sync(r: &crate::probes::SyncReport, before: usize) {
    let left_out = r.left_out();
    if let Some(e) = &r.insert_error {
        error!("updating kernel inode maps: {e}");
    }
    if left_out > 0 && left_out != before {
        warn!(
            secrets = r.files_wanted,
            in_kernel = r.files_in_map,
            capacity = r.file_capacity,
            dirs = r.dirs_wanted,
            dirs_in_kernel = r.dirs_in_map,
            dir_capacity = r.dir_capacity,
            left_out,
            "kernel inode maps full: the least trusted secrets (home directories first) are \
             not watched"
        );
    } else if left_out == 0 && before > 0 {
        info!("kernel inode maps hold the whole inventory again");
    }
}

fn write_stats(path: &std::path::Path, stats: &AgentSnapshot) {
    let res = serde_json::to_vec_pretty(stats)
        .map_err(anyhow::Error::from)
        .and_then(|b| crate::state::replace(path, &b, false));
    if let Err(e) = res {
        warn!("writing stats file {}: {e:#}", path.display());
    }
}
