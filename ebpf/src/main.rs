//! credwatch kernel probes.
//!
//! Capture, filter and de-duplicate in the kernel, emit fixed records; nothing else. Every
//! judgement (which workload, which credential, is it suspicious) happens in the agent.
//!
//! The tracepoint family and cgroup hooks cover everything, so the probes load on kernels
//! without kprobes, fentry or BPF LSM; where fexit loads, one program on
//! `security_file_open` replaces every open tracepoint (the agent picks, see `file_open`).
//! Kernel structs are read through offsets the agent resolves from the running kernel's BTF
//! and writes into `CW_CONFIG` before load.
//!
//! Two rings: secret opens and process-memory access go to SECRET_EVENTS, everything else
//! to EVENTS, so an exec or connect storm cannot push secret reads out.
#![no_std]
#![no_main]
#![allow(internal_features)]
#![feature(core_intrinsics)]

use aya_ebpf::{
    EbpfContext,
    bindings::{BPF_NOEXIST, BPF_RB_FORCE_WAKEUP, BPF_RB_NO_WAKEUP, bpf_sock_addr, bpf_sock_ops},
    helpers::{
        bpf_get_current_cgroup_id, bpf_get_current_comm, bpf_get_current_pid_tgid,
        bpf_get_current_uid_gid, bpf_ktime_get_boot_ns, bpf_probe_read_kernel,
        bpf_probe_read_kernel_str_bytes, bpf_probe_read_user_str_bytes,
        generated::{
            bpf_get_current_task_btf, bpf_get_socket_cookie, bpf_probe_read_kernel as read_raw,
            bpf_probe_read_kernel_str as read_kernel_str_raw, bpf_probe_read_user as read_user_raw,
            bpf_skb_cgroup_id, bpf_skb_load_bytes, bpf_task_pt_regs,
        },
    },
    macros::{
        cgroup_skb, cgroup_sock_addr, fexit, map, raw_tracepoint, sk_msg, sock_ops, tracepoint,
    },
    maps::{Array, HashMap, LruHashMap, PerCpuArray, RingBuf, SockHash},
    programs::{
        FExitContext, RawTracePointContext, SkBuffContext, SkMsgContext, SockAddrContext,
        SockOpsContext, TracePointContext,
    },
};
use aya_log_ebpf::warn;
use credwatch_common::*;

/// BPF_RB_AVAIL_DATA: bytes waiting in the ring (`bpf_ringbuf_query`).
const RB_AVAIL_DATA: u64 = 0;
const AF_UNIX: u16 = 1;
const AF_INET: u16 = 2;
const AF_INET6: u16 = 10;
/// `task_struct.flags`: an io_uring worker thread (io-wq) of the process it works for.
const PF_IO_WORKER: u32 = 0x10;
/// x86 `thread_info.status`: the task is in (or, right after exec, returns to) a 32-bit
/// syscall.
const TS_COMPAT: u32 = 0x0002;
const IORING_OP_CONNECT: u8 = 16;
const IORING_OP_OPENAT: u8 = 18;
const IORING_OP_OPENAT2: u8 = 28;
const PTRACE_ATTACH: u64 = 16;
const PTRACE_SEIZE: u64 = 0x4206;
const BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB: u32 = 4;
const SK_PASS: u32 = 1;
const NS_PER_MS: u64 = 1_000_000;
const NS_PER_S: u64 = 1_000_000_000;
/// How long a DNS query's socket may receive its answer.
const DNS_ANSWER_WINDOW_NS: u64 = 10 * NS_PER_S;

#[unsafe(no_mangle)]
static CW_CONFIG: KernelConfig = unsafe { core::mem::zeroed() };

/// Reads one field of CW_CONFIG. Volatile so the compiler cannot fold the zero initialiser:
/// the loader rewrites the value before the program is loaded.
macro_rules! conf {
    ($f:ident) => {{
        #[allow(unused_unsafe)]
        let v = unsafe { core::ptr::read_volatile(&raw const CW_CONFIG.$f) };
        v
    }};
}

#[map]
static EVENTS: RingBuf = RingBuf::with_byte_size(8 << 20, 0);

#[map]
static SECRET_EVENTS: RingBuf = RingBuf::with_byte_size(2 << 20, 0);

#[map]
static DROPS: PerCpuArray<u64> = PerCpuArray::with_max_entries(PROBE_COUNT, 0);

#[map]
static SUPPRESSED: PerCpuArray<u64> = PerCpuArray::with_max_entries(SUPPRESSED_COUNT, 0);

#[map]
static SECRET_INODES: HashMap<InodeKey, u32> = HashMap::with_max_entries(65536, 0);

#[map]
static WATCHED_DIRS: HashMap<InodeKey, u32> = HashMap::with_max_entries(16384, 0);

#[map]
static SETTINGS: Array<u32> = Array::with_max_entries(SETTINGS_LEN, 0);

/// `file_operations` of /proc/<pid>/environ and /proc/<pid>/mem (see FOPS_* in common).
#[map]
static FOPS: Array<u64> = Array::with_max_entries(FOPS_LEN, 0);

/// Bitmaps over the inode numbers in SECRET_INODES and WATCHED_DIRS (see
/// `ino_filter_slot`); the agent keeps them a superset of the maps.
#[map]
static FILE_INO_FILTER: Array<u64> = Array::with_max_entries(INO_FILTER_WORDS, 0);

#[map]
static DIR_INO_FILTER: Array<u64> = Array::with_max_entries(INO_FILTER_WORDS, 0);

#[map]
static SEND_SEEN: LruHashMap<SendKey, u64> = LruHashMap::with_max_entries(16384, 0);

/// Opens per (process, secret): one record per repeat interval carries the running count.
/// Not LRU: an evicted entry would lose counts. The agent deletes a process's entries when
/// it exits; when the table is full, opens are sent one by one (uncounted, never lost).
#[map]
static REPEATS: HashMap<RepeatKey, Repeats> = HashMap::with_max_entries(65536, 0);

#[map]
static BUDGETS: LruHashMap<u64, Budget> = LruHashMap::with_max_entries(16384, 0);

/// A connect(2) the cgroup hook saw, until its syscall exit adds the result.
#[repr(C)]
#[derive(Clone, Copy)]
struct PendingConnect {
    family: u16,
    sock_type: u16,
    port: u16,
    _pad: u16,
    addr: [u8; 16],
    flags: u32,
    _pad2: u32,
    cookie: u64,
}

#[map]
static CONNECTS: LruHashMap<u64, PendingConnect> = LruHashMap::with_max_entries(16384, 0);

/// An io_uring open as submitted: who submitted it (an io-wq worker may complete it) and
/// the name it opens.
#[repr(C)]
#[derive(Clone, Copy)]
struct IouOpen {
    hdr: Header,
    opcode: u32,
    file_slot: u32,
    name_flags: u32,
    _pad: u32,
    name: [u8; PATH_LEN],
}

#[map]
static IOU_OPENS: LruHashMap<u64, IouOpen> = LruHashMap::with_max_entries(4096, 0);

/// io_uring connects submitted and not yet completed (request → submitter tgid).
#[map]
static IOU_CONNECTS: LruHashMap<u64, u32> = LruHashMap::with_max_entries(4096, 0);

/// The io_uring connect a thread is submitting right now (its request runs inline in the
/// submitting thread when it can).
#[map]
static IOU_THREAD: LruHashMap<u64, u64> = LruHashMap::with_max_entries(4096, 0);

/// Sockets that sent a DNS query: (server address, answer deadline). An answer to any other
/// socket, or from another address, names nothing.
#[repr(C)]
#[derive(Clone, Copy)]
struct DnsQuery {
    server: [u8; 16],
    deadline_ns: u64,
}

#[map]
static DNS_SOCKS: LruHashMap<u64, DnsQuery> = LruHashMap::with_max_entries(16384, 0);

/// [window start ns, answers sent in it].
#[map]
static DNS_RATE: Array<u64> = Array::with_max_entries(2, 0);

/// TCP connections to a cloud metadata address; the sk_msg program sees what is written.
#[map]
static METADATA_SOCKS: SockHash<u64> = SockHash::with_max_entries(1024, 0);

/// Exec records are built here, then sent with exactly the bytes they carry.
#[repr(C)]
struct ExecScratch {
    rec: ExecFixed,
    data: [u8; ENV_MAX + ARGV_MAX],
}

#[map]
static EXEC_SCRATCH: PerCpuArray<ExecScratch> = PerCpuArray::with_max_entries(1, 0);

