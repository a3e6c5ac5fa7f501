//! What someone holding one device's password can do to others over the
//! broker, against the embedded broker and mosquitto with the ACL the README
//! documents: each attack is tried for real and must change nothing that
//! belongs to another device.

use std::time::Duration;

use ferry_e2e::{BrokerKind, Manager, Site};
use rumqttc::{AsyncClient, ConnectReturnCode, Event, LastWill, MqttOptions, Packet, QoS};
use serde_json::json;

/// Connects as `user` with `will`; true when the broker accepts. The
/// connection is then cut without a DISCONNECT, which is what makes a
/// broker publish the will.
async fn connect_and_vanish(port: u16, user: &str, password: &str, will: LastWill) -> bool {
    let mut options = MqttOptions::new(user, "127.0.0.1", port);
    options.set_credentials(user, password);
    options.set_last_will(will);
    let (_client, mut events) = AsyncClient::new(options, 8);
    let accepted = match tokio::time::timeout(Duration::from_secs(5), events.poll()).await {
        Ok(Ok(Event::Incoming(Packet::ConnAck(ack)))) => ack.code == ConnectReturnCode::Success,
        _ => false,
    };
    // Dropping the event loop closes the socket: no DISCONNECT is sent.
    drop(events);
    accepted
}

/// The retained message on `topic`, read as `user` (who may read it), if
/// any arrives within a second.
async fn retained(port: u16, user: &str, password: &str, topic: &str) -> Option<Vec<u8>> {
    let mut options = MqttOptions::new(user, "127.0.0.1", port);
    options.set_credentials(user, password);
    options.set_clean_session(true);
    let (client, mut events) = AsyncClient::new(options, 8);
    client.subscribe(topic, QoS::AtLeastOnce).await.ok()?;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(1);
    let found = loop {
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        match tokio::time::timeout(left, events.poll()).await {
            Ok(Ok(Event::Incoming(Packet::Publish(p)))) if p.topic == topic => {
                break Some(p.payload.to_vec());
            }
            Ok(Ok(_)) => {}
            _ => break None,
        }
    };
    let _ = client.disconnect().await;
    found
}

fn forged_report() -> Vec<u8> {
    json!({"schema": 1, "time": "2026-01-01T00:00:00Z", "agent_version": "forged", "services": []})
        .to_string()
        .into_bytes()
}

const FORGED_DESIRED: &[u8] = br#"{"schema":1,"releases":[],"forged":true}"#;
const ONLINE: &[u8] = br#"{"schema":1,"state":"online"}"#;
const OFFLINE: &[u8] = br#"{"schema":1,"state":"offline"}"#;

