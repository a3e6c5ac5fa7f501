//! A rollout to a simulated fleet of 1,000 and 10,000 devices on one
//! manager.
//!
//! The manager is `ferry serve` (release build) as a process of its own,
//! with the embedded broker and SQLite, so its memory is its own. The fleet
//! is the fleet simulator (`ferry_e2e::simulator`): the real agent library
//! once per device in this process, each with its own MQTT connection and
//! data directory, running no service process. The devices' data
//! directories are on a tmpfs when there is one (`/dev/shm`): 10,000 devices
//! sharing one disk's fsyncs would measure that disk, not Ferry, where each
//! real device has a flash of its own.
//!
//! For each size: how long registration and connecting took; the manager's
//! RSS with the devices registered but offline, then all connected (the
//! difference per device), and its peak; broker connections held (the
//! established sockets on the manager's MQTT port); then a rollout of a
//! 1 MiB release (incompressible, so 1 MiB crosses the wire to every device)
//! to the whole fleet in one wave, timed from the API call to the rollout
//! completed with every device reporting the new version. Everything shares
//! the machine's two cores: the simulator's work (10,000 downloads, hashes
//! and unpacks) competes with the manager's. Asserts nothing about speed.
//!
//! The simulator runs in processes of at most 5,000 devices: each device
//! holds a broker connection and its data directory's lock, and a
//! connection and files while it installs, and a process here may hold
//! 20,000 descriptors (the same limit is why the rollout lets at most 2,000
//! devices install at once: the manager holds a connection and a file for
//! each download beside the fleet's broker connections; its systemd unit
//! raises the limit to 65,536).
//!
//! The manager serves TLS, as by default: each device makes its key,
//! enrols for its certificate over HTTPS and connects to the broker with
//! it. `FERRY_FLEET_TRANSPORT=plaintext` runs the same with passwords over
//! plain MQTT and HTTP, for the cost of TLS: the manager's CPU while the
//! fleet connects, per device, is printed for each.
//!
//! `cargo bench -p ferry-e2e --bench fleet_rollout`; `FERRY_FLEET_SIZES=1000`
//! picks the sizes.

use std::io::Read;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use ferry_e2e::nats::{NatsCluster, start_replicas};
use ferry_e2e::simulator::SimulatedFleet;
use ferry_e2e::{
    Endpoints, Manager, cpu_secs, free_port, large_release, memory_kib, postgres,
    release_ferry_binary,
};
use ferry_protocol::SecretKey;
use serde_json::json;

const DEFAULT_SIZES: [usize; 2] = [1_000, 10_000];
const ARTIFACT_BYTES: usize = 1 << 20;
const DEVICES_PER_PROCESS: usize = 5_000;
const MAX_IN_FLIGHT: u32 = 2_000;

/// Simulator processes, each running a share of the fleet until its stdin closes.
struct Simulators(Vec<Child>);

impl Simulators {
    fn start(root: &Path, at: Endpoints, devices: &[(String, String)], trust: &Path) -> Self {
        std::fs::create_dir_all(root).unwrap();
        let http = at.http.map_or_else(|| "-".to_owned(), |h| h.to_string());
        let ca = match &at.ca_pem {
            Some(pem) => {
                let file = root.join("ca.pem");
                std::fs::write(&file, pem).unwrap();
                file.display().to_string()
            }
            None => "-".to_owned(),
        };
        let me = std::env::current_exe().unwrap();
        let children = devices
            .chunks(DEVICES_PER_PROCESS)
            .enumerate()
            .map(|(i, share)| {
                let list = root.join(format!("simulator-{i}.txt"));
                let text: String = share.iter().map(|(d, p)| format!("{d} {p}\n")).collect();
                std::fs::write(&list, text).unwrap();
                Command::new(&me)
                    .arg("simulate")
                    .arg(root)
                    .arg(at.mqtt.to_string())
                    .arg(&http)
                    .arg(trust)
                    .arg(&list)
                    .arg(&ca)
                    .stdin(Stdio::piped())
                    .spawn()
                    .unwrap()
            })
            .collect();
        Self(children)
    }

