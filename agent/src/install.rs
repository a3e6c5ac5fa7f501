//! The install path, one step at a time:
//!
//! verify → disk check → download (hashing while writing) → hash check →
//! unpack → ELF check → swap → restart → health gate → commit or roll back.
//!
//! Everything before the swap happens in staging places (`downloads/`,
//! `releases/.staging-*`) that nothing runs from, so a failure there leaves
//! the device exactly as it was. From the swap on, each phase is written to
//! the journal before it acts, and [`Installer::recover`] finishes whatever a
//! crash or power loss interrupted.

use std::fs;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::SystemTime;

use ferry_protocol::elf::{ELF_HEADER_LEN, check_elf};
use ferry_protocol::messages::{
    DeploymentResult, MESSAGE_SCHEMA, Outcome, ReleaseRef, Reported, Step, StepStatus,
};
use ferry_protocol::{Checks, Envelope, Manifest, ServiceName, Target, Timestamp, TrustPolicy};

use crate::config::{TransferConfig, Transport};
use crate::durable;
use crate::fetch::http::Credentials;
use crate::fetch::mqtt::BlockLink;
use crate::fetch::{self, FetchError};
use crate::health_gate;
use crate::journal::{self, Entry, MAX_ATTEMPTS, Phase};
use crate::layout::Layout;
use crate::report::Reporter;
use crate::state::{Installed, State, release_ref};
use crate::supervisor::RunAs;
use crate::supervisor::{ServiceSpec, Supervisor};
use crate::unpack::{self, UnpackLimits};

/// The agent's own ceilings, applied on top of each manifest's limits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AgentLimits {
    /// Most bytes any release may unpack to.
    pub max_unpacked_bytes: u64,
    /// Most entries any release may hold.
    pub max_entries: u64,
    /// Space to leave free on the data partition after an install.
    pub reserve_bytes: u64,
}

impl Default for AgentLimits {
    fn default() -> Self {
        Self {
            max_unpacked_bytes: 1 << 30,
            max_entries: 100_000,
            reserve_bytes: 16 << 20,
        }
    }
}

/// Where a release's artifact comes from.
#[derive(Debug, Clone)]
pub enum ArtifactSource {
    /// A local file: the offline `install` command or the inbox.
    File(PathBuf),
    /// The manager, as the desired state names it: HTTP(S) from `url`
    /// where there is one, or MQTT blocks, as the transfer settings say.
    Remote {
        /// The artifact's HTTP(S) URL, if the desired state gives one.
        url: Option<String>,
    },
}

/// One release to install.
#[derive(Debug, Clone)]
pub struct InstallRequest {
    /// The signed envelope.
    pub envelope: Envelope,
    /// Where to get the artifact.
    pub source: ArtifactSource,
    /// The rollout it belongs to.
    pub rollout: Option<String>,
    /// Try a release again even though it failed here before (an operator
    /// installing by hand); desired state never does.
    pub retry_failed: bool,
}

/// A step that failed before the swap.
struct StepError {
    step: Step,
    reason: String,
}

impl StepError {
    fn new(step: Step, reason: impl ToString) -> Self {
        Self {
            step,
            reason: reason.to_string(),
        }
    }
}

/// Everything an install needs, and the committed state it changes.
pub struct Installer {
    layout: Layout,
    policy: TrustPolicy,
    target: Target,
    limits: AgentLimits,
    supervisor: Arc<Supervisor>,
    reporter: Reporter,
    http: reqwest::Client,
    credentials: Option<Credentials>,
    transfer: TransferConfig,
    blocks: Option<BlockLink>,
    passed_env: Vec<(String, String)>,
    isolate_services: bool,
    /// The trust root held, on a device set up with one.
    root: Option<crate::trust_root::HeldRoot>,
    /// The services the device runs (`[trust] services`), kept to apply to
    /// the release keys of every new root.
    services: Option<Vec<ServiceName>>,
    state: State,
    /// When a desired state last arrived that matched what runs here.
    desired_confirmed_at: Option<Timestamp>,
}

/// How the installer is set up.
pub struct InstallerParts {
    /// The data directory's layout.
    pub layout: Layout,
    /// Which keys to believe.
    pub policy: TrustPolicy,
    /// This device's target triple.
    pub target: Target,
    /// The agent's own ceilings.
    pub limits: AgentLimits,
    /// What runs the services (shared with the health reporter).
    pub supervisor: Arc<Supervisor>,
    /// Where reports go.
    pub reporter: Reporter,
    /// The HTTP client for downloads and probes.
    pub http: reqwest::Client,
    /// Credentials for the artifact store.
    pub credentials: Option<Credentials>,
    /// Which transport fetches artifacts, and the MQTT flow control.
    pub transfer: TransferConfig,
    /// Variables of the agent's environment every service also gets
    /// (`pass_env`), with their values.
    pub passed_env: Vec<(String, String)>,
    /// Whether a service whose manifest names no user gets one of its own.
    pub isolate_services: bool,
    /// The trust root held, on a device set up with one (`policy` holds its
    /// release keys).
    pub root: Option<crate::trust_root::HeldRoot>,
    /// The only services the device runs, if the configuration says.
    pub services: Option<Vec<ServiceName>>,
}

