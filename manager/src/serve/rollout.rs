//! The rollout engine: staged deployments that stop themselves.
//!
//! A rollout takes its devices in a fixed order: first a canary count, then
//! waves that each bring the share of devices reached up to a percentage.
//! A wave starts only when every device of the waves before it has an
//! outcome; within a wave at most `max_in_flight` devices install at once.
//! A device fails by reporting a failed, refused or rolled-back install, or
//! by giving no outcome within the device timeout (an offline device's
//! desired state stays set, so it converges when it returns). When failures
//! cross the threshold the rollout aborts and sends nothing more.
//!
//! The engine keeps no state of its own: each step reads the rollout from
//! the store (counts per step and the few devices it acts on, never the
//! whole device list) and writes what it decided back before acting, so a
//! restarted manager resumes where it was. It steps when a device result
//! arrives and once a second (for timeouts and devices joining the
//! selector).

use std::collections::HashSet;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use ferry_protocol::messages::{Desired, Message};
use ferry_protocol::{Envelope, Timestamp};
use serde::{Deserialize, Serialize};
use tokio::sync::{Notify, mpsc};
use tokio::time::Instant;

use super::desired::deployment_label;
use super::ingest::Outgoing;
use super::store::{DeviceStep, DeviceTags, RolloutHead, RolloutLease, Store, StoreError};

/// Which devices a rollout is for.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Selector {
    /// These devices.
    Devices(Vec<String>),
    /// Every device with this tag, including ones tagged later.
    Tag(String),
    /// Every device, including ones added later.
    All,
}

impl Selector {
    /// The fleet's devices this selector picks, in id order.
    pub fn pick(&self, fleet: &[DeviceTags]) -> Vec<String> {
        fleet
            .iter()
            .filter(|d| match self {
                Self::Devices(ids) => ids.contains(&d.device_id),
                Self::Tag(tag) => d.tags.contains(tag),
                Self::All => true,
            })
            .map(|d| d.device_id.clone())
            .collect()
    }
}

/// How many failures a rollout tolerates.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Threshold {
    /// At most this many failed devices.
    Count(u32),
    /// At most this share (0-100) of the devices sent the release so far.
    Percent(u8),
}

impl Threshold {
    /// Whether `failures` among `attempted` devices crosses it.
    pub fn crossed(self, failures: usize, attempted: usize) -> bool {
        match self {
            Self::Count(n) => failures > n as usize,
            Self::Percent(p) => failures * 100 > usize::from(p) * attempted,
        }
    }
}

impl std::str::FromStr for Threshold {
    type Err = String;
    fn from_str(text: &str) -> Result<Self, String> {
        match text.strip_suffix('%') {
            Some(p) => match p.parse::<u8>() {
                Ok(p) if p <= 100 => Ok(Self::Percent(p)),
                _ => Err(format!("{text:?}: a percentage is 0% to 100%")),
            },
            None => text
                .parse()
                .map(Self::Count)
                .map_err(|_| format!("{text:?}: expected a count (3) or a percentage (20%)")),
        }
    }
}

impl std::fmt::Display for Threshold {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Count(n) => write!(f, "{n}"),
            Self::Percent(p) => write!(f, "{p}%"),
        }
    }
}

impl Serialize for Threshold {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Threshold {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        text.parse().map_err(serde::de::Error::custom)
    }
}

/// What a rollout does, as the operator asked for it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Plan {
    /// Which devices.
    pub selector: Selector,
    /// Devices updated first, alone, before any wave.
    #[serde(default)]
    pub canary: u32,
    /// Cumulative shares of the devices (1-100), ascending; 100 is added
    /// when the last is lower.
    #[serde(default = "default_waves")]
    pub waves: Vec<u8>,
    /// At most this many devices installing at once (none: a wave at once).
    #[serde(default)]
    pub max_in_flight: Option<u32>,
    /// A device with no outcome this long after it was sent counts as failed.
    #[serde(default = "default_timeout")]
    pub device_timeout_secs: u64,
    /// Failures tolerated before the rollout aborts.
    #[serde(default = "default_threshold")]
    pub max_failures: Threshold,
    /// On abort, devices the release reached are sent this version of the
    /// service: a release the operator signed with a higher sequence that
    /// carries the previous code (the manager cannot sign, and devices
    /// never go down in sequence).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub revert_to: Option<String>,
}

