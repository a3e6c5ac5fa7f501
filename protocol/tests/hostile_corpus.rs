//! The hostile-input corpus: `protocol/tests/corpus/KIND/NAME.*` holds an
//! input that a device or the manager may be sent, and `NAME.expect` the
//! words its refusal must contain. Every input must be refused, with its
//! reason, by the same entry points the agent and the manager use:
//!
//! - `envelope/`: [`TrustPolicy::verify_json`] for a device trusting the key
//!   from seed [1; 32], on `armv7-unknown-linux-gnueabihf`, at Unix time
//!   1,800,000,000, with `api` installed at sequence 10;
//! - `desired/`, `reported/`, `events/`, `health/`, `status/`: the payload
//!   types of those topics ([`Message::decode`]);
//! - `topic/`: topic names ([`Topic`] parsing).
//!
//! Most inputs are made by [`generate`] (signed ones need the key);
//! `FERRY_WRITE_CORPUS=1 cargo test -p ferry-protocol --test hostile_corpus`
//! writes them, except the large ones (padding, nesting), which are run
//! straight from the generator. Files added by hand are run the same way.

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};

use base64::Engine as _;
use ferry_protocol::envelope::SIGNATURE_DOMAIN;
use ferry_protocol::messages::{Desired, Event, Health, Message, Reported, Status};
use ferry_protocol::names::ARMV7_TARGET;
use ferry_protocol::topics::Topic;
use ferry_protocol::trust::{InstalledRelease, InstalledReleases};
use ferry_protocol::{Checks, SecretKey, ServiceName, Target, Timestamp, TrustPolicy};
use serde_json::{Value, json};

fn corpus() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/corpus")
}

struct ApiAtTen;

impl InstalledReleases for ApiAtTen {
    fn installed(&self, service: &ServiceName) -> Option<InstalledRelease> {
        (service.as_str() == "api").then_some(InstalledRelease {
            sequence: 10,
            manifest: ferry_protocol::Sha256Digest::of(b"api 10"),
        })
    }
}

/// A good manifest; the hostile ones change one thing.
fn manifest() -> Value {
    json!({
        "schema": 1,
        "service": "api",
        "version": "2.0.0",
        "sequence": 11,
        "target": ARMV7_TARGET,
        "kind": "c",
        "entrypoint": "bin/api",
        "artifact": { "sha256": "ab".repeat(32), "size": 1000, "format": "tar.gz" },
        "limits": { "unpacked_bytes": 100000, "entries": 3 },
        "health": { "window_secs": 10 },
    })
}

