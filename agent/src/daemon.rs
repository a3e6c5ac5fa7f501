//! The agent as a long-running service: the MQTT session, the install
//! worker, health reports, the inbox, the watchdog, and config reloads.
//!
//! Two tasks on one current-thread runtime:
//! - the **session** (this module's [`run`]) keeps the MQTT connection, turns
//!   `desired` messages into the latest desired state, publishes whatever
//!   the worker reports, sends health, and feeds systemd's watchdog;
//! - the **worker** installs, one release at a time, so a long health gate
//!   never stalls the connection.

use std::future::Future;
use std::path::{Path, PathBuf};
use std::time::Duration;

use ferry_protocol::messages::{
    Connectivity, Desired, Message, Outcome, Reported, Step, StepStatus,
};
use ferry_protocol::topics::{Topic, TopicKind};
use ferry_protocol::{DeviceId, ServiceName, TrustPolicy};
use rumqttc::{AsyncClient, Event as MqttEvent, EventLoop, Packet};
use tokio::sync::{mpsc, watch};
use tokio::time::{Instant, interval, sleep_until};

use crate::config::{Config, TransferConfig};
use crate::device::{self, SetupError};
use crate::fetch::{self, mqtt::BlockLink, mqtt::BlockSink};
use crate::health::HealthProbe;
use crate::inbox;
use crate::install::{ArtifactSource, InstallRequest, Installer};
use crate::mqtt;
use crate::reload::{self, Reloader};
use crate::report::{Report, Reporter};

/// Messages to the install worker besides desired state.
enum Work {
    /// Something changed in the inbox.
    InboxChanged,
    /// The trust keys changed.
    Policy(TrustPolicy),
}

/// Runs the agent until `shutdown` resolves.
/// Runs the agent configured by the file at `config_path` until `shutdown`
/// resolves; the file is watched and safe changes apply live.
pub async fn run(config_path: &Path, shutdown: impl Future<Output = ()>) -> Result<(), SetupError> {
    let config = Config::load(config_path)?;
    run_with(config, Some(config_path), shutdown).await
}

