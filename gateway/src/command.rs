//! Commands: the message the cloud sends, the job a device's adapter executes, and the
//! outcome reported back. [`crate::downlink`] takes them in, authorises, stores, records and
//! reports; the adapter that owns the device executes them (see [`crate::adapters`]).
//!
//! Every field is bounded: the whole message ([`MAX_MESSAGE_BYTES`]), the id
//! ([`MAX_ID_LEN`], letters, digits, `-` and `_`), the point name ([`MAX_POINT_LEN`]), a text
//! value ([`MAX_TEXT_LEN`]) and the time to live ([`MAX_TTL`]). Unknown fields are refused.

use std::time::{Duration, SystemTime};

use serde::{Deserialize, Serialize};
use serde_json::Value as Json;
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;

use crate::reading;

/// Largest command message accepted, in bytes.
pub const MAX_MESSAGE_BYTES: usize = 16 * 1024;
/// Longest command id.
pub const MAX_ID_LEN: usize = 128;
/// Longest point name.
pub const MAX_POINT_LEN: usize = 253;
/// Longest text value.
pub const MAX_TEXT_LEN: usize = 1024;
/// Longest time to live (and furthest expiry) of a command.
pub const MAX_TTL: Duration = Duration::from_secs(7 * 24 * 3600);
/// Commands waiting for one device at once; more are answered `failed` (`busy`).
pub const DEVICE_QUEUE: usize = 16;
/// Longest time one command may take on its device, waiting in its queue included.
pub const MAX_EXECUTION: Duration = Duration::from_secs(30);

/// A command as the cloud sends it: `{"id": "c-17", "point": "setpoint", "value": 21.5,
/// "ttl": "30s"}` or with `"expiresAt": "2026-01-01T00:00:00Z"` (or Unix milliseconds).
/// Namespace and device come from the topic, never from here.
#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct CommandMessage {
    /// Id given by the cloud: a command id is executed at most once.
    pub id: String,
    /// The point written.
    pub point: String,
    /// The value written.
    pub value: CommandValue,
    /// Time to live from reception, such as `30s`.
    #[serde(default)]
    pub ttl: Option<String>,
    /// Expiry: RFC 3339 time or Unix milliseconds.
    #[serde(default)]
    pub expires_at: Option<Expiry>,
}

/// A value to write: a scalar.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum CommandValue {
    /// `true`/`false`.
    Bool(bool),
    /// A JSON number.
    Number(serde_json::Number),
    /// Text (at most [`MAX_TEXT_LEN`] bytes).
    Text(String),
}

impl CommandValue {
    /// As JSON.
    pub fn to_json(&self) -> Json {
        match self {
            CommandValue::Bool(b) => Json::Bool(*b),
            CommandValue::Number(n) => Json::Number(n.clone()),
            CommandValue::Text(t) => Json::String(t.clone()),
        }
    }

    /// As plain text (a CoAP body for a single-point device).
    pub fn to_text(&self) -> String {
        match self {
            CommandValue::Text(t) => t.clone(),
            other => other.to_json().to_string(),
        }
    }
}

/// When a command expires.
#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(untagged)]
pub enum Expiry {
    /// Unix milliseconds.
    UnixMs(u64),
    /// RFC 3339.
    Time(String),
}

/// Final or intermediate status of a command, as published on the result topic.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    /// Stored; it will be executed.
    Accepted,
    /// This id was received before; the recorded outcome stands.
    Duplicate,
    /// The device (or its broker) took the write.
    Written,
    /// Written and read back equal (Modbus).
    Verified,
    /// Not done (see the reason).
    Failed,
    /// Not allowed or not understood (see the reason); never executed.
    Refused,
    /// Its time ran out before it was executed.
    Expired,
}

impl Status {
    /// The label, as published.
    pub fn label(self) -> &'static str {
        match self {
            Status::Accepted => "accepted",
            Status::Duplicate => "duplicate",
            Status::Written => "written",
            Status::Verified => "verified",
            Status::Failed => "failed",
            Status::Refused => "refused",
            Status::Expired => "expired",
        }
    }
}

