//! Writes that survive power loss at any instant.
//!
//! A file is replaced by writing a temporary file, syncing it, renaming it
//! over the old one and syncing the directory, so after a crash it holds the
//! old contents or the new, never a part. Links are swapped the same way.
//!
//! Temporary names are predictable, and some directories (the inbox) may be
//! writable by others: a temporary file is always created new
//! (`O_CREAT|O_EXCL`, which never follows a link), after removing whatever
//! had its name, so a link planted there cannot redirect the write. Files
//! are read without following a final link, and only up to a size.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::unix::fs::{OpenOptionsExt, symlink};
use std::path::Path;

/// The largest JSON file the agent reads back (its state, its journal).
const MAX_JSON_BYTES: u64 = 16 * 1024 * 1024;

/// Replaces `path` with `bytes` atomically and durably.
pub fn write_file(path: &Path, bytes: &[u8]) -> io::Result<()> {
    write_file_mode(path, bytes, 0o644)
}

/// [`write_file`] with the file's mode (a key's 0600: never readable by
/// anyone else, not even for an instant).
pub fn write_file_mode(path: &Path, bytes: &[u8], mode: u32) -> io::Result<()> {
    let dir = parent(path)?;
    let temp = temp_name(path);
    let result = (|| {
        // A leftover, or a planted link: the link itself goes, not its target.
        match fs::remove_file(&temp) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
        let mut file = OpenOptions::new()
            .write(true)
            .create_new(true)
            .custom_flags(libc_nofollow())
            .mode(mode)
            .open(&temp)?;
        file.write_all(bytes)?;
        file.sync_all()?;
        fs::rename(&temp, path)?;
        sync_dir(dir)
    })();
    if result.is_err() {
        let _ = fs::remove_file(&temp);
    }
    result
}

/// Points the symbolic link `link` at `target` atomically and durably,
/// replacing whatever link was there.
pub fn replace_symlink(target: &Path, link: &Path) -> io::Result<()> {
    let dir = parent(link)?;
    let temp = temp_name(link);
    match fs::remove_file(&temp) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    symlink(target, &temp)?;
    fs::rename(&temp, link)?;
    sync_dir(dir)
}

/// Removes `path` (a file or link) if present, and syncs its directory.
pub fn remove_file(path: &Path) -> io::Result<()> {
    match fs::remove_file(path) {
        Ok(()) => sync_dir(parent(path)?),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e),
    }
}

/// Renames `from` to `to` and syncs the directory of `to`.
pub fn rename(from: &Path, to: &Path) -> io::Result<()> {
    fs::rename(from, to)?;
    sync_dir(parent(to)?)
}

/// Makes a directory's entries (creations, renames, removals) durable.
pub fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

/// Flushes every dirty page of the file system holding `path` in one call:
/// cheaper on flash than syncing each file of an unpacked release.
pub fn sync_filesystem(path: &Path) -> io::Result<()> {
    let file = File::open(path)?;
    nix::unistd::syncfs(&file).map_err(io::Error::from)
}

/// Opens `path` for reading without following a final symbolic link, and
/// only if it is a regular file (not a device, a pipe or a directory).
pub fn open_regular(path: &Path) -> io::Result<File> {
    let file = OpenOptions::new()
        .read(true)
        .custom_flags(libc_nofollow() | nix::fcntl::OFlag::O_NONBLOCK.bits())
        .open(path)?;
    if !file.metadata()?.is_file() {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("{} is not a regular file", path.display()),
        ));
    }
    Ok(file)
}

/// Reads a regular file of at most `limit` bytes (see [`open_regular`]).
pub fn read_limited(path: &Path, limit: u64) -> io::Result<Vec<u8>> {
    let file = open_regular(path)?;
    let mut bytes = Vec::new();
    file.take(limit + 1).read_to_end(&mut bytes)?;
    if bytes.len() as u64 > limit {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("{} is larger than {limit} bytes", path.display()),
        ));
    }
    Ok(bytes)
}

fn libc_nofollow() -> i32 {
    nix::fcntl::OFlag::O_NOFOLLOW.bits()
}

/// Reads a JSON file written by [`write_json`]; `None` when it does not exist.
pub fn read_json<T: serde::de::DeserializeOwned>(path: &Path) -> io::Result<Option<T>> {
    match read_limited(path, MAX_JSON_BYTES) {
        Ok(bytes) => serde_json::from_slice(&bytes).map(Some).map_err(|e| {
            io::Error::new(
                io::ErrorKind::InvalidData,
                format!("{}: {e}", path.display()),
            )
        }),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e),
    }
}

/// Replaces `path` with `value` as JSON, atomically and durably.
pub fn write_json<T: serde::Serialize>(path: &Path, value: &T) -> io::Result<()> {
    let bytes = serde_json::to_vec_pretty(value).map_err(io::Error::other)?;
    write_file(path, &bytes)
}

fn parent(path: &Path) -> io::Result<&Path> {
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => Ok(p),
        _ => Ok(Path::new(".")),
    }
}

fn temp_name(path: &Path) -> std::path::PathBuf {
    let mut name = path.file_name().unwrap_or_default().to_os_string();
    name.push(".tmp");
    path.with_file_name(name)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replaces_files_and_links() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("state.json");
        write_file(&file, b"one").unwrap();
        write_file(&file, b"two").unwrap();
        assert_eq!(fs::read(&file).unwrap(), b"two");

        let link = dir.path().join("current");
        replace_symlink(Path::new("releases/a"), &link).unwrap();
        replace_symlink(Path::new("releases/b"), &link).unwrap();
        assert_eq!(fs::read_link(&link).unwrap(), Path::new("releases/b"));
        // No temporary names are left behind.
        let names: Vec<_> = fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names.len(), 2, "{names:?}");

        remove_file(&link).unwrap();
        remove_file(&link).unwrap();
        assert!(fs::symlink_metadata(&link).is_err());
        sync_filesystem(dir.path()).unwrap();
    }
}
