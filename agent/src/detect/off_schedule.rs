//! off_schedule: a credential with a declared schedule (`[[credential]] schedule`) read or
//! used outside every window of it, judged at the event's own timestamp. Without a declared
//! schedule, once the workload's learning is over: a read or use in an hour its profile
//! never saw (hour of the week after ≥ 7 days of learning, hour of the day after ≥ 1 day).

use std::{sync::Arc, time::Duration};

use super::{Detector, short_fp};
use crate::{
    alert::{Alert, AlertKind, Evidence, Severity},
    baseline::{Baselines, hour_of_week, subject_of},
    event::{CredentialRef, Event},
    policy::Policy,
};

const DAY: Duration = Duration::from_secs(24 * 3600);
const WEEK: Duration = Duration::from_secs(7 * 24 * 3600);
const WEEKDAYS: [&str; 7] = ["Mon", "Tue", "Wed", "Thu", "Fri", "Sat", "Sun"];

pub struct OffSchedule {
    policy: Arc<Policy>,
}

impl OffSchedule {
    pub fn new(policy: Arc<Policy>) -> Self {
        OffSchedule { policy }
    }
}

impl Detector for OffSchedule {
    fn observe(&mut self, ev: &Event, base: &Baselines, out: &mut Vec<Alert>) {
        let Some(cred) = ev.credential() else { return };
        // A holder connecting at 3 am does not say the credential was used at 3 am.
        if ev.is_indirect_use() {
            return;
        }
        let entry = self.policy.find(cred, ev.secret_path());
        let Some((entry, schedule)) = entry.and_then(|e| Some((e, e.schedule.as_ref()?))) else {
            learned_hours(ev, cred, base, out);
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

fn learned_hours(ev: &Event, cred: &CredentialRef, base: &Baselines, out: &mut Vec<Alert>) {
    let Some(learned) = base.learned(subject_of(&ev.workload), ev.ts) else {
        return;
    };
    // A credential new to the workload is privilege_expansion's finding, not this one.
    let Some(pair) = learned.pair(cred.identity()) else {
        return;
    };
    let period = base.learning_period();
    let h = hour_of_week(ev.ts);
    let (known, unit) = if period >= WEEK {
        (pair.active_in_hour_of_week(h), "hour of the week")
    } else if period >= DAY {
        (pair.active_in_hour_of_day(h % 24), "hour of the day")
    } else {
        return;
    };
    if known {
        return;
    }
    let when = format!("{} {:02}:00 UTC", WEEKDAYS[h / 24], h % 24);
    out.push(Alert::about(
        AlertKind::OffSchedule,
        Severity::Low,
        ev,
        cred,
        format!(
            "{} used {} credential {} at {when}, an {unit} it never did while learned",
            ev.workload.id,
            cred.kind,
            short_fp(&cred.fingerprint)
        ),
        vec![Evidence::of(ev).with_detail(format!(
            "learned profile: {} uses since {}",
            pair.uses,
            crate::event::Timestamp::from_unix_nanos(pair.first_seen).0.to_rfc3339()
        ))],
        format!(
            "off_schedule|learned|{}|{}|{h}",
            ev.workload.id, cred.fingerprint
        ),
    ));
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{detect::testutil::*, event::Timestamp, policy::CredentialPolicy};

    fn policy(schedule: &str) -> Arc<Policy> {
        Arc::new(
            Policy::compile(
                &[CredentialPolicy {
                    fingerprint: Some("fp".into()),
                    purpose: Some("nightly backup".into()),
                    schedule: vec![schedule.into()],
                    ..Default::default()
                }],
                &[],
            )
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
        d.observe(&read_at("2026-11-22T02:30:00Z", "fp"), &base(), &mut out);
        assert!(out.is_empty(), "inside the window");
        d.observe(&read_at("2026-11-22T02:30:00Z", "other"), &base(), &mut out);
        assert!(out.is_empty(), "a credential without policy");
        d.observe(&read_at("2026-11-22T14:00:00Z", "fp"), &base(), &mut out);
        assert_eq!(out.len(), 1);
        assert!(
            out[0].summary.contains("nightly backup"),
            "{}",
            out[0].summary
        );
    }

    #[test]
    fn learned_hours_after_a_week_of_learning() {
        let mut d = OffSchedule::new(Arc::new(Policy::default()));
        let mut b = crate::baseline::Baselines::in_memory(WEEK, 100);
        let mut out = Vec::new();
        // Learned: Sunday 2026-11-15 02:xx, the only hour it is ever active.
        for day in ["15", "22"] {
            let e = read_at(&format!("2026-11-{day}T02:10:00Z"), "fp");
            d.observe(&e, &b, &mut out);
            b.learn(&e);
        }
        assert!(out.is_empty(), "learning, then a known hour: {out:#?}");
        d.observe(&read_at("2026-11-23T02:10:00Z", "fp"), &b, &mut out);
        assert_eq!(out.len(), 1, "Monday 02:00 was never seen");
        assert!(
            out[0].summary.contains("Mon 02:00 UTC"),
            "{}",
            out[0].summary
        );
        assert_eq!(out[0].severity, Severity::Low);
    }
}
