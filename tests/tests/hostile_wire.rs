//! Hostile traffic at the manager and the agent over the real wire: API
//! requests with bad tokens, huge bodies and bad JSON; malformed and
//! oversized MQTT payloads on every topic the manager reads (from an
//! authenticated device) and on the agent's `desired` topic. Each is
//! refused with a reason, nothing is recorded or changed, and both keep
//! working afterwards.

use std::net::SocketAddr;
use std::time::Duration;

use ferry_e2e::{Agent, Manager, Mosquitto, free_port};
use ferry_protocol::SecretKey;
use rumqttc::{AsyncClient, Event, EventLoop, MqttOptions, Packet, QoS};
use serde_json::{Value, json};

fn addr(port: u16) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], port))
}

/// Payloads no topic accepts, each with the words its refusal contains.
fn garbage(cap: usize) -> Vec<(&'static str, Vec<u8>)> {
    vec![
        ("not_json", b"\xff\xfe not json".to_vec()),
        ("array", b"[1,2,3]".to_vec()),
        (
            "wrong_schema",
            json!({ "schema": 7 }).to_string().into_bytes(),
        ),
        ("deep", "{\"a\":".repeat(2000).into_bytes()),
        ("oversized", vec![b' '; cap + 1]),
    ]
}

async fn connect(mut options: MqttOptions) -> (AsyncClient, EventLoop) {
    options.set_max_packet_size(4 << 20, 4 << 20);
    ferry_e2e::mqtt_connected(options).await
}

/// Drives an event loop until `until` returns true for an incoming publish.
async fn wait_publish(events: &mut EventLoop, what: &str, until: impl Fn(&str, &[u8]) -> bool) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        match tokio::time::timeout(left, events.poll()).await {
            Ok(Ok(Event::Incoming(Packet::Publish(p)))) if until(&p.topic, &p.payload) => return,
            Ok(Ok(_)) => {}
            Ok(Err(e)) => panic!("waiting for {what}: {e}"),
            Err(_) => panic!("timed out waiting for {what}"),
        }
    }
}

