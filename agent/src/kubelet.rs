//! Pod metadata from the kubelet's `/pods` endpoint (a `PodList`, the same JSON the API
//! server serves), indexed by pod uid for the workload resolver.

use std::{collections::HashMap, time::Duration};

use anyhow::{Context, Result, bail};
use k8s_openapi::{List, api::core::v1::Pod};

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PodMeta {
    pub uid: String,
    pub namespace: String,
    pub name: String,
    pub service_account: String,
    pub labels: Vec<(String, String)>,
    /// (container name, runtime-stripped container id)
    pub containers: Vec<(String, String)>,
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
            let containers = pod
                .status
                .and_then(|s| s.container_statuses)
                .unwrap_or_default()
                .into_iter()
                .filter_map(|c| {
                    // "containerd://<id>", "cri-o://<id>", "docker://<id>"
                    let id = c.container_id?;
                    let id = id
                        .split_once("://")
                        .map(|(_, i)| i.to_owned())
                        .unwrap_or(id);
                    Some((c.name, id))
                })
                .collect();
            pods.insert(
                uid.clone(),
                PodMeta {
                    uid,
                    namespace: meta.namespace.unwrap_or_else(|| "default".into()),
                    name: meta.name.unwrap_or_default(),
                    service_account: spec
                        .service_account_name
                        .unwrap_or_else(|| "default".into()),
                    labels: meta.labels.unwrap_or_default().into_iter().collect(),
                    containers,
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
        assert_eq!(
            p.containers,
            vec![("api".to_owned(), "abc123abc123".to_owned())]
        );
        assert!(PodDirectory::from_pod_list(b"{\"kind\":\"ConfigMap\"}").is_err());
        assert!(PodDirectory::from_pod_list(b"\xff\xfe").is_err());
    }
}
