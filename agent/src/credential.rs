//! Names a credential without keeping it: a keyed fingerprint of the bytes, a type, and
//! labels that are not secret (JWT claims, AWS access key id, kubeconfig user/cluster, key
//! algorithm). Nothing returned here contains the secret value.

use std::{collections::BTreeMap, fs, path::Path};

use base64::Engine as _;
use hmac::{Hmac, Mac};
use sha2::Sha256;

use crate::config::{Checker, Validate};

pub type Labels = BTreeMap<String, String>;

macro_rules! credential_types {
    ($($v:ident => $s:literal,)+) => {
        /// What kind of credential a secret holds. `Other` keeps a type this build does not
        /// know (a recorded event from a newer agent) so it round-trips unchanged.
        #[derive(Clone, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
        pub enum CredentialType {
            $($v,)+
            #[default]
            GenericSecret,
            Other(String),
        }

        impl CredentialType {
            pub fn as_str(&self) -> &str {
                match self {
                    $(CredentialType::$v => $s,)+
                    CredentialType::GenericSecret => "generic_secret",
                    CredentialType::Other(s) => s,
                }
            }

            pub fn parse(s: &str) -> CredentialType {
                match s {
                    $($s => CredentialType::$v,)+
                    "generic_secret" => CredentialType::GenericSecret,
                    other => CredentialType::Other(other.to_owned()),
                }
            }
        }
    };
}

credential_types! {
    K8sSaToken => "k8s_sa_token",
    Jwt => "jwt",
    AwsAccessKey => "aws_access_key",
    Kubeconfig => "kubeconfig",
    SshPrivateKey => "ssh_private_key",
    TlsPrivateKey => "tls_private_key",
    DockerAuth => "docker_auth",
    GcpServiceAccountKey => "gcp_service_account_key",
    GcpUserCredentials => "gcp_user_credentials",
    GcpWorkloadIdentity => "gcp_workload_identity",
    VaultToken => "vault_token",
    Netrc => "netrc",
    GitCredentials => "git_credentials",
    NpmToken => "npm_token",
    PypiToken => "pypi_token",
    GithubToken => "github_token",
    GitlabToken => "gitlab_token",
    SlackToken => "slack_token",
    UrlPassword => "url_password",
    Password => "password",
    ApiKey => "api_key",
    Unreadable => "unreadable",
}

impl CredentialType {
    /// Types that identify workloads, not people.
    pub fn is_machine_identity(&self) -> bool {
        matches!(
            self,
            CredentialType::K8sSaToken
                | CredentialType::GcpServiceAccountKey
                | CredentialType::GcpWorkloadIdentity
                | CredentialType::VaultToken
                | CredentialType::DockerAuth
                | CredentialType::TlsPrivateKey
        )
    }
}

impl std::fmt::Display for CredentialType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl serde::Serialize for CredentialType {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.as_str())
    }
}

impl<'de> serde::Deserialize<'de> for CredentialType {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = std::borrow::Cow::<str>::deserialize(d)?;
        Ok(CredentialType::parse(&s))
    }
}

#[derive(Clone)]
pub struct Fingerprinter {
    key: Vec<u8>,
}

impl std::fmt::Debug for Fingerprinter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Fingerprinter { key: <redacted> }")
    }
}

impl Fingerprinter {
    pub fn new(key: &[u8]) -> Self {
        Fingerprinter { key: key.to_vec() }
    }

    /// `hmac-sha256:<64 hex>`. Keyed so a leaked event stream cannot be used to confirm a
    /// guessed secret without the fleet key.
    pub fn fingerprint(&self, value: &[u8]) -> String {
        format!("hmac-sha256:{}", hmac_sha256_hex(&self.key, value))
    }
}

/// Lower-case hex HMAC-SHA256 of `data` under `key` (fingerprints, webhook signatures).
pub fn hmac_sha256_hex(key: &[u8], data: &[u8]) -> String {
    let mut mac = Hmac::<Sha256>::new_from_slice(key).expect("HMAC takes any key length");
    mac.update(data);
    hex::encode(mac.finalize().into_bytes())
}

