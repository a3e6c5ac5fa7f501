//! The agent's footprint: resident memory and CPU over a minute idle
//! (connected, reporting health every second), and peak resident memory
//! while it installs a 50 MB release, for the device-profile binary on this
//! machine and the ARMv7 binary under qemu-arm (whose figures include
//! qemu's own memory, so they bound the device's from above); then Mender's
//! client daemon (Debian's amd64 package, where installed) idle for the same
//! minute. Prints figures; asserts nothing about speed.
//!
//! `cargo bench -p ferry-e2e --bench agent_footprint`

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use ferry_cross::{PackageRequest, package};
use ferry_e2e::{
    Manager, ProcessAgent, armv7_agent_binary, cpu_secs, free_port, incompressible, memory_kib,
    native_agent_binary, sign,
};
use ferry_protocol::manifest::{ArtifactKind, HealthSettings};
use ferry_protocol::names::ARMV7_TARGET;
use ferry_protocol::{RelPath, SecretKey, ServiceName, Target};
use serde_json::json;

const PAYLOAD_BYTES: usize = 50 * 1024 * 1024;
const IDLE: Duration = Duration::from_secs(60);

fn addr(port: u16) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], port))
}

struct Case {
    name: &'static str,
    agent: PathBuf,
    compiler: &'static str,
    compiler_args: &'static [&'static str],
    target: String,
}

fn release_tree(root: &Path, case: &Case) -> PathBuf {
    let tree = root.join(format!("tree-{}", case.name));
    std::fs::create_dir_all(tree.join("bin")).unwrap();
    std::fs::create_dir_all(tree.join("data")).unwrap();
    let source = Path::new(env!("CARGO_MANIFEST_DIR")).join("../cross/samples/hello-c/hello.c");
    let status = Command::new(case.compiler)
        .args(case.compiler_args)
        .arg("-O2")
        .arg("-o")
        .arg(tree.join("bin/hello-c"))
        .arg(source)
        .status()
        .unwrap();
    assert!(status.success());
    std::fs::write(tree.join("port"), free_port().to_string()).unwrap();
    std::fs::write(tree.join("data/blob"), incompressible(PAYLOAD_BYTES)).unwrap();
    tree
}

async fn measure(case: Case) {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    let key = SecretKey::from_seed(&[9; 32]);
    let trust = root.join("ops.pub");
    std::fs::write(&trust, key.public_key().to_text()).unwrap();
    let packaged = package(
        &PackageRequest {
            dir: release_tree(root, &case),
            service: ServiceName::new("hello-c").unwrap(),
            version: "1.0.0".parse().unwrap(),
            entrypoint: RelPath::new("bin/hello-c").unwrap(),
            sequence: 1,
            target: Target::new(&case.target).unwrap(),
            kind: Some(ArtifactKind::C),
            expires: None,
            build: Default::default(),
            health: HealthSettings {
                window_secs: 2,
                probe: None,
            },
            reload: Vec::new(),
            run: Default::default(),
        },
        &root.join("out"),
    )
    .unwrap();
    let release = sign(&packaged, &key);

    let mqtt = addr(free_port());
    let manager = Manager::start(&root.join("manager"), mqtt, addr(free_port())).await;
    let password = manager.add_device("bench-1", &[]).await;
    let agent = ProcessAgent::start(
        &case.agent,
        root,
        "bench-1",
        &password,
        manager.endpoints(),
        &trust,
    );
    manager
        .wait_device("bench-1", "online", |d| d["online"] == true)
        .await;
    // Idle: connected, reporting health every second, for a minute.
    let stat = PathBuf::from(format!("/proc/{}/stat", agent.pid()));
    let cpu_before = cpu_secs(&stat);
    tokio::time::sleep(IDLE).await;
    let idle_cpu = cpu_secs(&stat) - cpu_before;
    let (idle_rss, idle_peak) = memory_kib(agent.pid());

    manager.publish(&release).await;
    let started = Instant::now();
    manager
        .post(
            "/v1/deployments",
            json!({ "service": "hello-c", "version": "1.0.0", "devices": ["bench-1"] }),
        )
        .await;
    let device = manager
        .wait_device("bench-1", "the install", |d| {
            d["reported"]["last_result"]["version"] == "1.0.0"
        })
        .await;
    let took = started.elapsed();
    assert_eq!(
        device["reported"]["last_result"]["outcome"],
        "installed",
        "{}",
        agent.log_text()
    );
    let (_, install_peak) = memory_kib(agent.pid());
    println!(
        "{:<28} idle RSS {:>6} KiB (peak {:>6} KiB), CPU {:.2} s in {} s | peak during a {} MiB install {:>6} KiB | deploy to installed {:>6.2} s (health window 2 s)",
        case.name,
        idle_rss,
        idle_peak,
        idle_cpu,
        IDLE.as_secs(),
        PAYLOAD_BYTES / (1024 * 1024),
        install_peak,
        took.as_secs_f64()
    );
    drop(agent);
    manager.stop().await;
}

