//! The install path under the direct supervisor, with real C services built
//! by the machine's compilers: upgrades, rollbacks, probes, hostile inputs
//! and a crash in the middle of an install.

mod support;

use std::fs;
use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Command, Stdio};

use ferry_protocol::manifest::Probe;
use ferry_protocol::messages::{DesiredRelease, Outcome, Step, StepStatus};
use ferry_protocol::{Envelope, SecretKey};
use support::{ARM, Build, Rig, eventually, exe_of, pid_alive};

#[tokio::test]
async fn install_then_upgrade_restarts_the_service_with_the_new_binary() {
    let mut rig = Rig::new();
    let v1 = rig.release("1.0.0", 1, Build::SERVE, |_| {});
    let result = rig.install(&v1).await;
    assert_eq!(result.outcome, Outcome::Installed, "{result:?}");
    let pid1 = rig.running_pid().await.expect("v1 running");
    assert!(
        exe_of(pid1).contains("/releases/1.0.0-"),
        "{}",
        exe_of(pid1)
    );
    eventually("v1 to record its start", || {
        rig.records().iter().any(|r| r.0 == "start" && r.2 == pid1)
    })
    .await;
    rig.take_events();

    let v2 = rig.release("2.0.0", 2, Build::SERVE, |_| {});
    let result = rig.install(&v2).await;
    assert_eq!(result.outcome, Outcome::Installed, "{result:?}");
    let pid2 = rig.running_pid().await.expect("v2 running");
    assert_ne!(pid1, pid2);
    assert!(
        exe_of(pid2).contains("/releases/2.0.0-"),
        "{}",
        exe_of(pid2)
    );
    eventually("v1 to be stopped", || !pid_alive(pid1)).await;
    assert!(
        rig.records()
            .contains(&("start".into(), "2.0.0".into(), pid2))
    );

    // Every step reported, in order, each succeeding.
    let steps: Vec<Step> = rig
        .take_events()
        .into_iter()
        .filter(|e| e.status == StepStatus::Succeeded)
        .map(|e| e.step)
        .collect();
    use Step::*;
    assert_eq!(
        steps,
        [
            Verify, DiskCheck, Download, HashCheck, Unpack, ElfCheck, Swap, Restart, HealthGate,
            Commit
        ]
    );

    // current -> v2, previous -> v1, nothing else kept.
    let service = rig.data().join("services/api");
    let current = fs::read_link(service.join("current")).unwrap();
    let previous = fs::read_link(service.join("previous")).unwrap();
    assert!(
        current.to_string_lossy().starts_with("releases/2.0.0-"),
        "{current:?}"
    );
    assert!(
        previous.to_string_lossy().starts_with("releases/1.0.0-"),
        "{previous:?}"
    );
    assert_eq!(fs::read_dir(service.join("releases")).unwrap().count(), 2);
    let state = rig.installer.state();
    assert_eq!(
        state
            .services
            .values()
            .next()
            .unwrap()
            .manifest
            .version
            .to_string(),
        "2.0.0"
    );
    assert!(!rig.data().join("journal.json").exists());
}

#[tokio::test]
async fn only_the_signed_release_that_runs_confirms_the_desired_state() {
    let mut rig = Rig::new();
    let v1 = rig.release("1.0.0", 1, Build::SERVE, |_| {});
    let desired = |envelope: &Envelope| {
        vec![DesiredRelease {
            envelope: envelope.clone(),
            artifact_url: None,
        }]
    };
    // Nothing runs yet: nothing to confirm.
    assert!(!rig.installer.confirm_desired(&desired(&v1.envelope)));
    assert_eq!(rig.install(&v1).await.outcome, Outcome::Installed);

    // What runs, signed by a key the device does not trust; another
    // manifest of the same release; an empty desired state: none confirms.
    let stranger = SecretKey::from_seed(&[7; 32]);
    let forged = Envelope::sign(v1.manifest.to_json(), &[&stranger]).unwrap();
    assert!(!rig.installer.confirm_desired(&desired(&forged)));
    let mut changed = v1.manifest.clone();
    changed.health.window_secs += 1;
    let changed = rig.sign(changed, v1.artifact.clone());
    assert!(!rig.installer.confirm_desired(&desired(&changed.envelope)));
    assert!(!rig.installer.confirm_desired(&[]));
    assert_eq!(rig.installer.reported().desired_confirmed_at, None);

    // The signed manifest that runs confirms, and the report says when.
    let before = std::time::SystemTime::now();
    assert!(rig.installer.confirm_desired(&desired(&v1.envelope)));
    let confirmed = rig.installer.reported().desired_confirmed_at.unwrap();
    assert!(confirmed.system_time() >= before);
    let sent = std::iter::from_fn(|| rig.events.try_recv().ok()).any(|report| {
        matches!(report, ferry_agent::report::Report::Reported(r) if r.desired_confirmed_at == Some(confirmed))
    });
    assert!(sent, "no reported message with the confirmation");
}

