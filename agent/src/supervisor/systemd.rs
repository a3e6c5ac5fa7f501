//! The systemd supervisor: one unit per service, `ferry-<service>.service`,
//! written from the template in `systemd/ferry-service.service.in`.

use std::path::PathBuf;

use ferry_protocol::ServiceName;
use ferry_protocol::messages::ServiceState;
use nix::sys::signal::Signal;
use tokio::process::Command;

use super::{RunAs, ServiceSpec, ServiceStatus, SupervisorError};
use crate::durable;

const TEMPLATE: &str = include_str!("../../../systemd/ferry-service.service.in");

/// Drives systemd through `systemctl`.
pub struct Systemd {
    unit_dir: PathBuf,
}

/// The unit name of a service.
pub fn unit_name(service: &ServiceName) -> String {
    format!("ferry-{service}.service")
}

/// The unit file for `spec`. Every value from a manifest is quoted for
/// systemd, so an argument or a variable is exactly one word with exactly
/// its bytes: no `$VAR` expansion, no `%` specifier, no line of its own.
pub fn render_unit(spec: &ServiceSpec) -> String {
    let exec = std::iter::once(spec.exec.display().to_string())
        .chain(spec.args.iter().cloned())
        .map(|word| quote(&word, Dollar::Escape))
        .collect::<Vec<_>>()
        .join(" ");
    let environment: String = spec
        .env
        .iter()
        .map(|(name, value)| {
            let assignment = quote(&format!("{name}={value}"), Dollar::Literal);
            format!("Environment={assignment}\n")
        })
        .collect();
    let identity = match &spec.user {
        RunAs::Own => "DynamicUser=yes\n".to_owned(),
        RunAs::Agent => String::new(),
        RunAs::Named(name) => format!("User={name}\n"),
    };
    // `-`: a path missing on this device is no reason not to start. The
    // paths are plain (see `DevicePath`): no quoting needed, only `%`
    // would be special and cannot occur.
    let writable: String = spec
        .writable
        .iter()
        .map(|path| format!("ReadWritePaths=-{}\n", path.display()))
        .collect();
    TEMPLATE
        .replace("@SERVICE@", spec.service.as_str())
        .replace("@EXEC@", &exec)
        // A path, not words: only `%` is special there (and a release path
        // holds no control character).
        .replace(
            "@WORKDIR@",
            &spec.workdir.display().to_string().replace('%', "%%"),
        )
        .replace("@ENVIRONMENT@", &environment)
        .replace("@IDENTITY@", &identity)
        .replace("@WRITABLE@", &writable)
        .replace("@KILL_SIGNAL@", spec.stop_signal.as_str())
        .replace("@STOP_TIMEOUT@", &spec.stop_timeout.as_secs().to_string())
}

/// Whether `$` expands where a word goes: in `ExecStart=` it does (and is
/// written `$$`), in `Environment=` it does not.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Dollar {
    Escape,
    Literal,
}