/// Adds one to a counter other CPUs update too. The old value is not returned: a fetching
/// add needs a newer BPF instruction set than the one the probes are built for (the bpf
/// target's core has no 64-bit atomic types; the intrinsic compiles to BPF_XADD).
#[inline(always)]
unsafe fn atomic_add(p: *mut u64) {
    unsafe {
        core::intrinsics::atomic_xadd::<u64, u64, { core::intrinsics::AtomicOrdering::Relaxed }>(
            p, 1,
        );
    }
}

#[inline(always)]
fn count_drop(probe: Probe) {
    if let Some(slot) = DROPS.get_ptr_mut(probe as u32) {
        // Per-CPU slot: no other writer.
        unsafe { *slot += 1 };
    }
}

#[inline(always)]
fn count_suppressed(why: Suppressed) {
    if let Some(slot) = SUPPRESSED.get_ptr_mut(why as u32) {
        unsafe { *slot += 1 };
    }
}

#[inline(always)]
fn setting(i: u32) -> u32 {
    SETTINGS.get(i).copied().unwrap_or(0)
}

/// Wake the agent only when enough is waiting; otherwise it drains on its own timer.
/// A wake-up per event costs more than the probe itself.
#[inline(always)]
fn submit_flags(ring: &RingBuf) -> u64 {
    if ring.query(RB_AVAIL_DATA) >= conf!(wake_bytes) as u64 {
        BPF_RB_FORCE_WAKEUP as u64
    } else {
        BPF_RB_NO_WAKEUP as u64
    }
}

#[inline(always)]
fn in_filter(filter: &Array<u64>, ino: u64) -> bool {
    let (word, bit) = ino_filter_slot(ino);
    filter.get(word).is_some_and(|w| *w & bit != 0)
}

#[inline(always)]
unsafe fn rd<T>(base: u64, off: u32) -> Result<T, i32> {
    if base == 0 {
        return Err(-1);
    }
    unsafe { bpf_probe_read_kernel((base + off as u64) as *const T) }
}

/// Load through a BTF-typed kernel pointer (from `bpf_get_current_task_btf` or a pointer
/// loaded through one). The verifier checks the access against the kernel's BTF and emits a
/// fault-tolerant load, so no helper call: several times cheaper than `bpf_probe_read_kernel`.
/// `off` must come from CW_CONFIG: that map is frozen read-only, so the verifier sees a
/// constant offset, which BTF-typed access requires.
#[inline(always)]
unsafe fn ld<T: Copy>(base: *const u8, off: u32) -> T {
    unsafe { core::ptr::read_volatile(base.wrapping_add(off as usize).cast::<T>()) }
}

#[inline(always)]
fn is_self(pid_tgid: u64) -> bool {
    (pid_tgid >> 32) as u32 == conf!(agent_tgid)
}

/// The current task as a BTF-typed pointer, for `ld`.
#[inline(always)]
fn current_task() -> *const u8 {
    unsafe { bpf_get_current_task_btf() as *const u8 }
}

/// Fills the process part of a record from the current task.
#[inline(always)]
unsafe fn fill_header(h: *mut Header, kind: RecordKind, task: *const u8) {
    let pid_tgid = bpf_get_current_pid_tgid();
    let hdr = unsafe { &mut *h };
    hdr.kind = kind as u32;
    hdr.pid = pid_tgid as u32;
    hdr.tgid = (pid_tgid >> 32) as u32;
    hdr.ts_ns = unsafe { bpf_ktime_get_boot_ns() };
    hdr.cgroup_id = unsafe { bpf_get_current_cgroup_id() };
    hdr.comm = bpf_get_current_comm().unwrap_or([0; COMM_LEN]);
    unsafe {
        let parent: *const u8 = ld(task, conf!(task_real_parent));
        hdr.ppid = ld(parent, conf!(task_tgid));
        let cred: *const u8 = ld(task, conf!(task_cred));
        hdr.uid = ld(cred, conf!(cred_uid));
        hdr.euid = ld(cred, conf!(cred_euid));
        hdr.gid = ld(cred, conf!(cred_gid));
        hdr.egid = ld(cred, conf!(cred_egid));
    }
}

/// The process part of a record where the task is out of reach (sk_msg programs may not
/// read `current` or its comm on every kernel): ids, cgroup and time; the agent fills
/// comm and parent from its process table.
#[inline(always)]
fn fill_header_light(h: &mut Header, kind: RecordKind) {
    let pid_tgid = bpf_get_current_pid_tgid();
    let uid_gid = bpf_get_current_uid_gid();
    *h = Header::default();
    h.kind = kind as u32;
    h.pid = pid_tgid as u32;
    h.tgid = (pid_tgid >> 32) as u32;
    h.ts_ns = unsafe { bpf_ktime_get_boot_ns() };
    h.cgroup_id = unsafe { bpf_get_current_cgroup_id() };
    h.uid = uid_gid as u32;
    h.euid = uid_gid as u32;
    h.gid = (uid_gid >> 32) as u32;
    h.egid = (uid_gid >> 32) as u32;
}

#[inline(always)]
unsafe fn cap_effective(task: *const u8) -> u64 {
    unsafe {
        let cred: *const u8 = ld(task, conf!(task_cred));
        ld(cred, conf!(cred_cap_effective))
    }
}

/// x86-64: the task runs a 32-bit syscall (or, at exec, a 32-bit image).
#[inline(always)]
unsafe fn in_compat(task: *const u8) -> bool {
    let off = conf!(thread_info_status);
    off != 0 && unsafe { ld::<u32>(task, off) } & TS_COMPAT != 0
}

/// The syscall number the task entered the kernel with (-1 when it is not in one).
#[inline(always)]
unsafe fn syscall_nr(task: *const u8) -> i64 {
    unsafe {
        let regs = bpf_task_pt_regs(task as *mut _) as *const u8;
        ld::<i64>(regs, conf!(regs_nr))
    }
}

// ---------------------------------------------------------------- process lifecycle

#[tracepoint]
pub fn sched_process_exec(ctx: TracePointContext) -> u32 {
    let _ = unsafe { try_exec(&ctx) };
    0
}

#[inline(always)]
unsafe fn try_exec(ctx: &TracePointContext) -> Result<(), i32> {
    let Some(scratch) = EXEC_SCRATCH.get_ptr_mut(0) else {
        return Ok(());
    };
    let task = current_task();
    unsafe {
        let rec = &raw mut (*scratch).rec;
        fill_header(&raw mut (*rec).hdr, RecordKind::Exec, task);
        (*rec).cap_effective = cap_effective(task);
        (*rec).flags = 0;
        (*rec)._pad = 0;
        (*rec).tty[0] = 0;
        if in_compat(task) {
            (*rec).flags |= FLAG_IA32;
        }
        let signal: *const u8 = ld(task, conf!(task_signal));
        let tty: *const u8 = ld(signal, conf!(signal_tty));
        if !tty.is_null() {
            let name = tty.wrapping_add(conf!(tty_name) as usize);
            let _ = bpf_probe_read_kernel_str_bytes(name, &mut (*rec).tty);
        }
        (*rec).filename[0] = 0;
        // __data_loc: low 16 bits are the string's offset from the start of the record.
        if let Ok(loc) = ctx.read_at::<u32>(8) {
            let src = ctx.as_ptr().cast::<u8>().add((loc & 0xffff) as usize);
            if let Ok(s) = bpf_probe_read_kernel_str_bytes(src, &mut (*rec).filename)
                && s.len() >= PATH_LEN - 1
            {
                (*rec).flags |= FLAG_TRUNCATED;
            }
        }
        // The new image's environment and command line, as the kernel laid them out on
        // its stack a moment ago (resident: no fault can stop the read).
        let mm: *const u8 = ld(task, conf!(task_mm));
        let (env_start, env_end): (u64, u64) =
            (ld(mm, conf!(mm_env_start)), ld(mm, conf!(mm_env_end)));
        let (arg_start, arg_end): (u64, u64) =
            (ld(mm, conf!(mm_arg_start)), ld(mm, conf!(mm_arg_end)));
        let env_total = env_end.saturating_sub(env_start);
        let argv_total = arg_end.saturating_sub(arg_start);
        (*rec).env_total = env_total.min(u32::MAX as u64) as u32;
        (*rec).argv_total = argv_total.min(u32::MAX as u64) as u32;
        if env_total > ENV_MAX as u64 {
            (*rec).flags |= FLAG_ENV_TRUNCATED;
        }
        if argv_total > ARGV_MAX as u64 {
            (*rec).flags |= FLAG_ARGV_TRUNCATED;
        }
        let data = (&raw mut (*scratch).data).cast::<u8>();
        // 64-bit lengths, read back through memory so the compiler keeps each bound check:
        // it knows they hold, older verifiers (6.1) cannot follow its 32-bit shortcuts, and
        // each length must provably fit its part of `data`.
        let mut env_len: u64 = core::ptr::read_volatile(&env_total);
        if env_len > ENV_MAX as u64 {
            env_len = ENV_MAX as u64;
        }
        if env_len > 0 && read_user_raw(data.cast(), env_len as u32, env_start as *const _) != 0 {
            env_len = 0;
            (*rec).flags |= FLAG_ENV_UNREADABLE;
        }
        let mut argv_len: u64 = core::ptr::read_volatile(&argv_total);
        if argv_len > ARGV_MAX as u64 {
            argv_len = ARGV_MAX as u64;
        }
        let mut env_off: u64 = core::ptr::read_volatile(&env_len);
        if env_off > ENV_MAX as u64 {
            env_off = ENV_MAX as u64;
        }
        let argv_dst = data.add(env_off as usize);
        if argv_len > 0
            && read_user_raw(argv_dst.cast(), argv_len as u32, arg_start as *const _) != 0
        {
            argv_len = 0;
            (*rec).flags |= FLAG_ENV_UNREADABLE;
        }
        let (env_len, argv_len) = (env_off as u32, argv_len as u32);
        (*rec).env_len = env_len;
        (*rec).argv_len = argv_len;
        let size = core::mem::size_of::<ExecFixed>() + env_len as usize + argv_len as usize;
        // Through memory, so the compiler keeps the bound below: it knows the lengths are
        // in range, older verifiers (6.1) lose track of them and reject the output size.
        let mut size = core::ptr::read_volatile(&size);
        if size > core::mem::size_of::<ExecScratch>() {
            size = core::mem::size_of::<ExecScratch>();
        }
        let bytes = core::slice::from_raw_parts(scratch.cast::<u8>(), size);
        if EVENTS.output::<[u8]>(bytes, submit_flags(&EVENTS)).is_err() {
            count_drop(Probe::Exec);
        }
    }
    Ok(())
}

