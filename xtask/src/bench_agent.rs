//! The agent's own costs, beyond what it adds to syscalls: syscall → alert latency, the
//! ClickHouse insert rate, memory with 10 k live processes and per learned baseline.

use std::{
    fs,
    io::{BufRead, BufReader},
    path::Path,
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};

use crate::launch::{AgentProcess, Launch};

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let i = ((sorted.len() - 1) as f64 * p).round() as usize;
    sorted[i]
}

/// Starts `credwatch run` with `config` in `work/<name>/` (with `--stats-file` there when
/// `stats`), waits for "ready".
fn start_agent(
    agent: &Path,
    work: &Path,
    name: &str,
    config: &str,
    stats: bool,
) -> Result<AgentProcess> {
    let dir = work.join(name);
    fs::create_dir_all(&dir)?;
    Launch {
        bin: agent,
        config,
        work: &dir,
        state_dir: None,
        events: false,
        stats,
        extra_args: &[],
        log: Some("warn,credwatch::agent=info"),
        env: &[],
        ready_timeout: Duration::from_secs(120),
    }
    .start()
    .map_err(anyhow::Error::msg)
}

fn stop_agent(mut a: AgentProcess) {
    let _ = a.stop(Duration::from_secs(60));
}

fn rss_kib(pid: u32) -> u64 {
    fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        })
        .unwrap_or(0)
}

pub struct Latency {
    pub samples: usize,
    pub p50_us: f64,
    pub p99_us: f64,
}

/// Time from `open()` of a secret to its alert line on the agent's stdout. The secret's
/// policy schedule excludes now and the suppression window is 0, so every read is one
/// `off_schedule` line.
pub fn alert_latency(agent: &Path, work: &Path) -> Result<Latency> {
    const READS: usize = 300;
    // A secret per read: each is the first read of its file by this process, which the
    // probe reports at once (a re-read of the same one would be a counted repeat).
    let dir = work.join("latency-secrets");
    let _ = fs::remove_dir_all(&dir);
    fs::create_dir_all(&dir)?;
    for i in 0..READS {
        fs::write(
            dir.join(format!("secret-{i:03}")),
            format!("fake-latency-{i}"),
        )?;
    }
    let hour = (std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)?
        .as_secs()
        / 3600
        + 6)
        % 24;
    let s = dir.display();
    let cfg = format!(
        "[secrets]\ncatalog = false\npaths = [\"{s}/*\"]\n[detect]\nsuppression_window = \"0s\"\n\
         [metrics]\nlisten = \"\"\n[[credential]]\npath = \"{s}/*\"\nschedule = [\"daily {hour:02}:00-{:02}:00\"]\n",
        (hour + 1) % 24
    );
    let child = start_agent(agent, work, "latency", &cfg, false)?;
    let mut us = Vec::new();
    for i in 0..READS {
        std::thread::sleep(Duration::from_millis(15));
        let seen = child.stdout.lock().unwrap().len();
        let t0 = Instant::now();
        drop(fs::File::open(dir.join(format!("secret-{i:03}")))?);
        // The reader thread stamps each line as it arrives: polling does not blur it.
        let deadline = t0 + Duration::from_secs(5);
        let t1 = loop {
            if let Some((t, _)) = child.stdout.lock().unwrap().get(seen) {
                break Some(*t);
            }
            if Instant::now() > deadline {
                break None;
            }
            std::thread::sleep(Duration::from_micros(200));
        };
        match t1 {
            Some(t1) => us.push(t1.duration_since(t0).as_secs_f64() * 1e6),
            None => {
                stop_agent(child);
                bail!("no alert within 5 s of a read");
            }
        }
    }
    stop_agent(child);
    us.sort_by(f64::total_cmp);
    Ok(Latency {
        samples: us.len(),
        p50_us: percentile(&us, 0.5),
        p99_us: percentile(&us, 0.99),
    })
}

pub struct ClickHouseRate {
    pub rows: u64,
    pub seconds: f64,
    pub rows_per_s: f64,
    /// The test engine alone on the same rows (in-process, from a file, no HTTP): the most
    /// any client could get through it on this machine.
    pub engine_rows_per_s: f64,
}

