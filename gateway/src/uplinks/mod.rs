//! Uplinks: the shared driver that moves readings from an uplink's JetStream buffer to the
//! cloud, and one file per uplink kind that builds the [`Link`] doing the delivery.
//!
//! The driver pulls entries from the uplink's durable consumer, keeps a bounded window of
//! readings in flight, and settles each entry through the delivery [`core`]: acked once every
//! reading in it is confirmed by the link (for MQTT: a PUBACK with a success reason) or refused
//! for good (terminated and counted, `refused`); a reading refused for a transient reason makes
//! its entry come back after a capped exponential delay, with only its unsettled readings sent
//! again; a lost link gives every unanswered entry back. The consumer has no `max_deliver`:
//! a transient failure, however long, never turns into a silent drop (the buffer's `maxAge`
//! and `maxBytes` bound what waits, and every reading they drop is counted).
//!
//! While a backlog waits and the broker is unreachable, the driver probes it every
//! [`PROBE_EVERY`], so that delivery resumes within seconds of the broker coming back; only a
//! broker that answers and refuses the connection (CONNACK failure) is retried with a long,
//! growing delay. A gap in the buffer's sequence seen by the consumer is an entry the buffer
//! policy dropped, and is counted with its reason.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::consumer::{AckPolicy, DeliverPolicy, pull};
use async_nats::jetstream::{self, AckKind, stream};
use fieldgate_crds::{GatewayUplink, OnFull};
use futures::StreamExt;
use prost::Message as _;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::buffer::{BufferError, UplinkBuffer, entry_range, entry_readings, entry_traces};
use crate::encoding::{Encoder, SessionPlan};
use crate::metrics::{DeliveryLabels, DeliveryOutcome, DropReason, Metrics, UplinkLabels};
use crate::reading::{self, Reading};
use crate::supervise::backoff;
use crate::telemetry::{self, BufferEntry, LogThrottle, StageSpan};

pub mod core;
pub mod link;
pub mod mqtt;
mod ranges;

use self::core::{Core, Outcome, Ready, RetryDelays, Settle};
pub use link::{Delivery, Link, LinkEvent, Outgoing, Token};
use mqtt::{MqttLink, MqttSettings};

/// How often an unreachable broker is tried again while the uplink waits to deliver.
pub const PROBE_EVERY: Duration = Duration::from_secs(1);

/// An uplink failure.
#[derive(Debug, thiserror::Error)]
pub enum UplinkError {
    /// The link's send queue refused a delivery.
    #[error("send queue: {0}")]
    Queue(String),
    /// The buffer side failed.
    #[error(transparent)]
    Buffer(#[from] BufferError),
}

impl UplinkError {
    /// A static label for metrics.
    pub fn kind(&self) -> &'static str {
        match self {
            UplinkError::Queue(_) => "queue",
            UplinkError::Buffer(e) => e.kind(),
        }
    }
}

/// Name of each uplink's durable consumer (one stream per uplink, so one name suffices).
pub const CONSUMER: &str = "uplink";

/// Everything the driver needs to run one uplink.
#[derive(Clone)]
pub struct UplinkTask {
    /// The uplink.
    pub uplink: Arc<GatewayUplink>,
    /// Its buffer.
    pub buffer: UplinkBuffer,
    /// Its resolved broker settings.
    pub mqtt: MqttSettings,
    /// JetStream.
    pub js: jetstream::Context,
    /// The gateway's metrics.
    pub metrics: Arc<Metrics>,
    /// The gateway node, for topics and messages.
    pub node: String,
    /// Cancelled at shutdown: stop pulling, finish in-flight deliveries within `grace`.
    pub cancel: CancellationToken,
    /// Time allowed to finish in-flight deliveries at shutdown.
    pub grace: Duration,
}

