//! privilege_expansion: a workload doing more with credentials than it did while learned, or
//! more than policy allows:
//! - a credential use to a destination outside `[[credential]] allowed_destinations`
//!   (policy; no learning needed);
//! - after learning: a use to a destination the (workload, credential) never reached, a
//!   secret the workload never read, an executable that never used the credential, or a
//!   process gaining uid 0 / capabilities from an executable that never did.

use std::sync::Arc;

use super::{Detector, short_fp};
use crate::{
    alert::{Alert, AlertKind, Evidence, Severity},
    baseline::{Baselines, dest_keys, subject_of},
    event::{Body, CredentialUse, Event, EventKind},
    policy::Policy,
};

pub struct PrivilegeExpansion {
    policy: Arc<Policy>,
}

impl PrivilegeExpansion {
    pub fn new(policy: Arc<Policy>) -> Self {
        PrivilegeExpansion { policy }
    }

    fn policy_destination(&self, ev: &Event, u: &CredentialUse, out: &mut Vec<Alert>) {
        let (cred, dst) = (&u.credential, &u.dst);
        let Some(entry) = self.policy.find(cred, ev.secret_path()) else {
            return;
        };
        if entry.allows_destination(dst) != Some(false) {
            return;
        }
        let to = dest_keys(dst).pop().unwrap_or_default();
        out.push(Alert::about(
            AlertKind::PrivilegeExpansion,
            Severity::High,
            ev,
            cred,
            format!(
                "{} used {} credential {} towards {to}, outside its allowed destinations",
                ev.workload.id,
                cred.kind,
                short_fp(&cred.fingerprint)
            ),
            vec![Evidence::of(ev).with_detail(format!(
                "policy entry {} allows {}",
                entry.name,
                entry
                    .allowed_destinations
                    .iter()
                    .map(|d| d.text.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            ))],
            format!(
                "privilege_expansion|policy_destination|{}|{}|{to}",
                ev.workload.id, cred.fingerprint
            ),
        ));
    }
}

impl Detector for PrivilegeExpansion {
    fn observe(&mut self, ev: &Event, base: &Baselines, out: &mut Vec<Alert>) {
        if let Body::CredentialUse(u) = &ev.body {
            self.policy_destination(ev, u, out);
        }
        let relevant = matches!(
            ev.body,
            Body::SecretRead(_) | Body::CredentialUse(_) | Body::PrivChange(_)
        );
        if !relevant {
            return;
        }
        let subject = subject_of(&ev.workload);
        let Some(learned) = base.learned(subject, ev.ts) else {
            return;
        };
        let w = &ev.workload.id;
        let exe = &ev.process.exe;
        if let Body::PrivChange(p) = &ev.body {
            if !p.is_gain() || learned.profile.priv_exes.contains(exe) {
                return;
            }
            out.push(Alert::about_workload(
                AlertKind::PrivilegeExpansion,
                Severity::High,
                ev,
                format!(
                    "{w}: {exe} gained privileges via {} (euid {} → {}, caps {:#x} → {:#x}), \
                     which no process of it did while learned",
                    p.via, p.old_euid, p.new_euid, p.old_cap_effective, p.new_cap_effective
                ),
                vec![Evidence::of(ev).with_detail(format!("via {}", p.via))],
                format!("privilege_expansion|priv_gain|{w}|{exe}"),
            ));
            return;
        }
        let Some(cred) = ev.credential() else { return };
        let fp = &cred.fingerprint;
        let (finding, detail, key) = if !learned.profile.secrets.contains(fp) {
            // Only the read itself: the uses that follow are the same finding.
            if ev.kind() != EventKind::SecretRead {
                return;
            }
            (
                format!(
                    "read {} credential {} for the first time",
                    cred.kind,
                    short_fp(fp)
                ),
                format!(
                    "learned {} other credentials",
                    learned.profile.secrets.len()
                ),
                format!("new_secret|{w}|{fp}"),
            )
        } else if let Some(pair) = learned.pair(fp) {
            if let Body::CredentialUse(u) = &ev.body
                && !pair.knows_destination(&u.dst)
            {
                let to = dest_keys(&u.dst).pop().unwrap_or_default();
                (
                    format!(
                        "used {} credential {} towards a new destination {to}",
                        cred.kind,
                        short_fp(fp)
                    ),
                    format!(
                        "learned destinations: {}",
                        pair.destinations
                            .iter()
                            .cloned()
                            .collect::<Vec<_>>()
                            .join(", ")
                    ),
                    format!("new_destination|{w}|{fp}|{to}"),
                )
            } else if ev.kind() == EventKind::SecretRead && !pair.exes.contains(exe) {
                (
                    format!(
                        "{exe} read {} credential {}, which it never did while learned",
                        cred.kind,
                        short_fp(fp)
                    ),
                    format!(
                        "learned executables: {}",
                        pair.exes.iter().cloned().collect::<Vec<_>>().join(", ")
                    ),
                    format!("new_executable|{w}|{fp}|{exe}"),
                )
            } else {
                return;
            }
        } else {
            return;
        };
        out.push(Alert::about(
            AlertKind::PrivilegeExpansion,
            Severity::High,
            ev,
            cred,
            format!("{w} {finding}"),
            vec![Evidence::of(ev).with_detail(detail)],
            format!("privilege_expansion|{key}"),
        ));
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::{
        detect::testutil::*,
        event::{Destination, PrivChange},
        policy::CredentialPolicy,
    };

    const DAY: i64 = 24 * 3600;

    fn use_to(id: &str, ts: i64, fp: &str, port: u16) -> Event {
        let mut e = read(id, ts, pod("payments", "api", "ua"), fp, None);
        e.process.exe = "/app/api".into();
        used(
            e,
            Destination::inet("10.0.0.7".parse().unwrap(), port, "tcp"),
        )
    }

    fn read_by(id: &str, ts: i64, fp: &str, exe: &str) -> Event {
        let mut e = read(id, ts, pod("payments", "api", "ua"), fp, None);
        e.process.exe = exe.into();
        e
    }

    /// Runs events through the detector and the baseline the way `Detectors` does.
    fn run(d: &mut PrivilegeExpansion, b: &mut Baselines, evs: &[Event]) -> Vec<Alert> {
        let mut out = Vec::new();
        for e in evs {
            d.observe(e, b, &mut out);
            b.learn(e);
        }
        out
    }

    #[test]
    fn new_destination_after_learning_fires_known_one_does_not() {
        let mut d = PrivilegeExpansion::new(Arc::new(Policy::default()));
        let mut b = Baselines::in_memory(Duration::from_secs(DAY as u64), 100);
        let learning = [
            read_by("r1", 0, "fp", "/app/api"),
            use_to("u1", 1, "fp", 5432),
        ];
        assert!(run(&mut d, &mut b, &learning).is_empty());
        let after = [
            read_by("r2", DAY + 1, "fp", "/app/api"),
            use_to("u2", DAY + 2, "fp", 5432),
        ];
        assert!(run(&mut d, &mut b, &after).is_empty(), "near miss: learned");
        let out = run(&mut d, &mut b, &[use_to("u3", DAY + 3, "fp", 6379)]);
        assert_eq!(out.len(), 1);
        assert!(
            out[0].summary.contains("10.0.0.7:6379/tcp"),
            "{}",
            out[0].summary
        );
        assert!(out[0].evidence[0].detail.as_ref().unwrap().contains("5432"));
    }

    #[test]
    fn new_secret_and_new_executable_after_learning() {
        let mut d = PrivilegeExpansion::new(Arc::new(Policy::default()));
        let mut b = Baselines::in_memory(Duration::from_secs(DAY as u64), 100);
        run(&mut d, &mut b, &[read_by("r1", 0, "fp", "/app/api")]);
        let out = run(
            &mut d,
            &mut b,
            &[
                read_by("r2", DAY, "other", "/app/api"),
                read_by("r3", DAY, "fp", "/usr/bin/curl"),
            ],
        );
        let keys: Vec<&str> = out.iter().map(|a| a.dedup_key.as_str()).collect();
        assert_eq!(
            keys,
            [
                "privilege_expansion|new_secret|pod:payments/api|other",
                "privilege_expansion|new_executable|pod:payments/api|fp|/usr/bin/curl"
            ]
        );
    }

    #[test]
    fn privilege_gain_from_an_unlearned_executable() {
        let mut d = PrivilegeExpansion::new(Arc::new(Policy::default()));
        let mut b = Baselines::in_memory(Duration::from_secs(DAY as u64), 100);
        let gain = |id: &str, ts: i64, exe: &str| {
            let change = PrivChange::new("exec", (1000, 1000, 0), 1000, 0, u64::MAX);
            let mut e = priv_change(id, ts, pod("payments", "api", "ua"), change);
            e.process.exe = exe.into();
            e
        };
        run(&mut d, &mut b, &[gain("p1", 0, "/usr/bin/sudo")]);
        assert!(run(&mut d, &mut b, &[gain("p2", DAY, "/usr/bin/sudo")]).is_empty());
        let out = run(&mut d, &mut b, &[gain("p3", DAY, "/tmp/helper")]);
        assert_eq!(out.len(), 1);
        assert!(out[0].summary.contains("/tmp/helper") && out[0].credential.is_none());
    }

    #[test]
    fn destination_outside_policy_fires_without_learning() {
        let policy = Policy::compile(
            &[CredentialPolicy {
                fingerprint: Some("fp".into()),
                allowed_destinations: vec!["10.0.0.0/8:5432".into()],
                ..Default::default()
            }],
            &[],
        )
        .unwrap();
        let mut d = PrivilegeExpansion::new(Arc::new(policy));
        let mut b = Baselines::in_memory(Duration::ZERO, 100);
        assert!(run(&mut d, &mut b, &[use_to("u1", 0, "fp", 5432)]).is_empty());
        let out = run(&mut d, &mut b, &[use_to("u2", 0, "fp", 443)]);
        assert_eq!(out.len(), 1);
        assert!(out[0].summary.contains("outside its allowed destinations"));
    }
}
