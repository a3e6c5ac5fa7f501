//! A directly supervised service's output: `logs/SERVICE.log`, never more
//! than its cap ([`LOG_BYTES`] unless configured) on flash, plus the one
//! before it (`SERVICE.log.1`).
//!
//! The service writes into a pipe (stdout and stderr both, in order) and a
//! task of the agent's copies it to the file, moving the file aside when
//! the next write would take it past the cap. A service that logs every
//! request (an access log) cannot fill the data partition.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::os::fd::OwnedFd;
use std::os::unix::fs::OpenOptionsExt;
use std::path::PathBuf;

use tokio::io::AsyncReadExt;

/// The most one log file holds by default (`[limits] service_log_bytes`);
/// with the previous one, a service's logs take at most twice this.
pub const LOG_BYTES: u64 = 1024 * 1024;

/// A pipe for a service's stdout and stderr: (the end the agent reads, the
/// end the service writes). Neither leaks into other children.
pub fn pipe() -> io::Result<(OwnedFd, OwnedFd)> {
    nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).map_err(io::Error::from)
}

/// Copies what the service writes into `output` to the log at `path`
/// until every writer has closed the pipe.
pub async fn keep(output: OwnedFd, path: PathBuf, cap: u64) {
    let mut pipe = match tokio::net::unix::pipe::Receiver::from_owned_fd(output) {
        Ok(pipe) => pipe,
        Err(e) => {
            tracing::warn!(path = %path.display(), error = %e, "cannot read the service's output");
            return;
        }
    };
    let mut log = CappedLog::new(path, cap);
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        match pipe.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => log.write(&buf[..n]),
        }
    }
}

/// A file that is moved to `PATH.1` (replacing the one there) before it
/// would grow past `cap`.
pub struct CappedLog {
    path: PathBuf,
    cap: u64,
    file: Option<(File, u64)>,
}

impl CappedLog {
    /// Appends to `path` (it may already hold an earlier run's output).
    pub fn new(path: PathBuf, cap: u64) -> Self {
        Self {
            path,
            cap: cap.max(1),
            file: None,
        }
    }

    /// Writes `bytes`, rotating first if they would not fit. A failure is
    /// logged and the bytes dropped: a full disk must not stop a service.
    pub fn write(&mut self, bytes: &[u8]) {
        // A chunk larger than the cap keeps only its end.
        let bytes = &bytes[bytes.len().saturating_sub(self.cap as usize)..];
        if let Err(e) = self.try_write(bytes) {
            tracing::warn!(path = %self.path.display(), error = %e, "service output not logged");
            self.file = None;
        }
    }

    fn try_write(&mut self, bytes: &[u8]) -> io::Result<()> {
        let full = self
            .file
            .as_ref()
            .is_some_and(|(_, len)| len + bytes.len() as u64 > self.cap);
        if full {
            self.file = None;
            let mut old = self.path.clone().into_os_string();
            old.push(".1");
            fs::rename(&self.path, old)?;
        }
        if self.file.is_none() {
            let file = OpenOptions::new()
                .create(true)
                .append(true)
                .mode(0o640)
                .custom_flags(nix::fcntl::OFlag::O_NOFOLLOW.bits())
                .open(&self.path)?;
            let len = file.metadata()?.len();
            self.file = Some((file, len));
            // An earlier run's file may be full already.
            if len + bytes.len() as u64 > self.cap && len > 0 {
                return self.try_write(bytes);
            }
        }
        if let Some((file, len)) = &mut self.file {
            file.write_all(bytes)?;
            *len += bytes.len() as u64;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_log_is_moved_aside_before_it_passes_the_cap() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("api.log");
        let old = dir.path().join("api.log.1");
        let mut log = CappedLog::new(path.clone(), 100);
        for i in 0..30 {
            log.write(format!("line {i:04}\n").as_bytes()); // 10 bytes each
        }
        let current = fs::read_to_string(&path).unwrap();
        let previous = fs::read_to_string(&old).unwrap();
        assert!(current.len() <= 100 && previous.len() <= 100);
        assert!(current.ends_with("line 0029\n"), "{current}");
        assert!(previous.ends_with("line 0019\n"), "{previous}");
        // A chunk over the cap keeps its end only.
        log.write(&[b'x'; 250]);
        assert_eq!(fs::read(&path).unwrap(), vec![b'x'; 100]);
        // A new run appends to what is there, within the cap.
        drop(log);
        let mut again = CappedLog::new(path.clone(), 100);
        again.write(b"restarted\n");
        assert_eq!(fs::read_to_string(&path).unwrap(), "restarted\n");
        assert_eq!(fs::read(&old).unwrap(), vec![b'x'; 100]);
    }

    #[test]
    fn a_planted_link_is_not_followed() {
        let dir = tempfile::tempdir().unwrap();
        let target = dir.path().join("elsewhere");
        fs::write(&target, "keep me").unwrap();
        let path = dir.path().join("api.log");
        std::os::unix::fs::symlink(&target, &path).unwrap();
        let mut log = CappedLog::new(path, 100);
        log.write(b"hello\n");
        assert_eq!(fs::read_to_string(&target).unwrap(), "keep me");
    }
}