fn default_waves() -> Vec<u8> {
    vec![100]
}

fn default_timeout() -> u64 {
    600
}

fn default_threshold() -> Threshold {
    Threshold::Count(0)
}

impl Plan {
    /// Checks the plan and fills in what is implied (a final 100% wave).
    pub fn normalise(mut self) -> Result<Self, String> {
        if self.waves.iter().any(|&w| w == 0 || w > 100) {
            return Err("waves are percentages from 1% to 100%".into());
        }
        if self.waves.windows(2).any(|w| w[0] >= w[1]) {
            return Err("waves must grow (e.g. 10%,50%,100%)".into());
        }
        if self.waves.last() != Some(&100) {
            self.waves.push(100);
        }
        if self.max_in_flight == Some(0) {
            return Err("max in flight must be at least 1".into());
        }
        if self.device_timeout_secs == 0 {
            return Err("the device timeout must be at least 1 second".into());
        }
        Ok(self)
    }

    /// How many devices (in order) each stage covers, cumulatively: the
    /// canary, then each wave. Never more than `total`.
    pub fn stage_ends(&self, total: usize) -> Vec<usize> {
        let mut ends = Vec::new();
        if self.canary > 0 {
            ends.push((self.canary as usize).min(total));
        }
        for &share in &self.waves {
            let end = (usize::from(share) * total).div_ceil(100);
            let floor = ends.last().copied().unwrap_or(0);
            ends.push(end.max(floor).min(total));
        }
        ends
    }
}

/// Where a rollout is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RolloutState {
    /// Sending the release, wave by wave.
    Running,
    /// Sending nothing new until resumed; results still count.
    Paused,
    /// Every device has an outcome and the threshold held.
    Completed,
    /// Stopped: by the operator or by the failure threshold.
    Aborted,
}

impl RolloutState {
    /// The text stored and shown.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Running => "running",
            Self::Paused => "paused",
            Self::Completed => "completed",
            Self::Aborted => "aborted",
        }
    }

    /// Reads the stored text.
    pub fn parse(text: &str) -> Self {
        match text {
            "paused" => Self::Paused,
            "completed" => Self::Completed,
            "aborted" => Self::Aborted,
            _ => Self::Running,
        }
    }
}

/// What the engine needs to send releases.
#[derive(Clone)]
pub struct Engine {
    /// The database.
    pub store: Arc<Store>,
    /// Desired-state messages for the MQTT client.
    pub outgoing: mpsc::UnboundedSender<Outgoing>,
    /// How devices reach the artifact store.
    pub public_url: Arc<String>,
    /// Rung when something happened that a rollout may act on.
    pub wake: Arc<Notify>,
    /// Bumped whenever the fleet's picture changes (the dashboard's live updates).
    pub changes: Arc<tokio::sync::watch::Sender<u64>>,
    /// 1 while this replica leads ([`RolloutLease`]).
    pub leader: prometheus::IntGauge,
    /// When each device in flight was last sent its desired state again.
    pub nudged: Arc<std::sync::Mutex<std::collections::HashMap<String, Instant>>>,
}

/// How long a device in flight may be silent before it is sent its desired
/// state again, which has it report again: its report may have been lost
/// in the broker (a cluster's server failing over), and it would otherwise
/// sit until its timeout.
const NUDGE_AFTER: Duration = Duration::from_secs(30);

/// The label devices carry back in their results.
pub fn label(id: i64) -> String {
    format!("rollout-{id}")
}

/// The rollout a label names.
pub fn rollout_id(label: Option<&str>) -> Option<i64> {
    label?.strip_prefix("rollout-")?.parse().ok()
}

impl Engine {
    /// Tells live views that something changed.
    pub fn changed(&self) {
        self.changes.send_modify(|n| *n = n.wrapping_add(1));
    }

