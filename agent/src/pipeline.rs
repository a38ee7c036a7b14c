//! Everything after enrichment, shared by `run` and `replay`: correlation, detectors, then
//! the outputs. [`PipelineBuilder`] is the one place that assembles it from the config.

use std::{
    collections::BTreeMap,
    fs::OpenOptions,
    io::{self, BufWriter, Write},
    path::Path,
    sync::Arc,
};

use anyhow::{Context, Result};
use tracing::error;

use crate::{
    alert::Alert,
    baseline::Baselines,
    clickhouse::{ClickHouseSink, writer::WriterCounts},
    config::Config,
    detect::Detectors,
    enrich::IdGen,
    event::{Event, EventKind},
    holders::{Holders, NodeAgents},
    metrics::SinkCounts,
    sinks::{AlertFormat, AlertSinks, render},
};

/// Everything downstream of the detectors: the event log, the alert stream, the alert
/// sinks, ClickHouse. None of them may stall the pipeline or take it down.
pub trait Output: Send {
    fn event(&mut self, _ev: &Event) {}
    fn alert(&mut self, _a: &Alert) {}
    /// Pushes buffered output on (called on the agent's drain timer).
    fn flush(&mut self) {}
    /// End of input: delivers what is queued (within each output's grace period).
    fn finish(&mut self) {
        self.flush();
    }
    /// Adds this output's counters.
    fn report(&self, _s: &mut OutputStats) {}
}

#[derive(Debug, Default, Clone, serde::Serialize)]
pub struct OutputStats {
    pub events_write_failures: u64,
    pub alerts_write_failures: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub clickhouse: Option<WriterCounts>,
    #[serde(skip)]
    pub sinks: Vec<SinkCounts>,
}

/// NDJSON writer that never takes the agent down: write failures (full disk, closed pipe)
/// are counted and logged once per burst, and the pipeline keeps running.
pub struct NdjsonSink {
    out: BufWriter<Box<dyn Write + Send>>,
    pub written: u64,
    pub failed: u64,
    failing: bool,
}

impl NdjsonSink {
    /// `-` is stdout; a file is appended to.
    pub fn open(path: &Path) -> Result<Self> {
        let w: Box<dyn Write + Send> = if path == Path::new("-") {
            Box::new(io::stdout())
        } else {
            Box::new(
                OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(path)
                    .with_context(|| format!("opening {}", path.display()))?,
            )
        };
        Ok(Self::new(w))
    }

    pub fn new(w: Box<dyn Write + Send>) -> Self {
        NdjsonSink {
            out: BufWriter::with_capacity(1 << 16, w),
            written: 0,
            failed: 0,
            failing: false,
        }
    }

    pub fn write<T: serde::Serialize>(&mut self, v: &T) {
        let r = serde_json::to_writer(&mut self.out, v)
            .map_err(io::Error::other)
            .and_then(|_| self.out.write_all(b"\n"));
        self.note(r);
    }

    /// One line of already encoded bytes.
    pub fn write_line(&mut self, line: &[u8]) {
        let r = self
            .out
            .write_all(line)
            .and_then(|_| self.out.write_all(b"\n"));
        self.note(r);
    }

    pub fn flush(&mut self) {
        let r = self.out.flush();
        self.note(r);
    }

    fn note(&mut self, r: io::Result<()>) {
        match r {
            Ok(()) => {
                self.written += 1;
                self.failing = false;
            }
            Err(e) => {
                self.failed += 1;
                if !self.failing {
                    error!("output failing: {e}; counting dropped lines");
                    self.failing = true;
                }
            }
        }
    }
}

/// `--events`: every event as NDJSON.
pub struct EventLog(pub NdjsonSink);

impl Output for EventLog {
    fn event(&mut self, ev: &Event) {
        self.0.write(ev);
    }
    fn flush(&mut self) {
        self.0.flush();
    }
    fn report(&self, s: &mut OutputStats) {
        s.events_write_failures += self.0.failed;
    }
}

/// `--alerts`: alert lines in the configured format.
pub struct AlertLog {
    pub sink: NdjsonSink,
    pub format: AlertFormat,
}