/// One word for a unit file: in double quotes, with C escapes for `\`, `"`
/// and control characters, `%%` for `%` (no specifier), and `$$` for `$`
/// where `$` would expand a variable.
fn quote(word: &str, dollar: Dollar) -> String {
    let mut out = String::with_capacity(word.len() + 2);
    out.push('"');
    for c in word.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '"' => out.push_str("\\\""),
            '\n' => out.push_str("\\n"),
            '\t' => out.push_str("\\t"),
            '$' if dollar == Dollar::Escape => out.push_str("$$"),
            '%' => out.push_str("%%"),
            c if c.is_control() => out.push_str(&format!("\\x{:02x}", c as u32)),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

impl Systemd {
    /// Units are written to `unit_dir` (normally `/etc/systemd/system`).
    pub fn new(unit_dir: impl Into<PathBuf>) -> Self {
        Self {
            unit_dir: unit_dir.into(),
        }
    }

    pub(super) async fn apply(&self, spec: &ServiceSpec) -> Result<(), SupervisorError> {
        let unit = unit_name(&spec.service);
        let path = self.unit_dir.join(&unit);
        let text = render_unit(spec);
        let old = std::fs::read_to_string(&path).ok();
        if old.as_deref() == Some(text.as_str()) {
            return Ok(());
        }
        // The running release stops the way its own unit says (its stop
        // signal and timeout), before the new unit replaces it, as under
        // the direct supervisor.
        if old.is_some() {
            systemctl(&["stop", &unit]).await.ok();
        }
        durable::write_file(&path, text.as_bytes()).map_err(|error| SupervisorError::Io {
            what: format!("writing {}", path.display()),
            error,
        })?;
        systemctl(&["daemon-reload"]).await?;
        systemctl(&["enable", &unit]).await?;
        Ok(())
    }

    pub(super) async fn restart(&self, service: &ServiceName) -> Result<(), SupervisorError> {
        let unit = unit_name(service);
        // Clears NRestarts and a failed state left by an earlier release.
        systemctl(&["reset-failed", &unit]).await.ok();
        systemctl(&["restart", &unit]).await.map(drop)
    }

    pub(super) async fn stop(&self, service: &ServiceName) -> Result<(), SupervisorError> {
        systemctl(&["stop", &unit_name(service)]).await.map(drop)
    }

    pub(super) async fn remove(&self, service: &ServiceName) -> Result<(), SupervisorError> {
        let unit = unit_name(service);
        systemctl(&["disable", "--now", &unit]).await?;
        durable::remove_file(&self.unit_dir.join(&unit)).map_err(|error| SupervisorError::Io {
            what: format!("removing {unit}"),
            error,
        })?;
        systemctl(&["daemon-reload"]).await.map(drop)
    }

    pub(super) async fn status(
        &self,
        service: &ServiceName,
    ) -> Result<ServiceStatus, SupervisorError> {
        let out = systemctl(&[
            "show",
            &unit_name(service),
            "--property=ActiveState,SubState,MainPID,NRestarts,ExecMainCode,ExecMainStatus,\
             ExecMainStartTimestampMonotonic,ExecMainExitTimestampMonotonic",
        ])
        .await?;
        Ok(parse_show(&out))
    }

    pub(super) async fn signal(
        &self,
        service: &ServiceName,
        signal: Signal,
    ) -> Result<(), SupervisorError> {
        systemctl(&[
            "kill",
            "--kill-whom=main",
            &format!("--signal={}", signal.as_str()),
            &unit_name(service),
        ])
        .await
        .map(drop)
    }

    pub(super) async fn reload(&self, service: &ServiceName) -> Result<(), SupervisorError> {
        systemctl(&["reload", &unit_name(service)]).await.map(drop)
    }
}

/// Parses `systemctl show` output.
fn parse_show(out: &str) -> ServiceStatus {
    let mut status = ServiceStatus {
        state: ServiceState::Inactive,
        pid: None,
        restarts: 0,
        last_exit: None,
    };
    let mut sub = "";
    // ExecMainCode: 1 exited, 2 killed, 3 dumped core (CLD_* values).
    let (mut code, mut main_status, mut started, mut exited) = (0u8, None, 0u64, 0u64);
    for line in out.lines() {
        let Some((key, value)) = line.split_once('=') else {
            continue;
        };
        match key {
            "ActiveState" => {
                status.state = match value {
                    "active" | "reloading" => ServiceState::Active,
                    "activating" => ServiceState::Activating,
                    "deactivating" => ServiceState::Deactivating,
                    "failed" => ServiceState::Failed,
                    _ => ServiceState::Inactive,
                }
            }
            "SubState" => sub = value,
            "MainPID" => status.pid = value.parse().ok().filter(|&p| p != 0),
            "NRestarts" => status.restarts = value.parse().unwrap_or(0),
            "ExecMainCode" => code = value.parse().unwrap_or(0),
            "ExecMainStatus" => main_status = value.parse::<i32>().ok(),
            "ExecMainStartTimestampMonotonic" => started = value.parse().unwrap_or(0),
            "ExecMainExitTimestampMonotonic" => exited = value.parse().unwrap_or(0),
            _ => {}
        }
    }
    // Between crashes a Restart=always unit waits in activating/auto-restart:
    // not running, whatever ActiveState says.
    if sub == "auto-restart" {
        status.state = ServiceState::Activating;
        status.pid = None;
    }
    // The last run of the main process, once it has ended.
    if exited > 0 {
        let ran_for = (exited > started && started > 0)
            .then(|| std::time::Duration::from_micros(exited - started));
        status.last_exit = match (code, main_status) {
            (1, Some(value)) => Some(super::Exit {
                code: Some(value),
                signal: None,
                ran_for,
            }),
            (2 | 3, Some(value)) => Some(super::Exit {
                code: None,
                signal: Some(value),
                ran_for,
            }),
            _ => None,
        };
    }
    status
}

async fn systemctl(args: &[&str]) -> Result<String, SupervisorError> {
    let command = format!("systemctl {}", args.join(" "));
    let out = Command::new("systemctl")
        .args(args)
        .output()
        .await
        .map_err(|error| SupervisorError::Io {
            what: command.clone(),
            error,
        })?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(SupervisorError::Command {
            command,
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_owned(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_show_output() {
        let s = parse_show("ActiveState=active\nSubState=running\nMainPID=42\nNRestarts=3\n");
        assert_eq!(
            s,
            ServiceStatus {
                state: ServiceState::Active,
                pid: Some(42),
                restarts: 3,
                last_exit: None,
            }
        );
        let s = parse_show(
            "ActiveState=activating\nSubState=auto-restart\nMainPID=0\nNRestarts=1\n\
             ExecMainCode=1\nExecMainStatus=64\nExecMainStartTimestampMonotonic=1000000\n\
             ExecMainExitTimestampMonotonic=1250000\n",
        );
        assert_eq!(s.state, ServiceState::Activating);
        assert_eq!(s.pid, None);
        assert_eq!(
            s.last_exit.unwrap().to_string(),
            "exited with status 64 after 0.2s"
        );
        let s = parse_show(
            "ActiveState=failed\nExecMainCode=2\nExecMainStatus=11\n\
             ExecMainStartTimestampMonotonic=0\nExecMainExitTimestampMonotonic=5\n",
        );
        assert_eq!(s.last_exit.unwrap().to_string(), "killed by SIGSEGV");
    }

    #[test]
    fn unit_runs_through_the_current_link() {
        let spec = ServiceSpec::plain(
            ServiceName::new("api").unwrap(),
            "/var/lib/ferry/services/api/current/bin/api".into(),
            "/var/lib/ferry/services/api/current".into(),
        );
        let unit = render_unit(&spec);
        assert!(
            unit.contains("ExecStart=\"/var/lib/ferry/services/api/current/bin/api\"\n"),
            "{unit}"
        );
        assert!(
            unit.contains("WorkingDirectory=/var/lib/ferry/services/api/current\n"),
            "{unit}"
        );
        assert!(
            unit.contains("KillSignal=SIGTERM\nTimeoutStopSec=10\n"),
            "{unit}"
        );
        assert!(!unit.contains('@'), "{unit}");
    }

    #[test]
    fn a_service_gets_its_own_user_and_a_read_only_system_by_default() {
        let mut spec = ServiceSpec::plain(
            ServiceName::new("api").unwrap(),
            "/d/current/bin/api".into(),
            "/d/current".into(),
        );
        let unit = render_unit(&spec);
        for line in [
            "DynamicUser=yes",
            "StateDirectory=ferry-api",
            "NoNewPrivileges=yes",
            "ProtectSystem=strict",
            "PrivateTmp=yes",
        ] {
            assert!(unit.lines().any(|l| l == line), "{line} missing:\n{unit}");
        }
        assert!(!unit.contains("ReadWritePaths"), "{unit}");
        // Writable paths from the manifest; isolation turned off by the device.
        spec.writable = vec!["/var/spool/api".into(), "/run/api".into()];
        spec.user = RunAs::Agent;
        let unit = render_unit(&spec);
        assert!(
            unit.contains("ReadWritePaths=-/var/spool/api\nReadWritePaths=-/run/api\n"),
            "{unit}"
        );
        assert!(
            !unit.contains("DynamicUser") && !unit.contains("User="),
            "{unit}"
        );
        assert!(unit.contains("ProtectSystem=strict\n"), "{unit}");
    }

    #[test]
    fn every_argument_and_variable_is_one_quoted_word() {
        let mut spec = ServiceSpec::plain(
            ServiceName::new("api").unwrap(),
            "/d/current/bin/api".into(),
            "/d/current/var 100%".into(),
        );
        spec.args = vec![
            "-c".into(),
            "two words".into(),
            "$HOME".into(),
            "100%n".into(),
            "say \"hi\"\\".into(),
            "line\nExecStartPre=/bin/rm -rf /".into(),
        ];
        spec.env
            .push(("GREETING".into(), "a $b %i \"c\"\nUser=root".into()));
        spec.user = RunAs::Named("api".into());
        spec.stop_signal = Signal::SIGQUIT;
        let unit = render_unit(&spec);
        let exec = unit.lines().find(|l| l.starts_with("ExecStart=")).unwrap();
        assert_eq!(
            exec,
            r#"ExecStart="/d/current/bin/api" "-c" "two words" "$$HOME" "100%%n" "say \"hi\"\\" "line\nExecStartPre=/bin/rm -rf /""#
        );
        assert!(
            unit.contains("Environment=\"GREETING=a $b %%i \\\"c\\\"\\nUser=root\"\n"),
            "{unit}"
        );
        assert!(
            unit.contains("WorkingDirectory=/d/current/var 100%%\n"),
            "{unit}"
        );
        assert!(
            unit.contains("User=api\nStateDirectory=ferry-api\n"),
            "{unit}"
        );
        assert!(!unit.contains("DynamicUser"), "{unit}");
        assert!(unit.contains("KillSignal=SIGQUIT\n"), "{unit}");
        // Nothing a value held became a line of its own.
        assert_eq!(unit.lines().filter(|l| l.starts_with("User=")).count(), 1);
        assert!(!unit.lines().any(|l| l.starts_with("ExecStartPre")));
    }
}