    /// Steps every open rollout when woken, and every second. A wake is
    /// acted on at once, but woken steps come at most every `COALESCE`:
    /// results arriving together wait for the next one, so a fleet
    /// reporting at once costs a few steps a second, not one per device.
    /// Joining devices and timeouts, which need the fleet and the clock
    /// rather than a result, are looked at once a second however often it
    /// is woken.
    pub async fn run(self) {
        const COALESCE: Duration = Duration::from_millis(100);
        const FULL_EVERY: Duration = Duration::from_secs(1);
        let mut last_full: Option<Instant> = None;
        let mut last_woken: Option<Instant> = None;
        let mut woken = false;
        let mut lease = RolloutLease::default();
        loop {
            if woken {
                if let Some(at) = last_woken {
                    tokio::time::sleep_until(at + COALESCE).await;
                }
                last_woken = Some(Instant::now());
            }
            let full = last_full.is_none_or(|at| at.elapsed() >= FULL_EVERY);
            if full {
                last_full = Some(Instant::now());
            }
            // Another replica may lead; this one asks again each tick.
            let leads = lease.lead(&self.store).await;
            self.leader.set(i64::from(leads));
            if lease.taken_over() {
                self.resend_all().await;
            }
            if leads {
                if let Err(e) = self.step_all(full).await {
                    tracing::warn!("rollouts: {e}");
                }
                if full {
                    if let Err(e) = self.nudge_deployments().await {
                        tracing::warn!("deployments: {e}");
                    }
                }
            }
            woken = tokio::select! {
                () = self.wake.notified() => true,
                () = tokio::time::sleep(FULL_EVERY) => false,
            };
        }
    }

    /// Sends every device its desired state again. A replica that led
    /// before this one may have died after recording a send and before the
    /// broker had it; the state is the whole of what a device should run,
    /// so sending it again is harmless, and its newest copy is all that
    /// counts.
    async fn resend_all(&self) {
        match self.store.all_desired().await {
            Ok(all) => {
                tracing::info!(devices = all.len(), "sending every desired state again");
                for (device, payload) in all {
                    let _ = self.outgoing.send(Outgoing {
                        device,
                        payload: payload.into_bytes(),
                    });
                }
            }
            Err(e) => tracing::warn!("cannot read desired states to send again: {e}"),
        }
    }

    /// One step of every open rollout; `full` also takes in devices that
    /// joined the selector and times out devices without an outcome.
    pub async fn step_all(&self, full: bool) -> Result<(), StoreError> {
        for rollout in self.store.open_rollout_heads().await? {
            let id = rollout.id;
            if let Err(e) = self.step(rollout, full).await {
                tracing::warn!(rollout = id, "rollout step: {e}");
            }
        }
        Ok(())
    }

    /// One step of a rollout. It reads counts and the few devices it acts
    /// on, never the whole device list: it runs several times a second,
    /// and the list can be the whole fleet.
    async fn step(&self, rollout: RolloutHead, full: bool) -> Result<(), StoreError> {
        let id = rollout.id;
        if full {
            self.join_and_time_out(&rollout).await?;
        }
        let counts = self.store.rollout_step_counts(id).await?;
        let failures = counts.of(DeviceStep::is_failure);
        let attempted = counts.of(|s| s != DeviceStep::Pending);
        if rollout.plan.max_failures.crossed(failures, attempted) {
            let reason = format!(
                "{failures} of {attempted} devices failed, over the threshold of {}",
                rollout.plan.max_failures
            );
            return self.abort(&rollout, &reason).await;
        }
        if rollout.state != RolloutState::Running {
            return Ok(());
        }

        // The first stage with a device that has no outcome is the one in
        // progress; every stage before it is settled.
        let ends = rollout.plan.stage_ends(counts.total());
        let first_unsettled = self.store.first_unsettled(id).await?;
        let Some(&end) = first_unsettled.and_then(|first| ends.iter().find(|&&end| end > first))
        else {
            tracing::info!(rollout = id, "completed");
            self.store
                .set_rollout_state(id, RolloutState::Completed, None)
                .await?;
            self.changed();
            return Ok(());
        };
        let in_flight = counts.of(DeviceStep::in_flight);
        let room = rollout
            .plan
            .max_in_flight
            .map_or(usize::MAX, |max| (max as usize).saturating_sub(in_flight));
        if room == 0 {
            return Ok(());
        }
        let to_send = self.store.pending_among_first(id, end, room).await?;
        if to_send.is_empty() {
            return Ok(());
        }
        let Some((envelope, url)) = self.release(&rollout.service, &rollout.version).await? else {
            return self
                .abort(&rollout, "its release is no longer published")
                .await;
        };
        for device in &to_send {
            self.send(id, device, DeviceStep::Sent, &envelope, &url)
                .await?;
        }
        Ok(())
    }

