//! Holders: which process has which credential, and which of its connects are uses.
//!
//! A process becomes a holder when it reads a secret, is given a credential in its
//! environment or on its command line at exec, fetches one from the cloud metadata
//! service, or is forked from a holder. It holds it until it exits (or execs: only what the
//! new image was given survives). Every connect by a holder is a candidate use; the
//! attribution says why it counts, and each (holder, credential, destination) is reported
//! once per `use_window`. Reads by node agents maintaining pod volumes are marked as
//! maintenance and make no holder.
//!
//! Time comes from event timestamps only, so a replay attributes the same uses.

use std::{net::IpAddr, sync::Arc, time::Duration};

use foldhash::{HashMap, HashMapExt};
use globset::{Glob, GlobMatcher};

use crate::{
    config::{Checker, Validate, check_nonzero},
    event::{
        Attribution, Body, CredentialRef, CredentialUse, Destination, Event, ExposedCredential,
        HeldCredential, SecretRef, Timestamp, Workload, duration_ns,
    },
    policy::Selector,
};

/// `[holders]`.
#[derive(Debug, Clone, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// A connect this soon after the holder read the credential is `read_then_connect`
    /// (later ones are `held`).
    #[serde(default = "default_window", with = "humantime_serde")]
    pub window: Duration,
    /// A read on a connection the holder opened this shortly before is
    /// `connected_then_read`.
    #[serde(default = "default_window", with = "humantime_serde")]
    pub connected_window: Duration,
    /// A sibling's read this shortly before a connect makes it a `script` use.
    #[serde(default = "default_script_window", with = "humantime_serde")]
    pub script_window: Duration,
    /// One use per (holder, credential, destination) per this window.
    #[serde(default = "default_use_window", with = "humantime_serde")]
    pub use_window: Duration,
    /// DNS resolvers: port-53 connects to these are name lookups, not uses. `run` adds the
    /// node's /etc/resolv.conf, and a server seen answering a query counts from then on
    /// (set the cluster DNS service address here so a pod's first lookup is known too);
    /// any other port 53 is a destination like the rest (DNS tunnels, TCP/53 exfiltration).
    #[serde(default)]
    pub resolvers: Vec<IpAddr>,
}

fn default_window() -> Duration {
    Duration::from_secs(30)
}
fn default_script_window() -> Duration {
    Duration::from_secs(10)
}
fn default_use_window() -> Duration {
    Duration::from_secs(3600)
}

impl Default for Config {
    fn default() -> Self {
        Config {
            window: default_window(),
            connected_window: default_window(),
            script_window: default_script_window(),
            use_window: default_use_window(),
            resolvers: Vec::new(),
        }
    }
}

impl Validate for Config {
    fn validate(&self, c: &mut Checker) {
        check_nonzero(c, "window", self.window);
        check_nonzero(c, "connected_window", self.connected_window);
        check_nonzero(c, "script_window", self.script_window);
        check_nonzero(c, "use_window", self.use_window);
    }
}

/// `[[node_agent]]`: software that maintains pod volumes (kubelet, container runtime, CSI
/// drivers). Both the workload and the executable must match: a process named `kubelet`
/// elsewhere gets no pass.
#[derive(Debug, Clone, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NodeAgentConfig {
    /// Workload selector (`unit:kubelet.service`, `pod:kube-system/csi-*`).
    pub workload: String,
    /// Executable paths (globs).
    pub exe: Vec<String>,
}

/// What runs the node's pods when nothing else is configured.
pub fn default_node_agents() -> Vec<NodeAgentConfig> {
    let agent = |unit: &str, exes: &[&str]| NodeAgentConfig {
        workload: format!("unit:{unit}"),
        exe: exes.iter().map(|s| s.to_string()).collect(),
    };
    vec![
        agent(
            "kubelet.service",
            &[
                "/usr/bin/kubelet",
                "/usr/local/bin/kubelet",
                "/opt/bin/kubelet",
            ],
        ),
        agent(
            "containerd.service",
            &["/usr/bin/containerd", "/usr/local/bin/containerd"],
        ),
        agent("crio.service", &["/usr/bin/crio", "/usr/local/bin/crio"]),
        agent("k3s.service", &["/usr/local/bin/k3s"]),
        agent("k3s-agent.service", &["/usr/local/bin/k3s"]),
    ]
}

impl Validate for NodeAgentConfig {
    fn validate(&self, c: &mut Checker) {
        if let Err(e) = Selector::parse(&self.workload) {
            c.fail("workload", format_args!("{e:#}"));
        }
        c.check(!self.exe.is_empty(), "exe", "name at least one executable");
        for g in &self.exe {
            if let Err(e) = Glob::new(g) {
                c.fail("exe", format_args!("bad glob {g:?}: {e}"));
            }
        }
    }
}

struct NodeAgent {
    workload: Selector,
    exe: Vec<GlobMatcher>,
}

/// The compiled `[[node_agent]]` list and where pod volumes live.
pub struct NodeAgents {
    agents: Vec<NodeAgent>,
    pod_volumes: String,
}