#[tracepoint]
pub fn sched_process_exit(_ctx: TracePointContext) -> u32 {
    let task = current_task();
    // A process has exited when its last thread has: `signal->live` counts the threads
    // still running (the leader may go first).
    let live: i32 = unsafe {
        let signal: *const u8 = ld(task, conf!(task_signal));
        ld(signal, conf!(signal_live))
    };
    if live != 0 {
        return 0;
    }
    let Some(mut entry) = EVENTS.reserve::<Exit>(0) else {
        count_drop(Probe::Exit);
        return 0;
    };
    let rec = entry.as_mut_ptr();
    unsafe {
        fill_header(&raw mut (*rec).hdr, RecordKind::Exit, task);
        (*rec).exit_code = ld(task, conf!(task_exit_code));
        (*rec)._pad = 0;
    }
    entry.submit(submit_flags(&EVENTS));
    0
}

// ---------------------------------------------------------------- secret opens

/// fd → `struct file *` of the current task. The fd table is reached through BTF-typed
/// loads; the array slot itself needs a probe read (the verifier types `struct file **`
/// as a plain number).
#[inline(always)]
unsafe fn fd_file(task: *const u8, fd: u32) -> Result<u64, i32> {
    unsafe {
        let files: *const u8 = ld(task, conf!(task_files));
        let fdt: *const u8 = ld(files, conf!(files_fdt));
        let max_fds: u32 = ld(fdt, conf!(fdtable_max_fds));
        if fd >= max_fds {
            return Err(-1);
        }
        let fd_array: u64 = ld(fdt, conf!(fdtable_fd));
        rd(fd_array, fd * 8)
    }
}

/// Kernel-encoded dev_t of an inode's filesystem, read on first need (after a bitmap hit)
/// and kept in `dev` for the later lookups of the same open.
#[inline(always)]
unsafe fn dev_once(dev: &mut Option<u64>, inode: u64) -> Result<u64, i32> {
    if let Some(d) = *dev {
        return Ok(d);
    }
    let sb: u64 = unsafe { rd(inode, conf!(inode_i_sb)) }?;
    let d = unsafe { rd::<u32>(sb, conf!(sb_s_dev)) }? as u64;
    *dev = Some(d);
    Ok(d)
}

/// What an opened file turned out to be.
struct Match {
    dev: u64,
    ino: u64,
    dir_ino: u64,
    matched: MatchKind,
}

/// A watched secret (by its inode, or a watched directory one or two levels up), else None.
#[inline(always)]
unsafe fn match_secret(file: u64, inode: u64, ino: u64) -> Result<Option<Match>, i32> {
    // The device is read only once an inode number passed a bitmap: an unrelated open
    // costs the reads it already made and bitmap tests, no hash lookup.
    let mut dev = None;
    if in_filter(&FILE_INO_FILTER, ino) {
        let d = unsafe { dev_once(&mut dev, inode) }?;
        if unsafe { SECRET_INODES.get(&InodeKey { dev: d, ino }) }.is_some() {
            return Ok(Some(Match {
                dev: d,
                ino,
                dir_ino: 0,
                matched: MatchKind::File,
            }));
        }
    }
    if setting(SETTING_WATCHED_DIRS) == 0 {
        return Ok(None);
    }
    // A file that appeared in a watched directory since the agent's last rescan (a
    // rotated token lands in a new `..<timestamp>` dir, hence the grandparent too).
    let mut d: u64 = unsafe { rd(file, conf!(file_f_path_dentry)) }?;
    for level in [MatchKind::ParentDir, MatchKind::GrandparentDir] {
        let parent: u64 = unsafe { rd(d, conf!(dentry_d_parent)) }?;
        if parent == d {
            break;
        }
        let pinode: u64 = unsafe { rd(parent, conf!(dentry_d_inode)) }?;
        let pino: u64 = unsafe { rd(pinode, conf!(inode_i_ino)) }?;
        if in_filter(&DIR_INO_FILTER, pino) {
            // Directories live on the file's filesystem (mount points aside, which the
            // agent never watches across).
            let dv = unsafe { dev_once(&mut dev, inode) }?;
            if unsafe { WATCHED_DIRS.get(&InodeKey { dev: dv, ino: pino }) }.is_some() {
                return Ok(Some(Match {
                    dev: dv,
                    ino,
                    dir_ino: pino,
                    matched: level,
                }));
            }
        }
        d = parent;
    }
    Ok(None)
}

/// One more open of a secret by process `tgid`: `Some(opens so far)` when a record is due
/// (the first open, then at most one per repeat interval), `None` when this one is only
/// counted. `Some(0)`: the repeat table is full, this open is sent uncounted.
#[inline(always)]
fn repeat_due(tgid: u32, m: &Match, now: u64) -> Option<u64> {
    let key = RepeatKey {
        tgid,
        _pad: 0,
        dev: m.dev,
        ino: m.ino,
    };
    let interval = setting(SETTING_REPEAT_MS) as u64 * NS_PER_MS;
    if let Some(r) = REPEATS.get_ptr_mut(&key) {
        // Another thread may add at the same time: the record carries a snapshot, the
        // entry the exact total (which the agent reads when the process goes quiet).
        unsafe { atomic_add(&raw mut (*r).opens) };
        let opens = unsafe { core::ptr::read_volatile(&raw const (*r).opens) };
        let last = unsafe { (*r).last_sent_ns };
        if now.wrapping_sub(last) < interval {
            return None;
        }
        if !budget_allows() {
            // Stays counted in the entry; the next record (or the agent) reports it.
            return None;
        }
        unsafe { (*r).last_sent_ns = now };
        return Some(opens);
    }
    let sent = budget_allows();
    let v = Repeats {
        opens: 1,
        // Over budget: never sent, so the next open after the budget refills is due.
        last_sent_ns: if sent { now } else { 0 },
    };
    if REPEATS.insert(&key, &v, BPF_NOEXIST as u64).is_err() {
        // Another CPU inserted it first (count this open there), or the table is full.
        if let Some(r) = REPEATS.get_ptr_mut(&key) {
            unsafe { atomic_add(&raw mut (*r).opens) };
            return None;
        }
        count_suppressed(Suppressed::RepeatTableFull);
        return sent.then_some(0);
    }
    sent.then_some(1)
}

/// One more secret-open record for the current cgroup this second, if its budget allows;
/// otherwise counted (per cgroup for the agent, per reason for the stats).
#[inline(always)]
fn budget_allows() -> bool {
    let cg = unsafe { bpf_get_current_cgroup_id() };
    let now = unsafe { bpf_ktime_get_boot_ns() };
    let limit = setting(SETTING_CGROUP_BUDGET);
    match BUDGETS.get_ptr_mut(&cg) {
        Some(b) => unsafe {
            if now.wrapping_sub((*b).window_ns) >= NS_PER_S {
                (*b).window_ns = now;
                (*b).sent = 0;
            }
            if (*b).sent < limit {
                (*b).sent += 1;
                true
            } else {
                atomic_add(&raw mut (*b).suppressed);
                count_suppressed(Suppressed::CgroupBudget);
                false
            }
        },
        None => {
            let b = Budget {
                window_ns: now,
                sent: 1,
                _pad: 0,
                suppressed: 0,
            };
            let _ = BUDGETS.insert(&cg, &b, 0);
            limit > 0
        }
    }
}

