//! The agent as a daemon (the real binary) against a real mosquitto broker
//! and a real HTTP artifact server: desired state in, releases installed,
//! reported state, events, health and status out; a download cut halfway
//! resumes; the offline inbox.

mod support;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use base64::Engine as _;
use ferry_protocol::messages::{
    Connectivity, Desired, DesiredRelease, Event, Health, MESSAGE_SCHEMA, Message, Reported,
    ServiceState, Status, Step, StepStatus,
};
use rumqttc::{AsyncClient, MqttOptions, QoS};
use support::artifacts::ArtifactServer;
use support::broker::Mosquitto;
use support::{Build, Release, Rig, kill_services};
use tokio::sync::mpsc;

const DEVICE: &str = "dev-1";

/// The agent binary running with a config file; stopped and cleaned up on drop.
struct Agent {
    child: Child,
    data: PathBuf,
}

impl Agent {
    fn start(rig: &Rig, name: &str, broker: Option<&str>, inbox: Option<&Path>) -> Self {
        Self::start_with(rig, name, broker, inbox, "")
    }

    /// Starts the agent; `extra` is added to the top of its config.
    fn start_with(
        rig: &Rig,
        name: &str,
        broker: Option<&str>,
        inbox: Option<&Path>,
        extra: &str,
    ) -> Self {
        let data = rig.tmp.path().join(name);
        let mut text = format!(
            // (The rig's directory is private: services run as the agent.)
            "device_id = \"{DEVICE}\"\ndata_dir = \"{}\"\nsupervisor = \"direct\"\nisolate_services = false\n{extra}\n",
            data.display()
        );
        if let Some(inbox) = inbox {
            text.push_str(&format!("inbox = \"{}\"\n", inbox.display()));
        }
        text.push_str(&format!(
            "[trust]\nkeys = [\"{}\"]\n",
            rig.tmp.path().join("ops.pub").display()
        ));
        if let Some(url) = broker {
            text.push_str(&format!("[broker]\nurl = \"{url}\"\n"));
        }
        let config = rig.tmp.path().join(format!("{name}.toml"));
        std::fs::write(&config, text).unwrap();
        let child = Command::new(env!("CARGO_BIN_EXE_ferry-agent"))
            .arg("--config")
            .arg(&config)
            .stdout(Stdio::null())
            // FERRY_TEST_AGENT_LOG=1 shows the agent's log when debugging a test.
            .stderr(if std::env::var_os("FERRY_TEST_AGENT_LOG").is_some() {
                Stdio::inherit()
            } else {
                Stdio::null()
            })
            .spawn()
            .unwrap();
        Self { child, data }
    }

    fn terminate(&mut self) {
        let pid = nix::unistd::Pid::from_raw(self.child.id() as i32);
        nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM).unwrap();
        let _ = self.child.wait();
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        kill_services(&self.data);
    }
}

/// A test client that sees everything on the device's topics.
struct Watcher {
    client: AsyncClient,
    messages: mpsc::UnboundedReceiver<(String, Vec<u8>)>,
}

impl Watcher {
    async fn connect(broker: &Mosquitto) -> Self {
        let options = MqttOptions::new("test-watcher", "127.0.0.1", broker.port);
        let (client, mut eventloop) = AsyncClient::new(options, 64);
        let (tx, messages) = mpsc::unbounded_channel();
        let subscriber = client.clone();
        tokio::spawn(async move {
            loop {
                match eventloop.poll().await {
                    // (Re)subscribe on every connection: a restarted broker forgets.
                    Ok(rumqttc::Event::Incoming(rumqttc::Packet::ConnAck(_))) => {
                        let topics = format!("ferry/v1/devices/{DEVICE}/#");
                        let _ = subscriber.try_subscribe(topics, QoS::AtLeastOnce);
                    }
                    Ok(rumqttc::Event::Incoming(rumqttc::Packet::Publish(p))) => {
                        let _ = tx.send((p.topic.clone(), p.payload.to_vec()));
                    }
                    Ok(_) => {}
                    Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
                }
            }
        });
        // Wait until subscribed, so nothing the agent says is missed.
        tokio::time::sleep(Duration::from_millis(200)).await;
        Self { client, messages }
    }

