//! The MQTT session's settings: broker address, identity, last will.

use std::time::Duration;

use ferry_protocol::messages::{Connectivity, MESSAGE_SCHEMA, Message, Status};
use ferry_protocol::topics::{Topic, TopicKind};
use rumqttc::{LastWill, MqttOptions, QoS, Transport};

use crate::config::Config;

/// Where the broker is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BrokerAddress {
    /// Host name or address.
    pub host: String,
    /// TCP port.
    pub port: u16,
    /// Whether to use TLS (`mqtts://`).
    pub tls: bool,
}

/// Parses `mqtt://host[:port]` or `mqtts://host[:port]`.
pub fn parse_broker_url(url: &str) -> Result<BrokerAddress, String> {
    let (tls, rest) = if let Some(rest) = url.strip_prefix("mqtts://") {
        (true, rest)
    } else if let Some(rest) = url.strip_prefix("mqtt://") {
        (false, rest)
    } else {
        return Err(format!(
            "broker url {url:?} must start with mqtt:// or mqtts://"
        ));
    };
    let rest = rest.trim_end_matches('/');
    let (host, port) = match rest.rsplit_once(':') {
        Some((host, port)) if !host.ends_with(']') || host.starts_with('[') => {
            let port = port
                .parse()
                .map_err(|_| format!("broker url {url:?}: bad port {port:?}"))?;
            (host, port)
        }
        _ => (rest, if tls { 8883 } else { 1883 }),
    };
    let host = host.trim_start_matches('[').trim_end_matches(']');
    if host.is_empty() || host.contains('/') {
        return Err(format!("broker url {url:?} has no host"));
    }
    Ok(BrokerAddress {
        host: host.to_owned(),
        port,
        tls,
    })
}

/// The payload of the status topic.
pub fn status_payload(state: Connectivity) -> Vec<u8> {
    Status {
        schema: MESSAGE_SCHEMA,
        state,
        agent_version: match state {
            Connectivity::Online => Some(crate::VERSION.to_owned()),
            Connectivity::Offline => None,
        },
    }
    .encode()
}

/// The QoS of a topic kind, from the topic table.
pub fn qos(kind: TopicKind) -> QoS {
    level(kind.delivery().qos)
}

/// The QoS the agent subscribes to `kind` with.
pub fn subscription_qos(kind: TopicKind) -> QoS {
    level(kind.subscription_qos())
}

fn level(qos: u8) -> QoS {
    if qos == 0 {
        QoS::AtMostOnce
    } else {
        QoS::AtLeastOnce
    }
}

/// Session options for this device: client id and user are the device id
/// unless configured, the last will marks the device offline (retained).
/// Over TLS the connection shows `certificate` when the server asks.
pub fn options(
    config: &Config,
    certificate: Option<std::sync::Arc<crate::tls::ClientCertificate>>,
) -> Result<Option<MqttOptions>, String> {
    let Some(broker) = &config.broker else {
        return Ok(None);
    };
    let address = parse_broker_url(&broker.url)?;
    let mut options = MqttOptions::new(config.device_id.as_str(), address.host, address.port);
    options.set_keep_alive(Duration::from_secs(30));
    options.set_clean_session(true);
    // Packets a little larger than the largest desired state still come in,
    // so an oversized one is refused with a reason the operator sees (an
    // event) rather than by a dropped connection.
    options.set_max_packet_size(
        <ferry_protocol::messages::Desired as ferry_protocol::messages::Message>::MAX_BYTES
            + 64 * 1024,
        256 * 1024,
    );
    let user = broker
        .username
        .clone()
        .unwrap_or_else(|| config.device_id.to_string());
    if let Some(password) = &broker.password {
        options.set_credentials(user, password);
    } else if broker.uses_certificate() {
        // The certificate proves who this is; the user name says it.
        options.set_credentials(user, "");
    }
    let status = Topic::new(config.device_id.clone(), TopicKind::Status);
    options.set_last_will(LastWill::new(
        status.to_string(),
        status_payload(Connectivity::Offline),
        QoS::AtLeastOnce,
        true,
    ));
    if address.tls {
        let _ = rustls::crypto::ring::default_provider().install_default();
        options.set_transport(match &broker.ca_pem {
            Some(pem) => Transport::tls_with_config(rumqttc::TlsConfiguration::Rustls(
                std::sync::Arc::new(crate::tls::pinned_client_config(pem, certificate)?),
            )),
            None => Transport::tls_with_default_config(),
        });
    }
    Ok(Some(options))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn broker_urls() {
        let a = parse_broker_url("mqtt://manager.local:1884").unwrap();
        assert_eq!(
            (a.host.as_str(), a.port, a.tls),
            ("manager.local", 1884, false)
        );
        let a = parse_broker_url("mqtts://manager.local").unwrap();
        assert_eq!(
            (a.host.as_str(), a.port, a.tls),
            ("manager.local", 8883, true)
        );
        let a = parse_broker_url("mqtt://127.0.0.1").unwrap();
        assert_eq!(a.port, 1883);
        let a = parse_broker_url("mqtt://[::1]:1999").unwrap();
        assert_eq!((a.host.as_str(), a.port), ("::1", 1999));
        assert!(parse_broker_url("http://x:1").is_err());
        assert!(parse_broker_url("mqtt://x:port").is_err());
        assert!(parse_broker_url("mqtt://").is_err());
    }
}
