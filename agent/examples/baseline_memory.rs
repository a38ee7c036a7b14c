//! Memory and persistence cost of learned baselines: learns N (workload, credential)
//! profiles (each with two destinations, one executable, one hour), reports resident memory
//! per profile and how long writing them all to the redb store takes.
//! Used by `cargo xtask bench`; prints `rss_bytes_per_baseline checkpoint_ms N`.

use std::time::{Duration, Instant};

use credwatch::{
    baseline::Baselines,
    event::{
        Body, CredentialRef, CredentialType, CredentialUse, Destination, Event, Timestamp,
        Workload, WorkloadId, WorkloadKind,
    },
};

fn rss_bytes() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        })
        .unwrap_or(0)
        * 1024
}

fn main() {
    let n: usize = std::env::args()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(100_000);
    let dir = std::env::temp_dir().join(format!("credwatch-baselines-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let before = rss_bytes();
    let mut b = Baselines::open(&dir, Duration::from_secs(7 * 24 * 3600), n).unwrap();
    // 100 credentials per workload, like a node of pods each holding a handful of secrets
    // and the host holding many.
    for i in 0..n {
        let credential = CredentialRef {
            fingerprint: format!("hmac-sha256:{i:064x}"),
            kind: CredentialType::K8sSaToken,
            ..Default::default()
        };
        let ip = format!("10.{}.{}.{}", i >> 16 & 255, i >> 8 & 255, i & 255);
        let dst = Destination {
            name: Some(format!("svc-{}.ns.svc.cluster.local", i % 1000)),
            ..Destination::inet(ip.parse().unwrap(), 443, "tcp")
        };
        let ts = Timestamp::from_unix_nanos(1_795_000_000_000_000_000 + i as i64);
        let body = Body::CredentialUse(Box::new(CredentialUse {
            secret: None,
            credential: credential.into(),
            dst,
            result: "ok".into(),
            read_event: format!("r{i}"),
            read_ts: ts,
        }));
        let mut ev = Event::new(format!("e{i}"), ts, "bench", body);
        ev.workload = std::sync::Arc::new(Workload {
            kind: WorkloadKind::Pod,
            id: WorkloadId::pod(&format!("ns-{}", i / 1000), &format!("app-{}", i / 100)),
            spiffe_id: Some(format!(
                "spiffe://cluster.local/ns/ns-{}/sa/app-{}",
                i / 1000,
                i / 100
            )),
            ..Default::default()
        });
        ev.process.exe = "/app/server".into();
        b.learn(&ev);
    }
    let after = rss_bytes();
    let t = Instant::now();
    b.checkpoint().unwrap();
    let ms = t.elapsed().as_secs_f64() * 1e3;
    let per = after.saturating_sub(before) as f64 / b.len().max(1) as f64;
    println!("{per:.0} {ms:.0} {}", b.len());
    let _ = std::fs::remove_dir_all(&dir);
}
