//! credwatch kernel probes.
//!
//! Capture, filter in the kernel, emit fixed records; nothing else. Every judgement (which
//! workload, which credential, is it suspicious) happens in the agent.
//!
//! Only the tracepoint family and cgroup hooks are used, so the probes load on kernels
//! without kprobes, fentry or BPF LSM. Kernel structs are read through offsets the agent
//! resolves from the running kernel's BTF and writes into `CW_CONFIG` before load.
#![no_std]
#![no_main]

use aya_ebpf::{
    EbpfContext,
    bindings::{BPF_RB_FORCE_WAKEUP, BPF_RB_NO_WAKEUP, bpf_sock_addr},
    helpers::{
        bpf_get_current_cgroup_id, bpf_get_current_comm, bpf_get_current_pid_tgid,
        bpf_ktime_get_boot_ns, bpf_probe_read_kernel, bpf_probe_read_kernel_str_bytes,
        bpf_probe_read_user, bpf_probe_read_user_buf, bpf_probe_read_user_str_bytes,
        generated::{
            bpf_get_current_task_btf, bpf_skb_cgroup_id, bpf_skb_load_bytes, bpf_task_pt_regs,
        },
    },
    macros::{cgroup_skb, cgroup_sock_addr, map, tracepoint},
    maps::{Array, HashMap, LruHashMap, PerCpuArray, RingBuf},
    programs::{SkBuffContext, SockAddrContext, TracePointContext},
};
use aya_log_ebpf::warn;
use credwatch_common::*;

/// BPF_RB_AVAIL_DATA: bytes waiting in the ring (`bpf_ringbuf_query`).
const RB_AVAIL_DATA: u64 = 0;
const AF_INET: u16 = 2;
const AF_INET6: u16 = 10;

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
static DROPS: PerCpuArray<u64> = PerCpuArray::with_max_entries(PROBE_COUNT, 0);

#[map]
static SECRET_INODES: HashMap<InodeKey, u32> = HashMap::with_max_entries(65536, 0);

#[map]
static WATCHED_DIRS: HashMap<InodeKey, u32> = HashMap::with_max_entries(16384, 0);

#[map]
static SETTINGS: Array<u32> = Array::with_max_entries(SETTINGS_LEN, 0);

/// Bitmaps over the inode numbers in SECRET_INODES and WATCHED_DIRS (see
/// `ino_filter_slot`); the agent keeps them a superset of the maps.
#[map]
static FILE_INO_FILTER: Array<u64> = Array::with_max_entries(INO_FILTER_WORDS, 0);

#[map]
static DIR_INO_FILTER: Array<u64> = Array::with_max_entries(INO_FILTER_WORDS, 0);

#[map]
static SEND_SEEN: LruHashMap<SendKey, u64> = LruHashMap::with_max_entries(16384, 0);

#[inline(always)]
fn count_drop(probe: Probe) {
    if let Some(slot) = DROPS.get_ptr_mut(probe as u32) {
        // Per-CPU slot: no other writer.
        unsafe { *slot += 1 };
    }
}

