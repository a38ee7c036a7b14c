//! The agent's OCI image (`cargo xtask image`), run the way a Kubernetes node runs the
//! DaemonSet, to prove what deploy/README.md claims about its privileges.
//!
//! `cargo xtask test` builds the image first and passes it in `CREDWATCH_IMAGE` (with its
//! digest, the static binary in it, the repository it is pushed to, and the xtask binary).
//!
//! Without root (#[ignore]d: they need the image `cargo xtask test` builds): what `skopeo
//! inspect` reads (entrypoint, user, labels), what the layer holds (two files, no shell),
//! that the manifests name the image the build produces, and that a second build from the
//! same commit is byte for byte the same archive.
//!
//! Privileged (`#[ignore = "privileged: …"]`, run by `cargo xtask test` with
//! `--include-ignored`; they fail, never skip, when they cannot run): the image is unpacked
//! into an OCI bundle whose config.json is what the kubelet and containerd (cgroupfs driver,
//! `RuntimeDefault` seccomp from containerd's own profile) make of
//! deploy/kubernetes/daemonset.yaml: the capability list, read-only root, the host mounts
//! and their flags, the host PID namespace, a pod network namespace, the projected
//! service-account token, the environment. `runc` runs it next to a workload container of
//! pod payments/api-7f9c (cgroup `/kubepods/besteffort/pod<uid>/<container id>`, own mount
//! and network namespaces, the pod's token bind-mounted at
//! /var/run/secrets/kubernetes.io/serviceaccount). The agent, which learns pod names from a
//! kubelet served over HTTPS at `$(HOST_IP):10250`, must report the workload's secret reads
//! and its connect with pod and container id. Then each capability is removed in turn and
//! the failure deploy/README.md documents is observed.
//!
//! Deviations from a real node, all of this machine kind (see ENVIRONMENT.md): no rlimits and
//! no `oomScoreAdj` in the spec (this root lacks CAP_SYS_RESOURCE, so it can neither set them
//! nor grant CAP_SYS_RESOURCE to a container: the capability set here is the other five); no
//! AppArmor (the host has none; the pod asks for Unconfined anyway). The host directories
//! the pod mounts that tests must not touch (/var/lib/kubelet, /home, /var/lib/credwatch)
//! are test directories mounted at the same container paths.

use std::{
    collections::{BTreeMap, BTreeSet},
    io::{BufRead, BufReader, Read, Write},
    net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream},
    os::unix::fs::{MetadataExt, PermissionsExt},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use credwatch::event::{Body, CredentialType, Event, EventKind, SecretRead, WorkloadKind};
use credwatch_tests::{
    CID_A, CID_B, PodVolume, UID_A, UID_B, expected_fingerprint, fake_sa_token, read_events,
    unique, workdir,
};
use serde_json::{Value, json};

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// An environment variable `cargo xtask test` sets; its absence fails the test.
fn from_xtask(name: &str) -> String {
    std::env::var(name).unwrap_or_else(|_| {
        panic!("{name} is not set: run `cargo xtask test` (it builds the image first)")
    })
}

fn image_archive() -> PathBuf {
    let p = PathBuf::from(from_xtask("CREDWATCH_IMAGE"));
    assert!(p.is_file(), "{} does not exist", p.display());
    p
}

fn yaml(path: &str) -> Value {
    let text = std::fs::read_to_string(repo().join(path)).unwrap();
    let v: serde_yaml::Value = serde_yaml::from_str(&text).unwrap();
    serde_json::to_value(v).unwrap()
}

fn daemonset() -> Value {
    yaml("deploy/kubernetes/daemonset.yaml")
}

fn agent_container(ds: &Value) -> &Value {
    &ds["spec"]["template"]["spec"]["containers"][0]
}

fn command_output(cmd: &mut Command) -> String {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("running {cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn skopeo_inspect(config: bool) -> Value {
    let mut cmd = Command::new("skopeo");
    cmd.arg("inspect");
    if config {
        cmd.arg("--config");
    }
    cmd.arg(format!("oci-archive:{}", image_archive().display()));
    serde_json::from_str(&command_output(&mut cmd)).unwrap()
}

/// The OCI archive's layers, unpacked in order into `rootfs` (as a runtime's snapshotter
/// would; the image has no whiteouts).
fn unpack(archive: &Path, rootfs: &Path) {
    let layout = rootfs.with_extension("layout");
    std::fs::create_dir_all(&layout).unwrap();
    std::fs::create_dir_all(rootfs).unwrap();
    command_output(
        Command::new("tar")
            .arg("-xf")
            .arg(archive)
            .arg("-C")
            .arg(&layout),
    );
    let blob = |digest: &Value| {
        layout.join(format!(
            "blobs/sha256/{}",
            digest.as_str().unwrap().trim_start_matches("sha256:")
        ))
    };
    let index: Value =
        serde_json::from_slice(&std::fs::read(layout.join("index.json")).unwrap()).unwrap();
    let manifest: Value =
        serde_json::from_slice(&std::fs::read(blob(&index["manifests"][0]["digest"])).unwrap())
            .unwrap();
    for layer in manifest["layers"].as_array().unwrap() {
        assert_eq!(
            layer["mediaType"],
            "application/vnd.oci.image.layer.v1.tar+gzip"
        );
        command_output(
            Command::new("tar")
                .args(["--numeric-owner", "-xzf"])
                .arg(blob(&layer["digest"]))
                .arg("-C")
                .arg(rootfs),
        );
    }
    std::fs::remove_dir_all(&layout).unwrap();
}

/// Every path under `root` (relative, sorted).
fn tree(root: &Path) -> Vec<String> {
    fn walk(root: &Path, dir: &Path, out: &mut Vec<String>) {
        for e in std::fs::read_dir(dir).unwrap() {
            let p = e.unwrap().path();
            out.push(p.strip_prefix(root).unwrap().display().to_string());
            if p.is_dir() && !p.is_symlink() {
                walk(root, &p, out);
            }
        }
    }
    let mut out = Vec::new();
    walk(root, root, &mut out);
    out.sort();
    out
}

/// The ELF program interpreter (PT_INTERP) of a 64-bit little-endian binary, if any.
fn elf_interpreter(b: &[u8]) -> Option<String> {
    assert_eq!(&b[..4], b"\x7fELF");
    let rd = |o: usize, n: usize| {
        b[o..o + n]
            .iter()
            .rev()
            .fold(0u64, |a, x| (a << 8) | *x as u64) as usize
    };
    let (phoff, phentsize, phnum) = (rd(0x20, 8), rd(0x36, 2), rd(0x38, 2));
    (0..phnum).find_map(|i| {
        let p = phoff + i * phentsize;
        (rd(p, 4) == 3).then(|| {
            let (off, size) = (rd(p + 8, 8), rd(p + 32, 8));
            String::from_utf8_lossy(&b[off..off + size])
                .trim_end_matches('\0')
                .to_owned()
        })
    })
}

fn git(args: &[&str]) -> String {
    command_output(Command::new("git").args(args).current_dir(repo()))
        .trim()
        .to_owned()
}

// ---------------------------------------------------------------------------------------
// The image as a registry and a runtime see it.

#[test]
#[ignore = "needs the image (cargo xtask test builds it)"]
fn image_is_what_the_daemonset_runs() {
    let version = env!("CARGO_PKG_VERSION");
    let inspect = skopeo_inspect(false);
    let config = skopeo_inspect(true);
    assert_eq!(inspect["Digest"], from_xtask("CREDWATCH_IMAGE_DIGEST"));
    assert_eq!(inspect["Architecture"], "amd64");
    assert_eq!(inspect["Os"], "linux");
    assert_eq!(
        inspect["Layers"].as_array().unwrap().len(),
        1,
        "{inspect:#}"
    );

    // Entrypoint and user: what the DaemonSet's command and runAsUser expect.
    let ds = daemonset();
    let c = agent_container(&ds);
    let cfg = &config["config"];
    assert_eq!(cfg["Entrypoint"], c["command"], "{cfg:#}");
    assert_eq!(cfg["Entrypoint"], json!(["/usr/local/bin/credwatch"]));
    assert_eq!(cfg["Cmd"], json!(["run"]));
    assert_eq!(cfg["User"], "0:0");
    assert_eq!(c["securityContext"]["runAsUser"], 0);

    // Labels: source, the commit, the workspace version, the commit's time.
    let labels = &inspect["Labels"];
    let head = git(&["rev-parse", "HEAD"]);
    let revision = labels["org.opencontainers.image.revision"]
        .as_str()
        .unwrap();
    let dirty = !git(&["status", "--porcelain"]).is_empty();
    assert_eq!(revision, if dirty { format!("{head}-dirty") } else { head });
    assert_eq!(labels["org.opencontainers.image.version"], version);
    let created = command_output(
        Command::new("git")
            .args([
                "log",
                "-1",
                "--date=format-local:%Y-%m-%dT%H:%M:%SZ",
                "--format=%cd",
            ])
            .env("TZ", "UTC")
            .current_dir(repo()),
    );
    assert_eq!(labels["org.opencontainers.image.created"], created.trim());
    assert_eq!(inspect["Created"], created.trim());
    assert!(
        labels["org.opencontainers.image.source"]
            .as_str()
            .unwrap()
            .starts_with("https://")
    );

    // The layer: the static binary and the CA bundle, owned by root, at the commit time.
    let w = workdir();
    let rootfs = w.path().join("rootfs");
    unpack(&image_archive(), &rootfs);
    assert_eq!(
        tree(&rootfs),
        [
            "etc",
            "etc/ssl",
            "etc/ssl/certs",
            "etc/ssl/certs/ca-certificates.crt",
            "usr",
            "usr/local",
            "usr/local/bin",
            "usr/local/bin/credwatch",
        ],
        "the image holds the agent and CA certificates, nothing else (no shell)"
    );
    let commit_time: i64 = git(&["log", "-1", "--format=%ct"]).parse().unwrap();
    for p in tree(&rootfs) {
        let m = std::fs::symlink_metadata(rootfs.join(&p)).unwrap();
        assert_eq!((m.uid(), m.gid()), (0, 0), "{p}");
        assert_eq!(m.mtime(), commit_time, "{p}: mtime is not the commit time");
    }
    let bin = std::fs::read(rootfs.join("usr/local/bin/credwatch")).unwrap();
    assert_eq!(
        std::fs::metadata(rootfs.join("usr/local/bin/credwatch"))
            .unwrap()
            .permissions()
            .mode()
            & 0o7777,
        0o755
    );
    assert_eq!(
        elf_interpreter(&bin),
        None,
        "the agent is linked statically"
    );
    assert_eq!(
        bin,
        std::fs::read(from_xtask("CREDWATCH_IMAGE_BINARY")).unwrap()
    );
    // It runs with nothing but itself: no libc, no loader in the image.
    let out = Command::new(rootfs.join("usr/local/bin/credwatch"))
        .arg("check-config")
        .arg(repo().join("deploy/systemd/credwatch.toml"))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // Debian's bundle, without this machine's local CAs.
    let bundle = std::fs::read_to_string(rootfs.join("etc/ssl/certs/ca-certificates.crt")).unwrap();
    let certs = bundle.matches("-----BEGIN CERTIFICATE-----").count();
    assert!(certs > 100, "{certs} certificates");
    for local in std::fs::read_dir("/usr/local/share/ca-certificates")
        .into_iter()
        .flatten()
    {
        let pem = std::fs::read_to_string(local.unwrap().path()).unwrap_or_default();
        let body: String = pem.lines().filter(|l| !l.starts_with("-----")).collect();
        assert!(
            body.is_empty() || !bundle.replace('\n', "").contains(&body),
            "a local CA of the build machine is in the image"
        );
    }

    // The SBOM beside it names the image and what is compiled in.
    let sbom_path = PathBuf::from(
        image_archive()
            .display()
            .to_string()
            .replace(".oci.tar", ".cdx.json"),
    );
    let sbom: Value = serde_json::from_slice(&std::fs::read(&sbom_path).unwrap()).unwrap();
    assert_eq!(sbom["bomFormat"], "CycloneDX");
    // Valid against CycloneDX's own schema (strict: no unknown fields).
    let python = Path::new(&std::env::var_os("HOME").unwrap())
        .join(".local/share/credwatch/tools/venv/bin/python");
    let out = Command::new(&python)
        .args([
            "-c",
            "import sys\n\
             from cyclonedx.schema import SchemaVersion\n\
             from cyclonedx.validation.json import JsonStrictValidator\n\
             err = JsonStrictValidator(SchemaVersion.V1_5).validate_str(open(sys.argv[1]).read())\n\
             sys.exit(f'invalid CycloneDX 1.5: {err}' if err else 0)",
        ])
        .arg(&sbom_path)
        .output()
        .unwrap_or_else(|e| {
            panic!(
                "{}: {e} (deploy/validate/install-tools.sh installs it)",
                python.display()
            )
        });
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        sbom["metadata"]["component"]["hashes"][0]["content"],
        from_xtask("CREDWATCH_IMAGE_DIGEST").trim_start_matches("sha256:")
    );
    let purls: BTreeSet<&str> = sbom["components"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["purl"].as_str().unwrap())
        .collect();
    let lock = std::fs::read_to_string(repo().join("Cargo.lock")).unwrap();
    for name in [
        "credwatch",
        "credwatch-ebpf",
        "aya",
        "rustls",
        "ring",
        "libmimalloc-sys",
    ] {
        let version = lock
            .split("[[package]]")
            .find_map(|b| {
                b.contains(&format!("name = \"{name}\"\n"))
                    .then(|| b.split("version = \"").nth(1)?.split('"').next())
                    .flatten()
            })
            .unwrap();
        assert!(
            purls.contains(format!("pkg:cargo/{name}@{version}").as_str()),
            "{name} {version} not in the SBOM"
        );
    }
    for build_only in ["aya-build", "cc", "bpf-linker"] {
        assert!(
            !purls
                .iter()
                .any(|p| p.starts_with(&format!("pkg:cargo/{build_only}@"))),
            "{build_only} is not in the binary"
        );
    }
    assert!(
        purls
            .iter()
            .any(|p| p.starts_with("pkg:deb/debian/musl-dev@"))
    );
    assert!(
        purls
            .iter()
            .any(|p| p.starts_with("pkg:deb/debian/ca-certificates@"))
    );
}

