//! `ferry demo`: the whole system on one machine, in one command.
//!
//! Starts a manager, two agents (direct supervisor, each with its own data
//! directory), builds a small C service with the host's `cc`, signs and
//! publishes v1, deploys it, then v2, and shows the devices swap versions
//! and report health. Everything lives in a scratch directory and runs until
//! Ctrl-C.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use ferry_cross::{PackageRequest, package};
use ferry_protocol::manifest::{ArtifactKind, BuildInfo, HealthSettings};
use ferry_protocol::{Envelope, RelPath, SecretKey, ServiceName, Target};
use serde_json::{Value, json};
use tokio::sync::oneshot;

use crate::client::Manager;
use crate::serve::{ServeConfig, serve, token_file};

/// Where the demo runs.
pub struct DemoConfig {
    /// Scratch directory (created; reused if present).
    pub dir: PathBuf,
    /// The manager's HTTP address.
    pub http_listen: std::net::SocketAddr,
    /// The embedded broker's address.
    pub mqtt_listen: std::net::SocketAddr,
}

const GO_SAMPLE: &str = r#"// The Ferry demo service in Go: says hello every few seconds.
package main

import (
	"fmt"
	"time"
)

// Set at build time with -ldflags "-X main.version=...".
var version = "dev"

func main() {
	for {
		fmt.Printf("hello from the ferry demo (Go), version %s\n", version)
		time.Sleep(5 * time.Second)
	}
}
"#;

const SAMPLE: &str = r#"/* The Ferry demo service: says hello every few seconds. */
#include <stdio.h>
#include <unistd.h>
int main(void) {
    for (;;) {
        printf("hello from the ferry demo, version %s\n", VERSION);
        fflush(stdout);
        sleep(5);
    }
}
"#;

fn step(text: &str) {
    say(&format!("==> {text}"));
}

/// Prints a line; a reader that went away is not an error.
fn say(text: &str) {
    crate::cli::print_stdout(text);
}

/// Runs the demo until Ctrl-C.
pub async fn run(config: DemoConfig) -> Result<()> {
    let dir = &config.dir;
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let dir = std::fs::canonicalize(dir)?;
    let _ = rustls::crypto::ring::default_provider().install_default();

    step(&format!(
        "starting the manager (HTTP {}, MQTT {})",
        config.http_listen, config.mqtt_listen
    ));
    let data_dir = dir.join("manager");
    let (stop_manager, manager_stopped) = oneshot::channel::<()>();
    let serve_config = ServeConfig {
        mqtt_listen: config.mqtt_listen,
        http_listen: config.http_listen,
        data_dir: data_dir.clone(),
        broker: None,
        auth_callout: None,
        database: None,
        public_url: None,
        offline_after: Duration::from_secs(30),
        http_limits: Default::default(),
        device_limits: Default::default(),
        // The demo is TLS like any manager: its agents and this process
        // trust its fleet CA and nothing else.
        tls: true,
        public_names: Vec::new(),
        device_cert_lifetime: crate::serve::DEVICE_CERT_LIFETIME,
    };
    let manager_task = tokio::spawn(serve(serve_config, async {
        let _ = manager_stopped.await;
    }));
    let url = format!("https://{}", loopback(config.http_listen));
    let ca_file = data_dir.join("ca.pem");
    wait_for_manager(&url, &data_dir, &manager_task).await?;
    let token = std::fs::read_to_string(token_file(&data_dir))?
        .trim()
        .to_owned();
    let manager = Manager::resolve(
        Some(url.clone()),
        Some(token.clone()),
        Some(ca_file.clone()),
    )?;
    let ca_pem = std::fs::read_to_string(&ca_file)?;

    step("creating a release key (ops.pub; the secret key stays in memory)");
    let mut seed = [0u8; 32];
    getrandom::fill(&mut seed).map_err(|e| anyhow::anyhow!("no randomness: {e}"))?;
    let key = SecretKey::from_seed(&seed);
    std::fs::write(dir.join("ops.pub"), key.public_key().to_text())?;

    step("registering two devices and starting their agents");
    let mut agents = Vec::new();
    for (id, tag) in [("demo-1", "lab"), ("demo-2", "lab")] {
        let created = manager
            .post("/v1/devices", &json!({ "device_id": id, "tags": [tag] }))
            .await?;
        let token = created["enrol_token"]
            .as_str()
            .unwrap_or_default()
            .to_owned();
        let at = Endpoints {
            mqtt: config.mqtt_listen,
            http: config.http_listen,
            ca_pem: &ca_pem,
        };
        agents.push(start_agent(&dir, id, &token, &at).await?);
    }

    let mut services = vec![Sample::C];
    if go_available() {
        services.push(Sample::Go);
    } else {
        step("no Go toolchain found: the demo deploys the C service only");
    }
    for (version, sequence) in [("1.0.0", 1), ("2.0.0", 2)] {
        for sample in &services {
            let service = sample.service();
            step(&format!(
                "building {service} {version} with {}, packaging and signing it",
                sample.compiler()
            ));
            let release = build_release(&dir, &key, *sample, version, sequence)?;
            let artifact = std::fs::read(&release.1)?;
            let sha = release.0.unverified_manifest()?.artifact.sha256;
            let len = artifact.len() as u64;
            manager
                .put_stream(
                    &format!("/v1/artifacts/{sha}"),
                    reqwest::Body::from(artifact),
                    len,
                )
                .await?;
            manager
                .post_bytes("/v1/releases", release.0.to_json())
                .await?;
            step(&format!(
                "published {service} {version}; deploying it to every device tagged lab"
            ));
            manager
                .post(
                    "/v1/deployments",
                    &json!({ "service": service, "version": version, "tag": "lab" }),
                )
                .await?;
        }
        for sample in &services {
            wait_for_version(&manager, sample.service(), version).await?;
        }
        print_fleet(&manager, &services).await?;
    }

    say("");
    say("The demo is running. Try, in another terminal:");
    let ca = ca_file.display();
    say(&format!(
        "  ferry --url {url} --token {token} --ca {ca} devices"
    ));
    say(&format!(
        "  ferry --url {url} --token {token} --ca {ca} events --follow"
    ));
    say(&format!(
        "  curl --cacert {ca} -H 'Authorization: Bearer {token}' {url}/v1/devices"
    ));
    say(&format!(
        "Service output: {}/agent-demo-1/logs/hello.log",
        dir.display()
    ));
    say("Press Ctrl-C to stop.");
    tokio::signal::ctrl_c().await.ok();

    step("stopping");
    for agent in agents {
        let _ = agent.stop.send(());
        let _ = agent.task.await;
        stop_services(&agent.data_dir);
    }
    let _ = stop_manager.send(());
    let _ = manager_task.await;
    Ok(())
}

