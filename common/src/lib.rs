//! Fixed-layout records and map types shared by the eBPF probes and the agent.
//!
//! Every record starts with a [`Header`]; its `kind` says which struct follows. The layouts
//! are `#[repr(C)]` with explicit padding so both sides agree without a serialisation step.
//! Exec records are the one variable-length kind: [`ExecFixed`] followed by the bytes it
//! announces.
#![no_std]

pub const COMM_LEN: usize = 16;
/// Longest user-supplied path or exec filename carried in a record (longer ones are cut and
/// flagged with [`FLAG_TRUNCATED`]).
pub const PATH_LEN: usize = 256;
/// DNS payload bytes captured from one answer.
pub const DNS_PAYLOAD_LEN: usize = 512;
pub const TTY_LEN: usize = 16;
/// Environment bytes an exec record carries at most (the rest is counted, not carried).
pub const ENV_MAX: usize = 16384;
/// Command-line bytes an exec record carries at most.
pub const ARGV_MAX: usize = 4096;
/// `sun_path` of a Unix-domain socket address.
pub const UNIX_PATH_LEN: usize = 108;
/// Bytes of the first request written to a cloud metadata connection.
pub const REQUEST_LINE_LEN: usize = 192;

/// Declares a `#[repr(u32)]` enum shared by probes and agent, with the checked conversion
/// the agent applies to the raw `u32` a record carries (the kernel side writes
/// `Enum::Variant as u32`; a value the agent does not know is a decode error, not UB).
macro_rules! wire_enum {
    ($(#[$m:meta])* pub enum $name:ident { $($(#[$vm:meta])* $v:ident = $n:literal => $s:literal,)+ }) => {
        $(#[$m])*
        #[repr(u32)]
        #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
        pub enum $name { $($(#[$vm])* $v = $n,)+ }

        impl $name {
            pub const ALL: &'static [$name] = &[$($name::$v,)+];

            pub const fn from_u32(v: u32) -> Option<Self> {
                match v {
                    $($n => Some($name::$v),)+
                    _ => None,
                }
            }

            /// The name used in events, logs and metric labels.
            pub const fn name(self) -> &'static str {
                match self {
                    $($name::$v => $s,)+
                }
            }
        }
    };
}

wire_enum! {
    /// What follows the [`Header`] of a record (`Header::kind`).
    pub enum RecordKind {
        Exec = 1 => "exec",
        Exit = 2 => "exit",
        SecretOpen = 3 => "secret_open",
        Connect = 4 => "connect",
        PrivChange = 5 => "priv_change",
        Dns = 6 => "dns",
        UnixConnect = 7 => "unix_connect",
        ProcessAccess = 8 => "process_access",
        IoUringComplete = 9 => "io_uring_complete",
        MetadataRequest = 10 => "metadata_request",
    }
}

wire_enum! {
    /// One slot per probe family in the per-CPU DROPS map (records the ring could not
    /// take) and in the per-CPU SUPPRESSED map (records a bound chose not to send).
    pub enum Probe {
        Exec = 0 => "exec",
        Exit = 1 => "exit",
        Open = 2 => "open",
        Connect = 3 => "connect",
        Sendmsg = 4 => "sendmsg",
        Priv = 5 => "priv",
        Dns = 6 => "dns",
        ProcessAccess = 7 => "process_access",
        IoUring = 8 => "io_uring",
        Metadata = 9 => "metadata",
    }
}

/// Entries in the DROPS map.
pub const PROBE_COUNT: u32 = Probe::ALL.len() as u32;

wire_enum! {
    /// Why a probe chose not to send a record (index into the REASONS map): bounds that keep
    /// one workload from crowding out the others. Every suppressed record is counted.
    pub enum Suppressed {
        /// A secret open over its cgroup's budget of records per second.
        CgroupBudget = 0 => "cgroup_budget",
        /// A repeat read whose count could not be carried (the repeat table was full).
        RepeatTableFull = 1 => "repeat_table_full",
        /// A DNS answer over the per-second bound.
        DnsRate = 2 => "dns_rate",
        /// A DNS answer to a socket that sent no query to that server (spoofed or late).
        DnsUnsolicited = 3 => "dns_unsolicited",
        /// An io_uring open or connect whose submission was not seen (table full).
        IoUringUntracked = 4 => "io_uring_untracked",
        /// An io_uring open into a fixed-file slot: no fd to match by inode.
        IoUringFixedSlot = 5 => "io_uring_fixed_slot",
    }
}

pub const SUPPRESSED_COUNT: u32 = Suppressed::ALL.len() as u32;

wire_enum! {
    /// Which open produced a SecretOpen record.
    pub enum OpenSyscall {
        Open = 1 => "open",
        Openat = 2 => "openat",
        Openat2 = 3 => "openat2",
        Creat = 4 => "creat",
        OpenByHandleAt = 5 => "open_by_handle_at",
        IoUringOpenat = 6 => "io_uring_openat",
        IoUringOpenat2 = 7 => "io_uring_openat2",
        /// Seen by the file_open hook outside the open calls (exec, kernel-internal opens).
        Other = 8 => "other",
    }
}

wire_enum! {
    /// How a SecretOpen matched: the file's own inode, or a watched directory one or two
    /// levels up (a file that appeared since the last rescan).
    pub enum MatchKind {
        File = 1 => "file",
        ParentDir = 2 => "watched_dir",
        GrandparentDir = 3 => "watched_dir",
    }
}

wire_enum! {
    /// Which path a connection attempt took (the cgroup connect hook sits under all of them).
    pub enum ConnectVia {
        /// connect(2); the record is sent at its exit with the result.
        Syscall = 1 => "connect",
        /// sendto/sendmsg with an address on an unconnected socket (UDP).
        Sendmsg = 2 => "sendmsg",
        /// sendto/sendmsg(MSG_FASTOPEN) on a TCP socket: connect and data in one call.
        FastOpen = 3 => "fastopen",
        /// IORING_OP_CONNECT, inline or from an io-wq worker; the result comes with the
        /// request's completion.
        IoUring = 4 => "io_uring",
        /// Any other path into the connect hook (a syscall the probes do not classify).
        Other = 5 => "other",
    }
}

wire_enum! {
    /// How one process reached into another's memory or environment.
    pub enum AccessKind {
        Environ = 1 => "environ",
        Mem = 2 => "mem",
        VmReadv = 3 => "process_vm_readv",
        PtraceAttach = 4 => "ptrace_attach",
        PtraceSeize = 5 => "ptrace_seize",
    }
}

wire_enum! {
    /// The binary interface of the syscalls a record came from (x86-64 processes may also
    /// use the 32-bit one).
    pub enum Abi {
        Native = 0 => "native",
        Ia32 = 1 => "ia32",
    }
}

/// Set in a record's `flags` when a string was longer than its buffer.
pub const FLAG_TRUNCATED: u32 = 1;
/// SecretOpen: the user-supplied name could not be read (user memory paged out or
/// already changed by another thread).
pub const FLAG_NO_NAME: u32 = 2;
/// Exec: the environment was longer than [`ENV_MAX`] (the record carries its start).
pub const FLAG_ENV_TRUNCATED: u32 = 4;
/// Exec: the command line was longer than [`ARGV_MAX`].
pub const FLAG_ARGV_TRUNCATED: u32 = 8;
/// Exec: environment or command line could not be read from the new image.
pub const FLAG_ENV_UNREADABLE: u32 = 16;
/// Exec: the new image runs 32-bit code (its syscalls are the ia32 ones).
pub const FLAG_IA32: u32 = 32;
/// Connect: the destination is a cloud metadata service address.
pub const FLAG_METADATA: u32 = 64;
/// SecretOpen: `name` is the file's own name, not the path the process passed (opens
/// without a path argument seen by the file_open hook: io_uring, open_by_handle_at).
pub const FLAG_BASENAME: u32 = 128;

// Values in the SETTINGS array map.
/// Number of watched directories (0 skips the directory walk on every open).
pub const SETTING_WATCHED_DIRS: u32 = 0;
/// Cumulative opens per (process, secret) are reported at most once per this many ms.
pub const SETTING_REPEAT_MS: u32 = 1;
/// Secret-open records per cgroup per second before the rest are counted, not sent.
pub const SETTING_CGROUP_BUDGET: u32 = 2;
/// DNS answer records per second, node-wide.
pub const SETTING_DNS_RATE: u32 = 3;
/// The agent thread learning a `file_operations` pointer (see FOPS), and which slot.
pub const SETTING_LEARN_TID: u32 = 4;
pub const SETTING_LEARN_SLOT: u32 = 5;
/// 1 when the file_open program sees opens: the io_uring tracepoints then only join
/// connects with their results.
pub const SETTING_FILE_OPEN_HOOK: u32 = 6;
pub const SETTINGS_LEN: u32 = 7;

/// Slots of the FOPS array map: the `file_operations` of `/proc/<pid>/environ` and
/// `/proc/<pid>/mem`, learned from the agent's own opens of them at start.
pub const FOPS_ENVIRON: u32 = 0;
pub const FOPS_MEM: u32 = 1;
pub const FOPS_LEN: u32 = 2;

/// The probes test every opened file's inode number (and, when directories are watched, its
/// parent's and grandparent's) against a bitmap before any hash lookup: a bitmap word is an
/// inlined array access, a hash lookup is a helper call. 2^18 bits (32 KiB) per bitmap keeps
/// false positives (which only cost the exact lookup) rare for thousands of watched inodes.
pub const INO_FILTER_BITS_LOG2: u32 = 18;
pub const INO_FILTER_WORDS: u32 = 1 << (INO_FILTER_BITS_LOG2 - 6);

/// (word index, bit mask) of an inode number in an inode bitmap.
#[inline(always)]
pub const fn ino_filter_slot(ino: u64) -> (u32, u64) {
    // Fibonacci hashing: inode numbers are often sequential; the multiply spreads them.
    let h = ino.wrapping_mul(0x9E37_79B9_7F4A_7C15) >> (64 - INO_FILTER_BITS_LOG2);
    ((h >> 6) as u32, 1u64 << (h & 63))
}

/// Common prefix of every record.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct Header {
    pub kind: u32,
    /// Thread id (kernel `pid`).
    pub pid: u32,
    /// Process id (kernel `tgid`).
    pub tgid: u32,
    /// Parent's process id (`real_parent->tgid`).
    pub ppid: u32,
    pub uid: u32,
    pub euid: u32,
    pub gid: u32,
    pub egid: u32,
    /// CLOCK_BOOTTIME nanoseconds.
    pub ts_ns: u64,
    /// cgroup v2 id (the cgroup directory's inode number).
    pub cgroup_id: u64,
    pub comm: [u8; COMM_LEN],
}

/// An exec; `env_len` bytes of the new image's environment (NUL-separated `NAME=value`)
/// and `argv_len` bytes of its command line (NUL-separated) follow it in the record.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct ExecFixed {
    pub hdr: Header,
    pub cap_effective: u64,
    pub flags: u32,
    /// Controlling terminal name (`pts/3`), empty when none.
    pub tty: [u8; TTY_LEN],
    pub env_len: u32,
    pub argv_len: u32,
    /// Sizes the new image really has (the record may carry less).
    pub env_total: u32,
    pub argv_total: u32,
    pub _pad: u32,
    pub filename: [u8; PATH_LEN],
}

/// The whole thread group is gone.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct Exit {
    pub hdr: Header,
    pub exit_code: i32,
    pub _pad: u32,
}

#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct SecretOpen {
    pub hdr: Header,
    /// Kernel-encoded dev_t of the opened file's superblock (MAJOR << 20 | MINOR).
    pub dev: u64,
    pub ino: u64,
    /// Inode of the watched directory that matched (0 for a direct file match).
    pub dir_ino: u64,
    /// Opens of this secret by this process so far, this one included: the agent reports
    /// the difference to the last record as repeats (the probe sends at most one record
    /// per process and secret per repeat interval).
    pub opens: u64,
    pub matched: u32,
    pub syscall: u32,
    /// Returned file descriptor.
    pub fd: i32,
    pub open_flags: i32,
    /// [`FLAG_TRUNCATED`] / [`FLAG_NO_NAME`] about `name`.
    pub flags: u32,
    pub abi: u32,
    pub name: [u8; PATH_LEN],
}

