//! The agent's configuration file (TOML).
//!
//! ```toml
//! device_id = "gw-0042"
//! data_dir = "/var/lib/ferry"
//! inbox = "/var/lib/ferry/inbox"      # optional: releases dropped here are installed
//! supervisor = "auto"                 # auto | systemd | direct
//! health_interval = "30s"
//! pass_env = []                       # agent variables services also get (none)
//! stop_services_on_exit = false       # services run on while the agent is stopped
//! isolate_services = true             # a service with no `user` gets a user of its own
//! [broker]                            # optional: without it the agent works offline
//! url = "mqtt://manager.local:1883"   # mqtts:// for TLS
//! username = "gw-0042"
//! password = "..."
//! manager_url = "http://manager.local:8080"  # the only origin the password is sent to
//! ca_pem = """-----BEGIN CERTIFICATE-----..."""  # the fleet CA: the only one trusted
//! [trust]
//! keys = ["/etc/ferry/ops.pub"]       # public key files
//! threshold = 1
//! services = ["api", "sensor"]        # optional: the only services this device runs
//! [transfer]                          # optional: how artifacts are fetched
//! transport = "auto"                  # auto (HTTP, else MQTT) | http | mqtt
//! block_size = 65536                  # bytes per MQTT block, 1 KiB to 256 KiB
//! blocks_per_request = 16
//! requests_in_flight = 2
//! retry_after = "10s"                 # ask again for blocks that did not come
//! give_up_after = "2m"                # no new byte for this long ends the attempt
//! ```

use std::path::{Path, PathBuf};
use std::time::Duration;

use ferry_protocol::{DeviceId, PublicKey, Target, TrustPolicy};
use serde::Deserialize;

use crate::install::AgentLimits;

/// The whole configuration.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// This device's id: its MQTT client id and topic segment.
    pub device_id: DeviceId,
    /// Where releases, state and the journal live.
    #[serde(default = "default_data_dir")]
    pub data_dir: PathBuf,
    /// A directory watched for dropped releases.
    #[serde(default)]
    pub inbox: Option<PathBuf>,
    /// Which supervisor runs the services.
    #[serde(default)]
    pub supervisor: SupervisorKind,
    /// How often health is reported.
    #[serde(default = "default_health_interval", with = "humantime_serde")]
    pub health_interval: Duration,
    /// The device's target triple; the agent's own target by default.
    #[serde(default)]
    pub target: Option<Target>,
    /// Where systemd unit files are written.
    #[serde(default = "default_unit_dir")]
    pub unit_dir: PathBuf,
    /// Variables of the agent's own environment that every service also
    /// gets (say `QEMU_LD_PREFIX` on an emulated device); none by default.
    #[serde(default)]
    pub pass_env: Vec<ferry_protocol::EnvName>,
    /// Stop the services when the agent stops. By default they keep running
    /// (an agent restarted or upgraded never takes a service down; under
    /// its own supervisor a new agent stops and restarts what it finds).
    #[serde(default)]
    pub stop_services_on_exit: bool,
    /// Run each service whose manifest names no user as a user of its own
    /// (`DynamicUser=` under systemd; a dedicated uid under the agent's own
    /// supervisor when the agent runs as root), not as the agent's user.
    #[serde(default = "yes")]
    pub isolate_services: bool,
    /// The MQTT broker; absent for offline devices.
    #[serde(default)]
    pub broker: Option<BrokerConfig>,
    /// Which release keys to trust.
    pub trust: TrustConfig,
    /// Ceilings on any release.
    #[serde(default)]
    pub limits: LimitsConfig,
    /// How artifacts are fetched.
    #[serde(default)]
    pub transfer: TransferConfig,
}

/// How artifacts travel to the device.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Transport {
    /// HTTP from the URL in the desired state; MQTT blocks when that URL
    /// cannot be reached or there is none.
    #[default]
    Auto,
    /// HTTP only.
    Http,
    /// MQTT blocks only (sites that open only the broker's port).
    Mqtt,
}