/// The manifests and the chart deploy the tag the build produces, from the repository the
/// README pushes to.
#[test]
#[ignore = "needs the image (cargo xtask test builds it)"]
fn manifests_and_chart_name_the_built_image() {
    let version = skopeo_inspect(false)["Labels"]["org.opencontainers.image.version"]
        .as_str()
        .unwrap()
        .to_owned();
    let repository = from_xtask("CREDWATCH_IMAGE_REPOSITORY");
    let ds = daemonset();
    assert_eq!(
        agent_container(&ds)["image"],
        format!("{repository}:{version}")
    );
    let values = yaml("deploy/helm/credwatch/values.yaml");
    let chart = yaml("deploy/helm/credwatch/Chart.yaml");
    assert_eq!(values["image"]["repository"], repository);
    let tag = values["image"]["tag"].as_str().unwrap();
    assert!(
        tag == version || (tag.is_empty() && chart["appVersion"] == version.as_str()),
        "chart tag {tag:?} / appVersion {} is not {version}",
        chart["appVersion"]
    );
    let readme = std::fs::read_to_string(repo().join("deploy/README.md")).unwrap();
    assert!(
        readme.contains(&format!("docker://{repository}:")),
        "deploy/README.md does not push to {repository}"
    );
}

/// Same commit, same bytes: a second build (another process, another time zone and umask)
/// gives the same archive, digest and SBOM.
#[test]
#[ignore = "needs the image (cargo xtask test builds it)"]
fn image_build_is_reproducible() {
    let w = workdir();
    let again = w.path().join("again.oci.tar");
    let mut cmd = Command::new(from_xtask("CREDWATCH_XTASK"));
    // SAFETY: umask is async-signal-safe.
    unsafe {
        std::os::unix::process::CommandExt::pre_exec(&mut cmd, || {
            libc::umask(0o077);
            Ok(())
        });
    }
    let out = cmd
        .args(["image", "--binary"])
        .arg(from_xtask("CREDWATCH_IMAGE_BINARY"))
        .arg("--output")
        .arg(&again)
        .env("TZ", "Pacific/Kiritimati")
        .env("SOURCE_DATE_EPOCH", "1")
        .current_dir(w.path())
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(
        stderr.contains(&from_xtask("CREDWATCH_IMAGE_DIGEST")),
        "{stderr}"
    );
    let first = std::fs::read(image_archive()).unwrap();
    let second = std::fs::read(&again).unwrap();
    assert!(first == second, "the archives differ");
    let sbom =
        |p: &Path| std::fs::read(p.display().to_string().replace(".oci.tar", ".cdx.json")).unwrap();
    assert!(sbom(&image_archive()) == sbom(&again), "the SBOMs differ");
}

// ---------------------------------------------------------------------------------------
// Privileged: the image under runc, as the kubelet and containerd run the DaemonSet.

/// Fails (never skips) when the privileged tests cannot run here.
fn require_privileges() {
    assert_eq!(
        unsafe { libc::geteuid() },
        0,
        "privileged test: run as root (`cargo xtask test` does in CI)"
    );
    for tool in ["runc", "ip", "skopeo"] {
        assert!(
            Command::new(tool)
                .arg("--version")
                .output()
                .is_ok_and(|o| o.status.success())
                || Command::new(tool)
                    .arg("-V")
                    .output()
                    .is_ok_and(|o| o.status.success()),
            "{tool} is missing: `cargo xtask test` installs it"
        );
    }
    assert!(
        Path::new("/sys/kernel/btf/vmlinux").exists(),
        "the kernel has no BTF"
    );
}

/// One privileged scenario at a time: they share the pod's cgroup path and the CPU.
static SERIAL: Mutex<()> = Mutex::new(());

const KEY: &str = "test-fleet-key-not-secret-32-bytes!";
const NODE: &str = "node-1";
/// The agent pod's own identity (its token is the one it sends to the kubelet).
const AGENT_POD_UID: &str = "c0ffee00-0000-4000-8000-00000000c0de";
const AGENT_POD: &str = "credwatch-x7k2p";
const ALICE: u32 = 1000;

fn cap_name(k8s: &str) -> String {
    format!("CAP_{k8s}")
}

/// Whether this process could grant `cap` to a container (it is in our bounding set).
fn grantable(cap: &str) -> bool {
    let bit = cap_bit(cap);
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let bnd = status
        .lines()
        .find_map(|l| l.strip_prefix("CapBnd:"))
        .unwrap();
    u64::from_str_radix(bnd.trim(), 16).unwrap() & (1 << bit) != 0
}

fn cap_bit(cap: &str) -> u32 {
    match cap {
        "CAP_DAC_READ_SEARCH" => 2,
        "CAP_NET_ADMIN" => 12,
        "CAP_SYS_PTRACE" => 19,
        "CAP_SYS_ADMIN" => 21,
        "CAP_SYS_RESOURCE" => 24,
        "CAP_PERFMON" => 38,
        "CAP_BPF" => 39,
        other => panic!("no bit for {other}"),
    }
}

/// containerd's default capabilities (what a container without `capabilities` gets).
const DEFAULT_CAPS: &[&str] = &[
    "CAP_CHOWN",
    "CAP_DAC_OVERRIDE",
    "CAP_FSETID",
    "CAP_FOWNER",
    "CAP_MKNOD",
    "CAP_NET_RAW",
    "CAP_SETGID",
    "CAP_SETUID",
    "CAP_SETFCAP",
    "CAP_SETPCAP",
    "CAP_NET_BIND_SERVICE",
    "CAP_SYS_CHROOT",
    "CAP_KILL",
    "CAP_AUDIT_WRITE",
];

// ---- containerd's RuntimeDefault seccomp profile -----------------------------------

