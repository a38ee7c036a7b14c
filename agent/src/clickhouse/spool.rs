//! On-disk spool for batches ClickHouse could not take: one file per batch under
//! `<state dir>/spool`, written to a temporary name, synced, then renamed, so a kill -9
//! leaves either the whole batch or nothing. The file keeps the batch's dedup token, so a
//! batch whose insert was applied but whose response was lost is deduplicated when it is
//! sent again. Files are replayed oldest first; the size bound drops the oldest (or refuses
//! the newest) batch and counts its rows.

use std::{
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

#[derive(Debug, Serialize, Deserialize)]
struct Header {
    table: TableKind,
    token: String,
    rows: usize,
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
}

pub struct Spool {
    dir: PathBuf,
    entries: std::collections::VecDeque<SpoolEntry>,
    bytes: u64,
    max_bytes: u64,
    policy: SpoolFull,
    next_seq: u64,
    /// Rows lost to the size bound (or to unreadable files), ever.
    pub dropped_rows: u64,
}

/// `00000000000000000042-events-1000.batch`
fn parse_name(name: &str) -> Option<(u64, TableKind, usize)> {
    let stem = name.strip_suffix(".batch")?;
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
                });
            }
        }
        entries.sort_by_key(|e| e.seq);
        let next_seq = entries.last().map(|e| e.seq + 1).unwrap_or(0);
        let bytes = entries.iter().map(|e| e.bytes).sum();
        Ok(Spool {
            dir: dir.to_owned(),
            entries: entries.into(),
            bytes,
            max_bytes,
            policy,
            next_seq,
            dropped_rows: 0,
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

    /// Stores a batch. Errors (full disk) leave the spool as it was; the caller counts the
    /// rows as dropped.
    pub fn push<T: Serialize>(&mut self, table: TableKind, token: &str, rows: &[T]) -> Result<()> {
        let seq = self.next_seq;
        let name = format!("{seq:020}-{}-{}.batch", table.as_str(), rows.len());
        let path = self.dir.join(&name);
        let tmp = self.dir.join(format!("{name}.tmp"));
        let write = || -> Result<u64> {
            let f = fs::File::create(&tmp)?;
            let mut w = BufWriter::with_capacity(1 << 20, f);
            serde_json::to_writer(
                &mut w,
                &Header {
                    table,
                    token: token.to_owned(),
                    rows: rows.len(),
                },
            )?;
            w.write_all(b"\n")?;
            for r in rows {
                serde_json::to_writer(&mut w, r)?;
                w.write_all(b"\n")?;
            }
            let f = w.into_inner().map_err(|e| e.into_error())?;
            f.sync_all()?;
            let len = f.metadata()?.len();
            fs::rename(&tmp, &path)?;
            Ok(len)
        };
        let bytes = match write() {
            Ok(b) => b,
            Err(e) => {
                let _ = fs::remove_file(&tmp);
                return Err(e.context(format!("spooling a batch to {}", self.dir.display())));
            }
        };
        self.next_seq += 1;
        self.entries.push_back(SpoolEntry {
            path,
            seq,
            table,
            rows: rows.len(),
            bytes,
            created: std::time::SystemTime::now(),
        });
        self.bytes += bytes;
        while self.bytes > self.max_bytes && self.entries.len() > 1 {
            let victim = match self.policy {
                SpoolFull::DropOldest => self.entries.pop_front(),
                SpoolFull::DropNewest => self.entries.pop_back(),
            };
            let Some(v) = victim else { break };
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

    /// Reads the oldest batch: its token and rows.
    pub fn read_oldest<T: DeserializeOwned>(&self) -> Result<Option<(String, Vec<T>)>> {
        let Some(e) = self.entries.front() else {
            return Ok(None);
        };
        let f = fs::File::open(&e.path).with_context(|| format!("{}", e.path.display()))?;
        let mut lines = BufReader::with_capacity(1 << 20, f).lines();
        let header: Header = match lines.next() {
            Some(l) => serde_json::from_str(&l?)?,
            None => bail!("{}: empty spool file", e.path.display()),
        };
        let mut rows = Vec::with_capacity(header.rows);
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
        Ok(Some((header.token, rows)))
    }

    /// Forgets the oldest batch: delivered, or unreadable (then its rows count as dropped).
    pub fn pop_oldest(&mut self, delivered: bool) {
        if let Some(e) = self.entries.pop_front() {
            let _ = fs::remove_file(&e.path);
            self.bytes -= e.bytes;
            if !delivered {
                self.dropped_rows += e.rows as u64;
            }
        }
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
            s.push(TableKind::Events, "t0", &[1u32, 2, 3]).unwrap();
            s.push(TableKind::Alerts, "t1", &[4u32]).unwrap();
            // A torn write from a crash.
            fs::write(
                dir.path().join("00000000000000000009-events-5.batch.tmp"),
                "x",
            )
            .unwrap();
        }
        let mut s = Spool::open(dir.path(), 1 << 20, SpoolFull::DropOldest).unwrap();
        assert_eq!((s.len(), s.rows()), (2, 4));
        let (tok, rows) = s.read_oldest::<u32>().unwrap().unwrap();
        assert_eq!((tok.as_str(), rows), ("t0", vec![1, 2, 3]));
        s.pop_oldest(true);
        assert_eq!(s.oldest().unwrap().table, TableKind::Alerts);
        // Bound: each file is ~40 bytes; a 100-byte spool keeps the newest two.
        let mut small = Spool::open(&dir.path().join("b"), 100, SpoolFull::DropOldest).unwrap();
        for i in 0..5u32 {
            small
                .push(TableKind::Events, &format!("k{i}"), &[i])
                .unwrap();
        }
        assert!(small.bytes() <= 100);
        assert_eq!(small.dropped_rows as usize + small.rows(), 5);
        let (tok, _) = small.read_oldest::<u32>().unwrap().unwrap();
        assert_ne!(tok, "k0", "oldest went first");
    }
}