impl NodeAgents {
    /// Entries were validated with the config.
    pub fn new(cfg: &[NodeAgentConfig], kubelet_root: &str) -> Self {
        let agents = cfg
            .iter()
            .filter_map(|a| {
                Some(NodeAgent {
                    workload: Selector::parse(&a.workload).ok()?,
                    exe: a
                        .exe
                        .iter()
                        .filter_map(|g| Glob::new(g).ok().map(|g| g.compile_matcher()))
                        .collect(),
                })
            })
            .collect();
        NodeAgents {
            agents,
            pod_volumes: format!("{}/pods/", kubelet_root.trim_end_matches('/')),
        }
    }

    pub fn is_node_agent(&self, w: &Workload, exe: &str) -> bool {
        self.agents
            .iter()
            .any(|a| a.workload.matches(w) && a.exe.iter().any(|g| g.is_match(exe)))
    }

    /// A node agent reading a file of a pod's volume.
    fn maintains(&self, ev: &Event, secret: &SecretRef) -> bool {
        secret
            .path
            .as_deref()
            .is_some_and(|p| p.starts_with(&self.pod_volumes))
            && self.is_node_agent(&ev.workload, &ev.process.exe)
    }
}

/// How a holder came to hold a credential.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Acquired {
    /// It read the secret (or fetched it from the metadata service).
    Read,
    /// Its environment or command line at exec.
    Exec,
    /// Its parent held it when this process was first seen (forked from it).
    Inherited { parent: u32 },
    /// A child it started read it.
    Helper { child: u32 },
    /// A shell's child read it and the shell exec'd the program it was handed to (the
    /// last command of `sh -c 'T=$(cat token); curl … $T'` runs in the shell's process).
    Script { from: u32 },
}

#[derive(Clone)]
struct Held {
    credential: Arc<CredentialRef>,
    secret: Option<Arc<SecretRef>>,
    acquired: Acquired,
    since: Timestamp,
    /// The event that made it held.
    event: Arc<str>,
}

#[derive(Default)]
struct Holder {
    ppid: u32,
    /// Who it is, from its own events (unknown for a process that predates the agent and
    /// has done nothing since): helper and script attributions need to know the parent is
    /// the same workload.
    info: Option<(crate::event::ProcessInfo, Arc<Workload>)>,
    held: Vec<Held>,
    /// Its latest connects, for a read that follows them.
    recent: Vec<(Timestamp, Destination)>,
    /// (credential identity, destination) → when a use was last reported.
    reported: HashMap<u64, i64>,
    /// Set once the process exited: kept a short while for children seen after it.
    exited: Option<i64>,
}

/// Bounds: everything a workload can make grow.
const MAX_HOLDERS: usize = 65_536;
const MAX_HELD: usize = 32;
const MAX_RECENT: usize = 16;
const MAX_REPORTED: usize = 1024;
const MAX_RESOLVERS: usize = 256;

#[derive(Debug, Default, Clone, serde::Serialize)]
pub struct HolderStats {
    pub holders: usize,
    pub uses: u64,
    /// Repeat uses folded into the one already reported in the use window.
    pub repeat_uses: u64,
    pub maintenance_reads: u64,
    /// Holders dropped to stay within bounds (oldest exited first).
    pub evicted: u64,
}

pub struct Holders {
    window_ns: i64,
    connected_ns: i64,
    script_ns: i64,
    use_ns: i64,
    resolvers: Vec<IpAddr>,
    node_agents: NodeAgents,
    procs: HashMap<u32, Holder>,
    /// Event time of the last sweep of exited holders.
    last_sweep: i64,
    stats: HolderStats,
}

impl Holders {
    pub fn new(cfg: &Config, node_agents: NodeAgents) -> Self {
        Holders {
            window_ns: duration_ns(cfg.window),
            connected_ns: duration_ns(cfg.connected_window),
            script_ns: duration_ns(cfg.script_window),
            use_ns: duration_ns(cfg.use_window),
            resolvers: cfg.resolvers.clone(),
            node_agents,
            procs: HashMap::new(),
            last_sweep: 0,
            stats: HolderStats::default(),
        }
    }

    /// Feeds one event: annotates it (maintenance reads, what a process-memory target
    /// holds) and appends the credential uses it completes. `next_id` names them.
    pub fn stats(&self) -> HolderStats {
        HolderStats {
            holders: self.procs.len(),
            ..self.stats.clone()
        }
    }