/// Runs an agent from a configuration value (tests, fleet simulators), with
/// live reloads from `config_path` when given.
pub async fn run_with(
    mut config: Config,
    config_path: Option<&Path>,
    shutdown: impl Future<Output = ()>,
) -> Result<(), SetupError> {
    let _lock = device::lock_data_dir(&config)?;
    let (reporter, mut reports) = Reporter::channel();
    // A device with a certificate keeps it current on its own, and says
    // when a new one arrives (the session then reconnects at once).
    let (renewed_tx, mut renewed_rx) = mpsc::unbounded_channel();
    let certificate = keep_identity(&config, renewed_tx)?;
    let mut installer = device::installer(&config, reporter.clone(), certificate.clone())?;
    let supervisor = installer.supervisor().clone();
    let (desired_tx, desired_rx) = watch::channel::<Option<Desired>>(None);
    let (work_tx, work_rx) = mpsc::unbounded_channel();
    let mut session = Session::new(&config, certificate).map_err(|message| {
        SetupError::Config(crate::config::ConfigError::Parse {
            path: config_path.map(Path::to_owned).unwrap_or_default(),
            message,
        })
    })?;
    if let Some(link) = session.block_link(&config.transfer) {
        installer.set_block_link(link);
    }
    tokio::spawn(worker(installer, desired_rx, work_rx, config.inbox.clone()));

    // The inbox and the config file are watched; changes arrive as `()`.
    let (inbox_tx, mut inbox_rx) = mpsc::unbounded_channel();
    let _inbox_watcher = match &config.inbox {
        Some(dir) => Some(
            inbox::watch(dir, inbox_tx).map_err(|e| SetupError::DataDir {
                path: dir.clone(),
                error: std::io::Error::other(e),
            })?,
        ),
        None => None,
    };
    let (config_tx, mut config_rx) = mpsc::unbounded_channel();
    let _config_watcher = config_path.and_then(|path| crate::watch::file(path, config_tx));

    let mut health = HealthProbe::new(config.data_dir.clone());
    let mut health_tick = interval(config.health_interval);
    let mut last_reported: Option<Reported> = None;
    // Health ticks until a changed report goes out once more: a broker
    // may lose a message as a server fails over, and a report is sent
    // again otherwise only at the next change or connection.
    let mut echo_reported_in: u8 = 0;
    let (mut reloader, mut reload_rx) = Reloader::new();
    let watchdog = sd_notify::watchdog_enabled();
    let mut watchdog_tick = interval(watchdog.map_or(Duration::from_secs(3600), |d| d / 2));
    let _ = sd_notify::notify(&[sd_notify::NotifyState::Ready]);
    tracing::info!(device = %config.device_id, supervisor = supervisor.name(), "agent running");

    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            () = &mut shutdown => break,
            event = session.poll() => {
                match event {
                    SessionEvent::Connected => {
                        if let Some(r) = &last_reported {
                            session.publish(TopicKind::Reported, r.encode());
                        }
                    }
                    SessionEvent::Desired(payload) => match Desired::decode(&payload) {
                        Ok(desired) => {
                            desired_tx.send_replace(Some(desired));
                            // The manager sends a desired state again when it
                            // has not heard how it went: a report may have
                            // been lost in the broker (a server failing
                            // over), so the last one goes out again.
                            if let Some(r) = &last_reported {
                                session.publish(TopicKind::Reported, r.encode());
                            }
                        }
                        Err(e) if payload.is_empty() => tracing::debug!("desired state cleared: {e}"),
                        Err(e) => reporter.step(None, None, Step::Verify, StepStatus::Failed, Some(e.to_string())),
                    },
                    SessionEvent::Nothing => {}
                }
            }
            Some(report) = reports.recv() => match report {
                Report::Event(event) => session.publish(TopicKind::Events, event.encode()),
                Report::Reported(reported) => {
                    session.publish(TopicKind::Reported, reported.encode());
                    last_reported = Some(reported);
                    // A state change is news for monitoring too.
                    health_tick.reset_immediately();
                    // Once more, a health interval after the one now.
                    echo_reported_in = 2;
                }
                Report::ReloadRules(rules) => reloader.set_rules(&rules),
            },
            Some(path) = reload_rx.recv() => reloader.changed(&path),
            () = wait_until(reloader.next_due()) => {
                for (service, action) in reloader.take_due() {
                    let outcome = reload::apply(&supervisor, &service, &action).await;
                    let reason = match &outcome {
                        Ok(()) => format!("{action} after a change to a watched path"),
                        Err(e) => format!("{action} failed: {e}"),
                    };
                    let status = if outcome.is_ok() { StepStatus::Succeeded } else { StepStatus::Failed };
                    let release = last_reported
                        .as_ref()
                        .and_then(|r| r.services.iter().find(|s| s.release.service == service))
                        .map(|s| s.release.clone());
                    reporter.step(release.as_ref(), None, Step::Reload, status, Some(reason));
                }
            }
            () = supervisor.changed() => {
                // A service started, stopped or crashed: tell monitoring now.
                health_tick.reset_immediately();
            }
            _ = health_tick.tick() => {
                if let Some(reported) = &last_reported {
                    let report = health.collect(&supervisor, reported).await;
                    session.publish(TopicKind::Health, report.encode());
                    if echo_reported_in == 1 {
                        session.publish(TopicKind::Reported, reported.encode());
                    }
                    echo_reported_in = echo_reported_in.saturating_sub(1);
                }
            }
            Some(()) = inbox_rx.recv() => {
                let _ = work_tx.send(Work::InboxChanged);
            }
            Some(()) = renewed_rx.recv() => session.retry_now(),
            Some(()) = config_rx.recv() => {
                let Some(path) = config_path else { continue };
                match Config::load(path) {
                    Ok(new) => {
                        apply_config_change(&config, &new, &work_tx, &mut health_tick);
                        config = new;
                    }
                    Err(e) => tracing::warn!("config change ignored: {e}"),
                }
            }
            _ = watchdog_tick.tick(), if watchdog.is_some() => {
                let _ = sd_notify::notify(&[sd_notify::NotifyState::Watchdog]);
            }
        }
    }
    let _ = sd_notify::notify(&[sd_notify::NotifyState::Stopping]);
    if config.stop_services_on_exit {
        let services: Vec<ServiceName> = match &last_reported {
            Some(r) => r
                .services
                .iter()
                .map(|s| s.release.service.clone())
                .collect(),
            None => Vec::new(),
        };
        for service in services {
            if let Err(e) = supervisor.stop(&service).await {
                tracing::warn!(service = %service, error = %e, "cannot stop the service");
            }
        }
    }
    session.goodbye().await;
    Ok(())
}

