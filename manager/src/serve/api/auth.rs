//! Who may call the API, and for what.
//!
//! - Operators present a bearer token. The token in the data directory's
//!   `operator.token` (made at first start, read by the CLI on this
//!   machine) may do everything; named tokens (`ferry token create`) carry
//!   a scope: `read` (views, `/metrics`, the dashboard's stream), `operate`
//!   (publish, deploy, rollouts, tags) or `admin` (devices and tokens).
//!   Named tokens are stored hashed, and revoked by deleting them.
//! - Devices present their client certificate (checked against the store's
//!   record at every request: a revoked one is refused at once), or HTTP
//!   basic auth with their broker password, only to download artifacts.
//!   Enrolment (`POST /v1/enrol`) is open: the request carries its own
//!   proof (a one-time token, or the device's key on record).
//! - A client address with many failed attempts is refused for a while, so
//!   tokens and passwords cannot be guessed at network speed.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use axum::extract::{MatchedPath, Request, State};
use axum::http::{HeaderMap, Method, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use base64::Engine as _;
use serde::{Deserialize, Serialize};

use super::{ApiResult, AppState, bad};
use crate::serve::store::verify_password;

/// What a token may do; each scope includes those before it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Scope {
    /// Views, metrics, the live stream.
    Read,
    /// Publish, deploy, steer rollouts, tag devices.
    Operate,
    /// Add and remove devices, manage tokens.
    Admin,
}

impl Scope {
    /// The scope's name, as the API and the CLI write it.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Read => "read",
            Self::Operate => "operate",
            Self::Admin => "admin",
        }
    }

    /// Reads a scope's name.
    pub fn parse(text: &str) -> Option<Self> {
        match text {
            "read" => Some(Self::Read),
            "operate" => Some(Self::Operate),
            "admin" => Some(Self::Admin),
            _ => None,
        }
    }
}

/// The operator behind a request: the token's name and scope.
#[derive(Debug, Clone)]
pub struct Operator {
    /// `local` for the data directory's token, else the name it was made with.
    pub name: String,
    /// What it may do.
    pub scope: Scope,
}

/// Who a request comes from, when a device may ask too.
#[derive(Debug, Clone)]
pub enum Caller {
    /// An operator token with at least `read`.
    Operator,
    /// A device, by id.
    Device(String),
}

/// Failed sign-ins per client address: past [`MAX_FAILURES`] in
/// [`FAILURE_WINDOW`], that address is refused until the window ends.
#[derive(Default)]
pub struct Failures(Mutex<HashMap<IpAddr, (u32, Instant)>>);

/// Failed attempts an address may make in a window.
pub const MAX_FAILURES: u32 = 20;
/// The window failed attempts are counted in.
pub const FAILURE_WINDOW: Duration = Duration::from_secs(60);

impl Failures {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<IpAddr, (u32, Instant)>> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Refuses `client` when it failed too often lately.
    pub(super) fn check(&self, client: Option<IpAddr>) -> ApiResult<()> {
        let Some(client) = client else { return Ok(()) };
        let failures = self.lock();
        match failures.get(&client) {
            Some((count, since)) if *count >= MAX_FAILURES && since.elapsed() < FAILURE_WINDOW => {
                Err(bad(
                    StatusCode::TOO_MANY_REQUESTS,
                    format!(
                        "too many failed sign-ins from {client}; wait {}s",
                        FAILURE_WINDOW.saturating_sub(since.elapsed()).as_secs() + 1
                    ),
                ))
            }
            _ => Ok(()),
        }
    }

    pub(super) fn failed(&self, client: Option<IpAddr>) {
        let Some(client) = client else { return };
        let mut failures = self.lock();
        if failures.len() > 10_000 {
            failures.retain(|_, (_, since)| since.elapsed() < FAILURE_WINDOW);
        }
        let entry = failures.entry(client).or_insert((0, Instant::now()));
        if entry.1.elapsed() >= FAILURE_WINDOW {
            *entry = (0, Instant::now());
        }
        entry.0 += 1;
    }
}

