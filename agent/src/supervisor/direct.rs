//! The direct supervisor: the agent runs each service itself.
//!
//! Each service gets a task that owns its child process: it restarts the
//! child with backoff when it exits, and takes commands (restart, stop,
//! signal) over a channel. Its state is published on a watch channel, so
//! reading it never waits.
//!
//! A service runs in its own process group, so stopping it stops whatever it
//! forked. Its pid and start time go to `run/<service>.pid`: if the agent
//! dies and restarts, it finds the processes it left behind and stops them
//! before starting its own, so a service never runs twice. The start time
//! tells a leftover process from an unrelated one that reused its pid.
//!
//! Its output goes through a pipe to `logs/<service>.log`, capped and
//! rotated ([`service_log`]). It runs as the user [`service_user`] gives it:
//! by default a uid of its own, which cannot write the agent's files.

use std::collections::HashMap;
use std::fs;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use ferry_protocol::ServiceName;
use ferry_protocol::messages::ServiceState;
use nix::sys::signal::{Signal, killpg};
use nix::unistd::Pid;
use tokio::process::{Child, Command};
use tokio::sync::{Notify, mpsc, oneshot, watch};
use tokio::time::{Instant, sleep_until, timeout};

use super::{ServiceSpec, ServiceStatus, SupervisorError, service_log, service_user};
use crate::layout::Layout;

/// How long a service a previous agent left running gets between SIGTERM
/// and SIGKILL (its release's own timeout is not known then).
const STOP_GRACE: Duration = Duration::from_secs(5);
/// First and largest wait before restarting a service that exited.
const BACKOFF_MIN: Duration = Duration::from_secs(1);
const BACKOFF_MAX: Duration = Duration::from_secs(30);
/// A run this long resets the backoff.
const STABLE_RUN: Duration = Duration::from_secs(10);

enum Order {
    Restart(oneshot::Sender<Result<(), String>>),
    Stop(oneshot::Sender<()>),
    Signal(Signal),
}

struct Handle {
    spec: ServiceSpec,
    commands: mpsc::UnboundedSender<Order>,
    status: watch::Receiver<ServiceStatus>,
}

/// Runs services as the agent's own children.
pub struct Direct {
    layout: Layout,
    log_bytes: u64,
    services: Mutex<HashMap<ServiceName, Handle>>,
    /// Signalled by every service task on a state change.
    changed: Arc<Notify>,
}

/// Stops a service's process and waits until it is gone.
async fn stop_and_wait(handle: &Handle) {
    let (reply, done) = oneshot::channel();
    if handle.commands.send(Order::Stop(reply)).is_ok() {
        let _ = done.await;
    }
}

impl Direct {
    /// A supervisor keeping pid files and logs under `layout`. Processes a
    /// previous agent left running are stopped first.
    /// Each service's log keeps at most `log_bytes` (and one older file).
    pub fn new(layout: Layout, log_bytes: u64) -> std::io::Result<Self> {
        fs::create_dir_all(layout.run_dir())?;
        fs::create_dir_all(layout.logs())?;
        stop_leftovers(&layout.run_dir());
        Ok(Self {
            log_bytes,
            layout,
            services: Mutex::new(HashMap::new()),
            changed: Arc::new(Notify::new()),
        })
    }

    pub(super) async fn apply(&self, spec: &ServiceSpec) -> Result<(), SupervisorError> {
        let replaced = {
            let mut services = self.lock();
            if services.get(&spec.service).is_some_and(|h| h.spec == *spec) {
                return Ok(());
            }
            services.remove(&spec.service)
        };
        // The old process must be gone before a new one can start: two
        // instances of a service must never overlap.
        if let Some(old) = replaced {
            stop_and_wait(&old).await;
        }
        let (commands, rx) = mpsc::unbounded_channel();
        let (status_tx, status) = watch::channel(ServiceStatus {
            state: ServiceState::Inactive,
            pid: None,
            restarts: 0,
            last_exit: None,
        });
        let runner = Runner {
            spec: spec.clone(),
            layout: self.layout.clone(),
            pid_file: self.layout.run_dir().join(format!("{}.pid", spec.service)),
            log_file: self.layout.logs().join(format!("{}.log", spec.service)),
            log_bytes: self.log_bytes,
            status: status_tx,
            changed: self.changed.clone(),
        };
        tokio::spawn(runner.run(rx));
        self.lock().insert(
            spec.service.clone(),
            Handle {
                spec: spec.clone(),
                commands,
                status,
            },
        );
        Ok(())
    }

