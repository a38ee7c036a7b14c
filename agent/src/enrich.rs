//! Probe record → enriched event: process table, workload resolver, secret inventory and
//! DNS names applied in that order. Live-only stage; replay starts after it.

use std::{
    collections::VecDeque,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    path::PathBuf,
    sync::Arc,
    time::{Duration, Instant},
};

use credwatch_common::{self as c, InodeKey, RepeatKey};
use tracing::debug;

use crate::{
    decode::{ExecRecord, Record},
    dns::{NameCache, parse_answer},
    event::{
        Body, Connect, CredentialRef, Destination, Event, ExecInfo, Label, MetadataFetch,
        PrivChange, ProcessAccess, ProcessInfo, SecretRead, SecretRef, TargetProcess, Timestamp,
        WorkloadId, WorkloadKind, cstr, sanitize,
    },
    inventory::{DirRescan, Inventory},
    kubelet::PodDirectory,
    process::ProcessTable,
    syscalls::Syscall,
    workload::WorkloadResolver,
};

/// Generates event ids unique per node: a per-run nonce and a sequence.
pub struct IdGen {
    /// `<random run nonce as 16 hex digits>-`
    prefix: String,
    seq: u64,
}

impl IdGen {
    pub fn new() -> Self {
        let mut b = [0u8; 8];
        // Fallback to time+pid if the RNG is unavailable: ids need uniqueness, not secrecy.
        if getrandom::fill(&mut b).is_err() {
            let t = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_nanos() as u64)
                .unwrap_or(0);
            b = (t ^ ((std::process::id() as u64) << 32)).to_ne_bytes();
        }
        Self::with_nonce(u64::from_ne_bytes(b))
    }

    fn with_nonce(nonce: u64) -> Self {
        IdGen {
            prefix: format!("{nonce:016x}-"),
            seq: 0,
        }
    }

    pub fn next_id(&mut self) -> String {
        self.seq += 1;
        // Not `format!`: ids were a visible share of the per-event cost.
        let mut id = String::with_capacity(self.prefix.len() + 20);
        id.push_str(&self.prefix);
        id.push_str(itoa::Buffer::new().format(self.seq));
        id
    }
}

impl Default for IdGen {
    fn default() -> Self {
        Self::new()
    }
}

/// CLOCK_BOOTTIME (what the probes stamp) → wall clock.
#[derive(Clone, Copy, Debug)]
pub struct BootClock {
    offset_ns: i64,
}

fn clock_ns(id: libc::clockid_t) -> i64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: valid pointer to a timespec.
    unsafe { libc::clock_gettime(id, &mut ts) };
    ts.tv_sec * 1_000_000_000 + ts.tv_nsec
}

impl BootClock {
    pub fn now() -> Self {
        BootClock {
            offset_ns: clock_ns(libc::CLOCK_REALTIME) - clock_ns(libc::CLOCK_BOOTTIME),
        }
    }

    pub fn to_wall(&self, boot_ns: u64) -> Timestamp {
        Timestamp::from_unix_nanos(boot_ns as i64 + self.offset_ns)
    }

    pub fn boot_now() -> u64 {
        clock_ns(libc::CLOCK_BOOTTIME) as u64
    }
}

#[derive(Debug, Default, Clone, Copy)]
pub struct EnrichStats {
    /// Opens matched by a watched directory whose file turned out not to be a secret.
    pub unmatched_dir_opens: u64,
    /// Write-only or O_PATH opens of secrets: they read nothing.
    pub secret_non_reads: u64,
    pub dns_unparsed: u64,
    /// Records whose kernel-written enum fields hold a value this build does not know.
    pub unknown_values: u64,
    /// Secret reads that waited for a rescan of their watched directory.
    pub reads_held: u64,
    /// Held records released before their rescan finished (timeout or hold queue full).
    pub held_released_early: u64,
}

/// What the enricher knows about the node right now, for stats and metrics.
#[derive(Debug, Default, Clone, Copy)]
pub struct EnrichCounts {
    pub stats: EnrichStats,
    pub inventory_secrets: usize,
    pub watched_dirs: usize,
    pub processes: usize,
    pub pods: usize,
    /// What inventory scans left out (caps, FIFOs, foreign symlinks).
    pub inventory: crate::inventory::ScanStats,
    /// cgroup ids that resolved to no cgroup.
    pub cgroups_unresolved: u64,
    /// Processes the table had no room for (fork floods), ever.
    pub processes_dropped: u64,
    /// Secrets and watched directories the kernel maps could not take (reads not seen).
    pub inventory_unwatched: usize,
    /// Records waiting for a directory rescan now.
    pub held: usize,
    /// Watched-directory rescans asked for (each on the scanner thread), ever.
    pub dir_rescans: u64,
}

/// Probe records in, events out: owns the process table, the workload resolver, the pod
/// directory, the DNS name cache and the secret inventory.
pub struct Enricher {
    node: Arc<str>,
    clock: BootClock,
    procs: ProcessTable,
    workloads: WorkloadResolver,
    pods: PodDirectory,
    names: NameCache,
    inventory: Inventory,
    /// Set when a directory rescan changed the inventory: the kernel maps need a sync.
    inventory_dirty: bool,
    /// Poked when a pod uid is not in the pod list yet (a pod newer than the last refresh).
    pod_miss: Option<Arc<tokio::sync::Notify>>,
    stats: EnrichStats,
    owners: OwnerNames,
    /// Records waiting for the scanner: a read of an unknown file in a watched directory
    /// waits for that directory's rescan, and the later records of its process wait behind
    /// it (so a read still comes before the connect that uses it). In arrival order.
    held: VecDeque<Held>,
    /// Processes with records in `held`, and how many.
    held_tgids: foldhash::HashMap<u32, usize>,
    /// Secrets and watched directories the kernel maps could not take at the last sync.
    kernel_left_out: usize,
    repeats: RepeatTracker,
    /// io_uring connects waiting for their completion (the result): by (tgid, request).
    pending_iou: foldhash::HashMap<(u32, u64), (Event, u64)>,
    /// A 32-bit image started since the last look (the ia32 probe may be needed).
    ia32_exec: bool,
    cgroup2_root: std::path::PathBuf,
}

