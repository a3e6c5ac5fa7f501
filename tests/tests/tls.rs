//! TLS by default: `ferry serve` makes its fleet CA and serves MQTT and HTTP
//! over TLS only; devices and the CLI trust that CA alone. Hostile cases: a
//! client speaking plain text, a client trusting other CAs, an impostor
//! manager with a CA of its own, and a CLI pointed at another manager (the
//! local manager's token must not go there).

use std::net::SocketAddr;
use std::process::Command;
use std::time::Duration;

use ferry_e2e::{Agent, Manager, ferry_binary, free_port, release};
use ferry_protocol::SecretKey;
use rumqttc::MqttOptions;
use serde_json::json;

fn addr(port: u16) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], port))
}

/// Whether a plain-text MQTT client gets a CONNACK from `at` within 5 s.
async fn plain_mqtt_connects(at: SocketAddr, user: &str, password: &str) -> bool {
    let mut options = MqttOptions::new(format!("probe-{user}"), "127.0.0.1", at.port());
    options.set_credentials(user, password);
    ferry_e2e::mqtt_connects(options).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn by_default_the_manager_speaks_only_tls_and_devices_trust_only_its_ca() {
    let dir = tempfile::tempdir().unwrap();
    let (mqtt, http) = (addr(free_port()), addr(free_port()));
    let manager = Manager::start(&dir.path().join("manager"), mqtt, http).await;
    let ca_pem = manager.ca_pem.clone().expect("a TLS manager has a CA");
    let ca_key = dir.path().join("manager/ca.key");
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(
        std::fs::metadata(&ca_key).unwrap().permissions().mode() & 0o777,
        0o600
    );
    // The harness's client trusts the CA alone: the API answers over HTTPS.
    let password = manager.add_device("gw-1", &[]).await;
    let created = manager
        .post("/v1/devices", json!({ "device_id": "gw-2" }))
        .await;
    assert_eq!(created["ca_pem"], ca_pem.as_str(), "{created}");
    assert!(
        created["broker_url"]
            .as_str()
            .unwrap()
            .starts_with("mqtts://"),
        "{created}"
    );
    assert!(
        created["manager_url"]
            .as_str()
            .unwrap()
            .starts_with("https://"),
        "{created}"
    );

    // Plain text is not served: not HTTP, not MQTT (valid credentials or not).
    let plain = reqwest::Client::new();
    assert!(
        plain
            .get(format!("http://{http}/healthz"))
            .send()
            .await
            .is_err()
    );
    assert!(!plain_mqtt_connects(mqtt, "gw-1", &password).await);
    // A client that trusts another CA (another fleet's) refuses it.
    let other_dir = dir.path().join("other");
    std::fs::create_dir_all(&other_dir).unwrap();
    let other_ca = ferry::serve::tls::load_or_create(&other_dir, &["localhost".into()]).unwrap();
    let strangers = reqwest::Client::builder()
        .tls_certs_only(reqwest::Certificate::from_pem_bundle(other_ca.ca_pem.as_bytes()).unwrap())
        .build()
        .unwrap();
    let refused = strangers
        .get(format!("https://{http}/healthz"))
        .send()
        .await
        .unwrap_err();
    assert!(
        format!("{refused:?}").contains("UnknownIssuer"),
        "{refused:?}"
    );

    // A device over mqtts:// and HTTPS downloads (HTTP only: no fallback to
    // MQTT blocks) installs a release.
    let key = SecretKey::from_seed(&[7; 32]);
    let trust = dir.path().join("ops.pub");
    std::fs::write(&trust, key.public_key().to_text()).unwrap();
    let agent = Agent::start_with(
        dir.path(),
        "gw-1",
        &password,
        manager.endpoints(),
        &trust,
        "[transfer]\ntransport = \"http\"\n",
    );
    manager
        .wait_device("gw-1", "online", |d| d["online"] == true)
        .await;
    let v1 = release(dir.path(), &key, "1.0.0", 1, &dir.path().join("out"));
    manager.deploy_and_wait(&v1, "gw-1").await;
    agent.stop().await;
    manager.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_device_never_talks_to_a_manager_its_ca_did_not_sign() {
    let dir = tempfile::tempdir().unwrap();
    let key = SecretKey::from_seed(&[8; 32]);
    let trust = dir.path().join("ops.pub");
    std::fs::write(&trust, key.public_key().to_text()).unwrap();
    let real = Manager::start(
        &dir.path().join("real"),
        addr(free_port()),
        addr(free_port()),
    )
    .await;
    // The impostor: another manager, its own CA, the same device and
    // password (say, a stolen device record), on the network path.
    let impostor = Manager::start(
        &dir.path().join("impostor"),
        addr(free_port()),
        addr(free_port()),
    )
    .await;
    let password = impostor.add_device("gw-1", &[]).await;
    let control_password = impostor.add_device("gw-ok", &[]).await;
    let mut pointed_at_impostor = impostor.endpoints();
    pointed_at_impostor.ca_pem = real.ca_pem.clone();
    let fooled = Agent::start(dir.path(), "gw-1", &password, pointed_at_impostor, &trust);
    // A device that does trust the impostor's CA connects at once: the
    // other one is refused by its certificate check, not by slowness.
    let control = Agent::start(
        dir.path(),
        "gw-ok",
        &control_password,
        impostor.endpoints(),
        &trust,
    );
    impostor
        .wait_device("gw-ok", "online", |d| d["online"] == true)
        .await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    let device = impostor.get("/v1/devices/gw-1").await;
    assert_ne!(device["online"], true, "{device}");
    assert!(device["reported"].is_null(), "{device}");
    fooled.stop().await;
    control.stop().await;
    impostor.stop().await;
    real.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cli_pins_the_managers_ca_and_keeps_its_token_for_it() {
    let dir = tempfile::tempdir().unwrap();
    let home = dir.path().join("home");
    std::fs::create_dir_all(home.join(".config/ferry")).unwrap();
    let ours = Manager::start(
        &dir.path().join("ours"),
        addr(free_port()),
        addr(free_port()),
    )
    .await;
    let theirs = Manager::start(
        &dir.path().join("theirs"),
        addr(free_port()),
        addr(free_port()),
    )
    .await;
    // This machine's record of its manager, as `ferry serve` writes it.
    std::fs::write(
        home.join(".config/ferry/local-manager.json"),
        json!({
            "url": ours.url(""),
            "token_file": ours.data_dir.join("operator.token"),
            "ca_file": ours.data_dir.join("ca.pem"),
        })
        .to_string(),
    )
    .unwrap();
    let ferry = |args: &[&str]| {
        Command::new(ferry_binary())
            .args(args)
            .env("HOME", &home)
            .env_remove("XDG_CONFIG_HOME")
            .env_remove("FERRY_URL")
            .env_remove("FERRY_TOKEN")
            .env_remove("FERRY_CA")
            .env_remove("FERRY_CONFIG")
            .output()
            .unwrap()
    };
    // The recorded manager: its CA pinned, its token used.
    let listed = ferry(&["devices", "--json"]);
    assert!(listed.status.success(), "{listed:?}");

    // Another URL: the local token is not sent there.
    let elsewhere = ferry(&["--url", &theirs.url(""), "devices"]);
    assert!(!elsewhere.status.success());
    let said = String::from_utf8_lossy(&elsewhere.stderr);
    assert!(said.contains("no operator token"), "{said}");

    // With their token but our CA: their certificate is refused, and the
    // error says why.
    let ca = ours.data_dir.join("ca.pem");
    let pinned_wrong = ferry(&[
        "--url",
        &theirs.url(""),
        "--token",
        &theirs.token,
        "--ca",
        ca.to_str().unwrap(),
        "devices",
    ]);
    assert!(!pinned_wrong.status.success());
    let said = String::from_utf8_lossy(&pinned_wrong.stderr);
    assert!(
        said.contains("not signed by the CA trusted for it"),
        "{said}"
    );
    // With their own CA it works.
    let their_ca = theirs.data_dir.join("ca.pem");
    let right = ferry(&[
        "--url",
        &theirs.url(""),
        "--token",
        &theirs.token,
        "--ca",
        their_ca.to_str().unwrap(),
        "devices",
    ]);
    assert!(right.status.success(), "{right:?}");

    // `ferry login` with the fingerprint their log prints: their CA is
    // fetched, checked and kept; then no --url or --ca is needed. A wrong
    // fingerprint keeps nothing.
    let their_pem = std::fs::read_to_string(&their_ca).unwrap();
    let fingerprint = ferry::serve::tls::fingerprint(&their_pem).unwrap();
    let wrong = ferry(&["login", &theirs.url(""), "--fingerprint", &"ab".repeat(32)]);
    assert!(!wrong.status.success());
    let said = String::from_utf8_lossy(&wrong.stderr);
    assert!(
        said.contains("presents no certificate with fingerprint"),
        "{said}"
    );
    assert!(!home.join(".config/ferry/cli.json").exists());
    let login = ferry(&[
        "login",
        &theirs.url(""),
        "--fingerprint",
        &fingerprint,
        "--token",
        &theirs.token,
    ]);
    assert!(login.status.success(), "{login:?}");
    let listed = ferry(&["devices", "--json"]);
    assert!(listed.status.success(), "{listed:?}");
    let kept = std::fs::read_dir(home.join(".config/ferry"))
        .unwrap()
        .flatten()
        .find(|e| e.file_name().to_string_lossy().ends_with("-ca.pem"))
        .unwrap();
    assert_eq!(std::fs::read_to_string(kept.path()).unwrap(), their_pem);
    ours.stop().await;
    theirs.stop().await;
}
