//! Project tasks: `cargo xtask setup|build|run|test|lint`.
//!
//! `setup` installs what building the probes and running the tests needs, idempotently and
//! quickly when already done; every other task runs it first.

use std::{
    env,
    ffi::OsString,
    fs,
    path::{Path, PathBuf},
    process::{Command, ExitCode},
};

use anyhow::{Context, Result, bail};
use clap::{Parser, Subcommand};

mod bench;
mod bench_agent;
mod chart;
mod deps;
/// The agent launcher the integration tests use too (they use all of it, the bench not).
#[allow(dead_code)]
#[path = "../../tests/src/launch.rs"]
mod launch;

const BPF_LINKER_VERSION: &str = "0.13.0";
const CARGO_FUZZ_VERSION: &str = "0.13.2";
/// Fuzz targets under agent/fuzz, run briefly by `test` (longer runs: `cargo xtask fuzz`).
const FUZZ_TARGETS: &[&str] = &[
    "cgroup_path",
    "credential",
    "pod_list",
    "dns_answer",
    "config",
    "record",
    "event_json",
];

#[derive(Parser)]
#[command(name = "xtask")]
struct Cli {
    #[command(subcommand)]
    cmd: Task,
}

#[derive(Subcommand)]
enum Task {
    /// Install the nightly toolchain pieces and bpf-linker needed to build the probes.
    Setup,
    /// Build the agent (release) with its embedded probes.
    Build,
    /// Build and run the agent on this host (needs root); extra args go to `credwatch run`.
    Run {
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<OsString>,
    },
    /// Formatting, lints, unit and integration tests (privileged ones need root).
    Test {
        /// Extra arguments for `cargo test` (e.g. a test name filter).
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<OsString>,
    },
    /// `cargo fmt --check` and clippy with warnings denied.
    Lint,
    /// Overhead and throughput side by side: no monitor, credwatch, auditd, bpftrace.
    Bench,
    /// Run every fuzz target for SECONDS each (default 300).
    Fuzz {
        #[arg(default_value_t = 300)]
        seconds: u64,
    },
}

fn main() -> ExitCode {
    match real_main() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("xtask: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn real_main() -> Result<()> {
    let cli = Cli::parse();
    let root = workspace_root();
    env::set_current_dir(&root)?;
    match cli.cmd {
        Task::Setup => setup(),
        Task::Build => {
            setup()?;
            cargo(&["build", "--release", "-p", "credwatch"])
        }
        Task::Run { args } => {
            setup()?;
            cargo(&["build", "--release", "-p", "credwatch"])?;
            let bin = root.join("target/release/credwatch");
            let status = Command::new(&bin)
                .arg("run")
                .args(args)
                .status()
                .with_context(|| format!("running {}", bin.display()))?;
            if !status.success() {
                bail!("credwatch exited with {status}");
            }
            Ok(())
        }
        Task::Test { args } => {
            setup()?;
            lint()?;
            test(&root, &args)?;
            fuzz(&root, 8)
        }
        Task::Lint => {
            setup()?;
            lint()
        }
        Task::Bench => {
            setup()?;
            bench::bench(&root)
        }
        Task::Fuzz { seconds } => {
            setup()?;
            fuzz(&root, seconds)
        }
    }
}

/// Where installed tools live between runs (not under target/: `cargo clean` must not
/// break the bpf-linker runpath or force a reinstall of the test ClickHouse).
fn prefix_dir() -> Result<PathBuf> {
    let home = env::var_os("HOME").context("HOME is not set")?;
    Ok(Path::new(&home).join(".local/share/credwatch"))
}

fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask lives in the workspace")
        .to_path_buf()
}

fn run(cmd: &mut Command) -> Result<()> {
    let status = cmd.status().with_context(|| format!("spawning {cmd:?}"))?;
    if !status.success() {
        bail!("{cmd:?} failed with {status}");
    }
    Ok(())
}

