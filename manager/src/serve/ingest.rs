//! The manager's MQTT client: consumes what devices publish and publishes
//! their desired state. The same code serves the embedded broker and an
//! external one.

use std::sync::Arc;
use std::time::Duration;

use ferry_protocol::messages::{Event, Message, Outcome, Reported, StepStatus};
use ferry_protocol::topics::{Topic, TopicKind};
use rumqttc::{AsyncClient, Event as MqttEvent, EventLoop, MqttOptions, Packet, QoS};
use tokio::sync::{Notify, mpsc};

use super::store::{DeviceStep, Record, Store};
use super::{blocks, desired, rollout};

/// Whether the manager is ready for devices (`ferry_broker_subscribed`):
/// its MQTT client's subscriptions are acknowledged (on a NATS cluster,
/// one to a topic of its own: the acknowledgement comes once the cluster's
/// MQTT streams, retained messages among them, are up) and, on a cluster,
/// the shared consumer of device messages is read.
#[derive(Clone)]
pub struct Readiness {
    mqtt: Arc<std::sync::atomic::AtomicBool>,
    consumer: Option<Arc<std::sync::atomic::AtomicBool>>,
    gauge: prometheus::IntGauge,
}

impl Readiness {
    /// Readiness shown on `gauge`, waiting for a shared consumer too when
    /// `consumer`.
    pub fn new(gauge: prometheus::IntGauge, consumer: bool) -> Self {
        Self {
            mqtt: Default::default(),
            consumer: consumer.then(Default::default),
            gauge,
        }
    }

    /// The MQTT client's subscriptions are acknowledged, or lost.
    pub fn set_mqtt(&self, ready: bool) {
        self.mqtt.store(ready, std::sync::atomic::Ordering::SeqCst);
        self.show();
    }

    /// The shared consumer is read, or lost.
    pub fn set_consumer(&self, ready: bool) {
        if let Some(consumer) = &self.consumer {
            consumer.store(ready, std::sync::atomic::Ordering::SeqCst);
        }
        self.show();
    }

    fn show(&self) {
        use std::sync::atomic::Ordering::SeqCst;
        let ready = self.mqtt.load(SeqCst) && self.consumer.as_ref().is_none_or(|c| c.load(SeqCst));
        self.gauge.set(i64::from(ready));
    }
}

/// The topic the manager's MQTT client subscribes to on a NATS cluster,
/// where device messages come through the shared consumer instead: no one
/// publishes there (devices may not), and its acknowledgement says the
/// cluster's MQTT side is up.
const READY_TOPIC: &str = "ferry/v1/manager/ready";

/// A desired-state message to publish (retained).
#[derive(Debug, Clone)]
pub struct Outgoing {
    /// The device.
    pub device: String,
    /// The `desired` payload.
    pub payload: Vec<u8>,
}

/// Where the broker is and who the manager is on it.
#[derive(Debug, Clone)]
pub struct BrokerLogin {
    /// Host.
    pub host: String,
    /// Port.
    pub port: u16,
    /// User name, if the broker wants one.
    pub username: Option<String>,
    /// Password.
    pub password: Option<String>,
    /// The CA to trust for TLS (the embedded broker's); plain MQTT without.
    pub ca_pem: Option<String>,
    /// The client certificate to show over TLS.
    pub certificate: Option<Arc<ferry_agent::tls::ClientCertificate>>,
}

/// The manager's MQTT client and its event loop, not yet connected.
pub fn client(login: &BrokerLogin) -> anyhow::Result<(AsyncClient, EventLoop)> {
    // Unique per process on any host: replicas in containers are all
    // PID 1, and a broker ends the older of two sessions with one id, so
    // replicas sharing one would throw each other off (and each would
    // republish every desired state on every reconnect).
    let nonce = super::random_hex::<6>().map_err(|e| anyhow::anyhow!("no randomness: {e}"))?;
    let client_id = format!("ferry-manager-{}-{nonce}", std::process::id());
    let mut options = MqttOptions::new(client_id, login.host.clone(), login.port);
    options.set_keep_alive(Duration::from_secs(30));
    options.set_clean_session(true);
    options.set_max_packet_size(1024 * 1024, 1024 * 1024);
    if let (Some(user), Some(password)) = (&login.username, &login.password) {
        options.set_credentials(user, password);
    }
    if let Some(pem) = &login.ca_pem {
        let config = ferry_agent::tls::pinned_client_config(pem, login.certificate.clone())
            .map_err(anyhow::Error::msg)?;
        options.set_transport(rumqttc::Transport::tls_with_config(
            rumqttc::TlsConfiguration::Rustls(Arc::new(config)),
        ));
    }
    Ok(AsyncClient::new(options, 1024))
}

