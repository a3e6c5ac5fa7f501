//! `ferry nats-config`: the accounts and auth callout block every server
//! of a NATS cluster needs for Ferry (see "Running a cluster").

use std::path::PathBuf;

use anyhow::Result;
use serde_json::json;

use super::Outcome;
use crate::serve::nats;

#[derive(Debug, clap::Args)]
pub(crate) struct Args {
    /// The callout issuer's nkey seed, made if missing (mode 0600): the
    /// same file every replica's `ferry serve --nats-issuer` names.
    #[arg(long, value_name = "FILE")]
    nats_issuer: PathBuf,
    /// The NATS user the replicas answer the callout as (the user of
    /// `--nats-callout`).
    #[arg(long, value_name = "USER", default_value = "ferry-callout")]
    callout_user: String,
    /// Its password.
    #[arg(
        long,
        value_name = "PASSWORD",
        env = "FERRY_NATS_CALLOUT_PASSWORD",
        hide_env_values = true
    )]
    callout_password: String,
    /// A name (host name or address) devices reach the cluster's MQTT
    /// gateways by, repeatable: issues the servers a certificate from the
    /// fleet CA in --data-dir for these names, and prints the `tls` block
    /// for each server's `mqtt` section (devices then show their
    /// certificates to the cluster).
    #[arg(long = "tls-name", value_name = "NAME")]
    tls_names: Vec<String>,
    /// The manager's data directory, where the fleet CA is (made there if
    /// need be) and the broker certificate is written [default: ferry-data].
    #[arg(long, value_name = "DIR", default_value = "ferry-data")]
    data_dir: PathBuf,
}

pub(crate) fn run(args: Args) -> Result<Outcome> {
    let issuer = nats::issuer(&args.nats_issuer)?.public_key();
    let config = nats::server_config(&issuer, &args.callout_user, &args.callout_password);
    let mqtt_tls = if args.tls_names.is_empty() {
        None
    } else {
        std::fs::create_dir_all(&args.data_dir)?;
        let certificate =
            crate::serve::tls::issue_broker_certificate(&args.data_dir, &args.tls_names)?;
        Some(nats::mqtt_tls_config(&certificate))
    };
    let text = match &mqtt_tls {
        Some(tls) => format!("{config}\n# In each server's mqtt {{ ... }} section:\n{tls}"),
        None => config.clone(),
    };
    Ok(Outcome::ok(
        text.trim_end().to_string(),
        json!({ "ok": true, "issuer": issuer, "config": config, "mqtt_tls": mqtt_tls }),
    ))
}
