//! Raw `bpf(2)` probes run inside a guest: does this kernel load (and run) a program of a
//! given kind, and which helpers may a program type call. Each probe is the smallest program
//! that can answer, so a refusal names the kernel's limit, not a bug in credwatch's probes.

use std::{ffi::CString, fs, os::fd::RawFd};

use serde::{Deserialize, Serialize};

use super::btf::Btf;

// bpf(2) commands.
const BPF_PROG_LOAD: i64 = 5;
const BPF_PROG_GET_FD_BY_ID: i64 = 13;
const BPF_OBJ_GET_INFO_BY_FD: i64 = 15;
const BPF_RAW_TRACEPOINT_OPEN: i64 = 17;
const BPF_BTF_GET_FD_BY_ID: i64 = 19;

// Program types (uapi enum bpf_prog_type).
const PROG_KPROBE: u32 = 2;
const PROG_TRACEPOINT: u32 = 5;
const PROG_CGROUP_SKB: u32 = 8;
const PROG_RAW_TRACEPOINT: u32 = 17;
const PROG_CGROUP_SOCK_ADDR: u32 = 18;
const PROG_TRACING: u32 = 26;
const PROG_LSM: u32 = 29;

// Expected attach types (uapi enum bpf_attach_type).
const ATTACH_CGROUP_INET_INGRESS: u32 = 0;
const ATTACH_CGROUP_INET4_CONNECT: u32 = 10;
const ATTACH_CGROUP_INET6_CONNECT: u32 = 11;
const ATTACH_CGROUP_UDP4_SENDMSG: u32 = 14;
const ATTACH_CGROUP_UDP6_SENDMSG: u32 = 15;
const ATTACH_TRACE_RAW_TP: u32 = 23;
const ATTACH_TRACE_FENTRY: u32 = 24;
const ATTACH_TRACE_FEXIT: u32 = 25;
const ATTACH_LSM_MAC: u32 = 27;
const ATTACH_TRACE_ITER: u32 = 28;

/// The kinds of program credwatch uses or may pick at start, with the kernel object each
/// one is tried against.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ProgKind {
    Tracepoint,
    RawTracepoint,
    /// `tp_btf/sched_process_exec`.
    TpBtf,
    /// `fentry/security_file_open`.
    Fentry,
    /// `fexit/security_file_open`.
    Fexit,
    /// `lsm/file_open`.
    Lsm,
    Kprobe,
    /// `cgroup/connect4`.
    CgroupConnect4,
    CgroupConnect6,
    CgroupSendmsg4,
    CgroupSendmsg6,
    /// `cgroup_skb/ingress`.
    CgroupSkbIngress,
    /// `iter/task`.
    IterTask,
}

/// Every kind the feature table covers, in report order.
pub const ALL_KINDS: &[ProgKind] = &[
    ProgKind::Tracepoint,
    ProgKind::RawTracepoint,
    ProgKind::TpBtf,
    ProgKind::Fentry,
    ProgKind::Fexit,
    ProgKind::Lsm,
    ProgKind::Kprobe,
    ProgKind::CgroupConnect4,
    ProgKind::CgroupSendmsg4,
    ProgKind::CgroupSkbIngress,
    ProgKind::IterTask,
];

/// How a kind is loaded: program type, expected attach type, BTF target (name, BTF kind).
struct Spec {
    prog_type: u32,
    attach_type: u32,
    btf_target: Option<(&'static str, u32)>,
    /// Return value the verifier accepts for this kind.
    ret: i32,
}

impl ProgKind {
    /// The kind as a section prefix names it (`tracepoint`, `lsm`, `cgroup/sendmsg4`…).
    pub fn name(self) -> &'static str {
        match self {
            ProgKind::Tracepoint => "tracepoint",
            ProgKind::RawTracepoint => "raw_tracepoint",
            ProgKind::TpBtf => "tp_btf",
            ProgKind::Fentry => "fentry",
            ProgKind::Fexit => "fexit",
            ProgKind::Lsm => "lsm",
            ProgKind::Kprobe => "kprobe",
            ProgKind::CgroupConnect4 => "cgroup/connect4",
            ProgKind::CgroupConnect6 => "cgroup/connect6",
            ProgKind::CgroupSendmsg4 => "cgroup/sendmsg4",
            ProgKind::CgroupSendmsg6 => "cgroup/sendmsg6",
            ProgKind::CgroupSkbIngress => "cgroup_skb/ingress",
            ProgKind::IterTask => "iter/task",
        }
    }

