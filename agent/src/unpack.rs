//! Unpacking a release archive under strict rules.
//!
//! A release archive may hold only regular files and directories, with
//! relative paths that stay inside the release. Links of any kind, device
//! nodes, pipes and sparse files are refused, as are absolute paths and
//! `..`. The number of entries and the bytes written are capped by the
//! manifest and by the agent's own ceiling, and the decompressed stream
//! itself is capped, so a gzip bomb stops at the limit.
//!
//! Nothing can be written outside `dest`: it is created empty here, every
//! path is a checked [`RelPath`], and no link is ever created inside it, so
//! no path can be redirected.

use std::cell::Cell;
use std::fs::{self, File, OpenOptions};
use std::io::{self, BufReader, Read};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::rc::Rc;

use ferry_protocol::RelPath;
use tar::EntryType;

/// Caps on what one archive may unpack to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UnpackLimits {
    /// Bytes of file contents in all.
    pub max_bytes: u64,
    /// Entries (files and directories) in all.
    pub max_entries: u64,
}

/// What an archive unpacked to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Unpacked {
    /// Entries written.
    pub entries: u64,
    /// Bytes of file contents written.
    pub bytes: u64,
}

/// Why an archive was refused. Each names the entry at fault.
#[derive(Debug, thiserror::Error)]
pub enum UnpackError {
    /// An entry type other than a regular file or a directory.
    #[error("entry {path:?} is a {kind}; only regular files and directories are allowed")]
    UnsupportedEntry {
        /// The entry's path.
        path: String,
        /// What it is.
        kind: &'static str,
    },
    /// A path that is absolute, climbs out with `..`, or is otherwise unsafe.
    #[error("entry {path:?}: {reason}")]
    UnsafePath {
        /// The entry's path.
        path: String,
        /// Why it is unsafe.
        reason: &'static str,
    },
    /// The same path twice.
    #[error("entry {path:?} appears twice")]
    Duplicate {
        /// The entry's path.
        path: String,
    },
    /// More entries than allowed.
    #[error("archive has more than {limit} entries")]
    TooManyEntries {
        /// The limit.
        limit: u64,
    },
    /// More bytes than allowed.
    #[error("archive unpacks to more than {limit} bytes")]
    TooLarge {
        /// The limit.
        limit: u64,
    },
    /// The archive could not be read: truncated, corrupt, or not a tar.gz.
    #[error("archive is corrupt or truncated: {0}")]
    Corrupt(io::Error),
    /// The destination could not be written.
    #[error("cannot write {path}: {error}")]
    Write {
        /// The file or directory being written.
        path: PathBuf,
        /// What went wrong.
        error: io::Error,
    },
}

/// Unpacks the `.tar.gz` at `archive` into `dest`, which must not exist yet.
pub fn unpack(archive: &Path, dest: &Path, limits: UnpackLimits) -> Result<Unpacked, UnpackError> {
    let file = File::open(archive).map_err(UnpackError::Corrupt)?;
    unpack_from(file, dest, limits)
}

