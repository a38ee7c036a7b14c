//! Alerts: what detectors conclude, with the evidence that proves it, de-duplicated so a
//! repeating finding grows a `count` instead of flooding the SOC.

use std::{collections::HashMap, sync::Arc};

use serde::{Deserialize, Serialize};

use crate::event::{
    Attribution, Body, CredentialRef, Destination, Event, EventKind, Timestamp, Workload,
    WorkloadId, duration_ns,
};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AlertKind {
    TokenReuse,
    OwnerMismatch,
    OffSchedule,
    PrivilegeExpansion,
    DormantCredential,
    HumanUse,
    CredentialTheft,
    MetadataCredentialFetch,
}

impl AlertKind {
    pub fn as_str(self) -> &'static str {
        match self {
            AlertKind::TokenReuse => "token_reuse",
            AlertKind::OwnerMismatch => "owner_mismatch",
            AlertKind::OffSchedule => "off_schedule",
            AlertKind::PrivilegeExpansion => "privilege_expansion",
            AlertKind::DormantCredential => "dormant_credential",
            AlertKind::HumanUse => "human_use",
            AlertKind::CredentialTheft => "credential_theft",
            AlertKind::MetadataCredentialFetch => "metadata_credential_fetch",
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Severity {
    Low,
    Medium,
    High,
    Critical,
}

impl Severity {
    pub fn as_str(self) -> &'static str {
        match self {
            Severity::Low => "low",
            Severity::Medium => "medium",
            Severity::High => "high",
            Severity::Critical => "critical",
        }
    }
}

/// One event an alert rests on, reduced to what an analyst needs to act.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Evidence {
    pub event_id: String,
    pub ts: Timestamp,
    pub kind: EventKind,
    pub workload: WorkloadId,
    pub pid: u32,
    pub comm: String,
    pub exe: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tty: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secret_path: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dst: Option<Destination>,
    /// For a credential use: why the connect counts as one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub attribution: Option<Attribution>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
}

fn attribution_of(ev: &Event) -> Option<Attribution> {
    match &ev.body {
        Body::CredentialUse(u) => Some(u.attribution),
        _ => None,
    }
}

impl Evidence {
    pub fn of(ev: &Event) -> Self {
        Evidence {
            event_id: ev.id.clone(),
            ts: ev.ts,
            kind: ev.kind(),
            workload: ev.workload.id.clone(),
            pid: ev.process.tgid,
            comm: ev.process.comm.clone(),
            exe: ev.process.exe.clone(),
            tty: ev.process.tty.clone(),
            secret_path: ev.secret_path().map(str::to_owned),
            dst: ev.dst().cloned(),
            attribution: attribution_of(ev),
            detail: None,
        }
    }

    /// `*self = Evidence::of(ev)`, reusing this evidence's string buffers (detectors that
    /// keep the latest evidence per holder do this on every read).
    pub fn refresh(&mut self, ev: &Event) {
        // Destructured so a field added to `Evidence` cannot be forgotten here.
        let Evidence {
            event_id,
            ts,
            kind,
            workload,
            pid,
            comm,
            exe,
            tty,
            secret_path,
            dst,
            attribution,
            detail,
        } = self;
        event_id.clone_from(&ev.id);
        *ts = ev.ts;
        *kind = ev.kind();
        workload.clone_from(&ev.workload.id);
        *pid = ev.process.tgid;
        comm.clone_from(&ev.process.comm);
        exe.clone_from(&ev.process.exe);
        tty.clone_from(&ev.process.tty);
        match ev.secret_path() {
            Some(p) => match secret_path {
                Some(mine) => {
                    mine.clear();
                    mine.push_str(p);
                }
                None => *secret_path = Some(p.to_owned()),
            },
            None => *secret_path = None,
        }
        match (dst.as_mut(), ev.dst()) {
            (Some(mine), Some(d)) => mine.clone_from(d),
            (_, d) => *dst = d.cloned(),
        }
        *attribution = attribution_of(ev);
        *detail = None;
    }

