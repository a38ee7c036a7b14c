//! Credential policy from `[[credential]]` config entries: which credential (by path glob or
//! fingerprint), who owns it and who else may read it, where it may be used, and when
//! (weekday/time windows or cron expressions, in a timezone). Plus the `[[allow]]` list of
//! known-good findings.

use std::{
    net::IpAddr,
    path::{Path, PathBuf},
    time::Duration,
};

use anyhow::{Context, Result, anyhow, bail};
use chrono::{DateTime, Datelike, Timelike, Utc};
use chrono_tz::Tz;
use globset::{GlobBuilder, GlobMatcher};
use ipnet::IpNet;
use serde::Deserialize;

use crate::{
    alert::{Alert, AlertKind},
    config::Checker,
    event::{CredentialRef, Destination, Owner, OwnerSource, Workload, WorkloadId, WorkloadKind},
};

/// What one credential may do (`[[credential]]`). Named by `path` (glob) or `fingerprint`.
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

/// A known-good finding (`[[allow]]`): alerts matching every given field are not raised.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AllowEntry {
    /// Alert kind (`token_reuse`, …); all kinds when absent.
    pub alert: Option<AlertKind>,
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

/// One weekday/time window, minutes since local midnight. `end <= start` wraps past
/// midnight (`22:00-06:00`).
#[derive(Clone, Debug, PartialEq, Eq)]
struct Window {
    days: [bool; 7],
    start: u32,
    end: u32,
}

#[derive(Clone, Debug)]
pub struct Schedule {
    tz: Tz,
    windows: Vec<Window>,
    /// Cron entries (a CronJob's `schedule`): each run may use the credential for `run_for`.
    crons: Vec<croner::Cron>,
    run_for: Duration,
    /// As written, for alert summaries.
    pub text: String,
}

/// Without `run_for`, a cron-started run may use its credential this long.
const DEFAULT_RUN_FOR: Duration = Duration::from_secs(3600);

/// Weekday windows start with a letter (`Mon`, `daily`); cron lines with a digit, `*` or `@`.
fn is_cron(s: &str) -> bool {
    s.trim_start()
        .starts_with(|c: char| c.is_ascii_digit() || c == '*' || c == '@')
}

const DAYS: [&str; 7] = [
    "monday",
    "tuesday",
    "wednesday",
    "thursday",
    "friday",
    "saturday",
    "sunday",
];

/// `Mon`…`Sun`, or any longer prefix of the full name.
fn day_index(s: &str) -> Result<usize> {
    let l = s.trim().to_ascii_lowercase();
    DAYS.iter()
        .position(|d| l.len() >= 3 && d.starts_with(&l))
        .ok_or_else(|| anyhow!("unknown weekday {s:?} (use Mon, Tue, … Sun)"))
}

fn minutes(s: &str) -> Result<u32> {
    let (h, m) = s
        .split_once(':')
        .ok_or_else(|| anyhow!("time {s:?} is not HH:MM"))?;
    let (h, m): (u32, u32) = (h.parse().context("hour")?, m.parse().context("minute")?);
    if h > 24 || m > 59 || (h == 24 && m != 0) {
        bail!("time {s:?} is out of range");
    }
    Ok(h * 60 + m)
}

/// `Mon-Fri 09:00-17:00`, `Sat,Sun 10:00-12:00`, `daily 22:00-06:00`.
fn parse_window(s: &str) -> Result<Window> {
    let (days, times) = s
        .trim()
        .split_once(char::is_whitespace)
        .ok_or_else(|| anyhow!("window {s:?} is not `DAYS HH:MM-HH:MM`"))?;
    let mut set = [false; 7];
    if days.eq_ignore_ascii_case("daily") {
        set = [true; 7];
    } else {
        for part in days.split(',') {
            match part.split_once('-') {
                Some((a, b)) => {
                    let (a, b) = (day_index(a)?, day_index(b)?);
                    let mut d = a;
                    loop {
                        set[d] = true;
                        if d == b {
                            break;
                        }
                        d = (d + 1) % 7;
                    }
                }
                None => set[day_index(part)?] = true,
            }
        }
    }
    let (start, end) = times
        .trim()
        .split_once('-')
        .ok_or_else(|| anyhow!("window {s:?}: times are not HH:MM-HH:MM"))?;
    Ok(Window {
        days: set,
        start: minutes(start)?,
        end: minutes(end)?,
    })
}

