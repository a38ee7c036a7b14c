//! ClickHouse: schema and migrations, the spooled batch writer, and fleet queries over what
//! every node wrote.

pub mod fleet;
pub mod rows;
pub mod schema;
pub mod spool;
pub mod writer;

use std::time::Duration;

use anyhow::{Context, Result, bail};
use clickhouse::{Client, Compression};
use hyper_util::{
    client::legacy::{Client as HttpClient, connect::HttpConnector},
    rt::TokioExecutor,
};

use serde::Deserialize;

use crate::{
    config::{Checker, Validate, check_http_url, check_nonzero},
    credential::Secret,
};

/// `[clickhouse]`: where events and alerts go, and how they are batched and spooled.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// HTTP(S) endpoint, `http://clickhouse:8123`.
    pub url: String,
    #[serde(default = "default_database")]
    pub database: String,
    pub user: Option<String>,
    pub password: Option<Secret>,
    /// File holding the password (a mounted Secret); preferred over `password`.
    pub password_file: Option<String>,
    /// CA bundle for an `https://` endpoint (default: the system's web PKI roots).
    pub ca_file: Option<String>,
    /// A batch is sent when it has this many rows…
    #[serde(default = "default_batch_rows")]
    pub batch_rows: usize,
    /// …or about this many bytes…
    #[serde(default = "default_batch_bytes")]
    pub batch_bytes: usize,
    /// …or is this old.
    #[serde(default = "default_flush", with = "humantime_serde")]
    pub flush_interval: Duration,
    /// Rows waiting in memory for the writer; beyond it the agent counts drops.
    #[serde(default = "default_queue_rows")]
    pub queue_rows: usize,
    /// Batches ClickHouse could not take wait on disk (under the state dir) up to this size.
    #[serde(default = "default_spool_bytes")]
    pub spool_max_bytes: u64,
    /// `drop_oldest` (default: keep the newest data) or `drop_newest` when the spool is full.
    #[serde(default)]
    pub spool_full: SpoolFull,
    #[serde(default = "default_timeout", with = "humantime_serde")]
    pub timeout: Duration,
    /// Rows older than this are deleted by ClickHouse (TTL), in days.
    #[serde(default = "default_ttl_days")]
    pub ttl_days: u32,
    /// Cluster name: `ON CLUSTER`, Replicated tables and Distributed tables over them.
    pub cluster: Option<String>,
    /// Apply the schema at start (idempotent); turn off where the SOC owns the DDL.
    #[serde(default = "yes")]
    pub migrate_on_start: bool,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SpoolFull {
    #[default]
    DropOldest,
    DropNewest,
}

fn yes() -> bool {
    true
}
fn default_database() -> String {
    "credwatch".into()
}
fn default_batch_rows() -> usize {
    50_000
}
fn default_batch_bytes() -> usize {
    32 << 20
}
fn default_flush() -> Duration {
    Duration::from_secs(1)
}
/// About 2 KB per event row in memory: 100 000 rows are ~190 MiB at the cap (500 000 were
/// ~900 MiB, past the DaemonSet's memory limit when ClickHouse is slow).
fn default_queue_rows() -> usize {
    100_000
}
fn default_spool_bytes() -> u64 {
    1 << 30
}
fn default_timeout() -> Duration {
    Duration::from_secs(30)
}
fn default_ttl_days() -> u32 {
    90
}

impl Config {
    /// The settings for `url` with every default (`credwatch schema` without a config).
    pub fn with_url(url: &str) -> Self {
        Config {
            url: url.to_owned(),
            database: default_database(),
            user: None,
            password: None,
            password_file: None,
            ca_file: None,
            batch_rows: default_batch_rows(),
            batch_bytes: default_batch_bytes(),
            flush_interval: default_flush(),
            queue_rows: default_queue_rows(),
            spool_max_bytes: default_spool_bytes(),
            spool_full: SpoolFull::default(),
            timeout: default_timeout(),
            ttl_days: default_ttl_days(),
            cluster: None,
            migrate_on_start: true,
        }
    }
}

/// Names interpolated into DDL: letters, digits and `_` only.
fn is_identifier(s: &str) -> bool {
    !s.is_empty() && s.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_')
}

