//! Turning a service into a Ferry release.
//!
//! - [`package`]: packs a directory into a reproducible `.tar.gz` and writes
//!   its unsigned manifest beside it (`ferry package`).
//! - [`build`]: cross-compiles a Go module or a C program for the ARMv7
//!   devices, checks the result as devices will, and packages it
//!   (`ferry build go|c`).
//! - [`programs`]: a release's programs against its target, as devices
//!   check them (`ferry package`, `ferry verify --artifact`).
#![deny(missing_docs)]

pub mod build;
pub mod package;
pub mod programs;

pub use build::{BuildError, BuildRequest, Built, CBuild, GoBuild, build_c, build_go};
pub use package::{PackageError, PackageRequest, Packaged, package};
