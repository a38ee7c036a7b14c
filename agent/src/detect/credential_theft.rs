//! credential_theft: a process reads another's environment or memory, or attaches to it,
//! while the target holds credentials (read, given at exec, inherited, fetched). Tools that
//! do this for a living are declared in `[[allow]]`.

use super::{Detector, short_fp};
use crate::{
    alert::{Alert, AlertKind, Evidence, Severity},
    baseline::Baselines,
    event::{Body, CredentialRef, Event},
};

pub struct CredentialTheft;

impl Detector for CredentialTheft {
    fn observe(&mut self, ev: &Event, _base: &Baselines, out: &mut Vec<Alert>) {
        let Body::ProcessAccess(a) = &ev.body else {
            return;
        };
        let t = &a.target;
        let Some(first) = t.credentials.first() else {
            return;
        };
        let held: Vec<String> = t
            .credentials
            .iter()
            .map(|c| format!("{} {}", c.kind, short_fp(&c.fingerprint)))
            .collect();
        // Across workloads is someone else's secret; within one it is still a read of
        // credentials out of a live process.
        let severity = if t.workload.id == ev.workload.id {
            Severity::High
        } else {
            Severity::Critical
        };
        let credential = CredentialRef {
            fingerprint: first.fingerprint.clone(),
            kind: first.kind.clone(),
            identity: first.identity.clone(),
            ..Default::default()
        };
        out.push(Alert::about(
            AlertKind::CredentialTheft,
            severity,
            ev,
            &credential,
            format!(
                "{} ({}) read the {} of pid {} ({}, {}) holding {}",
                ev.workload.id,
                ev.process.exe,
                a.access,
                t.pid,
                t.exe,
                t.workload.id,
                held.join(", ")
            ),
            vec![Evidence::of(ev).with_detail(format!(
                "target pid {} {} in {}; holds {}",
                t.pid,
                t.exe,
                t.workload.id,
                held.join(", ")
            ))],
            format!(
                "credential_theft|{}|{}|{}|{}",
                ev.workload.id, ev.process.exe, t.workload.id, t.exe
            ),
        ));
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::{
        credential::CredentialType,
        detect::testutil::*,
        event::{HeldCredential, ProcessAccess, TargetProcess, Timestamp},
    };

    fn access(held: Vec<HeldCredential>) -> Event {
        let mut e = Event::new(
            "x1".into(),
            Timestamp::from_unix_nanos(1),
            "n",
            Body::ProcessAccess(Box::new(ProcessAccess {
                access: "environ".into(),
                target: TargetProcess {
                    pid: 77,
                    comm: "api".into(),
                    exe: "/app/api".into(),
                    workload: Arc::new(pod("payments", "api", "ua")),
                    credentials: held,
                },
            })),
        );
        e.workload = Arc::new(pod("tools", "debug", "ub"));
        e.process.exe = "/usr/bin/cat".into();
        e
    }

    #[test]
    fn reading_a_holder_is_theft_reading_anyone_else_is_not() {
        let mut out = Vec::new();
        CredentialTheft.observe(&access(Vec::new()), &base(), &mut out);
        assert!(out.is_empty(), "the target holds nothing");
        let held = vec![HeldCredential {
            fingerprint: "hmac-sha256:ab12".into(),
            kind: CredentialType::AwsAccessKey,
            identity: "env:pod:payments/api|AWS_SECRET_ACCESS_KEY".into(),
        }];
        CredentialTheft.observe(&access(held), &base(), &mut out);
        assert_eq!(out.len(), 1);
        let a = &out[0];
        assert_eq!(a.alert, AlertKind::CredentialTheft);
        assert_eq!(a.severity, Severity::Critical);
        assert!(a.summary.contains("pod:tools/debug"), "{}", a.summary);
        assert!(a.summary.contains("pid 77"), "{}", a.summary);
        assert!(a.summary.contains("aws_access_key ab12"), "{}", a.summary);
    }
}
