//! `cargo xtask test-kernels`: the agent and test actors of this build on other kernels.
//!
//! Each kernel of the matrix (Debian's 5.10, 6.1 and 6.12, see `fetch::MATRIX`) boots under
//! qemu (TCG) with a busybox initramfs that mounts this machine's root read-only over
//! virtio-9p and chroots into it, so the guest runs exactly the binaries built here. Inside,
//! this same xtask binary (`kernel-guest`, see `guest.rs`) probes which program kinds and
//! helpers the kernel accepts, runs the agent through the scenario (`scenario.rs`) and
//! measures program runs under unrelated load; it writes its results and the agent's NDJSON
//! into a second, writable 9p share. The host then checks the scenario's expectations on
//! those events and prints one report per kernel and a summary table.

mod bpf;
mod btf;
mod cpio;
mod elf;
mod fetch;
mod guest;
mod scenario;

use std::{
    collections::{BTreeMap, BTreeSet},
    env,
    fmt::Write as _,
    fs,
    io::{BufRead, BufReader, Write as _},
    path::{Path, PathBuf},
    process::{Command, Stdio},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};
use serde_json::Value;

use crate::deps::{self, Package};
use bpf::{HelperStatus, ProgKind};
use fetch::{Kernel, MATRIX};
use guest::{Plan, Results};

/// Operations per load phase (run counts are reported per this many).
const LOAD_OPS: u64 = 100_000;
/// Hooks the agent may pick at start instead of syscall tracepoints: each is probed for
/// the helpers the tracepoint probes call, plus `CANDIDATE_HELPERS`.
const CANDIDATE_KINDS: &[ProgKind] = &[
    ProgKind::RawTracepoint,
    ProgKind::TpBtf,
    ProgKind::Fentry,
    ProgKind::Lsm,
];
/// bpf_get_current_task (35), bpf_d_path (147), bpf_loop (181).
const CANDIDATE_HELPERS: &[u32] = &[35, 147, 181];
const INIT_SCRIPT: &str = include_str!("kernels/init.sh");

#[derive(clap::Args)]
pub struct Args {
    /// Run only this kernel line (5.10, 6.1, 6.12); repeat for several. Default: all.
    #[arg(long = "kernel", value_name = "VERSION")]
    pub kernels: Vec<String>,
    /// Seconds one guest may take from power-on to power-off before it counts as hung.
    #[arg(long, default_value_t = 1200)]
    pub timeout: u64,
    /// Run the agent's debug build in the guests (default: release).
    #[arg(long)]
    pub debug: bool,
    /// Look for newer kernel packages in the registry (default: use the cached ones).
    #[arg(long)]
    pub refresh: bool,
    /// Extra kernel command-line parameter for the guests (repeatable), e.g.
    /// `lsm=lockdown,yama,apparmor,bpf` to see BPF LSM on a kernel that lacks it by default.
    #[arg(long = "kernel-arg", value_name = "PARAM")]
    pub kernel_args: Vec<String>,
}

impl Default for Args {
    /// The whole matrix with the release agent, as `cargo xtask test-kernels` runs it.
    fn default() -> Self {
        Args {
            kernels: Vec::new(),
            timeout: 1200,
            debug: false,
            refresh: false,
            kernel_args: Vec::new(),
        }
    }
}

#[derive(clap::Args)]
pub struct GuestArgs {
    /// The plan the host wrote into the results share.
    #[arg(long)]
    pub plan: PathBuf,
}

/// Inside a guest: see `guest.rs`.
pub fn guest(args: &GuestArgs) -> Result<()> {
    guest::main(&args.plan)
}

fn target_dir(root: &Path) -> PathBuf {
    match env::var_os("CARGO_TARGET_DIR") {
        Some(d) => root.join(d),
        None => root.join("target"),
    }
}

