//! `encoding: sparkplugB`: the uplink is a Sparkplug B edge node (Eclipse Sparkplug 3.0,
//! payloads of Eclipse Tahu's `sparkplug_b.proto`), each device a Sparkplug device.
//!
//! Topics are `spBv1.0/{groupId}/{type}/{edgeNodeId}[/{device}]`. On each MQTT session (each
//! connect) the edge node:
//!
//! - connects with its NDEATH as the MQTT will (QoS 1), carrying the session's `bdSeq`
//!   (0, 1, ... 255, 0, ..., one more for every connect);
//! - subscribes to its NCMD topic and publishes its NBIRTH (seq 0) with the metrics `bdSeq`
//!   and `Node Control/Rebirth`;
//! - before the first DDATA of each device, publishes the device's DBIRTH: every metric it
//!   has reported, with name, alias, datatype, timestamp and its latest value;
//! - publishes each reading as a DDATA whose metrics carry their alias instead of their name,
//!   with datatype and value, the sample time as each metric's timestamp and the publish time
//!   as the payload's (the datatype, 2 bytes a metric, stays: decoders such as Eclipse Tahu's
//!   read a value by the datatype beside it);
//! - numbers every message but NDEATH with `seq`, 0 to 255 and round again;
//! - publishes its NDEATH itself before a clean disconnect (the broker sends the will only on
//!   an unclean one).
//!
//! A device whose points change (a point added, renamed, or of another type: a config change)
//! gets a DDEATH and a new DBIRTH before its next DDATA. An NCMD with `Node Control/Rebirth` =
//! true makes the next message a new NBIRTH (seq 0, same `bdSeq`), and every device is born
//! again before its next DDATA.
//!
//! Every DDATA (and DBIRTH) carries the reading's id and `bufferSeq` as the metrics
//! `Fieldgate/id` (String) and `Fieldgate/bufferSeq` (UInt64). Value types: bool → Boolean,
//! signed integers → Int64, unsigned → UInt64, floating point → Double, text → String.
//!
//! Deliberate differences from the specification: DDATA goes with QoS 1, not 0, because the
//! gateway acknowledges its buffer only on the broker's PUBACK (at-least-once; the id and
//! `bufferSeq` let a host drop a duplicate). Births and deaths follow it (QoS 0, NDEATH QoS 1).

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::SystemTime;

use fieldgate_crds::GatewayUplink;
use fieldgate_proto::sparkplug_b::payload::Metric;
use fieldgate_proto::sparkplug_b::payload::metric::Value as MetricValue;
use fieldgate_proto::sparkplug_b::{DataType, Payload};
use prost::Message as _;

use super::{Encoded, Publication, SessionPlan};
use crate::reading::{Reading, Value, unix_nanos};
use crate::uplinks::render_topic;

/// The Sparkplug B topic namespace.
pub const NAMESPACE: &str = "spBv1.0";
/// The node metric holding the session's birth/death sequence number.
pub const BD_SEQ: &str = "bdSeq";
/// The node metric a host writes `true` to (NCMD) to ask for new births.
pub const REBIRTH: &str = "Node Control/Rebirth";
/// The device metric carrying the reading's id.
pub const ID_METRIC: &str = "Fieldgate/id";
/// The device metric carrying the reading's `bufferSeq`.
pub const BUFFER_SEQ_METRIC: &str = "Fieldgate/bufferSeq";

/// Alias of `bdSeq` in NBIRTH.
const BD_SEQ_ALIAS: u64 = 0;
/// Alias of `Node Control/Rebirth` in NBIRTH.
const REBIRTH_ALIAS: u64 = 1;
/// First alias of device metrics (aliases are unique across the edge node).
const FIRST_DEVICE_ALIAS: u64 = 2;

/// The edge node of one uplink: identity, sequence numbers, aliases and what each device was
/// born with.
#[derive(Debug)]
pub struct EdgeNode {
    group: String,
    edge: String,
    /// `bdSeq` of the current session (`None` before the first).
    bd_seq: Option<u8>,
    /// `seq` of the next message.
    seq: u8,
    next_alias: u64,
    devices: HashMap<String, Device>,
    /// Set by an NCMD rebirth request (from the task polling the connection).
    rebirth: Arc<AtomicBool>,
}

#[derive(Debug)]
struct Device {
    /// Its metrics in the order they appeared: `Fieldgate/id`, `Fieldgate/bufferSeq`, points.
    metrics: Vec<DeviceMetric>,
    by_name: HashMap<String, usize>,
    /// Whether its DBIRTH went out on the current session.
    born: bool,
}