    /// Waits for a message of type `M` on `kind` that passes `check`.
    async fn wait_for<M: Message>(
        &mut self,
        kind: &str,
        what: &str,
        mut check: impl FnMut(&M) -> bool,
    ) -> M {
        let topic = format!("ferry/v1/devices/{DEVICE}/{kind}");
        let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
        loop {
            let next = tokio::time::timeout_at(deadline, self.messages.recv()).await;
            let (t, payload) = next
                .unwrap_or_else(|_| panic!("timed out waiting for {what}"))
                .expect("watcher stopped");
            if t == topic {
                if let Ok(message) = M::decode(&payload) {
                    if check(&message) {
                        return message;
                    }
                }
            }
        }
    }

    async fn set_desired(&self, releases: &[(&Release, &str)]) {
        let desired = Desired {
            schema: MESSAGE_SCHEMA,
            rollout: Some("r-test".into()),
            releases: releases
                .iter()
                .map(|(r, url)| DesiredRelease {
                    envelope: r.envelope.clone(),
                    artifact_url: Some(url.to_string()),
                })
                .collect(),
            roots: Vec::new(),
        };
        self.client
            .publish(
                format!("ferry/v1/devices/{DEVICE}/desired"),
                QoS::AtLeastOnce,
                true,
                desired.encode(),
            )
            .await
            .unwrap();
    }
}

fn runs(reported: &Reported, version: &str) -> bool {
    reported
        .services
        .iter()
        .any(|s| s.release.service.as_str() == "api" && s.release.version == version)
}

#[tokio::test]
async fn desired_state_over_mqtt_is_installed_and_reported() {
    let rig = Rig::new();
    let mut broker = Mosquitto::start(rig.tmp.path(), "");
    let server = ArtifactServer::start().await;
    let mut watcher = Watcher::connect(&broker).await;
    // A long interval: health must also come at once when something changes.
    let mut agent = Agent::start_with(
        &rig,
        "daemon",
        Some(&broker.url()),
        None,
        "health_interval = \"1h\"",
    );

    watcher
        .wait_for::<Status>("status", "the agent to come online", |s| {
            s.state == Connectivity::Online
        })
        .await;

    let v1 = rig.release("1.0.0", 1, Build::SERVE, |_| {});
    let url1 = server.add(std::fs::read(&v1.artifact).unwrap());
    watcher.set_desired(&[(&v1, &url1)]).await;
    let reported = watcher
        .wait_for::<Reported>("reported", "v1 reported", |r| runs(r, "1.0.0"))
        .await;
    assert_eq!(
        reported.last_result.unwrap().rollout.as_deref(),
        Some("r-test")
    );
    // The manager's desired state is what runs: the device says since when.
    let confirmed = watcher
        .wait_for::<Reported>("reported", "v1 confirmed", |r| {
            runs(r, "1.0.0") && r.desired_confirmed_at.is_some()
        })
        .await
        .desired_confirmed_at;
    let health = watcher
        .wait_for::<Health>("health", "health with v1 running", |h| {
            h.services
                .iter()
                .any(|s| s.version.as_deref() == Some("1.0.0") && s.state == ServiceState::Active)
        })
        .await;
    let service = &health.services[0];
    assert!(
        service.pid.is_some() && service.rss_bytes.unwrap_or(0) > 0,
        "{service:?}"
    );
    assert!(health.memory.total_bytes > 0 && health.disk.total_bytes > 0);

    // The service crashes: a health report says so at once, not in an hour.
    let pid = service.pid.unwrap();
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid as i32),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    watcher
        .wait_for::<Health>("health", "health after the crash", |h| {
            h.services
                .iter()
                .any(|s| s.restarts >= 1 && s.state == ServiceState::Active)
        })
        .await;

    // The broker restarts, forgetting everything: the agent reconnects and
    // says again that it is online and what it runs.
    broker.restart();
    watcher
        .wait_for::<Status>("status", "the agent back online", |s| {
            s.state == Connectivity::Online
        })
        .await;
    let again = watcher
        .wait_for::<Reported>("reported", "v1 reported again", |r| runs(r, "1.0.0"))
        .await;
    // The restarted broker lost the desired state: nothing confirmed since.
    assert_eq!(again.desired_confirmed_at, confirmed);

    // v2's first transfer is cut halfway; the agent resumes it.
    let v2 = rig.release("2.0.0", 2, Build::SERVE, |_| {});
    let v2_bytes = std::fs::read(&v2.artifact).unwrap();
    let url2 = server.add(v2_bytes.clone());
    server.cut_next(&url2);
    watcher.set_desired(&[(&v2, &url2)]).await;
    watcher
        .wait_for::<Event>("events", "v2 to commit", |e| {
            e.step == Step::Commit && e.status == StepStatus::Succeeded
        })
        .await;
    watcher
        .wait_for::<Reported>("reported", "v2 reported", |r| runs(r, "2.0.0"))
        .await;
    let resumed: Vec<u64> = server
        .ranges()
        .iter()
        .filter_map(|r| r.strip_prefix("bytes=")?.strip_suffix('-')?.parse().ok())
        .collect();
    assert!(
        resumed
            .iter()
            .any(|&from| from > 0 && from < v2_bytes.len() as u64),
        "no resumed request: {:?}",
        server.ranges()
    );

    agent.terminate();
    watcher
        .wait_for::<Status>("status", "the agent to say offline", |s| {
            s.state == Connectivity::Offline
        })
        .await;
}

