//! Power loss at every durable step.
//!
//! The agent's data directory is an ext4 filesystem on a loop device,
//! mounted with a one-hour journal commit interval, so nothing reaches the
//! disk unless the agent syncs it. An install runs under strace, and the
//! kernel kills the agent as it enters its k-th call of one of the syscalls
//! that change the disk or make it durable (fsync, rename, unlink, symlink,
//! mkdir...), for every k and every such syscall an install makes. At that
//! instant the filesystem is shut down without flushing anything
//! (EXT4_IOC_SHUTDOWN with NOLOGFLUSH), which is what a power cut leaves:
//! every write not yet synced is lost. The services are killed (a power cut
//! stops them too), the filesystem is mounted again (ext4 replays its
//! journal) and checked:
//!
//! - `current` points at a whole release, old or new, every file byte for
//!   byte; state.json and the journal, where present, parse;
//! - the next start recovers and finishes: no journal, `current` and
//!   state.json name the release that should run, and exactly one service
//!   process runs it.
//!
//! An install that passes its health gate and one that fails it and rolls
//! back are both cut at every point. `FERRY_POWER_LOSS_STRIDE` (default 1)
//! tries every n-th point only, `FERRY_POWER_LOSS_SYSCALLS` (a comma list)
//! only the points at those syscalls; the closing line says what was tried.

mod support;

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use support::torture::{
    AgentProcess, DURABLE_SYSCALLS, Known, assert_old_or_new, assert_recovers, env_or,
    journal_phase, strace_line,
};
use support::{Build, Rig};

/// EXT4_IOC_SHUTDOWN, `_IOR('X', 125, __u32)` (XFS_IOC_GOINGDOWN's number).
const EXT4_IOC_SHUTDOWN: u32 = 0x8004_587D;
/// Shut down without flushing the journal or any dirty data.
const EXT4_GOING_FLAGS_NOLOGFLUSH: u32 = 2;

/// An ext4 image on a loop device, mounted at the data directory.
struct Disk {
    image: PathBuf,
    mount: PathBuf,
    /// How many times it has been mounted.
    generation: u32,
}

impl Disk {
    fn create(image: &Path, mount: &Path) -> Self {
        fs::File::create(image).unwrap().set_len(64 << 20).unwrap();
        run("mkfs.ext4", &["-q", "-F", &image.display().to_string()]);
        fs::create_dir_all(mount).unwrap();
        let disk = Self {
            image: image.to_owned(),
            mount: mount.to_owned(),
            generation: 0,
        };
        disk.mount();
        disk
    }

    /// Mounts the disk again after a power cut, from a copy of its image: a
    /// mount namespace made meanwhile (a container test running beside this
    /// one) may hold the old, shut-down filesystem alive, and mounting the
    /// same image again would hand back that very filesystem.
    fn remount_copy(&mut self) {
        self.generation += 1;
        let copy = self
            .mount
            .with_extension(format!("{}.img", self.generation));
        run(
            "cp",
            &[
                "--sparse=always",
                &self.image.display().to_string(),
                &copy.display().to_string(),
            ],
        );
        let _ = fs::remove_file(&self.image);
        self.image = copy;
        self.mount();
    }

    fn mount(&self) {
        run(
            "mount",
            &[
                "-o",
                "loop,commit=3600",
                &self.image.display().to_string(),
                &self.mount.display().to_string(),
            ],
        );
    }

    /// The power cut: the filesystem stops where it is, unsynced writes lost.
    fn cut_power(&self) {
        let dir = fs::File::open(&self.mount).unwrap();
        let flags = EXT4_GOING_FLAGS_NOLOGFLUSH;
        // SAFETY: the ioctl reads one u32 from a pointer to a live local.
        let done = unsafe { libc::ioctl(dir.as_raw_fd(), EXT4_IOC_SHUTDOWN as _, &flags) };
        assert_eq!(
            done,
            0,
            "EXT4_IOC_SHUTDOWN: {}",
            std::io::Error::last_os_error()
        );
    }

