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
    maps::{Array, HashMap as BpfHashMap, MapData, PerCpuArray, RingBuf},
    programs::{CgroupAttachMode, CgroupSkb, CgroupSkbAttachType, CgroupSockAddr, TracePoint},
};
use credwatch_common::{
    INO_FILTER_WORDS, InodeKey, KernelConfig, PROBE_COUNT, Probe, SETTING_WATCHED_DIRS,
    ino_filter_slot,
};
use tracing::{debug, info, warn};

use crate::{
    config::{Checker, Validate, check_nonzero},
    syscalls,
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
    }
}

/// Records the ring could not take, per probe (indexed by [`Probe`]).
pub type Drops = [u64; PROBE_COUNT as usize];

#[derive(Clone, Debug)]
pub struct SensorOptions {
    pub ring_bytes: u32,
    /// Wake the agent when this much is waiting (otherwise it drains on its timer).
    pub wake_bytes: u32,
    pub sendmsg_dedup_ns: u64,
    pub btf_path: PathBuf,
    /// Where to mount cgroup2 if the host has none.
    pub cgroup2_fallback: PathBuf,
}

impl SensorOptions {
    pub fn from_config(cfg: &Config) -> Self {
        SensorOptions {
            ring_bytes: cfg.ring_bytes,
            // A threshold the ring can never reach would leave only the drain timer.
            wake_bytes: cfg.wake_bytes.min(cfg.ring_bytes / 2),
            ..SensorOptions::default()
        }
    }
}

impl Default for SensorOptions {
    fn default() -> Self {
        SensorOptions {
            ring_bytes: 8 << 20,
            wake_bytes: 256 << 10,
            sendmsg_dedup_ns: 1_000_000_000,
            btf_path: PathBuf::from(btf::VMLINUX_BTF),
            cgroup2_fallback: PathBuf::from("/run/credwatch/cgroup2"),
        }
    }
}

/// Loaded and attached probes. Dropping it detaches everything (links are owned fds).
pub struct Sensors {
    /// Owns the loaded programs and their links: dropping it detaches every probe.
    _ebpf: Ebpf,
    logger: Option<aya_log::EbpfLogger<&'static dyn log::Log>>,
    ring: Option<RingBuf<MapData>>,
    secret_inodes: BpfHashMap<MapData, InodeKey, u32>,
    watched_dirs: BpfHashMap<MapData, InodeKey, u32>,
    drops: PerCpuArray<MapData, u64>,
    settings: Array<MapData, u32>,
    file_filter: InoFilter,
    dir_filter: InoFilter,
    in_map: HashSet<InodeKey>,
    dirs_in_map: HashSet<InodeKey>,
    pub cgroup2_root: PathBuf,
    pub attached: Vec<String>,
}

impl Sensors {
    pub fn load(opts: &SensorOptions) -> Result<Self> {
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

        let mut loader = EbpfLoader::new();
        loader.override_global("CW_CONFIG", &kcfg, true);
        loader.map_max_entries("EVENTS", opts.ring_bytes);
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
        let exits: Vec<String> = syscalls::OPEN_FAMILY
            .iter()
            .map(|s| format!("sys_exit_{}", s.name()))
            .collect();
        let exits: Vec<&str> = exits.iter().map(String::as_str).collect();
        attach_tracepoint(
            &mut ebpf,
            "sys_exit_open_family",
            "syscalls",
            &exits,
            &mut attached,
        )?;
        attach_tracepoint(
            &mut ebpf,
            "sys_exit_connect",
            "syscalls",
            &["sys_exit_connect"],
            &mut attached,
        )?;
        let privs: Vec<String> = syscalls::CREDENTIAL_CHANGES
            .iter()
            .map(|s| format!("sys_exit_{}", s.name()))
            .collect();
        let privs: Vec<&str> = privs.iter().map(String::as_str).collect();
        attach_tracepoint(
            &mut ebpf,
            "sys_exit_priv",
            "syscalls",
            &privs,
            &mut attached,
        )?;

        let cgroup = File::open(&cgroup2_root)
            .with_context(|| format!("opening cgroup2 root {}", cgroup2_root.display()))?;
        for name in ["sendmsg4", "sendmsg6"] {
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

        let ring = RingBuf::try_from(ebpf.take_map("EVENTS").context("map EVENTS")?)?;
        let secret_inodes = BpfHashMap::try_from(
            ebpf.take_map("SECRET_INODES")
                .context("map SECRET_INODES")?,
        )?;
        let watched_dirs =
            BpfHashMap::try_from(ebpf.take_map("WATCHED_DIRS").context("map WATCHED_DIRS")?)?;
        let drops = PerCpuArray::try_from(ebpf.take_map("DROPS").context("map DROPS")?)?;
        let settings = Array::try_from(ebpf.take_map("SETTINGS").context("map SETTINGS")?)?;
        let file_filter = InoFilter::new(&mut ebpf, "FILE_INO_FILTER")?;
        let dir_filter = InoFilter::new(&mut ebpf, "DIR_INO_FILTER")?;
        info!(programs = attached.len(), cgroup2 = %cgroup2_root.display(), "probes attached");
        Ok(Sensors {
            _ebpf: ebpf,
            logger,
            ring: Some(ring),
            secret_inodes,
            watched_dirs,
            drops,
            settings,
            file_filter,
            dir_filter,
            in_map: HashSet::new(),
            dirs_in_map: HashSet::new(),
            cgroup2_root,
            attached,
        })
    }

    /// The ring buffer, handed to the reader once.
    pub fn take_ring(&mut self) -> Option<RingBuf<MapData>> {
        self.ring.take()
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

    /// Forwards probe diagnostics (aya-log) to the agent's log.
    pub fn flush_probe_logs(&mut self) {
        if let Some(l) = self.logger.as_mut() {
            l.flush();
        }
    }
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