/// Creates (or updates) the uplink's durable consumer. Returns it with the stream sequence of
/// the last entry it delivered before (0 for a new consumer), where this run's accounting
/// starts.
pub async fn ensure_consumer(
    stream: &mut stream::Stream,
    buffer: &UplinkBuffer,
    window: u16,
) -> Result<(jetstream::consumer::Consumer<pull::Config>, u64), BufferError> {
    let err = |e: async_nats::Error| BufferError::Consumer { stream: buffer.stream.clone(), source: e };
    let delivered = match stream.consumer_info(CONSUMER).await {
        Ok(info) => info.delivered.stream_sequence,
        Err(_) => 0,
    };
    let config = pull::Config {
        durable_name: Some(CONSUMER.to_string()),
        description: Some(format!("Fieldgate uplink {}", buffer.uplink)),
        ack_policy: AckPolicy::Explicit,
        ack_wait: buffer.redeliver_after,
        deliver_policy: DeliverPolicy::All,
        max_ack_pending: i64::from(window) * 4,
        ..Default::default()
    };
    let consumer = match stream.create_consumer(config).await {
        Ok(c) => c,
        Err(e) => {
            warn!(stream = %buffer.stream, error = %e, "could not update the uplink consumer; using it as it is");
            stream.get_consumer(CONSUMER).await.map_err(err)?
        }
    };
    Ok((consumer, delivered))
}

impl self::core::Entry for jetstream::Message {
    fn seq(&self) -> u64 {
        self.info().map(|i| i.stream_sequence).unwrap_or(0)
    }

    fn deliveries(&self) -> i64 {
        self.info().map(|i| i.delivered).unwrap_or(1)
    }

    async fn settle(self, how: Settle) {
        let kind = match how {
            Settle::Ack => AckKind::Ack,
            Settle::Nak(delay) => AckKind::Nak(delay),
            Settle::Term => AckKind::Term,
        };
        // A lost ack means a redelivery: the readings go again under their ids.
        if let Err(e) = self.ack_with(kind).await {
            debug!(error = %e, ?how, "JetStream ack failed");
        }
    }
}

/// One reading on its way to the cloud (the core hands it back with its outcome).
struct InFlight {
    sent: Instant,
    sampled_unix_nano: u64,
    /// `fieldgate.uplink.publish`, ended at the answer (recorded for sampled readings only).
    span: StageSpan,
}

impl std::fmt::Debug for InFlight {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("InFlight").field("sent", &self.sent).finish_non_exhaustive()
    }
}

/// The metric series every confirmed delivery updates, looked up once (on the first
/// confirmation, so the series appear only once there is something to count).
struct ConfirmedMetrics {
    acked: prometheus_client::metrics::counter::Counter,
    delivery_latency: prometheus_client::metrics::histogram::Histogram,
    sample_to_cloud_latency: prometheus_client::metrics::histogram::Histogram,
}

/// Everything the driver loop keeps between events.
struct Driver {
    task: UplinkTask,
    confirmed_metrics: Option<ConfirmedMetrics>,
    labels: UplinkLabels,
    /// The uplink's encoding, built once; asked for a session plan at each new link.
    encoder: Encoder,
    window: usize,
    /// The entries being delivered and the readings in flight.
    core: Core<jetstream::Message, InFlight>,
    /// The first `buffer_seq` this driver has not seen delivered (`None`: learnt from the
    /// next entry).
    expected: Option<u64>,
    /// Set when the run started after entries it cannot read any more: the stream sequence of
    /// the last entry delivered before. Entries after it that vanished unseen are counted,
    /// without their readings' exact number.
    unknown_after: Option<u64>,
    topics: HashMap<String, String, foldhash::fast::RandomState>,
    stream: Option<stream::Stream>,
    /// Refusals are logged at most once a minute (each one is counted).
    refusal_log: LogThrottle,
}

async fn next_message(m: &mut Option<pull::Stream>) -> Option<Result<jetstream::Message, String>> {
    match m {
        Some(s) => s.next().await.map(|r| r.map_err(|e| e.to_string())),
        None => std::future::pending().await,
    }
}

async fn next_event<L: Link>(link: &mut Option<L>) -> LinkEvent {
    match link {
        Some(l) => l.next_event().await,
        None => std::future::pending().await,
    }
}

