//! SHA-256 digests, and the check of an artifact against its manifest while
//! its bytes stream past.

use std::fmt;
use std::str::FromStr;

use sha2::{Digest, Sha256};

use crate::manifest::ArtifactInfo;
use crate::text::string_type;

/// A SHA-256 digest, written as 64 lowercase hex digits.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Sha256Digest([u8; 32]);

/// A string that is not 64 hex digits.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid sha256 {value:?}: expected 64 hex digits")]
pub struct DigestParseError {
    /// The rejected value.
    pub value: String,
}

impl Sha256Digest {
    /// The digest of `bytes`.
    pub fn of(bytes: &[u8]) -> Self {
        Self(Sha256::digest(bytes).into())
    }

    /// Wraps raw digest bytes.
    pub fn from_bytes(bytes: [u8; 32]) -> Self {
        Self(bytes)
    }

    /// The raw digest bytes.
    pub fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }

    /// The first 8 hex digits, for short names such as release directories.
    pub fn short(&self) -> String {
        hex::encode(&self.0[..4])
    }
}

impl fmt::Display for Sha256Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&hex::encode(self.0))
    }
}

impl fmt::Debug for Sha256Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Sha256Digest({self})")
    }
}

impl FromStr for Sha256Digest {
    type Err = DigestParseError;
    fn from_str(s: &str) -> Result<Self, DigestParseError> {
        let mut out = [0u8; 32];
        // Uppercase would round-trip to a different string; keep one spelling.
        if s.bytes().any(|c| c.is_ascii_uppercase()) {
            return Err(DigestParseError { value: s.into() });
        }
        hex::decode_to_slice(s, &mut out).map_err(|_| DigestParseError { value: s.into() })?;
        Ok(Self(out))
    }
}

string_type!(Sha256Digest, {
    "type": "string",
    "pattern": "^[0-9a-f]{64}$",
    "description": "A SHA-256 digest in lowercase hex."
});

/// An artifact whose bytes do not match its manifest.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ArtifactError {
    /// More bytes arrived than the manifest declares; reading was stopped.
    #[error("artifact is larger than the {expected} bytes its manifest declares")]
    TooLarge {
        /// The size the manifest declares.
        expected: u64,
    },
    /// The artifact ended at another size than the manifest declares.
    #[error("artifact is {actual} bytes, its manifest declares {expected}")]
    SizeMismatch {
        /// The size the manifest declares.
        expected: u64,
        /// The size that arrived.
        actual: u64,
    },
    /// The bytes hash to another digest than the manifest declares.
    #[error("artifact sha256 is {actual}, its manifest declares {expected}")]
    HashMismatch {
        /// The digest the manifest declares.
        expected: Sha256Digest,
        /// The digest of the bytes that arrived.
        actual: Sha256Digest,
    },
}

/// Checks an artifact against its manifest as its bytes go by, so a download
/// is hashed while it is written and stopped as soon as it runs over size.
#[derive(Clone)]
pub struct ArtifactCheck {
    expected: ArtifactInfo,
    hasher: Sha256,
    seen: u64,
}

impl ArtifactCheck {
    /// Starts a check against `expected`.
    pub fn new(expected: &ArtifactInfo) -> Self {
        Self {
            expected: expected.clone(),
            hasher: Sha256::new(),
            seen: 0,
        }
    }

    /// Feeds the next bytes; fails once more bytes have arrived than expected.
    pub fn update(&mut self, chunk: &[u8]) -> Result<(), ArtifactError> {
        self.seen = self.seen.saturating_add(chunk.len() as u64);
        if self.seen > self.expected.size {
            return Err(ArtifactError::TooLarge {
                expected: self.expected.size,
            });
        }
        self.hasher.update(chunk);
        Ok(())
    }

    /// Bytes fed so far.
    pub fn bytes_seen(&self) -> u64 {
        self.seen
    }

    /// Ends the check: the size and the digest must both match.
    pub fn finish(self) -> Result<Sha256Digest, ArtifactError> {
        if self.seen != self.expected.size {
            return Err(ArtifactError::SizeMismatch {
                expected: self.expected.size,
                actual: self.seen,
            });
        }
        let actual = Sha256Digest(self.hasher.finalize().into());
        if actual != self.expected.sha256 {
            return Err(ArtifactError::HashMismatch {
                expected: self.expected.sha256,
                actual,
            });
        }
        Ok(actual)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::manifest::ArtifactFormat;

    fn info(bytes: &[u8]) -> ArtifactInfo {
        ArtifactInfo {
            sha256: Sha256Digest::of(bytes),
            size: bytes.len() as u64,
            format: ArtifactFormat::TarGz,
        }
    }

    #[test]
    fn hex_round_trip_and_known_value() {
        let d = Sha256Digest::of(b"abc");
        assert_eq!(
            d.to_string(),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
        assert_eq!(d.to_string().parse::<Sha256Digest>().unwrap(), d);
        assert_eq!(d.short(), "ba7816bf");
        assert!(
            "BA7816BF8F01CFEA414140DE5DAE2223B00361A396177A9CB410FF61F20015AD"
                .parse::<Sha256Digest>()
                .is_err()
        );
        assert!("ba78".parse::<Sha256Digest>().is_err());
    }

    #[test]
    fn chunked_check_passes_for_the_right_bytes() {
        let data = b"hello, ferry";
        let mut check = ArtifactCheck::new(&info(data));
        for chunk in data.chunks(5) {
            check.update(chunk).unwrap();
        }
        assert_eq!(check.finish().unwrap(), Sha256Digest::of(data));
    }

    #[test]
    fn check_names_each_way_to_fail() {
        let data = b"hello, ferry";
        let mut long = ArtifactCheck::new(&info(data));
        assert_eq!(
            long.update(b"hello, ferry!"),
            Err(ArtifactError::TooLarge { expected: 12 })
        );

        let mut short = ArtifactCheck::new(&info(data));
        short.update(b"hello").unwrap();
        assert_eq!(
            short.finish(),
            Err(ArtifactError::SizeMismatch {
                expected: 12,
                actual: 5
            })
        );

        let mut altered = ArtifactCheck::new(&info(data));
        altered.update(b"hello, Ferry").unwrap();
        assert!(matches!(
            altered.finish(),
            Err(ArtifactError::HashMismatch { .. })
        ));
    }
}
