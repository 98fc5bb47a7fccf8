//! The one state index of the uplinks and their buffers: what the buffer writer stored, what
//! the uplink delivered, what the gateway removed, and whether each side can reach what it
//! talks to. The writer and the uplinks update it as things happen; `/api/v1`, the status page,
//! `Uplink.status` and the buffer metrics read it. Nothing polls JetStream to fill it.
//!
//! # Exact accounting of the buffer
//!
//! An uplink's buffer is one JetStream stream of *entries* (one message holding up to 256
//! readings, numbered by `bufferSeq` without gaps). JetStream never removes an entry on its own:
//! the stream refuses a write when full (`discard: new`) and has no `max_age`. An entry leaves
//! the stream in exactly one of three ways, each counted where it happens:
//!
//! - the uplink acks it once each of its readings is settled (delivered, refused for good and
//!   counted `refused`, or undecodable and counted `undecodable`), and later releases it with
//!   every other entry up to its consumer's acknowledgement floor (one purge; the index
//!   forgets an entry at its ack);
//! - the writer removes it to make room (`onFull: dropOldest`) or because it is older than
//!   `maxAge`; it counts the entry's readings not settled yet, by this rule: **`max_age_expired`
//!   when the entry was older than `maxAge` at the moment the gateway removed it, otherwise
//!   `buffer_full_evicted`**;
//! - someone removes it by hand (a purge): not counted.
//!
//! An entry being delivered (its readings out to the cloud, unanswered) is never removed: the
//! writer takes the oldest entry *not* in flight (`claim`), and the uplink does not send an
//! entry the writer has claimed. So a reading counted as dropped never reaches the cloud from
//! this gateway, and a reading the cloud confirmed is never counted as dropped.
//!
//! What is exact: every count of dropped readings, and the backlog of entries stored by this
//! gateway run. What is not: the backlog of entries left by an earlier run, until the uplink or
//! the writer has seen each of them (the readings between the oldest and the newest entry
//! present at start, which over-counts entries acked out of order before the restart, at most
//! the in-flight window); the bytes of entries (JetStream's per-message overhead is estimated);
//! and a reading confirmed by the cloud in an earlier run whose entry was not acked before the
//! restart, which is sent again, or counted if its entry is then removed — or whose entry was
//! acked out of order, above the consumer's acknowledgement floor, and not released yet (at
//! most the in-flight window): counted if the writer removes that entry before the floor
//! passes it. The consumer keeps its acks in nats-server's memory, so after a restart of
//! nats-server *and* the gateway every entry acked and not released yet (at most the last
//! release interval) is in that case: sent again, or counted if the writer removes it first.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, SystemTime};

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::registry::Unit;
use tokio::sync::{Notify, watch};

use crate::metrics::{DeliveryLabels, DeliveryOutcome, DropLabels, DropReason, UplinkLabels};
use crate::ranges::RangeSet;

/// What an entry of the buffer is doing.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Phase {
    /// Stored, not being delivered.
    Waiting,
    /// Its readings are out to the cloud: never removed by the writer.
    InFlight,
    /// The writer is removing it: never sent.
    Claimed,
}

#[derive(Clone, Debug)]
struct Known {
    n: u64,
    unsettled: u64,
    bytes: u64,
    stored: SystemTime,
    phase: Phase,
}

/// Entries a gateway run found in the stream at start and has not seen yet.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Prior {
    /// How many.
    pub entries: u64,
    /// Their readings (from the oldest entry's first `bufferSeq` to the newest one's last).
    pub readings: u64,
    /// Their bytes.
    pub bytes: u64,
    /// When the oldest was stored.
    pub oldest: Option<SystemTime>,
    /// The stream sequence of the newest (entries after it were stored by this run).
    pub last_seq: u64,
}

#[derive(Debug, Default)]
struct Ledger {
    known: BTreeMap<u64, Known>,
    prior: Prior,
    /// Stream sequences removed by this run (acked, terminated or removed by the writer).
    removed: RangeSet,
    /// Sums over `known`.
    readings: u64,
    bytes: u64,
    in_flight: usize,
    next_seq: Option<u64>,
}