/// Why a command was refused or failed: a fixed set (also the metric label).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Reason {
    // Refusals: never executed.
    /// The message is larger than [`MAX_MESSAGE_BYTES`].
    TooLarge,
    /// Not a command message: not JSON, wrong types, unknown fields, bounds exceeded.
    Malformed,
    /// The topic does not name a device under the uplink's command topic.
    Topic,
    /// The topic names a device of another namespace than the uplink's.
    OtherNamespace,
    /// The uplink does not select the device.
    NotSelected,
    /// The device does not run on this gateway.
    UnknownDevice,
    /// The device has no such point.
    UnknownPoint,
    /// The point is not `access: readWrite` (or its Modbus table is read-only).
    NotWritable,
    /// The value does not fit the point.
    BadValue,
    // Failures.
    /// The device's connection could not be made.
    Unreachable,
    /// The device did not answer in time.
    Timeout,
    /// The device (or its broker) answered with an error.
    DeviceError,
    /// The value read back differs from the value written.
    ReadBackMismatch,
    /// The device's command queue is full.
    Busy,
    /// A previous attempt was interrupted (gateway stopped) after it may have reached the
    /// device; not executed again (at most once).
    Interrupted,
    /// The device has no live connection (TCP) or sent no recent datagram (UDP).
    NotConnected,
    /// The device stopped (removed, reconfigured, gateway stopping) before answering.
    Stopped,
    /// The device cannot take commands (an MQTT device without `commandTopic`).
    Unsupported,
}

impl Reason {
    /// The label, as published and counted.
    pub fn label(self) -> &'static str {
        match self {
            Reason::TooLarge => "too_large",
            Reason::Malformed => "malformed",
            Reason::Topic => "topic",
            Reason::OtherNamespace => "other_namespace",
            Reason::NotSelected => "not_selected",
            Reason::UnknownDevice => "unknown_device",
            Reason::UnknownPoint => "unknown_point",
            Reason::NotWritable => "not_writable",
            Reason::BadValue => "bad_value",
            Reason::Unreachable => "unreachable",
            Reason::Timeout => "timeout",
            Reason::DeviceError => "device_error",
            Reason::ReadBackMismatch => "read_back_mismatch",
            Reason::Busy => "busy",
            Reason::Interrupted => "interrupted",
            Reason::NotConnected => "not_connected",
            Reason::Stopped => "stopped",
            Reason::Unsupported => "unsupported",
        }
    }
}

/// Longest detail text kept in an outcome.
const MAX_DETAIL: usize = 200;

/// What became of a command.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Outcome {
    /// Its status.
    pub status: Status,
    /// Why, for refusals and failures.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<Reason>,
    /// A sentence for people (bounded), for refusals and failures.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
}

impl Outcome {
    /// A status without reason.
    pub fn of(status: Status) -> Self {
        Self { status, reason: None, detail: None }
    }

    /// Refused for `reason`.
    pub fn refused(reason: Reason, detail: impl Into<String>) -> Self {
        Self::why(Status::Refused, reason, detail)
    }

    /// Failed for `reason`.
    pub fn failed(reason: Reason, detail: impl Into<String>) -> Self {
        Self::why(Status::Failed, reason, detail)
    }

    fn why(status: Status, reason: Reason, detail: impl Into<String>) -> Self {
        let mut detail = detail.into();
        if detail.len() > MAX_DETAIL {
            let mut cut = MAX_DETAIL;
            while !detail.is_char_boundary(cut) {
                cut -= 1;
            }
            detail.truncate(cut);
        }
        Self { status, reason: Some(reason), detail: Some(detail) }
    }
}