/// `[fingerprint]`: the key fingerprints are made with.
#[derive(Debug, Default, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FingerprintConfig {
    /// HMAC key inline (tests, single nodes); prefer `key_file` so it stays out of configs.
    pub key: Option<Secret>,
    /// File holding the key; share it across a fleet so fingerprints compare between nodes.
    pub key_file: Option<String>,
}

/// Shortest key accepted from a file or generated: 256 bits, the HMAC-SHA256 block strength.
pub const MIN_KEY_BYTES: usize = 32;
/// Shortest inline key (inline keys are for tests and single nodes).
const MIN_INLINE_KEY_BYTES: usize = 8;

impl Validate for FingerprintConfig {
    fn validate(&self, c: &mut Checker) {
        if let Some(k) = &self.key {
            c.check(
                k.expose().len() >= MIN_INLINE_KEY_BYTES,
                "key",
                format_args!("must be at least {MIN_INLINE_KEY_BYTES} bytes"),
            );
            c.check(
                self.key_file.is_none(),
                "key_file",
                "give either `key` or `key_file`, not both",
            );
        }
    }
}

impl FingerprintConfig {
    /// The key: from `key_file`, else `key`, else a per-node key generated once under the
    /// state dir (fingerprints then compare across restarts but not across nodes).
    pub fn load_key(&self, state_dir: &Path) -> anyhow::Result<Vec<u8>> {
        use anyhow::Context as _;
        if let Some(path) = &self.key_file {
            let key =
                fs::read(path).with_context(|| format!("reading fingerprint.key_file {path}"))?;
            anyhow::ensure!(
                key.len() >= MIN_KEY_BYTES,
                "fingerprint.key_file {path} holds {} bytes; use at least {MIN_KEY_BYTES} \
                 (`head -c 32 /dev/urandom > {path}`)",
                key.len()
            );
            return Ok(key);
        }
        if let Some(k) = &self.key {
            return Ok(k.expose().as_bytes().to_vec());
        }
        let path = state_dir.join("fingerprint.key");
        match fs::read(&path) {
            Ok(k) if k.len() >= MIN_KEY_BYTES => return Ok(k),
            Ok(k) => tracing::warn!(
                "{} holds {} bytes (an interrupted write by an older version); generating a \
                 new key: fingerprints change and baselines are learned again",
                path.display(),
                k.len()
            ),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
        }
        let mut key = [0u8; MIN_KEY_BYTES];
        getrandom::fill(&mut key)
            .map_err(|e| anyhow::anyhow!("generating fingerprint key: {e}"))?;
        crate::state::write_private(&path, &key)?;
        Ok(key.to_vec())
    }
}

/// A configured secret value (password, key): never printed by `Debug`, never `Display`ed,
/// so it cannot reach a log line or an error by accident. `expose` is the one way out.
#[derive(Clone, Default, serde::Deserialize)]
#[serde(transparent)]
pub struct Secret(String);

impl Secret {
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("<redacted>")
    }
}

/// What a secret file holds: its type and non-secret labels.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Analysis {
    pub kind: CredentialType,
    pub labels: Labels,
}

