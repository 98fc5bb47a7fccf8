//! The data-path benchmark: simulator(s) -> gateway -> nats-server -> mosquitto -> a counting
//! subscriber, everything on this machine, plus two ceiling probes measured in the same run
//! (mosquitto driven directly by a native publisher, JetStream driven directly).
//!
//!     cargo build --release --workspace --bins && target/release/fieldgate-bench
//!
//! Prints delivered points/s, gateway CPU-seconds per 10^6 delivered points, gateway RSS, and
//! the sample -> cloud latency p50/p99 at a moderate rate (10k points/s by default).
//!
//! `--scenario NAME` runs one of the edge scenarios instead and prints each figure beside its
//! target, counting the gateway *and* its nats-server (the cloud broker, which stands in for
//! the cloud, is listed apart); "delivered" is what the bench's own cloud subscriber received:
//!
//! - `idle`: 100 devices configured whose ports nobody listens on; CPU share of a core.
//! - `edge-1k`: 10 devices x 100 points every 1 s (1,000 points/s).
//! - `edge-10k`: 10 devices x 100 points every 100 ms (10,000 points/s).
//! - `capacity`: 80 devices x 128 points every 100 ms (~100,000 points/s).
//! - `mqtt-ingest`: 1,000 QoS 1 messages/s (one point each) published to a field mosquitto,
//!   carried to the cloud mosquitto first by a mosquitto bridge, then by the gateway (field
//!   broker -> gateway -> JetStream -> cloud); CPU per 10^6 messages of each, side by side.
//!
//! `--rounds N` repeats a scenario on fresh processes and prints each round and the medians
//! (for `mqtt-ingest`: the median of each round's gateway / bridge ratio, the two carriers
//! taking turns at going first).

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result};
use async_nats::jetstream;
use bytes::Bytes;
use clap::Parser;
use fieldgate_crds::OnFull;
use fieldgate_tests::bench_nats::BenchNats;
use fieldgate_tests::config::{ConfigBuilder, NAMESPACE, UPLINK, set_buffer, stream_name};
use fieldgate_tests::procstat::{ProcStats, cpu_seconds, machine, proc_stats};
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
    /// Run one edge scenario (figures beside the targets) instead of the default runs.
    #[arg(long, value_enum)]
    scenario: Option<Scenario>,
    /// Devices of the `idle` scenario (configured, unreachable).
    #[arg(long, default_value_t = 100)]
    idle_devices: u16,
    /// Measurement window of the `idle` scenario, seconds.
    #[arg(long, default_value_t = 60)]
    idle_seconds: u64,
    /// Messages per second of the `mqtt-ingest` scenario.
    #[arg(long, default_value_t = 1000)]
    ingest_rate: u32,
    /// Devices (field topics) of the `mqtt-ingest` scenario.
    #[arg(long, default_value_t = 10)]
    ingest_devices: u16,
    /// The uplink's `buffer.linger` (how long a reading may wait for others to share its
    /// buffer entry), such as `10ms` or `0s`; the gateway's default (2ms) when not given.
    #[arg(long)]
    linger: Option<fieldgate_crds::HumanDuration>,
    /// Rounds of an edge scenario (not `idle`), each on fresh processes; with more than one,
    /// every round is printed and the figures are their medians. `mqtt-ingest` alternates
    /// which carrier goes first and takes the median of each round's ratio.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=20))]
    rounds: u32,
}

/// The benchmark's uplink buffer: 1 GiB, `dropOldest`, `args.linger`.
fn bench_buffer(u: &mut fieldgate_crds::GatewayUplink, args: &Args) {
    set_buffer(u, "1Gi", OnFull::DropOldest);
    if let Some(b) = u.buffer.as_mut() {
        b.linger = args.linger.clone();
    }
}

/// How the load line names the buffer's linger.
fn linger_note(args: &Args) -> String {
    match &args.linger {
        Some(l) => format!(", buffer.linger {}", l.as_str()),
        None => format!(", buffer.linger {:?} (default)", fieldgate_crds::BufferSpec::DEFAULT_LINGER),
    }
}

#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
enum Scenario {
    Idle,
    #[value(name = "edge-1k")]
    Edge1k,
    #[value(name = "edge-10k")]
    Edge10k,
    Capacity,
    #[value(name = "mqtt-ingest")]
    MqttIngest,
}