impl Installer {
    /// Loads the committed state and prepares the data directory.
    pub fn new(parts: InstallerParts) -> std::io::Result<Self> {
        fs::create_dir_all(parts.layout.root())?;
        fs::create_dir_all(parts.layout.downloads())?;
        let state = State::load(&parts.layout.state_file())?;
        Ok(Self {
            layout: parts.layout,
            policy: parts.policy,
            target: parts.target,
            limits: parts.limits,
            supervisor: parts.supervisor,
            reporter: parts.reporter,
            http: parts.http,
            credentials: parts.credentials,
            transfer: parts.transfer,
            blocks: None,
            passed_env: parts.passed_env,
            isolate_services: parts.isolate_services,
            root: parts.root,
            services: parts.services,
            state,
            desired_confirmed_at: None,
        })
    }

    /// The `reported` message for the committed state.
    pub fn reported(&self) -> Reported {
        Reported {
            schema: MESSAGE_SCHEMA,
            time: Timestamp::from(SystemTime::now()),
            agent_version: crate::VERSION.to_owned(),
            services: self.state.reported_services(),
            last_result: self.state.last_result.clone(),
            desired_confirmed_at: self.desired_confirmed_at,
            root_version: self.root.as_ref().map(|held| held.root.version),
        }
    }

    /// Walks the trust roots `offered` (with a desired state, or from the
    /// inbox) from the one held, one version at a time. Each root accepted
    /// is written durably, then its release keys replace the old ones, and
    /// an event says so; a refused one is reported and changes nothing.
    /// Without a root of its own (`[trust] keys`), a device ignores roots.
    pub fn accept_roots(
        &mut self,
        offered: &[ferry_protocol::root::SignedRoot],
        rollout: Option<&str>,
    ) {
        let Some(held) = &self.root else {
            return;
        };
        let (accepted, refused) = ferry_protocol::root::walk(&held.root, offered);
        let failed = |reason: String| {
            self.reporter
                .step(None, rollout, Step::Trust, StepStatus::Failed, Some(reason));
        };
        for (root, signed) in accepted {
            let policy = match root.release_policy() {
                Ok(policy) => policy,
                Err(e) => return failed(e.to_string()),
            };
            if let Err(e) = crate::trust_root::keep(&self.layout, &signed) {
                // Not kept, not trusted: after a restart the device would
                // be back on the old root.
                return failed(format!(
                    "cannot keep trust root version {}: {e}",
                    root.version
                ));
            }
            let keys: Vec<String> = policy.key_ids().map(ToString::to_string).collect();
            self.policy = crate::config::only_services(policy, self.services.as_deref());
            self.reporter.step(
                None,
                rollout,
                Step::Trust,
                StepStatus::Succeeded,
                Some(format!(
                    "trust root version {} accepted: release keys {} (threshold {})",
                    root.version,
                    keys.join(", "),
                    root.release_threshold
                )),
            );
            tracing::info!(version = root.version, "trust root accepted");
            self.root = Some(crate::trust_root::HeldRoot { root, signed });
            self.publish_state();
        }
        if let Some(e) = refused {
            failed(e.to_string());
        }
    }

    /// Notes that the manager, just now, asked for exactly what this device
    /// runs: every release in `releases` is signed by the trust keys and is
    /// the very manifest installed (its expiry does not matter: it is not
    /// installed again). Reports the time; true when confirmed.
    pub fn confirm_desired(
        &mut self,
        releases: &[ferry_protocol::messages::DesiredRelease],
    ) -> bool {
        let matches = |release: &ferry_protocol::messages::DesiredRelease| {
            self.policy
                .verify_signatures(&release.envelope)
                .is_ok_and(|verified| {
                    self.state
                        .services
                        .get(&verified.manifest.service)
                        .is_some_and(|i| i.manifest.digest() == verified.manifest.digest())
                })
        };
        if releases.is_empty() || !releases.iter().all(matches) {
            return false;
        }
        self.desired_confirmed_at = Some(Timestamp::from(SystemTime::now()));
        self.reporter.reported(self.reported());
        true
    }

    /// Reports the committed state: the `reported` message and the reload
    /// rules of the installed releases.
    pub fn publish_state(&self) {
        let rules = self
            .state
            .services
            .values()
            .filter(|i| !i.manifest.reload.is_empty())
            .map(|i| crate::reload::ServiceRules {
                service: i.manifest.service.clone(),
                current: self.layout.current(&i.manifest.service),
                rules: i.manifest.reload.clone(),
            })
            .collect();
        self.reporter.state(self.reported(), rules);
    }

    /// Where this installer's reports go.
    pub fn reporter(&self) -> &Reporter {
        &self.reporter
    }

    /// The committed state.
    pub fn state(&self) -> &State {
        &self.state
    }

    /// The supervisor running the services.
    pub fn supervisor(&self) -> &Arc<Supervisor> {
        &self.supervisor
    }

    /// The data directory's layout.
    pub fn layout(&self) -> &Layout {
        &self.layout
    }

    /// Gives the installer the MQTT session's block link, for artifacts
    /// over MQTT.
    pub fn set_block_link(&mut self, link: BlockLink) {
        self.blocks = Some(link);
    }

    /// Replaces the trust policy (the agent's config changed).
    pub fn set_policy(&mut self, policy: TrustPolicy) {
        self.policy = policy;
    }