    /// The kind and the kernel object the probes here try it on.
    pub fn hook(self) -> String {
        let target = match self {
            ProgKind::Tracepoint => "syscalls/sys_enter_getppid",
            ProgKind::RawTracepoint => "sys_enter",
            ProgKind::TpBtf => "sched_process_exec",
            ProgKind::Fentry | ProgKind::Fexit | ProgKind::Kprobe => "security_file_open",
            ProgKind::Lsm => "file_open",
            _ => return self.name().to_owned(),
        };
        format!("{}/{target}", self.name())
    }

    /// The kind of an ELF program section as aya names them (`tracepoint`, `cgroup/sendmsg4`,
    /// `cgroup_skb/ingress`, `lsm/file_open`…). BTF-targeted kinds are probed against this
    /// module's fixed targets, which is enough to tell which helpers the type may call.
    pub fn of_section(section: &str) -> Option<ProgKind> {
        let (head, tail) = section.split_once('/').unwrap_or((section, ""));
        Some(match head {
            "tracepoint" | "tp" => ProgKind::Tracepoint,
            "raw_tp" | "raw_tracepoint" => ProgKind::RawTracepoint,
            "tp_btf" => ProgKind::TpBtf,
            "fentry" => ProgKind::Fentry,
            "fexit" => ProgKind::Fexit,
            "lsm" => ProgKind::Lsm,
            "kprobe" | "kretprobe" => ProgKind::Kprobe,
            "iter" => ProgKind::IterTask,
            "cgroup_skb" => ProgKind::CgroupSkbIngress,
            "cgroup" => match tail {
                "connect4" => ProgKind::CgroupConnect4,
                "connect6" => ProgKind::CgroupConnect6,
                "sendmsg4" => ProgKind::CgroupSendmsg4,
                "sendmsg6" => ProgKind::CgroupSendmsg6,
                "skb" => ProgKind::CgroupSkbIngress,
                _ => return None,
            },
            _ => return None,
        })
    }

    fn spec(self) -> Spec {
        const FUNC: u32 = 12;
        const TYPEDEF: u32 = 8;
        let s = |prog_type, attach_type, btf_target, ret| Spec {
            prog_type,
            attach_type,
            btf_target,
            ret,
        };
        match self {
            ProgKind::Tracepoint => s(PROG_TRACEPOINT, 0, None, 0),
            ProgKind::RawTracepoint => s(PROG_RAW_TRACEPOINT, 0, None, 0),
            ProgKind::TpBtf => s(
                PROG_TRACING,
                ATTACH_TRACE_RAW_TP,
                Some(("btf_trace_sched_process_exec", TYPEDEF)),
                0,
            ),
            ProgKind::Fentry => s(
                PROG_TRACING,
                ATTACH_TRACE_FENTRY,
                Some(("security_file_open", FUNC)),
                0,
            ),
            ProgKind::Fexit => s(
                PROG_TRACING,
                ATTACH_TRACE_FEXIT,
                Some(("security_file_open", FUNC)),
                0,
            ),
            ProgKind::Lsm => s(
                PROG_LSM,
                ATTACH_LSM_MAC,
                Some(("bpf_lsm_file_open", FUNC)),
                0,
            ),
            ProgKind::Kprobe => s(PROG_KPROBE, 0, None, 0),
            ProgKind::CgroupConnect4 => {
                s(PROG_CGROUP_SOCK_ADDR, ATTACH_CGROUP_INET4_CONNECT, None, 1)
            }
            ProgKind::CgroupConnect6 => {
                s(PROG_CGROUP_SOCK_ADDR, ATTACH_CGROUP_INET6_CONNECT, None, 1)
            }
            ProgKind::CgroupSendmsg4 => {
                s(PROG_CGROUP_SOCK_ADDR, ATTACH_CGROUP_UDP4_SENDMSG, None, 1)
            }
            ProgKind::CgroupSendmsg6 => {
                s(PROG_CGROUP_SOCK_ADDR, ATTACH_CGROUP_UDP6_SENDMSG, None, 1)
            }
            ProgKind::CgroupSkbIngress => s(PROG_CGROUP_SKB, ATTACH_CGROUP_INET_INGRESS, None, 1),
            ProgKind::IterTask => s(
                PROG_TRACING,
                ATTACH_TRACE_ITER,
                Some(("bpf_iter_task", FUNC)),
                0,
            ),
        }
    }
}