#[derive(Debug)]
struct DeviceMetric {
    name: String,
    alias: u64,
    datatype: DataType,
    value: MetricValue,
    /// When `value` was sampled, ms since the epoch.
    timestamp: u64,
}

fn now_ms() -> u64 {
    unix_nanos(SystemTime::now()) / 1_000_000
}

/// The Sparkplug datatype and value of a point value.
fn metric_value(v: &Value) -> (DataType, MetricValue) {
    match v {
        Value::BoolValue(b) => (DataType::Boolean, MetricValue::BooleanValue(*b)),
        // Sparkplug carries signed integers in the unsigned fields, two's complement.
        Value::IntValue(i) => (DataType::Int64, MetricValue::LongValue(*i as u64)),
        Value::UintValue(u) => (DataType::UInt64, MetricValue::LongValue(*u)),
        Value::DoubleValue(d) => (DataType::Double, MetricValue::DoubleValue(*d)),
        Value::StringValue(s) => (DataType::String, MetricValue::StringValue(s.clone())),
    }
}

/// Whether an NCMD payload asks for a rebirth (`Node Control/Rebirth` = true, by name or alias).
pub fn asks_rebirth(payload: &[u8]) -> bool {
    Payload::decode(payload).is_ok_and(|p| {
        p.metrics.iter().any(|m| {
            (m.name.as_deref() == Some(REBIRTH) || (m.name.is_none() && m.alias == Some(REBIRTH_ALIAS)))
                && m.value == Some(MetricValue::BooleanValue(true))
        })
    })
}

impl Device {
    fn new(next_alias: &mut u64) -> Self {
        let mut d = Self { metrics: Vec::new(), by_name: HashMap::new(), born: false };
        d.add(ID_METRIC.to_string(), DataType::String, MetricValue::StringValue(String::new()), 0, next_alias);
        d.add(BUFFER_SEQ_METRIC.to_string(), DataType::UInt64, MetricValue::LongValue(0), 0, next_alias);
        d
    }

    fn add(&mut self, name: String, datatype: DataType, value: MetricValue, timestamp: u64, next_alias: &mut u64) {
        self.by_name.insert(name.clone(), self.metrics.len());
        self.metrics.push(DeviceMetric { name, alias: *next_alias, datatype, value, timestamp });
        *next_alias += 1;
    }

    /// Records a value; `true` when the metric is new or changed its datatype (a rebirth).
    fn set(
        &mut self,
        name: &str,
        datatype: DataType,
        value: MetricValue,
        timestamp: u64,
        next_alias: &mut u64,
    ) -> bool {
        match self.by_name.get(name) {
            Some(&i) => {
                let m = &mut self.metrics[i];
                let changed = m.datatype != datatype;
                (m.datatype, m.value, m.timestamp) = (datatype, value, timestamp);
                changed
            }
            None => {
                self.add(name.to_string(), datatype, value, timestamp, next_alias);
                true
            }
        }
    }

    /// The metric `name` as DDATA carries it: alias, timestamp, datatype and value.
    fn data(&self, name: &str) -> Option<Metric> {
        let m = &self.metrics[*self.by_name.get(name)?];
        Some(Metric {
            alias: Some(m.alias),
            timestamp: Some(m.timestamp),
            datatype: Some(m.datatype as u32),
            value: Some(m.value.clone()),
            ..Default::default()
        })
    }
}

impl EdgeNode {
    /// The edge node of `uplink` on gateway node `node`.
    pub fn new(uplink: &GatewayUplink, node: &str) -> Self {
        let s = uplink.sparkplug();
        let render = |t: &str| render_topic(t, &uplink.namespace, "", &uplink.name, node);
        Self {
            group: render(s.group_id()),
            edge: render(s.edge_node_id()),
            bd_seq: None,
            seq: 0,
            next_alias: FIRST_DEVICE_ALIAS,
            devices: HashMap::new(),
            rebirth: Arc::default(),
        }
    }

    fn node_topic(&self, kind: &str) -> String {
        format!("{NAMESPACE}/{}/{kind}/{}", self.group, self.edge)
    }

    fn device_topic(&self, kind: &str, device: &str) -> String {
        format!("{NAMESPACE}/{}/{kind}/{}/{device}", self.group, self.edge)
    }

    fn next_seq(&mut self) -> u64 {
        let s = self.seq;
        self.seq = self.seq.wrapping_add(1);
        u64::from(s)
    }

