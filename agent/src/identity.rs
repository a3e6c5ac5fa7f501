//! The device's identity: an ed25519 key it made itself, and the
//! short-lived client certificate the manager issues for that key.
//!
//! - The key is made on first start (`DATA_DIR/identity/key.pk8`, 0600)
//!   and never leaves the device.
//! - With the one-time enrolment token from `ferry device add`, the agent
//!   asks `POST /v1/enrol` for a certificate ([`ferry_protocol::enrol`]);
//!   the answer is kept in `identity/certificate.json`.
//! - Two thirds into the certificate's life it asks again, signed by the
//!   same key (no token): a renewal. A manager that is away is asked again
//!   later, with backoff, until the certificate expires and after.
//! - The certificate goes into [`ClientCertificate`], which every MQTT
//!   and HTTPS connection shows: renewal needs no reconnect.

use std::io;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use ferry_protocol::DeviceId;
use ferry_protocol::enrol::{EnrolRequest, EnrolResponse};
use ring::signature::{Ed25519KeyPair, KeyPair};
use rustls::pki_types::{PrivateKeyDer, PrivatePkcs8KeyDer};

use crate::durable;
use crate::layout::Layout;
use crate::tls::{ClientCertificate, certificates};

/// The largest answer to an enrolment request read.
const MAX_RESPONSE: usize = 64 * 1024;

/// Why enrolment did not give a certificate.
#[derive(Debug, thiserror::Error)]
pub enum EnrolError {
    /// The manager could not be reached, or did not answer in time.
    #[error("cannot reach the manager: {0}")]
    Unreachable(#[from] reqwest::Error),
    /// The manager refused (its reason).
    #[error("the manager refused: {0}")]
    Refused(String),
    /// The answer is not a certificate for this device's key.
    #[error("the manager's answer is unusable: {0}")]
    BadAnswer(String),
    /// The certificate could not be kept.
    #[error("cannot keep the certificate: {0}")]
    Io(#[from] io::Error),
}

/// The device's key and current certificate.
pub struct Identity {
    device: DeviceId,
    dir: PathBuf,
    key: Ed25519KeyPair,
    pkcs8: Vec<u8>,
    current: Arc<ClientCertificate>,
    certificate: Option<EnrolResponse>,
}

impl Identity {
    /// Loads the key (making it on first use) and the last certificate.
    pub fn load_or_create(layout: &Layout, device: &DeviceId) -> io::Result<Self> {
        let dir = layout.identity();
        std::fs::create_dir_all(&dir)?;
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700))?;
        let key_file = dir.join("key.pk8");
        let pkcs8 = match durable::read_limited(&key_file, 4096) {
            Ok(bytes) => bytes,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                let rng = ring::rand::SystemRandom::new();
                let document = Ed25519KeyPair::generate_pkcs8(&rng)
                    .map_err(|_| io::Error::other("cannot make a key: no randomness"))?;
                durable::write_file_mode(&key_file, document.as_ref(), 0o600)?;
                tracing::info!(file = %key_file.display(), "made this device's key");
                document.as_ref().to_vec()
            }
            Err(e) => return Err(e),
        };
        let key = Ed25519KeyPair::from_pkcs8(&pkcs8).map_err(|e| {
            io::Error::new(
                io::ErrorKind::InvalidData,
                format!("{} is not an ed25519 key: {e}", key_file.display()),
            )
        })?;
        let mut identity = Self {
            device: device.clone(),
            dir,
            key,
            pkcs8,
            current: Arc::new(ClientCertificate::default()),
            certificate: None,
        };
        let kept: Option<EnrolResponse> = durable::read_json(&identity.certificate_file())
            .unwrap_or_else(|e| {
                tracing::warn!("the kept certificate does not read, enrolling again: {e}");
                None
            });
        if let Some(kept) = kept {
            if let Err(e) = identity.show(&kept) {
                tracing::warn!("the kept certificate is unusable, enrolling again: {e}");
            } else {
                identity.certificate = Some(kept);
            }
        }
        Ok(identity)
    }

    fn certificate_file(&self) -> PathBuf {
        self.dir.join("certificate.json")
    }

    /// What connections show; set once enrolled.
    pub fn client_certificate(&self) -> Arc<ClientCertificate> {
        self.current.clone()
    }

    /// The current certificate, if enrolled.
    pub fn certificate(&self) -> Option<&EnrolResponse> {
        self.certificate.as_ref()
    }

    /// When to ask for the next certificate: now when there is none.
    pub fn renew_at(&self) -> SystemTime {
        match &self.certificate {
            Some(c) => UNIX_EPOCH + Duration::from_secs(c.renew_at().max(0) as u64),
            None => UNIX_EPOCH,
        }
    }

    /// A signed request for a certificate, with `token` on first contact.
    pub fn request(&self, token: Option<&str>) -> EnrolRequest {
        let public = self.key.public_key().as_ref();
        let signature = self
            .key
            .sign(&EnrolRequest::signed_bytes(&self.device, public, token));
        EnrolRequest {
            device_id: self.device.clone(),
            public_key: hex::encode(public),
            token: token.map(str::to_owned),
            signature: hex::encode(signature.as_ref()),
        }
    }

    /// Makes connections show `certificate` with this device's key.
    fn show(&self, certificate: &EnrolResponse) -> Result<(), String> {
        let chain = certificates(&certificate.certificate_pem)?;
        let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(self.pkcs8.clone()));
        let expires = UNIX_EPOCH + Duration::from_secs(certificate.not_after.max(0) as u64);
        self.current.set(chain, key, Some(expires))
    }

    /// Asks `manager` for a certificate (enrolment with `token`, or a
    /// renewal for the key on record), and keeps it.
    pub async fn enrol(
        &mut self,
        http: &reqwest::Client,
        manager: &reqwest::Url,
        token: Option<&str>,
    ) -> Result<&EnrolResponse, EnrolError> {
        let url = manager
            .join("/v1/enrol")
            .map_err(|e| EnrolError::BadAnswer(e.to_string()))?;
        // The token goes along every time: the manager ignores it when the
        // key is on record (a renewal), and a device the operator revoked
        // and added again comes back with the new one.
        let body = serde_json::to_vec(&self.request(token))
            .map_err(|e| EnrolError::BadAnswer(e.to_string()))?;
        let mut response = http
            .post(url)
            .header(reqwest::header::CONTENT_TYPE, "application/json")
            .body(body)
            .send()
            .await?;
        let status = response.status();
        let mut bytes = Vec::new();
        while let Some(chunk) = response.chunk().await? {
            if bytes.len() + chunk.len() > MAX_RESPONSE {
                return Err(EnrolError::BadAnswer("the answer is too large".into()));
            }
            bytes.extend_from_slice(&chunk);
        }
        if !status.is_success() {
            let reason = serde_json::from_slice::<serde_json::Value>(&bytes)
                .ok()
                .and_then(|v| v["error"].as_str().map(str::to_owned))
                .unwrap_or_else(|| status.to_string());
            return Err(EnrolError::Refused(reason));
        }
        let answer: EnrolResponse =
            serde_json::from_slice(&bytes).map_err(|e| EnrolError::BadAnswer(e.to_string()))?;
        self.show(&answer).map_err(EnrolError::BadAnswer)?;
        durable::write_json(&self.certificate_file(), &answer)?;
        Ok(self.certificate.insert(answer))
    }
}

