//! Process table: who each tgid is (executable, lineage, terminal, credentials), kept from
//! exec/exit records and filled lazily from /proc for processes that predate the agent.
//!
//! Forks are not traced: every record carries the parent's tgid, and a child that never
//! exec'd inherits its parent's executable and terminal here.

use std::{fs, path::PathBuf};

use foldhash::{HashMap, HashMapExt};

use crate::event::sanitize;

#[derive(Clone, Debug, Default)]
pub struct ProcEntry {
    pub tgid: u32,
    pub ppid: u32,
    pub uid: u32,
    pub euid: u32,
    pub comm: String,
    pub exe: String,
    pub tty: Option<String>,
    pub cap_effective: u64,
    /// cgroup v2 id, from the process's latest record (0 until one is seen).
    pub cgroup_id: u64,
    /// Boot-time ns of the exit, once seen; the entry is evicted a grace period later.
    pub exited_ns: Option<u64>,
    /// What `session_of` found, and under which parent: the ancestry walk (and the /proc
    /// read a container's processes need) then runs once per process, not once per secret
    /// read. A reparented process is asked again.
    session: Option<(u32, Option<String>)>,
}

pub struct ProcessTable {
    procs: HashMap<u32, ProcEntry>,
    proc_root: PathBuf,
    max_entries: usize,
    /// Live processes evicted to make room (a fork flood filled the table), ever.
    dropped: u64,
}

/// How long an exited process stays resolvable (late records from the same drain batch).
const EXIT_GRACE_NS: u64 = 5_000_000_000;

impl ProcessTable {
    pub fn new(proc_root: impl Into<PathBuf>, max_entries: usize) -> Self {
        ProcessTable {
            procs: HashMap::new(),
            proc_root: proc_root.into(),
            max_entries: max_entries.max(1),
            dropped: 0,
        }
    }

    /// Live processes evicted because the table was full.
    pub fn dropped(&self) -> u64 {
        self.dropped
    }

    pub fn len(&self) -> usize {
        self.procs.len()
    }

    pub fn is_empty(&self) -> bool {
        self.procs.is_empty()
    }

    pub fn get(&self, tgid: u32) -> Option<&ProcEntry> {
        self.procs.get(&tgid)
    }

    /// Loads every process that exists now. Run once the probes are attached: anything
    /// that starts later is seen by them.
    pub fn bootstrap(&mut self) -> usize {
        let Ok(dir) = fs::read_dir(&self.proc_root) else {
            return 0;
        };
        let pids: Vec<u32> = dir
            .filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
            .collect();
        for pid in pids {
            if !self.procs.contains_key(&pid)
                && let Some(e) = self.read_proc(pid)
            {
                self.insert(e);
            }
        }
        self.procs.len()
    }

    /// The entry for `tgid`. A process not yet in the table started after the bootstrap:
    /// fork gave it its parent's credentials, executable and terminal, which is its state
    /// before the record at hand. Its own /proc entry would show a later state (after the
    /// exec or setuid being reported), so it is only the fallback for an unknown parent.
    pub fn lookup(&mut self, tgid: u32, ppid: u32, comm: &str) -> &mut ProcEntry {
        if !self.procs.contains_key(&tgid) {
            let entry = self
                .inherit(tgid, ppid, comm)
                .or_else(|| self.read_proc(tgid))
                .unwrap_or_else(|| ProcEntry {
                    tgid,
                    ppid,
                    uid: u32::MAX,
                    euid: u32::MAX,
                    comm: comm.to_owned(),
                    ..Default::default()
                });
            self.make_room();
            self.procs.insert(tgid, entry);
        }
        // Present: found, or inserted just above (make_room leaves space for one).
        let e = self.procs.entry(tgid).or_default();
        if e.ppid == 0 {
            e.ppid = ppid;
        }
        e
    }

    /// Stores `entry`, never growing past `max_entries`.
    fn insert(&mut self, entry: ProcEntry) {
        if !self.procs.contains_key(&entry.tgid) {
            self.make_room();
        }
        self.procs.insert(entry.tgid, entry);
    }

    /// Frees one slot when the table is full: exited processes first; in a fork flood of
    /// live ones, some live process (its later records are resolved from /proc again) —
    /// counted, never a panic or an unbounded table.
    fn make_room(&mut self) {
        if self.procs.len() < self.max_entries {
            return;
        }
        self.evict_exited(u64::MAX);
        while self.procs.len() >= self.max_entries {
            let Some(victim) = self.procs.keys().next().copied() else {
                break;
            };
            self.procs.remove(&victim);
            self.dropped += 1;
        }
    }

