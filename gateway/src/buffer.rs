//! The buffer: one JetStream stream per uplink on the node's disk, and the writer that puts
//! readings into it.
//!
//! A reading is *accepted* once JetStream acknowledged the entry that carries it (PubAck);
//! until then it is only in flight. An entry is one JetStream message holding up to
//! [`MAX_ENTRY_READINGS`] readings (`BufferEntry` in `proto/fieldgate/v1/reading.proto`): each
//! uplink's lane stores one entry at a time, and the next carries every reading that arrived
//! meanwhile (group commit). Its headers give the `buffer_seq` of its first reading and their
//! count, so `buffer_seq` numbers the uplink's readings without gaps, and the uplink can tell
//! how many readings a lost entry held. Its `Nats-Msg-Id` is `{stream}/{first buffer_seq}`
//! ([`entry_id`]), unique in the stream and the same for every retry, and each publish expects
//! the stream's last sequence (the lane is its stream's one writer): an entry whose PubAck was
//! lost is recognised when retried, never stored twice, never counted as dropped, and its
//! `buffer_seq`s are never reused. An entry JetStream refuses as too large is stored in halves
//! until each reading goes alone; one reading too large alone, or an entry refused otherwise
//! (`rejectNew` and full, JetStream unreachable for `give_up_after` with no attempt that might
//! have stored it), is dropped and each of its readings counted with the reason.
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
use fieldgate_crds::{GatewayConfig, GatewayUplink, OnFull};
use prost::Message;
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;
use tracing::{debug, info, warn};

use crate::metrics::{DropReason, Metrics, UplinkLabels};
use crate::reading::{AcceptanceTracker, Submission};
use crate::supervise::backoff;
use crate::telemetry::{StageSpan, append_span};

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
        let b = u.buffer();
        Self {
            uplink: format!("{}/{}", u.namespace, u.name),
            stream: stream_name(&u.namespace, &u.name),
            subject: subject(&u.namespace, &u.name),
            max_bytes: b.max_bytes(),
            max_age: b.max_age(),
            on_full: b.on_full(),
            redeliver_after: b.redeliver_after(),
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
    /// The stream is full (`rejectNew`): not stored.
    Full,
    /// Larger than the stream or the server takes: not stored.
    TooLarge,
    /// A publish expecting the stream's last sequence found another: something was stored
    /// since (an earlier attempt of this very entry, when the lane is the one writer).
    WrongLastSequence,
    /// Not stored now (no connection, no stream leader): try again.
    Transient,
    /// Sent, and no answer: stored or not, nobody can tell yet.
    Ambiguous,
}

fn classify(e: &PublishError, sent: bool) -> Refusal {
    match e.kind() {
        PublishErrorKind::MaxPayloadExceeded => Refusal::TooLarge,
        PublishErrorKind::WrongLastSequence => Refusal::WrongLastSequence,
        PublishErrorKind::TimedOut | PublishErrorKind::BrokenPipe if sent => Refusal::Ambiguous,
        PublishErrorKind::Other => {
            let api = std::error::Error::source(e).and_then(|s| s.downcast_ref::<jetstream::Error>());
            match api.map(jetstream::Error::error_code) {
                // nats-server answers a full discard-new stream with "maximum bytes/messages
                // exceeded" under the store-failed code.
                Some(ErrorCode::STREAM_STORE_FAILED) => Refusal::Full,
                Some(ErrorCode::STREAM_MESSAGE_EXCEEDS_MAXIMUM) => Refusal::TooLarge,
                Some(ErrorCode::STREAM_WRONG_LAST_SEQUENCE) => Refusal::WrongLastSequence,
                Some(_) => Refusal::Transient,
                None if sent => Refusal::Ambiguous,
                None => Refusal::Transient,
            }
        }
        _ => Refusal::Transient,
    }
}

/// Most readings one buffer entry carries.
pub const MAX_ENTRY_READINGS: usize = 256;
/// Most payload bytes one buffer entry carries (a larger reading still gets an entry of its
/// own, and JetStream's `max_payload` decides whether it fits).
pub const MAX_ENTRY_BYTES: usize = 256 * 1024;

/// Entry header: the `buffer_seq` of the entry's first reading.
pub const SEQ_HEADER: async_nats::HeaderName = async_nats::HeaderName::from_static("Fieldgate-Seq");
/// Entry header: how many readings the entry carries.
pub const READINGS_HEADER: async_nats::HeaderName = async_nats::HeaderName::from_static("Fieldgate-Readings");
/// Entry header, once per sampled reading: `<index in the entry> <traceparent>`, where the
/// reading's trace continues in the uplink that delivers it.
pub const TRACE_HEADER: async_nats::HeaderName = async_nats::HeaderName::from_static("Fieldgate-Trace");

