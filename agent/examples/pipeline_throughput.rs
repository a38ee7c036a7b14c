//! Throughput of the live path after the ring buffer, on one thread: decode → enrichment
//! (process table, workload resolver, inventory, DNS names) → correlation → detectors. Synthetic probe
//! records stand in for the kernel; everything they pass through is the agent's real code.
//! Used by `cargo xtask bench`; prints `records_per_cpu_second records_per_wall_second
//! records events`. Per CPU second is the per-core figure: on a shared machine, wall time
//! also counts the time other tenants held the core.

use std::{mem::size_of, time::Instant};

use credwatch::{
    config::Config,
    credential::Fingerprinter,
    decode::decode,
    enrich::{Enricher, IdGen},
    inventory::{Inventory, inode_key},
    kubelet::PodDirectory,
    pipeline::PipelineBuilder,
    process::ProcessTable,
    workload::WorkloadResolver,
};
use credwatch_common as c;

fn bytes_of<T>(v: &T) -> Vec<u8> {
    // SAFETY: POD record.
    unsafe { std::slice::from_raw_parts((v as *const T).cast::<u8>(), size_of::<T>()) }.to_vec()
}

fn header(kind: c::RecordKind, tgid: u32, ts: u64, cgroup_id: u64) -> c::Header {
    let mut comm = [0u8; 16];
    comm[..3].copy_from_slice(b"api");
    c::Header {
        kind: kind as u32,
        pid: tgid,
        tgid,
        ppid: 1,
        uid: 1000,
        euid: 1000,
        gid: 1000,
        egid: 1000,
        ts_ns: ts,
        cgroup_id,
        comm,
    }
}

const POD_LIST: &str = r#"{"kind":"PodList","apiVersion":"v1","metadata":{},"items":[
  {"metadata":{"name":"api-7f9c","namespace":"payments","uid":"0a1b2c3d-4e5f-4789-abcd-ef0123456789"},
   "spec":{"serviceAccountName":"payments-api","containers":[{"name":"api","image":"x"}]}}]}"#;

fn main() {
    let n: u64 = std::env::args()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(1_000_000);
    let tmp = std::env::temp_dir().join(format!("credwatch-throughput-{}", std::process::id()));
    std::fs::create_dir_all(tmp.join("cgroup")).unwrap();
    // The synthetic processes' parent, pid 1, exists as on any host; without it every new
    // process would cost two failed /proc reads that a real node never makes.
    let init = tmp.join("proc/1");
    std::fs::create_dir_all(&init).unwrap();
    std::fs::write(init.join("stat"), "1 (init) S 0 1 1 0 -1").unwrap();
    std::fs::write(init.join("status"), "Name:\tinit\nUid:\t0\t0\t0\t0\n").unwrap();
    std::os::unix::fs::symlink("/sbin/init", init.join("exe")).unwrap();
    // The processes run in a pod's container, in a kubelet-style cgroup tree, and the pod
    // is in the kubelet's list: the common case on a node.
    let scope = tmp.join(
        "cgroup/kubepods.slice/kubepods-besteffort.slice/\
         kubepods-besteffort-pod0a1b2c3d_4e5f_4789_abcd_ef0123456789.slice/\
         cri-containerd-3f1e5b2a9c8d7e6f5a4b3c2d1e0f9a8b7c6d5e4f3a2b1c0d9e8f7a6b5c4d3e2f.scope",
    );
    std::fs::create_dir_all(&scope).unwrap();
    let pod_cgroup = std::os::unix::fs::MetadataExt::ino(&std::fs::metadata(&scope).unwrap());
    let secret = tmp.join("token");
    std::fs::write(&secret, "fake-throughput-token").unwrap();
    let key = inode_key(&std::fs::metadata(&secret).unwrap());
    let fp = Fingerprinter::new(b"bench");
    let mut inv = Inventory::new(
        &[secret.display().to_string()],
        false,
        &[],
        "/nonexistent",
        4096,
        fp.clone(),
    )
    .unwrap();
    inv.rescan();

    let mut enricher = Enricher::new(
        "bench".into(),
        inv,
        WorkloadResolver::new(tmp.join("cgroup"), "cluster.local"),
        ProcessTable::new(tmp.join("proc"), 1 << 20),
    );
    enricher.set_pods(PodDirectory::from_pod_list(POD_LIST.as_bytes()).unwrap());
    // The default configuration: every detector, baselines in memory, no outputs.
    let cfg = Config::default();
    let mut pipeline = PipelineBuilder::new(&cfg).build().unwrap();
    let mut ids = IdGen::new();

    // One process lifecycle = exec, secret read, connect, exit.
    let mut records = Vec::with_capacity(4096);
    for i in 0..1024u32 {
        let tgid = 10_000 + i;
        let mut exec = c::ExecFixed {
            hdr: header(c::RecordKind::Exec, tgid, 0, pod_cgroup),
            cap_effective: 0,
            flags: 0,
            tty: [0; 16],
            env_len: 0,
            argv_len: 0,
            env_total: 0,
            argv_total: 0,
            _pad: 0,
            filename: [0; 256],
        };
        exec.filename[..8].copy_from_slice(b"/app/api");
        let mut open = c::SecretOpen {
            hdr: header(c::RecordKind::SecretOpen, tgid, 0, pod_cgroup),
            dev: key.dev,
            ino: key.ino,
            dir_ino: 0,
            opens: 1,
            matched: c::MatchKind::File as u32,
            syscall: c::OpenSyscall::Openat as u32,
            fd: 3,
            open_flags: 0,
            flags: 0,
            abi: c::Abi::Native as u32,
            name: [0; 256],
        };
        open.name[..5].copy_from_slice(b"token");
        let conn = c::Connect {
            hdr: header(c::RecordKind::Connect, tgid, 0, pod_cgroup),
            family: libc::AF_INET as u16,
            sock_type: libc::SOCK_STREAM as u16,
            port: 443,
            _pad: 0,
            addr: [10, 96, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
            ret: 0,
            via: c::ConnectVia::Syscall as u32,
            flags: 0,
            abi: c::Abi::Native as u32,
            cookie: u64::from(i) + 1,
            req: 0,
        };
        let exit = c::Exit {
            hdr: header(c::RecordKind::Exit, tgid, 0, pod_cgroup),
            exit_code: 0,
            _pad: 0,
        };
        records.push(bytes_of(&exec));
        records.push(bytes_of(&open));
        records.push(bytes_of(&conn));
        records.push(bytes_of(&exit));
    }

    let mut batch = Vec::new();
    let t = Instant::now();
    let cpu0 = thread_cpu_seconds();
    let mut events = 0u64;
    for i in 0..n {
        let raw = &records[(i % records.len() as u64) as usize];
        let rec = decode(raw, &fp).expect("valid record");
        enricher.enrich(&rec, &mut ids, &mut batch);
        for ev in batch.drain(..) {
            events += 1;
            pipeline.handle(ev, &mut ids);
        }
        if i % 4096 == 4095 {
            enricher.forget_exited(u64::MAX);
        }
    }
    let cpu = thread_cpu_seconds() - cpu0;
    let secs = t.elapsed().as_secs_f64();
    let _ = std::fs::remove_dir_all(&tmp);
    println!("{:.0} {:.0} {n} {events}", n as f64 / cpu, n as f64 / secs);
}

fn thread_cpu_seconds() -> f64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: valid clock id and out-pointer.
    unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    ts.tv_sec as f64 + ts.tv_nsec as f64 * 1e-9
}
