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
    /// Where the node's cgroup layout starts below the cgroup2 mount (`/`; a kubelet with
    /// `--cgroup-root`, or a node nested in a container, names its cgroup; `*` matches
    /// within one component). Pods, containers and units are recognized only in the known
    /// top-level layouts below one of these. `CREDWATCH_CGROUP_ROOTS` (comma-separated)
    /// overrides it.
    #[serde(default = "default_cgroup_roots")]
    pub cgroup_roots: Vec<String>,
    /// A `/pods` answer larger than this is refused (whoever answers on the kubelet port
    /// must not make the agent buffer without bound).
    #[serde(default = "default_max_pod_list_bytes")]
    pub max_pod_list_bytes: usize,
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
fn default_max_pod_list_bytes() -> usize {
    64 << 20
}
fn default_cgroup_roots() -> Vec<String> {
    vec!["/".into()]
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
            cgroup_roots: default_cgroup_roots(),
            max_pod_list_bytes: default_max_pod_list_bytes(),
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
        c.check(
            self.max_pod_list_bytes >= 4096,
            "max_pod_list_bytes",
            "must be at least 4096",
        );
        c.check(
            !self.cgroup_roots.is_empty(),
            "cgroup_roots",
            "must name at least one root (\"/\" on a plain node)",
        );
        for (i, r) in self.cgroup_roots.iter().enumerate() {
            if let Err(e) = crate::workload::parse_root(r) {
                c.fail(&format!("cgroup_roots[{i}]"), e);
            }
        }
    }
}