/// containerd's `RuntimeDefault` seccomp profile for a container with `bounding`, as its
/// CRI plugin computes it (`contrib/seccomp.DefaultProfile`). Read from containerd's own
/// source (Debian's golang-github-containerd-containerd-dev, `CREDWATCH_CONTAINERD_SECCOMP`,
/// fetched by `cargo xtask test`) rather than copied: the allow-list, the x86_64 additions,
/// the capability-gated rules (CAP_BPF → bpf, CAP_PERFMON → perf_event_open, …) and the
/// non-admin clone/clone3 rules.
fn runtime_default_seccomp(bounding: &[String]) -> Value {
    let src = std::fs::read_to_string(from_xtask("CREDWATCH_CONTAINERD_SECCOMP")).unwrap();
    let arches = {
        let f = src.split("func arches()").nth(1).unwrap();
        let line = f
            .lines()
            .skip_while(|l| l.trim() != "case \"amd64\":")
            .nth(1)
            .unwrap();
        line.split("specs.Arch")
            .skip(2)
            .map(|a| {
                format!(
                    "SCMP_ARCH_{}",
                    a.trim_matches(|c: char| c == '}' || c == ',' || c.is_whitespace())
                )
            })
            .collect::<Vec<_>>()
    };
    assert_eq!(
        arches,
        ["SCMP_ARCH_X86_64", "SCMP_ARCH_X86", "SCMP_ARCH_X32"]
    );
    let body = src.split("func DefaultProfile(").nth(1).unwrap();
    let admin = bounding.iter().any(|c| c == "CAP_SYS_ADMIN");
    #[derive(PartialEq)]
    enum Section {
        Base,
        Kernel,
        Arch,
        Caps,
        NotAdmin,
    }
    let mut section = None;
    let mut case: Vec<String> = Vec::new();
    let mut rules: Vec<Value> = Vec::new();
    let mut in_names = false;
    let include = |section: &Section, case: &[String]| match section {
        Section::Base | Section::Kernel => true,
        Section::Arch => case.iter().any(|c| c == "amd64"),
        Section::Caps => case.iter().any(|c| bounding.contains(c)),
        Section::NotAdmin => !admin && !case.iter().any(|c| c.starts_with("s390")),
    };
    let quoted =
        |l: &str| -> Vec<String> { l.split('"').skip(1).step_by(2).map(str::to_owned).collect() };
    let mut current: Option<(bool, Value)> = None;
    let flush = |current: &mut Option<(bool, Value)>, rules: &mut Vec<Value>| {
        if let Some((true, r)) = current.take() {
            rules.push(r);
        }
    };
    for line in body.lines() {
        let t = line.trim();
        let next = if t.starts_with("syscalls := []specs.LinuxSyscall{") {
            Some(Section::Base)
        } else if t == "// include by kernel version" {
            Some(Section::Kernel)
        } else if t == "// include by arch" {
            Some(Section::Arch)
        } else if t == "admin := false" {
            Some(Section::Caps)
        } else if t == "if !admin {" {
            Some(Section::NotAdmin)
        } else {
            None
        };
        if let Some(n) = next {
            flush(&mut current, &mut rules);
            section = Some(n);
            case.clear();
            continue;
        }
        let Some(sec) = &section else { continue };
        if t.starts_with("s := &specs.LinuxSeccomp{") {
            flush(&mut current, &mut rules);
            continue;
        }
        if t.starts_with("case ") && t.ends_with(':') {
            flush(&mut current, &mut rules);
            case = quoted(t);
            continue;
        }
        if t == "default:" {
            flush(&mut current, &mut rules);
            case = vec!["default".into()];
            continue;
        }
        if in_names {
            if t.starts_with('}') {
                in_names = false;
            } else if let Some((_, r)) = &mut current {
                r["names"]
                    .as_array_mut()
                    .unwrap()
                    .extend(quoted(t).into_iter().map(Value::from));
            }
            continue;
        }
        if t.starts_with("Names:") {
            flush(&mut current, &mut rules);
            let names = quoted(t);
            in_names = !t.ends_with("},");
            current = Some((
                include(sec, &case),
                json!({"names": names, "action": "", "args": []}),
            ));
            continue;
        }
        let Some((_, r)) = &mut current else { continue };
        if let Some(a) = t.strip_prefix("Action:") {
            r["action"] = match a.trim().trim_end_matches(',') {
                "specs.ActAllow" => "SCMP_ACT_ALLOW".into(),
                "specs.ActErrno" => "SCMP_ACT_ERRNO".into(),
                other => panic!("seccomp action {other}"),
            };
        } else if let Some(e) = t.strip_prefix("ErrnoRet:") {
            assert_eq!(e.trim(), "&nosys,");
            r["errnoRet"] = (libc::ENOSYS as u32).into();
        } else if let Some(i) = t.strip_prefix("Index:") {
            let i: u64 = i.trim().trim_end_matches(',').parse().unwrap();
            r["args"]
                .as_array_mut()
                .unwrap()
                .push(json!({"index": i, "value": 0, "valueTwo": 0, "op": ""}));
        } else if let Some(v) = t.strip_prefix("Value:") {
            let v = go_value(v.trim().trim_end_matches(','));
            *r["args"].as_array_mut().unwrap().last_mut().unwrap() = {
                let mut a = r["args"].as_array().unwrap().last().unwrap().clone();
                a["value"] = v.into();
                a
            };
        } else if let Some(v) = t.strip_prefix("ValueTwo:") {
            let v = go_value(v.trim().trim_end_matches(','));
            r["args"].as_array_mut().unwrap().last_mut().unwrap()["valueTwo"] = v.into();
        } else if let Some(op) = t.strip_prefix("Op:") {
            r["args"].as_array_mut().unwrap().last_mut().unwrap()["op"] =
                match op.trim().trim_end_matches(',') {
                    "specs.OpEqualTo" => "SCMP_CMP_EQ",
                    "specs.OpMaskedEqual" => "SCMP_CMP_MASKED_EQ",
                    other => panic!("seccomp op {other}"),
                }
                .into();
        }
    }
    flush(&mut current, &mut rules);
    let allowed: usize = rules
        .iter()
        .filter(|r| r["action"] == "SCMP_ACT_ALLOW")
        .map(|r| r["names"].as_array().unwrap().len())
        .sum();
    assert!(allowed > 300, "parsed only {allowed} allowed syscalls");
    assert!(rules.iter().all(|r| r["action"] != ""));
    let allows = |name: &str| {
        rules.iter().any(|r| {
            r["action"] == "SCMP_ACT_ALLOW"
                && r["names"].as_array().unwrap().iter().any(|n| n == name)
        })
    };
    assert!(allows("openat") && allows("arch_prctl"));
    assert_eq!(
        allows("bpf"),
        admin || bounding.iter().any(|c| c == "CAP_BPF")
    );
    assert_eq!(
        allows("perf_event_open"),
        admin || bounding.iter().any(|c| c == "CAP_PERFMON")
    );
    json!({
        "defaultAction": "SCMP_ACT_ERRNO",
        "architectures": arches,
        "syscalls": rules,
    })
}

/// A Go constant expression of the profile: a number or an OR of `unix.CLONE_*` flags.
fn go_value(v: &str) -> u64 {
    v.split('|')
        .map(|p| {
            let p = p.trim();
            if let Some(h) = p.strip_prefix("0x") {
                u64::from_str_radix(h, 16).unwrap()
            } else if let Ok(n) = p.parse() {
                n
            } else {
                (match p {
                    "unix.CLONE_NEWNS" => libc::CLONE_NEWNS,
                    "unix.CLONE_NEWUTS" => libc::CLONE_NEWUTS,
                    "unix.CLONE_NEWIPC" => libc::CLONE_NEWIPC,
                    "unix.CLONE_NEWUSER" => libc::CLONE_NEWUSER,
                    "unix.CLONE_NEWPID" => libc::CLONE_NEWPID,
                    "unix.CLONE_NEWNET" => libc::CLONE_NEWNET,
                    "unix.CLONE_NEWCGROUP" => libc::CLONE_NEWCGROUP,
                    other => panic!("Go constant {other}"),
                }) as u64
            }
        })
        .fold(0, |a, b| a | b)
}

// ---- pod networking -----------------------------------------------------------------

/// A pod network namespace wired to the host by a veth pair (what a CNI plugin does):
/// the host side has `host_ip`, the pod's eth0 `pod_ip`, default route via the host.
struct PodNet {
    name: String,
    host_ip: Ipv4Addr,
    pod_ip: Ipv4Addr,
}

impl PodNet {
    fn create(tag: &str) -> PodNet {
        static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let subnet = (std::process::id() * 7 + n) % 240 + 10;
        let host_ip = Ipv4Addr::new(10, 213, subnet as u8, 1);
        let pod_ip = Ipv4Addr::new(10, 213, subnet as u8, 2);
        let name = format!("cw{tag}{}-{n}", std::process::id());
        let host_if = format!("cwh{}{n}", std::process::id() % 100_000);
        let peer = format!("cwp{}{n}", std::process::id() % 100_000);
        let ip = |args: &[&str]| {
            command_output(Command::new("ip").args(args));
        };
        let _ = Command::new("ip").args(["netns", "del", &name]).output();
        let _ = Command::new("ip").args(["link", "del", &host_if]).output();
        ip(&["netns", "add", &name]);
        let net = PodNet {
            name: name.clone(),
            host_ip,
            pod_ip,
        };
        ip(&[
            "link", "add", &host_if, "type", "veth", "peer", "name", &peer,
        ]);
        ip(&["link", "set", &peer, "netns", &name]);
        ip(&["-n", &name, "link", "set", &peer, "name", "eth0"]);
        ip(&[
            "-n",
            &name,
            "addr",
            "add",
            &format!("{pod_ip}/24"),
            "dev",
            "eth0",
        ]);
        ip(&["-n", &name, "link", "set", "eth0", "up"]);
        ip(&["-n", &name, "link", "set", "lo", "up"]);
        ip(&[
            "-n",
            &name,
            "route",
            "add",
            "default",
            "via",
            &host_ip.to_string(),
        ]);
        ip(&["addr", "add", &format!("{host_ip}/24"), "dev", &host_if]);
        ip(&["link", "set", &host_if, "up"]);
        net
    }

    fn path(&self) -> String {
        format!("/run/netns/{}", self.name)
    }
}

impl Drop for PodNet {
    fn drop(&mut self) {
        // Deleting the namespace destroys eth0 and with it the host side of the pair.
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .output();
    }
}

// ---- the kubelet ----------------------------------------------------------------------

/// The kubelet's `/pods` on `ip:10250` over HTTPS with a self-signed serving certificate
/// (as kubelets without serverTLSBootstrap have), answering the recorded PodList. Keeps
/// each request's request line and Authorization header.
struct Kubelet {
    /// Its certificate (PEM): the CA the agent's service-account `ca.crt` holds.
    ca_pem: String,
    requests: Arc<Mutex<Vec<(String, String)>>>,
    stop: Arc<std::sync::atomic::AtomicBool>,
    server: Option<std::thread::JoinHandle<()>>,
}

impl Kubelet {
    fn serve(ip: Ipv4Addr) -> Kubelet {
        let body = std::fs::read(credwatch_tests::fixture("kubelet-pods.json")).unwrap();
        let (cfg, ca_pem) = credwatch_tests::tls_server(&ip.to_string());
        let listener = TcpListener::bind((ip, 10250)).unwrap();
        listener.set_nonblocking(true).unwrap();
        let requests = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let (seen, stopped) = (requests.clone(), stop.clone());
        let server = std::thread::spawn(move || {
            while !stopped.load(std::sync::atomic::Ordering::Relaxed) {
                let Ok((conn, _)) = listener.accept() else {
                    std::thread::sleep(Duration::from_millis(20));
                    continue;
                };
                let _ = conn.set_nonblocking(false);
                let (cfg, seen, body) = (cfg.clone(), seen.clone(), body.clone());
                std::thread::spawn(move || {
                    let _ = conn.set_read_timeout(Some(Duration::from_secs(10)));
                    let tls = rustls::ServerConnection::new(cfg).unwrap();
                    let mut s = rustls::StreamOwned::new(tls, conn);
                    let mut head = Vec::new();
                    let mut b = [0u8; 1];
                    while !head.ends_with(b"\r\n\r\n") {
                        match s.read(&mut b) {
                            Ok(1) => head.push(b[0]),
                            _ => return,
                        }
                    }
                    let head = String::from_utf8_lossy(&head).into_owned();
                    let line = head.lines().next().unwrap_or_default().to_owned();
                    let auth = head
                        .lines()
                        .find_map(|l| {
                            let (k, v) = l.split_once(':')?;
                            k.eq_ignore_ascii_case("authorization")
                                .then(|| v.trim().to_owned())
                        })
                        .unwrap_or_default();
                    seen.lock().unwrap().push((line, auth));
                    let _ = write!(
                        s,
                        "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                        body.len()
                    );
                    let _ = s.write_all(&body);
                    let _ = s.flush();
                    s.conn.send_close_notify();
                    let _ = s.flush();
                });
            }
        });
        Kubelet {
            ca_pem,
            requests,
            stop,
            server: Some(server),
        }
    }
}

