//! The release manifest: what a release is, in JSON.
//!
//! A manifest is signed as the exact bytes it was written with (see
//! [`crate::envelope`]); it is never re-serialised before it is checked.
//! Unknown fields are refused: a device must not silently ignore a setting a
//! newer packager thought mattered.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::decode::{DecodeError, check_schema, decode_json};
use crate::digest::Sha256Digest;
use crate::names::{DevicePath, EnvName, RelPath, ServiceName, Target, UserName};
use crate::text::string_type;
use crate::time::Timestamp;

/// The manifest schema version this build writes and reads.
pub const MANIFEST_SCHEMA: u32 = 1;

/// The largest manifest accepted, in bytes. Real ones are about 1 KiB.
pub const MAX_MANIFEST_BYTES: usize = 64 * 1024;

const WHAT: &str = "release manifest";

/// One release of one service.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    /// Manifest schema version: 1 for this format.
    pub schema: u32,
    /// The service this release belongs to.
    pub service: ServiceName,
    /// The release's version (semver).
    #[cfg_attr(feature = "schema", schemars(with = "String"))]
    pub version: semver::Version,
    /// Grows with every release of the service; what anti-rollback compares.
    pub sequence: u64,
    /// The target triple the release was built for.
    pub target: Target,
    /// How the entrypoint was built.
    pub kind: ArtifactKind,
    /// The executable to run, relative to the unpacked release.
    pub entrypoint: RelPath,
    /// The compressed artifact that holds the release's files.
    pub artifact: ArtifactInfo,
    /// Bounds on what unpacking the artifact may produce.
    pub limits: UnpackLimits,
    /// After this instant devices refuse the release.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires: Option<Timestamp>,
    /// How a device decides the new release is healthy.
    #[serde(default)]
    pub health: HealthSettings,
    /// Files to watch and what to do when they change.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub reload: Vec<ReloadRule>,
    /// How the service runs: arguments, environment, directory, user, stop.
    /// Absent when all are the defaults (so older manifests read the same).
    #[serde(default, skip_serializing_if = "RunSettings::is_default")]
    pub run: RunSettings,
    /// How the release was built.
    #[serde(default)]
    pub build: BuildInfo,
}

/// How the device's supervisor runs the service. Signed with the rest of
/// the manifest: nobody between the operator and the device can add an
/// argument or an environment variable.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(deny_unknown_fields)]
pub struct RunSettings {
    /// Arguments after the entrypoint, passed as they are (no shell).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub args: Vec<String>,
    /// Environment variables. The service gets these and a minimal
    /// environment (`PATH`, and `HOME`, `USER`, `LOGNAME` with `user`),
    /// never the agent's own.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub env: BTreeMap<EnvName, String>,
    /// The working directory, inside the release [default: its root].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub workdir: Option<RelPath>,
    /// The user to run as, by name on the device [default: a user of the
    /// service's own: systemd's `DynamicUser=`, or a dedicated uid under
    /// the agent's supervisor]. `root` runs it as root.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user: Option<UserName>,
    /// Paths on the device the service may write besides its state
    /// directory (`$STATE_DIRECTORY`); under systemd the rest of the file
    /// system is read-only to it (`ProtectSystem=strict`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub writable: Vec<DevicePath>,
    /// The signal that asks the service to stop [default: SIGTERM].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stop_signal: Option<ServiceSignal>,
    /// Seconds between that signal and SIGKILL [default: 10].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stop_timeout_secs: Option<u32>,
}

/// The most arguments, and environment variables, a manifest may give.
pub const MAX_RUN_ITEMS: usize = 256;

/// The longest argument or environment value, in bytes.
pub const MAX_RUN_VALUE: usize = 4096;

/// The stop timeout used when a manifest names none.
pub const DEFAULT_STOP_TIMEOUT_SECS: u32 = 10;

impl RunSettings {
    /// Whether every setting is its default.
    pub fn is_default(&self) -> bool {
        *self == Self::default()
    }

    /// The seconds between the stop signal and SIGKILL.
    pub fn stop_timeout_secs(&self) -> u32 {
        self.stop_timeout_secs.unwrap_or(DEFAULT_STOP_TIMEOUT_SECS)
    }

    /// The stop signal.
    pub fn stop_signal(&self) -> ServiceSignal {
        self.stop_signal.unwrap_or(ServiceSignal::Term)
    }