#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct Connect {
    pub hdr: Header,
    /// AF_INET or AF_INET6.
    pub family: u16,
    /// SOCK_STREAM / SOCK_DGRAM (0 when unknown).
    pub sock_type: u16,
    /// Destination port, host byte order.
    pub port: u16,
    pub _pad: u16,
    /// IPv4 in the first 4 bytes, or the IPv6 address; network order. The kernel's own
    /// copy of the address (the cgroup hook), not the caller's memory.
    pub addr: [u8; 16],
    /// Result (0 or -errno) for [`ConnectVia::Syscall`]; 0 otherwise.
    pub ret: i32,
    pub via: u32,
    /// [`FLAG_METADATA`].
    pub flags: u32,
    pub abi: u32,
    /// The socket's cookie (stable for its life; joins the metadata request and the DNS
    /// sockets to this record).
    pub cookie: u64,
    /// [`ConnectVia::IoUring`]: the request, joined with its completion; 0 otherwise.
    pub req: u64,
}

/// A connect(2) to a named Unix-domain socket, with the kernel's copy of the peer's
/// address (the socket actually connected to).
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct UnixConnect {
    pub hdr: Header,
    pub ret: i32,
    pub sock_type: u16,
    pub path_len: u16,
    pub path: [u8; UNIX_PATH_LEN],
    pub _pad: u32,
}

