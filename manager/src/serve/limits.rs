//! Per-device budgets for what a device publishes: messages per second and
//! bytes per second, each with a burst. A device over its budget has its
//! messages dropped (before they reach the manager's queue or its
//! database), counted in `/metrics`, and the operator is told with an event
//! on that device at most once a minute.
//!
//! An agent stays far below the defaults: a health report every 30 s, a few
//! dozen events per install, block requests paced by its download. The
//! budget exists for a device whose password is in the wrong hands.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use ferry_protocol::topics::TopicKind;
use tokio::sync::mpsc;

use super::store::Record;

/// How much one device may publish.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct DeviceLimits {
    /// Messages per second, sustained (block requests are not counted
    /// here: the block server bounds a device's transfer by bytes).
    pub messages_per_sec: f64,
    /// Messages at once above the sustained rate.
    pub message_burst: f64,
    /// Payload bytes per second, sustained.
    pub bytes_per_sec: f64,
    /// Bytes at once above the sustained rate (at least the largest
    /// message a device sends).
    pub byte_burst: f64,
}

impl Default for DeviceLimits {
    fn default() -> Self {
        Self {
            messages_per_sec: 20.0,
            message_burst: 200.0,
            bytes_per_sec: 128.0 * 1024.0,
            byte_burst: 1024.0 * 1024.0,
        }
    }
}

/// A token bucket: `level` tokens, refilled at `rate` per second up to `burst`.
#[derive(Debug, Clone, Copy)]
struct Bucket {
    level: f64,
    at: Instant,
}

impl Bucket {
    fn full(burst: f64, now: Instant) -> Self {
        Self {
            level: burst,
            at: now,
        }
    }

    /// Takes `cost` if there is that much after refilling.
    fn take(&mut self, cost: f64, rate: f64, burst: f64, now: Instant) -> bool {
        let elapsed = now.saturating_duration_since(self.at).as_secs_f64();
        self.level = (self.level + elapsed * rate).min(burst);
        self.at = now;
        if self.level >= cost {
            self.level -= cost;
            true
        } else {
            false
        }
    }
}

/// One device's budget and what it was told.
#[derive(Debug)]
struct Budget {
    messages: Bucket,
    bytes: Bucket,
    /// Messages dropped since the last event about it.
    dropped: u64,
    /// When the operator was last told.
    told: Option<Instant>,
}

/// What to do with one message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// Within budget.
    Pass,
    /// Over budget: drop it. With a sentence for the operator when it is
    /// time to tell them (the first drop, then at most once a minute).
    Drop(Option<String>),
}

/// The budgets of every device that published lately.
#[derive(Debug)]
pub struct DeviceLimiter {
    limits: DeviceLimits,
    budgets: Mutex<HashMap<String, Budget>>,
}

/// How often an over-budget device is reported, at most.
const TELL_EVERY: Duration = Duration::from_secs(60);

/// Budgets untouched this long are forgotten (they would be full again).
const FORGET_AFTER: Duration = Duration::from_secs(600);

impl DeviceLimiter {
    /// Budgets of `limits` for every device.
    pub fn new(limits: DeviceLimits) -> Self {
        Self {
            limits,
            budgets: Mutex::new(HashMap::new()),
        }
    }

    /// Charges `device` for a message of `bytes` on a topic of `kind`.
    pub fn admit(&self, device: &str, kind: TopicKind, bytes: usize) -> Verdict {
        self.admit_at(device, kind, bytes, Instant::now())
    }

    fn admit_at(&self, device: &str, kind: TopicKind, bytes: usize, now: Instant) -> Verdict {
        let l = &self.limits;
        let mut budgets = self.budgets.lock().unwrap_or_else(|e| e.into_inner());
        if budgets.len() > 10_000 {
            budgets.retain(|_, b| now.saturating_duration_since(b.bytes.at) < FORGET_AFTER);
        }
        let budget = budgets.entry(device.to_owned()).or_insert_with(|| Budget {
            messages: Bucket::full(l.message_burst, now),
            bytes: Bucket::full(l.byte_burst, now),
            dropped: 0,
            told: None,
        });
        let counted = kind != TopicKind::Fetch;
        // Both buckets are checked before either is charged.
        let mut messages = budget.messages;
        let mut volume = budget.bytes;
        let fits = (!counted || messages.take(1.0, l.messages_per_sec, l.message_burst, now))
            && volume.take(bytes as f64, l.bytes_per_sec, l.byte_burst, now);
        if fits {
            budget.messages = messages;
            budget.bytes = volume;
            return Verdict::Pass;
        }
        budget.dropped += 1;
        let due = budget
            .told
            .is_none_or(|t| now.saturating_duration_since(t) >= TELL_EVERY);
        if !due {
            return Verdict::Drop(None);
        }
        let dropped = std::mem::take(&mut budget.dropped);
        budget.told = Some(now);
        Verdict::Drop(Some(format!(
            "the manager dropped {dropped} message(s) from this device: over its budget of {} messages/s (burst {}) and {} KiB/s (burst {} KiB); a device that floods is likely compromised",
            l.messages_per_sec,
            l.message_burst,
            l.bytes_per_sec / 1024.0,
            l.byte_burst / 1024.0
        )))
    }
}

