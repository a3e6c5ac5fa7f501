//! A device in a temporary directory, with real releases of a real C service
//! built by the machine's compilers, installed through the agent library.
#![allow(dead_code)]

pub mod artifacts;
pub mod broker;
pub mod container;
pub mod torture;

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use ferry_agent::config::Config;
use ferry_agent::device;
use ferry_agent::install::{ArtifactSource, InstallRequest, Installer};
use ferry_agent::report::{Report, Reporter};
use ferry_cross::{PackageRequest, package};
use ferry_protocol::manifest::ArtifactKind;
use ferry_protocol::messages::{DeploymentResult, Event, Step, StepStatus};
use ferry_protocol::{Envelope, Manifest, RelPath, SecretKey, ServiceName, Sha256Digest, Target};
use tokio::sync::mpsc::UnboundedReceiver;

pub const ARM: &str = "armv7-unknown-linux-gnueabihf";

/// A small deterministic generator (xorshift): seeded tests repeat exactly.
pub struct Seeded(pub u64);

impl Seeded {
    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

/// Whether process `pid` runs (and is not a zombie).
pub fn pid_alive(pid: u32) -> bool {
    Path::new(&format!("/proc/{pid}")).exists()
        && !fs::read_to_string(format!("/proc/{pid}/stat"))
            .unwrap_or_default()
            .contains(") Z ")
}

/// The program process `pid` runs.
pub fn exe_of(pid: u32) -> String {
    fs::read_link(format!("/proc/{pid}/exe"))
        .map(|p| p.display().to_string())
        .unwrap_or_default()
}

/// How to build a release's program.
#[derive(Debug, Clone, Copy)]
pub struct Build {
    /// Exit at once instead of serving.
    pub crash: bool,
    /// Build with the ARM cross-compiler instead of the host's.
    pub arm: bool,
    /// Print 10 MiB to stdout at start (an access log's worth), then serve.
    pub chatty: bool,
}

impl Build {
    pub const SERVE: Build = Build {
        crash: false,
        arm: false,
        chatty: false,
    };
    pub const CRASH: Build = Build {
        crash: true,
        arm: false,
        chatty: false,
    };
    pub const ARM: Build = Build {
        crash: false,
        arm: true,
        chatty: false,
    };
    pub const CHATTY: Build = Build {
        crash: false,
        arm: false,
        chatty: true,
    };
}

/// A signed release on disk.
#[derive(Debug, Clone)]
pub struct Release {
    pub manifest: Manifest,
    pub envelope: Envelope,
    pub artifact: PathBuf,
    /// The directory it was packaged from, when the rig built it.
    pub tree: Option<PathBuf>,
}

/// The rigs' temporary directories are private (0700), out of reach of a
/// service user of its own: most tests run the services as the agent
/// ([`Rig::isolated`] does not).
const SHARED_AGENT_USER: &str = "isolate_services = false\n";

pub struct Rig {
    pub tmp: tempfile::TempDir,
    pub key: SecretKey,
    pub config: Config,
    pub installer: Installer,
    pub events: UnboundedReceiver<Report>,
    /// The file the test service records its life in, as the service sees it.
    pub out: PathBuf,
    /// The same file as this test sees it (differs inside a container).
    pub out_host: PathBuf,
}

impl Rig {
    /// A device of the host's own target, direct supervisor.
    pub fn new() -> Self {
        Self::with_target(ferry_agent::BUILD_TARGET)
    }

    /// A device that says it is `target`.
    pub fn with_target(target: &str) -> Self {
        Self::build(target, SHARED_AGENT_USER, |_| {})
    }

    /// A device with the default isolation: a service whose manifest names
    /// no user runs as a user of its own (the agent must run as root). The
    /// rig's directory is opened to others for that user to reach its
    /// program, and its record file made writable to it.
    pub fn isolated() -> Self {
        use std::os::unix::fs::PermissionsExt;
        let rig = Self::build(ferry_agent::BUILD_TARGET, "", |data| {
            let tmp = data.parent().unwrap();
            fs::set_permissions(tmp, fs::Permissions::from_mode(0o755)).unwrap();
            let out = tmp.join("service.out");
            fs::write(&out, "").unwrap();
            fs::set_permissions(&out, fs::Permissions::from_mode(0o666)).unwrap();
        });
        fs::set_permissions(rig.data(), fs::Permissions::from_mode(0o755)).unwrap();
        rig
    }