impl Output for AlertLog {
    fn alert(&mut self, a: &Alert) {
        match self.format {
            // The common case without the intermediate buffer.
            AlertFormat::Json => self.sink.write(a),
            f => self.sink.write_line(&render(a, f)),
        }
    }
    fn flush(&mut self) {
        self.sink.flush();
    }
    fn report(&self, s: &mut OutputStats) {
        s.alerts_write_failures += self.sink.failed;
    }
}

impl Output for AlertSinks {
    fn alert(&mut self, a: &Alert) {
        self.send(a);
    }
    fn flush(&mut self) {
        AlertSinks::flush(self);
    }
    fn finish(&mut self) {
        AlertSinks::finish(self);
    }
    fn report(&self, s: &mut OutputStats) {
        s.sinks.extend(self.counts());
    }
}

impl Output for ClickHouseSink {
    fn event(&mut self, ev: &Event) {
        ClickHouseSink::event(self, ev);
    }
    fn alert(&mut self, a: &Alert) {
        ClickHouseSink::alert(self, a);
    }
    fn flush(&mut self) {
        ClickHouseSink::flush(self);
    }
    fn finish(&mut self) {
        ClickHouseSink::finish(self);
    }
    fn report(&self, s: &mut OutputStats) {
        s.clickhouse = Some(self.stats.snapshot());
    }
}

#[derive(Debug, Default, Clone, serde::Serialize)]
pub struct PipelineStats {
    pub events: BTreeMap<&'static str, u64>,
    pub alerts: BTreeMap<&'static str, u64>,
    pub events_write_failures: u64,
    pub alerts_write_failures: u64,
    pub alerts_allowlisted: u64,
    pub baselines: usize,
    pub holders: crate::holders::HolderStats,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub clickhouse: Option<WriterCounts>,
}

/// Assembles the pipeline `run` and `replay` share from the config.
pub struct PipelineBuilder<'a> {
    cfg: &'a Config,
    state_dir: Option<&'a Path>,
    replay: bool,
    resolvers: Vec<std::net::IpAddr>,
    outputs: Vec<Box<dyn Output>>,
}

impl<'a> PipelineBuilder<'a> {
    pub fn new(cfg: &'a Config) -> Self {
        PipelineBuilder {
            cfg,
            state_dir: None,
            replay: false,
            resolvers: Vec::new(),
            outputs: Vec::new(),
        }
    }

    /// Learn into and judge against the baselines kept in `dir` (and spool ClickHouse
    /// batches there); without it baselines live in memory only.
    pub fn state_dir(mut self, dir: Option<&'a Path>) -> Self {
        self.state_dir = dir;
        self
    }

    /// Recorded input: outputs wait for queue space instead of dropping (nothing in the
    /// kernel has to keep up).
    pub fn replay(mut self) -> Self {
        self.replay = true;
        self
    }

    /// The node's DNS resolvers (its resolv.conf), on top of `[holders] resolvers`.
    pub fn resolvers(mut self, r: Vec<std::net::IpAddr>) -> Self {
        self.resolvers = r;
        self
    }

    /// Every event as NDJSON.
    pub fn events_to(mut self, sink: NdjsonSink) -> Self {
        self.outputs.push(Box::new(EventLog(sink)));
        self
    }

    /// Alert lines, in `[alerts] format`.
    pub fn alerts_to(mut self, sink: NdjsonSink) -> Self {
        self.outputs.push(Box::new(AlertLog {
            sink,
            format: self.cfg.alerts.format,
        }));
        self
    }

    pub fn output(mut self, o: Box<dyn Output>) -> Self {
        self.outputs.push(o);
        self
    }

