//! The buffer: one JetStream stream per uplink on the node's disk, and the writer that puts
//! readings into it.
//!
//! A reading is *accepted* once JetStream acknowledged it (PubAck); until then it is only in
//! flight. Publishes are pipelined (a bounded number await their PubAck at once) and carry the
//! reading id as `Nats-Msg-Id`, so a publish retried after a timeout or a NATS restart is
//! stored once. A reading JetStream refuses is dropped and counted with its reason.
//!
//! Streams use interest retention: an entry leaves the disk once its uplink's consumer acked
//! it, which the uplink does only after the cloud broker's PUBACK. `maxBytes`/`maxAge` bound
//! what an outage can pile up; `onFull` chooses between evicting the oldest entries
//! (`dropOldest`, JetStream discard-old) and refusing new ones (`rejectNew`, discard-new).
//! Durability against power loss is the nats-server's `jetstream.sync_interval` setting
//! (`always` fsyncs every write; the default `2m` trades that for throughput).

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::context::{PublishError, PublishErrorKind};
use async_nats::jetstream::message::PublishMessage;
use async_nats::jetstream::stream::{self, DiscardPolicy, RetentionPolicy, StorageType};
use async_nats::jetstream::{self, ErrorCode};
use bytes::Bytes;
use fieldgate_crds::quantity::parse_bytes;
use fieldgate_crds::validate::parse_duration;
use fieldgate_crds::{GatewayConfig, GatewayUplink, OnFull};
use futures::StreamExt;
use futures::stream::FuturesUnordered;
use prost::Message;
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;
use tracing::{debug, info, warn};

use crate::metrics::{DropReason, Metrics, UplinkLabels};
use crate::reading::{AcceptanceTracker, Submission};
use crate::supervise::backoff;
use crate::telemetry::{StageSpan, append_span};

/// Default `maxBytes` of an uplink buffer.
pub const DEFAULT_MAX_BYTES: u64 = 1 << 30;
/// Default `maxAge` of an uplink buffer.
pub const DEFAULT_MAX_AGE: Duration = Duration::from_secs(72 * 3600);
/// Default `redeliverAfter` of an uplink buffer.
pub const DEFAULT_REDELIVER_AFTER: Duration = Duration::from_secs(30);
/// How long JetStream remembers message ids to drop re-published duplicates.
pub const DUPLICATE_WINDOW: Duration = Duration::from_secs(120);

/// Something went wrong talking to JetStream.
#[derive(Debug, thiserror::Error)]
pub enum BufferError {
    /// The stream could not be created or updated.
    #[error("stream {stream}: {source}")]
    Stream {
        /// Stream name.
        stream: String,
        /// Cause.
        #[source]
        source: async_nats::Error,
    },
    /// The uplink's consumer could not be created or read.
    #[error("consumer of stream {stream}: {source}")]
    Consumer {
        /// Stream name.
        stream: String,
        /// Cause.
        #[source]
        source: async_nats::Error,
    },
}

impl BufferError {
    /// A static label for metrics.
    pub fn kind(&self) -> &'static str {
        match self {
            BufferError::Stream { .. } => "stream",
            BufferError::Consumer { .. } => "consumer",
        }
    }
}

/// The buffer of one uplink, as configured.
#[derive(Clone, Debug, PartialEq)]
pub struct UplinkBuffer {
    /// `namespace/name` of the uplink.
    pub uplink: String,
    /// JetStream stream name.
    pub stream: String,
    /// The one subject of the stream.
    pub subject: String,
    /// Most bytes kept.
    pub max_bytes: u64,
    /// Oldest entry kept.
    pub max_age: Duration,
    /// Policy when full.
    pub on_full: OnFull,
    /// Ack wait of the uplink's consumer: when an unacknowledged delivery is sent again.
    pub redeliver_after: Duration,
}

/// JetStream stream name of an uplink (`.` is not allowed in stream names and `_` is not
/// allowed in Kubernetes names, so the mapping is one-to-one).
pub fn stream_name(namespace: &str, uplink: &str) -> String {
    format!("fieldgate_{namespace}_{}", uplink.replace('.', "_"))
}

/// Subject of an uplink's stream.
pub fn subject(namespace: &str, uplink: &str) -> String {
    format!("fieldgate.{namespace}.{}", uplink.replace('.', "_"))
}