    pub fn observe(
        &mut self,
        ev: &mut Event,
        mut next_id: impl FnMut() -> String,
        out: &mut Vec<Event>,
    ) {
        let tgid = ev.process.tgid;
        let now = ev.ts.unix_nanos();
        let maintenance =
            matches!(&ev.body, Body::SecretRead(r) if self.node_agents.maintains(ev, &r.secret));
        match &mut ev.body {
            Body::Exec(x) => {
                let exposed: Vec<&ExposedCredential> = x
                    .env_credentials
                    .iter()
                    .chain(&x.argv_credentials)
                    .collect();
                let h = self.holder(tgid, ev.process.ppid, now, false);
                // A new image: what was read is gone with the old memory; what it was
                // given survives. Given something it held (a value read, then passed on
                // the command line or in the environment), it keeps that credential and
                // the secret it came from.
                let before = std::mem::take(&mut h.held);
                h.recent.clear();
                h.info = Some((ev.process.clone(), ev.workload.clone()));
                for c in exposed {
                    if let Some(prev) = before
                        .iter()
                        .find(|p| p.credential.fingerprint == c.fingerprint)
                    {
                        let acquired = match prev.acquired {
                            Acquired::Helper { child } | Acquired::Script { from: child } => {
                                Acquired::Script { from: child }
                            }
                            _ => Acquired::Exec,
                        };
                        hold(
                            h,
                            prev.credential.clone(),
                            prev.secret.clone(),
                            acquired,
                            ev.ts,
                            &ev.id,
                        );
                        continue;
                    }
                    let credential = Arc::new(CredentialRef {
                        fingerprint: c.fingerprint.clone(),
                        kind: c.kind.clone(),
                        labels: c.labels.clone(),
                        owner: None,
                        // The workload's identity, so a replica or a restart is the same
                        // credential.
                        identity: format!(
                            "{}:{}|{}",
                            c.source,
                            crate::baseline::subject_of(&ev.workload),
                            c.name
                        ),
                    });
                    hold(h, credential, None, Acquired::Exec, ev.ts, &ev.id);
                }
            }
            Body::SecretRead(r) => {
                if maintenance {
                    r.maintenance = true;
                    self.stats.maintenance_reads += 1;
                    return;
                }
                let (credential, secret) = (r.credential.clone(), r.secret.clone());
                self.acquire(ev, credential, Some(secret), &mut next_id, out);
            }
            Body::MetadataFetch(m) => {
                if let Some(c) = m.credential.clone() {
                    self.acquire(ev, c, None, &mut next_id, out);
                }
            }
            Body::Connect(c) => {
                if c.dst.port == 53 && c.dst.ip.is_some_and(|ip| self.resolvers.contains(&ip)) {
                    return;
                }
                let dst = c.dst.clone();
                let result = c.result.clone();
                self.connect(ev, dst, result, &mut next_id, out);
            }
            Body::Dns(d) => {
                // A server the kernel saw answer a query is a resolver.
                if let Some(s) = d.server
                    && !self.resolvers.contains(&s)
                    && self.resolvers.len() < MAX_RESOLVERS
                {
                    self.resolvers.push(s);
                }
            }
            Body::ProcessAccess(a) => {
                if let Some(t) = self.procs.get(&a.target.pid) {
                    a.target.credentials = t
                        .held
                        .iter()
                        .map(|h| HeldCredential {
                            fingerprint: h.credential.fingerprint.clone(),
                            kind: h.credential.kind.clone(),
                            identity: h.credential.identity.clone(),
                        })
                        .collect();
                }
            }
            Body::Exit { .. } => {
                if let Some(h) = self.procs.get_mut(&tgid) {
                    h.exited = Some(now);
                }
                // A sweep per grace period, not per exit (that was most of this stage's
                // time with many short processes).
                if now.saturating_sub(self.last_sweep) >= self.window_ns.max(self.script_ns) {
                    self.last_sweep = now;
                    self.expire(now);
                }
            }
            _ => {}
        }
    }

    /// The process (created on first sight, inheriting what its parent holds: it was
    /// forked from it) — unless it is new because it just exec'd (`inherit` false).
    fn holder(&mut self, tgid: u32, ppid: u32, now: i64, inherit: bool) -> &mut Holder {
        // An event after the exit is a new process that got the pid again.
        if self.procs.get(&tgid).is_some_and(|h| h.exited.is_some()) {
            self.procs.remove(&tgid);
        }
        if !self.procs.contains_key(&tgid) {
            if self.procs.len() >= MAX_HOLDERS {
                self.expire(now);
                self.evict();
            }
            let inherited: Vec<Held> = if inherit {
                self.procs
                    .get(&ppid)
                    .map(|p| {
                        p.held
                            .iter()
                            .filter(|h| h.acquired != Acquired::Helper { child: tgid })
                            .map(|h| Held {
                                acquired: Acquired::Inherited { parent: ppid },
                                ..h.clone()
                            })
                            .collect()
                    })
                    .unwrap_or_default()
            } else {
                Vec::new()
            };
            self.procs.insert(
                tgid,
                Holder {
                    ppid,
                    held: inherited,
                    ..Default::default()
                },
            );
        }
        let h = self.procs.get_mut(&tgid).expect("just inserted");
        if ppid != 0 {
            h.ppid = ppid;
        }
        h
    }

