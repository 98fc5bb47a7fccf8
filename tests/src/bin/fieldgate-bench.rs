//! The data-path benchmark: simulator(s) -> gateway -> nats-server -> mosquitto -> a counting
//! subscriber, everything on this machine, plus two ceiling probes measured in the same run
//! (mosquitto driven directly by a native publisher, JetStream driven directly).
//!
//!     cargo build --release --workspace --bins && target/release/fieldgate-bench
//!
//! Prints delivered points/s, gateway CPU-seconds per 10^6 delivered points, gateway RSS, and
//! the sample -> cloud latency p50/p99 at a moderate rate (10k points/s by default).

use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result};
use async_nats::jetstream;
use bytes::Bytes;
use clap::Parser;
use fieldgate_crds::OnFull;
use fieldgate_tests::config::{ConfigBuilder, set_buffer};
use fieldgate_tests::procstat::proc_stats;
use fieldgate_tests::sim_process::{SimProcess, free_consecutive_ports};
use fieldgate_tests::{Gateway, Mosquitto, NatsServer, free_port, wait_until};
use futures::StreamExt;
use futures::stream::FuturesUnordered;
use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};
use tokio::sync::Mutex;
use tokio::time::Instant;

#[derive(Parser, Debug, Clone)]
#[command(about = "Fieldgate data-path benchmark")]
struct Args {
    /// Simulated devices in the throughput run.
    #[arg(long, default_value_t = 80)]
    devices: u16,
    /// Extra uint16 registers per device (points per reading = 29 + this).
    #[arg(long, default_value_t = 100)]
    extra_registers: u16,
    /// Poll interval in the throughput run.
    #[arg(long, default_value = "100ms")]
    poll_interval: String,
    /// Devices in the latency run (same points per reading).
    #[arg(long, default_value_t = 8)]
    latency_devices: u16,
    /// Poll interval in the latency run (8 devices x 128 points x 10/s ~ 10k points/s).
    #[arg(long, default_value = "100ms")]
    latency_poll_interval: String,
    /// Measurement window of each run, seconds.
    #[arg(long, default_value_t = 20)]
    seconds: u64,
    /// Warm-up before each window, seconds.
    #[arg(long, default_value_t = 5)]
    warmup: u64,
    /// Messages sent by each ceiling probe.
    #[arg(long, default_value_t = 20_000)]
    probe_messages: u64,
    /// Encoding of the uplink.
    #[arg(long, default_value = "json")]
    encoding: String,
    /// Skip the ceiling probes.
    #[arg(long)]
    no_probes: bool,
}

const POINTS_FIXED: u64 = 28;

/// A QoS 1 subscriber that counts readings and, for sampled ones, the sample -> cloud latency.
struct Counter {
    count: Arc<AtomicU64>,
    latencies_us: Arc<Mutex<Vec<u64>>>,
    recording: Arc<std::sync::atomic::AtomicBool>,
    task: tokio::task::JoinHandle<()>,
}

fn now_unix_nanos() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_nanos() as u64).unwrap_or(0)
}

/// `"timeUnixNano":123` without parsing the whole JSON document.
fn time_unix_nano(payload: &[u8]) -> Option<u64> {
    let key = b"\"timeUnixNano\":";
    let at = payload.windows(key.len()).position(|w| w == key)? + key.len();
    let digits: Vec<u8> = payload[at..].iter().copied().take_while(u8::is_ascii_digit).collect();
    std::str::from_utf8(&digits).ok()?.parse().ok()
}

impl Counter {
    async fn start(port: u16, filter: &str) -> Result<Self> {
        let mut o = MqttOptions::new(format!("bench-counter-{port}"), "127.0.0.1", port);
        o.set_keep_alive(Duration::from_secs(30)).set_max_packet_size(1 << 20, 1 << 20);
        let (client, mut el) = AsyncClient::new(o, 1024);
        client.subscribe(filter, QoS::AtLeastOnce).await?;
        let count = Arc::new(AtomicU64::new(0));
        let latencies_us = Arc::new(Mutex::new(Vec::new()));
        let recording = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let (c, l, r) = (Arc::clone(&count), Arc::clone(&latencies_us), Arc::clone(&recording));
        let (ready_tx, ready_rx) = tokio::sync::oneshot::channel();
        let mut ready_tx = Some(ready_tx);
        let task = tokio::spawn(async move {
            let _client = client;
            loop {
                match el.poll().await {
                    Ok(Event::Incoming(Packet::SubAck(_))) => {
                        if let Some(tx) = ready_tx.take() {
                            let _ = tx.send(());
                        }
                    }
                    Ok(Event::Incoming(Packet::Publish(p))) => {
                        c.fetch_add(1, Ordering::Relaxed);
                        if r.load(Ordering::Relaxed)
                            && let Some(t) = time_unix_nano(&p.payload)
                        {
                            l.lock().await.push(now_unix_nanos().saturating_sub(t) / 1000);
                        }
                    }
                    Ok(_) => {}
                    Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
                }
            }
        });
        tokio::time::timeout(Duration::from_secs(10), ready_rx)
            .await
            .context("subscriber did not get its SUBACK")??;
        Ok(Self { count, latencies_us, recording, task })
    }
}

