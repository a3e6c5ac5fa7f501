//! TLS by default: the fleet's own certificate authority and the manager's
//! server certificate.
//!
//! On first start `ferry serve` creates a CA (ECDSA P-256; `ca.key`, 0600,
//! and `ca.pem` in its data directory). On every start it issues a fresh
//! server certificate from it (`server.pem`, `server.key` 0600) for the
//! names devices and operators reach it by, and serves MQTT and HTTP over
//! TLS with it. Devices and the CLI trust that CA and nothing else for this
//! manager (pinning): a certificate a public CA issued for the same name
//! does not impersonate it.
//!
//! The HTTP listener and the manager's own clients use rustls with ring;
//! the embedded broker's listener is rmqtt's, which builds its TLS with
//! aws-lc-rs (on the manager only: the agent stays ring-only).

use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{Context, Result};
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose,
};
use rustls::pki_types::pem::PemObject;
use sha2::{Digest, Sha256};

use crate::files::{Existing, write_atomic};

/// How long the fleet CA is valid.
const CA_DAYS: i64 = 20 * 365;
/// How long a server certificate is valid (a new one every start).
const SERVER_DAYS: i64 = 397;

/// The manager's TLS material.
pub struct Pki {
    /// The CA certificate, PEM: what devices and the CLI trust.
    pub ca_pem: String,
    /// Where it is.
    pub ca_file: PathBuf,
    /// The server certificate and key files (for the broker's listener).
    pub cert_file: PathBuf,
    /// The server key file.
    pub key_file: PathBuf,
    /// The HTTPS listener's configuration (ring).
    pub server: Arc<rustls::ServerConfig>,
    /// SHA-256 of the CA certificate (DER), hex: to compare by eye.
    pub fingerprint: String,
    /// The CA's key, for device certificates.
    pub ca: Arc<DeviceCa>,
}

/// The fleet CA as an issuer of client certificates: devices' (for the
/// key each made itself) and the manager's own broker client's.
pub struct DeviceCa {
    issuer: Issuer<'static, KeyPair>,
}

/// A certificate just issued.
pub struct Issued {
    /// PEM.
    pub pem: String,
    /// DER.
    pub der: rustls::pki_types::CertificateDer<'static>,
    /// Its serial, lowercase hex without leading zeros (as X.509 parsers
    /// print it): what the store and the broker know it by.
    pub serial: String,
    /// Valid from (Unix seconds).
    pub not_before: i64,
    /// Valid until (Unix seconds).
    pub not_after: i64,
}

/// A device's ed25519 public key, as rcgen takes a subject's key.
struct Ed25519Key<'a>(&'a [u8; 32]);

impl rcgen::PublicKeyData for Ed25519Key<'_> {
    fn der_bytes(&self) -> &[u8] {
        self.0
    }

    fn algorithm(&self) -> &'static rcgen::SignatureAlgorithm {
        &rcgen::PKCS_ED25519
    }
}

/// How far back a certificate's validity starts: a device whose clock is
/// a little behind still takes it (a tenth of its life, at most 5 min).
fn backdate(lifetime: std::time::Duration) -> std::time::Duration {
    (lifetime / 10).min(std::time::Duration::from_secs(300))
}

impl DeviceCa {
    /// A client certificate for `device`'s ed25519 `public_key`, valid for
    /// `lifetime`.
    pub fn issue_device(
        &self,
        device: &ferry_protocol::DeviceId,
        public_key: &[u8; 32],
        lifetime: std::time::Duration,
    ) -> Result<Issued> {
        self.issue(device.as_str(), &Ed25519Key(public_key), lifetime)
    }

    /// A client certificate named `name` for `key` (the manager's own).
    pub fn issue_client(
        &self,
        name: &str,
        key: &KeyPair,
        lifetime: std::time::Duration,
    ) -> Result<Issued> {
        self.issue(name, key, lifetime)
    }

    fn issue(
        &self,
        name: &str,
        key: &impl rcgen::PublicKeyData,
        lifetime: std::time::Duration,
    ) -> Result<Issued> {
        // 128 random bits, the top one clear (serials are positive) and the
        // next set (no leading zero to print differently).
        let mut serial = [0u8; 16];
        getrandom::fill(&mut serial).map_err(|e| anyhow::anyhow!("no randomness: {e}"))?;
        serial[0] = (serial[0] & 0x3f) | 0x40;
        let now = time::OffsetDateTime::now_utc();
        let mut params = CertificateParams::default();
        params.distinguished_name.push(DnType::CommonName, name);
        params.serial_number = Some(serial.to_vec().into());
        params.not_before = now - backdate(lifetime);
        params.not_after = now + lifetime;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        params.use_authority_key_identifier_extension = true;
        let cert = params
            .signed_by(key, &self.issuer)
            .context("cannot issue a client certificate")?;
        Ok(Issued {
            pem: cert.pem(),
            der: cert.der().clone(),
            serial: hex::encode(serial),
            not_before: params.not_before.unix_timestamp(),
            not_after: params.not_after.unix_timestamp(),
        })
    }
}

