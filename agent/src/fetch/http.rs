//! Downloads over HTTP(S), resuming with Range requests.

use std::path::PathBuf;

use ferry_protocol::manifest::ArtifactInfo;
use reqwest::StatusCode;
use reqwest::header::RANGE;

use super::{FetchError, Resumed, Staging};
use crate::layout::Layout;

/// Credentials for the artifact store, and the one origin they go to.
#[derive(Debug, Clone)]
pub struct Credentials {
    /// User name (the device id).
    pub username: String,
    /// Password.
    pub password: String,
    /// The manager's origin (scheme, host, port): only URLs there get them.
    pub origin: reqwest::Url,
}

impl Credentials {
    /// Whether `url` is on the manager's origin. The URL comes from a
    /// desired state, which anyone who can publish one chooses: elsewhere,
    /// the device's password would be handed to whoever runs that server.
    pub fn belong_to(&self, url: &str) -> bool {
        reqwest::Url::parse(url).is_ok_and(|u| u.origin() == self.origin.origin())
    }
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
    // (reqwest drops them again on a redirect to another origin.)
    if let Some(c) = credentials.filter(|c| c.belong_to(url)) {
        request = request.basic_auth(&c.username, Some(&c.password));
    }
    if staging.held() > 0 {
        request = request.header(RANGE, format!("bytes={}-", staging.held()));
    }
    let mut response = request.send().await.map_err(|e| {
        if e.is_connect() {
            FetchError::Unreachable {
                url: url.to_owned(),
                reason: crate::error_chain(&e),
            }
        } else {
            transfer(staging.held(), crate::error_chain(&e))
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn credentials_belong_to_one_origin_only() {
        let c = Credentials {
            username: "gw".into(),
            password: "pw".into(),
            origin: reqwest::Url::parse("http://manager.local:8080").unwrap(),
        };
        assert!(c.belong_to("http://manager.local:8080/v1/artifacts/ab"));
        assert!(c.belong_to("http://MANAGER.local:8080/x"));
        for elsewhere in [
            "https://manager.local:8080/v1/artifacts/ab",
            "http://manager.local:8081/v1/artifacts/ab",
            "http://manager.local/v1/artifacts/ab",
            "http://evil.example:8080/v1/artifacts/ab",
            "http://manager.local.evil.example:8080/x",
            "http://manager.local:8080@evil.example/x",
            "not a url",
        ] {
            assert!(!c.belong_to(elsewhere), "{elsewhere}");
        }
        let default_port = Credentials {
            origin: reqwest::Url::parse("https://manager.local").unwrap(),
            ..c
        };
        assert!(default_port.belong_to("https://manager.local:443/x"));
    }
}
