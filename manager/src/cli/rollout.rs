//! `ferry rollout start|status|list|pause|resume|abort`: staged rollouts.

use std::time::{Duration, SystemTime};

use anyhow::{Context, Result, bail};
use ferry_protocol::{Envelope, Manifest, Timestamp, TrustPolicy};
use serde_json::{Value, json};

use super::fleet::Targets;
use super::{Outcome, keys};
use crate::client::Manager;

#[derive(Debug, clap::Subcommand)]
pub(crate) enum Args {
    /// Start a staged rollout of a published release.
    Start(Box<StartArgs>),
    /// A rollout's progress, stage by stage (`--watch` until it ends).
    Status {
        /// The rollout's id.
        id: i64,
        /// Follow it with a progress bar per stage until it completes or aborts.
        #[arg(long)]
        watch: bool,
    },
    /// Every rollout, newest first.
    List,
    /// Send the release to no more devices until resumed.
    Pause {
        /// The rollout's id.
        id: i64,
    },
    /// Go on with a paused rollout.
    Resume {
        /// The rollout's id.
        id: i64,
    },
    /// Stop a rollout for good.
    Abort {
        /// The rollout's id.
        id: i64,
    },
}

#[derive(Debug, clap::Args)]
pub(crate) struct StartArgs {
    /// The service.
    service: String,
    /// The published version to roll out.
    version: String,
    #[command(flatten)]
    targets: Targets,
    /// Devices updated first, alone, before any wave.
    #[arg(long, default_value_t = 0)]
    canary: u32,
    /// Cumulative shares of the devices per wave, e.g. 10%,50%,100% (100% is added when missing).
    #[arg(long, value_name = "P%,P%,...", value_parser = parse_waves, default_value = "100%")]
    waves: Waves,
    /// At most this many devices installing at once.
    #[arg(long, value_name = "N")]
    max_in_flight: Option<u32>,
    /// A device with no outcome this long after it was sent counts as failed (e.g. 90s, 10m).
    #[arg(long, value_name = "DURATION", value_parser = humantime::parse_duration, default_value = "10m")]
    device_timeout: Duration,
    /// Failures tolerated before the rollout aborts: a count (3) or a share of the devices sent so far (20%).
    #[arg(long, value_name = "N|P%", default_value = "0")]
    max_failures: String,
    /// On abort, send the devices the release reached their previous version back: signs
    /// (with --key) and publishes a copy of that release with the next sequence.
    #[arg(long, requires = "keys")]
    revert_on_abort: bool,
    /// Release signing key for the revert (repeat for a threshold of keys).
    #[arg(long = "key", value_name = "FILE")]
    keys: Vec<std::path::PathBuf>,
    /// The version to go back to [default: the one most selected devices run now].
    #[arg(long, value_name = "VERSION", requires = "revert_on_abort")]
    revert_to: Option<String>,
    /// Trusted public key: the manager's copies of the rolled-out and the old
    /// release must be signed by these before the old one is signed again
    /// (repeat for several) [default: the public halves of the --key files].
    #[arg(long = "pub", value_name = "NAME.pub", requires = "revert_on_abort")]
    pubs: Vec<std::path::PathBuf>,
    /// How many distinct trusted keys must have signed those copies
    /// [default: as many as --key files given].
    #[arg(long, value_name = "N", requires = "revert_on_abort")]
    threshold: Option<usize>,
    /// How long devices accept the revert release after it is signed.
    #[arg(long, value_name = "DURATION", value_parser = humantime::parse_duration, default_value = "30d", requires = "revert_on_abort")]
    revert_expires: Duration,
}

#[derive(Debug, Clone)]
struct Waves(Vec<u8>);

fn parse_waves(text: &str) -> Result<Waves, String> {
    text.split(',')
        .map(|w| {
            let w = w.trim();
            w.strip_suffix('%')
                .unwrap_or(w)
                .parse::<u8>()
                .map_err(|_| format!("{w:?} is not a percentage"))
        })
        .collect::<Result<Vec<_>, _>>()
        .map(Waves)
}

