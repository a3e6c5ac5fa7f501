//! `/v1/tokens`: named operator tokens with a scope (admin only). A token
//! is shown once, when it is made; the manager keeps only its hash.

use axum::Json;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::IntoResponse;
use serde::Deserialize;
use serde_json::json;

use super::auth::Scope;
use super::{ApiResult, AppState, bad};

#[derive(Deserialize)]
pub(super) struct NewToken {
    name: String,
    scope: Scope,
}

/// Token names: short, printable, for people and logs.
fn check_name(name: &str) -> ApiResult<()> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && name
            .bytes()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'-' | b'_' | b'.'));
    if ok && name != "local" {
        Ok(())
    } else {
        Err(bad(
            StatusCode::BAD_REQUEST,
            format!(
                "token name {name:?}: 1 to 64 ASCII letters, digits, '-', '_' or '.' (and not \"local\")"
            ),
        ))
    }
}

pub(super) async fn create(
    State(state): State<AppState>,
    body: axum::body::Bytes,
) -> ApiResult<impl IntoResponse> {
    let new: NewToken = serde_json::from_slice(&body)
        .map_err(|e| bad(StatusCode::BAD_REQUEST, format!("bad JSON: {e}")))?;
    check_name(&new.name)?;
    let token = crate::serve::random_hex::<32>()
        .map_err(|e| bad(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?;
    if !state
        .store
        .add_token(&new.name, new.scope.as_str(), &token)
        .await?
    {
        return Err(bad(
            StatusCode::CONFLICT,
            format!("a token named {} exists; revoke it first", new.name),
        ));
    }
    Ok((
        StatusCode::CREATED,
        Json(json!({ "name": new.name, "scope": new.scope, "token": token })),
    ))
}

pub(super) async fn list(State(state): State<AppState>) -> ApiResult<impl IntoResponse> {
    Ok(Json(state.store.tokens().await?))
}

pub(super) async fn revoke(
    State(state): State<AppState>,
    Path(name): Path<String>,
) -> ApiResult<impl IntoResponse> {
    if !state.store.remove_token(&name).await? {
        return Err(bad(StatusCode::NOT_FOUND, format!("no token {name}")));
    }
    Ok(Json(json!({ "name": name, "revoked": true })))
}
