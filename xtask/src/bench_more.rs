//! The bench's measurements beyond syscall overhead: syscall → alert latency, ClickHouse
//! insert rate, agent memory with 10 k live processes, memory per learned baseline, and
//! the PNG chart of the overhead table.

use std::{
    fs,
    io::{BufRead, BufReader},
    path::Path,
    process::{Child, Command, Stdio},
    sync::mpsc,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let i = ((sorted.len() - 1) as f64 * p).round() as usize;
    sorted[i]
}

/// Starts `credwatch run` with `config` (and `--stats-file` when given), waits for
/// "ready", keeps stderr drained.
fn start_agent(
    agent: &Path,
    work: &Path,
    name: &str,
    config: &str,
    stats: Option<&Path>,
) -> Result<Child> {
    let cfg = work.join(format!("{name}.toml"));
    fs::write(&cfg, config)?;
    let mut cmd = Command::new(agent);
    cmd.args(["run", "--config"])
        .arg(&cfg)
        .arg("--state-dir")
        .arg(work.join(format!("{name}-state")));
    if let Some(s) = stats {
        cmd.arg("--stats-file").arg(s);
    }
    let mut child = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .context("starting credwatch")?;
    let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
    if !lines
        .by_ref()
        .map_while(Result::ok)
        .any(|l| l.contains("credwatch ready"))
    {
        let _ = child.kill();
        bail!("credwatch did not start");
    }
    std::thread::spawn(move || for _ in lines.map_while(Result::ok) {});
    Ok(child)
}