    pub(super) async fn restart(&self, service: &ServiceName) -> Result<(), SupervisorError> {
        let (reply, answer) = oneshot::channel();
        self.send(service, Order::Restart(reply))?;
        match answer.await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(SupervisorError::Io {
                what: format!("starting {service}"),
                error: std::io::Error::other(e),
            }),
            Err(_) => Err(SupervisorError::Unknown(service.clone())),
        }
    }

    pub(super) async fn stop(&self, service: &ServiceName) -> Result<(), SupervisorError> {
        let (reply, done) = oneshot::channel();
        self.send(service, Order::Stop(reply))?;
        let _ = done.await;
        Ok(())
    }

    pub(super) async fn remove(&self, service: &ServiceName) -> Result<(), SupervisorError> {
        let handle = self.lock().remove(service);
        if let Some(handle) = handle {
            stop_and_wait(&handle).await;
        }
        Ok(())
    }

    /// Resolves when any service's state has changed since the last call.
    pub async fn changed(&self) {
        self.changed.notified().await;
    }

    pub(super) fn status(&self, service: &ServiceName) -> Result<ServiceStatus, SupervisorError> {
        self.lock()
            .get(service)
            .map(|h| *h.status.borrow())
            .ok_or_else(|| SupervisorError::Unknown(service.clone()))
    }

    pub(super) fn signal(
        &self,
        service: &ServiceName,
        signal: Signal,
    ) -> Result<(), SupervisorError> {
        self.send(service, Order::Signal(signal))
    }

    fn send(&self, service: &ServiceName, command: Order) -> Result<(), SupervisorError> {
        self.lock()
            .get(service)
            .and_then(|h| h.commands.send(command).ok())
            .ok_or_else(|| SupervisorError::Unknown(service.clone()))
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<ServiceName, Handle>> {
        // A panic while holding the lock cannot leave the map half-changed.
        self.services.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// The task that owns one service's process.
struct Runner {
    spec: ServiceSpec,
    layout: Layout,
    pid_file: PathBuf,
    log_file: PathBuf,
    log_bytes: u64,
    status: watch::Sender<ServiceStatus>,
    changed: Arc<Notify>,
}

impl Runner {
    async fn run(self, mut commands: mpsc::UnboundedReceiver<Order>) {
        let mut child: Option<(Child, Instant)> = None;
        let mut wanted = false;
        let mut restarts = 0u32;
        let mut backoff = BACKOFF_MIN;
        let mut restart_at: Option<Instant> = None;
        loop {
            tokio::select! {
                command = commands.recv() => match command {
                    None => {
                        self.stop(&mut child).await;
                        return;
                    }
                    Some(Order::Restart(reply)) => {
                        self.stop(&mut child).await;
                        // A new start: how the last process ended is
                        // history, not this run's.
                        self.status.send_modify(|s| s.last_exit = None);
                        wanted = true;
                        restarts = 0;
                        backoff = BACKOFF_MIN;
                        restart_at = None;
                        let started = self.start(&mut child, restarts);
                        if started.is_err() {
                            restart_at = Some(Instant::now() + backoff);
                        }
                        let _ = reply.send(started);
                    }
                    Some(Order::Stop(reply)) => {
                        wanted = false;
                        restart_at = None;
                        self.stop(&mut child).await;
                        let _ = reply.send(());
                    }
                    Some(Order::Signal(signal)) => {
                        if let Some((c, _)) = &child {
                            if let Some(pid) = c.id() {
                                let _ = killpg(Pid::from_raw(pid as i32), signal);
                            }
                        }
                    }
                },
                (status, ran_for) = wait_exit(&mut child) => {
                    child = None;
                    // Kept with the state, for the operator's reasons.
                    let exit = super::Exit {
                        code: status.and_then(|s| s.code()),
                        signal: status.and_then(|s| s.signal()),
                        ran_for: Some(ran_for),
                    };
                    self.status.send_modify(|s| s.last_exit = Some(exit));
                    remove_pid_file(&self.pid_file);
                    if ran_for >= STABLE_RUN {
                        backoff = BACKOFF_MIN;
                    }
                    if wanted {
                        self.publish(ServiceState::Activating, None, restarts);
                        restart_at = Some(Instant::now() + backoff);
                        backoff = (backoff * 2).min(BACKOFF_MAX);
                    } else {
                        self.publish(ServiceState::Inactive, None, restarts);
                    }
                },
                () = wait_until(restart_at) => {
                    restart_at = None;
                    restarts = restarts.saturating_add(1);
                    if self.start(&mut child, restarts).is_err() {
                        restart_at = Some(Instant::now() + backoff);
                        backoff = (backoff * 2).min(BACKOFF_MAX);
                    }
                },
            }
        }
    }

    fn start(&self, child: &mut Option<(Child, Instant)>, restarts: u32) -> Result<(), String> {
        let spawned = (|| {
            let mut command = Command::new(&self.spec.exec);
            command
                .args(&self.spec.args)
                // The agent's own environment stays with the agent.
                .env_clear()
                .envs(self.spec.env.iter().map(|(k, v)| (k, v)))
                .current_dir(&self.spec.workdir)
                .stdin(Stdio::null())
                .process_group(0);
            let identity = service_user::prepare(&self.layout, &self.spec)?;
            if let Some((uid, gid)) = identity.ids {
                command.uid(uid.as_raw()).gid(gid.as_raw());
            }
            command.envs(identity.env);
            // The release's own variables still win.
            command.envs(self.spec.env.iter().skip(1).map(|(k, v)| (k, v)));
            let (output, input) = service_log::pipe()?;
            let err = input.try_clone()?;
            let child = command
                .stdout(Stdio::from(input))
                .stderr(Stdio::from(err))
                .spawn()?;
            tokio::spawn(service_log::keep(
                output,
                self.log_file.clone(),
                self.log_bytes,
            ));
            Ok::<_, std::io::Error>(child)
        })();
        match spawned {
            Ok(c) => {
                let pid = c.id();
                if let Some(pid) = pid {
                    write_pid_file(&self.pid_file, pid);
                }
                *child = Some((c, Instant::now()));
                self.publish(ServiceState::Active, pid, restarts);
                Ok(())
            }
            Err(e) => {
                tracing::warn!(service = %self.spec.service, error = %e, "cannot start");
                self.publish(ServiceState::Failed, None, restarts);
                Err(format!("{}: {e}", self.spec.exec.display()))
            }
        }
    }

    /// The release's stop signal to the process group, SIGKILL after its
    /// stop timeout.
    async fn stop(&self, child: &mut Option<(Child, Instant)>) {
        if let Some((mut c, _)) = child.take() {
            if let Some(pid) = c.id() {
                let group = Pid::from_raw(pid as i32);
                let _ = killpg(group, self.spec.stop_signal);
                if timeout(self.spec.stop_timeout, c.wait()).await.is_err() {
                    let _ = killpg(group, Signal::SIGKILL);
                    let _ = c.wait().await;
                }
                // Children the service forked may outlive it; end them too.
                let _ = killpg(group, Signal::SIGKILL);
            }
            remove_pid_file(&self.pid_file);
        }
        let restarts = self.status.borrow().restarts;
        self.publish(ServiceState::Inactive, None, restarts);
    }

    fn publish(&self, state: ServiceState, pid: Option<u32>, restarts: u32) {
        let new = ServiceStatus {
            state,
            pid,
            restarts,
            last_exit: self.status.borrow().last_exit,
        };
        if self.status.send_replace(new) != new {
            self.changed.notify_one();
        }
    }
}

/// Resolves when the child exits, with how and after how long; never
/// without a child.
async fn wait_exit(
    child: &mut Option<(Child, Instant)>,
) -> (Option<std::process::ExitStatus>, Duration) {
    match child {
        Some((c, started)) => {
            let status = c.wait().await.ok();
            (status, started.elapsed())
        }
        None => std::future::pending().await,
    }
}

async fn wait_until(at: Option<Instant>) {
    match at {
        Some(at) => sleep_until(at).await,
        None => std::future::pending().await,
    }
}

/// A process's start time in clock ticks since boot (field 22 of
/// `/proc/PID/stat`), which tells it apart from a later process with the same pid.
fn start_time(pid: u32) -> Option<u64> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) may hold spaces; fields resume after its ')'.
    let rest = &stat[stat.rfind(')')? + 2..];
    rest.split(' ').nth(19)?.parse().ok()
}

