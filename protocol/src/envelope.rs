//! The signed envelope: a manifest's exact bytes plus signatures over them.
//!
//! ```json
//! {
//!   "schema": 1,
//!   "manifest": "<base64 of the manifest file's bytes>",
//!   "signatures": [{ "key_id": "<32 hex>", "sig": "<base64 of 64 bytes>" }]
//! }
//! ```
//!
//! The manifest travels as base64 so that no JSON layer between the packager
//! and the device can re-format it: what is checked is byte for byte what
//! was signed. Each signature is ed25519 over [`SIGNATURE_DOMAIN`] followed by
//! those bytes, so a Ferry signature can never be mistaken for a signature
//! over anything else made with the same key.

use base64::engine::general_purpose::STANDARD as BASE64;
use serde::{Deserialize, Serialize};

use crate::decode::{DecodeError, check_schema, decode_json};
use crate::keys::{KeyId, SecretKey};
use crate::manifest::Manifest;

/// The envelope schema version this build writes and reads.
pub const ENVELOPE_SCHEMA: u32 = 1;

/// Prefix of every signed message.
pub const SIGNATURE_DOMAIN: &[u8] = b"ferry release manifest v1\0";

/// The largest envelope accepted, in bytes.
pub const MAX_ENVELOPE_BYTES: usize = 128 * 1024;

/// The most signatures an envelope may carry; each costs a verification.
pub const MAX_SIGNATURES: usize = 16;

const WHAT: &str = "signed envelope";

/// A manifest and its signatures.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(deny_unknown_fields)]
pub struct Envelope {
    /// Envelope schema version: 1 for this format.
    pub schema: u32,
    /// The manifest's exact bytes, base64 on the wire.
    #[serde(with = "base64_bytes")]
    #[cfg_attr(feature = "schema", schemars(with = "String"))]
    manifest: Vec<u8>,
    /// Signatures over [`SIGNATURE_DOMAIN`] and the manifest bytes.
    pub signatures: Vec<Signature>,
}

/// One key's signature.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(deny_unknown_fields)]
pub struct Signature {
    /// Id of the key that signed.
    pub key_id: KeyId,
    /// The 64-byte ed25519 signature, base64 on the wire.
    #[serde(with = "base64_signature")]
    #[cfg_attr(feature = "schema", schemars(with = "String"))]
    pub sig: [u8; 64],
}

/// The message a key signs for `manifest`: the domain tag, then the bytes.
pub(crate) fn signed_message(manifest: &[u8]) -> Vec<u8> {
    domain_message(SIGNATURE_DOMAIN, manifest)
}

/// `domain` then `bytes`: what a key signs, so a signature made for one
/// kind of document can never pass for another's.
pub(crate) fn domain_message(domain: &[u8], bytes: &[u8]) -> Vec<u8> {
    let mut message = Vec::with_capacity(domain.len() + bytes.len());
    message.extend_from_slice(domain);
    message.extend_from_slice(bytes);
    message
}

/// Adds `key`'s signature over `message` to `signatures`, replacing an
/// earlier one by the same key.
pub(crate) fn add_signature_to(signatures: &mut Vec<Signature>, key: &SecretKey, message: &[u8]) {
    let key_id = key.public_key().id();
    let sig = key.sign(message);
    signatures.retain(|s| s.key_id != key_id);
    signatures.push(Signature { key_id, sig });
}

impl Envelope {
    /// Signs `manifest` (its exact bytes) with each key. The bytes must be a
    /// valid manifest: signing something no device would accept helps nobody.
    pub fn sign(manifest: Vec<u8>, keys: &[&SecretKey]) -> Result<Self, DecodeError> {
        Manifest::from_json(&manifest)?;
        let mut envelope = Self {
            schema: ENVELOPE_SCHEMA,
            manifest,
            signatures: Vec::new(),
        };
        for key in keys {
            envelope.add_signature(key);
        }
        Ok(envelope)
    }

    /// Adds `key`'s signature, replacing an earlier one by the same key.
    /// This is how signatures are gathered from operators who each hold one key.
    pub fn add_signature(&mut self, key: &SecretKey) {
        let message = signed_message(&self.manifest);
        add_signature_to(&mut self.signatures, key, &message);
    }

