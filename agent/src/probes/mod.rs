//! Loads the kernel probes, keeps their inode maps in sync with the secret inventory, drains
//! the ring buffer and surfaces per-probe drop counters.

pub mod btf;
pub mod host;

use std::{
    collections::HashSet,
    fs::File,
    path::{Path, PathBuf},
};

use anyhow::{Context, Result, anyhow};
use aya::{
    Ebpf, EbpfLoader,
    maps::{Array, HashMap as BpfHashMap, MapData, PerCpuArray, RingBuf, SockHash},
    programs::{
        CgroupAttachMode, CgroupSkb, CgroupSkbAttachType, CgroupSockAddr, FExit, RawTracePoint,
        SkMsg, SockOps, TracePoint,
    },
};
use credwatch_common::{
    Budget, FOPS_ENVIRON, FOPS_MEM, INO_FILTER_WORDS, InodeKey, KernelConfig, PROBE_COUNT, Probe,
    RepeatKey, Repeats, SETTING_CGROUP_BUDGET, SETTING_DNS_RATE, SETTING_FILE_OPEN_HOOK,
    SETTING_LEARN_SLOT, SETTING_LEARN_TID, SETTING_REPEAT_MS, SETTING_WATCHED_DIRS,
    SUPPRESSED_COUNT, Suppressed, ino_filter_slot,
};
use tracing::{debug, info, warn};

use crate::{
    config::{Checker, Validate, check_nonzero},
    syscalls::{self, Syscall},
};

/// The probe object, built from `ebpf/` by build.rs.
static PROBES_OBJ: &[u8] =
    aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/credwatch-probes"));

/// `[sensors]`: the ring buffer between probes and agent, and how it is drained.
#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    #[serde(default = "default_ring_bytes")]
    pub ring_bytes: u32,
    /// Wake the agent when this much is waiting (otherwise it drains on its timer).
    #[serde(default = "default_wake_bytes")]
    pub wake_bytes: u32,
    /// The agent drains the ring at least this often (the probes do not wake it per event).
    #[serde(default = "default_drain", with = "humantime_serde")]
    pub drain_interval: std::time::Duration,
    /// Ring for secret opens and process-memory access, apart from everything else so an
    /// exec or connect storm cannot push them out.
    #[serde(default = "default_secret_ring_bytes")]
    pub secret_ring_bytes: u32,
    /// One process re-reading one secret sends at most one record per this interval; the
    /// opens in between are counted exactly and reported as `repeats`.
    #[serde(default = "default_repeat", with = "humantime_serde")]
    pub repeat_interval: std::time::Duration,
    /// Secret-open records per cgroup per second; beyond it opens are counted per cgroup
    /// (and still add up in `repeats`), so one workload's flood cannot crowd out another's.
    #[serde(default = "default_cgroup_budget")]
    pub cgroup_budget: u32,
    /// DNS answer records per second, node-wide.
    #[serde(default = "default_dns_rate")]
    pub dns_rate: u32,
    /// 32-bit (ia32) syscalls on x86-64 bypass the per-syscall tracepoints. `always`
    /// watches them from the start (every syscall of every process pays for one more probe),
    /// `on_exec` from the first 32-bit exec the agent sees, `off` never (32-bit execs are
    /// still flagged).
    #[serde(default)]
    pub ia32: Ia32Mode,
    /// What sees opens. `file_open`: one fexit program on `security_file_open` (every open
    /// path, ia32 and io_uring included, and no syscall tracepoint for opens); `syscalls`:
    /// the open syscalls' exit tracepoints plus the io_uring tracepoints and the ia32 probe;
    /// `auto`: `file_open` where the kernel loads it, else `syscalls`.
    #[serde(default)]
    pub open_hook: OpenHook,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OpenHook {
    #[default]
    Auto,
    FileOpen,
    Syscalls,
}

/// The open hook set the probes run with (after `auto` is decided).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OpenHookSet {
    FileOpen,
    Syscalls,
}

impl OpenHookSet {
    pub fn name(self) -> &'static str {
        match self {
            OpenHookSet::FileOpen => "file_open",
            OpenHookSet::Syscalls => "syscalls",
        }
    }
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Ia32Mode {
    Always,
    #[default]
    OnExec,
    Off,
}

fn default_secret_ring_bytes() -> u32 {
    2 << 20
}
fn default_repeat() -> std::time::Duration {
    std::time::Duration::from_secs(1)
}
fn default_cgroup_budget() -> u32 {
    1000
}
fn default_dns_rate() -> u32 {
    2000
}

