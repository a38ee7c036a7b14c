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

/// Parses kubelet (systemd and cgroupfs drivers, every QoS class), containerd, CRI-O, docker
/// and podman layouts, and systemd units.
pub fn parse_cgroup_path(path: &str) -> CgroupIdentity {
    let mut id = CgroupIdentity::default();
    let parts: Vec<&str> = path.split('/').filter(|p| !p.is_empty()).collect();
    let in_kubepods = parts.iter().any(|p| p.starts_with("kubepods"));
    for (i, part) in parts.iter().enumerate() {
        // systemd driver: kubepods-besteffort-pod<uid_with_underscores>.slice
        if in_kubepods && let Some(uid) = pod_uid_of(part) {
            id.pod_uid = Some(uid);
            continue;
        }
        if let Some((runtime, cid)) = container_of(part) {
            id.runtime = Some(runtime.to_owned());
            id.container_id = Some(cid);
            continue;
        }
        // cgroupfs driver: /kubepods/<qos>/pod<uid>/<64-hex container id>
        if id.pod_uid.is_some() && id.container_id.is_none() && is_container_hex(part) {
            id.container_id = Some((*part).to_owned());
            continue;
        }
        // /docker/<id> (cgroupfs docker)
        if i > 0 && parts[i - 1] == "docker" && is_container_hex(part) {
            id.runtime = Some("docker".into());
            id.container_id = Some((*part).to_owned());
            continue;
        }
        if part.ends_with(".service") {
            id.unit = Some((*part).to_owned());
        }
    }
    id
}

fn pod_uid_of(part: &str) -> Option<String> {
    let stem = part.strip_suffix(".slice").unwrap_or(part);
    let idx = stem.rfind("pod")?;
    let uid = &stem[idx + 3..];
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

/// cgroup id → path below the cgroup2 mount, by walking the hierarchy (ids are directory
/// inode numbers). Rewalks on a miss, at most every `min_rescan`.
pub struct CgroupPaths {
    root: PathBuf,
    paths: HashMap<u64, String>,
    last_walk: Option<Instant>,
    min_rescan: Duration,
}

impl CgroupPaths {
    pub fn new(root: impl Into<PathBuf>) -> Self {
        CgroupPaths {
            root: root.into(),
            paths: HashMap::new(),
            last_walk: None,
            min_rescan: Duration::from_millis(50),
        }
    }

    pub fn path(&mut self, id: u64) -> Option<&str> {
        if !self.paths.contains_key(&id)
            && self
                .last_walk
                .is_none_or(|t| t.elapsed() >= self.min_rescan)
        {
            self.walk();
        }
        self.paths.get(&id).map(String::as_str)
    }

    fn walk(&mut self) {
        self.last_walk = Some(Instant::now());
        self.paths.clear();
        for entry in walkdir::WalkDir::new(&self.root)
            .follow_links(false)
            .into_iter()
            .filter_map(Result::ok)
            .filter(|e| e.file_type().is_dir())
        {
            let Ok(meta) = entry.metadata() else { continue };
            let rel = entry
                .path()
                .strip_prefix(&self.root)
                .unwrap_or(Path::new(""));
            let rel = format!("/{}", rel.to_string_lossy());
            self.paths.insert(meta.ino(), rel);
        }
    }
}

pub struct WorkloadResolver {
    pub cgroups: CgroupPaths,
    pub trust_domain: String,
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
            cache: HashMap::new(),
        }
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
        let ident = path.as_deref().map(parse_cgroup_path).unwrap_or_default();
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
        let p = parse_cgroup_path(&format!(
            "/user.slice/user-1000.slice/user@1000.service/user.slice/libpod-{CID}.scope"
        ));
        assert_eq!(p.runtime.as_deref(), Some("podman"));
        let u = parse_cgroup_path("/system.slice/nginx.service");
        assert_eq!(u.unit.as_deref(), Some("nginx.service"));
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

    #[test]
    fn spiffe_format() {
        assert_eq!(
            spiffe_id("cluster.local", "payments", "api"),
            "spiffe://cluster.local/ns/payments/sa/api"
        );
    }
}