pub fn test_kernels(root: &Path, args: &Args) -> Result<()> {
    let specs: Vec<_> = if args.kernels.is_empty() {
        MATRIX.iter().collect()
    } else {
        args.kernels
            .iter()
            .map(|k| {
                MATRIX.iter().find(|s| s.key == k).with_context(|| {
                    format!(
                        "unknown kernel {k}; the matrix has {}",
                        MATRIX.iter().map(|s| s.key).collect::<Vec<_>>().join(", ")
                    )
                })
            })
            .collect::<Result<_>>()?
    };
    deps::ensure_debian(&[
        Package {
            name: "qemu-system-x86",
            provides: "/usr/bin/qemu-system-x86_64",
        },
        Package {
            name: "seabios",
            provides: "/usr/share/seabios/bios-256k.bin",
        },
        Package {
            name: "busybox-static",
            provides: "/bin/busybox",
        },
        Package {
            name: "xz-utils",
            provides: "/usr/bin/xz",
        },
        Package {
            name: "debian-archive-keyring",
            provides: "/usr/share/keyrings/debian-archive-keyring.gpg",
        },
        // The scenario's 32-bit reader.
        Package {
            name: "gcc-multilib",
            provides: "/usr/lib32/crt1.o",
        },
    ])?;
    let busybox = fs::read("/bin/busybox").context("reading /bin/busybox")?;
    if !elf::is_static_executable(&busybox)? {
        bail!("/bin/busybox is dynamically linked; the initramfs needs busybox-static's");
    }

    let profile = if args.debug { "debug" } else { "release" };
    let mut build = vec!["build", "-p", "credwatch", "--bins"];
    if !args.debug {
        build.push("--release");
    }
    crate::cargo(&build)?;
    crate::cargo(&["build", "-p", "credwatch-tests", "--bins"])?;
    let target = target_dir(root);
    let agent = target.join(profile).join("credwatch");
    let actor = target.join("debug/cw-actor");
    let ia32_reader = build_ia32_reader(root, &target.join("test-kernels"))?;
    let harness = env::current_exe().context("locating the xtask binary")?;
    let probes = ProbeObject::from_agent(&agent)?;

    println!(
        "probe object in {}: helpers called, by program kind:",
        agent.display()
    );
    for (kind, ids) in &probes.helpers {
        let names: Vec<String> = ids.iter().map(|i| probes.helper(*i)).collect();
        println!("  {}: {}", kind.name(), names.join(", "));
    }

    let cache = crate::prefix_dir()?.join("kernels");
    let mut registry = fetch::Registry::new(&cache);
    let mut reports = Vec::new();
    for spec in specs {
        let kernel = fetch::ensure(spec, &cache, &mut registry, args.refresh)
            .with_context(|| format!("preparing kernel {}", spec.key))?;
        let run_dir = target.join("test-kernels").join(spec.key);
        let plan = Plan {
            kernel: spec.key.into(),
            agent: agent.clone(),
            actor: actor.clone(),
            ia32_reader: ia32_reader.clone(),
            agent_log: "info,credwatch::probes=debug".into(),
            load_ops: LOAD_OPS,
            helpers: probes.plan_helpers(),
            ready_timeout_s: args.timeout / 2,
        };
        eprintln!(
            "xtask: kernel {} ({}: {} {}): booting under TCG",
            spec.key, spec.suite, kernel.package, kernel.version
        );
        let report = match boot(&kernel, &plan, &harness, &busybox, &run_dir, args) {
            Ok(b) => judge(&kernel, &run_dir, b),
            Err(e) => Report::broken(&kernel, &run_dir, format!("{e:#}")),
        };
        print!("{}", report.render(&probes));
        let _ = std::io::stdout().flush();
        reports.push(report);
    }
    let table = summary(&reports);
    print!("\n{table}");
    fs::create_dir_all(target.join("test-kernels"))?;
    fs::write(target.join("test-kernels/summary.md"), &table)?;
    println!(
        "kernel cache: {} ({})",
        cache.display(),
        human_size(dir_size(&cache))
    );
    let failed: Vec<&str> = reports
        .iter()
        .filter(|r| !r.failures.is_empty())
        .map(|r| r.key.as_str())
        .collect();
    if !failed.is_empty() {
        bail!("kernel matrix failed on {}", failed.join(", "));
    }
    Ok(())
}

