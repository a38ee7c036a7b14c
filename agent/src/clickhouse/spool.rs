//! On-disk spool for batches ClickHouse could not take: one file per batch under
//! `<state dir>/spool`, written to a temporary name, synced, renamed, and the directory
//! synced, so a kill -9 or a power cut leaves either the whole batch or nothing. The file
//! keeps the batch's dedup token, so a batch whose insert was applied but whose response was
//! lost is deduplicated when it is sent again. Files are replayed oldest first; the size
//! bound drops event batches before alert batches (the oldest, or the newest, per policy)
//! and counts their rows.
//!
//! A batch ClickHouse refuses for good (its data cannot be parsed), and a file that cannot
//! be read back (corrupt), go to `<spool>/quarantine/` instead of blocking the head of the
//! spool: kept for an operator, counted, logged, bounded in size too.

use std::{
    collections::VecDeque,
    fs,
    io::{BufRead, BufReader, BufWriter, Write},
    path::{Path, PathBuf},
};

use anyhow::{Context, Result, bail};
use serde::{Deserialize, Serialize, de::DeserializeOwned};

use crate::clickhouse::SpoolFull;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TableKind {
    Events,
    Alerts,
}

impl TableKind {
    pub fn as_str(self) -> &'static str {
        match self {
            TableKind::Events => "events",
            TableKind::Alerts => "alerts",
        }
    }
}

fn yes() -> bool {
    true
}

#[derive(Debug, Serialize, Deserialize)]
struct Header {
    table: TableKind,
    token: String,
    /// Written by the writer; only a hint when read back (never trusted for an allocation).
    rows: usize,
    /// An insert of this batch was tried and may have been applied (files from before this
    /// field: assume so).
    #[serde(default = "yes")]
    attempted: bool,
}

/// A spooled batch as read back.
pub struct SpooledBatch<T> {
    pub token: String,
    pub rows: Vec<T>,
    pub attempted: bool,
}

/// A spooled batch, as found on disk.
#[derive(Debug, Clone)]
pub struct SpoolEntry {
    pub path: PathBuf,
    pub seq: u64,
    pub table: TableKind,
    pub rows: usize,
    pub bytes: u64,
    /// When it was spooled (file mtime after a restart): ClickHouse lag.
    pub created: std::time::SystemTime,
    /// An insert of it from the spool was tried.
    pub tried: bool,
}

pub struct Spool {
    dir: PathBuf,
    entries: VecDeque<SpoolEntry>,
    bytes: u64,
    max_bytes: u64,
    policy: SpoolFull,
    next_seq: u64,
    /// Rows lost to the size bound, ever.
    pub dropped_rows: u64,
    quarantine: Quarantine,
}

/// `<spool>/quarantine`: batches set aside, oldest dropped past its bound.
struct Quarantine {
    dir: PathBuf,
    files: VecDeque<(PathBuf, u64, usize)>,
    bytes: u64,
    max_bytes: u64,
    /// Batches and rows set aside, ever; rows of set-aside batches dropped by the bound.
    batches: u64,
    rows: u64,
    dropped_rows: u64,
}

/// `00000000000000000042-events-1000.batch`, `….tried.batch` once an insert of it from the
/// spool was tried (it may be in ClickHouse: the writer checks before sending it again).
fn parse_name(name: &str) -> Option<(u64, TableKind, usize)> {
    let stem = name.strip_suffix(".batch")?;
    let stem = stem.strip_suffix(".tried").unwrap_or(stem);
    let mut it = stem.splitn(3, '-');
    let seq = it.next()?.parse().ok()?;
    let table = match it.next()? {
        "events" => TableKind::Events,
        "alerts" => TableKind::Alerts,
        _ => return None,
    };
    let rows = it.next()?.parse().ok()?;
    Some((seq, table, rows))
}

/// Makes a rename or removal in `dir` durable.
fn sync_dir(dir: &Path) -> std::io::Result<()> {
    fs::File::open(dir)?.sync_all()
}

