//! Webhook sink: each alert POSTed as JSON, retried with exponential backoff on network
//! errors, 5xx and 429 (a 4xx other than 429 will not get better: dropped at once), with an
//! optional `X-Credwatch-Signature: sha256=<hex>` HMAC of the body so receivers can
//! authenticate it.

use std::{sync::Arc, sync::atomic::Ordering::Relaxed, time::Duration};

use anyhow::{Context, Result};
use hmac::{Hmac, Mac};
use sha2::Sha256;
use tokio::sync::mpsc;
use tracing::warn;

use super::{Counters, Shutdown, backoff, past_deadline, render};
use crate::{alert::Alert, config::WebhookSink};

pub struct Webhook {
    cfg: WebhookSink,
    client: reqwest::Client,
    key: Option<Vec<u8>>,
}

/// The URL without credentials or query (may hold tokens), for logs and metric labels.
pub fn redact(url: &str) -> String {
    match url::Url::parse(url) {
        Ok(u) => {
            format!(
                "{}://{}{}",
                u.scheme(),
                u.host_str().unwrap_or(""),
                u.port().map(|p| format!(":{p}")).unwrap_or_default()
            ) + u.path()
        }
        Err(_) => "invalid-url".into(),
    }
}

pub fn signature(key: &[u8], body: &[u8]) -> String {
    let mut mac = Hmac::<Sha256>::new_from_slice(key).expect("HMAC takes any key length");
    mac.update(body);
    format!("sha256={}", hex::encode(mac.finalize().into_bytes()))
}

enum Outcome {
    Sent,
    Retry(String),
    Give(String),
}

impl Webhook {
    pub fn new(cfg: &WebhookSink) -> Result<Self> {
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

    async fn post(&self, body: &[u8]) -> Outcome {
        let mut req = self
            .client
            .post(&self.cfg.url)
            .header("content-type", "application/json")
            .body(body.to_vec());
        for (k, v) in &self.cfg.headers {
            req = req.header(k, v);
        }
        if let Some(k) = &self.key {
            req = req.header("x-credwatch-signature", signature(k, body));
        }
        match req.send().await {
            Ok(r) if r.status().is_success() => Outcome::Sent,
            Ok(r) if r.status().is_server_error() || r.status().as_u16() == 429 => {
                Outcome::Retry(format!("HTTP {}", r.status()))
            }
            Ok(r) => Outcome::Give(format!("HTTP {}", r.status())),
            Err(e) => Outcome::Retry(e.without_url().to_string()),
        }
    }

    pub async fn run(
        self,
        mut rx: mpsc::Receiver<Arc<Alert>>,
        c: Arc<Counters>,
        mut shutdown: Shutdown,
    ) {
        let name = redact(&self.cfg.url);
        let mut failing = false;
        while let Some(a) = rx.recv().await {
            c.queued.fetch_sub(1, Relaxed);
            let body = render(&a, self.cfg.format);
            let mut wait = Duration::from_millis(250);
            let mut attempt = 0;
            loop {
                if past_deadline(&shutdown) {
                    c.dropped.fetch_add(1, Relaxed);
                    break;
                }
                attempt += 1;
                match self.post(&body).await {
                    Outcome::Sent => {
                        c.sent.fetch_add(1, Relaxed);
                        failing = false;
                        break;
                    }
                    Outcome::Retry(why) | Outcome::Give(why)
                        if attempt >= self.cfg.max_attempts =>
                    {
                        c.failed.fetch_add(1, Relaxed);
                        c.dropped.fetch_add(1, Relaxed);
                        warn!(webhook = %name, "alert dropped after {attempt} attempts: {why}");
                        break;
                    }
                    Outcome::Give(why) => {
                        c.failed.fetch_add(1, Relaxed);
                        c.dropped.fetch_add(1, Relaxed);
                        warn!(webhook = %name, "alert rejected: {why}");
                        break;
                    }
                    Outcome::Retry(why) => {
                        c.failed.fetch_add(1, Relaxed);
                        if !failing {
                            warn!(webhook = %name, "delivery failing, retrying: {why}");
                            failing = true;
                        }
                        backoff(wait, &mut shutdown).await;
                        wait = (wait * 2).min(Duration::from_secs(30));
                    }
                }
            }
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
        assert_eq!(
            redact("https://user:pw@hooks.example:8443/soc/in?token=abc"),
            "https://hooks.example:8443/soc/in"
        );
    }
}