fn default_ring_bytes() -> u32 {
    8 << 20
}
fn default_wake_bytes() -> u32 {
    256 << 10
}
fn default_drain() -> std::time::Duration {
    std::time::Duration::from_millis(10)
}

impl Default for Config {
    fn default() -> Self {
        Config {
            ring_bytes: default_ring_bytes(),
            wake_bytes: default_wake_bytes(),
            drain_interval: default_drain(),
            secret_ring_bytes: default_secret_ring_bytes(),
            repeat_interval: default_repeat(),
            cgroup_budget: default_cgroup_budget(),
            dns_rate: default_dns_rate(),
            ia32: Ia32Mode::default(),
            open_hook: OpenHook::default(),
        }
    }
}

impl Validate for Config {
    fn validate(&self, c: &mut Checker) {
        c.check(
            self.ring_bytes >= 4096 && self.ring_bytes.is_power_of_two(),
            "ring_bytes",
            format_args!("must be a power of two ≥ 4096 (got {})", self.ring_bytes),
        );
        c.check(self.wake_bytes > 0, "wake_bytes", "must be at least 1");
        check_nonzero(c, "drain_interval", self.drain_interval);
        c.check(
            self.secret_ring_bytes >= 4096 && self.secret_ring_bytes.is_power_of_two(),
            "secret_ring_bytes",
            format_args!(
                "must be a power of two ≥ 4096 (got {})",
                self.secret_ring_bytes
            ),
        );
        c.check(
            self.repeat_interval.as_millis() <= u32::MAX as u128,
            "repeat_interval",
            "must be shorter than 49 days",
        );
        c.check(
            self.cgroup_budget > 0,
            "cgroup_budget",
            "must be at least 1",
        );
        c.check(self.dns_rate > 0, "dns_rate", "must be at least 1");
    }
}

/// Records the ring could not take, per probe (indexed by [`Probe`]).
pub type Drops = [u64; PROBE_COUNT as usize];

#[derive(Clone, Debug)]
pub struct SensorOptions {
    pub ring_bytes: u32,
    pub secret_ring_bytes: u32,
    /// Wake the agent when this much is waiting (otherwise it drains on its timer).
    pub wake_bytes: u32,
    pub sendmsg_dedup_ns: u64,
    pub repeat_ms: u32,
    pub cgroup_budget: u32,
    pub dns_rate: u32,
    pub ia32: Ia32Mode,
    pub open_hook: OpenHook,
    pub btf_path: PathBuf,
    /// Where to mount cgroup2 if the host has none.
    pub cgroup2_fallback: PathBuf,
}

impl SensorOptions {
    pub fn from_config(cfg: &Config) -> Self {
        SensorOptions {
            ring_bytes: cfg.ring_bytes,
            secret_ring_bytes: cfg.secret_ring_bytes,
            // A threshold the ring can never reach would leave only the drain timer.
            wake_bytes: cfg
                .wake_bytes
                .min(cfg.ring_bytes.min(cfg.secret_ring_bytes) / 2),
            repeat_ms: cfg.repeat_interval.as_millis().min(u32::MAX as u128) as u32,
            cgroup_budget: cfg.cgroup_budget,
            dns_rate: cfg.dns_rate,
            ia32: cfg.ia32,
            open_hook: cfg.open_hook,
            ..SensorOptions::default()
        }
    }
}

impl Default for SensorOptions {
    fn default() -> Self {
        let c = Config::default();
        SensorOptions {
            ring_bytes: c.ring_bytes,
            secret_ring_bytes: c.secret_ring_bytes,
            wake_bytes: c.wake_bytes,
            sendmsg_dedup_ns: 1_000_000_000,
            repeat_ms: c.repeat_interval.as_millis() as u32,
            cgroup_budget: c.cgroup_budget,
            dns_rate: c.dns_rate,
            ia32: c.ia32,
            open_hook: c.open_hook,
            btf_path: PathBuf::from(btf::VMLINUX_BTF),
            cgroup2_fallback: PathBuf::from("/run/credwatch/cgroup2"),
        }
    }
}

/// The two rings the probes fill.
pub struct Rings {
    /// Secret opens and process-memory access.
    pub secrets: RingBuf<MapData>,
    /// Everything else.
    pub events: RingBuf<MapData>,
}

