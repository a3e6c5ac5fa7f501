//! The operator's first commands, run as a user would type them:
//! keygen, package, sign, verify; then tampering, thresholds and refusals.

mod common;

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use common::{fails, ferry, ok};

fn service_dir(root: &Path) -> PathBuf {
    let dir = root.join("svc");
    fs::create_dir_all(dir.join("bin")).unwrap();
    fs::create_dir_all(dir.join("etc")).unwrap();
    fs::write(dir.join("bin/api"), common::arm_program()).unwrap();
    fs::set_permissions(dir.join("bin/api"), fs::Permissions::from_mode(0o755)).unwrap();
    fs::write(dir.join("etc/api.toml"), b"port = 8080\n").unwrap();
    dir
}

fn flip_byte(path: &Path, offset: usize) {
    let mut bytes = fs::read(path).unwrap();
    bytes[offset] ^= 0x01;
    fs::write(path, bytes).unwrap();
}

/// Replaces the base64 character at `offset` with another one, so the
/// envelope still parses and only the decoded bytes change.
fn change_base64_char(path: &Path, offset: usize) {
    let mut bytes = fs::read(path).unwrap();
    bytes[offset] = if bytes[offset] == b'A' { b'B' } else { b'A' };
    fs::write(path, bytes).unwrap();
}

/// Offset of the middle of the JSON string value of `field` in the file.
fn middle_of(path: &Path, field: &str) -> usize {
    let text = fs::read_to_string(path).unwrap();
    let start = text.find(&format!("\"{field}\": \"")).unwrap() + field.len() + 5;
    let len = text[start..].find('"').unwrap();
    start + len / 2
}

const PACKAGE: &[&str] = &[
    "package",
    "svc",
    "--service",
    "api",
    "--version",
    "1.2.3",
    "--entrypoint",
    "bin/api",
    "--sequence",
    "7",
    "-o",
    "out",
];

/// A scratch directory holding key `ops`, the packaged service in `out/` and
/// its envelope signed by `ops` in `env.json`.
fn signed_release() -> tempfile::TempDir {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    service_dir(d);
    ok(d, &["keygen", "--out", "ops"]);
    ok(d, PACKAGE);
    ok(
        d,
        &[
            "sign",
            "out/api-1.2.3.manifest.json",
            "--key",
            "ops.key",
            "-o",
            "env.json",
        ],
    );
    tmp
}

#[test]
fn keygen_package_sign_verify_round_trip() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    service_dir(d);

    let keygen = ok(d, &["keygen", "--out", "ops"]);
    let mode = fs::metadata(d.join("ops.key"))
        .unwrap()
        .permissions()
        .mode()
        & 0o777;
    assert_eq!(mode, 0o600, "secret key must be private");
    assert!(d.join("ops.pub").exists());
    let key_id = keygen
        .lines()
        .next()
        .unwrap()
        .strip_prefix("key id ")
        .unwrap()
        .to_owned();
    assert_eq!(key_id.len(), 32);

    let packaged = ok(d, PACKAGE);
    assert!(packaged.contains("out/api-1.2.3.tar.gz"), "{packaged}");
    let manifest = "out/api-1.2.3.manifest.json";
    let artifact = "out/api-1.2.3.tar.gz";

    let signed = ok(
        d,
        &[
            "sign",
            manifest,
            "--key",
            "ops.key",
            "-o",
            "api.envelope.json",
        ],
    );
    assert!(signed.contains(&key_id), "{signed}");

    let verified = ok(
        d,
        &[
            "verify",
            "api.envelope.json",
            "--pub",
            "ops.pub",
            "--artifact",
            artifact,
        ],
    );
    assert!(
        verified.starts_with("OK: api 1.2.3 (sequence 7"),
        "{verified}"
    );
    assert!(verified.contains(&key_id));
    assert!(
        verified.contains("artifact out/api-1.2.3.tar.gz matches"),
        "{verified}"
    );

    // --json gives scripts the same answer.
    let json: serde_json::Value = serde_json::from_str(&ok(
        d,
        &["verify", "api.envelope.json", "--pub", "ops.pub", "--json"],
    ))
    .unwrap();
    assert_eq!(json["ok"], true);
    assert_eq!(json["signed_by"][0], key_id.as_str());
    assert_eq!(json["sequence"], 7);
}