/// The agent's ClickHouse writer into a fresh test ClickHouse (the same server the tests use).
pub fn clickhouse_rate(root: &Path, work: &Path) -> Result<ClickHouseRate> {
    let python = crate::ensure_test_clickhouse(root)?;
    let python = python.as_path();
    let data = work.join("chdb");
    let _ = fs::remove_dir_all(&data);
    let mut front = Command::new(python)
        .arg(root.join("tests/clickhouse/front.py"))
        .arg("--data")
        .arg(&data)
        .args(["--port", "0"])
        .stdout(Stdio::piped())
        .spawn()
        .context("starting the test ClickHouse")?;
    let mut line = String::new();
    BufReader::new(front.stdout.take().unwrap()).read_line(&mut line)?;
    let agent = (|| {
        let url = line
            .trim()
            .strip_prefix("listening on ")
            .context("test ClickHouse did not start")?;
        let out = Command::new(root.join("target/release/examples/clickhouse_throughput"))
            .args([url, "1000000"])
            .output()?;
        if !out.status.success() {
            bail!(
                "clickhouse_throughput: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        let text = String::from_utf8_lossy(&out.stdout);
        let v: Vec<f64> = text
            .split_whitespace()
            .filter_map(|x| x.parse().ok())
            .collect();
        match v.as_slice() {
            [rate, rows, secs] => Ok((*rate, *rows as u64, *secs)),
            _ => bail!("clickhouse_throughput printed {text:?}"),
        }
    })();
    // chdb holds its data dir exclusively: the front must be gone before the engine-only run.
    let _ = front.kill();
    let _ = front.wait();
    let result = agent.and_then(|(rate, rows, seconds)| {
        let out = Command::new(python)
            .arg(root.join("tests/clickhouse/ceiling.py"))
            .arg("--data")
            .arg(&data)
            .args(["--database", "bench"])
            .output()?;
        let text = String::from_utf8_lossy(&out.stdout);
        let engine = text
            .split_whitespace()
            .next()
            .and_then(|v| v.parse().ok())
            .with_context(|| {
                format!(
                    "ceiling.py printed {text:?}: {}",
                    String::from_utf8_lossy(&out.stderr)
                )
            })?;
        Ok(ClickHouseRate {
            rows,
            seconds,
            rows_per_s: rate,
            engine_rows_per_s: engine,
        })
    });
    let _ = fs::remove_dir_all(&data);
    result
}

pub struct Memory {
    pub idle_rss_mib: f64,
    pub with_processes_rss_mib: f64,
    pub processes: usize,
    pub tracked: u64,
    pub bytes_per_baseline: f64,
    pub baselines: u64,
    pub baseline_checkpoint_ms: f64,
}

/// Agent RSS with 100 k learned baselines in its store (written by the `baseline_memory`
/// example into the agent's state dir, so the agent loads them at start), before and after
/// 10 k processes start that each hold a credential given in their environment (an exec
/// record, a process table entry and a holder each); and memory per learned baseline.
pub fn memory(root: &Path, agent: &Path, work: &Path) -> Result<Memory> {
    use std::os::unix::fs::DirBuilderExt;
    const PROCS: usize = 10_000;
    let stats = work.join("memory/stats.json");
    let state = work.join("memory/state");
    let _ = fs::remove_dir_all(&state);
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(&state)?;
    let out = Command::new(root.join("target/release/examples/baseline_memory"))
        .arg("100000")
        .arg(&state)
        .output()?;
    if !out.status.success() {
        bail!("baseline_memory: {}", String::from_utf8_lossy(&out.stderr));
    }
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let v: Vec<f64> = text
        .split_whitespace()
        .filter_map(|x| x.parse().ok())
        .collect();
    let [per, ms, n] = v.as_slice() else {
        bail!("baseline_memory printed {text:?}");
    };
    let child = start_agent(agent, work, "memory", "[metrics]\nlisten = \"\"\n", true)?;
    std::thread::sleep(Duration::from_secs(2));
    let idle = rss_kib(child.pid());
    let mut sleepers = Vec::with_capacity(PROCS);
    let spawned = (|| -> Result<()> {
        for i in 0..PROCS {
            sleepers.push(
                Command::new("sleep")
                    .arg("300")
                    .env("BENCH_API_TOKEN", format!("fake-bench-holder-token-{i:06}"))
                    .stdin(Stdio::null())
                    .spawn()?,
            );
        }
        Ok(())
    })();
    std::thread::sleep(Duration::from_secs(3));
    let loaded = rss_kib(child.pid());
    let tracked = fs::read(&stats)
        .ok()
        .and_then(|b| serde_json::from_slice::<serde_json::Value>(&b).ok())
        .and_then(|v| v["processes"].as_u64())
        .unwrap_or(0);
    for mut s in sleepers {
        let _ = s.kill();
        let _ = s.wait();
    }
    stop_agent(child);
    spawned?;
    Ok(Memory {
        idle_rss_mib: idle as f64 / 1024.0,
        with_processes_rss_mib: loaded as f64 / 1024.0,
        processes: PROCS,
        tracked,
        bytes_per_baseline: *per,
        baselines: *n as u64,
        baseline_checkpoint_ms: *ms,
    })
}