    /// `ev`'s process now holds `credential`; its parent holds it through a helper; a
    /// connection it already has to somewhere is a use (`connected_then_read`).
    fn acquire(
        &mut self,
        ev: &Event,
        credential: Arc<CredentialRef>,
        secret: Option<Arc<SecretRef>>,
        next_id: &mut impl FnMut() -> String,
        out: &mut Vec<Event>,
    ) {
        let (tgid, ppid, now) = (ev.process.tgid, ev.process.ppid, ev.ts.unix_nanos());
        let use_ns = self.use_ns;
        let connected_ns = self.connected_ns;
        let mut count = UseCount::default();
        let h = self.holder(tgid, ppid, now, true);
        learn(h, ev);
        hold(
            h,
            credential.clone(),
            secret.clone(),
            Acquired::Read,
            ev.ts,
            &ev.id,
        );
        let new = Held {
            credential: credential.clone(),
            secret: secret.clone(),
            acquired: Acquired::Read,
            since: ev.ts,
            event: ev.id.as_str().into(),
        };
        let recent: Vec<Destination> = h
            .recent
            .iter()
            .filter(|(t, _)| now.saturating_sub(t.unix_nanos()) <= connected_ns)
            .map(|(_, d)| d.clone())
            .collect();
        for dst in recent {
            if first_use(&mut h.reported, &credential, &dst, now, use_ns, &mut count) {
                out.push(use_event(
                    ev,
                    next_id(),
                    &new,
                    dst,
                    "ok".into(),
                    Attribution::ConnectedThenRead,
                    None,
                ));
            }
        }
        self.stats.add(std::mem::take(&mut count));
        // The parent, and through a shell its parent (git runs its helper with `sh -c`).
        let mut child = tgid;
        let mut parent_pid = ppid;
        for _ in 0..2 {
            let Some(next) = self.helper_parent(ev, &new, child, parent_pid, next_id, out) else {
                break;
            };
            child = parent_pid;
            parent_pid = next;
        }
        self.stats.add(count);
    }

    /// `parent` of `child` (same workload, known) now holds what `child` read, and the
    /// connection it has open is a use. Returns the parent's own parent when the parent is
    /// a shell (the helper's caller is one up).
    fn helper_parent(
        &mut self,
        ev: &Event,
        new: &Held,
        child: u32,
        parent: u32,
        next_id: &mut impl FnMut() -> String,
        out: &mut Vec<Event>,
    ) -> Option<u32> {
        if parent == 0 || parent == child {
            return None;
        }
        let (now, use_ns, connected_ns) = (ev.ts.unix_nanos(), self.use_ns, self.connected_ns);
        let p = self.procs.get_mut(&parent)?;
        let (pinfo, pworkload) = p
            .info
            .as_ref()
            .filter(|(i, w)| same_workload(i, w, ev))
            .cloned()?;
        hold(
            p,
            new.credential.clone(),
            new.secret.clone(),
            Acquired::Helper {
                child: ev.process.tgid,
            },
            ev.ts,
            &ev.id,
        );
        // The parent's connection that asked for it (git asks its helper after a 401).
        let recent: Vec<Destination> = p
            .recent
            .iter()
            .filter(|(t, _)| now.saturating_sub(t.unix_nanos()) <= connected_ns)
            .map(|(_, d)| d.clone())
            .collect();
        let mut count = UseCount::default();
        for dst in recent {
            if first_use(
                &mut p.reported,
                &new.credential,
                &dst,
                now,
                use_ns,
                &mut count,
            ) {
                let mut e = use_event(
                    ev,
                    next_id(),
                    new,
                    dst,
                    "ok".into(),
                    Attribution::Helper,
                    Some(ev.process.tgid),
                );
                e.process = pinfo.clone();
                e.workload = pworkload.clone();
                out.push(e);
            }
        }
        let up = p.ppid;
        self.stats.add(count);
        is_shell(&pinfo.exe).then_some(up)
    }

