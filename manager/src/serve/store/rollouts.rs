//! Rollouts as stored: the plan, the state, and each device's step.
//!
//! Everything the rollout engine decides from is here, so a restarted
//! manager picks a rollout up where it was: a device whose status is past
//! `pending` has been sent the release and is never sent it again.

use serde::Serialize;
use sqlx::{AnyConnection, AssertSqlSafe};

use super::{Backend, Result, Store, now, set_desired};
use crate::serve::rollout::{Plan, RolloutState};

/// Where one device is in a rollout.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DeviceStep {
    /// Not sent yet.
    Pending,
    /// Its desired state names the release; no word from it yet.
    Sent,
    /// It reported progress.
    Installing,
    /// Installed, healthy and committed.
    Installed,
    /// It refused the release before anything changed.
    Rejected,
    /// The install failed before the swap.
    Failed,
    /// Swapped in, failed its health gate, and rolled back.
    RolledBack,
    /// No result within the device timeout (offline, or stuck).
    TimedOut,
    /// The rollout aborted and the device was sent the revert release.
    Reverting,
    /// The revert release is installed.
    Reverted,
    /// The revert release did not install.
    RevertFailed,
}

impl DeviceStep {
    /// Every step.
    pub const ALL: [Self; 11] = [
        Self::Pending,
        Self::Sent,
        Self::Installing,
        Self::Installed,
        Self::Rejected,
        Self::Failed,
        Self::RolledBack,
        Self::TimedOut,
        Self::Reverting,
        Self::Reverted,
        Self::RevertFailed,
    ];

    /// The steps `pick` holds for, as an SQL list (`'sent', 'installing'`):
    /// queries filter by the same rules as the code, from one place.
    fn sql_list(pick: fn(Self) -> bool) -> String {
        Self::ALL
            .into_iter()
            .filter(|&s| pick(s))
            .map(|s| format!("'{}'", s.as_str()))
            .collect::<Vec<_>>()
            .join(", ")
    }

    /// The text stored and shown.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Pending => "pending",
            Self::Sent => "sent",
            Self::Installing => "installing",
            Self::Installed => "installed",
            Self::Rejected => "rejected",
            Self::Failed => "failed",
            Self::RolledBack => "rolled_back",
            Self::TimedOut => "timed_out",
            Self::Reverting => "reverting",
            Self::Reverted => "reverted",
            Self::RevertFailed => "revert_failed",
        }
    }

    /// The step stored as `text`; unknown text reads as pending.
    fn parse(text: &str) -> Self {
        Self::ALL
            .into_iter()
            .find(|s| s.as_str() == text)
            .unwrap_or(Self::Pending)
    }

    /// Counts against the failure threshold.
    pub fn is_failure(self) -> bool {
        matches!(
            self,
            Self::Rejected | Self::Failed | Self::RolledBack | Self::TimedOut
        )
    }

    /// Sent, and no outcome yet.
    pub fn in_flight(self) -> bool {
        matches!(self, Self::Sent | Self::Installing)
    }

    /// Has an outcome (installed or a failure).
    pub fn settled(self) -> bool {
        self == Self::Installed || self.is_failure()
    }

    /// Runs, or may come to run, the rolled-out release: what a revert undoes.
    pub fn needs_revert(self) -> bool {
        matches!(
            self,
            Self::Sent | Self::Installing | Self::Installed | Self::TimedOut
        )
    }

    /// Whether a device may move from this step to `next`. Outcomes are
    /// final, except that a timed-out device may still install (it came
    /// back) and anything the release reached may be reverted.
    pub fn can_move_to(self, next: Self) -> bool {
        use DeviceStep::*;
        match (self, next) {
            (Pending, Sent) => true,
            (Sent, Installing) => true,
            (Sent | Installing, Installed | Rejected | Failed | RolledBack | TimedOut) => true,
            (TimedOut, Installed) => true,
            (s, Reverting) => s.needs_revert(),
            (Reverting, Reverted | RevertFailed) => true,
            _ => false,
        }
    }
}

