//! Device identities as stored: enrolment tokens (hashed, one use, with an
//! expiry), each device's public key, and the serial of every certificate
//! issued to it. A certificate is honoured only while its serial is here:
//! revoking a device deletes them, and the broker and the HTTP API refuse
//! it at once, not when the certificate expires.

use ferry_protocol::DeviceId;
use sqlx::AnyConnection;

use super::{Result, Store, StoreError, token_hash, upsert_device};

/// The password column of a device that has none (certificate devices):
/// no password verifies against it.
pub const NO_PASSWORD: &str = "!";

/// Now, in Unix seconds: the clock certificates and tokens are kept by.
pub fn unix_now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or_default()
}

/// How many of a device's certificates stand at once. More than one, so a
/// connection made with the certificate just replaced can still be made
/// again while the agent swaps in the new one; few, because each renewal
/// adds one and a device holding its key may ask as often as it likes.
pub const LIVE_CERTIFICATES: i64 = 3;

/// What an enrolment request may do, decided from the store.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Enrolment {
    /// The key is the one on record: a renewal.
    Renewal,
    /// The token was good: the key is on record now and the token spent.
    Enrolled,
    /// Neither: why, in a sentence (for the operator's log, not the caller).
    Refused(&'static str),
}

impl Store {
    /// Registers `id` (or registers it again) for enrolment: no password,
    /// a new one-time token valid until `expires` (Unix seconds), and no
    /// key or certificate from before. True when it was registered before.
    pub async fn add_enrolling_device(
        &self,
        id: &DeviceId,
        token: &str,
        expires: i64,
        tags: &[String],
    ) -> Result<bool> {
        let mut tx = self.pool.begin().await?;
        let replaced = upsert_device(&mut tx, id, NO_PASSWORD, tags).await?;
        forget_identity(&mut tx, id.as_str()).await?;
        sqlx::query(
            "INSERT INTO enrolments (device_id, token_sha256, expires) VALUES ($1, $2, $3)",
        )
        .bind(id.as_str())
        .bind(token_hash(token))
        .bind(expires)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(replaced)
    }

    /// Decides an enrolment request whose signature has been checked:
    /// `key` (hex) and the `token` it carried, at `now` (Unix seconds).
    pub async fn enrol(
        &self,
        id: &str,
        key: &str,
        token: Option<&str>,
        now: i64,
    ) -> Result<Enrolment> {
        let mut tx = self.pool.begin().await?;
        let on_record: Option<String> =
            sqlx::query_scalar("SELECT public_key FROM device_keys WHERE device_id = $1")
                .bind(id)
                .fetch_optional(&mut *tx)
                .await?;
        if on_record.as_deref() == Some(key) {
            return Ok(Enrolment::Renewal);
        }
        let Some(token) = token else {
            return Ok(Enrolment::Refused(if on_record.is_some() {
                "not the key on record, and no enrolment token"
            } else {
                "not enrolled, and no enrolment token"
            }));
        };
        let spent = sqlx::query(
            "DELETE FROM enrolments WHERE device_id = $1 AND token_sha256 = $2 AND expires > $3",
        )
        .bind(id)
        .bind(token_hash(token))
        .bind(now)
        .execute(&mut *tx)
        .await?;
        if spent.rows_affected() != 1 {
            return Ok(Enrolment::Refused(
                "the enrolment token is wrong, spent or expired",
            ));
        }
        sqlx::query(
            "INSERT INTO device_keys (device_id, public_key) VALUES ($1, $2)
             ON CONFLICT (device_id) DO UPDATE SET public_key = $2",
        )
        .bind(id)
        .bind(key)
        .execute(&mut *tx)
        .await?;
        // Certificates for an earlier key are no one's now.
        sqlx::query("DELETE FROM device_certs WHERE device_id = $1")
            .bind(id)
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(Enrolment::Enrolled)
    }

