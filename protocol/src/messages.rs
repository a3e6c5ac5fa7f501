//! Payloads of the device topics, one type per topic kind.
//!
//! Every payload is JSON with a `schema` version. Readers accept fields they
//! do not know (a newer sender may add optional fields without a schema
//! bump) but refuse a schema version they do not know.

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use crate::decode::{DecodeError, check_schema, decode_json};
use crate::digest::Sha256Digest;
use crate::envelope::Envelope;
use crate::names::ServiceName;
use crate::time::Timestamp;
use crate::topics::TopicKind;

/// The message schema version this build writes and reads.
pub const MESSAGE_SCHEMA: u32 = 1;

/// A payload of one of the device topics.
pub trait Message: Serialize + DeserializeOwned {
    /// The topic kind it travels on.
    const KIND: TopicKind;
    /// What it is called in errors.
    const WHAT: &'static str;
    /// The largest payload accepted, checked before parsing.
    const MAX_BYTES: usize;

    /// The payload's declared schema version.
    fn schema(&self) -> u32;

    /// Reads a payload, checking size and schema version.
    fn decode(bytes: &[u8]) -> Result<Self, DecodeError> {
        let message: Self = decode_json(Self::WHAT, bytes, Self::MAX_BYTES)?;
        check_schema(Self::WHAT, message.schema(), MESSAGE_SCHEMA)?;
        Ok(message)
    }

    /// The payload as compact JSON.
    fn encode(&self) -> Vec<u8> {
        // Serialising plain data to a Vec cannot fail.
        serde_json::to_vec(self).unwrap_or_default()
    }
}

macro_rules! message {
    ($ty:ident, $kind:ident, $what:literal, $max:expr) => {
        impl Message for $ty {
            const KIND: TopicKind = TopicKind::$kind;
            const WHAT: &'static str = $what;
            const MAX_BYTES: usize = $max;
            fn schema(&self) -> u32 {
                self.schema
            }
        }
    };
}

/// Identifies one release of one service.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub struct ReleaseRef {
    /// The service.
    pub service: ServiceName,
    /// Its version.
    pub version: String,
    /// Its sequence.
    pub sequence: u64,
}

/// `desired`: what the device should run. Retained, so a device that was
/// offline converges on reconnect. Only the envelopes are trusted; the rest
/// is a hint the device checks against what they sign.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub struct Desired {
    /// Payload schema version: 1 for this format.
    pub schema: u32,
    /// The rollout or deployment that set this state, for progress reports.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rollout: Option<String>,
    /// One signed release per service.
    pub releases: Vec<DesiredRelease>,
    /// The trust roots the manager holds, oldest first: a device walks
    /// from the version it holds to the newest, one version at a time
    /// (each checked against the one before; see [`crate::root`]).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub roots: Vec<crate::root::SignedRoot>,
}
message!(Desired, Desired, "desired state", 1024 * 1024);

/// One service's desired release.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub struct DesiredRelease {
    /// The signed manifest.
    pub envelope: Envelope,
    /// Where to download the artifact over HTTP. Untrusted: the artifact's
    /// hash is checked against the signed manifest.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub artifact_url: Option<String>,
}

/// `reported`: what the device runs. Retained.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub struct Reported {
    /// Payload schema version: 1 for this format.
    pub schema: u32,
    /// When the report was made.
    pub time: Timestamp,
    /// The agent's version.
    pub agent_version: String,
    /// The release installed for each service.
    pub services: Vec<InstalledService>,
    /// The outcome of the most recent deployment.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_result: Option<DeploymentResult>,
    /// When the agent last received its desired state and found every
    /// release in it signed by its trust keys and installed: the manager
    /// still asked for what the device runs. Absent until that happens
    /// after the agent starts. An old value on a device that is online
    /// means the desired state it was last given was not the one it runs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub desired_confirmed_at: Option<Timestamp>,
    /// The version of the trust root the device holds, when it is set up
    /// with one (`[trust] root`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub root_version: Option<u64>,
}
message!(Reported, Reported, "reported state", 256 * 1024);

/// A service's installed release.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub struct InstalledService {
    /// Which release.
    #[serde(flatten)]
    pub release: ReleaseRef,
    /// SHA-256 of the artifact it was installed from.
    pub artifact_sha256: Sha256Digest,
    /// When it was committed.
    pub installed_at: Timestamp,
}

