//! What a device may do on the broker: the rules every broker integration
//! enforces for a device's connection (the embedded broker's hook, and the
//! ACL documented for external brokers).
//!
//! - publish: only its own topics of the kinds devices publish;
//! - subscribe: only its own topics of the kinds devices read;
//! - last will: only its own `status` topic, saying `offline`, with the
//!   topic's own QoS and retain flag. A will is a publish the broker makes
//!   later on the device's behalf, so it gets the publish rule and more: a
//!   will on another device's `reported` or `desired` topic would forge that
//!   device's report or replace its desired state when this one disconnects.

use crate::messages::{Connectivity, Message, Status};
use crate::topics::{Topic, TopicKind};

/// Whether the device `user` may publish on `topic`.
pub fn may_publish(user: &str, topic: &str) -> bool {
    topic
        .parse::<Topic>()
        .is_ok_and(|t| t.device.as_str() == user && t.kind.published_by_device())
}

/// Whether the device `user` may subscribe to `filter` (an exact topic:
/// wildcards are never a device's own topic).
pub fn may_subscribe(user: &str, filter: &str) -> bool {
    filter
        .parse::<Topic>()
        .is_ok_and(|t| t.device.as_str() == user && t.kind.subscribed_by_device())
}

/// A last will a device may not set.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("last will refused: {0}")]
pub struct WillError(String);

/// Checks the last will the device `user` sets at CONNECT: its own `status`
/// topic, QoS and retain as the topic table says, and a payload that reads
/// as a status message saying `offline`.
pub fn check_last_will(
    user: &str,
    topic: &str,
    payload: &[u8],
    qos: u8,
    retain: bool,
) -> Result<(), WillError> {
    let own_status = topic
        .parse::<Topic>()
        .is_ok_and(|t| t.device.as_str() == user && t.kind == TopicKind::Status);
    if !own_status {
        return Err(WillError(format!(
            "{topic:?} is not this device's status topic"
        )));
    }
    let delivery = TopicKind::Status.delivery();
    if qos > delivery.qos || retain != delivery.retain {
        return Err(WillError(format!(
            "a status will goes at QoS {} with retain {}, not QoS {qos} with retain {retain}",
            delivery.qos, delivery.retain
        )));
    }
    match Status::decode(payload) {
        Ok(status) if status.state == Connectivity::Offline => Ok(()),
        Ok(_) => Err(WillError("a will can only say offline".into())),
        Err(e) => Err(WillError(e.to_string())),
    }
}

/// The subject a NATS server's MQTT gateway carries an MQTT topic on:
/// levels become tokens (`/` → `.`), and a `.` inside a level becomes `//`,
/// so a device id with a dot stays one token.
pub fn nats_subject(topic: &str) -> String {
    let mut subject = String::with_capacity(topic.len() + 8);
    for c in topic.chars() {
        match c {
            '/' => subject.push('.'),
            '.' => subject.push_str("//"),
            c => subject.push(c),
        }
    }
    subject
}

/// [`may_publish`] and [`may_subscribe`] as allow lists of NATS subjects,
/// for a broker that takes permissions per user at login instead of asking
/// a hook at each message (NATS, through its auth callout).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SubjectPermissions {
    /// Subjects the device may publish on.
    pub publish: Vec<String>,
    /// Subjects it may subscribe to.
    pub subscribe: Vec<String>,
}

