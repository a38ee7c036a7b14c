//! TLS client settings shared by the ClickHouse and syslog clients: the given CA bundle, or
//! the web PKI roots compiled in (a DaemonSet image need not ship a CA store).

use std::sync::Arc;

use anyhow::{Context, Result};

pub fn client_config(ca_file: Option<&str>) -> Result<rustls::ClientConfig> {
    let mut roots = rustls::RootCertStore::empty();
    match ca_file {
        Some(path) => {
            use rustls::pki_types::{CertificateDer, pem::PemObject};
            for cert in CertificateDer::pem_file_iter(path)
                .with_context(|| format!("reading CA file {path}"))?
            {
                roots
                    .add(cert.with_context(|| format!("parsing CA file {path}"))?)
                    .with_context(|| format!("CA file {path}"))?;
            }
        }
        None => roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned()),
    }
    Ok(rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()?
    .with_root_certificates(roots)
    .with_no_client_auth())
}