/// One data-path run: `devices` simulated devices of `POINTS_FIXED + extra` points polled
/// every `poll`.
#[derive(Clone, Debug)]
struct Load {
    devices: u16,
    extra: u16,
    poll: String,
    record_latency: bool,
}

/// What a scenario must reach on this machine (issue targets); `None`: no target.
#[derive(Clone, Copy, Debug, Default)]
struct Targets {
    cpu_s_per_million: Option<f64>,
    rss_mib: Option<f64>,
    p99_ms: Option<f64>,
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

/// The median of `values` (the mean of the middle two for an even count); NaN when empty.
fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    let n = values.len();
    match n {
        0 => f64::NAN,
        _ if n % 2 == 1 => values[n / 2],
        _ => (values[n / 2 - 1] + values[n / 2]) / 2.0,
    }
}

struct RunResult {
    /// Gateway + nats-server CPU-s per 10^6 points, and each apart.
    both_cpu_s_per_million: f64,
    nats_cpu_s_per_million: f64,
    nats_hwm_mib: f64,
    /// The cloud broker (not part of the gateway's cost).
    broker_cpu_s_per_million: f64,
    points_per_s: f64,
    readings_per_s: f64,
    cpu_s_per_million: f64,
    rss_mib: f64,
    hwm_mib: f64,
    /// The gateway's resident memory at the end of the window: anonymous, and file-backed
    /// (its own code).
    anon_mib: f64,
    file_mib: f64,
    p50_ms: f64,
    p99_ms: f64,
    latency_samples: usize,
    /// Buffer entries stored per second in the window (JetStream messages of the uplink's
    /// stream), and nats-server's CPU per entry.
    entries_per_s: f64,
    nats_us_per_entry: f64,
}

impl RunResult {
    /// Each figure's median over `rounds` (the latency samples: their sum).
    fn median(rounds: &[RunResult]) -> RunResult {
        let m = |f: fn(&RunResult) -> f64| median(rounds.iter().map(f).collect());
        RunResult {
            both_cpu_s_per_million: m(|r| r.both_cpu_s_per_million),
            nats_cpu_s_per_million: m(|r| r.nats_cpu_s_per_million),
            nats_hwm_mib: m(|r| r.nats_hwm_mib),
            broker_cpu_s_per_million: m(|r| r.broker_cpu_s_per_million),
            points_per_s: m(|r| r.points_per_s),
            readings_per_s: m(|r| r.readings_per_s),
            cpu_s_per_million: m(|r| r.cpu_s_per_million),
            rss_mib: m(|r| r.rss_mib),
            hwm_mib: m(|r| r.hwm_mib),
            anon_mib: m(|r| r.anon_mib),
            file_mib: m(|r| r.file_mib),
            p50_ms: m(|r| r.p50_ms),
            p99_ms: m(|r| r.p99_ms),
            latency_samples: rounds.iter().map(|r| r.latency_samples).sum(),
            entries_per_s: m(|r| r.entries_per_s),
            nats_us_per_entry: m(|r| r.nats_us_per_entry),
        }
    }

    /// One line of a round.
    fn line(&self) -> String {
        format!(
            "{:.0} points/s, gateway + nats-server {:.3} CPU-s per 10^6 points (gateway {:.3}, nats-server {:.3}), \
             peak RSS {:.1} MiB, p50 / p99 {:.2} / {:.2} ms",
            self.points_per_s,
            self.both_cpu_s_per_million,
            self.cpu_s_per_million,
            self.nats_cpu_s_per_million,
            self.hwm_mib,
            self.p50_ms,
            self.p99_ms
        )
    }
}

/// CPU of the gateway, its nats-server and the cloud broker at one moment.
#[derive(Clone, Copy, Debug)]
struct Sample {
    gateway: ProcStats,
    nats: ProcStats,
    broker_cpu_s: f64,
}

fn sample(gateway: u32, nats: u32, broker: Option<u32>) -> Result<Sample> {
    Ok(Sample {
        gateway: proc_stats(gateway)?,
        nats: proc_stats(nats)?,
        broker_cpu_s: broker.map(fieldgate_tests::procstat::cpu_seconds).unwrap_or(0.0),
    })
}

