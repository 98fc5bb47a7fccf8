//! Commands act only where they may, through the device's own connection, exactly once —
//! judged at the devices (the simulator counts the writes it served and the connections it
//! refused; the field broker shows what it received), never from the gateway's metrics.
//!
//! Needs `cargo build --workspace --bins` first (the tests run the gateway binary).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use anyhow::{Context, Result, ensure};
use fieldgate_crds::GatewayDevice;
use fieldgate_sim::{self as sim, Fault, SimDevice};
use fieldgate_tests::commands::{WAIT, start_subscribed, statuses, wait_status};
use fieldgate_tests::config::{ConfigBuilder, mqtt_of};
use fieldgate_tests::listening::ListeningGateway;
use fieldgate_tests::mosquitto::MosquittoOptions;
use fieldgate_tests::{CloudMessage, CloudSubscriber, Mosquitto, NatsServer, wait_until};
use serde_json::{Value as Json, json};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

const TEMPLATE: &str = "fieldgate/{namespace}/{device}/commands";

/// A simulated Modbus device served on a free port until the guard is dropped.
struct Served {
    device: SimDevice,
    port: u16,
    _stop: tokio_util::sync::DropGuard,
}

async fn serve(device: SimDevice) -> Result<Served> {
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let port = listener.local_addr()?.port();
    let cancel = CancellationToken::new();
    tokio::spawn(sim::serve(listener, device.clone(), cancel.clone()));
    Ok(Served { device, port, _stop: cancel.drop_guard() })
}

/// A Modbus device with a writable `setpoint` (holding 0) and a read-only `limit` (holding 1).
fn modbus(namespace: &str, name: &str, port: u16, poll: &str, timeout: &str) -> GatewayDevice {
    serde_json::from_value(json!({"namespace": namespace, "name": name, "pollInterval": poll,
        "connection": {"modbusTcp": {"host": "127.0.0.1", "port": port, "unitId": 1, "timeout": timeout}},
        "points": [
            {"name": "setpoint", "type": "uint16", "access": "readWrite", "modbus": {"table": "holding", "address": 0}},
            {"name": "limit", "type": "uint16", "modbus": {"table": "holding", "address": 1}}]}))
    .unwrap()
}

async fn command(cloud: &CloudSubscriber, namespace: &str, device: &str, body: &Json) -> Result<()> {
    cloud.publish(&format!("fieldgate/{namespace}/{device}/commands"), body.to_string().into_bytes()).await
}