/// The tests' 32-bit reader (`gcc -m32`), for the scenario's ia32 step.
fn build_ia32_reader(root: &Path, dir: &Path) -> Result<PathBuf> {
    fs::create_dir_all(dir)?;
    let out = dir.join("reader32");
    crate::run(
        Command::new("gcc")
            .args(["-m32", "-O1", "-o"])
            .arg(&out)
            .arg(root.join("tests/fixtures/ia32/reader.c")),
    )
    .context("building the 32-bit reader (gcc -m32)")?;
    Ok(out)
}

/// The helpers the agent's embedded probe object calls, per program kind.
struct ProbeObject {
    helpers: BTreeMap<ProgKind, BTreeSet<u32>>,
    /// Sections with code whose program kind this harness does not know.
    unknown_sections: Vec<String>,
    /// Helper names from this machine's kernel BTF.
    names: BTreeMap<u32, String>,
}

impl ProbeObject {
    fn from_agent(agent: &Path) -> Result<ProbeObject> {
        let bin = fs::read(agent).with_context(|| format!("reading {}", agent.display()))?;
        let obj = elf::embedded_bpf_object(&bin)
            .with_context(|| format!("{} embeds no BPF object", agent.display()))?;
        let calls = elf::bpf_helper_calls(obj)?;
        let mut helpers: BTreeMap<ProgKind, BTreeSet<u32>> = BTreeMap::new();
        let mut shared = BTreeSet::new();
        let mut unknown_sections = Vec::new();
        for (section, ids) in calls {
            match ProgKind::of_section(&section) {
                Some(k) => helpers.entry(k).or_default().extend(ids),
                // Subprograms: called from any program.
                None if section == ".text" => shared.extend(ids),
                None => unknown_sections.push(section),
            }
        }
        for ids in helpers.values_mut() {
            ids.extend(shared.iter().copied());
        }
        let names = btf::Btf::open("/sys/kernel/btf/vmlinux")
            .map(|b| btf::helper_names(&b))
            .unwrap_or_default();
        Ok(ProbeObject {
            helpers,
            unknown_sections,
            names,
        })
    }

    /// The (kind, helpers) pairs the guest probes: the probes' own, then the candidates.
    fn plan_helpers(&self) -> Vec<(ProgKind, Vec<u32>)> {
        let mut all: BTreeMap<ProgKind, BTreeSet<u32>> = self.helpers.clone();
        let every: BTreeSet<u32> = self
            .helpers
            .get(&ProgKind::Tracepoint)
            .into_iter()
            .flatten()
            .chain(CANDIDATE_HELPERS)
            .copied()
            .collect();
        for k in CANDIDATE_KINDS {
            all.entry(*k).or_default().extend(&every);
        }
        all.into_iter()
            .map(|(k, ids)| (k, ids.into_iter().collect()))
            .collect()
    }

    /// Whether the probe object itself calls helper `id` from a program of `kind`.
    fn uses(&self, kind: ProgKind, id: u32) -> bool {
        self.helpers.get(&kind).is_some_and(|ids| ids.contains(&id))
    }

    fn helper(&self, id: u32) -> String {
        match self.names.get(&id) {
            Some(n) => format!("{n} ({id})"),
            None => format!("helper #{id}"),
        }
    }
}

/// What came back from one guest.
struct Booted {
    results: Option<Results>,
    wall: Duration,
    /// The console's last lines, for a guest that wrote no results.
    console_tail: Vec<String>,
}

fn initramfs(kernel: &Kernel, harness: &Path, busybox: &[u8]) -> Result<Vec<u8>> {
    let mut c = cpio::Cpio::new();
    for d in ["bin", "dev", "proc", "sys", "mnt", "modules"] {
        c.dir(d);
    }
    c.char_dev("dev/console", 5, 1);
    c.file("bin/busybox", 0o755, busybox);
    c.file("init", 0o755, INIT_SCRIPT.as_bytes());
    c.file("harness", 0o644, harness.as_os_str().as_encoded_bytes());
    let mut load = String::new();
    for m in &kernel.modules {
        let data = fs::read(kernel.dir.join("modules").join(format!("{m}.ko")))?;
        c.file(&format!("modules/{m}.ko"), 0o644, &data);
        let _ = writeln!(load, "{m}");
    }
    c.file("modules.load", 0o644, load.as_bytes());
    Ok(c.finish())
}