/// How a deployment of one release ended.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub struct DeploymentResult {
    /// The rollout it belonged to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rollout: Option<String>,
    /// Which release.
    #[serde(flatten)]
    pub release: ReleaseRef,
    /// How it ended.
    pub outcome: Outcome,
    /// Why, when it did not succeed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// When it ended.
    pub time: Timestamp,
}

/// How a deployment ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    /// Installed, healthy and committed.
    Installed,
    /// Refused before anything changed (signature, target, rollback...).
    Rejected,
    /// Failed before the swap; the old release never stopped.
    Failed,
    /// Swapped in, failed its health gate, and the previous release restored.
    RolledBack,
}

/// `events`: one step of a deployment, as it happens.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub struct Event {
    /// Payload schema version: 1 for this format.
    pub schema: u32,
    /// When the step reached this state.
    pub time: Timestamp,
    /// The rollout the release belongs to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rollout: Option<String>,
    /// The release concerned; absent for events before a manifest was read.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub release: Option<ReleaseRef>,
    /// The install step.
    pub step: Step,
    /// Where the step is.
    pub status: StepStatus,
    /// Bytes done so far, for long steps such as downloads.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub progress: Option<Progress>,
    /// On failure, what went wrong, in words an operator can act on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}
message!(Event, Events, "event", 64 * 1024);

/// The steps of the install path, in order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(rename_all = "snake_case")]
pub enum Step {
    /// Signature, threshold, expiry, target and sequence checks.
    Verify,
    /// Free space for the download and the unpacked release.
    DiskCheck,
    /// Fetching the artifact.
    Download,
    /// SHA-256 and size of the artifact.
    HashCheck,
    /// Unpacking under the strict rules.
    Unpack,
    /// The entrypoint's ELF header against the device.
    ElfCheck,
    /// Replacing the `current` link.
    Swap,
    /// Restarting the service.
    Restart,
    /// Waiting for the service to prove healthy.
    HealthGate,
    /// Making the new release the committed one.
    Commit,
    /// Restoring the previous release.
    Rollback,
    /// Finishing a step interrupted by a restart or power loss.
    Recover,
    /// Applying a config change without a restart.
    Reload,
    /// Accepting a new version of the trust root.
    Trust,
}

/// Where a step is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(rename_all = "snake_case")]
pub enum StepStatus {
    /// The step began.
    Started,
    /// The step is under way; see `progress`.
    Progress,
    /// The step finished.
    Succeeded,
    /// The step failed; see `reason`.
    Failed,
}

/// Progress of a long step.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub struct Progress {
    /// Bytes done.
    pub done: u64,
    /// Bytes in all, when known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub total: Option<u64>,
}

/// `fetch`: a device asks for a byte range of an artifact, to be sent as
/// blocks of `block_size` bytes on its `blocks` topic (see
/// [`crate::blocks`]). Many blocks per request keep requests rare on slow
/// links; the device keeps a few requests in flight.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub struct BlockRequest {
    /// Payload schema version: 1 for this format.
    pub schema: u32,
    /// The artifact, by the SHA-256 its signed manifest names.
    pub artifact: Sha256Digest,
    /// First byte wanted.
    pub offset: u64,
    /// Bytes wanted from `offset` (the answer stops at the artifact's end).
    pub length: u64,
    /// Bytes per block, [`crate::blocks::MIN_BLOCK_SIZE`] to
    /// [`crate::blocks::MAX_BLOCK_SIZE`].
    pub block_size: u32,
}

impl Message for BlockRequest {
    const KIND: TopicKind = TopicKind::Fetch;
    const WHAT: &'static str = "block request";
    const MAX_BYTES: usize = 1024;
    fn schema(&self) -> u32 {
        self.schema
    }

    /// Reads a request and checks its block size and range.
    fn decode(bytes: &[u8]) -> Result<Self, DecodeError> {
        let request: Self = decode_json(Self::WHAT, bytes, Self::MAX_BYTES)?;
        check_schema(Self::WHAT, request.schema, MESSAGE_SCHEMA)?;
        request
            .check()
            .map_err(|reason| DecodeError::invalid(Self::WHAT, reason))?;
        Ok(request)
    }
}