/// One device's part in a rollout.
#[derive(Debug, Clone, Serialize)]
pub struct RolloutDevice {
    /// The device.
    pub device_id: String,
    /// Its place in the rollout's order (waves take devices in this order).
    pub position: i64,
    /// Its step.
    pub status: DeviceStep,
    /// Why, when it failed.
    pub reason: Option<String>,
    /// When the release was sent to it.
    pub sent_at: Option<String>,
    /// When its status last changed.
    pub updated: String,
}

/// A rollout without its devices: what the engine and the metrics step on
/// (a rollout's device list can be the whole fleet).
#[derive(Debug, Clone, Serialize)]
pub struct RolloutHead {
    /// Its id; devices see it as `rollout-<id>`.
    pub id: i64,
    /// The service.
    pub service: String,
    /// The version rolled out.
    pub version: String,
    /// Selector and strategy.
    pub plan: Plan,
    /// Running, paused, completed or aborted.
    pub state: RolloutState,
    /// Why it stopped, when it did not complete.
    pub reason: Option<String>,
    /// When it was started.
    pub created: String,
    /// When its state last changed.
    pub updated: String,
}

/// A rollout as stored, with its devices.
#[derive(Debug, Clone, Serialize)]
pub struct RolloutRow {
    /// The rollout.
    #[serde(flatten)]
    pub head: RolloutHead,
    /// Its devices, in order.
    pub devices: Vec<RolloutDevice>,
}

/// How many of a rollout's devices are at each step.
#[derive(Debug, Clone, Default)]
pub struct StepCounts(Vec<(DeviceStep, usize)>);

impl StepCounts {
    /// Devices at a step `pick` holds for.
    pub fn of(&self, pick: impl Fn(DeviceStep) -> bool) -> usize {
        self.0
            .iter()
            .filter(|(s, _)| pick(*s))
            .map(|(_, n)| n)
            .sum()
    }

    /// All the rollout's devices.
    pub fn total(&self) -> usize {
        self.of(|_| true)
    }
}

/// A device sent the release and without an outcome yet.
#[derive(Debug, Clone)]
pub struct InFlight {
    /// The device.
    pub device_id: String,
    /// When the release was sent to it.
    pub sent_at: Option<String>,
    /// When its step last changed.
    pub updated: String,
}

type HeadColumns = (
    i64,
    String,
    String,
    String,
    String,
    Option<String>,
    String,
    String,
);

const HEAD_COLUMNS: &str = "id, service, version, plan, state, reason, created, updated";

fn head_of(
    (id, service, version, plan, state, reason, created, updated): HeadColumns,
) -> Result<RolloutHead> {
    Ok(RolloutHead {
        id,
        service,
        version,
        plan: serde_json::from_str(&plan)?,
        state: RolloutState::parse(&state),
        reason,
        created,
        updated,
    })
}

/// A device's step in a rollout, read (and on PostgreSQL locked) inside
/// the transaction that changes it.
async fn current_step(
    tx: &mut AnyConnection,
    backend: Backend,
    id: i64,
    device: &str,
) -> Result<Option<DeviceStep>> {
    let status: Option<String> = sqlx::query_scalar(AssertSqlSafe(format!(
        "SELECT status FROM rollout_devices WHERE rollout_id = $1 AND device_id = $2{}",
        backend.for_update()
    )))
    .bind(id)
    .bind(device)
    .fetch_optional(&mut *tx)
    .await?;
    Ok(status.map(|s| DeviceStep::parse(&s)))
}