/// Fills a topic template.
pub fn render_topic(template: &str, namespace: &str, device: &str, uplink: &str, node: &str) -> String {
    template
        .replace("{namespace}", namespace)
        .replace("{device}", device)
        .replace("{uplink}", uplink)
        .replace("{node}", node)
}

/// The readings an entry at stream sequence `seq` covers, if it is there and readable.
async fn entry_at(stream: &stream::Stream, seq: u64) -> Option<(u64, u64)> {
    let m = stream.get_raw_message(seq).await.ok()?;
    entry_range(Some(&m.headers))
}

impl Driver {
    fn outcome(&self, outcome: DeliveryOutcome) {
        self.task
            .metrics
            .deliveries
            .get_or_create(&DeliveryLabels { uplink: self.labels.uplink.clone(), outcome })
            .inc();
    }

    /// Where this run's accounting starts: after the last entry the consumer delivered before.
    async fn start_accounting(&mut self, stream: &stream::Stream, delivered: u64) {
        self.expected = None;
        self.unknown_after = None;
        if delivered == 0 {
            // A new consumer: nothing delivered before it to account for.
            return;
        }
        if let Some((first, n)) = entry_at(stream, delivered).await {
            self.expected = Some(first + n);
        } else if let Some((first, _)) = entry_at(stream, delivered + 1).await {
            self.expected = Some(first);
        } else {
            self.unknown_after = Some(delivered);
        }
    }

    /// Gives every unanswered entry back to JetStream for immediate redelivery.
    async fn release_all(&mut self) {
        let outcomes = self.core.release_all().await;
        self.outcomes(outcomes);
    }

    /// Counts and traces what happened to readings sent out.
    fn outcomes(&mut self, outcomes: Vec<Outcome<InFlight>>) {
        for o in outcomes {
            match o {
                Outcome::Confirmed(f) => self.confirmed(f),
                Outcome::Refused { tag: mut f, reason, permanent } => {
                    if f.span.is_recording() {
                        f.span
                            .event("mqtt.puback", || vec![opentelemetry::KeyValue::new("mqtt.reason", reason.clone())]);
                        f.span.fail("refused");
                        f.span.end();
                    }
                    self.outcome(DeliveryOutcome::refused);
                    if permanent {
                        self.task.metrics.dropped(&self.labels.uplink, DropReason::refused);
                    }
                    if let Some(held_back) = self.refusal_log.allow() {
                        if permanent {
                            warn!(uplink = %self.labels.uplink, %reason, held_back, "the cloud refused a reading for good; it is dropped and counted (refused)");
                        } else {
                            warn!(uplink = %self.labels.uplink, %reason, held_back, "the cloud refused a reading for now; it is sent again after a growing delay");
                        }
                    }
                }
                Outcome::Interrupted(mut f) => {
                    f.span.fail("interrupted");
                    f.span.end();
                    self.outcome(DeliveryOutcome::interrupted);
                }
            }
        }
    }

    /// The `buffer_seq` of the first reading still in the stream: `Some(None)` when the stream
    /// is empty, `None` when the buffer cannot tell now.
    async fn first_present(&mut self) -> Option<Option<u64>> {
        let s = self.stream.as_mut()?;
        let st = s.info().await.ok()?.state.clone();
        if st.messages == 0 {
            return Some(None);
        }
        entry_at(s, st.first_sequence).await.map(|(first, _)| Some(first))
    }

    /// A first delivery skipped the readings `from..to`. Those below the stream's first entry
    /// are gone (evicted or expired) and counted now. Those still in the stream were handed to
    /// a pull stream that was closed (link lost) before passing them on: JetStream redelivers
    /// them after `redeliverAfter`, so they are tracked like released ones, and counted only if
    /// the buffer drops them before that.
    async fn skipped(&mut self, from: u64, to: u64) {
        let gone_to = match self.first_present().await {
            Some(Some(first)) => first.clamp(from, to),
            Some(None) => to,
            None => from,
        };
        debug!(uplink = %self.labels.uplink, from, gone_to, to, "first delivery skipped readings");
        self.count_gap(gone_to - from, false).await;
        self.core.released.insert(gone_to, to);
    }

