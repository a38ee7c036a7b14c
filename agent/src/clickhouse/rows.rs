//! Table rows: the event and alert models flattened to ClickHouse columns, and back (the
//! round trip is what the integration tests compare against the NDJSON). Absent optional
//! strings are stored as `''`, absent numbers as NULL; addresses as IPv6 with the family
//! kept so an IPv4 peer comes back as IPv4.

use std::{
    collections::BTreeMap,
    net::{IpAddr, Ipv6Addr},
    sync::Arc,
};

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use crate::{
    alert::Alert,
    event::{
        Body, Connect, CredentialRef, CredentialType, CredentialUse, Destination, DnsAnswer, Event,
        EventKind, ExecInfo, ExposedCredential, Label, MetadataFetch, Owner, OwnerSource,
        PrivChange, ProcessAccess, ProcessInfo, SecretRead, SecretRef, TargetProcess, Timestamp,
        Workload, WorkloadId, WorkloadKind,
    },
};

#[derive(Clone, Debug, PartialEq, clickhouse::Row, Serialize, Deserialize)]
pub struct EventRow {
    pub id: String,
    #[serde(with = "clickhouse::serde::chrono::datetime64::nanos")]
    pub ts: DateTime<Utc>,
    pub node: String,
    pub kind: String,
    pub pid: u32,
    pub tgid: u32,
    pub ppid: u32,
    pub uid: u32,
    pub euid: u32,
    pub gid: u32,
    pub egid: u32,
    pub comm: String,
    pub exe: String,
    pub tty: String,
    pub session: String,
    pub workload_kind: String,
    pub workload_id: String,
    pub namespace: String,
    pub pod: String,
    pub pod_uid: String,
    pub service_account: String,
    pub spiffe_id: String,
    pub container_id: String,
    pub unit: String,
    pub cgroup_id: u64,
    pub cgroup: String,
    pub secret_path: String,
    pub opened_as: String,
    pub dev: u64,
    pub inode: u64,
    pub syscall: String,
    pub access: String,
    pub open_flags: i32,
    pub matched: String,
    pub fd: i32,
    pub fingerprint: String,
    pub credential_type: String,
    pub labels: BTreeMap<String, String>,
    pub owner_kind: String,
    pub owner_id: String,
    pub owner_namespace: String,
    pub owner_pod: String,
    pub owner_pod_uid: String,
    pub owner_source: String,
    /// 0 when the event has no destination, else 4 or 6.
    pub dst_family: u8,
    pub dst_ip: Ipv6Addr,
    pub dst_port: u16,
    pub dst_proto: String,
    pub dst_name: String,
    pub result: String,
    pub exec_filename: String,
    pub exec_cap_effective: u64,
    pub exec_truncated: bool,
    pub exit_code: Option<i32>,
    pub priv_via: String,
    pub priv_old_uid: u32,
    pub priv_old_euid: u32,
    pub priv_new_uid: u32,
    pub priv_new_euid: u32,
    pub priv_old_caps: u64,
    pub priv_new_caps: u64,
    pub dns_name: String,
    pub dns_addrs: Vec<Ipv6Addr>,
    pub dns_ttl: u32,
    pub dns_server: Option<Ipv6Addr>,
    pub read_event: String,
    #[serde(with = "clickhouse::serde::chrono::datetime64::nanos::option")]
    pub read_ts: Option<DateTime<Utc>>,
    pub via: String,
    pub repeats: u64,
    pub abi: String,
    pub opened_as_status: String,
    pub dst_metadata: bool,
    pub exec_argv: Vec<String>,
    pub exec_env_truncated: bool,
    /// JSON: the environment's and the command line's exposed credentials.
    pub exposed_credentials: String,
    pub access_kind: String,
    pub target_pid: u32,
    pub target_comm: String,
    pub target_exe: String,
    pub target_workload_id: String,
    /// The target's whole workload as JSON (the id above is for queries).
    pub target_workload: String,
    pub metadata_method: String,
    pub metadata_path: String,
    pub metadata_provider: String,
    pub metadata_credentials: bool,
    pub metadata_role: String,
    pub credential_identity: String,
    pub maintenance: bool,
    pub attribution: String,
    /// 0: none.
    pub via_pid: u32,
    /// JSON: what a memory-access target held.
    pub target_credentials: String,
}

