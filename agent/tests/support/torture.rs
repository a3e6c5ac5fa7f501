//! What the crash and power-loss tests share: the agent binary run as a
//! process (to the end, or stopped part way), and the checks made on the
//! data directory after each interruption.

use std::collections::{BTreeMap, HashMap};
use std::fs;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use ferry_protocol::Sha256Digest;

use super::{Release, Rig, exe_of};

/// The syscalls that change what is on disk or make it durable: the
/// points at which an interruption can leave a different state behind.
pub const DURABLE_SYSCALLS: &[&str] = &[
    "fsync",
    "fdatasync",
    "syncfs",
    "rename",
    "renameat",
    "renameat2",
    "unlink",
    "unlinkat",
    "rmdir",
    "symlink",
    "symlinkat",
    "mkdir",
    "mkdirat",
];

/// The agent binary, run as `ferry-agent -c CONFIG install ENVELOPE ARTIFACT`
/// against the rig's configuration.
pub struct AgentProcess {
    pub binary: PathBuf,
    pub config: PathBuf,
    envelopes: PathBuf,
}

impl AgentProcess {
    pub fn new(rig: &Rig) -> Self {
        Self {
            binary: env!("CARGO_BIN_EXE_ferry-agent").into(),
            config: rig.tmp.path().join("agent.toml"),
            envelopes: rig.tmp.path().to_owned(),
        }
    }

    fn args(&self, release: &Release) -> Vec<std::ffi::OsString> {
        let envelope = self
            .envelopes
            .join(format!("{}.envelope.json", release.manifest.version));
        if !envelope.exists() {
            fs::write(&envelope, release.envelope.to_json()).unwrap();
        }
        vec![
            "-c".into(),
            self.config.clone().into(),
            "install".into(),
            envelope.into(),
            release.artifact.clone().into(),
        ]
    }

    fn command(&self, release: &Release) -> Command {
        let mut command = Command::new(&self.binary);
        command.args(self.args(release));
        command
    }

    /// Runs an install to the end: whether it installed, and its log.
    pub fn run(&self, release: &Release) -> (bool, Vec<String>) {
        let out = self.command(release).output().unwrap();
        let lines = String::from_utf8_lossy(&out.stderr)
            .lines()
            .map(str::to_owned)
            .collect();
        (out.status.success(), lines)
    }

    /// Starts an install and kills it after `n` lines of its log; returns
    /// the last line seen.
    pub fn kill_after_lines(&self, release: &Release, n: usize) -> String {
        let mut child = self
            .command(release)
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let mut last = String::from("(start)");
        let stderr = BufReader::new(child.stderr.take().unwrap());
        for (i, line) in stderr.lines().enumerate() {
            last = line.unwrap_or_default();
            if i + 1 >= n {
                break;
            }
        }
        kill(child);
        last
    }

