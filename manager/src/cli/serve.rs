//! `ferry serve`: runs the manager.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, Result};
use serde_json::json;

use super::Outcome;
use crate::serve::http::HttpLimits;
use crate::serve::limits::DeviceLimits;
use crate::serve::{ServeConfig, serve};

/// Flags override the config file, which overrides the defaults.
#[derive(Debug, Default, clap::Args, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct Args {
    /// A TOML file with any of the settings below (same names, `_` for `-`).
    #[arg(long, value_name = "FILE")]
    #[serde(skip)]
    config: Option<PathBuf>,
    /// Address of the embedded MQTT broker [default: 0.0.0.0:8883, or
    /// 0.0.0.0:1883 with --insecure-plaintext].
    #[arg(long, value_name = "ADDR")]
    mqtt_listen: Option<SocketAddr>,
    /// Address of the HTTP API and artifact store [default: 0.0.0.0:8443, or
    /// 0.0.0.0:8080 with --insecure-plaintext].
    #[arg(long, value_name = "ADDR")]
    http_listen: Option<SocketAddr>,
    /// A name (host name or address) devices and operators reach this
    /// manager by, for its TLS certificate; repeatable. Loopback, this
    /// machine's host name and the --public-url host are always covered.
    #[arg(long = "public-name", value_name = "NAME")]
    #[serde(default)]
    public_names: Vec<String>,
    /// Serve MQTT and HTTP without TLS: the operator token, device
    /// passwords and releases cross the network in clear. For a test bench
    /// or behind a TLS-terminating proxy only.
    #[arg(long)]
    #[serde(default)]
    insecure_plaintext: bool,
    /// How long a device certificate is valid, e.g. 24h; devices renew two
    /// thirds into it [default: 24h].
    #[arg(long, value_name = "DURATION")]
    device_cert_lifetime: Option<String>,
    /// Where the database, artifacts and operator token live [default: ferry-data].
    #[arg(long, value_name = "DIR")]
    data_dir: Option<PathBuf>,
    /// The database: sqlite://PATH, or postgres://USER:PASSWORD@HOST/NAME
    /// shared by manager replicas [default: sqlite://DATA_DIR/ferry.db].
    #[arg(long, value_name = "URL")]
    database: Option<String>,
    /// Use this broker instead of the embedded one: mqtt://[USER:PASS@]HOST[:PORT].
    #[arg(long, value_name = "URL")]
    broker: Option<String>,
    /// With a NATS cluster as --broker: answer its auth callout as this NATS
    /// user, nats://USER:PASS@HOST:PORT[,HOST:PORT...] (see "Running a
    /// cluster" in the README).
    #[arg(long, value_name = "URL", requires = "broker")]
    nats_callout: Option<String>,
    /// The callout issuer's account nkey seed, made on first start; every
    /// replica uses the same [default: DATA_DIR/nats-issuer.nk].
    #[arg(long, value_name = "FILE")]
    nats_issuer: Option<PathBuf>,
    /// The URL devices reach this manager's HTTP API at [default: from --http-listen].
    #[arg(long, value_name = "URL")]
    public_url: Option<String>,
    /// Mark a device offline after this much silence, e.g. 90s [default: 90s].
    #[arg(long, value_name = "DURATION")]
    offline_after: Option<String>,
    /// HTTP connections served at once; more wait to be accepted [default: 1024].
    #[arg(long, value_name = "N")]
    http_max_connections: Option<usize>,
    /// Messages a device may publish per second (bursts of 10 s worth) [default: 20].
    #[arg(long, value_name = "N")]
    device_messages_per_sec: Option<f64>,
    /// Bytes a device may publish per second (bursts of 8 s worth, at least 1 MiB) [default: 131072].
    #[arg(long, value_name = "BYTES")]
    device_bytes_per_sec: Option<f64>,
}

impl Args {
    /// These flags over the file's settings.
    fn over(self, file: Args) -> Args {
        Args {
            config: None,
            mqtt_listen: self.mqtt_listen.or(file.mqtt_listen),
            http_listen: self.http_listen.or(file.http_listen),
            public_names: if self.public_names.is_empty() {
                file.public_names
            } else {
                self.public_names
            },
            insecure_plaintext: self.insecure_plaintext || file.insecure_plaintext,
            device_cert_lifetime: self.device_cert_lifetime.or(file.device_cert_lifetime),
            data_dir: self.data_dir.or(file.data_dir),
            database: self.database.or(file.database),
            broker: self.broker.or(file.broker),
            nats_callout: self.nats_callout.or(file.nats_callout),
            nats_issuer: self.nats_issuer.or(file.nats_issuer),
            public_url: self.public_url.or(file.public_url),
            offline_after: self.offline_after.or(file.offline_after),
            http_max_connections: self.http_max_connections.or(file.http_max_connections),
            device_messages_per_sec: self
                .device_messages_per_sec
                .or(file.device_messages_per_sec),
            device_bytes_per_sec: self.device_bytes_per_sec.or(file.device_bytes_per_sec),
        }
    }
}

