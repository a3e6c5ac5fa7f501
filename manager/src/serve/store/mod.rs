//! The manager's state in SQLite or PostgreSQL: devices and their
//! credentials, releases, desired state, deployments, and what devices
//! report (latest plus a bounded history of health and events).

use ferry_protocol::{DeviceId, Sha256Digest, Timestamp};
use serde::Serialize;
use sha2::{Digest, Sha256};
use sqlx::{AnyConnection, AnyPool};

mod database;
mod identity;
mod lease;
mod rollouts;

pub use database::{Backend, DatabaseUrl};
pub use identity::{Enrolment, NO_PASSWORD, unix_now};
pub use lease::RolloutLease;
pub use rollouts::{DeviceStep, InFlight, RolloutDevice, RolloutHead, RolloutRow, StepCounts};

/// How many health reports and events are kept per device.
pub const HISTORY: i64 = 200;

/// Store errors.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The database said no.
    #[error("database: {0}")]
    Sql(#[from] sqlx::Error),
    /// Stored JSON that no longer reads.
    #[error("stored data: {0}")]
    Json(#[from] serde_json::Error),
    /// Stored data that reads but does not make sense.
    #[error("stored data: {0}")]
    Invalid(String),
}

type Result<T> = std::result::Result<T, StoreError>;

/// The database: connections that write (one for SQLite, which has one
/// writer at a time anyway), connections that only read (several read-only
/// ones for SQLite; the same pool on PostgreSQL), and which kind it is.
pub struct Store {
    pool: AnyPool,
    reads: AnyPool,
    backend: Backend,
}

/// What publishing a release did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Published {
    /// It is stored now.
    Added,
    /// The very same envelope was stored already.
    AlreadyThere,
    /// Another release has its version or its sequence; why, in a sentence.
    Conflict(String),
}

/// A registered device.
#[derive(Debug, Clone, Serialize)]
pub struct DeviceRow {
    /// Its id (also its MQTT user name).
    pub device_id: String,
    /// Its tags.
    pub tags: Vec<String>,
    /// Whether it is connected.
    pub online: bool,
    /// When it was last heard from.
    pub last_seen: Option<String>,
    /// Its latest `reported` message.
    pub reported: Option<serde_json::Value>,
    /// Its latest health report.
    pub health: Option<serde_json::Value>,
}

/// A device's id and tags.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceTags {
    /// Its id.
    pub device_id: String,
    /// Its tags.
    pub tags: Vec<String>,
}

/// A device message to record (see [`Store::record_many`]).
#[derive(Debug, Clone, Default)]
pub struct Record {
    /// The device.
    pub device: String,
    /// Its topic kind: "reported", "events", "health" or "status".
    pub kind: &'static str,
    /// The payload, already checked.
    pub payload: String,
    /// When it arrived.
    pub time: String,
}

/// A published release.
#[derive(Debug, Clone, Serialize)]
pub struct ReleaseRow {
    /// Service.
    pub service: String,
    /// Version.
    pub version: String,
    /// Sequence.
    pub sequence: u64,
    /// Artifact digest.
    pub sha256: String,
    /// Artifact size.
    pub size: u64,
    /// When it was published.
    pub created: String,
    /// The signed envelope.
    #[serde(skip)]
    pub envelope: String,
}

/// One device's part in a deployment.
#[derive(Debug, Clone, Serialize)]
pub struct DeploymentTarget {
    /// The device.
    pub device_id: String,
    /// pending, installing, installed, failed, rolled_back or rejected.
    pub status: String,
    /// Why, when it did not install.
    pub reason: Option<String>,
    /// When the status last changed.
    pub updated: String,
}

/// A deployment and its per-device progress.
#[derive(Debug, Clone, Serialize)]
pub struct DeploymentRow {
    /// Its id; devices see it as rollout `deploy-<id>`.
    pub id: i64,
    /// Service.
    pub service: String,
    /// Version.
    pub version: String,
    /// When it was made.
    pub created: String,
    /// Each device's progress.
    pub devices: Vec<DeploymentTarget>,
}