    /// The rules JSON alone cannot say: sizes, and no NUL byte anywhere (a
    /// C string would end there, and a systemd unit line would break).
    fn check(&self) -> Result<(), String> {
        if self.args.len() > MAX_RUN_ITEMS
            || self.env.len() > MAX_RUN_ITEMS
            || self.writable.len() > MAX_RUN_ITEMS
        {
            return Err(format!(
                "run: at most {MAX_RUN_ITEMS} arguments, environment variables and writable paths"
            ));
        }
        let values = self.args.iter().chain(self.env.values());
        for value in values {
            if value.len() > MAX_RUN_VALUE {
                return Err(format!(
                    "run: an argument or environment value is over {MAX_RUN_VALUE} bytes"
                ));
            }
            if value.contains('\0') {
                return Err("run: arguments and environment values must not contain NUL".into());
            }
        }
        if self.stop_timeout_secs == Some(0) {
            return Err("run.stop_timeout_secs must be at least 1".into());
        }
        Ok(())
    }
}

/// How a release's entrypoint was built.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(rename_all = "snake_case")]
pub enum ArtifactKind {
    /// A Go program.
    Go,
    /// A C program (or anything else built with a C toolchain).
    C,
}

/// The artifact a manifest describes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(deny_unknown_fields)]
pub struct ArtifactInfo {
    /// SHA-256 of the compressed artifact.
    pub sha256: Sha256Digest,
    /// Size of the compressed artifact in bytes.
    pub size: u64,
    /// Container format of the artifact.
    #[serde(default)]
    pub format: ArtifactFormat,
}

/// Container formats an artifact may have.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub enum ArtifactFormat {
    /// A gzip-compressed tar archive.
    #[default]
    #[serde(rename = "tar.gz")]
    TarGz,
}

/// Bounds on unpacking, set by the packager from what it packed. The agent
/// enforces these and its own ceiling, whichever is lower.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(deny_unknown_fields)]
pub struct UnpackLimits {
    /// Total bytes of all files once unpacked.
    pub unpacked_bytes: u64,
    /// Number of archive entries (files and directories).
    pub entries: u64,
}

/// The health gate a new release must pass before it is committed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(deny_unknown_fields)]
pub struct HealthSettings {
    /// Seconds the service must stay up without a restart.
    #[serde(default = "default_health_window")]
    pub window_secs: u32,
    /// An optional probe that must succeed within the window.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub probe: Option<Probe>,
}

fn default_health_window() -> u32 {
    10
}

impl Default for HealthSettings {
    fn default() -> Self {
        Self {
            window_secs: default_health_window(),
            probe: None,
        }
    }
}

/// A check that a running service answers.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
pub enum Probe {
    /// An HTTP GET that must answer 2xx.
    Http {
        /// The URL to get, usually on localhost.
        url: String,
    },
    /// A TCP connect that must succeed.
    Tcp {
        /// `host:port` to connect to.
        address: String,
    },
    /// A command that must exit 0.
    Command {
        /// Program and arguments; no shell is involved.
        argv: Vec<String>,
    },
}

/// Paths to watch for a service, and what to do when they change.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(deny_unknown_fields)]
pub struct ReloadRule {
    /// Files or directories to watch (absolute, or relative to the release).
    pub paths: Vec<String>,
    /// What to do on a change.
    pub action: ReloadAction,
    /// Changes closer together than this are handled once.
    #[serde(default = "default_debounce")]
    pub debounce_ms: u32,
}

fn default_debounce() -> u32 {
    500
}

/// What to do when a watched path changes. Written as `signal:SIGHUP`,
/// `reload` or `restart`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReloadAction {
    /// Send the named signal to the service's main process.
    Signal(ServiceSignal),
    /// Ask the supervisor to reload the service (systemd `reload`).
    Reload,
    /// Restart the service.
    Restart,
}

/// The signals Ferry may send a service: to reload it, or to stop it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[allow(missing_docs)]
pub enum ServiceSignal {
    Hup,
    Usr1,
    Usr2,
    Int,
    Term,
    Quit,
    Winch,
}

const SIGNALS: [(ServiceSignal, &str); 7] = [
    (ServiceSignal::Hup, "SIGHUP"),
    (ServiceSignal::Usr1, "SIGUSR1"),
    (ServiceSignal::Usr2, "SIGUSR2"),
    (ServiceSignal::Int, "SIGINT"),
    (ServiceSignal::Term, "SIGTERM"),
    (ServiceSignal::Quit, "SIGQUIT"),
    (ServiceSignal::Winch, "SIGWINCH"),
];

impl ServiceSignal {
    /// The signal's name, e.g. `SIGHUP`.
    pub fn name(self) -> &'static str {
        SIGNALS
            .iter()
            .find(|(s, _)| *s == self)
            .map_or("SIGHUP", |(_, n)| n)
    }
}

impl std::fmt::Display for ServiceSignal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

