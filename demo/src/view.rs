//! What the demo shows: a full screen once a second on a terminal, a line every few seconds
//! otherwise.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::time::Duration;

use fieldgate_proto::v1 as pb;
use pb::point::Value;
use serde_json::Value as Json;
use tokio::time::Instant;

use crate::cloud::Seen;

/// The cloud broker's outage, if one is going on.
#[derive(Clone, Debug)]
pub enum Outage {
    /// The broker runs.
    None,
    /// The broker is stopped until `until`.
    Down {
        /// When it stopped.
        since: Instant,
        /// When it comes back.
        until: Instant,
        /// Most readings buffered meanwhile.
        peak_backlog: i64,
    },
    /// The broker is back; the buffer drains.
    Draining {
        /// When it came back.
        since: Instant,
        /// How long it was down.
        down_for: Duration,
        /// Most readings buffered.
        peak_backlog: i64,
        /// Devices seen with nothing on its way since.
        caught_up: std::collections::HashSet<String>,
    },
}

/// One look at the devices, the cloud and the gateway.
pub struct Frame {
    /// Since the gateway became ready.
    pub elapsed: Duration,
    /// Number of devices.
    pub devices: usize,
    /// Their poll interval.
    pub poll_interval: String,
    /// The uplink's encoding.
    pub encoding: String,
    /// The uplink's MQTT version.
    pub mqtt_version: u8,
    /// Readings each device served, by `namespace/name`.
    pub served: BTreeMap<String, u64>,
    /// What the cloud received.
    pub seen: Seen,
    /// `/api/v1/status`, or why it did not answer.
    pub gateway: Result<Json, String>,
    /// The outage, if any.
    pub outage: Outage,
}

impl Frame {
    fn received(&self, device: &str) -> u64 {
        self.seen.devices.get(device).map_or(0, |d| d.ids.len() as u64)
    }

    /// Served readings the cloud has not received (yet), per device.
    fn missing(&self, device: &str, served: u64) -> u64 {
        served.saturating_sub(self.received(device))
    }

    /// Devices whose every served reading the cloud has received.
    pub fn caught_up(&self) -> Vec<String> {
        self.served.iter().filter(|(d, s)| self.missing(d, **s) == 0).map(|(d, _)| d.clone()).collect()
    }

    /// Served readings not (yet) at the cloud, all devices.
    pub fn missing_total(&self) -> u64 {
        self.served.iter().map(|(d, s)| self.missing(d, *s)).sum()
    }

    /// Readings whose values did not match the register map.
    pub fn bad_values(&self) -> u64 {
        self.seen.devices.values().map(|d| d.bad_values).sum()
    }

    /// Why the last wrong message was wrong.
    pub fn last_problem(&self) -> Option<String> {
        self.seen.last_undecodable.clone().or_else(|| self.seen.devices.values().find_map(|d| d.last_bad.clone()))
    }

    fn uplink(&self) -> Option<&Json> {
        self.gateway.as_ref().ok().and_then(|s| s["uplinks"].get(0))
    }

    /// Readings in the uplink's buffer, per the gateway.
    pub fn backlog(&self) -> Option<i64> {
        self.uplink().and_then(|u| u["backlogMessages"].as_i64())
    }
}

fn value(v: Option<&Value>) -> String {
    match v {
        Some(Value::BoolValue(b)) => b.to_string(),
        Some(Value::IntValue(i)) => i.to_string(),
        Some(Value::UintValue(u)) => u.to_string(),
        Some(Value::DoubleValue(d)) => format!("{d}"),
        Some(Value::StringValue(s)) => s.clone(),
        None => "-".to_string(),
    }
}

/// A few of the latest values.
fn latest(reading: Option<&pb::Reading>) -> String {
    let Some(r) = reading else { return String::new() };
    ["u16", "f32", "i64", "coil0", "label"]
        .iter()
        .filter_map(|name| r.points.iter().find(|p| p.name == *name))
        .map(|p| format!("{}={}", p.name, value(p.value.as_ref())))
        .collect::<Vec<_>>()
        .join(" ")
}

