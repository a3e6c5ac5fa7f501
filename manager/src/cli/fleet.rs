//! Fleet commands: `ferry device add|revoke|remove|tags|ID`, `ferry devices`,
//! `ferry health`, `ferry events`; the device selector deployments and
//! rollouts share.

use anyhow::Result;
use serde_json::{Value, json};

use super::Outcome;
use crate::client::Manager;
use crate::files::{Existing, write_atomic};

#[derive(Debug, clap::Args)]
#[command(args_conflicts_with_subcommands = true)]
pub(crate) struct DeviceArgs {
    #[command(subcommand)]
    action: Option<DeviceAction>,
    /// Show this device.
    id: Option<String>,
}

#[derive(Debug, clap::Subcommand)]
enum DeviceAction {
    /// Register a device and print its enrolment bundle: the fleet CA's
    /// fingerprint and a one-time token with which the device gets a client
    /// certificate for a key it makes itself (a password instead over plain
    /// MQTT or an external broker). Again for a known device: new
    /// credentials, and the old ones stop working at once.
    Add {
        /// The device id (letters, digits, '.', '_', '-').
        id: String,
        /// A tag to deploy by; repeatable.
        #[arg(long = "tag")]
        tags: Vec<String>,
        /// Also write the device's complete agent.toml here (mode 0600: it
        /// holds the token or password; never replaces a file).
        #[arg(long, value_name = "FILE")]
        agent_config: Option<std::path::PathBuf>,
        /// A password instead of a certificate (for an external broker such
        /// as mosquitto, or --insecure-plaintext).
        #[arg(long)]
        password: bool,
    },
    /// Revoke a device: its certificate, key and password are refused at
    /// once by the broker and the API, its session ends; its record and
    /// history stay. `ferry device add ID` lets it enrol again.
    Revoke {
        /// The device id.
        id: String,
    },
    /// Forget a device: its credentials stop working and its session ends
    /// at once (on the embedded broker).
    Remove {
        /// The device id.
        id: String,
    },
    /// Replace a device's tags.
    Tags {
        /// The device id.
        id: String,
        /// Its new tags (none clears them).
        tags: Vec<String>,
    },
}

pub(crate) async fn device(manager: &Manager, args: DeviceArgs) -> Result<Outcome> {
    match (args.action, args.id) {
        (
            Some(DeviceAction::Add {
                id,
                tags,
                agent_config,
                password,
            }),
            _,
        ) => {
            // Refused before the device is (re)added: a new password that
            // could not be written down would lock the device out.
            if let Some(path) = agent_config.as_ref().filter(|p| p.exists()) {
                anyhow::bail!("{} exists; name another file", path.display());
            }
            let mut request = json!({ "device_id": id, "tags": tags });
            if password {
                request["credential"] = json!("password");
            }
            let created = manager.post("/v1/devices", &request).await?;
            let s = |key: &str| created[key].as_str().unwrap_or_default().to_owned();
            let mut text = if created["credential"] == "certificate" {
                format!(
                    "device {id} added\nenrolment token: {} (one use, until {})\nfleet CA fingerprint: {}\nmanager: {}",
                    s("enrol_token"),
                    s("enrol_expires"),
                    s("ca_fingerprint"),
                    s("manager_url"),
                )
            } else {
                format!(
                    "device {id} added\nusername: {}\npassword: {}",
                    s("username"),
                    s("password")
                )
            };
            match &agent_config {
                Some(path) => {
                    let toml = agent_toml(&created);
                    write_atomic(path, toml.as_bytes(), 0o600, Existing::Keep)?;
                    text.push_str(&format!(
                        "\nwrote {} (copy it to the device as /etc/ferry/agent.toml, with the release keys as /etc/ferry/ops.pub)",
                        path.display()
                    ));
                }
                None => text.push_str(
                    "\n(put them in the device's agent.toml [broker] with manager_url and the fleet CA as ca_pem, or write the whole file with --agent-config FILE; they are not shown again)",
                ),
            }
            Ok(Outcome::ok(text, created))
        }
        (Some(DeviceAction::Revoke { id }), _) => {
            let revoked = manager
                .post(&format!("/v1/devices/{id}/revoke"), &json!({}))
                .await?;
            Ok(Outcome::ok(
                format!(
                    "device {id} revoked: its certificate and credentials are refused from now on (`ferry device add {id}` to enrol it again)"
                ),
                revoked,
            ))
        }
        (Some(DeviceAction::Remove { id }), _) => {
            let removed = manager.delete(&format!("/v1/devices/{id}")).await?;
            Ok(Outcome::ok(
                format!("device {id} removed: its credentials no longer work"),
                removed,
            ))
        }
        (Some(DeviceAction::Tags { id, tags }), _) => {
            let set = manager
                .put_json(&format!("/v1/devices/{id}/tags"), &json!(tags))
                .await?;
            Ok(Outcome::ok(format!("{id} tags: {}", tags.join(", ")), set))
        }
        (None, Some(id)) => {
            let device = manager.get(&format!("/v1/devices/{id}")).await?;
            Ok(Outcome::ok(describe_device(&device), device))
        }
        (None, None) => anyhow::bail!("name a device, or `ferry device add ID`"),
    }
}

