//! Detectors: each turns events into findings on its own; [`Detectors`] runs them in order
//! and folds repeats through [`Dedup`]. Time comes from event timestamps only, so a replay
//! reaches the same conclusions as the live run.

mod credential_theft;
mod dormant_credential;
mod human_use;
mod metadata_fetch;
mod off_schedule;
mod owner_mismatch;
mod privilege_expansion;
mod token_reuse;

use std::{sync::Arc, time::Duration};

pub use credential_theft::CredentialTheft;
pub use dormant_credential::DormantCredential;
pub use human_use::HumanUse;
pub use metadata_fetch::MetadataCredentialFetch;
pub use off_schedule::OffSchedule;
pub use owner_mismatch::OwnerMismatch;
pub use privilege_expansion::PrivilegeExpansion;
pub use token_reuse::TokenReuse;

use crate::{
    alert::{Alert, Dedup},
    baseline::Baselines,
    config::{Checker, Validate},
    event::Event,
    policy::Policy,
};

/// Judges one event. `base` holds what was learned before this event; it is updated with
/// the event only after every detector has seen it.
pub trait Detector {
    fn observe(&mut self, ev: &Event, base: &Baselines, out: &mut Vec<Alert>);
}

/// `[detect]`.
#[derive(Clone, Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// One credential used by two workloads within this window is token reuse.
    #[serde(default = "default_hour", with = "humantime_serde")]
    pub reuse_window: Duration,
    /// Repeats of one finding within this window raise its count instead of a new alert.
    #[serde(default = "default_hour", with = "humantime_serde")]
    pub suppression_window: Duration,
    /// How long each workload's behaviour with its credentials is learned before new
    /// destinations, secrets, executables and hours are findings; `0s` turns learning off.
    #[serde(default = "default_learning", with = "humantime_serde")]
    pub learning_period: Duration,
    /// A credential first used again after this much silence is `dormant_credential`;
    /// `0s` turns it off.
    #[serde(default = "default_dormant", with = "humantime_serde")]
    pub dormant_after: Duration,
    /// Bound on learned (workload, credential) profiles; the least recently active go first.
    #[serde(default = "default_max_baselines")]
    pub max_baselines: usize,
}

fn default_hour() -> Duration {
    Duration::from_secs(3600)
}
fn default_learning() -> Duration {
    Duration::from_secs(7 * 24 * 3600)
}
fn default_dormant() -> Duration {
    Duration::from_secs(30 * 24 * 3600)
}
fn default_max_baselines() -> usize {
    100_000
}

impl Default for Config {
    fn default() -> Self {
        Config {
            reuse_window: default_hour(),
            suppression_window: default_hour(),
            learning_period: default_learning(),
            dormant_after: default_dormant(),
            max_baselines: default_max_baselines(),
        }
    }
}

impl Validate for Config {
    fn validate(&self, c: &mut Checker) {
        c.check(
            self.max_baselines > 0,
            "max_baselines",
            "must be at least 1",
        );
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
    pub fn new(opts: &Config, policy: Arc<Policy>, baselines: Baselines) -> Self {
        Detectors {
            detectors: vec![
                Box::new(TokenReuse::new(opts.reuse_window)),
                Box::new(OwnerMismatch::new(policy.clone())),
                Box::new(OffSchedule::new(policy.clone())),
                Box::new(PrivilegeExpansion::new(policy.clone())),
                Box::new(DormantCredential::new(opts.dormant_after)),
                Box::new(HumanUse),
                Box::new(CredentialTheft),
                Box::new(MetadataCredentialFetch),
            ],
            baselines,
            policy,
            dedup: Dedup::new(opts.suppression_window),
            scratch: Vec::new(),
            allowlisted: 0,
        }
    }

    pub fn observe(&mut self, ev: &Event, out: &mut Vec<Alert>) {
        // A node agent maintaining a pod's volume is neither using nor stealing it.
        if ev.is_maintenance() {
            return;
        }
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

/// `hmac-sha256:0123abcd…` → `0123abcd` for summaries. By characters, not bytes: a
/// fingerprint read back from ClickHouse or a replay is outside input.
pub fn short_fp(fp: &str) -> &str {
    let hex = fp.rsplit(':').next().unwrap_or(fp);
    let end = hex.char_indices().nth(12).map_or(hex.len(), |(i, _)| i);
    &hex[..end]
}

#[cfg(test)]
pub(crate) mod testutil {
    use std::sync::Arc;

    use crate::baseline::Baselines;
    use crate::event::{
        Body, CredentialRef, CredentialType, CredentialUse, Destination, Event, Owner, OwnerSource,
        PrivChange, SecretRead, SecretRef, Timestamp, Workload, WorkloadId, WorkloadKind,
    };

    /// No learned profiles (learning off).
    pub fn base() -> Baselines {
        Baselines::in_memory(std::time::Duration::ZERO, 16)
    }

    pub fn pod(ns: &str, name: &str, uid: &str) -> Workload {
        Workload {
            kind: WorkloadKind::Pod,
            id: WorkloadId::pod(ns, name),
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
            id: WorkloadId::host(uid, exe),
            ..Default::default()
        }
    }

    fn at(id: &str, ts_s: i64, w: Workload, body: Body) -> Event {
        let mut e = Event::new(
            id.into(),
            Timestamp::from_unix_nanos(ts_s * 1_000_000_000),
            "node-1",
            body,
        );
        e.workload = w.into();
        e.process.tgid = 100;
        e.process.comm = "api".into();
        e
    }

    pub fn read(id: &str, ts_s: i64, w: Workload, fp: &str, owner: Option<Owner>) -> Event {
        let secret = SecretRef {
            path: Some(format!("/secrets/{fp}")),
            ..Default::default()
        };
        let credential = CredentialRef {
            fingerprint: fp.into(),
            kind: CredentialType::K8sSaToken,
            owner,
            ..Default::default()
        };
        let body = Body::SecretRead(SecretRead {
            secret: secret.into(),
            credential: credential.into(),
            maintenance: false,
        });
        at(id, ts_s, w, body)
    }

    /// The read `r` turned into a use of its credential towards `dst`.
    pub fn used(r: Event, dst: Destination) -> Event {
        let Body::SecretRead(read) = &r.body else {
            panic!("not a read: {r:?}")
        };
        let body = Body::CredentialUse(Box::new(CredentialUse {
            secret: Some(read.secret.clone()),
            credential: Arc::clone(&read.credential),
            dst,
            result: "ok".into(),
            read_event: r.id.clone(),
            read_ts: r.ts,
            attribution: Default::default(),
            via_pid: None,
        }));
        Event { body, ..r }
    }

    pub fn priv_change(id: &str, ts_s: i64, w: Workload, change: PrivChange) -> Event {
        at(id, ts_s, w, Body::PrivChange(Box::new(change)))
    }

    pub fn owner_pod(ns: &str, name: &str, uid: &str) -> Owner {
        Owner {
            kind: WorkloadKind::Pod,
            id: WorkloadId::pod(ns, name),
            namespace: Some(ns.into()),
            pod: Some(name.into()),
            pod_uid: Some(uid.into()),
            source: OwnerSource::KubeletVolume,
        }
    }
}