impl Schedule {
    pub fn parse(
        entries: &[String],
        timezone: Option<&str>,
        run_for: Option<Duration>,
    ) -> Result<Self> {
        let tz: Tz = match timezone {
            Some(t) => t.parse().map_err(|_| {
                anyhow!("unknown timezone {t:?} (use an IANA name like Europe/Berlin)")
            })?,
            None => Tz::UTC,
        };
        let (mut windows, mut crons) = (Vec::new(), Vec::new());
        for e in entries {
            if is_cron(e) {
                let c = croner::Cron::new(e.trim())
                    .parse()
                    .map_err(|err| anyhow!("cron expression {e:?}: {err}"))?;
                crons.push(c);
            } else {
                windows.push(parse_window(e)?);
            }
        }
        if entries.is_empty() {
            bail!("schedule is empty");
        }
        let run_for = run_for.unwrap_or(DEFAULT_RUN_FOR);
        if run_for.is_zero() {
            bail!("run_for must be longer than 0s");
        }
        let text = format!("{} ({})", entries.join(", "), timezone.unwrap_or("UTC"));
        Ok(Schedule {
            tz,
            windows,
            crons,
            run_for,
            text,
        })
    }

    /// True when `t` falls inside any window, or within `run_for` after a cron fire time,
    /// in the schedule's timezone.
    pub fn contains(&self, t: DateTime<Utc>) -> bool {
        let local = t.with_timezone(&self.tz);
        let day = local.weekday().num_days_from_monday() as usize;
        let prev = (day + 6) % 7;
        let m = local.hour() * 60 + local.minute();
        let in_window = self.windows.iter().any(|w| {
            if w.start < w.end {
                w.days[day] && m >= w.start && m < w.end
            } else {
                // Wraps midnight: the evening part today, the morning part from yesterday.
                (w.days[day] && m >= w.start) || (w.days[prev] && m < w.end)
            }
        });
        in_window || self.crons.iter().any(|c| self.in_cron_run(c, t))
    }

    /// A run started by `c` at or before `t` is still within `run_for`: the first fire time
    /// after `t - run_for` is not later than `t`.
    fn in_cron_run(&self, c: &croner::Cron, t: DateTime<Utc>) -> bool {
        let Ok(run_for) = chrono::Duration::from_std(self.run_for) else {
            return false;
        };
        let Some(from) = t.checked_sub_signed(run_for) else {
            return false;
        };
        c.find_next_occurrence(&from.with_timezone(&self.tz), false)
            .is_ok_and(|fire| fire.with_timezone(&Utc) <= t)
    }
}

/// Names workloads in policy: a glob over the workload id (`pod:payments/api-*`,
/// `unit:backup.service`, `host:0:/usr/bin/*`), or over the SPIFFE ID when it starts with
/// `spiffe://`. In `host:` selectors, whose ids end in an executable's path, `*` stays
/// within one `/`-separated component (`host:1000:/opt/tools/*` is the files in /opt/tools,
/// not /opt/tools/a/b) and `**` crosses them; pod ids and SPIFFE IDs are made of Kubernetes
/// names, which cannot contain `/`, so there `*` spans components as before
/// (`spiffe://cluster.local/ns/payments/*`). An id whose path is not normal (`..`, `.`,
/// `//`) matches no selector: executables are named by canonical paths, so such an id was
/// made up.
#[derive(Clone, Debug)]
pub struct Selector {
    glob: GlobMatcher,
    spiffe: bool,
    pub text: String,
}

