//! Commands from the cloud to the devices (the downlink): intake, authorisation, expiry,
//! exactly-once bookkeeping and results. Execution belongs to the adapter that owns the
//! device ([`crate::adapters`]); nothing here knows a protocol.
//!
//! Per uplink with a `commandTopic` (which must contain `{device}`), beside the uplink driver:
//!
//! 1. **Intake.** Its own MQTT session on the uplink's broker (client id `<uplink client
//!    id>-commands`, persistent, manual acks) subscribed to the command topic with
//!    `{namespace}` filled in with the uplink's own namespace and `{device}` as the one
//!    wildcard. Namespace and device come from the topic only (a message naming them is
//!    refused: unknown fields). A command for another namespace or for a device the uplink
//!    does not select (the operator renders the selection into the node's config), a message
//!    that is too large or malformed ([`crate::command`]) is refused, counted and reported,
//!    and acknowledged. Anything else is stored in the JetStream stream `fieldgate_commands`
//!    (`Nats-Msg-Id` = `namespace/device/id`, deduplicated for 24 h) and only then
//!    acknowledged to the broker and answered `accepted`; an id stored before is answered
//!    `duplicate` (with the recorded outcome, when there is one).
//! 2. **Authorisation and hand-over.** A durable consumer reads the stored commands (a pull
//!    stream that ends is opened again). Each is checked again — selected by the uplink,
//!    running on this gateway, the point exists and is `access: readWrite` — and expiry is
//!    applied, then it goes to the device's bounded queue (its adapter executes queued
//!    commands in order; a full queue answers `failed`/`busy`). Commands for different devices
//!    run at the same time; the intake never waits for a device.
//! 3. **Exactly once.** The outcome of each command id is recorded in the JetStream key-value
//!    bucket `fieldgate_command_outcomes` (key `namespace/device/id`, kept 24 h): `started`
//!    before it is handed to the adapter, the outcome when the adapter answered — and only
//!    then is the stored command acknowledged. A redelivered or repeated id finds its record
//!    and is answered from it without executing again. A command found `started` (the gateway
//!    stopped between handing it over and recording the outcome — the device may or may not
//!    have been written) is resumed: Modbus reads the point back and writes only if the value
//!    is not there yet (`verified` either way, written at most once); the other protocols
//!    (CoAP POST/PUT, MQTT publish, TCP and UDP frames are not idempotent) answer
//!    `failed`/`interrupted` and do not send again: at most once.
//! 4. **Results** are published (QoS 1) on `<command topic>/result` as `{"id", "namespace",
//!    "device", "point", "status", "reason"?, "detail"?, "recorded"?, "atUnixMs"}` and counted
//!    in `fieldgate_commands_total{uplink,status,reason}`.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::consumer::{AckPolicy, pull};
use async_nats::jetstream::kv;
use async_nats::jetstream::message::PublishMessage;
use async_nats::jetstream::stream::{self, RetentionPolicy, StorageType};
use async_nats::jetstream::{self, AckKind};
use bytes::Bytes;
use fieldgate_crds::{Access, GatewayUplink};
use futures::StreamExt;
use opentelemetry::trace::SpanKind;
use serde_json::{Value as Json, json};
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinSet;
use tokio::time::Instant;

use crate::adapters::hub::{DeviceHub, RunningDevice};
use crate::command::{self, CommandMessage, Job, Outcome, Reason, Record, Status, StoredCommand, now_ms};
use crate::metrics::CommandLabels;
use crate::mqtt::{self, Event, Incoming, Session, SessionOptions};
use crate::telemetry;
use crate::uplinks::UplinkTask;

/// The JetStream stream holding commands until they are executed.
pub const STREAM: &str = "fieldgate_commands";
/// The key-value bucket recording each command id's outcome.
pub const OUTCOMES: &str = "fieldgate_command_outcomes";
/// How long a command id is remembered (a repeated id within it is not executed again).
pub const DUPLICATE_WINDOW: Duration = Duration::from_secs(24 * 3600);
/// Largest packet of the command session: a message up to this size is read and refused
/// (`too_large`) instead of breaking the session.
const SESSION_MAX_PACKET: usize = 2 << 20;
/// How long JetStream waits for a stored command's acknowledgement before it delivers it again
/// (a command being executed is kept with progress acknowledgements): after a crash, a
/// command is resumed within this time.
const ACK_WAIT: Duration = Duration::from_secs(6);
/// How long after its deadline a command's adapter still gets to answer.
const ANSWER_GRACE: Duration = Duration::from_secs(5);