/// The client's address, which the HTTP listener puts on each request.
#[derive(Debug, Clone, Copy)]
pub struct ClientAddr(pub IpAddr);

/// The certificate a client showed in its TLS handshake (one the fleet CA
/// issued and still valid: the handshake checked that), by serial.
#[derive(Debug, Clone)]
pub struct PeerCertificate {
    /// Lowercase hex, as the store records it.
    pub serial: String,
}

impl PeerCertificate {
    /// Reads a certificate's serial; none if it does not parse.
    pub fn from_der(der: &[u8]) -> Option<Self> {
        let (_, cert) = x509_parser::parse_x509_certificate(der).ok()?;
        Some(Self {
            serial: cert.serial.to_str_radix(16),
        })
    }
}

/// Who may call a route.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    /// Anyone: liveness, the API description, the dashboard's files.
    Public,
    /// An operator token with at least this scope.
    Operator(Scope),
    /// A device (its artifact downloads) or an operator who may read.
    DeviceOrRead,
}

/// The one table of who may call what, by method and route template.
/// A route not named here is for admins only.
pub fn access(method: &Method, route: &str) -> Access {
    use Access::*;
    use Scope::*;
    let read = method == Method::GET || method == Method::HEAD;
    match route {
        "/healthz" | "/openapi.json" | "/" | "/dashboard.js" | "/dashboard.css" => Public,
        "/v1/enrol" if !read => Public,
        "/v1/artifacts/{sha}" if read => DeviceOrRead,
        "/v1/artifacts/{sha}" => Operator(Operate),
        "/v1/tokens" | "/v1/tokens/{name}" => Operator(Admin),
        "/v1/devices" | "/v1/devices/{id}" if !read => Operator(Admin),
        _ if read => Operator(Read),
        "/v1/devices/{id}/tags"
        | "/v1/releases"
        | "/v1/deployments"
        | "/v1/rollouts"
        | "/v1/rollouts/{id}/{action}" => Operator(Operate),
        _ => Operator(Admin),
    }
}

/// Middleware: checks a request against [`access`] before its handler
/// runs, and hands the handler who called ([`Operator`] or [`Caller`] in
/// the request's extensions).
pub async fn authorize(
    State(state): State<AppState>,
    route: MatchedPath,
    mut request: Request,
    next: Next,
) -> Response {
    let from = request.extensions().get::<ClientAddr>().map(|c| c.0);
    let checked =
        match access(request.method(), route.as_str()) {
            Access::Public => Ok(()),
            Access::Operator(needed) => operator(&state, request.headers(), from, needed)
                .await
                .map(|op| {
                    request.extensions_mut().insert(op);
                }),
            Access::DeviceOrRead => {
                let certificate = request
                    .extensions()
                    .get::<Option<PeerCertificate>>()
                    .cloned()
                    .flatten();
                device_or_operator(&state, request.headers(), certificate, from)
                    .await
                    .map(|caller| {
                        request.extensions_mut().insert(caller);
                    })
            }
        };
    match checked {
        Ok(()) => next.run(request).await,
        Err(refused) => refused.into_response(),
    }
}

/// The operator a bearer token names, if it is one.
async fn token_operator(state: &AppState, token: &str) -> ApiResult<Option<Operator>> {
    if constant_time_eq(token.as_bytes(), state.token.as_bytes()) {
        return Ok(Some(Operator {
            name: "local".into(),
            scope: Scope::Admin,
        }));
    }
    Ok(state
        .store
        .token(token)
        .await?
        .map(|(name, scope)| Operator {
            name,
            scope: Scope::parse(&scope).unwrap_or(Scope::Read),
        }))
}

