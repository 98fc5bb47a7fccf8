//! MQTT device ingest: subscribes to a field broker's topics (rumqttc, 3.1.1 or 5) and turns
//! every message into a reading.
//!
//! Delivery: the session is persistent (fixed client id, `clean_session = false`; on v5 a
//! session expiry of a day) and acknowledgements are manual. A QoS 1 message is PUBACKed to
//! the field broker only once JetStream accepted its reading, in the order the messages
//! arrived (MQTT 4.6). If a reading is not accepted the connection is dropped without the
//! acknowledgement, so the broker sends the message again on the next session; a crash has
//! the same effect. A message whose payload does not map to the device's points is counted
//! (`fieldgate_device_errors_total{kind}` with the payload kind) and acknowledged: it would
//! never map, and redelivering it forever would stall the device.
//!
//! Payloads: see [`super::payload`]; a plain value goes to the point named like the topic's
//! last level (or the only point). Error kinds: `connect` (connection lost or refused),
//! `subscribe` (a filter refused), `not_accepted`, `secret`, and the payload kinds.

use std::time::{Duration, SystemTime};

use bytes::Bytes;
use fieldgate_crds::MqttDeviceConnection;
use tokio::sync::{mpsc, oneshot};

use super::{DeviceTask, payload};
use crate::reading::{self, Acceptance, Reading};

/// How long an acknowledgement waits for JetStream before the session is given up.
const ACCEPT_TIMEOUT: Duration = Duration::from_secs(30);
/// Session expiry asked for on MQTT 5 (seconds): unacknowledged messages wait that long.
const SESSION_EXPIRY: u32 = 24 * 3600;

/// Why a session ended.
#[derive(Debug, thiserror::Error)]
pub enum IngestError {
    /// The broker connection failed or was lost.
    #[error("connection: {0}")]
    Connection(String),
    /// A reading was not accepted by the buffer: the session is dropped unacknowledged.
    #[error("a reading was not accepted by the buffer")]
    NotAccepted,
    /// The settings cannot be used (URL, credentials).
    #[error("settings: {0}")]
    Settings(String),
}

impl IngestError {
    /// A static label for metrics.
    pub fn kind(&self) -> &'static str {
        match self {
            IngestError::Connection(_) => "connect",
            IngestError::NotAccepted => "not_accepted",
            IngestError::Settings(_) => "settings",
        }
    }
}

/// A message to acknowledge once its outcome is known.
enum AckHandle {
    V4(rumqttc::Publish),
    V5(rumqttc::v5::mqttbytes::v5::Publish),
}

enum Outcome {
    /// Acknowledge at once (a message refused for good).
    Now,
    /// Acknowledge once the reading is accepted.
    Accepted(Acceptance),
}

#[derive(Clone)]
enum Client {
    V4(rumqttc::AsyncClient),
    V5(rumqttc::v5::AsyncClient),
}

impl Client {
    async fn ack(&self, h: &AckHandle) -> Result<(), String> {
        match (self, h) {
            (Client::V4(c), AckHandle::V4(p)) => c.ack(p).await.map_err(|e| e.to_string()),
            (Client::V5(c), AckHandle::V5(p)) => c.ack(p).await.map_err(|e| e.to_string()),
            _ => Err("acknowledgement of another protocol version".into()),
        }
    }

    fn subscribe(&self, topic: &str) -> Result<(), String> {
        match self {
            Client::V4(c) => c.try_subscribe(topic, rumqttc::QoS::AtLeastOnce).map_err(|e| e.to_string()),
            Client::V5(c) => {
                c.try_subscribe(topic, rumqttc::v5::mqttbytes::QoS::AtLeastOnce).map_err(|e| e.to_string())
            }
        }
    }

    async fn disconnect(&self) {
        let _ = match self {
            Client::V4(c) => c.disconnect().await.map_err(|e| e.to_string()),
            Client::V5(c) => c.disconnect().await.map_err(|e| e.to_string()),
        };
    }
}

