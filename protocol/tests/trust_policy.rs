//! The trust policy at its boundary: envelopes in, a verified release or one
//! exact error out.

use std::collections::BTreeMap;
use std::time::{Duration, SystemTime};

use ferry_protocol::manifest::{
    ArtifactFormat, ArtifactInfo, ArtifactKind, BuildInfo, HealthSettings, MANIFEST_SCHEMA,
    UnpackLimits,
};
use ferry_protocol::names::ARMV7_TARGET;
use ferry_protocol::trust::{InstalledRelease, NothingInstalled};
use ferry_protocol::{
    Checks, Envelope, Manifest, PublicKey, RelPath, SecretKey, ServiceName, Sha256Digest, Target,
    Timestamp, TrustPolicy, VerifyError,
};
use proptest::prelude::*;

fn key(n: u8) -> SecretKey {
    SecretKey::from_seed(&[n; 32])
}

fn manifest() -> Manifest {
    Manifest {
        schema: MANIFEST_SCHEMA,
        service: ServiceName::new("api").unwrap(),
        version: semver::Version::new(2, 0, 1),
        sequence: 10,
        target: Target::new(ARMV7_TARGET).unwrap(),
        kind: ArtifactKind::C,
        entrypoint: RelPath::new("bin/api").unwrap(),
        artifact: ArtifactInfo {
            sha256: Sha256Digest::of(b"the artifact"),
            size: 12,
            format: ArtifactFormat::TarGz,
        },
        limits: UnpackLimits {
            unpacked_bytes: 1 << 20,
            entries: 3,
        },
        expires: None,
        health: HealthSettings::default(),
        reload: Vec::new(),
        run: Default::default(),
        build: BuildInfo::default(),
    }
}

fn signed(m: &Manifest, keys: &[&SecretKey]) -> Envelope {
    Envelope::sign(m.to_json(), keys).unwrap()
}

fn policy(keys: &[&SecretKey], threshold: usize) -> TrustPolicy {
    TrustPolicy::new(keys.iter().map(|k| k.public_key()), threshold).unwrap()
}

fn now() -> SystemTime {
    Timestamp::from_unix_secs(1_800_000_000).system_time()
}

fn open_checks() -> Checks<'static> {
    Checks {
        now: now(),
        target: None,
        installed: &NothingInstalled,
    }
}

#[test]
fn a_good_release_verifies_and_names_its_signers() {
    let (a, b) = (key(1), key(2));
    let release = policy(&[&a, &b], 1)
        .verify(&signed(&manifest(), &[&a]), &open_checks())
        .unwrap();
    assert_eq!(release.manifest, manifest());
    assert_eq!(release.signed_by, vec![a.public_key().id()]);
}

#[test]
fn two_of_three_threshold() {
    let (a, b, c) = (key(1), key(2), key(3));
    let trust = policy(&[&a, &b, &c], 2);

    let two = trust.verify(&signed(&manifest(), &[&a, &c]), &open_checks());
    assert_eq!(two.unwrap().signed_by.len(), 2);

    let one = trust.verify(&signed(&manifest(), &[&b]), &open_checks());
    assert!(
        matches!(
            one,
            Err(VerifyError::BelowThreshold {
                valid: 1,
                required: 2
            })
        ),
        "{one:?}"
    );

    // The same signature twice is still one key.
    let mut twice = signed(&manifest(), &[&a]);
    let copy = twice.signatures[0].clone();
    twice.signatures.push(copy);
    let dup = trust.verify(&twice, &open_checks());
    assert!(
        matches!(
            dup,
            Err(VerifyError::BelowThreshold {
                valid: 1,
                required: 2
            })
        ),
        "{dup:?}"
    );
}

#[test]
fn an_untrusted_signer_does_not_count() {
    let (a, b, stranger) = (key(1), key(2), key(9));
    let trust = policy(&[&a, &b], 2);
    let only_stranger = trust.verify(&signed(&manifest(), &[&stranger]), &open_checks());
    match only_stranger {
        Err(VerifyError::UnknownKey { key_ids }) => {
            assert_eq!(key_ids, vec![stranger.public_key().id()]);
        }
        other => panic!("expected UnknownKey, got {other:?}"),
    }
    let with_stranger = trust.verify(&signed(&manifest(), &[&a, &stranger]), &open_checks());
    assert!(
        matches!(
            with_stranger,
            Err(VerifyError::BelowThreshold {
                valid: 1,
                required: 2
            })
        ),
        "{with_stranger:?}"
    );
}