impl Ledger {
    fn insert(&mut self, seq: u64, k: Known) {
        self.readings += k.unsettled;
        self.bytes += k.bytes;
        if k.phase == Phase::InFlight {
            self.in_flight += 1;
        }
        if seq <= self.prior.last_seq && self.prior.entries > 0 {
            let p = &mut self.prior;
            p.entries -= 1;
            p.readings = p.readings.saturating_sub(k.n);
            p.bytes = p.bytes.saturating_sub(k.bytes);
            if p.entries == 0 {
                *p = Prior { last_seq: p.last_seq, ..Prior::default() };
            }
        }
        self.known.insert(seq, k);
    }

    fn remove(&mut self, seq: u64) -> Option<Known> {
        let k = self.known.remove(&seq)?;
        self.readings -= k.unsettled;
        self.bytes -= k.bytes;
        if k.phase == Phase::InFlight {
            self.in_flight -= 1;
        }
        self.removed.insert(seq, seq + 1);
        Some(k)
    }

    fn set_phase(&mut self, seq: u64, phase: Phase) {
        if let Some(k) = self.known.get_mut(&seq) {
            match (k.phase == Phase::InFlight, phase == Phase::InFlight) {
                (false, true) => self.in_flight += 1,
                (true, false) => self.in_flight -= 1,
                _ => {}
            }
            k.phase = phase;
        }
    }
}

/// An entry the uplink was handed: its stream sequence, readings, size and store time.
#[derive(Clone, Copy, Debug)]
pub struct EntryFacts {
    /// Stream sequence.
    pub seq: u64,
    /// Readings it holds.
    pub n: u64,
    /// Its size.
    pub bytes: u64,
    /// When JetStream stored it.
    pub stored: SystemTime,
}

/// May the uplink deliver an entry?
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Begin {
    /// Yes: it is in flight now.
    Deliver,
    /// It left the buffer (settled before, or removed and counted by the writer): ack this copy,
    /// send nothing.
    Gone,
    /// The writer is removing it: send nothing, leave it (if the removal fails, JetStream
    /// delivers it again).
    Claimed,
}

/// Can the writer remove an entry?
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Claim {
    /// Yes, now claimed: its readings not settled yet and when it was stored.
    Claimed {
        /// Readings to count when it is removed.
        unsettled: u64,
        /// When it was stored.
        stored: SystemTime,
    },
    /// It is in flight (or claimed already): leave it.
    Busy,
    /// It left the buffer.
    Gone,
    /// The index does not know it (an entry of an earlier run the writer must read first).
    Unknown,
}

/// The buffer status of one uplink at one instant.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct BufferSnapshot {
    /// Readings buffered and not settled.
    pub backlog: u64,
    /// Bytes buffered (estimated).
    pub bytes: u64,
    /// Age of the oldest buffered entry.
    pub oldest_unsent_age: Duration,
    /// `bufferSeq` of the last reading stored (0: none yet).
    pub last_seq: u64,
    /// Whether the stream answered the last operation on it (`None`: none yet).
    pub reachable: Option<bool>,
    /// Whether the uplink's link to the cloud is up.
    pub connected: bool,
}

/// The uplink's counters (shared with the metrics: the same atomics).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct UplinkCounts {
    /// Readings JetStream accepted.
    pub accepted: u64,
    /// Readings the cloud confirmed.
    pub delivered: u64,
    /// Entries delivered more than once.
    pub redeliveries: u64,
    /// Readings dropped, by reason (only reasons that happened).
    pub dropped: BTreeMap<&'static str, u64>,
}

/// The state of one uplink and its buffer.
#[derive(Debug)]
pub struct UplinkState {
    name: String,
    ledger: Mutex<Ledger>,
    connected: AtomicBool,
    /// 0: not known yet, 1: reachable, 2: not.
    reachable: AtomicU8,
    restored: watch::Sender<bool>,
    /// Readings JetStream accepted.
    pub accepted: Counter,
    /// Readings the cloud confirmed.
    pub delivered: Counter,
    /// Entries delivered more than once.
    pub redeliveries: Counter,
    dropped: Family<DropLabels, Counter>,
    /// Entries settled by the uplink (acked or terminated) in this run: the uplink releases
    /// their space once some have ([`crate::buffer::release_settled`]).
    settled_entries: std::sync::atomic::AtomicU64,
    /// The highest stream sequence settled in this run.
    max_settled: std::sync::atomic::AtomicU64,
    /// What the buffer's sequence record says now ([`RecordMark`]).
    record: watch::Sender<RecordMark>,
    /// Asks the lane's recorder to write the record now.
    record_wanted: Notify,
}