/// How artifacts are fetched, and the MQTT block transfer's flow control.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TransferConfig {
    /// Which transport.
    pub transport: Transport,
    /// Bytes per MQTT block.
    pub block_size: u32,
    /// Blocks asked for in one request.
    pub blocks_per_request: u32,
    /// Requests outstanding at once: with the two above, the most bytes
    /// in flight (and held in memory out of order).
    pub requests_in_flight: u32,
    /// Silence after which blocks not yet received are asked for again.
    #[serde(with = "humantime_serde")]
    pub retry_after: Duration,
    /// Time without a new byte after which the attempt ends; the worker
    /// tries again later, resuming from what it holds.
    #[serde(with = "humantime_serde")]
    pub give_up_after: Duration,
}

impl Default for TransferConfig {
    fn default() -> Self {
        Self {
            transport: Transport::Auto,
            block_size: ferry_protocol::blocks::DEFAULT_BLOCK_SIZE,
            blocks_per_request: 16,
            requests_in_flight: 2,
            retry_after: Duration::from_secs(10),
            give_up_after: Duration::from_secs(120),
        }
    }
}

impl TransferConfig {
    fn check(&self) -> Result<(), String> {
        use ferry_protocol::blocks::{
            MAX_BLOCK_SIZE, MAX_BLOCKS_PER_REQUEST, MAX_REQUEST_BYTES, MAX_REQUESTS_IN_FLIGHT,
            MIN_BLOCK_SIZE,
        };
        if !(MIN_BLOCK_SIZE..=MAX_BLOCK_SIZE).contains(&self.block_size) {
            return Err(format!(
                "transfer.block_size = {} is outside {MIN_BLOCK_SIZE} to {MAX_BLOCK_SIZE}",
                self.block_size
            ));
        }
        if !(1..=MAX_BLOCKS_PER_REQUEST).contains(&self.blocks_per_request) {
            return Err(format!(
                "transfer.blocks_per_request = {} is outside 1 to {MAX_BLOCKS_PER_REQUEST}",
                self.blocks_per_request
            ));
        }
        let request_bytes = u64::from(self.block_size) * u64::from(self.blocks_per_request);
        if request_bytes > MAX_REQUEST_BYTES {
            return Err(format!(
                "transfer.block_size × blocks_per_request = {request_bytes} bytes; a request may ask for at most {MAX_REQUEST_BYTES}"
            ));
        }
        if !(1..=MAX_REQUESTS_IN_FLIGHT).contains(&self.requests_in_flight) {
            return Err(format!(
                "transfer.requests_in_flight = {} is outside 1 to {MAX_REQUESTS_IN_FLIGHT}",
                self.requests_in_flight
            ));
        }
        if self.retry_after.is_zero() || self.give_up_after < self.retry_after {
            return Err(
                "transfer.retry_after must be above zero and give_up_after at least as long".into(),
            );
        }
        Ok(())
    }
}

/// Which supervisor runs the services.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SupervisorKind {
    /// systemd when `/run/systemd/system` exists, else direct.
    #[default]
    Auto,
    /// Units under systemd.
    Systemd,
    /// The agent runs the services itself.
    Direct,
    /// No service processes: fleet simulators only (feature `simulator`).
    #[cfg(feature = "simulator")]
    Simulated,
}

/// The MQTT broker.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BrokerConfig {
    /// `mqtt://host:port` or `mqtts://host:port`.
    pub url: String,
    /// User name; the device id by default.
    #[serde(default)]
    pub username: Option<String>,
    /// Password.
    #[serde(default)]
    pub password: Option<String>,
    /// The manager's HTTP(S) origin, e.g. `http://manager.local:8080`: the
    /// only place the credentials above are sent with a download. An
    /// artifact URL anywhere else (the desired state that names it is not
    /// signed) is fetched without them. Unset: no download carries them.
    #[serde(default)]
    pub manager_url: Option<String>,
    /// The fleet CA's certificate (PEM), as `ferry device add` writes it:
    /// the only CA trusted for `mqtts://` and HTTPS downloads. Unset: the
    /// system's roots.
    #[serde(default)]
    pub ca_pem: Option<String>,
    /// The one-time enrolment token `ferry device add` printed: with the
    /// fleet CA, an `mqtts://` broker and no password, the device makes its
    /// own key and gets a client certificate for it with this token; later
    /// certificates come without it. Spent once used.
    #[serde(default)]
    pub enrol_token: Option<String>,
}

