//! The one error for "these bytes are not a valid X".
//!
//! Every payload Ferry reads from the network or a file goes through
//! [`decode_json`]: its size is checked before it is parsed, and the error
//! names what was being read.

use serde::de::DeserializeOwned;

/// Bytes that could not be read as the named payload.
#[derive(Debug, thiserror::Error)]
#[error("{what}: {kind}")]
pub struct DecodeError {
    /// What was being read, e.g. "release manifest" or "health report".
    pub what: &'static str,
    /// Why it could not be read.
    pub kind: DecodeErrorKind,
}

/// Why a payload could not be read.
#[derive(Debug, thiserror::Error)]
pub enum DecodeErrorKind {
    /// Larger than this payload may ever be; not parsed at all.
    #[error("{size} bytes is over the limit of {limit}")]
    TooLarge {
        /// Size of the payload.
        size: usize,
        /// The most this payload may be.
        limit: usize,
    },
    /// Not JSON, or JSON of the wrong shape.
    #[error("{0}")]
    Json(#[from] serde_json::Error),
    /// A schema version this build does not understand.
    #[error("schema version {found} is not supported (this build reads {supported})")]
    UnsupportedSchema {
        /// The version the payload declares.
        found: u32,
        /// The version this build reads.
        supported: u32,
    },
    /// Well-formed JSON whose content breaks a rule of the format.
    #[error("{0}")]
    Invalid(String),
}

impl DecodeError {
    pub(crate) fn new(what: &'static str, kind: impl Into<DecodeErrorKind>) -> Self {
        Self {
            what,
            kind: kind.into(),
        }
    }

    pub(crate) fn invalid(what: &'static str, reason: impl Into<String>) -> Self {
        Self::new(what, DecodeErrorKind::Invalid(reason.into()))
    }
}

/// Parses `bytes` as JSON after checking them against `limit`.
pub(crate) fn decode_json<T: DeserializeOwned>(
    what: &'static str,
    bytes: &[u8],
    limit: usize,
) -> Result<T, DecodeError> {
    if bytes.len() > limit {
        return Err(DecodeError::new(
            what,
            DecodeErrorKind::TooLarge {
                size: bytes.len(),
                limit,
            },
        ));
    }
    serde_json::from_slice(bytes).map_err(|e| DecodeError::new(what, e))
}

/// Refuses a schema version other than `supported`.
pub(crate) fn check_schema(
    what: &'static str,
    found: u32,
    supported: u32,
) -> Result<(), DecodeError> {
    if found == supported {
        Ok(())
    } else {
        Err(DecodeError::new(
            what,
            DecodeErrorKind::UnsupportedSchema { found, supported },
        ))
    }
}
