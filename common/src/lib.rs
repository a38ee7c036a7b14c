//! Fixed-layout records and map types shared by the eBPF probes and the agent.
//!
//! Every record starts with a [`Header`]; its `kind` says which struct follows. The layouts
//! are `#[repr(C)]` with explicit padding so both sides agree without a serialisation step.
#![no_std]

pub const COMM_LEN: usize = 16;
/// Longest user-supplied path or exec filename carried in a record (longer ones are cut and
/// flagged with [`FLAG_TRUNCATED`]).
pub const PATH_LEN: usize = 256;
/// DNS payload bytes captured from one UDP/53 answer.
pub const DNS_PAYLOAD_LEN: usize = 512;
pub const TTY_LEN: usize = 16;

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
    }
}

wire_enum! {
    /// One slot per probe family in the per-CPU DROPS map.
    pub enum Probe {
        Exec = 0 => "exec",
        Exit = 1 => "exit",
        Open = 2 => "open",
        Connect = 3 => "connect",
        Sendmsg = 4 => "sendmsg",
        Priv = 5 => "priv",
        Dns = 6 => "dns",
    }
}

/// Entries in the DROPS map.
pub const PROBE_COUNT: u32 = Probe::ALL.len() as u32;

wire_enum! {
    /// Which open syscall produced a SecretOpen record.
    pub enum OpenSyscall {
        Open = 1 => "open",
        Openat = 2 => "openat",
        Openat2 = 3 => "openat2",
        Creat = 4 => "creat",
        OpenByHandleAt = 5 => "open_by_handle_at",
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
    /// Which hook produced a Connect record.
    pub enum ConnectOp {
        Connect = 1 => "connect",
        Sendmsg = 2 => "sendmsg",
    }
}

/// Set in a record's `flags` when a string was longer than its buffer.
pub const FLAG_TRUNCATED: u32 = 1;
/// SecretOpen: the user-supplied name could not be read (user memory paged out or
/// already changed by another thread).
pub const FLAG_NO_NAME: u32 = 2;

/// Index in the SETTINGS array map: number of watched directories (0 skips the directory
/// walk on every open).
pub const SETTING_WATCHED_DIRS: u32 = 0;
pub const SETTINGS_LEN: u32 = 1;

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

#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct Exec {
    pub hdr: Header,
    pub cap_effective: u64,
    pub flags: u32,
    /// Controlling terminal name (`pts/3`), empty when none.
    pub tty: [u8; TTY_LEN],
    pub _pad: u32,
    pub filename: [u8; PATH_LEN],
}

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
    pub matched: u32,
    pub syscall: u32,
    /// Returned file descriptor.
    pub fd: i32,
    pub open_flags: i32,
    /// [`FLAG_TRUNCATED`] / [`FLAG_NO_NAME`] about `name`.
    pub flags: u32,
    pub _pad: u32,
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
    /// IPv4 in the first 4 bytes, or the IPv6 address; network order.
    pub addr: [u8; 16],
    /// Syscall result (0 or -errno); 0 for sendmsg, which the hook sees before sending.
    pub ret: i32,
    pub op: u32,
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
    pub _pad: u16,
    pub len: u32,
    pub server: [u8; 16],
    pub payload: [u8; DNS_PAYLOAD_LEN],
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

/// Offsets into kernel structs, resolved from the running kernel's BTF by the agent and
/// written into the probes' read-only global before load. The agent refuses to load when
/// one is missing. Because the global is a frozen read-only map, the verifier sees each
/// offset as a constant, which BTF-typed loads (`ld` in the probes) require.
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
    pub cred_uid: u32,
    pub cred_gid: u32,
    pub cred_euid: u32,
    pub cred_egid: u32,
    pub cred_cap_effective: u32,
    pub files_fdt: u32,
    pub fdtable_max_fds: u32,
    pub fdtable_fd: u32,
    pub file_f_inode: u32,
    pub file_f_path_dentry: u32,
    pub file_private_data: u32,
    pub file_f_flags: u32,
    pub inode_i_ino: u32,
    pub inode_i_sb: u32,
    pub sb_s_dev: u32,
    pub dentry_d_parent: u32,
    pub dentry_d_inode: u32,
    pub socket_type: u32,
    pub signal_tty: u32,
    pub tty_name: u32,
    /// Offsets in `struct pt_regs` of syscall arguments 0 and 1 as saved at entry (still
    /// intact at exit; arm64 keeps the clobbered x0 in `orig_x0`).
    pub regs_arg0: u32,
    pub regs_arg1: u32,
    /// This architecture's numbers for the open family; -1 where it has none.
    pub nr_open: i32,
    pub nr_openat: i32,
    pub nr_openat2: i32,
    pub nr_creat: i32,
    pub nr_open_by_handle_at: i32,
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
}