/// The readings an entry covers, from its headers: `(buffer_seq of the first, count)`.
pub fn entry_range(headers: Option<&async_nats::HeaderMap>) -> Option<(u64, u64)> {
    let h = headers?;
    let first = h.get(SEQ_HEADER)?.as_str().parse().ok()?;
    let n = h.get(READINGS_HEADER)?.as_str().parse().ok()?;
    Some((first, n))
}

/// The sampled readings of an entry: `(index in the entry, traceparent)`.
pub fn entry_traces(headers: Option<&async_nats::HeaderMap>) -> Vec<(usize, &str)> {
    let Some(h) = headers else { return Vec::new() };
    h.get_all(TRACE_HEADER)
        .filter_map(|v| {
            let (i, tp) = v.as_str().split_once(' ')?;
            Some((i.parse().ok()?, tp))
        })
        .collect()
}

/// A buffer entry's payload is not a `BufferEntry`.
#[derive(Debug, thiserror::Error)]
#[error("not a buffer entry: {0}")]
pub struct EntryError(&'static str);

/// The readings of an entry's payload (`BufferEntry` in `proto/fieldgate/v1/reading.proto`),
/// each as its own protobuf bytes, without decoding them.
pub fn entry_readings(payload: &[u8]) -> Result<Vec<&[u8]>, EntryError> {
    use prost::encoding::{WireType, decode_key, decode_varint};
    let mut buf = payload;
    let mut out = Vec::new();
    while !buf.is_empty() {
        let (tag, wire) = decode_key(&mut buf).map_err(|_| EntryError("bad field key"))?;
        if tag != 1 || wire != WireType::LengthDelimited {
            return Err(EntryError("unexpected field"));
        }
        let len = decode_varint(&mut buf).map_err(|_| EntryError("bad length"))?;
        let len = usize::try_from(len).map_err(|_| EntryError("bad length"))?;
        if len > buf.len() {
            return Err(EntryError("truncated reading"));
        }
        out.push(&buf[..len]);
        buf = &buf[len..];
    }
    Ok(out)
}

/// Packs encoded readings into one entry payload (a `BufferEntry`).
fn encode_entry<'a>(readings: impl Iterator<Item = &'a [u8]> + Clone) -> Bytes {
    use prost::encoding::{WireType, encode_key, encode_varint, encoded_len_varint};
    let size: usize = readings.clone().map(|r| 1 + encoded_len_varint(r.len() as u64) + r.len()).sum();
    let mut out = Vec::with_capacity(size);
    for r in readings {
        encode_key(1, WireType::LengthDelimited, &mut out);
        encode_varint(r.len() as u64, &mut out);
        out.extend_from_slice(r);
    }
    Bytes::from(out)
}

/// The `buffer_seq` an empty stream whose last entry had stream sequence `last_entry` starts
/// at. Every entry carries at most [`MAX_ENTRY_READINGS`] readings and only stored entries
/// advance the count, so no reading of an earlier entry can have a `buffer_seq` at or above
/// this: the sequence keeps growing across restarts even when nothing is left to read it from.
pub fn seq_floor(last_entry: u64) -> u64 {
    last_entry.saturating_mul(MAX_ENTRY_READINGS as u64).saturating_add(1)
}

/// Where the lane of `b` continues: the `buffer_seq` of its next entry (right after the
/// stream's last entry, or the [`seq_floor`] when the stream holds none) and the stream's last
/// sequence, which each publish expects (`Nats-Expected-Last-Sequence`).
async fn restore_next_seq(js: &jetstream::Context, b: &UplinkBuffer) -> Result<(u64, u64), async_nats::Error> {
    let mut stream = js.get_stream(&b.stream).await?;
    let state = stream.info().await?.state.clone();
    if state.messages > 0 {
        match stream.get_last_raw_message_by_subject(&b.subject).await {
            Ok(m) => {
                if let Some((first, n)) = entry_range(Some(&m.headers)) {
                    info!(uplink = %b.uplink, next = first + n, "bufferSeq continues at {} after the buffer's last entry", first + n);
                    return Ok((first + n, state.last_sequence));
                }
            }
            Err(e) => debug!(stream = %b.stream, error = %e, "last entry not readable; continuing past every entry"),
        }
    }
    let floor = seq_floor(state.last_sequence);
    if state.last_sequence > 0 {
        info!(uplink = %b.uplink, next = floor, "the buffer is empty: bufferSeq continues at {floor}, past any earlier entry");
    }
    Ok((floor, state.last_sequence))
}