struct Held {
    rec: Record,
    /// The directory rescan a secret read waits for (`None`: a record held for order).
    dir: Option<PathBuf>,
    since: Instant,
}

/// A held record waits at most this long for its directory's rescan…
const HOLD_MAX: Duration = Duration::from_secs(2);
/// …and at most this many records wait at once (beyond it the oldest go on unmatched).
const HOLD_MAX_RECORDS: usize = 4096;

/// What the last record of a (process, secret) said, so the opens the probe counts after
/// it can be reported as a read of the same secret.
struct RepeatState {
    /// Opens already reported (records and catch-ups) for this key.
    reported: u64,
    hdr: c::Header,
    secret: Arc<SecretRef>,
    credential: Arc<CredentialRef>,
    /// Boot ns of the last report.
    last_ns: u64,
}

#[derive(Default)]
struct RepeatTracker {
    keys: foldhash::HashMap<RepeatKey, RepeatState>,
}

/// Bound on tracked (process, secret) keys: the probe's table has as many entries.
const MAX_REPEAT_KEYS: usize = 65536;
/// How long an io_uring connect waits for its completion before it is reported without.
const IOU_PENDING_NS: u64 = 2_000_000_000;

impl Enricher {
    pub fn new(
        node: Arc<str>,
        inventory: Inventory,
        workloads: WorkloadResolver,
        procs: ProcessTable,
    ) -> Self {
        Enricher {
            node,
            clock: BootClock::now(),
            procs,
            workloads,
            pods: PodDirectory::default(),
            names: NameCache::new(1 << 16),
            inventory,
            inventory_dirty: false,
            pod_miss: None,
            stats: EnrichStats::default(),
            owners: OwnerNames::default(),
            held: VecDeque::new(),
            held_tgids: foldhash::HashMap::default(),
            kernel_left_out: 0,
            repeats: RepeatTracker::default(),
            pending_iou: Default::default(),
            ia32_exec: false,
            cgroup2_root: workloads_root(),
        }
    }

    /// Where cgroup ids of processes that predate the agent are looked up.
    pub fn with_cgroup2_root(mut self, root: std::path::PathBuf) -> Self {
        self.cgroup2_root = root;
        self
    }

    /// True once after a 32-bit image started.
    pub fn take_ia32_exec(&mut self) -> bool {
        std::mem::take(&mut self.ia32_exec)
    }

    /// The (process, secret) keys of `tgid` the probe may still hold counts for.
    pub fn repeat_keys_of(&self, tgid: u32) -> Vec<RepeatKey> {
        self.repeats
            .keys
            .keys()
            .filter(|k| k.tgid == tgid)
            .copied()
            .collect()
    }

    /// Up to `limit` keys last reported more than `quiet_ns` before `now_ns`: their
    /// processes went quiet, and opens counted since would otherwise wait for the exit.
    /// Each key is handed out once per quiet period, so a long quiet tail does not hide
    /// the keys behind it.
    pub fn quiet_repeat_keys(
        &mut self,
        now_ns: u64,
        quiet_ns: u64,
        limit: usize,
    ) -> Vec<RepeatKey> {
        let mut out = Vec::new();
        for (k, st) in self.repeats.keys.iter_mut() {
            if out.len() == limit {
                break;
            }
            if now_ns.saturating_sub(st.last_ns) > quiet_ns {
                st.last_ns = now_ns;
                out.push(*k);
            }
        }
        out
    }

    /// The opens already reported for `key`.
    pub fn reported_opens(&self, key: &RepeatKey) -> Option<u64> {
        self.repeats.keys.get(key).map(|s| s.reported)
    }

    pub fn forget_repeats(&mut self, keys: &[RepeatKey]) {
        for k in keys {
            self.repeats.keys.remove(k);
        }
    }

    /// io_uring connects whose completion did not come in time: reported without result.
    pub fn expire_pending(&mut self, now_ns: u64, out: &mut Vec<Event>) {
        let expired: Vec<(u32, u64)> = self
            .pending_iou
            .iter()
            .filter(|(_, (_, since))| now_ns.saturating_sub(*since) > IOU_PENDING_NS)
            .map(|(k, _)| *k)
            .collect();
        for k in expired {
            if let Some((ev, _)) = self.pending_iou.remove(&k) {
                out.push(ev);
            }
        }
    }

    /// Notified when an event names a pod uid the pod list does not have.
    pub fn on_pod_miss(&mut self, n: Arc<tokio::sync::Notify>) {
        self.pod_miss = Some(n);
    }

    pub fn set_pods(&mut self, pods: PodDirectory) {
        self.pods = pods;
    }

    pub fn inventory(&self) -> &Inventory {
        &self.inventory
    }

    /// Loads the processes that exist now (after the probes attached).
    pub fn bootstrap_processes(&mut self) -> usize {
        self.procs.bootstrap()
    }

    /// Full inventory rescan (queued to the scanner thread once it runs one); the kernel
    /// maps need a sync when it changed something.
    pub fn rescan(&mut self) {
        if self.inventory.rescan() {
            self.inventory_dirty = true;
        }
    }

