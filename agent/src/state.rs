//! The committed state: what each service runs, and what failed here.
//!
//! Saved with [`crate::durable::write_file`] after every commit, so after a
//! power loss it names exactly the releases that passed their health gate.
//! The sequences in it are the anti-rollback floor.

use std::collections::BTreeMap;
use std::io;
use std::path::Path;

use ferry_protocol::messages::{DeploymentResult, InstalledService, ReleaseRef};
use ferry_protocol::trust::{InstalledRelease, InstalledReleases};
use ferry_protocol::{Manifest, ServiceName, Sha256Digest, Timestamp};
use serde::{Deserialize, Serialize};

use crate::durable;

/// A committed release of one service.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Installed {
    /// The verified manifest it was installed from.
    pub manifest: Manifest,
    /// Its directory name under the service's `releases/`.
    pub release_dir: String,
    /// When it was committed.
    pub installed_at: Timestamp,
}

/// A release that failed here; it is not retried until something newer is desired.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Failed {
    /// The service.
    pub service: ServiceName,
    /// The release's sequence.
    pub sequence: u64,
    /// The release's artifact.
    pub sha256: Sha256Digest,
}

/// Everything the agent must remember across restarts.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct State {
    /// The committed release of each service.
    #[serde(default)]
    pub services: BTreeMap<ServiceName, Installed>,
    /// Releases that failed on this device (the newest few per service).
    #[serde(default)]
    pub failed: Vec<Failed>,
    /// The outcome of the most recent deployment.
    #[serde(default)]
    pub last_result: Option<DeploymentResult>,
}

const MAX_FAILED_PER_SERVICE: usize = 8;

impl State {
    /// Reads the state file; a missing file is an empty state.
    pub fn load(path: &Path) -> io::Result<Self> {
        Ok(durable::read_json(path)?.unwrap_or_default())
    }

    /// Writes the state file atomically and durably.
    pub fn save(&self, path: &Path) -> io::Result<()> {
        durable::write_json(path, self)
    }

    /// Whether this exact release failed here before.
    pub fn has_failed(&self, manifest: &Manifest) -> bool {
        self.failed.iter().any(|f| {
            f.service == manifest.service
                && f.sequence == manifest.sequence
                && f.sha256 == manifest.artifact.sha256
        })
    }

    /// Remembers a failed release, keeping the newest few per service.
    pub fn record_failure(&mut self, manifest: &Manifest) {
        if self.has_failed(manifest) {
            return;
        }
        self.failed.push(Failed {
            service: manifest.service.clone(),
            sequence: manifest.sequence,
            sha256: manifest.artifact.sha256,
        });
        let of_service = self
            .failed
            .iter()
            .filter(|f| f.service == manifest.service)
            .count();
        if of_service > MAX_FAILED_PER_SERVICE {
            if let Some(oldest) = self
                .failed
                .iter()
                .position(|f| f.service == manifest.service)
            {
                self.failed.remove(oldest);
            }
        }
    }

    /// The installed services as the `reported` message lists them.
    pub fn reported_services(&self) -> Vec<InstalledService> {
        self.services
            .values()
            .map(|i| InstalledService {
                release: release_ref(&i.manifest),
                artifact_sha256: i.manifest.artifact.sha256,
                installed_at: i.installed_at,
            })
            .collect()
    }
}

impl InstalledReleases for State {
    fn installed(&self, service: &ServiceName) -> Option<InstalledRelease> {
        self.services.get(service).map(|i| InstalledRelease {
            sequence: i.manifest.sequence,
            manifest: i.manifest.digest(),
        })
    }
}

/// The short reference to a release used in events and reports.
pub fn release_ref(manifest: &Manifest) -> ReleaseRef {
    ReleaseRef {
        service: manifest.service.clone(),
        version: manifest.version.to_string(),
        sequence: manifest.sequence,
    }
}