impl Drop for Kubelet {
    fn drop(&mut self) {
        // Stop listening before the next run binds the same address.
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        if let Some(s) = self.server.take() {
            let _ = s.join();
        }
    }
}

// ---- runc -----------------------------------------------------------------------------

/// A container run by `runc run` in the foreground (its stdio is ours), removed on drop
/// with the pod's cgroup directories.
struct Container {
    id: String,
    runc_root: PathBuf,
    bundle: PathBuf,
    child: Mutex<Option<Child>>,
    stdout: Arc<Mutex<Vec<String>>>,
    stderr: Arc<Mutex<Vec<String>>>,
    /// `kubepods/<qos>/pod<uid>`, removed from every hierarchy on drop.
    pod_cgroup: String,
}

impl Container {
    fn run(runc_root: &Path, id: &str, bundle: &Path, spec: &Value) -> Container {
        std::fs::write(
            bundle.join("config.json"),
            serde_json::to_vec_pretty(spec).unwrap(),
        )
        .unwrap();
        let mut child = Command::new("runc")
            .arg("--root")
            .arg(runc_root)
            .args(["run", "--pid-file"])
            .arg(bundle.join("pid"))
            .arg("--bundle")
            .arg(bundle)
            .arg(id)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawning runc");
        let lines = |r: Box<dyn Read + Send>| {
            let sink = Arc::new(Mutex::new(Vec::new()));
            let s = sink.clone();
            std::thread::spawn(move || {
                for l in BufReader::new(r).lines().map_while(Result::ok) {
                    s.lock().unwrap().push(l);
                }
            });
            sink
        };
        let stdout = lines(Box::new(child.stdout.take().unwrap()));
        let stderr = lines(Box::new(child.stderr.take().unwrap()));
        let cg = spec["linux"]["cgroupsPath"].as_str().unwrap();
        Container {
            id: id.to_owned(),
            runc_root: runc_root.to_owned(),
            bundle: bundle.to_owned(),
            child: Mutex::new(Some(child)),
            stdout,
            stderr,
            pod_cgroup: cg
                .trim_start_matches('/')
                .rsplit_once('/')
                .unwrap()
                .0
                .to_owned(),
        }
    }

    fn runc(&self, args: &[&str]) -> std::process::Output {
        Command::new("runc")
            .arg("--root")
            .arg(&self.runc_root)
            .args(args)
            .output()
            .unwrap()
    }

