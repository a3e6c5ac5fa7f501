//! Where the agent keeps things under its data directory.
//!
//! ```text
//! data_dir/
//!   state.json                   committed state: what each service runs
//!   root.json                    the newest trust root accepted, if the device has one
//!   journal.json                 the install in flight, if any
//!   downloads/<sha256>.part      artifact being fetched (kept for resume)
//!   downloads/<sha256>.tar.gz    artifact fetched and checked
//!   services/<service>/releases/<version>-<sha8>/   unpacked releases
//!   services/<service>/releases/.staging-*          an unpack in progress
//!   services/<service>/current -> releases/...      what runs
//!   services/<service>/previous -> releases/...     what ran before
//!   run/<service>.pid            direct supervisor: pid and start time
//!   logs/<service>.log           direct supervisor: service output
//!   service-state/<service>/     direct supervisor: the service's $STATE_DIRECTORY
//!   service-users.json           direct supervisor: each service's own uid
//! ```

use std::path::{Path, PathBuf};

use ferry_protocol::{ServiceName, Sha256Digest};

/// Paths under one data directory.
#[derive(Debug, Clone)]
pub struct Layout {
    root: PathBuf,
}

impl Layout {
    /// The layout rooted at `data_dir`.
    pub fn new(data_dir: impl Into<PathBuf>) -> Self {
        Self {
            root: data_dir.into(),
        }
    }

    /// The data directory itself.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// The committed state file.
    pub fn state_file(&self) -> PathBuf {
        self.root.join("state.json")
    }

    /// The journal of the install in flight.
    pub fn journal_file(&self) -> PathBuf {
        self.root.join("journal.json")
    }

    /// Where artifacts are downloaded.
    pub fn downloads(&self) -> PathBuf {
        self.root.join("downloads")
    }

    /// An artifact being fetched.
    pub fn partial_download(&self, sha256: &Sha256Digest) -> PathBuf {
        self.downloads().join(format!("{sha256}.part"))
    }

    /// An artifact fetched and checked.
    pub fn checked_download(&self, sha256: &Sha256Digest) -> PathBuf {
        self.downloads().join(format!("{sha256}.tar.gz"))
    }

    /// A service's directory.
    pub fn service_dir(&self, service: &ServiceName) -> PathBuf {
        self.root.join("services").join(service.as_str())
    }

    /// A service's unpacked releases.
    pub fn releases(&self, service: &ServiceName) -> PathBuf {
        self.service_dir(service).join("releases")
    }

    /// The `current` link: the release that runs.
    pub fn current(&self, service: &ServiceName) -> PathBuf {
        self.service_dir(service).join("current")
    }

    /// The `previous` link: the release to roll back to.
    pub fn previous(&self, service: &ServiceName) -> PathBuf {
        self.service_dir(service).join("previous")
    }

    /// Pid files of the direct supervisor.
    pub fn run_dir(&self) -> PathBuf {
        self.root.join("run")
    }

    /// Service output under the direct supervisor.
    pub fn logs(&self) -> PathBuf {
        self.root.join("logs")
    }

    /// A service's own writable directory under the direct supervisor
    /// (its `$STATE_DIRECTORY`), owned by the user it runs as.
    pub fn service_state(&self, service: &ServiceName) -> PathBuf {
        self.root.join("service-state").join(service.as_str())
    }

    /// The newest trust root accepted (`[trust] root` devices).
    pub fn root_file(&self) -> PathBuf {
        self.root.join("root.json")
    }

    /// The device's own key and certificate (enrolled devices).
    pub fn identity(&self) -> PathBuf {
        self.root.join("identity")
    }

    /// The uids given to services of their own (direct supervisor).
    pub fn service_users(&self) -> PathBuf {
        self.root.join("service-users.json")
    }
}
