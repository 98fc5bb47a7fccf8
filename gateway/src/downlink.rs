//! Commands from the cloud to the devices (the downlink).
//!
//! Per uplink with a `commandTopic`, beside (not inside) the uplink driver:
//!
//! 1. **Intake.** Its own MQTT session on the uplink's broker (client id `<uplink client
//!    id>-commands`, persistent session, manual acks) subscribed to the command topic with
//!    `{namespace}` and `{device}` as wildcards. A command is stored in the JetStream stream
//!    `fieldgate_commands` (subject per uplink, `Nats-Msg-Id` = `namespace/device/id`) and
//!    only then acknowledged to the cloud broker, and answered `accepted`. A command id seen
//!    again within the stream's duplicate window (24 h) is answered `duplicate` and never
//!    executed twice.
//! 2. **Execution.** A durable consumer takes the stored commands one at a time. An expired
//!    command is answered `expired` and not executed; an unknown device or point `failed`; a
//!    point without `access: readWrite` (or in a read-only Modbus table) `refused`. Otherwise
//!    the device's protocol executes it: Modbus TCP and RTU write the point (single register,
//!    multiple registers or coil), answer `written`, read it back and answer `verified` or
//!    `failed` (on a shared RTU bus the write goes before queued reads); CoAP PUT/POST to the
//!    device's resource and MQTT publish to the device's `commandTopic` are answered `written`
//!    once the device or its broker acknowledged them; a TCP device gets the frame
//!    `{"command": id, "point", "value"}` on its live connection, `written` once sent; a UDP
//!    device gets it as a datagram to the source of its last authenticated datagram, `written`
//!    once sent, `failed` when it sent none in the last 2 minutes
//!    ([`crate::adapters::udp::COMMAND_PEER_MAX_AGE`]).
//! 3. **Results** are published (QoS 1) on `<command topic>/result` as
//!    `{"id", "namespace", "device", "point", "status", "reason"?, "atUnixMs"}`.
//!
//! A command is acked in JetStream after its result was handed to the MQTT client, so a
//! crash during execution executes it again at the next start (writes are idempotent).
//!
//! Command message: `{"id": "c-17", "point": "setpoint", "value": 21.5,
//! "expiresAt": "2026-01-01T00:00:00Z" | "ttl": "30s"}` (at least one of `expiresAt`/`ttl`
//! is recommended; without them a command does not expire).

use std::borrow::Cow;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use async_nats::jetstream::consumer::{AckPolicy, pull};
use async_nats::jetstream::message::PublishMessage;
use async_nats::jetstream::stream::{self, RetentionPolicy, StorageType};
use async_nats::jetstream::{self, AckKind};
use bytes::Bytes;
use fieldgate_crds::validate::parse_duration;
use fieldgate_crds::{Access, Connection, ModbusTable, Point, ValueType, WordOrder};
use futures::StreamExt;
use rumqttc::{TlsConfiguration, Transport};
use serde_json::{Value as Json, json};
use tokio::sync::mpsc;
use tokio_modbus::{Request, Response};

use crate::adapters::DeviceTask;
use crate::adapters::hub::DeviceHub;
use crate::adapters::modbus_rtu::{Answer, Op};
use crate::metrics::IngressLabels;
use crate::reading;
use crate::telemetry::{self, StageSpan};
use crate::uplinks::UplinkTask;
use opentelemetry::trace::SpanKind;

/// The JetStream stream holding commands until they are executed.
pub const STREAM: &str = "fieldgate_commands";
/// How long a command id is remembered (a repeated id within it is not executed again).
pub const DUPLICATE_WINDOW: Duration = Duration::from_secs(24 * 3600);
const EXECUTE_TIMEOUT: Duration = Duration::from_secs(10);

/// A command as received.
#[derive(Clone, Debug, PartialEq)]
pub struct Command {
    /// Id given by the cloud.
    pub id: String,
    /// Namespace of the device.
    pub namespace: String,
    /// Device name.
    pub device: String,
    /// Point written.
    pub point: String,
    /// Value written.
    pub value: Json,
    /// Expiry (Unix ms), if any.
    pub expires_unix_ms: Option<u64>,
}

/// Why a command message was refused at intake.
#[derive(Debug, PartialEq, thiserror::Error)]
pub enum CommandError {
    /// Not a JSON object.
    #[error("not a JSON object")]
    Json,
    /// A required field is missing or not a string.
    #[error("missing or invalid {0:?}")]
    Field(&'static str),
    /// The topic does not name a device.
    #[error("the topic does not name a device")]
    Topic,
}

impl CommandError {
    /// A static label for metrics.
    pub fn kind(&self) -> &'static str {
        match self {
            CommandError::Json => "json",
            CommandError::Field(_) => "field",
            CommandError::Topic => "topic",
        }
    }
}

fn now_ms() -> u64 {
    reading::unix_nanos(SystemTime::now()) / 1_000_000
}

