//! Workload resolver: cgroup id → cgroup path → workload (pod, container, systemd unit or
//! host process). Pod names and service accounts come from the kubelet's pod list.

use std::{
    os::unix::fs::MetadataExt,
    path::{Path, PathBuf},
    sync::Arc,
    time::{Duration, Instant},
};

use foldhash::{HashMap, HashMapExt};

use crate::{
    event::{Workload, WorkloadId, WorkloadKind},
    kubelet::PodDirectory,
};

/// What the cgroup path alone says about a workload.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct CgroupIdentity {
    pub pod_uid: Option<String>,
    pub container_id: Option<String>,
    /// Container runtime that named the scope (`containerd`, `crio`, `docker`, `podman`).
    pub runtime: Option<String>,
    pub unit: Option<String>,
}

/// Where this node's cgroup layout starts, below the cgroup2 mount: `/` on a plain node;
/// a node whose systemd and kubelet run nested (a kind node, a kubelet with
/// `--cgroup-root`) names that cgroup. A `*` matches within one path component.
///
/// Only the top-level layouts below a root name a workload, so a cgroup anybody can create
/// (a user's delegated `user@<uid>.service` subtree, a container that may make cgroups of
/// its own) cannot claim to be a pod or a system unit: what matters is where a name sits,
/// never that it appears somewhere in the path.
#[derive(Clone, Debug)]
pub struct CgroupLayout {
    /// Each root as its components, longest first (the most specific match wins).
    roots: Vec<Vec<String>>,
}

impl Default for CgroupLayout {
    fn default() -> Self {
        CgroupLayout {
            roots: vec![Vec::new()],
        }
    }
}

impl CgroupLayout {
    /// `roots`: absolute cgroup paths (`/`, `/kubelet.slice`, `/nodes/*`).
    pub fn new<S: AsRef<str>>(roots: &[S]) -> Result<Self, String> {
        let mut out = Vec::new();
        for r in roots {
            out.push(parse_root(r.as_ref())?);
        }
        if out.is_empty() {
            out.push(Vec::new());
        }
        out.sort_by_key(|r| std::cmp::Reverse(r.len()));
        Ok(CgroupLayout { roots: out })
    }

