//! The ClickHouse schema: what `credwatch schema` prints and `credwatch migrate` applies.
//!
//! `events` is written at the agent's full event rate, so its columns favour insert speed:
//! only `kind` and `node` (the sort-key prefix every query filters on) are LowCardinality.
//! Measured on this engine with RowBinary (the crate's insert format), 300 k event rows
//! parse in 2.8 s with the other dozen small-vocabulary columns LowCardinality too and in
//! 1.1 s as plain String; compressed plain String costs little for such columns.
//! `events` holds every event kind, ordered by (kind, fingerprint, node, ts): dashboards and
//! fleet queries filter on the kind first (`credential_use`, `secret_read`) and group by
//! fingerprint; `credential_uses` is a view over it. `alerts` keeps each emitted alert line
//! (new and count updates) with the full alert JSON. Partitions are days (events) and months
//! (alerts) so TTL retention drops whole parts. Every table deduplicates inserts by the
//! writer's per-batch token, which is what makes a retried batch land once.
//!
//! Cluster mode (`[clickhouse] cluster`): every statement runs `ON CLUSTER`, the data lives
//! in `*_local` Replicated tables and `events`/`alerts` are Distributed tables over them,
//! sharded by node so one node's batches (and their dedup tokens) land on one shard.
//!
//! Deduplication does not rest on ClickHouse's insert-dedup window alone: that window is a
//! count of blocks shared by every node writing the table (at 1 000 nodes, 10 000 blocks
//! are a few seconds), so it only covers a retry that follows its failed attempt closely.
//! Before the writer sends a spooled batch again it asks whether the batch's first and
//! last rows (node, id, ts: unique per node) are already there (`id_idx` makes that a
//! skip-index lookup); only a batch that is not is inserted. The window then only has to
//! cover the race of an attempt still running on the server, which the settings of
//! migration 3 give (time-based where the engine has it: Replicated tables).
//!
//! Migrations are numbered; each is applied once, in order, and recorded in
//! `schema_version` (`CREATE … IF NOT EXISTS` never changes an existing table, so
//! everything after version 1 is an `ALTER`).

use super::Config as Cfg;

/// The newest migration; `migrate` refuses a database that is newer.
pub const SCHEMA_VERSION: u32 = 3;

/// Columns added after version 1, in the order they were added: created with the table on
/// a fresh database, added by `ALTER TABLE … ADD COLUMN IF NOT EXISTS` (migration 2) to an
/// existing one.
const ADDED_EVENT_COLUMNS: &[&str] = &[
    // v2: how a connect was made, folded repeat reads, 32-bit callers, Unix-domain and
    // cloud-metadata destinations, what exec handed a process, process-memory access and
    // metadata requests.
    "via String",
    "repeats UInt64",
    "abi String",
    "opened_as_status String",
    "dst_metadata Bool",
    "exec_argv Array(String)",
    "exec_env_truncated Bool",
    "exposed_credentials String",
    "access_kind String",
    "target_pid UInt32",
    "target_comm String",
    "target_exe String",
    "target_workload_id String",
    "target_workload String",
    "metadata_method String",
    "metadata_path String",
    "metadata_provider String",
    "metadata_credentials Bool",
    "metadata_role String",
    // v2, holders: the credential across rotations, node-agent maintenance reads, why a
    // connect counts as a use (and through which other process), what a memory-access
    // target held.
    "credential_identity String",
    "maintenance Bool",
    "attribution LowCardinality(String)",
    "via_pid UInt32",
    "target_credentials String",
];

