//! Staged rollouts with the manager and a fleet of real agents (the agent
//! library, several in this process): waves that wait for the wave before,
//! a crash-looping canary that stops everything, a manager restart in the
//! middle, and a device that joins the selector while a rollout runs.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::{Duration, SystemTime};

use ferry_e2e::{
    Agent, Manager, Release, crashing_release, free_port, installed_version, padded_release,
    release,
};
use ferry_protocol::{Envelope, SecretKey};
use serde_json::{Value, json};

fn addr(port: u16) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], port))
}

/// A manager, devices `dev-0`... with the tag "lab" and agents running, all
/// on release 1.0.0 of `api`.
struct Fleet {
    dir: tempfile::TempDir,
    key: SecretKey,
    trust: PathBuf,
    mqtt: SocketAddr,
    http: SocketAddr,
    manager: Option<Manager>,
    agents: Vec<Agent>,
    out: PathBuf,
}

impl Fleet {
    async fn new(devices: usize) -> Self {
        Self::new_with(devices, |_| String::new()).await
    }

    /// A fleet whose device `i` has `extra(i)` appended to its agent configuration.
    async fn new_with(devices: usize, extra: impl Fn(usize) -> String) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let key = SecretKey::from_seed(&[11; 32]);
        let trust = dir.path().join("ops.pub");
        std::fs::write(&trust, key.public_key().to_text()).unwrap();
        let (mqtt, http) = (addr(free_port()), addr(free_port()));
        let manager = Manager::start(&dir.path().join("manager"), mqtt, http).await;
        let out = dir.path().join("service.out");
        let mut fleet = Self {
            dir,
            key,
            trust,
            mqtt,
            http,
            manager: Some(manager),
            agents: Vec::new(),
            out,
        };
        for i in 0..devices {
            fleet
                .add_device_with(&format!("dev-{i}"), &["lab"], &extra(i))
                .await;
        }
        let v1 = fleet.release("1.0.0", 1);
        let manager = fleet.manager();
        manager.publish(&v1).await;
        manager
            .post(
                "/v1/deployments",
                json!({ "service": "api", "version": "1.0.0", "all": true }),
            )
            .await;
        for i in 0..devices {
            fleet.wait_version(&format!("dev-{i}"), "1.0.0").await;
        }
        fleet
    }

    fn manager(&self) -> &Manager {
        self.manager.as_ref().unwrap()
    }

    async fn add_device(&mut self, id: &str, tags: &[&str]) {
        self.add_device_with(id, tags, "").await;
    }

    async fn add_device_with(&mut self, id: &str, tags: &[&str], extra: &str) {
        let password = self.manager().add_device(id, tags).await;
        let agent = Agent::start_with(
            self.dir.path(),
            id,
            &password,
            self.manager().endpoints(),
            &self.trust,
            extra,
        );
        self.agents.push(agent);
        self.manager()
            .wait_device(id, "online", |d| d["online"] == true)
            .await;
    }

    fn release(&self, version: &str, sequence: u64) -> Release {
        release(self.dir.path(), &self.key, version, sequence, &self.out)
    }

    async fn wait_version(&self, id: &str, version: &str) {
        self.manager()
            .wait_device(id, version, |d| {
                installed_version(d, "api").as_deref() == Some(version)
            })
            .await;
    }

    async fn start_rollout(&self, body: Value) -> i64 {
        let created = self.manager().post("/v1/rollouts", body).await;
        created["id"].as_i64().unwrap()
    }

    /// The rollout, once it is `state` (or panics after three minutes).
    async fn wait_rollout(&self, id: i64, state: &str) -> Value {
        self.manager()
            .wait_rollout(id, state, Duration::from_secs(180))
            .await
    }

    async fn stop(mut self) {
        for agent in self.agents.drain(..) {
            agent.stop().await;
        }
        if let Some(manager) = self.manager.take() {
            manager.stop().await;
        }
    }
}