    /// The path's components below the most specific root it is under, and that root's
    /// last component (a kubelet's systemd slices are named after it).
    fn split<'a>(&self, parts: &'a [&'a str]) -> Option<(&'a [&'a str], &'a str)> {
        self.roots.iter().find_map(|root| {
            let n = root.len();
            (parts.len() >= n
                && root
                    .iter()
                    .zip(parts)
                    .all(|(pat, c)| component_matches(pat, c)))
            .then(|| (&parts[n..], if n == 0 { "" } else { parts[n - 1] }))
        })
    }
}

/// A root path's components; `*` matches within one, nothing else is special.
pub fn parse_root(r: &str) -> Result<Vec<String>, String> {
    if !r.starts_with('/') {
        return Err(format!("{r:?} must be an absolute cgroup path"));
    }
    let parts: Vec<String> = r
        .split('/')
        .filter(|p| !p.is_empty())
        .map(str::to_owned)
        .collect();
    if parts.iter().any(|p| p == "." || p == "..") {
        return Err(format!("{r:?} must not contain . or .."));
    }
    Ok(parts)
}

/// `pat` (with `*` for any run of characters) against one path component.
fn component_matches(pat: &str, s: &str) -> bool {
    let mut pieces = pat.split('*');
    let first = pieces.next().unwrap_or("");
    let Some(mut rest) = s.strip_prefix(first) else {
        return false;
    };
    let pieces: Vec<&str> = pieces.collect();
    let Some((last, middle)) = pieces.split_last() else {
        return rest.is_empty();
    };
    for m in middle {
        match rest.find(m) {
            Some(i) => rest = &rest[i + m.len()..],
            None => return false,
        }
    }
    rest.len() >= last.len() && rest.ends_with(last)
}

/// [`parse_cgroup_path_in`] with the cgroup2 mount's root as the only layout root.
pub fn parse_cgroup_path(path: &str) -> CgroupIdentity {
    parse_cgroup_path_in(&CgroupLayout::default(), path)
}

/// Parses the known top-level layouts below a root of `layout`:
/// - kubelet, systemd driver: `kubepods.slice[/kubepods-<qos>.slice]/kubepods[-<qos>]-pod<uid>.slice[/<runtime>-<id>.scope]`
///   (under a root `…/<name>.slice` the kubelet names them `<name>-kubepods…`);
/// - kubelet, cgroupfs driver: `kubepods[/<qos>]/pod<uid>[/<id>|/crio-<id>|/docker-<id>]`;
/// - system units: `system.slice[/system-<x>.slice…]/<name>.service`;
/// - runtime scopes: `system.slice/<runtime>-<id>.scope`, `machine.slice/libpod-<id>.scope`;
/// - docker's cgroupfs driver: `docker/<id>`.
///
/// Anything else (user slices, session scopes, names further down) names no pod, container
/// or unit: the process is then a host process (uid + executable). What lies below a
/// container scope or a unit belongs to it.
pub fn parse_cgroup_path_in(layout: &CgroupLayout, path: &str) -> CgroupIdentity {
    let parts: Vec<&str> = path.split('/').filter(|p| !p.is_empty()).collect();
    let Some((rel, root_last)) = layout.split(&parts) else {
        return CgroupIdentity::default();
    };
    let root_slice = root_last.strip_suffix(".slice").filter(|s| !s.is_empty());
    let kubepods_slice = match root_slice {
        Some(stem) => format!("{stem}-kubepods.slice"),
        None => "kubepods.slice".to_owned(),
    };
    match rel {
        [first, rest @ ..] if *first == kubepods_slice => {
            systemd_pod(first.strip_suffix(".slice").unwrap_or(first), rest)
        }
        ["kubepods", rest @ ..] => cgroupfs_pod(rest),
        ["system.slice", rest @ ..] => system_slice(rest),
        ["machine.slice", scope, ..] => match container_of(scope) {
            Some(("podman", cid)) => container("podman", cid),
            _ => CgroupIdentity::default(),
        },
        ["docker", cid, ..] if is_container_hex(cid) => container("docker", (*cid).to_owned()),
        _ => CgroupIdentity::default(),
    }
}

fn container(runtime: &str, cid: String) -> CgroupIdentity {
    CgroupIdentity {
        runtime: Some(runtime.to_owned()),
        container_id: Some(cid),
        ..Default::default()
    }
}

/// Below `kubepods.slice`: an optional QoS slice, the pod slice, an optional container
/// scope. Each slice's name extends its parent's (systemd's slice naming), so a pod slice
/// can only sit where the kubelet puts it.
fn systemd_pod(kubepods: &str, rest: &[&str]) -> CgroupIdentity {
    let mut parent = kubepods.to_owned();
    let mut rest = rest;
    if let [qos, tail @ ..] = rest
        && let Some(stem) = qos.strip_suffix(".slice")
        && ["besteffort", "burstable"]
            .iter()
            .any(|q| stem == format!("{parent}-{q}"))
    {
        parent = stem.to_owned();
        rest = tail;
    }
    let [pod, tail @ ..] = rest else {
        return CgroupIdentity::default();
    };
    let Some(uid) = pod
        .strip_suffix(".slice")
        .and_then(|s| s.strip_prefix(&*parent))
        .and_then(|s| s.strip_prefix("-pod"))
        .and_then(pod_uid)
    else {
        return CgroupIdentity::default();
    };
    let mut id = CgroupIdentity {
        pod_uid: Some(uid),
        ..Default::default()
    };
    if let Some(scope) = tail.first()
        && let Some((runtime, cid)) = container_of(scope)
    {
        id.runtime = Some(runtime.to_owned());
        id.container_id = Some(cid);
    }
    id
}

/// Below `kubepods`: an optional QoS directory, `pod<uid>`, an optional container.
fn cgroupfs_pod(rest: &[&str]) -> CgroupIdentity {
    let rest = match rest {
        [q, tail @ ..] if *q == "besteffort" || *q == "burstable" => tail,
        _ => rest,
    };
    let [pod, tail @ ..] = rest else {
        return CgroupIdentity::default();
    };
    let Some(uid) = pod.strip_prefix("pod").and_then(pod_uid) else {
        return CgroupIdentity::default();
    };
    let mut id = CgroupIdentity {
        pod_uid: Some(uid),
        ..Default::default()
    };
    if let Some(c) = tail.first() {
        let named = [("crio-", "crio"), ("docker-", "docker")]
            .iter()
            .find_map(|(p, rt)| c.strip_prefix(p).map(|cid| (*rt, cid)));
        match named {
            Some((rt, cid)) if is_container_hex(cid) => {
                id.runtime = Some(rt.to_owned());
                id.container_id = Some(cid.to_owned());
            }
            None if is_container_hex(c) => id.container_id = Some((*c).to_owned()),
            _ => {}
        }
    }
    id
}

/// Below `system.slice`: nested `system-<x>.slice` slices, then a service or a container
/// runtime's scope.
fn system_slice(rest: &[&str]) -> CgroupIdentity {
    let mut parent = "system".to_owned();
    for part in rest {
        if let Some(stem) = part.strip_suffix(".slice") {
            if stem.len() > parent.len() + 1
                && stem.starts_with(&*parent)
                && stem.as_bytes()[parent.len()] == b'-'
            {
                parent = stem.to_owned();
                continue;
            }
            return CgroupIdentity::default();
        }
        if let Some((runtime, cid)) = container_of(part) {
            return container(runtime, cid);
        }
        if part.len() > ".service".len() && part.ends_with(".service") {
            return CgroupIdentity {
                unit: Some((*part).to_owned()),
                ..Default::default()
            };
        }
        return CgroupIdentity::default();
    }
    CgroupIdentity::default()
}

/// `0a1b2c3d_4e5f_…` (systemd) or `0a1b2c3d-4e5f-…` (cgroupfs) → the pod uid.
fn pod_uid(uid: &str) -> Option<String> {
    // 8-4-4-4-12 hex, with '_' (systemd) or '-' (cgroupfs).
    let norm: String = uid
        .chars()
        .map(|c| if c == '_' { '-' } else { c })
        .collect();
    let ok = norm.len() == 36
        && norm.char_indices().all(|(i, c)| {
            if [8, 13, 18, 23].contains(&i) {
                c == '-'
            } else {
                c.is_ascii_hexdigit()
            }
        });
    ok.then_some(norm)
}

fn container_of(part: &str) -> Option<(&'static str, String)> {
    let stem = part.strip_suffix(".scope")?;
    for (prefix, runtime) in [
        ("cri-containerd-", "containerd"),
        ("crio-", "crio"),
        ("docker-", "docker"),
        ("libpod-", "podman"),
    ] {
        if let Some(id) = stem.strip_prefix(prefix)
            && is_container_hex(id)
        {
            return Some((runtime, id.to_owned()));
        }
    }
    None
}

fn is_container_hex(s: &str) -> bool {
    s.len() >= 12 && s.len() <= 64 && s.bytes().all(|b| b.is_ascii_hexdigit())
}

/// cgroup id → path below the cgroup2 mount. On cgroup2 the id is the kernfs node id, which
/// is also the file handle `name_to_handle_at` gives: `open_by_handle_at` on the mount opens
/// the cgroup directly (one syscall, no walk; needs CAP_DAC_READ_SEARCH) and its fd names the
/// path. Without that (no capability, not a cgroup2 mount) a walk bounded in depth and size,
/// at most every [`WALK_EVERY`], fills the cache. Ids that resolve to nothing are remembered
/// for a while, so events of a vanished cgroup cost a lookup each [`MISS_TTL`], not each
/// event.
pub struct CgroupPaths {
    root: PathBuf,
    handles: Option<HandleOpener>,
    paths: HashMap<u64, String>,
    misses: HashMap<u64, Instant>,
    last_walk: Option<Instant>,
    /// Lookups that found nothing (stats).
    pub unresolved: u64,
    /// Fallback walks of the hierarchy done (stats, tests).
    pub walks: u64,
}

/// How often the fallback walk may run (only on a miss).
const WALK_EVERY: Duration = Duration::from_secs(5);
/// How long an id that resolved to nothing stays unresolved before it is asked again.
const MISS_TTL: Duration = Duration::from_secs(10);
/// Bounds on the fallback walk: no layout above is deeper than a handful of levels below its
/// root, and a node has far fewer cgroups than this.
const WALK_MAX_DEPTH: usize = 12;
const WALK_MAX_DIRS: usize = 200_000;
/// Cached paths (and remembered misses); past it the cache starts over.
const MAX_PATHS: usize = 1 << 16;

const CGROUP2_SUPER_MAGIC: i64 = 0x6367_7270;
/// `FILEID_KERNFS` in include/linux/exportfs.h.
const FILEID_KERNFS: i32 = 0xfe;

/// `struct file_handle` with room for a kernfs handle (the 64-bit node id).
#[repr(C)]
struct KernfsHandle {
    handle_bytes: u32,
    handle_type: i32,
    id: [u8; 8],
}

struct HandleOpener {
    mount: std::os::fd::OwnedFd,
    /// The mount's path as /proc/self/fd links show it.
    prefix: String,
}

impl HandleOpener {
    /// Only for a cgroup2 mount whose root's own handle is the kernfs id we expect.
    fn new(root: &Path) -> Option<Self> {
        use std::os::{fd::AsRawFd, unix::ffi::OsStrExt};
        let dir = std::fs::File::open(root).ok()?;
        // SAFETY: statfs on a valid fd into a zeroed struct.
        let mut sfs: libc::statfs = unsafe { std::mem::zeroed() };
        if unsafe { libc::fstatfs(dir.as_raw_fd(), &mut sfs) } != 0
            || sfs.f_type as i64 != CGROUP2_SUPER_MAGIC
        {
            return None;
        }
        let mut h = KernfsHandle {
            handle_bytes: 8,
            handle_type: 0,
            id: [0; 8],
        };
        let mut mount_id = 0;
        let empty = c"";
        // SAFETY: the handle has room for 8 bytes, as handle_bytes says.
        let r = unsafe {
            libc::name_to_handle_at(
                dir.as_raw_fd(),
                empty.as_ptr(),
                (&mut h as *mut KernfsHandle).cast(),
                &mut mount_id,
                libc::AT_EMPTY_PATH,
            )
        };
        let ino = dir.metadata().ok()?.ino();
        if r != 0 || h.handle_type != FILEID_KERNFS || u64::from_ne_bytes(h.id) != ino {
            return None;
        }
        let prefix = std::fs::read_link(format!("/proc/self/fd/{}", dir.as_raw_fd())).ok()?;
        let opener = HandleOpener {
            mount: dir.into(),
            prefix: String::from_utf8_lossy(prefix.as_os_str().as_bytes())
                .trim_end_matches('/')
                .to_owned(),
        };
        // The capability is there (or not) now; without it every lookup would fail.
        opener.open(ino).map(|_| opener)
    }