impl BrokerConfig {
    /// Whether this device proves who it is with a client certificate: the
    /// fleet CA known, TLS, and no password.
    pub fn uses_certificate(&self) -> bool {
        self.password.is_none() && self.ca_pem.is_some() && self.url.starts_with("mqtts://")
    }

    /// The origin (scheme, host, port) of `manager_url`.
    pub fn manager_origin(&self) -> Result<Option<reqwest::Url>, String> {
        let Some(text) = &self.manager_url else {
            return Ok(None);
        };
        let url =
            reqwest::Url::parse(text).map_err(|e| format!("broker.manager_url {text:?}: {e}"))?;
        if !matches!(url.scheme(), "http" | "https") || url.host_str().is_none() {
            return Err(format!(
                "broker.manager_url {text:?}: expected http://HOST[:PORT] or https://HOST[:PORT]"
            ));
        }
        Ok(Some(url))
    }
}

/// Which release keys to trust.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrustConfig {
    /// Public key files (`ferry keygen` writes them).
    #[serde(default)]
    pub keys: Vec<PathBuf>,
    /// Instead of `keys`: a signed trust root file (`ferry root`), whose
    /// release keys the device trusts and which newer roots replace.
    #[serde(default)]
    pub root: Option<PathBuf>,
    /// Distinct keys that must sign a release.
    #[serde(default = "default_threshold")]
    pub threshold: usize,
    /// The only services this device runs; a release of any other, though
    /// signed, is refused. Unset: any service the keys sign.
    #[serde(default)]
    pub services: Option<Vec<ferry_protocol::ServiceName>>,
}

/// Ceilings on any release, whatever its manifest says.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LimitsConfig {
    /// Most bytes a release may unpack to.
    pub max_unpacked_bytes: u64,
    /// Most entries a release may hold.
    pub max_entries: u64,
    /// Bytes to leave free on the data partition.
    pub reserve_bytes: u64,
    /// Most bytes of one service's output kept in its log file under the
    /// agent's own supervisor (plus one older file as large).
    pub service_log_bytes: u64,
}

impl Default for LimitsConfig {
    fn default() -> Self {
        let d = AgentLimits::default();
        Self {
            max_unpacked_bytes: d.max_unpacked_bytes,
            max_entries: d.max_entries,
            reserve_bytes: d.reserve_bytes,
            service_log_bytes: crate::supervisor::service_log::LOG_BYTES,
        }
    }
}

impl From<LimitsConfig> for AgentLimits {
    fn from(l: LimitsConfig) -> Self {
        Self {
            max_unpacked_bytes: l.max_unpacked_bytes,
            max_entries: l.max_entries,
            reserve_bytes: l.reserve_bytes,
        }
    }
}

/// `policy`, accepting releases of `services` only when the device names
/// them (`[trust] services`).
pub fn only_services(
    policy: TrustPolicy,
    services: Option<&[ferry_protocol::ServiceName]>,
) -> TrustPolicy {
    match services {
        Some(services) => policy.only_services(services.iter().cloned()),
        None => policy,
    }
}

fn yes() -> bool {
    true
}

fn default_data_dir() -> PathBuf {
    PathBuf::from("/var/lib/ferry")
}

fn default_unit_dir() -> PathBuf {
    PathBuf::from("/etc/systemd/system")
}

fn default_health_interval() -> Duration {
    Duration::from_secs(30)
}

fn default_threshold() -> usize {
    1
}

