//! The mission end to end on ARM: the ARMv7 device agent, running under
//! qemu-arm, takes Go and C services that `ferry build` cross-compiled from
//! the samples in cross/samples, runs them, upgrades them, rolls a broken
//! release back, and refuses an x86-64 build before the swap.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use ferry_cross::{BuildRequest, CBuild, GoBuild, PackageRequest, build_c, build_go, package};
use ferry_e2e::{
    Manager, ProcessAgent, Release, armv7_agent_binary, free_port, installed_version, sign,
};
use ferry_protocol::manifest::{ArtifactKind, HealthSettings, Probe};
use ferry_protocol::names::ARMV7_TARGET;
use ferry_protocol::{RelPath, SecretKey, ServiceName, Target};
use serde_json::{Value, json};

fn addr(port: u16) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], port))
}

fn samples() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../cross/samples")
}

/// A copy of a sample in a git repository of its own; returns the commit.
fn sample_repo(name: &str, dir: &Path) -> (PathBuf, String) {
    let repo = dir.join(name);
    std::fs::create_dir_all(&repo).unwrap();
    for item in std::fs::read_dir(samples().join(name)).unwrap() {
        let item = item.unwrap();
        std::fs::copy(item.path(), repo.join(item.file_name())).unwrap();
    }
    let git = |args: &[&str]| {
        let out = Command::new("git")
            .arg("-C")
            .arg(&repo)
            .args([
                "-c",
                "user.name=Ferry Tests",
                "-c",
                "user.email=tests@ferry.invalid",
            ])
            .args(args)
            .output()
            .expect("git not found");
        assert!(out.status.success(), "git {args:?}: {out:?}");
        String::from_utf8(out.stdout).unwrap().trim().to_owned()
    };
    git(&["init", "-q"]);
    git(&["add", "."]);
    git(&["commit", "-q", "-m", name]);
    let commit = git(&["rev-parse", "HEAD"]);
    (repo, commit)
}

/// A directory with the `port` file the samples read.
fn port_files(dir: &Path, name: &str, port: u16) -> PathBuf {
    let files = dir.join(format!("files-{name}"));
    std::fs::create_dir_all(&files).unwrap();
    std::fs::write(files.join("port"), port.to_string()).unwrap();
    files
}

fn request(
    source: &Path,
    service: &str,
    version: &str,
    sequence: u64,
    files: &Path,
    probe_port: u16,
) -> BuildRequest {
    BuildRequest {
        source: source.to_owned(),
        service: ServiceName::new(service).unwrap(),
        version: version.parse().unwrap(),
        sequence,
        files: Some(files.to_owned()),
        expires: None,
        health: HealthSettings {
            window_secs: 3,
            probe: Some(Probe::Http {
                url: format!("http://127.0.0.1:{probe_port}/healthz"),
            }),
        },
        reload: Vec::new(),
        run: Default::default(),
        packager: Some("ferry tests".into()),
    }
}