    fn connect(
        &mut self,
        ev: &Event,
        dst: Destination,
        result: crate::event::Label,
        next_id: &mut impl FnMut() -> String,
        out: &mut Vec<Event>,
    ) {
        let (tgid, ppid, now) = (ev.process.tgid, ev.process.ppid, ev.ts.unix_nanos());
        let (window_ns, script_ns, use_ns) = (self.window_ns, self.script_ns, self.use_ns);
        let mut count = UseCount::default();
        // A sibling's fresh read, handed to the parent: a script's `$(cat token)`. Only
        // under a shell of the same workload.
        let script: Vec<Held> = self
            .procs
            .get(&ppid)
            .filter(|p| {
                p.info
                    .as_ref()
                    .is_some_and(|(i, w)| same_workload(i, w, ev) && is_shell(&i.exe))
            })
            .map(|p| {
                p.held
                    .iter()
                    .filter(|h| {
                        matches!(h.acquired, Acquired::Helper { child } if child != tgid)
                            && now.saturating_sub(h.since.unix_nanos()) <= script_ns
                    })
                    .cloned()
                    .collect()
            })
            .unwrap_or_default();
        let h = self.holder(tgid, ppid, now, true);
        learn(h, ev);
        if h.recent.len() >= MAX_RECENT {
            h.recent.remove(0);
        }
        h.recent.push((ev.ts, dst.clone()));
        if h.held.is_empty() && script.is_empty() {
            return;
        }
        let Holder { held, reported, .. } = h;
        let mut candidates: Vec<(&Held, Attribution, Option<u32>)> = held
            .iter()
            .map(|held| {
                let (attr, via) = match held.acquired {
                    Acquired::Read if now.saturating_sub(held.since.unix_nanos()) <= window_ns => {
                        (Attribution::ReadThenConnect, None)
                    }
                    Acquired::Read => (Attribution::Held, None),
                    Acquired::Exec => (Attribution::Exec, None),
                    Acquired::Inherited { parent } => (Attribution::Inherited, Some(parent)),
                    Acquired::Helper { child } => (Attribution::Helper, Some(child)),
                    Acquired::Script { from } => (Attribution::Script, Some(from)),
                };
                (held, attr, via)
            })
            .collect();
        for s in &script {
            if candidates
                .iter()
                .all(|(c, ..)| c.credential.identity() != s.credential.identity())
            {
                let via = match s.acquired {
                    Acquired::Helper { child } => Some(child),
                    _ => None,
                };
                candidates.push((s, Attribution::Script, via));
            }
        }
        // One value held two ways (a token read by a sibling and handed over on the
        // command line) is one use: the one that knows the secret it came from.
        candidates.sort_by_key(|(c, ..)| c.secret.is_none());
        let mut seen: Vec<&str> = Vec::with_capacity(candidates.len());
        for (held, attr, via) in candidates {
            let fp = held.credential.fingerprint.as_str();
            if seen.contains(&fp) {
                continue;
            }
            seen.push(fp);
            if first_use(reported, &held.credential, &dst, now, use_ns, &mut count) {
                out.push(use_event(
                    ev,
                    next_id(),
                    held,
                    dst.clone(),
                    result.clone(),
                    attr,
                    via,
                ));
            }
        }
        self.stats.add(count);
    }

    /// Drops the exited whose children had their chance to be seen.
    fn expire(&mut self, now: i64) {
        let grace = self.script_ns.max(self.window_ns);
        self.procs
            .retain(|_, h| h.exited.is_none_or(|t| now.saturating_sub(t) <= grace));
    }

    /// Over the bound: exited holders first, then the ones holding nothing.
    fn evict(&mut self) {
        let before = self.procs.len();
        self.procs.retain(|_, h| h.exited.is_none());
        if self.procs.len() >= MAX_HOLDERS {
            self.procs.retain(|_, h| !h.held.is_empty());
        }
        if self.procs.len() >= MAX_HOLDERS {
            // Still full of holders: forget an arbitrary tenth rather than grow.
            let drop: Vec<u32> = self.procs.keys().take(MAX_HOLDERS / 10).copied().collect();
            for k in drop {
                self.procs.remove(&k);
            }
        }
        self.stats.evicted += (before - self.procs.len()) as u64;
    }
}

/// Remembers who a holder is from its first event.
fn learn(h: &mut Holder, ev: &Event) {
    if h.info.is_none() {
        h.info = Some((ev.process.clone(), ev.workload.clone()));
    }
}

/// Whether a parent (as last seen) is the same workload as `ev`'s process. Host processes
/// are a workload per executable; between parent and child the user is what matters.
fn same_workload(parent: &crate::event::ProcessInfo, w: &Workload, ev: &Event) -> bool {
    use crate::event::WorkloadKind::Host;
    if w.kind == Host && ev.workload.kind == Host {
        parent.uid == ev.process.uid
    } else {
        w.id == ev.workload.id
    }
}

/// Shells that run scripts (whose children's reads feed their siblings).
fn is_shell(exe: &str) -> bool {
    let name = exe.rsplit('/').next().unwrap_or(exe);
    matches!(
        name,
        "sh" | "bash" | "dash" | "zsh" | "ksh" | "mksh" | "ash" | "busybox" | "fish"
    )
}

fn hold(
    h: &mut Holder,
    credential: Arc<CredentialRef>,
    secret: Option<Arc<SecretRef>>,
    acquired: Acquired,
    ts: Timestamp,
    event: &str,
) {
    // One entry per credential: a re-read (or a rotation: same identity, new value)
    // replaces it and restarts its clock.
    h.held
        .retain(|x| x.credential.identity() != credential.identity());
    if h.held.len() >= MAX_HELD {
        h.held.remove(0);
    }
    h.held.push(Held {
        credential,
        secret,
        acquired,
        since: ts,
        event: event.into(),
    });
}