/// The subscription filter of a command topic template: `{namespace}` and `{device}` become
/// `+`, `{uplink}` and `{node}` are filled in.
pub fn filter(template: &str, uplink: &str, node: &str) -> String {
    template.replace("{namespace}", "+").replace("{device}", "+").replace("{uplink}", uplink).replace("{node}", node)
}

/// Namespace and device named by `topic` under `template` (whole-level placeholders).
pub fn device_of(template: &str, topic: &str) -> Option<(String, String)> {
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
    Some((ns?, dev?))
}

/// Parses a command message received on `topic`.
pub fn parse(template: &str, topic: &str, payload: &[u8]) -> Result<Command, CommandError> {
    let Ok(Json::Object(o)) = serde_json::from_slice::<Json>(payload) else { return Err(CommandError::Json) };
    let text = |k: &'static str| o.get(k).and_then(Json::as_str).map(str::to_string).ok_or(CommandError::Field(k));
    let (namespace, device) = match device_of(template, topic) {
        Some(d) => d,
        None => (text("namespace").map_err(|_| CommandError::Topic)?, text("device").map_err(|_| CommandError::Topic)?),
    };
    let id = text("id")?;
    if id.is_empty() || id.len() > 128 {
        return Err(CommandError::Field("id"));
    }
    let value = o.get("value").cloned().ok_or(CommandError::Field("value"))?;
    let expires_unix_ms = match (o.get("expiresAt"), o.get("ttl")) {
        (Some(Json::String(at)), _) => {
            let t = humantime::parse_rfc3339_weak(at).map_err(|_| CommandError::Field("expiresAt"))?;
            Some(reading::unix_nanos(t) / 1_000_000)
        }
        (Some(Json::Number(n)), _) => Some(n.as_u64().ok_or(CommandError::Field("expiresAt"))?),
        (Some(_), _) => return Err(CommandError::Field("expiresAt")),
        (None, Some(Json::String(ttl))) => {
            Some(now_ms() + parse_duration(ttl).map_err(|_| CommandError::Field("ttl"))?.as_millis() as u64)
        }
        (None, Some(_)) => return Err(CommandError::Field("ttl")),
        (None, None) => None,
    };
    Ok(Command { id, namespace, device, point: text("point")?, value, expires_unix_ms })
}

impl Command {
    fn to_json(&self) -> Json {
        json!({"id": self.id, "namespace": self.namespace, "device": self.device, "point": self.point,
               "value": self.value, "expiresUnixMs": self.expires_unix_ms})
    }

    fn from_json(j: &Json) -> Option<Self> {
        Some(Self {
            id: j["id"].as_str()?.to_string(),
            namespace: j["namespace"].as_str()?.to_string(),
            device: j["device"].as_str()?.to_string(),
            point: j["point"].as_str()?.to_string(),
            value: j["value"].clone(),
            expires_unix_ms: j["expiresUnixMs"].as_u64(),
        })
    }
}

/// The outcome of a command, as published.
#[derive(Clone, Debug, PartialEq)]
pub struct Outcome {
    /// `accepted`, `duplicate`, `written`, `verified`, `failed`, `expired`, `refused`.
    pub status: &'static str,
    /// Why, for failures and refusals.
    pub reason: Option<String>,
}

impl Outcome {
    fn of(status: &'static str) -> Self {
        Self { status, reason: None }
    }
    fn why(status: &'static str, reason: impl Into<String>) -> Self {
        Self { status, reason: Some(reason.into()) }
    }
}

// ---------------------------------------------------------------------------------------------
// Execution

/// What a Modbus write puts on the wire.
#[derive(Clone, Debug, PartialEq)]
pub enum Write {
    /// One coil.
    Coil(bool),
    /// Registers from the point's address.
    Registers(Vec<u16>),
}

