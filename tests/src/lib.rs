//! Harness for end-to-end tests: a manager (`ferry serve`, in-process or
//! as a process of its own, on free loopback ports), agents (the agent
//! library's daemon, in-process, each with its own data directory and direct
//! supervisor, or the ARMv7 device binary as a process under qemu-arm), and
//! signed releases of a real C service built with the machine's `cc`.

use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use ferry::serve::{ServeConfig, serve};
use ferry_cross::{PackageRequest, package};
use ferry_protocol::manifest::ArtifactKind;
use ferry_protocol::{Envelope, Manifest, RelPath, SecretKey, ServiceName, Target};
use serde_json::{Value, json};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

pub mod nats;
pub mod postgres;
pub mod simulator;

/// A real systemd as PID 1 in a throwaway container (the agent's tests
/// use the same file).
#[path = "../../agent/tests/support/container.rs"]
pub mod container;

/// A port nothing listens on right now.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// The name of an in-process manager's threads.
pub const MANAGER_THREAD: &str = "ferry-manager";

/// A running manager.
pub struct Manager {
    pub http: SocketAddr,
    pub mqtt: SocketAddr,
    pub data_dir: PathBuf,
    pub token: String,
    /// The fleet CA (PEM) when the manager serves TLS.
    pub ca_pem: Option<String>,
    running: Running,
    client: reqwest::Client,
}

/// How a manager runs.
enum Running {
    /// On a runtime and thread of its own in this process.
    InProcess {
        stop: Option<oneshot::Sender<()>>,
        thread: Option<std::thread::JoinHandle<()>>,
    },
    /// As `ferry serve`, a process of its own (that a test can kill).
    Process(std::process::Child),
    /// Started by something else (a script), which stops it.
    Elsewhere,
}

/// Runs cargo in the workspace with `args` (a build that is a no-op when
/// up to date); the path `built` under the workspace.
fn cargo_build(args: &[&str], built: &str) -> PathBuf {
    let workspace = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let status = Command::new(cargo)
        .current_dir(&workspace)
        .args(args)
        .status()
        .expect("cannot run cargo");
    assert!(status.success(), "cargo {} failed", args.join(" "));
    let binary = workspace.join(built);
    assert!(binary.is_file(), "{} was not built", binary.display());
    binary
}

/// The `ferry` binary, built like the manager's own tests build it (a no-op
/// when it is up to date).
pub fn ferry_binary() -> PathBuf {
    cargo_build(
        &["build", "--locked", "-p", "ferry", "--bin", "ferry"],
        "target/debug/ferry",
    )
}

/// The `ferry` binary optimised, for benchmarks that run the manager as a
/// process of its own.
pub fn release_ferry_binary() -> PathBuf {
    cargo_build(
        &[
            "build",
            "--locked",
            "--release",
            "-p",
            "ferry",
            "--bin",
            "ferry",
        ],
        "target/release/ferry",
    )
}

/// A manager's configuration for tests: the defaults, without TLS.
pub fn plaintext_config(
    data_dir: &Path,
    mqtt: SocketAddr,
    http: SocketAddr,
    broker: Option<String>,
) -> ServeConfig {
    ServeConfig {
        mqtt_listen: mqtt,
        http_listen: http,
        data_dir: data_dir.to_owned(),
        broker,
        auth_callout: None,
        database: None,
        public_url: None,
        offline_after: Duration::from_secs(90),
        http_limits: Default::default(),
        device_limits: Default::default(),
        tls: false,
        public_names: Vec::new(),
        device_cert_lifetime: ferry::serve::DEVICE_CERT_LIFETIME,
    }
}

/// What a device proves itself with, from what `POST /v1/devices`
/// answered: its enrolment token (a manager serving TLS), or its password.
pub fn credential(created: &Value) -> String {
    created["enrol_token"]
        .as_str()
        .or(created["password"].as_str())
        .unwrap_or_else(|| panic!("no credential in {created}"))
        .to_owned()
}

/// A manager's configuration for tests: as `ferry serve` runs by default,
/// MQTT and HTTP over TLS with devices proving themselves by certificate;
/// with an external `broker` (mosquitto here, which knows no fleet CA),
/// plain text and passwords.
pub fn test_config(
    data_dir: &Path,
    mqtt: SocketAddr,
    http: SocketAddr,
    broker: Option<String>,
) -> ServeConfig {
    let tls = broker.is_none();
    ServeConfig {
        tls,
        ..plaintext_config(data_dir, mqtt, http, broker)
    }
}

impl Manager {
    /// Where its devices connect, on its embedded broker.
    pub fn endpoints(&self) -> Endpoints {
        Endpoints {
            mqtt: self.mqtt,
            http: Some(self.http),
            ca_pem: self.ca_pem.clone(),
        }
    }

    /// The process id, when the manager runs as a process of its own.
    pub fn pid(&self) -> Option<u32> {
        match &self.running {
            Running::Process(child) => Some(child.id()),
            Running::InProcess { .. } | Running::Elsewhere => None,
        }
    }

