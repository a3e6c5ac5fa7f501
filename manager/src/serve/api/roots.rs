//! `/v1/roots`: the trust root chain (publishing is admin only). The
//! manager cannot make or sign a root: it keeps the chain the operators
//! signed offline, checks that each new version follows the last, and puts
//! the whole chain into every device's desired state; each device checks
//! every link again against the root it holds.

use axum::Json;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::IntoResponse;
use ferry_protocol::root::{Root, SignedRoot, verify_first, verify_next};
use serde_json::{Value, json};

use super::{ApiResult, AppState, bad};
use crate::serve::desired;
use crate::serve::ingest::Outgoing;

fn describe(root: &Root) -> Value {
    let ids = |lines: &[String]| -> Vec<String> {
        lines
            .iter()
            .filter_map(|l| ferry_protocol::PublicKey::from_text(l).ok())
            .map(|k| k.id().to_string())
            .collect()
    };
    json!({
        "version": root.version,
        "root_keys": ids(&root.root_keys), "root_threshold": root.root_threshold,
        "release_keys": ids(&root.release_keys), "release_threshold": root.release_threshold,
    })
}

/// `GET /v1/roots`: the chain, oldest first.
pub(super) async fn list(State(state): State<AppState>) -> ApiResult<impl IntoResponse> {
    let chain = desired::roots(&state.store).await?;
    let roots: Vec<Value> = chain
        .iter()
        .filter_map(|s| s.unverified().ok())
        .map(|r| describe(&r))
        .collect();
    Ok(Json(json!(roots)))
}

/// `POST /v1/roots`: a signed root that follows the newest one (or any
/// first one that its own keys signed); sent to every device at once.
pub(super) async fn publish(
    State(state): State<AppState>,
    body: axum::body::Bytes,
) -> ApiResult<impl IntoResponse> {
    let signed = SignedRoot::from_json(&body)
        .map_err(|e| bad(StatusCode::UNPROCESSABLE_ENTITY, e.to_string()))?;
    let mut chain = desired::roots(&state.store).await?;
    let offered = signed
        .unverified()
        .map_err(|e| bad(StatusCode::UNPROCESSABLE_ENTITY, e.to_string()))?;
    if let Some(same) = chain
        .iter()
        .find(|s| s.unverified().is_ok_and(|r| r.version == offered.version))
    {
        return if same.unverified().ok().as_ref() == Some(&offered) {
            Ok((StatusCode::OK, Json(describe(&offered))))
        } else {
            Err(bad(
                StatusCode::CONFLICT,
                format!(
                    "trust root version {} is published with other contents",
                    offered.version
                ),
            ))
        };
    }
    let checked = match chain.last().map(SignedRoot::unverified) {
        None => verify_first(&signed),
        Some(Ok(newest)) => verify_next(&newest, &signed),
        Some(Err(e)) => return Err(bad(StatusCode::INTERNAL_SERVER_ERROR, e.to_string())),
    }
    .map_err(|e| bad(StatusCode::UNPROCESSABLE_ENTITY, e.to_string()))?;
    chain.push(signed.clone());
    let text = String::from_utf8_lossy(&signed.to_json()).into_owned();
    let changed = state
        .store
        .add_root(checked.version, &text, |payload| {
            desired::with_roots(payload, &chain)
        })
        .await?;
    for (device, payload) in changed {
        let _ = state.outgoing.send(Outgoing {
            device,
            payload: payload.into_bytes(),
        });
    }
    Ok((StatusCode::CREATED, Json(describe(&checked))))
}
