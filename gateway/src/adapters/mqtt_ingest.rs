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
//! Size: a message whose payload is larger than the device's `maxMessageBytes` (default
//! 256 KiB) is acknowledged at once, dropped and counted (`kind="too_large"`, also the
//! device's last error); the messages after it flow as before. So that the oversize path is
//! this one and not a lost connection, the client reads packets up to [`read_limit`]
//! (at least 16 MiB, 4 times the device's limit). A packet above that cannot be read: on
//! MQTT 5 the broker is told the limit (CONNECT Maximum Packet Size) and discards such a
//! message without sending it (MQTT 5 3.1.2.11.4); on 3.1.1 rumqttc ends the connection,
//! counted as `packet_too_large`, and the persistent session sends the message again on
//! every reconnect — bound the broker's own message size (`message_size_limit` in
//! mosquitto) below the read limit for 3.1.1 devices.
//!
//! Commands to the device are published on this same session (its credentials, its client
//! id) to its `commandTopic` with QoS 1, `written` once the field broker acknowledged them.
//!
//! Payloads: see [`super::payload`]; a plain value goes to the point named like the topic's
//! last level (or the only point). Error kinds: `connect` (connection lost or refused),
//! `subscribe` (a filter refused), `not_accepted`, `secret`, `too_large` (a payload above
//! `maxMessageBytes`), `packet_too_large` (a packet above the read limit, 3.1.1), and the
//! payload kinds.

use std::time::{Duration, SystemTime};

use bytes::Bytes;
use fieldgate_crds::MqttDeviceConnection;
use tokio::sync::{mpsc, oneshot};

use super::{DeviceTask, payload};
use crate::command::{Inbox, Job, Outcome, Reason, Status};
use crate::mqtt::{self, AckHandle, Endpoint, Event, Events, Incoming, Session, SessionOptions, Version};
use crate::reading::{self, Acceptance, Reading};

/// How long an acknowledgement waits for JetStream before the session is given up.
const ACCEPT_TIMEOUT: Duration = Duration::from_secs(30);

/// Smallest packet size the client reads (see the module doc).
const MIN_READ_LIMIT: usize = 16 << 20;

/// Largest packet the client of a device with message limit `max_message` reads: above the
/// limit, so that an oversized message is read, counted and acknowledged here.
pub fn read_limit(max_message: usize) -> usize {
    max_message.saturating_mul(4).max(MIN_READ_LIMIT)
}

/// Why a session ended.
#[derive(Debug, thiserror::Error)]
pub enum IngestError {
    /// The broker connection failed or was lost.
    #[error("connection: {0}")]
    Connection(String),
    /// The broker sent a packet above the client's read limit (MQTT 3.1.1 only: on 5 the
    /// broker knows the limit).
    #[error("the field broker sent a packet of {0} bytes, above the read limit")]
    PacketTooLarge(usize),
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
            IngestError::PacketTooLarge(_) => "packet_too_large",
            IngestError::NotAccepted => "not_accepted",
            IngestError::Settings(_) => "settings",
        }
    }
}

/// A message to acknowledge once its outcome is known.
enum AckWhen {
    /// Acknowledge at once (a message refused for good).
    Now,
    /// Acknowledge once the reading is accepted.
    Accepted(Acceptance),
}

/// What a publish on the session is for: a command's job, answered on the broker's PUBACK.
type Token = Job;

fn open(settings: &MqttDeviceConnection, task: &DeviceTask) -> Result<(Session<Token>, Events<Token>), IngestError> {
    let d = &task.device;
    let client_id = settings.client_id.clone().unwrap_or_else(|| {
        let mut id = format!("fieldgate-{}-{}-{}", task.node, d.namespace, d.name);
        id.truncate(64);
        id
    });
    let mut endpoint = Endpoint::new(&settings.url, client_id);
    if let Some(a) = &settings.auth {
        let read = |key: &str| {
            task.hub.secrets.read(&a.secret_ref.name, key).map_err(|e| IngestError::Settings(e.to_string()))
        };
        let user = read("username")?;
        let user = user.expose_str().map_err(|_| IngestError::Settings("username is not UTF-8".into()))?;
        endpoint.credentials = Some((user.trim_end_matches(['\r', '\n']).to_string(), read("password")?));
    }
    endpoint.version = if settings.protocol_version() == 5 { Version::V5 } else { Version::V311 };
    endpoint.keep_alive = settings.keep_alive();
    endpoint.max_packet_bytes = read_limit(settings.max_message_bytes());
    let options =
        SessionOptions { persistent: true, manual_acks: true, max_in_flight: 100, capacity: 256, no_delay: false };
    Ok(mqtt::open(&endpoint, &options))
}

