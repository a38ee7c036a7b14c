//! TOML configuration. Unknown keys are errors (a typo must not silently disable a watch);
//! every error names the file and line.

use std::{path::Path, time::Duration};

use anyhow::{Context, Result, bail};
use serde::Deserialize;
use toml::Spanned;

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Node name in events; defaults to the host name.
    pub node: Option<String>,
    #[serde(default)]
    pub secrets: Secrets,
    #[serde(default)]
    pub kubernetes: Kubernetes,
    #[serde(default)]
    pub fingerprint: Fingerprint,
    #[serde(default)]
    pub correlate: Correlate,
    #[serde(default)]
    pub detect: Detect,
    /// `[[credential]]` policy entries.
    #[serde(default)]
    pub credential: Vec<Spanned<CredentialPolicy>>,
    /// `[[allow]]` known-good findings.
    #[serde(default)]
    pub allow: Vec<Spanned<AllowEntry>>,
    #[serde(default)]
    pub sensors: Sensors,
    /// Events and alerts to ClickHouse; absent: no ClickHouse sink.
    pub clickhouse: Option<ClickHouse>,
    /// Where alerts go besides `--alerts` (stdout by default).
    #[serde(default)]
    pub alerts: Alerts,
    #[serde(default)]
    pub metrics: MetricsConfig,
}

/// Alert output format.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AlertFormat {
    /// credwatch's own alert JSON.
    #[default]
    Json,
    /// OCSF 1.3 Detection Finding (class 2004).
    Ocsf,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Alerts {
    /// Format of the `--alerts` output (stdout by default).
    #[serde(default)]
    pub format: AlertFormat,
    #[serde(default)]
    pub file: Vec<FileSink>,
    #[serde(default)]
    pub webhook: Vec<WebhookSink>,
    #[serde(default)]
    pub syslog: Vec<SyslogSink>,
}

/// JSON lines to a file, rotated by size (`alerts.jsonl` → `alerts.jsonl.1` …).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileSink {
    pub path: String,
    #[serde(default)]
    pub format: AlertFormat,
    #[serde(default = "default_rotate_bytes")]
    pub max_bytes: u64,
    /// Rotated files kept.
    #[serde(default = "default_keep")]
    pub keep: usize,
}

/// HTTP POST of each alert as a JSON body.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WebhookSink {
    pub url: String,
    #[serde(default)]
    pub format: AlertFormat,
    /// Key for an `X-Credwatch-Signature: sha256=<hex HMAC of the body>` header.
    pub secret_file: Option<String>,
    /// Extra headers (`Authorization = "Bearer …"` belongs in a file, not here).
    #[serde(default)]
    pub headers: std::collections::BTreeMap<String, String>,
    #[serde(default = "default_sink_timeout", with = "humantime_serde")]
    pub timeout: Duration,
    /// Attempts per alert before it is dropped (and counted).
    #[serde(default = "default_attempts")]
    pub max_attempts: u32,
    /// Alerts waiting for this sink; beyond it new ones are dropped (and counted).
    #[serde(default = "default_sink_queue")]
    pub queue: usize,
}

/// RFC 5424 syslog: `udp://host:514`, `tcp://host:601` (octet counting), `tls://host:6514`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SyslogSink {
    pub address: String,
    /// CA bundle for `tls://` (default: the web PKI roots).
    pub ca_file: Option<String>,
    #[serde(default = "default_facility")]
    pub facility: String,
    #[serde(default = "default_app_name")]
    pub app_name: String,
    #[serde(default)]
    pub format: AlertFormat,
    #[serde(default = "default_sink_timeout", with = "humantime_serde")]
    pub timeout: Duration,
    #[serde(default = "default_sink_queue")]
    pub queue: usize,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MetricsConfig {
    /// Prometheus `/metrics` and `/healthz`; `""` turns them off. Localhost by default.
    #[serde(default = "default_metrics_listen")]
    pub listen: String,
}

