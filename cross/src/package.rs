//! Reproducible release archives.
//!
//! The same directory always packs to the same bytes: entries sorted by
//! path, every mtime 0, owner and group 0 with no names, modes reduced to
//! 0755 (directories and executables) or 0644, and a gzip header without a
//! name or time. So a release's sha256 depends only on its files' contents,
//! names and executable bits, and two operators packing the same tree get
//! the same artifact.
//!
//! Only regular files and directories are packed: devices refuse anything
//! else, so it is refused here first, with the path that offends.

use std::fs::{self, File};
use std::io::{self, Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use ferry_protocol::manifest::{
    ArtifactFormat, ArtifactInfo, ArtifactKind, BuildInfo, HealthSettings, MANIFEST_SCHEMA,
    ReloadRule, RunSettings, UnpackLimits,
};
use ferry_protocol::{Manifest, RelPath, ServiceName, Sha256Digest, Target, Timestamp};
use sha2::{Digest, Sha256};

/// What to package, and what to say about it in the manifest.
#[derive(Debug, Clone)]
pub struct PackageRequest {
    /// The directory whose contents become the release.
    pub dir: PathBuf,
    /// The service the release belongs to.
    pub service: ServiceName,
    /// The release's version.
    pub version: semver::Version,
    /// The program to run, relative to `dir`.
    pub entrypoint: RelPath,
    /// The release's sequence number (anti-rollback).
    pub sequence: u64,
    /// The target the release was built for.
    pub target: Target,
    /// How the entrypoint was built; detected from the file when `None`.
    pub kind: Option<ArtifactKind>,
    /// When devices should stop accepting the release.
    pub expires: Option<Timestamp>,
    /// How the release was built.
    pub build: BuildInfo,
    /// The health gate devices apply.
    pub health: HealthSettings,
    /// Paths devices watch, and what they do on a change.
    pub reload: Vec<ReloadRule>,
    /// How devices run the service: arguments, environment, user, stop.
    pub run: RunSettings,
}

/// The files `package` wrote.
#[derive(Debug, Clone)]
pub struct Packaged {
    /// The `.tar.gz` artifact.
    pub artifact: PathBuf,
    /// The unsigned manifest beside it.
    pub manifest_path: PathBuf,
    /// The manifest's contents.
    pub manifest: Manifest,
}

/// Why a directory could not be packaged.
#[derive(Debug, thiserror::Error)]
pub enum PackageError {
    /// A file or directory could not be read or written.
    #[error("{path}: {error}")]
    Io {
        /// The path concerned.
        path: PathBuf,
        /// What went wrong.
        error: io::Error,
    },
    /// The source is not a directory.
    #[error("{0} is not a directory")]
    NotADirectory(PathBuf),
    /// Something other than a regular file or a directory.
    #[error("{path}: only regular files and directories can be packaged; this is a {kind}")]
    UnsupportedEntry {
        /// The offending path.
        path: PathBuf,
        /// What it is instead.
        kind: &'static str,
    },
    /// A name that is not a valid release path (not UTF-8, or has `\`).
    #[error("{path}: cannot be packaged: {reason}")]
    BadName {
        /// The offending path.
        path: PathBuf,
        /// Why.
        reason: String,
    },
    /// The entrypoint is missing, not a regular file, or not executable.
    #[error("entrypoint {entrypoint}: {reason}")]
    Entrypoint {
        /// The entrypoint as given.
        entrypoint: RelPath,
        /// What is wrong with it.
        reason: &'static str,
    },
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> PackageError + '_ {
    move |error| PackageError::Io {
        path: path.to_owned(),
        error,
    }
}

/// One thing to put in the archive.
struct Entry {
    rel: RelPath,
    source: PathBuf,
    is_dir: bool,
    executable: bool,
    size: u64,
}

/// Packs `request.dir` into `out_dir/<service>-<version>.tar.gz` and writes
/// `out_dir/<service>-<version>.manifest.json` beside it. Both files are
/// written under temporary names and renamed into place, so a failed run
/// leaves no half-written output.
pub fn package(request: &PackageRequest, out_dir: &Path) -> Result<Packaged, PackageError> {
    let meta = fs::metadata(&request.dir).map_err(io_err(&request.dir))?;
    if !meta.is_dir() {
        return Err(PackageError::NotADirectory(request.dir.clone()));
    }
    let mut entries = Vec::new();
    collect(&request.dir, None, &mut entries)?;
    entries.sort_by(|a, b| a.rel.as_str().cmp(b.rel.as_str()));

    let entry = entries
        .iter()
        .find(|e| e.rel == request.entrypoint)
        .ok_or_else(|| PackageError::Entrypoint {
            entrypoint: request.entrypoint.clone(),
            reason: "not found in the directory",
        })?;
    if entry.is_dir {
        return Err(PackageError::Entrypoint {
            entrypoint: request.entrypoint.clone(),
            reason: "is a directory",
        });
    }
    if !entry.executable {
        return Err(PackageError::Entrypoint {
            entrypoint: request.entrypoint.clone(),
            reason: "is not executable (chmod +x it)",
        });
    }
    let kind = match request.kind {
        Some(kind) => kind,
        None => detect_kind(&entry.source)?,
    };

    fs::create_dir_all(out_dir).map_err(io_err(out_dir))?;
    let stem = format!("{}-{}", request.service, request.version);
    let artifact_path = out_dir.join(format!("{stem}.tar.gz"));
    let manifest_path = out_dir.join(format!("{stem}.manifest.json"));

    let (sha256, size) = write_archive(&entries, out_dir, &artifact_path)?;
    let manifest = Manifest {
        schema: MANIFEST_SCHEMA,
        service: request.service.clone(),
        version: request.version.clone(),
        sequence: request.sequence,
        target: request.target.clone(),
        kind,
        entrypoint: request.entrypoint.clone(),
        artifact: ArtifactInfo {
            sha256,
            size,
            format: ArtifactFormat::TarGz,
        },
        limits: UnpackLimits {
            unpacked_bytes: entries.iter().map(|e| e.size).sum(),
            entries: entries.len() as u64,
        },
        expires: request.expires,
        health: request.health.clone(),
        reload: request.reload.clone(),
        run: request.run.clone(),
        build: request.build.clone(),
    };
    write_file_atomically(out_dir, &manifest_path, |file| {
        file.write_all(&manifest.to_json())
    })?;
    Ok(Packaged {
        artifact: artifact_path,
        manifest_path,
        manifest,
    })
}

/// Walks `dir` depth-first, refusing anything but files and directories.
fn collect(dir: &Path, prefix: Option<&str>, out: &mut Vec<Entry>) -> Result<(), PackageError> {
    for item in fs::read_dir(dir).map_err(io_err(dir))? {
        let item = item.map_err(io_err(dir))?;
        let source = item.path();
        let name = item.file_name();
        let name = name.to_str().ok_or_else(|| PackageError::BadName {
            path: source.clone(),
            reason: "its name is not UTF-8".into(),
        })?;
        let rel = match prefix {
            Some(prefix) => format!("{prefix}/{name}"),
            None => name.to_owned(),
        };
        let rel = RelPath::new(rel).map_err(|e| PackageError::BadName {
            path: source.clone(),
            reason: e.reason.into(),
        })?;
        // symlink_metadata: a link is reported as a link, not followed.
        let meta = fs::symlink_metadata(&source).map_err(io_err(&source))?;
        let file_type = meta.file_type();
        if file_type.is_dir() {
            out.push(Entry {
                rel: rel.clone(),
                source: source.clone(),
                is_dir: true,
                executable: true,
                size: 0,
            });
            collect(&source, Some(rel.as_str()), out)?;
        } else if file_type.is_file() {
            out.push(Entry {
                rel,
                source,
                is_dir: false,
                executable: meta.permissions().mode() & 0o111 != 0,
                size: meta.len(),
            });
        } else {
            return Err(PackageError::UnsupportedEntry {
                path: source,
                kind: describe(&file_type),
            });
        }
    }
    Ok(())
}

fn describe(file_type: &fs::FileType) -> &'static str {
    use std::os::unix::fs::FileTypeExt;
    if file_type.is_symlink() {
        "symbolic link"
    } else if file_type.is_fifo() {
        "named pipe"
    } else if file_type.is_socket() {
        "socket"
    } else if file_type.is_block_device() || file_type.is_char_device() {
        "device file"
    } else {
        "special file"
    }
}

