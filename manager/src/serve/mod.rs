//! `ferry serve`: the manager.
//!
//! One process: the embedded MQTT broker ([`broker`]) unless an external one
//! is named, the MQTT client that ingests device messages and publishes
//! desired state ([`ingest`]), the block server that sends artifacts over
//! MQTT ([`blocks`]), the HTTP API and artifact store ([`api`]),
//! and SQLite ([`store`]) under the data directory.

pub mod api;
pub mod blocks;
pub mod broker;
pub mod desired;
pub mod http;
pub mod ingest;
pub mod limits;
pub mod login;
pub mod metrics;
pub mod nats;
pub mod rollout;
pub mod store;
pub mod tls;

use std::net::SocketAddr;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use ferry_protocol::Timestamp;
use tokio::sync::mpsc;

use crate::files::{Existing, write_atomic};

/// Where the manager listens and keeps its state.
#[derive(Debug, Clone)]
pub struct ServeConfig {
    /// The embedded broker's address (ignored with an external broker).
    pub mqtt_listen: SocketAddr,
    /// The HTTP API's address.
    pub http_listen: SocketAddr,
    /// The data directory.
    pub data_dir: PathBuf,
    /// The database; SQLite in the data directory unless set.
    pub database: Option<store::DatabaseUrl>,
    /// An external broker (`mqtt://[user:pass@]host:port`) instead of the embedded one.
    pub broker: Option<String>,
    /// With a NATS cluster as that broker: answer its auth callout.
    pub auth_callout: Option<nats::AuthCallout>,
    /// The URL devices use to reach the HTTP API (artifact downloads).
    pub public_url: Option<String>,
    /// Devices silent this long are marked offline.
    pub offline_after: Duration,
    /// What one HTTP client may hold.
    pub http_limits: http::HttpLimits,
    /// What one device may publish.
    pub device_limits: limits::DeviceLimits,
    /// Serve MQTT and HTTP over TLS with the fleet CA ([`tls`]); off only
    /// with `--insecure-plaintext`.
    pub tls: bool,
    /// More names the server certificate covers (`--public-name`).
    pub public_names: Vec<String>,
    /// How long a device certificate is valid; devices renew at two thirds.
    pub device_cert_lifetime: Duration,
}

/// A device certificate's lifetime unless configured.
pub const DEVICE_CERT_LIFETIME: Duration = Duration::from_secs(24 * 3600);

/// `N` random bytes from the operating system, as lower-case hex: tokens,
/// passwords, and ids that must not repeat.
pub(crate) fn random_hex<const N: usize>() -> Result<String, getrandom::Error> {
    let mut bytes = [0u8; N];
    getrandom::fill(&mut bytes)?;
    Ok(hex::encode(bytes))
}

/// The operator token file in a data directory.
pub fn token_file(data_dir: &Path) -> PathBuf {
    data_dir.join("operator.token")
}

/// Reads the operator token, creating it (mode 0600) on first start.
fn operator_token(data_dir: &Path) -> Result<(String, bool)> {
    let path = token_file(data_dir);
    if let Ok(token) = std::fs::read_to_string(&path) {
        return Ok((token.trim().to_owned(), false));
    }
    let token = random_hex::<32>().map_err(|e| anyhow::anyhow!("no randomness: {e}"))?;
    write_atomic(
        &path,
        format!("{token}\n").as_bytes(),
        0o600,
        Existing::Keep,
    )?;
    Ok((token, true))
}

