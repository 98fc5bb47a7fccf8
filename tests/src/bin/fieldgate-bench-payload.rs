//! Bytes per point to the cloud for every uplink encoding, with and without compression, on the
//! same workload: 10 devices x 100 holding registers (16-bit) every second, by default.
//!
//!     cargo build --workspace --bins && target/debug/fieldgate-bench-payload
//!
//! Two measurements in one run:
//!
//! 1. **Real gateway output**: simulated Modbus devices -> `fieldgate-gateway` with one uplink per
//!    encoding and compression, all reading the same devices -> `nats-server` -> `mosquitto` ->
//!    a subscriber that counts the payload bytes of each uplink and decodes every message (like
//!    a consumer) to count the points it carried. The simulator's registers are counters
//!    (`(c + i) as u16`, `c` = seconds since start + 1000 x device index: values 0 to ~9,200).
//! 2. **Full-range values**: the gateway's own encoders on the same shape of readings, values
//!    drawn uniformly from 0-65535 (the worst case for varints and digits), no network.
//!
//! Payload bytes only; the MQTT framing (fixed header, topic, packet id) and, on MQTT 5, the
//! properties that tell a message's content type and compression come on top and are printed
//! per point beside them. Births and point tables, sent once per
//! session and device (and tables every 10 minutes), are printed apart.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, Result};
use clap::Parser;
use fieldgate_crds::{Compression, Encoding, GatewayUplink, OnFull};
use fieldgate_gateway::encoding::{CONTENT_ENCODING, Encoder, Publication};
use fieldgate_gateway::reading::{Point, Reading, Value, message_id};
use fieldgate_proto::v1::CompactReading;
use fieldgate_tests::config::{ConfigBuilder, NAMESPACE, mqtt_of, mqtt_uplink, set_buffer};
use fieldgate_tests::decode::{CloudDecoder, Decoded};
use fieldgate_tests::procstat::machine;
use fieldgate_tests::{Gateway, Mosquitto, NatsServer, SimFleet, wait_until};
use prost::Message as _;
use rand::Rng;
use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};
use tokio::time::Instant;

#[derive(Parser, Debug)]
#[command(about = "Bytes per point to the cloud, per uplink encoding and compression")]
struct Args {
    /// Simulated devices.
    #[arg(long, default_value_t = 10)]
    devices: u16,
    /// 16-bit holding registers per device (the points of each reading).
    #[arg(long, default_value_t = 100)]
    registers: u16,
    /// Poll interval.
    #[arg(long, default_value = "1s")]
    poll_interval: String,
    /// Measurement window, seconds (after every uplink delivered its first readings).
    #[arg(long, default_value_t = 20)]
    seconds: u64,
    /// Readings per device encoded in the full-range measurement.
    #[arg(long, default_value_t = 200)]
    synthetic_readings: u32,
}

/// The target of issue 14 for the compact forms.
const TARGET: f64 = 4.0;

/// Every (encoding, compression) measured, in table order.
fn combos() -> Vec<(Encoding, Compression)> {
    let mut v = Vec::new();
    for e in [Encoding::Json, Encoding::JsonCompact, Encoding::Protobuf, Encoding::ProtobufCompact] {
        for c in [Compression::None, Compression::Gzip, Compression::Zstd] {
            v.push((e, c));
        }
    }
    v.push((Encoding::SparkplugB, Compression::None));
    v
}

fn name(e: Encoding, c: Compression) -> String {
    format!("{}-{}", e.as_str().to_lowercase(), c.as_str())
}

fn is_compact(e: Encoding) -> bool {
    matches!(e, Encoding::JsonCompact | Encoding::ProtobufCompact)
}

/// MQTT 3.1.1 PUBLISH framing of a QoS 1 message: fixed header, topic, packet id.
fn framing(topic: &str, payload: usize) -> usize {
    let remaining = 2 + topic.len() + 2 + payload;
    let len_bytes = match remaining {
        0..=127 => 1,
        128..=16_383 => 2,
        16_384..=2_097_151 => 3,
        _ => 4,
    };
    1 + len_bytes + 2 + topic.len() + 2
}