#[test]
fn replay_of_a_lower_sequence_is_refused() {
    let a = key(1);
    let trust = policy(&[&a], 1);
    let envelope = signed(&manifest(), &[&a]); // sequence 10
    let api = ServiceName::new("api").unwrap();
    let other = ServiceName::new("other").unwrap();
    let installed = |sequence, m: &Manifest| InstalledRelease {
        sequence,
        manifest: m.digest(),
    };

    let at = |installed: BTreeMap<ServiceName, InstalledRelease>| {
        trust.verify(
            &envelope,
            &Checks {
                now: now(),
                target: None,
                installed: &installed,
            },
        )
    };
    match at(BTreeMap::from([(api.clone(), installed(11, &manifest()))])) {
        Err(VerifyError::Rollback {
            service,
            sequence: 10,
            installed: 11,
        }) => assert_eq!(service, api),
        other => panic!("expected Rollback, got {other:?}"),
    }
    // The very release installed, sent again, is a re-install, not a
    // rollback; other services' sequences do not matter.
    assert!(at(BTreeMap::from([(api.clone(), installed(10, &manifest()))])).is_ok());
    assert!(
        at(BTreeMap::from([
            (api.clone(), installed(9, &manifest())),
            (other, installed(99, &manifest()))
        ]))
        .is_ok()
    );
    // Another release under the installed sequence is refused, however
    // small the difference.
    let mut elsewhere = manifest();
    elsewhere.artifact.size += 1;
    match at(BTreeMap::from([(api.clone(), installed(10, &elsewhere))])) {
        Err(VerifyError::SequenceReused {
            service,
            sequence: 10,
        }) => assert_eq!(service, api),
        other => panic!("expected SequenceReused, got {other:?}"),
    }
}

#[test]
fn a_device_that_names_its_services_refuses_any_other() {
    let a = key(1);
    let only_sensor = policy(&[&a], 1).only_services([ServiceName::new("sensor").unwrap()]);
    let envelope = signed(&manifest(), &[&a]); // service api
    match only_sensor.verify(&envelope, &open_checks()) {
        Err(VerifyError::ServiceNotAllowed { service, allowed }) => {
            assert_eq!(service.as_str(), "api");
            assert_eq!(allowed, ["sensor"]);
        }
        other => panic!("expected ServiceNotAllowed, got {other:?}"),
    }
    let with_api = policy(&[&a], 1).only_services([
        ServiceName::new("sensor").unwrap(),
        ServiceName::new("api").unwrap(),
    ]);
    assert!(with_api.verify(&envelope, &open_checks()).is_ok());
    // The operator's own check of who signed does not ask.
    assert!(only_sensor.verify_signatures(&envelope).is_ok());
}

#[test]
fn a_manifest_digest_ignores_layout_but_not_content() {
    let m = manifest();
    let compact = serde_json::to_vec(&m).unwrap();
    let reread = Manifest::from_json(&compact).unwrap();
    assert_eq!(reread.digest(), m.digest());
    let mut changed = m.clone();
    changed.version = semver::Version::new(9, 9, 9);
    assert_ne!(changed.digest(), m.digest());
}

#[test]
fn an_expired_release_is_refused() {
    let a = key(1);
    let trust = policy(&[&a], 1);
    let expires = Timestamp::from_unix_secs(1_800_000_000);
    let mut m = manifest();
    m.expires = Some(expires);
    let envelope = signed(&m, &[&a]);

    let before = Checks {
        now: expires.system_time() - Duration::from_secs(1),
        ..open_checks()
    };
    assert!(trust.verify(&envelope, &before).is_ok());
    let at = Checks {
        now: expires.system_time(),
        ..open_checks()
    };
    match trust.verify(&envelope, &at) {
        Err(VerifyError::Expired { expires: e }) => assert_eq!(e, expires),
        other => panic!("expected Expired, got {other:?}"),
    }
}

#[test]
fn a_release_for_another_target_is_refused() {
    let a = key(1);
    let trust = policy(&[&a], 1);
    let envelope = signed(&manifest(), &[&a]);
    let x86 = Target::new("x86_64-unknown-linux-gnu").unwrap();
    let armv7 = Target::new(ARMV7_TARGET).unwrap();

    let wrong = trust.verify(
        &envelope,
        &Checks {
            target: Some(&x86),
            ..open_checks()
        },
    );
    match wrong {
        Err(VerifyError::WrongTarget { release, device }) => {
            assert_eq!(release, armv7);
            assert_eq!(device, x86);
        }
        other => panic!("expected WrongTarget, got {other:?}"),
    }
    let right = trust.verify(
        &envelope,
        &Checks {
            target: Some(&armv7),
            ..open_checks()
        },
    );
    assert!(right.is_ok());
}

#[test]
fn a_signature_over_another_domain_does_not_verify() {
    // The same key signing the bare manifest bytes (no domain tag) must not
    // produce a signature Ferry accepts.
    use ed25519_dalek::Signer;
    let seed = [1u8; 32];
    let bare = ed25519_dalek::SigningKey::from_bytes(&seed).sign(&manifest().to_json());
    let mut envelope = signed(&manifest(), &[&key(1)]);
    envelope.signatures[0].sig = bare.to_bytes();
    let result = policy(&[&key(1)], 1).verify(&envelope, &open_checks());
    assert!(
        matches!(result, Err(VerifyError::BadSignature { .. })),
        "{result:?}"
    );
}