/// Whether a request failed because the server closed the connection
/// while the client was still sending its body.
fn closed_under_the_body(error: &reqwest::Error) -> bool {
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(error);
    while let Some(e) = source {
        if let Some(io) = e.downcast_ref::<std::io::Error>() {
            return matches!(
                io.kind(),
                std::io::ErrorKind::BrokenPipe | std::io::ErrorKind::ConnectionReset
            );
        }
        source = e.source();
    }
    false
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_api_refuses_bad_tokens_huge_bodies_and_bad_json_and_changes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let manager = Manager::start(&dir.path().join("m"), addr(free_port()), addr(free_port())).await;
    let client = manager.new_client();
    let posts = [
        "/v1/devices",
        "/v1/releases",
        "/v1/deployments",
        "/v1/rollouts",
    ];
    let mut tried = 0;
    for path in posts {
        for auth in [
            None,
            Some("Bearer wrong"),
            Some("bearer x"),
            Some("Basic Zm9vOmJhcg=="),
        ] {
            let mut request = client.post(manager.url(path)).body("{}");
            if let Some(auth) = auth {
                request = request.header("authorization", auth);
            }
            let response = request.send().await.unwrap();
            assert_eq!(response.status(), 401, "{path} with {auth:?}");
            let body: Value = response.json().await.unwrap();
            assert!(body["error"].as_str().is_some_and(|e| !e.is_empty()));
            tried += 1;
        }
        for (what, body, status) in [
            ("bad JSON", b"{\"device_id\": ".to_vec(), 400),
            ("not UTF-8", b"\xff\xfe\xfd".to_vec(), 400),
            ("deeply nested", "[".repeat(100_000).into_bytes(), 400),
            ("over the body limit", vec![b' '; 2 << 20], 413),
        ] {
            // A client of its own each time: the server answers 413 before
            // reading a huge body and closes the connection, which must not
            // be reused for the next request.
            let sent = manager
                .new_client()
                .post(manager.url(path))
                .bearer_auth(&manager.token)
                .body(body)
                .send()
                .await;
            match sent {
                Ok(response) => assert_eq!(response.status().as_u16(), status, "{path}: {what}"),
                // The server may close before the client has written the
                // whole body: the client then sees its write refused
                // instead of the 413. Only for the oversized body.
                Err(e) if status == 413 && closed_under_the_body(&e) => {}
                Err(e) => panic!("{path}: {what}: {e:?}"),
            }
            tried += 1;
        }
    }
    assert!(tried >= 32);
    // Nothing was created, and the manager still answers.
    assert_eq!(manager.get("/v1/devices").await, json!([]));
    assert_eq!(manager.get("/v1/releases").await, json!([]));
    assert_eq!(manager.get("/v1/rollouts").await, json!([]));
    manager.add_device("after", &[]).await;
    manager.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_device_messages_are_not_recorded_and_the_manager_goes_on() {
    let dir = tempfile::tempdir().unwrap();
    let mqtt = addr(free_port());
    let manager = Manager::start(&dir.path().join("m"), mqtt, addr(free_port())).await;
    let password = manager.add_device("rogue-1", &[]).await;
    let options = manager
        .endpoints()
        .device_options(&dir.path().join("agent-rogue-1"), "rogue-1", &password)
        .await;
    let (device, mut events) = connect(options).await;
    let pump = tokio::spawn(async move { while events.poll().await.is_ok() {} });
    let mut sent = 0;
    for (kind, cap) in [
        ("reported", 256 << 10),
        ("events", 64 << 10),
        ("health", 64 << 10),
        ("status", 4 << 10),
    ] {
        for (_, payload) in garbage(cap) {
            device
                .publish(
                    format!("ferry/v1/devices/rogue-1/{kind}"),
                    QoS::AtLeastOnce,
                    false,
                    payload,
                )
                .await
                .unwrap();
            sent += 1;
        }
    }
    // Then one good health report: the manager records it, so it read
    // everything before it and is still at work.
    let health = json!({
        "schema": 1, "time": "2026-01-01T00:00:00Z", "agent_version": "0.1.0", "uptime_secs": 5,
        "cpu": { "usage_percent": 1.0, "load1": 0.1, "load5": 0.1, "load15": 0.1 },
        "memory": { "total_bytes": 1000, "available_bytes": 500 },
        "disk": { "path": "/", "total_bytes": 1000, "free_bytes": 500 },
        "services": [],
    });
    device
        .publish(
            "ferry/v1/devices/rogue-1/health",
            QoS::AtLeastOnce,
            false,
            health.to_string(),
        )
        .await
        .unwrap();
    let seen = manager
        .wait_device("rogue-1", "the good health report", |d| {
            !d["health"].is_null()
        })
        .await;
    assert_eq!(seen["health"]["uptime_secs"], 5);
    assert!(seen["reported"].is_null(), "garbage was recorded: {seen:#}");
    let events_seen = manager.get("/v1/events?device=rogue-1").await;
    assert_eq!(events_seen, json!([]), "garbage events were recorded");
    let health_seen = manager.get("/v1/health?device=rogue-1").await;
    assert_eq!(health_seen.as_array().unwrap().len(), 1, "{health_seen}");
    assert_eq!(sent, 20);
    pump.abort();
    manager.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_desired_states_are_refused_with_a_reason_and_the_agent_goes_on() {
    let dir = tempfile::tempdir().unwrap();
    let acl = "pattern write ferry/v1/devices/%u/#\npattern read ferry/v1/devices/%u/desired\n\
               user tester\ntopic write ferry/v1/devices/+/desired\ntopic read ferry/v1/devices/+/events\n\
               topic read ferry/v1/devices/+/health\ntopic read ferry/v1/devices/+/status\n";
    let broker = Mosquitto::start(
        dir.path(),
        &[("gw-h", "device-pw"), ("tester", "tester-pw")],
        acl,
    );
    let key = SecretKey::from_seed(&[51; 32]);
    let trust = dir.path().join("ops.pub");
    std::fs::write(&trust, key.public_key().to_text()).unwrap();
    let agent = Agent::start(dir.path(), "gw-h", "device-pw", addr(broker.port), &trust);
    let mut tester = MqttOptions::new("tester", "127.0.0.1", broker.port);
    tester.set_credentials("tester", "tester-pw");
    let (tester, mut events) = connect(tester).await;
    tester
        .subscribe("ferry/v1/devices/gw-h/#", QoS::AtLeastOnce)
        .await
        .unwrap();
    // The agent listens once it says it is online: it subscribes to its
    // desired state before it publishes that (a health report can come
    // earlier: it may be queued before the connection is up).
    wait_publish(&mut events, "the agent online", |t, payload| {
        t.ends_with("/status")
            && serde_json::from_slice::<Value>(payload).is_ok_and(|s| s["state"] == "online")
    })
    .await;

    let mut refused = 0;
    for (name, payload) in garbage(1 << 20) {
        tester
            .publish(
                "ferry/v1/devices/gw-h/desired",
                QoS::AtLeastOnce,
                false,
                payload,
            )
            .await
            .unwrap();
        wait_publish(&mut events, name, |topic, payload| {
            let Ok(event) = serde_json::from_slice::<Value>(payload) else {
                return false;
            };
            topic.ends_with("/events")
                && event["step"] == "verify"
                && event["status"] == "failed"
                && event["reason"]
                    .as_str()
                    .is_some_and(|r| r.starts_with("desired state"))
        })
        .await;
        refused += 1;
    }
    assert_eq!(refused, 5);
    // A desired state whose release is forged: refused before any download.
    let forged = json!({
        "schema": 1, "rollout": "x",
        "releases": [{ "envelope": { "schema": 1, "manifest": "e30=", "signatures": [] } }],
    });
    tester
        .publish(
            "ferry/v1/devices/gw-h/desired",
            QoS::AtLeastOnce,
            false,
            forged.to_string(),
        )
        .await
        .unwrap();
    wait_publish(
        &mut events,
        "the forged release's refusal",
        |topic, payload| {
            topic.ends_with("/events")
                && serde_json::from_slice::<Value>(payload).is_ok_and(|e| {
                    e["status"] == "failed"
                        && e["reason"]
                            .as_str()
                            .is_some_and(|r| r.contains("release that does not read"))
                })
        },
    )
    .await;
    // Far past any limit: the MQTT layer drops the connection; the agent
    // reconnects and goes on (checked below by its health reports).
    tester
        .publish(
            "ferry/v1/devices/gw-h/desired",
            QoS::AtLeastOnce,
            false,
            vec![b' '; 3 << 20],
        )
        .await
        .unwrap();
    // Still alive: health keeps coming.
    wait_publish(&mut events, "health after all that", |t, _| {
        t.ends_with("/health")
    })
    .await;
    assert!(!agent.data_dir.join("services").join("x").exists());
    agent.stop().await;
}

/// A connection of the test's own to the manager's HTTPS listener, the
/// TLS handshake done (trusting the fleet CA), nothing sent yet.
async fn https_stream(manager: &Manager) -> tokio_rustls::client::TlsStream<tokio::net::TcpStream> {
    let ca = manager.ca_pem.as_deref().unwrap();
    let config = ferry_agent::tls::pinned_client_config(ca, None).unwrap();
    let connector = tokio_rustls::TlsConnector::from(std::sync::Arc::new(config));
    let tcp = tokio::net::TcpStream::connect(manager.http).await.unwrap();
    let name = rustls::pki_types::ServerName::try_from("127.0.0.1").unwrap();
    connector.connect(name, tcp).await.unwrap()
}

/// Reads a connection until the server closes it (or 30 s pass);
/// what was read, and whether the server closed it.
async fn read_until_closed(stream: &mut (impl tokio::io::AsyncRead + Unpin)) -> (usize, bool) {
    use tokio::io::AsyncReadExt;
    let mut total = 0;
    let mut buf = vec![0u8; 64 * 1024];
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        match tokio::time::timeout_at(deadline, stream.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => return (total, true),
            Ok(Ok(n)) => total += n,
            Err(_) => return (total, false),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_and_silent_http_clients_cannot_hold_the_manager() {
    use tokio::io::AsyncWriteExt;
    let dir = tempfile::tempdir().unwrap();
    let manager = Manager::start_configured(ferry::serve::ServeConfig {
        http_limits: ferry::serve::http::HttpLimits {
            max_connections: 8,
            header_read: Duration::from_secs(1),
            idle: Duration::from_secs(2),
        },
        ..ferry_e2e::test_config(
            &dir.path().join("m"),
            addr(free_port()),
            addr(free_port()),
            None,
        )
    })
    .await;
    let password = manager.add_device("gw-1", &[]).await;

    // Connections that never start their TLS handshake: each gets the time
    // a request's headers get, then is closed.
    let mut mute = Vec::new();
    for _ in 0..10 {
        mute.push(tokio::net::TcpStream::connect(manager.http).await.unwrap());
    }
    // Slowloris: 50 requests whose headers never end, over TLS.
    let mut slow = Vec::new();
    for _ in 0..50 {
        let mut stream = https_stream(&manager).await;
        stream
            .write_all(b"GET /healthz HTTP/1.1\r\nHost: ferry\r\nX-Slow: ")
            .await
            .unwrap();
        slow.push(stream);
    }
    // The broker is not starved meanwhile: a device connects.
    let options = manager
        .endpoints()
        .device_options(&dir.path().join("agent-gw-1"), "gw-1", &password)
        .await;
    let _device = connect(options).await;
    // The manager hangs up on every one of them (eight at a time).
    for (i, stream) in mute.iter_mut().enumerate() {
        let (_, closed) = read_until_closed(stream).await;
        assert!(closed, "handshake {i} that never began is still open");
    }
    for (i, stream) in slow.iter_mut().enumerate() {
        let (_, closed) = read_until_closed(stream).await;
        assert!(closed, "half-sent request {i} is still open");
    }

    // An idle keep-alive connection is closed too.
    let mut idle = https_stream(&manager).await;
    idle.write_all(b"GET /healthz HTTP/1.1\r\nHost: ferry\r\n\r\n")
        .await
        .unwrap();
    let (answered, closed) = read_until_closed(&mut idle).await;
    assert!(answered > 0 && closed, "an idle connection stayed open");

    // A client that stops reading a large download is cut off mid-way.
    let artifact = ferry_e2e::incompressible(32 << 20);
    let sha = ferry_protocol::Sha256Digest::of(&artifact);
    let uploaded = manager
        .request(reqwest::Method::PUT, &format!("/v1/artifacts/{sha}"))
        .body(artifact.clone())
        .send()
        .await
        .unwrap();
    assert!(uploaded.status().is_success(), "{}", uploaded.status());
    let mut stalled = https_stream(&manager).await;
    stalled
        .write_all(
            format!(
                "GET /v1/artifacts/{sha} HTTP/1.1\r\nHost: ferry\r\nAuthorization: Bearer {}\r\n\r\n",
                manager.token
            )
            .as_bytes(),
        )
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_secs(5)).await;
    let (read, closed) = read_until_closed(&mut stalled).await;
    assert!(closed, "the stalled download is still open");
    assert!(
        read < artifact.len(),
        "the whole artifact came through: {read} bytes"
    );

    // And the manager answers as ever.
    assert_eq!(manager.get("/v1/devices").await[0]["device_id"], "gw-1");
    manager.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn guessing_tokens_is_cut_off_and_pages_carry_a_content_policy() {
    let dir = tempfile::tempdir().unwrap();
    let manager = Manager::start(&dir.path().join("m"), addr(free_port()), addr(free_port())).await;
    let client = manager.new_client();
    let ask = |token: String| {
        client
            .get(manager.url("/v1/devices"))
            .bearer_auth(token)
            .send()
    };
    let limit = ferry::serve::api::auth::MAX_FAILURES;
    for i in 0..limit {
        let answer = ask(format!("guess-{i}")).await.unwrap();
        assert_eq!(answer.status(), 401, "guess {i}");
    }
    // Past the limit this address is refused, whatever it presents, for a while.
    let answer = ask("guess-again".into()).await.unwrap();
    assert_eq!(answer.status(), 429);
    let answer = ask(manager.token.clone()).await.unwrap();
    assert_eq!(answer.status(), 429);
    let body: Value = answer.json().await.unwrap();
    assert!(
        body["error"]
            .as_str()
            .unwrap()
            .contains("too many failed sign-ins"),
        "{body}"
    );
    // The dashboard runs only its own script, and in nobody's frame.
    let page = client.get(manager.url("/")).send().await.unwrap();
    let csp = page.headers()["content-security-policy"].to_str().unwrap();
    assert!(
        csp.contains("default-src 'self'") && csp.contains("frame-ancestors 'none'"),
        "{csp}"
    );
    assert_eq!(page.headers()["x-frame-options"], "DENY");
    manager.stop().await;
}