#[tokio::test]
async fn the_device_password_goes_only_to_the_manager_origin() {
    let rig = Rig::new();
    let broker = Mosquitto::start(rig.tmp.path(), "");
    // Two HTTP servers that record what they are sent: the manager (the
    // agent's configured origin) and one elsewhere, on another port of the
    // same host, that a desired state names (it is not signed).
    let manager = ArtifactServer::start().await;
    let elsewhere = ArtifactServer::start().await;
    manager.redirect_to(&elsewhere.base);
    let mut watcher = Watcher::connect(&broker).await;
    let broker_table = format!(
        "[broker]\nurl = \"{}\"\nusername = \"{DEVICE}\"\npassword = \"s3cret\"\nmanager_url = \"{}\"\n",
        broker.url(),
        manager.base
    );
    let _agent = Agent::start_with(&rig, "origin", None, None, &broker_table);
    watcher
        .wait_for::<Status>("status", "the agent online", |s| {
            s.state == Connectivity::Online
        })
        .await;
    let expected = format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD.encode(format!("{DEVICE}:s3cret"))
    );

    // Elsewhere: fetched without credentials (the artifact is checked by its
    // signed hash either way, so a mirror still works).
    let v1 = rig.release("1.0.0", 1, Build::SERVE, |_| {});
    let url1 = elsewhere.add(std::fs::read(&v1.artifact).unwrap());
    watcher.set_desired(&[(&v1, &url1)]).await;
    watcher
        .wait_for::<Reported>("reported", "v1 from elsewhere", |r| runs(r, "1.0.0"))
        .await;
    assert_eq!(elsewhere.authorizations(), [None]);

    // The manager's origin gets them.
    let v2 = rig.release("2.0.0", 2, Build::SERVE, |_| {});
    let url2 = manager.add(std::fs::read(&v2.artifact).unwrap());
    watcher.set_desired(&[(&v2, &url2)]).await;
    watcher
        .wait_for::<Reported>("reported", "v2 from the manager", |r| runs(r, "2.0.0"))
        .await;
    assert_eq!(manager.authorizations(), [Some(expected.clone())]);

    // A redirect from the manager to elsewhere: the credentials stay behind.
    let v3 = rig.release("3.0.0", 3, Build::SERVE, |_| {});
    let bytes = std::fs::read(&v3.artifact).unwrap();
    let url3 = elsewhere.add(bytes.clone());
    let moved = format!(
        "{}/moved/{}",
        manager.base,
        url3.rsplit('/').next().unwrap()
    );
    watcher.set_desired(&[(&v3, &moved)]).await;
    watcher
        .wait_for::<Reported>("reported", "v3 through a redirect", |r| runs(r, "3.0.0"))
        .await;
    assert_eq!(
        manager.authorizations(),
        [Some(expected.clone()), Some(expected)]
    );
    assert_eq!(elsewhere.authorizations(), [None, None]);
}