/// Sends a SecretOpen for a match (the caller fills the header and name afterwards through
/// `fill`). Shared by the syscall and io_uring paths.
#[inline(always)]
unsafe fn emit_secret(
    m: &Match,
    opens: u64,
    syscall: OpenSyscall,
    fd: i32,
    file: u64,
    abi: Abi,
    fill: impl FnOnce(*mut SecretOpen),
) {
    let Some(mut entry) = SECRET_EVENTS.reserve::<SecretOpen>(0) else {
        count_drop(Probe::Open);
        return;
    };
    let rec = entry.as_mut_ptr();
    unsafe {
        (*rec).dev = m.dev;
        (*rec).ino = m.ino;
        (*rec).dir_ino = m.dir_ino;
        (*rec).opens = opens;
        (*rec).matched = m.matched as u32;
        (*rec).syscall = syscall as u32;
        (*rec).fd = fd;
        // The kernel's own view of the open flags, whichever call opened it.
        (*rec).open_flags = rd(file, conf!(file_f_flags)).unwrap_or(0);
        (*rec).flags = 0;
        (*rec).abi = abi as u32;
        (*rec).name[0] = 0;
        fill(rec);
    }
    entry.submit(submit_flags(&SECRET_EVENTS));
}

/// Shared by the exit tracepoints of every open syscall: resolve the returned fd to its
/// (dev, inode) and emit only if that inode, or its parent or grandparent directory, is
/// watched. There is no enter probe: on a match the name is read from the syscall
/// arguments the task saved at entry, so an unrelated open pays for one probe, not two.
#[tracepoint]
pub fn sys_exit_open_family(ctx: TracePointContext) -> u32 {
    let ret: i64 = unsafe { ctx.read_at(16) }.unwrap_or(-1);
    if ret < 0 {
        return 0;
    }
    let nr: i32 = unsafe { ctx.read_at(8) }.unwrap_or(-1);
    let _ = unsafe { try_open_exit(nr, ret as u32, Abi::Native) };
    0
}

/// ia32 syscalls do not fire the per-syscall tracepoints on x86-64; this raw tracepoint
/// on every syscall exit catches their opens. Attached only when the node runs 32-bit code
/// (see `[sensors] ia32`): it costs every syscall of every process.
#[raw_tracepoint(tracepoint = "sys_exit")]
pub fn sys_exit_compat(ctx: RawTracePointContext) -> i32 {
    let task = current_task();
    if !unsafe { in_compat(task) } {
        return 0;
    }
    let ret: i64 = ctx.arg(1);
    if ret < 0 {
        return 0;
    }
    let nr = unsafe { syscall_nr(task) } as i32;
    let native = if nr == conf!(nr32_openat) {
        conf!(nr_openat)
    } else if nr == conf!(nr32_open) {
        conf!(nr_open)
    } else if nr == conf!(nr32_openat2) {
        conf!(nr_openat2)
    } else if nr == conf!(nr32_creat) {
        conf!(nr_creat)
    } else if nr == conf!(nr32_open_by_handle_at) {
        conf!(nr_open_by_handle_at)
    } else {
        return 0;
    };
    let _ = unsafe { try_open_exit(native, ret as u32, Abi::Ia32) };
    0
}

#[inline(always)]
unsafe fn try_open_exit(nr: i32, fd: u32, abi: Abi) -> Result<(), i32> {
    let task = current_task();
    let file = unsafe { fd_file(task, fd) }?;
    let syscall = if nr == conf!(nr_openat) {
        OpenSyscall::Openat
    } else if nr == conf!(nr_openat2) {
        OpenSyscall::Openat2
    } else if nr == conf!(nr_open) {
        OpenSyscall::Open
    } else if nr == conf!(nr_creat) {
        OpenSyscall::Creat
    } else {
        OpenSyscall::OpenByHandleAt
    };
    unsafe { on_open(file, task, Opener::Syscall(syscall, abi), fd as i32) }
}

/// The file_open hook set: one program after the kernel's own open check, whichever way
/// the file was opened (any open syscall, native or ia32, io_uring inline or from io-wq or
/// SQPOLL, exec). No syscall tracepoint is needed for opens, so unrelated syscalls and
/// opens do not pay for one. The fd is not installed yet (-1 in the record).
#[fexit(function = "security_file_open")]
pub fn file_open(ctx: FExitContext) -> i32 {
    // fexit: the return value follows the arguments (read this way on every kernel with
    // fexit; `bpf_get_func_ret` needs 5.17).
    let ret: i64 = ctx.arg(1);
    if ret != 0 {
        return 0;
    }
    let file: u64 = ctx.arg(0);
    let _ = unsafe { on_open(file, current_task(), Opener::FileOpen, -1) };
    0
}

/// Which hook saw an open: an open syscall's exit knows the call and the ABI; the
/// file_open hook works them out from the task, only for a match.
#[derive(Clone, Copy)]
enum Opener {
    Syscall(OpenSyscall, Abi),
    FileOpen,
}

/// The call and ABI of an open the file_open hook saw: the task's current syscall (the
/// ia32 numbers for a compat task), io_uring for io-wq workers and io_uring_enter,
/// `Other` for opens outside the open calls (exec).
#[inline(always)]
unsafe fn classify_open(task: *const u8) -> (OpenSyscall, Abi) {
    let io_worker = unsafe { ld::<u32>(task, conf!(task_flags)) } & PF_IO_WORKER != 0;
    let nr = unsafe { syscall_nr(task) } as i32;
    if io_worker || nr == conf!(nr_io_uring_enter) {
        return (OpenSyscall::IoUringOpenat, Abi::Native);
    }
    let compat = unsafe { in_compat(task) };
    let (openat, openat2, open, creat, by_handle) = if compat {
        (
            conf!(nr32_openat),
            conf!(nr32_openat2),
            conf!(nr32_open),
            conf!(nr32_creat),
            conf!(nr32_open_by_handle_at),
        )
    } else {
        (
            conf!(nr_openat),
            conf!(nr_openat2),
            conf!(nr_open),
            conf!(nr_creat),
            conf!(nr_open_by_handle_at),
        )
    };
    let syscall = if nr == openat {
        OpenSyscall::Openat
    } else if nr == openat2 {
        OpenSyscall::Openat2
    } else if nr == open {
        OpenSyscall::Open
    } else if nr == creat {
        OpenSyscall::Creat
    } else if nr == by_handle {
        OpenSyscall::OpenByHandleAt
    } else {
        OpenSyscall::Other
    };
    (syscall, if compat { Abi::Ia32 } else { Abi::Native })
}

