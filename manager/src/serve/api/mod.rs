//! The HTTP API (JSON over HTTP, operator tokens) and the artifact store.
//!
//! | route | who | what |
//! |---|---|---|
//! | `GET /healthz` | anyone | liveness |
//! | `GET /openapi.json` | anyone | this table, as OpenAPI 3 |
//! | `POST /v1/devices` | operator | register a device (again: new credentials, the old session ended); returns its enrolment token (TLS) or password |
//! | `POST /v1/enrol` | a device (token or key on record) | a short-lived client certificate for the device's own key |
//! | `POST /v1/devices/{id}/revoke` | operator (admin) | every credential of the device refused at once; record and history kept |
//! | `GET /v1/devices`, `GET /v1/devices/{id}` | operator | fleet view |
//! | `DELETE /v1/devices/{id}` | operator | forget a device; its session ends at once |
//! | `PUT /v1/devices/{id}/tags` | operator | replace a device's tags |
//! | `PUT /v1/artifacts/{sha256}` | operator | upload an artifact; refused unless the bytes hash to `sha256` |
//! | `GET /v1/artifacts/{sha256}` | device (only an artifact in its desired state) or operator | download, with Range |
//! | `POST /v1/releases`, `GET /v1/releases` | operator | publish an envelope (its artifact uploaded first), list |
//! | `GET /v1/releases/{service}/{version}` | operator | one release with its signed envelope |
//! | `POST /v1/deployments`, `GET /v1/deployments[/{id}]` | operator | deploy a release to devices, progress |
//! | `POST /v1/rollouts`, `GET /v1/rollouts[/{id}]` | operator | staged rollouts: start, progress by stage |
//! | `POST /v1/rollouts/{id}/{pause,resume,abort}` | operator | steer a rollout |
//! | `GET /v1/health`, `GET /v1/events` | operator | recent history (`?device=`, `?after=`) |
//! | `GET /v1/stream` | operator | server-sent events: `change` whenever the fleet's picture changes |
//! | `GET /`, `/dashboard.js`, `/dashboard.css` | anyone | the dashboard (it asks for the token) |
//! | `GET /metrics` | operator | Prometheus text format: fleet aggregates, per-device health, the manager's own figures |
//! | `GET/POST /v1/tokens`, `DELETE /v1/tokens/{name}` | operator (admin) | named tokens with a scope |
//! | `GET /v1/roots` (read), `POST /v1/roots` (admin) | operator | the trust root chain; a new version goes to every device |
//!
//! "operator" means a bearer token whose scope the route allows: the table
//! is [`auth::access`], applied by the [`auth::authorize`] middleware before
//! any handler runs.

use std::path::PathBuf;
use std::sync::Arc;

use auth::Caller;
use axum::body::Body;
use axum::extract::{Path, Query, Request, State};
use axum::http::HeaderValue;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, put};
use axum::{Extension, Json};
use ferry_protocol::{DeviceId, Envelope, Sha256Digest};
use serde::Deserialize;
use serde_json::json;
use sha2::{Digest, Sha256};
use tokio::io::AsyncWriteExt;
use tokio::sync::mpsc;
use tower_http::services::ServeFile;
use tower_http::set_header::SetResponseHeaderLayer;

pub mod auth;
mod dashboard;
mod identity;
mod rollouts;
mod roots;
mod tokens;

use super::ingest::Outgoing;
use super::rollout::Selector;
use super::store::{Published, Store, StoreError};

