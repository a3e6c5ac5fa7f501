//! A data partition that runs out during an install: the agent's data
//! directory on a small tmpfs whose inodes run out while a release with
//! many files unpacks (the free-space check passes: there are bytes
//! enough). The install fails cleanly, the old release keeps running, and
//! the space and inodes are given back.

mod support;

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use ferry_protocol::messages::Outcome;
use support::{Build, Rig};

/// Unmounts the tmpfs when the test ends, however it ends.
struct Mounted(PathBuf);

impl Drop for Mounted {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

/// (free bytes, free inodes) of the filesystem holding `path`.
fn free(path: &Path) -> (u64, u64) {
    let stat = nix::sys::statvfs::statvfs(path).unwrap();
    (
        stat.blocks_available() as u64 * stat.fragment_size() as u64,
        stat.files_available() as u64,
    )
}

#[tokio::test]
async fn running_out_of_space_mid_unpack_fails_cleanly_and_gives_the_space_back() {
    let mut mounted = None;
    let mut rig = Rig::with_data_dir(|data| {
        fs::create_dir_all(data).unwrap();
        let status = Command::new("mount")
            .args(["-t", "tmpfs", "-o", "size=64m,nr_inodes=300", "tmpfs"])
            .arg(data)
            .status()
            .expect("mount not found");
        assert!(status.success(), "cannot mount a tmpfs (tests run as root)");
        mounted = Some(Mounted(data.to_owned()));
    });
    let _mounted = mounted;
    let v1 = rig.release("1.0.0", 1, Build::SERVE, |_| {});
    assert_eq!(rig.install(&v1).await.outcome, Outcome::Installed);
    let pid = rig.running_pid().await.unwrap();
    let before = rig.snapshot();
    let (bytes_before, inodes_before) = free(&rig.data());

    // 2.0.0: the program and 400 small files, more than the inodes left.
    let files: Vec<(String, Vec<u8>)> = (0..400)
        .map(|i| (format!("data/f{i:03}"), format!("{i}\n").into_bytes()))
        .collect();
    let v2 = rig.release_with("2.0.0", 2, Build::SERVE, &files, |_| {});
    let result = rig.install(&v2).await;
    assert_eq!(result.outcome, Outcome::Failed, "{result:?}");
    let reason = result.reason.unwrap_or_default();
    assert!(reason.contains("No space left on device"), "{reason}");

    // Nothing changed: the same files and links, the same process, and the
    // space and inodes the attempt took are free again.
    assert_eq!(rig.snapshot(), before);
    assert_eq!(rig.running_pid().await, Some(pid));
    let (bytes_after, inodes_after) = free(&rig.data());
    assert!(
        inodes_after + 2 >= inodes_before,
        "inodes: {inodes_before} free before, {inodes_after} after"
    );
    assert!(
        bytes_after + 64 * 1024 >= bytes_before,
        "bytes: {bytes_before} free before, {bytes_after} after"
    );
    // And with room again, the next release installs.
    let v3 = rig.release("3.0.0", 3, Build::SERVE, |_| {});
    assert_eq!(rig.install(&v3).await.outcome, Outcome::Installed);
    ferry_agent::supervisor::direct::stop_leftovers(&rig.data().join("run"));
}