#[test]
fn tampering_with_artifact_or_envelope_fails_with_a_clear_reason() {
    let tmp = signed_release();
    let d = tmp.path();

    // One byte of the artifact.
    let artifact = d.join("out/api-1.2.3.tar.gz");
    let len = fs::metadata(&artifact).unwrap().len() as usize;
    flip_byte(&artifact, len / 2);
    let line = fails(
        d,
        &[
            "verify",
            "env.json",
            "--pub",
            "ops.pub",
            "--artifact",
            "out/api-1.2.3.tar.gz",
        ],
    );
    assert!(
        line.starts_with(
            "ferry: verify failed: artifact out/api-1.2.3.tar.gz: artifact sha256 is "
        ),
        "{line}"
    );
    flip_byte(&artifact, len / 2);

    // One byte of the signature inside the envelope.
    fs::copy(d.join("env.json"), d.join("sig.json")).unwrap();
    change_base64_char(&d.join("sig.json"), middle_of(&d.join("sig.json"), "sig"));
    let line = fails(d, &["verify", "sig.json", "--pub", "ops.pub"]);
    assert!(
        line.contains("does not verify: the manifest or the signature was altered"),
        "{line}"
    );

    // One byte of the manifest inside the envelope.
    fs::copy(d.join("env.json"), d.join("man.json")).unwrap();
    change_base64_char(
        &d.join("man.json"),
        middle_of(&d.join("man.json"), "manifest"),
    );
    let line = fails(d, &["verify", "man.json", "--pub", "ops.pub"]);
    assert!(line.contains("does not verify"), "{line}");

    // A JSON-aware script gets the kind of failure.
    let run = ferry(d, &["verify", "man.json", "--pub", "ops.pub", "--json"]);
    assert_eq!(run.code, 1);
    let json: serde_json::Value = serde_json::from_str(&run.stdout).unwrap();
    assert_eq!(json["error"], "bad_signature");

    // The untouched envelope and artifact still verify.
    ok(
        d,
        &[
            "verify",
            "env.json",
            "--pub",
            "ops.pub",
            "--artifact",
            "out/api-1.2.3.tar.gz",
        ],
    );
}

#[test]
fn two_of_three_signatures_gathered_one_operator_at_a_time() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    service_dir(d);
    for name in ["alice", "bob", "carol"] {
        ok(d, &["keygen", "--out", name]);
    }
    ok(d, PACKAGE);
    ok(
        d,
        &[
            "sign",
            "out/api-1.2.3.manifest.json",
            "--key",
            "alice.key",
            "-o",
            "env.json",
        ],
    );
    let all = [
        "verify",
        "env.json",
        "--pub",
        "alice.pub",
        "--pub",
        "bob.pub",
        "--pub",
        "carol.pub",
        "--threshold",
        "2",
    ];
    let line = fails(d, &all);
    assert_eq!(
        line,
        "ferry: verify failed: signed by 1 trusted key(s), 2 required"
    );

    // Bob adds his signature to the same envelope.
    let added = ok(
        d,
        &["sign", "env.json", "--key", "bob.key", "-o", "env.json"],
    );
    assert!(added.contains("(2 signature(s))"), "{added}");
    assert!(ok(d, &all).contains("signed by 2 trusted key(s), 2 required"));
}

#[test]
fn refusals_each_name_their_reason() {
    let tmp = signed_release();
    let d = tmp.path();
    ok(d, &["keygen", "--out", "stranger"]);

    let line = fails(d, &["verify", "env.json", "--pub", "stranger.pub"]);
    assert!(
        line.starts_with("ferry: verify failed: signed only by unknown key(s) "),
        "{line}"
    );

    let line = fails(
        d,
        &[
            "verify",
            "env.json",
            "--pub",
            "ops.pub",
            "--target",
            "x86_64-unknown-linux-gnu",
        ],
    );
    assert_eq!(
        line,
        "ferry: verify failed: release is built for armv7-unknown-linux-gnueabihf, not for x86_64-unknown-linux-gnu"
    );

    // An expiry in the past: packaging refuses it, and a manifest edited
    // to carry one before signing is refused by verify.
    let mut expired = PACKAGE.to_vec();
    expired.extend(["--expires", "2020-01-01T00:00:00Z"]);
    let line = fails(d, &expired);
    assert_eq!(
        line,
        "ferry: error: --expires 2020-01-01T00:00:00Z is in the past: devices would refuse the release"
    );
    ok(d, PACKAGE);
    let manifest_path = d.join("out/api-1.2.3.manifest.json");
    let mut manifest: serde_json::Value =
        serde_json::from_slice(&fs::read(&manifest_path).unwrap()).unwrap();
    manifest["expires"] = "2020-01-01T00:00:00Z".into();
    fs::write(&manifest_path, serde_json::to_vec(&manifest).unwrap()).unwrap();
    ok(
        d,
        &[
            "sign",
            "out/api-1.2.3.manifest.json",
            "--key",
            "ops.key",
            "-o",
            "old.json",
        ],
    );
    let line = fails(d, &["verify", "old.json", "--pub", "ops.pub"]);
    assert_eq!(
        line,
        "ferry: verify failed: release expired at 2020-01-01T00:00:00Z"
    );

    // Not an envelope at all.
    fs::write(d.join("junk.json"), b"{\"hello\": 1}").unwrap();
    let line = fails(d, &["verify", "junk.json", "--pub", "ops.pub"]);
    assert!(
        line.starts_with("ferry: verify failed: malformed release: signed envelope: "),
        "{line}"
    );
}