    /// Rollout `id` once its state is `state`; panics with the rollout if
    /// it is not within `limit`.
    pub async fn wait_rollout(&self, id: i64, state: &str, limit: Duration) -> Value {
        let deadline = tokio::time::Instant::now() + limit;
        loop {
            let rollout = self.get(&format!("/v1/rollouts/{id}")).await;
            if rollout["state"] == state {
                return rollout;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "rollout {id} never {state}:\n{rollout:#}"
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// How many registered devices are online.
    pub async fn online_devices(&self) -> usize {
        let devices = self.get("/v1/devices").await;
        devices
            .as_array()
            .map_or(0, |all| all.iter().filter(|d| d["online"] == true).count())
    }

    /// Registers `ids` (no tags), a few requests at a time; returns each
    /// device with its password, in order.
    pub async fn add_devices(&self, ids: &[String]) -> Vec<(String, String)> {
        let mut registered = Vec::with_capacity(ids.len());
        for chunk in ids.chunks(16) {
            let mut requests = tokio::task::JoinSet::new();
            for (i, id) in chunk.iter().enumerate() {
                let request = self
                    .request(reqwest::Method::POST, "/v1/devices")
                    .json(&json!({ "device_id": id, "tags": [] }));
                requests.spawn(async move {
                    let created: Value = request.send().await.unwrap().json().await.unwrap();
                    (i, credential(&created))
                });
            }
            let mut passwords = requests.join_all().await;
            passwords.sort();
            registered.extend(
                chunk
                    .iter()
                    .cloned()
                    .zip(passwords.into_iter().map(|(_, p)| p)),
            );
        }
        registered
    }

    /// The value of one sample on `/metrics`, e.g.
    /// `ferry_mqtt_block_bytes_sent_total` or `name{label="x"}`; 0 if absent.
    pub async fn metric(&self, series: &str) -> f64 {
        let text = self
            .request(reqwest::Method::GET, "/metrics")
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        text.lines()
            .find_map(|line| line.strip_prefix(series)?.strip_prefix(' '))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(0.0)
    }

    /// Starts a manager with the embedded broker, keeping state in
    /// `data_dir`, over TLS as by default: its devices enrol for
    /// certificates.
    pub async fn start(data_dir: &Path, mqtt: SocketAddr, http: SocketAddr) -> Self {
        Self::start_with(data_dir, mqtt, http, None).await
    }

    /// Starts a manager with `--insecure-plaintext`: for what checks the
    /// plain-text path itself (device passwords on the embedded broker).
    pub async fn start_plaintext(data_dir: &Path, mqtt: SocketAddr, http: SocketAddr) -> Self {
        Self::start_configured(plaintext_config(data_dir, mqtt, http, None)).await
    }

    /// Starts a manager ([`test_config`]); with `broker`, against that
    /// external broker.
    pub async fn start_with(
        data_dir: &Path,
        mqtt: SocketAddr,
        http: SocketAddr,
        broker: Option<String>,
    ) -> Self {
        Self::start_configured(test_config(data_dir, mqtt, http, broker)).await
    }

    /// Starts a manager with exactly this configuration.
    pub async fn start_configured(config: ServeConfig) -> Self {
        // The manager and the HTTP clients in this process use rustls with ring.
        let _ = rustls::crypto::ring::default_provider().install_default();
        let (data_dir, mqtt, http, tls, embedded) = (
            config.data_dir.clone(),
            config.mqtt_listen,
            config.http_listen,
            config.tls,
            config.broker.is_none(),
        );
        // The manager gets a runtime of its own, as it would a process of its
        // own: stopping it ends every task and connection it had.
        let (stop, stopped) = oneshot::channel::<()>();
        let thread = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                // Benchmarks find the manager's CPU time by this name.
                .thread_name(MANAGER_THREAD)
                .enable_all()
                .build()
                .unwrap();
            runtime
                .block_on(serve(config, async {
                    let _ = stopped.await;
                }))
                .unwrap();
            runtime.shutdown_timeout(Duration::from_secs(2));
        });
        let running = Running::InProcess {
            stop: Some(stop),
            thread: Some(thread),
        };
        let manager = Self::when_up(data_dir, mqtt, http, tls, running).await;
        if embedded {
            manager.wait_subscribed().await;
        }
        manager
    }

    /// Waits until the manager's own MQTT client has subscribed to the
    /// devices' topics: a device message published before that reaches no
    /// one (a TLS handshake makes that window wide enough to matter).
    pub async fn wait_subscribed(&self) {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        while self.metric("ferry_broker_subscribed").await != 1.0 {
            assert!(
                tokio::time::Instant::now() < deadline,
                "the manager never subscribed to its broker"
            );
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    }

    /// Starts `ferry serve` (the binary from [`ferry_binary`]) as a process,
    /// with the embedded broker, keeping state in `data_dir`, over TLS as
    /// by default.
    pub async fn start_process(
        binary: &Path,
        data_dir: &Path,
        mqtt: SocketAddr,
        http: SocketAddr,
    ) -> Self {
        Self::start_process_with(binary, data_dir, mqtt, http, true).await
    }

    /// [`Manager::start_process`], serving TLS (as `ferry serve` does by
    /// default) when `tls`.
    pub async fn start_process_with(
        binary: &Path,
        data_dir: &Path,
        mqtt: SocketAddr,
        http: SocketAddr,
        tls: bool,
    ) -> Self {
        let log = data_dir.with_extension("log");
        Self::start_process_args(binary, data_dir, mqtt, http, tls, &[], &log).await
    }

    /// [`Manager::start_process_with`], with more arguments for `ferry
    /// serve` and its log in `log`.
    pub async fn start_process_args(
        binary: &Path,
        data_dir: &Path,
        mqtt: SocketAddr,
        http: SocketAddr,
        tls: bool,
        more: &[String],
        log: &Path,
    ) -> Self {
        std::fs::create_dir_all(data_dir).unwrap();
        let child = Command::new(binary)
            .arg("serve")
            .args(["--mqtt-listen", &mqtt.to_string()])
            .args(["--http-listen", &http.to_string()])
            .args((!tls).then_some("--insecure-plaintext"))
            .arg("--data-dir")
            .arg(data_dir)
            .args(more)
            .stdout(std::process::Stdio::null())
            .stderr(
                std::fs::File::options()
                    .create(true)
                    .append(true)
                    .open(log)
                    .unwrap(),
            )
            .spawn()
            .unwrap();
        let manager = Self::when_up(
            data_dir.to_owned(),
            mqtt,
            http,
            tls,
            Running::Process(child),
        )
        .await;
        manager.wait_subscribed().await;
        manager
    }

    /// A manager something else started (over TLS, at `http`, keeping its
    /// state in `data_dir`), once it answers; it is not stopped here.
    pub async fn attach(data_dir: &Path, http: SocketAddr) -> Self {
        let unknown = SocketAddr::from(([127, 0, 0, 1], 0));
        Self::when_up(data_dir.to_owned(), unknown, http, true, Running::Elsewhere).await
    }

    async fn when_up(
        data_dir: PathBuf,
        mqtt: SocketAddr,
        http: SocketAddr,
        tls: bool,
        running: Running,
    ) -> Self {
        // HTTP clients in this process use rustls with ring.
        let _ = rustls::crypto::ring::default_provider().install_default();
        let mut client = reqwest::Client::new();
        let mut ca_pem = None;
        let scheme = if tls { "https" } else { "http" };
        let url = format!("{scheme}://{http}/healthz");
        for _ in 0..400 {
            // With TLS, its CA (written before it listens) is trusted alone.
            if tls && ca_pem.is_none() {
                if let Ok(pem) = std::fs::read_to_string(data_dir.join("ca.pem")) {
                    let certs = reqwest::Certificate::from_pem_bundle(pem.as_bytes()).unwrap();
                    client = reqwest::Client::builder()
                        .tls_certs_only(certs)
                        .build()
                        .unwrap();
                    ca_pem = Some(pem);
                }
            }
            if (!tls || ca_pem.is_some()) && client.get(&url).send().await.is_ok() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        let token = std::fs::read_to_string(data_dir.join("operator.token"))
            .unwrap()
            .trim()
            .to_owned();
        Self {
            http,
            mqtt,
            data_dir,
            token,
            ca_pem,
            running,
            client,
        }
    }

    /// Stops the manager, as a process exit would: every task and connection ends.
    pub async fn stop(mut self) {
        match &mut self.running {
            Running::InProcess { stop, thread } => {
                if let Some(stop) = stop.take() {
                    let _ = stop.send(());
                }
                if let Some(thread) = thread.take() {
                    let _ = tokio::task::spawn_blocking(move || thread.join()).await;
                }
            }
            Running::Process(child) => {
                use nix::sys::signal::{Signal, kill};
                use nix::unistd::Pid;
                let _ = kill(Pid::from_raw(child.id() as i32), Signal::SIGTERM);
                let _ = child.wait();
            }
            Running::Elsewhere => {}
        }
    }

    /// Kills a manager process with SIGKILL (what dropping it does): no
    /// shutdown of any kind.
    pub fn kill(self) {
        assert!(
            matches!(self.running, Running::Process(_)),
            "only a manager process can be killed"
        );
    }

    pub fn url(&self, path: &str) -> String {
        let scheme = if self.ca_pem.is_some() {
            "https"
        } else {
            "http"
        };
        format!("{scheme}://{}{path}", self.http)
    }

    /// A new HTTP client of its own (no connection shared with the
    /// harness's) that trusts this manager's CA when it serves TLS.
    pub fn new_client(&self) -> reqwest::Client {
        let builder = reqwest::Client::builder();
        match &self.ca_pem {
            Some(pem) => builder
                .tls_certs_only(reqwest::Certificate::from_pem_bundle(pem.as_bytes()).unwrap()),
            None => builder,
        }
        .build()
        .unwrap()
    }

    /// An authenticated request.
    pub fn request(&self, method: reqwest::Method, path: &str) -> reqwest::RequestBuilder {
        self.client
            .request(method, self.url(path))
            .bearer_auth(&self.token)
    }

    /// GET, expecting success, as JSON.
    pub async fn get(&self, path: &str) -> Value {
        let response = self
            .request(reqwest::Method::GET, path)
            .send()
            .await
            .unwrap();
        assert!(
            response.status().is_success(),
            "GET {path}: {}",
            response.status()
        );
        response.json().await.unwrap()
    }

    /// POST JSON, expecting success.
    pub async fn post(&self, path: &str, body: Value) -> Value {
        let response = self
            .request(reqwest::Method::POST, path)
            .json(&body)
            .send()
            .await
            .unwrap();
        let status = response.status();
        let body: Value = response.json().await.unwrap_or(Value::Null);
        assert!(status.is_success(), "POST {path}: {status} {body}");
        body
    }

    /// Registers a device; returns its password.
    pub async fn add_device(&self, id: &str, tags: &[&str]) -> String {
        let created = self
            .post("/v1/devices", json!({ "device_id": id, "tags": tags }))
            .await;
        credential(&created)
    }

    /// Publishes `release`, deploys it to `device` and waits until the
    /// device reports it installed.
    pub async fn deploy_and_wait(&self, release: &Release, device: &str) -> Value {
        self.publish(release).await;
        let (service, version) = (
            release.manifest.service.to_string(),
            release.manifest.version.to_string(),
        );
        self.post(
            "/v1/deployments",
            json!({ "service": service, "version": version, "devices": [device] }),
        )
        .await;
        self.wait_device(device, &format!("{service} {version} installed"), |d| {
            installed_version(d, &service).as_deref() == Some(version.as_str())
        })
        .await
    }

    /// Uploads a release's artifact, then its envelope.
    pub async fn publish(&self, release: &Release) {
        let bytes = std::fs::read(&release.artifact).unwrap();
        let sha = release.manifest.artifact.sha256;
        let put = self
            .request(reqwest::Method::PUT, &format!("/v1/artifacts/{sha}"))
            .body(bytes)
            .send()
            .await
            .unwrap();
        assert!(put.status().is_success(), "upload: {}", put.status());
        let post = self
            .request(reqwest::Method::POST, "/v1/releases")
            .body(release.envelope.to_json())
            .send()
            .await
            .unwrap();
        assert!(post.status().is_success(), "publish: {}", post.status());
    }

    /// How many times `device` committed `version` of `api`, from its events.
    pub async fn commits(&self, device: &str, version: &str) -> usize {
        let events = self.get(&format!("/v1/events?device={device}")).await;
        events
            .as_array()
            .unwrap()
            .iter()
            .filter(|e| {
                e["message"]["step"] == "commit"
                    && e["message"]["status"] == "succeeded"
                    && e["message"]["release"]["version"] == version
            })
            .count()
    }

    /// A device's view, once `check` holds (or panics after `limit`).
    pub async fn wait_device(&self, id: &str, what: &str, check: impl Fn(&Value) -> bool) -> Value {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
        loop {
            let device = self.get(&format!("/v1/devices/{id}")).await;
            if check(&device) {
                return device;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "timed out waiting for {id}: {what}\n{device:#}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

impl Drop for Manager {
    /// A manager process is killed with SIGKILL.
    fn drop(&mut self) {
        if let Running::Process(child) = &mut self.running {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// The version of `service` a device view says is installed.
pub fn installed_version(device: &Value, service: &str) -> Option<String> {
    device["reported"]["services"]
        .as_array()?
        .iter()
        .find(|s| s["service"] == service)
        .and_then(|s| s["version"].as_str())
        .map(str::to_owned)
}

/// An agent running in-process until dropped.
pub struct Agent {
    pub data_dir: PathBuf,
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<()>>,
}

/// Where an agent finds its manager: the broker, and the manager's HTTP
/// address when there is one (the only origin the agent sends its password
/// to; without it, artifacts come over MQTT). `mqtt` alone, or
/// `(mqtt, http)`, converts into one.
#[derive(Debug, Clone)]
pub struct Endpoints {
    pub mqtt: SocketAddr,
    pub http: Option<SocketAddr>,
    /// The fleet CA (PEM) of a manager serving TLS.
    pub ca_pem: Option<String>,
}

impl From<SocketAddr> for Endpoints {
    fn from(mqtt: SocketAddr) -> Self {
        Self {
            mqtt,
            http: None,
            ca_pem: None,
        }
    }
}

impl From<(SocketAddr, SocketAddr)> for Endpoints {
    fn from((mqtt, http): (SocketAddr, SocketAddr)) -> Self {
        Self {
            mqtt,
            http: Some(http),
            ca_pem: None,
        }
    }
}

impl Endpoints {
    /// MQTT options for a client of the test's own acting as `device`
    /// (client id and user name): over TLS with the device's certificate,
    /// its key kept in `data_dir` as an agent keeps it (an agent given
    /// the same directory is the same device), enrolled with `credential`
    /// (its enrolment token) or renewed; over plain MQTT with `credential`
    /// as its password.
    pub async fn device_options(
        &self,
        data_dir: &Path,
        device: &str,
        credential: &str,
    ) -> rumqttc::MqttOptions {
        let mut options = rumqttc::MqttOptions::new(device, "127.0.0.1", self.mqtt.port());
        let Some(ca) = &self.ca_pem else {
            options.set_credentials(device, credential);
            return options;
        };
        let layout = ferry_agent::layout::Layout::new(data_dir);
        let id = ferry_protocol::DeviceId::new(device).unwrap();
        let mut identity = ferry_agent::identity::Identity::load_or_create(&layout, &id).unwrap();
        let certificate = identity.client_certificate();
        let http =
            ferry_agent::device::http_client(Some(ca.as_str()), Some(certificate.clone())).unwrap();
        let manager = format!(
            "https://{}",
            self.http.expect("a TLS manager's HTTP address")
        );
        identity
            .enrol(&http, &manager.parse().unwrap(), Some(credential))
            .await
            .unwrap_or_else(|e| panic!("{device} cannot enrol: {e}"));
        options.set_credentials(device, "");
        let config = ferry_agent::tls::pinned_client_config(ca, Some(certificate)).unwrap();
        options.set_transport(rumqttc::Transport::tls_with_config(
            rumqttc::TlsConfiguration::Rustls(std::sync::Arc::new(config)),
        ));
        options
    }

    /// The agent's `[broker]` table for this device: over TLS, trusting
    /// the fleet CA alone and enrolling with `credential` (its enrolment
    /// token), when there is one; else with `credential` as its password.
    pub fn broker_table(&self, credential: &str) -> String {
        let (mqtt, http, ca) = match &self.ca_pem {
            Some(pem) => ("mqtts", "https", format!("ca_pem = \"\"\"\n{pem}\"\"\"\n")),
            None => ("mqtt", "http", String::new()),
        };
        let proof = if self.ca_pem.is_some() {
            format!("enrol_token = \"{credential}\"\n")
        } else {
            format!("password = \"{credential}\"\n")
        };
        let manager_url = self
            .http
            .map(|addr| format!("manager_url = \"{http}://{addr}\"\n"))
            .unwrap_or_default();
        format!(
            "[broker]\nurl = \"{mqtt}://{}\"\n{proof}{manager_url}{ca}",
            self.mqtt
        )
    }
}

/// An agent configuration for tests, on `supervisor` with health reports
/// every `health_interval` (the agent's default when `None`).
pub fn agent_config(
    data_dir: &Path,
    device: &str,
    password: &str,
    at: Endpoints,
    trust: &Path,
    supervisor: &str,
    health_interval: Option<&str>,
) -> String {
    let health = health_interval
        .map(|h| format!("health_interval = \"{h}\"\n"))
        .unwrap_or_default();
    // QEMU_LD_PREFIX: on this machine an ARM agent's dynamically linked ARM
    // services find their C library through it, as a device's would at `/`.
    // The tests' directories are private (0700), out of reach of a service
    // user of its own: the services run as the agent.
    format!(
        "device_id = \"{device}\"\ndata_dir = \"{}\"\nsupervisor = \"{supervisor}\"\n{health}\
         pass_env = [\"QEMU_LD_PREFIX\"]\nisolate_services = false\n{}[trust]\nkeys = [\"{}\"]\n",
        data_dir.display(),
        at.broker_table(password),
        trust.display()
    )
}

/// The agents the tests start: direct supervisor, 1 s health reports.
fn direct_agent_config(
    data_dir: &Path,
    device: &str,
    password: &str,
    at: Endpoints,
    trust: &Path,
) -> String {
    agent_config(data_dir, device, password, at, trust, "direct", Some("1s"))
}

impl Agent {
    /// Starts an agent for `device` against the manager's broker.
    pub fn start(
        dir: &Path,
        device: &str,
        password: &str,
        at: impl Into<Endpoints>,
        trust: &Path,
    ) -> Self {
        Self::start_with(dir, device, password, at, trust, "")
    }

    /// Starts an agent whose `[trust]` table is `trust` (say, a trust root
    /// instead of a key file), watching `inbox`.
    pub fn start_trusting(
        dir: &Path,
        device: &str,
        password: &str,
        at: impl Into<Endpoints>,
        trust: &str,
        inbox: &Path,
    ) -> Self {
        let data_dir = dir.join(format!("agent-{device}"));
        let placeholder = Path::new("TRUST");
        let text = format!("inbox = \"{}\"\n", inbox.display())
            + &direct_agent_config(&data_dir, device, password, at.into(), placeholder)
                .replace("[trust]\nkeys = [\"TRUST\"]\n", trust);
        Self::start_config(data_dir, &text)
    }

    /// Starts an agent whose configuration ends with `extra` (TOML tables,
    /// e.g. `[limits]`): a device that differs from the others.
    pub fn start_with(
        dir: &Path,
        device: &str,
        password: &str,
        at: impl Into<Endpoints>,
        trust: &Path,
        extra: &str,
    ) -> Self {
        let data_dir = dir.join(format!("agent-{device}"));
        let text = direct_agent_config(&data_dir, device, password, at.into(), trust) + extra;
        Self::start_config(data_dir, &text)
    }

    /// Starts an agent on the configuration `text` (agent.toml), keeping
    /// its data in `data_dir` (which `text` names).
    pub fn start_config(data_dir: PathBuf, text: &str) -> Self {
        let config = ferry_agent::config::Config::parse(text).unwrap();
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(async move {
            ferry_agent::daemon::run_with(config, None, async {
                let _ = stopped.await;
            })
            .await
            .unwrap();
        });
        Self {
            data_dir,
            stop: Some(stop),
            task: Some(task),
        }
    }

    pub async fn stop(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(task) = self.task.take() {
            let _ = task.await;
        }
        kill_services(&self.data_dir);
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        if let Some(task) = &self.task {
            task.abort();
        }
        kill_services(&self.data_dir);
    }
}

/// Where the ARM C library lives; qemu-arm loads dynamically linked ARM
/// programs (the agent, C services) from there.
pub const ARM_SYSROOT: &str = "/usr/arm-linux-gnueabihf";

/// The ARMv7 device agent, built with the documented command
/// (`cargo agent-armv7`; a no-op when it is up to date).
pub fn armv7_agent_binary() -> PathBuf {
    assert!(
        Path::new("/proc/sys/fs/binfmt_misc/qemu-arm").exists(),
        "qemu-arm is not registered with binfmt_misc; run scripts/setup"
    );
    // The device profile and target have their own build directories, so
    // this does not wait on the lock of the `cargo test` running it.
    cargo_build(
        &["agent-armv7"],
        "target/armv7-unknown-linux-gnueabihf/device/ferry-agent",
    )
}

/// The agent binary for this machine as `cargo test` builds it for the
/// agent's own tests (a no-op when it is up to date): an agent a test can
/// SIGKILL.
pub fn agent_binary() -> PathBuf {
    host_agent("dev", "target/debug/ferry-agent")
}

/// The agent built for this machine with the device profile (what the
/// ARMv7 build is compared against).
pub fn native_agent_binary() -> PathBuf {
    host_agent("device", "target/device/ferry-agent")
}

fn host_agent(profile: &str, built: &str) -> PathBuf {
    let args = [
        "build",
        "--locked",
        "-p",
        "ferry-agent",
        "--bin",
        "ferry-agent",
    ];
    cargo_build(&[&args[..], &["--profile", profile]].concat(), built)
}

/// An agent binary running as its own process (the ARMv7 one under qemu),
/// stopped with SIGTERM when dropped; its log is `data_dir/../DEVICE.log`.
pub struct ProcessAgent {
    pub data_dir: PathBuf,
    pub log: PathBuf,
    child: std::process::Child,
}

impl ProcessAgent {
    pub fn start(
        binary: &Path,
        dir: &Path,
        device: &str,
        password: &str,
        at: impl Into<Endpoints>,
        trust: &Path,
    ) -> Self {
        Self::start_with(binary, dir, device, password, at, trust, "")
    }

    /// Starts an agent process whose configuration ends with `extra`; a
    /// second start for the same device continues its data directory and
    /// appends to its log.
    pub fn start_with(
        binary: &Path,
        dir: &Path,
        device: &str,
        password: &str,
        at: impl Into<Endpoints>,
        trust: &Path,
        extra: &str,
    ) -> Self {
        let data_dir = dir.join(format!("agent-{device}"));
        let config = dir.join(format!("{device}.toml"));
        std::fs::write(
            &config,
            direct_agent_config(&data_dir, device, password, at.into(), trust) + extra,
        )
        .unwrap();
        let log = dir.join(format!("{device}.log"));
        let log_file = || {
            std::fs::File::options()
                .create(true)
                .append(true)
                .open(&log)
                .unwrap()
        };
        let child = Command::new(binary)
            .arg("--config")
            .arg(&config)
            // Passed on to the services it starts (`pass_env`).
            .env("QEMU_LD_PREFIX", ARM_SYSROOT)
            .stdout(log_file())
            .stderr(log_file())
            .spawn()
            .unwrap();
        Self {
            data_dir,
            log,
            child,
        }
    }

    /// Kills the agent with SIGKILL, as a crash would (its services run on).
    pub fn kill(mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// The agent's process id (under emulation, qemu's).
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// What the agent logged so far (for failure messages).
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for ProcessAgent {
    fn drop(&mut self) {
        use nix::sys::signal::{Signal, kill};
        use nix::unistd::Pid;
        let _ = kill(Pid::from_raw(self.child.id() as i32), Signal::SIGTERM);
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while std::time::Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                break;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        kill_services(&self.data_dir);
    }
}

/// Signs a packaged release with `key`.
pub fn sign(packaged: &ferry_cross::Packaged, key: &SecretKey) -> Release {
    Release {
        envelope: Envelope::sign(packaged.manifest.to_json(), &[key]).unwrap(),
        manifest: packaged.manifest.clone(),
        artifact: packaged.artifact.clone(),
    }
}

/// Stops the service processes an agent's direct supervisor started.
pub fn kill_services(data_dir: &Path) {
    ferry_agent::supervisor::direct::stop_leftovers(&data_dir.join("run"));
}

/// A signed release on disk.
#[derive(Debug, Clone)]
pub struct Release {
    pub manifest: Manifest,
    pub envelope: Envelope,
    pub artifact: PathBuf,
}

/// Builds, packages and signs version `version` of service `api`, a C
/// program that writes "start VERSION PID" to `out` and waits.
pub fn release(dir: &Path, key: &SecretKey, version: &str, sequence: u64, out: &Path) -> Release {
    build_release(dir, key, version, sequence, out, false, Padding::None)
}

/// What a test release carries beside its program.
#[derive(Debug, Clone, Copy)]
enum Padding {
    None,
    /// A file of zeros (small once compressed).
    Zeros(usize),
    /// A file gzip cannot shrink: the artifact is as big as the file.
    Noise(usize),
}

/// Bytes gzip cannot shrink (xorshift), so an artifact really is as large
/// as its payload.
pub fn incompressible(len: usize) -> Vec<u8> {
    let mut state = 0x9E37_79B9_7F4A_7C15_u64;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        out.extend_from_slice(&state.to_le_bytes());
    }
    out.truncate(len);
    out
}

/// Like [`release`], with `bytes` of incompressible data beside the
/// program: an artifact of about that size.
pub fn large_release(
    dir: &Path,
    key: &SecretKey,
    version: &str,
    sequence: u64,
    out: &Path,
    bytes: usize,
) -> Release {
    build_release(
        dir,
        key,
        version,
        sequence,
        out,
        false,
        Padding::Noise(bytes),
    )
}

/// Like [`release`], with a `pad`-byte data file beside the program: a
/// release bigger than some devices' `max_unpacked_bytes`.
pub fn padded_release(
    dir: &Path,
    key: &SecretKey,
    version: &str,
    sequence: u64,
    out: &Path,
    pad: usize,
) -> Release {
    build_release(dir, key, version, sequence, out, false, Padding::Zeros(pad))
}

/// Like [`release`], but the program exits with 1 at once, every time: a
/// release that crash-loops on every device.
pub fn crashing_release(
    dir: &Path,
    key: &SecretKey,
    version: &str,
    sequence: u64,
    out: &Path,
) -> Release {
    build_release(dir, key, version, sequence, out, true, Padding::None)
}

fn build_release(
    dir: &Path,
    key: &SecretKey,
    version: &str,
    sequence: u64,
    out: &Path,
    crash: bool,
    pad: Padding,
) -> Release {
    let tree = dir.join(format!("tree-{version}"));
    std::fs::create_dir_all(tree.join("bin")).unwrap();
    match pad {
        Padding::None => {}
        Padding::Zeros(n) => std::fs::write(tree.join("padding"), vec![0u8; n]).unwrap(),
        Padding::Noise(n) => std::fs::write(tree.join("padding"), incompressible(n)).unwrap(),
    }
    let source = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../agent/tests/support/service.c"
    );
    let status = Command::new("cc")
        .arg("-O2")
        .arg(format!("-DVERSION=\"{version}\""))
        .arg(format!("-DOUT=\"{}\"", out.display()))
        .args(crash.then_some("-DCRASH"))
        .arg(source)
        .arg("-o")
        .arg(tree.join("bin/api"))
        .status()
        .expect("cc not found; run scripts/setup");
    assert!(status.success());
    let packaged = package(
        &PackageRequest {
            dir: tree,
            service: ServiceName::new("api").unwrap(),
            version: version.parse().unwrap(),
            entrypoint: RelPath::new("bin/api").unwrap(),
            sequence,
            target: Target::new(ferry_agent::BUILD_TARGET).unwrap(),
            kind: Some(ArtifactKind::C),
            expires: None,
            build: Default::default(),
            health: ferry_protocol::manifest::HealthSettings {
                window_secs: 1,
                probe: None,
            },
            reload: Vec::new(),
            run: Default::default(),
        },
        &dir.join(format!("out-{version}")),
    )
    .unwrap();
    sign(&packaged, key)
}

/// A real mosquitto with a password file and Ferry's ACL, as the README
/// documents it for an external broker.
pub struct Mosquitto {
    pub port: u16,
    child: std::process::Child,
}

impl Mosquitto {
    /// Starts mosquitto on a free port with these users; `acl` is the ACL file's text.
    pub fn start(dir: &Path, users: &[(&str, &str)], acl: &str) -> Self {
        let port = free_port();
        let passwd = dir.join("mosquitto.passwd");
        let _ = std::fs::remove_file(&passwd);
        std::fs::write(&passwd, "").unwrap();
        for (user, password) in users {
            let status = Command::new("mosquitto_passwd")
                .arg("-b")
                .arg(&passwd)
                .arg(user)
                .arg(password)
                .status()
                .expect("mosquitto_passwd not found; run scripts/setup");
            assert!(status.success());
        }
        let acl_file = dir.join("mosquitto.acl");
        std::fs::write(&acl_file, acl).unwrap();
        let config = dir.join("mosquitto.conf");
        std::fs::write(
            &config,
            format!(
                "listener {port} 127.0.0.1\nallow_anonymous false\nuse_username_as_clientid true\n\
                 password_file {}\nacl_file {}\nuser root\npersistence false\n\
                 max_inflight_messages 100\nmax_queued_messages 10000\n",
                passwd.display(),
                acl_file.display()
            ),
        )
        .unwrap();
        let child = Command::new("mosquitto")
            .arg("-c")
            .arg(&config)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("mosquitto not found; run scripts/setup");
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(
                std::time::Instant::now() < deadline,
                "mosquitto did not start"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        Self { port, child }
    }
}

impl Mosquitto {
    /// The broker's process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for Mosquitto {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// User + system CPU seconds a process or thread has used, from its
/// `/proc/.../stat` file (0 when unknown).
pub fn cpu_secs(stat: &Path) -> f64 {
    let text = std::fs::read_to_string(stat).unwrap_or_default();
    // Fields after the command name, which may hold spaces: utime and stime
    // are the 12th and 13th of them.
    let Some((_, rest)) = text.rsplit_once(") ") else {
        return 0.0;
    };
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks: u64 = [11, 12]
        .iter()
        .filter_map(|&i| fields.get(i)?.parse::<u64>().ok())
        .sum();
    // The kernel's USER_HZ is 100 on Linux.
    ticks as f64 / 100.0
}

/// VmRSS and VmHWM (peak) of a process, in KiB (0 when unknown).
pub fn memory_kib(pid: u32) -> (u64, u64) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .unwrap_or(0)
    };
    (field("VmRSS:"), field("VmHWM:"))
}

/// A TCP relay in front of a broker whose connections a test can cut: the
/// network dropping a device's connection, for real, at a chosen moment.
pub struct Relay {
    pub addr: SocketAddr,
    cut: tokio::sync::watch::Sender<u64>,
    task: JoinHandle<()>,
}

impl Relay {
    /// Relays connections on a free port to `target`.
    pub async fn start(target: SocketAddr) -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (cut, _) = tokio::sync::watch::channel(0u64);
        let cuts = cut.clone();
        let task = tokio::spawn(async move {
            while let Ok((mut inbound, _)) = listener.accept().await {
                let mut cut = cuts.subscribe();
                tokio::spawn(async move {
                    let Ok(mut outbound) = tokio::net::TcpStream::connect(target).await else {
                        return;
                    };
                    tokio::select! {
                        _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound) => {}
                        _ = cut.changed() => {}
                    }
                });
            }
        });
        Self { addr, cut, task }
    }

    /// Drops every connection open now; new ones are relayed again.
    pub fn cut(&self) {
        self.cut.send_modify(|n| *n += 1);
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.task.abort();
        self.cut();
    }
}

/// Which broker devices and the manager meet on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BrokerKind {
    /// The manager's own (rmqtt).
    Embedded,
    /// mosquitto, with the ACL the README documents, as the external broker.
    Mosquitto,
    /// A three-node NATS cluster (MQTT gateway, JetStream), the manager
    /// answering its auth callout; devices connect to the first node with
    /// passwords, in plain text.
    Nats,
    /// [`BrokerKind::Nats`] over TLS: the gateways hold a certificate from
    /// the fleet CA, and devices enrol and show theirs.
    NatsTls,
}

/// An in-process manager on either broker, with devices registered: the
/// embedded one over TLS (devices enrol), mosquitto in plain text
/// (passwords).
pub struct Site {
    pub manager: Manager,
    /// Where devices keep their data (`agent-{id}` beneath).
    pub root: PathBuf,
    /// Where devices connect.
    pub mqtt: SocketAddr,
    /// Each device's credential: its enrolment token, or its password.
    pub passwords: Vec<(String, String)>,
    /// The external broker, if that is the kind.
    pub mosquitto: Option<Mosquitto>,
    /// The NATS cluster, if that is the kind.
    pub nats: Option<nats::NatsCluster>,
}

impl Site {
    /// Starts a manager keeping state in `root/manager` on a broker of
    /// `kind`, with `devices` registered; `public_url` is the base of the
    /// artifact URLs devices are sent.
    pub async fn start(
        root: &Path,
        kind: BrokerKind,
        devices: &[&str],
        public_url: Option<String>,
    ) -> Self {
        Self::start_configured(root, kind, devices, |config| {
            config.public_url = public_url.clone();
        })
        .await
    }

    /// [`Site::start`], with the manager's configuration changed by
    /// `configure` (limits, say) before it starts.
    pub async fn start_configured(
        root: &Path,
        kind: BrokerKind,
        devices: &[&str],
        configure: impl Fn(&mut ServeConfig),
    ) -> Self {
        let data = root.join("manager");
        let http = SocketAddr::from(([127, 0, 0, 1], free_port()));
        let config = |mqtt_port: u16, broker: Option<String>| {
            let mut config = test_config(
                &data,
                SocketAddr::from(([127, 0, 0, 1], mqtt_port)),
                http,
                broker,
            );
            configure(&mut config);
            config
        };
        let mut passwords = Vec::new();
        match kind {
            BrokerKind::Embedded => {
                let manager = Manager::start_configured(config(free_port(), None)).await;
                for id in devices {
                    passwords.push((id.to_string(), manager.add_device(id, &[]).await));
                }
                let mqtt = manager.mqtt;
                Self {
                    manager,
                    root: root.to_owned(),
                    mqtt,
                    passwords,
                    mosquitto: None,
                    nats: None,
                }
            }
            BrokerKind::Nats | BrokerKind::NatsTls => {
                let tls = kind == BrokerKind::NatsTls;
                std::fs::create_dir_all(&data).unwrap();
                let issuer_file = data.join("nats-issuer.nk");
                let issuer = ferry::serve::nats::issuer(&issuer_file).unwrap();
                // The fleet CA first (the manager finds it when it starts):
                // the gateways' certificate comes from it.
                let broker_certificate = tls.then(|| {
                    let names = ["127.0.0.1".to_string(), "localhost".to_string()];
                    ferry::serve::tls::issue_broker_certificate(&data, &names).unwrap()
                });
                let cluster = nats::NatsCluster::start_with(
                    root,
                    3,
                    &issuer.public_key(),
                    broker_certificate.as_ref(),
                );
                let mqtt = cluster.nodes[0].mqtt;
                let scheme = if tls { "mqtts" } else { "mqtt" };
                let mut config = config(
                    free_port(),
                    Some(format!("{scheme}://ferry-manager:manager-secret@{mqtt}")),
                );
                config.tls = tls;
                config.auth_callout = Some(
                    ferry::serve::nats::AuthCallout::parse(&cluster.callout_url(), issuer_file)
                        .unwrap(),
                );
                let manager = Manager::start_configured(config).await;
                // Through the callout it answers itself, once JetStream
                // has formed: the cluster then takes MQTT sessions.
                manager.wait_subscribed().await;
                for id in devices {
                    passwords.push((id.to_string(), manager.add_device(id, &[]).await));
                }
                Self {
                    manager,
                    root: root.to_owned(),
                    mqtt,
                    passwords,
                    mosquitto: None,
                    nats: Some(cluster),
                }
            }
            BrokerKind::Mosquitto => {
                // Devices are registered first; their credentials then go
                // into mosquitto's password file.
                let provisioning = Manager::start_configured(config(
                    free_port(),
                    Some("mqtt://127.0.0.1:1".into()),
                ))
                .await;
                for id in devices {
                    passwords.push((id.to_string(), provisioning.add_device(id, &[]).await));
                }
                provisioning.stop().await;
                let acl = std::fs::read_to_string(concat!(
                    env!("CARGO_MANIFEST_DIR"),
                    "/../manager/mosquitto.acl"
                ))
                .unwrap();
                let mut users: Vec<(&str, &str)> = vec![("ferry-manager", "manager-secret")];
                users.extend(passwords.iter().map(|(d, p)| (d.as_str(), p.as_str())));
                let broker = Mosquitto::start(root, &users, &acl);
                let manager = Manager::start_configured(config(
                    free_port(),
                    Some(format!(
                        "mqtt://ferry-manager:manager-secret@127.0.0.1:{}",
                        broker.port
                    )),
                ))
                .await;
                Self {
                    manager,
                    root: root.to_owned(),
                    mqtt: SocketAddr::from(([127, 0, 0, 1], broker.port)),
                    passwords,
                    mosquitto: Some(broker),
                    nats: None,
                }
            }
        }
    }

    /// Where its devices connect: the broker, and the manager's HTTP origin.
    pub fn endpoints(&self) -> Endpoints {
        Endpoints {
            mqtt: self.mqtt,
            http: Some(self.manager.http),
            ca_pem: self.manager.ca_pem.clone(),
        }
    }

    /// Where a device that reaches only the broker, at `mqtt`, connects
    /// (over TLS it still enrols, once, over HTTPS).
    pub fn broker_only(&self, mqtt: SocketAddr) -> Endpoints {
        let tls = self.manager.ca_pem.is_some();
        Endpoints {
            mqtt,
            http: tls.then_some(self.manager.http),
            ca_pem: self.manager.ca_pem.clone(),
        }
    }

    /// MQTT options for a client of the test's own acting as `device`,
    /// with its credential ([`Endpoints::device_options`]).
    pub async fn device_options(&self, device: &str) -> rumqttc::MqttOptions {
        self.endpoints()
            .device_options(
                &self.root.join(format!("agent-{device}")),
                device,
                self.password(device),
            )
            .await
    }

    /// A registered device's credential (enrolment token, or password).
    pub fn password(&self, device: &str) -> &str {
        self.passwords
            .iter()
            .find(|(d, _)| d == device)
            .map(|(_, p)| p.as_str())
            .unwrap_or_else(|| panic!("{device} is not registered"))
    }
}

/// Whether a client with `options` gets a CONNACK within 5 s (refused,
/// or no answer: false).
pub async fn mqtt_connects(options: rumqttc::MqttOptions) -> bool {
    use rumqttc::{Event, Packet};
    let (_client, mut events) = rumqttc::AsyncClient::new(options, 8);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    loop {
        match tokio::time::timeout_at(deadline, events.poll()).await {
            Ok(Ok(Event::Incoming(Packet::ConnAck(_)))) => return true,
            Ok(Ok(_)) => {}
            Ok(Err(_)) | Err(_) => return false,
        }
    }
}

/// Connects with `options` and hands back the client and its event loop
/// once the broker has accepted the connection; panics if it does not
/// within 10 s.
pub async fn mqtt_connected(
    options: rumqttc::MqttOptions,
) -> (rumqttc::AsyncClient, rumqttc::EventLoop) {
    use rumqttc::{Event, Packet};
    let user = options.client_id();
    let (client, mut events) = rumqttc::AsyncClient::new(options, 64);
    loop {
        match tokio::time::timeout(Duration::from_secs(10), events.poll()).await {
            Ok(Ok(Event::Incoming(Packet::ConnAck(_)))) => return (client, events),
            Ok(Ok(_)) => {}
            other => panic!("{user} cannot connect: {other:?}"),
        }
    }
}

/// A device's own MQTT session (client id and user name = `device`),
/// connected: its event loop runs on a task of the current runtime and
/// hands every incoming packet to `incoming`.
pub async fn device_session(
    mut options: rumqttc::MqttOptions,
    mut incoming: impl FnMut(rumqttc::Packet) + Send + 'static,
) -> (rumqttc::AsyncClient, JoinHandle<()>) {
    use rumqttc::{Event, Packet};
    let device = options.client_id();
    options.set_keep_alive(Duration::from_secs(60));
    options.set_max_packet_size(1 << 20, 1 << 20);
    let (client, mut eventloop) = rumqttc::AsyncClient::new(options, 1024);
    let (up_tx, up) = oneshot::channel();
    let task = tokio::spawn(async move {
        let mut up_tx = Some(up_tx);
        loop {
            match eventloop.poll().await {
                Ok(Event::Incoming(Packet::ConnAck(_))) => {
                    if let Some(tx) = up_tx.take() {
                        let _ = tx.send(());
                    }
                }
                Ok(Event::Incoming(packet)) => incoming(packet),
                Ok(_) => {}
                Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
            }
        }
    });
    tokio::time::timeout(Duration::from_secs(30), up)
        .await
        .unwrap_or_else(|_| panic!("{device} could not connect"))
        .unwrap();
    (client, task)
}

/// A realistic health report (about 450 bytes, one service), as an agent
/// publishes it.
pub fn health_payload() -> Vec<u8> {
    use ferry_protocol::messages::{
        CpuHealth, DiskHealth, Health, MESSAGE_SCHEMA, MemoryHealth, Message, ServiceHealth,
        ServiceState,
    };
    use ferry_protocol::{ServiceName, Timestamp};

    Health {
        schema: MESSAGE_SCHEMA,
        time: Timestamp::from(std::time::SystemTime::now()),
        agent_version: "0.1.0".into(),
        uptime_secs: 123_456,
        cpu: CpuHealth {
            usage_percent: 12.5,
            load1: 0.42,
            load5: 0.38,
            load15: 0.31,
        },
        memory: MemoryHealth {
            total_bytes: 512 << 20,
            available_bytes: 300 << 20,
        },
        disk: DiskHealth {
            path: "/var/lib/ferry".into(),
            total_bytes: 4 << 30,
            free_bytes: 3 << 30,
        },
        temperature_celsius: Some(51.5),
        services: vec![ServiceHealth {
            service: ServiceName::new("gateway").unwrap(),
            version: Some("1.4.2".into()),
            state: ServiceState::Active,
            pid: Some(4242),
            restarts: 0,
            rss_bytes: Some(6 << 20),
            cpu_percent: Some(3.5),
        }],
        last_deployment: None,
    }
    .encode()
}
