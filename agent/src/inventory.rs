//! Secret inventory: which files on this node hold credentials, by (dev, inode), with their
//! credential fingerprint and owner. Feeds the kernel's inode maps.
//!
//! Everything under a glob root can be shaped by whoever owns it (a user's home, a pod's
//! Secret volume), so the scan trusts no name it finds:
//! - every file is resolved inside the host root (`openat2` with `RESOLVE_IN_ROOT`: an
//!   absolute symlink means the host's file, never the agent's), typed by `fstat` through an
//!   `O_PATH` handle before anything opens it for reading, and read only when it is a regular
//!   file (a FIFO or device swapped in is skipped, never opened, so a scan cannot hang);
//! - a symlink is followed when its target stays in the link's own directory tree (the
//!   kubelet's `token -> ..data/token`) or belongs to the link's owner (a user's dotfiles);
//!   a link to somebody else's file (`~/.ssh/id_x -> /etc/kubernetes/pki/ca.key`) never names
//!   that file: it keeps its canonical path, type and owner, found by its own glob;
//! - an inode reachable by several paths is named once, by the most trusted of them (pod
//!   volumes, then system paths, then home directories);
//! - per-root, per-home and per-pod caps bound what one place can add, and the kernel maps
//!   are filled in the same order of trust, so a home directory full of key files cannot
//!   crowd out pod tokens.
//!
//! Scans run on a thread of their own once [`Inventory::scan_in_background`] is called: the
//! agent's loop only queues requests and applies finished results ([`Inventory::poll`]).

use std::{
    collections::{HashMap, HashSet},
    ffi::CString,
    fs,
    io::Read,
    os::{
        fd::{AsRawFd, FromRawFd, OwnedFd},
        unix::{ffi::OsStrExt, fs::MetadataExt},
    },
    path::{Path, PathBuf},
    sync::{Arc, mpsc},
    time::{Duration, Instant},
};

use anyhow::{Context, Result};
use credwatch_common::InodeKey;
use globset::{Glob, GlobBuilder, GlobSet, GlobSetBuilder};
use tracing::{debug, warn};

use crate::{
    config::{Checker, Validate, check_nonzero},
    credential::{Fingerprinter, analyze},
    event::{CredentialRef, CredentialType, Owner, OwnerSource, WorkloadId, WorkloadKind},
};

/// `[secrets]`: which files hold credentials.
#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Globs of secret files, on top of the built-in catalog.
    #[serde(default)]
    pub paths: Vec<String>,
    /// Directories whose new files are caught in the kernel before the next rescan.
    #[serde(default)]
    pub watch_dirs: Vec<String>,
    /// Watch the built-in catalog of credential locations.
    #[serde(default = "yes")]
    pub catalog: bool,
    #[serde(default = "default_rescan", with = "humantime_serde")]
    pub rescan_interval: Duration,
    /// Credentials are read at most this many bytes to fingerprint them.
    #[serde(default = "default_max_read")]
    pub max_read_bytes: u64,
    /// Where the host's `/` is visible (a container: `/proc/1/root` with hostPID);
    /// `CREDWATCH_HOST_ROOT` overrides it. Paths everywhere else stay host paths.
    pub host_root: Option<String>,
    /// At most this many secrets from one glob root (`/home`, `/etc/ssl/private`, …).
    #[serde(default = "default_max_per_root")]
    pub max_per_root: usize,
    /// At most this many secrets from one home directory (`/home/<user>`, `/root`,
    /// `/run/user/<uid>`).
    #[serde(default = "default_max_per_home")]
    pub max_per_home: usize,
    /// At most this many secrets from one pod's kubelet volumes.
    #[serde(default = "default_max_per_pod")]
    pub max_per_pod: usize,
    /// At most this many secrets in all (the kernel map holds 65 536): roots are scanned
    /// pod volumes first, home directories last.
    #[serde(default = "default_max_secrets")]
    pub max_secrets: usize,
}

fn yes() -> bool {
    true
}
fn default_rescan() -> Duration {
    Duration::from_secs(5)
}
fn default_max_read() -> u64 {
    64 << 10
}
fn default_max_per_root() -> usize {
    16384
}
fn default_max_per_home() -> usize {
    256
}
fn default_max_per_pod() -> usize {
    256
}
fn default_max_secrets() -> usize {
    65536
}

impl Default for Config {
    fn default() -> Self {
        Config {
            paths: Vec::new(),
            watch_dirs: Vec::new(),
            catalog: true,
            rescan_interval: default_rescan(),
            max_read_bytes: default_max_read(),
            host_root: None,
            max_per_root: default_max_per_root(),
            max_per_home: default_max_per_home(),
            max_per_pod: default_max_per_pod(),
            max_secrets: default_max_secrets(),
        }
    }
}

impl Validate for Config {
    fn validate(&self, c: &mut Checker) {
        for (i, g) in self.paths.iter().enumerate() {
            let key = format!("paths[{i}]");
            if !g.starts_with('/') {
                c.fail(&key, format_args!("{g:?} must be an absolute path"));
            } else if let Err(e) = Glob::new(g) {
                c.fail(&key, format_args!("bad glob {g:?}: {e}"));
            }
        }
        for (i, d) in self.watch_dirs.iter().enumerate() {
            c.check(
                d.starts_with('/'),
                &format!("watch_dirs[{i}]"),
                format_args!("{d:?} must be an absolute path"),
            );
        }
        check_nonzero(c, "rescan_interval", self.rescan_interval);
        c.check(
            self.max_read_bytes > 0,
            "max_read_bytes",
            "must be at least 1",
        );
        for (key, v) in [
            ("max_per_root", self.max_per_root),
            ("max_per_home", self.max_per_home),
            ("max_per_pod", self.max_per_pod),
            ("max_secrets", self.max_secrets),
        ] {
            c.check(v > 0, key, "must be at least 1");
        }
    }
}

/// How many secrets one place may add to the inventory.
#[derive(Clone, Copy, Debug)]
pub struct Caps {
    pub per_root: usize,
    pub per_home: usize,
    pub per_pod: usize,
    pub total: usize,
}

impl Default for Caps {
    fn default() -> Self {
        Caps {
            per_root: default_max_per_root(),
            per_home: default_max_per_home(),
            per_pod: default_max_per_pod(),
            total: default_max_secrets(),
        }
    }
}

impl Inventory {
    /// The fleet key's fingerprinter (for credentials that are not files).
    pub fn fingerprinter(&self) -> &Fingerprinter {
        &self.fp
    }

    /// The inventory `cfg` describes, with pod volumes under `kubelet_root`; the host root
    /// from `CREDWATCH_HOST_ROOT`, else `host_root`.
    pub fn from_config(cfg: &Config, kubelet_root: &str, fp: Fingerprinter) -> Result<Self> {
        let host_root = std::env::var_os("CREDWATCH_HOST_ROOT")
            .filter(|v| !v.is_empty())
            .map(PathBuf::from)
            .or_else(|| cfg.host_root.as_ref().map(PathBuf::from));
        Ok(Inventory::new(
            &cfg.paths,
            cfg.catalog,
            &cfg.watch_dirs,
            kubelet_root,
            cfg.max_read_bytes,
            fp,
        )?
        .with_caps(Caps {
            per_root: cfg.max_per_root,
            per_home: cfg.max_per_home,
            per_pod: cfg.max_per_pod,
            total: cfg.max_secrets,
        })
        .with_host_root(host_root))
    }
}

/// Built-in credential locations. `{kubelet}` is the kubelet root.
pub const CATALOG: &[&str] = &[
    "{kubelet}/pods/*/volumes/kubernetes.io~projected/*/token",
    "{kubelet}/pods/*/volumes/kubernetes.io~secret/*/*",
    "/var/run/secrets/**",
    "/run/secrets/**",
    "/etc/kubernetes/*.conf",
    "/etc/kubernetes/pki/**/*.key",
    "{kubelet}/kubeconfig",
    "{kubelet}/pki/*.key",
    "/root/.kube/config",
    "/home/*/.kube/config",
    "/root/.aws/credentials",
    "/home/*/.aws/credentials",
    "/root/.config/gcloud/application_default_credentials.json",
    "/home/*/.config/gcloud/application_default_credentials.json",
    "/root/.config/gcloud/legacy_credentials/*/adc.json",
    "/home/*/.config/gcloud/legacy_credentials/*/adc.json",
    "/root/.azure/msal_token_cache.json",
    "/home/*/.azure/msal_token_cache.json",
    "/root/.azure/accessTokens.json",
    "/home/*/.azure/accessTokens.json",
    "/root/.ssh/id_*",
    "/home/*/.ssh/id_*",
    "/etc/ssh/ssh_host_*_key",
    "/etc/ssl/private/*",
    "/etc/pki/tls/private/*",
    "/root/.docker/config.json",
    "/home/*/.docker/config.json",
    "/run/containers/*/auth.json",
    "/run/user/*/containers/auth.json",
    "/root/.vault-token",
    "/home/*/.vault-token",
    "/root/.netrc",
    "/home/*/.netrc",
    "/root/.git-credentials",
    "/home/*/.git-credentials",
    "/root/.npmrc",
    "/home/*/.npmrc",
    "/root/.pypirc",
    "/home/*/.pypirc",
];

