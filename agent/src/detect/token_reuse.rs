//! token_reuse: one credential (by fingerprint, so copies in different files count) used by
//! two or more workloads on this node within the window.

use std::{sync::Arc, time::Duration};

use foldhash::{HashMap, HashMapExt};

use super::{Detector, short_fp};
use crate::baseline::{Baselines, subject_of};
use crate::credential::CredentialType;
use crate::{
    alert::{Alert, AlertKind, Evidence, Severity},
    event::{Event, Workload, WorkloadKind, duration_ns},
};

struct Holder {
    workload: Arc<Workload>,
    uid: u32,
    last_ns: i64,
    evidence: Evidence,
}

pub struct TokenReuse {
    window_ns: i64,
    by_fp: HashMap<String, Vec<Holder>>,
}

const MAX_HOLDERS: usize = 64;
const MAX_CREDENTIALS: usize = 200_000;

impl TokenReuse {
    pub fn new(window: Duration) -> Self {
        TokenReuse {
            window_ns: duration_ns(window),
            by_fp: HashMap::new(),
        }
    }
}

/// Two host processes are one identity per uid: a person's `kubectl` and `cat` reading the
/// same kubeconfig is not reuse, another uid is. Pods are one identity per SPIFFE ID: the
/// replicas of a Deployment share their secrets by design.
fn distinct(a: &Holder, w: &Workload, uid: u32) -> bool {
    if a.workload.kind == WorkloadKind::Host && w.kind == WorkloadKind::Host {
        return a.uid != uid;
    }
    subject_of(&a.workload) != subject_of(w)
}

impl Detector for TokenReuse {
    fn observe(&mut self, ev: &Event, _base: &Baselines, out: &mut Vec<Alert>) {
        let Some(cred) = ev.credential() else { return };
        // The node's cloud role is shared by everything on the node by design; a pod
        // fetching it is metadata_credential_fetch.
        if cred.fingerprint.is_empty() || cred.kind == CredentialType::CloudMetadata {
            return;
        }
        let now = ev.ts.unix_nanos();
        if self.by_fp.len() >= MAX_CREDENTIALS && !self.by_fp.contains_key(&cred.fingerprint) {
            let w = self.window_ns;
            self.by_fp.retain(|_, hs| {
                hs.retain(|h| now.saturating_sub(h.last_ns) <= w);
                !hs.is_empty()
            });
            if self.by_fp.len() >= MAX_CREDENTIALS {
                return;
            }
        }
        // One lookup, the key allocated only for a new fingerprint (the per-read path).
        let holders = match self.by_fp.get_mut(&cred.fingerprint) {
            Some(h) => h,
            None => self.by_fp.entry(cred.fingerprint.clone()).or_default(),
        };
        holders.retain(|h| now.saturating_sub(h.last_ns) <= self.window_ns);
        let uid = ev.process.uid;
        if let Some(h) = holders.iter_mut().find(|h| !distinct(h, &ev.workload, uid)) {
            h.last_ns = now;
            h.evidence.refresh(ev);
        } else if holders.len() < MAX_HOLDERS {
            holders.push(Holder {
                workload: ev.workload.clone(),
                uid,
                last_ns: now,
                evidence: Evidence::of(ev),
            });
        }
        let others: Vec<&Holder> = holders
            .iter()
            .filter(|h| distinct(h, &ev.workload, uid))
            .collect();
        if others.is_empty() {
            return;
        }
        let mut names: Vec<&str> = holders.iter().map(|h| h.workload.id.as_str()).collect();
        names.sort_unstable();
        let mut evidence: Vec<Evidence> = others.iter().map(|h| h.evidence.clone()).collect();
        evidence.push(Evidence::of(ev));
        out.push(Alert::about(
            AlertKind::TokenReuse,
            Severity::High,
            ev,
            cred,
            format!(
                "{} credential {} used by {} workloads: {}",
                cred.kind,
                short_fp(&cred.fingerprint),
                names.len(),
                names.join(", ")
            ),
            evidence,
            format!("token_reuse|{}", cred.fingerprint),
        ));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::detect::testutil::*;

    #[test]
    fn two_pods_one_fingerprint_is_reuse() {
        let mut d = TokenReuse::new(Duration::from_secs(3600));
        let mut out = Vec::new();
        d.observe(
            &read("e1", 0, pod("a", "p1", "u1"), "fp", None),
            &base(),
            &mut out,
        );
        assert!(out.is_empty());
        d.observe(
            &read("e2", 10, pod("b", "p2", "u2"), "fp", None),
            &base(),
            &mut out,
        );
        assert_eq!(out.len(), 1);
        let a = &out[0];
        assert_eq!(a.alert, AlertKind::TokenReuse);
        assert_eq!(a.workload.id, "pod:b/p2");
        assert_eq!(a.evidence.len(), 2);
        assert!(
            a.summary.contains("pod:a/p1") && a.summary.contains("pod:b/p2"),
            "{}",
            a.summary
        );
    }

    #[test]
    fn near_misses_are_not_reuse() {
        let mut d = TokenReuse::new(Duration::from_secs(60));
        let mut out = Vec::new();
        // Same workload twice.
        d.observe(
            &read("e1", 0, pod("a", "p1", "u1"), "fp", None),
            &base(),
            &mut out,
        );
        d.observe(
            &read("e2", 1, pod("a", "p1", "u1"), "fp", None),
            &base(),
            &mut out,
        );
        // Different credentials.
        d.observe(
            &read("e3", 2, pod("b", "p2", "u2"), "other", None),
            &base(),
            &mut out,
        );
        // Same host uid, different tools.
        d.observe(
            &read("e4", 3, host(0, "/usr/bin/kubectl"), "kc", None),
            &base(),
            &mut out,
        );
        d.observe(
            &read("e5", 4, host(0, "/usr/bin/cat"), "kc", None),
            &base(),
            &mut out,
        );
        // Outside the window.
        d.observe(
            &read("e6", 500, pod("c", "p3", "u3"), "fp", None),
            &base(),
            &mut out,
        );
        assert!(out.is_empty(), "{out:#?}");
    }
}