    fn bd_seq_metric(&self, alias: Option<u64>) -> Metric {
        Metric {
            name: Some(BD_SEQ.to_string()),
            alias,
            timestamp: Some(now_ms()),
            datatype: Some(DataType::Int64 as u32),
            value: Some(MetricValue::LongValue(u64::from(self.bd_seq.unwrap_or(0)))),
            ..Default::default()
        }
    }

    /// NBIRTH: seq 0, `bdSeq` and `Node Control/Rebirth`.
    fn nbirth(&mut self) -> Publication {
        self.seq = 0;
        let payload = Payload {
            timestamp: Some(now_ms()),
            seq: Some(self.next_seq()),
            metrics: vec![
                self.bd_seq_metric(Some(BD_SEQ_ALIAS)),
                Metric {
                    name: Some(REBIRTH.to_string()),
                    alias: Some(REBIRTH_ALIAS),
                    timestamp: Some(now_ms()),
                    datatype: Some(DataType::Boolean as u32),
                    value: Some(MetricValue::BooleanValue(false)),
                    ..Default::default()
                },
            ],
            ..Default::default()
        };
        Publication::plain(self.node_topic("NBIRTH"), payload.encode_to_vec(), false)
    }

    /// NDEATH: `bdSeq` only, no seq.
    fn ndeath(&self) -> Publication {
        let payload =
            Payload { timestamp: Some(now_ms()), metrics: vec![self.bd_seq_metric(None)], ..Default::default() };
        Publication::plain(self.node_topic("NDEATH"), payload.encode_to_vec(), true)
    }

    /// A new MQTT session: the next `bdSeq`, NDEATH as the will and before a clean disconnect,
    /// the NCMD subscription, NBIRTH; every device is born again before its next DDATA.
    pub fn session(&mut self) -> SessionPlan {
        self.bd_seq = Some(self.bd_seq.map_or(0, |b| b.wrapping_add(1)));
        for d in self.devices.values_mut() {
            d.born = false;
        }
        self.rebirth.store(false, Ordering::Relaxed);
        let ndeath = self.ndeath();
        let ncmd = self.node_topic("NCMD");
        let rebirth = Arc::clone(&self.rebirth);
        let topic = ncmd.clone();
        SessionPlan {
            will: Some(ndeath.clone()),
            subscribe: vec![ncmd],
            inbox: Some(Arc::new(move |t: &str, payload: &[u8]| {
                if t == topic && asks_rebirth(payload) {
                    rebirth.store(true, Ordering::Relaxed);
                }
            })),
            births: vec![self.nbirth()],
            farewell: Some(ndeath),
        }
    }

    /// A reading as DDATA, preceded by an NBIRTH (a rebirth was asked for), and a DDEATH and
    /// a DBIRTH (the device is not born on this session, or its metrics changed) when needed.
    pub fn encode(&mut self, r: &Reading) -> Encoded {
        let mut before = Vec::new();
        if self.rebirth.swap(false, Ordering::Relaxed) {
            before.push(self.nbirth());
            for d in self.devices.values_mut() {
                d.born = false;
            }
        }
        let sampled = r.time_unix_nano / 1_000_000;
        let next_alias = &mut self.next_alias;
        let device = match self.devices.get_mut(&r.device) {
            Some(d) => d,
            None => self.devices.entry(r.device.clone()).or_insert_with(|| Device::new(next_alias)),
        };
        let mut changed = false;
        device.set(ID_METRIC, DataType::String, MetricValue::StringValue(r.id.clone()), sampled, next_alias);
        device.set(BUFFER_SEQ_METRIC, DataType::UInt64, MetricValue::LongValue(r.buffer_seq), sampled, next_alias);
        for p in &r.points {
            let Some(v) = &p.value else { continue };
            let (datatype, value) = metric_value(v);
            changed |= device.set(&p.name, datatype, value, sampled, next_alias);
        }
        let mut metrics = Vec::with_capacity(r.points.len() + 2);
        metrics.extend(device.data(ID_METRIC));
        metrics.extend(device.data(BUFFER_SEQ_METRIC));
        metrics.extend(r.points.iter().filter(|p| p.value.is_some()).filter_map(|p| device.data(&p.name)));
        let rebirth = changed && device.born;
        let birth = !device.born || changed;
        device.born = true;
        if rebirth {
            let payload = Payload { timestamp: Some(now_ms()), seq: Some(self.next_seq()), ..Default::default() };
            before.push(Publication::plain(self.device_topic("DDEATH", &r.device), payload.encode_to_vec(), false));
        }
        if birth {
            let seq = self.next_seq();
            before.push(self.dbirth(&r.device, seq));
        }
        let payload = Payload { timestamp: Some(now_ms()), seq: Some(self.next_seq()), metrics, ..Default::default() };
        Encoded {
            before,
            message: Publication::plain(self.device_topic("DDATA", &r.device), payload.encode_to_vec(), true),
        }
    }

