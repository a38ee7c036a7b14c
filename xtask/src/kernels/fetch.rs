//! Distro kernels for the matrix, from Debian's registry through a private apt index (the
//! machine's own sources are never touched): the newest package of each line, downloaded,
//! checked against the index's SHA256, unpacked to the kernel image, its config and the
//! virtio/9p modules the guest needs (with their dependencies, decompressed). Everything is
//! cached under the prefix; a cached kernel is used without touching the network.

use std::{
    collections::{BTreeMap, BTreeSet},
    fs,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context, Result, bail};
use serde::{Deserialize, Serialize};

use super::elf;

/// One line of the matrix: a Debian package name pattern `<prefix><digits><suffix>`.
pub struct KernelSpec {
    pub key: &'static str,
    /// Where Debian publishes it (informational; the private index holds all suites).
    pub suite: &'static str,
    prefix: &'static str,
    suffix: &'static str,
}

pub const MATRIX: &[KernelSpec] = &[
    KernelSpec {
        key: "5.10",
        suite: "bullseye",
        prefix: "linux-image-5.10.0-",
        suffix: "-amd64",
    },
    KernelSpec {
        key: "6.1",
        suite: "bookworm",
        prefix: "linux-image-6.1.0-",
        suffix: "-amd64",
    },
    KernelSpec {
        key: "6.12",
        suite: "bookworm-backports",
        prefix: "linux-image-6.12.",
        suffix: "+deb12-amd64",
    },
];

impl KernelSpec {
    fn matches(&self, package: &str) -> bool {
        package
            .strip_prefix(self.prefix)
            .and_then(|r| r.strip_suffix(self.suffix))
            .is_some_and(|m| !m.is_empty() && m.bytes().all(|b| b.is_ascii_digit()))
    }
}

/// Debian suites the private index covers. The security suites carry the newest builds of
/// a stable release's kernel.
const SOURCES: &str = "\
deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] http://deb.debian.org/debian bullseye main
deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] http://deb.debian.org/debian-security bullseye-security main
deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] http://deb.debian.org/debian bookworm main
deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] http://deb.debian.org/debian bookworm-updates main
deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] http://deb.debian.org/debian-security bookworm-security main
deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] http://deb.debian.org/debian bookworm-backports main
";

/// Modules the guest loads from the initramfs (plus what they depend on), unless built in.
const GUEST_MODULES: &[&str] = &["virtio_pci", "9pnet_virtio", "9p"];

/// A cached kernel: what was downloaded, and where its pieces are.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Kernel {
    pub key: String,
    pub package: String,
    pub version: String,
    /// SHA256 of the .deb, as the signed index gives it and as checked after download.
    pub sha256: String,
    pub size: u64,
    pub filename: String,
    /// `uname -r` of the image.
    pub release: String,
    /// Modules to insmod, in order (files `modules/<name>.ko`).
    pub modules: Vec<String>,
    #[serde(skip)]
    pub dir: PathBuf,
}

impl Kernel {
    pub fn vmlinuz(&self) -> PathBuf {
        self.dir.join("vmlinuz")
    }
}

/// The private apt index; `update` runs at most once per process.
pub struct Registry {
    root: PathBuf,
    updated: bool,
}

impl Registry {
    pub fn new(cache: &Path) -> Registry {
        Registry {
            root: cache.join("apt"),
            updated: false,
        }
    }

    fn apt(&self, tool: &str) -> Command {
        let r = &self.root;
        let mut c = Command::new(tool);
        c.arg("-qq")
            .arg("-o")
            .arg(format!(
                "Dir::Etc::SourceList={}",
                r.join("sources.list").display()
            ))
            .args(["-o", "Dir::Etc::SourceParts=/dev/null"])
            .arg("-o")
            .arg(format!("Dir::State::Lists={}", r.join("lists").display()))
            .arg("-o")
            .arg(format!("Dir::Cache={}", r.join("cache").display()))
            .args(["-o", "Dir::State::status=/dev/null"])
            // Files under a root-only prefix: the _apt sandbox user could not write them.
            .args(["-o", "APT::Sandbox::User=root"])
            .env("DEBIAN_FRONTEND", "noninteractive");
        c
    }

