//! How an uplink encodes readings for the cloud: one [`Encoder`] per uplink, built once from its
//! config, turns each buffered reading into the MQTT message to publish (and, for Sparkplug B,
//! the births that must precede it), and says what each MQTT session of the uplink needs
//! ([`SessionPlan`]: a will, births, a subscription).
//!
//! One file per encoding: [`json`] (`json`, `jsonCompact`), [`protobuf_compact`]
//! (`protobufCompact`; `protobuf` is the stored envelope itself), [`sparkplug`] (`sparkplugB`);
//! [`compress`] applies an uplink's `compression` afterwards. What each encoding costs per point
//! and how a consumer decodes it: `docs/encodings.md`.
//!
//! Every message carries the reading's id and `bufferSeq`, whatever the encoding.

use std::sync::Arc;

use fieldgate_crds::{Compression, Encoding, GatewayUplink};

use crate::reading::{self, Reading};

pub mod compress;
pub mod json;
pub mod protobuf_compact;
pub mod sparkplug;

/// MQTT 5 content type of `encoding: json`.
pub const CONTENT_TYPE_JSON: &str = "application/json";
/// MQTT 5 content type of `encoding: jsonCompact`.
pub const CONTENT_TYPE_JSON_COMPACT: &str = "application/vnd.fieldgate.compact+json";
/// MQTT 5 content type of `encoding: protobuf`.
pub const CONTENT_TYPE_PROTOBUF: &str = "application/x-protobuf;proto=fieldgate.v1.Reading";
/// MQTT 5 content type of `encoding: protobufCompact`.
pub const CONTENT_TYPE_PROTOBUF_COMPACT: &str = "application/x-protobuf;proto=fieldgate.v1.CompactReading";
pub use crate::mqtt::{CONTENT_ENCODING, Publication};

/// Called with the topic and payload of every message that arrives on a session's
/// subscriptions ([`SessionPlan::subscribe`]). Runs in the task polling the connection: it
/// must not block.
pub type Inbox = Arc<dyn Fn(&str, &[u8]) + Send + Sync>;

/// What one MQTT session (one connection) of an uplink needs besides the readings.
#[derive(Clone, Default)]
pub struct SessionPlan {
    /// The MQTT will, published by the broker if the connection ends without a DISCONNECT.
    pub will: Option<Publication>,
    /// Topic filters to subscribe to (QoS 1) before anything is published; messages go to
    /// `inbox`.
    pub subscribe: Vec<String>,
    /// Handles what arrives on `subscribe`.
    pub inbox: Option<Inbox>,
    /// Published first on the connection, before any reading; nothing waits for their PUBACK.
    pub births: Vec<Publication>,
    /// Published before a clean DISCONNECT (which does not trigger the will).
    pub farewell: Option<Publication>,
}

impl std::fmt::Debug for SessionPlan {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SessionPlan")
            .field("will", &self.will.as_ref().map(|w| &w.topic))
            .field("subscribe", &self.subscribe)
            .field("births", &self.births.len())
            .field("farewell", &self.farewell.as_ref().map(|w| &w.topic))
            .finish_non_exhaustive()
    }
}

/// One reading, encoded.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Encoded {
    /// To publish before the reading, on the same connection; nothing waits for their PUBACK
    /// (Sparkplug: a DBIRTH).
    pub before: Vec<Publication>,
    /// The reading's own message: its delivery is what the uplink confirms.
    pub message: Publication,
}

/// Why a reading cannot be encoded.
#[derive(Debug, thiserror::Error)]
pub enum EncodeError {
    /// The reading could not be serialized as JSON.
    #[error("JSON: {0}")]
    Json(#[from] serde_json::Error),
}

impl EncodeError {
    /// A static label for metrics.
    pub fn kind(&self) -> &'static str {
        match self {
            EncodeError::Json(_) => "json",
        }
    }
}

/// The encoding of one uplink and what it keeps between readings (interned point tables,
/// Sparkplug aliases and sequence numbers).
pub struct Encoder {
    format: Format,
    compression: Compression,
}

enum Format {
    Json,
    JsonCompact,
    Protobuf,
    ProtobufCompact(protobuf_compact::Interner),
    SparkplugB(Box<sparkplug::EdgeNode>),
}

impl Encoder {
    /// The encoder of `uplink` on gateway node `node`.
    pub fn new(uplink: &GatewayUplink, node: &str) -> Self {
        let format = match uplink.encoding() {
            Encoding::Json => Format::Json,
            Encoding::JsonCompact => Format::JsonCompact,
            Encoding::Protobuf => Format::Protobuf,
            Encoding::ProtobufCompact => Format::ProtobufCompact(protobuf_compact::Interner::default()),
            Encoding::SparkplugB => Format::SparkplugB(Box::new(sparkplug::EdgeNode::new(uplink, node))),
        };
        let compression = match uplink.encoding() {
            Encoding::SparkplugB => Compression::None,
            _ => uplink.compression(),
        };
        Self { format, compression }
    }

    /// A new MQTT session of the uplink begins (a link is being opened): what it needs. Every
    /// per-session state (which tables or births the cloud has seen on it) starts afresh.
    pub fn session(&mut self) -> SessionPlan {
        match &mut self.format {
            Format::Json | Format::JsonCompact | Format::Protobuf => SessionPlan::default(),
            Format::ProtobufCompact(interner) => {
                interner.new_session();
                SessionPlan::default()
            }
            Format::SparkplugB(node) => node.session(),
        }
    }

