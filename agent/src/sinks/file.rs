//! Alerts as lines in a file, rotated by size: `alerts.jsonl` → `alerts.jsonl.1` → … →
//! `alerts.jsonl.<keep>` (the oldest is deleted). A failed write is counted by the caller
//! and retried on the next line (the file is reopened), never fatal.

use std::{
    fs::{self, File, OpenOptions},
    io::{BufWriter, Write},
    path::PathBuf,
};

use anyhow::{Context, Result};

use serde::Deserialize;

use super::AlertFormat;
use crate::{
    alert::Alert,
    config::{Checker, Validate},
};

/// `[[alerts.file]]`: JSON lines to a file, rotated by size (`alerts.jsonl` →
/// `alerts.jsonl.1` …).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    pub path: String,
    #[serde(default)]
    pub format: AlertFormat,
    #[serde(default = "default_rotate_bytes")]
    pub max_bytes: u64,
    /// Rotated files kept.
    #[serde(default = "default_keep")]
    pub keep: usize,
}

fn default_rotate_bytes() -> u64 {
    100 << 20
}
fn default_keep() -> usize {
    5
}

impl Validate for Config {
    fn validate(&self, c: &mut Checker) {
        c.check(
            self.path.starts_with('/'),
            "path",
            "must be an absolute path",
        );
        c.check(self.max_bytes > 0, "max_bytes", "must be at least 1");
    }
}

pub struct RotatingFile {
    path: PathBuf,
    format: AlertFormat,
    max_bytes: u64,
    keep: usize,
    out: Option<BufWriter<File>>,
    size: u64,
}

fn open(path: &PathBuf) -> std::io::Result<(BufWriter<File>, u64)> {
    let f = OpenOptions::new().create(true).append(true).open(path)?;
    let size = f.metadata()?.len();
    Ok((BufWriter::new(f), size))
}

impl RotatingFile {
    pub fn open(cfg: &Config) -> Result<Self> {
        let path = PathBuf::from(&cfg.path);
        if let Some(dir) = path.parent() {
            fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        }
        let (out, size) = open(&path).with_context(|| format!("opening {}", path.display()))?;
        Ok(RotatingFile {
            path,
            format: cfg.format,
            max_bytes: cfg.max_bytes,
            keep: cfg.keep,
            out: Some(out),
            size,
        })
    }

    pub fn path(&self) -> String {
        self.path.display().to_string()
    }

    pub fn write(&mut self, a: &Alert) -> std::io::Result<()> {
        let mut line = super::render(a, self.format);
        line.push(b'\n');
        if self.size > 0 && self.size + line.len() as u64 > self.max_bytes {
            self.rotate()?;
        }
        if self.out.is_none() {
            let (o, s) = open(&self.path)?;
            self.out = Some(o);
            self.size = s;
        }
        let out = self.out.as_mut().expect("opened above");
        match out.write_all(&line) {
            Ok(()) => {
                self.size += line.len() as u64;
                Ok(())
            }
            Err(e) => {
                // Reopen next time (the disk may have been freed, the file removed).
                self.out = None;
                Err(e)
            }
        }
    }

    pub fn flush(&mut self) -> std::io::Result<()> {
        match self.out.as_mut() {
            Some(o) => o.flush(),
            None => Ok(()),
        }
    }

    fn rotate(&mut self) -> std::io::Result<()> {
        if let Some(mut o) = self.out.take() {
            o.flush()?;
        }
        let name = |n: usize| {
            let mut p = self.path.clone().into_os_string();
            p.push(format!(".{n}"));
            PathBuf::from(p)
        };
        if self.keep == 0 {
            fs::remove_file(&self.path)?;
        } else {
            let _ = fs::remove_file(name(self.keep));
            for n in (1..self.keep).rev() {
                let _ = fs::rename(name(n), name(n + 1));
            }
            fs::rename(&self.path, name(1))?;
        }
        let (o, s) = open(&self.path)?;
        self.out = Some(o);
        self.size = s;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        alert::{AlertKind, Severity},
        detect::testutil::*,
    };

    #[test]
    fn rotates_by_size_and_keeps_n() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("alerts.jsonl");
        let mut f = RotatingFile::open(&Config {
            path: path.display().to_string(),
            format: AlertFormat::Json,
            max_bytes: 2000,
            keep: 2,
        })
        .unwrap();
        let ev = read("e1", 0, pod("a", "p", "u"), "fp", None);
        let a = Alert::about(
            AlertKind::HumanUse,
            Severity::High,
            &ev,
            ev.credential().unwrap(),
            "s".into(),
            vec![],
            "k".into(),
        );
        for _ in 0..20 {
            f.write(&a).unwrap();
        }
        f.flush().unwrap();
        let size = |p: &std::path::Path| fs::metadata(p).map(|m| m.len()).unwrap_or(0);
        assert!(size(&path) <= 2000 && size(&path) > 0);
        assert!(size(&dir.path().join("alerts.jsonl.1")) > 0);
        assert!(size(&dir.path().join("alerts.jsonl.2")) > 0);
        assert!(!dir.path().join("alerts.jsonl.3").exists(), "keep = 2");
        for l in fs::read_to_string(&path).unwrap().lines() {
            let back: Alert = serde_json::from_str(l).unwrap();
            assert_eq!(back, a);
        }
    }
}
