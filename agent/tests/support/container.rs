//! A real systemd, running as PID 1 in a throwaway systemd-nspawn container.
//!
//! The container's root is an overlay: the host's root below, a tmpfs above,
//! so it has every binary the host has and forgets every change. The
//! host's boot-time services are removed from it, and it gets a cgroup
//! subtree of its own. The host reaches inside with `nsenter`; files it
//! writes under [`SystemdContainer::root`] appear at the same path inside.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

pub struct SystemdContainer {
    dir: PathBuf,
    name: String,
    nspawn: Child,
    leader: u32,
}

fn run(cmd: &mut Command) -> Output {
    let output = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    assert!(
        output.status.success(),
        "{cmd:?}: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    output
}

impl SystemdContainer {
    pub fn start() -> Self {
        static COUNT: AtomicU32 = AtomicU32::new(0);
        assert!(
            Path::new("/usr/bin/systemd-nspawn").exists(),
            "systemd-nspawn not found; run scripts/setup"
        );
        let name = format!(
            "ferrytest{}x{}",
            std::process::id(),
            COUNT.fetch_add(1, Ordering::SeqCst)
        );
        let dir = std::env::temp_dir().join(&name);
        let (ov, merged) = (dir.join("ov"), dir.join("merged"));
        std::fs::create_dir_all(&ov).unwrap();
        std::fs::create_dir_all(&merged).unwrap();
        run(Command::new("mount")
            .args(["-t", "tmpfs", "-o", "size=2G", "tmpfs"])
            .arg(&ov));
        std::fs::create_dir_all(ov.join("upper")).unwrap();
        std::fs::create_dir_all(ov.join("work")).unwrap();
        run(Command::new("mount")
            .args(["-t", "overlay", "overlay", "-o"])
            .arg(format!(
                "lowerdir=/,upperdir={},workdir={}",
                ov.join("upper").display(),
                ov.join("work").display()
            ))
            .arg(&merged));
        // The host's services must not boot in the container.
        let _ = std::fs::remove_dir_all(merged.join("etc/systemd/system/multi-user.target.wants"));
        for hierarchy in ["systemd", "unified"] {
            let _ = std::fs::create_dir_all(format!("/sys/fs/cgroup/{hierarchy}/{name}"));
        }
        let script = format!(
            "for h in systemd unified; do [ -d /sys/fs/cgroup/$h/{name} ] && echo $$ > /sys/fs/cgroup/$h/{name}/cgroup.procs; done; \
             exec setsid systemd-nspawn -q -D {} -M {name} --boot --register=no --keep-unit --console=passive",
            merged.display()
        );
        // What nspawn and the container's console say is kept for the
        // failure message: a container that does not boot must say why.
        let console = dir.join("console.log");
        let console_file = std::fs::File::create(&console).unwrap();
        let nspawn = Command::new("sh")
            .arg("-c")
            .arg(script)
            .stdin(Stdio::null())
            .stdout(console_file.try_clone().unwrap())
            .stderr(console_file)
            .spawn()
            .unwrap();
        let mut container = Self {
            dir,
            name,
            leader: 0,
            nspawn,
        };
        // Generous: on a loaded two-core machine a boot has taken over 30 s.
        let deadline = Instant::now() + Duration::from_secs(90);
        let mut state = String::new();
        loop {
            if Instant::now() >= deadline {
                let jobs = if container.leader == 0 {
                    String::new()
                } else {
                    let out = container.exec(&["systemctl", "list-jobs", "--no-pager"]);
                    String::from_utf8_lossy(&out.stdout).into_owned()
                };
                panic!(
                    "systemd did not come up in the container (nspawn {:?}, leader {}, state {:?})\n\
                     jobs:\n{jobs}\nconsole:\n{}",
                    container.nspawn.try_wait(),
                    container.leader,
                    state.trim(),
                    std::fs::read_to_string(&console).unwrap_or_default()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
            if container.leader == 0 {
                let children = Command::new("pgrep")
                    .arg("-P")
                    .arg(container.nspawn.id().to_string())
                    .output()
                    .unwrap();
                container.leader = String::from_utf8_lossy(&children.stdout)
                    .trim()
                    .parse()
                    .unwrap_or(0);
                continue;
            }
            let out = container.exec(&["systemctl", "is-system-running"]);
            state = String::from_utf8_lossy(&out.stdout).into_owned();
            if matches!(state.trim(), "running" | "degraded") {
                return container;
            }
        }
    }

    /// The container's root as the host sees it.
    pub fn root(&self) -> PathBuf {
        self.dir.join("merged")
    }

    /// The host path of `path` inside the container.
    pub fn host_path(&self, path: &str) -> PathBuf {
        self.root().join(path.trim_start_matches('/'))
    }

    /// Runs a command inside the container.
    pub fn exec(&self, args: &[&str]) -> Output {
        Command::new("nsenter")
            .args(["-t", &self.leader.to_string(), "-a"])
            .args(args)
            .output()
            .unwrap()
    }

    /// Starts `agent` (a ferry-agent binary) as the project's own
    /// `systemd/ferry-agent.service` with `config` as its agent.toml,
    /// trusting `trusted` (a public key's text), with `env` added to the
    /// unit's environment; returns once systemd says it is active (the unit
    /// is Type=notify: the agent said READY=1).
    pub fn start_agent(&self, agent: &Path, config: &str, trusted: &str, env: &[(&str, &str)]) {
        let dropins = "/etc/systemd/system/ferry-agent.service.d";
        for dir in ["/etc/ferry", dropins] {
            std::fs::create_dir_all(self.host_path(dir)).unwrap();
        }
        std::fs::write(self.host_path("/etc/ferry/ops.pub"), trusted).unwrap();
        std::fs::write(self.host_path("/etc/ferry/agent.toml"), config).unwrap();
        // Copied: the container sees the host's root file system, not what
        // is mounted on it.
        std::fs::copy(agent, self.host_path("/usr/bin/ferry-agent")).unwrap();
        std::fs::copy(
            concat!(
                env!("CARGO_MANIFEST_DIR"),
                "/../systemd/ferry-agent.service"
            ),
            self.host_path("/etc/systemd/system/ferry-agent.service"),
        )
        .unwrap();
        let environment: String = env
            .iter()
            .map(|(k, v)| format!("Environment={k}={v}\n"))
            .collect();
        std::fs::write(
            self.host_path(&format!("{dropins}/test.conf")),
            format!("[Service]\n{environment}"),
        )
        .unwrap();
        assert!(self.exec(&["systemctl", "daemon-reload"]).status.success());
        let started = self.exec(&["systemctl", "start", "ferry-agent"]);
        assert!(
            started.status.success(),
            "{}",
            String::from_utf8_lossy(&started.stderr)
        );
        assert_eq!(self.show("ferry-agent.service")["ActiveState"], "active");
    }

    /// `systemctl show -p ... UNIT` as a map.
    pub fn show(&self, unit: &str) -> std::collections::HashMap<String, String> {
        let out = self.exec(&[
            "systemctl",
            "show",
            unit,
            "-p",
            "ActiveState,SubState,MainPID,NRestarts",
        ]);
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter_map(|l| l.split_once('=').map(|(k, v)| (k.to_owned(), v.to_owned())))
            .collect()
    }
}

impl Drop for SystemdContainer {
    fn drop(&mut self) {
        let _ = self.exec(&["systemctl", "poweroff", "--no-block"]);
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.nspawn.try_wait() {
                break;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.nspawn.kill();
        let _ = self.nspawn.wait();
        let _ = Command::new("umount").arg(self.dir.join("merged")).status();
        let _ = Command::new("umount").arg(self.dir.join("ov")).status();
        for hierarchy in ["systemd", "unified"] {
            // Child cgroups first, deepest first.
            let _ = Command::new("sh")
                .arg("-c")
                .arg(format!(
                    "[ -d /sys/fs/cgroup/{hierarchy}/{0} ] && find /sys/fs/cgroup/{hierarchy}/{0} -depth -type d -exec rmdir {{}} \\;",
                    self.name
                ))
                .status();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
        let _ = std::fs::remove_dir_all(format!("/run/systemd/nspawn/propagate/{}", self.name));
    }
}