/// Starts keeping the device's certificate current when it uses one
/// ([`crate::identity`]); what its connections show.
fn keep_identity(
    config: &Config,
    renewed: mpsc::UnboundedSender<()>,
) -> Result<Option<std::sync::Arc<crate::tls::ClientCertificate>>, SetupError> {
    let Some(broker) = config.broker.as_ref().filter(|b| b.uses_certificate()) else {
        return Ok(None);
    };
    let Some(manager) = broker
        .manager_origin()
        .map_err(crate::config::ConfigError::Invalid)?
    else {
        return Ok(None);
    };
    let layout = crate::layout::Layout::new(&config.data_dir);
    let identity =
        crate::identity::Identity::load_or_create(&layout, &config.device_id).map_err(|error| {
            SetupError::DataDir {
                path: layout.identity(),
                error,
            }
        })?;
    let certificate = identity.client_certificate();
    let http = device::http_client(broker.ca_pem.as_deref(), Some(certificate.clone()))?;
    tokio::spawn(crate::identity::keep(
        identity,
        http,
        manager,
        broker.enrol_token.clone(),
        renewed,
    ));
    Ok(Some(certificate))
}

/// Applies what can change while running: the trust keys and the health
/// interval. Other keys take effect at the next start.
fn apply_config_change(
    old: &Config,
    new: &Config,
    work: &mpsc::UnboundedSender<Work>,
    health_tick: &mut tokio::time::Interval,
) {
    if old.trust != new.trust {
        match new.trust_policy() {
            Ok(policy) => {
                tracing::info!("trust keys reloaded");
                let _ = work.send(Work::Policy(policy));
            }
            Err(e) => tracing::warn!("new trust settings ignored: {e}"),
        }
    }
    if old.health_interval != new.health_interval {
        tracing::info!(interval = ?new.health_interval, "health interval changed");
        *health_tick = interval(new.health_interval);
    }
    let restart_needed = Config {
        trust: new.trust.clone(),
        health_interval: new.health_interval,
        ..old.clone()
    } != *new;
    if restart_needed {
        tracing::warn!(
            "config changes other than [trust] and health_interval apply after a restart"
        );
    }
}

/// The install worker: reconciles desired state and processes the inbox,
/// one release at a time.
async fn worker(
    mut installer: Installer,
    mut desired: watch::Receiver<Option<Desired>>,
    mut work: mpsc::UnboundedReceiver<Work>,
    inbox: Option<PathBuf>,
) {
    installer.recover().await;
    installer.start_installed().await;
    installer.publish_state();
    if let Some(dir) = &inbox {
        process_inbox(&mut installer, dir).await;
    }
    const RETRY_MIN: Duration = Duration::from_secs(30);
    const RETRY_MAX: Duration = Duration::from_secs(600);
    let mut retry_at: Option<Instant> = None;
    let mut backoff = RETRY_MIN;
    loop {
        let reconcile_now = tokio::select! {
            changed = desired.changed() => {
                if changed.is_err() {
                    return;
                }
                backoff = RETRY_MIN;
                true
            }
            item = work.recv() => {
                match item {
                    None => return,
                    Some(Work::InboxChanged) => {
                        // One scan covers every change queued so far; a new
                        // policy queued among them still applies, first.
                        while let Ok(queued) = work.try_recv() {
                            if let Work::Policy(policy) = queued {
                                installer.set_policy(policy);
                            }
                        }
                        if let Some(dir) = &inbox {
                            process_inbox(&mut installer, dir).await;
                        }
                    }
                    Some(Work::Policy(policy)) => installer.set_policy(policy),
                }
                false
            }
            () = wait_until(retry_at) => true,
        };
        if reconcile_now {
            let current = desired.borrow_and_update().clone();
            retry_at = None;
            if let Some(current) = current {
                if reconcile(&mut installer, &current).await {
                    tracing::info!(retry_in = ?backoff, "some releases could not be installed; will retry");
                    retry_at = Some(Instant::now() + backoff);
                    backoff = (backoff * 2).min(RETRY_MAX);
                }
            }
        }
    }
}