pub fn analyze(path: &str, bytes: &[u8]) -> Analysis {
    let text = std::str::from_utf8(bytes).ok();
    let file = path.rsplit('/').next().unwrap_or(path);
    let mut labels = Labels::new();
    let trimmed = text.map(str::trim).unwrap_or("");

    if let Some(claims) = jwt_claims(trimmed) {
        let kind = jwt_kind(&claims, &mut labels);
        return Analysis { kind, labels };
    }
    if let Some(t) = text {
        if t.contains("aws_access_key_id") {
            aws_labels(t, &mut labels);
            return Analysis {
                kind: CredentialType::AwsAccessKey,
                labels,
            };
        }
        if t.contains("-----BEGIN OPENSSH PRIVATE KEY-----") {
            ssh_labels(t, &mut labels);
            return Analysis {
                kind: CredentialType::SshPrivateKey,
                labels,
            };
        }
        if let Some(alg) = pem_key_algorithm(t) {
            labels.insert("algorithm".into(), alg.into());
            let kind = if path.contains("/.ssh/") || file.starts_with("ssh_host_") {
                CredentialType::SshPrivateKey
            } else {
                CredentialType::TlsPrivateKey
            };
            return Analysis { kind, labels };
        }
        if (t.contains("clusters:") || t.contains("\"clusters\""))
            && kubeconfig_labels(t, &mut labels)
        {
            return Analysis {
                kind: CredentialType::Kubeconfig,
                labels,
            };
        }
        if let Ok(v) = serde_json::from_str::<serde_json::Value>(t)
            && let Some(kind) = json_labels(&v, &mut labels)
        {
            return Analysis { kind, labels };
        }
        if file == ".vault-token" || file == "vault-token" {
            let prefix = trimmed
                .split('.')
                .next()
                .filter(|p| p.len() <= 4 && trimmed.contains('.'));
            labels.insert(
                "token_kind".into(),
                prefix.map(vault_kind).unwrap_or("legacy").into(),
            );
            return Analysis {
                kind: CredentialType::VaultToken,
                labels,
            };
        }
        if file == ".netrc" || file == "_netrc" {
            let hosts: Vec<&str> = t
                .split_whitespace()
                .collect::<Vec<_>>()
                .windows(2)
                .filter(|w| w[0] == "machine")
                .map(|w| w[1])
                .collect();
            labels.insert("machines".into(), hosts.join(","));
            return Analysis {
                kind: CredentialType::Netrc,
                labels,
            };
        }
        if file == ".git-credentials" {
            let hosts: Vec<String> = t
                .lines()
                .filter_map(|l| url::Url::parse(l.trim()).ok())
                .filter_map(|u| u.host_str().map(str::to_owned))
                .collect();
            labels.insert("hosts".into(), hosts.join(","));
            return Analysis {
                kind: CredentialType::GitCredentials,
                labels,
            };
        }
        if file == ".npmrc" || file == ".pypirc" {
            return Analysis {
                kind: if file == ".npmrc" {
                    CredentialType::NpmToken
                } else {
                    CredentialType::PypiToken
                },
                labels,
            };
        }
    }
    Analysis {
        kind: CredentialType::GenericSecret,
        labels,
    }
}

fn vault_kind(prefix: &str) -> &'static str {
    match prefix {
        "hvs" | "s" => "service",
        "hvb" | "b" => "batch",
        "hvr" | "r" => "recovery",
        _ => "unknown",
    }
}

/// Decodes a JWT's claims (no signature check: we only label, never trust).
pub fn jwt_claims(s: &str) -> Option<serde_json::Map<String, serde_json::Value>> {
    if s.len() > 16 << 10 || s.bytes().filter(|&b| b == b'.').count() != 2 {
        return None;
    }
    let mut parts = s.split('.');
    let header = b64url(parts.next()?)?;
    let header: serde_json::Value = serde_json::from_slice(&header).ok()?;
    header.get("alg")?;
    let payload = b64url(parts.next()?)?;
    match serde_json::from_slice(&payload).ok()? {
        serde_json::Value::Object(m) => Some(m),
        _ => None,
    }
}

fn b64url(s: &str) -> Option<Vec<u8>> {
    base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(s.trim_end_matches('='))
        .ok()
}

fn claim_str(v: &serde_json::Value) -> Option<String> {
    match v {
        serde_json::Value::String(s) => Some(s.clone()),
        serde_json::Value::Number(n) => Some(n.to_string()),
        serde_json::Value::Array(a) => Some(
            a.iter()
                .filter_map(|x| x.as_str())
                .collect::<Vec<_>>()
                .join(","),
        ),
        _ => None,
    }
}