/// Unpacks a `.tar.gz` read from `source` into `dest`, which must not exist
/// yet. Reads no further than the archive's end.
pub fn unpack_from(
    source: impl Read,
    dest: &Path,
    limits: UnpackLimits,
) -> Result<Unpacked, UnpackError> {
    let write_err = |path: &Path| {
        let path = path.to_owned();
        move |error| UnpackError::Write { path, error }
    };
    let file = source;
    fs::create_dir(dest).map_err(write_err(dest))?;

    // Headers, padding and long names cost at most a few blocks per entry on
    // top of the contents; anything beyond that is a bomb.
    let stream_cap = limits.max_bytes.saturating_add(
        limits
            .max_entries
            .saturating_add(16)
            .saturating_mul(4 * 512),
    );
    let over_cap = Rc::new(Cell::new(false));
    let capped = CappedReader {
        inner: flate2::read::GzDecoder::new(BufReader::new(file)),
        left: stream_cap,
        over: over_cap.clone(),
    };
    let mut archive = tar::Archive::new(capped);
    let corrupt = |e: io::Error| {
        if over_cap.get() {
            UnpackError::TooLarge {
                limit: limits.max_bytes,
            }
        } else {
            UnpackError::Corrupt(e)
        }
    };

    let mut done = Unpacked {
        entries: 0,
        bytes: 0,
    };
    for entry in archive.entries().map_err(corrupt)? {
        let mut entry = entry.map_err(corrupt)?;
        let raw = String::from_utf8_lossy(&entry.path_bytes()).into_owned();
        let kind = entry.header().entry_type();
        let is_dir = match kind {
            EntryType::Regular => false,
            EntryType::Directory => true,
            other => {
                return Err(UnpackError::UnsupportedEntry {
                    path: raw,
                    kind: describe(other),
                });
            }
        };
        let Some(rel) = checked_path(&raw)? else {
            // The archive's own root ("./"): nothing to create.
            continue;
        };
        done.entries += 1;
        if done.entries > limits.max_entries {
            return Err(UnpackError::TooManyEntries {
                limit: limits.max_entries,
            });
        }
        let target = dest.join(rel.as_str());
        if is_dir {
            fs::create_dir_all(&target).map_err(write_err(&target))?;
            continue;
        }

        let size = entry.header().size().map_err(corrupt)?;
        done.bytes = done.bytes.saturating_add(size);
        if done.bytes > limits.max_bytes {
            return Err(UnpackError::TooLarge {
                limit: limits.max_bytes,
            });
        }
        if let Some(parent) = target.parent() {
            fs::create_dir_all(parent).map_err(write_err(parent))?;
        }
        let executable = entry.header().mode().map_err(corrupt)? & 0o111 != 0;
        // No setuid, setgid or sticky bits, whatever the archive says.
        let mode = if executable { 0o755 } else { 0o644 };
        let mut out = match OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(mode)
            .open(&target)
        {
            Ok(file) => file,
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
                return Err(UnpackError::Duplicate { path: raw });
            }
            Err(e) => return Err(write_err(&target)(e)),
        };
        let copied = copy(&mut entry, &mut out, &target).map_err(|e| match e {
            CopyError::Read(e) => corrupt(e),
            CopyError::Write(e) => e,
        })?;
        if copied != size {
            return Err(UnpackError::Corrupt(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                format!("entry {raw:?} ends after {copied} of {size} bytes"),
            )));
        }
    }
    Ok(done)
}

enum CopyError {
    Read(io::Error),
    Write(UnpackError),
}

/// Copies an entry's contents, telling read errors (a bad archive) from
/// write errors (a full or failing disk).
fn copy(from: &mut impl Read, to: &mut File, path: &Path) -> Result<u64, CopyError> {
    use std::io::Write;
    let mut buf = [0u8; 64 * 1024];
    let mut total = 0u64;
    loop {
        let n = match from.read(&mut buf) {
            Ok(0) => return Ok(total),
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(CopyError::Read(e)),
        };
        to.write_all(&buf[..n]).map_err(|error| {
            CopyError::Write(UnpackError::Write {
                path: path.to_owned(),
                error,
            })
        })?;
        total += n as u64;
    }
}

/// The entry's path as a [`RelPath`]; `None` for the archive root. A leading
/// `./` (as `tar -C dir .` writes) and a directory's trailing `/` are allowed.
fn checked_path(raw: &str) -> Result<Option<RelPath>, UnpackError> {
    let unsafe_path = |reason| UnpackError::UnsafePath {
        path: raw.to_owned(),
        reason,
    };
    if raw.starts_with('/') {
        return Err(unsafe_path("absolute paths are not allowed"));
    }
    let mut path = raw;
    while let Some(rest) = path.strip_prefix("./") {
        path = rest;
    }
    let path = path.trim_end_matches('/');
    if path.is_empty() || path == "." {
        return Ok(None);
    }
    if path.split('/').any(|c| c == "..") {
        return Err(unsafe_path("'..' is not allowed"));
    }
    RelPath::new(path)
        .map(Some)
        .map_err(|e| unsafe_path(e.reason))
}

fn describe(kind: EntryType) -> &'static str {
    match kind {
        EntryType::Symlink => "symbolic link",
        EntryType::Link => "hard link",
        EntryType::Char | EntryType::Block => "device node",
        EntryType::Fifo => "named pipe",
        EntryType::GNUSparse => "sparse file",
        EntryType::XGlobalHeader => "global pax header",
        _ => "special entry",
    }
}

/// A reader that fails once more than `left` bytes have been read.
struct CappedReader<R> {
    inner: R,
    left: u64,
    over: Rc<Cell<bool>>,
}

impl<R: Read> Read for CappedReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if self.left == 0 {
            // Is there more? One byte past the cap is enough to know.
            let mut probe = [0u8; 1];
            if self.inner.read(&mut probe)? == 0 {
                return Ok(0);
            }
            self.over.set(true);
            return Err(io::Error::other("decompressed archive exceeds its limit"));
        }
        let want = buf
            .len()
            .min(usize::try_from(self.left).unwrap_or(usize::MAX));
        let n = self.inner.read(&mut buf[..want])?;
        self.left -= n as u64;
        Ok(n)
    }
}
