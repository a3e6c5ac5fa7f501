//! Artifacts over MQTT: answers devices' block requests from the artifact
//! store, for sites where a device reaches only the broker.
//!
//! A request arrives on `ferry/v1/devices/{id}/fetch` (the broker has
//! already checked that the device published under its own id). The device
//! may fetch only an artifact that its desired state names; anything else
//! is answered with a refusal frame, so the device stops at once with a
//! reason instead of timing out. Blocks go to that device's own `blocks`
//! topic, which only it may subscribe to.
//!
//! Each request reads its range in block-sized reads and publishes block by
//! block, so the manager holds at most one block per request in memory; a
//! few blocks are read and published at once across all devices. A device
//! gets at most [`MAX_REQUESTS_IN_FLIGHT`] requests served at a time; more
//! are dropped (an agent never has more out, and asks again for what does
//! not come), so one device cannot keep the server to itself.
//!
//! What a device has not read yet is bounded by bytes: on the embedded
//! broker, a block is published only while the broker holds less than
//! [`BYTES_IN_FLIGHT`] of the device's messages unread. A device that stops
//! reading its socket stalls its own requests, which end after
//! [`STALL_LIMIT`], instead of piling its artifact into the broker's
//! memory. (An external broker bounds this with its own per-client queue
//! limit, mosquitto's `max_queued_bytes`.)

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use ferry_protocol::blocks::{Frame, MAX_REQUESTS_IN_FLIGHT};
use ferry_protocol::messages::{BlockRequest, Message};
use ferry_protocol::topics::{Topic, TopicKind};
use rumqttc::AsyncClient;
use tokio::io::{AsyncReadExt, AsyncSeekExt};
use tokio::sync::{Semaphore, mpsc};

use super::metrics::Metrics;
use super::store::Store;

/// Blocks read and published at the same time, across all devices.
const CONCURRENT_BLOCKS: usize = 16;

/// The most of a device's blocks the broker may hold unread.
pub const BYTES_IN_FLIGHT: u64 = 2 * 1024 * 1024;

/// How long a request waits for its device to read before it is dropped.
pub const STALL_LIMIT: std::time::Duration = std::time::Duration::from_secs(30);

/// One device's request, as the ingest loop hands it over.
#[derive(Debug)]
pub struct Incoming {
    /// The requesting device (from the topic the broker let it publish on).
    pub device: ferry_protocol::DeviceId,
    /// The request's payload, not yet read.
    pub payload: Vec<u8>,
}

/// What the block server needs.
pub struct BlockServer {
    /// Desired states, for the check that a device was told to install an artifact.
    pub store: Arc<Store>,
    /// The artifact store.
    pub artifacts: PathBuf,
    /// The manager's MQTT client.
    pub client: AsyncClient,
    /// Counters.
    pub metrics: Metrics,
    /// What each device has not read yet (the embedded broker tells).
    pub backlog: Option<Arc<Backlog>>,
    /// Blocks being read and published ([`CONCURRENT_BLOCKS`] at most).
    pub slots: Semaphore,
}

impl BlockServer {
    /// A block server for `store`'s devices from `artifacts`, publishing
    /// with `client`.
    pub fn new(
        store: Arc<Store>,
        artifacts: PathBuf,
        client: AsyncClient,
        metrics: Metrics,
        backlog: Option<Arc<Backlog>>,
    ) -> Self {
        Self {
            store,
            artifacts,
            client,
            metrics,
            backlog,
            slots: Semaphore::new(CONCURRENT_BLOCKS),
        }
    }

    /// Serves requests until the channel closes.
    pub async fn run(self, mut requests: mpsc::Receiver<Incoming>) {
        let server = Arc::new(self);
        let per_device = Arc::new(PerDevice::default());
        while let Some(incoming) = requests.recv().await {
            let Some(turn) = per_device.take(&incoming.device) else {
                tracing::warn!(device = %incoming.device, "block request dropped: {MAX_REQUESTS_IN_FLIGHT} already in flight");
                server.count("throttled");
                continue;
            };
            let server = server.clone();
            tokio::spawn(async move {
                server.serve(incoming).await;
                drop(turn);
            });
        }
    }