    /// The path of cgroup `id` below the mount, if it exists.
    fn open(&self, id: u64) -> Option<String> {
        use std::os::{
            fd::{AsRawFd, FromRawFd, OwnedFd},
            unix::ffi::OsStrExt,
        };
        let mut h = KernfsHandle {
            handle_bytes: 8,
            handle_type: FILEID_KERNFS,
            id: id.to_ne_bytes(),
        };
        // SAFETY: a well-formed handle; the fd is owned right after.
        let fd = unsafe {
            libc::open_by_handle_at(
                self.mount.as_raw_fd(),
                (&mut h as *mut KernfsHandle).cast(),
                libc::O_RDONLY | libc::O_DIRECTORY | libc::O_CLOEXEC,
            )
        };
        if fd < 0 {
            return None;
        }
        // SAFETY: fd was just returned to us.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        let link = std::fs::read_link(format!("/proc/self/fd/{}", fd.as_raw_fd())).ok()?;
        let link = String::from_utf8_lossy(link.as_os_str().as_bytes()).into_owned();
        let rel = link.strip_prefix(&self.prefix)?;
        match rel {
            "" => Some("/".to_owned()),
            r if r.starts_with('/') && !r.ends_with(" (deleted)") => Some(r.to_owned()),
            _ => None,
        }
    }
}

impl CgroupPaths {
    pub fn new(root: impl Into<PathBuf>) -> Self {
        let root = root.into();
        CgroupPaths {
            handles: HandleOpener::new(&root),
            root,
            paths: HashMap::new(),
            misses: HashMap::new(),
            last_walk: None,
            unresolved: 0,
            walks: 0,
        }
    }

