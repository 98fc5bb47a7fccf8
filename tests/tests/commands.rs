//! Commands from the cloud to devices, end to end: the uplink's command topic -> JetStream ->
//! the device's protocol -> results on `<command topic>/result`. Modbus writes are read back
//! from pymodbus (TCP and RTU on a pty line), CoAP PUTs land in libcoap's server, MQTT
//! commands on the device's field broker, TCP and UDP devices get a JSON line (UDP: at the
//! source of their last authenticated datagram). A command delivered twice runs once; an
//! expired one not at all; a read-only point is refused.
//!
//! Needs `cargo build --workspace --bins` first (the tests run the gateway binary).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use anyhow::{Context, Result, ensure};
use fieldgate_crds::GatewayDevice;
use fieldgate_tests::coap_peer::{CoapServer, coap_client};
use fieldgate_tests::commands::{WAIT, start_subscribed, wait_status};
use fieldgate_tests::config::{ConfigBuilder, mqtt_of};
use fieldgate_tests::listening::ListeningGateway;
use fieldgate_tests::pymodbus::{PtyPair, PyModbus, Transport, python};
use fieldgate_tests::{CloudSubscriber, Mosquitto, NatsServer};
use serde_json::{Value as Json, json};

fn device(v: Json) -> GatewayDevice {
    serde_json::from_value(v).unwrap()
}

/// Publishes command `body` to `device`'s command topic, as the cloud does.
async fn send_command(cloud: &CloudSubscriber, device: &str, body: Json) -> Result<()> {
    cloud.publish(&format!("fieldgate/default/{device}/commands"), body.to_string().into_bytes()).await
}

