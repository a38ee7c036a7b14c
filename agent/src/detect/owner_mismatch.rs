//! owner_mismatch: a workload reads a credential that belongs to another workload: the
//! owner declared in `[[credential]] owner`, else the pod whose kubelet volume holds it.
//! Workloads in the entry's `allowed_workloads` may read it.

use std::sync::Arc;

use super::{Detector, short_fp};
use crate::{
    alert::{Alert, AlertKind, Evidence, Severity},
    baseline::Baselines,
    event::{Body, CredentialRef, Event, Owner, Workload, WorkloadKind},
    policy::Policy,
};

pub struct OwnerMismatch {
    policy: Arc<Policy>,
}

impl OwnerMismatch {
    pub fn new(policy: Arc<Policy>) -> Self {
        OwnerMismatch { policy }
    }
}

fn is_owner(owner: &Owner, w: &Workload) -> bool {
    match (owner.kind, &owner.pod_uid, &w.pod_uid) {
        // Pod identity is its uid: names can be reused by a later pod.
        (WorkloadKind::Pod, Some(o), Some(r)) => o == r,
        _ => owner.id == w.id,
    }
}

impl Detector for OwnerMismatch {
    fn observe(&mut self, ev: &Event, _base: &Baselines, out: &mut Vec<Alert>) {
        let Body::SecretRead(read) = &ev.body else {
            return;
        };
        let cred = &read.credential;
        let entry = self.policy.find(cred, ev.secret_path());
        let declared = entry.and_then(|e| e.owner());
        let owner = match (&declared, &cred.owner) {
            (Some(d), _) => d,
            (None, Some(o)) => o,
            (None, None) => return,
        };
        let owned = match (entry, &declared) {
            (Some(e), Some(_)) => e.is_owner(&ev.workload),
            _ => is_owner(owner, &ev.workload),
        };
        if owned || entry.is_some_and(|e| e.allows_workload(&ev.workload)) {
            return;
        }
        // The alert shows the owner the decision was made against.
        let mut cred = CredentialRef::clone(cred);
        cred.owner = Some(owner.clone());
        let cred = &cred;
        out.push(Alert::about(
            AlertKind::OwnerMismatch,
            Severity::High,
            ev,
            cred,
            format!(
                "{} read {} credential {} owned by {}",
                ev.workload.id,
                cred.kind,
                short_fp(&cred.fingerprint),
                owner.id
            ),
            vec![Evidence::of(ev).with_detail(format!("owner {} ({})", owner.id, owner.source))],
            format!("owner_mismatch|{}|{}", ev.workload.id, cred.fingerprint),
        ));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{detect::testutil::*, policy::CredentialPolicy};

    fn detector(policy: &[CredentialPolicy]) -> OwnerMismatch {
        OwnerMismatch::new(Arc::new(Policy::compile(policy, &[]).unwrap()))
    }

    fn entry(fp: &str) -> CredentialPolicy {
        CredentialPolicy {
            fingerprint: Some(fp.into()),
            ..Default::default()
        }
    }

    #[test]
    fn declared_owner_and_allowed_readers() {
        let mut p = entry("fp");
        p.owner = Some("unit:backup.service".into());
        p.allowed_workloads = vec!["pod:logging/*".into()];
        let mut d = detector(&[p]);
        let unit = Workload {
            kind: WorkloadKind::Unit,
            id: crate::event::WorkloadId::unit("backup.service"),
            ..Default::default()
        };
        let mut out = Vec::new();
        d.observe(&read("e1", 0, unit, "fp", None), &base(), &mut out);
        d.observe(
            &read("e2", 0, pod("logging", "shipper", "u"), "fp", None),
            &base(),
            &mut out,
        );
        assert!(out.is_empty(), "owner and allowed reader: {out:#?}");
        d.observe(
            &read("e3", 0, pod("web", "x", "u"), "fp", None),
            &base(),
            &mut out,
        );
        assert_eq!(out.len(), 1);
        let owner = out[0].credential.as_ref().unwrap().owner.as_ref().unwrap();
        assert_eq!(
            (owner.id.as_str(), owner.source),
            ("unit:backup.service", crate::event::OwnerSource::Policy)
        );
    }

    #[test]
    fn allowed_workloads_cover_a_kubelet_owned_token() {
        let mut p = entry("fp");
        p.allowed_workloads = vec!["pod:monitoring/*".into()];
        let mut d = detector(&[p]);
        let mut out = Vec::new();
        let owner = Some(owner_pod("billing", "worker-2", "ub"));
        d.observe(
            &read(
                "e1",
                0,
                pod("monitoring", "agent", "um"),
                "fp",
                owner.clone(),
            ),
            &base(),
            &mut out,
        );
        assert!(out.is_empty());
        d.observe(
            &read("e2", 0, pod("web", "x", "uw"), "fp", owner),
            &base(),
            &mut out,
        );
        assert_eq!(out.len(), 1);
    }

    #[test]
    fn reading_another_pods_token_names_both() {
        let mut out = Vec::new();
        let owner = owner_pod("billing", "worker-2", "ub");
        detector(&[]).observe(
            &read(
                "e1",
                0,
                pod("payments", "api", "ua"),
                "fp",
                Some(owner.clone()),
            ),
            &base(),
            &mut out,
        );
        assert_eq!(out.len(), 1);
        assert!(
            out[0].summary.contains("pod:payments/api")
                && out[0].summary.contains("pod:billing/worker-2")
        );
        assert_eq!(
            out[0]
                .credential
                .as_ref()
                .unwrap()
                .owner
                .as_ref()
                .unwrap()
                .id,
            "pod:billing/worker-2"
        );
    }

    #[test]
    fn owner_reading_its_own_token_is_fine() {
        let mut out = Vec::new();
        let owner = owner_pod("payments", "api", "ua");
        detector(&[]).observe(
            &read("e1", 0, pod("payments", "api", "ua"), "fp", Some(owner)),
            &base(),
            &mut out,
        );
        // No owner known: nothing to compare.
        detector(&[]).observe(
            &read("e2", 0, pod("payments", "api", "ua"), "fp", None),
            &base(),
            &mut out,
        );
        assert!(out.is_empty());
    }
}