    /// Starts an install and kills it after `after`.
    pub fn kill_after(&self, release: &Release, after: Duration) -> String {
        let mut child = self.command(release).spawn().unwrap();
        let start = Instant::now();
        while start.elapsed() < after {
            if child.try_wait().unwrap().is_some() {
                break;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        kill(child);
        format!("after {} ms", after.as_millis())
    }

    /// Runs an install under strace, logging the [`DURABLE_SYSCALLS`] of
    /// every thread to `log`; the services it starts are not followed.
    pub fn trace(&self, release: &Release, log: &Path) -> bool {
        self.strace(release, log, None).wait().unwrap().success()
    }

    /// Runs an install under strace and has the kernel kill it with SIGKILL
    /// as it enters its `k`-th call of `syscall` (counted per thread), before
    /// that call acts. Returns that call as strace logged it, or `None` when
    /// the install ended before making it.
    pub fn kill_at_syscall(
        &self,
        release: &Release,
        syscall: &str,
        k: usize,
        log: &Path,
    ) -> Option<String> {
        let status = self
            .strace(release, log, Some((syscall, k)))
            .wait()
            .unwrap();
        let text = fs::read_to_string(log).unwrap_or_default();
        if status.success() || !text.contains("killed by SIGKILL") {
            return None;
        }
        // The injected call is the one that never returned.
        text.lines()
            .filter_map(strace_line)
            .map(|(_, call)| call)
            .find(|call| call.starts_with(&format!("{syscall}(")) && call.ends_with("= ?"))
            .map(str::to_owned)
    }

    fn strace(&self, release: &Release, log: &Path, inject: Option<(&str, usize)>) -> Child {
        let mut command = Command::new("strace");
        command
            .args(["-f", "-qq", "-b", "execve", "-o"])
            .arg(log)
            .arg("-e")
            .arg(format!("trace={}", DURABLE_SYSCALLS.join(",")));
        if let Some((syscall, k)) = inject {
            command
                .arg("-e")
                .arg(format!("inject={syscall}:signal=KILL:when={k}"));
        }
        command
            .arg(&self.binary)
            .args(self.args(release))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("strace not found (scripts/setup installs it)")
    }
}

/// A line of an `strace -f` log as (thread id, the call and its result).
pub fn strace_line(line: &str) -> Option<(&str, &str)> {
    // "PID  call(...) = result", the pid padded to five columns.
    let (tid, call) = line.split_once(' ')?;
    Some((tid, call.trim()))
}

fn kill(mut child: Child) {
    let _ = child.kill();
    let _ = child.wait();
}

/// Where a service's `current` link points, as the release directory's name.
pub fn current(data: &Path) -> Option<String> {
    let link = fs::read_link(data.join("services/api/current")).ok()?;
    Some(link.file_name()?.to_string_lossy().into_owned())
}

/// Every file under `dir` (relative path -> hash).
pub fn files_of(dir: &Path) -> BTreeMap<String, Sha256Digest> {
    fn walk(root: &Path, dir: &Path, out: &mut BTreeMap<String, Sha256Digest>) {
        for entry in fs::read_dir(dir).into_iter().flatten().flatten() {
            let path = entry.path();
            if path.is_dir() {
                walk(root, &path, out);
            } else {
                let rel = path.strip_prefix(root).unwrap().display().to_string();
                out.insert(rel, Sha256Digest::of(&fs::read(&path).unwrap_or_default()));
            }
        }
    }
    let mut files = BTreeMap::new();
    walk(dir, dir, &mut files);
    files
}

/// The releases a test has built, by version, to check release directories
/// against the trees they were packaged from.
#[derive(Default)]
pub struct Known(HashMap<String, BTreeMap<String, Sha256Digest>>);

impl Known {
    pub fn add(&mut self, release: &Release) {
        let tree = release.tree.as_ref().expect("a release the rig built");
        self.0
            .insert(release.manifest.version.to_string(), files_of(tree));
    }

    /// The version release directory `dir` holds when it holds every file of
    /// that release, byte for byte, and nothing else; else what is wrong.
    pub fn whole(&self, dir: &Path) -> Result<String, String> {
        let config = fs::read_to_string(dir.join("etc.conf"))
            .map_err(|e| format!("{}: no etc.conf ({e})", dir.display()))?;
        let version = config
            .strip_prefix("version = ")
            .map(|v| v.trim().to_owned())
            .ok_or_else(|| format!("{}: etc.conf is {config:?}", dir.display()))?;
        let expected = self
            .0
            .get(&version)
            .ok_or_else(|| format!("{}: unknown version {version}", dir.display()))?;
        let found = files_of(dir);
        if &found == expected {
            Ok(version)
        } else {
            Err(format!(
                "{} is not whole {version}: found {found:?}, expected {expected:?}",
                dir.display()
            ))
        }
    }
}

/// Right after an interruption of the install of `version` over
/// `installed`: `current` points at one of the two releases, whole.
pub fn assert_old_or_new(
    data: &Path,
    known: &Known,
    installed: &str,
    version: &str,
    context: &str,
) {
    let dir = current(data).unwrap_or_else(|| panic!("{context}: current is gone"));
    let on_disk = known
        .whole(&data.join("services/api/releases").join(&dir))
        .unwrap_or_else(|e| panic!("{context}: current -> {e}"));
    assert!(
        on_disk == installed || on_disk == version,
        "{context}: current is {on_disk}, neither {installed} nor {version}"
    );
}

/// Starts the agent again on the interrupted install of `release` and
/// checks that it finishes: installed (or rolled back when `crashes`), no
/// journal, `current` and state.json on the right whole release, and exactly
/// one service process running it. Returns the version that runs.
pub fn assert_recovers(
    agent: &AgentProcess,
    rig: &Rig,
    known: &Known,
    release: &Release,
    crashes: bool,
    installed: &str,
    context: &str,
) -> String {
    let data = rig.data();
    let (ok, lines) = agent.run(release);
    let expected = if crashes {
        installed.to_owned()
    } else {
        release.manifest.version.to_string()
    };
    assert_eq!(ok, !crashes, "{context}: {lines:?}");
    assert!(
        !data.join("journal.json").exists(),
        "{context}: the journal is still there"
    );
    let dir = current(&data).unwrap_or_else(|| panic!("{context}: no current after recovery"));
    assert_eq!(
        known.whole(&data.join("services/api/releases").join(&dir)),
        Ok(expected.clone()),
        "{context}: current after recovery"
    );
    let state: serde_json::Value =
        serde_json::from_slice(&fs::read(data.join("state.json")).unwrap()).unwrap();
    assert_eq!(
        state["services"]["api"]["release_dir"].as_str(),
        Some(dir.as_str()),
        "{context}: state.json and current disagree"
    );
    let program = the_running_program(rig)
        .unwrap_or_else(|e| panic!("{context}: {e}; the recovering run logged {lines:#?}"));
    assert!(
        program.contains(&format!("/releases/{expected}-")),
        "{context}: the service runs {program}, not {expected}"
    );
    expected
}

/// The one live service process's program, or a complaint.
pub fn the_running_program(rig: &Rig) -> Result<String, String> {
    let live = rig.live_service_pids();
    match live.as_slice() {
        [pid] => Ok(exe_of(*pid)),
        other => Err(format!(
            "{} service processes: {:?}",
            other.len(),
            rig.records()
        )),
    }
}

/// The journal's phase, or "none".
pub fn journal_phase(data: &Path) -> String {
    fs::read(data.join("journal.json"))
        .ok()
        .and_then(|j| serde_json::from_slice::<serde_json::Value>(&j).ok())
        .and_then(|j| j["phase"].as_str().map(str::to_owned))
        .unwrap_or_else(|| "none".into())
}

/// Reads an environment variable as a number.
pub fn env_or(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}
