//! The trust root: which release keys a device believes, and how that list
//! changes without anyone touching the device.
//!
//! A [`Root`] is a versioned document naming the release keys (and their
//! threshold) and the root keys (and theirs) that may sign the next
//! version. It travels as a [`SignedRoot`]: its exact bytes and ed25519
//! signatures over [`ROOT_SIGNATURE_DOMAIN`] followed by them, a domain of
//! its own, so no release signature can pass for a root signature.
//!
//! A device holds root N and accepts N+1 only when a threshold of N's root
//! keys *and* a threshold of N+1's root keys signed it ([`verify_next`]),
//! one version at a time; versions never go down. Revoking a release key is
//! publishing N+1 without it. A root's root keys and release keys must be
//! distinct: a release key, kept online to sign releases, can never sign a
//! root.

use std::collections::BTreeSet;

use serde::{Deserialize, Serialize};

use crate::decode::{DecodeError, check_schema, decode_json};
use crate::envelope::{Signature, add_signature_to, domain_message};
use crate::keys::{KeyId, PublicKey, SecretKey};
use crate::trust::{PolicyError, TrustPolicy};

/// The root schema this build writes and reads.
pub const ROOT_SCHEMA: u32 = 1;

/// Prefix of every signed root.
pub const ROOT_SIGNATURE_DOMAIN: &[u8] = b"ferry trust root v1\0";

/// The largest signed root accepted, in bytes.
pub const MAX_ROOT_BYTES: usize = 32 * 1024;

/// The most keys of each kind, and signatures, a root may carry.
pub const MAX_ROOT_KEYS: usize = 16;

const WHAT: &str = "trust root";

/// One version of the trust root.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(deny_unknown_fields)]
pub struct Root {
    /// Root schema version: 1 for this format.
    pub schema: u32,
    /// 1 for the first root, then one more for each.
    pub version: u64,
    /// The keys that sign the next root (`.pub` lines); kept offline.
    pub root_keys: Vec<String>,
    /// Distinct root keys that must sign the next root.
    pub root_threshold: usize,
    /// The keys that sign releases (`.pub` lines).
    pub release_keys: Vec<String>,
    /// Distinct release keys that must sign a release.
    pub release_threshold: usize,
}

/// Why a root was refused. Each message says what is wrong with it.
#[derive(Debug, thiserror::Error)]
pub enum RootError {
    /// It does not read.
    #[error("malformed trust root: {0}")]
    Malformed(#[from] DecodeError),
    /// Its keys or thresholds could never work.
    #[error("trust root version {version}: {reason}")]
    Invalid {
        /// Its version.
        version: u64,
        /// What is wrong.
        reason: String,
    },
    /// Not the version that comes next.
    #[error(
        "trust root version {found} does not follow version {trusted} (roots are accepted one version at a time, never lower)"
    )]
    NotNext {
        /// The version offered.
        found: u64,
        /// The version held.
        trusted: u64,
    },
    /// Too few signatures by the keys that had to sign.
    #[error(
        "trust root version {version} is signed by {valid} of the {which} root keys, {required} required"
    )]
    BelowThreshold {
        /// The version offered.
        version: u64,
        /// "previous" or "its own".
        which: &'static str,
        /// Distinct valid signatures by those keys.
        valid: usize,
        /// Their threshold.
        required: usize,
    },
}

impl Root {
    /// Reads and checks a root's bytes: keys that parse, thresholds that
    /// can be met, root keys and release keys distinct.
    pub fn from_json(bytes: &[u8]) -> Result<Self, RootError> {
        let root: Root = decode_json(WHAT, bytes, MAX_ROOT_BYTES)?;
        check_schema(WHAT, root.schema, ROOT_SCHEMA)?;
        root.check()?;
        Ok(root)
    }

    /// The root as pretty JSON: the bytes that get signed.
    pub fn to_json(&self) -> Vec<u8> {
        let mut out = serde_json::to_vec_pretty(self).unwrap_or_default();
        out.push(b'\n');
        out
    }

    fn invalid(&self, reason: impl Into<String>) -> RootError {
        RootError::Invalid {
            version: self.version,
            reason: reason.into(),
        }
    }

