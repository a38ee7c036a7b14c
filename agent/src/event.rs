//! The enriched event: what `--events` writes as NDJSON, what `replay` reads back, what sinks
//! store. Field names follow the contract in the design brief; extend, never rename.
//!
//! In memory an event is its common part (who, where, when) and a typed [`Body`] per kind,
//! so a `secret_read` always has its secret and credential and a `connect` its destination.
//! On the wire it is one flat JSON object with `kind` as the tag; [`wire`] converts, checking
//! that a recorded line carries what its kind needs.

use std::{borrow::Cow, collections::BTreeMap, fmt, net::IpAddr, sync::Arc};

use chrono::{DateTime, SecondsFormat, Utc};
use serde::{Deserialize, Deserializer, Serialize, Serializer};

pub use crate::credential::CredentialType;

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
    ProcessAccess,
    MetadataFetch,
}

impl EventKind {
    pub const ALL: [EventKind; 9] = [
        EventKind::Exec,
        EventKind::Exit,
        EventKind::SecretRead,
        EventKind::Connect,
        EventKind::CredentialUse,
        EventKind::PrivChange,
        EventKind::Dns,
        EventKind::ProcessAccess,
        EventKind::MetadataFetch,
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
            EventKind::ProcessAccess => "process_access",
            EventKind::MetadataFetch => "metadata_fetch",
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
        let t = DateTime::parse_from_rfc3339(&s)
            .map(|t| t.with_timezone(&Utc))
            .map_err(|e| serde::de::Error::custom(format!("bad RFC 3339 timestamp {s:?}: {e}")))?;
        // Every clock in the agent (and ClickHouse's DateTime64(9)) counts i64 nanoseconds:
        // 1677 to 2262. Outside that a time could not be compared, stored or written back.
        if t.timestamp_nanos_opt().is_none() {
            return Err(serde::de::Error::custom(format!(
                "timestamp {s:?} is outside 1677..2262"
            )));
        }
        Ok(Timestamp(t))
    }
}

/// A duration as nanoseconds for timestamp arithmetic, saturating at `i64::MAX` (a config
/// of "100 years" must not wrap into the past).
pub fn duration_ns(d: std::time::Duration) -> i64 {
    d.as_nanos().min(i64::MAX as u128) as i64
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

    /// The inverse of [`Self::as_str`]; anything else is a host.
    pub fn parse(s: &str) -> WorkloadKind {
        match s {
            "pod" => WorkloadKind::Pod,
            "container" => WorkloadKind::Container,
            "unit" => WorkloadKind::Unit,
            _ => WorkloadKind::Host,
        }
    }
}

/// A workload's stable identity as text: `pod:<ns>/<name>` (`pod:uid/<uid>` until the pod
/// list names it), `container:<id>`, `unit:<name>`, `host:<uid>:<exe>`. Policy selectors and
/// baselines match on it, so it is only ever built by these constructors.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(transparent)]
pub struct WorkloadId(String);

