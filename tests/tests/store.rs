//! The manager's store on both of its databases: every test here runs on
//! SQLite (a file, the default) and on PostgreSQL (a throwaway server),
//! through the one code path the manager uses.

use ferry::serve::rollout::{Plan, Selector, Threshold};
use ferry::serve::store::{
    Backend, DatabaseUrl, DeviceStep, Enrolment, HISTORY, NO_PASSWORD, Record, Store,
    verify_password,
};
use ferry_e2e::postgres;
use ferry_protocol::DeviceId;

/// A fresh store of each kind (the directory holds the SQLite file).
async fn stores() -> (tempfile::TempDir, Vec<Store>) {
    let dir = tempfile::tempdir().unwrap();
    let sqlite = Store::connect(&DatabaseUrl::sqlite(&dir.path().join("ferry.db")))
        .await
        .unwrap();
    let url: DatabaseUrl = postgres::server().database().parse().unwrap();
    let postgres = Store::connect(&url).await.unwrap();
    assert_eq!(
        (sqlite.backend(), postgres.backend()),
        (Backend::Sqlite, Backend::Postgres)
    );
    (dir, vec![sqlite, postgres])
}

/// Two replicas' stores on one fresh PostgreSQL database.
async fn two_replicas() -> (Store, Store) {
    let url: DatabaseUrl = postgres::server().database().parse().unwrap();
    (
        Store::connect(&url).await.unwrap(),
        Store::connect(&url).await.unwrap(),
    )
}

fn record(device: &str, kind: &'static str, payload: &str) -> Record {
    Record {
        device: device.into(),
        kind,
        payload: payload.into(),
        time: ferry_protocol::Timestamp::from(std::time::SystemTime::now()).to_string(),
    }
}