/// Where the buffer's written sequence record stands: the stream sequence it describes (0:
/// none written in this run) and how many times the recorder answered so far.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RecordMark {
    /// The stream sequence of the entry the written record describes.
    pub through: u64,
    /// Answers given (a flush waits for the next one).
    pub answers: u64,
    /// Whether the lane's recorder runs (a flush without it returns at once).
    pub recording: bool,
}

/// Marks the lane's recorder as running until dropped ([`UplinkState::recorder_started`]).
#[derive(Debug)]
pub struct RecorderRunning(Arc<UplinkState>);

impl Drop for RecorderRunning {
    fn drop(&mut self) {
        self.0.record.send_modify(|m| {
            m.recording = false;
            m.answers += 1;
        });
    }
}

impl UplinkState {
    fn ledger(&self) -> std::sync::MutexGuard<'_, Ledger> {
        self.ledger.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// `namespace/name` of the uplink.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Counts `n` dropped readings.
    pub fn dropped(&self, reason: DropReason, n: u64) {
        if n > 0 {
            self.dropped.get_or_create(&DropLabels { uplink: self.name.clone(), reason }).inc_by(n);
        }
    }

    /// The writer found where the buffer continues: `next_seq` is the next `bufferSeq` and
    /// `prior` the entries already in the stream. Uplinks deliver only after this.
    pub fn restored(&self, next_seq: u64, prior: Prior) {
        let mut l = self.ledger();
        // Entries an uplink already registered are not prior ones any more.
        let (mut p, mut seen) = (prior, 0u64);
        for k in l.known.range(..=p.last_seq).map(|(_, k)| k) {
            seen += 1;
            p.readings = p.readings.saturating_sub(k.n);
            p.bytes = p.bytes.saturating_sub(k.bytes);
        }
        p.entries = p.entries.saturating_sub(seen);
        if p.entries == 0 {
            p = Prior { last_seq: p.last_seq, ..Prior::default() };
        }
        l.prior = p;
        l.next_seq = Some(next_seq);
        drop(l);
        self.restored.send_replace(true);
    }

    /// Whether the writer has restored the buffer (uplinks wait for it).
    pub fn is_restored(&self) -> bool {
        *self.restored.borrow()
    }

    /// Resolves once the writer has restored the buffer.
    pub async fn wait_restored(&self) {
        let mut rx = self.restored.subscribe();
        let _ = rx.wait_for(|r| *r).await;
    }

    /// The writer stored an entry of `n` readings (the first numbered `first`).
    pub fn stored(&self, seq: u64, first: u64, n: u64, bytes: u64, at: SystemTime) {
        let mut l = self.ledger();
        l.next_seq = Some(first + n);
        if l.removed.contains(seq) || l.known.contains_key(&seq) {
            // The uplink got (and maybe settled) it before the writer heard its PubAck.
            return;
        }
        l.insert(seq, Known { n, unsettled: n, bytes, stored: at, phase: Phase::Waiting });
    }

    /// The uplink was handed an entry: may it send it?
    pub fn begin(&self, e: EntryFacts) -> Begin {
        let mut l = self.ledger();
        if l.removed.contains(e.seq) {
            return Begin::Gone;
        }
        match l.known.get(&e.seq).map(|k| k.phase) {
            Some(Phase::Claimed) => Begin::Claimed,
            Some(_) => {
                l.set_phase(e.seq, Phase::InFlight);
                Begin::Deliver
            }
            None => {
                let k = Known { n: e.n, unsettled: e.n, bytes: e.bytes, stored: e.stored, phase: Phase::InFlight };
                l.insert(e.seq, k);
                Begin::Deliver
            }
        }
    }

