//! Artifacts in blocks over MQTT, for devices that reach only the broker.
//!
//! The worker asks for ranges of the artifact on the device's `fetch` topic
//! and the MQTT session hands it the frames that arrive on its `blocks`
//! topic (see `ferry_protocol::blocks`). Flow control:
//! - a window: at most `requests_in_flight` requests of
//!   `blocks_per_request` blocks are outstanding, and a new one goes out as
//!   soon as the bytes of one have been written;
//! - blocks are written in order; one that comes early waits in memory
//!   (bounded by the window), a duplicate or an unasked-for one is dropped;
//! - no new block for `retry_after`, or a new broker connection, and the
//!   window is asked for again from the first byte not held;
//! - no new byte for `give_up_after` ends the attempt; the `.part` stays,
//!   and the next attempt (or the next start of the agent) resumes from it.
//!
//! While the broker is away nothing is asked; the session reconnects with
//! its own back-off.

use std::collections::BTreeMap;
use std::path::PathBuf;

use bytes::Bytes;
use ferry_protocol::DeviceId;
use ferry_protocol::blocks::Frame;
use ferry_protocol::manifest::ArtifactInfo;
use ferry_protocol::messages::{BlockRequest, MESSAGE_SCHEMA, Message};
use ferry_protocol::topics::{Topic, TopicKind};
use rumqttc::AsyncClient;
use tokio::sync::{mpsc, watch};
use tokio::time::{Instant, sleep_until};

use super::{FetchError, Resumed, Staging};
use crate::config::TransferConfig;
use crate::layout::Layout;

/// The broker connection as the session last saw it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Connection {
    /// Connected now.
    pub up: bool,
    /// Bumped on every new connection (subscriptions made afresh).
    pub generation: u64,
}

/// The session's end of the block link: it passes on what arrives on the
/// `blocks` topic and says when the connection comes and goes.
pub struct BlockSink {
    frames: mpsc::Sender<Bytes>,
    connection: watch::Sender<Connection>,
}

impl BlockSink {
    /// A frame arrived. Dropped when the worker is behind by more than the
    /// window: it asks again for what it misses.
    pub fn frame(&self, payload: Bytes) {
        if self.frames.try_send(payload).is_err() {
            tracing::debug!("block frame dropped: the install worker is behind");
        }
    }

    /// A new connection is up, with the `blocks` subscription made.
    pub fn connected(&self) {
        self.connection.send_modify(|c| {
            c.up = true;
            c.generation += 1;
        });
    }

    /// The connection is gone.
    pub fn disconnected(&self) {
        self.connection
            .send_if_modified(|c| std::mem::replace(&mut c.up, false));
    }
}

/// The install worker's end of the block link.
pub struct BlockLink {
    client: AsyncClient,
    fetch_topic: String,
    frames: mpsc::Receiver<Bytes>,
    connection: watch::Receiver<Connection>,
}

/// A block link between the session (which owns `client`'s event loop) and
/// the install worker, with room for `settings`' window of frames.
pub fn link(
    client: AsyncClient,
    device: &DeviceId,
    settings: &TransferConfig,
) -> (BlockSink, BlockLink) {
    let window_blocks = settings.requests_in_flight as usize * settings.blocks_per_request as usize;
    let (frames_tx, frames_rx) = mpsc::channel(window_blocks + 8);
    let (connection_tx, connection_rx) = watch::channel(Connection::default());
    (
        BlockSink {
            frames: frames_tx,
            connection: connection_tx,
        },
        BlockLink {
            client,
            fetch_topic: Topic::new(device.clone(), TopicKind::Fetch).to_string(),
            frames: frames_rx,
            connection: connection_rx,
        },
    )
}

impl BlockLink {
    /// Publishes a request; false if the client cannot take it now.
    fn ask(&self, artifact: &ArtifactInfo, offset: u64, length: u64, block_size: u32) -> bool {
        let request = BlockRequest {
            schema: MESSAGE_SCHEMA,
            artifact: artifact.sha256,
            offset,
            length,
            block_size,
        };
        self.client
            .try_publish(
                &self.fetch_topic,
                crate::mqtt::qos(TopicKind::Fetch),
                false,
                request.encode(),
            )
            .is_ok()
    }
}

/// Which bytes are written, asked for, and waiting their turn.
#[derive(Debug)]
struct Window {
    size: u64,
    block_size: u64,
    request_bytes: u64,
    window_bytes: u64,
    /// The first byte not yet written.
    next: u64,
    /// The first byte not yet asked for.
    asked: u64,
    /// Blocks that came before their turn, by offset.
    early: BTreeMap<u64, Bytes>,
}

