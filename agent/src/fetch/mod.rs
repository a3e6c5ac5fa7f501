//! Getting an artifact into the data directory, checked.
//!
//! Every transport writes through one [`Staging`] file: bytes go to
//! `downloads/<sha256>.part` in order, through an [`ArtifactCheck`], so
//! they are hashed as they are written and the transfer stops as soon as it
//! runs over the declared size. Only a complete file with the right hash is
//! renamed to `downloads/<sha256>.tar.gz`. An interrupted transfer keeps its
//! `.part`; the next attempt, by either transport, re-hashes what it holds
//! and asks only for the rest. The `.part`'s length is the whole record of
//! progress, so an artifact has no size limit and nothing else to persist.
//!
//! - [`import_file`]: from a local file (the inbox, the offline `install`).
//! - [`http`]: over HTTP(S) with Range requests.
//! - [`mqtt`]: in blocks over MQTT, where a device reaches only the broker.

pub mod http;
pub mod mqtt;

use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};

use ferry_protocol::digest::{ArtifactCheck, ArtifactError};
use ferry_protocol::manifest::ArtifactInfo;
use reqwest::StatusCode;

use crate::durable;
use crate::layout::Layout;

/// Why an artifact could not be fetched.
#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    /// The bytes are not the ones the manifest names. The partial file is gone.
    #[error("{0}")]
    Mismatch(#[from] ArtifactError),
    /// The transfer failed; what arrived is kept for a resume.
    #[error("download from {from} failed after {have} bytes: {reason}")]
    Transfer {
        /// Where from.
        from: String,
        /// Bytes held so far.
        have: u64,
        /// What went wrong.
        reason: String,
    },
    /// The HTTP endpoint could not be reached at all (`auto` then tries MQTT).
    #[error("cannot reach {url}: {reason}")]
    Unreachable {
        /// Where.
        url: String,
        /// Why.
        reason: String,
    },
    /// The manager refused to send the artifact over MQTT.
    #[error("the manager refused the artifact over MQTT: {0}")]
    Refused(String),
    /// MQTT blocks were wanted but the agent has no broker.
    #[error("the artifact can only come over MQTT, and no [broker] is configured")]
    NoBroker,
    /// The server answered with an error status.
    #[error("{url} answered HTTP {status}")]
    Status {
        /// Where from.
        url: String,
        /// The status.
        status: StatusCode,
    },
    /// A local file could not be read or written.
    #[error("{what}: {error}")]
    Io {
        /// What was being done.
        what: String,
        /// Why it failed.
        error: io::Error,
    },
}

fn io_err(what: impl Into<String>) -> impl FnOnce(io::Error) -> FetchError {
    let what = what.into();
    move |error| FetchError::Io { what, error }
}

/// The checked artifact an earlier attempt left, if it is still exactly the
/// bytes the manifest names: hashed again in full before it is reused (a
/// flash cell that flipped, or a hand that changed it, is caught here, not
/// after the unpack). A file that no longer matches is removed.
fn still_good(layout: &Layout, artifact: &ArtifactInfo) -> Option<PathBuf> {
    let checked = layout.checked_download(&artifact.sha256);
    let file = durable::open_regular(&checked).ok()?;
    let mut reader = CheckedReader::new(file, artifact);
    let mut sink = io::sink();
    let intact = io::copy(&mut reader, &mut sink).is_ok() && reader.finish().is_ok();
    if intact {
        Some(checked)
    } else {
        tracing::warn!(path = %checked.display(), "a kept artifact no longer matches its digest; fetching it again");
        let _ = fs::remove_file(&checked);
        None
    }
}

/// An artifact being written to its `.part` file.
pub(crate) struct Staging {
    path: PathBuf,
    /// Where the file goes once checked.
    checked: PathBuf,
    file: File,
    check: ArtifactCheck,
}

/// Where a transfer stands before it asks for anything.
pub(crate) enum Resumed {
    /// The checked artifact is there: nothing to fetch.
    Done(PathBuf),
    /// The `.part` file to continue, its bytes re-hashed.
    Partial(Staging),
}

impl Staging {
    /// Picks a transfer up where an earlier one, by either transport, left it.
    fn resume(layout: &Layout, artifact: &ArtifactInfo) -> Result<Resumed, FetchError> {
        if let Some(checked) = still_good(layout, artifact) {
            return Ok(Resumed::Done(checked));
        }
        let staging = Self::open(layout, artifact, true)?;
        if staging.held() == artifact.size {
            return staging.finish().map(Resumed::Done);
        }
        Ok(Resumed::Partial(staging))
    }

    /// Opens the `.part` file; with `resume`, re-hashes what it holds and
    /// continues after it, else starts empty.
    fn open(layout: &Layout, artifact: &ArtifactInfo, resume: bool) -> Result<Self, FetchError> {
        let dir = layout.downloads();
        fs::create_dir_all(&dir).map_err(io_err(format!("creating {}", dir.display())))?;
        let path = layout.partial_download(&artifact.sha256);
        let mut file = OpenOptions::new()
            .create(true)
            .read(true)
            .append(true)
            .open(&path)
            .map_err(io_err(format!("opening {}", path.display())))?;
        let mut check = ArtifactCheck::new(artifact);
        let held = file.metadata().map(|m| m.len()).unwrap_or(0);
        if resume && held <= artifact.size {
            let mut buf = vec![0u8; 64 * 1024];
            loop {
                let n = file
                    .read(&mut buf)
                    .map_err(io_err(format!("reading {}", path.display())))?;
                if n == 0 {
                    break;
                }
                check.update(&buf[..n])?;
            }
        } else if held > 0 {
            file.set_len(0)
                .map_err(io_err(format!("truncating {}", path.display())))?;
        }
        Ok(Self {
            path,
            checked: layout.checked_download(&artifact.sha256),
            file,
            check,
        })
    }

