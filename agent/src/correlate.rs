//! Correlator: a secret read followed, in the same process and within the window, by a
//! connect becomes a `credential_use` (workload, credential, destination, time).

use std::sync::Arc;

use foldhash::{HashMap, HashMapExt};

use crate::config::{Checker, Validate, check_nonzero};
use crate::event::{Body, CredentialRef, CredentialUse, Event, SecretRef, Timestamp, duration_ns};

/// `[correlate]`.
#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// A connect this soon after a secret read by the same process is a credential use.
    #[serde(default = "default_window", with = "humantime_serde")]
    pub window: std::time::Duration,
}

fn default_window() -> std::time::Duration {
    std::time::Duration::from_secs(30)
}

impl Default for Config {
    fn default() -> Self {
        Config {
            window: default_window(),
        }
    }
}

impl Validate for Config {
    fn validate(&self, c: &mut Checker) {
        check_nonzero(c, "window", self.window);
    }
}

/// What a use needs from its read (not the whole event: cloning that per read was a
/// measurable share of the pipeline). Secret and credential are shared with the read event.
struct Read {
    event_id: String,
    ts: Timestamp,
    secret: Arc<SecretRef>,
    credential: Arc<CredentialRef>,
    /// Destinations already reported for this read: one use per (read, destination).
    reported: Vec<(Option<std::net::IpAddr>, u16)>,
}

pub struct Correlator {
    window_ns: i64,
    reads: HashMap<u32, Vec<Read>>,
    max_reads_per_process: usize,
    max_processes: usize,
}

impl Correlator {
    pub fn new(window: std::time::Duration) -> Self {
        Correlator {
            window_ns: duration_ns(window),
            reads: HashMap::new(),
            max_reads_per_process: 16,
            max_processes: 65536,
        }
    }

    /// Feeds one event; returns the credential uses it completes. `next_id` names them.
    pub fn observe(&mut self, ev: &Event, mut next_id: impl FnMut() -> String) -> Vec<Event> {
        let tgid = ev.process.tgid;
        match &ev.body {
            Body::SecretRead(read) => {
                if self.reads.len() >= self.max_processes && !self.reads.contains_key(&tgid) {
                    self.expire(ev.ts.unix_nanos());
                    if self.reads.len() >= self.max_processes {
                        return Vec::new();
                    }
                }
                let list = self.reads.entry(tgid).or_default();
                let fp = &read.credential.fingerprint;
                // A re-read of the same credential restarts its window.
                list.retain(|r| &r.credential.fingerprint != fp);
                if list.len() >= self.max_reads_per_process {
                    list.remove(0);
                }
                list.push(Read {
                    event_id: ev.id.clone(),
                    ts: ev.ts,
                    secret: read.secret.clone(),
                    credential: read.credential.clone(),
                    reported: Vec::new(),
                });
                Vec::new()
            }
            Body::Connect(c) => {
                let dst = &c.dst;
                // Name lookups are not uses of the credential.
                if dst.port == 53 {
                    return Vec::new();
                }
                let Some(list) = self.reads.get_mut(&tgid) else {
                    return Vec::new();
                };
                let now = ev.ts.unix_nanos();
                list.retain(|r| now.saturating_sub(r.ts.unix_nanos()) <= self.window_ns);
                let mut out = Vec::new();
                for r in list.iter_mut() {
                    let key = (dst.ip, dst.port);
                    if r.reported.contains(&key) {
                        continue;
                    }
                    r.reported.push(key);
                    out.push(Event {
                        id: next_id(),
                        ts: ev.ts,
                        node: ev.node.clone(),
                        process: ev.process.clone(),
                        workload: ev.workload.clone(),
                        body: Body::CredentialUse(Box::new(CredentialUse {
                            secret: Some(r.secret.clone()),
                            credential: Arc::clone(&r.credential),
                            dst: dst.clone(),
                            result: c.result.clone(),
                            read_event: r.event_id.clone(),
                            read_ts: r.ts,
                        })),
                    });
                }
                out
            }
            Body::Exit { .. } => {
                self.reads.remove(&tgid);
                Vec::new()
            }
            _ => Vec::new(),
        }
    }

    fn expire(&mut self, now: i64) {
        let w = self.window_ns;
        self.reads.retain(|_, l| {
            l.retain(|r| now.saturating_sub(r.ts.unix_nanos()) <= w);
            !l.is_empty()
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::{Connect, CredentialType, Destination, EventKind, SecretRead};

    fn ev(body: Body, tgid: u32, ts_ms: i64) -> Event {
        let mut e = Event::new(
            format!("e{ts_ms}"),
            Timestamp::from_unix_nanos(ts_ms * 1_000_000),
            "n",
            body,
        );
        e.process.tgid = tgid;
        e
    }

    fn read(tgid: u32, ts_ms: i64, fp: &str) -> Event {
        let credential = CredentialRef {
            fingerprint: fp.into(),
            kind: CredentialType::K8sSaToken,
            ..Default::default()
        };
        let body = Body::SecretRead(SecretRead {
            secret: Default::default(),
            credential: credential.into(),
        });
        ev(body, tgid, ts_ms)
    }

    fn connect(tgid: u32, ts_ms: i64, port: u16) -> Event {
        let dst = Destination::inet("10.0.0.1".parse().unwrap(), port, "tcp");
        let body = Body::Connect(Connect {
            dst,
            result: "ok".into(),
            via: "connect".into(),
        });
        ev(body, tgid, ts_ms)
    }

    #[test]
    fn read_then_connect_within_window_is_one_use() {
        let mut c = Correlator::new(std::time::Duration::from_secs(30));
        let mut n = 0;
        let mut id = || {
            n += 1;
            format!("u{n}")
        };
        assert!(c.observe(&read(7, 0, "fp1"), &mut id).is_empty());
        let uses = c.observe(&connect(7, 40, 443), &mut id);
        assert_eq!(uses.len(), 1);
        assert_eq!(uses[0].kind(), EventKind::CredentialUse);
        let Body::CredentialUse(u) = &uses[0].body else {
            unreachable!()
        };
        assert_eq!(u.credential.fingerprint, "fp1");
        assert_eq!(u.read_event, "e0");
        // Same destination again: not a second use of the same read.
        assert!(c.observe(&connect(7, 50, 443), &mut id).is_empty());
        // Another destination is.
        assert_eq!(c.observe(&connect(7, 60, 8443), &mut id).len(), 1);
    }

    #[test]
    fn near_misses() {
        let mut c = Correlator::new(std::time::Duration::from_secs(1));
        let mut id = || "u".to_owned();
        c.observe(&read(7, 0, "fp1"), &mut id);
        assert!(
            c.observe(&connect(8, 10, 443), &mut id).is_empty(),
            "other process"
        );
        assert!(c.observe(&connect(7, 20, 53), &mut id).is_empty(), "dns");
        assert!(
            c.observe(&connect(7, 2_000, 443), &mut id).is_empty(),
            "outside window"
        );
        c.observe(&read(9, 0, "fp1"), &mut id);
        c.observe(&ev(Body::Exit { code: 0 }, 9, 5), &mut id);
        assert!(
            c.observe(&connect(9, 10, 443), &mut id).is_empty(),
            "pid reuse after exit"
        );
    }
}
