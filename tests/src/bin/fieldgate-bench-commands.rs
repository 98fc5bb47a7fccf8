//! The command benchmark: commands from the cloud while the gateway polls about 100,000
//! points/s (fieldgate-sim devices -> gateway -> nats-server -> mosquitto), everything on this
//! machine.
//!
//!     cargo build --release --workspace --bins && target/release/fieldgate-bench-commands
//!
//! Prints the polling rate delivered to the cloud without and with commands, and the
//! command -> result latency (publish of the command at the cloud broker to the `verified`
//! result received from it: intake, JetStream, the outcome record, the Modbus write and
//! read-back on the poller's own connection) for `--commands` commands, beside the machine
//! (CPU model, cores, load average).

use std::collections::HashMap;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use anyhow::{Context, Result};
use clap::Parser;
use fieldgate_crds::{Access, OnFull};
use fieldgate_tests::config::{ConfigBuilder, mqtt_of, set_buffer};
use fieldgate_tests::sim_process::{SimProcess, free_consecutive_ports};
use fieldgate_tests::{Gateway, Mosquitto, NatsServer, wait_until};
use rumqttc::{AsyncClient, Event, MqttOptions, NetworkOptions, Packet, QoS};
use tokio::time::Instant;

#[derive(Parser, Debug, Clone)]
#[command(about = "Fieldgate command benchmark")]
struct Args {
    /// Simulated devices polled.
    #[arg(long, default_value_t = 80)]
    devices: u16,
    /// Extra uint16 registers per device (each reading has the simulator's fixed points and these).
    #[arg(long, default_value_t = 100)]
    extra_registers: u16,
    /// Poll interval.
    #[arg(long, default_value = "100ms")]
    poll_interval: fieldgate_crds::HumanDuration,
    /// Commands sent (round robin over the devices).
    #[arg(long, default_value_t = 100)]
    commands: usize,
    /// Time between two commands, ms.
    #[arg(long, default_value_t = 100)]
    command_gap_ms: u64,
    /// Measurement window without commands, seconds.
    #[arg(long, default_value_t = 10)]
    seconds: u64,
    /// Warm-up, seconds.
    #[arg(long, default_value_t = 5)]
    warmup: u64,
}

const TEMPLATE: &str = "fieldgate/{namespace}/{device}/commands";

/// Readings received, and when each command's final result arrived.
#[derive(Default)]
struct Seen {
    readings: AtomicU64,
    results: Mutex<HashMap<String, (String, Instant)>>,
}

fn machine() -> String {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let model = cpuinfo
        .lines()
        .find_map(|l| l.strip_prefix("model name").and_then(|r| r.split_once(':')).map(|(_, m)| m.trim().to_string()))
        .unwrap_or_else(|| "unknown CPU".into());
    let cores = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0);
    let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    let load: Vec<&str> = load.split_whitespace().take(3).collect();
    format!("{model}, {cores} cores, load average {}", load.join(" "))
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    sorted[(((sorted.len() - 1) as f64) * p).round() as usize]
}