    /// Reads an envelope from JSON. Nothing is verified yet: pass it to
    /// [`crate::TrustPolicy::verify`].
    pub fn from_json(bytes: &[u8]) -> Result<Self, DecodeError> {
        let envelope: Self = decode_json(WHAT, bytes, MAX_ENVELOPE_BYTES)?;
        check_schema(WHAT, envelope.schema, ENVELOPE_SCHEMA)?;
        if envelope.signatures.is_empty() {
            return Err(DecodeError::invalid(WHAT, "it carries no signature"));
        }
        if envelope.signatures.len() > MAX_SIGNATURES {
            return Err(DecodeError::invalid(
                WHAT,
                format!(
                    "{} signatures is over the limit of {MAX_SIGNATURES}",
                    envelope.signatures.len()
                ),
            ));
        }
        Ok(envelope)
    }

    /// The envelope as pretty JSON with a final newline.
    pub fn to_json(&self) -> Vec<u8> {
        let mut out = serde_json::to_vec_pretty(self).unwrap_or_default();
        out.push(b'\n');
        out
    }

    /// The manifest's bytes exactly as signed.
    pub fn manifest_bytes(&self) -> &[u8] {
        &self.manifest
    }

    /// The manifest parsed *without* checking any signature: for showing an
    /// operator what an envelope claims, never for deciding to install it.
    pub fn unverified_manifest(&self) -> Result<Manifest, DecodeError> {
        Manifest::from_json(&self.manifest)
    }
}

/// Bytes as base64 in JSON (`#[serde(with)]`), for signed documents
/// that carry exact bytes.
pub(crate) mod base64_bytes {
    use super::BASE64;
    use base64::Engine as _;
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(bytes: &[u8], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&BASE64.encode(bytes))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u8>, D::Error> {
        let text = <std::borrow::Cow<'de, str>>::deserialize(d)?;
        BASE64
            .decode(text.as_bytes())
            .map_err(|e| serde::de::Error::custom(format!("invalid base64: {e}")))
    }
}

mod base64_signature {
    use serde::{Deserializer, Serializer};

    pub fn serialize<S: Serializer>(sig: &[u8; 64], s: S) -> Result<S::Ok, S::Error> {
        super::base64_bytes::serialize(sig, s)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<[u8; 64], D::Error> {
        let bytes = super::base64_bytes::deserialize(d)?;
        let len = bytes.len();
        bytes.try_into().map_err(|_| {
            serde::de::Error::custom(format!("a signature is 64 bytes, this one is {len}"))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::manifest::tests::sample;

    #[test]
    fn json_round_trip_keeps_exact_manifest_bytes() {
        // Odd spacing on purpose: the bytes must survive untouched.
        let manifest = String::from_utf8(sample().to_json())
            .unwrap()
            .replace("  ", "\t");
        let key = SecretKey::from_seed(&[1; 32]);
        let env = Envelope::sign(manifest.clone().into_bytes(), &[&key]).unwrap();
        let back = Envelope::from_json(&env.to_json()).unwrap();
        assert_eq!(back.manifest_bytes(), manifest.as_bytes());
        assert_eq!(back, env);
    }

    #[test]
    fn signing_again_with_a_key_replaces_its_signature() {
        let a = SecretKey::from_seed(&[1; 32]);
        let b = SecretKey::from_seed(&[2; 32]);
        let mut env = Envelope::sign(sample().to_json(), &[&a]).unwrap();
        env.add_signature(&b);
        env.add_signature(&a);
        assert_eq!(env.signatures.len(), 2);
    }

    #[test]
    fn refuses_to_sign_an_invalid_manifest() {
        let key = SecretKey::from_seed(&[1; 32]);
        assert!(Envelope::sign(b"{}".to_vec(), &[&key]).is_err());
    }

    #[test]
    fn refuses_malformed_envelopes() {
        let key = SecretKey::from_seed(&[1; 32]);
        let good = String::from_utf8(
            Envelope::sign(sample().to_json(), &[&key])
                .unwrap()
                .to_json(),
        )
        .unwrap();
        let sig = &good[good.find("\"sig\": \"").unwrap() + 8..];
        let sig = &sig[..sig.find('"').unwrap()];
        let cases = [
            good.replacen(sig, "AAAA", 1),
            good.replacen("\"schema\": 1", "\"schema\": 9", 1),
            good.replacen("\"manifest\": \"", "\"manifest\": \"!", 1),
            good.replacen("\"key_id\": \"", "\"key_id\": \"zz", 1),
            good.replacen("\"schema\": 1", "\"schema\": 1, \"extra\": 0", 1),
            r#"{"schema":1,"manifest":"","signatures":[]}"#.to_string(),
            "not json".to_string(),
        ];
        for case in cases {
            assert_ne!(case, good);
            assert!(
                Envelope::from_json(case.as_bytes()).is_err(),
                "accepted:\n{case}"
            );
        }
    }
}