fn output(cmd: &mut Command) -> Result<String> {
    let out = cmd.output().with_context(|| format!("spawning {cmd:?}"))?;
    if !out.status.success() {
        bail!(
            "{cmd:?} failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn cargo(args: &[&str]) -> Result<()> {
    run(Command::new(env::var_os("CARGO").unwrap_or_else(|| "cargo".into())).args(args))
}

fn setup() -> Result<()> {
    // 1. Nightly with rust-src: the probes build core for the bpf target.
    let toolchains = output(Command::new("rustup").args(["toolchain", "list"]))?;
    if !toolchains.lines().any(|l| l.starts_with("nightly")) {
        eprintln!("xtask: installing the nightly toolchain");
        run(Command::new("rustup").args([
            "toolchain",
            "install",
            "nightly",
            "--profile",
            "minimal",
        ]))?;
    }
    let comps = output(Command::new("rustup").args([
        "component",
        "list",
        "--toolchain",
        "nightly",
        "--installed",
    ]))?;
    if !comps.lines().any(|l| l.starts_with("rust-src")) {
        eprintln!("xtask: adding rust-src to nightly");
        run(Command::new("rustup").args([
            "component",
            "add",
            "rust-src",
            "--toolchain",
            "nightly",
        ]))?;
    }

    // 2. bpf-linker linked against the same LLVM major as nightly's rustc, using the
    //    libLLVM nightly ships (no system LLVM of that version exists here).
    let vv = output(Command::new("rustc").args(["+nightly", "-vV"]))?;
    let llvm = vv
        .lines()
        .find_map(|l| l.strip_prefix("LLVM version: "))
        .context("rustc +nightly -vV does not report an LLVM version")?;
    let major = llvm.split('.').next().unwrap_or_default().to_owned();
    // Persistent prefix: bpf-linker keeps a runpath to it, so it must outlive this build.
    let prefix = prefix_dir()?.join(format!("llvm-{major}"));
    let stamp = prefix.join("bpf-linker.stamp");
    let want = format!("bpf-linker {BPF_LINKER_VERSION} llvm {llvm}\n");
    if std::fs::read_to_string(&stamp).is_ok_and(|s| s == want) && bpf_linker_runs() {
        return Ok(());
    }
    let sysroot = output(Command::new("rustc").args(["+nightly", "--print", "sysroot"]))?;
    let libdir = Path::new(sysroot.trim()).join("lib");
    let lib = std::fs::read_dir(&libdir)
        .with_context(|| format!("listing {}", libdir.display()))?
        .filter_map(|e| e.ok())
        .map(|e| e.path())
        // The real library is libLLVM.so.<major>.<minor>-rust-…; libLLVM-<major>-rust-….so is
        // a linker script.
        .find(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with(&format!("libLLVM.so.{major}")))
        })
        .with_context(|| {
            format!(
                "nightly ships no libLLVM.so.{major}* in {}",
                libdir.display()
            )
        })?;
    std::fs::create_dir_all(prefix.join("lib"))?;
    // `libLLVM.so` for the build to link against, the soname for the loader at run time.
    for name in [
        OsString::from("libLLVM.so"),
        lib.file_name().unwrap_or_default().to_owned(),
    ] {
        let link = prefix.join("lib").join(name);
        let _ = std::fs::remove_file(&link);
        std::os::unix::fs::symlink(&lib, &link)
            .with_context(|| format!("linking {} → {}", link.display(), lib.display()))?;
    }
    eprintln!(
        "xtask: building bpf-linker {BPF_LINKER_VERSION} against LLVM {major} (one time, ~2 min)"
    );
    run(Command::new("cargo")
        .args(["install", "bpf-linker", "--locked", "--force", "--version"])
        .arg(format!("={BPF_LINKER_VERSION}"))
        .args(["--no-default-features", "--features"])
        .arg(format!("llvm-{major}"))
        .env("LLVM_PREFIX", &prefix))?;
    if !bpf_linker_runs() {
        bail!(
            "bpf-linker was installed but does not run (missing libLLVM in {}?)",
            prefix.display()
        );
    }
    std::fs::write(&stamp, want)?;
    Ok(())
}

