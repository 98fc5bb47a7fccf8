//! The reading envelope (`proto/fieldgate/v1/reading.proto`) and its encodings.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use fieldgate_crds::Encoding;
use prost::Message;
use serde_json::{Map, Value as Json};
use tokio::sync::mpsc;

/// Types generated from `proto/fieldgate/v1/reading.proto`.
pub mod pb {
    #![allow(missing_docs, clippy::all)]
    include!(concat!(env!("OUT_DIR"), "/fieldgate.v1.rs"));
}

pub use pb::point::Value;
pub use pb::{Point, Reading};

/// The deterministic id of a reading: the same device and scheduled poll instant always give
/// the same id, so a re-published reading is recognised as a duplicate by JetStream and by the
/// cloud.
pub fn message_id(namespace: &str, device: &str, scheduled_unix_ms: u64) -> String {
    format!("{namespace}/{device}/{scheduled_unix_ms}")
}

/// Nanoseconds since the Unix epoch of `t` (0 before 1970).
pub fn unix_nanos(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

/// How old a reading sampled at `time_unix_nano` is now.
pub fn age(time_unix_nano: u64) -> Duration {
    let now = unix_nanos(SystemTime::now());
    Duration::from_nanos(now.saturating_sub(time_unix_nano))
}

/// Encodes a reading for the cloud.
pub fn encode(reading: &Reading, encoding: Encoding) -> Vec<u8> {
    match encoding {
        Encoding::Protobuf => reading.encode_to_vec(),
        Encoding::Json => to_json(reading).to_string().into_bytes(),
    }
}

/// The JSON form of a reading: the protobuf fields in camelCase, each point as
/// `{"name", "value", "unit"?}`.
pub fn to_json(r: &Reading) -> Json {
    let mut o = Map::new();
    o.insert("id".into(), r.id.clone().into());
    o.insert("namespace".into(), r.namespace.clone().into());
    o.insert("device".into(), r.device.clone().into());
    if !r.node.is_empty() {
        o.insert("node".into(), r.node.clone().into());
    }
    o.insert("timeUnixNano".into(), r.time_unix_nano.into());
    o.insert("bufferSeq".into(), r.buffer_seq.into());
    let points = r
        .points
        .iter()
        .map(|p| {
            let mut po = Map::new();
            po.insert("name".into(), p.name.clone().into());
            let v = match &p.value {
                Some(Value::BoolValue(b)) => Json::Bool(*b),
                Some(Value::IntValue(i)) => (*i).into(),
                Some(Value::UintValue(u)) => (*u).into(),
                Some(Value::DoubleValue(d)) => serde_json::Number::from_f64(*d)
                    .map(Json::Number)
                    .unwrap_or(Json::Null),
                Some(Value::StringValue(s)) => s.clone().into(),
                None => Json::Null,
            };
            po.insert("value".into(), v);
            if !p.unit.is_empty() {
                po.insert("unit".into(), p.unit.clone().into());
            }
            Json::Object(po)
        })
        .collect();
    o.insert("points".into(), Json::Array(points));
    Json::Object(o)
}

/// Where adapters hand their readings: the buffer writer's queue.
///
/// A bounded queue: when the buffer cannot keep up, adapters wait (a Modbus poll is late)
/// rather than readings piling up in memory.
#[derive(Clone, Debug)]
pub struct ReadingSink {
    tx: mpsc::Sender<Reading>,
}

/// The buffer writer has stopped (the gateway is shutting down).
#[derive(Debug, thiserror::Error)]
#[error("the buffer writer has stopped")]
pub struct SinkClosed;

impl ReadingSink {
    /// A sink and the receiving end the buffer writer drains.
    pub fn channel(capacity: usize) -> (Self, mpsc::Receiver<Reading>) {
        let (tx, rx) = mpsc::channel(capacity);
        (Self { tx }, rx)
    }

    /// Hands a reading to the buffer writer, waiting while its queue is full.
    pub async fn submit(&self, reading: Reading) -> Result<(), SinkClosed> {
        self.tx.send(reading).await.map_err(|_| SinkClosed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Reading {
        Reading {
            id: message_id("default", "m1", 1_700_000_000_000),
            namespace: "default".into(),
            device: "m1".into(),
            node: String::new(),
            time_unix_nano: 1_700_000_000_000_000_123,
            buffer_seq: 7,
            points: vec![
                Point { name: "t".into(), value: Some(Value::DoubleValue(21.5)), unit: "Cel".into() },
                Point { name: "on".into(), value: Some(Value::BoolValue(true)), unit: String::new() },
                Point { name: "big".into(), value: Some(Value::UintValue(u64::MAX)), unit: String::new() },
            ],
        }
    }

    #[test]
    fn json_carries_every_field_and_exact_integers() {
        let j = to_json(&sample());
        assert_eq!(j["id"], "default/m1/1700000000000");
        assert_eq!(j["timeUnixNano"], 1_700_000_000_000_000_123u64);
        assert_eq!(j["bufferSeq"], 7);
        assert_eq!(j["points"][0]["value"], 21.5);
        assert_eq!(j["points"][0]["unit"], "Cel");
        assert_eq!(j["points"][1]["value"], true);
        assert_eq!(j["points"][2]["value"], u64::MAX);
        assert!(j.get("node").is_none());
    }

    #[test]
    fn protobuf_round_trips() {
        let bytes = encode(&sample(), Encoding::Protobuf);
        assert_eq!(Reading::decode(bytes.as_slice()).unwrap(), sample());
    }
}