/// gw-1 tries wills on gw-2's topics; none may take effect. Returns how
/// many of those connections the broker accepted.
async fn wills_on_another_device(manager: &Manager, port: u16, pw1: &str, pw2: &str) -> usize {
    let victim = "ferry/v1/devices/gw-2";
    let mut accepted = 0;
    for (topic, payload, qos, retain) in [
        (
            format!("{victim}/reported"),
            forged_report(),
            QoS::AtLeastOnce,
            true,
        ),
        (
            format!("{victim}/reported"),
            forged_report(),
            QoS::AtMostOnce,
            false,
        ),
        (
            format!("{victim}/desired"),
            FORGED_DESIRED.to_vec(),
            QoS::AtLeastOnce,
            true,
        ),
        (
            format!("{victim}/status"),
            ONLINE.to_vec(),
            QoS::AtLeastOnce,
            true,
        ),
    ] {
        let will = LastWill::new(&topic, payload, qos, retain);
        if connect_and_vanish(port, "gw-1", pw1, will).await {
            accepted += 1;
        }
    }
    // Wills fire at once when a connection drops: give them a moment, then
    // look at everything gw-2 owns.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let gw2 = manager.get("/v1/devices/gw-2").await;
    assert_ne!(gw2["reported"]["agent_version"], "forged", "{gw2}");
    assert_ne!(gw2["online"], true, "gw-1 made gw-2 look online: {gw2}");
    let desired = retained(port, "gw-2", pw2, &format!("{victim}/desired")).await;
    assert!(
        desired.is_none_or(|d| d != FORGED_DESIRED),
        "gw-1 replaced gw-2's desired state"
    );
    accepted
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_will_is_only_ever_the_devices_own_offline_status_on_the_embedded_broker() {
    let dir = tempfile::tempdir().unwrap();
    let site = Site::start(dir.path(), BrokerKind::Embedded, &["gw-1", "gw-2"], None).await;
    let (manager, mqtt) = (&site.manager, site.mqtt);
    let (pw1, pw2) = (site.password("gw-1"), site.password("gw-2"));

    // On another device's topics: refused at CONNECT, every kind.
    let accepted = wills_on_another_device(manager, mqtt.port(), pw1, pw2).await;
    assert_eq!(accepted, 0, "a will on gw-2's topics was accepted");

    // On its own topics, anything but an offline status is refused too.
    let own = "ferry/v1/devices/gw-1";
    for (topic, payload, qos, retain) in [
        (
            format!("{own}/reported"),
            forged_report(),
            QoS::AtLeastOnce,
            true,
        ),
        (
            format!("{own}/events"),
            b"{}".to_vec(),
            QoS::AtLeastOnce,
            false,
        ),
        (
            format!("{own}/status"),
            ONLINE.to_vec(),
            QoS::AtLeastOnce,
            true,
        ),
        (
            format!("{own}/status"),
            OFFLINE.to_vec(),
            QoS::ExactlyOnce,
            true,
        ),
        (
            format!("{own}/status"),
            b"not json".to_vec(),
            QoS::AtLeastOnce,
            true,
        ),
        (
            "ferry/v1/devices/+/status".to_owned(),
            OFFLINE.to_vec(),
            QoS::AtLeastOnce,
            true,
        ),
    ] {
        let will = LastWill::new(&topic, payload, qos, retain);
        assert!(
            !connect_and_vanish(mqtt.port(), "gw-1", pw1, will).await,
            "will on {topic} accepted"
        );
    }

    own_will_fires(manager, mqtt.port(), pw1).await;
}

/// The agent's own will is accepted, and fires: gw-1 goes online, then its
/// connection drops and the will marks it offline. (So a will that did
/// not change another device's state was not merely slow.)
async fn own_will_fires(manager: &Manager, port: u16, pw1: &str) {
    let status = "ferry/v1/devices/gw-1/status";
    let mut options = MqttOptions::new("gw-1", "127.0.0.1", port);
    options.set_credentials("gw-1", pw1);
    options.set_last_will(LastWill::new(status, OFFLINE, QoS::AtLeastOnce, true));
    let (client, mut events) = AsyncClient::new(options, 8);
    client
        .publish(status, QoS::AtLeastOnce, true, ONLINE)
        .await
        .unwrap();
    let pump = tokio::spawn(async move { while events.poll().await.is_ok() {} });
    manager
        .wait_device("gw-1", "online", |d| d["online"] == true)
        .await;
    pump.abort();
    drop(client);
    manager
        .wait_device("gw-1", "offline by its will", |d| d["online"] == false)
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mosquitto_with_the_documented_acl_keeps_wills_off_other_devices_topics() {
    let dir = tempfile::tempdir().unwrap();
    let site = Site::start(dir.path(), BrokerKind::Mosquitto, &["gw-1", "gw-2"], None).await;
    let port = site.mqtt.port();
    let (pw1, pw2) = (site.password("gw-1"), site.password("gw-2"));
    // mosquitto 2.0 accepts the CONNECT, and checks the will against the
    // write ACL when it would publish it: a denied will is dropped, so
    // nothing of gw-2's changes.
    wills_on_another_device(&site.manager, port, pw1, pw2).await;
    own_will_fires(&site.manager, port, pw1).await;
}