/// The subscription filter of a command topic template: `{namespace}` becomes the uplink's
/// namespace, `{device}` the wildcard `+`, `{uplink}` and `{node}` are filled in.
pub fn filter(template: &str, namespace: &str, uplink: &str, node: &str) -> String {
    template
        .replace("{namespace}", namespace)
        .replace("{device}", "+")
        .replace("{uplink}", uplink)
        .replace("{node}", node)
}

/// Namespace and device named by `topic` under `template` (whole-level placeholders). Without
/// a `{namespace}` level the namespace is `default_namespace` (the uplink's).
pub fn device_of(template: &str, topic: &str, default_namespace: &str) -> Option<(String, String)> {
    let t: Vec<&str> = template.split('/').collect();
    let s: Vec<&str> = topic.split('/').collect();
    if t.len() != s.len() {
        return None;
    }
    let (mut ns, mut dev) = (None, None);
    for (a, b) in t.iter().zip(&s) {
        match *a {
            "{namespace}" => ns = Some(b.to_string()),
            "{device}" => dev = Some(b.to_string()),
            _ => {}
        }
    }
    let dev = dev.filter(|d| !d.is_empty())?;
    Some((ns.unwrap_or_else(|| default_namespace.to_string()), dev))
}

/// Refuses a command for a device the uplink may not command.
pub fn authorise_device(uplink: &GatewayUplink, namespace: &str, device: &str) -> Result<(), Outcome> {
    if namespace != uplink.namespace {
        return Err(Outcome::refused(
            Reason::OtherNamespace,
            format!("the uplink is in namespace {:?}", uplink.namespace),
        ));
    }
    if uplink.devices.as_ref().is_some_and(|names| !names.iter().any(|n| n == device)) {
        return Err(Outcome::refused(Reason::NotSelected, "the uplink does not select this device"));
    }
    Ok(())
}

/// Checks a stored command against the running device: the point the job writes.
fn authorise(uplink: &GatewayUplink, hub: &DeviceHub, cmd: &StoredCommand) -> Result<(RunningDevice, usize), Outcome> {
    authorise_device(uplink, &cmd.namespace, &cmd.device)?;
    let Some(dev) = hub.device(&format!("{}/{}", cmd.namespace, cmd.device)) else {
        return Err(Outcome::refused(Reason::UnknownDevice, "the device does not run on this gateway"));
    };
    let Some(index) = dev.task.device.points.iter().position(|p| p.name == cmd.point) else {
        return Err(Outcome::refused(Reason::UnknownPoint, "the device has no such point"));
    };
    if dev.task.device.points[index].access != Access::ReadWrite {
        return Err(Outcome::refused(Reason::NotWritable, "the point is not writable (access: read)"));
    }
    Ok((dev, index))
}

/// Starts the downlink of an uplink with a `commandTopic` (no-op otherwise). It stops with
/// the uplink (`task.cancel`).
pub fn start(task: &UplinkTask, hub: &Arc<DeviceHub>) {
    let Some(template) = task.uplink.mqtt.as_ref().and_then(|m| m.command_topic.clone()) else { return };
    if !template.split('/').any(|level| level == "{device}") {
        tracing::error!(uplink = %task.buffer.uplink, topic = %template, "commandTopic has no {{device}} level; commands are off");
        return;
    }
    let task = task.clone();
    let hub = Arc::clone(hub);
    let name = format!("downlink {}", task.buffer.uplink);
    tokio::spawn(crate::supervise::supervise(name, Arc::clone(&task.metrics), task.cancel.clone(), move || {
        run(task.clone(), Arc::clone(&hub), template.clone())
    }));
}

/// What intake and execution share.
struct Downlink {
    task: UplinkTask,
    hub: Arc<DeviceHub>,
    template: String,
    session: Session<()>,
    outcomes: kv::Store,
    subject: String,
}