/// What one kind did on this kernel.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Feature {
    pub kind: Option<ProgKind>,
    /// Loaded (the verifier accepted it).
    pub loaded: bool,
    /// Attached, for the kinds this probe attaches (all but the cgroup ones and iter).
    pub attached: Option<bool>,
    /// Runs counted after triggering the hook once (needs `kernel.bpf_stats_enabled=1`):
    /// an LSM program can attach yet never run when `bpf` is not an active LSM.
    pub runs: Option<u64>,
    /// errno and the verifier log's last lines when something was refused.
    pub error: Option<String>,
}

/// Whether a program type may call a helper on this kernel.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum HelperStatus {
    Available,
    /// The kernel does not have the helper at all (`invalid func unknown#N`).
    Missing,
    /// The kernel has it, but not for this program type (`unknown func bpf_x#N`) or not
    /// for this attach target (`helper call is not allowed in probe`).
    NotForType,
    /// The program type itself could not be loaded, so nothing was learnt.
    TypeUnavailable,
}

fn sys_bpf(cmd: i64, attr: &mut [u8]) -> Result<i32, std::io::Error> {
    // SAFETY: attr is a valid, writable, zero-padded bpf_attr of the given size.
    let rc = unsafe { libc::syscall(libc::SYS_bpf, cmd, attr.as_mut_ptr(), attr.len()) };
    if rc < 0 {
        Err(std::io::Error::last_os_error())
    } else {
        Ok(rc as i32)
    }
}

fn put_u32(b: &mut [u8], off: usize, v: u32) {
    b[off..off + 4].copy_from_slice(&v.to_le_bytes());
}

fn put_u64(b: &mut [u8], off: usize, v: u64) {
    b[off..off + 8].copy_from_slice(&v.to_le_bytes());
}

/// One instruction: opcode, dst/src registers, offset, immediate.
fn insn(code: u8, dst: u8, src: u8, off: i16, imm: i32) -> u64 {
    u64::from(code)
        | (u64::from(dst & 0xf) << 8)
        | (u64::from(src & 0xf) << 12)
        | (u64::from(off as u16) << 16)
        | (u64::from(imm as u32) << 32)
}

const MOV64_IMM: u8 = 0xb7;
const CALL: u8 = 0x85;
const EXIT: u8 = 0x95;

pub struct Loaded {
    pub fd: RawFd,
}

impl Drop for Loaded {
    fn drop(&mut self) {
        // SAFETY: closing an fd this struct owns.
        unsafe { libc::close(self.fd) };
    }
}

/// Loads `insns` as `kind`; on refusal returns errno plus the verifier log.
fn load(kind: ProgKind, insns: &[u64], btf: Option<&Btf>) -> Result<Loaded, (i32, String)> {
    let spec = kind.spec();
    let attach_btf_id = match spec.btf_target {
        None => 0,
        Some((name, btf_kind)) => match btf.and_then(|b| b.find(name, btf_kind)) {
            Some(id) => id,
            None => return Err((0, format!("kernel BTF has no {name}"))),
        },
    };
    let license = CString::new("GPL").unwrap();
    let mut log = vec![0u8; 1 << 16];
    let mut attr = [0u8; 128];
    put_u32(&mut attr, 0, spec.prog_type);
    put_u32(&mut attr, 4, insns.len() as u32);
    put_u64(&mut attr, 8, insns.as_ptr() as u64);
    put_u64(&mut attr, 16, license.as_ptr() as u64);
    put_u32(&mut attr, 24, 1); // log_level
    put_u32(&mut attr, 28, log.len() as u32);
    put_u64(&mut attr, 32, log.as_mut_ptr() as u64);
    attr[48..48 + 9].copy_from_slice(b"cw_probe\0");
    put_u32(&mut attr, 68, spec.attach_type);
    put_u32(&mut attr, 108, attach_btf_id);
    match sys_bpf(BPF_PROG_LOAD, &mut attr) {
        Ok(fd) => Ok(Loaded { fd }),
        Err(e) => {
            let end = log.iter().position(|&b| b == 0).unwrap_or(log.len());
            let text = String::from_utf8_lossy(&log[..end]).into_owned();
            Err((e.raw_os_error().unwrap_or(0), text))
        }
    }
}

