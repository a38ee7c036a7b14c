//! Once the probes are attached the agent gives up every capability its loop does not use.
//!
//! What the loop still does, and what that needs:
//! - reads credential files of any user to fingerprint them, walks their directories and
//!   opens cgroups by file handle (`open_by_handle_at`): `CAP_DAC_READ_SEARCH`;
//! - reads `/proc/<pid>/exe` (and `status`, `stat`) of other users' processes:
//!   `CAP_SYS_PTRACE` (ptrace read access);
//! - updates the probes' maps and reads the rings: only the map fds it already holds
//!   (kernels ≥ 6.5 check permissions when a map is created, not on each update; older ones
//!   with `kernel.unprivileged_bpf_disabled` set refuse every bpf(2) call without
//!   `CAP_BPF`, which is kept there);
//! - with `[sensors] ia32 = "on_exec"` (the default) it loads and attaches the 32-bit
//!   syscall probe when the first 32-bit program starts: until then the loop's thread keeps
//!   `CAP_BPF` and `CAP_PERFMON`, and drops them once that probe is attached.
//!
//! Loading and attaching the other programs (`CAP_BPF`, `CAP_PERFMON`, `CAP_NET_ADMIN`),
//! raising RLIMIT_MEMLOCK (`CAP_SYS_RESOURCE`), mounting tracefs/cgroup2 (`CAP_SYS_ADMIN`)
//! happen before, and so does everything else a root process may hold (`CAP_DAC_OVERRIDE`,
//! `CAP_SETUID`, …). Capabilities are per thread, and a new thread copies its creator's, so
//! this runs on the main thread before the agent starts any other, and every thread the
//! agent starts later narrows its own set on start ([`enter_thread`]): the inventory
//! scanner keeps `CAP_DAC_READ_SEARCH`, the ClickHouse writer, the alert sinks and the
//! metrics listener keep nothing, a runtime's blocking threads what the loop keeps minus the
//! BPF pair. The bounding set is cleared too when allowed (`CAP_SETPCAP`), and
//! no-new-privileges is set: nothing the agent could exec may gain anything back.

use anyhow::{Context, Result};
use caps::{CapSet, Capability, CapsHashSet};
use tracing::{debug, info};

/// What the live loop keeps on this kernel, for ever (see [`late_attach`] for the BPF pair).
pub fn needed_after_attach() -> CapsHashSet {
    let mut keep: CapsHashSet = [Capability::CAP_DAC_READ_SEARCH, Capability::CAP_SYS_PTRACE]
        .into_iter()
        .collect();
    if bpf_needs_capability() {
        keep.insert(Capability::CAP_BPF);
    }
    keep
}

/// What loading and attaching one more probe needs.
pub fn late_attach() -> CapsHashSet {
    [Capability::CAP_BPF, Capability::CAP_PERFMON]
        .into_iter()
        .collect()
}

/// The threads the agent starts, by what they do.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ThreadRole {
    /// Walks and reads credential files.
    Scanner,
    /// Talks to the network and writes its own files (ClickHouse writer, sinks, metrics).
    Network,
    /// A runtime's blocking pool (file reads, parsing).
    Blocking,
}

impl ThreadRole {
    fn keeps(self) -> CapsHashSet {
        match self {
            ThreadRole::Scanner => [Capability::CAP_DAC_READ_SEARCH].into_iter().collect(),
            ThreadRole::Network => CapsHashSet::new(),
            ThreadRole::Blocking => needed_after_attach(),
        }
    }
}

/// Narrows the calling thread's capabilities to what `role` needs (never adds any). Called
/// first thing in every thread the agent starts; a no-op for a process without
/// capabilities (replay, tests).
pub fn enter_thread(role: ThreadRole) {
    let Ok(permitted) = caps::read(None, CapSet::Permitted) else {
        return;
    };
    if permitted.is_empty() {
        return;
    }
    let keep: CapsHashSet = role.keeps().intersection(&permitted).copied().collect();
    let r = caps::set(None, CapSet::Effective, &keep)
        .and_then(|_| caps::set(None, CapSet::Permitted, &keep))
        .and_then(|_| caps::clear(None, CapSet::Inheritable));
    if let Err(e) = r {
        tracing::warn!("narrowing a {role:?} thread's capabilities: {e}");
    }
}

/// After the 32-bit probe was attached late (or can no longer be): the loop's thread drops
/// the BPF pair it kept for that.
pub fn done_attaching() {
    let Ok(permitted) = caps::read(None, CapSet::Permitted) else {
        return;
    };
    let keep = needed_after_attach();
    let mut drop_now: Vec<Capability> = late_attach()
        .into_iter()
        .filter(|c| permitted.contains(c) && !keep.contains(c))
        .collect();
    drop_now.sort_by_key(|c| c.index());
    for c in &drop_now {
        let r = caps::drop(None, CapSet::Effective, *c)
            .and_then(|_| caps::drop(None, CapSet::Permitted, *c));
        if let Err(e) = r {
            tracing::warn!("dropping {c}: {e}");
        }
    }
    if !drop_now.is_empty() {
        info!("capabilities for attaching probes dropped");
    }
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

/// Drops every capability but [`needed_after_attach`] (and [`late_attach`] when
/// `attach_later`: a probe may still be attached) from this thread (the only one yet), and
/// sets no-new-privileges. Returns what is kept.
pub fn drop_after_attach(attach_later: bool) -> Result<CapsHashSet> {
    let mut keep = needed_after_attach();
    if attach_later {
        keep.extend(late_attach());
    }
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
        assert!(ThreadRole::Network.keeps().is_empty());
        assert_eq!(ThreadRole::Scanner.keeps().len(), 1);
    }
}
