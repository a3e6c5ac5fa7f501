//! The HTTP API against its own description: every documented route is
//! served (and guarded), errors are JSON sentences, and large uploads pass.

use std::net::SocketAddr;

use ferry_e2e::{Manager, free_port};
use ferry_protocol::Sha256Digest;

fn addr(port: u16) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], port))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_documented_route_is_served_and_guarded() {
    let dir = tempfile::tempdir().unwrap();
    let manager = Manager::start(&dir.path().join("m"), addr(free_port()), addr(free_port())).await;
    let client = manager.new_client();
    let doc: serde_json::Value = client
        .get(manager.url("/openapi.json"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(doc["openapi"], "3.0.3");
    let paths = doc["paths"].as_object().unwrap();
    assert!(paths.len() >= 10, "{paths:?}");
    for (path, methods) in paths {
        let concrete = path
            .replace("{sha256}", &"0".repeat(64))
            .replace("{id}", "1");
        for (method, operation) in methods.as_object().unwrap() {
            let open = operation
                .get("security")
                .is_some_and(|s| s.as_array().is_some_and(Vec::is_empty));
            let response = client
                .request(
                    method.to_uppercase().parse().unwrap(),
                    manager.url(&concrete),
                )
                .send()
                .await
                .unwrap();
            let status = response.status().as_u16();
            if open && operation.get("requestBody").is_some() {
                // Open, but this empty request proves nothing: a reason,
                // never a demand for an operator's credentials.
                assert!(
                    (400..500).contains(&status) && status != 401,
                    "{method} {path}: {status}"
                );
            } else if open {
                assert_eq!(status, 200, "{method} {path}");
            } else {
                assert_eq!(status, 401, "{method} {path} must need credentials");
                let body: serde_json::Value = response.json().await.unwrap();
                assert!(
                    body["error"].as_str().is_some_and(|e| !e.is_empty()),
                    "{method} {path}: {body}"
                );
            }
        }
    }

    // Unknown routes and bad bodies answer with a sentence too.
    let missing = manager
        .request(reqwest::Method::GET, "/v1/nothing")
        .send()
        .await
        .unwrap();
    assert_eq!(missing.status(), 404);
    let body: serde_json::Value = missing.json().await.unwrap();
    assert!(body["error"].as_str().unwrap().contains("openapi.json"));
    let bad_json = manager
        .request(reqwest::Method::POST, "/v1/devices")
        .body("{not json")
        .send()
        .await
        .unwrap();
    assert_eq!(bad_json.status(), 400);
    let body: serde_json::Value = bad_json.json().await.unwrap();
    assert!(
        body["error"].as_str().unwrap().starts_with("bad JSON"),
        "{body}"
    );
    let bad_token = client
        .get(manager.url("/v1/devices"))
        .bearer_auth("guess")
        .send()
        .await
        .unwrap();
    assert_eq!(bad_token.status(), 401);

    // A large artifact streams in (no request body limit on uploads).
    let big: Vec<u8> = (0..8 * 1024 * 1024u32).map(|i| (i % 251) as u8).collect();
    let sha = Sha256Digest::of(&big);
    let put = manager
        .request(reqwest::Method::PUT, &format!("/v1/artifacts/{sha}"))
        .body(big)
        .send()
        .await
        .unwrap();
    assert_eq!(put.status(), 201);
    manager.stop().await;
}
