//! Device identity: how a device gets, and keeps, its client certificate.
//!
//! The device makes an ed25519 key of its own (it never leaves the device)
//! and sends an [`EnrolRequest`]: its id, the public key, the one-time
//! enrolment token `ferry device add` printed (the first time), and a
//! signature with the key over [`ENROL_SIGNATURE_DOMAIN`] and those fields,
//! which proves it holds the key. The manager answers with a short-lived
//! certificate for that key ([`EnrolResponse`], CN = the device id), issued
//! by the fleet CA. The same request without a token, signed by the key
//! the manager has on record for the device, renews it.
//!
//! A replayed request gains nothing: the certificate it yields is for the
//! device's public key, useless without the secret half.

use serde::{Deserialize, Serialize};

use crate::DeviceId;

/// What an enrolment signature covers first: no release or root signature
/// can be passed off as one, nor the other way round.
pub const ENROL_SIGNATURE_DOMAIN: &[u8] = b"ferry device enrolment v1\0";

/// A device asking for a certificate (`POST /v1/enrol`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EnrolRequest {
    /// The device asking.
    pub device_id: DeviceId,
    /// Its ed25519 public key, 32 bytes in hex.
    pub public_key: String,
    /// The one-time enrolment token, on first contact (or after the
    /// operator issued a new one); none to renew.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token: Option<String>,
    /// ed25519 over [`EnrolRequest::signed_bytes`], 64 bytes in hex.
    pub signature: String,
}

impl EnrolRequest {
    /// The bytes the device signs: the domain, then each field with its
    /// length, so no field can bleed into the next.
    pub fn signed_bytes(device_id: &DeviceId, public_key: &[u8], token: Option<&str>) -> Vec<u8> {
        let mut bytes = ENROL_SIGNATURE_DOMAIN.to_vec();
        for field in [
            device_id.as_str().as_bytes(),
            public_key,
            token.unwrap_or_default().as_bytes(),
        ] {
            bytes.extend_from_slice(&(field.len() as u32).to_be_bytes());
            bytes.extend_from_slice(field);
        }
        bytes
    }

    /// The public key, when it is 32 bytes of hex that make a valid point
    /// and the signature is its own over this request.
    pub fn verified_key(&self) -> Result<[u8; 32], EnrolError> {
        let key: [u8; 32] = hex::decode(&self.public_key)
            .ok()
            .and_then(|b| b.try_into().ok())
            .ok_or(EnrolError::BadKey)?;
        let signature: [u8; 64] = hex::decode(&self.signature)
            .ok()
            .and_then(|b| b.try_into().ok())
            .ok_or(EnrolError::BadSignature)?;
        let verifying =
            ed25519_dalek::VerifyingKey::from_bytes(&key).map_err(|_| EnrolError::BadKey)?;
        let message = Self::signed_bytes(&self.device_id, &key, self.token.as_deref());
        verifying
            .verify_strict(&message, &ed25519_dalek::Signature::from_bytes(&signature))
            .map_err(|_| EnrolError::BadSignature)?;
        Ok(key)
    }
}

/// The manager's answer: the device's certificate.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EnrolResponse {
    /// The certificate (PEM), CN = the device id, for the request's key.
    pub certificate_pem: String,
    /// From when it is valid (Unix seconds).
    pub not_before: i64,
    /// Until when (Unix seconds): the device renews well before.
    pub not_after: i64,
}

impl EnrolResponse {
    /// When to ask for the next certificate: two thirds into this one's
    /// life, leaving a third for a manager that is away for a while.
    pub fn renew_at(&self) -> i64 {
        self.not_before + (self.not_after - self.not_before).max(0) * 2 / 3
    }
}

/// Why an enrolment request is refused before any lookup.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EnrolError {
    /// The public key is not 32 bytes of hex, or not a valid point.
    #[error("the public key is not an ed25519 key in hex")]
    BadKey,
    /// The signature does not read, or is not the key's over the request.
    #[error("the request is not signed by its key")]
    BadSignature,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn signed(seed: [u8; 32], device: &str, token: Option<&str>) -> EnrolRequest {
        let key = ed25519_dalek::SigningKey::from_bytes(&seed);
        let device_id = DeviceId::new(device).unwrap();
        let public = key.verifying_key().to_bytes();
        use ed25519_dalek::Signer;
        let signature = key.sign(&EnrolRequest::signed_bytes(&device_id, &public, token));
        EnrolRequest {
            device_id,
            public_key: hex::encode(public),
            token: token.map(str::to_owned),
            signature: hex::encode(signature.to_bytes()),
        }
    }

    #[test]
    fn a_request_verifies_only_as_signed() {
        let request = signed([7; 32], "dev-1", Some("tok"));
        assert!(request.verified_key().is_ok());
        // Another device, another token, another key: each breaks it.
        let mut other = request.clone();
        other.device_id = DeviceId::new("dev-2").unwrap();
        assert_eq!(other.verified_key(), Err(EnrolError::BadSignature));
        let mut other = request.clone();
        other.token = None;
        assert_eq!(other.verified_key(), Err(EnrolError::BadSignature));
        let mut other = request.clone();
        other.public_key = signed([8; 32], "dev-1", Some("tok")).public_key;
        assert_eq!(other.verified_key(), Err(EnrolError::BadSignature));
        let mut other = request;
        other.public_key = "zz".into();
        assert_eq!(other.verified_key(), Err(EnrolError::BadKey));
    }

    #[test]
    fn fields_do_not_bleed_into_each_other() {
        let a = EnrolRequest::signed_bytes(&DeviceId::new("ab").unwrap(), b"c", None);
        let b = EnrolRequest::signed_bytes(&DeviceId::new("a").unwrap(), b"bc", None);
        assert_ne!(a, b);
    }

    #[test]
    fn renewal_is_two_thirds_in() {
        let r = EnrolResponse {
            certificate_pem: String::new(),
            not_before: 1000,
            not_after: 1000 + 86_400,
        };
        assert_eq!(r.renew_at(), 1000 + 57_600);
    }
}