#[tokio::test]
async fn what_others_drop_into_the_inbox_cannot_read_or_write_beyond_it() {
    let rig = Rig::new();
    let inbox = rig.tmp.path().join("inbox");
    std::fs::create_dir_all(&inbox).unwrap();
    let agent = Agent::start(&rig, "hostile-inbox", None, Some(&inbox));
    // An envelope that is a link to an endless file, and one to a FIFO that
    // no one writes: neither is read (the agent would hang or run out of
    // memory), nor is a release whose artifact is a link.
    std::os::unix::fs::symlink("/dev/zero", inbox.join("zero.envelope.json")).unwrap();
    nix::unistd::mkfifo(
        &inbox.join("fifo.envelope.json"),
        nix::sys::stat::Mode::from_bits_truncate(0o600),
    )
    .unwrap();
    let v1 = rig.release("1.0.0", 1, Build::SERVE, |_| {});
    let elsewhere = rig.tmp.path().join("elsewhere.tar.gz");
    std::fs::copy(&v1.artifact, &elsewhere).unwrap();
    std::os::unix::fs::symlink(&elsewhere, inbox.join("linked.tar.gz")).unwrap();
    std::fs::write(inbox.join("linked.envelope.json"), v1.envelope.to_json()).unwrap();
    // A link planted where the result's temporary file will be written.
    let victim = rig.tmp.path().join("victim");
    std::fs::write(&victim, "keep me").unwrap();
    std::os::unix::fs::symlink(&victim, inbox.join("api.result.json.tmp")).unwrap();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert!(
        !inbox.join("linked.result.json").exists(),
        "a linked artifact was taken"
    );
    assert!(!agent.data.join("services").exists(), "something installed");

    // A real release still goes through, and the planted link is replaced,
    // not written through.
    std::fs::copy(&v1.artifact, inbox.join("api.tar.gz")).unwrap();
    std::fs::write(inbox.join("api.envelope.json"), v1.envelope.to_json()).unwrap();
    let result = inbox.join("api.result.json");
    support::eventually_for("the inbox result", Duration::from_secs(30), || {
        result.exists()
    })
    .await;
    let outcome: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&result).unwrap()).unwrap();
    assert_eq!(outcome["outcome"], "installed", "{outcome}");
    assert_eq!(std::fs::read_to_string(&victim).unwrap(), "keep me");
    assert!(
        std::fs::symlink_metadata(&result).unwrap().is_file(),
        "the result is a link"
    );
}

/// Installs v1 through the inbox of an agent started with `extra`, stops
/// the agent with SIGTERM, and says whether the service outlived it.
async fn service_outlives_a_stopped_agent(name: &str, extra: &str) -> bool {
    let rig = Rig::new();
    let inbox = rig.tmp.path().join("inbox");
    std::fs::create_dir_all(&inbox).unwrap();
    let mut agent = Agent::start_with(&rig, name, None, Some(&inbox), extra);
    let v1 = rig.release("1.0.0", 1, Build::SERVE, |_| {});
    std::fs::copy(&v1.artifact, inbox.join("v1.tar.gz")).unwrap();
    std::fs::write(inbox.join("v1.envelope.json"), v1.envelope.to_json()).unwrap();
    let result = inbox.join("v1.result.json");
    support::eventually_for("v1 installed", Duration::from_secs(30), || result.exists()).await;
    let pid = rig
        .records()
        .iter()
        .find(|r| r.0 == "start")
        .map(|r| r.2)
        .unwrap();
    agent.terminate();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let alive = support::pid_alive(pid);
    if alive {
        // (The agent's Drop stops what it left running.)
        kill_services(&agent.data);
    }
    alive
}

#[tokio::test]
async fn services_run_on_when_the_agent_stops_unless_it_is_told_otherwise() {
    assert!(
        service_outlives_a_stopped_agent("stays", "").await,
        "the service stopped with the agent"
    );
    assert!(
        !service_outlives_a_stopped_agent("stops", "stop_services_on_exit = true").await,
        "the service outlived the agent"
    );
}