    /// True when ids resolve through file handles (no walks).
    pub fn by_handle(&self) -> bool {
        self.handles.is_some()
    }

    pub fn path(&mut self, id: u64) -> Option<&str> {
        if !self.paths.contains_key(&id) {
            self.lookup(id);
        }
        self.paths.get(&id).map(String::as_str)
    }

    fn lookup(&mut self, id: u64) {
        let now = Instant::now();
        if self
            .misses
            .get(&id)
            .is_some_and(|t| now.duration_since(*t) < MISS_TTL)
        {
            return;
        }
        let found = match &self.handles {
            Some(h) => h.open(id),
            None => {
                if self.last_walk.is_none_or(|t| t.elapsed() >= WALK_EVERY) {
                    self.walk();
                }
                self.paths.remove(&id)
            }
        };
        if self.paths.len() >= MAX_PATHS {
            self.paths.clear();
        }
        if self.misses.len() >= MAX_PATHS {
            self.misses.clear();
        }
        match found {
            Some(p) => {
                self.misses.remove(&id);
                self.paths.insert(id, p);
            }
            None => {
                self.unresolved += 1;
                self.misses.insert(id, now);
            }
        }
    }

    /// The fallback: fills the cache from a bounded walk of the hierarchy.
    fn walk(&mut self) {
        self.last_walk = Some(Instant::now());
        self.walks += 1;
        let mut seen = 0;
        for entry in walkdir::WalkDir::new(&self.root)
            .follow_links(false)
            .max_depth(WALK_MAX_DEPTH)
            .into_iter()
            .filter_map(Result::ok)
            .filter(|e| e.file_type().is_dir())
        {
            seen += 1;
            if seen > WALK_MAX_DIRS || self.paths.len() >= MAX_PATHS {
                break;
            }
            let Ok(meta) = entry.metadata() else { continue };
            let rel = entry
                .path()
                .strip_prefix(&self.root)
                .unwrap_or(Path::new(""));
            let rel = format!("/{}", rel.to_string_lossy());
            self.misses.remove(&meta.ino());
            self.paths.insert(meta.ino(), rel);
        }
    }
}

pub struct WorkloadResolver {
    pub cgroups: CgroupPaths,
    pub trust_domain: String,
    layout: CgroupLayout,
    /// Resolved identities by cgroup id: every event of a workload shares one.
    cache: HashMap<u64, Cached>,
}

struct Cached {
    pods_generation: u64,
    /// A host workload is named by uid and executable too; other kinds by the cgroup alone.
    uid: u32,
    exe: String,
    workload: Arc<Workload>,
}

/// Bound on cached identities; past it the cache starts over (cgroups come and go).
const MAX_CACHED: usize = 1 << 16;

impl WorkloadResolver {
    pub fn new(cgroup_root: impl Into<PathBuf>, trust_domain: &str) -> Self {
        WorkloadResolver {
            cgroups: CgroupPaths::new(cgroup_root),
            trust_domain: trust_domain.to_owned(),
            layout: CgroupLayout::default(),
            cache: HashMap::new(),
        }
    }