fn valid_id(id: &str) -> bool {
    !id.is_empty() && id.len() <= MAX_ID_LEN && id.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

/// Unix milliseconds now.
pub fn now_ms() -> u64 {
    reading::unix_nanos(SystemTime::now()) / 1_000_000
}

impl CommandMessage {
    /// Parses and checks a command message; a refusal names what was wrong.
    pub fn parse(payload: &[u8]) -> Result<Self, Outcome> {
        if payload.len() > MAX_MESSAGE_BYTES {
            return Err(Outcome::refused(
                Reason::TooLarge,
                format!("{} bytes; at most {MAX_MESSAGE_BYTES}", payload.len()),
            ));
        }
        let m: Self =
            serde_json::from_slice(payload).map_err(|e| Outcome::refused(Reason::Malformed, e.to_string()))?;
        if !valid_id(&m.id) {
            return Err(Outcome::refused(
                Reason::Malformed,
                format!("id: 1 to {MAX_ID_LEN} letters, digits, '-' or '_'"),
            ));
        }
        if m.point.is_empty() || m.point.len() > MAX_POINT_LEN {
            return Err(Outcome::refused(Reason::Malformed, format!("point: 1 to {MAX_POINT_LEN} bytes")));
        }
        if let CommandValue::Text(t) = &m.value
            && t.len() > MAX_TEXT_LEN
        {
            return Err(Outcome::refused(Reason::Malformed, format!("value: text of at most {MAX_TEXT_LEN} bytes")));
        }
        if let CommandValue::Number(n) = &m.value
            && n.as_f64().is_none_or(|f| !f.is_finite())
        {
            return Err(Outcome::refused(Reason::Malformed, "value: not a finite number"));
        }
        m.expires_unix_ms(now_ms())?;
        Ok(m)
    }

    /// When the command expires (Unix ms), received at `now_ms`; bounded by [`MAX_TTL`].
    pub fn expires_unix_ms(&self, now_ms: u64) -> Result<Option<u64>, Outcome> {
        let max = now_ms + MAX_TTL.as_millis() as u64;
        let at = match (&self.expires_at, &self.ttl) {
            (Some(Expiry::UnixMs(ms)), _) => Some(*ms),
            (Some(Expiry::Time(t)), _) => {
                let t = humantime::parse_rfc3339_weak(t)
                    .map_err(|e| Outcome::refused(Reason::Malformed, format!("expiresAt: {e}")))?;
                Some(reading::unix_nanos(t) / 1_000_000)
            }
            (None, Some(ttl)) => {
                let d = humantime::parse_duration(ttl)
                    .map_err(|e| Outcome::refused(Reason::Malformed, format!("ttl: {e}")))?;
                if d > MAX_TTL {
                    return Err(Outcome::refused(Reason::Malformed, format!("ttl: at most {MAX_TTL:?}")));
                }
                Some(now_ms + d.as_millis() as u64)
            }
            (None, None) => None,
        };
        if at.is_some_and(|at| at > max) {
            return Err(Outcome::refused(Reason::Malformed, format!("expiresAt: at most {MAX_TTL:?} ahead")));
        }
        Ok(at)
    }
}

/// A command as stored in JetStream until it is executed.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct StoredCommand {
    /// The cloud's id.
    pub id: String,
    /// Namespace of the device (from the topic).
    pub namespace: String,
    /// The device (from the topic).
    pub device: String,
    /// The point written.
    pub point: String,
    /// The value written.
    pub value: CommandValue,
    /// Expiry, Unix ms.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires_unix_ms: Option<u64>,
}

impl StoredCommand {
    /// Whether it has expired.
    pub fn expired(&self, now_ms: u64) -> bool {
        self.expires_unix_ms.is_some_and(|at| now_ms >= at)
    }
}

/// What the outcome record of a command id holds.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", tag = "state")]
pub enum Record {
    /// Handed to the device's adapter; no outcome recorded yet.
    Started,
    /// Finished with this outcome.
    Done(Outcome),
}

/// A command handed to the adapter that owns the device.
#[derive(Debug)]
pub struct Job {
    /// The cloud's id.
    pub id: String,
    /// Index of the point in the device's points.
    pub point: usize,
    /// The value to write.
    pub value: CommandValue,
    /// Expiry, Unix ms.
    pub expires_unix_ms: Option<u64>,
    /// The adapter answers `failed` (`timeout`) when it is not done by then.
    pub deadline: Instant,
    /// A previous attempt was interrupted after it may have reached the device: Modbus reads
    /// back first and writes only if the value is not there; other protocols do not send
    /// again (at most once).
    pub resume: bool,
    /// Where the outcome goes.
    pub reply: oneshot::Sender<Outcome>,
    /// The span the adapter's steps continue (`fieldgate.command.execute`), when traced.
    pub trace: Option<crate::telemetry::TraceParent>,
}

/// The commands waiting for one device, in order.
pub type Inbox = mpsc::Receiver<Job>;

impl Job {
    /// Whether the job expired before its adapter got to it.
    pub fn expired(&self) -> bool {
        self.expires_unix_ms.is_some_and(|at| now_ms() >= at)
    }

    /// Whether the job's deadline passed: it is not started any more.
    pub fn late(&self) -> bool {
        Instant::now() >= self.deadline
    }

    /// Answers the job.
    pub fn finish(self, outcome: Outcome) {
        // The downlink may have given up on it (gateway stopping): nobody to tell.
        let _ = self.reply.send(outcome);
    }

    /// The outcome for a job the adapter will not send (expired, or interrupted before on a
    /// protocol that is not sent twice), if any.
    pub fn precheck(&self) -> Option<Outcome> {
        if self.expired() {
            return Some(Outcome::of(Status::Expired));
        }
        if self.late() {
            return Some(Outcome::failed(Reason::Timeout, "waited past its deadline in the device's queue"));
        }
        if self.resume {
            return Some(Outcome::failed(
                Reason::Interrupted,
                "an earlier attempt was interrupted and may have reached the device; not sent again",
            ));
        }
        None
    }