#[tokio::test]
async fn releases_dropped_into_the_inbox_are_installed_once_complete() {
    let rig = Rig::new();
    let inbox = rig.tmp.path().join("inbox");
    std::fs::create_dir_all(&inbox).unwrap();
    let agent = Agent::start(&rig, "offline", None, Some(&inbox));
    let v1 = rig.release("1.0.0", 1, Build::SERVE, |_| {});
    let artifact = std::fs::read(&v1.artifact).unwrap();

    // A copy in progress: half the artifact, then the envelope.
    std::fs::write(
        inbox.join("api-1.0.0.tar.gz"),
        &artifact[..artifact.len() / 2],
    )
    .unwrap();
    std::fs::write(inbox.join("api-1.0.0.envelope.json"), v1.envelope.to_json()).unwrap();
    tokio::time::sleep(Duration::from_millis(700)).await;
    assert!(
        !inbox.join("api-1.0.0.result.json").exists(),
        "picked up a partial copy"
    );
    assert!(
        !agent.data.join("services").exists(),
        "installed from a partial copy"
    );

    // The copy completes.
    std::fs::write(inbox.join("api-1.0.0.tar.gz"), &artifact).unwrap();
    let result_path = inbox.join("api-1.0.0.result.json");
    support::eventually_for("the inbox result", Duration::from_secs(30), || {
        result_path.exists()
    })
    .await;
    let result: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&result_path).unwrap()).unwrap();
    assert_eq!(result["outcome"], "installed", "{result}");
    assert!(!inbox.join("api-1.0.0.tar.gz").exists());
    assert!(!inbox.join("api-1.0.0.envelope.json").exists());
    let state: serde_json::Value =
        serde_json::from_slice(&std::fs::read(agent.data.join("state.json")).unwrap()).unwrap();
    assert_eq!(state["services"]["api"]["manifest"]["version"], "1.0.0");
}

#[tokio::test]
async fn a_change_under_a_watched_path_reaches_the_service_as_sighup_without_a_restart() {
    use ferry_protocol::manifest::{ReloadAction, ReloadRule, ServiceSignal};
    let rig = Rig::new();
    let inbox = rig.tmp.path().join("inbox");
    let watched = rig.tmp.path().join("etc-api");
    std::fs::create_dir_all(&inbox).unwrap();
    std::fs::create_dir_all(&watched).unwrap();
    std::fs::write(watched.join("app.conf"), "level = 1\n").unwrap();
    let _agent = Agent::start(&rig, "reload", None, Some(&inbox));
    let conf = watched.join("app.conf");
    let v1 = rig.release("1.0.0", 1, Build::SERVE, |m| {
        m.reload = vec![ReloadRule {
            paths: vec![conf.display().to_string()],
            action: ReloadAction::Signal(ServiceSignal::Hup),
            debounce_ms: 200,
        }];
    });
    std::fs::copy(&v1.artifact, inbox.join("api.tar.gz")).unwrap();
    std::fs::write(inbox.join("api.envelope.json"), v1.envelope.to_json()).unwrap();
    let result = inbox.join("api.result.json");
    support::eventually_for("the install", Duration::from_secs(30), || result.exists()).await;
    let starts = || {
        rig.records()
            .into_iter()
            .filter(|r| r.0 == "start")
            .collect::<Vec<_>>()
    };
    assert_eq!(starts().len(), 1, "{:?}", rig.records());
    let pid = starts()[0].2;

    // The watcher is set up once the state is published; give it a moment,
    // then change the file the way a config tool does: write and rename.
    tokio::time::sleep(Duration::from_millis(500)).await;
    std::fs::write(watched.join(".app.conf.new"), "level = 2\n").unwrap();
    std::fs::rename(watched.join(".app.conf.new"), &conf).unwrap();
    support::eventually("the service to see SIGHUP", || {
        rig.records().iter().any(|r| r.0 == "hup" && r.2 == pid)
    })
    .await;
    assert_eq!(
        starts().len(),
        1,
        "restarted instead of reloaded: {:?}",
        rig.records()
    );

    // A burst of changes within the debounce window is one reload.
    for level in 3..8 {
        std::fs::write(&conf, format!("level = {level}\n")).unwrap();
    }
    support::eventually("the second reload", || {
        rig.records().iter().filter(|r| r.0 == "hup").count() >= 2
    })
    .await;
    tokio::time::sleep(Duration::from_millis(600)).await;
    assert_eq!(
        rig.records().iter().filter(|r| r.0 == "hup").count(),
        2,
        "{:?}",
        rig.records()
    );
}

