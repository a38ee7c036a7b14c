//! human_use: a machine credential read by a process on a terminal — somebody at a shell,
//! an ssh session or `kubectl exec -t` — or, without one, descending from an SSH login
//! (`ssh node cat …`) or a container exec (`kubectl exec pod -- cat …`), rather than by the
//! workload itself. The ancestry check is `ProcessTable::session_of`.

use super::{Detector, short_fp};
use crate::baseline::Baselines;
use crate::{
    alert::{Alert, AlertKind, Evidence, Severity},
    event::{Body, CredentialRef, CredentialType, Event},
};

pub struct HumanUse;

/// A credential belongs to a machine when a workload owns it, when its type is a workload
/// identity, or when it lives outside people's home directories.
pub fn is_machine_credential(cred: &CredentialRef, path: Option<&str>) -> bool {
    if cred.owner.is_some() || cred.kind.is_machine_identity() {
        return true;
    }
    path.is_some_and(|p| !(p.starts_with("/home/") || p.starts_with("/root/")))
}

impl Detector for HumanUse {
    fn observe(&mut self, ev: &Event, _base: &Baselines, out: &mut Vec<Alert>) {
        let Body::SecretRead(read) = &ev.body else {
            return;
        };
        let cred = &read.credential;
        let how = match (&ev.process.tty, &ev.process.session) {
            (Some(tty), _) => format!("terminal {tty}"),
            (None, Some(session)) => format!("session {session}"),
            (None, None) => return,
        };
        if !is_machine_credential(cred, ev.secret_path()) {
            return;
        }
        let severity = if cred.kind == CredentialType::K8sSaToken {
            Severity::High
        } else {
            Severity::Medium
        };
        out.push(Alert::about(
            AlertKind::HumanUse,
            severity,
            ev,
            cred,
            format!(
                "{} credential {} read from {how} by {} (uid {}) in {}",
                cred.kind,
                short_fp(&cred.fingerprint),
                ev.process.comm,
                ev.process.uid,
                ev.workload.id
            ),
            vec![Evidence::of(ev).with_detail(format!("interactive: {how}"))],
            format!(
                "human_use|{}|{}|{}",
                ev.workload.id, ev.process.uid, cred.fingerprint
            ),
        ));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::detect::testutil::*;
    use std::sync::Arc;

    #[test]
    fn token_read_on_a_terminal_is_human_use() {
        let mut out = Vec::new();
        let mut e = read("e1", 0, host(1000, "/usr/bin/cat"), "fp", None);
        e.process.tty = Some("pts/3".into());
        HumanUse.observe(&e, &base(), &mut out);
        assert_eq!(out.len(), 1);
        assert!(out[0].summary.contains("pts/3"));
        // No terminal, but under an SSH login.
        let mut e = read("e2", 0, host(0, "/usr/bin/cat"), "fp2", None);
        e.process.session = Some("ssh (sshd pid 600)".into());
        HumanUse.observe(&e, &base(), &mut out);
        assert_eq!(out.len(), 2);
        assert!(
            out[1].summary.contains("session ssh (sshd pid 600)"),
            "{}",
            out[1].summary
        );
    }

    #[test]
    fn no_terminal_or_personal_credential_is_not() {
        let mut out = Vec::new();
        HumanUse.observe(
            &read("e1", 0, pod("a", "p", "u"), "fp", None),
            &base(),
            &mut out,
        );
        let mut own = read("e2", 0, host(1000, "/usr/bin/ssh"), "fp", None);
        own.process.tty = Some("pts/1".into());
        let Body::SecretRead(r) = &mut own.body else {
            unreachable!()
        };
        Arc::make_mut(&mut r.credential).kind = CredentialType::SshPrivateKey;
        Arc::make_mut(&mut r.secret).path = Some("/home/alice/.ssh/id_ed25519".into());
        HumanUse.observe(&own, &base(), &mut out);
        assert!(out.is_empty(), "{out:#?}");
    }
}
