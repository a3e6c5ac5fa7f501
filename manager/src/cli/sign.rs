//! `ferry sign MANIFEST --key K.key [--key ...] -o ENVELOPE`.
//!
//! Given an envelope instead of a manifest, adds the keys' signatures to it:
//! that is how a release gathers a threshold of signatures from operators
//! who each hold one key on their own machine.

use std::path::PathBuf;

use anyhow::{Context, Result};
use ferry_protocol::Envelope;
use ferry_protocol::envelope::MAX_ENVELOPE_BYTES;
use serde_json::json;

use super::{Outcome, keys};
use crate::files::{Existing, read_limited, write_atomic};

#[derive(Debug, clap::Args)]
pub(crate) struct Args {
    /// The manifest to sign, or an envelope to add signatures to.
    #[arg(value_name = "MANIFEST")]
    input: PathBuf,
    /// Secret key file; repeat to sign with several keys.
    #[arg(long = "key", value_name = "NAME.key", required = true)]
    keys: Vec<PathBuf>,
    /// Where to write the signed envelope (may be the input envelope itself).
    #[arg(short = 'o', long = "out", value_name = "ENVELOPE")]
    out: PathBuf,
}

pub(crate) fn run(args: Args) -> Result<Outcome> {
    let input = &args.input;
    let bytes = read_limited(input, MAX_ENVELOPE_BYTES, "manifest or envelope")?;
    let keys = args
        .keys
        .iter()
        .map(|path| keys::load_secret(path))
        .collect::<Result<Vec<_>>>()?;

    let envelope = if looks_like_envelope(&bytes) {
        let mut envelope = Envelope::from_json(&bytes)
            .with_context(|| format!("{} is not a valid envelope", input.display()))?;
        // Never put a signature on something no device would accept.
        envelope
            .unverified_manifest()
            .with_context(|| format!("the manifest inside {} is not valid", input.display()))?;
        for key in &keys {
            envelope.add_signature(key);
        }
        envelope
    } else {
        let refs: Vec<_> = keys.iter().collect();
        Envelope::sign(bytes, &refs)
            .with_context(|| format!("{} is not a valid release manifest", input.display()))?
    };
    let manifest = envelope
        .unverified_manifest()
        .context("the signed manifest cannot be read back")?;
    write_atomic(&args.out, &envelope.to_json(), 0o644, Existing::Replace)?;

    let signed_with: Vec<String> = keys
        .iter()
        .map(|k| k.public_key().id().to_string())
        .collect();
    let carried: Vec<String> = envelope
        .signatures
        .iter()
        .map(|s| s.key_id.to_string())
        .collect();
    Ok(Outcome::ok(
        format!(
            "signed {} {} (sequence {}, artifact sha256 {}) with key {}\nwrote {} ({} signature(s))",
            manifest.service,
            manifest.version,
            manifest.sequence,
            manifest.artifact.sha256,
            signed_with.join(", "),
            args.out.display(),
            carried.len(),
        ),
        json!({
            "ok": true,
            "envelope": args.out,
            "service": manifest.service,
            "version": manifest.version.to_string(),
            "sequence": manifest.sequence,
            "signed_with": signed_with,
            "signatures": carried,
        }),
    ))
}

/// An envelope is a JSON object with `signatures`; anything else is taken
/// for a manifest, whose parser then says what is wrong with it.
fn looks_like_envelope(bytes: &[u8]) -> bool {
    serde_json::from_slice::<serde_json::Value>(bytes).is_ok_and(|v| v.get("signatures").is_some())
}
