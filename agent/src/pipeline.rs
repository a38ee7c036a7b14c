//! Everything after enrichment, shared by `run` and `replay`: correlation, detectors, then
//! the event and alert sinks.

use std::{
    collections::BTreeMap,
    fs::OpenOptions,
    io::{self, BufWriter, Write},
    path::Path,
};

use anyhow::{Context, Result};
use tracing::error;

use crate::{
    alert::Alert,
    clickhouse::{ClickHouseSink, writer::WriterCounts},
    config::AlertFormat,
    correlate::Correlator,
    detect::Detectors,
    enrich::IdGen,
    event::{Event, EventKind},
    metrics::SinkCounts,
    sinks::{AlertSinks, ocsf},
};

/// NDJSON writer that never takes the agent down: write failures (full disk, closed pipe)
/// are counted and logged once per burst, and the pipeline keeps running.
pub struct NdjsonSink {
    out: BufWriter<Box<dyn Write + Send>>,
    pub written: u64,
    pub failed: u64,
    failing: bool,
}

impl NdjsonSink {
    pub fn open(path: &Path) -> Result<Self> {
        let w: Box<dyn Write + Send> = if path == Path::new("-") {
            Box::new(io::stdout())
        } else {
            Box::new(
                OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(path)
                    .with_context(|| format!("opening events file {}", path.display()))?,
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
                    error!("event output failing: {e}; counting dropped lines");
                    self.failing = true;
                }
            }
        }
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
    #[serde(skip_serializing_if = "Option::is_none")]
    pub clickhouse: Option<WriterCounts>,
}

pub struct Pipeline {
    correlator: Correlator,
    detectors: Detectors,
    events: Option<NdjsonSink>,
    alerts: Option<NdjsonSink>,
    clickhouse: Option<ClickHouseSink>,
    sinks: Option<AlertSinks>,
    alert_format: AlertFormat,
    /// Per event kind, indexed by discriminant (a map lookup per event showed in profiles).
    counts: [u64; EventKind::ALL.len()],
    alert_counts: BTreeMap<&'static str, u64>,
    fired: Vec<Alert>,
}

impl Pipeline {
    pub fn new(
        correlator: Correlator,
        detectors: Detectors,
        events: Option<NdjsonSink>,
        alerts: Option<NdjsonSink>,
    ) -> Self {
        Pipeline {
            correlator,
            detectors,
            events,
            alerts,
            clickhouse: None,
            sinks: None,
            alert_format: AlertFormat::Json,
            counts: [0; EventKind::ALL.len()],
            alert_counts: BTreeMap::new(),
            fired: Vec::new(),
        }
    }

    /// Events and alerts also go to ClickHouse.
    pub fn with_clickhouse(mut self, sink: ClickHouseSink) -> Self {
        self.clickhouse = Some(sink);
        self
    }

    /// Alerts also go to these sinks; `format` is the `--alerts` output's.
    pub fn with_sinks(mut self, sinks: AlertSinks, format: AlertFormat) -> Self {
        self.sinks = Some(sinks);
        self.alert_format = format;
        self
    }

    pub fn sink_counts(&self) -> Vec<SinkCounts> {
        self.sinks
            .as_ref()
            .map(AlertSinks::counts)
            .unwrap_or_default()
    }

    pub fn handle(&mut self, ev: Event, ids: &mut IdGen) {
        let uses = self.correlator.observe(&ev, || ids.next_id());
        self.emit(&ev);
        for u in &uses {
            self.emit(u);
        }
    }

    fn emit(&mut self, ev: &Event) {
        self.counts[ev.kind as usize] += 1;
        if let Some(sink) = self.events.as_mut() {
            sink.write(ev);
        }
        if let Some(ch) = self.clickhouse.as_mut() {
            ch.event(ev);
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
        if let Some(sink) = self.alerts.as_mut() {
            match self.alert_format {
                AlertFormat::Json => sink.write(a),
                AlertFormat::Ocsf => sink.write(&ocsf::detection_finding(a)),
            }
        }
        if let Some(s) = self.sinks.as_mut() {
            s.send(a);
        }
        if let Some(ch) = self.clickhouse.as_mut() {
            ch.alert(a);
        }
    }

    pub fn flush(&mut self) {
        if let Some(s) = self.events.as_mut() {
            s.flush();
        }
        if let Some(s) = self.alerts.as_mut() {
            s.flush();
        }
        if let Some(ch) = self.clickhouse.as_mut() {
            ch.flush();
        }
        if let Some(s) = self.sinks.as_mut() {
            s.flush();
        }
    }

    /// Persists learned baselines (cheap when nothing changed).
    pub fn checkpoint(&mut self) {
        self.detectors.checkpoint();
    }

    /// End of input: the final counts of alerts that grew since last emitted, then flush.
    pub fn finish(&mut self) {
        for a in self.detectors.finish() {
            self.output_alert(&a);
        }
        self.flush();
        if let Some(ch) = self.clickhouse.as_mut() {
            ch.finish();
        }
        if let Some(s) = self.sinks.as_mut() {
            s.finish();
        }
    }

    pub fn stats(&self) -> PipelineStats {
        PipelineStats {
            events: EventKind::ALL
                .iter()
                .filter(|k| self.counts[**k as usize] > 0)
                .map(|k| (k.as_str(), self.counts[*k as usize]))
                .collect(),
            alerts: self.alert_counts.clone(),
            events_write_failures: self.events.as_ref().map(|s| s.failed).unwrap_or(0),
            alerts_write_failures: self.alerts.as_ref().map(|s| s.failed).unwrap_or(0),
            alerts_allowlisted: self.detectors.allowlisted,
            baselines: self.detectors.baselines().len(),
            clickhouse: self.clickhouse.as_ref().map(|c| c.stats.snapshot()),
        }
    }
}