impl Window {
    fn new(held: u64, size: u64, settings: &TransferConfig) -> Self {
        let block_size = u64::from(settings.block_size);
        let request_bytes = block_size * u64::from(settings.blocks_per_request);
        Self {
            size,
            block_size,
            request_bytes,
            window_bytes: request_bytes * u64::from(settings.requests_in_flight),
            next: held,
            asked: held,
            early: BTreeMap::new(),
        }
    }

    /// The next range to ask for, if the window has room for all of it.
    fn next_request(&mut self) -> Option<(u64, u64)> {
        if self.asked >= self.size {
            return None;
        }
        let length = self.request_bytes.min(self.size - self.asked);
        if self.asked - self.next + length > self.window_bytes {
            return None;
        }
        let range = (self.asked, length);
        self.asked += length;
        Some(range)
    }

    /// Takes a block; returns the blocks now ready to write, in order.
    /// Only whole blocks on the grid of what was asked are kept, so the
    /// early ones never hold more than the window.
    fn accept(&mut self, offset: u64, data: Bytes) -> Vec<Bytes> {
        let expected_len = self.block_size.min(self.size.saturating_sub(offset));
        let len = data.len() as u64;
        if offset < self.next || offset >= self.asked || len != expected_len {
            return Vec::new();
        }
        if (offset - self.next) % self.block_size != 0 {
            return Vec::new();
        }
        if offset > self.next {
            self.early.entry(offset).or_insert(data);
            return Vec::new();
        }
        let mut ready = vec![data];
        self.next += len;
        while let Some(data) = self.early.remove(&self.next) {
            self.next += data.len() as u64;
            ready.push(data);
        }
        ready
    }

    /// Forgets what was asked: everything from `next` is asked again.
    fn rewind(&mut self) {
        self.asked = self.next;
        self.early.clear();
    }
}

/// Fetches an artifact in blocks over MQTT into the same `.part` file and
/// hash check as an HTTP download, resuming from what that file holds.
/// `progress` is called with (bytes held, total) as blocks are written.
pub async fn fetch(
    link: &mut BlockLink,
    artifact: &ArtifactInfo,
    layout: &Layout,
    settings: &TransferConfig,
    mut progress: impl FnMut(u64, u64),
) -> Result<PathBuf, FetchError> {
    let mut staging = match Staging::resume(layout, artifact)? {
        Resumed::Done(path) => return Ok(path),
        Resumed::Partial(staging) => staging,
    };
    let mut window = Window::new(staging.held(), artifact.size, settings);
    // Frames left from an earlier transfer are of no use now.
    while link.frames.try_recv().is_ok() {}
    let stalled = |have: u64, reason: String| FetchError::Transfer {
        from: "the broker (MQTT blocks)".into(),
        have,
        reason,
    };
    tracing::info!(artifact = %artifact.sha256, held = window.next, size = artifact.size, "fetching over MQTT");
    let mut generation = link.connection.borrow_and_update().generation;
    let mut retry_at = Instant::now() + settings.retry_after;
    let mut give_up_at = Instant::now() + settings.give_up_after;
    loop {
        if window.next == artifact.size {
            return staging.finish();
        }
        let up = link.connection.borrow().up;
        if up {
            while let Some((offset, length)) = window.next_request() {
                if !link.ask(artifact, offset, length, settings.block_size) {
                    // The client's queue is full: ask again at the next retry.
                    window.rewind();
                    break;
                }
                retry_at = Instant::now() + settings.retry_after;
            }
        }
        tokio::select! {
            frame = link.frames.recv() => {
                let Some(payload) = frame else {
                    staging.keep();
                    return Err(stalled(window.next, "the MQTT session ended".into()));
                };
                let Ok(decoded) = Frame::decode(&payload) else {
                    tracing::debug!("unreadable block frame dropped");
                    continue;
                };
                if decoded.artifact() != artifact.sha256 {
                    continue;
                }
                let offset = match decoded {
                    Frame::Refused { reason, .. } => {
                        staging.keep();
                        return Err(FetchError::Refused(reason.to_owned()));
                    }
                    Frame::Block { offset, .. } => offset,
                };
                // The block's bytes without a copy: a slice of the payload.
                let data = payload.slice(payload.len() - block_len(&decoded)..);
                let before = window.next;
                for block in window.accept(offset, data) {
                    staging.write(&block)?;
                }
                if window.next > before {
                    progress(window.next, artifact.size);
                    retry_at = Instant::now() + settings.retry_after;
                    give_up_at = Instant::now() + settings.give_up_after;
                }
            }
            changed = link.connection.changed() => {
                if changed.is_err() {
                    staging.keep();
                    return Err(stalled(window.next, "the MQTT session ended".into()));
                }
                let now = *link.connection.borrow_and_update();
                if now.up && now.generation != generation {
                    // A new connection has a new subscription: what was in
                    // flight on the old one is lost.
                    generation = now.generation;
                    window.rewind();
                }
            }
            // Also when nothing is out: a request the client could not take
            // is asked again here.
            () = sleep_until(retry_at), if up => {
                tracing::info!(from = window.next, "blocks did not come; asking again");
                window.rewind();
                retry_at = Instant::now() + settings.retry_after;
            }
            () = sleep_until(give_up_at) => {
                staging.keep();
                return Err(stalled(
                    window.next,
                    format!("no block for {}", humantime::format_duration(settings.give_up_after)),
                ));
            }
        }
    }
}