fn errno_text(errno: i32) -> String {
    if errno == 0 {
        return String::new();
    }
    format!(
        "{} (errno {errno})",
        std::io::Error::from_raw_os_error(errno)
    )
}

/// The last few lines of a verifier log, where the reason is.
pub fn log_tail(log: &str, lines: usize) -> String {
    let all: Vec<&str> = log.lines().filter(|l| !l.trim().is_empty()).collect();
    all[all.len().saturating_sub(lines)..].join(" | ")
}

/// `runs` from the program's fdinfo (0 when stats are off or it never ran).
pub fn run_count(fd: RawFd) -> Option<u64> {
    fdinfo_field(&format!("/proc/self/fdinfo/{fd}"), "run_cnt")
}

pub fn fdinfo_field(path: &str, key: &str) -> Option<u64> {
    let text = fs::read_to_string(path).ok()?;
    text.lines().find_map(|l| {
        let (k, v) = l.split_once(':')?;
        if k.trim() == key {
            v.trim().parse().ok()
        } else {
            None
        }
    })
}

/// Loads the minimal program of `kind`; attaches and triggers it where that is one syscall.
pub fn probe_kind(kind: ProgKind, btf: Option<&Btf>) -> Feature {
    let ret = kind.spec().ret;
    let prog = [insn(MOV64_IMM, 0, 0, 0, ret), insn(EXIT, 0, 0, 0, 0)];
    let mut f = Feature {
        kind: Some(kind),
        ..Feature::default()
    };
    let loaded = match load(kind, &prog, btf) {
        Ok(l) => l,
        Err((errno, log)) => {
            f.error = Some(format!("load: {} {}", errno_text(errno), log_tail(&log, 3)));
            return f;
        }
    };
    f.loaded = true;
    let attach = match kind {
        ProgKind::RawTracepoint => raw_tracepoint_open(loaded.fd, Some("sys_enter")),
        ProgKind::TpBtf | ProgKind::Fentry | ProgKind::Fexit | ProgKind::Lsm => {
            raw_tracepoint_open(loaded.fd, None)
        }
        ProgKind::Tracepoint => perf_attach(
            loaded.fd,
            PerfTarget::Tracepoint("syscalls/sys_enter_getppid"),
        ),
        ProgKind::Kprobe => perf_attach(loaded.fd, PerfTarget::Kprobe("security_file_open")),
        // Cgroup kinds attach to a cgroup: the agent's own attach covers those; loading is
        // what differs between kernels.
        _ => return f,
    };
    let link = match attach {
        Ok(fd) => fd,
        Err(e) => {
            f.attached = Some(false);
            f.error = Some(format!("attach: {e}"));
            return f;
        }
    };
    f.attached = Some(true);
    trigger(kind);
    f.runs = run_count(loaded.fd);
    // SAFETY: closing the link / perf event fd just created (detaches the program).
    unsafe { libc::close(link) };
    f
}

/// Attaches a tracing, LSM or raw tracepoint program (`tp` only for raw tracepoints).
fn raw_tracepoint_open(prog: RawFd, tp: Option<&str>) -> Result<RawFd, String> {
    let name = tp.map(|t| CString::new(t).unwrap());
    let mut attr = [0u8; 16];
    if let Some(n) = &name {
        put_u64(&mut attr, 0, n.as_ptr() as u64);
    }
    put_u32(&mut attr, 8, prog as u32);
    sys_bpf(BPF_RAW_TRACEPOINT_OPEN, &mut attr).map_err(|e| e.to_string())
}

