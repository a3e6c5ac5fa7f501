//! Downloads over HTTP(S), resuming with Range requests.

use std::path::PathBuf;

use ferry_protocol::manifest::ArtifactInfo;
use reqwest::StatusCode;
use reqwest::header::RANGE;

use super::{FetchError, Resumed, Staging};
use crate::layout::Layout;

/// Credentials for the artifact store.
#[derive(Debug, Clone)]
pub struct Credentials {
    /// User name (the device id).
    pub username: String,
    /// Password.
    pub password: String,
}

/// Downloads an artifact over HTTP(S), resuming a `.part` left by an earlier
/// attempt. `progress` is called with (bytes held, total) as data arrives.
pub async fn download(
    http: &reqwest::Client,
    url: &str,
    credentials: Option<&Credentials>,
    artifact: &ArtifactInfo,
    layout: &Layout,
    mut progress: impl FnMut(u64, u64),
) -> Result<PathBuf, FetchError> {
    let mut staging = match Staging::resume(layout, artifact)? {
        Resumed::Done(path) => return Ok(path),
        Resumed::Partial(staging) => staging,
    };
    let transfer = |have: u64, reason: String| FetchError::Transfer {
        from: url.to_owned(),
        have,
        reason,
    };

    let mut request = http.get(url);
    if let Some(c) = credentials {
        request = request.basic_auth(&c.username, Some(&c.password));
    }
    if staging.held() > 0 {
        request = request.header(RANGE, format!("bytes={}-", staging.held()));
    }
    let mut response = request.send().await.map_err(|e| {
        if e.is_connect() {
            FetchError::Unreachable {
                url: url.to_owned(),
                reason: error_chain(&e),
            }
        } else {
            transfer(staging.held(), error_chain(&e))
        }
    })?;
    match response.status() {
        StatusCode::PARTIAL_CONTENT => {}
        // The server ignored the range: start over.
        StatusCode::OK => staging.restart(artifact)?,
        status => {
            return Err(FetchError::Status {
                url: url.to_owned(),
                status,
            });
        }
    }
    loop {
        match response.chunk().await {
            Ok(Some(chunk)) => {
                staging.write(&chunk)?;
                progress(staging.held(), artifact.size);
            }
            Ok(None) => break,
            Err(e) => {
                staging.keep();
                return Err(transfer(staging.held(), e.to_string()));
            }
        }
    }
    if staging.held() < artifact.size {
        staging.keep();
        return Err(transfer(staging.held(), "connection closed early".into()));
    }
    staging.finish()
}

/// An error with its causes: reqwest's own message rarely says why.
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}
