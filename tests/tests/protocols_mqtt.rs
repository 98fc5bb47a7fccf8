//! MQTT device ingest end to end: devices publish to a field `mosquitto`; the gateway
//! subscribes, maps JSON paths and plain values to points, and acknowledges each QoS 1
//! message to the field broker only after JetStream accepted its reading, so a message
//! received while the buffer was down and the gateway then crashed is delivered again.
//!
//! Needs `cargo build --workspace --bins` first (the tests run the gateway binary).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use anyhow::{Result, anyhow};
use fieldgate_crds::GatewayDevice;
use fieldgate_tests::config::ConfigBuilder;
use fieldgate_tests::listening::{ListeningGateway, wait_value};
use fieldgate_tests::{CloudSubscriber, Mosquitto, NatsServer};
use rumqttc::{AsyncClient, MqttOptions, QoS};
use serde_json::{Value as Json, json};

const WAIT: Duration = Duration::from_secs(60);

fn device(name: &str, connection: Json, points: Json) -> GatewayDevice {
    serde_json::from_value(json!({"name": name, "connection": connection, "points": points})).unwrap()
}

/// A field device publishing to the field broker (QoS 1), its event loop polled in the background.
struct FieldDevice {
    client: AsyncClient,
    task: tokio::task::JoinHandle<()>,
}

