//! What someone holding one device's credentials can do to others over the
//! broker, against the embedded broker (over TLS, with the device's
//! certificate) and mosquitto with the ACL the README documents (with its
//! password): each attack is tried for real and must change nothing that
//! belongs to another device.

use std::time::Duration;

use ferry_e2e::{BrokerKind, Manager, Site};
use rumqttc::{AsyncClient, ConnectReturnCode, Event, LastWill, MqttOptions, Packet, QoS};
use serde_json::json;

/// Connects as `user` with `will`; true when the broker accepts. The
/// connection is then cut without a DISCONNECT, which is what makes a
/// broker publish the will.
async fn connect_and_vanish(mut options: MqttOptions, will: LastWill) -> bool {
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

/// The retained message on `topic`, read by a client with `options` (who
/// may read it), if any arrives within a second.
async fn retained(mut options: MqttOptions, topic: &str) -> Option<Vec<u8>> {
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
async fn wills_on_another_device(site: &Site) -> usize {
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
        if connect_and_vanish(site.device_options("gw-1").await, will).await {
            accepted += 1;
        }
    }
    // Wills fire at once when a connection drops: give them a moment, then
    // look at everything gw-2 owns.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let gw2 = site.manager.get("/v1/devices/gw-2").await;
    assert_ne!(gw2["reported"]["agent_version"], "forged", "{gw2}");
    assert_ne!(gw2["online"], true, "gw-1 made gw-2 look online: {gw2}");
    let desired = retained(
        site.device_options("gw-2").await,
        &format!("{victim}/desired"),
    )
    .await;
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

    // On another device's topics: refused at CONNECT, every kind.
    let accepted = wills_on_another_device(&site).await;
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
            !connect_and_vanish(site.device_options("gw-1").await, will).await,
            "will on {topic} accepted"
        );
    }

    own_will_fires(&site).await;
}

/// The agent's own will is accepted, and fires: gw-1 goes online, then its
/// connection drops and the will marks it offline. (So a will that did
/// not change another device's state was not merely slow.)
async fn own_will_fires(site: &Site) {
    let manager = &site.manager;
    let status = "ferry/v1/devices/gw-1/status";
    let mut options = site.device_options("gw-1").await;
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
    // mosquitto 2.0 accepts the CONNECT, and checks the will against the
    // write ACL when it would publish it: a denied will is dropped, so
    // nothing of gw-2's changes.
    wills_on_another_device(&site).await;
    own_will_fires(&site).await;
}

/// A device's session: its event loop runs on a task, and the handle tells
/// when the broker ended the connection.
struct Session {
    client: AsyncClient,
    ended: tokio::sync::oneshot::Receiver<String>,
    task: tokio::task::JoinHandle<()>,
}

impl Session {
    async fn open(mut options: MqttOptions) -> Self {
        let device = options.client_id();
        options.set_keep_alive(Duration::from_secs(60));
        options.set_max_packet_size(1 << 20, 1 << 20);
        let (client, mut events) = AsyncClient::new(options, 1024);
        let (up_tx, up) = tokio::sync::oneshot::channel();
        let (ended_tx, ended) = tokio::sync::oneshot::channel();
        let task = tokio::spawn(async move {
            let mut up_tx = Some(up_tx);
            loop {
                match events.poll().await {
                    Ok(Event::Incoming(Packet::ConnAck(ack))) => {
                        if let Some(tx) = up_tx.take() {
                            let _ = tx.send(ack.code == ConnectReturnCode::Success);
                        }
                    }
                    Ok(_) => {}
                    Err(e) => {
                        let _ = ended_tx.send(e.to_string());
                        return;
                    }
                }
            }
        });
        let accepted = tokio::time::timeout(Duration::from_secs(5), up).await;
        assert!(
            matches!(accepted, Ok(Ok(true))),
            "{device} could not connect"
        );
        Self {
            client,
            ended,
            task,
        }
    }

    /// Waits (5 s at most) for the broker to end the session.
    async fn ended_by_the_broker(self) -> bool {
        let ended = tokio::time::timeout(Duration::from_secs(5), self.ended).await;
        self.task.abort();
        matches!(ended, Ok(Ok(_)))
    }
}

/// Whether the broker accepts `device` with this password now.
async fn accepted(port: u16, device: &str, password: &str) -> bool {
    let will = LastWill::new(
        format!("ferry/v1/devices/{device}/status"),
        OFFLINE,
        QoS::AtLeastOnce,
        true,
    );
    connect_and_vanish(password_options(port, device, password), will).await
}

