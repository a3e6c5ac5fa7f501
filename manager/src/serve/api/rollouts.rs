//! `/v1/rollouts`: start, watch, pause, resume and abort staged rollouts.

use axum::Json;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::IntoResponse;
use serde::{Deserialize, Serialize};
use serde_json::json;

use super::{ApiResult, AppState, bad};
use crate::serve::rollout::{Plan, RolloutState, Threshold};
use crate::serve::store::{DeviceStep, RolloutRow};

/// `POST /v1/rollouts`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct NewRollout {
    service: String,
    version: String,
    #[serde(default)]
    devices: Vec<String>,
    #[serde(default)]
    tag: Option<String>,
    #[serde(default)]
    all: bool,
    #[serde(default)]
    canary: u32,
    #[serde(default)]
    waves: Vec<u8>,
    #[serde(default)]
    max_in_flight: Option<u32>,
    #[serde(default)]
    device_timeout_secs: Option<u64>,
    #[serde(default)]
    max_failures: Option<Threshold>,
    #[serde(default)]
    revert_to: Option<String>,
}

pub(super) async fn start(
    State(state): State<AppState>,
    body: axum::body::Bytes,
) -> ApiResult<impl IntoResponse> {
    let request: NewRollout = serde_json::from_slice(&body)
        .map_err(|e| bad(StatusCode::BAD_REQUEST, format!("bad JSON: {e}")))?;
    let store = &state.store;
    let Some(release) = store.release(&request.service, &request.version).await? else {
        return Err(bad(
            StatusCode::NOT_FOUND,
            format!(
                "no release {} {}; publish it first",
                request.service, request.version
            ),
        ));
    };
    super::refuse_expired_row(&release)?;
    if let Some(revert) = &request.revert_to {
        let Some(back) = store.release(&request.service, revert).await? else {
            return Err(bad(
                StatusCode::NOT_FOUND,
                format!(
                    "no release {} {revert} to revert to; publish it first",
                    request.service
                ),
            ));
        };
        if back.sequence <= release.sequence {
            return Err(bad(
                StatusCode::BAD_REQUEST,
                format!(
                    "the revert release needs a sequence above {} (it has {}): devices never go down in sequence; \
                     `ferry rollout start --revert-on-abort --key KEY` signs one",
                    release.sequence, back.sequence
                ),
            ));
        }
    }
    let (selector, devices) =
        super::select(store, &request.devices, request.tag.as_ref(), request.all).await?;
    let plan = Plan {
        selector,
        canary: request.canary,
        waves: if request.waves.is_empty() {
            vec![100]
        } else {
            request.waves
        },
        max_in_flight: request.max_in_flight,
        device_timeout_secs: request.device_timeout_secs.unwrap_or(600),
        max_failures: request.max_failures.unwrap_or(Threshold::Count(0)),
        revert_to: request.revert_to,
    }
    .normalise()
    .map_err(|e| bad(StatusCode::BAD_REQUEST, e))?;
    let id = store
        .add_rollout(&request.service, &request.version, &plan, &devices)
        .await?;
    state.rollouts.wake.notify_one();
    state.rollouts.changed();
    Ok((
        StatusCode::CREATED,
        Json(json!({ "id": id, "devices": devices })),
    ))
}

/// A rollout with its stages summed up, as the API shows it.
#[derive(Debug, Serialize)]
struct RolloutView {
    #[serde(flatten)]
    row: RolloutRow,
    stages: Vec<Stage>,
    counts: Counts,
}

/// One stage (the canary, or a wave) of a rollout.
#[derive(Debug, Serialize)]
struct Stage {
    name: String,
    /// How many devices, in order, the rollout covers when this stage is done.
    reaches: usize,
    counts: Counts,
}

#[derive(Debug, Default, Serialize)]
struct Counts {
    devices: usize,
    pending: usize,
    in_flight: usize,
    installed: usize,
    failed: usize,
    /// Sent the revert release after an abort (reverting, reverted or not).
    reverted: usize,
}

impl Counts {
    fn of<'a>(steps: impl Iterator<Item = &'a DeviceStep>) -> Self {
        let mut counts = Self::default();
        for step in steps {
            counts.devices += 1;
            match step {
                DeviceStep::Pending => counts.pending += 1,
                DeviceStep::Installed => counts.installed += 1,
                DeviceStep::Reverting | DeviceStep::Reverted | DeviceStep::RevertFailed => {
                    counts.reverted += 1
                }
                s if s.in_flight() => counts.in_flight += 1,
                _ => counts.failed += 1,
            }
        }
        counts
    }
}

fn view(row: RolloutRow) -> RolloutView {
    let ends = row.head.plan.stage_ends(row.devices.len());
    let mut names = Vec::new();
    if row.head.plan.canary > 0 {
        names.push("canary".to_owned());
    }
    names.extend(
        row.head
            .plan
            .waves
            .iter()
            .enumerate()
            .map(|(i, share)| format!("wave {} ({share}%)", i + 1)),
    );
    let mut stages = Vec::new();
    let mut start = 0;
    for (name, &end) in names.into_iter().zip(&ends) {
        let counts = Counts::of(row.devices[start..end].iter().map(|d| &d.status));
        stages.push(Stage {
            name,
            reaches: end,
            counts,
        });
        start = end;
    }
    let counts = Counts::of(row.devices.iter().map(|d| &d.status));
    RolloutView {
        row,
        stages,
        counts,
    }
}

pub(super) async fn list(State(state): State<AppState>) -> ApiResult<impl IntoResponse> {
    let rollouts: Vec<RolloutView> = state
        .store
        .rollouts()
        .await?
        .into_iter()
        .map(view)
        .collect();
    Ok(Json(rollouts))
}

pub(super) async fn show(
    State(state): State<AppState>,
    Path(id): Path<i64>,
) -> ApiResult<impl IntoResponse> {
    Ok(Json(view(find(&state, id).await?)))
}

async fn find(state: &AppState, id: i64) -> ApiResult<RolloutRow> {
    state
        .store
        .rollout(id)
        .await?
        .ok_or_else(|| bad(StatusCode::NOT_FOUND, format!("no rollout {id}")))
}

/// `POST /v1/rollouts/{id}/{pause|resume|abort}`.
pub(super) async fn act(
    State(state): State<AppState>,
    Path((id, action)): Path<(i64, String)>,
) -> ApiResult<impl IntoResponse> {
    let row = find(&state, id).await?;
    let (from, to, reason): (&[RolloutState], _, _) = match action.as_str() {
        "pause" => (&[RolloutState::Running], RolloutState::Paused, None),
        "resume" => (&[RolloutState::Paused], RolloutState::Running, None),
        "abort" => (
            &[RolloutState::Running, RolloutState::Paused],
            RolloutState::Aborted,
            Some("aborted by the operator"),
        ),
        other => {
            return Err(bad(
                StatusCode::NOT_FOUND,
                format!("no action {other:?}; use pause, resume or abort"),
            ));
        }
    };
    if !from.contains(&row.head.state) {
        return Err(bad(
            StatusCode::CONFLICT,
            format!(
                "rollout {id} is {}; cannot {action} it",
                row.head.state.as_str()
            ),
        ));
    }
    match reason {
        Some(reason) => state.rollouts.abort(&row.head, reason).await?,
        None => state.store.set_rollout_state(id, to, None).await?,
    }
    state.rollouts.wake.notify_one();
    state.rollouts.changed();
    Ok(Json(view(find(&state, id).await?)))
}
