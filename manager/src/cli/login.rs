//! `ferry login URL`: remembers a manager for this user's CLI, with the CA
//! it is pinned to, in `~/.config/ferry/cli.json` (0600).
//!
//! The CA comes from a file (`--ca`, a copy of the manager's `ca.pem`) or
//! from the manager itself, checked against the SHA-256 fingerprint its
//! log prints (`--fingerprint`): the certificate chain it presents is read
//! without trusting it, and the CA certificate whose fingerprint matches is
//! kept. Nothing is trusted on first use.

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{Context, Result, bail};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use serde_json::json;
use sha2::{Digest, Sha256};

use super::Outcome;
use crate::files::{Existing, write_atomic};

#[derive(Debug, clap::Args)]
pub(crate) struct Args {
    /// The manager's URL, e.g. https://manager.example:8443.
    url: String,
    /// The manager's CA certificate (a copy of its ca.pem).
    #[arg(long, value_name = "FILE", conflicts_with = "fingerprint")]
    ca: Option<PathBuf>,
    /// The SHA-256 fingerprint of the manager's CA (its log prints it): the
    /// CA is fetched from the manager and kept only if it matches.
    #[arg(long, value_name = "HEX")]
    fingerprint: Option<String>,
}

/// Logs in; `token` (the global `--token`), when given, is kept too.
pub(crate) async fn run(args: Args, token: Option<String>) -> Result<Outcome> {
    let url = args.url.trim_end_matches('/').to_owned();
    let parsed = reqwest::Url::parse(&url).with_context(|| format!("{url:?} is not a URL"))?;
    let dir = crate::client::config_dir().context("no HOME to keep the login in")?;
    std::fs::create_dir_all(&dir)?;
    let host = parsed.host_str().unwrap_or("manager").replace(':', "_");
    let ca_pem = match (&args.ca, &args.fingerprint) {
        (Some(path), _) => std::fs::read_to_string(path)
            .with_context(|| format!("cannot read {}", path.display()))?,
        (None, Some(fingerprint)) => fetch_ca(&parsed, fingerprint).await?,
        (None, None) if parsed.scheme() == "https" => {
            bail!(
                "name the manager's CA: --ca FILE (its ca.pem) or --fingerprint HEX (from its log)"
            )
        }
        (None, None) => String::new(),
    };
    let port = parsed.port_or_known_default().unwrap_or(0);
    let ca_file = (!ca_pem.is_empty()).then(|| dir.join(format!("{host}-{port}-ca.pem")));
    if let Some(path) = &ca_file {
        write_atomic(path, ca_pem.as_bytes(), 0o644, Existing::Replace)?;
    }
    // It answers, through the pinned CA, before anything is kept.
    let manager = crate::client::Manager::resolve(
        Some(url.clone()),
        Some(token.clone().unwrap_or_default()),
        ca_file.clone(),
    )?;
    manager.get("/healthz").await?;
    let config = dir.join("cli.json");
    let text = json!({ "url": url, "token": token, "ca_file": ca_file }).to_string();
    write_atomic(&config, text.as_bytes(), 0o600, Existing::Replace)?;
    Ok(Outcome::ok(
        format!("logged in to {url} (kept in {})", config.display()),
        json!({ "url": url, "config": config, "ca_file": ca_file }),
    ))
}

/// The manager's CA certificate, as it presents it, if its fingerprint is
/// `fingerprint`.
async fn fetch_ca(url: &reqwest::Url, fingerprint: &str) -> Result<String> {
    let wanted = fingerprint.replace(':', "").to_lowercase();
    let host = url.host_str().context("the URL names no host")?.to_owned();
    let port = url.port_or_known_default().unwrap_or(443);
    let seen = Arc::new(std::sync::Mutex::new(Vec::<CertificateDer<'static>>::new()));
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()?
    .dangerous()
    .with_custom_certificate_verifier(Arc::new(Recorder(seen.clone())))
    .with_no_client_auth();
    let stream = tokio::net::TcpStream::connect((host.as_str(), port))
        .await
        .with_context(|| format!("cannot reach {host}:{port}"))?;
    let name = ServerName::try_from(host.clone())?;
    // The handshake is only read from: its certificates are checked below.
    let _ = tokio_rustls::TlsConnector::from(Arc::new(config))
        .connect(name, stream)
        .await;
    let chain = seen.lock().map(|c| c.clone()).unwrap_or_default();
    let ca = chain
        .iter()
        .find(|c| hex::encode(Sha256::digest(c.as_ref())) == wanted)
        .with_context(|| {
            format!("{host}:{port} presents no certificate with fingerprint {fingerprint}: not that manager")
        })?;
    Ok(pem::encode_config(
        &pem::Pem::new("CERTIFICATE", ca.as_ref().to_vec()),
        pem::EncodeConfig::new().set_line_ending(pem::LineEnding::LF),
    ))
}

/// Why the handshake of [`Recorder`] stops.
fn reading_only() -> rustls::Error {
    rustls::Error::General("only reading the chain".into())
}

/// Records the chain a server presents; accepts it only so the handshake
/// gets that far (nothing is sent over the connection).
#[derive(Debug)]
struct Recorder(Arc<std::sync::Mutex<Vec<CertificateDer<'static>>>>);

impl ServerCertVerifier for Recorder {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _: &ServerName<'_>,
        _: &[u8],
        _: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        if let Ok(mut seen) = self.0.lock() {
            seen.push(end_entity.clone().into_owned());
            seen.extend(intermediates.iter().map(|c| c.clone().into_owned()));
        }
        Err(reading_only())
    }

    fn verify_tls12_signature(
        &self,
        _: &[u8],
        _: &CertificateDer<'_>,
        _: &rustls::DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        Err(reading_only())
    }

    fn verify_tls13_signature(
        &self,
        _: &[u8],
        _: &CertificateDer<'_>,
        _: &rustls::DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        Err(reading_only())
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        rustls::crypto::ring::default_provider()
            .signature_verification_algorithms
            .supported_schemes()
    }
}
