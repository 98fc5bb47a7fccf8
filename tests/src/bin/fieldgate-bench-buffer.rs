//! The buffer benchmark: three ways of storing readings in JetStream with
//! `sync_interval: always` (an fsync per write), measured in one run against one nats-server.
//!
//!     cargo build --release -p fieldgate-tests --bin fieldgate-bench-buffer
//!     FIELDGATE_NATS_SERVER=.venv/bin/nats-server target/release/fieldgate-bench-buffer
//!
//! Several producers (as the device adapters are) hand encoded protobuf `Reading`s to one lane
//! (as the gateway's buffer writer has one per uplink), which stores them as:
//!
//! - `entries`: group commit as the gateway did before: one JetStream message carries up to 256
//!   readings (a `BufferEntry`), one entry awaiting its PubAck at a time;
//! - `pipelined`: one message per reading, up to `--window` PubAcks outstanding;
//! - `atomic-batch`: one message per reading, the readings waiting meanwhile committed together
//!   as a JetStream atomic batch (ADR-50 headers `Nats-Batch-Id`, `Nats-Batch-Sequence`,
//!   `Nats-Batch-Commit`), one batch awaiting its commit ack at a time.
//!
//! Each is run with a 1-point and a 21-point reading. It prints readings/s, nats-server's
//! CPU-seconds per 10^6 readings and its resident memory, then the cost of the uplink side's
//! acks (one ack per reading against `AckPolicy::All` over the confirmed prefix), and what the
//! server says to a batch over its size limit and to `Nats-Msg-Id` inside a batch.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use anyhow::{Context, Result, anyhow, bail};
use async_nats::jetstream::consumer::{AckPolicy, pull};
use async_nats::jetstream::message::PublishMessage;
use async_nats::jetstream::stream::{Config, RetentionPolicy, StorageType};
use async_nats::jetstream::{self, AckKind};
use async_nats::{HeaderMap, HeaderValue};
use bytes::Bytes;
use clap::Parser;
use fieldgate_proto::v1::{Point, Reading, point::Value};
use fieldgate_tests::bench_nats::BenchNats;
use fieldgate_tests::procstat::{machine, proc_stats};
use futures::StreamExt;
use futures::stream::FuturesOrdered;
use prost::Message as _;
use tokio::sync::mpsc;
use tokio::time::Instant;

#[derive(Parser, Debug, Clone)]
#[command(about = "Fieldgate buffer benchmark: entries vs one message per reading")]
struct Args {
    /// Concurrent producers (device adapters) feeding the one lane.
    #[arg(long, default_value_t = 8)]
    producers: usize,
    /// Measurement window of each variant, seconds.
    #[arg(long, default_value_t = 6)]
    seconds: u64,
    /// PubAcks outstanding in the pipelined variant.
    #[arg(long, default_value_t = 256)]
    window: usize,
    /// Most readings in one entry or one atomic batch.
    #[arg(long, default_value_t = 256)]
    batch: usize,
    /// Points per reading, one figure each.
    #[arg(long, value_delimiter = ',', default_value = "1,21")]
    points: Vec<usize>,
    /// Readings stored then consumed for the ack-cost comparison.
    #[arg(long, default_value_t = 50_000)]
    ack_readings: u64,
}

/// How readings are stored.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Variant {
    Entries,
    Pipelined,
    AtomicBatch,
}

impl Variant {
    fn name(self) -> &'static str {
        match self {
            Variant::Entries => "entries (<=256 readings/msg, 1 in flight)",
            Variant::Pipelined => "pipelined (1 reading/msg, Nats-Msg-Id each)",
            Variant::AtomicBatch => "atomic batch (1 reading/msg, 1 batch in flight)",
        }
    }
}

/// A reading as the buffer writer gets it: encoded, with its id.
struct Queued {
    id: String,
    payload: Bytes,
}