fn loopback(addr: std::net::SocketAddr) -> std::net::SocketAddr {
    if addr.ip().is_unspecified() {
        std::net::SocketAddr::from(([127, 0, 0, 1], addr.port()))
    } else {
        addr
    }
}

async fn wait_for_manager(
    url: &str,
    data_dir: &Path,
    task: &tokio::task::JoinHandle<Result<()>>,
) -> Result<()> {
    let ca_file = data_dir.join("ca.pem");
    for _ in 0..200 {
        if task.is_finished() {
            bail!("the manager did not start (ports busy? try --http-listen and --mqtt-listen)");
        }
        // Its CA is written before it listens; trusted alone.
        let client = std::fs::read(&ca_file)
            .ok()
            .and_then(|pem| reqwest::Certificate::from_pem_bundle(&pem).ok())
            .and_then(|certs| {
                reqwest::Client::builder()
                    .tls_certs_only(certs)
                    .build()
                    .ok()
            });
        let up = match client {
            Some(client) => client.get(format!("{url}/healthz")).send().await.is_ok(),
            None => false,
        };
        if up && token_file(data_dir).exists() {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    bail!("the manager did not answer at {url}")
}

struct DemoAgent {
    data_dir: PathBuf,
    stop: oneshot::Sender<()>,
    task: tokio::task::JoinHandle<()>,
}

/// Where the demo's agents reach the manager, and the CA they trust.
struct Endpoints<'a> {
    mqtt: std::net::SocketAddr,
    http: std::net::SocketAddr,
    ca_pem: &'a str,
}

async fn start_agent(
    dir: &Path,
    id: &str,
    enrol_token: &str,
    at: &Endpoints<'_>,
) -> Result<DemoAgent> {
    let data_dir = dir.join(format!("agent-{id}"));
    // The demo's directory is the user's own (and may be private): its
    // services run as the user who started it.
    let text = format!(
        "device_id = \"{id}\"\ndata_dir = \"{}\"\nsupervisor = \"direct\"\nisolate_services = false\nhealth_interval = \"2s\"\n\
         [broker]\nurl = \"mqtts://{}\"\nenrol_token = \"{enrol_token}\"\nmanager_url = \"https://{}\"\n\
         ca_pem = \"\"\"\n{}\"\"\"\n\
         [trust]\nkeys = [\"{}\"]\n",
        data_dir.display(),
        loopback(at.mqtt),
        loopback(at.http),
        at.ca_pem,
        dir.join("ops.pub").display()
    );
    std::fs::write(dir.join(format!("agent-{id}.toml")), &text)?;
    let config = ferry_agent::config::Config::parse(&text).map_err(|e| anyhow::anyhow!(e))?;
    let (stop, stopped) = oneshot::channel::<()>();
    let task = tokio::spawn(async move {
        if let Err(e) = ferry_agent::daemon::run_with(config, None, async {
            let _ = stopped.await;
        })
        .await
        {
            eprintln!("agent stopped: {e}");
        }
    });
    Ok(DemoAgent {
        data_dir,
        stop,
        task,
    })
}

/// The demo's sample services.
#[derive(Debug, Clone, Copy)]
enum Sample {
    C,
    Go,
}

impl Sample {
    fn service(self) -> &'static str {
        match self {
            Sample::C => "hello",
            Sample::Go => "hello-go",
        }
    }

    fn compiler(self) -> &'static str {
        match self {
            Sample::C => "cc",
            Sample::Go => "go",
        }
    }
}