impl Default for MetricsConfig {
    fn default() -> Self {
        MetricsConfig {
            listen: default_metrics_listen(),
        }
    }
}

fn default_metrics_listen() -> String {
    "127.0.0.1:9464".into()
}
fn default_rotate_bytes() -> u64 {
    100 << 20
}
fn default_keep() -> usize {
    5
}
fn default_sink_timeout() -> Duration {
    Duration::from_secs(5)
}
fn default_attempts() -> u32 {
    5
}
fn default_sink_queue() -> usize {
    10_000
}
fn default_facility() -> String {
    "auth".into()
}
fn default_app_name() -> String {
    "credwatch".into()
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClickHouse {
    /// HTTP(S) endpoint, `http://clickhouse:8123`.
    pub url: String,
    #[serde(default = "default_ch_database")]
    pub database: String,
    pub user: Option<String>,
    pub password: Option<String>,
    /// File holding the password (a mounted Secret); preferred over `password`.
    pub password_file: Option<String>,
    /// CA bundle for an `https://` endpoint (default: the system's web PKI roots).
    pub ca_file: Option<String>,
    /// A batch is sent when it has this many rows…
    #[serde(default = "default_batch_rows")]
    pub batch_rows: usize,
    /// …or about this many bytes…
    #[serde(default = "default_batch_bytes")]
    pub batch_bytes: usize,
    /// …or is this old.
    #[serde(default = "default_flush", with = "humantime_serde")]
    pub flush_interval: Duration,
    /// Rows waiting in memory for the writer; beyond it the agent counts drops.
    #[serde(default = "default_queue_rows")]
    pub queue_rows: usize,
    /// Batches ClickHouse could not take wait on disk (under the state dir) up to this size.
    #[serde(default = "default_spool_bytes")]
    pub spool_max_bytes: u64,
    /// `drop_oldest` (default: keep the newest data) or `drop_newest` when the spool is full.
    #[serde(default)]
    pub spool_full: SpoolFull,
    #[serde(default = "default_ch_timeout", with = "humantime_serde")]
    pub timeout: Duration,
    /// Rows older than this are deleted by ClickHouse (TTL), in days.
    #[serde(default = "default_ttl_days")]
    pub ttl_days: u32,
    /// Cluster name: `ON CLUSTER`, Replicated tables and Distributed tables over them.
    pub cluster: Option<String>,
    /// Apply the schema at start (idempotent); turn off where the SOC owns the DDL.
    #[serde(default = "yes")]
    pub migrate_on_start: bool,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SpoolFull {
    #[default]
    DropOldest,
    DropNewest,
}

fn default_ch_database() -> String {
    "credwatch".into()
}
fn default_batch_rows() -> usize {
    50_000
}
fn default_batch_bytes() -> usize {
    32 << 20
}
fn default_flush() -> Duration {
    Duration::from_secs(1)
}
fn default_queue_rows() -> usize {
    500_000
}
fn default_spool_bytes() -> u64 {
    1 << 30
}
fn default_ch_timeout() -> Duration {
    Duration::from_secs(30)
}
fn default_ttl_days() -> u32 {
    90
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Secrets {
    /// Globs of secret files, on top of the built-in catalog.
    #[serde(default)]
    pub paths: Vec<Spanned<String>>,
    /// Directories whose new files are caught in the kernel before the next rescan.
    #[serde(default)]
    pub watch_dirs: Vec<Spanned<String>>,
    /// Watch the built-in catalog of credential locations.
    #[serde(default = "yes")]
    pub catalog: bool,
    #[serde(default = "default_rescan", with = "humantime_serde")]
    pub rescan_interval: Duration,
    /// Credentials are read at most this many bytes to fingerprint them.
    #[serde(default = "default_max_read")]
    pub max_read_bytes: u64,
    /// Where the host's `/` is visible (a container: `/proc/1/root` with hostPID);
    /// `CREDWATCH_HOST_ROOT` overrides it. Paths everywhere else stay host paths.
    pub host_root: Option<String>,
}

impl Default for Secrets {
    fn default() -> Self {
        Secrets {
            paths: Vec::new(),
            watch_dirs: Vec::new(),
            catalog: true,
            rescan_interval: default_rescan(),
            max_read_bytes: default_max_read(),
            host_root: None,
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Kubernetes {
    /// Kubelet read-only API (`/pods`); `None` disables pod metadata lookups.
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

impl Default for Kubernetes {
    fn default() -> Self {
        Kubernetes {
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

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Fingerprint {
    /// HMAC key; share it across a fleet so fingerprints compare between nodes.
    pub key: Option<String>,
    /// File holding the key (preferred over `key`: keeps it out of the ConfigMap).
    pub key_file: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Correlate {
    /// A connect this soon after a secret read by the same process is a credential use.
    #[serde(default = "default_window", with = "humantime_serde")]
    pub window: Duration,
}

impl Default for Correlate {
    fn default() -> Self {
        Correlate {
            window: default_window(),
        }
    }
}

/// What one credential may do. Named by `path` (glob) or `fingerprint`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CredentialPolicy {
    pub path: Option<String>,
    pub fingerprint: Option<String>,
    /// Free text for the analyst ("nightly backup to S3").
    pub purpose: Option<String>,
    /// Weekday/time windows it may be used in: `"Mon-Fri 09:00-17:00"`, `"daily 02:00-03:00"`.
    #[serde(default)]
    pub schedule: Vec<String>,
    /// IANA timezone of the windows (default UTC).
    pub timezone: Option<String>,
    /// How long a run started by a cron `schedule` entry may use the credential.
    #[serde(default, with = "humantime_serde")]
    pub run_for: Option<Duration>,
    /// The workload the credential belongs to (`pod:payments/api-*`, `unit:backup.service`,
    /// `spiffe://cluster.local/ns/payments/sa/api`); overrides the kubelet-volume owner.
    pub owner: Option<String>,
    /// Other workloads that may read it without an `owner_mismatch` (same selector syntax).
    #[serde(default)]
    pub allowed_workloads: Vec<String>,
    /// Where it may be used: `10.0.0.0/8`, `10.1.2.3:443`, `[2001:db8::]/32:443`,
    /// `*.amazonaws.com:443`, `*:5432`. A use elsewhere is `privilege_expansion`.
    #[serde(default)]
    pub allowed_destinations: Vec<String>,
}

/// A known-good finding: alerts matching every given field are not raised.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AllowEntry {
    /// Alert kind (`token_reuse`, …); all kinds when absent.
    pub alert: Option<String>,
    /// Workload selector, as in `[[credential]] owner`.
    pub workload: Option<String>,
    pub fingerprint: Option<String>,
    /// Glob of the secret's inventory path.
    pub path: Option<String>,
    /// Destination pattern, as in `allowed_destinations`.
    pub destination: Option<String>,
    /// Why this is fine; required so the allowlist documents itself.
    pub reason: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Detect {
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

impl Default for Detect {
    fn default() -> Self {
        Detect {
            reuse_window: default_hour(),
            suppression_window: default_hour(),
            learning_period: default_learning(),
            dormant_after: default_dormant(),
            max_baselines: default_max_baselines(),
        }
    }
}

impl Detect {
    pub fn options(&self) -> crate::detect::DetectOptions {
        crate::detect::DetectOptions {
            reuse_window: self.reuse_window,
            suppression_window: self.suppression_window,
            learning_period: self.learning_period,
            dormant_after: self.dormant_after,
        }
    }
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

fn default_hour() -> Duration {
    Duration::from_secs(3600)
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Sensors {
    #[serde(default = "default_ring_bytes")]
    pub ring_bytes: u32,
    #[serde(default = "default_wake_bytes")]
    pub wake_bytes: u32,
    /// The agent drains the ring at least this often (the probes do not wake it per event).
    #[serde(default = "default_drain", with = "humantime_serde")]
    pub drain_interval: Duration,
}

impl Default for Sensors {
    fn default() -> Self {
        Sensors {
            ring_bytes: default_ring_bytes(),
            wake_bytes: default_wake_bytes(),
            drain_interval: default_drain(),
        }
    }
}

fn yes() -> bool {
    true
}
fn default_rescan() -> Duration {
    Duration::from_secs(5)
}
fn default_max_read() -> u64 {
    64 << 10
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
fn default_window() -> Duration {
    Duration::from_secs(30)
}
fn default_ring_bytes() -> u32 {
    8 << 20
}
fn default_wake_bytes() -> u32 {
    256 << 10
}
fn default_drain() -> Duration {
    Duration::from_millis(10)
}

/// 1-based line of a byte offset.
fn line_of(src: &str, offset: usize) -> usize {
    src[..offset.min(src.len())]
        .bytes()
        .filter(|&b| b == b'\n')
        .count()
        + 1
}

impl Config {
    pub fn load(path: &Path) -> Result<Config> {
        let bytes = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
        let src = String::from_utf8(bytes)
            .map_err(|e| anyhow::anyhow!("{}: not UTF-8 ({e})", path.display()))?;
        Config::parse(&src).map_err(|e| anyhow::anyhow!("{}:{e}", path.display()))
    }

    /// The compiled `[[credential]]` and `[[allow]]` entries (validated at parse time).
    pub fn policy(&self) -> Result<std::sync::Arc<crate::policy::Policy>> {
        let entries: Vec<CredentialPolicy> = self
            .credential
            .iter()
            .map(|c| c.get_ref().clone())
            .collect();
        let allow: Vec<AllowEntry> = self.allow.iter().map(|a| a.get_ref().clone()).collect();
        Ok(std::sync::Arc::new(crate::policy::Policy::compile(
            &entries, &allow,
        )?))
    }

    /// Errors are `LINE: message` so callers can prefix the file name.
    pub fn parse(src: &str) -> Result<Config> {
        let cfg: Config = toml::from_str(src).map_err(|e| {
            let line = e.span().map(|s| line_of(src, s.start)).unwrap_or(0);
            anyhow::anyhow!("{line}: {}", e.message())
        })?;
        cfg.validate(src)?;
        Ok(cfg)
    }

    fn validate(&self, src: &str) -> Result<()> {
        for g in &self.secrets.paths {
            if let Err(e) = globset::Glob::new(g.get_ref()) {
                bail!(
                    "{}: secrets.paths: bad glob {:?}: {e}",
                    line_of(src, g.span().start),
                    g.get_ref()
                );
            }
            if !g.get_ref().starts_with('/') {
                bail!(
                    "{}: secrets.paths: {:?} must be an absolute path",
                    line_of(src, g.span().start),
                    g.get_ref()
                );
            }
        }
        for d in &self.secrets.watch_dirs {
            if !d.get_ref().starts_with('/') {
                bail!(
                    "{}: secrets.watch_dirs: {:?} must be an absolute path",
                    line_of(src, d.span().start),
                    d.get_ref()
                );
            }
        }
        if let Some(url) = &self.kubernetes.kubelet_url
            && !(url.starts_with("http://") || url.starts_with("https://"))
        {
            bail!("kubernetes.kubelet_url must start with http:// or https:// (got {url:?})");
        }
        for c in &self.credential {
            crate::policy::Policy::compile(std::slice::from_ref(c.get_ref()), &[]).map_err(
                |e| anyhow::anyhow!("{}: [[credential]]: {e:#}", line_of(src, c.span().start)),
            )?;
        }
        for a in &self.allow {
            crate::policy::Policy::compile(&[], std::slice::from_ref(a.get_ref())).map_err(
                |e| anyhow::anyhow!("{}: [[allow]]: {e:#}", line_of(src, a.span().start)),
            )?;
        }
        for w in &self.alerts.webhook {
            if !(w.url.starts_with("http://") || w.url.starts_with("https://")) {
                bail!(
                    "alerts.webhook.url must start with http:// or https:// (got {:?})",
                    w.url
                );
            }
            if w.max_attempts == 0 || w.queue == 0 {
                bail!("alerts.webhook: max_attempts and queue must be at least 1");
            }
        }
        for s in &self.alerts.syslog {
            crate::sinks::syslog::Target::parse(&s.address, &s.facility)
                .map_err(|e| anyhow::anyhow!("alerts.syslog: {e:#}"))?;
        }
        for f in &self.alerts.file {
            if !f.path.starts_with('/') || f.max_bytes == 0 {
                bail!(
                    "alerts.file: path must be absolute and max_bytes > 0 ({:?})",
                    f.path
                );
            }
        }
        if !self.metrics.listen.is_empty()
            && self.metrics.listen.parse::<std::net::SocketAddr>().is_err()
        {
            bail!(
                "metrics.listen must be ADDRESS:PORT like 127.0.0.1:9464 (got {:?})",
                self.metrics.listen
            );
        }
        if let Some(ch) = &self.clickhouse {
            if !(ch.url.starts_with("http://") || ch.url.starts_with("https://")) {
                bail!(
                    "clickhouse.url must start with http:// or https:// (got {:?})",
                    ch.url
                );
            }
            let ident = |s: &str| {
                !s.is_empty() && s.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_')
            };
            if !ident(&ch.database) {
                bail!(
                    "clickhouse.database must be letters, digits and _ (got {:?})",
                    ch.database
                );
            }
            if let Some(c) = &ch.cluster
                && !ident(c)
            {
                bail!("clickhouse.cluster must be letters, digits and _ (got {c:?})");
            }
            if ch.batch_rows == 0 || ch.queue_rows < ch.batch_rows {
                bail!("clickhouse: need 0 < batch_rows <= queue_rows");
            }
            if ch.ttl_days == 0 {
                bail!("clickhouse.ttl_days must be at least 1");
            }
        }
        if self.detect.max_baselines == 0 {
            bail!("detect.max_baselines must be at least 1");
        }
        if self.sensors.ring_bytes < 4096 || !self.sensors.ring_bytes.is_power_of_two() {
            bail!(
                "sensors.ring_bytes must be a power of two ≥ 4096 (got {})",
                self.sensors.ring_bytes
            );
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn empty_config_gets_defaults() {
        let c = Config::parse("").unwrap();
        assert!(c.secrets.catalog);
        assert_eq!(c.correlate.window, Duration::from_secs(30));
        assert_eq!(c.kubernetes.trust_domain, "cluster.local");
    }

    #[test]
    fn errors_carry_line_numbers() {
        let e = Config::parse("[secrets]\npaths = [\"/a\"]\nbogus = 1\n").unwrap_err();
        assert!(e.to_string().starts_with("3: "), "{e}");
        let e = Config::parse("[secrets]\n\npaths = [\"/ok\", \"relative/*\"]\n").unwrap_err();
        assert!(e.to_string().starts_with("3: secrets.paths"), "{e}");
        let e = Config::parse("[secrets]\npaths = [\"/a/[\"]\n").unwrap_err();
        assert!(e.to_string().contains("bad glob"), "{e}");
        let e = Config::parse("[[credential]]\npath = \"/a\"\n\n[[credential]]\npath = \"/b\"\nschedule = [\"Mon 9-5\"]\n").unwrap_err();
        assert!(e.to_string().starts_with("4: [[credential]]"), "{e}");
        let e = Config::parse("[correlate]\nwindow = \"soon\"\n").unwrap_err();
        assert!(e.to_string().starts_with("2: "), "{e}");
    }
}