    fn update(&mut self) -> Result<()> {
        if self.updated {
            return Ok(());
        }
        for d in ["lists/partial", "cache/archives/partial"] {
            fs::create_dir_all(self.root.join(d))?;
        }
        fs::write(self.root.join("sources.list"), SOURCES)?;
        eprintln!("xtask: updating the private Debian index for the kernel matrix");
        crate::run(self.apt("apt-get").arg("update"))
            .context("apt-get update of the private kernel index")?;
        self.updated = true;
        Ok(())
    }

    /// The newest package of `spec` in the index: (package, record fields).
    fn newest(&mut self, spec: &KernelSpec) -> Result<BTreeMap<String, String>> {
        self.update()?;
        let list = crate::output(self.apt("apt-cache").args(["search", "--names-only"]).arg(
            format!("^{}", spec.prefix.replace('.', "\\.").replace('+', "\\+")),
        ))?;
        let names: Vec<&str> = list
            .lines()
            .filter_map(|l| l.split(" - ").next())
            .filter(|n| spec.matches(n))
            .collect();
        let mut best: Option<BTreeMap<String, String>> = None;
        for name in names {
            let show = crate::output(self.apt("apt-cache").args(["show", name]))?;
            for rec in parse_records(&show) {
                let newer = match &best {
                    None => true,
                    Some(b) => version_gt(&rec["Version"], &b["Version"])?,
                };
                if newer {
                    best = Some(rec);
                }
            }
        }
        best.with_context(|| {
            format!(
                "no package matching {}N{} in the index",
                spec.prefix, spec.suffix
            )
        })
    }
}

/// Package records (`Field: value` paragraphs) that have the fields this module uses.
fn parse_records(text: &str) -> Vec<BTreeMap<String, String>> {
    text.split("\n\n")
        .map(|para| {
            para.lines()
                .filter(|l| !l.starts_with(' '))
                .filter_map(|l| l.split_once(": "))
                .map(|(k, v)| (k.to_owned(), v.trim().to_owned()))
                .collect::<BTreeMap<_, _>>()
        })
        .filter(|r| {
            ["Package", "Version", "Filename", "SHA256", "Size"]
                .iter()
                .all(|k| r.contains_key(*k))
        })
        .collect()
}

fn version_gt(a: &str, b: &str) -> Result<bool> {
    Ok(Command::new("dpkg")
        .args(["--compare-versions", a, "gt", b])
        .status()
        .context("running dpkg --compare-versions")?
        .success())
}

fn sha256_of(path: &Path) -> Result<String> {
    let out = crate::output(Command::new("sha256sum").arg(path))?;
    Ok(out.split_whitespace().next().unwrap_or_default().to_owned())
}

