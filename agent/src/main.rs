use std::{path::PathBuf, process::ExitCode};

use anyhow::Result;
use clap::{Parser, Subcommand};
use credwatch::{
    agent::{self, RunOptions},
    config::Config,
    pipeline::NdjsonSink,
    replay,
};
use tracing_subscriber::EnvFilter;

/// eBPF runtime monitor for machine-credential use.
#[derive(Parser)]
#[command(name = "credwatch", version)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Load the probes and watch this node.
    Run {
        #[arg(long)]
        config: Option<PathBuf>,
        #[arg(long, default_value = "/var/lib/credwatch")]
        state_dir: PathBuf,
        /// Also write every enriched event as NDJSON (`-` for stdout).
        #[arg(long)]
        events: Option<PathBuf>,
        /// Write counters (events, probe drops) as JSON here every second and at exit.
        #[arg(long)]
        stats_file: Option<PathBuf>,
        /// Where alerts go as JSON lines (`-` for stdout).
        #[arg(long, default_value = "-")]
        alerts: PathBuf,
    },
    /// Feed recorded NDJSON events (the `--events` format) through the pipeline.
    Replay {
        #[arg(required = true)]
        files: Vec<PathBuf>,
        #[arg(long)]
        config: Option<PathBuf>,
        /// Learn into and judge against the baselines kept here (as `run` does); without
        /// it the replay starts from nothing and keeps nothing.
        #[arg(long)]
        state_dir: Option<PathBuf>,
        /// Write the pipeline's events (including derived credential uses) here.
        #[arg(long)]
        events: Option<PathBuf>,
        /// Where alerts go as JSON lines (`-` for stdout).
        #[arg(long, default_value = "-")]
        alerts: PathBuf,
    },
    /// Validate a config file; errors name the line.
    CheckConfig { file: PathBuf },
    /// Print the ClickHouse DDL (from `[clickhouse]` in the config) and the fleet queries.
    Schema {
        #[arg(long)]
        config: Option<PathBuf>,
    },
    /// Apply the ClickHouse schema (idempotent; refuses a newer schema version).
    Migrate {
        #[arg(long)]
        config: PathBuf,
    },
    /// Run the fleet-wide detections (cross-node token reuse, dormant credentials) over
    /// what every node wrote to ClickHouse; alerts as JSON lines.
    FleetCheck {
        #[arg(long)]
        config: PathBuf,
        /// Start of the range: RFC 3339 time, or a duration back from `--until` (`1h`).
        #[arg(long, default_value = "1h")]
        since: String,
        /// End of the range (RFC 3339); default now.
        #[arg(long)]
        until: Option<String>,
        #[arg(long, default_value = "-")]
        alerts: PathBuf,
    },
}

fn clickhouse_config(cfg: &Config) -> Result<&credwatch::clickhouse::Config> {
    cfg.clickhouse
        .as_ref()
        .ok_or_else(|| anyhow::anyhow!("the config has no [clickhouse] section"))
}

fn parse_time(s: &str) -> Result<chrono::DateTime<chrono::Utc>> {
    chrono::DateTime::parse_from_rfc3339(s)
        .map(|t| t.with_timezone(&chrono::Utc))
        .map_err(|e| anyhow::anyhow!("{s:?} is not an RFC 3339 time: {e}"))
}

fn runtime() -> Result<tokio::runtime::Runtime> {
    Ok(credwatch::current_thread_runtime()?)
}

fn load_config(path: Option<&PathBuf>) -> Result<Config> {
    match path {
        Some(p) => Config::load(p),
        None => Ok(Config::default()),
    }
}

fn main() -> ExitCode {
    credwatch::tune_allocator();
    tracing_subscriber::fmt()
        .with_env_filter(
            EnvFilter::try_from_env("CREDWATCH_LOG").unwrap_or_else(|_| EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        // Colour only for a person at a terminal: journald, `kubectl logs` and log shippers
        // get plain lines.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    match real_main(Cli::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("credwatch: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn real_main(cli: Cli) -> Result<()> {
    match cli.cmd {
        Cmd::Run {
            config,
            state_dir,
            events,
            stats_file,
            alerts,
        } => {
            let cfg = load_config(config.as_ref())?;
            runtime()?.block_on(agent::run(
                cfg,
                RunOptions {
                    state_dir,
                    events,
                    stats_file,
                    alerts,
                },
            ))
        }
        Cmd::Replay {
            files,
            config,
            state_dir,
            events,
            alerts,
        } => {
            let cfg = load_config(config.as_ref())?;
            let sink = events.as_deref().map(NdjsonSink::open).transpose()?;
            let alerts = NdjsonSink::open(&alerts)?;
            let s = replay::replay(&cfg, &files, state_dir.as_deref(), sink, Some(alerts))?;
            tracing::info!(
                lines = s.lines,
                events = s.events,
                bad_lines = s.bad_lines,
                "replay done"
            );
            Ok(())
        }
        Cmd::CheckConfig { file } => {
            Config::load(&file)?;
            println!("{}: ok", file.display());
            Ok(())
        }
        Cmd::Schema { config } => {
            let cfg = load_config(config.as_ref())?;
            let default = credwatch::clickhouse::Config::with_url("http://localhost:8123");
            let ch = cfg.clickhouse.as_ref().unwrap_or(&default);
            let text = format!(
                "{}\n{}",
                credwatch::clickhouse::schema::script(ch),
                credwatch::clickhouse::fleet::script()
            );
            // A closed pipe (`| head`) is not an error worth a panic.
            let _ = std::io::Write::write_all(&mut std::io::stdout().lock(), text.as_bytes());
            Ok(())
        }
        Cmd::Migrate { config } => {
            let cfg = load_config(Some(&config))?;
            let ch = clickhouse_config(&cfg)?;
            let v = runtime()?.block_on(credwatch::clickhouse::migrate(ch))?;
            println!("{}: schema version {v} applied", ch.database);
            Ok(())
        }
        Cmd::FleetCheck {
            config,
            since,
            until,
            alerts,
        } => {
            let cfg = load_config(Some(&config))?;
            let ch = clickhouse_config(&cfg)?;
            let to = until
                .as_deref()
                .map(parse_time)
                .transpose()?
                .unwrap_or_else(chrono::Utc::now);
            let from = match humantime::parse_duration(&since) {
                Ok(d) => to - chrono::Duration::from_std(d)?,
                Err(_) => parse_time(&since)?,
            };
            let found = runtime()?.block_on(credwatch::clickhouse::fleet::check(
                ch,
                from,
                to,
                cfg.detect.dormant_after,
            ))?;
            let mut out = NdjsonSink::open(&alerts)?;
            for a in &found {
                out.write(a);
            }
            out.flush();
            tracing::info!(alerts = found.len(), %from, %to, "fleet check done");
            Ok(())
        }
    }
}