/// The kind of a JWT from its claims (a Kubernetes service-account token, or any JWT), with
/// its non-secret claims as labels.
pub fn jwt_kind(
    claims: &serde_json::Map<String, serde_json::Value>,
    labels: &mut Labels,
) -> CredentialType {
    for key in ["iss", "sub", "aud", "exp", "iat", "nbf"] {
        if let Some(v) = claims.get(key).and_then(claim_str) {
            labels.insert(key.into(), v);
        }
    }
    // Bound service-account tokens carry the pod they were issued for.
    if let Some(k) = claims.get("kubernetes.io").and_then(|v| v.as_object()) {
        if let Some(ns) = k.get("namespace").and_then(|v| v.as_str()) {
            labels.insert("namespace".into(), ns.into());
        }
        if let Some(sa) = k
            .get("serviceaccount")
            .and_then(|v| v.get("name"))
            .and_then(|v| v.as_str())
        {
            labels.insert("service_account".into(), sa.into());
        }
        if let Some(pod) = k.get("pod") {
            if let Some(n) = pod.get("name").and_then(|v| v.as_str()) {
                labels.insert("pod".into(), n.into());
            }
            if let Some(u) = pod.get("uid").and_then(|v| v.as_str()) {
                labels.insert("pod_uid".into(), u.into());
            }
        }
        return CredentialType::K8sSaToken;
    }
    let sub = labels.get("sub").cloned().unwrap_or_default();
    if sub.starts_with("system:serviceaccount:") {
        // Legacy (secret-based) service-account token.
        let mut it = sub
            .trim_start_matches("system:serviceaccount:")
            .splitn(2, ':');
        if let (Some(ns), Some(sa)) = (it.next(), it.next()) {
            labels.insert("namespace".into(), ns.into());
            labels.insert("service_account".into(), sa.into());
        }
        return CredentialType::K8sSaToken;
    }
    CredentialType::Jwt
}

fn aws_labels(t: &str, labels: &mut Labels) {
    let mut ids = Vec::new();
    let mut profiles = Vec::new();
    for line in t.lines() {
        let line = line.trim();
        if let Some(p) = line.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
            profiles.push(p.trim().to_owned());
        }
        if let Some((k, v)) = line.split_once('=')
            && k.trim() == "aws_access_key_id"
        {
            ids.push(v.trim().to_owned());
        }
    }
    // Access key ids are identifiers, not secrets (AWS shows them in CloudTrail).
    if let Some(first) = ids.first() {
        labels.insert("access_key_id".into(), first.clone());
        let kind = match &first.get(..4) {
            Some("AKIA") => "long_lived",
            Some("ASIA") => "temporary",
            _ => "unknown",
        };
        labels.insert("key_kind".into(), kind.into());
    }
    if ids.len() > 1 {
        labels.insert("access_key_ids".into(), ids.join(","));
    }
    if !profiles.is_empty() {
        labels.insert("profiles".into(), profiles.join(","));
    }
}

fn ssh_labels(t: &str, labels: &mut Labels) {
    let body: String = t
        .lines()
        .skip_while(|l| !l.starts_with("-----BEGIN"))
        .skip(1)
        .take_while(|l| !l.starts_with("-----END"))
        .collect();
    let Ok(raw) = base64::engine::general_purpose::STANDARD.decode(body.trim()) else {
        return;
    };
    // openssh-key-v1\0, string cipher, string kdf, string kdfopts, u32 nkeys, string pubkey
    let Some(mut rest) = raw.strip_prefix(b"openssh-key-v1\0".as_slice()) else {
        return;
    };
    let mut next = || -> Option<&[u8]> {
        let len = u32::from_be_bytes(rest.get(..4)?.try_into().ok()?) as usize;
        let s = rest.get(4..4 + len)?;
        rest = &rest[4 + len..];
        Some(s)
    };
    let Some(cipher) = next() else { return };
    labels.insert("encrypted".into(), (cipher != b"none").to_string());
    let (Some(_kdf), Some(_opts)) = (next(), next()) else {
        return;
    };
    let Some(_n) = rest.get(..4) else { return };
    rest = &rest[4..];
    let next_pub = || -> Option<Vec<u8>> {
        let len = u32::from_be_bytes(rest.get(..4)?.try_into().ok()?) as usize;
        let blob = rest.get(4..4 + len)?;
        let tlen = u32::from_be_bytes(blob.get(..4)?.try_into().ok()?) as usize;
        Some(blob.get(4..4 + tlen)?.to_vec())
    };
    if let Some(alg) = next_pub() {
        labels.insert(
            "algorithm".into(),
            String::from_utf8_lossy(&alg).into_owned(),
        );
    }
}