fn b64(bytes: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

/// An envelope around `manifest` bytes, whatever they are, signed by the
/// key from `seed` (raw ed25519: `Envelope::sign` refuses bad manifests).
fn envelope(manifest: &[u8], seed: u8) -> Value {
    use ed25519_dalek::Signer as _;
    let key = SecretKey::from_seed(&[seed; 32]);
    let mut message = SIGNATURE_DOMAIN.to_vec();
    message.extend_from_slice(manifest);
    let sig = ed25519_dalek::SigningKey::from_bytes(&[seed; 32]).sign(&message);
    json!({
        "schema": 1,
        "manifest": b64(manifest),
        "signatures": [{ "key_id": key.public_key().id().to_string(), "sig": b64(&sig.to_bytes()) }],
    })
}

fn with(mut value: Value, path: &[&str], new: Value) -> Value {
    let mut at = &mut value;
    for key in &path[..path.len() - 1] {
        at = &mut at[*key];
    }
    at[path[path.len() - 1]] = new;
    value
}

fn signed(manifest: &Value) -> Vec<u8> {
    envelope(&serde_json::to_vec(manifest).unwrap(), 1)
        .to_string()
        .into_bytes()
}

type Corpus = BTreeMap<(&'static str, String), (Vec<u8>, &'static str)>;

/// Every generated input: (kind, name) -> (bytes, expected words).
fn generate() -> Corpus {
    let mut c = Corpus::new();
    let mut add = |kind: &'static str, name: &str, bytes: Vec<u8>, expect: &'static str| {
        c.insert((kind, name.to_owned()), (bytes, expect));
    };

    // Envelopes: not JSON, too big, too deep, wrong shapes.
    add("envelope", "empty", Vec::new(), "malformed release");
    add(
        "envelope",
        "not_json",
        b"hello".to_vec(),
        "malformed release",
    );
    add(
        "envelope",
        "deep_nesting",
        "[".repeat(100_000).into_bytes(),
        "invalid type",
    );
    add(
        "envelope",
        "deep_nesting_in_a_field",
        format!(
            "{{\"schema\":1,\"manifest\":\"\",\"signatures\":{}",
            "[".repeat(60_000)
        )
        .into_bytes(),
        "invalid type",
    );
    add(
        "envelope",
        "oversized",
        format!("{{\"x\":\"{}\"}}", "a".repeat(200_000)).into_bytes(),
        "over the limit",
    );
    let good = envelope(&serde_json::to_vec(&manifest()).unwrap(), 1);
    add(
        "envelope",
        "unknown_field",
        with(good.clone(), &["extra"], json!(1))
            .to_string()
            .into_bytes(),
        "unknown field",
    );
    add(
        "envelope",
        "manifest_not_base64",
        with(good.clone(), &["manifest"], json!("%%%"))
            .to_string()
            .into_bytes(),
        "malformed release",
    );
    add(
        "envelope",
        "schema_2",
        with(good.clone(), &["schema"], json!(2))
            .to_string()
            .into_bytes(),
        "schema version 2",
    );
    add(
        "envelope",
        "no_signatures",
        with(good.clone(), &["signatures"], json!([]))
            .to_string()
            .into_bytes(),
        "carries no signature",
    );
    let sig = good["signatures"][0]["sig"].as_str().unwrap().to_owned();
    let mut flipped = base64::engine::general_purpose::STANDARD
        .decode(&sig)
        .unwrap();
    flipped[10] ^= 1;
    add(
        "envelope",
        "signature_altered",
        with(
            good.clone(),
            &["signatures"],
            json!([{ "key_id": good["signatures"][0]["key_id"], "sig": b64(&flipped) }]),
        )
        .to_string()
        .into_bytes(),
        "does not verify",
    );
    add(
        "envelope",
        "signature_short",
        with(
            good.clone(),
            &["signatures"],
            json!([{ "key_id": good["signatures"][0]["key_id"], "sig": b64(&[1; 32]) }]),
        )
        .to_string()
        .into_bytes(),
        "malformed release",
    );
    let many: Vec<Value> = (0..17).map(|_| good["signatures"][0].clone()).collect();
    add(
        "envelope",
        "too_many_signatures",
        with(good.clone(), &["signatures"], json!(many))
            .to_string()
            .into_bytes(),
        "malformed release",
    );
    add(
        "envelope",
        "unknown_key",
        envelope(&serde_json::to_vec(&manifest()).unwrap(), 9)
            .to_string()
            .into_bytes(),
        "none is trusted here",
    );
    // The manifest bytes swapped after signing.
    let other = serde_json::to_vec(&with(manifest(), &["sequence"], json!(99))).unwrap();
    add(
        "envelope",
        "manifest_swapped",
        with(good.clone(), &["manifest"], json!(b64(&other)))
            .to_string()
            .into_bytes(),
        "does not verify",
    );

    // Manifests signed by the trusted key, each wrong in one way.
    let m = manifest();
    for (name, path, value, expect) in [
        (
            "manifest_unknown_field",
            &["extra"][..],
            json!(true),
            "unknown field",
        ),
        (
            "manifest_schema_2",
            &["schema"][..],
            json!(2),
            "schema version 2",
        ),
        (
            "service_climbs_out",
            &["service"][..],
            json!("../etc"),
            "malformed release",
        ),
        (
            "service_with_nul",
            &["service"][..],
            json!("api\u{0}x"),
            "malformed release",
        ),
        (
            "service_bidi_override",
            &["service"][..],
            json!("ap\u{202e}i"),
            "malformed release",
        ),
        (
            "service_too_long",
            &["service"][..],
            json!("a".repeat(300)),
            "malformed release",
        ),
        (
            "entrypoint_absolute",
            &["entrypoint"][..],
            json!("/bin/sh"),
            "malformed release",
        ),
        (
            "entrypoint_climbs_out",
            &["entrypoint"][..],
            json!("bin/../../../etc/passwd"),
            "malformed release",
        ),
        (
            "entrypoint_backslash",
            &["entrypoint"][..],
            json!("bin\\api"),
            "malformed release",
        ),
        (
            "version_not_semver",
            &["version"][..],
            json!("latest"),
            "malformed release",
        ),
        (
            "sequence_negative",
            &["sequence"][..],
            json!(-1),
            "malformed release",
        ),
        (
            "sequence_huge",
            &["sequence"][..],
            json!(1e30),
            "malformed release",
        ),
        (
            "sha256_short",
            &["artifact", "sha256"][..],
            json!("abcd"),
            "malformed release",
        ),
        (
            "sha256_not_hex",
            &["artifact", "sha256"][..],
            json!("zz".repeat(32)),
            "malformed release",
        ),
        (
            "format_unknown",
            &["artifact", "format"][..],
            json!("zip"),
            "malformed release",
        ),
        (
            "zero_entries",
            &["limits", "entries"][..],
            json!(0),
            "malformed release",
        ),
        (
            "kind_unknown",
            &["kind"][..],
            json!("python"),
            "malformed release",
        ),
        (
            "expired",
            &["expires"][..],
            json!("2020-01-01T00:00:00Z"),
            "expired",
        ),
        (
            "expiry_not_a_time",
            &["expires"][..],
            json!("tomorrow"),
            "malformed release",
        ),
        (
            "wrong_target",
            &["target"][..],
            json!("aarch64-unknown-linux-gnu"),
            "built for aarch64",
        ),
        ("rollback", &["sequence"][..], json!(5), "sequence"),
        // The installed sequence with other contents: another release can
        // never take the place of the one installed under its sequence.
        (
            "sequence_reused",
            &["sequence"][..],
            json!(10),
            "different release under the same sequence",
        ),
        (
            "probe_unknown",
            &["health", "probe"][..],
            json!({ "type": "shell", "cmd": "rm -rf /" }),
            "malformed release",
        ),
    ] {
        add(
            "envelope",
            name,
            signed(&with(m.clone(), path, value)),
            expect,
        );
    }
    // A manifest whose JSON names a field twice (the second would win in a
    // lax parser).
    let text = String::from_utf8(serde_json::to_vec(&m).unwrap())
        .unwrap()
        .replacen(
            "\"service\":\"api\"",
            "\"service\":\"api\",\"service\":\"evil\"",
            1,
        );
    add(
        "envelope",
        "manifest_duplicate_field",
        envelope(text.as_bytes(), 1).to_string().into_bytes(),
        "duplicate field",
    );
    add(
        "envelope",
        "manifest_oversized",
        signed(&with(
            m.clone(),
            &["build", "flags"],
            json!("x".repeat(70_000)),
        )),
        "over the limit",
    );

    // Payloads of every topic the agent or the manager reads.
    for (kind, cap) in [
        ("desired", Desired::MAX_BYTES),
        ("reported", Reported::MAX_BYTES),
        ("events", Event::MAX_BYTES),
        ("health", Health::MAX_BYTES),
        ("status", Status::MAX_BYTES),
    ] {
        add(kind, "empty", Vec::new(), "EOF");
        add(
            kind,
            "not_json",
            b"\xff\xfe garbage".to_vec(),
            "expected value",
        );
        let array_expect = if kind == "status" {
            "expected value"
        } else {
            "invalid type"
        };
        add(kind, "array", b"[1,2,3]".to_vec(), array_expect);
        // Unknown keys are skipped without recursion: deep input ends in a
        // clean EOF error, never a stack overflow.
        let deep = "{\"a\":".repeat(cap.min(200_000) / 5 - 1);
        let deep_expect = if deep.len() > cap {
            "over the limit"
        } else {
            "EOF"
        };
        add(kind, "deep_nesting", deep.into_bytes(), deep_expect);
        add(kind, "oversized", vec![b' '; cap + 1], "over the limit");
        add(
            kind,
            "schema_99",
            json!({ "schema": 99 }).to_string().into_bytes(),
            "missing field",
        );
    }
    let bad_desired = json!({ "schema": 1, "releases": [{ "envelope": "not an envelope" }] });
    add(
        "desired",
        "release_not_an_envelope",
        bad_desired.to_string().into_bytes(),
        "invalid type",
    );
    let future = json!({ "schema": 2, "releases": [] });
    add(
        "desired",
        "future_schema",
        future.to_string().into_bytes(),
        "schema version 2",
    );
    let status = json!({ "schema": 1, "state": "hacked", "time": "2026-01-01T00:00:00Z" });
    add(
        "status",
        "unknown_state",
        status.to_string().into_bytes(),
        "unknown variant",
    );

    // Topic names.
    for (name, topic) in [
        ("wildcard_device", "ferry/v1/devices/+/desired"),
        ("multi_level_wildcard", "ferry/v1/devices/#"),
        ("climbs_out", "ferry/v1/devices/../reported"),
        ("other_version", "ferry/v2/devices/gw-1/reported"),
        ("extra_level", "ferry/v1/devices/gw-1/desired/extra"),
        ("empty_device", "ferry/v1/devices//reported"),
        ("space_in_device", "ferry/v1/devices/gw 1/reported"),
        ("unknown_kind", "ferry/v1/devices/gw-1/shell"),
        (
            "long_device",
            &format!("ferry/v1/devices/{}/reported", "a".repeat(300)),
        ),
        ("nul_in_device", "ferry/v1/devices/gw\u{0}1/reported"),
    ] {
        add("topic", name, topic.as_bytes().to_vec(), "");
    }
    c
}

/// Runs one input through its entry point: Err(reason) when refused.
fn refuse(kind: &str, bytes: &[u8]) -> Result<(), String> {
    let policy = TrustPolicy::new([SecretKey::from_seed(&[1; 32]).public_key()], 1)
        .map_err(|e| e.to_string())?;
    let target = Target::new(ARMV7_TARGET).map_err(|e| e.to_string())?;
    let checks = Checks {
        now: Timestamp::from_unix_secs(1_800_000_000).system_time(),
        target: Some(&target),
        installed: &ApiAtTen,
    };
    let err = |e: &dyn std::fmt::Display| e.to_string();
    match kind {
        "envelope" => policy
            .verify_json(bytes, &checks)
            .map(drop)
            .map_err(|e| err(&e)),
        "desired" => Desired::decode(bytes).map(drop).map_err(|e| err(&e)),
        "reported" => Reported::decode(bytes).map(drop).map_err(|e| err(&e)),
        "events" => Event::decode(bytes).map(drop).map_err(|e| err(&e)),
        "health" => Health::decode(bytes).map(drop).map_err(|e| err(&e)),
        "status" => Status::decode(bytes).map(drop).map_err(|e| err(&e)),
        "topic" => std::str::from_utf8(bytes)
            .map_err(|e| err(&e))?
            .parse::<Topic>()
            .map(drop)
            .map_err(|e| err(&e)),
        other => panic!("no entry point for corpus kind {other}"),
    }
}

/// Inputs larger than this (padding and nesting, trivial to make) are run
/// from the generator instead of being kept as files.
const ON_DISK_MAX: usize = 16 * 1024;

fn extension(kind: &str) -> &'static str {
    if kind == "topic" { "txt" } else { "json" }
}