/// Loaded and attached probes. Dropping it detaches everything (links are owned fds).
pub struct Sensors {
    /// Owns the loaded programs and their links: dropping it detaches every probe.
    ebpf: Ebpf,
    logger: Option<aya_log::EbpfLogger<&'static dyn log::Log>>,
    /// The sk_msg program is attached to this map: it lives as long as the probes.
    _metadata_socks: SockHash<MapData, u64>,
    rings: Option<Rings>,
    secret_inodes: BpfHashMap<MapData, InodeKey, u32>,
    watched_dirs: BpfHashMap<MapData, InodeKey, u32>,
    repeats: BpfHashMap<MapData, RepeatKey, Repeats>,
    budgets: BpfHashMap<MapData, u64, Budget>,
    drops: PerCpuArray<MapData, u64>,
    suppressed: PerCpuArray<MapData, u64>,
    settings: Array<MapData, u32>,
    file_filter: InoFilter,
    dir_filter: InoFilter,
    in_map: HashSet<InodeKey>,
    dirs_in_map: HashSet<InodeKey>,
    ia32: Ia32Mode,
    ia32_attached: bool,
    pub open_hook: OpenHookSet,
    pub cgroup2_root: PathBuf,
    pub attached: Vec<String>,
}

impl Sensors {
    pub fn load(opts: &SensorOptions) -> Result<Self> {
        host::check_kernel()?;
        host::check_privileges()?;
        if !opts.btf_path.exists() {
            return Err(anyhow!(
                "kernel BTF not found at {}: credwatch needs a kernel built with \
                 CONFIG_DEBUG_INFO_BTF=y",
                opts.btf_path.display()
            ));
        }
        host::ensure_tracefs()?;
        let cgroup2_root = host::cgroup2_root(&opts.cgroup2_fallback)?;
        host::raise_memlock();

        let kbtf = btf::KernelBtf::open(&opts.btf_path)?;
        let mut kcfg: KernelConfig = kbtf.kernel_config()?;
        kcfg.agent_tgid = std::process::id();
        kcfg.wake_bytes = opts.wake_bytes;
        kcfg.sendmsg_dedup_ns = opts.sendmsg_dedup_ns;
        let submit = io_uring_tracepoint(&["io_uring_submit_req", "io_uring_submit_sqe"]);
        let complete = io_uring_tracepoint(&["io_uring_complete"]);
        if let (Some((_, f)), Some((_, g))) = (&submit, &complete) {
            kcfg.tp_iou_submit_req = btf::tracepoint_field(f, "req").unwrap_or(u32::MAX);
            kcfg.tp_iou_submit_opcode = btf::tracepoint_field(f, "opcode").unwrap_or(u32::MAX);
            kcfg.tp_iou_complete_req = btf::tracepoint_field(g, "req").unwrap_or(u32::MAX);
            kcfg.tp_iou_complete_res = btf::tracepoint_field(g, "res").unwrap_or(u32::MAX);
        }

        let mut loader = EbpfLoader::new();
        loader.override_global("CW_CONFIG", &kcfg, true);
        loader.map_max_entries("EVENTS", opts.ring_bytes);
        loader.map_max_entries("SECRET_EVENTS", opts.secret_ring_bytes);
        let mut ebpf = loader
            .load(PROBES_OBJ)
            .context("loading the probe object")?;
        // Diagnostics from rare probe paths; the map must stay open while programs load.
        let logger = match aya_log::EbpfLogger::init(&mut ebpf) {
            Ok(l) => Some(l),
            Err(e) => {
                warn!("probe diagnostics unavailable: {e}");
                None
            }
        };
        let mut settings = Array::try_from(ebpf.take_map("SETTINGS").context("map SETTINGS")?)?;
        for (i, v) in [
            (SETTING_REPEAT_MS, opts.repeat_ms),
            (SETTING_CGROUP_BUDGET, opts.cgroup_budget),
            (SETTING_DNS_RATE, opts.dns_rate),
        ] {
            settings.set(i, v, 0).context("writing probe settings")?;
        }

        let mut attached = Vec::new();
        attach_tracepoint(
            &mut ebpf,
            "sched_process_exec",
            "sched",
            &["sched_process_exec"],
            &mut attached,
        )?;
        attach_tracepoint(
            &mut ebpf,
            "sched_process_exit",
            "sched",
            &["sched_process_exit"],
            &mut attached,
        )?;
        let open_hook = choose_open_hook(&mut ebpf, &mut settings, opts, &mut attached)?;
        if open_hook == OpenHookSet::Syscalls {
            let exits = syscall_exits(syscalls::OPEN_FAMILY);
            attach_tracepoint(
                &mut ebpf,
                "sys_exit_open_family",
                "syscalls",
                &exits.iter().map(String::as_str).collect::<Vec<_>>(),
                &mut attached,
            )?;
        }
        for (prog, sys) in [
            ("sys_exit_connect", Syscall::Connect),
            ("sys_exit_ptrace", Syscall::Ptrace),
            ("sys_exit_process_vm_readv", Syscall::ProcessVmReadv),
        ] {
            let tp = format!("sys_exit_{}", sys.name());
            attach_tracepoint(&mut ebpf, prog, "syscalls", &[&tp], &mut attached)?;
        }
        let privs = syscall_exits(syscalls::CREDENTIAL_CHANGES);
        attach_tracepoint(
            &mut ebpf,
            "sys_exit_priv",
            "syscalls",
            &privs.iter().map(String::as_str).collect::<Vec<_>>(),
            &mut attached,
        )?;
        match (&submit, &complete) {
            (Some((s, _)), Some((c, _))) => {
                attach_tracepoint(
                    &mut ebpf,
                    "io_uring_submit",
                    "io_uring",
                    &[s],
                    &mut attached,
                )?;
                attach_tracepoint(
                    &mut ebpf,
                    "io_uring_complete",
                    "io_uring",
                    &[c],
                    &mut attached,
                )?;
            }
            _ if open_hook == OpenHookSet::FileOpen => {
                info!("this kernel has no io_uring tracepoints: io_uring connects carry no result")
            }
            _ => warn!("this kernel has no io_uring tracepoints: io_uring opens are not seen"),
        }

        let cgroup = File::open(&cgroup2_root)
            .with_context(|| format!("opening cgroup2 root {}", cgroup2_root.display()))?;
        for name in ["connect4", "connect6", "sendmsg4", "sendmsg6"] {
            let prog: &mut CgroupSockAddr = program(&mut ebpf, name)?;
            prog.load().with_context(|| format!("loading {name}"))?;
            prog.attach(&cgroup, cgroup_mode())
                .with_context(|| format!("attaching {name} to {}", cgroup2_root.display()))?;
            attached.push(format!("cgroup/{name}"));
        }
        {
            let prog: &mut CgroupSkb = program(&mut ebpf, "dns_ingress")?;
            prog.load().context("loading dns_ingress")?;
            prog.attach(&cgroup, CgroupSkbAttachType::Ingress, cgroup_mode())
                .with_context(|| format!("attaching dns_ingress to {}", cgroup2_root.display()))?;
            attached.push("cgroup_skb/ingress".into());
        }
        {
            let prog: &mut SockOps = program(&mut ebpf, "metadata_sockops")?;
            prog.load().context("loading metadata_sockops")?;
            prog.attach(&cgroup, cgroup_mode())
                .with_context(|| format!("attaching sock_ops to {}", cgroup2_root.display()))?;
            attached.push("sockops".into());
        }
        let metadata_socks: SockHash<MapData, u64> = SockHash::try_from(
            ebpf.take_map("METADATA_SOCKS")
                .context("map METADATA_SOCKS")?,
        )?;
        {
            let prog: &mut SkMsg = program(&mut ebpf, "metadata_request")?;
            prog.load().context("loading metadata_request")?;
            prog.attach(metadata_socks.fd())
                .context("attaching sk_msg to METADATA_SOCKS")?;
            attached.push("sk_msg".into());
        }

        let rings = Rings {
            secrets: RingBuf::try_from(
                ebpf.take_map("SECRET_EVENTS")
                    .context("map SECRET_EVENTS")?,
            )?,
            events: RingBuf::try_from(ebpf.take_map("EVENTS").context("map EVENTS")?)?,
        };
        let secret_inodes = BpfHashMap::try_from(
            ebpf.take_map("SECRET_INODES")
                .context("map SECRET_INODES")?,
        )?;
        let watched_dirs =
            BpfHashMap::try_from(ebpf.take_map("WATCHED_DIRS").context("map WATCHED_DIRS")?)?;
        let repeats = BpfHashMap::try_from(ebpf.take_map("REPEATS").context("map REPEATS")?)?;
        let budgets = BpfHashMap::try_from(ebpf.take_map("BUDGETS").context("map BUDGETS")?)?;
        let drops = PerCpuArray::try_from(ebpf.take_map("DROPS").context("map DROPS")?)?;
        let suppressed =
            PerCpuArray::try_from(ebpf.take_map("SUPPRESSED").context("map SUPPRESSED")?)?;
        let file_filter = InoFilter::new(&mut ebpf, "FILE_INO_FILTER")?;
        let dir_filter = InoFilter::new(&mut ebpf, "DIR_INO_FILTER")?;
        let mut sensors = Sensors {
            ebpf,
            logger,
            _metadata_socks: metadata_socks,
            rings: Some(rings),
            secret_inodes,
            watched_dirs,
            repeats,
            budgets,
            drops,
            suppressed,
            settings,
            file_filter,
            dir_filter,
            in_map: HashSet::new(),
            dirs_in_map: HashSet::new(),
            // file_open sees 32-bit opens itself.
            ia32: if open_hook == OpenHookSet::FileOpen {
                Ia32Mode::Off
            } else {
                opts.ia32
            },
            ia32_attached: false,
            open_hook,
            cgroup2_root,
            attached,
        };
        if sensors.ia32 == Ia32Mode::Always {
            sensors.watch_ia32()?;
        }
        sensors.learn_proc_fops()?;
        info!(
            programs = sensors.attached.len(),
            open_hook = %open_hook.name(),
            cgroup2 = %sensors.cgroup2_root.display(),
            "probes attached"
        );
        Ok(sensors)
    }

