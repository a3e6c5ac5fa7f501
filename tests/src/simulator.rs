//! A fleet simulator: many agents in one process.
//!
//! Each simulated device is the real agent library (`daemon::run_with`):
//! its own MQTT connection, its own data directory, the real download,
//! verification, unpacking, swap and health gate. Only the service is
//! missing: the agents use the `simulated` supervisor (the agent's
//! `simulator` feature), which runs no process, so thousands of devices fit
//! in one process. The agents share a multi-thread runtime of their own,
//! apart from the caller's, so the simulator's work shows as one load.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use ferry_agent::config::Config;

use crate::{Endpoints, agent_config};
use tokio::sync::watch;

/// Runs the agents until stopped or dropped.
pub struct SimulatedFleet {
    runtime: Option<tokio::runtime::Runtime>,
    agents: Vec<tokio::task::JoinHandle<()>>,
    stop: watch::Sender<bool>,
    /// Agents that ended with an error (a setup error: bad configuration,
    /// a busy data directory).
    failed: Arc<AtomicUsize>,
    /// Where the devices' data directories are.
    pub root: PathBuf,
}

/// The thread name of the simulator's runtime (benchmarks find its CPU time by it).
pub const SIMULATOR_THREAD: &str = "fleet-sim";

/// A simulated device's configuration: the `simulated` supervisor, the
/// agent's defaults otherwise (30 s health reports, `auto` transfer).
pub fn simulated_config(
    data_dir: &Path,
    device: &str,
    password: &str,
    at: Endpoints,
    trust: &Path,
) -> Config {
    let text = agent_config(data_dir, device, password, at, trust, "simulated", None);
    Config::parse(&text).unwrap()
}

impl SimulatedFleet {
    /// Starts one agent per `(device, password)` against the manager at
    /// `at`, trusting the key at `trust`, with data directories under
    /// `root`, on a runtime of `workers` threads.
    pub fn start(
        root: &Path,
        at: impl Into<Endpoints>,
        devices: &[(String, String)],
        trust: &Path,
        workers: usize,
    ) -> Self {
        let at = at.into();
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(workers)
            .thread_name(SIMULATOR_THREAD)
            .enable_all()
            .build()
            .unwrap();
        let (stop, stopped) = watch::channel(false);
        let failed = Arc::new(AtomicUsize::new(0));
        let mut agents = Vec::with_capacity(devices.len());
        for (device, password) in devices {
            let config = simulated_config(&root.join(device), device, password, at.clone(), trust);
            let (mut stopped, failed) = (stopped.clone(), failed.clone());
            agents.push(runtime.spawn(async move {
                let shutdown = async move {
                    let _ = stopped.wait_for(|stop| *stop).await;
                };
                if ferry_agent::daemon::run_with(config, None, shutdown)
                    .await
                    .is_err()
                {
                    failed.fetch_add(1, Ordering::Relaxed);
                }
            }));
        }
        Self {
            runtime: Some(runtime),
            agents,
            stop,
            failed,
            root: root.to_owned(),
        }
    }

    /// How many agents ended with an error so far.
    pub fn failed(&self) -> usize {
        self.failed.load(Ordering::Relaxed)
    }

    /// Stops every agent (each says goodbye to the broker), waiting ten
    /// seconds at most.
    pub async fn stop(mut self) {
        let _ = self.stop.send(true);
        let agents = std::mem::take(&mut self.agents);
        let _ = tokio::time::timeout(std::time::Duration::from_secs(10), async {
            for agent in agents {
                let _ = agent.await;
            }
        })
        .await;
    }
}

impl Drop for SimulatedFleet {
    fn drop(&mut self) {
        let _ = self.stop.send(true);
        // Dropping a runtime blocks, which an async caller cannot do.
        if let Some(runtime) = self.runtime.take() {
            runtime.shutdown_background();
        }
    }
}