    /// The container's init pid (a host pid) once it runs; None if it already exited.
    /// The container's init pid (a host pid), from `runc run --pid-file`, once it started.
    fn pid(&self, timeout: Duration) -> Option<u32> {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if let Some(p) = std::fs::read_to_string(self.bundle.join("pid"))
                .ok()
                .and_then(|p| p.trim().parse().ok())
            {
                return Some(p);
            }
            if self.exited().is_some() {
                return None;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        None
    }

    fn exited(&self) -> Option<std::process::ExitStatus> {
        self.child
            .lock()
            .unwrap()
            .as_mut()?
            .try_wait()
            .ok()
            .flatten()
    }

    fn wait(&self, timeout: Duration) -> Option<std::process::ExitStatus> {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if let Some(s) = self.exited() {
                // Let the readers take the last lines.
                std::thread::sleep(Duration::from_millis(100));
                return Some(s);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        None
    }

    fn kill(&self, signal: &str) {
        let _ = self.runc(&["kill", &self.id, signal]);
    }

    fn stderr_text(&self) -> String {
        self.stderr.lock().unwrap().join("\n")
    }

    fn stdout_text(&self) -> String {
        self.stdout.lock().unwrap().join("\n")
    }

    fn wait_stderr(&self, timeout: Duration, needle: &str) -> bool {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if self.stderr_text().contains(needle) {
                return true;
            }
            if self.exited().is_some() {
                std::thread::sleep(Duration::from_millis(100));
                return self.stderr_text().contains(needle);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        false
    }
}

impl Drop for Container {
    fn drop(&mut self) {
        self.kill("KILL");
        if let Some(mut c) = self.child.lock().unwrap().take() {
            let _ = c.wait();
        }
        let _ = self.runc(&["delete", "--force", &self.id]);
        for hierarchy in std::fs::read_dir("/sys/fs/cgroup").into_iter().flatten() {
            let mut p = hierarchy.unwrap().path().join(&self.pod_cgroup);
            // pod<uid>, then the QoS class and kubepods if nothing else is left in them.
            for _ in 0..3 {
                if std::fs::remove_dir(&p).is_err() {
                    break;
                }
                p.pop();
            }
        }
    }
}

/// A tmpfs mounted at `dir` (the kubelet puts secret and projected volumes on tmpfs),
/// unmounted on drop.
struct Tmpfs(PathBuf);

impl Tmpfs {
    fn mount(dir: &Path) -> Tmpfs {
        std::fs::create_dir_all(dir).unwrap();
        command_output(
            Command::new("mount")
                .args(["-t", "tmpfs", "-o", "mode=0755,size=1m", "tmpfs"])
                .arg(dir),
        );
        Tmpfs(dir.to_owned())
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).output();
    }
}

/// `dir` bind-mounted on itself and made a shared peer group, as the kubelet's root is on a
/// node (so mounts under it propagate to HostToContainer mounts); unmounted on drop.
struct SharedDir(PathBuf);

impl SharedDir {
    fn make(dir: &Path) -> SharedDir {
        std::fs::create_dir_all(dir).unwrap();
        command_output(Command::new("mount").arg("--bind").arg(dir).arg(dir));
        command_output(Command::new("mount").arg("--make-rshared").arg(dir));
        SharedDir(dir.to_owned())
    }
}

impl Drop for SharedDir {
    fn drop(&mut self) {
        let _ = Command::new("umount")
            .arg("-R")
            .arg("-l")
            .arg(&self.0)
            .output();
    }
}

fn bind(src: &Path, dst: &str, options: &[&str]) -> Value {
    json!({"destination": dst, "type": "bind", "source": src, "options": options})
}

/// The mounts containerd gives every container before the CRI's own (oci.populateDefaultUnixSpec).
fn runtime_mounts() -> Vec<Value> {
    vec![
        json!({"destination": "/proc", "type": "proc", "source": "proc", "options": ["nosuid", "noexec", "nodev"]}),
        json!({"destination": "/dev", "type": "tmpfs", "source": "tmpfs", "options": ["nosuid", "strictatime", "mode=755", "size=65536k"]}),
        json!({"destination": "/dev/pts", "type": "devpts", "source": "devpts", "options": ["nosuid", "noexec", "newinstance", "ptmxmode=0666", "mode=0620", "gid=5"]}),
        json!({"destination": "/dev/shm", "type": "tmpfs", "source": "shm", "options": ["nosuid", "noexec", "nodev", "mode=1777", "size=65536k"]}),
        json!({"destination": "/dev/mqueue", "type": "mqueue", "source": "mqueue", "options": ["nosuid", "noexec", "nodev"]}),
        json!({"destination": "/sys", "type": "sysfs", "source": "sysfs", "options": ["nosuid", "noexec", "nodev", "ro"]}),
        json!({"destination": "/sys/fs/cgroup", "type": "cgroup", "source": "cgroup", "options": ["nosuid", "noexec", "nodev", "relatime", "ro"]}),
    ]
}

/// containerd's masked and read-only paths for a container that is not privileged.
fn masked_and_readonly() -> (Value, Value) {
    (
        json!([
            "/proc/acpi",
            "/proc/asound",
            "/proc/kcore",
            "/proc/keys",
            "/proc/latency_stats",
            "/proc/timer_list",
            "/proc/timer_stats",
            "/proc/sched_debug",
            "/sys/firmware",
            "/sys/devices/virtual/powercap",
            "/proc/scsi"
        ]),
        json!([
            "/proc/bus",
            "/proc/fs",
            "/proc/irq",
            "/proc/sys",
            "/proc/sysrq-trigger"
        ]),
    )
}

/// `mounts` in the order a runtime mounts them: runtime defaults replaced by CRI mounts to
/// the same destination, parents before children.
fn ordered(mut defaults: Vec<Value>, cri: Vec<Value>) -> Vec<Value> {
    defaults.retain(|d| !cri.iter().any(|c| c["destination"] == d["destination"]));
    defaults.extend(cri);
    defaults.sort_by_key(|m| {
        m["destination"]
            .as_str()
            .unwrap()
            .trim_end_matches('/')
            .matches('/')
            .count()
    });
    defaults
}

/// `1Gi`, `256Mi` → bytes; `100m`, `1` → millicores.
fn quantity(q: &str) -> u64 {
    for (suffix, mul) in [("Gi", 1u64 << 30), ("Mi", 1 << 20), ("Ki", 1 << 10)] {
        if let Some(n) = q.strip_suffix(suffix) {
            return n.parse::<u64>().unwrap() * mul;
        }
    }
    match q.strip_suffix('m') {
        Some(m) => m.parse().unwrap(),
        None => q.parse::<u64>().unwrap() * 1000,
    }
}

fn quantity_of(v: &Value) -> u64 {
    match v {
        Value::String(s) => quantity(s),
        Value::Number(n) => n.as_u64().unwrap() * 1000,
        _ => panic!("quantity {v}"),
    }
}

/// Where the test puts what the DaemonSet takes from the node.
struct AgentHost {
    /// hostPath → directory used instead (paths tests must not write to).
    redirect: BTreeMap<&'static str, PathBuf>,
    config: PathBuf,
    service_account: PathBuf,
    etc: PathBuf,
    node_ip: Ipv4Addr,
    pod_ip: Ipv4Addr,
    netns: String,
}

/// The OCI runtime config the kubelet and containerd produce for the DaemonSet's container:
/// read from deploy/kubernetes/daemonset.yaml, minus `without` (a capability), plus `--events`
/// and `--stats-file` on the state dir mount for the test to read.
fn agent_spec(ds: &Value, host: &AgentHost, v: &Variant, cgroup: &str) -> Value {
    let without = v.without.as_deref();
    let pod = &ds["spec"]["template"]["spec"];
    let c = agent_container(ds);
    let sc = &c["securityContext"];
    assert_eq!(sc["privileged"], false);
    assert_eq!(pod["hostNetwork"], false);
    assert_eq!(pod["hostIPC"], false);

    let caps: Vec<String> = sc["capabilities"]["add"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| cap_name(c.as_str().unwrap()))
        .filter(|c| Some(c.as_str()) != without.map(cap_name).as_deref())
        .filter(|c| grantable(c))
        .collect();
    assert_eq!(sc["capabilities"]["drop"], json!(["ALL"]));

    // Environment: the image's, the pod's (downward API, $(VAR) expanded), the kubelet's.
    let mut env: Vec<(String, String)> = vec![
        ("PATH".into(), "/usr/local/bin".into()),
        ("HOSTNAME".into(), AGENT_POD.into()),
    ];
    for e in c["env"].as_array().unwrap() {
        let name = e["name"].as_str().unwrap().to_owned();
        let value = if let Some(v) = e["value"].as_str() {
            let mut v = v.to_owned();
            for (k, val) in &env {
                v = v.replace(&format!("$({k})"), val);
            }
            v
        } else {
            match e["valueFrom"]["fieldRef"]["fieldPath"].as_str().unwrap() {
                "spec.nodeName" => NODE.into(),
                "status.hostIP" => host.node_ip.to_string(),
                "status.podIP" => host.pod_ip.to_string(),
                other => panic!("fieldRef {other}"),
            }
        };
        env.push((name, value));
    }
    env.extend([
        ("KUBERNETES_SERVICE_HOST".into(), "10.96.0.1".into()),
        ("KUBERNETES_SERVICE_PORT".into(), "443".into()),
        ("KUBERNETES_SERVICE_PORT_HTTPS".into(), "443".into()),
        ("KUBERNETES_PORT".into(), "tcp://10.96.0.1:443".into()),
    ]);

    // Volumes → mounts, with the flags the kubelet asks containerd for.
    let volumes: BTreeMap<&str, &Value> = pod["volumes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| (v["name"].as_str().unwrap(), v))
        .collect();
    let mut mounts = Vec::new();
    for m in c["volumeMounts"].as_array().unwrap() {
        let v = volumes[m["name"].as_str().unwrap()];
        let source = if let Some(p) = v["hostPath"]["path"].as_str() {
            host.redirect
                .get(p)
                .cloned()
                .unwrap_or_else(|| PathBuf::from(p))
        } else if v["projected"].is_object() {
            host.config.clone()
        } else {
            panic!("volume {v}")
        };
        let propagation = match m["mountPropagation"].as_str() {
            None | Some("None") => "rprivate",
            Some("HostToContainer") => "rslave",
            Some("Bidirectional") => "rshared",
            Some(other) => panic!("mountPropagation {other}"),
        };
        let ro = if m["readOnly"] == true {
            // recursiveReadOnly: IfPossible → recursive where the kernel can (5.12+).
            if m["recursiveReadOnly"] == "IfPossible" || m["recursiveReadOnly"] == "Enabled" {
                "rro"
            } else {
                "ro"
            }
        } else {
            "rw"
        };
        mounts.push(bind(
            &source,
            m["mountPath"].as_str().unwrap(),
            &["rbind", propagation, ro],
        ));
    }
    // automountServiceAccountToken, and the files the kubelet and containerd add.
    assert_eq!(pod["automountServiceAccountToken"], true);
    mounts.push(bind(
        &host.service_account,
        "/var/run/secrets/kubernetes.io/serviceaccount",
        &["rbind", "rprivate", "ro"],
    ));
    for f in ["hosts", "hostname", "resolv.conf"] {
        mounts.push(bind(
            &host.etc.join(f),
            &format!("/etc/{f}"),
            &["rbind", "rprivate", "ro"],
        ));
    }
    mounts.push(bind(
        &host.etc.join("termination-log"),
        "/dev/termination-log",
        &["rbind", "rprivate", "rw"],
    ));
    let mounts = ordered(runtime_mounts(), mounts);

    let mut args: Vec<Value> = c["command"].as_array().unwrap().clone();
    args.extend(c["args"].as_array().unwrap().iter().cloned());
    args.extend(
        [
            "--events",
            "/var/lib/credwatch/events.ndjson",
            "--stats-file",
            "/var/lib/credwatch/stats.json",
        ]
        .map(Value::from),
    );

    let res = &c["resources"];
    let (masked, readonly) = masked_and_readonly();
    let mut linux = json!({
        "cgroupsPath": cgroup,
        "resources": {
            "devices": [{"allow": false, "access": "rwm"}],
            "memory": {"limit": quantity_of(&res["limits"]["memory"])},
            "cpu": {
                "shares": quantity_of(&res["requests"]["cpu"]) * 1024 / 1000,
                "quota": quantity_of(&res["limits"]["cpu"]) * 100,
                "period": 100_000,
            },
        },
        // hostPID: no pid namespace. The pod's network namespace, its own ipc and uts.
        "namespaces": [
            {"type": "mount"},
            {"type": "ipc"},
            {"type": "uts"},
            {"type": "network", "path": host.netns},
        ],
        "maskedPaths": masked,
        "readonlyPaths": readonly,
    });
    assert_eq!(pod["hostPID"], true);
    match pod["securityContext"]["seccompProfile"]["type"].as_str() {
        Some("RuntimeDefault") => {
            // A runtime from before the CAP_BPF/CAP_PERFMON rules (containerd < 1.6.9) gives
            // the profile those capabilities would not unlock.
            let unlocking: Vec<String> = caps
                .iter()
                .filter(|c| !(v.old_seccomp && (*c == "CAP_BPF" || *c == "CAP_PERFMON")))
                .cloned()
                .collect();
            linux["seccomp"] = runtime_default_seccomp(&unlocking)
        }
        other => panic!("seccompProfile {other:?}"),
    }
    assert_eq!(
        pod["securityContext"]["appArmorProfile"]["type"],
        "Unconfined"
    );

    json!({
        "ociVersion": "1.0.2",
        "process": {
            "terminal": false,
            "user": {
                "uid": sc["runAsUser"],
                "gid": sc["runAsGroup"],
                "additionalGids": [sc["runAsGroup"]],
            },
            "args": args,
            "env": env.iter().map(|(k, v)| format!("{k}={v}")).collect::<Vec<_>>(),
            "cwd": "/",
            "capabilities": {"bounding": caps, "effective": caps, "permitted": caps},
            "noNewPrivileges": sc["allowPrivilegeEscalation"] == false,
        },
        "root": {"path": "rootfs", "readonly": sc["readOnlyRootFilesystem"] == true},
        "hostname": AGENT_POD,
        "mounts": mounts,
        "linux": linux,
    })
}

/// A workload container of pod payments/api-7f9c (BestEffort, uid 1000), what containerd
/// makes of a plain pod spec: default capabilities (none effective for a non-root user),
/// RuntimeDefault seccomp, the pod's token volume bind-mounted read-only at the in-pod path.
/// Its process is bash (from the host's /usr, read-only): it opens a FIFO and waits on it,
/// so it predates the agent; then it reads its token and alice's AWS credentials and
/// connects to `dst`, and keeps running (like the pod's main process) until told to exit.
fn workload_spec(
    token_volume: &Path,
    home: &Path,
    signal: &Path,
    cgroup: &str,
    netns: &str,
    dst: (Ipv4Addr, u16),
) -> Value {
    let script = format!(
        "exec 9</signal/go; read -r _ <&9; \
         read -r _ < /var/run/secrets/kubernetes.io/serviceaccount/token; \
         read -r _ < /home/alice/.aws/credentials; \
         exec 3<>/dev/tcp/{}/{} && echo connected; exec 3>&-; \
         read -r _ <&9; echo done",
        dst.0, dst.1
    );
    let caps: Vec<String> = DEFAULT_CAPS.iter().map(|c| c.to_string()).collect();
    let (masked, readonly) = masked_and_readonly();
    let mounts = ordered(
        runtime_mounts(),
        vec![
            bind(Path::new("/usr"), "/usr", &["rbind", "rprivate", "ro"]),
            bind(
                token_volume,
                "/var/run/secrets/kubernetes.io/serviceaccount",
                &["rbind", "rprivate", "ro"],
            ),
            bind(home, "/home", &["rbind", "rprivate", "ro"]),
            bind(signal, "/signal", &["rbind", "rprivate", "rw"]),
        ],
    );
    json!({
        "ociVersion": "1.0.2",
        "process": {
            "terminal": false,
            "user": {"uid": ALICE, "gid": ALICE, "additionalGids": [ALICE]},
            "args": ["/usr/bin/bash", "-c", script],
            "env": ["PATH=/usr/bin", "HOSTNAME=api-7f9c"],
            "cwd": "/",
            "capabilities": {"bounding": caps, "effective": [], "permitted": []},
            "noNewPrivileges": false,
        },
        "root": {"path": "rootfs", "readonly": false},
        "hostname": "api-7f9c",
        "mounts": mounts,
        "linux": {
            "cgroupsPath": cgroup,
            "resources": {"devices": [{"allow": false, "access": "rwm"}]},
            "namespaces": [
                {"type": "pid"}, {"type": "mount"}, {"type": "ipc"}, {"type": "uts"},
                {"type": "network", "path": netns},
            ],
            "maskedPaths": masked,
            "readonlyPaths": readonly,
            "seccomp": runtime_default_seccomp(&caps),
        },
    })
}

/// A bundle whose rootfs has the host's /usr mounted and the merged-/usr links.
fn host_usr_bundle(dir: &Path) -> PathBuf {
    let rootfs = dir.join("rootfs");
    std::fs::create_dir_all(&rootfs).unwrap();
    for (link, to) in [
        ("bin", "usr/bin"),
        ("lib", "usr/lib"),
        ("lib64", "usr/lib64"),
        ("sbin", "usr/sbin"),
    ] {
        std::os::unix::fs::symlink(to, rootfs.join(link)).unwrap();
    }
    dir.to_owned()
}

/// What one run of the agent's image produced.
struct Run {
    ready: bool,
    exit: Option<std::process::ExitStatus>,
    stderr: String,
    stdout: String,
    events: Vec<Event>,
    /// The events file as the agent wrote it (to check no secret value is in it).
    events_text: String,
    workload_pid: u32,
    workload_out: String,
    /// /proc/<agent>/status and mountinfo, the agent's and our pid namespace, while it ran.
    status: String,
    mountinfo: String,
    pid_ns: (String, String),
    healthz: String,
    kubelet_requests: Vec<(String, String)>,
    agent_token: String,
    pod_token: String,
    /// secret_read events of pod billing/worker-2, whose volume appeared after the start.
    late_pod_reads: Vec<Event>,
    late_pod_diag: String,
    workload_cgroups: String,
    dst: (Ipv4Addr, u16),
}

fn http_get(ip: Ipv4Addr, port: u16, path: &str) -> String {
    let Ok(mut s) = TcpStream::connect_timeout(&(ip, port).into(), Duration::from_secs(5)) else {
        return String::new();
    };
    let _ = s.set_read_timeout(Some(Duration::from_secs(5)));
    let _ = write!(s, "GET {path} HTTP/1.0\r\nHost: {ip}\r\n\r\n");
    let mut out = String::new();
    let _ = s.read_to_string(&mut out);
    out
}

/// Runs the image as the DaemonSet (minus `drop`) next to a workload of pod
/// payments/api-7f9c; with `late_pod`, also a second pod whose token volume is mounted
/// under the kubelet's root after the agent started (HostToContainer propagation).
/// How a run differs from the DaemonSet as written.
#[derive(Default)]
struct Variant {
    /// A capability taken away.
    without: Option<String>,
    /// containerd's RuntimeDefault profile as it was before 1.6.9 (bpf(2) and
    /// perf_event_open(2) only with CAP_SYS_ADMIN).
    old_seccomp: bool,
    /// Also a pod whose volume appears after the agent started.
    late_pod: bool,
}

fn run_agent(v: Variant) -> Run {
    let late_pod = v.late_pod;
    let w = workdir();
    let base = w.path();
    let id = unique("cw");
    let runc_root = base.join("runc");

    // The node's kubelet root (a shared mount, as on a node) with pod A's token volume on
    // tmpfs; alice's home with her AWS credentials (0600, hers only).
    let kubelet_root = base.join("kubelet");
    let _kubelet_mount = SharedDir::make(&kubelet_root);
    let vol_a_dir = kubelet_root.join(format!(
        "pods/{UID_A}/volumes/kubernetes.io~projected/kube-api-access-a"
    ));
    let _vol_a_tmpfs = Tmpfs::mount(&vol_a_dir);
    let pod_token = fake_sa_token("payments", "payments-api", "api-7f9c", UID_A, 21);
    let vol_a = PodVolume::create(&kubelet_root, UID_A, "kube-api-access-a", &pod_token);
    let home = base.join("home");
    let aws = home.join("alice/.aws");
    std::fs::create_dir_all(&aws).unwrap();
    let creds = "[default]\naws_access_key_id = AKIAFAKEEXAMPLE00042\naws_secret_access_key = fakeSecretForTheImageTestOnly/000000000000\n";
    std::fs::write(aws.join("credentials"), creds).unwrap();
    for (p, mode) in [
        (aws.join("credentials"), 0o600),
        (aws.clone(), 0o700),
        (home.join("alice"), 0o700),
    ] {
        std::os::unix::fs::chown(&p, Some(ALICE), Some(ALICE)).unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(mode)).unwrap();
    }
    let state = base.join("state");
    std::fs::create_dir_all(&state).unwrap();

    // The pod's projected config volume: the ConfigMap's credwatch.toml (ClickHouse pointed
    // at a closed port: batches spool in the state dir) and the Secret's files.
    let config = base.join("config");
    std::fs::create_dir_all(config.join("secret")).unwrap();
    let cm = yaml("deploy/kubernetes/configmap.yaml");
    let toml = cm["data"]["credwatch.toml"].as_str().unwrap();
    let ch_url = "url = \"https://clickhouse.example.internal:8443\"";
    assert!(toml.contains(ch_url), "configmap.yaml changed: {toml}");
    std::fs::write(
        config.join("credwatch.toml"),
        toml.replace(ch_url, "url = \"http://127.0.0.1:9\""),
    )
    .unwrap();
    for (f, v) in [
        ("fingerprint.key", KEY),
        ("clickhouse-password", "not-a-real-password"),
    ] {
        let p = config.join("secret").join(f);
        std::fs::write(&p, v).unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o400)).unwrap();
    }
    // The agent pod's own service-account token (what it shows the kubelet).
    let service_account = base.join("agent-sa");
    std::fs::create_dir_all(&service_account).unwrap();
    let agent_token = fake_sa_token("credwatch", "credwatch", AGENT_POD, AGENT_POD_UID, 7);
    std::fs::write(service_account.join("token"), &agent_token).unwrap();
    std::fs::write(service_account.join("namespace"), "credwatch").unwrap();
    let etc = base.join("etc");
    std::fs::create_dir_all(&etc).unwrap();
    std::fs::write(etc.join("hosts"), "127.0.0.1 localhost\n").unwrap();
    std::fs::write(etc.join("hostname"), format!("{AGENT_POD}\n")).unwrap();
    std::fs::write(
        etc.join("resolv.conf"),
        "nameserver 10.96.0.10\noptions ndots:5\n",
    )
    .unwrap();
    std::fs::write(etc.join("termination-log"), "").unwrap();

