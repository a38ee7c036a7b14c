//! RFC 5424 syslog sink over UDP, TCP or TLS (octet-counted frames, RFC 6587/5425). The
//! header is built by the `syslog` crate; MSGID is 2004 (the OCSF Detection Finding class),
//! structured data `credwatch@32473` carries the fields a SIEM routes on (rule, severity,
//! workload, fingerprint, dedup key, count) and MSG the alert JSON.

use std::{collections::BTreeMap, net::SocketAddr, sync::Arc, time::Duration};

use anyhow::{Context, Result, anyhow, bail};
use syslog::{Facility, Formatter5424, LogFormat, Severity as SysSeverity};
use tokio::{
    io::{AsyncWrite, AsyncWriteExt},
    net::{TcpStream, UdpSocket},
};
use tracing::warn;

use serde::Deserialize;

use super::{AlertFormat, Attempt, Deliver, render};
use crate::{
    alert::{Alert, Severity},
    config::{Checker, Validate, check_nonzero},
};

/// `[[alerts.syslog]]`: RFC 5424 over `udp://host:514`, `tcp://host:601` (octet counting)
/// or `tls://host:6514`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    pub address: String,
    /// CA bundle for `tls://` (default: the web PKI roots).
    pub ca_file: Option<String>,
    #[serde(default = "default_facility")]
    pub facility: String,
    #[serde(default = "default_app_name")]
    pub app_name: String,
    #[serde(default)]
    pub format: AlertFormat,
    #[serde(default = "super::default_timeout", with = "humantime_serde")]
    pub timeout: Duration,
    #[serde(default = "super::default_queue")]
    pub queue: usize,
}

fn default_facility() -> String {
    "auth".into()
}
fn default_app_name() -> String {
    "credwatch".into()
}

/// Attempts per alert: a syslog receiver that is down for 8 s (the backoff sum) is down.
const ATTEMPTS: u32 = 5;