/// The CA's subject, from its key: the same on every start, so that the
/// issuer rebuilt from it and the key matches the certificate devices hold;
/// and another fleet's CA has another name.
fn ca_params(key: &KeyPair) -> CertificateParams {
    let mut params = CertificateParams::default();
    let mut name = DistinguishedName::new();
    let id = hex::encode(&Sha256::digest(key.public_key_raw())[..8]);
    name.push(DnType::OrganizationName, "Ferry");
    name.push(DnType::CommonName, format!("Ferry fleet CA {id}"));
    params.distinguished_name = name;
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    params
}

fn days_from_now(days: i64) -> time::OffsetDateTime {
    time::OffsetDateTime::now_utc() + time::Duration::days(days)
}

/// The fleet CA in `data_dir` (PEM and key), made on first start.
fn load_or_create_ca(data_dir: &Path) -> Result<(String, KeyPair)> {
    let ca_file = data_dir.join("ca.pem");
    let ca_key_file = data_dir.join("ca.key");
    match std::fs::read_to_string(&ca_key_file) {
        Ok(key_pem) => {
            let key = KeyPair::from_pem(&key_pem)
                .with_context(|| format!("{} is not a key", ca_key_file.display()))?;
            let pem = std::fs::read_to_string(&ca_file)
                .with_context(|| format!("cannot read {}", ca_file.display()))?;
            Ok((pem, key))
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let key = KeyPair::generate().context("cannot make the CA key")?;
            let mut params = ca_params(&key);
            params.not_before = days_from_now(-1);
            params.not_after = days_from_now(CA_DAYS);
            let cert = params.self_signed(&key).context("cannot make the CA")?;
            // The key first: a certificate without its key is useless.
            write_atomic(
                &ca_key_file,
                key.serialize_pem().as_bytes(),
                0o600,
                Existing::Keep,
            )?;
            write_atomic(&ca_file, cert.pem().as_bytes(), 0o644, Existing::Replace)?;
            tracing::info!(file = %ca_file.display(), "created the fleet CA");
            Ok((cert.pem(), key))
        }
        Err(e) => Err(e).with_context(|| format!("cannot read {}", ca_key_file.display())),
    }
}

/// A server certificate for `names` from the fleet CA, written to
/// `cert_file` (with the CA after it: the chain) and `key_file` (0600).
fn issue_server(
    issuer: &Issuer<'_, impl rcgen::SigningKey>,
    ca_pem: &str,
    names: &[String],
    common_name: &str,
    (cert_file, key_file): (&Path, &Path),
) -> Result<(rcgen::Certificate, KeyPair)> {
    let key = KeyPair::generate().context("cannot make the server key")?;
    let mut params = CertificateParams::new(names.to_vec())
        .context("a server name is not a valid host name or address")?;
    params
        .distinguished_name
        .push(DnType::CommonName, common_name);
    params.not_before = days_from_now(-1);
    params.not_after = days_from_now(SERVER_DAYS);
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    params.use_authority_key_identifier_extension = true;
    let cert = params
        .signed_by(&key, issuer)
        .context("cannot issue a server certificate")?;
    write_atomic(
        key_file,
        key.serialize_pem().as_bytes(),
        0o600,
        Existing::Replace,
    )?;
    let chain_pem = format!("{}{}", cert.pem(), ca_pem);
    write_atomic(cert_file, chain_pem.as_bytes(), 0o644, Existing::Replace)?;
    Ok((cert, key))
}

/// The manager's own client certificate for the broker.
pub struct ManagerClient {
    /// Its serial, as the broker's login check compares it.
    pub serial: String,
    /// The certificate.
    pub der: rustls::pki_types::CertificateDer<'static>,
    /// Its key.
    pub key: rustls::pki_types::PrivatePkcs8KeyDer<'static>,
}

/// How long the manager's client certificate lives, and how close to its
/// end a start makes a new one.
const MANAGER_CLIENT_DAYS: u64 = 397;
const MANAGER_CLIENT_RENEW_DAYS: i64 = 30;

