//! The wire formats hold still: the recorded fixtures replayed through the pipeline give
//! byte for byte the events NDJSON, the alert lines and the ClickHouse rows recorded in
//! `tests/fixtures/golden/`. A change to any of them fails here first; when it is meant,
//! `CREDWATCH_BLESS=1 cargo test -p credwatch-tests --test golden` rewrites the files and
//! the diff shows what changed.

use std::{
    collections::HashMap,
    io::Write,
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
};

use credwatch::{
    clickhouse::rows::EventRow, config::Config, event::Event, pipeline::NdjsonSink, replay::replay,
};

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures")
}

/// A writer whose bytes the test can read back.
#[derive(Clone, Default)]
struct Buffer(Arc<Mutex<Vec<u8>>>);

impl Write for Buffer {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(b);
        Ok(b.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Buffer {
    fn text(&self) -> String {
        String::from_utf8(self.0.lock().unwrap().clone()).unwrap()
    }
}

/// Ids the pipeline made up (derived credential uses get a random run nonce): renamed
/// `derived-N` in order of appearance, so runs compare. Ids from the input stay.
fn normalize(text: &str, input_ids: &[String], names: &mut HashMap<String, String>) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(start) = rest.find('"') {
        out.push_str(&rest[..=start]);
        rest = &rest[start + 1..];
        let Some(end) = rest.find('"') else { break };
        let s = &rest[..end];
        let generated = s.len() > 17
            && s.as_bytes()[16] == b'-'
            && s[..16].bytes().all(|b| b.is_ascii_hexdigit())
            && s[17..].bytes().all(|b| b.is_ascii_digit());
        if generated && !input_ids.iter().any(|i| i == s) {
            let n = names.len() + 1;
            out.push_str(names.entry(s.to_owned()).or_insert(format!("derived-{n}")));
        } else {
            out.push_str(s);
        }
        out.push('"');
        rest = &rest[end + 1..];
    }
    out.push_str(rest);
    out
}

fn check(name: &str, inputs: &[&str], config: Option<&str>) {
    let cfg = match config {
        Some(c) => Config::load(&fixtures().join(c)).unwrap(),
        None => Config::default(),
    };
    let files: Vec<PathBuf> = inputs.iter().map(|f| fixtures().join(f)).collect();
    let input_ids: Vec<String> = files
        .iter()
        .flat_map(|f| {
            std::fs::read_to_string(f)
                .unwrap()
                .lines()
                .filter(|l| !l.trim().is_empty())
                .map(|l| serde_json::from_str::<Event>(l).unwrap().id)
                .collect::<Vec<_>>()
        })
        .collect();
    let (events, alerts) = (Buffer::default(), Buffer::default());
    replay(
        &cfg,
        &files,
        None,
        Some(NdjsonSink::new(Box::new(events.clone()))),
        Some(NdjsonSink::new(Box::new(alerts.clone()))),
    )
    .unwrap();
    let rows: String = events
        .text()
        .lines()
        .map(|l| {
            let ev: Event = serde_json::from_str(l).unwrap();
            format!("{}\n", serde_json::to_string(&EventRow::from(&ev)).unwrap())
        })
        .collect();
    let mut names = HashMap::new();
    let got = [
        ("events", normalize(&events.text(), &input_ids, &mut names)),
        ("alerts", normalize(&alerts.text(), &input_ids, &mut names)),
        ("rows", normalize(&rows, &input_ids, &mut names)),
    ];
    for (part, text) in got {
        let path = fixtures().join(format!("golden/{name}.{part}.ndjson"));
        if std::env::var_os("CREDWATCH_BLESS").is_some() {
            std::fs::write(&path, &text).unwrap();
            continue;
        }
        let want = std::fs::read_to_string(&path).unwrap();
        for (i, (g, w)) in text.lines().zip(want.lines()).enumerate() {
            assert_eq!(g, w, "{} line {}", path.display(), i + 1);
        }
        assert_eq!(
            text.lines().count(),
            want.lines().count(),
            "{}: line count",
            path.display()
        );
    }
}

#[test]
fn live_capture_replays_to_the_recorded_events_alerts_and_rows() {
    check("live", &["live-capture.ndjson"], None);
}

#[test]
fn detection_fixture_replays_to_the_recorded_events_alerts_and_rows() {
    check("det", &["replay-detections.ndjson"], None);
}

#[test]
fn baseline_fixtures_replay_to_the_recorded_events_alerts_and_rows() {
    check(
        "base",
        &[
            "replay-baselines-day0.ndjson",
            "replay-baselines-later.ndjson",
        ],
        Some("replay-baselines.toml"),
    );
}