#[tokio::test]
async fn a_release_that_exits_at_once_is_rolled_back_and_the_old_one_keeps_serving() {
    let mut rig = Rig::new();
    let v1 = rig.release("1.0.0", 1, Build::SERVE, |_| {});
    assert_eq!(rig.install(&v1).await.outcome, Outcome::Installed);
    let before = rig.snapshot();

    let bad = rig.release("2.0.0", 2, Build::CRASH, |m| m.health.window_secs = 3);
    let result = rig.install(&bad).await;
    assert_eq!(result.outcome, Outcome::RolledBack, "{result:?}");
    let reason = result.reason.unwrap();
    assert!(reason.starts_with("health gate: "), "{reason}");
    // How it ended, and after how long, say what went wrong.
    assert!(reason.contains("exited with status 1 after 0."), "{reason}");
    assert!(
        rig.records()
            .iter()
            .any(|r| r.0 == "crash" && r.1 == "2.0.0")
    );

    // v1 is what runs again, from the same files as before.
    let pid = rig.running_pid().await.expect("v1 running again");
    assert!(exe_of(pid).contains("/releases/1.0.0-"), "{}", exe_of(pid));
    let after = rig.snapshot();
    let current = |s: &[String]| {
        s.iter()
            .find(|l| l.starts_with("services/api/current"))
            .cloned()
    };
    assert_eq!(current(&before), current(&after));
    assert!(
        !after.iter().any(|l| l.contains("2.0.0-")),
        "failed release left behind: {after:#?}"
    );
    assert_eq!(
        rig.installer
            .state()
            .services
            .values()
            .next()
            .unwrap()
            .manifest
            .sequence,
        1
    );

    // The failed release is not tried again unless asked.
    let again = rig.install(&bad).await;
    assert_eq!(again.outcome, Outcome::Rejected);
    assert!(
        again
            .reason
            .unwrap()
            .contains("failed on this device before")
    );
}

#[tokio::test]
async fn a_first_release_that_crashes_leaves_no_service_behind() {
    let mut rig = Rig::new();
    let bad = rig.release("1.0.0", 1, Build::CRASH, |_| {});
    let result = rig.install(&bad).await;
    assert_eq!(result.outcome, Outcome::RolledBack, "{result:?}");
    assert!(rig.running_pid().await.is_none());
    assert!(fs::symlink_metadata(rig.data().join("services/api/current")).is_err());
    assert!(rig.installer.state().services.is_empty());
}