impl Selector {
    pub fn parse(s: &str) -> Result<Self> {
        let spiffe = s.starts_with("spiffe://");
        let known = ["pod:", "container:", "unit:", "host:"];
        if !spiffe && !known.iter().any(|k| s.starts_with(k)) {
            bail!(
                "workload selector {s:?} must start with pod:, container:, unit:, host: or spiffe://"
            );
        }
        let glob = GlobBuilder::new(s)
            .literal_separator(s.starts_with("host:"))
            .build()
            .with_context(|| format!("bad workload selector {s:?}"))?
            .compile_matcher();
        Ok(Selector {
            glob,
            spiffe,
            text: s.to_owned(),
        })
    }

    pub fn matches(&self, w: &Workload) -> bool {
        let id = if self.spiffe {
            match w.spiffe_id.as_deref() {
                Some(id) => id,
                None => return false,
            }
        } else {
            w.id.as_str()
        };
        !has_abnormal_path(id) && self.glob.is_match(id)
    }

    /// The owner this selector declares, for alerts.
    fn owner(&self) -> Owner {
        let kind = match self.text.split_once(':').map(|(k, _)| k) {
            Some("pod") => WorkloadKind::Pod,
            Some("container") => WorkloadKind::Container,
            Some("unit") => WorkloadKind::Unit,
            _ if self.spiffe => WorkloadKind::Pod,
            _ => WorkloadKind::Host,
        };
        Owner {
            kind,
            id: WorkloadId::declared(&self.text),
            source: OwnerSource::Policy,
            ..Default::default()
        }
    }
}

/// `..` or `.` as a path component, or an empty one (`//`), after the scheme.
fn has_abnormal_path(id: &str) -> bool {
    let path = id.strip_prefix("spiffe://").unwrap_or(id);
    path.split('/')
        .skip(1)
        .any(|c| c == ".." || c == "." || c.is_empty())
}

/// Where a credential may go: an address or network and/or a DNS name glob, optionally a port.
#[derive(Clone, Debug)]
pub struct DestPattern {
    net: Option<IpNet>,
    name: Option<GlobMatcher>,
    port: Option<u16>,
    pub text: String,
}

impl DestPattern {
    /// `10.0.0.0/8`, `10.1.2.3:443`, `2001:db8::/32`, `[2001:db8::1]:443`,
    /// `*.amazonaws.com:443`, `*:5432`.
    pub fn parse(s: &str) -> Result<Self> {
        let bad = |why: &str| anyhow!("destination {s:?}: {why}");
        let (host, port) = if let Some(rest) = s.strip_prefix('[') {
            let (h, after) = rest.split_once(']').ok_or_else(|| bad("missing `]`"))?;
            match after {
                "" => (h, None),
                p => (
                    h,
                    Some(p.strip_prefix(':').ok_or_else(|| bad("junk after `]`"))?),
                ),
            }
        } else if s.matches(':').count() >= 2 {
            (s, None)
        } else {
            match s.rsplit_once(':') {
                Some((h, p)) => (h, Some(p)),
                None => (s, None),
            }
        };
        let port = match port {
            None | Some("*") => None,
            Some(p) => Some(p.parse::<u16>().map_err(|_| bad("bad port"))?),
        };
        if host.is_empty() {
            return Err(bad("empty host"));
        }
        let net = if host == "*" {
            None
        } else if let Ok(n) = host.parse::<IpNet>() {
            Some(n)
        } else if let Ok(ip) = host.parse::<IpAddr>() {
            Some(IpNet::from(ip))
        } else {
            None
        };
        let name = if net.is_none() && host != "*" {
            if host.contains('/') || host.parse::<IpAddr>().is_ok() {
                return Err(bad("bad address or network"));
            }
            Some(
                GlobBuilder::new(&host.to_ascii_lowercase())
                    .build()
                    .map_err(|e| bad(&e.to_string()))?
                    .compile_matcher(),
            )
        } else {
            None
        };
        Ok(DestPattern {
            net,
            name,
            port,
            text: s.to_owned(),
        })
    }