    /// A forked child that has not exec'd runs its parent's image.
    fn inherit(&mut self, tgid: u32, ppid: u32, comm: &str) -> Option<ProcEntry> {
        if ppid == 0 {
            return None;
        }
        let parent = match self.procs.get(&ppid) {
            Some(p) => p.clone(),
            None => {
                let p = self.read_proc(ppid)?;
                self.insert(p.clone());
                p
            }
        };
        Some(ProcEntry {
            tgid,
            ppid,
            uid: parent.uid,
            euid: parent.euid,
            comm: comm.to_owned(),
            exe: parent.exe,
            tty: parent.tty,
            cap_effective: parent.cap_effective,
            cgroup_id: parent.cgroup_id,
            exited_ns: None,
            session: None,
        })
    }

    fn read_proc(&self, tgid: u32) -> Option<ProcEntry> {
        let dir = self.proc_root.join(tgid.to_string());
        let stat = fs::read(dir.join("stat")).ok()?;
        let (comm, ppid, tty_nr) = parse_stat(&stat)?;
        let status = fs::read_to_string(dir.join("status")).unwrap_or_default();
        let ids = |key: &str| -> Option<(u32, u32)> {
            let line = status.lines().find(|l| l.starts_with(key))?;
            let mut it = line[key.len()..]
                .split_whitespace()
                .map(|v| v.parse::<u32>().ok());
            Some((it.next()??, it.next()??))
        };
        let (uid, euid) = ids("Uid:").unwrap_or((u32::MAX, u32::MAX));
        let cap_effective = cap_effective(&status).unwrap_or(0);
        let exe = fs::read_link(dir.join("exe"))
            .map(|p| lexically_normal(&sanitize(p.as_os_str().as_encoded_bytes())))
            .unwrap_or_default();
        Some(ProcEntry {
            tgid,
            ppid,
            uid,
            euid,
            comm,
            exe,
            tty: tty_name(tty_nr),
            cap_effective,
            cgroup_id: 0,
            exited_ns: None,
            session: None,
        })
    }

    /// The interactive session a process descends from, if any:
    /// - an SSH login: an ancestor is `sshd-session` (OpenSSH ≥ 9.8) or an `sshd` forked by
    ///   `sshd` (older per-connection processes; the listening daemon has another parent);
    /// - a container exec (`kubectl exec`, `crictl exec`, `docker exec`): an ancestor is a
    ///   direct child of the container runtime's shim but not the container's init (pid 1
    ///   in its own pid namespace) — the init is the shim's only other kind of child.
    ///
    /// A tty already says "a human"; this also catches `ssh node cat …` and `kubectl exec`
    /// without `-t`, which have none. Ancestors unknown to the table are read from /proc.
    pub fn session_of(&mut self, tgid: u32) -> Option<String> {
        let e = self.procs.get(&tgid)?;
        let ppid = e.ppid;
        if let Some((under, found)) = &e.session
            && *under == ppid
        {
            return found.clone();
        }
        let found = self.find_session(tgid);
        if let Some(e) = self.procs.get_mut(&tgid) {
            e.session = Some((ppid, found.clone()));
        }
        found
    }

    fn find_session(&mut self, tgid: u32) -> Option<String> {
        let mut child = self.procs.get(&tgid)?.clone();
        for _ in 0..64 {
            if child.ppid <= 1 {
                return None;
            }
            let parent = self.entry(child.ppid)?;
            let name = basename(&parent.exe);
            let ssh = name == "sshd-session"
                || (name == "sshd"
                    && self
                        .entry(parent.ppid)
                        .is_some_and(|p| basename(&p.exe) == "sshd"));
            if ssh {
                return Some(format!("ssh (sshd pid {})", parent.tgid));
            }
            if is_runtime_shim(name)
                && self
                    .ns_pid(child.tgid)
                    .is_some_and(|(levels, inner)| levels > 1 && inner != 1)
            {
                return Some(format!(
                    "container exec (pid {} started by {name})",
                    child.tgid
                ));
            }
            child = parent;
        }
        None
    }

    fn entry(&mut self, tgid: u32) -> Option<ProcEntry> {
        if let Some(e) = self.procs.get(&tgid) {
            return Some(e.clone());
        }
        let e = self.read_proc(tgid)?;
        self.insert(e.clone());
        Some(e)
    }

