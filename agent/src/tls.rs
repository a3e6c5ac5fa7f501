//! TLS for the agent's connections to its manager: rustls with ring.
//!
//! With the fleet CA in the configuration (`[broker] ca_pem`), that CA
//! alone is trusted, for MQTT and for downloads: the manager's certificate
//! is pinned to it, and a certificate a public CA issued for the same name
//! does not impersonate the manager. Without it, the system's roots.

use std::sync::Arc;

use rustls::pki_types::CertificateDer;
use rustls::pki_types::pem::PemObject;

/// The certificates of a PEM text; an error when there is none or one does
/// not read.
pub fn certificates(pem: &str) -> Result<Vec<CertificateDer<'static>>, String> {
    let certs = CertificateDer::pem_slice_iter(pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("the CA certificate does not read: {e}"))?;
    if certs.is_empty() {
        return Err("no certificate in the CA PEM text".into());
    }
    Ok(certs)
}

/// A client configuration trusting exactly the certificates in `ca_pem`.
pub fn pinned_client_config(ca_pem: &str) -> Result<rustls::ClientConfig, String> {
    let mut roots = rustls::RootCertStore::empty();
    for cert in certificates(ca_pem)? {
        roots
            .add(cert)
            .map_err(|e| format!("the CA certificate is not usable: {e}"))?;
    }
    rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())
        .map(|b| b.with_root_certificates(roots).with_no_client_auth())
}
