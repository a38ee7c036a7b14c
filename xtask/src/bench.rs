//! `cargo xtask bench`: the same syscall load with no monitor, credwatch, auditd and
//! bpftrace, alternated round by round (A B C D, A B C D…) on this machine, medians and
//! ratios printed and written to target/bench/. Leaves no audit rule or daemon behind.

use std::{
    collections::BTreeMap,
    fs,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};

const ROUNDS: usize = 5;
/// Watched secrets the first-read workload opens once each.
const FIRST_READS: usize = 2000;
const AUDIT_KEY: &str = "credwatch_bench";
/// The syscall rule equivalent to credwatch's connect probe (added with -a, removed with -d).
const AUDIT_CONNECT_RULE: [&str; 7] = [
    "always,exit",
    "-F",
    "arch=b64",
    "-S",
    "connect",
    "-k",
    AUDIT_KEY,
];

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Monitor {
    Baseline,
    Credwatch,
    Auditd,
    Bpftrace,
    /// bpftrace on the syscall exit tracepoints credwatch uses, with a filter that is never
    /// true: what attaching any program there costs on this kernel, before it does anything.
    Floor,
}

impl Monitor {
    fn name(self) -> &'static str {
        match self {
            Monitor::Baseline => "baseline",
            Monitor::Credwatch => "credwatch",
            Monitor::Auditd => "auditd",
            Monitor::Bpftrace => "bpftrace",
            Monitor::Floor => "tracepoint-floor",
        }
    }
}

struct Workload {
    name: &'static str,
    what: &'static str,
    ops: u64,
    args: Vec<String>,
}

/// A running monitor; `stop` returns the events it lost.
enum Running {
    None,
    Credwatch {
        agent: crate::launch::AgentProcess,
        stats: PathBuf,
    },
    Auditd {
        started_daemon: bool,
        secret: String,
        lost_before: u64,
    },
    Bpftrace {
        child: Child,
        out: PathBuf,
    },
}