    /// A rig whose data directory is prepared by `prepare` (given its path,
    /// not yet created) before the agent first opens it: a small filesystem
    /// mounted there, say.
    pub fn with_data_dir(prepare: impl FnOnce(&Path)) -> Self {
        Self::build(ferry_agent::BUILD_TARGET, SHARED_AGENT_USER, prepare)
    }

    /// `extra` goes to the top of the agent's configuration.
    fn build(target: &str, extra: &str, prepare: impl FnOnce(&Path)) -> Self {
        let tmp = tempfile::tempdir().unwrap();
        prepare(&tmp.path().join("data"));
        let key = SecretKey::from_seed(&[42; 32]);
        let pub_path = tmp.path().join("ops.pub");
        fs::write(&pub_path, key.public_key().to_text()).unwrap();
        let config_path = tmp.path().join("agent.toml");
        fs::write(
            &config_path,
            format!(
                "device_id = \"test-device\"\ndata_dir = \"{}\"\nsupervisor = \"direct\"\ntarget = \"{target}\"\n{extra}[trust]\nkeys = [\"{}\"]\n",
                tmp.path().join("data").display(),
                pub_path.display()
            ),
        )
        .unwrap();
        let config = Config::load(&config_path).unwrap();
        let (reporter, events) = Reporter::channel();
        let installer = device::installer(&config, reporter, None).unwrap();
        let out = tmp.path().join("service.out");
        Self {
            tmp,
            key,
            config,
            installer,
            events,
            out_host: out.clone(),
            out,
        }
    }

    pub fn data(&self) -> PathBuf {
        self.config.data_dir.clone()
    }

    /// Builds, packages and signs release `version` of service `api`, with a
    /// 1-second health window; `tweak` may change the manifest before signing.
    pub fn release(
        &self,
        version: &str,
        sequence: u64,
        build: Build,
        tweak: impl FnOnce(&mut Manifest),
    ) -> Release {
        self.release_with(version, sequence, build, &[], tweak)
    }

    /// Like [`Rig::release`], with `extra` files (path in the release, contents).
    pub fn release_with(
        &self,
        version: &str,
        sequence: u64,
        build: Build,
        extra: &[(String, Vec<u8>)],
        tweak: impl FnOnce(&mut Manifest),
    ) -> Release {
        let tree = self.tmp.path().join(format!("tree-{version}-{sequence}"));
        fs::create_dir_all(tree.join("bin")).unwrap();
        for (path, bytes) in extra {
            let path = tree.join(path);
            fs::create_dir_all(path.parent().unwrap()).unwrap();
            fs::write(path, bytes).unwrap();
        }
        fs::write(tree.join("etc.conf"), format!("version = {version}\n")).unwrap();
        compile(&tree.join("bin/api"), version, &self.out, build);
        let target = if build.arm {
            ARM.to_string()
        } else {
            self.config.target().unwrap().to_string()
        };
        let packaged = package(
            &PackageRequest {
                dir: tree.clone(),
                service: ServiceName::new("api").unwrap(),
                version: version.parse().unwrap(),
                entrypoint: RelPath::new("bin/api").unwrap(),
                sequence,
                target: Target::new(target).unwrap(),
                kind: Some(ArtifactKind::C),
                expires: None,
                build: Default::default(),
                health: Default::default(),
                reload: Vec::new(),
                run: Default::default(),
            },
            &self.tmp.path().join(format!("out-{version}-{sequence}")),
        )
        .unwrap();
        let mut manifest = packaged.manifest;
        manifest.health.window_secs = 1;
        tweak(&mut manifest);
        Release {
            tree: Some(tree),
            ..self.sign(manifest, packaged.artifact)
        }
    }

    /// Signs `manifest` with the trusted key.
    pub fn sign(&self, manifest: Manifest, artifact: PathBuf) -> Release {
        let envelope = Envelope::sign(manifest.to_json(), &[&self.key]).unwrap();
        Release {
            manifest,
            envelope,
            artifact,
            tree: None,
        }
    }

