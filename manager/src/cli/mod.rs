//! The `ferry` command line: one module per subcommand.
//!
//! Every command returns an [`Outcome`] holding both a line of text for
//! people and a JSON value for scripts (`--json`); this module prints the
//! one asked for and turns failure into exit code 1.

mod build;
mod deployments;
mod fleet;
mod keygen;
mod keys;
mod login;
mod nats_config;
mod package;
mod publish;
mod release_args;
mod releases;
mod rollout;
mod root;
mod serve;
mod sign;
mod tokens;
mod verify;

use std::io::{self, Write};
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

use crate::client::Manager;

/// Ferry: signed releases for fleets of ARMv7 Linux devices.
#[derive(Debug, Parser)]
#[command(name = "ferry", version)]
struct Cli {
    /// Print machine-readable JSON on standard output instead of text.
    #[arg(long, global = true)]
    json: bool,

    /// The manager's URL [default: the manager last started on this machine].
    #[arg(long, global = true, env = "FERRY_URL", value_name = "URL")]
    url: Option<String>,

    /// The operator token [default: read from that manager's data directory].
    #[arg(
        long,
        global = true,
        env = "FERRY_TOKEN",
        value_name = "TOKEN",
        hide_env_values = true
    )]
    token: Option<String>,

    /// The manager's CA certificate (its data directory's ca.pem): the only
    /// CA trusted for it [default: the one recorded with the URL's manager].
    #[arg(long, global = true, env = "FERRY_CA", value_name = "FILE")]
    ca: Option<PathBuf>,

    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Create a release signing key pair (NAME.key and NAME.pub).
    Keygen(keygen::Args),
    /// Remember a manager (URL, its CA, and --token if given) for this
    /// user's commands.
    Login(login::Args),
    /// Pack a directory into a reproducible release artifact and its unsigned manifest.
    Package(package::Args),
    /// Cross-compile a Go or C service for the ARMv7 devices and package it.
    #[command(subcommand)]
    Build(build::Args),
    /// Sign a manifest (or add signatures to an envelope).
    Sign(sign::Args),
    /// Check a signed envelope, and optionally its artifact, offline.
    Verify(verify::Args),
    /// Run the manager: MQTT broker, HTTP API, artifact store.
    Serve(serve::Args),
    /// Print the accounts and auth callout block a NATS cluster's servers
    /// need for Ferry's replicas (see "Running a cluster").
    NatsConfig(nats_config::Args),
    /// See it all work: a manager, two agents and a sample service, until Ctrl-C.
    Demo(DemoArgs),
    /// Register a device (`ferry device add ID`) or show one (`ferry device ID`).
    Device(fleet::DeviceArgs),
    /// List the devices with their status and services.
    Devices,
    /// Upload a signed release and its artifact to the manager.
    Publish(publish::Args),
    /// List the published releases (of one service).
    Releases(releases::ListArgs),
    /// Show one published release: what its manifest says, who signed it.
    Release(releases::ShowArgs),
    /// Deploy a published release to devices (`--wait` for the outcome).
    Deploy(deployments::DeployArgs),
    /// One deployment: how it went on each device.
    Deployment(deployments::ShowArgs),
    /// Every deployment, newest first.
    Deployments,
    /// Staged rollouts: canary, waves, failure threshold (start, status, list, pause, resume, abort).
    #[command(subcommand)]
    Rollout(rollout::Args),
    /// Named operator tokens with a scope (create, list, revoke).
    #[command(subcommand)]
    Token(tokens::Args),
    /// The trust root: which release keys devices believe (new, sign,
    /// publish, list).
    #[command(subcommand)]
    Root(root::Args),
    /// Recent health reports (`--follow` for new ones).
    Health(fleet::HistoryArgs),
    /// Recent deployment events (`--follow` for new ones).
    Events(fleet::HistoryArgs),
}

#[derive(Debug, clap::Args)]
struct DemoArgs {
    /// Scratch directory for the demo's manager, devices and builds.
    #[arg(long, default_value = "ferry-demo")]
    dir: std::path::PathBuf,
    /// The manager's HTTP address.
    #[arg(long, default_value = "127.0.0.1:8080")]
    http_listen: std::net::SocketAddr,
    /// The embedded broker's address.
    #[arg(long, default_value = "127.0.0.1:1883")]
    mqtt_listen: std::net::SocketAddr,
}

/// What a command has to say: text for people, JSON for scripts.
pub(crate) struct Outcome {
    /// False when the command ran but its answer is "no" (a failed verification).
    ok: bool,
    text: String,
    json: serde_json::Value,
}