impl Config {
    /// `CREDWATCH_CGROUP_ROOTS` (comma-separated), else `cgroup_roots`.
    pub fn cgroup_roots(&self) -> Vec<String> {
        match std::env::var("CREDWATCH_CGROUP_ROOTS") {
            Ok(v) if !v.trim().is_empty() => v
                .split(',')
                .map(|r| r.trim().to_owned())
                .filter(|r| !r.is_empty())
                .collect(),
            _ => self.cgroup_roots.clone(),
        }
    }

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
    max_bytes: usize,
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
            // Kubelet serving certificates are often self-signed; opt-in only, and said
            // loudly: whoever answers on the kubelet's address gets the agent's token and
            // can name every pod.
            tracing::warn!(
                url = base_url,
                "kubernetes.insecure_skip_tls_verify is on: the kubelet's certificate is not \
                 checked, so anything answering there receives the agent's token and can forge \
                 pod identities; set ca_file (the kubelet serving CA or the cluster CA bundle)"
            );
            b = b.danger_accept_invalid_certs(true);
        }
        Ok(KubeletClient {
            http: b.build().context("building kubelet HTTP client")?,
            url: format!("{}/pods", base_url.trim_end_matches('/')),
            token_path,
            max_bytes: default_max_pod_list_bytes(),
        })
    }

    /// The client `cfg` describes for the kubelet at `base_url`.
    pub fn from_config(base_url: &str, cfg: &Config) -> Result<Self> {
        let mut c = Self::new(
            base_url,
            cfg.token_path.clone(),
            cfg.ca_file.as_deref(),
            cfg.insecure_skip_tls_verify,
        )?;
        c.max_bytes = cfg.max_pod_list_bytes;
        Ok(c)
    }

    /// Refuse answers larger than `n` bytes.
    pub fn with_max_bytes(mut self, n: usize) -> Self {
        self.max_bytes = n;
        self
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
        let mut resp = req
            .send()
            .await
            .with_context(|| format!("GET {}", self.url))?;
        let status = resp.status();
        if !status.is_success() {
            bail!("GET {}: HTTP {status}", self.url);
        }
        // Read in chunks up to the cap: a declared or actual size past it ends the read.
        let too_big = |n: u64| {
            anyhow::anyhow!(
                "GET {}: pod list larger than kubernetes.max_pod_list_bytes ({} bytes; {n} seen)",
                self.url,
                self.max_bytes
            )
        };
        if let Some(n) = resp.content_length()
            && n > self.max_bytes as u64
        {
            return Err(too_big(n));
        }
        let mut body = Vec::new();
        while let Some(chunk) = resp
            .chunk()
            .await
            .with_context(|| format!("reading {}", self.url))?
        {
            if body.len() + chunk.len() > self.max_bytes {
                return Err(too_big((body.len() + chunk.len()) as u64));
            }
            body.extend_from_slice(&chunk);
        }
        // Parsing a large list takes a while: not on the thread that drains the ring.
        tokio::task::spawn_blocking(move || PodDirectory::from_pod_list(&body))
            .await
            .context("parsing the pod list")?
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

    /// Serves `body` to every request (chunked when `chunked`, so no length up front).
    fn serve(body: Vec<u8>, chunked: bool) -> u16 {
        use std::io::{Read, Write};
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = l.local_addr().unwrap().port();
        let body = std::sync::Arc::new(body);
        std::thread::spawn(move || {
            for c in l.incoming() {
                let Ok(mut c) = c else { continue };
                let body = body.clone();
                std::thread::spawn(move || {
                    let mut req = [0u8; 4096];
                    let _ = c.read(&mut req);
                    let head = if chunked {
                        "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n"
                            .to_owned()
                    } else {
                        format!(
                            "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                            body.len()
                        )
                    };
                    if c.write_all(head.as_bytes()).is_err() {
                        return;
                    }
                    if chunked {
                        for part in body.chunks(1 << 16) {
                            let ok = c
                                .write_all(format!("{:x}\r\n", part.len()).as_bytes())
                                .and_then(|_| c.write_all(part))
                                .and_then(|_| c.write_all(b"\r\n"));
                            if ok.is_err() {
                                return;
                            }
                        }
                        let _ = c.write_all(b"0\r\n\r\n");
                    } else {
                        let _ = c.write_all(&body);
                    }
                });
            }
        });
        port
    }

    /// A PodList of `n` pods (valid JSON, fake names).
    fn pod_list(n: usize) -> Vec<u8> {
        let mut s = String::from(r#"{"kind":"PodList","apiVersion":"v1","metadata":{},"items":["#);
        for i in 0..n {
            if i > 0 {
                s.push(',');
            }
            s.push_str(&format!(
                r#"{{"metadata":{{"name":"p-{i}","namespace":"ns","uid":"00000000-0000-4000-8000-{i:012}","labels":{{"padding":"{}"}}}},"spec":{{"serviceAccountName":"sa","containers":[]}}}}"#,
                "x".repeat(400)
            ));
        }
        s.push_str("]}");
        s.into_bytes()
    }

    /// A 100 MB answer on the kubelet port is refused without buffering it (declared, or
    /// streamed without a length), instead of being read whole and parsed.
    #[test]
    fn a_100_mb_pod_list_is_refused() {
        let big = pod_list(200_000);
        assert!(big.len() > 100 << 20, "{}", big.len());
        let rt = crate::current_thread_runtime().unwrap();
        for chunked in [false, true] {
            let port = serve(big.clone(), chunked);
            let c =
                KubeletClient::new(&format!("http://127.0.0.1:{port}"), None, None, false).unwrap();
            let err = rt.block_on(c.fetch()).expect_err("refused");
            assert!(format!("{err:#}").contains("max_pod_list_bytes"), "{err:#}");
        }
    }

    /// A large list within the cap is parsed off the runtime's thread: a timer on the same
    /// single-threaded runtime (the agent's loop) keeps ticking meanwhile.
    #[test]
    fn pod_lists_are_parsed_off_the_loop_thread() {
        let list = pod_list(60_000);
        let port = serve(list.clone(), false);
        let c = KubeletClient::new(&format!("http://127.0.0.1:{port}"), None, None, false)
            .unwrap()
            .with_max_bytes(list.len() + 1);
        let t = std::time::Instant::now();
        let parsed = PodDirectory::from_pod_list(&list).unwrap();
        let parse_time = t.elapsed();
        assert_eq!(parsed.len(), 60_000);
        let rt = crate::current_thread_runtime().unwrap();
        let (dir, worst) = rt.block_on(async {
            let fetch = tokio::spawn(async move { c.fetch().await });
            let mut worst = Duration::ZERO;
            let mut last = tokio::time::Instant::now();
            let mut tick = tokio::time::interval(Duration::from_millis(5));
            while !fetch.is_finished() {
                tick.tick().await;
                worst = worst.max(last.elapsed());
                last = tokio::time::Instant::now();
            }
            (fetch.await.unwrap().unwrap(), worst)
        });
        assert_eq!(dir.len(), 60_000);
        assert!(
            worst < parse_time / 2,
            "the loop stalled {worst:?} (parsing alone takes {parse_time:?})"
        );
    }
}