/// A configuration that cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read {path}: {error}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        error: std::io::Error,
    },
    /// The file is not valid TOML or has wrong keys or values.
    #[error("{path}: {message}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// What the parser said, with line and column.
        message: String,
    },
    /// A trust key file could not be used.
    #[error("trust key {path}: {message}")]
    Key {
        /// The key file.
        path: PathBuf,
        /// Why.
        message: String,
    },
    /// Keys and threshold that could never accept a release.
    #[error("trust policy: {0}")]
    Policy(#[from] ferry_protocol::trust::PolicyError),
    /// A setting that parsed but cannot be used.
    #[error("{0}")]
    Invalid(String),
    /// The trust root cannot be loaded.
    #[error("trust root: {0}")]
    Root(#[from] crate::trust_root::LoadError),
}

impl Config {
    /// Reads and checks a configuration file.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|error| ConfigError::Read {
            path: path.to_owned(),
            error,
        })?;
        Self::parse(&text).map_err(|message| ConfigError::Parse {
            path: path.to_owned(),
            message,
        })
    }

    /// Parses configuration text.
    pub fn parse(text: &str) -> Result<Self, String> {
        let config: Self =
            toml::from_str(text).map_err(|e| e.to_string().trim_end().replace('\n', " "))?;
        config.transfer.check()?;
        if let Some(broker) = &config.broker {
            let origin = broker.manager_origin()?;
            if broker.uses_certificate() && origin.is_none() {
                return Err(
                    "a device with a client certificate gets it from its manager: set broker.manager_url"
                        .into(),
                );
            }
        }
        if config.transfer.transport == Transport::Mqtt && config.broker.is_none() {
            return Err("transfer.transport = \"mqtt\" needs a [broker]".into());
        }
        Ok(config)
    }

    /// The device's target: configured, or the agent's own.
    pub fn target(&self) -> Result<Target, ferry_protocol::NameError> {
        match &self.target {
            Some(t) => Ok(t.clone()),
            None => Target::new(crate::BUILD_TARGET),
        }
    }

    /// Reads the trust key files into a policy.
    pub fn trust_policy(&self) -> Result<TrustPolicy, ConfigError> {
        self.trust().map(|(policy, _)| policy)
    }

    /// The release keys to trust, and the trust root they come from when
    /// the device is set up with one (the newer of the provisioned file and
    /// the one accepted since), read once.
    pub fn trust(&self) -> Result<(TrustPolicy, Option<crate::trust_root::HeldRoot>), ConfigError> {
        let held = self.held_root()?;
        let policy = match &held {
            Some(held) => held
                .root
                .release_policy()
                .map_err(|e| ConfigError::Invalid(format!("trust root: {e}")))?,
            None => self.key_policy()?,
        };
        Ok((only_services(policy, self.trust.services.as_deref()), held))
    }

    fn held_root(&self) -> Result<Option<crate::trust_root::HeldRoot>, ConfigError> {
        let Some(provisioned) = &self.trust.root else {
            return Ok(None);
        };
        if !self.trust.keys.is_empty() {
            return Err(ConfigError::Invalid(
                "trust: name either keys or a root, not both".into(),
            ));
        }
        let layout = crate::layout::Layout::new(&self.data_dir);
        Ok(Some(crate::trust_root::load(provisioned, &layout)?))
    }

    fn key_policy(&self) -> Result<TrustPolicy, ConfigError> {
        let mut keys = Vec::new();
        for path in &self.trust.keys {
            let text = std::fs::read_to_string(path).map_err(|e| ConfigError::Key {
                path: path.clone(),
                message: e.to_string(),
            })?;
            let key = PublicKey::from_text(&text).map_err(|e| ConfigError::Key {
                path: path.clone(),
                message: e.to_string(),
            })?;
            keys.push(key);
        }
        Ok(TrustPolicy::new(keys, self.trust.threshold)?)
    }
}

/// Durations as "30s", "5m" (humantime), for serde.
mod humantime_serde {
    use std::time::Duration;

