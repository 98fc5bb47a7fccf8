//! What the gateway reports about itself, read through one interface.
//!
//! The status page, `/api/v1/status`, `/devices`, `/uplinks` and the diagnostics bundle show a
//! [`GatewayStatus`] and nothing else; [`StatusSource::snapshot`] is the one place that reads
//! the gateway's state to build it: the uplinks and their buffers from the state index
//! ([`crate::index`]), the devices from their metric series, last errors and values, and the
//! applied config.

use std::collections::BTreeMap;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::Serialize;
use serde_json::Value as Json;

use super::Management;
use crate::metrics::{DeviceLabels, DropLabels, DropReason};
use crate::reading::Value;

/// Gives the gateway's state at one instant.
pub trait StatusSource {
    /// Devices, uplinks, buffer, readiness and config version, now.
    fn snapshot(&self) -> GatewayStatus;
}

/// The gateway's state at one instant (the body of `GET /api/v1/status`).
#[derive(Clone, Debug, Default, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct GatewayStatus {
    /// `--node`.
    pub node: String,
    /// Whether `/readyz` answers 200.
    pub ready: bool,
    /// Why not, when not.
    pub not_ready: Vec<String>,
    /// The NATS connection holding the buffer.
    pub buffer: BufferStatus,
    /// The applied configuration.
    pub config: ConfigStatus,
    /// Every configured device, in config order.
    pub devices: Vec<DeviceStatus>,
    /// Every configured uplink, in config order.
    pub uplinks: Vec<UplinkStatus>,
    /// Readings dropped because no uplink selects their device.
    pub unrouted_readings: u64,
}

/// The NATS connection holding the buffer.
#[derive(Clone, Debug, Default, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct BufferStatus {
    /// Up (`true`), down (`false`), or not known in this process (`null`).
    pub connected: Option<bool>,
}

/// The applied configuration.
#[derive(Clone, Debug, Default, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ConfigStatus {
    /// Its `version`, when it has one.
    pub version: Option<String>,
}

/// What a device is doing.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum DeviceState {
    /// Connected, or (a device that pushes) sent something.
    Up,
    /// Its connection is down after an error, or (a device that pushes) it failed.
    Down,
    /// Connecting for the first time.
    Connecting,
    /// A device that pushes and has sent nothing yet.
    Waiting,
}

/// One device.
#[derive(Clone, Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct DeviceStatus {
    /// `namespace/name`.
    pub name: String,
    /// Protocol label, such as `modbus_tcp`.
    pub protocol: &'static str,
    /// What it is doing.
    pub state: DeviceState,
    /// Readings it produced.
    pub readings: u64,
    /// When it was last sampled (RFC 3339).
    pub last_reading: Option<String>,
    /// How long ago.
    pub last_reading_age_seconds: Option<f64>,
    /// Its last error.
    pub last_error: Option<LastError>,
    /// The points of its last reading (refreshed at most twice a second).
    pub last_values: Vec<PointValue>,
}

/// A device's last error.
#[derive(Clone, Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct LastError {
    /// Its kind (`timeout`, `connect`, `exception`, ...).
    pub kind: &'static str,
    /// When (RFC 3339).
    pub at: String,
}

/// One point of a reading.
#[derive(Clone, Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct PointValue {
    /// Point name.
    pub name: String,
    /// Its value (`null` for a float that is not finite).
    pub value: Json,
    /// Its unit, when it declares one.
    #[serde(skip_serializing_if = "String::is_empty")]
    pub unit: String,
}

/// One uplink.
#[derive(Clone, Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct UplinkStatus {
    /// `namespace/name`.
    pub name: String,
    /// Its kind: `mqtt` or `http`.
    pub kind: &'static str,
    /// MQTT protocol version (3 or 5); absent for HTTP.
    pub protocol_version: Option<u8>,
    /// Whether its broker connection is up.
    pub connected: bool,
    /// Whether its JetStream stream answered the last check.
    pub buffer_reachable: Option<bool>,
    /// Readings buffered, not yet acknowledged by the cloud.
    pub backlog_messages: i64,
    /// Bytes buffered.
    pub backlog_bytes: i64,
    /// Age of the oldest unsent reading.
    pub oldest_unsent_age_seconds: f64,
    /// Readings delivered more than once.
    pub redeliveries: u64,
    /// Readings JetStream accepted for it.
    pub accepted: u64,
    /// Readings the cloud acknowledged.
    pub delivered: u64,
    /// Readings dropped, by reason (only reasons that happened).
    pub dropped: BTreeMap<&'static str, u64>,
}