    fn check(&self) -> Result<(), RootError> {
        if self.version == 0 {
            return Err(self.invalid("versions start at 1"));
        }
        let root = self.root_keys()?;
        let release = self.release_key_list()?;
        for (keys, threshold, kind) in [
            (&root, self.root_threshold, "root"),
            (&release, self.release_threshold, "release"),
        ] {
            let distinct: BTreeSet<KeyId> = keys.iter().map(PublicKey::id).collect();
            if distinct.is_empty() || distinct.len() > MAX_ROOT_KEYS {
                return Err(self.invalid(format!("1 to {MAX_ROOT_KEYS} {kind} keys needed")));
            }
            if threshold == 0 || threshold > distinct.len() {
                return Err(self.invalid(format!(
                    "{kind} threshold {threshold} cannot be met by {} distinct key(s)",
                    distinct.len()
                )));
            }
        }
        if let Some(shared) = root
            .iter()
            .find(|k| release.iter().any(|r| r.id() == k.id()))
        {
            return Err(self.invalid(format!(
                "key {} is both a root key and a release key: a release key must never sign a root",
                shared.id()
            )));
        }
        Ok(())
    }

    fn parse(&self, lines: &[String]) -> Result<Vec<PublicKey>, RootError> {
        lines
            .iter()
            .map(|line| PublicKey::from_text(line).map_err(|e| self.invalid(format!("a key: {e}"))))
            .collect()
    }

    /// The root keys.
    pub fn root_keys(&self) -> Result<Vec<PublicKey>, RootError> {
        self.parse(&self.root_keys)
    }

    fn release_key_list(&self) -> Result<Vec<PublicKey>, RootError> {
        self.parse(&self.release_keys)
    }

    /// The release keys and threshold, as the policy releases are checked
    /// against.
    pub fn release_policy(&self) -> Result<TrustPolicy, RootError> {
        TrustPolicy::new(self.release_key_list()?, self.release_threshold)
            .map_err(|e: PolicyError| self.invalid(e.to_string()))
    }
}

/// A root's exact bytes and the signatures over them.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(deny_unknown_fields)]
pub struct SignedRoot {
    /// Schema version: 1 for this format.
    pub schema: u32,
    /// The root's exact bytes, base64 on the wire.
    #[serde(with = "crate::envelope::base64_bytes")]
    #[cfg_attr(feature = "schema", schemars(with = "String"))]
    root: Vec<u8>,
    /// Signatures over [`ROOT_SIGNATURE_DOMAIN`] and the root bytes.
    pub signatures: Vec<Signature>,
}

fn signed_message(root: &[u8]) -> Vec<u8> {
    domain_message(ROOT_SIGNATURE_DOMAIN, root)
}

impl SignedRoot {
    /// `root`, not yet signed.
    pub fn new(root: &Root) -> Result<Self, RootError> {
        root.check()?;
        Ok(Self {
            schema: ROOT_SCHEMA,
            root: root.to_json(),
            signatures: Vec::new(),
        })
    }

    /// Adds `key`'s signature, replacing an earlier one by the same key.
    pub fn add_signature(&mut self, key: &SecretKey) {
        let message = signed_message(&self.root);
        add_signature_to(&mut self.signatures, key, &message);
    }

    /// Reads a signed root from JSON; nothing is verified yet.
    pub fn from_json(bytes: &[u8]) -> Result<Self, RootError> {
        let signed: Self = decode_json(WHAT, bytes, MAX_ROOT_BYTES)?;
        check_schema(WHAT, signed.schema, ROOT_SCHEMA)?;
        if signed.signatures.len() > MAX_ROOT_KEYS * 2 {
            return Err(DecodeError::invalid(WHAT, "too many signatures").into());
        }
        Ok(signed)
    }

    /// As pretty JSON with a final newline.
    pub fn to_json(&self) -> Vec<u8> {
        let mut out = serde_json::to_vec_pretty(self).unwrap_or_default();
        out.push(b'\n');
        out
    }

