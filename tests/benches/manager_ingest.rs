//! How many health reports per second the manager takes in, and how its
//! API answers meanwhile.
//!
//! The manager (embedded broker, SQLite) runs in this process on a runtime
//! of its own. 500 registered devices, each its own MQTT connection on a
//! separate runtime, publish a realistic health report (about 450 bytes, one
//! service) at QoS 0 at a fixed total rate, stepped up from 5,000 to 40,000
//! per second, 6 s per step. For each step: the rate the publishers
//! reached, the rate the manager ingested (its own counter of health
//! messages received and checked) and recorded (written to SQLite, in
//! batches, by its recorder thread; all device messages), and the
//! API's p50/p99 latency for one device and for the whole fleet, asked in
//! a loop meanwhile. Everything shares the machine's two cores, so the
//! publishers' own work is part of the load. Asserts nothing about speed.
//!
//! `cargo bench -p ferry-e2e --bench manager_ingest`

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use ferry_e2e::{BrokerKind, Site, health_payload};
use rumqttc::{AsyncClient, QoS};

const DEVICES: usize = 500;
const RATES: [u64; 5] = [5_000, 10_000, 20_000, 30_000, 40_000];
const STEP: Duration = Duration::from_secs(6);

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

async fn step(
    site: &Site,
    clients: &[AsyncClient],
    load: &tokio::runtime::Handle,
    rate: u64,
    payload: &[u8],
) {
    let sent = Arc::new(AtomicU64::new(0));
    let running = Arc::new(AtomicBool::new(true));
    // Each device publishes every `period`, starting at a staggered offset.
    let per_device = rate as f64 / clients.len() as f64;
    let period = Duration::from_secs_f64(1.0 / per_device);
    let mut publishers = Vec::new();
    for (i, client) in clients.iter().enumerate() {
        let (client, sent, running) = (client.clone(), sent.clone(), running.clone());
        let topic = format!("ferry/v1/devices/sim-{i}/health");
        let payload = payload.to_vec();
        let offset = period.mul_f64(i as f64 / clients.len() as f64);
        publishers.push(load.spawn(async move {
            tokio::time::sleep(offset).await;
            let mut tick = tokio::time::interval(period);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
            while running.load(Ordering::Relaxed) {
                tick.tick().await;
                if client
                    .try_publish(&topic, QoS::AtMostOnce, false, payload.clone())
                    .is_ok()
                {
                    sent.fetch_add(1, Ordering::Relaxed);
                }
            }
        }));
    }
    let series = "ferry_mqtt_messages_received_total{kind=\"health\"}";
    let stored = "ferry_device_messages_recorded_total";
    // Let the rate settle before counting.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let (sent0, got0, stored0, t0) = (
        sent.load(Ordering::Relaxed),
        site.manager.metric(series).await,
        site.manager.metric(stored).await,
        Instant::now(),
    );
    let mut one = Vec::new();
    let mut fleet = Vec::new();
    let mut i = 0;
    while t0.elapsed() < STEP {
        let started = Instant::now();
        site.manager
            .get(&format!("/v1/devices/sim-{}", i % clients.len()))
            .await;
        one.push(started.elapsed().as_secs_f64() * 1e3);
        if i % 10 == 0 {
            let started = Instant::now();
            site.manager.get("/v1/devices").await;
            fleet.push(started.elapsed().as_secs_f64() * 1e3);
        }
        i += 1;
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let secs = t0.elapsed().as_secs_f64();
    let (sent1, got1, stored1) = (
        sent.load(Ordering::Relaxed),
        site.manager.metric(series).await,
        site.manager.metric(stored).await,
    );
    running.store(false, Ordering::Relaxed);
    for p in publishers {
        let _ = p.await;
    }
    one.sort_by(f64::total_cmp);
    fleet.sort_by(f64::total_cmp);
    let ingested = (got1 - got0) / secs;
    println!(
        "offered {rate:>6}/s | sent {:>7.0}/s | ingested {:>7.0}/s ({:>5.1}% of sent), recorded {:>7.0}/s | GET /v1/devices/ID p50 {:>6.1} ms p99 {:>6.1} ms | GET /v1/devices ({DEVICES}) p50 {:>6.1} ms p99 {:>6.1} ms",
        (sent1 - sent0) as f64 / secs,
        ingested,
        100.0 * ingested / ((sent1 - sent0) as f64 / secs).max(1.0),
        (stored1 - stored0) / secs,
        percentile(&one, 0.5),
        percentile(&one, 0.99),
        percentile(&fleet, 0.5),
        percentile(&fleet, 0.99),
    );
    // Drain what is queued before the next step.
    tokio::time::sleep(Duration::from_secs(2)).await;
}

fn main() {
    if !std::env::args().any(|a| a == "--bench") {
        return;
    }
    // The manager has a runtime of its own (the harness's); the load gets
    // one too, apart from this measuring thread's.
    let load = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .thread_name("load")
        .enable_all()
        .build()
        .unwrap();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        let dir = tempfile::tempdir().unwrap();
        let ids: Vec<String> = (0..DEVICES).map(|i| format!("sim-{i}")).collect();
        let refs: Vec<&str> = ids.iter().map(String::as_str).collect();
        // Each simulated device sends far more than an agent would: lift the
        // per-device budgets, or they would be what is measured.
        let site = Site::start_configured(dir.path(), BrokerKind::Embedded, &refs, |config| {
            config.device_limits = ferry::serve::limits::DeviceLimits {
                messages_per_sec: 1e9,
                message_burst: 1e9,
                bytes_per_sec: 1e12,
                byte_burst: 1e12,
            };
        })
        .await;
        let mut clients = Vec::new();
        for (id, _) in site.passwords.clone() {
            let options = site.device_options(&id).await;
            let session = load.spawn(async move {
                let (client, _task) = ferry_e2e::device_session(options, |_| {}).await;
                client
            });
            clients.push(session.await.unwrap());
        }
        let payload = health_payload();
        println!(
            "{DEVICES} devices, health reports of {} bytes at QoS 0; {} s per step",
            payload.len(),
            STEP.as_secs()
        );
        for rate in RATES {
            step(&site, &clients, load.handle(), rate, &payload).await;
        }
    });
}
