//! The reading envelope (`proto/fieldgate/v1/reading.proto`); how uplinks encode it: `crate::encoding`.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde_json::Value as Json;
use tokio::sync::mpsc;

/// Types generated from `proto/fieldgate/v1/reading.proto` (the `fieldgate-proto` crate).
pub use fieldgate_proto::v1 as pb;

pub use pb::point::Value;
pub use pb::{Point, Reading};

/// The deterministic id of a reading: the same device and scheduled poll instant always give
/// the same id, so a re-published reading is recognised as a duplicate by JetStream and by the
/// cloud.
pub fn message_id(namespace: &str, device: &str, scheduled_unix_ms: u64) -> String {
    format!("{namespace}/{device}/{scheduled_unix_ms}")
}

/// Nanoseconds since the Unix epoch of `t` (0 before 1970).
pub fn unix_nanos(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH).map(|d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)).unwrap_or(0)
}

/// How old a reading sampled at `time_unix_nano` is now.
pub fn age(time_unix_nano: u64) -> Duration {
    let now = unix_nanos(SystemTime::now());
    Duration::from_nanos(now.saturating_sub(time_unix_nano))
}

/// The protobuf form of a buffered reading with its `buffer_seq` set, without decoding it:
/// protobuf lets a later occurrence of a scalar field replace an earlier one, so the field is
/// appended to the stored bytes.
pub fn with_buffer_seq(stored: &[u8], buffer_seq: u64) -> Vec<u8> {
    let mut out = Vec::with_capacity(stored.len() + 11);
    out.extend_from_slice(stored);
    prost::encoding::uint64::encode(6, &buffer_seq, &mut out);
    out
}

/// The JSON form of a reading (`encoding: json`): the protobuf fields in camelCase, each point
/// as `{"name", "value", "unit"?}`.
pub fn to_json(r: &Reading) -> Json {
    crate::encoding::json::to_value(r, crate::encoding::json::Form::Full)
}

/// Where adapters hand their readings: the buffer writer's queue.
///
/// A bounded queue: when the buffer cannot keep up, adapters wait (a Modbus poll is late)
/// rather than readings piling up in memory.
#[derive(Clone, Debug)]
pub struct ReadingSink {
    tx: SinkTx,
}

#[derive(Clone, Debug)]
enum SinkTx {
    /// Readings only (tests and tools without a buffer): "accepted" once queued.
    Plain(mpsc::Sender<Reading>),
    /// The buffer writer's queue: readings with an optional acceptance notification.
    Buffered(mpsc::Sender<Submission>),
}

/// The buffer writer has stopped (the gateway is shutting down).
#[derive(Debug, thiserror::Error)]
#[error("the buffer writer has stopped")]
pub struct SinkClosed;

/// Resolves once the buffer accepted a reading in every uplink buffer it is routed to
/// (`Ok`), or with the reason of the first refusal. A dropped sender (the writer gave up at
/// shutdown) reads as `Err(RecvError)`: not accepted.
pub type Acceptance = tokio::sync::oneshot::Receiver<Result<(), crate::metrics::DropReason>>;

/// One reading in the buffer writer's queue. Dereferences to the reading.
#[derive(Debug)]
pub struct Submission {
    /// The reading.
    pub reading: Reading,
    /// Told by the writer once every route resolved; `None` when nobody waits.
    pub accepted: Option<tokio::sync::oneshot::Sender<Result<(), crate::metrics::DropReason>>>,
    /// Where the reading's trace continues (`None`: not sampled, or tracing off).
    pub trace: Option<crate::telemetry::TraceHandoff>,
}

impl std::ops::Deref for Submission {
    type Target = Reading;
    fn deref(&self) -> &Reading {
        &self.reading
    }
}

/// Whether a reading was accepted, and if not why.
pub type AcceptOutcome = Result<(), crate::metrics::DropReason>;

/// Collects the outcome of every route of one reading and tells the waiting adapter.
#[derive(Debug)]
pub struct AcceptanceTracker {
    /// Routes still unresolved, and the waiter.
    state: std::sync::Mutex<(usize, Option<tokio::sync::oneshot::Sender<AcceptOutcome>>)>,
}