#[test]
fn errors_read_as_one_line_an_operator_can_act_on() {
    let a = key(1);
    let e = policy(&[&a], 1)
        .verify(&signed(&manifest(), &[&key(2)]), &open_checks())
        .unwrap_err();
    let text = e.to_string();
    assert!(text.starts_with("signed only by unknown key(s) "), "{text}");
    assert!(!text.contains('\n'));
}

/// Envelope bytes with the manifest replaced by `manifest_bytes` but the
/// signatures kept, as an attacker who edits a manifest would produce.
fn with_manifest_bytes(envelope: &Envelope, manifest_bytes: &[u8]) -> Vec<u8> {
    use base64::Engine;
    let mut json: serde_json::Value = serde_json::from_slice(&envelope.to_json()).unwrap();
    json["manifest"] = base64::engine::general_purpose::STANDARD
        .encode(manifest_bytes)
        .into();
    serde_json::to_vec(&json).unwrap()
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn any_changed_manifest_byte_fails(index in any::<prop::sample::Index>(), flip in 1u8..=255) {
        let a = key(1);
        let envelope = signed(&manifest(), &[&a]);
        let mut bytes = envelope.manifest_bytes().to_vec();
        let i = index.index(bytes.len());
        bytes[i] ^= flip;
        let tampered = with_manifest_bytes(&envelope, &bytes);
        let result = policy(&[&a], 1).verify_json(&tampered, &open_checks());
        prop_assert!(
            matches!(result, Err(VerifyError::BadSignature { .. })),
            "byte {} ^ {:#x}: {:?}", i, flip, result
        );
    }

    #[test]
    fn any_changed_signature_byte_fails(index in 0usize..64, flip in 1u8..=255) {
        let a = key(1);
        let mut envelope = signed(&manifest(), &[&a]);
        envelope.signatures[0].sig[index] ^= flip;
        let result = policy(&[&a], 1).verify_json(&envelope.to_json(), &open_checks());
        prop_assert!(
            matches!(result, Err(VerifyError::BadSignature { .. })),
            "byte {} ^ {:#x}: {:?}", index, flip, result
        );
    }

    #[test]
    fn a_truncated_or_extended_manifest_fails(cut in 1usize..64, extra in prop::collection::vec(any::<u8>(), 1..16)) {
        let a = key(1);
        let envelope = signed(&manifest(), &[&a]);
        let bytes = envelope.manifest_bytes();
        let trust = policy(&[&a], 1);
        let shorter = with_manifest_bytes(&envelope, &bytes[..bytes.len() - cut]);
        let result = trust.verify_json(&shorter, &open_checks());
        prop_assert!(matches!(result, Err(VerifyError::BadSignature { .. })), "{:?}", result);
        let longer = with_manifest_bytes(&envelope, &[bytes, &extra[..]].concat());
        let result = trust.verify_json(&longer, &open_checks());
        prop_assert!(matches!(result, Err(VerifyError::BadSignature { .. })), "{:?}", result);
    }

    #[test]
    fn any_changed_envelope_byte_never_verifies_something_else(index in any::<prop::sample::Index>(), flip in 1u8..=255) {
        // Flipping a byte of the envelope file either still verifies the very
        // same manifest (a change to JSON layout, say) or fails: it can never
        // yield a different manifest that verifies.
        let a = key(1);
        let mut bytes = signed(&manifest(), &[&a]).to_json();
        let i = index.index(bytes.len());
        bytes[i] ^= flip;
        if let Ok(release) = policy(&[&a], 1).verify_json(&bytes, &open_checks()) {
            prop_assert_eq!(release.manifest, manifest());
        }
    }

    #[test]
    fn threshold_counts_distinct_trusted_keys(signers in prop::collection::vec(0u8..5, 0..8), threshold in 1usize..=3) {
        // Keys 1..=3 are trusted; 0 and 4 are strangers.
        let trusted: Vec<SecretKey> = (1..=3).map(key).collect();
        let trust = TrustPolicy::new(trusted.iter().map(SecretKey::public_key), threshold).unwrap();
        let keys: Vec<SecretKey> = signers.iter().map(|&n| key(n)).collect();
        let refs: Vec<&SecretKey> = keys.iter().collect();
        prop_assume!(!refs.is_empty());
        let envelope = signed(&manifest(), &refs);
        let distinct_trusted = signers.iter().filter(|n| (1..=3).contains(*n))
            .collect::<std::collections::BTreeSet<_>>().len();
        let result = trust.verify(&envelope, &open_checks());
        prop_assert_eq!(result.is_ok(), distinct_trusted >= threshold, "{:?}", result);
    }
}

#[test]
fn public_keys_read_back_from_text_verify_the_same() {
    let a = key(1);
    let from_text = PublicKey::from_text(&a.public_key().to_text()).unwrap();
    let trust = TrustPolicy::new([from_text], 1).unwrap();
    assert!(
        trust
            .verify(&signed(&manifest(), &[&a]), &open_checks())
            .is_ok()
    );
}