#[test]
fn keygen_never_overwrites_a_key() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    ok(d, &["keygen", "--out", "ops"]);
    let before = fs::read(d.join("ops.key")).unwrap();
    let line = fails(d, &["keygen", "--out", "ops"]);
    assert_eq!(
        line,
        "ferry: error: ops.key already exists; refusing to overwrite a key"
    );
    assert_eq!(fs::read(d.join("ops.key")).unwrap(), before);
}

#[test]
fn bad_input_to_package_and_sign_changes_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    service_dir(d);
    ok(d, &["keygen", "--out", "ops"]);

    std::os::unix::fs::symlink("/etc/shadow", d.join("svc/etc/shadow")).unwrap();
    let line = fails(d, PACKAGE);
    assert!(
        line.contains(
            "only regular files and directories can be packaged; this is a symbolic link"
        ),
        "{line}"
    );
    assert!(!d.join("out").exists());
    fs::remove_file(d.join("svc/etc/shadow")).unwrap();

    fs::write(d.join("bad.manifest.json"), b"{\"schema\": 1}").unwrap();
    let line = fails(
        d,
        &[
            "sign",
            "bad.manifest.json",
            "--key",
            "ops.key",
            "-o",
            "env.json",
        ],
    );
    assert!(
        line.contains("bad.manifest.json is not a valid release manifest"),
        "{line}"
    );
    assert!(!d.join("env.json").exists());

    let line = fails(
        d,
        &[
            "sign",
            "bad.manifest.json",
            "--key",
            "ops.pub",
            "-o",
            "env.json",
        ],
    );
    assert!(line.contains("ops.pub is not a ferry secret key"), "{line}");

    // A service name clap rejects is a usage error (exit 2) naming the rule.
    let run = ferry(
        d,
        &[
            "package",
            "svc",
            "--service",
            "Bad/Name",
            "--version",
            "1.0.0",
            "--entrypoint",
            "bin/api",
            "--sequence",
            "1",
            "-o",
            "out",
        ],
    );
    assert_eq!(run.code, 2);
    assert!(
        run.stderr.contains("invalid service name"),
        "{}",
        run.stderr
    );
}

#[test]
fn packaging_the_same_directory_twice_gives_the_same_sha256() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    service_dir(d);
    let first: serde_json::Value =
        serde_json::from_str(&ok(d, &[PACKAGE, &["--json"]].concat())).unwrap();
    // Touch every file: times must not matter.
    std::thread::sleep(std::time::Duration::from_millis(1100));
    fs::write(d.join("svc/etc/api.toml"), b"port = 8080\n").unwrap();
    let mut again = PACKAGE.to_vec();
    let last = again.len() - 1;
    again[last] = "out2";
    again.push("--json");
    let second: serde_json::Value = serde_json::from_str(&ok(d, &again)).unwrap();
    assert_eq!(first["sha256"], second["sha256"]);
    assert_eq!(
        fs::read(d.join("out/api-1.2.3.tar.gz")).unwrap(),
        fs::read(d.join("out2/api-1.2.3.tar.gz")).unwrap()
    );
}

#[test]
fn health_and_reload_settings_reach_the_manifest() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    service_dir(d);
    let mut args = PACKAGE.to_vec();
    args.extend([
        "--health-window",
        "3",
        "--probe",
        "cmd:bin/api --check",
        "--reload",
        "/etc/api/app.conf=signal:SIGHUP",
        "--reload",
        "etc/api.toml=restart",
    ]);
    ok(d, &args);
    let manifest: serde_json::Value =
        serde_json::from_slice(&fs::read(d.join("out/api-1.2.3.manifest.json")).unwrap()).unwrap();
    assert_eq!(manifest["health"]["window_secs"], 3);
    assert_eq!(manifest["health"]["probe"]["type"], "command");
    assert_eq!(manifest["health"]["probe"]["argv"][1], "--check");
    assert_eq!(manifest["reload"][0]["paths"][0], "/etc/api/app.conf");
    assert_eq!(manifest["reload"][0]["action"], "signal:SIGHUP");
    assert_eq!(manifest["reload"][1]["action"], "restart");

    let mut bad = PACKAGE.to_vec();
    bad.extend(["--reload", "/etc/x=signal:SIGKILL"]);
    let run = ferry(d, &bad);
    assert_eq!(run.code, 2);
    assert!(run.stderr.contains("SIGKILL"), "{}", run.stderr);
}

