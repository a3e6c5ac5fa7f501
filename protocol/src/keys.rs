//! Release keys: ed25519 key pairs, their ids and their text files.
//!
//! Key files are one line of text, so they can be pasted and diffed:
//!
//! ```text
//! ferry-ed25519-public 3q2+7wAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=
//! ferry-ed25519-secret 3q2+7wAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=
//! ```
//!
//! Anything after the key on the line is a comment. A key's id is derived
//! from the public key alone, so it cannot be chosen to collide with another.

use std::fmt;
use std::str::FromStr;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use ed25519_dalek::{Signer as _, SigningKey, VerifyingKey};
use sha2::{Digest, Sha256};

use crate::text::string_type;

const PUBLIC_LABEL: &str = "ferry-ed25519-public";
const SECRET_LABEL: &str = "ferry-ed25519-secret";
const KEY_ID_DOMAIN: &[u8] = b"ferry key id v1\0";

/// A key file or key id that could not be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KeyError {
    /// The text does not start with the expected label.
    #[error("not a ferry {expected} key: expected a line starting with {label:?}")]
    WrongLabel {
        /// "public" or "secret".
        expected: &'static str,
        /// The label that was expected.
        label: &'static str,
    },
    /// The key material is not 32 bytes of base64.
    #[error("key is not 32 bytes of base64")]
    BadEncoding,
    /// The bytes are not a valid ed25519 public key.
    #[error("not a valid ed25519 public key")]
    InvalidPoint,
    /// A key id that is not 32 hex digits.
    #[error("invalid key id {0:?}: expected 32 hex digits")]
    BadKeyId(String),
}

/// A key's id: the first 16 bytes of SHA-256 over a domain tag and the
/// public key, written as 32 lowercase hex digits.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct KeyId([u8; 16]);

impl fmt::Display for KeyId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&hex::encode(self.0))
    }
}

impl fmt::Debug for KeyId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "KeyId({self})")
    }
}

impl FromStr for KeyId {
    type Err = KeyError;
    fn from_str(s: &str) -> Result<Self, KeyError> {
        let mut out = [0u8; 16];
        if s.bytes().any(|c| c.is_ascii_uppercase()) {
            return Err(KeyError::BadKeyId(s.into()));
        }
        hex::decode_to_slice(s, &mut out).map_err(|_| KeyError::BadKeyId(s.into()))?;
        Ok(Self(out))
    }
}

string_type!(KeyId, {
    "type": "string",
    "pattern": "^[0-9a-f]{32}$",
    "description": "Id of a release key, derived from its public key."
});

/// A public release key, as listed in a device's trust policy.
#[derive(Clone, PartialEq, Eq)]
pub struct PublicKey {
    key: VerifyingKey,
    id: KeyId,
}

impl PublicKey {
    /// Wraps raw public key bytes.
    pub fn from_bytes(bytes: &[u8; 32]) -> Result<Self, KeyError> {
        let key = VerifyingKey::from_bytes(bytes).map_err(|_| KeyError::InvalidPoint)?;
        Ok(Self::from_verifying(key))
    }

    fn from_verifying(key: VerifyingKey) -> Self {
        let mut hasher = Sha256::new();
        hasher.update(KEY_ID_DOMAIN);
        hasher.update(key.as_bytes());
        let digest = hasher.finalize();
        let mut id = [0u8; 16];
        id.copy_from_slice(&digest[..16]);
        Self { key, id: KeyId(id) }
    }

    /// The key's id.
    pub fn id(&self) -> KeyId {
        self.id
    }

    /// The raw public key bytes.
    pub fn as_bytes(&self) -> &[u8; 32] {
        self.key.as_bytes()
    }

    /// Reads a `.pub` file's text.
    pub fn from_text(text: &str) -> Result<Self, KeyError> {
        let bytes = parse_key_line(text, PUBLIC_LABEL, "public")?;
        Self::from_bytes(&bytes)
    }

    /// The `.pub` file's text, one line.
    pub fn to_text(&self) -> String {
        format!("{PUBLIC_LABEL} {}\n", BASE64.encode(self.key.as_bytes()))
    }