enum PerfTarget {
    /// `category/name` under tracefs events.
    Tracepoint(&'static str),
    /// A kernel function, through the kprobe PMU.
    Kprobe(&'static str),
}

/// Attaches through a perf event on CPU 0 (the guests have one CPU), the way tracepoint and
/// kprobe programs attach on kernels without BPF links for them.
fn perf_attach(prog: RawFd, target: PerfTarget) -> Result<RawFd, String> {
    const PERF_TYPE_TRACEPOINT: u32 = 2;
    const PERF_EVENT_IOC_ENABLE: u64 = 0x2400;
    const PERF_EVENT_IOC_SET_BPF: u64 = 0x4004_2408;
    const PERF_FLAG_FD_CLOEXEC: u64 = 8;
    let mut attr = [0u8; 128];
    let func;
    match target {
        PerfTarget::Tracepoint(tp) => {
            let path = format!("/sys/kernel/tracing/events/{tp}/id");
            let id: u64 = fs::read_to_string(&path)
                .map_err(|e| format!("{path}: {e}"))?
                .trim()
                .parse()
                .map_err(|e| format!("{path}: {e}"))?;
            put_u32(&mut attr, 0, PERF_TYPE_TRACEPOINT);
            put_u64(&mut attr, 8, id);
        }
        PerfTarget::Kprobe(name) => {
            let path = "/sys/bus/event_source/devices/kprobe/type";
            let pmu: u32 = fs::read_to_string(path)
                .map_err(|e| format!("no kprobe PMU ({path}: {e})"))?
                .trim()
                .parse()
                .map_err(|e| format!("{path}: {e}"))?;
            func = CString::new(name).unwrap();
            put_u32(&mut attr, 0, pmu);
            put_u64(&mut attr, 56, func.as_ptr() as u64); // config1: kprobe_func
        }
    }
    put_u32(&mut attr, 4, 128); // size
    put_u64(&mut attr, 16, 1); // sample_period
    put_u32(&mut attr, 48, 1); // wakeup_events
    // SAFETY: a valid perf_event_attr of the size it declares; pid -1 on CPU 0.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_perf_event_open,
            attr.as_ptr(),
            -1,
            0,
            -1,
            PERF_FLAG_FD_CLOEXEC,
        )
    } as i32;
    if fd < 0 {
        return Err(format!(
            "perf_event_open: {}",
            std::io::Error::last_os_error()
        ));
    }
    // SAFETY: ioctls on the perf event fd just opened.
    let rc = unsafe {
        if libc::ioctl(fd, PERF_EVENT_IOC_SET_BPF as _, prog) != 0 {
            -1
        } else {
            libc::ioctl(fd, PERF_EVENT_IOC_ENABLE as _, 0)
        }
    };
    if rc != 0 {
        let e = std::io::Error::last_os_error();
        unsafe { libc::close(fd) };
        return Err(format!("attaching to the perf event: {e}"));
    }
    Ok(fd)
}

/// One event the hook of `kind` sees.
fn trigger(kind: ProgKind) {
    match kind {
        ProgKind::TpBtf => {
            let _ = std::process::Command::new("/bin/true").status();
        }
        ProgKind::Tracepoint => {
            // SAFETY: a syscall without arguments.
            unsafe { libc::syscall(libc::SYS_getppid) };
        }
        _ => {
            // An open (fentry/fexit/lsm/kprobe on security_file_open) is also a syscall
            // (raw sys_enter).
            let _ = fs::read("/proc/self/stat");
        }
    }
}

/// Whether `kind` may call helper `id`: the verifier's answer to `call id; exit`. Helper ids
/// past the kernel's last are `invalid func`; ones the program type's table lacks are
/// `unknown func <name>`; any later complaint (arguments, return value) means the call itself
/// passed.
pub fn probe_helper(kind: ProgKind, id: u32, btf: Option<&Btf>) -> (HelperStatus, String) {
    let prog = [insn(CALL, 0, 0, 0, id as i32), insn(EXIT, 0, 0, 0, 0)];
    match load(kind, &prog, btf) {
        Ok(_) => (HelperStatus::Available, String::new()),
        Err((errno, log)) => {
            let line = |pats: &[&str]| {
                log.lines()
                    .find(|l| pats.iter().any(|p| l.contains(p)))
                    .map(|l| l.trim().to_owned())
            };
            if let Some(l) = line(&["invalid func"]) {
                (HelperStatus::Missing, l)
            } else if let Some(l) =
                line(&["unknown func", "cannot use helper", "not allowed in probe"])
            {
                (HelperStatus::NotForType, l)
            } else if errno == 0 || log.is_empty() {
                (HelperStatus::TypeUnavailable, log_tail(&log, 1))
            } else {
                // Refused later (arguments, return value): the call itself was accepted.
                (HelperStatus::Available, String::new())
            }
        }
    }
}

