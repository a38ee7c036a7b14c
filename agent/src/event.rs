//! The enriched event: what `--events` writes as NDJSON, what `replay` reads back, what sinks
//! store. Field names follow the contract in the design brief; extend, never rename.

use std::{borrow::Cow, collections::BTreeMap, net::IpAddr, sync::Arc};

use chrono::{DateTime, SecondsFormat, Utc};
use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// A value from a small fixed vocabulary (`tcp`, `openat`, `read`, `refused`…): static when
/// the agent sets it, so the per-event path does not allocate it; owned when read back.
pub type Label = Cow<'static, str>;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EventKind {
    Exec,
    Exit,
    SecretRead,
    Connect,
    CredentialUse,
    PrivChange,
    Dns,
}

impl EventKind {
    pub const ALL: [EventKind; 7] = [
        EventKind::Exec,
        EventKind::Exit,
        EventKind::SecretRead,
        EventKind::Connect,
        EventKind::CredentialUse,
        EventKind::PrivChange,
        EventKind::Dns,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            EventKind::Exec => "exec",
            EventKind::Exit => "exit",
            EventKind::SecretRead => "secret_read",
            EventKind::Connect => "connect",
            EventKind::CredentialUse => "credential_use",
            EventKind::PrivChange => "priv_change",
            EventKind::Dns => "dns",
        }
    }
}

/// RFC 3339 with nanoseconds, UTC (`2026-11-22T14:22:18.123456789Z`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Timestamp(pub DateTime<Utc>);

impl Timestamp {
    pub fn from_unix_nanos(ns: i64) -> Self {
        Timestamp(DateTime::from_timestamp_nanos(ns))
    }
    pub fn unix_nanos(&self) -> i64 {
        self.0.timestamp_nanos_opt().unwrap_or(i64::MAX)
    }
    pub fn now() -> Self {
        Timestamp(Utc::now())
    }
}

impl Serialize for Timestamp {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.0.to_rfc3339_opts(SecondsFormat::Nanos, true))
    }
}

impl<'de> Deserialize<'de> for Timestamp {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        DateTime::parse_from_rfc3339(&s)
            .map(|t| Timestamp(t.with_timezone(&Utc)))
            .map_err(|e| serde::de::Error::custom(format!("bad RFC 3339 timestamp {s:?}: {e}")))
    }
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProcessInfo {
    pub pid: u32,
    pub tgid: u32,
    pub ppid: u32,
    pub uid: u32,
    pub euid: u32,
    #[serde(default)]
    pub gid: u32,
    #[serde(default)]
    pub egid: u32,
    /// Kernel `comm`, control characters escaped (it is attacker-chosen).
    pub comm: String,
    #[serde(default)]
    pub exe: String,
    /// Controlling terminal (`pts/3`), when the process has one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tty: Option<String>,
    /// Interactive login it descends from (`ssh (sshd pid 812)`); looked up for secret reads.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub session: Option<String>,
}

#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize,
)]
#[serde(rename_all = "snake_case")]
pub enum WorkloadKind {
    Pod,
    Container,
    Unit,
    #[default]
    Host,
}

impl WorkloadKind {
    pub fn as_str(self) -> &'static str {
        match self {
            WorkloadKind::Pod => "pod",
            WorkloadKind::Container => "container",
            WorkloadKind::Unit => "unit",
            WorkloadKind::Host => "host",
        }
    }
}