    /// Finishes an install that a crash or power loss interrupted, if any.
    pub async fn recover(&mut self) -> Option<DeploymentResult> {
        let entry = match journal::load(&self.layout.journal_file()) {
            Ok(entry) => entry?,
            Err(e) => {
                // An unreadable journal cannot be acted on; the links and the
                // state file are each consistent on their own, so keep going.
                tracing::error!(error = %e, "journal unreadable; ignoring it");
                let _ = journal::clear(&self.layout.journal_file());
                return None;
            }
        };
        let release = release_ref(&entry.manifest);
        self.reporter.step(
            Some(&release),
            entry.rollout.as_deref(),
            Step::Recover,
            StepStatus::Started,
            Some(format!(
                "an install was interrupted while {:?}",
                entry.phase
            )),
        );
        Some(match entry.phase {
            Phase::Swapping => self.swap_and_gate(entry).await,
            Phase::Committing => self.commit(entry),
            Phase::RollingBack => self.roll_back(entry).await,
        })
    }

    /// Starts every installed service the supervisor is not yet running
    /// (after a restart of the agent under the direct supervisor).
    pub async fn start_installed(&mut self) {
        let services: Vec<Installed> = self.state.services.values().cloned().collect();
        for installed in services {
            let service = &installed.manifest.service;
            let spec = self.spec(&installed.manifest);
            if let Ok(status) = self.supervisor.status(service).await {
                if status.pid.is_some() {
                    continue;
                }
            }
            let started = match self.supervisor.apply(&spec).await {
                Ok(()) => self.supervisor.restart(service).await,
                Err(e) => Err(e),
            };
            if let Err(e) = started {
                tracing::error!(service = %service, error = %e, "cannot start installed service");
            }
        }
    }

    /// Answers a desired release that needs no install, once per rollout:
    /// one already installed (`Installed`), or one that rolled back here
    /// before and is not tried again (`Rejected`). Without an answer the
    /// deployment that asked would wait for one forever. A repeat of the
    /// same question (the desired state delivered again) writes nothing.
    pub fn answer_without_installing(&mut self, manifest: &Manifest, rollout: Option<&str>) {
        let release = release_ref(manifest);
        let answered = self
            .state
            .last_result
            .as_ref()
            .is_some_and(|r| r.release == release && r.rollout.as_deref() == rollout);
        if answered || rollout.is_none() {
            return;
        }
        let (outcome, reason) = if self.state.has_failed(manifest) {
            (
                Outcome::Rejected,
                "this release rolled back on this device before; publish a new sequence to try again",
            )
        } else {
            (Outcome::Installed, "already installed")
        };
        self.conclude(release, rollout, outcome, Some(reason.into()));
    }

    /// Runs the install path for one release and says how it ended. `Err`
    /// only when the envelope is too broken to name a release at all.
    pub async fn install(&mut self, request: InstallRequest) -> Result<DeploymentResult, String> {
        let rollout = request.rollout.as_deref();
        let claimed = request
            .envelope
            .unverified_manifest()
            .ok()
            .map(|m| release_ref(&m));
        self.reporter.step(
            claimed.as_ref(),
            rollout,
            Step::Verify,
            StepStatus::Started,
            None,
        );
        let verified = self.policy.verify(
            &request.envelope,
            &Checks {
                now: SystemTime::now(),
                target: Some(&self.target),
                installed: &self.state,
            },
        );
        let manifest = match verified {
            Ok(release) => release.manifest,
            Err(e) => {
                let reason = e.to_string();
                self.reporter.step(
                    claimed.as_ref(),
                    rollout,
                    Step::Verify,
                    StepStatus::Failed,
                    Some(reason.clone()),
                );
                return match claimed {
                    Some(release) => {
                        Ok(self.conclude(release, rollout, Outcome::Rejected, Some(reason)))
                    }
                    None => Err(reason),
                };
            }
        };
        let release = release_ref(&manifest);
        self.reporter.succeeded(&release, rollout, Step::Verify);

        if let Some(installed) = self.state.services.get(&manifest.service) {
            if installed.manifest.sequence == manifest.sequence
                && installed.manifest.artifact.sha256 == manifest.artifact.sha256
            {
                return Ok(result(
                    release,
                    rollout,
                    Outcome::Installed,
                    Some("already installed".into()),
                ));
            }
        }
        if self.state.has_failed(&manifest) && !request.retry_failed {
            let reason =
                "this release failed on this device before; publish a new sequence to try again";
            return Ok(self.conclude(release, rollout, Outcome::Rejected, Some(reason.into())));
        }

        let new_dir = match self.stage(&manifest, &request.source, rollout).await {
            Ok(dir) => dir,
            Err(StepError { step, reason }) => {
                self.reporter
                    .failed(&release, rollout, step, reason.clone());
                self.forget_if_empty(&manifest.service);
                return Ok(self.conclude(release, rollout, Outcome::Failed, Some(reason)));
            }
        };
        let old_dir = link_target(&self.layout.current(&manifest.service));
        let entry = Entry {
            phase: Phase::Swapping,
            manifest,
            new_dir,
            old_dir,
            rollout: request.rollout.clone(),
            attempts: 0,
            reason: None,
        };
        Ok(self.swap_and_gate(entry).await)
    }