pub(crate) async fn run(args: Args) -> Result<Outcome> {
    let args = match &args.config {
        Some(path) => {
            let text = std::fs::read_to_string(path)
                .with_context(|| format!("cannot read {}", path.display()))?;
            let file: Args =
                toml::from_str(&text).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
            args.over(file)
        }
        None => args,
    };
    let offline_after = match &args.offline_after {
        Some(text) => {
            humantime::parse_duration(text).with_context(|| format!("offline_after {text:?}"))?
        }
        None => Duration::from_secs(90),
    };
    let device_cert_lifetime = match &args.device_cert_lifetime {
        Some(text) => humantime::parse_duration(text)
            .with_context(|| format!("device_cert_lifetime {text:?}"))?,
        None => crate::serve::DEVICE_CERT_LIFETIME,
    };
    if device_cert_lifetime < Duration::from_secs(60) {
        anyhow::bail!("device_cert_lifetime must be at least a minute");
    }
    let default_limits = HttpLimits::default();
    let device_limits = device_limits(&args)?;
    let tls = !args.insecure_plaintext;
    let (mqtt_port, http_port) = if tls { (8883, 8443) } else { (1883, 8080) };
    let data_dir = args.data_dir.unwrap_or_else(|| PathBuf::from("ferry-data"));
    let auth_callout = match &args.nats_callout {
        Some(url) => {
            if args.broker.is_none() {
                anyhow::bail!("nats_callout needs broker: the NATS cluster's MQTT address");
            }
            let issuer = args
                .nats_issuer
                .clone()
                .unwrap_or_else(|| data_dir.join("nats-issuer.nk"));
            Some(crate::serve::nats::AuthCallout::parse(url, issuer)?)
        }
        None => None,
    };
    let database = match &args.database {
        Some(url) => Some(url.parse().map_err(|e| anyhow::anyhow!("database: {e}"))?),
        None => None,
    };
    let config = ServeConfig {
        mqtt_listen: args
            .mqtt_listen
            .unwrap_or(SocketAddr::from(([0, 0, 0, 0], mqtt_port))),
        http_listen: args
            .http_listen
            .unwrap_or(SocketAddr::from(([0, 0, 0, 0], http_port))),
        tls,
        public_names: args.public_names,
        device_cert_lifetime,
        data_dir,
        database,
        broker: args.broker,
        auth_callout,
        public_url: args.public_url,
        offline_after: offline_after.max(Duration::from_secs(3)),
        http_limits: HttpLimits {
            max_connections: args
                .http_max_connections
                .unwrap_or(default_limits.max_connections),
            ..default_limits
        },
        device_limits,
    };
    serve(config, shutdown()).await?;
    Ok(Outcome::ok("manager stopped".into(), json!({ "ok": true })))
}

async fn shutdown() {
    use tokio::signal::unix::{SignalKind, signal};
    if let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) {
        tokio::select! {
            _ = term.recv() => {}
            _ = int.recv() => {}
        }
    } else {
        std::future::pending::<()>().await;
    }
}

/// A device's budget from the flags: bursts of 10 s of messages and 8 s of
/// bytes (never under 1 MiB, the largest message a device may send).
fn device_limits(args: &Args) -> Result<DeviceLimits> {
    let d = DeviceLimits::default();
    let messages = args.device_messages_per_sec.unwrap_or(d.messages_per_sec);
    let bytes = args.device_bytes_per_sec.unwrap_or(d.bytes_per_sec);
    if !(messages > 0.0 && bytes > 0.0 && messages.is_finite() && bytes.is_finite()) {
        anyhow::bail!("device budgets must be positive numbers");
    }
    Ok(DeviceLimits {
        messages_per_sec: messages,
        message_burst: messages * 10.0,
        bytes_per_sec: bytes,
        byte_burst: (bytes * 8.0).max(d.byte_burst),
    })
}

#[cfg(test)]
mod tests {
    use super::Args;

    #[test]
    fn the_replica_example_settings_parse() {
        let text = include_str!("../../../systemd/manager-replica.toml");
        let args: Args = toml::from_str(text).unwrap();
        assert!(args.database.is_some_and(|d| d.starts_with("postgres://")));
        assert!(args.nats_callout.is_some() && args.broker.is_some());
    }
}
