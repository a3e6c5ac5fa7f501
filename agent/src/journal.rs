//! The journal: the install in flight, written durably before each step
//! that changes what runs.
//!
//! Steps before the swap change nothing visible (they work in staging
//! directories), so only the steps from the swap on are journaled. On start
//! the agent reads the journal and finishes what it says:
//!
//! | phase        | written before            | recovery                                   |
//! |--------------|---------------------------|--------------------------------------------|
//! | `swapping`   | links change, restart     | redo the swap, restart, health gate again  |
//! | `committing` | state file is saved       | save the state, clear the journal          |
//! | `rolling_back` | links go back           | redo the rollback, restart the old release |
//!
//! A release interrupted in `swapping` more than [`MAX_ATTEMPTS`] times is
//! rolled back: it may be what keeps taking the device down.

use std::io;
use std::path::Path;

use ferry_protocol::Manifest;
use serde::{Deserialize, Serialize};

use crate::durable;

/// Interrupted health gates tolerated before a release is rolled back.
pub const MAX_ATTEMPTS: u32 = 3;

/// Where an install is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Phase {
    /// Pointing `current` at the new release, restarting, health gate.
    Swapping,
    /// The new release passed; the state file is being saved.
    Committing,
    /// The new release failed; `current` is going back to the old one.
    RollingBack,
}

/// One install in flight.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Entry {
    /// Where it is.
    pub phase: Phase,
    /// The verified manifest being installed.
    pub manifest: Manifest,
    /// The new release's directory name.
    pub new_dir: String,
    /// The release directory `current` pointed to before, if any.
    pub old_dir: Option<String>,
    /// The rollout it belongs to.
    pub rollout: Option<String>,
    /// How many times the swap phase has started.
    pub attempts: u32,
    /// Why it is being rolled back.
    #[serde(default)]
    pub reason: Option<String>,
}

/// Reads the journal; `None` when no install is in flight.
pub fn load(path: &Path) -> io::Result<Option<Entry>> {
    durable::read_json(path)
}

/// Records `entry` durably before its phase acts.
pub fn write(path: &Path, entry: &Entry) -> io::Result<()> {
    durable::write_json(path, entry)
}

/// Clears the journal: nothing is in flight.
pub fn clear(path: &Path) -> io::Result<()> {
    durable::remove_file(path)
}