    /// Applies finished scans; true once after the inventory changed (the caller syncs the
    /// kernel maps, then calls [`Self::release_held`]).
    pub fn take_inventory_change(&mut self) -> bool {
        if self.inventory.poll() {
            self.inventory_dirty = true;
        }
        std::mem::take(&mut self.inventory_dirty)
    }

    /// Records of watched-directory misses whose rescan finished (or waited too long), and
    /// the records of their processes that queued behind them, enriched in their order.
    pub fn release_held(&mut self, ids: &mut IdGen, out: &mut Vec<Event>) {
        self.release(ids, out, false);
    }

    /// Everything held, now (shutdown).
    pub fn release_all_held(&mut self, ids: &mut IdGen, out: &mut Vec<Event>) {
        self.release(ids, out, true);
    }

    fn release(&mut self, ids: &mut IdGen, out: &mut Vec<Event>, all: bool) {
        while let Some(front) = self.held.front() {
            // A read waits for a rescan of its directory that started after it was seen
            // (one already running may have missed the new file).
            let waiting = match &front.dir {
                Some(d) if !self.inventory.scanned_since(d, front.since) => {
                    let (d, since) = (d.clone(), front.since);
                    self.inventory.want_dir(&d, since);
                    true
                }
                _ => false,
            };
            let overdue = front.since.elapsed() >= HOLD_MAX;
            if waiting && !all && !overdue {
                break;
            }
            if waiting {
                self.stats.held_released_early += 1;
            }
            let Some(h) = self.held.pop_front() else {
                break;
            };
            let tgid = h.rec.header().tgid;
            if let Some(n) = self.held_tgids.get_mut(&tgid) {
                *n -= 1;
                if *n == 0 {
                    self.held_tgids.remove(&tgid);
                }
            }
            match &h.rec {
                // Its rescan is done: matched now or never (no second rescan).
                Record::SecretOpen(r) if h.dir.is_some() => {
                    let cx = self.ctx(&h.rec);
                    self.secret_open(r, &cx, ids, out, false);
                }
                rec => self.enrich_now(rec, ids, out),
            }
        }
    }

    /// Holds `rec` (a record of a process that has a held read, or the read itself).
    fn hold(&mut self, rec: Record, dir: Option<PathBuf>, since: Instant) {
        if self.held.len() >= HOLD_MAX_RECORDS {
            // Bounded: the oldest waits no longer (its read goes on unmatched if its rescan
            // has not finished).
            if let Some(front) = self.held.front_mut() {
                front.since = Instant::now() - HOLD_MAX;
            }
        }
        *self.held_tgids.entry(rec.header().tgid).or_default() += 1;
        self.held.push_back(Held { rec, dir, since });
    }

    /// Records held now (stats, tests).
    pub fn held(&self) -> usize {
        self.held.len()
    }

    /// After a sync of the kernel maps: how much of the inventory they could not take.
    /// Returns the previous count (callers warn when it changes).
    pub fn set_kernel_left_out(&mut self, n: usize) -> usize {
        std::mem::replace(&mut self.kernel_left_out, n)
    }

    /// Once a second: re-reads the wall clock offset (NTP steps) and forgets processes that
    /// exited a while ago.
    pub fn tick(&mut self) {
        self.clock = BootClock::now();
        self.forget_exited(BootClock::boot_now());
    }

    /// Drops processes that exited more than a grace period before `boot_ns`.
    pub fn forget_exited(&mut self, boot_ns: u64) {
        self.procs.evict_exited(boot_ns);
    }

    pub fn counts(&self) -> EnrichCounts {
        EnrichCounts {
            stats: self.stats,
            inventory_secrets: self.inventory.len(),
            watched_dirs: self.inventory.dir_keys().len(),
            processes: self.procs.len(),
            pods: self.pods.len(),
            inventory: self.inventory.stats(),
            cgroups_unresolved: self.workloads.cgroups.unresolved,
            processes_dropped: self.procs.dropped(),
            inventory_unwatched: self.kernel_left_out,
            held: self.held.len(),
            dir_rescans: self.inventory.dir_rescans,
        }
    }
}

fn workloads_root() -> std::path::PathBuf {
    std::path::PathBuf::from("/sys/fs/cgroup")
}

/// Inventory credentials with their owning pod named from the pod list. Naming it means a
/// deep copy of the credential, and pod tokens are read all the time, so the result is kept
/// per secret until the inventory entry or the pod list changes.
#[derive(Default)]
pub struct OwnerNames {
    named: foldhash::HashMap<InodeKey, NamedOwner>,
}

struct NamedOwner {
    /// The inventory's credential this was made from.
    from: Arc<CredentialRef>,
    pods_generation: u64,
    named: Arc<CredentialRef>,
}

impl OwnerNames {
    /// Bounded by the inventory in practice; a hard cap keeps a churn of short-lived
    /// secrets from growing it.
    const MAX: usize = 65536;

    fn name(
        &mut self,
        key: InodeKey,
        cred: &Arc<CredentialRef>,
        owner_pod_uid: Option<&str>,
        pods: &PodDirectory,
    ) -> Arc<CredentialRef> {
        let (Some(_), Some(uid)) = (&cred.owner, owner_pod_uid) else {
            return Arc::clone(cred);
        };
        if let Some(n) = self.named.get(&key)
            && Arc::ptr_eq(&n.from, cred)
            && n.pods_generation == pods.generation()
        {
            return Arc::clone(&n.named);
        }
        let Some(pod) = pods.by_uid(uid) else {
            return Arc::clone(cred);
        };
        let mut named = CredentialRef::clone(cred);
        if let Some(owner) = named.owner.as_mut() {
            owner.namespace = Some(pod.namespace.clone());
            owner.pod = Some(pod.name.clone());
            owner.id = WorkloadId::pod(&pod.namespace, &pod.name);
        }
        let named = Arc::new(named);
        if self.named.len() >= Self::MAX {
            self.named.clear();
        }
        self.named.insert(
            key,
            NamedOwner {
                from: Arc::clone(cred),
                pods_generation: pods.generation(),
                named: Arc::clone(&named),
            },
        );
        named
    }
}

