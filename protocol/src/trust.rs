//! The trust policy: which keys a device believes, how many must agree, and
//! the checks a signed manifest must still pass before it may be installed.
//!
//! [`TrustPolicy::verify`] is the only way to get a [`VerifiedRelease`], and
//! it runs every check in one call, so no caller can forget one.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::time::SystemTime;

use crate::decode::DecodeError;
use crate::digest::Sha256Digest;
use crate::envelope::{Envelope, signed_message};
use crate::keys::{KeyId, PublicKey};
use crate::manifest::Manifest;
use crate::names::{ServiceName, Target};
use crate::time::Timestamp;

/// Public keys and how many of them must sign a release; optionally, the
/// only services this device runs.
#[derive(Debug, Clone)]
pub struct TrustPolicy {
    keys: BTreeMap<KeyId, PublicKey>,
    threshold: usize,
    services: Option<BTreeSet<ServiceName>>,
}

/// A trust policy that could never accept anything.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PolicyError {
    /// No key at all.
    #[error("a trust policy needs at least one public key")]
    NoKeys,
    /// A threshold of zero would accept unsigned releases.
    #[error("the signature threshold must be at least 1")]
    ZeroThreshold,
    /// More signatures required than there are keys.
    #[error("threshold {threshold} is more than the {keys} distinct key(s) trusted")]
    ThresholdTooHigh {
        /// The threshold asked for.
        threshold: usize,
        /// Distinct keys in the policy.
        keys: usize,
    },
}

/// Why a release was refused. Each way to fail has its own variant, and each
/// message says what an operator can do about it.
#[derive(Debug, thiserror::Error)]
pub enum VerifyError {
    /// The envelope or the manifest inside it cannot be read.
    #[error("malformed release: {0}")]
    Malformed(#[from] DecodeError),
    /// A trusted key's signature does not match the manifest bytes.
    #[error(
        "signature by trusted key {key_id} does not verify: the manifest or the signature was altered"
    )]
    BadSignature {
        /// The key whose signature failed.
        key_id: KeyId,
    },
    /// No signature is by a key this policy trusts.
    #[error("signed only by unknown key(s) {}; none is trusted here", join(.key_ids))]
    UnknownKey {
        /// The keys that did sign.
        key_ids: Vec<KeyId>,
    },
    /// Valid signatures by too few distinct trusted keys.
    #[error("signed by {valid} trusted key(s), {required} required")]
    BelowThreshold {
        /// Distinct trusted keys with a valid signature.
        valid: usize,
        /// The policy's threshold.
        required: usize,
    },
    /// The manifest's `expires` has passed.
    #[error("release expired at {expires}")]
    Expired {
        /// When it expired.
        expires: Timestamp,
    },
    /// A lower sequence than the one installed: a replay or a downgrade.
    #[error(
        "sequence {sequence} of service {service} is below the installed {installed}: refusing a rollback (to go back, publish the old artifact under a new sequence)"
    )]
    Rollback {
        /// The service.
        service: ServiceName,
        /// The release's sequence.
        sequence: u64,
        /// The sequence installed on the device.
        installed: u64,
    },
    /// The installed sequence again, but not the installed release: two
    /// different releases can never share a sequence.
    #[error(
        "sequence {sequence} of service {service} is installed here with other contents: a different release under the same sequence is refused (publish it under a new sequence)"
    )]
    SequenceReused {
        /// The service.
        service: ServiceName,
        /// The sequence both releases claim.
        sequence: u64,
    },
    /// A service this device is not meant to run.
    #[error(
        "service {service} is not one this device runs (its trust settings name: {}); a release signed for other devices is refused here",
        .allowed.join(", ")
    )]
    ServiceNotAllowed {
        /// The release's service.
        service: ServiceName,
        /// The services the device accepts.
        allowed: Vec<String>,
    },
    /// Built for another kind of device.
    #[error("release is built for {release}, not for {device}")]
    WrongTarget {
        /// The manifest's target.
        release: Target,
        /// The device's target.
        device: Target,
    },
}