    /// Disk check, fetch, unpack and ELF check: everything that changes
    /// nothing a service runs from. Returns the release directory's name.
    async fn stage(
        &mut self,
        manifest: &Manifest,
        source: &ArtifactSource,
        rollout: Option<&str>,
    ) -> Result<String, StepError> {
        let release = release_ref(manifest);
        let service = &manifest.service;
        let dir_name = manifest.release_dir_name();
        let releases = self.layout.releases(service);
        let dest = releases.join(&dir_name);
        // A release directory is reused only when `current` or `previous`
        // points at it (it was checked when it was installed). One that
        // nothing points at (left by an attempt a crash cut short, or put
        // there by hand) cannot be told apart from one changed since: it is
        // removed and unpacked again from checked bytes.
        let already_unpacked = dest.is_dir() && self.referenced(service, &dir_name);
        if !already_unpacked && fs::symlink_metadata(&dest).is_ok() {
            if let Err(e) = fs::remove_dir_all(&dest).or_else(|_| fs::remove_file(&dest)) {
                return Err(StepError::new(
                    Step::Unpack,
                    format!("cannot clear {}: {e}", dest.display()),
                ));
            }
        }

        // Disk.
        self.reporter.started(&release, rollout, Step::DiskCheck);
        // A local file is unpacked straight from where it is: no copy.
        let streamed = matches!(source, ArtifactSource::File(_))
            && !self
                .layout
                .checked_download(&manifest.artifact.sha256)
                .exists();
        if !already_unpacked {
            self.check_disk(manifest, streamed)?;
        }
        self.reporter.succeeded(&release, rollout, Step::DiskCheck);
        if !already_unpacked {
            match source {
                // A local file is hashed in the pass that unpacks it.
                ArtifactSource::File(path) if streamed => {
                    self.unpack_file(manifest, path, &dest, rollout).await?;
                }
                _ => {
                    let artifact = self.fetch(manifest, source, rollout).await?;
                    self.unpack(manifest, &artifact, &dest, rollout).await?;
                }
            }
        }

        // ELF.
        self.reporter.started(&release, rollout, Step::ElfCheck);
        if let Err(reason) = check_entrypoint(&dest, manifest, &self.target) {
            if !self.referenced(service, &dir_name) {
                let _ = fs::remove_dir_all(&dest);
            }
            return Err(StepError::new(Step::ElfCheck, reason));
        }
        self.reporter.succeeded(&release, rollout, Step::ElfCheck);
        Ok(dir_name)
    }

    /// Free space for the unpacked release, the reserve, and (unless
    /// `streamed` from a local file) the downloaded artifact.
    fn check_disk(&self, manifest: &Manifest, streamed: bool) -> Result<(), StepError> {
        let root = self.layout.root();
        let stat = nix::sys::statvfs::statvfs(root).map_err(|e| {
            StepError::new(
                Step::DiskCheck,
                format!("cannot stat {}: {e}", root.display()),
            )
        })?;
        // The block counts are 32-bit on some 32-bit targets.
        #[allow(clippy::useless_conversion)]
        let free =
            u64::from(stat.blocks_available()).saturating_mul(u64::from(stat.fragment_size()));
        let download = if streamed
            || self
                .layout
                .checked_download(&manifest.artifact.sha256)
                .exists()
        {
            0
        } else {
            manifest.artifact.size
        };
        let needed = download
            .saturating_add(manifest.limits.unpacked_bytes)
            .saturating_add(self.limits.reserve_bytes);
        if free < needed {
            return Err(StepError::new(
                Step::DiskCheck,
                format!(
                    "not enough space on {}: {} MiB free, {} MiB needed (artifact, unpacked release and reserve)",
                    root.display(),
                    free >> 20,
                    needed.div_ceil(1 << 20)
                ),
            ));
        }
        Ok(())
    }

    async fn fetch(
        &mut self,
        manifest: &Manifest,
        source: &ArtifactSource,
        rollout: Option<&str>,
    ) -> Result<PathBuf, StepError> {
        let release = release_ref(manifest);
        self.reporter.started(&release, rollout, Step::Download);
        let fetched = match source {
            ArtifactSource::File(path) => {
                let (path, artifact, layout) =
                    (path.clone(), manifest.artifact.clone(), self.layout.clone());
                tokio::task::spawn_blocking(move || fetch::import_file(&path, &artifact, &layout))
                    .await
                    .unwrap_or_else(|e| {
                        Err(FetchError::Io {
                            what: "copying the artifact".into(),
                            error: std::io::Error::other(e),
                        })
                    })
            }
            ArtifactSource::Remote { url } => {
                self.download(manifest, url.as_deref(), rollout).await
            }
        };
        match fetched {
            Ok(path) => {
                self.reporter.succeeded(&release, rollout, Step::Download);
                self.reporter.succeeded(&release, rollout, Step::HashCheck);
                Ok(path)
            }
            Err(FetchError::Mismatch(e)) => Err(StepError::new(Step::HashCheck, e)),
            Err(e) => Err(StepError::new(Step::Download, e)),
        }
    }