/// What exec exposed, in one JSON column (a row has room for one list).
#[derive(Serialize, Deserialize, Default)]
struct Exposed {
    #[serde(default)]
    env: Vec<ExposedCredential>,
    #[serde(default)]
    argv: Vec<ExposedCredential>,
}

fn s(v: &Option<String>) -> String {
    v.clone().unwrap_or_default()
}

fn opt(v: String) -> Option<String> {
    (!v.is_empty()).then_some(v)
}

fn v6(ip: IpAddr) -> Ipv6Addr {
    match ip {
        IpAddr::V4(a) => a.to_ipv6_mapped(),
        IpAddr::V6(a) => a,
    }
}

/// Only for values stored from an `IpAddr` that was IPv4 (family kept elsewhere).
fn back(ip: Ipv6Addr, family: u8) -> IpAddr {
    match (family, ip.to_ipv4_mapped()) {
        (4, Some(a)) => IpAddr::V4(a),
        _ => IpAddr::V6(ip),
    }
}

/// Rough wire size, for batching by bytes.
pub trait ApproxSize {
    fn approx_bytes(&self) -> usize;
}

/// What names a row in its table: (node, id) is unique, `ts` bounds where to look. The
/// writer asks whether a spooled batch's first and last rows are stored before sending it
/// again.
pub trait RowKey {
    fn row_id(&self) -> &str;
    fn row_node(&self) -> &str;
    fn row_ts_ns(&self) -> i64;
}

impl RowKey for EventRow {
    fn row_id(&self) -> &str {
        &self.id
    }
    fn row_node(&self) -> &str {
        &self.node
    }
    fn row_ts_ns(&self) -> i64 {
        self.ts.timestamp_nanos_opt().unwrap_or(0)
    }
}

impl RowKey for AlertRow {
    fn row_id(&self) -> &str {
        &self.id
    }
    fn row_node(&self) -> &str {
        &self.node
    }
    fn row_ts_ns(&self) -> i64 {
        self.ts.timestamp_nanos_opt().unwrap_or(0)
    }
}

impl ApproxSize for EventRow {
    fn approx_bytes(&self) -> usize {
        200 + self.id.len()
            + self.comm.len()
            + self.exe.len()
            + self.workload_id.len()
            + self.cgroup.len()
            + self.secret_path.len()
            + self.opened_as.len()
            + self.fingerprint.len()
            + self.exec_filename.len()
            + self
                .labels
                .iter()
                .map(|(k, v)| k.len() + v.len())
                .sum::<usize>()
    }
}

