//! What a cloud consumer does with whatever an uplink sends, in every encoding: decompress
//! (as the first bytes say), decode, resolve interned names (`protobufCompact` point tables,
//! Sparkplug B aliases from the births) — giving each reading in the gateway's `json` shape.
//!
//! Stateful, like a real consumer: feed it the messages in the order they arrived.

use std::collections::HashMap;

use anyhow::{Context, Result, anyhow, bail};
use fieldgate_gateway::encoding::compress::decompress;
use fieldgate_gateway::encoding::json::compact_to_full;
use fieldgate_gateway::encoding::sparkplug::{BUFFER_SEQ_METRIC, ID_METRIC, NAMESPACE};
use fieldgate_gateway::reading::{Reading, to_json};
use fieldgate_proto::compact::Tables;
use fieldgate_proto::sparkplug_b::payload::metric::Value as MetricValue;
use fieldgate_proto::sparkplug_b::{DataType, Payload};
use fieldgate_proto::v1::CompactReading;
use prost::Message as _;
use serde_json::{Value as Json, json};

/// Most bytes a payload may decompress to.
pub const MAX_DECOMPRESSED: usize = 16 << 20;

/// What one message was.
#[derive(Clone, Debug, PartialEq)]
pub enum Decoded {
    /// A reading, in the `json` shape.
    Reading(Json),
    /// A Sparkplug message that is not a reading (NBIRTH, NDEATH, DBIRTH, DDEATH, NCMD ...),
    /// by its message type.
    Control(String),
}

/// A consumer of every encoding.
#[derive(Debug, Default)]
pub struct CloudDecoder {
    tables: Tables,
    /// Sparkplug metric name and datatype by alias, per `group/edge node/device`.
    births: HashMap<String, HashMap<u64, (String, u32)>>,
}

impl CloudDecoder {
    /// Decodes one message received on `topic`.
    pub fn decode(&mut self, topic: &str, payload: &[u8]) -> Result<Decoded> {
        let bytes = decompress(payload, MAX_DECOMPRESSED).with_context(|| format!("decompressing {topic}"))?;
        if let Some(rest) = topic.strip_prefix(NAMESPACE).and_then(|r| r.strip_prefix('/')) {
            return self.sparkplug(rest, &bytes).with_context(|| format!("Sparkplug B message on {topic}"));
        }
        if bytes.first() == Some(&b'{') {
            let j: Json = serde_json::from_slice(&bytes).with_context(|| format!("JSON on {topic}"))?;
            if j["points"].is_object() {
                return Ok(Decoded::Reading(compact_to_full(&bytes)?));
            }
            return Ok(Decoded::Reading(j));
        }
        if let Ok(c) = CompactReading::decode(bytes.as_slice())
            && c.table_id != 0
        {
            let r = self.tables.decode(&c).with_context(|| format!("compact protobuf on {topic}"))?;
            return Ok(Decoded::Reading(to_json(&r)));
        }
        let r = Reading::decode(bytes.as_slice())
            .with_context(|| format!("protobuf payload on {topic} ({} bytes)", bytes.len()))?;
        Ok(Decoded::Reading(to_json(&r)))
    }

    /// `rest`: the topic after `spBv1.0/`, `{group}/{type}/{edge node}[/{device}]`.
    fn sparkplug(&mut self, rest: &str, bytes: &[u8]) -> Result<Decoded> {
        let parts: Vec<&str> = rest.split('/').collect();
        let (group, kind, edge) = match parts.as_slice() {
            [g, k, e] | [g, k, e, _] => (*g, *k, *e),
            _ => bail!("not a Sparkplug topic"),
        };
        let payload = Payload::decode(bytes)?;
        let Some(device) = parts.get(3) else { return Ok(Decoded::Control(kind.to_string())) };
        let key = format!("{group}/{edge}/{device}");
        match kind {
            "DBIRTH" => {
                let mut aliases = HashMap::new();
                for m in &payload.metrics {
                    let (Some(name), Some(alias), Some(datatype)) = (&m.name, m.alias, m.datatype) else {
                        bail!("a DBIRTH metric without name, alias or datatype: {m:?}");
                    };
                    aliases.insert(alias, (name.clone(), datatype));
                }
                self.births.insert(key, aliases);
                Ok(Decoded::Control(kind.to_string()))
            }
            "DDATA" => {
                let born = self.births.get(&key).ok_or_else(|| anyhow!("DDATA before any DBIRTH of {key}"))?;
                let (mut id, mut buffer_seq, mut time_ms, mut points) = (None, None, 0, Vec::new());
                for m in &payload.metrics {
                    let alias = m.alias.ok_or_else(|| anyhow!("a DDATA metric without alias: {m:?}"))?;
                    let (name, datatype) = born.get(&alias).ok_or_else(|| anyhow!("alias {alias} was not born"))?;
                    let value = metric_json(*datatype, m.value.as_ref())?;
                    time_ms = m.timestamp.unwrap_or(time_ms);
                    match name.as_str() {
                        ID_METRIC => id = Some(value),
                        BUFFER_SEQ_METRIC => buffer_seq = Some(value),
                        _ => points.push(json!({"name": name, "value": value})),
                    }
                }
                Ok(Decoded::Reading(json!({
                    "id": id.ok_or_else(|| anyhow!("no {ID_METRIC}"))?,
                    // The uplinks of these tests keep the default group id, the namespace.
                    "namespace": group,
                    "device": device,
                    "node": edge,
                    "timeUnixNano": time_ms * 1_000_000,
                    "bufferSeq": buffer_seq.ok_or_else(|| anyhow!("no {BUFFER_SEQ_METRIC}"))?,
                    "points": points,
                })))
            }
            other => Ok(Decoded::Control(other.to_string())),
        }
    }
}

/// A Sparkplug metric value as JSON, by its born datatype.
fn metric_json(datatype: u32, value: Option<&MetricValue>) -> Result<Json> {
    let dt = DataType::try_from(i32::try_from(datatype)?).map_err(|_| anyhow!("datatype {datatype}"))?;
    Ok(match (dt, value) {
        (_, None) => Json::Null,
        (DataType::Boolean, Some(MetricValue::BooleanValue(b))) => json!(b),
        (DataType::String | DataType::Text, Some(MetricValue::StringValue(s))) => json!(s),
        (DataType::Int8 | DataType::Int16 | DataType::Int32, Some(MetricValue::IntValue(i))) => json!(*i as i32),
        (DataType::Int64, Some(MetricValue::LongValue(l))) => json!(*l as i64),
        (DataType::UInt8 | DataType::UInt16 | DataType::UInt32, Some(MetricValue::IntValue(i))) => json!(i),
        (DataType::UInt64, Some(MetricValue::LongValue(l))) => json!(l),
        (DataType::Float, Some(MetricValue::FloatValue(f))) => json!(f),
        (DataType::Double, Some(MetricValue::DoubleValue(d))) => json!(d),
        (dt, Some(v)) => bail!("a {dt:?} metric carries {v:?}"),
    })
}