/// Public halves and listings that live next to secrets but are not secrets.
const NOT_SECRETS: &[&str] = &["**/*.pub", "**/ca.crt", "**/namespace", "**/*.crt"];

/// How much the agent trusts the place a secret was found, most trusted first: the kernel
/// maps are filled in this order, and an inode found at several paths takes the name of
/// its most trusted one.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Rank {
    /// A projected service-account token in a kubelet pod volume.
    PodToken,
    /// Any other file in a kubelet pod volume (Secrets).
    PodVolume,
    /// Outside home directories (`/etc/kubernetes/pki`, `/etc/ssl/private`, …).
    System,
    /// In a home directory: whatever its user chose to put there.
    Home,
}

#[derive(Clone, Debug)]
pub struct SecretEntry {
    pub path: String,
    pub key: InodeKey,
    /// Shared with every event that reads it.
    pub credential: Arc<CredentialRef>,
    /// Pod uid when the file lives in a kubelet pod volume.
    pub owner_pod_uid: Option<String>,
    pub rank: Rank,
    size: u64,
    mtime_ns: i64,
}

/// What scans left out, and why (stats file and metrics). Counts are from the last full
/// scan (directory rescans add theirs).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct ScanStats {
    /// Directories a scan could not enter (missing CAP_DAC_READ_SEARCH, typically).
    pub unreadable_dirs: u64,
    /// Matching names that are not regular files (FIFOs, devices, sockets, directories).
    pub not_regular: u64,
    /// Symlinks to another user's file outside the link's own directory: not followed.
    pub symlinks_not_followed: u64,
    /// Secrets left out by `max_per_root`, `max_per_home`, `max_per_pod`.
    pub capped_per_root: u64,
    pub capped_per_home: u64,
    pub capped_per_pod: u64,
    /// Secrets left out by `max_secrets`.
    pub capped_total: u64,
    /// Directory entries a root's walk stopped at ([`WALK_MAX_ENTRIES`]).
    pub walk_truncated: u64,
}

impl ScanStats {
    fn add(&mut self, o: &ScanStats) {
        self.unreadable_dirs += o.unreadable_dirs;
        self.not_regular += o.not_regular;
        self.symlinks_not_followed += o.symlinks_not_followed;
        self.capped_per_root += o.capped_per_root;
        self.capped_per_home += o.capped_per_home;
        self.capped_per_pod += o.capped_per_pod;
        self.capped_total += o.capped_total;
        self.walk_truncated += o.walk_truncated;
    }

    fn capped(&self) -> u64 {
        self.capped_per_root + self.capped_per_home + self.capped_per_pod + self.capped_total
    }
}

/// One root's walk visits at most this many directory entries per scan.
pub const WALK_MAX_ENTRIES: u64 = 1_000_000;
/// Remembered rotated-out secrets, at most.
const MAX_RETIRED: usize = 65536;
/// Inodes seen in watched directories that are not secrets (a pod's `ca.crt`), remembered
/// so their opens do not ask for a rescan each time.
const MAX_NOT_SECRET: usize = 65536;
/// A watched directory is rescanned at most this often.
const DIR_RESCAN_EVERY: Duration = Duration::from_millis(100);

/// What one scan found.
struct ScanResult {
    /// `None`: a full scan; else the directory rescanned.
    dir: Option<PathBuf>,
    /// When the scan started.
    started: Instant,
    found: HashMap<InodeKey, SecretEntry>,
    dirs: HashMap<InodeKey, PathBuf>,
    /// Files seen that are not secrets.
    not_secret: Vec<InodeKey>,
    stats: ScanStats,
}

enum Request {
    Full,
    Dir(PathBuf),
}

/// Globs, caps and the reuse cache: everything a scan needs. Runs inline or on the scanner
/// thread.
struct Scanner {
    globs: GlobSet,
    exclude: GlobSet,
    /// (literal directory to walk, max depth) derived from the globs.
    roots: Vec<(PathBuf, usize)>,
    explicit_dirs: Vec<PathBuf>,
    kubelet_root: String,
    max_read: u64,
    fp: Fingerprinter,
    /// Where the host's `/` is visible to the agent (`/proc/1/root` in a container with
    /// hostPID); paths in globs, entries and events stay host paths.
    host_root: Option<PathBuf>,
    caps: Caps,
    /// The last results, to skip re-reading files that did not change.
    known: HashMap<InodeKey, SecretEntry>,
}

/// Per-scan bookkeeping for the caps.
#[derive(Default)]
struct Tally {
    per_home: HashMap<String, usize>,
    per_pod: HashMap<String, usize>,
    total: usize,
    stats: ScanStats,
}

enum Mode {
    Inline(Box<Scanner>),
    Thread {
        tx: mpsc::Sender<Request>,
        rx: mpsc::Receiver<ScanResult>,
    },
}

pub struct Inventory {
    /// The fleet key's (the scanner has its own copy, on its thread).
    fp: Fingerprinter,
    mode: Mode,
    by_inode: HashMap<InodeKey, SecretEntry>,
    retired: HashMap<InodeKey, (SecretEntry, Instant)>,
    watched_dirs: HashMap<InodeKey, PathBuf>,
    not_secret: HashSet<InodeKey>,
    stats: ScanStats,
    /// Requests the scanner thread has not answered yet, by when they were sent (a scan
    /// starts no earlier).
    full_pending: Option<Instant>,
    dirs_pending: HashMap<PathBuf, Instant>,
    /// When the last finished scan of each directory (and the last full scan) started: a
    /// read of a file new in a directory waits for a scan that started after the read.
    dir_scanned: HashMap<PathBuf, Instant>,
    full_scanned: Option<Instant>,
    /// Directory scans asked for since start (stats).
    pub dir_rescans: u64,
}

/// How long a rotated-out secret still names late records (it is out of the kernel map
/// at once, so no new read of it matches).
const RETIRED_GRACE: Duration = Duration::from_secs(60);

/// What asking for a directory rescan did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DirRescan {
    /// Done inline; true when the inventory changed.
    Done(bool),
    /// Queued to the scanner thread (or one is already on its way): [`Inventory::poll`]
    /// applies it.
    Queued,
}

impl Inventory {
    pub fn new(
        patterns: &[String],
        use_catalog: bool,
        watch_dirs: &[String],
        kubelet_root: &str,
        max_read: u64,
        fp: Fingerprinter,
    ) -> Result<Self> {
        let mut all: Vec<String> = patterns.to_vec();
        if use_catalog {
            all.extend(
                CATALOG
                    .iter()
                    .map(|p| p.replace("{kubelet}", kubelet_root.trim_end_matches('/'))),
            );
        }
        let mut b = GlobSetBuilder::new();
        let mut roots = Vec::new();
        for p in &all {
            // `*` stays within one path component; `**` crosses them.
            let glob = GlobBuilder::new(p).literal_separator(true).build();
            b.add(glob.with_context(|| format!("bad secret glob {p:?}"))?);
            roots.push(walk_root(p));
        }
        let mut ex = GlobSetBuilder::new();
        for p in NOT_SECRETS {
            ex.add(Glob::new(p).expect("static glob"));
        }
        // Most trusted places first, so `max_secrets` leaves out home directories before
        // pod volumes.
        let kubelet = kubelet_root.trim_end_matches('/');
        let mut roots = merge_roots(roots);
        roots.sort_by_key(|(r, _)| {
            let r = r.to_string_lossy();
            if Path::new(&*r).starts_with(kubelet) {
                0
            } else if home_of(&r).is_some() || r == "/home" || r == "/run/user" {
                2
            } else {
                1
            }
        });
        let scanner = Scanner {
            globs: b.build()?,
            exclude: ex.build()?,
            roots,
            explicit_dirs: watch_dirs.iter().map(PathBuf::from).collect(),
            kubelet_root: kubelet_root.trim_end_matches('/').to_owned(),
            max_read,
            fp: fp.clone(),
            host_root: None,
            caps: Caps::default(),
            known: HashMap::new(),
        };
        Ok(Inventory {
            fp,
            mode: Mode::Inline(Box::new(scanner)),
            by_inode: HashMap::new(),
            retired: HashMap::new(),
            watched_dirs: HashMap::new(),
            not_secret: HashSet::new(),
            stats: ScanStats::default(),
            full_pending: None,
            dirs_pending: HashMap::new(),
            dir_scanned: HashMap::new(),
            full_scanned: None,
            dir_rescans: 0,
        })
    }