impl Downlink {
    fn result_topic(&self, namespace: &str, device: &str) -> String {
        let t =
            crate::uplinks::render_topic(&self.template, namespace, device, &self.task.uplink.name, &self.task.node);
        format!("{t}/result")
    }

    fn count(&self, status: Status, reason: Option<Reason>) {
        let labels = CommandLabels {
            uplink: self.task.buffer.uplink.clone(),
            status: status.label(),
            reason: reason.map_or("", Reason::label),
        };
        self.task.metrics.command(labels);
    }

    /// Publishes one result. Queued for the session; a result lost with the session is one
    /// the cloud misses, never a command executed twice.
    fn publish(&self, namespace: &str, device: &str, id: Option<&str>, point: Option<&str>, o: &Outcome) {
        let mut j =
            json!({"id": id, "namespace": namespace, "device": device, "status": o.status, "atUnixMs": now_ms()});
        if let Some(p) = point {
            j["point"] = Json::String(p.to_string());
        }
        if let Some(r) = o.reason {
            j["reason"] = Json::String(r.label().to_string());
        }
        if let Some(d) = &o.detail {
            j["detail"] = Json::String(d.clone());
        }
        self.send(self.result_topic(namespace, device), j);
    }

    fn send(&self, topic: String, j: Json) {
        if let Err(e) = self.session.publish((), topic, Bytes::from(j.to_string()), None) {
            tracing::debug!(uplink = %self.task.buffer.uplink, error = %e, "command result not queued");
        }
    }

    /// Answers a repeated id from its record.
    fn duplicate(&self, cmd: &StoredCommand, recorded: Option<&Outcome>) {
        self.count(Status::Duplicate, None);
        let mut j = json!({"id": cmd.id, "namespace": cmd.namespace, "device": cmd.device, "point": cmd.point,
                           "status": Status::Duplicate, "atUnixMs": now_ms()});
        if let Some(o) = recorded {
            j["recorded"] = serde_json::to_value(o).unwrap_or(Json::Null);
        }
        self.send(self.result_topic(&cmd.namespace, &cmd.device), j);
    }

    async fn record(&self, key: &str, record: &Record) -> Result<(), String> {
        let value = serde_json::to_vec(record).map_err(|e| e.to_string())?;
        self.outcomes.put(key, Bytes::from(value)).await.map(|_| ()).map_err(|e| e.to_string())
    }

    async fn recorded(&self, key: &str) -> Result<Option<Record>, String> {
        let value = self.outcomes.get(key).await.map_err(|e| e.to_string())?;
        Ok(value.and_then(|v| serde_json::from_slice(&v).ok()))
    }

    /// Records the outcome, then publishes it, then acknowledges the stored command. Not
    /// recorded: not acknowledged (JetStream redelivers; the `started` record stands).
    async fn conclude(&self, msg: &jetstream::Message, cmd: &StoredCommand, key: &str, outcome: Outcome) {
        if let Err(e) = self.record(key, &Record::Done(outcome.clone())).await {
            tracing::warn!(uplink = %self.task.buffer.uplink, id = %cmd.id, error = %e, "command outcome not recorded; it will be redelivered");
            return;
        }
        if outcome.status == Status::Verified {
            self.publish(&cmd.namespace, &cmd.device, Some(&cmd.id), Some(&cmd.point), &Outcome::of(Status::Written));
        }
        self.publish(&cmd.namespace, &cmd.device, Some(&cmd.id), Some(&cmd.point), &outcome);
        self.count(outcome.status, outcome.reason);
        tracing::info!(uplink = %self.task.buffer.uplink, device = %format!("{}/{}", cmd.namespace, cmd.device),
            id = %cmd.id, status = outcome.status.label(), reason = outcome.reason.map_or("", Reason::label), "command done");
        if let Err(e) = msg.ack().await {
            tracing::debug!(error = %e, "stored command not acknowledged; its record answers the redelivery");
        }
    }
}

fn subject(task: &UplinkTask) -> String {
    format!("fieldgate.commands.{}.{}", task.uplink.namespace, task.uplink.name.replace('.', "_"))
}

fn record_key(cmd: &StoredCommand) -> String {
    format!("{}/{}/{}", cmd.namespace, cmd.device, cmd.id)
}

