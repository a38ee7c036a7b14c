//! OCSF 1.3 Detection Finding (class 2004) from a credwatch alert, for SIEMs that ingest
//! OCSF (Security Lake, Splunk's OCSF add-on, …). Mapping:
//! - `activity_id` 1 Create for a new alert, 2 Update when a repeat raised `count`;
//!   `type_uid` = 2004 × 100 + activity.
//! - `severity_id`: low 2, medium 3, high 4, critical 5.
//! - `finding_info`: `uid` = dedup key (stable across updates), `title` = the rule,
//!   `desc` = summary, `types` = [rule], first/last seen from the alert.
//! - `resources`: the workload (pod/container/unit/host) and the credential (fingerprint,
//!   type, labels, owner) — never a secret value, the alert has none.
//! - `evidences`: one per evidence event: the process (pid, name, file path, uid), the
//!   secret file, the destination; `unmapped.credwatch` keeps the original alert fields.

use serde_json::{Value, json};

use crate::alert::{Alert, AlertStatus, Severity};

pub const CLASS_UID: u32 = 2004;
pub const CATEGORY_UID: u32 = 2;
pub const OCSF_VERSION: &str = "1.3.0";

fn ms(t: &crate::event::Timestamp) -> i64 {
    t.0.timestamp_millis()
}

pub fn severity_id(s: Severity) -> u32 {
    match s {
        Severity::Low => 2,
        Severity::Medium => 3,
        Severity::High => 4,
        Severity::Critical => 5,
    }
}

pub fn detection_finding(a: &Alert) -> Value {
    let (activity_id, activity) = match a.status {
        AlertStatus::New => (1, "Create"),
        AlertStatus::Update => (2, "Update"),
    };
    let w = &a.workload;
    let workload_labels: Vec<String> = [
        w.service_account
            .as_ref()
            .map(|sa| format!("service_account:{sa}")),
        w.spiffe_id.as_ref().map(|s| format!("spiffe_id:{s}")),
        w.container_id.as_ref().map(|c| format!("container_id:{c}")),
    ]
    .into_iter()
    .flatten()
    .collect();
    let mut resources = vec![json!({
        "type": format!("workload/{}", w.kind.as_str()),
        "uid": w.id,
        "name": w.pod.clone().or_else(|| w.unit.clone()).unwrap_or_else(|| w.id.to_string()),
        "namespace": w.namespace,
        "labels": workload_labels,
    })];
    if let Some(c) = &a.credential {
        resources.push(json!({
            "type": format!("credential/{}", c.kind),
            "uid": c.fingerprint,
            "labels": c.labels.iter().map(|(k, v)| format!("{k}:{v}")).collect::<Vec<_>>(),
            "owner": c.owner.as_ref().map(|o| json!({"uid": o.id, "type": o.kind.as_str(), "source": o.source})),
        }));
    }
    let evidences: Vec<Value> = a
        .evidence
        .iter()
        .map(|e| {
            let mut ev = json!({
                "process": {
                    "pid": e.pid,
                    "name": e.comm,
                    "file": {"path": e.exe, "name": e.exe.rsplit('/').next().unwrap_or(&e.exe), "type_id": 1},
                    "tty": e.tty,
                },
                "data": {"event_id": e.event_id, "kind": e.kind, "workload": e.workload, "time": ms(&e.ts), "detail": e.detail},
            });
            if let Some(p) = &e.secret_path {
                ev["file"] = json!({"path": p, "name": p.rsplit('/').next().unwrap_or(p), "type_id": 1});
            }
            if let Some(d) = &e.dst {
                ev["dst_endpoint"] = match &d.ip {
                    Some(ip) => json!({"ip": ip.to_string(), "port": d.port, "hostname": d.name}),
                    None => json!({"name": d.path}),
                };
                ev["connection_info"] = json!({"protocol_name": d.proto});
            }
            ev
        })
        .collect();
    json!({
        "class_uid": CLASS_UID,
        "class_name": "Detection Finding",
        "category_uid": CATEGORY_UID,
        "category_name": "Findings",
        "activity_id": activity_id,
        "activity_name": activity,
        "type_uid": CLASS_UID * 100 + activity_id,
        "type_name": format!("Detection Finding: {activity}"),
        "time": ms(&a.ts),
        "severity_id": severity_id(a.severity),
        "severity": a.severity.as_str(),
        "status_id": 1,
        "status": "New",
        "count": a.count,
        "message": a.summary,
        "start_time": ms(&a.first_seen),
        "end_time": ms(&a.last_seen),
        "metadata": {
            "version": OCSF_VERSION,
            "product": {"name": "credwatch", "vendor_name": "credwatch", "version": env!("CARGO_PKG_VERSION")},
            "correlation_uid": a.dedup_key,
            "log_name": "alerts",
        },
        "finding_info": {
            "uid": a.dedup_key,
            "title": a.alert.as_str(),
            "desc": a.summary,
            "types": [a.alert.as_str()],
            "first_seen_time": ms(&a.first_seen),
            "last_seen_time": ms(&a.last_seen),
            "analytic": {"name": a.alert.as_str(), "type_id": 1, "type": "Rule"},
        },
        "device": {"hostname": a.node, "type_id": 0},
        "resources": resources,
        "evidences": evidences,
        "unmapped": {"credwatch": {"alert": a.alert.as_str(), "node": a.node, "dedup_key": a.dedup_key, "workload": a.workload}},
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{alert::AlertKind, detect::testutil::*};

    #[test]
    fn required_detection_finding_fields() {
        let ev = read("e1", 1_795_000_000, pod("a", "p", "u"), "fp", None);
        let mut a = Alert::about(
            AlertKind::HumanUse,
            Severity::High,
            &ev,
            ev.credential().unwrap(),
            "s".into(),
            vec![crate::alert::Evidence::of(&ev)],
            "k".into(),
        );
        a.status = AlertStatus::Update;
        let o = detection_finding(&a);
        assert_eq!(o["class_uid"], 2004);
        assert_eq!(o["category_uid"], 2);
        assert_eq!(o["activity_id"], 2);
        assert_eq!(o["type_uid"], 200402);
        assert_eq!(o["severity_id"], 4);
        assert_eq!(o["time"], 1_795_000_000_000i64);
        assert_eq!(o["finding_info"]["uid"], "k");
        assert_eq!(o["finding_info"]["title"], "human_use");
        assert_eq!(o["metadata"]["product"]["name"], "credwatch");
        assert_eq!(o["evidences"][0]["file"]["path"], "/secrets/fp");
        assert_eq!(o["resources"][1]["uid"], "fp");
    }
}