    /// The uplink gave an entry back with `unsettled` readings still to deliver.
    pub fn given_back(&self, seq: u64, unsettled: u64) {
        let mut l = self.ledger();
        if let Some(k) = l.known.get_mut(&seq) {
            let before = k.unsettled;
            k.unsettled = unsettled.min(k.n);
            let after = k.unsettled;
            l.readings = l.readings - before + after;
            l.set_phase(seq, Phase::Waiting);
        }
    }

    /// The uplink acked or terminated an entry: it left the buffer.
    pub fn settled(&self, seq: u64) {
        let mut l = self.ledger();
        if l.remove(seq).is_none() {
            l.removed.insert(seq, seq + 1);
        }
        self.settled_entries.fetch_add(1, Ordering::Relaxed);
        self.max_settled.fetch_max(seq, Ordering::Relaxed);
    }

    /// The highest stream sequence settled in this run (0: none): a release that left the
    /// acknowledgement floor below it has more to release later.
    pub fn max_settled(&self) -> u64 {
        self.max_settled.load(Ordering::Relaxed)
    }

    /// Entries settled so far in this run.
    pub fn settled_entries(&self) -> u64 {
        self.settled_entries.load(Ordering::Relaxed)
    }

    /// Has the lane's recorder write the buffer's sequence record of the last stored entry
    /// (waiting up to `within` for its answer); returns the stream sequence the written record
    /// describes. Entries up to it may be released: were the stream left empty, the record
    /// says exactly where `bufferSeq` continues.
    pub async fn flush_record(&self, within: Duration) -> u64 {
        let mut rx = self.record.subscribe();
        let (asked, recording) = {
            let m = rx.borrow_and_update();
            (m.answers, m.recording)
        };
        if !recording {
            return rx.borrow().through;
        }
        self.record_wanted.notify_one();
        let _ = tokio::time::timeout(within, rx.wait_for(|m| m.answers > asked)).await;
        rx.borrow().through
    }

    /// The lane's recorder runs until the returned guard is dropped.
    pub fn recorder_started(self: &Arc<Self>) -> RecorderRunning {
        self.record.send_modify(|m| m.recording = true);
        RecorderRunning(Arc::clone(self))
    }

    /// Waits until someone wants the sequence record written ([`Self::flush_record`]).
    pub async fn record_wanted(&self) {
        self.record_wanted.notified().await;
    }

    /// The recorder's answer: the record now describes `through` (`None`: unchanged).
    pub fn recorded(&self, through: Option<u64>) {
        self.record.send_modify(|m| {
            if let Some(t) = through {
                m.through = t;
            }
            m.answers += 1;
        });
    }

    /// The writer wants to remove an entry.
    pub fn claim(&self, seq: u64) -> Claim {
        let mut l = self.ledger();
        if l.removed.contains(seq) {
            return Claim::Gone;
        }
        let Some(k) = l.known.get(&seq) else { return Claim::Unknown };
        if k.phase != Phase::Waiting {
            return Claim::Busy;
        }
        let (unsettled, stored) = (k.unsettled, k.stored);
        l.set_phase(seq, Phase::Claimed);
        Claim::Claimed { unsettled, stored }
    }

    /// The writer read an entry of an earlier run from the stream.
    pub fn found(&self, seq: u64, n: u64, bytes: u64, stored: SystemTime) {
        let mut l = self.ledger();
        if !l.removed.contains(seq) && !l.known.contains_key(&seq) {
            l.insert(seq, Known { n, unsettled: n, bytes, stored, phase: Phase::Waiting });
        }
    }

    /// The writer could not remove a claimed entry: it waits again.
    pub fn unclaim(&self, seq: u64) {
        let mut l = self.ledger();
        if l.known.get(&seq).is_some_and(|k| k.phase == Phase::Claimed) {
            l.set_phase(seq, Phase::Waiting);
        }
    }

    /// The writer removed a claimed entry.
    pub fn removed(&self, seq: u64) {
        self.ledger().remove(seq);
    }

    /// Entries of an earlier run the index has not seen, and the newest one's stream sequence.
    pub fn prior(&self) -> Prior {
        self.ledger().prior.clone()
    }