#[tokio::test]
async fn arguments_environment_directory_and_stop_signal_come_from_the_manifest() {
    let mut rig = Rig::new();
    let v1 = rig.release("1.0.0", 1, Build::SERVE, |m| {
        m.run = support::run_settings()
    });
    assert_eq!(rig.install(&v1).await.outcome, Outcome::Installed);
    let pid = rig.running_pid().await.unwrap();
    eventually("v1 to record its environment", || {
        rig.values("env", pid)
            .iter()
            .any(|e| e.starts_with("TRICKY="))
    })
    .await;
    assert_eq!(rig.values("arg", pid), support::run_settings().args);
    let mut env = rig.values("env", pid);
    env.sort();
    let state_directory = format!(
        "STATE_DIRECTORY={}",
        rig.data().join("service-state/api").display()
    );
    assert_eq!(
        env,
        [
            "GREETING=hello world",
            "PATH=/opt/app/bin:/usr/bin:/bin",
            &state_directory,
            "TRICKY=a $b %i \"c\"\nd",
        ],
        "the agent's own environment leaked"
    );
    // The working directory: `bin` inside the release (resolved through
    // the `current` link).
    let cwd = rig.values("cwd", pid);
    assert!(
        cwd.len() == 1
            && cwd[0].contains("/services/api/releases/1.0.0-")
            && cwd[0].ends_with("/bin"),
        "{cwd:?}"
    );

    // Only the arguments change: a new signed release. The old process is
    // stopped with its own stop signal, the new one runs with the new words.
    let v2 = rig.release("2.0.0", 2, Build::SERVE, |m| {
        m.run = support::run_settings();
        m.run.args = vec!["--port".into(), "8081".into()];
        m.run.stop_signal = None;
    });
    assert_eq!(rig.install(&v2).await.outcome, Outcome::Installed);
    let pid2 = rig.running_pid().await.unwrap();
    eventually("v1 to record how it was stopped", || {
        rig.values("stop", pid) == ["SIGQUIT"]
    })
    .await;
    eventually("v2 to record its arguments", || {
        rig.values("arg", pid2) == ["--port", "8081"]
    })
    .await;
}

#[tokio::test]
async fn a_service_runs_as_the_user_its_manifest_names() {
    use std::os::unix::fs::PermissionsExt;
    let mut rig = Rig::new();
    // The user must be able to reach its program.
    fs::set_permissions(rig.tmp.path(), fs::Permissions::from_mode(0o755)).unwrap();
    let v1 = rig.release("1.0.0", 1, Build::SERVE, |m| {
        m.run.user = Some(ferry_protocol::UserName::new("nobody").unwrap());
    });
    assert_eq!(rig.install(&v1).await.outcome, Outcome::Installed);
    let pid = rig.running_pid().await.unwrap();
    let status = fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let uid = status.lines().find(|l| l.starts_with("Uid:")).unwrap();
    let nobody = nix::unistd::User::from_name("nobody").unwrap().unwrap().uid;
    assert!(
        uid.split_whitespace()
            .skip(1)
            .all(|id| id == nobody.to_string()),
        "{uid}"
    );
    // A user the device does not have: the start fails with the reason,
    // and the release running goes on.
    let v2 = rig.release("2.0.0", 2, Build::SERVE, |m| {
        m.run.user = Some(ferry_protocol::UserName::new("no-such-user").unwrap());
    });
    let result = rig.install(&v2).await;
    assert_eq!(result.outcome, Outcome::RolledBack, "{result:?}");
    assert!(
        result
            .reason
            .as_deref()
            .is_some_and(|r| r.contains("user no-such-user does not exist")),
        "{result:?}"
    );
    assert_eq!(rig.running_pid().await.map(|p| p != 0), Some(true));
}