    /// Adds the devices that joined the selector (at the end), times out
    /// devices sent the release too long ago, and sends devices in flight
    /// and silent for [`NUDGE_AFTER`] their desired state again.
    async fn join_and_time_out(&self, rollout: &RolloutHead) -> Result<(), StoreError> {
        let fleet = self.store.device_tags().await?;
        let known = self.store.rollout_device_ids(rollout.id).await?;
        let known: HashSet<&str> = known.iter().map(String::as_str).collect();
        let joined: Vec<String> = rollout
            .plan
            .selector
            .pick(&fleet)
            .into_iter()
            .filter(|id| !known.contains(id.as_str()))
            .collect();
        if !joined.is_empty() {
            tracing::info!(rollout = rollout.id, ?joined, "devices joined the rollout");
            self.store.add_rollout_devices(rollout.id, &joined).await?;
        }
        let in_flight = self.store.in_flight(rollout.id).await?;
        let silent = Timestamp::from(SystemTime::now() - NUDGE_AFTER).to_string();
        let label = label(rollout.id);
        self.send_again(
            in_flight
                .iter()
                .filter(|d| d.updated.as_str() < silent.as_str())
                .map(|d| (d.device_id.clone(), label.clone())),
        )
        .await?;
        let timeout = Duration::from_secs(rollout.plan.device_timeout_secs);
        let cutoff = Timestamp::from(SystemTime::now() - timeout).to_string();
        for device in &in_flight {
            if device
                .sent_at
                .as_deref()
                .is_some_and(|sent| sent < cutoff.as_str())
            {
                self.store
                    .set_rollout_device(
                        rollout.id,
                        &device.device_id,
                        DeviceStep::TimedOut,
                        Some(&format!("no outcome within {}s", timeout.as_secs())),
                    )
                    .await?;
            }
        }
        Ok(())
    }

    /// Sends online devices that have said nothing of a deployment for
    /// [`NUDGE_AFTER`] since it started their desired state again: a desired
    /// state the broker failed to deliver (or keep) would otherwise leave
    /// them waiting for good.
    async fn nudge_deployments(&self) -> Result<(), StoreError> {
        let silent = Timestamp::from(SystemTime::now() - NUDGE_AFTER).to_string();
        let due = self.store.silent_deployment_devices(&silent).await?;
        self.send_again(
            due.into_iter()
                .map(|(device, deployment)| (device, deployment_label(deployment))),
        )
        .await
    }

    /// Sends each `(device, label)` its desired state again, at most once
    /// per [`NUDGE_AFTER`] each, if that state is still the one `label` set.
    /// The agent acts on a desired state it already has only by reporting
    /// again, so a copy it did get costs one message each way.
    async fn send_again(
        &self,
        devices: impl IntoIterator<Item = (String, String)>,
    ) -> Result<(), StoreError> {
        let due: Vec<(String, String)> = {
            let mut nudged = self.nudged.lock().unwrap_or_else(|p| p.into_inner());
            nudged.retain(|_, at| at.elapsed() < NUDGE_AFTER);
            devices
                .into_iter()
                .filter(|(device, _)| {
                    let first = !nudged.contains_key(device);
                    if first {
                        nudged.insert(device.clone(), Instant::now());
                    }
                    first
                })
                .collect()
        };
        for (device, label) in due {
            let Some(payload) = self.store.desired(&device).await? else {
                continue;
            };
            let current = Desired::decode(payload.as_bytes())
                .is_ok_and(|d| d.rollout.as_deref() == Some(label.as_str()));
            if !current {
                continue;
            }
            tracing::debug!(device, label, "no word: desired state sent again");
            let _ = self.outgoing.send(Outgoing {
                device,
                payload: payload.into_bytes(),
            });
        }
        Ok(())
    }