impl Store {
    /// Records a new rollout over `devices` (in order); returns its id.
    pub async fn add_rollout(
        &self,
        service: &str,
        version: &str,
        plan: &Plan,
        devices: &[String],
    ) -> Result<i64> {
        let mut tx = self.pool.begin().await?;
        let time = now();
        let id: i64 = sqlx::query_scalar(
            "INSERT INTO rollouts (service, version, plan, state, created, updated)
             VALUES ($1, $2, $3, 'running', $4, $4) RETURNING id",
        )
        .bind(service)
        .bind(version)
        .bind(serde_json::to_string(plan)?)
        .bind(&time)
        .fetch_one(&mut *tx)
        .await?;
        insert_rollout_devices(&mut tx, id, 0, devices, &time).await?;
        tx.commit().await?;
        Ok(id)
    }

    /// Adds devices that joined the selector, after the existing ones.
    pub async fn add_rollout_devices(&self, id: i64, devices: &[String]) -> Result<()> {
        let mut tx = self.pool.begin().await?;
        let next: i64 = sqlx::query_scalar(
            "SELECT COALESCE(MAX(position) + 1, 0) FROM rollout_devices WHERE rollout_id = $1",
        )
        .bind(id)
        .fetch_one(&mut *tx)
        .await?;
        insert_rollout_devices(&mut tx, id, next, devices, &now()).await?;
        tx.commit().await?;
        Ok(())
    }

    /// Every rollout, newest first.
    pub async fn rollouts(&self) -> Result<Vec<RolloutRow>> {
        let mut out = Vec::new();
        for head in self.rollout_heads().await? {
            let devices = self.rollout_devices(head.id).await?;
            out.push(RolloutRow { head, devices });
        }
        Ok(out)
    }

    /// Every rollout without its devices, newest first.
    pub async fn rollout_heads(&self) -> Result<Vec<RolloutHead>> {
        self.heads_where("TRUE").await
    }

    /// Rollouts that are running or paused, without their devices. Only
    /// open ones are read: the engine asks several times a second, and
    /// finished rollouts pile up.
    pub async fn open_rollout_heads(&self) -> Result<Vec<RolloutHead>> {
        self.heads_where("state IN ('running', 'paused')").await
    }

    async fn heads_where(&self, condition: &'static str) -> Result<Vec<RolloutHead>> {
        let rows: Vec<HeadColumns> = sqlx::query_as(AssertSqlSafe(format!(
            "SELECT {HEAD_COLUMNS} FROM rollouts WHERE {condition} ORDER BY id DESC"
        )))
        .fetch_all(&self.reads)
        .await?;
        rows.into_iter().map(head_of).collect()
    }

    /// One rollout without its devices.
    pub async fn rollout_head(&self, id: i64) -> Result<Option<RolloutHead>> {
        let row: Option<HeadColumns> = sqlx::query_as(AssertSqlSafe(format!(
            "SELECT {HEAD_COLUMNS} FROM rollouts WHERE id = $1"
        )))
        .bind(id)
        .fetch_optional(&self.reads)
        .await?;
        row.map(head_of).transpose()
    }

    /// One rollout with its devices.
    pub async fn rollout(&self, id: i64) -> Result<Option<RolloutRow>> {
        let Some(head) = self.rollout_head(id).await? else {
            return Ok(None);
        };
        let devices = self.rollout_devices(id).await?;
        Ok(Some(RolloutRow { head, devices }))
    }

    /// A rollout's devices, in order.
    async fn rollout_devices(&self, id: i64) -> Result<Vec<RolloutDevice>> {
        type Row = (String, i64, String, Option<String>, Option<String>, String);
        let rows: Vec<Row> = sqlx::query_as(
            "SELECT device_id, position, status, reason, sent_at, updated FROM rollout_devices
             WHERE rollout_id = $1 ORDER BY position",
        )
        .bind(id)
        .fetch_all(&self.reads)
        .await?;
        Ok(rows
            .into_iter()
            .map(
                |(device_id, position, status, reason, sent_at, updated)| RolloutDevice {
                    device_id,
                    position,
                    status: DeviceStep::parse(&status),
                    reason,
                    sent_at,
                    updated,
                },
            )
            .collect())
    }