/// GET /version from a sample, as the text it answers.
fn ask_version(port: u16) -> String {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Ok(mut stream) = TcpStream::connect(("127.0.0.1", port)) {
            let _ = stream.set_read_timeout(Some(Duration::from_secs(10)));
            let mut response = String::new();
            if stream
                .write_all(b"GET /version HTTP/1.0\r\nHost: localhost\r\n\r\n")
                .and_then(|_| stream.read_to_string(&mut response))
                .is_ok()
                && let Some(body) = response.split("\r\n\r\n").nth(1)
            {
                return body.trim().to_owned();
            }
        }
        assert!(Instant::now() < deadline, "nothing answers on port {port}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

struct Device<'a> {
    manager: &'a Manager,
    agent: &'a ProcessAgent,
}

impl Device<'_> {
    async fn deploy(&self, release: &Release) {
        self.manager.publish(release).await;
        let m = &release.manifest;
        self.manager
            .post(
                "/v1/deployments",
                json!({ "service": m.service, "version": m.version.to_string(), "devices": ["arm-1"] }),
            )
            .await;
    }

    /// Waits for the device's last result to be about `release`, and returns it.
    async fn result_of(&self, release: &Release) -> Value {
        let m = &release.manifest;
        let deadline = tokio::time::Instant::now() + Duration::from_secs(180);
        loop {
            let device = self.manager.get("/v1/devices/arm-1").await;
            let result = &device["reported"]["last_result"];
            if result["service"] == m.service.as_str() && result["version"] == m.version.to_string()
            {
                return result.clone();
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "no result for {} {}\n{device:#}\nagent log:\n{}",
                m.service,
                m.version,
                self.agent.log_text()
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    async fn installed(&self, service: &str) -> Option<String> {
        installed_version(&self.manager.get("/v1/devices/arm-1").await, service)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn armv7_agent_runs_upgrades_and_rolls_back_go_and_c_services() {
    let agent_binary = armv7_agent_binary();
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    let key = SecretKey::from_seed(&[7; 32]);
    let trust = root.join("ops.pub");
    std::fs::write(&trust, key.public_key().to_text()).unwrap();

    let mqtt = addr(free_port());
    let manager = Manager::start(&root.join("manager"), mqtt, addr(free_port())).await;
    let password = manager.add_device("arm-1", &["arm"]).await;
    let agent = ProcessAgent::start(
        &agent_binary,
        root,
        "arm-1",
        &password,
        manager.endpoints(),
        &trust,
    );
    let device = Device {
        manager: &manager,
        agent: &agent,
    };
    manager
        .wait_device("arm-1", "online", |d| d["online"] == true)
        .await;

    let (go_src, go_commit) = sample_repo("hello-go", root);
    let (c_src, c_commit) = sample_repo("hello-c", root);
    let (go_port, c_port) = (free_port(), free_port());
    let go_files = port_files(root, "go", go_port);
    let c_files = port_files(root, "c", c_port);
    let out = root.join("out");
    let go = |version: &str, sequence: u64, probe_port: u16| {
        let request = request(
            &go_src, "hello-go", version, sequence, &go_files, probe_port,
        );
        sign(
            &build_go(&request, &GoBuild::default(), &out)
                .unwrap()
                .packaged,
            &key,
        )
    };
    let c = |version: &str, sequence: u64, probe_port: u16| {
        let request = request(&c_src, "hello-c", version, sequence, &c_files, probe_port);
        sign(
            &build_c(&request, &CBuild::default(), &out)
                .unwrap()
                .packaged,
            &key,
        )
    };

    // 1.0.0 of both: installed, started, and answering with the version and
    // commit the builds compiled in (Go's through -X main.version).
    for (release, port, expected) in [
        (
            go("1.0.0", 1, go_port),
            go_port,
            format!("hello-go 1.0.0 {go_commit}"),
        ),
        (
            c("1.0.0", 1, c_port),
            c_port,
            format!("hello-c 1.0.0 {c_commit}"),
        ),
    ] {
        device.deploy(&release).await;
        let result = device.result_of(&release).await;
        assert_eq!(result["outcome"], "installed", "{result}");
        assert_eq!(ask_version(port), expected);
    }

    // Upgrades to 1.1.0.
    for (release, port, expected) in [
        (
            go("1.1.0", 2, go_port),
            go_port,
            format!("hello-go 1.1.0 {go_commit}"),
        ),
        (
            c("1.1.0", 2, c_port),
            c_port,
            format!("hello-c 1.1.0 {c_commit}"),
        ),
    ] {
        device.deploy(&release).await;
        let result = device.result_of(&release).await;
        assert_eq!(result["outcome"], "installed", "{result}");
        assert_eq!(ask_version(port), expected);
    }

    // Releases whose health probe never passes (it checks a port the
    // service does not listen on) are rolled back to 1.1.0, Go and C alike.
    for (broken, port, expected) in [
        (
            go("1.2.0", 3, free_port()),
            go_port,
            format!("hello-go 1.1.0 {go_commit}"),
        ),
        (
            c("1.2.0", 3, free_port()),
            c_port,
            format!("hello-c 1.1.0 {c_commit}"),
        ),
    ] {
        device.deploy(&broken).await;
        let result = device.result_of(&broken).await;
        assert_eq!(result["outcome"], "rolled_back", "{result}");
        let service = broken.manifest.service.as_str();
        assert_eq!(device.installed(service).await.as_deref(), Some("1.1.0"));
        assert_eq!(ask_version(port), expected);
    }

    // The same C service built for x86-64 and (wrongly) labelled armv7: the
    // ARM agent refuses it before the swap, and 1.1.0 keeps running.
    let current = agent.data_dir.join("services/hello-c/current");
    let before = std::fs::read_link(&current).unwrap();
    let x86 = x86_release(root, &c_src, &c_files, &key);
    device.deploy(&x86).await;
    let result = device.result_of(&x86).await;
    // "failed": found after download and unpack, before the swap; the
    // running release never stopped.
    assert_eq!(result["outcome"], "failed", "{result}");
    let reason = result["reason"].as_str().unwrap_or_default();
    assert!(reason.contains("x86-64"), "{reason}");
    assert_eq!(device.installed("hello-c").await.as_deref(), Some("1.1.0"));
    assert_eq!(ask_version(c_port), format!("hello-c 1.1.0 {c_commit}"));
    assert_eq!(std::fs::read_link(&current).unwrap(), before);

    drop(agent);
    manager.stop().await;
}

/// hello-c 1.3.0 compiled with the host's `cc` and packaged for armv7.
fn x86_release(root: &Path, source: &Path, files: &Path, key: &SecretKey) -> Release {
    let tree = root.join("x86-tree");
    std::fs::create_dir_all(tree.join("bin")).unwrap();
    std::fs::copy(files.join("port"), tree.join("port")).unwrap();
    let status = Command::new("cc")
        .args(["-O2", "-DFERRY_VERSION=\"1.3.0\"", "-o"])
        .arg(tree.join("bin/hello-c"))
        .arg(source.join("hello.c"))
        .status()
        .expect("cc not found");
    assert!(status.success());
    let packaged = package(
        &PackageRequest {
            dir: tree,
            service: ServiceName::new("hello-c").unwrap(),
            version: "1.3.0".parse().unwrap(),
            entrypoint: RelPath::new("bin/hello-c").unwrap(),
            sequence: 4,
            target: Target::new(ARMV7_TARGET).unwrap(),
            kind: Some(ArtifactKind::C),
            expires: None,
            build: Default::default(),
            health: HealthSettings::default(),
            reload: Vec::new(),
            run: Default::default(),
        },
        &root.join("x86-out"),
    )
    .unwrap();
    sign(&packaged, key)
}