/// The manager's client certificate, kept in `data_dir/manager-client.pem`
/// (certificate and key, 0600): replicas sharing the data directory, or a
/// copy of it, show the same one, so each knows the others for the
/// manager. Made when missing, unreadable or within 30 days of its end.
pub fn manager_client(data_dir: &Path, ca: &DeviceCa) -> Result<ManagerClient> {
    let file = data_dir.join("manager-client.pem");
    if let Some(kept) = read_manager_client(&file) {
        return Ok(kept);
    }
    let key = KeyPair::generate().context("cannot make the manager's client key")?;
    let issued = ca.issue_client(
        "ferry-manager",
        &key,
        std::time::Duration::from_secs(MANAGER_CLIENT_DAYS * 24 * 3600),
    )?;
    let text = format!("{}{}", issued.pem, key.serialize_pem());
    // Another replica starting at the same moment may have written one
    // first: then that one is everyone's.
    match write_atomic(&file, text.as_bytes(), 0o600, Existing::Keep) {
        Ok(()) => {}
        Err(e) => match read_manager_client(&file) {
            Some(kept) => return Ok(kept),
            None => {
                write_atomic(&file, text.as_bytes(), 0o600, Existing::Replace)
                    .with_context(|| format!("cannot keep {}: {e}", file.display()))?;
            }
        },
    }
    Ok(ManagerClient {
        serial: issued.serial,
        der: issued.der,
        key: key.serialize_der().into(),
    })
}

/// The kept manager certificate, while it is readable and not near its end.
fn read_manager_client(file: &Path) -> Option<ManagerClient> {
    let text = std::fs::read_to_string(file).ok()?;
    let blocks = pem::parse_many(text.as_bytes()).ok()?;
    let cert = blocks.iter().find(|b| b.tag() == "CERTIFICATE")?;
    let key = blocks.iter().find(|b| b.tag() == "PRIVATE KEY")?;
    let (_, parsed) = x509_parser::parse_x509_certificate(cert.contents()).ok()?;
    let renew_at = parsed.validity().not_after.timestamp() - MANAGER_CLIENT_RENEW_DAYS * 24 * 3600;
    if time::OffsetDateTime::now_utc().unix_timestamp() >= renew_at {
        return None;
    }
    Some(ManagerClient {
        serial: parsed.serial.to_str_radix(16),
        der: cert.contents().to_vec().into(),
        key: key.contents().to_vec().into(),
    })
}

/// Where a broker cluster's servers find their TLS files.
#[derive(Debug, Clone)]
pub struct BrokerCertificate {
    /// The server certificate and the CA after it.
    pub cert_file: std::path::PathBuf,
    /// Its key (0600).
    pub key_file: std::path::PathBuf,
    /// The fleet CA: what the servers check device certificates against.
    pub ca_file: std::path::PathBuf,
}

/// A server certificate from the fleet CA in `data_dir` (made there if
/// need be) for the brokers of a cluster reached by `names`, written as
/// `broker.pem` and `broker.key` beside it.
pub fn issue_broker_certificate(data_dir: &Path, names: &[String]) -> Result<BrokerCertificate> {
    let (ca_pem, ca_key) = load_or_create_ca(data_dir)?;
    let issuer = Issuer::new(ca_params(&ca_key), &ca_key);
    let certificate = BrokerCertificate {
        cert_file: data_dir.join("broker.pem"),
        key_file: data_dir.join("broker.key"),
        ca_file: data_dir.join("ca.pem"),
    };
    issue_server(
        &issuer,
        &ca_pem,
        names,
        "Ferry broker",
        (&certificate.cert_file, &certificate.key_file),
    )?;
    Ok(certificate)
}

