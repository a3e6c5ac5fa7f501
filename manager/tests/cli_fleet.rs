//! The fleet commands as a user types them, against `ferry serve` started
//! as a process: the CLI finds the local manager by itself.

mod common;

use std::os::unix::fs::PermissionsExt;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::{fails, ferry_env, free_port, ok};

struct Serve(Child);

impl Drop for Serve {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// `ferry serve` in `d` on free ports, found by the CLI through HOME.
fn start_serve(d: &std::path::Path) -> (Serve, u16) {
    let http = free_port();
    let serve = Serve(
        Command::new(env!("CARGO_BIN_EXE_ferry"))
            .args([
                "serve",
                "--mqtt-listen",
                &format!("127.0.0.1:{}", free_port()),
            ])
            .args([
                "--http-listen",
                &format!("127.0.0.1:{http}"),
                "--data-dir",
                "data",
            ])
            .current_dir(d)
            .env("HOME", d)
            .env_remove("XDG_CONFIG_HOME")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let deadline = Instant::now() + Duration::from_secs(20);
    while !d.join(".config/ferry/local-manager.json").exists() {
        assert!(Instant::now() < deadline, "ferry serve did not start");
        std::thread::sleep(Duration::from_millis(50));
    }
    (serve, http)
}

/// Packages, signs (with ops.key) and publishes `api` VERSION.
fn publish(d: &std::path::Path, version: &str, sequence: &str) -> String {
    std::fs::create_dir_all(d.join("svc/bin")).unwrap();
    std::fs::write(d.join("svc/bin/api"), b"\x7fELF placeholder").unwrap();
    std::fs::set_permissions(
        d.join("svc/bin/api"),
        std::fs::Permissions::from_mode(0o755),
    )
    .unwrap();
    ok(
        d,
        &[
            "package",
            "svc",
            "--service",
            "api",
            "--version",
            version,
            "--entrypoint",
            "bin/api",
            "--sequence",
            sequence,
            "-o",
            "out",
        ],
    );
    let manifest = format!("out/api-{version}.manifest.json");
    ok(
        d,
        &["sign", &manifest, "--key", "ops.key", "-o", "env.json"],
    );
    ok(
        d,
        &["publish", "env.json", &format!("out/api-{version}.tar.gz")],
    )
}

#[test]
fn device_publish_deploy_and_views_through_the_cli() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    let (_serve, http) = start_serve(d);
    let token_mode = std::fs::metadata(d.join("data/operator.token"))
        .unwrap()
        .permissions()
        .mode()
        & 0o777;
    assert_eq!(token_mode, 0o600);

    // No --url, no --token: the CLI finds the manager this machine started.
    let added: serde_json::Value =
        serde_json::from_str(&ok(d, &["device", "add", "gw-1", "--tag", "lab", "--json"])).unwrap();
    let keys: Vec<&String> = added.as_object().unwrap().keys().collect();
    assert_eq!(keys, ["device_id", "password", "username"]);
    assert_eq!(added["device_id"], "gw-1");
    assert_eq!(added["username"], "gw-1");
    assert!(added["password"].as_str().unwrap().len() >= 32);

    // Tags can change later; deploying by tag follows them.
    let retagged = ok(d, &["device", "tags", "gw-1", "lab", "north"]);
    assert_eq!(retagged.trim(), "gw-1 tags: lab, north");
    let line = fails(d, &["device", "tags", "gw-9", "x"]);
    assert_eq!(line, "ferry: error: no device gw-9");

    // Package, sign, publish.
    ok(d, &["keygen", "--out", "ops"]);
    let published = publish(d, "1.2.3", "3");
    assert!(
        published.starts_with("published api 1.2.3 (sequence 3"),
        "{published}"
    );
    let wrong_artifact = common::ferry(d, &["publish", "env.json", "ops.pub"]);
    assert_eq!(wrong_artifact.code, 1);
    assert!(
        wrong_artifact.stderr.contains("wrong artifact?"),
        "{}",
        wrong_artifact.stderr
    );

    // Deploy: an unknown device is named; a tag works.
    let line = fails(d, &["deploy", "api", "1.2.3", "--device", "nobody"]);
    assert_eq!(
        line,
        "ferry: error: no device nobody; add it with `ferry device add`"
    );
    let line = fails(d, &["deploy", "api", "9.9.9", "--all"]);
    assert!(
        line.contains("no release api 9.9.9; publish it first"),
        "{line}"
    );
    let deployed: serde_json::Value = serde_json::from_str(&ok(
        d,
        &["deploy", "api", "1.2.3", "--tag", "lab", "--json"],
    ))
    .unwrap();
    assert_eq!(deployed["devices"][0], "gw-1");

    // Views.
    let devices: serde_json::Value = serde_json::from_str(&ok(d, &["devices", "--json"])).unwrap();
    assert_eq!(devices[0]["device_id"], "gw-1");
    assert_eq!(devices[0]["online"], false);
    let table = ok(d, &["devices"]);
    assert!(table.lines().nth(1).unwrap().starts_with("gw-1"), "{table}");
    let one = ok(d, &["device", "gw-1"]);
    assert!(one.starts_with("gw-1  offline  tags: lab,north"), "{one}");
    let events: serde_json::Value = serde_json::from_str(&ok(d, &["events", "--json"])).unwrap();
    assert!(events.as_array().unwrap().is_empty());

    // The environment works too, and a wrong token is named.
    let url = format!("http://127.0.0.1:{http}");
    let elsewhere = tempfile::tempdir().unwrap();
    let token = std::fs::read_to_string(d.join("data/operator.token")).unwrap();
    let run = ferry_env(
        elsewhere.path(),
        &[("FERRY_URL", &url), ("FERRY_TOKEN", token.trim())],
        &["devices", "--json"],
    );
    assert_eq!(run.code, 0, "{}", run.stderr);
    let run = ferry_env(
        elsewhere.path(),
        &[("FERRY_URL", &url), ("FERRY_TOKEN", "wrong")],
        &["devices"],
    );
    assert_eq!(run.code, 1);
    assert_eq!(
        run.stderr.trim(),
        "ferry: error: the operator token is wrong"
    );
    let run = ferry_env(elsewhere.path(), &[], &["devices"]);
    assert_eq!(run.code, 1);
    assert!(run.stderr.contains("no manager URL"), "{}", run.stderr);
}

#[test]
fn rollouts_through_the_cli() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    let (_serve, _http) = start_serve(d);
    ok(d, &["device", "add", "gw-1", "--tag", "lab"]);
    ok(d, &["device", "add", "gw-2", "--tag", "lab"]);
    ok(d, &["keygen", "--out", "ops"]);
    publish(d, "1.0.0", "1");
    publish(d, "2.0.0", "2");

