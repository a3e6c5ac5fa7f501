//! `ferry-agent`: the device side of Ferry.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, Result};
use ferry_agent::config::Config;
use ferry_agent::install::{ArtifactSource, InstallRequest};
use ferry_agent::report::Reporter;
use ferry_agent::{VERSION, daemon, device};
use ferry_protocol::Envelope;
use ferry_protocol::messages::Outcome;

const DEFAULT_CONFIG: &str = "/etc/ferry/agent.toml";

const HELP: &str = "\
Installs signed releases on this device and keeps them running.

Usage: ferry-agent [OPTIONS] [COMMAND]

Commands:
  install ENVELOPE ARTIFACT  Install a release from files (a USB stick, a copy
                             over ssh), then exit
  (none)                     Run the agent

Options:
  -c, --config FILE  The agent's configuration file [default: /etc/ferry/agent.toml]
  -h, --help         Print help
  -V, --version      Print version
";

/// What the command line asks for.
#[derive(Debug)]
struct Cli {
    config: PathBuf,
    command: Option<Command>,
}

#[derive(Debug)]
enum Command {
    /// Install a release from files, then exit.
    Install {
        envelope: PathBuf,
        artifact: PathBuf,
    },
}

/// What parsing the command line led to.
enum Parsed {
    Run(Cli),
    /// --help or --version: print this and exit 0.
    Print(String),
}

// lexopt rather than clap: the agent's command line is small and every
// hundred kilobytes counts on the device.
fn parse_args(args: impl IntoIterator<Item = std::ffi::OsString>) -> Result<Parsed, lexopt::Error> {
    use lexopt::prelude::*;
    let mut parser = lexopt::Parser::from_args(args);
    let mut config = PathBuf::from(DEFAULT_CONFIG);
    let mut words: Vec<PathBuf> = Vec::new();
    while let Some(arg) = parser.next()? {
        match arg {
            Short('c') | Long("config") => config = parser.value()?.into(),
            Short('h') | Long("help") => return Ok(Parsed::Print(HELP.into())),
            Short('V') | Long("version") => {
                return Ok(Parsed::Print(format!("ferry-agent {VERSION}\n")));
            }
            Value(word) => words.push(word.into()),
            _ => return Err(arg.unexpected()),
        }
    }
    let mut words = words.into_iter();
    let command = match words.next() {
        None => None,
        Some(word) if word.as_os_str() == "install" => {
            let (Some(envelope), Some(artifact), None) = (words.next(), words.next(), words.next())
            else {
                return Err("usage: ferry-agent install ENVELOPE ARTIFACT".into());
            };
            Some(Command::Install { envelope, artifact })
        }
        Some(word) => {
            return Err(format!(
                "unknown command {:?} (try --help)",
                word.display().to_string()
            )
            .into());
        }
    };
    Ok(Parsed::Run(Cli { config, command }))
}

fn main() -> ExitCode {
    let cli = match parse_args(std::env::args_os().skip(1)) {
        Ok(Parsed::Run(cli)) => cli,
        Ok(Parsed::Print(text)) => {
            print!("{text}");
            return ExitCode::SUCCESS;
        }
        Err(e) => {
            eprintln!("ferry-agent: {e}");
            return ExitCode::from(2);
        }
    };
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_target(false)
        .with_max_level(tracing::Level::INFO)
        .init();
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("ferry-agent: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(cli)) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("ferry-agent: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(cli: Cli) -> Result<ExitCode> {
    match cli.command {
        Some(Command::Install { envelope, artifact }) => {
            let config = Config::load(&cli.config)?;
            install(&config, envelope, artifact).await
        }
        None => {
            daemon::run(&cli.config, shutdown_signal()).await?;
            Ok(ExitCode::SUCCESS)
        }
    }
}

/// Resolves on SIGTERM (systemd stopping the agent) or SIGINT (Ctrl-C).
async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    match (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) {
        (Ok(mut term), Ok(mut int)) => {
            tokio::select! {
                _ = term.recv() => {}
                _ = int.recv() => {}
            }
        }
        _ => std::future::pending().await,
    }
    tracing::info!("stopping");
}

/// Installs one release and exits 0 only if it is installed.
async fn install(config: &Config, envelope: PathBuf, artifact: PathBuf) -> Result<ExitCode> {
    let _lock = device::lock_data_dir(config)?;
    let bytes =
        std::fs::read(&envelope).with_context(|| format!("cannot read {}", envelope.display()))?;
    let envelope =
        Envelope::from_json(&bytes).with_context(|| format!("{}", envelope.display()))?;
    let mut installer = device::installer(config, Reporter::log_only(), None)?;
    installer.recover().await;
    installer.start_installed().await;
    let result = installer
        .install(InstallRequest {
            envelope,
            source: ArtifactSource::File(artifact),
            rollout: None,
            retry_failed: true,
        })
        .await
        .map_err(|reason| anyhow::anyhow!("release refused: {reason}"))?;
    let reason = result
        .reason
        .as_deref()
        .map(|r| format!(": {r}"))
        .unwrap_or_default();
    let name = format!("{} {}", result.release.service, result.release.version);
    match result.outcome {
        Outcome::Installed => {
            println!("installed {name}{reason}");
            Ok(ExitCode::SUCCESS)
        }
        Outcome::Rejected => {
            eprintln!("ferry-agent: refused {name}{reason}");
            Ok(ExitCode::FAILURE)
        }
        Outcome::Failed => {
            eprintln!("ferry-agent: failed to install {name}{reason}");
            Ok(ExitCode::FAILURE)
        }
        Outcome::RolledBack => {
            eprintln!("ferry-agent: rolled back {name}{reason}");
            Ok(ExitCode::FAILURE)
        }
    }
}