/// Boots `kernel` with the plan and waits for it to power off, at most `timeout` seconds.
fn boot(
    kernel: &Kernel,
    plan: &Plan,
    harness: &Path,
    busybox: &[u8],
    run_dir: &Path,
    args: &Args,
) -> Result<Booted> {
    let timeout = args.timeout;
    // Every kernel message goes to the console log: it is what explains a guest that hangs.
    let mut cmdline = String::from("console=ttyS0 panic=-1 oops=panic");
    for a in &args.kernel_args {
        cmdline.push(' ');
        cmdline.push_str(a);
    }
    let _ = fs::remove_dir_all(run_dir);
    fs::create_dir_all(run_dir)?;
    fs::write(run_dir.join("plan.json"), serde_json::to_vec_pretty(plan)?)?;
    let initrd = run_dir.join("initramfs.cpio");
    fs::write(&initrd, initramfs(kernel, harness, busybox)?)?;
    let mut qemu = Command::new("qemu-system-x86_64");
    qemu.args(["-accel", "tcg", "-cpu", "max", "-m", "2048", "-smp", "1"])
        .args([
            "-nodefaults",
            "-no-user-config",
            "-display",
            "none",
            "-no-reboot",
        ])
        .args([
            "-chardev",
            "stdio,id=console,signal=off",
            "-serial",
            "chardev:console",
        ])
        .arg("-kernel")
        .arg(kernel.vmlinuz())
        .arg("-initrd")
        .arg(&initrd)
        .arg("-append")
        .arg(&cmdline)
        .args([
            "-virtfs",
            "local,path=/,mount_tag=host,security_model=none,readonly=on,multidevs=remap",
        ])
        .arg("-virtfs")
        .arg(format!(
            "local,path={},mount_tag=out,security_model=none,multidevs=remap",
            run_dir.display()
        ))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let start = Instant::now();
    let mut child = qemu.spawn().context("starting qemu-system-x86_64")?;
    let tail = Arc::new(Mutex::new(Vec::<String>::new()));
    let log = fs::File::create(run_dir.join("console.log"))?;
    let readers: Vec<_> = [
        Box::new(child.stdout.take().context("qemu stdout")?) as Box<dyn std::io::Read + Send>,
        Box::new(child.stderr.take().context("qemu stderr")?),
    ]
    .into_iter()
    .map(|pipe| {
        let tail = tail.clone();
        let mut log = log.try_clone().expect("console log fd");
        let key = kernel.key.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(pipe).lines().map_while(Result::ok) {
                let _ = writeln!(log, "{line}");
                let clean = line.trim_matches(|c: char| c.is_control()).to_owned();
                if clean.starts_with("cw-")
                    || clean.contains("Kernel panic")
                    || clean.contains("qemu")
                {
                    eprintln!("[{key}] {clean}");
                }
                if clean.trim().is_empty() {
                    continue;
                }
                let mut t = tail.lock().unwrap();
                t.push(clean);
                if t.len() > 40 {
                    t.remove(0);
                }
            }
        })
    })
    .collect();
    let deadline = start + Duration::from_secs(timeout);
    let status = loop {
        if let Some(s) = child.try_wait()? {
            break Some(s);
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    let wall = start.elapsed();
    for r in readers {
        let _ = r.join();
    }
    let console_tail = tail.lock().unwrap().clone();
    if status.is_none() {
        if console_tail.is_empty() {
            bail!(
                "guest hung: no power-off within {timeout} s (killed); the console stayed silent"
            );
        }
        bail!(
            "guest hung: no power-off within {timeout} s (killed); console log {}; last lines:\n    {}",
            run_dir.join("console.log").display(),
            console_tail.join("\n    ")
        );
    }
    let results = fs::read(run_dir.join("results.json"))
        .ok()
        .map(|b| serde_json::from_slice::<Results>(&b))
        .transpose()
        .context("parsing the guest's results.json")?;
    Ok(Booted {
        results,
        wall,
        console_tail,
    })
}

/// One kernel's outcome: everything the report prints.
struct Report {
    key: String,
    kernel: Kernel,
    run_dir: PathBuf,
    wall: Option<Duration>,
    results: Option<Results>,
    /// (step, expectation, outcome).
    checks: Vec<(String, String, Result<(), String>)>,
    /// What makes this kernel fail (empty: passed).
    failures: Vec<String>,
    /// The agent's start error and verifier log lines, when it refused to start.
    agent_error: Vec<String>,
}

impl Report {
    fn new(kernel: &Kernel, run_dir: &Path) -> Report {
        Report {
            key: kernel.key.clone(),
            kernel: kernel.clone(),
            run_dir: run_dir.to_path_buf(),
            wall: None,
            results: None,
            checks: Vec::new(),
            failures: Vec::new(),
            agent_error: Vec::new(),
        }
    }

    fn broken(kernel: &Kernel, run_dir: &Path, why: String) -> Report {
        let mut r = Report::new(kernel, run_dir);
        r.failures.push(why);
        r
    }
}

fn judge(kernel: &Kernel, run_dir: &Path, b: Booted) -> Report {
    let mut rep = Report::new(kernel, run_dir);
    rep.wall = Some(b.wall);
    let Some(res) = b.results else {
        rep.failures.push(format!(
            "the guest wrote no results; console log {}; last lines:\n    {}",
            run_dir.join("console.log").display(),
            b.console_tail.join("\n    ")
        ));
        return rep;
    };
    if let Some(e) = &res.error {
        rep.failures.push(format!("guest harness: {e}"));
    }
    match &res.agent {
        None => rep.failures.push("the agent was not run".into()),
        Some(a) if !a.ready => {
            let log = fs::read_to_string(run_dir.join("agent.log")).unwrap_or_default();
            rep.agent_error = start_error(&log);
            let verdict = rep
                .agent_error
                .iter()
                .find(|l| l.contains("invalid func") || l.contains("unknown func"))
                .or(rep.agent_error.first())
                .cloned()
                .unwrap_or_default();
            rep.failures.push(format!(
                "{}: {verdict}",
                a.start_error
                    .as_deref()
                    .unwrap_or("the agent did not become ready")
            ));
        }
        Some(a) => {
            let events = read_ndjson(&run_dir.join("events.ndjson"));
            check_scenario(&mut rep, a, &events);
            if let Some(e) = &a.stop_error {
                rep.failures.push(e.clone());
            }
        }
    }
    rep.results = Some(res);
    rep
}

fn check_scenario(rep: &mut Report, a: &guest::AgentRun, events: &[Value]) {
    let Some(ctx) = &a.ctx else {
        rep.failures
            .push("the guest recorded no scenario context".into());
        return;
    };
    let steps = scenario::steps(ctx);
    if a.steps.len() != steps.len() {
        rep.failures.push(format!(
            "{} of {} scenario steps ran",
            a.steps.len(),
            steps.len()
        ));
    }
    for (step, ran) in steps.iter().zip(&a.steps) {
        if ran.exit_code != Some(0) {
            rep.checks.push((
                step.name.into(),
                "actor exits 0".into(),
                Err(format!("exit {:?}: {}", ran.exit_code, ran.stderr.trim())),
            ));
        }
        let mine = scenario::of_tgid(events, ran.pid);
        for e in &step.expect {
            rep.checks
                .push((step.name.into(), e.describe(), e.check(ctx, &mine)));
        }
    }
    // Unrelated load must stay unrelated: the unwatched opens emit no secret read.
    for load in a.load.iter().filter(|l| l.ops > 0) {
        let none = scenario::Expect::NoEvent {
            kind: "secret_read",
        };
        rep.checks.push((
            format!("load: {}", load.name),
            none.describe(),
            none.check(ctx, &scenario::of_tgid(events, load.pid)),
        ));
    }
    let failed: Vec<String> = rep
        .checks
        .iter()
        .filter_map(|(s, e, r)| r.as_ref().err().map(|why| format!("{s}: {e}: {why}")))
        .collect();
    rep.failures.extend(failed);
}

/// The agent's error chain and the verifier's verdict from its log.
fn start_error(log: &str) -> Vec<String> {
    let lines: Vec<&str> = log.lines().collect();
    let mut out: Vec<String> = lines
        .iter()
        .filter(|l| {
            l.contains("Error")
                || l.contains("ERROR")
                || l.contains("rejected")
                || l.contains("failed")
        })
        .map(|l| l.chars().take(400).collect())
        .collect();
    for l in &lines {
        if (l.contains("invalid func") || l.contains("unknown func") || l.contains("not supported"))
            && !out.iter().any(|o| o == l)
        {
            out.push(l.chars().take(400).collect());
        }
    }
    if out.is_empty() {
        out = lines[lines.len().saturating_sub(10)..]
            .iter()
            .map(|l| l.to_string())
            .collect();
    }
    out
}

fn read_ndjson(path: &Path) -> Vec<Value> {
    fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect()
}

fn prog_type_name(t: u32) -> String {
    match t {
        2 => "kprobe".into(),
        5 => "tracepoint".into(),
        8 => "cgroup_skb".into(),
        17 => "raw_tracepoint".into(),
        18 => "cgroup_sock_addr".into(),
        26 => "tracing".into(),
        29 => "lsm".into(),
        t => format!("type {t}"),
    }
}

fn kind_cell(res: &Results, kinds: &[ProgKind]) -> String {
    kinds
        .iter()
        .map(|k| {
            let Some(f) = res.features.iter().find(|f| f.kind == Some(*k)) else {
                return "?".to_owned();
            };
            if !f.loaded {
                "no (load)".into()
            } else if f.attached == Some(false) {
                "load only".into()
            } else if f.runs == Some(0) && *k == ProgKind::Lsm && !res.lsm.contains("bpf") {
                "attaches, never runs (bpf not an active LSM)".into()
            } else if f.runs == Some(0) {
                "attaches, never runs".into()
            } else {
                "yes".into()
            }
        })
        .collect::<Vec<_>>()
        .join(" / ")
}

impl Report {
    fn render(&self, probes: &ProbeObject) -> String {
        let k = &self.kernel;
        let mut s = String::new();
        let _ = writeln!(
            s,
            "\n== kernel {}: {} {} (sha256 {})",
            self.key, k.package, k.version, k.sha256
        );
        let verdict = if self.failures.is_empty() {
            "PASS"
        } else {
            "FAIL"
        };
        let Some(res) = &self.results else {
            let _ = writeln!(s, "   {verdict}: {}", self.failures.join("; "));
            return s;
        };
        let _ = writeln!(
            s,
            "   running {}; BTF {}; active LSMs: {}; cmdline: {}",
            res.release,
            if res.btf { "yes" } else { "no" },
            res.lsm.trim(),
            res.cmdline
        );
        let phases: Vec<String> = res
            .phases
            .iter()
            .map(|(n, t)| format!("{n} {t:.0} s"))
            .collect();
        let _ = writeln!(
            s,
            "   boot+scenario {:.0} s wall under TCG (userspace at {:.0} s; {})",
            self.wall.map(|w| w.as_secs_f64()).unwrap_or(0.0),
            res.uptime_at_start,
            phases.join(", ")
        );
        let _ = writeln!(s, "   program kinds (load / attach / runs when triggered):");
        for f in &res.features {
            let Some(kind) = f.kind else { continue };
            let _ = writeln!(
                s,
                "     {:38} {}{}{}",
                kind.hook(),
                if f.loaded { "loads" } else { "REFUSED" },
                match (f.attached, f.runs) {
                    (Some(true), Some(n)) => format!(", attaches, ran {n}×"),
                    (Some(true), None) => ", attaches".into(),
                    (Some(false), _) => ", does NOT attach".into(),
                    _ => String::new(),
                },
                f.error
                    .as_deref()
                    .map(|e| format!("  [{e}]"))
                    .unwrap_or_default()
            );
        }
        let missing: Vec<String> = res
            .helpers
            .iter()
            .filter(|h| h.status != HelperStatus::Available && probes.uses(h.kind, h.id))
            .map(|h| {
                format!(
                    "{} in {}: {:?} ({})",
                    probes.helper(h.id),
                    h.kind.name(),
                    h.status,
                    h.detail
                )
            })
            .collect();
        if missing.is_empty() {
            let _ = writeln!(
                s,
                "   helpers the probes call: all available to their program types"
            );
        } else {
            let _ = writeln!(s, "   helpers the probes call that this kernel refuses:");
            for m in missing {
                let _ = writeln!(s, "     {m}");
            }
        }
        let _ = writeln!(
            s,
            "   the tracepoint probes' helpers (and {}) from other hooks:",
            CANDIDATE_HELPERS
                .iter()
                .map(|h| probes.helper(*h))
                .collect::<Vec<_>>()
                .join(", ")
        );
        for k in CANDIDATE_KINDS {
            let of_kind: Vec<_> = res.helpers.iter().filter(|h| h.kind == *k).collect();
            let refused: Vec<String> = of_kind
                .iter()
                .filter(|h| h.status != HelperStatus::Available)
                .map(|h| format!("{} {:?}", probes.helper(h.id), h.status))
                .collect();
            let _ = writeln!(
                s,
                "     {:38} {}",
                k.hook(),
                if of_kind.is_empty() {
                    "not probed".to_owned()
                } else if refused.is_empty() {
                    format!("all {} available", of_kind.len())
                } else {
                    format!("refused: {}", refused.join(", "))
                }
            );
        }
        if !probes.unknown_sections.is_empty() {
            let _ = writeln!(
                s,
                "   (sections not probed for helpers: {})",
                probes.unknown_sections.join(", ")
            );
        }
        if let Some(a) = &res.agent {
            for l in [&a.attached_line, &a.stopped_line].into_iter().flatten() {
                let _ = writeln!(s, "   agent: {}", strip_log_prefix(l));
            }
            if !a.programs.is_empty() {
                let _ = writeln!(
                    s,
                    "   agent programs ({}, {} perf-event fds):",
                    a.programs.len(),
                    a.perf_event_fds
                );
                for p in &a.programs {
                    let _ = writeln!(
                        s,
                        "     {:24} {:18} links: {}",
                        p.name,
                        prog_type_name(p.prog_type),
                        if p.links.is_empty() {
                            "-".into()
                        } else {
                            p.links.join(",")
                        }
                    );
                }
            }
            if !a.load.is_empty() {
                let _ = writeln!(s, "   program runs per {LOAD_OPS} ops of unrelated load:");
                let _ = write!(s, "     {:24}", "");
                for l in &a.load {
                    let _ = write!(s, " {:>22}", l.name);
                }
                let _ = writeln!(s);
                for p in &a.programs {
                    let _ = write!(s, "     {:24}", p.name);
                    for l in &a.load {
                        let _ = write!(s, " {:>22}", per_ops(l, p.id));
                    }
                    let _ = writeln!(s);
                }
            }
        }
        if !self.agent_error.is_empty() {
            let _ = writeln!(s, "   agent refused to start:");
            for l in &self.agent_error {
                let _ = writeln!(s, "     {}", l);
            }
            let _ = writeln!(
                s,
                "     (full log: {})",
                self.run_dir.join("agent.log").display()
            );
        }
        for (step, exp, r) in &self.checks {
            let _ = writeln!(
                s,
                "   {} {step}: {exp}{}",
                if r.is_ok() { "ok  " } else { "FAIL" },
                r.as_ref()
                    .err()
                    .map(|e| format!(" — {e}"))
                    .unwrap_or_default()
            );
        }
        let _ = writeln!(
            s,
            "   {verdict}{}",
            if self.failures.is_empty() {
                String::new()
            } else {
                format!(": {}", self.failures.join("; "))
            }
        );
        let _ = writeln!(s, "   artifacts: {}", self.run_dir.display());
        s
    }
}

/// Runs per LOAD_OPS operations (raw for the zero-operation baseline).
fn scaled(l: &guest::LoadPhase, n: u64) -> String {
    if l.ops == 0 {
        return n.to_string();
    }
    format!("{:.0}", n as f64 * LOAD_OPS as f64 / l.ops as f64)
}

fn per_ops(l: &guest::LoadPhase, id: u32) -> String {
    scaled(l, l.runs.get(&id).copied().unwrap_or(0))
}

fn strip_log_prefix(line: &str) -> &str {
    // "2026-…Z  INFO credwatch::probes: probes attached …" → from the target on.
    line.find("credwatch::").map(|i| &line[i..]).unwrap_or(line)
}

fn summary(reports: &[Report]) -> String {
    let mut s = String::from(
        "| kernel | package | open hook | programs attached | scenario | all programs' runs: baseline · per 100k getppid · opens · UDP connects | LSM | fentry / fexit | boot+scenario |\n\
         |---|---|---|---|---|---|---|---|---|\n",
    );
    for r in reports {
        let res = r.results.as_ref();
        let agent = res.and_then(|r| r.agent.as_ref());
        let programs = match agent {
            Some(a) if a.ready => a
                .programs
                .iter()
                .map(|p| p.name.as_str())
                .collect::<Vec<_>>()
                .join(", "),
            Some(_) => "none (agent refused)".into(),
            None => "-".into(),
        };
        let open_hook = agent
            .and_then(|a| a.attached_line.as_deref())
            .and_then(|l| {
                l.split_whitespace()
                    .find_map(|w| w.strip_prefix("open_hook="))
            })
            .unwrap_or("-");
        let runs = agent
            .filter(|a| !a.load.is_empty())
            .map(|a| {
                a.load
                    .iter()
                    .map(|l| scaled(l, l.runs.values().sum()))
                    .collect::<Vec<_>>()
                    .join(" · ")
            })
            .unwrap_or_else(|| "-".into());
        let scenario = if r.failures.is_empty() {
            format!("pass ({} checks)", r.checks.len())
        } else {
            let first = r.failures[0].lines().next().unwrap_or_default();
            format!("FAIL: {}", first.chars().take(120).collect::<String>())
        };
        let _ = writeln!(
            s,
            "| {} | {} {} | {} | {} | {} | {} | {} | {} | {} |",
            r.key,
            r.kernel.package,
            r.kernel.version,
            open_hook,
            programs,
            scenario.replace('|', "/"),
            runs,
            res.map(|x| kind_cell(x, &[ProgKind::Lsm]))
                .unwrap_or_default(),
            res.map(|x| kind_cell(x, &[ProgKind::Fentry, ProgKind::Fexit]))
                .unwrap_or_default(),
            r.wall
                .map(|w| format!("{:.0} s", w.as_secs_f64()))
                .unwrap_or_else(|| "-".into()),
        );
    }
    s
}

fn dir_size(p: &Path) -> u64 {
    let Ok(md) = fs::symlink_metadata(p) else {
        return 0;
    };
    if !md.is_dir() {
        return md.len();
    }
    fs::read_dir(p)
        .map(|rd| rd.filter_map(|e| e.ok()).map(|e| dir_size(&e.path())).sum())
        .unwrap_or(0)
}

fn human_size(b: u64) -> String {
    format!("{:.1} MiB", b as f64 / (1 << 20) as f64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn start_error_keeps_the_error_and_the_verifier_verdict() {
        let log = "credwatch: the kernel rejected probe sched_process_exec: the BPF_PROG_LOAD \
                   syscall returned Invalid argument (os error 22). Verifier output: x\n\
                   0: (bf) r8 = r1\n10: (85) call unknown#158\ninvalid func unknown#158\n\
                   processed 10 insns (limit 1000000)\n";
        let e = start_error(log);
        assert!(e[0].contains("rejected probe sched_process_exec"));
        assert!(e.iter().any(|l| l == "invalid func unknown#158"));
        assert!(!e.iter().any(|l| l.contains("r8 = r1")));
        // Without a recognisable error line, the log's end is what is shown.
        assert_eq!(start_error("a\nb\n"), ["a", "b"]);
    }

    #[test]
    fn run_counts_scale_to_the_reported_ops() {
        let phase = |ops| guest::LoadPhase {
            name: "x".into(),
            ops,
            pid: 1,
            seconds: 0.0,
            runs: BTreeMap::from([(7, 50_000)]),
        };
        assert_eq!(per_ops(&phase(LOAD_OPS), 7), "50000");
        assert_eq!(per_ops(&phase(LOAD_OPS / 2), 7), "100000");
        assert_eq!(per_ops(&phase(0), 7), "50000");
        assert_eq!(per_ops(&phase(LOAD_OPS), 8), "0");
    }
}