    /// The writer looked at every stream sequence up to the prior entries' last: none is left
    /// unseen.
    pub fn prior_seen(&self) {
        let mut l = self.ledger();
        l.prior = Prior { last_seq: l.prior.last_seq, ..Prior::default() };
    }

    /// The oldest known entry no one is delivering or removing: stream sequence and store time.
    pub fn oldest_waiting(&self) -> Option<(u64, SystemTime)> {
        self.ledger().known.iter().find(|(_, k)| k.phase == Phase::Waiting).map(|(s, k)| (*s, k.stored))
    }

    /// Whether an entry is in flight.
    pub fn any_in_flight(&self) -> bool {
        self.ledger().in_flight > 0
    }

    /// Whether the stream sequence `seq` is known to have left the buffer.
    pub fn is_removed(&self, seq: u64) -> bool {
        self.ledger().removed.contains(seq)
    }

    /// Whether the index knows the entry at `seq`, and its phase.
    pub fn phase(&self, seq: u64) -> Option<Phase> {
        self.ledger().known.get(&seq).map(|k| k.phase)
    }

    /// When the oldest buffered entry was stored.
    pub fn oldest_stored(&self) -> Option<SystemTime> {
        let l = self.ledger();
        let known = l.known.values().next().map(|k| k.stored);
        let prior = l.prior.oldest.filter(|_| l.prior.entries > 0);
        match (known, prior) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    /// Sets whether the uplink's link to the cloud is up.
    pub fn set_connected(&self, up: bool) {
        self.connected.store(up, Ordering::Relaxed);
    }

    /// Sets whether the stream answered the last operation on it.
    pub fn set_reachable(&self, up: bool) {
        self.reachable.store(if up { 1 } else { 2 }, Ordering::Relaxed);
    }

    /// The buffer status now.
    pub fn snapshot(&self) -> BufferSnapshot {
        let l = self.ledger();
        let oldest = {
            let known = l.known.values().next().map(|k| k.stored);
            let prior = l.prior.oldest.filter(|_| l.prior.entries > 0);
            match (known, prior) {
                (Some(a), Some(b)) => Some(a.min(b)),
                (a, b) => a.or(b),
            }
        };
        BufferSnapshot {
            backlog: l.readings + l.prior.readings,
            bytes: l.bytes + l.prior.bytes,
            oldest_unsent_age: oldest.and_then(|t| t.elapsed().ok()).unwrap_or_default(),
            last_seq: l.next_seq.map_or(0, |n| n.saturating_sub(1)),
            reachable: match self.reachable.load(Ordering::Relaxed) {
                0 => None,
                r => Some(r == 1),
            },
            connected: self.connected.load(Ordering::Relaxed),
        }
    }

    /// The uplink's counters now.
    pub fn counts(&self) -> UplinkCounts {
        let dropped = DropReason::ALL
            .into_iter()
            .filter_map(|reason| {
                let n = self.dropped.get(&DropLabels { uplink: self.name.clone(), reason })?.get();
                (n > 0).then_some((reason.as_str(), n))
            })
            .collect();
        UplinkCounts {
            accepted: self.accepted.get(),
            delivered: self.delivered.get(),
            redeliveries: self.redeliveries.get(),
            dropped,
        }
    }
}

/// Every uplink's state, by `namespace/name`.
#[derive(Clone, Debug)]
pub struct StateIndex {
    uplinks: Arc<Mutex<BTreeMap<String, Arc<UplinkState>>>>,
    accepted: Family<UplinkLabels, Counter>,
    deliveries: Family<DeliveryLabels, Counter>,
    redeliveries: Family<UplinkLabels, Counter>,
    dropped: Family<DropLabels, Counter>,
}

impl StateIndex {
    /// An empty index whose counters are these metric families' series.
    pub fn new(
        accepted: Family<UplinkLabels, Counter>,
        deliveries: Family<DeliveryLabels, Counter>,
        redeliveries: Family<UplinkLabels, Counter>,
        dropped: Family<DropLabels, Counter>,
    ) -> Self {
        Self { uplinks: Arc::default(), accepted, deliveries, redeliveries, dropped }
    }