    /// The ids of a rollout's devices, in no order.
    pub async fn rollout_device_ids(&self, id: i64) -> Result<Vec<String>> {
        Ok(
            sqlx::query_scalar("SELECT device_id FROM rollout_devices WHERE rollout_id = $1")
                .bind(id)
                .fetch_all(&self.reads)
                .await?,
        )
    }

    /// How many of a rollout's devices are at each step.
    pub async fn rollout_step_counts(&self, id: i64) -> Result<StepCounts> {
        let rows: Vec<(String, i64)> = sqlx::query_as(
            "SELECT status, COUNT(*) FROM rollout_devices WHERE rollout_id = $1 GROUP BY status",
        )
        .bind(id)
        .fetch_all(&self.reads)
        .await?;
        Ok(StepCounts(
            rows.into_iter()
                .map(|(s, n)| (DeviceStep::parse(&s), usize::try_from(n).unwrap_or(0)))
                .collect(),
        ))
    }

    /// How many devices come before the rollout's first one without an
    /// outcome (its index in the rollout's order); `None` when every
    /// device has one.
    pub async fn first_unsettled(&self, id: i64) -> Result<Option<usize>> {
        let first: Option<i64> = sqlx::query_scalar(AssertSqlSafe(format!(
            "SELECT MIN(position) FROM rollout_devices
             WHERE rollout_id = $1 AND status NOT IN ({})",
            DeviceStep::sql_list(DeviceStep::settled)
        )))
        .bind(id)
        .fetch_one(&self.reads)
        .await?;
        let Some(first) = first else {
            return Ok(None);
        };
        let before: i64 = sqlx::query_scalar(
            "SELECT COUNT(*) FROM rollout_devices WHERE rollout_id = $1 AND position < $2",
        )
        .bind(id)
        .bind(first)
        .fetch_one(&self.reads)
        .await?;
        Ok(Some(usize::try_from(before).unwrap_or(0)))
    }

