//! Supervisors: what starts, stops and watches the managed services.
//!
//! - [`systemd`]: a unit per service, driven with `systemctl`.
//! - [`direct`]: the agent runs the services itself, for devices without
//!   systemd (BusyBox init) and for demos.
//! - `simulated` (feature `simulator`): no process at all, for fleet
//!   simulators running thousands of agents in one process.
//!
//! Both are reached through [`Supervisor`], so the installer and the health
//! gate do not care which one a device uses.

pub mod direct;
pub mod service_log;
pub mod service_user;
#[cfg(feature = "simulator")]
pub mod simulated;
pub mod systemd;

use std::path::PathBuf;

use ferry_protocol::ServiceName;
use ferry_protocol::messages::ServiceState;
use nix::sys::signal::Signal;

/// What a supervisor needs to run one service: everything comes from the
/// signed manifest, except the paths (the device's) and the variables the
/// device's own configuration passes on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServiceSpec {
    /// The service.
    pub service: ServiceName,
    /// The program, through the `current` link so a restart picks up a swap.
    pub exec: PathBuf,
    /// Its arguments.
    pub args: Vec<String>,
    /// Its whole environment ([`environment`]), in order; a later entry
    /// overrides an earlier one of the same name.
    pub env: Vec<(String, String)>,
    /// Its working directory, also through `current`.
    pub workdir: PathBuf,
    /// The user it runs as.
    pub user: RunAs,
    /// Paths it may write besides its state directory.
    pub writable: Vec<PathBuf>,
    /// The signal that asks it to stop.
    pub stop_signal: Signal,
    /// How long it has between that signal and SIGKILL.
    pub stop_timeout: std::time::Duration,
}

impl ServiceSpec {
    /// A service run with no arguments, `PATH` only, as a user of its own,
    /// stopped with SIGTERM and 10 s: a manifest's defaults.
    pub fn plain(service: ServiceName, exec: PathBuf, workdir: PathBuf) -> Self {
        Self {
            service,
            exec,
            args: Vec::new(),
            env: environment(&[], &Default::default()),
            workdir,
            user: RunAs::Own,
            writable: Vec::new(),
            stop_signal: Signal::SIGTERM,
            stop_timeout: std::time::Duration::from_secs(u64::from(
                ferry_protocol::manifest::DEFAULT_STOP_TIMEOUT_SECS,
            )),
        }
    }
}

/// Which user a service runs as.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RunAs {
    /// A user of the service's own, so that a compromised service cannot
    /// write the agent's state, configuration or keys, nor another
    /// service's: `DynamicUser=` under systemd, a dedicated uid under the
    /// direct supervisor (when the agent runs as root; its own user
    /// otherwise, having no other to give).
    Own,
    /// The agent's own user: the device's configuration turned isolation
    /// off (`isolate_services = false`).
    Agent,
    /// The user the manifest names.
    Named(String),
}

/// `PATH` for every service, as systemd gives its services.
pub const SERVICE_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// The environment a service gets: `PATH`, then the variables the device's
/// configuration passes on from the agent's own (`pass_env`), then the
/// release's. Nothing else of the agent's environment reaches it.
pub fn environment(
    passed: &[(String, String)],
    release: &std::collections::BTreeMap<ferry_protocol::EnvName, String>,
) -> Vec<(String, String)> {
    let mut env = vec![("PATH".to_owned(), SERVICE_PATH.to_owned())];
    env.extend(passed.iter().cloned());
    env.extend(release.iter().map(|(k, v)| (k.to_string(), v.clone())));
    env
}

/// The signal Ferry sends for a manifest's signal name.
pub fn nix_signal(signal: ferry_protocol::manifest::ServiceSignal) -> Signal {
    use ferry_protocol::manifest::ServiceSignal as S;
    match signal {
        S::Hup => Signal::SIGHUP,
        S::Usr1 => Signal::SIGUSR1,
        S::Usr2 => Signal::SIGUSR2,
        S::Int => Signal::SIGINT,
        S::Term => Signal::SIGTERM,
        S::Quit => Signal::SIGQUIT,
        S::Winch => Signal::SIGWINCH,
    }
}

/// A service's state as its supervisor sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ServiceStatus {
    /// Running, starting, stopped...
    pub state: ServiceState,
    /// Main process id while running.
    pub pid: Option<u32>,
    /// Restarts since the last explicit restart.
    pub restarts: u32,
    /// How its main process last ended, when it has.
    pub last_exit: Option<Exit>,
}

/// How a service's process ended, for the operator: an exit status or a
/// signal, and how long it had run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Exit {
    /// The exit status, when it exited.
    pub code: Option<i32>,
    /// The signal that ended it, when one did.
    pub signal: Option<i32>,
    /// How long it ran, when known.
    pub ran_for: Option<std::time::Duration>,
}

