//! Learned behaviour, per workload identity ("subject": the SPIFFE ID when known, so a pod
//! replaced by its Deployment keeps its profile, else the workload id) and per (subject,
//! credential): which secrets it reads, where each credential goes, which executables use
//! it, in which hours of the week, and which executables gain privileges. A subject is
//! learned for `learning_period` from its first event; after that the profile is frozen and
//! the detectors compare against it. Credentials' last use feeds `dormant_credential`.
//!
//! Everything lives in memory; dirty entries are written to an embedded redb file under the
//! state dir on [`Baselines::checkpoint`], so a restart keeps what was learned. Time comes
//! from event timestamps only, so replays learn the same profiles.

use std::{
    collections::BTreeSet,
    net::IpAddr,
    path::{Path, PathBuf},
    time::Duration,
};

use anyhow::{Context, Result, bail};
use chrono::{Datelike, Timelike};
use foldhash::{HashMap, HashMapExt, HashSet, HashSetExt};
use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};
use serde::{Deserialize, Serialize};
use tracing::warn;

use crate::event::{Body, Destination, Event, Timestamp, Workload, duration_ns};

const SUBJECTS: TableDefinition<&str, &[u8]> = TableDefinition::new("subjects");
const PAIRS: TableDefinition<(&str, &str), &[u8]> = TableDefinition::new("pairs");
const CREDENTIALS: TableDefinition<&str, i64> = TableDefinition::new("credentials");
const META: TableDefinition<&str, u64> = TableDefinition::new("meta");
/// Bumped when the stored profile layout changes incompatibly.
const FORMAT: u64 = 1;