/// Writes a batch file to `dir/name` (temporary name, sync, rename, directory sync).
fn write_batch<T: Serialize>(dir: &Path, name: &str, header: &Header, rows: &[T]) -> Result<u64> {
    let path = dir.join(name);
    let tmp = dir.join(format!("{name}.tmp"));
    let write = || -> Result<u64> {
        let f = fs::File::create(&tmp)?;
        let mut w = BufWriter::with_capacity(1 << 20, f);
        serde_json::to_writer(&mut w, header)?;
        w.write_all(b"\n")?;
        for r in rows {
            serde_json::to_writer(&mut w, r)?;
            w.write_all(b"\n")?;
        }
        let f = w.into_inner().map_err(|e| e.into_error())?;
        f.sync_all()?;
        let len = f.metadata()?.len();
        fs::rename(&tmp, &path)?;
        sync_dir(dir)?;
        Ok(len)
    };
    write().inspect_err(|_| {
        let _ = fs::remove_file(&tmp);
    })
}

/// Rows read back are allocated as they are parsed, at most this many up front.
const PREALLOC_ROWS: usize = 4096;

impl Quarantine {
    fn open(dir: PathBuf, max_bytes: u64) -> Result<Self> {
        fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        let mut files: Vec<(PathBuf, u64, usize)> = Vec::new();
        for e in fs::read_dir(&dir)? {
            let e = e?;
            let name = e.file_name();
            let Some(name) = name.to_str() else { continue };
            if name.ends_with(".tmp") {
                let _ = fs::remove_file(e.path());
                continue;
            }
            let rows = parse_name(name).map(|(_, _, r)| r).unwrap_or(0);
            files.push((e.path(), e.metadata().map(|m| m.len()).unwrap_or(0), rows));
        }
        files.sort();
        let bytes = files.iter().map(|f| f.1).sum();
        Ok(Quarantine {
            dir,
            files: files.into(),
            bytes,
            max_bytes,
            batches: 0,
            rows: 0,
            dropped_rows: 0,
        })
    }

    fn added(&mut self, path: PathBuf, bytes: u64, rows: usize) {
        self.files.push_back((path, bytes, rows));
        self.bytes += bytes;
        self.batches += 1;
        self.rows += rows as u64;
        while self.bytes > self.max_bytes && self.files.len() > 1 {
            let Some((p, b, r)) = self.files.pop_front() else {
                break;
            };
            let _ = fs::remove_file(&p);
            self.bytes -= b;
            self.dropped_rows += r as u64;
            tracing::error!(
                rows = r,
                "ClickHouse quarantine full ({} bytes): dropped its oldest batch",
                self.max_bytes
            );
        }
    }
}