impl Drop for Counter {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn percentile(sorted: &[u64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let idx = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[idx.min(sorted.len() - 1)] as f64 / 1000.0
}

struct RunResult {
    points_per_s: f64,
    readings_per_s: f64,
    cpu_s_per_million: f64,
    rss_mib: f64,
    hwm_mib: f64,
    p50_ms: f64,
    p99_ms: f64,
    latency_samples: usize,
}

async fn run_path(args: &Args, devices: u16, poll: &str, record_latency: bool) -> Result<RunResult> {
    let nats = NatsServer::start().await?;
    let mosq = Mosquitto::start().await?;
    let base = free_consecutive_ports(devices)?;
    let sim = SimProcess::start(devices, base, args.extra_registers, &[])?;
    let gw = Gateway::new(&nats.url())?;
    let encoding = match args.encoding.as_str() {
        "protobuf" => fieldgate_crds::Encoding::Protobuf,
        _ => fieldgate_crds::Encoding::Json,
    };
    let poll: fieldgate_crds::HumanDuration = poll.parse()?;
    let devices_cfg = (0..devices).map(|i| {
        fieldgate_sim::gateway_device(
            "default",
            &format!("sim-{i:04}"),
            "127.0.0.1",
            base + i,
            &poll,
            args.extra_registers,
        )
    });
    let cfg = ConfigBuilder::new().devices(devices_cfg).cloud(&mosq.url(), |u| {
        u.encoding = Some(encoding);
        set_buffer(u, "1Gi", OnFull::DropOldest);
    });
    gw.write_config(&cfg.yaml()?)?;
    let counter = Counter::start(mosq.port(), "fieldgate/#").await?;
    let mut cmd = gw.command();
    cmd.env("RUST_LOG", "warn").stdout(Stdio::null()).stderr(Stdio::null());
    let mut child = cmd.spawn().context("starting the gateway")?;
    let pid = child.id();
    let started = counter.count.clone();
    wait_until("first reading at the cloud", Duration::from_secs(60), || {
        let n = started.load(Ordering::Relaxed);
        async move { Ok((n > 0).then_some(())) }
    })
    .await?;
    tokio::time::sleep(Duration::from_secs(args.warmup)).await;

    let c0 = counter.count.load(Ordering::Relaxed);
    let s0 = proc_stats(pid)?;
    let t0 = Instant::now();
    counter.recording.store(record_latency, Ordering::Relaxed);
    tokio::time::sleep(Duration::from_secs(args.seconds)).await;
    counter.recording.store(false, Ordering::Relaxed);
    let elapsed = t0.elapsed().as_secs_f64();
    let c1 = counter.count.load(Ordering::Relaxed);
    let s1 = proc_stats(pid)?;

    let _ = Command::new("kill").args(["-TERM", &pid.to_string()]).status();
    let _ = tokio::task::spawn_blocking(move || child.wait()).await;
    drop(sim);

    let readings = (c1 - c0) as f64;
    let points = readings * (POINTS_FIXED + u64::from(args.extra_registers)) as f64;
    let cpu_s = s1.cpu_s - s0.cpu_s;
    let mut lat = counter.latencies_us.lock().await.clone();
    lat.sort_unstable();
    Ok(RunResult {
        points_per_s: points / elapsed,
        readings_per_s: readings / elapsed,
        cpu_s_per_million: if points > 0.0 { cpu_s / points * 1e6 } else { f64::NAN },
        rss_mib: s1.rss_kib as f64 / 1024.0,
        hwm_mib: s1.hwm_kib as f64 / 1024.0,
        p50_ms: percentile(&lat, 0.50),
        p99_ms: percentile(&lat, 0.99),
        latency_samples: lat.len(),
    })
}

/// Ceiling: a native publisher drives mosquitto directly with QoS 1 (same window and payload
/// size as the gateway's uplink), while the same counting subscriber receives.
async fn mosquitto_ceiling(args: &Args, payload_len: usize) -> Result<f64> {
    let mosq = Mosquitto::start().await?;
    let counter = Counter::start(mosq.port(), "probe/#").await?;
    let mut o = rumqttc::v5::MqttOptions::new("bench-probe", "127.0.0.1", mosq.port());
    o.set_outgoing_inflight_upper_limit(1024).set_request_channel_capacity(2048);
    let (client, mut el) = rumqttc::v5::AsyncClient::new(o, 2048);
    let n = args.probe_messages;
    let payload = Bytes::from(vec![b'x'; payload_len]);
    let acked = Arc::new(AtomicU64::new(0));
    let a = Arc::clone(&acked);
    let poller = tokio::spawn(async move {
        use rumqttc::v5::Event as E5;
        use rumqttc::v5::mqttbytes::v5::Packet as P5;
        while let Ok(ev) = el.poll().await {
            if let E5::Incoming(P5::PubAck(_)) = ev
                && a.fetch_add(1, Ordering::Relaxed) + 1 >= n
            {
                break;
            }
        }
    });
    let t0 = Instant::now();
    for _ in 0..n {
        client.publish_bytes("probe/x", rumqttc::v5::mqttbytes::QoS::AtLeastOnce, false, payload.clone()).await?;
    }
    let _ = tokio::time::timeout(Duration::from_secs(120), poller).await;
    let c = counter.count.clone();
    wait_until("probe messages at the subscriber", Duration::from_secs(60), || {
        let got = c.load(Ordering::Relaxed);
        async move { Ok((got >= n).then_some(())) }
    })
    .await?;
    Ok(n as f64 / t0.elapsed().as_secs_f64())
}

/// Ceiling: JetStream driven directly: pipelined publishes with message ids into a file
/// stream configured like an uplink buffer.
async fn nats_ceiling(args: &Args, payload_len: usize) -> Result<f64> {
    let nats = NatsServer::start().await?;
    let client = async_nats::connect(nats.url()).await?;
    let js = jetstream::new(client);
    js.create_stream(jetstream::stream::Config {
        name: "probe".into(),
        subjects: vec!["probe".into()],
        storage: jetstream::stream::StorageType::File,
        duplicate_window: Duration::from_secs(120),
        ..Default::default()
    })
    .await?;
    let payload = Bytes::from(vec![b'x'; payload_len]);
    let t0 = Instant::now();
    let mut in_flight = FuturesUnordered::new();
    for i in 0..args.probe_messages {
        if in_flight.len() >= 1024
            && let Some(r) = in_flight.next().await
        {
            r?;
        }
        let msg = jetstream::message::PublishMessage::build().message_id(format!("probe/{i}")).payload(payload.clone());
        let ack = js.send_publish("probe", msg).await?;
        in_flight.push(ack.into_future());
    }
    while let Some(r) = in_flight.next().await {
        r?;
    }
    Ok(args.probe_messages as f64 / t0.elapsed().as_secs_f64())
}

#[tokio::main]
async fn main() -> Result<()> {
    let args = Args::parse();
    let ppr = POINTS_FIXED + u64::from(args.extra_registers);
    println!(
        "fieldgate-bench: {} devices x {} points every {} (throughput), {} devices every {} (latency); \
         windows {} s after {} s warm-up; encoding {}; {} CPUs",
        args.devices,
        ppr,
        args.poll_interval,
        args.latency_devices,
        args.latency_poll_interval,
        args.seconds,
        args.warmup,
        args.encoding,
        std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0),
    );
    let _ = free_port()?;

    let t = run_path(&args, args.devices, &args.poll_interval, false).await?;
    println!("throughput run:");
    println!("  delivered           {:>10.0} points/s ({:.0} readings/s)", t.points_per_s, t.readings_per_s);
    println!("  gateway CPU         {:>10.3} CPU-s per 10^6 points", t.cpu_s_per_million);
    println!("  gateway RSS         {:>10.1} MiB (peak {:.1} MiB)", t.rss_mib, t.hwm_mib);

    let l = run_path(&args, args.latency_devices, &args.latency_poll_interval, true).await?;
    println!("latency run ({:.0} points/s delivered):", l.points_per_s);
    println!("  sample -> cloud     p50 {:.2} ms, p99 {:.2} ms ({} samples)", l.p50_ms, l.p99_ms, l.latency_samples);
    println!("  gateway CPU         {:>10.3} CPU-s per 10^6 points", l.cpu_s_per_million);
    println!("  gateway RSS         {:>10.1} MiB (peak {:.1} MiB)", l.rss_mib, l.hwm_mib);

    if !args.no_probes {
        // A JSON reading of this many points is about 24 bytes per point.
        let payload_len = (ppr as usize) * 24 + 200;
        let m = mosquitto_ceiling(&args, payload_len).await?;
        let n = nats_ceiling(&args, payload_len).await?;
        println!("ceiling probes ({payload_len}-byte messages, {} each):", args.probe_messages);
        println!("  mosquitto direct    {:>10.0} msg/s QoS 1 = {:.0} points/s", m, m * ppr as f64);
        println!("  JetStream direct    {:>10.0} msg/s acked = {:.0} points/s", n, n * ppr as f64);
        println!(
            "  gateway throughput = {:.0}% of the mosquitto ceiling, {:.0}% of the JetStream ceiling",
            100.0 * t.readings_per_s / m,
            100.0 * t.readings_per_s / n
        );
    }
    Ok(())
}