impl UplinkBuffer {
    /// The buffer of a validated uplink, defaults applied.
    pub fn new(u: &GatewayUplink) -> Self {
        let b = u.buffer.clone().unwrap_or_default();
        Self {
            uplink: format!("{}/{}", u.namespace, u.name),
            stream: stream_name(&u.namespace, &u.name),
            subject: subject(&u.namespace, &u.name),
            max_bytes: b.max_bytes.as_deref().and_then(|s| parse_bytes(s).ok()).unwrap_or(DEFAULT_MAX_BYTES),
            max_age: b.max_age.as_deref().and_then(|s| parse_duration(s).ok()).unwrap_or(DEFAULT_MAX_AGE),
            on_full: b.on_full.unwrap_or_default(),
            redeliver_after: b
                .redeliver_after
                .as_deref()
                .and_then(|s| parse_duration(s).ok())
                .unwrap_or(DEFAULT_REDELIVER_AFTER),
        }
    }

    /// The stream configuration.
    pub fn stream_config(&self) -> stream::Config {
        stream::Config {
            name: self.stream.clone(),
            description: Some(format!("Fieldgate buffer of uplink {}", self.uplink)),
            subjects: vec![self.subject.clone()],
            retention: RetentionPolicy::Interest,
            storage: StorageType::File,
            num_replicas: 1,
            max_bytes: i64::try_from(self.max_bytes).unwrap_or(i64::MAX),
            max_age: self.max_age,
            discard: match self.on_full {
                OnFull::DropOldest => DiscardPolicy::Old,
                OnFull::RejectNew => DiscardPolicy::New,
            },
            duplicate_window: DUPLICATE_WINDOW.min(self.max_age),
            ..Default::default()
        }
    }

    /// Creates the stream, or updates its limits to the configured ones. Idempotent.
    pub async fn ensure_stream(&self, js: &jetstream::Context) -> Result<stream::Stream, BufferError> {
        let err = |source: async_nats::Error| BufferError::Stream { stream: self.stream.clone(), source };
        js.create_or_update_stream(self.stream_config()).await.map_err(|e| err(e.into()))?;
        let s = js.get_stream(&self.stream).await.map_err(|e| err(e.into()))?;
        debug!(stream = %self.stream, "buffer stream ready");
        Ok(s)
    }
}

/// Where each device's readings go: the buffers of the uplinks that select it.
#[derive(Clone, Debug, Default)]
pub struct Routes {
    buffers: Vec<Arc<UplinkBuffer>>,
    /// namespace -> device -> indexes into `buffers`.
    by_device: HashMap<String, HashMap<String, Vec<usize>>>,
}

impl Routes {
    /// The routes of a validated config.
    pub fn new(cfg: &GatewayConfig) -> Self {
        let buffers: Vec<Arc<UplinkBuffer>> = cfg.uplinks.iter().map(|u| Arc::new(UplinkBuffer::new(u))).collect();
        let mut by_device: HashMap<String, HashMap<String, Vec<usize>>> = HashMap::new();
        for d in &cfg.devices {
            let targets: Vec<usize> =
                cfg.uplinks.iter().enumerate().filter(|(_, u)| u.selects(d)).map(|(i, _)| i).collect();
            by_device.entry(d.namespace.clone()).or_default().insert(d.name.clone(), targets);
        }
        Self { buffers, by_device }
    }

    /// The uplink buffers.
    pub fn buffers(&self) -> &[Arc<UplinkBuffer>] {
        &self.buffers
    }

    fn targets(&self, namespace: &str, device: &str) -> &[usize] {
        self.by_device.get(namespace).and_then(|devices| devices.get(device)).map(Vec::as_slice).unwrap_or(&[])
    }
}

/// Why JetStream did not take a publish.
#[derive(Debug, PartialEq, Eq)]
enum Refusal {
    Full,
    TooLarge,
    Transient,
}

fn classify(e: &PublishError) -> Refusal {
    match e.kind() {
        PublishErrorKind::MaxPayloadExceeded => Refusal::TooLarge,
        PublishErrorKind::Other => {
            let api = std::error::Error::source(e).and_then(|s| s.downcast_ref::<jetstream::Error>());
            match api.map(jetstream::Error::error_code) {
                // nats-server answers a full discard-new stream with "maximum bytes/messages
                // exceeded" under the store-failed code.
                Some(ErrorCode::STREAM_STORE_FAILED) => Refusal::Full,
                Some(ErrorCode::STREAM_MESSAGE_EXCEEDS_MAXIMUM) => Refusal::TooLarge,
                _ => Refusal::Transient,
            }
        }
        _ => Refusal::Transient,
    }
}