    /// (pid namespace levels, pid in the innermost one) from `NSpid:` in /proc status.
    fn ns_pid(&self, tgid: u32) -> Option<(usize, u32)> {
        let status =
            fs::read_to_string(self.proc_root.join(tgid.to_string()).join("status")).ok()?;
        let line = status.lines().find_map(|l| l.strip_prefix("NSpid:"))?;
        let pids: Vec<u32> = line
            .split_whitespace()
            .filter_map(|p| p.parse().ok())
            .collect();
        Some((pids.len(), *pids.last()?))
    }

    pub fn mark_exited(&mut self, tgid: u32, now_ns: u64) {
        if let Some(e) = self.procs.get_mut(&tgid) {
            e.exited_ns = Some(now_ns);
        }
    }

    /// Drops processes that exited more than the grace period before `now_ns`.
    pub fn evict_exited(&mut self, now_ns: u64) {
        self.procs.retain(|_, e| {
            e.exited_ns
                .is_none_or(|t| now_ns.saturating_sub(t) < EXIT_GRACE_NS)
        });
    }
}

impl ProcessTable {
    /// The executable a process just exec'd, as named by the record: the name the caller
    /// passed to execve, normalized lexically (`.`, `..`, `//`), so `/opt/tools/../../tmp/x`
    /// is `/tmp/x` and a name that leaves a directory never looks as if it were inside it.
    /// Not `/proc/<pid>/exe`: by the time the record is read the process may have exec'd
    /// again (`env VAR=… prog`, `sh -c 'exec prog'` do so at once) and that link would name
    /// the next image. Symlinks are not resolved (the kernel followed them; a link inside a
    /// directory a selector names is that directory owner's choice), and a relative name
    /// stays relative, so it never matches a `host:` selector's absolute path. Processes
    /// read from /proc (`read_proc`) are named by the kernel's canonical link.
    pub fn exec_name(filename: &str) -> String {
        lexically_normal(filename)
    }
}

/// `p` with `.` and empty components dropped and `..` applied to what precedes it (an
/// absolute path cannot go above `/`). Relative paths stay relative.
pub fn lexically_normal(p: &str) -> String {
    if !p.contains("/.") && !p.contains("//") && !p.starts_with("./") && p != "." {
        return p.to_owned();
    }
    let absolute = p.starts_with('/');
    let mut parts: Vec<&str> = Vec::new();
    for c in p.split('/') {
        match c {
            "" | "." => {}
            ".." => {
                if parts.last().is_some_and(|l| *l != "..") {
                    parts.pop();
                } else if !absolute {
                    parts.push("..");
                }
            }
            c => parts.push(c),
        }
    }
    let joined = parts.join("/");
    if absolute {
        format!("/{joined}")
    } else if joined.is_empty() {
        ".".to_owned()
    } else {
        joined
    }
}

/// The cgroup v2 id of a process: its `/proc/<pid>/cgroup` path (`0::/…`) under the
/// cgroup2 mount, whose directory inode is the id.
pub fn cgroup_id_of(cgroup2_root: &std::path::Path, pid: u32) -> Option<u64> {
    use std::os::unix::fs::MetadataExt;
    let text = fs::read_to_string(format!("/proc/{pid}/cgroup")).ok()?;
    let path = text.lines().find_map(|l| l.strip_prefix("0::"))?;
    let rel = path.trim_start_matches('/');
    if rel.split('/').any(|c| c == "..") {
        return None;
    }
    fs::metadata(cgroup2_root.join(rel)).ok().map(|m| m.ino())
}

/// The process still exists (a zombie counts: its exit has not been reaped).
pub fn is_alive(tgid: u32) -> bool {
    // 0 and negative pids name process groups, not a process.
    let Ok(pid @ 1..) = libc::pid_t::try_from(tgid) else {
        return false;
    };
    // SAFETY: signal 0 only checks that the process exists.
    let r = unsafe { libc::kill(pid, 0) };
    r == 0 || std::io::Error::last_os_error().raw_os_error() == Some(libc::EPERM)
}

/// The effective capability set from a `/proc/<pid>/status` text (`CapEff:` in hex).
pub fn cap_effective(status: &str) -> Option<u64> {
    let hex = status.lines().find_map(|l| l.strip_prefix("CapEff:"))?;
    u64::from_str_radix(hex.trim(), 16).ok()
}

fn basename(exe: &str) -> &str {
    exe.rsplit('/').next().unwrap_or(exe)
}

/// The per-container processes of containerd, CRI-O and podman that start a container's
/// init and every exec into it.
fn is_runtime_shim(name: &str) -> bool {
    name.starts_with("containerd-shim") || name == "conmon" || name == "conmon-rs"
}