fn kind_access(flags: i32) -> &'static str {
    match flags & libc::O_ACCMODE {
        libc::O_RDONLY => "read",
        libc::O_WRONLY => "write",
        _ => "read_write",
    }
}

/// A connect result (`0` or `-errno`) as a word; `i32::MIN` is the probe's "no result".
pub fn connect_result(ret: i32, via: c::ConnectVia) -> Label {
    if via == c::ConnectVia::Sendmsg {
        return "sent".into();
    }
    if ret == i32::MIN {
        return "unknown".into();
    }
    match -ret {
        0 if via == c::ConnectVia::FastOpen => "sent".into(),
        0 => "ok".into(),
        libc::EINPROGRESS => "in_progress".into(),
        libc::ECONNREFUSED => "refused".into(),
        libc::ETIMEDOUT => "timed_out".into(),
        libc::ENETUNREACH => "net_unreachable".into(),
        libc::EHOSTUNREACH => "host_unreachable".into(),
        libc::EACCES | libc::EPERM => "denied".into(),
        libc::EAGAIN => "again".into(),
        libc::EISCONN => "already_connected".into(),
        libc::EALREADY => "already_in_progress".into(),
        libc::ECANCELED => "canceled".into(),
        e => format!("errno_{e}").into(),
    }
}

fn ip_of(family: u16, addr: &[u8; 16]) -> Option<IpAddr> {
    match family as i32 {
        libc::AF_INET => Some(IpAddr::V4(Ipv4Addr::new(
            addr[0], addr[1], addr[2], addr[3],
        ))),
        libc::AF_INET6 => Some(IpAddr::V6(Ipv6Addr::from(*addr))),
        _ => None,
    }
}

fn proto_of(sock_type: u16) -> &'static str {
    match sock_type as i32 {
        libc::SOCK_STREAM => "tcp",
        libc::SOCK_DGRAM => "udp",
        _ => "unknown",
    }
}

/// The kernel's wait status as a shell shows it: the exit code, or 128 + the signal that
/// killed the process.
fn exit_code(status: i32) -> i32 {
    match status & 0x7f {
        0 => (status >> 8) & 0xff,
        sig => 128 + sig,
    }
}

fn abi_label(abi: u32) -> Option<Label> {
    match c::Abi::from_u32(abi) {
        Some(c::Abi::Native) | None => None,
        Some(a) => Some(a.name().into()),
    }
}

/// Kernel dev_t (MAJOR << 20 | MINOR) → the st_dev userspace sees (`stat -c %d`).
pub fn user_dev(kdev: u64) -> u64 {
    libc::makedev((kdev >> 20) as u32, (kdev & 0xfffff) as u32)
}

/// A record's common part, decoded once.
struct Ctx {
    h: c::Header,
    ts: Timestamp,
    comm: String,
}

impl Enricher {
    fn ctx(&self, rec: &Record) -> Ctx {
        let h = *rec.header();
        Ctx {
            h,
            ts: self.clock.to_wall(h.ts_ns),
            comm: sanitize(cstr(&h.comm)),
        }
    }

    pub fn enrich(&mut self, rec: &Record, ids: &mut IdGen, out: &mut Vec<Event>) {
        // Behind a read that waits for its directory's rescan, a process's records wait too.
        if !self.held_tgids.is_empty() && self.held_tgids.contains_key(&rec.header().tgid) {
            self.hold(rec.clone(), None, Instant::now());
            return;
        }
        self.enrich_now(rec, ids, out);
    }

    fn enrich_now(&mut self, rec: &Record, ids: &mut IdGen, out: &mut Vec<Event>) {
        let cx = self.ctx(rec);
        let h = cx.h;
        match rec {
            Record::Exec(r) => self.exec(r, &cx, ids, out),
            Record::Exit(r) => {
                let code = exit_code(r.exit_code);
                let ev = self.event(ids, &cx, Body::Exit { code });
                self.procs.mark_exited(h.tgid, h.ts_ns);
                out.push(ev);
            }
            Record::SecretOpen(r) => self.secret_open(r, &cx, ids, out, true),
            Record::Connect(r) => self.connect(r, &cx, ids, out),
            Record::UnixConnect(r) => {
                let len = (r.path_len as usize).min(r.path.len());
                let path = sanitize(cstr(&r.path[..len]));
                let proto = match r.sock_type as i32 {
                    libc::SOCK_STREAM => "unix",
                    libc::SOCK_DGRAM => "unix_dgram",
                    _ => "unix_seqpacket",
                };
                let body = Body::Connect(Connect {
                    dst: Destination::unix(path, proto),
                    result: "ok".into(),
                    via: c::ConnectVia::Syscall.name().into(),
                });
                out.push(self.event(ids, &cx, body));
            }
            Record::PrivChange(r) => {
                let entry = self.procs.lookup(h.tgid, h.ppid, &cx.comm);
                let before = (entry.uid, entry.euid, entry.cap_effective);
                entry.uid = h.uid;
                entry.euid = h.euid;
                entry.cap_effective = r.cap_effective;
                let via = Syscall::from_nr(r.syscall_nr as i32).map_or("set_id", Syscall::name);
                let change = PrivChange::new(via, before, h.uid, h.euid, r.cap_effective);
                out.push(self.event(ids, &cx, Body::PrivChange(Box::new(change))));
            }
            Record::Dns(r) => self.dns(r, &cx, ids, out),
            Record::ProcessAccess(r) => self.process_access(r, &cx, ids, out),
            Record::IoUringComplete(r) => {
                if let Some((mut ev, _)) = self.pending_iou.remove(&(h.tgid, r.req)) {
                    if let Body::Connect(c) = &mut ev.body {
                        c.result = connect_result(r.res, c::ConnectVia::Syscall);
                    }
                    out.push(ev);
                }
            }
            Record::MetadataRequest(r) => self.metadata_request(r, &cx, ids, out),
            Record::Repeats { key, opens, .. } => self.catch_up(key, *opens, &cx, ids, out),
        }
    }