/// Wake the agent only when enough is waiting; otherwise it drains on its own timer.
/// A wake-up per event costs more than the probe itself.
#[inline(always)]
fn submit_flags() -> u64 {
    if EVENTS.query(RB_AVAIL_DATA) >= conf!(wake_bytes) as u64 {
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

#[inline(always)]
unsafe fn cap_effective(task: *const u8) -> u64 {
    unsafe {
        let cred: *const u8 = ld(task, conf!(task_cred));
        ld(cred, conf!(cred_cap_effective))
    }
}

// ---------------------------------------------------------------- process lifecycle

#[tracepoint]
pub fn sched_process_exec(ctx: TracePointContext) -> u32 {
    let Some(mut entry) = EVENTS.reserve::<Exec>(0) else {
        count_drop(Probe::Exec);
        return 0;
    };
    let rec = entry.as_mut_ptr();
    let task = current_task();
    unsafe {
        fill_header(&raw mut (*rec).hdr, RecordKind::Exec, task);
        (*rec).cap_effective = cap_effective(task);
        (*rec).flags = 0;
        (*rec)._pad = 0;
        (*rec).tty[0] = 0;
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
    }
    entry.submit(submit_flags());
    0
}

#[tracepoint]
pub fn sched_process_exit(_ctx: TracePointContext) -> u32 {
    let pid_tgid = bpf_get_current_pid_tgid();
    // Threads exiting are not process exits.
    if pid_tgid as u32 != (pid_tgid >> 32) as u32 {
        return 0;
    }
    let Some(mut entry) = EVENTS.reserve::<Exit>(0) else {
        count_drop(Probe::Exit);
        return 0;
    };
    let rec = entry.as_mut_ptr();
    let task = current_task();
    unsafe {
        fill_header(&raw mut (*rec).hdr, RecordKind::Exit, task);
        (*rec).exit_code = ld(task, conf!(task_exit_code));
        (*rec)._pad = 0;
    }
    entry.submit(submit_flags());
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

/// Shared by the exit tracepoints of every open syscall: resolve the returned fd to its
/// (dev, inode) and emit only if that inode, or its parent or grandparent directory, is
/// watched. There is no enter probe: on a match the name is read from the syscall
/// arguments the task saved at entry, so an unrelated open pays for one probe, not two.
#[tracepoint]
pub fn sys_exit_open_family(ctx: TracePointContext) -> u32 {
    let id = bpf_get_current_pid_tgid();
    if is_self(id) {
        return 0;
    }
    let ret: i64 = unsafe { ctx.read_at(16) }.unwrap_or(-1);
    if ret < 0 {
        return 0;
    }
    let nr: i32 = unsafe { ctx.read_at(8) }.unwrap_or(-1);
    let _ = unsafe { try_open_exit(nr, ret as u32) };
    0
}

#[inline(always)]
unsafe fn try_open_exit(nr: i32, fd: u32) -> Result<(), i32> {
    let task = current_task();
    let file = unsafe { fd_file(task, fd) }?;
    let inode: u64 = unsafe { rd(file, conf!(file_f_inode)) }?;
    let ino: u64 = unsafe { rd(inode, conf!(inode_i_ino)) }?;

    // The device is read only once an inode number passed a bitmap: an unrelated open
    // costs three reads and bitmap tests, no hash lookup.
    let mut dev = None;
    let mut matched = 0;
    let mut dir_ino = 0;
    if in_filter(&FILE_INO_FILTER, ino) {
        let d = unsafe { dev_once(&mut dev, inode) }?;
        if unsafe { SECRET_INODES.get(&InodeKey { dev: d, ino }) }.is_some() {
            matched = MatchKind::File as u32;
        }
    }
    if matched == 0 && SETTINGS.get(SETTING_WATCHED_DIRS).is_some_and(|n| *n > 0) {
        // A file that appeared in a watched directory since the agent's last rescan (a
        // rotated token lands in a new `..<timestamp>` dir, hence the grandparent too).
        let dentry: u64 = unsafe { rd(file, conf!(file_f_path_dentry)) }?;
        let mut d = dentry;
        for level in [MatchKind::ParentDir, MatchKind::GrandparentDir] {
            let parent: u64 = unsafe { rd(d, conf!(dentry_d_parent)) }?;
            if parent == d {
                break;
            }
            let pinode: u64 = unsafe { rd(parent, conf!(dentry_d_inode)) }?;
            let pino: u64 = unsafe { rd(pinode, conf!(inode_i_ino)) }?;
            if in_filter(&DIR_INO_FILTER, pino) {
                // Directories live on the file's filesystem (mount points aside, which
                // the agent never watches across).
                let dv = unsafe { dev_once(&mut dev, inode) }?;
                if unsafe { WATCHED_DIRS.get(&InodeKey { dev: dv, ino: pino }) }.is_some() {
                    matched = level as u32;
                    dir_ino = pino;
                    break;
                }
            }
            d = parent;
        }
    }
    if matched == 0 {
        return Ok(());
    }
    let dev = unsafe { dev_once(&mut dev, inode) }?;

    let Some(mut entry) = EVENTS.reserve::<SecretOpen>(0) else {
        count_drop(Probe::Open);
        return Ok(());
    };
    let rec = entry.as_mut_ptr();
    // (syscall, argument holding the path; open_by_handle_at has none)
    let (syscall, name_arg) = if nr == conf!(nr_openat) {
        (OpenSyscall::Openat, Some(conf!(regs_arg1)))
    } else if nr == conf!(nr_openat2) {
        (OpenSyscall::Openat2, Some(conf!(regs_arg1)))
    } else if nr == conf!(nr_open) {
        (OpenSyscall::Open, Some(conf!(regs_arg0)))
    } else if nr == conf!(nr_creat) {
        (OpenSyscall::Creat, Some(conf!(regs_arg0)))
    } else {
        (OpenSyscall::OpenByHandleAt, None)
    };
    unsafe {
        fill_header(&raw mut (*rec).hdr, RecordKind::SecretOpen, task);
        (*rec).dev = dev;
        (*rec).ino = ino;
        (*rec).dir_ino = dir_ino;
        (*rec).matched = matched;
        (*rec).syscall = syscall as u32;
        (*rec).fd = fd as i32;
        // The kernel's own view of the open flags, whichever syscall opened it.
        (*rec).open_flags = rd(file, conf!(file_f_flags)).unwrap_or(0);
        (*rec).flags = 0;
        (*rec)._pad = 0;
        (*rec).name[0] = 0;
        let regs = bpf_task_pt_regs(task as *mut _) as *const u8;
        if let Some(off) = name_arg {
            let name: u64 = ld(regs, off);
            match bpf_probe_read_user_str_bytes(name as *const u8, &mut (*rec).name) {
                Ok(s) if s.len() >= PATH_LEN - 1 => (*rec).flags |= FLAG_TRUNCATED,
                Ok(_) => {}
                Err(_) => (*rec).flags |= FLAG_NO_NAME,
            }
        }
    }
    entry.submit(submit_flags());
    Ok(())
}

// ---------------------------------------------------------------- connects

/// connect(2) exit: the arguments are still in the registers saved at syscall entry, so
/// there is no entry probe and no per-call stash map (an entry probe plus an LRU insert cost
/// more than the whole exit path).
#[tracepoint]
pub fn sys_exit_connect(ctx: TracePointContext) -> u32 {
    let id = bpf_get_current_pid_tgid();
    if is_self(id) {
        return 0;
    }
    let ret: i64 = unsafe { ctx.read_at(16) }.unwrap_or(0);
    let _ = unsafe { try_connect_exit(ret) };
    0
}

#[inline(always)]
unsafe fn try_connect_exit(ret: i64) -> Result<(), i32> {
    let task = current_task();
    let (fd, uaddr) = unsafe {
        let regs = bpf_task_pt_regs(task as *mut _) as *const u8;
        (
            ld::<u64>(regs, conf!(regs_arg0)) as i32,
            ld::<u64>(regs, conf!(regs_arg1)),
        )
    };
    if uaddr == 0 {
        return Ok(());
    }
    // sockaddr_in: family, port, IPv4 address in the first 8 bytes. Only internet sockets
    // are destinations (not AF_UNIX, netlink...).
    let head: [u8; 8] = unsafe { bpf_probe_read_user(uaddr as *const [u8; 8]) }?;
    let family = u16::from_ne_bytes([head[0], head[1]]);
    if family != AF_INET && family != AF_INET6 {
        return Ok(());
    }
    let Some(mut entry) = EVENTS.reserve::<Connect>(0) else {
        count_drop(Probe::Connect);
        return Ok(());
    };
    let rec = entry.as_mut_ptr();
    unsafe {
        fill_header(&raw mut (*rec).hdr, RecordKind::Connect, task);
        (*rec).family = family;
        (*rec).port = u16::from_be_bytes([head[2], head[3]]);
        (*rec)._pad = 0;
        (*rec).addr = [0; 16];
        (*rec).op = ConnectOp::Connect as u32;
        // A non-blocking connect returns -EINPROGRESS: started, outcome not yet known.
        (*rec).ret = ret as i32;
        if family == AF_INET6 {
            let _ = bpf_probe_read_user_buf((uaddr + 8) as *const u8, &mut (*rec).addr);
        } else {
            (&mut (*rec).addr)[..4].copy_from_slice(&head[4..8]);
        }
        (*rec).sock_type = socket_type(task, fd);
    }
    entry.submit(submit_flags());
    Ok(())
}

/// fd → struct file → struct socket → type (SOCK_STREAM/SOCK_DGRAM); 0 if unreadable.
#[inline(always)]
unsafe fn socket_type(task: *const u8, fd: i32) -> u16 {
    let read = || -> Result<u16, i32> {
        if fd < 0 {
            return Err(-1);
        }
        let file = unsafe { fd_file(task, fd as u32) }?;
        let sock: u64 = unsafe { rd(file, conf!(file_private_data)) }?;
        unsafe { rd::<u16>(sock, conf!(socket_type)) }
    };
    read().unwrap_or(0)
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
    let mut key = SendKey {
        tgid: (id >> 32) as u32,
        port: u16::from_be(sa.user_port as u16),
        family: if v6 { AF_INET6 } else { AF_INET },
        addr: [0; 16],
    };
    if v6 {
        let words = [
            sa.user_ip6[0],
            sa.user_ip6[1],
            sa.user_ip6[2],
            sa.user_ip6[3],
        ];
        for (i, w) in words.iter().enumerate() {
            key.addr[i * 4..i * 4 + 4].copy_from_slice(&w.to_ne_bytes());
        }
    } else {
        key.addr[..4].copy_from_slice(&sa.user_ip4.to_ne_bytes());
    }
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
        (*rec).op = ConnectOp::Sendmsg as u32;
    }
    entry.submit(submit_flags());
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
    entry.submit(submit_flags());
    0
}

// ---------------------------------------------------------------- DNS answers

/// UDP datagrams from port 53 arriving at any socket: the answer names the addresses the
/// process will connect to next. Always lets the packet through.
#[cgroup_skb]
pub fn dns_ingress(ctx: SkBuffContext) -> i32 {
    let _ = try_dns(&ctx);
    1
}

#[inline(always)]
fn try_dns(ctx: &SkBuffContext) -> Result<(), i64> {
    let first: u8 = ctx.load(0)?;
    let (family, l4) = match first >> 4 {
        4 => {
            let proto: u8 = ctx.load(9)?;
            if proto != 17 {
                return Ok(());
            }
            (AF_INET, ((first & 0x0f) as usize) * 4)
        }
        6 => {
            let next: u8 = ctx.load(6)?;
            if next != 17 {
                return Ok(());
            }
            (AF_INET6, 40)
        }
        _ => return Ok(()),
    };
    if l4 < 20 || l4 > 60 {
        return Ok(());
    }
    let sport: u16 = u16::from_be(ctx.load(l4)?);
    if sport != 53 {
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
        hdr.ts_ns = bpf_ktime_get_boot_ns();
        hdr.cgroup_id = bpf_skb_cgroup_id(ctx.skb.skb as *mut _);
        (*rec).family = family;
        (*rec)._pad = 0;
        (*rec).server = [0; 16];
        if family == AF_INET {
            if let Ok(a) = ctx.load::<[u8; 4]>(12) {
                (&mut (*rec).server)[..4].copy_from_slice(&a);
            }
        } else if let Ok(a) = ctx.load::<[u8; 16]>(8) {
            (*rec).server = a;
        }
        let payload = l4 + 8;
        let avail = (ctx.len() as usize).saturating_sub(payload);
        let mut n = 0usize;
        if avail > 0 {
            // (x - 1) & 0x1ff + 1 keeps the length provably in 1..=512 for the verifier.
            let len = ((avail.min(DNS_PAYLOAD_LEN) - 1) & (DNS_PAYLOAD_LEN - 1)) + 1;
            let ret = bpf_skb_load_bytes(
                ctx.skb.skb as *const _,
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
    entry.submit(submit_flags());
    Ok(())
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
