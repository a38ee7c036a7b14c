//! Webhook sink: each alert POSTed as JSON, retried with exponential backoff on network
//! errors, 5xx and 429 (a 4xx other than 429 will not get better: dropped at once), with an
//! optional `X-Credwatch-Signature: sha256=<hex>` HMAC of the body so receivers can
//! authenticate it.

use std::time::Duration;

use anyhow::{Context, Result};
use serde::Deserialize;

use super::{AlertFormat, Attempt, Deliver, render};
use crate::{
    alert::Alert,
    config::{Checker, Validate, check_http_url, check_nonzero},
    credential::Secret,
};

/// `[[alerts.webhook]]`: an HTTP POST of each alert as a JSON body.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Kept whole only for sending: chat webhooks carry their secret in the path.
    pub url: Secret,
    #[serde(default)]
    pub format: AlertFormat,
    /// Key for an `X-Credwatch-Signature: sha256=<hex HMAC of the body>` header.
    pub secret_file: Option<String>,
    /// Extra headers (`Authorization = "Bearer …"` belongs in a file, not here).
    #[serde(default)]
    pub headers: std::collections::BTreeMap<String, Secret>,
    #[serde(default = "super::default_timeout", with = "humantime_serde")]
    pub timeout: Duration,
    /// Attempts per alert before it is dropped (and counted).
    #[serde(default = "default_attempts")]
    pub max_attempts: u32,
    /// Alerts waiting for this sink; beyond it new ones are dropped (and counted).
    #[serde(default = "super::default_queue")]
    pub queue: usize,
}

fn default_attempts() -> u32 {
    5
}

impl Validate for Config {
    fn validate(&self, c: &mut Checker) {
        check_http_url(c, "url", &redact(self.url.expose()));
        c.check(
            url::Url::parse(self.url.expose()).is_ok(),
            "url",
            format_args!("is not a URL ({})", redact(self.url.expose())),
        );
        c.check(self.max_attempts > 0, "max_attempts", "must be at least 1");
        c.check(self.queue > 0, "queue", "must be at least 1");
        check_nonzero(c, "timeout", self.timeout);
    }
}

pub struct Webhook {
    cfg: Config,
    client: reqwest::Client,
    key: Option<Vec<u8>>,
}

/// What logs, metric labels and the stats file may say about a webhook URL: scheme, host
/// and port, plus a short digest of the whole URL so two hooks on one host stay apart.
/// Never the path or query: Slack, Teams and Discord put the secret there.
pub fn redact(url: &str) -> String {
    match url::Url::parse(url) {
        Ok(u) => {
            let digest = crate::credential::hmac_sha256_hex(b"credwatch-sink-name", url.as_bytes());
            format!(
                "{}://{}{}#{}",
                u.scheme(),
                u.host_str().unwrap_or(""),
                u.port().map(|p| format!(":{p}")).unwrap_or_default(),
                &digest[..8]
            )
        }
        Err(_) => "invalid-url".into(),
    }
}

pub fn signature(key: &[u8], body: &[u8]) -> String {
    format!("sha256={}", crate::credential::hmac_sha256_hex(key, body))
}

impl Webhook {
    pub fn new(cfg: &Config) -> Result<Self> {
        let key = cfg
            .secret_file
            .as_ref()
            .map(|f| {
                std::fs::read(f)
                    .with_context(|| format!("reading alerts.webhook.secret_file {f}"))
                    .map(|k| k.trim_ascii_end().to_vec())
            })
            .transpose()?;
        let client = reqwest::Client::builder()
            .timeout(cfg.timeout)
            .connect_timeout(cfg.timeout)
            .build()
            .context("webhook HTTP client")?;
        Ok(Webhook {
            cfg: cfg.clone(),
            client,
            key,
        })
    }
}

impl Deliver for Webhook {
    fn name(&self) -> String {
        format!("webhook:{}", redact(self.cfg.url.expose()))
    }

    fn max_attempts(&self) -> u32 {
        self.cfg.max_attempts
    }

    fn encode(&self, a: &Alert) -> Vec<u8> {
        render(a, self.cfg.format)
    }

    async fn deliver(&mut self, body: &[u8]) -> Attempt {
        let mut req = self
            .client
            .post(self.cfg.url.expose())
            .header("content-type", "application/json")
            .body(body.to_vec());
        for (k, v) in &self.cfg.headers {
            req = req.header(k, v.expose());
        }
        if let Some(k) = &self.key {
            req = req.header("x-credwatch-signature", signature(k, body));
        }
        match req.send().await {
            Ok(r) if r.status().is_success() => Attempt::Sent,
            Ok(r) if r.status().is_server_error() || r.status().as_u16() == 429 => {
                Attempt::Retry(format!("HTTP {}", r.status()))
            }
            Ok(r) => Attempt::Give(format!("HTTP {}", r.status())),
            // Without the URL: reqwest's error text would carry it.
            Err(e) => Attempt::Retry(e.without_url().to_string()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signature_and_redaction() {
        // RFC 4231 test case 2.
        assert_eq!(
            signature(b"Jefe", b"what do ya want for nothing?"),
            "sha256=5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
        );
        let secret_path = "https://hooks.slack.test/services/T000/B000/FAKEFAKEFAKE";
        let r = redact(secret_path);
        assert!(r.starts_with("https://hooks.slack.test#"), "{r}");
        assert!(!r.contains("FAKE") && !r.contains("services"), "{r}");
        assert_ne!(r, redact("https://hooks.slack.test/services/other"));
        let r = redact("https://user:pw@hooks.example:8443/soc/in?token=abc");
        assert!(r.starts_with("https://hooks.example:8443#"), "{r}");
        assert!(!r.contains("pw") && !r.contains("abc"), "{r}");
    }
}