    fn scanner_mut(&mut self) -> Option<&mut Scanner> {
        match &mut self.mode {
            Mode::Inline(s) => Some(s),
            Mode::Thread { .. } => None,
        }
    }

    /// Where host path `p` really is (symlinks resolved inside the host root, as scans
    /// resolve them), if it exists. Before [`Self::scan_in_background`] only.
    pub fn real_path(&mut self, p: &Path) -> Option<PathBuf> {
        let s = self.scanner_mut()?;
        let root = s.root_fd().ok()?;
        s.resolve(&root, p).ok().map(|r| r.canonical)
    }

    /// Reads the host's files under `root` (see [`Scanner::host_root`]).
    pub fn with_host_root(mut self, root: Option<PathBuf>) -> Self {
        if let Some(s) = self.scanner_mut() {
            s.host_root = root.filter(|r| r != Path::new("/"));
        }
        self
    }

    pub fn with_caps(mut self, caps: Caps) -> Self {
        if let Some(s) = self.scanner_mut() {
            s.caps = caps;
        }
        self
    }

    /// From now on scans run on a thread of their own: [`Self::rescan`] and
    /// [`Self::rescan_dir`] queue requests, [`Self::poll`] applies what is done.
    pub fn scan_in_background(&mut self) -> Result<()> {
        let Mode::Inline(_) = &self.mode else {
            return Ok(());
        };
        let (req_tx, req_rx) = mpsc::channel::<Request>();
        let (res_tx, res_rx) = mpsc::channel::<ScanResult>();
        let Mode::Inline(mut scanner) = std::mem::replace(
            &mut self.mode,
            Mode::Thread {
                tx: req_tx,
                rx: res_rx,
            },
        ) else {
            unreachable!("checked above")
        };
        std::thread::Builder::new()
            .name("inventory".into())
            .spawn(move || {
                crate::privileges::enter_thread(crate::privileges::ThreadRole::Scanner);
                while let Ok(first) = req_rx.recv() {
                    // Coalesce what queued up meanwhile: one full scan covers every
                    // directory, each directory once.
                    let mut full = false;
                    let mut dirs: Vec<PathBuf> = Vec::new();
                    for r in std::iter::once(first).chain(req_rx.try_iter()) {
                        match r {
                            Request::Full => full = true,
                            Request::Dir(d) if !dirs.contains(&d) => dirs.push(d),
                            Request::Dir(_) => {}
                        }
                    }
                    let mut out = Vec::new();
                    if full {
                        out.push(scanner.scan_full());
                    }
                    for d in dirs {
                        out.push(scanner.scan_dir(&d));
                    }
                    for r in out {
                        if res_tx.send(r).is_err() {
                            return;
                        }
                    }
                }
            })
            .context("starting the inventory scanner")?;
        Ok(())
    }

    pub fn len(&self) -> usize {
        self.by_inode.len()
    }

    pub fn is_empty(&self) -> bool {
        self.by_inode.is_empty()
    }

    pub fn stats(&self) -> ScanStats {
        self.stats
    }

    /// The secret at `key`, including one rotated out less than [`RETIRED_GRACE`] ago: a
    /// read that happened just before a rotation is still in the ring when the rescan that
    /// notices the rotation runs.
    pub fn get(&self, key: &InodeKey) -> Option<&SecretEntry> {
        self.by_inode
            .get(key)
            .or_else(|| self.retired.get(key).map(|(e, _)| e))
    }

    /// A file a scan of a watched directory saw and found not to be a secret.
    pub fn is_known_not_secret(&self, key: &InodeKey) -> bool {
        self.not_secret.contains(key)
    }

    pub fn entries(&self) -> impl Iterator<Item = &SecretEntry> {
        self.by_inode.values()
    }

    pub fn file_keys(&self) -> HashSet<InodeKey> {
        self.by_inode.keys().copied().collect()
    }

    /// Every secret's key, most trusted first (pod tokens, pod volumes, system, homes; by
    /// path within a rank): the order the kernel map is filled in.
    pub fn file_keys_ranked(&self) -> Vec<InodeKey> {
        let mut v: Vec<&SecretEntry> = self.by_inode.values().collect();
        v.sort_by(|a, b| (a.rank, &a.path).cmp(&(b.rank, &b.path)));
        v.into_iter().map(|e| e.key).collect()
    }

    pub fn dir_keys(&self) -> HashSet<InodeKey> {
        self.watched_dirs.keys().copied().collect()
    }

    /// Watched directories, pod volumes first.
    pub fn dir_keys_ranked(&self) -> Vec<InodeKey> {
        let mut v: Vec<(&InodeKey, &PathBuf)> = self.watched_dirs.iter().collect();
        v.sort_by(|a, b| a.1.cmp(b.1));
        v.into_iter().map(|(k, _)| *k).collect()
    }

    pub fn watched_dir(&self, key: &InodeKey) -> Option<&Path> {
        self.watched_dirs.get(key).map(PathBuf::as_path)
    }

    /// True while the scanner thread has requests it has not answered.
    pub fn busy(&self) -> bool {
        self.full_pending.is_some() || !self.dirs_pending.is_empty()
    }

    /// True when a scan of `dir` (or a full scan) that started at or after `since` has
    /// been applied: a file that was there at `since` is known now, if it is a secret.
    pub fn scanned_since(&self, dir: &Path, since: Instant) -> bool {
        self.full_scanned.is_some_and(|t| t >= since)
            || self.dir_scanned.get(dir).is_some_and(|t| *t >= since)
    }

    /// Full rescan of every glob root. Inline: done now, true when the inode sets changed.
    /// On the scanner thread: queued, false (see [`Self::poll`]).
    pub fn rescan(&mut self) -> bool {
        match &mut self.mode {
            Mode::Inline(s) => {
                let r = s.scan_full();
                self.apply(r)
            }
            Mode::Thread { tx, .. } => {
                if self.full_pending.is_none() && tx.send(Request::Full).is_ok() {
                    self.full_pending = Some(Instant::now());
                }
                false
            }
        }
    }

    /// Rescans one watched directory after the kernel saw an unknown file open in it:
    /// inline now, or queued to the scanner thread ([`Self::want_dir`] from now on).
    pub fn rescan_dir(&mut self, dir: &Path) -> DirRescan {
        match &mut self.mode {
            Mode::Inline(s) => {
                self.dir_rescans += 1;
                let r = s.scan_dir(dir);
                DirRescan::Done(self.apply(r))
            }
            Mode::Thread { .. } => {
                self.want_dir(dir, Instant::now());
                DirRescan::Queued
            }
        }
    }

    /// Makes sure a scan of `dir` that starts at or after `since` is on its way (unless one
    /// was applied already). Rate-limited: a directory somebody keeps filling with new names
    /// is scanned at most every [`DIR_RESCAN_EVERY`]; callers ask again until
    /// [`Self::scanned_since`] says yes.
    pub fn want_dir(&mut self, dir: &Path, since: Instant) {
        if self.scanned_since(dir, since)
            || self.full_pending.is_some_and(|t| t >= since)
            || self.dirs_pending.get(dir).is_some_and(|t| *t >= since)
        {
            return;
        }
        let now = Instant::now();
        let recent = self
            .dir_scanned
            .get(dir)
            .is_some_and(|t| now.duration_since(*t) < DIR_RESCAN_EVERY)
            || self.dirs_pending.contains_key(dir);
        if recent {
            return;
        }
        if let Mode::Thread { tx, .. } = &self.mode
            && tx.send(Request::Dir(dir.to_path_buf())).is_ok()
        {
            // Counted when a scan is really asked for: the misses that arrive while it is
            // on its way wait for the same one.
            self.dir_rescans += 1;
            if self.dirs_pending.len() >= MAX_RETIRED {
                self.dirs_pending.clear();
            }
            self.dirs_pending.insert(dir.to_path_buf(), now);
        }
    }

    /// Applies what the scanner thread finished. Returns true when the inventory's inode
    /// sets changed (the kernel maps need a sync).
    pub fn poll(&mut self) -> bool {
        let mut results = Vec::new();
        if let Mode::Thread { rx, .. } = &self.mode {
            results.extend(rx.try_iter());
        }
        let mut changed = false;
        for r in results {
            changed |= self.apply(r);
        }
        changed
    }

    /// Blocks until the scanner thread answered every request, at most `timeout`. True when
    /// it did. (Start-up and tests; the agent's loop uses [`Self::poll`].)
    pub fn wait_idle(&mut self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        while self.busy() {
            let Mode::Thread { rx, .. } = &self.mode else {
                return true;
            };
            let left = deadline.saturating_duration_since(Instant::now());
            match rx.recv_timeout(left) {
                Ok(r) => {
                    self.apply(r);
                }
                Err(_) => return false,
            }
        }
        true
    }

