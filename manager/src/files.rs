//! Reading and writing the operator's files: bounded reads, atomic writes.

use std::ffi::OsString;
use std::fs;
use std::io::{Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};

/// Reads at most `limit` bytes of `path`; a larger file is refused without
/// being read whole (it cannot be what the caller expects).
pub fn read_limited(path: &Path, limit: usize, what: &str) -> Result<Vec<u8>> {
    let file =
        fs::File::open(path).with_context(|| format!("cannot open {what} {}", path.display()))?;
    let mut bytes = Vec::new();
    file.take(limit as u64 + 1)
        .read_to_end(&mut bytes)
        .with_context(|| format!("cannot read {what} {}", path.display()))?;
    if bytes.len() > limit {
        bail!(
            "{} is larger than any {what} can be ({limit} bytes)",
            path.display()
        );
    }
    Ok(bytes)
}

/// Whether an existing file at the destination may be replaced.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Existing {
    /// Replace it.
    Replace,
    /// Refuse, leaving it untouched.
    Keep,
}

/// Writes `bytes` to `path` with `mode`: through a temporary file in the same
/// directory, synced, then renamed into place, so readers see the old file or
/// the new one, never a part.
pub fn write_atomic(path: &Path, bytes: &[u8], mode: u32, existing: Existing) -> Result<()> {
    let dir = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    let mut temp = tempfile::Builder::new()
        .prefix(".ferry-")
        .tempfile_in(dir)
        .with_context(|| format!("cannot create a file in {}", dir.display()))?;
    temp.write_all(bytes)
        .and_then(|()| {
            temp.as_file()
                .set_permissions(fs::Permissions::from_mode(mode))
        })
        .and_then(|()| temp.as_file().sync_all())
        .with_context(|| format!("cannot write {}", path.display()))?;
    match existing {
        Existing::Replace => temp.persist(path).map(drop).map_err(|e| e.error),
        Existing::Keep => temp.persist_noclobber(path).map(drop).map_err(|e| e.error),
    }
    .with_context(|| format!("cannot write {}", path.display()))?;
    Ok(())
}

/// `base` with `suffix` appended to its file name (`keys/ops` + `.pub`).
/// Unlike `with_extension`, a dot already in the name is kept.
pub fn with_suffix(base: &Path, suffix: &str) -> PathBuf {
    let mut name = OsString::from(base.as_os_str());
    name.push(suffix);
    PathBuf::from(name)
}