/// MQTT 5 PUBLISH properties of a message: their length, its content type, its
/// `content-encoding` user property.
fn v5_properties(p: &Publication) -> usize {
    1 + p.content_type.map_or(0, |t| 1 + 2 + t.len())
        + p.content_encoding.map_or(0, |e| 1 + 2 + CONTENT_ENCODING.len() + 2 + e.len())
}

#[derive(Debug, Default, Clone)]
struct Tally {
    /// Payload bytes of readings.
    reading_bytes: u64,
    /// MQTT framing bytes of readings.
    framing_bytes: u64,
    /// Points the readings carried.
    points: u64,
    readings: u64,
    /// Payload bytes of births (Sparkplug NBIRTH/DBIRTH/DDEATH).
    birth_bytes: u64,
    /// Payload bytes of compact readings that carried their device's point table, and their
    /// number (to tell the table's cost from a reading's).
    table_bytes: u64,
    tables: u64,
}

#[derive(Default)]
struct Counts {
    by_uplink: BTreeMap<String, Tally>,
    recording: bool,
}

/// The uplink of a topic: `bench/{uplink}/{device}` or Sparkplug's.
fn uplink_of(topic: &str) -> String {
    match topic.strip_prefix("bench/") {
        Some(rest) => rest.split('/').next().unwrap_or_default().to_string(),
        None => name(Encoding::SparkplugB, Compression::None),
    }
}

/// Subscribes to everything and tallies each uplink's messages.
async fn count_at(port: u16, counts: Arc<Mutex<Counts>>) -> Result<tokio::task::JoinHandle<()>> {
    let mut o = MqttOptions::new("bench-payload-counter", "127.0.0.1", port);
    o.set_keep_alive(Duration::from_secs(30)).set_max_packet_size(16 << 20, 16 << 20);
    let (client, mut el) = AsyncClient::new(o, 1024);
    client.subscribe("#", QoS::AtLeastOnce).await?;
    let (ready_tx, ready_rx) = tokio::sync::oneshot::channel();
    let task = tokio::spawn(async move {
        let _client = client;
        let mut ready = Some(ready_tx);
        let mut decoder = CloudDecoder::default();
        loop {
            match el.poll().await {
                Ok(Event::Incoming(Packet::SubAck(_))) => {
                    if let Some(tx) = ready.take() {
                        let _ = tx.send(());
                    }
                }
                Ok(Event::Incoming(Packet::Publish(p))) => {
                    let decoded = decoder.decode(&p.topic, &p.payload);
                    let mut c = counts.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
                    if !c.recording {
                        continue;
                    }
                    let t = c.by_uplink.entry(uplink_of(&p.topic)).or_default();
                    let bytes = p.payload.len() as u64;
                    match decoded {
                        Ok(Decoded::Reading(j)) => {
                            t.reading_bytes += bytes;
                            t.framing_bytes += framing(&p.topic, p.payload.len()) as u64;
                            t.points += j["points"].as_array().map_or(0, Vec::len) as u64;
                            t.readings += 1;
                            let raw = fieldgate_gateway::encoding::compress::decompress(&p.payload, 16 << 20)
                                .unwrap_or_default();
                            if p.topic.starts_with("bench/protobufcompact")
                                && CompactReading::decode(raw.as_slice()).is_ok_and(|r| r.table.is_some())
                            {
                                t.table_bytes += bytes;
                                t.tables += 1;
                            }
                        }
                        Ok(Decoded::Control(kind)) if kind != "NDEATH" => t.birth_bytes += bytes,
                        _ => {}
                    }
                }
                Ok(_) => {}
                Err(_) => tokio::time::sleep(Duration::from_millis(200)).await,
            }
        }
    });
    tokio::time::timeout(Duration::from_secs(30), ready_rx).await.context("subscribing")??;
    Ok(task)
}

/// What the gateway's own encoder of one combination made of full-range readings.
#[derive(Clone, Copy, Debug, Default)]
struct Synthetic {
    /// Payload bytes per point, steady state.
    per_point: f64,
    /// MQTT 5 property bytes per point.
    v5_per_point: f64,
    /// Gateway CPU time to encode (and compress) one reading, microseconds.
    encode_us: f64,
}

