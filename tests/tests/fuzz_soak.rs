//! The fuzz targets' committed seed corpora (`fuzz/corpus/`) thrown at a live gateway over real
//! sockets — CoAP, raw TCP and UDP listeners, MQTT ingest through the field broker, the command
//! topic, the management API — while simulated Modbus devices are polled. The judge is what the
//! devices served against what the cloud broker received: every sample arrives, polling goes on
//! during and after the barrage, and the gateway stays up and ready.
//!
//! Needs `cargo build --workspace --bins` first (the test runs the gateway binary).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result, anyhow, ensure};
use fieldgate_crds::GatewayDevice;
use fieldgate_gateway::secrets::SecretStore;
use fieldgate_tests::config::ConfigBuilder;
use fieldgate_tests::listening::ListeningGateway;
use fieldgate_tests::metrics::http_get;
use fieldgate_tests::{CloudSubscriber, Mosquitto, NatsServer, SimFleet, api, delivery_report, wait_until};
use rumqttc::{AsyncClient, MqttOptions, QoS};
use serde_json::{Value as Json, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const WAIT: Duration = Duration::from_secs(30);
/// Deadline of one exchange on one door (a connection's answers, a publish).
const EXCHANGE: Duration = Duration::from_secs(5);
/// The token of the corpora's pushing devices (`fuzz/src/lib.rs`).
const TOKEN: &str = "s3cret-token";
const API_TOKEN: &str = "soak-api-token-0123456789";

/// Every seed of one target: `(file name, bytes)`.
fn corpus(target: &str) -> Result<Vec<(String, Vec<u8>)>> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz/corpus").join(target);
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .with_context(|| format!("reading {}", dir.display()))?
        .map(|e| e.map(|e| e.path()))
        .collect::<std::io::Result<_>>()?;
    files.sort();
    ensure!(!files.is_empty(), "no seeds in {}", dir.display());
    files
        .into_iter()
        .map(|f| Ok((f.file_name().unwrap_or_default().to_string_lossy().into_owned(), std::fs::read(&f)?)))
        .collect()
}

/// The messages of one seed: the targets cut an input at every `ff 00` pair.
fn messages(data: &[u8]) -> Vec<&[u8]> {
    let mut out = Vec::new();
    let mut start = 0;
    let mut i = 0;
    while i + 1 < data.len() {
        if data[i] == 0xff && data[i + 1] == 0x00 {
            out.push(&data[start..i]);
            start = i + 2;
            i += 2;
        } else {
            i += 1;
        }
    }
    out.push(&data[start..]);
    out
}

fn device(name: &str, connection: Json) -> GatewayDevice {
    // The points of the targets' pushing devices.
    let points = json!([
        {"name": "temperature", "type": "float64", "scale": 0.1, "offset": -40.0},
        {"name": "count", "type": "uint32"},
        {"name": "delta", "type": "int16"},
        {"name": "on", "type": "bool"},
        {"name": "label", "type": "string"},
        {"name": "nested", "type": "float64", "path": "a.b.0.c"}
    ]);
    serde_json::from_value(json!({"name": name, "connection": connection, "points": points})).unwrap()
}

/// Samples each simulated device served so far.
fn served_counts(fleet: &SimFleet) -> Vec<usize> {
    fleet.served().values().map(Vec::len).collect()
}

