//! Pod metadata from the kubelet's `/pods` endpoint (a `PodList`, the same JSON the API
//! server serves), indexed by pod uid for the workload resolver.

use std::{collections::HashMap, time::Duration};

use anyhow::{Context, Result, bail};
use k8s_openapi::{List, api::core::v1::Pod};

use crate::config::{Checker, Validate, check_http_url, check_nonzero};

/// `[kubernetes]`: where pod volumes live and where the pod list comes from.
#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Kubelet API (`/pods`); `None` disables pod metadata lookups.
    pub kubelet_url: Option<String>,
    #[serde(default = "default_kubelet_root")]
    pub kubelet_root: String,
    #[serde(default = "default_trust_domain")]
    pub trust_domain: String,
    /// Bearer token for the kubelet (the agent's own service-account token in a DaemonSet).
    pub token_path: Option<String>,
    /// CA bundle for the kubelet's serving certificate.
    pub ca_file: Option<String>,
    /// Accept any kubelet certificate (self-signed serving certs); off by default.
    #[serde(default)]
    pub insecure_skip_tls_verify: bool,
    #[serde(default = "default_kubelet_refresh", with = "humantime_serde")]
    pub refresh_interval: Duration,
}

fn default_kubelet_root() -> String {
    "/var/lib/kubelet".into()
}
fn default_trust_domain() -> String {
    "cluster.local".into()
}
fn default_kubelet_refresh() -> Duration {
    Duration::from_secs(30)
}

impl Default for Config {
    fn default() -> Self {
        Config {
            kubelet_url: None,
            kubelet_root: default_kubelet_root(),
            trust_domain: default_trust_domain(),
            token_path: None,
            ca_file: None,
            insecure_skip_tls_verify: false,
            refresh_interval: default_kubelet_refresh(),
        }
    }
}

impl Validate for Config {
    fn validate(&self, c: &mut Checker) {
        if let Some(url) = &self.kubelet_url {
            check_http_url(c, "kubelet_url", url);
        }
        c.check(
            self.kubelet_root.starts_with('/'),
            "kubelet_root",
            "must be an absolute path",
        );
        c.check(
            !self.trust_domain.is_empty()
                && self
                    .trust_domain
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"-._".contains(&b)),
            "trust_domain",
            "must be a SPIFFE trust domain name (letters, digits, `-`, `.`, `_`)",
        );
        check_nonzero(c, "refresh_interval", self.refresh_interval);
    }
}

impl Config {
    /// `CREDWATCH_KUBELET_URL` (a DaemonSet without host networking reaches its kubelet at
    /// the node IP, which only the pod's environment knows), else `kubelet_url`.
    pub fn url(&self) -> Option<String> {
        std::env::var("CREDWATCH_KUBELET_URL")
            .ok()
            .filter(|u| !u.trim().is_empty())
            .or_else(|| self.kubelet_url.clone())
    }
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PodMeta {
    pub uid: String,
    pub namespace: String,
    pub name: String,
    pub service_account: String,
}

/// Pods on this node by uid.
#[derive(Clone, Debug, Default)]
pub struct PodDirectory {
    pods: HashMap<String, PodMeta>,
    /// Distinct for every parsed list (0 for the empty default), so caches of what was
    /// resolved against a directory know when it was replaced.
    generation: u64,
}

impl PodDirectory {
    pub fn generation(&self) -> u64 {
        self.generation
    }

    pub fn by_uid(&self, uid: &str) -> Option<&PodMeta> {
        self.pods.get(uid)
    }

    pub fn len(&self) -> usize {
        self.pods.len()
    }

    pub fn is_empty(&self) -> bool {
        self.pods.is_empty()
    }

