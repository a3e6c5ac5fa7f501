//! `/metrics` on a live manager with agents reporting: what Prometheus
//! would scrape, checked by promtool and read back.

use std::io::Write;
use std::net::SocketAddr;
use std::process::{Command, Stdio};
use std::time::Duration;

use ferry_e2e::{Agent, Manager, free_port, installed_version, release};
use ferry_protocol::SecretKey;
use serde_json::json;

fn addr(port: u16) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], port))
}

/// The value of the sample `name{labels}` (labels as printed), if present.
fn sample(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .find_map(|line| line.strip_prefix(series)?.strip_prefix(' '))
        .and_then(|v| v.trim().parse().ok())
}

/// The `ferry_...` metric names an expression uses.
fn metric_names(expr: &str) -> Vec<String> {
    let mut names = Vec::new();
    let mut rest = expr;
    while let Some(at) = rest.find("ferry_") {
        let tail = &rest[at..];
        let end = tail
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .unwrap_or(tail.len());
        names.push(tail[..end].to_owned());
        rest = &tail[end..];
    }
    names
}

async fn scrape(manager: &Manager) -> String {
    let response = manager
        .request(reqwest::Method::GET, "/metrics")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let kind = response.headers()["content-type"]
        .to_str()
        .unwrap()
        .to_owned();
    assert!(kind.starts_with("text/plain; version=0.0.4"), "{kind}");
    response.text().await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_pass_promtool_and_describe_the_fleet() {
    let dir = tempfile::tempdir().unwrap();
    let key = SecretKey::from_seed(&[21; 32]);
    let trust = dir.path().join("ops.pub");
    std::fs::write(&trust, key.public_key().to_text()).unwrap();
    let mqtt = addr(free_port());
    let manager = Manager::start(&dir.path().join("m"), mqtt, addr(free_port())).await;
    let mut agents = Vec::new();
    for id in ["m-1", "m-2"] {
        let password = manager.add_device(id, &["lab"]).await;
        agents.push(Agent::start(
            dir.path(),
            id,
            &password,
            manager.endpoints(),
            &trust,
        ));
    }
    manager.add_device("m-3", &[]).await; // registered, never connects
    let out = dir.path().join("service.out");
    let v1 = release(dir.path(), &key, "1.0.0", 1, &out);
    manager.publish(&v1).await;
    let rollout = manager
        .post(
            "/v1/rollouts",
            json!({ "service": "api", "version": "1.0.0", "tag": "lab" }),
        )
        .await;
    for id in ["m-1", "m-2"] {
        manager
            .wait_device(id, "1.0.0 and a health report", |d| {
                installed_version(d, "api").as_deref() == Some("1.0.0")
                    && d["health"]["services"]
                        .as_array()
                        .is_some_and(|s| !s.is_empty())
            })
            .await;
    }
    // The engine completes the rollout on its next step after the last result.
    let id = rollout["id"].as_i64().unwrap();
    manager
        .wait_rollout(id, "completed", std::time::Duration::from_secs(30))
        .await;
    // The scrape without the token is refused.
    let anonymous = manager
        .new_client()
        .get(manager.url("/metrics"))
        .send()
        .await
        .unwrap();
    assert_eq!(anonymous.status(), 401);

    let text = scrape(&manager).await;
    let mut promtool = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("promtool not found; run scripts/setup");
    promtool
        .stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    let checked = promtool.wait_with_output().unwrap();
    assert!(
        checked.status.success(),
        "promtool: {}{}\n{text}",
        String::from_utf8_lossy(&checked.stdout),
        String::from_utf8_lossy(&checked.stderr)
    );

    assert_eq!(
        sample(&text, "ferry_devices{status=\"online\"}"),
        Some(2.0),
        "{text}"
    );
    assert_eq!(
        sample(&text, "ferry_devices{status=\"offline\"}"),
        Some(1.0),
        "{text}"
    );
    assert_eq!(
        sample(
            &text,
            "ferry_service_devices{service=\"api\",version=\"1.0.0\"}"
        ),
        Some(2.0),
        "{text}"
    );
    assert_eq!(
        sample(&text, "ferry_rollouts{state=\"completed\"}"),
        Some(1.0),
        "{text}"
    );
    assert_eq!(
        sample(&text, "ferry_device_online{device=\"m-3\"}"),
        Some(0.0),
        "{text}"
    );
    let total = sample(&text, "ferry_device_memory_total_bytes{device=\"m-1\"}").unwrap();
    assert!(total > 0.0, "{text}");
    assert!(
        sample(&text, "ferry_mqtt_messages_received_total{kind=\"health\"}").unwrap() >= 2.0,
        "{text}"
    );
    assert!(
        sample(&text, "ferry_health_report_age_seconds{device=\"m-1\"}").unwrap() < 60.0,
        "{text}"
    );
    // API latency by route template, never by raw path.
    assert!(text.contains("route=\"/v1/devices/{id}\""), "{text}");
    assert!(!text.contains("/v1/devices/m-1"), "{text}");

    // A running rollout shows its progress.
    let v2 = release(dir.path(), &key, "2.0.0", 2, &out);
    manager.publish(&v2).await;
    manager
        .post(
            "/v1/rollouts",
            json!({ "service": "api", "version": "2.0.0", "tag": "lab", "canary": 1 }),
        )
        .await;
    let rollouts = manager.get("/v1/rollouts").await;
    let id = rollouts[0]["id"].as_i64().unwrap();
    manager
        .post(&format!("/v1/rollouts/{id}/pause"), json!({}))
        .await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    let text = scrape(&manager).await;
    let series = format!(
        "ferry_rollout_progress_ratio{{rollout=\"{id}\",service=\"api\",version=\"2.0.0\"}}"
    );
    let progress = sample(&text, &series).unwrap_or_else(|| panic!("no {series}:\n{text}"));
    assert!((0.0..=1.0).contains(&progress), "{text}");
    assert_eq!(
        sample(&text, "ferry_rollouts{state=\"paused\"}"),
        Some(1.0),
        "{text}"
    );

    // Every metric the Grafana dashboard in the repo queries is exported
    // (with a rollout open, so the rollout series exist too).
    let m1 = manager.get("/v1/devices/m-1").await;
    let has_sensor = !m1["health"]["temperature_celsius"].is_null();
    let dashboard: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../grafana/ferry-fleet.json"
        ))
        .unwrap(),
    )
    .unwrap();
    let mut queried = 0;
    for panel in dashboard["panels"].as_array().unwrap() {
        for target in panel["targets"].as_array().unwrap() {
            let expr = target["expr"].as_str().unwrap();
            for name in metric_names(expr) {
                queried += 1;
                // Only devices with a temperature sensor report one.
                if name == "ferry_device_temperature_celsius" && !has_sensor {
                    continue;
                }
                assert!(
                    text.lines()
                        .any(|l| l.starts_with(&format!("# TYPE {name} "))
                            || l.starts_with(&format!("{name}{{"))
                            || l.starts_with(&format!("{name} "))),
                    "panel {:?} queries {name}, which /metrics does not export",
                    panel["title"]
                );
            }
        }
    }
    assert!(queried >= 15, "{queried}");

    // m-3 reports 500 services nobody published and a version of api
    // nobody published: no series for any of them, and its api counts as
    // `unpublished` (a device cannot grow the manager's series).
    let password = manager.add_device("m-3", &[]).await;
    let services: Vec<serde_json::Value> = (0..500)
        .map(|i| {
            json!({"service": format!("made-up-{i}"), "version": "6.6.6",
                   "sequence": 1, "artifact_sha256": "ab".repeat(32),
                   "installed_at": "2026-01-01T00:00:00Z"})
        })
        .chain([
            json!({"service": "api", "version": "9.9.9-evil", "sequence": 99,
                       "artifact_sha256": "ab".repeat(32), "installed_at": "2026-01-01T00:00:00Z"}),
        ])
        .collect();
    let report = json!({"schema": 1, "time": "2026-01-01T00:00:00Z", "agent_version": "x",
                        "services": services});
    let options = manager
        .endpoints()
        .device_options(&dir.path().join("agent-m-3"), "m-3", &password)
        .await;
    let (client, _task) = ferry_e2e::device_session(options, |_| {}).await;
    client
        .publish(
            "ferry/v1/devices/m-3/reported",
            rumqttc::QoS::AtLeastOnce,
            true,
            report.to_string(),
        )
        .await
        .unwrap();
    manager
        .wait_device("m-3", "its made-up report", |d| {
            d["reported"]["agent_version"] == "x"
        })
        .await;
    let text = scrape(&manager).await;
    assert!(
        !text.contains("made-up-"),
        "a made-up service became a label"
    );
    assert!(
        !text.contains("9.9.9-evil"),
        "a made-up version became a label"
    );
    assert!(
        sample(
            &text,
            "ferry_service_devices{service=\"api\",version=\"unpublished\"}"
        )
        .is_some(),
        "{text}"
    );

    for agent in agents {
        agent.stop().await;
    }
    manager.stop().await;
}
