//! owner_mismatch: a workload reads a credential that belongs to another workload (the pod
//! whose kubelet volume holds it).

use super::{Detector, short_fp};
use crate::{
    alert::{Alert, AlertKind, Evidence, Severity},
    event::{Event, EventKind, Owner, Workload, WorkloadKind},
};

pub struct OwnerMismatch;

fn is_owner(owner: &Owner, w: &Workload) -> bool {
    match (owner.kind, &owner.pod_uid, &w.pod_uid) {
        // Pod identity is its uid: names can be reused by a later pod.
        (WorkloadKind::Pod, Some(o), Some(r)) => o == r,
        _ => owner.id == w.id,
    }
}

impl Detector for OwnerMismatch {
    fn observe(&mut self, ev: &Event, out: &mut Vec<Alert>) {
        if ev.kind != EventKind::SecretRead {
            return;
        }
        let Some(cred) = &ev.credential else { return };
        let Some(owner) = &cred.owner else { return };
        if is_owner(owner, &ev.workload) {
            return;
        }
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
    use crate::detect::testutil::*;

    #[test]
    fn reading_another_pods_token_names_both() {
        let mut out = Vec::new();
        let owner = owner_pod("billing", "worker-2", "ub");
        OwnerMismatch.observe(
            &read(
                "e1",
                0,
                pod("payments", "api", "ua"),
                "fp",
                Some(owner.clone()),
            ),
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
        OwnerMismatch.observe(
            &read("e1", 0, pod("payments", "api", "ua"), "fp", Some(owner)),
            &mut out,
        );
        // No owner known: nothing to compare.
        OwnerMismatch.observe(
            &read("e2", 0, pod("payments", "api", "ua"), "fp", None),
            &mut out,
        );
        assert!(out.is_empty());
    }
}
