//! A NATS cluster as the broker: three nodes with the MQTT gateway and
//! JetStream, the manager answering their auth callout from its store.
//! Devices on different nodes get their releases; and someone holding one
//! device's password, on any node, can read and change nothing of another's
//! (subscriptions, publishes, wills, retained desired state).

use std::net::SocketAddr;
use std::time::Duration;

use ferry_e2e::{Agent, BrokerKind, Endpoints, Site, mqtt_connects, release};
use ferry_protocol::SecretKey;
use rumqttc::{AsyncClient, Event, LastWill, MqttOptions, Packet, QoS};
use serde_json::json;

/// One cluster at a time: three servers, a manager and agents each on two
/// cores already; three at once starve JetStream (its requests time out)
/// and fail for that alone.
static ONE_CLUSTER: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// `device`'s own MQTT options (its id as client id and user name, its
/// password) for the node at `node`.
fn on(site: &Site, device: &str, node: SocketAddr) -> MqttOptions {
    let mut options = MqttOptions::new(device, node.ip().to_string(), node.port());
    options.set_credentials(device, site.password(device));
    options.set_clean_session(true);
    options
}

fn nodes(site: &Site) -> Vec<SocketAddr> {
    site.nats
        .as_ref()
        .unwrap()
        .nodes
        .iter()
        .map(|n| n.mqtt)
        .collect()
}

/// Every message a client with `options` receives on `filter` within
/// `wait`, after its subscription is acknowledged (or refused).
async fn received(options: MqttOptions, filter: &str, wait: Duration) -> Vec<(String, Vec<u8>)> {
    let (client, mut events) = AsyncClient::new(options, 16);
    client.subscribe(filter, QoS::AtLeastOnce).await.unwrap();
    let mut got = Vec::new();
    let deadline = tokio::time::Instant::now() + wait;
    loop {
        match tokio::time::timeout_at(deadline, events.poll()).await {
            Ok(Ok(Event::Incoming(Packet::Publish(p)))) => {
                got.push((p.topic.clone(), p.payload.to_vec()));
            }
            Ok(Ok(_)) => {}
            Ok(Err(_)) | Err(_) => break,
        }
    }
    let _ = client.disconnect().await;
    got
}

/// Connects with `will`, then drops the socket without a DISCONNECT (which
/// is what fires a will). True when the broker accepted the connection.
async fn connect_and_vanish(mut options: MqttOptions, will: LastWill) -> bool {
    options.set_last_will(will);
    let (_client, mut events) = AsyncClient::new(options, 8);
    let accepted = loop {
        match tokio::time::timeout(Duration::from_secs(5), events.poll()).await {
            Ok(Ok(Event::Incoming(Packet::ConnAck(ack)))) => {
                break ack.code == rumqttc::ConnectReturnCode::Success;
            }
            Ok(Ok(_)) => {}
            _ => break false,
        }
    };
    drop(events);
    accepted
}

/// Connected with `options`, without pings within the test: only the
/// broker ends this connection.
async fn connected(mut options: MqttOptions) -> (AsyncClient, rumqttc::EventLoop) {
    options.set_keep_alive(Duration::from_secs(120));
    ferry_e2e::mqtt_connected(options).await
}