/// Waits `seconds`, printing a progress line every 5 s (points/s so far, CPU of gateway +
/// nats-server).
async fn window(label: &str, seconds: u64, count: &AtomicU64, ppr: u64, s0: Sample, pids: (u32, u32)) {
    let (c0, t0) = (count.load(Ordering::Relaxed), Instant::now());
    let end = t0 + Duration::from_secs(seconds);
    while Instant::now() < end {
        tokio::time::sleep_until(end.min(Instant::now() + Duration::from_secs(5))).await;
        let el = t0.elapsed().as_secs_f64();
        let points = (count.load(Ordering::Relaxed) - c0) * ppr;
        let cpu =
            sample(pids.0, pids.1, None).map(|s| s.gateway.cpu_s + s.nats.cpu_s - s0.gateway.cpu_s - s0.nats.cpu_s);
        eprintln!(
            "  [{label}] {el:>4.0}/{seconds} s: {:.0} points/s delivered, gateway + nats-server {:.3} CPU-s",
            points as f64 / el.max(1e-9),
            cpu.unwrap_or(f64::NAN)
        );
    }
}

async fn run_path(args: &Args, load: &Load) -> Result<RunResult> {
    let nats = BenchNats::start(Some("always")).await?;
    let mosq = Mosquitto::start().await?;
    let devices = load.devices;
    let base = free_consecutive_ports(devices)?;
    let mut sim = SimProcess::start(devices, base, load.extra, &[])?;
    let mut gw = Gateway::new(&nats.url())?;
    let encoding = match args.encoding.as_str() {
        "protobuf" => fieldgate_crds::Encoding::Protobuf,
        _ => fieldgate_crds::Encoding::Json,
    };
    let poll: fieldgate_crds::HumanDuration = load.poll.parse()?;
    let devices_cfg = (0..devices).map(|i| {
        fieldgate_sim::gateway_device("default", &format!("sim-{i:04}"), "127.0.0.1", base + i, &poll, load.extra)
    });
    let cfg = ConfigBuilder::new().devices(devices_cfg).cloud(&mosq.url(), |u| {
        u.encoding = Some(encoding);
        bench_buffer(u, args);
    });
    gw.write_config(&cfg.yaml()?)?;
    let counter = Counter::start(mosq.port(), "fieldgate/#").await?;
    gw.env("RUST_LOG", "warn");
    gw.start()?;
    let pid = gw.pid().context("gateway pid")?;
    let started = counter.count.clone();
    let first = wait_until("first reading at the cloud", Duration::from_secs(60), || {
        let n = started.load(Ordering::Relaxed);
        async move { Ok((n > 0).then_some(())) }
    })
    .await;
    if let Err(e) = first {
        let sim = match sim.exited() {
            Some(status) => format!("the simulator exited ({status})"),
            None => "the simulator runs".to_string(),
        };
        return Err(e.context(format!("{sim}; devices on ports {base}..{}\n{}", base + devices, gw.log())));
    }
    tokio::time::sleep(Duration::from_secs(args.warmup)).await;

    let ppr = POINTS_FIXED + u64::from(load.extra);
    let js = jetstream::new(async_nats::connect(nats.url()).await?);
    let e0 = buffer_last_seq(&js).await?;
    let c0 = counter.count.load(Ordering::Relaxed);
    let s0 = sample(pid, nats.pid(), mosq.pid())?;
    let t0 = Instant::now();
    counter.recording.store(load.record_latency, Ordering::Relaxed);
    let label = format!("{devices} devices every {}", load.poll);
    window(&label, args.seconds, &counter.count, ppr, s0, (pid, nats.pid())).await;
    counter.recording.store(false, Ordering::Relaxed);
    let elapsed = t0.elapsed().as_secs_f64();
    let c1 = counter.count.load(Ordering::Relaxed);
    let s1 = sample(pid, nats.pid(), mosq.pid())?;
    let entries = buffer_last_seq(&js).await?.saturating_sub(e0) as f64;

    let _ = gw.terminate_within(Duration::from_secs(10)).await;
    drop(sim);

    let readings = (c1 - c0) as f64;
    let points = readings * ppr as f64;
    let per_million = |cpu_s: f64| if points > 0.0 { cpu_s / points * 1e6 } else { f64::NAN };
    let gw_cpu = s1.gateway.cpu_s - s0.gateway.cpu_s;
    let nats_cpu = s1.nats.cpu_s - s0.nats.cpu_s;
    let mut lat = counter.latencies_us.lock().await.clone();
    lat.sort_unstable();
    Ok(RunResult {
        both_cpu_s_per_million: per_million(gw_cpu + nats_cpu),
        nats_cpu_s_per_million: per_million(nats_cpu),
        nats_hwm_mib: s1.nats.hwm_kib as f64 / 1024.0,
        broker_cpu_s_per_million: per_million(s1.broker_cpu_s - s0.broker_cpu_s),
        points_per_s: points / elapsed,
        readings_per_s: readings / elapsed,
        cpu_s_per_million: per_million(gw_cpu),
        rss_mib: s1.gateway.rss_kib as f64 / 1024.0,
        hwm_mib: s1.gateway.hwm_kib as f64 / 1024.0,
        anon_mib: s1.gateway.anon_kib as f64 / 1024.0,
        file_mib: s1.gateway.file_kib as f64 / 1024.0,
        p50_ms: percentile(&lat, 0.50),
        p99_ms: percentile(&lat, 0.99),
        latency_samples: lat.len(),
        entries_per_s: entries / elapsed,
        nats_us_per_entry: if entries > 0.0 { nats_cpu / entries * 1e6 } else { f64::NAN },
    })
}