async fn ensure_stream(js: &jetstream::Context) -> Result<stream::Stream, String> {
    let config = stream::Config {
        name: STREAM.to_string(),
        description: Some("Fieldgate commands awaiting execution".into()),
        subjects: vec!["fieldgate.commands.>".into()],
        retention: RetentionPolicy::WorkQueue,
        storage: StorageType::File,
        max_age: Duration::from_secs(7 * 24 * 3600),
        max_message_size: i32::try_from(command::MAX_MESSAGE_BYTES * 4).unwrap_or(i32::MAX),
        duplicate_window: DUPLICATE_WINDOW,
        ..Default::default()
    };
    js.get_or_create_stream(config).await.map_err(|e| e.to_string())
}

async fn ensure_outcomes(js: &jetstream::Context) -> Result<kv::Store, String> {
    if let Ok(store) = js.get_key_value(OUTCOMES).await {
        return Ok(store);
    }
    js.create_key_value(kv::Config {
        bucket: OUTCOMES.to_string(),
        description: "Fieldgate: the outcome of each command id".into(),
        history: 1,
        max_age: DUPLICATE_WINDOW,
        storage: StorageType::File,
        ..Default::default()
    })
    .await
    .map_err(|e| e.to_string())
}

/// Retries `what` every 2 s until it succeeds or the uplink stops.
async fn retry<T, F, Fut>(task: &UplinkTask, what: &str, mut f: F) -> Option<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, String>>,
{
    loop {
        match f().await {
            Ok(v) => return Some(v),
            Err(e) => {
                tracing::warn!(uplink = %task.buffer.uplink, error = %e, "{what} not ready; retrying");
                tokio::select! {
                    () = task.cancel.cancelled() => return None,
                    () = tokio::time::sleep(Duration::from_secs(2)) => {}
                }
            }
        }
    }
}

async fn run(task: UplinkTask, hub: Arc<DeviceHub>, template: String) {
    let js = task.js.clone();
    let Some(stream) = retry(&task, "command stream", || ensure_stream(&js)).await else { return };
    let Some(outcomes) = retry(&task, "command outcome bucket", || ensure_outcomes(&js)).await else { return };
    // Only an MQTT uplink has a command topic.
    let Some(m) = task.link.mqtt() else { return };
    let mut endpoint = m.endpoint.clone();
    endpoint.client_id = format!("{}-commands", endpoint.client_id);
    endpoint.max_packet_bytes = SESSION_MAX_PACKET;
    let options =
        SessionOptions { persistent: true, manual_acks: true, max_in_flight: 100, capacity: 256, no_delay: true };
    let (session, mut events) = mqtt::open::<()>(&endpoint, &options);
    let d = Arc::new(Downlink { subject: subject(&task), task, hub, template, session, outcomes });
    let filter = filter(&d.template, &d.task.uplink.namespace, &d.task.uplink.name, &d.task.node);

    let execution = execute_stored(Arc::clone(&d), stream);
    tokio::pin!(execution);
    let mut delays = crate::supervise::backoff(Duration::from_millis(200), Duration::from_secs(30));
    loop {
        let ev = tokio::select! {
            () = d.task.cancel.cancelled() => return,
            () = &mut execution => return,
            ev = events.next() => ev,
        };
        match ev {
            Event::Connected => {
                delays = crate::supervise::backoff(Duration::from_millis(200), Duration::from_secs(30));
                match d.session.subscribe(&filter) {
                    Ok(()) => {
                        tracing::info!(uplink = %d.task.buffer.uplink, filter = %filter, "subscribed to commands")
                    }
                    Err(e) => {
                        tracing::warn!(uplink = %d.task.buffer.uplink, error = %e, "command subscription not queued")
                    }
                }
            }
            Event::Message(i) => intake(&d, i).await,
            Event::Subscribed { refused } if refused > 0 => {
                tracing::warn!(uplink = %d.task.buffer.uplink, filter = %filter, "the broker refused the command subscription");
            }
            Event::Subscribed { .. } | Event::Published { .. } => {}
            Event::Lost(e) => {
                tracing::debug!(uplink = %d.task.buffer.uplink, error = %e, "command session interrupted");
                let delay = delays.next().unwrap_or(Duration::from_secs(30));
                tokio::select! {
                    () = d.task.cancel.cancelled() => return,
                    () = tokio::time::sleep(delay) => {}
                }
            }
        }
    }
}

