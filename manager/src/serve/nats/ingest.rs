//! Device messages from a NATS cluster, each taken in once by whichever
//! replica is free. A JetStream stream ([`STREAM`]) keeps every device
//! topic the manager records, replicated across the cluster, and the
//! replicas share one durable pull consumer of it ([`CONSUMER`]). A message
//! is acknowledged only once the batch holding it is committed, so one a
//! replica took and died with comes again to another: at least once (a
//! report may be recorded twice), never lost. Block requests are not kept:
//! they go to a core NATS queue group, and a device whose request is lost
//! asks again.

use std::time::Duration;

use anyhow::{Context, Result};
use async_nats::jetstream::{self, AckKind, consumer, stream};
use ferry_protocol::acl;
use ferry_protocol::topics::{PREFIX, TopicKind};
use futures_util::StreamExt;
use tokio::sync::{mpsc, oneshot};

use crate::serve::ingest::{Intake, Recording};

/// The stream of device messages.
pub const STREAM: &str = "FERRY_DEVICES";
/// The replicas' shared consumer of it.
pub const CONSUMER: &str = "ferry-ingest";
/// Messages one replica holds unacknowledged at most: two of the
/// recorder's batches.
const IN_FLIGHT: usize = 2 * crate::serve::ingest::RECORD_BATCH;
/// The queue group block requests are shared in.
const BLOCKS_QUEUE: &str = "ferry-blocks";

/// Where the manager reaches the cluster, as itself (the callout places
/// it in the fleet's account with the manager's permissions).
#[derive(Debug, Clone)]
pub struct IngestLogin {
    /// `nats://HOST:PORT` of one or more servers.
    pub servers: Vec<String>,
    /// The manager's user name (as on MQTT).
    pub user: String,
    /// Its password.
    pub password: String,
}

/// The NATS subject of `kind` for every device.
fn all_devices(kind: TopicKind) -> String {
    acl::nats_subject(&format!("{PREFIX}/devices/*/{}", kind.segment()))
}

/// The kinds recorded through the stream: what devices publish, but block
/// requests.
fn recorded_kinds() -> impl Iterator<Item = TopicKind> {
    TopicKind::ALL
        .into_iter()
        .filter(|k| k.published_by_device() && *k != TopicKind::Fetch)
}

/// The MQTT topic a NATS subject of a device topic came from (device ids
/// and topic segments hold no dots, so no escapes to undo).
fn topic_of(subject: &str) -> String {
    subject.replace('.', "/")
}

/// Takes in device messages until the process ends, connecting again when
/// the cluster is gone; `ready` is 1 while the consumer is read, and
/// `redelivered` counts messages given out again.
pub async fn run(
    login: IngestLogin,
    mut intake: Intake,
    ready: crate::serve::ingest::Readiness,
    redelivered: prometheus::IntCounter,
) {
    let mut backoff = Duration::from_millis(200);
    loop {
        if let Err(e) = take_in(&login, &mut intake, &ready, &redelivered).await {
            tracing::warn!("NATS ingest: {e:#}; again in {backoff:?}");
        }
        ready.set_consumer(false);
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(Duration::from_secs(10));
    }
}

