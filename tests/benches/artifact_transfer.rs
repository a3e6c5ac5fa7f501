//! A 20 MiB artifact to one device over HTTP and over MQTT blocks, on
//! loopback, against the embedded broker and against mosquitto: transfer
//! time (the agent's download step, from its own events), CPU of the
//! manager (in-process, its threads by name), of mosquitto, and of the
//! agent (the device-profile binary, a process of its own) over the
//! transfer, and the agent's peak RSS. Three runs per case; the median
//! run's figures are printed. Asserts nothing about speed.
//!
//! `cargo bench -p ferry-e2e --bench artifact_transfer`

use std::path::Path;
use std::time::{Duration, Instant};

use ferry_e2e::{
    BrokerKind, MANAGER_THREAD, Mosquitto, ProcessAgent, Release, Site, cpu_secs, large_release,
    memory_kib, native_agent_binary,
};
use ferry_protocol::SecretKey;
use serde_json::{Value, json};

const PAYLOAD_BYTES: usize = 20 * 1024 * 1024;
const RUNS: usize = 3;

/// CPU seconds of this process's threads named like the in-process manager's.
fn manager_cpu() -> f64 {
    let Ok(tasks) = std::fs::read_dir("/proc/self/task") else {
        return 0.0;
    };
    tasks
        .flatten()
        .filter(|t| {
            std::fs::read_to_string(t.path().join("comm")).is_ok_and(|c| c.trim() == MANAGER_THREAD)
        })
        .map(|t| cpu_secs(&t.path().join("stat")))
        .sum()
}

#[derive(Debug, Clone, Copy)]
struct Case {
    name: &'static str,
    transfer: &'static str,
}

const CASES: [Case; 4] = [
    Case {
        name: "HTTP",
        transfer: "transport = \"http\"",
    },
    Case {
        name: "MQTT, 16 KiB blocks",
        transfer: "transport = \"mqtt\"\nblock_size = 16384\nblocks_per_request = 64",
    },
    Case {
        name: "MQTT, 64 KiB blocks",
        transfer: "transport = \"mqtt\"\nblock_size = 65536\nblocks_per_request = 16",
    },
    Case {
        name: "MQTT, 256 KiB blocks",
        transfer: "transport = \"mqtt\"\nblock_size = 262144\nblocks_per_request = 4",
    },
];

#[derive(Debug, Clone, Copy)]
struct Figures {
    secs: f64,
    manager_cpu: f64,
    broker_cpu: Option<f64>,
    agent_cpu: f64,
    agent_peak_kib: u64,
}

/// The download step's duration from the agent's own events.
fn download_secs(events: &Value) -> Option<f64> {
    let time = |status: &str| -> Option<std::time::SystemTime> {
        let event = events
            .as_array()?
            .iter()
            .find(|e| e["message"]["step"] == "download" && e["message"]["status"] == status)?;
        let text = event["message"]["time"].as_str()?;
        Some(
            text.parse::<ferry_protocol::Timestamp>()
                .ok()?
                .system_time(),
        )
    };
    let took = time("succeeded")?.duration_since(time("started")?).ok()?;
    Some(took.as_secs_f64())
}