    // Pod networks, the kubelet at the node IP, and where the workload connects.
    let agent_net = PodNet::create("a");
    let workload_net = PodNet::create("w");
    let kubelet = Kubelet::serve(agent_net.host_ip);
    // The agent verifies the kubelet's certificate against this, as the DaemonSet does.
    std::fs::write(service_account.join("ca.crt"), &kubelet.ca_pem).unwrap();
    let listener = TcpListener::bind((workload_net.host_ip, 0)).unwrap();
    let dst = (workload_net.host_ip, listener.local_addr().unwrap().port());
    std::thread::spawn(move || for _ in listener.incoming() {});

    // The workload, started (and waiting) before the agent.
    let signal = base.join("signal");
    std::fs::create_dir_all(&signal).unwrap();
    std::fs::set_permissions(&signal, std::fs::Permissions::from_mode(0o777)).unwrap();
    let fifo = std::ffi::CString::new(signal.join("go").to_str().unwrap()).unwrap();
    assert_eq!(unsafe { libc::mkfifo(fifo.as_ptr(), 0o666) }, 0);
    let wl_bundle = host_usr_bundle(&base.join("workload"));
    let workload_cgroup = format!("/kubepods/besteffort/pod{UID_A}/{CID_A}");
    let workload = Container::run(
        &runc_root,
        &format!("{id}-api"),
        &wl_bundle,
        &workload_spec(
            &vol_a.dir,
            &home,
            &signal,
            &workload_cgroup,
            &workload_net.path(),
            dst,
        ),
    );
    let workload_pid = workload.pid(Duration::from_secs(20)).unwrap_or_else(|| {
        panic!(
            "the workload container did not start: {}",
            workload.stderr_text()
        )
    });

    let workload_cgroups = format!(
        "{} (unified inode {:?})",
        std::fs::read_to_string(format!("/proc/{workload_pid}/cgroup")).unwrap_or_default(),
        std::fs::metadata(format!("/sys/fs/cgroup/unified{workload_cgroup}")).map(|m| m.ino())
    );
    // The agent.
    let agent_bundle = base.join("agent");
    unpack(&image_archive(), &agent_bundle.join("rootfs"));
    let host = AgentHost {
        redirect: BTreeMap::from([
            ("/var/lib/kubelet", kubelet_root.clone()),
            ("/home", home.clone()),
            ("/var/lib/credwatch", state.clone()),
        ]),
        config,
        service_account,
        etc,
        node_ip: agent_net.host_ip,
        pod_ip: agent_net.pod_ip,
        netns: agent_net.path(),
    };
    // A container id as containerd makes them: 64 hex digits.
    let agent_cid = hex::encode(<sha2::Sha256 as sha2::Digest>::digest(id.as_bytes()));
    let agent_cgroup = format!("/kubepods/burstable/pod{AGENT_POD_UID}/{agent_cid}");
    let spec = agent_spec(&daemonset(), &host, &v, &agent_cgroup);
    let agent = Container::run(&runc_root, &format!("{id}-agent"), &agent_bundle, &spec);
    let ready = agent.wait_stderr(Duration::from_secs(90), "credwatch ready");
    let agent_pid = agent.pid(Duration::from_secs(1));
    let proc_file = |f: &str| {
        agent_pid
            .and_then(|p| std::fs::read_to_string(format!("/proc/{p}/{f}")).ok())
            .unwrap_or_default()
    };
    let (status, mountinfo) = (proc_file("status"), proc_file("mountinfo"));
    let pid_ns = (
        agent_pid
            .and_then(|p| std::fs::read_link(format!("/proc/{p}/ns/pid")).ok())
            .map(|l| l.display().to_string())
            .unwrap_or_default(),
        std::fs::read_link("/proc/self/ns/pid")
            .unwrap()
            .display()
            .to_string(),
    );

    let mut healthz = String::new();
    let (mut late_pod_reads, mut late_pod_diag) = (Vec::new(), String::new());
    if ready {
        // Go: the workload reads and connects; wait for it and for the agent's events.
        let mut go = std::fs::OpenOptions::new()
            .write(true)
            .open(signal.join("go"))
            .unwrap();
        go.write_all(b"go\n").unwrap();
        let events = state.join("events.ndjson");
        let deadline = Instant::now() + Duration::from_secs(15);
        while Instant::now() < deadline
            && !read_events(&events).iter().any(|e| {
                e.process.tgid == workload_pid
                    && matches!(e.kind(), EventKind::Connect | EventKind::CredentialUse)
            })
        {
            std::thread::sleep(Duration::from_millis(100));
        }
        healthz = http_get(agent_net.pod_ip, 9464, "/healthz");
        if late_pod {
            (late_pod_reads, late_pod_diag) =
                run_late_pod(&runc_root, &id, &kubelet_root, &state, &signal);
        }
        // The pod's process ends (and its container with its cgroup) before the agent does.
        go.write_all(b"exit\n").unwrap();
        drop(go);
        assert!(
            workload.wait(Duration::from_secs(20)).is_some(),
            "the workload did not finish: {}",
            workload.stderr_text()
        );
        std::thread::sleep(Duration::from_millis(500));
    }
    agent.kill("TERM");
    let exit = agent.wait(Duration::from_secs(60));
    let run = Run {
        ready,
        exit,
        stderr: agent.stderr_text(),
        stdout: agent.stdout_text(),
        events: read_events(&state.join("events.ndjson")),
        events_text: std::fs::read_to_string(state.join("events.ndjson")).unwrap_or_default(),
        workload_pid,
        workload_out: workload.stdout_text(),
        status,
        mountinfo,
        pid_ns,
        healthz,
        kubelet_requests: kubelet.requests.lock().unwrap().clone(),
        agent_token,
        pod_token,
        late_pod_reads,
        late_pod_diag,
        workload_cgroups,
        dst,
    };
    drop(agent);
    drop(workload);
    run
}