    /// Fetches from the manager over the configured transport, reporting
    /// progress every 5%: HTTP with a few resumed retries, or MQTT blocks
    /// (`auto` turns to MQTT when the HTTP endpoint cannot be reached or
    /// will not serve this device without credentials it does not get, or
    /// the desired state gives no URL). Both resume the same `.part`.
    async fn download(
        &mut self,
        manifest: &Manifest,
        url: Option<&str>,
        rollout: Option<&str>,
    ) -> Result<PathBuf, FetchError> {
        let transport = self.transfer.transport;
        if let (Some(url), Transport::Auto | Transport::Http) = (url, transport) {
            match self.download_http(manifest, url, rollout).await {
                Err(e @ FetchError::Unreachable { .. })
                    if transport == Transport::Auto && self.blocks.is_some() =>
                {
                    tracing::warn!(error = %e, "artifact store unreachable; fetching over MQTT");
                }
                Err(e @ FetchError::Status { status, .. })
                    if transport == Transport::Auto
                        && self.blocks.is_some()
                        && status == reqwest::StatusCode::UNAUTHORIZED =>
                {
                    tracing::warn!(error = %e, "artifact store wants credentials this device sends only to broker.manager_url; fetching over MQTT");
                }
                other => return other,
            }
        } else if transport == Transport::Http {
            return Err(FetchError::Transfer {
                from: "the manager".into(),
                have: 0,
                reason: format!(
                    "the desired state gives no artifact URL for {} and transfer.transport is \"http\"",
                    manifest.service
                ),
            });
        }
        let Some(link) = self.blocks.as_mut() else {
            return Err(FetchError::NoBroker);
        };
        let progress =
            progress_every_5_percent(self.reporter.clone(), release_ref(manifest), rollout);
        fetch::mqtt::fetch(
            link,
            &manifest.artifact,
            &self.layout,
            &self.transfer,
            progress,
        )
        .await
    }

    async fn download_http(
        &mut self,
        manifest: &Manifest,
        url: &str,
        rollout: Option<&str>,
    ) -> Result<PathBuf, FetchError> {
        const ATTEMPTS: u32 = 3;
        // An endpoint that cannot be reached is not retried when MQTT can
        // take over at once.
        let can_fall_back = self.transfer.transport == Transport::Auto && self.blocks.is_some();
        let mut last_error = None;
        for attempt in 1..=ATTEMPTS {
            let progress =
                progress_every_5_percent(self.reporter.clone(), release_ref(manifest), rollout);
            match fetch::http::download(
                &self.http,
                url,
                self.credentials.as_ref(),
                &manifest.artifact,
                &self.layout,
                progress,
            )
            .await
            {
                Ok(path) => return Ok(path),
                Err(e @ FetchError::Unreachable { .. }) if can_fall_back => return Err(e),
                Err(e @ (FetchError::Transfer { .. } | FetchError::Unreachable { .. }))
                    if attempt < ATTEMPTS =>
                {
                    tracing::warn!(error = %e, attempt, "download interrupted; resuming");
                    tokio::time::sleep(std::time::Duration::from_secs(u64::from(attempt))).await;
                    last_error = Some(e);
                }
                Err(e) => return Err(e),
            }
        }
        Err(last_error.unwrap_or(FetchError::Transfer {
            from: url.into(),
            have: 0,
            reason: "no attempt made".into(),
        }))
    }

    async fn unpack(
        &mut self,
        manifest: &Manifest,
        artifact: &Path,
        dest: &Path,
        rollout: Option<&str>,
    ) -> Result<(), StepError> {
        let release = release_ref(manifest);
        self.reporter.started(&release, rollout, Step::Unpack);
        let limits = self.unpack_limits(manifest);
        let source = artifact.to_owned();
        self.fill_release_dir(manifest, dest, move |staging| {
            unpack::unpack(&source, staging, limits)
                .map(|_| ())
                .map_err(|e| StepError::new(Step::Unpack, e.to_string()))
        })
        .await?;
        // The checked artifact has served its purpose; flash space is scarce.
        let _ = fs::remove_file(artifact);
        self.reporter.succeeded(&release, rollout, Step::Unpack);
        Ok(())
    }

    /// Copies, hashes and unpacks a local artifact in one pass: no copy of
    /// it is written. The release directory appears only when the bytes
    /// hashed to the manifest's digest; until then the unpacked files sit
    /// in a staging directory nothing runs from, written by the same strict
    /// unpacker (whose size and entry limits come from the verified
    /// manifest), and are removed if the hash is wrong.
    async fn unpack_file(
        &mut self,
        manifest: &Manifest,
        source: &Path,
        dest: &Path,
        rollout: Option<&str>,
    ) -> Result<(), StepError> {
        let release = release_ref(manifest);
        self.reporter.started(&release, rollout, Step::Download);
        self.reporter.started(&release, rollout, Step::Unpack);
        let limits = self.unpack_limits(manifest);
        let (source, artifact) = (source.to_owned(), manifest.artifact.clone());
        self.fill_release_dir(manifest, dest, move |staging| {
            // A local file may sit where others can write: a regular file
            // only, a link not followed.
            let file = crate::durable::open_regular(&source).map_err(|e| {
                StepError::new(Step::Download, format!("opening {}: {e}", source.display()))
            })?;
            let mut checked = fetch::CheckedReader::new(file, &artifact);
            let unpacked = unpack::unpack_from(&mut checked, staging, limits);
            // Wrong bytes are the cause whatever the unpacker made of them.
            match checked.finish() {
                Err(FetchError::Mismatch(e)) => Err(StepError::new(Step::HashCheck, e)),
                Err(e) => Err(StepError::new(Step::Download, e)),
                Ok(()) => unpacked
                    .map(|_| ())
                    .map_err(|e| StepError::new(Step::Unpack, e.to_string())),
            }
        })
        .await?;
        self.reporter.succeeded(&release, rollout, Step::Download);
        self.reporter.succeeded(&release, rollout, Step::HashCheck);
        self.reporter.succeeded(&release, rollout, Step::Unpack);
        Ok(())
    }