    /// The first entry this run sees (stream sequence `seq`, first reading `first`) when it
    /// could not tell where its accounting starts. Earlier entries still in the stream come
    /// back and are tracked like released ones; earlier entries gone unseen since the last one
    /// delivered before this run are counted, one reading each at least.
    async fn first_sight(&mut self, seq: u64, first: u64) {
        let Some(s) = self.stream.as_mut() else { return };
        let Ok(info) = s.info().await else { return };
        let first_seq = info.state.first_sequence;
        if let Some(d) = self.unknown_after.take() {
            let gone = seq.min(first_seq).saturating_sub(d + 1);
            self.count_gap(gone, true).await;
        }
        if first_seq < seq
            && let Some(s) = &self.stream
            && let Some((present, _)) = entry_at(s, first_seq).await
        {
            self.core.released.insert(present, first);
        }
    }

    /// Counts `missing` readings the buffer policy dropped (`at_least`: a lower bound, the
    /// entries that held them being gone unread).
    async fn count_gap(&mut self, missing: u64, at_least: bool) {
        if missing == 0 {
            return;
        }
        let full = match (&mut self.stream, self.task.buffer.on_full) {
            (Some(s), OnFull::DropOldest) => s
                .info()
                .await
                .map(|i| i.state.bytes.saturating_mul(10) >= self.task.buffer.max_bytes.saturating_mul(9))
                .unwrap_or(true),
            _ => false,
        };
        let reason = if full { DropReason::buffer_full_evicted } else { DropReason::max_age_expired };
        self.task.metrics.dropped_n(&self.labels.uplink, reason, missing);
        if at_least {
            warn!(uplink = %self.labels.uplink, entries = missing, ?reason, "buffer entries expired while no gateway was delivering them; counted as one reading each, they may have held more");
        } else {
            warn!(uplink = %self.labels.uplink, dropped = missing, ?reason, "buffered readings were dropped by the buffer policy");
        }
    }

