//! Health reports: the device's figures and each managed service's state.
//!
//! Cheap to produce: only the managed services' processes are refreshed,
//! never the whole process table.

use std::path::PathBuf;
use std::time::SystemTime;

use ferry_protocol::messages::{
    CpuHealth, DiskHealth, Health, MESSAGE_SCHEMA, MemoryHealth, Reported, ServiceHealth,
};
use ferry_protocol::{ServiceName, Timestamp};
use sysinfo::{Components, Pid, ProcessRefreshKind, ProcessesToUpdate, System};

use crate::supervisor::Supervisor;

/// Takes health figures; keeps what it needs between reports (CPU usage is
/// measured from one report to the next).
pub struct HealthProbe {
    system: System,
    components: Components,
    data_dir: PathBuf,
}

impl HealthProbe {
    /// A probe measuring disk space where `data_dir` lives.
    pub fn new(data_dir: PathBuf) -> Self {
        let mut system = System::new();
        system.refresh_cpu_usage();
        Self {
            system,
            components: Components::new_with_refreshed_list(),
            data_dir,
        }
    }

    /// A health report for the services in `reported`.
    pub async fn collect(&mut self, supervisor: &Supervisor, reported: &Reported) -> Health {
        self.system.refresh_cpu_usage();
        self.system.refresh_memory();
        let load = System::load_average();

        let mut services = Vec::with_capacity(reported.services.len());
        let mut pids = Vec::new();
        for installed in &reported.services {
            let service = &installed.release.service;
            let status = supervisor.status(service).await.ok();
            let pid = status.and_then(|s| s.pid);
            if let Some(pid) = pid {
                pids.push(Pid::from_u32(pid));
            }
            services.push((
                service.clone(),
                installed.release.version.clone(),
                status,
                pid,
            ));
        }
        self.system.refresh_processes_specifics(
            ProcessesToUpdate::Some(&pids),
            true,
            ProcessRefreshKind::nothing().with_memory().with_cpu(),
        );
        let services = services
            .into_iter()
            .map(
                |(service, version, status, pid): (ServiceName, String, _, Option<u32>)| {
                    let process = pid.and_then(|p| self.system.process(Pid::from_u32(p)));
                    ServiceHealth {
                        service,
                        version: Some(version),
                        state: status
                            .map_or(ferry_protocol::messages::ServiceState::Inactive, |s| {
                                s.state
                            }),
                        pid,
                        restarts: status.map_or(0, |s| s.restarts),
                        rss_bytes: process.map(|p| p.memory()),
                        cpu_percent: process.map(|p| p.cpu_usage()),
                    }
                },
            )
            .collect();

        self.components.refresh(false);
        let temperature_celsius = self
            .components
            .iter()
            .filter_map(|c| c.temperature())
            .filter(|t| t.is_finite())
            .reduce(f32::max);

        Health {
            schema: MESSAGE_SCHEMA,
            time: Timestamp::from(SystemTime::now()),
            agent_version: crate::VERSION.to_owned(),
            uptime_secs: System::uptime(),
            cpu: CpuHealth {
                usage_percent: self.system.global_cpu_usage(),
                load1: load.one as f32,
                load5: load.five as f32,
                load15: load.fifteen as f32,
            },
            memory: MemoryHealth {
                total_bytes: self.system.total_memory(),
                available_bytes: self.system.available_memory(),
            },
            disk: self.disk(),
            temperature_celsius,
            services,
            last_deployment: reported.last_result.clone(),
        }
    }

    fn disk(&self) -> DiskHealth {
        let (total_bytes, free_bytes) = match nix::sys::statvfs::statvfs(&self.data_dir) {
            // The block counts are 32-bit on some 32-bit targets.
            #[allow(clippy::useless_conversion)]
            Ok(s) => {
                let block = u64::from(s.fragment_size());
                (
                    u64::from(s.blocks()).saturating_mul(block),
                    u64::from(s.blocks_available()).saturating_mul(block),
                )
            }
            Err(_) => (0, 0),
        };
        DiskHealth {
            path: self.data_dir.display().to_string(),
            total_bytes,
            free_bytes,
        }
    }
}