/// Installs what `desired` asks for and is not installed. True when a
/// release failed in a way worth retrying (a download, say).
async fn reconcile(installer: &mut Installer, desired: &Desired) -> bool {
    let mut retry = false;
    // A newer trust root first: the releases may be signed by its keys.
    installer.accept_roots(&desired.roots, desired.rollout.as_deref());
    for release in &desired.releases {
        let manifest = match release.envelope.unverified_manifest() {
            Ok(manifest) => manifest,
            Err(e) => {
                // Told to the operator, not only logged: nothing else will
                // say why this release never arrives.
                installer.reporter().step(
                    None,
                    desired.rollout.as_deref(),
                    Step::Verify,
                    StepStatus::Failed,
                    Some(format!(
                        "desired state holds a release that does not read: {e}"
                    )),
                );
                continue;
            }
        };
        let installed = installer
            .state()
            .services
            .get(&manifest.service)
            .is_some_and(|i| {
                i.manifest.sequence == manifest.sequence
                    && i.manifest.artifact.sha256 == manifest.artifact.sha256
            });
        if installed || installer.state().has_failed(&manifest) {
            installer.answer_without_installing(&manifest, desired.rollout.as_deref());
            continue;
        }
        let result = installer
            .install(InstallRequest {
                envelope: release.envelope.clone(),
                source: ArtifactSource::Remote {
                    url: release.artifact_url.clone(),
                },
                rollout: desired.rollout.clone(),
                retry_failed: false,
            })
            .await;
        if matches!(result, Ok(ref r) if r.outcome == Outcome::Failed) {
            retry = true;
        }
    }
    installer.confirm_desired(&desired.releases);
    retry
}

async fn process_inbox(installer: &mut Installer, dir: &Path) {
    // Roots first: a release in the same drop may be signed by a new key.
    let roots = inbox::scan_roots(dir);
    if !roots.is_empty() {
        let offered: Vec<_> = roots.iter().map(|(_, root)| root.clone()).collect();
        installer.accept_roots(&offered, None);
        for (path, _) in roots {
            let _ = std::fs::remove_file(path);
        }
    }
    for dropped in inbox::scan(dir) {
        tracing::info!(name = %dropped.name, "installing a release from the inbox");
        let result = installer
            .install(InstallRequest {
                envelope: dropped.envelope.clone(),
                source: ArtifactSource::File(dropped.artifact.clone()),
                rollout: None,
                retry_failed: true,
            })
            .await;
        inbox::finish(dir, &dropped, &result);
    }
}

async fn wait_until(at: Option<Instant>) {
    match at {
        Some(at) => sleep_until(at).await,
        None => std::future::pending().await,
    }
}

/// What the MQTT session noticed.
enum SessionEvent {
    /// A connection was (re)established and subscriptions made.
    Connected,
    /// A message on the desired topic.
    Desired(Vec<u8>),
    /// Anything else.
    Nothing,
}

/// The MQTT connection, or none for an offline device.
struct Session {
    device: DeviceId,
    mqtt: Option<(AsyncClient, EventLoop)>,
    /// Where artifact blocks go, once the worker has the other end.
    blocks: Option<BlockSink>,
    /// Subscriptions of this connection not queued yet: the client's
    /// queue can be full of what was published while the broker was away.
    unsubscribed: Vec<(String, rumqttc::QoS)>,
    retry_at: Option<Instant>,
    backoff: Duration,
}

const BACKOFF_MIN: Duration = Duration::from_secs(1);
const BACKOFF_MAX: Duration = Duration::from_secs(60);

impl Session {
    fn new(
        config: &Config,
        certificate: Option<std::sync::Arc<crate::tls::ClientCertificate>>,
    ) -> Result<Self, String> {
        let mqtt = mqtt::options(config, certificate)?.map(|mut options| {
            options.set_request_channel_capacity(256);
            AsyncClient::new(options, 256)
        });
        Ok(Self {
            device: config.device_id.clone(),
            mqtt,
            blocks: None,
            unsubscribed: Vec::new(),
            retry_at: None,
            backoff: BACKOFF_MIN,
        })
    }

    /// The worker's end of a link for artifact blocks; none without a broker.
    fn block_link(&mut self, settings: &TransferConfig) -> Option<BlockLink> {
        let (client, _) = self.mqtt.as_ref()?;
        let (sink, link) = fetch::mqtt::link(client.clone(), &self.device, settings);
        self.blocks = Some(sink);
        Some(link)
    }

    fn topic(&self, kind: TopicKind) -> String {
        Topic::new(self.device.clone(), kind).to_string()
    }