fn pem_key_algorithm(t: &str) -> Option<&'static str> {
    for (marker, alg) in [
        ("-----BEGIN RSA PRIVATE KEY-----", "rsa"),
        ("-----BEGIN EC PRIVATE KEY-----", "ec"),
        ("-----BEGIN DSA PRIVATE KEY-----", "dsa"),
        ("-----BEGIN ENCRYPTED PRIVATE KEY-----", "pkcs8_encrypted"),
        ("-----BEGIN PRIVATE KEY-----", "pkcs8"),
    ] {
        if t.contains(marker) {
            return Some(alg);
        }
    }
    None
}

fn kubeconfig_labels(t: &str, labels: &mut Labels) -> bool {
    let Ok(doc) = serde_yaml::from_str::<serde_yaml::Value>(t) else {
        return false;
    };
    let current = doc
        .get("current-context")
        .and_then(|v| v.as_str())
        .unwrap_or("");
    let contexts = doc.get("contexts").and_then(|v| v.as_sequence());
    let ctx = contexts.and_then(|cs| {
        cs.iter()
            .find(|c| c.get("name").and_then(|n| n.as_str()) == Some(current))
            .or_else(|| cs.first())
    });
    let Some(ctx) = ctx.and_then(|c| c.get("context")) else {
        return false;
    };
    let user = ctx.get("user").and_then(|v| v.as_str()).unwrap_or("");
    let cluster = ctx.get("cluster").and_then(|v| v.as_str()).unwrap_or("");
    labels.insert("user".into(), user.into());
    labels.insert("cluster".into(), cluster.into());
    if !current.is_empty() {
        labels.insert("context".into(), current.into());
    }
    let server = doc
        .get("clusters")
        .and_then(|v| v.as_sequence())
        .and_then(|cs| {
            cs.iter()
                .find(|c| c.get("name").and_then(|n| n.as_str()) == Some(cluster))
        })
        .and_then(|c| c.get("cluster")?.get("server")?.as_str());
    if let Some(s) = server {
        labels.insert("server".into(), s.into());
    }
    let auth = doc
        .get("users")
        .and_then(|v| v.as_sequence())
        .and_then(|us| {
            us.iter()
                .find(|u| u.get("name").and_then(|n| n.as_str()) == Some(user))
        })
        .and_then(|u| u.get("user"))
        .map(|u| {
            if u.get("client-key-data").is_some() || u.get("client-key").is_some() {
                "client_certificate"
            } else if u.get("token").is_some() || u.get("tokenFile").is_some() {
                "token"
            } else if u.get("exec").is_some() {
                "exec_plugin"
            } else {
                "other"
            }
        });
    if let Some(a) = auth {
        labels.insert("auth".into(), a.into());
    }
    true
}

