//! `encoding: sparkplugB` end to end, judged by an independent decoder: simulated Modbus
//! devices -> `fieldgate-gateway` -> `nats-server` -> `mosquitto` -> a host-like subscriber on
//! `spBv1.0/#`, whose messages Eclipse Tahu's own JavaScript library (`sparkplug-payload`,
//! installed by `scripts/setup.sh`) decodes. The test then checks what Sparkplug B 3.0 asks of
//! an edge node: births before data, aliases, sequence numbers, bdSeq, the NDEATH will.
//!
//! Needs `cargo build --workspace --bins` first (the tests run the gateway binary).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

use anyhow::{Context, Result, anyhow, bail, ensure};
use fieldgate_crds::{Compression, Encoding, Point, SparkplugSpec};
use fieldgate_gateway::encoding::sparkplug::{BUFFER_SEQ_METRIC, ID_METRIC, REBIRTH};
use fieldgate_gateway::reading::{Value, pb};
use fieldgate_proto::sparkplug_b::payload::Metric;
use fieldgate_proto::sparkplug_b::payload::metric::Value as MetricValue;
use fieldgate_proto::sparkplug_b::{DataType, Payload};
use fieldgate_tests::config::{ConfigBuilder, mqtt_of, mqtt_uplink};
use fieldgate_tests::fleet::check_sim_reading;
use fieldgate_tests::tahu::{self, TahuMessage, as_i64, as_u64};
use fieldgate_tests::{CloudMessage, CloudSubscriber, Gateway, Mosquitto, NatsServer, SimFleet};
use prost::Message as _;
use serde_json::Value as Json;

/// Generous deadline for anything that should happen "soon" on a busy 2-core machine.
const WAIT: Duration = Duration::from_secs(120);
/// The gateway node of the test harness.
const NODE: &str = "test-node";
/// The Sparkplug group of both uplinks (the default: the namespace).
const GROUP: &str = "default";

fn count(msgs: &[CloudMessage], kind: &str, edge: &str) -> usize {
    let prefix = format!("spBv1.0/{GROUP}/{kind}/{edge}");
    msgs.iter().filter(|m| m.topic == prefix || m.topic.starts_with(&format!("{prefix}/"))).count()
}

/// A decoded metric value as the typed point value its Sparkplug datatype stands for.
fn point_value(m: &Json) -> Result<Value> {
    let v = &m["value"];
    Ok(match m["type"].as_str() {
        Some("Boolean") => Value::BoolValue(v.as_bool().ok_or_else(|| anyhow!("{m}"))?),
        Some("Int64") => Value::IntValue(as_i64(v).ok_or_else(|| anyhow!("{m}"))?),
        Some("UInt64") => Value::UintValue(as_u64(v).ok_or_else(|| anyhow!("{m}"))?),
        Some("Double") => Value::DoubleValue(v.as_f64().ok_or_else(|| anyhow!("{m}"))?),
        Some("String") => Value::StringValue(v.as_str().ok_or_else(|| anyhow!("{m}"))?.to_string()),
        other => bail!("unexpected datatype {other:?} in {m}"),
    })
}

/// What one edge node's message stream showed.
#[derive(Debug, Default)]
struct Seen {
    sessions: usize,
    nbirths: usize,
    ndeaths: usize,
    dbirths: usize,
    ddata: usize,
    wraps: usize,
}