fn unix_ms_text(ms: u64) -> String {
    humantime::format_rfc3339_millis(UNIX_EPOCH + Duration::from_millis(ms)).to_string()
}

fn point_value(v: Option<&Value>) -> Json {
    match v {
        Some(Value::BoolValue(b)) => Json::from(*b),
        Some(Value::IntValue(i)) => Json::from(*i),
        Some(Value::UintValue(u)) => Json::from(*u),
        Some(Value::DoubleValue(d)) => serde_json::Number::from_f64(*d).map_or(Json::Null, Json::Number),
        Some(Value::StringValue(s)) => Json::from(s.as_str()),
        None => Json::Null,
    }
}

impl StatusSource for Management {
    fn snapshot(&self) -> GatewayStatus {
        let not_ready = self.not_ready_reasons();
        let cfg = self.applied();
        let mut status = GatewayStatus {
            node: self.node.clone(),
            ready: not_ready.is_empty(),
            not_ready,
            buffer: BufferStatus { connected: self.metrics.as_ref().map(|m| m.buffer_connected.get() == 1) },
            config: ConfigStatus { version: cfg.as_ref().and_then(|c| c.version.clone()) },
            ..GatewayStatus::default()
        };
        let (Some(metrics), Some(cfg)) = (&self.metrics, cfg) else { return status };
        let now = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0.0, |d| d.as_secs_f64());
        let keys: Vec<String> = cfg.devices.iter().map(|d| format!("{}/{}", d.namespace, d.name)).collect();
        // Devices removed from the config leave the last values.
        let configured: std::collections::HashSet<&str> = keys.iter().map(String::as_str).collect();
        metrics.device_last_values.retain(|k| configured.contains(k));
        for (d, key) in cfg.devices.iter().zip(keys) {
            let labels = DeviceLabels { device: key, protocol: d.connection.protocol() };
            let connected = metrics.device_connected.get(&labels).map(|g| g.get());
            let last_reading = metrics.device_last_reading.get(&labels).map(|g| g.get()).filter(|t| *t > 0.0);
            let last_error = metrics.device_last_error.get(&labels.device);
            let state = match (connected, last_reading, last_error) {
                (Some(1), _, _) => DeviceState::Up,
                (Some(_), _, Some(_)) => DeviceState::Down,
                (Some(_), _, None) => DeviceState::Connecting,
                // Devices that push (no connection of their own): up once they sent something.
                (None, Some(_), _) => DeviceState::Up,
                (None, None, Some(_)) => DeviceState::Down,
                (None, None, None) => DeviceState::Waiting,
            };
            let last_values = metrics
                .device_last_values
                .get(&labels.device)
                .map(|r| r.points)
                .unwrap_or_default()
                .into_iter()
                .map(|p| PointValue { value: point_value(p.value.as_ref()), name: p.name, unit: p.unit })
                .collect();
            status.devices.push(DeviceStatus {
                protocol: labels.protocol,
                state,
                readings: metrics.readings_received.get(&labels).map_or(0, |c| c.get()),
                last_reading: last_reading.map(|t| unix_ms_text((t * 1000.0) as u64)),
                last_reading_age_seconds: last_reading.map(|t| (now - t).max(0.0)),
                last_error: last_error.map(|(kind, at)| LastError { kind, at: unix_ms_text(at) }),
                last_values,
                name: labels.device,
            });
        }
        for u in &cfg.uplinks {
            let name = format!("{}/{}", u.namespace, u.name);
            let state = metrics.state.uplink(&name);
            let (buffer, counts) = (state.snapshot(), state.counts());
            status.uplinks.push(UplinkStatus {
                kind: u.target().map_or("", |t| t.kind()),
                protocol_version: u.mqtt.as_ref().map(|m| m.protocol_version()),
                connected: buffer.connected,
                buffer_reachable: buffer.reachable,
                backlog_messages: i64::try_from(buffer.backlog).unwrap_or(i64::MAX),
                backlog_bytes: i64::try_from(buffer.bytes).unwrap_or(i64::MAX),
                oldest_unsent_age_seconds: buffer.oldest_unsent_age.as_secs_f64(),
                redeliveries: counts.redeliveries,
                accepted: counts.accepted,
                delivered: counts.delivered,
                dropped: counts.dropped,
                name,
            });
        }
        let unrouted = DropLabels { uplink: "none".to_string(), reason: DropReason::no_uplink };
        status.unrouted_readings = metrics.readings_dropped.get(&unrouted).map_or(0, |c| c.get());
        status
    }
}