fn bpf_linker_runs() -> bool {
    Command::new("bpf-linker")
        .arg("--version")
        .output()
        .is_ok_and(|o| {
            o.status.success() && String::from_utf8_lossy(&o.stdout).contains(BPF_LINKER_VERSION)
        })
}

/// Each parser of outside input under libFuzzer for `seconds`; any panic fails.
fn fuzz(root: &Path, seconds: u64) -> Result<()> {
    let have = Command::new("cargo")
        .args(["fuzz", "--version"])
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).contains(CARGO_FUZZ_VERSION));
    if !have {
        eprintln!("xtask: installing cargo-fuzz {CARGO_FUZZ_VERSION}");
        run(Command::new("cargo")
            .args(["install", "cargo-fuzz", "--locked", "--version"])
            .arg(format!("={CARGO_FUZZ_VERSION}")))?;
    }
    for target in FUZZ_TARGETS {
        eprintln!("xtask: fuzzing {target} for {seconds} s");
        run(Command::new("cargo")
            .args(["+nightly", "fuzz", "run", target, "--"])
            .arg(format!("-max_total_time={seconds}"))
            .current_dir(root.join("agent")))?;
    }
    Ok(())
}

fn lint() -> Result<()> {
    cargo(&["fmt", "--all", "--check"])?;
    cargo(&["clippy", "--all-targets", "--", "-D", "warnings"])
}

fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
}

/// The test ClickHouse: the real engine from PyPI `chdb-core` in a venv under the
/// persistent prefix, behind `tests/clickhouse/front.py`. Installed once; the stamp holds
/// the requirements it was built from, so a change of pins reinstalls. Returns the python.
pub fn ensure_test_clickhouse(root: &Path) -> Result<PathBuf> {
    let venv = prefix_dir()?.join("chdb-venv");
    let python = venv.join("bin/python");
    let reqs = fs::read_to_string(root.join("tests/clickhouse/requirements.txt"))
        .context("reading tests/clickhouse/requirements.txt")?;
    let stamp = venv.join(".credwatch-requirements");
    if python.exists() && fs::read_to_string(&stamp).is_ok_and(|s| s == reqs) {
        return Ok(python);
    }
    eprintln!(
        "xtask: installing the test ClickHouse (chdb-core) into {}",
        venv.display()
    );
    let _ = fs::remove_dir_all(&venv);
    run(Command::new("python3").args(["-m", "venv"]).arg(&venv))
        .context("python3 -m venv (install python3 and its venv module)")?;
    run(Command::new(&python).args(["-m", "pip", "install", "--quiet", "--upgrade", "pip"]))?;
    run(Command::new(&python)
        .args(["-m", "pip", "install", "--quiet", "-r"])
        .arg(root.join("tests/clickhouse/requirements.txt")))?;
    fs::write(&stamp, reqs)?;
    Ok(python)
}

/// Tests that stop or break the test ClickHouse: a real server given through
/// `CREDWATCH_TEST_CLICKHOUSE_URL` cannot do that, so they are left out then (and counted).
const NEEDS_LOCAL_CLICKHOUSE: &[&str] = &[
    "a_lost_insert_response_does_not_duplicate_rows",
    "clickhouse_outage_under_load_loses_and_duplicates_nothing",
    "kill_9_with_a_full_spool_then_restart_delivers_everything",
];

/// Sums of libtest's `test result:` lines.
#[derive(Default, Debug)]
struct TestCounts {
    passed: u64,
    failed: u64,
    ignored: u64,
    filtered: u64,
}

impl TestCounts {
    fn add_line(&mut self, line: &str) {
        let Some(rest) = line.split_once("test result: ").map(|(_, r)| r) else {
            return;
        };
        for part in rest.split(';') {
            let mut w = part.split_whitespace().rev();
            let (Some(what), Some(n)) = (w.next(), w.next()) else {
                continue;
            };
            let n: u64 = n.parse().unwrap_or(0);
            match what {
                "passed" => self.passed += n,
                "failed" => self.failed += n,
                "ignored" => self.ignored += n,
                "out" => self.filtered += n,
                _ => {}
            }
        }
    }
}

