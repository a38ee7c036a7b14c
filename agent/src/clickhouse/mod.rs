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

use crate::config::ClickHouse as Cfg;

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
        (None, p) => p.clone(),
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
    for st in schema::statements(cfg) {
        bare.query(&st)
            .execute()
            .await
            .with_context(|| format!("applying: {}", st.lines().next().unwrap_or_default()))?;
    }
    bare.query(&format!(
        "INSERT INTO {db}.schema_version SELECT {v}, now64(3), 'credwatch {pkg}' \
         WHERE {v} NOT IN (SELECT version FROM {db}.schema_version)",
        db = cfg.database,
        v = schema::SCHEMA_VERSION,
        pkg = env!("CARGO_PKG_VERSION"),
    ))
    .execute()
    .await
    .context("recording the schema version")?;
    Ok(schema::SCHEMA_VERSION)
}