pub(crate) fn now() -> String {
    Timestamp::from(std::time::SystemTime::now()).to_string()
}

/// A device password as stored: `s1$SALT$SHA256(SALT || PASSWORD)` with a
/// random 16-byte salt, so two databases never share a hash. The passwords
/// are 192 random bits: a slow KDF would add nothing against guessing, and
/// would cost every device connection.
pub fn password_hash(password: &str) -> String {
    let mut salt = [0u8; 16];
    // Without randomness the hash is still right, only unsalted.
    let _ = getrandom::fill(&mut salt);
    salted(&salt, password)
}

fn salted(salt: &[u8], password: &str) -> String {
    let mut hasher = Sha256::new();
    hasher.update(salt);
    hasher.update(password.as_bytes());
    format!(
        "s1${}${}",
        hex::encode(salt),
        hex::encode(hasher.finalize())
    )
}

/// Whether `password` is the one `stored` was made from (also the plain
/// SHA-256 hex of databases from before salts).
pub fn verify_password(stored: &str, password: &str) -> bool {
    use crate::serve::api::auth::constant_time_eq;
    let expected = match stored.split('$').collect::<Vec<_>>().as_slice() {
        ["s1", salt, _] => match hex::decode(salt) {
            Ok(salt) => salted(&salt, password),
            Err(_) => return false,
        },
        [_] => hex::encode(Sha256::digest(password.as_bytes())),
        _ => return false,
    };
    constant_time_eq(expected.as_bytes(), stored.as_bytes())
}

/// A token as stored: its SHA-256 (tokens are 256 random bits).
fn token_hash(token: &str) -> String {
    hex::encode(Sha256::digest(token.as_bytes()))
}

impl Store {
    /// Opens (creating a SQLite file if needed) the database at `url` and
    /// brings its schema up to date.
    pub async fn connect(url: &DatabaseUrl) -> Result<Self> {
        let pools = database::connect(url).await?;
        Ok(Self {
            pool: pools.writes,
            reads: pools.reads,
            backend: pools.backend,
        })
    }

    /// Which database this is.
    pub fn backend(&self) -> Backend {
        self.backend
    }

    /// Registers a device with a password, or replaces its credentials
    /// (a certificate it had included) and tags. True when it was there
    /// before (whoever held its old credentials may still be connected).
    pub async fn add_device(&self, id: &DeviceId, password: &str, tags: &[String]) -> Result<bool> {
        let mut tx = self.pool.begin().await?;
        let replaced = upsert_device(&mut tx, id, &password_hash(password), tags).await?;
        identity::forget_identity(&mut tx, id.as_str()).await?;
        tx.commit().await?;
        Ok(replaced)
    }

    /// Adds a named operator token (its hash); false when the name is taken.
    pub async fn add_token(&self, name: &str, scope: &str, token: &str) -> Result<bool> {
        let added = sqlx::query(
            "INSERT INTO tokens (name, scope, sha256, created) VALUES ($1, $2, $3, $4)
             ON CONFLICT (name) DO NOTHING",
        )
        .bind(name)
        .bind(scope)
        .bind(token_hash(token))
        .bind(now())
        .execute(&self.pool)
        .await?;
        Ok(added.rows_affected() == 1)
    }

    /// The name and scope of the token presented, if it is one.
    pub async fn token(&self, token: &str) -> Result<Option<(String, String)>> {
        Ok(
            sqlx::query_as("SELECT name, scope FROM tokens WHERE sha256 = $1")
                .bind(token_hash(token))
                .fetch_optional(&self.reads)
                .await?,
        )
    }