    /// The resolver `[kubernetes]` describes (trust domain, cgroup roots) for the cgroup2
    /// mount at `cgroup_root`.
    pub fn from_config(
        cgroup_root: impl Into<PathBuf>,
        cfg: &crate::kubelet::Config,
    ) -> anyhow::Result<Self> {
        let roots = cfg.cgroup_roots();
        let layout = CgroupLayout::new(&roots)
            .map_err(|e| anyhow::anyhow!("kubernetes.cgroup_roots: {e}"))?;
        let r = Self::new(cgroup_root, &cfg.trust_domain).with_layout(layout);
        if !r.cgroups.by_handle() {
            tracing::warn!(
                "cgroup ids resolve by a bounded walk of the hierarchy (no file handles: \
                 CAP_DAC_READ_SEARCH missing or not a cgroup2 mount)"
            );
        }
        Ok(r)
    }

    pub fn with_layout(mut self, layout: CgroupLayout) -> Self {
        self.layout = layout;
        self.cache.clear();
        self
    }

    /// [`Self::resolve_uncached`], remembered per cgroup until the pod directory changes.
    /// cgroup ids are never reused while the kernel runs, so an id's path cannot change.
    pub fn resolve(
        &mut self,
        cgroup_id: u64,
        uid: u32,
        exe: &str,
        pods: &PodDirectory,
    ) -> Arc<Workload> {
        if let Some(c) = self.cache.get(&cgroup_id)
            && c.pods_generation == pods.generation()
            && (c.workload.kind != WorkloadKind::Host || (c.uid == uid && c.exe == exe))
        {
            return c.workload.clone();
        }
        let w = Arc::new(self.resolve_uncached(cgroup_id, uid, exe, pods));
        // An unknown cgroup may appear at the next walk: not cached.
        if w.cgroup.is_some() {
            if self.cache.len() >= MAX_CACHED {
                self.cache.clear();
            }
            self.cache.insert(
                cgroup_id,
                Cached {
                    pods_generation: pods.generation(),
                    uid,
                    exe: exe.to_owned(),
                    workload: w.clone(),
                },
            );
        }
        w
    }