    fn unpack_limits(&self, manifest: &Manifest) -> UnpackLimits {
        UnpackLimits {
            max_bytes: manifest
                .limits
                .unpacked_bytes
                .min(self.limits.max_unpacked_bytes),
            max_entries: manifest.limits.entries.min(self.limits.max_entries),
        }
    }

    /// Runs `fill` on a fresh staging directory beside `dest` (off the async
    /// thread), makes what it wrote durable, and renames it to `dest`; on
    /// failure the staging directory is removed.
    async fn fill_release_dir(
        &self,
        manifest: &Manifest,
        dest: &Path,
        fill: impl FnOnce(&Path) -> Result<(), StepError> + Send + 'static,
    ) -> Result<(), StepError> {
        let staging = dest.with_file_name(format!(".staging-{}", manifest.release_dir_name()));
        let (staging_dir, dest_dir) = (staging.clone(), dest.to_owned());
        let unpack_err = |reason: String| StepError::new(Step::Unpack, reason);
        let done = tokio::task::spawn_blocking(move || -> Result<(), StepError> {
            if let Some(parent) = staging_dir.parent() {
                fs::create_dir_all(parent)
                    .map_err(|e| unpack_err(format!("cannot create {}: {e}", parent.display())))?;
            }
            if staging_dir.exists() {
                fs::remove_dir_all(&staging_dir).map_err(|e| {
                    unpack_err(format!("cannot clear {}: {e}", staging_dir.display()))
                })?;
            }
            fill(&staging_dir)?;
            // The release's files must be on disk before anything points at them.
            durable::sync_filesystem(&staging_dir)
                .map_err(|e| unpack_err(format!("sync failed: {e}")))?;
            durable::rename(&staging_dir, &dest_dir)
                .map_err(|e| unpack_err(format!("cannot move the release into place: {e}")))
        })
        .await
        .unwrap_or_else(|e| Err(unpack_err(format!("unpack task failed: {e}"))));
        if done.is_err() {
            let _ = fs::remove_dir_all(&staging);
        }
        done
    }

    /// Swap, restart, health gate; then commit or roll back. Re-entered by
    /// recovery, which is why every action here is idempotent.
    async fn swap_and_gate(&mut self, mut entry: Entry) -> DeploymentResult {
        let release = release_ref(&entry.manifest);
        let rollout = entry.rollout.clone();
        let rollout = rollout.as_deref();
        let service = entry.manifest.service.clone();
        entry.attempts += 1;
        if entry.attempts > MAX_ATTEMPTS {
            entry.reason = Some(format!(
                "interrupted {MAX_ATTEMPTS} times before passing its health gate"
            ));
            return self.roll_back(entry).await;
        }
        entry.phase = Phase::Swapping;
        if let Err(e) = journal::write(&self.layout.journal_file(), &entry) {
            // Without a journal a crash could not be recovered: do not swap.
            let reason = format!("cannot write the journal: {e}");
            self.reporter
                .failed(&release, rollout, Step::Swap, reason.clone());
            return self.conclude(release, rollout, Outcome::Failed, Some(reason));
        }

        self.reporter.started(&release, rollout, Step::Swap);
        if let Err(e) = self.point_links(&service, &entry.new_dir, entry.old_dir.as_deref()) {
            entry.reason = Some(format!("swap failed: {e}"));
            return self.roll_back(entry).await;
        }
        self.reporter.succeeded(&release, rollout, Step::Swap);

        self.reporter.started(&release, rollout, Step::Restart);
        let spec = self.spec(&entry.manifest);
        let restarted = match self.supervisor.apply(&spec).await {
            Ok(()) => self.supervisor.restart(&service).await,
            Err(e) => Err(e),
        };
        if let Err(e) = restarted {
            entry.reason = Some(format!("restart failed: {e}"));
            return self.roll_back(entry).await;
        }
        self.reporter.succeeded(&release, rollout, Step::Restart);

        self.reporter.started(&release, rollout, Step::HealthGate);
        if let Err(reason) = health_gate::run(
            &self.supervisor,
            &service,
            &entry.manifest.health,
            &spec.workdir,
            &self.http,
        )
        .await
        {
            self.reporter
                .failed(&release, rollout, Step::HealthGate, reason.clone());
            entry.reason = Some(format!("health gate: {reason}"));
            return self.roll_back(entry).await;
        }
        self.reporter.succeeded(&release, rollout, Step::HealthGate);

        entry.phase = Phase::Committing;
        if let Err(e) = journal::write(&self.layout.journal_file(), &entry) {
            entry.reason = Some(format!("cannot write the journal: {e}"));
            return self.roll_back(entry).await;
        }
        self.commit(entry)
    }