    /// The root it carries, checked for shape but not for signatures: for
    /// showing, never for trusting.
    pub fn unverified(&self) -> Result<Root, RootError> {
        Root::from_json(&self.root)
    }

    /// How many of `keys` (each counted once) signed these bytes validly.
    fn valid_signatures(&self, keys: &[PublicKey]) -> usize {
        let message = signed_message(&self.root);
        let signed: BTreeSet<KeyId> = keys
            .iter()
            .filter(|key| {
                self.signatures
                    .iter()
                    .any(|s| s.key_id == key.id() && key.verify_strict(&message, &s.sig))
            })
            .map(PublicKey::id)
            .collect();
        signed.len()
    }

    fn check_threshold(
        &self,
        root: &Root,
        keys: &Root,
        which: &'static str,
    ) -> Result<(), RootError> {
        let valid = self.valid_signatures(&keys.root_keys()?);
        if valid < keys.root_threshold {
            return Err(RootError::BelowThreshold {
                version: root.version,
                which,
                valid,
                required: keys.root_threshold,
            });
        }
        Ok(())
    }
}

/// Checks a first root, provisioned with the device: signed by a threshold
/// of its own root keys (so that what was provisioned is what its keys
/// meant).
pub fn verify_first(signed: &SignedRoot) -> Result<Root, RootError> {
    let root = signed.unverified()?;
    signed.check_threshold(&root, &root, "its own")?;
    Ok(root)
}

/// Checks `next` against the root held: exactly one version more, signed by
/// a threshold of the held root's keys and of its own.
pub fn verify_next(trusted: &Root, next: &SignedRoot) -> Result<Root, RootError> {
    let root = next.unverified()?;
    if root.version != trusted.version.saturating_add(1) {
        return Err(RootError::NotNext {
            found: root.version,
            trusted: trusted.version,
        });
    }
    next.check_threshold(&root, trusted, "previous")?;
    next.check_threshold(&root, &root, "its own")?;
    Ok(root)
}

