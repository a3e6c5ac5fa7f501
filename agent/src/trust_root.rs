//! The device's trust root, when it is set up with one (`[trust] root`).
//!
//! The root provisioned with the device (a signed root file, version N) is
//! where trust starts. Newer roots arrive with the desired state (or as
//! `NAME.root.json` in the inbox); each is accepted only as the next
//! version, signed by a threshold of the held root's keys and of its own
//! ([`ferry_protocol::root::verify_next`]), and written durably to
//! `DATA_DIR/root.json` before its release keys are used. The held version
//! never goes down: at start the agent takes the newer of the provisioned
//! root and the one it holds.

use std::io;
use std::path::Path;

use ferry_protocol::root::{Root, RootError, SignedRoot, verify_first};

use crate::durable;
use crate::layout::Layout;

/// A root the device holds: checked, and its signed bytes (kept as they
/// came, so they can be checked again).
#[derive(Debug, Clone)]
pub struct HeldRoot {
    /// The root.
    pub root: Root,
    /// As signed.
    pub signed: SignedRoot,
}

/// Why the trust root cannot be loaded.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    /// A file cannot be read.
    #[error("{path}: {error}")]
    Io {
        /// The file.
        path: String,
        /// Why.
        error: io::Error,
    },
    /// A root does not verify.
    #[error("{path}: {error}")]
    Root {
        /// The file.
        path: String,
        /// Why.
        error: RootError,
    },
}

fn read(path: &Path) -> Result<Option<HeldRoot>, LoadError> {
    let bytes = match durable::read_limited(path, ferry_protocol::root::MAX_ROOT_BYTES as u64) {
        Ok(bytes) => bytes,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(error) => {
            return Err(LoadError::Io {
                path: path.display().to_string(),
                error,
            });
        }
    };
    let checked = SignedRoot::from_json(&bytes).and_then(|signed| {
        // Every root accepted is signed by a threshold of its own keys:
        // a file altered on the device fails here.
        verify_first(&signed).map(|root| HeldRoot { root, signed })
    });
    checked.map(Some).map_err(|error| LoadError::Root {
        path: path.display().to_string(),
        error,
    })
}

/// The root the device trusts: the newer of the provisioned one
/// (`provisioned`, which must exist) and the one held in the data
/// directory.
pub fn load(provisioned: &Path, layout: &Layout) -> Result<HeldRoot, LoadError> {
    let first = read(provisioned)?.ok_or_else(|| LoadError::Io {
        path: provisioned.display().to_string(),
        error: io::Error::new(
            io::ErrorKind::NotFound,
            "the provisioned trust root is missing",
        ),
    })?;
    Ok(match read(&layout.root_file())? {
        Some(held) if held.root.version >= first.root.version => held,
        _ => first,
    })
}

/// Keeps `accepted` as the held root, durably, before anything trusts it.
pub fn keep(layout: &Layout, accepted: &SignedRoot) -> io::Result<()> {
    durable::write_file(&layout.root_file(), &accepted.to_json())
}