/// One reading waiting in an uplink's lane.
struct Queued {
    payload: Bytes,
    tracker: Option<Arc<AcceptanceTracker>>,
    /// `fieldgate.buffer.append` (recorded for sampled readings only).
    span: StageSpan,
    since: Instant,
}

impl Queued {
    fn resolve(self, outcome: Result<(), DropReason>, attempts: i64) {
        let mut span = self.span;
        if span.is_recording() {
            span.attributes(|| vec![opentelemetry::KeyValue::new("fieldgate.publish.attempts", attempts)]);
            match outcome {
                Ok(()) => span.ok(),
                Err(reason) => span.fail(reason.as_str()),
            }
            span.end();
        }
        if let Some(t) = self.tracker {
            t.resolve(outcome);
        }
    }
}

/// The message id of the entry whose first reading is `first_seq`: unique in the stream, and
/// the same for every retry of the entry, so JetStream stores it once.
pub fn entry_id(stream: &str, first_seq: u64) -> String {
    format!("{stream}/{first_seq}")
}

/// Publishes one entry until JetStream stores it, refuses it for good, or `give_up_after`
/// passes without an attempt that might have stored it.
///
/// The lane is its stream's one writer, so each publish expects the stream's last sequence
/// (`last_stream_seq`, updated here). A publish that went out without an answer (a timeout, a
/// connection lost after sending) is *ambiguous*; the entry is then retried until JetStream
/// answers: a duplicate of its id or a moved last sequence whose message is this entry means
/// it was stored. An ambiguous entry is never given up on, so it is never counted as dropped
/// while it may be in the buffer, and its `buffer_seq`s are never reused.
async fn publish_entry(
    js: &jetstream::Context,
    b: &UplinkBuffer,
    first_seq: u64,
    batch: &[Queued],
    give_up_after: Duration,
    last_stream_seq: &mut u64,
) -> (Result<(), DropReason>, i64) {
    let n = batch.len();
    let payload = encode_entry(batch.iter().map(|q| q.payload.as_ref()));
    let id = entry_id(&b.stream, first_seq);
    let mut headers = async_nats::HeaderMap::new();
    headers.insert(async_nats::header::NATS_MESSAGE_ID, id.as_str());
    headers.insert(SEQ_HEADER, first_seq.to_string().as_str());
    headers.insert(READINGS_HEADER, n.to_string().as_str());
    for (i, q) in batch.iter().enumerate() {
        if let Some(tp) = q.span.traceparent() {
            headers.append(TRACE_HEADER, format!("{i} {}", tp.as_str()).as_str());
        }
    }
    let deadline = Instant::now() + give_up_after;
    let mut delays = backoff(Duration::from_millis(50), Duration::from_secs(2));
    let mut attempts: i64 = 0;
    let mut ambiguous = false;
    loop {
        attempts += 1;
        let mut h = headers.clone();
        h.insert(async_nats::header::NATS_EXPECTED_LAST_SEQUENCE, last_stream_seq.to_string().as_str());
        let publish = PublishMessage::build().headers(h).payload(payload.clone());
        let result = match js.send_publish(b.subject.clone(), publish).await {
            Ok(ack) => ack.await.map_err(|e| (classify(&e, true), e)),
            Err(e) => Err((classify(&e, false), e)),
        };
        let refusal = match result {
            Ok(ack) => {
                // A duplicate: an earlier attempt of this entry stored it (ids are unique).
                *last_stream_seq = ack.sequence;
                return (Ok(()), attempts);
            }
            Err((refusal, e)) => {
                debug!(subject = %b.subject, id = %id, error = %e, ?refusal, "publish not accepted");
                refusal
            }
        };
        match refusal {
            Refusal::Full => return (Err(DropReason::buffer_full_rejected), attempts),
            Refusal::TooLarge => return (Err(DropReason::too_large), attempts),
            Refusal::WrongLastSequence => match stored_after(js, b, *last_stream_seq, first_seq).await {
                Some(Some(seq)) => {
                    *last_stream_seq = seq;
                    return (Ok(()), attempts);
                }
                Some(None) => {
                    // Another writer moved the stream on (not this entry): continue after it.
                    if let Ok((_, last)) = restore_next_seq(js, b).await {
                        *last_stream_seq = last;
                    }
                }
                None => {}
            },
            Refusal::Ambiguous => ambiguous = true,
            Refusal::Transient if !ambiguous && Instant::now() >= deadline => {
                return (Err(DropReason::buffer_unavailable), attempts);
            }
            Refusal::Transient => {}
        }
        let delay = delays.next().unwrap_or(Duration::from_secs(2));
        tokio::time::sleep(delay).await;
    }
}