/// Runs the manager until `shutdown` resolves.
pub async fn serve(
    config: ServeConfig,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> Result<()> {
    std::fs::create_dir_all(&config.data_dir)
        .with_context(|| format!("cannot create {}", config.data_dir.display()))?;
    std::fs::set_permissions(&config.data_dir, std::fs::Permissions::from_mode(0o700)).ok();
    let artifacts = config.data_dir.join("artifacts");
    std::fs::create_dir_all(&artifacts)?;
    let database = config
        .database
        .clone()
        .unwrap_or_else(|| store::DatabaseUrl::sqlite(&config.data_dir.join("ferry.db")));
    let store = Arc::new(
        store::Store::connect(&database)
            .await
            .with_context(|| format!("cannot open the database {}", database.redacted()))?,
    );
    let (token, created) = operator_token(&config.data_dir)?;
    let token_path = token_file(&config.data_dir);
    if created {
        tracing::info!(file = %token_path.display(), "created the operator token");
    }
    let pki = if config.tls {
        let names = tls::server_names(
            &[config.http_listen, config.mqtt_listen],
            config.public_url.as_deref(),
            &config.public_names,
        );
        let pki = tls::load_or_create(&config.data_dir, &names)?;
        tracing::info!(
            ca = %pki.ca_file.display(),
            fingerprint = %pki.fingerprint,
            names = %names.join(", "),
            "serving MQTT and HTTP over TLS"
        );
        Some(pki)
    } else {
        tracing::warn!(
            "--insecure-plaintext: tokens, passwords and releases cross the network in clear"
        );
        None
    };

    let metrics = metrics::Metrics::new()?;
    let changes = Arc::new(tokio::sync::watch::channel(0u64).0);
    let recorder = ingest::spawn_recorder(
        store.clone(),
        changes.clone(),
        metrics.messages_recorded.clone(),
    );
    let policing = limits::Policing {
        limiter: Arc::new(limits::DeviceLimiter::new(config.device_limits)),
        throttled: metrics.device_throttled.clone(),
        events: recorder.clone(),
    };
    // The broker: embedded, or external.
    // Over TLS, the serial of the manager's own client certificate.
    let mut manager_serial = None;
    let (login, broker_task, sessions) = match &config.broker {
        Some(url) => {
            let (mut login, tls) = parse_external(url)?;
            if tls {
                // The cluster's servers hold certificates from the fleet
                // CA (`ferry nats-config --tls`), and the manager shows one.
                let Some(pki) = &pki else {
                    anyhow::bail!("an mqtts:// broker needs TLS: drop --insecure-plaintext");
                };
                let own = manager_certificate(pki, &config.data_dir)?;
                login.ca_pem = Some(pki.ca_pem.clone());
                login.certificate = Some(own.identity);
                manager_serial = Some(own.serial);
            }
            (login, None, None)
        }
        None => {
            let mut secret = [0u8; 24];
            getrandom::fill(&mut secret).map_err(|e| anyhow::anyhow!("no randomness: {e}"))?;
            let manager = broker::ManagerLogin {
                username: "ferry-manager".into(),
                password: hex::encode(secret),
            };
            let backlog = Arc::new(blocks::Backlog::default());
            // Over TLS the manager's own client shows a certificate too.
            let own = pki
                .as_ref()
                .map(|pki| manager_certificate(pki, &config.data_dir))
                .transpose()?;
            let (sessions, task) = broker::start(
                config.mqtt_listen,
                pki.as_ref()
                    .zip(own.as_ref())
                    .map(|(p, own)| broker::BrokerTls {
                        cert_file: p.cert_file.clone(),
                        key_file: p.key_file.clone(),
                        ca_file: p.ca_file.clone(),
                        manager_serial: own.serial.clone(),
                    }),
                store.clone(),
                manager.clone(),
                metrics.broker_dropped.clone(),
                policing.clone(),
                backlog.clone(),
            )
            .await?;
            let host = if config.mqtt_listen.ip().is_unspecified() {
                "127.0.0.1".to_string()
            } else {
                config.mqtt_listen.ip().to_string()
            };
            let login = ingest::BrokerLogin {
                host,
                port: config.mqtt_listen.port(),
                username: Some(manager.username),
                password: Some(manager.password),
                ca_pem: pki.as_ref().map(|p| p.ca_pem.clone()),
                certificate: own.map(|own| own.identity),
            };
            (login, Some(task), Some((sessions, backlog)))
        }
    };
    let mut nats_sessions = None;
    if let Some(callout) = &config.auth_callout {
        let Some(manager) = login.username.clone().zip(login.password.clone()) else {
            anyhow::bail!("--nats-callout needs the manager's user and password in --broker");
        };
        nats_sessions = Some(
            nats::sessions::Sessions::connect(&callout.servers, &callout.user, &callout.password)
                .await?,
        );
        let issuer = nats::issuer(&callout.issuer_file)?;
        tracing::info!(issuer = %issuer.public_key(), "NATS auth callout issuer");
        let logins = Arc::new(login::Logins {
            store: store.clone(),
            manager: broker::ManagerLogin {
                username: manager.0,
                password: manager.1,
            },
            // Over TLS, devices prove themselves by certificate.
            manager_serial: manager_serial.clone(),
        });
        let callout = nats::callout::Callout {
            servers: callout.servers.clone(),
            user: callout.user.clone(),
            password: callout.password.clone(),
            issuer,
        };
        tokio::spawn(async move {
            if let Err(e) = nats::callout::run(callout, logins).await {
                tracing::error!("NATS auth callout: {e:#}");
            }
        });
    }
    let (sessions, backlog) = sessions.unzip();
    let sessions = sessions
        .map(Sessions::Embedded)
        .or(nats_sessions.map(Sessions::Nats));
    if let Some(task) = broker_task {
        tokio::spawn(task);
    }
    let (outgoing_tx, outgoing_rx) = mpsc::unbounded_channel();
    let wake = Arc::new(tokio::sync::Notify::new());
    let mqtt = ingest::client(&login)?;
    let (block_tx, block_rx) = mpsc::channel(1024);
    let block_server = blocks::BlockServer::new(
        store.clone(),
        artifacts.clone(),
        mqtt.0.clone(),
        metrics.clone(),
        backlog,
    );
    tokio::spawn(block_server.run(block_rx));
    let listeners = ingest::Listeners {
        wake: wake.clone(),
        metrics: metrics.clone(),
        block_requests: block_tx,
        recorder,
        // The embedded broker drops what is over budget before it gets
        // here; an external one does not know the budgets.
        policing: config.broker.is_some().then_some(policing),
    };
    // On a NATS cluster the replicas share one consumer of device messages;
    // the MQTT client only publishes.
    let readiness = ingest::Readiness::new(
        metrics.broker_subscribed.clone(),
        config.auth_callout.is_some(),
    );
    let nats_ingest = config
        .auth_callout
        .as_ref()
        .zip(login.username.clone().zip(login.password.clone()));
    if let Some((callout, (user, password))) = nats_ingest {
        let login = nats::ingest::IngestLogin {
            servers: callout.servers.clone(),
            user,
            password,
        };
        let intake = ingest::Intake::new(store.clone(), listeners.clone());
        tokio::spawn(nats::ingest::run(
            login,
            intake,
            readiness.clone(),
            metrics.messages_redelivered.clone(),
        ));
    }
    tokio::spawn(ingest::run(
        mqtt,
        store.clone(),
        outgoing_rx,
        listeners,
        config.auth_callout.is_none(),
        readiness,
    ));

    // Silence means offline.
    let silence_store = store.clone();
    let offline_after = config.offline_after;
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(offline_after / 3);
        loop {
            tick.tick().await;
            let cutoff = Timestamp::from(std::time::SystemTime::now() - offline_after).to_string();
            if let Err(e) = silence_store.mark_silent_offline(&cutoff).await {
                tracing::warn!("offline check: {e}");
            }
        }
    });

    let listener = tokio::net::TcpListener::bind(config.http_listen)
        .await
        .with_context(|| format!("cannot listen on {}", config.http_listen))?;
    let http_addr = listener.local_addr()?;
    let public_url = config.public_url.clone().unwrap_or_else(|| {
        let host = if http_addr.ip().is_unspecified() {
            "127.0.0.1".to_string()
        } else {
            http_addr.ip().to_string()
        };
        let scheme = if pki.is_some() { "https" } else { "http" };
        format!("{scheme}://{host}:{}", http_addr.port())
    });
    let public_url_shared = Arc::new(public_url.clone());
    let broker_url = Arc::new(device_broker_url(&config, &public_url, pki.is_some()));
    let engine = rollout::Engine {
        store: store.clone(),
        outgoing: outgoing_tx.clone(),
        public_url: public_url_shared.clone(),
        wake,
        changes,
        leader: metrics.rollout_leader.clone(),
        nudged: Default::default(),
    };
    tokio::spawn(engine.clone().run());
    let state = api::AppState {
        store,
        artifacts,
        token: Arc::new(token),
        outgoing: outgoing_tx,
        public_url: public_url_shared,
        broker_url,
        rollouts: engine,
        metrics,
        sessions,
        failures: Default::default(),
        ca_pem: pki.as_ref().map(|p| Arc::new(p.ca_pem.clone())),
        device_ca: pki.as_ref().map(|p| p.ca.clone()),
        device_cert_lifetime: config.device_cert_lifetime,
        // The embedded broker over TLS, or a cluster's gateways over TLS
        // (whose callout checks certificates as the embedded broker does).
        certificates_only: pki.is_some() && (config.broker.is_none() || manager_serial.is_some()),
        nats_broker: config.auth_callout.is_some(),
    };
    remember_local_manager(
        &public_url,
        &token_path,
        pki.as_ref().map(|p| p.ca_file.as_path()),
    );
    tracing::info!(
        "dashboard: {public_url}/ (sign in with the token in {})",
        token_path.display()
    );
    tracing::info!(
        http = %http_addr,
        mqtt = %config.broker.clone().unwrap_or_else(|| config.mqtt_listen.to_string()),
        token = %token_path.display(),
        "ferry manager running"
    );
    http::serve(
        listener,
        pki.map(|p| p.server),
        api::router(state),
        config.http_limits,
        shutdown,
    )
    .await;
    Ok(())
}

