//! The embedded MQTT broker (rmqtt), with Ferry's authentication and ACL.
//!
//! - A device connects with its id as client id and user name, and proves
//!   it is that device with its client certificate (over TLS: the listener
//!   takes no connection without one the fleet CA issued, and the hook
//!   checks the store still stands behind it, so a revoked device is
//!   refused at once), or, over plain MQTT only, with the password
//!   `ferry device add` printed. Anyone else is refused.
//! - A device may publish only under `ferry/v1/devices/{its id}/` on the
//!   topics a device publishes (reported, events, health, status, fetch),
//!   and may subscribe only to its own `desired` and `blocks` topics. The check is a hook on every
//!   publish and subscribe, keyed on the authenticated user name, so one
//!   device can never read another's desired state.
//! - A device's last will may only be its own `status` saying `offline`
//!   (checked at CONNECT: rmqtt does not put wills through the publish ACL).
//! - The manager's own client is a superuser with a password made at start
//!   (and, over TLS, a certificate of its own, known by its serial).

use std::net::SocketAddr;
use std::sync::Arc;

use async_trait::async_trait;
use ferry_protocol::acl;
use ferry_protocol::topics::Topic;
use rmqtt::context::ServerContext;
use rmqtt::hook::{Handler, HookResult, Parameter, ReturnType, Type};
use rmqtt::net::Builder;
use rmqtt::server::MqttServer;
use rmqtt::types::{AuthResult, Id, LastWill, PublishAclResult, SubscribeAclResult};

use super::blocks::Backlog;
use super::limits::Policing;
use super::login::{Login, Logins, Refusal};
use super::store::Store;

/// Credentials of the manager's own MQTT client.
#[derive(Debug, Clone)]
pub struct ManagerLogin {
    /// User name.
    pub username: String,
    /// Password.
    pub password: String,
}

/// How many messages the broker queues for a client beyond those in flight.
/// The manager's own client takes every device's messages: when a whole
/// fleet reports at once (a rollout to 10,000 devices is some 150,000
/// events in seconds) they wait here while it catches up. A message over
/// the limit is dropped and counted in `ferry_mqtt_messages_dropped_total`.
const MAX_QUEUED: usize = 500_000;

/// The broker's live sessions, for ending one at once (a device removed
/// or given a new password).
#[derive(Clone)]
pub struct Sessions(ServerContext);

impl Sessions {
    /// Disconnects `device`'s session, if it has one.
    pub async fn end(&self, device: &str) {
        let id = Id::from(self.0.node.id(), device.into());
        let mut entry = self.0.extends.shared().await.entry(id);
        if let Err(e) = entry.kick(true, true, true).await {
            tracing::warn!(device, "cannot end the session: {e}");
        }
    }
}

/// The broker's TLS: its certificate chain and key files, the CA that
/// issues client certificates, and the serial of the manager's own.
pub struct BrokerTls {
    /// Server certificate chain (PEM file).
    pub cert_file: std::path::PathBuf,
    /// Its key (PEM file).
    pub key_file: std::path::PathBuf,
    /// The fleet CA (PEM file): client certificates must chain to it.
    pub ca_file: std::path::PathBuf,
    /// The manager's own client certificate's serial.
    pub manager_serial: String,
}