    /// Encodes `reading` (stored as `stored`, the protobuf the buffer holds) as the reading
    /// numbered `buffer_seq` in the uplink's buffer, for `topic` (the uplink's rendered topic of
    /// the device; Sparkplug B has its own).
    pub fn encode(
        &mut self,
        mut reading: Reading,
        stored: &[u8],
        buffer_seq: u64,
        topic: String,
    ) -> Result<Encoded, EncodeError> {
        reading.buffer_seq = buffer_seq;
        let (payload, content_type) = match &mut self.format {
            Format::Json => (json::to_vec(&reading, json::Form::Full)?, CONTENT_TYPE_JSON),
            Format::JsonCompact => (json::to_vec(&reading, json::Form::Compact)?, CONTENT_TYPE_JSON_COMPACT),
            // The stored bytes with `buffer_seq` appended: no re-encoding.
            Format::Protobuf => (reading::with_buffer_seq(stored, buffer_seq), CONTENT_TYPE_PROTOBUF),
            Format::ProtobufCompact(interner) => (interner.encode(&reading), CONTENT_TYPE_PROTOBUF_COMPACT),
            Format::SparkplugB(node) => return Ok(node.encode(&reading)),
        };
        let (payload, content_encoding) = compress::apply(self.compression, payload);
        Ok(Encoded {
            before: Vec::new(),
            message: Publication {
                topic,
                payload: payload.into(),
                qos1: true,
                content_type: Some(content_type),
                content_encoding,
            },
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::reading::{Point, Value, message_id};
    use prost::Message as _;

    pub(crate) fn uplink(encoding: Encoding, compression: Compression) -> GatewayUplink {
        let mut u: GatewayUplink = serde_json::from_value(serde_json::json!({
            "name": "cloud",
            "mqtt": {"url": "mqtt://127.0.0.1:1883"}
        }))
        .unwrap();
        u.encoding = Some(encoding);
        u.compression = Some(compression);
        u
    }

    /// A device poll of `n` 16-bit holding registers `r0..`.
    pub(crate) fn registers(device: &str, n: u16, base: u16) -> Reading {
        Reading {
            id: message_id("default", device, 1_700_000_000_000),
            namespace: "default".into(),
            device: device.into(),
            node: "edge-1".into(),
            time_unix_nano: 1_700_000_000_000_000_123,
            buffer_seq: 0,
            points: (0..n)
                .map(|i| Point {
                    name: format!("r{i}"),
                    value: Some(Value::UintValue(u64::from(base.wrapping_add(i)))),
                    unit: String::new(),
                })
                .collect(),
        }
    }

    fn encode(e: &mut Encoder, r: &Reading, seq: u64) -> Encoded {
        e.encode(r.clone(), &r.encode_to_vec(), seq, "t/d".into()).unwrap()
    }

    #[test]
    fn every_encoding_carries_the_id_and_buffer_seq() {
        let r = registers("m1", 3, 40);
        for encoding in Encoding::ALL {
            let mut e = Encoder::new(&uplink(encoding, Compression::None), "edge-1");
            let _ = e.session();
            let out = encode(&mut e, &r, 42);
            let p = &out.message.payload;
            match encoding {
                Encoding::Json | Encoding::JsonCompact => {
                    let j: serde_json::Value = serde_json::from_slice(p).unwrap();
                    assert_eq!((j["id"].as_str(), j["bufferSeq"].as_u64()), (Some(r.id.as_str()), Some(42)));
                }
                Encoding::Protobuf => {
                    let d = Reading::decode(p.as_ref()).unwrap();
                    assert_eq!((d.id.as_str(), d.buffer_seq), (r.id.as_str(), 42));
                }
                Encoding::ProtobufCompact => {
                    let d = fieldgate_proto::v1::CompactReading::decode(p.as_ref()).unwrap();
                    assert_eq!((d.id.as_str(), d.buffer_seq), (r.id.as_str(), 42));
                }
                Encoding::SparkplugB => {
                    let d = fieldgate_proto::sparkplug_b::Payload::decode(p.as_ref()).unwrap();
                    let values: Vec<_> = d.metrics.iter().filter_map(|m| m.value.clone()).collect();
                    use fieldgate_proto::sparkplug_b::payload::metric::Value as V;
                    assert!(values.contains(&V::StringValue(r.id.clone())), "{d:?}");
                    assert!(values.contains(&V::LongValue(42)), "{d:?}");
                }
            }
        }
    }

    #[test]
    fn compressed_messages_say_how_and_decompress_to_the_encoded_bytes() {
        let r = registers("m1", 100, 9000);
        let mut plain = Encoder::new(&uplink(Encoding::JsonCompact, Compression::None), "edge-1");
        let expected = encode(&mut plain, &r, 1).message.payload;
        for (c, name) in [(Compression::Gzip, "gzip"), (Compression::Zstd, "zstd")] {
            let mut e = Encoder::new(&uplink(Encoding::JsonCompact, c), "edge-1");
            let m = encode(&mut e, &r, 1).message;
            assert_eq!(m.content_encoding, Some(name));
            assert!(m.payload.len() < expected.len() / 2, "{name}: {} of {}", m.payload.len(), expected.len());
            assert_eq!(compress::decompress(&m.payload, 1 << 20).unwrap(), expected);
        }
    }
}
