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
}

fn load_config(path: Option<&PathBuf>) -> Result<Config> {
    match path {
        Some(p) => Config::load(p),
        None => Ok(Config::default()),
    }
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            EnvFilter::try_from_env("CREDWATCH_LOG").unwrap_or_else(|_| EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
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
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            rt.block_on(agent::run(
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
    }
}
