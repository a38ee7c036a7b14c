//! Once the probes are attached the agent gives up every capability its loop does not use.
//!
//! What the loop still does, and what that needs:
//! - reads credential files of any user to fingerprint them, walks their directories and
//!   opens cgroups by file handle (`open_by_handle_at`): `CAP_DAC_READ_SEARCH`;
//! - reads `/proc/<pid>/exe` (and `status`, `stat`) of other users' processes:
//!   `CAP_SYS_PTRACE` (ptrace read access);
//! - updates the probes' maps and reads the ring buffer: only the map fds it already holds
//!   (kernels ≥ 6.5 check permissions when a map is created, not on each update; older ones
//!   with `kernel.unprivileged_bpf_disabled` set refuse every bpf(2) call without
//!   `CAP_BPF`, which is kept there).
//!
//! Loading and attaching programs (`CAP_BPF`, `CAP_PERFMON`, `CAP_NET_ADMIN`), raising
//! RLIMIT_MEMLOCK (`CAP_SYS_RESOURCE`), mounting tracefs/cgroup2 (`CAP_SYS_ADMIN`) happen
//! before, and so does everything else a root process may hold (`CAP_DAC_OVERRIDE`,
//! `CAP_SETUID`, …). Capabilities are per thread and new threads copy their creator's, so
//! this runs on the main thread before the agent starts any other: scanner, writers, sinks
//! and the metrics listener all start without them. The bounding set is cleared too when
//! allowed (`CAP_SETPCAP`), and no-new-privileges is set: nothing the agent could exec may
//! gain anything back.

use anyhow::{Context, Result};
use caps::{CapSet, Capability, CapsHashSet};
use tracing::{debug, info};

/// What the live loop keeps on this kernel.
pub fn needed_after_attach() -> CapsHashSet {
    let mut keep: CapsHashSet = [Capability::CAP_DAC_READ_SEARCH, Capability::CAP_SYS_PTRACE]
        .into_iter()
        .collect();
    if bpf_needs_capability() {
        keep.insert(Capability::CAP_BPF);
    }
    keep
}

/// Kernels before 6.5 check `kernel.unprivileged_bpf_disabled` on every bpf(2) command,
/// map updates included.
fn bpf_needs_capability() -> bool {
    let disabled = std::fs::read_to_string("/proc/sys/kernel/unprivileged_bpf_disabled")
        .map(|s| s.trim() != "0")
        .unwrap_or(true);
    let old = match aya::util::KernelVersion::current() {
        Ok(v) => v < aya::util::KernelVersion::new(6, 5, 0),
        Err(_) => true,
    };
    disabled && old
}

/// Drops every capability but [`needed_after_attach`] from this thread (the only one yet),
/// and sets no-new-privileges. Returns what is kept.
pub fn drop_after_attach() -> Result<CapsHashSet> {
    let keep = needed_after_attach();
    let permitted = caps::read(None, CapSet::Permitted).context("reading capabilities")?;
    let keep: CapsHashSet = keep.intersection(&permitted).copied().collect();
    // The bounding set needs CAP_SETPCAP to change; without it (a container that was not
    // given it) the others still go.
    if permitted.contains(&Capability::CAP_SETPCAP) {
        for c in caps::all() {
            if !keep.contains(&c) && caps::has_cap(None, CapSet::Bounding, c).unwrap_or(false) {
                caps::drop(None, CapSet::Bounding, c)
                    .with_context(|| format!("dropping {c} from the bounding set"))?;
            }
        }
    } else {
        debug!("no CAP_SETPCAP: the bounding set stays as it is (no-new-privileges is set)");
    }
    caps::clear(None, CapSet::Ambient).context("clearing ambient capabilities")?;
    caps::clear(None, CapSet::Inheritable).context("clearing inheritable capabilities")?;
    caps::set(None, CapSet::Effective, &keep).context("setting effective capabilities")?;
    caps::set(None, CapSet::Permitted, &keep).context("setting permitted capabilities")?;
    // SAFETY: prctl with constant arguments.
    if unsafe { libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) } != 0 {
        return Err(std::io::Error::last_os_error()).context("setting no-new-privileges");
    }
    let mut names: Vec<String> = keep.iter().map(|c| c.to_string()).collect();
    names.sort();
    info!(kept = %names.join(","), "capabilities dropped after attach");
    Ok(keep)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_loop_keeps_file_and_proc_access_only() {
        let keep = needed_after_attach();
        assert!(keep.contains(&Capability::CAP_DAC_READ_SEARCH));
        assert!(keep.contains(&Capability::CAP_SYS_PTRACE));
        for gone in [
            Capability::CAP_SYS_ADMIN,
            Capability::CAP_DAC_OVERRIDE,
            Capability::CAP_NET_ADMIN,
            Capability::CAP_PERFMON,
            Capability::CAP_SYS_RESOURCE,
            Capability::CAP_SETUID,
        ] {
            assert!(!keep.contains(&gone), "{gone}");
        }
        assert!(keep.len() <= 3);
    }
}