    pub fn with_detail(mut self, d: impl Into<String>) -> Self {
        self.detail = Some(d.into());
        self
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Alert {
    pub alert: AlertKind,
    pub severity: Severity,
    /// Time of the latest occurrence.
    pub ts: Timestamp,
    pub first_seen: Timestamp,
    pub last_seen: Timestamp,
    pub node: String,
    /// One line an analyst can read in a queue.
    pub summary: String,
    pub workload: Arc<Workload>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub credential: Option<CredentialRef>,
    pub evidence: Vec<Evidence>,
    /// Occurrences folded into this alert within the suppression window.
    pub count: u64,
    /// `new` for the first occurrence, `update` when a repeat raised `count`.
    pub status: AlertStatus,
    /// What makes two occurrences "the same" alert (stable across restarts and nodes).
    pub dedup_key: String,
}

impl Alert {
    /// A new finding about the workload of `ev`, at the time of `ev`.
    pub fn about(
        alert: AlertKind,
        severity: Severity,
        ev: &Event,
        credential: &CredentialRef,
        summary: String,
        evidence: Vec<Evidence>,
        dedup_key: String,
    ) -> Self {
        let mut a = Alert::about_workload(alert, severity, ev, summary, evidence, dedup_key);
        a.credential = Some(credential.clone());
        a
    }

    /// A finding about the workload alone (a privilege gain involves no credential).
    pub fn about_workload(
        alert: AlertKind,
        severity: Severity,
        ev: &Event,
        summary: String,
        evidence: Vec<Evidence>,
        dedup_key: String,
    ) -> Self {
        Alert {
            alert,
            severity,
            ts: ev.ts,
            first_seen: ev.ts,
            last_seen: ev.ts,
            node: ev.node.to_string(),
            summary,
            workload: ev.workload.clone(),
            credential: None,
            evidence,
            count: 1,
            status: AlertStatus::New,
            dedup_key,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AlertStatus {
    New,
    Update,
}

impl AlertStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            AlertStatus::New => "new",
            AlertStatus::Update => "update",
        }
    }
}

/// Folds repeats of the same finding (same dedup key) within `window` into one alert whose
/// `count` and `last_seen` grow. The first occurrence is emitted at once; repeats are
/// emitted again when the count doubles (1, 2, 4, 8…) so a growing incident stays visible
/// without one line per occurrence.
///
/// Bounded: at most [`Dedup::MAX_KEYS`] findings are remembered. Past it, findings outside
/// the window go first, then the least recently seen; one that grew since it was last
/// emitted is emitted with its final count as it goes (so no count is lost), and a repeat
/// of it later starts a new alert.
pub struct Dedup {
    window_ns: i64,
    seen: HashMap<String, Alert>,
    max_keys: usize,
    /// Findings forgotten to stay within the bound.
    pub evicted: u64,
}

/// Evidence kept per remembered finding.
const MAX_EVIDENCE: usize = 16;

impl Dedup {
    /// Remembered findings, at most: each holds one alert and up to 16 pieces of evidence,
    /// up to ~10 KB, so ~40 MiB at the cap.
    pub const MAX_KEYS: usize = 4096;

    pub fn new(window: std::time::Duration) -> Self {
        Self::with_capacity(window, Self::MAX_KEYS)
    }

    pub fn with_capacity(window: std::time::Duration, max_keys: usize) -> Self {
        Dedup {
            window_ns: duration_ns(window),
            seen: HashMap::new(),
            max_keys: max_keys.max(1),
            evicted: 0,
        }
    }

    pub fn len(&self) -> usize {
        self.seen.len()
    }

    pub fn is_empty(&self) -> bool {
        self.seen.is_empty()
    }

    /// The alerts to emit now: this one's line if any, and the final counts of findings
    /// forgotten to make room.
    pub fn admit(&mut self, mut a: Alert) -> Vec<Alert> {
        let now = a.ts.unix_nanos();
        if let Some(prev) = self.seen.get_mut(&a.dedup_key)
            && now.saturating_sub(prev.last_seen.unix_nanos()) <= self.window_ns
        {
            prev.count += 1;
            prev.last_seen = a.ts;
            prev.ts = a.ts;
            // Keep the first evidence and add what is new (bounded).
            for e in a.evidence {
                if prev.evidence.len() < MAX_EVIDENCE
                    && !prev.evidence.iter().any(|p| p.event_id == e.event_id)
                {
                    prev.evidence.push(e);
                }
            }
            prev.status = AlertStatus::Update;
            return if prev.count.is_power_of_two() {
                vec![prev.clone()]
            } else {
                Vec::new()
            };
        }
        a.count = 1;
        a.status = AlertStatus::New;
        a.first_seen = a.ts;
        a.last_seen = a.ts;
        a.evidence.truncate(MAX_EVIDENCE);
        let mut out = Vec::new();
        if !self.seen.contains_key(&a.dedup_key) && self.seen.len() >= self.max_keys {
            self.make_room(now, &mut out);
        }
        self.seen.insert(a.dedup_key.clone(), a.clone());
        out.push(a);
        out
    }

    /// Forgets findings outside the window, then the least recently seen tenth.
    fn make_room(&mut self, now: i64, out: &mut Vec<Alert>) {
        let w = self.window_ns;
        let flush = |a: Alert, out: &mut Vec<Alert>| {
            if a.count > 1 && !a.count.is_power_of_two() {
                out.push(a);
            }
        };
        let expired: Vec<String> = self
            .seen
            .iter()
            .filter(|(_, p)| now.saturating_sub(p.last_seen.unix_nanos()) > w)
            .map(|(k, _)| k.clone())
            .collect();
        for k in expired {
            if let Some(a) = self.seen.remove(&k) {
                flush(a, out);
            }
        }
        if self.seen.len() < self.max_keys {
            return;
        }
        let mut by_age: Vec<(i64, &String)> = self
            .seen
            .iter()
            .map(|(k, a)| (a.last_seen.unix_nanos(), k))
            .collect();
        let n = (self.max_keys / 10).max(1).min(by_age.len());
        by_age.select_nth_unstable(n - 1);
        let victims: Vec<String> = by_age[..n].iter().map(|(_, k)| (*k).clone()).collect();
        for k in victims {
            if let Some(a) = self.seen.remove(&k) {
                self.evicted += 1;
                flush(a, out);
            }
        }
    }

    /// Final counts of alerts that grew since they were last emitted (at shutdown, so the
    /// SOC sees the true count).
    pub fn pending_updates(&self) -> Vec<Alert> {
        let mut v: Vec<Alert> = self
            .seen
            .values()
            .filter(|a| a.count > 1 && !a.count.is_power_of_two())
            .cloned()
            .collect();
        v.sort_by_key(|a| a.first_seen);
        v
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn alert(key: &str, ts_s: i64) -> Alert {
        Alert {
            alert: AlertKind::TokenReuse,
            severity: Severity::High,
            ts: Timestamp::from_unix_nanos(ts_s * 1_000_000_000),
            first_seen: Timestamp::from_unix_nanos(0),
            last_seen: Timestamp::from_unix_nanos(0),
            node: "n".into(),
            summary: String::new(),
            workload: Arc::default(),
            credential: None,
            evidence: Vec::new(),
            count: 0,
            status: AlertStatus::New,
            dedup_key: key.into(),
        }
    }

    #[test]
    fn refreshed_evidence_equals_fresh_evidence() {
        use crate::event::{Body, Connect, SecretRead, SecretRef};
        let secret = SecretRef {
            path: Some("/secrets/token".into()),
            ..Default::default()
        };
        let body = Body::SecretRead(SecretRead {
            secret: secret.into(),
            credential: Default::default(),
            maintenance: false,
        });
        let mut read = Event::new("a-1".into(), Timestamp::from_unix_nanos(5), "n", body);
        read.process.comm = "api".into();
        read.process.tty = Some("pts/1".into());
        let dst = Destination::inet("10.0.0.1".parse().unwrap(), 443, "tcp");
        let body = Body::Connect(Connect {
            dst,
            result: "ok".into(),
            via: "connect".into(),
        });
        let mut connect = Event::new("a-2".into(), Timestamp::from_unix_nanos(9), "n", body);
        connect.process.exe = "/usr/bin/curl".into();
        let mut e = Evidence::of(&read).with_detail("x");
        e.refresh(&connect);
        assert_eq!(e, Evidence::of(&connect));
        e.refresh(&read);
        assert_eq!(e, Evidence::of(&read));
    }

    #[test]
    fn repeats_grow_count_instead_of_new_alerts() {
        let mut d = Dedup::new(std::time::Duration::from_secs(60));
        let first = d.admit(alert("k", 0)).pop().unwrap();
        assert_eq!((first.count, first.status), (1, AlertStatus::New));
        let second = d.admit(alert("k", 1)).pop().unwrap();
        assert_eq!((second.count, second.status), (2, AlertStatus::Update));
        assert!(d.admit(alert("k", 2)).is_empty(), "count 3 is folded");
        assert_eq!(d.pending_updates()[0].count, 3);
        assert_eq!(d.admit(alert("other", 2)).len(), 1);
        // Outside the window the same key is a new alert again.
        let again = d.admit(alert("k", 1000)).pop().unwrap();
        assert_eq!((again.count, again.status), (1, AlertStatus::New));
    }

    /// Distinct findings all within the window used to grow the map without bound (its cap
    /// only dropped entries outside the window). Now it stays at its cap, and a forgotten
    /// finding's unreported count is emitted as it goes.
    #[test]
    fn distinct_findings_within_the_window_stay_bounded() {
        let mut d = Dedup::new(std::time::Duration::from_secs(3600));
        // One finding that grew to 3 (reported at 1 and 2), the oldest of all.
        for t in 0..3 {
            d.admit(alert("grew", t));
        }
        let mut finals = Vec::new();
        for i in 0..300_000i64 {
            let mut out = d.admit(alert(&format!("k{i}"), 10 + i / 1000));
            assert_eq!(out.last().unwrap().dedup_key, format!("k{i}"));
            out.pop();
            finals.extend(out);
        }
        assert!(d.len() <= Dedup::MAX_KEYS, "{}", d.len());
        assert!(d.evicted > 0);
        assert_eq!(finals.len(), 1, "{finals:?}");
        assert_eq!((finals[0].dedup_key.as_str(), finals[0].count), ("grew", 3));
    }
}