    fn held(&self) -> u64 {
        self.check.bytes_seen()
    }

    fn restart(&mut self, artifact: &ArtifactInfo) -> Result<(), FetchError> {
        self.file
            .set_len(0)
            .map_err(io_err(format!("truncating {}", self.path.display())))?;
        self.check = ArtifactCheck::new(artifact);
        Ok(())
    }

    fn write(&mut self, chunk: &[u8]) -> Result<(), FetchError> {
        if let Err(e) = self.check.update(chunk) {
            self.discard();
            return Err(e.into());
        }
        self.file
            .write_all(chunk)
            .map_err(io_err(format!("writing {}", self.path.display())))
    }

    /// Keeps what arrived for a later resume.
    fn keep(&mut self) {
        let _ = self.file.sync_data();
    }

    fn discard(&self) {
        let _ = fs::remove_file(&self.path);
    }

    /// Checks size and hash; on success renames the file into place.
    fn finish(self) -> Result<PathBuf, FetchError> {
        self.file
            .sync_all()
            .map_err(io_err(format!("syncing {}", self.path.display())))?;
        let path = self.path.clone();
        if let Err(e) = self.check.finish() {
            let _ = fs::remove_file(&path);
            return Err(e.into());
        }
        durable::rename(&path, &self.checked)
            .map_err(io_err(format!("renaming {}", path.display())))?;
        Ok(self.checked)
    }
}

/// A reader that passes every byte it reads through an [`ArtifactCheck`]:
/// a local artifact hashed in the same pass that unpacks it.
pub struct CheckedReader<R> {
    inner: R,
    check: ArtifactCheck,
    /// Set once the bytes ran over the declared size.
    over: Option<ArtifactError>,
}

impl<R: Read> CheckedReader<R> {
    /// Checks what is read from `inner` against `artifact`.
    pub fn new(inner: R, artifact: &ArtifactInfo) -> Self {
        Self {
            inner,
            check: ArtifactCheck::new(artifact),
            over: None,
        }
    }

    /// Reads what is left (a reader may stop before the end) and checks
    /// size and hash.
    pub fn finish(mut self) -> Result<(), FetchError> {
        if let Some(e) = self.over.take() {
            return Err(e.into());
        }
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            let n = self
                .inner
                .read(&mut buf)
                .map_err(io_err("reading the artifact"))?;
            if n == 0 {
                break;
            }
            self.check.update(&buf[..n])?;
        }
        self.check.finish()?;
        Ok(())
    }
}

impl<R: Read> Read for CheckedReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        if let Err(e) = self.check.update(&buf[..n]) {
            self.over = Some(e.clone());
            return Err(io::Error::other(e));
        }
        Ok(n)
    }
}

/// Copies an artifact from a local file (a USB stick, an inbox), checking it.
pub fn import_file(
    source: &Path,
    artifact: &ArtifactInfo,
    layout: &Layout,
) -> Result<PathBuf, FetchError> {
    if let Some(checked) = still_good(layout, artifact) {
        return Ok(checked);
    }
    let mut input =
        durable::open_regular(source).map_err(io_err(format!("opening {}", source.display())))?;
    let mut staging = Staging::open(layout, artifact, false)?;
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = input
            .read(&mut buf)
            .map_err(io_err(format!("reading {}", source.display())))?;
        if n == 0 {
            break;
        }
        staging.write(&buf[..n])?;
    }
    staging.finish()
}

#[cfg(test)]
mod tests {
    use ferry_protocol::Sha256Digest;
    use ferry_protocol::manifest::ArtifactFormat;

    use super::*;

    #[test]
    fn a_kept_artifact_is_hashed_again_before_it_is_reused() {
        let dir = tempfile::tempdir().unwrap();
        let layout = Layout::new(dir.path());
        fs::create_dir_all(layout.downloads()).unwrap();
        let bytes = b"the artifact's bytes".to_vec();
        let artifact = ArtifactInfo {
            sha256: Sha256Digest::of(&bytes),
            size: bytes.len() as u64,
            format: ArtifactFormat::TarGz,
        };
        let kept = layout.checked_download(&artifact.sha256);
        fs::write(&kept, &bytes).unwrap();
        assert_eq!(still_good(&layout, &artifact), Some(kept.clone()));
        // One bit flipped since it was checked: dropped, not used.
        let mut flipped = bytes.clone();
        flipped[3] ^= 1;
        fs::write(&kept, &flipped).unwrap();
        assert_eq!(still_good(&layout, &artifact), None);
        assert!(!kept.exists());
        assert!(matches!(
            Staging::resume(&layout, &artifact),
            Ok(Resumed::Partial(_))
        ));
        // A link in its place is not followed.
        let elsewhere = dir.path().join("elsewhere");
        fs::write(&elsewhere, &bytes).unwrap();
        std::os::unix::fs::symlink(&elsewhere, &kept).unwrap();
        assert_eq!(still_good(&layout, &artifact), None);
    }
}