/// What every handler can reach.
#[derive(Clone)]
pub struct AppState {
    /// The database.
    pub store: Arc<Store>,
    /// Where artifacts are kept, named by sha256.
    pub artifacts: PathBuf,
    /// The operator token.
    pub token: Arc<String>,
    /// Desired-state messages for the MQTT client.
    pub outgoing: mpsc::UnboundedSender<Outgoing>,
    /// How devices reach this manager over HTTP.
    pub public_url: Arc<String>,
    /// How devices reach the broker (`mqtt://HOST:PORT`, no credentials).
    pub broker_url: Arc<String>,
    /// The fleet CA devices trust (PEM); none with `--insecure-plaintext`.
    pub ca_pem: Option<Arc<String>>,
    /// The fleet CA as the issuer of device certificates; none with
    /// `--insecure-plaintext`.
    pub device_ca: Option<Arc<super::tls::DeviceCa>>,
    /// How long a device certificate is valid.
    pub device_cert_lifetime: std::time::Duration,
    /// Whether devices must enrol for a certificate: the embedded broker
    /// over TLS takes nothing else.
    pub certificates_only: bool,
    /// Whether the broker is a NATS cluster, whose MQTT gateway refuses a
    /// `.` in a client id (a device's client id is its id).
    pub nats_broker: bool,
    /// The rollout engine (woken when a rollout changes).
    pub rollouts: super::rollout::Engine,
    /// The manager's own counters, and the `/metrics` renderer.
    pub metrics: super::metrics::Metrics,
    /// Where device sessions are ended (none with a plain external broker).
    pub sessions: Option<super::Sessions>,
    /// Failed sign-ins by client address.
    pub failures: Arc<auth::Failures>,
}

/// An error as the API answers it: a status and a sentence.
pub struct ApiError(StatusCode, String);

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.0, Json(json!({ "error": self.1 }))).into_response()
    }
}

impl From<StoreError> for ApiError {
    fn from(e: StoreError) -> Self {
        ApiError(StatusCode::INTERNAL_SERVER_ERROR, e.to_string())
    }
}

fn bad(status: StatusCode, message: impl Into<String>) -> ApiError {
    ApiError(status, message.into())
}

type ApiResult<T> = Result<T, ApiError>;

/// Devices refuse a release past its expiry: publishing or sending one would
/// only fail them, so the manager says so first (a convenience, not a
/// protection; the device checks the signed expiry itself).
fn refuse_expired(manifest: &ferry_protocol::Manifest) -> ApiResult<()> {
    match manifest.expires {
        Some(expires) if expires.system_time() <= std::time::SystemTime::now() => Err(bad(
            StatusCode::UNPROCESSABLE_ENTITY,
            format!(
                "{} {} expired at {expires}: devices refuse it; package it again with a later --expires and a new sequence",
                manifest.service, manifest.version
            ),
        )),
        _ => Ok(()),
    }
}