    /// Records the new release as installed. Idempotent.
    fn commit(&mut self, entry: Entry) -> DeploymentResult {
        let release = release_ref(&entry.manifest);
        let rollout = entry.rollout.as_deref();
        let service = entry.manifest.service.clone();
        self.state.services.insert(
            service.clone(),
            Installed {
                manifest: entry.manifest.clone(),
                release_dir: entry.new_dir.clone(),
                installed_at: Timestamp::from(SystemTime::now()),
            },
        );
        let outcome = result(release.clone(), rollout, Outcome::Installed, None);
        self.state.last_result = Some(outcome.clone());
        if let Err(e) = self.state.save(&self.layout.state_file()) {
            // The journal still says committing: the next start retries this.
            tracing::error!(error = %e, "cannot save the state; will retry on restart");
            return outcome;
        }
        if let Err(e) = journal::clear(&self.layout.journal_file()) {
            tracing::error!(error = %e, "cannot clear the journal");
        }
        self.collect_garbage(&service);
        self.reporter.succeeded(&release, rollout, Step::Commit);
        self.publish_state();
        outcome
    }

    /// Puts the old release back (or removes the service if there was none),
    /// remembers the failure, reports. Idempotent.
    async fn roll_back(&mut self, mut entry: Entry) -> DeploymentResult {
        let release = release_ref(&entry.manifest);
        let rollout = entry.rollout.clone();
        let rollout = rollout.as_deref();
        let service = entry.manifest.service.clone();
        let reason = entry.reason.clone().unwrap_or_else(|| "rolled back".into());
        entry.phase = Phase::RollingBack;
        if let Err(e) = journal::write(&self.layout.journal_file(), &entry) {
            tracing::error!(error = %e, "cannot write the journal before rolling back");
        }
        self.reporter.step(
            Some(&release),
            rollout,
            Step::Rollback,
            StepStatus::Started,
            Some(reason.clone()),
        );
        let restored = match (&entry.old_dir, self.state.services.get(&service).cloned()) {
            (Some(old), Some(installed)) => {
                let spec = self.spec(&installed.manifest);
                let relinked = durable::replace_symlink(
                    &Path::new("releases").join(old),
                    &self.layout.current(&service),
                );
                match relinked {
                    Ok(()) => match self.supervisor.apply(&spec).await {
                        Ok(()) => self
                            .supervisor
                            .restart(&service)
                            .await
                            .map_err(|e| e.to_string()),
                        Err(e) => Err(e.to_string()),
                    },
                    Err(e) => Err(e.to_string()),
                }
            }
            _ => {
                // Nothing ran before: stop the failed release and unlink it.
                let stopped = self
                    .supervisor
                    .remove(&service)
                    .await
                    .map_err(|e| e.to_string());
                let _ = durable::remove_file(&self.layout.current(&service));
                stopped
            }
        };
        if let Err(e) = &restored {
            tracing::error!(service = %service, error = %e, "rollback could not restart the previous release");
        }
        self.state.record_failure(&entry.manifest);
        let outcome = result(release.clone(), rollout, Outcome::RolledBack, Some(reason));
        self.state.last_result = Some(outcome.clone());
        if let Err(e) = self.state.save(&self.layout.state_file()) {
            tracing::error!(error = %e, "cannot save the state after rollback");
        }
        let _ = journal::clear(&self.layout.journal_file());
        self.collect_garbage(&service);
        self.reporter.step(
            Some(&release),
            rollout,
            Step::Rollback,
            if restored.is_ok() {
                StepStatus::Succeeded
            } else {
                StepStatus::Failed
            },
            restored.err(),
        );
        self.publish_state();
        outcome
    }

    /// `previous` to the old release, then `current` to the new one.
    fn point_links(
        &self,
        service: &ServiceName,
        new_dir: &str,
        old_dir: Option<&str>,
    ) -> std::io::Result<()> {
        if let Some(old) = old_dir {
            durable::replace_symlink(
                &Path::new("releases").join(old),
                &self.layout.previous(service),
            )?;
        }
        durable::replace_symlink(
            &Path::new("releases").join(new_dir),
            &self.layout.current(service),
        )
    }

    /// Whether `current` or `previous` points at `dir_name`.
    fn referenced(&self, service: &ServiceName, dir_name: &str) -> bool {
        [self.layout.current(service), self.layout.previous(service)]
            .iter()
            .any(|link| link_target(link).as_deref() == Some(dir_name))
    }

    /// Removes releases that neither `current` nor `previous` points at,
    /// staging leftovers, and checked artifacts.
    fn collect_garbage(&self, service: &ServiceName) {
        if let Ok(entries) = fs::read_dir(self.layout.releases(service)) {
            for entry in entries.flatten() {
                let name = entry.file_name().to_string_lossy().into_owned();
                if !self.referenced(service, &name) {
                    if let Err(e) = fs::remove_dir_all(entry.path()) {
                        tracing::warn!(path = %entry.path().display(), error = %e, "cannot remove old release");
                    }
                }
            }
        }
        if let Ok(entries) = fs::read_dir(self.layout.downloads()) {
            for entry in entries.flatten() {
                if entry.path().extension().is_some_and(|e| e == "gz") {
                    let _ = fs::remove_file(entry.path());
                }
            }
        }
    }