    /// Hands a buffered entry's readings not settled yet to the core, which sends them on
    /// `link`.
    async fn deliver<L: Link>(&mut self, link: &mut L, msg: jetstream::Message) {
        let (seq, delivered, info_published) = match msg.info() {
            Ok(i) => (i.stream_sequence, i.delivered, i.published),
            Err(e) => {
                debug!(error = %e, "message without JetStream metadata");
                return;
            }
        };
        if delivered > 1 {
            self.task.metrics.redeliveries.get_or_create(&self.labels).inc();
        }
        let Some((first, n)) = entry_range(msg.headers.as_ref()) else {
            warn!(uplink = %self.labels.uplink, seq, "buffer entry without its Fieldgate-Seq/Fieldgate-Readings headers dropped");
            self.task.metrics.dropped(&self.labels.uplink, DropReason::undecodable);
            let _ = msg.ack_with(AckKind::Term).await;
            return;
        };
        // A redelivery can be this driver's first sight of an entry too: one a closed pull
        // stream had prefetched (a link loss) comes back only after `redeliverAfter`.
        match self.expected {
            Some(e) if first > e => self.skipped(e, first).await,
            Some(_) => {}
            None => self.first_sight(seq, first).await,
        }
        if self.expected.is_none_or(|e| e < first + n) {
            self.expected = Some(first + n);
        }
        let readings = match entry_readings(&msg.payload) {
            Ok(r) if r.len() as u64 == n => r,
            Ok(r) => {
                warn!(uplink = %self.labels.uplink, seq, readings = r.len(), expected = n, "buffer entry with the wrong number of readings dropped");
                self.task.metrics.dropped_n(&self.labels.uplink, DropReason::undecodable, n);
                self.core.released.remove(first, first + n);
                let _ = msg.ack_with(AckKind::Term).await;
                return;
            }
            Err(e) => {
                warn!(uplink = %self.labels.uplink, seq, error = %e, "undecodable buffer entry dropped");
                self.task.metrics.dropped_n(&self.labels.uplink, DropReason::undecodable, n);
                self.core.released.remove(first, first + n);
                let _ = msg.ack_with(AckKind::Term).await;
                return;
            }
        };
        let traces = entry_traces(msg.headers.as_ref());
        let mut ready = Vec::with_capacity(readings.len());
        let mut undecodable = Vec::new();
        for (i, raw) in readings.iter().enumerate() {
            if self.core.is_settled(seq, i) {
                continue;
            }
            let buffer_seq = first + i as u64;
            let reading = match Reading::decode(*raw) {
                Ok(r) => r,
                Err(e) => {
                    warn!(uplink = %self.labels.uplink, buffer_seq, error = %e, "undecodable buffered reading dropped");
                    self.task.metrics.dropped(&self.labels.uplink, DropReason::undecodable);
                    undecodable.push(i);
                    continue;
                }
            };
            let topic = match self.topics.get(&reading.device) {
                Some(t) => t.clone(),
                None => {
                    let t = render_topic(
                        &self.task.mqtt.topic,
                        &reading.namespace,
                        &reading.device,
                        &self.task.uplink.name,
                        &self.task.node,
                    );
                    self.topics.insert(reading.device.clone(), t.clone());
                    t
                }
            };
            let sampled_unix_nano = reading.time_unix_nano;
            let encoded = match self.encoder.encode(reading, raw, buffer_seq, topic) {
                Ok(e) => e,
                Err(e) => {
                    warn!(uplink = %self.labels.uplink, buffer_seq, error = %e, kind = e.kind(), "unencodable buffered reading dropped");
                    self.task.metrics.dropped(&self.labels.uplink, DropReason::undecodable);
                    undecodable.push(i);
                    continue;
                }
            };
            let span = match traces.iter().find(|(at, _)| *at == i) {
                // Only sampled readings carry a trace context: nothing to do for the others.
                None => StageSpan::default(),
                Some((_, tp)) => telemetry::delivery_spans(
                    BufferEntry {
                        traceparent: Some(tp),
                        stored: std::time::SystemTime::from(info_published),
                        seq: buffer_seq,
                        delivered,
                    },
                    &self.labels.uplink,
                ),
            };
            let traceparent = span.traceparent().map(|tp| tp.as_str().to_string());
            ready.push(Ready {
                index: i,
                outgoing: Outgoing { message: encoded.message, before: encoded.before, traceparent },
                tag: InFlight { sent: Instant::now(), sampled_unix_nano, span },
            });
        }
        let outcomes = self.core.admit(link, msg, first, n as usize, ready, &undecodable).await;
        self.outcomes(outcomes);
    }

    fn confirmed(&mut self, mut f: InFlight) {
        if f.span.is_recording() {
            f.span.event("mqtt.puback", Vec::new);
            f.span.ok();
            f.span.end();
        }
        let m = self.confirmed_metrics.get_or_insert_with(|| {
            let metrics = &self.task.metrics;
            ConfirmedMetrics {
                acked: metrics
                    .deliveries
                    .get_or_create(&DeliveryLabels {
                        uplink: self.labels.uplink.clone(),
                        outcome: DeliveryOutcome::acked,
                    })
                    .clone(),
                delivery_latency: metrics.delivery_latency.get_or_create(&self.labels).clone(),
                sample_to_cloud_latency: metrics.sample_to_cloud_latency.get_or_create(&self.labels).clone(),
            }
        });
        m.acked.inc();
        m.delivery_latency.observe(f.sent.elapsed().as_secs_f64());
        m.sample_to_cloud_latency.observe(reading::age(f.sampled_unix_nano).as_secs_f64());
    }