/// Starts the broker on `listen`; runs until the returned future is dropped.
/// Messages dropped for a full queue are counted in `dropped`.
pub async fn start(
    listen: SocketAddr,
    tls: Option<BrokerTls>,
    store: Arc<Store>,
    manager: ManagerLogin,
    dropped: prometheus::IntCounter,
    policing: Policing,
    backlog: Arc<Backlog>,
) -> anyhow::Result<(Sessions, impl std::future::Future<Output = ()>)> {
    let scx = ServerContext::new()
        // The manager shares the machine with its broker: never refuse
        // devices because the CPU is busy.
        .busy_check_enable(false)
        .plugins_config_map_add("rmqtt-retainer", "storage.type = \"ram\"")
        .build()
        .await;
    rmqtt_retainer::register(&scx, true, false)
        .await
        .map_err(|e| anyhow::anyhow!("retainer: {e}"))?;
    scx.plugins
        .start("rmqtt-retainer")
        .await
        .map_err(|e| anyhow::anyhow!("retainer: {e}"))?;

    let register = scx.extends.hook_mgr().register();
    let guard = Arc::new(Guard {
        logins: Logins {
            store,
            manager,
            manager_serial: tls.as_ref().map(|t| t.manager_serial.clone()),
        },
        dropped,
        policing,
        backlog,
    });
    for hook in [
        Type::ClientAuthenticate,
        Type::MessagePublishCheckAcl,
        Type::ClientSubscribeCheckAcl,
        Type::MessageDropped,
        Type::MessageDelivered,
        Type::SessionTerminated,
        Type::SessionSubscribed,
    ] {
        register.add(hook, Box::new(GuardHook(guard.clone()))).await;
    }
    register.start().await;

    let with_tls = tls.is_some();
    let path = |p: &std::path::PathBuf| p.display().to_string();
    let listener = Builder::new()
        .name(if with_tls { "ferry/tls" } else { "ferry/tcp" })
        .laddr(listen)
        .tls_cert(tls.as_ref().map(|t| path(&t.cert_file)))
        .tls_key(tls.as_ref().map(|t| path(&t.key_file)))
        // Mutual TLS: no client certificate from the fleet CA, no session.
        .tls_cross_certificate(with_tls)
        .tls_client_ca_certs(tls.as_ref().map(|t| path(&t.ca_file)))
        .collect_cert_info(with_tls)
        .allow_anonymous(false)
        // A restarted manager must get its port back while old connections linger in TIME_WAIT.
        .reuseaddr(Some(true))
        .max_inflight(std::num::NonZeroU16::new(128).unwrap_or(std::num::NonZeroU16::MIN))
        .max_mqueue_len(MAX_QUEUED)
        .max_packet_size(1024 * 1024)
        .bind()
        .map_err(|e| anyhow::anyhow!("MQTT listener on {listen}: {e}"))?;
    let listener = if with_tls {
        listener.tls()
    } else {
        listener.tcp()
    }
    .map_err(|e| anyhow::anyhow!("MQTT listener on {listen}: {e}"))?;
    let sessions = Sessions(scx.clone());
    let server = MqttServer::new(scx).listener(listener).build();
    Ok((sessions, async move {
        if let Err(e) = server.run().await {
            tracing::error!("MQTT broker stopped: {e}");
        }
    }))
}

/// Authentication, ACL and device budgets in one handler, which also
/// counts drops.
struct Guard {
    logins: Logins,
    dropped: prometheus::IntCounter,
    policing: Policing,
    backlog: Arc<Backlog>,
}

/// The handler rmqtt calls; one guard serves all four hooks.
struct GuardHook(Arc<Guard>);