    fn apply(&mut self, r: ScanResult) -> bool {
        let before_files = self.file_keys();
        let before_dirs = self.dir_keys();
        if self.not_secret.len() + r.not_secret.len() > MAX_NOT_SECRET {
            self.not_secret.clear();
        }
        match &r.dir {
            None => {
                self.full_pending = None;
                self.full_scanned = Some(r.started);
                self.stats = r.stats;
                self.not_secret.extend(r.not_secret.iter().copied());
                let old = std::mem::replace(&mut self.by_inode, r.found);
                self.retire(old);
                self.watched_dirs = r.dirs;
            }
            Some(dir) => {
                if self
                    .dirs_pending
                    .get(dir)
                    .is_some_and(|sent| *sent <= r.started)
                {
                    self.dirs_pending.remove(dir);
                }
                if self.dir_scanned.len() >= MAX_RETIRED {
                    self.dir_scanned.clear();
                }
                let t = self.dir_scanned.entry(dir.clone()).or_insert(r.started);
                *t = (*t).max(r.started);
                self.stats.add(&r.stats);
                self.not_secret.extend(r.not_secret.iter().copied());
                let gone = replace_under(&mut self.by_inode, dir, r.found);
                self.retire(gone);
                self.watched_dirs.extend(r.dirs);
            }
        }
        for k in self.by_inode.keys() {
            self.not_secret.remove(k);
        }
        let capped = self.stats.capped();
        if capped > 0 && r.dir.is_none() {
            warn!(
                left_out = capped,
                per_root = self.stats.capped_per_root,
                per_home = self.stats.capped_per_home,
                per_pod = self.stats.capped_per_pod,
                "secret inventory caps reached: some files are not watched ([secrets] max_per_root, \
                 max_per_home, max_per_pod)"
            );
        }
        if self.stats.unreadable_dirs > 0 && r.dir.is_none() {
            warn!(
                directories = self.stats.unreadable_dirs,
                "secret scan could not enter some directories (permission denied): secrets there \
                 are not watched; the agent needs CAP_DAC_READ_SEARCH"
            );
        }
        before_files != self.file_keys() || before_dirs != self.dir_keys()
    }

    /// Moves entries that disappeared to the retired set (and forgets old retirees).
    fn retire(&mut self, old: HashMap<InodeKey, SecretEntry>) {
        let now = Instant::now();
        self.retired
            .retain(|_, (_, t)| now.duration_since(*t) < RETIRED_GRACE);
        for (k, e) in old {
            if !self.by_inode.contains_key(&k) && self.retired.len() < MAX_RETIRED {
                self.retired.insert(k, (e, now));
            }
        }
    }
}

/// Replaces the entries named under `dir` by `found`; returns the ones that went away.
fn replace_under(
    map: &mut HashMap<InodeKey, SecretEntry>,
    dir: &Path,
    found: HashMap<InodeKey, SecretEntry>,
) -> HashMap<InodeKey, SecretEntry> {
    // Entries under `dir` that no longer resolve to the same inode are gone (rotation).
    let (gone, kept): (HashMap<_, _>, HashMap<_, _>) = std::mem::take(map)
        .into_iter()
        .partition(|(k, e)| Path::new(&e.path).starts_with(dir) && !found.contains_key(k));
    *map = kept;
    for (k, e) in found {
        insert_ranked(map, k, e);
    }
    gone
}

/// Keeps the most trusted name of an inode found at several paths (then the smaller path,
/// so the result does not depend on walk order).
fn insert_ranked(map: &mut HashMap<InodeKey, SecretEntry>, k: InodeKey, e: SecretEntry) {
    match map.get(&k) {
        Some(old) if (old.rank, &old.path) <= (e.rank, &e.path) && old.path != e.path => {}
        _ => {
            map.insert(k, e);
        }
    }
}

/// `stat` of what a resolved handle refers to.
struct Stat {
    key: InodeKey,
    mode: u32,
    uid: u32,
    size: u64,
    mtime_ns: i64,
}

fn fstat(fd: &OwnedFd) -> std::io::Result<Stat> {
    // SAFETY: fstat into a zeroed struct on a valid fd.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    if unsafe { libc::fstat(fd.as_raw_fd(), &mut st) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(Stat {
        key: InodeKey {
            dev: InodeKey::kernel_dev(libc::major(st.st_dev), libc::minor(st.st_dev)),
            ino: st.st_ino,
        },
        mode: st.st_mode,
        uid: st.st_uid,
        size: st.st_size as u64,
        mtime_ns: st
            .st_mtime
            .saturating_mul(1_000_000_000)
            .saturating_add(st.st_mtime_nsec),
    })
}

#[repr(C)]
struct OpenHow {
    flags: u64,
    mode: u64,
    resolve: u64,
}
const RESOLVE_NO_MAGICLINKS: u64 = 0x02;
const RESOLVE_IN_ROOT: u64 = 0x10;

/// `openat2(dirfd, path, flags, resolve)`, retried on EAGAIN/EINTR (a concurrent rename
/// makes RESOLVE_IN_ROOT ask for a retry).
fn openat2(dirfd: i32, path: &Path, flags: i32, resolve: u64) -> std::io::Result<OwnedFd> {
    let c = CString::new(path.as_os_str().as_bytes())
        .map_err(|_| std::io::Error::from(std::io::ErrorKind::InvalidInput))?;
    let how = OpenHow {
        flags: (flags | libc::O_CLOEXEC) as u64,
        mode: 0,
        resolve,
    };
    for _ in 0..8 {
        // SAFETY: valid C string and open_how of the size passed.
        let fd = unsafe {
            libc::syscall(
                libc::SYS_openat2,
                dirfd,
                c.as_ptr(),
                &how as *const OpenHow,
                std::mem::size_of::<OpenHow>(),
            )
        };
        if fd >= 0 {
            // SAFETY: a new fd we own.
            return Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) });
        }
        let e = std::io::Error::last_os_error();
        match e.raw_os_error() {
            Some(libc::EAGAIN) | Some(libc::EINTR) => continue,
            _ => return Err(e),
        }
    }
    Err(std::io::Error::from_raw_os_error(libc::EAGAIN))
}

/// The path a handle refers to, as the agent sees it.
fn fd_path(fd: &OwnedFd) -> Option<PathBuf> {
    fs::read_link(format!("/proc/self/fd/{}", fd.as_raw_fd())).ok()
}

/// Opens what `fd` (an O_PATH handle) refers to for reading, without resolving any name
/// again: the inode that was checked is the inode that is read.
fn reopen_for_read(fd: &OwnedFd) -> std::io::Result<fs::File> {
    let f = fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_NOCTTY)
        .open(format!("/proc/self/fd/{}", fd.as_raw_fd()))?;
    Ok(f)
}

use std::os::unix::fs::OpenOptionsExt;

/// A name a walk found, resolved.
struct Resolved {
    handle: OwnedFd,
    stat: Stat,
    /// The host path it really is.
    canonical: PathBuf,
}

impl Scanner {
    /// Where the agent reaches host path `p`.
    fn fs_path(&self, p: &Path) -> PathBuf {
        match &self.host_root {
            Some(r) => r.join(p.strip_prefix("/").unwrap_or(p)),
            None => p.to_path_buf(),
        }
    }

    /// The host path of a path the agent sees.
    fn host_path(&self, p: &Path) -> Option<PathBuf> {
        match &self.host_root {
            Some(r) => match p.strip_prefix(r) {
                Ok(rel) => Some(Path::new("/").join(rel)),
                // Through `/proc/<pid>/root` the kernel names files as that process's mount
                // namespace sees them: already host paths.
                Err(_) if r.starts_with("/proc") && p.is_absolute() => Some(p.to_path_buf()),
                Err(_) => None,
            },
            None => Some(p.to_path_buf()),
        }
    }

    fn root_fd(&self) -> std::io::Result<OwnedFd> {
        let root = self.host_root.as_deref().unwrap_or(Path::new("/"));
        openat2(libc::AT_FDCWD, root, libc::O_PATH | libc::O_DIRECTORY, 0)
    }

    /// Resolves host path `p` inside the host root (symlinks included, absolute ones
    /// against the host root) to an O_PATH handle: nothing is opened for reading, so a
    /// FIFO or device costs nothing.
    fn resolve(&self, root: &OwnedFd, p: &Path) -> std::io::Result<Resolved> {
        let rel = p.strip_prefix("/").unwrap_or(p);
        let rel = if rel.as_os_str().is_empty() {
            Path::new(".")
        } else {
            rel
        };
        let handle = openat2(
            root.as_raw_fd(),
            rel,
            libc::O_PATH,
            RESOLVE_IN_ROOT | RESOLVE_NO_MAGICLINKS,
        )?;
        let stat = fstat(&handle)?;
        let canonical = fd_path(&handle)
            .and_then(|seen| self.host_path(&seen))
            .ok_or_else(|| std::io::Error::from(std::io::ErrorKind::NotFound))?;
        Ok(Resolved {
            handle,
            stat,
            canonical,
        })
    }

