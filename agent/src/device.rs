//! Putting an agent together from its configuration.

use std::fs::File;
use std::path::Path;

use nix::fcntl::{Flock, FlockArg};
use std::sync::Arc;

use crate::config::{Config, ConfigError, SupervisorKind};
use crate::fetch::http::Credentials;
use crate::install::{Installer, InstallerParts};
use crate::layout::Layout;
use crate::report::Reporter;
use crate::supervisor::{Supervisor, direct::Direct, systemd::Systemd};
use crate::tls::ClientCertificate;

/// Why an agent could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum SetupError {
    /// The configuration is unusable.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// The device's target is not a valid triple.
    #[error("{0}")]
    Target(#[from] ferry_protocol::NameError),
    /// The data directory cannot be used.
    #[error("data directory {path}: {error}")]
    DataDir {
        /// The directory.
        path: std::path::PathBuf,
        /// Why.
        error: std::io::Error,
    },
    /// Another agent uses the same data directory.
    #[error("another ferry-agent is using {0}; drop the release into its inbox instead")]
    Busy(std::path::PathBuf),
    /// The HTTP client could not be built.
    #[error("HTTP client: {0}")]
    Http(#[from] reqwest::Error),
}

/// Whether systemd runs this machine.
pub fn systemd_is_running() -> bool {
    Path::new("/run/systemd/system").is_dir()
}

/// Takes the data directory's lock, so two agents never install at once.
pub fn lock_data_dir(config: &Config) -> Result<Flock<File>, SetupError> {
    let root = &config.data_dir;
    std::fs::create_dir_all(root).map_err(|error| SetupError::DataDir {
        path: root.clone(),
        error,
    })?;
    let path = root.join("lock");
    let file = File::options()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .map_err(|error| SetupError::DataDir {
            path: path.clone(),
            error,
        })?;
    Flock::lock(file, FlockArg::LockExclusiveNonblock).map_err(|_| SetupError::Busy(root.clone()))
}

/// Builds the installer for `config`, reporting through `reporter`; its
/// downloads show `certificate` when the manager asks for one.
pub fn installer(
    config: &Config,
    reporter: Reporter,
    certificate: Option<Arc<ClientCertificate>>,
) -> Result<Installer, SetupError> {
    let layout = Layout::new(&config.data_dir);
    let supervisor = match config.supervisor {
        SupervisorKind::Systemd => Supervisor::Systemd(Systemd::new(&config.unit_dir)),
        SupervisorKind::Auto if systemd_is_running() => {
            Supervisor::Systemd(Systemd::new(&config.unit_dir))
        }
        #[cfg(feature = "simulator")]
        SupervisorKind::Simulated => {
            Supervisor::Simulated(crate::supervisor::simulated::Simulated::new())
        }
        SupervisorKind::Auto | SupervisorKind::Direct => Supervisor::Direct(
            Direct::new(layout.clone(), config.limits.service_log_bytes).map_err(|error| {
                SetupError::DataDir {
                    path: config.data_dir.clone(),
                    error,
                }
            })?,
        ),
    };
    let credentials = match &config.broker {
        Some(b) => match (
            &b.password,
            b.manager_origin().map_err(ConfigError::Invalid)?,
        ) {
            (Some(password), Some(origin)) => Some(Credentials {
                username: b
                    .username
                    .clone()
                    .unwrap_or_else(|| config.device_id.to_string()),
                password: password.clone(),
                origin,
            }),
            _ => None,
        },
        None => None,
    };
    let (policy, root) = config.trust()?;
    Installer::new(InstallerParts {
        layout,
        policy,
        target: config.target()?,
        limits: config.limits.into(),
        supervisor: std::sync::Arc::new(supervisor),
        reporter,
        http: http_client(
            config.broker.as_ref().and_then(|b| b.ca_pem.as_deref()),
            certificate,
        )?,
        credentials,
        transfer: config.transfer,
        passed_env: config
            .pass_env
            .iter()
            .filter_map(|name| Some((name.to_string(), std::env::var(name.as_str()).ok()?)))
            .collect(),
        isolate_services: config.isolate_services,
        root,
        services: config.trust.services.clone(),
    })
    .map_err(|error| SetupError::DataDir {
        path: config.data_dir.clone(),
        error,
    })
}

/// The HTTP client for downloads, probes and enrolment: rustls with the
/// ring provider; with the fleet CA (`ca_pem`), trusting that CA alone and
/// showing the device's `certificate` (see [`crate::tls`]).
pub fn http_client(
    ca_pem: Option<&str>,
    certificate: Option<Arc<ClientCertificate>>,
) -> Result<reqwest::Client, SetupError> {
    // Installing the provider twice is harmless; the first one stays.
    let _ = rustls::crypto::ring::default_provider().install_default();
    let builder = match ca_pem {
        Some(pem) => reqwest::Client::builder().tls_backend_preconfigured(
            crate::tls::pinned_client_config(pem, certificate)
                .map_err(|e| ConfigError::Invalid(format!("broker.ca_pem: {e}")))?,
        ),
        None => reqwest::Client::builder(),
    };
    builder
        .connect_timeout(std::time::Duration::from_secs(10))
        .read_timeout(std::time::Duration::from_secs(30))
        // Downloads are rare: an idle connection kept for the next one would
        // cost the device, and a manager serving thousands, a socket each.
        .pool_max_idle_per_host(0)
        .build()
        .map_err(SetupError::Http)
}