#[tokio::test]
async fn a_service_with_no_user_runs_as_its_own_and_cannot_write_the_agents_files() {
    let mut rig = Rig::isolated();
    let data = rig.data();
    let tmp = rig.tmp.path().to_owned();
    let own_state = data.join("service-state/api");
    // What a compromised service would go for: the agent's state, its
    // configuration and trust key, its own release; and its own directory.
    let targets = [
        (data.join("state.json"), "denied"),
        (data.join("planted"), "denied"),
        (tmp.join("agent.toml"), "denied"),
        (tmp.join("ops.pub"), "denied"),
        (data.join("services/api/current/etc.conf"), "denied"),
        (own_state.join("cache"), "ok"),
    ];
    let v1 = rig.release("1.0.0", 1, Build::SERVE, |m| {
        m.run.args = targets
            .iter()
            .map(|(path, _)| format!("--try-write={}", path.display()))
            .collect();
    });
    assert_eq!(rig.install(&v1).await.outcome, Outcome::Installed);
    let pid = rig.running_pid().await.unwrap();
    eventually("the service to try every path", || {
        rig.values("write", pid).len() == targets.len()
    })
    .await;
    let expected: Vec<String> = targets
        .iter()
        .map(|(path, result)| format!("{result} {}", path.display()))
        .collect();
    assert_eq!(rig.values("write", pid), expected);
    assert!(!data.join("planted").exists());
    // A uid of its own, recorded so it keeps it; not root, not the agent's.
    let uid: u32 = rig.values("uid", pid)[0].parse().unwrap();
    assert!((61184..=65519).contains(&uid), "{uid}");
    let users: serde_json::Value =
        serde_json::from_slice(&fs::read(data.join("service-users.json")).unwrap()).unwrap();
    assert_eq!(users["api"], uid);
    let env = rig.values("env", pid);
    assert!(
        env.contains(&format!("STATE_DIRECTORY={}", own_state.display())),
        "{env:?}"
    );
    use std::os::unix::fs::MetadataExt;
    let meta = fs::metadata(&own_state).unwrap();
    assert_eq!((meta.uid(), meta.mode() & 0o777), (uid, 0o700));

    // The next release runs as the same user, and finds its files.
    let v2 = rig.release("2.0.0", 2, Build::SERVE, |_| {});
    assert_eq!(rig.install(&v2).await.outcome, Outcome::Installed);
    let pid2 = rig.running_pid().await.unwrap();
    eventually("v2 to record its user", || {
        rig.values("uid", pid2) == [uid.to_string()]
    })
    .await;
    assert!(own_state.join("cache").exists());
}

#[tokio::test]
async fn a_services_output_is_kept_under_its_cap_on_flash() {
    let mut rig = Rig::new();
    let chatty = rig.release("1.0.0", 1, Build::CHATTY, |_| {});
    assert_eq!(rig.install(&chatty).await.outcome, Outcome::Installed);
    let logs = rig.data().join("logs");
    let (log, old) = (logs.join("api.log"), logs.join("api.log.1"));
    // The service prints 10 MiB before it records its start; the last line
    // reaches the log.
    let last = "163839 192.0.2.1 GET /index.html 200";
    eventually("the last line logged", || {
        fs::read_to_string(&log).is_ok_and(|text| text.contains(last))
    })
    .await;
    let cap = ferry_agent::supervisor::service_log::LOG_BYTES;
    let sizes: Vec<(String, u64)> = fs::read_dir(&logs)
        .unwrap()
        .flatten()
        .map(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            (name, e.metadata().unwrap().len())
        })
        .collect();
    assert!(
        sizes.iter().all(|(_, len)| *len <= cap),
        "a log over {cap} bytes: {sizes:?}"
    );
    assert_eq!(sizes.len(), 2, "{sizes:?}");
    assert!(old.exists(), "{sizes:?}");
}

#[tokio::test]
async fn a_release_directory_nothing_points_at_is_never_reused() {
    let mut rig = Rig::new();
    let v1 = rig.release("1.0.0", 1, Build::SERVE, |_| {});
    assert_eq!(rig.install(&v1).await.outcome, Outcome::Installed);
    // Someone (or a crash, or a flipped bit) left a directory where v2 will
    // unpack, holding other code: v1's program under v2's name.
    let v2 = rig.release("2.0.0", 2, Build::SERVE, |_| {});
    let planted = rig
        .data()
        .join("services/api/releases")
        .join(v2.manifest.release_dir_name());
    fs::create_dir_all(planted.join("bin")).unwrap();
    let v1_program = rig.data().join("services/api/current/bin/api");
    fs::copy(&v1_program, planted.join("bin/api")).unwrap();
    fs::write(planted.join("planted"), "x").unwrap();

    assert_eq!(rig.install(&v2).await.outcome, Outcome::Installed);
    let pid = rig.running_pid().await.unwrap();
    eventually("v2 to record its start", || {
        rig.records()
            .contains(&("start".into(), "2.0.0".into(), pid))
    })
    .await;
    assert!(
        !planted.join("planted").exists(),
        "the planted tree was used"
    );
}

