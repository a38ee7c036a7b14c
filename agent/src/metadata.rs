//! Cloud metadata services: what a request line asks them for. A workload fetching the
//! node's role credentials from 169.254.169.254 is the classic way a pod steals the node's
//! cloud identity; the path says which provider and which role.

use crate::event::{Label, sanitize};

/// (method, path) of an HTTP request line (`GET /latest/meta-data/ HTTP/1.1`), bounded
/// and escaped; `None` when the bytes are not one.
pub fn request_line(bytes: &[u8]) -> Option<(String, String)> {
    let line = bytes.split(|&b| b == b'\r' || b == b'\n').next()?;
    let mut parts = line.split(|&b| b == b' ');
    let method = parts.next()?;
    let path = parts.next()?;
    let version = parts.next()?;
    let is_method =
        !method.is_empty() && method.len() <= 10 && method.iter().all(|b| b.is_ascii_uppercase());
    if !is_method || !path.starts_with(b"/") || !version.starts_with(b"HTTP/") {
        return None;
    }
    Some((sanitize(method), sanitize(path)))
}

/// What a metadata path fetches: (provider, credentials?, role or service account).
pub fn classify(path: &str) -> (Label, bool, Option<String>) {
    let p = path.split(['?', '#']).next().unwrap_or(path);
    let after = |prefix: &str| {
        p.strip_prefix(prefix)
            .map(|r| r.trim_matches('/'))
            .filter(|r| !r.is_empty())
            .map(|r| r.split('/').next().unwrap_or(r).to_owned())
    };
    // AWS: role credentials, and the IMDSv2 session token needed to fetch them.
    if p.starts_with("/latest/api/token") {
        return ("aws".into(), true, None);
    }
    for prefix in [
        "/latest/meta-data/iam/security-credentials",
        "/latest/meta-data/identity-credentials/ec2/security-credentials",
    ] {
        if p.starts_with(prefix) {
            return ("aws".into(), true, after(prefix));
        }
    }
    // Alibaba: RAM role credentials.
    if let Some(role) = after("/latest/meta-data/ram/security-credentials") {
        return ("alibaba".into(), true, Some(role));
    }
    if p.starts_with("/latest/") {
        return ("aws".into(), false, None);
    }
    // GCP: a service account's access or identity token.
    if let Some(rest) = p.strip_prefix("/computeMetadata/v1/instance/service-accounts/") {
        let mut it = rest.split('/');
        let account = it.next().filter(|a| !a.is_empty()).map(str::to_owned);
        let token = rest.ends_with("/token") || rest.contains("/identity");
        return ("gcp".into(), token, account);
    }
    if p.starts_with("/computeMetadata/") {
        return ("gcp".into(), false, None);
    }
    // Azure: managed identity tokens.
    if p.starts_with("/metadata/identity/oauth2/token") {
        return ("azure".into(), true, None);
    }
    if p.starts_with("/metadata/") {
        return ("azure".into(), false, None);
    }
    if p.starts_with("/openstack/") {
        return ("openstack".into(), false, None);
    }
    ("unknown".into(), false, None)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_lines_and_credential_paths() {
        assert_eq!(
            request_line(
                b"GET /latest/meta-data/iam/security-credentials/node-role HTTP/1.1\r\nHost: x"
            ),
            Some((
                "GET".into(),
                "/latest/meta-data/iam/security-credentials/node-role".into()
            ))
        );
        assert_eq!(request_line(b"\x16\x03\x01 TLS hello"), None);
        assert_eq!(request_line(b"GET"), None);
        let c = |p: &str| {
            let (prov, creds, role) = classify(p);
            (prov.into_owned(), creds, role)
        };
        assert_eq!(
            c("/latest/meta-data/iam/security-credentials/node-role"),
            ("aws".into(), true, Some("node-role".into()))
        );
        assert_eq!(c("/latest/api/token"), ("aws".into(), true, None));
        assert_eq!(
            c("/latest/meta-data/instance-id"),
            ("aws".into(), false, None)
        );
        assert_eq!(
            c("/computeMetadata/v1/instance/service-accounts/default/token"),
            ("gcp".into(), true, Some("default".into()))
        );
        assert_eq!(
            c("/metadata/identity/oauth2/token?api-version=2018-02-01&resource=x"),
            ("azure".into(), true, None)
        );
        assert_eq!(c("/"), ("unknown".into(), false, None));
    }
}