impl BlockRequest {
    /// Whether the block size and range are within the protocol's limits.
    pub fn check(&self) -> Result<(), String> {
        use crate::blocks::{
            MAX_BLOCK_SIZE, MAX_BLOCKS_PER_REQUEST, MAX_REQUEST_BYTES, MIN_BLOCK_SIZE,
        };
        if !(MIN_BLOCK_SIZE..=MAX_BLOCK_SIZE).contains(&self.block_size) {
            return Err(format!(
                "block size {} is outside {MIN_BLOCK_SIZE} to {MAX_BLOCK_SIZE} bytes",
                self.block_size
            ));
        }
        if self.length == 0 {
            return Err("asks for no bytes".into());
        }
        let blocks = self.length.div_ceil(u64::from(self.block_size));
        if blocks > u64::from(MAX_BLOCKS_PER_REQUEST) {
            return Err(format!(
                "asks for {blocks} blocks; at most {MAX_BLOCKS_PER_REQUEST} per request"
            ));
        }
        if self.length > MAX_REQUEST_BYTES {
            return Err(format!(
                "asks for {} bytes; at most {MAX_REQUEST_BYTES} per request",
                self.length
            ));
        }
        if self.offset.checked_add(self.length).is_none() {
            return Err("range runs past the largest offset".into());
        }
        Ok(())
    }

    /// The blocks answering this request for an artifact of `size` bytes:
    /// `(offset, length)` pairs, the last one cut at the artifact's end.
    /// None when the range starts at or past the end.
    pub fn blocks(&self, size: u64) -> Option<impl Iterator<Item = (u64, u32)>> {
        if self.offset >= size || self.block_size == 0 {
            return None;
        }
        let end = self.offset.saturating_add(self.length).min(size);
        let step = u64::from(self.block_size);
        let first = self.offset;
        let count = (end - first).div_ceil(step);
        Some((0..count).map(move |i| {
            let at = first + i * step;
            // At most `block_size`, which is a u32.
            let len = (end - at).min(step) as u32;
            (at, len)
        }))
    }
}

/// `health`: the device's periodic health report.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub struct Health {
    /// Payload schema version: 1 for this format.
    pub schema: u32,
    /// When the figures were taken.
    pub time: Timestamp,
    /// The agent's version.
    pub agent_version: String,
    /// Seconds since the device booted.
    pub uptime_secs: u64,
    /// Processor load.
    pub cpu: CpuHealth,
    /// Memory use.
    pub memory: MemoryHealth,
    /// The data partition.
    pub disk: DiskHealth,
    /// The hottest thermal sensor, where the board has one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub temperature_celsius: Option<f32>,
    /// Each managed service.
    pub services: Vec<ServiceHealth>,
    /// The outcome of the most recent deployment.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_deployment: Option<DeploymentResult>,
}
message!(Health, Health, "health report", 64 * 1024);

/// Processor load.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub struct CpuHealth {
    /// Busy share of all cores since the last report, 0 to 100.
    pub usage_percent: f32,
    /// 1-minute load average.
    pub load1: f32,
    /// 5-minute load average.
    pub load5: f32,
    /// 15-minute load average.
    pub load15: f32,
}

/// Memory use.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub struct MemoryHealth {
    /// Total RAM in bytes.
    pub total_bytes: u64,
    /// RAM available to new work in bytes.
    pub available_bytes: u64,
}

/// Space on the data partition.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub struct DiskHealth {
    /// The data directory measured.
    pub path: String,
    /// Size of its file system in bytes.
    pub total_bytes: u64,
    /// Bytes free to the agent.
    pub free_bytes: u64,
}

/// One managed service's state.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub struct ServiceHealth {
    /// The service.
    pub service: ServiceName,
    /// The installed version, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub version: Option<String>,
    /// What the supervisor says.
    pub state: ServiceState,
    /// Main process id while running.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pid: Option<u32>,
    /// Restarts since the release was installed.
    pub restarts: u32,
    /// Resident memory of the main process in bytes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rss_bytes: Option<u64>,
    /// Processor use of the main process since the last report, percent of one core.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpu_percent: Option<f32>,
}

/// A service's state as its supervisor reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(rename_all = "snake_case")]
pub enum ServiceState {
    /// Running.
    Active,
    /// Starting.
    Activating,
    /// Stopping.
    Deactivating,
    /// Not running, not failed.
    Inactive,
    /// Stopped after a failure.
    Failed,
}

/// `status`: whether the device is connected. The agent publishes `online`
/// on connect and leaves `offline` as its last will.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub struct Status {
    /// Payload schema version: 1 for this format.
    pub schema: u32,
    /// Connected or not.
    pub state: Connectivity,
    /// The agent's version, when it says so itself (not in the last will).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub agent_version: Option<String>,
}
message!(Status, Status, "status", 4 * 1024);