impl std::str::FromStr for ServiceSignal {
    type Err = String;
    fn from_str(name: &str) -> Result<Self, String> {
        SIGNALS
            .iter()
            .find(|(_, n)| *n == name)
            .map(|(sig, _)| *sig)
            .ok_or_else(|| {
                format!("signal {name:?} is not one Ferry sends (SIGHUP, SIGUSR1, SIGUSR2, SIGINT, SIGTERM, SIGQUIT, SIGWINCH)")
            })
    }
}

string_type!(ServiceSignal, {
    "type": "string",
    "pattern": "^SIG(HUP|USR1|USR2|INT|TERM|QUIT|WINCH)$"
});

impl std::fmt::Display for ReloadAction {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Signal(s) => write!(f, "signal:{}", s.name()),
            Self::Reload => f.write_str("reload"),
            Self::Restart => f.write_str("restart"),
        }
    }
}

impl std::str::FromStr for ReloadAction {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "reload" => Ok(Self::Reload),
            "restart" => Ok(Self::Restart),
            _ => {
                let name = s.strip_prefix("signal:").ok_or_else(|| {
                    format!(
                        "unknown reload action {s:?}: expected signal:SIGNAME, reload or restart"
                    )
                })?;
                name.parse()
                    .map(Self::Signal)
                    .map_err(|_| format!("signal {name:?} may not be used for reload"))
            }
        }
    }
}

string_type!(ReloadAction, {
    "type": "string",
    "pattern": "^(reload|restart|signal:SIG(HUP|USR1|USR2|INT|TERM|QUIT|WINCH))$"
});

/// How a release was built; shown to operators, never acted on.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(deny_unknown_fields)]
pub struct BuildInfo {
    /// The tool that packaged the release, e.g. `ferry 0.1.0`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub packager: Option<String>,
    /// The compiler and its version.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub compiler: Option<String>,
    /// The flags the entrypoint was built with.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub flags: Option<String>,
    /// The source's git commit.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub git_commit: Option<String>,
}

impl Manifest {
    /// Reads a manifest from its JSON bytes and checks the rules JSON alone
    /// cannot express.
    pub fn from_json(bytes: &[u8]) -> Result<Self, DecodeError> {
        let manifest: Self = decode_json(WHAT, bytes, MAX_MANIFEST_BYTES)?;
        check_schema(WHAT, manifest.schema, MANIFEST_SCHEMA)?;
        if manifest.limits.entries == 0 {
            return Err(DecodeError::invalid(
                WHAT,
                "limits.entries must be at least 1",
            ));
        }
        if manifest.artifact.size == 0 {
            return Err(DecodeError::invalid(
                WHAT,
                "artifact.size must be at least 1",
            ));
        }
        if manifest.health.window_secs == 0 {
            return Err(DecodeError::invalid(
                WHAT,
                "health.window_secs must be at least 1",
            ));
        }
        manifest
            .run
            .check()
            .map_err(|reason| DecodeError::invalid(WHAT, reason))?;
        Ok(manifest)
    }

    /// The manifest as pretty JSON with a final newline: the bytes that get signed.
    pub fn to_json(&self) -> Vec<u8> {
        // Serialising plain data to a Vec cannot fail.
        let mut out = serde_json::to_vec_pretty(self).unwrap_or_default();
        out.push(b'\n');
        out
    }

    /// The manifest's identity: the SHA-256 of its canonical JSON
    /// ([`Manifest::to_json`]). Two manifests with the same digest say the
    /// same thing, however their signed bytes were laid out.
    pub fn digest(&self) -> Sha256Digest {
        Sha256Digest::of(&self.to_json())
    }