fn stop_agent(mut child: Child) {
    // SAFETY: signalling our own child.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let _ = child.wait();
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
    let secret = work.join("latency-secret");
    fs::write(&secret, "fake-latency-credential")?;
    let hour = (std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)?
        .as_secs()
        / 3600
        + 6)
        % 24;
    let s = secret.display();
    let cfg = format!(
        "[secrets]\ncatalog = false\npaths = [\"{s}\"]\n[detect]\nsuppression_window = \"0s\"\n\
         [metrics]\nlisten = \"\"\n[[credential]]\npath = \"{s}\"\nschedule = [\"daily {hour:02}:00-{:02}:00\"]\n",
        (hour + 1) % 24
    );
    let mut child = start_agent(agent, work, "latency", &cfg, None)?;
    let (tx, rx) = mpsc::channel();
    let out = child.stdout.take().unwrap();
    std::thread::spawn(move || {
        for l in BufReader::new(out).lines().map_while(Result::ok) {
            if l.contains("\"off_schedule\"") && tx.send(Instant::now()).is_err() {
                return;
            }
        }
    });
    let mut us = Vec::new();
    for _ in 0..300 {
        std::thread::sleep(Duration::from_millis(15));
        let t0 = Instant::now();
        drop(fs::File::open(&secret)?);
        match rx.recv_timeout(Duration::from_secs(5)) {
            Ok(t1) => us.push(t1.duration_since(t0).as_secs_f64() * 1e6),
            Err(_) => {
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

/// Agent RSS before and after 10 k processes start (each an exec record and a process table
/// entry), and memory per learned baseline from the `baseline_memory` example.
pub fn memory(root: &Path, agent: &Path, work: &Path) -> Result<Memory> {
    const PROCS: usize = 10_000;
    let stats = work.join("memory-stats.json");
    let child = start_agent(
        agent,
        work,
        "memory",
        "[metrics]\nlisten = \"\"\n",
        Some(&stats),
    )?;
    std::thread::sleep(Duration::from_secs(2));
    let idle = rss_kib(child.id());
    let mut sleepers = Vec::with_capacity(PROCS);
    let spawned = (|| -> Result<()> {
        for _ in 0..PROCS {
            sleepers.push(
                Command::new("sleep")
                    .arg("300")
                    .stdin(Stdio::null())
                    .spawn()?,
            );
        }
        Ok(())
    })();
    std::thread::sleep(Duration::from_secs(3));
    let loaded = rss_kib(child.id());
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

    let out = Command::new(root.join("target/release/examples/baseline_memory"))
        .arg("100000")
        .output()?;
    if !out.status.success() {
        bail!("baseline_memory: {}", String::from_utf8_lossy(&out.stderr));
    }
    let text = String::from_utf8_lossy(&out.stdout);
    let v: Vec<f64> = text
        .split_whitespace()
        .filter_map(|x| x.parse().ok())
        .collect();
    let [per, ms, n] = v.as_slice() else {
        bail!("baseline_memory printed {text:?}");
    };
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

/// Grouped bars of ns added per operation (log scale), one group per workload.
pub fn chart(path: &Path, rows: &[(String, Vec<(&'static str, f64)>)]) -> Result<bool> {
    use plotters::prelude::*;
    let font = ["dejavu/DejaVuSans.ttf", "DejaVuSans.ttf"]
        .iter()
        .map(|f| Path::new("/usr/share/fonts/truetype").join(f))
        .find_map(|p| fs::read(p).ok());
    let Some(font) = font else {
        // plotters needs a font for any text; without one there is no readable chart.
        return Ok(false);
    };
    let font: &'static [u8] = Box::leak(font.into_boxed_slice());
    plotters::style::register_font("sans-serif", FontStyle::Normal, font)
        .map_err(|_| anyhow::anyhow!("font not usable"))?;
    let monitors: Vec<&str> = rows
        .first()
        .map(|(_, v)| v.iter().map(|(m, _)| *m).collect())
        .unwrap_or_default();
    let max = rows
        .iter()
        .flat_map(|(_, v)| v.iter().map(|(_, x)| *x))
        .filter(|x| x.is_finite())
        .fold(1000.0f64, f64::max);
    let root = BitMapBackend::new(path, (1100, 560)).into_drawing_area();
    root.fill(&WHITE)?;
    let groups = rows.len().max(1);
    let mut c = ChartBuilder::on(&root)
        .caption(
            "ns added per operation (median, log scale; lower is better)",
            ("sans-serif", 22),
        )
        .margin(15)
        .x_label_area_size(40)
        .y_label_area_size(70)
        .build_cartesian_2d(0f64..groups as f64, (50f64..max * 2.0).log_scale())?;
    c.configure_mesh()
        .disable_x_mesh()
        .x_labels(0)
        .y_desc("ns added")
        .draw()?;
    let colors = [
        RGBColor(31, 119, 180),
        RGBColor(255, 127, 14),
        RGBColor(44, 160, 44),
        RGBColor(150, 150, 150),
    ];
    let width = 0.8 / monitors.len().max(1) as f64;
    for (mi, m) in monitors.iter().enumerate() {
        let color = colors[mi % colors.len()];
        c.draw_series(rows.iter().enumerate().filter_map(|(gi, (_, v))| {
            let x = v.get(mi)?.1;
            if !x.is_finite() || x <= 50.0 {
                return None;
            }
            let x0 = gi as f64 + 0.1 + mi as f64 * width;
            Some(Rectangle::new(
                [(x0, 50.0), (x0 + width * 0.9, x)],
                color.filled(),
            ))
        }))?
        .label(*m)
        .legend(move |(x, y)| Rectangle::new([(x, y - 5), (x + 12, y + 5)], color.filled()));
    }
    for (gi, (name, _)) in rows.iter().enumerate() {
        root.draw(&Text::new(
            name.clone(),
            (
                85 + ((gi as f64 + 0.2) * (1100.0 - 100.0) / groups as f64) as i32,
                530,
            ),
            ("sans-serif", 16),
        ))?;
    }
    c.configure_series_labels()
        .border_style(BLACK)
        .background_style(WHITE.mix(0.8))
        .position(SeriesLabelPosition::UpperLeft)
        .draw()?;
    root.present()?;
    Ok(true)
}
