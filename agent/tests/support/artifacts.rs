//! A real HTTP artifact server (axum) that honours Range requests and can
//! cut a transfer halfway, the way a flaky link does.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use ferry_protocol::Sha256Digest;
use futures_util::StreamExt as _;

#[derive(Default)]
struct Files {
    by_sha: HashMap<String, Vec<u8>>,
    /// Artifacts whose next transfer is cut halfway.
    cut_next: Vec<String>,
    /// Artifacts sent slowly: (chunk size, pause between chunks).
    throttled: HashMap<String, (usize, std::time::Duration)>,
    /// Artifacts whose next transfers are cut after these many bytes, in turn.
    cut_after: HashMap<String, std::collections::VecDeque<usize>>,
    /// The Range header of every request, "" when none.
    ranges: Vec<String>,
    /// The Authorization header of every request, if any.
    authorizations: Vec<Option<String>>,
    /// Where `/moved/{sha}` redirects to: another server's base URL.
    redirect_to: Option<String>,
}

#[derive(Clone, Default)]
pub struct ArtifactServer {
    files: Arc<Mutex<Files>>,
    pub base: String,
}

impl ArtifactServer {
    pub async fn start() -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let server = Self {
            base: format!("http://{}", listener.local_addr().unwrap()),
            ..Self::default()
        };
        let app = axum::Router::new()
            .route("/artifacts/{sha}", axum::routing::get(serve))
            .route("/moved/{sha}", axum::routing::get(moved))
            .with_state(server.files.clone());
        tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
        server
    }

    /// Serves `bytes`; returns their URL.
    pub fn add(&self, bytes: Vec<u8>) -> String {
        let sha = Sha256Digest::of(&bytes).to_string();
        self.files.lock().unwrap().by_sha.insert(sha.clone(), bytes);
        format!("{}/artifacts/{sha}", self.base)
    }

    /// Cuts the next transfer of `url`'s artifact halfway.
    pub fn cut_next(&self, url: &str) {
        let sha = url.rsplit('/').next().unwrap().to_string();
        self.files.lock().unwrap().cut_next.push(sha);
    }

    /// Cuts the next transfers of `url`'s artifact, the first after
    /// `bytes[0]` bytes of its body, the next after `bytes[1]`...
    pub fn cut_after(&self, url: &str, bytes: &[usize]) {
        let sha = url.rsplit('/').next().unwrap().to_string();
        self.files
            .lock()
            .unwrap()
            .cut_after
            .entry(sha)
            .or_default()
            .extend(bytes);
    }

    /// Sends `url`'s artifact `chunk` bytes at a time with `pause` between,
    /// like a slow link.
    pub fn throttle(&self, url: &str, chunk: usize, pause: std::time::Duration) {
        let sha = url.rsplit('/').next().unwrap().to_string();
        self.files
            .lock()
            .unwrap()
            .throttled
            .insert(sha, (chunk, pause));
    }

    pub fn ranges(&self) -> Vec<String> {
        self.files.lock().unwrap().ranges.clone()
    }

    /// The Authorization header each request carried, in order.
    pub fn authorizations(&self) -> Vec<Option<String>> {
        self.files.lock().unwrap().authorizations.clone()
    }

    /// Makes `/moved/{sha}` here answer 302 to `base/artifacts/{sha}`.
    pub fn redirect_to(&self, base: &str) {
        self.files.lock().unwrap().redirect_to = Some(base.to_owned());
    }
}

async fn moved(
    State(files): State<Arc<Mutex<Files>>>,
    Path(sha): Path<String>,
    headers: HeaderMap,
) -> Response {
    let mut files = files.lock().unwrap();
    files.authorizations.push(authorization(&headers));
    match &files.redirect_to {
        Some(base) => (
            StatusCode::FOUND,
            [(header::LOCATION, format!("{base}/artifacts/{sha}"))],
        )
            .into_response(),
        None => StatusCode::NOT_FOUND.into_response(),
    }
}

fn authorization(headers: &HeaderMap) -> Option<String> {
    headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned)
}

async fn serve(
    State(files): State<Arc<Mutex<Files>>>,
    Path(sha): Path<String>,
    headers: HeaderMap,
) -> Response {
    let range = headers
        .get(header::RANGE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_string();
    let (bytes, cut, throttle) = {
        let mut files = files.lock().unwrap();
        files.ranges.push(range.clone());
        files.authorizations.push(authorization(&headers));
        let Some(bytes) = files.by_sha.get(&sha).cloned() else {
            return StatusCode::NOT_FOUND.into_response();
        };
        let cut = match files.cut_next.iter().position(|s| *s == sha) {
            Some(i) => {
                files.cut_next.remove(i);
                Some(None)
            }
            None => files
                .cut_after
                .get_mut(&sha)
                .and_then(|queue| queue.pop_front())
                .map(Some),
        };
        let throttle = files.throttled.get(&sha).copied();
        (bytes, cut, throttle)
    };
    let start: usize = range
        .strip_prefix("bytes=")
        .and_then(|r| r.strip_suffix('-'))
        .and_then(|n| n.parse().ok())
        .unwrap_or(0);
    if start > bytes.len() {
        return StatusCode::RANGE_NOT_SATISFIABLE.into_response();
    }
    let total = bytes.len();
    let body = bytes[start..].to_vec();
    let len = body.len();
    let stream_body = if let Some(after) = cut {
        // Some bytes (half by default), a pause so they reach the client,
        // then the link breaks.
        use futures_util::StreamExt;
        let half = body[..after.unwrap_or(len / 2).min(len)].to_vec();
        let first = futures_util::stream::once(async move { Ok::<_, std::io::Error>(half) });
        let cut = futures_util::stream::once(async {
            tokio::time::sleep(std::time::Duration::from_millis(300)).await;
            Err(std::io::Error::other("link cut"))
        });
        Body::from_stream(first.chain(cut))
    } else if let Some((chunk, pause)) = throttle {
        let chunks: Vec<Vec<u8>> = body.chunks(chunk.max(1)).map(<[u8]>::to_vec).collect();
        let slow = futures_util::stream::iter(chunks).then(move |piece| async move {
            tokio::time::sleep(pause).await;
            Ok::<_, std::io::Error>(piece)
        });
        Body::from_stream(slow)
    } else {
        Body::from(body)
    };
    let mut response = Response::new(stream_body);
    response
        .headers_mut()
        .insert(header::CONTENT_LENGTH, len.into());
    if start > 0 {
        *response.status_mut() = StatusCode::PARTIAL_CONTENT;
        response.headers_mut().insert(
            header::CONTENT_RANGE,
            format!("bytes {start}-{}/{total}", total - 1)
                .parse()
                .unwrap(),
        );
    }
    response
}
