//! Loading key files named on the command line.

use std::path::Path;

use anyhow::{Context, Result};
use ferry_protocol::{PublicKey, SecretKey};

use crate::files::read_limited;

/// Key files are one short line; anything larger is not a key.
const MAX_KEY_FILE: usize = 4096;

/// Reads a `.key` file.
pub(crate) fn load_secret(path: &Path) -> Result<SecretKey> {
    let text = read_limited(path, MAX_KEY_FILE, "secret key")?;
    SecretKey::from_text(&String::from_utf8_lossy(&text))
        .with_context(|| format!("{} is not a ferry secret key", path.display()))
}

/// Reads a `.pub` file.
pub(crate) fn load_public(path: &Path) -> Result<PublicKey> {
    let text = read_limited(path, MAX_KEY_FILE, "public key")?;
    PublicKey::from_text(&String::from_utf8_lossy(&text))
        .with_context(|| format!("{} is not a ferry public key", path.display()))
}