/// The last sequence of the bench uplink's buffer stream (entries stored so far).
async fn buffer_last_seq(js: &jetstream::Context) -> Result<u64> {
    Ok(js.get_stream(stream_name(NAMESPACE, UPLINK)).await?.cached_info().state.last_sequence)
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
    if let Some(scenario) = args.scenario {
        return run_scenario(&args, scenario).await;
    }
    let ppr = POINTS_FIXED + u64::from(args.extra_registers);
    println!(
        "fieldgate-bench: {} devices x {} points every {} (throughput), {} devices every {} (latency); \
         windows {} s after {} s warm-up; encoding {}; machine {}",
        args.devices,
        ppr,
        args.poll_interval,
        args.latency_devices,
        args.latency_poll_interval,
        args.seconds,
        args.warmup,
        args.encoding,
        machine(),
    );
    let _ = free_port()?;

    let load = |devices, poll: &str, record_latency| Load {
        devices,
        extra: args.extra_registers,
        poll: poll.to_string(),
        record_latency,
    };
    let t = run_path(&args, &load(args.devices, &args.poll_interval, false)).await?;
    println!("throughput run:");
    println!("  delivered           {:>10.0} points/s ({:.0} readings/s)", t.points_per_s, t.readings_per_s);
    println!("  gateway CPU         {:>10.3} CPU-s per 10^6 points", t.cpu_s_per_million);
    println!("  gateway RSS         {:>10.1} MiB (peak {:.1} MiB)", t.rss_mib, t.hwm_mib);
    println!("  nats-server CPU     {:>10.3} CPU-s per 10^6 points", t.nats_cpu_s_per_million);

    let l = run_path(&args, &load(args.latency_devices, &args.latency_poll_interval, true)).await?;
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
    println!("load average after the runs: {}", machine());
    Ok(())
}

/// `value` beside its ceiling: `  3.10 (target <= 3, MET)`.
fn against(value: f64, target: Option<f64>, decimals: usize) -> String {
    match target {
        Some(t) if value.is_finite() => {
            let verdict = if value <= t { "met" } else { "NOT MET" };
            format!("{value:>10.decimals$}   (target <= {t}, {verdict})")
        }
        _ => format!("{value:>10.decimals$}"),
    }
}

