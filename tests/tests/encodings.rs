//! Every uplink encoding and compression end to end, with real processes: simulated Modbus
//! devices -> `fieldgate-gateway` -> `nats-server` -> `mosquitto` -> cloud subscribers (MQTT
//! 3.1.1 and 5) that decode what they receive like a consumer would.
//!
//! Needs `cargo build --workspace --bins` first (the tests run the gateway binary).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use anyhow::{Context, Result, anyhow, ensure};
use fieldgate_crds::{Compression, Encoding, GatewayUplink, OnFull};
use fieldgate_gateway::encoding::compress::{decompress, sniff};
use fieldgate_tests::cloud_v5::V5Subscriber;
use fieldgate_tests::config::{ConfigBuilder, NAMESPACE, mqtt_of, mqtt_uplink, set_buffer};
use fieldgate_tests::decode::MAX_DECOMPRESSED;
use fieldgate_tests::fleet::{check_sim_reading, typed_points};
use fieldgate_tests::{CloudSubscriber, Gateway, Mosquitto, NatsServer, SimFleet, workspace_root};
use serde_json::Value as Json;

/// Generous deadline for anything that should happen "soon" on a busy 2-core machine.
const WAIT: Duration = Duration::from_secs(120);

/// The uplink of one encoding and compression, on its own topic prefix `enc/{uplink}/`.
fn uplink(broker: &str, encoding: Encoding, compression: Compression, version: u8) -> GatewayUplink {
    let name = format!("{}-{}-v{version}", encoding.as_str().to_lowercase(), compression.as_str());
    let mut u = mqtt_uplink(&name, broker);
    // Many uplinks on one nats-server, which reserves each buffer's maxBytes on disk: a small
    // buffer each keeps the test within a nearly full disk.
    set_buffer(&mut u, "32Mi", OnFull::DropOldest);
    u.encoding = Some(encoding);
    u.compression = Some(compression);
    mqtt_of(&mut u).protocol_version = Some(version);
    if encoding != Encoding::SparkplugB {
        mqtt_of(&mut u).topic = Some("enc/{uplink}/{device}".into());
    }
    u
}

/// The uplink a message came through: `enc/{uplink}/...`, or the Sparkplug one.
fn uplink_of(topic: &str) -> String {
    match topic.strip_prefix("enc/") {
        Some(rest) => rest.split('/').next().unwrap_or_default().to_string(),
        None => "sparkplugb-none-v5".to_string(),
    }
}