async fn refused(gw: &ListeningGateway, reason: &str, at_least: f64) -> Result<()> {
    gw.wait_metric("fieldgate_commands_total", &[("status", "refused"), ("reason", reason)], WAIT, |v| v >= at_least)
        .await
        .map(|_| ())
        .with_context(|| format!("refusals {reason}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn commands_for_other_namespaces_unselected_devices_or_read_only_points_are_refused_and_never_executed()
-> Result<()> {
    let mine = serve(SimDevice::new(1, 0)).await?;
    let unselected = serve(SimDevice::new(2, 0)).await?;
    let theirs = serve(SimDevice::new(3, 0)).await?;
    let nats = NatsServer::start().await?;
    let broker = Mosquitto::start().await?;
    // The same broker carries every namespace's commands. The gateway's persistent command
    // session already holds a wildcard subscription over every namespace (as an older
    // version left it), so the broker does deliver namespace b's commands to it.
    {
        let stale = CloudSubscriber::start(&broker.url(), "gw-a-commands", "fieldgate/+/+/commands").await?;
        stale.close().await;
    }
    let cloud = CloudSubscriber::start(&broker.url(), "cloud-isolation", "fieldgate/#").await?;
    let config = ConfigBuilder::new()
        .devices(vec![
            modbus("a", "valve", mine.port, "200ms", "500ms"),
            modbus("a", "pump", unselected.port, "200ms", "500ms"),
            modbus("b", "valve", theirs.port, "200ms", "500ms"),
        ])
        .cloud(&broker.url(), |u| {
            u.namespace = "a".into();
            // Rendered by the operator: the uplink's selector matches a/valve only.
            u.devices = Some(vec!["valve".into()]);
            mqtt_of(u).protocol_version = Some(3);
            mqtt_of(u).client_id = Some("gw-a".into());
            mqtt_of(u).command_topic = Some(TEMPLATE.into());
        })
        .yaml()?;
    let mut gw = ListeningGateway::new(&nats.url())?;
    gw.gw.write_config(&config)?;
    start_subscribed(&mut gw).await?;

    command(&cloud, "b", "valve", &json!({"id": "x1", "point": "setpoint", "value": 11})).await?;
    command(&cloud, "a", "pump", &json!({"id": "x2", "point": "setpoint", "value": 12})).await?;
    command(&cloud, "a", "valve", &json!({"id": "x3", "point": "limit", "value": 13})).await?;
    command(&cloud, "a", "valve", &json!({"id": "x4", "point": "setpoint", "value": 14})).await?;
    ensure!(wait_status(&cloud, &gw, "x1", "refused").await? == ["refused: other_namespace"]);
    // (Both subscriptions match a/pump: the broker may deliver it twice.)
    let s = wait_status(&cloud, &gw, "x2", "refused").await?;
    ensure!(s.iter().all(|s| s == "refused: not_selected"), "x2: {s:?}");
    wait_status(&cloud, &gw, "x3", "refused: not_writable").await?;
    wait_status(&cloud, &gw, "x4", "verified").await?;
    refused(&gw, "other_namespace", 1.0).await?;
    refused(&gw, "not_selected", 1.0).await?;
    refused(&gw, "not_writable", 1.0).await?;

    // At the devices: only the selected device's writable point was written.
    ensure!(mine.device.writes() == 1 && mine.device.holding(0) == Some(14), "a/valve: {}", mine.device.writes());
    ensure!(unselected.device.writes() == 0, "the unselected device was written");
    ensure!(theirs.device.writes() == 0, "namespace b's device was written");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_command_reaches_an_mqtt_device_behind_a_broker_that_requires_a_password() -> Result<()> {
    let field = Mosquitto::start_with(MosquittoOptions {
        password: Some(("gateway".into(), "s3cret".into())),
        ..Default::default()
    })
    .await?;
    let secure = field.secure_url().context("no password listener")?;
    // The plant's own view of the broker (its anonymous listener).
    let plant = CloudSubscriber::start(&field.url(), "plant", "plant/valve/set").await?;
    let nats = NatsServer::start().await?;
    let broker = Mosquitto::start().await?;
    let cloud = CloudSubscriber::start(&broker.url(), "cloud-mqtt-device", "fieldgate/#").await?;
    let valve: GatewayDevice = serde_json::from_value(json!({"name": "valve",
        "connection": {"mqtt": {"url": secure, "topics": ["plant/valve/state"], "commandTopic": "plant/valve/set",
            "auth": {"secretRef": {"name": "field"}}}},
        "points": [{"name": "open", "type": "bool", "access": "readWrite"}]}))?;
    let config = ConfigBuilder::new()
        .devices(vec![valve])
        .cloud(&broker.url(), |u| mqtt_of(u).command_topic = Some(TEMPLATE.into()))
        .yaml()?;
    let mut gw = ListeningGateway::new(&nats.url())?;
    gw.gw.write_config(&config)?;
    gw.gw.write_secret("field", "username", "gateway")?;
    gw.gw.write_secret("field", "password", "s3cret\n")?;
    start_subscribed(&mut gw).await?;

    command(&cloud, "default", "valve", &json!({"id": "m1", "point": "open", "value": true, "ttl": "1m"})).await?;
    let s = wait_status(&cloud, &gw, "m1", "written").await?;
    ensure!(s == ["accepted", "written"], "m1: {s:?}");
    plant
        .wait_for("the command on the field broker", WAIT, |msgs| {
            msgs.iter()
                .filter_map(|m| serde_json::from_slice::<Json>(&m.payload).ok())
                .any(|j| j == json!({"open": true, "commandId": "m1"}))
        })
        .await
        .with_context(|| field.log_tail())?;
    Ok(())
}

/// Telemetry readings of `device` received so far.
fn readings_of(msgs: &[CloudMessage], device: &str) -> usize {
    msgs.iter().filter(|m| m.topic == format!("fieldgate/default/{device}/telemetry")).count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_modbus_write_rides_the_pollers_only_connection_and_polling_goes_on() -> Result<()> {
    let plc = serve(SimDevice::new(0, 0).with_single_connection()).await?;
    let nats = NatsServer::start().await?;
    let broker = Mosquitto::start().await?;
    let cloud = CloudSubscriber::start(&broker.url(), "cloud-one-connection", "fieldgate/#").await?;
    let config = ConfigBuilder::new()
        .devices(vec![modbus("default", "plc", plc.port, "100ms", "500ms")])
        .cloud(&broker.url(), |u| mqtt_of(u).command_topic = Some(TEMPLATE.into()))
        .yaml()?;
    let mut gw = ListeningGateway::new(&nats.url())?;
    gw.gw.write_config(&config)?;
    start_subscribed(&mut gw).await?;
    cloud.wait_for("the plc polled", WAIT, |msgs| readings_of(msgs, "plc") >= 5).await?;

    for (i, value) in [(1, 4321), (2, 1234), (3, 777)] {
        let id = format!("w{i}");
        command(&cloud, "default", "plc", &json!({"id": id, "point": "setpoint", "value": value})).await?;
        let s = wait_status(&cloud, &gw, &id, "verified").await?;
        ensure!(s == ["accepted", "written", "verified"], "{id}: {s:?}");
        ensure!(plc.device.holding(0) == Some(value), "the device holds {:?}", plc.device.holding(0));
    }
    // Polling goes on after the writes and reads the last value.
    let before = readings_of(&cloud.messages(), "plc");
    cloud.wait_for("the plc still polled", WAIT, |msgs| readings_of(msgs, "plc") >= before + 10).await?;
    cloud.wait_value("plc", "setpoint", &json!(777), WAIT).await?;
    // The device served no second connection: the writes went over the poller's.
    ensure!(plc.device.refused_connections() == 0, "{} connection(s) refused", plc.device.refused_connections());
    ensure!(plc.device.writes() == 3, "{} writes", plc.device.writes());
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_command_delivered_twice_across_a_crash_after_the_device_write_is_written_once() -> Result<()> {
    let plc = serve(SimDevice::new(0, 0).with_single_connection()).await?;
    let nats = NatsServer::start().await?;
    let broker = Mosquitto::start().await?;
    let cloud = CloudSubscriber::start(&broker.url(), "cloud-crash", "fieldgate/#").await?;
    let config = ConfigBuilder::new()
        .devices(vec![modbus("default", "plc", plc.port, "200ms", "5s")])
        .cloud(&broker.url(), |u| mqtt_of(u).command_topic = Some(TEMPLATE.into()))
        .yaml()?;
    let mut gw = ListeningGateway::new(&nats.url())?;
    gw.gw.write_config(&config)?;
    start_subscribed(&mut gw).await?;

    // The device stores the write and never answers it: the gateway is killed right after
    // the write reached the device, before it could record the outcome.
    plc.device.hang_after_write(true);
    let body = json!({"id": "once", "point": "setpoint", "value": 4242, "ttl": "10m"});
    command(&cloud, "default", "plc", &body).await?;
    wait_until("the write at the device", WAIT, || async { Ok((plc.device.writes() >= 1).then_some(())) }).await?;
    command(&cloud, "default", "plc", &body).await?;
    wait_status(&cloud, &gw, "once", "duplicate").await?;
    gw.kill();
    plc.device.hang_after_write(false);

    start_subscribed(&mut gw).await?;
    wait_status(&cloud, &gw, "once", "verified").await?;
    command(&cloud, "default", "plc", &body).await?;
    cloud
        .wait_for("a second duplicate answer", WAIT, |msgs| {
            statuses(msgs, "once").iter().filter(|s| s.as_str() == "duplicate").count() >= 2
        })
        .await?;
    ensure!(plc.device.holding(0) == Some(4242));
    ensure!(plc.device.writes() == 1, "the command was written {} times", plc.device.writes());
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_device_that_never_answers_does_not_hold_up_commands_to_ten_others() -> Result<()> {
    let mute = serve(SimDevice::new(99, 0).with_fault(Fault::Timeout)).await?;
    let mut others = Vec::new();
    for i in 0..10 {
        others.push(serve(SimDevice::new(i, 0)).await?);
    }
    let nats = NatsServer::start().await?;
    let broker = Mosquitto::start().await?;
    let cloud = CloudSubscriber::start(&broker.url(), "cloud-mute", "fieldgate/#").await?;
    let mut devices = vec![modbus("default", "mute", mute.port, "1s", "20s")];
    devices.extend(others.iter().enumerate().map(|(i, s)| modbus("default", &format!("d{i}"), s.port, "1s", "1s")));
    let config = ConfigBuilder::new()
        .devices(devices)
        .cloud(&broker.url(), |u| mqtt_of(u).command_topic = Some(TEMPLATE.into()))
        .yaml()?;
    let mut gw = ListeningGateway::new(&nats.url())?;
    gw.gw.write_config(&config)?;
    start_subscribed(&mut gw).await?;

    // Several commands queue up behind the silent device first.
    for i in 0..3 {
        command(&cloud, "default", "mute", &json!({"id": format!("mute{i}"), "point": "setpoint", "value": i})).await?;
    }
    for i in 0..10 {
        command(
            &cloud,
            "default",
            &format!("d{i}"),
            &json!({"id": format!("ok{i}"), "point": "setpoint", "value": 100 + i}),
        )
        .await?;
    }
    for i in 0..10 {
        wait_status(&cloud, &gw, &format!("ok{i}"), "verified").await?;
    }
    // Meanwhile the silent device's first command still waits for its answer (20 s).
    let mute0 = statuses(&cloud.messages(), "mute0");
    ensure!(mute0 == ["accepted"], "the silent device's command finished before the others: {mute0:?}");
    for (i, s) in others.iter().enumerate() {
        ensure!(s.device.holding(0) == Some(100 + i as u16) && s.device.writes() == 1, "d{i}");
    }
    // The silent device's commands end too, with a reason.
    let s = wait_status(&cloud, &gw, "mute0", "failed").await?;
    ensure!(s.last().map(String::as_str) == Some("failed: timeout"), "mute0: {s:?}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_command_payloads_are_refused_and_counted_and_nothing_breaks() -> Result<()> {
    let plc = serve(SimDevice::new(0, 0)).await?;
    let nats = NatsServer::start().await?;
    let broker = Mosquitto::start().await?;
    let cloud = CloudSubscriber::start(&broker.url(), "cloud-hostile", "fieldgate/#").await?;
    let config = ConfigBuilder::new()
        .devices(vec![modbus("default", "plc", plc.port, "200ms", "500ms")])
        .cloud(&broker.url(), |u| mqtt_of(u).command_topic = Some(TEMPLATE.into()))
        .yaml()?;
    let mut gw = ListeningGateway::new(&nats.url())?;
    gw.gw.write_config(&config)?;
    start_subscribed(&mut gw).await?;

    let topic = "fieldgate/default/plc/commands";
    let hostile: Vec<Vec<u8>> = vec![
        br#"{"id": 7, "point": "setpoint", "value": 1}"#.to_vec(),
        br#"{"id": "h2", "point": "setpoint", "value": [1, 2]}"#.to_vec(),
        br#"{"id": "h3", "point": "setpoint", "value": 1, "namespace": "b", "device": "x"}"#.to_vec(),
        br#"{"id": "h4", "point": "setpoint", "value": 1e999}"#.to_vec(),
        br#"[1, 2, 3]"#.to_vec(),
        vec![0xff, 0xfe, 0x00, 0x7b],
        format!(r#"{{"id": "h7", "point": "setpoint", "value": "{}"}}"#, "x".repeat(5000)).into_bytes(),
        format!(r#"{{"id": "{}", "point": "setpoint", "value": 1}}"#, "i".repeat(300)).into_bytes(),
        vec![b'{'; 1 << 20],
    ];
    let malformed = hostile.len() - 1;
    for payload in hostile {
        cloud.publish(topic, payload).await?;
    }
    // Valid JSON, but a value the point cannot hold: refused when it is executed.
    command(&cloud, "default", "plc", &json!({"id": "h9", "point": "setpoint", "value": 1e300})).await?;
    command(&cloud, "default", "plc", &json!({"id": "h10", "point": "setpoint", "value": -1})).await?;
    refused(&gw, "malformed", malformed as f64).await?;
    refused(&gw, "too_large", 1.0).await?;
    wait_status(&cloud, &gw, "h9", "refused: bad_value").await?;
    wait_status(&cloud, &gw, "h10", "refused: bad_value").await?;
    ensure!(statuses(&cloud.messages(), "h3") == ["refused: malformed"], "h3");

    // Nothing broke: the gateway runs and the next good command is executed.
    command(&cloud, "default", "plc", &json!({"id": "good", "point": "setpoint", "value": 9})).await?;
    wait_status(&cloud, &gw, "good", "verified").await?;
    ensure!(plc.device.writes() == 1 && plc.device.holding(0) == Some(9), "writes: {}", plc.device.writes());
    Ok(())
}