/// Encodes `value` for a writable Modbus point (scale and offset reversed).
pub fn encode(point: &Point, value: &Json) -> Result<Write, String> {
    let Some(m) = &point.modbus else { return Err("the point has no Modbus location".into()) };
    if !m.table.is_writable() {
        return Err(format!("the {:?} table is read-only", m.table));
    }
    let bad = || format!("{value} does not fit type {:?}", point.value_type);
    match point.value_type {
        ValueType::Bool => {
            let b = match value {
                Json::Bool(b) => *b,
                Json::Number(n) if n.as_u64() == Some(0) => false,
                Json::Number(n) if n.as_u64() == Some(1) => true,
                _ => return Err(bad()),
            };
            match (m.table, m.bit) {
                (ModbusTable::Coil, _) => Ok(Write::Coil(b)),
                (_, Some(_)) => Err("a bit of a register cannot be written alone".into()),
                _ => Ok(Write::Registers(vec![u16::from(b)])),
            }
        }
        ValueType::String => {
            let s = value.as_str().ok_or_else(bad)?;
            let len = usize::from(m.length.unwrap_or(0)) * 2;
            if s.len() > len || !s.is_ascii() {
                return Err(format!("text longer than {len} ASCII characters"));
            }
            let mut bytes = s.as_bytes().to_vec();
            bytes.resize(len, 0);
            Ok(Write::Registers(bytes.chunks(2).map(|c| u16::from_be_bytes([c[0], c[1]])).collect()))
        }
        t => {
            let x = value.as_f64().ok_or_else(bad)?;
            let raw = (x - point.offset.unwrap_or(0.0)) / point.scale.unwrap_or(1.0);
            let int = |lo: f64, hi: f64| -> Result<i128, String> {
                let r = raw.round();
                if !(lo..=hi).contains(&r) || (raw - r).abs() > 1e-6 * raw.abs().max(1.0) && !point.is_scaled() {
                    return Err(bad());
                }
                Ok(r as i128)
            };
            let bits: u64 = match t {
                ValueType::Int16 => int(i16::MIN.into(), i16::MAX.into())? as i16 as u16 as u64,
                ValueType::Uint16 => int(0.0, u16::MAX.into())? as u64,
                ValueType::Int32 => int(i32::MIN.into(), i32::MAX.into())? as i32 as u32 as u64,
                ValueType::Uint32 => int(0.0, u32::MAX.into())? as u64,
                ValueType::Int64 => int(i64::MIN as f64, i64::MAX as f64)? as i64 as u64,
                ValueType::Uint64 => int(0.0, u64::MAX as f64)? as u64,
                ValueType::Float32 => u64::from((raw as f32).to_bits()),
                ValueType::Float64 => raw.to_bits(),
                ValueType::Bool | ValueType::String => return Err(bad()),
            };
            let n = usize::from(t.registers().unwrap_or(1));
            let mut words: Vec<u16> = (0..n).rev().map(|i| (bits >> (16 * i)) as u16).collect();
            if m.word_order == Some(WordOrder::LittleEndian) {
                words.reverse();
            }
            Ok(Write::Registers(words))
        }
    }
}

fn write_request(address: u16, w: &Write) -> Request<'static> {
    match w {
        Write::Coil(b) => Request::WriteSingleCoil(address, *b),
        Write::Registers(words) if words.len() == 1 => Request::WriteSingleRegister(address, words[0]),
        Write::Registers(words) => Request::WriteMultipleRegisters(address, Cow::Owned(words.clone())),
    }
}

fn read_back_request(address: u16, w: &Write) -> Request<'static> {
    match w {
        Write::Coil(_) => Request::ReadCoils(address, 1),
        Write::Registers(words) => {
            Request::ReadHoldingRegisters(address, u16::try_from(words.len()).unwrap_or(u16::MAX))
        }
    }
}

fn matches_read_back(w: &Write, r: &Response) -> Result<(), String> {
    match (w, r) {
        (Write::Coil(b), Response::ReadCoils(bits)) if bits.first() == Some(b) => Ok(()),
        (Write::Registers(words), Response::ReadHoldingRegisters(got)) if got == words => Ok(()),
        (_, other) => Err(format!("read back {other:?} instead of what was written")),
    }
}