// One per session, never stored in bulk: the size difference does not matter.
#[allow(clippy::large_enum_variant)]
enum EventLoop {
    V4(rumqttc::EventLoop),
    V5(rumqttc::v5::EventLoop),
}

/// What the event loop reported, protocol version aside.
#[allow(clippy::large_enum_variant)] // short-lived, one at a time
enum Event {
    Connected,
    Subscribed { refused: usize },
    Message { topic: String, payload: Bytes, qos1: bool, handle: AckHandle },
    Other,
}

impl EventLoop {
    async fn poll(&mut self) -> Result<Event, String> {
        match self {
            EventLoop::V4(el) => {
                use rumqttc::{Event as E, Packet, QoS, SubscribeReasonCode};
                Ok(match el.poll().await.map_err(|e| e.to_string())? {
                    E::Incoming(Packet::ConnAck(_)) => Event::Connected,
                    E::Incoming(Packet::SubAck(a)) => Event::Subscribed {
                        refused: a.return_codes.iter().filter(|c| matches!(c, SubscribeReasonCode::Failure)).count(),
                    },
                    E::Incoming(Packet::Publish(p)) => Event::Message {
                        topic: p.topic.clone(),
                        payload: p.payload.clone(),
                        qos1: p.qos != QoS::AtMostOnce,
                        handle: AckHandle::V4(p),
                    },
                    _ => Event::Other,
                })
            }
            EventLoop::V5(el) => {
                use rumqttc::v5::Event as E;
                use rumqttc::v5::mqttbytes::QoS;
                use rumqttc::v5::mqttbytes::v5::{Packet, SubscribeReasonCode};
                Ok(match el.poll().await.map_err(|e| e.to_string())? {
                    E::Incoming(Packet::ConnAck(_)) => Event::Connected,
                    E::Incoming(Packet::SubAck(a)) => Event::Subscribed {
                        refused: a
                            .return_codes
                            .iter()
                            .filter(|c| !matches!(c, SubscribeReasonCode::Success(_)))
                            .count(),
                    },
                    E::Incoming(Packet::Publish(p)) => Event::Message {
                        topic: String::from_utf8_lossy(&p.topic).into_owned(),
                        payload: p.payload.clone(),
                        qos1: p.qos != QoS::AtMostOnce,
                        handle: AckHandle::V5(p),
                    },
                    _ => Event::Other,
                })
            }
        }
    }
}

fn open(settings: &MqttDeviceConnection, task: &DeviceTask) -> Result<(Client, EventLoop), IngestError> {
    let (host, port) = (settings.url.host(), settings.url.port());
    let d = &task.device;
    let client_id = settings.client_id.clone().unwrap_or_else(|| {
        let mut id = format!("fieldgate-{}-{}-{}", task.node, d.namespace, d.name);
        id.truncate(64);
        id
    });
    let credentials = match &settings.auth {
        None => None,
        Some(a) => {
            let read = |key: &str| {
                task.hub
                    .secrets
                    .read(&a.secret_ref.name, key)
                    .map_err(|e| IngestError::Settings(e.to_string()))
                    .map(|v| String::from_utf8_lossy(v.expose()).trim_end_matches(['\r', '\n']).to_string())
            };
            Some((read("username")?, read("password")?))
        }
    };
    let keep_alive = settings.keep_alive();
    let capacity = 256;
    Ok(if settings.protocol_version() == 5 {
        let mut o = rumqttc::v5::MqttOptions::new(client_id, host, port);
        o.set_keep_alive(keep_alive)
            .set_clean_start(false)
            .set_session_expiry_interval(Some(SESSION_EXPIRY))
            .set_manual_acks(true);
        if let Some((u, p)) = credentials {
            o.set_credentials(u, p);
        }
        let (c, el) = rumqttc::v5::AsyncClient::new(o, capacity);
        (Client::V5(c), EventLoop::V5(el))
    } else {
        let mut o = rumqttc::MqttOptions::new(client_id, host, port);
        o.set_keep_alive(keep_alive).set_clean_session(false).set_manual_acks(true);
        if let Some((u, p)) = credentials {
            o.set_credentials(u, p);
        }
        let (c, el) = rumqttc::AsyncClient::new(o, capacity);
        (Client::V4(c), EventLoop::V4(el))
    })
}