#[tokio::test]
async fn probes_gate_the_release() {
    let mut rig = Rig::new();
    let v1 = rig.release("1.0.0", 1, Build::SERVE, |_| {});
    assert_eq!(rig.install(&v1).await.outcome, Outcome::Installed);
    let pid1 = rig.running_pid().await.unwrap();

    // Nothing listens on this port: the probe can never pass.
    let closed = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let unreachable = rig.release("2.0.0", 2, Build::SERVE, |m| {
        m.health.window_secs = 2;
        m.health.probe = Some(Probe::Tcp {
            address: closed.to_string(),
        });
    });
    let result = rig.install(&unreachable).await;
    assert_eq!(result.outcome, Outcome::RolledBack, "{result:?}");
    let reason = result.reason.unwrap();
    assert!(reason.contains("probe did not pass"), "{reason}");
    let pid = rig.running_pid().await.unwrap();
    assert_ne!(pid, pid1, "v1 is restarted after the rollback");
    assert!(exe_of(pid).contains("/releases/1.0.0-"));

    // An HTTP probe whose URL answers 404 fails too.
    let server = support::artifacts::ArtifactServer::start().await;
    let missing = format!("{}/artifacts/none", server.base);
    let not_found = rig.release("2.1.0", 4, Build::SERVE, |m| {
        m.health.window_secs = 2;
        m.health.probe = Some(Probe::Http { url: missing });
    });
    let result = rig.install(&not_found).await;
    assert_eq!(result.outcome, Outcome::RolledBack, "{result:?}");
    assert!(result.reason.unwrap().contains("answered 404"));

    // An HTTP probe to a closed port says so, not only "error sending request".
    let refused = rig.release("2.0.1", 3, Build::SERVE, |m| {
        m.health.window_secs = 2;
        m.health.probe = Some(Probe::Http {
            url: format!("http://{closed}/healthz"),
        });
    });
    let result = rig.install(&refused).await;
    assert_eq!(result.outcome, Outcome::RolledBack, "{result:?}");
    let reason = result.reason.unwrap();
    assert!(
        reason.to_lowercase().contains("connection refused"),
        "{reason}"
    );

    // An HTTP probe that answers 200 passes.
    let healthy = server.add(b"ok".to_vec());
    let http_ok = rig.release("2.2.0", 5, Build::SERVE, |m| {
        m.health.probe = Some(Probe::Http { url: healthy });
    });
    assert_eq!(rig.install(&http_ok).await.outcome, Outcome::Installed);

    // A command probe that passes lets the release through.
    let passing = rig.release("3.0.0", 6, Build::SERVE, |m| {
        m.health.probe = Some(Probe::Command {
            argv: vec!["test".into(), "-f".into(), "etc.conf".into()],
        });
    });
    let result = rig.install(&passing).await;
    assert_eq!(result.outcome, Outcome::Installed, "{result:?}");
}

/// A .tar.gz made of raw tar entries, bypassing every check a tar writer
/// would make: (name, type, link name, contents).
fn hostile_tar(entries: &[(&str, tar::EntryType, &str, &[u8])]) -> Vec<u8> {
    let mut builder = tar::Builder::new(Vec::new());
    for (name, kind, link, data) in entries {
        let mut header = tar::Header::new_gnu();
        {
            let gnu = header.as_gnu_mut().unwrap();
            gnu.name[..name.len()].copy_from_slice(name.as_bytes());
            gnu.linkname[..link.len()].copy_from_slice(link.as_bytes());
        }
        header.set_entry_type(*kind);
        header.set_mode(0o755);
        header.set_size(data.len() as u64);
        if *kind == tar::EntryType::Char {
            header.set_device_major(1).unwrap();
            header.set_device_minor(3).unwrap();
        }
        header.set_cksum();
        builder.append(&header, *data).unwrap();
    }
    gzip(&builder.into_inner().unwrap())
}

fn gzip(bytes: &[u8]) -> Vec<u8> {
    use std::io::Write;
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    gz.write_all(bytes).unwrap();
    gz.finish().unwrap()
}

