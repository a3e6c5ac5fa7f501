//! The auth callout: every NATS server of the cluster asks, for each
//! connecting client, on `$SYS.REQ.USER.AUTH`; the manager's replicas
//! answer as one queue group, so each request is decided once, from the
//! shared store, by [`Logins::decide`].
//!
//! A device is let in with exactly the subjects of its own topics
//! ([`acl::device_subjects`]); the manager with every Ferry subject;
//! anyone else gets an error, and the server closes the connection. A
//! request whose signature does not verify is not answered (the server
//! then refuses the client when its wait ends).

use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use ferry_protocol::{DeviceId, acl};
use futures_util::StreamExt;

use super::FLEET_ACCOUNT;
use super::jwt::{self, AuthorizationRequest, AuthorizationResponse, Claims, Permission, User};
use crate::serve::api::auth::PeerCertificate;
use crate::serve::login::{Login, Logins, Refusal};

/// The subject NATS servers send authorization requests to.
pub const REQUEST_SUBJECT: &str = "$SYS.REQ.USER.AUTH";
/// The queue group the replicas answer in.
const QUEUE: &str = "ferry-auth-callout";
/// How long an admitted user's JWT stands; the server ends the connection
/// when it expires, and the client reconnects through the callout again.
/// A revoked device's connections are ended at once ([`super::sessions`]);
/// this is the bound should that fail (no system user, a server away).
const USER_LIFETIME: Duration = Duration::from_secs(3600);

/// Where and how the manager answers.
pub struct Callout {
    /// `nats://HOST:PORT` of a server (more are learned from the cluster).
    pub servers: Vec<String>,
    /// The manager's NATS user (in the callout account).
    pub user: String,
    /// Its password.
    pub password: String,
    /// The issuer account key answers are signed with.
    pub issuer: nkeys::KeyPair,
}

/// Connects and answers until the connection is closed for good.
pub async fn run(callout: Callout, logins: Arc<Logins>) -> Result<()> {
    let client = super::connect(
        &callout.servers,
        &callout.user,
        &callout.password,
        "ferry-manager auth callout",
    )
    .await?;
    let mut requests = client
        .queue_subscribe(REQUEST_SUBJECT, QUEUE.into())
        .await
        .context("cannot subscribe to the auth callout")?;
    tracing::info!(servers = %callout.servers.join(", "), "answering the NATS auth callout");
    while let Some(message) = requests.next().await {
        let Some(reply) = message.reply else { continue };
        let Ok(token) = std::str::from_utf8(&message.payload) else {
            tracing::warn!("auth callout: a request that is not text");
            continue;
        };
        let answer = match jwt::read_request(token) {
            Ok(request) => answer(&request, &logins, &callout.issuer).await,
            Err(e) => {
                tracing::warn!("auth callout: unreadable request: {e}");
                continue;
            }
        };
        match answer {
            Ok(token) => {
                if let Err(e) = client.publish(reply, token.into()).await {
                    tracing::warn!("auth callout: cannot answer: {e}");
                }
            }
            Err(e) => tracing::error!("auth callout: cannot sign an answer: {e}"),
        }
    }
    Ok(())
}

/// The signed answer to one request: a user with its permissions, or a
/// refusal.
pub async fn answer(
    request: &Claims<AuthorizationRequest>,
    logins: &Logins,
    issuer: &nkeys::KeyPair,
) -> Result<String, jwt::JwtError> {
    let asked = &request.nats;
    let user = asked.connect_opts.user.clone().unwrap_or_default();
    let password = asked.connect_opts.pass.clone().unwrap_or_default();
    // An MQTT client's id; other clients have none and so never pass as a
    // device (whose client id must be its user name).
    let client_id = asked.client_info.mqtt_id.clone().unwrap_or_default();
    let serial = asked
        .client_tls
        .as_ref()
        .and_then(|tls| tls.verified_chains.first())
        .and_then(|chain| chain.first())
        .and_then(|text| pem::parse(text).ok())
        .and_then(|leaf| PeerCertificate::from_der(leaf.contents()))
        .map(|c| c.serial);
    // A cluster's NATS port is the replicas' own (the callout, the shared
    // consumer): there only the manager comes, by its password. Devices
    // come through the MQTT gateway, where over TLS the manager shows its
    // certificate too.
    let login = if asked.client_info.kind == "mqtt" {
        logins
            .decide(&user, &password, &client_id, serial.as_deref())
            .await
    } else if logins.is_manager(&user, &password) {
        Login::Manager
    } else {
        Login::Refused(Refusal::NotTheManager)
    };
    let permissions = match login {
        Login::Manager => Ok(manager_permissions()),
        Login::Device => DeviceId::new(&user)
            .map(|id| device_permissions(&id))
            .map_err(|_| "not a device name".to_owned()),
        Login::Refused(why) => Err(format!("{why:?}")),
    };
    let (jwt, error) = match permissions {
        Ok(user_permissions) => {
            tracing::debug!(user = %user, server = %asked.server_id.name, "auth callout: admitted");
            let claims = Claims {
                aud: Some(FLEET_ACCOUNT.to_owned()),
                exp: Some(crate::serve::store::unix_now() + USER_LIFETIME.as_secs() as i64),
                iat: 0,
                iss: String::new(),
                jti: String::new(),
                name: Some(user.clone()),
                sub: asked.user_nkey.clone(),
                nats: user_permissions,
            };
            (jwt::encode(claims, issuer)?, String::new())
        }
        Err(why) => {
            tracing::warn!(user = %user, host = %asked.client_info.host, "auth callout: refused ({why})");
            (String::new(), "not authorized".to_owned())
        }
    };
    jwt::encode(
        Claims {
            aud: Some(asked.server_id.id.clone()),
            exp: None,
            iat: 0,
            iss: String::new(),
            jti: String::new(),
            name: None,
            sub: asked.user_nkey.clone(),
            nats: AuthorizationResponse {
                jwt,
                error,
                kind: "authorization_response",
                version: 2,
            },
        },
        issuer,
    )
}

fn user(publish: Vec<String>, subscribe: Vec<String>) -> User {
    let side = |allow: Vec<String>| Permission {
        deny: if allow.is_empty() {
            vec![">".into()]
        } else {
            Vec::new()
        },
        allow,
    };
    User {
        publish: side(publish),
        subscribe: side(subscribe),
        subs: -1,
        data: -1,
        payload: -1,
        kind: "user",
        version: 2,
    }
}

/// A device: its own topics, as [`acl`] has them.
fn device_permissions(device: &DeviceId) -> User {
    let subjects = acl::device_subjects(device);
    user(subjects.publish, subjects.subscribe)
}

/// The manager: every Ferry subject, and the JetStream API of the device
/// message stream and its consumer ([`super::ingest`]) with the replies.
fn manager_permissions() -> User {
    use super::ingest::STREAM;
    let all = acl::nats_subject(&format!("{}/>", ferry_protocol::topics::PREFIX));
    let publish = vec![
        all.clone(),
        "$JS.API.INFO".into(),
        format!("$JS.API.STREAM.*.{STREAM}"),
        format!("$JS.API.CONSUMER.*.{STREAM}"),
        format!("$JS.API.CONSUMER.*.{STREAM}.>"),
        format!("$JS.API.CONSUMER.MSG.NEXT.{STREAM}.>"),
        format!("$JS.API.CONSUMER.DURABLE.CREATE.{STREAM}.>"),
        format!("$JS.ACK.{STREAM}.>"),
    ];
    user(publish, vec![all, "_INBOX.>".into()])
}