impl From<&Event> for EventRow {
    fn from(e: &Event) -> Self {
        let p = &e.process;
        let w = &e.workload;
        let sec = e.secret().map(|s| SecretRef::clone(s)).unwrap_or_default();
        let cred = e.credential().map(|c| CredentialRef::clone(c));
        let owner = cred.as_ref().and_then(|c| c.owner.clone());
        let (fingerprint, credential_type, labels, credential_identity) = match cred {
            Some(c) => (
                c.fingerprint,
                c.kind.as_str().to_owned(),
                c.labels,
                c.identity,
            ),
            None => (String::new(), String::new(), BTreeMap::new(), String::new()),
        };
        // A Unix-domain destination is family 1 (AF_UNIX) with its path in `dst_name`.
        let (dst_family, dst_ip, dst_port, dst_proto, dst_name) = match e.dst() {
            Some(d) => match d.ip {
                Some(ip) => (
                    if ip.is_ipv4() { 4 } else { 6 },
                    v6(ip),
                    d.port,
                    d.proto.to_string(),
                    s(&d.name),
                ),
                None => (1, Ipv6Addr::UNSPECIFIED, 0, d.proto.to_string(), s(&d.path)),
            },
            None => (0, Ipv6Addr::UNSPECIFIED, 0, String::new(), String::new()),
        };
        let mut row = EventRow {
            id: e.id.clone(),
            ts: e.ts.0,
            node: e.node.to_string(),
            kind: e.kind().as_str().to_owned(),
            pid: p.pid,
            tgid: p.tgid,
            ppid: p.ppid,
            uid: p.uid,
            euid: p.euid,
            gid: p.gid,
            egid: p.egid,
            comm: p.comm.clone(),
            exe: p.exe.clone(),
            tty: s(&p.tty),
            session: s(&p.session),
            workload_kind: w.kind.as_str().to_owned(),
            workload_id: w.id.to_string(),
            namespace: s(&w.namespace),
            pod: s(&w.pod),
            pod_uid: s(&w.pod_uid),
            service_account: s(&w.service_account),
            spiffe_id: s(&w.spiffe_id),
            container_id: s(&w.container_id),
            unit: s(&w.unit),
            cgroup_id: w.cgroup_id,
            cgroup: s(&w.cgroup),
            secret_path: s(&sec.path),
            opened_as: sec.opened_as,
            dev: sec.dev,
            inode: sec.inode,
            syscall: sec.syscall.into_owned(),
            access: sec.access.into_owned(),
            open_flags: sec.open_flags,
            matched: sec.matched.into_owned(),
            fd: sec.fd,
            fingerprint,
            credential_type,
            labels,
            owner_kind: owner
                .as_ref()
                .map(|o| o.kind.as_str().to_owned())
                .unwrap_or_default(),
            owner_id: owner.as_ref().map(|o| o.id.to_string()).unwrap_or_default(),
            owner_namespace: owner.as_ref().map(|o| s(&o.namespace)).unwrap_or_default(),
            owner_pod: owner.as_ref().map(|o| s(&o.pod)).unwrap_or_default(),
            owner_pod_uid: owner.as_ref().map(|o| s(&o.pod_uid)).unwrap_or_default(),
            owner_source: owner
                .as_ref()
                .map(|o| o.source.as_str().to_owned())
                .unwrap_or_default(),
            dst_family,
            dst_ip,
            dst_port,
            dst_proto,
            dst_name,
            result: String::new(),
            exec_filename: String::new(),
            exec_cap_effective: 0,
            exec_truncated: false,
            exit_code: None,
            priv_via: String::new(),
            priv_old_uid: 0,
            priv_old_euid: 0,
            priv_new_uid: 0,
            priv_new_euid: 0,
            priv_old_caps: 0,
            priv_new_caps: 0,
            dns_name: String::new(),
            dns_addrs: Vec::new(),
            dns_ttl: 0,
            dns_server: None,
            read_event: String::new(),
            read_ts: None,
            via: String::new(),
            repeats: 0,
            abi: String::new(),
            opened_as_status: String::new(),
            dst_metadata: e.dst().is_some_and(|d| d.metadata),
            exec_argv: Vec::new(),
            exec_env_truncated: false,
            exposed_credentials: String::new(),
            access_kind: String::new(),
            target_pid: 0,
            target_comm: String::new(),
            target_exe: String::new(),
            target_workload_id: String::new(),
            target_workload: String::new(),
            metadata_method: String::new(),
            metadata_path: String::new(),
            metadata_provider: String::new(),
            metadata_credentials: false,
            metadata_role: String::new(),
            credential_identity,
            maintenance: false,
            attribution: String::new(),
            via_pid: 0,
            target_credentials: String::new(),
        };
        if let Some(sr) = e.secret() {
            row.repeats = sr.repeats;
            row.abi = sr.abi.as_deref().unwrap_or_default().to_owned();
            row.opened_as_status = sr
                .opened_as_status
                .as_deref()
                .unwrap_or_default()
                .to_owned();
        }
        match &e.body {
            Body::Exec(x) => {
                row.exec_filename = x.filename.clone();
                row.exec_cap_effective = x.cap_effective;
                row.exec_truncated = x.truncated;
                row.exec_argv = x.argv.clone();
                row.exec_env_truncated = x.env_truncated;
                row.abi = x.abi.as_deref().unwrap_or_default().to_owned();
                if !x.env_credentials.is_empty() || !x.argv_credentials.is_empty() {
                    row.exposed_credentials = serde_json::to_string(&Exposed {
                        env: x.env_credentials.clone(),
                        argv: x.argv_credentials.clone(),
                    })
                    .unwrap_or_default();
                }
            }
            Body::Exit { code } => row.exit_code = Some(*code),
            Body::SecretRead(r) => row.maintenance = r.maintenance,
            Body::Connect(c) => {
                row.result = c.result.to_string();
                row.via = c.via.to_string();
            }
            Body::ProcessAccess(a) => {
                row.access_kind = a.access.to_string();
                row.target_pid = a.target.pid;
                row.target_comm = a.target.comm.clone();
                row.target_exe = a.target.exe.clone();
                row.target_workload_id = a.target.workload.id.to_string();
                row.target_workload = serde_json::to_string(&a.target.workload).unwrap_or_default();
                if !a.target.credentials.is_empty() {
                    row.target_credentials =
                        serde_json::to_string(&a.target.credentials).unwrap_or_default();
                }
            }
            Body::MetadataFetch(m) => {
                row.metadata_method = m.method.clone();
                row.metadata_path = m.path.clone();
                row.metadata_provider = m.provider.to_string();
                row.metadata_credentials = m.credentials;
                row.metadata_role = s(&m.role);
            }
            Body::CredentialUse(u) => {
                row.result = u.result.to_string();
                row.read_event = u.read_event.clone();
                row.read_ts = Some(u.read_ts.0);
                row.attribution = u.attribution.as_str().to_owned();
                row.via_pid = u.via_pid.unwrap_or(0);
            }
            Body::PrivChange(pc) => {
                row.priv_via = pc.via.clone();
                row.priv_old_uid = pc.old_uid;
                row.priv_old_euid = pc.old_euid;
                row.priv_new_uid = pc.new_uid;
                row.priv_new_euid = pc.new_euid;
                row.priv_old_caps = pc.old_cap_effective;
                row.priv_new_caps = pc.new_cap_effective;
            }
            Body::Dns(d) => {
                row.dns_name = d.name.clone();
                row.dns_addrs = d.addrs.iter().copied().map(v6).collect();
                row.dns_ttl = d.ttl;
                row.dns_server = d.server.map(v6);
            }
        }
        row
    }
}

