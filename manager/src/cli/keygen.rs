//! `ferry keygen --out NAME`: a new release signing key pair.

use std::path::PathBuf;

use anyhow::{Context, Result, bail};
use ferry_protocol::SecretKey;
use serde_json::json;

use super::Outcome;
use crate::files::{Existing, with_suffix, write_atomic};

#[derive(Debug, clap::Args)]
pub(crate) struct Args {
    /// Path and base name for the key files: writes NAME.key (secret, mode 0600) and NAME.pub.
    #[arg(long, value_name = "NAME")]
    out: PathBuf,
}

pub(crate) fn run(args: Args) -> Result<Outcome> {
    let secret_path = with_suffix(&args.out, ".key");
    let public_path = with_suffix(&args.out, ".pub");
    // Never replace a key: losing a release key strands every device that trusts it.
    for path in [&secret_path, &public_path] {
        if path.exists() {
            bail!(
                "{} already exists; refusing to overwrite a key",
                path.display()
            );
        }
    }
    let mut seed = [0u8; 32];
    getrandom::fill(&mut seed).map_err(|e| anyhow::anyhow!("no randomness from the OS: {e}"))?;
    let secret = SecretKey::from_seed(&seed);
    seed.fill(0);
    let public = secret.public_key();

    write_atomic(
        &public_path,
        public.to_text().as_bytes(),
        0o644,
        Existing::Keep,
    )?;
    write_atomic(
        &secret_path,
        secret.to_text().as_bytes(),
        0o600,
        Existing::Keep,
    )
    .context("the public key was written, the secret key was not")?;

    let id = public.id().to_string();
    Ok(Outcome::ok(
        format!(
            "key id {id}\nwrote {} (secret: keep it off the manager and out of version control)\nwrote {} (give this to devices)",
            secret_path.display(),
            public_path.display()
        ),
        json!({
            "ok": true,
            "key_id": id,
            "secret_key": secret_path,
            "public_key": public_path,
        }),
    ))
}