    fn exec(&mut self, r: &ExecRecord, cx: &Ctx, ids: &mut IdGen, out: &mut Vec<Event>) {
        let h = &cx.h;
        let f = &r.fixed;
        let filename = sanitize(cstr(&f.filename));
        let exe = ProcessTable::exec_name(&filename);
        let entry = self.procs.lookup(h.tgid, h.ppid, &cx.comm);
        let before = (entry.uid, entry.euid, entry.cap_effective);
        entry.ppid = h.ppid;
        entry.comm = cx.comm.clone();
        entry.exe = exe;
        entry.uid = h.uid;
        entry.euid = h.euid;
        entry.cap_effective = f.cap_effective;
        let tty = sanitize(cstr(&f.tty));
        entry.tty = (!tty.is_empty()).then(|| crate::process::kernel_tty_name(&tty));
        let ia32 = f.flags & c::FLAG_IA32 != 0;
        self.ia32_exec |= ia32;
        let ev = self.event(
            ids,
            cx,
            Body::Exec(Box::new(ExecInfo {
                filename,
                cap_effective: f.cap_effective,
                truncated: f.flags & c::FLAG_TRUNCATED != 0,
                argv: r.argv.clone(),
                env_credentials: r.env_credentials.clone(),
                argv_credentials: r.argv_credentials.clone(),
                env_truncated: f.flags
                    & (c::FLAG_ENV_TRUNCATED | c::FLAG_ARGV_TRUNCATED | c::FLAG_ENV_UNREADABLE)
                    != 0,
                abi: ia32.then(|| c::Abi::Ia32.name().into()),
            })),
        );
        // A set-id binary (or file capabilities) changes credentials at exec.
        let (old_uid, old_euid, old_caps) = before;
        let known = old_uid != u32::MAX;
        let gained_caps = f.cap_effective & !old_caps != 0;
        let changed = known && (old_euid != h.euid || old_uid != h.uid || gained_caps);
        let priv_ev = changed.then(|| Event {
            id: ids.next_id(),
            body: Body::PrivChange(Box::new(PrivChange::new(
                "exec",
                before,
                h.uid,
                h.euid,
                f.cap_effective,
            ))),
            ..ev.clone()
        });
        out.push(ev);
        out.extend(priv_ev);
    }

    fn connect(&mut self, r: &c::Connect, cx: &Ctx, ids: &mut IdGen, out: &mut Vec<Event>) {
        let (Some(ip), Some(via)) = (ip_of(r.family, &r.addr), c::ConnectVia::from_u32(r.via))
        else {
            self.stats.unknown_values += 1;
            return;
        };
        let mut dst = Destination::inet(ip, r.port, proto_of(r.sock_type));
        dst.name = self.names.name(&ip, cx.ts.unix_nanos()).map(str::to_owned);
        dst.metadata = r.flags & c::FLAG_METADATA != 0;
        let result = connect_result(r.ret, via);
        let ev = self.event(
            ids,
            cx,
            Body::Connect(Connect {
                dst,
                result,
                via: via.name().into(),
            }),
        );
        if via == c::ConnectVia::IoUring && r.req != 0 {
            // The result comes with the request's completion.
            let mut ev = ev;
            if let Body::Connect(c) = &mut ev.body {
                c.result = "pending".into();
            }
            if self.pending_iou.len() < 4096 {
                self.pending_iou
                    .insert((cx.h.tgid, r.req), (ev, cx.h.ts_ns));
            } else {
                out.push(ev);
            }
            return;
        }
        out.push(ev);
    }

    fn dns(&mut self, r: &c::Dns, cx: &Ctx, ids: &mut IdGen, out: &mut Vec<Event>) {
        let len = (r.len as usize).min(r.payload.len());
        // TCP answers carry their 2-byte length first.
        let payload = if r.proto == 6 {
            r.payload.get(2..len).unwrap_or(&[])
        } else {
            &r.payload[..len]
        };
        let Some(mut answer) = parse_answer(payload) else {
            self.stats.dns_unparsed += 1;
            return;
        };
        answer.server = ip_of(r.family, &r.server);
        self.names.insert(&answer, cx.ts.unix_nanos());
        let mut ev = Event::new(
            ids.next_id(),
            cx.ts,
            self.node.clone(),
            Body::Dns(Box::new(answer)),
        );
        ev.workload = self.workloads.resolve(cx.h.cgroup_id, 0, "", &self.pods);
        // Answers arrive in softirq context: the receiving socket's cgroup names the
        // workload, but no process does.
        if ev.workload.kind == WorkloadKind::Host {
            Arc::make_mut(&mut ev.workload).id = WorkloadId::whole_host();
        }
        out.push(ev);
    }

