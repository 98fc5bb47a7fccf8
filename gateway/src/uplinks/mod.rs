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
//! growing delay.
//!
//! The driver keeps the uplink's [`UplinkState`] in the state index: which entries are in
//! flight (the buffer writer never removes those), which it settled, whether the link is up.
//! Readings the buffer's limits remove are counted by the writer, which removes them
//! ([`crate::index`]); the driver infers nothing from gaps.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::consumer::{AckPolicy, DeliverPolicy, pull};
use async_nats::jetstream::{self, AckKind, stream};
use fieldgate_crds::GatewayUplink;
use futures::StreamExt;
use prost::Message as _;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, trace, warn};

use crate::buffer::{BufferError, UplinkBuffer, entry_range, entry_readings, entry_traces, release_recorded};
use crate::encoding::{Encoder, SessionPlan};
use crate::index::{Begin, EntryFacts, UplinkState};
use crate::metrics::{DeliveryLabels, DeliveryOutcome, DropReason, Metrics, UplinkLabels};
use crate::reading::{self, Reading};
use crate::supervise::backoff;
use crate::telemetry::{self, BufferEntry, LogThrottle, StageSpan};

pub mod core;
pub mod http;
pub mod link;
pub mod mqtt;
pub mod tls;

use self::core::{Core, Outcome, Ready, RetryDelays, Settle};
use http::{HttpLink, HttpSettings};
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

/// A problem with an uplink's settings found while resolving them (with its field path).
#[derive(Debug, thiserror::Error)]
#[error("{path}: {message}")]
pub struct SettingsError {
    /// Field path, such as `uplinks[0].mqtt.auth.secretRef`.
    pub path: String,
    /// What is wrong.
    pub message: String,
}

/// A [`SettingsError`] at `path`.
pub fn settings_err(path: String, message: impl Into<String>) -> SettingsError {
    SettingsError { path, message: message.into() }
}

/// Hash of the uplink's spec and of every Secret value it references: a change (such as a
/// rotated password) restarts the uplink.
pub fn fingerprint(u: &GatewayUplink, secrets: &crate::secrets::SecretStore) -> u64 {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    serde_json::to_string(u).unwrap_or_default().hash(&mut h);
    for (_, name, key) in u.secret_keys() {
        if let Ok(v) = secrets.read(&name, &key) {
            v.expose().hash(&mut h);
        }
    }
    h.finish()
}

/// The resolved settings of an uplink's link to the cloud, secrets read.
#[derive(Clone, Debug)]
pub enum LinkSettings {
    /// An MQTT broker.
    Mqtt(MqttSettings),
    /// An HTTP endpoint.
    Http(Arc<HttpSettings>),
}

impl LinkSettings {
    /// Resolves a validated uplink: parses its URL and reads the Secrets it references.
    /// `path` is the uplink's field path, for errors.
    pub fn resolve(
        u: &GatewayUplink,
        node: &str,
        secrets: &crate::secrets::SecretStore,
        path: &str,
    ) -> Result<Self, SettingsError> {
        if u.http.is_some() {
            Ok(Self::Http(Arc::new(HttpSettings::resolve(u, secrets, path)?)))
        } else {
            Ok(Self::Mqtt(MqttSettings::resolve(u, node, secrets, path)?))
        }
    }

    /// Hash of everything the settings were resolved from, secrets included.
    pub fn fingerprint(&self) -> u64 {
        match self {
            Self::Mqtt(m) => m.fingerprint,
            Self::Http(h) => h.fingerprint,
        }
    }

    /// Readings in flight at once.
    pub fn window(&self) -> usize {
        match self {
            Self::Mqtt(m) => usize::from(m.max_in_flight),
            Self::Http(h) => h.window(),
        }
    }

    /// The topic template of readings (MQTT only).
    pub fn topic(&self) -> Option<&str> {
        match self {
            Self::Mqtt(m) => Some(&m.topic),
            Self::Http(_) => None,
        }
    }

    /// Where it connects, for logs.
    pub fn endpoint(&self) -> String {
        match self {
            Self::Mqtt(m) => format!("{}:{}", m.host, m.endpoint.port),
            Self::Http(h) => h.url.to_string(),
        }
    }

