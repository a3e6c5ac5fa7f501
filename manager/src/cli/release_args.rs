//! The options every command that makes a release shares (`ferry package`,
//! `ferry build go|c`): what the manifest says about the release.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::{Duration, SystemTime};

use ferry_protocol::manifest::{
    BuildInfo, HealthSettings, Probe, ReloadRule, RunSettings, ServiceSignal,
};
use ferry_protocol::{DevicePath, EnvName, RelPath, ServiceName, Timestamp, UserName};

#[derive(Debug, clap::Args)]
pub(crate) struct ReleaseArgs {
    /// Service name (lowercase letters, digits, '-' and '_').
    #[arg(long)]
    pub service: ServiceName,
    /// Release version (semver, e.g. 1.4.2).
    #[arg(long)]
    pub version: semver::Version,
    /// Release sequence number; must grow with every release of the service.
    #[arg(long)]
    pub sequence: u64,
    /// When devices stop accepting the release: a time from now (90d, 12h),
    /// an instant (RFC 3339, e.g. 2027-01-31T00:00:00Z), or `never`. Devices
    /// keep running a release installed before it expired.
    #[arg(long, value_name = "DURATION|TIME|never", default_value = "30d", value_parser = parse_expiry)]
    pub expires: Expiry,
    /// Seconds a new release must run without restarting before devices commit it.
    #[arg(long, value_name = "SECS", default_value_t = 10)]
    pub health_window: u32,
    /// A check the new release must pass within the health window:
    /// http://HOST:PORT/PATH (2xx), tcp:HOST:PORT (connects), or cmd:PROGRAM ARGS (exits 0, run in the release).
    #[arg(long, value_name = "PROBE", value_parser = parse_probe)]
    pub probe: Option<Probe>,
    /// Watch PATH on the device and act on a change: PATH=signal:SIGHUP, PATH=reload or
    /// PATH=restart. PATH is absolute or relative to the release. Repeatable.
    #[arg(long, value_name = "PATH=ACTION", value_parser = parse_reload)]
    pub reload: Vec<ReloadRule>,
    /// An argument devices pass to the program, in order; repeatable
    /// (`--arg=-c --arg=/etc/app.conf`, or `--arg -c`).
    #[arg(long = "arg", value_name = "ARG", allow_hyphen_values = true)]
    pub args: Vec<String>,
    /// An environment variable the program gets, NAME=VALUE; repeatable. The
    /// device's own environment is not passed on.
    #[arg(long = "env", value_name = "NAME=VALUE", value_parser = parse_env)]
    pub env: Vec<(EnvName, String)>,
    /// The program's working directory, inside the release [default: the release's root].
    #[arg(long, value_name = "PATH")]
    pub workdir: Option<RelPath>,
    /// The user the program runs as on the device [default: a user of the
    /// service's own, which can write only its state directory]; `root` for
    /// root.
    #[arg(long, value_name = "NAME")]
    pub user: Option<UserName>,
    /// An absolute path on the device the program may write besides its
    /// state directory ($STATE_DIRECTORY); the rest of the system is
    /// read-only to it under systemd. Repeatable.
    #[arg(long, value_name = "PATH")]
    pub writable: Vec<DevicePath>,
    /// The signal that asks the program to stop [default: SIGTERM].
    #[arg(long, value_name = "SIGNAL")]
    pub stop_signal: Option<ServiceSignal>,
    /// Seconds between the stop signal and SIGKILL [default: 10].
    #[arg(long, value_name = "SECS")]
    pub stop_timeout: Option<u32>,
    /// Output directory for SERVICE-VERSION.tar.gz and SERVICE-VERSION.manifest.json.
    #[arg(short = 'o', long = "out", value_name = "OUTDIR")]
    pub out: PathBuf,
}

/// What `--expires` says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Expiry {
    /// This long after the release is made.
    After(Duration),
    /// At this instant.
    At(Timestamp),
    /// The release never expires (it can be replayed to a device forever).
    Never,
}

impl Expiry {
    /// The instant the manifest carries, for a release made at `now`.
    pub fn at(self, now: SystemTime) -> Option<Timestamp> {
        match self {
            Expiry::After(after) => Some(Timestamp::from(now + after)),
            Expiry::At(at) => Some(at),
            Expiry::Never => None,
        }
    }
}