/// Writes through `call` (one Modbus request at a time), then reads back and compares.
async fn modbus_write<F, Fut>(address: u16, w: Write, mut call: F, results: &Results<'_>, span: &StageSpan) -> Outcome
where
    F: FnMut(Request<'static>) -> Fut,
    Fut: std::future::Future<Output = Result<Response, String>>,
{
    let mut write = telemetry::child_span(span, "fieldgate.device.write", SpanKind::Client);
    if let Err(e) = call(write_request(address, &w)).await {
        write.fail("write");
        write.end();
        return Outcome::why("failed", format!("write: {e}"));
    }
    write.ok();
    write.end();
    results.publish(Outcome::of("written")).await;
    let mut readback = telemetry::child_span(span, "fieldgate.device.readback", SpanKind::Client);
    let outcome = match call(read_back_request(address, &w)).await {
        Ok(r) => match matches_read_back(&w, &r) {
            Ok(()) => Outcome::of("verified"),
            Err(e) => Outcome::why("failed", e),
        },
        Err(e) => Outcome::why("failed", format!("read back: {e}")),
    };
    if outcome.status == "verified" {
        readback.ok();
    } else {
        readback.fail("mismatch");
    }
    readback.end();
    outcome
}

/// Executes a stored command on its device.
async fn execute(hub: &Arc<DeviceHub>, cmd: &Command, results: &Results<'_>, span: &StageSpan) -> Outcome {
    if cmd.expires_unix_ms.is_some_and(|at| now_ms() >= at) {
        return Outcome::of("expired");
    }
    let key = format!("{}/{}", cmd.namespace, cmd.device);
    let Some(task) = hub.device(&key) else { return Outcome::why("failed", "unknown device") };
    let Some(point) = task.device.points.iter().find(|p| p.name == cmd.point).cloned() else {
        return Outcome::why("failed", "unknown point");
    };
    if point.access != Access::ReadWrite {
        return Outcome::why("refused", "the point is not writable (access: read)");
    }
    let outcome = tokio::time::timeout(EXECUTE_TIMEOUT, execute_on(&task, &point, cmd, results, span)).await;
    let outcome = outcome.unwrap_or_else(|_| Outcome::why("failed", format!("no answer within {EXECUTE_TIMEOUT:?}")));
    if outcome.status == "failed" {
        task.count_error("command");
    }
    outcome
}

async fn execute_on(
    task: &DeviceTask,
    point: &Point,
    cmd: &Command,
    results: &Results<'_>,
    span: &StageSpan,
) -> Outcome {
    let modbus_write_of = |point: &Point| -> Result<(u16, Write), Outcome> {
        let address = point.modbus.as_ref().map_or(0, |m| m.address);
        encode(point, &cmd.value).map(|w| (address, w)).map_err(|e| Outcome::why("refused", e))
    };
    let object = || {
        let path = point.path.clone().unwrap_or_else(|| point.name.clone());
        let mut o = serde_json::Map::new();
        o.insert(path, cmd.value.clone());
        Json::Object(o)
    };
    match &task.device.connection {
        Connection::ModbusTcp(c) => {
            let (address, w) = match modbus_write_of(point) {
                Ok(x) => x,
                Err(o) => return o,
            };
            let timeout = c.timeout();
            let addr = format!("{}:{}", c.host, c.port());
            let connect = async {
                let a =
                    tokio::net::lookup_host(&addr).await?.next().ok_or_else(|| std::io::Error::other("no address"))?;
                tokio_modbus::client::tcp::connect_slave(a, tokio_modbus::Slave(c.unit_id())).await
            };
            let mut ctx = match tokio::time::timeout(timeout, connect).await {
                Ok(Ok(ctx)) => ctx,
                Ok(Err(e)) => return Outcome::why("failed", format!("connect: {e}")),
                Err(_) => return Outcome::why("failed", "connect: timed out"),
            };
            let ctx = tokio::sync::Mutex::new(&mut ctx);
            modbus_write(
                address,
                w,
                |req| {
                    let ctx = &ctx;
                    async move {
                        let mut ctx = ctx.lock().await;
                        match tokio::time::timeout(timeout, tokio_modbus::client::Client::call(&mut **ctx, req)).await {
                            Ok(Ok(Ok(r))) => Ok(r),
                            Ok(Ok(Err(exception))) => Err(format!("exception {exception}")),
                            Ok(Err(e)) => Err(e.to_string()),
                            Err(_) => Err("timed out".to_string()),
                        }
                    }
                },
                results,
                span,
            )
            .await
        }
        Connection::ModbusRtu(c) => {
            let (address, w) = match modbus_write_of(point) {
                Ok(x) => x,
                Err(o) => return o,
            };
            let bus = task.hub.buses.get(c);
            modbus_write(
                address,
                w,
                |req| {
                    let bus = Arc::clone(&bus);
                    async move {
                        match bus.run(c.unit_id, Op::Call(req)).await {
                            Some(Answer::Call(Ok(r))) => Ok(r),
                            Some(Answer::Call(Err(e))) => Err(e.to_string()),
                            Some(Answer::Unavailable(why)) => Err(format!("line unavailable: {why}")),
                            Some(Answer::Read(_)) | None => Err("the bus stopped".into()),
                        }
                    }
                },
                results,
                span,
            )
            .await
        }
        Connection::Coap(c) => {
            let plain = task.device.points.len() == 1 && !cmd.value.is_object();
            let payload = if plain { plain_text(&cmd.value) } else { object().to_string() };
            match crate::adapters::coap::send_command(c, coap_lite::RequestType::Put, payload.into_bytes()).await {
                Ok(()) => Outcome::of("written"),
                Err(e) => Outcome::why("failed", e.to_string()),
            }
        }
        Connection::Mqtt(m) => {
            let mut o = object();
            if let Json::Object(map) = &mut o {
                map.insert("commandId".into(), Json::String(cmd.id.clone()));
            }
            match crate::adapters::mqtt_ingest::publish_command(m, task, Bytes::from(o.to_string()), EXECUTE_TIMEOUT)
                .await
            {
                Ok(()) => Outcome::of("written"),
                Err(e) => Outcome::why("failed", e),
            }
        }
        Connection::Tcp(r) => {
            let line = json!({"command": cmd.id, "point": cmd.point, "value": cmd.value}).to_string();
            let id = crate::adapters::tcp::device_id(r, &task.device);
            match crate::adapters::tcp::send_command(&task.hub, &id, line).await {
                Ok(()) => Outcome::of("written"),
                Err(e) => Outcome::why("failed", e),
            }
        }
        Connection::Udp(_) => {
            // Sent where the device's last authenticated datagram came from, if recent enough.
            let line = json!({"command": cmd.id, "point": cmd.point, "value": cmd.value}).to_string();
            match crate::adapters::udp::send_command(&task.hub, &task.key(), line).await {
                Ok(()) => Outcome::of("written"),
                Err(e) => Outcome::why("failed", e),
            }
        }
    }
}

fn plain_text(v: &Json) -> String {
    match v {
        Json::String(s) => s.clone(),
        other => other.to_string(),
    }
}

// ---------------------------------------------------------------------------------------------
// Wiring

/// Publishes results of one command.
struct Results<'a> {
    client: &'a CommandClient,
    topic: String,
    cmd: &'a Command,
}

impl Results<'_> {
    async fn publish(&self, o: Outcome) {
        let mut j = json!({"id": self.cmd.id, "namespace": self.cmd.namespace, "device": self.cmd.device,
                           "point": self.cmd.point, "status": o.status, "atUnixMs": now_ms()});
        if let Some(r) = &o.reason {
            j["reason"] = Json::String(r.clone());
        }
        self.client.publish(self.topic.clone(), Bytes::from(j.to_string())).await;
    }
}