/// (comm, ppid, tty_nr) from /proc/<pid>/stat. comm is parenthesised and may itself contain
/// spaces and parentheses, so split at the last ')'.
pub fn parse_stat(stat: &[u8]) -> Option<(String, u32, u32)> {
    let open = stat.iter().position(|&b| b == b'(')?;
    let close = stat.iter().rposition(|&b| b == b')')?;
    if close < open {
        return None;
    }
    let comm = sanitize(&stat[open + 1..close]);
    let rest = std::str::from_utf8(stat.get(close + 1..)?).ok()?;
    let mut f = rest.split_whitespace();
    let _state = f.next()?;
    let ppid = f.next()?.parse().ok()?;
    let _pgrp = f.next()?;
    let _session = f.next()?;
    let tty_nr: u32 = f.next()?.parse::<i64>().ok()? as u32;
    Some((comm, ppid, tty_nr))
}

/// The kernel names pseudo-terminals `pts0` (tty_struct.name); /proc and users say `pts/0`.
pub fn kernel_tty_name(name: &str) -> String {
    match name.strip_prefix("pts") {
        Some(n) if !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()) => format!("pts/{n}"),
        _ => name.to_owned(),
    }
}

/// Device number → terminal name, for the common terminal majors.
pub fn tty_name(tty_nr: u32) -> Option<String> {
    if tty_nr == 0 {
        return None;
    }
    let major = (tty_nr >> 8) & 0xfff;
    let minor = (tty_nr & 0xff) | ((tty_nr >> 12) & 0xfff00);
    Some(match major {
        136..=143 => format!("pts/{}", (major - 136) * 256 + minor),
        4 if minor < 64 => format!("tty{minor}"),
        4 => format!("ttyS{}", minor - 64),
        _ => format!("tty({major}:{minor})"),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stat_with_hostile_comm() {
        let stat = b"4711 (a) b (c)) S 1 4711 4711 34816 4711 4194304 ...";
        let (comm, ppid, tty) = parse_stat(stat).unwrap();
        assert_eq!(comm, "a) b (c)");
        assert_eq!(ppid, 1);
        assert_eq!(tty_name(tty).as_deref(), Some("pts/0"));
        assert_eq!(kernel_tty_name("pts12"), "pts/12");
        assert_eq!(kernel_tty_name("tty1"), "tty1");
        assert!(parse_stat(b"garbage").is_none());
        assert!(parse_stat(b"1 )( S").is_none());
    }

    #[test]
    fn unknown_child_inherits_parent_image() {
        let mut t = ProcessTable::new("/nonexistent-proc", 16);
        t.insert(ProcEntry {
            tgid: 100,
            ppid: 1,
            exe: "/usr/bin/python3".into(),
            tty: Some("pts/1".into()),
            ..Default::default()
        });
        let child = t.lookup(101, 100, "worker").clone();
        assert_eq!(child.exe, "/usr/bin/python3");
        assert_eq!(child.tty.as_deref(), Some("pts/1"));
        assert_eq!(child.comm, "worker");
    }

    /// The record is processed after the process already changed (setuid + set-uid exec):
    /// its /proc entry shows the later state, the parent's shows the state before.
    #[test]
    fn new_process_starts_from_its_parent_not_its_later_proc_state() {
        let root = tempfile::tempdir().unwrap();
        let write = |pid: u32, ppid: u32, uid: &str| {
            let d = root.path().join(pid.to_string());
            fs::create_dir_all(&d).unwrap();
            fs::write(d.join("stat"), format!("{pid} (x) S {ppid} 1 1 0 -1")).unwrap();
            fs::write(d.join("status"), format!("Name:\tx\nUid:\t{uid}\n")).unwrap();
        };
        write(10, 1, "0\t0\t0\t0");
        let mut t = ProcessTable::new(root.path(), 16);
        assert_eq!(t.bootstrap(), 1);
        write(11, 10, "1000\t0\t0\t0");
        let e = t.lookup(11, 10, "child").clone();
        assert_eq!(
            (e.uid, e.euid),
            (0, 0),
            "state before the change comes from the parent"
        );
        // Unknown parent: /proc is the only source left.
        write(21, 20, "1000\t1000\t1000\t1000");
        assert_eq!(t.lookup(21, 20, "orphan").uid, 1000);
        // Nothing anywhere: unknown, not root.
        assert_eq!(t.lookup(31, 30, "ghost").uid, u32::MAX);
    }

    #[test]
    fn ssh_logins_and_container_execs_are_found_through_the_ancestry() {
        let root = tempfile::tempdir().unwrap();
        let write = |pid: u32, ppid: u32, exe: &str| {
            let d = root.path().join(pid.to_string());
            fs::create_dir_all(&d).unwrap();
            fs::write(d.join("stat"), format!("{pid} (x) S {ppid} 1 1 0 -1")).unwrap();
            fs::write(d.join("status"), "Uid:\t0\t0\t0\t0\n").unwrap();
            std::os::unix::fs::symlink(exe, d.join("exe")).unwrap();
        };
        // systemd → sshd (listener) → sshd (connection) → bash → cat, no tty anywhere.
        write(1, 0, "/usr/lib/systemd/systemd");
        write(500, 1, "/usr/sbin/sshd");
        write(600, 500, "/usr/sbin/sshd");
        write(700, 600, "/usr/bin/bash");
        write(800, 700, "/usr/bin/cat");
        // OpenSSH ≥ 9.8 names the per-connection process.
        write(610, 500, "/usr/lib/openssh/sshd-session");
        write(810, 610, "/usr/bin/cat");
        // A service started by systemd, and the listener's own helper: not sessions.
        write(900, 1, "/usr/bin/backup");
        write(910, 500, "/usr/bin/cat");
        // A pod: shim → container init (pid 1 inside) → app; and an exec into it
        // (`kubectl exec` without -t): shim → sh (pid 7 inside) → cat.
        write(2000, 1, "/usr/bin/containerd-shim-runc-v2");
        write(2001, 2000, "/app/server");
        write(2002, 2001, "/usr/bin/cat");
        write(2100, 2000, "/bin/sh");
        write(2101, 2100, "/usr/bin/cat");
        let nspid = |pid: u32, inner: u32| {
            fs::write(
                root.path().join(pid.to_string()).join("status"),
                format!("Uid:\t0\t0\t0\t0\nNSpid:\t{pid}\t{inner}\n"),
            )
            .unwrap();
        };
        nspid(2001, 1);
        nspid(2002, 12);
        nspid(2100, 7);
        nspid(2101, 8);
        let mut t = ProcessTable::new(root.path(), 64);
        t.bootstrap();
        assert_eq!(
            t.session_of(2101).as_deref(),
            Some("container exec (pid 2100 started by containerd-shim-runc-v2)")
        );
        assert_eq!(t.session_of(2002), None, "the container's own processes");
        assert_eq!(t.session_of(2001), None);
        assert_eq!(t.session_of(800).as_deref(), Some("ssh (sshd pid 600)"));
        assert_eq!(t.session_of(810).as_deref(), Some("ssh (sshd pid 610)"));
        assert_eq!(t.session_of(900), None);
        assert_eq!(t.session_of(910), None);
    }

    /// A fork flood fills the table with live processes: it stays bounded and never panics
    /// (it used to `expect` a slot it had no room for).
    #[test]
    fn a_full_table_of_live_processes_evicts_instead_of_panicking() {
        let mut t = ProcessTable::new("/nonexistent-proc", 16);
        for tgid in 1000..101_000 {
            let e = t.lookup(tgid, 999, "forker");
            assert_eq!(e.tgid, tgid);
            e.exe = "/usr/bin/forker".into();
        }
        assert!(t.len() <= 16, "{}", t.len());
        assert_eq!(t.dropped(), 100_000 - 16);
        // The newest process is always there.
        assert_eq!(t.get(100_999).unwrap().exe, "/usr/bin/forker");
    }

    #[test]
    fn exec_names_are_canonical() {
        assert_eq!(lexically_normal("/opt/tools/../../tmp/x"), "/tmp/x");
        assert_eq!(lexically_normal("/opt/tools/./a//b"), "/opt/tools/a/b");
        assert_eq!(lexically_normal("/../../etc/x"), "/etc/x");
        assert_eq!(lexically_normal("./x"), "x");
        assert_eq!(lexically_normal("../a/../b"), "../b");
        assert_eq!(lexically_normal("/usr/bin/python3"), "/usr/bin/python3");
        // The record's name, not the process's /proc link (which may name a later image).
        assert_eq!(ProcessTable::exec_name("/usr/bin/env"), "/usr/bin/env");
        assert_eq!(ProcessTable::exec_name("/opt/tools/../../tmp/x"), "/tmp/x");
    }

    #[test]
    fn exited_processes_are_evicted_after_grace() {
        let mut t = ProcessTable::new("/nonexistent-proc", 16);
        t.lookup(5, 1, "x");
        t.mark_exited(5, 1_000);
        t.evict_exited(1_000 + EXIT_GRACE_NS / 2);
        assert!(t.get(5).is_some());
        t.evict_exited(1_000 + EXIT_GRACE_NS);
        assert!(t.get(5).is_none());
    }
}