    // No device reports a version yet, so the revert needs naming.
    let line = fails(
        d,
        &[
            "rollout",
            "start",
            "api",
            "2.0.0",
            "--tag",
            "lab",
            "--revert-on-abort",
            "--key",
            "ops.key",
        ],
    );
    assert!(line.contains("nothing to revert to"), "{line}");
    let line = fails(
        d,
        &[
            "rollout", "start", "api", "2.0.0", "--all", "--waves", "60%,20%",
        ],
    );
    assert!(line.contains("waves must grow"), "{line}");

    let started: serde_json::Value = serde_json::from_str(&ok(
        d,
        &[
            "rollout",
            "start",
            "api",
            "2.0.0",
            "--tag",
            "lab",
            "--canary",
            "1",
            "--waves",
            "50%,100%",
            "--max-failures",
            "20%",
            "--device-timeout",
            "90s",
            "--revert-on-abort",
            "--key",
            "ops.key",
            "--revert-to",
            "1.0.0",
            "--json",
        ],
    ))
    .unwrap();
    let id = started["id"].to_string();
    assert_eq!(started["revert_to"], "1.0.0+revert.3");
    assert_eq!(started["devices"], serde_json::json!(["gw-1", "gw-2"]));

    let status: serde_json::Value =
        serde_json::from_str(&ok(d, &["rollout", "status", &id, "--json"])).unwrap();
    assert_eq!(status["plan"]["revert_to"], "1.0.0+revert.3");
    assert_eq!(status["plan"]["max_failures"], "20%");
    assert_eq!(status["plan"]["device_timeout_secs"], 90);
    // The canary was sent at once; nothing else until it has an outcome.
    let text = ok(d, &["rollout", "status", &id]);
    assert!(
        text.starts_with(&format!("rollout {id} api 2.0.0: running")),
        "{text}"
    );
    assert!(
        text.contains("canary") && text.contains("wave 1 (50%)"),
        "{text}"
    );
    assert!(text.contains("gw-1") && text.contains("sent"), "{text}");

    let paused = ok(d, &["rollout", "pause", &id]);
    assert!(paused.contains(": paused"), "{paused}");
    let line = fails(d, &["rollout", "pause", &id]);
    assert!(line.contains("is paused; cannot pause it"), "{line}");
    ok(d, &["rollout", "resume", &id]);
    let aborted = ok(d, &["rollout", "abort", &id]);
    assert!(
        aborted.contains("aborted (aborted by the operator)"),
        "{aborted}"
    );
    // With the revert: the canary, which was sent 2.0.0, is sent it back.
    let status: serde_json::Value =
        serde_json::from_str(&ok(d, &["rollout", "status", &id, "--json"])).unwrap();
    assert_eq!(status["devices"][0]["status"], "reverting");
    assert_eq!(status["devices"][1]["status"], "pending");
    // Watching a rollout that ended aborted says so, and fails for scripts.
    let watched = common::ferry(d, &["rollout", "status", &id, "--watch"]);
    assert_eq!(watched.code, 1, "{}", watched.stdout);
    assert!(watched.stderr.contains("aborted"), "{}", watched.stderr);
    let list = ok(d, &["rollout", "list"]);
    assert!(
        list.starts_with(&format!("rollout {id} api 2.0.0: aborted")),
        "{list}"
    );
}
