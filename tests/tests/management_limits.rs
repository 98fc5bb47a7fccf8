//! The management port under hostile clients: idle and trickling connections cannot keep the
//! probes, `/metrics` and `/api/v1` from answering; idle connections are closed after the idle
//! timeout; a connection serves a bounded number of requests.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::{Context, Result, ensure};
use fieldgate_tests::api::request;
use fieldgate_tests::{ConfigBuilder, Gateway, Mosquitto, NatsServer, wait_until};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;

const WAIT: Duration = Duration::from_secs(60);
const TOKEN: &str = "limits-token-0123456789abcdef";

async fn gateway(nats: &NatsServer, broker: &Mosquitto, extra: &[&str]) -> Result<Gateway> {
    let mut gw = Gateway::new(&nats.url())?;
    gw.api_token(TOKEN)?;
    for a in extra {
        gw.arg(*a);
    }
    gw.write_config(&ConfigBuilder::new().cloud(&broker.url(), |_| {}).yaml()?)?;
    gw.start_ready().await?;
    Ok(gw)
}

async fn connect_many(addr: SocketAddr, n: usize) -> Result<Vec<TcpStream>> {
    let mut streams = Vec::with_capacity(n);
    for i in 0..n {
        let s = TcpStream::connect(addr)
            .await
            .with_context(|| format!("opening connection {i} of {n} (is `ulimit -n` above {}?)", 2 * n))?;
        streams.push(s);
    }
    Ok(streams)
}

/// Sends a request header one byte at a time, one byte per connection every 200 ms, never
/// finishing it, until `stop`.
fn trickle(mut streams: Vec<TcpStream>, stop: CancellationToken) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let header = b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Slow: ";
        let mut sent = 0usize;
        while !stop.is_cancelled() {
            let byte = header.get(sent).copied().unwrap_or(b'a');
            for s in &mut streams {
                // A connection the server closed fails here: that is fine.
                let _ = s.write_all(&[byte]).await;
            }
            sent += 1;
            tokio::select! {
                () = stop.cancelled() => {}
                () = tokio::time::sleep(Duration::from_millis(200)) => {}
            }
        }
    })
}

async fn answers(addr: SocketAddr, path: &str, token: Option<&str>) -> Result<()> {
    wait_until(&format!("GET {path} to answer 200"), WAIT, || async {
        Ok(match request(addr, "GET", path, token, None, b"").await {
            Ok(r) if r.code == 200 => Some(()),
            _ => None,
        })
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn probes_metrics_and_the_api_answer_while_a_thousand_idle_and_trickling_connections_are_open() -> Result<()> {
    let nats = NatsServer::start().await?;
    let broker = Mosquitto::start().await?;
    let gw = gateway(&nats, &broker, &[]).await?;
    let addr = gw.listen();

    let idle = connect_many(addr, 1000).await?;
    let stop = CancellationToken::new();
    let slow = trickle(connect_many(addr, 100).await?, stop.clone());

    for path in ["/healthz", "/readyz", "/metrics"] {
        answers(addr, path, None).await.with_context(|| gw.log())?;
    }
    answers(addr, "/api/v1/status", Some(TOKEN)).await?;
    // The gateway made room by closing idle connections, and holds no more than its limit.
    let evicted = gw
        .wait_metric("fieldgate_management_connections_closed_total", &[("reason", "evicted")], WAIT, |v| v >= 800.0)
        .await?;
    // An evicted connection is closed by its own task, so the count of open sockets settles
    // at or below the limit shortly after the evictions.
    gw.wait_metric("fieldgate_management_connections", &[], WAIT, |v| v <= 256.0)
        .await
        .with_context(|| format!("more than 256 connections still open after {evicted} evictions"))?;

    stop.cancel();
    slow.await?;
    drop(idle);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_and_trickling_connections_are_closed_after_the_idle_timeout() -> Result<()> {
    let nats = NatsServer::start().await?;
    let broker = Mosquitto::start().await?;
    let gw = gateway(&nats, &broker, &["--management-idle-timeout=1s"]).await?;
    let addr = gw.listen();

    let mut idle = connect_many(addr, 20).await?;
    let stop = CancellationToken::new();
    let slow = trickle(connect_many(addr, 20).await?, stop.clone());
    // Every idle connection is closed by the server (reads end), without a request ever sent.
    for (i, s) in idle.iter_mut().enumerate() {
        let mut buf = [0u8; 64];
        let n = tokio::time::timeout(WAIT, s.read(&mut buf))
            .await
            .with_context(|| format!("idle connection {i} still open"))?
            .unwrap_or(0);
        ensure!(
            n == 0 || String::from_utf8_lossy(&buf[..n]).starts_with("HTTP/1.1 408"),
            "connection {i} got {n} bytes"
        );
    }
    // The trickling ones too: 40 closed for the idle timeout.
    gw.wait_metric("fieldgate_management_connections_closed_total", &[("reason", "idle_timeout")], WAIT, |v| v >= 40.0)
        .await?;
    stop.cancel();
    slow.await?;
    answers(addr, "/healthz", None).await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_connection_serves_a_bounded_number_of_requests_then_closes() -> Result<()> {
    let nats = NatsServer::start().await?;
    let broker = Mosquitto::start().await?;
    let gw = gateway(&nats, &broker, &[]).await?;
    let mut s = TcpStream::connect(gw.listen()).await?;
    // 1,001 keep-alive requests pipelined on one connection.
    let one = format!("GET /healthz HTTP/1.1\r\nHost: {}\r\n\r\n", gw.listen());
    s.write_all(one.repeat(1001).as_bytes()).await?;
    let mut answers = Vec::new();
    tokio::time::timeout(WAIT, s.read_to_end(&mut answers)).await.context("the connection stayed open")??;
    let text = String::from_utf8_lossy(&answers);
    let served = text.matches("HTTP/1.1 200 OK").count();
    ensure!(served == 1000, "{served} answers on one connection");
    let last = text.rsplit("HTTP/1.1 200 OK").next().unwrap_or_default().to_ascii_lowercase();
    ensure!(last.contains("connection: close"), "the last answer: {last}");
    gw.wait_metric("fieldgate_management_connections_closed_total", &[("reason", "request_limit")], WAIT, |v| v >= 1.0)
        .await?;
    Ok(())
}