    async fn serve(&self, incoming: Incoming) {
        let device = incoming.device;
        let request = match BlockRequest::decode(&incoming.payload) {
            Ok(request) => request,
            Err(e) => {
                // Without a readable artifact id there is no one to answer.
                tracing::warn!(%device, "block request refused: {e}");
                self.count("malformed");
                return;
            }
        };
        let artifact = request.artifact;
        let served = match self.check(&device, &request).await {
            Err(reason) => Err(("refused", reason)),
            Ok(()) => self.send_range(&device, &request).await,
        };
        match served {
            Ok(_) => self.count("served"),
            // The device stops at once, with the reason, instead of timing out.
            // A device that does not read would not read a refusal either;
            // one that only fell behind asks again for what it lacks.
            Err(("stalled", reason)) => {
                tracing::warn!(%device, %artifact, "block request stalled: {reason}");
                self.count("stalled");
            }
            Err((result, reason)) => {
                tracing::warn!(%device, %artifact, "block request {result}: {reason}");
                self.count(result);
                let refusal = Frame::Refused {
                    artifact,
                    reason: &reason,
                };
                self.send(&device, refusal).await;
            }
        }
    }

    /// Whether `device` may have these bytes: its desired state must name
    /// the artifact.
    async fn check(
        &self,
        device: &ferry_protocol::DeviceId,
        request: &BlockRequest,
    ) -> Result<(), String> {
        let assigned = self
            .store
            .desires_artifact(device.as_str(), &request.artifact)
            .await
            .map_err(|e| format!("the manager cannot read desired states: {e}"))?;
        if !assigned {
            return Err(format!(
                "artifact {} is not in {device}'s desired state",
                request.artifact
            ));
        }
        Ok(())
    }

    /// Waits until the broker holds less than [`BYTES_IN_FLIGHT`] of
    /// `device`'s blocks unread; false when it stays behind for
    /// [`STALL_LIMIT`].
    async fn device_keeps_up(&self, device: &ferry_protocol::DeviceId) -> bool {
        let Some(backlog) = &self.backlog else {
            return true;
        };
        tokio::time::timeout(STALL_LIMIT, backlog.below(device.as_str(), BYTES_IN_FLIGHT))
            .await
            .is_ok()
    }

    /// Reads the range block by block and publishes each; the bytes sent.
    async fn send_range(
        &self,
        device: &ferry_protocol::DeviceId,
        request: &BlockRequest,
    ) -> Result<u64, (&'static str, String)> {
        let failed = |reason: String| ("failed", reason);
        let path = self.artifacts.join(request.artifact.to_string());
        let mut file = tokio::fs::File::open(&path)
            .await
            .map_err(|e| format!("artifact {} is not in the store: {e}", request.artifact))
            .map_err(failed)?;
        let size = file
            .metadata()
            .await
            .map_err(|e| failed(format!("cannot read artifact {}: {e}", request.artifact)))?
            .len();
        let blocks = request.blocks(size).ok_or_else(|| {
            failed(format!(
                "offset {} is past the end of artifact {} ({size} bytes)",
                request.offset, request.artifact
            ))
        })?;
        file.seek(std::io::SeekFrom::Start(request.offset))
            .await
            .map_err(|e| failed(format!("cannot read artifact {}: {e}", request.artifact)))?;
        let mut buf = vec![0u8; request.block_size as usize];
        let mut sent = 0u64;
        for (offset, len) in blocks {
            if !self.device_keeps_up(device).await {
                return Err((
                    "stalled",
                    format!(
                        "{device} read none of its last {} KiB of blocks for {}s; the rest of the request is dropped",
                        BYTES_IN_FLIGHT / 1024,
                        STALL_LIMIT.as_secs()
                    ),
                ));
            }
            // A slot only for the read and the publish: a device that waits
            // above holds none.
            let Ok(_slot) = self.slots.acquire().await else {
                return Err(failed("the block server is stopping".into()));
            };
            let data = &mut buf[..len as usize];
            file.read_exact(data)
                .await
                .map_err(|e| failed(format!("cannot read artifact {}: {e}", request.artifact)))?;
            let frame = Frame::Block {
                artifact: request.artifact,
                offset,
                data,
            };
            let encoded = frame.encode();
            if let Some(backlog) = &self.backlog {
                backlog.published(device.as_str(), encoded.len());
            }
            if !self.publish(device, encoded).await {
                return Err(failed("the manager's broker connection is closed".into()));
            }
            self.metrics.mqtt_block_bytes.inc_by(u64::from(len));
            sent += u64::from(len);
        }
        Ok(sent)
    }