/// True when the broker closes the connection of `events` within `wait`.
async fn closed_within(events: &mut rumqttc::EventLoop, wait: Duration) -> bool {
    let deadline = tokio::time::Instant::now() + wait;
    loop {
        match tokio::time::timeout_at(deadline, events.poll()).await {
            Ok(Ok(_)) => {}
            Ok(Err(_)) => return true,
            Err(_) => return false,
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_callout_lets_in_devices_by_password_on_every_node_and_no_one_else() {
    let _one = ONE_CLUSTER.lock().await;
    let dir = tempfile::tempdir().unwrap();
    let site = Site::start(dir.path(), BrokerKind::Nats, &["gw-1", "gw-2"], None).await;
    let nodes = nodes(&site);
    for node in &nodes {
        assert!(mqtt_connects(on(&site, "gw-1", *node)).await);
        assert!(mqtt_connects(on(&site, "gw-2", *node)).await);
    }
    // A wrong password, an unknown device with a real password, another
    // device's client id (its session), the manager's name.
    let mut wrong = on(&site, "gw-1", nodes[0]);
    wrong.set_credentials("gw-1", "not-the-password");
    assert!(!mqtt_connects(wrong).await);
    let mut stranger = MqttOptions::new("gw-3", "127.0.0.1", nodes[1].port());
    stranger.set_credentials("gw-3", site.password("gw-1"));
    assert!(!mqtt_connects(stranger).await);
    let mut takeover = MqttOptions::new("gw-2", "127.0.0.1", nodes[2].port());
    takeover.set_credentials("gw-1", site.password("gw-1"));
    assert!(!mqtt_connects(takeover).await);
    let mut manager = MqttOptions::new("ferry-manager-x", "127.0.0.1", nodes[1].port());
    manager.set_credentials("ferry-manager", site.password("gw-1"));
    assert!(!mqtt_connects(manager).await);
    // The gateway refuses a '.' in a client id: such a device is refused
    // when added, with the reason, not left unable to connect.
    let refused = site
        .manager
        .request(reqwest::Method::POST, "/v1/devices")
        .json(&json!({ "device_id": "gw.3" }))
        .send()
        .await
        .unwrap();
    assert_eq!(refused.status(), 400);
    let reason: serde_json::Value = refused.json().await.unwrap();
    assert!(
        reason["error"].as_str().unwrap().contains("'.'"),
        "{reason}"
    );
    // Revoked while connected, on a node the manager's own connections
    // need not be on: that connection ends now, not when its admission
    // (an hour) runs out.
    let (_gw2, mut gw2_events) = connected(on(&site, "gw-2", nodes[1])).await;
    let (_gw1, mut gw1_events) = connected(on(&site, "gw-1", nodes[2])).await;
    let revoked = site
        .manager
        .request(reqwest::Method::POST, "/v1/devices/gw-1/revoke")
        .send()
        .await
        .unwrap();
    assert_eq!(revoked.status(), 200);
    assert!(
        closed_within(&mut gw1_events, Duration::from_secs(20)).await,
        "a revoked device's connection stayed open"
    );
    // Only that device's: the kicks are done when the revoke answers.
    assert!(
        !closed_within(&mut gw2_events, Duration::from_secs(2)).await,
        "revoking gw-1 ended gw-2's connection"
    );
    // Removed while connected: the same, and refused at the next
    // connection, on every node.
    site.manager
        .request(reqwest::Method::DELETE, "/v1/devices/gw-2")
        .send()
        .await
        .unwrap();
    assert!(
        closed_within(&mut gw2_events, Duration::from_secs(20)).await,
        "a removed device's connection stayed open"
    );
    for node in &nodes {
        assert!(!mqtt_connects(on(&site, "gw-2", *node)).await);
        assert!(!mqtt_connects(on(&site, "gw-1", *node)).await);
    }
    // Added again: a new password, and whoever is connected with the old
    // one is cut off at the next re-registration.
    let add = |id: &'static str| {
        site.manager
            .request(reqwest::Method::POST, "/v1/devices")
            .json(&json!({ "device_id": id, "credential": "password" }))
            .send()
    };
    let first: serde_json::Value = add("gw-2").await.unwrap().json().await.unwrap();
    let mut holder = on(&site, "gw-2", nodes[0]);
    holder.set_credentials("gw-2", first["password"].as_str().unwrap());
    let (_old, mut old_events) = connected(holder).await;
    assert_eq!(add("gw-2").await.unwrap().status(), 201);
    assert!(
        closed_within(&mut old_events, Duration::from_secs(20)).await,
        "a re-added device's old connection stayed open"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn devices_on_three_nodes_install_and_one_device_cannot_touch_another() {
    let _one = ONE_CLUSTER.lock().await;
    let dir = tempfile::tempdir().unwrap();
    let devices = ["gw-1", "gw-2", "gw-3"];
    let site = Site::start(dir.path(), BrokerKind::Nats, &devices, None).await;
    let nodes = nodes(&site);
    let key = SecretKey::from_seed(&[41; 32]);
    let trust = dir.path().join("ops.pub");
    std::fs::write(&trust, key.public_key().to_text()).unwrap();

    let cluster = site.nats.as_ref().unwrap();
    let consumers_before = cluster.mqtt_session_consumers().await;
    // One agent per node; artifacts over HTTP from the manager.
    let agents: Vec<Agent> = devices
        .iter()
        .zip(&nodes)
        .map(|(device, node)| {
            let at = Endpoints {
                mqtt: *node,
                http: Some(site.manager.http),
                ca_pem: None,
            };
            Agent::start(dir.path(), device, site.password(device), at, &trust)
        })
        .collect();
    let v1 = release(dir.path(), &key, "1.0.0", 1, &dir.path().join("out"));
    for device in devices {
        site.manager.deploy_and_wait(&v1, device).await;
    }
    // Devices read their topics at QoS 0: the cluster keeps no JetStream
    // consumer per device.
    assert_eq!(
        cluster.mqtt_session_consumers().await,
        consumers_before,
        "the devices' subscriptions cost JetStream consumers"
    );
    // gw-2's desired state is retained on the cluster: gw-2 reads it on
    // any node (the control), gw-1 on none, by name or by wildcard.
    let victim = "ferry/v1/devices/gw-2";
    let own = received(
        on(&site, "gw-2", nodes[2]),
        &format!("{victim}/desired"),
        Duration::from_secs(2),
    )
    .await;
    assert_eq!(own.len(), 1, "gw-2 does not read its own desired state");
    for node in &nodes {
        for filter in [
            format!("{victim}/desired"),
            "ferry/v1/devices/+/desired".into(),
            "#".into(),
        ] {
            let got = received(on(&site, "gw-1", *node), &filter, Duration::from_secs(1)).await;
            assert!(
                got.iter().all(|(topic, _)| !topic.contains("gw-2")),
                "gw-1 read {filter} on {node}: {got:?}"
            );
        }
    }

    // Publishes on gw-2's topics, from every node: none arrive.
    let forged = json!({"schema": 1, "time": "2026-01-01T00:00:00Z", "agent_version": "forged", "services": []}).to_string();
    for node in &nodes {
        let (client, mut events) = AsyncClient::new(on(&site, "gw-1", *node), 16);
        for kind in ["reported", "health", "events", "status", "desired"] {
            client
                .publish(
                    format!("{victim}/{kind}"),
                    QoS::AtLeastOnce,
                    true,
                    forged.clone(),
                )
                .await
                .unwrap();
        }
        // Drive the connection for a moment (the broker may close it).
        let _ = tokio::time::timeout(Duration::from_secs(1), async {
            while events.poll().await.is_ok() {}
        })
        .await;
    }
    // Wills on gw-2's topics, from every node.
    for node in &nodes {
        for (kind, retain) in [("status", true), ("reported", true), ("desired", true)] {
            let will = LastWill::new(
                format!("{victim}/{kind}"),
                forged.clone(),
                QoS::AtLeastOnce,
                retain,
            );
            connect_and_vanish(on(&site, "gw-1", *node), will).await;
        }
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    let gw2 = site.manager.get("/v1/devices/gw-2").await;
    assert_ne!(gw2["reported"]["agent_version"], "forged", "{gw2}");
    assert_eq!(gw2["online"], true, "{gw2}");
    let desired = received(
        on(&site, "gw-2", nodes[0]),
        &format!("{victim}/desired"),
        Duration::from_secs(2),
    )
    .await;
    assert_eq!(desired.len(), 1);
    assert_ne!(
        desired[0].1,
        forged.as_bytes(),
        "gw-1 replaced gw-2's desired state"
    );

    // And the fleet still takes its next release, every device on its node.
    let v2 = release(dir.path(), &key, "2.0.0", 2, &dir.path().join("out"));
    for device in devices {
        site.manager.deploy_and_wait(&v2, device).await;
    }
    for agent in agents {
        agent.stop().await;
    }
}

/// Over TLS the gateways take only certificates from the fleet CA, and the
/// callout admits a certificate only as the device it was issued to, while
/// it stands, on every node.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn over_tls_a_device_is_its_certificate_on_every_node_and_nothing_else() {
    let _one = ONE_CLUSTER.lock().await;
    let dir = tempfile::tempdir().unwrap();
    let site = Site::start(dir.path(), BrokerKind::NatsTls, &["gw-1", "gw-2"], None).await;
    let nodes = nodes(&site);
    let at = |node: SocketAddr| Endpoints {
        mqtt: node,
        ..site.manager.endpoints()
    };
    let ca = site.manager.endpoints().ca_pem.unwrap();
    let keys = |device: &str| dir.path().join(format!("keys-{device}"));
    let device = |device: &'static str, node: SocketAddr| {
        let (at, keys) = (at(node), keys(device));
        std::fs::create_dir_all(&keys).unwrap();
        let credential = site.password(device).to_owned();
        async move { at.device_options(&keys, device, &credential).await }
    };
    for node in &nodes {
        assert!(
            mqtt_connects(device("gw-1", *node).await).await,
            "gw-1 on {node}"
        );
        assert!(
            mqtt_connects(device("gw-2", *node).await).await,
            "gw-2 on {node}"
        );
    }
    // gw-2's certificate, as gw-1 (client id and user name).
    let mut impostor = MqttOptions::new("gw-1", "127.0.0.1", nodes[1].port());
    impostor.set_credentials("gw-1", "");
    impostor.set_transport(device("gw-2", nodes[1]).await.transport());
    assert!(
        !mqtt_connects(impostor).await,
        "gw-2's certificate passed as gw-1"
    );
    // gw-1's certificate, as the manager with the manager's password.
    let mut manager = MqttOptions::new("ferry-manager-x", "127.0.0.1", nodes[2].port());
    manager.set_credentials("ferry-manager", "manager-secret");
    manager.set_transport(device("gw-1", nodes[2]).await.transport());
    assert!(
        !mqtt_connects(manager).await,
        "a device certificate passed as the manager"
    );
    // TLS without a certificate, and plain text, to the TLS gateway.
    let config = ferry_agent::tls::pinned_client_config(&ca, None).unwrap();
    let mut anonymous = MqttOptions::new("gw-1", "127.0.0.1", nodes[0].port());
    anonymous.set_transport(rumqttc::Transport::tls_with_config(
        rumqttc::TlsConfiguration::Rustls(std::sync::Arc::new(config)),
    ));
    assert!(!mqtt_connects(anonymous).await, "no certificate, yet in");
    let mut plain = MqttOptions::new("gw-1", "127.0.0.1", nodes[0].port());
    plain.set_credentials("gw-1", "");
    assert!(!mqtt_connects(plain).await, "plain text, yet in");
    // Revoked: the certificate it holds is refused at once, on every node.
    let held = device("gw-1", nodes[0]).await.transport();
    site.manager
        .post("/v1/devices/gw-1/revoke", json!({}))
        .await;
    for node in &nodes {
        let mut revoked = MqttOptions::new("gw-1", "127.0.0.1", node.port());
        revoked.set_credentials("gw-1", "");
        revoked.set_transport(held.clone());
        assert!(!mqtt_connects(revoked).await, "revoked gw-1 on {node}");
    }
}