#[derive(Clone)]
enum CommandClient {
    V4(rumqttc::AsyncClient),
    V5(rumqttc::v5::AsyncClient),
}

impl CommandClient {
    async fn publish(&self, topic: String, payload: Bytes) {
        // Queued for the session; a result lost with the session is a result the cloud misses,
        // never a command executed twice.
        let r = match self {
            CommandClient::V4(c) => {
                c.publish(topic, rumqttc::QoS::AtLeastOnce, false, payload).await.map_err(|e| e.to_string())
            }
            CommandClient::V5(c) => c
                .publish(topic, rumqttc::v5::mqttbytes::QoS::AtLeastOnce, false, payload)
                .await
                .map_err(|e| e.to_string()),
        };
        if let Err(e) = r {
            tracing::debug!(error = %e, "command result not queued");
        }
    }
}

/// One command as received: topic, payload, and what acknowledges it to the broker.
struct Incoming {
    topic: String,
    payload: Bytes,
    /// The cloud's W3C trace context (MQTT v5 user property `traceparent`).
    traceparent: Option<String>,
    ack: Ack,
}

enum Ack {
    V4(rumqttc::Publish),
    V5(rumqttc::v5::mqttbytes::v5::Publish),
}

/// Starts the downlink of an uplink with a `commandTopic` (no-op otherwise). It stops with
/// the uplink (`task.cancel`).
pub fn start(task: &UplinkTask, hub: &Arc<DeviceHub>) {
    let Some(template) = task.uplink.mqtt.command_topic.clone() else { return };
    let task = task.clone();
    let hub = Arc::clone(hub);
    let name = format!("downlink {}", task.buffer.uplink);
    tokio::spawn(crate::supervise::supervise(name, Arc::clone(&task.metrics), task.cancel.clone(), move || {
        run(task.clone(), Arc::clone(&hub), template.clone())
    }));
}

fn subject(task: &UplinkTask) -> String {
    format!("fieldgate.commands.{}.{}", task.uplink.namespace, task.uplink.name.replace('.', "_"))
}

async fn ensure_stream(js: &jetstream::Context) -> Result<stream::Stream, String> {
    let config = stream::Config {
        name: STREAM.to_string(),
        description: Some("Fieldgate commands awaiting execution".into()),
        subjects: vec!["fieldgate.commands.>".into()],
        retention: RetentionPolicy::WorkQueue,
        storage: StorageType::File,
        max_age: Duration::from_secs(7 * 24 * 3600),
        duplicate_window: DUPLICATE_WINDOW,
        ..Default::default()
    };
    js.get_or_create_stream(config).await.map_err(|e| e.to_string())
}

fn count(task: &UplinkTask, reason: &'static str) {
    task.metrics.ingress_messages.get_or_create(&IngressLabels { protocol: "command", reason }).inc();
}