    /// `uid` and `exe` name host workloads (no container, pod or unit).
    pub fn resolve_uncached(
        &mut self,
        cgroup_id: u64,
        uid: u32,
        exe: &str,
        pods: &PodDirectory,
    ) -> Workload {
        let path = self.cgroups.path(cgroup_id).map(str::to_owned);
        let ident = path
            .as_deref()
            .map(|p| parse_cgroup_path_in(&self.layout, p))
            .unwrap_or_default();
        let mut w = Workload {
            cgroup_id,
            cgroup: path,
            ..Default::default()
        };
        if let Some(pod_uid) = &ident.pod_uid {
            w.kind = WorkloadKind::Pod;
            w.pod_uid = Some(pod_uid.clone());
            w.container_id = ident.container_id.clone();
            if let Some(pod) = pods.by_uid(pod_uid) {
                w.namespace = Some(pod.namespace.clone());
                w.pod = Some(pod.name.clone());
                w.service_account = Some(pod.service_account.clone());
                w.spiffe_id = Some(spiffe_id(
                    &self.trust_domain,
                    &pod.namespace,
                    &pod.service_account,
                ));
                w.id = WorkloadId::pod(&pod.namespace, &pod.name);
            } else {
                // Not (yet) in the kubelet's list: the uid still identifies the pod.
                w.id = WorkloadId::pod_uid(pod_uid);
            }
        } else if let Some(cid) = &ident.container_id {
            w.kind = WorkloadKind::Container;
            w.container_id = Some(cid.clone());
            w.id = WorkloadId::container(cid);
        } else if let Some(unit) = &ident.unit {
            w.kind = WorkloadKind::Unit;
            w.unit = Some(unit.clone());
            w.id = WorkloadId::unit(unit);
        } else {
            w.kind = WorkloadKind::Host;
            w.id = WorkloadId::host(uid, exe);
        }
        w
    }
}

pub fn spiffe_id(trust_domain: &str, namespace: &str, service_account: &str) -> String {
    format!("spiffe://{trust_domain}/ns/{namespace}/sa/{service_account}")
}

#[cfg(test)]
mod tests {
    use super::*;

    const CID: &str = "3f1e5b2a9c8d7e6f5a4b3c2d1e0f9a8b7c6d5e4f3a2b1c0d9e8f7a6b5c4d3e2f";

    #[test]
    fn kubelet_systemd_driver_all_qos() {
        for qos in ["besteffort", "burstable"] {
            let p = format!(
                "/kubepods.slice/kubepods-{qos}.slice/kubepods-{qos}-pod0a1b2c3d_4e5f_6789_abcd_ef0123456789.slice/cri-containerd-{CID}.scope"
            );
            let id = parse_cgroup_path(&p);
            assert_eq!(
                id.pod_uid.as_deref(),
                Some("0a1b2c3d-4e5f-6789-abcd-ef0123456789")
            );
            assert_eq!(id.container_id.as_deref(), Some(CID));
            assert_eq!(id.runtime.as_deref(), Some("containerd"));
        }
        let guaranteed = format!(
            "/kubepods.slice/kubepods-pod0a1b2c3d_4e5f_6789_abcd_ef0123456789.slice/crio-{CID}.scope"
        );
        let id = parse_cgroup_path(&guaranteed);
        assert_eq!(
            id.pod_uid.as_deref(),
            Some("0a1b2c3d-4e5f-6789-abcd-ef0123456789")
        );
        assert_eq!(id.runtime.as_deref(), Some("crio"));
    }

