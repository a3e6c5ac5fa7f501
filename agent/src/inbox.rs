//! The inbox: releases dropped into a directory, for sites with no network.
//!
//! A release is two files with the same name: `NAME.envelope.json` and
//! `NAME.tar.gz`. The agent picks a pair up only when the envelope parses
//! and the artifact has the full size the envelope declares, so a copy in
//! progress is left alone (copy the artifact first; or copy under another
//! name and rename). Names starting with `.` are ignored. After the install
//! the pair is removed and `NAME.result.json` says how it ended.
//!
//! A trust root (`NAME.root.json`, see [`crate::trust_root`]) dropped there
//! is offered to the device like one in a desired state, and removed.
//!
//! Whoever can write to the inbox is not trusted with more than dropping
//! files: both must be regular files (a link is not followed, so a link to
//! `/dev/zero` or to a file elsewhere is ignored), the envelope is read
//! only up to its size limit, and the result is written through a file
//! created new, never through a link someone planted.

use std::fs;
use std::path::{Path, PathBuf};

use ferry_protocol::Envelope;
use ferry_protocol::envelope::MAX_ENVELOPE_BYTES;
use ferry_protocol::messages::DeploymentResult;
use tokio::sync::mpsc;

const ENVELOPE_SUFFIX: &str = ".envelope.json";

/// A complete release found in the inbox.
#[derive(Debug, Clone)]
pub struct Dropped {
    /// The shared file name stem.
    pub name: String,
    /// The envelope, parsed but not yet verified.
    pub envelope: Envelope,
    /// The envelope file.
    pub envelope_path: PathBuf,
    /// The artifact file.
    pub artifact: PathBuf,
}

/// The files in `inbox` named `NAME{suffix}`, NAME neither empty nor
/// starting with `.`: each NAME and its path.
fn named<'a>(inbox: &Path, suffix: &'a str) -> impl Iterator<Item = (String, PathBuf)> + 'a {
    fs::read_dir(inbox)
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(move |entry| {
            let file_name = entry.file_name().into_string().ok()?;
            let name = file_name.strip_suffix(suffix)?;
            (!name.is_empty() && !name.starts_with('.')).then(|| (name.to_owned(), entry.path()))
        })
}

/// The complete releases in `inbox`, oldest name first.
pub fn scan(inbox: &Path) -> Vec<Dropped> {
    let mut found: Vec<Dropped> = named(inbox, ENVELOPE_SUFFIX)
        .filter_map(|(name, envelope_path)| {
            let bytes =
                crate::durable::read_limited(&envelope_path, MAX_ENVELOPE_BYTES as u64).ok()?;
            // An envelope still being copied does not parse yet.
            let envelope = Envelope::from_json(&bytes).ok()?;
            let declared = envelope.unverified_manifest().ok()?.artifact.size;
            let artifact = inbox.join(format!("{name}.tar.gz"));
            // A regular file, not a link (its metadata, not its target's);
            // one still being copied is short.
            let metadata = fs::symlink_metadata(&artifact).ok()?;
            (metadata.is_file() && metadata.len() == declared).then_some(Dropped {
                name,
                envelope,
                envelope_path,
                artifact,
            })
        })
        .collect();
    found.sort_by(|a, b| a.name.cmp(&b.name));
    found
}

const ROOT_SUFFIX: &str = ".root.json";

/// The trust roots in `inbox` that parse (a root still being copied does
/// not yet), with their files, oldest name first.
pub fn scan_roots(inbox: &Path) -> Vec<(PathBuf, ferry_protocol::root::SignedRoot)> {
    let mut found: Vec<_> = named(inbox, ROOT_SUFFIX)
        .filter_map(|(_, path)| {
            let bytes =
                crate::durable::read_limited(&path, ferry_protocol::root::MAX_ROOT_BYTES as u64)
                    .ok()?;
            let root = ferry_protocol::root::SignedRoot::from_json(&bytes).ok()?;
            Some((path, root))
        })
        .collect();
    found.sort_by(|a, b| a.0.cmp(&b.0));
    found
}

/// Records how a dropped release ended and removes its files.
pub fn finish(inbox: &Path, dropped: &Dropped, result: &Result<DeploymentResult, String>) {
    let json = match result {
        Ok(r) => serde_json::to_vec_pretty(r).unwrap_or_default(),
        Err(reason) => serde_json::to_vec_pretty(
            &serde_json::json!({ "outcome": "rejected", "reason": reason }),
        )
        .unwrap_or_default(),
    };
    let result_path = inbox.join(format!("{}.result.json", dropped.name));
    if let Err(e) = crate::durable::write_file(&result_path, &json) {
        tracing::warn!(path = %result_path.display(), error = %e, "cannot write inbox result");
    }
    let _ = fs::remove_file(&dropped.artifact);
    let _ = fs::remove_file(&dropped.envelope_path);
}

/// Watches `inbox`, sending `()` on every change. The watcher lives as long
/// as the returned value.
pub fn watch(
    inbox: &Path,
    changed: mpsc::UnboundedSender<()>,
) -> notify::Result<notify::RecommendedWatcher> {
    fs::create_dir_all(inbox).map_err(notify::Error::io)?;
    crate::watch::directory(inbox, changed)
}