    /// Teaches the open probe what /proc/<pid>/environ and /proc/<pid>/mem look like: the
    /// agent opens its own, from this thread, and the probe keeps their `file_operations`.
    fn learn_proc_fops(&mut self) -> Result<()> {
        // SAFETY: gettid has no preconditions.
        let tid = unsafe { libc::gettid() } as u32;
        let mut learned = 0;
        for (slot, path) in [
            (FOPS_ENVIRON, "/proc/self/environ"),
            (FOPS_MEM, "/proc/self/mem"),
        ] {
            self.settings.set(SETTING_LEARN_SLOT, slot, 0)?;
            self.settings.set(SETTING_LEARN_TID, tid, 0)?;
            match File::open(path) {
                Ok(f) => drop(f),
                Err(e) => warn!("opening {path} to learn its kind: {e}"),
            }
            self.settings.set(SETTING_LEARN_TID, 0, 0)?;
            let fops: Array<&MapData, u64> =
                Array::try_from(self.ebpf.map("FOPS").context("map FOPS")?)?;
            if fops.get(&slot, 0).unwrap_or(0) != 0 {
                learned += 1;
            }
        }
        if learned < 2 {
            warn!("reads of other processes' environment or memory through /proc are not seen");
        }
        Ok(())
    }

    /// Attaches the probe for 32-bit syscalls (once).
    pub fn watch_ia32(&mut self) -> Result<()> {
        if self.ia32_attached || self.ia32 == Ia32Mode::Off {
            return Ok(());
        }
        let prog: &mut RawTracePoint = program(&mut self.ebpf, "sys_exit_compat")?;
        prog.load().context("loading sys_exit_compat")?;
        prog.attach("sys_exit")
            .context("attaching the ia32 syscall probe (raw tracepoint sys_exit)")?;
        self.ia32_attached = true;
        self.attached.push("raw_tp/sys_exit (ia32)".into());
        info!("watching 32-bit syscalls: every syscall now runs one more probe");
        Ok(())
    }