impl EventRow {
    /// Back to the event model; `None` when the row does not hold what its kind needs.
    /// DNS answers' address families are not stored separately: IPv4-mapped addresses come
    /// back as IPv4.
    pub fn into_event(self) -> Option<Event> {
        let kind: EventKind = serde_json::from_value(serde_json::Value::String(self.kind)).ok()?;
        let secret = (!self.opened_as.is_empty()
            || self.inode != 0
            || !self.secret_path.is_empty())
        .then(|| {
            Arc::new(SecretRef {
                path: opt(self.secret_path),
                opened_as: self.opened_as,
                opened_as_status: opt(self.opened_as_status.clone()).map(Label::from),
                dev: self.dev,
                inode: self.inode,
                syscall: self.syscall.into(),
                access: self.access.into(),
                open_flags: self.open_flags,
                matched: self.matched.into(),
                fd: self.fd,
                repeats: self.repeats,
                abi: opt(self.abi.clone()).map(Label::from),
            })
        });
        let credential = (!self.fingerprint.is_empty()).then(|| {
            Arc::new(CredentialRef {
                fingerprint: self.fingerprint,
                kind: CredentialType::parse(&self.credential_type),
                labels: self.labels,
                owner: (!self.owner_kind.is_empty()).then(|| Owner {
                    kind: WorkloadKind::parse(&self.owner_kind),
                    id: WorkloadId::recorded(self.owner_id),
                    namespace: opt(self.owner_namespace),
                    pod: opt(self.owner_pod),
                    pod_uid: opt(self.owner_pod_uid),
                    source: OwnerSource::parse(&self.owner_source).unwrap_or_default(),
                }),
                identity: self.credential_identity,
            })
        });
        let dst = match self.dst_family {
            0 => None,
            1 => Some(Destination {
                metadata: self.dst_metadata,
                ..Destination::unix(self.dst_name, self.dst_proto)
            }),
            f => Some(Destination {
                name: opt(self.dst_name),
                metadata: self.dst_metadata,
                ..Destination::inet(back(self.dst_ip, f), self.dst_port, self.dst_proto)
            }),
        };
        let result: Label = self.result.into();
        let body = match kind {
            EventKind::Exec => {
                let exposed: Exposed =
                    serde_json::from_str(&self.exposed_credentials).unwrap_or_default();
                Body::Exec(Box::new(ExecInfo {
                    filename: self.exec_filename,
                    cap_effective: self.exec_cap_effective,
                    truncated: self.exec_truncated,
                    argv: self.exec_argv,
                    env_credentials: exposed.env,
                    argv_credentials: exposed.argv,
                    env_truncated: self.exec_env_truncated,
                    abi: opt(self.abi).map(Label::from),
                }))
            }
            EventKind::Exit => Body::Exit {
                code: self.exit_code?,
            },
            EventKind::SecretRead => Body::SecretRead(SecretRead {
                secret: secret?,
                credential: credential?,
                maintenance: self.maintenance,
            }),
            EventKind::Connect => Body::Connect(Connect {
                dst: dst?,
                result,
                via: opt(self.via).map_or(Label::Borrowed("connect"), Label::from),
            }),
            EventKind::ProcessAccess => Body::ProcessAccess(Box::new(ProcessAccess {
                access: self.access_kind.into(),
                target: TargetProcess {
                    pid: self.target_pid,
                    comm: self.target_comm,
                    exe: self.target_exe,
                    workload: serde_json::from_str(&self.target_workload).ok()?,
                    credentials: serde_json::from_str(&self.target_credentials).unwrap_or_default(),
                },
            })),
            EventKind::MetadataFetch => Body::MetadataFetch(Box::new(MetadataFetch {
                dst: dst?,
                method: self.metadata_method,
                path: self.metadata_path,
                provider: self.metadata_provider.into(),
                credentials: self.metadata_credentials,
                role: opt(self.metadata_role),
                credential,
            })),
            EventKind::CredentialUse => Body::CredentialUse(Box::new(CredentialUse {
                secret,
                credential: credential?,
                dst: dst?,
                result,
                read_event: self.read_event,
                read_ts: Timestamp(self.read_ts?),
                attribution: crate::event::Attribution::parse(&self.attribution)
                    .unwrap_or_default(),
                via_pid: (self.via_pid != 0).then_some(self.via_pid),
            })),
            EventKind::PrivChange => Body::PrivChange(Box::new(PrivChange {
                via: self.priv_via,
                old_uid: self.priv_old_uid,
                old_euid: self.priv_old_euid,
                new_uid: self.priv_new_uid,
                new_euid: self.priv_new_euid,
                old_cap_effective: self.priv_old_caps,
                new_cap_effective: self.priv_new_caps,
            })),
            EventKind::Dns => Body::Dns(Box::new(DnsAnswer {
                name: self.dns_name,
                addrs: self.dns_addrs.into_iter().map(|a| back(a, 4)).collect(),
                ttl: self.dns_ttl,
                server: self.dns_server.map(|a| back(a, 4)),
            })),
        };
        Some(Event {
            id: self.id,
            ts: Timestamp(self.ts),
            node: self.node.into(),
            process: ProcessInfo {
                pid: self.pid,
                tgid: self.tgid,
                ppid: self.ppid,
                uid: self.uid,
                euid: self.euid,
                gid: self.gid,
                egid: self.egid,
                comm: self.comm,
                exe: self.exe,
                tty: opt(self.tty),
                session: opt(self.session),
            },
            workload: Arc::new(Workload {
                kind: WorkloadKind::parse(&self.workload_kind),
                id: WorkloadId::recorded(self.workload_id),
                namespace: opt(self.namespace),
                pod: opt(self.pod),
                pod_uid: opt(self.pod_uid),
                service_account: opt(self.service_account),
                spiffe_id: opt(self.spiffe_id),
                container_id: opt(self.container_id),
                unit: opt(self.unit),
                cgroup_id: self.cgroup_id,
                cgroup: opt(self.cgroup),
            }),
            body,
        })
    }
}