async fn run_scenario(args: &Args, scenario: Scenario) -> Result<()> {
    if scenario == Scenario::Idle && args.rounds > 1 {
        anyhow::bail!("--rounds applies to edge-1k, edge-10k, capacity and mqtt-ingest, not idle");
    }
    let name = clap::ValueEnum::to_possible_value(&scenario).map(|v| v.get_name().to_string()).unwrap_or_default();
    println!("fieldgate-bench --scenario {name}: machine {}", machine());
    let (load, targets) = match scenario {
        Scenario::Idle => return run_idle(args).await,
        Scenario::MqttIngest => return run_mqtt_ingest(args).await,
        Scenario::Edge1k => (
            Load { devices: 10, extra: 72, poll: "1s".into(), record_latency: true },
            Targets { cpu_s_per_million: Some(3.0), rss_mib: Some(20.0), p99_ms: Some(10.0) },
        ),
        Scenario::Edge10k => (
            Load { devices: 10, extra: 72, poll: "100ms".into(), record_latency: true },
            Targets { p99_ms: Some(10.0), ..Targets::default() },
        ),
        Scenario::Capacity => (
            Load { devices: 80, extra: 100, poll: "100ms".into(), record_latency: true },
            Targets { cpu_s_per_million: Some(0.3), p99_ms: Some(50.0), ..Targets::default() },
        ),
    };
    let ppr = POINTS_FIXED + u64::from(load.extra);
    println!(
        "  load: {} devices x {ppr} points every {} (JetStream sync_interval: always{}), {} s window after {} s warm-up",
        load.devices,
        load.poll,
        linger_note(args),
        args.seconds,
        args.warmup
    );
    let mut rounds = Vec::new();
    for round in 1..=args.rounds {
        let r = run_path(args, &load).await?;
        if args.rounds > 1 {
            println!("  round {round}/{}: {}; {}", args.rounds, r.line(), machine());
        }
        rounds.push(r);
    }
    let r = RunResult::median(&rounds);
    println!("  load average after the run: {}", machine());
    if args.rounds > 1 {
        println!("  medians of {} rounds:", args.rounds);
    }
    println!("  delivered (cloud subscriber)   {:>10.0} points/s ({:.0} readings/s)", r.points_per_s, r.readings_per_s);
    println!(
        "  gateway + nats-server CPU      {} CPU-s per 10^6 points",
        against(r.both_cpu_s_per_million, targets.cpu_s_per_million, 3)
    );
    println!("    gateway                      {:>10.3} CPU-s per 10^6 points", r.cpu_s_per_million);
    println!("    nats-server                  {:>10.3} CPU-s per 10^6 points", r.nats_cpu_s_per_million);
    println!(
        "      per buffer entry           {:>10.1} µs ({:.1} entries/s, {:.1} readings an entry)",
        r.nats_us_per_entry,
        r.entries_per_s,
        r.readings_per_s / r.entries_per_s
    );
    println!("  cloud broker (not counted)     {:>10.3} CPU-s per 10^6 points", r.broker_cpu_s_per_million);
    println!("  gateway peak RSS               {} MiB", against(r.hwm_mib, targets.rss_mib, 1));
    println!(
        "    at the end: anonymous        {:>10.1} MiB, file-backed (its code, shared with the page cache) {:.1} MiB",
        r.anon_mib, r.file_mib
    );
    println!("  nats-server peak RSS           {:>10.1} MiB", r.nats_hwm_mib);
    println!("  sample -> cloud p50            {:>10.2} ms", r.p50_ms);
    println!(
        "  sample -> cloud p99            {} ms ({} samples)",
        against(r.p99_ms, targets.p99_ms, 2),
        r.latency_samples
    );
    Ok(())
}

/// Target of the idle scenario: 0.2 % of one core, gateway + nats-server.
const IDLE_TARGET_PERCENT: f64 = 0.2;

