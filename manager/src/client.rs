//! The CLI's connection to a manager: where it is and the operator token.
//!
//! Found in this order: `--url` / `--token` / `--ca`; `FERRY_URL` /
//! `FERRY_TOKEN` / `FERRY_CA`; the config file (`FERRY_CONFIG`, else
//! `~/.config/ferry/cli.json`, with `url`, `token` or `token_file`, and
//! `ca_file`); and last the manager `ferry serve` last started on this
//! machine, which records itself in `~/.config/ferry/local-manager.json`.
//!
//! A file's token and CA go only with that file's URL: a URL from the
//! command line never gets the local manager's token sent to it. With a CA,
//! it is the only one trusted for the manager (pinned).

use std::path::PathBuf;

use anyhow::{Context, Result, bail};
use serde::Deserialize;
use serde_json::Value;

/// How to reach a manager.
pub struct Manager {
    url: String,
    token: String,
    http: reqwest::Client,
}

#[derive(Deserialize, Default)]
struct ClientFile {
    url: Option<String>,
    token: Option<String>,
    token_file: Option<PathBuf>,
    ca_file: Option<PathBuf>,
}

impl ClientFile {
    fn token(&self) -> Option<String> {
        self.token.clone().or_else(|| {
            self.token_file
                .as_ref()
                .and_then(|p| std::fs::read_to_string(p).ok())
                .map(|t| t.trim().to_owned())
        })
    }

    /// Whether this file speaks of the manager at `url`.
    fn is_for(&self, url: &str) -> bool {
        self.url
            .as_deref()
            .is_some_and(|u| u.trim_end_matches('/') == url.trim_end_matches('/'))
    }
}

fn read_file(path: Option<PathBuf>) -> ClientFile {
    path.and_then(|p| std::fs::read(p).ok())
        .and_then(|b| serde_json::from_slice(&b).ok())
        .unwrap_or_default()
}

/// `~/.config/ferry` (or under `XDG_CONFIG_HOME`).
pub fn config_dir() -> Option<PathBuf> {
    let base = std::env::var_os("XDG_CONFIG_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".config")))?;
    Some(base.join("ferry"))
}

fn config_dir_file(name: &str) -> Option<PathBuf> {
    config_dir().map(|dir| dir.join(name))
}

impl Manager {
    /// Resolves the manager from flags (which clap already filled from the
    /// environment) and files.
    pub fn resolve(
        url: Option<String>,
        token: Option<String>,
        ca: Option<PathBuf>,
    ) -> Result<Self> {
        let configured = read_file(
            std::env::var_os("FERRY_CONFIG")
                .map(PathBuf::from)
                .or_else(|| config_dir_file("cli.json")),
        );
        let local = read_file(crate::serve::local_manager_file());
        let url = url
            .or(configured.url.clone())
            .or(local.url.clone())
            .context(
                "no manager URL: pass --url, set FERRY_URL, or start `ferry serve` on this machine",
            )?;
        // The file that names this URL, if one does: its token and CA (a
        // config file that names no URL is the operator's for any).
        let source = [&configured, &local]
            .into_iter()
            .find(|f| f.is_for(&url))
            .or((configured.url.is_none()).then_some(&configured));
        let token = token
            .or_else(|| source.and_then(ClientFile::token))
            .context("no operator token: pass --token or set FERRY_TOKEN (the manager writes it to operator.token in its data directory)")?;
        let ca = ca.or_else(|| source.and_then(|f| f.ca_file.clone()));
        let _ = rustls::crypto::ring::default_provider().install_default();
        let mut http = reqwest::Client::builder();
        if let Some(path) = &ca {
            let pem = std::fs::read(path)
                .with_context(|| format!("cannot read the manager's CA {}", path.display()))?;
            let certs = reqwest::Certificate::from_pem_bundle(&pem)
                .with_context(|| format!("{} holds no CA certificate", path.display()))?;
            http = http.tls_certs_only(certs);
        }
        let http = http.build().context("cannot build the HTTP client")?;
        Ok(Self {
            url: url.trim_end_matches('/').to_owned(),
            token,
            http,
        })
    }

    fn request(&self, method: reqwest::Method, path: &str) -> reqwest::RequestBuilder {
        self.http
            .request(method, format!("{}{path}", self.url))
            .bearer_auth(&self.token)
    }

    /// Sends a request and reads a JSON answer, turning API errors into a sentence.
    pub async fn send(&self, request: reqwest::RequestBuilder) -> Result<Value> {
        let response = request
            .send()
            .await
            .map_err(|e| reach_error(&self.url, e))?;
        let status = response.status();
        let body: Value = response.json().await.unwrap_or(Value::Null);
        if status.is_success() {
            Ok(body)
        } else {
            let message = body["error"]
                .as_str()
                .map(str::to_owned)
                .unwrap_or_else(|| status.to_string());
            bail!("{message}")
        }
    }

    /// GET `path`.
    pub async fn get(&self, path: &str) -> Result<Value> {
        self.send(self.request(reqwest::Method::GET, path)).await
    }

    /// POST `body` as JSON to `path`.
    pub async fn post(&self, path: &str, body: &Value) -> Result<Value> {
        self.send(self.request(reqwest::Method::POST, path).json(body))
            .await
    }

    /// DELETE `path`.
    pub async fn delete(&self, path: &str) -> Result<Value> {
        self.send(self.request(reqwest::Method::DELETE, path)).await
    }

    /// PUT `body` as JSON to `path`.
    pub async fn put_json(&self, path: &str, body: &Value) -> Result<Value> {
        self.send(self.request(reqwest::Method::PUT, path).json(body))
            .await
    }

    /// POST raw bytes to `path`.
    pub async fn post_bytes(&self, path: &str, body: Vec<u8>) -> Result<Value> {
        self.send(
            self.request(reqwest::Method::POST, path)
                .header(reqwest::header::CONTENT_TYPE, "application/json")
                .body(body),
        )
        .await
    }

    /// Whether `path` exists (HEAD answers 2xx); errors only when the
    /// manager cannot be reached.
    pub async fn exists(&self, path: &str) -> Result<bool> {
        let response = self
            .request(reqwest::Method::HEAD, path)
            .send()
            .await
            .map_err(|e| reach_error(&self.url, e))?;
        Ok(response.status().is_success())
    }

    /// PUT a streamed body of `len` bytes to `path`.
    pub async fn put_stream(&self, path: &str, body: reqwest::Body, len: u64) -> Result<Value> {
        self.send(
            self.request(reqwest::Method::PUT, path)
                .header(reqwest::header::CONTENT_LENGTH, len)
                .body(body),
        )
        .await
    }
}

/// Why the manager could not be reached, with the TLS cause spelled out:
/// a certificate the pinned CA did not sign is an impostor or another
/// manager, not a network problem.
fn reach_error(url: &str, error: reqwest::Error) -> anyhow::Error {
    let mut causes = Vec::new();
    let mut cause: Option<&dyn std::error::Error> = Some(&error);
    while let Some(c) = cause {
        causes.push(c.to_string());
        cause = c.source();
    }
    let text = causes.join(": ");
    if text.to_lowercase().contains("certificate") {
        anyhow::anyhow!(
            "cannot reach the manager at {url}: its TLS certificate is not signed by the CA trusted for it ({text}); pass that manager's ca.pem with --ca"
        )
    } else {
        anyhow::anyhow!("cannot reach the manager at {url}: {text}")
    }
}