/// The manager's own broker client certificate and its serial.
struct ManagerCertificate {
    serial: String,
    identity: Arc<ferry_agent::tls::ClientCertificate>,
}

fn manager_certificate(pki: &tls::Pki, data_dir: &Path) -> Result<ManagerCertificate> {
    let kept = tls::manager_client(data_dir, &pki.ca)?;
    let identity = Arc::new(ferry_agent::tls::ClientCertificate::default());
    identity
        .set(
            vec![kept.der],
            rustls::pki_types::PrivateKeyDer::Pkcs8(kept.key),
            None,
        )
        .map_err(anyhow::Error::msg)?;
    Ok(ManagerCertificate {
        serial: kept.serial,
        identity,
    })
}

/// Where devices reach the broker: the external one as configured (without
/// the manager's credentials), or the embedded one on the host of the
/// public URL.
fn device_broker_url(config: &ServeConfig, public_url: &str, tls: bool) -> String {
    if let Some(url) = &config.broker {
        let (scheme, address) = url.split_once("://").unwrap_or(("mqtt", url));
        let address = address.rsplit_once('@').map_or(address, |(_, a)| a);
        return format!("{scheme}://{address}");
    }
    let rest = public_url
        .split_once("://")
        .map_or(public_url, |(_, rest)| rest);
    let host = match rest.strip_prefix('[') {
        // An IPv6 address keeps its brackets.
        Some(v6) => v6.split(']').next().map(|h| format!("[{h}]")),
        None => rest.split(['/', ':']).next().map(str::to_owned),
    }
    .unwrap_or_else(|| "127.0.0.1".into());
    let scheme = if tls { "mqtts" } else { "mqtt" };
    format!("{scheme}://{host}:{}", config.mqtt_listen.port())
}