    /// Every named token: name, scope, when made (never the token).
    pub async fn tokens(&self) -> Result<Vec<serde_json::Value>> {
        let rows: Vec<(String, String, String)> =
            sqlx::query_as("SELECT name, scope, created FROM tokens ORDER BY name")
                .fetch_all(&self.reads)
                .await?;
        Ok(rows
            .into_iter()
            .map(|(name, scope, created)| {
                serde_json::json!({ "name": name, "scope": scope, "created": created })
            })
            .collect())
    }

    /// Revokes a named token; false when there is none.
    pub async fn remove_token(&self, name: &str) -> Result<bool> {
        let removed = sqlx::query("DELETE FROM tokens WHERE name = $1")
            .bind(name)
            .execute(&self.pool)
            .await?;
        Ok(removed.rows_affected() == 1)
    }

    /// Forgets a device: its credentials, state, desired state and history
    /// (rollouts keep their record of it). False when there was none.
    pub async fn remove_device(&self, id: &str) -> Result<bool> {
        let mut tx = self.pool.begin().await?;
        let removed = sqlx::query("DELETE FROM devices WHERE id = $1")
            .bind(id)
            .execute(&mut *tx)
            .await?;
        for statement in [
            "DELETE FROM device_state WHERE device_id = $1",
            "DELETE FROM desired WHERE device_id = $1",
            "DELETE FROM history WHERE device_id = $1",
        ] {
            sqlx::query(statement).bind(id).execute(&mut *tx).await?;
        }
        identity::forget_identity(&mut tx, id).await?;
        tx.commit().await?;
        Ok(removed.rows_affected() > 0)
    }

    /// Replaces a device's tags; false when there is no such device.
    pub async fn set_tags(&self, id: &str, tags: &[String]) -> Result<bool> {
        let changed = sqlx::query("UPDATE devices SET tags = $2 WHERE id = $1")
            .bind(id)
            .bind(serde_json::to_string(tags)?)
            .execute(&self.pool)
            .await?;
        Ok(changed.rows_affected() == 1)
    }

    /// The stored password hash of a device.
    pub async fn password_hash_of(&self, id: &str) -> Result<Option<String>> {
        Ok(
            sqlx::query_scalar("SELECT password_sha256 FROM devices WHERE id = $1")
                .bind(id)
                .fetch_optional(&self.reads)
                .await?,
        )
    }

    /// Every device with its latest state.
    pub async fn devices(&self) -> Result<Vec<DeviceRow>> {
        self.devices_where(None).await
    }

    /// One device.
    pub async fn device(&self, id: &str) -> Result<Option<DeviceRow>> {
        Ok(self.devices_where(Some(id)).await?.pop())
    }

    /// Every device, or the one named.
    async fn devices_where(&self, id: Option<&str>) -> Result<Vec<DeviceRow>> {
        type Row = (
            String,
            String,
            i64,
            Option<String>,
            Option<String>,
            Option<String>,
        );
        let rows: Vec<Row> = sqlx::query_as(
            "SELECT d.id, d.tags, COALESCE(s.online, 0), s.last_seen, s.reported, s.health
             FROM devices d LEFT JOIN device_state s ON s.device_id = d.id
             WHERE $1 IS NULL OR d.id = $1 ORDER BY d.id",
        )
        .bind(id)
        .fetch_all(&self.reads)
        .await?;
        let mut out = Vec::with_capacity(rows.len());
        for (device_id, tags, online, last_seen, reported, health) in rows {
            out.push(DeviceRow {
                device_id,
                tags: serde_json::from_str(&tags)?,
                online: online != 0,
                last_seen,
                reported: reported.map(|r| serde_json::from_str(&r)).transpose()?,
                health: health.map(|h| serde_json::from_str(&h)).transpose()?,
            });
        }
        Ok(out)
    }