pub(crate) async fn run(manager: &Manager, args: Args, json_out: bool) -> Result<Outcome> {
    match args {
        Args::Start(args) => start(manager, *args).await,
        Args::Status { id, watch } => status(manager, id, watch && !json_out).await,
        Args::List => list(manager).await,
        Args::Pause { id } => act(manager, id, "pause").await,
        Args::Resume { id } => act(manager, id, "resume").await,
        Args::Abort { id } => act(manager, id, "abort").await,
    }
}

async fn start(manager: &Manager, args: StartArgs) -> Result<Outcome> {
    let revert = if args.revert_on_abort {
        Some(publish_revert(manager, &args).await?)
    } else {
        None
    };
    let mut body = args.targets.request(&args.service, &args.version);
    if let Value::Object(fields) = &mut body {
        fields.extend([
            ("canary".into(), json!(args.canary)),
            ("waves".into(), json!(args.waves.0)),
            ("max_in_flight".into(), json!(args.max_in_flight)),
            (
                "device_timeout_secs".into(),
                json!(args.device_timeout.as_secs().max(1)),
            ),
            ("max_failures".into(), json!(args.max_failures)),
            ("revert_to".into(), json!(revert)),
        ]);
    }
    let created = manager.post("/v1/rollouts", &body).await?;
    let count = created["devices"].as_array().map_or(0, Vec::len);
    let revert_line = revert
        .as_deref()
        .map(|v| format!("\non abort, devices it reached get {} {v}", args.service))
        .unwrap_or_default();
    let mut created = created;
    created["revert_to"] = json!(revert);
    Ok(Outcome::ok(
        format!(
            "rollout {} of {} {} to {count} device(s) started{revert_line}\nwatch it with `ferry rollout status {} --watch`",
            created["id"], args.service, args.version, created["id"]
        ),
        created,
    ))
}

/// Makes the revert release for `ferry rollout start --revert-on-abort`:
/// the previous version's manifest with the next sequence after the
/// rolled-out release (devices never go down in sequence), a version that
/// says what it is and an expiry of its own, signed here with the
/// operator's keys (the manager never holds one) and published. Returns its
/// version.
///
/// The manager is not trusted here either: both releases it hands back are
/// verified against the operator's public keys, and must be the service and
/// versions asked for, before anything is signed. What gets signed is the
/// verified manifest, so its artifact is the one trusted keys signed.
async fn publish_revert(manager: &Manager, args: &StartArgs) -> Result<String> {
    let service = &args.service;
    let keys = args
        .keys
        .iter()
        .map(|path| keys::load_secret(path))
        .collect::<Result<Vec<_>>>()?;
    let policy = revert_policy(args, &keys)?;
    let new = trusted_release(manager, &policy, service, &args.version)
        .await
        .with_context(|| format!("cannot use {service} {} for a rollout", args.version))?;
    let back_to = match &args.revert_to {
        Some(version) => version.clone(),
        None => most_installed(manager, args).await?,
    };
    if back_to == args.version {
        bail!(
            "the selected devices already run {service} {back_to}: nothing to revert to (name one with --revert-to)"
        );
    }
    let mut manifest = trusted_release(manager, &policy, service, &back_to)
        .await
        .with_context(|| format!("cannot revert to {service} {back_to}"))?;
    let sequence = new
        .sequence
        .checked_add(1)
        .context("the rolled-out release has the highest sequence there is")?;
    let mut version = manifest.version.clone();
    version.build = semver::BuildMetadata::new(&format!("revert.{sequence}"))
        .context("cannot name the revert release")?;
    manifest.version = version;
    manifest.sequence = sequence;
    // The old release's expiry was for the old release; the revert gets one
    // of its own, counted from now.
    let now = Timestamp::from(SystemTime::now()).unix_secs();
    manifest.expires = Some(Timestamp::from_unix_secs(
        now.saturating_add(args.revert_expires.as_secs()),
    ));
    let name = manifest.version.to_string();
    // A rollout started again (say the manager refused the first request)
    // finds its revert published: the same release, signed by trusted keys
    // and not expiring within a day, is used as it is.
    if let Ok(published) = trusted_release(manager, &policy, service, &name).await {
        let mut unexpired = published.clone();
        unexpired.expires = manifest.expires;
        let fresh = published
            .expires
            .is_some_and(|e| e.system_time() > SystemTime::now() + Duration::from_secs(86_400));
        if unexpired == manifest && fresh {
            return Ok(name);
        }
    }
    let refs: Vec<_> = keys.iter().collect();
    let signed =
        Envelope::sign(manifest.to_json(), &refs).context("cannot sign the revert release")?;
    manager
        .post_bytes("/v1/releases", signed.to_json())
        .await
        .context("cannot publish the revert release")?;
    Ok(name)
}

