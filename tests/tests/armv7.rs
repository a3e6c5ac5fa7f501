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

/// The current Go that `scripts/setup` keeps under target/.
fn current_go() -> PathBuf {
    let go = Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/go-1.27.3/go/bin/go");
    assert!(
        go.is_file(),
        "{} is missing; run scripts/setup",
        go.display()
    );
    go
}

/// Two daemons that will not start without their arguments and
/// environment, built for ARMv7: greeter (Go, needs a current Go) and
/// tinyhttpd (C, a Makefile, static), with what each needs in its signed
/// run settings.
struct Daemons<'a> {
    key: &'a SecretKey,
    root: PathBuf,
    greeter: PathBuf,
    tinyhttpd: PathBuf,
}

impl<'a> Daemons<'a> {
    fn new(root: &Path, key: &'a SecretKey) -> Self {
        let (greeter, _) = sample_repo("greeter", root);
        let (tinyhttpd, _) = sample_repo("tinyhttpd", root);
        Self {
            key,
            root: root.to_owned(),
            greeter,
            tinyhttpd,
        }
    }

    fn run(args: Vec<String>, env: &[(&str, &str)]) -> ferry_protocol::manifest::RunSettings {
        ferry_protocol::manifest::RunSettings {
            args,
            env: env
                .iter()
                .map(|(k, v)| (ferry_protocol::EnvName::new(*k).unwrap(), (*v).to_owned()))
                .collect(),
            ..Default::default()
        }
    }

    /// greeter VERSION listening on `port`.
    fn greeter(&self, version: &str, sequence: u64, port: u16) -> Release {
        let mut request = request(
            &self.greeter,
            "greeter",
            version,
            sequence,
            &port_files(&self.root, "greeter", port),
            port,
        );
        request.files = None;
        let listen = format!("127.0.0.1:{port}");
        request.run = Self::run(
            vec!["-listen".into(), listen, "-name".into(), "fleet".into()],
            &[("GREETING", "Hello")],
        );
        let settings = GoBuild {
            go: Some(current_go()),
            ..GoBuild::default()
        };
        let built = build_go(&request, &settings, &self.root.join("out")).unwrap();
        assert!(built.warnings.is_empty(), "{:?}", built.warnings);
        sign(&built.packaged, self.key)
    }

    /// tinyhttpd VERSION serving `www/` on `port`.
    fn tinyhttpd(&self, version: &str, sequence: u64, port: u16) -> Release {
        let files = self.root.join(format!("www-{version}"));
        std::fs::create_dir_all(files.join("www")).unwrap();
        std::fs::write(files.join("www/index.html"), "<p>served by tinyhttpd</p>\n").unwrap();
        let mut request = request(
            &self.tinyhttpd,
            "tinyhttpd",
            version,
            sequence,
            &files,
            port,
        );
        request.run = Self::run(
            vec!["-p".into(), port.to_string(), "-d".into(), "www".into()],
            &[("TINYHTTPD_BANNER", "ferry's tinyhttpd")],
        );
        let settings = CBuild {
            static_link: true,
            ..CBuild::default()
        };
        sign(
            &build_c(&request, &settings, &self.root.join("out"))
                .unwrap()
                .packaged,
            self.key,
        )
    }
}

/// GET `path` on 127.0.0.1:`port`: the body, or `None` when nothing answers.
fn get(port: u16, path: &str) -> Option<String> {
    let mut stream = TcpStream::connect(("127.0.0.1", port)).ok()?;
    let _ = stream.set_read_timeout(Some(Duration::from_secs(10)));
    let mut response = String::new();
    stream
        .write_all(format!("GET {path} HTTP/1.0\r\nHost: localhost\r\n\r\n").as_bytes())
        .and_then(|_| stream.read_to_string(&mut response))
        .ok()?;
    response.split("\r\n\r\n").nth(1).map(str::to_owned)
}