/// Sets in a profile stop growing here: a workload talking to thousands of destinations is
/// not one whose next new destination means anything.
const MAX_SET: usize = 256;

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct SubjectProfile {
    pub first_seen: i64,
    pub last_seen: i64,
    /// Fingerprints read while learning.
    pub secrets: BTreeSet<String>,
    /// Executables that gained uid 0 or capabilities while learning.
    pub priv_exes: BTreeSet<String>,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct PairProfile {
    pub first_seen: i64,
    pub last_seen: i64,
    pub uses: u64,
    /// `ip:port/proto`, and `name:port/proto` when the name was resolved.
    pub destinations: BTreeSet<String>,
    pub exes: BTreeSet<String>,
    /// Hour-of-week bitmap (UTC, Monday 00:00 is bit 0) of reads and uses while learning.
    pub hours: [u64; 3],
}

impl PairProfile {
    pub fn knows_destination(&self, d: &Destination) -> bool {
        let mut known = false;
        for_each_dest_key(d, |k| known |= self.destinations.contains(k));
        known
    }

    pub fn active_in_hour_of_week(&self, h: usize) -> bool {
        self.hours[h / 64] & (1 << (h % 64)) != 0
    }

    /// Any day at this hour of the day.
    pub fn active_in_hour_of_day(&self, hour: usize) -> bool {
        (0..7).any(|d| self.active_in_hour_of_week(d * 24 + hour))
    }
}

/// Calls `f` with each key a destination is learned under (address, then name), formatted
/// into one buffer: on the per-use path, a key is only allocated when it is new.
pub fn for_each_dest_key(d: &Destination, mut f: impl FnMut(&str)) {
    let mut num = itoa::Buffer::new();
    let mut k = String::with_capacity(64);
    // IPv4 by hand: `Display` through `fmt::write` was most of this function's cost.
    match (d.ip, &d.path) {
        (Some(IpAddr::V4(a)), _) => {
            for (i, o) in a.octets().into_iter().enumerate() {
                if i > 0 {
                    k.push('.');
                }
                k.push_str(num.format(o));
            }
        }
        (Some(IpAddr::V6(a)), _) => {
            use std::fmt::Write;
            let _ = write!(k, "{a}");
        }
        // A Unix-domain socket is its path (no port).
        (None, path) => {
            k.push_str("unix:");
            k.push_str(path.as_deref().unwrap_or(""));
            f(&k);
            return;
        }
    }
    let mut port_proto = |k: &mut String| {
        k.push(':');
        k.push_str(num.format(d.port));
        k.push('/');
        k.push_str(&d.proto);
    };
    port_proto(&mut k);
    f(&k);
    if let Some(n) = &d.name {
        k.clear();
        k.push_str(n.trim_end_matches('.'));
        port_proto(&mut k);
        f(&k);
    }
}

pub fn dest_keys(d: &Destination) -> Vec<String> {
    let mut v = Vec::with_capacity(2);
    for_each_dest_key(d, |k| v.push(k.to_owned()));
    v
}

pub fn hour_of_week(ts: Timestamp) -> usize {
    (ts.0.weekday().num_days_from_monday() * 24 + ts.0.hour()) as usize
}

/// The identity a profile is kept for.
pub fn subject_of(w: &Workload) -> &str {
    w.spiffe_id.as_deref().unwrap_or(&w.id)
}

#[derive(Default)]
struct Subject {
    profile: SubjectProfile,
    pairs: HashMap<String, PairProfile>,
}

pub struct Baselines {
    learning_ns: i64,
    max_entries: usize,
    subjects: HashMap<String, Subject>,
    /// Last read or use per fingerprint.
    credentials: HashMap<String, i64>,
    pairs: usize,
    store: Option<Store>,
}

struct Store {
    db: Database,
    path: PathBuf,
    /// Subjects changed since the last checkpoint; their pairs are written with them (a
    /// pair only changes through an event of its subject).
    dirty_subjects: HashSet<String>,
    dirty_credentials: HashSet<String>,
    gone_subjects: HashSet<String>,
    gone_pairs: HashSet<(String, String)>,
    gone_credentials: HashSet<String>,
}

impl Baselines {
    /// In memory only (replay without a state dir, tests).
    pub fn in_memory(learning_period: Duration, max_entries: usize) -> Self {
        Baselines {
            learning_ns: duration_ns(learning_period),
            max_entries: max_entries.max(1),
            subjects: HashMap::new(),
            credentials: HashMap::new(),
            pairs: 0,
            store: None,
        }
    }

    /// Opens (or creates) `<state_dir>/baselines.redb` and loads it.
    pub fn open(state_dir: &Path, learning_period: Duration, max_entries: usize) -> Result<Self> {
        let path = state_dir.join("baselines.redb");
        let db = Database::create(&path)
            .with_context(|| format!("opening baseline store {}", path.display()))?;
        let mut b = Baselines::in_memory(learning_period, max_entries);
        b.load(&db)
            .with_context(|| format!("reading baseline store {}", path.display()))?;
        b.store = Some(Store {
            db,
            path,
            dirty_subjects: HashSet::new(),
            dirty_credentials: HashSet::new(),
            gone_subjects: HashSet::new(),
            gone_pairs: HashSet::new(),
            gone_credentials: HashSet::new(),
        });
        Ok(b)
    }

    fn load(&mut self, db: &Database) -> Result<()> {
        let tx = db.begin_write()?;
        {
            let mut meta = tx.open_table(META)?;
            let format = meta.get("format")?.map(|v| v.value());
            match format {
                None => {
                    meta.insert("format", FORMAT)?;
                }
                Some(FORMAT) => {}
                Some(f) => {
                    bail!("written by a newer credwatch (format {f}, this one reads {FORMAT})")
                }
            }
            // Create the tables so the read below finds them on a fresh file.
            tx.open_table(SUBJECTS)?;
            tx.open_table(PAIRS)?;
            tx.open_table(CREDENTIALS)?;
        }
        tx.commit()?;
        let tx = db.begin_read()?;
        let mut skipped = 0u64;
        for row in tx.open_table(SUBJECTS)?.iter()? {
            let (k, v) = row?;
            match serde_json::from_slice::<SubjectProfile>(v.value()) {
                Ok(profile) => {
                    self.subjects
                        .entry(k.value().to_owned())
                        .or_default()
                        .profile = profile;
                }
                Err(_) => skipped += 1,
            }
        }
        for row in tx.open_table(PAIRS)?.iter()? {
            let (k, v) = row?;
            let (subject, fp) = k.value();
            match serde_json::from_slice::<PairProfile>(v.value()) {
                Ok(p) => {
                    let s = self.subjects.entry(subject.to_owned()).or_default();
                    if s.pairs.insert(fp.to_owned(), p).is_none() {
                        self.pairs += 1;
                    }
                }
                Err(_) => skipped += 1,
            }
        }
        for row in tx.open_table(CREDENTIALS)?.iter()? {
            let (k, v) = row?;
            self.credentials.insert(k.value().to_owned(), v.value());
        }
        if skipped > 0 {
            warn!("baseline store: {skipped} unreadable entries skipped (they are relearned)");
        }
        Ok(())
    }

    pub fn len(&self) -> usize {
        self.pairs
    }

    pub fn is_empty(&self) -> bool {
        self.pairs == 0
    }

    pub fn subjects(&self) -> usize {
        self.subjects.len()
    }

    /// The subject's profile once its learning period is over; `None` while it is still
    /// learning, when it was never seen (it starts learning now) or when learning is off.
    pub fn learned(&self, subject: &str, ts: Timestamp) -> Option<Learned<'_>> {
        if self.learning_ns == 0 {
            return None;
        }
        let s = self.subjects.get(subject)?;
        (ts.unix_nanos() >= s.profile.first_seen.saturating_add(self.learning_ns)).then_some(
            Learned {
                profile: &s.profile,
                pairs: &s.pairs,
            },
        )
    }

    pub fn learning_period(&self) -> Duration {
        Duration::from_nanos(self.learning_ns as u64)
    }

    pub fn credential_last_seen(&self, fp: &str) -> Option<i64> {
        self.credentials.get(fp).copied()
    }

    /// Folds an event into the profiles. Called after the detectors judged it.
    pub fn learn(&mut self, ev: &Event) {
        let relevant = match &ev.body {
            Body::SecretRead(_) | Body::CredentialUse(_) => true,
            Body::PrivChange(p) => p.is_gain(),
            _ => false,
        };
        if !relevant {
            return;
        }
        let ts = ev.ts.unix_nanos();
        let subject_key = subject_of(&ev.workload);
        let learning_ns = self.learning_ns;
        // Looked up once, keys allocated only when new: this runs for every read and use.
        let s = match self.subjects.get_mut(subject_key) {
            Some(s) => s,
            None => self
                .subjects
                .entry(subject_key.to_owned())
                .or_insert_with(|| Subject {
                    profile: SubjectProfile {
                        first_seen: ts,
                        last_seen: ts,
                        ..Default::default()
                    },
                    pairs: HashMap::new(),
                }),
        };
        let learning = ts < s.profile.first_seen.saturating_add(learning_ns);
        s.profile.last_seen = s.profile.last_seen.max(ts);
        let mut new_pair = false;
        match (&ev.body, ev.credential()) {
            (Body::PrivChange(_), _)
                if learning
                    && s.profile.priv_exes.len() < MAX_SET
                    && !s.profile.priv_exes.contains(&ev.process.exe) =>
            {
                s.profile.priv_exes.insert(ev.process.exe.clone());
            }
            (Body::PrivChange(_), _) => {}
            (_, Some(cred)) => {
                let fp = cred.fingerprint.as_str();
                if learning && s.profile.secrets.len() < MAX_SET && !s.profile.secrets.contains(fp)
                {
                    s.profile.secrets.insert(fp.to_owned());
                }
                let p = match s.pairs.get_mut(fp) {
                    Some(p) => p,
                    None => {
                        new_pair = true;
                        s.pairs.entry(fp.to_owned()).or_insert_with(|| PairProfile {
                            first_seen: ts,
                            ..Default::default()
                        })
                    }
                };
                p.last_seen = p.last_seen.max(ts);
                p.uses += 1;
                if learning {
                    if p.exes.len() < MAX_SET && !p.exes.contains(&ev.process.exe) {
                        p.exes.insert(ev.process.exe.clone());
                    }
                    let h = hour_of_week(ev.ts);
                    p.hours[h / 64] |= 1 << (h % 64);
                    if let Some(d) = ev.dst() {
                        for_each_dest_key(d, |k| {
                            if p.destinations.len() < MAX_SET && !p.destinations.contains(k) {
                                p.destinations.insert(k.to_owned());
                            }
                        });
                    }
                }
                match self.credentials.get_mut(fp) {
                    Some(last) => *last = (*last).max(ts),
                    None => {
                        self.credentials.insert(fp.to_owned(), ts);
                    }
                }
                if let Some(st) = &mut self.store
                    && !st.dirty_credentials.contains(fp)
                {
                    st.dirty_credentials.insert(fp.to_owned());
                }
            }
            _ => {}
        }
        if let Some(st) = &mut self.store
            && !st.dirty_subjects.contains(subject_key)
        {
            st.dirty_subjects.insert(subject_key.to_owned());
        }
        if new_pair {
            self.pairs += 1;
            if self.pairs > self.max_entries {
                self.evict();
            }
        }
        if self.credentials.len() > self.max_entries {
            self.evict_credentials();
        }
    }

    /// Drops the least recently active tenth of the pairs (and subjects left without any).
    fn evict(&mut self) {
        let mut all: Vec<(i64, String, String)> = self
            .subjects
            .iter()
            .flat_map(|(s, sub)| {
                sub.pairs
                    .iter()
                    .map(move |(fp, p)| (p.last_seen, s.clone(), fp.clone()))
            })
            .collect();
        all.sort_unstable();
        let n = (self.max_entries / 10).max(self.pairs - self.max_entries);
        for (_, s, fp) in all.into_iter().take(n) {
            let Some(sub) = self.subjects.get_mut(&s) else {
                continue;
            };
            if sub.pairs.remove(&fp).is_some() {
                self.pairs -= 1;
            }
            let empty = sub.pairs.is_empty();
            if let Some(st) = &mut self.store {
                st.gone_pairs.insert((s.clone(), fp));
                if empty {
                    st.dirty_subjects.remove(&s);
                    st.gone_subjects.insert(s.clone());
                }
            }
            if empty {
                self.subjects.remove(&s);
            }
        }
    }

    fn evict_credentials(&mut self) {
        let mut all: Vec<(i64, String)> = self
            .credentials
            .iter()
            .map(|(k, v)| (*v, k.clone()))
            .collect();
        all.sort_unstable();
        for (_, fp) in all.into_iter().take((self.max_entries / 10).max(1)) {
            self.credentials.remove(&fp);
            if let Some(st) = &mut self.store {
                st.dirty_credentials.remove(&fp);
                st.gone_credentials.insert(fp);
            }
        }
    }

    /// Writes what changed since the last checkpoint in one transaction. A failure (full
    /// disk) keeps the changes pending for the next try; memory stays authoritative.
    pub fn checkpoint(&mut self) -> Result<usize> {
        let Some(st) = &mut self.store else {
            return Ok(0);
        };
        let dirty_pairs: usize = st
            .dirty_subjects
            .iter()
            .filter_map(|k| self.subjects.get(k))
            .map(|s| s.pairs.len())
            .sum();
        let written = st.dirty_subjects.len() + dirty_pairs + st.dirty_credentials.len();
        if written == 0
            && st.gone_subjects.is_empty()
            && st.gone_pairs.is_empty()
            && st.gone_credentials.is_empty()
        {
            return Ok(0);
        }
        let write = || -> Result<()> {
            let tx = st.db.begin_write()?;
            {
                let mut t = tx.open_table(SUBJECTS)?;
                for k in &st.dirty_subjects {
                    if let Some(s) = self.subjects.get(k) {
                        t.insert(k.as_str(), serde_json::to_vec(&s.profile)?.as_slice())?;
                    }
                }
                for k in &st.gone_subjects {
                    t.remove(k.as_str())?;
                }
                let mut t = tx.open_table(PAIRS)?;
                for k in &st.dirty_subjects {
                    for (fp, p) in self.subjects.get(k).iter().flat_map(|s| &s.pairs) {
                        t.insert((k.as_str(), fp.as_str()), serde_json::to_vec(p)?.as_slice())?;
                    }
                }
                for (s, fp) in &st.gone_pairs {
                    t.remove((s.as_str(), fp.as_str()))?;
                }
                let mut t = tx.open_table(CREDENTIALS)?;
                for fp in &st.dirty_credentials {
                    if let Some(v) = self.credentials.get(fp) {
                        t.insert(fp.as_str(), *v)?;
                    }
                }
                for fp in &st.gone_credentials {
                    t.remove(fp.as_str())?;
                }
            }
            tx.commit()?;
            Ok(())
        };
        write().with_context(|| format!("writing baseline store {}", st.path.display()))?;
        st.dirty_subjects.clear();
        st.dirty_credentials.clear();
        st.gone_subjects.clear();
        st.gone_pairs.clear();
        st.gone_credentials.clear();
        Ok(written)
    }
}

