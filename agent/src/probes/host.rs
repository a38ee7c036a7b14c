//! Host prerequisites for loading the probes: privileges, mounts, memlock. Each missing
//! prerequisite is one clear line, not an errno from deep inside the loader.

use std::{
    ffi::CString,
    fs,
    path::{Path, PathBuf},
};

use anyhow::{Context, Result, bail};
use tracing::{info, warn};

const CAP_SYS_ADMIN: u32 = 21;
const CAP_PERFMON: u32 = 38;
const CAP_BPF: u32 = 39;

pub const TRACEFS: &str = "/sys/kernel/tracing";

/// Effective capability set of this process.
fn effective_caps() -> Result<u64> {
    let status = fs::read_to_string("/proc/self/status").context("reading /proc/self/status")?;
    crate::process::cap_effective(&status).context("/proc/self/status has no CapEff line")
}

/// The oldest kernel the probes load on: they read task fields through
/// bpf_get_current_task_btf (5.11). Refused up front with the reason, not with a verifier
/// message about an unknown helper.
const MIN_KERNEL: (u32, u32) = (5, 11);

pub fn check_kernel() -> Result<()> {
    // SAFETY: uname fills the struct it is given.
    let mut u: libc::utsname = unsafe { std::mem::zeroed() };
    if unsafe { libc::uname(&mut u) } != 0 {
        return Ok(());
    }
    let release: String = u
        .release
        .iter()
        .take_while(|&&c| c != 0)
        .map(|&c| c as u8 as char)
        .collect();
    let mut nums = release
        .split(|c: char| !c.is_ascii_digit())
        .filter_map(|n| n.parse::<u32>().ok());
    let (major, minor) = (nums.next().unwrap_or(0), nums.next().unwrap_or(0));
    if (major, minor) < MIN_KERNEL {
        bail!(
            "kernel {release} is too old: credwatch's probes need Linux {}.{} or newer \
             (bpf_get_current_task_btf)",
            MIN_KERNEL.0,
            MIN_KERNEL.1
        );
    }
    Ok(())
}

pub fn check_privileges() -> Result<()> {
    let caps = effective_caps()?;
    let has = |c: u32| caps & (1u64 << c) != 0;
    if has(CAP_SYS_ADMIN) || (has(CAP_BPF) && has(CAP_PERFMON)) {
        return Ok(());
    }
    bail!(
        "loading probes needs CAP_BPF and CAP_PERFMON (or CAP_SYS_ADMIN); this process has \
         CapEff={caps:#x}. Run as root or grant the capabilities (see deploy/)."
    )
}

/// Tracepoints attach through tracefs; mount it where the kernel expects it if absent.
pub fn ensure_tracefs() -> Result<()> {
    if Path::new(TRACEFS).join("events").is_dir() {
        return Ok(());
    }
    mount("tracefs", TRACEFS, "tracefs")
        .with_context(|| format!("tracefs is not mounted and mounting it at {TRACEFS} failed"))?;
    info!("mounted tracefs at {TRACEFS}");
    Ok(())
}

/// The cgroup2 hierarchy: `/sys/fs/cgroup` on pure v2 hosts, `/sys/fs/cgroup/unified` on
/// v1-hybrid hosts. Mounted at `fallback` when the host has none.
pub fn cgroup2_root(fallback: &Path) -> Result<PathBuf> {
    if let Some(p) = find_cgroup2_mount()? {
        return Ok(p);
    }
    fs::create_dir_all(fallback)
        .with_context(|| format!("creating {} for cgroup2", fallback.display()))?;
    mount("cgroup2", &fallback.to_string_lossy(), "cgroup2").with_context(|| {
        format!(
            "no cgroup2 mount found and mounting one at {} failed",
            fallback.display()
        )
    })?;
    info!("mounted cgroup2 at {}", fallback.display());
    Ok(fallback.to_path_buf())
}

pub fn find_cgroup2_mount() -> Result<Option<PathBuf>> {
    let info =
        fs::read_to_string("/proc/self/mountinfo").context("reading /proc/self/mountinfo")?;
    Ok(parse_cgroup2_mount(&info))
}

/// First cgroup2 mount point in a mountinfo listing (fields: ... mountpoint ... - fstype ...).
pub fn parse_cgroup2_mount(mountinfo: &str) -> Option<PathBuf> {
    mountinfo.lines().find_map(|line| {
        let (left, right) = line.split_once(" - ")?;
        if right.split_whitespace().next()? != "cgroup2" {
            return None;
        }
        let mount_point = left.split_whitespace().nth(4)?;
        Some(PathBuf::from(unescape_mountinfo(mount_point)))
    })
}

fn unescape_mountinfo(s: &str) -> String {
    // mountinfo escapes space, tab, newline and backslash as \ooo octal.
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\'
            && i + 3 < b.len()
            && let Ok(v) = u8::from_str_radix(&s[i + 1..i + 4], 8)
        {
            out.push(v);
            i += 4;
            continue;
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Maps and programs are charged to the memory cgroup on 5.11+; the rlimit only matters on
/// older kernels, so failing to raise it is a warning.
pub fn raise_memlock() {
    let rlim = libc::rlimit {
        rlim_cur: libc::RLIM_INFINITY,
        rlim_max: libc::RLIM_INFINITY,
    };
    // SAFETY: plain syscall with a valid struct.
    if unsafe { libc::setrlimit(libc::RLIMIT_MEMLOCK, &rlim) } != 0 {
        warn!(
            "could not raise RLIMIT_MEMLOCK ({}); fine on kernels ≥ 5.11 which account BPF memory \
             to the cgroup",
            std::io::Error::last_os_error()
        );
    }
}

fn mount(source: &str, target: &str, fstype: &str) -> Result<()> {
    let c = |s: &str| CString::new(s).context("mount argument contains NUL");
    let (src, tgt, ty) = (c(source)?, c(target)?, c(fstype)?);
    // SAFETY: valid NUL-terminated strings; no data argument.
    let rc = unsafe { libc::mount(src.as_ptr(), tgt.as_ptr(), ty.as_ptr(), 0, std::ptr::null()) };
    if rc != 0 {
        return Err(std::io::Error::last_os_error().into());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_cgroup2_in_hybrid_and_pure_layouts() {
        let hybrid = "30 25 0:26 / /sys/fs/cgroup rw - tmpfs tmpfs rw\n\
                      35 30 0:30 / /sys/fs/cgroup/unified rw,nosuid - cgroup2 cgroup2 rw\n";
        assert_eq!(
            parse_cgroup2_mount(hybrid),
            Some(PathBuf::from("/sys/fs/cgroup/unified"))
        );
        let pure = "29 1 0:26 / /sys/fs/cgroup rw shared:4 - cgroup2 cgroup2 rw,nsdelegate\n";
        assert_eq!(
            parse_cgroup2_mount(pure),
            Some(PathBuf::from("/sys/fs/cgroup"))
        );
        let escaped = "29 1 0:26 / /mnt/with\\040space rw - cgroup2 cgroup2 rw\n";
        assert_eq!(
            parse_cgroup2_mount(escaped),
            Some(PathBuf::from("/mnt/with space"))
        );
        assert_eq!(
            parse_cgroup2_mount("29 1 0:26 / /x rw - ext4 /dev/vda rw\n"),
            None
        );
    }
}