impl Spool {
    pub fn open(dir: &Path, max_bytes: u64, policy: SpoolFull) -> Result<Self> {
        fs::create_dir_all(dir).with_context(|| format!("creating spool {}", dir.display()))?;
        let mut entries = Vec::new();
        for e in fs::read_dir(dir).with_context(|| format!("reading spool {}", dir.display()))? {
            let e = e?;
            let name = e.file_name();
            let Some(name) = name.to_str() else { continue };
            if name.ends_with(".tmp") {
                // A write interrupted before its rename: never acknowledged, never complete.
                let _ = fs::remove_file(e.path());
                continue;
            }
            if let Some((seq, table, rows)) = parse_name(name) {
                let meta = e.metadata().ok();
                entries.push(SpoolEntry {
                    path: e.path(),
                    seq,
                    table,
                    rows,
                    bytes: meta.as_ref().map(|m| m.len()).unwrap_or(0),
                    created: meta
                        .and_then(|m| m.modified().ok())
                        .unwrap_or_else(std::time::SystemTime::now),
                    tried: name.ends_with(".tried.batch"),
                });
            }
        }
        entries.sort_by_key(|e| e.seq);
        let next_seq = entries.last().map(|e| e.seq + 1).unwrap_or(0);
        let bytes = entries.iter().map(|e| e.bytes).sum();
        let quarantine = Quarantine::open(dir.join("quarantine"), (max_bytes / 4).max(1 << 20))?;
        Ok(Spool {
            dir: dir.to_owned(),
            entries: entries.into(),
            bytes,
            max_bytes,
            policy,
            next_seq,
            dropped_rows: 0,
            quarantine,
        })
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn bytes(&self) -> u64 {
        self.bytes
    }

    pub fn rows(&self) -> usize {
        self.entries.iter().map(|e| e.rows).sum()
    }

    pub fn oldest(&self) -> Option<&SpoolEntry> {
        self.entries.front()
    }

    /// (batches, rows) set aside in the quarantine, ever, and rows its bound dropped.
    pub fn quarantined(&self) -> (u64, u64, u64) {
        (
            self.quarantine.batches,
            self.quarantine.rows,
            self.quarantine.dropped_rows,
        )
    }

    /// Stores a batch. `attempted`: an insert of it was tried (it may be in ClickHouse
    /// already). Errors (full disk) leave the spool as it was; the caller counts the rows as
    /// dropped.
    pub fn push<T: Serialize>(
        &mut self,
        table: TableKind,
        token: &str,
        rows: &[T],
        attempted: bool,
    ) -> Result<()> {
        let seq = self.next_seq;
        let name = format!("{seq:020}-{}-{}.batch", table.as_str(), rows.len());
        let header = Header {
            table,
            token: token.to_owned(),
            rows: rows.len(),
            attempted,
        };
        let bytes = write_batch(&self.dir, &name, &header, rows)
            .with_context(|| format!("spooling a batch to {}", self.dir.display()))?;
        self.next_seq += 1;
        self.entries.push_back(SpoolEntry {
            path: self.dir.join(&name),
            seq,
            table,
            rows: rows.len(),
            bytes,
            created: std::time::SystemTime::now(),
            tried: false,
        });
        self.bytes += bytes;
        while self.bytes > self.max_bytes && self.entries.len() > 1 {
            let Some(i) = self.victim() else { break };
            let Some(v) = self.entries.remove(i) else {
                break;
            };
            let _ = fs::remove_file(&v.path);
            self.bytes -= v.bytes;
            self.dropped_rows += v.rows as u64;
            tracing::error!(
                rows = v.rows,
                table = v.table.as_str(),
                "ClickHouse spool full ({} bytes): dropped a batch",
                self.max_bytes
            );
        }
        Ok(())
    }

    /// Which batch the size bound drops: events before alerts, then per policy.
    fn victim(&self) -> Option<usize> {
        let pick = |table: TableKind| -> Option<usize> {
            let mut it = self
                .entries
                .iter()
                .enumerate()
                .filter(|(_, e)| e.table == table)
                .map(|(i, _)| i);
            match self.policy {
                SpoolFull::DropOldest => it.next(),
                SpoolFull::DropNewest => it.next_back(),
            }
        };
        pick(TableKind::Events).or_else(|| pick(TableKind::Alerts))
    }

    /// Reads the oldest batch: its token and rows.
    pub fn read_oldest<T: DeserializeOwned>(&self) -> Result<Option<SpooledBatch<T>>> {
        let Some(e) = self.entries.front() else {
            return Ok(None);
        };
        let f = fs::File::open(&e.path).with_context(|| format!("{}", e.path.display()))?;
        let mut lines = BufReader::with_capacity(1 << 20, f).lines();
        let header: Header = match lines.next() {
            Some(l) => serde_json::from_str(&l?)?,
            None => bail!("{}: empty spool file", e.path.display()),
        };
        if header.table != e.table {
            bail!(
                "{}: header says table {}",
                e.path.display(),
                header.table.as_str()
            );
        }
        // The header's count is what the file claims; the rows are what it has.
        let mut rows = Vec::with_capacity(header.rows.min(PREALLOC_ROWS));
        for l in lines {
            rows.push(serde_json::from_str(&l?)?);
        }
        if rows.len() != header.rows {
            bail!(
                "{}: {} rows, header says {}",
                e.path.display(),
                rows.len(),
                header.rows
            );
        }
        Ok(Some(SpooledBatch {
            token: header.token,
            rows,
            attempted: header.attempted || e.tried,
        }))
    }

    /// Records, durably, that an insert of the oldest batch is about to be tried: after a
    /// crash the next run checks whether it landed before sending it again.
    pub fn mark_oldest_tried(&mut self) -> Result<()> {
        let Some(e) = self.entries.front_mut() else {
            return Ok(());
        };
        if e.tried {
            return Ok(());
        }
        let name = e
            .path
            .file_name()
            .and_then(|n| n.to_str())
            .and_then(|n| n.strip_suffix(".batch"))
            .map(|stem| format!("{stem}.tried.batch"))
            .context("spool file name")?;
        let to = self.dir.join(name);
        fs::rename(&e.path, &to)?;
        sync_dir(&self.dir)?;
        e.path = to;
        e.tried = true;
        Ok(())
    }

    /// Forgets the oldest batch: delivered.
    pub fn pop_oldest(&mut self) {
        if let Some(e) = self.entries.pop_front() {
            let _ = fs::remove_file(&e.path);
            let _ = sync_dir(&self.dir);
            self.bytes -= e.bytes;
        }
    }

    /// Moves the oldest batch to the quarantine (refused for good, or unreadable).
    pub fn quarantine_oldest(&mut self, why: &str) {
        let Some(e) = self.entries.pop_front() else {
            return;
        };
        self.bytes -= e.bytes;
        let name = e.path.file_name().map(PathBuf::from).unwrap_or_default();
        let to = self.quarantine.dir.join(&name);
        match fs::rename(&e.path, &to)
            .and_then(|_| sync_dir(&self.dir))
            .and_then(|_| sync_dir(&self.quarantine.dir))
        {
            Ok(()) => {
                tracing::error!(
                    rows = e.rows,
                    table = e.table.as_str(),
                    file = %to.display(),
                    "ClickHouse batch quarantined: {why}"
                );
                self.quarantine.added(to, e.bytes, e.rows);
            }
            Err(err) => {
                tracing::error!(
                    rows = e.rows,
                    "ClickHouse batch {why}, and it could not be quarantined ({err}): dropped"
                );
                let _ = fs::remove_file(&e.path);
                self.dropped_rows += e.rows as u64;
            }
        }
    }

    /// Sets aside a batch that never was in the spool (refused for good at its first
    /// insert).
    pub fn quarantine_rows<T: Serialize>(
        &mut self,
        table: TableKind,
        token: &str,
        rows: &[T],
        why: &str,
    ) -> Result<()> {
        let seq = self.next_seq;
        self.next_seq += 1;
        let name = format!("{seq:020}-{}-{}.batch", table.as_str(), rows.len());
        let header = Header {
            table,
            token: token.to_owned(),
            rows: rows.len(),
            attempted: true,
        };
        let bytes = write_batch(&self.quarantine.dir, &name, &header, rows)?;
        tracing::error!(
            rows = rows.len(),
            table = table.as_str(),
            file = %self.quarantine.dir.join(&name).display(),
            "ClickHouse batch quarantined: {why}"
        );
        self.quarantine
            .added(self.quarantine.dir.join(&name), bytes, rows.len());
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn batches_survive_reopen_in_order_and_the_bound_drops_oldest() {
        let dir = tempfile::tempdir().unwrap();
        {
            let mut s = Spool::open(dir.path(), 1 << 20, SpoolFull::DropOldest).unwrap();
            s.push(TableKind::Events, "t0", &[1u32, 2, 3], false)
                .unwrap();
            s.push(TableKind::Alerts, "t1", &[4u32], true).unwrap();
            // A torn write from a crash.
            fs::write(
                dir.path().join("00000000000000000009-events-5.batch.tmp"),
                "x",
            )
            .unwrap();
        }
        let mut s = Spool::open(dir.path(), 1 << 20, SpoolFull::DropOldest).unwrap();
        assert_eq!((s.len(), s.rows()), (2, 4));
        let b = s.read_oldest::<u32>().unwrap().unwrap();
        assert_eq!(
            (b.token.as_str(), b.rows, b.attempted),
            ("t0", vec![1, 2, 3], false)
        );
        s.pop_oldest();
        assert_eq!(s.oldest().unwrap().table, TableKind::Alerts);
        assert!(s.read_oldest::<u32>().unwrap().unwrap().attempted);
        // Tried from the spool: remembered across a restart.
        s.pop_oldest();
        s.push(TableKind::Events, "t2", &[5u32], false).unwrap();
        assert!(!s.read_oldest::<u32>().unwrap().unwrap().attempted);
        s.mark_oldest_tried().unwrap();
        let s = Spool::open(dir.path(), 1 << 20, SpoolFull::DropOldest).unwrap();
        let b = s.read_oldest::<u32>().unwrap().unwrap();
        assert_eq!((b.token.as_str(), b.attempted), ("t2", true));
        // Bound: each file is ~60 bytes; a 150-byte spool keeps the newest two.
        let mut small = Spool::open(&dir.path().join("b"), 150, SpoolFull::DropOldest).unwrap();
        for i in 0..5u32 {
            small
                .push(TableKind::Events, &format!("k{i}"), &[i], false)
                .unwrap();
        }
        assert!(small.bytes() <= 150);
        assert_eq!(small.dropped_rows as usize + small.rows(), 5);
        let b = small.read_oldest::<u32>().unwrap().unwrap();
        assert_ne!(b.token, "k0", "oldest went first");
    }

    /// Alert batches outlive event batches when the spool is full, whatever the policy.
    #[test]
    fn the_bound_drops_event_batches_before_alert_batches() {
        for policy in [SpoolFull::DropOldest, SpoolFull::DropNewest] {
            let dir = tempfile::tempdir().unwrap();
            let mut s = Spool::open(dir.path(), 400, policy).unwrap();
            s.push(TableKind::Alerts, "a0", &[0u32], false).unwrap();
            for i in 0..20u32 {
                s.push(TableKind::Events, &format!("e{i}"), &[i], false)
                    .unwrap();
            }
            s.push(TableKind::Alerts, "a1", &[1u32], false).unwrap();
            let tables: Vec<TableKind> = s.entries.iter().map(|e| e.table).collect();
            assert_eq!(
                tables.iter().filter(|t| **t == TableKind::Alerts).count(),
                2,
                "{policy:?}: {tables:?}"
            );
            assert!(s.dropped_rows > 0);
        }
    }

    /// A corrupt file (a header claiming 2^60 rows, garbage after it) is an error, not an
    /// allocation of the header's count; quarantined, it stops blocking the spool's head.
    #[test]
    fn a_corrupt_spool_file_is_an_error_and_goes_to_the_quarantine() {
        let dir = tempfile::tempdir().unwrap();
        fs::write(
            dir.path().join("00000000000000000001-events-3.batch"),
            format!(
                "{{\"table\":\"events\",\"token\":\"t\",\"rows\":{}}}\n[1]\n\x01garbage\n",
                1u64 << 60
            ),
        )
        .unwrap();
        let mut s = Spool::open(dir.path(), 1 << 20, SpoolFull::DropOldest).unwrap();
        s.push(TableKind::Events, "good", &[7u32], false).unwrap();
        assert!(s.read_oldest::<u32>().is_err());
        s.quarantine_oldest("unreadable");
        assert_eq!(s.quarantined(), (1, 3, 0));
        assert!(
            dir.path()
                .join("quarantine/00000000000000000001-events-3.batch")
                .exists()
        );
        let b = s.read_oldest::<u32>().unwrap().unwrap();
        assert_eq!(b.token, "good");
        // The quarantine is not replayed after a restart.
        let s = Spool::open(dir.path(), 1 << 20, SpoolFull::DropOldest).unwrap();
        assert_eq!(s.len(), 1);
    }
}