impl WorkloadId {
    pub fn pod(namespace: &str, name: &str) -> Self {
        WorkloadId(format!("pod:{namespace}/{name}"))
    }
    /// A pod the kubelet's list does not name (yet).
    pub fn pod_uid(uid: &str) -> Self {
        WorkloadId(format!("pod:uid/{uid}"))
    }
    pub fn container(id: &str) -> Self {
        WorkloadId(format!("container:{id}"))
    }
    pub fn unit(name: &str) -> Self {
        WorkloadId(format!("unit:{name}"))
    }
    pub fn host(uid: u32, exe: &str) -> Self {
        WorkloadId(format!("host:{uid}:{exe}"))
    }
    /// The host as a whole (a DNS answer received outside any workload's cgroup).
    pub fn whole_host() -> Self {
        WorkloadId("host".into())
    }
    /// An owner named in policy: the selector as the operator wrote it.
    pub fn declared(selector: &str) -> Self {
        WorkloadId(selector.to_owned())
    }
    /// An id an agent stored (ClickHouse rows read back).
    pub fn recorded(id: impl Into<String>) -> Self {
        WorkloadId(id.into())
    }
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl std::ops::Deref for WorkloadId {
    type Target = str;
    fn deref(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for WorkloadId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl PartialEq<str> for WorkloadId {
    fn eq(&self, other: &str) -> bool {
        self.0 == other
    }
}

impl PartialEq<&str> for WorkloadId {
    fn eq(&self, other: &&str) -> bool {
        self.0 == *other
    }
}

/// Who acted, derived from the cgroup (never from the process name).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Workload {
    pub kind: WorkloadKind,
    pub id: WorkloadId,
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
    /// Set when `opened_as` is not the whole name: `truncated` (longer than the probe's
    /// buffer) or `unreadable` (the process's memory could not be read).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub opened_as_status: Option<Label>,
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
    /// Further opens of this secret by this process since its previous `secret_read`, folded
    /// into this one (the probes send at most one record per process and secret per repeat
    /// interval and count the rest exactly).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub repeats: u64,
    /// `ia32` when a 32-bit syscall opened it; absent for native calls.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub abi: Option<Label>,
}

fn is_zero(n: &u64) -> bool {
    *n == 0
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CredentialRef {
    /// Keyed hash of the value (`hmac-sha256:<hex>`); the value itself is never kept.
    pub fingerprint: String,
    #[serde(rename = "type")]
    pub kind: CredentialType,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub owner: Option<Owner>,
}

/// How the agent knows a credential's owner.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OwnerSource {
    /// The file lives in that pod's kubelet volume.
    #[default]
    KubeletVolume,
    /// Declared in `[[credential]] owner`.
    Policy,
}

impl OwnerSource {
    pub fn as_str(self) -> &'static str {
        match self {
            OwnerSource::KubeletVolume => "kubelet_volume",
            OwnerSource::Policy => "policy",
        }
    }

    pub fn parse(s: &str) -> Option<OwnerSource> {
        match s {
            "kubelet_volume" => Some(OwnerSource::KubeletVolume),
            "policy" => Some(OwnerSource::Policy),
            _ => None,
        }
    }
}

impl fmt::Display for OwnerSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The workload a secret belongs to.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Owner {
    pub kind: WorkloadKind,
    pub id: WorkloadId,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pod: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pod_uid: Option<String>,
    pub source: OwnerSource,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Destination {
    /// Absent for a Unix-domain socket (see `path`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ip: Option<IpAddr>,
    pub port: u16,
    /// `tcp`, `udp` or `unix` (`unknown` when the socket type could not be read).
    pub proto: Label,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// The socket file of a Unix-domain destination (`/run/docker.sock`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<String>,
    /// A cloud metadata service address (169.254.169.254, fd00:ec2::254, …).
    #[serde(default, skip_serializing_if = "is_false")]
    pub metadata: bool,
}

impl Destination {
    /// Address and port of an internet destination.
    pub fn socket_addr(&self) -> Option<std::net::SocketAddr> {
        self.ip.map(|ip| std::net::SocketAddr::new(ip, self.port))
    }

    /// An internet destination.
    pub fn inet(ip: IpAddr, port: u16, proto: impl Into<Label>) -> Self {
        Destination {
            ip: Some(ip),
            port,
            proto: proto.into(),
            name: None,
            path: None,
            metadata: false,
        }
    }

    /// A Unix-domain socket file.
    pub fn unix(path: String, proto: impl Into<Label>) -> Self {
        Destination {
            ip: None,
            port: 0,
            proto: proto.into(),
            name: None,
            path: Some(path),
            metadata: false,
        }
    }
}

impl fmt::Display for Destination {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match (&self.ip, &self.path) {
            (Some(IpAddr::V6(a)), _) => write!(f, "[{a}]:{}/{}", self.port, self.proto),
            (Some(a), _) => write!(f, "{a}:{}/{}", self.port, self.proto),
            (None, Some(p)) => write!(f, "unix:{p}"),
            (None, None) => f.write_str("unknown"),
        }
    }
}

/// A credential a process was handed at exec, in its environment or on its command line.
/// Only its fingerprint and non-secret labels are kept.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExposedCredential {
    /// `env` or `argv`.
    pub source: Label,
    /// The variable (`AWS_SECRET_ACCESS_KEY`) or option (`--password`) that carried it.
    pub name: String,
    #[serde(rename = "type")]
    pub kind: CredentialType,
    pub fingerprint: String,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
}