fn go_available() -> bool {
    Command::new("go")
        .arg("version")
        .output()
        .is_ok_and(|o| o.status.success())
}

/// Builds the sample for this machine into `binary`; returns the flags used.
fn compile(dir: &Path, sample: Sample, version: &str, binary: &Path) -> Result<String> {
    let build = dir.join("build");
    let (mut command, flags) = match sample {
        Sample::C => {
            let source = build.join("hello.c");
            std::fs::write(&source, SAMPLE)?;
            let mut c = Command::new("cc");
            c.arg("-O2")
                .arg(format!("-DVERSION=\"{version}\""))
                .arg(&source)
                .arg("-o")
                .arg(binary);
            (c, "-O2".to_string())
        }
        Sample::Go => {
            let source = build.join("hello.go");
            std::fs::write(&source, GO_SAMPLE)?;
            let flags = format!("-s -w -X main.version={version}");
            let mut go = Command::new("go");
            go.arg("build")
                .arg("-ldflags")
                .arg(&flags)
                .arg("-o")
                .arg(binary)
                .arg(&source);
            go.env("CGO_ENABLED", "0")
                .env("GOCACHE", build.join("go-cache"));
            (go, flags)
        }
    };
    let status = command.status().with_context(|| match sample {
        Sample::C => "cannot run cc: install a C compiler (Debian: apt-get install gcc)",
        Sample::Go => "cannot run go",
    })?;
    if !status.success() {
        bail!("{} failed to build the sample service", sample.compiler());
    }
    Ok(flags)
}

fn build_release(
    dir: &Path,
    key: &SecretKey,
    sample: Sample,
    version: &str,
    sequence: u64,
) -> Result<(Envelope, PathBuf)> {
    let service = sample.service();
    let tree = dir.join(format!("build/{service}-{version}"));
    std::fs::create_dir_all(tree.join("bin"))?;
    let flags = compile(dir, sample, version, &tree.join("bin").join(service))?;
    let packaged = package(
        &PackageRequest {
            dir: tree,
            service: ServiceName::new(service)?,
            version: version.parse()?,
            entrypoint: RelPath::new(format!("bin/{service}"))?,
            sequence,
            target: Target::new(ferry_agent::BUILD_TARGET)?,
            kind: Some(match sample {
                Sample::C => ArtifactKind::C,
                Sample::Go => ArtifactKind::Go,
            }),
            expires: None,
            build: BuildInfo {
                packager: Some(concat!("ferry ", env!("CARGO_PKG_VERSION")).into()),
                compiler: Some(sample.compiler().into()),
                flags: Some(flags),
                git_commit: None,
            },
            health: HealthSettings {
                window_secs: 2,
                probe: None,
            },
            reload: Vec::new(),
            run: Default::default(),
        },
        &dir.join("releases"),
    )?;
    let envelope = Envelope::sign(packaged.manifest.to_json(), &[key])?;
    Ok((envelope, packaged.artifact))
}

fn version_of<'a>(device: &'a Value, service: &str) -> Option<&'a str> {
    device["reported"]["services"]
        .as_array()?
        .iter()
        .find(|s| s["service"] == service)?["version"]
        .as_str()
}

async fn wait_for_version(manager: &Manager, service: &str, version: &str) -> Result<()> {
    for _ in 0..240 {
        let devices = manager.get("/v1/devices").await?;
        let all = devices
            .as_array()
            .map(|d| !d.is_empty() && d.iter().all(|d| version_of(d, service) == Some(version)));
        if all == Some(true) {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    bail!("the devices did not report {service} {version} within a minute")
}

async fn print_fleet(manager: &Manager, services: &[Sample]) -> Result<()> {
    let devices = manager.get("/v1/devices").await?;
    for d in devices.as_array().into_iter().flatten() {
        for sample in services {
            let service = sample.service();
            let health = d["health"]["services"]
                .as_array()
                .and_then(|s| s.iter().find(|s| s["service"] == service))
                .cloned()
                .unwrap_or(Value::Null);
            say(&format!(
                "    {:<8} {:<8} {:<8} {:<6} pid {:<7} rss {:>5} KiB  {}",
                d["device_id"].as_str().unwrap_or("?"),
                if d["online"] == true {
                    "online"
                } else {
                    "offline"
                },
                service,
                version_of(d, service).unwrap_or("-"),
                health["pid"].as_u64().map_or("-".into(), |p| p.to_string()),
                health["rss_bytes"].as_u64().unwrap_or(0) / 1024,
                if version_of(d, service).is_some() {
                    "installed"
                } else {
                    "-"
                },
            ));
        }
    }
    Ok(())
}

fn stop_services(data_dir: &Path) {
    ferry_agent::supervisor::direct::stop_leftovers(&data_dir.join("run"));
}