/// The kernel for `spec` from the cache, or fetched and unpacked into it.
pub fn ensure(
    spec: &KernelSpec,
    cache: &Path,
    reg: &mut Registry,
    refresh: bool,
) -> Result<Kernel> {
    let dir = cache.join(spec.key);
    if !refresh && let Some(k) = cached(&dir) {
        return Ok(k);
    }
    let rec = reg.newest(spec)?;
    let (package, version) = (rec["Package"].clone(), rec["Version"].clone());
    if let Some(k) = cached(&dir).filter(|k| k.package == package && k.version == version) {
        return Ok(k);
    }
    eprintln!(
        "xtask: fetching {package} {version} ({} MB)",
        rec["Size"].parse::<u64>().unwrap_or(0) >> 20
    );
    let debs = cache.join("debs");
    fs::create_dir_all(&debs)?;
    crate::run(
        reg.apt("apt-get")
            .arg("download")
            .arg(format!("{package}={version}"))
            .current_dir(&debs),
    )
    .with_context(|| format!("downloading {package}"))?;
    let base = rec["Filename"]
        .rsplit('/')
        .next()
        .unwrap_or_default()
        .to_owned();
    let deb = debs.join(&base);
    if !deb.exists() {
        bail!("apt-get download left no {}", deb.display());
    }
    let sum = sha256_of(&deb)?;
    if sum != rec["SHA256"] {
        let _ = fs::remove_file(&deb);
        bail!(
            "{base}: SHA256 {sum} does not match the index's {}",
            rec["SHA256"]
        );
    }

    let tmp = cache.join(format!("{}.unpack", spec.key));
    let stage = cache.join(format!("{}.new", spec.key));
    for d in [&tmp, &stage] {
        let _ = fs::remove_dir_all(d);
    }
    crate::run(Command::new("dpkg-deb").arg("-x").arg(&deb).arg(&tmp))
        .with_context(|| format!("unpacking {base}"))?;
    let boot = tmp.join("boot");
    let vmlinuz = find_prefixed(&boot, "vmlinuz-")?;
    let release = vmlinuz
        .file_name()
        .and_then(|n| n.to_str())
        .and_then(|n| n.strip_prefix("vmlinuz-"))
        .context("kernel image name")?
        .to_owned();
    let moddir = ["lib/modules", "usr/lib/modules"]
        .iter()
        .map(|p| tmp.join(p).join(&release))
        .find(|p| p.is_dir())
        .with_context(|| format!("{base} has no modules for {release}"))?;
    fs::create_dir_all(stage.join("modules"))?;
    fs::copy(&vmlinuz, stage.join("vmlinuz"))?;
    fs::copy(boot.join(format!("config-{release}")), stage.join("config"))?;
    let modules = stage_modules(&moddir, &stage.join("modules"))?;
    let kernel = Kernel {
        key: spec.key.into(),
        package,
        version,
        sha256: sum,
        size: rec["Size"].parse().unwrap_or(0),
        filename: rec["Filename"].clone(),
        release,
        modules,
        dir: dir.clone(),
    };
    fs::write(
        stage.join("kernel.json"),
        serde_json::to_vec_pretty(&kernel)?,
    )?;
    let _ = fs::remove_dir_all(&dir);
    fs::rename(&stage, &dir)?;
    // The image, config and modules are all the matrix needs; the manifest keeps the
    // version and checksum of the package they came from.
    fs::remove_dir_all(&tmp)?;
    fs::remove_file(&deb)?;
    Ok(kernel)
}

fn cached(dir: &Path) -> Option<Kernel> {
    let mut k: Kernel = serde_json::from_slice(&fs::read(dir.join("kernel.json")).ok()?).ok()?;
    k.dir = dir.to_path_buf();
    let complete = k.vmlinuz().is_file()
        && k.modules
            .iter()
            .all(|m| dir.join("modules").join(format!("{m}.ko")).is_file());
    complete.then_some(k)
}

fn find_prefixed(dir: &Path, prefix: &str) -> Result<PathBuf> {
    fs::read_dir(dir)
        .with_context(|| format!("listing {}", dir.display()))?
        .filter_map(|e| e.ok())
        .map(|e| e.path())
        .find(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with(prefix))
        })
        .with_context(|| format!("no {prefix}* in {}", dir.display()))
}

fn module_name(file: &str) -> Option<String> {
    let stem = file
        .strip_suffix(".ko")
        .or_else(|| file.strip_suffix(".ko.xz"))
        .or_else(|| file.strip_suffix(".ko.zst"))
        .or_else(|| file.strip_suffix(".ko.gz"))?;
    Some(stem.replace('-', "_"))
}