    fn scan_full(&mut self) -> ScanResult {
        let mut out = ScanResult {
            dir: None,
            started: Instant::now(),
            found: HashMap::new(),
            dirs: HashMap::new(),
            not_secret: Vec::new(),
            stats: ScanStats::default(),
        };
        let mut tally = Tally::default();
        match self.root_fd() {
            Ok(root) => {
                for (walk, depth) in self.roots.clone() {
                    self.scan_tree(&root, &walk, depth, &mut tally, &mut out);
                }
                for d in self.explicit_dirs.clone() {
                    if let Ok(r) = self.resolve(&root, &d)
                        && r.stat.mode & libc::S_IFMT == libc::S_IFDIR
                    {
                        out.dirs.insert(r.stat.key, d);
                    }
                }
            }
            Err(e) => warn!("secret scan: cannot open the host root: {e}"),
        }
        out.stats = tally.stats;
        self.known = out.found.clone();
        out
    }

    fn scan_dir(&mut self, dir: &Path) -> ScanResult {
        let mut out = ScanResult {
            dir: Some(dir.to_path_buf()),
            started: Instant::now(),
            found: HashMap::new(),
            dirs: HashMap::new(),
            not_secret: Vec::new(),
            stats: ScanStats::default(),
        };
        // The caps count what is already known outside this directory.
        let mut tally = Tally::default();
        for e in self.known.values() {
            if !Path::new(&e.path).starts_with(dir) {
                self.count(&mut tally, e);
            }
        }
        if let Ok(root) = self.root_fd() {
            self.scan_tree(&root, dir, 3, &mut tally, &mut out);
        }
        out.stats = tally.stats;
        let found = out.found.clone();
        replace_under(&mut self.known, dir, found);
        out
    }

    fn count(&self, tally: &mut Tally, e: &SecretEntry) {
        tally.total += 1;
        if let Some(uid) = &e.owner_pod_uid {
            *tally.per_pod.entry(uid.clone()).or_default() += 1;
        } else if let Some(h) = home_of(&e.path) {
            *tally.per_home.entry(h.to_owned()).or_default() += 1;
        }
    }

    /// Walks host directory `walk` (resolved inside the host root first, so its own
    /// symlinked components mean the host's directories).
    fn scan_tree(
        &mut self,
        root: &OwnedFd,
        walk: &Path,
        depth: usize,
        tally: &mut Tally,
        out: &mut ScanResult,
    ) {
        let Ok(start) = self.resolve(root, walk) else {
            return;
        };
        if start.stat.mode & libc::S_IFMT != libc::S_IFDIR {
            return;
        }
        // Names are matched against the globs as written (`/var/run/secrets/…`) and the
        // entries are named by where they really are (`/run/secrets/…`).
        let canonical_root = start.canonical.clone();
        let fs_root = self.fs_path(&canonical_root);
        let mut in_root = 0usize;
        let mut visited = 0u64;
        let walker = walkdir::WalkDir::new(&fs_root)
            .follow_links(false)
            .follow_root_links(false)
            .max_depth(depth)
            .sort_by_file_name();
        for entry in walker {
            let entry = match entry {
                Ok(e) => e,
                Err(e) => {
                    if e.io_error()
                        .is_some_and(|io| io.kind() == std::io::ErrorKind::PermissionDenied)
                    {
                        tally.stats.unreadable_dirs += 1;
                    }
                    continue;
                }
            };
            visited += 1;
            if visited > WALK_MAX_ENTRIES {
                tally.stats.walk_truncated += 1;
                warn!(
                    root = %walk.display(),
                    "secret scan stopped after {WALK_MAX_ENTRIES} entries in one root"
                );
                break;
            }
            if entry.file_type().is_dir() {
                continue;
            }
            let Ok(rel) = entry.path().strip_prefix(&fs_root) else {
                continue;
            };
            let as_written = walk.join(rel);
            let here = canonical_root.join(rel);
            let matched = self.globs.is_match(&as_written) && !self.exclude.is_match(&as_written);
            if !matched {
                // A file of a watched directory that is no secret (`ca.crt`, opened through
                // its symlink): remembered so its opens do not ask for rescans.
                if out.dir.is_some()
                    && let Ok(r) = self.resolve(root, &here)
                {
                    out.not_secret.push(r.stat.key);
                }
                continue;
            }
            if tally.total >= self.caps.total {
                tally.stats.capped_total += 1;
                continue;
            }
            if in_root >= self.caps.per_root {
                tally.stats.capped_per_root += 1;
                continue;
            }
            let pod = self.kubelet_pod_uid(&here.to_string_lossy());
            let home = home_of(&here.to_string_lossy()).map(str::to_owned);
            // Caps are checked before anything is resolved or read.
            if let Some(uid) = &pod
                && tally.per_pod.get(uid).copied().unwrap_or(0) >= self.caps.per_pod
            {
                tally.stats.capped_per_pod += 1;
                continue;
            }
            if pod.is_none()
                && let Some(h) = &home
                && tally.per_home.get(h).copied().unwrap_or(0) >= self.caps.per_home
            {
                tally.stats.capped_per_home += 1;
                continue;
            }
            let Ok(res) = self.resolve(root, &here) else {
                continue;
            };
            match res.stat.mode & libc::S_IFMT {
                libc::S_IFREG => {}
                // `..data` in a Secret volume: the directory its files are in.
                libc::S_IFDIR => continue,
                _ => {
                    tally.stats.not_regular += 1;
                    continue;
                }
            }
            let name = if entry.path_is_symlink() {
                match self.symlink_name(root, &here, &res) {
                    Some(n) => n,
                    None => {
                        tally.stats.symlinks_not_followed += 1;
                        continue;
                    }
                }
            } else {
                res.canonical.clone()
            };
            let entry = self.entry(&name, &res);
            in_root += 1;
            self.count(tally, &entry);
            if let Some(vol) = self.kubelet_volume_dir(Path::new(&entry.path))
                && let Ok(v) = self.resolve(root, &vol)
                && v.stat.mode & libc::S_IFMT == libc::S_IFDIR
            {
                out.dirs.insert(v.stat.key, vol);
            }
            insert_ranked(&mut out.found, entry.key, entry);
        }
    }

    /// The name a secret found through the symlink at `link` goes by, if the link is
    /// followed at all: the link's own path when the target stays below the link's
    /// directory (the kubelet's `token -> ..data/token`) or belongs to the link's owner (a
    /// user's own dotfiles). A link to somebody else's file elsewhere is not followed: that
    /// file is named, typed and owned by its own path, found by its own glob.
    fn symlink_name(&self, root: &OwnedFd, link: &Path, target: &Resolved) -> Option<PathBuf> {
        let parent = link.parent()?;
        let parent = self.resolve(root, parent).ok()?.canonical;
        if target.canonical.starts_with(&parent) {
            return Some(link.to_path_buf());
        }
        let link_uid = fs::symlink_metadata(self.fs_path(link)).ok()?.uid();
        (link_uid == target.stat.uid).then(|| link.to_path_buf())
    }

    /// The inventory entry for `name`, reusing the last scan's when the file did not change.
    fn entry(&self, name: &Path, res: &Resolved) -> SecretEntry {
        let path_str = name.to_string_lossy().into_owned();
        if let Some(old) = self.known.get(&res.stat.key)
            && old.size == res.stat.size
            && old.mtime_ns == res.stat.mtime_ns
            && old.path == path_str
        {
            return old.clone();
        }
        let owner_pod_uid = self.kubelet_pod_uid(&path_str);
        let rank = match &owner_pod_uid {
            Some(_)
                if path_str.contains("/kubernetes.io~projected/")
                    && path_str.ends_with("/token") =>
            {
                Rank::PodToken
            }
            Some(_) => Rank::PodVolume,
            None if home_of(&path_str).is_some() => Rank::Home,
            None => Rank::System,
        };
        let mut credential = CredentialRef::default();
        match reopen_for_read(&res.handle).and_then(|f| read_bounded(f, self.max_read)) {
            Ok((bytes, truncated)) => {
                let an = analyze(&path_str, &bytes);
                credential.fingerprint = if truncated {
                    self.fp.fingerprint(&bytes)
                } else {
                    an.fingerprint(&self.fp, &bytes)
                };
                credential.kind = an.kind;
                credential.labels = an.labels;
                if truncated {
                    credential.labels.insert(
                        "fingerprint_of_first_bytes".into(),
                        self.max_read.to_string(),
                    );
                }
            }
            Err(e) => {
                debug!("cannot read secret {path_str}: {e}");
                credential.kind = CredentialType::Unreadable;
                credential
                    .labels
                    .insert("read_error".into(), e.kind().to_string());
            }
        }
        credential.identity = identity(&credential, &path_str);
        credential.owner = owner_pod_uid.as_ref().map(|uid| Owner {
            kind: WorkloadKind::Pod,
            id: WorkloadId::pod_uid(uid),
            pod_uid: Some(uid.clone()),
            source: OwnerSource::KubeletVolume,
            ..Default::default()
        });
        SecretEntry {
            path: path_str,
            key: res.stat.key,
            credential: Arc::new(credential),
            owner_pod_uid,
            rank,
            size: res.stat.size,
            mtime_ns: res.stat.mtime_ns,
        }
    }