/// The stream moved past `last`: whether the message right after it is the entry starting at
/// `first_seq` (`Some(Some(its stream sequence))`), another (`Some(None)`), or unknown now
/// (`None`). A message already delivered and gone can only be this entry when it is the
/// stream's last one: the lane is the only writer.
async fn stored_after(js: &jetstream::Context, b: &UplinkBuffer, last: u64, first_seq: u64) -> Option<Option<u64>> {
    let mut stream = js.get_stream(&b.stream).await.ok()?;
    let next = last + 1;
    match stream.get_raw_message(next).await {
        Ok(m) => Some(entry_range(Some(&m.headers)).filter(|(first, _)| *first == first_seq).map(|_| next)),
        Err(_) => {
            let state = stream.info().await.ok()?.state.clone();
            Some((state.last_sequence == next).then_some(next))
        }
    }
}

/// Settings of the buffer writer.
#[derive(Clone, Debug)]
pub struct WriterSettings {
    /// Readings waiting per uplink before the adapters wait.
    pub lane_capacity: usize,
    /// How long a publish is retried while JetStream is unreachable before the reading is
    /// dropped (`buffer_unavailable`).
    pub give_up_after: Duration,
}

impl Default for WriterSettings {
    fn default() -> Self {
        Self { lane_capacity: 1024, give_up_after: Duration::from_secs(30) }
    }
}

/// Drains the adapters' queue into JetStream until every sender is gone, then waits for the
/// outstanding PubAcks: nothing handed to the writer is left unresolved in memory. If
/// `abandon` fires first (the shutdown grace period ran out), the readings not yet accepted
/// are counted as dropped (`buffer_unavailable`) before it returns.
///
/// Each uplink has a lane: its readings are stored as entries of up to
/// [`MAX_ENTRY_READINGS`], one entry awaiting its PubAck at a time, the next holding whatever
/// arrived meanwhile (group commit: one write, and with `sync_interval: always` one fsync, for
/// many readings under load; no waiting when idle). One entry at a time also means a refused
/// entry leaves no gap in `buffer_seq`.
///
/// `routes` may change while it runs (a config reload): each reading goes to the routes in
/// force when the writer takes it.
pub async fn run_writer(
    js: jetstream::Context,
    mut routes: watch::Receiver<Arc<Routes>>,
    metrics: Arc<Metrics>,
    settings: WriterSettings,
    mut rx: mpsc::Receiver<Submission>,
    abandon: tokio_util::sync::CancellationToken,
) {
    let mut lanes: HashMap<String, Lane> = HashMap::new();
    let mut lane_tasks = tokio::task::JoinSet::new();
    // Lanes of uplinks that left the config, storing what they still hold before they end.
    let mut closing: HashMap<tokio::task::Id, String> = HashMap::new();
    loop {
        let next = tokio::select! {
            biased;
            () = abandon.cancelled() => {
                rx.close();
                let current = Arc::clone(&routes.borrow());
                let mut left: HashMap<&str, u64> = HashMap::new();
                while let Ok(reading) = rx.try_recv() {
                    for &route in current.targets(&reading.namespace, &reading.device) {
                        *left.entry(current.buffers()[route].uplink.as_str()).or_default() += 1;
                    }
                }
                for (uplink, n) in left {
                    warn!(uplink = %uplink, dropped = n, "shutdown grace ran out: readings not yet accepted are dropped");
                    metrics.dropped_n(uplink, DropReason::buffer_unavailable, n);
                }
                break;
            }
            Some(ended) = lane_tasks.join_next_with_id(), if !closing.is_empty() => {
                closing.remove(&lane_id(&ended));
                continue;
            }
            next = rx.recv() => next,
        };
        let Some(mut reading) = next else {
            info!(lanes = lanes.len(), "buffer writer draining");
            break;
        };
        if routes.has_changed().unwrap_or(false) {
            // Lanes of uplinks that left the config close: each stores what it holds and ends.
            let current = Arc::clone(&routes.borrow_and_update());
            lanes.retain(|uplink, lane| {
                let kept = current.buffers().iter().any(|b| b.uplink == *uplink);
                if !kept {
                    closing.insert(lane.task, uplink.clone());
                }
                kept
            });
        }
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
        let tracker = reading.accepted.take().map(|tx| Arc::new(AcceptanceTracker::new(targets.len(), tx)));
        for &route in targets {
            let b = &current.buffers()[route];
            // Looked up by reference: this runs for every reading.
            if !lanes.contains_key(&b.uplink) {
                // An uplink back in the config waits for its old lane to end: two lanes would
                // number the same stream's readings.
                while closing.values().any(|u| *u == b.uplink) {
                    match lane_tasks.join_next_with_id().await {
                        Some(ended) => {
                            closing.remove(&lane_id(&ended));
                        }
                        None => closing.clear(),
                    }
                }
                let (tx, lane_rx) = mpsc::channel(settings.lane_capacity);
                let task = lane_tasks.spawn(run_lane(
                    js.clone(),
                    Arc::clone(b),
                    Arc::clone(&metrics),
                    settings.give_up_after,
                    lane_rx,
                    abandon.clone(),
                ));
                lanes.insert(b.uplink.clone(), Lane { tx, task: task.id() });
            }
            let Some(Lane { tx: lane, .. }) = lanes.get(&b.uplink) else { continue };
            let span = append_span(reading.trace.as_ref(), &b.uplink, &b.subject, &reading.id);
            let queued = Queued { payload: payload.clone(), tracker: tracker.clone(), span, since: Instant::now() };
            // Waits while the lane is full: the adapters feel the buffer's pace.
            let sent = tokio::select! {
                biased;
                () = abandon.cancelled() => false,
                sent = lane.send(queued) => sent.is_ok(),
            };
            if !sent {
                metrics.dropped(&b.uplink, DropReason::buffer_unavailable);
            }
        }
    }
    // Closing the lanes lets each store what it holds and stop (or count it, if abandoned).
    lanes.clear();
    while lane_tasks.join_next().await.is_some() {}
    warn_if_dropped(&metrics, &routes.borrow());
    info!("buffer writer stopped");
}