/// Runs the client until the process ends: reconnects with backoff, and on
/// every connection subscribes again and republishes every device's desired
/// state (a restarted broker may have lost its retained messages).
pub async fn run(
    (client, mut eventloop): (AsyncClient, EventLoop),
    store: Arc<Store>,
    outgoing: mpsc::UnboundedReceiver<Outgoing>,
    listeners: Listeners,
    subscribe: bool,
    readiness: Readiness,
) {
    let mut intake = Intake::new(store.clone(), listeners);
    tokio::spawn(publish_outgoing(client.clone(), outgoing));
    let mut backoff = Duration::from_millis(200);
    // Subscriptions of this connection not acknowledged yet.
    let mut unacknowledged = 0;
    loop {
        tokio::select! {
            event = eventloop.poll() => match event {
                Ok(MqttEvent::Incoming(Packet::ConnAck(_))) => {
                    backoff = Duration::from_millis(200);
                    tracing::info!("manager connected to the broker");
                    unacknowledged = 0;
                    let kinds = TopicKind::ALL.into_iter().filter(|k| k.published_by_device());
                    for kind in kinds.filter(|_| subscribe) {
                        if client.try_subscribe(kind.all_devices_filter(), qos(kind)).is_ok() {
                            unacknowledged += 1;
                        }
                    }
                    if !subscribe && client.try_subscribe(READY_TOPIC, QoS::AtLeastOnce).is_ok() {
                        unacknowledged += 1;
                    }
                    // Beside this loop, which must keep polling for the
                    // publishes to leave: a fleet's worth does not fit the
                    // client's queue at once.
                    tokio::spawn(republish_all(client.clone(), store.clone()));
                }
                Ok(MqttEvent::Incoming(Packet::Publish(p))) => {
                    if let Some(record) = intake.take(&p.topic, &p.payload).await {
                        intake.record(record.into()).await;
                    }
                }
                Ok(MqttEvent::Incoming(Packet::SubAck(_))) => {
                    unacknowledged -= 1;
                    if unacknowledged == 0 {
                        readiness.set_mqtt(true);
                    }
                }
                Ok(_) => {}
                Err(e) => {
                    readiness.set_mqtt(false);
                    tracing::warn!("broker connection: {e}; retrying in {backoff:?}");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(10));
                }
            },
        }
    }
}

/// Takes in device messages, from the manager's MQTT subscription or from
/// the NATS cluster's shared consumer ([`super::nats::ingest`]).
pub struct Intake {
    store: Arc<Store>,
    listeners: Listeners,
    marks: InstallingMarks,
}

impl Intake {
    /// An intake that writes to `store` and tells `listeners`.
    pub fn new(store: Arc<Store>, listeners: Listeners) -> Self {
        Self {
            store,
            listeners,
            marks: InstallingMarks::default(),
        }
    }

    /// Checks one message on `topic` and acts on it: block requests go to
    /// the block server, reports move deployments and rollouts on; what is
    /// to be recorded comes back, for [`Self::record`].
    pub async fn take(&mut self, topic: &str, payload: &[u8]) -> Option<Record> {
        let Listeners {
            wake,
            metrics,
            block_requests,
            policing,
            ..
        } = &self.listeners;
        let topic = match topic.parse::<Topic>() {
            Ok(topic) => topic,
            Err(e) => {
                metrics.mqtt_messages.with_label_values(&["invalid"]).inc();
                tracing::warn!("message not recorded: {e}");
                return None;
            }
        };
        metrics
            .mqtt_messages
            .with_label_values(&[topic.kind.segment()])
            .inc();
        if let Some(policing) = policing {
            if !policing.admit(topic.device.as_str(), topic.kind, payload.len()) {
                return None;
            }
        }
        if topic.kind == TopicKind::Fetch {
            // Served elsewhere: a transfer must not stall ingestion.
            let request = blocks::Incoming {
                device: topic.device,
                payload: payload.to_vec(),
            };
            if block_requests.try_send(request).is_err() {
                // The device asks again when its blocks do not come.
                tracing::warn!("block requests queue full; one dropped");
            }
            return None;
        }
        match ingest(&self.store, wake, &mut self.marks, &topic, payload).await {
            Ok(record) => record,
            Err(e) => {
                tracing::warn!(%topic, "message not recorded: {e}");
                None
            }
        }
    }