    /// These and `other`'s processes together.
    fn and(mut self, other: Simulators) -> Self {
        self.0.extend(other.0);
        self
    }

    /// Total RSS (MiB) and CPU seconds of the simulator processes.
    fn usage(&self) -> (f64, f64) {
        self.0.iter().fold((0.0, 0.0), |(rss, cpu), child| {
            let stat = PathBuf::from(format!("/proc/{}/stat", child.id()));
            (rss + mib(memory_kib(child.id()).0), cpu + cpu_secs(&stat))
        })
    }

    fn stop(self) {
        for mut child in self.0 {
            drop(child.stdin.take());
            let _ = child.wait();
        }
    }
}

/// A simulator process: `simulate ROOT MQTT HTTP TRUST LIST CA`, where
/// LIST has a line `DEVICE CREDENTIAL` (enrolment token or password) per
/// device, HTTP is the manager's (or `-`) and CA its fleet CA file (or `-`
/// for plain text); runs until stdin closes.
fn simulate(args: &[String]) {
    let [root, mqtt, http, trust, list, ca] = args else {
        panic!("usage: simulate ROOT MQTT HTTP TRUST LIST CA");
    };
    let devices: Vec<(String, String)> = std::fs::read_to_string(list)
        .unwrap()
        .lines()
        .filter_map(|l| l.split_once(' '))
        .map(|(d, p)| (d.to_owned(), p.to_owned()))
        .collect();
    let at = Endpoints {
        mqtt: mqtt.parse().unwrap(),
        http: http.parse().ok(),
        ca_pem: std::fs::read_to_string(ca).ok(),
    };
    let fleet = SimulatedFleet::start(Path::new(root), at, &devices, Path::new(trust), 2);
    let _ = std::io::stdin().read_to_end(&mut Vec::new());
    if fleet.failed() > 0 {
        eprintln!("{} simulated agents failed to start", fleet.failed());
    }
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(fleet.stop());
}

fn addr(port: u16) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], port))
}

/// Sockets in state ESTABLISHED whose local port is `port` (the server's
/// ends of connections to it).
fn established_on(port: u16) -> usize {
    let text = std::fs::read_to_string("/proc/net/tcp").unwrap_or_default();
    text.lines()
        .skip(1)
        .filter(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            let local_port = fields
                .get(1)
                .and_then(|a| a.rsplit_once(':'))
                .and_then(|(_, p)| u16::from_str_radix(p, 16).ok());
            local_port == Some(port) && fields.get(3) == Some(&"01")
        })
        .count()
}

fn mib(kib: u64) -> f64 {
    kib as f64 / 1024.0
}

/// Where the fleet's manager runs.
#[derive(Clone, Copy, PartialEq)]
enum Topology {
    /// One `ferry serve`: its embedded broker, SQLite.
    Embedded,
    /// `ferry serve` replicas on a three-node NATS cluster and PostgreSQL.
    Cluster { replicas: usize },
}

impl Topology {
    fn parse(text: &str) -> Self {
        match text.trim() {
            "embedded" => Self::Embedded,
            other => match other.strip_prefix("cluster").map(str::parse) {
                Some(Ok(replicas)) if replicas > 0 => Self::Cluster { replicas },
                _ => panic!("FERRY_FLEET_TOPOLOGIES: embedded, cluster1, cluster3..., not {other}"),
            },
        }
    }

    fn label(self, tls: bool) -> String {
        match self {
            Self::Embedded => format!("1 manager, embedded broker, SQLite, {}", transport(tls)),
            Self::Cluster { replicas } => format!(
                "{replicas} replica{} on 3 NATS nodes, PostgreSQL, {}",
                if replicas == 1 { "" } else { "s" },
                transport(tls)
            ),
        }
    }
}