/// The limiter where devices' messages come in, and whom it tells.
#[derive(Clone)]
pub struct Policing {
    /// The budgets.
    pub limiter: std::sync::Arc<DeviceLimiter>,
    /// Counts dropped messages (`ferry_device_messages_throttled_total`).
    pub throttled: prometheus::IntCounter,
    /// Where the operator's event goes (the recorder).
    pub events: mpsc::Sender<super::ingest::Recording>,
}

impl Policing {
    /// Whether `device`'s message of `bytes` on `kind` may go on; counts and
    /// reports one that may not.
    pub fn admit(&self, device: &str, kind: TopicKind, bytes: usize) -> bool {
        match self.limiter.admit(device, kind, bytes) {
            Verdict::Pass => true,
            Verdict::Drop(tell) => {
                self.throttled.inc();
                if let Some(reason) = tell {
                    tracing::warn!(device, "{reason}");
                    // Full only when the recorder is far behind; the counter
                    // still has it.
                    let _ = self.events.try_send(throttle_event(device, reason).into());
                }
                false
            }
        }
    }
}

/// The event an operator reads on a throttled device: the manager's own
/// (`"source": "manager"`, step `throttle`), beside the device's events.
pub fn throttle_event(device: &str, reason: String) -> Record {
    let time = super::store::now();
    let payload = serde_json::json!({
        "schema": 1,
        "time": time,
        "step": "throttle",
        "status": "failed",
        "reason": reason,
        "source": "manager",
    })
    .to_string();
    Record {
        device: device.to_owned(),
        kind: "events",
        payload,
        time,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn small() -> DeviceLimiter {
        DeviceLimiter::new(DeviceLimits {
            messages_per_sec: 2.0,
            message_burst: 5.0,
            bytes_per_sec: 1000.0,
            byte_burst: 4000.0,
        })
    }

    #[test]
    fn a_burst_passes_then_the_rate_holds() {
        let limiter = small();
        let t0 = Instant::now();
        let pass = |at: Instant| limiter.admit_at("gw-1", TopicKind::Health, 10, at);
        for _ in 0..5 {
            assert_eq!(pass(t0), Verdict::Pass);
        }
        // The sixth is over, and the operator is told once.
        assert!(matches!(pass(t0), Verdict::Drop(Some(_))));
        assert_eq!(pass(t0), Verdict::Drop(None));
        // Another device has its own budget.
        assert_eq!(
            limiter.admit_at("gw-2", TopicKind::Health, 10, t0),
            Verdict::Pass
        );
        // Two messages a second come back.
        let later = t0 + Duration::from_secs(1);
        assert_eq!(pass(later), Verdict::Pass);
        assert_eq!(pass(later), Verdict::Pass);
        assert_eq!(pass(later), Verdict::Drop(None));
        // A minute on, the operator hears again, with the count since.
        let minute = t0 + Duration::from_secs(61);
        for _ in 0..5 {
            assert_eq!(pass(minute), Verdict::Pass);
        }
        match pass(minute) {
            Verdict::Drop(Some(text)) => assert!(text.contains("dropped 3 message"), "{text}"),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn bytes_are_a_budget_of_their_own_and_block_requests_count_only_bytes() {
        let limiter = small();
        let t0 = Instant::now();
        assert_eq!(
            limiter.admit_at("gw-1", TopicKind::Events, 3000, t0),
            Verdict::Pass
        );
        assert!(matches!(
            limiter.admit_at("gw-1", TopicKind::Events, 3000, t0),
            Verdict::Drop(_)
        ));
        // A refused message charges nothing: a small one still fits.
        assert_eq!(
            limiter.admit_at("gw-1", TopicKind::Events, 900, t0),
            Verdict::Pass
        );
        for _ in 0..50 {
            let _ = limiter.admit_at("gw-2", TopicKind::Fetch, 10, t0);
        }
        assert_eq!(
            limiter.admit_at("gw-2", TopicKind::Fetch, 10, t0),
            Verdict::Pass,
            "block requests do not use up the message count"
        );
    }
}
