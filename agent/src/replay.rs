//! `credwatch replay`: recorded NDJSON events re-enter the pipeline after enrichment and go
//! through exactly the code the live agent runs. Event timestamps drive all time logic.

use std::{
    fs::File,
    io::{BufRead, BufReader},
    path::{Path, PathBuf},
};

use anyhow::{Context, Result};
use tracing::warn;

use crate::{
    config::Config,
    enrich::IdGen,
    event::{Event, EventKind},
    pipeline::{NdjsonSink, PipelineBuilder},
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
    let mut b = PipelineBuilder::new(cfg).state_dir(state_dir).replay();
    if let Some(s) = events_out {
        b = b.events_to(s);
    }
    if let Some(s) = alerts_out {
        b = b.alerts_to(s);
    }
    let mut pipeline = b.build()?;
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
            // Credential uses are derived: the holders stage recreates them from reads,
            // execs and connects, so recorded ones are not fed back in twice.
            if ev.kind() == EventKind::CredentialUse {
                continue;
            }
            summary.events += 1;
            pipeline.handle(ev, &mut ids);
        }
    }
    pipeline.finish();
    Ok(summary)
}
