//! The agent's state directory and the files in it: private to the agent whatever the
//! umask it was started with (events, spooled rows, baselines and the fingerprint key are
//! all sensitive), and written so a crash leaves the old version or the new, never half.

use std::{
    fs,
    io::Write,
    os::unix::fs::{OpenOptionsExt, PermissionsExt},
    path::Path,
};

use anyhow::{Context, Result, bail};

/// Files the agent creates are for the agent alone. Set once at start, before any file is
/// created (redb, the spool and the sinks open files without a mode of their own).
pub fn private_umask() {
    // SAFETY: umask only sets the process's file mode creation mask.
    unsafe { libc::umask(0o077) };
}

/// Creates `dir` (and parents) and makes it 0700. A state dir others can enter is refused:
/// the fingerprint key and the baselines in it must not be readable by workloads.
pub fn ensure_dir(dir: &Path) -> Result<()> {
    fs::create_dir_all(dir).with_context(|| format!("creating state dir {}", dir.display()))?;
    fs::set_permissions(dir, fs::Permissions::from_mode(0o700))
        .with_context(|| format!("making state dir {} private (chmod 0700)", dir.display()))?;
    let mode = fs::metadata(dir)
        .with_context(|| format!("reading state dir {}", dir.display()))?
        .permissions()
        .mode();
    if mode & 0o077 != 0 {
        bail!(
            "state dir {} is still mode {:o} after chmod 0700 (a filesystem without \
             permissions?); refusing to keep the fingerprint key there",
            dir.display(),
            mode & 0o777
        );
    }
    Ok(())
}

/// Writes `bytes` to `path` atomically and durably: a private temporary file in the same
/// directory, fsynced, renamed over `path`, then the directory fsynced so the rename
/// survives a crash.
pub fn write_private(path: &Path, bytes: &[u8]) -> Result<()> {
    replace(path, bytes, true)
}

/// Like [`write_private`]; `durable = false` skips the fsyncs (a file rewritten every
/// second, where the previous version is as good after a crash).
pub fn replace(path: &Path, bytes: &[u8], durable: bool) -> Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let tmp = path.with_extension(format!("tmp.{}", std::process::id()));
    let write = || -> std::io::Result<()> {
        let mut f = fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&tmp)?;
        f.write_all(bytes)?;
        if durable {
            f.sync_all()?;
        }
        fs::rename(&tmp, path)?;
        if durable {
            sync_dir(dir)?;
        }
        Ok(())
    };
    write().map_err(|e| {
        let _ = fs::remove_file(&tmp);
        anyhow::Error::new(e).context(format!("writing {}", path.display()))
    })
}

/// fsync of a directory: makes renames and creations in it durable.
pub fn sync_dir(dir: &Path) -> std::io::Result<()> {
    fs::File::open(dir)?.sync_all()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn state_files_are_private_and_replaced_whole() {
        let d = tempfile::tempdir().unwrap();
        let dir = d.path().join("state");
        ensure_dir(&dir).unwrap();
        assert_eq!(
            fs::metadata(&dir).unwrap().permissions().mode() & 0o777,
            0o700
        );
        let f = dir.join("key");
        write_private(&f, b"one").unwrap();
        write_private(&f, b"two").unwrap();
        assert_eq!(fs::read(&f).unwrap(), b"two");
        assert_eq!(
            fs::metadata(&f).unwrap().permissions().mode() & 0o777,
            0o600
        );
        assert_eq!(fs::read_dir(&dir).unwrap().count(), 1, "no temporary left");
    }
}