    use serde::{Deserialize, Deserializer};

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        let text = String::deserialize(d)?;
        humantime::parse_duration(&text)
            .map_err(|e| serde::de::Error::custom(format!("{text:?}: {e}")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const EXAMPLE: &str = r#"
device_id = "gw-0042"
data_dir = "/var/lib/ferry"
inbox = "/var/lib/ferry/inbox"
supervisor = "auto"
health_interval = "30s"
[broker]
url = "mqtt://manager.local:1883"
username = "gw-0042"
password = "secret"
manager_url = "http://manager.local:8080"
[trust]
keys = ["/etc/ferry/ops.pub"]
threshold = 1
services = ["api", "sensor"]
"#;

    #[test]
    fn the_documented_example_parses() {
        let c = Config::parse(EXAMPLE).unwrap();
        assert_eq!(c.device_id.as_str(), "gw-0042");
        assert_eq!(c.health_interval, Duration::from_secs(30));
        assert_eq!(c.supervisor, SupervisorKind::Auto);
        assert!(
            c.isolate_services,
            "services get users of their own by default"
        );
        assert_eq!(c.broker.unwrap().url, "mqtt://manager.local:1883");
        assert_eq!(c.trust.threshold, 1);
        assert_eq!(
            c.trust.services.as_deref().map(|s| s.len()),
            Some(2),
            "{:?}",
            c.trust.services
        );
        assert_eq!(c.limits, LimitsConfig::default());
    }

    #[test]
    fn mistakes_are_named() {
        let typo = EXAMPLE.replace("supervisor = \"auto\"", "supervisor = \"runit\"");
        assert!(Config::parse(&typo).unwrap_err().contains("runit"));
        let unknown = EXAMPLE.replace("threshold = 1", "threshold = 1\nthreshhold = 2");
        assert!(Config::parse(&unknown).unwrap_err().contains("threshhold"));
        let bad_id = EXAMPLE.replace("gw-0042\"\ndata", "gw/0042\"\ndata");
        assert!(
            Config::parse(&bad_id)
                .unwrap_err()
                .contains("invalid device id")
        );
        let bad_service = EXAMPLE.replace("\"sensor\"]", "\"../etc\"]");
        assert!(Config::parse(&bad_service).unwrap_err().contains("../etc"));
        let bad_origin = EXAMPLE.replace("http://manager.local:8080", "ftp://manager.local");
        assert!(
            Config::parse(&bad_origin)
                .unwrap_err()
                .contains("manager_url")
        );
        let bad_interval = EXAMPLE.replace("\"30s\"", "\"soon\"");
        assert!(Config::parse(&bad_interval).unwrap_err().contains("soon"));
        for (transfer, named) in [
            ("transport = \"ftp\"", "ftp"),
            ("block_size = 512", "block_size"),
            ("block_size = 262145", "block_size"),
            ("blocks_per_request = 0", "blocks_per_request"),
            ("requests_in_flight = 0", "requests_in_flight"),
            ("requests_in_flight = 9", "requests_in_flight"),
            (
                "block_size = 262144\nblocks_per_request = 65",
                "blocks_per_request",
            ),
            ("retry_after = \"0s\"", "retry_after"),
            (
                "retry_after = \"1m\"\ngive_up_after = \"10s\"",
                "give_up_after",
            ),
        ] {
            let text = format!("{EXAMPLE}[transfer]\n{transfer}\n");
            let err = Config::parse(&text).unwrap_err();
            assert!(err.contains(named), "{transfer}: {err}");
        }
        let offline_mqtt = EXAMPLE
            .replace("[broker]\nurl = \"mqtt://manager.local:1883\"\nusername = \"gw-0042\"\npassword = \"secret\"\nmanager_url = \"http://manager.local:8080\"\n", "")
            + "[transfer]\ntransport = \"mqtt\"\n";
        assert!(
            Config::parse(&offline_mqtt)
                .unwrap_err()
                .contains("needs a [broker]")
        );
    }

    #[test]
    fn transfer_settings_parse() {
        let c = Config::parse(EXAMPLE).unwrap();
        assert_eq!(c.transfer, TransferConfig::default());
        let text = format!(
            "{EXAMPLE}[transfer]\ntransport = \"mqtt\"\nblock_size = 4096\nretry_after = \"2s\"\n"
        );
        let c = Config::parse(&text).unwrap();
        assert_eq!(c.transfer.transport, Transport::Mqtt);
        assert_eq!(c.transfer.block_size, 4096);
        assert_eq!(c.transfer.retry_after, Duration::from_secs(2));
        assert_eq!(c.transfer.blocks_per_request, 16);
    }

    #[test]
    fn the_agent_knows_its_own_target() {
        let c = Config::parse(EXAMPLE).unwrap();
        assert_eq!(c.target().unwrap().as_str(), crate::BUILD_TARGET);
    }
}
