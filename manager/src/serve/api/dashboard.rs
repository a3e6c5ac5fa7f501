//! The dashboard: three static files compiled into the binary (no build
//! step, nothing fetched from elsewhere), and `/v1/stream`, which tells an
//! open page when to fetch again.
//!
//! The page holds the operator token in the browser's local storage and
//! sends it as a bearer token like any API client; it reads the stream with
//! `fetch` for the same reason (an `EventSource` cannot send headers).

use std::convert::Infallible;
use std::time::Duration;

use axum::extract::State;
use axum::http::header;
use axum::response::IntoResponse;
use axum::response::sse::{Event, KeepAlive, Sse};

use super::{ApiResult, AppState};

const INDEX: &str = include_str!("../../../dashboard/index.html");
const SCRIPT: &str = include_str!("../../../dashboard/dashboard.js");
const STYLE: &str = include_str!("../../../dashboard/dashboard.css");

/// Changes closer together than this reach a page as one event: a fleet
/// reporting health every few seconds must not make pages refetch nonstop.
const COALESCE: Duration = Duration::from_millis(500);

pub(super) async fn index() -> impl IntoResponse {
    ([(header::CONTENT_TYPE, "text/html; charset=utf-8")], INDEX)
}

pub(super) async fn script() -> impl IntoResponse {
    (
        [(header::CONTENT_TYPE, "text/javascript; charset=utf-8")],
        SCRIPT,
    )
}

pub(super) async fn style() -> impl IntoResponse {
    ([(header::CONTENT_TYPE, "text/css; charset=utf-8")], STYLE)
}

/// `GET /v1/stream`: a `change` event (data: a counter) whenever something
/// a page shows may have changed, at most every [`COALESCE`].
pub(super) async fn stream(State(state): State<AppState>) -> ApiResult<impl IntoResponse> {
    let receiver = state.rollouts.changes.subscribe();
    let events = futures_util::stream::unfold(receiver, |mut receiver| async move {
        receiver.changed().await.ok()?;
        tokio::time::sleep(COALESCE).await;
        let version = *receiver.borrow_and_update();
        let event = Event::default().event("change").data(version.to_string());
        Some((Ok::<_, Infallible>(event), receiver))
    });
    Ok(Sse::new(events).keep_alive(KeepAlive::default()))
}
