//! Alert sinks and the agent's own metrics: a webhook receiver, syslog listeners (RFC 5424
//! parsed by a real parser), an OCSF file; a dead webhook next to stdout; `/metrics` parsed as
//! Prometheus text while drops are forced.

use std::{
    io::{BufRead, BufReader},
    net::{TcpListener, UdpSocket},
    path::Path,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use credwatch::alert::Alert;
use credwatch_tests::{
    Actor, Agent, credwatch, fixture, ok, parse_alerts, window_excluding_now, workdir,
};
use hmac::{Hmac, Mac};
use serde_json::Value;
use sha2::Sha256;

const ACTOR: &str = env!("CARGO_BIN_EXE_cw-actor");

/// (body, `X-Credwatch-Signature`) of each POST received.
type Posts = Arc<Mutex<Vec<(String, Option<String>)>>>;

/// Collects webhook POST bodies with their signature header.
fn webhook_receiver() -> (u16, Posts) {
    let server = tiny_http::Server::http("127.0.0.1:0").unwrap();
    let port = server.server_addr().to_ip().unwrap().port();
    let got = Arc::new(Mutex::new(Vec::new()));
    let sink = got.clone();
    std::thread::spawn(move || {
        for mut req in server.incoming_requests() {
            let mut body = String::new();
            req.as_reader().read_to_string(&mut body).unwrap();
            let sig = req
                .headers()
                .iter()
                .find(|h| h.field.equiv("X-Credwatch-Signature"))
                .map(|h| h.value.to_string());
            sink.lock().unwrap().push((body, sig));
            let _ = req.respond(tiny_http::Response::empty(200));
        }
    });
    (port, got)
}

/// RFC 5424 messages received over UDP (one per datagram) and TCP (octet counting).
fn syslog_listeners() -> (u16, u16, Arc<Mutex<Vec<String>>>) {
    let got = Arc::new(Mutex::new(Vec::new()));
    let udp = UdpSocket::bind("127.0.0.1:0").unwrap();
    let udp_port = udp.local_addr().unwrap().port();
    let sink = got.clone();
    std::thread::spawn(move || {
        let mut buf = vec![0u8; 65536];
        while let Ok(n) = udp.recv(&mut buf) {
            sink.lock()
                .unwrap()
                .push(String::from_utf8_lossy(&buf[..n]).into_owned());
        }
    });
    let tcp = TcpListener::bind("127.0.0.1:0").unwrap();
    let tcp_port = tcp.local_addr().unwrap().port();
    let sink = got.clone();
    std::thread::spawn(move || {
        for conn in tcp.incoming() {
            let Ok(conn) = conn else { continue };
            let sink = sink.clone();
            std::thread::spawn(move || read_frames(BufReader::new(conn), "tcp:", &sink));
        }
    });
    (udp_port, tcp_port, got)
}

/// RFC 6587 octet-counted frames (`LEN SP MSG`) until EOF.
fn read_frames(mut r: impl BufRead, tag: &str, sink: &Mutex<Vec<String>>) {
    loop {
        let mut len = Vec::new();
        if r.read_until(b' ', &mut len).unwrap_or(0) == 0 {
            return;
        }
        let Ok(n) = String::from_utf8_lossy(&len).trim().parse::<usize>() else {
            return;
        };
        let mut msg = vec![0u8; n];
        if r.read_exact(&mut msg).is_err() {
            return;
        }
        sink.lock()
            .unwrap()
            .push(format!("{tag}{}", String::from_utf8_lossy(&msg)));
    }
}

/// `credwatch replay` of the baseline fixtures (11 alerts) with the config at `cfg`.
fn replay_baselines(cfg: &Path) -> std::process::Output {
    credwatch(&[
        "replay",
        "--config",
        cfg.to_str().unwrap(),
        &fixture("replay-baselines-day0.ndjson"),
        &fixture("replay-baselines-later.ndjson"),
    ])
}

fn wait_for<T>(what: &str, timeout: Duration, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The OCSF 1.3 Detection Finding attributes marked required (base event + class).
fn assert_ocsf_detection_finding(o: &Value) {
    assert_eq!(o["class_uid"], 2004, "{o:#}");
    assert_eq!(o["category_uid"], 2);
    let activity = o["activity_id"].as_u64().unwrap();
    assert!(matches!(activity, 1 | 2), "{o:#}");
    assert_eq!(o["type_uid"].as_u64().unwrap(), 200400 + activity);
    assert!(
        o["time"].as_i64().unwrap() > 1_700_000_000_000,
        "time in ms"
    );
    assert!((1..=6).contains(&o["severity_id"].as_u64().unwrap()));
    assert_eq!(o["metadata"]["product"]["name"], "credwatch");
    assert!(o["metadata"]["version"].as_str().unwrap().starts_with("1."));
    assert!(!o["finding_info"]["uid"].as_str().unwrap().is_empty());
    assert!(!o["finding_info"]["title"].as_str().unwrap().is_empty());
}

#[test]
#[ignore = "needs the agent binary (cargo xtask test builds it)"]
fn replayed_alerts_reach_every_sink() {
    let w = workdir();
    let (hook_port, hooks) = webhook_receiver();
    let (udp_port, tcp_port, syslog) = syslog_listeners();
    let key = w.path().join("hook.key");
    std::fs::write(&key, "test-hook-key\n").unwrap();
    let ocsf_file = w.path().join("out/alerts.ocsf.jsonl");
    let policy = std::fs::read_to_string(fixture("replay-baselines.toml")).unwrap();
    let cfg = format!(
        "{policy}\n[[alerts.file]]\npath = \"{}\"\nformat = \"ocsf\"\n\n\
         [[alerts.webhook]]\nurl = \"http://127.0.0.1:{hook_port}/soc/in\"\nsecret_file = \"{}\"\n\n\
         [[alerts.syslog]]\naddress = \"udp://127.0.0.1:{udp_port}\"\n\n\
         [[alerts.syslog]]\naddress = \"tcp://127.0.0.1:{tcp_port}\"\nfacility = \"local3\"\n",
        ocsf_file.display(),
        key.display()
    );
    let cfg_path = w.path().join("credwatch.toml");
    std::fs::write(&cfg_path, cfg).unwrap();
    let stdout = parse_alerts(&ok(&replay_baselines(&cfg_path)));
    let keys = |v: &mut Vec<String>| {
        v.sort();
        v.clone()
    };
    let mut want: Vec<String> = stdout.iter().map(|a| a.dedup_key.clone()).collect();
    let want = keys(&mut want);
    assert_eq!(want.len(), 11);

    // Webhook: every alert, signed with the key (trailing newline of the file ignored).
    let hooks = hooks.lock().unwrap().clone();
    let mut got: Vec<String> = hooks
        .iter()
        .map(|(body, sig)| {
            let mut mac = Hmac::<Sha256>::new_from_slice(b"test-hook-key").unwrap();
            mac.update(body.as_bytes());
            let expect = format!("sha256={}", hex::encode(mac.finalize().into_bytes()));
            assert_eq!(sig.as_deref(), Some(expect.as_str()), "signature");
            let a: Alert = serde_json::from_str(body).unwrap();
            a.dedup_key
        })
        .collect();
    assert_eq!(keys(&mut got), want, "webhook");

    // Syslog: RFC 5424 over UDP and TCP, fields in structured data, the alert as MSG.
    let msgs = syslog.lock().unwrap().clone();
    for transport in ["udp", "tcp"] {
        let mut got = Vec::new();
        for raw in &msgs {
            let (is_tcp, text) = match raw.strip_prefix("tcp:") {
                Some(t) => (true, t),
                None => (false, raw.as_str()),
            };
            if is_tcp != (transport == "tcp") {
                continue;
            }
            let m = syslog_loose::parse_message(text, syslog_loose::Variant::RFC5424);
            assert!(
                matches!(m.protocol, syslog_loose::Protocol::RFC5424(1)),
                "{text}"
            );
            assert_eq!(m.appname, Some("credwatch"));
            assert_eq!(m.msgid, Some("2004"));
            let expect_facility = if is_tcp {
                syslog_loose::SyslogFacility::LOG_LOCAL3
            } else {
                syslog_loose::SyslogFacility::LOG_AUTH
            };
            assert_eq!(m.facility, Some(expect_facility));
            let sd = m
                .structured_data
                .iter()
                .find(|e| e.id == "credwatch@32473")
                .expect("credwatch structured data");
            let key = sd
                .params
                .iter()
                .find(|(k, _)| *k == "dedup_key")
                .map(|(_, v)| v.to_string())
                .unwrap();
            let body: Alert = serde_json::from_str(m.msg).unwrap();
            assert_eq!(body.dedup_key, key);
            got.push(key);
        }
        assert_eq!(keys(&mut got), want, "syslog over {transport}");
    }

    // OCSF file: one Detection Finding per alert with the required attributes.
    let text = std::fs::read_to_string(&ocsf_file).unwrap();
    let mut got: Vec<String> = text
        .lines()
        .map(|l| {
            let o: Value = serde_json::from_str(l).unwrap();
            assert_ocsf_detection_finding(&o);
            o["finding_info"]["uid"].as_str().unwrap().to_owned()
        })
        .collect();
    assert_eq!(keys(&mut got), want, "ocsf file");
}

/// A syslog-over-TLS listener (RFC 5425) with a certificate for 127.0.0.1 from a private
/// CA of its own; returns (port, CA PEM, received messages).
fn tls_syslog_listener() -> (u16, String, Arc<Mutex<Vec<String>>>) {
    let (cfg, ca_pem) = credwatch_tests::tls_server("127.0.0.1");
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = l.local_addr().unwrap().port();
    let got = Arc::new(Mutex::new(Vec::new()));
    let sink = got.clone();
    std::thread::spawn(move || {
        for conn in l.incoming().flatten() {
            let (cfg, sink) = (cfg.clone(), sink.clone());
            std::thread::spawn(move || {
                let tls = rustls::ServerConnection::new(cfg).unwrap();
                let stream = rustls::StreamOwned::new(tls, conn);
                read_frames(BufReader::new(stream), "", &sink);
            });
        }
    });
    (port, ca_pem, got)
}

/// Syslog over TLS verifies the server against `ca_file`: the right CA delivers every
/// alert, a wrong one delivers nothing (and says so).
#[test]
#[ignore = "needs the agent binary (cargo xtask test builds it)"]
fn syslog_over_tls_checks_the_server_certificate() {
    let w = workdir();
    let (port, ca, got) = tls_syslog_listener();
    let good = w.path().join("ca.pem");
    std::fs::write(&good, ca).unwrap();
    let other = rcgen::generate_simple_self_signed(vec!["127.0.0.1".to_owned()]).unwrap();
    let wrong = w.path().join("other-ca.pem");
    std::fs::write(&wrong, other.cert.pem()).unwrap();
    let policy = std::fs::read_to_string(fixture("replay-baselines.toml")).unwrap();
    let run = |ca: &Path| {
        let cfg = format!(
            "{policy}\n[[alerts.syslog]]\naddress = \"tls://127.0.0.1:{port}\"\nca_file = \"{}\"\ntimeout = \"2s\"\n",
            ca.display()
        );
        let path = w.path().join("credwatch.toml");
        std::fs::write(&path, cfg).unwrap();
        let out = replay_baselines(&path);
        ok(&out);
        String::from_utf8_lossy(&out.stderr).into_owned()
    };
    let stderr = run(&wrong);
    assert!(
        got.lock().unwrap().is_empty(),
        "nothing reaches an unverified server"
    );
    assert!(stderr.contains("delivery failing"), "{stderr}");
    run(&good);
    let msgs = got.lock().unwrap().clone();
    assert_eq!(msgs.len(), 11, "{msgs:#?}");
    for m in &msgs {
        let p = syslog_loose::parse_message(m, syslog_loose::Variant::RFC5424);
        assert_eq!(p.appname, Some("credwatch"), "{m}");
        let body: Alert = serde_json::from_str(p.msg).unwrap();
        assert!(!body.dedup_key.is_empty());
    }
}

fn off_schedule_config(secret: &Path, extra: &str) -> String {
    format!(
        "[secrets]\ncatalog = false\npaths = [\"{s}\"]\n[detect]\nsuppression_window = \"0s\"\n\
         [[credential]]\npath = \"{s}\"\nschedule = [\"{window}\"]\n{extra}",
        s = secret.display(),
        window = window_excluding_now(),
    )
}

/// A webhook that accepts connections and never answers: stdout alerts still arrive at
/// once, and the webhook's failures are counted.
#[test]
#[ignore = "privileged: real probes (cargo xtask test runs it as root)"]
fn a_dead_webhook_does_not_delay_stdout_alerts() {
    let w = workdir();
    let secret = w.path().join("night-key");
    std::fs::write(&secret, "fake-night-credential").unwrap();
    let black_hole = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = black_hole.local_addr().unwrap().port();
    let held = Arc::new(Mutex::new(Vec::new()));
    let h = held.clone();
    std::thread::spawn(move || {
        for c in black_hole.incoming().flatten() {
            h.lock().unwrap().push(c); // keep it open, say nothing
        }
    });
    let cfg = off_schedule_config(
        &secret,
        &format!(
            "[[alerts.webhook]]\nurl = \"http://127.0.0.1:{port}/hook\"\ntimeout = \"5s\"\n\
             [metrics]\nlisten = \"127.0.0.1:0\"\n"
        ),
    );
    let agent = Agent::start(&cfg);
    let mut delays = Vec::new();
    for _ in 0..3 {
        let t0 = Instant::now();
        let pid = Actor::new(ACTOR).open(&secret).pid();
        let t = agent
            .wait_stdout(Duration::from_secs(10), |l| {
                serde_json::from_str::<Alert>(l).is_ok_and(|a| {
                    a.alert == credwatch::alert::AlertKind::OffSchedule
                        && a.evidence.iter().any(|e| e.pid == pid)
                })
            })
            .expect("the alert reached stdout");
        delays.push(t - t0);
    }
    assert!(
        delays.iter().all(|d| *d < Duration::from_secs(2)),
        "stdout alerts took {delays:?} with the webhook hanging for 5 s each"
    );
    let url = agent.metrics_url().expect("metrics listener");
    let failures = wait_for(
        "webhook failures in /metrics",
        Duration::from_secs(20),
        || {
            let text = ureq::get(&url).call().ok()?.into_string().ok()?;
            let v = sample(&text, "credwatch_sink_failures_total", |l| {
                l.get("sink").is_some()
            })?;
            (v > 0.0).then_some(v)
        },
    );
    assert!(failures >= 1.0);
    agent.stop();
}

/// Parses Prometheus text: the value of the first sample of `name` whose labels pass
/// `labels`.
fn sample(
    text: &str,
    name: &str,
    labels: impl Fn(&prometheus_parse::Labels) -> bool,
) -> Option<f64> {
    let lines = text.lines().map(|l| Ok(l.to_owned()));
    let scrape = prometheus_parse::Scrape::parse(lines).ok()?;
    scrape
        .samples
        .iter()
        .find(|s| s.metric == name && labels(&s.labels))
        .and_then(|s| match s.value {
            prometheus_parse::Value::Counter(v)
            | prometheus_parse::Value::Gauge(v)
            | prometheus_parse::Value::Untyped(v) => Some(v),
            _ => None,
        })
}

fn metric(text: &str, name: &str) -> Option<f64> {
    sample(text, name, |_| true)
}

fn labelled(text: &str, name: &str, label: &str, value: &str) -> Option<f64> {
    sample(text, name, |l| l.get(label) == Some(value))
}

#[test]
#[ignore = "privileged: real probes (cargo xtask test runs it as root)"]
fn metrics_parse_and_drop_counters_move() {
    let w = workdir();
    let token = w.path().join("token");
    std::fs::write(&token, "fake-metrics-token").unwrap();
    let cfg = format!(
        // Every open its own record (no repeat interval, no per-cgroup budget) into a small
        // ring, so the flood must overflow it.
        "[secrets]\ncatalog = false\npaths = [\"{}\"]\n[sensors]\nsecret_ring_bytes = 262144\n\
         wake_bytes = 131072\nrepeat_interval = \"0s\"\ncgroup_budget = 100000000\n\
         [metrics]\nlisten = \"127.0.0.1:0\"\n",
        token.display()
    );
    let agent = Agent::start(&cfg);
    let url = agent.metrics_url().expect("metrics listener in the log");
    let health = url.replace("/metrics", "/healthz");
    let before = wait_for("a first snapshot", Duration::from_secs(5), || {
        let text = ureq::get(&url).call().ok()?.into_string().ok()?;
        labelled(&text, "credwatch_probe_drops_total", "probe", "open").map(|v| (v, text))
    });
    assert_eq!(before.0, 0.0, "no drops before the flood");
    assert!(before.1.contains("# TYPE credwatch_events counter"));
    assert!(ureq::get(&health).call().unwrap().status() == 200);
    // Scrape while the flood runs: the ring's peak backlog must show up.
    let flood_token = token.clone();
    let flood = std::thread::spawn(move || Actor::new(ACTOR).flood(&flood_token, 200_000).run().1);
    let mut peak = 0.0f64;
    while !flood.is_finished() {
        if let Some(v) = ureq::get(&url)
            .call()
            .ok()
            .and_then(|r| r.into_string().ok())
            .and_then(|t| metric(&t, "credwatch_secret_ring_peak_bytes"))
        {
            peak = peak.max(v);
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let out = flood.join().unwrap();
    assert_eq!(out.trim(), "flooded 200000");
    std::thread::sleep(Duration::from_millis(1200));
    let text = ureq::get(&url).call().unwrap().into_string().unwrap();
    peak = peak.max(metric(&text, "credwatch_secret_ring_peak_bytes").unwrap_or(0.0));
    assert_eq!(
        metric(&text, "credwatch_secret_ring_size_bytes"),
        Some(262144.0)
    );
    assert!(
        peak > 0.0 && peak <= 262144.0,
        "ring peak backlog {peak} during a flood that overflows a 256 KiB ring"
    );
    let drops = wait_for("drops in /metrics", Duration::from_secs(10), || {
        let text = ureq::get(&url).call().ok()?.into_string().ok()?;
        labelled(&text, "credwatch_probe_drops_total", "probe", "open").filter(|v| *v > 0.0)
    });
    let s = agent.stop();
    let at_exit = s.stats["drops"]["open"].as_u64().unwrap();
    assert!(
        at_exit as f64 >= drops,
        "stats at exit ({at_exit}) include what /metrics showed ({drops})"
    );
}