    pub fn matches(&self, d: &Destination) -> bool {
        if self.port.is_some_and(|p| p != d.port) {
            return false;
        }
        match (&self.net, &self.name) {
            (Some(n), _) => d.ip.is_some_and(|ip| n.contains(&canonical(ip))),
            (None, Some(g)) => d
                .name
                .as_deref()
                .is_some_and(|n| g.is_match(n.trim_end_matches('.').to_ascii_lowercase())),
            (None, None) => true,
        }
    }
}

/// `::ffff:10.0.0.1` (a v4 peer on a dual-stack socket) compares as `10.0.0.1`.
fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map(IpAddr::V4).unwrap_or(ip),
        v4 => v4,
    }
}

#[derive(Clone)]
enum Matcher {
    Path(PathGlob),
    Fingerprint(String),
}

#[derive(Clone)]
pub struct PolicyEntry {
    matcher: Matcher,
    pub purpose: Option<String>,
    pub schedule: Option<Schedule>,
    owner: Option<Selector>,
    pub allowed_workloads: Vec<Selector>,
    pub allowed_destinations: Vec<DestPattern>,
    /// The entry as written (`path` or `fingerprint`), for alert evidence.
    pub name: String,
}

impl PolicyEntry {
    pub fn owner(&self) -> Option<Owner> {
        self.owner.as_ref().map(Selector::owner)
    }

    pub fn is_owner(&self, w: &Workload) -> bool {
        self.owner.as_ref().is_some_and(|o| o.matches(w))
    }

    pub fn allows_workload(&self, w: &Workload) -> bool {
        self.allowed_workloads.iter().any(|s| s.matches(w))
    }

    /// `None` when the entry does not restrict destinations.
    pub fn allows_destination(&self, d: &Destination) -> Option<bool> {
        if self.allowed_destinations.is_empty() {
            return None;
        }
        Some(self.allowed_destinations.iter().any(|p| p.matches(d)))
    }
}

fn path_glob(p: &str) -> Result<GlobMatcher> {
    Ok(GlobBuilder::new(p)
        .literal_separator(true)
        .build()
        .with_context(|| format!("bad path glob {p:?}"))?
        .compile_matcher())
}

/// A `path` glob as written, plus the same glob where its literal leading part really is
/// when a symlink leads elsewhere: the inventory names secrets by where they are
/// (`/var/run/secrets/…` is `/run/secrets/…` on most hosts), so the written glob alone would
/// never match their events.
#[derive(Clone)]
struct PathGlob {
    written: String,
    globs: Vec<GlobMatcher>,
}

impl PathGlob {
    fn new(p: &str) -> Result<Self> {
        Ok(PathGlob {
            written: p.to_owned(),
            globs: vec![path_glob(p)?],
        })
    }

    fn is_match(&self, path: &str) -> bool {
        self.globs.iter().any(|g| g.is_match(path))
    }

    fn add_real_location(&mut self, real: &mut dyn FnMut(&Path) -> Option<PathBuf>) {
        let (lead, rest) = literal_lead(&self.written);
        if lead.as_os_str().is_empty() {
            return;
        }
        let Some(to) = real(lead).filter(|to| to != lead) else {
            return;
        };
        // The real location is a path, not a pattern: its glob characters are literal.
        let escaped = globset::escape(&to.to_string_lossy());
        if let Ok(g) = path_glob(&format!("{escaped}{rest}")) {
            self.globs.push(g);
        }
    }
}

/// The longest leading run of whole path components without glob syntax, and the rest
/// (starting with its `/`). `/var/run/secrets/*/token` → (`/var/run/secrets`, `/*/token`).
fn literal_lead(glob: &str) -> (&Path, &str) {
    let meta = glob.find(['*', '?', '[', '{', '\\']).unwrap_or(glob.len());
    let cut = if meta == glob.len() {
        glob.len()
    } else {
        glob[..meta].rfind('/').unwrap_or(0)
    };
    (Path::new(&glob[..cut]), &glob[cut..])
}

