//! `ferry publish ENVELOPE ARTIFACT`: upload the artifact (with a progress
//! bar), then the envelope that names it.

use std::path::PathBuf;

use anyhow::{Context, Result};
use ferry_protocol::Envelope;
use ferry_protocol::envelope::MAX_ENVELOPE_BYTES;
use futures_util::StreamExt;
use serde_json::json;

use super::Outcome;
use crate::client::Manager;
use crate::files::read_limited;

#[derive(Debug, clap::Args)]
pub(crate) struct Args {
    /// The signed envelope.
    envelope: PathBuf,
    /// The artifact it names.
    artifact: PathBuf,
}

pub(crate) async fn run(manager: &Manager, args: Args, quiet: bool) -> Result<Outcome> {
    let bytes = read_limited(&args.envelope, MAX_ENVELOPE_BYTES, "envelope")?;
    let envelope =
        Envelope::from_json(&bytes).with_context(|| format!("{}", args.envelope.display()))?;
    let manifest = envelope.unverified_manifest()?;
    let file = tokio::fs::File::open(&args.artifact)
        .await
        .with_context(|| format!("cannot open {}", args.artifact.display()))?;
    let len = file.metadata().await?.len();
    if len != manifest.artifact.size {
        anyhow::bail!(
            "{} is {len} bytes, the envelope's manifest says {}: wrong artifact?",
            args.artifact.display(),
            manifest.artifact.size
        );
    }
    let artifact_path = format!("/v1/artifacts/{}", manifest.artifact.sha256);
    // The same bytes may be there already (another version of the same
    // files, or a publish run again): nothing to send then.
    if !manager.exists(&artifact_path).await? {
        let bar = if quiet {
            indicatif::ProgressBar::hidden()
        } else {
            indicatif::ProgressBar::new(len).with_style(
                indicatif::ProgressStyle::with_template(
                    "uploading {bar:30} {bytes}/{total_bytes} {bytes_per_sec}",
                )
                .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
            )
        };
        let progress = bar.clone();
        let stream = tokio_util::io::ReaderStream::new(file).inspect(move |chunk| {
            if let Ok(c) = chunk {
                progress.inc(c.len() as u64);
            }
        });
        manager
            .put_stream(&artifact_path, reqwest::Body::wrap_stream(stream), len)
            .await
            .context("artifact upload refused")?;
        bar.finish_and_clear();
    }
    let published = manager
        .post_bytes("/v1/releases", bytes)
        .await
        .context("release refused")?;
    Ok(Outcome::ok(
        format!(
            "published {} {} (sequence {}, {} bytes, sha256 {})",
            manifest.service, manifest.version, manifest.sequence, len, manifest.artifact.sha256
        ),
        json!({ "ok": true, "release": published }),
    ))
}