pub fn bench(root: &Path) -> Result<()> {
    let t0 = Instant::now();
    crate::cargo(&[
        "build",
        "--release",
        "-p",
        "credwatch",
        "-p",
        "credwatch-tests",
        "--bins",
    ])?;
    crate::cargo(&[
        "build",
        "--release",
        "-p",
        "credwatch",
        "--example",
        "pipeline_throughput",
        "--example",
        "clickhouse_throughput",
        "--example",
        "baseline_memory",
    ])?;
    let agent = root.join("target/release/credwatch");
    let load = root.join("target/release/cw-bench");
    let out_dir = root.join("target/bench");
    let work = out_dir.join("work");
    let _ = fs::remove_dir_all(&work);
    fs::create_dir_all(&work)?;
    let secret = work.join("bench-secret-token");
    fs::write(&secret, "fake-bench-token-not-a-secret")?;
    let unrelated = work.join("unrelated.txt");
    fs::write(&unrelated, "public")?;
    // Distinct watched secrets, each opened once per run: first reads, never repeats.
    let firsts = work.join("first");
    fs::create_dir_all(&firsts)?;
    for i in 0..FIRST_READS {
        fs::write(
            firsts.join(format!("secret-{i:04}")),
            format!("fake-bench-{i}"),
        )?;
    }
    let udp_peer = std::net::UdpSocket::bind("127.0.0.1:0")?;
    let udp_addr = udp_peer.local_addr()?.to_string();

    let mut monitors = vec![Monitor::Baseline, Monitor::Credwatch];
    let mut unavailable = BTreeMap::new();
    match crate::deps::ensure_debian(&[crate::deps::Package {
        name: "auditd",
        provides: "/usr/sbin/auditctl",
    }]) {
        Ok(()) => monitors.push(Monitor::Auditd),
        Err(e) => {
            unavailable.insert("auditd", format!("{e:#}"));
        }
    }
    match crate::deps::ensure_debian(&[crate::deps::Package {
        name: "bpftrace",
        provides: "/usr/bin/bpftrace",
    }]) {
        Ok(()) => monitors.extend([Monitor::Bpftrace, Monitor::Floor]),
        Err(e) => {
            unavailable.insert("bpftrace", format!("{e:#}"));
        }
    }

    let s = secret.display().to_string();
    let workloads = vec![
        Workload {
            name: "open_unrelated",
            what: "openat+close, unwatched file",
            ops: 200_000,
            args: vec![
                "open".into(),
                unrelated.display().to_string(),
                "200000".into(),
            ],
        },
        Workload {
            name: "getppid",
            what: "an untraced syscall: the tax syscall tracepoints put on every process",
            ops: 500_000,
            args: vec!["getppid".into(), "500000".into()],
        },
        Workload {
            name: "open_watched_first",
            what: "openat+close, a watched secret this process has not read before",
            ops: FIRST_READS as u64,
            args: vec!["open-each".into(), firsts.display().to_string()],
        },
        Workload {
            name: "open_watched_again",
            what: "openat+close, the same watched secret again (a repeat)",
            ops: 50_000,
            args: vec!["open".into(), s.clone(), "50000".into()],
        },
        Workload {
            name: "uring_open",
            what: "IORING_OP_OPENAT+close, unwatched file",
            ops: 100_000,
            args: vec![
                "uring-open".into(),
                unrelated.display().to_string(),
                "100000".into(),
            ],
        },
        Workload {
            name: "exec_env_4k",
            what: "fork+exec /bin/true with a 4 KiB environment",
            ops: 1_000,
            args: vec!["exec-env".into(), "4096".into(), "1000".into()],
        },
        Workload {
            name: "udp_connect",
            what: "UDP connect",
            ops: 50_000,
            args: vec!["udp-connect".into(), udp_addr.clone(), "50000".into()],
        },
        Workload {
            name: "tcp_connect",
            what: "TCP connect+accept+close",
            ops: 20_000,
            args: vec!["tcp-connect".into(), "20000".into()],
        },
        Workload {
            name: "tcp_stream",
            what: "loopback TCP, 64-byte writes, one packet each",
            ops: 200_000,
            args: vec!["tcp-stream".into(), "200000".into()],
        },
    ];

    // ns/op samples per (monitor, workload); lost events per monitor.
    let mut samples: BTreeMap<(Monitor, &str), Vec<f64>> = BTreeMap::new();
    let mut lost: BTreeMap<Monitor, u64> = BTreeMap::new();
    let guard = AuditGuard::capture();
    for round in 0..ROUNDS {
        // Rotate the order each round so no monitor always runs on a warm or cold machine.
        let mut order = monitors.clone();
        order.rotate_left(round % monitors.len());
        for m in order {
            let running = start(m, &agent, &work, &s)?;
            for w in &workloads {
                let ns = run_load(&load, &w.args)?;
                samples.entry((m, w.name)).or_default().push(ns);
            }
            *lost.entry(m).or_default() += stop(running)?;
        }
        eprintln!(
            "bench: round {}/{ROUNDS} done ({:.0?})",
            round + 1,
            t0.elapsed()
        );
    }
    drop(guard);

    let pipeline = pipeline_throughput(&agent, &load, &work)?;
    let live_path =
        live_path_throughput(&root.join("target/release/examples/pipeline_throughput"))?;
    eprintln!("bench: syscall → alert latency");
    let latency = crate::bench_agent::alert_latency(&agent, &work)?;
    eprintln!("bench: ClickHouse insert rate");
    // A ClickHouse that cannot keep up is a result, not a reason to lose the other rows.
    let clickhouse = crate::bench_agent::clickhouse_rate(root, &work).map_err(|e| {
        eprintln!("bench: ClickHouse insert rate failed: {e:#}");
        format!("{e:#}")
    });
    eprintln!("bench: memory with 10 k processes and 100 k baselines");
    let memory = crate::bench_agent::memory(root, &agent, &work)?;

    // Report.
    let med = |m: Monitor, w: &str| samples.get(&(m, w)).map(|v| median(v));
    let mut md = String::new();
    md.push_str(&format!(
        "# credwatch bench ({} rounds, medians, ns per operation)\n\n",
        ROUNDS
    ));
    md.push_str("| workload | baseline ns/op |");
    for m in &monitors[1..] {
        md.push_str(&format!(" {} +ns |", m.name()));
    }
    // The peers a user would pick instead; the floor is a reference, not a peer.
    let peers: Vec<Monitor> = monitors[2..]
        .iter()
        .copied()
        .filter(|m| *m != Monitor::Floor)
        .collect();
    for m in &peers {
        md.push_str(&format!(" {} ÷ credwatch |", m.name()));
    }
    md.push('\n');
    md.push_str(&format!(
        "|---|---|{}\n",
        "---|".repeat(monitors.len() - 1 + peers.len())
    ));
    let mut json_rows: Vec<serde_json::Value> = Vec::new();
    for w in &workloads {
        let base = med(Monitor::Baseline, w.name).unwrap_or(f64::NAN);
        md.push_str(&format!("| {} ({}) | {:.0} |", w.name, w.what, base));
        let mut row =
            serde_json::json!({"name": w.name, "what": w.what, "ops": w.ops, "baseline_ns": base});
        let cw_added = med(Monitor::Credwatch, w.name)
            .map(|v| v - base)
            .unwrap_or(f64::NAN);
        for m in &monitors[1..] {
            let added = med(*m, w.name).map(|v| v - base).unwrap_or(f64::NAN);
            md.push_str(&format!(" {added:+.0} |"));
            row[format!("{}_added_ns", m.name())] = finite(added);
        }
        for m in &peers {
            let added = med(*m, w.name).map(|v| v - base).unwrap_or(f64::NAN);
            let ratio = added / cw_added;
            md.push_str(&format!(" {ratio:.1}× |"));
            row[format!("{}_vs_credwatch", m.name())] = finite(ratio);
        }
        md.push('\n');
        json_rows.push(row);
    }
    md.push_str("\ntcp_stream as packets per second:");
    for m in &monitors {
        if let Some(ns) = med(*m, "tcp_stream") {
            md.push_str(&format!(" {} {:.0}k,", m.name(), 1e6 / ns));
        }
    }
    md.pop();
    md.push('\n');
    md.push_str("\nEvents lost over all rounds: ");
    md.push_str(
        &monitors[1..]
            .iter()
            .map(|m| format!("{} {}", m.name(), lost.get(m).copied().unwrap_or(0)))
            .collect::<Vec<_>>()
            .join(", "),
    );
    md.push('\n');
    for (m, why) in &unavailable {
        md.push_str(&format!("\n{m}: not measured ({why})\n"));
    }
    md.push_str(&format!(
        "\nPipeline (replay, one thread): {:.0} events/s over {} events, {:.2} s, max RSS {} MiB\n",
        pipeline.events_per_s,
        pipeline.events,
        pipeline.seconds,
        pipeline.max_rss_kib / 1024
    ));
    md.push_str(&format!(
        "Live path (decode → enrichment → correlation → all detectors, one thread, synthetic \
         records of a pod's processes): {live_path:.0} records per CPU second\n"
    ));
    md.push_str(&format!(
        "Syscall → alert on stdout: p50 {:.0} µs, p99 {:.0} µs over {} reads\n",
        latency.p50_us, latency.p99_us, latency.samples
    ));
    match &clickhouse {
        Ok(ch) => md.push_str(&format!(
            "ClickHouse (agent writer → test ClickHouse, real engine): {:.0} rows/s ({} event rows in {:.1} s); \
             the engine alone on the same rows (in-process, no HTTP): {:.0} rows/s\n",
            ch.rows_per_s, ch.rows, ch.seconds, ch.engine_rows_per_s
        )),
        Err(e) => {
            let first = e.lines().last().unwrap_or_default();
            md.push_str(&format!(
                "ClickHouse (agent writer → test ClickHouse): FAILED: {first}\n"
            ))
        }
    }
    md.push_str(&format!(
        "Memory: agent RSS {:.1} MiB idle with 100 k learned baselines loaded, {:.1} MiB with {} more \
         live processes each holding a credential ({} tracked); {:.0} bytes per learned baseline ({} \
         baselines; writing them all to the store {:.0} ms)\n",
        memory.idle_rss_mib,
        memory.with_processes_rss_mib,
        memory.processes,
        memory.tracked,
        memory.bytes_per_baseline,
        memory.baselines,
        memory.baseline_checkpoint_ms
    ));
    let chart_rows: Vec<(String, Vec<(&'static str, f64)>)> = workloads
        .iter()
        .map(|w| {
            let base = med(Monitor::Baseline, w.name).unwrap_or(f64::NAN);
            (
                w.name.to_owned(),
                monitors[1..]
                    .iter()
                    .map(|m| {
                        (
                            m.name(),
                            med(*m, w.name).map(|v| v - base).unwrap_or(f64::NAN),
                        )
                    })
                    .collect(),
            )
        })
        .collect();
    match crate::chart::chart(&out_dir.join("overhead.png"), &chart_rows) {
        Ok(true) => md.push_str("\nChart: target/bench/overhead.png\n"),
        Ok(false) => md.push_str("\nChart: not drawn (no TrueType font found for labels)\n"),
        Err(e) => md.push_str(&format!("\nChart: failed ({e:#})\n")),
    }
    md.push_str(&format!("\nTotal bench time {:.0?}.\n", t0.elapsed()));

    let json = serde_json::json!({
        "rounds": ROUNDS,
        "workloads": json_rows,
        "lost": monitors[1..].iter().map(|m| (m.name(), lost.get(m).copied().unwrap_or(0))).collect::<BTreeMap<_, _>>(),
        "unavailable": unavailable,
        "pipeline": {
            "events": pipeline.events,
            "seconds": pipeline.seconds,
            "events_per_s": pipeline.events_per_s,
            "max_rss_kib": pipeline.max_rss_kib,
        },
        "live_path_records_per_cpu_s": live_path,
        "alert_latency_us": {"p50": latency.p50_us, "p99": latency.p99_us, "samples": latency.samples},
        "clickhouse": match &clickhouse {
            Ok(ch) => serde_json::json!({"rows": ch.rows, "seconds": ch.seconds, "rows_per_s": ch.rows_per_s, "engine_only_rows_per_s": finite(ch.engine_rows_per_s)}),
            Err(e) => serde_json::json!({"error": e}),
        },
        "memory": {
            "idle_rss_mib": memory.idle_rss_mib,
            "with_processes_rss_mib": memory.with_processes_rss_mib,
            "processes": memory.processes,
            "tracked_processes": memory.tracked,
            "bytes_per_baseline": memory.bytes_per_baseline,
            "baselines": memory.baselines,
            "baseline_checkpoint_ms": memory.baseline_checkpoint_ms,
        },
    });
    fs::write(out_dir.join("results.md"), &md)?;
    fs::write(
        out_dir.join("results.json"),
        serde_json::to_string_pretty(&json)? + "\n",
    )?;
    println!("{md}");
    println!("written: {}/results.md, results.json", out_dir.display());
    drop(udp_peer);
    Ok(())
}

fn finite(v: f64) -> serde_json::Value {
    if v.is_finite() {
        serde_json::json!((v * 10.0).round() / 10.0)
    } else {
        serde_json::Value::Null
    }
}

fn median(v: &[f64]) -> f64 {
    let mut s = v.to_vec();
    s.sort_by(|a, b| a.total_cmp(b));
    let n = s.len();
    if n % 2 == 1 {
        s[n / 2]
    } else {
        (s[n / 2 - 1] + s[n / 2]) / 2.0
    }
}

fn run_load(load: &Path, args: &[String]) -> Result<f64> {
    let out = Command::new(load)
        .args(args)
        .output()
        .with_context(|| format!("running {}", load.display()))?;
    if !out.status.success() {
        bail!(
            "{} {args:?}: {}",
            load.display(),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    String::from_utf8_lossy(&out.stdout)
        .trim()
        .parse()
        .context("load generator output")
}

fn start(m: Monitor, agent: &Path, work: &Path, secret: &str) -> Result<Running> {
    Ok(match m {
        Monitor::Baseline => Running::None,
        Monitor::Credwatch => {
            let config = format!(
                "[secrets]\npaths = [\"{secret}\", \"{}/first/*\"]\n",
                work.display()
            );
            let dir = work.join("credwatch");
            fs::create_dir_all(&dir)?;
            let launch = crate::launch::Launch {
                bin: agent,
                config: &config,
                work: &dir,
                state_dir: None,
                events: false,
                stats: true,
                extra_args: &[],
                log: None,
                env: &[],
                ready_timeout: Duration::from_secs(120),
            };
            let stats = launch.stats_path();
            let agent = launch.start().map_err(anyhow::Error::msg)?;
            Running::Credwatch { agent, stats }
        }
        Monitor::Auditd => {
            let started_daemon = !Command::new("pidof")
                .arg("auditd")
                .stdout(Stdio::null())
                .status()
                .is_ok_and(|s| s.success());
            if started_daemon {
                crate::run(&mut Command::new("auditd"))?;
                std::thread::sleep(Duration::from_millis(500));
            }
            crate::run(
                Command::new("auditctl")
                    .args(["-e", "1"])
                    .stdout(Stdio::null()),
            )?;
            crate::run(
                Command::new("auditctl")
                    .args(["-w", secret, "-p", "r", "-k", AUDIT_KEY])
                    .stdout(Stdio::null()),
            )?;
            crate::run(
                Command::new("auditctl")
                    .arg("-a")
                    .args(AUDIT_CONNECT_RULE)
                    .stdout(Stdio::null()),
            )?;
            Running::Auditd {
                started_daemon,
                secret: secret.to_owned(),
                lost_before: audit_lost(),
            }
        }
        Monitor::Bpftrace | Monitor::Floor => {
            let out = work.join("bpftrace.out");
            let script = if m == Monitor::Floor {
                "tracepoint:syscalls:sys_exit_openat,tracepoint:syscalls:sys_exit_connect \
                 /pid == 0/ { @n = count(); }\n"
                    .to_owned()
            } else {
                format!(
                    "tracepoint:syscalls:sys_enter_openat /str(args->filename) == \"{secret}\"/ {{ printf(\"open %d %s\\n\", pid, comm); }}\n\
                     tracepoint:syscalls:sys_exit_connect {{ printf(\"connect %d %s %d\\n\", pid, comm, args->ret); }}\n"
                )
            };
            let child = Command::new("bpftrace")
                .args(["-e", &script])
                .stdout(fs::File::create(&out)?)
                .stderr(Stdio::null())
                .spawn()
                .context("starting bpftrace")?;
            let deadline = Instant::now() + Duration::from_secs(60);
            while !fs::read_to_string(&out)
                .unwrap_or_default()
                .contains("Attaching")
            {
                if Instant::now() > deadline {
                    bail!("bpftrace did not attach within 60 s");
                }
                std::thread::sleep(Duration::from_millis(100));
            }
            std::thread::sleep(Duration::from_millis(300));
            Running::Bpftrace { child, out }
        }
    })
}

fn stop(r: Running) -> Result<u64> {
    Ok(match r {
        Running::None => 0,
        Running::Credwatch { mut agent, stats } => {
            agent
                .stop(Duration::from_secs(60))
                .map_err(anyhow::Error::msg)?;
            let stats: serde_json::Value =
                serde_json::from_slice(&fs::read(&stats).unwrap_or_default()).unwrap_or_default();
            // Sum of the per-probe drop counters.
            stats["drops"]
                .as_object()
                .map(|d| d.values().filter_map(|v| v.as_u64()).sum())
                .unwrap_or(0)
        }
        Running::Auditd {
            started_daemon,
            secret,
            lost_before,
        } => {
            let lost = audit_lost().saturating_sub(lost_before);
            remove_audit_rules(&secret);
            if started_daemon {
                let _ = Command::new("auditctl")
                    .args(["--signal", "TERM"])
                    .stdout(Stdio::null())
                    .status();
                std::thread::sleep(Duration::from_millis(300));
            }
            lost
        }
        Running::Bpftrace { mut child, out } => {
            signal(child.id(), libc::SIGINT);
            child.wait()?;
            fs::read_to_string(&out)
                .unwrap_or_default()
                .lines()
                .filter_map(|l| {
                    l.strip_prefix("Lost ")?
                        .split_whitespace()
                        .next()?
                        .parse::<u64>()
                        .ok()
                })
                .sum()
        }
    })
}

fn signal(pid: u32, sig: i32) {
    // SAFETY: plain kill(2) on a child we spawned.
    unsafe { libc::kill(pid as i32, sig) };
}

fn audit_lost() -> u64 {
    let out = Command::new("auditctl")
        .arg("-s")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_default();
    out.lines()
        .find_map(|l| l.strip_prefix("lost ")?.trim().parse().ok())
        .unwrap_or(0)
}

fn remove_audit_rules(secret: &str) {
    let _ = Command::new("auditctl")
        .args(["-W", secret, "-p", "r", "-k", AUDIT_KEY])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status();
    let _ = Command::new("auditctl")
        .arg("-d")
        .args(AUDIT_CONNECT_RULE)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status();
}

/// Restores the audit subsystem's enabled flag even when the bench fails midway, and removes
/// any rule carrying the bench key.
struct AuditGuard {
    enabled: Option<String>,
}

impl AuditGuard {
    fn capture() -> Self {
        let enabled = Command::new("auditctl")
            .arg("-s")
            .output()
            .ok()
            .and_then(|o| {
                String::from_utf8_lossy(&o.stdout)
                    .lines()
                    .find_map(|l| l.strip_prefix("enabled ").map(|v| v.trim().to_owned()))
            });
        AuditGuard { enabled }
    }
}

impl Drop for AuditGuard {
    fn drop(&mut self) {
        if let Ok(o) = Command::new("auditctl").arg("-l").output() {
            for rule in String::from_utf8_lossy(&o.stdout)
                .lines()
                .filter(|l| l.contains(AUDIT_KEY))
            {
                // `-w PATH -p r -k KEY` / `-a always,exit … -k KEY`: delete by the same spec.
                let spec: Vec<&str> = rule.split_whitespace().collect();
                let mut del: Vec<String> = spec.iter().map(|s| s.to_string()).collect();
                if let Some(first) = del.first_mut() {
                    *first = match first.as_str() {
                        "-w" => "-W".into(),
                        "-a" => "-d".into(),
                        other => other.into(),
                    };
                }
                let _ = Command::new("auditctl")
                    .args(&del)
                    .stdout(Stdio::null())
                    .stderr(Stdio::null())
                    .status();
            }
        }
        if let Some(e) = &self.enabled {
            let _ = Command::new("auditctl")
                .args(["-e", e])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status();
        }
    }
}

struct Pipeline {
    events: u64,
    seconds: f64,
    events_per_s: f64,
    max_rss_kib: i64,
}

fn live_path_throughput(example: &Path) -> Result<f64> {
    let out = Command::new(example)
        .arg("2000000")
        .output()
        .context("running pipeline_throughput")?;
    if !out.status.success() {
        bail!(
            "pipeline_throughput: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let text = String::from_utf8_lossy(&out.stdout);
    text.split_whitespace()
        .next()
        .and_then(|v| v.parse().ok())
        .context("pipeline_throughput output")
}

/// Replay of a synthetic stream through correlation and every detector, on one thread.
fn pipeline_throughput(agent: &Path, load: &Path, work: &Path) -> Result<Pipeline> {
    const EVENTS: u64 = 1_000_000;
    let file = work.join("replay.ndjson");
    crate::run(
        Command::new(load)
            .args(["gen-events", &EVENTS.to_string()])
            .arg(&file),
    )?;
    let t = Instant::now();
    // Alerts go to /dev/null: the cost measured is the pipeline's, not the terminal's.
    let child = Command::new(agent)
        .arg("replay")
        .arg(&file)
        .env("CREDWATCH_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()?;
    // wait4 gives this child's own peak RSS (RUSAGE_CHILDREN would include earlier builds).
    let mut status = 0;
    // SAFETY: waiting on our own child with valid out-pointers.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    let pid = unsafe { libc::wait4(child.id() as i32, &mut status, 0, &mut ru) };
    let seconds = t.elapsed().as_secs_f64();
    if pid < 0 || !libc::WIFEXITED(status) || libc::WEXITSTATUS(status) != 0 {
        bail!("replay of {} failed (status {status})", file.display());
    }
    let _ = fs::remove_file(&file);
    Ok(Pipeline {
        events: EVENTS,
        seconds,
        events_per_s: EVENTS as f64 / seconds,
        max_rss_kib: ru.ru_maxrss,
    })
}