/// The manager side of a run, up: its replicas (one for the embedded
/// broker), the NATS cluster if there is one, and where devices connect
/// (per broker node, its broker and the replica beside it).
struct ManagerSide {
    replicas: Vec<Manager>,
    cluster: Option<NatsCluster>,
    entries: Vec<Endpoints>,
    broker_ports: Vec<u16>,
    /// Where the NATS servers log, on a cluster.
    broker_logs: Option<PathBuf>,
}

impl ManagerSide {
    async fn start(root: &Path, topology: Topology, tls: bool, ferry: &Path, tag: &str) -> Self {
        let data = root.join(format!("manager-{tag}"));
        match topology {
            Topology::Embedded => {
                let (mqtt, http) = (addr(free_port()), addr(free_port()));
                let manager = Manager::start_process_with(ferry, &data, mqtt, http, tls).await;
                Self {
                    entries: vec![manager.endpoints()],
                    broker_ports: vec![mqtt.port()],
                    replicas: vec![manager],
                    cluster: None,
                    broker_logs: None,
                }
            }
            Topology::Cluster { replicas } => {
                assert!(
                    !tls,
                    "the cluster runs in plain text here: FERRY_FLEET_TRANSPORT=plaintext"
                );
                std::fs::create_dir_all(&data).unwrap();
                let issuer = ferry::serve::nats::issuer(&data.join("nats-issuer.nk")).unwrap();
                let nats_dir = root.join(format!("nats-{tag}"));
                std::fs::create_dir_all(&nats_dir).unwrap();
                let cluster = NatsCluster::start(&nats_dir, 3, &issuer.public_key());
                let database = postgres::server().database();
                let replicas =
                    start_replicas(&cluster, ferry, &data, &database, replicas, &nats_dir).await;
                let entries = cluster
                    .nodes
                    .iter()
                    .enumerate()
                    .map(|(i, node)| Endpoints {
                        mqtt: node.mqtt,
                        http: replicas[i % replicas.len()].endpoints().http,
                        ca_pem: None,
                    })
                    .collect();
                Self {
                    broker_ports: cluster.nodes.iter().map(|n| n.mqtt.port()).collect(),
                    entries,
                    replicas,
                    cluster: Some(cluster),
                    broker_logs: Some(nats_dir),
                }
            }
        }
    }

    /// The NATS servers' warnings and errors: how many, and the last few
    /// (for a run that failed; the logs go with the run's directory).
    fn broker_complaints(&self) -> String {
        let Some(dir) = &self.broker_logs else {
            return String::new();
        };
        let mut complaints = Vec::new();
        for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
            let path = entry.path();
            if path.extension().is_some_and(|e| e == "log") {
                let text = std::fs::read_to_string(&path).unwrap_or_default();
                complaints.extend(
                    text.lines()
                        .filter(|l| l.contains("[WRN]") || l.contains("[ERR]"))
                        .map(str::to_owned),
                );
            }
        }
        let last = complaints.len().saturating_sub(5);
        format!(
            "\nNATS logged {} warnings and errors; the last:\n{}",
            complaints.len(),
            complaints[last..].join("\n")
        )
    }

    fn manager_pids(&self) -> Vec<u32> {
        self.replicas.iter().filter_map(Manager::pid).collect()
    }

    /// The NATS servers' processes; none with the embedded broker.
    fn broker_pids(&self) -> Vec<u32> {
        self.cluster
            .iter()
            .flat_map(|c| c.nodes.iter())
            .filter_map(|n| n.pid())
            .collect()
    }

    /// The replicas' RSS summed (KiB): now, and each one's peak.
    fn manager_rss(&self) -> (u64, u64) {
        self.manager_pids()
            .into_iter()
            .map(memory_kib)
            .fold((0, 0), |(now, peak), (n, p)| (now + n, peak + p))
    }

    /// The NATS servers' RSS summed (KiB), 0 with the embedded broker.
    fn broker_rss(&self) -> u64 {
        self.broker_pids()
            .into_iter()
            .map(|pid| memory_kib(pid).0)
            .sum()
    }

    fn manager_cpu(&self) -> f64 {
        cpu_of(&self.manager_pids())
    }

    fn broker_cpu(&self) -> f64 {
        cpu_of(&self.broker_pids())
    }

    /// A counter of every replica, summed.
    async fn total(&self, metric: &str) -> f64 {
        let mut total = 0.0;
        for replica in &self.replicas {
            total += replica.metric(metric).await;
        }
        total
    }

    /// Device messages the replicas recorded, all together.
    async fn recorded(&self) -> f64 {
        self.total("ferry_device_messages_recorded_total").await
    }

    /// Device messages the NATS cluster gave a replica again.
    async fn redelivered(&self) -> f64 {
        self.total("ferry_device_messages_redelivered_total").await
    }

    async fn stop(self) {
        for replica in self.replicas {
            replica.stop().await;
        }
    }
}

