//! TLS for the agent's connections to its manager: rustls with ring.
//!
//! With the fleet CA in the configuration (`[broker] ca_pem`), that CA
//! alone is trusted, for MQTT and for downloads: the manager's certificate
//! is pinned to it, and a certificate a public CA issued for the same name
//! does not impersonate the manager. Without it, the system's roots.
//!
//! An enrolled device shows its client certificate ([`ClientCertificate`])
//! on every connection; renewal swaps it in place, so the next connection
//! shows the new one without rebuilding any client.

use std::sync::{Arc, RwLock};
use std::time::SystemTime;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::sign::CertifiedKey;

/// The certificates of a PEM text; an error when there is none or one does
/// not read.
pub fn certificates(pem: &str) -> Result<Vec<CertificateDer<'static>>, String> {
    let certs = CertificateDer::pem_slice_iter(pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("the certificate does not read: {e}"))?;
    if certs.is_empty() {
        return Err("no certificate in the PEM text".into());
    }
    Ok(certs)
}

/// The client certificate connections show: none until one is set, then
/// whichever was set last, until it expires. (An expired one is not shown:
/// the server would end the handshake, and the device could not even ask
/// for its next certificate, which its key alone vouches for.)
#[derive(Debug, Default)]
pub struct ClientCertificate(RwLock<Option<(Arc<CertifiedKey>, Option<SystemTime>)>>);

impl ClientCertificate {
    /// Shows `chain` (leaf first) with `key` from now on, until `expires`.
    pub fn set(
        &self,
        chain: Vec<CertificateDer<'static>>,
        key: PrivateKeyDer<'static>,
        expires: Option<SystemTime>,
    ) -> Result<(), String> {
        let signing = rustls::crypto::ring::default_provider()
            .key_provider
            .load_private_key(key)
            .map_err(|e| format!("the key is not usable: {e}"))?;
        let certified = CertifiedKey::new(chain, signing);
        // A certificate for another key would fail every handshake.
        certified
            .keys_match()
            .map_err(|e| format!("the certificate is not for this key: {e}"))?;
        *self.0.write().unwrap_or_else(|e| e.into_inner()) = Some((Arc::new(certified), expires));
        Ok(())
    }

    /// Whether there is one to show.
    pub fn is_set(&self) -> bool {
        self.0.read().unwrap_or_else(|e| e.into_inner()).is_some()
    }
}

impl rustls::client::ResolvesClientCert for ClientCertificate {
    fn resolve(
        &self,
        _root_hint_subjects: &[&[u8]],
        _sigschemes: &[rustls::SignatureScheme],
    ) -> Option<Arc<CertifiedKey>> {
        let current = self.0.read().unwrap_or_else(|e| e.into_inner());
        let (certified, expires) = current.as_ref()?;
        match expires {
            Some(at) if *at <= SystemTime::now() => None,
            _ => Some(certified.clone()),
        }
    }

    fn has_certs(&self) -> bool {
        true
    }
}

/// A client configuration trusting exactly the certificates in `ca_pem`,
/// showing `client` when the server asks for a certificate.
pub fn pinned_client_config(
    ca_pem: &str,
    client: Option<Arc<ClientCertificate>>,
) -> Result<rustls::ClientConfig, String> {
    let mut roots = rustls::RootCertStore::empty();
    for cert in certificates(ca_pem)? {
        roots
            .add(cert)
            .map_err(|e| format!("the CA certificate is not usable: {e}"))?;
    }
    let builder = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .map_err(|e| e.to_string())?
    .with_root_certificates(roots);
    let mut config = match client {
        Some(client) => builder.with_client_cert_resolver(client),
        None => builder.with_no_client_auth(),
    };
    // A resumed session shows the server the certificate of the session it
    // resumes, not the current one: a renewed or re-enrolled device would
    // keep presenting its old certificate. Every connection does a full
    // handshake (a device reconnects rarely).
    config.resumption = rustls::client::Resumption::disabled();
    Ok(config)
}