    async fn report_buffer(&mut self) {
        let reachable = self.task.metrics.buffer_reachable.get_or_create(&self.labels).clone();
        if self.stream.is_none() {
            // Not connected since start: look at the buffer anyway (backlog, evictions).
            let Ok(mut s) = self.task.buffer.ensure_stream(&self.task.js).await else {
                reachable.set(0);
                return;
            };
            let window = u16::try_from(self.window).unwrap_or(u16::MAX);
            let Ok((_, delivered)) = ensure_consumer(&mut s, &self.task.buffer, window).await else {
                reachable.set(0);
                return;
            };
            self.start_accounting(&s, delivered).await;
            self.stream = Some(s);
        }
        let Some(s) = &mut self.stream else { return };
        let Ok(info) = s.info().await else {
            reachable.set(0);
            return;
        };
        reachable.set(1);
        let st = info.state.clone();
        // The first reading still in the stream (None: empty, or its entry left meanwhile).
        let first_present = match &self.stream {
            Some(s) if st.messages > 0 => entry_at(s, st.first_sequence).await.map(|(first, _)| first),
            _ => None,
        };
        // Readings below the stream's first entry are gone. Those this driver never received
        // (from `expected` on) or gave back and never got again were evicted: count them now,
        // while the outage lasts, not when the link is back.
        if st.messages == 0 {
            let lost = self.core.released.remove_below(u64::MAX);
            self.count_gap(lost, false).await;
            if let Some(d) = self.unknown_after
                && st.last_sequence > d
            {
                self.unknown_after = Some(st.last_sequence);
                self.count_gap(st.last_sequence - d, true).await;
            }
        } else if let Some(first) = first_present {
            if let Some(d) = self.unknown_after
                && self.expected.is_none()
            {
                self.unknown_after = None;
                self.expected = Some(first);
                self.count_gap(st.first_sequence.saturating_sub(d + 1), true).await;
            }
            if let Some(e) = self.expected
                && e < first
            {
                debug!(uplink = %self.labels.uplink, from = e, to = first, "unseen readings below the first entry");
                self.expected = Some(first);
                self.count_gap(first - e, false).await;
            }
            let lost = self.core.released.remove_below(first);
            debug!(uplink = %self.labels.uplink, first, lost, "released readings below the first entry");
            self.count_gap(lost, false).await;
        }
        // Readings from the first entry's to the last one's end (entries acked out of order
        // in between still count: at most the in-flight window).
        let mut backlog = 0;
        if let Some(first) = first_present
            && let Some(s) = &self.stream
            && let Ok(last) = s.get_last_raw_message_by_subject(&self.task.buffer.subject).await
            && let Some((last_first, last_n)) = entry_range(Some(&last.headers))
        {
            backlog = (last_first + last_n).saturating_sub(first);
        }
        let m = &self.task.metrics;
        m.buffer_messages.get_or_create(&self.labels).set(i64::try_from(backlog).unwrap_or(i64::MAX));
        m.buffer_bytes.get_or_create(&self.labels).set(i64::try_from(st.bytes).unwrap_or(i64::MAX));
        let age = if st.messages == 0 {
            0.0
        } else {
            let first = st.first_timestamp.unix_timestamp_nanos();
            let now = i128::from(reading::unix_nanos(std::time::SystemTime::now()) as i64);
            ((now - first).max(0) as f64) / 1e9
        };
        m.buffer_oldest_unsent_age.get_or_create(&self.labels).set(age);
    }
}

/// Runs one MQTT uplink until `task.cancel` fires, then finishes in-flight deliveries within
/// `task.grace`. Failures of NATS or the broker are retried forever.
pub async fn run(task: UplinkTask) {
    let settings = task.mqtt.clone();
    drive(task, move |plan| MqttLink::open(&settings, plan)).await;
}

/// When a link that went away is tried again.
#[derive(Debug)]
struct Reconnect {
    /// Growing delays for a broker that answers and refuses the connection.
    refused: backon::ExponentialBackoff,
}

impl Reconnect {
    fn new() -> Self {
        Self { refused: backoff(Duration::from_secs(1), Duration::from_secs(60)) }
    }

