//! ClickHouse: the real engine behind the project's test front (or a real server via
//! `CREDWATCH_TEST_CLICKHOUSE_URL`). Schema, every field of every event, alerts, an outage
//! under load, a lost response, a kill -9 with a full spool, and the fleet queries.

use std::{
    collections::{HashMap, HashSet},
    path::{Path, PathBuf},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use credwatch::{
    alert::{Alert, AlertKind},
    clickhouse::rows::{AlertRow, EventRow},
    event::{CredentialType, Event, EventKind, Timestamp},
};
use credwatch_tests::{Agent, clickhouse::TestClickHouse, credwatch, fixture, ok, workdir};

fn write_config(dir: &Path, text: &str) -> PathBuf {
    let p = dir.join("credwatch.toml");
    std::fs::write(&p, text).unwrap();
    p
}

fn ndjson<T: serde::de::DeserializeOwned>(text: &str) -> Vec<T> {
    text.lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
        .collect()
}

/// (rows, distinct ids) in a table.
fn counts(ch: &TestClickHouse, table: &str) -> (u64, u64) {
    ch.scalar::<(u64, u64)>(&format!("SELECT count(), uniqExact(id) FROM {table}"))
}

#[test]
#[ignore = "needs the agent binary and the test ClickHouse (cargo xtask test sets them up)"]
fn migrate_is_idempotent_and_replayed_events_land_with_every_field() {
    let ch = TestClickHouse::start();
    let w = workdir();
    let policy = std::fs::read_to_string(fixture("replay-baselines.toml")).unwrap();
    let cfg = write_config(w.path(), &format!("{policy}\n{}", ch.config()));
    let cfg = cfg.to_str().unwrap();
    for _ in 0..2 {
        let out = ok(&credwatch(&["migrate", "--config", cfg]));
        assert!(out.contains("schema version 3 applied"), "{out}");
    }
    let tables: Vec<String> = ch.rows(&format!(
        "SELECT name FROM system.tables WHERE database = '{}' ORDER BY name",
        ch.database
    ));
    assert_eq!(
        tables,
        ["alerts", "credential_uses", "events", "schema_version"]
    );
    assert_eq!(ch.scalar::<u64>("SELECT count() FROM schema_version"), 3);

    let events_file = w.path().join("events.ndjson");
    let stdout = ok(&credwatch(&[
        "replay",
        "--config",
        cfg,
        "--events",
        events_file.to_str().unwrap(),
        &fixture("replay-detections.ndjson"),
        &fixture("replay-baselines-day0.ndjson"),
        &fixture("replay-baselines-later.ndjson"),
    ]));
    let mut written: Vec<Event> = ndjson(&std::fs::read_to_string(&events_file).unwrap());
    written.sort_by(|a, b| a.id.cmp(&b.id));
    let mut landed: Vec<Event> = ch
        .rows::<EventRow>("SELECT ?fields FROM events ORDER BY id")
        .into_iter()
        .map(|r| r.into_event().expect("a row that maps back to an event"))
        .collect();
    landed.sort_by(|a, b| a.id.cmp(&b.id));
    assert_eq!(landed.len(), written.len());
    assert!(
        written.iter().any(|e| e.dst().is_some())
            && written.iter().any(|e| e.credential().is_some()),
        "the fixtures exercise destinations and credentials"
    );
    for (got, want) in landed.iter().zip(&written) {
        assert_eq!(got, want, "event {} differs after ClickHouse", want.id);
    }
    // The credential_uses view shows the correlated uses.
    let uses = written
        .iter()
        .filter(|e| e.kind() == EventKind::CredentialUse)
        .count() as u64;
    assert!(uses > 0);
    assert_eq!(
        ch.scalar::<u64>("SELECT count() FROM credential_uses"),
        uses
    );

    let alerts: Vec<Alert> = ndjson(&stdout);
    let mut landed: Vec<Alert> = ch
        .rows::<AlertRow>("SELECT ?fields FROM alerts ORDER BY ts, id")
        .into_iter()
        .map(|r| r.into_alert().unwrap())
        .collect();
    assert!(alerts.len() >= 10);
    landed.sort_by(|a, b| (a.ts, &a.dedup_key).cmp(&(b.ts, &b.dedup_key)));
    let mut want = alerts.clone();
    want.sort_by(|a, b| (a.ts, &a.dedup_key).cmp(&(b.ts, &b.dedup_key)));
    assert_eq!(landed, want);

    // A database migrated by a newer credwatch is left alone.
    ch.scalar::<u8>("SELECT 1");
    let c = ch.client();
    credwatch_tests::clickhouse::runtime()
        .block_on(
            c.query(
                "INSERT INTO schema_version VALUES (99, now64(3), 'credwatch from the future')",
            )
            .execute(),
        )
        .unwrap();
    let out = credwatch(&["migrate", "--config", cfg]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("schema version 99, newer"), "{err}");
}

/// The server applies the first events insert and drops the connection before answering:
/// the writer spools the batch with its token and sends it again; ClickHouse keeps one copy.
#[test]
#[ignore = "needs the agent binary and the test ClickHouse (cargo xtask test sets them up)"]
fn a_lost_insert_response_does_not_duplicate_rows() {
    let ch = TestClickHouse::start_local("a lost response");
    let w = workdir();
    let cfg = write_config(
        w.path(),
        &format!("{}migrate_on_start = false\n", ch.config()),
    );
    let cfg = cfg.to_str().unwrap();
    ok(&credwatch(&["migrate", "--config", cfg]));
    ch.fault("drop_next_insert_response");
    let events_file = w.path().join("events.ndjson");
    let out = credwatch(&[
        "replay",
        "--config",
        cfg,
        "--events",
        events_file.to_str().unwrap(),
        &fixture("replay-detections.ndjson"),
    ]);
    ok(&out);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("insert failed"),
        "the response really was lost: {stderr}"
    );
    let n = ndjson::<Event>(&std::fs::read_to_string(&events_file).unwrap()).len() as u64;
    assert_eq!(counts(&ch, "events"), (n, n));
}