/// The length of a block frame's data (0 for a refusal).
fn block_len(frame: &Frame<'_>) -> usize {
    match frame {
        Frame::Block { data, .. } => data.len(),
        Frame::Refused { .. } => 0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings(block: u32, per_request: u32, in_flight: u32) -> TransferConfig {
        TransferConfig {
            block_size: block,
            blocks_per_request: per_request,
            requests_in_flight: in_flight,
            ..TransferConfig::default()
        }
    }

    fn block(len: usize, fill: u8) -> Bytes {
        Bytes::from(vec![fill; len])
    }

    #[test]
    fn the_window_bounds_what_is_asked() {
        // 10 KiB in 1 KiB blocks, 2 per request, 2 requests in flight.
        let mut w = Window::new(0, 10 * 1024, &settings(1024, 2, 2));
        assert_eq!(w.next_request(), Some((0, 2048)));
        assert_eq!(w.next_request(), Some((2048, 2048)));
        assert_eq!(w.next_request(), None, "window full");
        assert_eq!(w.accept(0, block(1024, 1)).len(), 1);
        assert_eq!(w.next_request(), None, "half a request written");
        assert_eq!(w.accept(1024, block(1024, 1)).len(), 1);
        assert_eq!(w.next_request(), Some((4096, 2048)));
    }

    #[test]
    fn early_blocks_wait_and_duplicates_are_dropped() {
        let mut w = Window::new(0, 3 * 1024 + 100, &settings(1024, 4, 1));
        assert_eq!(w.next_request(), Some((0, 3 * 1024 + 100)));
        assert!(w.accept(2048, block(1024, 3)).is_empty());
        assert!(w.accept(1024, block(1024, 2)).is_empty());
        let ready = w.accept(0, block(1024, 1));
        assert_eq!(
            ready.iter().map(|b| b[0]).collect::<Vec<_>>(),
            vec![1, 2, 3]
        );
        assert_eq!(w.next, 3072);
        assert!(w.accept(0, block(1024, 1)).is_empty(), "duplicate");
        assert!(
            w.accept(3072, block(1024, 4)).is_empty(),
            "the last block is short"
        );
        assert_eq!(w.accept(3072, block(100, 4)).len(), 1);
        assert_eq!(w.next, w.size);
        assert_eq!(w.asked, w.next, "nothing left out");
    }

    #[test]
    fn blocks_off_the_grid_or_unasked_are_dropped() {
        let mut w = Window::new(0, 8 * 1024, &settings(1024, 2, 1));
        assert_eq!(w.next_request(), Some((0, 2048)));
        assert!(w.accept(512, block(1024, 9)).is_empty(), "off the grid");
        assert!(w.accept(4096, block(1024, 9)).is_empty(), "not asked for");
        assert!(w.accept(0, block(2048, 9)).is_empty(), "wrong length");
        assert!(w.early.is_empty());
    }

    #[test]
    fn a_rewind_asks_again_from_the_first_byte_not_held() {
        let mut w = Window::new(5000, 20_000, &settings(1024, 2, 2));
        assert_eq!(w.next_request(), Some((5000, 2048)));
        assert_eq!(w.next_request(), Some((7048, 2048)));
        assert!(w.accept(6024, block(1024, 2)).is_empty());
        w.rewind();
        assert!(w.early.is_empty());
        assert_eq!(w.next_request(), Some((5000, 2048)));
    }
}