/// A client signing in as `device` with a password (plain MQTT).
fn password_options(port: u16, device: &str, password: &str) -> MqttOptions {
    let mut options = MqttOptions::new(device, "127.0.0.1", port);
    options.set_credentials(device, password);
    options
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_device_given_a_new_password_or_removed_is_cut_off_at_once() {
    // The password path (plain MQTT); certificates: `device_identity.rs`.
    let dir = tempfile::tempdir().unwrap();
    let site = Site::start_configured(dir.path(), BrokerKind::Embedded, &["gw-1", "gw-2"], |c| {
        c.tls = false;
    })
    .await;
    let port = site.mqtt.port();
    let (old1, old2) = (site.password("gw-1"), site.password("gw-2"));

    // gw-1's password leaked: the operator adds gw-1 again. The session
    // holding the old password ends now, and the old password is refused.
    let leaked = Session::open(password_options(port, "gw-1", old1)).await;
    let new1 = site.manager.add_device("gw-1", &[]).await;
    assert!(
        leaked.ended_by_the_broker().await,
        "the old password's session is still connected"
    );
    assert!(
        !accepted(port, "gw-1", old1).await,
        "the old password works"
    );
    assert!(accepted(port, "gw-1", &new1).await, "the new one does not");

    // gw-2 is removed: its session ends, and neither the broker nor the
    // artifact store takes its credentials.
    let gone = Session::open(password_options(port, "gw-2", old2)).await;
    let status = |method: reqwest::Method| async {
        let response = site.manager.request(method, "/v1/devices/gw-2").send();
        response.await.unwrap().status()
    };
    assert_eq!(status(reqwest::Method::DELETE).await, 200);
    assert!(gone.ended_by_the_broker().await, "gw-2 is still connected");
    assert!(!accepted(port, "gw-2", old2).await);
    assert_eq!(status(reqwest::Method::GET).await, 404);
    let download = reqwest::Client::new()
        .get(
            site.manager
                .url(&format!("/v1/artifacts/{}", "ab".repeat(32))),
        )
        .basic_auth("gw-2", Some(old2))
        .send()
        .await
        .unwrap();
    assert_eq!(download.status(), 401);
    assert_eq!(status(reqwest::Method::DELETE).await, 404);
}
/// gw-1 floods the manager with messages and gw-3 with bytes, from their
/// own topics; the manager keeps each to its budget, counts and reports the
/// excess, and gw-2 is heard as before.
async fn a_flood_is_cut_to_the_budget(kind: BrokerKind) {
    let dir = tempfile::tempdir().unwrap();
    let site = Site::start_configured(dir.path(), kind, &["gw-1", "gw-2", "gw-3"], |config| {
        config.device_limits = ferry::serve::limits::DeviceLimits {
            messages_per_sec: 5.0,
            message_burst: 100.0,
            bytes_per_sec: 64.0 * 1024.0,
            byte_burst: 256.0 * 1024.0,
        };
    })
    .await;
    let manager = &site.manager;
    let publish_all = |session: &Session, topic: &str, payload: Vec<u8>, times: usize| {
        let (client, topic) = (session.client.clone(), topic.to_owned());
        async move {
            for _ in 0..times {
                client
                    .publish(&topic, QoS::AtLeastOnce, false, payload.clone())
                    .await
                    .unwrap();
            }
        }
    };
    let health = ferry_e2e::health_payload();
    let messages = Session::open(site.device_options("gw-1").await).await;
    publish_all(
        &messages,
        "ferry/v1/devices/gw-1/health",
        health.clone(),
        600,
    )
    .await;
    // 60 KiB events: few messages, many bytes.
    let big = json!({
        "schema": 1, "time": "2026-01-01T00:00:00Z", "step": "download",
        "status": "failed", "reason": "x".repeat(60 * 1024),
    })
    .to_string()
    .into_bytes();
    let bytes = Session::open(site.device_options("gw-3").await).await;
    publish_all(&bytes, "ferry/v1/devices/gw-3/events", big, 40).await;

    // The manager tells the operator, on each device, in its own event.
    for device in ["gw-1", "gw-3"] {
        let events = loop_until(manager, &format!("/v1/events?device={device}"), |rows| {
            rows.iter().any(|r| r["message"]["step"] == "throttle")
        })
        .await;
        let notice = events
            .iter()
            .find(|r| r["message"]["step"] == "throttle")
            .unwrap();
        assert_eq!(notice["message"]["source"], "manager");
        let reason = notice["message"]["reason"].as_str().unwrap();
        assert!(reason.contains("over its budget"), "{reason}");
    }
    // Let the floods settle, then count what got through.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let throttled = manager
        .metric("ferry_device_messages_throttled_total")
        .await;
    let count = |rows: serde_json::Value, step: Option<&str>| {
        rows.as_array()
            .unwrap()
            .iter()
            .filter(|r| step.is_none_or(|s| r["message"]["step"] == s))
            .count()
    };
    let health_recorded = count(manager.get("/v1/health?device=gw-1&limit=1000").await, None);
    let big_recorded = count(
        manager.get("/v1/events?device=gw-3&limit=1000").await,
        Some("download"),
    );
    println!(
        "{kind:?}: 600 health reports and 40 60-KiB events sent; {health_recorded} and {big_recorded} recorded, {throttled} throttled"
    );
    assert!(
        (100..150).contains(&health_recorded),
        "{health_recorded} of 600 recorded against a burst of 100"
    );
    assert!(
        (1..10).contains(&big_recorded),
        "{big_recorded} of 40 large events recorded against 256 KiB"
    );
    assert!(throttled >= 480.0, "only {throttled} throttled");
    // gw-2 is heard as before.
    let other = Session::open(site.device_options("gw-2").await).await;
    publish_all(&other, "ferry/v1/devices/gw-2/health", health, 1).await;
    loop_until(manager, "/v1/health?device=gw-2", |rows| !rows.is_empty()).await;
    let _ = (messages, bytes, other);
}

/// Asks `path` until `done` holds for its rows (20 s at most).
async fn loop_until(
    manager: &Manager,
    path: &str,
    done: impl Fn(&[serde_json::Value]) -> bool,
) -> Vec<serde_json::Value> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        let rows = manager.get(path).await;
        let rows = rows.as_array().cloned().unwrap_or_default();
        if done(&rows) {
            return rows;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{path} never got there: {rows:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flooding_device_is_held_to_its_budget_on_the_embedded_broker() {
    a_flood_is_cut_to_the_budget(BrokerKind::Embedded).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flooding_device_is_held_to_its_budget_through_mosquitto() {
    a_flood_is_cut_to_the_budget(BrokerKind::Mosquitto).await;
}
