//! Per-device identity: a device makes its own key, enrols with a one-time
//! token for a short-lived client certificate, renews it with the key, and
//! is cut off at once when revoked. Hostile cases: a spent token, another
//! device's certificate, a certificate from another CA, an expired one, a
//! revoked one; each against the broker and the HTTP API; and a device's
//! certificate shown by an impostor server to pose as the manager.

use std::net::SocketAddr;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use ferry_agent::identity::{EnrolError, Identity};
use ferry_agent::layout::Layout;
use ferry_agent::tls::ClientCertificate;
use ferry_e2e::{Agent, Manager, free_port, release, test_config};
use ferry_protocol::{DeviceId, SecretKey};
use rumqttc::MqttOptions;
use serde_json::json;

fn addr(port: u16) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], port))
}

/// A manager serving TLS whose device certificates live `lifetime`.
async fn manager_with_lifetime(dir: &Path, lifetime: Duration) -> Manager {
    let mut config = test_config(
        &dir.join("manager"),
        addr(free_port()),
        addr(free_port()),
        None,
    );
    config.device_cert_lifetime = lifetime;
    Manager::start_configured(config).await
}

/// Whether an MQTT client showing `certificate` and calling itself `user`
/// gets a CONNACK from the manager's broker within 5 s.
async fn mqtt_connects(manager: &Manager, user: &str, certificate: Arc<ClientCertificate>) -> bool {
    let ca = manager.ca_pem.clone().unwrap();
    let mut options = MqttOptions::new(user, "127.0.0.1", manager.mqtt.port());
    options.set_credentials(user, "");
    let config = ferry_agent::tls::pinned_client_config(&ca, Some(certificate)).unwrap();
    options.set_transport(rumqttc::Transport::tls_with_config(
        rumqttc::TlsConfiguration::Rustls(Arc::new(config)),
    ));
    ferry_e2e::mqtt_connects(options).await
}

/// What an artifact download showing `certificate` gets: the status, or
/// the error when the TLS handshake failed.
async fn download_status(
    manager: &Manager,
    certificate: Arc<ClientCertificate>,
) -> Result<u16, String> {
    let http =
        ferry_agent::device::http_client(manager.ca_pem.as_deref(), Some(certificate)).unwrap();
    let url = format!("https://{}/v1/artifacts/{}", manager.http, "0".repeat(64));
    http.get(url)
        .send()
        .await
        .map(|r| r.status().as_u16())
        .map_err(|e| ferry_agent::error_chain(&e))
}

/// A device identity of the test's own, in `dir`.
fn identity(dir: &Path, device: &str) -> Identity {
    Identity::load_or_create(&Layout::new(dir), &DeviceId::new(device).unwrap()).unwrap()
}

fn manager_origin(manager: &Manager) -> reqwest::Url {
    format!("https://{}", manager.http).parse().unwrap()
}

async fn enrol(
    manager: &Manager,
    identity: &mut Identity,
    token: Option<&str>,
) -> Result<i64, EnrolError> {
    let http = ferry_agent::device::http_client(
        manager.ca_pem.as_deref(),
        Some(identity.client_certificate()),
    )
    .unwrap();
    identity
        .enrol(&http, &manager_origin(manager), token)
        .await
        .map(|c| c.not_after)
}

fn unix_now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

