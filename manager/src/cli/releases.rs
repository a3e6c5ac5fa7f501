//! `ferry releases [SERVICE]` and `ferry release SERVICE VERSION`: what the
//! manager holds. What a release says is read from its signed envelope, but
//! nothing is verified here: `ferry verify` does that, with your keys.

use anyhow::{Context, Result};
use ferry_protocol::Envelope;
use serde_json::Value;

use super::Outcome;
use crate::client::Manager;
use crate::files::{Existing, write_atomic};

#[derive(Debug, clap::Args)]
pub(crate) struct ListArgs {
    /// Only this service's releases.
    service: Option<String>,
}

#[derive(Debug, clap::Args)]
pub(crate) struct ShowArgs {
    /// The service.
    service: String,
    /// The version.
    version: String,
    /// Also write its signed envelope to this file (check it with `ferry verify`).
    #[arg(long, value_name = "FILE")]
    envelope: Option<std::path::PathBuf>,
}

/// Every published release, newest sequence first per service.
pub(crate) async fn list(manager: &Manager, args: ListArgs) -> Result<Outcome> {
    let all = manager.get("/v1/releases").await?;
    let rows: Vec<Value> = all
        .as_array()
        .into_iter()
        .flatten()
        .filter(|r| {
            args.service
                .as_deref()
                .is_none_or(|s| r["service"].as_str() == Some(s))
        })
        .cloned()
        .collect();
    let mut text = format!(
        "{:<16} {:<24} {:>8} {:>12} {:<16} {}",
        "SERVICE", "VERSION", "SEQUENCE", "BYTES", "SHA256", "PUBLISHED"
    );
    for r in &rows {
        let sha = r["sha256"].as_str().unwrap_or("?");
        text.push_str(&format!(
            "\n{:<16} {:<24} {:>8} {:>12} {:<16} {}",
            r["service"].as_str().unwrap_or("?"),
            r["version"].as_str().unwrap_or("?"),
            r["sequence"],
            r["size"],
            sha.get(..16).unwrap_or(sha),
            r["created"].as_str().unwrap_or("?"),
        ));
    }
    if rows.is_empty() {
        text = "no releases yet; publish one with `ferry publish`".into();
    }
    Ok(Outcome::ok(text, Value::Array(rows)))
}

/// One release, with what its manifest says and who signed it.
pub(crate) async fn show(manager: &Manager, args: ShowArgs) -> Result<Outcome> {
    let row = manager
        .get(&format!("/v1/releases/{}/{}", args.service, args.version))
        .await?;
    let bytes = row["envelope"].to_string();
    let envelope = Envelope::from_json(bytes.as_bytes())
        .context("the manager's copy does not read as a signed envelope")?;
    let manifest = envelope
        .unverified_manifest()
        .context("the manager's copy holds no readable manifest")?;
    if let Some(path) = &args.envelope {
        write_atomic(path, &envelope.to_json(), 0o644, Existing::Replace)?;
    }
    let signers: Vec<String> = envelope
        .signatures
        .iter()
        .map(|s| s.key_id.to_string())
        .collect();
    let text = format!(
        "{} {} (sequence {}, target {}, kind {:?})\nartifact sha256 {} ({} bytes)\nexpires: {}\nsigned by: {} (not verified here; use `ferry verify`)",
        manifest.service,
        manifest.version,
        manifest.sequence,
        manifest.target,
        manifest.kind,
        manifest.artifact.sha256,
        manifest.artifact.size,
        manifest
            .expires
            .map_or_else(|| "never".to_owned(), |t| t.to_string()),
        signers.join(", "),
    );
    Ok(Outcome::ok(text, row))
}