/// The `id` of a message that was refused, if it has a usable one (for the result).
fn id_of(payload: &[u8]) -> Option<String> {
    if payload.len() > command::MAX_MESSAGE_BYTES {
        return None;
    }
    let j: Json = serde_json::from_slice(payload).ok()?;
    let id = j.get("id")?.as_str()?;
    (id.len() <= command::MAX_ID_LEN).then(|| id.to_string())
}

/// Takes one message from the broker: refuses it, or stores it and then acknowledges it.
async fn intake(d: &Downlink, incoming: Incoming) {
    let ack = async |d: &Downlink, i: &Incoming| {
        if let Err(e) = d.session.ack(&i.ack).await {
            tracing::debug!(error = %e, "command acknowledgement not queued");
        }
    };
    let uplink = &d.task.uplink;
    let Some((namespace, device)) = device_of(&d.template, &incoming.topic, &uplink.namespace) else {
        // Nowhere to answer: the topic names no device.
        d.count(Status::Refused, Some(Reason::Topic));
        ack(d, &incoming).await;
        return;
    };
    let checked = authorise_device(uplink, &namespace, &device).and_then(|()| CommandMessage::parse(&incoming.payload));
    let message = match checked {
        Ok(m) => m,
        Err(refusal) => {
            d.count(Status::Refused, refusal.reason);
            tracing::debug!(uplink = %d.task.buffer.uplink, device = %format!("{namespace}/{device}"),
                reason = refusal.reason.map_or("", Reason::label), "command refused");
            d.publish(&namespace, &device, id_of(&incoming.payload).as_deref(), None, &refusal);
            ack(d, &incoming).await;
            return;
        }
    };
    let stored = StoredCommand {
        expires_unix_ms: message.expires_unix_ms(now_ms()).ok().flatten(),
        id: message.id,
        namespace,
        device,
        point: message.point,
        value: message.value,
    };
    let mut span = telemetry::command_span(
        "fieldgate.command.receive",
        SpanKind::Consumer,
        incoming.traceparent.as_deref(),
        &format!("{}/{}", stored.namespace, stored.device),
    );
    let body = match serde_json::to_vec(&stored) {
        Ok(b) => b,
        Err(e) => {
            tracing::warn!(error = %e, "command not encodable");
            return;
        }
    };
    let mut publish = PublishMessage::build().message_id(record_key(&stored)).payload(Bytes::from(body));
    if let Some(tp) = span.traceparent() {
        // The trace continues where the stored command is executed.
        publish = publish.header(telemetry::TRACEPARENT, tp.as_str());
    }
    let result = match d.task.js.send_publish(d.subject.clone(), publish).await {
        Ok(ack) => ack.await.map_err(|e| e.to_string()),
        Err(e) => Err(e.to_string()),
    };
    match result {
        Ok(pa) if pa.duplicate => {
            ack(d, &incoming).await;
            let recorded = match d.recorded(&record_key(&stored)).await {
                Ok(Some(Record::Done(o))) => Some(o),
                _ => None,
            };
            d.duplicate(&stored, recorded.as_ref());
        }
        Ok(_) => {
            ack(d, &incoming).await;
            d.publish(
                &stored.namespace,
                &stored.device,
                Some(&stored.id),
                Some(&stored.point),
                &Outcome::of(Status::Accepted),
            );
        }
        Err(e) => {
            // Not stored: not acknowledged, so the broker sends it again on the next session.
            tracing::warn!(uplink = %d.task.buffer.uplink, error = %e, "command not stored; it will be redelivered");
            span.fail("not_stored");
        }
    }
    span.end();
}

