//! Sustained insert rate from the agent's ClickHouse writer: N synthetic events (secret
//! reads, connects, credential uses with realistic fields) through `ClickHouseSink` — the
//! row conversion, batching, LZ4 and the HTTP client the agent uses — into the ClickHouse at
//! URL, then the row count is checked. Used by `cargo xtask bench`; prints
//! `rows_per_second rows seconds`.

use std::{net::IpAddr, sync::Arc, time::Instant};

use credwatch::{
    clickhouse::{ClickHouseSink, migrate},
    config::Config,
    event::{
        Attribution, Body, Connect, CredentialRef, CredentialType, CredentialUse, Destination,
        Event, SecretRead, SecretRef, Timestamp, Workload, WorkloadId, WorkloadKind,
    },
};

fn event(i: u64) -> Event {
    let secret = Arc::new(SecretRef {
        path: Some(
            "/var/lib/kubelet/pods/0a1b/volumes/kubernetes.io~projected/kube-api-access/token"
                .into(),
        ),
        opened_as: "/var/run/secrets/kubernetes.io/serviceaccount/token".into(),
        dev: 2049,
        inode: 1001 + i % 100,
        syscall: "openat".into(),
        access: "read".into(),
        matched: "file".into(),
        fd: 3,
        ..Default::default()
    });
    let credential = Arc::new(CredentialRef {
        fingerprint: format!("hmac-sha256:{:064x}", i % 100),
        kind: CredentialType::K8sSaToken,
        labels: [("namespace".to_owned(), "payments".to_owned())].into(),
        owner: None,
        identity: format!("k8s:https://kubernetes.default.svc|sa{}|pod", i % 100),
    });
    let dst = Destination {
        name: Some("api.internal".into()),
        ..Destination::inet(IpAddr::from([10, 0, (i % 200) as u8, 7]), 443, "tcp")
    };
    let ts = Timestamp::from_unix_nanos(1_795_000_000_000_000_000 + i as i64 * 1000);
    let body = match i % 4 {
        0 => Body::SecretRead(SecretRead {
            secret,
            credential,
            maintenance: false,
        }),
        1 | 2 => Body::Connect(Connect {
            dst,
            result: "ok".into(),
            via: "connect".into(),
        }),
        _ => Body::CredentialUse(Box::new(CredentialUse {
            secret: Some(secret),
            credential,
            dst,
            result: "ok".into(),
            read_event: format!("bench-{}", i - 3),
            read_ts: ts,
            attribution: Attribution::ReadThenConnect,
            via_pid: None,
        })),
    };
    let mut e = Event::new(format!("bench-{i}"), ts, "bench-node", body);
    e.process.pid = 1000 + (i % 5000) as u32;
    e.process.tgid = e.process.pid;
    e.process.ppid = 1;
    e.process.comm = "api-server".into();
    e.process.exe = "/usr/local/bin/api-server".into();
    e.workload = std::sync::Arc::new(Workload {
        kind: WorkloadKind::Pod,
        id: WorkloadId::pod("payments", &format!("api-{}", i % 50)),
        namespace: Some("payments".into()),
        pod: Some(format!("api-{}", i % 50)),
        pod_uid: Some("0a1b2c3d-4e5f-4789-abcd-ef0123456789".into()),
        service_account: Some("payments-api".into()),
        spiffe_id: Some("spiffe://cluster.local/ns/payments/sa/payments-api".into()),
        container_id: Some("a1a1a1a1a1a1".into()),
        cgroup_id: 9001,
        ..Default::default()
    });
    e
}

fn main() -> anyhow::Result<()> {
    // The writer's warnings (a failed insert, a full spool) say why rows did not land.
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_max_level(tracing::Level::WARN)
        .init();
    let mut args = std::env::args().skip(1);
    let url = args
        .next()
        .expect("usage: clickhouse_throughput URL [ROWS]");
    let n: u64 = args
        .next()
        .and_then(|s| s.parse().ok())
        .unwrap_or(1_000_000);
    let cfg = Config::parse(&format!(
        "[clickhouse]\nurl = \"{url}\"\ndatabase = \"bench\"\nbatch_rows = 100000\nqueue_rows = 1000000\n"
    ))?;
    let ch = cfg.clickhouse.as_ref().expect("section above");
    let rt = credwatch::current_thread_runtime()?;
    rt.block_on(migrate(ch))?;
    let events: Vec<Event> = (0..n).map(event).collect();
    let state = std::env::temp_dir().join(format!("credwatch-chbench-{}", std::process::id()));
    let t = Instant::now();
    let mut sink = ClickHouseSink::start(ch, "bench-node", &state, true)?;
    for e in &events {
        sink.event(e);
    }
    sink.finish();
    let secs = t.elapsed().as_secs_f64();
    let stats = sink.stats.snapshot();
    let _ = std::fs::remove_dir_all(&state);
    let client = credwatch::clickhouse::client(ch)?;
    let count: u64 = rt.block_on(client.query("SELECT count() FROM events").fetch_one())?;
    // Rows left in a partial batch at the end go through the spool (written to disk
    // first, then delivered): part of the rate, not a failure.
    if count != n || stats.rows_dropped != 0 {
        anyhow::bail!("{count} rows landed of {n} ({stats:?})");
    }
    println!("{:.0} {n} {secs:.3}", n as f64 / secs);
    Ok(())
}
