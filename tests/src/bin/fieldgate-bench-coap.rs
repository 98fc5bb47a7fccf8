//! CoAP push benchmark: confirmable POSTs of a small JSON reading into the gateway (each
//! answered only after JetStream accepted it, `sync_interval: always`), against libcoap's own
//! `coap-server-notls` answering the same load (CON PUTs of the same payload) as the ceiling.
//!
//!     cargo build --release --workspace --bins && target/release/fieldgate-bench-coap
//!
//! Closed-loop load: `c` workers, each with its own socket and one request in flight, for
//! `c` in the ramp; prints requests/s and latency p50/p99 per level, then the best rate with
//! p99 < 10 ms for both targets and their ratio.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use clap::Parser;
use coap_lite::{CoapOption, MessageClass, MessageType, Packet, RequestType, ResponseType};
use fieldgate_crds::GatewayDevice;
use fieldgate_tests::Mosquitto;
use fieldgate_tests::coap_peer::CoapServer;
use fieldgate_tests::config::ConfigBuilder;
use fieldgate_tests::listening::ListeningGateway;
use fieldgate_tests::procstat::{cpu_seconds, proc_stats};
use tokio::net::UdpSocket;
use tokio::time::Instant;

#[derive(Parser, Debug, Clone)]
#[command(about = "Fieldgate CoAP push benchmark")]
struct Args {
    /// Concurrency levels (workers with one request in flight each).
    #[arg(long, value_delimiter = ',', default_value = "1,2,4,8,16,32,64,128,192,256")]
    levels: Vec<usize>,
    /// Seconds per level.
    #[arg(long, default_value_t = 4)]
    seconds: u64,
    /// Push devices (workers spread over them).
    #[arg(long, default_value_t = 64)]
    devices: usize,
    /// JetStream `sync_interval` of the NATS server (`always`: the contract's default).
    #[arg(long, default_value = "always")]
    nats_sync: String,
}

#[derive(Clone, Copy, Debug, Default)]
struct Level {
    concurrency: usize,
    rate: f64,
    p50_ms: f64,
    p99_ms: f64,
    failed: u64,
}

fn request(method: RequestType, path: &str, payload: &[u8], mid: u16) -> Packet {
    let mut p = Packet::new();
    p.header.set_version(1);
    p.header.set_type(MessageType::Confirmable);
    p.header.code = MessageClass::Request(method);
    p.header.message_id = mid;
    p.set_token(mid.to_be_bytes().to_vec());
    for seg in path.split('/').filter(|s| !s.is_empty()) {
        p.add_option(CoapOption::UriPath, seg.as_bytes().to_vec());
    }
    p.payload = payload.to_vec();
    p
}

/// One worker: requests back to back until `until`; latencies in µs, failures.
async fn worker(target: SocketAddr, method: RequestType, path: String, until: Instant) -> Result<(Vec<u32>, u64)> {
    let socket = UdpSocket::bind("127.0.0.1:0").await?;
    socket.connect(target).await?;
    let mut mid: u16 = rand::random();
    let mut lat = Vec::new();
    let mut failed = 0;
    let mut buf = [0u8; 1500];
    let payload = br#"{"t":21.5,"h":40}"#;
    while Instant::now() < until {
        mid = mid.wrapping_add(1);
        let bytes = request(method, &path, payload, mid).to_bytes().map_err(|e| anyhow::anyhow!("{e:?}"))?;
        let started = Instant::now();
        socket.send(&bytes).await?;
        let ok = loop {
            match tokio::time::timeout(Duration::from_secs(2), socket.recv(&mut buf)).await {
                Err(_) => break false,
                Ok(n) => {
                    let Ok(p) = Packet::from_bytes(&buf[..n?]) else { continue };
                    if p.header.message_id != mid {
                        continue;
                    }
                    break matches!(
                        p.header.code,
                        MessageClass::Response(ResponseType::Changed | ResponseType::Created)
                    );
                }
            }
        };
        if ok {
            lat.push(u32::try_from(started.elapsed().as_micros()).unwrap_or(u32::MAX));
        } else {
            failed += 1;
        }
    }
    Ok((lat, failed))
}

async fn ramp(
    name: &str,
    target: SocketAddr,
    method: RequestType,
    paths: &[String],
    args: &Args,
) -> Result<Vec<Level>> {
    let mut out = Vec::new();
    println!("\n{name}");
    println!("{:>6} {:>10} {:>9} {:>9} {:>7}", "conc", "req/s", "p50 ms", "p99 ms", "failed");
    for &c in &args.levels {
        let until = Instant::now() + Duration::from_secs(args.seconds);
        let workers: Vec<_> =
            (0..c).map(|i| tokio::spawn(worker(target, method, paths[i % paths.len()].clone(), until))).collect();
        let mut all = Vec::new();
        let mut failed = 0;
        for w in workers {
            let (l, f) = w.await??;
            all.extend(l);
            failed += f;
        }
        all.sort_unstable();
        let pct = |q: f64| {
            all.get(((all.len() as f64 * q) as usize).min(all.len().saturating_sub(1)))
                .map_or(0.0, |v| f64::from(*v) / 1000.0)
        };
        let level = Level {
            concurrency: c,
            rate: all.len() as f64 / args.seconds as f64,
            p50_ms: pct(0.50),
            p99_ms: pct(0.99),
            failed,
        };
        println!("{:>6} {:>10.0} {:>9.2} {:>9.2} {:>7}", c, level.rate, level.p50_ms, level.p99_ms, failed);
        out.push(level);
    }
    Ok(out)
}

fn num_cpus() -> usize {
    std::thread::available_parallelism().map(usize::from).unwrap_or(1)
}