/// The exact subjects `device` may use: its own topics, each kind on the
/// side the table gives it, and nothing with a wildcard.
pub fn device_subjects(device: &crate::DeviceId) -> SubjectPermissions {
    let subjects = |by_device: fn(TopicKind) -> bool| {
        TopicKind::ALL
            .into_iter()
            .filter(|kind| by_device(*kind))
            .map(|kind| nats_subject(&Topic::new(device.clone(), kind).to_string()))
            .collect()
    };
    SubjectPermissions {
        publish: subjects(TopicKind::published_by_device),
        subscribe: subjects(TopicKind::subscribed_by_device),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const OFFLINE: &[u8] = br#"{"schema":1,"state":"offline"}"#;

    #[test]
    fn nats_subjects_keep_a_device_to_its_own_topics() {
        assert_eq!(
            nats_subject("ferry/v1/devices/gw.1/desired"),
            "ferry.v1.devices.gw//1.desired"
        );
        let id = |s: &str| crate::DeviceId::new(s).unwrap();
        let gw = device_subjects(&id("gw"));
        assert_eq!(
            gw.subscribe,
            ["ferry.v1.devices.gw.desired", "ferry.v1.devices.gw.blocks"]
        );
        assert_eq!(gw.publish.len(), 5);
        assert!(
            gw.publish
                .contains(&"ferry.v1.devices.gw.status".to_owned())
        );
        // No wildcard, and "gw" gets nothing of "gw.1" (one token, gw//1).
        let dotted = device_subjects(&id("gw.1"));
        for subject in gw.publish.iter().chain(&gw.subscribe) {
            assert!(!subject.contains(['*', '>']), "{subject}");
            assert!(!dotted.publish.contains(subject) && !dotted.subscribe.contains(subject));
        }
        assert!(
            dotted
                .subscribe
                .contains(&"ferry.v1.devices.gw//1.desired".to_owned())
        );
    }

    #[test]
    fn a_device_keeps_to_its_own_topics() {
        assert!(may_publish("gw-1", "ferry/v1/devices/gw-1/reported"));
        assert!(may_publish("gw-1", "ferry/v1/devices/gw-1/fetch"));
        assert!(!may_publish("gw-1", "ferry/v1/devices/gw-2/reported"));
        assert!(!may_publish("gw-1", "ferry/v1/devices/gw-1/desired"));
        assert!(!may_publish("gw-1", "ferry/v1/devices/+/reported"));
        assert!(may_subscribe("gw-1", "ferry/v1/devices/gw-1/desired"));
        assert!(may_subscribe("gw-1", "ferry/v1/devices/gw-1/blocks"));
        assert!(!may_subscribe("gw-1", "ferry/v1/devices/gw-2/desired"));
        assert!(!may_subscribe("gw-1", "ferry/v1/devices/+/desired"));
        assert!(!may_subscribe("gw-1", "ferry/v1/devices/gw-1/reported"));
    }

    #[test]
    fn only_an_offline_status_of_its_own_is_a_will() {
        let own = "ferry/v1/devices/gw-1/status";
        assert_eq!(check_last_will("gw-1", own, OFFLINE, 1, true), Ok(()));
        assert_eq!(check_last_will("gw-1", own, OFFLINE, 0, true), Ok(()));
        for (topic, payload, qos, retain, why) in [
            (
                "ferry/v1/devices/gw-2/status",
                OFFLINE,
                1,
                true,
                "status topic",
            ),
            (
                "ferry/v1/devices/gw-2/reported",
                OFFLINE,
                1,
                true,
                "status topic",
            ),
            (
                "ferry/v1/devices/gw-2/desired",
                OFFLINE,
                1,
                true,
                "status topic",
            ),
            (
                "ferry/v1/devices/gw-1/reported",
                OFFLINE,
                1,
                true,
                "status topic",
            ),
            (
                "ferry/v1/devices/+/status",
                OFFLINE,
                1,
                true,
                "status topic",
            ),
            ("anything/else", OFFLINE, 1, true, "status topic"),
            (own, OFFLINE, 2, true, "QoS 2"),
            (own, OFFLINE, 1, false, "retain false"),
            (
                own,
                br#"{"schema":1,"state":"online"}"#,
                1,
                true,
                "only say offline",
            ),
            (own, b"not json", 1, true, "status"),
            (own, &[b' '; 8192], 1, true, "status"),
        ] {
            let refused = check_last_will("gw-1", topic, payload, qos, retain)
                .expect_err(&format!("accepted {topic} {qos} {retain}"));
            assert!(refused.to_string().contains(why), "{topic}: {refused}");
        }
    }
}
