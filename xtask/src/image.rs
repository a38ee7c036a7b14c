//! `cargo xtask image`: the agent's OCI image, built without a container daemon.
//!
//! One layer: the statically linked `credwatch` binary (x86_64-unknown-linux-musl, debug
//! info stripped) at `/usr/local/bin/credwatch` and Debian's CA bundle at
//! `/etc/ssl/certs/ca-certificates.crt`, nothing else (no shell, no libc, no passwd). The
//! image runs as uid 0 (deploy/README.md says why), entrypoint `/usr/local/bin/credwatch`,
//! arguments `run`.
//!
//! Reproducible: the same commit gives the same bytes, so the same digest. Every time in
//! the image is the commit time, tar entries are sorted with uid/gid 0 and fixed modes,
//! gzip carries no name and no time, JSON keys are sorted. The output is an OCI archive
//! (the OCI image layout in a tar) that `skopeo copy oci-archive:…` pushes, with a
//! CycloneDX SBOM of what is compiled into the binary beside it.

use std::{
    collections::{BTreeMap, BTreeSet},
    env,
    ffi::OsString,
    fs,
    io::Write,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context, Result, bail};
use serde_json::{Value, json};
use sha2::{Digest, Sha256};

use crate::deps::{self, Package};

/// Where the image is pushed by default; the Kubernetes manifests and the Helm chart name it.
pub const REPOSITORY: &str = "ghcr.io/credwatch/credwatch";
/// `org.opencontainers.image.source`.
pub const SOURCE: &str = "https://github.com/credwatch/credwatch";
pub const TARGET: &str = "x86_64-unknown-linux-musl";
const BINARY_IN_IMAGE: &str = "usr/local/bin/credwatch";
const CA_BUNDLE_IN_IMAGE: &str = "etc/ssl/certs/ca-certificates.crt";

pub struct Options {
    /// Package this binary instead of building one (it must be static).
    pub binary: Option<PathBuf>,
    /// The archive to write (default `target/image/credwatch-<version>.oci.tar`).
    pub output: Option<PathBuf>,
}

pub struct Image {
    pub archive: PathBuf,
    /// `sha256:<hex>` of the manifest: the digest a registry reports.
    pub digest: String,
}