/// The writer's end of an uplink's lane.
struct Lane {
    tx: mpsc::Sender<Queued>,
    task: tokio::task::Id,
}

/// The id of a lane task that ended.
fn lane_id(ended: &Result<(tokio::task::Id, ()), tokio::task::JoinError>) -> tokio::task::Id {
    match ended {
        Ok((id, ())) => *id,
        Err(e) => e.id(),
    }
}

/// Stores one uplink's readings as entries, one awaiting its PubAck at a time.
async fn run_lane(
    js: jetstream::Context,
    b: Arc<UplinkBuffer>,
    metrics: Arc<Metrics>,
    give_up_after: Duration,
    mut rx: mpsc::Receiver<Queued>,
    abandon: tokio_util::sync::CancellationToken,
) {
    let labels = UplinkLabels { uplink: b.uplink.clone() };
    let accepted = metrics.readings_accepted.get_or_create(&labels).clone();
    let last_seq = metrics.buffer_last_seq.get_or_create(&labels).clone();
    // The next entry's first `buffer_seq` and the stream's last sequence, once known.
    let mut next: Option<(u64, u64)> = None;
    let mut batch: Vec<Queued> = Vec::new();
    // The second halves of entries JetStream refused as too large, stored next.
    let mut halves: Vec<Vec<Queued>> = Vec::new();
    let mut carry: Option<Queued> = None;
    let mut restore_delays = backoff(Duration::from_millis(50), Duration::from_secs(2));
    loop {
        if batch.is_empty()
            && let Some(half) = halves.pop()
        {
            batch = half;
        }
        if batch.is_empty() {
            let first = match carry.take() {
                Some(q) => q,
                None => tokio::select! {
                    biased;
                    () = abandon.cancelled() => break,
                    q = rx.recv() => match q {
                        Some(q) => q,
                        None => return,
                    },
                },
            };
            batch.push(first);
            let mut bytes: usize = batch.iter().map(|q| q.payload.len()).sum();
            while batch.len() < MAX_ENTRY_READINGS && carry.is_none() {
                let Ok(q) = rx.try_recv() else { break };
                if bytes + q.payload.len() > MAX_ENTRY_BYTES {
                    carry = Some(q);
                } else {
                    bytes += q.payload.len();
                    batch.push(q);
                }
            }
        }
        let (first_seq, mut last_stream_seq) = match next {
            Some(at) => at,
            None => match restore_next_seq(&js, &b).await {
                Ok((s, last)) => {
                    debug!(uplink = %b.uplink, next = s, "buffer sequence restored");
                    last_seq.set(i64::try_from(s - 1).unwrap_or(i64::MAX));
                    (s, last)
                }
                Err(e) => {
                    debug!(uplink = %b.uplink, error = %e, "buffer not reachable; readings wait");
                    let (expired, waiting): (Vec<Queued>, Vec<Queued>) =
                        batch.drain(..).partition(|q| q.since.elapsed() >= give_up_after);
                    batch = waiting;
                    if !expired.is_empty() {
                        metrics.dropped_n(&b.uplink, DropReason::buffer_unavailable, expired.len() as u64);
                        for q in expired {
                            q.resolve(Err(DropReason::buffer_unavailable), 0);
                        }
                    }
                    let delay = restore_delays.next().unwrap_or(Duration::from_secs(2));
                    tokio::select! {
                        biased;
                        () = abandon.cancelled() => break,
                        () = tokio::time::sleep(delay) => continue,
                    }
                }
            },
        };
        let n = batch.len() as u64;
        let (outcome, attempts) = tokio::select! {
            biased;
            () = abandon.cancelled() => break,
            o = publish_entry(&js, &b, first_seq, &batch, give_up_after, &mut last_stream_seq) => o,
        };
        next = Some((first_seq, last_stream_seq));
        match outcome {
            Ok(()) => {
                next = Some((first_seq + n, last_stream_seq));
                last_seq.set(i64::try_from(first_seq + n - 1).unwrap_or(i64::MAX));
                accepted.inc_by(n);
                for q in batch.drain(..) {
                    q.resolve(Ok(()), attempts);
                }
            }
            Err(DropReason::too_large) if batch.len() > 1 => {
                // Each reading may fit alone: store the halves one after the other.
                let second = batch.split_off(batch.len() / 2);
                debug!(uplink = %b.uplink, readings = n, "entry too large for JetStream; storing it in halves");
                halves.push(second);
            }
            Err(reason) => {
                metrics.dropped_n(&b.uplink, reason, n);
                for q in batch.drain(..) {
                    q.resolve(Err(reason), attempts);
                }
            }
        }
    }
    // Abandoned: what is held here was not accepted.
    rx.close();
    let mut left = batch.len() as u64 + u64::from(carry.is_some()) + halves.iter().map(|h| h.len() as u64).sum::<u64>();
    while rx.try_recv().is_ok() {
        left += 1;
    }
    if left > 0 {
        warn!(uplink = %b.uplink, dropped = left, "shutdown grace ran out: readings not yet accepted are dropped");
        metrics.dropped_n(&b.uplink, DropReason::buffer_unavailable, left);
    }
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
    fn an_entry_carries_its_readings_and_their_place() {
        let readings: Vec<Vec<u8>> = (0..3u64)
            .map(|i| {
                crate::reading::Reading {
                    id: crate::reading::message_id("ns", "d", i),
                    device: "d".into(),
                    time_unix_nano: i,
                    ..Default::default()
                }
                .encode_to_vec()
            })
            .collect();
        let payload = encode_entry(readings.iter().map(Vec::as_slice));
        let back = entry_readings(&payload).unwrap();
        assert_eq!(back, readings.iter().map(Vec::as_slice).collect::<Vec<_>>());
        // The payload is the `BufferEntry` message of the proto file.
        let decoded = crate::reading::pb::BufferEntry::decode(payload.as_ref()).unwrap();
        assert_eq!(decoded.readings[2].id, "ns/d/2");
        assert!(entry_readings(&payload[..payload.len() - 1]).is_err());
        assert!(entry_readings(b"\x10\x01").is_err());
        assert!(entry_readings(&[]).unwrap().is_empty());

        let mut h = async_nats::HeaderMap::new();
        assert_eq!(entry_range(Some(&h)), None);
        h.insert(SEQ_HEADER, "41");
        h.insert(READINGS_HEADER, "3");
        h.append(TRACE_HEADER, "2 00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01");
        assert_eq!(entry_range(Some(&h)), Some((41, 3)));
        assert_eq!(entry_traces(Some(&h)), vec![(2, "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01")]);
    }

    #[test]
    fn the_sequence_floor_is_past_every_earlier_reading() {
        assert_eq!(seq_floor(0), 1);
        // However full each of 10 entries was, their readings numbered below the floor.
        let most = 1 + 10 * MAX_ENTRY_READINGS as u64;
        assert!(seq_floor(10) >= most);
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