/// Deploys releases to `device` through `manager` and waits for each outcome.
async fn deploy_and_wait(manager: &Manager, device: &str, release: &Release) -> Value {
    manager.publish(release).await;
    let m = &release.manifest;
    manager
        .post(
            "/v1/deployments",
            json!({ "service": m.service, "version": m.version.to_string(), "devices": [device] }),
        )
        .await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(180);
    loop {
        let found = manager.get(&format!("/v1/devices/{device}")).await;
        let result = &found["reported"]["last_result"];
        if result["service"] == m.service.as_str() && result["version"] == m.version.to_string() {
            return result.clone();
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "no result for {} {}: {found:#}",
            m.service,
            m.version
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// What both supervisors must do with the daemons on `device`.
async fn daemons_run_with_their_signed_arguments(
    manager: &Manager,
    device: &str,
    daemons: &Daemons<'_>,
) {
    let (greeter_port, httpd_port) = (free_port(), free_port());
    for release in [
        daemons.greeter("1.0.0", 1, greeter_port),
        daemons.tinyhttpd("1.0.0", 1, httpd_port),
    ] {
        let result = deploy_and_wait(manager, device, &release).await;
        assert_eq!(result["outcome"], "installed", "{result}");
    }
    assert_eq!(get(greeter_port, "/").as_deref(), Some("Hello, fleet\n"));
    assert!(
        get(greeter_port, "/version")
            .unwrap()
            .starts_with("greeter 1.0.0 "),
        "the version was not stamped"
    );
    assert_eq!(
        get(httpd_port, "/").as_deref(),
        Some("<p>served by tinyhttpd</p>\n")
    );
    assert_eq!(
        get(httpd_port, "/version").as_deref(),
        Some("tinyhttpd 1.0.0 ferry's tinyhttpd\n")
    );

    // Only the arguments change (another port): a new signed release.
    let moved = free_port();
    let result = deploy_and_wait(manager, device, &daemons.tinyhttpd("1.0.1", 2, moved)).await;
    assert_eq!(result["outcome"], "installed", "{result}");
    assert_eq!(
        get(moved, "/").as_deref(),
        Some("<p>served by tinyhttpd</p>\n")
    );
    assert!(get(httpd_port, "/").is_none(), "the old one still serves");

    // Whoever relays the release rewrites its arguments (keeping the
    // signature): the device refuses it, and 1.0.1 goes on serving.
    let honest = daemons.tinyhttpd("1.0.2", 3, moved);
    let mut json: Value = serde_json::from_slice(&honest.envelope.to_json()).unwrap();
    let mut manifest = honest.manifest.clone();
    manifest.run.args = vec!["-p".into(), moved.to_string(), "-d".into(), "/".into()];
    use base64::Engine as _;
    json["manifest"] = base64::engine::general_purpose::STANDARD
        .encode(manifest.to_json())
        .into();
    let rewritten = Release {
        envelope: ferry_protocol::Envelope::from_json(json.to_string().as_bytes()).unwrap(),
        ..honest
    };
    let result = deploy_and_wait(manager, device, &rewritten).await;
    assert_eq!(result["outcome"], "rejected", "{result}");
    assert!(
        result["reason"]
            .as_str()
            .unwrap()
            .contains("does not verify"),
        "{result}"
    );
    assert_eq!(
        get(moved, "/").as_deref(),
        Some("<p>served by tinyhttpd</p>\n")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn armv7_agent_runs_daemons_with_their_signed_arguments_under_its_own_supervisor() {
    let agent_binary = armv7_agent_binary();
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    let key = SecretKey::from_seed(&[8; 32]);
    let trust = root.join("ops.pub");
    std::fs::write(&trust, key.public_key().to_text()).unwrap();
    let manager = Manager::start(&root.join("manager"), addr(free_port()), addr(free_port())).await;
    let password = manager.add_device("arm-d", &[]).await;
    let _agent = ProcessAgent::start(
        &agent_binary,
        root,
        "arm-d",
        &password,
        manager.endpoints(),
        &trust,
    );
    manager
        .wait_device("arm-d", "online", |d| d["online"] == true)
        .await;
    let daemons = Daemons::new(root, &key);
    daemons_run_with_their_signed_arguments(&manager, "arm-d", &daemons).await;
    manager.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn armv7_agent_runs_daemons_with_their_signed_arguments_under_systemd() {
    let agent_binary = armv7_agent_binary();
    let container = ferry_e2e::container::SystemdContainer::start();
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    let key = SecretKey::from_seed(&[9; 32]);
    let manager = Manager::start(&root.join("manager"), addr(free_port()), addr(free_port())).await;
    let password = manager.add_device("arm-s", &[]).await;

    // The ARM agent as a systemd service, from the project's own unit; the
    // container shares this machine's network, so the manager is on
    // loopback. The agent is a dynamically linked ARM program: qemu finds
    // its C library through QEMU_LD_PREFIX (a drop-in, as a device needs
    // none). Its services are static.
    let config = format!(
        "device_id = \"arm-s\"\ndata_dir = \"/var/lib/ferry\"\nsupervisor = \"systemd\"\nhealth_interval = \"2s\"\n\
         {}[trust]\nkeys = [\"/etc/ferry/ops.pub\"]\n",
        manager.endpoints().broker_table(&password)
    );
    container.start_agent(
        &agent_binary,
        &config,
        &key.public_key().to_text(),
        &[("QEMU_LD_PREFIX", ferry_e2e::ARM_SYSROOT)],
    );
    manager
        .wait_device("arm-s", "online", |d| d["online"] == true)
        .await;
    let daemons = Daemons::new(root, &key);
    daemons_run_with_their_signed_arguments(&manager, "arm-s", &daemons).await;
    // systemd runs them: the unit carries the signed words.
    let unit =
        std::fs::read_to_string(container.host_path("/etc/systemd/system/ferry-tinyhttpd.service"))
            .unwrap();
    assert!(unit.contains(r#""-p" ""#), "{unit}");
    assert!(
        unit.contains("Environment=\"TINYHTTPD_BANNER=ferry's tinyhttpd\""),
        "{unit}"
    );
    assert_eq!(
        container.show("ferry-greeter.service")["ActiveState"],
        "active"
    );
    manager.stop().await;
}