#[tokio::test]
async fn a_batch_records_in_order_and_trims_history_once() {
    let (_dir, stores) = stores().await;
    for store in stores {
        let id = DeviceId::new("gw-1").unwrap();
        store.add_device(&id, "pw", &[]).await.unwrap();
        let mut batch: Vec<Record> = (0..HISTORY + 50)
            .map(|i| record("gw-1", "health", &format!("{{\"n\":{i}}}")))
            .collect();
        // The last word in a batch wins: online, then offline.
        batch.push(record("gw-1", "status", r#"{"state":"online"}"#));
        batch.push(record("gw-1", "status", r#"{"state":"offline"}"#));
        store.record_many(&batch).await.unwrap();
        let device = store.device("gw-1").await.unwrap().unwrap();
        assert!(!device.online, "{:?}", store.backend());
        assert_eq!(device.health.unwrap()["n"], HISTORY + 49);
        let history = store
            .history("health", Some("gw-1"), 0, 1000)
            .await
            .unwrap();
        assert_eq!(history.len() as i64, HISTORY, "{:?}", store.backend());
        // Oldest first, and only the newest kept.
        assert_eq!(history[0].2["n"], 50);
        assert!(store.device("gw-2").await.unwrap().is_none());
        let other = store
            .history("health", Some("gw-2"), 0, 1000)
            .await
            .unwrap();
        assert!(other.is_empty());
    }
}

#[tokio::test]
async fn a_token_enrols_once_and_the_key_renews() {
    let (_dir, stores) = stores().await;
    for store in stores {
        let id = DeviceId::new("dev-1").unwrap();
        store
            .add_enrolling_device(&id, "tok", 100, &[])
            .await
            .unwrap();
        // No password verifies for a certificate device.
        let hash = store.password_hash_of("dev-1").await.unwrap().unwrap();
        assert!(!verify_password(&hash, ""));
        assert!(!verify_password(&hash, NO_PASSWORD));
        let enrol = |key: &'static str, token: Option<&'static str>, now: i64| {
            let store = &store;
            async move { store.enrol("dev-1", key, token, now).await.unwrap() }
        };
        assert!(matches!(
            enrol("k1", Some("wrong"), 50).await,
            Enrolment::Refused(_)
        ));
        // Expired at 100.
        assert!(matches!(
            enrol("k1", Some("tok"), 100).await,
            Enrolment::Refused(_)
        ));
        assert_eq!(enrol("k1", Some("tok"), 50).await, Enrolment::Enrolled);
        // Spent: another key cannot use it again.
        assert!(matches!(
            enrol("k2", Some("tok"), 50).await,
            Enrolment::Refused(_)
        ));
        assert_eq!(enrol("k1", None, 500).await, Enrolment::Renewal);
        store
            .record_certificate("abc", "dev-1", 1000, 500)
            .await
            .unwrap();
        assert_eq!(
            store
                .certificate_device("abc", 500)
                .await
                .unwrap()
                .as_deref(),
            Some("dev-1")
        );
        // Expired ones are forgotten when the next is recorded.
        store
            .record_certificate("def", "dev-1", 3000, 2000)
            .await
            .unwrap();
        assert_eq!(store.certificate_device("abc", 500).await.unwrap(), None);
        // Renewals without end keep only the newest few standing; of
        // certificates that expire together, the last issued.
        for serial in ["s1", "s2", "s3", "s4", "s5"] {
            store
                .record_certificate(serial, "dev-1", 3000, 2000)
                .await
                .unwrap();
        }
        let mut standing = Vec::new();
        for serial in ["def", "s1", "s2", "s3", "s4", "s5"] {
            if store
                .certificate_device(serial, 2000)
                .await
                .unwrap()
                .is_some()
            {
                standing.push(serial);
            }
        }
        assert_eq!(standing, ["s3", "s4", "s5"], "{:?}", store.backend());
        let credential = store.credential_of("dev-1").await.unwrap().unwrap();
        assert_eq!(credential["serial"], "s5");
        // Revoked: nothing stands, and the key does not renew.
        assert!(store.revoke_device("dev-1").await.unwrap());
        assert_eq!(store.certificate_device("s5", 2000).await.unwrap(), None);
        assert!(matches!(
            enrol("k1", None, 2000).await,
            Enrolment::Refused(_)
        ));
        assert!(!store.revoke_device("dev-2").await.unwrap());
        let credential = store.credential_of("dev-1").await.unwrap().unwrap();
        assert_eq!(credential["kind"], "revoked");
        // A new token from the operator enrols it again.
        store
            .add_enrolling_device(&id, "tok2", 5000, &[])
            .await
            .unwrap();
        assert_eq!(
            store.credential_of("dev-1").await.unwrap().unwrap()["kind"],
            "enrolling"
        );
        assert_eq!(enrol("k3", Some("tok2"), 2000).await, Enrolment::Enrolled);
    }
}

fn plan() -> Plan {
    Plan {
        selector: Selector::All,
        canary: 1,
        waves: vec![100],
        max_in_flight: None,
        device_timeout_secs: 60,
        max_failures: "10%".parse::<Threshold>().unwrap(),
        revert_to: None,
    }
}

#[tokio::test]
async fn rollout_steps_move_only_forward_and_releases_stay_fixed() {
    let (_dir, stores) = stores().await;
    let sha = ferry_protocol::Sha256Digest::of(b"artifact");
    for store in stores {
        let devices: Vec<String> = (0..3).map(|i| format!("gw-{i}")).collect();
        for device in &devices {
            let id = DeviceId::new(device).unwrap();
            store.add_device(&id, "pw", &[]).await.unwrap();
        }
        assert_eq!(
            store
                .add_release("api", "1.0.0", 1, &sha, 10, "{\"a\":1}")
                .await
                .unwrap(),
            ferry::serve::store::Published::Added
        );
        // The same envelope again is nothing new; other bytes under a taken
        // version or sequence are refused.
        assert_eq!(
            store
                .add_release("api", "1.0.0", 1, &sha, 10, "{\"a\":1}")
                .await
                .unwrap(),
            ferry::serve::store::Published::AlreadyThere
        );
        for (version, sequence) in [("1.0.0", 2), ("1.0.1", 1)] {
            assert!(matches!(
                store
                    .add_release("api", version, sequence, &sha, 10, "{\"b\":2}")
                    .await
                    .unwrap(),
                ferry::serve::store::Published::Conflict(_)
            ));
        }
        assert_eq!(store.releases().await.unwrap().len(), 1);

        let id = store
            .add_rollout("api", "1.0.0", &plan(), &devices[..2])
            .await
            .unwrap();
        // Joining devices come after, once.
        store.add_rollout_devices(id, &devices[1..]).await.unwrap();
        let rollout = store.rollout(id).await.unwrap().unwrap();
        let order: Vec<(&str, i64)> = rollout
            .devices
            .iter()
            .map(|d| (d.device_id.as_str(), d.position))
            .collect();
        assert_eq!(order, [("gw-0", 0), ("gw-1", 1), ("gw-2", 2)]);

        assert!(
            store
                .send_rollout_device(id, "gw-0", DeviceStep::Sent, "{}")
                .await
                .unwrap()
        );
        // Sent once: never again.
        assert!(
            !store
                .send_rollout_device(id, "gw-0", DeviceStep::Sent, "{}")
                .await
                .unwrap()
        );
        assert_eq!(store.desired("gw-0").await.unwrap().as_deref(), Some("{}"));
        // A report about another release does not count.
        assert!(
            !store
                .report_rollout_device(id, "gw-0", ("api", "9.9.9"), None)
                .await
                .unwrap()
        );
        assert!(
            store
                .report_rollout_device(
                    id,
                    "gw-0",
                    ("api", "1.0.0"),
                    Some((DeviceStep::RolledBack, Some("health gate")))
                )
                .await
                .unwrap()
        );
        // Outcomes are final.
        assert!(
            !store
                .set_rollout_device(id, "gw-0", DeviceStep::Installed, None)
                .await
                .unwrap()
        );
        assert_eq!(
            store
                .rolled_back_on("gw-0", "api", "1.0.0")
                .await
                .unwrap()
                .as_deref(),
            Some("health gate")
        );
        assert_eq!(
            store.rolled_back_on("gw-1", "api", "1.0.0").await.unwrap(),
            None
        );
        assert_eq!(store.open_rollout_heads().await.unwrap().len(), 1);

        // What the engine steps on, without reading the device list.
        let counts = store.rollout_step_counts(id).await.unwrap();
        assert_eq!(counts.total(), 3);
        assert_eq!(counts.of(|s| s == DeviceStep::Pending), 2);
        assert_eq!(counts.of(DeviceStep::is_failure), 1);
        assert_eq!(store.first_unsettled(id).await.unwrap(), Some(1));
        let pending = |first, limit| store.pending_among_first(id, first, limit);
        assert_eq!(pending(1, 10).await.unwrap(), Vec::<String>::new());
        assert_eq!(pending(2, 10).await.unwrap(), ["gw-1"]);
        assert_eq!(pending(3, 1).await.unwrap(), ["gw-1"]);
        assert_eq!(pending(3, 10).await.unwrap(), ["gw-1", "gw-2"]);
        assert!(
            store
                .send_rollout_device(id, "gw-2", DeviceStep::Sent, "{}")
                .await
                .unwrap()
        );
        let in_flight = store.in_flight(id).await.unwrap();
        assert_eq!(in_flight.len(), 1);
        assert_eq!(in_flight[0].device_id, "gw-2");
        assert!(in_flight[0].sent_at.is_some());
        // The first device without an outcome is still gw-1, in order.
        assert_eq!(store.first_unsettled(id).await.unwrap(), Some(1));
        for device in ["gw-1", "gw-2"] {
            store
                .set_rollout_device(id, device, DeviceStep::TimedOut, None)
                .await
                .unwrap();
        }
        // gw-1 was never sent: pending cannot time out, so it holds.
        assert_eq!(store.first_unsettled(id).await.unwrap(), Some(1));
        store
            .send_rollout_device(id, "gw-1", DeviceStep::Sent, "{}")
            .await
            .unwrap();
        store
            .set_rollout_device(id, "gw-1", DeviceStep::Installed, None)
            .await
            .unwrap();
        assert_eq!(store.first_unsettled(id).await.unwrap(), None);
    }
}

/// Two manager replicas on one PostgreSQL, both stepping the same rollout
/// at once: each device is sent the release by exactly one of them.
#[tokio::test]
async fn two_replicas_never_send_a_device_the_same_stage_twice() {
    let (a, b) = two_replicas().await;
    let devices: Vec<String> = (0..200).map(|i| format!("gw-{i:03}")).collect();
    let id = a
        .add_rollout("api", "1.0.0", &plan(), &devices)
        .await
        .unwrap();
    let send_all = |store: Store| {
        let devices = devices.clone();
        tokio::spawn(async move {
            let mut sent = Vec::new();
            for device in &devices {
                if store
                    .send_rollout_device(id, device, DeviceStep::Sent, "{}")
                    .await
                    .unwrap()
                {
                    sent.push(device.clone());
                }
            }
            sent
        })
    };
    let (by_a, by_b) = (send_all(a), send_all(b));
    let (by_a, by_b) = (by_a.await.unwrap(), by_b.await.unwrap());
    let mut all = [by_a.clone(), by_b.clone()].concat();
    all.sort();
    assert_eq!(
        all,
        devices,
        "a device sent twice or never ({} by one replica, {} by the other)",
        by_a.len(),
        by_b.len()
    );
}

/// Two replicas recording batches of the same devices at once, one in the
/// other's reverse order (as a shared consumer hands them out): both
/// commit, every time. Rows locked in whatever order the messages came in
/// deadlock on PostgreSQL, and a deadlocked batch is not recorded.
#[tokio::test]
async fn replicas_recording_the_same_devices_at_once_do_not_deadlock() {
    let (a, b) = two_replicas().await;
    let devices: Vec<String> = (0..100).map(|i| format!("gw-{i:03}")).collect();
    for device in &devices {
        a.add_device(&DeviceId::new(device).unwrap(), "pw", &[])
            .await
            .unwrap();
    }
    let batch = |order: &[String]| -> Vec<Record> {
        order
            .iter()
            .flat_map(|d| {
                [
                    record(d, "health", r#"{"n":1}"#),
                    record(d, "status", r#"{"state":"online"}"#),
                ]
            })
            .collect()
    };
    let forward = batch(&devices);
    let backward = batch(&devices.iter().rev().cloned().collect::<Vec<_>>());
    for round in 0..20 {
        let (one, other) = tokio::join!(a.record_many(&forward), b.record_many(&backward));
        assert!(
            one.is_ok() && other.is_ok(),
            "round {round}: {one:?} / {other:?}"
        );
    }
    assert!(a.device("gw-099").await.unwrap().unwrap().online);
}

/// One replica at a time steps the rollouts; when it goes, its lock goes
/// with its connection, and another takes over.
#[tokio::test]
async fn one_replica_leads_the_rollouts_until_it_goes() {
    use ferry::serve::store::RolloutLease;
    let (a, b) = two_replicas().await;
    let (mut lease_a, mut lease_b) = (RolloutLease::default(), RolloutLease::default());
    assert!(lease_a.lead(&a).await && lease_a.taken_over());
    assert!(!lease_b.lead(&b).await, "two replicas lead at once");
    assert!(
        lease_a.lead(&a).await,
        "the leader lost its lease by asking again"
    );
    assert!(!lease_a.taken_over(), "kept is not taken over");
    drop(lease_a);
    // The lock is released as the server sees the connection close.
    let mut waited = 0;
    while !lease_b.lead(&b).await {
        waited += 1;
        assert!(waited < 100, "the lock outlived its replica");
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    assert!(lease_b.held() && lease_b.taken_over());
    // SQLite: one manager, always leading.
    let dir = tempfile::tempdir().unwrap();
    let sqlite = Store::connect(&DatabaseUrl::sqlite(&dir.path().join("ferry.db")))
        .await
        .unwrap();
    assert!(RolloutLease::default().lead(&sqlite).await);
}