/// A tar whose one file claims `size` bytes of zeros: tiny compressed.
fn bomb(size: u64) -> Vec<u8> {
    let mut header = tar::Header::new_gnu();
    header.set_path("bin/api").unwrap();
    header.set_size(size);
    header.set_mode(0o755);
    header.set_cksum();
    let mut builder = tar::Builder::new(Vec::new());
    builder
        .append(&header, std::io::repeat(0).take_bytes(size))
        .unwrap();
    gzip(&builder.into_inner().unwrap())
}

trait TakeBytes: std::io::Read + Sized {
    fn take_bytes(self, n: u64) -> std::io::Take<Self> {
        std::io::Read::take(self, n)
    }
}
impl<R: std::io::Read> TakeBytes for R {}

#[tokio::test]
async fn hostile_inputs_are_refused_and_change_nothing() {
    use tar::EntryType::{Char, Directory, Link, Regular, Symlink};
    let mut rig = Rig::new();
    let v1 = rig.release("1.0.0", 5, Build::SERVE, |_| {});
    assert_eq!(rig.install(&v1).await.outcome, Outcome::Installed);
    let pid = rig.running_pid().await.unwrap();
    let v2 = rig.release("2.0.0", 6, Build::SERVE, |_| {});
    let outside = rig.tmp.path().join("outside");
    fs::create_dir(&outside).unwrap();
    let outside_link = outside.display().to_string();
    let escape_target = format!("{}/pwned", outside.display());

    let mut bad_signature = v2.envelope.clone();
    bad_signature.signatures[0].sig[10] ^= 0x40;
    let stranger = SecretKey::from_seed(&[7; 32]);
    let unknown_key = Envelope::sign(v2.manifest.to_json(), &[&stranger]).unwrap();
    // Whoever relays the release adds an argument and a variable to the
    // signed manifest, keeping the signature.
    let rewritten = {
        use base64::Engine as _;
        let b64 = base64::engine::general_purpose::STANDARD;
        let mut manifest = v2.manifest.clone();
        manifest.run.args = vec!["--debug-shell".into()];
        manifest.run.env.insert(
            ferry_protocol::EnvName::new("LD_PRELOAD").unwrap(),
            "/tmp/evil.so".into(),
        );
        let mut json: serde_json::Value = serde_json::from_slice(&v2.envelope.to_json()).unwrap();
        json["manifest"] = b64.encode(manifest.to_json()).into();
        Envelope::from_json(json.to_string().as_bytes()).unwrap()
    };
    let replay = rig.release("0.9.0", 4, Build::SERVE, |_| {});
    // Another release under the installed sequence 5 (signed by the trusted key).
    let same_sequence = rig.release("1.0.1", 5, Build::SERVE, |_| {});
    let good_bytes = fs::read(&v2.artifact).unwrap();
    let mut flipped = good_bytes.clone();
    let middle = flipped.len() / 2;
    flipped[middle] ^= 1;
    fs::write(rig.tmp.path().join("flipped.tar.gz"), &flipped).unwrap();
    fs::write(
        rig.tmp.path().join("truncated.tar.gz"),
        &good_bytes[..good_bytes.len() / 2],
    )
    .unwrap();

    let cases: Vec<(&str, Envelope, std::path::PathBuf, Outcome, Step, &str)> = vec![
        (
            "bad signature",
            bad_signature,
            v2.artifact.clone(),
            Outcome::Rejected,
            Step::Verify,
            "does not verify",
        ),
        (
            "arguments and environment rewritten in transit",
            rewritten,
            v2.artifact.clone(),
            Outcome::Rejected,
            Step::Verify,
            "does not verify",
        ),
        (
            "unknown key",
            unknown_key,
            v2.artifact.clone(),
            Outcome::Rejected,
            Step::Verify,
            "unknown key",
        ),
        (
            "replayed lower sequence",
            replay.envelope.clone(),
            replay.artifact.clone(),
            Outcome::Rejected,
            Step::Verify,
            "below the installed 5",
        ),
        (
            "another release under the installed sequence",
            same_sequence.envelope.clone(),
            same_sequence.artifact.clone(),
            Outcome::Rejected,
            Step::Verify,
            "sequence 5 of service api is installed here with other contents",
        ),
        (
            "artifact hash mismatch",
            v2.envelope.clone(),
            rig.tmp.path().join("flipped.tar.gz"),
            Outcome::Failed,
            Step::HashCheck,
            "sha256",
        ),
        (
            "truncated download",
            v2.envelope.clone(),
            rig.tmp.path().join("truncated.tar.gz"),
            Outcome::Failed,
            Step::HashCheck,
            "bytes",
        ),
    ];
    let tars: Vec<(&str, Vec<u8>, &str)> = vec![
        (
            "tar with ../x",
            hostile_tar(&[("../x", Regular, "", b"x")]),
            "'..' is not allowed",
        ),
        (
            "tar with /etc/x",
            hostile_tar(&[("/etc/ferry-hostile-x", Regular, "", b"x")]),
            "absolute paths are not allowed",
        ),
        (
            "symlink to / then a file through it",
            hostile_tar(&[
                ("escape", Symlink, &outside_link, b""),
                ("escape/pwned", Regular, "", b"x"),
            ]),
            "symbolic link",
        ),
        (
            "hard link outside",
            hostile_tar(&[
                ("bin", Directory, "", b""),
                ("bin/api", Link, &escape_target, b""),
            ]),
            "hard link",
        ),
        (
            "device node",
            hostile_tar(&[("dev-null", Char, "", b"")]),
            "device node",
        ),
        (
            "gzip bomb over the limit",
            bomb(64 << 20),
            "unpacks to more than",
        ),
    ];
    let mut all = cases;
    for (name, bytes, reason) in &tars {
        let release = rig.with_artifact(
            &v2,
            &format!("{}.tar.gz", name.replace(' ', "-").replace('/', "_")),
            bytes,
        );
        all.push((
            name,
            release.envelope,
            release.artifact,
            Outcome::Failed,
            Step::Unpack,
            reason,
        ));
    }

    for (name, envelope, artifact, outcome, step, reason) in all {
        let before = rig.snapshot();
        rig.take_events();
        let result = rig.install_envelope(envelope, &artifact).await;
        assert_eq!(result.outcome, outcome, "{name}: {result:?}");
        let (failed_step, failed_reason) = rig
            .failed_step()
            .unwrap_or_else(|| panic!("{name}: no failed event"));
        assert_eq!(failed_step, step, "{name}: {failed_reason}");
        assert!(failed_reason.contains(reason), "{name}: {failed_reason}");
        assert_eq!(
            result.reason.as_deref(),
            Some(failed_reason.as_str()),
            "{name}"
        );
        assert_eq!(rig.snapshot(), before, "{name} changed the device");
        assert_eq!(
            rig.running_pid().await,
            Some(pid),
            "{name} disturbed the running service"
        );
    }
    assert!(!Path::new("/etc/ferry-hostile-x").exists());
    assert!(!outside.join("pwned").exists());
    assert!(!rig.data().join("services/api/x").exists());
    assert!(!rig.data().join("services/api/releases/x").exists());
}