    /// Up to `limit` pending devices among the first `first` of a
    /// rollout, in order.
    pub async fn pending_among_first(
        &self,
        id: i64,
        first: usize,
        limit: usize,
    ) -> Result<Vec<String>> {
        let (first, limit) = (as_sql_count(first), as_sql_count(limit));
        Ok(sqlx::query_scalar(
            "SELECT device_id FROM (
                 SELECT device_id, position, status FROM rollout_devices
                  WHERE rollout_id = $1 ORDER BY position LIMIT $2) AS firsts
              WHERE status = 'pending' ORDER BY position LIMIT $3",
        )
        .bind(id)
        .bind(first)
        .bind(limit)
        .fetch_all(&self.reads)
        .await?)
    }

    /// A rollout's devices in flight (sent, no outcome yet).
    pub async fn in_flight(&self, id: i64) -> Result<Vec<InFlight>> {
        let rows: Vec<(String, Option<String>, String)> = sqlx::query_as(AssertSqlSafe(format!(
            "SELECT device_id, sent_at, updated FROM rollout_devices
              WHERE rollout_id = $1 AND status IN ({})",
            DeviceStep::sql_list(DeviceStep::in_flight)
        )))
        .bind(id)
        .fetch_all(&self.reads)
        .await?;
        Ok(rows
            .into_iter()
            .map(|(device_id, sent_at, updated)| InFlight {
                device_id,
                sent_at,
                updated,
            })
            .collect())
    }

    /// Sets a rollout's state (and why).
    pub async fn set_rollout_state(
        &self,
        id: i64,
        state: RolloutState,
        reason: Option<&str>,
    ) -> Result<()> {
        sqlx::query("UPDATE rollouts SET state = $2, reason = $3, updated = $4 WHERE id = $1")
            .bind(id)
            .bind(state.as_str())
            .bind(reason)
            .bind(now())
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    /// Sends a release to a device: its new desired state and its step
    /// (`sent`, or `reverting` for the revert), together, so a restart never
    /// sends it twice or loses it.
    pub async fn send_rollout_device(
        &self,
        id: i64,
        device: &str,
        step: DeviceStep,
        desired: &str,
    ) -> Result<bool> {
        let mut tx = self.pool.begin().await?;
        if !current_step(&mut tx, self.backend, id, device)
            .await?
            .is_some_and(|c| c.can_move_to(step))
        {
            return Ok(false);
        }
        let time = now();
        let service: String = sqlx::query_scalar("SELECT service FROM rollouts WHERE id = $1")
            .bind(id)
            .fetch_one(&mut *tx)
            .await?;
        set_desired(&mut tx, device, desired, &service, &format!("rollout {id}")).await?;
        sqlx::query(
            "UPDATE rollout_devices SET status = $3, reason = NULL, sent_at = $4, updated = $4
             WHERE rollout_id = $1 AND device_id = $2",
        )
        .bind(id)
        .bind(device)
        .bind(step.as_str())
        .bind(&time)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(true)
    }

    /// Moves a device to `step` (from its reports, or a timeout) when
    /// [`DeviceStep::can_move_to`] allows; returns whether it moved.
    pub async fn set_rollout_device(
        &self,
        id: i64,
        device: &str,
        step: DeviceStep,
        reason: Option<&str>,
    ) -> Result<bool> {
        let mut tx = self.pool.begin().await?;
        if !current_step(&mut tx, self.backend, id, device)
            .await?
            .is_some_and(|c| c.can_move_to(step))
        {
            return Ok(false);
        }
        sqlx::query(
            "UPDATE rollout_devices SET status = $3, reason = $4, updated = $5
             WHERE rollout_id = $1 AND device_id = $2",
        )
        .bind(id)
        .bind(device)
        .bind(step.as_str())
        .bind(reason)
        .bind(now())
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(true)
    }

    /// A device's report about `release` (service, version) under a rollout
    /// label, as the step it means: counted only when that rollout is about
    /// that release or its revert (a device's desired state carries one
    /// label for all its services).
    pub async fn report_rollout_device(
        &self,
        id: i64,
        device: &str,
        release: (&str, &str),
        outcome: Option<(DeviceStep, Option<&str>)>,
    ) -> Result<bool> {
        // Only the rollout's head: this runs for every progress event, and a
        // rollout's device list can be the whole fleet.
        let head: Option<(String, String, String)> =
            sqlx::query_as("SELECT service, version, plan FROM rollouts WHERE id = $1")
                .bind(id)
                .fetch_optional(&self.reads)
                .await?;
        let Some((service, version, plan)) = head else {
            return Ok(false);
        };
        if service != release.0 {
            return Ok(false);
        }
        let plan: Plan = serde_json::from_str(&plan)?;
        let (step, reason) = if version == release.1 {
            outcome.unwrap_or((DeviceStep::Installing, None))
        } else if plan.revert_to.as_deref() == Some(release.1) {
            match outcome {
                None => return Ok(false),
                Some((DeviceStep::Installed, _)) => (DeviceStep::Reverted, None),
                Some((_, reason)) => (DeviceStep::RevertFailed, reason),
            }
        } else {
            return Ok(false);
        };
        self.set_rollout_device(id, device, step, reason).await
    }
}

/// A count as SQL takes it (a `LIMIT`), saturating.
fn as_sql_count(n: usize) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

/// Adds `devices` to rollout `id` as pending, from `position` on; one
/// already in it keeps its place and step.
async fn insert_rollout_devices(
    tx: &mut AnyConnection,
    id: i64,
    position: i64,
    devices: &[String],
    time: &str,
) -> Result<()> {
    let mut position = position;
    for device in devices {
        let added = sqlx::query(
            "INSERT INTO rollout_devices (rollout_id, device_id, position, status, updated)
             VALUES ($1, $2, $3, 'pending', $4) ON CONFLICT DO NOTHING",
        )
        .bind(id)
        .bind(device)
        .bind(position)
        .bind(time)
        .execute(&mut *tx)
        .await?;
        position += added.rows_affected() as i64;
    }
    Ok(())
}