/// Fleet: the same token read on two nodes (synthetic event streams) is one fleet
/// token_reuse naming both nodes; a token read on one node only is not. The SSH key, last
/// read on a third node seven weeks earlier, is a fleet dormant_credential.
#[test]
#[ignore = "needs the agent binary and the test ClickHouse (cargo xtask test sets them up)"]
fn fleet_check_finds_a_token_used_on_two_nodes() {
    let ch = TestClickHouse::start();
    let w = workdir();
    let cfg = write_config(w.path(), &ch.config());
    let cfg = cfg.to_str().unwrap();
    let base = std::fs::read_to_string(fixture("replay-detections.ndjson")).unwrap();
    let events: Vec<Event> = ndjson(&base);
    let is_ssh_key = |e: &Event| {
        e.credential()
            .is_some_and(|c| c.kind == CredentialType::SshPrivateKey)
    };
    let line = |e: &Event| format!("{}\n", serde_json::to_string(e).unwrap());
    let mut per_node = HashMap::new();
    for node in ["node-a", "node-b"] {
        let mut lines = String::new();
        for e in &events {
            // node-b never reads the SSH key: its fingerprint stays on one node.
            if node == "node-b" && is_ssh_key(e) {
                continue;
            }
            let mut e = e.clone();
            e.node = node.into();
            e.id = format!("{node}-{}", e.id);
            lines.push_str(&line(&e));
        }
        let f = w.path().join(format!("{node}.ndjson"));
        std::fs::write(&f, lines).unwrap();
        per_node.insert(node, f);
    }
    let mut old = events.iter().find(|e| is_ssh_key(e)).unwrap().clone();
    old.node = "node-c".into();
    old.id = "node-c-old".into();
    old.ts = serde_json::from_str::<Timestamp>("\"2026-10-01T10:00:00.000000000Z\"").unwrap();
    let f = w.path().join("node-c.ndjson");
    std::fs::write(&f, line(&old)).unwrap();
    per_node.insert("node-c", f);
    for f in per_node.values() {
        ok(&credwatch(&[
            "replay",
            "--config",
            cfg,
            f.to_str().unwrap(),
        ]));
    }
    let out = ok(&credwatch(&[
        "fleet-check",
        "--config",
        cfg,
        "--since",
        "2026-11-22T00:00:00Z",
        "--until",
        "2026-11-23T00:00:00Z",
    ]));
    let (alerts, dormant): (Vec<Alert>, Vec<Alert>) = ndjson::<Alert>(&out)
        .into_iter()
        .partition(|a| a.alert == AlertKind::TokenReuse);
    assert_eq!(dormant.len(), 1, "{dormant:#?}");
    let d = &dormant[0];
    assert_eq!(d.alert, AlertKind::DormantCredential);
    assert_eq!(
        d.credential.as_ref().unwrap().fingerprint,
        old.credential().unwrap().fingerprint
    );
    assert!(d.summary.contains("after 52 days"), "{}", d.summary);
    let shared: HashSet<String> = events
        .iter()
        .filter(|e| e.kind() == EventKind::SecretRead && !is_ssh_key(e))
        .map(|e| e.credential().unwrap().fingerprint.clone())
        .collect();
    let found: HashSet<String> = alerts
        .iter()
        .map(|a| a.credential.as_ref().unwrap().fingerprint.clone())
        .collect();
    assert_eq!(found, shared, "{alerts:#?}");
    for a in &alerts {
        assert_eq!(a.alert, AlertKind::TokenReuse);
        assert_eq!(a.node, "fleet");
        assert!(a.summary.contains("node-a, node-b"), "{}", a.summary);
        assert_eq!(a.evidence.len(), 2);
    }
}

/// Opens a watched secret every few milliseconds until stopped: steady load with a known
/// event source, on top of whatever else the node does.
fn steady_load(secret: PathBuf) -> (Arc<AtomicBool>, std::thread::JoinHandle<u64>) {
    let stop = Arc::new(AtomicBool::new(false));
    let flag = stop.clone();
    let t = std::thread::spawn(move || {
        let mut n = 0;
        while !flag.load(Ordering::Relaxed) {
            drop(std::fs::File::open(&secret).unwrap());
            n += 1;
            std::thread::sleep(Duration::from_millis(3));
        }
        n
    });
    (stop, t)
}

