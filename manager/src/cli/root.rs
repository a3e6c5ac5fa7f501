//! `ferry root new|sign|publish|list`: the trust root that names the
//! release keys devices believe, and rotates them.
//!
//! `new` and `sign` run offline, where the root keys are kept; `publish`
//! hands a signed root to the manager, which sends it to every device with
//! the desired state; `list` shows the chain.

use std::path::PathBuf;

use anyhow::{Context, Result};
use ferry_protocol::root::{ROOT_SCHEMA, Root, SignedRoot};
use serde_json::{Value, json};

use super::Outcome;
use super::keys::{load_public, load_secret};
use crate::client::Manager;
use crate::files::{Existing, read_limited, write_atomic};

#[derive(Debug, clap::Subcommand)]
pub(crate) enum Args {
    /// Write a new root version, not yet signed (offline).
    New {
        /// Its version: 1 for the first, then one more than the newest.
        #[arg(long)]
        version: u64,
        /// A root key (.pub): root keys sign the next root. Repeatable.
        #[arg(long = "root-key", value_name = "PUB", required = true)]
        root_keys: Vec<PathBuf>,
        /// Distinct root keys that must sign the next root.
        #[arg(long, default_value_t = 1)]
        root_threshold: usize,
        /// A release key (.pub) devices trust. Repeatable.
        #[arg(long = "release-key", value_name = "PUB", required = true)]
        release_keys: Vec<PathBuf>,
        /// Distinct release keys that must sign a release.
        #[arg(long, default_value_t = 1)]
        release_threshold: usize,
        /// Where to write it (never over an existing file).
        #[arg(short = 'o', long = "out", value_name = "FILE")]
        out: PathBuf,
    },
    /// Add a root key's signature to a root file (offline): version N+1
    /// needs a threshold of version N's root keys and of its own.
    Sign {
        /// The root file; signed in place.
        file: PathBuf,
        /// A root key (.key).
        #[arg(long, value_name = "KEY")]
        key: PathBuf,
    },
    /// Publish a signed root: the manager checks it follows the newest and
    /// sends the chain to every device.
    Publish {
        /// The signed root file.
        file: PathBuf,
    },
    /// The published chain.
    List,
}

impl Args {
    /// Whether the command works without a manager.
    pub(crate) fn offline(&self) -> bool {
        matches!(self, Args::New { .. } | Args::Sign { .. })
    }
}

fn read_signed(path: &std::path::Path) -> Result<SignedRoot> {
    let bytes = read_limited(path, ferry_protocol::root::MAX_ROOT_BYTES, "trust root")?;
    SignedRoot::from_json(&bytes)
        .with_context(|| format!("{} is not a signed trust root", path.display()))
}

/// `new` and `sign`.
pub(crate) fn run_offline(args: Args) -> Result<Outcome> {
    match args {
        Args::New {
            version,
            root_keys,
            root_threshold,
            release_keys,
            release_threshold,
            out,
        } => {
            let lines = |paths: &[PathBuf]| -> Result<Vec<String>> {
                paths
                    .iter()
                    .map(|p| load_public(p).map(|k| k.to_text()))
                    .collect()
            };
            let root = Root {
                schema: ROOT_SCHEMA,
                version,
                root_keys: lines(&root_keys)?,
                root_threshold,
                release_keys: lines(&release_keys)?,
                release_threshold,
            };
            let signed = SignedRoot::new(&root)?;
            write_atomic(&out, &signed.to_json(), 0o644, Existing::Keep)?;
            Ok(Outcome::ok(
                format!(
                    "wrote trust root version {version} to {} (unsigned: sign it with `ferry root sign`)",
                    out.display()
                ),
                json!({ "version": version, "file": out }),
            ))
        }
        Args::Sign { file, key } => {
            let mut signed = read_signed(&file)?;
            let root = signed.unverified()?;
            let secret = load_secret(&key)?;
            signed.add_signature(&secret);
            write_atomic(&file, &signed.to_json(), 0o644, Existing::Replace)?;
            Ok(Outcome::ok(
                format!(
                    "signed trust root version {} with {} ({} signature(s))",
                    root.version,
                    secret.public_key().id(),
                    signed.signatures.len()
                ),
                json!({ "version": root.version, "signatures": signed.signatures.len() }),
            ))
        }
        Args::Publish { .. } | Args::List => anyhow::bail!("this command needs a manager"),
    }
}

/// `publish` and `list`.
pub(crate) async fn run(manager: &Manager, args: Args) -> Result<Outcome> {
    match args {
        Args::Publish { file } => {
            let signed = read_signed(&file)?;
            let published = manager.post_bytes("/v1/roots", signed.to_json()).await?;
            Ok(Outcome::ok(
                format!(
                    "published trust root version {}: every device's desired state carries it",
                    published["version"]
                ),
                published,
            ))
        }
        Args::List => {
            let chain = manager.get("/v1/roots").await?;
            let lines: Vec<String> = chain
                .as_array()
                .into_iter()
                .flatten()
                .map(|r: &Value| {
                    format!(
                        "version {}: release keys {} (threshold {}), root keys {} (threshold {})",
                        r["version"],
                        join(&r["release_keys"]),
                        r["release_threshold"],
                        join(&r["root_keys"]),
                        r["root_threshold"]
                    )
                })
                .collect();
            Ok(Outcome::lines(lines, "no trust root published", chain))
        }
        offline => run_offline(offline),
    }
}

fn join(ids: &Value) -> String {
    ids.as_array()
        .into_iter()
        .flatten()
        .filter_map(Value::as_str)
        .collect::<Vec<_>>()
        .join(", ")
}