fn join(ids: &[KeyId]) -> String {
    ids.iter()
        .map(KeyId::to_string)
        .collect::<Vec<_>>()
        .join(", ")
}

/// What a device has installed of one service, for the anti-rollback check.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct InstalledRelease {
    /// Its sequence: nothing below it is accepted again.
    pub sequence: u64,
    /// Its manifest's [`Manifest::digest`]: the only release accepted at
    /// that same sequence (a harmless re-send).
    pub manifest: Sha256Digest,
}

/// What each service has installed, for the anti-rollback check.
pub trait InstalledReleases {
    /// The installed release of `service`, if it is installed.
    fn installed(&self, service: &ServiceName) -> Option<InstalledRelease>;
}

/// For checks where nothing is installed (a fresh device, an offline check).
#[derive(Debug, Clone, Copy, Default)]
pub struct NothingInstalled;

impl InstalledReleases for NothingInstalled {
    fn installed(&self, _: &ServiceName) -> Option<InstalledRelease> {
        None
    }
}

impl InstalledReleases for BTreeMap<ServiceName, InstalledRelease> {
    fn installed(&self, service: &ServiceName) -> Option<InstalledRelease> {
        self.get(service).copied()
    }
}

impl InstalledReleases for HashMap<ServiceName, InstalledRelease> {
    fn installed(&self, service: &ServiceName) -> Option<InstalledRelease> {
        self.get(service).copied()
    }
}

/// What the device knows that a release is checked against.
pub struct Checks<'a> {
    /// The current time, for expiry.
    pub now: SystemTime,
    /// The device's target; `None` skips the check (operators checking offline).
    pub target: Option<&'a Target>,
    /// What is installed, for anti-rollback.
    pub installed: &'a dyn InstalledReleases,
}

/// A manifest that passed every check of a [`TrustPolicy`].
#[derive(Debug, Clone)]
pub struct VerifiedRelease {
    /// The manifest, parsed from the signed bytes.
    pub manifest: Manifest,
    /// The trusted keys whose signatures verified.
    pub signed_by: Vec<KeyId>,
}

impl TrustPolicy {
    /// A policy trusting `keys` (duplicates count once) with `threshold`
    /// distinct signatures required.
    pub fn new(
        keys: impl IntoIterator<Item = PublicKey>,
        threshold: usize,
    ) -> Result<Self, PolicyError> {
        let keys: BTreeMap<KeyId, PublicKey> = keys.into_iter().map(|k| (k.id(), k)).collect();
        if keys.is_empty() {
            return Err(PolicyError::NoKeys);
        }
        if threshold == 0 {
            return Err(PolicyError::ZeroThreshold);
        }
        if threshold > keys.len() {
            return Err(PolicyError::ThresholdTooHigh {
                threshold,
                keys: keys.len(),
            });
        }
        Ok(Self {
            keys,
            threshold,
            services: None,
        })
    }

    /// The same policy, accepting releases of `services` only (a device
    /// that knows what it runs refuses a release signed for other devices,
    /// whatever the manager sends it).
    pub fn only_services(mut self, services: impl IntoIterator<Item = ServiceName>) -> Self {
        self.services = Some(services.into_iter().collect());
        self
    }

    /// The number of distinct trusted signatures required.
    pub fn threshold(&self) -> usize {
        self.threshold
    }

    /// The trusted keys' ids.
    pub fn key_ids(&self) -> impl Iterator<Item = &KeyId> {
        self.keys.keys()
    }

    /// Reads and verifies an envelope from its JSON bytes.
    pub fn verify_json(
        &self,
        envelope: &[u8],
        checks: &Checks<'_>,
    ) -> Result<VerifiedRelease, VerifyError> {
        self.verify(&Envelope::from_json(envelope)?, checks)
    }

