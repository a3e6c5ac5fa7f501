//! `ferry package DIR ...`: a reproducible artifact and its unsigned manifest.

use std::path::PathBuf;

use anyhow::{Context, Result};
use ferry_cross::PackageRequest;
use ferry_protocol::manifest::{ArtifactKind, BuildInfo};
use ferry_protocol::names::ARMV7_TARGET;
use ferry_protocol::{RelPath, ServiceName, Target, Timestamp};
use serde_json::json;

use super::Outcome;

#[derive(Debug, clap::Args)]
pub(crate) struct Args {
    /// Directory whose contents become the release.
    dir: PathBuf,
    /// Service name (lowercase letters, digits, '-' and '_').
    #[arg(long)]
    service: ServiceName,
    /// Release version (semver, e.g. 1.4.2).
    #[arg(long)]
    version: semver::Version,
    /// Program to run, relative to DIR (e.g. bin/api).
    #[arg(long)]
    entrypoint: RelPath,
    /// Release sequence number; must grow with every release of the service.
    #[arg(long)]
    sequence: u64,
    /// Target triple of the devices the release is for.
    #[arg(long, default_value = ARMV7_TARGET)]
    target: Target,
    /// How the entrypoint was built [default: detected from the binary].
    #[arg(long, value_enum)]
    kind: Option<Kind>,
    /// After this time devices refuse the release (RFC 3339, e.g. 2027-01-31T00:00:00Z).
    #[arg(long)]
    expires: Option<Timestamp>,
    /// Output directory for SERVICE-VERSION.tar.gz and SERVICE-VERSION.manifest.json.
    #[arg(short = 'o', long = "out", value_name = "OUTDIR")]
    out: PathBuf,
}

#[derive(Debug, Clone, Copy, clap::ValueEnum)]
enum Kind {
    Go,
    C,
}

pub(crate) fn run(args: Args) -> Result<Outcome> {
    let request = PackageRequest {
        dir: args.dir,
        service: args.service,
        version: args.version,
        entrypoint: args.entrypoint,
        sequence: args.sequence,
        target: args.target,
        kind: args.kind.map(|k| match k {
            Kind::Go => ArtifactKind::Go,
            Kind::C => ArtifactKind::C,
        }),
        expires: args.expires,
        build: BuildInfo {
            packager: Some(concat!("ferry ", env!("CARGO_PKG_VERSION")).into()),
            ..BuildInfo::default()
        },
    };
    let packaged = ferry_cross::package(&request, &args.out)
        .with_context(|| format!("cannot package {}", request.dir.display()))?;
    let m = &packaged.manifest;
    Ok(Outcome::ok(
        format!(
            "packed {} entries ({} bytes unpacked) into {} ({} bytes, sha256 {})\nwrote {} (unsigned: sign it with `ferry sign`)",
            m.limits.entries,
            m.limits.unpacked_bytes,
            packaged.artifact.display(),
            m.artifact.size,
            m.artifact.sha256,
            packaged.manifest_path.display(),
        ),
        json!({
            "ok": true,
            "artifact": packaged.artifact,
            "manifest": packaged.manifest_path,
            "sha256": m.artifact.sha256,
            "size": m.artifact.size,
            "entries": m.limits.entries,
            "unpacked_bytes": m.limits.unpacked_bytes,
            "kind": m.kind,
        }),
    ))
}