    /// Checks an ed25519 signature over `message`, refusing the malleable
    /// and small-order forms that plain verification lets through.
    pub(crate) fn verify_strict(&self, message: &[u8], signature: &[u8; 64]) -> bool {
        let signature = ed25519_dalek::Signature::from_bytes(signature);
        self.key.verify_strict(message, &signature).is_ok()
    }
}

impl fmt::Debug for PublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PublicKey({})", self.id)
    }
}

/// A secret release key. Operators hold these; devices and the manager never do.
pub struct SecretKey {
    key: SigningKey,
}

impl SecretKey {
    /// The key pair derived from a 32-byte seed. The caller supplies the
    /// randomness, so this crate stays free of I/O.
    pub fn from_seed(seed: &[u8; 32]) -> Self {
        Self {
            key: SigningKey::from_bytes(seed),
        }
    }

    /// The matching public key.
    pub fn public_key(&self) -> PublicKey {
        PublicKey::from_verifying(self.key.verifying_key())
    }

    /// Reads a `.key` file's text.
    pub fn from_text(text: &str) -> Result<Self, KeyError> {
        let seed = parse_key_line(text, SECRET_LABEL, "secret")?;
        Ok(Self::from_seed(&seed))
    }

    /// The `.key` file's text, one line.
    pub fn to_text(&self) -> String {
        format!("{SECRET_LABEL} {}\n", BASE64.encode(self.key.as_bytes()))
    }

    /// An ed25519 signature over `message`.
    pub(crate) fn sign(&self, message: &[u8]) -> [u8; 64] {
        self.key.sign(message).to_bytes()
    }
}

impl fmt::Debug for SecretKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SecretKey({}, redacted)", self.public_key().id)
    }
}

fn parse_key_line(
    text: &str,
    label: &'static str,
    expected: &'static str,
) -> Result<[u8; 32], KeyError> {
    let mut words = text.split_whitespace();
    if words.next() != Some(label) {
        return Err(KeyError::WrongLabel { expected, label });
    }
    let encoded = words.next().ok_or(KeyError::BadEncoding)?;
    let bytes = BASE64.decode(encoded).map_err(|_| KeyError::BadEncoding)?;
    bytes.try_into().map_err(|_| KeyError::BadEncoding)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn text_round_trip_keeps_key_and_id() {
        let secret = SecretKey::from_seed(&[7; 32]);
        let public = secret.public_key();

        let secret2 = SecretKey::from_text(&secret.to_text()).unwrap();
        assert_eq!(secret2.public_key(), public);

        let public2 = PublicKey::from_text(&public.to_text()).unwrap();
        assert_eq!(public2, public);
        assert_eq!(
            public2.id().to_string().parse::<KeyId>().unwrap(),
            public.id()
        );
        assert_eq!(public.id().to_string().len(), 32);
    }

    #[test]
    fn ids_differ_per_key() {
        let a = SecretKey::from_seed(&[1; 32]).public_key().id();
        let b = SecretKey::from_seed(&[2; 32]).public_key().id();
        assert_ne!(a, b);
    }

    #[test]
    fn refuses_wrong_files() {
        let secret = SecretKey::from_seed(&[7; 32]);
        assert!(matches!(
            PublicKey::from_text(&secret.to_text()),
            Err(KeyError::WrongLabel { .. })
        ));
        assert!(matches!(
            SecretKey::from_text(&secret.public_key().to_text()),
            Err(KeyError::WrongLabel { .. })
        ));
        assert_eq!(
            PublicKey::from_text("ferry-ed25519-public AAAA"),
            Err(KeyError::BadEncoding)
        );
        assert!(PublicKey::from_text("").is_err());
    }

    #[test]
    fn a_comment_after_the_key_is_ignored() {
        let public = SecretKey::from_seed(&[3; 32]).public_key();
        let text = format!("{} ops key, 2026\n", public.to_text().trim_end());
        assert_eq!(PublicKey::from_text(&text).unwrap(), public);
    }
}
