//! Uplinks: the shared driver that moves readings from an uplink's JetStream buffer to the
//! cloud, and one file per uplink kind that builds the link doing the delivery.
//!
//! The driver pulls from the uplink's durable consumer, keeps a bounded window of deliveries in
//! flight, and acks a JetStream message only when the link *confirms* its delivery (for MQTT:
//! a PUBACK with a success reason). A refused delivery is NAKed with a delay; a lost connection
//! NAKs everything in flight and a new link is built after a capped, jittered backoff. A gap
//! in the buffer's sequence seen by the consumer is an entry the buffer policy evicted, and is
//! counted as a drop with its reason.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::consumer::{AckPolicy, DeliverPolicy, pull};
use async_nats::jetstream::{self, AckKind, stream};
use fieldgate_crds::{Encoding, GatewayUplink, OnFull};
use futures::StreamExt;
use prost::Message as _;
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::buffer::{BufferError, UplinkBuffer, entry_range, entry_readings, entry_traces};
use crate::metrics::{DeliveryLabels, DeliveryOutcome, DropReason, Metrics, UplinkLabels};
use crate::reading::{self, Reading};
use crate::supervise::backoff;
use crate::telemetry::{self, BufferEntry, StageSpan, TraceparentText};

pub mod mqtt;
mod ranges;

use mqtt::{MqttLink, MqttSettings};
use ranges::RangeSet;

/// Identifies one delivery on a link.
pub type Token = u64;

/// What a link reports.
#[derive(Debug)]
pub enum LinkEvent {
    /// The connection is up; deliveries may be sent.
    Connected,
    /// The remote side confirmed the delivery.
    Confirmed(Token),
    /// The remote side refused the delivery (reason code).
    Refused(Token, String),
    /// The connection is gone; unconfirmed deliveries will never be confirmed.
    Lost(String),
}

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

/// A buffer entry being delivered: acked once every reading in it is confirmed.
struct Entry {
    msg: jetstream::Message,
    /// `buffer_seq` of its first reading.
    first: u64,
    /// Its readings.
    n: u64,
    /// Readings sent and not yet confirmed or refused.
    unresolved: usize,
    /// A reading was refused or could not be sent: the entry goes back to JetStream.
    failed: bool,
    /// `buffer_seq`s of its readings already settled (confirmed by the broker, or dropped as
    /// undecodable): if the entry goes back to JetStream and is evicted before it returns,
    /// these are not lost.
    settled: Vec<u64>,
}

impl Entry {
    /// Gives the entry back to JetStream, remembering its unsettled readings in `released`.
    async fn release(self, released: &mut RangeSet, delay: Option<Duration>) {
        released.insert(self.first, self.first + self.n);
        for s in &self.settled {
            released.remove(*s, s + 1);
        }
        let _ = self.msg.ack_with(AckKind::Nak(delay)).await;
    }
}

/// One reading on its way to the broker.
struct InFlight {
    /// The entry carrying it.
    entry: u64,
    buffer_seq: u64,
    sent: Instant,
    sampled_unix_nano: u64,
    /// `fieldgate.uplink.publish`, ended at the PUBACK (recorded for sampled readings only).
    span: StageSpan,
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
    encoding: Encoding,
    window: usize,
    /// Touched by every reading: a fast hasher (the keys are this driver's own counters).
    in_flight: HashMap<Token, InFlight, foldhash::fast::RandomState>,
    next_token: Token,
    entries: HashMap<u64, Entry, foldhash::fast::RandomState>,
    next_entry: u64,
    /// The first `buffer_seq` this driver has not seen delivered (`None`: learnt from the
    /// next entry).
    expected: Option<u64>,
    /// Set when the run started after entries it cannot read any more: the stream sequence of
    /// the last entry delivered before. Entries after it that vanished unseen are counted,
    /// without their readings' exact number.
    unknown_after: Option<u64>,
    topics: HashMap<String, String, foldhash::fast::RandomState>,
    stream: Option<stream::Stream>,
    /// Readings given back to JetStream (NAKed, or prefetched by a closed pull stream) and not
    /// delivered again yet: if the buffer policy evicts one of them meanwhile, it is counted as
    /// dropped.
    released: RangeSet,
}

async fn next_message(m: &mut Option<pull::Stream>) -> Option<Result<jetstream::Message, String>> {
    match m {
        Some(s) => s.next().await.map(|r| r.map_err(|e| e.to_string())),
        None => std::future::pending().await,
    }
}