/// Acknowledges messages in arrival order once their outcome is known. Ends (telling
/// `broken`) at the first reading the buffer did not accept.
async fn acknowledge(
    client: Client,
    mut rx: mpsc::UnboundedReceiver<(AckHandle, Outcome)>,
    broken: oneshot::Sender<()>,
) {
    while let Some((handle, outcome)) = rx.recv().await {
        let accepted = match outcome {
            Outcome::Now => true,
            Outcome::Accepted(rx) => matches!(tokio::time::timeout(ACCEPT_TIMEOUT, rx).await, Ok(Ok(Ok(())))),
        };
        if !accepted {
            let _ = broken.send(());
            return;
        }
        if let Err(e) = client.ack(&handle).await {
            tracing::debug!(error = %e, "acknowledgement not queued");
        }
    }
}

/// Runs one MQTT device until `task.cancel` fires.
pub async fn run(settings: &MqttDeviceConnection, task: DeviceTask) {
    let labels = task.labels();
    let gauge = task.metrics.device_connected.get_or_create(&labels).clone();
    gauge.set(0);
    let mut delays = crate::supervise::backoff(Duration::from_millis(200), Duration::from_secs(30));
    let mut up: Option<bool> = None;
    let ids = super::hub::IdClock::default();
    while !task.cancel.is_cancelled() {
        let result = session(settings, &task, &ids, &gauge, &mut up).await;
        gauge.set(0);
        let Err(e) = result else { break };
        task.count_error(e.kind());
        if up != Some(false) {
            tracing::warn!(device = %task.key(), kind = e.kind(), error = %e, "field broker session ended; reconnecting with backoff");
        } else {
            tracing::debug!(device = %task.key(), kind = e.kind(), error = %e, "field broker still unreachable");
        }
        up = Some(false);
        let delay = delays.next().unwrap_or(Duration::from_secs(30));
        tokio::select! {
            () = task.cancel.cancelled() => break,
            () = tokio::time::sleep(delay) => {}
        }
    }
    gauge.set(0);
}

/// One broker session. `Ok` when cancelled.
async fn session(
    settings: &MqttDeviceConnection,
    task: &DeviceTask,
    ids: &super::hub::IdClock,
    gauge: &prometheus_client::metrics::gauge::Gauge,
    up: &mut Option<bool>,
) -> Result<(), IngestError> {
    let (client, mut events) = open(settings, task)?;
    let (ack_tx, ack_rx) = mpsc::unbounded_channel();
    let (broken_tx, mut broken) = oneshot::channel();
    let acker = tokio::spawn(acknowledge(client.clone(), ack_rx, broken_tx));
    let _abort = AbortOnDrop(acker);
    loop {
        let event = tokio::select! {
            () = task.cancel.cancelled() => {
                client.disconnect().await;
                return Ok(());
            }
            Ok(()) = &mut broken => return Err(IngestError::NotAccepted),
            e = events.poll() => e.map_err(IngestError::Connection)?,
        };
        match event {
            Event::Connected => {
                for t in &settings.topics {
                    if let Err(e) = client.subscribe(t) {
                        return Err(IngestError::Connection(e));
                    }
                }
                gauge.set(1);
                if *up != Some(true) {
                    tracing::info!(device = %task.key(), url = %settings.url, "field broker connected");
                }
                *up = Some(true);
            }
            Event::Subscribed { refused } if refused > 0 => {
                task.count_error("subscribe");
                tracing::warn!(device = %task.key(), refused, "the field broker refused a topic filter");
            }
            Event::Message { topic, payload, qos1, handle } => {
                let hint = topic.rsplit('/').next();
                let outcome = match payload::decode(&task.device.points, &payload, hint) {
                    Ok(points) => {
                        let d = &task.device;
                        let reading = Reading {
                            id: reading::message_id(&d.namespace, &d.name, ids.next()),
                            namespace: d.namespace.clone(),
                            device: d.name.clone(),
                            node: task.node.clone(),
                            time_unix_nano: reading::unix_nanos(SystemTime::now()),
                            buffer_seq: 0,
                            points,
                        };
                        match task.emit_confirmed(reading).await {
                            Ok(rx) => Outcome::Accepted(rx),
                            // The gateway is stopping: leave the message unacknowledged.
                            Err(_) => return Ok(()),
                        }
                    }
                    Err(e) => {
                        task.count_error(e.kind());
                        tracing::debug!(device = %task.key(), topic = %topic, kind = e.kind(), error = %e, "MQTT message refused");
                        Outcome::Now
                    }
                };
                if qos1 {
                    let _ = ack_tx.send((handle, outcome));
                }
            }
            Event::Subscribed { .. } | Event::Other => {}
        }
    }
}