fn gateway_line(frame: &Frame) -> String {
    let status = match &frame.gateway {
        Ok(s) => s,
        Err(e) => return format!("gateway API: no answer ({e})"),
    };
    let Some(u) = frame.uplink() else { return "gateway: no uplink".to_string() };
    let dropped = u["dropped"]
        .as_object()
        .filter(|d| !d.is_empty())
        .map(|d| d.iter().map(|(k, v)| format!("{k} {v}")).collect::<Vec<_>>().join(", "))
        .unwrap_or_else(|| "none".to_string());
    format!(
        "gateway (its own API): {} · uplink {} {} · accepted {} · delivered {} · buffered {} (oldest {:.1} s) · \
         redelivered {} · dropped: {dropped}",
        if status["ready"] == true { "ready" } else { "NOT READY" },
        u["name"].as_str().unwrap_or("?"),
        if u["connected"] == true { "connected" } else { "DISCONNECTED" },
        u["accepted"],
        u["delivered"],
        u["backlogMessages"],
        u["oldestUnsentAgeSeconds"].as_f64().unwrap_or(0.0),
        u["redeliveries"],
    )
}

fn outage_line(outage: &Outage, length: Duration) -> String {
    match outage {
        Outage::None => format!("cloud broker: up · press d to stop it for {}", humantime::format_duration(length)),
        Outage::Down { until, peak_backlog, .. } => format!(
            "cloud broker: DOWN for {} s more · buffered up to {peak_backlog} readings so far",
            until.saturating_duration_since(Instant::now()).as_secs()
        ),
        Outage::Draining { since, peak_backlog, caught_up, .. } => format!(
            "cloud broker: back for {} s · draining (peak {peak_backlog}); {} devices caught up",
            since.elapsed().as_secs(),
            caught_up.len()
        ),
    }
}

/// The full screen.
pub fn screen(frame: &Frame, status: &str, verdicts: &[String], outage_length: Duration) -> String {
    let mut out = String::from("\x1b[H\x1b[2J");
    let _ = writeln!(
        out,
        "Fieldgate demo · {} devices polled every {} → gateway → JetStream (fsync always) → cloud mosquitto \
         (MQTT {}, {}) · {} s",
        frame.devices,
        frame.poll_interval,
        frame.mqtt_version,
        frame.encoding,
        frame.elapsed.as_secs()
    );
    let _ = writeln!(out, "{status}\n");
    let _ = writeln!(
        out,
        " {:<16} {:>7} {:>9} {:>10} {:>5}  {:<7} latest values at the cloud",
        "device", "served", "at cloud", "on its way", "dup", "values"
    );
    let (mut served_all, mut received_all, mut dup_all) = (0, 0, 0);
    for (device, served) in &frame.served {
        let seen = frame.seen.devices.get(device);
        let received = frame.received(device);
        let dup = seen.map_or(0, |d| d.messages.saturating_sub(d.ids.len() as u64));
        let check = match seen {
            Some(d) if d.bad_values > 0 => "WRONG",
            Some(_) => "ok",
            None => "-",
        };
        let _ = writeln!(
            out,
            " {device:<16} {served:>7} {received:>9} {:>10} {dup:>5}  {check:<7} {}",
            frame.missing(device, *served),
            latest(seen.and_then(|d| d.latest.as_ref()))
        );
        served_all += served;
        received_all += received;
        dup_all += dup;
    }
    let _ =
        writeln!(out, " {:<16} {served_all:>7} {received_all:>9} {:>10} {dup_all:>5}\n", "all", frame.missing_total());
    let _ = writeln!(out, " {}", gateway_line(frame));
    let _ = writeln!(out, " {}", outage_line(&frame.outage, outage_length));
    if frame.seen.undecodable > 0 {
        let _ = writeln!(
            out,
            " cloud: {} messages did not decode: {}",
            frame.seen.undecodable,
            frame.seen.last_undecodable.as_deref().unwrap_or("")
        );
    }
    for v in verdicts.iter().rev().take(5).rev() {
        let _ = writeln!(out, " {v}");
    }
    let _ = writeln!(out, "\n keys: d = stop the cloud broker · q = quit (then the final check)");
    out
}

/// One line (when the output is not a terminal).
pub fn line(frame: &Frame) -> String {
    format!("[{:>5}s] {} · {}", frame.elapsed.as_secs(), summary(frame), gateway_line(frame))
}

/// Served, received, on its way, duplicates.
pub fn summary(frame: &Frame) -> String {
    let served: u64 = frame.served.values().sum();
    let messages: u64 = frame.seen.devices.values().map(|d| d.messages).sum();
    let received: u64 = frame.served.keys().map(|d| frame.received(d)).sum();
    format!(
        "devices served {served} readings; the cloud received {received} distinct ({messages} messages), \
         {} on their way",
        frame.missing_total()
    )
}