/// `args.idle_devices` Modbus devices configured on loopback ports nobody listens on (each
/// connect is refused: the gateway backs off), an uplink to a live broker, no readings:
/// what the gateway and its nats-server cost per second when nothing happens.
async fn run_idle(args: &Args) -> Result<()> {
    let devices = args.idle_devices;
    println!(
        "  load: {devices} devices configured, unreachable (nobody listens on their ports), polled every 1 s; \
         {} s window after {} s warm-up",
        args.idle_seconds, args.warmup
    );
    let nats = BenchNats::start(Some("always")).await?;
    let mosq = Mosquitto::start().await?;
    let base = free_consecutive_ports(devices)?;
    let poll: fieldgate_crds::HumanDuration = "1s".parse()?;
    let devices_cfg = (0..devices)
        .map(|i| fieldgate_sim::gateway_device("default", &format!("dead-{i:04}"), "127.0.0.1", base + i, &poll, 0));
    let cfg = ConfigBuilder::new().devices(devices_cfg).cloud(&mosq.url(), |u| {
        set_buffer(u, "1Gi", OnFull::DropOldest);
    });
    let mut gw = Gateway::new(&nats.url())?;
    gw.write_config(&cfg.yaml()?)?;
    gw.env("RUST_LOG", "warn");
    gw.start_ready().await?;
    let pid = gw.pid().context("gateway pid")?;
    // The floor under the target, in the same window: nats-server's own cost with JetStream on
    // and no stream, and with one stream and a connected client that sends nothing.
    let bare = BenchNats::start(Some("always")).await?;
    let one_stream = BenchNats::start(Some("always")).await?;
    let client = async_nats::connect(one_stream.url()).await?;
    jetstream::new(client.clone())
        .create_stream(jetstream::stream::Config {
            name: "floor".into(),
            subjects: vec!["floor".into()],
            retention: jetstream::stream::RetentionPolicy::Interest,
            ..Default::default()
        })
        .await
        .context("creating the floor probe's stream")?;
    tokio::time::sleep(Duration::from_secs(args.warmup)).await;

    let s0 = sample(pid, nats.pid(), mosq.pid())?;
    let floor0 = (cpu_seconds(bare.pid()), cpu_seconds(one_stream.pid()));
    let t0 = Instant::now();
    let nothing = AtomicU64::new(0);
    window("idle", args.idle_seconds, &nothing, 0, s0, (pid, nats.pid())).await;
    let elapsed = t0.elapsed().as_secs_f64();
    let s1 = sample(pid, nats.pid(), mosq.pid())?;
    let floor = (cpu_seconds(bare.pid()) - floor0.0, cpu_seconds(one_stream.pid()) - floor0.1);
    let percent = |cpu: f64| 100.0 * cpu / elapsed;
    let gw_cpu = s1.gateway.cpu_s - s0.gateway.cpu_s;
    let nats_cpu = s1.nats.cpu_s - s0.nats.cpu_s;
    println!("  load average after the run: {}", machine());
    println!(
        "  gateway + nats-server CPU      {} % of a core",
        against(percent(gw_cpu + nats_cpu), Some(IDLE_TARGET_PERCENT), 3)
    );
    println!(
        "    gateway                      {:>10.3} % of a core ({gw_cpu:.2} CPU-s in {elapsed:.0} s)",
        percent(gw_cpu)
    );
    println!("    nats-server                  {:>10.3} % of a core ({nats_cpu:.2} CPU-s)", percent(nats_cpu));
    println!("  cloud broker (not counted)     {:>10.3} % of a core", percent(s1.broker_cpu_s - s0.broker_cpu_s));
    println!("  floor: nats-server alone, same window (not counted)");
    println!("    JetStream on, no stream      {:>10.3} % of a core", percent(floor.0));
    println!("    one stream, a client idle    {:>10.3} % of a core", percent(floor.1));
    println!("  gateway peak RSS               {:>10.1} MiB", s1.gateway.hwm_kib as f64 / 1024.0);
    println!("  nats-server peak RSS           {:>10.1} MiB", s1.nats.hwm_kib as f64 / 1024.0);
    drop(client);
    drop(gw);
    Ok(())
}

/// Target of the mqtt-ingest scenario: gateway + nats-server at most this many times the CPU
/// per message of a mosquitto bridge carrying the same messages.
const INGEST_TARGET_RATIO: f64 = 5.0;

/// What carries the field messages to the cloud broker in one mqtt-ingest run.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Carrier {
    /// A mosquitto bridge: a broker of its own with a bridge `in` from the field broker and
    /// one `out` to the cloud broker, QoS 1 on both.
    Bridge,
    /// The gateway (MQTT devices on the field broker, an uplink to the cloud broker) and its
    /// nats-server.
    Gateway,
}

/// Messages delivered to the cloud broker and the carrier's CPU in the window.
struct IngestRun {
    messages_per_s: f64,
    cpu_s_per_million: f64,
    nats_cpu_s_per_million: f64,
    hwm_mib: f64,
    /// Buffer entries stored per second in the window (the gateway only).
    entries_per_s: Option<f64>,
}

impl IngestRun {
    /// Each figure's median over the runs of one carrier.
    fn median<'a>(runs: impl Iterator<Item = &'a IngestRun> + Clone) -> IngestRun {
        let m = |f: fn(&IngestRun) -> f64| median(runs.clone().map(f).collect());
        let entries: Vec<f64> = runs.clone().filter_map(|r| r.entries_per_s).collect();
        IngestRun {
            messages_per_s: m(|r| r.messages_per_s),
            cpu_s_per_million: m(|r| r.cpu_s_per_million),
            nats_cpu_s_per_million: m(|r| r.nats_cpu_s_per_million),
            hwm_mib: m(|r| r.hwm_mib),
            entries_per_s: (!entries.is_empty()).then(|| median(entries)),
        }
    }
}