/// Pod billing/worker-2 appears after the agent started: the kubelet mounts its token
/// volume (tmpfs) under its root, which must propagate into the agent's read-only
/// HostToContainer mount; its container then reads the token. Returns its secret_reads.
fn run_late_pod(
    runc_root: &Path,
    id: &str,
    kubelet_root: &Path,
    state: &Path,
    signal: &Path,
) -> (Vec<Event>, String) {
    let fifo = std::ffi::CString::new(signal.join("worker").to_str().unwrap()).unwrap();
    assert_eq!(unsafe { libc::mkfifo(fifo.as_ptr(), 0o666) }, 0);
    let stats = || {
        std::fs::read(state.join("stats.json"))
            .ok()
            .and_then(|b| serde_json::from_slice::<Value>(&b).ok())
            .and_then(|s| s["inventory_secrets"].as_u64())
            .unwrap_or(0)
    };
    let before = stats();
    let dir = kubelet_root.join(format!(
        "pods/{UID_B}/volumes/kubernetes.io~projected/kube-api-access-b"
    ));
    let _tmpfs = Tmpfs::mount(&dir);
    let token = fake_sa_token("billing", "billing-worker", "worker-2", UID_B, 22);
    let vol = PodVolume::create(kubelet_root, UID_B, "kube-api-access-b", &token);
    // The next inventory rescan ([secrets] rescan_interval = 5s) finds it.
    let deadline = Instant::now() + Duration::from_secs(15);
    while stats() <= before && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(200));
    }
    let bundle = host_usr_bundle(&state.parent().unwrap().join("worker"));
    let (masked, readonly) = masked_and_readonly();
    let caps: Vec<String> = DEFAULT_CAPS.iter().map(|c| c.to_string()).collect();
    let spec = json!({
        "ociVersion": "1.0.2",
        "process": {
            "terminal": false,
            "user": {"uid": ALICE, "gid": ALICE},
            "args": ["/usr/bin/bash", "-c", "exec 9</signal/worker; read -r _ < /var/run/secrets/kubernetes.io/serviceaccount/token; echo read; read -r _ <&9; exit 0"],
            "env": ["PATH=/usr/bin"],
            "cwd": "/",
            "capabilities": {"bounding": caps, "effective": [], "permitted": []},
        },
        "root": {"path": "rootfs", "readonly": false},
        "hostname": "worker-2",
        "mounts": ordered(runtime_mounts(), vec![
            bind(Path::new("/usr"), "/usr", &["rbind", "rprivate", "ro"]),
            bind(&vol.dir, "/var/run/secrets/kubernetes.io/serviceaccount", &["rbind", "rprivate", "ro"]),
            bind(signal, "/signal", &["rbind", "rprivate", "rw"]),
        ]),
        "linux": {
            "cgroupsPath": format!("/kubepods/besteffort/pod{UID_B}/{CID_B}"),
            "resources": {"devices": [{"allow": false, "access": "rwm"}]},
            "namespaces": [{"type": "pid"}, {"type": "mount"}, {"type": "ipc"}, {"type": "uts"}, {"type": "network"}],
            "maskedPaths": masked,
            "readonlyPaths": readonly,
            "seccomp": runtime_default_seccomp(&caps),
        },
    });
    let after = stats();
    let worker = Container::run(runc_root, &format!("{id}-worker"), &bundle, &spec);
    let pid = worker.pid(Duration::from_secs(20));
    // Opening the FIFO waits for the worker to open its end; it exits once it is closed.
    let hold = std::fs::OpenOptions::new()
        .write(true)
        .open(signal.join("worker"))
        .unwrap();
    let events = state.join("events.ndjson");
    let deadline = Instant::now() + Duration::from_secs(10);
    let reads = loop {
        let reads: Vec<Event> = read_events(&events)
            .into_iter()
            .filter(|e| {
                e.kind() == EventKind::SecretRead && pid.is_some_and(|p| e.process.tgid == p)
            })
            .collect();
        if !reads.is_empty() || Instant::now() > deadline {
            break reads;
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    drop(hold);
    assert!(
        worker
            .wait(Duration::from_secs(20))
            .is_some_and(|s| s.success()),
        "worker: {}",
        worker.stderr_text()
    );
    let diag = format!(
        "inventory {before} → {after} secrets; worker pid {pid:?}, out {:?}; secret reads: {:#?}",
        worker.stdout_text(),
        read_events(&events)
            .into_iter()
            .filter(|e| e.kind() == EventKind::SecretRead)
            .map(|e| (e.process.tgid, e.workload.id.to_string()))
            .collect::<Vec<_>>()
    );
    (reads, diag)
}

fn of(run: &Run, kind: EventKind) -> Vec<&Event> {
    run.events
        .iter()
        .filter(|e| e.kind() == kind && e.process.tgid == run.workload_pid)
        .collect()
}

/// The workload's secret_read of the secret whose inventory path ends with `path_end`.
fn read_of<'a>(run: &'a Run, path_end: &str) -> Option<(&'a Event, &'a SecretRead)> {
    of(run, EventKind::SecretRead)
        .into_iter()
        .filter_map(|e| match &e.body {
            Body::SecretRead(r) => Some((e, r)),
            _ => None,
        })
        .find(|(_, r)| {
            r.secret
                .path
                .as_deref()
                .is_some_and(|p| p.ends_with(path_end))
        })
}

fn caps_line(status: &str, key: &str) -> u64 {
    let hex = status
        .lines()
        .find_map(|l| l.strip_prefix(key))
        .unwrap_or_else(|| panic!("no {key} in {status}"));
    u64::from_str_radix(hex.trim(), 16).unwrap()
}

/// A mount of the agent's mountinfo by mount point: (mount options, optional fields).
fn mount_at<'a>(mountinfo: &'a str, point: &str) -> Option<(&'a str, &'a str)> {
    mountinfo.lines().rev().find_map(|l| {
        let f: Vec<&str> = l.split(' ').collect();
        (f.get(4) == Some(&point)).then(|| {
            let sep = f.iter().position(|x| *x == "-").unwrap();
            (f[5], if sep > 6 { f[6] } else { "" })
        })
    })
}

#[test]
#[ignore = "privileged: runs the image under runc as root"]
fn agent_image_runs_with_the_daemonsets_privileges() {
    require_privileges();
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let run = run_agent(Variant {
        late_pod: true,
        ..Variant::default()
    });
    let log = format!("agent stderr:\n{}\nstdout:\n{}", run.stderr, run.stdout);
    assert!(run.ready, "the agent did not become ready; {log}");
    assert!(
        run.exit.is_some_and(|s| s.success()),
        "exit {:?} on SIGTERM; {log}",
        run.exit
    );

    // The container got exactly the DaemonSet's privileges.
    let granted: Vec<String> =
        agent_container(&daemonset())["securityContext"]["capabilities"]["add"]
            .as_array()
            .unwrap()
            .iter()
            .map(|c| cap_name(c.as_str().unwrap()))
            .filter(|c| grantable(c))
            .collect();
    let want = granted.iter().fold(0u64, |a, c| a | (1 << cap_bit(c)));
    // The container starts with exactly these (the bounding set stays: dropping from it
    // needs CAP_SETPCAP, which the DaemonSet does not grant) ...
    assert_eq!(
        caps_line(&run.status, "CapBnd:"),
        want,
        "CapBnd:\n{}",
        run.status
    );
    // ... and once attached the agent keeps what its log line says, a subset without the
    // attach-only ones (NET_ADMIN, SYS_RESOURCE).
    let kept_line = run
        .stderr
        .lines()
        .find(|l| l.contains("capabilities dropped after attach"))
        .unwrap_or_else(|| panic!("no capability drop logged; {log}"));
    let kept: Vec<String> = kept_line
        .split("kept=")
        .nth(1)
        .unwrap_or_default()
        .split(',')
        .map(|c| c.trim().to_owned())
        .filter(|c| !c.is_empty())
        .collect();
    let kept_bits = kept.iter().fold(0u64, |a, c| a | (1 << cap_bit(c)));
    for key in ["CapEff:", "CapPrm:"] {
        assert_eq!(
            caps_line(&run.status, key),
            kept_bits,
            "{key} vs {kept_line}\n{}",
            run.status
        );
    }
    assert_eq!(kept_bits & !want, 0, "kept more than granted: {kept:?}");
    for needed in ["CAP_DAC_READ_SEARCH", "CAP_SYS_PTRACE"] {
        assert!(
            kept.iter().any(|c| c == needed),
            "{needed} not kept: {kept:?}"
        );
    }
    for attach_only in ["CAP_NET_ADMIN", "CAP_SYS_RESOURCE"] {
        assert!(
            !kept.iter().any(|c| c == attach_only),
            "{attach_only} kept: {kept:?}"
        );
    }
    assert_eq!(caps_line(&run.status, "CapAmb:"), 0);
    assert!(run.status.contains("NoNewPrivs:\t1"), "{}", run.status);
    assert!(run.status.contains("Seccomp:\t2"), "{}", run.status);
    assert!(
        run.status
            .lines()
            .any(|l| l.starts_with("Uid:") && l.split_whitespace().skip(1).all(|u| u == "0"))
    );
    assert_eq!(
        run.pid_ns.0, run.pid_ns.1,
        "hostPID: the host's pid namespace"
    );
    // Read-only root and host mounts, the state dir writable, the kubelet mount a slave.
    let mi = &run.mountinfo;
    for (point, ro) in [
        ("/", true),
        ("/host/etc", true),
        ("/host/root", true),
        ("/host/home", true),
        ("/host/var/lib/kubelet", true),
        ("/sys/fs/cgroup", true),
        ("/sys/fs/cgroup/unified", true),
        ("/sys/kernel/tracing", true),
        ("/sys/kernel/btf", true),
        ("/etc/credwatch", true),
        ("/var/lib/credwatch", false),
    ] {
        let (opts, _) = mount_at(mi, point).unwrap_or_else(|| panic!("no mount at {point}:\n{mi}"));
        assert_eq!(
            opts.split(',').next() == Some("ro"),
            ro,
            "{point} mounted {opts}"
        );
    }
    let (_, optional) = mount_at(mi, "/host/var/lib/kubelet").unwrap();
    assert!(
        optional.starts_with("master:"),
        "HostToContainer: the kubelet mount receives the host's mounts ({optional})"
    );
    assert!(
        run.healthz.starts_with("HTTP/1.1 200") || run.healthz.starts_with("HTTP/1.0 200"),
        "/healthz: {}",
        run.healthz
    );

    // The kubelet was asked for /pods with the agent's own service-account token.
    assert!(
        run.kubelet_requests
            .iter()
            .any(|(line, auth)| line.starts_with("GET /pods")
                && *auth == format!("Bearer {}", run.agent_token)),
        "kubelet requests: {:?}",
        run.kubelet_requests
            .iter()
            .map(|(l, _)| l)
            .collect::<Vec<_>>()
    );

    // (a) The workload's read of its token, named by pod and container.
    let token_path = format!(
        "/var/lib/kubelet/pods/{UID_A}/volumes/kubernetes.io~projected/kube-api-access-a/token"
    );
    let (r, read) = read_of(&run, "kube-api-access-a/token").unwrap_or_else(|| {
        panic!(
            "no secret_read of the token by pid {}: {:#?}\n{log}",
            run.workload_pid, run.events
        )
    });
    let wl = &r.workload;
    let summary: Vec<String> = run
        .events
        .iter()
        .filter(|e| {
            e.process.tgid == run.workload_pid || e.workload.cgroup_id == r.workload.cgroup_id
        })
        .map(|e| {
            format!(
                "{} {} pid={} {} cg={}",
                e.ts.0.to_rfc3339_opts(chrono::SecondsFormat::Nanos, true),
                e.kind().as_str(),
                e.process.pid,
                e.workload.id,
                e.workload.cgroup_id
            )
        })
        .collect();
    assert_eq!(
        wl.kind,
        WorkloadKind::Pod,
        "{r:#?}\nworkload cgroups: {}\n{}\n{log}",
        run.workload_cgroups,
        summary.join("\n")
    );
    assert_eq!(wl.id, "pod:payments/api-7f9c");
    assert_eq!(wl.namespace.as_deref(), Some("payments"));
    assert_eq!(wl.pod.as_deref(), Some("api-7f9c"));
    assert_eq!(wl.pod_uid.as_deref(), Some(UID_A));
    assert_eq!(wl.container_id.as_deref(), Some(CID_A));
    assert_eq!(wl.service_account.as_deref(), Some("payments-api"));
    assert_eq!(&*r.node, NODE);
    assert_eq!(read.secret.path.as_deref(), Some(token_path.as_str()));
    assert_eq!(
        read.secret.opened_as,
        "/var/run/secrets/kubernetes.io/serviceaccount/token"
    );
    assert_eq!(read.credential.kind, CredentialType::K8sSaToken);
    assert_eq!(
        read.credential.fingerprint,
        expected_fingerprint(KEY, run.pod_token.as_bytes())
    );
    assert_eq!(
        read.credential
            .owner
            .as_ref()
            .and_then(|o| o.pod.as_deref()),
        Some("api-7f9c")
    );
    assert_eq!(r.process.uid, ALICE);
    assert_eq!(r.process.exe, "/usr/bin/bash", "{r:#?}");
    // Another user's 0600 file, through DAC_READ_SEARCH.
    let (aws, aws_read) = read_of(&run, "/home/alice/.aws/credentials")
        .unwrap_or_else(|| panic!("no read of alice's credentials: {:#?}", run.events));
    assert_eq!(aws.workload.container_id.as_deref(), Some(CID_A));
    assert_eq!(
        aws_read.secret.path.as_deref(),
        Some("/home/alice/.aws/credentials")
    );

    // (b) Its connect, and the credential use it makes of the token.
    assert!(
        run.workload_out.contains("connected"),
        "{}",
        run.workload_out
    );
    let connect = of(&run, EventKind::Connect)
        .into_iter()
        .chain(of(&run, EventKind::CredentialUse))
        .find(|e| {
            e.dst()
                .is_some_and(|d| d.socket_addr() == Some(SocketAddr::from(run.dst)))
        })
        .unwrap_or_else(|| panic!("no connect to {:?}: {:#?}", run.dst, run.events));
    assert_eq!(connect.workload.id, "pod:payments/api-7f9c");
    assert_eq!(connect.workload.container_id.as_deref(), Some(CID_A));
    let uses = of(&run, EventKind::CredentialUse);
    assert!(
        uses.iter().any(|u| matches!(
            &u.body,
            Body::CredentialUse(c)
                if c.credential.fingerprint == read.credential.fingerprint
                    && c.dst.port == run.dst.1
        )),
        "no credential_use of the token: {uses:#?}"
    );

    // A pod that appears after the agent started: its volume propagated in and its read is
    // named by its pod and container.
    let late = run.late_pod_reads.first().unwrap_or_else(|| {
        panic!(
            "pod worker-2's read was not seen: {}; {log}",
            run.late_pod_diag
        )
    });
    assert_eq!(late.workload.id, "pod:billing/worker-2", "{late:#?}");
    assert_eq!(late.workload.container_id.as_deref(), Some(CID_B));

    // No secret value anywhere.
    let all = format!("{}{}{}", run.events_text, run.stderr, run.stdout);
    for secret in [&run.pod_token, &run.agent_token] {
        assert!(!all.contains(secret.rsplit('.').next().unwrap()));
        assert!(!all.contains(secret.as_str()));
    }
    assert!(!all.contains("fakeSecretForTheImageTestOnly"));
}