/// True when (credential, destination) was not reported by this holder within the use
/// window; records it.
fn first_use(
    reported: &mut HashMap<u64, i64>,
    credential: &CredentialRef,
    dst: &Destination,
    now: i64,
    use_ns: i64,
    count: &mut UseCount,
) -> bool {
    use std::hash::{BuildHasher, Hasher};
    let mut hs = foldhash::fast::FixedState::with_seed(0x5eed).build_hasher();
    hs.write(credential.identity().as_bytes());
    hs.write(credential.fingerprint.as_bytes());
    std::hash::Hash::hash(&dst.ip, &mut hs);
    hs.write_u16(dst.port);
    std::hash::Hash::hash(&dst.path, &mut hs);
    let key = hs.finish();
    if let Some(t) = reported.get(&key)
        && now.saturating_sub(*t) <= use_ns
    {
        count.repeats += 1;
        return false;
    }
    if reported.len() >= MAX_REPORTED {
        reported.retain(|_, t| now.saturating_sub(*t) <= use_ns);
        if reported.len() >= MAX_REPORTED {
            // A holder talking to more destinations than this in one window: its uses
            // still come, each destination reported again rather than remembered.
            reported.clear();
        }
    }
    reported.insert(key, now);
    count.uses += 1;
    true
}

/// Uses and folded repeats of one event, added to the stats once the holder is let go.
#[derive(Default)]
struct UseCount {
    uses: u64,
    repeats: u64,
}

impl HolderStats {
    fn add(&mut self, c: UseCount) {
        self.uses += c.uses;
        self.repeat_uses += c.repeats;
    }
}

