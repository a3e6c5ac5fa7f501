//! The fleet simulator itself, at a size CI can afford: 100 agents in this
//! process, each with its own MQTT connection and data directory, take a
//! rollout from the manager end to end. What the benchmark
//! (`benches/fleet_rollout.rs`) times at 1,000 and 10,000 devices, this
//! checks is real: every device downloaded, verified, unpacked and swapped
//! in the release, and says so.

use std::net::SocketAddr;
use std::time::Duration;

use ferry_e2e::simulator::SimulatedFleet;
use ferry_e2e::{Manager, free_port, installed_version, release};
use ferry_protocol::SecretKey;
use serde_json::json;

const DEVICES: usize = 100;

fn addr(port: u16) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], port))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_simulated_fleet_takes_a_rollout_end_to_end() {
    let dir = tempfile::tempdir().unwrap();
    let key = SecretKey::from_seed(&[11; 32]);
    let trust = dir.path().join("ops.pub");
    std::fs::write(&trust, key.public_key().to_text()).unwrap();
    let (mqtt, http) = (addr(free_port()), addr(free_port()));
    let manager = Manager::start(&dir.path().join("manager"), mqtt, http).await;
    let ids: Vec<String> = (0..DEVICES).map(|i| format!("sim-{i:05}")).collect();
    let devices = manager.add_devices(&ids).await;
    assert_eq!(devices.len(), DEVICES);

    let fleet = SimulatedFleet::start(
        &dir.path().join("devices"),
        manager.endpoints(),
        &devices,
        &trust,
        1,
    );
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    while manager.online_devices().await < DEVICES {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the fleet never came online"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }

    let v1 = release(dir.path(), &key, "1.0.0", 1, &dir.path().join("unused.out"));
    manager.publish(&v1).await;
    let created = manager
        .post(
            "/v1/rollouts",
            json!({ "service": "api", "version": "1.0.0", "all": true }),
        )
        .await;
    let id = created["id"].as_i64().unwrap();
    let done = manager
        .wait_rollout(id, "completed", Duration::from_secs(120))
        .await;
    assert_eq!(done["counts"]["installed"], DEVICES, "{done:#}");
    assert_eq!(done["counts"]["failed"], 0, "{done:#}");

    // Each device says it runs 1.0.0, and has it on its own disk.
    let all = manager.get("/v1/devices").await;
    let all = all.as_array().unwrap();
    assert_eq!(all.len(), DEVICES);
    for device in all {
        assert_eq!(
            installed_version(device, "api").as_deref(),
            Some("1.0.0"),
            "{device:#}"
        );
        let id = device["device_id"].as_str().unwrap();
        let program = fleet.root.join(id).join("services/api/current/bin/api");
        assert!(program.is_file(), "{} is missing", program.display());
    }
    assert_eq!(fleet.failed(), 0);
    fleet.stop().await;
    manager.stop().await;
}