    /// True when a probe may still be attached after start (the ia32 probe in `on_exec`
    /// mode): the loop must keep what attaching needs.
    pub fn may_attach_later(&self) -> bool {
        self.ia32 == Ia32Mode::OnExec && !self.ia32_attached
    }

    /// A 32-bit image started: in `on_exec` mode, from now on its syscalls are watched.
    pub fn saw_ia32_exec(&mut self) {
        if self.ia32 == Ia32Mode::OnExec
            && !self.ia32_attached
            && let Err(e) = self.watch_ia32()
        {
            warn!("{e:#}; 32-bit processes' opens stay unseen");
        }
    }

    /// The rings, handed to the reader once.
    pub fn take_rings(&mut self) -> Option<Rings> {
        self.rings.take()
    }

    /// Makes the kernel's file and directory maps hold the inventory, most important first:
    /// `files` and `dirs` come ranked (pod tokens first), and what does not fit a map is left
    /// out from the tail and counted, never an error (a home directory full of key files
    /// must not stop pod tokens from being watched, nor the agent from starting). Adds new
    /// inodes, removes ones that are gone (a rotated token's old inode) or no longer fit.
    pub fn sync_inodes(&mut self, files: &[InodeKey], dirs: &[InodeKey]) -> Result<SyncReport> {
        let file_cap = capacity(&self.secret_inodes);
        let dir_cap = capacity(&self.watched_dirs);
        let want_files = first_distinct(files, file_cap);
        let want_dirs = first_distinct(dirs, dir_cap);
        // Each bitmap must cover its map at every instant (a clear bit hides an inode from
        // the probe): first a bitmap over what is in the map and what is coming, then
        // remove (making room), then add, then the bitmap of what is in the map.
        self.file_filter
            .set(self.in_map.iter().chain(&want_files))?;
        self.dir_filter
            .set(self.dirs_in_map.iter().chain(&want_dirs))?;
        remove_entries(
            &mut self.secret_inodes,
            &mut self.in_map,
            &want_files,
            "SECRET_INODES",
        );
        remove_entries(
            &mut self.watched_dirs,
            &mut self.dirs_in_map,
            &want_dirs,
            "WATCHED_DIRS",
        );
        let mut report = SyncReport {
            files_wanted: files.len(),
            dirs_wanted: dirs.len(),
            file_capacity: file_cap,
            dir_capacity: dir_cap,
            ..Default::default()
        };
        report.insert_error = add_entries(
            &mut self.secret_inodes,
            &mut self.in_map,
            files,
            &want_files,
        )
        .or(add_entries(
            &mut self.watched_dirs,
            &mut self.dirs_in_map,
            dirs,
            &want_dirs,
        ));
        self.file_filter.set(self.in_map.iter())?;
        self.dir_filter.set(self.dirs_in_map.iter())?;
        report.files_in_map = self.in_map.len();
        report.dirs_in_map = self.dirs_in_map.len();
        // Lets the probes skip the directory walk entirely when nothing is watched.
        self.settings
            .set(SETTING_WATCHED_DIRS, self.dirs_in_map.len() as u32, 0)
            .context("updating probe settings")?;
        Ok(report)
    }

