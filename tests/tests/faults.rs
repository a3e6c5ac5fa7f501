//! Faults around the manager: `ferry serve` killed with SIGKILL in the
//! middle of deployments (its embedded broker dies with it, retained
//! messages and all), started again on the same data directory, and a
//! device that stays away through all of it and comes back to the newest
//! release without passing through the ones it missed.

use std::time::Duration;

use ferry_e2e::{Agent, Manager, ferry_binary, free_port, installed_version, padded_release};
use ferry_protocol::SecretKey;
use serde_json::{Value, json};

fn addr(port: u16) -> std::net::SocketAddr {
    format!("127.0.0.1:{port}").parse().unwrap()
}

/// Deploys `version` of `api` to every device.
async fn deploy_to_all(manager: &Manager, version: &str) -> Value {
    manager
        .post(
            "/v1/deployments",
            json!({ "service": "api", "version": version, "all": true }),
        )
        .await
}

/// A device's status in a deployment.
async fn status_in(manager: &Manager, deployment: &Value, device: &str) -> String {
    let view = manager
        .get(&format!("/v1/deployments/{}", deployment["id"]))
        .await;
    view["devices"]
        .as_array()
        .unwrap()
        .iter()
        .find(|d| d["device_id"] == device)
        .and_then(|d| d["status"].as_str())
        .unwrap_or("(absent)")
        .to_owned()
}