/// Encodes `n` readings per device with full-range random values through the gateway's own
/// encoder of each combination: payload bytes per point, steady state (births and the first
/// table left out).
fn full_range(args: &Args) -> BTreeMap<String, Synthetic> {
    let mut rng = rand::rng();
    let mut out = BTreeMap::new();
    let readings: Vec<Vec<Reading>> = (0..args.synthetic_readings)
        .map(|k| {
            (0..args.devices)
                .map(|d| {
                    let device = format!("sim-{d:04}");
                    Reading {
                        id: message_id(NAMESPACE, &device, 1_700_000_000_000 + u64::from(k) * 1000),
                        namespace: NAMESPACE.into(),
                        device,
                        node: "bench-node".into(),
                        time_unix_nano: 1_700_000_000_000_000_000 + u64::from(k) * 1_000_000_000,
                        buffer_seq: 0,
                        points: (0..args.registers)
                            .map(|i| Point {
                                name: format!("r{i}"),
                                value: Some(Value::UintValue(u64::from(rng.random::<u16>()))),
                                unit: String::new(),
                            })
                            .collect(),
                    }
                })
                .collect()
        })
        .collect();
    for (e, c) in combos() {
        let mut u: GatewayUplink = mqtt_uplink("bench", "mqtt://127.0.0.1:1883");
        u.encoding = Some(e);
        u.compression = Some(c);
        let mut enc = Encoder::new(&u, "bench-node");
        let _ = enc.session();
        let (mut bytes, mut props, mut points, mut seq) = (0u64, 0u64, 0u64, 0u64);
        let mut spent = Duration::ZERO;
        for (k, round) in readings.iter().enumerate() {
            for r in round {
                seq += 1;
                let stored = r.encode_to_vec();
                let (owned, topic) = (r.clone(), "bench/t/d".to_string());
                let t0 = std::time::Instant::now();
                let encoded = enc.encode(owned, &stored, seq, topic);
                spent += t0.elapsed();
                let Ok(out) = encoded else { continue };
                // The first round carries tables and births: left out.
                if k > 0 {
                    bytes += out.message.payload.len() as u64;
                    props += v5_properties(&out.message) as u64;
                    points += r.points.len() as u64;
                }
            }
        }
        let encode_us =
            spent.as_secs_f64() * 1e6 / f64::from(args.synthetic_readings * u32::from(args.devices)).max(1.0);
        let points = points.max(1) as f64;
        out.insert(
            name(e, c),
            Synthetic { per_point: bytes as f64 / points, v5_per_point: props as f64 / points, encode_us },
        );
    }
    out
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> Result<()> {
    let args = Args::parse();
    eprintln!("machine: {}", machine());
    eprintln!(
        "workload: {} devices x {} 16-bit holding registers every {}, {} s measured after every uplink delivered",
        args.devices, args.registers, args.poll_interval, args.seconds
    );
    let nats = NatsServer::start().await?;
    let broker = Mosquitto::start().await?;
    let fleet =
        SimFleet::start_with(&vec![fieldgate_sim::Fault::None; usize::from(args.devices)], args.registers).await?;
    let mut devices = fleet.gateway_devices(&args.poll_interval);
    for d in &mut devices {
        d.points.retain(|p| p.name.starts_with("reg"));
        for p in &mut d.points {
            p.name = p.name.replacen("reg", "r", 1);
        }
    }
    let mut builder = ConfigBuilder::new().devices(devices);
    for (e, c) in combos() {
        let mut u = mqtt_uplink(&name(e, c), &broker.url());
        // 13 uplinks on one nats-server, which reserves each buffer's maxBytes on disk.
        set_buffer(&mut u, "32Mi", OnFull::DropOldest);
        u.encoding = Some(e);
        u.compression = Some(c);
        // MQTT 3.1.1: no properties, so the framing is the same for every encoding.
        mqtt_of(&mut u).protocol_version = Some(3);
        if e != Encoding::SparkplugB {
            mqtt_of(&mut u).topic = Some("bench/{uplink}/{device}".into());
        }
        builder = builder.uplink(u);
    }
    let counts = Arc::new(Mutex::new(Counts { recording: true, ..Default::default() }));
    let counter = count_at(broker.port(), Arc::clone(&counts)).await?;
    let mut gw = Gateway::new(&nats.url())?;
    gw.write_config(&builder.yaml()?)?;
    gw.start_ready().await?;

    // Warm-up: every uplink delivered readings of every device; births and tables go meanwhile.
    let want = combos().len();
    let per_uplink = u64::from(args.devices) * 2;
    wait_until("every uplink to deliver two readings per device", Duration::from_secs(120), || {
        let c = counts.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let done = c.by_uplink.len() == want && c.by_uplink.values().all(|t| t.readings >= per_uplink);
        async move { Ok(done.then_some(())) }
    })
    .await
    .with_context(|| gw.log())?;
    let warm = {
        let mut c = counts.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        std::mem::take(&mut c.by_uplink)
    };
    let started = Instant::now();
    let window = Duration::from_secs(args.seconds);
    while started.elapsed() < window {
        let left = window.saturating_sub(started.elapsed());
        eprint!("\rmeasuring: {:>3} s left ", left.as_secs());
        tokio::time::sleep(left.min(Duration::from_secs(1))).await;
    }
    eprintln!();
    let steady = {
        let mut c = counts.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        c.recording = false;
        std::mem::take(&mut c.by_uplink)
    };
    let status = gw.terminate().await?;
    counter.abort();
    drop((nats, broker, fleet));
    eprintln!("gateway stopped: {status}");
    eprintln!("full-range values: encoding {} readings per device ...", args.synthetic_readings);
    let synthetic = full_range(&args);

    println!();
    println!("Bytes per 16-bit point to the cloud (payload; target <= {TARGET} in the compact forms)");
    println!("machine: {}", machine());
    println!(
        "{:<24} {:>9} {:>9} {:>9} {:>11} {:>12} {:>11} {:>16} {:>8}",
        "encoding",
        "counters",
        "+framing",
        "+v5 props",
        "full-range",
        "once/device",
        "encode µs",
        "readings/points",
        "target"
    );
    for (e, c) in combos() {
        let n = name(e, c);
        let s = steady.get(&n).cloned().unwrap_or_default();
        let w = warm.get(&n).cloned().unwrap_or_default();
        let per_point = s.reading_bytes as f64 / s.points.max(1) as f64;
        let framing = s.framing_bytes as f64 / s.points.max(1) as f64;
        // Once per session and device: Sparkplug births; a compact reading's table (a message
        // with it, less a reading without).
        let once = match e {
            Encoding::SparkplugB => (w.birth_bytes + s.birth_bytes) / u64::from(args.devices.max(1)),
            Encoding::ProtobufCompact if w.tables > 0 => {
                let plain = s.reading_bytes / s.readings.max(1);
                (w.table_bytes / w.tables).saturating_sub(plain)
            }
            _ => 0,
        };
        let Synthetic { per_point: full, v5_per_point: v5, encode_us } = synthetic.get(&n).copied().unwrap_or_default();
        let verdict = if !is_compact(e) {
            "-"
        } else if per_point <= TARGET && full <= TARGET {
            "met"
        } else if per_point <= TARGET {
            "counters"
        } else {
            "missed"
        };
        println!(
            "{:<24} {:>9.2} {:>9.2} {:>9.2} {:>11.2} {:>12} {:>11.1} {:>16} {:>8}",
            format!(
                "{}{}",
                e.as_str(),
                if c == Compression::None { String::new() } else { format!(" + {}", c.as_str()) }
            ),
            per_point,
            framing,
            v5,
            full,
            once,
            encode_us,
            format!("{}/{}", s.readings, s.points),
            verdict
        );
    }
    println!();
    println!(
        "counters: real gateway output over {} s (values 0 to ~{}); +framing: MQTT 3.1.1 PUBLISH header, topic and packet id \
         per point on top; +v5 props: MQTT 5 content type and content-encoding per point on top; full-range: the gateway's \
         encoders on uniform 0-65535 values; once/device: bytes of births (Sparkplug) or of the point table \
         (protobufCompact) per device and session; encode µs: gateway CPU to encode (and compress) one reading of \
         full-range values ({}); target: met (both), counters (counters only), missed",
        args.seconds,
        1000 * u32::from(args.devices.saturating_sub(1)) + u32::from(args.registers) + 200,
        if cfg!(debug_assertions) { "debug build: not representative" } else { "release build" }
    );
    Ok(())
}
