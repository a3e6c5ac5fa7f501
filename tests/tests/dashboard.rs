//! The dashboard in a real browser: headless Chromium driven through
//! chromedriver (WebDriver) loads the page the manager serves, shows the
//! fleet, follows a change live, and an abort clicked on a rollout's page
//! stops the rollout. Screenshots are saved for review.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use fantoccini::{Client, ClientBuilder, Locator};
use ferry_e2e::{Agent, Manager, free_port, installed_version, release};
use ferry_protocol::SecretKey;
use serde_json::json;

fn addr(port: u16) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], port))
}

/// chromedriver on a free port, killed when dropped.
struct Driver {
    port: u16,
    child: Child,
}

impl Driver {
    fn start() -> Self {
        let port = free_port();
        let child = Command::new("chromedriver")
            .arg(format!("--port={port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("chromedriver not found; run scripts/setup");
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(
                std::time::Instant::now() < deadline,
                "chromedriver did not start"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        Self { port, child }
    }

    /// Chromium trusting, besides its own roots, certificates whose chain
    /// holds the CA in `ca_pem` (the manager's fleet CA), by its key.
    async fn browser(&self, profile: &std::path::Path, ca_pem: Option<&str>) -> Client {
        let pin =
            ca_pem.map(|pem| format!("--ignore-certificate-errors-spki-list={}", spki_sha256(pem)));
        let mut caps = serde_json::Map::new();
        caps.insert(
            "goog:chromeOptions".into(),
            json!({
                "binary": "/usr/bin/chromium",
                "args": [
                    "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                    "--disable-quic", "--no-first-run", "--disable-background-networking",
                    "--disable-component-update", "--disable-sync", "--window-size=1280,1100",
                    format!("--user-data-dir={}", profile.display()),
                    pin.unwrap_or_default(),
                ],
            }),
        );
        ClientBuilder::new(hyper_util::client::legacy::connect::HttpConnector::new())
            .capabilities(caps)
            .connect(&format!("http://127.0.0.1:{}", self.port))
            .await
            .expect("cannot start Chromium through chromedriver")
    }
}

/// Base64 of the SHA-256 of a certificate's public key (its
/// SubjectPublicKeyInfo), the form Chromium's key pins take.
fn spki_sha256(pem: &str) -> String {
    use base64::Engine as _;
    use rustls::pki_types::pem::PemObject;
    use sha2::Digest as _;
    let der = rustls::pki_types::CertificateDer::from_pem_slice(pem.as_bytes()).unwrap();
    let (_, cert) = x509_parser::parse_x509_certificate(der.as_ref()).unwrap();
    let digest = sha2::Sha256::digest(cert.tbs_certificate.subject_pki.raw);
    base64::engine::general_purpose::STANDARD.encode(digest)
}

impl Drop for Driver {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Where screenshots go: target/tmp/dashboard-screenshots/.
fn screenshots() -> PathBuf {
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("dashboard-screenshots");
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// The text of `css` once `check` holds for it (or panics after 30 s).
async fn wait_text(client: &Client, css: &str, check: impl Fn(&str) -> bool) -> String {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        if let Ok(element) = client.find(Locator::Css(css)).await {
            if let Ok(text) = element.text().await {
                if check(&text) {
                    return text;
                }
            }
        }
        if tokio::time::Instant::now() > deadline {
            let page = client.source().await.unwrap_or_default();
            panic!("{css} never matched; page:\n{page}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_dashboard_shows_the_fleet_live_and_aborts_a_rollout() {
    let dir = tempfile::tempdir().unwrap();
    let key = SecretKey::from_seed(&[31; 32]);
    let trust = dir.path().join("ops.pub");
    std::fs::write(&trust, key.public_key().to_text()).unwrap();
    let mqtt = addr(free_port());
    let manager = Manager::start(&dir.path().join("m"), mqtt, addr(free_port())).await;
    let mut agents = Vec::new();
    for id in ["web-1", "web-2"] {
        let password = manager.add_device(id, &["lab"]).await;
        agents.push(Agent::start(
            dir.path(),
            id,
            &password,
            manager.endpoints(),
            &trust,
        ));
    }
    // Registered, never connects: a rollout that includes it stays running.
    manager.add_device("web-3", &["lab"]).await;
    let out = dir.path().join("service.out");
    let v1 = release(dir.path(), &key, "1.0.0", 1, &out);
    manager.publish(&v1).await;
    let created = manager
        .post(
            "/v1/rollouts",
            json!({ "service": "api", "version": "1.0.0", "tag": "lab", "max_in_flight": 3 }),
        )
        .await;
    let id = created["id"].as_i64().unwrap();
    for device in ["web-1", "web-2"] {
        manager
            .wait_device(device, "1.0.0", |d| {
                installed_version(d, "api").as_deref() == Some("1.0.0")
            })
            .await;
    }

    let driver = Driver::start();
    // Over HTTPS, as operators see it: the browser trusts the fleet CA.
    let client = driver
        .browser(&dir.path().join("chromium"), manager.ca_pem.as_deref())
        .await;
    client
        .goto(&format!("{}/#token={}", manager.url(""), manager.token))
        .await
        .unwrap();

    // The fleet: counts, devices, versions.
    wait_text(&client, "#devices-online .n", |t| t == "2").await;
    wait_text(&client, "#devices-offline .n", |t| t == "1").await;
    let page = client.source().await.unwrap();
    for expected in ["web-1", "web-2", "web-3", "api 1.0.0"] {
        assert!(page.contains(expected), "{expected} missing:\n{page}");
    }
    // Live: a device registered now appears without a reload.
    manager.add_device("web-4", &[]).await;
    wait_text(&client, "#devices-total .n", |t| t == "4").await;
    wait_text(&client, "#live", |t| t == "live").await;
    let shot = screenshots().join("fleet.png");
    std::fs::write(&shot, client.screenshot().await.unwrap()).unwrap();
    println!("screenshot: {}", shot.display());

    // The rollout's page, and an abort clicked there.
    client
        .goto(&format!("{}/#/rollout/{id}", manager.url("")))
        .await
        .unwrap();
    wait_text(&client, "#rollout-state", |t| t == "running").await;
    let abort = client.find(Locator::Css("#abort")).await.unwrap();
    abort.click().await.unwrap();
    client.accept_alert().await.unwrap();
    wait_text(&client, "#rollout-state", |t| t == "aborted").await;
    let rollout = manager.get(&format!("/v1/rollouts/{id}")).await;
    assert_eq!(rollout["state"], "aborted");
    assert_eq!(rollout["reason"], "aborted by the operator");
    let shot = screenshots().join("rollout.png");
    std::fs::write(&shot, client.screenshot().await.unwrap()).unwrap();
    println!("screenshot: {}", shot.display());

    // A device's page: its services and events.
    client
        .goto(&format!("{}/#/device/web-1", manager.url("")))
        .await
        .unwrap();
    wait_text(&client, "main h1", |t| t.contains("web-1")).await;
    let page = client.source().await.unwrap();
    assert!(page.contains("commit"), "no events shown:\n{page}");
    let shot = screenshots().join("device.png");
    std::fs::write(&shot, client.screenshot().await.unwrap()).unwrap();

    client.close().await.unwrap();
    for agent in agents {
        agent.stop().await;
    }
    manager.stop().await;
}