/// Publishes a command to the device's `commandTopic` on its field broker (QoS 1, its own
/// short connection) and waits for the broker's acknowledgement.
pub(crate) async fn publish_command(
    settings: &MqttDeviceConnection,
    task: &DeviceTask,
    payload: Bytes,
    timeout: Duration,
) -> Result<(), String> {
    let Some(topic) = settings.command_topic.clone() else { return Err("the device has no commandTopic".into()) };
    let mut own = settings.clone();
    own.client_id = Some(format!(
        "{}-cmd",
        settings
            .client_id
            .clone()
            .unwrap_or_else(|| format!("fieldgate-{}-{}", task.device.namespace, task.device.name))
    ));
    let (client, mut events) = {
        let (host, port) = (own.url.host(), own.url.port());
        let id = own.client_id.clone().unwrap_or_default();
        if own.protocol_version() == 5 {
            let mut o = rumqttc::v5::MqttOptions::new(id, host, port);
            o.set_clean_start(true);
            let (c, el) = rumqttc::v5::AsyncClient::new(o, 8);
            (Client::V5(c), EventLoop::V5(el))
        } else {
            let mut o = rumqttc::MqttOptions::new(id, host, port);
            o.set_clean_session(true);
            let (c, el) = rumqttc::AsyncClient::new(o, 8);
            (Client::V4(c), EventLoop::V4(el))
        }
    };
    let sent = async {
        let mut published = false;
        loop {
            let done = match &mut events {
                EventLoop::V4(el) => matches!(
                    el.poll().await.map_err(|e| e.to_string())?,
                    rumqttc::Event::Incoming(rumqttc::Packet::PubAck(_))
                ),
                EventLoop::V5(el) => matches!(
                    el.poll().await.map_err(|e| e.to_string())?,
                    rumqttc::v5::Event::Incoming(rumqttc::v5::mqttbytes::v5::Packet::PubAck(_))
                ),
            };
            if done {
                return Ok::<(), String>(());
            }
            if !published {
                published = true;
                let queued = match &client {
                    Client::V4(c) => c
                        .try_publish(topic.clone(), rumqttc::QoS::AtLeastOnce, false, payload.clone())
                        .map_err(|e| e.to_string()),
                    Client::V5(c) => c
                        .try_publish(topic.clone(), rumqttc::v5::mqttbytes::QoS::AtLeastOnce, false, payload.clone())
                        .map_err(|e| e.to_string()),
                };
                queued?;
            }
        }
    };
    let result = tokio::time::timeout(timeout, sent)
        .await
        .unwrap_or_else(|_| Err(format!("no acknowledgement within {timeout:?}")));
    client.disconnect().await;
    result
}

struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}
