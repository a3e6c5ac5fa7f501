//! What the agent tells the world: events as installs progress, and a note
//! whenever the installed state changes (so `reported` is republished).
//!
//! The installer only hands reports to a channel; the MQTT session (or the
//! offline `install` command) decides where they go. Every event is also
//! logged.

use ferry_protocol::Timestamp;
use ferry_protocol::messages::{
    Event, MESSAGE_SCHEMA, Progress, ReleaseRef, Reported, Step, StepStatus,
};
use tokio::sync::mpsc;

/// One thing to report.
#[derive(Debug, Clone)]
pub enum Report {
    /// A step of an install.
    Event(Event),
    /// The installed state changed: the new `reported` message.
    Reported(Reported),
    /// The installed state changed: the reload rules now in force.
    ReloadRules(Vec<crate::reload::ServiceRules>),
}

/// Where the installer sends its reports. Cheap to clone.
#[derive(Debug, Clone)]
pub struct Reporter {
    tx: Option<mpsc::UnboundedSender<Report>>,
}

impl Reporter {
    /// A reporter and the receiving end of its reports.
    pub fn channel() -> (Self, mpsc::UnboundedReceiver<Report>) {
        let (tx, rx) = mpsc::unbounded_channel();
        (Self { tx: Some(tx) }, rx)
    }

    /// A reporter that only logs.
    pub fn log_only() -> Self {
        Self { tx: None }
    }

    /// Reports a step's status.
    pub fn step(
        &self,
        release: Option<&ReleaseRef>,
        rollout: Option<&str>,
        step: Step,
        status: StepStatus,
        reason: Option<String>,
    ) {
        self.event(release, rollout, step, status, None, reason);
    }

    /// Reports that `step` of `release` began.
    pub fn started(&self, release: &ReleaseRef, rollout: Option<&str>, step: Step) {
        self.step(Some(release), rollout, step, StepStatus::Started, None);
    }

    /// Reports that `step` of `release` finished.
    pub fn succeeded(&self, release: &ReleaseRef, rollout: Option<&str>, step: Step) {
        self.step(Some(release), rollout, step, StepStatus::Succeeded, None);
    }

    /// Reports that `step` of `release` failed, and why.
    pub fn failed(&self, release: &ReleaseRef, rollout: Option<&str>, step: Step, reason: String) {
        self.step(
            Some(release),
            rollout,
            step,
            StepStatus::Failed,
            Some(reason),
        );
    }

    /// Reports how far a long step has got.
    pub fn progress(
        &self,
        release: &ReleaseRef,
        rollout: Option<&str>,
        step: Step,
        done: u64,
        total: u64,
    ) {
        let progress = Progress {
            done,
            total: Some(total),
        };
        self.event(
            Some(release),
            rollout,
            step,
            StepStatus::Progress,
            Some(progress),
            None,
        );
    }

    /// Hands on the new `reported` message and reload rules after a state change.
    pub fn state(&self, reported: Reported, rules: Vec<crate::reload::ServiceRules>) {
        if let Some(tx) = &self.tx {
            let _ = tx.send(Report::Reported(reported));
            let _ = tx.send(Report::ReloadRules(rules));
        }
    }

    /// Sends a new `reported` message when only it changed (no new rules).
    pub fn reported(&self, reported: Reported) {
        if let Some(tx) = &self.tx {
            let _ = tx.send(Report::Reported(reported));
        }
    }

    fn event(
        &self,
        release: Option<&ReleaseRef>,
        rollout: Option<&str>,
        step: Step,
        status: StepStatus,
        progress: Option<Progress>,
        reason: Option<String>,
    ) {
        let name =
            release.map(|r| format!("{} {} (sequence {})", r.service, r.version, r.sequence));
        let name = name.as_deref().unwrap_or("release");
        match (&status, &reason) {
            (StepStatus::Failed, Some(reason)) => {
                tracing::warn!(release = name, step = ?step, "{reason}");
            }
            (StepStatus::Progress, _) => {
                tracing::debug!(release = name, step = ?step, done = progress.map(|p| p.done), "progress");
            }
            _ => tracing::info!(release = name, step = ?step, status = ?status, "install step"),
        }
        if let Some(tx) = &self.tx {
            let _ = tx.send(Report::Event(Event {
                schema: MESSAGE_SCHEMA,
                time: Timestamp::from(std::time::SystemTime::now()),
                rollout: rollout.map(str::to_owned),
                release: release.cloned(),
                step,
                status,
                progress,
                reason,
            }));
        }
    }
}