async fn run(task: UplinkTask, hub: Arc<DeviceHub>, template: String) {
    let stream = loop {
        match ensure_stream(&task.js).await {
            Ok(s) => break s,
            Err(e) => {
                tracing::warn!(uplink = %task.buffer.uplink, error = %e, "command stream not ready; retrying");
                tokio::select! {
                    () = task.cancel.cancelled() => return,
                    () = tokio::time::sleep(Duration::from_secs(2)) => {}
                }
            }
        }
    };
    let m = &task.mqtt;
    let client_id = format!("{}-commands", m.client_id);
    let transport = match &m.tls {
        Some(cfg) => Transport::tls_with_config(TlsConfiguration::Rustls(Arc::clone(cfg))),
        None => Transport::tcp(),
    };
    let (client, mut events): (CommandClient, Events) = if m.version == 3 {
        let mut o = rumqttc::MqttOptions::new(client_id, &m.host, m.port);
        o.set_keep_alive(m.keep_alive).set_clean_session(false).set_manual_acks(true).set_transport(transport);
        if let Some((u, p)) = &m.credentials {
            o.set_credentials(u.clone(), String::from_utf8_lossy(p.expose()).into_owned());
        }
        let (c, el) = rumqttc::AsyncClient::new(o, 64);
        (CommandClient::V4(c), Events::V4(el))
    } else {
        let mut o = rumqttc::v5::MqttOptions::new(client_id, &m.host, m.port);
        o.set_keep_alive(m.keep_alive)
            .set_clean_start(false)
            .set_session_expiry_interval(Some(24 * 3600))
            .set_manual_acks(true)
            .set_transport(transport);
        if let Some((u, p)) = &m.credentials {
            o.set_credentials(u.clone(), String::from_utf8_lossy(p.expose()).into_owned());
        }
        let (c, el) = rumqttc::v5::AsyncClient::new(o, 64);
        (CommandClient::V5(c), Events::V5(el))
    };
    let filter = filter(&template, &task.uplink.name, &task.node);
    let (tx, mut rx) = mpsc::channel::<Incoming>(64);
    let poller = {
        let client = client.clone();
        let filter = filter.clone();
        let cancel = task.cancel.clone();
        let uplink = task.buffer.uplink.clone();
        tokio::spawn(async move {
            let mut delays = crate::supervise::backoff(Duration::from_millis(200), Duration::from_secs(30));
            loop {
                let ev = tokio::select! {
                    () = cancel.cancelled() => return,
                    ev = events.poll() => ev,
                };
                match ev {
                    Ok(Polled::Connected) => {
                        delays = crate::supervise::backoff(Duration::from_millis(200), Duration::from_secs(30));
                        let r = match &client {
                            CommandClient::V4(c) => {
                                c.try_subscribe(filter.clone(), rumqttc::QoS::AtLeastOnce).map_err(|e| e.to_string())
                            }
                            CommandClient::V5(c) => c
                                .try_subscribe(filter.clone(), rumqttc::v5::mqttbytes::QoS::AtLeastOnce)
                                .map_err(|e| e.to_string()),
                        };
                        match r {
                            Ok(()) => tracing::info!(uplink = %uplink, filter = %filter, "subscribed to commands"),
                            Err(e) => tracing::warn!(uplink = %uplink, error = %e, "command subscription not queued"),
                        }
                    }
                    Ok(Polled::Message(i)) => {
                        if tx.send(i).await.is_err() {
                            return;
                        }
                    }
                    Ok(Polled::Other) => {}
                    Err(e) => {
                        tracing::debug!(uplink = %uplink, error = %e, "command session interrupted");
                        let delay = delays.next().unwrap_or(Duration::from_secs(30));
                        tokio::select! {
                            () = cancel.cancelled() => return,
                            () = tokio::time::sleep(delay) => {}
                        }
                    }
                }
            }
        })
    };
    let _poller = AbortOnDrop(poller);

    let subject = subject(&task);
    let consumer = match stream
        .get_or_create_consumer(
            &format!("commands-{}-{}", task.uplink.namespace, task.uplink.name.replace('.', "_")),
            pull::Config {
                durable_name: Some(format!(
                    "commands-{}-{}",
                    task.uplink.namespace,
                    task.uplink.name.replace('.', "_")
                )),
                filter_subject: subject.clone(),
                ack_policy: AckPolicy::Explicit,
                ack_wait: Duration::from_secs(60),
                ..Default::default()
            },
        )
        .await
    {
        Ok(c) => c,
        Err(e) => {
            tracing::warn!(uplink = %task.buffer.uplink, error = %e, "command consumer not ready");
            tokio::select! {
                () = task.cancel.cancelled() => return,
                () = tokio::time::sleep(Duration::from_secs(2)) => return,
            }
        }
    };
    let mut stored = match consumer.messages().await {
        Ok(m) => m,
        Err(e) => {
            tracing::warn!(uplink = %task.buffer.uplink, error = %e, "command consumer not readable");
            return;
        }
    };
    let result_topic = |cmd: &Command| {
        format!(
            "{}/result",
            crate::uplinks::render_topic(&template, &cmd.namespace, &cmd.device, &task.uplink.name, &task.node)
        )
    };
    loop {
        tokio::select! {
            () = task.cancel.cancelled() => return,
            Some(incoming) = rx.recv() => {
                intake(&task, &client, &template, &subject, incoming, &result_topic).await;
            }
            Some(msg) = stored.next() => {
                let msg = match msg {
                    Ok(m) => m,
                    Err(e) => {
                        tracing::debug!(error = %e, "command stream read failed");
                        continue;
                    }
                };
                let Some(cmd) = serde_json::from_slice::<Json>(&msg.payload).ok().as_ref().and_then(Command::from_json) else {
                    let _ = msg.ack_with(AckKind::Term).await;
                    continue;
                };
                let results = Results { client: &client, topic: result_topic(&cmd), cmd: &cmd };
                let stored_tp = msg
                    .headers
                    .as_ref()
                    .and_then(|h| h.get(telemetry::TRACEPARENT))
                    .map(|v| v.as_str().to_string());
                let mut span = telemetry::command_span(
                    "fieldgate.command.execute",
                    SpanKind::Internal,
                    stored_tp.as_deref(),
                    &format!("{}/{}", cmd.namespace, cmd.device),
                );
                let outcome = execute(&hub, &cmd, &results, &span).await;
                match outcome.status {
                    "failed" | "refused" | "expired" => span.fail(outcome.status),
                    _ => span.ok(),
                }
                span.end();
                tracing::info!(uplink = %task.buffer.uplink, device = %format!("{}/{}", cmd.namespace, cmd.device),
                    id = %cmd.id, status = outcome.status, reason = outcome.reason.as_deref().unwrap_or(""), "command executed");
                count(&task, outcome.status);
                results.publish(outcome).await;
                let _ = msg.ack().await;
            }
        }
    }
}

