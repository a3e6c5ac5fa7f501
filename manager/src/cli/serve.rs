//! `ferry serve`: runs the manager.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, Result};
use serde_json::json;

use super::Outcome;
use crate::serve::{ServeConfig, serve};

/// Flags override the config file, which overrides the defaults.
#[derive(Debug, Default, clap::Args, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct Args {
    /// A TOML file with any of the settings below (same names, `_` for `-`).
    #[arg(long, value_name = "FILE")]
    #[serde(skip)]
    config: Option<PathBuf>,
    /// Address of the embedded MQTT broker [default: 0.0.0.0:1883].
    #[arg(long, value_name = "ADDR")]
    mqtt_listen: Option<SocketAddr>,
    /// Address of the HTTP API and artifact store [default: 0.0.0.0:8080].
    #[arg(long, value_name = "ADDR")]
    http_listen: Option<SocketAddr>,
    /// Where the database, artifacts and operator token live [default: ferry-data].
    #[arg(long, value_name = "DIR")]
    data_dir: Option<PathBuf>,
    /// Use this broker instead of the embedded one: mqtt://[USER:PASS@]HOST[:PORT].
    #[arg(long, value_name = "URL")]
    broker: Option<String>,
    /// The URL devices reach this manager's HTTP API at [default: from --http-listen].
    #[arg(long, value_name = "URL")]
    public_url: Option<String>,
    /// Mark a device offline after this much silence, e.g. 90s [default: 90s].
    #[arg(long, value_name = "DURATION")]
    offline_after: Option<String>,
}

impl Args {
    /// These flags over the file's settings.
    fn over(self, file: Args) -> Args {
        Args {
            config: None,
            mqtt_listen: self.mqtt_listen.or(file.mqtt_listen),
            http_listen: self.http_listen.or(file.http_listen),
            data_dir: self.data_dir.or(file.data_dir),
            broker: self.broker.or(file.broker),
            public_url: self.public_url.or(file.public_url),
            offline_after: self.offline_after.or(file.offline_after),
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
    let config = ServeConfig {
        mqtt_listen: args
            .mqtt_listen
            .unwrap_or(SocketAddr::from(([0, 0, 0, 0], 1883))),
        http_listen: args
            .http_listen
            .unwrap_or(SocketAddr::from(([0, 0, 0, 0], 8080))),
        data_dir: args.data_dir.unwrap_or_else(|| PathBuf::from("ferry-data")),
        broker: args.broker,
        public_url: args.public_url,
        offline_after: offline_after.max(Duration::from_secs(3)),
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