    /// Whether `device`'s desired state names the artifact `sha256`: the
    /// only artifacts a device may fetch, over HTTP or MQTT.
    pub async fn desires_artifact(&self, device: &str, sha256: &Sha256Digest) -> Result<bool> {
        use ferry_protocol::messages::{Desired, Message};
        let Some(text) = self.desired(device).await? else {
            return Ok(false);
        };
        let desired = Desired::decode(text.as_bytes())
            .map_err(|e| StoreError::Invalid(format!("desired state of {device}: {e}")))?;
        Ok(desired.releases.iter().any(|r| {
            r.envelope
                .unverified_manifest()
                .is_ok_and(|m| m.artifact.sha256 == *sha256)
        }))
    }

    /// Records device messages (latest state and bounded history) in one
    /// transaction, in order. Under load the ingest path hands them over in
    /// batches, so a commit (and its write-ahead-log pages) is shared by
    /// many messages, and each device's history is trimmed once per batch.
    ///
    /// Devices are written in the order of their ids (each device's
    /// messages in the order they came): replicas recording at once then
    /// lock rows in one order. In the order messages came, two batches
    /// holding the same devices deadlock on PostgreSQL, and one is lost.
    pub async fn record_many(&self, records: &[Record]) -> Result<()> {
        let mut ordered: Vec<&Record> = records.iter().collect();
        // Stable: a device's own messages keep their order.
        ordered.sort_by(|a, b| a.device.cmp(&b.device));
        let mut tx = self.pool.begin().await?;
        let mut trimmed: Vec<(&str, &str)> = Vec::new();
        for r in ordered {
            let (device, text, time) = (r.device.as_str(), r.payload.as_str(), r.time.as_str());
            sqlx::query(
                "INSERT INTO device_state (device_id, last_seen) VALUES ($1, $2)
                 ON CONFLICT (device_id) DO UPDATE SET last_seen = $2",
            )
            .bind(device)
            .bind(time)
            .execute(&mut *tx)
            .await?;
            let latest = match r.kind {
                "reported" => Some("UPDATE device_state SET reported = $2 WHERE device_id = $1"),
                "health" => {
                    Some("UPDATE device_state SET health = $2, online = 1 WHERE device_id = $1")
                }
                _ => None,
            };
            if let Some(statement) = latest {
                sqlx::query(statement)
                    .bind(device)
                    .bind(text)
                    .execute(&mut *tx)
                    .await?;
            }
            if r.kind == "status" {
                let online = i64::from(text.contains("\"online\""));
                sqlx::query("UPDATE device_state SET online = $2 WHERE device_id = $1")
                    .bind(device)
                    .bind(online)
                    .execute(&mut *tx)
                    .await?;
            }
            if r.kind == "health" || r.kind == "events" {
                sqlx::query(
                    "INSERT INTO history (device_id, kind, time, payload) VALUES ($1, $2, $3, $4)",
                )
                .bind(device)
                .bind(r.kind)
                .bind(time)
                .bind(text)
                .execute(&mut *tx)
                .await?;
                if !trimmed.contains(&(device, r.kind)) {
                    trimmed.push((device, r.kind));
                }
            }
        }
        for (device, kind) in trimmed {
            sqlx::query(
                "DELETE FROM history WHERE device_id = $1 AND kind = $2 AND id <= (
                     SELECT id FROM history WHERE device_id = $1 AND kind = $2
                     ORDER BY id DESC LIMIT 1 OFFSET $3)",
            )
            .bind(device)
            .bind(kind)
            .bind(HISTORY)
            .execute(&mut *tx)
            .await?;
        }
        tx.commit().await?;
        Ok(())
    }

    /// The history of one kind ("health" or "events") after row `after`,
    /// oldest first: (row id, device, payload).
    pub async fn history(
        &self,
        kind: &str,
        device: Option<&str>,
        after: i64,
        limit: i64,
    ) -> Result<Vec<(i64, String, serde_json::Value)>> {
        let rows: Vec<(i64, String, String)> = sqlx::query_as(
            "SELECT id, device_id, payload FROM history
             WHERE kind = $1 AND id > $2 AND ($3 IS NULL OR device_id = $3)
             ORDER BY id DESC LIMIT $4",
        )
        .bind(kind)
        .bind(after)
        .bind(device)
        .bind(limit)
        .fetch_all(&self.reads)
        .await?;
        let mut out = Vec::with_capacity(rows.len());
        for (id, device, payload) in rows.into_iter().rev() {
            out.push((id, device, serde_json::from_str(&payload)?));
        }
        Ok(out)
    }

    /// Stores a published release. A service's version and its sequence each
    /// name one release for good: publishing the same envelope again changes
    /// nothing, and different bytes under a taken version or sequence are
    /// refused (otherwise whoever holds the operator token could swap what
    /// an old version means, say for a revert to sign).
    pub async fn add_release(
        &self,
        service: &str,
        version: &str,
        sequence: u64,
        sha256: &Sha256Digest,
        size: u64,
        envelope: &str,
    ) -> Result<Published> {
        let mut tx = self.pool.begin().await?;
        let taken: Option<(String, i64, String)> = sqlx::query_as(
            "SELECT version, sequence, envelope FROM releases
             WHERE service = $1 AND (version = $2 OR sequence = $3) LIMIT 1",
        )
        .bind(service)
        .bind(version)
        .bind(sequence as i64)
        .fetch_optional(&mut *tx)
        .await?;
        if let Some((old_version, old_sequence, old_envelope)) = taken {
            if old_envelope == envelope {
                return Ok(Published::AlreadyThere);
            }
            return Ok(Published::Conflict(if old_version == version {
                format!(
                    "{service} {version} is already published with other contents; publish the new release under a new version and sequence"
                )
            } else {
                format!(
                    "sequence {old_sequence} of {service} is already release {old_version}; give {version} a sequence of its own"
                )
            }));
        }
        sqlx::query(
            "INSERT INTO releases (service, version, sequence, sha256, size, envelope, created)
             VALUES ($1, $2, $3, $4, $5, $6, $7)",
        )
        .bind(service)
        .bind(version)
        .bind(sequence as i64)
        .bind(sha256.to_string())
        .bind(size as i64)
        .bind(envelope)
        .bind(now())
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(Published::Added)
    }

    /// Every release, newest sequence first per service.
    pub async fn releases(&self) -> Result<Vec<ReleaseRow>> {
        type Row = (String, String, i64, String, i64, String, String);
        let rows: Vec<Row> = sqlx::query_as(
            "SELECT service, version, sequence, sha256, size, created, envelope FROM releases
             ORDER BY service, sequence DESC",
        )
        .fetch_all(&self.reads)
        .await?;
        Ok(rows
            .into_iter()
            .map(
                |(service, version, sequence, sha256, size, created, envelope)| ReleaseRow {
                    service,
                    version,
                    sequence: sequence as u64,
                    sha256,
                    size: size as u64,
                    created,
                    envelope,
                },
            )
            .collect())
    }

    /// One release.
    pub async fn release(&self, service: &str, version: &str) -> Result<Option<ReleaseRow>> {
        Ok(self
            .releases()
            .await?
            .into_iter()
            .find(|r| r.service == service && r.version == version))
    }

    /// The trust roots published (signed JSON), oldest first.
    pub async fn roots(&self) -> Result<Vec<String>> {
        Ok(
            sqlx::query_scalar("SELECT signed FROM roots ORDER BY version")
                .fetch_all(&self.reads)
                .await?,
        )
    }

    /// Adds trust root `version` (checked by the caller to follow the
    /// newest) and rewrites every device's desired state with `rewrite`,
    /// in one transaction; the rewritten payloads, to send.
    pub async fn add_root(
        &self,
        version: u64,
        signed: &str,
        rewrite: impl Fn(&str) -> Option<String>,
    ) -> Result<Vec<(String, String)>> {
        let mut tx = self.pool.begin().await?;
        sqlx::query("INSERT INTO roots (version, signed, created) VALUES ($1, $2, $3)")
            .bind(version as i64)
            .bind(signed)
            .bind(now())
            .execute(&mut *tx)
            .await?;
        let all: Vec<(String, String)> = sqlx::query_as(sqlx::AssertSqlSafe(format!(
            "SELECT device_id, payload FROM desired{}",
            self.backend.for_update()
        )))
        .fetch_all(&mut *tx)
        .await?;
        let mut changed = Vec::new();
        for (device, payload) in all {
            if let Some(new) = rewrite(&payload) {
                sqlx::query("UPDATE desired SET payload = $2 WHERE device_id = $1")
                    .bind(&device)
                    .bind(&new)
                    .execute(&mut *tx)
                    .await?;
                changed.push((device, new));
            }
        }
        tx.commit().await?;
        Ok(changed)
    }

    /// Every device's desired state payload, in device order.
    pub async fn all_desired(&self) -> Result<Vec<(String, String)>> {
        Ok(
            sqlx::query_as("SELECT device_id, payload FROM desired ORDER BY device_id")
                .fetch_all(&self.reads)
                .await?,
        )
    }

    /// The ids and tags of every device, in id order: what a selector picks
    /// from, without the reports.
    pub async fn device_tags(&self) -> Result<Vec<DeviceTags>> {
        let rows: Vec<(String, String)> =
            sqlx::query_as("SELECT id, tags FROM devices ORDER BY id")
                .fetch_all(&self.reads)
                .await?;
        let mut out = Vec::with_capacity(rows.len());
        for (device_id, tags) in rows {
            out.push(DeviceTags {
                device_id,
                tags: serde_json::from_str(&tags)?,
            });
        }
        Ok(out)
    }

    /// The device's desired state payload, if any.
    pub async fn desired(&self, device: &str) -> Result<Option<String>> {
        Ok(
            sqlx::query_scalar("SELECT payload FROM desired WHERE device_id = $1")
                .bind(device)
                .fetch_optional(&self.reads)
                .await?,
        )
    }

    /// Records a new deployment; returns its id.
    pub async fn add_deployment(&self, service: &str, version: &str) -> Result<i64> {
        Ok(sqlx::query_scalar(
            "INSERT INTO deployments (service, version, created) VALUES ($1, $2, $3) RETURNING id",
        )
        .bind(service)
        .bind(version)
        .bind(now())
        .fetch_one(&self.pool)
        .await?)
    }

    /// Sets the new desired payload of each device in deployment `id`, and
    /// starts tracking its progress; all or nothing.
    pub async fn add_deployment_targets(
        &self,
        id: i64,
        desired: &[(String, String)],
    ) -> Result<()> {
        let mut tx = self.pool.begin().await?;
        let time = now();
        let service: String = sqlx::query_scalar("SELECT service FROM deployments WHERE id = $1")
            .bind(id)
            .fetch_one(&mut *tx)
            .await?;
        let by = format!("deployment {id}");
        for (device, payload) in desired {
            set_desired(&mut tx, device, payload, &service, &by).await?;
            sqlx::query(
                "INSERT INTO deployment_devices (deployment_id, device_id, status, updated)
                 VALUES ($1, $2, 'pending', $3)",
            )
            .bind(id)
            .bind(device)
            .bind(&time)
            .execute(&mut *tx)
            .await?;
        }
        tx.commit().await?;
        Ok(())
    }

    /// Why `device` rolled `service` `version` back before, if it did (in a
    /// deployment or a rollout): it will not try that release again.
    pub async fn rolled_back_on(
        &self,
        device: &str,
        service: &str,
        version: &str,
    ) -> Result<Option<String>> {
        let reason: Option<Option<String>> = sqlx::query_scalar(
            "SELECT reason FROM (
                 SELECT dd.reason AS reason, dd.updated AS updated
                   FROM deployment_devices dd JOIN deployments d ON d.id = dd.deployment_id
                  WHERE dd.device_id = $1 AND d.service = $2 AND d.version = $3
                    AND dd.status = 'rolled_back'
                 UNION ALL
                 SELECT rd.reason, rd.updated
                   FROM rollout_devices rd JOIN rollouts r ON r.id = rd.rollout_id
                  WHERE rd.device_id = $1 AND r.service = $2 AND r.version = $3
                    AND rd.status = 'rolled_back') AS past
             ORDER BY updated DESC LIMIT 1",
        )
        .bind(device)
        .bind(service)
        .bind(version)
        .fetch_optional(&self.reads)
        .await?;
        Ok(reason.map(|reason| reason.unwrap_or_else(|| "no reason given".into())))
    }

    /// Starts tracking devices the deployment will not reach: each ends at
    /// once as `rejected`, with why.
    pub async fn add_deployment_refusals(
        &self,
        id: i64,
        refused: &[(String, String)],
    ) -> Result<()> {
        let mut tx = self.pool.begin().await?;
        let time = now();
        for (device, reason) in refused {
            sqlx::query(
                "INSERT INTO deployment_devices (deployment_id, device_id, status, reason, updated)
                 VALUES ($1, $2, 'rejected', $3, $4)",
            )
            .bind(id)
            .bind(device)
            .bind(reason)
            .bind(&time)
            .execute(&mut *tx)
            .await?;
        }
        tx.commit().await?;
        Ok(())
    }

    /// Updates a device's progress in a deployment (from its events and reports).
    pub async fn set_deployment_status(
        &self,
        id: i64,
        device: &str,
        status: &str,
        reason: Option<&str>,
    ) -> Result<()> {
        sqlx::query(
            "UPDATE deployment_devices SET status = $3, reason = $4, updated = $5
             WHERE deployment_id = $1 AND device_id = $2
               AND status NOT IN ('installed', 'failed', 'rolled_back', 'rejected')",
        )
        .bind(id)
        .bind(device)
        .bind(status)
        .bind(reason)
        .bind(now())
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// Deployments, newest first.
    pub async fn deployments(&self) -> Result<Vec<DeploymentRow>> {
        let heads: Vec<(i64, String, String, String)> = sqlx::query_as(
            "SELECT id, service, version, created FROM deployments ORDER BY id DESC",
        )
        .fetch_all(&self.reads)
        .await?;
        let mut out = Vec::with_capacity(heads.len());
        for (id, service, version, created) in heads {
            let targets: Vec<(String, String, Option<String>, String)> = sqlx::query_as(
                "SELECT device_id, status, reason, updated FROM deployment_devices
                 WHERE deployment_id = $1 ORDER BY device_id",
            )
            .bind(id)
            .fetch_all(&self.reads)
            .await?;
            let devices = targets
                .into_iter()
                .map(|(device_id, status, reason, updated)| DeploymentTarget {
                    device_id,
                    status,
                    reason,
                    updated,
                })
                .collect();
            out.push(DeploymentRow {
                id,
                service,
                version,
                created,
                devices,
            });
        }
        Ok(out)
    }

    /// Online devices still `pending` in a deployment (not a word of it
    /// since it started) since before `cutoff`, with the deployment. A
    /// device that said it is installing had its desired state; what may be
    /// lost after that is its outcome, and its report goes out twice.
    pub async fn silent_deployment_devices(&self, cutoff: &str) -> Result<Vec<(String, i64)>> {
        Ok(sqlx::query_as(
            "SELECT dd.device_id, dd.deployment_id
               FROM deployment_devices dd JOIN device_state s ON s.device_id = dd.device_id
              WHERE s.online = 1 AND dd.updated < $1
                AND dd.status = 'pending'",
        )
        .bind(cutoff)
        .fetch_all(&self.reads)
        .await?)
    }

    /// When each device's latest health report arrived (the manager's clock).
    pub async fn last_health_times(&self) -> Result<Vec<(String, String)>> {
        Ok(sqlx::query_as(
            "SELECT device_id, MAX(time) FROM history WHERE kind = 'health' GROUP BY device_id",
        )
        .fetch_all(&self.reads)
        .await?)
    }

    /// How many devices of every deployment are at each status.
    pub async fn deployment_statuses(&self) -> Result<Vec<(String, i64)>> {
        Ok(
            sqlx::query_as("SELECT status, COUNT(*) FROM deployment_devices GROUP BY status")
                .fetch_all(&self.reads)
                .await?,
        )
    }

    /// Marks devices not heard from since `cutoff` offline; returns how many.
    pub async fn mark_silent_offline(&self, cutoff: &str) -> Result<u64> {
        let marked = sqlx::query(
            "UPDATE device_state SET online = 0
             WHERE online = 1 AND (last_seen IS NULL OR last_seen < $1)",
        )
        .bind(cutoff)
        .execute(&self.pool)
        .await?;
        Ok(marked.rows_affected())
    }
}