/// A device's whole agent.toml, from what `POST /v1/devices` answered.
fn agent_toml(created: &Value) -> String {
    let s = |key: &str| created[key].as_str().unwrap_or_default().to_owned();
    format!(
        "# ferry-agent configuration for {id}, written by `ferry device add`.\n\
         device_id = \"{id}\"\n\
         data_dir = \"/var/lib/ferry\"\n\
         inbox = \"/var/lib/ferry/inbox\"\n\
         supervisor = \"auto\"\n\
         health_interval = \"30s\"\n\
         \n\
         [broker]\n\
         url = \"{broker}\"\n\
         {proof}\
         manager_url = \"{manager}\"\n\
         {ca}\
         \n\
         [trust]\n\
         keys = [\"/etc/ferry/ops.pub\"]\n\
         threshold = 1\n",
        id = s("device_id"),
        broker = s("broker_url"),
        // A certificate device makes its key and enrols with the token;
        // a password device signs in.
        proof = if created["credential"] == "certificate" {
            format!("enrol_token = \"{}\"\n", s("enrol_token"))
        } else {
            format!(
                "username = \"{}\"\npassword = \"{}\"\n",
                s("username"),
                s("password")
            )
        },
        manager = s("manager_url"),
        // The fleet CA, the only one the device trusts for its manager.
        ca = created["ca_pem"]
            .as_str()
            .map(|pem| format!("ca_pem = \"\"\"\n{pem}\"\"\"\n"))
            .unwrap_or_default(),
    )
}

fn services(device: &Value) -> String {
    device["reported"]["services"]
        .as_array()
        .map(|s| {
            s.iter()
                .map(|s| {
                    format!(
                        "{} {}",
                        s["service"].as_str().unwrap_or("?"),
                        s["version"].as_str().unwrap_or("?")
                    )
                })
                .collect::<Vec<_>>()
                .join(", ")
        })
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "-".into())
}

fn status(d: &Value) -> &'static str {
    if d["online"].as_bool() == Some(true) {
        "online"
    } else {
        "offline"
    }
}

fn tags(d: &Value) -> String {
    d["tags"]
        .as_array()
        .map(|t| {
            t.iter()
                .filter_map(Value::as_str)
                .collect::<Vec<_>>()
                .join(",")
        })
        .unwrap_or_default()
}

fn describe_device(d: &Value) -> String {
    let mut text = format!(
        "{}  {}  tags: {}\nservices: {}\nlast seen: {}",
        d["device_id"].as_str().unwrap_or("?"),
        status(d),
        tags(d),
        services(d),
        d["last_seen"].as_str().unwrap_or("never"),
    );
    let credential = &d["credential"];
    if let Some(kind) = credential["kind"].as_str() {
        text.push_str(&format!("\ncredential: {kind}"));
        if let Some(until) = credential["not_after"].as_str() {
            text.push_str(&format!(" (valid until {until})"));
        }
    }
    text.push_str(&format!(
        "\ndesired state confirmed: {}",
        d["reported"]["desired_confirmed_at"]
            .as_str()
            .unwrap_or("never")
    ));
    if let Some(result) = d["reported"]["last_result"].as_object() {
        text.push_str(&format!(
            "\nlast deployment: {} {} {}{}",
            result.get("service").and_then(Value::as_str).unwrap_or("?"),
            result.get("version").and_then(Value::as_str).unwrap_or("?"),
            result.get("outcome").and_then(Value::as_str).unwrap_or("?"),
            result
                .get("reason")
                .and_then(Value::as_str)
                .map(|r| format!(": {r}"))
                .unwrap_or_default(),
        ));
    }
    if let Some(health) = d["health"].as_object() {
        text.push_str(&format!(
            "\nhealth: cpu {:.0}%  load {:.2}  memory {} MiB free  disk {} MiB free",
            health
                .get("cpu")
                .and_then(|c| c["usage_percent"].as_f64())
                .unwrap_or(0.0),
            health
                .get("cpu")
                .and_then(|c| c["load1"].as_f64())
                .unwrap_or(0.0),
            health
                .get("memory")
                .and_then(|m| m["available_bytes"].as_u64())
                .unwrap_or(0)
                >> 20,
            health
                .get("disk")
                .and_then(|m| m["free_bytes"].as_u64())
                .unwrap_or(0)
                >> 20,
        ));
    }
    text
}

