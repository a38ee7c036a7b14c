//! Machine dependencies the tasks install themselves, idempotently: Debian packages checked
//! by a file they provide, so a second run touches no network.

use std::{path::Path, process::Command};

use anyhow::{Result, bail};

/// A Debian package and a path it installs (what says it is present).
pub struct Package {
    pub name: &'static str,
    pub provides: &'static str,
}

/// Installs every package whose file is missing, with one `apt-get update` for the lot.
pub fn ensure_debian(packages: &[Package]) -> Result<()> {
    let missing: Vec<&str> = packages
        .iter()
        .filter(|p| !Path::new(p.provides).exists())
        .map(|p| p.name)
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    eprintln!("xtask: installing Debian packages {}", missing.join(" "));
    let _ = Command::new("apt-get")
        .args(["update", "-qq"])
        .env("DEBIAN_FRONTEND", "noninteractive")
        .status();
    let ok = Command::new("apt-get")
        .args(["install", "-y", "-qq", "--no-install-recommends"])
        .args(&missing)
        .env("DEBIAN_FRONTEND", "noninteractive")
        .status()
        .is_ok_and(|s| s.success());
    let still: Vec<&str> = packages
        .iter()
        .filter(|p| !Path::new(p.provides).exists())
        .map(|p| p.name)
        .collect();
    if !ok || !still.is_empty() {
        bail!(
            "could not install Debian packages {} (apt-get needs root and the Debian registry)",
            still.join(" ")
        );
    }
    Ok(())
}