/// The keys the manager's copies of releases must be signed by: `--pub`, or
/// the public halves of the signing keys; `--threshold`, or as many as keys
/// sign the revert (a fleet's threshold is what the operator signs with).
fn revert_policy(args: &StartArgs, keys: &[ferry_protocol::SecretKey]) -> Result<TrustPolicy> {
    let trusted = if args.pubs.is_empty() {
        keys.iter().map(|k| k.public_key()).collect()
    } else {
        args.pubs
            .iter()
            .map(|path| keys::load_public(path))
            .collect::<Result<Vec<_>>>()?
    };
    let threshold = args.threshold.unwrap_or(keys.len());
    TrustPolicy::new(trusted, threshold).context("invalid trust settings for checking releases")
}

/// The manager's copy of SERVICE VERSION, verified against `policy`: its
/// signed manifest, which must name that very service and version.
async fn trusted_release(
    manager: &Manager,
    policy: &TrustPolicy,
    service: &str,
    version: &str,
) -> Result<Manifest> {
    let row = manager
        .get(&format!("/v1/releases/{service}/{version}"))
        .await
        .with_context(|| format!("no release {service} {version} on the manager"))?;
    let envelope = Envelope::from_json(row["envelope"].to_string().as_bytes())
        .context("the manager's copy does not read as a signed envelope")?;
    let verified = policy.verify_signatures(&envelope).with_context(|| {
        format!("the manager's copy of {service} {version} is not signed by your trusted keys")
    })?;
    let manifest = verified.manifest;
    if manifest.service.as_str() != service || manifest.version.to_string() != version {
        bail!(
            "the manager answered with {} {} when asked for {service} {version}",
            manifest.service,
            manifest.version
        );
    }
    Ok(manifest)
}

/// The version of the service most of the rollout's devices run now.
async fn most_installed(manager: &Manager, args: &StartArgs) -> Result<String> {
    let devices = manager.get("/v1/devices").await?;
    let mut counts: std::collections::BTreeMap<String, usize> = Default::default();
    for device in devices.as_array().into_iter().flatten() {
        let id = device["device_id"].as_str().unwrap_or_default();
        let picked = if args.targets.all {
            true
        } else if let Some(tag) = &args.targets.tag {
            device["tags"]
                .as_array()
                .is_some_and(|t| t.iter().any(|x| x == tag.as_str()))
        } else {
            args.targets.devices.iter().any(|d| d == id)
        };
        if !picked {
            continue;
        }
        let installed = device["reported"]["services"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|s| s["service"] == args.service.as_str())
            .and_then(|s| s["version"].as_str());
        if let Some(version) = installed {
            *counts.entry(version.to_owned()).or_default() += 1;
        }
    }
    counts
        .into_iter()
        .max_by_key(|(_, n)| *n)
        .map(|(v, _)| v)
        .with_context(|| {
            format!(
                "no selected device runs {} yet, so there is nothing to revert to (name a version with --revert-to)",
                args.service
            )
        })
}