pub(crate) async fn devices(manager: &Manager) -> Result<Outcome> {
    let list = manager.get("/v1/devices").await?;
    let mut text = format!(
        "{:<20} {:<8} {:<20} {}",
        "DEVICE", "STATUS", "TAGS", "SERVICES"
    );
    for d in list.as_array().into_iter().flatten() {
        text.push_str(&format!(
            "\n{:<20} {:<8} {:<20} {}",
            d["device_id"].as_str().unwrap_or("?"),
            status(d),
            tags(d),
            services(d),
        ));
    }
    Ok(Outcome::ok(text, list))
}

/// Which devices: exactly one of `--device ID...`, `--tag T`, `--all`.
#[derive(Debug, clap::Args)]
#[group(required = true, multiple = false)]
pub(crate) struct Targets {
    /// These devices; repeatable.
    #[arg(long = "device", value_name = "ID")]
    pub devices: Vec<String>,
    /// Every device with this tag.
    #[arg(long)]
    pub tag: Option<String>,
    /// Every device.
    #[arg(long)]
    pub all: bool,
}

impl Targets {
    /// The API's request body: `service`, `version` and these devices.
    pub fn request(&self, service: &str, version: &str) -> Value {
        json!({
            "service": service,
            "version": version,
            "devices": self.devices,
            "tag": self.tag,
            "all": self.all,
        })
    }
}

#[derive(Debug, clap::Args)]
pub(crate) struct HistoryArgs {
    /// Only this device.
    #[arg(long)]
    device: Option<String>,
    /// Keep printing new ones as they arrive.
    #[arg(long)]
    follow: bool,
}

/// `ferry health` and `ferry events`: recent history, and with `--follow`
/// new entries as they arrive (one JSON object per line with `--json`).
pub(crate) async fn history(
    manager: &Manager,
    kind: &str,
    args: HistoryArgs,
    json_out: bool,
) -> Result<Outcome> {
    let mut after = 0i64;
    let device = args
        .device
        .map(|d| format!("&device={d}"))
        .unwrap_or_default();
    loop {
        let rows = manager
            .get(&format!("/v1/{kind}?after={after}{device}"))
            .await?;
        let rows = rows.as_array().cloned().unwrap_or_default();
        if !args.follow {
            let text = rows
                .iter()
                .map(|r| line(kind, r))
                .collect::<Vec<_>>()
                .join("\n");
            return Ok(Outcome::ok(text, Value::Array(rows)));
        }
        for row in &rows {
            after = after.max(row["id"].as_i64().unwrap_or(after));
            if json_out {
                super::print_stdout(&row.to_string());
            } else {
                super::print_stdout(&line(kind, row));
            }
        }
        tokio::time::sleep(std::time::Duration::from_secs(1)).await;
    }
}

fn line(kind: &str, row: &Value) -> String {
    let m = &row["message"];
    let device = row["device_id"].as_str().unwrap_or("?");
    if kind == "events" {
        format!(
            "{} {device} {} {} {} {}{}",
            m["time"].as_str().unwrap_or(""),
            m["release"]["service"].as_str().unwrap_or("-"),
            m["release"]["version"].as_str().unwrap_or("-"),
            m["step"].as_str().unwrap_or("?"),
            m["status"].as_str().unwrap_or("?"),
            m["reason"]
                .as_str()
                .map(|r| format!(": {r}"))
                .unwrap_or_default(),
        )
    } else {
        format!(
            "{} {device} cpu {:.0}% load {:.2} mem {} MiB free, {} service(s)",
            m["time"].as_str().unwrap_or(""),
            m["cpu"]["usage_percent"].as_f64().unwrap_or(0.0),
            m["cpu"]["load1"].as_f64().unwrap_or(0.0),
            m["memory"]["available_bytes"].as_u64().unwrap_or(0) >> 20,
            m["services"].as_array().map_or(0, Vec::len),
        )
    }
}