impl Validate for Config {
    fn validate(&self, c: &mut Checker) {
        if let Err(e) = Target::parse(&self.address, &self.facility) {
            c.fail("address", format_args!("{e:#}"));
        }
        c.check(self.queue > 0, "queue", "must be at least 1");
        check_nonzero(c, "timeout", self.timeout);
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transport {
    Udp,
    Tcp,
    Tls,
}

#[derive(Debug, Clone)]
pub struct Target {
    pub transport: Transport,
    pub host: String,
    pub port: u16,
    pub facility: Facility,
}

impl Target {
    pub fn parse(address: &str, facility: &str) -> Result<Target> {
        let (scheme, rest) = address.split_once("://").ok_or_else(|| {
            anyhow!("address {address:?} must be udp://, tcp:// or tls://HOST:PORT")
        })?;
        let transport = match scheme {
            "udp" => Transport::Udp,
            "tcp" => Transport::Tcp,
            "tls" => Transport::Tls,
            _ => bail!("address {address:?}: unknown transport {scheme:?}"),
        };
        let (host, port) = rest
            .rsplit_once(':')
            .ok_or_else(|| anyhow!("address {address:?} needs a port"))?;
        let port = port
            .parse()
            .map_err(|_| anyhow!("address {address:?}: bad port"))?;
        let facility: Facility = facility
            .parse()
            .map_err(|_| anyhow!("unknown syslog facility {facility:?} (auth, daemon, local0…)"))?;
        Ok(Target {
            transport,
            host: host
                .trim_start_matches('[')
                .trim_end_matches(']')
                .to_owned(),
            port,
            facility,
        })
    }
}

fn severity(s: Severity) -> SysSeverity {
    match s {
        Severity::Critical => SysSeverity::LOG_CRIT,
        Severity::High => SysSeverity::LOG_ERR,
        Severity::Medium => SysSeverity::LOG_WARNING,
        Severity::Low => SysSeverity::LOG_NOTICE,
    }
}

type Stream = Box<dyn AsyncWrite + Unpin + Send>;

pub struct Syslog {
    cfg: Config,
    target: Target,
    formatter: Formatter5424,
    tls: Option<tokio_rustls::TlsConnector>,
    stream: Option<Stream>,
    udp: Option<UdpSocket>,
}

impl Syslog {
    pub fn new(cfg: &Config, node: &str) -> Result<Self> {
        let target = Target::parse(&cfg.address, &cfg.facility)?;
        let tls = match target.transport {
            Transport::Tls => Some(tokio_rustls::TlsConnector::from(Arc::new(
                crate::tls::client_config(cfg.ca_file.as_deref())?,
            ))),
            _ => None,
        };
        Ok(Syslog {
            formatter: Formatter5424 {
                facility: target.facility,
                hostname: Some(node.to_owned()),
                process: cfg.app_name.clone(),
                pid: std::process::id(),
            },
            cfg: cfg.clone(),
            target,
            tls,
            stream: None,
            udp: None,
        })
    }

    /// One RFC 5424 message.
    pub fn message(&self, a: &Alert) -> Vec<u8> {
        let mut params = BTreeMap::new();
        params.insert("alert".to_owned(), a.alert.as_str().to_owned());
        params.insert("severity".to_owned(), a.severity.as_str().to_owned());
        params.insert("workload".to_owned(), a.workload.id.to_string());
        if let Some(c) = &a.credential {
            params.insert("fingerprint".to_owned(), c.fingerprint.clone());
        }
        params.insert("dedup_key".to_owned(), a.dedup_key.clone());
        params.insert("count".to_owned(), a.count.to_string());
        let mut sd = BTreeMap::new();
        sd.insert("credwatch@32473".to_owned(), params);
        let msg = String::from_utf8_lossy(&render(a, self.cfg.format)).into_owned();
        let mut out = Vec::new();
        if let Err(e) = self
            .formatter
            .format(&mut out, severity(a.severity), (2004u32, sd, msg))
        {
            warn!("formatting syslog message: {e}");
        }
        out
    }

    async fn connect(&mut self) -> Result<()> {
        let addr = format!("{}:{}", self.target.host, self.target.port);
        match self.target.transport {
            Transport::Udp => {
                if self.udp.is_none() {
                    let peer: SocketAddr = tokio::net::lookup_host(&addr)
                        .await?
                        .next()
                        .ok_or_else(|| anyhow!("{addr}: no address"))?;
                    let local = if peer.is_ipv4() {
                        "0.0.0.0:0"
                    } else {
                        "[::]:0"
                    };
                    let s = UdpSocket::bind(local).await?;
                    s.connect(peer).await?;
                    self.udp = Some(s);
                }
            }
            Transport::Tcp | Transport::Tls => {
                if self.stream.is_none() {
                    let tcp = tokio::time::timeout(self.cfg.timeout, TcpStream::connect(&addr))
                        .await
                        .map_err(|_| anyhow!("{addr}: connect timed out"))??;
                    tcp.set_nodelay(true)?;
                    self.stream = Some(match &self.tls {
                        Some(tls) => {
                            let name =
                                rustls::pki_types::ServerName::try_from(self.target.host.clone())
                                    .context("TLS server name")?;
                            Box::new(
                                tokio::time::timeout(self.cfg.timeout, tls.connect(name, tcp))
                                    .await
                                    .map_err(|_| anyhow!("{addr}: TLS handshake timed out"))??,
                            )
                        }
                        None => Box::new(tcp),
                    });
                }
            }
        }
        Ok(())
    }

    async fn send(&mut self, msg: &[u8]) -> Result<()> {
        self.connect().await?;
        let timeout = self.cfg.timeout;
        if let Some(u) = &self.udp {
            u.send(msg).await?;
            return Ok(());
        }
        let s = self
            .stream
            .as_mut()
            .ok_or_else(|| anyhow!("not connected"))?;
        let mut frame = format!("{} ", msg.len()).into_bytes();
        frame.extend_from_slice(msg);
        let r = tokio::time::timeout(timeout, async {
            s.write_all(&frame).await?;
            s.flush().await
        })
        .await;
        match r {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => {
                self.stream = None;
                Err(e.into())
            }
            Err(_) => {
                self.stream = None;
                bail!("write timed out")
            }
        }
    }
}

impl Deliver for Syslog {
    fn name(&self) -> String {
        format!("syslog:{}", self.cfg.address)
    }

    fn max_attempts(&self) -> u32 {
        ATTEMPTS
    }

    fn encode(&self, a: &Alert) -> Vec<u8> {
        self.message(a)
    }

    async fn deliver(&mut self, msg: &[u8]) -> Attempt {
        match self.send(msg).await {
            Ok(()) => Attempt::Sent,
            Err(e) => Attempt::Retry(format!("{e:#}")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn targets() {
        let t = Target::parse("tcp://siem.example:601", "auth").unwrap();
        assert_eq!(
            (t.transport, t.host.as_str(), t.port),
            (Transport::Tcp, "siem.example", 601)
        );
        assert_eq!(
            Target::parse("udp://[::1]:514", "local3").unwrap().host,
            "::1"
        );
        for bad in ["siem:514", "http://siem:514", "udp://siem", "udp://siem:x"] {
            assert!(Target::parse(bad, "auth").is_err(), "{bad}");
        }
        assert!(Target::parse("udp://siem:514", "nope").is_err());
    }
}