    fn process_access(
        &mut self,
        r: &c::ProcessAccess,
        cx: &Ctx,
        ids: &mut IdGen,
        out: &mut Vec<Event>,
    ) {
        let Some(kind) = c::AccessKind::from_u32(r.kind) else {
            self.stats.unknown_values += 1;
            return;
        };
        let pid = r.target_pid;
        let t = self.procs.lookup(pid, 0, "");
        let (comm, exe, uid) = (t.comm.clone(), t.exe.clone(), t.uid);
        // Looked up now, not as of the target's exec: it may have moved since (a
        // container's init joins its cgroup after it started). Rare events, one read.
        let cgroup_id =
            crate::process::cgroup_id_of(&self.cgroup2_root, pid).unwrap_or(t.cgroup_id);
        self.procs.lookup(pid, 0, "").cgroup_id = cgroup_id;
        let workload = self.workloads.resolve(cgroup_id, uid, &exe, &self.pods);
        let body = Body::ProcessAccess(Box::new(ProcessAccess {
            access: kind.name().into(),
            target: TargetProcess {
                pid,
                comm,
                exe,
                workload,
                credentials: Vec::new(),
            },
        }));
        out.push(self.event(ids, cx, body));
    }

    fn metadata_request(
        &mut self,
        r: &c::MetadataRequest,
        cx: &Ctx,
        ids: &mut IdGen,
        out: &mut Vec<Event>,
    ) {
        let Some(ip) = ip_of(r.family, &r.addr) else {
            self.stats.unknown_values += 1;
            return;
        };
        let len = (r.len as usize).min(r.line.len());
        let mut dst = Destination::inet(ip, r.port, "tcp");
        dst.metadata = true;
        let (method, path) = crate::metadata::request_line(&r.line[..len])
            .unwrap_or_else(|| (String::new(), String::new()));
        let (mut provider, credentials, role) = crate::metadata::classify(&path);
        if provider == "unknown" && ip == IpAddr::V4(Ipv4Addr::new(100, 100, 100, 200)) {
            provider = "alibaba".into();
        }
        // The response (the credential itself) is never seen: what the process now holds
        // is named by provider and role.
        let credential = credentials.then(|| {
            let role_s = role.as_deref().unwrap_or("");
            let name = format!("cloud_metadata:{provider}|{role_s}");
            let mut labels = std::collections::BTreeMap::new();
            labels.insert("provider".to_owned(), provider.to_string());
            if let Some(r) = &role {
                labels.insert("role".to_owned(), r.clone());
            }
            Arc::new(CredentialRef {
                fingerprint: self.inventory.fingerprinter().fingerprint(name.as_bytes()),
                kind: crate::credential::CredentialType::CloudMetadata,
                labels,
                owner: None,
                identity: name,
            })
        });
        let body = Body::MetadataFetch(Box::new(MetadataFetch {
            dst,
            method,
            path,
            provider,
            credentials,
            role,
            credential,
        }));
        out.push(self.event(ids, cx, body));
    }

    /// An event of the process that produced the record.
    fn event(&mut self, ids: &mut IdGen, cx: &Ctx, body: Body) -> Event {
        let h = &cx.h;
        let e = self.procs.lookup(h.tgid, h.ppid, &cx.comm);
        e.cgroup_id = h.cgroup_id;
        // The record's view is fresher than the table's for ids and comm; the table knows
        // the executable and terminal.
        // Records from where the probe cannot see the task (sk_msg) carry neither comm nor
        // parent: the table's stand in.
        let process = ProcessInfo {
            pid: h.pid,
            tgid: h.tgid,
            ppid: if h.ppid == 0 { e.ppid } else { h.ppid },
            uid: h.uid,
            euid: h.euid,
            gid: h.gid,
            egid: h.egid,
            comm: if cx.comm.is_empty() {
                e.comm.clone()
            } else {
                cx.comm.clone()
            },
            exe: e.exe.clone(),
            tty: e.tty.clone(),
            session: None,
        };
        let workload = self
            .workloads
            .resolve(h.cgroup_id, h.uid, &process.exe, &self.pods);
        if workload.pod_uid.is_some()
            && workload.pod.is_none()
            && let Some(n) = &self.pod_miss
        {
            n.notify_one();
        }
        Event {
            id: ids.next_id(),
            ts: cx.ts,
            node: self.node.clone(),
            process,
            workload,
            body,
        }
    }