fn live_config(ch: &TestClickHouse, secret: &Path) -> String {
    format!(
        "[secrets]\ncatalog = false\npaths = [\"{}\"]\n[fingerprint]\nkey = \"test-key\"\n\
         [sensors]\nrepeat_interval = \"1ms\"\n{}",
        secret.display(),
        ch.config()
    )
}

#[test]
#[ignore = "privileged: real probes and the test ClickHouse (cargo xtask test runs it as root)"]
fn clickhouse_outage_under_load_loses_and_duplicates_nothing() {
    let mut ch = TestClickHouse::start_local("an outage");
    let w = workdir();
    let secret = w.path().join("api-token");
    std::fs::write(&secret, "fake-outage-token").unwrap();
    let agent = Agent::start(&live_config(&ch, &secret));
    let (stop, load) = steady_load(secret);
    std::thread::sleep(Duration::from_millis(1500));
    ch.stop();
    std::thread::sleep(Duration::from_secs(3));
    ch.restart();
    std::thread::sleep(Duration::from_secs(2));
    stop.store(true, Ordering::Relaxed);
    let opens = load.join().unwrap();
    let s = agent.stop();
    // Each open is its own record (repeat_interval below the load's pace), and all of them
    // are counted exactly.
    let reads = s.kind(EventKind::SecretRead);
    let counted: u64 = reads
        .iter()
        .filter_map(|e| match &e.body {
            credwatch::event::Body::SecretRead(r) => Some(1 + r.secret.repeats),
            _ => None,
        })
        .sum();
    assert_eq!(counted, opens, "{} secret reads", reads.len());
    let produced = s.events.len() as u64;
    let stats = &s.stats["pipeline"]["clickhouse"];
    assert!(
        stats["insert_failures"].as_u64().unwrap() > 0
            && stats["rows_spooled"].as_u64().unwrap() > 0,
        "the outage was felt: {stats:#}"
    );
    assert_eq!(stats["rows_dropped"], 0, "{stats:#}");
    assert_eq!(
        counts(&ch, "events"),
        (produced, produced),
        "every event once; stats {stats:#}"
    );
}

/// ClickHouse is down, the agent spools, then it is killed with -9. The next start, with
/// ClickHouse back, delivers every spooled row exactly once.
#[test]
#[ignore = "privileged: real probes and the test ClickHouse (cargo xtask test runs it as root)"]
fn kill_9_with_a_full_spool_then_restart_delivers_everything() {
    let mut ch = TestClickHouse::start_local("a stopped server");
    let w = workdir();
    let secret = w.path().join("api-token");
    std::fs::write(&secret, "fake-spool-token").unwrap();
    let cfg = live_config(&ch, &secret);
    let cfg_file = write_config(w.path(), &cfg);
    ok(&credwatch(&[
        "migrate",
        "--config",
        cfg_file.to_str().unwrap(),
    ]));
    ch.stop();
    let state = w.path().join("state");
    let spool = state.join("spool");
    let agent = Agent::start_with_state(&cfg, &state);
    let (stop, load) = steady_load(secret);
    // Several batches on disk (flush every 200 ms, inserts refused).
    let deadline = Instant::now() + Duration::from_secs(30);
    while spool_files(&spool).len() < 3 {
        assert!(
            Instant::now() < deadline,
            "nothing spooled: {}",
            agent.stderr_text()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    stop.store(true, Ordering::Relaxed);
    load.join().unwrap();
    agent.kill9();
    let spooled: Vec<String> = spool_files(&spool)
        .iter()
        .flat_map(|f| {
            let text = std::fs::read_to_string(f).unwrap();
            text.lines()
                .skip(1)
                .map(|l| serde_json::from_str::<EventRow>(l).unwrap().id)
                .collect::<Vec<_>>()
        })
        .collect();
    assert!(spooled.len() > 10, "{} rows spooled", spooled.len());

    ch.restart();
    let agent = Agent::start_with_state(&cfg, &state);
    let deadline = Instant::now() + Duration::from_secs(30);
    while !spool_files(&spool).is_empty() {
        assert!(
            Instant::now() < deadline,
            "spool not delivered: {}",
            agent.stderr_text()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    agent.stop();
    let landed: HashSet<String> = ch
        .rows::<String>("SELECT id FROM events")
        .into_iter()
        .collect();
    let missing = spooled.iter().filter(|id| !landed.contains(*id)).count();
    assert_eq!(missing, 0, "of {} spooled rows", spooled.len());
    let (rows, distinct) = counts(&ch, "events");
    assert_eq!(rows, distinct, "no duplicates");
}

fn spool_files(dir: &Path) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(dir)
        .map(|d| {
            d.filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| p.extension().is_some_and(|x| x == "batch"))
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}
