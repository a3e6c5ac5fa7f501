//! The options every command that makes a release shares (`ferry package`,
//! `ferry build go|c`): what the manifest says about the release.

use std::path::PathBuf;

use ferry_protocol::manifest::{BuildInfo, HealthSettings, Probe, ReloadRule};
use ferry_protocol::{ServiceName, Timestamp};

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
    /// After this time devices refuse the release (RFC 3339, e.g. 2027-01-31T00:00:00Z).
    #[arg(long)]
    pub expires: Option<Timestamp>,
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
    /// Output directory for SERVICE-VERSION.tar.gz and SERVICE-VERSION.manifest.json.
    #[arg(short = 'o', long = "out", value_name = "OUTDIR")]
    pub out: PathBuf,
}

impl ReleaseArgs {
    pub fn health(&self) -> HealthSettings {
        HealthSettings {
            window_secs: self.health_window.max(1),
            probe: self.probe.clone(),
        }
    }
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
