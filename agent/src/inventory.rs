//! Secret inventory: which files on this node hold credentials, by (dev, inode), with their
//! credential fingerprint and owner. Feeds the kernel's inode maps.

use std::{
    collections::{HashMap, HashSet},
    fs,
    io::Read,
    os::unix::fs::MetadataExt,
    path::{Path, PathBuf},
    sync::Arc,
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

impl Default for Config {
    fn default() -> Self {
        Config {
            paths: Vec::new(),
            watch_dirs: Vec::new(),
            catalog: true,
            rescan_interval: default_rescan(),
            max_read_bytes: default_max_read(),
            host_root: None,
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
    }
}

impl Inventory {
    /// The inventory `cfg` describes, with pod volumes under `kubelet_root`; the host root
    /// from `CREDWATCH_HOST_ROOT`, else `host_root`.
    /// The fleet key's fingerprinter (for credentials that are not files).
    pub fn fingerprinter(&self) -> &Fingerprinter {
        &self.fp
    }

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

#[derive(Clone, Debug)]
pub struct SecretEntry {
    pub path: String,
    pub key: InodeKey,
    /// Shared with every event that reads it.
    pub credential: Arc<CredentialRef>,
    /// Pod uid when the file lives in a kubelet pod volume.
    pub owner_pod_uid: Option<String>,
    size: u64,
    mtime_ns: i64,
}

pub struct Inventory {
    globs: GlobSet,
    exclude: GlobSet,
    /// (literal directory to walk, max depth) derived from the globs.
    roots: Vec<(PathBuf, usize)>,
    explicit_dirs: Vec<PathBuf>,
    kubelet_root: String,
    max_read: u64,
    fp: Fingerprinter,
    by_inode: HashMap<InodeKey, SecretEntry>,
    retired: HashMap<InodeKey, (SecretEntry, Instant)>,
    watched_dirs: HashMap<InodeKey, PathBuf>,
    /// Where the host's `/` is visible to the agent (`/proc/1/root` in a container with
    /// hostPID); paths in globs, entries and events stay host paths.
    host_root: Option<PathBuf>,
    /// Directories the last scan could not enter (missing CAP_DAC_READ_SEARCH, typically).
    unreadable: usize,
}

/// How long a rotated-out secret still names late records (it is out of the kernel map
/// at once, so no new read of it matches).
const RETIRED_GRACE: Duration = Duration::from_secs(60);

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
        Ok(Inventory {
            globs: b.build()?,
            exclude: ex.build()?,
            roots: merge_roots(roots),
            explicit_dirs: watch_dirs.iter().map(PathBuf::from).collect(),
            kubelet_root: kubelet_root.trim_end_matches('/').to_owned(),
            max_read,
            fp,
            by_inode: HashMap::new(),
            retired: HashMap::new(),
            watched_dirs: HashMap::new(),
            host_root: None,
            unreadable: 0,
        })
    }

    /// Reads the host's files under `root` (see [`Inventory::host_root`]).
    pub fn with_host_root(mut self, root: Option<PathBuf>) -> Self {
        self.host_root = root.filter(|r| r != Path::new("/"));
        self
    }

    /// Where the agent reaches host path `p`.
    fn fs_path(&self, p: &Path) -> PathBuf {
        match &self.host_root {
            Some(r) => r.join(p.strip_prefix("/").unwrap_or(p)),
            None => p.to_path_buf(),
        }
    }

    /// The host path of a path the agent walked.
    fn host_path(&self, p: &Path) -> PathBuf {
        match &self.host_root {
            Some(r) => p
                .strip_prefix(r)
                .map(|rel| Path::new("/").join(rel))
                .unwrap_or_else(|_| p.to_path_buf()),
            None => p.to_path_buf(),
        }
    }

    pub fn len(&self) -> usize {
        self.by_inode.len()
    }

    pub fn is_empty(&self) -> bool {
        self.by_inode.is_empty()
    }

    /// The secret at `key`, including one rotated out less than [`RETIRED_GRACE`] ago: a
    /// read that happened just before a rotation is still in the ring when the rescan that
    /// notices the rotation runs.
    pub fn get(&self, key: &InodeKey) -> Option<&SecretEntry> {
        self.by_inode
            .get(key)
            .or_else(|| self.retired.get(key).map(|(e, _)| e))
    }

    /// Moves entries that disappeared to the retired set (and forgets old retirees).
    fn retire(&mut self, old: HashMap<InodeKey, SecretEntry>) {
        let now = Instant::now();
        self.retired
            .retain(|_, (_, t)| now.duration_since(*t) < RETIRED_GRACE);
        for (k, e) in old {
            if !self.by_inode.contains_key(&k) {
                self.retired.insert(k, (e, now));
            }
        }
    }

    pub fn entries(&self) -> impl Iterator<Item = &SecretEntry> {
        self.by_inode.values()
    }

    pub fn file_keys(&self) -> HashSet<InodeKey> {
        self.by_inode.keys().copied().collect()
    }

    pub fn dir_keys(&self) -> HashSet<InodeKey> {
        self.watched_dirs.keys().copied().collect()
    }

    pub fn watched_dir(&self, key: &InodeKey) -> Option<&Path> {
        self.watched_dirs.get(key).map(PathBuf::as_path)
    }

    /// Full rescan: every glob root. Returns true when the inode sets changed.
    pub fn rescan(&mut self) -> bool {
        let before_files = self.file_keys();
        let before_dirs = self.dir_keys();
        let mut found: HashMap<InodeKey, SecretEntry> = HashMap::new();
        let mut dirs: HashMap<InodeKey, PathBuf> = HashMap::new();
        self.unreadable = 0;
        for (root, depth) in self.roots.clone() {
            self.scan_tree(&root, depth, &mut found, &mut dirs);
        }
        for d in &self.explicit_dirs {
            if let Some(k) = dir_key(&self.fs_path(d)) {
                dirs.insert(k, d.clone());
            }
        }
        if self.unreadable > 0 {
            warn!(
                directories = self.unreadable,
                "secret scan could not enter some directories (permission denied): secrets there \
                 are not watched; the agent needs CAP_DAC_READ_SEARCH"
            );
        }
        let old = std::mem::replace(&mut self.by_inode, found);
        self.retire(old);
        self.watched_dirs = dirs;
        before_files != self.file_keys() || before_dirs != self.dir_keys()
    }

    /// Rescans one watched directory after the kernel saw an unknown file open in it.
    /// Returns true when the inventory changed.
    pub fn rescan_dir(&mut self, dir: &Path) -> bool {
        let before = self.file_keys();
        let mut found = HashMap::new();
        let mut dirs = HashMap::new();
        self.scan_tree(dir, 3, &mut found, &mut dirs);
        // Entries under `dir` that no longer resolve to the same inode are gone (rotation).
        let (gone, kept): (HashMap<_, _>, HashMap<_, _>) = std::mem::take(&mut self.by_inode)
            .into_iter()
            .partition(|(k, e)| Path::new(&e.path).starts_with(dir) && !found.contains_key(k));
        self.by_inode = kept;
        self.by_inode.extend(found);
        self.retire(gone);
        self.watched_dirs.extend(dirs);
        before != self.file_keys()
    }

    /// Walks host directory `root` (through the host root when set).
    fn scan_tree(
        &mut self,
        root: &Path,
        depth: usize,
        found: &mut HashMap<InodeKey, SecretEntry>,
        dirs: &mut HashMap<InodeKey, PathBuf>,
    ) {
        let fs_root = self.fs_path(root);
        if !fs_root.exists() {
            return;
        }
        let walker = walkdir::WalkDir::new(&fs_root)
            .follow_links(false)
            .max_depth(depth);
        for entry in walker {
            let entry = match entry {
                Ok(e) => e,
                Err(e) => {
                    if e.io_error()
                        .is_some_and(|io| io.kind() == std::io::ErrorKind::PermissionDenied)
                    {
                        self.unreadable += 1;
                    }
                    continue;
                }
            };
            let fs_path = entry.path();
            let host = self.host_path(fs_path);
            let path = host.as_path();
            if !self.globs.is_match(path) || self.exclude.is_match(path) {
                continue;
            }
            // Follow symlinks: kubelet's `token` → `..data/token` → `..<ts>/token`.
            let Ok(meta) = fs::metadata(fs_path) else {
                continue;
            };
            if !meta.is_file() {
                continue;
            }
            let key = inode_key(&meta);
            let path_str = path.to_string_lossy().into_owned();
            let owner_pod_uid = self.kubelet_pod_uid(&path_str);
            if let Some(vol) = self.kubelet_volume_dir(path)
                && let Some(k) = dir_key(&self.fs_path(&vol))
            {
                dirs.insert(k, vol);
            }
            let entry = match self.by_inode.get(&key) {
                Some(old)
                    if old.size == meta.len()
                        && old.mtime_ns == mtime_ns(&meta)
                        && old.path == path_str =>
                {
                    old.clone()
                }
                _ => self.describe(fs_path, &path_str, key, &meta, owner_pod_uid),
            };
            found.insert(key, entry);
        }
    }

    fn describe(
        &self,
        path: &Path,
        path_str: &str,
        key: InodeKey,
        meta: &fs::Metadata,
        owner_pod_uid: Option<String>,
    ) -> SecretEntry {
        let mut credential = CredentialRef::default();
        match read_bounded(path, self.max_read) {
            Ok((bytes, truncated)) => {
                let an = analyze(path_str, &bytes);
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
        credential.identity = identity(&credential, path_str);
        credential.owner = owner_pod_uid.as_ref().map(|uid| Owner {
            kind: WorkloadKind::Pod,
            id: WorkloadId::pod_uid(uid),
            pod_uid: Some(uid.clone()),
            source: OwnerSource::KubeletVolume,
            ..Default::default()
        });
        SecretEntry {
            path: path_str.to_owned(),
            key,
            credential: Arc::new(credential),
            owner_pod_uid,
            size: meta.len(),
            mtime_ns: mtime_ns(meta),
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

fn mtime_ns(m: &fs::Metadata) -> i64 {
    m.mtime()
        .saturating_mul(1_000_000_000)
        .saturating_add(m.mtime_nsec())
}

pub fn inode_key(meta: &fs::Metadata) -> InodeKey {
    let dev = meta.dev();
    InodeKey {
        dev: InodeKey::kernel_dev(libc::major(dev), libc::minor(dev)),
        ino: meta.ino(),
    }
}

fn dir_key(p: &Path) -> Option<InodeKey> {
    let m = fs::metadata(p).ok()?;
    m.is_dir().then(|| inode_key(&m))
}

fn read_bounded(path: &Path, max: u64) -> std::io::Result<(Vec<u8>, bool)> {
    let f = fs::File::open(path)?;
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
        assert!(inv.rescan_dir(&vol));
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
}