/// Walks `offered` (any order, any versions) from `trusted`, one version at
/// a time: the newest root reached, and each root accepted on the way (in
/// order). Roots at or below the held version are ignored; the walk stops
/// at the first refusal, which is returned beside what was accepted.
pub fn walk(
    trusted: &Root,
    offered: &[SignedRoot],
) -> (Vec<(Root, SignedRoot)>, Option<RootError>) {
    // Each offered root read once; only the versions above the held one matter.
    let newer: Vec<(u64, &SignedRoot)> = offered
        .iter()
        .filter_map(|s| s.unverified().ok().map(|r| (r.version, s)))
        .filter(|(version, _)| *version > trusted.version)
        .collect();
    let mut held = trusted.clone();
    let mut accepted = Vec::new();
    loop {
        let wanted = held.version.saturating_add(1);
        let Some((_, next)) = newer.iter().find(|(version, _)| *version == wanted) else {
            // A newer root that is not the next one: the chain has a gap.
            let gap = newer
                .iter()
                .find(|(version, _)| *version > held.version)
                .map(|(version, _)| RootError::NotNext {
                    found: *version,
                    trusted: held.version,
                });
            return (accepted, gap);
        };
        match verify_next(&held, next) {
            Ok(root) => {
                held = root.clone();
                accepted.push((root, (*next).clone()));
            }
            Err(e) => return (accepted, Some(e)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(n: u8) -> SecretKey {
        SecretKey::from_seed(&[n; 32])
    }

    fn root(version: u64, root_keys: &[u8], root_threshold: usize, release: &[u8]) -> Root {
        Root {
            schema: ROOT_SCHEMA,
            version,
            root_keys: root_keys
                .iter()
                .map(|n| key(*n).public_key().to_text())
                .collect(),
            root_threshold,
            release_keys: release
                .iter()
                .map(|n| key(*n).public_key().to_text())
                .collect(),
            release_threshold: 1,
        }
    }

    fn signed(root: &Root, by: &[u8]) -> SignedRoot {
        let mut s = SignedRoot::new(root).unwrap();
        for n in by {
            s.add_signature(&key(*n));
        }
        s
    }

    #[test]
    fn a_root_is_accepted_only_when_the_old_and_the_new_root_keys_sign_it() {
        let v1 = root(1, &[1, 2], 2, &[10]);
        assert_eq!(verify_first(&signed(&v1, &[1, 2])).unwrap(), v1);
        assert!(matches!(
            verify_first(&signed(&v1, &[1])),
            Err(RootError::BelowThreshold {
                valid: 1,
                required: 2,
                ..
            })
        ));
        // v2 rotates root key 2 out for 3, and release key 10 for 11.
        let v2 = root(2, &[1, 3], 2, &[11]);
        assert_eq!(verify_next(&v1, &signed(&v2, &[1, 2, 3])).unwrap(), v2);
        // The old keys alone, or the new ones alone, are not enough.
        for by in [&[1, 2][..], &[1, 3][..], &[3][..]] {
            let err = verify_next(&v1, &signed(&v2, by)).unwrap_err();
            assert!(
                matches!(err, RootError::BelowThreshold { .. }),
                "{by:?}: {err}"
            );
        }
        // The same key twice counts once.
        let mut twice = signed(&v2, &[1, 3]);
        twice.signatures.push(twice.signatures[0].clone());
        assert!(verify_next(&v1, &twice).is_err());
        // One version at a time, never back.
        let v3 = root(3, &[1, 3], 2, &[11]);
        assert!(matches!(
            verify_next(&v1, &signed(&v3, &[1, 2, 3])),
            Err(RootError::NotNext {
                found: 3,
                trusted: 1
            })
        ));
        assert!(matches!(
            verify_next(&v2, &signed(&v1, &[1, 2])),
            Err(RootError::NotNext {
                found: 1,
                trusted: 2
            })
        ));
    }

    #[test]
    fn release_keys_can_never_sign_a_root() {
        // A root naming a key as both kinds is refused.
        let both = root(1, &[1], 1, &[1]);
        assert!(SignedRoot::new(&both).is_err());
        // A release key's signature does not count toward a root's.
        let v1 = root(1, &[1], 1, &[10]);
        let v2 = root(2, &[1], 1, &[10]);
        assert!(verify_next(&v1, &signed(&v2, &[10])).is_err());
        // And a release signature over the same bytes is no root signature
        // (another domain).
        let mut forged = SignedRoot::new(&v2).unwrap();
        let release_sig = key(1).sign(&crate::envelope::signed_message(&v2.to_json()));
        forged.signatures.push(Signature {
            key_id: key(1).public_key().id(),
            sig: release_sig,
        });
        assert!(verify_next(&v1, &forged).is_err());
    }

    #[test]
    fn a_walk_takes_the_chain_in_order_and_stops_at_a_bad_link() {
        let v1 = root(1, &[1], 1, &[10]);
        let v2 = root(2, &[2], 1, &[11]);
        let v3 = root(3, &[3], 1, &[12]);
        let s2 = signed(&v2, &[1, 2]);
        let s3 = signed(&v3, &[2, 3]);
        // Out of order, with an old one: v2 then v3.
        let (accepted, error) = walk(&v1, &[s3.clone(), signed(&v1, &[1]), s2.clone()]);
        assert!(error.is_none(), "{error:?}");
        let versions: Vec<u64> = accepted.iter().map(|(r, _)| r.version).collect();
        assert_eq!(versions, [2, 3]);
        // A gap: v3 without v2.
        let (accepted, error) = walk(&v1, &[s3]);
        assert!(accepted.is_empty());
        assert!(matches!(
            error,
            Some(RootError::NotNext {
                found: 3,
                trusted: 1
            })
        ));
        // A bad v3 after a good v2: v2 kept, v3 refused.
        let bad3 = signed(&v3, &[3]);
        let (accepted, error) = walk(&v1, &[s2, bad3]);
        assert_eq!(accepted.len(), 1);
        assert!(matches!(error, Some(RootError::BelowThreshold { .. })));
        // The release policy of a root is its release keys.
        let policy = v2.release_policy().unwrap();
        assert_eq!(policy.key_ids().count(), 1);
    }
}