    /// Verifies signatures, threshold, manifest format, service (when the
    /// policy names services), target, expiry and sequence, in that order. The sequence must be above the installed
    /// one, or equal with the very manifest installed. This is what a device
    /// runs before it installs anything.
    pub fn verify(
        &self,
        envelope: &Envelope,
        checks: &Checks<'_>,
    ) -> Result<VerifiedRelease, VerifyError> {
        let release = self.verify_signatures(envelope)?;
        let manifest = &release.manifest;
        if let Some(allowed) = &self.services {
            if !allowed.contains(&manifest.service) {
                return Err(VerifyError::ServiceNotAllowed {
                    service: manifest.service.clone(),
                    allowed: allowed.iter().map(ToString::to_string).collect(),
                });
            }
        }
        if let Some(device) = checks.target {
            if manifest.target != *device {
                return Err(VerifyError::WrongTarget {
                    release: manifest.target.clone(),
                    device: device.clone(),
                });
            }
        }
        if let Some(expires) = manifest.expires {
            if checks.now >= expires.system_time() {
                return Err(VerifyError::Expired { expires });
            }
        }
        if let Some(installed) = checks.installed.installed(&manifest.service) {
            if manifest.sequence < installed.sequence {
                return Err(VerifyError::Rollback {
                    service: manifest.service.clone(),
                    sequence: manifest.sequence,
                    installed: installed.sequence,
                });
            }
            if manifest.sequence == installed.sequence && manifest.digest() != installed.manifest {
                return Err(VerifyError::SequenceReused {
                    service: manifest.service.clone(),
                    sequence: manifest.sequence,
                });
            }
        }
        Ok(release)
    }

    /// Only who signed: signatures, threshold and manifest format, none of
    /// the device's checks. For an operator who takes an old release as the
    /// base of a new one (a revert, whose own expiry replaces the old one's);
    /// devices always go through [`TrustPolicy::verify`].
    ///
    /// A signature by a trusted key that does not verify refuses the release
    /// even when others would meet the threshold: it means someone altered
    /// the envelope.
    pub fn verify_signatures(&self, envelope: &Envelope) -> Result<VerifiedRelease, VerifyError> {
        let message = signed_message(envelope.manifest_bytes());
        let mut valid = BTreeSet::new();
        let mut unknown = BTreeSet::new();
        for signature in &envelope.signatures {
            match self.keys.get(&signature.key_id) {
                None => {
                    unknown.insert(signature.key_id);
                }
                Some(key) if key.verify_strict(&message, &signature.sig) => {
                    valid.insert(signature.key_id);
                }
                Some(_) => {
                    return Err(VerifyError::BadSignature {
                        key_id: signature.key_id,
                    });
                }
            }
        }
        if valid.is_empty() && !unknown.is_empty() {
            return Err(VerifyError::UnknownKey {
                key_ids: unknown.into_iter().collect(),
            });
        }
        if valid.len() < self.threshold {
            return Err(VerifyError::BelowThreshold {
                valid: valid.len(),
                required: self.threshold,
            });
        }
        // Only now is the manifest worth parsing: it is what trusted keys signed.
        let manifest = Manifest::from_json(envelope.manifest_bytes())?;
        Ok(VerifiedRelease {
            manifest,
            signed_by: valid.into_iter().collect(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn policy_rejects_impossible_settings() {
        let k = crate::keys::SecretKey::from_seed(&[1; 32]).public_key();
        assert_eq!(TrustPolicy::new([], 1).unwrap_err(), PolicyError::NoKeys);
        assert_eq!(
            TrustPolicy::new([k.clone()], 0).unwrap_err(),
            PolicyError::ZeroThreshold
        );
        assert_eq!(
            TrustPolicy::new([k.clone(), k], 2).unwrap_err(),
            PolicyError::ThresholdTooHigh {
                threshold: 2,
                keys: 1
            }
        );
    }
}