/// Stores a received command in JetStream, then acknowledges it to the broker.
async fn intake(
    task: &UplinkTask,
    client: &CommandClient,
    template: &str,
    subject: &str,
    incoming: Incoming,
    result_topic: &impl Fn(&Command) -> String,
) {
    let ack = |client: &CommandClient, a: Ack| {
        let client = client.clone();
        async move {
            let _ = match (&client, &a) {
                (CommandClient::V4(c), Ack::V4(p)) => c.ack(p).await.map_err(|e| e.to_string()),
                (CommandClient::V5(c), Ack::V5(p)) => c.ack(p).await.map_err(|e| e.to_string()),
                _ => Ok(()),
            };
        }
    };
    if incoming.topic.ends_with("/result") {
        // Our own results, if the filter happens to match them.
        ack(client, incoming.ack).await;
        return;
    }
    let cmd = match parse(template, &incoming.topic, &incoming.payload) {
        Ok(c) => c,
        Err(e) => {
            count(task, "malformed");
            tracing::debug!(topic = %incoming.topic, kind = e.kind(), error = %e, "command refused");
            ack(client, incoming.ack).await;
            return;
        }
    };
    let mut span = telemetry::command_span(
        "fieldgate.command.receive",
        SpanKind::Consumer,
        incoming.traceparent.as_deref(),
        &format!("{}/{}", cmd.namespace, cmd.device),
    );
    let msg_id = format!("{}/{}/{}", cmd.namespace, cmd.device, cmd.id);
    let mut publish = PublishMessage::build().message_id(&msg_id).payload(Bytes::from(cmd.to_json().to_string()));
    if let Some(tp) = span.traceparent() {
        // The trace continues where the stored command is executed.
        publish = publish.header(telemetry::TRACEPARENT, tp.as_str());
    }
    let stored = match task.js.send_publish(subject.to_string(), publish).await {
        Ok(ack) => ack.await.map_err(|e| e.to_string()),
        Err(e) => Err(e.to_string()),
    };
    let results = Results { client, topic: result_topic(&cmd), cmd: &cmd };
    match stored {
        Ok(pa) if pa.duplicate => {
            count(task, "duplicate");
            ack(client, incoming.ack).await;
            results.publish(Outcome::why("duplicate", "this command id was received before")).await;
        }
        Ok(_) => {
            ack(client, incoming.ack).await;
            results.publish(Outcome::of("accepted")).await;
        }
        Err(e) => {
            // Not stored: not acknowledged, so the broker sends it again on the next session.
            tracing::warn!(uplink = %task.buffer.uplink, error = %e, "command not stored; it will be redelivered");
            count(task, "not_stored");
            span.fail("not_stored");
        }
    }
    span.end();
}

// One per uplink session: the size difference does not matter.
#[allow(clippy::large_enum_variant)]
enum Events {
    V4(rumqttc::EventLoop),
    V5(rumqttc::v5::EventLoop),
}

#[allow(clippy::large_enum_variant)] // short-lived, one at a time
enum Polled {
    Connected,
    Message(Incoming),
    Other,
}

