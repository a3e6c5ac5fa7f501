//! A NATS cluster as the broker: devices keep speaking MQTT (NATS's MQTT
//! gateway), and the manager answers the servers' auth callout, so the
//! cluster lets a connection in only as the manager says, with the
//! per-device permissions of [`ferry_protocol::acl`].
//!
//! The NATS side is configured with three accounts: the callout's own
//! (where the manager's NATS user lives, exempt from the callout), the
//! fleet's (JetStream on: MQTT needs it; every MQTT client lands here), and
//! the system account. [`server_config`] writes that block for a node.

pub mod callout;
pub mod ingest;
pub mod jwt;
pub mod sessions;

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};

use crate::files::{Existing, write_atomic};

/// The account every MQTT client is placed in.
pub const FLEET_ACCOUNT: &str = "FERRY";
/// The account of the manager's NATS user, which answers the callout.
pub const CALLOUT_ACCOUNT: &str = "FERRY_AUTH";

/// How the manager answers a NATS cluster's auth callout (`ferry serve
/// --nats-callout`).
#[derive(Clone)]
pub struct AuthCallout {
    /// `nats://HOST:PORT` of one or more servers of the cluster.
    pub servers: Vec<String>,
    /// The manager's NATS user, in the callout account.
    pub user: String,
    /// Its password.
    pub password: String,
    /// The issuer account's seed ([`issuer`]).
    pub issuer_file: PathBuf,
}

impl std::fmt::Debug for AuthCallout {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AuthCallout")
            .field("servers", &self.servers)
            .field("user", &self.user)
            .field("issuer_file", &self.issuer_file)
            .finish_non_exhaustive()
    }
}

impl AuthCallout {
    /// From `nats://USER:PASS@HOST:PORT[,HOST:PORT...]` and the issuer's
    /// seed file.
    pub fn parse(url: &str, issuer_file: PathBuf) -> Result<Self> {
        let rest = url
            .strip_prefix("nats://")
            .with_context(|| format!("{url:?} must start with nats://"))?;
        let (credentials, hosts) = rest
            .rsplit_once('@')
            .with_context(|| format!("{url:?} names no USER:PASS@ for the callout's user"))?;
        let (user, password) = credentials
            .split_once(':')
            .with_context(|| format!("{url:?} names no password"))?;
        let servers: Vec<String> = hosts
            .split(',')
            .filter(|h| !h.is_empty())
            .map(|h| format!("nats://{h}"))
            .collect();
        if servers.is_empty() || user.is_empty() {
            anyhow::bail!("{url:?} names no server or no user");
        }
        Ok(Self {
            servers,
            user: user.to_owned(),
            password: password.to_owned(),
            issuer_file,
        })
    }
}

/// The key the manager signs its answers with: an account nkey, whose
/// public half the servers' `auth_callout.issuer` names. Made on first
/// use (mode 0600); replicas share the file.
pub fn issuer(path: &Path) -> Result<nkeys::KeyPair> {
    if let Ok(seed) = std::fs::read_to_string(path) {
        return nkeys::KeyPair::from_seed(seed.trim())
            .map_err(|e| anyhow::anyhow!("{} is not an nkey seed: {e}", path.display()));
    }
    let key = nkeys::KeyPair::new_account();
    let seed = key
        .seed()
        .map_err(|e| anyhow::anyhow!("cannot make an nkey: {e}"))?;
    // Another replica may write it first: whichever is there is used.
    let written = write_atomic(path, format!("{seed}\n").as_bytes(), 0o600, Existing::Keep);
    let seed = std::fs::read_to_string(path)
        .map_err(|e| written.err().unwrap_or_else(|| e.into()))
        .with_context(|| format!("cannot keep the callout key in {}", path.display()))?;
    nkeys::KeyPair::from_seed(seed.trim())
        .map_err(|e| anyhow::anyhow!("{} is not an nkey seed: {e}", path.display()))
}

/// The accounts and auth callout block of a NATS server's configuration,
/// for a cluster whose callout `issuer` signs, answered by `user` with
/// `password`. The same password lets the replicas into the system account
/// as `<user>-system`, to end a revoked device's connections
/// ([`sessions`]): whoever holds it can already read every device's
/// login as the callout sees it, so it is one secret of one holder.
pub fn server_config(issuer: &str, user: &str, password: &str) -> String {
    let quoted = |s: &str| serde_json::Value::from(s).to_string();
    format!(
        r#"accounts {{
  {CALLOUT_ACCOUNT} {{ users: [ {{ user: {user}, password: {password} }} ] }}
  {FLEET_ACCOUNT} {{ jetstream: enabled }}
  SYS {{ users: [ {{ user: {system}, password: {password} }} ] }}
}}
system_account: SYS
authorization {{
  auth_callout {{
    issuer: {issuer}
    account: {CALLOUT_ACCOUNT}
    auth_users: [ {user}, {system} ]
  }}
}}
"#,
        issuer = quoted(issuer),
        user = quoted(user),
        system = quoted(&sessions::system_user(user)),
        password = quoted(password),
    )
}

/// The `tls` block of a server's `mqtt` section: the broker certificate
/// from the fleet CA, and only clients with a certificate from that CA
/// (whose serial the callout then checks against the store).
pub fn mqtt_tls_config(certificate: &crate::serve::tls::BrokerCertificate) -> String {
    let quoted = |p: &Path| serde_json::Value::from(p.to_string_lossy()).to_string();
    format!(
        "tls {{\n  cert_file: {}\n  key_file: {}\n  ca_file: {}\n  verify: true\n  timeout: 5\n}}\n",
        quoted(&certificate.cert_file),
        quoted(&certificate.key_file),
        quoted(&certificate.ca_file),
    )
}

/// A NATS connection as `user`, named `name` on the servers, retrying
/// until one of `servers` answers.
pub async fn connect(
    servers: &[String],
    user: &str,
    password: &str,
    name: &str,
) -> Result<async_nats::Client> {
    async_nats::ConnectOptions::with_user_and_password(user.to_owned(), password.to_owned())
        .name(name)
        .retry_on_initial_connect()
        .connect(servers)
        .await
        .with_context(|| format!("cannot reach NATS at {}", servers.join(", ")))
}