#[async_trait]
impl Handler for GuardHook {
    async fn hook(&self, param: &Parameter, acc: Option<HookResult>) -> ReturnType {
        match param {
            Parameter::ClientAuthenticate(info) => {
                let user = info.username().map(|u| u.to_string()).unwrap_or_default();
                let password = info
                    .password()
                    .map(|p| String::from_utf8_lossy(p).into_owned())
                    .unwrap_or_default();
                let client_id = info.client_id().to_string();
                let serial = info.cert().and_then(|c| c.serial.clone());
                let mut result = self
                    .0
                    .authenticate(&user, &password, &client_id, serial.as_deref())
                    .await;
                // A will is a publish the broker makes later for the device,
                // and rmqtt does not put it through the publish ACL: check it
                // here, before the session exists.
                if let (AuthResult::Allow(false, _), Some(will)) = (&result, info.last_will()) {
                    if let Err(refused) = check_will(&user, &will) {
                        tracing::warn!(device = %user, "{refused}");
                        result = AuthResult::NotAuthorized;
                    }
                }
                (false, Some(HookResult::AuthResult(result)))
            }
            Parameter::MessagePublishCheckAcl(session, publish) => {
                let user = user_of(session);
                if acl::may_publish(&user, &publish.topic) {
                    // Over its budget, a device's message goes no further
                    // (not into the manager's queue, nor its database).
                    let kind = publish.topic.parse::<Topic>().map(|t| t.kind);
                    if let Ok(kind) = kind {
                        if !self.0.policing.admit(&user, kind, publish.payload.len()) {
                            return (
                                false,
                                Some(HookResult::PublishAclResult(PublishAclResult::rejected(
                                    false,
                                    Some("over this device's message budget".into()),
                                ))),
                            );
                        }
                    }
                    (true, acc)
                } else {
                    tracing::warn!(device = %user, topic = %publish.topic, "publish refused");
                    (
                        false,
                        Some(HookResult::PublishAclResult(PublishAclResult::rejected(
                            false,
                            Some("not this device's topic".into()),
                        ))),
                    )
                }
            }
            Parameter::ClientSubscribeCheckAcl(session, subscribe) => {
                let user = user_of(session);
                if acl::may_subscribe(&user, &subscribe.topic_filter) {
                    (
                        false,
                        Some(HookResult::SubscribeAclResult(
                            SubscribeAclResult::new_success(subscribe.opts.qos(), None),
                        )),
                    )
                } else {
                    tracing::warn!(device = %user, filter = %subscribe.topic_filter, "subscribe refused");
                    (
                        false,
                        Some(HookResult::SubscribeAclResult(
                            SubscribeAclResult::new_failure(
                                rmqtt::codec::v5::SubscribeAckReason::NotAuthorized,
                            ),
                        )),
                    )
                }
            }
            // What a device has read of its blocks, for the block server's
            // bound on what it may be sent unread. rmqtt calls this just
            // before writing the message to the device's socket.
            Parameter::MessageDelivered(_, _, publish) => {
                if let Some(device) = blocks_for(&publish.topic) {
                    self.0
                        .backlog
                        .delivered(device.as_str(), publish.payload.len());
                }
                (true, acc)
            }
            // Blocks published before a session subscribed to them went to
            // no one (an earlier session, or none): they are not unread.
            Parameter::SessionTerminated(session, _) => {
                self.0.backlog.forget(&user_of(session));
                (true, acc)
            }
            Parameter::SessionSubscribed(_, subscribe) => {
                if let Some(device) = blocks_for(&subscribe.topic_filter) {
                    self.0.backlog.forget(device.as_str());
                }
                (true, acc)
            }
            Parameter::MessageDropped(to, _, publish, reason) => {
                if let Some(device) = blocks_for(&publish.topic) {
                    // Not held any more either.
                    self.0
                        .backlog
                        .delivered(device.as_str(), publish.payload.len());
                }
                self.0.dropped.inc();
                tracing::debug!(to = ?to.as_ref().map(|id| id.client_id.to_string()), topic = %publish.topic, %reason, "message dropped");
                (true, acc)
            }
            _ => (true, acc),
        }
    }
}

/// The protocol's rule for a device's last will, on rmqtt's will of either
/// MQTT version.
fn check_will(user: &str, will: &LastWill<'_>) -> Result<(), acl::WillError> {
    let (topic, message, qos) = match will {
        LastWill::V3(w) => (&w.topic, &w.message, w.qos.value()),
        LastWill::V5(w) => (&w.topic, &w.message, w.qos.value()),
    };
    acl::check_last_will(user, topic, message, qos, will.retain())
}

/// The device whose `blocks` topic this is, if it is one.
fn blocks_for(topic: &str) -> Option<ferry_protocol::DeviceId> {
    topic
        .parse::<Topic>()
        .ok()
        .filter(|t| t.kind == ferry_protocol::topics::TopicKind::Blocks)
        .map(|t| t.device)
}

/// The authenticated user name of a session ("" if none).
fn user_of(session: &rmqtt::session::Session) -> String {
    session
        .id
        .username
        .as_ref()
        .map(|u| u.to_string())
        .unwrap_or_default()
}

impl Guard {
    /// Who may connect ([`Logins::decide`]), in rmqtt's terms.
    async fn authenticate(
        &self,
        user: &str,
        password: &str,
        client_id: &str,
        serial: Option<&str>,
    ) -> AuthResult {
        match self.logins.decide(user, password, client_id, serial).await {
            Login::Manager => AuthResult::Allow(true, None),
            Login::Device => AuthResult::Allow(false, None),
            Login::Refused(Refusal::NotTheManager | Refusal::Password) => {
                AuthResult::BadUsernameOrPassword
            }
            Login::Refused(_) => AuthResult::NotAuthorized,
        }
    }
}