    /// `base` re-signed with `bytes` as its artifact (size and hash updated).
    pub fn with_artifact(&self, base: &Release, name: &str, bytes: &[u8]) -> Release {
        let path = self.tmp.path().join(name);
        fs::write(&path, bytes).unwrap();
        let mut manifest = base.manifest.clone();
        manifest.artifact.sha256 = Sha256Digest::of(bytes);
        manifest.artifact.size = bytes.len() as u64;
        self.sign(manifest, path)
    }

    /// Installs `release` downloading its artifact from `url`.
    pub async fn install_from(&mut self, release: &Release, url: &str) -> DeploymentResult {
        self.installer
            .install(InstallRequest {
                envelope: release.envelope.clone(),
                source: ArtifactSource::Remote {
                    url: Some(url.to_owned()),
                },
                rollout: None,
                retry_failed: true,
            })
            .await
            .unwrap()
    }

    pub async fn install(&mut self, release: &Release) -> DeploymentResult {
        self.install_envelope(release.envelope.clone(), &release.artifact)
            .await
    }

    pub async fn install_envelope(
        &mut self,
        envelope: Envelope,
        artifact: &Path,
    ) -> DeploymentResult {
        self.installer
            .install(InstallRequest {
                envelope,
                source: ArtifactSource::File(artifact.to_owned()),
                rollout: None,
                retry_failed: false,
            })
            .await
            .unwrap()
    }

    /// Events reported since the last call.
    pub fn take_events(&mut self) -> Vec<Event> {
        let mut events = Vec::new();
        while let Ok(report) = self.events.try_recv() {
            if let Report::Event(e) = report {
                events.push(e);
            }
        }
        events
    }

    /// The step that failed in the events since the last call, with its reason.
    pub fn failed_step(&mut self) -> Option<(Step, String)> {
        self.take_events()
            .into_iter()
            .filter(|e| e.status == StepStatus::Failed)
            .map(|e| (e.step, e.reason.unwrap_or_default()))
            .next()
    }

    /// What the test service recorded: (event, version, pid) lines.
    pub fn records(&self) -> Vec<(String, String, u32)> {
        fs::read_to_string(&self.out_host)
            .unwrap_or_default()
            .lines()
            .filter_map(|l| {
                let mut f = l.split(' ');
                Some((f.next()?.into(), f.next()?.into(), f.next()?.parse().ok()?))
            })
            .collect()
    }

    /// The values process `pid` recorded for `event` ("arg", "env", "cwd",
    /// "stop"), in order, unescaped.
    pub fn values(&self, event: &str, pid: u32) -> Vec<String> {
        let prefix = format!("{event} ");
        fs::read_to_string(&self.out_host)
            .unwrap_or_default()
            .lines()
            .filter_map(|l| l.strip_prefix(&prefix))
            .filter_map(|rest| {
                let (_version, rest) = rest.split_once(' ')?;
                let (p, value) = rest.split_once(' ')?;
                (p.parse::<u32>().ok()? == pid).then(|| unescape(value))
            })
            .collect()
    }

    /// The service processes that recorded a start and still run.
    pub fn live_service_pids(&self) -> Vec<u32> {
        self.records()
            .iter()
            .filter(|r| r.0 == "start" && pid_alive(r.2))
            .map(|r| r.2)
            .collect()
    }

    /// The pid of the running service process, per the supervisor.
    pub async fn running_pid(&self) -> Option<u32> {
        let api = ServiceName::new("api").unwrap();
        self.installer.supervisor().status(&api).await.ok()?.pid
    }