/// Builds the image; prints and returns where it is.
pub fn build(root: &Path, opts: &Options) -> Result<Image> {
    let t0 = std::time::Instant::now();
    deps::ensure_debian(&[
        Package {
            name: "musl-tools",
            provides: "/usr/bin/musl-gcc",
        },
        Package {
            name: "ca-certificates",
            provides: "/usr/share/ca-certificates/mozilla",
        },
    ])?;
    let version = workspace_version(root)?;
    let git = GitInfo::read(root)?;
    let binary = match &opts.binary {
        Some(b) => b.clone(),
        None => build_static_binary(root)?,
    };
    let bin = fs::read(&binary).with_context(|| format!("reading {}", binary.display()))?;
    let elf = Elf::parse(&bin).with_context(|| format!("{} is not an ELF", binary.display()))?;
    if elf.interpreter.is_some() || !elf.needed.is_empty() {
        bail!(
            "{} is not statically linked (interpreter {:?}, needs {:?}); the image ships no libc",
            binary.display(),
            elf.interpreter,
            elf.needed
        );
    }
    let (ca_bundle, ca_version) = debian_ca_bundle()?;

    // The layer: two files and their directories, sorted, owned by root, at commit time.
    let mut files: BTreeMap<&str, (Vec<u8>, u32)> = BTreeMap::new();
    files.insert(BINARY_IN_IMAGE, (bin, 0o755));
    files.insert(CA_BUNDLE_IN_IMAGE, (ca_bundle, 0o644));
    let layer_tar = tar_of(&files, git.time)?;
    let diff_id = sha256(&layer_tar);
    let layer = gzip(&layer_tar)?;
    let layer_digest = sha256(&layer);

    let labels = json!({
        "org.opencontainers.image.created": git.time_rfc3339,
        "org.opencontainers.image.description": "eBPF runtime monitor for machine-credential use",
        "org.opencontainers.image.licenses": "Apache-2.0",
        "org.opencontainers.image.revision": git.revision,
        "org.opencontainers.image.source": SOURCE,
        "org.opencontainers.image.title": "credwatch",
        "org.opencontainers.image.version": version,
    });
    let config = canonical(&json!({
        "architecture": "amd64",
        "os": "linux",
        "created": git.time_rfc3339,
        "author": SOURCE,
        "config": {
            "User": "0:0",
            "Entrypoint": ["/usr/local/bin/credwatch"],
            "Cmd": ["run"],
            "Env": ["PATH=/usr/local/bin"],
            "WorkingDir": "/",
            "Labels": labels,
        },
        "rootfs": {"type": "layers", "diff_ids": [diff_id]},
        "history": [{
            "created": git.time_rfc3339,
            "created_by": "cargo xtask image",
            "comment": format!(
                "credwatch {version} ({TARGET}, static) and Debian ca-certificates {ca_version}"
            ),
        }],
    }));
    let manifest = canonical(&json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {
            "mediaType": "application/vnd.oci.image.config.v1+json",
            "digest": sha256(&config),
            "size": config.len(),
        },
        "layers": [{
            "mediaType": "application/vnd.oci.image.layer.v1.tar+gzip",
            "digest": layer_digest,
            "size": layer.len(),
        }],
        "annotations": labels,
    }));
    let digest = sha256(&manifest);
    let index = canonical(&json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.index.v1+json",
        "manifests": [{
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "digest": digest,
            "size": manifest.len(),
            "platform": {"architecture": "amd64", "os": "linux"},
            "annotations": {"org.opencontainers.image.ref.name": version},
        }],
    }));

    // The OCI image layout, as a tar: oci-layout, index.json, blobs/sha256/<hex>.
    let mut layout: BTreeMap<String, (Vec<u8>, u32)> = BTreeMap::new();
    layout.insert(
        "oci-layout".into(),
        (br#"{"imageLayoutVersion":"1.0.0"}"#.to_vec(), 0o644),
    );
    layout.insert("index.json".into(), (index, 0o644));
    for blob in [config, manifest, layer] {
        layout.insert(blob_path(&sha256(&blob)), (blob, 0o644));
    }
    let layout: BTreeMap<&str, (Vec<u8>, u32)> = layout
        .iter()
        .map(|(k, v)| (k.as_str(), v.clone()))
        .collect();
    let archive_bytes = tar_of(&layout, git.time)?;

    let archive = opts.output.clone().unwrap_or_else(|| {
        root.join("target/image")
            .join(format!("credwatch-{version}.oci.tar"))
    });
    let dir = archive.parent().context("archive path has no directory")?;
    fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    write_atomically(&archive, &archive_bytes)?;
    let sbom_path = archive.with_file_name(format!(
        "{}.cdx.json",
        archive
            .file_name()
            .and_then(|n| n.to_str())
            .and_then(|n| n.strip_suffix(".oci.tar"))
            .unwrap_or("credwatch")
    ));
    let sbom = sbom(root, &version, &git, &digest, &ca_version)?;
    write_atomically(&sbom_path, &sbom)?;

    println!("{}", archive.display());
    eprintln!(
        "xtask: image {REPOSITORY}:{version} {digest} ({} bytes, layer {} bytes) in {:.0?}\n\
         xtask: SBOM {}\n\
         xtask: push: skopeo copy oci-archive:{} docker://{REPOSITORY}:{version}",
        archive_bytes.len(),
        layout_size(&layout, &layer_digest),
        t0.elapsed(),
        sbom_path.display(),
        archive.display(),
    );
    if git.dirty {
        eprintln!(
            "xtask: the working tree has uncommitted changes: revision {} is not a commit",
            git.revision
        );
    }
    Ok(Image { archive, digest })
}

fn layout_size(layout: &BTreeMap<&str, (Vec<u8>, u32)>, layer_digest: &str) -> usize {
    layout
        .get(blob_path(layer_digest).as_str())
        .map_or(0, |(b, _)| b.len())
}

