//! The MQTT topic table. Only this module spells a topic.
//!
//! | topic | direction | QoS / retain |
//! |---|---|---|
//! | `ferry/v1/devices/{id}/desired`  | manager → device | 1, retained |
//! | `ferry/v1/devices/{id}/reported` | device → manager | 1, retained |
//! | `ferry/v1/devices/{id}/events`   | device → manager | 1 |
//! | `ferry/v1/devices/{id}/health`   | device → anyone  | 0 |
//! | `ferry/v1/devices/{id}/status`   | device (last will) | 1, retained |
//! | `ferry/v1/devices/{id}/fetch`    | device → manager | 1 |
//! | `ferry/v1/devices/{id}/blocks`   | manager → device | 0 |
//!
//! The QoS is the publisher's; devices subscribe at QoS 0
//! ([`TopicKind::subscription_qos`]).
//!
//! `fetch` and `blocks` carry artifacts where a device reaches only the
//! broker: see [`crate::blocks`].

use std::fmt;
use std::str::FromStr;

use crate::names::DeviceId;

/// Every Ferry topic starts with this.
pub const PREFIX: &str = "ferry/v1";

const DEVICES: &str = "ferry/v1/devices/";

/// The kinds of per-device topic.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum TopicKind {
    /// What the device should run.
    Desired,
    /// What the device runs.
    Reported,
    /// Deployment progress and errors.
    Events,
    /// Periodic health reports.
    Health,
    /// `online` / `offline`, the last will.
    Status,
    /// A request for byte ranges of an artifact.
    Fetch,
    /// Artifact blocks answering this device's requests.
    Blocks,
}

/// How a topic is published: MQTT QoS level and retain flag.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Delivery {
    /// MQTT QoS level (0 or 1).
    pub qos: u8,
    /// Whether the broker keeps the last message for new subscribers.
    pub retain: bool,
}

impl TopicKind {
    /// All kinds, in table order.
    pub const ALL: [TopicKind; 7] = [
        Self::Desired,
        Self::Reported,
        Self::Events,
        Self::Health,
        Self::Status,
        Self::Fetch,
        Self::Blocks,
    ];

    /// The topic's last segment.
    pub fn segment(self) -> &'static str {
        match self {
            Self::Desired => "desired",
            Self::Reported => "reported",
            Self::Events => "events",
            Self::Health => "health",
            Self::Status => "status",
            Self::Fetch => "fetch",
            Self::Blocks => "blocks",
        }
    }

    /// QoS and retain for this kind, from the table.
    pub fn delivery(self) -> Delivery {
        match self {
            Self::Desired | Self::Reported | Self::Status => Delivery {
                qos: 1,
                retain: true,
            },
            Self::Events | Self::Fetch => Delivery {
                qos: 1,
                retain: false,
            },
            // A lost block is asked for again; an acknowledgement per
            // block would double the packets on a slow link.
            Self::Health | Self::Blocks => Delivery {
                qos: 0,
                retain: false,
            },
        }
    }

    /// The QoS a device subscribes to this kind with: 0 for both kinds it
    /// reads. A QoS 1 subscription costs a broker a stored session per
    /// device (on NATS, one JetStream consumer each, which does not hold up
    /// at thousands of devices); at QoS 0 delivery is plain routing. No
    /// desired state is lost for it: the broker keeps the last one
    /// retained and hands it over on every (re)subscription, and the
    /// manager publishes it again to a device that stays silent while it
    /// is expected to act. A lost block is asked for again.
    pub fn subscription_qos(self) -> u8 {
        0
    }

    /// Whether the device itself publishes on this kind of topic.
    pub fn published_by_device(self) -> bool {
        !self.subscribed_by_device()
    }

    /// Whether the device subscribes to this kind (its own topic only).
    pub fn subscribed_by_device(self) -> bool {
        matches!(self, Self::Desired | Self::Blocks)
    }

    fn from_segment(segment: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|k| k.segment() == segment)
    }

    /// The filter matching this kind for every device, e.g.
    /// `ferry/v1/devices/+/health`, for the manager's subscriptions.
    pub fn all_devices_filter(self) -> String {
        format!("{DEVICES}+/{}", self.segment())
    }
}