/// Who acted, derived from the cgroup (never from the process name).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Workload {
    pub kind: WorkloadKind,
    /// Stable identity: `pod:<ns>/<name>`, `container:<id>`, `unit:<name>`, `host:<uid>:<exe>`.
    pub id: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pod: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pod_uid: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service_account: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub spiffe_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub container_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub unit: Option<String>,
    /// cgroup v2 id (the cgroup directory's inode number) and its path below the cgroup2 mount.
    #[serde(default)]
    pub cgroup_id: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cgroup: Option<String>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SecretRef {
    /// Inventory path of the secret (how the agent knows it), `None` when the open matched a
    /// watched directory and the file is not yet inventoried.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<String>,
    /// The name exactly as the process passed it (relative, via symlink, `/proc/self/root`…).
    #[serde(default)]
    pub opened_as: String,
    pub dev: u64,
    pub inode: u64,
    /// `open`, `openat`, `openat2`, `creat`, `open_by_handle_at`.
    #[serde(default)]
    pub syscall: Label,
    /// `read`, `write` or `read_write`.
    #[serde(default)]
    pub access: Label,
    #[serde(default)]
    pub open_flags: i32,
    /// `file` (inode in the inventory) or `watched_dir` (new file in a watched directory).
    #[serde(default)]
    pub matched: Label,
    #[serde(default)]
    pub fd: i32,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CredentialRef {
    /// Keyed hash of the value (`hmac-sha256:<hex>`); the value itself is never kept.
    pub fingerprint: String,
    #[serde(rename = "type")]
    pub kind: String,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub owner: Option<Owner>,
}

/// The workload a secret belongs to.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Owner {
    pub kind: WorkloadKind,
    pub id: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pod: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pod_uid: Option<String>,
    /// `kubelet_volume` (derived from where the file lives) or `policy` (declared in config).
    pub source: String,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Destination {
    pub ip: IpAddr,
    pub port: u16,
    /// `tcp` or `udp` (`unknown` when the socket type could not be read).
    pub proto: Label,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExecInfo {
    pub filename: String,
    #[serde(default)]
    pub cap_effective: u64,
    #[serde(default)]
    pub truncated: bool,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PrivChange {
    /// `setuid`, `setresuid`, `capset`, … or `exec` for a set-id binary.
    pub via: String,
    pub old_uid: u32,
    pub old_euid: u32,
    pub new_uid: u32,
    pub new_euid: u32,
    #[serde(default)]
    pub old_cap_effective: u64,
    #[serde(default)]
    pub new_cap_effective: u64,
}

impl PrivChange {
    /// `before` is (uid, euid, effective caps) as the process table knew them.
    pub fn new(via: &str, before: (u32, u32, u64), uid: u32, euid: u32, caps: u64) -> Self {
        PrivChange {
            via: via.to_owned(),
            old_uid: before.0,
            old_euid: before.1,
            new_uid: uid,
            new_euid: euid,
            old_cap_effective: before.2,
            new_cap_effective: caps,
        }
    }
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DnsAnswer {
    pub name: String,
    pub addrs: Vec<IpAddr>,
    pub ttl: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub server: Option<IpAddr>,
}

/// Kept small (it is moved several times per event): the parts only some kinds carry are
/// boxed, and the parts a credential use copies from its read are shared.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Event {
    /// Unique per event on a node: `<agent run nonce>-<sequence>`; ClickHouse deduplicates on it.
    pub id: String,
    pub ts: Timestamp,
    pub node: Arc<str>,
    pub kind: EventKind,
    pub process: ProcessInfo,
    /// Shared: every event of a workload carries the same resolved identity.
    pub workload: Arc<Workload>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secret: Option<Arc<SecretRef>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub credential: Option<Arc<CredentialRef>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dst: Option<Destination>,
    /// Connect outcome: `ok`, `in_progress`, `refused`, `sent` (unconnected UDP) or the errno name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub result: Option<Label>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exec: Option<Box<ExecInfo>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exit_code: Option<i32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub priv_change: Option<Box<PrivChange>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dns: Option<Box<DnsAnswer>>,
    /// For `credential_use`: id and time of the `secret_read` it follows.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub read_event: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub read_ts: Option<Timestamp>,
}

impl Event {
    pub fn new(id: String, ts: Timestamp, node: impl Into<Arc<str>>, kind: EventKind) -> Self {
        Event {
            id,
            ts,
            node: node.into(),
            kind,
            process: ProcessInfo::default(),
            workload: Arc::default(),
            secret: None,
            credential: None,
            dst: None,
            result: None,
            exec: None,
            exit_code: None,
            priv_change: None,
            dns: None,
            read_event: None,
            read_ts: None,
        }
    }
}

/// Escapes control characters and replaces invalid UTF-8 so an attacker-chosen name
/// (comm, path) cannot forge log lines or terminal escapes downstream.
pub fn sanitize(bytes: &[u8]) -> String {
    // Nearly every name is printable ASCII: one pass over the bytes instead of decoding.
    if bytes.iter().all(|&b| (0x20..0x7f).contains(&b))
        && let Ok(s) = std::str::from_utf8(bytes)
    {
        return s.to_owned();
    }
    let s = String::from_utf8_lossy(bytes);
    if !s.chars().any(char::is_control) {
        return s.into_owned();
    }
    let mut out = String::with_capacity(s.len() + 8);
    for c in s.chars() {
        if c.is_control() {
            out.extend(c.escape_default());
        } else {
            out.push(c);
        }
    }
    out
}

/// Up to the first NUL.
pub fn cstr(bytes: &[u8]) -> &[u8] {
    let end = bytes.iter().position(|&b| b == 0).unwrap_or(bytes.len());
    &bytes[..end]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn all_kinds_are_listed_in_discriminant_order() {
        for (i, k) in EventKind::ALL.iter().enumerate() {
            assert_eq!(*k as usize, i, "{k:?}");
        }
    }

    #[test]
    fn control_characters_are_escaped() {
        assert_eq!(sanitize(b"evil\x1b[2Jname\n"), "evil\\u{1b}[2Jname\\n");
        assert_eq!(sanitize(b"plain"), "plain");
        assert_eq!(sanitize(b"del\x7f"), "del\\u{7f}");
        assert_eq!(sanitize("caf\u{e9}".as_bytes()), "caf\u{e9}");
        assert_eq!(sanitize(b"bad\xffutf8"), "bad\u{fffd}utf8");
    }

    #[test]
    fn timestamp_roundtrips_with_nanoseconds() {
        let t = Timestamp::from_unix_nanos(1_795_000_000_123_456_789);
        let s = serde_json::to_string(&t).unwrap();
        assert_eq!(s, "\"2026-11-18T11:06:40.123456789Z\"");
        let back: Timestamp = serde_json::from_str(&s).unwrap();
        assert_eq!(back, t);
    }
}