/// Loads the fleet CA from `data_dir` (creating it on first start) and
/// issues a server certificate for `names` (host names or IP addresses).
pub fn load_or_create(data_dir: &Path, names: &[String]) -> Result<Pki> {
    let ca_file = data_dir.join("ca.pem");
    let (ca_pem, ca_key) = load_or_create_ca(data_dir)?;
    let ca_der = rustls::pki_types::CertificateDer::from_pem_slice(ca_pem.as_bytes())
        .map_err(|e| anyhow::anyhow!("{}: {e}", ca_file.display()))?;
    let issuer = Issuer::new(ca_params(&ca_key), &ca_key);
    let cert_file = data_dir.join("server.pem");
    let key_file = data_dir.join("server.key");
    let (cert, key) = issue_server(
        &issuer,
        &ca_pem,
        names,
        "Ferry manager",
        (&cert_file, &key_file),
    )
    .context("a --public-name is not a valid host name or address")?;

    let provider = Arc::new(rustls::crypto::ring::default_provider());
    // Devices may present their certificate (artifact downloads);
    // operators come without one and show a token instead.
    let mut roots = rustls::RootCertStore::empty();
    roots.add(ca_der.clone())?;
    let client_auth = rustls::server::WebPkiClientVerifier::builder_with_provider(
        Arc::new(roots),
        provider.clone(),
    )
    .allow_unauthenticated()
    .build()
    .context("cannot set up client certificates")?;
    let mut server = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_client_cert_verifier(client_auth)
        .with_single_cert(
            vec![cert.der().clone(), ca_der.clone()],
            rustls::pki_types::PrivateKeyDer::Pkcs8(key.serialize_der().into()),
        )
        .context("the server certificate does not fit its key")?;
    server.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Pki {
        fingerprint: hex::encode(Sha256::digest(ca_der.as_ref())),
        ca_pem,
        ca_file,
        cert_file,
        key_file,
        server: Arc::new(server),
        ca: Arc::new(DeviceCa {
            issuer: Issuer::new(ca_params(&ca_key), ca_key),
        }),
    })
}

/// SHA-256 of the first certificate in `pem` (DER), hex: a CA's
/// fingerprint as the manager logs it and `ferry login --fingerprint`
/// takes it.
pub fn fingerprint(pem: &str) -> Option<String> {
    let der = rustls::pki_types::CertificateDer::from_pem_slice(pem.as_bytes()).ok()?;
    Some(hex::encode(Sha256::digest(der.as_ref())))
}

/// The names the server certificate covers: loopback, this machine's host
/// name, the listen addresses when specific, the public URL's host, and
/// the operator's `--public-name`s.
pub fn server_names(
    listens: &[std::net::SocketAddr],
    public_url: Option<&str>,
    public_names: &[String],
) -> Vec<String> {
    let mut names: Vec<String> = vec!["localhost".into(), "127.0.0.1".into(), "::1".into()];
    if let Ok(host) = std::fs::read_to_string("/proc/sys/kernel/hostname") {
        names.push(host.trim().to_owned());
    }
    for listen in listens {
        if !listen.ip().is_unspecified() {
            names.push(listen.ip().to_string());
        }
    }
    if let Some(host) = public_url
        .and_then(|u| reqwest::Url::parse(u).ok())
        .and_then(|u| u.host_str().map(|h| h.trim_matches(['[', ']']).to_owned()))
    {
        names.push(host);
    }
    names.extend(public_names.iter().cloned());
    names.retain(|n| !n.is_empty());
    names.sort();
    names.dedup();
    names
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_ca_is_made_once_and_signs_every_server_certificate() {
        let dir = tempfile::tempdir().unwrap();
        let names = vec!["localhost".to_owned(), "127.0.0.1".to_owned()];
        let first = load_or_create(dir.path(), &names).unwrap();
        let second = load_or_create(dir.path(), &names).unwrap();
        assert_eq!(first.ca_pem, second.ca_pem);
        assert_eq!(first.fingerprint, second.fingerprint);
        use std::os::unix::fs::PermissionsExt;
        for secret in ["ca.key", "server.key"] {
            let mode = std::fs::metadata(dir.path().join(secret))
                .unwrap()
                .permissions()
                .mode();
            assert_eq!(mode & 0o777, 0o600, "{secret}");
        }
        // The server certificate verifies against the CA alone.
        let chain = std::fs::read(&second.cert_file).unwrap();
        let certs: Vec<_> = rustls::pki_types::CertificateDer::pem_slice_iter(&chain)
            .collect::<Result<_, _>>()
            .unwrap();
        let ca =
            rustls::pki_types::CertificateDer::from_pem_slice(first.ca_pem.as_bytes()).unwrap();
        let mut roots = rustls::RootCertStore::empty();
        roots.add(ca).unwrap();
        let verifier = rustls::client::WebPkiServerVerifier::builder_with_provider(
            Arc::new(roots),
            Arc::new(rustls::crypto::ring::default_provider()),
        )
        .build()
        .unwrap();
        use rustls::client::danger::ServerCertVerifier;
        let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
        verifier
            .verify_server_cert(
                &certs[0],
                &certs[1..],
                &name,
                &[],
                rustls::pki_types::UnixTime::now(),
            )
            .unwrap();
        let other = rustls::pki_types::ServerName::try_from("evil.example").unwrap();
        assert!(
            verifier
                .verify_server_cert(
                    &certs[0],
                    &certs[1..],
                    &other,
                    &[],
                    rustls::pki_types::UnixTime::now()
                )
                .is_err()
        );
    }
}