    #[test]
    fn kubelet_cgroupfs_driver() {
        let p = format!("/kubepods/burstable/pod0a1b2c3d-4e5f-6789-abcd-ef0123456789/{CID}");
        let id = parse_cgroup_path(&p);
        assert_eq!(
            id.pod_uid.as_deref(),
            Some("0a1b2c3d-4e5f-6789-abcd-ef0123456789")
        );
        assert_eq!(id.container_id.as_deref(), Some(CID));
    }

    #[test]
    fn containers_units_and_host() {
        let d = parse_cgroup_path(&format!("/system.slice/docker-{CID}.scope"));
        assert_eq!((d.runtime.as_deref(), d.pod_uid), (Some("docker"), None));
        let d = parse_cgroup_path(&format!("/docker/{CID}"));
        assert_eq!(d.container_id.as_deref(), Some(CID));
        let p = parse_cgroup_path(&format!("/machine.slice/libpod-{CID}.scope/container"));
        assert_eq!(p.runtime.as_deref(), Some("podman"));
        let u = parse_cgroup_path("/system.slice/nginx.service");
        assert_eq!(u.unit.as_deref(), Some("nginx.service"));
        let u = parse_cgroup_path("/system.slice/system-getty.slice/getty@tty1.service");
        assert_eq!(u.unit.as_deref(), Some("getty@tty1.service"));
        // What a delegated service makes below itself is still that service.
        let u = parse_cgroup_path("/system.slice/ci.service/job/backup.service");
        assert_eq!(u.unit.as_deref(), Some("ci.service"));
        assert_eq!(parse_cgroup_path("/"), CgroupIdentity::default());
        assert_eq!(
            parse_cgroup_path("/user.slice/user-1000.slice/session-3.scope").unit,
            None
        );
        // A pod-looking name outside kubepods is not a pod.
        assert_eq!(
            parse_cgroup_path("/system.slice/pod0a1b2c3d_4e5f_6789_abcd_ef0123456789.slice")
                .pod_uid,
            None
        );
    }

    /// Finding 1 of the hostile-node review: a user's delegated subtree could name itself
    /// after a victim pod (`kubepods` anywhere in the path) or a system unit (any
    /// `*.service` component). Only the top-level layouts name workloads now.
    #[test]
    fn user_slices_and_nested_names_never_yield_pods_units_or_containers() {
        let user = "/user.slice/user-1000.slice/user@1000.service";
        let victim = "kubepods-besteffort-pod0a1b2c3d_4e5f_6789_abcd_ef0123456789.slice";
        for spoof in [
            format!("{user}/app.slice/{victim}"),
            format!("{user}/kubepods.slice/kubepods-besteffort.slice/{victim}/cri-containerd-{CID}.scope"),
            format!("{user}/kubepods/burstable/pod0a1b2c3d-4e5f-6789-abcd-ef0123456789/{CID}"),
            format!("{user}/backup.service"),
            format!("{user}/app.slice/backup.service"),
            format!("{user}/system.slice/backup.service"),
            format!("{user}/user.slice/libpod-{CID}.scope"),
            format!("{user}/docker/{CID}"),
            // A pod slice that does not extend its parent's name.
            "/kubepods.slice/kubepods-besteffort.slice/kubepods-burstable-pod0a1b2c3d_4e5f_6789_abcd_ef0123456789.slice".to_owned(),
            format!("/kubepods.slice/other.slice/{victim}"),
            "/system.slice/user.slice/backup.service".to_owned(),
            "/backup.service".to_owned(),
            "/user.slice/backup.service".to_owned(),
        ] {
            let id = parse_cgroup_path(&spoof);
            assert_eq!(
                (id.pod_uid.as_deref(), id.unit.as_deref(), id.container_id.as_deref()),
                (None, None, None),
                "{spoof}"
            );
        }
        // Below a real container (which may create cgroups of its own) it is that container.
        let id = parse_cgroup_path(&format!(
            "/system.slice/docker-{CID}.scope/kubepods.slice/{victim}"
        ));
        assert_eq!((id.pod_uid, id.container_id.as_deref()), (None, Some(CID)));
        // A container's own sub-cgroups stay that pod's container.
        let id = parse_cgroup_path(&format!(
            "/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod0a1b2c3d_4e5f_6789_abcd_ef0123456789.slice/cri-containerd-{CID}.scope/sub"
        ));
        assert_eq!(id.container_id.as_deref(), Some(CID));
    }