/// Sleeps until the Unix second `at` has passed.
async fn sleep_past(at: i64) {
    let wait = (at + 1 - unix_now()).max(0) as u64;
    tokio::time::sleep(Duration::from_secs(wait)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_device_enrols_renews_its_certificate_and_is_cut_off_when_revoked() {
    let dir = tempfile::tempdir().unwrap();
    let manager = manager_with_lifetime(dir.path(), Duration::from_secs(6)).await;
    let key = SecretKey::from_seed(&[21; 32]);
    let trust = dir.path().join("ops.pub");
    std::fs::write(&trust, key.public_key().to_text()).unwrap();

    // `device add` gives a token, not a password, on a TLS manager.
    let created = manager
        .post("/v1/devices", json!({ "device_id": "gw-1" }))
        .await;
    assert_eq!(created["credential"], "certificate", "{created}");
    assert!(created.get("password").is_none(), "{created}");
    let token = created["enrol_token"].as_str().unwrap().to_owned();
    let shown = manager.get("/v1/devices/gw-1").await;
    assert_eq!(shown["credential"]["kind"], "enrolling", "{shown}");

    // Downloads over HTTPS only: they show the certificate too.
    let start_agent = |token: &str| {
        Agent::start_with(
            dir.path(),
            "gw-1",
            token,
            manager.endpoints(),
            &trust,
            "[transfer]\ntransport = \"http\"\n",
        )
    };
    let agent = start_agent(&token);
    let device = manager
        .wait_device("gw-1", "online with a certificate", |d| {
            d["online"] == true && d["credential"]["kind"] == "certificate"
        })
        .await;
    let first = device["credential"]["serial"].as_str().unwrap().to_owned();
    // The key was made on the device and is private to the agent.
    let key_file = agent.data_dir.join("identity/key.pk8");
    let mode = std::fs::metadata(&key_file).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o600);

    // Two thirds into its life the agent gets the next certificate.
    manager
        .wait_device("gw-1", "a renewed certificate", |d| {
            d["credential"]["serial"]
                .as_str()
                .is_some_and(|s| s != first)
        })
        .await;
    // Well past the first certificate's end, the device still installs
    // (a new HTTPS connection, with the renewed certificate).
    tokio::time::sleep(Duration::from_secs(7)).await;
    let v1 = release(dir.path(), &key, "1.0.0", 1, &dir.path().join("out"));
    let device = manager.deploy_and_wait(&v1, "gw-1").await;
    assert_eq!(device["online"], true);

    // Revoked: the session ends at once, and the device's own key and
    // certificate open neither the broker nor the API any more.
    let certificate = identity(&agent.data_dir, "gw-1").client_certificate();
    assert!(certificate.is_set());
    assert!(!mqtt_connects(&manager, "gw-1-probe", certificate.clone()).await);
    manager.post("/v1/devices/gw-1/revoke", json!({})).await;
    manager
        .wait_device("gw-1", "offline once revoked", |d| {
            d["online"] == false && d["credential"]["kind"] == "revoked"
        })
        .await;
    agent.stop().await;
    let mut revoked = identity(&agent_dir(dir.path(), "gw-1"), "gw-1");
    assert!(!mqtt_connects(&manager, "gw-1", revoked.client_certificate()).await);
    assert_eq!(
        download_status(&manager, revoked.client_certificate()).await,
        Ok(401)
    );
    // Nor does its key renew: the manager has no key on record for it.
    let refused = enrol(&manager, &mut revoked, None).await.unwrap_err();
    assert!(matches!(refused, EnrolError::Refused(_)), "{refused}");

    // Added again, it enrols with the new token (same key) and is back.
    let token = manager.add_device("gw-1", &[]).await;
    let agent = start_agent(&token);
    manager
        .wait_device("gw-1", "back online", |d| {
            d["online"] == true && d["credential"]["kind"] == "certificate"
        })
        .await;
    agent.stop().await;
    manager.stop().await;
}

fn agent_dir(dir: &Path, device: &str) -> std::path::PathBuf {
    dir.join(format!("agent-{device}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spent_foreign_expired_and_borrowed_certificates_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let manager = manager_with_lifetime(dir.path(), Duration::from_secs(4)).await;
    let token_a = manager.add_device("gw-a", &[]).await;
    let _token_b = manager.add_device("gw-b", &[]).await;

    // Passwords are not taken by the embedded broker over TLS.
    let refused = manager
        .request(reqwest::Method::POST, "/v1/devices")
        .json(&json!({ "device_id": "gw-c", "credential": "password" }))
        .send()
        .await
        .unwrap();
    assert_eq!(refused.status(), 400);

    let mut a = identity(&dir.path().join("a"), "gw-a");
    let not_after = enrol(&manager, &mut a, Some(&token_a)).await.unwrap();
    let a_cert = a.client_certificate();
    // Accepted as itself, on MQTT and HTTP (the artifact is not its: 403,
    // or unknown: 404, but never "who are you").
    assert!(mqtt_connects(&manager, "gw-a", a_cert.clone()).await);
    let status = download_status(&manager, a_cert.clone()).await.unwrap();
    assert!(status == 403 || status == 404, "{status}");

    // The token is spent: another key cannot enrol as gw-a with it.
    let mut thief = identity(&dir.path().join("thief"), "gw-a");
    let refused = enrol(&manager, &mut thief, Some(&token_a))
        .await
        .unwrap_err();
    assert!(matches!(refused, EnrolError::Refused(_)), "{refused}");
    // Nor without it: its key is not the one on record.
    assert!(enrol(&manager, &mut thief, None).await.is_err());

    // gw-a's certificate does not make anyone gw-b.
    assert!(!mqtt_connects(&manager, "gw-b", a_cert.clone()).await);

    // A certificate another CA issued for gw-a's own key is refused.
    std::fs::create_dir_all(dir.path().join("other")).unwrap();
    let other = ferry::serve::tls::load_or_create(&dir.path().join("other"), &["localhost".into()])
        .unwrap();
    let request = a.request(None);
    let public: [u8; 32] = hex::decode(&request.public_key)
        .unwrap()
        .try_into()
        .unwrap();
    let forged = other
        .ca
        .issue_device(
            &DeviceId::new("gw-a").unwrap(),
            &public,
            Duration::from_secs(3600),
        )
        .unwrap();
    let pkcs8 = std::fs::read(dir.path().join("a/identity/key.pk8")).unwrap();
    // Shown whatever its dates say (the agent's own stops at expiry).
    let showing = |chain| {
        let certificate = Arc::new(ClientCertificate::default());
        certificate
            .set(
                chain,
                rustls::pki_types::PrivateKeyDer::Pkcs8(pkcs8.clone().into()),
                None,
            )
            .unwrap();
        certificate
    };
    let foreign = showing(vec![forged.der]);
    assert!(!mqtt_connects(&manager, "gw-a", foreign.clone()).await);
    assert!(download_status(&manager, foreign).await.is_err());

    // Expired: refused by both, though nothing was revoked...
    let pem = &a.certificate().unwrap().certificate_pem;
    let stale = showing(ferry_agent::tls::certificates(pem).unwrap());
    sleep_past(not_after).await;
    assert!(!mqtt_connects(&manager, "gw-a", stale.clone()).await);
    // (TLS 1.3 checks the client's certificate after the client thinks
    // the handshake is done: the refusal reaches it as the alert, or as
    // the connection closing under its request.)
    let expired = download_status(&manager, stale).await;
    assert!(expired.is_err(), "{expired:?}");
    // (the agent stops showing it: the API then asks who this is)
    assert_eq!(download_status(&manager, a_cert.clone()).await, Ok(401));
    // ...and the device's key renews it (no token needed any more).
    enrol(&manager, &mut a, None).await.unwrap();
    assert!(mqtt_connects(&manager, "gw-a", a.client_certificate()).await);
    manager.stop().await;
}

/// What a client trusting the fleet CA alone (as every agent does) makes
/// of a TLS server at `at` that it knows as `name`: the handshake's error.
async fn handshake_error(ca_pem: &str, at: SocketAddr, name: &str) -> Option<rustls::Error> {
    let config = ferry_agent::tls::pinned_client_config(ca_pem, None).unwrap();
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    let tcp = tokio::net::TcpStream::connect(at).await.unwrap();
    let name = rustls::pki_types::ServerName::try_from(name.to_owned()).unwrap();
    let error = connector.connect(name, tcp).await.err()?;
    error
        .into_inner()
        .and_then(|e| e.downcast::<rustls::Error>().ok())
        .map(|e| *e)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_devices_certificate_cannot_impersonate_the_manager() {
    // Whoever holds one device's key and certificate (both signed by the
    // fleet CA every device trusts) puts up a broker or an artifact server
    // of their own on the network path: other devices must refuse it.
    let dir = tempfile::tempdir().unwrap();
    let manager = manager_with_lifetime(dir.path(), Duration::from_secs(3600)).await;
    let token = manager.add_device("gw-a", &[]).await;
    let mut a = identity(&dir.path().join("a"), "gw-a");
    enrol(&manager, &mut a, Some(&token)).await.unwrap();
    let chain = ferry_agent::tls::certificates(&a.certificate().unwrap().certificate_pem).unwrap();
    let pkcs8 = std::fs::read(dir.path().join("a/identity/key.pk8")).unwrap();
    let server = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_no_client_auth()
    .with_single_cert(chain, rustls::pki_types::PrivateKeyDer::Pkcs8(pkcs8.into()))
    .unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(server));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let impostor = listener.local_addr().unwrap();
    let serving = tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let _ = acceptor.accept(tcp).await;
        }
    });

    let ca = manager.ca_pem.clone().unwrap();
    // Under every name a device may know its manager by, including the
    // device id the certificate carries: the certificate is the impostor's
    // to show, and the client refuses it for what it is.
    for name in ["localhost", "127.0.0.1", "gw-a"] {
        let refused = handshake_error(&ca, impostor, name).await;
        assert!(
            matches!(refused, Some(rustls::Error::InvalidCertificate(_))),
            "{name}: {refused:?}"
        );
    }
    // The same client and CA do reach the real manager.
    assert_eq!(handshake_error(&ca, manager.http, "localhost").await, None);
    serving.abort();
    manager.stop().await;
}