/// Acknowledges messages in arrival order once their outcome is known. Ends (telling
/// `broken`) at the first reading the buffer did not accept.
async fn acknowledge(
    client: Session<Token>,
    mut rx: mpsc::UnboundedReceiver<(AckHandle, AckWhen)>,
    broken: oneshot::Sender<()>,
) {
    while let Some((handle, outcome)) = rx.recv().await {
        let accepted = match outcome {
            AckWhen::Now => true,
            AckWhen::Accepted(rx) => matches!(tokio::time::timeout(ACCEPT_TIMEOUT, rx).await, Ok(Ok(Ok(())))),
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
pub async fn run(settings: &MqttDeviceConnection, task: DeviceTask, mut inbox: Inbox) {
    let labels = task.labels();
    let gauge = task.metrics.device_connected.get_or_create(&labels).clone();
    gauge.set(0);
    let mut delays = crate::supervise::backoff(Duration::from_millis(200), Duration::from_secs(30));
    let mut up: Option<bool> = None;
    let ids = super::hub::IdClock::default();
    while !task.cancel.is_cancelled() {
        let result = session(settings, &task, &ids, &gauge, &mut up, &mut inbox).await;
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
        let resume = tokio::time::sleep(delay);
        tokio::pin!(resume);
        loop {
            tokio::select! {
                () = task.cancel.cancelled() => break,
                () = &mut resume => break,
                Some(job) = inbox.recv() => {
                    // No session to publish on while backing off.
                    let o = job.precheck().unwrap_or_else(|| Outcome::failed(Reason::Unreachable, e.to_string()));
                    job.finish(o);
                }
            }
        }
    }
    gauge.set(0);
}

/// Publishes a command on the device's own session (QoS 1) to its `commandTopic`, as
/// `{<path or name>: value, "commandId": id}`; answered when the broker acknowledges it.
fn publish_command(settings: &MqttDeviceConnection, task: &DeviceTask, client: &Session<Token>, job: Job) {
    if let Some(o) = job.precheck() {
        return job.finish(o);
    }
    let Some(topic) = settings.command_topic.clone() else {
        return job.finish(Outcome::failed(Reason::Unsupported, "the device has no commandTopic"));
    };
    let Some(point) = task.device.points.get(job.point) else {
        return job.finish(Outcome::failed(Reason::UnknownPoint, "the device changed"));
    };
    let mut body = job.object(point);
    body.insert("commandId".into(), serde_json::Value::String(job.id.clone()));
    let payload = Bytes::from(serde_json::Value::Object(body).to_string());
    // The session gives the job back on the broker's PUBACK; if the publish cannot even be
    // queued, the job is dropped with the error and its sender sees it closed.
    if let Err(e) = client.publish(job, topic, payload, None) {
        task.count_error("command");
        tracing::debug!(device = %task.key(), error = %e, "command not queued");
    }
}

/// One broker session. `Ok` when cancelled.
async fn session(
    settings: &MqttDeviceConnection,
    task: &DeviceTask,
    ids: &super::hub::IdClock,
    gauge: &prometheus_client::metrics::gauge::Gauge,
    up: &mut Option<bool>,
    inbox: &mut Inbox,
) -> Result<(), IngestError> {
    let (client, mut events) = open(settings, task)?;
    let max_message = settings.max_message_bytes();
    let (ack_tx, ack_rx) = mpsc::unbounded_channel();
    let (broken_tx, mut broken) = oneshot::channel();
    let acker = tokio::spawn(acknowledge(client.clone(), ack_rx, broken_tx));
    let _abort = AbortOnDrop(acker);
    let mut connected = false;
    loop {
        let event = tokio::select! {
            () = task.cancel.cancelled() => {
                client.disconnect().await;
                return Ok(());
            }
            Ok(()) = &mut broken => return Err(IngestError::NotAccepted),
            Some(job) = inbox.recv(), if connected => {
                publish_command(settings, task, &client, job);
                continue;
            }
            e = events.next() => e,
        };
        match event {
            Event::Lost(mqtt::MqttError::PacketTooLarge(n)) => return Err(IngestError::PacketTooLarge(n)),
            Event::Lost(e) => return Err(IngestError::Connection(e.to_string())),
            Event::Connected => {
                for t in &settings.topics {
                    if let Err(e) = client.subscribe(t) {
                        return Err(IngestError::Connection(e.to_string()));
                    }
                }
                connected = true;
                gauge.set(1);
                if *up != Some(true) {
                    tracing::info!(device = %task.key(), url = %settings.url, "field broker connected");
                }
                *up = Some(true);
            }
            Event::Published { token: job, code } => {
                let outcome = if code.is_success() {
                    Outcome::of(Status::Written)
                } else {
                    task.count_error("command");
                    Outcome::failed(Reason::DeviceError, format!("the field broker refused it: {}", code.name()))
                };
                job.finish(outcome);
            }
            Event::Subscribed { refused } if refused > 0 => {
                task.count_error("subscribe");
                tracing::warn!(device = %task.key(), refused, "the field broker refused a topic filter");
            }
            Event::Subscribed { .. } => {}
            Event::Message(Incoming { topic, payload, qos1, ack, .. }) if payload.len() > max_message => {
                // Acknowledged at once: redelivered, it would be refused again, forever.
                task.count_error("too_large");
                tracing::debug!(device = %task.key(), topic = %topic, bytes = payload.len(), max = max_message, "MQTT message above maxMessageBytes dropped");
                if qos1 {
                    let _ = ack_tx.send((ack, AckWhen::Now));
                }
            }
            Event::Message(Incoming { topic, payload, qos1, ack, .. }) => {
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
                            Ok(rx) => AckWhen::Accepted(rx),
                            // The gateway is stopping: leave the message unacknowledged.
                            Err(_) => return Ok(()),
                        }
                    }
                    Err(e) => {
                        task.count_error(e.kind());
                        tracing::debug!(device = %task.key(), topic = %topic, kind = e.kind(), error = %e, "MQTT message refused");
                        AckWhen::Now
                    }
                };
                if qos1 {
                    let _ = ack_tx.send((ack, outcome));
                }
            }
        }
    }
}

struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}
