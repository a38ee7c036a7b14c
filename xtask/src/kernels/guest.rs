//! The harness that runs inside each guest kernel (chrooted into the host's root, shared
//! read-only): kernel facts, the program-kind and helper probes, then the agent with the
//! scenario and the run-count load, all written to `results.json` in the writable share
//! next to the plan. It never decides pass/fail; the host does, from what it wrote.

use std::{
    collections::BTreeMap,
    ffi::CString,
    fs,
    io::Write,
    net::TcpListener,
    os::unix::fs::MetadataExt,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};
use serde::{Deserialize, Serialize};

use crate::launch::Launch;

use super::{
    bpf::{self, Feature, HelperStatus, ProgKind},
    btf::Btf,
    scenario::{self, Ctx},
};

/// Written by the host next to where the guest writes its results.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Plan {
    pub kernel: String,
    pub agent: PathBuf,
    pub actor: PathBuf,
    /// The 32-bit reader (see [`Ctx::ia32_reader`]).
    pub ia32_reader: PathBuf,
    /// `CREDWATCH_LOG` for the agent.
    pub agent_log: String,
    /// Operations per load phase.
    pub load_ops: u64,
    /// (program kind, helper ids) pairs to probe: what the agent's probe object calls.
    pub helpers: Vec<(ProgKind, Vec<u32>)>,
    pub ready_timeout_s: u64,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Results {
    pub release: String,
    /// `/proc/cmdline`.
    pub cmdline: String,
    /// `/sys/kernel/security/lsm`.
    pub lsm: String,
    pub btf: bool,
    /// Seconds since the guest kernel started, when the harness started.
    pub uptime_at_start: f64,
    /// (phase, seconds it took).
    pub phases: Vec<(String, f64)>,
    pub features: Vec<Feature>,
    pub helpers: Vec<HelperResult>,
    pub agent: Option<AgentRun>,
    /// A failure of the harness itself (not of the agent).
    pub error: Option<String>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct HelperResult {
    pub kind: ProgKind,
    pub id: u32,
    pub status: HelperStatus,
    pub detail: String,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct AgentRun {
    pub ready: bool,
    /// Why it did not become ready (its whole stderr is in agent.log).
    pub start_error: Option<String>,
    /// The agent's "probes attached" and "credwatch ready" log lines.
    pub attached_line: Option<String>,
    pub ready_line: Option<String>,
    /// Its "credwatch stopped" line (event counts and drops).
    pub stopped_line: Option<String>,
    /// The programs the agent holds (from /proc/<pid>/fdinfo) once ready.
    pub programs: Vec<ProgInfo>,
    /// Perf-event fds it holds (tracepoint attachments on kernels without perf links).
    pub perf_event_fds: usize,
    pub ctx: Option<Ctx>,
    pub steps: Vec<StepRun>,
    pub load: Vec<LoadPhase>,
    /// A failed stop: no clean exit 0 within the limit after SIGTERM.
    pub stop_error: Option<String>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ProgInfo {
    pub id: u32,
    pub name: String,
    pub prog_type: u32,
    /// BPF links the agent holds for this program (perf, cgroup, raw_tracepoint…).
    pub links: Vec<String>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct StepRun {
    pub name: String,
    pub pid: u32,
    pub exit_code: Option<i32>,
    pub stdout: String,
    pub stderr: String,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct LoadPhase {
    pub name: String,
    pub ops: u64,
    pub pid: u32,
    pub seconds: f64,
    /// Program id → runs during the phase.
    pub runs: BTreeMap<u32, u64>,
}

const WORK: &str = "/tmp/cw";

fn say(t0: Instant, msg: &str) {
    println!("cw-guest: [{:7.1}s] {msg}", t0.elapsed().as_secs_f64());
    let _ = std::io::stdout().flush();
}

/// Entry point inside the guest; always writes `results.json` unless the share is gone.
pub fn main(plan_path: &Path) -> Result<()> {
    let out = plan_path.parent().context("plan has no directory")?;
    let plan: Plan = serde_json::from_slice(
        &fs::read(plan_path).with_context(|| format!("reading {}", plan_path.display()))?,
    )
    .context("parsing the plan")?;
    let t0 = Instant::now();
    let mut r = Results::default();
    if let Err(e) = run(&plan, out, &mut r, t0) {
        say(t0, &format!("harness error: {e:#}"));
        r.error = Some(format!("{e:#}"));
    }
    let path = out.join("results.json");
    let mut f = fs::File::create(&path).with_context(|| format!("creating {}", path.display()))?;
    f.write_all(&serde_json::to_vec_pretty(&r)?)?;
    f.sync_all()?;
    say(t0, "results written");
    Ok(())
}

fn phase(r: &mut Results, name: &str, t: Instant) {
    r.phases.push((name.into(), t.elapsed().as_secs_f64()));
}

fn run(plan: &Plan, out: &Path, r: &mut Results, t0: Instant) -> Result<()> {
    r.release = fs::read_to_string("/proc/sys/kernel/osrelease")?
        .trim()
        .to_owned();
    r.uptime_at_start = fs::read_to_string("/proc/uptime")?
        .split_whitespace()
        .next()
        .and_then(|s| s.parse().ok())
        .unwrap_or(0.0);
    r.cmdline = fs::read_to_string("/proc/cmdline")
        .unwrap_or_default()
        .trim()
        .to_owned();
    r.lsm = fs::read_to_string("/sys/kernel/security/lsm").unwrap_or_default();
    say(t0, &format!("kernel {} lsm={}", r.release, r.lsm));
    fs::write("/proc/sys/kernel/bpf_stats_enabled", "1")
        .context("enabling kernel.bpf_stats_enabled")?;

    let t = Instant::now();
    let btf = match Btf::open("/sys/kernel/btf/vmlinux") {
        Ok(b) => Some(b),
        Err(e) => {
            say(t0, &format!("no usable kernel BTF: {e:#}"));
            None
        }
    };
    r.btf = btf.is_some();
    for &kind in bpf::ALL_KINDS {
        let f = bpf::probe_kind(kind, btf.as_ref());
        say(
            t0,
            &format!(
                "{}: loaded={} attached={:?} runs={:?} {}",
                kind.hook(),
                f.loaded,
                f.attached,
                f.runs,
                f.error.as_deref().unwrap_or("")
            ),
        );
        r.features.push(f);
    }
    for (kind, ids) in &plan.helpers {
        for &id in ids {
            let (status, detail) = bpf::probe_helper(*kind, id, btf.as_ref());
            r.helpers.push(HelperResult {
                kind: *kind,
                id,
                status,
                detail,
            });
        }
    }
    drop(btf);
    phase(r, "feature probes", t);

    let mut run = AgentRun::default();
    let res = agent_scenario(plan, out, &mut run, r, t0);
    r.agent = Some(run);
    res
}

fn agent_scenario(
    plan: &Plan,
    out: &Path,
    run: &mut AgentRun,
    r: &mut Results,
    t0: Instant,
) -> Result<()> {
    let work = Path::new(WORK);
    fs::create_dir_all(work.join("secret"))?;
    fs::create_dir_all(work.join("state"))?;
    let secret = work.join("secret/token");
    fs::write(&secret, "credwatch-kernel-matrix-token")?;
    let link = work.join("link");
    std::os::unix::fs::symlink(&secret, &link)?;
    let unwatched = work.join("unwatched");
    fs::write(&unwatched, "public")?;
    let md = fs::metadata(&secret)?;
    let listener = TcpListener::bind("127.0.0.1:0").context("binding the TCP listener")?;
    let ctx = Ctx {
        actor: plan.actor.display().to_string(),
        secret: secret.display().to_string(),
        secret_dev: md.dev(),
        secret_ino: md.ino(),
        link: link.display().to_string(),
        tcp_port: listener.local_addr()?.port(),
        ia32_reader: plan.ia32_reader.display().to_string(),
    };
    std::thread::spawn(move || {
        for c in listener.incoming() {
            drop(c);
        }
    });
    run.ctx = Some(ctx.clone());

    let t = Instant::now();
    say(t0, "starting the agent");
    let config = format!(
        "[secrets]\ncatalog = false\npaths = [\"{}\"]\n",
        secret.display()
    );
    let launch = Launch {
        bin: &plan.agent,
        config: &config,
        work,
        state_dir: None,
        events: true,
        stats: false,
        extra_args: &[],
        log: Some(&plan.agent_log),
        env: &[],
        ready_timeout: Duration::from_secs(plan.ready_timeout_s),
    };
    let started = launch.start();
    phase(r, "agent start", t);
    let mut agent = match started {
        Ok(a) => a,
        Err(e) => {
            say(t0, "the agent did not become ready");
            run.start_error = e
                .lines()
                .next()
                .map(|l| l.trim_end_matches("; stderr:").to_owned());
            fs::write(out.join("agent.log"), e + "\n")?;
            return Ok(());
        }
    };
    run.ready = true;
    say(t0, "agent ready");
    let outcome = drive(plan, &ctx, agent.pid(), run, r, &unwatched, t0);
    let t = Instant::now();
    // Let the drain timer pick up the last records first.
    std::thread::sleep(Duration::from_millis(500));
    if let Err(e) = agent.stop(Duration::from_secs(120)) {
        run.stop_error = e.lines().next().map(str::to_owned);
    }
    phase(r, "agent stop", t);
    // The agent writes plain lines when its stderr is no terminal.
    let lines: Vec<String> = agent.stderr.lock().unwrap().clone();
    let find = |pat: &str| lines.iter().find(|l| l.contains(pat)).cloned();
    run.attached_line = find("probes attached");
    run.ready_line = find("credwatch ready");
    run.stopped_line = find("credwatch stopped");
    fs::write(out.join("agent.log"), lines.join("\n") + "\n")?;
    if launch.events_path().exists() {
        fs::copy(launch.events_path(), out.join("events.ndjson"))
            .context("copying the events to the host")?;
    }
    outcome
}

fn drive(
    plan: &Plan,
    ctx: &Ctx,
    pid: u32,
    run: &mut AgentRun,
    r: &mut Results,
    unwatched: &Path,
    t0: Instant,
) -> Result<()> {
    let (programs, perf) = agent_programs(pid)?;
    run.programs = programs;
    run.perf_event_fds = perf;
    say(
        t0,
        &format!(
            "agent holds {} programs: {}",
            run.programs.len(),
            run.programs
                .iter()
                .map(|p| p.name.as_str())
                .collect::<Vec<_>>()
                .join(" ")
        ),
    );

    let t = Instant::now();
    for step in scenario::steps(ctx) {
        let child = Command::new(&step.argv[0])
            .args(&step.argv[1..])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .with_context(|| format!("spawning step {}", step.name))?;
        let step_pid = child.id();
        let outp = wait_output(child, Duration::from_secs(120))
            .with_context(|| format!("step {}", step.name))?;
        say(
            t0,
            &format!("step {}: pid {step_pid} exit {:?}", step.name, outp.0),
        );
        run.steps.push(StepRun {
            name: step.name.into(),
            pid: step_pid,
            exit_code: outp.0,
            stdout: outp.1,
            stderr: outp.2,
        });
    }
    phase(r, "scenario steps", t);

    let t = Instant::now();
    for load in [
        Load::Nothing,
        Load::Getppid,
        Load::OpenClose,
        Load::UdpConnect,
    ] {
        let ops = if matches!(load, Load::Nothing) {
            0
        } else {
            plan.load_ops
        };
        let before = run_counts(pid);
        let (lpid, secs) = load.run(ops, unwatched)?;
        let after = run_counts(pid);
        let runs = after
            .iter()
            .map(|(id, n)| (*id, n.saturating_sub(*before.get(id).unwrap_or(&0))))
            .collect();
        say(
            t0,
            &format!("load {}: {ops} ops in {secs:.1}s", load.name()),
        );
        run.load.push(LoadPhase {
            name: load.name().into(),
            ops,
            pid: lpid,
            seconds: secs,
            runs,
        });
    }
    phase(r, "run-count load", t);
    Ok(())
}

/// Waits for a child with a deadline; (exit code, stdout, stderr).
fn wait_output(mut child: Child, limit: Duration) -> Result<(Option<i32>, String, String)> {
    let deadline = Instant::now() + limit;
    loop {
        if child.try_wait()?.is_some() {
            let o = child.wait_with_output()?;
            return Ok((
                o.status.code(),
                String::from_utf8_lossy(&o.stdout).into_owned(),
                String::from_utf8_lossy(&o.stderr).into_owned(),
            ));
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            bail!("did not finish within {} s", limit.as_secs());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn fd_entries(pid: u32) -> Result<Vec<(String, String)>> {
    let dir = format!("/proc/{pid}/fd");
    let mut out = Vec::new();
    for e in fs::read_dir(&dir).with_context(|| format!("listing {dir}"))? {
        let e = e?;
        let target = fs::read_link(e.path())
            .map(|p| p.display().to_string())
            .unwrap_or_default();
        out.push((e.file_name().to_string_lossy().into_owned(), target));
    }
    Ok(out)
}

fn fdinfo(pid: u32, fd: &str) -> BTreeMap<String, String> {
    fs::read_to_string(format!("/proc/{pid}/fdinfo/{fd}"))
        .unwrap_or_default()
        .lines()
        .filter_map(|l| {
            let (k, v) = l.split_once(':')?;
            Some((k.trim().to_owned(), v.trim().to_owned()))
        })
        .collect()
}

/// The agent's programs by id, with the links that hold them, and its perf-event fd count.
fn agent_programs(pid: u32) -> Result<(Vec<ProgInfo>, usize)> {
    let mut progs: BTreeMap<u32, ProgInfo> = BTreeMap::new();
    let mut links: Vec<(u32, String)> = Vec::new();
    let mut perf = 0;
    for (fd, target) in fd_entries(pid)? {
        if target.contains("bpf-prog") {
            let info = fdinfo(pid, &fd);
            let id = info
                .get("prog_id")
                .and_then(|v| v.parse().ok())
                .unwrap_or(0);
            let prog_type = info
                .get("prog_type")
                .and_then(|v| v.parse().ok())
                .unwrap_or(0);
            progs.entry(id).or_insert_with(|| ProgInfo {
                id,
                name: bpf::prog_name(id).unwrap_or_else(|| format!("prog{id}")),
                prog_type,
                links: Vec::new(),
            });
        } else if target.contains("bpf_link") {
            let info = fdinfo(pid, &fd);
            if let Some(id) = info.get("prog_id").and_then(|v| v.parse().ok()) {
                links.push((
                    id,
                    info.get("link_type").cloned().unwrap_or_else(|| "?".into()),
                ));
            }
        } else if target.contains("perf_event") {
            perf += 1;
        }
    }
    for (id, kind) in links {
        if let Some(p) = progs.get_mut(&id) {
            p.links.push(kind);
        }
    }
    Ok((progs.into_values().collect(), perf))
}

/// run_cnt of each of the agent's programs now.
fn run_counts(pid: u32) -> BTreeMap<u32, u64> {
    let mut out = BTreeMap::new();
    for (fd, target) in fd_entries(pid).unwrap_or_default() {
        if !target.contains("bpf-prog") {
            continue;
        }
        let info = fdinfo(pid, &fd);
        if let (Some(id), Some(n)) = (
            info.get("prog_id").and_then(|v| v.parse().ok()),
            info.get("run_cnt").and_then(|v| v.parse().ok()),
        ) {
            out.insert(id, n);
        }
    }
    out
}

#[derive(Clone, Copy)]
enum Load {
    /// A child that only exits: what measuring itself costs (the fdinfo reads are opens,
    /// the child's exit runs the exit probe).
    Nothing,
    Getppid,
    OpenClose,
    UdpConnect,
}

impl Load {
    pub fn name(self) -> &'static str {
        match self {
            Load::Nothing => "nothing (0 ops)",
            Load::Getppid => "getppid",
            Load::OpenClose => "open+close unwatched",
            Load::UdpConnect => "udp connect",
        }
    }

    /// Runs `n` operations in a forked child (its own pid, so its events can be told apart);
    /// returns (pid, seconds).
    fn run(self, n: u64, unwatched: &Path) -> Result<(u32, f64)> {
        let path = CString::new(unwatched.as_os_str().as_encoded_bytes())?;
        let addr = libc::sockaddr_in {
            sin_family: libc::AF_INET as libc::sa_family_t,
            sin_port: 9u16.to_be(),
            sin_addr: libc::in_addr {
                s_addr: u32::from_be_bytes([127, 0, 0, 1]).to_be(),
            },
            sin_zero: [0; 8],
        };
        let t = Instant::now();
        // SAFETY: the child only makes raw syscalls on data prepared before the fork, then
        // _exits; no allocation or lock is touched after fork.
        let pid = unsafe { libc::fork() };
        if pid < 0 {
            bail!("fork: {}", std::io::Error::last_os_error());
        }
        if pid == 0 {
            let code = unsafe { self.child(n, &path, &addr) };
            unsafe { libc::_exit(code) };
        }
        let mut status = 0;
        // SAFETY: waiting for the child just forked.
        unsafe { libc::waitpid(pid, &mut status, 0) };
        if !libc::WIFEXITED(status) || libc::WEXITSTATUS(status) != 0 {
            bail!("load {} failed (wait status {status})", self.name());
        }
        Ok((pid as u32, t.elapsed().as_secs_f64()))
    }

    /// # Safety
    /// Only for the forked child: raw syscalls, no allocation.
    unsafe fn child(self, n: u64, path: &CString, addr: &libc::sockaddr_in) -> i32 {
        unsafe {
            match self {
                Load::Nothing => {}
                Load::Getppid => {
                    for _ in 0..n {
                        libc::syscall(libc::SYS_getppid);
                    }
                }
                Load::OpenClose => {
                    for _ in 0..n {
                        let fd = libc::open(path.as_ptr(), libc::O_RDONLY);
                        if fd < 0 {
                            return 2;
                        }
                        libc::close(fd);
                    }
                }
                Load::UdpConnect => {
                    let s = libc::socket(libc::AF_INET, libc::SOCK_DGRAM, 0);
                    if s < 0 {
                        return 3;
                    }
                    for _ in 0..n {
                        let rc = libc::connect(
                            s,
                            (addr as *const libc::sockaddr_in).cast(),
                            std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t,
                        );
                        if rc != 0 {
                            return 4;
                        }
                    }
                    libc::close(s);
                }
            }
        }
        0
    }
}