    /// The delay after a link loss: a refusing broker backs off (1 s doubling up to a minute),
    /// an unreachable one is probed every [`PROBE_EVERY`], and a link that was up is rebuilt at
    /// once (200 ms).
    fn after(&mut self, refused: bool, was_connected: bool) -> Duration {
        if refused {
            self.refused.next().unwrap_or(Duration::from_secs(60))
        } else if was_connected {
            Duration::from_millis(200)
        } else {
            PROBE_EVERY
        }
    }
}

/// The driver loop over any [`Link`] kind: `open` builds a new link (a new connection attempt)
/// with what the uplink's encoding needs of the session.
pub async fn drive<L: Link, F: FnMut(SessionPlan) -> L>(task: UplinkTask, mut open: F) {
    let labels = UplinkLabels { uplink: task.buffer.uplink.clone() };
    let window = usize::from(task.mqtt.max_in_flight);
    let mut d = Driver {
        confirmed_metrics: None,
        encoder: Encoder::new(&task.uplink, &task.node),
        labels,
        window,
        core: Core::new(RetryDelays::default()),
        expected: None,
        unknown_after: None,
        topics: HashMap::default(),
        stream: None,
        refusal_log: LogThrottle::new(Duration::from_secs(60)),
        task,
    };
    let metrics = Arc::clone(&d.task.metrics);
    let connected_gauge = metrics.uplink_connected.get_or_create(&d.labels).clone();
    connected_gauge.set(0);

    let mut link: Option<L> = None;
    let mut connected = false;
    let mut was_connected = true; // log the first failure too
    let mut reconnect = Reconnect::new();
    let mut link_retry_at = Instant::now();
    let mut link_log = LogThrottle::new(Duration::from_secs(60));
    let mut down_since: Option<Instant> = None;

    let mut messages: Option<pull::Stream> = None;
    let mut buffer_delays = backoff(Duration::from_millis(200), Duration::from_secs(10));
    let mut buffer_retry_at = Instant::now();
    let mut buffer_ok = true;

    let mut report = tokio::time::interval(Duration::from_secs(2));
    report.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    let mut drain_deadline: Option<Instant> = None;

    loop {
        let now = Instant::now();
        if let Some(deadline) = drain_deadline
            && (d.core.in_flight() == 0 || now >= deadline)
        {
            break;
        }
        if drain_deadline.is_none() && link.is_none() && now >= link_retry_at {
            link = Some(open(d.encoder.session()));
        }
        // A pull stream prefetches: entries it holds while the link is down would outlive
        // `redeliverAfter` and be sent twice, so it is closed once the link has been down for
        // half of that. A link that comes back sooner (a broker that drops the connection
        // after refusing a publish) goes on with the same pull stream, without waiting for
        // the prefetched entries to be redelivered.
        if !connected
            && messages.is_some()
            && down_since.is_some_and(|at: Instant| at.elapsed() >= d.task.buffer.redeliver_after / 2)
        {
            messages = None;
        }
        if drain_deadline.is_none() && connected && messages.is_none() && now >= buffer_retry_at {
            match open_messages(&mut d).await {
                Ok(m) => {
                    messages = Some(m);
                    buffer_delays = backoff(Duration::from_millis(200), Duration::from_secs(10));
                    if !buffer_ok {
                        info!(uplink = %d.labels.uplink, "buffer reachable again");
                    }
                    buffer_ok = true;
                }
                Err(e) => {
                    if buffer_ok {
                        warn!(uplink = %d.labels.uplink, error = %e, "buffer unreachable; retrying");
                    }
                    buffer_ok = false;
                    buffer_retry_at = now + buffer_delays.next().unwrap_or(Duration::from_secs(10));
                }
            }
        }
        let mut wake = now + Duration::from_secs(3600);
        if link.is_none() {
            wake = wake.min(link_retry_at);
        }
        if messages.is_none() && connected {
            wake = wake.min(buffer_retry_at);
        }
        if let Some(at) = down_since
            && messages.is_some()
        {
            wake = wake.min(at + d.task.buffer.redeliver_after / 2);
        }
        if let Some(deadline) = drain_deadline {
            wake = wake.min(deadline);
        }
        let can_pull = connected && drain_deadline.is_none() && d.core.in_flight() < d.window;

        tokio::select! {
            biased;
            () = d.task.cancel.cancelled(), if drain_deadline.is_none() => {
                info!(uplink = %d.labels.uplink, in_flight = d.core.in_flight(), "uplink finishing in-flight deliveries");
                drain_deadline = Some(Instant::now() + d.task.grace);
                messages = None;
            }
            ev = next_event(&mut link) => match ev {
                LinkEvent::Connected => {
                    connected = true;
                    down_since = None;
                    connected_gauge.set(1);
                    metrics.uplink_connects.get_or_create(&d.labels).inc();
                    reconnect = Reconnect::new();
                    info!(uplink = %d.labels.uplink, host = %d.task.mqtt.host, "uplink connected");
                    was_connected = true;
                }
                LinkEvent::Lost { reason, refused } => {
                    if was_connected {
                        warn!(uplink = %d.labels.uplink, error = %reason, "uplink disconnected; reconnecting");
                    } else {
                        debug!(uplink = %d.labels.uplink, error = %reason, refused, "uplink connect failed");
                        if refused && let Some(held_back) = link_log.allow() {
                            warn!(uplink = %d.labels.uplink, error = %reason, held_back, "the broker refused the connection; retrying with a growing delay");
                        }
                    }
                    let delay = reconnect.after(refused, was_connected && connected);
                    was_connected = false;
                    connected = false;
                    connected_gauge.set(0);
                    if let Some(l) = link.take() {
                        drop(l);
                    }
                    down_since.get_or_insert_with(Instant::now);
                    let outcomes = d.core.on_event(LinkEvent::Lost { reason, refused }).await;
                    d.outcomes(outcomes);
                    link_retry_at = Instant::now() + delay;
                }
                answer => {
                    let outcomes = d.core.on_event(answer).await;
                    d.outcomes(outcomes);
                }
            },
            next = next_message(&mut messages), if can_pull => match next {
                Some(Ok(msg)) => {
                    if let Some(l) = link.as_mut() {
                        d.deliver(l, msg).await;
                    }
                }
                Some(Err(e)) => {
                    debug!(uplink = %d.labels.uplink, error = %e, "buffer consumer error");
                    if !e.contains("heartbeat") {
                        messages = None;
                        buffer_retry_at = Instant::now() + buffer_delays.next().unwrap_or(Duration::from_secs(10));
                    }
                }
                None => {
                    messages = None;
                    buffer_retry_at = Instant::now() + buffer_delays.next().unwrap_or(Duration::from_secs(10));
                }
            },
            _ = report.tick() => d.report_buffer().await,
            () = tokio::time::sleep_until(wake) => {}
        }
    }
    let left = d.core.in_flight();
    d.release_all().await;
    if let Some(l) = link {
        l.close().await;
    }
    connected_gauge.set(0);
    info!(uplink = %d.labels.uplink, unconfirmed = left, "uplink stopped");
}

async fn open_messages(d: &mut Driver) -> Result<pull::Stream, UplinkError> {
    let mut stream = d.task.buffer.ensure_stream(&d.task.js).await?;
    let window = u16::try_from(d.window).unwrap_or(u16::MAX);
    let (consumer, delivered) = ensure_consumer(&mut stream, &d.task.buffer, window).await?;
    if d.stream.is_none() {
        d.start_accounting(&stream, delivered).await;
    }
    d.stream = Some(stream);
    consumer
        .stream()
        .max_messages_per_batch(d.window)
        .heartbeat(Duration::from_secs(5))
        .expires(Duration::from_secs(30))
        .messages()
        .await
        .map_err(|e| {
            UplinkError::Buffer(BufferError::Consumer { stream: d.task.buffer.stream.clone(), source: e.into() })
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn topics_fill_every_placeholder() {
        assert_eq!(
            render_topic("fg/{namespace}/{node}/{uplink}/{device}", "ns", "d1", "up", "edge-7"),
            "fg/ns/edge-7/up/d1"
        );
    }
}
