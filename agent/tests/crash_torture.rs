//! Crash consistency: the agent binary installs release after release and
//! is killed with SIGKILL in the middle, over and over, seeded so any
//! failure repeats. Half the kills land right after each step the agent
//! logs, in turn; the rest at random instants. Every fifth release
//! crash-loops, so rollbacks are killed too.
//!
//! After each kill: `current` points at a whole release, the old one or
//! the new one, never a mix and never dangling. After the next start (which
//! recovers from the journal and finishes the install): the journal is
//! gone, `current` is the release that should run, and exactly one service
//! process runs, that release's program.
//!
//! `FERRY_TORTURE_TRIALS` (default 40) and `FERRY_TORTURE_SEED` change the
//! run; the closing line says what was tried.

mod support;

use std::fs;
use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use support::{Build, Release, Rig, Seeded, exe_of, pid_alive};

fn env_or(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// Where `current` points, as the release directory's name.
fn current(data: &Path) -> Option<String> {
    let link = fs::read_link(data.join("services/api/current")).ok()?;
    Some(link.file_name()?.to_string_lossy().into_owned())
}

/// The files of a release directory, with the version its config names.
fn release_version(dir: &Path) -> Option<String> {
    let config = fs::read_to_string(dir.join("etc.conf")).ok()?;
    let version = config.strip_prefix("version = ")?.trim().to_owned();
    // Whole: the program is there and complete (an ELF header at least).
    let program = fs::read(dir.join("bin/api")).ok()?;
    (program.len() > 64 && program.starts_with(b"\x7fELF")).then_some(version)
}

/// The one live service process's program, or a complaint.
fn the_running_program(rig: &Rig) -> Result<String, String> {
    let live: Vec<u32> = rig
        .records()
        .iter()
        .filter(|r| r.0 == "start" && pid_alive(r.2))
        .map(|r| r.2)
        .collect();
    match live.as_slice() {
        [pid] => Ok(exe_of(*pid)),
        other => Err(format!(
            "{} service processes: {:?}",
            other.len(),
            rig.records()
        )),
    }
}

struct Agent<'a> {
    binary: &'a str,
    config: std::path::PathBuf,
}

impl Agent<'_> {
    fn command(&self, release: &Release, envelope: &Path) -> Command {
        let mut command = Command::new(self.binary);
        command
            .arg("-c")
            .arg(&self.config)
            .arg("install")
            .arg(envelope)
            .arg(&release.artifact);
        command
    }

    /// Runs an install to the end; true when it installed.
    fn run(&self, release: &Release, envelope: &Path) -> (bool, Vec<String>) {
        let out = self.command(release, envelope).output().unwrap();
        let lines = String::from_utf8_lossy(&out.stderr)
            .lines()
            .map(str::to_owned)
            .collect();
        (out.status.success(), lines)
    }

    /// Starts an install and kills it after `after_lines` lines of its log,
    /// or after `after` (whichever is given); returns the last line seen.
    fn kill(
        &self,
        release: &Release,
        envelope: &Path,
        after_lines: Option<usize>,
        after: Duration,
    ) -> String {
        let mut child = self
            .command(release, envelope)
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let mut last = String::from("(start)");
        match after_lines {
            Some(n) => {
                let stderr = BufReader::new(child.stderr.take().unwrap());
                for (i, line) in stderr.lines().enumerate() {
                    last = line.unwrap_or_default();
                    if i + 1 >= n {
                        break;
                    }
                }
            }
            None => {
                let start = Instant::now();
                while start.elapsed() < after {
                    if child.try_wait().unwrap().is_some() {
                        break;
                    }
                    std::thread::sleep(Duration::from_millis(5));
                }
                last = format!("after {} ms", after.as_millis());
            }
        }
        let _ = child.kill();
        let _ = child.wait();
        last
    }
}

