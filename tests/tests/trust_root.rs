//! Rotating the release keys through the trust root: the operator signs
//! root version 2 offline with the old and the new root keys, the manager
//! checks it follows version 1 and sends the chain to every device, and
//! the device accepts it one version at a time. Afterwards a release signed
//! by the revoked key is refused and one by the new key installs. Hostile:
//! a root the old root keys did not sign, a skipped version, and a root
//! signed by a release key, through the manager; and a forged root dropped
//! straight onto the device (its inbox), past the manager.

use std::net::SocketAddr;
use std::time::Duration;

use ferry_e2e::{Agent, Manager, free_port, installed_version, release};
use ferry_protocol::SecretKey;
use ferry_protocol::root::{ROOT_SCHEMA, Root, SignedRoot};
use serde_json::{Value, json};

fn addr(port: u16) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], port))
}

fn key(n: u8) -> SecretKey {
    SecretKey::from_seed(&[n; 32])
}

fn root(version: u64, root_keys: &[&SecretKey], release_keys: &[&SecretKey]) -> Root {
    let lines = |keys: &[&SecretKey]| keys.iter().map(|k| k.public_key().to_text()).collect();
    Root {
        schema: ROOT_SCHEMA,
        version,
        root_keys: lines(root_keys),
        root_threshold: 1,
        release_keys: lines(release_keys),
        release_threshold: 1,
    }
}

fn signed(root: &Root, by: &[&SecretKey]) -> SignedRoot {
    let mut signed = SignedRoot::new(root).unwrap();
    for key in by {
        signed.add_signature(key);
    }
    signed
}

/// POST a root; the status and the answer.
async fn publish_root(manager: &Manager, root: &SignedRoot) -> (u16, Value) {
    let response = manager
        .request(reqwest::Method::POST, "/v1/roots")
        .body(root.to_json())
        .send()
        .await
        .unwrap();
    let status = response.status().as_u16();
    (status, response.json().await.unwrap_or(Value::Null))
}