/// Checks one edge node's messages, in arrival order, against Sparkplug B's rules for an edge
/// node, and every DDATA against what the simulated devices serve.
fn check_edge_node(edge: &str, msgs: &[&TahuMessage], points: &[Point]) -> Result<Seen> {
    let mut seen = Seen::default();
    // The session's bdSeq (from its NBIRTH) and the seq the next message must carry.
    let mut bd_seq: Option<u64> = None;
    let mut expected: Option<u64> = None;
    // Per device of the session: alias -> (name, type); who (node "" or a device) owns each
    // alias of the session.
    let mut born: HashMap<String, HashMap<u64, (String, String)>> = HashMap::new();
    let mut owners: HashMap<u64, String> = HashMap::new();
    for (i, m) in msgs.iter().enumerate() {
        let at = || format!("{edge} message {i} ({})", m.topic);
        let seq = m.seq();
        if m.kind() != "NDEATH" {
            let seq = seq.ok_or_else(|| anyhow!("{}: no seq", at()))?;
            ensure!(seq < 256, "{}: seq {seq}", at());
            if m.kind() != "NBIRTH" {
                ensure!(Some(seq) == expected, "{}: seq {seq}, expected {expected:?}", at());
                seen.wraps += usize::from(seq == 0);
            }
            expected = Some((seq + 1) % 256);
        }
        match m.kind() {
            "NBIRTH" => {
                ensure!(seq == Some(0), "{}: NBIRTH seq {seq:?}", at());
                let b = m.metric("bdSeq").and_then(as_u64).ok_or_else(|| anyhow!("{}: no bdSeq", at()))?;
                ensure!(m.metric(REBIRTH) == Some(&Json::Bool(false)), "{}: no {REBIRTH} metric", at());
                owners.clear();
                for metric in m.metrics() {
                    ensure!(metric["name"].is_string() && as_u64(&metric["alias"]).is_some(), "{}: {metric}", at());
                    owners.insert(as_u64(&metric["alias"]).unwrap_or_default(), String::new());
                }
                match bd_seq {
                    // A rebirth within the session keeps its bdSeq.
                    Some(current) => ensure!(current == b, "{}: rebirth with bdSeq {b}, session {current}", at()),
                    None => seen.sessions += 1,
                }
                bd_seq = Some(b);
                born.clear();
                seen.nbirths += 1;
            }
            "NDEATH" => {
                ensure!(seq.is_none(), "{}: NDEATH with seq {seq:?}", at());
                let b = m.metric("bdSeq").and_then(as_u64).ok_or_else(|| anyhow!("{}: no bdSeq", at()))?;
                ensure!(Some(b) == bd_seq, "{}: NDEATH bdSeq {b}, NBIRTH's {bd_seq:?}", at());
                (bd_seq, expected) = (None, None);
                born.clear();
                owners.clear();
                seen.ndeaths += 1;
            }
            "DBIRTH" => {
                ensure!(bd_seq.is_some(), "{}: DBIRTH outside a session", at());
                let device = m.device().ok_or_else(|| anyhow!("{}: no device", at()))?;
                let mut table = HashMap::new();
                for metric in m.metrics() {
                    let (Some(name), Some(alias), Some(t)) =
                        (metric["name"].as_str(), as_u64(&metric["alias"]), metric["type"].as_str())
                    else {
                        bail!("{}: a birth metric needs name, alias and datatype: {metric}", at());
                    };
                    ensure!(as_u64(&metric["timestamp"]).is_some(), "{}: no timestamp: {metric}", at());
                    let owner = owners.entry(alias).or_insert_with(|| device.to_string());
                    ensure!(owner == device, "{}: alias {alias} of {device} is {owner:?}'s too", at());
                    table.insert(alias, (name.to_string(), t.to_string()));
                }
                born.insert(device.to_string(), table);
                seen.dbirths += 1;
            }
            "DDEATH" => {
                born.remove(m.device().unwrap_or_default());
            }
            "DDATA" => {
                let device = m.device().ok_or_else(|| anyhow!("{}: no device", at()))?;
                let table = born.get(device).ok_or_else(|| anyhow!("{}: DDATA before the device's DBIRTH", at()))?;
                let (mut id, mut buffer_seq, mut typed) = (None, None, Vec::new());
                for metric in m.metrics() {
                    ensure!(metric.get("name").is_none(), "{}: DDATA metric with a name: {metric}", at());
                    ensure!(as_u64(&metric["timestamp"]).is_some(), "{}: no timestamp: {metric}", at());
                    let alias = as_u64(&metric["alias"]).ok_or_else(|| anyhow!("{}: no alias: {metric}", at()))?;
                    let (name, t) = table.get(&alias).ok_or_else(|| anyhow!("{}: alias {alias} not born", at()))?;
                    ensure!(metric["type"] == t.as_str(), "{}: {name} born {t}, sent as {}", at(), metric["type"]);
                    match name.as_str() {
                        ID_METRIC => id = metric["value"].as_str().map(str::to_string),
                        BUFFER_SEQ_METRIC => buffer_seq = as_u64(&metric["value"]),
                        _ => typed.push(pb::Point {
                            name: name.clone(),
                            value: Some(point_value(metric).with_context(at)?),
                            unit: String::new(),
                        }),
                    }
                }
                let id = id.ok_or_else(|| anyhow!("{}: no {ID_METRIC}", at()))?;
                ensure!(id.starts_with(&format!("default/{device}/")), "{}: id {id}", at());
                ensure!(buffer_seq.is_some_and(|s| s > 0), "{}: {BUFFER_SEQ_METRIC} {buffer_seq:?}", at());
                check_sim_reading(&typed, points).with_context(at)?;
                seen.ddata += 1;
            }
            other => bail!("{}: unexpected message type {other}", at()),
        }
    }
    Ok(seen)
}