impl FieldDevice {
    fn connect(broker: &Mosquitto, id: &str) -> Self {
        let mut o = MqttOptions::new(id, "127.0.0.1", broker.port());
        o.set_keep_alive(Duration::from_secs(5)).set_max_packet_size(4 << 20, 4 << 20);
        let (client, mut el) = AsyncClient::new(o, 64);
        let task = tokio::spawn(async move {
            loop {
                if el.poll().await.is_err() {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        });
        Self { client, task }
    }

    async fn publish(&self, topic: &str, payload: impl Into<Vec<u8>>) -> Result<()> {
        self.client.publish(topic, QoS::AtLeastOnce, false, payload).await.map_err(|e| anyhow!("{e}"))
    }
}

impl Drop for FieldDevice {
    fn drop(&mut self) {
        self.task.abort();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn field_broker_messages_are_mapped_and_acked_only_after_the_buffer_accepted_them() -> Result<()> {
    let mut nats = NatsServer::start().await?;
    let field = Mosquitto::start().await?;
    let cloud_broker = Mosquitto::start().await?;
    let cloud = CloudSubscriber::start(&cloud_broker.url(), "cloud-mqtt-ingest", "fieldgate/#").await?;
    let url = field.url();
    let devices = vec![
        device(
            "meter",
            json!({"mqtt": {"url": url, "topics": ["plant/meter/#"], "protocolVersion": 5}}),
            json!([{"name": "power", "type": "float64", "path": "p.w", "unit": "W"}, {"name": "on", "type": "bool"}]),
        ),
        device(
            "th",
            json!({"mqtt": {"url": url, "topics": ["plant/th/+"]}}),
            json!([{"name": "temp", "type": "float64"}, {"name": "hum", "type": "uint16"}]),
        ),
    ];
    let config = ConfigBuilder::new().devices(devices).cloud(&cloud_broker.url(), |_| {}).yaml()?;
    let mut gw = ListeningGateway::new(&nats.url())?;
    gw.gw.write_config(&config)?;
    gw.start_ready().await?;
    gw.wait_metric("fieldgate_device_connected", &[("protocol", "mqtt")], WAIT, |v| v >= 2.0).await?;

    let dev = FieldDevice::connect(&field, "field-devices");
    dev.publish("plant/meter/state", r#"{"p":{"w":1250.5},"on":true}"#).await?;
    dev.publish("plant/th/temp", "21.5").await?;
    dev.publish("plant/th/hum", "55").await?;
    wait_value(&cloud, &gw, "meter", "power", json!(1250.5)).await?;
    wait_value(&cloud, &gw, "meter", "on", json!(true)).await?;
    wait_value(&cloud, &gw, "th", "temp", json!(21.5)).await?;
    wait_value(&cloud, &gw, "th", "hum", json!(55)).await?;

    // Malformed and unmappable messages: counted with their kind, acknowledged, and the
    // other device carries on.
    dev.publish("plant/meter/state", r#"{"p":"#).await?;
    dev.publish("plant/th/temp", "warm").await?;
    dev.publish("plant/th/pressure", "1013").await?;
    gw.wait_metric("fieldgate_device_errors_total", &[("device", "default/meter"), ("kind", "json")], WAIT, |v| {
        v >= 1.0
    })
    .await?;
    gw.wait_metric("fieldgate_device_errors_total", &[("device", "default/th"), ("kind", "type")], WAIT, |v| v >= 1.0)
        .await?;
    gw.wait_metric("fieldgate_device_errors_total", &[("device", "default/th"), ("kind", "ambiguous")], WAIT, |v| {
        v >= 1.0
    })
    .await?;
    dev.publish("plant/meter/state", r#"{"p":{"w":99.0}}"#).await?;
    wait_value(&cloud, &gw, "meter", "power", json!(99.0)).await?;

    // The buffer goes down; a message arrives; the gateway crashes before JetStream accepted
    // it. The field broker still holds it unacknowledged and sends it again.
    nats.kill()?;
    let received = gw.metric("fieldgate_readings_received_total", &[("device", "default/th")]).await?;
    dev.publish("plant/th/temp", "30.25").await?;
    gw.wait_metric("fieldgate_readings_received_total", &[("device", "default/th")], WAIT, |v| v > received).await?;
    gw.kill();
    nats.start_again().await?;
    gw.start_ready().await?;
    wait_value(&cloud, &gw, "th", "temp", json!(30.25)).await?;
    Ok(())
}

/// The messages a persistent session on `broker` still holds for `client_id`, read by taking
/// the session over (same client id, `clean_session = false`, manual acks): a marker published
/// to `marker_topic` (which the session subscribes to) arrives after everything queued before
/// it, so the payload sizes seen before the marker are exactly what was left unacknowledged.
async fn queued_for_session(broker: &Mosquitto, client_id: &str, marker_topic: &str) -> Result<Vec<usize>> {
    let mut o = MqttOptions::new(client_id, "127.0.0.1", broker.port());
    o.set_keep_alive(Duration::from_secs(5))
        .set_clean_session(false)
        .set_manual_acks(true)
        .set_max_packet_size(4 << 20, 4 << 20);
    let (client, mut el) = AsyncClient::new(o, 64);
    let marker = b"end-of-queue".to_vec();
    let mut sizes = Vec::new();
    let mut published = false;
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let event = tokio::time::timeout_at(deadline, el.poll())
            .await
            .map_err(|_| anyhow!("the marker never came back through the session"))??;
        match event {
            rumqttc::Event::Incoming(rumqttc::Packet::ConnAck(_)) if !published => {
                client.publish(marker_topic, QoS::AtLeastOnce, false, marker.clone()).await?;
                published = true;
            }
            rumqttc::Event::Incoming(rumqttc::Packet::Publish(p)) => {
                if p.payload.as_ref() == marker.as_slice() {
                    return Ok(sizes);
                }
                sizes.push(p.payload.len());
                client.ack(&p).await?;
            }
            _ => {}
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_1_mib_field_message_is_acknowledged_dropped_and_counted_and_the_messages_after_it_arrive() -> Result<()> {
    let nats = NatsServer::start().await?;
    let field = Mosquitto::start().await?;
    let cloud_broker = Mosquitto::start().await?;
    let cloud = CloudSubscriber::start(&cloud_broker.url(), "cloud-mqtt-oversize", "fieldgate/#").await?;
    let url = field.url();
    let devices = vec![
        device(
            "big-v5",
            json!({"mqtt": {"url": url, "topics": ["plant/big-v5/#"], "protocolVersion": 5, "maxMessageBytes": "64Ki"}}),
            json!([{"name": "n", "type": "float64"}]),
        ),
        // MQTT 3.1.1 and the default limit (256Ki); its session is taken over below.
        device(
            "big-v3",
            json!({"mqtt": {"url": url, "topics": ["plant/big-v3/#"], "clientId": "gw-big-v3"}}),
            json!([{"name": "n", "type": "float64"}]),
        ),
    ];
    let config = ConfigBuilder::new().devices(devices).cloud(&cloud_broker.url(), |_| {}).yaml()?;
    let mut gw = ListeningGateway::new(&nats.url())?;
    gw.gw.write_config(&config)?;
    gw.start_ready().await?;
    gw.wait_metric("fieldgate_device_connected", &[("protocol", "mqtt")], WAIT, |v| v >= 2.0).await?;

    let dev = FieldDevice::connect(&field, "field-oversize");
    let huge = vec![b'7'; 1 << 20];
    for name in ["big-v5", "big-v3"] {
        let topic = format!("plant/{name}/n");
        dev.publish(&topic, "1").await?;
        dev.publish(&topic, huge.clone()).await?;
        for n in 2..=5 {
            dev.publish(&topic, n.to_string()).await?;
        }
    }
    // Judged from the cloud: every message after the oversized one arrived, in order.
    for name in ["big-v5", "big-v3"] {
        wait_value(&cloud, &gw, name, "n", json!(5.0)).await?;
    }
    for name in ["big-v5", "big-v3"] {
        gw.wait_metric(
            "fieldgate_device_errors_total",
            &[("device", &format!("default/{name}")), ("kind", "too_large")],
            WAIT,
            |v| v == 1.0,
        )
        .await?;
    }
    // Judged from the field broker: once the gateway has stopped, its persistent session holds
    // nothing of 1 MiB (the oversized message was acknowledged, not left to come back).
    gw.terminate().await?;
    let left = queued_for_session(&field, "gw-big-v3", "plant/big-v3/marker").await?;
    assert!(left.iter().all(|&n| n < 1 << 20), "the field session still holds the oversized message: {left:?}");
    Ok(())
}