    /// The MQTT settings, for an MQTT uplink.
    pub fn mqtt(&self) -> Option<&MqttSettings> {
        match self {
            Self::Mqtt(m) => Some(m),
            Self::Http(_) => None,
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
    /// Its resolved link settings.
    pub link: LinkSettings,
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

/// Creates (or updates) the uplink's durable consumer.
pub async fn ensure_consumer(
    stream: &mut stream::Stream,
    buffer: &UplinkBuffer,
    window: u16,
) -> Result<jetstream::consumer::Consumer<pull::Config>, BufferError> {
    let err = |e: async_nats::Error| BufferError::Consumer { stream: buffer.stream.clone(), source: e };
    let config = pull::Config {
        durable_name: Some(CONSUMER.to_string()),
        description: Some(format!("Fieldgate uplink {}", buffer.uplink)),
        ack_policy: AckPolicy::Explicit,
        ack_wait: buffer.redeliver_after,
        deliver_policy: DeliverPolicy::All,
        max_ack_pending: i64::from(window) * 4,
        // Acknowledgements live in nats-server's memory (no write and fsync per ack): the
        // durable confirmation is the release of the acknowledged prefix (see `crate::buffer`).
        memory_storage: true,
        ..Default::default()
    };
    let consumer = match stream.create_consumer(config.clone()).await {
        Ok(c) => c,
        Err(e) => {
            let existing: jetstream::consumer::Consumer<pull::Config> =
                stream.get_consumer(CONSUMER).await.map_err(err)?;
            if existing.cached_info().config.memory_storage {
                warn!(stream = %buffer.stream, error = %e, "could not update the uplink consumer; using it as it is");
                existing
            } else {
                // One of an earlier version keeps its acknowledgements on disk, which nats-server
                // does not change in place: replaced (what it acknowledged and the buffer did not
                // release yet is delivered again).
                info!(stream = %buffer.stream, "the uplink consumer keeps its acknowledgements in memory from now on");
                stream.delete_consumer(CONSUMER).await.map_err(|e| err(e.into()))?;
                stream.create_consumer(config).await.map_err(|e| err(e.into()))?
            }
        }
    };
    Ok(consumer)
}

/// A buffered entry being delivered: the JetStream message, its place in the state index.
struct Buffered {
    msg: jetstream::Message,
    seq: u64,
    deliveries: i64,
    state: Arc<UplinkState>,
}

impl self::core::Entry for Buffered {
    fn seq(&self) -> u64 {
        self.seq
    }

    fn deliveries(&self) -> i64 {
        self.deliveries
    }

    async fn settle(self, how: Settle) {
        // The index first: a settled entry is never removed (and counted) by the writer, and
        // one given back may be, with only its unsettled readings counted.
        let kind = match how {
            Settle::Ack => {
                self.state.settled(self.seq);
                AckKind::Ack
            }
            Settle::Term => {
                self.state.settled(self.seq);
                AckKind::Term
            }
            Settle::Nak { delay, unsettled } => {
                self.state.given_back(self.seq, unsettled as u64);
                AckKind::Nak(delay)
            }
        };
        // A lost ack means a redelivery: the readings go again under their ids (or, for an
        // entry the index knows as settled, the copy is acked without sending anything).
        if let Err(e) = self.msg.ack_with(kind).await {
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
    core: Core<Buffered, InFlight>,
    /// The uplink's state in the state index.
    state: Arc<UplinkState>,
    topics: HashMap<String, String, foldhash::fast::RandomState>,
    /// Refusals are logged at most once a minute (each one is counted).
    refusal_log: LogThrottle,
}

async fn next_message(m: &mut Option<pull::Stream>) -> Option<Result<jetstream::Message, pull::MessagesError>> {
    match m {
        Some(s) => s.next().await,
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

impl Driver {
    fn outcome(&self, outcome: DeliveryOutcome) {
        self.task
            .metrics
            .deliveries
            .get_or_create(&DeliveryLabels { uplink: self.labels.uplink.clone(), outcome })
            .inc();
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
                        self.state.dropped(DropReason::refused, 1);
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
        let range = entry_range(msg.headers.as_ref());
        let facts = EntryFacts {
            seq,
            n: range.map_or(0, |(_, n)| n),
            bytes: msg.length as u64,
            stored: std::time::SystemTime::from(info_published),
        };
        match self.state.begin(facts) {
            Begin::Deliver => {}
            Begin::Gone => {
                // Settled before (its ack was lost) or removed and counted by the writer.
                let _ = msg.ack_with(AckKind::Ack).await;
                return;
            }
            // Being removed by the writer: if that fails, JetStream delivers it again.
            Begin::Claimed => return,
        }
        if delivered > 1 {
            self.state.redeliveries.inc();
        }
        let Some((first, n)) = range else {
            warn!(uplink = %self.labels.uplink, seq, "buffer entry without its Fieldgate-Seq/Fieldgate-Readings headers dropped");
            self.state.dropped(DropReason::undecodable, 1);
            self.state.settled(seq);
            let _ = msg.ack_with(AckKind::Term).await;
            return;
        };
        let readings = match entry_readings(&msg.payload) {
            Ok(r) if r.len() as u64 == n => r,
            Ok(r) => {
                warn!(uplink = %self.labels.uplink, seq, readings = r.len(), expected = n, "buffer entry with the wrong number of readings dropped");
                self.state.dropped(DropReason::undecodable, n);
                self.state.settled(seq);
                let _ = msg.ack_with(AckKind::Term).await;
                return;
            }
            Err(e) => {
                warn!(uplink = %self.labels.uplink, seq, error = %e, "undecodable buffer entry dropped");
                self.state.dropped(DropReason::undecodable, n);
                self.state.settled(seq);
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
                    self.state.dropped(DropReason::undecodable, 1);
                    undecodable.push(i);
                    continue;
                }
            };
            let topic = match (self.topics.get(&reading.device), self.task.link.topic()) {
                (Some(t), _) => t.clone(),
                (None, None) => String::new(),
                (None, Some(template)) => {
                    let t = render_topic(
                        template,
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
        let entry = Buffered { msg, seq, deliveries: delivered, state: Arc::clone(&self.state) };
        let outcomes = self.core.admit(link, entry, n as usize, ready, &undecodable).await;
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
                acked: self.state.delivered.clone(),
                delivery_latency: metrics.delivery_latency.get_or_create(&self.labels).clone(),
                sample_to_cloud_latency: metrics.sample_to_cloud_latency.get_or_create(&self.labels).clone(),
            }
        });
        m.acked.inc();
        m.delivery_latency.observe(f.sent.elapsed().as_secs_f64());
        m.sample_to_cloud_latency.observe(reading::age(f.sampled_unix_nano).as_secs_f64());
    }
}

/// Runs one uplink until `task.cancel` fires, then finishes in-flight deliveries within
/// `task.grace`. Failures of NATS or the cloud are retried forever.
pub async fn run(task: UplinkTask) {
    match task.link.clone() {
        LinkSettings::Mqtt(settings) => drive(task, move |plan| MqttLink::open(&settings, plan)).await,
        // An HTTP endpoint has no session: the plan (will, births) is for MQTT only.
        LinkSettings::Http(settings) => drive(task, move |_plan| HttpLink::open(&settings)).await,
    }
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
    let window = task.link.window();
    let mut d = Driver {
        confirmed_metrics: None,
        encoder: Encoder::new(&task.uplink, &task.node),
        labels,
        window,
        core: Core::new(RetryDelays::default()),
        state: task.metrics.state.uplink(&task.buffer.uplink),
        topics: HashMap::default(),
        refusal_log: LogThrottle::new(Duration::from_secs(60)),
        task,
    };
    let metrics = Arc::clone(&d.task.metrics);
    let state = Arc::clone(&d.state);
    state.set_connected(false);

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

    let mut drain_deadline: Option<Instant> = None;
    // Entries settled up to the last release, and when the next release is due.
    let mut released_through = state.settled_entries();
    let mut release_at: Option<Instant> = None;

    loop {
        let now = Instant::now();
        // Acknowledged entries stay in the stream until released: one purge every RELEASE_AFTER at most
        // (sooner after [`RELEASE_EVERY`] entries), never one per entry.
        let settled = state.settled_entries();
        if settled != released_through {
            release_at.get_or_insert(now + RELEASE_AFTER);
        }
        if let Some(at) = release_at
            && (now >= at || settled - released_through >= RELEASE_EVERY)
        {
            released_through = settled;
            // The floor can lag the acks just sent (not processed yet, or behind an entry
            // still in flight): what it left is released on a later round.
            release_at = (release(&d).await < state.max_settled()).then(|| Instant::now() + RELEASE_AFTER);
        }
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
        // Delivery starts once the writer has restored the buffer (where it continues and what
        // an earlier run left in it).
        let restored = state.is_restored();
        if drain_deadline.is_none() && connected && restored && messages.is_none() && now >= buffer_retry_at {
            match open_messages(&mut d).await {
                Ok(m) => {
                    messages = Some(m);
                    state.set_reachable(true);
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
                    state.set_reachable(false);
                    buffer_ok = false;
                    buffer_retry_at = now + buffer_delays.next().unwrap_or(Duration::from_secs(10));
                }
            }
        }
        let mut wake = now + Duration::from_secs(3600);
        if link.is_none() {
            wake = wake.min(link_retry_at);
        }
        if messages.is_none() && connected && restored {
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
        if let Some(at) = release_at {
            wake = wake.min(at);
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
                    state.set_connected(true);
                    metrics.uplink_connects.get_or_create(&d.labels).inc();
                    reconnect = Reconnect::new();
                    info!(uplink = %d.labels.uplink, endpoint = %d.task.link.endpoint(), "uplink connected");
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
                    state.set_connected(false);
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
                    // A missed heartbeat is reported and the stream goes on; anything else
                    // ends it.
                    if e.kind() != pull::MessagesErrorKind::MissingHeartbeat {
                        messages = None;
                        buffer_retry_at = Instant::now() + buffer_delays.next().unwrap_or(Duration::from_secs(10));
                    }
                }
                None => {
                    messages = None;
                    buffer_retry_at = Instant::now() + buffer_delays.next().unwrap_or(Duration::from_secs(10));
                }
            },
            () = state.wait_restored(), if !restored => {}
            () = tokio::time::sleep_until(wake) => {}
        }
    }
    let left = d.core.in_flight();
    d.release_all().await;
    // What was delivered since the last release leaves the buffer now (a restart then finds
    // only what is still to send).
    if release_at.is_some() || state.settled_entries() != released_through {
        let _ = tokio::time::timeout(FINAL_RELEASE_WITHIN, release(&d)).await;
    }
    if let Some(l) = link {
        l.close().await;
    }
    state.set_connected(false);
    info!(uplink = %d.labels.uplink, unconfirmed = left, "uplink stopped");
}

/// Longest an acknowledged entry waits to be released from the buffer (each release is a
/// record write and a purge; an entry acknowledged and not released when nats-server and the
/// gateway both restart is sent again).
const RELEASE_AFTER: Duration = Duration::from_secs(5);
/// Longest the release at the uplink's stop may take.
const FINAL_RELEASE_WITHIN: Duration = Duration::from_secs(1);
/// Acknowledged entries that release at once.
const RELEASE_EVERY: u64 = 128;

/// Releases the acknowledged entries of the uplink's buffer ([`release_recorded`]); returns
/// the acknowledgement floor released up to (0 when the release failed: a later one retries,
/// and the writer releases too when the buffer is full).
async fn release(d: &Driver) -> u64 {
    let released = async {
        let stream = d.task.js.get_stream_no_info(&d.task.buffer.stream).await?;
        release_recorded(&stream, &d.state).await
    };
    match tokio::time::timeout(RELEASE_AFTER, released).await {
        Ok(Ok(r)) => {
            trace!(uplink = %d.labels.uplink, entries = r.entries, floor = r.floor, "acknowledged entries released");
            r.floor
        }
        Ok(Err(e)) => {
            debug!(uplink = %d.labels.uplink, error = %e, "acknowledged entries not released now");
            0
        }
        Err(_) => {
            debug!(uplink = %d.labels.uplink, "releasing acknowledged entries timed out");
            0
        }
    }
}

async fn open_messages(d: &mut Driver) -> Result<pull::Stream, UplinkError> {
    let mut stream = d.task.buffer.ensure_stream(&d.task.js).await?;
    let window = u16::try_from(d.window).unwrap_or(u16::MAX);
    let consumer = ensure_consumer(&mut stream, &d.task.buffer, window).await?;
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