impl Validate for Config {
    fn validate(&self, c: &mut Checker) {
        check_http_url(c, "url", &self.url);
        c.check(
            is_identifier(&self.database),
            "database",
            format_args!("must be letters, digits and _ (got {:?})", self.database),
        );
        if let Some(cl) = &self.cluster {
            c.check(
                is_identifier(cl),
                "cluster",
                format_args!("must be letters, digits and _ (got {cl:?})"),
            );
        }
        c.check(self.batch_rows > 0, "batch_rows", "must be at least 1");
        c.check(
            self.queue_rows >= self.batch_rows,
            "batch_rows",
            format_args!(
                "must not exceed queue_rows ({}): a batch has to fit in the queue",
                self.queue_rows
            ),
        );
        c.check(self.batch_bytes > 0, "batch_bytes", "must be at least 1");
        c.check(self.ttl_days > 0, "ttl_days", "must be at least 1");
        check_nonzero(c, "flush_interval", self.flush_interval);
        check_nonzero(c, "timeout", self.timeout);
        c.check(
            self.password.is_none() || self.password_file.is_none(),
            "password_file",
            "give either `password` or `password_file`, not both",
        );
    }
}

type Cfg = Config;

pub use writer::ClickHouseSink;

/// A client for `cfg`: LZ4 both ways, and an HTTP connector with TCP_NODELAY (without it
/// every compressed insert stalls on delayed ACK for tens of milliseconds).
pub fn client(cfg: &Cfg) -> Result<Client> {
    let mut http = HttpConnector::new();
    http.set_nodelay(true);
    http.set_keepalive(Some(Duration::from_secs(60)));
    http.set_connect_timeout(Some(Duration::from_secs(5)));
    http.enforce_http(false);
    let https = hyper_rustls::HttpsConnectorBuilder::new()
        .with_tls_config(crate::tls::client_config(cfg.ca_file.as_deref())?)
        .https_or_http()
        .enable_http1()
        .wrap_connector(http);
    let hc = HttpClient::builder(TokioExecutor::new())
        .pool_idle_timeout(Duration::from_secs(2))
        .build(https);
    let mut c = Client::with_http_client(hc)
        .with_url(&cfg.url)
        .with_database(&cfg.database)
        .with_compression(Compression::Lz4);
    if let Some(u) = &cfg.user {
        c = c.with_user(u);
    }
    let password = match (&cfg.password_file, &cfg.password) {
        (Some(f), _) => Some(
            std::fs::read_to_string(f)
                .with_context(|| format!("reading clickhouse.password_file {f}"))?
                .trim_end_matches(['\n', '\r'])
                .to_owned(),
        ),
        (None, p) => p.as_ref().map(|p| p.expose().to_owned()),
    };
    if let Some(p) = password {
        c = c.with_password(p);
    }
    Ok(c)
}

/// Applies the schema; refuses a database migrated by a newer credwatch.
pub async fn migrate(cfg: &Cfg) -> Result<u32> {
    let c = client(cfg)?;
    // DDL runs before the database exists, so not in it.
    let bare = c.clone().with_database("system");
    let existing: Option<u32> = match bare
        .query("SELECT max(version) FROM ?.schema_version")
        .bind(clickhouse::sql::Identifier(&cfg.database))
        .fetch_one::<u32>()
        .await
    {
        Ok(v) => Some(v),
        // No schema_version table yet: a fresh database.
        Err(clickhouse::error::Error::BadResponse(m))
            if m.contains("UNKNOWN_TABLE") || m.contains("UNKNOWN_DATABASE") =>
        {
            None
        }
        Err(e) => {
            return Err(
                anyhow::Error::new(e).context(format!("reaching ClickHouse at {}", cfg.url))
            );
        }
    };
    if let Some(v) = existing
        && v > schema::SCHEMA_VERSION
    {
        bail!(
            "database {} has schema version {v}, newer than this credwatch's {}; upgrade credwatch",
            cfg.database,
            schema::SCHEMA_VERSION
        );
    }
    // Only what this database has not had yet (all of it when it is new), in order; each
    // statement is idempotent too, so a migration cut short is simply applied again.
    let done = existing.unwrap_or(0);
    for (v, sts) in schema::migrations(cfg) {
        if v <= done {
            continue;
        }
        for st in sts {
            bare.query(&st).execute().await.with_context(|| {
                format!(
                    "migration {v}: applying: {}",
                    st.lines().next().unwrap_or_default()
                )
            })?;
        }
        bare.query(&schema::record_version(cfg, v))
            .execute()
            .await
            .with_context(|| format!("recording schema version {v}"))?;
    }
    Ok(schema::SCHEMA_VERSION)
}
