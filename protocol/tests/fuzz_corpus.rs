//! Replays the fuzzers' kept corpora (`fuzz/corpus/`) with the fuzz
//! targets' invariants, without libFuzzer: what a fuzzer once found stays
//! fixed in every ordinary test run.

use std::fs;
use std::path::{Path, PathBuf};

use ferry_protocol::blocks::Frame;
use ferry_protocol::messages::{BlockRequest, Desired, Event, Health, Message, Reported, Status};
use ferry_protocol::topics::Topic;
use ferry_protocol::trust::NothingInstalled;
use ferry_protocol::{Checks, Manifest, SecretKey, Timestamp, TrustPolicy};

fn inputs(target: &str) -> Vec<(PathBuf, Vec<u8>)> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../fuzz/corpus")
        .join(target);
    let mut out: Vec<(PathBuf, Vec<u8>)> = fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|entry| {
            let path = entry.unwrap().path();
            let bytes = fs::read(&path).unwrap();
            (path, bytes)
        })
        .collect();
    out.sort();
    assert!(
        out.len() >= 10,
        "{}: only {} inputs",
        dir.display(),
        out.len()
    );
    out
}

#[test]
fn no_kept_envelope_is_accepted_by_a_key_that_signed_none() {
    let policy = TrustPolicy::new([SecretKey::from_seed(&[42; 32]).public_key()], 1).unwrap();
    let checks = Checks {
        now: Timestamp::from_unix_secs(1_800_000_000).system_time(),
        target: None,
        installed: &NothingInstalled,
    };
    for (path, bytes) in inputs("envelope") {
        assert!(
            policy.verify_json(&bytes, &checks).is_err(),
            "{} was accepted",
            path.display()
        );
    }
}

#[test]
fn kept_manifests_that_parse_read_back_the_same() {
    for (path, bytes) in inputs("manifest") {
        if let Ok(manifest) = Manifest::from_json(&bytes) {
            let again = Manifest::from_json(&manifest.to_json())
                .unwrap_or_else(|e| panic!("{}: its own JSON does not read: {e}", path.display()));
            assert_eq!(again, manifest, "{}", path.display());
        }
    }
}

#[test]
fn kept_topics_and_payloads_read_or_refuse_cleanly() {
    for (path, bytes) in inputs("topic_and_messages") {
        if let Ok(text) = std::str::from_utf8(&bytes) {
            if let Ok(topic) = text.parse::<Topic>() {
                assert_eq!(topic.to_string(), text, "{}", path.display());
            }
        }
        let _ = Desired::decode(&bytes);
        let _ = Reported::decode(&bytes);
        let _ = Event::decode(&bytes);
        let _ = Health::decode(&bytes);
        let _ = Status::decode(&bytes);
        if let Ok(request) = BlockRequest::decode(&bytes) {
            assert!(request.check().is_ok(), "{}", path.display());
        }
        if let Ok(frame) = Frame::decode(&bytes) {
            assert_eq!(frame.encode(), bytes, "{}", path.display());
        }
    }
}
