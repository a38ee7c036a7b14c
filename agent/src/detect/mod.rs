//! Detectors: each turns events into findings on its own; [`Detectors`] runs them in order
//! and folds repeats through [`Dedup`]. Time comes from event timestamps only, so a replay
//! reaches the same conclusions as the live run.

mod dormant_credential;
mod human_use;
mod off_schedule;
mod owner_mismatch;
mod privilege_expansion;
mod token_reuse;

use std::{sync::Arc, time::Duration};

pub use dormant_credential::DormantCredential;
pub use human_use::HumanUse;
pub use off_schedule::OffSchedule;
pub use owner_mismatch::OwnerMismatch;
pub use privilege_expansion::PrivilegeExpansion;
pub use token_reuse::TokenReuse;

use crate::{
    alert::{Alert, Dedup},
    baseline::Baselines,
    event::Event,
    policy::Policy,
};

/// Judges one event. `base` holds what was learned before this event; it is updated with
/// the event only after every detector has seen it.
pub trait Detector {
    fn observe(&mut self, ev: &Event, base: &Baselines, out: &mut Vec<Alert>);
}

#[derive(Clone, Debug)]
pub struct DetectOptions {
    /// Two workloads using one credential this close together is reuse.
    pub reuse_window: Duration,
    /// Repeats of one finding within this window raise its count instead of a new alert.
    pub suppression_window: Duration,
    /// Learning time per workload before baselines judge it (zero: no learned detections).
    pub learning_period: Duration,
    /// Silence after which a use is `dormant_credential` (zero: off).
    pub dormant_after: Duration,
}

impl Default for DetectOptions {
    fn default() -> Self {
        DetectOptions {
            reuse_window: Duration::from_secs(3600),
            suppression_window: Duration::from_secs(3600),
            learning_period: Duration::from_secs(7 * 24 * 3600),
            dormant_after: Duration::from_secs(30 * 24 * 3600),
        }
    }
}

pub struct Detectors {
    detectors: Vec<Box<dyn Detector + Send>>,
    baselines: Baselines,
    policy: Arc<Policy>,
    dedup: Dedup,
    scratch: Vec<Alert>,
    /// Findings an `[[allow]]` entry covered.
    pub allowlisted: u64,
}

impl Detectors {
    pub fn new(opts: &DetectOptions, policy: Arc<Policy>, baselines: Baselines) -> Self {
        Detectors {
            detectors: vec![
                Box::new(TokenReuse::new(opts.reuse_window)),
                Box::new(OwnerMismatch::new(policy.clone())),
                Box::new(OffSchedule::new(policy.clone())),
                Box::new(PrivilegeExpansion::new(policy.clone())),
                Box::new(DormantCredential::new(opts.dormant_after)),
                Box::new(HumanUse),
            ],
            baselines,
            policy,
            dedup: Dedup::new(opts.suppression_window),
            scratch: Vec::new(),
            allowlisted: 0,
        }
    }

    pub fn observe(&mut self, ev: &Event, out: &mut Vec<Alert>) {
        for d in &mut self.detectors {
            d.observe(ev, &self.baselines, &mut self.scratch);
        }
        self.baselines.learn(ev);
        for a in self.scratch.drain(..) {
            if self.policy.allowed(&a) {
                self.allowlisted += 1;
                continue;
            }
            out.extend(self.dedup.admit(a));
        }
    }

    pub fn baselines(&self) -> &Baselines {
        &self.baselines
    }

    /// Persists what the baselines learned since the last call.
    pub fn checkpoint(&mut self) {
        if let Err(e) = self.baselines.checkpoint() {
            tracing::error!("{e:#}; keeping the changes to retry");
        }
    }

    /// Alerts whose count grew since they were last emitted; baselines written out.
    pub fn finish(&mut self) -> Vec<Alert> {
        self.checkpoint();
        self.dedup.pending_updates()
    }
}

/// `hmac-sha256:0123abcd…` → `0123abcd` for summaries.
pub fn short_fp(fp: &str) -> &str {
    let hex = fp.rsplit(':').next().unwrap_or(fp);
    &hex[..hex.len().min(12)]
}

#[cfg(test)]
pub(crate) mod testutil {
    use crate::baseline::Baselines;
    use crate::event::{
        CredentialRef, Event, EventKind, Owner, SecretRef, Timestamp, Workload, WorkloadKind,
    };

    /// No learned profiles (learning off).
    pub fn base() -> Baselines {
        Baselines::in_memory(std::time::Duration::ZERO, 16)
    }

    pub fn pod(ns: &str, name: &str, uid: &str) -> Workload {
        Workload {
            kind: WorkloadKind::Pod,
            id: format!("pod:{ns}/{name}"),
            namespace: Some(ns.into()),
            pod: Some(name.into()),
            pod_uid: Some(uid.into()),
            service_account: Some("sa".into()),
            ..Default::default()
        }
    }

    pub fn host(uid: u32, exe: &str) -> Workload {
        Workload {
            kind: WorkloadKind::Host,
            id: format!("host:{uid}:{exe}"),
            ..Default::default()
        }
    }

    pub fn read(id: &str, ts_s: i64, w: Workload, fp: &str, owner: Option<Owner>) -> Event {
        let mut e = Event::new(
            id.into(),
            Timestamp::from_unix_nanos(ts_s * 1_000_000_000),
            "node-1",
            EventKind::SecretRead,
        );
        e.workload = w.into();
        e.process.tgid = 100;
        e.process.comm = "api".into();
        e.secret = Some(
            SecretRef {
                path: Some(format!("/secrets/{fp}")),
                ..Default::default()
            }
            .into(),
        );
        e.credential = Some(
            CredentialRef {
                fingerprint: fp.into(),
                kind: "k8s_sa_token".into(),
                owner,
                ..Default::default()
            }
            .into(),
        );
        e
    }

    pub fn owner_pod(ns: &str, name: &str, uid: &str) -> Owner {
        Owner {
            kind: WorkloadKind::Pod,
            id: format!("pod:{ns}/{name}"),
            namespace: Some(ns.into()),
            pod: Some(name.into()),
            pod_uid: Some(uid.into()),
            source: "kubelet_volume".into(),
        }
    }
}