/// What `cargo xtask test` needs for tests/tests/image.rs: the image, and runc and skopeo
/// to run and inspect it. Returns the environment for `cargo test`.
pub fn for_tests(root: &Path) -> Result<Vec<(&'static str, OsString)>> {
    deps::ensure_debian(&[
        Package {
            name: "runc",
            provides: "/usr/sbin/runc",
        },
        Package {
            name: "skopeo",
            provides: "/usr/bin/skopeo",
        },
        Package {
            name: "iproute2",
            provides: "/usr/sbin/ip",
        },
    ])?;
    let image = build(
        root,
        &Options {
            binary: None,
            output: None,
        },
    )?;
    Ok(vec![
        ("CREDWATCH_IMAGE", image.archive.into_os_string()),
        ("CREDWATCH_IMAGE_REPOSITORY", REPOSITORY.into()),
        (
            "CREDWATCH_CONTAINERD_SECCOMP",
            containerd_seccomp()?.into_os_string(),
        ),
        ("CREDWATCH_IMAGE_DIGEST", image.digest.into()),
        (
            "CREDWATCH_IMAGE_BINARY",
            static_binary_path(root).into_os_string(),
        ),
        (
            "CREDWATCH_XTASK",
            env::current_exe().context("xtask's own path")?.into(),
        ),
    ])
}

/// containerd's RuntimeDefault seccomp profile, as source (`contrib/seccomp`), from Debian's
/// containerd source package: tests/tests/image.rs derives the profile a pod gets from it.
/// Downloaded (not installed: it would pull a Go toolchain) into the tools prefix once.
fn containerd_seccomp() -> Result<PathBuf> {
    const PKG: &str = "golang-github-containerd-containerd-dev";
    const FILE: &str =
        "usr/share/gocode/src/github.com/containerd/containerd/contrib/seccomp/seccomp_default.go";
    let dir = crate::prefix_dir()?.join("tools/containerd-seccomp");
    let out = dir.join("seccomp_default.go");
    if out.exists() {
        return Ok(out);
    }
    eprintln!("xtask: fetching containerd's seccomp profile source (Debian {PKG})");
    let tmp = dir.join("download");
    let _ = fs::remove_dir_all(&tmp);
    fs::create_dir_all(&tmp)?;
    let download = || {
        Command::new("apt-get")
            .args(["download", "-qq", PKG])
            .current_dir(&tmp)
            .status()
            .is_ok_and(|s| s.success())
    };
    if !download() {
        let _ = Command::new("apt-get").args(["update", "-qq"]).status();
        if !download() {
            bail!("apt-get download {PKG} failed (needs the Debian registry)");
        }
    }
    let deb = fs::read_dir(&tmp)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .find(|p| p.extension().is_some_and(|e| e == "deb"))
        .context("apt-get download left no .deb")?;
    crate::run(
        Command::new("dpkg-deb")
            .arg("-x")
            .arg(&deb)
            .arg(tmp.join("x")),
    )?;
    let version = crate::output(Command::new("dpkg-deb").arg("-f").arg(&deb).arg("Version"))?;
    fs::write(dir.join("VERSION"), format!("{PKG} {}", version.trim()))?;
    fs::copy(tmp.join("x").join(FILE), &out).with_context(|| format!("{PKG} has no {FILE}"))?;
    fs::remove_dir_all(&tmp)?;
    Ok(out)
}

fn static_binary_path(root: &Path) -> PathBuf {
    let target_dir = env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| root.join("target"));
    target_dir.join(TARGET).join("release/credwatch")
}

/// `cargo rustc --release --target x86_64-unknown-linux-musl`: a static binary (musl libc,
/// and the C in ring and mimalloc compiled by musl-gcc), debug info stripped. Only the final
/// link gets `-C strip`, so the dependencies stay shared with any other musl build.
fn build_static_binary(root: &Path) -> Result<PathBuf> {
    let installed = crate::output(Command::new("rustup").args(["target", "list", "--installed"]))?;
    if !installed.lines().any(|l| l.trim() == TARGET) {
        eprintln!("xtask: adding the {TARGET} target (rustup)");
        crate::run(Command::new("rustup").args(["target", "add", TARGET]))?;
    }
    crate::run(
        Command::new(env::var_os("CARGO").unwrap_or_else(|| "cargo".into()))
            .args(["rustc", "--release", "--locked", "--target", TARGET])
            .args(["-p", "credwatch", "--bin", "credwatch", "--"])
            .args(["-C", "strip=debuginfo"])
            .current_dir(root),
    )?;
    Ok(static_binary_path(root))
}

fn workspace_version(root: &Path) -> Result<String> {
    let meta = cargo_metadata(root, &["--no-deps"])?;
    meta["packages"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|p| p["name"] == "credwatch")
        .and_then(|p| p["version"].as_str())
        .map(str::to_owned)
        .context("cargo metadata names no credwatch package")
}