/// What happens without each capability, next to what deploy/README.md says.
#[test]
#[ignore = "privileged: runs the image under runc as root"]
fn each_capability_is_needed() {
    require_privileges();
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let mut table = vec![
        "| capability removed | observed |".to_owned(),
        "|---|---|".to_owned(),
    ];
    let mut problems = Vec::new();
    let caps: Vec<String> = agent_container(&daemonset())["securityContext"]["capabilities"]["add"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c.as_str().unwrap().to_owned())
        .collect();
    assert_eq!(
        caps,
        [
            "BPF",
            "PERFMON",
            "NET_ADMIN",
            "SYS_RESOURCE",
            "DAC_READ_SEARCH",
            "SYS_PTRACE"
        ],
        "the DaemonSet's capabilities changed: update this test and deploy/README.md"
    );
    // With every capability this machine can grant: what each removal is compared with.
    let full = run_agent(Variant::default());
    let ready_line = |run: &Run| {
        run.stderr
            .lines()
            .find(|l| l.contains("credwatch ready"))
            .map(|l| strip_log_prefix(l).to_owned())
            .unwrap_or_default()
    };
    let secrets = |run: &Run| {
        ready_line(run)
            .split_whitespace()
            .find_map(|w| w.strip_prefix("secrets=")?.parse::<u64>().ok())
    };
    assert!(
        full.ready && read_of(&full, "/home/alice/.aws/credentials").is_some(),
        "the agent with all its capabilities: {}",
        full.stderr
    );
    for cap in &caps {
        let observed;
        if !grantable(&cap_name(cap)) {
            // Not grantable on this machine: every run here is already without it.
            let run = &full;
            let warned = run
                .stderr
                .lines()
                .find(|l| l.contains("RLIMIT_MEMLOCK"))
                .map(|l| l.trim().to_owned());
            observed = format!(
                "not grantable here (this root lacks it); without it the agent {} and logs: {}",
                if run.ready {
                    "starts"
                } else {
                    "does not start"
                },
                warned
                    .as_deref()
                    .map(strip_log_prefix)
                    .unwrap_or("nothing about it")
            );
            if !run.ready || warned.is_none() {
                problems.push(format!("{cap}: {observed}"));
            }
        } else {
            let run = run_agent(Variant {
                without: Some(cap.clone()),
                ..Variant::default()
            });
            // A fatal error is the agent's last line: `credwatch: <what failed>`.
            let failure = run
                .stderr
                .lines()
                .rev()
                .find_map(|l| l.trim().strip_prefix("credwatch: "))
                .map(str::to_owned);
            observed = match cap.as_str() {
                "BPF" | "PERFMON" | "NET_ADMIN" => {
                    let f = failure.clone().unwrap_or_default();
                    let want = match cap.as_str() {
                        "NET_ADMIN" => "METADATA_SOCKS",
                        _ => "CAP_BPF and CAP_PERFMON",
                    };
                    if run.ready || run.exit.is_none_or(|s| s.success()) || !f.contains(want) {
                        problems.push(format!(
                            "{cap}: expected a refusal naming {want:?}; ready={} exit={:?}\n{}",
                            run.ready, run.exit, run.stderr
                        ));
                    }
                    format!(
                        "does not start, exits {}: `{f}`",
                        run.exit.and_then(|s| s.code()).unwrap_or(-1)
                    )
                }
                "DAC_READ_SEARCH" => {
                    let aws = read_of(&run, "/home/alice/.aws/credentials").map(|(e, _)| e);
                    let token = read_of(&run, "kube-api-access-a/token");
                    let (with, without) = (secrets(&full), secrets(&run));
                    if !run.ready
                        || aws.is_some()
                        || token.is_none()
                        || without.zip(with).is_none_or(|(a, b)| a + 1 != b)
                    {
                        problems.push(format!("{cap}: expected alice's 0600 credentials unwatched, the token watched; ready={} aws={aws:?} token={} secrets {without:?} (with it {with:?})", run.ready, token.is_some()));
                    }
                    format!(
                        "starts, silently without another user's 0600 `~/.aws/credentials`: `{}` (with it `secrets={}`); that file's read is not reported, root-owned pod tokens still are",
                        ready_line(&run),
                        with.unwrap_or(0)
                    )
                }
                "SYS_PTRACE" => {
                    let token = read_of(&run, "kube-api-access-a/token");
                    // No read, no `exe` (shown as the JSON `null` it used to be).
                    let exe = token.map(|(t, _)| t.process.exe.as_str());
                    let shown = exe.map_or_else(|| "null".to_owned(), |e| format!("{e:?}"));
                    if !run.ready || token.is_none() || exe.is_some_and(|e| !e.is_empty()) {
                        problems.push(format!("{cap}: expected the read reported without an executable; ready={} exe={shown}", run.ready));
                    }
                    format!(
                        "starts; the read by a uid 1000 process that predates the agent is reported, without `exe` ({})",
                        if exe.is_none() {
                            "field absent".to_owned()
                        } else {
                            format!("exe = {shown}")
                        }
                    )
                }
                other => panic!("no expectation for {other}"),
            };
        }
        table.push(format!("| `{cap}` | {observed} |"));
    }
    // All capabilities, but the seccomp profile of a runtime that predates the CAP_BPF and
    // CAP_PERFMON rules (containerd < 1.6.9/1.7.0, CRI-O < 1.31).
    let old = run_agent(Variant {
        old_seccomp: true,
        ..Variant::default()
    });
    let failure = old
        .stderr
        .lines()
        .rev()
        .find_map(|l| l.trim().strip_prefix("credwatch: "))
        .unwrap_or_default()
        .to_owned();
    if old.ready || !failure.contains("Operation not permitted") {
        problems.push(format!(
            "old RuntimeDefault seccomp: expected a refusal with EPERM; ready={}\n{}",
            old.ready, old.stderr
        ));
    }
    table.push(format!(
        "| (none; RuntimeDefault seccomp without the CAP_BPF/CAP_PERFMON rules) | does not start, exits {}: `{failure}` |",
        old.exit.and_then(|s| s.code()).unwrap_or(-1)
    ));
    let table = table.join("\n");
    println!("{table}");
    let out = repo().join("target/image/capabilities.md");
    let _ = std::fs::write(&out, format!("{table}\n"));
    assert!(problems.is_empty(), "{}\n\n{table}", problems.join("\n"));
}

/// A log line without its timestamp, level and target (`… WARN credwatch::x: msg` → `msg`).
fn strip_log_prefix(l: &str) -> &str {
    let l = l.trim();
    for level in [" ERROR ", " WARN ", " INFO "] {
        if let Some(i) = l.find(level) {
            let rest = l[i + level.len()..].trim_start();
            return rest.split_once(": ").map(|(_, m)| m).unwrap_or(rest);
        }
    }
    l
}
