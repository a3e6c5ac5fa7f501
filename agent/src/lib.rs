//! `ferry-agent`: installs signed releases on a device and keeps them running.
//!
//! The binary (`main.rs`) is thin; everything lives here so tests and a
//! fleet simulator can run agents in-process.
//!
//! - [`config`]: the TOML configuration.
//! - [`install`]: the install path, journal-backed, with rollback.
//! - [`supervisor`]: systemd or direct process supervision.
//! - [`unpack`], [`fetch`], [`health_gate`]: steps of the install path.
//! - [`state`], [`journal`], [`durable`], [`layout`]: what is kept on disk, and how.
//! - [`identity`], [`tls`]: the device's own key and client certificate,
//!   and the fleet CA it trusts.
//! - [`report`]: events and state changes for the MQTT session.
//! - [`daemon`]: the long-running agent: MQTT session, install worker,
//!   health reports ([`health`]), the inbox ([`inbox`]), hot reload
//!   ([`reload`]), the watchdog.
#![deny(missing_docs)]

pub mod config;
pub mod daemon;
pub mod device;
pub mod durable;
pub mod fetch;
pub mod health;
pub mod health_gate;
pub mod identity;
pub mod inbox;
pub mod install;
pub mod journal;
pub mod layout;
pub mod mqtt;
pub mod reload;
pub mod report;
pub mod state;
pub mod supervisor;
pub mod tls;
pub mod trust_root;
pub mod unpack;
pub mod watch;

/// The agent's version, as reported to the manager.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");

/// The target triple this agent was built for: a device's target unless its
/// configuration says otherwise.
pub const BUILD_TARGET: &str = env!("FERRY_AGENT_TARGET");

/// A message with the causes under it: "connect: connection refused", not
/// only the outermost "error sending request".
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(cause) = source {
        let cause_text = cause.to_string();
        // Some errors repeat their cause in their own message.
        if !text.contains(&cause_text) {
            text.push_str(": ");
            text.push_str(&cause_text);
        }
        source = cause.source();
    }
    text
}
