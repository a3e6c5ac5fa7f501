//! `ferry token create|list|revoke`: named operator tokens with a scope,
//! for people and programs that should not hold the manager's own token
//! (Prometheus reads with a `read` token; CI deploys with `operate`).

use anyhow::Result;
use serde_json::{Value, json};

use super::Outcome;
use crate::client::Manager;

#[derive(Debug, clap::Subcommand)]
pub(crate) enum Args {
    /// Make a token; it is shown once.
    Create {
        /// A name for it (who or what holds it).
        name: String,
        /// What it may do: read (views, /metrics), operate (publish, deploy,
        /// rollouts, tags) or admin (devices and tokens too).
        #[arg(long, value_parser = ["read", "operate", "admin"])]
        scope: String,
    },
    /// The named tokens and their scopes (never the tokens).
    List,
    /// Revoke a token: it stops working at once.
    Revoke {
        /// Its name.
        name: String,
    },
}

pub(crate) async fn run(manager: &Manager, args: Args) -> Result<Outcome> {
    match args {
        Args::Create { name, scope } => {
            let made = manager
                .post("/v1/tokens", &json!({ "name": name, "scope": scope }))
                .await?;
            Ok(Outcome::ok(
                format!(
                    "token {name} ({scope}): {}\n(it is not shown again; the manager keeps only its hash)",
                    made["token"].as_str().unwrap_or_default()
                ),
                made,
            ))
        }
        Args::List => {
            let all = manager.get("/v1/tokens").await?;
            let lines: Vec<String> = all
                .as_array()
                .into_iter()
                .flatten()
                .map(|t: &Value| {
                    format!(
                        "{:<24} {:<8} {}",
                        t["name"].as_str().unwrap_or("?"),
                        t["scope"].as_str().unwrap_or("?"),
                        t["created"].as_str().unwrap_or("?")
                    )
                })
                .collect();
            Ok(Outcome::lines(
                lines,
                "no named tokens; make one with `ferry token create NAME --scope read`",
                all,
            ))
        }
        Args::Revoke { name } => {
            let revoked = manager.delete(&format!("/v1/tokens/{name}")).await?;
            Ok(Outcome::ok(format!("token {name} revoked"), revoked))
        }
    }
}