impl Events {
    async fn poll(&mut self) -> Result<Polled, String> {
        match self {
            Events::V4(el) => Ok(match el.poll().await.map_err(|e| e.to_string())? {
                rumqttc::Event::Incoming(rumqttc::Packet::ConnAck(_)) => Polled::Connected,
                rumqttc::Event::Incoming(rumqttc::Packet::Publish(p)) => Polled::Message(Incoming {
                    topic: p.topic.clone(),
                    payload: p.payload.clone(),
                    traceparent: None,
                    ack: Ack::V4(p),
                }),
                _ => Polled::Other,
            }),
            Events::V5(el) => {
                use rumqttc::v5::mqttbytes::v5::Packet;
                Ok(match el.poll().await.map_err(|e| e.to_string())? {
                    rumqttc::v5::Event::Incoming(Packet::ConnAck(_)) => Polled::Connected,
                    rumqttc::v5::Event::Incoming(Packet::Publish(p)) => Polled::Message(Incoming {
                        topic: String::from_utf8_lossy(&p.topic).into_owned(),
                        payload: p.payload.clone(),
                        traceparent: p.properties.as_ref().and_then(|props| {
                            props
                                .user_properties
                                .iter()
                                .find(|(k, _)| k == telemetry::TRACEPARENT)
                                .map(|(_, v)| v.clone())
                        }),
                        ack: Ack::V5(p),
                    }),
                    _ => Polled::Other,
                })
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

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    const T: &str = "fieldgate/{namespace}/{device}/commands";

    #[test]
    fn topics_name_the_device() {
        assert_eq!(filter(T, "cloud", "n1"), "fieldgate/+/+/commands");
        assert_eq!(device_of(T, "fieldgate/plant-a/plc-1/commands"), Some(("plant-a".into(), "plc-1".into())));
        assert_eq!(device_of(T, "fieldgate/plant-a/commands"), None);
    }

    #[test]
    fn commands_parse_with_expiry() {
        let c =
            parse(T, "fieldgate/default/plc/commands", br#"{"id":"c1","point":"sp","value":12,"ttl":"30s"}"#).unwrap();
        assert_eq!((c.id.as_str(), c.device.as_str(), c.value.clone()), ("c1", "plc", json!(12)));
        assert!(c.expires_unix_ms.unwrap() > now_ms());
        let c = parse(
            T,
            "fieldgate/default/plc/commands",
            br#"{"id":"c2","point":"sp","value":1,"expiresAt":"2020-01-01T00:00:00Z"}"#,
        )
        .unwrap();
        assert_eq!(c.expires_unix_ms, Some(1_577_836_800_000));
        assert_eq!(parse(T, "fieldgate/default/plc/commands", b"{").unwrap_err(), CommandError::Json);
        assert_eq!(
            parse(T, "fieldgate/default/plc/commands", br#"{"point":"sp","value":1}"#).unwrap_err(),
            CommandError::Field("id")
        );
        assert_eq!(Command::from_json(&c.to_json()), Some(c));
    }

    fn point(t: &str, table: &str, extra: Json) -> Point {
        let mut p = json!({"name": "p", "type": t, "access": "readWrite", "modbus": {"table": table, "address": 4}});
        if let (Json::Object(o), Json::Object(e)) = (&mut p, extra) {
            o.extend(e);
        }
        serde_json::from_value(p).unwrap()
    }

    #[test]
    fn values_are_encoded_like_they_are_decoded() {
        assert_eq!(encode(&point("uint16", "holding", json!({})), &json!(1234)), Ok(Write::Registers(vec![1234])));
        assert_eq!(encode(&point("int16", "holding", json!({})), &json!(-2)), Ok(Write::Registers(vec![0xfffe])));
        assert_eq!(
            encode(&point("uint32", "holding", json!({})), &json!(0x1234_5678)),
            Ok(Write::Registers(vec![0x1234, 0x5678]))
        );
        let le = point(
            "uint32",
            "holding",
            json!({"modbus": {"table": "holding", "address": 4, "wordOrder": "littleEndian"}}),
        );
        assert_eq!(encode(&le, &json!(0x1234_5678)), Ok(Write::Registers(vec![0x5678, 0x1234])));
        assert_eq!(encode(&point("float32", "holding", json!({})), &json!(1.5)), Ok(Write::Registers(vec![0x3fc0, 0])));
        assert_eq!(
            encode(&point("int16", "holding", json!({"scale": 0.1})), &json!(21.5)),
            Ok(Write::Registers(vec![215]))
        );
        assert_eq!(encode(&point("bool", "coil", json!({})), &json!(true)), Ok(Write::Coil(true)));
        assert!(encode(&point("uint16", "holding", json!({})), &json!(70000)).is_err());
        assert!(encode(&point("uint16", "holding", json!({})), &json!(1.5)).is_err());
        assert!(encode(&point("uint16", "input", json!({})), &json!(1)).is_err());
        // And back: the reference decoder reads what was written.
        let p = point("int32", "holding", json!({}));
        let Ok(Write::Registers(words)) = encode(&p, &json!(-70000)) else { panic!() };
        let back =
            crate::adapters::modbus_tcp::decode(&p, crate::adapters::modbus_tcp::Raw::Registers(&words)).unwrap();
        assert_eq!(back.value, Some(reading::Value::IntValue(-70000)));
    }
}
