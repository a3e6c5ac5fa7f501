//! `ferry package DIR ...`: a reproducible artifact and its unsigned manifest.

use std::path::PathBuf;

use anyhow::{Context, Result};
use ferry_cross::PackageRequest;
use ferry_protocol::manifest::ArtifactKind;
use ferry_protocol::names::ARMV7_TARGET;
use ferry_protocol::{RelPath, Target};
use serde_json::json;

use super::Outcome;
use super::release_args::{ReleaseArgs, build_info};

#[derive(Debug, clap::Args)]
pub(crate) struct Args {
    /// Directory whose contents become the release.
    dir: PathBuf,
    #[command(flatten)]
    release: ReleaseArgs,
    /// Program to run, relative to DIR (e.g. bin/api).
    #[arg(long)]
    entrypoint: RelPath,
    /// Target triple of the devices the release is for.
    #[arg(long, default_value = ARMV7_TARGET)]
    target: Target,
    /// How the entrypoint was built [default: detected from the binary].
    #[arg(long, value_enum)]
    kind: Option<Kind>,
}

#[derive(Debug, Clone, Copy, clap::ValueEnum)]
enum Kind {
    Go,
    C,
}

pub(crate) fn run(args: Args) -> Result<Outcome> {
    let health = args.release.health();
    let run = args.release.run()?;
    let expires = args.release.expires_at()?;
    let release = args.release;
    let request = PackageRequest {
        dir: args.dir,
        service: release.service,
        version: release.version,
        entrypoint: args.entrypoint,
        sequence: release.sequence,
        target: args.target,
        kind: args.kind.map(|k| match k {
            Kind::Go => ArtifactKind::Go,
            Kind::C => ArtifactKind::C,
        }),
        expires,
        build: build_info(),
        health,
        reload: release.reload,
        run,
    };
    // The checks a device makes, made here: a wrong binary or a script
    // entrypoint is refused before anything is written.
    ferry_cross::programs::check_tree(&request.dir, &request.entrypoint, &request.target)
        .map_err(|reason| anyhow::anyhow!("cannot package {}: {reason}", request.dir.display()))?;
    let packaged = ferry_cross::package(&request, &release.out)
        .with_context(|| format!("cannot package {}", request.dir.display()))?;
    Ok(packaged_outcome(&packaged, json!({})))
}

/// What `package` and `build` say about the files they wrote; `extra` adds
/// fields to the JSON.
pub(crate) fn packaged_outcome(
    packaged: &ferry_cross::Packaged,
    extra: serde_json::Value,
) -> Outcome {
    let m = &packaged.manifest;
    let mut value = json!({
        "ok": true,
        "artifact": packaged.artifact,
        "manifest": packaged.manifest_path,
        "sha256": m.artifact.sha256,
        "size": m.artifact.size,
        "entries": m.limits.entries,
        "unpacked_bytes": m.limits.unpacked_bytes,
        "kind": m.kind,
    });
    if let (Some(value), serde_json::Value::Object(extra)) = (value.as_object_mut(), extra) {
        value.extend(extra);
    }
    Outcome::ok(
        format!(
            "packed {} entries ({} bytes unpacked) into {} ({} bytes, sha256 {})\nwrote {} (unsigned: sign it with `ferry sign`)",
            m.limits.entries,
            m.limits.unpacked_bytes,
            packaged.artifact.display(),
            m.artifact.size,
            m.artifact.sha256,
            packaged.manifest_path.display(),
        ),
        value,
    )
}