/// How long to wait before asking again after a failure.
const RETRY_MIN: Duration = Duration::from_secs(5);
const RETRY_MAX: Duration = Duration::from_secs(15 * 60);

/// Keeps the device enrolled: asks for a certificate when it has none and
/// renews it two thirds into its life; `renewed` hears of each new one.
/// Runs until whoever listens on `renewed` is gone.
pub async fn keep(
    mut identity: Identity,
    http: reqwest::Client,
    manager: reqwest::Url,
    token: Option<String>,
    renewed: tokio::sync::mpsc::UnboundedSender<()>,
) {
    let mut retry = RETRY_MIN;
    loop {
        let wait = identity
            .renew_at()
            .duration_since(SystemTime::now())
            .unwrap_or_default();
        tokio::select! {
            () = tokio::time::sleep(wait) => {}
            () = renewed.closed() => return,
        }
        match identity.enrol(&http, &manager, token.as_deref()).await {
            Ok(certificate) => {
                tracing::info!(
                    valid_until = %ferry_protocol::Timestamp::from_unix_secs(certificate.not_after.max(0) as u64),
                    "device certificate received"
                );
                retry = RETRY_MIN;
                let _ = renewed.send(());
            }
            Err(e) => {
                tracing::warn!(retry_in = ?retry, "enrolment: {e}");
                tokio::select! {
                    () = tokio::time::sleep(retry) => {}
                    () = renewed.closed() => return,
                }
                retry = (retry * 2).min(RETRY_MAX);
            }
        }
    }
}