/// A subject whose learning is over.
pub struct Learned<'a> {
    pub profile: &'a SubjectProfile,
    pairs: &'a HashMap<String, PairProfile>,
}

impl Learned<'_> {
    pub fn pair(&self, fp: &str) -> Option<&PairProfile> {
        self.pairs.get(fp)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::detect::testutil::*;

    const HOUR: i64 = 3600;

    fn connect_use(id: &str, ts_s: i64, fp: &str, port: u16) -> Event {
        let e = read(id, ts_s, pod("payments", "api", "ua"), fp, None);
        used(
            e,
            Destination {
                name: Some("db.internal".into()),
                ..Destination::inet("10.0.0.1".parse().unwrap(), port, "tcp")
            },
        )
    }

    #[test]
    fn destination_keys_are_address_then_name() {
        for ip in [
            "0.0.0.0",
            "10.96.0.1",
            "255.255.255.255",
            "::1",
            "fd00::a:1",
            "::ffff:1.2.3.4",
        ] {
            let ip: IpAddr = ip.parse().unwrap();
            let mut d = Destination::inet(ip, 65535, "udp");
            d.name = Some("db.internal.".into());
            assert_eq!(
                dest_keys(&d),
                [
                    format!("{ip}:65535/udp"),
                    "db.internal:65535/udp".to_owned()
                ]
            );
        }
    }

    #[test]
    fn profiles_are_learned_then_frozen() {
        let mut b = Baselines::in_memory(Duration::from_secs(24 * 3600), 100);
        b.learn(&connect_use("e1", 0, "fpA", 5432));
        assert!(
            b.learned("pod:payments/api", Timestamp::from_unix_nanos(0))
                .is_none()
        );
        // After the learning period a new destination is not folded into the profile.
        b.learn(&connect_use("e2", 25 * HOUR, "fpA", 6379));
        let l = b
            .learned(
                "pod:payments/api",
                Timestamp::from_unix_nanos(25 * HOUR * 1_000_000_000),
            )
            .unwrap();
        let p = l.pair("fpA").unwrap();
        assert_eq!(
            p.destinations.iter().cloned().collect::<Vec<_>>(),
            ["10.0.0.1:5432/tcp", "db.internal:5432/tcp"]
        );
        assert_eq!(p.uses, 2);
        assert!(l.profile.secrets.contains("fpA"));
        assert_eq!(
            b.credential_last_seen("fpA"),
            Some(25 * HOUR * 1_000_000_000)
        );
    }

    #[test]
    fn store_survives_reopen_and_eviction_is_bounded() {
        let dir = tempfile::tempdir().unwrap();
        let day = Duration::from_secs(24 * 3600);
        {
            let mut b = Baselines::open(dir.path(), day, 10).unwrap();
            for i in 0..25 {
                b.learn(&connect_use(&format!("e{i}"), i, &format!("fp{i}"), 443));
            }
            assert!(b.len() <= 10, "bounded: {}", b.len());
            assert!(b.checkpoint().unwrap() > 0);
        }
        let b = Baselines::open(dir.path(), day, 10).unwrap();
        assert!(b.len() <= 10 && !b.is_empty());
        let l = b
            .learned(
                "pod:payments/api",
                Timestamp::from_unix_nanos(2 * 24 * HOUR * 1_000_000_000),
            )
            .unwrap();
        // The most recent survive eviction, the oldest went.
        assert!(l.pair("fp24").is_some() && l.pair("fp0").is_none());
        assert_eq!(b.credential_last_seen("fp24"), Some(24_000_000_000));
    }
}
