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
}

pub(crate) fn run(args: Args) -> Result<Outcome> {
    let issuer = nats::issuer(&args.nats_issuer)?.public_key();
    let config = nats::server_config(&issuer, &args.callout_user, &args.callout_password);
    Ok(Outcome::ok(
        config.trim_end().to_string(),
        json!({ "ok": true, "issuer": issuer, "config": config }),
    ))
}