#[test]
fn package_and_verify_check_programs_as_devices_do() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    service_dir(d);
    // A script as the entrypoint: refused at package time, with the rule.
    fs::write(d.join("svc/bin/api"), b"#!/bin/sh\nexec sleep 1000\n").unwrap();
    let line = fails(d, PACKAGE);
    assert!(
        line.contains("entrypoint bin/api: not an ELF executable (a script?")
            && line.contains("--arg"),
        "{line}"
    );
    assert!(!d.join("out").exists(), "something was written");
    // A helper program built for this x86-64 machine, beside an ARM entrypoint.
    fs::write(d.join("svc/bin/api"), common::arm_program()).unwrap();
    fs::copy("/bin/true", d.join("svc/bin/helper")).unwrap();
    let line = fails(d, PACKAGE);
    assert!(
        line.contains("bin/helper: built for x86-64, but armv7-unknown-linux-gnueabihf needs ARM"),
        "{line}"
    );
    fs::remove_file(d.join("svc/bin/helper")).unwrap();
    ok(d, PACKAGE);

    // verify --artifact looks inside the artifact the same way: an artifact
    // packed by another tool with an x86-64 entrypoint is caught there.
    ok(d, &["keygen", "--out", "ops"]);
    ok(
        d,
        &[
            "sign",
            "out/api-1.2.3.manifest.json",
            "--key",
            "ops.key",
            "-o",
            "env.json",
        ],
    );
    let checked = ok(
        d,
        &[
            "verify",
            "env.json",
            "--pub",
            "ops.pub",
            "--artifact",
            "out/api-1.2.3.tar.gz",
        ],
    );
    assert!(
        checked.contains("its programs are built for armv7"),
        "{checked}"
    );
    let x86 = tempfile::tempdir().unwrap();
    fs::create_dir_all(x86.path().join("bin")).unwrap();
    fs::copy("/bin/true", x86.path().join("bin/api")).unwrap();
    let packaged = ferry_cross::package(
        &ferry_cross::PackageRequest {
            dir: x86.path().to_owned(),
            service: ferry_protocol::ServiceName::new("api").unwrap(),
            version: "1.2.4".parse().unwrap(),
            entrypoint: ferry_protocol::RelPath::new("bin/api").unwrap(),
            sequence: 8,
            target: ferry_protocol::Target::new("armv7-unknown-linux-gnueabihf").unwrap(),
            kind: Some(ferry_protocol::manifest::ArtifactKind::C),
            expires: None,
            build: Default::default(),
            health: Default::default(),
            reload: Vec::new(),
            run: Default::default(),
        },
        &d.join("x86"),
    )
    .unwrap();
    let manifest = packaged.manifest_path.display().to_string();
    ok(
        d,
        &["sign", &manifest, "--key", "ops.key", "-o", "x86.json"],
    );
    let artifact = packaged.artifact.display().to_string();
    let run = ferry(
        d,
        &[
            "verify",
            "x86.json",
            "--pub",
            "ops.pub",
            "--artifact",
            &artifact,
        ],
    );
    assert_eq!(run.code, 1, "{}", run.stdout);
    assert!(
        run.stderr.contains("entrypoint bin/api: built for x86-64"),
        "{}",
        run.stderr
    );
}

#[test]
fn a_trust_root_is_made_and_signed_offline() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    for name in ["root-a", "root-b", "ops"] {
        ok(d, &["keygen", "--out", name]);
    }
    let made = ok(
        d,
        &[
            "root",
            "new",
            "--version",
            "1",
            "--root-key",
            "root-a.pub",
            "--root-key",
            "root-b.pub",
            "--root-threshold",
            "2",
            "--release-key",
            "ops.pub",
            "-o",
            "root-1.json",
        ],
    );
    assert!(made.contains("unsigned"), "{made}");
    let read = || {
        ferry_protocol::root::SignedRoot::from_json(&std::fs::read(d.join("root-1.json")).unwrap())
            .unwrap()
    };
    // One of two root keys is not enough; both are.
    ok(d, &["root", "sign", "root-1.json", "--key", "root-a.key"]);
    assert!(ferry_protocol::root::verify_first(&read()).is_err());
    let signed = ok(d, &["root", "sign", "root-1.json", "--key", "root-b.key"]);
    assert!(signed.contains("2 signature(s)"), "{signed}");
    let root = ferry_protocol::root::verify_first(&read()).unwrap();
    assert_eq!((root.version, root.root_threshold), (1, 2));
    // A release key can never be a root key too; nothing is written.
    let refused = fails(
        d,
        &[
            "root",
            "new",
            "--version",
            "2",
            "--root-key",
            "ops.pub",
            "--release-key",
            "ops.pub",
            "-o",
            "root-2.json",
        ],
    );
    assert!(
        refused.contains("both a root key and a release key"),
        "{refused}"
    );
    assert!(!d.join("root-2.json").exists());
}