/// [`refuse_expired`] for a stored release.
fn refuse_expired_row(release: &super::store::ReleaseRow) -> ApiResult<()> {
    let manifest = Envelope::from_json(release.envelope.as_bytes())
        .and_then(|e| e.unverified_manifest())
        .map_err(|e| bad(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?;
    refuse_expired(&manifest)
}

/// The routes.
pub fn router(state: AppState) -> axum::Router {
    axum::Router::new()
        .route("/healthz", get(|| async { "ok" }))
        .route("/openapi.json", get(openapi))
        .route("/v1/devices", get(list_devices).post(add_device))
        .route("/v1/devices/{id}", get(show_device).delete(remove_device))
        .route("/v1/devices/{id}/tags", put(set_tags))
        .route(
            "/v1/devices/{id}/revoke",
            axum::routing::post(identity::revoke),
        )
        .route("/v1/enrol", axum::routing::post(identity::enrol))
        .route(
            "/v1/artifacts/{sha}",
            put(upload_artifact).get(download_artifact),
        )
        .route("/v1/releases", get(list_releases).post(publish_release))
        .route("/v1/releases/{service}/{version}", get(show_release))
        .route("/v1/deployments", get(list_deployments).post(deploy))
        .route("/v1/deployments/{id}", get(show_deployment))
        .route("/v1/rollouts", get(rollouts::list).post(rollouts::start))
        .route("/v1/rollouts/{id}", get(rollouts::show))
        .route(
            "/v1/rollouts/{id}/{action}",
            axum::routing::post(rollouts::act),
        )
        .route("/v1/health", get(health_history))
        .route("/v1/events", get(event_history))
        .route("/metrics", get(metrics))
        .route("/v1/stream", get(dashboard::stream))
        .route("/", get(dashboard::index))
        .route("/dashboard.js", get(dashboard::script))
        .route("/dashboard.css", get(dashboard::style))
        .route("/v1/tokens", get(tokens::list).post(tokens::create))
        .route("/v1/roots", get(roots::list).post(roots::publish))
        .route("/v1/tokens/{name}", axum::routing::delete(tokens::revoke))
        // Outermost first: time every matched request, refusals included.
        .route_layer(axum::middleware::from_fn_with_state(
            state.clone(),
            auth::authorize,
        ))
        .route_layer(axum::middleware::from_fn_with_state(
            state.clone(),
            time_request,
        ))
        .fallback(|| async {
            bad(
                StatusCode::NOT_FOUND,
                "no such API route; see /openapi.json",
            )
        })
        .layer(axum::extract::DefaultBodyLimit::max(1024 * 1024))
        // The dashboard runs only its own script, in no one's frame.
        .layer(SetResponseHeaderLayer::overriding(
            header::CONTENT_SECURITY_POLICY,
            HeaderValue::from_static("default-src 'self'; frame-ancestors 'none'; base-uri 'none'"),
        ))
        .layer(SetResponseHeaderLayer::overriding(
            header::X_FRAME_OPTIONS,
            HeaderValue::from_static("DENY"),
        ))
        .layer(SetResponseHeaderLayer::overriding(
            header::X_CONTENT_TYPE_OPTIONS,
            HeaderValue::from_static("nosniff"),
        ))
        .layer(SetResponseHeaderLayer::overriding(
            header::REFERRER_POLICY,
            HeaderValue::from_static("no-referrer"),
        ))
        .with_state(state)
}

/// The API's description, kept beside the code in `manager/api/openapi.json`.
pub const OPENAPI: &str = include_str!("../../../api/openapi.json");

async fn openapi() -> impl IntoResponse {
    ([(header::CONTENT_TYPE, "application/json")], OPENAPI)
}

/// `GET /metrics`: Prometheus text format, for the operator token (point
/// Prometheus at `DATA_DIR/operator.token` with `credentials_file`).
async fn metrics(State(state): State<AppState>) -> ApiResult<impl IntoResponse> {
    let text = state
        .metrics
        .render(&state.store)
        .await
        .map_err(|e| bad(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?;
    Ok((
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        text,
    ))
}

/// Records each matched request's duration under its route template.
async fn time_request(
    State(state): State<AppState>,
    route: axum::extract::MatchedPath,
    request: Request,
    next: axum::middleware::Next,
) -> Response {
    let method = request.method().as_str().to_owned();
    let started = std::time::Instant::now();
    let response = next.run(request).await;
    let status = format!("{}xx", response.status().as_u16() / 100);
    state
        .metrics
        .http_duration
        .with_label_values(&[method.as_str(), route.as_str(), status.as_str()])
        .observe(started.elapsed().as_secs_f64());
    response
}

#[derive(Deserialize)]
struct NewDevice {
    device_id: String,
    #[serde(default)]
    tags: Vec<String>,
    /// `certificate` or `password`; the manager's default when absent.
    #[serde(default)]
    credential: Option<String>,
}

async fn add_device(
    State(state): State<AppState>,
    body: axum::body::Bytes,
) -> ApiResult<impl IntoResponse> {
    let new: NewDevice = serde_json::from_slice(&body)
        .map_err(|e| bad(StatusCode::BAD_REQUEST, format!("bad JSON: {e}")))?;
    let id =
        DeviceId::new(new.device_id).map_err(|e| bad(StatusCode::BAD_REQUEST, e.to_string()))?;
    if state.nats_broker && id.as_str().contains('.') {
        return Err(bad(
            StatusCode::BAD_REQUEST,
            format!(
                "{id}: the NATS cluster's MQTT gateway takes no '.' in a client id, and a \
                 device connects with its id as client id; choose an id without dots"
            ),
        ));
    }
    // Certificates wherever the broker checks them (the embedded one or a
    // NATS cluster over TLS); passwords over plain MQTT or for mosquitto,
    // which checks no fleet CA.
    let certificate = match new.credential.as_deref() {
        None => state.certificates_only,
        Some("certificate") => true,
        Some("password") if state.certificates_only => {
            return Err(bad(
                StatusCode::BAD_REQUEST,
                "the broker over TLS takes device certificates only; passwords are for \
                 --insecure-plaintext or an mqtt:// broker",
            ));
        }
        Some("password") => false,
        Some(other) => {
            return Err(bad(
                StatusCode::BAD_REQUEST,
                format!("credential {other:?}: expected certificate or password"),
            ));
        }
    };
    if certificate {
        let created = identity::add_enrolling(&state, &id, &new.tags).await?;
        return Ok((StatusCode::CREATED, Json(created)));
    }
    let password = crate::serve::random_hex::<24>()
        .map_err(|e| bad(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?;
    let known = state.store.add_device(&id, &password, &new.tags).await?;
    // Adding a device again gives it a new password: whoever holds the old
    // one is cut off now, not at their next reconnect. (A new device has
    // no session, and asking a cluster costs a round of all its servers.)
    if known {
        end_session(&state, id.as_str()).await;
    }
    Ok((
        StatusCode::CREATED,
        Json(json!({
            "device_id": id, "credential": "password", "username": id, "password": password, "tags": new.tags,
            "broker_url": state.broker_url.as_str(), "manager_url": state.public_url.as_str(),
            "ca_pem": state.ca_pem.as_deref(),
        })),
    ))
}

/// `DELETE /v1/devices/{id}`: forgets the device and ends its session; its
/// retained desired state is cleared from the broker.
async fn remove_device(
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> ApiResult<impl IntoResponse> {
    if !state.store.remove_device(&id).await? {
        return Err(bad(StatusCode::NOT_FOUND, format!("no device {id}")));
    }
    end_session(&state, &id).await;
    // An empty retained message clears the broker's copy.
    let _ = state.outgoing.send(Outgoing {
        device: id.clone(),
        payload: Vec::new(),
    });
    state.rollouts.changed();
    Ok(Json(json!({ "device_id": id, "removed": true })))
}

/// Ends a device's broker session (the embedded broker's; an external
/// broker's own credentials must be changed there).
pub(super) async fn end_session(state: &AppState, device: &str) {
    if let Some(sessions) = &state.sessions {
        sessions.end(device).await;
    }
}

async fn list_devices(State(state): State<AppState>) -> ApiResult<impl IntoResponse> {
    Ok(Json(state.store.devices().await?))
}

async fn show_device(
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> ApiResult<impl IntoResponse> {
    let device = state
        .store
        .device(&id)
        .await?
        .ok_or_else(|| bad(StatusCode::NOT_FOUND, format!("no device {id}")))?;
    let mut shown = serde_json::to_value(device)
        .map_err(|e| bad(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?;
    shown["credential"] = state.store.credential_of(&id).await?.unwrap_or_default();
    Ok(Json(shown))
}

async fn set_tags(
    State(state): State<AppState>,
    Path(id): Path<String>,
    body: axum::body::Bytes,
) -> ApiResult<impl IntoResponse> {
    let tags: Vec<String> = serde_json::from_slice(&body)
        .map_err(|e| bad(StatusCode::BAD_REQUEST, format!("bad JSON: {e}")))?;
    if state.store.set_tags(&id, &tags).await? {
        Ok(Json(json!({ "device_id": id, "tags": tags })))
    } else {
        Err(bad(StatusCode::NOT_FOUND, format!("no device {id}")))
    }
}

fn parse_sha(sha: &str) -> ApiResult<Sha256Digest> {
    sha.parse()
        .map_err(|_| bad(StatusCode::BAD_REQUEST, format!("{sha:?} is not a sha256")))
}

async fn upload_artifact(
    State(state): State<AppState>,
    Path(sha): Path<String>,
    body: Body,
) -> ApiResult<impl IntoResponse> {
    let expected = parse_sha(&sha)?;
    let path = state.artifacts.join(expected.to_string());
    if path.exists() {
        // The body is read anyway: a client still sending it would see the
        // connection closed under it (and report a broken pipe, not this).
        let mut stream = body.into_data_stream();
        use futures_util::StreamExt;
        while let Some(Ok(_)) = stream.next().await {}
        return Ok((
            StatusCode::OK,
            Json(json!({ "sha256": expected, "stored": "already" })),
        ));
    }
    let temp = state
        .artifacts
        .join(format!(".upload-{expected}-{}", std::process::id()));
    let io = |e: std::io::Error| {
        bad(
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("storing the artifact: {e}"),
        )
    };
    let mut file = tokio::fs::File::create(&temp).await.map_err(io)?;
    let mut hasher = Sha256::new();
    let mut size = 0u64;
    let mut stream = body.into_data_stream();
    use futures_util::StreamExt;
    while let Some(chunk) = stream.next().await {
        let chunk = match chunk {
            Ok(c) => c,
            Err(e) => {
                let _ = tokio::fs::remove_file(&temp).await;
                return Err(bad(
                    StatusCode::BAD_REQUEST,
                    format!("upload interrupted: {e}"),
                ));
            }
        };
        hasher.update(&chunk);
        size += chunk.len() as u64;
        file.write_all(&chunk).await.map_err(io)?;
    }
    file.sync_all().await.map_err(io)?;
    let actual = Sha256Digest::from_bytes(hasher.finalize().into());
    if actual != expected {
        let _ = tokio::fs::remove_file(&temp).await;
        return Err(bad(
            StatusCode::UNPROCESSABLE_ENTITY,
            format!("the uploaded bytes hash to {actual}, not {expected}; nothing was stored"),
        ));
    }
    tokio::fs::rename(&temp, &path).await.map_err(io)?;
    Ok((
        StatusCode::CREATED,
        Json(json!({ "sha256": actual, "size": size })),
    ))
}

async fn download_artifact(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
    Path(sha): Path<String>,
    request: Request,
) -> ApiResult<Response> {
    let sha = parse_sha(&sha)?;
    // A device gets only what it was told to install, as over MQTT.
    if let Caller::Device(device) = caller {
        if !state.store.desires_artifact(&device, &sha).await? {
            return Err(bad(
                StatusCode::FORBIDDEN,
                format!("artifact {sha} is not in {device}'s desired state"),
            ));
        }
    }
    let path = state.artifacts.join(sha.to_string());
    if !path.exists() {
        return Err(bad(StatusCode::NOT_FOUND, format!("no artifact {sha}")));
    }
    // ServeFile answers Range requests and sets Content-Length.
    let response = tower::ServiceExt::oneshot(ServeFile::new(path), request)
        .await
        .map_err(|e| bad(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?;
    Ok(response.into_response())
}

async fn show_release(
    State(state): State<AppState>,
    Path((service, version)): Path<(String, String)>,
) -> ApiResult<impl IntoResponse> {
    let release = state
        .store
        .release(&service, &version)
        .await?
        .ok_or_else(|| {
            bad(
                StatusCode::NOT_FOUND,
                format!("no release {service} {version}"),
            )
        })?;
    let envelope: serde_json::Value = serde_json::from_str(&release.envelope)
        .map_err(|e| bad(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?;
    let mut body = serde_json::to_value(&release)
        .map_err(|e| bad(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?;
    body["envelope"] = envelope;
    Ok(Json(body))
}

async fn publish_release(
    State(state): State<AppState>,
    body: axum::body::Bytes,
) -> ApiResult<impl IntoResponse> {
    let envelope =
        Envelope::from_json(&body).map_err(|e| bad(StatusCode::BAD_REQUEST, e.to_string()))?;
    let manifest = envelope
        .unverified_manifest()
        .map_err(|e| bad(StatusCode::BAD_REQUEST, e.to_string()))?;
    refuse_expired(&manifest)?;
    let artifact = state.artifacts.join(manifest.artifact.sha256.to_string());
    let stored = tokio::fs::metadata(&artifact).await.ok().map(|m| m.len());
    match stored {
        None => {
            return Err(bad(
                StatusCode::CONFLICT,
                format!(
                    "upload the artifact {} first (PUT /v1/artifacts/{{sha256}})",
                    manifest.artifact.sha256
                ),
            ));
        }
        Some(size) if size != manifest.artifact.size => {
            return Err(bad(
                StatusCode::UNPROCESSABLE_ENTITY,
                format!(
                    "the stored artifact is {size} bytes, the manifest says {}",
                    manifest.artifact.size
                ),
            ));
        }
        Some(_) => {}
    }
    let status = match state
        .store
        .add_release(
            manifest.service.as_str(),
            &manifest.version.to_string(),
            manifest.sequence,
            &manifest.artifact.sha256,
            manifest.artifact.size,
            &String::from_utf8_lossy(&envelope.to_json()),
        )
        .await?
    {
        Published::Added => StatusCode::CREATED,
        Published::AlreadyThere => StatusCode::OK,
        Published::Conflict(reason) => return Err(bad(StatusCode::CONFLICT, reason)),
    };
    Ok((
        status,
        Json(json!({
            "service": manifest.service,
            "version": manifest.version.to_string(),
            "sequence": manifest.sequence,
            "sha256": manifest.artifact.sha256,
        })),
    ))
}

/// The devices a request names with exactly one of `devices`, `tag` or
/// `all`: the selector, and the registered devices it picks now (never none).
async fn select(
    store: &Store,
    devices: &[String],
    tag: Option<&String>,
    all: bool,
) -> ApiResult<(Selector, Vec<String>)> {
    let selector = match (devices.is_empty(), tag, all) {
        (false, None, false) => Selector::Devices(devices.to_vec()),
        (true, Some(tag), false) => Selector::Tag(tag.clone()),
        (true, None, true) => Selector::All,
        _ => {
            return Err(bad(
                StatusCode::BAD_REQUEST,
                "choose the devices with exactly one of: devices, tag, all",
            ));
        }
    };
    let fleet = store.device_tags().await?;
    let known: std::collections::HashSet<&str> =
        fleet.iter().map(|d| d.device_id.as_str()).collect();
    if let Some(missing) = devices.iter().find(|id| !known.contains(id.as_str())) {
        return Err(bad(
            StatusCode::NOT_FOUND,
            format!("no device {missing}; add it with `ferry device add`"),
        ));
    }
    let picked = selector.pick(&fleet);
    if picked.is_empty() {
        return Err(bad(StatusCode::NOT_FOUND, "no device matches"));
    }
    Ok((selector, picked))
}

async fn list_releases(State(state): State<AppState>) -> ApiResult<impl IntoResponse> {
    Ok(Json(state.store.releases().await?))
}

#[derive(Deserialize)]
struct NewDeployment {
    service: String,
    version: String,
    #[serde(default)]
    devices: Vec<String>,
    #[serde(default)]
    tag: Option<String>,
    #[serde(default)]
    all: bool,
}

async fn deploy(
    State(state): State<AppState>,
    body: axum::body::Bytes,
) -> ApiResult<impl IntoResponse> {
    let request: NewDeployment = serde_json::from_slice(&body)
        .map_err(|e| bad(StatusCode::BAD_REQUEST, format!("bad JSON: {e}")))?;
    let release = state
        .store
        .release(&request.service, &request.version)
        .await?
        .ok_or_else(|| {
            bad(
                StatusCode::NOT_FOUND,
                format!(
                    "no release {} {}; publish it first",
                    request.service, request.version
                ),
            )
        })?;
    refuse_expired_row(&release)?;
    let envelope = Envelope::from_json(release.envelope.as_bytes())
        .map_err(|e| bad(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?;

    let (_, targets) = select(
        &state.store,
        &request.devices,
        request.tag.as_ref(),
        request.all,
    )
    .await?;

    // Devices that would never act on it are not sent it: they end at once,
    // with the reason the device itself would give.
    let mut refused = Vec::new();
    let mut reached = Vec::new();
    for device in targets {
        match will_not_install(&state.store, &device, &release).await? {
            Some(reason) => refused.push((device, reason)),
            None => reached.push(device),
        }
    }
    if reached.is_empty() {
        let reasons: Vec<String> = refused.iter().map(|(d, r)| format!("{d}: {r}")).collect();
        return Err(bad(
            StatusCode::CONFLICT,
            format!("no device would install it; {}", reasons.join("; ")),
        ));
    }

    // The deployment id goes into the rollout field, so it is known first.
    let url = format!("{}/v1/artifacts/{}", state.public_url, release.sha256);
    let id = state
        .store
        .add_deployment(&request.service, &request.version)
        .await?;
    let rollout = super::desired::deployment_label(id);
    let mut desired = Vec::new();
    for device in &reached {
        let payload =
            super::desired::with_release(&state.store, device, &envelope, &url, &rollout).await?;
        desired.push((device.clone(), payload));
    }
    state.store.add_deployment_targets(id, &desired).await?;
    state.store.add_deployment_refusals(id, &refused).await?;
    for (device, payload) in &desired {
        let _ = state.outgoing.send(Outgoing {
            device: device.clone(),
            payload: payload.clone().into_bytes(),
        });
    }
    state.rollouts.changed();
    let refused: serde_json::Map<String, serde_json::Value> = refused
        .into_iter()
        .map(|(device, reason)| (device, reason.into()))
        .collect();
    Ok((
        StatusCode::CREATED,
        Json(json!({ "id": id, "rollout": rollout, "devices": reached, "refused": refused })),
    ))
}

/// Why `device` would never install `release`, if it would not: it reports
/// a higher sequence of the service, the same sequence with another
/// release, or it rolled this release back before.
async fn will_not_install(
    store: &Store,
    device: &str,
    release: &super::store::ReleaseRow,
) -> ApiResult<Option<String>> {
    let reported = store.device(device).await?.and_then(|d| d.reported);
    let running = reported
        .as_ref()
        .and_then(|r| r["services"].as_array().cloned())
        .unwrap_or_default()
        .into_iter()
        .find(|s| s["service"] == release.service.as_str());
    if let Some(running) = running {
        let sequence = running["sequence"].as_u64().unwrap_or(0);
        let version = running["version"].as_str().unwrap_or("?");
        if sequence > release.sequence {
            return Ok(Some(format!(
                "it runs {} {version} (sequence {sequence}), and devices refuse a lower sequence (this release has {}); publish the old code under a new sequence to go back",
                release.service, release.sequence
            )));
        }
        if sequence == release.sequence && version != release.version {
            return Ok(Some(format!(
                "it runs {} {version} under the same sequence {sequence}; give the new release a sequence of its own",
                release.service
            )));
        }
    }
    // Rolled back outside the manager's records (an inbox install, say):
    // the device's own last result says so.
    let last = reported.as_ref().map(|r| &r["last_result"]);
    if let Some(last) = last.filter(|l| {
        l["outcome"] == "rolled_back"
            && l["release"]["service"] == release.service.as_str()
            && l["release"]["version"] == release.version.as_str()
    }) {
        let reason = last["reason"].as_str().unwrap_or("no reason given");
        return Ok(Some(format!(
            "it rolled {} {} back before ({reason}), and devices do not try a release again; publish a new sequence",
            release.service, release.version
        )));
    }
    if let Some(reason) = store
        .rolled_back_on(device, &release.service, &release.version)
        .await?
    {
        return Ok(Some(format!(
            "it rolled {} {} back before ({reason}), and devices do not try a release again; publish a new sequence",
            release.service, release.version
        )));
    }
    Ok(None)
}

async fn list_deployments(State(state): State<AppState>) -> ApiResult<impl IntoResponse> {
    Ok(Json(state.store.deployments().await?))
}

async fn show_deployment(
    State(state): State<AppState>,
    Path(id): Path<i64>,
) -> ApiResult<impl IntoResponse> {
    state
        .store
        .deployments()
        .await?
        .into_iter()
        .find(|d| d.id == id)
        .map(Json)
        .ok_or_else(|| bad(StatusCode::NOT_FOUND, format!("no deployment {id}")))
}

#[derive(Deserialize)]
struct HistoryQuery {
    device: Option<String>,
    #[serde(default)]
    after: i64,
    #[serde(default = "default_limit")]
    limit: i64,
}

fn default_limit() -> i64 {
    100
}

async fn history(
    state: &AppState,
    kind: &str,
    q: HistoryQuery,
) -> ApiResult<Json<serde_json::Value>> {
    let rows = state
        .store
        .history(kind, q.device.as_deref(), q.after, q.limit.clamp(1, 1000))
        .await?;
    Ok(Json(json!(
        rows.into_iter()
            .map(
                |(id, device, payload)| json!({ "id": id, "device_id": device, "message": payload })
            )
            .collect::<Vec<_>>()
    )))
}

async fn health_history(
    State(state): State<AppState>,
    Query(q): Query<HistoryQuery>,
) -> ApiResult<impl IntoResponse> {
    history(&state, "health", q).await
}

async fn event_history(
    State(state): State<AppState>,
    Query(q): Query<HistoryQuery>,
) -> ApiResult<impl IntoResponse> {
    history(&state, "events", q).await
}