/// Waits until a device's status in a deployment is `want`.
async fn wait_status(manager: &Manager, deployment: &Value, device: &str, want: &str) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        let status = status_in(manager, deployment, device).await;
        if status == want {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{device} in deployment {}: {status}, not {want}",
            deployment["id"]
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_manager_killed_mid_deployment_and_a_device_away_through_it_all_converge() {
    let binary = tokio::task::spawn_blocking(ferry_binary).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let key = SecretKey::from_seed(&[9; 32]);
    let trust = dir.path().join("ops.pub");
    std::fs::write(&trust, key.public_key().to_text()).unwrap();
    let (mqtt, http) = (addr(free_port()), addr(free_port()));
    let data = dir.path().join("manager");
    let out = dir.path().join("service.out");
    let release = |version: &str, sequence: u64| {
        // A few MiB, so the kill can find a download under way.
        padded_release(dir.path(), &key, version, sequence, &out, 4 << 20)
    };

    let manager = Manager::start_process(&binary, &data, mqtt, http).await;
    let pw1 = manager.add_device("gw-1", &[]).await;
    let pw2 = manager.add_device("gw-2", &[]).await;
    let a1 = Agent::start(dir.path(), "gw-1", &pw1, manager.endpoints(), &trust);
    let a2 = Agent::start(dir.path(), "gw-2", &pw2, manager.endpoints(), &trust);
    let v1 = release("1.0.0", 1);
    manager.publish(&v1).await;
    let d1 = deploy_to_all(&manager, "1.0.0").await;
    for id in ["gw-1", "gw-2"] {
        wait_status(&manager, &d1, id, "installed").await;
    }

    // gw-2 goes away and stays away until the end.
    a2.stop().await;

    // 2.0.0 to all; the manager is killed the moment it has accepted the
    // deployment, and started again a little later.
    let v2 = release("2.0.0", 2);
    manager.publish(&v2).await;
    let d2 = deploy_to_all(&manager, "2.0.0").await;
    manager.kill();
    tokio::time::sleep(Duration::from_secs(1)).await;
    let manager = Manager::start_process(&binary, &data, mqtt, http).await;
    manager
        .wait_device("gw-1", "2.0.0 after the kill", |d| {
            installed_version(d, "api").as_deref() == Some("2.0.0")
        })
        .await;
    wait_status(&manager, &d2, "gw-1", "installed").await;
    assert_eq!(status_in(&manager, &d2, "gw-2").await, "pending");

    // 3.0.0 to all, and another kill, this time once gw-1 has begun it.
    let v3 = release("3.0.0", 3);
    manager.publish(&v3).await;
    let d3 = deploy_to_all(&manager, "3.0.0").await;
    // The newer deployment replaces the one gw-2 never got.
    assert_eq!(status_in(&manager, &d2, "gw-2").await, "superseded");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    while status_in(&manager, &d3, "gw-1").await == "pending" {
        assert!(
            tokio::time::Instant::now() < deadline,
            "gw-1 never began 3.0.0"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    manager.kill();
    tokio::time::sleep(Duration::from_secs(1)).await;
    let manager = Manager::start_process(&binary, &data, mqtt, http).await;
    wait_status(&manager, &d3, "gw-1", "installed").await;

    // gw-2 comes back: straight to 3.0.0, never a step of 2.0.0.
    let a2 = Agent::start(dir.path(), "gw-2", &pw2, manager.endpoints(), &trust);
    wait_status(&manager, &d3, "gw-2", "installed").await;
    let gw2 = manager.get("/v1/devices/gw-2").await;
    assert_eq!(installed_version(&gw2, "api").as_deref(), Some("3.0.0"));
    let events = manager.get("/v1/events?device=gw-2").await;
    let about_v2: Vec<&Value> = events
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["message"]["release"]["version"] == "2.0.0")
        .collect();
    assert!(about_v2.is_empty(), "gw-2 worked on 2.0.0: {about_v2:#?}");
    // gw-1 installed each release once: one commit per version.
    for version in ["1.0.0", "2.0.0", "3.0.0"] {
        assert_eq!(
            manager.commits("gw-1", version).await,
            1,
            "gw-1 commits of {version}"
        );
    }
    a1.stop().await;
    a2.stop().await;
    manager.stop().await;
}

/// A desired state the broker never delivered (a cluster's server failing
/// over loses one so): the device is online and says nothing of its
/// deployment, so the manager sends the state again after 30 s. A device
/// that said it is installing had its copy and is sent none.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_device_silent_in_its_deployment_is_sent_its_desired_state_again() {
    use ferry_e2e::{BrokerKind, Site, device_session};
    use ferry_protocol::messages::{
        Connectivity, Event, MESSAGE_SCHEMA, Message, ReleaseRef, Status, Step, StepStatus,
    };
    use rumqttc::{Packet, QoS};
    use std::sync::{Arc, Mutex};

    let dir = tempfile::tempdir().unwrap();
    let devices = ["quiet", "busy"];
    let site = Site::start(dir.path(), BrokerKind::Embedded, &devices, None).await;
    let key = SecretKey::from_seed(&[23; 32]);
    let release = padded_release(dir.path(), &key, "1.0.0", 1, &dir.path().join("out"), 0);
    site.manager.publish(&release).await;

    // Each device: its own session, counting the desired states it is sent.
    let mut sessions = Vec::new();
    for device in devices {
        let copies: Arc<Mutex<Vec<Vec<u8>>>> = Arc::default();
        let seen = copies.clone();
        let (client, task) = device_session(site.device_options(device).await, move |packet| {
            if let Packet::Publish(p) = packet {
                if p.topic.ends_with("/desired") {
                    seen.lock().unwrap().push(p.payload.to_vec());
                }
            }
        })
        .await;
        let online = Status {
            schema: MESSAGE_SCHEMA,
            state: Connectivity::Online,
            agent_version: Some("test".into()),
        };
        client
            .publish(
                format!("ferry/v1/devices/{device}/status"),
                QoS::AtLeastOnce,
                true,
                online.encode(),
            )
            .await
            .unwrap();
        client
            .subscribe(
                format!("ferry/v1/devices/{device}/desired"),
                QoS::AtMostOnce,
            )
            .await
            .unwrap();
        sessions.push((client, task, copies));
    }
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while site.manager.online_devices().await < devices.len() {
        assert!(tokio::time::Instant::now() < deadline, "devices not online");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let copies = |i: usize| sessions[i].2.lock().unwrap().clone();

    let deployment = deploy_to_all(&site.manager, "1.0.0").await;
    let label = format!("deploy-{}", deployment["id"]);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while copies(0).is_empty() || copies(1).is_empty() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "no desired state sent"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // "busy" starts on it.
    let started = Event {
        schema: MESSAGE_SCHEMA,
        time: ferry_protocol::Timestamp::from(std::time::SystemTime::now()),
        rollout: Some(label.clone()),
        release: Some(ReleaseRef {
            service: release.manifest.service.clone(),
            version: release.manifest.version.to_string(),
            sequence: release.manifest.sequence,
        }),
        step: Step::Verify,
        status: StepStatus::Started,
        progress: None,
        reason: None,
    };
    sessions[1]
        .0
        .publish(
            "ferry/v1/devices/busy/events",
            QoS::AtLeastOnce,
            false,
            started.encode(),
        )
        .await
        .unwrap();
    wait_status(&site.manager, &deployment, "busy", "installing").await;

    let deadline = tokio::time::Instant::now() + Duration::from_secs(90);
    while copies(0).len() < 2 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the silent device was not sent its desired state again"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let quiet = copies(0);
    assert_eq!(quiet[0], quiet[1], "the copy differs from the state sent");
    assert_eq!(
        copies(1).len(),
        1,
        "the installing device was sent it again"
    );
    assert_eq!(
        status_in(&site.manager, &deployment, "quiet").await,
        "pending"
    );
    for (_, task, _) in sessions {
        task.abort();
    }
    site.manager.stop().await;
}