    /// Drops per probe since load, summed over CPUs, indexed by [`Probe`].
    pub fn drops(&self) -> Result<Drops> {
        let mut out = [0u64; PROBE_COUNT as usize];
        for p in Probe::ALL {
            let per_cpu = self.drops.get(&(*p as u32), 0)?;
            out[*p as usize] = per_cpu.iter().sum();
        }
        Ok(out)
    }

    /// Records the probes chose not to send, per reason (indexed by [`Suppressed`]).
    pub fn suppressed(&self) -> Result<[u64; SUPPRESSED_COUNT as usize]> {
        let mut out = [0u64; SUPPRESSED_COUNT as usize];
        for r in Suppressed::ALL {
            let per_cpu = self.suppressed.get(&(*r as u32), 0)?;
            out[*r as usize] = per_cpu.iter().sum();
        }
        Ok(out)
    }

    /// Secret opens each cgroup had counted but not sent (over its budget), since load.
    pub fn budget_suppressed(&self) -> Vec<(u64, u64)> {
        self.budgets
            .iter()
            .filter_map(Result::ok)
            .filter(|(_, b)| b.suppressed > 0)
            .map(|(cg, b)| (cg, b.suppressed))
            .collect()
    }

    /// The probe's counter for (process, secret): opens so far and when it last sent a
    /// record; `None` when it has none.
    pub fn repeat_state(&self, key: &RepeatKey) -> Option<Repeats> {
        self.repeats.get(key, 0).ok()
    }

    /// Every (process, secret) the probe counts opens for.
    pub fn repeat_keys(&self) -> Vec<RepeatKey> {
        self.repeats.keys().filter_map(Result::ok).collect()
    }

    /// Forgets a process's repeat counters (it exited).
    pub fn forget_repeats(&mut self, keys: &[RepeatKey]) {
        for k in keys {
            let _ = self.repeats.remove(k);
        }
    }

    /// Forwards probe diagnostics (aya-log) to the agent's log.
    pub fn flush_probe_logs(&mut self) {
        if let Some(l) = self.logger.as_mut() {
            l.flush();
        }
    }
}

/// The io_uring tracepoint of this kernel among `names` (renamed over versions), with its
/// tracefs format.
fn io_uring_tracepoint(names: &[&str]) -> Option<(String, String)> {
    names.iter().find_map(|n| {
        let f = Path::new(host::TRACEFS)
            .join("events/io_uring")
            .join(n)
            .join("format");
        std::fs::read_to_string(f)
            .ok()
            .map(|t| ((*n).to_owned(), t))
    })
}

fn syscall_exits(calls: &[Syscall]) -> Vec<String> {
    calls
        .iter()
        .map(|s| format!("sys_exit_{}", s.name()))
        .collect()
}

/// How many bytes are waiting in the ring: producer minus consumer position, read from a
/// read-only mapping of the ring's two control pages (the kernel allows read-only mappings
/// of them to anyone holding the map fd). aya's reader does not expose the positions.
pub struct RingFill {
    base: *mut libc::c_void,
    len: usize,
    page: usize,
}

