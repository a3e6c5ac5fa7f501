//! Ending a device's connections on a NATS cluster at once, when it is
//! revoked, removed or given a new password. The callout admits a device
//! only at connect time, so without this a revoked device stayed connected
//! until its user JWT expired.
//!
//! The manager's system user (`<callout user>-system`, the callout's
//! password, in the system account: [`super::server_config`]) asks every
//! server for the device's MQTT connections (`$SYS.REQ.SERVER.PING.CONNZ`,
//! filtered by MQTT client id, which the callout pins to the device id)
//! and has the server holding each one kick it (`$SYS.REQ.SERVER.ID.KICK`).

use std::time::Duration;

use anyhow::{Context, Result};
use futures_util::StreamExt;
use serde::Deserialize;
use serde_json::json;

use super::FLEET_ACCOUNT;

/// How long the servers' answers to one CONNZ request are gathered: each
/// server answers once, and how many there are is not known here.
const GATHER: Duration = Duration::from_millis(1500);
/// How long one server has to answer a KICK.
const KICK_TIMEOUT: Duration = Duration::from_secs(3);

/// The system user's name for the callout user `callout_user`.
pub fn system_user(callout_user: &str) -> String {
    format!("{callout_user}-system")
}

/// A connection in the system account.
#[derive(Clone)]
pub struct Sessions {
    client: async_nats::Client,
}

#[derive(Deserialize)]
struct ConnzReply {
    server: ServerInfo,
    #[serde(default)]
    data: Option<Connz>,
}

#[derive(Deserialize)]
struct ServerInfo {
    id: String,
}

#[derive(Deserialize)]
struct Connz {
    #[serde(default)]
    connections: Vec<Connection>,
}

#[derive(Deserialize)]
struct Connection {
    cid: u64,
    #[serde(default)]
    mqtt_client: String,
}

impl Sessions {
    /// Connects (in the background, retrying) as the system user.
    pub async fn connect(servers: &[String], callout_user: &str, password: &str) -> Result<Self> {
        let client = super::connect(
            servers,
            &system_user(callout_user),
            password,
            "ferry-manager sessions",
        )
        .await?;
        Ok(Self { client })
    }

    /// Disconnects every MQTT connection of `device`, on every server.
    pub async fn end(&self, device: &str) {
        match self.kick_all(device).await {
            Ok(0) => {}
            Ok(n) => tracing::info!(device, connections = n, "ended on the NATS cluster"),
            Err(e) => tracing::warn!(device, "cannot end the NATS session: {e:#}"),
        }
    }

    /// How many connections were kicked.
    async fn kick_all(&self, device: &str) -> Result<usize> {
        let inbox = self.client.new_inbox();
        let mut replies = self
            .client
            .subscribe(inbox.clone())
            .await
            .context("subscribing to CONNZ replies")?;
        let filter = json!({ "acc": FLEET_ACCOUNT, "mqtt_client": device });
        self.client
            .publish_with_reply(
                "$SYS.REQ.SERVER.PING.CONNZ",
                inbox,
                filter.to_string().into(),
            )
            .await
            .context("asking the servers for connections")?;
        let mut found = Vec::new();
        let deadline = tokio::time::Instant::now() + GATHER;
        while let Ok(Some(reply)) = tokio::time::timeout_at(deadline, replies.next()).await {
            let Ok(reply) = serde_json::from_slice::<ConnzReply>(&reply.payload) else {
                continue;
            };
            for connection in reply.data.map(|d| d.connections).unwrap_or_default() {
                // The filter is the server's; check it here too, so a server
                // that ignored it never has another device kicked.
                if connection.mqtt_client == device {
                    found.push((reply.server.id.clone(), connection.cid));
                }
            }
        }
        for (server, cid) in &found {
            let subject = format!("$SYS.REQ.SERVER.{server}.KICK");
            let payload = json!({ "cid": cid }).to_string();
            tokio::time::timeout(KICK_TIMEOUT, self.client.request(subject, payload.into()))
                .await
                .context("a server did not answer the kick")?
                .with_context(|| format!("kicking connection {cid} on {server}"))?;
        }
        Ok(found.len())
    }
}
