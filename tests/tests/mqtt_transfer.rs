//! Artifacts over MQTT, for devices that reach only the broker: a 20 MB
//! release installed in blocks through cut connections and a killed agent,
//! against the embedded broker and against mosquitto; a corrupted block;
//! and the manager sending an artifact only to a device told to install it,
//! only on that device's own topic.
//!
//! Cut points and the kill point are drawn from a seed printed by the test;
//! `FERRY_TRANSFER_SEED=N` replays one.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use ferry_e2e::{
    BrokerKind, Manager, ProcessAgent, Relay, Release, Site, agent_binary, free_port,
    incompressible, installed_version, large_release, release,
};
use ferry_protocol::SecretKey;
use ferry_protocol::blocks::Frame;
use ferry_protocol::messages::{BlockRequest, MESSAGE_SCHEMA, Message};
use rumqttc::{AsyncClient, Packet, QoS};
use serde_json::{Value, json};

const LARGE: usize = 20 * 1024 * 1024;

/// A manager whose artifact URLs lead nowhere (HTTP is blocked at this
/// site), a release key, and registered devices.
struct Blocked {
    dir: tempfile::TempDir,
    key: SecretKey,
    trust: PathBuf,
    site: Site,
}

impl std::ops::Deref for Blocked {
    type Target = Site;
    fn deref(&self) -> &Site {
        &self.site
    }
}

impl Blocked {
    async fn new(kind: BrokerKind, devices: &[&str]) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let key = SecretKey::from_seed(&[77; 32]);
        let trust = dir.path().join("ops.pub");
        std::fs::write(&trust, key.public_key().to_text()).unwrap();
        let unreachable = format!("http://127.0.0.1:{}", free_port());
        let site = Site::start(dir.path(), kind, devices, Some(unreachable)).await;
        Self {
            dir,
            key,
            trust,
            site,
        }
    }

    async fn deploy(&self, release: &Release, devices: &[&str]) {
        self.manager.publish(release).await;
        self.manager
            .post(
                "/v1/deployments",
                json!({
                    "service": "api",
                    "version": release.manifest.version.to_string(),
                    "devices": devices,
                }),
            )
            .await;
    }
}

/// A seeded xorshift: the test's random points, replayable.
struct Dice(u64);

impl Dice {
    fn from_env() -> Self {
        let seed = std::env::var("FERRY_TRANSFER_SEED")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| {
                std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .unwrap()
                    .subsec_nanos() as u64
                    | 1
            });
        println!("FERRY_TRANSFER_SEED={seed}");
        Self(seed)
    }

    /// A fraction in [low, high).
    fn between(&mut self, low: f64, high: f64) -> f64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        low + (high - low) * ((self.0 >> 11) as f64 / (1u64 << 53) as f64)
    }
}

fn part_len(data_dir: &Path, release: &Release) -> u64 {
    let part = data_dir
        .join("downloads")
        .join(format!("{}.part", release.manifest.artifact.sha256));
    std::fs::metadata(part).map(|m| m.len()).unwrap_or(0)
}