fn reading(device: usize, n: u64, points: usize) -> Reading {
    let slot = 1_700_000_000_000 + n * 100;
    Reading {
        id: format!("default/bench-{device:04}/{slot}"),
        namespace: "default".into(),
        device: format!("bench-{device:04}"),
        node: "edge-1".into(),
        time_unix_nano: slot * 1_000_000 + 123_456,
        buffer_seq: 0,
        points: (0..points)
            .map(|i| Point {
                name: if points == 1 { "temperature".into() } else { format!("reg{i}") },
                value: Some(if i % 3 == 0 {
                    Value::DoubleValue(21.5 + i as f64 * 0.125 + n as f64 * 0.01)
                } else {
                    Value::UintValue(n.wrapping_mul(7).wrapping_add(i as u64) % 65_536)
                }),
                unit: if i % 3 == 0 { "Cel".into() } else { String::new() },
            })
            .collect(),
    }
}

/// Producers: each encodes readings and hands them to the lane until `stop`.
fn spawn_producers(args: &Args, points: usize, tx: mpsc::Sender<Queued>, stop: Arc<AtomicBool>) {
    for p in 0..args.producers {
        let tx = tx.clone();
        let stop = Arc::clone(&stop);
        tokio::spawn(async move {
            let mut n = 0u64;
            while !stop.load(Ordering::Relaxed) {
                let r = reading(p, n, points);
                n += 1;
                let q = Queued { id: r.id.clone(), payload: Bytes::from(r.encode_to_vec()) };
                if tx.send(q).await.is_err() {
                    return;
                }
            }
        });
    }
}

/// The entry payload of the earlier format (`BufferEntry`: repeated readings as field 1).
fn encode_entry(batch: &[Queued]) -> Bytes {
    use prost::encoding::{WireType, encode_key, encode_varint};
    let mut out = Vec::with_capacity(batch.iter().map(|q| q.payload.len() + 4).sum());
    for q in batch {
        encode_key(1, WireType::LengthDelimited, &mut out);
        encode_varint(q.payload.len() as u64, &mut out);
        out.extend_from_slice(&q.payload);
    }
    Bytes::from(out)
}

/// Takes the first waiting reading (waiting for it) and up to `max - 1` more already queued.
async fn take_batch(rx: &mut mpsc::Receiver<Queued>, max: usize) -> Option<Vec<Queued>> {
    let first = rx.recv().await?;
    let mut batch = vec![first];
    while batch.len() < max {
        match rx.try_recv() {
            Ok(q) => batch.push(q),
            Err(_) => break,
        }
    }
    Some(batch)
}

/// What the server answers to a JetStream publish request (PubAck or error).
#[derive(serde::Deserialize, Debug)]
struct PubAckReply {
    #[serde(default)]
    seq: u64,
    #[serde(default)]
    count: u64,
    #[serde(default)]
    error: Option<serde_json::Value>,
}

/// Publishes `batch` as one atomic batch and waits for the commit's PubAck.
async fn publish_atomic(
    client: &async_nats::Client,
    subject: &str,
    batch_id: &str,
    batch: &[Queued],
    expected_last: Option<u64>,
    msg_ids: bool,
) -> Result<PubAckReply> {
    let n = batch.len();
    for (i, q) in batch.iter().enumerate() {
        let mut h = HeaderMap::new();
        h.insert("Nats-Batch-Id", batch_id);
        h.insert("Nats-Batch-Sequence", HeaderValue::from(i + 1));
        if i == 0
            && let Some(last) = expected_last
        {
            h.insert("Nats-Expected-Last-Sequence", HeaderValue::from(last));
        }
        if msg_ids {
            h.insert("Nats-Msg-Id", q.id.as_str());
        }
        if i + 1 < n {
            client.publish_with_headers(subject.to_string(), h, q.payload.clone()).await?;
        } else {
            h.insert("Nats-Batch-Commit", "1");
            let reply = client.request_with_headers(subject.to_string(), h, q.payload.clone()).await?;
            return Ok(serde_json::from_slice(&reply.payload)?);
        }
    }
    bail!("empty batch")
}

/// Readings acknowledged by JetStream, counted by the lane.
#[derive(Default)]
struct Counts {
    readings: AtomicU64,
    messages: AtomicU64,
    errors: AtomicU64,
}