/// Waits until every simulated device served `more` samples beyond `from` and the cloud
/// received each of them.
async fn devices_keep_delivering(fleet: &SimFleet, cloud: &CloudSubscriber, from: &[usize], more: usize) -> Result<()> {
    wait_until("every healthy device to serve and deliver more samples", WAIT, || async {
        let now = served_counts(fleet);
        if now.iter().zip(from).any(|(n, f)| *n < f + more) {
            return Ok(None);
        }
        let report = delivery_report(&fleet.served(), &cloud.keys()?);
        Ok((report.lost.values().map(Vec::len).sum::<usize>() == 0).then_some(()))
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_fuzz_corpora_on_every_door_leave_healthy_devices_delivering() -> Result<()> {
    let nats = NatsServer::start().await?;
    let cloud_broker = Mosquitto::start().await?;
    let field = Mosquitto::start().await?;
    let cloud = CloudSubscriber::start(&cloud_broker.url(), "cloud-soak", "fieldgate/+/+/telemetry").await?;
    let mut fleet = SimFleet::healthy(2).await?;
    let mut devices = fleet.gateway_devices("200ms");
    devices.push(device("coap-dev", json!({"coap": {"pushPath": "/dev", "tokenSecretRef": {"name": "push"}}})));
    devices.push(device("coap-open", json!({"coap": {"pushPath": "/open"}})));
    devices.push(device("tcp-dev", json!({"tcp": {"id": "dev", "tokenSecretRef": {"name": "push"}}})));
    devices.push(device("udp-dev", json!({"udp": {"id": "dev", "tokenSecretRef": {"name": "push"}}})));
    devices.push(device("field", json!({"mqtt": {"url": field.url(), "topics": ["plant/field/#"]}})));
    let config = ConfigBuilder::new()
        .devices(devices)
        .cloud(&cloud_broker.url(), |u| {
            fieldgate_tests::config::mqtt_of(u).command_topic = Some("fieldgate/{namespace}/{device}/commands".into())
        })
        .yaml()?;
    let mut gw = ListeningGateway::new(&nats.url())?;
    gw.gw.write_secret("push", "token", TOKEN)?;
    gw.gw.write_config(&config)?;
    gw.gw.api_token(API_TOKEN)?;
    gw.start_ready().await?;
    // The MQTT device subscribed to the field broker before anything is published there.
    gw.gw
        .wait_metric("fieldgate_device_connected", &[("device", "default/field")], WAIT, |v| v >= 1.0)
        .await
        .with_context(|| gw.log())?;
    let start = served_counts(&fleet);
    devices_keep_delivering(&fleet, &cloud, &start, 3).await.with_context(|| gw.log())?;
    let before = served_counts(&fleet);
    let mut sent = 0usize;

    // CoAP push listener and raw UDP listener: every message of a seed is one datagram.
    let udp = tokio::net::UdpSocket::bind("127.0.0.1:0").await?;
    for (target, door) in [("coap_listener", gw.coap), ("udp_datagram", gw.udp)] {
        for (_, seed) in corpus(target)? {
            for datagram in messages(&seed) {
                udp.send_to(datagram, door).await?;
                sent += 1;
            }
        }
    }

    // Raw TCP listener: one connection per seed, its messages written as separate reads,
    // then the write side closed; the gateway answers and closes within the deadline.
    for (name, seed) in corpus("tcp_frames")? {
        let mut s = tokio::net::TcpStream::connect(gw.tcp).await?;
        for read in messages(&seed) {
            // The gateway may already have closed (a refused identification): that is an answer.
            if s.write_all(read).await.is_err() {
                break;
            }
            s.flush().await?;
        }
        let _ = s.shutdown().await;
        let mut answers = Vec::new();
        tokio::time::timeout(EXCHANGE, s.read_to_end(&mut answers))
            .await
            .map_err(|_| anyhow!("tcp seed {name}: the connection was not closed within {EXCHANGE:?}"))?
            .or_else(|e| if e.kind() == std::io::ErrorKind::ConnectionReset { Ok(0) } else { Err(e) })?;
        sent += 1;
    }

    // MQTT ingest through the field broker (body, then the topic's last level after a
    // newline), and the cloud's command topic (to a healthy device).
    let mut o = MqttOptions::new("soak-field-device", "127.0.0.1", field.port());
    o.set_max_packet_size(1 << 20, 1 << 20);
    let (client, mut events) = AsyncClient::new(o, 64);
    let poller = tokio::spawn(async move { while events.poll().await.is_ok() {} });
    for (_, seed) in corpus("mqtt_payload")? {
        let (body, level) = match seed.iter().position(|b| *b == b'\n') {
            Some(i) => {
                (seed[..i].to_vec(), String::from_utf8_lossy(&seed[i + 1..]).rsplit('/').next().map(String::from))
            }
            None => (seed.clone(), None),
        };
        let level = level.filter(|l| !l.is_empty() && !l.contains(['+', '#'])).unwrap_or_else(|| "state".into());
        client.publish(format!("plant/field/{level}"), QoS::AtLeastOnce, false, body).await?;
        sent += 1;
    }
    let healthy = &fleet.devices()[0].name;
    for (_, seed) in corpus("command")? {
        cloud.publish(&format!("fieldgate/default/{healthy}/commands"), seed).await?;
        sent += 1;
    }

    // Management API: log-level bodies as JSON and as text; config bodies that the
    // gateway's own check refuses (an accepted one would replace the running config, which
    // is that endpoint's purpose, not hostile input).
    let node_secrets = SecretStore::new(gw.gw.secrets_dir());
    let mut config_bodies: Vec<Vec<u8>> = corpus("config")?.into_iter().map(|(_, b)| b).collect();
    for (_, seed) in corpus("management")? {
        let Some((&selector, body)) = seed.split_first() else { continue };
        let (path, content_type) = match selector % 3 {
            0 => ("/api/v1/log-level", "application/json"),
            1 => ("/api/v1/log-level", "text/plain"),
            _ => {
                config_bodies.push(body.to_vec());
                continue;
            }
        };
        let r = api::request(gw.gw.listen(), "PUT", path, Some(API_TOKEN), Some(content_type), body).await?;
        ensure!(r.code < 500, "PUT {path} answered {}: {}", r.code, r.body);
        sent += 1;
    }
    for body in config_bodies {
        let text = String::from_utf8_lossy(&body);
        if fieldgate_gateway::app::check_config(&text, "soak", "node", &node_secrets).is_ok() {
            continue;
        }
        let r = api::request(gw.gw.listen(), "PUT", "/api/v1/config", Some(API_TOKEN), Some("application/yaml"), &body)
            .await?;
        ensure!(r.code == 422 || r.code == 400, "an invalid config was answered {}: {}", r.code, r.body);
        sent += 1;
    }
    // The log level back to what the other checks expect to read.
    api::request(gw.gw.listen(), "PUT", "/api/v1/log-level", Some(API_TOKEN), Some("text/plain"), b"info").await?;
    println!("soak: {sent} hostile messages and connections sent");

    // The healthy devices kept being polled through the barrage and still are, every sample
    // served reached the cloud, and the gateway is up and ready.
    devices_keep_delivering(&fleet, &cloud, &before, 5).await.with_context(|| gw.log())?;
    // The valid seeds among the hostile ones went through every door.
    wait_until("a reading from each door's valid seeds", WAIT, || async {
        let keys = cloud.keys()?;
        let missing: Vec<&str> = ["coap-dev", "coap-open", "tcp-dev", "udp-dev", "field"]
            .into_iter()
            .filter(|d| !keys.iter().any(|k| k.device == format!("default/{d}")))
            .collect();
        if missing.is_empty() { Ok(Some(())) } else { Err(anyhow!("no reading yet from {missing:?}")) }
    })
    .await
    .with_context(|| gw.log())?;
    let (code, body) = http_get(gw.gw.listen(), "/readyz").await?;
    ensure!(code == 200, "not ready after the barrage: {code} {body}\n{}", gw.log());
    ensure!(gw.rss_kib().is_some(), "the gateway exited\n{}", gw.log());
    fleet.stop().await;
    wait_until("every served sample in the cloud", WAIT, || async {
        let report = delivery_report(&fleet.served(), &cloud.keys()?);
        Ok((report.lost.is_empty() && report.unknown.is_empty()).then_some(report))
    })
    .await
    .with_context(|| {
        format!("{}\n{}", delivery_report(&fleet.served(), &cloud.keys().unwrap_or_default()), gw.log())
    })?;
    poller.abort();
    Ok(())
}