    /// DBIRTH of `device`: every metric with name, alias, timestamp, datatype and value.
    fn dbirth(&self, device: &str, seq: u64) -> Publication {
        let metrics = self.devices.get(device).map_or_else(Vec::new, |d| {
            d.metrics
                .iter()
                .map(|m| Metric {
                    name: Some(m.name.clone()),
                    alias: Some(m.alias),
                    timestamp: Some(m.timestamp),
                    datatype: Some(m.datatype as u32),
                    value: Some(m.value.clone()),
                    ..Default::default()
                })
                .collect()
        });
        let payload = Payload { timestamp: Some(now_ms()), seq: Some(seq), metrics, ..Default::default() };
        Publication::plain(self.device_topic("DBIRTH", device), payload.encode_to_vec(), false)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::encoding::tests::{registers, uplink};
    use fieldgate_crds::{Compression, Encoding, SparkplugSpec};

    fn node() -> EdgeNode {
        let mut u = uplink(Encoding::SparkplugB, Compression::None);
        u.sparkplug = Some(SparkplugSpec { group_id: Some("plant-{namespace}".into()), edge_node_id: None });
        EdgeNode::new(&u, "edge-1")
    }

    fn payload(p: &Publication) -> Payload {
        Payload::decode(p.payload.as_ref()).unwrap()
    }

    fn topics(e: &Encoded) -> Vec<&str> {
        e.before.iter().chain([&e.message]).map(|p| p.topic.as_str()).collect()
    }

    fn seqs(e: &Encoded) -> Vec<u64> {
        e.before.iter().chain([&e.message]).map(|p| payload(p).seq.unwrap()).collect()
    }

    fn bd_seq(p: &Publication) -> u64 {
        let pl = payload(p);
        let m = pl.metrics.iter().find(|m| m.name.as_deref() == Some(BD_SEQ)).unwrap();
        match m.value {
            Some(MetricValue::LongValue(v)) => v,
            ref other => panic!("bdSeq {other:?}"),
        }
    }

    #[test]
    fn a_session_births_the_node_with_its_death_as_will() {
        let mut n = node();
        let s = n.session();
        let will = s.will.as_ref().unwrap();
        assert_eq!(will.topic, "spBv1.0/plant-default/NDEATH/edge-1");
        assert!(will.qos1);
        assert_eq!(payload(will).seq, None, "NDEATH has no seq");
        assert_eq!(s.subscribe, ["spBv1.0/plant-default/NCMD/edge-1"]);
        let nbirth = &s.births[0];
        assert_eq!(nbirth.topic, "spBv1.0/plant-default/NBIRTH/edge-1");
        assert_eq!(payload(nbirth).seq, Some(0));
        assert_eq!((bd_seq(nbirth), bd_seq(will)), (0, 0));
        let names: Vec<_> =
            payload(nbirth).metrics.iter().map(|m| (m.name.clone().unwrap(), m.alias.unwrap())).collect();
        assert_eq!(names, [(BD_SEQ.to_string(), 0), (REBIRTH.to_string(), 1)]);
        let s2 = n.session();
        assert_eq!((bd_seq(&s2.births[0]), bd_seq(s2.will.as_ref().unwrap())), (1, 1));
    }

    #[test]
    fn devices_are_born_once_per_session_then_send_aliases_only() {
        let mut n = node();
        let _ = n.session();
        let r = registers("m1", 3, 40);
        let first = n.encode(&r);
        assert_eq!(topics(&first), ["spBv1.0/plant-default/DBIRTH/edge-1/m1", "spBv1.0/plant-default/DDATA/edge-1/m1"]);
        assert_eq!(seqs(&first), [1, 2]);
        let birth = payload(&first.before[0]);
        assert!(birth.metrics.iter().all(|m| m.name.is_some() && m.alias.is_some() && m.datatype.is_some()));
        let born: Vec<_> = birth.metrics.iter().map(|m| m.name.clone().unwrap()).collect();
        assert_eq!(born, [ID_METRIC, BUFFER_SEQ_METRIC, "r0", "r1", "r2"]);
        let data = payload(&first.message);
        assert!(data.metrics.iter().all(|m| m.name.is_none() && m.datatype.is_some() && m.alias.is_some()));
        assert!(data.metrics.iter().all(|m| m.timestamp == Some(1_700_000_000_000)));
        let again = n.encode(&r);
        assert_eq!(topics(&again), ["spBv1.0/plant-default/DDATA/edge-1/m1"]);
        let other = n.encode(&registers("m2", 2, 1));
        assert_eq!(seqs(&other), [4, 5]);
        let aliases: Vec<_> = payload(&other.before[0]).metrics.iter().map(|m| m.alias.unwrap()).collect();
        assert_eq!(aliases, [7, 8, 9, 10], "aliases are unique across the edge node");
        let _ = n.session();
        assert_eq!(n.encode(&r).before.len(), 1, "a new session births the device again");
    }

    #[test]
    fn seq_wraps_after_255() {
        let mut n = node();
        let _ = n.session();
        let r = registers("m1", 1, 0);
        let mut last = Vec::new();
        for _ in 0..300 {
            last.extend(seqs(&n.encode(&r)));
        }
        assert_eq!(&last[..3], [1, 2, 3]);
        let at = last.iter().position(|s| *s == 255).unwrap();
        assert_eq!(last[at + 1], 0);
        assert!(last.windows(2).all(|w| w[1] == (w[0] + 1) % 256));
    }

    #[test]
    fn a_changed_point_set_kills_and_rebirths_the_device() {
        let mut n = node();
        let _ = n.session();
        let r = registers("m1", 2, 0);
        let _ = n.encode(&r);
        let mut renamed = r.clone();
        renamed.points[1].name = "pressure".into();
        let out = n.encode(&renamed);
        assert_eq!(
            topics(&out),
            [
                "spBv1.0/plant-default/DDEATH/edge-1/m1",
                "spBv1.0/plant-default/DBIRTH/edge-1/m1",
                "spBv1.0/plant-default/DDATA/edge-1/m1"
            ]
        );
        let mut typed = renamed.clone();
        typed.points[0].value = Some(Value::DoubleValue(0.5));
        assert_eq!(n.encode(&typed).before.len(), 2);
        assert!(n.encode(&typed).before.is_empty());
    }

    #[test]
    fn a_rebirth_request_births_node_and_devices_again() {
        let mut n = node();
        let s = n.session();
        let r = registers("m1", 2, 0);
        let _ = n.encode(&r);
        let inbox = s.inbox.unwrap();
        let ask = |name: &str, v: bool| {
            Payload {
                metrics: vec![Metric {
                    name: Some(name.into()),
                    value: Some(MetricValue::BooleanValue(v)),
                    ..Default::default()
                }],
                ..Default::default()
            }
            .encode_to_vec()
        };
        inbox("spBv1.0/plant-default/NCMD/edge-1", &ask(REBIRTH, false));
        inbox("spBv1.0/plant-default/NCMD/other", &ask(REBIRTH, true));
        inbox("spBv1.0/plant-default/NCMD/edge-1", b"garbage");
        assert_eq!(n.encode(&r).before.len(), 0);
        inbox("spBv1.0/plant-default/NCMD/edge-1", &ask(REBIRTH, true));
        let out = n.encode(&r);
        assert_eq!(
            topics(&out),
            [
                "spBv1.0/plant-default/NBIRTH/edge-1",
                "spBv1.0/plant-default/DBIRTH/edge-1/m1",
                "spBv1.0/plant-default/DDATA/edge-1/m1"
            ]
        );
        assert_eq!(seqs(&out), [0, 1, 2]);
        assert_eq!(bd_seq(&out.before[0]), 0, "a rebirth keeps the session's bdSeq");
    }

    #[test]
    fn negative_values_travel_as_twos_complement() {
        let mut n = node();
        let _ = n.session();
        let mut r = registers("m1", 1, 0);
        r.points[0].value = Some(Value::IntValue(-2));
        let out = n.encode(&r);
        let birth = payload(&out.before[0]);
        let m = birth.metrics.iter().find(|m| m.name.as_deref() == Some("r0")).unwrap();
        assert_eq!(m.datatype, Some(DataType::Int64 as u32));
        assert_eq!(m.value, Some(MetricValue::LongValue(u64::MAX - 1)));
    }
}