/// The CPU seconds `pids` have used so far, together.
fn cpu_of(pids: &[u32]) -> f64 {
    pids.iter()
        .map(|pid| cpu_secs(&PathBuf::from(format!("/proc/{pid}/stat"))))
        .sum()
}

/// How many connections loopback clients may hold to one address and port
/// at once: the local port range.
fn local_ports() -> usize {
    std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|t| {
            let mut range = t.split_whitespace().map(|n| n.parse::<usize>().ok());
            Some(range.next()??.abs_diff(range.next()??) + 1)
        })
        .unwrap_or(28_232)
}

/// How many descriptors a process here may open (the hard limit, which
/// the bench raises its own to and its children inherit).
fn open_files() -> u64 {
    use nix::sys::resource::{Resource, getrlimit};
    getrlimit(Resource::RLIMIT_NOFILE).map_or(1024, |(_, hard)| hard)
}

/// Free bytes where `dir` is.
fn free_bytes(dir: &Path) -> u64 {
    nix::sys::statvfs::statvfs(dir)
        .map(|s| s.blocks_available() * s.fragment_size())
        .unwrap_or(0)
}

#[allow(clippy::too_many_arguments)]
async fn measure(
    root: &Path,
    size: usize,
    tls: bool,
    topology: Topology,
    artifact_bytes: usize,
    ferry: &Path,
    key: &SecretKey,
    trust: &Path,
) {
    let label = topology.label(tls);
    // One process holds every device's connection: the embedded broker.
    if topology == Topology::Embedded && size as u64 + 2 * u64::from(MAX_IN_FLIGHT) > open_files() {
        println!(
            "{size:>6} devices, {label}: skipped: the manager would hold a descriptor per device and download, and a process here may open {}",
            open_files()
        );
        return;
    }
    if topology == Topology::Embedded && size + 100 > local_ports() {
        println!(
            "{size:>6} devices, {label}: skipped: one broker address takes at most {} loopback connections (net.ipv4.ip_local_port_range)",
            local_ports()
        );
        return;
    }
    // Each device keeps the release it installs, on a tmpfs that is this
    // machine's memory: the artifact is 1 MiB (or FERRY_FLEET_ARTIFACT_KIB)
    // where the fleet's copies fit in half the free space, halved until
    // they do (the line says what it was).
    let mut artifact_bytes = artifact_bytes;
    let room = free_bytes(root) / 2;
    while artifact_bytes > 64 << 10 && size as u64 * artifact_bytes as u64 * 11 / 10 > room {
        artifact_bytes /= 2;
    }
    if size as u64 * artifact_bytes as u64 * 11 / 10 > room {
        println!(
            "{size:>6} devices, {label}: skipped: {} MiB free for their data",
            free_bytes(root) >> 20
        );
        return;
    }
    let tag = format!(
        "{size}-{}",
        label.split(',').next().unwrap_or("").replace(' ', "-")
    );
    let side = ManagerSide::start(root, topology, tls, ferry, &tag).await;
    let first = &side.replicas[0];

    let started = Instant::now();
    let ids: Vec<String> = (0..size).map(|i| format!("sim-{i:05}")).collect();
    let devices = first.add_devices(&ids).await;
    let registering = started.elapsed();
    let (offline_rss, _) = side.manager_rss();
    let broker_offline_rss = side.broker_rss();

    let started = Instant::now();
    let connect_cpu0 = side.manager_cpu();
    let devices_dir = root.join(format!("devices-{tag}"));
    // Devices spread over the broker nodes, a share each.
    let nodes = side.entries.len();
    let fleet = side
        .entries
        .iter()
        .enumerate()
        .map(|(k, at)| {
            let share: Vec<(String, String)> =
                devices.iter().skip(k).step_by(nodes).cloned().collect();
            Simulators::start(
                &devices_dir.join(format!("node-{k}")),
                at.clone(),
                &share,
                trust,
            )
        })
        .reduce(Simulators::and)
        .unwrap();
    loop {
        let online = first.online_devices().await;
        if online == size {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(900),
            "only {online} of {size} devices came online{}",
            side.broker_complaints()
        );
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    let connecting = started.elapsed();
    // Everything the manager did to let the fleet in: with TLS, each
    // device's enrolment (an HTTPS request, a signature check, a
    // certificate issued and recorded) and its broker handshake; on a
    // cluster, answering the auth callout.
    let connect_cpu_ms = (side.manager_cpu() - connect_cpu0) * 1000.0 / size as f64;
    // Let the first health reports and retained messages settle.
    tokio::time::sleep(Duration::from_secs(5)).await;
    let (online_rss, _) = side.manager_rss();
    let broker_online_rss = side.broker_rss();
    let connections: usize = side.broker_ports.iter().map(|p| established_on(*p)).sum();
    let (sim_rss, sim_cpu0) = fleet.usage();

    let v1 = large_release(
        root,
        key,
        &format!("1.0.{size}"),
        size as u64,
        &root.join("unused.out"),
        artifact_bytes,
    );
    let artifact_len = std::fs::metadata(&v1.artifact).unwrap().len();
    first.publish(&v1).await;
    let (recorded0, redelivered0) = (side.recorded().await, side.redelivered().await);
    let (manager_cpu0, broker_cpu0) = (side.manager_cpu(), side.broker_cpu());
    let started = Instant::now();
    let created = first
        .post(
            "/v1/rollouts",
            json!({
                "service": "api",
                "version": v1.manifest.version.to_string(),
                "all": true,
                "max_in_flight": MAX_IN_FLIGHT,
            }),
        )
        .await;
    let id = created["id"].as_i64().unwrap();
    // Asked once a second: the answer lists every device, and asking is
    // load on the manager too.
    let done = loop {
        let rollout = first.get(&format!("/v1/rollouts/{id}")).await;
        if rollout["state"] != "running" {
            break rollout;
        }
        assert!(
            started.elapsed() < Duration::from_secs(1800),
            "rollout never ended{}",
            side.broker_complaints()
        );
        tokio::time::sleep(Duration::from_secs(1)).await;
    };
    let rollout = started.elapsed();
    let (_, peak_rss) = side.manager_rss();
    let sim_cpu = fleet.usage().1 - sim_cpu0;
    let manager_cpu = side.manager_cpu() - manager_cpu0;
    let broker_cpu = side.broker_cpu() - broker_cpu0;
    let ingested = (side.recorded().await - recorded0) / rollout.as_secs_f64();
    let redelivered = side.redelivered().await - redelivered0;
    let dropped = if topology == Topology::Embedded {
        first
            .metric("ferry_mqtt_messages_dropped_total")
            .await
            .to_string()
    } else {
        "-".into()
    };
    let installed = done["counts"]["installed"].as_u64().unwrap_or(0);
    assert!(
        done["state"] == "completed" && installed == size as u64,
        "rollout {}: {:#}",
        done["state"],
        done["counts"]
    );
    let per_device_kib = online_rss.saturating_sub(offline_rss) as f64 / size as f64;
    let broker_per_device_kib =
        broker_online_rss.saturating_sub(broker_offline_rss) as f64 / size as f64;
    println!(
        "{size:>6} devices, {label} | register {:>5.1} s | all online {:>5.1} s, manager CPU {connect_cpu_ms:.2} ms/device | broker connections {connections:>6} | \
         manager RSS offline {:>6.1} MiB, online {:>6.1} MiB ({per_device_kib:>5.1} KiB/device), peak {:>6.1} MiB | broker RSS online {:>6.1} MiB ({broker_per_device_kib:>5.1} KiB/device) | \
         rollout of {:.2} MiB to all: {:>6.1} s ({:>7.0} devices/min), {ingested:>6.0} device messages/s recorded ({redelivered:.0} redelivered) | CPU in rollout: manager {manager_cpu:>5.1} s, broker {broker_cpu:>5.1} s, simulator {:>6.1} s | simulator RSS {:>6.1} MiB | broker drops {dropped}",
        registering.as_secs_f64(),
        connecting.as_secs_f64(),
        mib(offline_rss),
        mib(online_rss),
        mib(peak_rss),
        mib(broker_online_rss),
        artifact_len as f64 / (1 << 20) as f64,
        rollout.as_secs_f64(),
        size as f64 / rollout.as_secs_f64() * 60.0,
        sim_cpu,
        sim_rss,
    );
    fleet.stop();
    side.stop().await;
    // Their releases would crowd out the next run's.
    let _ = std::fs::remove_dir_all(&devices_dir);
}

fn transport(tls: bool) -> &'static str {
    if tls { "TLS" } else { "plaintext" }
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.first().is_some_and(|a| a == "simulate") {
        return simulate(&args[1..]);
    }
    if !args.iter().any(|a| a == "--bench") {
        return;
    }
    let sizes: Vec<usize> = match std::env::var("FERRY_FLEET_SIZES") {
        Ok(text) => text
            .split(',')
            .map(|s| {
                s.trim()
                    .parse()
                    .expect("FERRY_FLEET_SIZES: sizes like 1000,10000")
            })
            .collect(),
        Err(_) => DEFAULT_SIZES.to_vec(),
    };
    let topologies: Vec<Topology> = std::env::var("FERRY_FLEET_TOPOLOGIES")
        .unwrap_or_else(|_| "embedded".into())
        .split(',')
        .map(Topology::parse)
        .collect();
    let artifact_bytes = match std::env::var("FERRY_FLEET_ARTIFACT_KIB") {
        Ok(text) => {
            text.trim()
                .parse::<usize>()
                .expect("FERRY_FLEET_ARTIFACT_KIB: a size in KiB")
                << 10
        }
        Err(_) => ARTIFACT_BYTES,
    };
    let tls = match std::env::var("FERRY_FLEET_TRANSPORT").as_deref() {
        Ok("plaintext") => false,
        Ok("tls") | Err(_) => true,
        Ok(other) => panic!("FERRY_FLEET_TRANSPORT={other}: tls or plaintext"),
    };
    // Each device holds a broker connection and a lock file: well beyond
    // the usual soft limit of 1,024 descriptors, for the manager and the
    // simulators (which inherit it). The hard limit is as far as it goes.
    let hard = open_files();
    let _ = nix::sys::resource::setrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE, hard, hard);
    println!("open files per process: {hard}");
    let ferry = release_ferry_binary();
    let shm = Path::new("/dev/shm");
    let dir = if shm.is_dir() {
        tempfile::tempdir_in(shm).unwrap()
    } else {
        tempfile::tempdir().unwrap()
    };
    let key = SecretKey::from_seed(&[11; 32]);
    let trust = dir.path().join("ops.pub");
    std::fs::write(&trust, key.public_key().to_text()).unwrap();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    println!(
        "rollout of a {} KiB incompressible payload, one wave, at most {MAX_IN_FLIGHT} devices installing at once; devices' data on {}",
        artifact_bytes >> 10,
        if shm.is_dir() { "tmpfs" } else { "the disk" }
    );
    runtime.block_on(async {
        for size in sizes {
            for &topology in &topologies {
                measure(
                    dir.path(),
                    size,
                    tls,
                    topology,
                    artifact_bytes,
                    &ferry,
                    &key,
                    &trust,
                )
                .await;
            }
        }
    });
}
