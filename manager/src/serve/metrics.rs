//! `/metrics`: the fleet and the manager in the Prometheus text format.
//!
//! Fleet figures are read from the store at each scrape into a fresh
//! registry, so a device or version that is gone stops being reported.
//! The manager's own counters (MQTT messages in, API latency) live for the
//! process and are added to each scrape's registry.
//!
//! Labels stay bounded: device ids (the fleet, registered by operators),
//! services and versions the operators published (what a device reports is
//! matched against the releases: an unpublished version counts as
//! `unpublished`, an unpublished service not at all, so a device cannot add
//! series by reporting made-up names), statuses, and routes as templates
//! (`/v1/devices/{id}`), never raw paths, reasons or times.

use std::time::SystemTime;

use prometheus::{
    Encoder, GaugeVec, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge,
    IntGaugeVec, Opts, Registry, TextEncoder,
};

use super::rollout::RolloutState;
use super::store::{DeviceStep, Store, StoreError};

/// The manager's own figures, kept for the life of the process.
#[derive(Clone)]
pub struct Metrics {
    /// Device messages received, by topic kind.
    pub mqtt_messages: IntCounterVec,
    /// 1 while the manager's MQTT client is connected with every device
    /// topic subscribed (acknowledged): until then, device messages reach
    /// no one.
    pub broker_subscribed: IntGauge,
    /// HTTP API request durations, by method, route template and status class.
    pub http_duration: HistogramVec,
    /// Block requests (artifacts over MQTT), by result.
    pub mqtt_block_requests: IntCounterVec,
    /// Artifact bytes sent as MQTT blocks.
    pub mqtt_block_bytes: IntCounter,
    /// Device messages written to the store.
    pub messages_recorded: IntCounter,
    /// Device messages a NATS stream gave this replica again.
    pub messages_redelivered: IntCounter,
    /// Messages the embedded broker dropped because a client's queue was full.
    pub broker_dropped: IntCounter,
    /// Device messages dropped for being over the device's budget.
    pub device_throttled: IntCounter,
    /// 1 while this replica steps the rollouts (always, on SQLite).
    pub rollout_leader: IntGauge,
}