/// One device's topic of one kind.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Topic {
    /// The device the topic belongs to.
    pub device: DeviceId,
    /// Which of its topics.
    pub kind: TopicKind,
}

/// A topic that is not in the table.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("not a ferry device topic {topic:?}: {reason}")]
pub struct TopicError {
    /// The rejected topic.
    pub topic: String,
    /// What is wrong with it.
    pub reason: String,
}

impl Topic {
    /// The topic for `device` and `kind`.
    pub fn new(device: DeviceId, kind: TopicKind) -> Self {
        Self { device, kind }
    }

    /// The device's desired-state topic.
    pub fn desired(device: &DeviceId) -> Self {
        Self::new(device.clone(), TopicKind::Desired)
    }

    /// How messages on this topic are published.
    pub fn delivery(&self) -> Delivery {
        self.kind.delivery()
    }
}

impl fmt::Display for Topic {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{DEVICES}{}/{}", self.device, self.kind.segment())
    }
}

impl FromStr for Topic {
    type Err = TopicError;

    fn from_str(topic: &str) -> Result<Self, TopicError> {
        let fail = |reason: String| TopicError {
            topic: topic.to_owned(),
            reason,
        };
        let rest = topic
            .strip_prefix(DEVICES)
            .ok_or_else(|| fail(format!("does not start with {DEVICES}")))?;
        let (id, segment) = rest
            .split_once('/')
            .ok_or_else(|| fail("has no topic kind after the device id".into()))?;
        let device = DeviceId::new(id).map_err(|e| fail(e.to_string()))?;
        let kind = TopicKind::from_segment(segment)
            .ok_or_else(|| fail(format!("unknown topic kind {segment:?}")))?;
        Ok(Self { device, kind })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn gw() -> DeviceId {
        DeviceId::new("gw-0042").unwrap()
    }

    #[test]
    fn builds_and_parses_every_kind() {
        for kind in TopicKind::ALL {
            let topic = Topic::new(gw(), kind);
            let text = topic.to_string();
            assert_eq!(text, format!("ferry/v1/devices/gw-0042/{}", kind.segment()));
            assert_eq!(text.parse::<Topic>().unwrap(), topic);
        }
    }

    #[test]
    fn rejects_malformed_topics() {
        for bad in [
            "",
            "ferry/v1/devices",
            "ferry/v1/devices/",
            "ferry/v1/devices/gw-0042",
            "ferry/v1/devices/gw-0042/",
            "ferry/v1/devices/gw-0042/secrets",
            "ferry/v1/devices/gw-0042/health/extra",
            "ferry/v1/devices/+/health",
            "ferry/v1/devices/#",
            "ferry/v1/devices//health",
            "ferry/v2/devices/gw-0042/health",
            "other/v1/devices/gw-0042/health",
        ] {
            assert!(bad.parse::<Topic>().is_err(), "accepted {bad:?}");
        }
    }

    #[test]
    fn delivery_follows_the_table() {
        assert_eq!(
            TopicKind::Desired.delivery(),
            Delivery {
                qos: 1,
                retain: true
            }
        );
        assert_eq!(
            TopicKind::Health.delivery(),
            Delivery {
                qos: 0,
                retain: false
            }
        );
        assert_eq!(
            TopicKind::Events.delivery(),
            Delivery {
                qos: 1,
                retain: false
            }
        );
        assert!(!TopicKind::Desired.published_by_device());
        assert!(TopicKind::Status.published_by_device());
        assert!(TopicKind::Fetch.published_by_device());
        assert!(!TopicKind::Blocks.published_by_device());
        assert!(TopicKind::Blocks.subscribed_by_device());
        assert_eq!(TopicKind::Blocks.delivery().qos, 0);
        assert_eq!(TopicKind::Fetch.delivery().qos, 1);
        assert_eq!(
            TopicKind::Health.all_devices_filter(),
            "ferry/v1/devices/+/health"
        );
    }
}