fn rebirth_request() -> Vec<u8> {
    Payload {
        timestamp: Some(1),
        metrics: vec![Metric {
            name: Some(REBIRTH.into()),
            timestamp: Some(1),
            datatype: Some(DataType::Boolean as u32),
            value: Some(MetricValue::BooleanValue(true)),
            ..Default::default()
        }],
        ..Default::default()
    }
    .encode_to_vec()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sparkplug_b_output_is_what_eclipse_tahus_decoder_and_the_specification_expect() -> Result<()> {
    let nats = NatsServer::start().await?;
    let broker = Mosquitto::start().await?;
    let host = CloudSubscriber::start(&broker.url(), "scada-host", "spBv1.0/#").await?;
    let fleet = SimFleet::healthy(3).await?;
    let mut builder = ConfigBuilder::new().devices(fleet.gateway_devices("50ms"));
    let edges: Vec<String> = [3u8, 5].iter().map(|v| format!("{NODE}-v{v}")).collect();
    for version in [3u8, 5] {
        let mut u = mqtt_uplink(&format!("sp-v{version}"), &broker.url());
        u.encoding = Some(Encoding::SparkplugB);
        u.compression = Some(Compression::None);
        mqtt_of(&mut u).protocol_version = Some(version);
        u.sparkplug = Some(SparkplugSpec { group_id: None, edge_node_id: Some(format!("{{node}}-v{version}")) });
        builder = builder.uplink(u);
    }
    let mut gw = Gateway::new(&nats.url())?;
    gw.write_config(&builder.yaml()?)?;
    gw.start_ready().await?;

    // Enough DDATA for seq to wrap past 255 on both edge nodes.
    host.wait_for("300 DDATA per edge node", WAIT, |m| edges.iter().all(|e| count(m, "DDATA", e) >= 300))
        .await
        .with_context(|| gw.log())?;
    // A host asks the 3.1.1 edge node for a rebirth: a new NBIRTH, then births before data.
    host.publish(&format!("spBv1.0/{GROUP}/NCMD/{}", edges[0]), rebirth_request()).await?;
    host.wait_for("a rebirth", WAIT, |m| count(m, "NBIRTH", &edges[0]) >= 2).await.with_context(|| gw.log())?;
    let before = host.count();
    host.wait_for("data after the rebirth", WAIT, |m| m.len() >= before + 20).await?;
    // A crash: the broker publishes each session's NDEATH, its will.
    gw.kill()?;
    host.wait_for("NDEATH wills", WAIT, |m| edges.iter().all(|e| count(m, "NDEATH", e) == 1)).await?;
    // Back: new sessions; then a clean stop, which publishes the NDEATH itself.
    gw.start_ready().await?;
    host.wait_for("new births and data", WAIT, |m| {
        edges.iter().all(|e| {
            let after_death = m.iter().skip_while(|x| !x.topic.contains(&format!("/NDEATH/{e}")));
            after_death.filter(|x| x.topic.contains(&format!("/DDATA/{e}/"))).count() >= 20
        })
    })
    .await
    .with_context(|| gw.log())?;
    let status = gw.terminate().await?;
    ensure!(status.success(), "{status}\n{}", gw.log());
    host.wait_for("NDEATH at a clean stop", WAIT, |m| edges.iter().all(|e| count(m, "NDEATH", e) == 2)).await?;

    // Everything the host received, decoded by Eclipse Tahu's library.
    let raw: Vec<(String, bytes::Bytes)> =
        host.messages().into_iter().filter(|m| !m.topic.contains("/NCMD/")).map(|m| (m.topic, m.payload)).collect();
    let decoded = tahu::decode(&raw)?;
    let points = fleet.points();
    let mut report = BTreeMap::new();
    for edge in &edges {
        let mine: Vec<&TahuMessage> = decoded.iter().filter(|m| m.edge_node() == edge).collect();
        let seen = check_edge_node(edge, &mine, &points)?;
        ensure!(seen.sessions == 2 && seen.ndeaths == 2, "{edge}: {seen:?}");
        ensure!(seen.wraps >= 1, "{edge}: seq never wrapped: {seen:?}");
        ensure!(seen.dbirths >= 6, "{edge}: every device born in each session: {seen:?}");
        report.insert(edge.clone(), seen);
    }
    ensure!(report[&edges[0]].nbirths == 3, "the rebirth: {report:?}");
    eprintln!("{report:#?}");
    drop((nats, fleet));
    Ok(())
}