async fn run_mqtt_ingest(args: &Args) -> Result<()> {
    println!(
        "  load: {} QoS 1 messages/s over {} field topics (one point each), {} s window after {} s warm-up; \
         the same messages through a mosquitto bridge and through the gateway, one after the other (JetStream sync_interval: always{})",
        args.ingest_rate,
        args.ingest_devices,
        args.seconds,
        args.warmup,
        linger_note(args)
    );
    let mut rounds = Vec::new();
    for round in 1..=args.rounds {
        // Alternating which goes first, so a drift of the machine's load favours neither.
        let (bridge, gateway) = if round % 2 == 1 {
            let b = ingest_run(args, Carrier::Bridge).await?;
            (b, ingest_run(args, Carrier::Gateway).await?)
        } else {
            let g = ingest_run(args, Carrier::Gateway).await?;
            (ingest_run(args, Carrier::Bridge).await?, g)
        };
        if args.rounds > 1 {
            println!(
                "  round {round}/{}: bridge {:.3}, gateway + nats-server {:.3} (nats-server {:.3}) CPU-s per 10^6 messages = {:.2} x; {}",
                args.rounds,
                bridge.cpu_s_per_million,
                gateway.cpu_s_per_million,
                gateway.nats_cpu_s_per_million,
                gateway.cpu_s_per_million / bridge.cpu_s_per_million,
                machine()
            );
        }
        rounds.push((bridge, gateway));
    }
    let bridge = IngestRun::median(rounds.iter().map(|r| &r.0));
    let gateway = IngestRun::median(rounds.iter().map(|r| &r.1));
    // The ratio of each round (its two runs side by side), then their median.
    let ratio = median(rounds.iter().map(|(b, g)| g.cpu_s_per_million / b.cpu_s_per_million).collect());
    println!("  load average after the runs: {}", machine());
    if args.rounds > 1 {
        println!("  medians of {} rounds:", args.rounds);
    }
    println!(
        "  delivered (cloud subscriber)   bridge {:.0} msg/s, gateway {:.0} msg/s",
        bridge.messages_per_s, gateway.messages_per_s
    );
    println!("  mosquitto bridge CPU           {:>10.3} CPU-s per 10^6 messages", bridge.cpu_s_per_million);
    println!("  gateway + nats-server CPU      {:>10.3} CPU-s per 10^6 messages", gateway.cpu_s_per_million);
    println!("    nats-server                  {:>10.3} CPU-s per 10^6 messages", gateway.nats_cpu_s_per_million);
    if let Some(entries) = gateway.entries_per_s.filter(|e| *e > 0.0) {
        println!(
            "    buffer entries               {entries:>10.1} a second ({:.1} messages an entry)",
            gateway.messages_per_s / entries
        );
    }
    println!("  gateway + nats-server / bridge {} x", against(ratio, Some(INGEST_TARGET_RATIO), 2));
    println!("  peak RSS                       bridge {:.1} MiB, gateway {:.1} MiB", bridge.hwm_mib, gateway.hwm_mib);
    Ok(())
}