    /// `may_rescan`: an unknown file in a watched directory asks for that directory's
    /// rescan (and the read waits for it); false once that rescan is done.
    fn secret_open(
        &mut self,
        r: &c::SecretOpen,
        cx: &Ctx,
        ids: &mut IdGen,
        out: &mut Vec<Event>,
        may_rescan: bool,
    ) {
        let key = InodeKey {
            dev: r.dev,
            ino: r.ino,
        };
        let (Some(matched), Some(syscall)) = (
            c::MatchKind::from_u32(r.matched),
            c::OpenSyscall::from_u32(r.syscall),
        ) else {
            self.stats.unknown_values += 1;
            return;
        };
        if may_rescan
            && self.inventory.get(&key).is_none()
            && matched != c::MatchKind::File
            && !self.inventory.is_known_not_secret(&key)
        {
            // New file in a watched directory (rotation, new pod): that directory is rescanned
            // now instead of at the periodic rescan, off the loop; the read waits for it.
            let dir = self
                .inventory
                .watched_dir(&InodeKey {
                    dev: r.dev,
                    ino: r.dir_ino,
                })
                .map(|p| p.to_path_buf());
            if let Some(dir) = dir {
                let since = Instant::now();
                match self.inventory.rescan_dir(&dir) {
                    DirRescan::Done(changed) => self.inventory_dirty |= changed,
                    DirRescan::Queued => {
                        self.stats.reads_held += 1;
                        self.hold(Record::SecretOpen(*r), Some(dir), since);
                        return;
                    }
                }
            }
        }
        // Only the parts the event carries (the entry also holds scan bookkeeping).
        let Some(entry) = self.inventory.get(&key) else {
            debug!(
                ino = r.ino,
                "open in watched dir is not an inventoried secret"
            );
            self.stats.unmatched_dir_opens += 1;
            return;
        };
        let access = kind_access(r.open_flags);
        // Writes (the kubelet refreshing a token) and O_PATH handles read nothing.
        if access == "write" || r.open_flags & libc::O_PATH != 0 {
            self.stats.secret_non_reads += 1;
            return;
        }
        let path = entry.path.clone();
        let credential = self.owners.name(
            key,
            &entry.credential,
            entry.owner_pod_uid.as_deref(),
            &self.pods,
        );
        let opened_as_status = if r.flags & c::FLAG_NO_NAME != 0 {
            Some("unreadable".into())
        } else if r.flags & c::FLAG_TRUNCATED != 0 {
            Some("truncated".into())
        } else if r.flags & c::FLAG_BASENAME != 0 {
            Some("file_name".into())
        } else {
            None
        };
        // `opens` counts this process's opens of this secret so far (0: uncounted); what the
        // previous reports did not cover, minus this read itself, are its repeats.
        let rkey = RepeatKey {
            tgid: cx.h.tgid,
            _pad: 0,
            dev: r.dev,
            ino: r.ino,
        };
        let reported = self.repeats.keys.get(&rkey).map_or(0, |s| s.reported);
        let repeats = if r.opens == 0 {
            0
        } else {
            r.opens.saturating_sub(reported).saturating_sub(1)
        };
        let secret = Arc::new(SecretRef {
            path: Some(path),
            opened_as: sanitize(cstr(&r.name)),
            opened_as_status,
            dev: user_dev(r.dev),
            inode: r.ino,
            syscall: syscall.name().into(),
            access: access.into(),
            open_flags: r.open_flags,
            matched: matched.name().into(),
            fd: r.fd,
            repeats,
            abi: abi_label(r.abi),
        });
        if r.opens > 0 {
            self.track_repeats(rkey, r.opens, cx.h, &secret, &credential);
        }
        let mut ev = self.event(
            ids,
            cx,
            Body::SecretRead(SecretRead {
                secret,
                credential,
                maintenance: false,
            }),
        );
        ev.process.session = self.procs.session_of(cx.h.tgid);
        out.push(ev);
    }

    fn track_repeats(
        &mut self,
        key: RepeatKey,
        opens: u64,
        hdr: c::Header,
        secret: &Arc<SecretRef>,
        credential: &Arc<CredentialRef>,
    ) {
        if self.repeats.keys.len() >= MAX_REPEAT_KEYS && !self.repeats.keys.contains_key(&key) {
            return;
        }
        let st = self.repeats.keys.entry(key).or_insert_with(|| RepeatState {
            reported: 0,
            hdr,
            secret: Arc::clone(secret),
            credential: Arc::clone(credential),
            last_ns: hdr.ts_ns,
        });
        st.reported = st.reported.max(opens);
        st.hdr = hdr;
        st.secret = Arc::clone(secret);
        st.credential = Arc::clone(credential);
        st.last_ns = hdr.ts_ns;
    }