/// One opened file, from either hook set: the agent's own opens teach it `f_op` pointers,
/// /proc/<pid>/{environ,mem} are process access, watched secrets are due a record unless
/// they are a counted repeat.
#[inline(always)]
unsafe fn on_open(file: u64, task: *const u8, opener: Opener, fd: i32) -> Result<(), i32> {
    let id = bpf_get_current_pid_tgid();
    let inode: u64 = unsafe { rd(file, conf!(file_f_inode)) }?;
    if is_self(id) {
        return unsafe { learn_fops(id, file) };
    }
    if unsafe { process_file(file, inode, task) }? {
        return Ok(());
    }
    let ino: u64 = unsafe { rd(inode, conf!(inode_i_ino)) }?;
    let Some(m) = unsafe { match_secret(file, inode, ino) }? else {
        return Ok(());
    };
    let now = unsafe { bpf_ktime_get_boot_ns() };
    let Some(opens) = repeat_due((id >> 32) as u32, &m, now) else {
        return Ok(());
    };
    let (syscall, abi) = match opener {
        Opener::Syscall(s, a) => (s, a),
        Opener::FileOpen => unsafe { classify_open(task) },
    };
    // Which syscall argument holds the path: 0, 1, or none (open_by_handle_at, io_uring,
    // kernel-internal opens: the dentry's own name then).
    let compat = abi == Abi::Ia32;
    let name_arg = match syscall {
        OpenSyscall::Openat | OpenSyscall::Openat2 => 1,
        OpenSyscall::Open | OpenSyscall::Creat => 0,
        _ => -1,
    };
    unsafe {
        emit_secret(&m, opens, syscall, fd, file, abi, |rec| {
            fill_header(&raw mut (*rec).hdr, RecordKind::SecretOpen, task);
            if syscall == OpenSyscall::IoUringOpenat {
                // An io-wq worker's comm is `iou-wrk-<tid>`: name the process it works for.
                let leader: *const u8 = ld(task, conf!(task_group_leader));
                read_raw(
                    (&raw mut (*rec).hdr.comm).cast(),
                    COMM_LEN as u32,
                    leader.wrapping_add(conf!(task_comm) as usize).cast(),
                );
            }
            if name_arg < 0 && fd < 0 {
                let dentry: u64 = rd(file, conf!(file_f_path_dentry)).unwrap_or(0);
                let name: u64 = rd(dentry, conf!(dentry_d_name)).unwrap_or(0);
                let n = read_kernel_str_raw(
                    (&raw mut (*rec).name).cast(),
                    PATH_LEN as u32,
                    name as *const _,
                );
                (*rec).flags |= if n > 0 { FLAG_BASENAME } else { FLAG_NO_NAME };
            }
            if name_arg >= 0 {
                let regs = bpf_task_pt_regs(task as *mut _) as *const u8;
                // Each load with its own constant offset: BTF-typed access needs them so.
                let name: u64 = match (compat, name_arg) {
                    (false, 0) => ld(regs, conf!(regs_arg0)),
                    (false, _) => ld(regs, conf!(regs_arg1)),
                    (true, 0) => ld::<u64>(regs, conf!(regs_compat_arg0)) & 0xffff_ffff,
                    (true, _) => ld::<u64>(regs, conf!(regs_compat_arg1)) & 0xffff_ffff,
                };
                match bpf_probe_read_user_str_bytes(name as *const u8, &mut (*rec).name) {
                    Ok(s) if s.len() >= PATH_LEN - 1 => (*rec).flags |= FLAG_TRUNCATED,
                    Ok(_) => {}
                    Err(_) => (*rec).flags |= FLAG_NO_NAME,
                }
            }
        });
    }
    Ok(())
}

/// The agent opens /proc/self/environ and /proc/self/mem at start from one thread, one
/// after the other, telling which slot it is learning in SETTINGS: their `f_op` is what
/// every other process's open of such a file is recognized by (one pointer compare).
#[inline(always)]
unsafe fn learn_fops(id: u64, file: u64) -> Result<(), i32> {
    let learner = setting(SETTING_LEARN_TID);
    if learner == 0 || learner != id as u32 {
        return Ok(());
    }
    let slot = setting(SETTING_LEARN_SLOT);
    let fop: u64 = unsafe { rd(file, conf!(file_f_op)) }?;
    if let Some(p) = FOPS.get_ptr_mut(slot) {
        unsafe { *p = fop };
    }
    Ok(())
}

/// /proc/<pid>/environ or /proc/<pid>/mem of another process: a ProcessAccess record.
/// True when the file was one of them (nothing else to check).
#[inline(always)]
unsafe fn process_file(file: u64, inode: u64, task: *const u8) -> Result<bool, i32> {
    let (environ, mem) = (
        FOPS.get(FOPS_ENVIRON).copied().unwrap_or(0),
        FOPS.get(FOPS_MEM).copied().unwrap_or(0),
    );
    if environ == 0 {
        return Ok(false);
    }
    let fop: u64 = unsafe { rd(file, conf!(file_f_op)) }?;
    let kind = if fop == environ {
        AccessKind::Environ
    } else if fop == mem {
        AccessKind::Mem
    } else {
        return Ok(false);
    };
    // The proc inode embeds the VFS inode; its pid pointer names the target.
    let pinode = (inode as i64 + conf!(proc_inode_pid_from_inode) as i64) as u64;
    let pid: u64 = unsafe { rd(pinode, 0) }?;
    let target: i32 = unsafe { rd(pid, conf!(pid_numbers_nr)) }?;
    let me = (bpf_get_current_pid_tgid() >> 32) as i32;
    if target == me || target <= 0 {
        return Ok(true);
    }
    unsafe { emit_access(kind, target as u32, 0, task) };
    Ok(true)
}

#[inline(always)]
unsafe fn emit_access(kind: AccessKind, target: u32, ret: i64, task: *const u8) {
    if !budget_allows() {
        return;
    }
    let Some(mut entry) = SECRET_EVENTS.reserve::<ProcessAccess>(0) else {
        count_drop(Probe::ProcessAccess);
        return;
    };
    let rec = entry.as_mut_ptr();
    unsafe {
        fill_header(&raw mut (*rec).hdr, RecordKind::ProcessAccess, task);
        (*rec).kind = kind as u32;
        (*rec).target_pid = target;
        (*rec).ret = ret;
    }
    entry.submit(submit_flags(&SECRET_EVENTS));
}

/// ptrace(2) exit: a successful PTRACE_ATTACH or PTRACE_SEIZE of another process.
#[tracepoint]
pub fn sys_exit_ptrace(ctx: TracePointContext) -> u32 {
    let ret: i64 = unsafe { ctx.read_at(16) }.unwrap_or(-1);
    if ret < 0 || is_self(bpf_get_current_pid_tgid()) {
        return 0;
    }
    let task = current_task();
    let (req, pid) = unsafe {
        let regs = bpf_task_pt_regs(task as *mut _) as *const u8;
        (
            ld::<u64>(regs, conf!(regs_arg0)),
            ld::<u64>(regs, conf!(regs_arg1)),
        )
    };
    let kind = match req {
        PTRACE_ATTACH => AccessKind::PtraceAttach,
        PTRACE_SEIZE => AccessKind::PtraceSeize,
        _ => return 0,
    };
    unsafe { emit_access(kind, pid as u32, ret, task) };
    0
}

/// process_vm_readv(2) exit: bytes read from another process's memory.
#[tracepoint]
pub fn sys_exit_process_vm_readv(ctx: TracePointContext) -> u32 {
    let ret: i64 = unsafe { ctx.read_at(16) }.unwrap_or(-1);
    if ret <= 0 || is_self(bpf_get_current_pid_tgid()) {
        return 0;
    }
    let task = current_task();
    let pid = unsafe {
        let regs = bpf_task_pt_regs(task as *mut _) as *const u8;
        ld::<u64>(regs, conf!(regs_arg0))
    };
    unsafe { emit_access(AccessKind::VmReadv, pid as u32, ret, task) };
    0
}

// ---------------------------------------------------------------- io_uring

/// A submitted request: opens are remembered with their name (the kernel's copy, freed
/// before completion), connects by their request so the connect hook and the completion can
/// name them.
#[tracepoint]
pub fn io_uring_submit(ctx: TracePointContext) -> u32 {
    let _ = unsafe { try_iou_submit(&ctx) };
    0
}

#[inline(always)]
unsafe fn try_iou_submit(ctx: &TracePointContext) -> Result<(), i32> {
    let id = bpf_get_current_pid_tgid();
    if is_self(id) {
        return Ok(());
    }
    let req: u64 = unsafe { ctx.read_at(conf!(tp_iou_submit_req) as usize) }.map_err(|_| -1)?;
    let op: u8 = unsafe { ctx.read_at(conf!(tp_iou_submit_opcode) as usize) }.map_err(|_| -1)?;
    if op == IORING_OP_CONNECT {
        let _ = IOU_CONNECTS.insert(&req, &((id >> 32) as u32), 0);
        let _ = IOU_THREAD.insert(&id, &req, 0);
        return Ok(());
    }
    if op != IORING_OP_OPENAT && op != IORING_OP_OPENAT2 || setting(SETTING_FILE_OPEN_HOOK) != 0 {
        return Ok(());
    }
    let Some(scratch) = EXEC_SCRATCH.get_ptr_mut(0) else {
        return Ok(());
    };
    // Built in the per-CPU scratch (it is too big for the stack), then copied in.
    let v = scratch.cast::<IouOpen>();
    let task = current_task();
    unsafe {
        fill_header(&raw mut (*v).hdr, RecordKind::SecretOpen, task);
        (*v).opcode = op as u32;
        (*v).file_slot = rd(req, conf!(io_open_file_slot)).unwrap_or(0);
        (*v).name_flags = 0;
        (*v)._pad = 0;
        (*v).name[0] = 0;
        let filename: u64 = rd(req, conf!(io_open_filename)).unwrap_or(0);
        let name: u64 = rd(filename, conf!(filename_name)).unwrap_or(0);
        match bpf_probe_read_kernel_str_bytes(name as *const u8, &mut (*v).name) {
            Ok(s) if s.len() >= PATH_LEN - 1 => (*v).name_flags |= FLAG_TRUNCATED,
            Ok(_) => {}
            Err(_) => (*v).name_flags |= FLAG_NO_NAME,
        }
        if IOU_OPENS.insert(&req, &*v, 0).is_err() {
            count_suppressed(Suppressed::IoUringUntracked);
        }
    }
    Ok(())
}