impl AcceptanceTracker {
    /// Expects `routes` outcomes before telling the waiter (0 routes: call [`Self::resolve`] once).
    pub fn new(routes: usize, tx: tokio::sync::oneshot::Sender<AcceptOutcome>) -> Self {
        Self { state: std::sync::Mutex::new((routes.max(1), Some(tx))) }
    }

    /// Records one route's outcome. The first refusal is reported at once; success once all
    /// routes succeeded.
    pub fn resolve(&self, outcome: Result<(), crate::metrics::DropReason>) {
        let mut s = self.state.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        s.0 = s.0.saturating_sub(1);
        if (outcome.is_err() || s.0 == 0)
            && let Some(tx) = s.1.take()
        {
            let _ = tx.send(outcome);
        }
    }
}

impl ReadingSink {
    /// A sink and a receiving end of plain readings (tests, tools): a reading counts as
    /// accepted once it is queued.
    pub fn channel(capacity: usize) -> (Self, mpsc::Receiver<Reading>) {
        let (tx, rx) = mpsc::channel(capacity);
        (Self { tx: SinkTx::Plain(tx) }, rx)
    }

    /// A sink and the receiving end the buffer writer drains, with acceptance notifications.
    pub fn buffered(capacity: usize) -> (Self, mpsc::Receiver<Submission>) {
        let (tx, rx) = mpsc::channel(capacity);
        (Self { tx: SinkTx::Buffered(tx) }, rx)
    }

    /// Hands a reading to the buffer writer, waiting while its queue is full.
    pub async fn submit(&self, reading: Reading) -> Result<(), SinkClosed> {
        self.submit_traced(reading, None).await
    }

    /// [`ReadingSink::submit`] with the reading's trace context.
    pub async fn submit_traced(
        &self,
        reading: Reading,
        trace: Option<crate::telemetry::TraceHandoff>,
    ) -> Result<(), SinkClosed> {
        match &self.tx {
            SinkTx::Plain(tx) => tx.send(reading).await.map_err(|_| SinkClosed),
            SinkTx::Buffered(tx) => {
                tx.send(Submission { reading, accepted: None, trace }).await.map_err(|_| SinkClosed)
            }
        }
    }

    /// Hands a reading to the buffer writer and returns what resolves once JetStream accepted
    /// it (for adapters that acknowledge to the device only then: CoAP, MQTT, TCP).
    pub async fn submit_confirmed(&self, reading: Reading) -> Result<Acceptance, SinkClosed> {
        self.submit_confirmed_traced(reading, None).await
    }

    /// [`ReadingSink::submit_confirmed`] with the reading's trace context.
    pub async fn submit_confirmed_traced(
        &self,
        reading: Reading,
        trace: Option<crate::telemetry::TraceHandoff>,
    ) -> Result<Acceptance, SinkClosed> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        match &self.tx {
            SinkTx::Plain(plain) => {
                plain.send(reading).await.map_err(|_| SinkClosed)?;
                let _ = tx.send(Ok(()));
            }
            SinkTx::Buffered(buffered) => {
                let accepted = Some(tx);
                buffered.send(Submission { reading, accepted, trace }).await.map_err(|_| SinkClosed)?;
            }
        }
        Ok(rx)
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use prost::Message;

    /// A reading of three points (a unit, a bool, a full-range unsigned), for the codecs' tests.
    pub(crate) fn sample() -> Reading {
        Reading {
            id: message_id("default", "m1", 1_700_000_000_000),
            namespace: "default".into(),
            device: "m1".into(),
            node: String::new(),
            time_unix_nano: 1_700_000_000_000_000_123,
            buffer_seq: 7,
            points: vec![
                Point { name: "t".into(), value: Some(Value::DoubleValue(21.5)), unit: "Cel".into() },
                Point { name: "on".into(), value: Some(Value::BoolValue(true)), unit: String::new() },
                Point { name: "big".into(), value: Some(Value::UintValue(u64::MAX)), unit: String::new() },
            ],
        }
    }

    #[test]
    fn appending_the_buffer_seq_equals_setting_it() {
        let mut r = sample();
        r.buffer_seq = 0;
        let stored = r.encode_to_vec();
        let sent = with_buffer_seq(&stored, 42);
        r.buffer_seq = 42;
        assert_eq!(Reading::decode(sent.as_slice()).unwrap(), r);
    }
}