fn is_false(b: &bool) -> bool {
    !*b
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExecInfo {
    pub filename: String,
    #[serde(default)]
    pub cap_effective: u64,
    #[serde(default)]
    pub truncated: bool,
    /// The command line, credentials on it replaced by `<fingerprint>`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub argv: Vec<String>,
    /// Credentials in the environment.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub env_credentials: Vec<ExposedCredential>,
    /// Credentials on the command line (shown in `argv` by their fingerprint).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub argv_credentials: Vec<ExposedCredential>,
    /// The environment or command line was longer than the probe carries (credentials past
    /// the cut are not seen).
    #[serde(default, skip_serializing_if = "is_false")]
    pub env_truncated: bool,
    /// `ia32` for a 32-bit image on x86-64; absent for native code.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub abi: Option<Label>,
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

    /// Gained uid 0 or capabilities it did not have: what a privilege baseline learns.
    pub fn is_gain(&self) -> bool {
        (self.new_euid == 0 && self.old_euid != 0)
            || self.new_cap_effective & !self.old_cap_effective != 0
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

/// A secret read: which file and which credential it holds (both shared with the inventory
/// and with the uses that follow).
#[derive(Clone, Debug, PartialEq)]
pub struct SecretRead {
    pub secret: Arc<SecretRef>,
    pub credential: Arc<CredentialRef>,
}

/// A connection attempt and how it went.
#[derive(Clone, Debug, PartialEq)]
pub struct Connect {
    pub dst: Destination,
    /// `ok`, `in_progress`, `refused`, `sent` (unconnected UDP), `unknown` or the errno name.
    pub result: Label,
    /// How it was made: `connect`, `sendmsg`, `fastopen`, `io_uring`, `other`.
    pub via: Label,
}

/// One process reading another's environment or memory, or attaching to it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ProcessAccess {
    /// `environ`, `mem`, `process_vm_readv`, `ptrace_attach`, `ptrace_seize`.
    pub access: Label,
    pub target: TargetProcess,
}

/// The process read from, as the agent knew it at the time.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TargetProcess {
    pub pid: u32,
    #[serde(default)]
    pub comm: String,
    #[serde(default)]
    pub exe: String,
    pub workload: Arc<Workload>,
}

/// A request to a cloud metadata service: its first line, bounded, and what it asks for.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct MetadataFetch {
    pub dst: Destination,
    /// `GET`, `PUT`…; empty when the bytes were not an HTTP request line.
    pub method: String,
    pub path: String,
    /// `aws`, `gcp`, `azure`, `alibaba`, `openstack` when the path says; else `unknown`.
    pub provider: Label,
    /// The path fetches credentials (role credentials, a token, the IMDSv2 session token).
    pub credentials: bool,
    /// The role or service account named in the path, when there is one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub role: Option<String>,
}

/// A holder of a credential connecting somewhere: the unit the SOC cares about.
#[derive(Clone, Debug, PartialEq)]
pub struct CredentialUse {
    /// The file it came from, when it came from one.
    pub secret: Option<Arc<SecretRef>>,
    pub credential: Arc<CredentialRef>,
    pub dst: Destination,
    pub result: Label,
    /// Id and time of the event that made the process a holder.
    pub read_event: String,
    pub read_ts: Timestamp,
}

/// What an event says, by kind.
#[derive(Clone, Debug, PartialEq)]
pub enum Body {
    Exec(Box<ExecInfo>),
    /// `code`: the exit code, or 128 + the signal that killed it (as a shell reports it).
    Exit {
        code: i32,
    },
    SecretRead(SecretRead),
    Connect(Connect),
    CredentialUse(Box<CredentialUse>),
    PrivChange(Box<PrivChange>),
    Dns(Box<DnsAnswer>),
    ProcessAccess(Box<ProcessAccess>),
    MetadataFetch(Box<MetadataFetch>),
}

impl Body {
    pub fn kind(&self) -> EventKind {
        match self {
            Body::Exec(_) => EventKind::Exec,
            Body::Exit { .. } => EventKind::Exit,
            Body::SecretRead(_) => EventKind::SecretRead,
            Body::Connect(_) => EventKind::Connect,
            Body::CredentialUse(_) => EventKind::CredentialUse,
            Body::PrivChange(_) => EventKind::PrivChange,
            Body::Dns(_) => EventKind::Dns,
            Body::ProcessAccess(_) => EventKind::ProcessAccess,
            Body::MetadataFetch(_) => EventKind::MetadataFetch,
        }
    }
}