/// One line for a rollout.
fn headline(rollout: &Value) -> String {
    let counts = &rollout["counts"];
    let reason = rollout["reason"]
        .as_str()
        .map(|r| format!(" ({r})"))
        .unwrap_or_default();
    format!(
        "rollout {} {} {}: {}{reason}; {}/{} installed, {} failed, {} installing",
        rollout["id"],
        rollout["service"].as_str().unwrap_or("?"),
        rollout["version"].as_str().unwrap_or("?"),
        rollout["state"].as_str().unwrap_or("?"),
        counts["installed"],
        counts["devices"],
        counts["failed"],
        counts["in_flight"],
    )
}

fn stage_line(stage: &Value) -> String {
    let c = &stage["counts"];
    format!(
        "{:<16} {}/{} installed, {} failed, {} installing, {} waiting",
        stage["name"].as_str().unwrap_or("?"),
        c["installed"],
        c["devices"],
        c["failed"],
        c["in_flight"],
        c["pending"],
    )
}

fn details(rollout: &Value) -> String {
    let mut text = headline(rollout);
    for stage in rollout["stages"].as_array().into_iter().flatten() {
        text.push_str("\n  ");
        text.push_str(&stage_line(stage));
    }
    for device in rollout["devices"].as_array().into_iter().flatten() {
        let reason = device["reason"]
            .as_str()
            .map(|r| format!(": {r}"))
            .unwrap_or_default();
        text.push_str(&format!(
            "\n    {:<24} {}{reason}",
            device["device_id"].as_str().unwrap_or("?"),
            device["status"].as_str().unwrap_or("?")
        ));
    }
    text
}

fn finished(rollout: &Value) -> bool {
    matches!(rollout["state"].as_str(), Some("completed" | "aborted"))
}

async fn status(manager: &Manager, id: i64, watch: bool) -> Result<Outcome> {
    let path = format!("/v1/rollouts/{id}");
    let mut rollout = manager.get(&path).await?;
    if watch {
        let bars = indicatif::MultiProgress::new();
        let style =
            indicatif::ProgressStyle::with_template("{prefix:<16} {bar:30} {pos}/{len} {msg}")
                .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar());
        let mut stage_bars: Vec<indicatif::ProgressBar> = Vec::new();
        let head = bars.add(indicatif::ProgressBar::new_spinner());
        while !finished(&rollout) {
            head.set_message(headline(&rollout));
            let stages = rollout["stages"].as_array().cloned().unwrap_or_default();
            for (i, stage) in stages.iter().enumerate() {
                if stage_bars.len() <= i {
                    let bar = bars.add(indicatif::ProgressBar::new(0).with_style(style.clone()));
                    bar.set_prefix(stage["name"].as_str().unwrap_or("?").to_owned());
                    stage_bars.push(bar);
                }
                let c = &stage["counts"];
                let bar = &stage_bars[i];
                bar.set_length(c["devices"].as_u64().unwrap_or(0));
                bar.set_position(
                    c["installed"].as_u64().unwrap_or(0) + c["failed"].as_u64().unwrap_or(0),
                );
                bar.set_message(format!(
                    "{} failed, {} installing",
                    c["failed"], c["in_flight"]
                ));
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
            rollout = manager.get(&path).await?;
        }
        let _ = bars.clear();
    }
    let text = details(&rollout);
    Ok(if rollout["state"] == "aborted" && watch {
        Outcome::refused(text, rollout)
    } else {
        Outcome::ok(text, rollout)
    })
}

async fn list(manager: &Manager) -> Result<Outcome> {
    let rollouts = manager.get("/v1/rollouts").await?;
    let lines: Vec<String> = rollouts
        .as_array()
        .into_iter()
        .flatten()
        .map(headline)
        .collect();
    Ok(Outcome::lines(
        lines,
        "no rollouts yet; start one with `ferry rollout start`",
        rollouts,
    ))
}

async fn act(manager: &Manager, id: i64, action: &str) -> Result<Outcome> {
    let rollout = manager
        .post(&format!("/v1/rollouts/{id}/{action}"), &json!({}))
        .await?;
    Ok(Outcome::ok(headline(&rollout), rollout))
}
