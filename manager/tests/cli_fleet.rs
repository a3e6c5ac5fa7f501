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
    sign(d, "api", version, sequence, "ops.key", b"placeholder");
    ok(
        d,
        &["publish", "env.json", &format!("out/api-{version}.tar.gz")],
    )
}

/// Packages SERVICE VERSION (a program holding `content`) and signs it with
/// `key` into env.json; returns the envelope's text.
fn sign(
    d: &std::path::Path,
    service: &str,
    version: &str,
    sequence: &str,
    key: &str,
    content: &[u8],
) -> String {
    let program = d.join(format!("svc/bin/{service}"));
    std::fs::create_dir_all(d.join("svc/bin")).unwrap();
    let _ = std::fs::remove_dir_all(d.join("svc"));
    std::fs::create_dir_all(d.join("svc/bin")).unwrap();
    std::fs::write(&program, [common::arm_program(), content.to_vec()].concat()).unwrap();
    std::fs::set_permissions(&program, std::fs::Permissions::from_mode(0o755)).unwrap();
    let entrypoint = format!("bin/{service}");
    ok(
        d,
        &[
            "package",
            "svc",
            "--service",
            service,
            "--version",
            version,
            "--entrypoint",
            &entrypoint,
            "--sequence",
            sequence,
            "-o",
            "out",
        ],
    );
    let manifest = format!("out/{service}-{version}.manifest.json");
    ok(d, &["sign", &manifest, "--key", key, "-o", "env.json"]);
    std::fs::read_to_string(d.join("env.json")).unwrap()
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
    // Over TLS: an enrolment bundle, no password.
    assert_eq!(added["device_id"], "gw-1");
    assert_eq!(added["credential"], "certificate", "{added}");
    assert!(added.get("password").is_none(), "{added}");
    assert!(added["enrol_token"].as_str().unwrap().len() >= 32);
    let ca = std::fs::read_to_string(d.join("data/ca.pem")).unwrap();
    assert_eq!(
        added["ca_fingerprint"].as_str(),
        ferry::serve::tls::fingerprint(&ca).as_deref()
    );
    // The text form says what to do with it.
    let text = ok(d, &["device", "add", "gw-3"]);
    assert!(
        text.contains("enrolment token: ") && text.contains("fleet CA fingerprint: "),
        "{text}"
    );
    // A password device is refused by the embedded broker over TLS.
    let line = fails(d, &["device", "add", "gw-4", "--password"]);
    assert!(line.contains("certificates only"), "{line}");

    // The whole agent.toml for a device, ready to copy: it reads as an
    // agent configuration naming this manager, and is for root's eyes only.
    let line = ok(d, &["device", "add", "gw-2", "--agent-config", "gw-2.toml"]);
    assert!(line.contains("wrote gw-2.toml"), "{line}");
    let text = std::fs::read_to_string(d.join("gw-2.toml")).unwrap();
    let config = ferry_agent::config::Config::parse(&text).unwrap();
    assert_eq!(config.device_id.as_str(), "gw-2");
    let broker = config.broker.unwrap();
    // TLS by default: the device trusts this manager's CA alone.
    assert_eq!(
        broker.manager_url.as_deref(),
        Some(format!("https://127.0.0.1:{http}").as_str())
    );
    assert!(
        broker.url.starts_with("mqtts://127.0.0.1:"),
        "{}",
        broker.url
    );
    assert_eq!(
        broker.ca_pem.as_deref(),
        Some(
            std::fs::read_to_string(d.join("data/ca.pem"))
                .unwrap()
                .as_str()
        )
    );
    // It makes its own key and enrols with the token: no password.
    assert!(broker.uses_certificate());
    assert!(broker.password.is_none());
    assert_eq!(broker.enrol_token.unwrap().len(), 48);
    let mode = std::fs::metadata(d.join("gw-2.toml"))
        .unwrap()
        .permissions()
        .mode()
        & 0o777;
    assert_eq!(mode, 0o600);
    // Never over an existing file, and then the device is not added again
    // (a new token would lock out the device holding the file).
    let line = fails(d, &["device", "add", "gw-2", "--agent-config", "gw-2.toml"]);
    assert_eq!(line, "ferry: error: gw-2.toml exists; name another file");
    assert_eq!(std::fs::read_to_string(d.join("gw-2.toml")).unwrap(), text);

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
    assert!(one.contains("\ndesired state confirmed: never"), "{one}");
    let events: serde_json::Value = serde_json::from_str(&ok(d, &["events", "--json"])).unwrap();
    assert!(events.as_array().unwrap().is_empty());

    // The environment works too, and a wrong token is named.
    let url = format!("https://127.0.0.1:{http}");
    let ca = d.join("data/ca.pem");
    let ca = ca.to_str().unwrap();
    let elsewhere = tempfile::tempdir().unwrap();
    let token = std::fs::read_to_string(d.join("data/operator.token")).unwrap();
    let run = ferry_env(
        elsewhere.path(),
        &[
            ("FERRY_URL", &url),
            ("FERRY_TOKEN", token.trim()),
            ("FERRY_CA", ca),
        ],
        &["devices", "--json"],
    );
    assert_eq!(run.code, 0, "{}", run.stderr);
    let run = ferry_env(
        elsewhere.path(),
        &[
            ("FERRY_URL", &url),
            ("FERRY_TOKEN", "wrong"),
            ("FERRY_CA", ca),
        ],
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

    // Removing a device: gone from the views; a second time is an error.
    let removed = ok(d, &["device", "remove", "gw-1"]);
    assert_eq!(
        removed.trim(),
        "device gw-1 removed: its credentials no longer work"
    );
    assert_eq!(
        fails(d, &["device", "gw-1"]),
        "ferry: error: no device gw-1"
    );
    assert_eq!(
        fails(d, &["device", "remove", "gw-1"]),
        "ferry: error: no device gw-1"
    );
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

/// The manager's database, opened beside the running manager: what an
/// attacker who took the manager (or its disk) can change.
fn tamper(d: &std::path::Path, sql: &str, params: &[&dyn rusqlite::ToSql]) {
    let db = rusqlite::Connection::open(d.join("data/ferry.db")).unwrap();
    db.busy_timeout(Duration::from_secs(5)).unwrap();
    let changed = db.execute(sql, params).unwrap();
    assert_eq!(changed, 1, "{sql}");
}

#[test]
fn a_revert_signs_only_what_the_operators_keys_signed() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    let (_serve, _http) = start_serve(d);
    ok(d, &["device", "add", "gw-1"]);
    ok(d, &["keygen", "--out", "ops"]);
    ok(d, &["keygen", "--out", "evil"]);
    publish(d, "1.0.0", "1");
    let genuine = std::fs::read_to_string(d.join("env.json")).unwrap();
    publish(d, "2.0.0", "2");

    // A version and a sequence each name one release for good: the same
    // envelope again is harmless, other bytes under either are refused.
    std::fs::write(d.join("env.json"), &genuine).unwrap();
    ok(d, &["publish", "env.json", "out/api-1.0.0.tar.gz"]);
    sign(d, "api", "1.0.0", "1", "ops.key", b"other bytes");
    let line = fails(d, &["publish", "env.json", "out/api-1.0.0.tar.gz"]);
    assert!(
        line.contains("api 1.0.0 is already published with other contents"),
        "{line}"
    );
    sign(d, "api", "1.5.0", "2", "ops.key", b"other bytes");
    let line = fails(d, &["publish", "env.json", "out/api-1.5.0.tar.gz"]);
    assert!(
        line.contains("sequence 2 of api is already release 2.0.0"),
        "{line}"
    );

    let start = |d: &std::path::Path| {
        common::ferry(
            d,
            &[
                "rollout",
                "start",
                "api",
                "2.0.0",
                "--all",
                "--revert-on-abort",
                "--key",
                "ops.key",
                "--revert-to",
                "1.0.0",
                "--json",
            ],
        )
    };
    let releases = |d: &std::path::Path| -> Vec<String> {
        let listed: serde_json::Value = serde_json::from_str(&ok(d, &["releases", "--json"]))
            .unwrap_or_else(|_| serde_json::json!([]));
        listed
            .as_array()
            .into_iter()
            .flatten()
            .map(|r| r["version"].as_str().unwrap_or_default().to_owned())
            .collect()
    };
    let before = releases(d);

    // The manager hands back other bytes as api 1.0.0: the CLI refuses to
    // sign them and publishes nothing.
    let refused = |d: &std::path::Path, swapped: &str, why: &str| {
        tamper(
            d,
            "UPDATE releases SET envelope = ?1 WHERE service = 'api' AND version = '1.0.0'",
            &[&swapped],
        );
        let run = start(d);
        assert_eq!(run.code, 1, "{}", run.stdout);
        assert!(run.stderr.contains(why), "{}", run.stderr);
        assert_eq!(releases(d), before, "something was published");
    };
    // An attacker's code, signed by a key no operator trusts.
    let forged = sign(d, "api", "1.0.0", "1", "evil.key", b"attacker code");
    refused(
        d,
        &forged,
        "the manager's copy of api 1.0.0 is not signed by your trusted keys",
    );
    // Another release the operator did sign: the wrong service.
    let other = sign(d, "shell", "1.0.0", "1", "ops.key", b"a debug shell");
    refused(
        d,
        &other,
        "the manager answered with shell 1.0.0 when asked for api 1.0.0",
    );

    // The manager's word on the rolled-out release's sequence is not taken
    // either: the revert follows the signed sequence (2), not the row's 1000
    // (the manager, believing its row, then refuses the rollout itself).
    tamper(
        d,
        "UPDATE releases SET envelope = ?1 WHERE service = 'api' AND version = '1.0.0'",
        &[&genuine],
    );
    tamper(
        d,
        "UPDATE releases SET sequence = 1000 WHERE service = 'api' AND version = '2.0.0'",
        &[],
    );
    let run = start(d);
    assert_eq!(run.code, 1, "{}", run.stdout);
    assert!(
        run.stderr.contains("above 1000 (it has 3)"),
        "{}",
        run.stderr
    );
    let published: serde_json::Value =
        serde_json::from_str(&ok(d, &["release", "api", "1.0.0+revert.3", "--json"])).unwrap();
    assert_eq!(published["sequence"], 3);

    // Started again once the row is right, the published revert is reused
    // (signing it anew would be another envelope under a taken version).
    tamper(
        d,
        "UPDATE releases SET sequence = 2 WHERE service = 'api' AND version = '2.0.0'",
        &[],
    );
    let run = start(d);
    assert_eq!(run.code, 0, "{}", run.stderr);
    let started: serde_json::Value = serde_json::from_str(&run.stdout).unwrap();
    assert_eq!(started["revert_to"], "1.0.0+revert.3");

    // The revert is the genuine 1.0.0 signed again, with an expiry of its own.
    ok(
        d,
        &[
            "release",
            "api",
            "1.0.0+revert.3",
            "--envelope",
            "revert.json",
        ],
    );
    let verified = ok(d, &["verify", "revert.json", "--pub", "ops.pub", "--json"]);
    let verified: serde_json::Value = serde_json::from_str(&verified).unwrap();
    let genuine = ferry_protocol::Envelope::from_json(genuine.as_bytes())
        .unwrap()
        .unverified_manifest()
        .unwrap();
    assert_eq!(verified["sequence"], 3);
    assert_eq!(
        verified["artifact_sha256"],
        genuine.artifact.sha256.to_string()
    );
    let expires: ferry_protocol::Timestamp = verified["expires"].as_str().unwrap().parse().unwrap();
    let days = expires
        .system_time()
        .duration_since(std::time::SystemTime::now())
        .unwrap()
        .as_secs()
        / 86_400;
    assert!((29..=30).contains(&days), "expires in {days} days");
    let shown = ok(d, &["release", "api", "1.0.0+revert.3"]);
    assert!(shown.contains("expires: 20"), "{shown}");
}

#[test]
fn named_tokens_do_what_their_scope_allows_until_revoked() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    let (_serve, http) = start_serve(d);
    ok(d, &["device", "add", "gw-1"]);
    let url = format!("https://127.0.0.1:{http}");
    let ca = d.join("data/ca.pem");
    let made = |name: &str, scope: &str| -> String {
        let out: serde_json::Value = serde_json::from_str(&ok(
            d,
            &["token", "create", name, "--scope", scope, "--json"],
        ))
        .unwrap();
        out["token"].as_str().unwrap().to_owned()
    };
    let prometheus = made("prometheus", "read");
    let ci = made("ci", "operate");
    let elsewhere = tempfile::tempdir().unwrap();
    let with = |token: &str, args: &[&str]| {
        ferry_env(
            elsewhere.path(),
            &[
                ("FERRY_URL", &url),
                ("FERRY_TOKEN", token),
                ("FERRY_CA", ca.to_str().unwrap()),
            ],
            args,
        )
    };
    // read: views yes, changes no.
    assert_eq!(with(&prometheus, &["devices"]).code, 0);
    let run = with(&prometheus, &["device", "tags", "gw-1", "lab"]);
    assert_eq!(run.code, 1);
    assert!(
        run.stderr
            .contains("token prometheus may read, not operate (use a token with scope operate)"),
        "{}",
        run.stderr
    );
    // operate: tags yes, devices and tokens no.
    assert_eq!(with(&ci, &["device", "tags", "gw-1", "lab"]).code, 0);
    let run = with(&ci, &["device", "add", "gw-2"]);
    assert!(
        run.stderr.contains("may operate, not admin"),
        "{}",
        run.stderr
    );
    let run = with(&ci, &["token", "list"]);
    assert!(
        run.stderr.contains("may operate, not admin"),
        "{}",
        run.stderr
    );
    // The list shows names and scopes, never a token.
    let listed = ok(d, &["token", "list"]);
    assert!(
        listed.contains("prometheus") && listed.contains("read"),
        "{listed}"
    );
    assert!(
        !listed.contains(&prometheus) && !listed.contains(&ci),
        "{listed}"
    );
    // A name is one token; revoked, it stops working at once.
    let line = fails(d, &["token", "create", "ci", "--scope", "read"]);
    assert!(line.contains("a token named ci exists"), "{line}");
    ok(d, &["token", "revoke", "ci"]);
    let run = with(&ci, &["devices"]);
    assert_eq!(run.code, 1);
    assert!(
        run.stderr.contains("the operator token is wrong"),
        "{}",
        run.stderr
    );
    assert_eq!(with(&prometheus, &["devices"]).code, 0);
}