#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct PrivChange {
    pub hdr: Header,
    pub syscall_nr: u32,
    pub ret: i32,
    pub cap_effective: u64,
}

#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct Dns {
    /// Only `kind`, `ts_ns` and `cgroup_id` (the receiving socket's cgroup) are meaningful:
    /// the packet is seen in softirq context, not in the receiving process.
    pub hdr: Header,
    pub family: u16,
    /// 6 (TCP: the payload starts with the 2-byte length prefix) or 17.
    pub proto: u16,
    pub len: u32,
    pub server: [u8; 16],
    pub payload: [u8; DNS_PAYLOAD_LEN],
}

/// One process reading another's environment or memory, or attaching to it.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct ProcessAccess {
    pub hdr: Header,
    pub kind: u32,
    /// Host pid of the process read (for ptrace and process_vm_readv, as the caller named
    /// it, which is its pid in the caller's namespace; for /proc files, the kernel's).
    pub target_pid: u32,
    pub ret: i64,
}

/// An io_uring open or connect completed: the agent joins it with the connect attempt
/// (by `req`) for the result.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct IoUringComplete {
    pub hdr: Header,
    pub req: u64,
    pub res: i32,
    pub opcode: u32,
}

/// The first bytes written to a connection to a cloud metadata address.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct MetadataRequest {
    pub hdr: Header,
    pub cookie: u64,
    pub family: u16,
    pub port: u16,
    pub len: u32,
    pub addr: [u8; 16],
    pub line: [u8; REQUEST_LINE_LEN],
}

