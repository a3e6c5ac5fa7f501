//! Device identities as stored: enrolment tokens (hashed, one use, with an
//! expiry), each device's public key, and the serial of every certificate
//! issued to it. A certificate is honoured only while its serial is here:
//! revoking a device deletes them, and the broker and the HTTP API refuse
//! it at once, not when the certificate expires.

use ferry_protocol::DeviceId;
use rusqlite::{OptionalExtension, params};

use super::{Result, Store, token_hash};

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
    /// key or certificate from before.
    pub fn add_enrolling_device(
        &self,
        id: &DeviceId,
        token: &str,
        expires: i64,
        tags: &[String],
    ) -> Result<()> {
        self.add_device_with_hash(id, NO_PASSWORD, tags)?;
        let mut db = self.db();
        let tx = db.transaction()?;
        forget_identity(&tx, id.as_str())?;
        tx.execute(
            "INSERT INTO enrolments (device_id, token_sha256, expires) VALUES (?1, ?2, ?3)",
            params![id.as_str(), token_hash(token), expires],
        )?;
        tx.commit()?;
        Ok(())
    }

    /// Decides an enrolment request whose signature has been checked:
    /// `key` (hex) and the `token` it carried, at `now` (Unix seconds).
    pub fn enrol(&self, id: &str, key: &str, token: Option<&str>, now: i64) -> Result<Enrolment> {
        let mut db = self.db();
        let tx = db.transaction()?;
        let on_record: Option<String> = tx
            .query_row(
                "SELECT public_key FROM device_keys WHERE device_id = ?1",
                [id],
                |r| r.get(0),
            )
            .optional()?;
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
        let spent = tx.execute(
            "DELETE FROM enrolments WHERE device_id = ?1 AND token_sha256 = ?2 AND expires > ?3",
            params![id, token_hash(token), now],
        )?;
        if spent != 1 {
            return Ok(Enrolment::Refused(
                "the enrolment token is wrong, spent or expired",
            ));
        }
        tx.execute(
            "INSERT INTO device_keys (device_id, public_key) VALUES (?1, ?2)
             ON CONFLICT (device_id) DO UPDATE SET public_key = ?2",
            params![id, key],
        )?;
        // Certificates for an earlier key are no one's now.
        tx.execute("DELETE FROM device_certs WHERE device_id = ?1", [id])?;
        tx.commit()?;
        Ok(Enrolment::Enrolled)
    }

    /// Records a certificate issued to `device` (its serial, lowercase hex
    /// without leading zeros, as X.509 parsers print it), and forgets those
    /// that have expired and all but the device's newest
    /// [`LIVE_CERTIFICATES`]: a device that asks for renewals without end
    /// grows nothing.
    pub fn record_certificate(
        &self,
        serial: &str,
        device: &str,
        not_after: i64,
        now: i64,
    ) -> Result<()> {
        let mut db = self.db();
        let tx = db.transaction()?;
        tx.execute("DELETE FROM device_certs WHERE not_after <= ?1", [now])?;
        tx.execute(
            "INSERT INTO device_certs (serial, device_id, not_after) VALUES (?1, ?2, ?3)",
            params![serial, device, not_after],
        )?;
        tx.execute(
            "DELETE FROM device_certs WHERE device_id = ?1 AND serial NOT IN
               (SELECT serial FROM device_certs WHERE device_id = ?1
                ORDER BY not_after DESC, rowid DESC LIMIT ?2)",
            params![device, LIVE_CERTIFICATES],
        )?;
        tx.commit()?;
        Ok(())
    }

    /// The device a certificate serial was issued to, while it stands (not
    /// revoked, not expired at `now`: a resumed TLS session is not checked
    /// for expiry again).
    pub fn certificate_device(&self, serial: &str, now: i64) -> Result<Option<String>> {
        Ok(self
            .db()
            .query_row(
                "SELECT device_id FROM device_certs WHERE serial = ?1 AND not_after > ?2",
                params![serial, now],
                |r| r.get(0),
            )
            .optional()?)
    }

    /// How a device proves itself now: `certificate` (with the newest
    /// certificate's serial and expiry), `enrolling` (a token not used
    /// yet), `password`, or `revoked`.
    pub fn credential_of(&self, id: &str) -> Result<Option<serde_json::Value>> {
        let db = self.db();
        let Some(hash): Option<String> = db
            .query_row(
                "SELECT password_sha256 FROM devices WHERE id = ?1",
                [id],
                |r| r.get(0),
            )
            .optional()?
        else {
            return Ok(None);
        };
        let newest: Option<(String, i64)> = db
            .query_row(
                "SELECT serial, not_after FROM device_certs WHERE device_id = ?1
                 ORDER BY not_after DESC LIMIT 1",
                [id],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .optional()?;
        let enrolling: bool = db.query_row(
            "SELECT EXISTS (SELECT 1 FROM enrolments WHERE device_id = ?1)",
            [id],
            |r| r.get(0),
        )?;
        let keyed: bool = db.query_row(
            "SELECT EXISTS (SELECT 1 FROM device_keys WHERE device_id = ?1)",
            [id],
            |r| r.get(0),
        )?;
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
    pub fn revoke_device(&self, id: &str) -> Result<bool> {
        let mut db = self.db();
        let tx = db.transaction()?;
        let found = tx.execute(
            "UPDATE devices SET password_sha256 = ?2 WHERE id = ?1",
            params![id, NO_PASSWORD],
        )?;
        forget_identity(&tx, id)?;
        tx.commit()?;
        Ok(found == 1)
    }
}

/// Deletes a device's key, certificates and enrolment token.
pub(super) fn forget_identity(tx: &rusqlite::Transaction<'_>, id: &str) -> Result<()> {
    for table in ["enrolments", "device_keys", "device_certs"] {
        tx.execute(&format!("DELETE FROM {table} WHERE device_id = ?1"), [id])?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn store() -> (tempfile::TempDir, Store) {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("db")).unwrap();
        (dir, store)
    }

    #[test]
    fn a_token_enrols_once_and_the_key_renews() {
        let (_dir, store) = store();
        let id = DeviceId::new("dev-1").unwrap();
        store.add_enrolling_device(&id, "tok", 100, &[]).unwrap();
        // No password verifies for a certificate device.
        let hash = store.password_hash_of("dev-1").unwrap().unwrap();
        assert!(!super::super::verify_password(&hash, ""));
        assert!(!super::super::verify_password(&hash, NO_PASSWORD));
        assert!(matches!(
            store.enrol("dev-1", "k1", Some("wrong"), 50).unwrap(),
            Enrolment::Refused(_)
        ));
        assert!(matches!(
            store.enrol("dev-1", "k1", Some("tok"), 100).unwrap(),
            Enrolment::Refused(_)
        ));
        assert_eq!(
            store.enrol("dev-1", "k1", Some("tok"), 50).unwrap(),
            Enrolment::Enrolled
        );
        // Spent: another key cannot use it again.
        assert!(matches!(
            store.enrol("dev-1", "k2", Some("tok"), 50).unwrap(),
            Enrolment::Refused(_)
        ));
        assert_eq!(
            store.enrol("dev-1", "k1", None, 500).unwrap(),
            Enrolment::Renewal
        );
        store.record_certificate("abc", "dev-1", 1000, 500).unwrap();
        assert_eq!(
            store.certificate_device("abc", 500).unwrap().as_deref(),
            Some("dev-1")
        );
        // Expired ones are forgotten when the next is recorded.
        store
            .record_certificate("def", "dev-1", 3000, 2000)
            .unwrap();
        assert_eq!(store.certificate_device("abc", 500).unwrap(), None);
        // Renewals without end keep only the newest few standing.
        for (n, serial) in ["s1", "s2", "s3", "s4", "s5"].iter().enumerate() {
            store
                .record_certificate(serial, "dev-1", 3000 + n as i64, 2000)
                .unwrap();
        }
        let standing: Vec<_> = ["def", "s1", "s2", "s3", "s4", "s5"]
            .into_iter()
            .filter(|s| store.certificate_device(s, 2000).unwrap().is_some())
            .collect();
        assert_eq!(standing, ["s3", "s4", "s5"]);
        // Revoked: nothing stands, and the key does not renew.
        assert!(store.revoke_device("dev-1").unwrap());
        assert_eq!(store.certificate_device("s5", 2000).unwrap(), None);
        assert!(matches!(
            store.enrol("dev-1", "k1", None, 2000).unwrap(),
            Enrolment::Refused(_)
        ));
        assert!(!store.revoke_device("dev-2").unwrap());
        // A new token from the operator enrols it again.
        store.add_enrolling_device(&id, "tok2", 5000, &[]).unwrap();
        assert_eq!(
            store.enrol("dev-1", "k3", Some("tok2"), 2000).unwrap(),
            Enrolment::Enrolled
        );
    }
}