    pub fn build(mut self) -> Result<Pipeline> {
        let cfg = self.cfg;
        let d = &cfg.detect;
        let baselines = match self.state_dir {
            Some(dir) => {
                crate::state::ensure_dir(dir)?;
                Baselines::open(dir, d.learning_period, d.max_baselines)?
            }
            None => Baselines::in_memory(d.learning_period, d.max_baselines),
        };
        let node = cfg.node_name();
        if let Some(ch) = &cfg.clickhouse {
            // Without a state dir, batches ClickHouse refuses wait in a spool of their own.
            let spool_home = self.state_dir.map(Path::to_path_buf).unwrap_or_else(|| {
                std::env::temp_dir().join(format!("credwatch-replay-{}", std::process::id()))
            });
            let sink = ClickHouseSink::start(ch, &node, &spool_home, self.replay)?;
            self.outputs.push(Box::new(sink));
        }
        let sinks = AlertSinks::start(&cfg.alerts, &node)?;
        if !sinks.is_empty() {
            self.outputs.push(Box::new(sinks));
        }
        let mut agents = crate::holders::default_node_agents();
        agents.extend(cfg.node_agent.iter().cloned());
        let mut holders_cfg = cfg.holders.clone();
        holders_cfg.resolvers.extend(self.resolvers.iter().copied());
        Ok(Pipeline {
            holders: Holders::new(
                &holders_cfg,
                NodeAgents::new(&agents, &cfg.kubernetes.kubelet_root),
            ),
            detectors: Detectors::new(d, Arc::clone(&cfg.policy), baselines),
            outputs: self.outputs,
            counts: [0; EventKind::ALL.len()],
            alert_counts: BTreeMap::new(),
            fired: Vec::new(),
            uses: Vec::new(),
        })
    }
}

pub struct Pipeline {
    holders: Holders,
    detectors: Detectors,
    outputs: Vec<Box<dyn Output>>,
    /// Per event kind, indexed by discriminant (a map lookup per event showed in profiles).
    counts: [u64; EventKind::ALL.len()],
    alert_counts: BTreeMap<&'static str, u64>,
    fired: Vec<Alert>,
    uses: Vec<Event>,
}

impl Pipeline {
    pub fn handle(&mut self, mut ev: Event, ids: &mut IdGen) {
        let mut uses = std::mem::take(&mut self.uses);
        self.holders.observe(&mut ev, || ids.next_id(), &mut uses);
        self.emit(&ev);
        for u in uses.drain(..) {
            self.emit(&u);
        }
        self.uses = uses;
    }

    fn emit(&mut self, ev: &Event) {
        self.counts[ev.kind() as usize] += 1;
        for o in &mut self.outputs {
            o.event(ev);
        }
        self.detectors.observe(ev, &mut self.fired);
        // Taken out for the loop (outputs need `&mut self`), put back to keep its capacity.
        let mut fired = std::mem::take(&mut self.fired);
        for a in fired.drain(..) {
            *self.alert_counts.entry(a.alert.as_str()).or_default() += 1;
            self.output_alert(&a);
        }
        self.fired = fired;
    }

    fn output_alert(&mut self, a: &Alert) {
        for o in &mut self.outputs {
            o.alert(a);
        }
    }

    pub fn flush(&mut self) {
        for o in &mut self.outputs {
            o.flush();
        }
    }

    /// Persists learned baselines (cheap when nothing changed).
    pub fn checkpoint(&mut self) {
        self.detectors.checkpoint();
    }

    /// End of input: the final counts of alerts that grew since last emitted, then every
    /// output delivers what it holds.
    pub fn finish(&mut self) {
        for a in self.detectors.finish() {
            self.output_alert(&a);
        }
        for o in &mut self.outputs {
            o.finish();
        }
    }

    pub fn outputs(&self) -> OutputStats {
        let mut s = OutputStats::default();
        for o in &self.outputs {
            o.report(&mut s);
        }
        s
    }

    pub fn stats(&self) -> PipelineStats {
        let out = self.outputs();
        PipelineStats {
            events: EventKind::ALL
                .iter()
                .filter(|k| self.counts[**k as usize] > 0)
                .map(|k| (k.as_str(), self.counts[*k as usize]))
                .collect(),
            alerts: self.alert_counts.clone(),
            events_write_failures: out.events_write_failures,
            alerts_write_failures: out.alerts_write_failures,
            alerts_allowlisted: self.detectors.allowlisted,
            baselines: self.detectors.baselines().len(),
            holders: self.holders.stats(),
            clickhouse: out.clickhouse,
        }
    }
}