/// `mqtt://[user:pass@]host[:port]`, or `mqtts://` for TLS; whether TLS.
fn parse_external(url: &str) -> Result<(ingest::BrokerLogin, bool)> {
    let (rest, tls) = match (url.strip_prefix("mqtt://"), url.strip_prefix("mqtts://")) {
        (Some(rest), _) => (rest, false),
        (_, Some(rest)) => (rest, true),
        _ => anyhow::bail!("broker url {url:?} must start with mqtt:// or mqtts://"),
    };
    let (credentials, address) = match rest.rsplit_once('@') {
        Some((c, a)) => (Some(c), a),
        None => (None, rest),
    };
    let (host, port) = match address.rsplit_once(':') {
        Some((h, p)) => (
            h,
            p.parse().with_context(|| format!("bad port in {url:?}"))?,
        ),
        None => (address, if tls { 8883 } else { 1883 }),
    };
    let (username, password) = match credentials.and_then(|c| c.split_once(':')) {
        Some((u, p)) => (Some(u.to_owned()), Some(p.to_owned())),
        None => (credentials.map(str::to_owned), None),
    };
    let login = ingest::BrokerLogin {
        host: host.to_owned(),
        port,
        username,
        password,
        ca_pem: None,
        certificate: None,
    };
    Ok((login, tls))
}

/// Where `ferry serve` tells CLIs on the same machine how to reach it.
pub fn local_manager_file() -> Option<PathBuf> {
    let base = std::env::var_os("XDG_CONFIG_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".config")))?;
    Some(base.join("ferry").join("local-manager.json"))
}

fn remember_local_manager(url: &str, token_file: &Path, ca_file: Option<&Path>) {
    let Some(path) = local_manager_file() else {
        return;
    };
    let absolute = |p: &Path| std::fs::canonicalize(p).unwrap_or_else(|_| p.to_owned());
    let text = serde_json::json!({
        "url": url, "token_file": absolute(token_file), "ca_file": ca_file.map(absolute),
    })
    .to_string();
    let written = path
        .parent()
        .map(std::fs::create_dir_all)
        .transpose()
        .map_err(anyhow::Error::from)
        .and_then(|_| write_atomic(&path, text.as_bytes(), 0o600, Existing::Replace));
    if let Err(e) = written {
        tracing::debug!("cannot record the local manager: {e:#}");
    }
}

/// Where a device's live connections are ended at once (removed, revoked,
/// a new password): the embedded broker's sessions, or a NATS cluster's
/// connections through its system account. With any other external
/// broker there is none, and a device keeps its connection until it
/// next connects.
#[derive(Clone)]
pub enum Sessions {
    /// The embedded broker.
    Embedded(broker::Sessions),
    /// A NATS cluster answering the manager's auth callout.
    Nats(nats::sessions::Sessions),
}

impl Sessions {
    /// Disconnects `device`, wherever it is connected.
    pub async fn end(&self, device: &str) {
        match self {
            Self::Embedded(sessions) => sessions.end(device).await,
            Self::Nats(sessions) => sessions.end(device).await,
        }
    }
}