/// One `[[allow]]` entry: every field given must match the alert.
#[derive(Clone)]
struct Allow {
    alert: Option<AlertKind>,
    workload: Option<Selector>,
    fingerprint: Option<String>,
    path: Option<PathGlob>,
    destination: Option<DestPattern>,
}

impl Allow {
    fn matches(&self, a: &Alert) -> bool {
        let fp = a.credential.as_ref().map(|c| c.fingerprint.as_str());
        self.alert.is_none_or(|k| k == a.alert)
            && self
                .workload
                .as_ref()
                .is_none_or(|s| s.matches(&a.workload))
            && self.fingerprint.as_deref().is_none_or(|f| Some(f) == fp)
            && self.path.as_ref().is_none_or(|g| {
                a.evidence
                    .iter()
                    .any(|e| e.secret_path.as_deref().is_some_and(|p| g.is_match(p)))
            })
            && self.destination.as_ref().is_none_or(|d| {
                a.evidence
                    .iter()
                    .any(|e| e.dst.as_ref().is_some_and(|x| d.matches(x)))
            })
    }
}

#[derive(Clone, Default)]
pub struct Policy {
    entries: Vec<PolicyEntry>,
    allow: Vec<Allow>,
}

/// `Some(parsed)`, or `None` with the error recorded under `key`.
fn checked<T>(c: &mut Checker, key: &str, r: Result<T>) -> Option<T> {
    r.map_err(|e| c.fail(key, format_args!("{e:#}"))).ok()
}

fn compile_entry(e: &CredentialPolicy, c: &mut Checker) -> Option<PolicyEntry> {
    let (matcher, name) = match (&e.path, &e.fingerprint) {
        (Some(p), None) => (
            Matcher::Path(checked(c, "path", PathGlob::new(p))?),
            p.clone(),
        ),
        (None, Some(f)) => (Matcher::Fingerprint(f.clone()), f.clone()),
        _ => {
            c.fail("", "needs exactly one of `path` or `fingerprint`");
            return None;
        }
    };
    let schedule = if e.schedule.is_empty() {
        if e.timezone.is_some() || e.run_for.is_some() {
            c.fail("schedule", "`timezone` and `run_for` need a `schedule`");
            return None;
        }
        None
    } else {
        let s = Schedule::parse(&e.schedule, e.timezone.as_deref(), e.run_for);
        Some(checked(c, "schedule", s)?)
    };
    let owner = match e.owner.as_deref() {
        Some(o) => Some(checked(c, "owner", Selector::parse(o))?),
        None => None,
    };
    let mut allowed_workloads = Vec::new();
    for (i, s) in e.allowed_workloads.iter().enumerate() {
        allowed_workloads.push(checked(
            c,
            &format!("allowed_workloads[{i}]"),
            Selector::parse(s),
        )?);
    }
    let mut allowed_destinations = Vec::new();
    for (i, s) in e.allowed_destinations.iter().enumerate() {
        allowed_destinations.push(checked(
            c,
            &format!("allowed_destinations[{i}]"),
            DestPattern::parse(s),
        )?);
    }
    Some(PolicyEntry {
        matcher,
        purpose: e.purpose.clone(),
        schedule,
        owner,
        allowed_workloads,
        allowed_destinations,
        name,
    })
}

fn compile_allow(a: &AllowEntry, c: &mut Checker) -> Option<Allow> {
    if a.reason.trim().is_empty() {
        c.fail("reason", "must say why this finding is fine");
        return None;
    }
    let workload = match a.workload.as_deref() {
        Some(w) => Some(checked(c, "workload", Selector::parse(w))?),
        None => None,
    };
    let path = match a.path.as_deref() {
        Some(p) => Some(checked(c, "path", PathGlob::new(p))?),
        None => None,
    };
    let destination = match a.destination.as_deref() {
        Some(d) => Some(checked(c, "destination", DestPattern::parse(d))?),
        None => None,
    };
    if workload.is_none() && a.fingerprint.is_none() && path.is_none() && destination.is_none() {
        c.fail("", "needs a workload, fingerprint, path or destination");
        return None;
    }
    Some(Allow {
        alert: a.alert,
        workload,
        fingerprint: a.fingerprint.clone(),
        path,
        destination,
    })
}

