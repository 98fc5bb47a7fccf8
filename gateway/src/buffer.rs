//! The buffer: one JetStream stream per uplink on the node's disk, and the writer that puts
//! readings into it.
//!
//! A reading is *accepted* once JetStream acknowledged the entry that carries it (PubAck); until
//! then it is only in flight. An entry is one JetStream message holding up to
//! [`MAX_ENTRY_READINGS`] readings (`BufferEntry` in `proto/fieldgate/v1/reading.proto`): each
//! uplink's lane stores one entry at a time, and the next carries every reading that arrived
//! meanwhile (group commit) — and, with the uplink's `buffer.linger` (2 ms unless set), every
//! reading that arrives until its first one has waited that long, or until none came for a
//! quarter of it (fewer, larger entries for less CPU). Its headers give
//! the `buffer_seq` of its first reading and their count, so `buffer_seq` numbers the uplink's
//! readings without gaps. Its `Nats-Msg-Id` is `{stream}/{first buffer_seq}` ([`entry_id`]), unique
//! in the stream and the same for every retry, and each publish expects the stream's last sequence
//! (the lane is its stream's one writer): an entry whose PubAck was lost is recognised when
//! retried, never stored twice, never counted as dropped, and its `buffer_seq`s are never reused.
//! An entry JetStream refuses as too large (for its `max_payload`, or for the whole buffer) is
//! stored in halves until each reading goes alone; one reading too large alone, or an entry refused
//! otherwise (`rejectNew` and full, JetStream unreachable for `give_up_after` with no attempt that
//! might have stored it), is dropped and each of its readings counted with the reason.
//!
//! `buffer_seq` continues across restarts: after the stream's last entry, or, when the stream
//! is empty, from the lane's [`SeqRecord`] in the key-value bucket [`SEQ_RECORDS`]. The record
//! is written off the lane's path right before each release, and entries are released only up
//! to the entry it describes, so a stream a release left empty continues exactly; besides, it
//! is written once a burst of entries is over (at least every `RECORD_EVERY`) and at a
//! graceful stop. Only when the record is behind the stream (the lane itself removed the last
//! entries, past `maxAge` or for room, and the gateway crashed before writing it) does the
//! sequence jump forward ([`next_after_empty`]), never back.
//!
//! The uplink's consumer acks an entry only after the cloud confirmed or refused each of its
//! readings. Streams use limits retention, so an ack removes nothing by itself (on an interest
//! stream every ack is a removal: a write and, with `sync_interval: always`, an fsync per
//! entry); the uplink releases the acknowledged prefix — every entry up to its consumer's
//! acknowledgement floor — in one purge at most every few seconds ([`release_settled`]), and
//! the lane does the same before it treats the stream as full, and at start. The release is
//! the durable confirmation: the consumer keeps its acknowledgements in nats-server's memory
//! (no write per ack), and an entry acknowledged and not released yet when nats-server
//! restarts is delivered again — sent nothing and acked at once when the uplink settled it in
//! this run, sent again (a duplicate, never a loss) after a restart of both.
//! `maxBytes`/`maxAge` bound what an outage can pile up. JetStream itself only refuses a write
//! to a full stream; the lane removes entries past `maxAge` and, with `onFull: dropOldest`,
//! the oldest entry not being delivered to make room, counting each reading it removes — so
//! the count of dropped readings is exact (the rule and its limits: [`crate::index`]).
//! Durability against power loss is the nats-server's `jetstream.sync_interval` setting
//! (`always` fsyncs every write; the default `2m` trades that for throughput).

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use async_nats::jetstream::context::{GetStreamErrorKind, PublishError, PublishErrorKind};
use async_nats::jetstream::message::PublishMessage;
use async_nats::jetstream::stream::{self, DiscardPolicy, RetentionPolicy, StorageType};
use async_nats::jetstream::{self, ErrorCode};
use bytes::Bytes;
use fieldgate_crds::{GatewayConfig, GatewayUplink, OnFull};
use prost::Message;
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;
use tracing::{debug, error, info, warn};

