//! Turning a service's files into a Ferry release.
//!
//! - [`package`]: packs a directory into a reproducible `.tar.gz` and writes
//!   its unsigned manifest beside it (`ferry package`).
//!
//! Building Go and C programs for ARMv7 (`ferry build go|c`) lands here too.
#![deny(missing_docs)]

pub mod package;

pub use package::{PackageError, PackageRequest, Packaged, package};