impl Policy {
    /// Compiles `[[credential]]` and `[[allow]]` entries. Each problem is recorded in `c`
    /// under its key (`credential[1].schedule`); an entry with a problem is left out.
    pub fn compile_checked(
        entries: &[CredentialPolicy],
        allow: &[AllowEntry],
        c: &mut Checker,
    ) -> Policy {
        let mut p = Policy::default();
        c.within("credential", |c| {
            for (i, e) in entries.iter().enumerate() {
                c.within(format!("[{i}]"), |c| p.entries.extend(compile_entry(e, c)));
            }
        });
        c.within("allow", |c| {
            for (i, a) in allow.iter().enumerate() {
                c.within(format!("[{i}]"), |c| p.allow.extend(compile_allow(a, c)));
            }
        });
        p
    }

    /// [`Self::compile_checked`] for callers without a config file: the first problem is
    /// the error.
    pub fn compile(entries: &[CredentialPolicy], allow: &[AllowEntry]) -> Result<Self> {
        let mut c = Checker::default();
        let p = Self::compile_checked(entries, allow, &mut c);
        match c.problems().first() {
            Some(pr) => bail!("{}: {}", pr.key, pr.message),
            None => Ok(p),
        }
    }

    /// Lets every `path` glob also match where its literal leading part really is
    /// (`real`: symlinks resolved, inside the host root), so a glob written through a
    /// symlinked directory still names the secrets the inventory finds there.
    pub fn add_real_locations(&mut self, mut real: impl FnMut(&Path) -> Option<PathBuf>) {
        for e in &mut self.entries {
            if let Matcher::Path(g) = &mut e.matcher {
                g.add_real_location(&mut real);
            }
        }
        for a in &mut self.allow {
            if let Some(g) = &mut a.path {
                g.add_real_location(&mut real);
            }
        }
    }

    /// True when an `[[allow]]` entry covers this alert.
    pub fn allowed(&self, a: &Alert) -> bool {
        self.allow.iter().any(|x| x.matches(a))
    }

    /// The first entry naming this credential.
    pub fn find(&self, cred: &CredentialRef, path: Option<&str>) -> Option<&PolicyEntry> {
        self.entries.iter().find(|e| match &e.matcher {
            Matcher::Fingerprint(f) => *f == cred.fingerprint,
            Matcher::Path(g) => path.is_some_and(|p| g.is_match(p)),
        })
    }
}

