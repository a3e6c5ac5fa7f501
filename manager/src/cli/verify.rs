//! `ferry verify ENVELOPE --pub K.pub [--pub ...] [--threshold K] [--artifact FILE]`:
//! the device's own checks, run offline by an operator.

use std::fs::File;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::time::SystemTime;

use anyhow::{Context, Result};
use ferry_protocol::digest::{ArtifactCheck, ArtifactError};
use ferry_protocol::envelope::MAX_ENVELOPE_BYTES;
use ferry_protocol::manifest::ArtifactInfo;
use ferry_protocol::trust::NothingInstalled;
use ferry_protocol::{Checks, Target, TrustPolicy, VerifyError};
use serde_json::json;

use super::{Outcome, keys};
use crate::files::read_limited;

#[derive(Debug, clap::Args)]
pub(crate) struct Args {
    /// The signed envelope to check.
    envelope: PathBuf,
    /// Trusted public key file; repeat for several.
    #[arg(long = "pub", value_name = "NAME.pub", required = true)]
    pubs: Vec<PathBuf>,
    /// How many distinct trusted keys must have signed.
    #[arg(long, default_value_t = 1)]
    threshold: usize,
    /// Also check this artifact's size and sha256 against the manifest.
    #[arg(long, value_name = "FILE")]
    artifact: Option<PathBuf>,
    /// Also check the release is for this target, as a device would.
    #[arg(long)]
    target: Option<Target>,
}

pub(crate) fn run(args: Args) -> Result<Outcome> {
    let bytes = read_limited(&args.envelope, MAX_ENVELOPE_BYTES, "envelope")?;
    let keys = args
        .pubs
        .iter()
        .map(|path| keys::load_public(path))
        .collect::<Result<Vec<_>>>()?;
    let policy = TrustPolicy::new(keys, args.threshold).context("invalid trust settings")?;
    let checks = Checks {
        now: SystemTime::now(),
        target: args.target.as_ref(),
        installed: &NothingInstalled,
    };
    let release = match policy.verify_json(&bytes, &checks) {
        Ok(release) => release,
        Err(error) => return Ok(refused(error_kind(&error), error.to_string())),
    };
    let m = &release.manifest;

    let artifact_note = match &args.artifact {
        None => "artifact not checked (pass --artifact FILE)".to_string(),
        Some(path) => match check_artifact(path, &m.artifact)? {
            Ok(()) => {
                // Its programs, as the device will check them after unpacking.
                let file = File::open(path)
                    .with_context(|| format!("cannot open artifact {}", path.display()))?;
                if let Err(reason) =
                    ferry_cross::programs::check_artifact(file, &m.entrypoint, &m.target)
                {
                    return Ok(refused(
                        "wrong_program",
                        format!("artifact {}: {reason}", path.display()),
                    ));
                }
                format!(
                    "artifact {} matches, and its programs are built for {}",
                    path.display(),
                    m.target
                )
            }
            Err(error) => {
                return Ok(refused(
                    "artifact_mismatch",
                    format!("artifact {}: {error}", path.display()),
                ));
            }
        },
    };
    let signers: Vec<String> = release.signed_by.iter().map(|k| k.to_string()).collect();
    Ok(Outcome::ok(
        format!(
            "OK: {} {} (sequence {}, target {}) signed by {} trusted key(s), {} required: {}\n{artifact_note}",
            m.service,
            m.version,
            m.sequence,
            m.target,
            signers.len(),
            policy.threshold(),
            signers.join(", "),
        ),
        json!({
            "ok": true,
            "service": m.service,
            "version": m.version.to_string(),
            "sequence": m.sequence,
            "target": m.target,
            "expires": m.expires,
            "artifact_sha256": m.artifact.sha256,
            "signed_by": signers,
            "artifact_checked": args.artifact.is_some(),
        }),
    ))
}

fn refused(kind: &str, reason: String) -> Outcome {
    Outcome::refused(
        format!("verify failed: {reason}"),
        json!({ "ok": false, "error": kind, "reason": reason }),
    )
}

/// A stable name per way to fail, for scripts.
fn error_kind(error: &VerifyError) -> &'static str {
    match error {
        VerifyError::Malformed(_) => "malformed",
        VerifyError::BadSignature { .. } => "bad_signature",
        VerifyError::UnknownKey { .. } => "unknown_key",
        VerifyError::BelowThreshold { .. } => "below_threshold",
        VerifyError::Expired { .. } => "expired",
        VerifyError::Rollback { .. } => "rollback",
        VerifyError::SequenceReused { .. } => "sequence_reused",
        VerifyError::ServiceNotAllowed { .. } => "service_not_allowed",
        VerifyError::WrongTarget { .. } => "wrong_target",
    }
}

/// Streams the file through the manifest's size and hash check. The outer
/// error is I/O; the inner one is the artifact not matching.
fn check_artifact(path: &Path, expected: &ArtifactInfo) -> Result<Result<(), ArtifactError>> {
    let mut file =
        File::open(path).with_context(|| format!("cannot open artifact {}", path.display()))?;
    let mut check = ArtifactCheck::new(expected);
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = file
            .read(&mut buf)
            .with_context(|| format!("cannot read artifact {}", path.display()))?;
        if n == 0 {
            break;
        }
        if let Err(mismatch) = check.update(&buf[..n]) {
            return Ok(Err(mismatch));
        }
    }
    Ok(check.finish().map(drop))
}