/// Go binaries carry this marker in their build info section; it is how
/// `go version` recognises them.
const GO_BUILDINFO_MAGIC: &[u8] = b"\xff Go buildinf:";

fn detect_kind(path: &Path) -> Result<ArtifactKind, PackageError> {
    let bytes = fs::read(path).map_err(io_err(path))?;
    let is_go = bytes
        .windows(GO_BUILDINFO_MAGIC.len())
        .any(|w| w == GO_BUILDINFO_MAGIC);
    Ok(if is_go {
        ArtifactKind::Go
    } else {
        ArtifactKind::C
    })
}

/// Writes the archive; returns its sha256 and size, computed as it is written.
fn write_archive(
    entries: &[Entry],
    out_dir: &Path,
    path: &Path,
) -> Result<(Sha256Digest, u64), PackageError> {
    let mut digest = None;
    write_file_atomically(out_dir, path, |file| {
        let hashing = HashingWriter {
            inner: file,
            hasher: Sha256::new(),
            written: 0,
        };
        let gzip = flate2::GzBuilder::new()
            .mtime(0)
            .write(hashing, flate2::Compression::best());
        let mut tar = tar::Builder::new(gzip);
        for entry in entries {
            append(&mut tar, entry)?;
        }
        let hashing = tar.into_inner()?.finish()?;
        digest = Some((
            Sha256Digest::from_bytes(hashing.hasher.finalize().into()),
            hashing.written,
        ));
        Ok(())
    })?;
    digest.ok_or_else(|| PackageError::Io {
        path: path.to_owned(),
        error: io::Error::other("archive was not written"),
    })
}