    /// The directory a device unpacks this release into: `<version>-<sha8>`.
    pub fn release_dir_name(&self) -> String {
        format!("{}-{}", self.version, self.artifact.sha256.short())
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A valid manifest for tests across the crate.
    pub(crate) fn sample() -> Manifest {
        Manifest {
            schema: MANIFEST_SCHEMA,
            service: ServiceName::new("api").unwrap(),
            version: semver::Version::new(1, 2, 3),
            sequence: 7,
            target: Target::new(crate::names::ARMV7_TARGET).unwrap(),
            kind: ArtifactKind::Go,
            entrypoint: RelPath::new("bin/api").unwrap(),
            artifact: ArtifactInfo {
                sha256: Sha256Digest::of(b"artifact"),
                size: 8,
                format: ArtifactFormat::TarGz,
            },
            limits: UnpackLimits {
                unpacked_bytes: 4096,
                entries: 2,
            },
            expires: None,
            health: HealthSettings::default(),
            reload: vec![ReloadRule {
                paths: vec!["/etc/api/config.toml".into()],
                action: ReloadAction::Signal(ServiceSignal::Hup),
                debounce_ms: 500,
            }],
            run: RunSettings::default(),
            build: BuildInfo::default(),
        }
    }

    #[test]
    fn round_trips_through_json() {
        let m = sample();
        let bytes = m.to_json();
        assert_eq!(Manifest::from_json(&bytes).unwrap(), m);
        let text = String::from_utf8(bytes).unwrap();
        assert!(text.contains("\"action\": \"signal:SIGHUP\""), "{text}");
        assert!(text.contains("\"format\": \"tar.gz\""), "{text}");
    }

    #[test]
    fn refuses_unknown_fields_duplicates_and_bad_values() {
        let good = String::from_utf8(sample().to_json()).unwrap();
        let cases = [
            good.replacen("\"schema\": 1", "\"schema\": 1, \"surprise\": true", 1),
            good.replacen("\"schema\": 1", "\"schema\": 1, \"schema\": 1", 1),
            good.replacen("\"schema\": 1", "\"schema\": 2", 1),
            good.replacen("\"bin/api\"", "\"../bin/api\"", 1),
            good.replacen("\"1.2.3\"", "\"one\"", 1),
            good.replacen("signal:SIGHUP", "signal:SIGKILL", 1),
            good.replacen("\"entries\": 2", "\"entries\": 0", 1),
        ];
        for case in cases {
            assert_ne!(case, good);
            assert!(
                Manifest::from_json(case.as_bytes()).is_err(),
                "accepted:\n{case}"
            );
        }
    }

    #[test]
    fn run_settings_are_written_only_when_set_and_checked_when_read() {
        // Unset, they are not written: manifests made before them read and
        // hash the same.
        let plain = String::from_utf8(sample().to_json()).unwrap();
        assert!(!plain.contains("\"run\""), "{plain}");
        let mut m = sample();
        m.run = RunSettings {
            args: vec!["-c".into(), "/etc/app.conf".into(), "two words".into()],
            env: [(EnvName::new("LOG_LEVEL").unwrap(), "info".into())].into(),
            workdir: Some(RelPath::new("var").unwrap()),
            user: Some(UserName::new("api").unwrap()),
            writable: vec![DevicePath::new("/var/spool/api").unwrap()],
            stop_signal: Some(ServiceSignal::Quit),
            stop_timeout_secs: Some(30),
        };
        let text = String::from_utf8(m.to_json()).unwrap();
        assert_eq!(Manifest::from_json(text.as_bytes()).unwrap(), m);
        assert!(text.contains("\"stop_signal\": \"SIGQUIT\""), "{text}");
        assert_ne!(m.digest(), sample().digest());
        for (from, to) in [
            ("\"LOG_LEVEL\"", "\"LOG-LEVEL\""),
            ("\"LOG_LEVEL\"", "\"1LOG\""),
            ("\"user\": \"api\"", "\"user\": \"Root\""),
            ("\"/var/spool/api\"", "\"/var/../etc\""),
            ("\"/var/spool/api\"", "\"var/spool\""),
            (
                "\"/var/spool/api\"",
                "\"/var/spool\\nExecStartPre=/bin/sh\"",
            ),
            ("\"workdir\": \"var\"", "\"workdir\": \"../var\""),
            ("\"SIGQUIT\"", "\"SIGKILL\""),
            ("\"stop_timeout_secs\": 30", "\"stop_timeout_secs\": 0"),
            ("\"two words\"", "\"nul\\u0000byte\""),
            ("\"stop_signal\"", "\"surprise\": 1, \"stop_signal\""),
        ] {
            let bad = text.replacen(from, to, 1);
            assert_ne!(bad, text);
            assert!(
                Manifest::from_json(bad.as_bytes()).is_err(),
                "accepted {to}:\n{bad}"
            );
        }
        let mut long = m.clone();
        long.run.args = vec!["x".into(); MAX_RUN_ITEMS + 1];
        assert!(Manifest::from_json(&long.to_json()).is_err());
    }

    #[test]
    fn refuses_oversized_input_before_parsing() {
        let big = vec![b' '; MAX_MANIFEST_BYTES + 1];
        let err = Manifest::from_json(&big).unwrap_err();
        assert!(matches!(
            err.kind,
            crate::decode::DecodeErrorKind::TooLarge { .. }
        ));
    }

    #[test]
    fn release_dir_is_version_and_short_hash() {
        let m = sample();
        assert_eq!(
            m.release_dir_name(),
            format!("1.2.3-{}", &m.artifact.sha256.to_string()[..8])
        );
    }
}