#[tracepoint]
pub fn io_uring_complete(ctx: TracePointContext) -> u32 {
    let _ = unsafe { try_iou_complete(&ctx) };
    0
}

#[inline(always)]
unsafe fn try_iou_complete(ctx: &TracePointContext) -> Result<(), i32> {
    let req: u64 = unsafe { ctx.read_at(conf!(tp_iou_complete_req) as usize) }.map_err(|_| -1)?;
    let res: i32 = unsafe { ctx.read_at(conf!(tp_iou_complete_res) as usize) }.map_err(|_| -1)?;
    if let Some(tgid) = unsafe { IOU_CONNECTS.get(&req) }.copied() {
        let _ = IOU_CONNECTS.remove(&req);
        let Some(mut entry) = EVENTS.reserve::<IoUringComplete>(0) else {
            count_drop(Probe::IoUring);
            return Ok(());
        };
        let rec = entry.as_mut_ptr();
        unsafe {
            fill_header(
                &raw mut (*rec).hdr,
                RecordKind::IoUringComplete,
                current_task(),
            );
            (*rec).hdr.tgid = tgid;
            (*rec).req = req;
            (*rec).res = res;
            (*rec).opcode = IORING_OP_CONNECT as u32;
        }
        entry.submit(submit_flags(&EVENTS));
        return Ok(());
    }
    let Some(open) = (unsafe { IOU_OPENS.get(&req) }) else {
        return Ok(());
    };
    let hdr = open.hdr;
    let (opcode, slot, name_flags) = (open.opcode, open.file_slot, open.name_flags);
    if res < 0 {
        let _ = IOU_OPENS.remove(&req);
        return Ok(());
    }
    if slot != 0 {
        // Installed into the ring's fixed-file table: there is no fd to resolve.
        let _ = IOU_OPENS.remove(&req);
        count_suppressed(Suppressed::IoUringFixedSlot);
        return Ok(());
    }
    // io-wq workers and the SQPOLL thread share the submitter's file table.
    let task = current_task();
    let file = unsafe { fd_file(task, res as u32) }?;
    let inode: u64 = unsafe { rd(file, conf!(file_f_inode)) }?;
    let ino: u64 = unsafe { rd(inode, conf!(inode_i_ino)) }?;
    let m = unsafe { match_secret(file, inode, ino) }?;
    let Some(m) = m else {
        let _ = IOU_OPENS.remove(&req);
        return Ok(());
    };
    let now = unsafe { bpf_ktime_get_boot_ns() };
    let Some(opens) = repeat_due(hdr.tgid, &m, now) else {
        let _ = IOU_OPENS.remove(&req);
        return Ok(());
    };
    let syscall = if opcode == IORING_OP_OPENAT2 as u32 {
        OpenSyscall::IoUringOpenat2
    } else {
        OpenSyscall::IoUringOpenat
    };
    unsafe {
        emit_secret(&m, opens, syscall, res, file, Abi::Native, |rec| {
            (*rec).hdr = hdr;
            (*rec).hdr.ts_ns = now;
            (*rec).flags = name_flags;
            if let Some(o) = IOU_OPENS.get(&req) {
                (*rec).name = o.name;
            }
        });
    }
    let _ = IOU_OPENS.remove(&req);
    Ok(())
}

// ---------------------------------------------------------------- connects

/// Cloud metadata services: AWS, GCP, Azure, OpenStack and Oracle at 169.254.169.254, AWS
/// over IPv6 at fd00:ec2::254, Alibaba at 100.100.100.200.
#[inline(always)]
fn is_metadata(family: u16, addr: &[u8; 16]) -> bool {
    if family == AF_INET {
        return (addr[0], addr[1], addr[2], addr[3]) == (169, 254, 169, 254)
            || (addr[0], addr[1], addr[2], addr[3]) == (100, 100, 100, 200);
    }
    addr[0] == 0xfd
        && addr[1] == 0x00
        && addr[2] == 0x0e
        && addr[3] == 0xc2
        && addr[4..14].iter().all(|b| *b == 0)
        && addr[14] == 0x02
        && addr[15] == 0x54
}

#[inline(always)]
fn sock_addr_of(sa: &bpf_sock_addr, v6: bool) -> (u16, [u8; 16]) {
    let mut addr = [0u8; 16];
    if v6 {
        let words = [
            sa.user_ip6[0],
            sa.user_ip6[1],
            sa.user_ip6[2],
            sa.user_ip6[3],
        ];
        for (i, w) in words.iter().enumerate() {
            addr[i * 4..i * 4 + 4].copy_from_slice(&w.to_ne_bytes());
        }
        (AF_INET6, addr)
    } else {
        addr[..4].copy_from_slice(&sa.user_ip4.to_ne_bytes());
        (AF_INET, addr)
    }
}

/// Remembers a socket that sends a DNS query, so its answer is believed.
#[inline(always)]
fn note_dns_query(cookie: u64, addr: [u8; 16], port: u16) {
    if port != 53 || cookie == 0 {
        return;
    }
    let q = DnsQuery {
        server: addr,
        deadline_ns: unsafe { bpf_ktime_get_boot_ns() } + DNS_ANSWER_WINDOW_NS,
    };
    let _ = DNS_SOCKS.insert(&cookie, &q, 0);
}

/// The io_uring request this task is running, if it is running one: an io-wq worker's
/// current work item, or the connect this thread is submitting inline.
#[inline(always)]
unsafe fn iou_request(task: *const u8, pid_tgid: u64) -> u64 {
    let flags: u32 = unsafe { ld(task, conf!(task_flags)) };
    if flags & PF_IO_WORKER != 0 {
        if conf!(task_worker_private) == 0 || conf!(io_worker_cur_work) == 0 {
            return 0;
        }
        let worker: u64 = unsafe { ld(task, conf!(task_worker_private)) };
        let work: u64 = unsafe { rd(worker, conf!(io_worker_cur_work)) }.unwrap_or(0);
        return if work == 0 {
            0
        } else {
            work - conf!(io_kiocb_work) as u64
        };
    }
    unsafe { IOU_THREAD.get(&pid_tgid) }.copied().unwrap_or(0)
}

/// Every connect, whatever the path (syscall, io_uring, TCP Fast Open), passes this hook
/// with the kernel's own copy of the address: what is reported is where the socket goes,
/// not what the caller's memory says afterwards. A connect(2) is finished at its syscall
/// exit (with the result); the other paths are sent from here.
#[inline(always)]
fn on_connect(ctx: &SockAddrContext, v6: bool) -> i32 {
    let id = bpf_get_current_pid_tgid();
    if is_self(id) {
        return 1;
    }
    let sa: &bpf_sock_addr = unsafe { &*ctx.sock_addr };
    let (family, addr) = sock_addr_of(sa, v6);
    let port = u16::from_be(sa.user_port as u16);
    let sock_type = sa.type_ as u16;
    let cookie = unsafe { bpf_get_socket_cookie(ctx.sock_addr.cast()) };
    note_dns_query(cookie, addr, port);
    let flags = if is_metadata(family, &addr) {
        FLAG_METADATA
    } else {
        0
    };
    let task = current_task();
    let mut req = 0;
    let via = if unsafe { ld::<u32>(task, conf!(task_flags)) } & PF_IO_WORKER != 0 {
        req = unsafe { iou_request(task, id) };
        ConnectVia::IoUring
    } else {
        let nr = unsafe { syscall_nr(task) } as i32;
        if nr == conf!(nr_connect) && !unsafe { in_compat(task) } {
            let p = PendingConnect {
                family,
                sock_type,
                port,
                _pad: 0,
                addr,
                flags,
                _pad2: 0,
                cookie,
            };
            if CONNECTS.insert(&id, &p, 0).is_ok() {
                return 1;
            }
            ConnectVia::Syscall
        } else if nr == conf!(nr_io_uring_enter) {
            req = unsafe { iou_request(task, id) };
            ConnectVia::IoUring
        } else if nr == conf!(nr_sendto) || nr == conf!(nr_sendmsg) {
            ConnectVia::FastOpen
        } else {
            ConnectVia::Other
        }
    };
    let Some(mut entry) = EVENTS.reserve::<Connect>(0) else {
        count_drop(Probe::Connect);
        return 1;
    };
    let rec = entry.as_mut_ptr();
    unsafe {
        fill_header(&raw mut (*rec).hdr, RecordKind::Connect, task);
        (*rec).family = family;
        (*rec).sock_type = sock_type;
        (*rec).port = port;
        (*rec)._pad = 0;
        (*rec).addr = addr;
        // No syscall exit follows with the result (or its stash was full): unknown.
        (*rec).ret = if via == ConnectVia::Syscall {
            i32::MIN
        } else {
            0
        };
        (*rec).via = via as u32;
        (*rec).flags = flags;
        (*rec).abi = if in_compat(task) {
            Abi::Ia32 as u32
        } else {
            Abi::Native as u32
        };
        (*rec).cookie = cookie;
        (*rec).req = req;
    }
    entry.submit(submit_flags(&EVENTS));
    1
}