    /// The state of uplink `name` (`namespace/name`), created empty on first use.
    pub fn uplink(&self, name: &str) -> Arc<UplinkState> {
        let mut map = self.uplinks.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(s) = map.get(name) {
            return Arc::clone(s);
        }
        let labels = UplinkLabels { uplink: name.to_string() };
        let s = Arc::new(UplinkState {
            name: name.to_string(),
            ledger: Mutex::default(),
            connected: AtomicBool::new(false),
            reachable: AtomicU8::new(0),
            restored: watch::channel(false).0,
            accepted: self.accepted.get_or_create(&labels).clone(),
            delivered: self
                .deliveries
                .get_or_create(&DeliveryLabels { uplink: name.to_string(), outcome: DeliveryOutcome::acked })
                .clone(),
            redeliveries: self.redeliveries.get_or_create(&labels).clone(),
            dropped: self.dropped.clone(),
            settled_entries: std::sync::atomic::AtomicU64::new(0),
            max_settled: std::sync::atomic::AtomicU64::new(0),
            record: watch::channel(RecordMark::default()).0,
            record_wanted: Notify::new(),
        });
        map.insert(name.to_string(), Arc::clone(&s));
        s
    }

    /// The state of uplink `name`, if it ever ran.
    pub fn get(&self, name: &str) -> Option<Arc<UplinkState>> {
        self.uplinks.lock().unwrap_or_else(PoisonError::into_inner).get(name).cloned()
    }

