//! `ferry package DIR ...`: a reproducible artifact and its unsigned manifest.

use std::path::PathBuf;

use anyhow::{Context, Result};
use ferry_cross::PackageRequest;
use ferry_protocol::manifest::{ArtifactKind, BuildInfo, HealthSettings, Probe, ReloadRule};
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
    /// Seconds a new release must run without restarting before devices commit it.
    #[arg(long, value_name = "SECS", default_value_t = 10)]
    health_window: u32,
    /// A check the new release must pass within the health window:
    /// http://HOST:PORT/PATH (2xx), tcp:HOST:PORT (connects), or cmd:PROGRAM ARGS (exits 0, run in the release).
    #[arg(long, value_name = "PROBE", value_parser = parse_probe)]
    probe: Option<Probe>,
    /// Watch PATH on the device and act on a change: PATH=signal:SIGHUP, PATH=reload or
    /// PATH=restart. PATH is absolute or relative to the release. Repeatable.
    #[arg(long, value_name = "PATH=ACTION", value_parser = parse_reload)]
    reload: Vec<ReloadRule>,
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
        health: HealthSettings {
            window_secs: args.health_window.max(1),
            probe: args.probe,
        },
        reload: args.reload,
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

fn parse_probe(text: &str) -> Result<Probe, String> {
    if text.starts_with("http://") || text.starts_with("https://") {
        Ok(Probe::Http { url: text.into() })
    } else if let Some(address) = text.strip_prefix("tcp:") {
        Ok(Probe::Tcp {
            address: address.into(),
        })
    } else if let Some(command) = text.strip_prefix("cmd:") {
        let argv: Vec<String> = command.split_whitespace().map(str::to_owned).collect();
        if argv.is_empty() {
            return Err("cmd: needs a program".into());
        }
        Ok(Probe::Command { argv })
    } else {
        Err("expected http://..., tcp:HOST:PORT or cmd:PROGRAM ARGS".into())
    }
}

fn parse_reload(text: &str) -> Result<ReloadRule, String> {
    let (path, action) = text
        .rsplit_once('=')
        .ok_or("expected PATH=ACTION, e.g. /etc/api/app.conf=signal:SIGHUP")?;
    if path.is_empty() {
        return Err("the path is empty".into());
    }
    Ok(ReloadRule {
        paths: vec![path.into()],
        action: action.parse()?,
        debounce_ms: 500,
    })
}
