//! `credwatch replay`: recorded NDJSON events re-enter the pipeline after enrichment and go
//! through exactly the code the live agent runs. Event timestamps drive all time logic.

use std::{
    fs::{self, File},
    io::{BufRead, BufReader},
    path::{Path, PathBuf},
};

use anyhow::{Context, Result};
use tracing::warn;

use crate::{
    baseline::Baselines,
    config::Config,
    correlate::Correlator,
    detect::Detectors,
    enrich::IdGen,
    event::{Event, EventKind},
    pipeline::{NdjsonSink, Pipeline},
};

#[derive(Debug, Default)]
pub struct ReplaySummary {
    pub lines: u64,
    pub events: u64,
    pub bad_lines: u64,
}

/// `state_dir`: learn into (and judge against) the baselines kept there, as the agent does;
/// without it the replay starts from nothing and keeps nothing.
pub fn replay(
    cfg: &Config,
    files: &[PathBuf],
    state_dir: Option<&Path>,
    events_out: Option<NdjsonSink>,
    alerts_out: Option<NdjsonSink>,
) -> Result<ReplaySummary> {
    let (learn, max) = (cfg.detect.learning_period, cfg.detect.max_baselines);
    let baselines = match state_dir {
        Some(dir) => {
            fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
            Baselines::open(dir, learn, max)?
        }
        None => Baselines::in_memory(learn, max),
    };
    let mut pipeline = Pipeline::new(
        Correlator::new(cfg.correlate.window),
        Detectors::new(&cfg.detect.options(), cfg.policy()?, baselines),
        events_out,
        alerts_out,
    );
    if let Some(ch) = &cfg.clickhouse {
        // Without a state dir, batches ClickHouse refuses wait in a spool next to the input.
        let spool_home = state_dir.map(Path::to_path_buf).unwrap_or_else(|| {
            std::env::temp_dir().join(format!("credwatch-replay-{}", std::process::id()))
        });
        if ch.migrate_on_start {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            if let Err(e) = rt.block_on(crate::clickhouse::migrate(ch)) {
                warn!("ClickHouse schema not applied: {e:#}");
            }
        }
        let node = crate::agent::node_name(cfg);
        pipeline = pipeline.with_clickhouse(crate::clickhouse::ClickHouseSink::start(
            ch,
            &node,
            &spool_home,
            true,
        )?);
    }
    pipeline = pipeline.with_sinks(
        crate::sinks::AlertSinks::start(&cfg.alerts, &crate::agent::node_name(cfg))?,
        cfg.alerts.format,
    );
    let mut ids = IdGen::new();
    let mut summary = ReplaySummary::default();
    for path in files {
        let reader: Box<dyn BufRead> = if path.as_os_str() == "-" {
            Box::new(BufReader::new(std::io::stdin()))
        } else {
            Box::new(BufReader::new(
                File::open(path).with_context(|| format!("opening {}", path.display()))?,
            ))
        };
        for (n, line) in reader.split(b'\n').enumerate() {
            let line = line.with_context(|| format!("reading {}", path.display()))?;
            summary.lines += 1;
            if line.iter().all(u8::is_ascii_whitespace) {
                continue;
            }
            let ev: Event = match serde_json::from_slice(&line) {
                Ok(ev) => ev,
                Err(e) => {
                    summary.bad_lines += 1;
                    warn!("{}:{}: skipped, not an event: {e}", path.display(), n + 1);
                    continue;
                }
            };
            // Credential uses are derived: the correlator recreates them from reads and
            // connects, so recorded ones are not fed back in twice.
            if ev.kind == EventKind::CredentialUse {
                continue;
            }
            summary.events += 1;
            pipeline.handle(ev, &mut ids);
        }
    }
    pipeline.finish();
    Ok(summary)
}