    fn all(&self) -> Vec<Arc<UplinkState>> {
        self.uplinks.lock().unwrap_or_else(PoisonError::into_inner).values().cloned().collect()
    }
}

/// Exports the buffer gauges from the index at each scrape.
impl Collector for StateIndex {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let uplinks: Vec<(UplinkLabels, BufferSnapshot)> =
            self.all().iter().map(|u| (UplinkLabels { uplink: u.name.clone() }, u.snapshot())).collect();
        type Value = fn(&BufferSnapshot) -> Option<f64>;
        let gauges: [(&str, &str, Option<Unit>, Value); 6] = [
            ("buffer_messages", "Readings buffered and not yet settled by the cloud", None, |s| Some(s.backlog as f64)),
            ("buffer", "Bytes held in the uplink buffer (estimated)", Some(Unit::Bytes), |s| Some(s.bytes as f64)),
            (
                "buffer_oldest_unsent_age",
                "Age of the oldest reading not yet settled by the cloud",
                Some(Unit::Seconds),
                |s| Some(s.oldest_unsent_age.as_secs_f64()),
            ),
            ("buffer_last_seq", "bufferSeq of the last reading stored in the uplink buffer", None, |s| {
                Some(s.last_seq as f64)
            }),
            ("buffer_reachable", "Whether the uplink's JetStream stream answered the last operation", None, |s| {
                s.reachable.map(|r| f64::from(u8::from(r)))
            }),
            ("uplink_connected", "Whether the uplink's link to the cloud is up", None, |s| {
                Some(f64::from(u8::from(s.connected)))
            }),
        ];
        for (name, help, unit, value) in gauges {
            let mut family =
                encoder.encode_descriptor(name, help, unit.as_ref(), prometheus_client::metrics::MetricType::Gauge)?;
            for (labels, s) in &uplinks {
                if let Some(v) = value(s) {
                    let g = ConstGauge::new(v);
                    g.encode(family.encode_family(labels)?)?;
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use prometheus_client::registry::Registry;

    fn state() -> (Arc<UplinkState>, crate::metrics::Metrics) {
        let metrics = crate::metrics::Metrics::new(&mut Registry::default());
        (metrics.state.uplink("default/cloud"), metrics)
    }

    fn at(s: u64) -> SystemTime {
        SystemTime::UNIX_EPOCH + Duration::from_secs(s)
    }

    fn facts(seq: u64, n: u64) -> EntryFacts {
        EntryFacts { seq, n, bytes: 100, stored: at(seq) }
    }

    #[test]
    fn an_entry_in_flight_is_never_claimed_and_a_claimed_one_is_never_sent() {
        let (s, _m) = state();
        s.restored(1, Prior::default());
        s.stored(1, 1, 3, 100, at(1));
        s.stored(2, 4, 2, 100, at(2));
        assert_eq!(s.begin(facts(1, 3)), Begin::Deliver);
        assert_eq!(s.claim(1), Claim::Busy);
        // The writer takes the oldest entry not in flight.
        assert_eq!(s.oldest_waiting(), Some((2, at(2))));
        assert_eq!(s.claim(2), Claim::Claimed { unsettled: 2, stored: at(2) });
        assert_eq!(s.begin(facts(2, 2)), Begin::Claimed);
        s.removed(2);
        assert_eq!(s.begin(facts(2, 2)), Begin::Gone);
        assert_eq!(s.claim(2), Claim::Gone);
        // Given back with one reading confirmed: two are left to count if it is removed.
        s.given_back(1, 2);
        assert_eq!(s.claim(1), Claim::Claimed { unsettled: 2, stored: at(1) });
        s.unclaim(1);
        assert_eq!(s.begin(facts(1, 3)), Begin::Deliver);
        s.settled(1);
        assert_eq!(s.snapshot().backlog, 0);
        assert_eq!(s.snapshot().last_seq, 5);
    }

    #[test]
    fn the_backlog_counts_unsettled_readings_of_known_and_prior_entries() {
        let (s, _m) = state();
        // Two entries (10 readings, 1000 bytes) from an earlier run, up to stream sequence 7.
        s.restored(31, Prior { entries: 2, readings: 10, bytes: 1000, oldest: Some(at(3)), last_seq: 7 });
        s.stored(8, 31, 4, 50, at(20));
        let snap = s.snapshot();
        assert_eq!((snap.backlog, snap.bytes, snap.last_seq), (14, 1050, 34));
        assert_eq!(s.oldest_stored(), Some(at(3)));
        // The uplink sees one prior entry: it moves from the prior aggregate to the known ones.
        assert_eq!(s.begin(EntryFacts { seq: 6, n: 6, bytes: 600, stored: at(3) }), Begin::Deliver);
        assert_eq!(s.prior().entries, 1);
        assert!(s.any_in_flight());
        s.settled(6);
        assert_eq!(s.snapshot().backlog, 8);
        // The writer finds the other one.
        s.found(7, 4, 400, at(5));
        assert_eq!(s.prior(), Prior { last_seq: 7, ..Prior::default() });
        assert_eq!(s.snapshot().backlog, 8);
        assert_eq!(s.oldest_stored(), Some(at(5)));
        assert_eq!(s.claim(7), Claim::Claimed { unsettled: 4, stored: at(5) });
        s.removed(7);
        assert_eq!(s.snapshot().backlog, 4);
        assert!(s.is_removed(7) && s.is_removed(6) && !s.is_removed(8));
    }

    #[test]
    fn an_entry_the_uplink_saw_before_the_pub_ack_is_not_counted_twice() {
        let (s, _m) = state();
        s.restored(1, Prior::default());
        assert_eq!(s.begin(facts(1, 2)), Begin::Deliver);
        s.settled(1);
        s.stored(1, 1, 2, 100, at(1));
        assert_eq!(s.snapshot().backlog, 0);
        assert_eq!(s.snapshot().last_seq, 2);
    }

    #[test]
    fn the_gauges_come_from_the_index() {
        let mut registry = Registry::default();
        let metrics = crate::metrics::Metrics::new(&mut registry);
        let s = metrics.state.uplink("default/cloud");
        s.restored(1, Prior::default());
        s.stored(1, 1, 3, 100, SystemTime::now());
        s.set_connected(true);
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &registry).unwrap();
        assert!(text.contains("fieldgate_buffer_messages{uplink=\"default/cloud\"} 3"), "{text}");
        assert!(text.contains("fieldgate_uplink_connected{uplink=\"default/cloud\"} 1"), "{text}");
        assert!(text.contains("fieldgate_buffer_last_seq{uplink=\"default/cloud\"} 3"), "{text}");
        assert!(!text.contains("fieldgate_buffer_reachable{"), "unknown reachability is not exported: {text}");
    }
}
