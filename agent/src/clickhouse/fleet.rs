//! Fleet queries: questions one node cannot answer, over what every node wrote. `credwatch
//! fleet-check` runs the alerting ones for a time range and emits alerts in the usual
//! format (node `fleet`); `credwatch schema` prints them all for dashboards and ad-hoc use.

use anyhow::{Context, Result};
use chrono::{DateTime, Utc};
use serde::Deserialize;

use crate::{
    alert::{Alert, AlertKind, AlertStatus, Evidence, Severity},
    clickhouse::Config as Cfg,
    event::{
        CredentialRef, CredentialType, EventKind, Timestamp, Workload, WorkloadId, WorkloadKind,
    },
};

/// Reads of one fingerprint on two or more nodes in [?, ?): one row per (fingerprint, node)
/// with the first read there as evidence.
pub const CROSS_NODE_REUSE: &str = "
SELECT fingerprint, node, any(credential_type) AS credential_type,
       argMin(id, ts) AS event_id, min(ts) AS first_ts, argMin(workload_id, ts) AS workload_id,
       argMin(workload_kind, ts) AS workload_kind, argMin(tgid, ts) AS pid,
       argMin(comm, ts) AS comm, argMin(exe, ts) AS exe, argMin(secret_path, ts) AS secret_path,
       count() AS reads
FROM events
WHERE kind = 'secret_read' AND fingerprint != ''
  AND ts >= fromUnixTimestamp64Nano(toInt64(?), 'UTC') AND ts < fromUnixTimestamp64Nano(toInt64(?), 'UTC')
  AND fingerprint IN (
      SELECT fingerprint FROM events
      WHERE kind = 'secret_read' AND fingerprint != ''
        AND ts >= fromUnixTimestamp64Nano(toInt64(?), 'UTC') AND ts < fromUnixTimestamp64Nano(toInt64(?), 'UTC')
      GROUP BY fingerprint HAVING uniqExact(node) >= 2)
GROUP BY fingerprint, node
ORDER BY fingerprint, node";

/// Credentials read in [?, ?) whose previous read anywhere in the fleet is at least
/// ? seconds older.
pub const DORMANT: &str = "
SELECT r.fingerprint AS fingerprint, r.credential_type AS credential_type, r.node AS node,
       r.event_id AS event_id, r.first_ts AS first_ts, r.workload_id AS workload_id,
       r.workload_kind AS workload_kind, r.pid AS pid, r.comm AS comm, r.exe AS exe,
       r.secret_path AS secret_path, p.last_before AS last_before
FROM (
    SELECT fingerprint, any(credential_type) AS credential_type, argMin(node, ts) AS node,
           argMin(id, ts) AS event_id, min(ts) AS first_ts, argMin(workload_id, ts) AS workload_id,
           argMin(workload_kind, ts) AS workload_kind, argMin(tgid, ts) AS pid,
           argMin(comm, ts) AS comm, argMin(exe, ts) AS exe, argMin(secret_path, ts) AS secret_path
    FROM events
    WHERE kind = 'secret_read' AND fingerprint != ''
      AND ts >= fromUnixTimestamp64Nano(toInt64(?), 'UTC') AND ts < fromUnixTimestamp64Nano(toInt64(?), 'UTC')
    GROUP BY fingerprint) AS r
INNER JOIN (
    SELECT fingerprint, max(ts) AS last_before FROM events
    WHERE kind = 'secret_read' AND fingerprint != ''
      AND ts < fromUnixTimestamp64Nano(toInt64(?), 'UTC')
    GROUP BY fingerprint) AS p ON r.fingerprint = p.fingerprint
WHERE dateDiff('second', p.last_before, r.first_ts) >= ?
ORDER BY first_ts";

/// Report: the credentials reaching the most distinct destinations in [?, ?).
pub const TOP_BY_DESTINATIONS: &str = "
SELECT fingerprint, any(credential_type) AS credential_type,
       uniqExact(dst_ip, dst_port, dst_proto) AS destinations, uniqExact(node) AS nodes,
       uniqExact(workload_id) AS workloads, count() AS uses
FROM events
WHERE kind = 'credential_use'
  AND ts >= fromUnixTimestamp64Nano(toInt64(?), 'UTC') AND ts < fromUnixTimestamp64Nano(toInt64(?), 'UTC')
GROUP BY fingerprint
ORDER BY destinations DESC, uses DESC
LIMIT 20";

/// All of them, for `credwatch schema`.
pub fn script() -> String {
    [
        (
            "cross-node token reuse (from, to, from, to)",
            CROSS_NODE_REUSE,
        ),
        (
            "dormant credentials (from, to, from, min silence in seconds)",
            DORMANT,
        ),
        (
            "top credentials by destinations (from, to)",
            TOP_BY_DESTINATIONS,
        ),
    ]
    .iter()
    .map(|(name, q)| format!("-- fleet query: {name}; ? = Unix time in ns{q};\n"))
    .collect::<Vec<_>>()
    .join("\n")
}

#[derive(Debug, clickhouse::Row, Deserialize)]
struct ReadRow {
    fingerprint: String,
    node: String,
    credential_type: String,
    event_id: String,
    #[serde(with = "clickhouse::serde::chrono::datetime64::nanos")]
    first_ts: DateTime<Utc>,
    workload_id: String,
    workload_kind: String,
    pid: u32,
    comm: String,
    exe: String,
    secret_path: String,
    reads: u64,
}