fn parse_expiry(text: &str) -> Result<Expiry, String> {
    if text == "never" {
        return Ok(Expiry::Never);
    }
    if let Ok(at) = text.parse::<Timestamp>() {
        return Ok(Expiry::At(at));
    }
    match humantime::parse_duration(text) {
        Ok(after) if after.is_zero() => {
            Err("a release that expires at once cannot be installed".into())
        }
        Ok(after) => Ok(Expiry::After(after)),
        Err(_) => Err(
            "expected a duration (30d, 12h), an RFC 3339 time (2027-01-31T00:00:00Z) or `never`"
                .into(),
        ),
    }
}

impl ReleaseArgs {
    /// When the release made now expires; an instant already past is an
    /// error (devices would refuse the release).
    pub fn expires_at(&self) -> anyhow::Result<Option<Timestamp>> {
        let now = SystemTime::now();
        let at = self.expires.at(now);
        if let Some(at) = at {
            if at.system_time() <= now {
                anyhow::bail!("--expires {at} is in the past: devices would refuse the release");
            }
        }
        Ok(at)
    }

    pub fn health(&self) -> HealthSettings {
        HealthSettings {
            window_secs: self.health_window.max(1),
            probe: self.probe.clone(),
        }
    }

    /// How devices run the program; a variable given twice is an error.
    pub fn run(&self) -> anyhow::Result<RunSettings> {
        let mut env = BTreeMap::new();
        for (name, value) in &self.env {
            if env.insert(name.clone(), value.clone()).is_some() {
                anyhow::bail!("--env {name} is given twice");
            }
        }
        if self.stop_timeout == Some(0) {
            anyhow::bail!("--stop-timeout must be at least 1 second");
        }
        Ok(RunSettings {
            args: self.args.clone(),
            env,
            workdir: self.workdir.clone(),
            user: self.user.clone(),
            writable: self.writable.clone(),
            stop_signal: self.stop_signal,
            stop_timeout_secs: self.stop_timeout,
        })
    }
}

fn parse_env(text: &str) -> Result<(EnvName, String), String> {
    let (name, value) = text
        .split_once('=')
        .ok_or("expected NAME=VALUE, e.g. LOG_LEVEL=info")?;
    Ok((
        EnvName::new(name).map_err(|e| e.to_string())?,
        value.to_owned(),
    ))
}

/// Names this tool in a manifest's build info.
pub(crate) fn packager() -> String {
    concat!("ferry ", env!("CARGO_PKG_VERSION")).into()
}

pub(crate) fn build_info() -> BuildInfo {
    BuildInfo {
        packager: Some(packager()),
        ..BuildInfo::default()
    }
}

fn parse_probe(text: &str) -> Result<Probe, String> {
    if text.starts_with("http://") || text.starts_with("https://") {
        Ok(Probe::Http { url: text.into() })
    } else if let Some(address) = text.strip_prefix("tcp:") {
        Ok(Probe::Tcp {
            address: address.into(),
        })
    } else if let Some(command) = text.strip_prefix("cmd:") {
        let argv: Vec<String> = command.split_whitespace().map(str::to_owned).collect();
        if argv.is_empty() {
            return Err("cmd: needs a program".into());
        }
        Ok(Probe::Command { argv })
    } else {
        Err("expected http://..., tcp:HOST:PORT or cmd:PROGRAM ARGS".into())
    }
}

fn parse_reload(text: &str) -> Result<ReloadRule, String> {
    let (path, action) = text
        .rsplit_once('=')
        .ok_or("expected PATH=ACTION, e.g. /etc/api/app.conf=signal:SIGHUP")?;
    if path.is_empty() {
        return Err("the path is empty".into());
    }
    Ok(ReloadRule {
        paths: vec![path.into()],
        action: action.parse()?,
        debounce_ms: 500,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn expiry_reads_a_duration_an_instant_or_never() {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000);
        let in_90_days = parse_expiry("90d").unwrap().at(now).unwrap();
        assert_eq!(in_90_days.unix_secs(), 1_800_000_000 + 90 * 86_400);
        let at = parse_expiry("2027-01-31T00:00:00Z").unwrap();
        assert_eq!(at.at(now).unwrap().to_string(), "2027-01-31T00:00:00Z");
        assert_eq!(parse_expiry("never").unwrap().at(now), None);
        assert!(parse_expiry("0s").is_err());
        assert!(parse_expiry("soon").unwrap_err().contains("`never`"));
    }
}
