//! Idle raw TCP device connections: gateway memory per connection.
//!
//!     cargo build --release --workspace --bins && target/release/fieldgate-bench-tcp-idle
//!
//! Configures `--connections` TCP devices, starts the gateway, measures its resident memory
//! (`VmRSS`, user space) with every device configured but none connected, then connects and
//! identifies every device (`id=... token=...` -> `OK`) and measures again while all
//! connections are open and idle (parked, see `--tcp-park-after`). Prints the difference per
//! connection, and the kernel's TCP socket memory from `/proc/net/sockstat` for reference (not
//! part of the figure).
//! Needs an open-file limit above the connection count for this process and the gateway
//! (`ulimit -n`).

use std::net::{Ipv4Addr, SocketAddr};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use clap::Parser;
use fieldgate_crds::GatewayDevice;
use fieldgate_tests::config::ConfigBuilder;
use fieldgate_tests::listening::ListeningGateway;
use fieldgate_tests::{Mosquitto, NatsServer, wait_until};
use futures::StreamExt;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpSocket, TcpStream};

#[derive(Parser, Debug)]
#[command(about = "Fieldgate idle TCP connection memory benchmark")]
struct Args {
    /// Connections (and devices).
    #[arg(long, default_value_t = 15_000)]
    connections: usize,
    /// Connections being opened at once.
    #[arg(long, default_value_t = 200)]
    parallel: usize,
}

fn open_files_limit() -> Option<u64> {
    let limits = std::fs::read_to_string("/proc/self/limits").ok()?;
    limits.lines().find(|l| l.starts_with("Max open files"))?.split_whitespace().nth(3)?.parse().ok()
}

fn tcp_kernel_pages() -> String {
    std::fs::read_to_string("/proc/net/sockstat")
        .ok()
        .and_then(|s| s.lines().find(|l| l.starts_with("TCP:")).map(str::to_string))
        .unwrap_or_default()
}

/// Connects device `i` from a loopback source address of its own range and identifies it.
async fn connect(gw: SocketAddr, i: usize) -> Result<TcpStream> {
    let source = Ipv4Addr::new(127, 0, 1 + (i / 10_000) as u8, 1);
    let socket = TcpSocket::new_v4()?;
    socket.bind(SocketAddr::from((source, 0)))?;
    let mut stream = socket.connect(gw).await?;
    stream.write_all(format!("id=default/t{i} token=bench\n").as_bytes()).await?;
    let mut line = String::new();
    let mut reader = BufReader::new(&mut stream);
    tokio::time::timeout(Duration::from_secs(30), reader.read_line(&mut line)).await.context("no answer")??;
    if line.trim() != "OK" {
        bail!("device t{i} answered {line:?}");
    }
    Ok(stream)
}

#[tokio::main(flavor = "multi_thread")]
async fn main() -> Result<()> {
    let args = Args::parse();
    let n = args.connections;
    let limit = open_files_limit().unwrap_or(0);
    if limit < n as u64 + 200 {
        bail!(
            "the open-file limit is {limit}: raise it above {} (ulimit -n) for this process and the gateway",
            n + 200
        );
    }
    let nats = NatsServer::start().await?;
    let broker = Mosquitto::start().await?;
    let devices: Vec<GatewayDevice> = (0..n)
        .map(|i| {
            serde_json::from_value(serde_json::json!({"name": format!("t{i}"),
                "connection": {"tcp": {"tokenSecretRef": {"name": "bench"}}},
                "points": [{"name": "v", "type": "float64"}]}))
        })
        .collect::<Result<_, _>>()?;
    let config = ConfigBuilder::new().devices(devices).cloud(&broker.url(), |_| {}).yaml()?;
    let mut gw = ListeningGateway::new(&nats.url())?;
    gw.gw.write_secret("bench", "token", "bench")?;
    gw.gw.write_config(&config)?;
    gw.arg("--tcp-max-connections").arg(&(n + 100).to_string()).arg("--first-frame-timeout").arg("30s");
    gw.start_ready().await?;
    let addr = gw.tcp;
    // Every device registered and the listener bound: one connection identifies.
    wait_until("the last device to be registered", Duration::from_secs(120), || async move {
        Ok(connect(addr, n - 1).await.ok().map(drop))
    })
    .await?;
    tokio::time::sleep(Duration::from_secs(2)).await; // let allocator caches settle before the baseline
    let before = gw.rss_kib().context("gateway RSS")?;
    let kernel_before = tcp_kernel_pages();

    let started = tokio::time::Instant::now();
    let conns: Vec<TcpStream> = futures::stream::iter(0..n)
        .map(|i| connect(addr, i))
        .buffer_unordered(args.parallel)
        .collect::<Vec<_>>()
        .await
        .into_iter()
        .collect::<Result<_>>()?;
    let opened = started.elapsed();
    gw.wait_metric("fieldgate_ingress_connections", &[("protocol", "tcp")], Duration::from_secs(60), |v| v >= n as f64)
        .await?;
    // Idle connections leave the runtime (`--tcp-park-after`, at once by default).
    gw.wait_metric("fieldgate_ingress_parked_connections", &[("protocol", "tcp")], Duration::from_secs(60), |v| {
        v >= n as f64
    })
    .await?;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let after = gw.rss_kib().context("gateway RSS")?;
    let kernel_after = tcp_kernel_pages();
    let per = (after.saturating_sub(before) as f64 * 1024.0) / n as f64;
    println!("{n} devices configured, none connected: gateway RSS {before} KiB");
    println!("{n} idle identified connections (opened in {:.1} s): gateway RSS {after} KiB", opened.as_secs_f64());
    println!("kernel /proc/net/sockstat before: {kernel_before}");
    println!("kernel /proc/net/sockstat after:  {kernel_after}");
    println!("RESULT idle tcp: {per:.0} bytes of gateway user-space memory per connection ({n} connections)");
    drop(conns);
    let _ = gw.terminate().await;
    Ok(())
}