    /// `{"command": id, "point": name, "value": value}`: what a TCP or UDP device gets.
    pub fn frame(&self, point: &fieldgate_crds::Point) -> String {
        serde_json::json!({"command": self.id, "point": point.name, "value": self.value.to_json()}).to_string()
    }

    /// `{<path or name>: value}`: the body for devices that take JSON objects.
    pub fn object(&self, point: &fieldgate_crds::Point) -> serde_json::Map<String, Json> {
        let mut o = serde_json::Map::new();
        o.insert(point.path.clone().unwrap_or_else(|| point.name.clone()), self.value.to_json());
        o
    }
}

/// Answers every job in `inbox` that is already waiting with `outcome` (a device that cannot
/// take commands now).
pub fn answer_waiting(inbox: &mut Inbox, outcome: impl Fn() -> Outcome) {
    while let Ok(job) = inbox.try_recv() {
        let o = job.precheck().unwrap_or_else(&outcome);
        job.finish(o);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn refusal(payload: &[u8]) -> Reason {
        CommandMessage::parse(payload).unwrap_err().reason.unwrap()
    }

    #[test]
    fn command_messages_parse_with_expiry() {
        let m = CommandMessage::parse(br#"{"id":"c1","point":"sp","value":12,"ttl":"30s"}"#).unwrap();
        assert_eq!(m.value, CommandValue::Number(12.into()));
        assert!(m.expires_unix_ms(1000).unwrap() == Some(31_000));
        let m = CommandMessage::parse(br#"{"id":"c2","point":"sp","value":true,"expiresAt":"2020-01-01T00:00:00Z"}"#)
            .unwrap();
        assert_eq!(m.expires_unix_ms(1_577_836_000_000).unwrap(), Some(1_577_836_800_000));
        let m = CommandMessage::parse(br#"{"id":"c_3","point":"sp","value":"on","expiresAt":1000}"#).unwrap();
        assert_eq!(m.expires_unix_ms(0).unwrap(), Some(1000));
    }

    #[test]
    fn hostile_command_messages_are_refused_with_a_reason() {
        assert_eq!(refusal(b"{"), Reason::Malformed);
        assert_eq!(refusal(br#"{"point":"sp","value":1}"#), Reason::Malformed);
        assert_eq!(refusal(br#"{"id":7,"point":"sp","value":1}"#), Reason::Malformed);
        assert_eq!(refusal(br#"{"id":"c","point":"sp","value":[1]}"#), Reason::Malformed);
        assert_eq!(refusal(br#"{"id":"c","point":"sp","value":{"a":1}}"#), Reason::Malformed);
        assert_eq!(refusal(br#"{"id":"c","point":"sp","value":1,"namespace":"b"}"#), Reason::Malformed);
        assert_eq!(refusal(br#"{"id":"c","point":"sp","value":1,"device":"x"}"#), Reason::Malformed);
        assert_eq!(refusal(br#"{"id":"c","point":"sp","value":1e400}"#), Reason::Malformed);
        assert_eq!(refusal(br#"{"id":"a b","point":"sp","value":1}"#), Reason::Malformed);
        assert_eq!(refusal(br#"{"id":"c","point":"sp","value":1,"ttl":"400d"}"#), Reason::Malformed);
        let long_id = format!(r#"{{"id":"{}","point":"sp","value":1}}"#, "a".repeat(MAX_ID_LEN + 1));
        assert_eq!(refusal(long_id.as_bytes()), Reason::Malformed);
        let text = format!(r#"{{"id":"c","point":"sp","value":"{}"}}"#, "x".repeat(MAX_TEXT_LEN + 1));
        assert_eq!(refusal(text.as_bytes()), Reason::Malformed);
        assert_eq!(refusal(&vec![b' '; 1 << 20]), Reason::TooLarge);
    }

    #[test]
    fn records_and_outcomes_round_trip() {
        let r = Record::Done(Outcome::failed(Reason::Busy, "x".repeat(500)));
        let text = serde_json::to_string(&r).unwrap();
        assert!(text.contains(r#""state":"done""#) && text.contains(r#""reason":"busy""#), "{text}");
        let back: Record = serde_json::from_str(&text).unwrap();
        let Record::Done(o) = &back else { panic!() };
        assert_eq!(o.detail.as_ref().unwrap().len(), MAX_DETAIL);
        assert_eq!(serde_json::from_str::<Record>(r#"{"state":"started"}"#).unwrap(), Record::Started);
    }
}