/// The device's `trust` events so far.
async fn trust_events(manager: &Manager, device: &str) -> Vec<Value> {
    let events = manager.get(&format!("/v1/events?device={device}")).await;
    events
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["message"]["step"] == "trust")
        .map(|e| e["message"].clone())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn release_keys_rotate_through_a_signed_root_and_the_old_key_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let (root1, root2, old_release, new_release) = (key(1), key(2), key(10), key(11));
    let manager = Manager::start(
        &dir.path().join("manager"),
        addr(free_port()),
        addr(free_port()),
    )
    .await;
    let password = manager.add_device("gw-1", &[]).await;

    // Provisioned with root version 1: release key 10.
    let v1 = signed(&root(1, &[&root1], &[&old_release]), &[&root1]);
    let provisioned = dir.path().join("root.json");
    let inbox = dir.path().join("inbox");
    std::fs::write(&provisioned, v1.to_json()).unwrap();
    // The device, as provisioned (started again below).
    let start_agent = || {
        Agent::start_trusting(
            dir.path(),
            "gw-1",
            &password,
            manager.endpoints(),
            &format!("[trust]\nroot = \"{}\"\n", provisioned.display()),
            &inbox,
        )
    };
    let agent = start_agent();
    manager
        .wait_device("gw-1", "online on root 1", |d| {
            d["reported"]["root_version"] == 1
        })
        .await;
    let out = dir.path().join("out");
    let first = release(dir.path(), &old_release, "1.0.0", 1, &out);
    manager.publish(&first).await;
    let deploy =
        |version: &str| json!({ "service": "api", "version": version, "devices": ["gw-1"] });
    manager.post("/v1/deployments", deploy("1.0.0")).await;
    manager
        .wait_device("gw-1", "1.0.0", |d| {
            installed_version(d, "api").as_deref() == Some("1.0.0")
        })
        .await;

    // The manager takes a first root signed by its own keys, then only the
    // next version signed by the old and the new root keys.
    assert_eq!(publish_root(&manager, &v1).await.0, 201);
    let v2_root = root(2, &[&root2], &[&new_release]);
    for (bad, why) in [
        (signed(&v2_root, &[&root2]), "new root key only"),
        (signed(&v2_root, &[&root1]), "old root key only"),
        (
            signed(&v2_root, &[&old_release, &root2]),
            "a release key for the old root key",
        ),
        (
            signed(&root(3, &[&root2], &[&new_release]), &[&root1, &root2]),
            "version 3 after 1",
        ),
    ] {
        let (status, body) = publish_root(&manager, &bad).await;
        assert_eq!(status, 422, "{why}: {body}");
    }
    assert_eq!(manager.get("/v1/roots").await.as_array().unwrap().len(), 1);
    let v2 = signed(&v2_root, &[&root1, &root2]);
    let (status, body) = publish_root(&manager, &v2).await;
    assert_eq!(status, 201, "{body}");
    assert_eq!(body["version"], 2);
    assert_eq!(
        body["release_keys"][0],
        new_release.public_key().id().to_string()
    );

    // The device walks to version 2, says so, and keeps it.
    manager
        .wait_device("gw-1", "root 2", |d| d["reported"]["root_version"] == 2)
        .await;
    let events = trust_events(&manager, "gw-1").await;
    assert!(
        events.iter().any(|e| e["status"] == "succeeded"
            && e["reason"]
                .as_str()
                .unwrap()
                .contains("trust root version 2 accepted")),
        "{events:?}"
    );
    let kept = std::fs::read(agent.data_dir.join("root.json")).unwrap();
    assert_eq!(SignedRoot::from_json(&kept).unwrap(), v2);

    // The revoked key signs no more releases here; the new one does.
    let by_old = release(dir.path(), &old_release, "2.0.0", 2, &out);
    manager.publish(&by_old).await;
    manager.post("/v1/deployments", deploy("2.0.0")).await;
    let refused = manager
        .wait_device("gw-1", "2.0.0 refused", |d| {
            d["reported"]["last_result"]["version"] == "2.0.0"
        })
        .await;
    let result = &refused["reported"]["last_result"];
    assert_eq!(result["outcome"], "rejected", "{result}");
    assert!(
        result["reason"].as_str().unwrap().contains("unknown key"),
        "{result}"
    );
    assert_eq!(installed_version(&refused, "api").as_deref(), Some("1.0.0"));
    let by_new = release(dir.path(), &new_release, "3.0.0", 3, &out);
    manager.publish(&by_new).await;
    manager.post("/v1/deployments", deploy("3.0.0")).await;
    manager
        .wait_device("gw-1", "3.0.0", |d| {
            installed_version(d, "api").as_deref() == Some("3.0.0")
        })
        .await;

    // Someone past the manager (or with the device's inbox) offers a forged
    // version 3 that the root key of version 2 did not sign (the revoked
    // root key, and a key of its own). The device refuses it, says why, and
    // stays on 2.
    let rogue = key(40);
    let forged = signed(&root(3, &[&rogue], &[&key(41)]), &[&root1, &rogue]);
    std::fs::write(inbox.join("forged.root.json"), forged.to_json()).unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let events = trust_events(&manager, "gw-1").await;
        if events.iter().any(|e| {
            e["status"] == "failed"
                && e["reason"]
                    .as_str()
                    .unwrap()
                    .contains("trust root version 3 is signed by 0 of the previous root keys")
        }) {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "{events:?}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let device = manager.get("/v1/devices/gw-1").await;
    assert_eq!(device["reported"]["root_version"], 2, "{device}");
    let kept = std::fs::read(agent.data_dir.join("root.json")).unwrap();
    assert_eq!(SignedRoot::from_json(&kept).unwrap(), v2);

    // Restarted, the device starts from the root it kept, not the file it
    // was provisioned with.
    let data_dir = agent.data_dir.clone();
    agent.stop().await;
    let agent = start_agent();
    assert_eq!(agent.data_dir, data_dir);
    tokio::time::sleep(Duration::from_secs(2)).await;
    manager
        .wait_device("gw-1", "root 2 after a restart", |d| {
            d["online"] == true && d["reported"]["root_version"] == 2
        })
        .await;
    agent.stop().await;
    manager.stop().await;
}
