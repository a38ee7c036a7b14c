//! dormant_credential: a credential read again after `[detect] dormant_after` of silence on
//! this node. A credential nobody needed for that long is either forgotten (and should be
//! revoked) or found by somebody who should not have it. The last use is kept in the
//! baseline store, so the silence spans agent restarts.

use std::time::Duration;

use super::{Detector, short_fp};
use crate::{
    alert::{Alert, AlertKind, Evidence, Severity},
    baseline::Baselines,
    event::{Body, Event, Timestamp, duration_ns},
};

pub struct DormantCredential {
    after_ns: i64,
}

impl DormantCredential {
    pub fn new(after: Duration) -> Self {
        DormantCredential {
            after_ns: duration_ns(after),
        }
    }
}

impl Detector for DormantCredential {
    fn observe(&mut self, ev: &Event, base: &Baselines, out: &mut Vec<Alert>) {
        let (Body::SecretRead(read), true) = (&ev.body, self.after_ns > 0) else {
            return;
        };
        let cred = &read.credential;
        let Some(last) = base.credential_last_seen(cred.identity()) else {
            return;
        };
        let silent = ev.ts.unix_nanos().saturating_sub(last);
        if silent < self.after_ns {
            return;
        }
        let days = silent / (24 * 3600 * 1_000_000_000);
        let last = Timestamp::from_unix_nanos(last);
        out.push(Alert::about(
            AlertKind::DormantCredential,
            Severity::Medium,
            ev,
            cred,
            format!(
                "{} read {} credential {}, unused on this node for {days} days",
                ev.workload.id,
                cred.kind,
                short_fp(&cred.fingerprint)
            ),
            vec![Evidence::of(ev).with_detail(format!(
                "previous use {}",
                serde_json::to_string(&last).unwrap_or_default().trim_matches('"')
            ))],
            format!(
                "dormant_credential|{}|{}",
                cred.fingerprint,
                last.unix_nanos()
            ),
        ));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::detect::testutil::*;

    const DAY: i64 = 24 * 3600;

    #[test]
    fn first_read_after_the_silence_fires_once() {
        let mut d = DormantCredential::new(Duration::from_secs(30 * DAY as u64));
        let mut b = Baselines::in_memory(Duration::ZERO, 100);
        let mut out = Vec::new();
        let w = || pod("payments", "api", "ua");
        for (i, ts) in [0, 29 * DAY, 59 * DAY, 59 * DAY + 60]
            .into_iter()
            .enumerate()
        {
            let e = read(&format!("e{i}"), ts, w(), "fp", None);
            d.observe(&e, &b, &mut out);
            b.learn(&e);
        }
        // 0 → 29 days: not dormant (near miss); 29 → 59 days: dormant; a minute later: not.
        assert_eq!(out.len(), 1, "{out:#?}");
        assert!(out[0].summary.contains("30 days"), "{}", out[0].summary);
        assert_eq!(out[0].evidence[0].event_id, "e2");
    }
}
