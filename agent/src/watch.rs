//! File watching (inotify through `notify`), reduced to changes.
//!
//! `notify` also reports opening and reading. The agent reads what it
//! watches (the inbox it scans, the config it loads), so taking those as
//! changes would have every read set off the next: a loop that keeps a
//! core busy and, by waking the daemon's loop each time, cancels every
//! broker connection attempt before its TLS handshake ends.

use std::path::Path;

use notify::event::{AccessKind, AccessMode};
use notify::{Event, EventKind, RecommendedWatcher, RecursiveMode, Watcher};
use tokio::sync::mpsc;

/// Whether `event` can mean changed contents: anything but an open, a read
/// or a close after reading (a close after writing counts).
pub fn is_change(event: &Event) -> bool {
    match event.kind {
        EventKind::Access(AccessKind::Close(AccessMode::Write)) => true,
        EventKind::Access(_) => false,
        _ => true,
    }
}

/// Watches `dir` (not its subdirectories), sending `()` on every change.
/// The watcher lives as long as the returned value.
pub fn directory(
    dir: &Path,
    changed: mpsc::UnboundedSender<()>,
) -> notify::Result<RecommendedWatcher> {
    let mut watcher = notify::recommended_watcher(move |event: notify::Result<Event>| {
        if event.is_ok_and(|e| is_change(&e)) {
            let _ = changed.send(());
        }
    })?;
    watcher.watch(dir, RecursiveMode::NonRecursive)?;
    Ok(watcher)
}

/// Watches one file, sending `()` on every change to it. Through its
/// directory, so editors that replace the file are seen too.
pub fn file(path: &Path, changed: mpsc::UnboundedSender<()>) -> Option<RecommendedWatcher> {
    let dir = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let name = path.file_name()?.to_owned();
    let mut watcher = notify::recommended_watcher(move |event: notify::Result<Event>| {
        if let Ok(event) = event {
            if is_change(&event) && event.paths.iter().any(|p| p.file_name() == Some(&name)) {
                let _ = changed.send(());
            }
        }
    })
    .ok()?;
    watcher.watch(dir, RecursiveMode::NonRecursive).ok()?;
    Some(watcher)
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    /// Whether something arrives within `wait`.
    async fn arrives(rx: &mut mpsc::UnboundedReceiver<()>, wait: Duration) -> bool {
        tokio::time::timeout(wait, rx.recv()).await.is_ok()
    }

    #[tokio::test]
    async fn reading_is_no_change_and_writing_is() {
        let dir = tempfile::tempdir().unwrap();
        let config = dir.path().join("agent.toml");
        std::fs::write(&config, "a").unwrap();
        let (dir_tx, mut dir_rx) = mpsc::unbounded_channel();
        let (file_tx, mut file_rx) = mpsc::unbounded_channel();
        let _dir_watch = directory(dir.path(), dir_tx).unwrap();
        let _file_watch = file(&config, file_tx).unwrap();

        // What the agent does with them: scan the directory, read the file.
        let _ = std::fs::read_dir(dir.path()).unwrap().count();
        let _ = std::fs::read_to_string(&config).unwrap();
        let quiet = Duration::from_millis(500);
        assert!(
            !arrives(&mut dir_rx, quiet).await,
            "a scan counted as a change"
        );
        assert!(
            !arrives(&mut file_rx, quiet).await,
            "a read counted as a change"
        );

        let loud = Duration::from_secs(10);
        std::fs::write(&config, "b").unwrap();
        assert!(arrives(&mut file_rx, loud).await, "a write was missed");
        assert!(
            arrives(&mut dir_rx, loud).await,
            "a write in the directory was missed"
        );
        let renamed = dir.path().join("release.envelope.json");
        std::fs::write(dir.path().join(".part"), "x").unwrap();
        while dir_rx.try_recv().is_ok() {}
        std::fs::rename(dir.path().join(".part"), &renamed).unwrap();
        assert!(
            arrives(&mut dir_rx, loud).await,
            "a file moved in was missed"
        );
    }
}