#[derive(Debug, clickhouse::Row, Deserialize)]
struct DormantRow {
    fingerprint: String,
    credential_type: String,
    node: String,
    event_id: String,
    #[serde(with = "clickhouse::serde::chrono::datetime64::nanos")]
    first_ts: DateTime<Utc>,
    workload_id: String,
    workload_kind: String,
    pid: u32,
    comm: String,
    exe: String,
    secret_path: String,
    #[serde(with = "clickhouse::serde::chrono::datetime64::nanos")]
    last_before: DateTime<Utc>,
}

/// Both row types start with the first read of a credential in the range; these turn it
/// into the alert's workload and evidence.
macro_rules! first_read {
    ($row:ty) => {
        impl $row {
            fn workload(&self) -> Workload {
                Workload {
                    kind: WorkloadKind::parse(&self.workload_kind),
                    id: WorkloadId::recorded(self.workload_id.clone()),
                    ..Default::default()
                }
            }

            fn evidence(&self, detail: String) -> Evidence {
                Evidence {
                    event_id: self.event_id.clone(),
                    ts: Timestamp(self.first_ts),
                    kind: EventKind::SecretRead,
                    workload: WorkloadId::recorded(self.workload_id.clone()),
                    pid: self.pid,
                    comm: self.comm.clone(),
                    exe: self.exe.clone(),
                    tty: None,
                    secret_path: (!self.secret_path.is_empty()).then(|| self.secret_path.clone()),
                    dst: None,
                    attribution: None,
                    detail: Some(detail),
                }
            }
        }
    };
}

first_read!(ReadRow);
first_read!(DormantRow);

/// A fleet finding; summary, evidence and dedup key are filled in by the caller.
fn alert(
    kind: AlertKind,
    severity: Severity,
    first: DateTime<Utc>,
    last: DateTime<Utc>,
    workload: Workload,
    credential: CredentialRef,
) -> Alert {
    Alert {
        alert: kind,
        severity,
        ts: Timestamp(last),
        first_seen: Timestamp(first),
        last_seen: Timestamp(last),
        node: "fleet".into(),
        summary: String::new(),
        workload: workload.into(),
        credential: Some(credential),
        evidence: Vec::new(),
        count: 1,
        status: AlertStatus::New,
        dedup_key: String::new(),
    }
}

fn ns(t: DateTime<Utc>) -> i64 {
    t.timestamp_nanos_opt().unwrap_or(i64::MAX)
}

/// Runs the alerting fleet queries for [from, to).
pub async fn check(
    cfg: &Cfg,
    from: DateTime<Utc>,
    to: DateTime<Utc>,
    dormant_after: std::time::Duration,
) -> Result<Vec<Alert>> {
    let c = super::client(cfg)?;
    let (f, t) = (ns(from), ns(to));
    let rows: Vec<ReadRow> = c
        .query(CROSS_NODE_REUSE)
        .bind(f)
        .bind(t)
        .bind(f)
        .bind(t)
        .fetch_all()
        .await
        .context("cross-node reuse query")?;
    let mut out = Vec::new();
    for group in rows.chunk_by(|a, b| a.fingerprint == b.fingerprint) {
        let first = &group[0];
        let last = group
            .iter()
            .map(|r| r.first_ts)
            .max()
            .unwrap_or(first.first_ts);
        let nodes: Vec<&str> = group.iter().map(|r| r.node.as_str()).collect();
        let cred = CredentialRef {
            fingerprint: first.fingerprint.clone(),
            kind: CredentialType::parse(&first.credential_type),
            ..Default::default()
        };
        let mut a = alert(
            AlertKind::TokenReuse,
            Severity::High,
            first.first_ts,
            last,
            first.workload(),
            cred,
        );
        a.summary = format!(
            "{} credential {} read on {} nodes: {}",
            first.credential_type,
            super::super::detect::short_fp(&first.fingerprint),
            nodes.len(),
            nodes.join(", ")
        );
        a.evidence = group
            .iter()
            .map(|r| r.evidence(format!("node {} ({} reads)", r.node, r.reads)))
            .collect();
        a.dedup_key = format!("token_reuse|fleet|{}", first.fingerprint);
        out.push(a);
    }
    if !dormant_after.is_zero() {
        let rows: Vec<DormantRow> = c
            .query(DORMANT)
            .bind(f)
            .bind(t)
            .bind(f)
            .bind(dormant_after.as_secs())
            .fetch_all()
            .await
            .context("dormant credentials query")?;
        for r in rows {
            let days = (r.first_ts - r.last_before).num_days();
            let mut a = alert(
                AlertKind::DormantCredential,
                Severity::Medium,
                r.first_ts,
                r.first_ts,
                r.workload(),
                CredentialRef {
                    fingerprint: r.fingerprint.clone(),
                    kind: CredentialType::parse(&r.credential_type),
                    ..Default::default()
                },
            );
            a.summary = format!(
                "{} credential {} read on {} after {days} days unused anywhere in the fleet",
                r.credential_type,
                super::super::detect::short_fp(&r.fingerprint),
                r.node
            );
            a.evidence = vec![r.evidence(format!(
                "node {}; previous read {}",
                r.node,
                r.last_before.to_rfc3339()
            ))];
            a.dedup_key = format!(
                "dormant_credential|fleet|{}|{}",
                r.fingerprint,
                ns(r.last_before)
            );
            out.push(a);
        }
    }
    Ok(out)
}