#[cgroup_sock_addr(connect4)]
pub fn connect4(ctx: SockAddrContext) -> i32 {
    on_connect(&ctx, false)
}

#[cgroup_sock_addr(connect6)]
pub fn connect6(ctx: SockAddrContext) -> i32 {
    on_connect(&ctx, true)
}

/// connect(2) exit: the result for the attempt the hook remembered; for a Unix-domain
/// stream socket (which no cgroup hook sees on every kernel), the peer it reached.
#[tracepoint]
pub fn sys_exit_connect(ctx: TracePointContext) -> u32 {
    let id = bpf_get_current_pid_tgid();
    if is_self(id) {
        return 0;
    }
    let ret: i64 = unsafe { ctx.read_at(16) }.unwrap_or(0);
    if let Some(p) = unsafe { CONNECTS.get(&id) }.copied() {
        let _ = CONNECTS.remove(&id);
        let Some(mut entry) = EVENTS.reserve::<Connect>(0) else {
            count_drop(Probe::Connect);
            return 0;
        };
        let rec = entry.as_mut_ptr();
        let task = current_task();
        unsafe {
            fill_header(&raw mut (*rec).hdr, RecordKind::Connect, task);
            (*rec).family = p.family;
            (*rec).sock_type = p.sock_type;
            (*rec).port = p.port;
            (*rec)._pad = 0;
            (*rec).addr = p.addr;
            // A non-blocking connect returns -EINPROGRESS: started, outcome not yet known.
            (*rec).ret = ret as i32;
            (*rec).via = ConnectVia::Syscall as u32;
            (*rec).flags = p.flags;
            (*rec).abi = Abi::Native as u32;
            (*rec).cookie = p.cookie;
            (*rec).req = 0;
        }
        entry.submit(submit_flags(&EVENTS));
        return 0;
    }
    if ret == 0 {
        let _ = unsafe { try_unix_connect(id) };
    }
    0
}

#[inline(always)]
unsafe fn try_unix_connect(id: u64) -> Result<(), i32> {
    let task = current_task();
    let fd = unsafe {
        let regs = bpf_task_pt_regs(task as *mut _) as *const u8;
        ld::<u64>(regs, conf!(regs_arg0)) as i32
    };
    if fd < 0 {
        return Ok(());
    }
    let file = unsafe { fd_file(task, fd as u32) }?;
    let sock: u64 = unsafe { rd(file, conf!(file_private_data)) }?;
    let sk: u64 = unsafe { rd(sock, conf!(socket_sk)) }?;
    let family: u16 = unsafe { rd(sk, conf!(sock_family)) }?;
    if family != AF_UNIX {
        return Ok(());
    }
    let sock_type: u16 = unsafe { rd(sock, conf!(socket_type)) }?;
    // The socket actually reached: the peer's bound address, as the kernel keeps it.
    let peer: u64 = unsafe { rd(sk, conf!(unix_sock_peer)) }?;
    let ua: u64 = unsafe { rd(peer, conf!(unix_sock_addr)) }?;
    let len: i32 = unsafe { rd(ua, conf!(unix_address_len)) }?;
    // sockaddr_un: 2 bytes of family, then the path; an abstract name starts with NUL.
    let first: u8 = unsafe { rd(ua, conf!(unix_address_name) + 2) }?;
    if len <= 2 || first == 0 {
        return Ok(());
    }
    // One record per (process, peer) per de-dup interval: a client reconnecting per
    // request to the same socket is one destination.
    let mut key = SendKey {
        tgid: (id >> 32) as u32,
        port: 0,
        family: AF_UNIX,
        addr: [0; 16],
    };
    key.addr[..8].copy_from_slice(&peer.to_ne_bytes());
    let now = unsafe { bpf_ktime_get_boot_ns() };
    if let Some(last) = unsafe { SEND_SEEN.get(&key) }
        && now.wrapping_sub(*last) < conf!(sendmsg_dedup_ns)
    {
        return Ok(());
    }
    let _ = SEND_SEEN.insert(&key, &now, 0);
    let Some(mut entry) = EVENTS.reserve::<UnixConnect>(0) else {
        count_drop(Probe::Connect);
        return Ok(());
    };
    let rec = entry.as_mut_ptr();
    unsafe {
        fill_header(&raw mut (*rec).hdr, RecordKind::UnixConnect, task);
        (*rec).ret = 0;
        (*rec).sock_type = sock_type;
        (*rec)._pad = 0;
        let n = ((len - 2) as u32).min(UNIX_PATH_LEN as u32) & 0x7f;
        (*rec).path_len = n as u16;
        (*rec).path = [0; UNIX_PATH_LEN];
        if n > 0
            && read_raw(
                (&raw mut (*rec).path).cast(),
                n,
                (ua + conf!(unix_address_name) as u64 + 2) as *const _,
            ) != 0
        {
            (*rec).path_len = 0;
        }
    }
    entry.submit(submit_flags(&EVENTS));
    Ok(())
}

/// Unconnected UDP (sendto/sendmsg with an address) never calls connect(2); the cgroup hook
/// sees the destination. De-duplicated per (process, destination) in the kernel so a busy
/// UDP client does not flood the ring.
#[inline(always)]
fn on_sendmsg(ctx: &SockAddrContext, v6: bool) -> i32 {
    let id = bpf_get_current_pid_tgid();
    if is_self(id) {
        return 1;
    }
    let sa: &bpf_sock_addr = unsafe { &*ctx.sock_addr };
    let (family, addr) = sock_addr_of(sa, v6);
    let key = SendKey {
        tgid: (id >> 32) as u32,
        port: u16::from_be(sa.user_port as u16),
        family,
        addr,
    };
    let cookie = unsafe { bpf_get_socket_cookie(ctx.sock_addr.cast()) };
    note_dns_query(cookie, addr, key.port);
    let now = unsafe { bpf_ktime_get_boot_ns() };
    if let Some(last) = unsafe { SEND_SEEN.get(&key) }
        && now.wrapping_sub(*last) < conf!(sendmsg_dedup_ns)
    {
        return 1;
    }
    let _ = SEND_SEEN.insert(&key, &now, 0);
    let Some(mut entry) = EVENTS.reserve::<Connect>(0) else {
        count_drop(Probe::Sendmsg);
        return 1;
    };
    let rec = entry.as_mut_ptr();
    let task = current_task();
    unsafe {
        fill_header(&raw mut (*rec).hdr, RecordKind::Connect, task);
        (*rec).family = key.family;
        (*rec).sock_type = sa.type_ as u16;
        (*rec).port = key.port;
        (*rec)._pad = 0;
        (*rec).addr = key.addr;
        (*rec).ret = 0;
        (*rec).via = ConnectVia::Sendmsg as u32;
        (*rec).flags = if is_metadata(family, &addr) {
            FLAG_METADATA
        } else {
            0
        };
        (*rec).abi = if in_compat(task) {
            Abi::Ia32 as u32
        } else {
            Abi::Native as u32
        };
        (*rec).cookie = cookie;
        (*rec).req = 0;
    }
    entry.submit(submit_flags(&EVENTS));
    1
}

#[cgroup_sock_addr(sendmsg4)]
pub fn sendmsg4(ctx: SockAddrContext) -> i32 {
    on_sendmsg(&ctx, false)
}

#[cgroup_sock_addr(sendmsg6)]
pub fn sendmsg6(ctx: SockAddrContext) -> i32 {
    on_sendmsg(&ctx, true)
}

// ---------------------------------------------------------------- cloud metadata requests

/// TCP connections to a metadata address join METADATA_SOCKS once established, so the
/// sk_msg program below runs for what is written to them and for nothing else.
#[sock_ops]
pub fn metadata_sockops(ctx: SockOpsContext) -> u32 {
    let ops: *mut bpf_sock_ops = ctx.ops;
    let o = unsafe { &*ops };
    if o.op != BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB {
        return 1;
    }
    let mut addr = [0u8; 16];
    let family = if o.family == AF_INET as u32 {
        addr[..4].copy_from_slice(&o.remote_ip4.to_ne_bytes());
        AF_INET
    } else {
        for (i, w) in o.remote_ip6.iter().enumerate() {
            addr[i * 4..i * 4 + 4].copy_from_slice(&w.to_ne_bytes());
        }
        AF_INET6
    };
    if !is_metadata(family, &addr) {
        return 1;
    }
    let mut cookie = unsafe { bpf_get_socket_cookie(ops.cast()) };
    let _ = METADATA_SOCKS.update(&mut cookie, unsafe { &mut *ops }, 0);
    1
}