async fn run_once(
    site: &Site,
    root: &Path,
    agent_binary: &Path,
    release: &Release,
    device: &str,
    case: Case,
    trust: &Path,
) -> Figures {
    let password = site.password(device);
    let agent = ProcessAgent::start_with(
        agent_binary,
        root,
        device,
        password,
        site.endpoints(),
        trust,
        &format!("[transfer]\n{}\n", case.transfer),
    );
    site.manager
        .wait_device(device, "the agent online", |d| d["online"] == true)
        .await;
    let broker_pid = site.mosquitto.as_ref().map(Mosquitto::pid);
    let broker_stat = broker_pid.map(|p| format!("/proc/{p}/stat"));
    let agent_stat = format!("/proc/{}/stat", agent.pid());
    let before = (
        manager_cpu(),
        broker_stat.as_ref().map(|s| cpu_secs(Path::new(s))),
        cpu_secs(Path::new(&agent_stat)),
    );
    site.manager
        .post(
            "/v1/deployments",
            json!({ "service": "api", "version": "1.0.0", "devices": [device] }),
        )
        .await;
    let checked = agent
        .data_dir
        .join("downloads")
        .join(format!("{}.tar.gz", release.manifest.artifact.sha256));
    let deadline = Instant::now() + Duration::from_secs(300);
    while !checked.exists() {
        assert!(
            Instant::now() < deadline,
            "no download:\n{}",
            agent.log_text()
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let after = (
        manager_cpu(),
        broker_stat.as_ref().map(|s| cpu_secs(Path::new(s))),
        cpu_secs(Path::new(&agent_stat)),
    );
    let (_, agent_peak_kib) = memory_kib(agent.pid());
    site.manager
        .wait_device(device, "the install", |d| {
            d["reported"]["last_result"]["version"] == "1.0.0"
        })
        .await;
    let events = site
        .manager
        .get(&format!("/v1/events?device={device}"))
        .await;
    let secs = download_secs(&events).unwrap_or_else(|| panic!("no download events: {events}"));
    drop(agent);
    Figures {
        secs,
        manager_cpu: after.0 - before.0,
        broker_cpu: after.1.zip(before.1).map(|(a, b)| a - b),
        agent_cpu: after.2 - before.2,
        agent_peak_kib,
    }
}

async fn measure(broker: BrokerKind, agent_binary: &Path) {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    let key = SecretKey::from_seed(&[3; 32]);
    let trust = root.join("ops.pub");
    std::fs::write(&trust, key.public_key().to_text()).unwrap();
    let release = large_release(
        root,
        &key,
        "1.0.0",
        1,
        &root.join("service.out"),
        PAYLOAD_BYTES,
    );
    let devices: Vec<String> = (0..CASES.len() * RUNS)
        .map(|i| format!("bench-{i}"))
        .collect();
    let ids: Vec<&str> = devices.iter().map(String::as_str).collect();
    let site = Site::start(root, broker, &ids, None).await;
    site.manager.publish(&release).await;
    let mib = release.manifest.artifact.size as f64 / 1048576.0;
    let mut http_secs = None;
    for (c, case) in CASES.iter().enumerate() {
        let mut runs = Vec::new();
        for r in 0..RUNS {
            let device = &devices[c * RUNS + r];
            runs.push(run_once(&site, root, agent_binary, &release, device, *case, &trust).await);
        }
        runs.sort_by(|a, b| a.secs.total_cmp(&b.secs));
        let f = runs[RUNS / 2];
        let http = *http_secs.get_or_insert(f.secs);
        println!(
            "{:<10} {:<22} {:>6.2} s {:>6.1} MiB/s {:>5.2}x HTTP | CPU s: manager {:>5.2}, mosquitto {:>5}, agent {:>5.2} | agent peak RSS {:>6} KiB",
            format!("{broker:?}"),
            case.name,
            f.secs,
            mib / f.secs,
            f.secs / http,
            f.manager_cpu,
            f.broker_cpu.map_or("-".into(), |c| format!("{c:.2}")),
            f.agent_cpu,
            f.agent_peak_kib,
        );
    }
    site.manager.stop().await;
}

fn main() {
    // `cargo bench` passes --bench; `cargo test --benches` does not: only
    // measure when asked to.
    if !std::env::args().any(|a| a == "--bench") {
        return;
    }
    let agent = native_agent_binary();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    println!(
        "{PAYLOAD_BYTES} B payload; median of {RUNS} runs; transfer = the agent's download step (events)"
    );
    runtime.block_on(measure(BrokerKind::Embedded, &agent));
    runtime.block_on(measure(BrokerKind::Mosquitto, &agent));
}