/// Stores readings from `rx` one way until the channel closes.
async fn run_lane(
    js: jetstream::Context,
    client: async_nats::Client,
    variant: Variant,
    args: Args,
    subject: String,
    mut rx: mpsc::Receiver<Queued>,
    counts: Arc<Counts>,
) -> Result<()> {
    match variant {
        Variant::Entries => {
            let mut seq = 1u64;
            while let Some(batch) = take_batch(&mut rx, args.batch).await {
                let n = batch.len() as u64;
                let mut h = HeaderMap::new();
                let id = if n == 1 { batch[0].id.clone() } else { format!("{}+{n}", batch[0].id) };
                h.insert("Nats-Msg-Id", id.as_str());
                h.insert("Fieldgate-Seq", HeaderValue::from(seq));
                h.insert("Fieldgate-Readings", HeaderValue::from(n));
                let msg = PublishMessage::build().headers(h).payload(encode_entry(&batch));
                match js.send_publish(subject.clone(), msg).await?.await {
                    Ok(_) => {
                        seq += n;
                        counts.readings.fetch_add(n, Ordering::Relaxed);
                        counts.messages.fetch_add(1, Ordering::Relaxed);
                    }
                    Err(_) => {
                        counts.errors.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
        }
        Variant::Pipelined => {
            let mut outstanding = FuturesOrdered::new();
            let mut open = true;
            while open || !outstanding.is_empty() {
                tokio::select! {
                    q = rx.recv(), if open && outstanding.len() < args.window => match q {
                        Some(q) => {
                            let mut h = HeaderMap::new();
                            h.insert("Nats-Msg-Id", q.id.as_str());
                            let msg = PublishMessage::build().headers(h).payload(q.payload);
                            outstanding.push_back(js.send_publish(subject.clone(), msg).await?.into_future());
                        }
                        None => open = false,
                    },
                    Some(ack) = outstanding.next(), if !outstanding.is_empty() => match ack {
                        Ok(_) => {
                            counts.readings.fetch_add(1, Ordering::Relaxed);
                            counts.messages.fetch_add(1, Ordering::Relaxed);
                        }
                        Err(_) => {
                            counts.errors.fetch_add(1, Ordering::Relaxed);
                        }
                    },
                }
            }
        }
        Variant::AtomicBatch => {
            let mut last = 0u64;
            let mut batches = 0u64;
            while let Some(batch) = take_batch(&mut rx, args.batch).await {
                batches += 1;
                let id = format!("b{batches}");
                let reply = publish_atomic(&client, &subject, &id, &batch, Some(last), false).await?;
                match reply.error {
                    None => {
                        last = reply.seq;
                        counts.readings.fetch_add(reply.count, Ordering::Relaxed);
                        counts.messages.fetch_add(reply.count, Ordering::Relaxed);
                    }
                    Some(e) => {
                        counts.errors.fetch_add(1, Ordering::Relaxed);
                        if counts.errors.load(Ordering::Relaxed) == 1 {
                            eprintln!("atomic batch refused: {e}");
                        }
                    }
                }
            }
        }
    }
    Ok(())
}

fn stream_config(name: &str, atomic: bool) -> Config {
    Config {
        name: name.to_string(),
        subjects: vec![format!("bench.{name}")],
        retention: RetentionPolicy::Interest,
        storage: StorageType::File,
        duplicate_window: Duration::from_secs(120),
        allow_atomic_publish: atomic,
        ..Default::default()
    }
}

/// One measured run of one variant: readings/s, messages, nats-server CPU and RSS.
struct Figure {
    readings_per_s: f64,
    readings: u64,
    messages: u64,
    errors: u64,
    server_cpu_s: f64,
    server_rss_mib: f64,
}

async fn measure(nats: &BenchNats, args: &Args, variant: Variant, points: usize) -> Result<Figure> {
    let client = async_nats::connect(nats.url()).await?;
    let js = jetstream::new(client.clone());
    let name = format!("{variant:?}_{points}").to_lowercase();
    js.create_stream(stream_config(&name, variant == Variant::AtomicBatch))
        .await
        .map_err(|e| anyhow!("creating stream {name}: {e}"))?;
    // The lane's queue is as deep as the gateway's (1024): producers wait when it is full.
    let (tx, rx) = mpsc::channel(1024);
    let stop = Arc::new(AtomicBool::new(false));
    let counts = Arc::new(Counts::default());
    let lane = tokio::spawn(run_lane(
        js.clone(),
        client.clone(),
        variant,
        args.clone(),
        format!("bench.{name}"),
        rx,
        Arc::clone(&counts),
    ));
    spawn_producers(args, points, tx, Arc::clone(&stop));
    // One second of warm-up, then the window.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let before = proc_stats(nats.pid())?;
    let r0 = counts.readings.load(Ordering::Relaxed);
    let m0 = counts.messages.load(Ordering::Relaxed);
    let t0 = Instant::now();
    tokio::time::sleep(Duration::from_secs(args.seconds)).await;
    let elapsed = t0.elapsed().as_secs_f64();
    let r1 = counts.readings.load(Ordering::Relaxed);
    let m1 = counts.messages.load(Ordering::Relaxed);
    let after = proc_stats(nats.pid())?;
    stop.store(true, Ordering::Relaxed);
    lane.await??;
    let readings = r1 - r0;
    let figure = Figure {
        readings_per_s: readings as f64 / elapsed,
        readings,
        messages: m1 - m0,
        errors: counts.errors.load(Ordering::Relaxed),
        server_cpu_s: after.cpu_s - before.cpu_s,
        server_rss_mib: after.rss_kib as f64 / 1024.0,
    };
    js.delete_stream(&name).await.map_err(|e| anyhow!("deleting stream {name}: {e}"))?;
    Ok(figure)
}

/// How the uplink side releases what the cloud confirmed.
#[derive(Clone, Copy, Debug)]
enum Release {
    /// Interest retention: each ack removes its message (a write per message).
    Interest(AckPolicy),
    /// Limits retention, one ack per reading, and one purge below the acknowledged prefix per
    /// `window / 2` readings (the store drops whole blocks; no write per message).
    LimitsPurge,
}

/// Stores `n` readings (atomic batches), then consumes and acks them: one ack per reading
/// (`AckPolicy::Explicit`) or one ack per pulled batch (`AckPolicy::All`) on an interest
/// stream, or acks plus a periodic purge on a limits stream. Returns nats-server's
/// CPU-seconds during the consumption and the readings consumed per second.
async fn ack_cost(nats: &BenchNats, args: &Args, release: Release) -> Result<(f64, f64)> {
    let client = async_nats::connect(nats.url()).await?;
    let js = jetstream::new(client.clone());
    let (policy, name) = match release {
        Release::Interest(p) => (p, format!("acks_{p:?}").to_lowercase()),
        Release::LimitsPurge => (AckPolicy::Explicit, "acks_limits_purge".to_string()),
    };
    let subject = format!("bench.{name}");
    let mut config = stream_config(&name, true);
    if let Release::LimitsPurge = release {
        config.retention = RetentionPolicy::Limits;
    }
    let mut stream = js.create_stream(config).await.map_err(|e| anyhow!("{e}"))?;
    // Interest retention keeps messages only for a consumer: create it first.
    let consumer = stream
        .create_consumer(pull::Config {
            durable_name: Some("uplink".into()),
            ack_policy: policy,
            max_ack_pending: 10_000,
            ..Default::default()
        })
        .await
        .map_err(|e| anyhow!("{e}"))?;
    let mut stored = 0u64;
    let mut last = 0u64;
    let mut b = 0u64;
    while stored < args.ack_readings {
        let batch: Vec<Queued> = (0..args.batch as u64)
            .map(|i| {
                let r = reading(0, stored + i, 21);
                Queued { id: r.id.clone(), payload: Bytes::from(r.encode_to_vec()) }
            })
            .collect();
        b += 1;
        let reply = publish_atomic(&client, &subject, &format!("a{b}"), &batch, Some(last), false).await?;
        if let Some(e) = reply.error {
            bail!("storing for the ack bench: {e}");
        }
        last = reply.seq;
        stored += reply.count;
    }
    let before = proc_stats(nats.pid())?;
    let t0 = Instant::now();
    let mut messages = consumer.stream().max_messages_per_batch(args.window).messages().await?;
    let mut consumed = 0u64;
    let mut since_ack = 0usize;
    while consumed < stored {
        let msg = tokio::time::timeout(Duration::from_secs(30), messages.next())
            .await
            .context("consumer stalled")?
            .context("consumer ended")?
            .map_err(|e| anyhow!("{e}"))?;
        consumed += 1;
        since_ack += 1;
        match policy {
            AckPolicy::All => {
                if since_ack >= args.window / 2 || consumed == stored {
                    msg.ack_with(AckKind::Ack).await.map_err(|e| anyhow!("{e}"))?;
                    since_ack = 0;
                }
            }
            _ => {
                msg.ack().await.map_err(|e| anyhow!("{e}"))?;
                if let Release::LimitsPurge = release
                    && (since_ack >= args.window / 2 || consumed == stored)
                {
                    let seq = msg.info().map_err(|e| anyhow!("{e}"))?.stream_sequence;
                    stream.purge().sequence(seq + 1).await.map_err(|e| anyhow!("{e}"))?;
                    since_ack = 0;
                }
            }
        }
    }
    // Wait until the server processed the acks (interest retention removes the messages).
    let deadline = Instant::now() + Duration::from_secs(60);
    while stream.info().await.map_err(|e| anyhow!("{e}"))?.state.messages > 0 {
        if Instant::now() > deadline {
            bail!("acks not processed within 60 s");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let elapsed = t0.elapsed().as_secs_f64();
    let after = proc_stats(nats.pid())?;
    drop(messages);
    js.delete_stream(&name).await.map_err(|e| anyhow!("{e}"))?;
    Ok((after.cpu_s - before.cpu_s, consumed as f64 / elapsed))
}

/// What the server answers to a batch past its size limit, and to `Nats-Msg-Id` in a batch.
async fn probe_limits(nats: &BenchNats) -> Result<()> {
    let client = async_nats::connect(nats.url()).await?;
    let js = jetstream::new(client.clone());
    js.create_stream(stream_config("limits", true)).await.map_err(|e| anyhow!("{e}"))?;
    let one = |i: u64| {
        let r = reading(0, i, 1);
        Queued { id: r.id.clone(), payload: Bytes::from(r.encode_to_vec()) }
    };
    for size in [1000u64, 1001] {
        let batch: Vec<Queued> = (0..size).map(one).collect();
        let reply = publish_atomic(&client, "bench.limits", &format!("size{size}"), &batch, None, false).await?;
        match reply.error {
            None => println!("  batch of {size} messages: stored ({} in the ack)", reply.count),
            Some(e) => println!("  batch of {size} messages: refused: {e}"),
        }
    }
    let batch: Vec<Queued> = (5000..5003).map(one).collect();
    let reply = publish_atomic(&client, "bench.limits", "ids", &batch, None, true).await?;
    match reply.error {
        None => println!("  batch with a Nats-Msg-Id per message: stored ({} messages)", reply.count),
        Some(e) => println!("  batch with a Nats-Msg-Id per message: refused: {e}"),
    }
    let reply = publish_atomic(&client, "bench.limits", "ids-again", &batch, None, true).await?;
    match reply.error {
        None => println!("  the same batch again (same ids): stored ({} messages)", reply.count),
        Some(e) => println!("  the same batch again (same ids): refused: {e}"),
    }
    let last = js.get_stream("limits").await.map_err(|e| anyhow!("{e}"))?.cached_info().state.last_sequence;
    let reply = publish_atomic(&client, "bench.limits", "stale", &batch[..1], Some(last - 1), false).await?;
    match reply.error {
        None => println!("  a batch expecting a stale last sequence: stored"),
        Some(e) => println!("  a batch expecting a stale last sequence: refused: {e}"),
    }
    js.delete_stream("limits").await.map_err(|e| anyhow!("{e}"))?;
    Ok(())
}

/// nats-server's memory for the ids of the duplicate window: RSS before and after publishing
/// `n` readings with a `Nats-Msg-Id` each into a fresh stream (2-minute window).
async fn dedup_memory(nats: &BenchNats, n: u64) -> Result<(f64, f64)> {
    let client = async_nats::connect(nats.url()).await?;
    let js = jetstream::new(client.clone());
    // Memory storage, so that the figure is the id map's and not the file store's caches.
    let mut cfg = stream_config("dedup", false);
    cfg.storage = StorageType::Memory;
    cfg.retention = RetentionPolicy::Limits;
    cfg.max_messages = 1;
    js.create_stream(cfg).await.map_err(|e| anyhow!("{e}"))?;
    let before = proc_stats(nats.pid())?.rss_kib;
    let mut outstanding = FuturesOrdered::new();
    for i in 0..n {
        let r = reading(i as usize % 64, i, 1);
        let mut h = HeaderMap::new();
        h.insert("Nats-Msg-Id", r.id.as_str());
        let msg = PublishMessage::build().headers(h).payload(Bytes::from_static(b"x"));
        outstanding.push_back(js.send_publish("bench.dedup", msg).await?.into_future());
        if outstanding.len() >= 1024 {
            outstanding.next().await.transpose().map_err(|e| anyhow!("{e}"))?;
        }
    }
    while let Some(a) = outstanding.next().await {
        a.map_err(|e| anyhow!("{e}"))?;
    }
    let after = proc_stats(nats.pid())?.rss_kib;
    js.delete_stream("dedup").await.map_err(|e| anyhow!("{e}"))?;
    Ok((before as f64 / 1024.0, after as f64 / 1024.0))
}

#[tokio::main]
async fn main() -> Result<()> {
    let args = Args::parse();
    println!("machine: {}", machine());
    let nats = BenchNats::start(Some("always")).await?;
    println!(
        "nats-server (JetStream, file storage, sync_interval: always); {} producers, {} s per variant",
        args.producers, args.seconds
    );
    for &points in &args.points {
        let size = reading(0, 0, points).encoded_len();
        println!("\nreadings of {points} point(s) ({size} bytes as protobuf):");
        let mut reference = None;
        for variant in [Variant::Entries, Variant::Pipelined, Variant::AtomicBatch] {
            let f = measure(&nats, &args, variant, points).await?;
            let ratio = match reference {
                None => {
                    reference = Some(f.readings_per_s);
                    String::from("reference")
                }
                Some(r) => format!("{:.0} % of entries", 100.0 * f.readings_per_s / r),
            };
            println!(
                "  {:<48} {:>9.0} readings/s ({ratio}); {:.1} readings/msg; nats-server {:.2} CPU-s per 10^6 readings, RSS {:.1} MiB{}",
                variant.name(),
                f.readings_per_s,
                f.readings as f64 / f.messages.max(1) as f64,
                f.server_cpu_s * 1e6 / f.readings.max(1) as f64,
                f.server_rss_mib,
                if f.errors > 0 { format!(", {} refused", f.errors) } else { String::new() },
            );
        }
    }
    println!("\nuplink acks ({} readings of 21 points, consumed and acked):", args.ack_readings);
    for release in [Release::Interest(AckPolicy::Explicit), Release::Interest(AckPolicy::All), Release::LimitsPurge] {
        let (cpu, rate) = ack_cost(&nats, &args, release).await?;
        let how = match release {
            Release::Interest(AckPolicy::All) => format!("AckPolicy::All, one ack per {} readings", args.window / 2),
            Release::Interest(_) => String::from("AckPolicy::Explicit, one ack per reading"),
            Release::LimitsPurge => format!("limits stream, one ack per reading, purge per {}", args.window / 2),
        };
        println!(
            "  {how:<48} {rate:>9.0} readings/s; nats-server {:.2} CPU-s per 10^6 readings",
            cpu * 1e6 / args.ack_readings as f64
        );
    }
    println!("\nduplicate window (Nats-Msg-Id per reading, 2 min):");
    let n = 200_000;
    let (before, after) = dedup_memory(&nats, n).await?;
    println!(
        "  {n} ids held: nats-server RSS {before:.1} -> {after:.1} MiB ({:.0} bytes per id)",
        (after - before) * 1024.0 * 1024.0 / n as f64
    );
    println!("\nserver limits (atomic batch):");
    probe_limits(&nats).await?;
    println!("\nmachine after the run: {}", machine());
    Ok(())
}
