//! `credwatch run`: the live agent. One task owns every stage; the ring buffer is drained
//! on the probes' wake-ups and on a short timer, so no per-event wake-up is needed.

use std::{path::PathBuf, sync::Arc, time::Duration};

use anyhow::{Context, Result};
use aya::maps::{MapData, RingBuf};
use credwatch_common::{Probe, RepeatKey, Suppressed as SuppressedReason};
use tokio::{
    io::{Interest, unix::AsyncFd},
    signal::unix::{SignalKind, signal},
    sync::{Notify, watch},
};
use tracing::{debug, error, info, warn};

use crate::{
    config::Config,
    credential::Fingerprinter,
    decode::{Record, decode},
    enrich::{BootClock, Enricher, IdGen},
    event::{Event, duration_ns},
    inventory::Inventory,
    kubelet::{KubeletClient, PodDirectory},
    metrics::{AgentSnapshot, BudgetOverrun, Metrics},
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

pub async fn run(mut cfg: Config, opts: RunOptions) -> Result<()> {
    crate::state::private_umask();
    crate::state::ensure_dir(&opts.state_dir)?;
    let fp = Fingerprinter::new(&cfg.fingerprint.load_key(&opts.state_dir)?);
    let mut inventory =
        Inventory::from_config(&cfg.secrets, &cfg.kubernetes.kubelet_root, fp.clone())?;
    inventory.rescan();
    // Policy paths as the inventory names secrets: by where they really are.
    Arc::make_mut(&mut cfg.policy).add_real_locations(|path| inventory.real_path(path));

    let mut sensors = Sensors::load(&SensorOptions::from_config(&cfg.sensors))?;
    let synced =
        sensors.sync_inodes(&inventory.file_keys_ranked(), &inventory.dir_keys_ranked())?;
    report_kernel_sync(&synced, 0);
    // Attached: keep only what the loop needs, before any other thread exists (threads
    // copy their creator's capabilities).
    crate::privileges::drop_after_attach(sensors.may_attach_later())?;
    // From here on scans run off the loop; the loop applies their results.
    inventory.scan_in_background()?;
    let rings = sensors.take_rings().context("ring buffers already taken")?;
    // SAFETY: a RingBuf owns its map fd for its whole life and always returns the same fd.
    let register = |r, what: &str| {
        unsafe { AsyncFd::register_with_interest(r, Interest::READABLE) }
            .map_err(|e| anyhow::anyhow!("polling the {what} ring: {}", e.into_parts().1))
    };
    let mut secrets = register(rings.secrets, "secrets")?;
    let mut events = register(rings.events, "events")?;

    let mut pipeline = PipelineBuilder::new(&cfg)
        .state_dir(Some(&opts.state_dir))
        .resolvers(node_resolvers())
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
    )
    .with_cgroup2_root(sensors.cgroup2_root.clone());
    enricher.set_kernel_left_out(synced.left_out());
    let gauges = [
        RingGauge::new(secrets.get_ref(), cfg.sensors.secret_ring_bytes, "secrets"),
        RingGauge::new(events.get_ref(), cfg.sensors.ring_bytes, "events"),
    ];
    let mut agent = Agent {
        enricher,
        pipeline,
        sensors,
        fp,
        ids: IdGen::new(),
        batch: Vec::with_capacity(256),
        held: Vec::with_capacity(1024),
        repeat_interval_ns: duration_ns(cfg.sensors.repeat_interval) as u64,
        decode_errors: 0,
        gauges,
        drops: Drops::default(),
        suppressed: Default::default(),
        sweep_countdown: REPEAT_SWEEP_SECS,
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
            guard = secrets.readable_mut() => {
                let mut guard = guard.context("secrets ring poll")?;
                agent.collect(guard.get_inner_mut(), RING_SECRETS);
                guard.clear_ready();
                agent.process(false);
            }
            guard = events.readable_mut() => {
                let mut guard = guard.context("events ring poll")?;
                agent.collect(guard.get_inner_mut(), RING_EVENTS);
                guard.clear_ready();
                agent.process(false);
            }
            _ = drain_tick.tick() => {
                agent.collect(secrets.get_mut(), RING_SECRETS);
                agent.collect(events.get_mut(), RING_EVENTS);
                agent.process(false);
                agent.pipeline.flush();
            }
            _ = rescan_tick.tick() => {
                // Records already in the rings refer to the inventory as it was.
                agent.collect(secrets.get_mut(), RING_SECRETS);
                agent.collect(events.get_mut(), RING_EVENTS);
                agent.process(true);
                agent.enricher.rescan();
            }
            _ = stats_tick.tick() => agent.every_second(&metrics),
            Some(dir) = next_pods(&mut pods_rx) => agent.enricher.set_pods(dir),
            _ = sigterm.recv() => break,
            _ = sigint.recv() => break,
        }
        agent.sync_kernel_maps();
    }
    agent.collect(secrets.get_mut(), RING_SECRETS);
    agent.collect(events.get_mut(), RING_EVENTS);
    agent.shutdown();
    Ok(())
}