impl std::fmt::Display for Exit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match (self.code, self.signal) {
            (_, Some(signal)) => match Signal::try_from(signal) {
                Ok(name) => write!(f, "killed by {}", name.as_str())?,
                Err(_) => write!(f, "killed by signal {signal}")?,
            },
            (Some(code), None) => write!(f, "exited with status {code}")?,
            (None, None) => f.write_str("ended")?,
        }
        if let Some(ran) = self.ran_for {
            write!(f, " after {:.1}s", ran.as_secs_f64())?;
        }
        Ok(())
    }
}

/// A supervisor operation that failed.
#[derive(Debug, thiserror::Error)]
pub enum SupervisorError {
    /// A command (systemctl) or process could not be run.
    #[error("{what}: {error}")]
    Io {
        /// What was being done.
        what: String,
        /// Why it failed.
        error: std::io::Error,
    },
    /// systemctl ran and said no.
    #[error("{command} failed: {stderr}")]
    Command {
        /// The command line.
        command: String,
        /// What it printed.
        stderr: String,
    },
    /// The supervisor does not know the service.
    #[error("service {0} is not managed here")]
    Unknown(ServiceName),
}

/// Which supervisor a device uses.
pub enum Supervisor {
    /// Units under systemd.
    Systemd(systemd::Systemd),
    /// Processes run by the agent.
    Direct(direct::Direct),
    /// No processes: a fleet simulator's devices.
    #[cfg(feature = "simulator")]
    Simulated(simulated::Simulated),
}

impl Supervisor {
    /// Makes the supervisor know how to run `spec` (writes the unit file).
    pub async fn apply(&self, spec: &ServiceSpec) -> Result<(), SupervisorError> {
        match self {
            Self::Systemd(s) => s.apply(spec).await,
            Self::Direct(d) => d.apply(spec).await,
            #[cfg(feature = "simulator")]
            Self::Simulated(s) => {
                s.apply(spec);
                Ok(())
            }
        }
    }

    /// Restarts the service (starts it if stopped) and zeroes its restart count.
    pub async fn restart(&self, service: &ServiceName) -> Result<(), SupervisorError> {
        match self {
            Self::Systemd(s) => s.restart(service).await,
            Self::Direct(d) => d.restart(service).await,
            #[cfg(feature = "simulator")]
            Self::Simulated(s) => s.restart(service),
        }
    }

    /// Stops the service and forgets it.
    pub async fn remove(&self, service: &ServiceName) -> Result<(), SupervisorError> {
        match self {
            Self::Systemd(s) => s.remove(service).await,
            Self::Direct(d) => d.remove(service).await,
            #[cfg(feature = "simulator")]
            Self::Simulated(s) => {
                s.remove(service);
                Ok(())
            }
        }
    }

    /// Stops the service, keeping what the supervisor knows of it (the
    /// unit stays enabled under systemd).
    pub async fn stop(&self, service: &ServiceName) -> Result<(), SupervisorError> {
        match self {
            Self::Systemd(s) => s.stop(service).await,
            Self::Direct(d) => d.stop(service).await,
            #[cfg(feature = "simulator")]
            Self::Simulated(s) => {
                s.remove(service);
                Ok(())
            }
        }
    }

    /// The service's current state.
    pub async fn status(&self, service: &ServiceName) -> Result<ServiceStatus, SupervisorError> {
        match self {
            Self::Systemd(s) => s.status(service).await,
            Self::Direct(d) => d.status(service),
            #[cfg(feature = "simulator")]
            Self::Simulated(s) => s.status(service),
        }
    }

    /// Sends `signal` to the service's main process.
    pub async fn signal(
        &self,
        service: &ServiceName,
        signal: Signal,
    ) -> Result<(), SupervisorError> {
        match self {
            Self::Systemd(s) => s.signal(service, signal).await,
            Self::Direct(d) => d.signal(service, signal),
            #[cfg(feature = "simulator")]
            Self::Simulated(s) => s.signal(service),
        }
    }

    /// Asks the service to reload its configuration (systemd `reload`; a
    /// SIGHUP under the direct supervisor).
    pub async fn reload(&self, service: &ServiceName) -> Result<(), SupervisorError> {
        match self {
            Self::Systemd(s) => s.reload(service).await,
            Self::Direct(d) => d.signal(service, Signal::SIGHUP),
            #[cfg(feature = "simulator")]
            Self::Simulated(s) => s.signal(service),
        }
    }

    /// Resolves when a service's state changes. Only the direct supervisor
    /// sees changes as they happen; under systemd this never resolves and
    /// changes show in the next periodic report.
    pub async fn changed(&self) {
        match self {
            Self::Direct(d) => d.changed().await,
            // Under systemd changes show in the next periodic report; a
            // simulated service changes only when the agent changes it.
            Self::Systemd(_) => std::future::pending().await,
            #[cfg(feature = "simulator")]
            Self::Simulated(_) => std::future::pending().await,
        }
    }

    /// The supervisor's name, for logs and reports.
    pub fn name(&self) -> &'static str {
        match self {
            Self::Systemd(_) => "systemd",
            Self::Direct(_) => "direct",
            #[cfg(feature = "simulator")]
            Self::Simulated(_) => "simulated",
        }
    }
}