fn cargo_metadata(root: &Path, extra: &[&str]) -> Result<Value> {
    let out = crate::output(
        Command::new(env::var_os("CARGO").unwrap_or_else(|| "cargo".into()))
            .args(["metadata", "--format-version", "1", "--locked"])
            .args(extra)
            .current_dir(root),
    )?;
    serde_json::from_str(&out).context("parsing cargo metadata")
}

struct GitInfo {
    /// The commit, `-dirty` appended when the working tree differs from it.
    revision: String,
    dirty: bool,
    /// Commit time (committer date), Unix seconds and RFC 3339 UTC.
    time: u64,
    time_rfc3339: String,
}

impl GitInfo {
    fn read(root: &Path) -> Result<GitInfo> {
        let git = |args: &[&str]| {
            crate::output(
                Command::new("git")
                    .args(args)
                    .current_dir(root)
                    .env("TZ", "UTC"),
            )
            .map(|s| s.trim().to_owned())
        };
        let commit =
            git(&["rev-parse", "HEAD"]).context("the image is built from a git checkout")?;
        let time: u64 = git(&["log", "-1", "--format=%ct"])?
            .parse()
            .context("commit time")?;
        let time_rfc3339 = git(&[
            "log",
            "-1",
            "--date=format-local:%Y-%m-%dT%H:%M:%SZ",
            "--format=%cd",
        ])?;
        let dirty = !git(&["status", "--porcelain"])?.is_empty();
        Ok(GitInfo {
            revision: if dirty {
                format!("{commit}-dirty")
            } else {
                commit
            },
            dirty,
            time,
            time_rfc3339,
        })
    }
}

/// Debian's CA bundle as the `ca-certificates` package builds it on a clean system: the
/// package's certificates in sorted order, each ending in a newline (`update-ca-certificates`
/// without local additions, so a machine's own CAs never reach the image). And the version.
fn debian_ca_bundle() -> Result<(Vec<u8>, String)> {
    let version = crate::output(Command::new("dpkg-query").args([
        "-W",
        "-f",
        "${Version}",
        "ca-certificates",
    ]))?;
    let listed = crate::output(Command::new("dpkg").args(["-L", "ca-certificates"]))?;
    let certs: BTreeSet<&str> = listed
        .lines()
        .filter(|l| l.starts_with("/usr/share/ca-certificates/") && l.ends_with(".crt"))
        .collect();
    if certs.len() < 50 {
        bail!(
            "the ca-certificates package lists only {} certificates",
            certs.len()
        );
    }
    let mut bundle = Vec::new();
    for cert in certs {
        let pem = fs::read(cert).with_context(|| format!("reading {cert}"))?;
        bundle.extend_from_slice(&pem);
        if !pem.ends_with(b"\n") {
            bundle.push(b'\n');
        }
    }
    Ok((bundle, version.trim().to_owned()))
}

/// A tar of `files` (path → contents, mode) with their parent directories: entries sorted,
/// uid/gid 0, no user or group names, every mtime `mtime`.
fn tar_of(files: &BTreeMap<&str, (Vec<u8>, u32)>, mtime: u64) -> Result<Vec<u8>> {
    let mut entries: BTreeMap<String, Option<(&[u8], u32)>> = BTreeMap::new();
    for (path, (data, mode)) in files {
        let mut dir = Path::new(path).parent();
        while let Some(d) = dir.filter(|d| !d.as_os_str().is_empty()) {
            entries.insert(format!("{}/", d.display()), None);
            dir = d.parent();
        }
        entries.insert((*path).to_owned(), Some((data.as_slice(), *mode)));
    }
    let mut builder = tar::Builder::new(Vec::new());
    for (path, entry) in &entries {
        let mut h = tar::Header::new_ustar();
        h.set_path(path)?;
        h.set_uid(0);
        h.set_gid(0);
        h.set_mtime(mtime);
        match entry {
            None => {
                h.set_entry_type(tar::EntryType::Directory);
                h.set_mode(0o755);
                h.set_size(0);
                h.set_cksum();
                builder.append(&h, std::io::empty())?;
            }
            Some((data, mode)) => {
                h.set_entry_type(tar::EntryType::Regular);
                h.set_mode(*mode);
                h.set_size(data.len() as u64);
                h.set_cksum();
                builder.append(&h, *data)?;
            }
        }
    }
    Ok(builder.into_inner()?)
}