/// The device a reading message is for (the last topic level in both namespaces).
fn device_of(topic: &str) -> &str {
    topic.rsplit('/').next().unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_encoding_and_compression_reaches_the_cloud_decodable() -> Result<()> {
    let nats = NatsServer::start().await?;
    let broker = Mosquitto::start().await?;
    let cloud = CloudSubscriber::start(&broker.url(), "cloud-encodings", "#").await?;
    let cloud_v5 = V5Subscriber::start(&broker.url(), "cloud-encodings-v5", "#").await?;
    let fleet = SimFleet::healthy(2).await?;
    let mut builder = ConfigBuilder::new().devices(fleet.gateway_devices("300ms"));
    let mut uplinks = BTreeMap::new();
    let mut version = 3;
    for encoding in [Encoding::Json, Encoding::JsonCompact, Encoding::Protobuf, Encoding::ProtobufCompact] {
        for compression in [Compression::None, Compression::Gzip, Compression::Zstd] {
            version = if version == 3 { 5 } else { 3 };
            let u = uplink(&broker.url(), encoding, compression, version);
            uplinks.insert(u.name.clone(), (encoding, compression, version));
            builder = builder.uplink(u);
        }
    }
    let sparkplug = uplink(&broker.url(), Encoding::SparkplugB, Compression::None, 5);
    uplinks.insert(sparkplug.name.clone(), (Encoding::SparkplugB, Compression::None, 5));
    builder = builder.uplink(sparkplug);
    let mut gw = Gateway::new(&nats.url())?;
    gw.write_config(&builder.yaml()?)?;
    gw.start_ready().await?;

    let wanted = 4;
    let n_uplinks = uplinks.len();
    cloud
        .wait_for(&format!("{wanted} readings per device on each of {n_uplinks} uplinks"), WAIT, |msgs| {
            let mut n: BTreeMap<(String, &str), usize> = BTreeMap::new();
            for m in msgs.iter().filter(|m| m.is_reading()) {
                *n.entry((uplink_of(&m.topic), device_of(&m.topic))).or_default() += 1;
            }
            n.len() == 2 * n_uplinks && n.values().all(|c| *c >= wanted)
        })
        .await
        .with_context(|| gw.log())?;

    // Every reading decodes, whatever its encoding and compression, to the values the devices
    // served; each carries its id and bufferSeq; a compressed uplink's payloads are compressed.
    let points = fleet.points();
    let mut checked: BTreeMap<String, usize> = BTreeMap::new();
    let mut seqs: BTreeMap<(String, String), BTreeSet<u64>> = BTreeMap::new();
    let mut compressed: BTreeMap<String, usize> = BTreeMap::new();
    for m in cloud.messages().iter().filter(|m| m.is_reading()) {
        let uplink = uplink_of(&m.topic);
        let (encoding, compression, _) = uplinks[&uplink];
        let j = m.json().with_context(|| format!("uplink {uplink}"))?;
        ensure!(j["namespace"] == NAMESPACE && j["device"] == device_of(&m.topic), "envelope of {j}");
        let id = j["id"].as_str().unwrap_or_default();
        ensure!(id.starts_with(&format!("{NAMESPACE}/{}/", device_of(&m.topic))), "uplink {uplink}: id {id:?}");
        let seq = j["bufferSeq"].as_u64().ok_or_else(|| anyhow!("uplink {uplink}: no bufferSeq in {j}"))?;
        ensure!(seq > 0, "uplink {uplink}: bufferSeq 0");
        seqs.entry((uplink.clone(), id.to_string())).or_default().insert(seq);
        let typed = typed_points(&j, &points).with_context(|| format!("uplink {uplink}: {j}"))?;
        check_sim_reading(&typed, &points).with_context(|| format!("uplink {uplink}, topic {}", m.topic))?;
        // Compressed as the uplink says, or sent as encoded when that would not be smaller.
        let packed = sniff(&m.payload);
        ensure!(
            packed.is_none() || packed == Some(compression),
            "uplink {uplink}: {} bytes starting {:02x?}",
            m.payload.len(),
            &m.payload[..4.min(m.payload.len())]
        );
        if packed.is_some() {
            *compressed.entry(uplink.clone()).or_default() += 1;
        }
        let first = decompress(&m.payload, MAX_DECOMPRESSED)?.first().copied();
        let want = match encoding {
            Encoding::Json | Encoding::JsonCompact => Some(b'{'),
            // Field 1 (id), length-delimited.
            Encoding::Protobuf | Encoding::ProtobufCompact | Encoding::SparkplugB => Some(0x0a),
        };
        if encoding != Encoding::SparkplugB {
            ensure!(first == want, "uplink {uplink}: decoded payload starts with {first:02x?}");
        }
        *checked.entry(uplink).or_default() += 1;
    }
    ensure!(checked.len() == n_uplinks, "readings from {checked:?}");
    // Names make JSON and the full protobuf compressible; the compact protobuf of these small
    // devices (34 points of small values) may well not shrink, and then goes as it is.
    let want_compressed: BTreeSet<String> = uplinks
        .iter()
        .filter(|(_, (e, c, _))| *c != Compression::None && *e != Encoding::ProtobufCompact)
        .map(|(name, _)| name.clone())
        .collect();
    let got_compressed: BTreeSet<String> = compressed.keys().cloned().collect();
    ensure!(got_compressed.is_superset(&want_compressed), "compressed messages per uplink: {compressed:?}");
    // A reading delivered again keeps its bufferSeq.
    for ((uplink, id), s) in &seqs {
        ensure!(s.len() == 1, "uplink {uplink}: reading {id} arrived with bufferSeqs {s:?}");
    }
    eprintln!("checked readings per uplink: {checked:?}");

    // Over MQTT 5 each message says its content type, and its compression when compressed.
    let v5 = cloud_v5.messages();
    let mut seen_v5 = BTreeSet::new();
    for m in v5.iter().filter(|m| m.topic.starts_with("enc/")) {
        let uplink = uplink_of(&m.topic);
        let (encoding, compression, version) = uplinks[&uplink];
        if version != 5 {
            ensure!(m.content_type.is_none() && m.user_properties.is_empty(), "3.1.1 uplink {uplink} has properties");
            continue;
        }
        let want = match encoding {
            Encoding::Json => "application/json",
            Encoding::JsonCompact => "application/vnd.fieldgate.compact+json",
            Encoding::Protobuf => "application/x-protobuf;proto=fieldgate.v1.Reading",
            Encoding::ProtobufCompact => "application/x-protobuf;proto=fieldgate.v1.CompactReading",
            Encoding::SparkplugB => unreachable!("not on enc/"),
        };
        ensure!(m.content_type.as_deref() == Some(want), "uplink {uplink}: content type {:?}", m.content_type);
        let said = m.property("content-encoding");
        ensure!(
            said == sniff(&m.payload).map(|c| c.as_str()),
            "uplink {uplink}: content-encoding {said:?} for a payload compressed as {:?}",
            sniff(&m.payload)
        );
        ensure!(compression != Compression::None || said.is_none(), "uplink {uplink}: {said:?}");
        ensure!(m.decoded.is_ok(), "uplink {uplink}: {:?}", m.decoded);
        seen_v5.insert(uplink);
    }
    ensure!(seen_v5.len() == 6, "MQTT 5 uplinks seen by the v5 subscriber: {seen_v5:?}");

    let status = gw.terminate().await?;
    assert!(status.success(), "{status}\n{}", gw.log());
    drop((nats, fleet));
    Ok(())
}

/// A committed JSON Schema, compiled.
fn schema(file: &str) -> Result<jsonschema::Validator> {
    let path = workspace_root().join("proto/fieldgate/v1").join(file);
    let text = std::fs::read_to_string(&path).with_context(|| path.display().to_string())?;
    let schema: Json = serde_json::from_str(&text).with_context(|| path.display().to_string())?;
    jsonschema::validator_for(&schema).map_err(|e| anyhow!("{}: {e}", path.display()))
}

/// Every violation of `doc`, as `path: message` lines.
fn violations(schema: &jsonschema::Validator, doc: &Json) -> Vec<String> {
    schema.iter_errors(doc).map(|e| format!("{}: {e}", e.instance_path())).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_readings_match_the_published_json_schemas() -> Result<()> {
    let full = schema("reading.schema.json")?;
    let compact = schema("compact-reading.schema.json")?;
    let nats = NatsServer::start().await?;
    let broker = Mosquitto::start().await?;
    let cloud = CloudSubscriber::start(&broker.url(), "cloud-schemas", "enc/#").await?;
    let fleet = SimFleet::healthy(2).await?;
    let builder = ConfigBuilder::new()
        .devices(fleet.gateway_devices("200ms"))
        .uplink(uplink(&broker.url(), Encoding::Json, Compression::None, 3))
        .uplink(uplink(&broker.url(), Encoding::JsonCompact, Compression::Zstd, 5));
    let mut gw = Gateway::new(&nats.url())?;
    gw.write_config(&builder.yaml()?)?;
    gw.start_ready().await?;

    let wanted = 10;
    cloud
        .wait_for(&format!("{wanted} readings on each JSON uplink"), WAIT, |msgs| {
            let json = msgs.iter().filter(|m| m.topic.starts_with("enc/json-")).count();
            let compact = msgs.iter().filter(|m| m.topic.starts_with("enc/jsoncompact-")).count();
            json >= wanted && compact >= wanted
        })
        .await
        .with_context(|| gw.log())?;

    let mut validated = BTreeMap::new();
    for m in cloud.messages() {
        let (schema, uplink) =
            if m.topic.starts_with("enc/json-") { (&full, "json") } else { (&compact, "jsonCompact") };
        let doc: Json = serde_json::from_slice(&decompress(&m.payload, MAX_DECOMPRESSED)?)?;
        let found = violations(schema, &doc);
        ensure!(found.is_empty(), "{uplink} message on {} breaks its schema: {found:#?}\n{doc}", m.topic);
        *validated.entry(uplink).or_insert(0) += 1;
        // The schemas are not vacuous: the same message without its bufferSeq, or with a point
        // value that is an object, is refused.
        let mut broken = doc.clone();
        broken.as_object_mut().unwrap().remove("bufferSeq");
        ensure!(!violations(schema, &broken).is_empty(), "{uplink}: a message without bufferSeq passes");
        let mut broken = doc.clone();
        match &mut broken["points"] {
            Json::Array(ps) => ps[0]["value"] = serde_json::json!({"x": 1}),
            Json::Object(ps) => {
                ps.insert("extra".into(), serde_json::json!({"x": 1}));
            }
            other => anyhow::bail!("points of {uplink}: {other}"),
        }
        ensure!(!violations(schema, &broken).is_empty(), "{uplink}: an object as a value passes");
    }
    eprintln!("messages validated: {validated:?}");
    let status = gw.terminate().await?;
    assert!(status.success(), "{status}\n{}", gw.log());
    drop((nats, fleet));
    Ok(())
}