/// Publishes one entry until JetStream accepts it, refuses it for good, or `give_up_after`.
async fn publish_until_accepted(
    js: jetstream::Context,
    subject: String,
    id: String,
    payload: Bytes,
    give_up_after: Duration,
    span: StageSpan,
) -> Result<(), DropReason> {
    let traceparent = span.traceparent();
    let outcome = async {
        let deadline = Instant::now() + give_up_after;
        let mut delays = backoff(Duration::from_millis(50), Duration::from_secs(2));
        let mut attempts: i64 = 0;
        loop {
            attempts += 1;
            let mut publish = PublishMessage::build().message_id(&id).payload(payload.clone());
            if let Some(tp) = &traceparent {
                // Sampled readings only: the trace continues in the uplink that delivers it.
                publish = publish.header(TRACEPARENT_HEADER, tp.as_str());
            }
            let result = match js.send_publish(subject.clone(), publish).await {
                Ok(ack) => ack.await.map(|_| ()),
                Err(e) => Err(e),
            };
            let refusal = match result {
                Ok(()) => return (Ok(()), attempts),
                Err(e) => {
                    let refusal = classify(&e);
                    debug!(subject = %subject, id = %id, error = %e, ?refusal, "publish not accepted");
                    refusal
                }
            };
            match refusal {
                Refusal::Full => return (Err(DropReason::buffer_full_rejected), attempts),
                Refusal::TooLarge => return (Err(DropReason::too_large), attempts),
                Refusal::Transient if Instant::now() >= deadline => {
                    return (Err(DropReason::buffer_unavailable), attempts);
                }
                Refusal::Transient => {
                    let delay = delays.next().unwrap_or(Duration::from_secs(2));
                    tokio::time::sleep(delay).await;
                }
            }
        }
    };
    let (result, attempts) = outcome.await;
    let mut span = span;
    if span.is_recording() {
        span.attributes(|| vec![opentelemetry::KeyValue::new("fieldgate.publish.attempts", attempts)]);
        match result {
            Ok(()) => span.ok(),
            Err(reason) => span.fail(reason.as_str()),
        }
        span.end();
    }
    result
}

/// The JetStream header carrying a sampled reading's trace context.
pub const TRACEPARENT_HEADER: async_nats::HeaderName =
    async_nats::HeaderName::from_static(crate::telemetry::TRACEPARENT);

/// Settings of the buffer writer.
#[derive(Clone, Debug)]
pub struct WriterSettings {
    /// Publishes awaiting their PubAck at once.
    pub max_in_flight: usize,
    /// How long a publish is retried while JetStream is unreachable before the reading is
    /// dropped (`buffer_unavailable`).
    pub give_up_after: Duration,
}

impl Default for WriterSettings {
    fn default() -> Self {
        Self { max_in_flight: 1024, give_up_after: Duration::from_secs(30) }
    }
}

