//! The health gate: a new release must stay up, without restarting, for the
//! manifest's window, and pass its probe, before it is committed.

use std::path::Path;
use std::time::Duration;

use ferry_protocol::ServiceName;
use ferry_protocol::manifest::{HealthSettings, Probe};
use ferry_protocol::messages::ServiceState;
use tokio::time::{Instant, sleep, timeout};

use crate::supervisor::Supervisor;

/// How often the service's state is read during the window. The gate lasts
/// seconds and ends, so this is a bounded check, not an idle poll.
const CHECK_EVERY: Duration = Duration::from_millis(250);
/// How long one probe attempt may take.
const PROBE_TIMEOUT: Duration = Duration::from_secs(2);

/// Waits out the health window. `Err` says, in an operator's words, why the
/// release is not healthy. Command probes run in `workdir`, the release.
pub async fn run(
    supervisor: &Supervisor,
    service: &ServiceName,
    settings: &HealthSettings,
    workdir: &Path,
    http: &reqwest::Client,
) -> Result<(), String> {
    let window = Duration::from_secs(u64::from(settings.window_secs));
    let deadline = Instant::now() + window;
    let mut probe_passed = settings.probe.is_none();
    let mut last_probe_error = String::new();
    let mut next_probe = Instant::now();
    // How the process last ended, kept across reads: systemd forgets it
    // once the restarted process runs.
    let mut seen_exit = None;
    loop {
        let status = supervisor
            .status(service)
            .await
            .map_err(|e| format!("cannot read the service's state: {e}"))?;
        seen_exit = status.last_exit.or(seen_exit);
        // How the process ended, when it did: the exit status or signal
        // and how long it ran tell a usage error from a crash.
        let exit = seen_exit.map(|e| format!(": {e}")).unwrap_or_default();
        if status.restarts > 0 {
            return Err(format!(
                "restarted {} time(s) within the {}s health window{exit}",
                status.restarts, settings.window_secs
            ));
        }
        match status.state {
            ServiceState::Failed => return Err(format!("service failed{exit}")),
            ServiceState::Inactive => return Err(format!("service is not running{exit}")),
            ServiceState::Active | ServiceState::Activating | ServiceState::Deactivating => {}
        }
        let now = Instant::now();
        if now >= deadline {
            break;
        }
        if !probe_passed && now >= next_probe {
            if let Some(probe) = &settings.probe {
                match timeout(PROBE_TIMEOUT, run_probe(probe, workdir, http)).await {
                    Ok(Ok(())) => probe_passed = true,
                    Ok(Err(e)) => last_probe_error = e,
                    Err(_) => last_probe_error = format!("no answer within {PROBE_TIMEOUT:?}"),
                }
                next_probe = Instant::now() + Duration::from_secs(1);
            }
        }
        sleep(CHECK_EVERY.min(deadline.saturating_duration_since(Instant::now()))).await;
    }
    let last = supervisor.status(service).await.ok();
    let running = last.is_some_and(|s| s.state == ServiceState::Active && s.restarts == 0);
    if running && probe_passed {
        Ok(())
    } else if !probe_passed {
        Err(format!(
            "probe did not pass within {}s: {last_probe_error}",
            settings.window_secs
        ))
    } else {
        let exit = last
            .and_then(|s| s.last_exit)
            .or(seen_exit)
            .map(|e| format!(": {e}"))
            .unwrap_or_default();
        Err(format!(
            "service stopped at the end of the health window{exit}"
        ))
    }
}

/// One probe attempt.
async fn run_probe(probe: &Probe, workdir: &Path, http: &reqwest::Client) -> Result<(), String> {
    match probe {
        Probe::Http { url } => {
            let response = http
                .get(url)
                .send()
                .await
                .map_err(|e| format!("GET {url}: {}", crate::error_chain(&e)))?;
            if response.status().is_success() {
                Ok(())
            } else {
                Err(format!("GET {url} answered {}", response.status()))
            }
        }
        Probe::Tcp { address } => tokio::net::TcpStream::connect(address)
            .await
            .map(drop)
            .map_err(|e| format!("connect {address}: {e}")),
        Probe::Command { argv } => {
            let (program, args) = argv.split_first().ok_or("empty probe command")?;
            let status = tokio::process::Command::new(program)
                .args(args)
                .current_dir(workdir)
                .stdin(std::process::Stdio::null())
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::null())
                .kill_on_drop(true)
                .status()
                .await
                .map_err(|e| format!("{program}: {e}"))?;
            if status.success() {
                Ok(())
            } else {
                Err(format!("{program} exited with {status}"))
            }
        }
    }
}