/// Key of the SECRET_INODES and WATCHED_DIRS maps.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct InodeKey {
    /// Kernel-encoded dev_t (MAJOR << 20 | MINOR), as `super_block.s_dev` holds it.
    pub dev: u64,
    pub ino: u64,
}

impl InodeKey {
    /// Converts a userspace `st_dev` (glibc encoding) to the kernel's internal encoding.
    pub const fn kernel_dev(major: u32, minor: u32) -> u64 {
        ((major as u64) << 20) | (minor as u64 & 0xfffff)
    }
}

/// Key of the REPEATS map: one process and one secret.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct RepeatKey {
    pub tgid: u32,
    pub _pad: u32,
    pub dev: u64,
    pub ino: u64,
}

/// Value of the REPEATS map. `opens` only grows (atomically); the agent reads it to report
/// repeats nobody sent a record for (the last reads before a process goes quiet or exits).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct Repeats {
    pub opens: u64,
    /// CLOCK_BOOTTIME ns of the last record sent for this key.
    pub last_sent_ns: u64,
}

/// Value of the BUDGETS map: a token bucket of secret-open records per cgroup.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct Budget {
    /// Start of the current one-second window (CLOCK_BOOTTIME ns).
    pub window_ns: u64,
    pub sent: u32,
    pub _pad: u32,
    /// Over-budget opens in this cgroup since the agent last read them.
    pub suppressed: u64,
}