async fn take_in(
    login: &IngestLogin,
    intake: &mut Intake,
    ready: &crate::serve::ingest::Readiness,
    redelivered: &prometheus::IntCounter,
) -> Result<()> {
    let client = super::connect(
        &login.servers,
        &login.user,
        &login.password,
        "ferry-manager ingest",
    )
    .await?;
    let js = jetstream::new(client.clone());
    let stream = device_stream(&js).await?;
    let consumer = stream
        .get_or_create_consumer(
            CONSUMER,
            consumer::pull::Config {
                durable_name: Some(CONSUMER.into()),
                ack_policy: consumer::AckPolicy::Explicit,
                // How long a message taken by a replica that died waits
                // before another takes it (a batch commits far sooner).
                ack_wait: Duration::from_secs(10),
                max_ack_pending: 50_000,
                ..Default::default()
            },
        )
        .await
        .context("cannot make the ingest consumer")?;
    let mut messages = consumer
        .messages()
        .await
        .context("cannot read the ingest consumer")?;
    let mut fetches = client
        .queue_subscribe(all_devices(TopicKind::Fetch), BLOCKS_QUEUE.into())
        .await
        .context("cannot subscribe to block requests")?;
    // At most this many messages wait here for their batch's commit: when
    // the database falls behind, this replica stops taking and leaves the
    // rest to the others. Unbounded, a slow replica could hold more than it
    // commits within the acknowledgement wait; the stream would then give
    // them to another replica as well, and both would record them: more
    // work from being slow.
    let (acks, pending) = mpsc::channel(IN_FLIGHT);
    let acknowledger = tokio::spawn(acknowledge(pending));
    ready.set_consumer(true);
    tracing::info!(servers = %login.servers.join(", "), "taking in device messages from NATS");
    let result = loop {
        tokio::select! {
            message = messages.next() => match message {
                Some(Ok(message)) => {
                    if message.info().is_ok_and(|i| i.delivered > 1) {
                        redelivered.inc();
                    }
                    let topic = topic_of(&message.subject);
                    match intake.take(&topic, &message.payload).await {
                        Some(record) => {
                            let (committed, done) = oneshot::channel();
                            intake.record(Recording { record, committed: Some(committed) }).await;
                            if acks.send((done, message)).await.is_err() {
                                break Err(anyhow::anyhow!("the acknowledger stopped"));
                            }
                        }
                        // Nothing to record (or refused): done with it.
                        None => {
                            if let Err(e) = message.ack().await {
                                tracing::warn!("NATS ingest: cannot acknowledge: {e}");
                            }
                        }
                    }
                }
                Some(Err(e)) => tracing::warn!("NATS ingest: {e}"),
                None => break Err(anyhow::anyhow!("the ingest consumer ended")),
            },
            fetch = fetches.next() => match fetch {
                Some(request) => {
                    intake.take(&topic_of(&request.subject), &request.payload).await;
                }
                None => break Err(anyhow::anyhow!("the block requests subscription ended")),
            },
        }
    };
    acknowledger.abort();
    result
}

/// The stream of device messages, made on first start: replicated on three
/// servers when the cluster has them, kept until taken in (work queue), and
/// bounded (a day, 512 MiB: a whole fleet's reports for hours) so a manager
/// away for long cannot fill the cluster's disks.
async fn device_stream(js: &jetstream::Context) -> Result<stream::Stream> {
    let config = |replicas| stream::Config {
        name: STREAM.into(),
        subjects: recorded_kinds().map(all_devices).collect(),
        retention: stream::RetentionPolicy::WorkQueue,
        storage: stream::StorageType::File,
        num_replicas: replicas,
        max_age: Duration::from_secs(24 * 3600),
        max_bytes: 512 << 20,
        discard: stream::DiscardPolicy::Old,
        ..Default::default()
    };
    match js.get_or_create_stream(config(3)).await {
        Ok(stream) => Ok(stream),
        Err(three) => {
            // A cluster of fewer than three servers.
            tracing::info!("device stream on one server: not three ({three})");
            js.get_or_create_stream(config(1))
                .await
                .context("cannot make the device message stream")
        }
    }
}

/// Acknowledges each message once the recorder has committed it, in the
/// order taken (the recorder's order); one it could not record goes back
/// to the stream, for this replica or another to take again.
async fn acknowledge(mut pending: mpsc::Receiver<(oneshot::Receiver<()>, jetstream::Message)>) {
    while let Some((done, message)) = pending.recv().await {
        let acked = match done.await {
            Ok(()) => message.ack().await,
            Err(_) => message.ack_with(AckKind::Nak(None)).await,
        };
        if let Err(e) = acked {
            tracing::warn!("NATS ingest: cannot acknowledge: {e}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_stream_keeps_what_devices_report_and_no_block_traffic() {
        let subjects: Vec<String> = recorded_kinds().map(all_devices).collect();
        assert!(subjects.contains(&"ferry.v1.devices.*.reported".to_string()));
        assert!(subjects.contains(&"ferry.v1.devices.*.status".to_string()));
        assert!(
            !subjects
                .iter()
                .any(|s| s.ends_with(".fetch") || s.ends_with(".desired"))
        );
        assert_eq!(
            topic_of("ferry.v1.devices.gw-1.health"),
            "ferry/v1/devices/gw-1/health"
        );
    }
}
