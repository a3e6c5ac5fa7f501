//! Rollouts as stored: the plan, the state, and each device's step.
//!
//! Everything the rollout engine decides from is here, so a restarted
//! manager picks a rollout up where it was: a device whose status is past
//! `pending` has been sent the release and is never sent it again.

use rusqlite::{OptionalExtension, params};
use serde::Serialize;

use super::{Result, Store, now, set_desired};
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

    fn parse(text: &str) -> Self {
        match text {
            "sent" => Self::Sent,
            "installing" => Self::Installing,
            "installed" => Self::Installed,
            "rejected" => Self::Rejected,
            "failed" => Self::Failed,
            "rolled_back" => Self::RolledBack,
            "timed_out" => Self::TimedOut,
            "reverting" => Self::Reverting,
            "reverted" => Self::Reverted,
            "revert_failed" => Self::RevertFailed,
            _ => Self::Pending,
        }
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

/// A rollout as stored.
#[derive(Debug, Clone, Serialize)]
pub struct RolloutRow {
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
    /// Its devices, in order.
    pub devices: Vec<RolloutDevice>,
}

/// A device's step in a rollout, read inside the transaction that changes it.
fn current_step(
    tx: &rusqlite::Transaction<'_>,
    id: i64,
    device: &str,
) -> Result<Option<DeviceStep>> {
    Ok(tx
        .query_row(
            "SELECT status FROM rollout_devices WHERE rollout_id = ?1 AND device_id = ?2",
            params![id, device],
            |r| r.get::<_, String>(0),
        )
        .optional()?
        .map(|s| DeviceStep::parse(&s)))
}

impl Store {
    /// Records a new rollout over `devices` (in order); returns its id.
    pub fn add_rollout(
        &self,
        service: &str,
        version: &str,
        plan: &Plan,
        devices: &[String],
    ) -> Result<i64> {
        let mut db = self.db();
        let tx = db.transaction()?;
        let time = now();
        tx.execute(
            "INSERT INTO rollouts (service, version, plan, state, created, updated)
             VALUES (?1, ?2, ?3, 'running', ?4, ?4)",
            params![service, version, serde_json::to_string(plan)?, time],
        )?;
        let id = tx.last_insert_rowid();
        for (position, device) in devices.iter().enumerate() {
            tx.execute(
                "INSERT INTO rollout_devices (rollout_id, device_id, position, status, updated)
                 VALUES (?1, ?2, ?3, 'pending', ?4)",
                params![id, device, position as i64, time],
            )?;
        }
        tx.commit()?;
        Ok(id)
    }

    /// Adds devices that joined the selector, after the existing ones.
    pub fn add_rollout_devices(&self, id: i64, devices: &[String]) -> Result<()> {
        let mut db = self.db();
        let tx = db.transaction()?;
        let next: i64 = tx.query_row(
            "SELECT COALESCE(MAX(position) + 1, 0) FROM rollout_devices WHERE rollout_id = ?1",
            [id],
            |r| r.get(0),
        )?;
        let time = now();
        for (offset, device) in devices.iter().enumerate() {
            tx.execute(
                "INSERT OR IGNORE INTO rollout_devices (rollout_id, device_id, position, status, updated)
                 VALUES (?1, ?2, ?3, 'pending', ?4)",
                params![id, device, next + offset as i64, time],
            )?;
        }
        tx.commit()?;
        Ok(())
    }

    /// Every rollout, newest first.
    pub fn rollouts(&self) -> Result<Vec<RolloutRow>> {
        let ids: Vec<i64> = {
            let db = self.db();
            let mut stmt = db.prepare("SELECT id FROM rollouts ORDER BY id DESC")?;
            stmt.query_map([], |r| r.get(0))?
                .collect::<std::result::Result<_, _>>()?
        };
        let mut out = Vec::new();
        for id in ids {
            if let Some(rollout) = self.rollout(id)? {
                out.push(rollout);
            }
        }
        Ok(out)
    }

    /// Rollouts that are running or paused.
    pub fn open_rollouts(&self) -> Result<Vec<RolloutRow>> {
        // Only open ones are read: the engine asks every second, and
        // finished rollouts pile up.
        let ids: Vec<i64> = {
            let db = self.db();
            let mut stmt = db.prepare(
                "SELECT id FROM rollouts WHERE state IN ('running', 'paused') ORDER BY id DESC",
            )?;
            stmt.query_map([], |r| r.get(0))?
                .collect::<std::result::Result<_, _>>()?
        };
        let mut out = Vec::new();
        for id in ids {
            if let Some(rollout) = self.rollout(id)? {
                out.push(rollout);
            }
        }
        Ok(out)
    }

    /// One rollout with its devices.
    pub fn rollout(&self, id: i64) -> Result<Option<RolloutRow>> {
        let db = self.db();
        let head = db
            .query_row(
                "SELECT service, version, plan, state, reason, created, updated FROM rollouts WHERE id = ?1",
                [id],
                |r| {
                    Ok((
                        r.get::<_, String>(0)?,
                        r.get::<_, String>(1)?,
                        r.get::<_, String>(2)?,
                        r.get::<_, String>(3)?,
                        r.get::<_, Option<String>>(4)?,
                        r.get::<_, String>(5)?,
                        r.get::<_, String>(6)?,
                    ))
                },
            )
            .optional()?;
        let Some((service, version, plan, state, reason, created, updated)) = head else {
            return Ok(None);
        };
        let mut stmt = db.prepare(
            "SELECT device_id, position, status, reason, sent_at, updated FROM rollout_devices
             WHERE rollout_id = ?1 ORDER BY position",
        )?;
        let devices = stmt
            .query_map([id], |r| {
                Ok(RolloutDevice {
                    device_id: r.get(0)?,
                    position: r.get(1)?,
                    status: DeviceStep::parse(&r.get::<_, String>(2)?),
                    reason: r.get(3)?,
                    sent_at: r.get(4)?,
                    updated: r.get(5)?,
                })
            })?
            .collect::<std::result::Result<_, _>>()?;
        Ok(Some(RolloutRow {
            id,
            service,
            version,
            plan: serde_json::from_str(&plan)?,
            state: RolloutState::parse(&state),
            reason,
            created,
            updated,
            devices,
        }))
    }

    /// Sets a rollout's state (and why).
    pub fn set_rollout_state(
        &self,
        id: i64,
        state: RolloutState,
        reason: Option<&str>,
    ) -> Result<()> {
        self.db().execute(
            "UPDATE rollouts SET state = ?2, reason = ?3, updated = ?4 WHERE id = ?1",
            params![id, state.as_str(), reason, now()],
        )?;
        Ok(())
    }

    /// Sends a release to a device: its new desired state and its step
    /// (`sent`, or `reverting` for the revert), together, so a restart never
    /// sends it twice or loses it.
    pub fn send_rollout_device(
        &self,
        id: i64,
        device: &str,
        step: DeviceStep,
        desired: &str,
    ) -> Result<bool> {
        let mut db = self.db();
        let tx = db.transaction()?;
        if !current_step(&tx, id, device)?.is_some_and(|c| c.can_move_to(step)) {
            return Ok(false);
        }
        let time = now();
        let service: String =
            tx.query_row("SELECT service FROM rollouts WHERE id = ?1", [id], |r| {
                r.get(0)
            })?;
        set_desired(&tx, device, desired, &service, &format!("rollout {id}"))?;
        tx.execute(
            "UPDATE rollout_devices SET status = ?3, reason = NULL, sent_at = ?4, updated = ?4
             WHERE rollout_id = ?1 AND device_id = ?2",
            params![id, device, step.as_str(), time],
        )?;
        tx.commit()?;
        Ok(true)
    }

    /// Moves a device to `step` (from its reports, or a timeout) when
    /// [`DeviceStep::can_move_to`] allows; returns whether it moved.
    pub fn set_rollout_device(
        &self,
        id: i64,
        device: &str,
        step: DeviceStep,
        reason: Option<&str>,
    ) -> Result<bool> {
        let mut db = self.db();
        let tx = db.transaction()?;
        if !current_step(&tx, id, device)?.is_some_and(|c| c.can_move_to(step)) {
            return Ok(false);
        }
        tx.execute(
            "UPDATE rollout_devices SET status = ?3, reason = ?4, updated = ?5
             WHERE rollout_id = ?1 AND device_id = ?2",
            params![id, device, step.as_str(), reason, now()],
        )?;
        tx.commit()?;
        Ok(true)
    }

    /// A device's report about `release` (service, version) under a rollout
    /// label, as the step it means: counted only when that rollout is about
    /// that release or its revert (a device's desired state carries one
    /// label for all its services).
    pub fn report_rollout_device(
        &self,
        id: i64,
        device: &str,
        release: (&str, &str),
        outcome: Option<(DeviceStep, Option<&str>)>,
    ) -> Result<bool> {
        // Only the rollout's head: this runs for every progress event, and a
        // rollout's device list can be the whole fleet.
        let head = self
            .db()
            .query_row(
                "SELECT service, version, plan FROM rollouts WHERE id = ?1",
                [id],
                |r| {
                    Ok((
                        r.get::<_, String>(0)?,
                        r.get::<_, String>(1)?,
                        r.get::<_, String>(2)?,
                    ))
                },
            )
            .optional()?;
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
        self.set_rollout_device(id, device, step, reason)
    }
}