fn json_labels(v: &serde_json::Value, labels: &mut Labels) -> Option<CredentialType> {
    if let Some(auths) = v.get("auths").and_then(|a| a.as_object()) {
        labels.insert(
            "registries".into(),
            auths.keys().cloned().collect::<Vec<_>>().join(","),
        );
        return Some(CredentialType::DockerAuth);
    }
    match v.get("type").and_then(|t| t.as_str()) {
        Some("service_account") => {
            for k in ["client_email", "project_id", "private_key_id"] {
                if let Some(s) = v.get(k).and_then(|x| x.as_str()) {
                    labels.insert(k.into(), s.into());
                }
            }
            Some(CredentialType::GcpServiceAccountKey)
        }
        Some("authorized_user") => Some(CredentialType::GcpUserCredentials),
        Some("external_account") => Some(CredentialType::GcpWorkloadIdentity),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An obviously fake, unsigned SA token shaped like the kubelet's projected ones.
    pub fn fake_sa_token(ns: &str, sa: &str, pod: &str, pod_uid: &str) -> String {
        let e = |v: &str| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(v);
        let claims = format!(
            r#"{{"aud":["https://kubernetes.default.svc"],"exp":1795000000,"iat":1794996400,"iss":"https://kubernetes.default.svc","kubernetes.io":{{"namespace":"{ns}","pod":{{"name":"{pod}","uid":"{pod_uid}"}},"serviceaccount":{{"name":"{sa}","uid":"x"}}}},"sub":"system:serviceaccount:{ns}:{sa}"}}"#
        );
        format!(
            "{}.{}.{}",
            e(r#"{"alg":"RS256","kid":"test"}"#),
            e(&claims),
            e("FAKE-SIGNATURE")
        )
    }

    #[test]
    fn fingerprint_is_keyed_and_stable() {
        let a = Fingerprinter::new(b"fleet-key");
        let b = Fingerprinter::new(b"other-key");
        assert_eq!(a.fingerprint(b"x"), a.fingerprint(b"x"));
        assert_ne!(a.fingerprint(b"x"), b.fingerprint(b"x"));
        assert!(a.fingerprint(b"x").starts_with("hmac-sha256:"));
        assert_eq!(a.fingerprint(b"x").len(), "hmac-sha256:".len() + 64);
        assert!(!format!("{a:?}").contains("fleet-key"));
    }

    #[test]
    fn projected_sa_token_labels() {
        let tok = fake_sa_token(
            "payments",
            "payments-api",
            "api-7f9c",
            "0a1b2c3d-4e5f-6789-abcd-ef0123456789",
        );
        let an = analyze(
            "/var/lib/kubelet/pods/x/volumes/kubernetes.io~projected/kube-api-access-1/token",
            tok.as_bytes(),
        );
        assert_eq!(an.kind, CredentialType::K8sSaToken);
        assert_eq!(an.labels["namespace"], "payments");
        assert_eq!(an.labels["service_account"], "payments-api");
        assert_eq!(an.labels["pod"], "api-7f9c");
        assert_eq!(an.labels["aud"], "https://kubernetes.default.svc");
        assert_eq!(an.labels["exp"], "1795000000");
        assert!(an.labels.values().all(|v| !v.contains("FAKE-SIGNATURE")));
    }

    #[test]
    fn aws_credentials_labels_without_secret() {
        let f = "[default]\naws_access_key_id = AKIAFAKEFAKEFAKE0001\naws_secret_access_key = fake/secret/NOT-REAL\n";
        let an = analyze("/root/.aws/credentials", f.as_bytes());
        assert_eq!(an.kind, CredentialType::AwsAccessKey);
        assert_eq!(an.labels["access_key_id"], "AKIAFAKEFAKEFAKE0001");
        assert_eq!(an.labels["key_kind"], "long_lived");
        assert_eq!(an.labels["profiles"], "default");
        assert!(an.labels.values().all(|v| !v.contains("NOT-REAL")));
    }

    #[test]
    fn kubeconfig_labels_user_and_cluster() {
        let k = "apiVersion: v1\nclusters:\n- cluster:\n    server: https://10.0.0.1:6443\n  name: prod\ncontexts:\n- context:\n    cluster: prod\n    user: admin\n  name: admin@prod\ncurrent-context: admin@prod\nusers:\n- name: admin\n  user:\n    token: FAKE-TOKEN\n";
        let an = analyze("/etc/kubernetes/admin.conf", k.as_bytes());
        assert_eq!(an.kind, CredentialType::Kubeconfig);
        assert_eq!(
            (an.labels["user"].as_str(), an.labels["cluster"].as_str()),
            ("admin", "prod")
        );
        assert_eq!(an.labels["auth"], "token");
        assert!(an.labels.values().all(|v| !v.contains("FAKE-TOKEN")));
    }

    #[test]
    fn malformed_inputs_do_not_panic() {
        for input in [
            &b"a.b.c"[..],
            b"eyJhbGciOiJub25lIn0.!!!.x",
            b"-----BEGIN OPENSSH PRIVATE KEY-----\nAAAA\n-----END OPENSSH PRIVATE KEY-----",
            b"clusters: [",
            b"\xff\xfe\x00",
            b"{\"auths\": 3}",
        ] {
            let _ = analyze("/x/token", input);
        }
        assert_eq!(
            analyze("/x/y", b"hunter2").kind,
            CredentialType::GenericSecret
        );
    }
}