#[tokio::main]
async fn main() -> Result<()> {
    let args = Args::parse();
    let ppr = fieldgate_sim::simulated_points(args.extra_registers).len() as u64;
    println!(
        "fieldgate-bench-commands: {} devices x {ppr} points every {}, {} commands one every {} ms",
        args.devices, args.poll_interval, args.commands, args.command_gap_ms
    );
    println!("machine: {}", machine());

    let nats = NatsServer::start().await?;
    let mosq = Mosquitto::start().await?;
    let base = free_consecutive_ports(args.devices)?;
    let sim = SimProcess::start(args.devices, base, args.extra_registers, &["--single-connection"])?;
    let devices = (0..args.devices).map(|i| {
        let mut d = fieldgate_sim::gateway_device(
            "default",
            &format!("sim-{i:04}"),
            "127.0.0.1",
            base + i,
            &args.poll_interval,
            args.extra_registers,
        );
        for p in d.points.iter_mut().filter(|p| p.name == "reg0") {
            p.access = Access::ReadWrite;
        }
        d
    });
    let gw = Gateway::new(&nats.url())?;
    let cfg = ConfigBuilder::new().devices(devices).cloud(&mosq.url(), |u| {
        mqtt_of(u).command_topic = Some(TEMPLATE.into());
        set_buffer(u, "1Gi", OnFull::DropOldest);
    });
    gw.write_config(&cfg.yaml()?)?;

    // Two cloud clients, as a cloud would have them: one counting the telemetry, and the
    // command application (sends commands, takes results; TCP_NODELAY, so that neither waits
    // behind the telemetry stream or a delayed TCP acknowledgement).
    let seen = Arc::new(Seen::default());
    let mut o = MqttOptions::new("bench-telemetry", "127.0.0.1", mosq.port());
    o.set_keep_alive(Duration::from_secs(30)).set_max_packet_size(1 << 20, 1 << 20);
    let (telemetry, mut el) = AsyncClient::new(o, 1024);
    telemetry.subscribe("fieldgate/+/+/telemetry", QoS::AtLeastOnce).await?;
    let s = Arc::clone(&seen);
    let counter = tokio::spawn(async move {
        loop {
            match el.poll().await {
                Ok(Event::Incoming(Packet::Publish(_))) => {
                    s.readings.fetch_add(1, Ordering::Relaxed);
                }
                Ok(_) => {}
                Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
            }
        }
    });
    let mut o = MqttOptions::new("bench-commands", "127.0.0.1", mosq.port());
    o.set_keep_alive(Duration::from_secs(30)).set_max_packet_size(1 << 20, 1 << 20);
    let mut network = NetworkOptions::new();
    network.set_tcp_nodelay(true);
    let (client, mut el) = AsyncClient::new(o, 1024);
    el.set_network_options(network);
    client.subscribe("fieldgate/+/+/commands/result", QoS::AtLeastOnce).await?;
    let s = Arc::clone(&seen);
    let listener = tokio::spawn(async move {
        loop {
            match el.poll().await {
                Ok(Event::Incoming(Packet::Publish(p))) => {
                    let Ok(j) = serde_json::from_slice::<serde_json::Value>(&p.payload) else { continue };
                    let (Some(id), Some(status)) = (j["id"].as_str(), j["status"].as_str()) else { continue };
                    if !matches!(status, "accepted" | "written") {
                        let mut r = s.results.lock().unwrap_or_else(PoisonError::into_inner);
                        r.entry(id.to_string()).or_insert((status.to_string(), Instant::now()));
                    }
                }
                Ok(_) => {}
                Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
            }
        }
    });

    let mut cmd = gw.command();
    cmd.env("RUST_LOG", "warn").stdout(Stdio::null()).stderr(Stdio::null());
    let mut child = cmd.spawn().context("starting the gateway")?;
    let readings = || seen.readings.load(Ordering::Relaxed);
    wait_until("first reading at the cloud", Duration::from_secs(60), || {
        let n = readings();
        async move { Ok((n > 0).then_some(())) }
    })
    .await?;
    tokio::time::sleep(Duration::from_secs(args.warmup)).await;

    // Polling alone.
    let (r0, t0) = (readings(), Instant::now());
    tokio::time::sleep(Duration::from_secs(args.seconds)).await;
    let quiet = (readings() - r0) as f64 * ppr as f64 / t0.elapsed().as_secs_f64();

    // Polling with commands.
    let (r1, t1) = (readings(), Instant::now());
    let mut sent = Vec::with_capacity(args.commands);
    for i in 0..args.commands {
        let device = format!("sim-{:04}", i % usize::from(args.devices));
        let id = format!("bench-{i}");
        let body = serde_json::json!({"id": id, "point": "reg0", "value": i % 60000, "ttl": "1m"}).to_string();
        let at = Instant::now();
        client.publish(format!("fieldgate/default/{device}/commands"), QoS::AtLeastOnce, false, body).await?;
        sent.push((id, at));
        tokio::time::sleep(Duration::from_millis(args.command_gap_ms)).await;
    }
    let done = wait_until("every command's result", Duration::from_secs(120), || {
        let n = seen.results.lock().unwrap_or_else(PoisonError::into_inner).len();
        let want = args.commands;
        async move { Ok((n >= want).then_some(())) }
    })
    .await;
    let busy = (readings() - r1) as f64 * ppr as f64 / t1.elapsed().as_secs_f64();
    let _ = Command::new("kill").args(["-TERM", &child.id().to_string()]).status();
    let _ = tokio::task::spawn_blocking(move || child.wait()).await;
    listener.abort();
    counter.abort();
    drop(sim);

    let results = seen.results.lock().unwrap_or_else(PoisonError::into_inner).clone();
    let mut latencies: Vec<f64> = Vec::new();
    let mut other: HashMap<String, usize> = HashMap::new();
    for (id, at) in &sent {
        match results.get(id) {
            Some((status, when)) if status == "verified" => {
                latencies.push(when.duration_since(*at).as_secs_f64() * 1e3)
            }
            Some((status, _)) => *other.entry(status.clone()).or_default() += 1,
            None => *other.entry("no result".into()).or_default() += 1,
        }
    }
    latencies.sort_by(f64::total_cmp);
    println!("polling without commands  {quiet:>10.0} points/s");
    println!("polling with commands     {busy:>10.0} points/s");
    println!(
        "command -> verified       p50 {:.1} ms, p99 {:.1} ms, min {:.1} ms, max {:.1} ms ({} of {} verified{})",
        percentile(&latencies, 0.5),
        percentile(&latencies, 0.99),
        latencies.first().copied().unwrap_or(f64::NAN),
        latencies.last().copied().unwrap_or(f64::NAN),
        latencies.len(),
        args.commands,
        if other.is_empty() { String::new() } else { format!("; others: {other:?}") }
    );
    println!("target: p99 <= 50 ms, polling rate undisturbed");
    println!("machine after the run: {}", machine());
    done.map(|_| ())
}