    /// Waits for the next thing the broker says; reconnects with backoff.
    /// Never resolves for an offline device.
    async fn poll(&mut self) -> SessionEvent {
        let Some((client, eventloop)) = &mut self.mqtt else {
            return std::future::pending().await;
        };
        // Cleared only once waited out: this future is dropped whenever
        // another branch of the agent's loop fires first (a health tick),
        // and the backoff must survive that.
        if let Some(at) = self.retry_at {
            sleep_until(at).await;
            self.retry_at = None;
        }
        // Polling the event loop drains the queue: there is room now, or
        // after the next packet.
        self.unsubscribed
            .retain(|(topic, qos)| client.try_subscribe(topic.clone(), *qos).is_err());
        match eventloop.poll().await {
            Ok(MqttEvent::Incoming(Packet::ConnAck(_))) => {
                tracing::info!("connected to the broker");
                self.backoff = BACKOFF_MIN;
                // Without its subscriptions a connected device would never
                // hear of a release: none may be lost to a full queue.
                self.unsubscribed = [TopicKind::Desired, TopicKind::Blocks]
                    .into_iter()
                    .map(|kind| {
                        let topic = Topic::new(self.device.clone(), kind).to_string();
                        (topic, mqtt::subscription_qos(kind))
                    })
                    .filter(|(topic, qos)| client.try_subscribe(topic.clone(), *qos).is_err())
                    .collect();
                let status = Topic::new(self.device.clone(), TopicKind::Status).to_string();
                if let Some(sink) = &self.blocks {
                    sink.connected();
                }
                let _ = client.try_publish(
                    status,
                    mqtt::qos(TopicKind::Status),
                    true,
                    mqtt::status_payload(Connectivity::Online),
                );
                SessionEvent::Connected
            }
            Ok(MqttEvent::Incoming(Packet::Publish(publish))) => {
                match publish.topic.parse::<Topic>() {
                    Ok(topic)
                        if topic.device == self.device && topic.kind == TopicKind::Desired =>
                    {
                        SessionEvent::Desired(publish.payload.to_vec())
                    }
                    Ok(topic) if topic.device == self.device && topic.kind == TopicKind::Blocks => {
                        if let Some(sink) = &self.blocks {
                            sink.frame(publish.payload);
                        }
                        SessionEvent::Nothing
                    }
                    _ => SessionEvent::Nothing,
                }
            }
            Ok(_) => SessionEvent::Nothing,
            Err(e) => {
                if let Some(sink) = &self.blocks {
                    sink.disconnected();
                }
                tracing::warn!(retry_in = ?self.backoff, "broker connection: {e}");
                self.retry_at = Some(Instant::now() + self.backoff);
                self.backoff = (self.backoff * 2).min(BACKOFF_MAX);
                SessionEvent::Nothing
            }
        }
    }

    /// Reconnects without waiting out the backoff (a new certificate came).
    fn retry_now(&mut self) {
        if self.retry_at.take().is_some() {
            self.backoff = BACKOFF_MIN;
        }
    }

    /// Queues a message on one of this device's topics; dropped (and
    /// logged) if the queue is full while the broker is away.
    fn publish(&self, kind: TopicKind, payload: Vec<u8>) {
        let Some((client, _)) = &self.mqtt else {
            return;
        };
        let delivery = kind.delivery();
        if let Err(e) =
            client.try_publish(self.topic(kind), mqtt::qos(kind), delivery.retain, payload)
        {
            tracing::debug!(topic = ?kind, "message dropped: {e}");
        }
    }

    /// Says offline and disconnects cleanly (the last will covers a crash).
    async fn goodbye(&mut self) {
        let status = self.topic(TopicKind::Status);
        let Some((client, eventloop)) = &mut self.mqtt else {
            return;
        };
        let _ = client.try_publish(
            status,
            mqtt::qos(TopicKind::Status),
            true,
            mqtt::status_payload(Connectivity::Offline),
        );
        let _ = client.try_disconnect();
        let deadline = Instant::now() + Duration::from_secs(2);
        while Instant::now() < deadline {
            match tokio::time::timeout_at(deadline, eventloop.poll()).await {
                Ok(Ok(MqttEvent::Outgoing(rumqttc::Outgoing::Disconnect)))
                | Ok(Err(_))
                | Err(_) => break,
                Ok(Ok(_)) => {}
            }
        }
    }
}