/// Connected or not.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(rename_all = "snake_case")]
pub enum Connectivity {
    /// Connected to the broker.
    Online,
    /// Gone: a clean disconnect or the last will.
    Offline,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::keys::SecretKey;
    use crate::manifest::tests::sample;

    fn svc() -> ServiceName {
        ServiceName::new("api").unwrap()
    }

    #[test]
    fn every_message_round_trips() {
        let t = Timestamp::from_unix_secs(1_795_000_000);
        let release = ReleaseRef {
            service: svc(),
            version: "1.2.3".into(),
            sequence: 7,
        };
        let result = DeploymentResult {
            rollout: Some("r-1".into()),
            release: release.clone(),
            outcome: Outcome::RolledBack,
            reason: Some("health gate: restarted 3 times".into()),
            time: t,
        };
        let key = SecretKey::from_seed(&[1; 32]);
        let desired = Desired {
            schema: MESSAGE_SCHEMA,
            rollout: Some("r-1".into()),
            releases: vec![DesiredRelease {
                envelope: Envelope::sign(sample().to_json(), &[&key]).unwrap(),
                artifact_url: None,
            }],
            roots: Vec::new(),
        };
        assert_eq!(Desired::decode(&desired.encode()).unwrap(), desired);

        let reported = Reported {
            schema: MESSAGE_SCHEMA,
            time: t,
            agent_version: "0.1.0".into(),
            services: vec![InstalledService {
                release: release.clone(),
                artifact_sha256: Sha256Digest::of(b"x"),
                installed_at: t,
            }],
            last_result: Some(result.clone()),
            desired_confirmed_at: Some(t),
            root_version: Some(2),
        };
        assert_eq!(Reported::decode(&reported.encode()).unwrap(), reported);

        let event = Event {
            schema: MESSAGE_SCHEMA,
            time: t,
            rollout: None,
            release: Some(release),
            step: Step::Download,
            status: StepStatus::Progress,
            progress: Some(Progress {
                done: 10,
                total: Some(100),
            }),
            reason: None,
        };
        assert_eq!(Event::decode(&event.encode()).unwrap(), event);
        let text = String::from_utf8(event.encode()).unwrap();
        assert!(
            text.contains(r#""step":"download","status":"progress""#),
            "{text}"
        );

        let health = Health {
            schema: MESSAGE_SCHEMA,
            time: t,
            agent_version: "0.1.0".into(),
            uptime_secs: 10,
            cpu: CpuHealth {
                usage_percent: 5.0,
                load1: 0.5,
                load5: 0.25,
                load15: 0.125,
            },
            memory: MemoryHealth {
                total_bytes: 512 << 20,
                available_bytes: 300 << 20,
            },
            disk: DiskHealth {
                path: "/var/lib/ferry".into(),
                total_bytes: 1 << 30,
                free_bytes: 1 << 29,
            },
            temperature_celsius: Some(48.5),
            services: vec![ServiceHealth {
                service: svc(),
                version: Some("1.2.3".into()),
                state: ServiceState::Active,
                pid: Some(42),
                restarts: 0,
                rss_bytes: Some(4 << 20),
                cpu_percent: Some(1.5),
            }],
            last_deployment: Some(result),
        };
        assert_eq!(Health::decode(&health.encode()).unwrap(), health);

        let status = Status {
            schema: MESSAGE_SCHEMA,
            state: Connectivity::Offline,
            agent_version: None,
        };
        assert_eq!(status.encode(), br#"{"schema":1,"state":"offline"}"#);
        assert_eq!(Status::decode(&status.encode()).unwrap(), status);
    }

    #[test]
    fn readers_accept_new_fields_but_not_new_schemas() {
        let newer = br#"{"schema":1,"state":"online","battery":80}"#;
        assert!(Status::decode(newer).is_ok());
        let unknown = br#"{"schema":2,"state":"online"}"#;
        let err = Status::decode(unknown).unwrap_err();
        assert_eq!(
            err.to_string(),
            "status: schema version 2 is not supported (this build reads 1)"
        );
    }

    #[test]
    fn oversized_payloads_are_refused_before_parsing() {
        let big = vec![b' '; Status::MAX_BYTES + 1];
        assert!(matches!(
            Status::decode(&big).unwrap_err().kind,
            crate::decode::DecodeErrorKind::TooLarge { .. }
        ));
    }
}