// SAFETY: the mapping is read-only, lives as long as the struct, and is only read with
// atomic loads.
unsafe impl Send for RingFill {}

impl RingFill {
    pub fn new(fd: std::os::fd::BorrowedFd<'_>) -> Result<Self> {
        use std::os::fd::AsRawFd;
        // SAFETY: sysconf has no preconditions.
        let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) } as usize;
        let len = 2 * page;
        // SAFETY: mapping two pages of a ring buffer map fd read-only and shared; the result
        // is checked before use.
        let base = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ,
                libc::MAP_SHARED,
                fd.as_raw_fd(),
                0,
            )
        };
        if base == libc::MAP_FAILED {
            return Err(anyhow!(
                "mapping the ring buffer's positions: {}",
                std::io::Error::last_os_error()
            ));
        }
        Ok(RingFill { base, len, page })
    }

    pub fn bytes(&self) -> u64 {
        use std::sync::atomic::{AtomicU64, Ordering};
        // SAFETY: both positions are 8-byte aligned u64s at the start of their pages, inside
        // the live mapping; the kernel updates them atomically.
        let (cons, prod) = unsafe {
            let cons = &*(self.base as *const AtomicU64);
            let prod = &*((self.base as *const u8).add(self.page) as *const AtomicU64);
            (cons.load(Ordering::Acquire), prod.load(Ordering::Acquire))
        };
        prod.saturating_sub(cons)
    }
}

impl Drop for RingFill {
    fn drop(&mut self) {
        // SAFETY: unmapping exactly what `new` mapped.
        unsafe { libc::munmap(self.base, self.len) };
    }
}

/// On 5.7+ aya attaches through BPF links, which always coexist with other programs and
/// require zero flags; older kernels need BPF_F_ALLOW_MULTI to avoid evicting other tools.
fn cgroup_mode() -> CgroupAttachMode {
    match aya::util::KernelVersion::current() {
        Ok(v) if v >= aya::util::KernelVersion::new(5, 7, 0) => CgroupAttachMode::Single,
        _ => CgroupAttachMode::AllowMultiple,
    }
}

/// How a sync of the inode maps went: what the inventory wanted, what the maps hold.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SyncReport {
    pub files_wanted: usize,
    pub files_in_map: usize,
    pub file_capacity: usize,
    pub dirs_wanted: usize,
    pub dirs_in_map: usize,
    pub dir_capacity: usize,
    /// The first insert the kernel refused for another reason than space.
    pub insert_error: Option<String>,
}

impl SyncReport {
    /// Secrets and directories the kernel maps could not take: their reads are not seen.
    pub fn left_out(&self) -> usize {
        self.files_wanted.saturating_sub(self.files_in_map)
            + self.dirs_wanted.saturating_sub(self.dirs_in_map)
    }
}

/// A map's size as the kernel created it.
fn capacity(map: &BpfHashMap<MapData, InodeKey, u32>) -> usize {
    use aya::maps::IterableMap;
    map.map()
        .info()
        .map(|i| i.max_entries() as usize)
        .unwrap_or(usize::MAX)
}

/// The first `n` distinct keys of `ranked`.
fn first_distinct(ranked: &[InodeKey], n: usize) -> HashSet<InodeKey> {
    let mut out = HashSet::with_capacity(ranked.len().min(n));
    for k in ranked {
        if out.len() >= n {
            break;
        }
        out.insert(*k);
    }
    out
}

/// Adds what `wanted` has and the map does not, in the order of `ranked`. An insert the
/// kernel refuses ends the adding (the rest is left out); its error is returned unless it
/// is the map being full.
fn add_entries(
    map: &mut BpfHashMap<MapData, InodeKey, u32>,
    current: &mut HashSet<InodeKey>,
    ranked: &[InodeKey],
    wanted: &HashSet<InodeKey>,
) -> Option<String> {
    for key in ranked {
        if !wanted.contains(key) || current.contains(key) {
            continue;
        }
        match map.insert(key, 1, 0) {
            Ok(()) => {
                current.insert(*key);
            }
            Err(aya::maps::MapError::SyscallError(e))
                if e.io_error.raw_os_error() == Some(libc::E2BIG) =>
            {
                return None;
            }
            Err(e) => return Some(e.to_string()),
        }
    }
    None
}

fn remove_entries(
    map: &mut BpfHashMap<MapData, InodeKey, u32>,
    current: &mut HashSet<InodeKey>,
    wanted: &HashSet<InodeKey>,
    name: &str,
) {
    for key in current.difference(wanted).copied().collect::<Vec<_>>() {
        if let Err(e) = map.remove(&key) {
            debug!("{name}: removing {key:?}: {e}");
        }
        current.remove(&key);
    }
}

