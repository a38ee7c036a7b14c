//! off_schedule: a credential with a declared schedule (`[[credential]] schedule`) read or
//! used outside every window of it, judged at the event's own timestamp.

use std::sync::Arc;

use super::{Detector, short_fp};
use crate::{
    alert::{Alert, AlertKind, Evidence, Severity},
    event::{Event, EventKind},
    policy::Policy,
};

pub struct OffSchedule {
    policy: Arc<Policy>,
}

impl OffSchedule {
    pub fn new(policy: Arc<Policy>) -> Self {
        OffSchedule { policy }
    }
}

impl Detector for OffSchedule {
    fn observe(&mut self, ev: &Event, out: &mut Vec<Alert>) {
        if !matches!(ev.kind, EventKind::SecretRead | EventKind::CredentialUse) {
            return;
        }
        let Some(cred) = &ev.credential else { return };
        let path = ev.secret.as_ref().and_then(|s| s.path.as_deref());
        let Some(entry) = self.policy.find(cred, path) else {
            return;
        };
        let Some(schedule) = &entry.schedule else {
            return;
        };
        if schedule.contains(ev.ts.0) {
            return;
        }
        let purpose = entry
            .purpose
            .as_deref()
            .map(|p| format!(" ({p})"))
            .unwrap_or_default();
        out.push(Alert::about(
            AlertKind::OffSchedule,
            Severity::Medium,
            ev,
            cred,
            format!(
                "{} used {} credential {}{purpose} outside its schedule {}",
                ev.workload.id,
                cred.kind,
                short_fp(&cred.fingerprint),
                schedule.text
            ),
            vec![Evidence::of(ev).with_detail(format!("policy entry {}", entry.name))],
            format!("off_schedule|{}|{}", ev.workload.id, cred.fingerprint),
        ));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{config::CredentialPolicy, detect::testutil::*, event::Timestamp};

    fn policy(schedule: &str) -> Arc<Policy> {
        Arc::new(
            Policy::compile(&[CredentialPolicy {
                path: None,
                fingerprint: Some("fp".into()),
                purpose: Some("nightly backup".into()),
                schedule: vec![schedule.into()],
                timezone: None,
            }])
            .unwrap(),
        )
    }

    fn read_at(rfc3339: &str, fp: &str) -> Event {
        let mut e = read("e1", 0, pod("a", "p", "u"), fp, None);
        e.ts = serde_json::from_str::<Timestamp>(&format!("\"{rfc3339}\"")).unwrap();
        e
    }

    #[test]
    fn use_outside_the_window_alerts_and_inside_does_not() {
        let mut d = OffSchedule::new(policy("daily 02:00-03:00"));
        let mut out = Vec::new();
        d.observe(&read_at("2026-11-22T02:30:00Z", "fp"), &mut out);
        assert!(out.is_empty(), "inside the window");
        d.observe(&read_at("2026-11-22T02:30:00Z", "other"), &mut out);
        assert!(out.is_empty(), "a credential without policy");
        d.observe(&read_at("2026-11-22T14:00:00Z", "fp"), &mut out);
        assert_eq!(out.len(), 1);
        assert!(
            out[0].summary.contains("nightly backup"),
            "{}",
            out[0].summary
        );
    }
}