#[derive(Clone, Debug, PartialEq, clickhouse::Row, Serialize, Deserialize)]
pub struct AlertRow {
    /// Unique per emitted alert line (`<dedup_key>` repeats across updates).
    pub id: String,
    #[serde(with = "clickhouse::serde::chrono::datetime64::nanos")]
    pub ts: DateTime<Utc>,
    #[serde(with = "clickhouse::serde::chrono::datetime64::nanos")]
    pub first_seen: DateTime<Utc>,
    #[serde(with = "clickhouse::serde::chrono::datetime64::nanos")]
    pub last_seen: DateTime<Utc>,
    pub node: String,
    pub alert: String,
    pub severity: String,
    pub status: String,
    pub count: u64,
    pub summary: String,
    pub workload_kind: String,
    pub workload_id: String,
    pub namespace: String,
    pub pod: String,
    pub service_account: String,
    pub spiffe_id: String,
    pub fingerprint: String,
    pub credential_type: String,
    pub owner_id: String,
    pub dedup_key: String,
    /// The alert's `evidence` array as JSON.
    pub evidence: String,
    /// The whole alert as JSON, so nothing an analyst sees in the feed is lost.
    pub alert_json: String,
}

impl ApproxSize for AlertRow {
    fn approx_bytes(&self) -> usize {
        self.alert_json.len() + self.evidence.len() + self.summary.len() + 200
    }
}