fn best(levels: &[Level]) -> Option<Level> {
    levels.iter().filter(|l| l.p99_ms < 10.0 && l.failed == 0).copied().max_by(|a, b| a.rate.total_cmp(&b.rate))
}

#[tokio::main(flavor = "multi_thread")]
async fn main() -> Result<()> {
    let args = Arc::new(Args::parse());

    // Ceiling: libcoap's own server, CON PUTs to dynamic resources.
    let server = CoapServer::start().await?;
    // `CoapServer` allows 50 dynamic resources (`-d 50`): PUTs to more paths are refused and
    // would count as failures of the ceiling, not as its limit. Workers share the paths.
    let lib_paths: Vec<String> = (0..args.devices.min(50)).map(|i| format!("/bench-{i}")).collect();
    let ceiling = ramp("libcoap coap-server-notls (CON PUT)", server.addr, RequestType::Put, &lib_paths, &args).await?;
    drop(server);

    // The gateway: push devices, NATS (sync always), an uplink to mosquitto.
    let nats = fieldgate_tests::bench_nats::BenchNats::start(Some(&args.nats_sync)).await?;
    let broker = Mosquitto::start().await?;
    let devices: Vec<GatewayDevice> = (0..args.devices)
        .map(|i| {
            serde_json::from_value(serde_json::json!({"name": format!("bench-{i}"), "connection": {"coap": {}},
                "points": [{"name": "t", "type": "float64"}, {"name": "h", "type": "uint16"}]}))
        })
        .collect::<Result<_, _>>()?;
    let config = ConfigBuilder::new().devices(devices).cloud(&broker.url(), |_| {}).yaml()?;
    let mut gw = ListeningGateway::new(&nats.url())?;
    gw.gw.write_config(&config)?;
    gw.start_ready().await?;
    let paths: Vec<String> = (0..args.devices).map(|i| format!("/default/bench-{i}")).collect();
    // Warm up (the listener binds lazily, JetStream streams are created).
    ramp(
        "warm-up",
        gw.coap,
        RequestType::Post,
        &paths,
        &Args { levels: vec![4], seconds: 1, devices: args.devices, nats_sync: String::new() },
    )
    .await
    .context("warm-up")?;
    let title =
        format!("fieldgate CoAP push -> JetStream, sync_interval {} (CON POST, answered after PubAck)", args.nats_sync);
    // CPU of every process on the path, over the measured ramp only.
    let pids = [
        ("gateway", gw.pid().unwrap_or(0)),
        ("nats-server", nats.pid()),
        ("mosquitto", broker.pid().unwrap_or(0)),
        ("load generator", std::process::id()),
    ];
    let gateway = ramp(&title, gw.coap, RequestType::Post, &paths, &args).await?;
    // The best level once more, with the CPU of every process on the path.
    let mut cpu = None;
    if let Some(top) = best(&gateway) {
        let again = Args { levels: vec![top.concurrency], ..(*args).clone() };
        let accepted_before = gw.metric("fieldgate_readings_accepted_total", &[]).await?;
        let cpu_before = pids.map(|(_, pid)| cpu_seconds(pid));
        let title = format!("the same at c={}, for the CPU per reading", top.concurrency);
        ramp(&title, gw.coap, RequestType::Post, &paths, &again).await?;
        let cpu_after = pids.map(|(_, pid)| cpu_seconds(pid));
        let readings = gw.metric("fieldgate_readings_accepted_total", &[]).await? - accepted_before;
        let rss: Vec<String> = pids
            .iter()
            .filter_map(|(name, pid)| proc_stats(*pid).ok().map(|st| format!("{name} {} MiB", st.rss_kib / 1024)))
            .collect();
        println!("resident memory after it: {}", rss.join(", "));
        cpu = Some((readings, cpu_before, cpu_after));
    }
    let accepted = gw.metric("fieldgate_readings_accepted_total", &[]).await?;
    let _ = gw.terminate().await;
    // Group commit: how many readings each JetStream entry carried on average.
    let js = async_nats::jetstream::new(async_nats::connect(nats.url()).await?);
    let mut stream = js.get_stream(fieldgate_gateway::buffer::stream_name("default", "cloud")).await?;
    let entries = stream.info().await?.state.last_sequence;

    let (g, c) = (best(&gateway), best(&ceiling));
    println!();
    match (g, c) {
        (Some(g), Some(c)) => println!(
            "RESULT coap push at p99<10ms: fieldgate {:.0} req/s (c={}, p99 {:.2} ms) vs libcoap {:.0} req/s (c={}, p99 {:.2} ms): ratio {:.2}",
            g.rate,
            g.concurrency,
            g.p99_ms,
            c.rate,
            c.concurrency,
            c.p99_ms,
            g.rate / c.rate
        ),
        _ => println!("RESULT no level met p99 < 10 ms: fieldgate {g:?}, libcoap {c:?}"),
    }
    println!(
        "readings accepted by JetStream during the run: {accepted}, in {entries} buffer entries ({:.1} readings each)",
        accepted / entries.max(1) as f64
    );
    if let Some((readings, cpu_before, cpu_after)) = cpu
        && readings > 0.0
    {
        let per: Vec<String> = pids
            .iter()
            .zip(cpu_before.iter().zip(&cpu_after))
            .map(|((name, _), (b, a))| format!("{name} {:.1} µs", (a - b) / readings * 1e6))
            .collect();
        let total: f64 = cpu_before.iter().zip(&cpu_after).map(|(b, a)| a - b).sum::<f64>() / readings * 1e6;
        println!(
            "CPU per accepted reading at that level: {} (total {total:.1} µs: {:.0} readings/s would fill {} cores)",
            per.join(", "),
            num_cpus() as f64 / total * 1e6,
            num_cpus()
        );
    }
    Ok(())
}