fn devices(rollout: &Value) -> Vec<Value> {
    rollout["devices"].as_array().cloned().unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_three_wave_rollout_completes_wave_after_wave() {
    let fleet = Fleet::new(5).await;
    let v2 = fleet.release("2.0.0", 2);
    fleet.manager().publish(&v2).await;
    let id = fleet
        .start_rollout(json!({
            "service": "api", "version": "2.0.0", "tag": "lab",
            "waves": [20, 60, 100], "max_in_flight": 2,
        }))
        .await;
    let rollout = fleet.wait_rollout(id, "completed").await;
    let stages = rollout["stages"].as_array().unwrap();
    assert_eq!(stages.len(), 3, "{rollout:#}");
    let reaches: Vec<u64> = stages
        .iter()
        .map(|s| s["reaches"].as_u64().unwrap())
        .collect();
    assert_eq!(reaches, [1, 3, 5]);
    assert_eq!(rollout["counts"]["installed"], 5);

    // A wave was sent only once every device of the waves before it had
    // installed: compare each device's send time with the previous stage's
    // last outcome.
    let devices = devices(&rollout);
    let mut start = 0;
    let mut previous_done = String::new();
    for end in reaches {
        let stage = &devices[start..end as usize];
        for device in stage {
            let sent = device["sent_at"].as_str().unwrap();
            assert!(
                sent >= previous_done.as_str(),
                "{} sent at {sent}, before the previous wave ended at {previous_done}",
                device["device_id"]
            );
        }
        previous_done = stage
            .iter()
            .map(|d| d["updated"].as_str().unwrap().to_owned())
            .max()
            .unwrap();
        start = end as usize;
    }
    for i in 0..5 {
        fleet.wait_version(&format!("dev-{i}"), "2.0.0").await;
    }
    fleet.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crash_looping_canary_aborts_the_rollout_and_no_other_device_is_touched() {
    let fleet = Fleet::new(4).await;
    let bad = crashing_release(fleet.dir.path(), &fleet.key, "2.0.0", 2, &fleet.out);
    fleet.manager().publish(&bad).await;
    let id = fleet
        .start_rollout(json!({
            "service": "api", "version": "2.0.0", "all": true,
            "canary": 1, "waves": [50, 100],
        }))
        .await;
    let rollout = fleet.wait_rollout(id, "aborted").await;
    let reason = rollout["reason"].as_str().unwrap();
    assert!(reason.contains("1 of 1 devices failed"), "{reason}");
    let devices = devices(&rollout);
    assert_eq!(devices[0]["status"], "rolled_back", "{rollout:#}");
    for device in &devices[1..] {
        assert_eq!(device["status"], "pending", "{rollout:#}");
    }
    // Nothing more is sent after the abort, and every device runs 1.0.0:
    // the canary rolled back, the others never saw 2.0.0.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let rollout = fleet.manager().get(&format!("/v1/rollouts/{id}")).await;
    assert_eq!(rollout["counts"]["pending"], 3, "{rollout:#}");
    for i in 0..4 {
        let device = fleet.manager().get(&format!("/v1/devices/dev-{i}")).await;
        assert_eq!(installed_version(&device, "api").as_deref(), Some("1.0.0"));
        if i > 0 {
            // Not a single event about 2.0.0 from the devices after the canary.
            let events = fleet
                .manager()
                .get(&format!("/v1/events?device=dev-{i}"))
                .await;
            assert!(
                !events
                    .as_array()
                    .unwrap()
                    .iter()
                    .any(|e| e["message"]["release"]["version"] == "2.0.0"),
                "dev-{i} was sent 2.0.0: {events}"
            );
        }
    }
    fleet.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_manager_restarted_mid_rollout_resumes_without_sending_twice() {
    let mut fleet = Fleet::new(4).await;
    let v2 = fleet.release("2.0.0", 2);
    fleet.manager().publish(&v2).await;
    let id = fleet
        .start_rollout(json!({
            "service": "api", "version": "2.0.0", "all": true,
            "waves": [25, 50, 100], "max_in_flight": 1,
        }))
        .await;
    // Once the first device has it, the manager goes away and comes back.
    fleet.wait_version("dev-0", "2.0.0").await;
    let before = fleet.manager().get(&format!("/v1/rollouts/{id}")).await;
    assert!(
        devices(&before).iter().any(|d| d["status"] == "pending"),
        "the rollout was over before the restart: {before:#}"
    );
    let data = fleet.dir.path().join("manager");
    fleet.manager.take().unwrap().stop().await;
    fleet.manager = Some(Manager::start(&data, fleet.mqtt, fleet.http).await);

    let rollout = fleet.wait_rollout(id, "completed").await;
    assert_eq!(rollout["counts"]["installed"], 4, "{rollout:#}");
    // Devices sent the release before the restart were not sent it again.
    for (was, now) in devices(&before).iter().zip(devices(&rollout)) {
        if was["status"] != "pending" {
            assert_eq!(
                was["sent_at"], now["sent_at"],
                "{} sent twice",
                now["device_id"]
            );
        }
    }
    for i in 0..4 {
        let device = format!("dev-{i}");
        fleet.wait_version(&device, "2.0.0").await;
        assert_eq!(
            fleet.manager().commits(&device, "2.0.0").await,
            1,
            "{device} installed 2.0.0 more than once"
        );
    }
    fleet.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_device_tagged_mid_rollout_receives_the_release() {
    let mut fleet = Fleet::new(2).await;
    // Running, but not in the lab (yet).
    fleet.add_device("late-1", &["field"]).await;
    let v2 = fleet.release("2.0.0", 2);
    fleet.manager().publish(&v2).await;
    let id = fleet
        .start_rollout(json!({
            "service": "api", "version": "2.0.0", "tag": "lab", "waves": [50, 100],
        }))
        .await;
    // Paused so it is surely still running when the device is tagged.
    fleet
        .manager()
        .post(&format!("/v1/rollouts/{id}/pause"), json!({}))
        .await;
    let before = fleet.manager().get(&format!("/v1/rollouts/{id}")).await;
    assert_eq!(before["devices"].as_array().unwrap().len(), 2, "{before:#}");
    let retagged = fleet
        .manager()
        .request(reqwest::Method::PUT, "/v1/devices/late-1/tags")
        .json(&json!(["field", "lab"]))
        .send()
        .await
        .unwrap();
    assert!(retagged.status().is_success(), "{}", retagged.status());
    fleet
        .manager()
        .post(&format!("/v1/rollouts/{id}/resume"), json!({}))
        .await;
    let rollout = fleet.wait_rollout(id, "completed").await;
    let ids: Vec<&str> = rollout["devices"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d["device_id"].as_str().unwrap())
        .collect();
    assert!(ids.contains(&"late-1"), "{rollout:#}");
    fleet.wait_version("late-1", "2.0.0").await;
    fleet.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failures_past_the_threshold_in_wave_two_abort_and_revert() {
    // dev-2 cannot take releases over 256 KiB unpacked; 2.0.0 carries 1 MiB.
    let fleet = Fleet::new_with(5, |i| {
        if i == 2 {
            "[limits]\nmax_unpacked_bytes = 262144\n".into()
        } else {
            String::new()
        }
    })
    .await;
    let v2 = padded_release(
        fleet.dir.path(),
        &fleet.key,
        "2.0.0",
        2,
        &fleet.out,
        1 << 20,
    );
    // The revert: the old code, signed again with a higher sequence.
    let back = fleet.release("1.0.0+revert.3", 3);
    fleet.manager().publish(&v2).await;
    fleet.manager().publish(&back).await;
    let id = fleet
        .start_rollout(json!({
            "service": "api", "version": "2.0.0", "all": true,
            "waves": [20, 60, 100], "max_failures": "20%", "revert_to": "1.0.0+revert.3",
        }))
        .await;
    let rollout = fleet.wait_rollout(id, "aborted").await;
    let reason = rollout["reason"].as_str().unwrap();
    assert!(reason.contains("over the threshold of 20%"), "{reason}");
    let steps = devices(&rollout);
    let status = |i: usize| steps[i]["status"].as_str().unwrap().to_owned();
    // Wave 1 (dev-0) had installed 2.0.0, wave 2's dev-1 was on its way:
    // both are sent the revert. dev-2 failed and still runs 1.0.0; the
    // last wave was never sent anything.
    assert!(status(0).starts_with("revert"), "{rollout:#}");
    assert!(status(1).starts_with("revert"), "{rollout:#}");
    assert!(
        ["rejected", "failed"].contains(&status(2).as_str()),
        "{rollout:#}"
    );
    assert_eq!(status(3), "pending");
    assert_eq!(status(4), "pending");
    for i in [0, 1] {
        fleet
            .wait_version(&format!("dev-{i}"), "1.0.0+revert.3")
            .await;
    }
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        let rollout = fleet.manager().get(&format!("/v1/rollouts/{id}")).await;
        let steps = devices(&rollout);
        if steps[0]["status"] == "reverted" && steps[1]["status"] == "reverted" {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "{rollout:#}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    for i in 2..5 {
        let device = fleet.manager().get(&format!("/v1/devices/dev-{i}")).await;
        assert_eq!(installed_version(&device, "api").as_deref(), Some("1.0.0"));
    }
    fleet.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revert_must_come_with_a_higher_sequence() {
    let fleet = Fleet::new(1).await;
    let v2 = fleet.release("2.0.0", 2);
    fleet.manager().publish(&v2).await;
    // 1.0.0 itself (sequence 1) cannot be a revert: devices would refuse it.
    let response = fleet
        .manager()
        .request(reqwest::Method::POST, "/v1/rollouts")
        .json(&json!({ "service": "api", "version": "2.0.0", "all": true, "revert_to": "1.0.0" }))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 400);
    let body: Value = response.json().await.unwrap();
    assert!(
        body["error"].as_str().unwrap().contains("sequence above 2"),
        "{body}"
    );
    assert_eq!(fleet.manager().get("/v1/rollouts").await, json!([]));
    fleet.stop().await;
}

/// `base` signed again as `version` (`sequence`) with an expiry.
fn expiring(
    base: &Release,
    key: &SecretKey,
    version: &str,
    sequence: u64,
    at: SystemTime,
) -> Release {
    let mut manifest = base.manifest.clone();
    manifest.version = version.parse().unwrap();
    manifest.sequence = sequence;
    manifest.expires = Some(at.into());
    Release {
        envelope: Envelope::sign(manifest.to_json(), &[key]).unwrap(),
        manifest,
        artifact: base.artifact.clone(),
    }
}

/// POSTs `body` and expects 422 with an error naming the expiry.
async fn refused_as_expired(manager: &Manager, path: &str, body: reqwest::Body) {
    let response = manager
        .request(reqwest::Method::POST, path)
        .header("content-type", "application/json")
        .body(body)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 422, "POST {path}");
    let body: Value = response.json().await.unwrap();
    assert!(
        body["error"].as_str().unwrap().contains("expired at"),
        "{body}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_expired_release_is_neither_published_nor_sent() {
    let fleet = Fleet::new(1).await;
    let manager = fleet.manager();
    let base = fleet.release("2.0.0", 2);
    // Already expired when it is published.
    let past = expiring(
        &base,
        &fleet.key,
        "2.0.1",
        3,
        SystemTime::now() - Duration::from_secs(60),
    );
    let put = manager
        .request(
            reqwest::Method::PUT,
            &format!("/v1/artifacts/{}", past.manifest.artifact.sha256),
        )
        .body(std::fs::read(&past.artifact).unwrap())
        .send()
        .await
        .unwrap();
    assert!(put.status().is_success());
    refused_as_expired(manager, "/v1/releases", past.envelope.to_json().into()).await;
    let releases = manager.get("/v1/releases").await;
    assert!(
        releases
            .as_array()
            .unwrap()
            .iter()
            .all(|r| r["version"] != "2.0.1"),
        "{releases}"
    );

    // Expires after it was published, before anyone sends it.
    let soon = expiring(
        &base,
        &fleet.key,
        "2.0.2",
        4,
        SystemTime::now() + Duration::from_secs(2),
    );
    manager.publish(&soon).await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    let ask = json!({ "service": "api", "version": "2.0.2", "all": true }).to_string();
    refused_as_expired(manager, "/v1/rollouts", ask.clone().into()).await;
    refused_as_expired(manager, "/v1/deployments", ask.into()).await;
    assert_eq!(manager.get("/v1/rollouts").await, json!([]));
    let deployments = manager.get("/v1/deployments").await;
    assert!(
        deployments
            .as_array()
            .unwrap()
            .iter()
            .all(|d| d["version"] == "1.0.0"),
        "{deployments}"
    );
    fleet.wait_version("dev-0", "1.0.0").await;
    fleet.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_offline_device_times_out_without_blocking_and_converges_when_it_returns() {
    let mut fleet = Fleet::new(1).await;
    // Registered, but its agent is not running yet.
    let password = fleet.manager().add_device("away-1", &["lab"]).await;
    let v2 = fleet.release("2.0.0", 2);
    fleet.manager().publish(&v2).await;
    let id = fleet
        .start_rollout(json!({
            "service": "api", "version": "2.0.0", "tag": "lab",
            "device_timeout_secs": 3, "max_failures": "1",
        }))
        .await;
    // The offline device counts as failed after the timeout; with one
    // failure allowed the rollout finishes instead of waiting forever.
    let rollout = fleet.wait_rollout(id, "completed").await;
    let steps = devices(&rollout);
    let away = steps.iter().find(|d| d["device_id"] == "away-1").unwrap();
    assert_eq!(away["status"], "timed_out", "{rollout:#}");
    assert!(
        away["reason"].as_str().unwrap().contains("within 3s"),
        "{rollout:#}"
    );

    // It comes back: its desired state is waiting, it installs, and the
    // rollout records the late success.
    let agent = Agent::start(
        fleet.dir.path(),
        "away-1",
        &password,
        fleet.manager().endpoints(),
        &fleet.trust,
    );
    fleet.agents.push(agent);
    fleet.wait_version("away-1", "2.0.0").await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let rollout = fleet.manager().get(&format!("/v1/rollouts/{id}")).await;
        let steps = devices(&rollout);
        if steps
            .iter()
            .any(|d| d["device_id"] == "away-1" && d["status"] == "installed")
        {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "{rollout:#}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    fleet.stop().await;
}