/// Offsets into kernel structs, resolved from the running kernel's BTF by the agent and
/// written into the probes' read-only global before load. The agent refuses to load when
/// a required one is missing; optional ones are 0 when this kernel has no such field (the
/// probes then skip what needs them). Because the global is a frozen read-only map, the
/// verifier sees each offset as a constant, which BTF-typed loads (`ld` in the probes)
/// require.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct KernelConfig {
    /// Agent's own tgid: its reads of secrets (fingerprinting) are not events.
    pub agent_tgid: u32,
    /// Force a consumer wake-up once this many bytes are waiting in the ring.
    pub wake_bytes: u32,
    /// Emit at most one sendmsg record per (process, destination) per this many ns.
    pub sendmsg_dedup_ns: u64,
    pub task_real_parent: u32,
    pub task_tgid: u32,
    pub task_cred: u32,
    pub task_files: u32,
    pub task_signal: u32,
    pub task_exit_code: u32,
    pub task_mm: u32,
    pub task_flags: u32,
    pub task_group_leader: u32,
    pub task_comm: u32,
    /// `task_struct.worker_private` (an io-wq worker's `struct io_worker`), optional.
    pub task_worker_private: u32,
    /// x86 `thread_info.status` (TS_COMPAT), optional.
    pub thread_info_status: u32,
    pub cred_uid: u32,
    pub cred_gid: u32,
    pub cred_euid: u32,
    pub cred_egid: u32,
    pub cred_cap_effective: u32,
    pub signal_live: u32,
    pub signal_tty: u32,
    pub tty_name: u32,
    pub mm_arg_start: u32,
    pub mm_arg_end: u32,
    pub mm_env_start: u32,
    pub mm_env_end: u32,
    pub files_fdt: u32,
    pub fdtable_max_fds: u32,
    pub fdtable_fd: u32,
    pub file_f_inode: u32,
    pub file_f_path_dentry: u32,
    pub file_private_data: u32,
    pub file_f_flags: u32,
    pub file_f_op: u32,
    pub inode_i_ino: u32,
    pub inode_i_sb: u32,
    pub sb_s_dev: u32,
    pub dentry_d_parent: u32,
    pub dentry_d_inode: u32,
    /// `dentry.d_name.name`.
    pub dentry_d_name: u32,
    pub socket_type: u32,
    pub socket_sk: u32,
    pub sock_family: u32,
    pub unix_sock_peer: u32,
    pub unix_sock_addr: u32,
    pub unix_address_len: u32,
    pub unix_address_name: u32,
    /// `proc_inode.pid` relative to the embedded `vfs_inode` (negative: the inode sits
    /// after the pid pointer), and `pid.numbers[0].nr`.
    pub proc_inode_pid_from_inode: i32,
    pub pid_numbers_nr: u32,
    /// `io_worker.cur_work`, and `io_kiocb.work` (a request from its work item); optional.
    pub io_worker_cur_work: u32,
    pub io_kiocb_work: u32,
    /// `io_open.file_slot` / `io_open.filename` inside the request, `filename.name`.
    pub io_open_file_slot: u32,
    pub io_open_filename: u32,
    pub filename_name: u32,
    /// Offsets in the io_uring tracepoints' records, read from tracefs (`u32::MAX` when the
    /// tracepoint does not exist on this kernel).
    pub tp_iou_submit_req: u32,
    pub tp_iou_submit_opcode: u32,
    pub tp_iou_complete_req: u32,
    pub tp_iou_complete_res: u32,
    /// Offsets in `struct pt_regs` of syscall arguments 0 and 1 and the syscall number as
    /// saved at entry (still intact at exit; arm64 keeps the clobbered x0 in `orig_x0`),
    /// and of the ia32 argument registers (x86-64 only).
    pub regs_arg0: u32,
    pub regs_arg1: u32,
    pub regs_nr: u32,
    pub regs_compat_arg0: u32,
    pub regs_compat_arg1: u32,
    /// This architecture's numbers for the calls the probes tell apart; -1 where it has
    /// none.
    pub nr_open: i32,
    pub nr_openat: i32,
    pub nr_openat2: i32,
    pub nr_creat: i32,
    pub nr_open_by_handle_at: i32,
    pub nr_connect: i32,
    pub nr_sendto: i32,
    pub nr_sendmsg: i32,
    pub nr_io_uring_enter: i32,
    /// The ia32 numbers of open, openat, openat2, creat and open_by_handle_at (-1 off
    /// x86-64).
    pub nr32_open: i32,
    pub nr32_openat: i32,
    pub nr32_openat2: i32,
    pub nr32_creat: i32,
    pub nr32_open_by_handle_at: i32,
    pub _pad: u32,
}

/// Key of the sendmsg de-duplication map.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct SendKey {
    pub tgid: u32,
    pub port: u16,
    pub family: u16,
    pub addr: [u8; 16],
}

#[cfg(feature = "user")]
mod pod {
    // SAFETY: plain-old-data, #[repr(C)] with explicit padding, valid for any bit pattern.
    unsafe impl aya::Pod for super::InodeKey {}
    unsafe impl aya::Pod for super::KernelConfig {}
    unsafe impl aya::Pod for super::RepeatKey {}
    unsafe impl aya::Pod for super::Repeats {}
    unsafe impl aya::Pod for super::Budget {}
}