/// Drains the adapters' queue into JetStream until every sender is gone, then waits for the
/// outstanding PubAcks: nothing handed to the writer is left unresolved in memory. If
/// `abandon` fires first (the shutdown grace period ran out), the publishes still awaiting a
/// PubAck are counted as dropped (`buffer_unavailable`) before it returns.
///
/// `routes` may change while it runs (a config reload): each reading goes to the routes in
/// force when the writer takes it.
pub async fn run_writer(
    js: jetstream::Context,
    routes: watch::Receiver<Arc<Routes>>,
    metrics: Arc<Metrics>,
    settings: WriterSettings,
    mut rx: mpsc::Receiver<Submission>,
    abandon: tokio_util::sync::CancellationToken,
) {
    let mut in_flight = FuturesUnordered::new();
    // Publishes awaiting their PubAck, per uplink: counted as drops if the grace runs out.
    let mut pending: HashMap<String, u64> = HashMap::new();
    let mut accepted: HashMap<String, prometheus_client::metrics::counter::Counter> = HashMap::new();
    let mut open = true;
    while open || !in_flight.is_empty() {
        tokio::select! {
            biased;
            () = abandon.cancelled() => {
                rx.close();
                let current = Arc::clone(&routes.borrow());
                while let Ok(reading) = rx.try_recv() {
                    for &route in current.targets(&reading.namespace, &reading.device) {
                        *pending.entry(current.buffers()[route].uplink.clone()).or_default() += 1;
                    }
                }
                for (uplink, n) in pending.iter().filter(|(_, n)| **n > 0) {
                    warn!(uplink = %uplink, dropped = n, "shutdown grace ran out: readings not yet accepted are dropped");
                    metrics
                        .readings_dropped
                        .get_or_create(&crate::metrics::DropLabels {
                            uplink: uplink.clone(),
                            reason: DropReason::buffer_unavailable,
                        })
                        .inc_by(*n);
                }
                return;
            }
            Some((buffer, result)) = in_flight.next(), if !in_flight.is_empty() => {
                let buffer: Arc<UplinkBuffer> = buffer;
                if let Some(n) = pending.get_mut(&buffer.uplink) {
                    *n = n.saturating_sub(1);
                }
                match result {
                    Ok(()) => {
                        // One series per uplink, looked up once: this runs for every reading.
                        match accepted.get(&buffer.uplink) {
                            Some(counter) => {
                                counter.inc();
                            }
                            None => {
                                let counter = metrics
                                    .readings_accepted
                                    .get_or_create(&UplinkLabels { uplink: buffer.uplink.clone() })
                                    .clone();
                                counter.inc();
                                accepted.insert(buffer.uplink.clone(), counter);
                            }
                        }
                    }
                    Err(reason) => metrics.dropped(&buffer.uplink, reason),
                }
            }
            next = rx.recv(), if open && in_flight.len() < settings.max_in_flight => {
                let Some(mut reading) = next else {
                    open = false;
                    info!(pending = in_flight.len(), "buffer writer draining");
                    continue;
                };
                let current = Arc::clone(&routes.borrow());
                let targets = current.targets(&reading.namespace, &reading.device);
                if targets.is_empty() {
                    let mut span = append_span(reading.trace.as_ref(), "none", "", &reading.id);
                    span.fail(DropReason::no_uplink.as_str());
                    span.end();
                    metrics.dropped("none", DropReason::no_uplink);
                    if let Some(tx) = reading.accepted.take() {
                        let _ = tx.send(Err(DropReason::no_uplink));
                    }
                    continue;
                }
                let payload = Bytes::from(reading.encode_to_vec());
                // Tells a waiting adapter once every route resolved (see `submit_confirmed`).
                let tracker = reading
                    .accepted
                    .take()
                    .map(|tx| Arc::new(AcceptanceTracker::new(targets.len(), tx)));
                for &route in targets {
                    let b = Arc::clone(&current.buffers()[route]);
                    let span = append_span(reading.trace.as_ref(), &b.uplink, &b.subject, &reading.id);
                    let fut = publish_until_accepted(
                        js.clone(),
                        b.subject.clone(),
                        reading.id.clone(),
                        payload.clone(),
                        settings.give_up_after,
                        span,
                    );
                    match pending.get_mut(&b.uplink) {
                        Some(n) => *n += 1,
                        None => {
                            pending.insert(b.uplink.clone(), 1);
                        }
                    }
                    let tracker = tracker.clone();
                    in_flight.push(async move {
                        let outcome = fut.await;
                        if let Some(t) = tracker {
                            t.resolve(outcome);
                        }
                        (b, outcome)
                    });
                }
            }
        }
    }
    warn_if_dropped(&metrics, &routes.borrow());
    info!("buffer writer stopped");
}

fn warn_if_dropped(metrics: &Metrics, routes: &Routes) {
    for b in routes.buffers() {
        let rejected = metrics
            .readings_dropped
            .get_or_create(&crate::metrics::DropLabels {
                uplink: b.uplink.clone(),
                reason: DropReason::buffer_unavailable,
            })
            .get();
        if rejected > 0 {
            warn!(uplink = %b.uplink, dropped = rejected, "readings were dropped because JetStream was unavailable");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_map_one_to_one_onto_jetstream() {
        assert_eq!(stream_name("plant-a", "cloud.eu"), "fieldgate_plant-a_cloud_eu");
        assert_eq!(subject("plant-a", "cloud.eu"), "fieldgate.plant-a.cloud_eu");
    }

    #[test]
    fn policy_and_limits_reach_the_stream() {
        let cfg = GatewayConfig::from_yaml(
            r#"
apiVersion: fieldgate.io/v1alpha1
kind: GatewayConfig
uplinks:
- name: up
  mqtt: {url: "mqtt://127.0.0.1:1883"}
  buffer: {maxBytes: 64Ki, maxAge: 1h, onFull: rejectNew, redeliverAfter: 2s}
"#,
        )
        .unwrap();
        let b = UplinkBuffer::new(&cfg.uplinks[0]);
        let s = b.stream_config();
        assert_eq!(s.max_bytes, 65_536);
        assert_eq!(s.max_age, Duration::from_secs(3600));
        assert_eq!(s.discard, DiscardPolicy::New);
        assert_eq!(s.retention, RetentionPolicy::Interest);
        assert_eq!(s.storage, StorageType::File);
        assert_eq!(b.redeliver_after, Duration::from_secs(2));
    }
}