/// The first bytes of each write to a metadata connection: the HTTP request line names
/// what is fetched (`GET /latest/meta-data/iam/security-credentials/<role>`).
#[sk_msg]
pub fn metadata_request(ctx: SkMsgContext) -> u32 {
    let _ = unsafe { try_metadata_request(&ctx) };
    SK_PASS
}

#[inline(always)]
unsafe fn try_metadata_request(ctx: &SkMsgContext) -> Result<(), i32> {
    if !budget_allows() {
        return Ok(());
    }
    let (data, end) = (ctx.data(), ctx.data_end());
    let avail = end.saturating_sub(data);
    if avail == 0 {
        return Ok(());
    }
    let Some(mut entry) = EVENTS.reserve::<MetadataRequest>(0) else {
        count_drop(Probe::Metadata);
        return Ok(());
    };
    let rec = entry.as_mut_ptr();
    let md = unsafe { &*ctx.msg };
    unsafe {
        fill_header_light(&mut (*rec).hdr, RecordKind::MetadataRequest);
        (*rec).cookie = 0;
        // The kernel hands the network-order port over in the upper half (little-endian).
        (*rec).port = u16::from_be((md.remote_port >> 16) as u16);
        (*rec).addr = [0; 16];
        if md.family == AF_INET as u32 {
            (*rec).family = AF_INET;
            (&mut (*rec).addr)[..4].copy_from_slice(&md.remote_ip4.to_ne_bytes());
        } else {
            (*rec).family = AF_INET6;
            let words = [
                md.remote_ip6[0],
                md.remote_ip6[1],
                md.remote_ip6[2],
                md.remote_ip6[3],
            ];
            for (i, w) in words.iter().enumerate() {
                (&mut (*rec).addr)[i * 4..i * 4 + 4].copy_from_slice(&w.to_ne_bytes());
            }
        }
        // (x - 1) & mask + 1 keeps the length provably in 1..=REQUEST_LINE_LEN-ish.
        let mut n = avail.min(REQUEST_LINE_LEN) as u32;
        n = ((n - 1) & 0xff) + 1;
        if n > REQUEST_LINE_LEN as u32 {
            n = REQUEST_LINE_LEN as u32;
        }
        (*rec).len = 0;
        if read_raw((&raw mut (*rec).line).cast(), n, data as *const _) == 0 {
            (*rec).len = n;
        }
    }
    entry.submit(submit_flags(&EVENTS));
    Ok(())
}

// ---------------------------------------------------------------- privilege changes

/// Attached to the exit tracepoint of every set*id / capset syscall. Emits the credentials
/// in force after a successful call.
#[tracepoint]
pub fn sys_exit_priv(ctx: TracePointContext) -> u32 {
    let ret: i64 = unsafe { ctx.read_at(16) }.unwrap_or(-1);
    if ret != 0 {
        return 0;
    }
    let id = bpf_get_current_pid_tgid();
    if is_self(id) {
        return 0;
    }
    let Some(mut entry) = EVENTS.reserve::<PrivChange>(0) else {
        count_drop(Probe::Priv);
        return 0;
    };
    let rec = entry.as_mut_ptr();
    let task = current_task();
    unsafe {
        fill_header(&raw mut (*rec).hdr, RecordKind::PrivChange, task);
        (*rec).syscall_nr = ctx.read_at::<i32>(8).unwrap_or(-1) as u32;
        (*rec).ret = 0;
        (*rec).cap_effective = cap_effective(task);
    }
    entry.submit(submit_flags(&EVENTS));
    0
}

// ---------------------------------------------------------------- DNS answers

/// DNS answers (UDP or TCP from port 53) to sockets that asked that server: the answer
/// names the addresses the process will connect to next. Runs for every packet a socket
/// receives, so the test for "not DNS" reads the packet directly (no helper calls). Always
/// lets the packet through.
#[cgroup_skb]
pub fn dns_ingress(ctx: SkBuffContext) -> i32 {
    let _ = try_dns(&ctx);
    1
}

#[inline(always)]
fn try_dns(ctx: &SkBuffContext) -> Result<(), i64> {
    let skb = ctx.skb.skb;
    let (data, end) = unsafe { ((*skb).data as usize, (*skb).data_end as usize) };
    // IPv4 header (20) + the ports of the L4 header (4), or IPv6 (40) + 4.
    if data + 24 > end {
        return Ok(());
    }
    let first = unsafe { *(data as *const u8) };
    let (family, proto, l4) = match first >> 4 {
        4 => {
            let proto = unsafe { *((data + 9) as *const u8) };
            (AF_INET, proto, ((first & 0x0f) as usize) * 4)
        }
        6 => {
            if data + 44 > end {
                return Ok(());
            }
            (AF_INET6, unsafe { *((data + 6) as *const u8) }, 40)
        }
        _ => return Ok(()),
    };
    if (proto != 17 && proto != 6) || !(20..=60).contains(&l4) {
        return Ok(());
    }
    // The source port: loaded through the helper here (variable IPv4 header length).
    let sport: u16 = u16::from_be(ctx.load(l4)?);
    if sport != 53 {
        return Ok(());
    }
    let mut server = [0u8; 16];
    if family == AF_INET {
        let a: [u8; 4] = ctx.load(12)?;
        server[..4].copy_from_slice(&a);
    } else {
        server = ctx.load(8)?;
    }
    let cookie = unsafe { bpf_get_socket_cookie(skb.cast()) };
    let now = unsafe { bpf_ktime_get_boot_ns() };
    let Some(q) = (unsafe { DNS_SOCKS.get(&cookie) }) else {
        count_suppressed(Suppressed::DnsUnsolicited);
        return Ok(());
    };
    if q.server != server || now > q.deadline_ns {
        count_suppressed(Suppressed::DnsUnsolicited);
        return Ok(());
    }
    let payload = if proto == 17 {
        l4 + 8
    } else {
        let off: u8 = ctx.load(l4 + 12)?;
        l4 + ((off >> 4) as usize) * 4
    };
    // QR bit: responses only (TCP: after the 2-byte length).
    let flags_at = if proto == 17 {
        payload + 2
    } else {
        payload + 4
    };
    let f: u8 = ctx.load(flags_at)?;
    if f & 0x80 == 0 {
        return Ok(());
    }
    if !dns_rate_allows(now) {
        count_suppressed(Suppressed::DnsRate);
        return Ok(());
    }
    let Some(mut entry) = EVENTS.reserve::<Dns>(0) else {
        count_drop(Probe::Dns);
        return Ok(());
    };
    let rec = entry.as_mut_ptr();
    unsafe {
        let hdr = &mut (*rec).hdr;
        *hdr = Header::default();
        hdr.kind = RecordKind::Dns as u32;
        hdr.ts_ns = now;
        hdr.cgroup_id = bpf_skb_cgroup_id(skb as *mut _);
        (*rec).family = family;
        (*rec).proto = proto as u16;
        (*rec).server = server;
        let avail = (ctx.len() as usize).saturating_sub(payload);
        let mut n = 0usize;
        if avail > 0 {
            // (x - 1) & 0x1ff + 1 keeps the length provably in 1..=512 for the verifier.
            let len = ((avail.min(DNS_PAYLOAD_LEN) - 1) & (DNS_PAYLOAD_LEN - 1)) + 1;
            let ret = bpf_skb_load_bytes(
                skb as *const _,
                payload as u32,
                (&raw mut (*rec).payload).cast(),
                len as u32,
            );
            if ret == 0 {
                n = len;
            } else {
                warn!(ctx, "dns: could not copy {} payload bytes", len);
            }
        }
        (*rec).len = n as u32;
    }
    entry.submit(submit_flags(&EVENTS));
    Ok(())
}

/// A node-wide bound on DNS answer records per second (a resolver flood stays a count).
#[inline(always)]
fn dns_rate_allows(now: u64) -> bool {
    let (Some(w), Some(c)) = (DNS_RATE.get_ptr_mut(0), DNS_RATE.get_ptr_mut(1)) else {
        return false;
    };
    unsafe {
        if now.wrapping_sub(*w) >= NS_PER_S {
            *w = now;
            *c = 0;
        }
        atomic_add(c);
        core::ptr::read_volatile(c) <= setting(SETTING_DNS_RATE) as u64
    }
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