/// gzip without a file name or time stamp (both zero in the header), best compression.
fn gzip(data: &[u8]) -> Result<Vec<u8>> {
    let mut gz = flate2::GzBuilder::new()
        .mtime(0)
        .operating_system(255)
        .write(Vec::new(), flate2::Compression::best());
    gz.write_all(data)?;
    Ok(gz.finish()?)
}

fn sha256(data: &[u8]) -> String {
    format!("sha256:{}", hex(&Sha256::digest(data)))
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn blob_path(digest: &str) -> String {
    format!("blobs/sha256/{}", digest.trim_start_matches("sha256:"))
}

/// Compact JSON with every object's keys sorted (whatever serde_json's map type is).
fn canonical(v: &Value) -> Vec<u8> {
    fn sorted(v: &Value) -> Value {
        match v {
            Value::Object(m) => {
                let b: BTreeMap<&String, Value> = m.iter().map(|(k, v)| (k, sorted(v))).collect();
                Value::Object(b.into_iter().map(|(k, v)| (k.clone(), v)).collect())
            }
            Value::Array(a) => Value::Array(a.iter().map(sorted).collect()),
            other => other.clone(),
        }
    }
    serde_json::to_vec(&sorted(v)).expect("JSON values serialize")
}

fn write_atomically(path: &Path, data: &[u8]) -> Result<()> {
    let tmp = path.with_extension("partial");
    fs::write(&tmp, data).with_context(|| format!("writing {}", tmp.display()))?;
    fs::rename(&tmp, path).with_context(|| format!("renaming to {}", path.display()))
}

/// What the dynamic loader would need: the interpreter and the DT_NEEDED libraries.
struct Elf {
    interpreter: Option<String>,
    needed: Vec<String>,
}

impl Elf {
    /// ELF64 little-endian program headers (x86_64): PT_INTERP, PT_DYNAMIC's DT_NEEDED.
    fn parse(b: &[u8]) -> Result<Elf> {
        let u16_at = |o: usize| -> Result<u64> {
            Ok(u16::from_le_bytes(b.get(o..o + 2).context("truncated")?.try_into()?) as u64)
        };
        let u32_at = |o: usize| -> Result<u64> {
            Ok(u32::from_le_bytes(b.get(o..o + 4).context("truncated")?.try_into()?) as u64)
        };
        let u64_at = |o: usize| -> Result<u64> {
            Ok(u64::from_le_bytes(
                b.get(o..o + 8).context("truncated")?.try_into()?,
            ))
        };
        if b.get(..4) != Some(b"\x7fELF") || b.get(4) != Some(&2) || b.get(5) != Some(&1) {
            bail!("not a 64-bit little-endian ELF file");
        }
        let (phoff, phentsize, phnum) = (
            u64_at(0x20)? as usize,
            u16_at(0x36)? as usize,
            u16_at(0x38)? as usize,
        );
        let mut interpreter = None;
        let mut dynamic = None;
        let mut loads = Vec::new();
        for i in 0..phnum {
            let p = phoff + i * phentsize;
            let (ty, offset, vaddr, filesz) =
                (u32_at(p)?, u64_at(p + 8)?, u64_at(p + 16)?, u64_at(p + 32)?);
            match ty {
                1 => loads.push((vaddr, offset, filesz)),
                2 => dynamic = Some((offset as usize, filesz as usize)),
                3 => {
                    let s = b
                        .get(offset as usize..(offset + filesz) as usize)
                        .context("PT_INTERP out of the file")?;
                    interpreter = Some(String::from_utf8_lossy(s).trim_end_matches('\0').into());
                }
                _ => {}
            }
        }
        let mut needed = Vec::new();
        if let Some((off, size)) = dynamic {
            let (mut strtab, mut offsets) = (None, Vec::new());
            for e in (off..off + size).step_by(16) {
                match u64_at(e)? {
                    0 => break,
                    1 => offsets.push(u64_at(e + 8)?),
                    5 => strtab = Some(u64_at(e + 8)?),
                    _ => {}
                }
            }
            if let Some(strtab) = strtab {
                let file_off = loads
                    .iter()
                    .find(|(va, _, sz)| (*va..va + sz).contains(&strtab))
                    .map(|(va, off, _)| (strtab - va + off) as usize)
                    .context("DT_STRTAB outside the loaded segments")?;
                for o in offsets {
                    let start = file_off + o as usize;
                    let s = b.get(start..).context("DT_NEEDED out of the file")?;
                    let end = s.iter().position(|c| *c == 0).unwrap_or(s.len());
                    needed.push(String::from_utf8_lossy(&s[..end]).into_owned());
                }
            }
        }
        Ok(Elf {
            interpreter,
            needed,
        })
    }
}

// ---------------------------------------------------------------------------------------
// SBOM

/// CycloneDX 1.5 JSON: the image, and everything compiled into its binary. That is the
/// normal-dependency closure of the `credwatch` package for the musl target, plus the
/// probes (`credwatch-ebpf`, a build dependency whose BPF object the binary embeds) and
/// their normal dependencies; the Rust standard library and musl libc (linked statically);
/// and the CA bundle. Build-only tools (build scripts' dependencies, the compilers) are
/// listed in metadata.tools, not as components. Crate hashes are Cargo.lock's checksums.
fn sbom(
    root: &Path,
    version: &str,
    git: &GitInfo,
    digest: &str,
    ca_version: &str,
) -> Result<Vec<u8>> {
    let host = cargo_metadata(root, &["--filter-platform", TARGET])?;
    let bpf = cargo_metadata(root, &["--filter-platform", "bpfel-unknown-none"])?;
    let checksums = lock_checksums(&root.join("Cargo.lock"))?;

    let mut crates: BTreeMap<String, Value> = BTreeMap::new(); // package id → package
    let mut edges: BTreeMap<String, BTreeSet<String>> = BTreeMap::new(); // id → dependency ids
    for (meta, start) in [(&host, "credwatch"), (&bpf, "credwatch-ebpf")] {
        let packages: BTreeMap<&str, &Value> = meta["packages"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|p| Some((p["id"].as_str()?, p)))
            .collect();
        let nodes: BTreeMap<&str, &Value> = meta["resolve"]["nodes"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|n| Some((n["id"].as_str()?, n)))
            .collect();
        let root_id = packages
            .iter()
            .find(|(_, p)| p["name"] == start && p["source"].is_null())
            .map(|(id, _)| *id)
            .with_context(|| format!("cargo metadata has no {start} package"))?;
        let mut todo = vec![root_id];
        while let Some(id) = todo.pop() {
            if crates.contains_key(id) {
                continue;
            }
            crates.insert(id.to_owned(), packages[id].clone());
            let deps = edges.entry(id.to_owned()).or_default();
            for dep in nodes[id]["deps"].as_array().into_iter().flatten() {
                let normal = dep["dep_kinds"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .any(|k| k["kind"].is_null());
                let dep_id = dep["pkg"].as_str().unwrap_or_default();
                if normal {
                    deps.insert(dep_id.to_owned());
                    todo.push(dep_id);
                }
            }
        }
    }
    let bpf_root = crates
        .iter()
        .find(|(_, p)| p["name"] == "credwatch-ebpf")
        .map(|(id, _)| id.clone())
        .context("no credwatch-ebpf")?;

    let purl = |p: &Value| {
        format!(
            "pkg:cargo/{}@{}",
            p["name"].as_str().unwrap_or_default(),
            p["version"].as_str().unwrap_or_default()
        )
    };
    let refs: BTreeMap<&str, String> = crates
        .iter()
        .map(|(id, p)| (id.as_str(), purl(p)))
        .collect();
    let agent_ref = crates
        .iter()
        .find(|(_, p)| p["name"] == "credwatch" && p["source"].is_null())
        .map(|(id, _)| refs[id.as_str()].clone())
        .context("no credwatch package")?;

    let rustc = crate::output(Command::new("rustc").arg("-vV"))?;
    let rustc_version = rustc
        .lines()
        .find_map(|l| l.strip_prefix("release: "))
        .unwrap_or("unknown")
        .to_owned();
    let nightly = crate::output(Command::new("rustc").args(["+nightly", "--version"]))
        .map(|s| s.trim().to_owned())
        .unwrap_or_default();
    let musl_version =
        crate::output(Command::new("dpkg-query").args(["-W", "-f", "${Version}", "musl-dev"]))?;

    let mut components = Vec::new();
    for (id, p) in &crates {
        let mut c = json!({
            "type": if refs[id.as_str()] == agent_ref { "application" } else { "library" },
            "bom-ref": refs[id.as_str()],
            "name": p["name"],
            "version": p["version"],
            "purl": refs[id.as_str()],
        });
        if let Some(l) = p["license"].as_str() {
            // Old crates write "MIT/Apache-2.0", which SPDX spells "MIT OR Apache-2.0".
            let spdx = l.split('/').map(str::trim).collect::<Vec<_>>().join(" OR ");
            c["licenses"] = json!([{"expression": spdx}]);
        }
        let key = (
            p["name"].as_str().unwrap_or_default().to_owned(),
            p["version"].as_str().unwrap_or_default().to_owned(),
        );
        if let Some(sum) = checksums.get(&key) {
            c["hashes"] = json!([{"alg": "SHA-256", "content": sum}]);
        }
        if let Some(repo) = p["repository"].as_str() {
            c["externalReferences"] = json!([{"type": "vcs", "url": repo}]);
        }
        if p["source"].is_null() {
            c["externalReferences"] = json!([{"type": "vcs", "url": SOURCE}]);
        }
        if *id == bpf_root {
            c["description"] = json!("eBPF probes, embedded in the agent binary as a BPF object");
        }
        components.push(c);
    }
    let std_ref = format!("pkg:generic/rust-std@{rustc_version}?target={TARGET}");
    let musl_ref = format!("pkg:deb/debian/musl-dev@{}?arch=amd64", musl_version.trim());
    let ca_ref = format!("pkg:deb/debian/ca-certificates@{ca_version}?arch=all");
    components.push(json!({
        "type": "library", "bom-ref": std_ref, "name": "rust-std", "version": rustc_version,
        "purl": std_ref, "licenses": [{"expression": "MIT OR Apache-2.0"}],
        "description": "Rust standard library, linked statically",
    }));
    components.push(json!({
        "type": "library", "bom-ref": musl_ref, "name": "musl", "version": musl_version.trim(),
        "purl": musl_ref, "licenses": [{"expression": "MIT"}],
        "description": "C library, linked statically (Debian musl-dev)",
    }));
    components.push(json!({
        "type": "data", "bom-ref": ca_ref, "name": "ca-certificates", "version": ca_version,
        "purl": ca_ref, "licenses": [{"expression": "MPL-2.0"}],
        "description": format!("/{CA_BUNDLE_IN_IMAGE}: the Mozilla CA bundle as Debian ships it"),
    }));
    components.sort_by(|a, b| a["bom-ref"].as_str().cmp(&b["bom-ref"].as_str()));

    let image_ref = format!(
        "pkg:oci/credwatch@{}?repository_url={REPOSITORY}&tag={version}",
        digest.replace(':', "%3A")
    );
    let mut dependencies: Vec<Value> = edges
        .iter()
        .map(|(id, deps)| {
            let mut on: Vec<&str> = deps.iter().map(|d| refs[d.as_str()].as_str()).collect();
            if refs[id.as_str()] == agent_ref {
                on.extend([
                    refs[bpf_root.as_str()].as_str(),
                    std_ref.as_str(),
                    musl_ref.as_str(),
                ]);
            }
            on.sort();
            on.dedup();
            json!({"ref": refs[id.as_str()], "dependsOn": on})
        })
        .collect();
    dependencies.push(json!({"ref": image_ref, "dependsOn": [agent_ref, ca_ref]}));
    dependencies.sort_by(|a, b| a["ref"].as_str().cmp(&b["ref"].as_str()));

    // The serial number is a function of the image, so the same commit gives the same SBOM:
    // a name-based UUID (RFC 4122 version 5 layout, from SHA-256 of the image digest).
    let h = Sha256::digest(format!("credwatch-sbom {digest}").as_bytes());
    let mut u = [0u8; 16];
    u.copy_from_slice(&h[..16]);
    u[6] = (u[6] & 0x0f) | 0x50;
    u[8] = (u[8] & 0x3f) | 0x80;
    let u = hex(&u);
    let serial = format!(
        "urn:uuid:{}-{}-{}-{}-{}",
        &u[..8],
        &u[8..12],
        &u[12..16],
        &u[16..20],
        &u[20..]
    );
    let bom = json!({
        "bomFormat": "CycloneDX",
        "specVersion": "1.5",
        "serialNumber": serial,
        "version": 1,
        "metadata": {
            "timestamp": git.time_rfc3339,
            "tools": {"components": [
                {"type": "application", "name": "cargo xtask image", "version": version},
                {"type": "application", "name": "rustc", "version": rustc_version},
                {"type": "application", "name": "rustc (probes)", "version": nightly},
            ]},
            "component": {
                "type": "container",
                "bom-ref": image_ref,
                "name": REPOSITORY,
                "version": version,
                "purl": image_ref,
                "hashes": [{"alg": "SHA-256", "content": digest.trim_start_matches("sha256:")}],
                "properties": [
                    {"name": "org.opencontainers.image.revision", "value": git.revision},
                    {"name": "org.opencontainers.image.source", "value": SOURCE},
                ],
            },
        },
        "components": components,
        "dependencies": dependencies,
    });
    let mut out = serde_json::to_vec_pretty(&serde_json::from_slice::<Value>(&canonical(&bom))?)?;
    out.push(b'\n');
    Ok(out)
}

/// (name, version) → sha256 of the .crate, from Cargo.lock's `checksum` lines.
fn lock_checksums(lock: &Path) -> Result<BTreeMap<(String, String), String>> {
    let text = fs::read_to_string(lock).with_context(|| format!("reading {}", lock.display()))?;
    let mut out = BTreeMap::new();
    for block in text.split("[[package]]").skip(1) {
        let field = |k: &str| {
            block.lines().find_map(|l| {
                l.strip_prefix(k)?
                    .trim_start()
                    .strip_prefix('=')
                    .map(|v| v.trim().trim_matches('"').to_owned())
            })
        };
        if let (Some(n), Some(v), Some(c)) = (field("name"), field("version"), field("checksum")) {
            out.insert((n, v), c);
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tar_is_sorted_rooted_and_timed() {
        let mut files = BTreeMap::new();
        files.insert("usr/local/bin/x", (b"bin".to_vec(), 0o755));
        files.insert("etc/a", (b"a".to_vec(), 0o644));
        let t = tar_of(&files, 1_700_000_000).unwrap();
        assert_eq!(t, tar_of(&files, 1_700_000_000).unwrap());
        let mut a = tar::Archive::new(t.as_slice());
        let got: Vec<(String, u64, u64, u64, u32)> = a
            .entries()
            .unwrap()
            .map(|e| {
                let e = e.unwrap();
                let h = e.header();
                (
                    e.path().unwrap().display().to_string(),
                    h.mtime().unwrap(),
                    h.uid().unwrap(),
                    h.gid().unwrap(),
                    h.mode().unwrap(),
                )
            })
            .collect();
        let names: Vec<&str> = got.iter().map(|g| g.0.as_str()).collect();
        assert_eq!(
            names,
            [
                "etc/",
                "etc/a",
                "usr/",
                "usr/local/",
                "usr/local/bin/",
                "usr/local/bin/x"
            ]
        );
        assert!(
            got.iter()
                .all(|g| g.1 == 1_700_000_000 && g.2 == 0 && g.3 == 0)
        );
        assert_eq!(got[5].4, 0o755);
    }

    #[test]
    fn gzip_has_no_name_or_time() {
        let z = gzip(b"hello").unwrap();
        assert_eq!(
            &z[..4],
            &[0x1f, 0x8b, 8, 0],
            "no FNAME/FEXTRA/FCOMMENT flags"
        );
        assert_eq!(&z[4..8], &[0, 0, 0, 0], "MTIME 0");
        assert_eq!(z, gzip(b"hello").unwrap());
    }

    #[test]
    fn canonical_json_sorts_keys() {
        let v = json!({"b": 1, "a": {"d": 2, "c": [ {"z": 0, "y": 1} ]}});
        assert_eq!(
            String::from_utf8(canonical(&v)).unwrap(),
            r#"{"a":{"c":[{"y":1,"z":0}],"d":2},"b":1}"#
        );
    }

    #[test]
    fn elf_of_a_dynamic_and_a_static_binary() {
        // This test binary is linked against glibc.
        let me = fs::read(env::current_exe().unwrap()).unwrap();
        let e = Elf::parse(&me).unwrap();
        if cfg!(target_env = "gnu") {
            assert!(e.interpreter.is_some_and(|i| i.contains("ld-linux")));
            assert!(
                e.needed.iter().any(|n| n.starts_with("libc.so")),
                "{:?}",
                e.needed
            );
        }
        assert!(Elf::parse(b"#!/bin/sh\n").is_err());
    }
}