#[tokio::test]
async fn binaries_for_another_architecture_are_refused_before_the_swap() {
    // An x86-64 binary in a release for an ARM device.
    let mut arm_device = Rig::with_target(ARM);
    let x86_binary = arm_device.release("1.0.0", 1, Build::SERVE, |_| {});
    assert_eq!(x86_binary.manifest.target.as_str(), ARM);
    let before = arm_device.snapshot();
    let result = arm_device.install(&x86_binary).await;
    assert_eq!(result.outcome, Outcome::Failed, "{result:?}");
    let (step, reason) = arm_device.failed_step().unwrap();
    assert_eq!(step, Step::ElfCheck);
    assert!(
        reason.contains("built for x86-64, but armv7-unknown-linux-gnueabihf needs ARM"),
        "{reason}"
    );
    assert_eq!(arm_device.snapshot(), before);

    // And the reverse: an ARM binary, mislabelled for this host.
    let mut host = Rig::new();
    let v1 = host.release("1.0.0", 1, Build::SERVE, |_| {});
    assert_eq!(host.install(&v1).await.outcome, Outcome::Installed);
    let before = host.snapshot();
    let arm_binary = host.release("2.0.0", 2, Build::ARM, |m| {
        m.target = ferry_protocol::Target::new(ferry_agent::BUILD_TARGET).unwrap();
    });
    let result = host.install(&arm_binary).await;
    assert_eq!(result.outcome, Outcome::Failed, "{result:?}");
    let (step, reason) = host.failed_step().unwrap();
    assert_eq!(step, Step::ElfCheck);
    assert!(reason.contains("built for ARM"), "{reason}");
    assert_eq!(host.snapshot(), before);

    // A right entrypoint with a helper program for another machine beside
    // it: found before the swap too, by name.
    let arm_helper = std::fs::read("/usr/arm-linux-gnueabihf/lib/ld-linux-armhf.so.3").unwrap();
    let mixed = host.release_with(
        "2.1.0",
        3,
        Build::SERVE,
        &[("libexec/helper".into(), arm_helper)],
        |_| {},
    );
    let result = host.install(&mixed).await;
    assert_eq!(result.outcome, Outcome::Failed, "{result:?}");
    let (step, reason) = host.failed_step().unwrap();
    assert_eq!(step, Step::ElfCheck);
    assert!(
        reason.starts_with("libexec/helper: built for ARM"),
        "{reason}"
    );
    assert_eq!(host.snapshot(), before);
}

