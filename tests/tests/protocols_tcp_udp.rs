//! Raw TCP and UDP devices end to end: identification with id and token from a Secret, one
//! live connection per id (a valid newer one replaces the older, a wrong token is refused),
//! quarantine of a flapping id, first-frame deadline, frame size limit, malformed frames
//! counted without disturbing other devices, and `OK` only once JetStream accepted.
//!
//! Needs `cargo build --workspace --bins` first (the tests run the gateway binary).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::{Context, Result, bail, ensure};
use fieldgate_crds::GatewayDevice;
use fieldgate_tests::config::ConfigBuilder;
use fieldgate_tests::listening::{ListeningGateway, wait_value};
use fieldgate_tests::{CloudSubscriber, Mosquitto, NatsServer};
use serde_json::{Value as Json, json};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};

const WAIT: Duration = Duration::from_secs(60);
const ANSWER: Duration = Duration::from_secs(20);

fn device(name: &str, connection: Json, points: Json) -> GatewayDevice {
    serde_json::from_value(json!({"name": name, "connection": connection, "points": points})).unwrap()
}

/// A line-oriented TCP device.
struct LineDevice {
    lines: tokio::io::Lines<BufReader<OwnedReadHalf>>,
    write: OwnedWriteHalf,
}

impl LineDevice {
    async fn connect(addr: SocketAddr) -> Result<Self> {
        let (r, w) = TcpStream::connect(addr).await?.into_split();
        Ok(Self { lines: BufReader::new(r).lines(), write: w })
    }

    async fn send(&mut self, line: &str) -> Result<()> {
        self.write.write_all(format!("{line}\n").as_bytes()).await?;
        Ok(())
    }

    /// The next answer line; `None` when the gateway closed the connection.
    async fn answer(&mut self) -> Result<Option<String>> {
        tokio::time::timeout(ANSWER, self.lines.next_line())
            .await
            .context("no answer in time")?
            .or_else(|e| if e.kind() == std::io::ErrorKind::ConnectionReset { Ok(None) } else { Err(e.into()) })
    }

    async fn exchange(&mut self, line: &str) -> Result<String> {
        self.send(line).await?;
        self.answer().await?.with_context(|| format!("closed after {line:?}"))
    }

