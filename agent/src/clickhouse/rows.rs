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
        CredentialRef, Destination, DnsAnswer, Event, EventKind, ExecInfo, Label, Owner,
        PrivChange, ProcessInfo, SecretRef, Timestamp, Workload, WorkloadKind,
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

pub(super) fn kind_of(s: &str) -> WorkloadKind {
    match s {
        "pod" => WorkloadKind::Pod,
        "container" => WorkloadKind::Container,
        "unit" => WorkloadKind::Unit,
        _ => WorkloadKind::Host,
    }
}

/// Rough wire size, for batching by bytes.
pub trait ApproxSize {
    fn approx_bytes(&self) -> usize;
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
        let sec = e.secret.as_deref().cloned().unwrap_or_default();
        let cred = e.credential.as_deref().cloned().unwrap_or_default();
        let owner = cred.owner.clone().unwrap_or_default();
        let exec = e.exec.as_deref().cloned().unwrap_or_default();
        let pc = e.priv_change.as_deref().cloned().unwrap_or_default();
        let dns = e.dns.as_deref().cloned().unwrap_or_default();
        let (dst_family, dst_ip, dst_port, dst_proto, dst_name) = match &e.dst {
            Some(d) => (
                if d.ip.is_ipv4() { 4 } else { 6 },
                v6(d.ip),
                d.port,
                d.proto.to_string(),
                s(&d.name),
            ),
            None => (0, Ipv6Addr::UNSPECIFIED, 0, String::new(), String::new()),
        };
        EventRow {
            id: e.id.clone(),
            ts: e.ts.0,
            node: e.node.to_string(),
            kind: e.kind.as_str().to_owned(),
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
            workload_id: w.id.clone(),
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
            fingerprint: cred.fingerprint,
            credential_type: cred.kind,
            labels: cred.labels,
            owner_kind: if cred.owner.is_some() {
                owner.kind.as_str().to_owned()
            } else {
                String::new()
            },
            owner_id: owner.id,
            owner_namespace: s(&owner.namespace),
            owner_pod: s(&owner.pod),
            owner_pod_uid: s(&owner.pod_uid),
            owner_source: owner.source,
            dst_family,
            dst_ip,
            dst_port,
            dst_proto,
            dst_name,
            result: e.result.as_deref().unwrap_or_default().to_owned(),
            exec_filename: exec.filename,
            exec_cap_effective: exec.cap_effective,
            exec_truncated: exec.truncated,
            exit_code: e.exit_code,
            priv_via: pc.via,
            priv_old_uid: pc.old_uid,
            priv_old_euid: pc.old_euid,
            priv_new_uid: pc.new_uid,
            priv_new_euid: pc.new_euid,
            priv_old_caps: pc.old_cap_effective,
            priv_new_caps: pc.new_cap_effective,
            dns_name: dns.name,
            dns_addrs: dns.addrs.into_iter().map(v6).collect(),
            dns_ttl: dns.ttl,
            dns_server: dns.server.map(v6),
            read_event: s(&e.read_event),
            read_ts: e.read_ts.map(|t| t.0),
        }
    }
}

impl EventRow {
    /// Back to the event model. DNS answers' address families are not stored separately:
    /// IPv4-mapped addresses come back as IPv4.
    pub fn into_event(self) -> Option<Event> {
        let kind: EventKind = serde_json::from_value(serde_json::Value::String(self.kind)).ok()?;
        let mut e = Event::new(self.id, Timestamp(self.ts), self.node, kind);
        e.process = ProcessInfo {
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
        };
        e.workload = Arc::new(Workload {
            kind: kind_of(&self.workload_kind),
            id: self.workload_id,
            namespace: opt(self.namespace),
            pod: opt(self.pod),
            pod_uid: opt(self.pod_uid),
            service_account: opt(self.service_account),
            spiffe_id: opt(self.spiffe_id),
            container_id: opt(self.container_id),
            unit: opt(self.unit),
            cgroup_id: self.cgroup_id,
            cgroup: opt(self.cgroup),
        });
        if !self.opened_as.is_empty() || self.inode != 0 || !self.secret_path.is_empty() {
            e.secret = Some(Arc::new(SecretRef {
                path: opt(self.secret_path),
                opened_as: self.opened_as,
                dev: self.dev,
                inode: self.inode,
                syscall: self.syscall.into(),
                access: self.access.into(),
                open_flags: self.open_flags,
                matched: self.matched.into(),
                fd: self.fd,
            }));
        }
        if !self.fingerprint.is_empty() {
            e.credential = Some(Arc::new(CredentialRef {
                fingerprint: self.fingerprint,
                kind: self.credential_type,
                labels: self.labels,
                owner: (!self.owner_kind.is_empty()).then(|| Owner {
                    kind: kind_of(&self.owner_kind),
                    id: self.owner_id,
                    namespace: opt(self.owner_namespace),
                    pod: opt(self.owner_pod),
                    pod_uid: opt(self.owner_pod_uid),
                    source: self.owner_source,
                }),
            }));
        }
        if self.dst_family != 0 {
            e.dst = Some(Destination {
                ip: back(self.dst_ip, self.dst_family),
                port: self.dst_port,
                proto: self.dst_proto.into(),
                name: opt(self.dst_name),
            });
        }
        e.result = opt(self.result).map(Label::from);
        if kind == EventKind::Exec {
            e.exec = Some(Box::new(ExecInfo {
                filename: self.exec_filename,
                cap_effective: self.exec_cap_effective,
                truncated: self.exec_truncated,
            }));
        }
        e.exit_code = self.exit_code;
        if !self.priv_via.is_empty() {
            e.priv_change = Some(Box::new(PrivChange {
                via: self.priv_via,
                old_uid: self.priv_old_uid,
                old_euid: self.priv_old_euid,
                new_uid: self.priv_new_uid,
                new_euid: self.priv_new_euid,
                old_cap_effective: self.priv_old_caps,
                new_cap_effective: self.priv_new_caps,
            }));
        }
        if kind == EventKind::Dns {
            e.dns = Some(Box::new(DnsAnswer {
                name: self.dns_name,
                addrs: self.dns_addrs.into_iter().map(|a| back(a, 4)).collect(),
                ttl: self.dns_ttl,
                server: self.dns_server.map(|a| back(a, 4)),
            }));
        }
        e.read_event = opt(self.read_event);
        e.read_ts = self.read_ts.map(Timestamp);
        Some(e)
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
            workload_id: a.workload.id.clone(),
            namespace: s(&a.workload.namespace),
            pod: s(&a.workload.pod),
            service_account: s(&a.workload.service_account),
            spiffe_id: s(&a.workload.spiffe_id),
            fingerprint: cred.fingerprint,
            credential_type: cred.kind,
            owner_id: cred.owner.map(|o| o.id).unwrap_or_default(),
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
        let mut c = Event::new(
            "c1".into(),
            Timestamp::from_unix_nanos(5),
            "n",
            EventKind::Connect,
        );
        for ip in ["10.1.2.3", "::ffff:10.1.2.3", "2001:db8::1"] {
            c.dst = Some(Destination {
                ip: ip.parse().unwrap(),
                port: 443,
                proto: "tcp".into(),
                name: Some("api.example".into()),
            });
            c.result = Some("ok".into());
            assert_eq!(EventRow::from(&c).into_event().unwrap(), c, "{ip}");
        }
    }
}