    /// `{kubelet}/pods/<uid>/volumes/...` → uid.
    fn kubelet_pod_uid(&self, path: &str) -> Option<String> {
        let rest = path
            .strip_prefix(&self.kubelet_root)?
            .strip_prefix("/pods/")?;
        let (uid, tail) = rest.split_once('/')?;
        tail.starts_with("volumes/").then(|| uid.to_owned())
    }

    /// `{kubelet}/pods/<uid>/volumes/<plugin>/<volume>`: where rotated files appear.
    fn kubelet_volume_dir(&self, path: &Path) -> Option<PathBuf> {
        let rel = path.strip_prefix(&self.kubelet_root).ok()?;
        let comps: Vec<_> = rel.components().collect();
        if comps.len() >= 6 && comps[0].as_os_str() == "pods" && comps[2].as_os_str() == "volumes" {
            let mut p = PathBuf::from(&self.kubelet_root);
            for c in &comps[..5] {
                p.push(c);
            }
            return Some(p);
        }
        None
    }
}

/// The credential across rotations: a service-account token by (issuer, subject, pod),
/// anything else by where it lives, with the kubelet's atomic-writer generation
/// (`..2026_12_01_10_00_00.123/`, `..data/`) taken out of the path.
pub fn identity(c: &CredentialRef, path: &str) -> String {
    let l = &c.labels;
    if c.kind == CredentialType::K8sSaToken
        && let (Some(iss), Some(sub)) = (l.get("iss"), l.get("sub"))
    {
        let pod = l.get("pod_uid").map(String::as_str).unwrap_or("");
        return format!("k8s:{iss}|{sub}|{pod}");
    }
    let stable: Vec<&str> = path
        .split('/')
        .filter(|c| !is_writer_generation(c))
        .collect();
    format!("file:{}", stable.join("/"))
}

/// `..data` and `..2026_12_01_10_00_00.123456789`: the kubelet atomic writer's (not `..`).
fn is_writer_generation(c: &str) -> bool {
    c == "..data"
        || c.strip_prefix("..")
            .is_some_and(|r| r.starts_with(|d: char| d.is_ascii_digit()))
}

/// The home directory a host path is in (`/home/<user>`, `/root`, `/run/user/<uid>`).
fn home_of(path: &str) -> Option<&str> {
    let end_of = |prefix: &str| -> Option<usize> {
        let rest = path.strip_prefix(prefix)?;
        let n = rest.find('/').unwrap_or(rest.len());
        (n > 0).then_some(prefix.len() + n)
    };
    if path == "/root" || path.starts_with("/root/") {
        return Some("/root");
    }
    end_of("/home/")
        .or_else(|| end_of("/run/user/"))
        .map(|e| &path[..e])
}

pub fn inode_key(meta: &fs::Metadata) -> InodeKey {
    let dev = meta.dev();
    InodeKey {
        dev: InodeKey::kernel_dev(libc::major(dev), libc::minor(dev)),
        ino: meta.ino(),
    }
}

fn read_bounded(f: fs::File, max: u64) -> std::io::Result<(Vec<u8>, bool)> {
    let mut buf = Vec::new();
    f.take(max + 1).read_to_end(&mut buf)?;
    let truncated = buf.len() as u64 > max;
    buf.truncate(max as usize);
    Ok((buf, truncated))
}

/// The literal directory a glob starts at, and how deep below it matches can be.
fn walk_root(glob: &str) -> (PathBuf, usize) {
    let comps: Vec<&str> = glob.split('/').collect();
    let is_meta = |c: &str| c.contains(['*', '?', '[', '{']);
    let lit = comps.iter().take_while(|c| !is_meta(c)).count();
    let root = comps[..lit.min(comps.len().saturating_sub(1))].join("/");
    let root = if root.is_empty() {
        "/".to_owned()
    } else {
        root
    };
    let rest = &comps[lit.min(comps.len().saturating_sub(1))..];
    let depth = if rest.iter().any(|c| c.contains("**")) {
        16
    } else {
        rest.len()
    };
    (PathBuf::from(root), depth)
}

/// Drops roots that another root already covers.
fn merge_roots(mut roots: Vec<(PathBuf, usize)>) -> Vec<(PathBuf, usize)> {
    roots.sort();
    let mut out: Vec<(PathBuf, usize)> = Vec::new();
    for (r, d) in roots {
        if let Some(last) = out.iter_mut().find(|(p, _)| *p == r) {
            last.1 = last.1.max(d);
            continue;
        }
        let covered = out.iter().any(|(p, pd)| {
            r.strip_prefix(p)
                .is_ok_and(|rel| rel.components().count() + d <= *pd)
        });
        if !covered {
            out.push((r, d));
        }
    }
    if out.len() > 64 {
        warn!(
            "{} secret glob roots; consider fewer, broader globs",
            out.len()
        );
    }
    out
}