fn append<W: Write>(tar: &mut tar::Builder<W>, entry: &Entry) -> io::Result<()> {
    let mut header = tar::Header::new_gnu();
    header.set_uid(0);
    header.set_gid(0);
    header.set_mtime(0);
    header.set_mode(if entry.executable { 0o755 } else { 0o644 });
    if entry.is_dir {
        header.set_entry_type(tar::EntryType::Directory);
        header.set_size(0);
        tar.append_data(&mut header, format!("{}/", entry.rel), io::empty())
    } else {
        header.set_entry_type(tar::EntryType::Regular);
        header.set_size(entry.size);
        let file = File::open(&entry.source)?;
        // A file that grows while being packed must not spill past its header.
        let mut body = file.take(entry.size);
        tar.append_data(&mut header, entry.rel.as_str(), &mut body)?;
        if body.limit() != 0 {
            return Err(io::Error::other(format!(
                "{} shrank while it was being packed",
                entry.source.display()
            )));
        }
        Ok(())
    }
}

struct HashingWriter<W> {
    inner: W,
    hasher: Sha256,
    written: u64,
}

impl<W: Write> Write for HashingWriter<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.hasher.update(&buf[..n]);
        self.written += n as u64;
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

/// Writes `path` through a temporary file in `dir`, synced and renamed into place.
fn write_file_atomically(
    dir: &Path,
    path: &Path,
    fill: impl FnOnce(&mut File) -> io::Result<()>,
) -> Result<(), PackageError> {
    let mut temp = tempfile::Builder::new()
        .prefix(".ferry-")
        .tempfile_in(dir)
        .map_err(io_err(dir))?;
    fill(temp.as_file_mut()).map_err(io_err(path))?;
    let file = temp.as_file();
    file.set_permissions(fs::Permissions::from_mode(0o644))
        .map_err(io_err(path))?;
    file.sync_all().map_err(io_err(path))?;
    temp.persist(path).map_err(|e| PackageError::Io {
        path: path.to_owned(),
        error: e.error,
    })?;
    Ok(())
}