/// The nameservers of the node's resolv.conf (the host's, through pid 1, when the agent
/// runs in a container with the host's pid namespace).
fn node_resolvers() -> Vec<std::net::IpAddr> {
    let text = std::fs::read_to_string("/proc/1/root/etc/resolv.conf")
        .or_else(|_| std::fs::read_to_string("/etc/resolv.conf"))
        .unwrap_or_default();
    text.lines()
        .filter_map(|l| l.trim().strip_prefix("nameserver"))
        .filter_map(|a| a.trim().split('%').next()?.parse().ok())
        .take(16)
        .collect()
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
    /// Fingerprints what exec records expose (in decode).
    fp: Fingerprinter,
    ids: IdGen,
    batch: Vec<Event>,
    /// Records taken from both rings, processed in time order once old enough that an
    /// earlier record cannot still be on its way in the other ring.
    held: Vec<Record>,
    repeat_interval_ns: u64,
    decode_errors: u64,
    /// How full each ring got (indexed by RING_SECRETS / RING_EVENTS).
    gauges: [RingGauge; 2],
    /// Drop counters as last read.
    drops: Drops,
    /// Records the probes counted instead of sending, as last read.
    suppressed: Suppressed,
    /// Seconds until the next sweep of dead processes' repeat counters.
    sweep_countdown: u32,
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

    /// Takes every record waiting in `ring`.
    fn collect(&mut self, ring: &mut RingBuf<MapData>, which: usize) {
        self.gauges[which].sample();
        while let Some(item) = ring.next() {
            let rec = decode(&item, &self.fp);
            drop(item);
            match rec {
                Ok(rec) => self.held.push(rec),
                Err(e) => {
                    self.decode_errors += 1;
                    if self.decode_errors == 1 {
                        error!("undecodable probe record: {e}");
                    }
                }
            }
        }
    }

    /// Runs the held records through the pipeline in time order: those older than a short
    /// hold-back (a record reserved earlier in the other ring is committed by then), or all
    /// of them.
    fn process(&mut self, all: bool) {
        const HOLD_NS: u64 = 2_000_000;
        if self.held.is_empty() {
            return;
        }
        self.held.sort_by_key(|r| r.header().ts_ns);
        let cut = if all {
            self.held.len()
        } else {
            let horizon = BootClock::boot_now().saturating_sub(HOLD_NS);
            self.held.partition_point(|r| r.header().ts_ns <= horizon)
        };
        let ready: Vec<Record> = self.held.drain(..cut).collect();
        for rec in ready {
            if let Record::Exit(x) = &rec {
                self.final_repeats(x.hdr);
            }
            self.run(&rec);
        }
        if self.enricher.take_ia32_exec() {
            self.sensors.saw_ia32_exec();
            // The only late attach: what it needed goes now.
            crate::privileges::done_attaching();
        }
    }

    fn run(&mut self, rec: &Record) {
        self.enricher.enrich(rec, &mut self.ids, &mut self.batch);
        for ev in self.batch.drain(..) {
            self.pipeline.handle(ev, &mut self.ids);
        }
    }

    /// A process exited: the opens its probes counted after their last records are
    /// reported, and its counters go.
    fn final_repeats(&mut self, hdr: credwatch_common::Header) {
        let keys = self.enricher.repeat_keys_of(hdr.tgid);
        for key in &keys {
            if let Some(r) = self.sensors.repeat_state(key) {
                self.run(&Record::Repeats {
                    key: *key,
                    opens: r.opens,
                    hdr,
                });
            }
        }
        self.sensors.forget_repeats(&keys);
        self.enricher.forget_repeats(&keys);
    }

    /// Processes that went quiet after reading a secret: opens counted since their last
    /// record are reported now rather than at their exit (bounded work per second).
    fn quiet_repeats(&mut self) {
        let quiet = self.repeat_interval_ns.saturating_mul(2);
        self.catch_up_repeats(quiet, IN_FLIGHT_NS, 256);
    }

    /// Reports the opens counted since the last record of up to `limit` keys quiet for
    /// `quiet_ns`. A key whose probe sent a record less than `in_flight_ns` ago waits: that
    /// record may still be on its way, and it carries those opens.
    fn catch_up_repeats(&mut self, quiet_ns: u64, in_flight_ns: u64, limit: usize) {
        let now = BootClock::boot_now();
        for key in self.enricher.quiet_repeat_keys(now, quiet_ns, limit) {
            let Some(r) = self.sensors.repeat_state(&key) else {
                continue;
            };
            if now.saturating_sub(r.last_sent_ns) < in_flight_ns {
                continue;
            }
            if self
                .enricher
                .reported_opens(&key)
                .is_some_and(|rep| r.opens > rep)
            {
                let hdr = credwatch_common::Header {
                    tgid: key.tgid,
                    ts_ns: now,
                    ..Default::default()
                };
                self.run(&Record::Repeats {
                    key,
                    opens: r.opens,
                    hdr,
                });
            }
        }
    }

    /// Repeat counters of processes whose exit the agent never saw (a dropped record): their
    /// last opens are reported and the kernel's entries freed, so the table cannot fill up
    /// with the dead.
    fn sweep_repeats(&mut self) {
        let mut dead: Vec<RepeatKey> = self
            .sensors
            .repeat_keys()
            .into_iter()
            .filter(|k| !crate::process::is_alive(k.tgid))
            .collect();
        dead.sort_by_key(|k| k.tgid);
        dead.dedup_by_key(|k| k.tgid);
        let now = BootClock::boot_now();
        for k in &dead {
            self.final_repeats(credwatch_common::Header {
                tgid: k.tgid,
                ts_ns: now,
                ..Default::default()
            });
        }
        // Entries the agent had no record of (their first record was lost) go too.
        let rest: Vec<RepeatKey> = self
            .sensors
            .repeat_keys()
            .into_iter()
            .filter(|k| dead.iter().any(|d| d.tgid == k.tgid))
            .collect();
        self.sensors.forget_repeats(&rest);
    }

    /// The cgroups whose secret opens went over budget, worst first (bounded: a stats
    /// field, not a metric label).
    fn over_budget(&self) -> Vec<BudgetOverrun> {
        let mut v = self.sensors.budget_suppressed();
        v.sort_by_key(|b| std::cmp::Reverse(b.1));
        v.truncate(8);
        v.into_iter()
            .map(|(cgroup_id, opens)| BudgetOverrun { cgroup_id, opens })
            .collect()
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
        self.quiet_repeats();
        self.enricher
            .expire_pending(BootClock::boot_now(), &mut self.batch);
        for ev in std::mem::take(&mut self.batch) {
            self.pipeline.handle(ev, &mut self.ids);
        }
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
        match self.sensors.suppressed() {
            Ok(s) => self.suppressed = s,
            Err(e) => warn!("reading suppression counters: {e}"),
        }
        self.sweep_countdown = self.sweep_countdown.saturating_sub(1);
        if self.sweep_countdown == 0 {
            self.sweep_countdown = REPEAT_SWEEP_SECS;
            self.sweep_repeats();
        }
        let snap = self.snapshot();
        if let Some(path) = &self.stats_file {
            write_stats(path, &snap);
        }
        metrics.publish(snap);
        for g in &mut self.gauges {
            g.next_second();
        }
    }

    /// Flushes what the probes already produced, then every output.
    fn shutdown(mut self) {
        self.process(true);
        // Every open counted so far is reported before the agent goes (the rings were just
        // drained: nothing is in flight).
        self.catch_up_repeats(0, 0, usize::MAX);
        // Reads still waiting for a directory rescan, and their processes' records.
        self.enricher
            .release_all_held(&mut self.ids, &mut self.batch);
        self.enricher.expire_pending(u64::MAX, &mut self.batch);
        for ev in std::mem::take(&mut self.batch) {
            self.pipeline.handle(ev, &mut self.ids);
        }
        self.pipeline.finish();
        if let Ok(d) = self.sensors.drops() {
            self.drops = d;
        }
        if let Ok(s) = self.sensors.suppressed() {
            self.suppressed = s;
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
            suppressed: SuppressedReason::ALL
                .iter()
                .map(|r| (r.name(), self.suppressed[*r as usize]))
                .collect(),
            cgroups_over_budget: self.over_budget(),
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
            ring_size_bytes: self.gauges[RING_EVENTS].size,
            ring_peak_bytes: self.gauges[RING_EVENTS].peak(),
            secret_ring_size_bytes: self.gauges[RING_SECRETS].size,
            secret_ring_peak_bytes: self.gauges[RING_SECRETS].peak(),
            open_hook: self.sensors.open_hook.name(),
        }
    }
}