fn use_event(
    ev: &Event,
    id: String,
    held: &Held,
    dst: Destination,
    result: crate::event::Label,
    attribution: Attribution,
    via_pid: Option<u32>,
) -> Event {
    Event {
        id,
        ts: ev.ts,
        node: ev.node.clone(),
        process: ev.process.clone(),
        workload: ev.workload.clone(),
        body: Body::CredentialUse(Box::new(CredentialUse {
            secret: held.secret.clone(),
            credential: held.credential.clone(),
            dst,
            result,
            read_event: held.event.to_string(),
            read_ts: held.since,
            attribution,
            via_pid,
        })),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        credential::CredentialType,
        detect::testutil::pod,
        event::{
            Connect, ExecInfo, ProcessAccess, SecretRead, TargetProcess, WorkloadId, WorkloadKind,
        },
    };

    const S: i64 = 1_000_000_000;

    struct World {
        h: Holders,
        n: u32,
        uses: Vec<Event>,
    }

    fn world() -> World {
        let cfg = Config {
            resolvers: vec!["10.96.0.10".parse().unwrap()],
            ..Config::default()
        };
        let agents = vec![NodeAgentConfig {
            workload: "unit:kubelet.service".into(),
            exe: vec!["/usr/bin/kubelet".into()],
        }];
        World {
            h: Holders::new(&cfg, NodeAgents::new(&agents, "/var/lib/kubelet")),
            n: 0,
            uses: Vec::new(),
        }
    }

    fn ev(tgid: u32, ppid: u32, exe: &str, ts_s: i64, body: Body) -> Event {
        let mut e = Event::new(
            String::new(),
            Timestamp::from_unix_nanos(ts_s * S),
            "n",
            body,
        );
        e.process.tgid = tgid;
        e.process.pid = tgid;
        e.process.ppid = ppid;
        e.process.exe = exe.into();
        e.workload = Arc::new(pod("payments", "api", "ua"));
        e
    }

    fn cred(fp: &str, identity: &str) -> Arc<CredentialRef> {
        Arc::new(CredentialRef {
            fingerprint: fp.into(),
            kind: CredentialType::K8sSaToken,
            identity: identity.into(),
            ..Default::default()
        })
    }

    fn read(path: &str, fp: &str) -> Body {
        Body::SecretRead(SecretRead {
            secret: Arc::new(SecretRef {
                path: Some(path.into()),
                ..Default::default()
            }),
            credential: cred(fp, &format!("file:{path}")),
            maintenance: false,
        })
    }

    fn connect(ip: &str, port: u16) -> Body {
        Body::Connect(Connect {
            dst: Destination::inet(ip.parse().unwrap(), port, "tcp"),
            result: "ok".into(),
            via: "connect".into(),
        })
    }

    fn exec(env: &[(&str, &str)]) -> Body {
        Body::Exec(Box::new(ExecInfo {
            filename: "/x".into(),
            cap_effective: 0,
            truncated: false,
            argv: Vec::new(),
            env_credentials: env
                .iter()
                .map(|(name, fp)| ExposedCredential {
                    source: "env".into(),
                    name: (*name).into(),
                    kind: CredentialType::AwsAccessKey,
                    fingerprint: (*fp).into(),
                    labels: Default::default(),
                })
                .collect(),
            argv_credentials: Vec::new(),
            env_truncated: false,
            abi: None,
        }))
    }

    impl World {
        fn feed(&mut self, mut e: Event) -> Event {
            self.n += 1;
            e.id = format!("e{}", self.n);
            let mut uses = Vec::new();
            let mut k = 0;
            self.h.observe(
                &mut e,
                || {
                    k += 1;
                    format!("u{k}")
                },
                &mut uses,
            );
            self.uses.extend(uses);
            e
        }

        /// (pid, attribution, fingerprint, port, via) of the uses so far; cleared.
        fn take(&mut self) -> Vec<(u32, Attribution, String, u16, Option<u32>)> {
            self.uses
                .drain(..)
                .map(|e| match e.body {
                    Body::CredentialUse(u) => (
                        e.process.tgid,
                        u.attribution,
                        u.credential.fingerprint.clone(),
                        u.dst.port,
                        u.via_pid,
                    ),
                    _ => unreachable!(),
                })
                .collect()
        }
    }

    use Attribution::*;

    #[test]
    fn read_then_connect_then_held_once_per_destination() {
        let mut w = world();
        w.feed(ev(10, 1, "/app/api", 0, read("/t", "fpA")));
        w.feed(ev(10, 1, "/app/api", 1, connect("10.0.0.1", 443)));
        assert_eq!(w.take(), [(10, ReadThenConnect, "fpA".into(), 443, None)]);
        // The same destination again within the use window: not another use.
        for i in 0..50 {
            w.feed(ev(10, 1, "/app/api", 2 + i, connect("10.0.0.1", 443)));
        }
        assert!(w.take().is_empty());
        // 50 other destinations, each once, long after the read: held.
        for i in 0..50u16 {
            w.feed(ev(10, 1, "/app/api", 100, connect("10.0.0.2", 1000 + i)));
            w.feed(ev(10, 1, "/app/api", 101, connect("10.0.0.2", 1000 + i)));
        }
        let uses = w.take();
        assert_eq!(uses.len(), 50);
        assert!(uses.iter().all(|u| u.1 == Held));
        assert_eq!(w.h.stats().uses, 51);
    }

    #[test]
    fn a_read_on_an_open_connection_is_connected_then_read() {
        let mut w = world();
        w.feed(ev(10, 1, "/usr/bin/ssh", 0, connect("10.0.0.9", 22)));
        w.feed(ev(
            10,
            1,
            "/usr/bin/ssh",
            1,
            read("/root/.ssh/id_ed25519", "fpK"),
        ));
        assert_eq!(w.take(), [(10, ConnectedThenRead, "fpK".into(), 22, None)]);
        // Long after: no longer the connection the read was for.
        w.feed(ev(11, 1, "/usr/bin/ssh", 0, connect("10.0.0.9", 22)));
        w.feed(ev(
            11,
            1,
            "/usr/bin/ssh",
            60,
            read("/root/.ssh/id_ed25519", "fpK"),
        ));
        assert!(w.take().is_empty());
    }

    #[test]
    fn forked_workers_inherit_an_exec_keeps_only_what_it_was_given() {
        let mut w = world();
        w.feed(ev(10, 1, "/usr/sbin/nginx", 0, read("/etc/tls/key", "fpT")));
        // A worker forked after the read, first seen when it connects.
        w.feed(ev(11, 10, "/usr/sbin/nginx", 5, connect("10.0.0.3", 443)));
        assert_eq!(w.take(), [(11, Inherited, "fpT".into(), 443, Some(10))]);
        // The worker execs another program with a credential in its environment.
        w.feed(ev(
            11,
            10,
            "/app/job",
            6,
            exec(&[("AWS_SECRET_ACCESS_KEY", "fpE")]),
        ));
        w.feed(ev(11, 10, "/app/job", 7, connect("52.1.1.1", 443)));
        assert_eq!(w.take(), [(11, Exec, "fpE".into(), 443, None)]);
    }

    #[test]
    fn a_helpers_read_is_its_parents_and_a_scripts_siblings() {
        let mut w = world();
        // git-remote-http connects, asks its helper child, which reads.
        w.feed(ev(20, 1, "/usr/lib/git-core/git-remote-http", 0, exec(&[])));
        w.feed(ev(
            20,
            1,
            "/usr/lib/git-core/git-remote-http",
            1,
            connect("10.0.0.5", 443),
        ));
        w.feed(ev(
            21,
            20,
            "/usr/lib/git-core/git",
            2,
            read("/root/.git-credentials", "fpG"),
        ));
        assert_eq!(w.take(), [(20, Helper, "fpG".into(), 443, Some(21))]);
        w.feed(ev(
            20,
            1,
            "/usr/lib/git-core/git-remote-http",
            3,
            connect("10.0.0.6", 443),
        ));
        assert_eq!(w.take(), [(20, Helper, "fpG".into(), 443, Some(21))]);

        // T=$(cat token); curl …: the shell's children.
        w.feed(ev(30, 1, "/usr/bin/bash", 10, exec(&[])));
        w.feed(ev(31, 30, "/usr/bin/cat", 11, read("/run/token", "fpS")));
        w.feed(ev(32, 30, "/usr/bin/curl", 12, exec(&[])));
        w.feed(ev(32, 30, "/usr/bin/curl", 12, connect("10.0.0.7", 443)));
        assert_eq!(w.take(), [(32, Script, "fpS".into(), 443, Some(31))]);
        // The shell execs the command it handed the value to (bash runs the last command
        // of `-c` in its own process): the file's credential, through the script.
        w.feed(ev(34, 1, "/usr/bin/bash", 20, exec(&[])));
        w.feed(ev(35, 34, "/usr/bin/cat", 21, read("/run/token", "fpS")));
        let mut e = ev(34, 1, "/usr/bin/curl", 22, exec(&[]));
        if let Body::Exec(x) = &mut e.body {
            x.argv_credentials.push(ExposedCredential {
                source: "argv".into(),
                name: "authorization".into(),
                kind: CredentialType::GenericSecret,
                fingerprint: "fpS".into(),
                labels: Default::default(),
            });
        }
        w.feed(e);
        w.feed(ev(34, 1, "/usr/bin/curl", 22, connect("10.0.0.8", 443)));
        let uses = w.take();
        assert_eq!(uses, [(34, Script, "fpS".into(), 443, Some(35))]);
        // Too late for the script window.
        w.feed(ev(33, 30, "/usr/bin/curl", 40, exec(&[])));
        w.feed(ev(33, 30, "/usr/bin/curl", 40, connect("10.0.0.7", 443)));
        assert!(w.take().is_empty());
    }

    #[test]
    fn no_helper_or_script_across_workloads_or_under_a_non_shell() {
        let mut w = world();
        // pid 1 (another workload) is no helper of a service's read.
        let mut init = ev(1, 0, "/usr/lib/systemd/systemd", 0, connect("10.0.0.1", 80));
        init.workload = Arc::new(Workload {
            kind: WorkloadKind::Unit,
            id: WorkloadId::unit("init.scope"),
            ..Default::default()
        });
        w.feed(init.clone());
        w.feed(ev(
            40,
            1,
            "/usr/bin/backup",
            1,
            read("/etc/backup/key", "fpB"),
        ));
        w.feed(Event {
            ts: Timestamp::from_unix_nanos(2 * S),
            ..init
        });
        assert!(w.take().is_empty());
        // Siblings under a non-shell parent.
        w.feed(ev(50, 1, "/usr/bin/python3", 10, exec(&[])));
        w.feed(ev(51, 50, "/usr/bin/cat", 11, read("/run/token", "fpS")));
        w.feed(ev(52, 50, "/usr/bin/curl", 12, exec(&[])));
        w.feed(ev(52, 50, "/usr/bin/curl", 12, connect("10.0.0.7", 443)));
        assert!(w.take().is_empty());
    }

    #[test]
    fn only_configured_or_answering_resolvers_are_dns() {
        let mut w = world();
        w.feed(ev(10, 1, "/app/api", 0, read("/t", "fpA")));
        w.feed(ev(10, 1, "/app/api", 1, connect("10.96.0.10", 53)));
        assert!(w.take().is_empty(), "the configured resolver");
        w.feed(ev(10, 1, "/app/api", 2, connect("203.0.113.9", 53)));
        assert_eq!(w.take(), [(10, ReadThenConnect, "fpA".into(), 53, None)]);
    }

    #[test]
    fn node_agents_maintaining_pod_volumes_hold_nothing() {
        let mut w = world();
        let path =
            "/var/lib/kubelet/pods/ua/volumes/kubernetes.io~projected/kube-api-access-1/token";
        let kubelet = Arc::new(Workload {
            kind: WorkloadKind::Unit,
            id: WorkloadId::unit("kubelet.service"),
            unit: Some("kubelet.service".into()),
            ..Default::default()
        });
        let mut e = ev(60, 1, "/usr/bin/kubelet", 0, read(path, "fpK"));
        e.workload = kubelet.clone();
        let e = w.feed(e);
        assert!(e.is_maintenance());
        let mut c = ev(60, 1, "/usr/bin/kubelet", 1, connect("10.0.0.1", 6443));
        c.workload = kubelet;
        w.feed(c);
        assert!(w.take().is_empty());
        // The same executable in a pod is no node agent.
        let e = w.feed(ev(61, 1, "/usr/bin/kubelet", 2, read(path, "fpK")));
        assert!(!e.is_maintenance());
    }

    #[test]
    fn a_memory_access_names_what_the_target_holds_and_rotation_replaces() {
        let mut w = world();
        w.feed(ev(70, 1, "/app/api", 0, read("/t", "fpOld")));
        let mut r = ev(70, 1, "/app/api", 1, read("/t", "fpNew"));
        if let Body::SecretRead(sr) = &mut r.body {
            sr.credential = cred("fpNew", "file:/t");
        }
        w.feed(r);
        let access = Body::ProcessAccess(Box::new(ProcessAccess {
            access: "environ".into(),
            target: TargetProcess {
                pid: 70,
                comm: String::new(),
                exe: String::new(),
                workload: Arc::new(pod("payments", "api", "ua")),
                credentials: Vec::new(),
            },
        }));
        let e = w.feed(ev(71, 1, "/usr/bin/cat", 2, access));
        let Body::ProcessAccess(a) = &e.body else {
            unreachable!()
        };
        let fps: Vec<&str> = a
            .target
            .credentials
            .iter()
            .map(|c| c.fingerprint.as_str())
            .collect();
        assert_eq!(fps, ["fpNew"], "one credential, its current value");
    }
}
