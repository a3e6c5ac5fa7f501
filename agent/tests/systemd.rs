//! The agent under a real systemd (PID 1 in a throwaway container), started
//! by the project's own `systemd/ferry-agent.service` unit: it installs a
//! real C service as a unit, upgrades it, rolls back a crashing release and
//! a release whose probe fails, and reloads on a config change.

mod support;

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use ferry_protocol::manifest::{Probe, ReloadAction, ReloadRule, ServiceSignal};
use support::container::SystemdContainer;
use support::{Build, Release, Rig};

struct Device {
    container: SystemdContainer,
    inbox: PathBuf,
}

impl Device {
    /// Drops a release into the agent's inbox and waits for its result.
    async fn install(&self, release: &Release, name: &str) -> serde_json::Value {
        std::fs::copy(&release.artifact, self.inbox.join(format!("{name}.tar.gz"))).unwrap();
        std::fs::write(
            self.inbox.join(format!("{name}.envelope.json")),
            release.envelope.to_json(),
        )
        .unwrap();
        let result = self.inbox.join(format!("{name}.result.json"));
        support::eventually_for(
            &format!("{name} to be processed"),
            Duration::from_secs(60),
            || result.exists(),
        )
        .await;
        serde_json::from_slice(&std::fs::read(&result).unwrap()).unwrap()
    }

    fn main_pid(&self) -> u32 {
        let show = self.container.show("ferry-api.service");
        assert_eq!(show["ActiveState"], "active", "{show:?}");
        show["MainPID"].parse().unwrap()
    }
}