    /// Parses a kubelet `/pods` response. Pods without a uid are skipped; a body that is not
    /// a PodList is an error.
    pub fn from_pod_list(body: &[u8]) -> Result<Self> {
        let list: List<Pod> =
            serde_json::from_slice(body).context("kubelet /pods response is not a PodList")?;
        let mut pods = HashMap::new();
        for pod in list.items {
            let meta = pod.metadata;
            let Some(uid) = meta.uid else { continue };
            let spec = pod.spec.unwrap_or_default();
            pods.insert(
                uid.clone(),
                PodMeta {
                    uid,
                    namespace: meta.namespace.unwrap_or_else(|| "default".into()),
                    name: meta.name.unwrap_or_default(),
                    service_account: spec
                        .service_account_name
                        .unwrap_or_else(|| "default".into()),
                },
            );
        }
        static GENERATION: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);
        Ok(PodDirectory {
            pods,
            generation: GENERATION.fetch_add(1, std::sync::atomic::Ordering::Relaxed),
        })
    }
}

pub struct KubeletClient {
    http: reqwest::Client,
    url: String,
    token_path: Option<String>,
}

impl KubeletClient {
    pub fn new(
        base_url: &str,
        token_path: Option<String>,
        ca_file: Option<&str>,
        insecure: bool,
    ) -> Result<Self> {
        let mut b = reqwest::Client::builder().timeout(Duration::from_secs(10));
        if let Some(ca) = ca_file {
            let pem = std::fs::read(ca).with_context(|| format!("reading kubelet CA {ca}"))?;
            b = b.add_root_certificate(
                reqwest::Certificate::from_pem(&pem)
                    .with_context(|| format!("parsing kubelet CA {ca}"))?,
            );
        }
        if insecure {
            // Kubelet serving certificates are often self-signed; opt-in only.
            b = b.danger_accept_invalid_certs(true);
        }
        Ok(KubeletClient {
            http: b.build().context("building kubelet HTTP client")?,
            url: format!("{}/pods", base_url.trim_end_matches('/')),
            token_path,
        })
    }

    pub async fn fetch(&self) -> Result<PodDirectory> {
        let mut req = self.http.get(&self.url);
        if let Some(path) = &self.token_path {
            // Re-read each time: projected tokens rotate.
            let token = tokio::fs::read_to_string(path)
                .await
                .with_context(|| format!("reading kubelet token {path}"))?;
            req = req.bearer_auth(token.trim());
        }
        let resp = req
            .send()
            .await
            .with_context(|| format!("GET {}", self.url))?;
        let status = resp.status();
        if !status.is_success() {
            bail!("GET {}: HTTP {status}", self.url);
        }
        let body = resp
            .bytes()
            .await
            .with_context(|| format!("reading {}", self.url))?;
        PodDirectory::from_pod_list(&body)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_kubelet_pod_list() {
        let body = br#"{"kind":"PodList","apiVersion":"v1","metadata":{},"items":[
          {"metadata":{"name":"api-7f9c","namespace":"payments","uid":"0a1b2c3d-4e5f-6789-abcd-ef0123456789","labels":{"app":"api"}},
           "spec":{"serviceAccountName":"payments-api","containers":[{"name":"api","image":"x"}]},
           "status":{"containerStatuses":[{"name":"api","containerID":"containerd://abc123abc123","image":"x","imageID":"","ready":true,"restartCount":0}]}},
          {"metadata":{"name":"no-uid"},"spec":{"containers":[]}}
        ]}"#;
        let d = PodDirectory::from_pod_list(body).unwrap();
        assert_eq!(d.len(), 1);
        let p = d.by_uid("0a1b2c3d-4e5f-6789-abcd-ef0123456789").unwrap();
        assert_eq!(
            (p.namespace.as_str(), p.name.as_str()),
            ("payments", "api-7f9c")
        );
        assert_eq!(p.service_account, "payments-api");
        assert!(PodDirectory::from_pod_list(b"{\"kind\":\"ConfigMap\"}").is_err());
        assert!(PodDirectory::from_pod_list(b"\xff\xfe").is_err());
    }
}
