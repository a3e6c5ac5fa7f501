//! The manager's state in SQLite: devices and their credentials, releases,
//! desired state, deployments, and what devices report (latest plus a
//! bounded history of health and events).

use std::path::Path;
use std::sync::Mutex;

use ferry_protocol::{DeviceId, Sha256Digest, Timestamp};
use rusqlite::{Connection, OptionalExtension, params};
use serde::Serialize;
use sha2::{Digest, Sha256};

mod identity;
mod rollouts;

pub use identity::{Enrolment, NO_PASSWORD, unix_now};
pub use rollouts::{DeviceStep, RolloutDevice, RolloutRow};

/// How many health reports and events are kept per device.
pub const HISTORY: i64 = 200;

/// Store errors.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// SQLite said no.
    #[error("database: {0}")]
    Sql(#[from] rusqlite::Error),
    /// Stored JSON that no longer reads.
    #[error("stored data: {0}")]
    Json(#[from] serde_json::Error),
    /// Stored data that reads but does not make sense.
    #[error("stored data: {0}")]
    Invalid(String),
}

type Result<T> = std::result::Result<T, StoreError>;

/// The database behind a lock: SQLite serialises writers anyway, and every
/// statement here is short.
pub struct Store {
    db: Mutex<Connection>,
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
#[derive(Debug, Clone)]
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
    /// Opens (creating if needed) the database at `path`.
    pub fn open(path: &Path) -> Result<Self> {
        let db = Connection::open(path)?;
        db.execute_batch(
            "PRAGMA journal_mode = WAL;
             PRAGMA synchronous = NORMAL;
             CREATE TABLE IF NOT EXISTS devices (
                 id TEXT PRIMARY KEY, password_sha256 TEXT NOT NULL,
                 tags TEXT NOT NULL DEFAULT '[]', created TEXT NOT NULL);
             CREATE TABLE IF NOT EXISTS device_state (
                 device_id TEXT PRIMARY KEY, online INTEGER NOT NULL DEFAULT 0,
                 last_seen TEXT, reported TEXT, health TEXT);
             CREATE TABLE IF NOT EXISTS releases (
                 service TEXT NOT NULL, version TEXT NOT NULL, sequence INTEGER NOT NULL,
                 sha256 TEXT NOT NULL, size INTEGER NOT NULL, envelope TEXT NOT NULL,
                 created TEXT NOT NULL, PRIMARY KEY (service, version));
             CREATE TABLE IF NOT EXISTS desired (device_id TEXT PRIMARY KEY, payload TEXT NOT NULL);
             CREATE TABLE IF NOT EXISTS deployments (
                 id INTEGER PRIMARY KEY AUTOINCREMENT, service TEXT NOT NULL,
                 version TEXT NOT NULL, created TEXT NOT NULL);
             CREATE TABLE IF NOT EXISTS deployment_devices (
                 deployment_id INTEGER NOT NULL, device_id TEXT NOT NULL, status TEXT NOT NULL,
                 reason TEXT, updated TEXT NOT NULL, PRIMARY KEY (deployment_id, device_id));
             CREATE TABLE IF NOT EXISTS history (
                 id INTEGER PRIMARY KEY AUTOINCREMENT, device_id TEXT NOT NULL,
                 kind TEXT NOT NULL, time TEXT NOT NULL, payload TEXT NOT NULL);
             CREATE INDEX IF NOT EXISTS history_by_device ON history (device_id, kind, id);
             CREATE TABLE IF NOT EXISTS rollouts (
                 id INTEGER PRIMARY KEY AUTOINCREMENT, service TEXT NOT NULL,
                 version TEXT NOT NULL, plan TEXT NOT NULL, state TEXT NOT NULL,
                 reason TEXT, created TEXT NOT NULL, updated TEXT NOT NULL);
             CREATE TABLE IF NOT EXISTS tokens (
                 name TEXT PRIMARY KEY, scope TEXT NOT NULL, sha256 TEXT NOT NULL UNIQUE,
                 created TEXT NOT NULL);
             CREATE TABLE IF NOT EXISTS roots (
                 version INTEGER PRIMARY KEY, signed TEXT NOT NULL, created TEXT NOT NULL);
             CREATE TABLE IF NOT EXISTS rollout_devices (
                 rollout_id INTEGER NOT NULL, device_id TEXT NOT NULL,
                 position INTEGER NOT NULL, status TEXT NOT NULL, reason TEXT,
                 sent_at TEXT, updated TEXT NOT NULL, PRIMARY KEY (rollout_id, device_id));
             CREATE TABLE IF NOT EXISTS enrolments (
                 device_id TEXT PRIMARY KEY, token_sha256 TEXT NOT NULL, expires INTEGER NOT NULL);
             CREATE TABLE IF NOT EXISTS device_keys (
                 device_id TEXT PRIMARY KEY, public_key TEXT NOT NULL);
             CREATE TABLE IF NOT EXISTS device_certs (
                 serial TEXT PRIMARY KEY, device_id TEXT NOT NULL, not_after INTEGER NOT NULL);
             CREATE INDEX IF NOT EXISTS device_certs_by_device ON device_certs (device_id);
             CREATE INDEX IF NOT EXISTS device_certs_by_expiry ON device_certs (not_after);",
        )?;
        Ok(Self { db: Mutex::new(db) })
    }

    fn db(&self) -> std::sync::MutexGuard<'_, Connection> {
        self.db.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Registers a device with a password, or replaces its credentials
    /// (a certificate it had included) and tags.
    pub fn add_device(&self, id: &DeviceId, password: &str, tags: &[String]) -> Result<()> {
        self.add_device_with_hash(id, &password_hash(password), tags)?;
        let mut db = self.db();
        let tx = db.transaction()?;
        identity::forget_identity(&tx, id.as_str())?;
        tx.commit()?;
        Ok(())
    }

    fn add_device_with_hash(&self, id: &DeviceId, hash: &str, tags: &[String]) -> Result<()> {
        self.db().execute(
            "INSERT INTO devices (id, password_sha256, tags, created) VALUES (?1, ?2, ?3, ?4)
             ON CONFLICT (id) DO UPDATE SET password_sha256 = ?2, tags = ?3",
            params![id.as_str(), hash, serde_json::to_string(tags)?, now()],
        )?;
        Ok(())
    }

    /// Adds a named operator token (its hash); false when the name is taken.
    pub fn add_token(&self, name: &str, scope: &str, token: &str) -> Result<bool> {
        let added = self.db().execute(
            "INSERT INTO tokens (name, scope, sha256, created) VALUES (?1, ?2, ?3, ?4)
             ON CONFLICT (name) DO NOTHING",
            params![name, scope, token_hash(token), now()],
        )?;
        Ok(added == 1)
    }

    /// The name and scope of the token presented, if it is one.
    pub fn token(&self, token: &str) -> Result<Option<(String, String)>> {
        Ok(self
            .db()
            .query_row(
                "SELECT name, scope FROM tokens WHERE sha256 = ?1",
                [token_hash(token)],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .optional()?)
    }

    /// Every named token: name, scope, when made (never the token).
    pub fn tokens(&self) -> Result<Vec<serde_json::Value>> {
        let db = self.db();
        let mut stmt = db.prepare("SELECT name, scope, created FROM tokens ORDER BY name")?;
        let rows = stmt.query_map([], |r| {
            Ok(serde_json::json!({
                "name": r.get::<_, String>(0)?,
                "scope": r.get::<_, String>(1)?,
                "created": r.get::<_, String>(2)?,
            }))
        })?;
        Ok(rows.collect::<std::result::Result<_, _>>()?)
    }

    /// Revokes a named token; false when there is none.
    pub fn remove_token(&self, name: &str) -> Result<bool> {
        Ok(self
            .db()
            .execute("DELETE FROM tokens WHERE name = ?1", [name])?
            == 1)
    }

    /// Forgets a device: its credentials, state, desired state and history
    /// (rollouts keep their record of it). False when there was none.
    pub fn remove_device(&self, id: &str) -> Result<bool> {
        let mut db = self.db();
        let tx = db.transaction()?;
        let removed = tx.execute("DELETE FROM devices WHERE id = ?1", params![id])?;
        for table in ["device_state", "desired", "history"] {
            tx.execute(
                &format!("DELETE FROM {table} WHERE device_id = ?1"),
                params![id],
            )?;
        }
        identity::forget_identity(&tx, id)?;
        tx.commit()?;
        Ok(removed > 0)
    }

    /// Replaces a device's tags; false when there is no such device.
    pub fn set_tags(&self, id: &str, tags: &[String]) -> Result<bool> {
        let changed = self.db().execute(
            "UPDATE devices SET tags = ?2 WHERE id = ?1",
            params![id, serde_json::to_string(tags)?],
        )?;
        Ok(changed == 1)
    }

    /// The stored password hash of a device.
    pub fn password_hash_of(&self, id: &str) -> Result<Option<String>> {
        Ok(self
            .db()
            .query_row(
                "SELECT password_sha256 FROM devices WHERE id = ?1",
                [id],
                |r| r.get(0),
            )
            .optional()?)
    }

    /// Every device with its latest state.
    pub fn devices(&self) -> Result<Vec<DeviceRow>> {
        self.devices_where(None)
    }

    /// One device.
    pub fn device(&self, id: &str) -> Result<Option<DeviceRow>> {
        Ok(self.devices_where(Some(id))?.pop())
    }

    /// Every device, or the one named.
    fn devices_where(&self, id: Option<&str>) -> Result<Vec<DeviceRow>> {
        let db = self.db();
        let mut stmt = db.prepare_cached(
            "SELECT d.id, d.tags, COALESCE(s.online, 0), s.last_seen, s.reported, s.health
             FROM devices d LEFT JOIN device_state s ON s.device_id = d.id
             WHERE ?1 IS NULL OR d.id = ?1 ORDER BY d.id",
        )?;
        let rows = stmt.query_map([id], |r| {
            Ok((
                r.get::<_, String>(0)?,
                r.get::<_, String>(1)?,
                r.get::<_, bool>(2)?,
                r.get::<_, Option<String>>(3)?,
                r.get::<_, Option<String>>(4)?,
                r.get::<_, Option<String>>(5)?,
            ))
        })?;
        let mut out = Vec::new();
        for row in rows {
            let (device_id, tags, online, last_seen, reported, health) = row?;
            out.push(DeviceRow {
                device_id,
                tags: serde_json::from_str(&tags)?,
                online,
                last_seen,
                reported: reported.map(|r| serde_json::from_str(&r)).transpose()?,
                health: health.map(|h| serde_json::from_str(&h)).transpose()?,
            });
        }
        Ok(out)
    }

    /// Whether `device`'s desired state names the artifact `sha256`: the
    /// only artifacts a device may fetch, over HTTP or MQTT.
    pub fn desires_artifact(&self, device: &str, sha256: &Sha256Digest) -> Result<bool> {
        use ferry_protocol::messages::{Desired, Message};
        let Some(text) = self.desired(device)? else {
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
    pub fn record_many(&self, records: &[Record]) -> Result<()> {
        let mut db = self.db();
        let tx = db.transaction()?;
        let mut trimmed: Vec<(&str, &str)> = Vec::new();
        for r in records {
            let (device, text, time) = (r.device.as_str(), r.payload.as_str(), r.time.as_str());
            tx.prepare_cached(
                "INSERT INTO device_state (device_id, last_seen) VALUES (?1, ?2)
                 ON CONFLICT (device_id) DO UPDATE SET last_seen = ?2",
            )?
            .execute(params![device, time])?;
            match r.kind {
                "reported" => {
                    tx.prepare_cached(
                        "UPDATE device_state SET reported = ?2 WHERE device_id = ?1",
                    )?
                    .execute(params![device, text])?;
                }
                "health" => {
                    tx.prepare_cached(
                        "UPDATE device_state SET health = ?2, online = 1 WHERE device_id = ?1",
                    )?
                    .execute(params![device, text])?;
                }
                "status" => {
                    let online = text.contains("\"online\"");
                    tx.prepare_cached("UPDATE device_state SET online = ?2 WHERE device_id = ?1")?
                        .execute(params![device, online])?;
                }
                _ => {}
            }
            if r.kind == "health" || r.kind == "events" {
                tx.prepare_cached(
                    "INSERT INTO history (device_id, kind, time, payload) VALUES (?1, ?2, ?3, ?4)",
                )?
                .execute(params![device, r.kind, time, text])?;
                if !trimmed.contains(&(device, r.kind)) {
                    trimmed.push((device, r.kind));
                }
            }
        }
        for (device, kind) in trimmed {
            tx.prepare_cached(
                "DELETE FROM history WHERE device_id = ?1 AND kind = ?2 AND id <= (
                     SELECT id FROM history WHERE device_id = ?1 AND kind = ?2
                     ORDER BY id DESC LIMIT 1 OFFSET ?3)",
            )?
            .execute(params![device, kind, HISTORY])?;
        }
        tx.commit()?;
        Ok(())
    }

    /// The history of one kind ("health" or "events") after row `after`,
    /// oldest first: (row id, device, payload).
    pub fn history(
        &self,
        kind: &str,
        device: Option<&str>,
        after: i64,
        limit: i64,
    ) -> Result<Vec<(i64, String, serde_json::Value)>> {
        let db = self.db();
        let mut stmt = db.prepare(
            "SELECT id, device_id, payload FROM history
             WHERE kind = ?1 AND id > ?2 AND (?3 IS NULL OR device_id = ?3)
             ORDER BY id DESC LIMIT ?4",
        )?;
        let rows = stmt.query_map(params![kind, after, device, limit], |r| {
            Ok((
                r.get::<_, i64>(0)?,
                r.get::<_, String>(1)?,
                r.get::<_, String>(2)?,
            ))
        })?;
        let mut out = Vec::new();
        for row in rows {
            let (id, device, payload) = row?;
            out.push((id, device, serde_json::from_str(&payload)?));
        }
        out.reverse();
        Ok(out)
    }

    /// Stores a published release. A service's version and its sequence each
    /// name one release for good: publishing the same envelope again changes
    /// nothing, and different bytes under a taken version or sequence are
    /// refused (otherwise whoever holds the operator token could swap what
    /// an old version means, say for a revert to sign).
    pub fn add_release(
        &self,
        service: &str,
        version: &str,
        sequence: u64,
        sha256: &Sha256Digest,
        size: u64,
        envelope: &str,
    ) -> Result<Published> {
        let mut db = self.db();
        let tx = db.transaction()?;
        let taken: Option<(String, i64, String)> = tx
            .query_row(
                "SELECT version, sequence, envelope FROM releases
                 WHERE service = ?1 AND (version = ?2 OR sequence = ?3) LIMIT 1",
                params![service, version, sequence as i64],
                |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
            )
            .optional()?;
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
        tx.execute(
            "INSERT INTO releases (service, version, sequence, sha256, size, envelope, created)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
            params![
                service,
                version,
                sequence as i64,
                sha256.to_string(),
                size as i64,
                envelope,
                now()
            ],
        )?;
        tx.commit()?;
        Ok(Published::Added)
    }

    /// Every release, newest sequence first per service.
    pub fn releases(&self) -> Result<Vec<ReleaseRow>> {
        let db = self.db();
        let mut stmt = db.prepare(
            "SELECT service, version, sequence, sha256, size, created, envelope FROM releases
             ORDER BY service, sequence DESC",
        )?;
        let rows = stmt.query_map([], |r| {
            Ok(ReleaseRow {
                service: r.get(0)?,
                version: r.get(1)?,
                sequence: r.get::<_, i64>(2)? as u64,
                sha256: r.get(3)?,
                size: r.get::<_, i64>(4)? as u64,
                created: r.get(5)?,
                envelope: r.get(6)?,
            })
        })?;
        Ok(rows.collect::<std::result::Result<_, _>>()?)
    }

    /// One release.
    pub fn release(&self, service: &str, version: &str) -> Result<Option<ReleaseRow>> {
        Ok(self
            .releases()?
            .into_iter()
            .find(|r| r.service == service && r.version == version))
    }

    /// The trust roots published (signed JSON), oldest first.
    pub fn roots(&self) -> Result<Vec<String>> {
        let db = self.db();
        let mut stmt = db.prepare("SELECT signed FROM roots ORDER BY version")?;
        let rows = stmt.query_map([], |r| r.get(0))?;
        Ok(rows.collect::<std::result::Result<_, _>>()?)
    }

    /// Adds trust root `version` (checked by the caller to follow the
    /// newest) and rewrites every device's desired state with `rewrite`,
    /// in one transaction; the rewritten payloads, to send.
    pub fn add_root(
        &self,
        version: u64,
        signed: &str,
        rewrite: impl Fn(&str) -> Option<String>,
    ) -> Result<Vec<(String, String)>> {
        let mut db = self.db();
        let tx = db.transaction()?;
        tx.execute(
            "INSERT INTO roots (version, signed, created) VALUES (?1, ?2, ?3)",
            params![version as i64, signed, now()],
        )?;
        let all: Vec<(String, String)> = {
            let mut stmt = tx.prepare("SELECT device_id, payload FROM desired")?;
            let rows = stmt.query_map([], |r| Ok((r.get(0)?, r.get(1)?)))?;
            rows.collect::<std::result::Result<_, _>>()?
        };
        let mut changed = Vec::new();
        for (device, payload) in all {
            if let Some(new) = rewrite(&payload) {
                tx.execute(
                    "UPDATE desired SET payload = ?2 WHERE device_id = ?1",
                    params![device, new],
                )?;
                changed.push((device, new));
            }
        }
        tx.commit()?;
        Ok(changed)
    }

    /// Every device's desired state payload, in device order.
    pub fn all_desired(&self) -> Result<Vec<(String, String)>> {
        let db = self.db();
        let mut stmt = db.prepare("SELECT device_id, payload FROM desired ORDER BY device_id")?;
        let rows = stmt.query_map([], |r| Ok((r.get(0)?, r.get(1)?)))?;
        Ok(rows.collect::<std::result::Result<_, _>>()?)
    }

    /// The ids and tags of every device, in id order: what a selector picks
    /// from, without the reports.
    pub fn device_tags(&self) -> Result<Vec<DeviceTags>> {
        let db = self.db();
        let mut stmt = db.prepare_cached("SELECT id, tags FROM devices ORDER BY id")?;
        let rows = stmt.query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?)))?;
        let mut out = Vec::new();
        for row in rows {
            let (device_id, tags) = row?;
            out.push(DeviceTags {
                device_id,
                tags: serde_json::from_str(&tags)?,
            });
        }
        Ok(out)
    }

    /// The device's desired state payload, if any.
    pub fn desired(&self, device: &str) -> Result<Option<String>> {
        Ok(self
            .db()
            .query_row(
                "SELECT payload FROM desired WHERE device_id = ?1",
                [device],
                |r| r.get(0),
            )
            .optional()?)
    }

    /// Records a new deployment; returns its id.
    pub fn add_deployment(&self, service: &str, version: &str) -> Result<i64> {
        let db = self.db();
        db.execute(
            "INSERT INTO deployments (service, version, created) VALUES (?1, ?2, ?3)",
            params![service, version, now()],
        )?;
        Ok(db.last_insert_rowid())
    }

    /// Sets the new desired payload of each device in deployment `id`, and
    /// starts tracking its progress; all or nothing.
    pub fn add_deployment_targets(&self, id: i64, desired: &[(String, String)]) -> Result<()> {
        let mut db = self.db();
        let tx = db.transaction()?;
        let time = now();
        let service: String =
            tx.query_row("SELECT service FROM deployments WHERE id = ?1", [id], |r| {
                r.get(0)
            })?;
        for (device, payload) in desired {
            set_desired(&tx, device, payload, &service, &format!("deployment {id}"))?;
            tx.execute(
                "INSERT INTO deployment_devices (deployment_id, device_id, status, updated) VALUES (?1, ?2, 'pending', ?3)",
                params![id, device, time],
            )?;
        }
        tx.commit()?;
        Ok(())
    }

    /// Why `device` rolled `service` `version` back before, if it did (in a
    /// deployment or a rollout): it will not try that release again.
    pub fn rolled_back_on(
        &self,
        device: &str,
        service: &str,
        version: &str,
    ) -> Result<Option<String>> {
        let db = self.db();
        Ok(db
            .query_row(
                "SELECT reason FROM (
                     SELECT dd.reason AS reason, dd.updated AS updated
                       FROM deployment_devices dd JOIN deployments d ON d.id = dd.deployment_id
                      WHERE dd.device_id = ?1 AND d.service = ?2 AND d.version = ?3
                        AND dd.status = 'rolled_back'
                     UNION ALL
                     SELECT rd.reason, rd.updated
                       FROM rollout_devices rd JOIN rollouts r ON r.id = rd.rollout_id
                      WHERE rd.device_id = ?1 AND r.service = ?2 AND r.version = ?3
                        AND rd.status = 'rolled_back')
                 ORDER BY updated DESC LIMIT 1",
                params![device, service, version],
                |r| r.get::<_, Option<String>>(0),
            )
            .optional()?
            .map(|reason| reason.unwrap_or_else(|| "no reason given".into())))
    }

    /// Starts tracking devices the deployment will not reach: each ends at
    /// once as `rejected`, with why.
    pub fn add_deployment_refusals(&self, id: i64, refused: &[(String, String)]) -> Result<()> {
        let mut db = self.db();
        let tx = db.transaction()?;
        let time = now();
        for (device, reason) in refused {
            tx.execute(
                "INSERT INTO deployment_devices (deployment_id, device_id, status, reason, updated)
                 VALUES (?1, ?2, 'rejected', ?3, ?4)",
                params![id, device, reason, time],
            )?;
        }
        tx.commit()?;
        Ok(())
    }

    /// Updates a device's progress in a deployment (from its events and reports).
    pub fn set_deployment_status(
        &self,
        id: i64,
        device: &str,
        status: &str,
        reason: Option<&str>,
    ) -> Result<()> {
        self.db().execute(
            "UPDATE deployment_devices SET status = ?3, reason = ?4, updated = ?5
             WHERE deployment_id = ?1 AND device_id = ?2 AND status NOT IN ('installed', 'failed', 'rolled_back', 'rejected')",
            params![id, device, status, reason, now()],
        )?;
        Ok(())
    }

    /// Deployments, newest first.
    pub fn deployments(&self) -> Result<Vec<DeploymentRow>> {
        let db = self.db();
        let mut stmt =
            db.prepare("SELECT id, service, version, created FROM deployments ORDER BY id DESC")?;
        let heads = stmt
            .query_map([], |r| {
                Ok((r.get::<_, i64>(0)?, r.get(1)?, r.get(2)?, r.get(3)?))
            })?
            .collect::<std::result::Result<Vec<(i64, String, String, String)>, _>>()?;
        let mut targets = db.prepare(
            "SELECT device_id, status, reason, updated FROM deployment_devices WHERE deployment_id = ?1 ORDER BY device_id",
        )?;
        let mut out = Vec::new();
        for (id, service, version, created) in heads {
            let devices = targets
                .query_map([id], |r| {
                    Ok(DeploymentTarget {
                        device_id: r.get(0)?,
                        status: r.get(1)?,
                        reason: r.get(2)?,
                        updated: r.get(3)?,
                    })
                })?
                .collect::<std::result::Result<_, _>>()?;
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

    /// When each device's latest health report arrived (the manager's clock).
    pub fn last_health_times(&self) -> Result<Vec<(String, String)>> {
        let db = self.db();
        let mut stmt = db.prepare(
            "SELECT device_id, MAX(time) FROM history WHERE kind = 'health' GROUP BY device_id",
        )?;
        let rows = stmt.query_map([], |r| Ok((r.get(0)?, r.get(1)?)))?;
        Ok(rows.collect::<std::result::Result<_, _>>()?)
    }

    /// How many devices of every deployment are at each status.
    pub fn deployment_statuses(&self) -> Result<Vec<(String, i64)>> {
        let db = self.db();
        let mut stmt =
            db.prepare("SELECT status, COUNT(*) FROM deployment_devices GROUP BY status")?;
        let rows = stmt.query_map([], |r| Ok((r.get(0)?, r.get(1)?)))?;
        Ok(rows.collect::<std::result::Result<_, _>>()?)
    }

    /// Marks devices not heard from since `cutoff` offline; returns them.
    pub fn mark_silent_offline(&self, cutoff: &str) -> Result<usize> {
        Ok(self.db().execute(
            "UPDATE device_state SET online = 0 WHERE online = 1 AND (last_seen IS NULL OR last_seen < ?1)",
            [cutoff],
        )?)
    }
}

/// Sets a device's desired state (within `tx`). Its entries in earlier
/// deployments of `service` that have not ended are marked `superseded`:
/// the device no longer holds their release as desired, and would otherwise
/// show as pending forever.
fn set_desired(
    tx: &rusqlite::Transaction,
    device: &str,
    payload: &str,
    service: &str,
    by: &str,
) -> Result<()> {
    tx.execute(
        "INSERT INTO desired (device_id, payload) VALUES (?1, ?2)
         ON CONFLICT (device_id) DO UPDATE SET payload = ?2",
        params![device, payload],
    )?;
    tx.execute(
        "UPDATE deployment_devices SET status = 'superseded', reason = ?3, updated = ?4
         WHERE device_id = ?1 AND status IN ('pending', 'installing')
           AND deployment_id IN (SELECT id FROM deployments WHERE service = ?2)",
        params![device, service, format!("replaced by {by}"), now()],
    )?;
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

    fn record(device: &str, kind: &'static str, payload: &str) -> Record {
        Record {
            device: device.into(),
            kind,
            payload: payload.into(),
            time: now(),
        }
    }

    #[test]
    fn a_batch_records_in_order_and_trims_history_once() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("ferry.db")).unwrap();
        let id = DeviceId::new("gw-1").unwrap();
        store.add_device(&id, "pw", &[]).unwrap();
        let mut batch: Vec<Record> = (0..HISTORY + 50)
            .map(|i| record("gw-1", "health", &format!("{{\"n\":{i}}}")))
            .collect();
        // The last word in a batch wins: online, then offline.
        batch.push(record("gw-1", "status", r#"{"state":"online"}"#));
        batch.push(record("gw-1", "status", r#"{"state":"offline"}"#));
        store.record_many(&batch).unwrap();
        let device = store.device("gw-1").unwrap().unwrap();
        assert!(!device.online);
        assert_eq!(device.health.unwrap()["n"], HISTORY + 49);
        let history = store.history("health", Some("gw-1"), 0, 1000).unwrap();
        assert_eq!(history.len() as i64, HISTORY);
        assert!(store.device("gw-2").unwrap().is_none());
    }
}
