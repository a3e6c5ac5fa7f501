//! The manager and agents together: publish, deploy by id and by tag,
//! reported versions and health arriving, broker authentication and ACL,
//! artifact upload checks and Range downloads, and a manager restart.

use std::net::SocketAddr;
use std::time::Duration;

use ferry_e2e::{Agent, Manager, free_port, installed_version, release};
use ferry_protocol::SecretKey;
use rumqttc::{AsyncClient, ConnectReturnCode, Event, MqttOptions, Packet, QoS};
use serde_json::json;

fn addr(port: u16) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], port))
}

struct Fleet {
    dir: tempfile::TempDir,
    key: SecretKey,
    trust: std::path::PathBuf,
}

impl Fleet {
    fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let key = SecretKey::from_seed(&[5; 32]);
        let trust = dir.path().join("ops.pub");
        std::fs::write(&trust, key.public_key().to_text()).unwrap();
        Self { dir, key, trust }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publish_and_deploy_by_id_and_by_tag_then_survive_a_manager_restart() {
    let fleet = Fleet::new();
    let (mqtt, http) = (addr(free_port()), addr(free_port()));
    let data = fleet.dir.path().join("manager");
    let manager = Manager::start(&data, mqtt, http).await;
    let pw1 = manager.add_device("gw-1", &["lab"]).await;
    let pw2 = manager.add_device("gw-2", &["lab"]).await;
    let a1 = Agent::start(
        fleet.dir.path(),
        "gw-1",
        &pw1,
        manager.endpoints(),
        &fleet.trust,
    );
    let a2 = Agent::start(
        fleet.dir.path(),
        "gw-2",
        &pw2,
        manager.endpoints(),
        &fleet.trust,
    );
    manager
        .wait_device("gw-1", "online", |d| d["online"] == true)
        .await;
    manager
        .wait_device("gw-2", "online", |d| d["online"] == true)
        .await;

    let out = fleet.dir.path().join("service.out");
    let v1 = release(fleet.dir.path(), &fleet.key, "1.0.0", 1, &out);
    let v2 = release(fleet.dir.path(), &fleet.key, "2.0.0", 2, &out);
    manager.publish(&v1).await;
    manager.publish(&v2).await;
    let releases = manager.get("/v1/releases").await;
    assert_eq!(releases.as_array().unwrap().len(), 2, "{releases}");

    // By id: only gw-1 gets v1.
    let d1 = manager
        .post(
            "/v1/deployments",
            json!({ "service": "api", "version": "1.0.0", "devices": ["gw-1"] }),
        )
        .await;
    let gw1 = manager
        .wait_device("gw-1", "v1", |d| {
            installed_version(d, "api").as_deref() == Some("1.0.0")
        })
        .await;
    assert_eq!(gw1["reported"]["last_result"]["outcome"], "installed");
    let gw1 = manager
        .wait_device("gw-1", "health with the service", |d| {
            d["health"]["services"]
                .as_array()
                .is_some_and(|s| s.iter().any(|s| s["state"] == "active"))
        })
        .await;
    assert!(gw1["health"]["memory"]["total_bytes"].as_u64().unwrap() > 0);
    assert_eq!(
        installed_version(&manager.get("/v1/devices/gw-2").await, "api"),
        None
    );
    let deployment = manager.get(&format!("/v1/deployments/{}", d1["id"])).await;
    assert_eq!(
        deployment["devices"][0]["status"], "installed",
        "{deployment}"
    );

    // By tag: both get v2.
    manager
        .post(
            "/v1/deployments",
            json!({ "service": "api", "version": "2.0.0", "tag": "lab" }),
        )
        .await;
    for id in ["gw-1", "gw-2"] {
        manager
            .wait_device(id, "v2", |d| {
                installed_version(d, "api").as_deref() == Some("2.0.0")
            })
            .await;
    }
    let events = manager.get("/v1/events?device=gw-2").await;
    assert!(
        events
            .as_array()
            .unwrap()
            .iter()
            .any(|e| e["message"]["step"] == "commit"),
        "no commit event: {events}"
    );

    // The manager restarts: devices, releases and deployments are still
    // there, devices reconnect, and a new deployment reaches them.
    manager.stop().await;
    let manager = Manager::start(&data, mqtt, http).await;
    assert_eq!(
        manager.get("/v1/devices").await.as_array().unwrap().len(),
        2
    );
    assert_eq!(
        manager.get("/v1/releases").await.as_array().unwrap().len(),
        2
    );
    assert_eq!(
        manager
            .get("/v1/deployments")
            .await
            .as_array()
            .unwrap()
            .len(),
        2
    );
    let v3 = release(fleet.dir.path(), &fleet.key, "3.0.0", 3, &out);
    manager.publish(&v3).await;
    manager
        .post(
            "/v1/deployments",
            json!({ "service": "api", "version": "3.0.0", "all": true }),
        )
        .await;
    for id in ["gw-1", "gw-2"] {
        manager
            .wait_device(id, "v3 after the restart", |d| {
                installed_version(d, "api").as_deref() == Some("3.0.0")
            })
            .await;
    }
    a1.stop().await;
    a2.stop().await;
    manager.stop().await;
}

/// Connects with these credentials; returns the broker's answer.
async fn connect(
    mqtt: SocketAddr,
    client_id: &str,
    user: &str,
    password: &str,
) -> (AsyncClient, rumqttc::EventLoop, Result<(), String>) {
    let mut options = MqttOptions::new(client_id, "127.0.0.1", mqtt.port());
    options.set_credentials(user, password);
    let (client, mut eventloop) = AsyncClient::new(options, 16);
    let answer = match tokio::time::timeout(Duration::from_secs(5), eventloop.poll()).await {
        Ok(Ok(Event::Incoming(Packet::ConnAck(ack)))) if ack.code == ConnectReturnCode::Success => {
            Ok(())
        }
        Ok(Ok(other)) => Err(format!("{other:?}")),
        Ok(Err(e)) => Err(e.to_string()),
        Err(_) => Err("no answer".into()),
    };
    (client, eventloop, answer)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_broker_refuses_strangers_and_keeps_devices_to_their_own_topics() {
    // The password path (plain MQTT); over TLS with certificates the same
    // refusals are in `device_identity.rs` and `hostile_device.rs`.
    let fleet = Fleet::new();
    let (mqtt, http) = (addr(free_port()), addr(free_port()));
    let manager = Manager::start_plaintext(&fleet.dir.path().join("manager"), mqtt, http).await;
    let pw1 = manager.add_device("gw-1", &[]).await;
    let _pw2 = manager.add_device("gw-2", &[]).await;

    let (_, _, wrong) = connect(mqtt, "gw-1", "gw-1", "not-the-password").await;
    assert!(wrong.is_err(), "wrong password accepted");
    let (_, _, unknown) = connect(mqtt, "gw-9", "gw-9", &pw1).await;
    assert!(unknown.is_err(), "unknown device accepted");
    let (_, _, hijack) = connect(mqtt, "gw-2", "gw-1", &pw1).await;
    assert!(hijack.is_err(), "gw-1 took gw-2's client id");

    let (client, mut eventloop, ok) = connect(mqtt, "gw-1", "gw-1", &pw1).await;
    assert_eq!(ok, Ok(()));
    // Another device's desired topic: the subscription is refused.
    client
        .subscribe("ferry/v1/devices/gw-2/desired", QoS::AtLeastOnce)
        .await
        .unwrap();
    client
        .subscribe("ferry/v1/devices/gw-1/desired", QoS::AtLeastOnce)
        .await
        .unwrap();
    // Another device's reported topic: the publish is refused.
    let forged =
        json!({"schema": 1, "time": "2026-01-01T00:00:00Z", "agent_version": "x", "services": []});
    client
        .publish(
            "ferry/v1/devices/gw-2/reported",
            QoS::AtLeastOnce,
            true,
            forged.to_string(),
        )
        .await
        .unwrap();
    client
        .publish(
            "ferry/v1/devices/gw-1/reported",
            QoS::AtLeastOnce,
            true,
            forged.to_string(),
        )
        .await
        .unwrap();
    let mut acks = Vec::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while acks.len() < 2 && tokio::time::Instant::now() < deadline {
        if let Ok(Ok(Event::Incoming(Packet::SubAck(ack)))) =
            tokio::time::timeout(Duration::from_millis(200), eventloop.poll()).await
        {
            acks.push(ack.return_codes[0]);
        }
    }
    assert_eq!(acks.len(), 2, "{acks:?}");
    assert!(
        matches!(acks[0], rumqttc::SubscribeReasonCode::Failure),
        "{acks:?}"
    );
    assert!(
        matches!(acks[1], rumqttc::SubscribeReasonCode::Success(_)),
        "{acks:?}"
    );
    // Keep the connection served until the manager has seen gw-1's report.
    let poll = tokio::spawn(async move { while eventloop.poll().await.is_ok() {} });
    manager
        .wait_device("gw-1", "its own report", |d| {
            d["reported"]["agent_version"] == "x"
        })
        .await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let gw2 = manager.get("/v1/devices/gw-2").await;
    assert!(gw2["reported"].is_null(), "gw-1 wrote gw-2's report: {gw2}");
    poll.abort();
    manager.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn uploads_are_checked_and_assigned_downloads_resume_with_range() {
    // Devices' basic auth, the password path (certificates: `device_identity.rs`).
    let fleet = Fleet::new();
    let (mqtt, http) = (addr(free_port()), addr(free_port()));
    let manager = Manager::start_plaintext(&fleet.dir.path().join("manager"), mqtt, http).await;
    let password = manager.add_device("gw-1", &[]).await;
    let out = fleet.dir.path().join("service.out");
    let v1 = release(fleet.dir.path(), &fleet.key, "1.0.0", 1, &out);
    let bytes = std::fs::read(&v1.artifact).unwrap();
    let sha = v1.manifest.artifact.sha256;

    // Bytes that do not hash to the named sha256 are refused and not kept.
    let mut wrong = bytes.clone();
    wrong[10] ^= 1;
    let put = manager
        .request(reqwest::Method::PUT, &format!("/v1/artifacts/{sha}"))
        .body(wrong)
        .send()
        .await
        .unwrap();
    assert_eq!(put.status(), 422);
    let body: serde_json::Value = put.json().await.unwrap();
    assert!(
        body["error"]
            .as_str()
            .unwrap()
            .contains("nothing was stored"),
        "{body}"
    );
    // The envelope is refused while its artifact is missing.
    let post = manager
        .request(reqwest::Method::POST, "/v1/releases")
        .body(v1.envelope.to_json())
        .send()
        .await
        .unwrap();
    assert_eq!(post.status(), 409);
    assert!(
        manager
            .get("/v1/releases")
            .await
            .as_array()
            .unwrap()
            .is_empty()
    );

    manager.publish(&v1).await;

    // A device downloads with its credentials; Range returns exactly the rest.
    let client = reqwest::Client::new();
    let url = manager.url(&format!("/v1/artifacts/{sha}"));
    let anonymous = client.get(&url).send().await.unwrap();
    assert_eq!(anonymous.status(), 401);
    let wrong_password = client
        .get(&url)
        .basic_auth("gw-1", Some("nope"))
        .send()
        .await
        .unwrap();
    assert_eq!(wrong_password.status(), 401);
    // A device gets only an artifact its desired state names.
    let unassigned = client
        .get(&url)
        .basic_auth("gw-1", Some(&password))
        .send()
        .await
        .unwrap();
    assert_eq!(unassigned.status(), 403);
    let body: serde_json::Value = unassigned.json().await.unwrap();
    assert!(
        body["error"]
            .as_str()
            .unwrap()
            .contains("not in gw-1's desired state"),
        "{body}"
    );
    manager
        .post(
            "/v1/deployments",
            json!({ "service": "api", "version": "1.0.0", "devices": ["gw-1"] }),
        )
        .await;
    let whole = client
        .get(&url)
        .basic_auth("gw-1", Some(&password))
        .send()
        .await
        .unwrap();
    assert_eq!(whole.status(), 200);
    assert_eq!(whole.content_length(), Some(bytes.len() as u64));
    assert_eq!(whole.bytes().await.unwrap().to_vec(), bytes);
    let from = bytes.len() / 3;
    let rest = client
        .get(&url)
        .basic_auth("gw-1", Some(&password))
        .header("Range", format!("bytes={from}-"))
        .send()
        .await
        .unwrap();
    assert_eq!(rest.status(), 206);
    assert_eq!(rest.content_length(), Some((bytes.len() - from) as u64));
    assert_eq!(rest.bytes().await.unwrap().to_vec(), bytes[from..].to_vec());
    manager.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mosquitto_as_the_external_broker() {
    let fleet = Fleet::new();
    let http = addr(free_port());
    let data = fleet.dir.path().join("manager");
    // The ACL the README documents for mosquitto.
    let acl = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../manager/mosquitto.acl"
    ))
    .unwrap();

    // Devices are registered with the manager first; their credentials then
    // go into mosquitto's password file.
    let unused = addr(free_port());
    let provisioning =
        Manager::start_with(&data, unused, http, Some("mqtt://127.0.0.1:1".into())).await;
    let pw1 = provisioning.add_device("gw-1", &[]).await;
    let pw2 = provisioning.add_device("gw-2", &[]).await;
    provisioning.stop().await;
    let broker = ferry_e2e::Mosquitto::start(
        fleet.dir.path(),
        &[
            ("ferry-manager", "manager-secret"),
            ("gw-1", &pw1),
            ("gw-2", &pw2),
        ],
        &acl,
    );
    let mqtt = addr(broker.port);
    let manager = Manager::start_with(
        &data,
        unused,
        http,
        Some(format!(
            "mqtt://ferry-manager:manager-secret@127.0.0.1:{}",
            broker.port
        )),
    )
    .await;
    let a1 = Agent::start(fleet.dir.path(), "gw-1", &pw1, (mqtt, http), &fleet.trust);
    let a2 = Agent::start(fleet.dir.path(), "gw-2", &pw2, (mqtt, http), &fleet.trust);
    let out = fleet.dir.path().join("service.out");
    let v1 = release(fleet.dir.path(), &fleet.key, "1.0.0", 1, &out);
    manager.publish(&v1).await;
    manager
        .post(
            "/v1/deployments",
            json!({ "service": "api", "version": "1.0.0", "all": true }),
        )
        .await;
    for id in ["gw-1", "gw-2"] {
        let device = manager
            .wait_device(id, "v1 through mosquitto", |d| {
                installed_version(d, "api").as_deref() == Some("1.0.0")
            })
            .await;
        assert_eq!(device["online"], true);
    }

    // mosquitto's ACL keeps a device out of another's topics too: gw-1's
    // forged report for gw-2 never reaches the manager.
    let (client, mut eventloop, ok) = connect(mqtt, "gw-1", "gw-1", &pw1).await;
    assert_eq!(ok, Ok(()));
    let forged = json!({"schema": 1, "time": "2026-01-01T00:00:00Z", "agent_version": "forged", "services": []});
    client
        .publish(
            "ferry/v1/devices/gw-2/reported",
            QoS::AtLeastOnce,
            false,
            forged.to_string(),
        )
        .await
        .unwrap();
    let poll = tokio::spawn(async move { while eventloop.poll().await.is_ok() {} });
    tokio::time::sleep(Duration::from_millis(800)).await;
    let gw2 = manager.get("/v1/devices/gw-2").await;
    assert_ne!(gw2["reported"]["agent_version"], "forged", "{gw2}");
    poll.abort();
    a1.stop().await;
    a2.stop().await;
    manager.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_device_that_drops_off_is_marked_offline_by_its_last_will() {
    let fleet = Fleet::new();
    let (mqtt, http) = (addr(free_port()), addr(free_port()));
    let manager = Manager::start(&fleet.dir.path().join("manager"), mqtt, http).await;
    let password = manager.add_device("gw-1", &[]).await;
    let agent = Agent::start(
        fleet.dir.path(),
        "gw-1",
        &password,
        manager.endpoints(),
        &fleet.trust,
    );
    manager
        .wait_device("gw-1", "online", |d| d["online"] == true)
        .await;
    // The agent vanishes without a goodbye: its connection just drops.
    drop(agent);
    manager
        .wait_device("gw-1", "offline", |d| d["online"] == false)
        .await;
    manager.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_device_that_falls_silent_is_marked_offline() {
    let fleet = Fleet::new();
    let (mqtt, http) = (addr(free_port()), addr(free_port()));
    let manager = Manager::start_configured(ferry::serve::ServeConfig {
        offline_after: Duration::from_secs(3),
        ..ferry_e2e::plaintext_config(&fleet.dir.path().join("manager"), mqtt, http, None)
    })
    .await;
    let password = manager.add_device("gw-1", &[]).await;
    // A device says it is online, then stays connected but says nothing more.
    let (client, mut eventloop, ok) = connect(mqtt, "gw-1", "gw-1", &password).await;
    assert_eq!(ok, Ok(()));
    client
        .publish(
            "ferry/v1/devices/gw-1/status",
            QoS::AtLeastOnce,
            true,
            r#"{"schema":1,"state":"online"}"#,
        )
        .await
        .unwrap();
    let poll = tokio::spawn(async move { while eventloop.poll().await.is_ok() {} });
    manager
        .wait_device("gw-1", "online", |d| d["online"] == true)
        .await;
    manager
        .wait_device("gw-1", "offline after silence", |d| d["online"] == false)
        .await;
    poll.abort();
    manager.stop().await;
}

/// `ferry` as an operator runs it against this manager; (exit code, stdout,
/// stderr).
fn ferry(manager: &Manager, home: &std::path::Path, args: &[&str]) -> (i32, String, String) {
    let out = std::process::Command::new(ferry_e2e::ferry_binary())
        .args(args)
        .env("HOME", home)
        .env_remove("XDG_CONFIG_HOME")
        .env("FERRY_URL", manager.url(""))
        .env("FERRY_TOKEN", &manager.token)
        .env("FERRY_CA", manager.data_dir.join("ca.pem"))
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_deployment_finishes_and_deploy_wait_says_how() {
    let fleet = Fleet::new();
    let root = fleet.dir.path();
    let (mqtt, http) = (addr(free_port()), addr(free_port()));
    let manager = Manager::start(&root.join("manager"), mqtt, http).await;
    let mut agents = Vec::new();
    for id in ["gw-1", "gw-2"] {
        let password = manager.add_device(id, &["lab"]).await;
        agents.push(Agent::start(
            root,
            id,
            &password,
            manager.endpoints(),
            &fleet.trust,
        ));
    }
    let out = root.join("service.out");
    let wait = |version: &'static str, selector: &'static [&'static str]| {
        let (manager, root) = (&manager, root);
        async move {
            let mut args = vec!["deploy", "api", version];
            args.extend_from_slice(selector);
            args.extend_from_slice(&["--wait", "--timeout", "60s"]);
            tokio::task::block_in_place(|| ferry(manager, root, &args))
        }
    };

    // Every device commits: exit 0.
    manager
        .publish(&release(root, &fleet.key, "1.0.0", 1, &out))
        .await;
    let (code, text, err) = wait("1.0.0", &["--tag", "lab"]).await;
    assert_eq!(code, 0, "{text}{err}");
    assert!(text.contains("2 of 2 device(s) installed"), "{text}");

    // A release that crashes: rolled back on both, exit 1, each with why.
    let crash = ferry_e2e::crashing_release(root, &fleet.key, "2.0.0", 2, &out);
    manager.publish(&crash).await;
    let (code, text, err) = wait("2.0.0", &["--all"]).await;
    assert_eq!(code, 1, "{text}{err}");
    assert!(err.contains("0 of 2 device(s) installed"), "{err}");
    assert!(err.contains("rolled_back: health gate:"), "{err}");
    assert!(err.contains("exited with status 1"), "{err}");

    // The same release again: no device would try it. Refused at once,
    // with the reason, instead of waiting forever.
    let (code, _, err) = wait("2.0.0", &["--all"]).await;
    assert_eq!(code, 1);
    assert!(
        err.contains("no device would install it")
            && err.contains("it rolled api 2.0.0 back before"),
        "{err}"
    );
    // A device that never had it takes it: the others end at once, as
    // rejected, and the wait says so.
    let password = manager.add_device("gw-3", &["lab"]).await;
    agents.push(Agent::start(
        root,
        "gw-3",
        &password,
        manager.endpoints(),
        &fleet.trust,
    ));
    let (code, _, err) = wait("2.0.0", &["--all"]).await;
    assert_eq!(code, 1, "{err}");
    assert!(
        err.contains("gw-1") && err.contains("rejected: it rolled api 2.0.0 back before"),
        "{err}"
    );
    assert!(err.contains("gw-3") && err.contains("rolled_back"), "{err}");

    // A lower sequence than the devices run: refused up front too.
    manager
        .publish(&release(root, &fleet.key, "3.0.0", 3, &out))
        .await;
    let (code, text, err) = wait("3.0.0", &["--all"]).await;
    assert_eq!(code, 0, "{text}{err}");
    let (code, _, err) = wait("1.0.0", &["--device", "gw-1"]).await;
    assert_eq!(code, 1);
    assert!(err.contains("devices refuse a lower sequence"), "{err}");

    // What a device already runs: it answers at once, and the wait ends 0.
    let (code, text, err) = wait("3.0.0", &["--device", "gw-2"]).await;
    assert_eq!(code, 0, "{text}{err}");
    assert!(text.contains("installed: already installed"), "{text}");

    // `ferry deployment N` tells one, `ferry deployments` all.
    let (code, text, _) = tokio::task::block_in_place(|| ferry(&manager, root, &["deployments"]));
    assert_eq!(code, 0);
    assert!(text.lines().count() >= 5, "{text}");
    let (code, text, _) =
        tokio::task::block_in_place(|| ferry(&manager, root, &["deployment", "2"]));
    assert_eq!(code, 0);
    assert!(
        text.starts_with("deployment 2 of api 2.0.0: 0 of 2"),
        "{text}"
    );

    for agent in agents {
        agent.stop().await;
    }
    manager.stop().await;
}