/// Whether `pid` is still the process that started at `started` and has not
/// exited (a zombie waiting to be reaped has).
fn still_running(pid: u32, started: u64) -> bool {
    let Ok(stat) = fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return false;
    };
    let zombie = stat.rfind(')').and_then(|i| stat.get(i + 2..i + 3)) == Some("Z");
    !zombie && start_time(pid) == Some(started)
}

fn write_pid_file(path: &Path, pid: u32) {
    let line = format!("{pid} {}\n", start_time(pid).unwrap_or(0));
    if let Err(e) = crate::durable::write_file(path, line.as_bytes()) {
        tracing::warn!(path = %path.display(), error = %e, "cannot write pid file");
    }
}

fn remove_pid_file(path: &Path) {
    let _ = fs::remove_file(path);
}

/// Stops the process groups named by the pid files in `run_dir` (a data
/// directory's `run/`), when each process is still the one that was
/// started: what a previous agent left running, or what an embedding
/// program (a demo, a test) wants gone when it is done.
pub fn stop_leftovers(run_dir: &Path) {
    let Ok(entries) = fs::read_dir(run_dir) else {
        return;
    };
    for entry in entries.flatten() {
        let path = entry.path();
        if path.extension().and_then(|e| e.to_str()) != Some("pid") {
            continue;
        }
        let recorded = fs::read_to_string(&path).unwrap_or_default();
        let mut fields = recorded.split_whitespace().map(|f| f.parse::<u64>().ok());
        if let (Some(Some(pid)), Some(Some(started))) = (fields.next(), fields.next()) {
            let pid = u32::try_from(pid).unwrap_or(0);
            if pid > 1 && still_running(pid, started) {
                tracing::info!(pid, file = %path.display(), "stopping a service left running by a previous agent");
                let group = Pid::from_raw(pid as i32);
                let _ = killpg(group, Signal::SIGTERM);
                let deadline = std::time::Instant::now() + STOP_GRACE;
                while still_running(pid, started) && std::time::Instant::now() < deadline {
                    std::thread::sleep(Duration::from_millis(50));
                }
                let _ = killpg(group, Signal::SIGKILL);
            }
        }
        let _ = fs::remove_file(&path);
    }
}