use crate::index::{Claim, Phase, Prior, UplinkState};
use crate::metrics::{DropReason, Metrics};
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
    /// How long the first reading of an entry waits for others to join it.
    pub linger: Duration,
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
            linger: b.linger(),
        }
    }

    /// The stream configuration.
    pub fn stream_config(&self) -> stream::Config {
        stream::Config {
            name: self.stream.clone(),
            description: Some(format!("Fieldgate buffer of uplink {}", self.uplink)),
            subjects: vec![self.subject.clone()],
            // Limits retention: an acknowledgement does not remove its entry (on an interest
            // stream each one is a removal, a write and an fsync per entry); the uplink
            // releases the acknowledged prefix in one purge now and then
            // ([`release_settled`]).
            retention: RetentionPolicy::Limits,
            storage: StorageType::File,
            num_replicas: 1,
            max_bytes: i64::try_from(self.max_bytes).unwrap_or(i64::MAX),
            // The gateway applies `maxAge` and `onFull: dropOldest` itself, counting each
            // reading it removes (see `crate::index`): JetStream only refuses a full write.
            max_age: Duration::ZERO,
            discard: DiscardPolicy::New,
            duplicate_window: DUPLICATE_WINDOW,
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

/// What a release did: entries removed, and the stream sequence it removed up to.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Released {
    /// Entries removed.
    pub entries: u64,
    /// Every entry up to this stream sequence is gone: the consumer's acknowledgement floor,
    /// or `recorded` when that is lower.
    pub floor: u64,
}

/// Removes the entries the uplink's consumer acknowledged, up to its acknowledgement floor
/// (every entry at or below it was acked or terminated) and no further than `recorded` (the
/// entry the written [`SeqRecord`] describes), in one purge. Nothing else is touched: an entry
/// above the floor is kept even if acked (an ack nats-server has not processed yet, or one
/// behind an entry still in flight), for a later release.
pub async fn release_settled<I>(stream: &stream::Stream<I>, recorded: u64) -> Result<Released, async_nats::Error> {
    let info = stream.consumer_info(crate::uplinks::CONSUMER).await?;
    let floor = info.ack_floor.stream_sequence.min(recorded);
    if floor == 0 {
        return Ok(Released::default());
    }
    Ok(Released { entries: stream.purge().sequence(floor + 1).await?.purged, floor })
}

/// [`release_settled`] up to the entry the lane's sequence record describes once written now
/// ([`UplinkState::flush_record`]): how the uplink and the lane release.
pub async fn release_recorded<I>(
    stream: &stream::Stream<I>,
    state: &UplinkState,
) -> Result<Released, async_nats::Error> {
    let recorded = state.flush_record(RECORD_FLUSH_WITHIN).await;
    release_settled(stream, recorded).await
}

/// How long a release waits for the lane's recorder to write the sequence record.
const RECORD_FLUSH_WITHIN: Duration = Duration::from_secs(1);

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
        let selectors: Vec<_> = cfg.uplinks.iter().map(GatewayUplink::selector).collect();
        let mut by_device: HashMap<String, HashMap<String, Vec<usize>>> = HashMap::new();
        for d in &cfg.devices {
            let targets: Vec<usize> =
                selectors.iter().enumerate().filter(|(_, selects)| selects(d)).map(|(i, _)| i).collect();
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
pub fn encode_entry<'a>(readings: impl Iterator<Item = &'a [u8]> + Clone) -> Bytes {
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
/// at when nothing better is known. Every entry carries at most [`MAX_ENTRY_READINGS`]
/// readings and only stored entries advance the count, so no reading of an earlier entry can
/// have a `buffer_seq` at or above this: the sequence never goes back.
pub fn seq_floor(last_entry: u64) -> u64 {
    last_entry.saturating_mul(MAX_ENTRY_READINGS as u64).saturating_add(1)
}

/// The JetStream key-value bucket holding each lane's [`SeqRecord`], keyed by stream name.
pub const SEQ_RECORDS: &str = "fieldgate_buffer_seq";

/// Where a lane stood after its last stored entry: that entry's stream sequence and the next
/// `buffer_seq`. Kept in [`SEQ_RECORDS`] so that a lane starting on an empty stream continues
/// the numbering exactly.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SeqRecord {
    /// Stream sequence of the entry stored last.
    pub stream_seq: u64,
    /// The `buffer_seq` of the next reading.
    pub next: u64,
}

impl SeqRecord {
    fn encode(self) -> Bytes {
        Bytes::from(format!("{} {}", self.stream_seq, self.next))
    }

    fn decode(b: &[u8]) -> Option<Self> {
        let (s, n) = std::str::from_utf8(b).ok()?.split_once(' ')?;
        Some(Self { stream_seq: s.parse().ok()?, next: n.parse().ok()? })
    }
}

/// The next `buffer_seq` of a stream that holds no entry and whose last stream sequence is
/// `last_seq`: exact when `record` describes that last entry; else (the record of the last
/// entries was not written: the gateway stopped right after storing them) past every reading
/// they can have held.
pub fn next_after_empty(last_seq: u64, record: Option<SeqRecord>) -> u64 {
    match record {
        Some(r) if r.stream_seq == last_seq => r.next,
        Some(r) if r.stream_seq < last_seq => {
            r.next.saturating_add((last_seq - r.stream_seq).saturating_mul(MAX_ENTRY_READINGS as u64))
        }
        _ => seq_floor(last_seq),
    }
}

/// The key-value bucket of sequence records, created if missing.
async fn seq_records(js: &jetstream::Context) -> Result<jetstream::kv::Store, async_nats::Error> {
    let config = jetstream::kv::Config {
        bucket: SEQ_RECORDS.to_string(),
        description: "Fieldgate: where each uplink buffer's bufferSeq continues".to_string(),
        history: 1,
        storage: StorageType::File,
        ..Default::default()
    };
    Ok(js.create_or_update_key_value(config).await?)
}

/// Writes the latest [`SeqRecord`] of a lane when a release asks for it ([`UplinkState::flush_record`]),
/// once a burst of entries is over (at least every [`RECORD_EVERY`] while they keep coming), and
/// the last one when the lane is gone. Never in the lane's way: a record that cannot be
/// written now is written later. Each attempt is answered ([`UplinkState::recorded`]).
async fn run_recorder(
    js: jetstream::Context,
    key: String,
    mut rx: watch::Receiver<Option<SeqRecord>>,
    state: Arc<UplinkState>,
) {
    let _running = state.recorder_started();
    let mut store: Option<jetstream::kv::Store> = None;
    let mut written: Option<SeqRecord> = None;
    let mut delays = backoff(Duration::from_millis(100), Duration::from_secs(5));
    loop {
        let mut closed = false;
        let mut wanted = false;
        tokio::select! {
            changed = rx.changed() => closed = changed.is_err(),
            () = state.record_wanted() => wanted = true,
        }
        // One write per burst of entries: once the lane stored nothing for RECORD_QUIET, and
        // at least every RECORD_EVERY while it keeps storing (each write is a JetStream
        // write, an fsync and the removal of the previous revision); at once when asked.
        let burst = Instant::now();
        while !closed && !wanted {
            let at = (Instant::now() + RECORD_QUIET).min(burst + RECORD_EVERY);
            tokio::select! {
                changed = rx.changed() => closed = changed.is_err(),
                () = state.record_wanted() => wanted = true,
                () = tokio::time::sleep_until(at) => break,
            }
        }
        let mut tries = 0;
        loop {
            let latest = *rx.borrow_and_update();
            let Some(record) = latest.filter(|r| Some(*r) != written) else {
                state.recorded(written.map(|r| r.stream_seq));
                break;
            };
            let put = async {
                if store.is_none() {
                    store = Some(seq_records(&js).await?);
                }
                match &store {
                    Some(s) => s.put(&key, record.encode()).await.map(|_| ()).map_err(async_nats::Error::from),
                    None => Ok(()),
                }
            };
            match put.await {
                Ok(()) => written = Some(record),
                Err(e) => {
                    debug!(key = %key, error = %e, "buffer sequence record not written; trying again");
                    state.recorded(None);
                    store = None;
                    tries += 1;
                    if closed && tries >= 3 {
                        return;
                    }
                    tokio::time::sleep(delays.next().unwrap_or(Duration::from_secs(5))).await;
                }
            }
        }
        if closed {
            return;
        }
    }
}

/// Besides before each release, the sequence record is written once the lane stored nothing
/// for this long...
const RECORD_QUIET: Duration = Duration::from_secs(2);
/// ...and at least this often while it keeps storing.
const RECORD_EVERY: Duration = Duration::from_secs(30);

/// Where the lane of `b` continues, read from the stream: the `buffer_seq` of its next entry
/// (right after the stream's last entry, or from the [`SeqRecord`] when the stream holds none),
/// the stream's last sequence, which each publish expects (`Nats-Expected-Last-Sequence`), and
/// the entries already in the stream.
async fn restore(js: &jetstream::Context, b: &UplinkBuffer) -> Result<(stream::Stream, u64, Prior), async_nats::Error> {
    let mut stream = js.get_stream(&b.stream).await?;
    // The lane's sequence record; no bucket yet (no record ever written) is no record; any
    // other failure is retried.
    let bucket = js.get_stream(format!("KV_{SEQ_RECORDS}")).await;
    let record = match bucket {
        Ok(_) => js.get_key_value(SEQ_RECORDS).await?.get(&b.stream).await?.as_deref().and_then(SeqRecord::decode),
        Err(e) if matches!(e.kind(), GetStreamErrorKind::JetStream(j) if j.error_code() == ErrorCode::STREAM_NOT_FOUND) => {
            None
        }
        Err(e) => return Err(e.into()),
    };
    // What an earlier run's uplink acknowledged and did not release yet is not buffered
    // (released up to the entry the record describes, as every release).
    match release_settled(&stream, record.map_or(0, |r| r.stream_seq)).await {
        Ok(r) if r.entries == 0 => {}
        Ok(r) => debug!(uplink = %b.uplink, entries = r.entries, "entries acknowledged by an earlier run released"),
        Err(e) => debug!(uplink = %b.uplink, error = %e, "nothing released at start (no consumer yet?)"),
    }
    let state = stream.info().await?.state.clone();
    let mut prior = Prior { last_seq: state.last_sequence, ..Prior::default() };
    if state.messages > 0 {
        let last = stream.get_last_raw_message_by_subject(&b.subject).await.ok();
        let first = stream.get_raw_message(state.first_sequence).await.ok();
        let last = last.and_then(|m| entry_range(Some(&m.headers)));
        let first = first.and_then(|m| entry_range(Some(&m.headers)));
        if let (Some((last_first, last_n)), Some((first_first, _))) = (last, first) {
            let next = last_first + last_n;
            prior.entries = state.messages;
            prior.readings = next.saturating_sub(first_first);
            prior.bytes = state.bytes;
            prior.oldest = Some(std::time::SystemTime::from(state.first_timestamp));
            info!(uplink = %b.uplink, next, entries = state.messages, "bufferSeq continues at {next} after the buffer's last entry");
            return Ok((stream, next, prior));
        }
        warn!(uplink = %b.uplink, "the buffer's first or last entry is not readable; bufferSeq continues past every entry");
        prior.entries = state.messages;
        prior.bytes = state.bytes;
        prior.oldest = Some(std::time::SystemTime::from(state.first_timestamp));
        return Ok((stream, seq_floor(state.last_sequence), prior));
    }
    let next = next_after_empty(state.last_sequence, record);
    if state.last_sequence > 0 {
        let exact = record.is_some_and(|r| r.stream_seq == state.last_sequence);
        info!(uplink = %b.uplink, next, exact, "the buffer is empty: bufferSeq continues at {next}");
    }
    Ok((stream, next, prior))
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

/// What became of a publish.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Publish {
    /// JetStream has it.
    Stored,
    /// The stream is full.
    Full,
    /// Larger than JetStream takes.
    TooLarge,
    /// Not stored, for good.
    Dropped(DropReason),
}

/// The bytes an entry takes in the stream, estimated: payload, headers, subject and the
/// store's per-message overhead.
fn entry_bytes(subject: &str, headers: &async_nats::HeaderMap, payload: usize) -> u64 {
    let headers: usize = headers
        .iter()
        .map(|(k, vs)| vs.iter().map(|v| AsRef::<str>::as_ref(k).len() + v.as_str().len() + 4).sum::<usize>())
        .sum();
    (payload + headers + subject.len() + 12 + 38) as u64
}

/// Publishes one entry until JetStream stores it, refuses it, or `give_up_after` passes
/// without an attempt that might have stored it. Returns the outcome, the attempts and the
/// entry's estimated size.
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
) -> (Publish, i64, u64) {
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
    let bytes = entry_bytes(&b.subject, &headers, payload.len());
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
                return (Publish::Stored, attempts, bytes);
            }
            Err((refusal, e)) => {
                debug!(subject = %b.subject, id = %id, error = %e, ?refusal, "publish not accepted");
                refusal
            }
        };
        match refusal {
            Refusal::Full => return (Publish::Full, attempts, bytes),
            Refusal::TooLarge => return (Publish::TooLarge, attempts, bytes),
            Refusal::WrongLastSequence => match stored_after(js, b, *last_stream_seq, first_seq).await {
                Some(Some(seq)) => {
                    *last_stream_seq = seq;
                    return (Publish::Stored, attempts, bytes);
                }
                Some(None) => {
                    // Another writer moved the stream on (not this entry): continue after it.
                    if let Ok(mut s) = js.get_stream(&b.stream).await
                        && let Ok(info) = s.info().await
                    {
                        *last_stream_seq = info.state.last_sequence;
                    }
                }
                None => {}
            },
            Refusal::Ambiguous => ambiguous = true,
            Refusal::Transient if !ambiguous && Instant::now() >= deadline => {
                return (Publish::Dropped(DropReason::buffer_unavailable), attempts, bytes);
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
    /// How long a publish is retried while JetStream is unreachable (or the buffer is full of
    /// readings being delivered) before the reading is dropped (`buffer_unavailable`,
    /// `buffer_full_rejected`).
    pub give_up_after: Duration,
}

impl Default for WriterSettings {
    fn default() -> Self {
        Self { lane_capacity: 1024, give_up_after: Duration::from_secs(30) }
    }
}

/// The buffer writer stopped before every adapter was gone: readings can no longer be
/// accepted.
#[derive(Debug, thiserror::Error)]
#[error("the buffer lane of uplink {uplink} stopped unexpectedly")]
pub struct WriterError {
    /// The uplink whose lane stopped.
    pub uplink: String,
}

impl WriterError {
    /// A static label for metrics.
    pub fn kind(&self) -> &'static str {
        "lane_stopped"
    }
}