const EVENT_COLUMNS: &str = "
    id String,
    ts DateTime64(9, 'UTC'),
    node LowCardinality(String),
    kind LowCardinality(String),
    pid UInt32,
    tgid UInt32,
    ppid UInt32,
    uid UInt32,
    euid UInt32,
    gid UInt32,
    egid UInt32,
    comm String,
    exe String,
    tty String,
    session String,
    workload_kind String,
    workload_id String,
    namespace String,
    pod String,
    pod_uid String,
    service_account String,
    spiffe_id String,
    container_id String,
    unit String,
    cgroup_id UInt64,
    cgroup String,
    secret_path String,
    opened_as String,
    dev UInt64,
    inode UInt64,
    syscall String,
    access String,
    open_flags Int32,
    matched String,
    fd Int32,
    fingerprint String,
    credential_type String,
    labels Map(String, String),
    owner_kind String,
    owner_id String,
    owner_namespace String,
    owner_pod String,
    owner_pod_uid String,
    owner_source String,
    dst_family UInt8,
    dst_ip IPv6,
    dst_port UInt16,
    dst_proto String,
    dst_name String,
    result String,
    exec_filename String,
    exec_cap_effective UInt64,
    exec_truncated Bool,
    exit_code Nullable(Int32),
    priv_via String,
    priv_old_uid UInt32,
    priv_old_euid UInt32,
    priv_new_uid UInt32,
    priv_new_euid UInt32,
    priv_old_caps UInt64,
    priv_new_caps UInt64,
    dns_name String,
    dns_addrs Array(IPv6),
    dns_ttl UInt32,
    dns_server Nullable(IPv6),
    read_event String,
    read_ts Nullable(DateTime64(9, 'UTC'))";

/// After the columns of `events`.
const EVENT_INDEXES: &str = "INDEX workload_idx workload_id TYPE bloom_filter GRANULARITY 4";

const ALERT_COLUMNS: &str = "
    id String,
    ts DateTime64(9, 'UTC'),
    first_seen DateTime64(9, 'UTC'),
    last_seen DateTime64(9, 'UTC'),
    node LowCardinality(String),
    alert LowCardinality(String),
    severity LowCardinality(String),
    status LowCardinality(String),
    count UInt64,
    summary String,
    workload_kind LowCardinality(String),
    workload_id String,
    namespace LowCardinality(String),
    pod String,
    service_account LowCardinality(String),
    spiffe_id String,
    fingerprint String,
    credential_type LowCardinality(String),
    owner_id String,
    dedup_key String,
    evidence String CODEC(ZSTD(3)),
    alert_json String CODEC(ZSTD(3))";

/// Version 1's dedup window (blocks), as it was created.
const DEDUP_WINDOW_V1: u32 = 10_000;
/// Migration 3: blocks remembered by a single server's table (its own log, in memory: about
/// 100 bytes each)…
const DEDUP_BLOCKS: u32 = 100_000;
/// …and for Replicated tables a time bound in ClickHouse Keeper (with a block bound high
/// enough that time is what ends it): longer than any insert attempt can run.
const DEDUP_SECONDS: u32 = 900;
const DEDUP_BLOCKS_REPLICATED: u32 = 10_000_000;

struct Table {
    name: &'static str,
    columns: &'static str,
    added: &'static [&'static str],
    indexes: &'static str,
    partition: &'static str,
    order: &'static str,
}

const TABLES: [Table; 2] = [
    Table {
        name: "events",
        columns: EVENT_COLUMNS,
        added: ADDED_EVENT_COLUMNS,
        indexes: EVENT_INDEXES,
        partition: "toDate(ts)",
        order: "(kind, fingerprint, node, ts)",
    },
    Table {
        name: "alerts",
        columns: ALERT_COLUMNS,
        added: &[],
        indexes: "",
        partition: "toYYYYMM(ts)",
        order: "(alert, node, ts)",
    },
];

/// Every migration's statements, in order: `(version, statements)`.
pub fn migrations(cfg: &Cfg) -> Vec<(u32, Vec<String>)> {
    vec![
        (1, version_1(cfg)),
        (2, version_2(cfg)),
        (3, version_3(cfg)),
    ]
}

/// Every statement of every migration, in order.
pub fn statements(cfg: &Cfg) -> Vec<String> {
    migrations(cfg).into_iter().flat_map(|(_, s)| s).collect()
}