    /// Records a certificate issued to `device` (its serial, lowercase hex
    /// without leading zeros, as X.509 parsers print it), and forgets those
    /// that have expired and all but the device's newest
    /// [`LIVE_CERTIFICATES`]: a device that asks for renewals without end
    /// grows nothing.
    pub async fn record_certificate(
        &self,
        serial: &str,
        device: &str,
        not_after: i64,
        now: i64,
    ) -> Result<()> {
        let mut tx = self.pool.begin().await?;
        sqlx::query("DELETE FROM device_certs WHERE not_after <= $1")
            .bind(now)
            .execute(&mut *tx)
            .await?;
        // `issued` counts the device's certificates, so the newest wins a
        // tie on expiry (two renewals in one second).
        sqlx::query(
            "INSERT INTO device_certs (serial, device_id, not_after, issued)
             VALUES ($1, $2, $3,
                     (SELECT COALESCE(MAX(issued), 0) + 1 FROM device_certs WHERE device_id = $2))",
        )
        .bind(serial)
        .bind(device)
        .bind(not_after)
        .execute(&mut *tx)
        .await?;
        sqlx::query(
            "DELETE FROM device_certs WHERE device_id = $1 AND serial NOT IN
               (SELECT serial FROM device_certs WHERE device_id = $1
                ORDER BY not_after DESC, issued DESC LIMIT $2)",
        )
        .bind(device)
        .bind(LIVE_CERTIFICATES)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(())
    }

    /// The device a certificate serial was issued to, while it stands (not
    /// revoked, not expired at `now`: a resumed TLS session is not checked
    /// for expiry again).
    pub async fn certificate_device(&self, serial: &str, now: i64) -> Result<Option<String>> {
        Ok(sqlx::query_scalar(
            "SELECT device_id FROM device_certs WHERE serial = $1 AND not_after > $2",
        )
        .bind(serial)
        .bind(now)
        .fetch_optional(&self.reads)
        .await?)
    }

    /// How a device proves itself now: `certificate` (with the newest
    /// certificate's serial and expiry), `enrolling` (a token not used
    /// yet), `password`, or `revoked`.
    pub async fn credential_of(&self, id: &str) -> Result<Option<serde_json::Value>> {
        let Some(hash) = self.password_hash_of(id).await? else {
            return Ok(None);
        };
        let newest: Option<(String, i64)> = sqlx::query_as(
            "SELECT serial, not_after FROM device_certs WHERE device_id = $1
             ORDER BY not_after DESC, issued DESC LIMIT 1",
        )
        .bind(id)
        .fetch_optional(&self.reads)
        .await?;
        let count = |statement: &'static str| async move {
            let n: i64 = sqlx::query_scalar(statement)
                .bind(id)
                .fetch_one(&self.reads)
                .await?;
            Ok::<_, StoreError>(n > 0)
        };
        let enrolling = count("SELECT COUNT(*) FROM enrolments WHERE device_id = $1").await?;
        let keyed = count("SELECT COUNT(*) FROM device_keys WHERE device_id = $1").await?;
        Ok(Some(match newest {
            Some((serial, not_after)) => serde_json::json!({
                "kind": "certificate", "serial": serial,
                "not_after": ferry_protocol::Timestamp::from_unix_secs(not_after.max(0) as u64),
            }),
            None if enrolling => serde_json::json!({ "kind": "enrolling" }),
            None if keyed => serde_json::json!({ "kind": "certificate" }),
            None if hash != NO_PASSWORD => serde_json::json!({ "kind": "password" }),
            None => serde_json::json!({ "kind": "revoked" }),
        }))
    }

    /// Revokes every credential of a device (certificates, key, pending
    /// token, password) and keeps its record and history. False when
    /// there is no such device.
    pub async fn revoke_device(&self, id: &str) -> Result<bool> {
        let mut tx = self.pool.begin().await?;
        let found = sqlx::query("UPDATE devices SET password_sha256 = $2 WHERE id = $1")
            .bind(id)
            .bind(NO_PASSWORD)
            .execute(&mut *tx)
            .await?;
        forget_identity(&mut tx, id).await?;
        tx.commit().await?;
        Ok(found.rows_affected() == 1)
    }
}

/// Deletes a device's key, certificates and enrolment token.
pub(super) async fn forget_identity(tx: &mut AnyConnection, id: &str) -> Result<()> {
    for statement in [
        "DELETE FROM enrolments WHERE device_id = $1",
        "DELETE FROM device_keys WHERE device_id = $1",
        "DELETE FROM device_certs WHERE device_id = $1",
    ] {
        sqlx::query(statement).bind(id).execute(&mut *tx).await?;
    }
    Ok(())
}