#[test]
fn kills_at_every_step_and_at_random_instants_never_leave_a_mix() {
    let trials = env_or("FERRY_TORTURE_TRIALS", 40);
    let seed = env_or("FERRY_TORTURE_SEED", 0xC0FF_EE15);
    let mut random = Seeded(seed);
    let rig = Rig::new();
    let data = rig.data();
    let agent = Agent {
        binary: env!("CARGO_BIN_EXE_ferry-agent"),
        config: rig.tmp.path().join("agent.toml"),
    };
    let envelope_file = |r: &Release| {
        let path = rig
            .tmp
            .path()
            .join(format!("{}.envelope.json", r.manifest.version));
        fs::write(&path, r.envelope.to_json()).unwrap();
        path
    };

    // 1.0.0 installed; 2.0.0 installed to count the steps of an install.
    let v1 = rig.release("1.0.0", 1, Build::SERVE, |_| {});
    assert!(agent.run(&v1, &envelope_file(&v1)).0);
    let v2 = rig.release("2.0.0", 2, Build::SERVE, |_| {});
    let started = Instant::now();
    let (ok, lines) = agent.run(&v2, &envelope_file(&v2));
    let install_time = started.elapsed();
    assert!(ok, "{lines:?}");
    let steps = lines.len().max(1);
    let mut installed = "2.0.0".to_owned();

    let mut killed_in = std::collections::BTreeMap::<String, u32>::new();
    for trial in 0..trials {
        let sequence = trial + 3;
        let version = format!("{sequence}.0.0");
        let crashes = trial % 5 == 4;
        let build = if crashes { Build::CRASH } else { Build::SERVE };
        let release = rig.release(&version, sequence, build, |_| {});
        let envelope = envelope_file(&release);

        // Kill it: after each logged step in turn, or at a random instant.
        let last = if trial % 2 == 0 {
            let n = 1 + (trial as usize / 2) % steps;
            agent.kill(&release, &envelope, Some(n), Duration::ZERO)
        } else {
            let ms = random.next() % (install_time.as_millis() as u64 + 200);
            agent.kill(&release, &envelope, None, Duration::from_millis(ms))
        };
        let phase = fs::read(data.join("journal.json"))
            .ok()
            .and_then(|j| serde_json::from_slice::<serde_json::Value>(&j).ok())
            .and_then(|j| j["phase"].as_str().map(str::to_owned))
            .unwrap_or_else(|| "none".into());
        *killed_in.entry(phase.clone()).or_default() += 1;
        let context = format!(
            "seed {seed:#x} trial {trial} ({version}, killed at {last:?}, journal {phase})"
        );

        // Right after the kill: a whole release, old or new.
        let dir = current(&data).unwrap_or_else(|| panic!("{context}: current is gone"));
        let path = data.join("services/api/releases").join(&dir);
        let on_disk = release_version(&path)
            .unwrap_or_else(|| panic!("{context}: current -> {dir}, which is not a whole release"));
        assert!(
            on_disk == installed || on_disk == version,
            "{context}: current is {on_disk}, neither {installed} nor {version}"
        );

        // The next start recovers and finishes.
        let (ok, lines) = agent.run(&release, &envelope);
        let expected = if crashes {
            installed.clone()
        } else {
            version.clone()
        };
        assert_eq!(ok, !crashes, "{context}: {lines:?}");
        assert!(
            !data.join("journal.json").exists(),
            "{context}: the journal is still there"
        );
        let dir = current(&data).unwrap_or_else(|| panic!("{context}: no current after recovery"));
        assert_eq!(
            release_version(&data.join("services/api/releases").join(&dir)).as_deref(),
            Some(expected.as_str()),
            "{context}: current after recovery"
        );
        let program = the_running_program(&rig).unwrap_or_else(|e| panic!("{context}: {e}"));
        assert!(
            program.contains(&format!("/releases/{expected}-")),
            "{context}: the service runs {program}, not {expected}"
        );
        installed = expected;
    }
    println!(
        "seed {seed:#x}: {trials} kills ({} at logged steps, {} at random instants; {steps} steps per install), by journal phase at the kill: {killed_in:?}",
        trials.div_ceil(2),
        trials / 2
    );
    ferry_agent::supervisor::direct::stop_leftovers(&data.join("run"));
}
