//! A SQLite database made before the store tracked migrations opens, keeps
//! its data, and takes the newer schema.

use ferry::serve::store::{DatabaseUrl, Store};

#[tokio::test]
async fn a_database_from_before_migrations_opens_and_keeps_its_devices() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("ferry.db");
    {
        // The schema as the manager made it then, with a device and its
        // two certificates of equal expiry (the later issued is "b").
        let db = rusqlite::Connection::open(&path).unwrap();
        db.execute_batch(include_str!("../migrations/sqlite/0001_schema.sql"))
            .unwrap();
        db.execute_batch(
            "INSERT INTO devices (id, password_sha256, tags, created)
                 VALUES ('gw-1', '!', '[\"lab\"]', '2026-01-01T00:00:00Z');
             INSERT INTO device_certs (serial, device_id, not_after) VALUES ('a', 'gw-1', 5000);
             INSERT INTO device_certs (serial, device_id, not_after) VALUES ('b', 'gw-1', 5000);",
        )
        .unwrap();
    }
    for _ in 0..2 {
        let store = Store::connect(&DatabaseUrl::sqlite(&path)).await.unwrap();
        let devices = store.devices().await.unwrap();
        assert_eq!(devices.len(), 1);
        assert_eq!(devices[0].tags, ["lab"]);
        assert_eq!(
            store.certificate_device("a", 100).await.unwrap().as_deref(),
            Some("gw-1")
        );
        assert_eq!(
            store.credential_of("gw-1").await.unwrap().unwrap()["serial"],
            "b"
        );
    }
    // Issued after the old ones, a renewal is the newest.
    let store = Store::connect(&DatabaseUrl::sqlite(&path)).await.unwrap();
    store
        .record_certificate("c", "gw-1", 5000, 100)
        .await
        .unwrap();
    assert_eq!(
        store.credential_of("gw-1").await.unwrap().unwrap()["serial"],
        "c"
    );
}

#[test]
fn database_urls_say_what_is_wrong() {
    for good in [
        "sqlite:///var/lib/ferry/ferry.db",
        "postgres://ferry:secret@db.example/ferry",
        "relative/ferry.db",
    ] {
        good.parse::<DatabaseUrl>().unwrap();
    }
    for bad in ["mysql://db/ferry", "sqlite://", "postgres://[::1"] {
        assert!(bad.parse::<DatabaseUrl>().is_err(), "{bad}");
    }
    let url: DatabaseUrl = "postgres://ferry:secret@db.example/ferry".parse().unwrap();
    assert!(!url.redacted().contains("secret"), "{}", url.redacted());
}