    /// Hands a record to the recorder, waiting only when it is far behind.
    pub async fn record(&self, recording: Recording) {
        if self.listeners.recorder.send(recording).await.is_err() {
            tracing::error!("the recorder stopped; message not recorded");
        }
    }
}

/// Publishes desired states as they come, waiting for room in the client's
/// queue (a rollout can hand over thousands at once), while the ingest loop
/// polls the connection that sends them.
async fn publish_outgoing(client: AsyncClient, mut outgoing: mpsc::UnboundedReceiver<Outgoing>) {
    while let Some(message) = outgoing.recv().await {
        publish_desired(&client, &message.device, message.payload).await;
    }
}

/// The QoS of a topic kind, from the topic table.
pub fn qos(kind: TopicKind) -> QoS {
    if kind.delivery().qos == 0 {
        QoS::AtMostOnce
    } else {
        QoS::AtLeastOnce
    }
}

async fn publish_desired(client: &AsyncClient, device: &str, payload: Vec<u8>) {
    let topic = format!("ferry/v1/devices/{device}/desired");
    if let Err(e) = client.publish(topic, QoS::AtLeastOnce, true, payload).await {
        tracing::warn!(device, "desired state not sent: {e}");
    }
}

async fn republish_all(client: AsyncClient, store: Arc<Store>) {
    match store.all_desired().await {
        Ok(all) => {
            for (device, payload) in all {
                publish_desired(&client, &device, payload.into_bytes()).await;
            }
        }
        Err(e) => tracing::error!("cannot read desired states: {e}"),
    }
}

/// The devices already marked as installing a release of a rollout or
/// deployment, so the progress events that follow the first cost no write.
/// Forgotten wholesale when large: a missing mark only costs one redundant
/// (and harmless) write.
#[derive(Default)]
struct InstallingMarks(std::collections::HashSet<(String, String, String)>);

impl InstallingMarks {
    const MAX: usize = 100_000;

    /// Whether `(rollout, device, version)` is new; remembers it.
    fn first(&mut self, rollout: &str, device: &str, version: &str) -> bool {
        if self.0.len() >= Self::MAX {
            self.0.clear();
        }
        self.0
            .insert((rollout.to_owned(), device.to_owned(), version.to_owned()))
    }
}

/// A record for the recorder, and who to tell once it is committed.
pub struct Recording {
    /// What to write.
    pub record: Record,
    /// Told when the batch holding it is committed; dropped unanswered
    /// when it is not.
    pub committed: Option<tokio::sync::oneshot::Sender<()>>,
}

impl From<Record> for Recording {
    fn from(record: Record) -> Self {
        Self {
            record,
            committed: None,
        }
    }
}

/// Who hears about device messages besides the store.
#[derive(Clone)]
pub struct Listeners {
    /// The rollout engine, woken when a rollout device's step changes.
    pub wake: Arc<Notify>,
    /// Counts messages by kind.
    pub metrics: super::metrics::Metrics,
    /// The block server's queue of artifact requests.
    pub block_requests: mpsc::Sender<blocks::Incoming>,
    /// Writes what is to be recorded ([`spawn_recorder`]).
    pub recorder: mpsc::Sender<Recording>,
    /// Device budgets, when no embedded broker enforced them already.
    pub policing: Option<super::limits::Policing>,
}