fn walk(dir: &Path, out: &mut BTreeMap<String, PathBuf>) -> Result<()> {
    for e in fs::read_dir(dir)? {
        let p = e?.path();
        if p.is_dir() {
            walk(&p, out)?;
        } else if let Some(n) = p.file_name().and_then(|n| n.to_str()).and_then(module_name) {
            out.insert(n, p);
        }
    }
    Ok(())
}

fn decompressed(path: &Path) -> Result<Vec<u8>> {
    let name = path.to_string_lossy();
    let tool = if name.ends_with(".xz") {
        "xz"
    } else if name.ends_with(".zst") {
        "zstd"
    } else if name.ends_with(".gz") {
        "gzip"
    } else {
        return Ok(fs::read(path)?);
    };
    let out = Command::new(tool)
        .arg("-dc")
        .arg(path)
        .output()
        .with_context(|| format!("running {tool} for {}", path.display()))?;
    if !out.status.success() {
        bail!("{tool} -dc {} failed", path.display());
    }
    Ok(out.stdout)
}

/// Copies the guest modules and their dependencies (from `.modinfo`, in load order) into
/// `dest`; modules built into the kernel are skipped. Returns the load order.
fn stage_modules(moddir: &Path, dest: &Path) -> Result<Vec<String>> {
    let builtin: BTreeSet<String> = fs::read_to_string(moddir.join("modules.builtin"))
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.rsplit('/').next().and_then(module_name))
        .collect();
    let mut files = BTreeMap::new();
    walk(&moddir.join("kernel"), &mut files)?;
    let mut order = Vec::new();
    let mut seen = BTreeSet::new();
    fn visit(
        name: &str,
        files: &BTreeMap<String, PathBuf>,
        builtin: &BTreeSet<String>,
        dest: &Path,
        seen: &mut BTreeSet<String>,
        order: &mut Vec<String>,
    ) -> Result<()> {
        let name = name.replace('-', "_");
        if !seen.insert(name.clone()) || builtin.contains(&name) {
            return Ok(());
        }
        let path = files
            .get(&name)
            .with_context(|| format!("module {name} is neither built in nor shipped"))?;
        let data = decompressed(path)?;
        for dep in elf::module_depends(&data).with_context(|| format!("module {name}"))? {
            visit(&dep, files, builtin, dest, seen, order)?;
        }
        fs::write(dest.join(format!("{name}.ko")), data)?;
        order.push(name);
        Ok(())
    }
    for m in GUEST_MODULES {
        visit(m, &files, &builtin, dest, &mut seen, &mut order)?;
    }
    Ok(order)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn package_patterns() {
        let [k510, k61, k612] = [&MATRIX[0], &MATRIX[1], &MATRIX[2]];
        assert!(k510.matches("linux-image-5.10.0-46-amd64"));
        assert!(!k510.matches("linux-image-5.10.0-46-rt-amd64"));
        assert!(!k510.matches("linux-image-5.10.0-46-amd64-unsigned"));
        assert!(k61.matches("linux-image-6.1.0-57-amd64"));
        assert!(!k61.matches("linux-image-6.1.0-57-cloud-amd64"));
        assert!(!k61.matches("linux-image-6.1.0--amd64"));
        assert!(k612.matches("linux-image-6.12.117+deb12-amd64"));
        assert!(!k612.matches("linux-image-6.12.117+deb12-rt-amd64"));
    }

    #[test]
    fn records_and_module_names() {
        let show = "Package: a\nVersion: 1\nFilename: pool/a.deb\nSize: 3\nSHA256: ff\nDescription: x\n more\n\nPackage: b\n";
        let r = parse_records(show);
        assert_eq!(r.len(), 1);
        assert_eq!(r[0]["Filename"], "pool/a.deb");
        assert_eq!(
            module_name("9pnet_virtio.ko.xz").as_deref(),
            Some("9pnet_virtio")
        );
        assert_eq!(module_name("virtio-pci.ko").as_deref(), Some("virtio_pci"));
        assert_eq!(module_name("modules.order"), None);
    }
}