    /// Opens the probe counted after the last record of a key: one more `secret_read` of
    /// the same secret, its repeats making the total exact.
    fn catch_up(
        &mut self,
        key: &RepeatKey,
        opens: u64,
        cx: &Ctx,
        ids: &mut IdGen,
        out: &mut Vec<Event>,
    ) {
        let Some(st) = self.repeats.keys.get_mut(key) else {
            return;
        };
        if opens <= st.reported {
            return;
        }
        let repeats = opens - st.reported - 1;
        st.reported = opens;
        st.last_ns = cx.h.ts_ns;
        let mut secret = SecretRef::clone(&st.secret);
        secret.repeats = repeats;
        secret.fd = -1;
        let credential = Arc::clone(&st.credential);
        let h = c::Header {
            ts_ns: cx.h.ts_ns,
            ..st.hdr
        };
        let cx = Ctx {
            h,
            ts: cx.ts,
            comm: sanitize(cstr(&h.comm)),
        };
        let body = Body::SecretRead(SecretRead {
            secret: Arc::new(secret),
            credential,
            maintenance: false,
        });
        let mut ev = self.event(ids, &cx, body);
        ev.process.session = self.procs.session_of(h.tgid);
        out.push(ev);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_nonce_then_sequence() {
        let mut g = IdGen::with_nonce(0x0a1b_2c3d_4e5f_6071);
        g.seq = 41;
        assert_eq!(g.next_id(), "0a1b2c3d4e5f6071-42");
        let mut g = IdGen::new();
        let (a, b) = (g.next_id(), g.next_id());
        let (nonce, seq) = a.split_once('-').unwrap();
        assert_eq!((nonce.len(), seq), (16, "1"));
        assert!(nonce.bytes().all(|c| c.is_ascii_hexdigit()));
        assert_eq!(b, format!("{nonce}-2"));
    }

    #[test]
    fn owner_is_named_from_the_pod_list_and_kept_until_it_changes() {
        let list = |name: &str| {
            format!(
                r#"{{"kind":"PodList","apiVersion":"v1","metadata":{{}},"items":[{{"metadata":
                {{"name":"{name}","namespace":"payments","uid":"u-1"}},"spec":{{}}}}]}}"#
            )
        };
        let cred = Arc::new(CredentialRef {
            fingerprint: "hmac-sha256:00".into(),
            owner: Some(crate::event::Owner {
                id: WorkloadId::pod_uid("u-1"),
                pod_uid: Some("u-1".into()),
                ..Default::default()
            }),
            ..Default::default()
        });
        let key = InodeKey { dev: 1, ino: 2 };
        let mut names = OwnerNames::default();
        let pods = PodDirectory::from_pod_list(list("api-1").as_bytes()).unwrap();
        let a = names.name(key, &cred, Some("u-1"), &pods);
        assert_eq!(a.owner.as_ref().unwrap().id, "pod:payments/api-1");
        assert!(Arc::ptr_eq(&a, &names.name(key, &cred, Some("u-1"), &pods)));
        // A new pod list (the pod was replaced under the same uid) names it again.
        let pods = PodDirectory::from_pod_list(list("api-2").as_bytes()).unwrap();
        let b = names.name(key, &cred, Some("u-1"), &pods);
        assert_eq!(b.owner.as_ref().unwrap().id, "pod:payments/api-2");
        // So does a rescanned inventory entry.
        let rescanned = Arc::new(CredentialRef::clone(&cred));
        assert!(!Arc::ptr_eq(
            &b,
            &names.name(key, &rescanned, Some("u-1"), &pods)
        ));
        // Not in the pod list yet: the inventory's own owner (by uid) stands.
        assert!(Arc::ptr_eq(
            &cred,
            &names.name(key, &cred, Some("u-9"), &pods)
        ));
    }

    #[test]
    fn results_and_devices() {
        assert_eq!(connect_result(0, c::ConnectVia::Syscall), "ok");
        assert_eq!(
            connect_result(-libc::ECONNREFUSED, c::ConnectVia::Syscall),
            "refused"
        );
        assert_eq!(
            connect_result(-libc::EINPROGRESS, c::ConnectVia::Syscall),
            "in_progress"
        );
        assert_eq!(connect_result(0, c::ConnectVia::Sendmsg), "sent");
        assert_eq!(user_dev(InodeKey::kernel_dev(8, 1)), libc::makedev(8, 1));
        assert_eq!(
            user_dev(InodeKey::kernel_dev(0, 300)),
            libc::makedev(0, 300)
        );
    }

    fn header(kind: c::RecordKind, tgid: u32) -> c::Header {
        c::Header {
            kind: kind as u32,
            pid: tgid,
            tgid,
            ppid: 1,
            uid: 0,
            euid: 0,
            gid: 0,
            egid: 0,
            ts_ns: 1,
            cgroup_id: 1,
            comm: [b'x'; 16],
        }
    }

    /// A read of a file new in a watched directory waits for that directory's rescan on the
    /// scanner thread (the loop does not scan), and the reading process's later records wait
    /// behind it, so its connect still follows its read; other processes are not held up.
    #[test]
    fn a_watched_dir_miss_holds_its_process_until_the_rescan_lands() {
        let tmp = tempfile::tempdir().unwrap();
        let watched = tmp.path().join("w");
        std::fs::create_dir_all(&watched).unwrap();
        let glob = format!("{}/*.key", watched.display());
        let mut inv = Inventory::new(
            &[glob],
            false,
            &[watched.display().to_string()],
            "/nonexistent",
            4096,
            crate::credential::Fingerprinter::new(b"k"),
        )
        .unwrap();
        inv.rescan();
        inv.scan_in_background().unwrap();
        let dir_key = crate::inventory::inode_key(&std::fs::metadata(&watched).unwrap());
        let mut e = Enricher::new(
            "n".into(),
            inv,
            WorkloadResolver::new(tmp.path().join("no-cgroups"), "cluster.local"),
            ProcessTable::new(tmp.path().join("no-proc"), 64),
        );
        let secret = watched.join("new.key");
        std::fs::write(&secret, "fake-new-key").unwrap();
        let key = crate::inventory::inode_key(&std::fs::metadata(&secret).unwrap());
        let open = c::SecretOpen {
            hdr: header(c::RecordKind::SecretOpen, 100),
            dev: key.dev,
            ino: key.ino,
            dir_ino: dir_key.ino,
            matched: c::MatchKind::ParentDir as u32,
            syscall: c::OpenSyscall::Openat as u32,
            fd: 3,
            open_flags: 0,
            flags: 0,
            opens: 0,
            abi: 0,
            name: [0; c::PATH_LEN],
        };
        let connect = |tgid| c::Connect {
            hdr: header(c::RecordKind::Connect, tgid),
            family: libc::AF_INET as u16,
            sock_type: libc::SOCK_STREAM as u16,
            port: 443,
            _pad: 0,
            addr: [10, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
            ret: 0,
            via: c::ConnectVia::Syscall as u32,
            flags: 0,
            abi: 0,
            cookie: 0,
            req: 0,
        };
        let (mut ids, mut out) = (IdGen::new(), Vec::new());
        e.enrich(&Record::SecretOpen(open), &mut ids, &mut out);
        e.enrich(&Record::Connect(connect(100)), &mut ids, &mut out);
        e.enrich(&Record::Connect(connect(200)), &mut ids, &mut out);
        let kinds: Vec<(u32, crate::event::EventKind)> =
            out.iter().map(|ev| (ev.process.tgid, ev.kind())).collect();
        assert_eq!(kinds, [(200, crate::event::EventKind::Connect)]);
        assert_eq!(e.held(), 2);
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        out.clear();
        while e.held() > 0 && std::time::Instant::now() < deadline {
            e.take_inventory_change();
            e.release_held(&mut ids, &mut out);
            std::thread::sleep(Duration::from_millis(2));
        }
        let kinds: Vec<(u32, crate::event::EventKind)> =
            out.iter().map(|ev| (ev.process.tgid, ev.kind())).collect();
        assert_eq!(
            kinds,
            [
                (100, crate::event::EventKind::SecretRead),
                (100, crate::event::EventKind::Connect)
            ]
        );
        assert_eq!(e.counts().stats.held_released_early, 0);
    }
}
