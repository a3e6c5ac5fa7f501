//! Ferry's manager and operator command line.
//!
//! - [`cli`]: the `ferry` subcommands; each module is one command's glue
//!   over `ferry-protocol` (keys, signing, verification) and `ferry-cross`
//!   (packaging).
//! - [`files`]: reading and writing the operator's files safely.
//! - [`serve`]: `ferry serve`, the manager: broker, ingestion, API, store.
//! - [`client`]: how the CLI finds and talks to a manager.
//! - [`demo`]: `ferry demo`, a manager and two agents on one machine.
#![deny(missing_docs)]

pub mod cli;
pub mod client;
pub mod demo;
pub mod files;
pub mod serve;