    /// A node whose layout starts below the mount's root: a kubelet with
    /// `--cgroup-root=/kubelet` (kind names its slices `kubelet-kubepods…`), or a test
    /// harness's per-test prefix.
    #[test]
    fn layouts_below_configured_roots() {
        let pod = "kubepods-besteffort-pod0a1b2c3d_4e5f_6789_abcd_ef0123456789.slice";
        let kind = CgroupLayout::new(&["/", "/kubelet.slice"]).unwrap();
        let id = parse_cgroup_path_in(
            &kind,
            &format!(
                "/kubelet.slice/kubelet-kubepods.slice/kubelet-kubepods-besteffort.slice/kubelet-{pod}/cri-containerd-{CID}.scope"
            ),
        );
        assert_eq!(
            id.pod_uid.as_deref(),
            Some("0a1b2c3d-4e5f-6789-abcd-ef0123456789")
        );
        assert_eq!(id.container_id.as_deref(), Some(CID));
        // Plain `kubepods.slice` under that root is not where this kubelet puts pods.
        assert_eq!(
            parse_cgroup_path_in(
                &kind,
                &format!("/kubelet.slice/kubepods.slice/kubepods-besteffort.slice/{pod}")
            )
            .pod_uid,
            None
        );
        let tests = CgroupLayout::new(&["/", "/cwtest-*"]).unwrap();
        let id = parse_cgroup_path_in(
            &tests,
            &format!("/cwtest-12-3/kubepods.slice/kubepods-besteffort.slice/{pod}"),
        );
        assert!(id.pod_uid.is_some());
        let id = parse_cgroup_path_in(&tests, "/cwtest-12-3/system.slice/cw-backup.service");
        assert_eq!(id.unit.as_deref(), Some("cw-backup.service"));
        // `*` stays within one component, and the default root does not see prefixed trees.
        assert_eq!(
            parse_cgroup_path_in(&tests, "/x/cwtest-1/system.slice/a.service").unit,
            None
        );
        assert_eq!(
            parse_cgroup_path("/cwtest-12-3/system.slice/cw-backup.service").unit,
            None
        );
        assert!(CgroupLayout::new(&["relative"]).is_err());
        assert!(CgroupLayout::new(&["/a/../b"]).is_err());
        assert!(component_matches("cwtest-*", "cwtest-"));
        assert!(component_matches("a*b*c", "aXbYc"));
        assert!(!component_matches("a*b", "ab-c"));
    }

    /// On a real cgroup2 mount ids resolve through file handles (no walk); elsewhere (a
    /// plain directory) the bounded walk still finds them, and a vanished id is remembered
    /// as unresolved instead of walking again on every event.
    #[test]
    fn ids_resolve_by_walk_on_plain_directories_and_misses_are_remembered() {
        let tmp = tempfile::tempdir().unwrap();
        let scope = tmp.path().join("system.slice/a.service");
        std::fs::create_dir_all(&scope).unwrap();
        let id = std::fs::metadata(&scope).unwrap().ino();
        let mut paths = CgroupPaths::new(tmp.path());
        assert!(!paths.by_handle());
        assert_eq!(paths.path(id), Some("/system.slice/a.service"));
        assert_eq!(paths.path(u64::MAX), None);
        let walked = paths.last_walk;
        assert_eq!(paths.path(u64::MAX), None);
        assert_eq!(paths.last_walk, walked, "a remembered miss does not walk");
        assert_eq!(paths.unresolved, 1);
    }

    #[test]
    fn spiffe_format() {
        assert_eq!(
            spiffe_id("cluster.local", "payments", "api"),
            "spiffe://cluster.local/ns/payments/sa/api"
        );
    }
}