/// `bpf_prog_info` of `fd`, with room for one func_info record when `func_info` is given.
fn prog_info(fd: RawFd, func_info: Option<&mut [u8; 8]>) -> Option<[u8; 256]> {
    let mut info = [0u8; 256];
    if let Some(rec) = func_info {
        put_u32(&mut info, 132, 8); // func_info_rec_size
        put_u64(&mut info, 136, rec.as_mut_ptr() as u64);
        put_u32(&mut info, 144, 1); // nr_func_info
    }
    let mut attr = [0u8; 16];
    put_u32(&mut attr, 0, fd as u32);
    put_u32(&mut attr, 4, info.len() as u32);
    put_u64(&mut attr, 8, info.as_mut_ptr() as u64);
    sys_bpf(BPF_OBJ_GET_INFO_BY_FD, &mut attr).ok()?;
    Some(info)
}

/// The BTF object `id` as raw bytes.
fn btf_by_id(id: u32) -> Option<Vec<u8>> {
    let mut attr = [0u8; 16];
    put_u32(&mut attr, 0, id);
    let fd = Loaded {
        fd: sys_bpf(BPF_BTF_GET_FD_BY_ID, &mut attr).ok()?,
    };
    let get = |buf: &mut [u8]| -> Option<u32> {
        // bpf_btf_info: btf pointer @0, btf_size @8.
        let mut info = [0u8; 32];
        put_u64(&mut info, 0, buf.as_mut_ptr() as u64);
        put_u32(&mut info, 8, buf.len() as u32);
        let mut attr = [0u8; 16];
        put_u32(&mut attr, 0, fd.fd as u32);
        put_u32(&mut attr, 4, info.len() as u32);
        put_u64(&mut attr, 8, info.as_mut_ptr() as u64);
        sys_bpf(BPF_OBJ_GET_INFO_BY_FD, &mut attr).ok()?;
        Some(u32::from_le_bytes(info[8..12].try_into().ok()?))
    };
    let size = get(&mut [])? as usize;
    let mut data = vec![0u8; size];
    get(&mut data)?;
    Some(data)
}

/// The name of a loaded program by id: its full function name from the program's BTF when
/// it has one (the kernel keeps only 15 characters of the name itself).
pub fn prog_name(id: u32) -> Option<String> {
    let mut attr = [0u8; 16];
    put_u32(&mut attr, 0, id);
    let fd = Loaded {
        fd: sys_bpf(BPF_PROG_GET_FD_BY_ID, &mut attr).ok()?,
    };
    let info = prog_info(fd.fd, None)?;
    let name = &info[64..80];
    let end = name.iter().position(|&b| b == 0).unwrap_or(name.len());
    let short = String::from_utf8_lossy(&name[..end]).into_owned();
    let btf_id = u32::from_le_bytes(info[128..132].try_into().ok()?);
    let nr_func_info = u32::from_le_bytes(info[144..148].try_into().ok()?);
    if btf_id == 0 || nr_func_info == 0 {
        return Some(short);
    }
    let mut rec = [0u8; 8];
    let full = prog_info(fd.fd, Some(&mut rec)).and_then(|_| {
        let type_id = u32::from_le_bytes(rec[4..8].try_into().ok()?);
        let btf = Btf::parse(btf_by_id(btf_id)?).ok()?;
        btf.name_of(type_id).map(str::to_owned)
    });
    Some(full.filter(|f| f.starts_with(&short)).unwrap_or(short))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sections_map_to_kinds() {
        assert_eq!(
            ProgKind::of_section("tracepoint"),
            Some(ProgKind::Tracepoint)
        );
        assert_eq!(
            ProgKind::of_section("cgroup/sendmsg4"),
            Some(ProgKind::CgroupSendmsg4)
        );
        assert_eq!(
            ProgKind::of_section("cgroup_skb/ingress"),
            Some(ProgKind::CgroupSkbIngress)
        );
        assert_eq!(ProgKind::of_section("lsm/file_open"), Some(ProgKind::Lsm));
        assert_eq!(ProgKind::of_section("maps"), None);
        assert_eq!(ProgKind::of_section("cgroup/sock_create"), None);
    }

    #[test]
    fn instruction_encoding_matches_the_uapi_layout() {
        // r0 = 1: opcode 0xb7, dst r0, imm 1.
        assert_eq!(insn(MOV64_IMM, 0, 0, 0, 1), 0x0000_0001_0000_00b7);
        // call 158.
        assert_eq!(insn(CALL, 0, 0, 0, 158), 0x0000_009e_0000_0085);
        // r1 = -1 keeps the sign in the immediate only.
        assert_eq!(insn(MOV64_IMM, 1, 0, 0, -1), 0xffff_ffff_0000_01b7);
    }
}
