//! The one table of the syscalls the probes care about: their names (tracepoint names,
//! event labels) and their numbers on each architecture (the probes compare numbers; the
//! agent names them).

/// A syscall the probes attach to or decode.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Syscall {
    Open,
    Openat,
    Openat2,
    Creat,
    OpenByHandleAt,
    Connect,
    Sendto,
    Sendmsg,
    IoUringEnter,
    Ptrace,
    ProcessVmReadv,
    Setuid,
    Setgid,
    Setreuid,
    Setregid,
    Setresuid,
    Setresgid,
    Setfsuid,
    Setfsgid,
    Capset,
}

/// (syscall, name, x86_64 number, aarch64 number); -1 where the architecture has none.
const TABLE: &[(Syscall, &str, i32, i32)] = &[
    (Syscall::Open, "open", 2, -1),
    (Syscall::Openat, "openat", 257, 56),
    (Syscall::Openat2, "openat2", 437, 437),
    (Syscall::Creat, "creat", 85, -1),
    (Syscall::OpenByHandleAt, "open_by_handle_at", 304, 265),
    (Syscall::Connect, "connect", 42, 203),
    (Syscall::Sendto, "sendto", 44, 206),
    (Syscall::Sendmsg, "sendmsg", 46, 211),
    (Syscall::IoUringEnter, "io_uring_enter", 426, 426),
    (Syscall::Ptrace, "ptrace", 101, 117),
    (Syscall::ProcessVmReadv, "process_vm_readv", 310, 270),
    (Syscall::Setuid, "setuid", 105, 146),
    (Syscall::Setgid, "setgid", 106, 144),
    (Syscall::Setreuid, "setreuid", 113, 145),
    (Syscall::Setregid, "setregid", 114, 143),
    (Syscall::Setresuid, "setresuid", 117, 147),
    (Syscall::Setresgid, "setresgid", 119, 149),
    (Syscall::Setfsuid, "setfsuid", 122, 151),
    (Syscall::Setfsgid, "setfsgid", 123, 152),
    (Syscall::Capset, "capset", 126, 91),
];

/// Opens whose exit the open probe inspects.
pub const OPEN_FAMILY: &[Syscall] = &[
    Syscall::Open,
    Syscall::Openat,
    Syscall::Openat2,
    Syscall::Creat,
    Syscall::OpenByHandleAt,
];

/// Calls whose successful return changes a process's credentials.
pub const CREDENTIAL_CHANGES: &[Syscall] = &[
    Syscall::Setuid,
    Syscall::Setgid,
    Syscall::Setreuid,
    Syscall::Setregid,
    Syscall::Setresuid,
    Syscall::Setresgid,
    Syscall::Setfsuid,
    Syscall::Setfsgid,
    Syscall::Capset,
];

fn entry(s: Syscall) -> &'static (Syscall, &'static str, i32, i32) {
    TABLE
        .iter()
        .find(|e| e.0 == s)
        .expect("every Syscall is in TABLE")
}

fn arch_nr(e: &(Syscall, &str, i32, i32)) -> i32 {
    if cfg!(target_arch = "x86_64") {
        e.2
    } else if cfg!(target_arch = "aarch64") {
        e.3
    } else {
        -1
    }
}

impl Syscall {
    /// The kernel's name (`sys_exit_<name>` is its exit tracepoint).
    pub fn name(self) -> &'static str {
        entry(self).1
    }

    /// Its number on this architecture, -1 when it has none (`open` on arm64).
    pub fn nr(self) -> i32 {
        arch_nr(entry(self))
    }

    /// The syscall with number `nr` on this architecture.
    pub fn from_nr(nr: i32) -> Option<Syscall> {
        TABLE
            .iter()
            .find(|e| nr >= 0 && arch_nr(e) == nr)
            .map(|e| e.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_syscall_has_one_entry_and_numbers_round_trip() {
        for (s, name, ..) in TABLE {
            assert_eq!(TABLE.iter().filter(|e| e.0 == *s).count(), 1, "{name}");
            if s.nr() >= 0 {
                assert_eq!(Syscall::from_nr(s.nr()), Some(*s), "{name}");
            }
        }
        assert_eq!(Syscall::from_nr(-1), None);
        #[cfg(target_arch = "x86_64")]
        assert_eq!(
            (Syscall::Openat.nr(), Syscall::Capset.name()),
            (257, "capset")
        );
    }
}