    /// Unmounts, once the processes that used it are gone.
    fn unmount(&self) {
        let start = Instant::now();
        loop {
            let status = Command::new("umount").arg(&self.mount).status().unwrap();
            if status.success() {
                return;
            }
            assert!(
                start.elapsed() < Duration::from_secs(10),
                "cannot unmount {}",
                self.mount.display()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Disk {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.mount).status();
    }
}

fn run(program: &str, args: &[&str]) {
    let status = Command::new(program)
        .args(args)
        .status()
        .unwrap_or_else(|e| panic!("{program}: {e}"));
    assert!(
        status.success(),
        "{program} {args:?} failed (tests run as root)"
    );
}

/// Kills every process whose program lives under `dir`: the services a
/// power cut would have stopped.
fn kill_programs_under(dir: &Path) {
    let start = Instant::now();
    loop {
        let pids: Vec<i32> = fs::read_dir("/proc")
            .unwrap()
            .flatten()
            .filter_map(|e| e.file_name().to_str()?.parse().ok())
            .filter(|pid| {
                fs::read_link(format!("/proc/{pid}/exe")).is_ok_and(|exe| exe.starts_with(dir))
            })
            .collect();
        if pids.is_empty() {
            return;
        }
        for pid in pids {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "services live on"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// How many calls of each durable syscall one thread of an install made at
/// most, from an strace log: the crash points of that install.
fn crash_points(log: &Path) -> Vec<(&'static str, usize)> {
    let text = fs::read_to_string(log).unwrap();
    let mut per_thread = BTreeMap::<(&str, &str), usize>::new();
    for (tid, call) in text.lines().filter_map(strace_line) {
        if let Some(name) = DURABLE_SYSCALLS
            .iter()
            .find(|name| call.starts_with(&format!("{name}(")))
        {
            *per_thread.entry((name, tid)).or_default() += 1;
        }
    }
    let mut most = BTreeMap::<&'static str, usize>::new();
    for ((name, _), n) in per_thread {
        let entry = most.entry(name).or_default();
        *entry = (*entry).max(n);
    }
    most.into_iter()
        .flat_map(|(name, n)| (1..=n).map(move |k| (name, k)))
        .collect()
}

/// `12.0.0-ab12cd34` as `<release>`, `.staging-12.0.0-ab12cd34` as
/// `.staging-<release>`: what a cut call touched, for the closing line.
fn release_names_as_one(name: &str) -> String {
    match name.strip_prefix(".staging-") {
        Some(_) => ".staging-<release>".into(),
        None if name.starts_with(|c: char| c.is_ascii_digit()) => "<release>".into(),
        None => name.into(),
    }
}

#[test]
fn power_cut_at_every_durable_step_leaves_a_whole_release_and_recovers() {
    let stride = env_or("FERRY_POWER_LOSS_STRIDE", 1).max(1) as usize;
    let mut disk = None;
    let rig = Rig::with_data_dir(|data| {
        disk = Some(Disk::create(&data.with_extension("img"), data));
    });
    let mut disk = disk.unwrap();
    let data = rig.data();
    let agent = AgentProcess::new(&rig);
    let mut known = Known::default();
    let logs = rig.tmp.path().join("strace");
    fs::create_dir_all(&logs).unwrap();

    // 1.0.0 and 2.0.0 installed (the first installs make the directories
    // later ones find); then one install that passes and one that rolls
    // back, traced, to find their crash points.
    for sequence in [1, 2] {
        let release = rig.release(&format!("{sequence}.0.0"), sequence, Build::SERVE, |_| {});
        known.add(&release);
        assert!(agent.run(&release).0);
    }
    let mut plan = Vec::new();
    for (sequence, build) in [(3, Build::SERVE), (4, Build::CRASH)] {
        let release = rig.release(&format!("{sequence}.0.0"), sequence, build, |_| {});
        known.add(&release);
        let log = logs.join(format!("trace-{sequence}.log"));
        assert_eq!(agent.trace(&release, &log), !build.crash);
        plan.extend(crash_points(&log).into_iter().map(|(s, k)| (build, s, k)));
    }
    if let Ok(only) = std::env::var("FERRY_POWER_LOSS_SYSCALLS") {
        plan.retain(|(_, syscall, _)| only.split(',').any(|s| s == *syscall));
    }
    let mut installed = "3.0.0".to_owned();

    let mut cuts = 0;
    let mut not_reached = 0;
    let mut by_syscall = BTreeMap::<&str, u32>::new();
    let mut by_phase = BTreeMap::<String, u32>::new();
    let mut cut_at = BTreeSet::new();
    for (i, &(build, syscall, k)) in plan.iter().enumerate().step_by(stride) {
        let sequence = i as u64 + 5;
        let version = format!("{sequence}.0.0");
        let release = rig.release(&version, sequence, build, |_| {});
        known.add(&release);
        let log = logs.join(format!("cut-{sequence}.log"));

        let hit = agent.kill_at_syscall(&release, syscall, k, &log);
        disk.cut_power();
        kill_programs_under(&data);
        disk.unmount();
        disk.remount_copy();

        let phase = journal_phase(&data);
        let call = match hit {
            Some(call) => {
                cuts += 1;
                *by_syscall.entry(syscall).or_default() += 1;
                *by_phase.entry(phase.clone()).or_default() += 1;
                if let Some(name) = call
                    .split('"')
                    .nth(1)
                    .and_then(|f| Path::new(f).file_name())
                {
                    cut_at.insert(release_names_as_one(&name.to_string_lossy()));
                }
                call
            }
            // This run made fewer such calls than the traced one (a thread
            // did less): the power was cut after it ended; the checks hold.
            None => {
                not_reached += 1;
                "(after the install ended)".to_owned()
            }
        };
        let context = format!(
            "point {i} ({version}, {}: power cut entering {call}, journal {phase})",
            if build.crash {
                "rolls back"
            } else {
                "installs"
            }
        );

        // After the cut: a whole release, old or new, and readable records.
        assert_old_or_new(&data, &known, &installed, &version, &context);
        for file in ["state.json", "journal.json"] {
            if let Ok(bytes) = fs::read(data.join(file)) {
                serde_json::from_slice::<serde_json::Value>(&bytes)
                    .unwrap_or_else(|e| panic!("{context}: {file} is torn: {e}"));
            }
        }

        // The next start recovers and finishes.
        let expected = assert_recovers(
            &agent,
            &rig,
            &known,
            &release,
            build.crash,
            &installed,
            &context,
        );
        installed = expected;
    }
    println!(
        "{} crash points (stride {stride}): {cuts} power cuts, {not_reached} not reached; by syscall {by_syscall:?}; journal phase after the cut {by_phase:?}; files the cut calls named {cut_at:?}",
        plan.len()
    );
    assert!(cuts > 0, "no point was reached");
    kill_programs_under(&data);
}