    /// Publishes one frame on the device's `blocks` topic; false when the
    /// client is gone.
    async fn send(&self, device: &ferry_protocol::DeviceId, frame: Frame<'_>) -> bool {
        self.publish(device, frame.encode()).await
    }

    async fn publish(&self, device: &ferry_protocol::DeviceId, frame: Vec<u8>) -> bool {
        let topic = Topic::new(device.clone(), TopicKind::Blocks).to_string();
        self.client
            .publish(topic, super::ingest::qos(TopicKind::Blocks), false, frame)
            .await
            .is_ok()
    }

    fn count(&self, result: &str) {
        self.metrics
            .mqtt_block_requests
            .with_label_values(&[result])
            .inc();
    }
}

/// Block bytes published to each device and what of them the broker has
/// written to it: the difference is what it has not read, held in the
/// broker's memory.
#[derive(Default)]
pub struct Backlog {
    counts: Mutex<HashMap<String, (u64, u64)>>,
    read: tokio::sync::Notify,
}

impl Backlog {
    /// `bytes` more were published to `device`.
    pub fn published(&self, device: &str, bytes: usize) {
        let mut counts = self.counts.lock().unwrap_or_else(|e| e.into_inner());
        counts.entry(device.to_owned()).or_default().0 += bytes as u64;
    }

    /// The broker wrote (or dropped) `bytes` of `device`'s blocks.
    pub fn delivered(&self, device: &str, bytes: usize) {
        let mut counts = self.counts.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((published, delivered)) = counts.get_mut(device) {
            *delivered = (*delivered + bytes as u64).min(*published);
        }
        drop(counts);
        self.read.notify_waiters();
    }

    /// `device`'s session ended: whatever it held is gone with it.
    pub fn forget(&self, device: &str) {
        let mut counts = self.counts.lock().unwrap_or_else(|e| e.into_inner());
        counts.remove(device);
        drop(counts);
        self.read.notify_waiters();
    }

    /// Bytes published to `device` and not yet written to it.
    pub fn unread(&self, device: &str) -> u64 {
        let counts = self.counts.lock().unwrap_or_else(|e| e.into_inner());
        counts.get(device).map_or(0, |(p, d)| p - d)
    }

    /// Returns once less than `limit` bytes of `device`'s are unread.
    pub async fn below(&self, device: &str, limit: u64) {
        loop {
            let read = self.read.notified();
            tokio::pin!(read);
            read.as_mut().enable();
            if self.unread(device) < limit {
                return;
            }
            read.await;
        }
    }
}

/// Requests being served, per device.
#[derive(Default)]
struct PerDevice(Mutex<HashMap<ferry_protocol::DeviceId, u32>>);

/// One request's place in its device's count, given back when dropped.
struct Turn {
    counts: Arc<PerDevice>,
    device: ferry_protocol::DeviceId,
}

impl PerDevice {
    /// A turn for `device`, unless it has the most requests in flight.
    fn take(self: &Arc<Self>, device: &ferry_protocol::DeviceId) -> Option<Turn> {
        let mut counts = self.0.lock().unwrap_or_else(|e| e.into_inner());
        let count = counts.entry(device.clone()).or_insert(0);
        if *count >= MAX_REQUESTS_IN_FLIGHT {
            return None;
        }
        *count += 1;
        Some(Turn {
            counts: self.clone(),
            device: device.clone(),
        })
    }
}

impl Drop for Turn {
    fn drop(&mut self) {
        let mut counts = self.counts.0.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(count) = counts.get_mut(&self.device) {
            *count -= 1;
            if *count == 0 {
                counts.remove(&self.device);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_device_gets_a_bounded_number_of_turns() {
        let counts = Arc::new(PerDevice::default());
        let gw1 = ferry_protocol::DeviceId::new("gw-1").unwrap();
        let gw2 = ferry_protocol::DeviceId::new("gw-2").unwrap();
        let mut turns: Vec<Turn> = (0..MAX_REQUESTS_IN_FLIGHT)
            .map(|_| counts.take(&gw1).unwrap())
            .collect();
        assert!(counts.take(&gw1).is_none(), "one turn too many");
        assert!(counts.take(&gw2).is_some(), "another device waits on gw-1");
        turns.pop();
        assert!(
            counts.take(&gw1).is_some(),
            "a finished request frees a turn"
        );
        drop(turns);
        assert!(counts.0.lock().unwrap().get(&gw1).is_none());
    }
}