/// `cargo test` with its output passed through and its result lines counted.
fn cargo_test(args: &[OsString], env: &[(&str, &Path)]) -> Result<TestCounts> {
    use std::io::{BufRead, BufReader};
    let mut cmd = Command::new(env::var_os("CARGO").unwrap_or_else(|| "cargo".into()));
    cmd.arg("test")
        .args(args)
        .stdout(std::process::Stdio::piped());
    for (k, v) in env {
        cmd.env(k, v);
    }
    let mut child = cmd.spawn().context("spawning cargo test")?;
    let mut counts = TestCounts::default();
    for line in BufReader::new(child.stdout.take().context("cargo test stdout")?)
        .lines()
        .map_while(Result::ok)
    {
        println!("{line}");
        counts.add_line(&line);
    }
    let status = child.wait()?;
    if !status.success() {
        bail!("cargo test failed with {status} ({counts:?})");
    }
    Ok(counts)
}

fn test(root: &Path, extra: &[OsString]) -> Result<()> {
    cargo(&["build", "-p", "credwatch", "--bins"])?;
    let bin = root.join("target/debug/credwatch");
    let python = ensure_test_clickhouse(root)?;
    // helm (3 and 4) and kubernetes-validate for the deployment test; idempotent, offline
    // once installed.
    run(Command::new("bash")
        .arg(root.join("deploy/validate/install-tools.sh"))
        .arg(prefix_dir()?.join("tools")))
    .context("installing the deployment validation tools")?;
    let ci = env::var("CI").is_ok_and(|v| v == "true" || v == "1");
    let root_user = is_root();
    if root_user {
        // What the privileged sensor tests drive: a 32-bit binary (gcc -m32), network
        // namespaces (ip).
        deps::ensure_debian(&[
            deps::Package {
                name: "gcc-multilib",
                provides: "/usr/lib32/crt1.o",
            },
            deps::Package {
                name: "iproute2",
                provides: "/usr/sbin/ip",
            },
        ])?;
    }
    if ci && !root_user {
        bail!("CI=true but not running as root: the privileged probe tests cannot run");
    }
    // One gate: tests that need more than `cargo test` gives are #[ignore]d with a reason;
    // here everything they need is in place, so all of them run (as root), and one that
    // cannot run fails instead of passing.
    let mut args: Vec<OsString> = vec!["--".into()];
    let mut left_out: Vec<String> = Vec::new();
    if root_user {
        args.push("--include-ignored".into());
    } else {
        left_out.push(
            "every #[ignore]d test (privileged or needing the built agent): not running as root"
                .into(),
        );
    }
    if env::var_os("CREDWATCH_TEST_CLICKHOUSE_URL").is_some() {
        for t in NEEDS_LOCAL_CLICKHOUSE {
            args.extend(["--skip".into(), OsString::from(*t)]);
        }
        left_out.push(format!(
            "{} tests that stop or break the ClickHouse server: CREDWATCH_TEST_CLICKHOUSE_URL \
             names a real one",
            NEEDS_LOCAL_CLICKHOUSE.len()
        ));
    }
    args.extend(extra.iter().cloned());
    let counts = cargo_test(
        &args,
        &[
            ("CREDWATCH_BIN", &bin),
            ("CREDWATCH_TEST_CHDB_PYTHON", &python),
        ],
    )?;
    eprintln!(
        "xtask: {} tests ran and passed, {} left out (ignored {}, filtered {})",
        counts.passed,
        counts.ignored + counts.filtered,
        counts.ignored,
        counts.filtered
    );
    for why in &left_out {
        eprintln!("xtask:   left out: {why}");
    }
    if ci && counts.ignored > 0 {
        bail!("{} tests did not run in CI", counts.ignored);
    }
    Ok(())
}
