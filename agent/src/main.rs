//! `ferry-agent`: the device side of Ferry.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use ferry_agent::config::Config;
use ferry_agent::install::{ArtifactSource, InstallRequest};
use ferry_agent::report::Reporter;
use ferry_agent::{VERSION, daemon, device};
use ferry_protocol::Envelope;
use ferry_protocol::messages::Outcome;

/// Installs signed releases on this device and keeps them running.
#[derive(Debug, Parser)]
#[command(name = "ferry-agent", version = VERSION)]
struct Cli {
    /// The agent's configuration file.
    #[arg(
        long,
        short = 'c',
        value_name = "FILE",
        default_value = "/etc/ferry/agent.toml"
    )]
    config: PathBuf,

    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Install a release from files (a USB stick, a copy over ssh), then exit.
    Install {
        /// The signed envelope.
        envelope: PathBuf,
        /// The artifact (.tar.gz) it names.
        artifact: PathBuf,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
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
    let mut installer = device::installer(config, Reporter::log_only())?;
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