#[cfg(test)]
fn dir_key(p: &Path) -> Option<InodeKey> {
    let m = fs::metadata(p).ok()?;
    m.is_dir().then(|| inode_key(&m))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identities_survive_rotation_not_relocation() {
        let file = CredentialRef::default();
        let a = identity(
            &file,
            "/var/lib/kubelet/pods/u/volumes/kubernetes.io~secret/db/..2026_12_01_10_00_00.1/password",
        );
        let b = identity(
            &file,
            "/var/lib/kubelet/pods/u/volumes/kubernetes.io~secret/db/..data/password",
        );
        assert_eq!(
            a,
            "file:/var/lib/kubelet/pods/u/volumes/kubernetes.io~secret/db/password"
        );
        assert_eq!(a, b);
        assert_eq!(identity(&file, "/srv/../etc/key"), "file:/srv/../etc/key");
        let mut sa = CredentialRef {
            kind: CredentialType::K8sSaToken,
            ..Default::default()
        };
        for (k, v) in [
            ("iss", "https://k"),
            ("sub", "system:serviceaccount:ns:sa"),
            ("pod_uid", "u1"),
        ] {
            sa.labels.insert(k.into(), v.into());
        }
        assert_eq!(
            identity(&sa, "/anywhere/token"),
            "k8s:https://k|system:serviceaccount:ns:sa|u1"
        );
    }

    #[test]
    fn walk_roots_from_globs() {
        assert_eq!(
            walk_root("/root/.aws/credentials"),
            (PathBuf::from("/root/.aws"), 1)
        );
        assert_eq!(
            walk_root("/home/*/.aws/credentials"),
            (PathBuf::from("/home"), 3)
        );
        assert_eq!(
            walk_root("/var/run/secrets/**"),
            (PathBuf::from("/var/run/secrets"), 16)
        );
        let merged = merge_roots(vec![
            (PathBuf::from("/a"), 3),
            (PathBuf::from("/a/b"), 1),
            (PathBuf::from("/c"), 1),
        ]);
        assert_eq!(
            merged,
            vec![(PathBuf::from("/a"), 3), (PathBuf::from("/c"), 1)]
        );
    }

    #[test]
    fn scans_fingerprints_and_tracks_rotation() {
        let tmp = tempfile::tempdir().unwrap();
        let kubelet = tmp.path().join("kubelet");
        let vol = kubelet.join("pods/0a1b2c3d-4e5f-6789-abcd-ef0123456789/volumes/kubernetes.io~projected/kube-api-access-x");
        let ts1 = vol.join("..2026_11_22_10_00_00.1");
        fs::create_dir_all(&ts1).unwrap();
        fs::write(ts1.join("token"), "fake-token-1").unwrap();
        std::os::unix::fs::symlink("..2026_11_22_10_00_00.1", vol.join("..data")).unwrap();
        std::os::unix::fs::symlink("..data/token", vol.join("token")).unwrap();
        let fp = Fingerprinter::new(b"k");
        // The catalog's kubelet glob, without the host's own catalog paths.
        let glob = CATALOG[0].replace("{kubelet}", kubelet.to_str().unwrap());
        let mut inv = Inventory::new(
            &[glob],
            false,
            &[],
            kubelet.to_str().unwrap(),
            1024,
            fp.clone(),
        )
        .unwrap();
        assert!(inv.rescan());
        assert_eq!(inv.len(), 1);
        let e = inv.entries().next().unwrap().clone();
        assert_eq!(e.credential.fingerprint, fp.fingerprint(b"fake-token-1"));
        assert_eq!(
            e.owner_pod_uid.as_deref(),
            Some("0a1b2c3d-4e5f-6789-abcd-ef0123456789")
        );
        assert!(inv.dir_keys().contains(&dir_key(&vol).unwrap()));

        // Rotation: new timestamped dir, ..data swapped, old dir removed.
        let ts2 = vol.join("..2026_11_22_11_00_00.2");
        fs::create_dir_all(&ts2).unwrap();
        fs::write(ts2.join("token"), "fake-token-2").unwrap();
        std::os::unix::fs::symlink("..2026_11_22_11_00_00.2", vol.join("..data_tmp")).unwrap();
        fs::rename(vol.join("..data_tmp"), vol.join("..data")).unwrap();
        fs::remove_dir_all(&ts1).unwrap();
        assert_eq!(inv.rescan_dir(&vol), DirRescan::Done(true));
        assert_eq!(inv.len(), 1);
        let e2 = inv.entries().next().unwrap();
        assert_ne!(e2.key, e.key);
        assert!(
            !inv.file_keys().contains(&e.key),
            "old inode leaves the kernel map"
        );
        assert_eq!(
            inv.get(&e.key).map(|r| r.credential.fingerprint.clone()),
            Some(e.credential.fingerprint.clone()),
            "late records still resolve"
        );
        assert_eq!(e2.credential.fingerprint, fp.fingerprint(b"fake-token-2"));
    }

    /// In a container the host's files are reached through a prefix; globs, entry paths and
    /// kubelet owners stay the host's paths, inode keys are the host files' own.
    #[test]
    fn host_root_prefix_reads_host_files_under_host_paths() {
        let host = tempfile::tempdir().unwrap();
        let vol = host
            .path()
            .join("var/lib/kubelet/pods/uid-1/volumes/kubernetes.io~projected/kube-api-access-x");
        fs::create_dir_all(&vol).unwrap();
        fs::write(vol.join("token"), "fake-token-in-host").unwrap();
        fs::create_dir_all(host.path().join("etc/app")).unwrap();
        fs::write(host.path().join("etc/app/key"), "fake-key").unwrap();
        let mut inv = Inventory::new(
            &[
                "/etc/app/*".into(),
                CATALOG[0].replace("{kubelet}", "/var/lib/kubelet"),
            ],
            false,
            &[],
            "/var/lib/kubelet",
            4096,
            Fingerprinter::new(b"k"),
        )
        .unwrap()
        .with_host_root(Some(host.path().to_path_buf()));
        inv.rescan();
        let mut paths: Vec<&str> = inv.entries().map(|e| e.path.as_str()).collect();
        paths.sort();
        assert_eq!(
            paths,
            [
                "/etc/app/key",
                "/var/lib/kubelet/pods/uid-1/volumes/kubernetes.io~projected/kube-api-access-x/token"
            ]
        );
        // An absolute symlink in the host resolves inside the host root, as scans do: a
        // policy glob written through it is named where it leads.
        std::os::unix::fs::symlink("/etc/app", host.path().join("etc/app-link")).unwrap();
        assert_eq!(
            inv.real_path(Path::new("/etc/app-link")),
            Some(PathBuf::from("/etc/app"))
        );
        assert_eq!(inv.real_path(Path::new("/etc/missing")), None);
        let key = inode_key(&fs::metadata(host.path().join("etc/app/key")).unwrap());
        assert_eq!(inv.get(&key).unwrap().path, "/etc/app/key");
        let token = inv.entries().find(|e| e.path.ends_with("token")).unwrap();
        assert_eq!(token.owner_pod_uid.as_deref(), Some("uid-1"));
        assert_eq!(inv.dir_keys().len(), 1, "the volume dir is watched");
        assert_eq!(
            inv.watched_dir(inv.dir_keys().iter().next().unwrap()),
            Some(Path::new(
                "/var/lib/kubelet/pods/uid-1/volumes/kubernetes.io~projected/kube-api-access-x"
            ))
        );
    }

    /// A fake RSA key in PEM form (no real key material).
    const FAKE_PEM: &str = "-----BEGIN RSA PRIVATE KEY-----\nRkFLRS1LRVktTk9ULVJFQUw=\n-----END RSA PRIVATE KEY-----\n";

    fn host_inventory(host: &Path, globs: &[&str]) -> Inventory {
        Inventory::new(
            &globs.iter().map(|g| g.to_string()).collect::<Vec<_>>(),
            false,
            &[],
            "/var/lib/kubelet",
            4096,
            Fingerprinter::new(b"k"),
        )
        .unwrap()
        .with_host_root(Some(host.to_path_buf()))
    }

    /// `~/.ssh/id_x -> /etc/kubernetes/pki/ca.key`: the CA key keeps its own path and type
    /// (before, the home glob's walk came last and renamed it to the user's path, typed as
    /// that user's SSH key).
    #[test]
    fn symlinked_ca_key_keeps_its_canonical_name_and_type() {
        let host = tempfile::tempdir().unwrap();
        let pki = host.path().join("etc/kubernetes/pki");
        let ssh = host.path().join("home/mallory/.ssh");
        fs::create_dir_all(&pki).unwrap();
        fs::create_dir_all(&ssh).unwrap();
        fs::write(pki.join("ca.key"), FAKE_PEM).unwrap();
        // Relative (the old code followed it too) and absolute (means the host's file).
        std::os::unix::fs::symlink("../../../etc/kubernetes/pki/ca.key", ssh.join("id_x")).unwrap();
        std::os::unix::fs::symlink("/etc/kubernetes/pki/ca.key", ssh.join("id_y")).unwrap();
        let mut inv = host_inventory(
            host.path(),
            &["/etc/kubernetes/pki/**/*.key", "/home/*/.ssh/id_*"],
        );
        inv.rescan();
        assert_eq!(inv.len(), 1, "one inode, one entry");
        let e = inv.entries().next().unwrap();
        assert_eq!(e.path, "/etc/kubernetes/pki/ca.key");
        assert_eq!(e.credential.kind, CredentialType::TlsPrivateKey);
        assert_eq!(e.rank, Rank::System);
        // Owned by somebody else than the link (the links are root's in this test when run
        // as root, the CA key too): with a user's link it is not even followed.
        if unsafe { libc::geteuid() } == 0 {
            let link = CString::new(ssh.join("id_x").as_os_str().as_bytes()).unwrap();
            assert_eq!(unsafe { libc::lchown(link.as_ptr(), 1000, 1000) }, 0);
            let mut inv = host_inventory(host.path(), &["/home/*/.ssh/id_*"]);
            inv.rescan();
            assert!(
                inv.entries().all(|e| e.path != "/home/mallory/.ssh/id_x"),
                "a user's link to root's file is not followed"
            );
            assert!(inv.stats().symlinks_not_followed >= 1);
        }
    }

    /// Absolute symlinks in the host's tree (`/var/run -> /run`) mean the host's files, not
    /// the agent's: resolution stays inside the host root, and entries are named by where
    /// they really are.
    #[test]
    fn absolute_symlinks_resolve_inside_the_host_root() {
        let host = tempfile::tempdir().unwrap();
        let real = host.path().join("run/secrets/app");
        fs::create_dir_all(&real).unwrap();
        fs::write(real.join("token"), "fake-token-in-run").unwrap();
        fs::create_dir_all(host.path().join("var")).unwrap();
        std::os::unix::fs::symlink("/run", host.path().join("var/run")).unwrap();
        let mut inv = host_inventory(host.path(), &["/var/run/secrets/**"]);
        inv.rescan();
        let paths: Vec<&str> = inv.entries().map(|e| e.path.as_str()).collect();
        assert_eq!(paths, ["/run/secrets/app/token"]);
    }

    /// A FIFO (or device) where a secret was: never opened for reading, so no scan blocks.
    /// A helper swaps the name between a regular file and a FIFO as fast as it can while
    /// scans run; before, `stat` then `open` by name raced with the swap and the open of the
    /// FIFO blocked forever.
    #[test]
    fn fifo_swapped_in_never_blocks_a_scan() {
        let dir = tempfile::tempdir().unwrap();
        let sec = dir.path().join("secrets");
        fs::create_dir_all(&sec).unwrap();
        let fifo = CString::new(dir.path().join("fifo").as_os_str().as_bytes()).unwrap();
        assert_eq!(unsafe { libc::mkfifo(fifo.as_ptr(), 0o600) }, 0);
        let fifo_link = CString::new(sec.join("fifo-key").as_os_str().as_bytes()).unwrap();
        assert_eq!(unsafe { libc::mkfifo(fifo_link.as_ptr(), 0o600) }, 0);
        use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
        let stop = Arc::new(AtomicBool::new(false));
        let swaps = Arc::new(AtomicU64::new(0));
        let (flag, count) = (stop.clone(), swaps.clone());
        let (d, target) = (dir.path().to_path_buf(), sec.join("key"));
        let swapper = std::thread::spawn(move || {
            while !flag.load(Relaxed) {
                fs::write(d.join("file"), "fake-key").unwrap();
                fs::rename(d.join("file"), &target).unwrap();
                let f = CString::new(d.join("fifo2").as_os_str().as_bytes()).unwrap();
                unsafe { libc::mkfifo(f.as_ptr(), 0o600) };
                let _ = fs::rename(d.join("fifo2"), &target);
                count.fetch_add(1, Relaxed);
            }
        });
        let glob = format!("{}/*", sec.display());
        let (tx, rx) = mpsc::channel();
        let seen = swaps.clone();
        std::thread::spawn(move || {
            let mut inv = Inventory::new(
                &[glob],
                false,
                &[],
                "/nonexistent",
                4096,
                Fingerprinter::new(b"k"),
            )
            .unwrap();
            let (mut scans, mut not_regular) = (0u64, 0u64);
            while seen.load(Relaxed) < 3000 || scans < 3000 {
                inv.rescan();
                not_regular += inv.stats().not_regular;
                scans += 1;
            }
            let _ = tx.send((scans, not_regular));
        });
        let done = rx.recv_timeout(Duration::from_secs(120));
        stop.store(true, Relaxed);
        // Unblock a scan stuck in open(2) on the FIFO (the old behaviour) so the test ends.
        for _ in 0..50 {
            if let Ok(f) = fs::OpenOptions::new()
                .write(true)
                .custom_flags(libc::O_NONBLOCK)
                .open(sec.join("key"))
            {
                drop(f);
            }
        }
        swapper.join().unwrap();
        let (scans, not_regular) = done.expect("a scan blocked on a FIFO");
        assert!(
            not_regular >= scans,
            "the FIFOs were seen and skipped ({not_regular} in {scans} scans)"
        );
    }

    /// 70 000 key files in one home directory: that home adds at most its cap, the rest is
    /// counted, and the pod token comes first in what the kernel map is filled with.
    #[test]
    fn seventy_thousand_key_files_in_one_home_do_not_crowd_out_pod_tokens() {
        let host = tempfile::tempdir().unwrap();
        let ssh = host.path().join("home/mallory/.ssh");
        fs::create_dir_all(&ssh).unwrap();
        for i in 0..70_000 {
            fs::write(ssh.join(format!("id_{i:05}")), "fake").unwrap();
        }
        let vol = host
            .path()
            .join("var/lib/kubelet/pods/uid-1/volumes/kubernetes.io~projected/kube-api-access-x");
        fs::create_dir_all(&vol).unwrap();
        fs::write(vol.join("token"), "fake-pod-token").unwrap();
        fs::create_dir_all(host.path().join("home/alice/.ssh")).unwrap();
        fs::write(host.path().join("home/alice/.ssh/id_ed25519"), "fake-alice").unwrap();
        let mut inv = host_inventory(
            host.path(),
            &[
                "/home/*/.ssh/id_*",
                &CATALOG[0].replace("{kubelet}", "/var/lib/kubelet"),
            ],
        );
        let t = Instant::now();
        inv.rescan();
        let caps = Caps::default();
        assert_eq!(
            inv.len(),
            caps.per_home + 2,
            "mallory's cap, alice's key, the token"
        );
        assert_eq!(inv.stats().capped_per_home, (70_000 - caps.per_home) as u64);
        // And with the caps lifted but a total smaller than what is there: pod tokens first.
        let mut small = host_inventory(
            host.path(),
            &[
                "/home/*/.ssh/id_*",
                &CATALOG[0].replace("{kubelet}", "/var/lib/kubelet"),
            ],
        )
        .with_caps(Caps {
            per_root: 100_000,
            per_home: 100_000,
            per_pod: 256,
            total: 1000,
        });
        small.rescan();
        assert_eq!(small.len(), 1000);
        assert!(small.entries().any(|e| e.rank == Rank::PodToken));
        assert_eq!(small.stats().capped_total, 70_002 - 1000);
        let ranked = inv.file_keys_ranked();
        let first = inv.get(&ranked[0]).unwrap();
        assert!(first.path.ends_with("/token"), "{}", first.path);
        assert_eq!(first.rank, Rank::PodToken);
        assert!(
            inv.entries()
                .any(|e| e.path == "/home/alice/.ssh/id_ed25519"),
            "another user's keys are not crowded out either"
        );
        assert!(t.elapsed() < Duration::from_secs(30), "{:?}", t.elapsed());
    }

    /// Once scans run on the scanner thread, the caller only queues: a directory rescan is
    /// applied by `poll`, and a second request for the same directory while the first is on
    /// its way is folded into it.
    #[test]
    fn scans_run_on_the_scanner_thread_and_poll_applies_them() {
        let dir = tempfile::tempdir().unwrap();
        let watched = dir.path().join("w");
        fs::create_dir_all(&watched).unwrap();
        let glob = format!("{}/*", watched.display());
        let mut inv = Inventory::new(
            &[glob],
            false,
            &[watched.display().to_string()],
            "/nonexistent",
            4096,
            Fingerprinter::new(b"k"),
        )
        .unwrap();
        assert!(inv.rescan(), "the watched directory");
        assert_eq!((inv.len(), inv.dir_keys().len()), (0, 1));
        inv.scan_in_background().unwrap();
        fs::write(watched.join("new.key"), "fake-new").unwrap();
        let asked = Instant::now();
        assert_eq!(inv.rescan_dir(&watched), DirRescan::Queued);
        assert_eq!(inv.rescan_dir(&watched), DirRescan::Queued);
        assert!(!inv.scanned_since(&watched, asked));
        assert!(inv.wait_idle(Duration::from_secs(10)));
        assert_eq!(inv.len(), 1);
        assert!(inv.scanned_since(&watched, asked));
        // A file that appears after that scan started needs another one (rate-limited).
        let later = Instant::now();
        fs::write(watched.join("third.key"), "fake-third").unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        while !inv.scanned_since(&watched, later) && Instant::now() < deadline {
            inv.want_dir(&watched, later);
            inv.poll();
            std::thread::sleep(Duration::from_millis(5));
        }
        assert_eq!(inv.len(), 2);
        // Full rescans too.
        fs::write(watched.join("second.key"), "fake-second").unwrap();
        assert!(!inv.rescan(), "queued, not done");
        let deadline = Instant::now() + Duration::from_secs(10);
        let mut changed = false;
        while !changed && Instant::now() < deadline {
            changed = inv.poll();
            std::thread::sleep(Duration::from_millis(5));
        }
        assert!(changed);
        assert_eq!(inv.len(), 3);
    }

    /// Names a user controls: newlines, bytes that are not UTF-8, 255-byte names, symlink
    /// loops and chains, dangling links, a tree deeper than any glob. Nothing panics or
    /// hangs, loops are not followed, and the real key is found.
    #[test]
    fn hostile_names_and_links_in_a_home_are_survived() {
        use std::os::unix::ffi::OsStrExt as _;
        let host = tempfile::tempdir().unwrap();
        let ssh = host.path().join("home/eve/.ssh");
        fs::create_dir_all(&ssh).unwrap();
        fs::write(ssh.join("id_real"), "fake-real-key").unwrap();
        fs::write(ssh.join("id_new\nline"), "fake-newline").unwrap();
        fs::write(
            ssh.join(std::ffi::OsStr::from_bytes(b"id_\xff\xfe")),
            "fake-not-utf8",
        )
        .unwrap();
        fs::write(ssh.join(format!("id_{}", "x".repeat(250))), "fake-long").unwrap();
        std::os::unix::fs::symlink("id_loop_b", ssh.join("id_loop_a")).unwrap();
        std::os::unix::fs::symlink("id_loop_a", ssh.join("id_loop_b")).unwrap();
        std::os::unix::fs::symlink("/nonexistent/key", ssh.join("id_dangling")).unwrap();
        std::os::unix::fs::symlink("/proc/self/root/etc/hostname", ssh.join("id_magic")).unwrap();
        let mut deep = ssh.clone();
        for i in 0..200 {
            deep.push(format!("d{i}"));
        }
        fs::create_dir_all(&deep).unwrap();
        fs::write(deep.join("id_deep"), "fake-deep").unwrap();
        let mut inv = host_inventory(host.path(), &["/home/*/.ssh/id_*", "/home/**/id_*"]);
        inv.rescan();
        let paths: Vec<&str> = inv.entries().map(|e| e.path.as_str()).collect();
        assert!(paths.contains(&"/home/eve/.ssh/id_real"), "{paths:?}");
        assert!(
            paths.iter().any(|p| p.contains("id_new\nline")),
            "{paths:?}"
        );
        assert!(
            !paths
                .iter()
                .any(|p| p.contains("loop") || p.contains("dangling"))
        );
        assert!(
            !paths.iter().any(|p| p.contains("magic")),
            "no /proc magic link is followed: {paths:?}"
        );
        assert!(
            !paths.iter().any(|p| p.ends_with("id_deep")),
            "deeper than the glob walk"
        );
    }
}