/// The probes' bitmap over inode numbers (`ino_filter_slot`), mirrored here so only the
/// words that change are written.
struct InoFilter {
    map: Array<MapData, u64>,
    words: Vec<u64>,
    name: &'static str,
}

impl InoFilter {
    fn new(ebpf: &mut Ebpf, name: &'static str) -> Result<Self> {
        let map = Array::try_from(ebpf.take_map(name).with_context(|| format!("map {name}"))?)?;
        Ok(InoFilter {
            map,
            words: vec![0; INO_FILTER_WORDS as usize],
            name,
        })
    }

    fn set<'a>(&mut self, keys: impl IntoIterator<Item = &'a InodeKey>) -> Result<()> {
        let mut want = vec![0u64; INO_FILTER_WORDS as usize];
        for k in keys {
            let (word, bit) = ino_filter_slot(k.ino);
            want[word as usize] |= bit;
        }
        for (i, (have, want)) in self.words.iter_mut().zip(&want).enumerate() {
            if have != want {
                self.map
                    .set(i as u32, *want, 0)
                    .with_context(|| format!("updating {}", self.name))?;
                *have = *want;
            }
        }
        Ok(())
    }
}

fn program<'a, T>(ebpf: &'a mut Ebpf, name: &str) -> Result<&'a mut T>
where
    &'a mut T: TryFrom<&'a mut aya::programs::Program, Error = aya::programs::ProgramError>,
{
    ebpf.program_mut(name)
        .ok_or_else(|| anyhow!("probe object has no program {name}"))?
        .try_into()
        .with_context(|| format!("program {name} has an unexpected type"))
}

/// Decides what sees opens: the file_open program where it loads and attaches (or where
/// config insists), else the open syscalls' tracepoints (attached by the caller).
fn choose_open_hook(
    ebpf: &mut Ebpf,
    settings: &mut Array<MapData, u32>,
    opts: &SensorOptions,
    attached: &mut Vec<String>,
) -> Result<OpenHookSet> {
    if opts.open_hook == OpenHook::Syscalls {
        return Ok(OpenHookSet::Syscalls);
    }
    // Before the program runs, so io_uring opens are never reported by both hook sets.
    settings
        .set(SETTING_FILE_OPEN_HOOK, 1, 0)
        .context("writing probe settings")?;
    let tried = (|| -> Result<()> {
        let btf = aya::Btf::parse_file(&opts.btf_path, aya::Endianness::default())
            .with_context(|| format!("reading {}", opts.btf_path.display()))?;
        let prog: &mut FExit = program(ebpf, "file_open")?;
        prog.load("security_file_open", &btf)
            .context("loading fexit/security_file_open")?;
        prog.attach()
            .context("attaching fexit/security_file_open")?;
        Ok(())
    })();
    match tried {
        Ok(()) => {
            attached.push("fexit/security_file_open".into());
            Ok(OpenHookSet::FileOpen)
        }
        Err(e) if opts.open_hook == OpenHook::Auto => {
            settings
                .set(SETTING_FILE_OPEN_HOOK, 0, 0)
                .context("writing probe settings")?;
            info!("{e:#}; opens are watched through the syscall tracepoints");
            Ok(OpenHookSet::Syscalls)
        }
        Err(e) => Err(e.context("[sensors] open_hook = \"file_open\"")),
    }
}

/// Loads `prog` once and attaches it to every tracepoint in `names` that this kernel has
/// (e.g. `open` and `creat` do not exist on arm64).
fn attach_tracepoint(
    ebpf: &mut Ebpf,
    prog: &str,
    category: &str,
    names: &[&str],
    attached: &mut Vec<String>,
) -> Result<()> {
    let tp: &mut TracePoint = program(ebpf, prog)?;
    tp.load()
        .with_context(|| format!("the kernel rejected probe {prog}"))?;
    let mut any = false;
    for name in names {
        if !Path::new(host::TRACEFS)
            .join("events")
            .join(category)
            .join(name)
            .exists()
        {
            debug!("tracepoint {category}/{name} not present on this kernel");
            continue;
        }
        tp.attach(category, name)
            .with_context(|| format!("attaching {prog} to tracepoint {category}/{name}"))?;
        attached.push(format!("{category}/{name}"));
        any = true;
    }
    if !any {
        warn!("no tracepoint for {prog} exists on this kernel");
    }
    Ok(())
}