impl Outcome {
    pub(crate) fn ok(text: String, json: serde_json::Value) -> Self {
        Self {
            ok: true,
            text,
            json,
        }
    }

    /// A listing: a line per item for people, or `empty` when there is
    /// none; `json` for scripts.
    pub(crate) fn lines(lines: Vec<String>, empty: &str, json: serde_json::Value) -> Self {
        let text = if lines.is_empty() {
            empty.to_owned()
        } else {
            lines.join("\n")
        };
        Self::ok(text, json)
    }

    /// Puts `line` before the text for people.
    pub(crate) fn prepend_text(&mut self, line: &str) {
        self.text = format!("{line}\n{}", self.text);
    }

    pub(crate) fn refused(text: String, json: serde_json::Value) -> Self {
        Self {
            ok: false,
            text,
            json,
        }
    }
}

/// Runs the command line and returns the process exit code.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    let json = cli.json;
    let result = match cli.command {
        Command::Keygen(args) => keygen::run(args),
        Command::Package(args) => package::run(args),
        Command::Build(args) => build::run(args),
        Command::Sign(args) => sign::run(args),
        Command::Verify(args) => verify::run(args),
        Command::NatsConfig(args) => nats_config::run(args),
        Command::Root(args) if args.offline() => root::run_offline(args),
        Command::Login(args) => runtime().and_then(|rt| rt.block_on(login::run(args, cli.token))),
        Command::Serve(args) => {
            init_logging();
            runtime().and_then(|rt| rt.block_on(serve::run(args)))
        }
        Command::Demo(args) => runtime().and_then(|rt| {
            rt.block_on(async {
                crate::demo::run(crate::demo::DemoConfig {
                    dir: args.dir,
                    http_listen: args.http_listen,
                    mqtt_listen: args.mqtt_listen,
                })
                .await?;
                Ok(Outcome::ok(
                    "demo stopped".into(),
                    serde_json::json!({ "ok": true }),
                ))
            })
        }),
        remote => runtime().and_then(|rt| {
            rt.block_on(async {
                let manager = Manager::resolve(cli.url, cli.token, cli.ca)?;
                match remote {
                    Command::Device(args) => fleet::device(&manager, args).await,
                    Command::Devices => fleet::devices(&manager).await,
                    Command::Publish(args) => publish::run(&manager, args, json).await,
                    Command::Releases(args) => releases::list(&manager, args).await,
                    Command::Release(args) => releases::show(&manager, args).await,
                    Command::Deploy(args) => deployments::deploy(&manager, args).await,
                    Command::Deployment(args) => deployments::show(&manager, args).await,
                    Command::Deployments => deployments::list(&manager).await,
                    Command::Rollout(args) => rollout::run(&manager, args, json).await,
                    Command::Token(args) => tokens::run(&manager, args).await,
                    Command::Root(args) => root::run(&manager, args).await,
                    Command::Health(args) => fleet::history(&manager, "health", args, json).await,
                    Command::Events(args) => fleet::history(&manager, "events", args, json).await,
                    _ => unreachable!("local commands are handled above"),
                }
            })
        }),
    };
    match result {
        Ok(outcome) => {
            if cli.json {
                print_stdout(&outcome.json.to_string());
            } else if outcome.ok {
                print_stdout(&outcome.text);
            }
            if outcome.ok {
                ExitCode::SUCCESS
            } else {
                eprintln!("ferry: {}", outcome.text);
                ExitCode::FAILURE
            }
        }
        Err(error) => {
            if cli.json {
                print_stdout(
                    &serde_json::json!({ "ok": false, "error": format!("{error:#}") }).to_string(),
                );
            }
            // `{:#}` puts the whole context chain on one line.
            eprintln!("ferry: error: {error:#}");
            ExitCode::FAILURE
        }
    }
}

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(|e| anyhow::anyhow!("cannot start the runtime: {e}"))
}

fn init_logging() {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_target(false)
        .with_max_level(tracing::Level::INFO)
        .init();
}

/// Prints a line; a closed pipe (`ferry ... | head`) is not an error.
pub(crate) fn print_stdout(text: &str) {
    let mut out = io::stdout().lock();
    if let Err(e) = writeln!(out, "{text}") {
        if e.kind() != io::ErrorKind::BrokenPipe {
            eprintln!("ferry: cannot write output: {e}");
        }
    }
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory;

    #[test]
    fn command_line_definition_is_consistent() {
        super::Cli::command().debug_assert();
    }
}