/// Kept small (it is moved several times per event): the parts only some kinds carry are
/// boxed, and the parts a credential use copies from its read are shared.
#[derive(Clone, Debug, PartialEq)]
pub struct Event {
    /// Unique per event on a node: `<agent run nonce>-<sequence>`; ClickHouse deduplicates on it.
    pub id: String,
    pub ts: Timestamp,
    pub node: Arc<str>,
    pub process: ProcessInfo,
    /// Shared: every event of a workload carries the same resolved identity.
    pub workload: Arc<Workload>,
    pub body: Body,
}

impl Event {
    pub fn new(id: String, ts: Timestamp, node: impl Into<Arc<str>>, body: Body) -> Self {
        Event {
            id,
            ts,
            node: node.into(),
            process: ProcessInfo::default(),
            workload: Arc::default(),
            body,
        }
    }

    pub fn kind(&self) -> EventKind {
        self.body.kind()
    }

    /// The credential a read or use is about.
    pub fn credential(&self) -> Option<&Arc<CredentialRef>> {
        match &self.body {
            Body::SecretRead(r) => Some(&r.credential),
            Body::CredentialUse(u) => Some(&u.credential),
            _ => None,
        }
    }

    /// The secret file a read or use is about.
    pub fn secret(&self) -> Option<&Arc<SecretRef>> {
        match &self.body {
            Body::SecretRead(r) => Some(&r.secret),
            Body::CredentialUse(u) => u.secret.as_ref(),
            _ => None,
        }
    }

    /// Inventory path of the secret a read or use is about (what policy globs match).
    pub fn secret_path(&self) -> Option<&str> {
        self.secret().and_then(|s| s.path.as_deref())
    }

    /// Where a connect, use or metadata request went.
    pub fn dst(&self) -> Option<&Destination> {
        match &self.body {
            Body::Connect(c) => Some(&c.dst),
            Body::CredentialUse(u) => Some(&u.dst),
            Body::MetadataFetch(m) => Some(&m.dst),
            _ => None,
        }
    }

    pub fn priv_change(&self) -> Option<&PrivChange> {
        match &self.body {
            Body::PrivChange(p) => Some(p),
            _ => None,
        }
    }
}

impl Serialize for Event {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        wire::Out::from(self).serialize(s)
    }
}

impl<'de> Deserialize<'de> for Event {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        wire::In::deserialize(d)?
            .into_event()
            .map_err(serde::de::Error::custom)
    }
}

/// The flat JSON form: one object, `kind` as the tag, the parts of every kind as optional
/// keys in a fixed order (what the NDJSON contract and the recorded fixtures hold).
mod wire {
    use super::*;

