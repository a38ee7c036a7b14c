//! metadata_credential_fetch: a pod asks the cloud metadata service for credentials (the
//! node's role, a token): the classic way out of a pod into the node's cloud identity.
//! Host processes and units fetching them are the node using its own role. Pods that are
//! meant to (a node agent running as a pod) are declared in `[[allow]]`.

use super::Detector;
use crate::{
    alert::{Alert, AlertKind, Evidence, Severity},
    baseline::Baselines,
    event::{Body, Event, WorkloadKind},
};

pub struct MetadataCredentialFetch;

impl Detector for MetadataCredentialFetch {
    fn observe(&mut self, ev: &Event, _base: &Baselines, out: &mut Vec<Alert>) {
        let Body::MetadataFetch(m) = &ev.body else {
            return;
        };
        if !m.credentials || ev.workload.kind != WorkloadKind::Pod {
            return;
        }
        let Some(cred) = &m.credential else { return };
        let what = match &m.role {
            Some(r) => format!("{} credentials of role {r}", m.provider),
            None => format!("a {} credential ({})", m.provider, m.path),
        };
        out.push(Alert::about(
            AlertKind::MetadataCredentialFetch,
            Severity::High,
            ev,
            cred,
            format!(
                "{} fetched {what} from the metadata service ({} {})",
                ev.workload.id, m.method, m.path
            ),
            vec![Evidence::of(ev).with_detail(format!("{} {}", m.method, m.path))],
            format!(
                "metadata_credential_fetch|{}|{}",
                ev.workload.id,
                cred.identity()
            ),
        ));
    }
}