impl std::fmt::Debug for Policy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Policy")
            .field("entries", &self.entries.len())
            .field("allow", &self.allow.len())
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;

    fn at(s: &str) -> DateTime<Utc> {
        DateTime::parse_from_rfc3339(s).unwrap().with_timezone(&Utc)
    }

    #[test]
    fn weekday_windows_in_a_timezone() {
        let s =
            Schedule::parse(&["Mon-Fri 09:00-17:00".into()], Some("Europe/Berlin"), None).unwrap();
        // 2026-11-23 is a Monday; Berlin is UTC+1 in November.
        assert!(s.contains(at("2026-11-23T08:30:00Z")), "09:30 Berlin");
        assert!(!s.contains(at("2026-11-23T07:30:00Z")), "08:30 Berlin");
        assert!(
            !s.contains(at("2026-11-23T16:00:00Z")),
            "17:00 Berlin is the end, exclusive"
        );
        assert!(!s.contains(at("2026-11-22T10:00:00Z")), "Sunday");
    }

    #[test]
    fn windows_wrapping_midnight_and_lists() {
        let s = Schedule::parse(
            &["Sat,Sun 22:00-06:00".into(), "daily 12:00-12:30".into()],
            None,
            None,
        )
        .unwrap();
        assert!(
            s.contains(Utc.with_ymd_and_hms(2026, 11, 21, 23, 0, 0).unwrap()),
            "Sat 23:00"
        );
        assert!(
            s.contains(Utc.with_ymd_and_hms(2026, 11, 22, 5, 0, 0).unwrap()),
            "Sun 05:00 from Sat night"
        );
        assert!(
            s.contains(Utc.with_ymd_and_hms(2026, 11, 23, 5, 0, 0).unwrap()),
            "Mon 05:00 from Sun night"
        );
        assert!(
            !s.contains(Utc.with_ymd_and_hms(2026, 11, 24, 5, 0, 0).unwrap()),
            "Tue 05:00"
        );
        assert!(
            s.contains(Utc.with_ymd_and_hms(2026, 11, 25, 12, 15, 0).unwrap()),
            "daily noon"
        );
    }

    #[test]
    fn bad_schedules_are_errors() {
        for bad in [
            "Mon-Fri",
            "Funday 09:00-10:00",
            "Mon 9-10",
            "Mon 25:00-26:00",
            "Mon 09:00",
        ] {
            assert!(Schedule::parse(&[bad.into()], None, None).is_err(), "{bad}");
        }
        assert!(Schedule::parse(&["Mon 09:00-10:00".into()], Some("Mars/Olympus"), None).is_err());
        assert!(Schedule::parse(&["61 * * * *".into()], None, None).is_err());
    }

    #[test]
    fn cron_entries_cover_run_for_after_each_fire() {
        // A CronJob's schedule: 02:30 every day, Berlin time, runs for up to 20 minutes.
        let s = Schedule::parse(
            &["30 2 * * *".into()],
            Some("Europe/Berlin"),
            Some(Duration::from_secs(20 * 60)),
        )
        .unwrap();
        assert!(
            s.contains(at("2026-11-23T01:30:00Z")),
            "the fire time itself"
        );
        assert!(s.contains(at("2026-11-23T01:49:59Z")), "inside run_for");
        assert!(!s.contains(at("2026-11-23T01:50:00Z")), "run_for is over");
        assert!(!s.contains(at("2026-11-23T01:29:59Z")), "before the fire");
        assert!(!s.contains(at("2026-11-23T13:35:00Z")), "afternoon");
        let weekly = Schedule::parse(&["0 3 * * SUN".into()], None, None).unwrap();
        assert!(weekly.contains(at("2026-11-22T03:59:00Z")), "Sunday run");
        assert!(!weekly.contains(at("2026-11-23T03:10:00Z")), "Monday");
    }

    /// `/var/run/secrets/*` written in config, the secret found at `/run/secrets/x`: the
    /// entry applies. A symlink only in the part after the glob changes nothing, and globs
    /// without a literal directory are left alone.
    #[test]
    fn path_globs_also_match_where_a_symlinked_directory_leads() {
        assert_eq!(
            literal_lead("/var/run/secrets/*/token"),
            (Path::new("/var/run/secrets"), "/*/token")
        );
        assert_eq!(
            literal_lead("/etc/app/token"),
            (Path::new("/etc/app/token"), "")
        );
        assert_eq!(literal_lead("*.key"), (Path::new(""), "*.key"));
        let entry = |path: &str| CredentialPolicy {
            path: Some(path.into()),
            purpose: Some("test".into()),
            ..CredentialPolicy::default()
        };
        let mut p =
            Policy::compile(&[entry("/var/run/secrets/*"), entry("/srv/[ab]/key")], &[]).unwrap();
        let cred = CredentialRef::default();
        assert!(p.find(&cred, Some("/run/secrets/x")).is_none());
        let mut asked = Vec::new();
        p.add_real_locations(|d| {
            asked.push(d.to_path_buf());
            (d == Path::new("/var/run/secrets")).then(|| PathBuf::from("/run/sec[rets]"))
        });
        assert_eq!(
            asked,
            [PathBuf::from("/var/run/secrets"), PathBuf::from("/srv")]
        );
        assert!(p.find(&cred, Some("/var/run/secrets/x")).is_some());
        // The real directory's own `[` is a character, not a class.
        assert!(p.find(&cred, Some("/run/sec[rets]/x")).is_some());
        assert!(p.find(&cred, Some("/run/secs/x")).is_none());
        assert!(p.find(&cred, Some("/run/sec[rets]/x/y")).is_none());
    }

    fn dst(ip: &str, port: u16, name: Option<&str>) -> Destination {
        Destination {
            name: name.map(Into::into),
            ..Destination::inet(ip.parse().unwrap(), port, "tcp")
        }
    }

    #[test]
    fn destination_patterns() {
        let p = |s: &str| DestPattern::parse(s).unwrap();
        assert!(p("10.0.0.0/8").matches(&dst("10.9.8.7", 1, None)));
        assert!(p("10.0.0.0/8:443").matches(&dst("::ffff:10.9.8.7", 443, None)));
        assert!(!p("10.0.0.0/8:443").matches(&dst("10.9.8.7", 80, None)));
        assert!(p("[2001:db8::1]:443").matches(&dst("2001:db8::1", 443, None)));
        assert!(p("2001:db8::/32").matches(&dst("2001:db8:5::1", 9, None)));
        let aws = p("*.amazonaws.com:443");
        assert!(aws.matches(&dst("52.1.2.3", 443, Some("sts.us-east-1.AmazonAWS.com."))));
        assert!(!aws.matches(&dst("52.1.2.3", 443, None)), "name unknown");
        assert!(!aws.matches(&dst("52.1.2.3", 443, Some("evil.example"))));
        assert!(p("*:5432").matches(&dst("192.0.2.1", 5432, None)));
        for bad in ["", ":443", "10.0.0.0/99", "[::1", "host:http"] {
            assert!(DestPattern::parse(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn selectors_match_ids_or_spiffe_ids() {
        let w = Workload {
            kind: WorkloadKind::Pod,
            id: crate::event::WorkloadId::pod("payments", "api-7d9f"),
            spiffe_id: Some("spiffe://cluster.local/ns/payments/sa/api".into()),
            ..Default::default()
        };
        assert!(Selector::parse("pod:payments/api-*").unwrap().matches(&w));
        assert!(!Selector::parse("pod:billing/*").unwrap().matches(&w));
        assert!(
            Selector::parse("spiffe://cluster.local/ns/payments/*")
                .unwrap()
                .matches(&w)
        );
        assert!(Selector::parse("payments/api").is_err());
    }

    /// `host:1000:/opt/tools/*` named every path that merely starts with /opt/tools/, `..`
    /// and subdirectories included.
    #[test]
    fn selector_stars_stay_within_a_path_component() {
        let host = |exe: &str| Workload {
            kind: WorkloadKind::Host,
            id: WorkloadId::host(1000, exe),
            ..Default::default()
        };
        let tools = Selector::parse("host:1000:/opt/tools/*").unwrap();
        assert!(tools.matches(&host("/opt/tools/deploy")));
        assert!(!tools.matches(&host("/opt/tools/../../tmp/x")));
        assert!(!tools.matches(&host("/opt/tools/./x")));
        assert!(!tools.matches(&host("/opt/tools/a/b")));
        assert!(!tools.matches(&host("/opt/tools//x")));
        let deep = Selector::parse("host:1000:/opt/tools/**").unwrap();
        assert!(deep.matches(&host("/opt/tools/a/b")));
        assert!(!deep.matches(&host("/opt/tools/a/../../../tmp/x")));
        // Ids without paths are unaffected; `*` still spans a pod name.
        let w = Workload {
            kind: WorkloadKind::Pod,
            id: WorkloadId::pod("payments", "api-7f9c"),
            ..Default::default()
        };
        assert!(Selector::parse("pod:payments/*").unwrap().matches(&w));
        assert!(Selector::parse("pod:*").unwrap().matches(&w));
    }
}