impl AlertRow {
    pub fn new(a: &Alert, id: String) -> Self {
        let cred = a.credential.clone().unwrap_or_default();
        AlertRow {
            id,
            ts: a.ts.0,
            first_seen: a.first_seen.0,
            last_seen: a.last_seen.0,
            node: a.node.clone(),
            alert: a.alert.as_str().to_owned(),
            severity: a.severity.as_str().to_owned(),
            status: a.status.as_str().to_owned(),
            count: a.count,
            summary: a.summary.clone(),
            workload_kind: a.workload.kind.as_str().to_owned(),
            workload_id: a.workload.id.to_string(),
            namespace: s(&a.workload.namespace),
            pod: s(&a.workload.pod),
            service_account: s(&a.workload.service_account),
            spiffe_id: s(&a.workload.spiffe_id),
            fingerprint: cred.fingerprint,
            credential_type: cred.kind.as_str().to_owned(),
            owner_id: cred.owner.map(|o| o.id.to_string()).unwrap_or_default(),
            dedup_key: a.dedup_key.clone(),
            evidence: serde_json::to_string(&a.evidence).unwrap_or_default(),
            alert_json: serde_json::to_string(a).unwrap_or_default(),
        }
    }

    pub fn into_alert(self) -> Option<Alert> {
        serde_json::from_str(&self.alert_json).ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_round_trip_through_rows() {
        let line = std::fs::read_to_string(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../tests/fixtures/replay-detections.ndjson"
        ))
        .unwrap();
        for l in line.lines() {
            let e: Event = serde_json::from_str(l).unwrap();
            let back = EventRow::from(&e).into_event().unwrap();
            assert_eq!(back, e);
        }
        for ip in ["10.1.2.3", "::ffff:10.1.2.3", "2001:db8::1"] {
            let dst = Destination {
                name: Some("api.example".into()),
                ..Destination::inet(ip.parse().unwrap(), 443, "tcp")
            };
            let body = Body::Connect(Connect {
                dst,
                result: "ok".into(),
                via: "connect".into(),
            });
            let c = Event::new("c1".into(), Timestamp::from_unix_nanos(5), "n", body);
            assert_eq!(EventRow::from(&c).into_event().unwrap(), c, "{ip}");
        }
    }
}