fn on_cluster(cfg: &Cfg) -> String {
    cfg.cluster
        .as_ref()
        .map(|c| format!(" ON CLUSTER {c}"))
        .unwrap_or_default()
}

/// Migration 2: a table made by version 1 gets the columns added since (a no-op on a
/// fresh one, which was created with them).
fn version_2(cfg: &Cfg) -> Vec<String> {
    let db = &cfg.database;
    let on = on_cluster(cfg);
    let mut out = Vec::new();
    for t in &TABLES {
        let mut tables = vec![match &cfg.cluster {
            None => t.name.to_owned(),
            Some(_) => format!("{}_local", t.name),
        }];
        if cfg.cluster.is_some() {
            tables.push(t.name.to_owned());
        }
        for c in t.added {
            for name in &tables {
                out.push(format!(
                    "ALTER TABLE {db}.{name}{on} ADD COLUMN IF NOT EXISTS {c}"
                ));
            }
        }
    }
    out
}

/// Migration 3: the skip index the writer's "already stored?" check uses, and dedup
/// settings that no longer count on a fleet-shared block window (see the module docs).
fn version_3(cfg: &Cfg) -> Vec<String> {
    let db = &cfg.database;
    let on = on_cluster(cfg);
    let mut out = Vec::new();
    for t in &TABLES {
        let local = match &cfg.cluster {
            None => t.name.to_owned(),
            Some(_) => format!("{}_local", t.name),
        };
        out.push(format!(
            "ALTER TABLE {db}.{local}{on} ADD INDEX IF NOT EXISTS id_idx id TYPE bloom_filter GRANULARITY 4"
        ));
        out.push(match &cfg.cluster {
            None => format!(
                "ALTER TABLE {db}.{local}{on} MODIFY SETTING non_replicated_deduplication_window = {DEDUP_BLOCKS}"
            ),
            Some(_) => format!(
                "ALTER TABLE {db}.{local}{on} MODIFY SETTING replicated_deduplication_window = {DEDUP_BLOCKS_REPLICATED}, replicated_deduplication_window_seconds = {DEDUP_SECONDS}"
            ),
        });
    }
    out
}

/// Migration 1: the tables (with every column a fresh database needs; an old one gets the
/// columns added since from migration 2), then every later migration, like an old one.
fn version_1(cfg: &Cfg) -> Vec<String> {
    let db = &cfg.database;
    let on = on_cluster(cfg);
    let mut out = vec![format!("CREATE DATABASE IF NOT EXISTS {db}{on}")];
    let ttl = cfg.ttl_days;
    for t in &TABLES {
        let (local, engine, dedup) = match &cfg.cluster {
            None => (
                t.name.to_owned(),
                "MergeTree".to_owned(),
                "non_replicated_deduplication_window",
            ),
            Some(_) => (
                format!("{}_local", t.name),
                format!(
                    "ReplicatedMergeTree('/clickhouse/tables/{{shard}}/{db}/{}', '{{replica}}')",
                    t.name
                ),
                "replicated_deduplication_window",
            ),
        };
        let mut columns = t.columns.to_owned();
        for c in t.added {
            columns.push_str(",\n    ");
            columns.push_str(c);
        }
        if !t.indexes.is_empty() {
            columns.push_str(",\n    ");
            columns.push_str(t.indexes);
        }
        out.push(format!(
            "CREATE TABLE IF NOT EXISTS {db}.{local}{on}\n({columns}\n)\nENGINE = {engine}\n\
             PARTITION BY {}\nORDER BY {}\nTTL toDateTime(ts) + INTERVAL {ttl} DAY\n\
             SETTINGS {dedup} = {DEDUP_WINDOW_V1}",
            t.partition, t.order
        ));
        if let Some(c) = &cfg.cluster {
            out.push(format!(
                "CREATE TABLE IF NOT EXISTS {db}.{}{on} AS {db}.{local}\n\
                 ENGINE = Distributed({c}, {db}, {local}, cityHash64(node))",
                t.name
            ));
        }
    }
    out.push(format!(
        // Replaced, not kept: a migration that adds columns the view shows updates it.
        "CREATE OR REPLACE VIEW {db}.credential_uses{on} AS\n\
         SELECT ts, node, workload_kind, workload_id, namespace, pod, service_account, spiffe_id,\n\
         \x20      fingerprint, credential_identity, credential_type, owner_id, dst_ip, dst_port,\n\
         \x20      dst_proto, dst_name, pid, comm, exe, read_event, read_ts, attribution, via_pid, id\n\
         FROM {db}.events WHERE kind = 'credential_use'"
    ));
    let (vlocal, vengine) = match &cfg.cluster {
        None => ("schema_version".to_owned(), "MergeTree".to_owned()),
        Some(_) => (
            "schema_version".to_owned(),
            format!("ReplicatedMergeTree('/clickhouse/tables/{db}/schema_version', '{{replica}}')"),
        ),
    };
    out.push(format!(
        "CREATE TABLE IF NOT EXISTS {db}.{vlocal}{on}\n\
         (version UInt32, applied_at DateTime64(3, 'UTC'), by String)\n\
         ENGINE = {vengine}\nORDER BY version"
    ));
    out
}