/// A metric that could not be made or written (a programming error, or a
/// store read failing).
#[derive(Debug, thiserror::Error)]
pub enum MetricsError {
    /// The Prometheus library refused a metric.
    #[error("metrics: {0}")]
    Prometheus(#[from] prometheus::Error),
    /// The store could not be read.
    #[error(transparent)]
    Store(#[from] StoreError),
}

impl Metrics {
    /// Creates the manager's counters.
    pub fn new() -> Result<Self, MetricsError> {
        Ok(Self {
            rollout_leader: IntGauge::new(
                "ferry_rollout_leader",
                "1 while this manager replica steps the rollouts (one at a time; always with SQLite).",
            )?,
            broker_subscribed: IntGauge::new(
                "ferry_broker_subscribed",
                "1 while the manager's MQTT client is connected and subscribed to every device topic.",
            )?,
            mqtt_messages: IntCounterVec::new(
                Opts::new(
                    "ferry_mqtt_messages_received_total",
                    "Device messages the manager received, by topic kind.",
                ),
                &["kind"],
            )?,
            http_duration: HistogramVec::new(
                HistogramOpts::new(
                    "ferry_http_request_duration_seconds",
                    "HTTP API request durations.",
                )
                .buckets(vec![0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 30.0]),
                &["method", "route", "status"],
            )?,
            mqtt_block_requests: IntCounterVec::new(
                Opts::new(
                    "ferry_mqtt_block_requests_total",
                    "Artifact block requests from devices, by result (served, refused, failed, malformed, throttled, stalled).",
                ),
                &["result"],
            )?,
            mqtt_block_bytes: IntCounter::new(
                "ferry_mqtt_block_bytes_sent_total",
                "Artifact bytes sent to devices as MQTT blocks.",
            )?,
            messages_recorded: IntCounter::new(
                "ferry_device_messages_recorded_total",
                "Device messages written to the store (received ones are recorded in batches).",
            )?,
            messages_redelivered: IntCounter::new(
                "ferry_device_messages_redelivered_total",
                "Device messages the NATS cluster gave this replica again: another replica died holding them, or they waited past the acknowledgement wait (10 s).",
            )?,
            broker_dropped: IntCounter::new(
                "ferry_mqtt_messages_dropped_total",
                "Messages the embedded broker dropped because a client's queue was full.",
            )?,
            device_throttled: IntCounter::new(
                "ferry_device_messages_throttled_total",
                "Device messages dropped for being over the device's message or byte budget.",
            )?,
        })
    }

    /// The exposition text for one scrape.
    pub async fn render(&self, store: &Store) -> Result<String, MetricsError> {
        let registry = Registry::new();
        registry.register(Box::new(self.mqtt_messages.clone()))?;
        registry.register(Box::new(self.broker_subscribed.clone()))?;
        registry.register(Box::new(self.http_duration.clone()))?;
        registry.register(Box::new(self.mqtt_block_requests.clone()))?;
        registry.register(Box::new(self.mqtt_block_bytes.clone()))?;
        registry.register(Box::new(self.messages_recorded.clone()))?;
        registry.register(Box::new(self.messages_redelivered.clone()))?;
        registry.register(Box::new(self.broker_dropped.clone()))?;
        registry.register(Box::new(self.device_throttled.clone()))?;
        registry.register(Box::new(self.rollout_leader.clone()))?;
        fleet(&registry, store).await?;
        let mut out = Vec::new();
        TextEncoder::new().encode(&registry.gather(), &mut out)?;
        Ok(String::from_utf8_lossy(&out).into_owned())
    }
}

fn int_gauges(
    registry: &Registry,
    name: &str,
    help: &str,
    labels: &[&str],
) -> Result<IntGaugeVec, MetricsError> {
    let gauge = IntGaugeVec::new(Opts::new(name, help), labels)?;
    registry.register(Box::new(gauge.clone()))?;
    Ok(gauge)
}

fn gauges(
    registry: &Registry,
    name: &str,
    help: &str,
    labels: &[&str],
) -> Result<GaugeVec, MetricsError> {
    let gauge = GaugeVec::new(Opts::new(name, help), labels)?;
    registry.register(Box::new(gauge.clone()))?;
    Ok(gauge)
}

/// Seconds since a stored timestamp; `None` when it does not read.
fn age_secs(time: &str, now: SystemTime) -> Option<f64> {
    let then: ferry_protocol::Timestamp = time.parse().ok()?;
    Some(
        now.duration_since(then.system_time())
            .unwrap_or_default()
            .as_secs_f64(),
    )
}

/// The version label for what a device reports: the version itself when
/// operators published that release, else `unpublished`; `None` for a
/// service no release names.
fn version_label<'a>(published: &'a Published, service: &str, version: &'a str) -> Option<&'a str> {
    let versions = published.get(service)?;
    Some(if versions.contains(version) {
        version
    } else {
        "unpublished"
    })
}

type Published = std::collections::HashMap<String, std::collections::HashSet<String>>;

async fn fleet(registry: &Registry, store: &Store) -> Result<(), MetricsError> {
    let devices = store.devices().await?;
    let now = SystemTime::now();
    let mut published = Published::new();
    for release in store.releases().await? {
        published
            .entry(release.service)
            .or_default()
            .insert(release.version);
    }

    let by_status = int_gauges(
        registry,
        "ferry_devices",
        "Registered devices, by connection status.",
        &["status"],
    )?;
    let online = devices.iter().filter(|d| d.online).count() as i64;
    by_status.with_label_values(&["online"]).set(online);
    by_status
        .with_label_values(&["offline"])
        .set(devices.len() as i64 - online);

    let versions = int_gauges(
        registry,
        "ferry_service_devices",
        "Devices running each version of each service (as they report it).",
        &["service", "version"],
    )?;
    let up = int_gauges(
        registry,
        "ferry_device_online",
        "1 when the device is connected.",
        &["device"],
    )?;
    let cpu = gauges(
        registry,
        "ferry_device_cpu_usage_ratio",
        "CPU in use on the device, 0 to 1, at its latest health report.",
        &["device"],
    )?;
    let load = gauges(
        registry,
        "ferry_device_load1",
        "One-minute load average on the device.",
        &["device"],
    )?;
    let memory_total = gauges(
        registry,
        "ferry_device_memory_total_bytes",
        "Memory on the device.",
        &["device"],
    )?;
    let memory_available = gauges(
        registry,
        "ferry_device_memory_available_bytes",
        "Memory available on the device.",
        &["device"],
    )?;
    let disk_total = gauges(
        registry,
        "ferry_device_disk_total_bytes",
        "Size of the device's data partition.",
        &["device"],
    )?;
    let disk_free = gauges(
        registry,
        "ferry_device_disk_free_bytes",
        "Free space on the device's data partition.",
        &["device"],
    )?;
    let temperature = gauges(
        registry,
        "ferry_device_temperature_celsius",
        "The device's hottest sensor, where it has one.",
        &["device"],
    )?;
    let uptime = gauges(
        registry,
        "ferry_device_uptime_seconds",
        "Time since the device booted.",
        &["device"],
    )?;
    let unhealthy = int_gauges(
        registry,
        "ferry_device_services_unhealthy",
        "Services on the device that are not active.",
        &["device"],
    )?;
    let restarts = int_gauges(
        registry,
        "ferry_service_restarts",
        "Restarts of a service on a device since its last deployment.",
        &["device", "service"],
    )?;
    for device in &devices {
        let id = device.device_id.as_str();
        up.with_label_values(&[id]).set(i64::from(device.online));
        let reported = device.reported.as_ref();
        for service in reported
            .and_then(|r| r["services"].as_array())
            .into_iter()
            .flatten()
        {
            if let (Some(name), Some(version)) =
                (service["service"].as_str(), service["version"].as_str())
            {
                if let Some(version) = version_label(&published, name, version) {
                    versions.with_label_values(&[name, version]).inc();
                }
            }
        }
        let Some(health) = &device.health else {
            continue;
        };
        let number = |v: &serde_json::Value| v.as_f64();
        if let Some(v) = number(&health["cpu"]["usage_percent"]) {
            cpu.with_label_values(&[id]).set(v / 100.0);
        }
        if let Some(v) = number(&health["cpu"]["load1"]) {
            load.with_label_values(&[id]).set(v);
        }
        if let Some(v) = number(&health["memory"]["total_bytes"]) {
            memory_total.with_label_values(&[id]).set(v);
        }
        if let Some(v) = number(&health["memory"]["available_bytes"]) {
            memory_available.with_label_values(&[id]).set(v);
        }
        if let Some(v) = number(&health["disk"]["total_bytes"]) {
            disk_total.with_label_values(&[id]).set(v);
        }
        if let Some(v) = number(&health["disk"]["free_bytes"]) {
            disk_free.with_label_values(&[id]).set(v);
        }
        if let Some(v) = number(&health["temperature_celsius"]) {
            temperature.with_label_values(&[id]).set(v);
        }
        if let Some(v) = number(&health["uptime_secs"]) {
            uptime.with_label_values(&[id]).set(v);
        }
        let services = health["services"].as_array().cloned().unwrap_or_default();
        let not_active = services.iter().filter(|s| s["state"] != "active").count();
        unhealthy.with_label_values(&[id]).set(not_active as i64);
        for service in &services {
            if let (Some(name), Some(n)) =
                (service["service"].as_str(), service["restarts"].as_i64())
            {
                if published.contains_key(name) {
                    restarts.with_label_values(&[id, name]).set(n);
                }
            }
        }
    }

    let report_age = gauges(
        registry,
        "ferry_health_report_age_seconds",
        "Seconds since the device's latest health report arrived.",
        &["device"],
    )?;
    let oldest = prometheus::Gauge::with_opts(Opts::new(
        "ferry_health_report_age_max_seconds",
        "The oldest latest health report across the fleet, in seconds.",
    ))?;
    registry.register(Box::new(oldest.clone()))?;
    let mut max_age: f64 = 0.0;
    for (device, time) in store.last_health_times().await? {
        if let Some(age) = age_secs(&time, now) {
            report_age.with_label_values(&[&device]).set(age);
            max_age = max_age.max(age);
        }
    }
    oldest.set(max_age);

    let deployments = int_gauges(
        registry,
        "ferry_deployment_devices",
        "Devices of all deployments, by outcome (pending, installing, installed, failed...).",
        &["status"],
    )?;
    // Every outcome is shown, zero or not, so a dashboard always has the series.
    for status in [
        "pending",
        "installing",
        "installed",
        "failed",
        "rolled_back",
        "rejected",
        "superseded",
    ] {
        deployments.with_label_values(&[status]).set(0);
    }
    for (status, count) in store.deployment_statuses().await? {
        deployments.with_label_values(&[&status]).set(count);
    }

    let rollouts = int_gauges(
        registry,
        "ferry_rollouts",
        "Rollouts, by state.",
        &["state"],
    )?;
    for state in [
        RolloutState::Running,
        RolloutState::Paused,
        RolloutState::Completed,
        RolloutState::Aborted,
    ] {
        rollouts.with_label_values(&[state.as_str()]).set(0);
    }
    let rollout_devices = int_gauges(
        registry,
        "ferry_rollout_devices",
        "Devices of each open (running or paused) rollout, by step.",
        &["rollout", "service", "version", "status"],
    )?;
    let progress = gauges(
        registry,
        "ferry_rollout_progress_ratio",
        "Share of an open rollout's devices with the release installed, 0 to 1.",
        &["rollout", "service", "version"],
    )?;
    // Heads and counts, not device lists: a rollout's list can be the
    // whole fleet, and finished rollouts pile up.
    for rollout in store.rollout_heads().await? {
        rollouts.with_label_values(&[rollout.state.as_str()]).inc();
        if !matches!(rollout.state, RolloutState::Running | RolloutState::Paused) {
            continue;
        }
        let id = rollout.id.to_string();
        let labels = [
            id.as_str(),
            rollout.service.as_str(),
            rollout.version.as_str(),
        ];
        let counts = store.rollout_step_counts(rollout.id).await?;
        for step in DeviceStep::ALL {
            let n = counts.of(|s| s == step);
            if n > 0 {
                rollout_devices
                    .with_label_values(&[labels[0], labels[1], labels[2], step.as_str()])
                    .set(n as i64);
            }
        }
        let installed = counts.of(|s| s == DeviceStep::Installed);
        let total = counts.total().max(1);
        progress
            .with_label_values(&labels)
            .set(installed as f64 / total as f64);
    }
    Ok(())
}