/// Waits until the agent holds at least `fraction` of the artifact.
async fn wait_for_part(agent: &ProcessAgent, release: &Release, fraction: f64) -> u64 {
    let size = release.manifest.artifact.size;
    let want = (size as f64 * fraction) as u64;
    let deadline = Instant::now() + Duration::from_secs(180);
    loop {
        let held = part_len(&agent.data_dir, release);
        if held >= want {
            return held;
        }
        assert!(
            Instant::now() < deadline,
            "the transfer stalled at {held} of {size} bytes:\n{}",
            agent.log_text()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Waits until the manager has sent no block bytes for a second; the total.
async fn sent_settles(manager: &Manager) -> f64 {
    let mut last = manager.metric("ferry_mqtt_block_bytes_sent_total").await;
    loop {
        tokio::time::sleep(Duration::from_millis(1000)).await;
        let now = manager.metric("ferry_mqtt_block_bytes_sent_total").await;
        if now == last {
            return now;
        }
        last = now;
    }
}

/// A 20 MB release reaches a device over MQTT alone while its connection
/// is cut three times and the agent is SIGKILLed once; the agent resumes
/// from what it holds and fetches no byte twice after the restart.
async fn install_through_cuts_and_a_kill(kind: BrokerKind, transfer: &str) {
    let site = Blocked::new(kind, &["gw-m"]).await;
    let mut dice = Dice::from_env();
    let relay = Relay::start(site.mqtt).await;
    let root = site.dir.path();
    let out = root.join("service.out");
    let big = large_release(root, &site.key, "2.0.0", 2, &out, LARGE);
    let size = big.manifest.artifact.size;
    assert!(size > LARGE as u64, "the artifact is {size} bytes");
    let binary = agent_binary();
    let extra = format!("[transfer]\n{transfer}\n");
    let start = || {
        ProcessAgent::start_with(
            &binary,
            root,
            "gw-m",
            site.password("gw-m"),
            site.broker_only(relay.addr),
            &site.trust,
            &extra,
        )
    };
    let agent = start();
    site.deploy(&big, &["gw-m"]).await;

    let mut cuts = [
        dice.between(0.05, 0.15),
        dice.between(0.15, 0.3),
        dice.between(0.3, 0.45),
    ];
    cuts.sort_by(f64::total_cmp);
    for at in cuts {
        let held = wait_for_part(&agent, &big, at).await;
        relay.cut();
        println!("connection cut with {held} of {size} bytes held");
    }
    let kill_at = dice.between(0.5, 0.7);
    wait_for_part(&agent, &big, kill_at).await;
    agent.kill();
    let held = part_len(&root.join("agent-gw-m"), &big);
    println!("agent killed with {held} of {size} bytes held");
    assert!(
        held < size,
        "the kill came after the whole artifact arrived"
    );
    // What the manager was still sending the dead agent is not counted
    // against the restarted one.
    let sent_before = sent_settles(&site.manager).await;

    let agent = start();
    let device = site
        .manager
        .wait_device("gw-m", "the 20 MB release over MQTT", |d| {
            installed_version(d, "api").as_deref() == Some("2.0.0")
        })
        .await;
    let services = device["reported"]["services"].as_array().unwrap();
    assert_eq!(
        services[0]["artifact_sha256"],
        big.manifest.artifact.sha256.to_string()
    );
    let installed = std::fs::read(root.join("agent-gw-m/services/api/current/padding")).unwrap();
    assert!(
        installed == incompressible(LARGE),
        "the installed payload differs"
    );
    let sent_after = sent_settles(&site.manager).await - sent_before;
    assert_eq!(
        sent_after as u64,
        size - held,
        "after the restart the manager sent {sent_after} bytes; the agent lacked {}",
        size - held
    );
    // The operator saw the transfer's progress.
    let events = site.manager.get("/v1/events?device=gw-m").await;
    let progress: Vec<&Value> = events
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["message"]["step"] == "download" && e["message"]["status"] == "progress")
        .collect();
    assert!(progress.len() >= 10, "few progress events: {events}");
    assert!(
        progress
            .iter()
            .any(|e| e["message"]["progress"]["total"] == size),
        "{events}"
    );
    drop(agent);
    site.site.manager.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_device_on_mqtt_alone_installs_20_mb_through_cuts_and_a_kill_embedded_broker() {
    install_through_cuts_and_a_kill(BrokerKind::Embedded, "transport = \"mqtt\"").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_device_whose_http_is_blocked_falls_back_to_mqtt_through_cuts_and_a_kill_mosquitto() {
    install_through_cuts_and_a_kill(BrokerKind::Mosquitto, "transport = \"auto\"").await;
}

/// A block with wrong bytes (the manager's stored copy damaged) ends in a
/// hash mismatch: nothing is installed, the old release runs on, and the
/// operator reads why.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_corrupted_block_ends_in_a_hash_mismatch_and_nothing_installed() {
    let site = Blocked::new(BrokerKind::Embedded, &["gw-c"]).await;
    let root = site.dir.path();
    let out = root.join("service.out");
    let v1 = release(root, &site.key, "1.0.0", 1, &out);
    let agent = ferry_e2e::Agent::start_with(
        root,
        "gw-c",
        site.password("gw-c"),
        site.broker_only(site.mqtt),
        &site.trust,
        "[transfer]\ntransport = \"mqtt\"\nblock_size = 1024\n",
    );
    site.deploy(&v1, &["gw-c"]).await;
    site.manager
        .wait_device("gw-c", "v1 over MQTT", |d| {
            installed_version(d, "api").as_deref() == Some("1.0.0")
        })
        .await;

    let v2 = ferry_e2e::padded_release(root, &site.key, "2.0.0", 2, &out, 64 * 1024);
    site.manager.publish(&v2).await;
    let stored = site
        .manager
        .data_dir
        .join("artifacts")
        .join(v2.manifest.artifact.sha256.to_string());
    let mut bytes = std::fs::read(&stored).unwrap();
    let middle = bytes.len() / 2;
    bytes[middle] ^= 0x55;
    std::fs::write(&stored, &bytes).unwrap();
    site.manager
        .post(
            "/v1/deployments",
            json!({ "service": "api", "version": "2.0.0", "devices": ["gw-c"] }),
        )
        .await;
    let device = site
        .manager
        .wait_device("gw-c", "the damaged release's failure", |d| {
            d["reported"]["last_result"]["release"]["version"] == "2.0.0"
                || d["reported"]["last_result"]["version"] == "2.0.0"
        })
        .await;
    assert_eq!(
        device["reported"]["last_result"]["outcome"], "failed",
        "{device:#}"
    );
    assert_eq!(installed_version(&device, "api").as_deref(), Some("1.0.0"));
    let events = site.manager.get("/v1/events?device=gw-c").await;
    let mismatch = events
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["message"]["step"] == "hash_check" && e["message"]["status"] == "failed");
    let reason = mismatch
        .and_then(|e| e["message"]["reason"].as_str())
        .unwrap_or_else(|| panic!("no hash check failure: {events}"));
    assert!(reason.contains("sha256"), "{reason}");
    let data = &agent.data_dir;
    let downloads: Vec<_> = std::fs::read_dir(data.join("downloads"))
        .unwrap()
        .flatten()
        .map(|e| e.file_name())
        .collect();
    assert!(downloads.is_empty(), "left behind: {downloads:?}");
    let releases: Vec<_> = std::fs::read_dir(data.join("services/api/releases"))
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    assert!(
        releases.iter().all(|r| r.starts_with("1.0.0")),
        "{releases:?}"
    );
    agent.stop().await;
    site.site.manager.stop().await;
}

/// A device's raw MQTT session, to ask for blocks by hand.
struct RawDevice {
    client: AsyncClient,
    frames: tokio::sync::mpsc::UnboundedReceiver<(String, Vec<u8>)>,
    suback: tokio::sync::mpsc::UnboundedReceiver<Vec<rumqttc::SubscribeReasonCode>>,
    task: tokio::task::JoinHandle<()>,
}

impl RawDevice {
    async fn connect(options: rumqttc::MqttOptions) -> Self {
        let (frames_tx, frames) = tokio::sync::mpsc::unbounded_channel();
        let (suback_tx, suback) = tokio::sync::mpsc::unbounded_channel();
        let (client, task) = ferry_e2e::device_session(options, move |packet| match packet {
            Packet::Publish(p) => {
                let _ = frames_tx.send((p.topic.clone(), p.payload.to_vec()));
            }
            Packet::SubAck(ack) => {
                let _ = suback_tx.send(ack.return_codes);
            }
            _ => {}
        })
        .await;
        Self {
            client,
            frames,
            suback,
            task,
        }
    }

    /// Subscribes; true if the broker granted it.
    async fn subscribe(&mut self, filter: &str) -> bool {
        self.client
            .subscribe(filter, QoS::AtMostOnce)
            .await
            .unwrap();
        let codes = tokio::time::timeout(Duration::from_secs(5), self.suback.recv())
            .await
            .expect("no SUBACK")
            .unwrap();
        codes
            .iter()
            .all(|c| !matches!(c, rumqttc::SubscribeReasonCode::Failure))
    }

    async fn ask(&self, device: &str, release: &Release, block_size: u32) {
        let request = BlockRequest {
            schema: MESSAGE_SCHEMA,
            artifact: release.manifest.artifact.sha256,
            offset: 0,
            length: release.manifest.artifact.size,
            block_size,
        };
        self.client
            .publish(
                format!("ferry/v1/devices/{device}/fetch"),
                QoS::AtLeastOnce,
                false,
                request.encode(),
            )
            .await
            .unwrap();
    }

    /// Frames received within `wait`, with their topics.
    async fn frames_for(&mut self, wait: Duration) -> Vec<(String, Vec<u8>)> {
        let deadline = tokio::time::Instant::now() + wait;
        let mut got = Vec::new();
        while let Ok(Some(frame)) = tokio::time::timeout_at(deadline, self.frames.recv()).await {
            got.push(frame);
        }
        got
    }
}

impl Drop for RawDevice {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Only a device told to install an artifact gets it, and only on its own
/// topic: another device asking is refused with a reason, and cannot
/// listen in on the blocks.
async fn artifacts_go_only_where_assigned(kind: BrokerKind) {
    let site = Blocked::new(kind, &["gw-a", "gw-b"]).await;
    let root = site.dir.path();
    let assigned = release(root, &site.key, "1.0.0", 1, &root.join("service.out"));
    site.deploy(&assigned, &["gw-b"]).await;
    let artifact = std::fs::read(&assigned.artifact).unwrap();

    let mut a = RawDevice::connect(site.device_options("gw-a").await).await;
    let mut b = RawDevice::connect(site.device_options("gw-b").await).await;
    assert!(a.subscribe("ferry/v1/devices/gw-a/blocks").await);
    assert!(b.subscribe("ferry/v1/devices/gw-b/blocks").await);
    // gw-a tries to listen in on gw-b's blocks. The embedded broker refuses
    // the subscription; mosquitto grants it and delivers nothing.
    for filter in ["ferry/v1/devices/gw-b/blocks", "ferry/v1/devices/+/blocks"] {
        let granted = a.subscribe(filter).await;
        if kind == BrokerKind::Embedded {
            assert!(!granted, "{filter} granted");
        }
    }

    // gw-a asks for gw-b's artifact: refused, with the reason.
    a.ask("gw-a", &assigned, 1024).await;
    let answer = a.frames_for(Duration::from_secs(3)).await;
    assert_eq!(answer.len(), 1, "{} frames", answer.len());
    match Frame::decode(&answer[0].1).unwrap() {
        Frame::Refused { reason, .. } => {
            assert!(reason.contains("not in gw-a's desired state"), "{reason}")
        }
        other => panic!("gw-a was sent {other:?}"),
    }
    // gw-a, naming itself gw-b, asks on gw-b's topic: the broker drops it.
    a.ask("gw-b", &assigned, 1024).await;

    // gw-b asks: it gets every byte, on its own topic; gw-a hears nothing.
    b.ask("gw-b", &assigned, 1024).await;
    let blocks = b.frames_for(Duration::from_secs(3)).await;
    let mut rebuilt = Vec::new();
    for (topic, payload) in &blocks {
        assert_eq!(topic, "ferry/v1/devices/gw-b/blocks");
        match Frame::decode(payload).unwrap() {
            Frame::Block { offset, data, .. } => {
                assert_eq!(offset, rebuilt.len() as u64);
                rebuilt.extend_from_slice(data);
            }
            other => panic!("gw-b was sent {other:?}"),
        }
    }
    assert!(rebuilt == artifact, "gw-b's blocks are not the artifact");
    let overheard = a.frames_for(Duration::from_millis(500)).await;
    assert!(
        overheard.is_empty(),
        "gw-a received {} frames",
        overheard.len()
    );
    assert_eq!(
        site.manager
            .metric("ferry_mqtt_block_requests_total{result=\"refused\"}")
            .await,
        1.0
    );
    site.site.manager.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn artifacts_go_only_to_assigned_devices_on_their_own_topic_embedded_broker() {
    artifacts_go_only_where_assigned(BrokerKind::Embedded).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn artifacts_go_only_to_assigned_devices_on_their_own_topic_mosquitto() {
    artifacts_go_only_where_assigned(BrokerKind::Mosquitto).await;
}

/// A device that asks for a whole artifact many times over and then stops
/// reading its socket: the manager publishes only what the broker can hold
/// for it unread (a bounded number of bytes), not every byte asked for, and
/// another device is served meanwhile.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_device_that_stops_reading_gets_no_more_than_a_bounded_backlog() {
    let site = Blocked::new(BrokerKind::Embedded, &["gw-slow", "gw-ok"]).await;
    let root = site.dir.path();
    let big = large_release(root, &site.key, "1.0.0", 1, &root.join("big.out"), LARGE);
    site.deploy(&big, &["gw-slow", "gw-ok"]).await;

    // The hostile device: subscribes, sends its requests, then never polls
    // its connection again, so nothing is read from its socket.
    let mut options = site.device_options("gw-slow").await;
    options.set_keep_alive(Duration::from_secs(120));
    let (client, mut eventloop) = AsyncClient::new(options, 64);
    client
        .subscribe("ferry/v1/devices/gw-slow/blocks", QoS::AtMostOnce)
        .await
        .unwrap();
    let asked = 8u64;
    let each = 13 * 1024 * 1024;
    for i in 0..asked {
        let request = BlockRequest {
            schema: MESSAGE_SCHEMA,
            artifact: big.manifest.artifact.sha256,
            offset: i * 1024 * 1024,
            length: each,
            block_size: 64 * 1024,
        };
        client
            .publish(
                "ferry/v1/devices/gw-slow/fetch",
                QoS::AtMostOnce,
                false,
                request.encode(),
            )
            .await
            .unwrap();
    }
    let mut sent = 0;
    while sent < asked {
        match tokio::time::timeout(Duration::from_secs(10), eventloop.poll()).await {
            Ok(Ok(rumqttc::Event::Outgoing(rumqttc::Outgoing::Publish(_)))) => sent += 1,
            Ok(Ok(_)) => {}
            other => panic!("gw-slow could not send its requests: {other:?}"),
        }
    }

    // Meanwhile a device that reads is served in full.
    let mut ok = RawDevice::connect(site.device_options("gw-ok").await).await;
    assert!(ok.subscribe("ferry/v1/devices/gw-ok/blocks").await);
    let small = BlockRequest {
        schema: MESSAGE_SCHEMA,
        artifact: big.manifest.artifact.sha256,
        offset: 0,
        length: 1024 * 1024,
        block_size: 64 * 1024,
    };
    ok.client
        .publish(
            "ferry/v1/devices/gw-ok/fetch",
            QoS::AtLeastOnce,
            false,
            small.encode(),
        )
        .await
        .unwrap();
    let frames = ok.frames_for(Duration::from_secs(5)).await;
    assert_eq!(
        frames.len(),
        16,
        "gw-ok got {} of its 16 blocks",
        frames.len()
    );

    // What went to gw-slow: the broker's backlog for it (2 MiB), what the
    // sockets between hold, and a block per request in flight; never the
    // 104 MiB it asked for.
    let total = sent_settles(&site.manager).await;
    let to_slow = total - 1024.0 * 1024.0;
    let requested = (asked * each) as f64;
    println!(
        "gw-slow asked for {:.0} MiB and was sent {:.1} MiB",
        requested / 1048576.0,
        to_slow / 1048576.0
    );
    assert!(
        to_slow < 24.0 * 1024.0 * 1024.0,
        "{to_slow} bytes sent to a device that reads nothing"
    );

    // gw-slow comes back as a device that reads: what its old session left
    // unread does not count against the new one, which gets its blocks.
    drop(eventloop);
    drop(client);
    tokio::time::sleep(Duration::from_millis(500)).await;
    let mut back = RawDevice::connect(site.device_options("gw-slow").await).await;
    assert!(back.subscribe("ferry/v1/devices/gw-slow/blocks").await);
    let tail = BlockRequest {
        offset: 19 * 1024 * 1024,
        ..small
    };
    back.client
        .publish(
            "ferry/v1/devices/gw-slow/fetch",
            QoS::AtLeastOnce,
            false,
            tail.encode(),
        )
        .await
        .unwrap();
    let frames = back.frames_for(Duration::from_secs(5)).await;
    let offsets: std::collections::BTreeSet<u64> = frames
        .iter()
        .filter_map(|(_, payload)| match Frame::decode(payload).ok()? {
            Frame::Block { offset, .. } => Some(offset),
            _ => None,
        })
        .filter(|offset| *offset >= tail.offset)
        .collect();
    assert_eq!(offsets.len(), 16, "the returning device got {offsets:?}");
    site.site.manager.stop().await;
}