async fn ingest_run(args: &Args, carrier: Carrier) -> Result<IngestRun> {
    let field = Mosquitto::start().await?;
    let cloud = Mosquitto::start().await?;
    let topics: Vec<String> = (0..args.ingest_devices).map(|i| format!("bench/d{i}/v")).collect();
    // Whichever carries them, the processes whose CPU counts: (carrier, its nats-server).
    let (_bridge, nats, mut gw, pids, filter) = match carrier {
        Carrier::Bridge => {
            let bridges = vec![
                ("field".to_string(), format!("127.0.0.1:{}", field.port()), "bench/# in 1".to_string()),
                ("cloud".to_string(), format!("127.0.0.1:{}", cloud.port()), "bench/# out 1".to_string()),
            ];
            let bridge =
                Mosquitto::start_with(fieldgate_tests::MosquittoOptions { bridges, ..Default::default() }).await?;
            let pid = bridge.pid().context("bridge pid")?;
            (Some(bridge), None, None, (pid, None), "bench/#")
        }
        Carrier::Gateway => {
            let nats = BenchNats::start(Some("always")).await?;
            let devices: Vec<fieldgate_crds::GatewayDevice> = (0..args.ingest_devices)
                .map(|i| {
                    serde_json::from_value(serde_json::json!({"name": format!("d{i}"),
                        "connection": {"mqtt": {"url": field.url(), "topics": [format!("bench/d{i}/#")]}},
                        "points": [{"name": "v", "type": "uint64"}]}))
                })
                .collect::<Result<_, _>>()?;
            let cfg = ConfigBuilder::new().devices(devices).cloud(&cloud.url(), |u| {
                fieldgate_tests::config::mqtt_of(u).max_in_flight = Some(1000);
                bench_buffer(u, args);
            });
            let mut gw = Gateway::new(&nats.url())?;
            gw.write_config(&cfg.yaml()?)?;
            gw.env("RUST_LOG", "warn");
            gw.start_ready().await?;
            let pid = gw.pid().context("gateway pid")?;
            let nats_pid = nats.pid();
            (None, Some(nats), Some(gw), (pid, Some(nats_pid)), "fieldgate/#")
        }
    };
    let counter = Counter::start(cloud.port(), filter).await?;
    let publisher = paced_publisher(field.port(), topics, args.ingest_rate);
    let first = counter.count.clone();
    wait_until("first message at the cloud", Duration::from_secs(60), || {
        let n = first.load(Ordering::Relaxed);
        async move { Ok((n > 0).then_some(())) }
    })
    .await?;
    tokio::time::sleep(Duration::from_secs(args.warmup)).await;

    let cpu = |pids: (u32, Option<u32>)| -> Result<(f64, f64, u64)> {
        let carrier = proc_stats(pids.0)?;
        let nats = pids.1.map(proc_stats).transpose()?;
        Ok((carrier.cpu_s, nats.map_or(0.0, |n| n.cpu_s), carrier.hwm_kib))
    };
    // The gateway's buffer entries: the last sequence of its uplink's stream.
    let js = match &nats {
        Some(n) => Some(jetstream::new(async_nats::connect(n.url()).await?)),
        None => None,
    };
    let last_seq = || async {
        match &js {
            Some(js) => buffer_last_seq(js).await.map(Some),
            None => Ok(None),
        }
    };
    let e0 = last_seq().await?;
    let c0 = counter.count.load(Ordering::Relaxed);
    let (carrier0, nats0, _) = cpu(pids)?;
    let t0 = Instant::now();
    let label = match carrier {
        Carrier::Bridge => "mosquitto bridge",
        Carrier::Gateway => "gateway",
    };
    let end = t0 + Duration::from_secs(args.seconds);
    while Instant::now() < end {
        tokio::time::sleep_until(end.min(Instant::now() + Duration::from_secs(5))).await;
        let n = counter.count.load(Ordering::Relaxed) - c0;
        eprintln!(
            "  [{label}] {:>4.0}/{} s: {:.0} msg/s delivered",
            t0.elapsed().as_secs_f64(),
            args.seconds,
            n as f64 / t0.elapsed().as_secs_f64()
        );
    }
    let elapsed = t0.elapsed().as_secs_f64();
    let delivered = (counter.count.load(Ordering::Relaxed) - c0) as f64;
    let (carrier1, nats1, hwm_kib) = cpu(pids)?;
    let e1 = last_seq().await?;
    publisher.abort();
    // A graceful stop, as in the other scenarios (an instrumented build writes its profile).
    if let Some(g) = gw.as_mut() {
        let _ = g.terminate_within(Duration::from_secs(10)).await;
    }
    let per_million = |cpu_s: f64| if delivered > 0.0 { cpu_s / delivered * 1e6 } else { f64::NAN };
    Ok(IngestRun {
        messages_per_s: delivered / elapsed,
        cpu_s_per_million: per_million(carrier1 - carrier0 + nats1 - nats0),
        nats_cpu_s_per_million: per_million(nats1 - nats0),
        hwm_mib: hwm_kib as f64 / 1024.0,
        entries_per_s: e0.zip(e1).map(|(a, b)| b.saturating_sub(a) as f64 / elapsed),
    })
}

/// Publishes `rate` QoS 1 messages per second round robin over `topics` (a batch every 10 ms)
/// until aborted; the payload is the message's number as text.
fn paced_publisher(port: u16, topics: Vec<String>, rate: u32) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut o = MqttOptions::new(format!("bench-field-publisher-{port}"), "127.0.0.1", port);
        o.set_keep_alive(Duration::from_secs(30)).set_inflight(1000);
        let (client, mut el) = AsyncClient::new(o, 4096);
        let poller = tokio::spawn(async move {
            loop {
                if el.poll().await.is_err() {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        });
        let mut tick = tokio::time::interval(Duration::from_millis(10));
        let per_tick = u64::from(rate.div_ceil(100));
        let mut i = 0u64;
        loop {
            tick.tick().await;
            for _ in 0..per_tick {
                let t = &topics[(i % topics.len() as u64) as usize];
                if client.publish(t.clone(), QoS::AtLeastOnce, false, i.to_string().into_bytes()).await.is_err() {
                    poller.abort();
                    return;
                }
                i += 1;
            }
        }
    })
}