/// Reads stored commands and hands them to their devices' adapters, for as long as the
/// uplink runs; a pull stream that ends is opened again.
async fn execute_stored(d: Arc<Downlink>, stream: stream::Stream) {
    let durable = format!("commands-{}-{}", d.task.uplink.namespace, d.task.uplink.name.replace('.', "_"));
    let config = pull::Config {
        durable_name: Some(durable.clone()),
        filter_subject: d.subject.clone(),
        ack_policy: AckPolicy::Explicit,
        ack_wait: ACK_WAIT,
        max_ack_pending: 4096,
        ..Default::default()
    };
    // Ids being executed: a redelivery of one of them meanwhile is left alone.
    let mut in_progress: HashSet<String> = HashSet::new();
    let mut running: JoinSet<String> = JoinSet::new();
    loop {
        let Some(consumer) = retry(&d.task, "command consumer", || async {
            stream.get_or_create_consumer(&durable, config.clone()).await.map_err(|e| e.to_string())
        })
        .await
        else {
            return;
        };
        let Some(mut messages) =
            retry(&d.task, "command pull stream", || async { consumer.messages().await.map_err(|e| e.to_string()) })
                .await
        else {
            return;
        };
        loop {
            tokio::select! {
                () = d.task.cancel.cancelled() => return,
                Some(done) = running.join_next() => {
                    if let Ok(key) = done {
                        in_progress.remove(&key);
                    }
                }
                next = messages.next() => match next {
                    None => {
                        tracing::warn!(uplink = %d.task.buffer.uplink, "command pull stream ended; opening it again");
                        break;
                    }
                    Some(Err(e)) => tracing::debug!(uplink = %d.task.buffer.uplink, error = %e, "command pull stream error"),
                    Some(Ok(msg)) => {
                        if let Some(key) = hand_over(&d, msg, &in_progress, &mut running).await {
                            in_progress.insert(key);
                        }
                    }
                },
            }
        }
    }
}

/// Handles one stored command up to the hand-over; returns its key when it is now executing.
async fn hand_over(
    d: &Arc<Downlink>,
    msg: jetstream::Message,
    in_progress: &HashSet<String>,
    running: &mut JoinSet<String>,
) -> Option<String> {
    let Ok(cmd) = serde_json::from_slice::<StoredCommand>(&msg.payload) else {
        tracing::warn!(uplink = %d.task.buffer.uplink, "unreadable stored command dropped");
        let _ = msg.ack_with(AckKind::Term).await;
        return None;
    };
    let key = record_key(&cmd);
    if in_progress.contains(&key) {
        return None;
    }
    // Marked started before anything else: a crash from here on resumes it. The record is
    // created only where there is none (one round trip for a new command); one already there
    // is a repeat (answered from it) or an interrupted attempt (resumed).
    let started = serde_json::to_vec(&Record::Started).unwrap_or_default();
    let resume = match d.outcomes.create(&key, Bytes::from(started)).await {
        Ok(_) => false,
        Err(e) if e.kind() == kv::CreateErrorKind::AlreadyExists => match d.recorded(&key).await {
            Ok(Some(Record::Done(o))) => {
                d.duplicate(&cmd, Some(&o));
                let _ = msg.ack().await;
                return None;
            }
            Ok(Some(Record::Started) | None) => true,
            Err(e) => {
                tracing::warn!(uplink = %d.task.buffer.uplink, error = %e, "command outcomes unreadable; retrying later");
                let _ = msg.ack_with(AckKind::Nak(Some(Duration::from_secs(1)))).await;
                return None;
            }
        },
        Err(e) => {
            tracing::warn!(uplink = %d.task.buffer.uplink, error = %e, "command start not recorded; retrying later");
            let _ = msg.ack_with(AckKind::Nak(Some(Duration::from_secs(1)))).await;
            return None;
        }
    };
    let stored_tp = msg.headers.as_ref().and_then(|h| h.get(telemetry::TRACEPARENT)).map(|v| v.as_str().to_string());
    let mut span = telemetry::command_span(
        "fieldgate.command.execute",
        SpanKind::Internal,
        stored_tp.as_deref(),
        &format!("{}/{}", cmd.namespace, cmd.device),
    );
    if cmd.expired(now_ms()) {
        span.fail("expired");
        d.conclude(&msg, &cmd, &key, Outcome::of(Status::Expired)).await;
        return None;
    }
    let (device, point) = match authorise(&d.task.uplink, &d.hub, &cmd) {
        Ok(x) => x,
        Err(refusal) => {
            span.fail("refused");
            d.conclude(&msg, &cmd, &key, refusal).await;
            return None;
        }
    };
    let now = Instant::now();
    let mut deadline = now + command::MAX_EXECUTION;
    if let Some(at) = cmd.expires_unix_ms {
        deadline = deadline.min(now + Duration::from_millis(at.saturating_sub(now_ms())));
    }
    let (reply, answer) = oneshot::channel();
    let job = Job {
        id: cmd.id.clone(),
        point,
        value: cmd.value.clone(),
        expires_unix_ms: cmd.expires_unix_ms,
        deadline,
        resume,
        reply,
        trace: span.parent(),
    };
    let handed = match device.commands.try_send(job) {
        Ok(()) => None,
        Err(mpsc::error::TrySendError::Full(_)) => {
            Some(Outcome::failed(Reason::Busy, format!("{} commands wait for this device", command::DEVICE_QUEUE)))
        }
        Err(mpsc::error::TrySendError::Closed(_)) => Some(Outcome::failed(Reason::Stopped, "the device stopped")),
    };
    if let Some(outcome) = handed {
        span.fail(outcome.reason.map_or("failed", Reason::label));
        d.conclude(&msg, &cmd, &key, outcome).await;
        return None;
    }
    let d = Arc::clone(d);
    let k = key.clone();
    running.spawn(async move {
        let outcome = tokio::time::timeout_at(deadline + ANSWER_GRACE, async {
            // Still working on it: JetStream keeps it ours (a crash redelivers it in ACK_WAIT).
            let mut progress = tokio::time::interval_at(Instant::now() + ACK_WAIT / 3, ACK_WAIT / 3);
            tokio::pin!(answer);
            loop {
                tokio::select! {
                    a = &mut answer => return a,
                    _ = progress.tick() => {
                        let _ = msg.ack_with(AckKind::Progress).await;
                    }
                }
            }
        })
        .await;
        let outcome = match outcome {
            Ok(Ok(o)) => o,
            Ok(Err(_)) => Outcome::failed(Reason::Stopped, "the device's adapter stopped before answering"),
            Err(_) => Outcome::failed(Reason::Timeout, "the device's adapter did not answer in time"),
        };
        match outcome.reason {
            None => span.ok(),
            Some(r) => span.fail(r.label()),
        }
        span.end();
        d.conclude(&msg, &cmd, &k, outcome).await;
        k
    });
    Some(key)
}