    /// Everything under `services/` (names, link targets, file hashes) and
    /// the committed services: what "nothing changed" compares.
    pub fn snapshot(&self) -> Vec<String> {
        let mut lines = Vec::new();
        walk(&self.data().join("services"), &self.data(), &mut lines);
        lines.sort();
        let state = fs::read_to_string(self.data().join("state.json")).unwrap_or_default();
        let state: serde_json::Value = serde_json::from_str(&state).unwrap_or_default();
        let services = state
            .get("services")
            .cloned()
            .unwrap_or_else(|| serde_json::json!({}));
        lines.push(format!("state.services = {services}"));
        lines.push(format!(
            "journal = {}",
            self.data().join("journal.json").exists()
        ));
        lines
    }
}

impl Drop for Rig {
    /// Stops the services this rig started.
    fn drop(&mut self) {
        kill_services(&self.data());
    }
}

/// Stops every service process named by a pid file under `data/run`.
pub fn kill_services(data: &Path) {
    ferry_agent::supervisor::direct::stop_leftovers(&data.join("run"));
}

fn walk(dir: &Path, root: &Path, out: &mut Vec<String>) {
    let Ok(entries) = fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let path = entry.path();
        let rel = path.strip_prefix(root).unwrap().display().to_string();
        let meta = fs::symlink_metadata(&path).unwrap();
        if meta.file_type().is_symlink() {
            out.push(format!(
                "{rel} -> {}",
                fs::read_link(&path).unwrap().display()
            ));
        } else if meta.is_dir() {
            out.push(format!("{rel}/"));
            walk(&path, root, out);
        } else {
            out.push(format!(
                "{rel} {}",
                Sha256Digest::of(&fs::read(&path).unwrap())
            ));
        }
    }
}

/// Compiles the test service with the host's `cc` or the ARM cross-compiler.
pub fn compile(binary: &Path, version: &str, out: &Path, build: Build) {
    let source = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/support/service.c");
    let compiler = if build.arm {
        "arm-linux-gnueabihf-gcc"
    } else {
        "cc"
    };
    let mut cmd = Command::new(compiler);
    cmd.arg("-O2")
        .arg(format!("-DVERSION=\"{version}\""))
        .arg(format!("-DOUT=\"{}\"", out.display()));
    if build.crash {
        cmd.arg("-DCRASH");
    }
    if build.chatty {
        cmd.arg("-DCHATTY");
    }
    let status = cmd
        .arg(&source)
        .arg("-o")
        .arg(binary)
        .status()
        .unwrap_or_else(|e| panic!("{compiler} not found ({e}); run scripts/setup"));
    assert!(status.success(), "{compiler} failed");
}

/// Waits (up to 5 s) until `check` holds, for effects of other processes.
pub async fn eventually(what: &str, check: impl FnMut() -> bool) {
    eventually_for(what, std::time::Duration::from_secs(5), check).await;
}

/// Waits (up to `limit`) until `check` holds.
pub async fn eventually_for(
    what: &str,
    limit: std::time::Duration,
    mut check: impl FnMut() -> bool,
) {
    let deadline = std::time::Instant::now() + limit;
    while !check() {
        assert!(
            std::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
}

/// Undoes the test service's escaping of `\\` and newlines.
fn unescape(value: &str) -> String {
    let mut out = String::new();
    let mut chars = value.chars();
    while let Some(c) = chars.next() {
        match (c, c == '\\') {
            (_, true) => match chars.next() {
                Some('n') => out.push('\n'),
                Some(other) => out.push(other),
                None => out.push('\\'),
            },
            (c, false) => out.push(c),
        }
    }
    out
}

/// The run settings a signed manifest may carry, hostile-looking values
/// included: each reaches the process exactly, and nothing of the agent's
/// environment does.
pub fn run_settings() -> ferry_protocol::manifest::RunSettings {
    use ferry_protocol::{EnvName, RelPath};
    ferry_protocol::manifest::RunSettings {
        args: vec![
            "--root".into(),
            "two words".into(),
            "$HOME".into(),
            "100%n".into(),
            "say \"hi\" \\o/".into(),
            "line\nbreak".into(),
            "".into(),
        ],
        env: [
            ("GREETING", "hello world"),
            ("TRICKY", "a $b %i \"c\"\nd"),
            ("PATH", "/opt/app/bin:/usr/bin:/bin"),
        ]
        .into_iter()
        .map(|(k, v)| (EnvName::new(k).unwrap(), v.to_owned()))
        .collect(),
        workdir: Some(RelPath::new("bin").unwrap()),
        user: None,
        writable: Vec::new(),
        stop_signal: Some(ferry_protocol::manifest::ServiceSignal::Quit),
        stop_timeout_secs: Some(3),
    }
}