/// Checks one device message and acts on what it says about deployments;
/// returns what is to be recorded.
async fn ingest(
    store: &Store,
    wake: &Notify,
    marks: &mut InstallingMarks,
    topic: &Topic,
    payload: &[u8],
) -> anyhow::Result<Option<Record>> {
    let device = topic.device.as_str();
    // Decode before storing: malformed or oversized payloads are refused.
    match topic.kind {
        TopicKind::Reported => {
            let reported = Reported::decode(payload)?;
            if let Some(result) = &reported.last_result {
                if let Some(id) = rollout::rollout_id(result.rollout.as_deref()) {
                    let step = match result.outcome {
                        Outcome::Installed => DeviceStep::Installed,
                        Outcome::Rejected => DeviceStep::Rejected,
                        Outcome::Failed => DeviceStep::Failed,
                        Outcome::RolledBack => DeviceStep::RolledBack,
                    };
                    let release = (
                        result.release.service.as_str(),
                        result.release.version.as_str(),
                    );
                    if store
                        .report_rollout_device(
                            id,
                            device,
                            release,
                            Some((step, result.reason.as_deref())),
                        )
                        .await?
                    {
                        wake.notify_one();
                    }
                }
                if let Some(id) = desired::deployment_id(result.rollout.as_deref()) {
                    let status = serde_json::to_value(result.outcome)?;
                    store
                        .set_deployment_status(
                            id,
                            device,
                            status.as_str().unwrap_or("failed"),
                            result.reason.as_deref(),
                        )
                        .await?;
                }
            }
        }
        TopicKind::Events => {
            let event = Event::decode(payload)?;
            // Progress only says "installing": the first event of a release
            // moves the device there (the outcome comes in `reported`); the
            // ones after it change nothing and cost no write.
            let first = match (&event.rollout, &event.release) {
                (Some(rollout), Some(release)) if event.status != StepStatus::Failed => {
                    marks.first(rollout, device, release.version.as_str())
                }
                _ => false,
            };
            if let (true, Some(release)) = (first, &event.release) {
                if let Some(id) = rollout::rollout_id(event.rollout.as_deref()) {
                    let release = (release.service.as_str(), release.version.as_str());
                    store
                        .report_rollout_device(id, device, release, None)
                        .await?;
                }
                if let Some(id) = desired::deployment_id(event.rollout.as_deref()) {
                    store
                        .set_deployment_status(id, device, "installing", None)
                        .await?;
                }
            }
        }
        TopicKind::Health => {
            ferry_protocol::messages::Health::decode(payload)?;
        }
        TopicKind::Status => {
            ferry_protocol::messages::Status::decode(payload)?;
        }
        // Not the manager's to record: what it publishes, or block requests
        // (served before they get here).
        TopicKind::Desired | TopicKind::Blocks | TopicKind::Fetch => return Ok(None),
    }
    Ok(Some(Record {
        device: device.to_owned(),
        kind: topic.kind.segment(),
        payload: String::from_utf8_lossy(payload).into_owned(),
        time: super::store::now(),
    }))
}

/// The most messages the recorder writes in one transaction.
pub const RECORD_BATCH: usize = 2048;

/// Writes what the ingest loop hands over, in a task of its own: a batch
/// is whatever queued while the last one was written, so under load one
/// transaction records many messages, and ingestion never waits on the
/// database. Bumps `changes` once per batch.
pub fn spawn_recorder(
    store: Arc<Store>,
    changes: Arc<tokio::sync::watch::Sender<u64>>,
    recorded: prometheus::IntCounter,
) -> mpsc::Sender<Recording> {
    let (tx, mut rx) = mpsc::channel::<Recording>(64 * 1024);
    tokio::spawn(async move {
        let mut batch = Vec::with_capacity(RECORD_BATCH);
        let mut records = Vec::with_capacity(RECORD_BATCH);
        while rx.recv_many(&mut batch, RECORD_BATCH).await > 0 {
            records.extend(batch.iter_mut().map(|r| std::mem::take(&mut r.record)));
            match store.record_many(&records).await {
                Ok(()) => {
                    recorded.inc_by(records.len() as u64);
                    changes.send_modify(|n| *n = n.wrapping_add(1));
                    for committed in batch.drain(..).filter_map(|r| r.committed) {
                        let _ = committed.send(());
                    }
                }
                // Those waiting hear nothing, and take it as not recorded.
                Err(e) => tracing::warn!("{} device messages not recorded: {e}", records.len()),
            }
            batch.clear();
            records.clear();
        }
    });
    tx
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn two_clients_of_one_process_have_their_own_ids() {
        // Two replicas as PID 1 of their containers are two clients of
        // one process id: the ids must differ all the same.
        let login = BrokerLogin {
            host: "127.0.0.1".into(),
            port: 1883,
            username: None,
            password: None,
            ca_pem: None,
            certificate: None,
        };
        let (_, first) = client(&login).unwrap();
        let (_, second) = client(&login).unwrap();
        let (a, b) = (
            first.mqtt_options.client_id(),
            second.mqtt_options.client_id(),
        );
        assert!(a.starts_with("ferry-manager-"), "{a}");
        assert_ne!(a, b);
    }
}
