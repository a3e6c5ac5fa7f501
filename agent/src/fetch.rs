//! Getting an artifact into the data directory, checked.
//!
//! Bytes go to `downloads/<sha256>.part` through an [`ArtifactCheck`], so
//! they are hashed as they are written and the transfer stops as soon as it
//! runs over the declared size. Only a complete file with the right hash is
//! renamed to `downloads/<sha256>.tar.gz`. An interrupted HTTP download
//! keeps its `.part`, and the next attempt asks for the rest with a Range
//! request after re-hashing what it already has.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};

use ferry_protocol::digest::{ArtifactCheck, ArtifactError};
use ferry_protocol::manifest::ArtifactInfo;
use reqwest::StatusCode;
use reqwest::header::RANGE;

use crate::durable;
use crate::layout::Layout;

/// Why an artifact could not be fetched.
#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    /// The bytes are not the ones the manifest names. The partial file is gone.
    #[error("{0}")]
    Mismatch(#[from] ArtifactError),
    /// The transfer failed; what arrived is kept for a resume.
    #[error("download from {url} failed after {have} bytes: {reason}")]
    Transfer {
        /// Where from.
        url: String,
        /// Bytes held so far.
        have: u64,
        /// What went wrong.
        reason: String,
    },
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

/// An artifact being written to its `.part` file.
struct Staging {
    path: PathBuf,
    file: File,
    check: ArtifactCheck,
}

impl Staging {
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
        Ok(Self { path, file, check })
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
    fn finish(self, checked: &Path) -> Result<PathBuf, FetchError> {
        self.file
            .sync_all()
            .map_err(io_err(format!("syncing {}", self.path.display())))?;
        let path = self.path.clone();
        if let Err(e) = self.check.finish() {
            let _ = fs::remove_file(&path);
            return Err(e.into());
        }
        durable::rename(&path, checked).map_err(io_err(format!("renaming {}", path.display())))?;
        Ok(checked.to_owned())
    }
}

/// Copies an artifact from a local file (a USB stick, an inbox), checking it.
pub fn import_file(
    source: &Path,
    artifact: &ArtifactInfo,
    layout: &Layout,
) -> Result<PathBuf, FetchError> {
    let checked = layout.checked_download(&artifact.sha256);
    if checked.exists() {
        return Ok(checked);
    }
    let mut input = File::open(source).map_err(io_err(format!("opening {}", source.display())))?;
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
    staging.finish(&checked)
}

/// Credentials for the artifact store.
#[derive(Debug, Clone)]
pub struct Credentials {
    /// User name (the device id).
    pub username: String,
    /// Password.
    pub password: String,
}

/// Downloads an artifact over HTTP(S), resuming a `.part` left by an earlier
/// attempt. `progress` is called with (bytes held, total) as data arrives.
pub async fn download(
    http: &reqwest::Client,
    url: &str,
    credentials: Option<&Credentials>,
    artifact: &ArtifactInfo,
    layout: &Layout,
    mut progress: impl FnMut(u64, u64),
) -> Result<PathBuf, FetchError> {
    let checked = layout.checked_download(&artifact.sha256);
    if checked.exists() {
        return Ok(checked);
    }
    let mut staging = Staging::open(layout, artifact, true)?;
    if staging.held() == artifact.size {
        return staging.finish(&checked);
    }
    let transfer = |have: u64, reason: String| FetchError::Transfer {
        url: url.to_owned(),
        have,
        reason,
    };

    let mut request = http.get(url);
    if let Some(c) = credentials {
        request = request.basic_auth(&c.username, Some(&c.password));
    }
    if staging.held() > 0 {
        request = request.header(RANGE, format!("bytes={}-", staging.held()));
    }
    let mut response = request
        .send()
        .await
        .map_err(|e| transfer(staging.held(), e.to_string()))?;
    match response.status() {
        StatusCode::PARTIAL_CONTENT => {}
        // The server ignored the range: start over.
        StatusCode::OK => staging.restart(artifact)?,
        status => {
            return Err(FetchError::Status {
                url: url.to_owned(),
                status,
            });
        }
    }
    loop {
        match response.chunk().await {
            Ok(Some(chunk)) => {
                staging.write(&chunk)?;
                progress(staging.held(), artifact.size);
            }
            Ok(None) => break,
            Err(e) => {
                staging.keep();
                return Err(transfer(staging.held(), e.to_string()));
            }
        }
    }
    if staging.held() < artifact.size {
        staging.keep();
        return Err(transfer(staging.held(), "connection closed early".into()));
    }
    staging.finish(&checked)
}