const RING_SECRETS: usize = 0;
const RING_EVENTS: usize = 1;
const REPEAT_SWEEP_SECS: u32 = 30;
/// How long after the probe sent a record it may still be in a ring, undrained.
const IN_FLIGHT_NS: u64 = 100_000_000;

type Suppressed = [u64; credwatch_common::SUPPRESSED_COUNT as usize];

/// Seconds a ring's peak backlog is remembered: a burst shorter than a second still shows
/// in a scrape taken at a usual interval (15–60 s) after it.
const PEAK_WINDOW_SECS: usize = 60;

/// How full one ring got lately: how close it came to dropping.
struct RingGauge {
    fill: Option<RingFill>,
    size: u64,
    /// Largest backlog (bytes waiting) a drain found in each of the last seconds, the
    /// current one at `second`.
    peaks: [u64; PEAK_WINDOW_SECS],
    second: usize,
}

impl RingGauge {
    fn new(ring: &RingBuf<MapData>, size: u32, what: &str) -> Self {
        let fill = match RingFill::new(std::os::fd::AsFd::as_fd(ring)) {
            Ok(f) => Some(f),
            Err(e) => {
                warn!("{e:#}; {what} ring fill not reported");
                None
            }
        };
        RingGauge {
            fill,
            size: u64::from(size),
            peaks: [0; PEAK_WINDOW_SECS],
            second: 0,
        }
    }

    fn sample(&mut self) {
        if let Some(f) = &self.fill {
            let p = &mut self.peaks[self.second];
            *p = (*p).max(f.bytes());
        }
    }

    fn next_second(&mut self) {
        self.second = (self.second + 1) % PEAK_WINDOW_SECS;
        self.peaks[self.second] = 0;
    }

    /// Largest backlog in the last [`PEAK_WINDOW_SECS`].
    fn peak(&self) -> u64 {
        self.peaks.iter().copied().max().unwrap_or(0)
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