async fn holding_register(port: u16, unit: u8, address: u16) -> Result<i64> {
    let script = format!(
        "from pymodbus.client import ModbusTcpClient\nc = ModbusTcpClient('127.0.0.1', port={port})\nc.connect()\n\
         print(c.read_holding_registers({address}, count=1, device_id={unit}).registers[0])\n"
    );
    let out = tokio::process::Command::new(python()?).arg("-c").arg(script).output().await?;
    let text = String::from_utf8_lossy(&out.stdout);
    text.trim()
        .parse()
        .with_context(|| format!("pymodbus client said {text:?} {}", String::from_utf8_lossy(&out.stderr)))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn commands_reach_devices_once_and_report_their_results() -> Result<()> {
    let plc = PyModbus::start_tcp(false, &[(1, vec![10, 20])]).await?;
    let pty = PtyPair::start().await?;
    let _rtu = PyModbus::start(Transport::Serial(pty.b()), &[(3, vec![30])]).await?;
    let coap = CoapServer::start().await?;
    coap.put("/lamp", "0").await?;
    let field = Mosquitto::start().await?;
    let field_watch = CloudSubscriber::start(&field.url(), "field-watch", "plant/valve/set").await?;
    let nats = NatsServer::start().await?;
    let broker = Mosquitto::start().await?;
    let cloud = CloudSubscriber::start(&broker.url(), "cloud-commands", "fieldgate/#").await?;

    let devices = vec![
        device(json!({"name": "plc", "pollInterval": "300ms",
            "connection": {"modbusTcp": {"host": "127.0.0.1", "port": plc.port().unwrap(), "unitId": 1}},
            "points": [
                {"name": "setpoint", "type": "uint16", "access": "readWrite", "modbus": {"table": "holding", "address": 0}},
                {"name": "limit", "type": "uint16", "modbus": {"table": "holding", "address": 1}}]})),
        device(json!({"name": "rtu", "pollInterval": "300ms",
            "connection": {"modbusRtu": {"port": pty.a().display().to_string(), "unitId": 3, "timeout": "500ms"}},
            "points": [{"name": "sp", "type": "int16", "access": "readWrite", "modbus": {"table": "holding", "address": 0}}]})),
        device(json!({"name": "lamp", "pollInterval": "1s",
            "connection": {"coap": {"host": "127.0.0.1", "port": coap.addr.port(), "path": "/lamp"}},
            "points": [{"name": "level", "type": "float64", "access": "readWrite"}]})),
        device(json!({"name": "valve",
            "connection": {"mqtt": {"url": field.url(), "topics": ["plant/valve/state"], "commandTopic": "plant/valve/set"}},
            "points": [{"name": "open", "type": "bool", "access": "readWrite"}]})),
        device(json!({"name": "relay", "connection": {"tcp": {"tokenSecretRef": {"name": "relay"}}},
            "points": [{"name": "on", "type": "bool", "access": "readWrite"}]})),
    ];
    let config = ConfigBuilder::new()
        .devices(devices)
        .cloud(&broker.url(), |u| mqtt_of(u).command_topic = Some("fieldgate/{namespace}/{device}/commands".into()))
        .yaml()?;
    let mut gw = ListeningGateway::new(&nats.url())?;
    gw.gw.write_config(&config)?;
    gw.gw.write_secret("relay", "token", "r1")?;
    start_subscribed(&mut gw).await?;

    // A Modbus TCP write, read back by the gateway and by pymodbus's own client.
    send_command(&cloud, "plc", json!({"id": "c1", "point": "setpoint", "value": 1234, "ttl": "5m"})).await?;
    let s = wait_status(&cloud, &gw, "c1", "verified").await?;
    ensure!(s == ["accepted", "written", "verified"], "c1: {s:?}");
    ensure!(holding_register(plc.port().unwrap(), 1, 0).await? == 1234);

    // Delivered twice: executed once.
    send_command(&cloud, "plc", json!({"id": "c1", "point": "setpoint", "value": 999})).await?;
    wait_status(&cloud, &gw, "c1", "duplicate").await?;
    ensure!(holding_register(plc.port().unwrap(), 1, 0).await? == 1234, "a repeated command id was executed again");

    // Expired, read-only, unknown: not executed.
    send_command(
        &cloud,
        "plc",
        json!({"id": "c2", "point": "setpoint", "value": 7, "expiresAt": "2020-01-01T00:00:00Z"}),
    )
    .await?;
    wait_status(&cloud, &gw, "c2", "expired").await?;
    send_command(&cloud, "plc", json!({"id": "c3", "point": "limit", "value": 1})).await?;
    wait_status(&cloud, &gw, "c3", "refused: not_writable").await?;
    send_command(&cloud, "ghost", json!({"id": "c4", "point": "x", "value": 1})).await?;
    wait_status(&cloud, &gw, "c4", "refused: unknown_device").await?;
    ensure!(holding_register(plc.port().unwrap(), 1, 0).await? == 1234);
    ensure!(holding_register(plc.port().unwrap(), 1, 1).await? == 20, "a read-only point was written");

    // Modbus RTU on the shared line: written between polls and read back.
    send_command(&cloud, "rtu", json!({"id": "c5", "point": "sp", "value": -5})).await?;
    let s = wait_status(&cloud, &gw, "c5", "verified").await?;
    ensure!(s.last().map(String::as_str) == Some("verified"), "c5: {s:?}");

    // CoAP PUT to the device's resource (libcoap's server keeps it).
    send_command(&cloud, "lamp", json!({"id": "c6", "point": "level", "value": 3.5})).await?;
    wait_status(&cloud, &gw, "c6", "written").await?;
    let run = coap_client(&[&coap.uri("/lamp")], Duration::from_secs(20)).await?;
    ensure!(run.stdout.trim() == "3.5", "the lamp resource holds {:?}", run.text());

    // MQTT publish to the device's command topic on its field broker.
    send_command(&cloud, "valve", json!({"id": "c7", "point": "open", "value": true})).await?;
    wait_status(&cloud, &gw, "c7", "written").await?;
    field_watch
        .wait_for("the valve command on the field broker", WAIT, |msgs| {
            msgs.iter()
                .filter_map(|m| serde_json::from_slice::<Json>(&m.payload).ok())
                .any(|j| j["open"] == true && j["commandId"] == "c7")
        })
        .await?;

    // A frame on the live connection of a raw TCP device.
    use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
    let (r, mut w) = tokio::net::TcpStream::connect(gw.tcp).await?.into_split();
    let mut lines = BufReader::new(r).lines();
    w.write_all(b"id=default/relay token=r1\n").await?;
    let hello = tokio::time::timeout(WAIT, lines.next_line()).await??;
    ensure!(hello.as_deref() == Some("OK"), "{hello:?}");
    send_command(&cloud, "relay", json!({"id": "c8", "point": "on", "value": true})).await?;
    let frame = tokio::time::timeout(WAIT, lines.next_line()).await??.context("closed")?;
    let frame: Json = serde_json::from_str(&frame)?;
    ensure!(frame["command"] == "c8" && frame["point"] == "on" && frame["value"] == true, "{frame}");
    wait_status(&cloud, &gw, "c8", "written").await?;

    // The gateway's own polling sees the written values.
    cloud
        .wait_for("setpoint 1234 in the plc's telemetry", WAIT, |msgs| {
            msgs.iter().filter(|m| m.topic.ends_with("/telemetry")).filter_map(|m| m.json().ok()).any(|j| {
                j["device"] == "plc"
                    && j["points"]
                        .as_array()
                        .is_some_and(|ps| ps.iter().any(|p| p["name"] == "setpoint" && p["value"] == 1234))
            })
        })
        .await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn udp_commands_go_where_the_device_last_sent_from() -> Result<()> {
    let nats = NatsServer::start().await?;
    let broker = Mosquitto::start().await?;
    let cloud = CloudSubscriber::start(&broker.url(), "cloud-udp-commands", "fieldgate/#").await?;
    let udp_device = |name: &str| {
        device(json!({"name": name, "connection": {"udp": {"tokenSecretRef": {"name": name}}},
            "points": [{"name": "position", "type": "uint16", "access": "readWrite"}]}))
    };
    let config = ConfigBuilder::new()
        .devices(vec![udp_device("blinds"), udp_device("mute")])
        .cloud(&broker.url(), |u| mqtt_of(u).command_topic = Some("fieldgate/{namespace}/{device}/commands".into()))
        .yaml()?;
    let mut gw = ListeningGateway::new(&nats.url())?;
    gw.gw.write_config(&config)?;
    gw.gw.write_secret("blinds", "token", "b1")?;
    gw.gw.write_secret("mute", "token", "m1")?;
    start_subscribed(&mut gw).await?;
    // One datagram to the gateway's UDP listener, and the next one back (with its source).
    let exchange = async |socket: &tokio::net::UdpSocket, datagram: &[u8]| -> Result<String> {
        socket.send_to(datagram, gw.udp).await?;
        receive(socket, gw.udp).await
    };
    async fn receive(socket: &tokio::net::UdpSocket, from: std::net::SocketAddr) -> Result<String> {
        let mut buf = [0u8; 1024];
        let (n, src) = tokio::time::timeout(WAIT, socket.recv_from(&mut buf)).await.context("no datagram")??;
        ensure!(src == from, "a datagram from {src}, not from the gateway's listener {from}");
        Ok(String::from_utf8_lossy(&buf[..n]).into_owned())
    }
    let command = |text: &str, id: &str, value: u64| -> Result<()> {
        let line = text.strip_suffix('\n').context("a command is one line")?;
        let frame: Json = serde_json::from_str(line).with_context(|| format!("{text:?}"))?;
        ensure!(frame == json!({"command": id, "point": "position", "value": value}), "{frame}");
        Ok(())
    };

    // After an authenticated datagram, a command comes back to its source, from the port the
    // device sends to.
    let blinds = tokio::net::UdpSocket::bind("127.0.0.1:0").await?;
    ensure!(exchange(&blinds, b"id=default/blinds token=b1 position=10").await? == "OK\n");
    send_command(&cloud, "blinds", json!({"id": "u1", "point": "position", "value": 42, "ttl": "5m"})).await?;
    command(&receive(&blinds, gw.udp).await?, "u1", 42)?;
    let s = wait_status(&cloud, &gw, "u1", "written").await?;
    ensure!(s == ["accepted", "written"], "u1: {s:?}");

    // The device's address changes (a NAT rebinding): commands follow its latest
    // authenticated datagram, here a keep-alive with only id and token. A datagram with a
    // wrong token does not move them.
    let moved = tokio::net::UdpSocket::bind("127.0.0.1:0").await?;
    ensure!(exchange(&moved, b"id=default/blinds token=b1").await? == "OK\n");
    let intruder = tokio::net::UdpSocket::bind("127.0.0.1:0").await?;
    intruder.send_to(b"id=default/blinds token=guess position=1", gw.udp).await?;
    gw.wait_metric("fieldgate_ingress_rejected_total", &[("protocol", "udp"), ("reason", "unauthorized")], WAIT, |v| {
        v >= 1.0
    })
    .await?;
    send_command(&cloud, "blinds", json!({"id": "u2", "point": "position", "value": 7})).await?;
    command(&receive(&moved, gw.udp).await?, "u2", 7)?;
    wait_status(&cloud, &gw, "u2", "written").await?;
    let mut buf = [0u8; 64];
    ensure!(intruder.try_recv_from(&mut buf).is_err(), "the unauthenticated sender got a datagram");
    ensure!(blinds.try_recv_from(&mut buf).is_err(), "the device's old address got a datagram");

    // A device that never sent: nowhere to send to.
    send_command(&cloud, "mute", json!({"id": "u3", "point": "position", "value": 1})).await?;
    let s = wait_status(&cloud, &gw, "u3", "failed").await?;
    ensure!(s == ["accepted", "failed: not_connected"], "u3: {s:?}");
    Ok(())
}
