//! Ferry's wire contract, shared by the agent and the manager.
//!
//! This crate is pure: bytes in, values out. It opens no file or socket and
//! reads no clock; callers pass the current time where a check needs it.
//!
//! - [`names`]: device ids, service names, target triples and relative paths,
//!   each built through one checking constructor.
//! - [`topics`]: the MQTT topic table (`ferry/v1/devices/{id}/...`).
//! - [`manifest`]: what a release is.
//! - [`keys`], [`envelope`], [`trust`]: how a release is signed and how a
//!   device decides whether to believe it.
//! - [`root`]: the versioned trust root that rotates release keys.
//! - [`enrol`]: how a device gets and renews its client certificate.
//! - [`digest`]: SHA-256 digests and the streaming artifact check.
//! - [`elf`]: whether an executable's ELF header fits a target.
//! - [`messages`]: desired, reported, events, health, status and block
//!   request payloads.
//! - [`blocks`]: artifact blocks over MQTT, for devices that reach only the
//!   broker.
//! - [`schema`] (feature `schema`): JSON Schema for the published payloads.
#![deny(missing_docs)]

pub mod acl;
pub mod blocks;
pub mod decode;
pub mod digest;
pub mod elf;
pub mod enrol;
pub mod envelope;
pub mod keys;
pub mod manifest;
pub mod messages;
pub mod names;
pub mod root;
#[cfg(feature = "schema")]
pub mod schema;
mod text;
pub mod time;
pub mod topics;
pub mod trust;

pub use decode::DecodeError;
pub use digest::Sha256Digest;
pub use envelope::Envelope;
pub use keys::{KeyId, PublicKey, SecretKey};
pub use manifest::Manifest;
pub use names::{DeviceId, DevicePath, EnvName, NameError, RelPath, ServiceName, Target, UserName};
pub use time::Timestamp;
pub use trust::{Checks, TrustPolicy, VerifiedRelease, VerifyError};