async fn next_event(rx: &mut Option<mpsc::UnboundedReceiver<LinkEvent>>) -> LinkEvent {
    match rx {
        Some(r) => r.recv().await.unwrap_or(LinkEvent::Lost("link task ended".into())),
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

    /// Gives every unconfirmed delivery back to JetStream for immediate redelivery.
    async fn release_all(&mut self) {
        for (_, mut f) in self.in_flight.drain() {
            f.span.fail("interrupted");
            f.span.end();
            self.task
                .metrics
                .deliveries
                .get_or_create(&DeliveryLabels {
                    uplink: self.labels.uplink.clone(),
                    outcome: DeliveryOutcome::interrupted,
                })
                .inc();
        }
        for (_, e) in self.entries.drain() {
            e.release(&mut self.released, None).await;
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
        self.released.insert(gone_to, to);
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
            self.released.insert(present, first);
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

    /// Turns a buffered entry into one delivery per reading on `link`.
    async fn deliver(&mut self, link: &MqttLink, msg: jetstream::Message) {
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
        self.released.remove(first, first + n);
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
                let _ = msg.ack_with(AckKind::Term).await;
                return;
            }
            Err(e) => {
                warn!(uplink = %self.labels.uplink, seq, error = %e, "undecodable buffer entry dropped");
                self.task.metrics.dropped_n(&self.labels.uplink, DropReason::undecodable, n);
                let _ = msg.ack_with(AckKind::Term).await;
                return;
            }
        };
        let traces = entry_traces(msg.headers.as_ref());
        let entry = self.next_entry;
        self.next_entry += 1;
        let (mut sent, mut failed, mut settled) = (0usize, false, Vec::new());
        for (i, raw) in readings.iter().enumerate() {
            let buffer_seq = first + i as u64;
            let reading = match Reading::decode(*raw) {
                Ok(r) => r,
                Err(e) => {
                    warn!(uplink = %self.labels.uplink, buffer_seq, error = %e, "undecodable buffered reading dropped");
                    self.task.metrics.dropped(&self.labels.uplink, DropReason::undecodable);
                    settled.push(buffer_seq);
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
            let payload = match self.encoding {
                Encoding::Protobuf => reading::with_buffer_seq(raw, buffer_seq),
                Encoding::Json => {
                    let mut reading = reading;
                    reading.buffer_seq = buffer_seq;
                    reading::encode(&reading, Encoding::Json)
                }
            };
            let token = self.next_token;
            self.next_token += 1;
            let mut span = match traces.iter().find(|(at, _)| *at == i) {
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
            let traceparent = span.traceparent();
            match link.send(token, topic, payload.into(), traceparent.as_ref().map(TraceparentText::as_str)) {
                Ok(()) => {
                    let f = InFlight { entry, buffer_seq, sent: Instant::now(), sampled_unix_nano, span };
                    self.in_flight.insert(token, f);
                    sent += 1;
                }
                Err(e) => {
                    span.fail("queue");
                    debug!(uplink = %self.labels.uplink, error = %e, "delivery not queued");
                    self.outcome(DeliveryOutcome::interrupted);
                    failed = true;
                    break;
                }
            }
        }
        let e = Entry { msg, first, n, unresolved: sent, failed, settled };
        if sent == 0 {
            self.settle(e).await;
        } else {
            self.entries.insert(entry, e);
        }
    }

    /// Every reading of an entry was confirmed (ack), or one was not (back to JetStream).
    async fn settle(&mut self, e: Entry) {
        if e.failed {
            e.release(&mut self.released, Some(Duration::from_secs(1))).await;
        } else if let Err(err) = e.msg.ack().await {
            // The broker has it; if the ack is lost JetStream redelivers: duplicates, same ids.
            debug!(uplink = %self.labels.uplink, error = %err, "JetStream ack failed");
        }
    }

    /// One reading (`buffer_seq`) of `entry` resolved: confirmed, or `failed`.
    async fn resolved(&mut self, entry: u64, buffer_seq: u64, failed: bool) {
        let Some(e) = self.entries.get_mut(&entry) else { return };
        e.unresolved = e.unresolved.saturating_sub(1);
        e.failed |= failed;
        if !failed {
            e.settled.push(buffer_seq);
        }
        if e.unresolved == 0
            && let Some(e) = self.entries.remove(&entry)
        {
            self.settle(e).await;
        }
    }

    async fn confirmed(&mut self, token: Token) {
        let Some(mut f) = self.in_flight.remove(&token) else { return };
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
        self.resolved(f.entry, f.buffer_seq, false).await;
    }

    async fn refused(&mut self, token: Token, reason: &str) {
        let Some(mut f) = self.in_flight.remove(&token) else { return };
        if f.span.is_recording() {
            f.span.event("mqtt.puback", || vec![opentelemetry::KeyValue::new("mqtt.reason", reason.to_string())]);
            f.span.fail("refused");
            f.span.end();
        }
        debug!(uplink = %self.labels.uplink, reason, "broker refused a delivery; it will be sent again");
        self.outcome(DeliveryOutcome::refused);
        self.resolved(f.entry, f.buffer_seq, true).await;
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
            let lost = self.released.remove_below(u64::MAX);
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
            let lost = self.released.remove_below(first);
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

/// Runs one uplink until `task.cancel` fires, then finishes in-flight deliveries within
/// `task.grace`. Failures of NATS or the broker are retried forever with backoff.
pub async fn run(task: UplinkTask) {
    let labels = UplinkLabels { uplink: task.buffer.uplink.clone() };
    let window = usize::from(task.mqtt.max_in_flight);
    let mut d = Driver {
        confirmed_metrics: None,
        encoding: task.uplink.encoding(),
        labels,
        window,
        in_flight: HashMap::default(),
        next_token: 0,
        entries: HashMap::default(),
        next_entry: 0,
        expected: None,
        unknown_after: None,
        topics: HashMap::default(),
        stream: None,
        released: RangeSet::default(),
        task,
    };
    let metrics = Arc::clone(&d.task.metrics);
    let connected_gauge = metrics.uplink_connected.get_or_create(&d.labels).clone();
    connected_gauge.set(0);

    let mut link: Option<MqttLink> = None;
    let mut events: Option<mpsc::UnboundedReceiver<LinkEvent>> = None;
    let mut connected = false;
    let mut was_connected = true; // log the first failure too
    let mut link_delays = backoff(Duration::from_millis(200), Duration::from_secs(30));
    let mut link_retry_at = Instant::now();

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
            && (d.in_flight.is_empty() || now >= deadline)
        {
            break;
        }
        if drain_deadline.is_none() && link.is_none() && now >= link_retry_at {
            let (tx, rx) = mpsc::unbounded_channel();
            link = Some(MqttLink::open(&d.task.mqtt, tx));
            events = Some(rx);
        }
        // The pull stream exists only while the link is up: a pull stream prefetches, and
        // entries prefetched during an outage would outlive `redeliverAfter` and be sent twice.
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
        if let Some(deadline) = drain_deadline {
            wake = wake.min(deadline);
        }
        let can_pull = connected && drain_deadline.is_none() && d.in_flight.len() < d.window;

        tokio::select! {
            biased;
            () = d.task.cancel.cancelled(), if drain_deadline.is_none() => {
                info!(uplink = %d.labels.uplink, in_flight = d.in_flight.len(), "uplink finishing in-flight deliveries");
                drain_deadline = Some(Instant::now() + d.task.grace);
                messages = None;
            }
            ev = next_event(&mut events) => match ev {
                LinkEvent::Connected => {
                    connected = true;
                    connected_gauge.set(1);
                    metrics.uplink_connects.get_or_create(&d.labels).inc();
                    link_delays = backoff(Duration::from_millis(200), Duration::from_secs(30));
                    info!(uplink = %d.labels.uplink, host = %d.task.mqtt.host, "uplink connected");
                    was_connected = true;
                }
                LinkEvent::Confirmed(token) => d.confirmed(token).await,
                LinkEvent::Refused(token, reason) => d.refused(token, &reason).await,
                LinkEvent::Lost(error) => {
                    if was_connected {
                        warn!(uplink = %d.labels.uplink, error = %error, "uplink disconnected; reconnecting with backoff");
                    } else {
                        debug!(uplink = %d.labels.uplink, error = %error, "uplink connect failed");
                    }
                    was_connected = false;
                    connected = false;
                    connected_gauge.set(0);
                    link = None;
                    events = None;
                    messages = None;
                    d.release_all().await;
                    link_retry_at = Instant::now() + link_delays.next().unwrap_or(Duration::from_secs(30));
                }
            },
            next = next_message(&mut messages), if can_pull => match next {
                Some(Ok(msg)) => {
                    if let Some(l) = &link {
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
    let left = d.in_flight.len();
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