/// Drains the adapters' queue into JetStream until every sender is gone, then waits for the
/// outstanding PubAcks: nothing handed to the writer is left unresolved in memory. If
/// `abandon` fires first (the shutdown grace period ran out), the readings not yet accepted
/// are counted as dropped (`buffer_unavailable`) before it returns.
///
/// Each uplink has a lane, started as soon as the uplink is routed: its readings are stored as
/// entries of up to [`MAX_ENTRY_READINGS`], one entry awaiting its PubAck at a time, the next
/// holding whatever arrived meanwhile (group commit: one write, and with
/// `sync_interval: always` one fsync, for many readings under load; no waiting when idle). One
/// entry at a time also means a refused entry leaves no gap in `buffer_seq`. The lane also
/// applies the buffer's limits itself (see [`crate::index`]): it removes entries older than
/// `maxAge`, and with `onFull: dropOldest` the oldest entry not being delivered when the
/// stream refuses a write as full, counting each reading it removes.
///
/// `routes` may change while it runs (a config reload): each reading goes to the routes in
/// force when the writer takes it.
///
/// Returns an error when a lane stopped unexpectedly (a bug): the gateway then cannot accept
/// readings for that uplink, and stops.
pub async fn run_writer(
    js: jetstream::Context,
    mut routes: watch::Receiver<Arc<Routes>>,
    metrics: Arc<Metrics>,
    settings: WriterSettings,
    mut rx: mpsc::Receiver<Submission>,
    abandon: tokio_util::sync::CancellationToken,
) -> Result<(), WriterError> {
    let mut lanes: HashMap<String, mpsc::Sender<Queued>> = HashMap::new();
    let mut lane_tasks = tokio::task::JoinSet::new();
    let mut lane_of: HashMap<tokio::task::Id, String> = HashMap::new();
    let open_lanes = |lanes: &mut HashMap<String, mpsc::Sender<Queued>>,
                      lane_tasks: &mut tokio::task::JoinSet<()>,
                      lane_of: &mut HashMap<tokio::task::Id, String>,
                      current: &Routes| {
        // A lane outlives its uplink leaving the config (it idles): were it replaced when the
        // uplink comes back, two lanes would number the same stream's readings.
        for b in current.buffers() {
            if !lanes.contains_key(&b.uplink) {
                let (tx, lane_rx) = mpsc::channel(settings.lane_capacity);
                let lane = Lane::new(js.clone(), Arc::clone(b), &metrics, settings.give_up_after);
                let handle = lane_tasks.spawn(lane.run(lane_rx, abandon.clone()));
                lane_of.insert(handle.id(), b.uplink.clone());
                lanes.insert(b.uplink.clone(), tx);
            }
        }
    };
    open_lanes(&mut lanes, &mut lane_tasks, &mut lane_of, &routes.borrow_and_update());
    let mut failed: Option<WriterError> = None;
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
            Some(done) = lane_tasks.join_next_with_id() => {
                let id = match &done { Ok((id, ())) => *id, Err(e) => e.id() };
                let uplink = lane_of.remove(&id).unwrap_or_default();
                error!(uplink = %uplink, panicked = done.is_err(), "a buffer lane stopped unexpectedly; the buffer writer stops");
                failed = Some(WriterError { uplink });
                break;
            }
            changed = routes.changed() => {
                if changed.is_ok() {
                    let current = Arc::clone(&routes.borrow_and_update());
                    open_lanes(&mut lanes, &mut lane_tasks, &mut lane_of, &current);
                }
                continue;
            }
            next = rx.recv() => next,
        };
        let Some(mut reading) = next else {
            info!(lanes = lanes.len(), "buffer writer draining");
            break;
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
        let tracker = reading.accepted.take().map(|tx| Arc::new(AcceptanceTracker::new(targets.len(), tx)));
        for &route in targets {
            let b = &current.buffers()[route];
            if !lanes.contains_key(&b.uplink) {
                open_lanes(&mut lanes, &mut lane_tasks, &mut lane_of, &current);
            }
            // Looked up by reference: this runs for every reading.
            let Some(lane) = lanes.get(&b.uplink) else { continue };
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
    match failed {
        Some(e) => Err(e),
        None => {
            info!("buffer writer stopped");
            Ok(())
        }
    }
}

/// What removing the oldest entry did.
#[derive(Debug, PartialEq, Eq)]
enum Removal {
    /// Removed; its unsettled readings counted with the reason.
    Removed,
    /// The oldest removable entry is not due (stored at that time).
    NotDue(SystemTime),
    /// No entry can be removed now; `in_flight`: some are being delivered.
    Nothing {
        /// Some entry is being delivered.
        in_flight: bool,
    },
}

/// The reason of a reading the gateway removes from the buffer: expired when its entry was
/// older than `max_age` at that moment, evicted otherwise.
pub fn removal_reason(stored: SystemTime, now: SystemTime, max_age: Duration) -> DropReason {
    if now.duration_since(stored).unwrap_or_default() >= max_age {
        DropReason::max_age_expired
    } else {
        DropReason::buffer_full_evicted
    }
}

/// One uplink's lane: stores its readings as entries and applies the buffer's limits.
struct Lane {
    js: jetstream::Context,
    b: Arc<UplinkBuffer>,
    state: Arc<UplinkState>,
    give_up_after: Duration,
    /// The stream, its next entry's first `buffer_seq` and last stream sequence, once restored.
    stream: Option<stream::Stream>,
    next: Option<(u64, u64)>,
    record: watch::Sender<Option<SeqRecord>>,
    /// When to look for entries past `max_age` next.
    expiry_due: Option<Instant>,
}

impl Lane {
    fn new(js: jetstream::Context, b: Arc<UplinkBuffer>, metrics: &Metrics, give_up_after: Duration) -> Self {
        let state = metrics.state.uplink(&b.uplink);
        Self { js, b, state, give_up_after, stream: None, next: None, record: watch::channel(None).0, expiry_due: None }
    }

    /// Reads where the buffer continues (once); entries past `max_age` are looked at at once.
    async fn restore(&mut self) -> Result<(), async_nats::Error> {
        let (stream, next, prior) = restore(&self.js, &self.b).await?;
        self.stream = Some(stream);
        self.next = Some((next, prior.last_seq));
        // Where the lane stands, so that the entries stored before it may be released.
        if prior.last_seq > 0 {
            self.record.send_replace(Some(SeqRecord { stream_seq: prior.last_seq, next }));
        }
        self.state.restored(next, prior);
        self.state.set_reachable(true);
        self.expiry_due = Some(Instant::now());
        Ok(())
    }

    /// Plans the next look for expired entries: when the oldest entry reaches `max_age` (at
    /// least a second from now, so that entries being delivered are not looked at in a loop).
    fn plan_expiry(&mut self) {
        self.expiry_due = self.state.oldest_stored().map(|t| {
            let age = t.elapsed().unwrap_or_default();
            Instant::now() + self.b.max_age.saturating_sub(age).max(Duration::from_secs(1))
        });
    }

    /// The oldest entry no one is delivering or removing: its stream sequence and store time.
    /// Entries of an earlier run are read from the stream as far as needed.
    async fn oldest_candidate(&mut self) -> Result<Option<(u64, SystemTime)>, async_nats::Error> {
        let prior = self.state.prior();
        if prior.entries > 0 {
            let Some(stream) = self.stream.as_mut() else { return Ok(None) };
            let st = stream.info().await?.state.clone();
            let end = prior.last_seq.min(st.last_sequence);
            let mut s = st.first_sequence.max(1);
            while s <= end {
                if self.state.is_removed(s) {
                    s += 1;
                    continue;
                }
                match self.state.phase(s) {
                    Some(Phase::Waiting) => break,
                    Some(_) => {}
                    None => match stream.get_raw_message(s).await {
                        Ok(m) => {
                            let n = entry_range(Some(&m.headers)).map_or(0, |(_, n)| n);
                            let bytes = entry_bytes(&self.b.subject, &m.headers, m.payload.len());
                            self.state.found(s, n, bytes, SystemTime::from(m.time));
                            break;
                        }
                        Err(e) if e.kind() == stream::LastRawMessageErrorKind::NoMessageFound => {}
                        Err(e) => return Err(e.into()),
                    },
                }
                s += 1;
            }
            if s > end {
                // Every sequence of the earlier run was looked at: none is left unseen.
                self.state.prior_seen();
            }
        }
        Ok(self.state.oldest_waiting())
    }

    /// Removes the oldest entry no one is delivering, if `due` says so of its store time, and
    /// counts its readings not settled yet ([`removal_reason`]).
    async fn remove_oldest(&mut self, due: impl Fn(SystemTime) -> bool) -> Result<Removal, async_nats::Error> {
        for _ in 0..8 {
            let Some((seq, stored)) = self.oldest_candidate().await? else {
                return Ok(Removal::Nothing { in_flight: self.state.any_in_flight() });
            };
            if !due(stored) {
                return Ok(Removal::NotDue(stored));
            }
            let Claim::Claimed { unsettled, stored } = self.state.claim(seq) else { continue };
            let Some(stream) = self.stream.as_ref() else {
                self.state.unclaim(seq);
                return Ok(Removal::Nothing { in_flight: false });
            };
            match stream.delete_message(seq).await {
                Ok(_) => {}
                Err(e) if matches!(e.kind(), stream::DeleteMessageErrorKind::JetStream(j) if j.error_code() == ErrorCode::NO_MESSAGE_FOUND) =>
                {
                    // Gone without an ack from the uplink: removed by hand. Not delivered
                    // either, so counted like a removal of ours.
                }
                Err(e) => {
                    self.state.unclaim(seq);
                    return Err(e.into());
                }
            }
            self.state.removed(seq);
            let reason = removal_reason(stored, SystemTime::now(), self.b.max_age);
            self.state.dropped(reason, unsettled);
            debug!(uplink = %self.b.uplink, seq, readings = unsettled, ?reason, "buffer entry removed");
            return Ok(Removal::Removed);
        }
        Ok(Removal::Nothing { in_flight: self.state.any_in_flight() })
    }

    /// Removes every entry older than `max_age` that is not being delivered.
    async fn expire(&mut self) {
        let max_age = self.b.max_age;
        let mut removed = 0u64;
        loop {
            let due = |stored: SystemTime| stored.elapsed().unwrap_or_default() >= max_age;
            match self.remove_oldest(due).await {
                Ok(Removal::Removed) => removed += 1,
                Ok(_) => break,
                Err(e) => {
                    debug!(uplink = %self.b.uplink, error = %e, "expired entries not removed now");
                    self.state.set_reachable(false);
                    self.expiry_due = Some(Instant::now() + Duration::from_secs(2));
                    return;
                }
            }
        }
        if removed > 0 {
            warn!(uplink = %self.b.uplink, entries = removed, "buffered readings past maxAge removed and counted (max_age_expired)");
        }
        self.plan_expiry();
    }

    /// Runs the lane until its queue closes (the writer drains) or `abandon` fires.
    async fn run(mut self, mut rx: mpsc::Receiver<Queued>, abandon: tokio_util::sync::CancellationToken) {
        let recorder = tokio::spawn(run_recorder(
            self.js.clone(),
            self.b.stream.clone(),
            self.record.subscribe(),
            Arc::clone(&self.state),
        ));
        let left = self.store_all(&mut rx, &abandon).await;
        // Abandoned: what is held here was not accepted.
        if let Some(mut left) = left {
            rx.close();
            while rx.try_recv().is_ok() {
                left += 1;
            }
            if left > 0 {
                warn!(uplink = %self.b.uplink, dropped = left, "shutdown grace ran out: readings not yet accepted are dropped");
                self.state.dropped(DropReason::buffer_unavailable, left);
            }
        }
        // The last record is written before the lane is gone (a restart on an empty stream
        // continues the sequence exactly).
        drop(self.record);
        let _ = tokio::time::timeout(Duration::from_secs(2), recorder).await;
    }

    /// Stores readings until the queue closes (`None`) or `abandon` fires (`Some(readings
    /// held and not accepted)`).
    async fn store_all(
        &mut self,
        rx: &mut mpsc::Receiver<Queued>,
        abandon: &tokio_util::sync::CancellationToken,
    ) -> Option<u64> {
        let mut batch: Vec<Queued> = Vec::new();
        // The second halves of entries too large to store whole, stored next.
        let mut halves: Vec<Vec<Queued>> = Vec::new();
        let mut carry: Option<Queued> = None;
        let mut restore_delays = backoff(Duration::from_millis(50), Duration::from_secs(2));
        let held = |batch: &Vec<Queued>, carry: &Option<Queued>, halves: &Vec<Vec<Queued>>| {
            batch.len() as u64 + u64::from(carry.is_some()) + halves.iter().map(|h| h.len() as u64).sum::<u64>()
        };
        loop {
            if self.next.is_none() {
                match self.restore().await {
                    Ok(()) => debug!(uplink = %self.b.uplink, "buffer sequence restored"),
                    Err(e) => {
                        debug!(uplink = %self.b.uplink, error = %e, "buffer not reachable; readings wait");
                        self.state.set_reachable(false);
                        let (expired, waiting): (Vec<Queued>, Vec<Queued>) =
                            batch.drain(..).partition(|q| q.since.elapsed() >= self.give_up_after);
                        batch = waiting;
                        if !expired.is_empty() {
                            self.state.dropped(DropReason::buffer_unavailable, expired.len() as u64);
                            for q in expired {
                                q.resolve(Err(DropReason::buffer_unavailable), 0);
                            }
                        }
                        let delay = restore_delays.next().unwrap_or(Duration::from_secs(2));
                        tokio::select! {
                            biased;
                            () = abandon.cancelled() => return Some(held(&batch, &carry, &halves)),
                            () = tokio::time::sleep(delay) => {}
                            // Readings arriving meanwhile join the batch (bounded by the
                            // entry limits; the rest wait in the queue).
                            q = rx.recv(), if batch.len() < MAX_ENTRY_READINGS && carry.is_none() => match q {
                                Some(q) => batch.push(q),
                                None if batch.is_empty() => return None,
                                None => {}
                            },
                        }
                        continue;
                    }
                }
            }
            if batch.is_empty()
                && let Some(half) = halves.pop()
            {
                batch = half;
            }
            if batch.is_empty() {
                let first = match carry.take() {
                    Some(q) => q,
                    None => {
                        let due = self.expiry_due;
                        tokio::select! {
                            biased;
                            () = abandon.cancelled() => return Some(held(&batch, &carry, &halves)),
                            () = sleep_until_some(due) => {
                                self.expire().await;
                                continue;
                            }
                            q = rx.recv() => match q {
                                Some(q) => q,
                                None => return None,
                            },
                        }
                    }
                };
                let until = first.since + self.b.linger;
                batch.push(first);
                let mut bytes: usize = batch.iter().map(|q| q.payload.len()).sum();
                while batch.len() < MAX_ENTRY_READINGS && carry.is_none() {
                    let Ok(q) = rx.try_recv() else { break };
                    admit(&mut batch, &mut carry, &mut bytes, q);
                }
                // `linger`: more readings may join until the first one has waited that long,
                // or until none arrived for a quarter of it ([`linger_close`]).
                let mut last = Instant::now();
                while !self.b.linger.is_zero() && batch.len() < MAX_ENTRY_READINGS && carry.is_none() {
                    let close = linger_close(until, last, self.b.linger);
                    let q = tokio::select! {
                        biased;
                        () = abandon.cancelled() => return Some(held(&batch, &carry, &halves)),
                        () = tokio::time::sleep_until(close) => break,
                        q = rx.recv() => match q {
                            Some(q) => q,
                            None => break,
                        },
                    };
                    admit(&mut batch, &mut carry, &mut bytes, q);
                    last = Instant::now();
                }
            }
            let stored = tokio::select! {
                biased;
                () = abandon.cancelled() => return Some(held(&batch, &carry, &halves)),
                stored = self.store(&mut batch, &mut halves) => stored,
            };
            if stored && self.expiry_due.is_none() {
                self.plan_expiry();
            }
        }
    }

    /// Stores `batch` as one entry (evicting the oldest entries while the buffer is full with
    /// `dropOldest`), or drops it and counts why, or splits it into `halves` when too large.
    /// Empties `batch`; returns whether it was stored.
    async fn store(&mut self, batch: &mut Vec<Queued>, halves: &mut Vec<Vec<Queued>>) -> bool {
        let Some((first_seq, mut last_stream_seq)) = self.next else { return false };
        let n = batch.len() as u64;
        let deadline = Instant::now() + self.give_up_after;
        let mut waits = backoff(Duration::from_millis(50), Duration::from_secs(1));
        let mut attempts_total = 0;
        // Whether acknowledged entries were released since the last refusal.
        let mut released = false;
        let outcome = loop {
            let (outcome, attempts, bytes) =
                publish_entry(&self.js, &self.b, first_seq, batch, self.give_up_after, &mut last_stream_seq).await;
            attempts_total += attempts;
            self.next = Some((first_seq, last_stream_seq));
            match outcome {
                Publish::Stored => {
                    self.state.stored(last_stream_seq, first_seq, n, bytes, SystemTime::now());
                    break Ok(());
                }
                // Entries delivered and not released yet take room too: release them first,
                // and once more when the floor is behind an ack already sent (the first
                // release's round trips give nats-server time to process it; no longer: a
                // floor held by an entry in flight during an outage stays put).
                Publish::Full if !released => {
                    released = true;
                    let mut r = self.release().await;
                    if r.entries == 0 && r.floor < self.state.max_settled() {
                        r = self.release().await;
                    }
                    if r.entries > 0 {
                        continue;
                    }
                }
                Publish::Full if self.b.on_full == OnFull::DropOldest => {
                    match self.remove_oldest(|_| true).await {
                        Ok(Removal::Removed) => continue,
                        Ok(Removal::Nothing { in_flight: false }) if self.stream_is_empty().await => {
                            // Full with nothing in it: the entry is larger than the buffer.
                            break Err(DropReason::too_large);
                        }
                        Ok(_) => {}
                        Err(e) => {
                            debug!(uplink = %self.b.uplink, error = %e, "could not make room in the buffer");
                        }
                    }
                    // Everything buffered is being delivered: wait for the cloud's answers.
                    if Instant::now() >= deadline {
                        break Err(DropReason::buffer_full_rejected);
                    }
                    tokio::time::sleep(waits.next().unwrap_or(Duration::from_secs(1))).await;
                    // Entries may have been acknowledged meanwhile.
                    released = false;
                }
                Publish::Full => break Err(DropReason::buffer_full_rejected),
                Publish::TooLarge => break Err(DropReason::too_large),
                Publish::Dropped(reason) => break Err(reason),
            }
        };
        match outcome {
            Ok(()) => {
                self.state.set_reachable(true);
                self.next = Some((first_seq + n, last_stream_seq));
                self.record.send_replace(Some(SeqRecord { stream_seq: last_stream_seq, next: first_seq + n }));
                self.state.accepted.inc_by(n);
                for q in batch.drain(..) {
                    q.resolve(Ok(()), attempts_total);
                }
                true
            }
            Err(DropReason::too_large) if batch.len() > 1 => {
                // Each reading may fit alone: store the halves one after the other.
                let second = batch.split_off(batch.len() / 2);
                debug!(uplink = %self.b.uplink, readings = n, "entry too large for the buffer; storing it in halves");
                halves.push(second);
                false
            }
            Err(reason) => {
                if reason == DropReason::buffer_unavailable {
                    self.state.set_reachable(false);
                }
                self.state.dropped(reason, n);
                for q in batch.drain(..) {
                    q.resolve(Err(reason), attempts_total);
                }
                false
            }
        }
    }

    /// [`release_recorded`] on this lane's stream; nothing released when it failed.
    async fn release(&mut self) -> Released {
        let Some(stream) = self.stream.as_ref() else { return Released::default() };
        match release_recorded(stream, &self.state).await {
            Ok(r) => r,
            Err(e) => {
                debug!(uplink = %self.b.uplink, error = %e, "acknowledged entries not released now");
                Released { entries: 0, floor: u64::MAX }
            }
        }
    }

    async fn stream_is_empty(&mut self) -> bool {
        match self.stream.as_mut() {
            Some(s) => s.info().await.is_ok_and(|i| i.state.messages == 0),
            None => false,
        }
    }
}

/// When an entry that lingers closes: `linger` after its first reading (`until`), or earlier
/// once no reading arrived for a quarter of `linger` since the `last` one. The readings of one
/// poll slot come within a few milliseconds of each other; the entry does not wait out the
/// rest of the linger once they stopped, while a steady stream of readings (faster than one
/// per quarter linger) still fills it for the whole linger.
fn linger_close(until: Instant, last: Instant, linger: Duration) -> Instant {
    until.min(last + linger / 4)
}

/// Adds `q` to the entry being formed, or keeps it for the next one when the entry would grow
/// past [`MAX_ENTRY_BYTES`].
fn admit(batch: &mut Vec<Queued>, carry: &mut Option<Queued>, bytes: &mut usize, q: Queued) {
    if *bytes + q.payload.len() > MAX_ENTRY_BYTES {
        *carry = Some(q);
    } else {
        *bytes += q.payload.len();
        batch.push(q);
    }
}

async fn sleep_until_some(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
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
    fn an_empty_buffer_continues_its_sequence_exactly_from_a_current_record() {
        let r = SeqRecord { stream_seq: 40, next: 1234 };
        assert_eq!(SeqRecord::decode(&r.encode()), Some(r));
        assert_eq!(SeqRecord::decode(b"40"), None);
        // The record describes the stream's last entry: exact, no jump.
        assert_eq!(next_after_empty(40, Some(r)), 1234);
        // Two entries stored after the record was written: past whatever they held.
        assert_eq!(next_after_empty(42, Some(r)), 1234 + 2 * MAX_ENTRY_READINGS as u64);
        // No record (or one of another stream's life): the floor.
        assert_eq!(next_after_empty(42, None), seq_floor(42));
        assert_eq!(next_after_empty(3, Some(r)), seq_floor(3));
    }

    #[test]
    fn a_lingering_entry_closes_at_its_linger_or_after_a_quiet_quarter_of_it() {
        let t0 = Instant::now();
        let linger = Duration::from_millis(40);
        let until = t0 + linger;
        // Readings stopped right after the first: closes a quarter linger later.
        assert_eq!(linger_close(until, t0, linger), t0 + Duration::from_millis(10));
        // A reading 8 ms in pushes it to 18 ms.
        assert_eq!(linger_close(until, t0 + Duration::from_millis(8), linger), t0 + Duration::from_millis(18));
        // Readings still coming near the end: never past the linger.
        assert_eq!(linger_close(until, t0 + Duration::from_millis(35), linger), until);
    }

    #[test]
    fn a_removed_reading_is_expired_when_older_than_max_age_else_evicted() {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1000);
        let max_age = Duration::from_secs(60);
        let at = |s: u64| SystemTime::UNIX_EPOCH + Duration::from_secs(s);
        assert_eq!(removal_reason(at(940), now, max_age), DropReason::max_age_expired);
        assert_eq!(removal_reason(at(941), now, max_age), DropReason::buffer_full_evicted);
        // A store time after the gateway's clock (a clock step) is not expired.
        assert_eq!(removal_reason(at(2000), now, max_age), DropReason::buffer_full_evicted);
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
        // The lane applies maxAge and the eviction itself (counting each reading).
        assert_eq!(s.max_age, Duration::ZERO);
        assert_eq!(b.max_age, Duration::from_secs(3600));
        assert_eq!(s.discard, DiscardPolicy::New);
        assert_eq!(s.retention, RetentionPolicy::Limits);
        assert_eq!(s.storage, StorageType::File);
        assert_eq!(b.redeliver_after, Duration::from_secs(2));
    }

    #[test]
    fn routes_follow_each_uplinks_device_list_and_namespace() {
        let cfg = GatewayConfig::from_yaml(
            r#"
apiVersion: fieldgate.io/v1alpha1
kind: GatewayConfig
devices:
- {name: a, connection: {coap: {}}, points: [{name: v, type: float64}]}
- {name: b, connection: {coap: {}}, points: [{name: v, type: float64}]}
- {namespace: other, name: a, connection: {coap: {}}, points: [{name: v, type: float64}]}
uplinks:
- {name: all, mqtt: {url: "mqtt://127.0.0.1:1883"}}
- {name: listed, devices: [b], mqtt: {url: "mqtt://127.0.0.1:1883"}}
- {name: none, devices: [], mqtt: {url: "mqtt://127.0.0.1:1883"}}
- {namespace: other, name: theirs, mqtt: {url: "mqtt://127.0.0.1:1883"}}
"#,
        )
        .unwrap();
        let routes = Routes::new(&cfg);
        assert_eq!(routes.targets("default", "a"), [0]);
        assert_eq!(routes.targets("default", "b"), [0, 1]);
        assert_eq!(routes.targets("other", "a"), [3]);
        assert!(routes.targets("default", "ghost").is_empty());
        for d in &cfg.devices {
            let selected: Vec<usize> =
                cfg.uplinks.iter().enumerate().filter(|(_, u)| u.selects(d)).map(|(i, _)| i).collect();
            assert_eq!(routes.targets(&d.namespace, &d.name), selected, "{}/{}", d.namespace, d.name);
        }
    }
}