fn main() {
    // `cargo bench` passes --bench; `cargo test --benches` does not: only
    // measure when asked to.
    if !std::env::args().any(|a| a == "--bench") {
        return;
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let native = Case {
        name: "x86-64 native",
        agent: native_agent_binary(),
        compiler: "cc",
        compiler_args: &[],
        target: ferry_agent::BUILD_TARGET.to_owned(),
    };
    let arm = Case {
        name: "armv7 under qemu-arm",
        agent: armv7_agent_binary(),
        compiler: "arm-linux-gnueabihf-gcc",
        compiler_args: &["-static"],
        target: ARMV7_TARGET.to_owned(),
    };
    for (name, binary) in [("x86-64", &native.agent), ("armv7", &arm.agent)] {
        let size = std::fs::metadata(binary).map(|m| m.len()).unwrap_or(0);
        println!(
            "agent binary, {name:<7} {size:>9} bytes ({:.2} MiB), stripped",
            size as f64 / 1048576.0
        );
    }
    runtime.block_on(measure(native));
    runtime.block_on(measure(arm));
    mender_idle();
}

/// Mender's client daemons, idle for the same minute: Debian's amd64
/// package natively, and its armhf package under qemu-arm (from the root
/// `scripts/bench` unpacks, as the ARMv7 agent runs under qemu-arm).
fn mender_idle() {
    match which("mender") {
        Ok(path) => mender_daemon_idle("mender 3.4 daemon (amd64)", &path, None),
        Err(()) => println!("Mender amd64: not installed (scripts/bench installs it); skipped"),
    }
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/mender-armhf/root");
    let armhf = root.join("usr/bin/mender");
    if armhf.is_file() {
        mender_daemon_idle("mender 3.4 daemon (armhf)", &armhf, Some(&root));
    } else {
        println!("Mender armhf: not unpacked (scripts/bench unpacks it); skipped");
    }
}

/// One Mender daemon pointed at a server that refuses connections: it
/// retries on its own schedule, as a device waiting for its server does.
/// With `qemu_root`, the (ARM) binary runs under qemu-arm with that root.
fn mender_daemon_idle(label: &str, path: &Path, qemu_root: Option<&Path>) {
    let size = std::fs::metadata(path).map(|m| m.len()).unwrap_or(0);
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    std::fs::create_dir_all(&data).unwrap();
    std::fs::write(data.join("device_type"), "device_type=bench\n").unwrap();
    let config = dir.path().join("mender.conf");
    std::fs::write(
        &config,
        json!({ "ServerURL": format!("https://127.0.0.1:{}", free_port()), "UpdatePollIntervalSeconds": 1800, "InventoryPollIntervalSeconds": 28800 }).to_string(),
    )
    .unwrap();
    let fallback = dir.path().join("fallback.conf");
    std::fs::write(&fallback, "{}").unwrap();
    let mut command = match qemu_root {
        Some(root) => {
            let mut qemu = Command::new("qemu-arm");
            qemu.arg("-L").arg(root).arg(path);
            qemu
        }
        None => Command::new(path),
    };
    let mut daemon = command
        .arg("--config")
        .arg(&config)
        .arg("--fallback-config")
        .arg(&fallback)
        .arg("--data")
        .arg(&data)
        .arg("--no-syslog")
        .arg("daemon")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let stat = PathBuf::from(format!("/proc/{}/stat", daemon.id()));
    std::thread::sleep(Duration::from_secs(2));
    let cpu_before = cpu_secs(&stat);
    std::thread::sleep(IDLE);
    let idle_cpu = cpu_secs(&stat) - cpu_before;
    let (rss, peak) = memory_kib(daemon.id());
    let running = matches!(daemon.try_wait(), Ok(None));
    let _ = daemon.kill();
    let _ = daemon.wait();
    if !running || rss == 0 {
        println!("{label}: exited before the minute was up; not measured");
        return;
    }
    println!(
        "{:<28} idle RSS {:>6} KiB (peak {:>6} KiB), CPU {:.2} s in {} s | binary {} bytes ({:.2} MiB, as packaged)",
        label,
        rss,
        peak,
        idle_cpu,
        IDLE.as_secs(),
        size,
        size as f64 / 1048576.0
    );
}

fn which(tool: &str) -> Result<PathBuf, ()> {
    std::env::var_os("PATH")
        .and_then(|paths| {
            std::env::split_paths(&paths)
                .map(|p| p.join(tool))
                .find(|p| p.is_file())
        })
        .ok_or(())
}
