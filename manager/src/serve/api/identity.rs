//! Device identity over the API: enrolment tokens for new devices,
//! certificates for enrolled ones (`POST /v1/enrol`), and revocation.
//!
//! The manager never sees a device's secret key: the device makes it and
//! signs its request with it ([`ferry_protocol::enrol`]); the manager
//! checks the one-time token (or the key on record, to renew) and issues a
//! short-lived certificate for that key from the fleet CA.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::IntoResponse;
use axum::{Extension, Json};
use ferry_protocol::enrol::{EnrolRequest, EnrolResponse};
use ferry_protocol::{DeviceId, Timestamp};
use serde_json::{Value, json};

use super::auth::ClientAddr;
use super::{ApiResult, AppState, bad, end_session};
use crate::serve::store::{Enrolment, unix_now};

/// How long an enrolment token stays good.
pub const TOKEN_LIFETIME: Duration = Duration::from_secs(7 * 24 * 3600);

/// Registers `id` (again) for enrolment: what `POST /v1/devices` answers
/// for a certificate device. Its earlier key and certificates stop working.
pub(super) async fn add_enrolling(
    state: &AppState,
    id: &DeviceId,
    tags: &[String],
) -> ApiResult<Value> {
    let Some(ca) = &state.ca_pem else {
        return Err(bad(
            StatusCode::CONFLICT,
            "this manager serves no TLS (--insecure-plaintext): devices use passwords",
        ));
    };
    let token = crate::serve::random_hex::<24>()
        .map_err(|e| bad(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?;
    let expires = SystemTime::now() + TOKEN_LIFETIME;
    let known = state
        .store
        .add_enrolling_device(
            id,
            &token,
            expires
                .duration_since(UNIX_EPOCH)
                .map(|d| d.as_secs() as i64)
                .unwrap_or_default(),
            tags,
        )
        .await?;
    if known {
        end_session(state, id.as_str()).await;
    }
    Ok(json!({
        "device_id": id, "credential": "certificate", "tags": tags,
        "enrol_token": token, "enrol_expires": Timestamp::from(expires),
        "broker_url": state.broker_url.as_str(), "manager_url": state.public_url.as_str(),
        "ca_pem": ca.as_str(), "ca_fingerprint": crate::serve::tls::fingerprint(ca),
    }))
}

/// `POST /v1/enrol`: a certificate for a device's key, against its
/// one-time token (enrolment) or the key on record (renewal).
pub(super) async fn enrol(
    State(state): State<AppState>,
    from: Option<Extension<ClientAddr>>,
    body: axum::body::Bytes,
) -> ApiResult<impl IntoResponse> {
    let from = from.map(|Extension(ClientAddr(ip))| ip);
    state.failures.check(from)?;
    let Some(ca) = &state.device_ca else {
        return Err(bad(
            StatusCode::CONFLICT,
            "this manager serves no TLS (--insecure-plaintext): devices use passwords",
        ));
    };
    let request: EnrolRequest = serde_json::from_slice(&body)
        .map_err(|e| bad(StatusCode::BAD_REQUEST, format!("bad JSON: {e}")))?;
    let refuse = |why: String| {
        tracing::warn!(device = %request.device_id, "enrolment refused: {why}");
        state.failures.failed(from);
        bad(
            StatusCode::UNAUTHORIZED,
            format!("enrolment refused: {why}"),
        )
    };
    let key = request.verified_key().map_err(|e| refuse(e.to_string()))?;
    let now = unix_now();
    let decision = state
        .store
        .enrol(
            request.device_id.as_str(),
            &hex::encode(key),
            request.token.as_deref(),
            now,
        )
        .await?;
    if let Enrolment::Refused(why) = decision {
        return Err(refuse(why.to_owned()));
    }
    let issued = ca
        .issue_device(&request.device_id, &key, state.device_cert_lifetime)
        .map_err(|e| bad(StatusCode::INTERNAL_SERVER_ERROR, format!("{e:#}")))?;
    state
        .store
        .record_certificate(
            &issued.serial,
            request.device_id.as_str(),
            issued.not_after,
            now,
        )
        .await?;
    tracing::info!(
        device = %request.device_id,
        serial = %issued.serial,
        renewal = matches!(decision, Enrolment::Renewal),
        "device certificate issued"
    );
    Ok(Json(EnrolResponse {
        certificate_pem: issued.pem,
        not_before: issued.not_before,
        not_after: issued.not_after,
    }))
}

/// `POST /v1/devices/{id}/revoke`: every credential of the device stops
/// working now (its session ends, its certificates are refused by the
/// broker and the API); its record and history stay. `ferry device add`
/// gives it a new enrolment token.
pub(super) async fn revoke(
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> ApiResult<impl IntoResponse> {
    if !state.store.revoke_device(&id).await? {
        return Err(bad(StatusCode::NOT_FOUND, format!("no device {id}")));
    }
    end_session(&state, &id).await;
    tracing::warn!(device = %id, "device revoked");
    Ok(Json(json!({ "device_id": id, "revoked": true })))
}
