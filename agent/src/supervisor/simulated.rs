//! The simulated supervisor, for fleet simulators only (cargo feature
//! `simulator`; never in a device build): services "run" without a process.
//!
//! Thousands of agents in one process cannot each start a real service, and
//! a simulator measures the update path (manager, broker, download, verify,
//! unpack, swap, gate), not the service. A restart makes a service active
//! until it is stopped; nothing ever crashes, so every health gate passes.

use std::collections::HashMap;
use std::sync::Mutex;

use ferry_protocol::ServiceName;
use ferry_protocol::messages::ServiceState;

use super::{ServiceSpec, ServiceStatus, SupervisorError};

/// Services kept as states in memory.
#[derive(Default)]
pub struct Simulated {
    services: Mutex<HashMap<ServiceName, ServiceState>>,
}

impl Simulated {
    /// A supervisor with no services.
    pub fn new() -> Self {
        Self::default()
    }

    pub(super) fn apply(&self, spec: &ServiceSpec) {
        self.lock()
            .entry(spec.service.clone())
            .or_insert(ServiceState::Inactive);
    }

    pub(super) fn restart(&self, service: &ServiceName) -> Result<(), SupervisorError> {
        match self.lock().get_mut(service) {
            Some(state) => {
                *state = ServiceState::Active;
                Ok(())
            }
            None => Err(SupervisorError::Unknown(service.clone())),
        }
    }

    pub(super) fn remove(&self, service: &ServiceName) {
        self.lock().remove(service);
    }

    pub(super) fn status(&self, service: &ServiceName) -> Result<ServiceStatus, SupervisorError> {
        match self.lock().get(service) {
            Some(&state) => Ok(ServiceStatus {
                state,
                pid: None,
                restarts: 0,
                last_exit: None,
            }),
            None => Err(SupervisorError::Unknown(service.clone())),
        }
    }

    /// Signals and reloads reach a known service and do nothing.
    pub(super) fn signal(&self, service: &ServiceName) -> Result<(), SupervisorError> {
        self.status(service).map(drop)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<ServiceName, ServiceState>> {
        // Each change is one map operation: a panic cannot leave it half-done.
        self.services.lock().unwrap_or_else(|p| p.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec() -> ServiceSpec {
        ServiceSpec::plain(
            ServiceName::new("api").unwrap(),
            "/x/current/bin/api".into(),
            "/x/current".into(),
        )
    }

    #[test]
    fn a_service_runs_from_restart_until_removed() {
        let s = Simulated::new();
        let api = spec().service;
        assert!(matches!(s.restart(&api), Err(SupervisorError::Unknown(_))));
        s.apply(&spec());
        assert_eq!(s.status(&api).unwrap().state, ServiceState::Inactive);
        s.restart(&api).unwrap();
        assert_eq!(s.status(&api).unwrap().state, ServiceState::Active);
        // Applying the same service again keeps it running.
        s.apply(&spec());
        assert_eq!(s.status(&api).unwrap().state, ServiceState::Active);
        s.signal(&api).unwrap();
        s.remove(&api);
        assert!(s.status(&api).is_err());
    }
}
