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
//! Requests are served by a few tasks at once; each reads its range in
//! block-sized reads and publishes block by block, so the manager holds at
//! most one block per request in memory, and the MQTT client's bounded
//! queue paces the reads to what the broker takes. A device gets at most
//! [`MAX_REQUESTS_IN_FLIGHT`] requests served at a time; more are dropped
//! (an agent never has more out, and asks again for what does not come),
//! so one device cannot keep the server to itself.

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

/// Requests served at the same time; more wait their turn.
const CONCURRENT_REQUESTS: usize = 16;

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
}

impl BlockServer {
    /// Serves requests until the channel closes.
    pub async fn run(self, mut requests: mpsc::Receiver<Incoming>) {
        let server = Arc::new(self);
        let slots = Arc::new(Semaphore::new(CONCURRENT_REQUESTS));
        let per_device = Arc::new(PerDevice::default());
        while let Some(incoming) = requests.recv().await {
            let Some(turn) = per_device.take(&incoming.device) else {
                tracing::warn!(device = %incoming.device, "block request dropped: {MAX_REQUESTS_IN_FLIGHT} already in flight");
                server.count("throttled");
                continue;
            };
            let Ok(slot) = slots.clone().acquire_owned().await else {
                return;
            };
            let server = server.clone();
            tokio::spawn(async move {
                server.serve(incoming).await;
                drop((slot, turn));
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
        let served = match self.check(&device, &request) {
            Err(reason) => Err(("refused", reason)),
            Ok(()) => self
                .send_range(&device, &request)
                .await
                .map_err(|reason| ("failed", reason)),
        };
        match served {
            Ok(bytes) => {
                self.count("served");
                self.metrics.mqtt_block_bytes.inc_by(bytes);
            }
            // The device stops at once, with the reason, instead of timing out.
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
    fn check(
        &self,
        device: &ferry_protocol::DeviceId,
        request: &BlockRequest,
    ) -> Result<(), String> {
        let assigned = self
            .store
            .desires_artifact(device.as_str(), &request.artifact)
            .map_err(|e| format!("the manager cannot read desired states: {e}"))?;
        if !assigned {
            return Err(format!(
                "artifact {} is not in {device}'s desired state",
                request.artifact
            ));
        }
        Ok(())
    }

    /// Reads the range block by block and publishes each; the bytes sent.
    async fn send_range(
        &self,
        device: &ferry_protocol::DeviceId,
        request: &BlockRequest,
    ) -> Result<u64, String> {
        let path = self.artifacts.join(request.artifact.to_string());
        let mut file = tokio::fs::File::open(&path)
            .await
            .map_err(|e| format!("artifact {} is not in the store: {e}", request.artifact))?;
        let size = file
            .metadata()
            .await
            .map_err(|e| format!("cannot read artifact {}: {e}", request.artifact))?
            .len();
        let blocks = request.blocks(size).ok_or_else(|| {
            format!(
                "offset {} is past the end of artifact {} ({size} bytes)",
                request.offset, request.artifact
            )
        })?;
        file.seek(std::io::SeekFrom::Start(request.offset))
            .await
            .map_err(|e| format!("cannot read artifact {}: {e}", request.artifact))?;
        let mut buf = vec![0u8; request.block_size as usize];
        let mut sent = 0u64;
        for (offset, len) in blocks {
            let data = &mut buf[..len as usize];
            file.read_exact(data)
                .await
                .map_err(|e| format!("cannot read artifact {}: {e}", request.artifact))?;
            let frame = Frame::Block {
                artifact: request.artifact,
                offset,
                data,
            };
            if !self.send(device, frame).await {
                return Err("the manager's broker connection is closed".into());
            }
            sent += u64::from(len);
        }
        Ok(sent)
    }

    /// Publishes one frame on the device's `blocks` topic; false when the
    /// client is gone.
    async fn send(&self, device: &ferry_protocol::DeviceId, frame: Frame<'_>) -> bool {
        let topic = Topic::new(device.clone(), TopicKind::Blocks).to_string();
        self.client
            .publish(
                topic,
                super::ingest::qos(TopicKind::Blocks),
                false,
                frame.encode(),
            )
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