/// Records migration `v` as applied (once).
pub fn record_version(cfg: &Cfg, v: u32) -> String {
    format!(
        "INSERT INTO {db}.schema_version SELECT {v}, now64(3), 'credwatch {pkg}' \
         WHERE {v} NOT IN (SELECT version FROM {db}.schema_version)",
        db = cfg.database,
        pkg = env!("CARGO_PKG_VERSION"),
    )
}

/// The DDL as one script, for `credwatch schema`: every migration, each recorded.
pub fn script(cfg: &Cfg) -> String {
    let mut s = format!("-- credwatch schema version {SCHEMA_VERSION}\n");
    for (v, sts) in migrations(cfg) {
        s.push_str(&format!("-- migration {v}\n"));
        for st in sts {
            s.push_str(&st);
            s.push_str(";\n\n");
        }
        s.push_str(&record_version(cfg, v));
        s.push_str(";\n\n");
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(cluster: Option<&str>) -> Cfg {
        let mut c = crate::config::Config::parse("[clickhouse]\nurl = \"http://ch:8123\"\n")
            .unwrap()
            .clickhouse
            .unwrap();
        c.cluster = cluster.map(Into::into);
        c
    }

    #[test]
    fn single_server_and_cluster_ddl() {
        let one = script(&cfg(None));
        assert!(one.contains("CREATE TABLE IF NOT EXISTS credwatch.events\n"));
        assert!(one.contains("ENGINE = MergeTree"));
        assert!(one.contains("non_replicated_deduplication_window = 10000"));
        assert!(one.contains("INTERVAL 90 DAY"));
        assert!(!one.contains("ON CLUSTER"));
        let many = script(&cfg(Some("prod")));
        assert!(many.contains("CREATE TABLE IF NOT EXISTS credwatch.events_local ON CLUSTER prod"));
        assert!(many.contains(
            "ReplicatedMergeTree('/clickhouse/tables/{shard}/credwatch/events', '{replica}')"
        ));
        assert!(
            many.contains("ENGINE = Distributed(prod, credwatch, events_local, cityHash64(node))")
        );
        assert!(many.contains("replicated_deduplication_window"));
        // Migration 3 changes existing tables with ALTERs, on the local tables in a cluster.
        assert!(one.contains(
            "ALTER TABLE credwatch.events MODIFY SETTING non_replicated_deduplication_window = 100000"
        ));
        assert!(many.contains(
            "ALTER TABLE credwatch.alerts_local ON CLUSTER prod ADD INDEX IF NOT EXISTS id_idx"
        ));
        assert!(many.contains("replicated_deduplication_window_seconds = 900"));
        assert!(one.contains("-- migration 3"));
    }
}