#[test]
fn the_unaltered_input_is_accepted() {
    // So each hostile input fails for what was changed, not for the setup.
    assert_eq!(refuse("envelope", &signed(&manifest())), Ok(()));
}

#[test]
fn the_corpus_on_disk_is_what_the_generator_makes() {
    let write = std::env::var_os("FERRY_WRITE_CORPUS").is_some();
    for ((kind, name), (bytes, expect)) in generate() {
        if bytes.len() > ON_DISK_MAX {
            continue;
        }
        let dir = corpus().join(kind);
        let input = dir.join(format!("{name}.{}", extension(kind)));
        let expect_file = dir.join(format!("{name}.expect"));
        if write {
            fs::create_dir_all(&dir).unwrap();
            fs::write(&input, &bytes).unwrap();
            fs::write(&expect_file, format!("{expect}\n")).unwrap();
        } else {
            assert_eq!(
                fs::read(&input).ok().as_deref(),
                Some(&bytes[..]),
                "{} differs from the generator; FERRY_WRITE_CORPUS=1 rewrites it",
                input.display()
            );
        }
    }
}

#[test]
fn every_hostile_input_is_refused_with_its_reason() {
    let mut tried = 0;
    let mut wrong = Vec::new();
    for kind in fs::read_dir(corpus()).unwrap() {
        let kind = kind.unwrap().path();
        let kind_name = kind.file_name().unwrap().to_string_lossy().into_owned();
        for file in fs::read_dir(&kind).unwrap() {
            let path = file.unwrap().path();
            if path.extension().is_some_and(|e| e == "expect") {
                continue;
            }
            let expect = fs::read_to_string(path.with_extension("expect"))
                .unwrap_or_else(|_| panic!("{} has no .expect file", path.display()));
            let bytes = fs::read(&path).unwrap();
            match refuse(&kind_name, &bytes) {
                Ok(()) => wrong.push(format!("{} was accepted", path.display())),
                Err(reason) if !reason.contains(expect.trim_end_matches('\n')) => {
                    wrong.push(format!(
                        "{}: refused with {reason:?}, expected words {:?}",
                        path.display(),
                        expect.trim_end()
                    ))
                }
                Err(_) => {}
            }
            tried += 1;
        }
    }
    for ((kind, name), (bytes, expect)) in generate() {
        if bytes.len() <= ON_DISK_MAX {
            continue;
        }
        match refuse(kind, &bytes) {
            Ok(()) => wrong.push(format!("{kind}/{name} was accepted")),
            Err(reason) if !reason.contains(expect) => wrong.push(format!(
                "{kind}/{name}: refused with {reason:?}, expected {expect:?}"
            )),
            Err(_) => {}
        }
        tried += 1;
    }
    assert!(wrong.is_empty(), "{}", wrong.join("\n"));
    assert!(tried >= 80, "only {tried} inputs in the corpus");
}