/// Checks the operator's bearer token for `needed`; the operator.
async fn operator(
    state: &AppState,
    headers: &HeaderMap,
    from: Option<IpAddr>,
    needed: Scope,
) -> ApiResult<Operator> {
    state.failures.check(from)?;
    let presented = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "));
    let Some(token) = presented else {
        return Err(bad(
            StatusCode::UNAUTHORIZED,
            "an operator token is needed (Authorization: Bearer ...)",
        ));
    };
    match token_operator(state, token).await? {
        Some(op) if op.scope >= needed => Ok(op),
        Some(op) => Err(bad(
            StatusCode::FORBIDDEN,
            format!(
                "token {} may {}, not {} (use a token with scope {})",
                op.name,
                op.scope.as_str(),
                needed.as_str(),
                needed.as_str()
            ),
        )),
        None => {
            state.failures.failed(from);
            Err(bad(StatusCode::UNAUTHORIZED, "the operator token is wrong"))
        }
    }
}

/// An operator (scope `read`) or a device with its certificate or its
/// basic-auth credentials.
async fn device_or_operator(
    state: &AppState,
    headers: &HeaderMap,
    certificate: Option<PeerCertificate>,
    from: Option<IpAddr>,
) -> ApiResult<Caller> {
    state.failures.check(from)?;
    if let Some(certificate) = certificate {
        return match state
            .store
            .certificate_device(&certificate.serial, crate::serve::store::unix_now())
            .await?
        {
            Some(device) => Ok(Caller::Device(device)),
            None => {
                state.failures.failed(from);
                Err(bad(
                    StatusCode::UNAUTHORIZED,
                    "this device certificate is revoked",
                ))
            }
        };
    }
    let authorization = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok());
    if authorization.is_some_and(|a| a.starts_with("Bearer ")) {
        return operator(state, headers, from, Scope::Read)
            .await
            .map(|_| Caller::Operator);
    }
    let basic = authorization
        .and_then(|v| v.strip_prefix("Basic "))
        .and_then(|b| base64::engine::general_purpose::STANDARD.decode(b).ok())
        .and_then(|b| String::from_utf8(b).ok());
    let Some((user, password)) = basic.as_deref().and_then(|b| b.split_once(':')) else {
        return Err(bad(
            StatusCode::UNAUTHORIZED,
            "device credentials are needed",
        ));
    };
    match state.store.password_hash_of(user).await? {
        Some(stored) if verify_password(&stored, password) => Ok(Caller::Device(user.to_owned())),
        _ => {
            state.failures.failed(from);
            Err(bad(
                StatusCode::UNAUTHORIZED,
                "unknown device or wrong password",
            ))
        }
    }
}

/// Equal bytes, compared without an early exit.
pub fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_write_needs_more_than_read_and_tokens_need_admin() {
        use Access::*;
        use Scope::*;
        let (get, post, put, delete) = (Method::GET, Method::POST, Method::PUT, Method::DELETE);
        for (method, route, expected) in [
            (&get, "/healthz", Public),
            (&get, "/", Public),
            (&get, "/metrics", Operator(Read)),
            (&get, "/v1/stream", Operator(Read)),
            (&get, "/v1/devices", Operator(Read)),
            (&post, "/v1/devices", Operator(Admin)),
            (&delete, "/v1/devices/{id}", Operator(Admin)),
            (&put, "/v1/devices/{id}/tags", Operator(Operate)),
            (&get, "/v1/artifacts/{sha}", DeviceOrRead),
            (&Method::HEAD, "/v1/artifacts/{sha}", DeviceOrRead),
            (&put, "/v1/artifacts/{sha}", Operator(Operate)),
            (&post, "/v1/releases", Operator(Operate)),
            (&post, "/v1/deployments", Operator(Operate)),
            (&post, "/v1/rollouts/{id}/{action}", Operator(Operate)),
            (&get, "/v1/tokens", Operator(Admin)),
            (&post, "/v1/tokens", Operator(Admin)),
            (&delete, "/v1/tokens/{name}", Operator(Admin)),
            (&get, "/v1/roots", Operator(Read)),
            (&post, "/v1/roots", Operator(Admin)),
            (&post, "/v1/something-new", Operator(Admin)),
            (&post, "/v1/enrol", Public),
            (&get, "/v1/enrol", Operator(Read)),
            (&post, "/v1/devices/{id}/revoke", Operator(Admin)),
        ] {
            assert_eq!(access(method, route), expected, "{method} {route}");
        }
    }
}