#[tokio::test]
async fn new_trust_keys_apply_without_a_restart() {
    let rig = Rig::new();
    let inbox = rig.tmp.path().join("inbox");
    std::fs::create_dir_all(&inbox).unwrap();
    let _agent = Agent::start(&rig, "trust", None, Some(&inbox));
    let config = rig.tmp.path().join("trust.toml");

    // Signed by a key the device does not trust yet.
    let other = ferry_protocol::SecretKey::from_seed(&[9; 32]);
    let v1 = rig.release("1.0.0", 1, Build::SERVE, |_| {});
    let by_other = ferry_protocol::Envelope::sign(v1.manifest.to_json(), &[&other]).unwrap();
    let drop_release = |name: &str| {
        std::fs::copy(&v1.artifact, inbox.join(format!("{name}.tar.gz"))).unwrap();
        std::fs::write(
            inbox.join(format!("{name}.envelope.json")),
            by_other.to_json(),
        )
        .unwrap();
        inbox.join(format!("{name}.result.json"))
    };
    let first = drop_release("first");
    support::eventually_for("the first attempt", Duration::from_secs(30), || {
        first.exists()
    })
    .await;
    let result: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&first).unwrap()).unwrap();
    assert_eq!(result["outcome"], "rejected", "{result}");

    // The operator adds the key to the device's config; the agent picks it up.
    let other_pub = rig.tmp.path().join("other.pub");
    std::fs::write(&other_pub, other.public_key().to_text()).unwrap();
    let text = std::fs::read_to_string(&config).unwrap().replace(
        "keys = [",
        &format!("keys = [\"{}\", ", other_pub.display()),
    );
    std::fs::write(&config, text).unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let second = drop_release("second");
    support::eventually_for("the second attempt", Duration::from_secs(30), || {
        second.exists()
    })
    .await;
    let result: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&second).unwrap()).unwrap();
    assert_eq!(result["outcome"], "installed", "{result}");
}

#[tokio::test]
async fn the_last_will_marks_a_killed_agent_offline() {
    let rig = Rig::new();
    let broker = Mosquitto::start(rig.tmp.path(), "");
    let mut watcher = Watcher::connect(&broker).await;
    let mut agent = Agent::start(&rig, "will", Some(&broker.url()), None);
    watcher
        .wait_for::<Status>("status", "online", |s| s.state == Connectivity::Online)
        .await;
    // No goodbye: the broker publishes the will when the connection drops.
    agent.child.kill().unwrap();
    agent.child.wait().unwrap();
    let status = watcher
        .wait_for::<Status>("status", "the last will", |s| {
            s.state == Connectivity::Offline
        })
        .await;
    assert_eq!(status.agent_version, None);
}

#[tokio::test]
async fn the_broker_going_down_mid_download_and_losing_retained_state_does_not_stop_an_install() {
    let rig = Rig::new();
    let mut broker = Mosquitto::start(rig.tmp.path(), "");
    let server = ArtifactServer::start().await;
    let mut watcher = Watcher::connect(&broker).await;
    let _agent = Agent::start(&rig, "broker-down", Some(&broker.url()), None);
    watcher
        .wait_for::<Status>("status", "the agent to come online", |s| {
            s.state == Connectivity::Online
        })
        .await;

    // 1 MiB of noise, sent 32 KiB every 50 ms: a download of about 2 s.
    let mut random = support::Seeded(0x00B4_0CE2);
    let noise: Vec<u8> = (0..(1 << 20) / 8)
        .flat_map(|_| random.next().to_le_bytes())
        .collect();
    let v1 = rig.release_with(
        "1.0.0",
        1,
        Build::SERVE,
        &[("data/noise".into(), noise)],
        |_| {},
    );
    let url = server.add(std::fs::read(&v1.artifact).unwrap());
    server.throttle(&url, 32 << 10, Duration::from_millis(50));
    watcher.set_desired(&[(&v1, &url)]).await;
    watcher
        .wait_for::<Event>("events", "the download to start", |e| {
            e.step == Step::Download && e.status == StepStatus::Started
        })
        .await;

    // The broker dies mid-download and comes back with nothing retained.
    broker.stop();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    broker.start_again();

    // The download went on over HTTP; once reconnected the agent reports
    // the release installed, without its desired state being sent again.
    watcher
        .wait_for::<Reported>("reported", "v1 installed after the outage", |r| {
            runs(r, "1.0.0")
        })
        .await;
    // The desired state is restored (as the manager does on reconnecting):
    // nothing is installed twice.
    watcher.set_desired(&[(&v1, &url)]).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let full_downloads = server.ranges().iter().filter(|r| r.is_empty()).count();
    assert_eq!(full_downloads, 1, "{:?}", server.ranges());
}
