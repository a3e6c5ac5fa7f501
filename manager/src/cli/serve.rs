//! `ferry serve`: runs the manager.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Result;
use serde_json::json;

use super::Outcome;
use crate::serve::{ServeConfig, serve};

#[derive(Debug, clap::Args)]
pub(crate) struct Args {
    /// Address of the embedded MQTT broker.
    #[arg(long, value_name = "ADDR", default_value = "0.0.0.0:1883")]
    mqtt_listen: SocketAddr,
    /// Address of the HTTP API, artifact store and dashboard.
    #[arg(long, value_name = "ADDR", default_value = "0.0.0.0:8080")]
    http_listen: SocketAddr,
    /// Where the database, artifacts and operator token live.
    #[arg(long, value_name = "DIR", default_value = "ferry-data")]
    data_dir: PathBuf,
    /// Use this broker instead of the embedded one: mqtt://[USER:PASS@]HOST[:PORT].
    #[arg(long, value_name = "URL")]
    broker: Option<String>,
    /// The URL devices reach this manager's HTTP API at [default: from --http-listen].
    #[arg(long, value_name = "URL")]
    public_url: Option<String>,
    /// Mark a device offline after this much silence.
    #[arg(long, value_name = "DURATION", default_value = "90s", value_parser = humantime::parse_duration)]
    offline_after: Duration,
}

pub(crate) async fn run(args: Args) -> Result<Outcome> {
    let config = ServeConfig {
        mqtt_listen: args.mqtt_listen,
        http_listen: args.http_listen,
        data_dir: args.data_dir,
        broker: args.broker,
        public_url: args.public_url,
        offline_after: args.offline_after.max(Duration::from_secs(3)),
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