#[tokio::test]
async fn an_agent_killed_during_the_health_gate_finishes_the_install_when_it_restarts() {
    let rig = Rig::new();
    let agent = env!("CARGO_BIN_EXE_ferry-agent");
    let config = rig.tmp.path().join("agent.toml");
    let write = |r: &support::Release, name: &str| {
        let path = rig.tmp.path().join(name);
        fs::write(&path, r.envelope.to_json()).unwrap();
        path
    };
    let v1 = rig.release("1.0.0", 1, Build::SERVE, |_| {});
    let v2 = rig.release("2.0.0", 2, Build::SERVE, |m| m.health.window_secs = 4);
    let (e1, e2) = (write(&v1, "v1.json"), write(&v2, "v2.json"));

    let first = Command::new(agent)
        .arg("-c")
        .arg(&config)
        .arg("install")
        .arg(&e1)
        .arg(&v1.artifact)
        .output()
        .unwrap();
    assert!(
        first.status.success(),
        "{}",
        String::from_utf8_lossy(&first.stderr)
    );

    // Start installing v2, and kill the agent once its health gate begins.
    let mut child = Command::new(agent)
        .arg("-c")
        .arg(&config)
        .arg("install")
        .arg(&e2)
        .arg(&v2.artifact)
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = BufReader::new(child.stderr.take().unwrap());
    for line in stderr.lines() {
        if line.unwrap().contains("step=HealthGate status=Started") {
            break;
        }
    }
    child.kill().unwrap();
    child.wait().unwrap();
    let journal: serde_json::Value =
        serde_json::from_slice(&fs::read(rig.data().join("journal.json")).unwrap()).unwrap();
    assert_eq!(journal["phase"], "swapping");
    let orphan = rig
        .records()
        .iter()
        .rev()
        .find(|r| r.1 == "2.0.0")
        .map(|r| r.2)
        .unwrap();

    // A new agent finds the journal, stops the orphan, and finishes the job.
    let again = Command::new(agent)
        .arg("-c")
        .arg(&config)
        .arg("install")
        .arg(&e2)
        .arg(&v2.artifact)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&again.stdout);
    assert!(
        again.status.success(),
        "{}",
        String::from_utf8_lossy(&again.stderr)
    );
    assert_eq!(stdout.trim(), "installed api 2.0.0: already installed");
    assert!(!rig.data().join("journal.json").exists());
    assert!(
        !pid_alive(orphan),
        "the killed agent's service process still runs"
    );
    let running = rig.live_service_pids();
    assert_eq!(
        running.len(),
        1,
        "exactly one service process: {:?}",
        rig.records()
    );
    assert!(exe_of(running[0]).contains("/releases/2.0.0-"));
}
