//! `ferry deploy` (with `--wait`), `ferry deployment N`, `ferry deployments`:
//! a published release sent to devices at once, and how it ended on each.

use std::time::{Duration, Instant};

use anyhow::Result;
use serde_json::Value;

use super::Outcome;
use super::fleet::Targets;
use crate::client::Manager;

#[derive(Debug, clap::Args)]
pub(crate) struct DeployArgs {
    /// The service.
    service: String,
    /// The published version to deploy.
    version: String,
    #[command(flatten)]
    targets: Targets,
    /// Wait until every device has an outcome; exit 0 only if all committed.
    #[arg(long)]
    wait: bool,
    /// With --wait, give up after this long (e.g. 90s, 10m).
    #[arg(long, value_name = "DURATION", value_parser = humantime::parse_duration, default_value = "10m", requires = "wait")]
    timeout: Duration,
}

#[derive(Debug, clap::Args)]
pub(crate) struct ShowArgs {
    /// The deployment's id (`ferry deploy` prints it).
    id: i64,
}

/// Where a device stands in a deployment once it is done there.
fn finished(status: &str) -> bool {
    matches!(
        status,
        "installed" | "failed" | "rolled_back" | "rejected" | "superseded"
    )
}

pub(crate) async fn deploy(manager: &Manager, args: DeployArgs) -> Result<Outcome> {
    let created = manager
        .post(
            "/v1/deployments",
            &args.targets.request(&args.service, &args.version),
        )
        .await?;
    let id = created["id"].as_i64().unwrap_or_default();
    let devices: Vec<&str> = created["devices"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(Value::as_str)
        .collect();
    let mut text = format!(
        "deployment {id} of {} {} to {} device(s): {}",
        args.service,
        args.version,
        devices.len(),
        devices.join(", "),
    );
    for (device, reason) in created["refused"].as_object().into_iter().flatten() {
        text.push_str(&format!(
            "\n  not sent to {device}: {}",
            reason.as_str().unwrap_or("?")
        ));
    }
    if !args.wait {
        text.push_str(&format!(
            "\nfollow it with `ferry deployment {id}` (or `ferry deploy ... --wait`)"
        ));
        return Ok(Outcome::ok(text, created));
    }
    let deployment = wait(manager, id, args.timeout).await?;
    Ok(judged(&deployment, Some(args.timeout)))
}

/// Asks once a second until every device is done, or `limit` passes.
async fn wait(manager: &Manager, id: i64, limit: Duration) -> Result<Value> {
    let deadline = Instant::now() + limit;
    let bar = indicatif::ProgressBar::new_spinner();
    loop {
        let deployment = manager.get(&format!("/v1/deployments/{id}")).await?;
        let (done, total) = counts(&deployment);
        bar.set_message(format!("{done}/{total} device(s) done"));
        if done == total || Instant::now() >= deadline {
            bar.finish_and_clear();
            return Ok(deployment);
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

fn counts(deployment: &Value) -> (usize, usize) {
    let devices = deployment["devices"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    let done = devices
        .iter()
        .filter(|d| finished(d["status"].as_str().unwrap_or("")))
        .count();
    (done, devices.len())
}

/// The deployment, as text with a line per device; refused (exit 1)
/// unless every device committed the release. `waited` says the limit
/// when the caller waited for it.
fn judged(deployment: &Value, waited: Option<Duration>) -> Outcome {
    let devices = deployment["devices"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    let installed = devices
        .iter()
        .filter(|d| d["status"] == "installed")
        .count();
    let (done, total) = counts(deployment);
    let mut text = format!(
        "deployment {} of {} {}: {installed} of {total} device(s) installed",
        deployment["id"],
        deployment["service"].as_str().unwrap_or("?"),
        deployment["version"].as_str().unwrap_or("?"),
    );
    if let (Some(limit), true) = (waited, done < total) {
        text.push_str(&format!(
            ", {} still without an outcome after {}",
            total - done,
            humantime::format_duration(limit)
        ));
    }
    for d in &devices {
        let reason = d["reason"]
            .as_str()
            .map(|r| format!(": {r}"))
            .unwrap_or_default();
        text.push_str(&format!(
            "\n  {:<24} {}{reason}",
            d["device_id"].as_str().unwrap_or("?"),
            d["status"].as_str().unwrap_or("?"),
        ));
    }
    if installed == total && total > 0 {
        Outcome::ok(text, deployment.clone())
    } else if waited.is_some() {
        Outcome::refused(text, deployment.clone())
    } else {
        Outcome::ok(text, deployment.clone())
    }
}

/// `ferry deployment N`: one deployment, a line per device.
pub(crate) async fn show(manager: &Manager, args: ShowArgs) -> Result<Outcome> {
    let deployment = manager.get(&format!("/v1/deployments/{}", args.id)).await?;
    Ok(judged(&deployment, None))
}

/// `ferry deployments`: every deployment, newest first, a line each.
pub(crate) async fn list(manager: &Manager) -> Result<Outcome> {
    let all = manager.get("/v1/deployments").await?;
    let lines: Vec<String> = all
        .as_array()
        .into_iter()
        .flatten()
        .map(|d| {
            let (done, total) = counts(d);
            let installed = d["devices"].as_array().map_or(0, |ds| {
                ds.iter().filter(|x| x["status"] == "installed").count()
            });
            format!(
                "deployment {} of {} {}: {installed}/{total} installed, {} waiting ({})",
                d["id"],
                d["service"].as_str().unwrap_or("?"),
                d["version"].as_str().unwrap_or("?"),
                total - done,
                d["created"].as_str().unwrap_or("?"),
            )
        })
        .collect();
    Ok(Outcome::lines(
        lines,
        "no deployments yet; make one with `ferry deploy`",
        all,
    ))
}