    /// Stops a rollout: nothing more is sent, and with a revert release the
    /// devices it reached are sent that. The reverts are recorded before the
    /// state, so a crash in between aborts (and reverts) again on restart.
    pub async fn abort(&self, rollout: &RolloutHead, reason: &str) -> Result<(), StoreError> {
        tracing::warn!(rollout = rollout.id, "aborting: {reason}");
        if let Some(revert) = &rollout.plan.revert_to {
            match self.release(&rollout.service, revert).await? {
                Some((envelope, url)) => {
                    let devices = self
                        .store
                        .rollout(rollout.id)
                        .await?
                        .map(|r| r.devices)
                        .unwrap_or_default();
                    for device in devices.iter().filter(|d| d.status.needs_revert()) {
                        self.send(
                            rollout.id,
                            &device.device_id,
                            DeviceStep::Reverting,
                            &envelope,
                            &url,
                        )
                        .await?;
                    }
                }
                None => tracing::error!(rollout = rollout.id, revert, "the revert release is gone"),
            }
        }
        self.store
            .set_rollout_state(rollout.id, RolloutState::Aborted, Some(reason))
            .await?;
        self.changed();
        Ok(())
    }

    /// A published release's envelope and artifact URL.
    async fn release(
        &self,
        service: &str,
        version: &str,
    ) -> Result<Option<(Envelope, String)>, StoreError> {
        let Some(release) = self.store.release(service, version).await? else {
            return Ok(None);
        };
        let envelope = Envelope::from_json(release.envelope.as_bytes())
            .map_err(|e| StoreError::Invalid(e.to_string()))?;
        let url = format!("{}/v1/artifacts/{}", self.public_url, release.sha256);
        Ok(Some((envelope, url)))
    }

    /// Puts `envelope` in a device's desired state and moves it to `step`.
    async fn send(
        &self,
        id: i64,
        device: &str,
        step: DeviceStep,
        envelope: &Envelope,
        url: &str,
    ) -> Result<(), StoreError> {
        let payload =
            super::desired::with_release(&self.store, device, envelope, url, &label(id)).await?;
        // Recorded first: after a crash the retained desired state is
        // republished on restart, and the device is never sent it again.
        if self
            .store
            .send_rollout_device(id, device, step, &payload)
            .await?
        {
            let _ = self.outgoing.send(Outgoing {
                device: device.to_owned(),
                payload: payload.into_bytes(),
            });
            tracing::info!(rollout = id, device, step = step.as_str(), "sent");
            self.changed();
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn plan(canary: u32, waves: &[u8]) -> Plan {
        Plan {
            selector: Selector::All,
            canary,
            waves: waves.to_vec(),
            max_in_flight: None,
            device_timeout_secs: 60,
            max_failures: Threshold::Count(0),
            revert_to: None,
        }
        .normalise()
        .unwrap()
    }

    #[test]
    fn stages_cover_the_canary_then_each_waves_share() {
        assert_eq!(plan(1, &[10, 50, 100]).stage_ends(10), vec![1, 1, 5, 10]);
        assert_eq!(plan(0, &[10, 50]).stage_ends(10), vec![1, 5, 10]);
        assert_eq!(plan(0, &[]).stage_ends(3), vec![3]);
        // Shares round up: 10% of 3 devices is 1 device, not 0.
        assert_eq!(plan(0, &[10, 100]).stage_ends(3), vec![1, 3]);
        // A canary larger than the fleet is the fleet.
        assert_eq!(plan(5, &[100]).stage_ends(2), vec![2, 2]);
    }

    #[test]
    fn thresholds_parse_and_trip_past_their_value() {
        assert_eq!("3".parse(), Ok(Threshold::Count(3)));
        assert_eq!("20%".parse(), Ok(Threshold::Percent(20)));
        assert!("120%".parse::<Threshold>().is_err());
        assert!("many".parse::<Threshold>().is_err());
        assert!(!Threshold::Count(1).crossed(1, 10));
        assert!(Threshold::Count(1).crossed(2, 10));
        assert!(Threshold::Count(0).crossed(1, 1));
        assert!(!Threshold::Percent(20).crossed(1, 5));
        assert!(Threshold::Percent(20).crossed(2, 5));
    }

    #[test]
    fn bad_plans_are_refused() {
        let mut p = plan(0, &[]);
        p.waves = vec![50, 10];
        assert!(p.clone().normalise().is_err());
        p.waves = vec![0];
        assert!(p.clone().normalise().is_err());
        p.waves = vec![100];
        p.max_in_flight = Some(0);
        assert!(p.normalise().is_err());
    }
}