    #[derive(Serialize)]
    pub struct Out<'a> {
        id: &'a str,
        ts: Timestamp,
        node: &'a str,
        kind: EventKind,
        process: &'a ProcessInfo,
        workload: &'a Workload,
        #[serde(skip_serializing_if = "Option::is_none")]
        secret: Option<&'a SecretRef>,
        #[serde(skip_serializing_if = "Option::is_none")]
        credential: Option<&'a CredentialRef>,
        #[serde(skip_serializing_if = "Option::is_none")]
        dst: Option<&'a Destination>,
        #[serde(skip_serializing_if = "Option::is_none")]
        result: Option<&'a str>,
        #[serde(skip_serializing_if = "Option::is_none")]
        via: Option<&'a str>,
        #[serde(skip_serializing_if = "Option::is_none")]
        exec: Option<&'a ExecInfo>,
        #[serde(skip_serializing_if = "Option::is_none")]
        exit_code: Option<i32>,
        #[serde(skip_serializing_if = "Option::is_none")]
        priv_change: Option<&'a PrivChange>,
        #[serde(skip_serializing_if = "Option::is_none")]
        dns: Option<&'a DnsAnswer>,
        #[serde(skip_serializing_if = "Option::is_none")]
        access: Option<&'a ProcessAccess>,
        #[serde(skip_serializing_if = "Option::is_none")]
        metadata: Option<&'a MetadataFetch>,
        #[serde(skip_serializing_if = "Option::is_none")]
        read_event: Option<&'a str>,
        #[serde(skip_serializing_if = "Option::is_none")]
        read_ts: Option<Timestamp>,
    }

    impl<'a> From<&'a Event> for Out<'a> {
        fn from(e: &'a Event) -> Self {
            let mut o = Out {
                id: &e.id,
                ts: e.ts,
                node: &e.node,
                kind: e.kind(),
                process: &e.process,
                workload: &e.workload,
                secret: None,
                credential: None,
                dst: None,
                result: None,
                via: None,
                exec: None,
                exit_code: None,
                priv_change: None,
                dns: None,
                access: None,
                metadata: None,
                read_event: None,
                read_ts: None,
            };
            match &e.body {
                Body::Exec(x) => o.exec = Some(x),
                Body::Exit { code } => o.exit_code = Some(*code),
                Body::SecretRead(r) => {
                    o.secret = Some(&r.secret);
                    o.credential = Some(&r.credential);
                }
                Body::Connect(c) => {
                    o.dst = Some(&c.dst);
                    o.result = Some(&c.result);
                    o.via = Some(&c.via);
                }
                Body::CredentialUse(u) => {
                    o.secret = u.secret.as_deref();
                    o.credential = Some(&u.credential);
                    o.dst = Some(&u.dst);
                    o.result = Some(&u.result);
                    o.read_event = Some(&u.read_event);
                    o.read_ts = Some(u.read_ts);
                }
                Body::PrivChange(p) => o.priv_change = Some(p),
                Body::Dns(d) => o.dns = Some(d),
                Body::ProcessAccess(a) => o.access = Some(a),
                Body::MetadataFetch(m) => o.metadata = Some(m),
            }
            o
        }
    }

    #[derive(Deserialize)]
    pub struct In {
        id: String,
        ts: Timestamp,
        node: String,
        kind: EventKind,
        process: ProcessInfo,
        workload: Arc<Workload>,
        #[serde(default)]
        secret: Option<Arc<SecretRef>>,
        #[serde(default)]
        credential: Option<Arc<CredentialRef>>,
        #[serde(default)]
        dst: Option<Destination>,
        #[serde(default)]
        result: Option<Label>,
        #[serde(default)]
        via: Option<Label>,
        #[serde(default)]
        exec: Option<Box<ExecInfo>>,
        #[serde(default)]
        exit_code: Option<i32>,
        #[serde(default)]
        priv_change: Option<Box<PrivChange>>,
        #[serde(default)]
        dns: Option<Box<DnsAnswer>>,
        #[serde(default)]
        access: Option<Box<ProcessAccess>>,
        #[serde(default)]
        metadata: Option<Box<MetadataFetch>>,
        #[serde(default)]
        read_event: Option<String>,
        #[serde(default)]
        read_ts: Option<Timestamp>,
    }

    fn need<T>(v: Option<T>, kind: EventKind, key: &str) -> Result<T, String> {
        v.ok_or_else(|| format!("a {} event needs `{key}`", kind.as_str()))
    }

    impl In {
        pub fn into_event(self) -> Result<Event, String> {
            let k = self.kind;
            let body = match k {
                EventKind::Exec => Body::Exec(need(self.exec, k, "exec")?),
                EventKind::Exit => Body::Exit {
                    code: need(self.exit_code, k, "exit_code")?,
                },
                EventKind::SecretRead => Body::SecretRead(SecretRead {
                    secret: need(self.secret, k, "secret")?,
                    credential: need(self.credential, k, "credential")?,
                }),
                EventKind::Connect => Body::Connect(Connect {
                    dst: need(self.dst, k, "dst")?,
                    result: need(self.result, k, "result")?,
                    // Recorded before connects said how: connect(2) was the only path seen.
                    via: self.via.unwrap_or(Cow::Borrowed("connect")),
                }),
                EventKind::CredentialUse => Body::CredentialUse(Box::new(CredentialUse {
                    secret: self.secret,
                    credential: need(self.credential, k, "credential")?,
                    dst: need(self.dst, k, "dst")?,
                    result: need(self.result, k, "result")?,
                    read_event: need(self.read_event, k, "read_event")?,
                    read_ts: need(self.read_ts, k, "read_ts")?,
                })),
                EventKind::PrivChange => {
                    Body::PrivChange(need(self.priv_change, k, "priv_change")?)
                }
                EventKind::Dns => Body::Dns(need(self.dns, k, "dns")?),
                EventKind::ProcessAccess => Body::ProcessAccess(need(self.access, k, "access")?),
                EventKind::MetadataFetch => {
                    Body::MetadataFetch(need(self.metadata, k, "metadata")?)
                }
            };
            Ok(Event {
                id: self.id,
                ts: self.ts,
                node: self.node.into(),
                process: self.process,
                workload: self.workload,
                body,
            })
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