/// Adds a device or replaces its password hash and tags (within `tx`).
/// Inserts or replaces a device's row (within `tx`); true when it replaced one.
async fn upsert_device(
    tx: &mut AnyConnection,
    id: &DeviceId,
    hash: &str,
    tags: &[String],
) -> Result<bool> {
    let before: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM devices WHERE id = $1")
        .bind(id.as_str())
        .fetch_one(&mut *tx)
        .await?;
    sqlx::query(
        "INSERT INTO devices (id, password_sha256, tags, created) VALUES ($1, $2, $3, $4)
         ON CONFLICT (id) DO UPDATE SET password_sha256 = $2, tags = $3",
    )
    .bind(id.as_str())
    .bind(hash)
    .bind(serde_json::to_string(tags)?)
    .bind(now())
    .execute(tx)
    .await?;
    Ok(before > 0)
}

/// Sets a device's desired state (within `tx`). Its entries in earlier
/// deployments of `service` that have not ended are marked `superseded`:
/// the device no longer holds their release as desired, and would otherwise
/// show as pending forever.
async fn set_desired(
    tx: &mut AnyConnection,
    device: &str,
    payload: &str,
    service: &str,
    by: &str,
) -> Result<()> {
    sqlx::query(
        "INSERT INTO desired (device_id, payload) VALUES ($1, $2)
         ON CONFLICT (device_id) DO UPDATE SET payload = $2",
    )
    .bind(device)
    .bind(payload)
    .execute(&mut *tx)
    .await?;
    sqlx::query(
        "UPDATE deployment_devices SET status = 'superseded', reason = $3, updated = $4
         WHERE device_id = $1 AND status IN ('pending', 'installing')
           AND deployment_id IN (SELECT id FROM deployments WHERE service = $2)",
    )
    .bind(device)
    .bind(service)
    .bind(format!("replaced by {by}"))
    .bind(now())
    .execute(&mut *tx)
    .await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passwords_are_salted_and_old_hashes_still_verify() {
        let (a, b) = (password_hash("secret"), password_hash("secret"));
        assert_ne!(a, b, "the same password hashed twice with one salt");
        assert!(a.starts_with("s1$") && !a.contains(&hex::encode(Sha256::digest(b"secret"))));
        assert!(verify_password(&a, "secret") && verify_password(&b, "secret"));
        assert!(!verify_password(&a, "secreT"));
        // A database from before salts keeps working.
        let old = hex::encode(Sha256::digest(b"secret"));
        assert!(verify_password(&old, "secret") && !verify_password(&old, "other"));
        assert!(!verify_password("s1$zz$00", "secret"));
        assert!(!verify_password("s9$00$00$00", "secret"));
    }
}