    async fn expect_closed(&mut self) -> Result<()> {
        match self.answer().await? {
            None => Ok(()),
            Some(l) => bail!("expected the connection closed, got {l:?}"),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn raw_tcp_and_udp_devices_identify_deliver_and_are_policed() -> Result<()> {
    let nats = NatsServer::start().await?;
    let broker = Mosquitto::start().await?;
    let cloud = CloudSubscriber::start(&broker.url(), "cloud-raw", "fieldgate/#").await?;
    let devices = vec![
        device(
            "tcp-1",
            json!({"tcp": {"tokenSecretRef": {"name": "tcp-1"}}}),
            json!([{"name": "temp", "type": "float64"}, {"name": "count", "type": "uint32"}]),
        ),
        device(
            "tcp-2",
            json!({"tcp": {"id": "sensor-2", "tokenSecretRef": {"name": "tcp-2"}}}),
            json!([{"name": "temp", "type": "float64"}]),
        ),
        device(
            "udp-1",
            json!({"udp": {"tokenSecretRef": {"name": "udp-1", "key": "secret"}}}),
            json!([{"name": "level", "type": "float64"}]),
        ),
    ];
    let config = ConfigBuilder::new().devices(devices).cloud(&broker.url(), |_| {}).yaml()?;
    let mut gw = ListeningGateway::new(&nats.url())?;
    gw.gw.write_secret("tcp-1", "token", "t1-secret\n")?;
    gw.gw.write_secret("tcp-2", "token", "t2")?;
    gw.gw.write_secret("udp-1", "secret", "u1")?;
    gw.gw.write_config(&config)?;
    for a in ["--first-frame-timeout", "1s", "--max-frame-bytes", "256", "--flap-limit", "3", "--quarantine", "30s"] {
        gw.arg(a);
    }
    gw.start_ready().await?;

    // Identify with values in the first frame; JSON and line frames after it.
    let mut a = LineDevice::connect(gw.tcp).await?;
    assert_eq!(a.exchange("id=default/tcp-1 token=t1-secret temp=21.5 count=3").await?, "OK");
    wait_value(&cloud, &gw, "tcp-1", "temp", json!(21.5)).await?;
    assert_eq!(a.exchange(r#"{"temp":22.0}"#).await?, "OK");
    wait_value(&cloud, &gw, "tcp-1", "temp", json!(22.0)).await?;

    // Malformed frames: refused with their reason, the connection stays.
    assert_eq!(a.exchange("temp 21").await?, "ERR line");
    assert_eq!(a.exchange(r#"{"temp":"hot"}"#).await?, "ERR type");
    assert_eq!(a.exchange(r#"{"temp":"#).await?, "ERR json");
    assert_eq!(a.exchange("pressure=3").await?, "ERR no_points");
    assert_eq!(a.exchange("temp=23").await?, "OK");

    // The same id with a wrong token is refused; the live connection is untouched.
    let mut b = LineDevice::connect(gw.tcp).await?;
    assert_eq!(b.exchange("id=default/tcp-1 token=nope").await?, "ERR unauthorized");
    b.expect_closed().await?;
    assert_eq!(a.exchange("temp=24").await?, "OK");

    // The same id with the right token replaces the older connection, which is closed.
    let mut c = LineDevice::connect(gw.tcp).await?;
    assert_eq!(c.exchange(r#"{"id":"default/tcp-1","token":"t1-secret"}"#).await?, "OK");
    assert_eq!(a.answer().await?.as_deref(), Some("ERR replaced"));
    a.expect_closed().await?;
    assert_eq!(c.exchange("temp=25.5").await?, "OK");
    wait_value(&cloud, &gw, "tcp-1", "temp", json!(25.5)).await?;

    // Unknown ids, no id, a silent peer, an oversized frame: refused and counted.
    let mut d = LineDevice::connect(gw.tcp).await?;
    assert_eq!(d.exchange("id=ghost token=x").await?, "ERR unknown_device");
    let mut d = LineDevice::connect(gw.tcp).await?;
    assert_eq!(d.exchange("temp=1").await?, "ERR no_id");
    let mut silent = LineDevice::connect(gw.tcp).await?;
    silent.expect_closed().await?;
    let mut big = LineDevice::connect(gw.tcp).await?;
    big.write.write_all(&[b'x'; 400]).await?;
    assert_eq!(big.answer().await?.as_deref(), Some("ERR too_large"));
    for reason in ["unauthorized", "unknown_device", "no_id", "first_frame_timeout", "too_large"] {
        gw.wait_metric("fieldgate_ingress_rejected_total", &[("protocol", "tcp"), ("reason", reason)], WAIT, |v| {
            v >= 1.0
        })
        .await?;
    }
    assert_eq!(c.exchange("temp=26").await?, "OK", "the honest device was disturbed");

    // An id that keeps replacing itself is quarantined and reported.
    let mut last = None;
    for _ in 0..4 {
        let mut s = LineDevice::connect(gw.tcp).await?;
        let answer = s.exchange("id=sensor-2 token=t2").await?;
        last = Some((answer, s));
    }
    let (answer, _) = last.unwrap();
    ensure!(answer == "ERR quarantined", "the 4th connection in a row was answered {answer:?}");
    let mut again = LineDevice::connect(gw.tcp).await?;
    assert_eq!(again.exchange("id=sensor-2 token=t2").await?, "ERR quarantined");
    gw.wait_metric(
        "fieldgate_device_errors_total",
        &[("device", "default/tcp-2"), ("kind", "quarantined")],
        WAIT,
        |v| v >= 1.0,
    )
    .await?;
    ensure!(gw.stderr().contains("quarantined"), "quarantine not logged\n{}", gw.log());
    ensure!(gw.metric("fieldgate_ingress_connections", &[("protocol", "tcp")]).await? >= 1.0);

    // UDP: authenticated datagrams are answered OK once accepted; the rest is counted.
    let udp = tokio::net::UdpSocket::bind("127.0.0.1:0").await?;
    udp.connect(gw.udp).await?;
    let mut buf = [0u8; 512];
    udp.send(b"id=default/udp-1 token=u1 level=7.5").await?;
    let n = tokio::time::timeout(ANSWER, udp.recv(&mut buf)).await??;
    assert_eq!(&buf[..n], b"OK\n");
    wait_value(&cloud, &gw, "udp-1", "level", json!(7.5)).await?;
    udp.send(br#"{"id":"default/udp-1","token":"u1","level":"high"}"#).await?;
    let n = tokio::time::timeout(ANSWER, udp.recv(&mut buf)).await??;
    assert_eq!(&buf[..n], b"ERR type\n");
    udp.send(b"id=default/udp-1 token=bad level=1").await?;
    udp.send(b"\xff\xfe garbage").await?;
    udp.send(&[b'z'; 300]).await?;
    for reason in ["unauthorized", "not_utf8", "too_large"] {
        gw.wait_metric("fieldgate_ingress_rejected_total", &[("protocol", "udp"), ("reason", reason)], WAIT, |v| {
            v >= 1.0
        })
        .await?;
    }
    // The device beside the oversized datagram keeps delivering.
    udp.send(b"id=default/udp-1 token=u1 level=8.25").await?;
    let n = tokio::time::timeout(ANSWER, udp.recv(&mut buf)).await??;
    assert_eq!(&buf[..n], b"OK\n");
    wait_value(&cloud, &gw, "udp-1", "level", json!(8.25)).await?;
    Ok(())
}

/// At `--tcp-max-connections` a new connection is closed at once and counted
/// (`connection_cap`); the identified device holding a slot keeps delivering.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_beyond_the_tcp_cap_are_closed_and_counted_while_the_device_keeps_delivering() -> Result<()> {
    let nats = NatsServer::start().await?;
    let broker = Mosquitto::start().await?;
    let cloud = CloudSubscriber::start(&broker.url(), "cloud-tcp-cap", "fieldgate/#").await?;
    let devices = vec![device(
        "cap-1",
        json!({"tcp": {"tokenSecretRef": {"name": "cap-1"}}}),
        json!([{"name": "temp", "type": "float64"}]),
    )];
    let config = ConfigBuilder::new().devices(devices).cloud(&broker.url(), |_| {}).yaml()?;
    let mut gw = ListeningGateway::new(&nats.url())?;
    gw.gw.write_secret("cap-1", "token", "c1")?;
    gw.gw.write_config(&config)?;
    for a in ["--tcp-max-connections", "4", "--first-frame-timeout", "120s"] {
        gw.arg(a);
    }
    gw.start_ready().await?;

    let mut honest = LineDevice::connect(gw.tcp).await?;
    assert_eq!(honest.exchange("id=default/cap-1 token=c1 temp=1.5").await?, "OK");
    wait_value(&cloud, &gw, "cap-1", "temp", json!(1.5)).await?;
    // Three silent connections take the other slots (the first-frame deadline is long).
    let mut silent = Vec::new();
    for _ in 0..3 {
        silent.push(TcpStream::connect(gw.tcp).await?);
    }
    gw.wait_metric("fieldgate_ingress_connections", &[("protocol", "tcp")], WAIT, |v| v >= 4.0).await?;
    // Beyond the cap: closed at once, each counted.
    for _ in 0..5 {
        let mut extra = LineDevice::connect(gw.tcp).await?;
        extra.expect_closed().await?;
    }
    gw.wait_metric(
        "fieldgate_ingress_rejected_total",
        &[("protocol", "tcp"), ("reason", "connection_cap")],
        WAIT,
        |v| v >= 5.0,
    )
    .await?;
    assert_eq!(honest.exchange("temp=2.75").await?, "OK", "the identified device was disturbed");
    wait_value(&cloud, &gw, "cap-1", "temp", json!(2.75)).await?;
    // A slot freed is a slot usable again.
    drop(silent);
    gw.wait_metric("fieldgate_ingress_connections", &[("protocol", "tcp")], WAIT, |v| v <= 1.0).await?;
    let mut again = LineDevice::connect(gw.tcp).await?;
    assert_eq!(again.exchange("id=default/cap-1 token=c1 temp=3.5").await?, "OK");
    wait_value(&cloud, &gw, "cap-1", "temp", json!(3.5)).await?;
    Ok(())
}

/// Idle identified connections are parked off the runtime (`--tcp-park-after`, at once by
/// default) and come back for a frame, a replacement, the peer's close and the device's removal.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_tcp_connections_park_and_wake() -> Result<()> {
    let nats = NatsServer::start().await?;
    let broker = Mosquitto::start().await?;
    let cloud = CloudSubscriber::start(&broker.url(), "cloud-park", "fieldgate/#").await?;
    let dev = || {
        device(
            "park-1",
            json!({"tcp": {"tokenSecretRef": {"name": "park"}}}),
            json!([{"name": "v", "type": "float64"}]),
        )
    };
    let config = ConfigBuilder::new().devices(vec![dev()]).cloud(&broker.url(), |_| {}).yaml()?;
    let mut gw = ListeningGateway::new(&nats.url())?;
    gw.gw.write_secret("park", "token", "p")?;
    gw.gw.write_config(&config)?;
    gw.start_ready().await?;
    let tcp = [("protocol", "tcp")];
    let gauges = |open: f64, parked: f64| {
        let gw = &gw;
        async move {
            gw.wait_metric("fieldgate_ingress_connections", &tcp, WAIT, |v| v == open).await?;
            gw.wait_metric("fieldgate_ingress_parked_connections", &tcp, WAIT, |v| v == parked).await
        }
    };

    // Identified and silent: parked.
    let mut a = LineDevice::connect(gw.tcp).await?;
    assert_eq!(a.exchange("id=default/park-1 token=p").await?, "OK");
    gauges(1.0, 1.0).await?;
    // A frame wakes it; it is answered after JetStream accepted it, and parks again.
    assert_eq!(a.exchange("v=1.5").await?, "OK");
    wait_value(&cloud, &gw, "park-1", "v", json!(1.5)).await?;
    gauges(1.0, 1.0).await?;
    // A partial frame stays with the parked connection until its end arrives.
    a.write.write_all(b"v=2").await?;
    gauges(1.0, 1.0).await?;
    assert_eq!(a.exchange(".5").await?, "OK");
    wait_value(&cloud, &gw, "park-1", "v", json!(2.5)).await?;

    // A newer connection replaces the parked one, which is told and closed.
    let mut b = LineDevice::connect(gw.tcp).await?;
    assert_eq!(b.exchange("id=default/park-1 token=p").await?, "OK");
    assert_eq!(a.answer().await?.as_deref(), Some("ERR replaced"));
    a.expect_closed().await?;
    gauges(1.0, 1.0).await?;
    // The peer closing a parked connection frees it.
    drop(b);
    gauges(0.0, 0.0).await?;

    // Removing the device closes its parked connection.
    let mut c = LineDevice::connect(gw.tcp).await?;
    assert_eq!(c.exchange("id=default/park-1 token=p").await?, "OK");
    gauges(1.0, 1.0).await?;
    let empty = ConfigBuilder::new().devices(vec![]).cloud(&broker.url(), |_| {}).yaml()?;
    gw.gw.write_config(&empty)?;
    c.expect_closed().await.with_context(|| gw.log())?;
    gauges(0.0, 0.0).await?;
    Ok(())
}