    /// Removes a service's directories when a failed first install left them
    /// empty, so a refused release leaves no trace.
    fn forget_if_empty(&self, service: &ServiceName) {
        let _ = fs::remove_dir(self.layout.releases(service));
        let _ = fs::remove_dir(self.layout.service_dir(service));
        let _ = fs::remove_dir(self.layout.root().join("services"));
    }

    /// How the supervisor runs a release: through the `current` link.
    fn spec(&self, manifest: &Manifest) -> ServiceSpec {
        let current = self.layout.current(&manifest.service);
        let run = &manifest.run;
        ServiceSpec {
            service: manifest.service.clone(),
            exec: current.join(manifest.entrypoint.as_str()),
            args: run.args.clone(),
            env: crate::supervisor::environment(&self.passed_env, &run.env),
            workdir: match &run.workdir {
                Some(dir) => current.join(dir.as_str()),
                None => current,
            },
            user: match &run.user {
                Some(name) => RunAs::Named(name.to_string()),
                None if self.isolate_services => RunAs::Own,
                None => RunAs::Agent,
            },
            writable: run
                .writable
                .iter()
                .map(|p| PathBuf::from(p.as_str()))
                .collect(),
            stop_signal: crate::supervisor::nix_signal(run.stop_signal()),
            stop_timeout: std::time::Duration::from_secs(u64::from(run.stop_timeout_secs())),
        }
    }

    /// Records an outcome that changed nothing installed, and reports it.
    fn conclude(
        &mut self,
        release: ReleaseRef,
        rollout: Option<&str>,
        outcome: Outcome,
        reason: Option<String>,
    ) -> DeploymentResult {
        let result = result(release, rollout, outcome, reason);
        self.state.last_result = Some(result.clone());
        if let Err(e) = self.state.save(&self.layout.state_file()) {
            tracing::error!(error = %e, "cannot save the state");
        }
        self.publish_state();
        result
    }
}

fn result(
    release: ReleaseRef,
    rollout: Option<&str>,
    outcome: Outcome,
    reason: Option<String>,
) -> DeploymentResult {
    DeploymentResult {
        rollout: rollout.map(str::to_owned),
        release,
        outcome,
        reason,
        time: Timestamp::from(SystemTime::now()),
    }
}

/// The release directory name a link points at.
fn link_target(link: &Path) -> Option<String> {
    let target = fs::read_link(link).ok()?;
    Some(target.file_name()?.to_string_lossy().into_owned())
}

/// The entrypoint must be a regular, executable file whose ELF header fits
/// this device.
fn check_entrypoint(release: &Path, manifest: &Manifest, target: &Target) -> Result<(), String> {
    let path = release.join(manifest.entrypoint.as_str());
    let what = format!("entrypoint {}", manifest.entrypoint);
    let meta = fs::symlink_metadata(&path).map_err(|_| format!("{what} is not in the release"))?;
    if !meta.is_file() {
        return Err(format!("{what} is not a regular file"));
    }
    use std::os::unix::fs::PermissionsExt;
    if meta.permissions().mode() & 0o111 == 0 {
        return Err(format!("{what} is not executable"));
    }
    let mut header = Vec::with_capacity(ELF_HEADER_LEN);
    fs::File::open(&path)
        .and_then(|f| f.take(ELF_HEADER_LEN as u64).read_to_end(&mut header))
        .map_err(|e| format!("cannot read {what}: {e}"))?;
    check_elf(&header, target).map_err(|e| format!("{what}: {e}"))?;
    check_other_programs(release, release, target)
}

/// Every other ELF file in the release (a helper program, a library) must
/// be built for this device too: found here, not when something runs it.
fn check_other_programs(dir: &Path, release: &Path, target: &Target) -> Result<(), String> {
    let entries = fs::read_dir(dir).map_err(|e| format!("cannot read {}: {e}", dir.display()))?;
    for entry in entries {
        let entry = entry.map_err(|e| format!("cannot read {}: {e}", dir.display()))?;
        let path = entry.path();
        let kind = entry
            .file_type()
            .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
        if kind.is_dir() {
            check_other_programs(&path, release, target)?;
        } else if kind.is_file() {
            let mut header = Vec::with_capacity(ELF_HEADER_LEN);
            fs::File::open(&path)
                .and_then(|f| f.take(ELF_HEADER_LEN as u64).read_to_end(&mut header))
                .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
            let name = path.strip_prefix(release).unwrap_or(&path).display();
            ferry_protocol::elf::check_release_file(&header, target, false)
                .map_err(|e| format!("{name}: {e}"))?;
        }
    }
    Ok(())
}

/// A progress callback that reports a download at every 5% (and at the end).
fn progress_every_5_percent(
    reporter: Reporter,
    release: ReleaseRef,
    rollout: Option<&str>,
) -> impl FnMut(u64, u64) + use<'_> {
    let mut reported = 0u64;
    move |done: u64, total: u64| {
        if done == total || done.saturating_sub(reported) >= total / 20 {
            reported = done;
            reporter.progress(&release, rollout, Step::Download, done, total);
        }
    }
}