#[tokio::test]
async fn under_a_real_systemd_the_agent_installs_upgrades_rolls_back_and_reloads() {
    let container = SystemdContainer::start();
    let mut rig = Rig::new();
    // The service runs as a user of its own (DynamicUser=) and records
    // into its state directory, the one place it may write by default.
    rig.out = PathBuf::from("/var/lib/ferry-api/service.out");
    rig.out_host = container.host_path("/var/lib/private/ferry-api/service.out");
    // Open to anyone, but only writable to a service the manifest lets.
    let shared = container.host_path("/srv/ferry-test");
    std::fs::create_dir_all(&shared).unwrap();
    std::fs::set_permissions(&shared, std::fs::Permissions::from_mode(0o777)).unwrap();
    std::fs::create_dir_all(container.host_path("/etc/ferry")).unwrap();
    std::fs::create_dir_all(container.host_path("/etc/api")).unwrap();
    std::fs::write(container.host_path("/etc/api/app.conf"), "level = 1\n").unwrap();
    container.start_agent(
        Path::new(env!("CARGO_BIN_EXE_ferry-agent")),
        "device_id = \"sd-1\"\ndata_dir = \"/var/lib/ferry\"\ninbox = \"/var/lib/ferry/inbox\"\n\
         supervisor = \"systemd\"\nhealth_interval = \"5s\"\n[trust]\nkeys = [\"/etc/ferry/ops.pub\"]\n",
        &rig.key.public_key().to_text(),
        &[],
    );
    let device = Device {
        inbox: container.host_path("/var/lib/ferry/inbox"),
        container,
    };
    support::eventually("the inbox", || device.inbox.is_dir()).await;

    // Install: a unit is written and started. The service tries what a
    // compromised one would: the agent's state, configuration, trust key and
    // units, its own release; and its own directory.
    let targets = [
        ("/var/lib/ferry/state.json", "denied"),
        ("/var/lib/ferry/planted", "denied"),
        ("/etc/ferry/agent.toml", "denied"),
        ("/etc/ferry/ops.pub", "denied"),
        ("/etc/systemd/system/planted.service", "denied"),
        ("/var/lib/ferry/services/api/current/etc.conf", "denied"),
        ("/srv/ferry-test/v1", "denied"),
        ("/tmp/private", "ok"),
        ("/var/lib/ferry-api/cache", "ok"),
    ];
    let v1 = rig.release("1.0.0", 1, Build::SERVE, |m| {
        m.run.args = targets
            .iter()
            .map(|(p, _)| format!("--try-write={p}"))
            .collect();
    });
    assert_eq!(device.install(&v1, "v1").await["outcome"], "installed");
    let pid1 = device.main_pid();
    assert!(
        rig.records()
            .contains(&("start".into(), "1.0.0".into(), pid1)),
        "{:?}",
        rig.records()
    );
    let unit = std::fs::read_to_string(
        device
            .container
            .host_path("/etc/systemd/system/ferry-api.service"),
    )
    .unwrap();
    assert!(
        unit.contains("ExecStart=\"/var/lib/ferry/services/api/current/bin/api\" \"--try-write="),
        "{unit}"
    );
    let enabled = device
        .container
        .exec(&["systemctl", "is-enabled", "ferry-api.service"]);
    assert_eq!(String::from_utf8_lossy(&enabled.stdout).trim(), "enabled");
    support::eventually("the service to try every path", || {
        rig.values("write", pid1).len() == targets.len()
    })
    .await;
    let expected: Vec<String> = targets.iter().map(|(p, r)| format!("{r} {p}")).collect();
    assert_eq!(rig.values("write", pid1), expected);
    assert!(
        !device
            .container
            .host_path("/var/lib/ferry/planted")
            .exists()
    );
    let uid: u32 = rig.values("uid", pid1)[0].parse().unwrap();
    assert!(
        (61184..=65519).contains(&uid),
        "not a user of its own: {uid}"
    );

    // Upgrade: systemd restarts it with the new binary; the manifest lets
    // it write one more path.
    let v2 = rig.release("2.0.0", 2, Build::SERVE, |m| {
        m.run.writable = vec![ferry_protocol::DevicePath::new("/srv/ferry-test").unwrap()];
        m.run.args = vec!["--try-write=/srv/ferry-test/v2".into()];
    });
    assert_eq!(device.install(&v2, "v2").await["outcome"], "installed");
    let pid2 = device.main_pid();
    assert_ne!(pid1, pid2);
    assert!(
        rig.records()
            .contains(&("start".into(), "2.0.0".into(), pid2))
    );
    support::eventually("v2 to write where it may", || {
        rig.values("write", pid2) == ["ok /srv/ferry-test/v2"]
    })
    .await;

    // A release that exits at once: rolled back, v2 serves again.
    let crash = rig.release("3.0.0", 3, Build::CRASH, |m| m.health.window_secs = 3);
    let result = device.install(&crash, "v3").await;
    assert_eq!(result["outcome"], "rolled_back", "{result}");
    assert!(
        result["reason"]
            .as_str()
            .unwrap()
            .contains("exited with status 1"),
        "{result}"
    );
    // (The rollback's restart may still be starting the process.)
    let pid = device.main_pid();
    support::eventually("v2 to run again", || {
        rig.records()
            .contains(&("start".into(), "2.0.0".into(), pid))
    })
    .await;

    // A release whose probe never passes: rolled back too.
    let closed = support::broker::free_port();
    let unreachable = rig.release("4.0.0", 4, Build::SERVE, |m| {
        m.health.window_secs = 2;
        m.health.probe = Some(Probe::Tcp {
            address: format!("127.0.0.1:{closed}"),
        });
    });
    let result = device.install(&unreachable, "v4").await;
    assert_eq!(result["outcome"], "rolled_back", "{result}");
    assert!(
        result["reason"]
            .as_str()
            .unwrap()
            .contains("probe did not pass"),
        "{result}"
    );
    let pid = device.main_pid();
    support::eventually("v2 to run again", || {
        rig.records()
            .contains(&("start".into(), "2.0.0".into(), pid))
    })
    .await;

    // A watched config file changes: SIGHUP through systemd, no restart.
    let v5 = rig.release("5.0.0", 5, Build::SERVE, |m| {
        m.reload = vec![ReloadRule {
            paths: vec!["/etc/api/app.conf".into()],
            action: ReloadAction::Signal(ServiceSignal::Hup),
            debounce_ms: 100,
        }];
    });
    assert_eq!(device.install(&v5, "v5").await["outcome"], "installed");
    let pid5 = device.main_pid();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let edited = device
        .container
        .exec(&["sh", "-c", "echo 'level = 2' > /etc/api/app.conf"]);
    assert!(edited.status.success());
    support::eventually("SIGHUP to reach the service", || {
        rig.records().iter().any(|r| r.0 == "hup" && r.2 == pid5)
    })
    .await;
    assert_eq!(device.main_pid(), pid5, "restarted instead of reloaded");
    assert_eq!(device.container.show("ferry-api.service")["NRestarts"], "0");

    // A bad signature is refused and the running unit is left alone.
    let v6 = rig.release("6.0.0", 6, Build::SERVE, |_| {});
    let mut forged = v6.clone();
    forged.envelope.signatures[0].sig[0] ^= 1;
    let result = device.install(&forged, "v6").await;
    assert_eq!(result["outcome"], "rejected", "{result}");
    assert_eq!(device.main_pid(), pid5);

    // Arguments, environment, working directory and stop signal from the
    // manifest reach the process through the unit exactly as written, odd
    // characters and all (systemd's own variables beside them).
    let v7 = rig.release("7.0.0", 7, Build::SERVE, |m| {
        m.run = support::run_settings()
    });
    assert_eq!(device.install(&v7, "v7").await["outcome"], "installed");
    let pid7 = device.main_pid();
    support::eventually("v7 to record its environment", || {
        rig.values("env", pid7)
            .iter()
            .any(|e| e.starts_with("TRICKY="))
    })
    .await;
    assert_eq!(rig.values("arg", pid7), support::run_settings().args);
    let env = rig.values("env", pid7);
    for expected in [
        "GREETING=hello world",
        "PATH=/opt/app/bin:/usr/bin:/bin",
        "TRICKY=a $b %i \"c\"\nd",
    ] {
        assert!(
            env.iter().any(|e| e == expected),
            "{expected:?} not in {env:?}"
        );
    }
    let cwd = rig.values("cwd", pid7);
    assert!(cwd.len() == 1 && cwd[0].ends_with("/bin"), "{cwd:?}");
    // A release that changes only the arguments: v7 stops with its SIGQUIT.
    let v8 = rig.release("8.0.0", 8, Build::SERVE, |m| {
        m.run.args = vec!["--port".into(), "8081".into()];
    });
    assert_eq!(device.install(&v8, "v8").await["outcome"], "installed");
    let pid8 = device.main_pid();
    assert_eq!(rig.values("stop", pid7), ["SIGQUIT"]);
    support::eventually("v8 to record its arguments", || {
        rig.values("arg", pid8) == ["--port", "8081"]
    })
    .await;
}