#[cfg(test)]
mod tests {
    use super::*;

    const T: &str = "fieldgate/{namespace}/{device}/commands";

    #[test]
    fn the_filter_is_the_uplinks_own_namespace() {
        assert_eq!(filter(T, "plant-a", "cloud", "n1"), "fieldgate/plant-a/+/commands");
        assert_eq!(filter("site/{node}/{device}/cmd", "a", "u", "n1"), "site/n1/+/cmd");
    }

    #[test]
    fn topics_name_the_device() {
        assert_eq!(device_of(T, "fieldgate/plant-a/plc-1/commands", "x"), Some(("plant-a".into(), "plc-1".into())));
        assert_eq!(device_of(T, "fieldgate/plant-a/commands", "x"), None);
        assert_eq!(device_of("c/{device}", "c/plc", "a"), Some(("a".into(), "plc".into())));
        assert_eq!(device_of("c/{device}", "c/", "a"), None);
    }

    fn uplink(devices: Option<Vec<&str>>) -> GatewayUplink {
        serde_json::from_value(json!({"namespace": "a", "name": "cloud", "devices": devices,
            "mqtt": {"url": "mqtt://h:1883"}}))
        .unwrap()
    }

    #[test]
    fn an_uplink_commands_only_the_devices_it_selects_in_its_namespace() {
        let reason = |r: Result<(), Outcome>| r.unwrap_err().reason.unwrap();
        let u = uplink(Some(vec!["valve"]));
        assert!(authorise_device(&u, "a", "valve").is_ok());
        assert_eq!(reason(authorise_device(&u, "b", "valve")), Reason::OtherNamespace);
        assert_eq!(reason(authorise_device(&u, "a", "pump")), Reason::NotSelected);
        // Without a rendered list (standalone), every device of the namespace.
        let all = uplink(None);
        assert!(authorise_device(&all, "a", "pump").is_ok());
        assert_eq!(reason(authorise_device(&all, "b", "pump")), Reason::OtherNamespace);
    }
}
