//! Hot reload: watched paths per service, and what to do when they change.
//!
//! A release's manifest lists reload rules (`paths`, `action`, `debounce_ms`).
//! Paths are absolute, or relative to the service's `current` release. The
//! parent directory of each path is watched, so a file replaced by rename
//! (as editors and config tools do) is seen too. Changes within a rule's
//! debounce window are acted on once, when the window has passed quietly.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use ferry_protocol::ServiceName;
use ferry_protocol::manifest::{ReloadAction, ReloadRule};
use notify::{RecommendedWatcher, RecursiveMode, Watcher};
use tokio::sync::mpsc;
use tokio::time::Instant;

use crate::supervisor::{Supervisor, SupervisorError};

/// The reload rules of one installed service.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServiceRules {
    /// The service.
    pub service: ServiceName,
    /// Its `current` link, which relative paths start from.
    pub current: PathBuf,
    /// Its rules.
    pub rules: Vec<ReloadRule>,
}

struct Rule {
    service: ServiceName,
    paths: Vec<PathBuf>,
    action: ReloadAction,
    debounce: Duration,
}

/// Watches the paths of every rule and schedules their actions.
pub struct Reloader {
    watcher: Option<RecommendedWatcher>,
    events: mpsc::UnboundedSender<PathBuf>,
    rules: Vec<Rule>,
    /// Rule index → when its action is due.
    pending: HashMap<usize, Instant>,
}

impl Reloader {
    /// A reloader with no rules, and the stream of changed paths it needs
    /// fed back into [`Reloader::changed`].
    pub fn new() -> (Self, mpsc::UnboundedReceiver<PathBuf>) {
        let (events, rx) = mpsc::unbounded_channel();
        (
            Self {
                watcher: None,
                events,
                rules: Vec::new(),
                pending: HashMap::new(),
            },
            rx,
        )
    }

    /// Replaces the rules (after an install) and re-watches their paths.
    pub fn set_rules(&mut self, services: &[ServiceRules]) {
        self.pending.clear();
        self.rules = services
            .iter()
            .flat_map(|s| {
                s.rules.iter().map(|r| Rule {
                    service: s.service.clone(),
                    paths: r.paths.iter().map(|p| s.current.join(p)).collect(),
                    action: r.action.clone(),
                    debounce: Duration::from_millis(u64::from(r.debounce_ms)),
                })
            })
            .collect();
        self.watcher = None;
        if self.rules.is_empty() {
            return;
        }
        let events = self.events.clone();
        let watcher = notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
            if let Ok(event) = event {
                if !crate::watch::is_change(&event) {
                    return;
                }
                for path in event.paths {
                    let _ = events.send(path);
                }
            }
        });
        let mut watcher = match watcher {
            Ok(w) => w,
            Err(e) => {
                tracing::warn!("cannot watch reload paths: {e}");
                return;
            }
        };
        for rule in &self.rules {
            for path in &rule.paths {
                let dir = if path.is_dir() {
                    path.as_path()
                } else {
                    path.parent().unwrap_or(path)
                };
                if let Err(e) = watcher.watch(dir, RecursiveMode::Recursive) {
                    tracing::warn!(service = %rule.service, path = %path.display(), "cannot watch: {e}");
                }
            }
        }
        self.watcher = Some(watcher);
    }

    /// Notes a changed path; a matching rule's action becomes due after its
    /// debounce window.
    pub fn changed(&mut self, path: &Path) {
        let now = Instant::now();
        for (index, rule) in self.rules.iter().enumerate() {
            if rule.paths.iter().any(|p| matches(p, path)) {
                self.pending.insert(index, now + rule.debounce);
            }
        }
    }

    /// When the next action is due.
    pub fn next_due(&self) -> Option<Instant> {
        self.pending.values().min().copied()
    }

    /// Takes the actions that are due.
    pub fn take_due(&mut self) -> Vec<(ServiceName, ReloadAction)> {
        let now = Instant::now();
        let due: Vec<usize> = self
            .pending
            .iter()
            .filter(|(_, at)| **at <= now)
            .map(|(i, _)| *i)
            .collect();
        due.into_iter()
            .filter_map(|i| {
                self.pending.remove(&i);
                self.rules
                    .get(i)
                    .map(|r| (r.service.clone(), r.action.clone()))
            })
            .collect()
    }
}

/// Whether a change at `changed` concerns the watched `path` (the path
/// itself, or something under it when it is a directory). Paths are
/// compared by their canonical form, as watchers report resolved paths.
fn matches(path: &Path, changed: &Path) -> bool {
    let canonical = |p: &Path| {
        p.parent()
            .and_then(|d| d.canonicalize().ok())
            .and_then(|d| p.file_name().map(|n| d.join(n)))
            .unwrap_or_else(|| p.to_owned())
    };
    let (path, changed) = (canonical(path), canonical(changed));
    changed == path || changed.starts_with(&path)
}

/// Carries out a reload action through the supervisor.
pub async fn apply(
    supervisor: &Supervisor,
    service: &ServiceName,
    action: &ReloadAction,
) -> Result<(), SupervisorError> {
    match action {
        ReloadAction::Signal(signal) => {
            supervisor
                .signal(service, crate::supervisor::nix_signal(*signal))
                .await
        }
        ReloadAction::Reload => supervisor.reload(service).await,
        ReloadAction::Restart => supervisor.restart(service).await,
    }
}
