//! `scripts/cluster`, run as a user runs it: `up` starts three NATS servers,
//! PostgreSQL and three `ferry serve` replicas on loopback. A device added
//! through one replica, with the agent configuration `ferry device add`
//! writes (its inbox included), pointed at another server's gateway,
//! enrols, connects over TLS and installs a release deployed through a
//! third replica; `down` stops all of it.

use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use ferry_e2e::{Agent, Manager, ferry_binary, free_port, padded_release};
use ferry_protocol::SecretKey;

const SCRIPT: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../scripts/cluster");

/// The offsets from the first port the script listens on.
const OFFSETS: [u16; 15] = [1, 2, 3, 11, 12, 13, 21, 22, 23, 31, 32, 33, 41, 42, 43];

/// A first port whose every offset is free now.
fn free_base() -> u16 {
    loop {
        let base = free_port() / 100 * 100;
        if base > 1024
            && base < 65_000
            && OFFSETS
                .iter()
                .all(|o| TcpListener::bind(("127.0.0.1", base + o)).is_ok())
        {
            return base;
        }
    }
}

fn loopback(port: u16) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], port))
}

/// The cluster the script runs in `dir` on ports from `base`; cleaned away
/// when dropped, whatever the test did.
struct ScriptedCluster {
    dir: PathBuf,
    base: u16,
}

impl ScriptedCluster {
    fn run(&self, command: &str) -> Output {
        Command::new(SCRIPT)
            .arg(command)
            .env("FERRY_CLUSTER_DIR", &self.dir)
            .env("FERRY_CLUSTER_PORT", self.base.to_string())
            .env("FERRY_BIN", ferry_binary())
            .output()
            .unwrap()
    }
}

impl Drop for ScriptedCluster {
    fn drop(&mut self) {
        let _ = self.run("clean");
    }
}

fn text(output: &Output) -> String {
    String::from_utf8_lossy(&output.stdout).into_owned() + &String::from_utf8_lossy(&output.stderr)
}

/// The agent configuration `ferry device add --agent-config` writes, with
/// its paths moved under `agent_dir` (the tests run no service as a user
/// of its own) and its broker moved to `mqtt`.
fn device_config(written: &str, agent_dir: &Path, trust: &Path, mqtt: SocketAddr) -> String {
    let broker = written
        .lines()
        .find_map(|l| l.strip_prefix("url = \""))
        .and_then(|rest| rest.strip_suffix('"'))
        .expect("no broker url in the written configuration")
        .to_owned();
    let text = written
        .replace("/var/lib/ferry", &agent_dir.display().to_string())
        .replace("/etc/ferry/ops.pub", &trust.display().to_string())
        .replace("supervisor = \"auto\"", "supervisor = \"direct\"")
        .replace(&broker, &format!("mqtts://{mqtt}"));
    format!("isolate_services = false\n{text}")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cluster_script_starts_a_cluster_that_takes_a_device_and_stops_it() {
    let scratch = tempfile::tempdir().unwrap();
    // PostgreSQL runs as its own user, which must pass through.
    std::fs::set_permissions(scratch.path(), std::fs::Permissions::from_mode(0o711)).unwrap();
    let cluster = ScriptedCluster {
        dir: scratch.path().join("cluster"),
        base: free_base(),
    };
    let up = cluster.run("up");
    assert!(up.status.success(), "scripts/cluster up: {}", text(&up));
    let data = cluster.dir.join("manager");
    let mut replicas = Vec::new();
    for n in 1..=3 {
        replicas.push(Manager::attach(&data, loopback(cluster.base + 40 + n)).await);
    }

    // Added through the first replica, as an operator does.
    let written = scratch.path().join("gw-1.toml");
    let add = Command::new(ferry_binary())
        .args(["device", "add", "gw-1", "--agent-config"])
        .arg(&written)
        .arg("--url")
        .arg(replicas[0].url(""))
        .arg("--ca")
        .arg(data.join("ca.pem"))
        .arg("--token")
        .arg(&replicas[0].token)
        .output()
        .unwrap();
    assert!(add.status.success(), "ferry device add: {}", text(&add));
    let key = SecretKey::from_seed(&[61; 32]);
    let trust = scratch.path().join("ops.pub");
    std::fs::write(&trust, key.public_key().to_text()).unwrap();
    let agent_dir = scratch.path().join("agent-gw-1");
    let config = device_config(
        &std::fs::read_to_string(&written).unwrap(),
        &agent_dir,
        &trust,
        loopback(cluster.base + 22),
    );
    assert!(config.contains("inbox = "), "{config}");
    let agent = Agent::start_config(agent_dir, &config);
    replicas[1]
        .wait_device("gw-1", "online", |d| d["online"] == true)
        .await;

    // Deployed through the third replica, which the artifact comes from.
    let release = padded_release(
        scratch.path(),
        &key,
        "1.0.0",
        1,
        &scratch.path().join("out"),
        0,
    );
    replicas[2].deploy_and_wait(&release, "gw-1").await;
    agent.stop().await;

    let down = cluster.run("down");
    assert!(
        down.status.success(),
        "scripts/cluster down: {}",
        text(&down)
    );
    for offset in [1, 21, 41] {
        assert!(
            TcpStream::connect(loopback(cluster.base + offset)).is_err(),
            "port +{offset} still open after down"
        );
    }
    let status = cluster.run("status");
    assert!(
        !status.status.success(),
        "status after down: {}",
        text(&status)
    );
    assert!(!text(&status).contains("running"), "{}", text(&status));
}
