//! The delivery core of the uplink driver: which readings of the buffered entries go out, and
//! what each link outcome does to the entries — with no JetStream and no broker in it, so it
//! is tested against a fake consumer and a fake link.
//!
//! The unit of retry, refusal and counting is one reading, although the buffer stores readings
//! in entries (one JetStream message for up to 256 of them, for one fsync per entry):
//!
//! - an entry is acked once each of its readings is *settled*: confirmed by the cloud, refused
//!   for good (terminated and counted), or undecodable (counted);
//! - a reading refused for a transient reason makes its entry come back after a delay that
//!   doubles with each delivery of the entry (capped); a lost link gives every unanswered entry
//!   back at once;
//! - an entry that comes back (redelivered by JetStream) sends only its readings not settled
//!   yet: nothing the cloud confirmed is sent again by this process.

use std::collections::HashMap;
use std::future::Future;
use std::time::Duration;

use super::link::{Delivery, FRAMING_BYTES, Link, LinkEvent, Outgoing, Token};

/// What becomes of a buffered entry.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Settle {
    /// Every reading settled: it leaves the buffer.
    Ack,
    /// Some reading must go again: JetStream delivers the entry again after `delay`;
    /// `unsettled` of its readings are still to be delivered.
    Nak {
        /// When JetStream delivers it again (`None`: at once).
        delay: Option<Duration>,
        /// Its readings not settled yet.
        unsettled: usize,
    },
    /// Every reading was refused for good: it leaves the buffer, never delivered again.
    Term,
}

/// One buffered entry as delivered by the consumer (a JetStream message; a fake in tests).
pub trait Entry: Send + 'static {
    /// Its stream sequence: its identity in the buffer.
    fn seq(&self) -> u64;
    /// How often the consumer delivered it (1 the first time).
    fn deliveries(&self) -> i64;
    /// Acks, naks or terminates it.
    fn settle(self, how: Settle) -> impl Future<Output = ()> + Send;
}

/// One reading of an entry, ready to go.
#[derive(Debug)]
pub struct Ready<T> {
    /// Its place in the entry.
    pub index: usize,
    /// Where and what it sends.
    pub outgoing: Outgoing,
    /// The caller's own data about it (timings, trace span), handed back with its outcome.
    pub tag: T,
}

/// What happened to one reading sent out.
#[derive(Debug, PartialEq, Eq)]
pub enum Outcome<T> {
    /// The cloud has it.
    Confirmed(T),
    /// The cloud refused it: terminated and to be counted when `permanent`, else sent again
    /// after a backoff.
    Refused {
        /// The reading.
        tag: T,
        /// The cloud's reason.
        reason: String,
        /// Terminated for good.
        permanent: bool,
    },
    /// Its link went away (or would not take it) before an answer: sent again.
    Interrupted(T),
}

/// The delays of an entry whose reading was refused for a transient reason: `base` doubled
/// for each earlier delivery of the entry, at most `cap`.
#[derive(Clone, Copy, Debug)]
pub struct RetryDelays {
    /// Delay after the first delivery.
    pub base: Duration,
    /// Longest delay.
    pub cap: Duration,
}

impl Default for RetryDelays {
    fn default() -> Self {
        Self { base: Duration::from_secs(1), cap: Duration::from_secs(60) }
    }
}

impl RetryDelays {
    /// The delay before delivery `deliveries + 1`.
    pub fn after(&self, deliveries: i64) -> Duration {
        let doublings = u32::try_from(deliveries.saturating_sub(1).clamp(0, 30)).unwrap_or(30);
        self.base.saturating_mul(1u32 << doublings).min(self.cap)
    }
}

struct Pending<E> {
    entry: E,
    settled: Vec<bool>,
    /// Readings sent and not answered yet.
    unanswered: usize,
    /// A reading was refused for a transient reason or could not be sent: it goes again.
    again: bool,
    /// A reading was confirmed in this delivery.
    confirmed: bool,
    /// A reading was refused for good in this delivery.
    terminated: bool,
    /// The longest `Retry-After` the cloud asked for in this delivery.
    retry_after: Option<Duration>,
}

/// The longest `Retry-After` honoured (a longer one is cut to this).
pub const MAX_RETRY_AFTER: Duration = Duration::from_secs(15 * 60);

/// The most entries whose settled readings are remembered while they wait to come back.
const REMEMBERED: usize = 65_536;

/// The entries being delivered and the readings in flight.
pub struct Core<E, T> {
    pending: HashMap<u64, Pending<E>>,
    in_flight: HashMap<Token, Vec<(u64, usize, T)>>,
    readings_in_flight: usize,
    /// Settled readings of entries given back to the buffer, by stream sequence.
    remembered: HashMap<u64, Vec<bool>>,
    delays: RetryDelays,
}

impl<E: Entry, T> Core<E, T> {
    /// An empty core.
    pub fn new(delays: RetryDelays) -> Self {
        Self {
            pending: HashMap::new(),
            in_flight: HashMap::new(),
            readings_in_flight: 0,
            remembered: HashMap::new(),
            delays,
        }
    }

    /// Readings sent and not answered.
    pub fn in_flight(&self) -> usize {
        self.readings_in_flight
    }

    /// Whether reading `index` of the entry at stream sequence `seq` was settled by an earlier
    /// delivery of it (so it is not sent again).
    pub fn is_settled(&self, seq: u64, index: usize) -> bool {
        self.remembered.get(&seq).is_some_and(|s| s.get(index).copied().unwrap_or(false))
    }

    /// Takes a delivered entry of `n` readings: sends `ready` on `link`, counts `settled_now`
    /// (undecodable) as settled, and settles the entry at once when nothing is left to send.
    /// Readings [`Core::is_settled`] says are settled must not be in `ready`.
    pub async fn admit<L: Link>(
        &mut self,
        link: &mut L,
        entry: E,
        n: usize,
        ready: Vec<Ready<T>>,
        settled_now: &[usize],
    ) -> Vec<Outcome<T>> {
        let seq = entry.seq();
        let mut settled = self.remembered.remove(&seq).unwrap_or_default();
        settled.resize(n, false);
        for &i in settled_now {
            if let Some(s) = settled.get_mut(i) {
                *s = true;
            }
        }
        let mut p = Pending {
            entry,
            settled,
            unanswered: 0,
            again: false,
            confirmed: false,
            terminated: false,
            retry_after: None,
        };
        let mut outcomes = Vec::new();
        let (per, max_bytes) = (link.max_readings().max(1), link.max_bytes());
        let mut ready = ready.into_iter().peekable();
        while ready.peek().is_some() {
            // As many readings as the link takes in one delivery, by count and by size.
            let mut group: Vec<Ready<T>> = Vec::new();
            let mut bytes = 0usize;
            while let Some(r) = ready.peek() {
                let size = r.outgoing.message.payload.len() + FRAMING_BYTES;
                if group.len() >= per || (!group.is_empty() && bytes.saturating_add(size) > max_bytes) {
                    break;
                }
                bytes = bytes.saturating_add(size);
                group.extend(ready.next());
            }
            if p.again {
                // The link would not take the previous group: the rest goes with the entry.
                outcomes.extend(group.into_iter().map(|r| Outcome::Interrupted(r.tag)));
                continue;
            }
            let delivery = Delivery { readings: group.iter().map(|r| r.outgoing.clone()).collect() };
            match link.send(delivery) {
                Ok(token) => {
                    p.unanswered += group.len();
                    self.readings_in_flight += group.len();
                    self.in_flight.insert(token, group.into_iter().map(|r| (seq, r.index, r.tag)).collect());
                }
                Err(_) => {
                    p.again = true;
                    outcomes.extend(group.into_iter().map(|r| Outcome::Interrupted(r.tag)));
                }
            }
        }
        if p.unanswered == 0 {
            self.finish(p).await;
        } else {
            self.pending.insert(seq, p);
        }
        outcomes
    }

    /// Applies a link event. `Lost` gives every unanswered entry back.
    pub async fn on_event(&mut self, event: LinkEvent) -> Vec<Outcome<T>> {
        match event {
            LinkEvent::Connected => Vec::new(),
            LinkEvent::Lost { .. } => self.release_all().await,
            LinkEvent::Confirmed(token) => self.answered(token, None).await,
            LinkEvent::Refused { token, reason, permanent, retry_after } => {
                self.answered(token, Some((reason, permanent, retry_after))).await
            }
        }
    }

    async fn answered(&mut self, token: Token, refusal: Option<(String, bool, Option<Duration>)>) -> Vec<Outcome<T>> {
        let Some(parts) = self.in_flight.remove(&token) else { return Vec::new() };
        self.readings_in_flight = self.readings_in_flight.saturating_sub(parts.len());
        let mut outcomes = Vec::with_capacity(parts.len());
        let mut done = Vec::new();
        for (seq, index, tag) in parts {
            let Some(p) = self.pending.get_mut(&seq) else { continue };
            p.unanswered = p.unanswered.saturating_sub(1);
            match &refusal {
                None => {
                    p.confirmed = true;
                    if let Some(s) = p.settled.get_mut(index) {
                        *s = true;
                    }
                    outcomes.push(Outcome::Confirmed(tag));
                }
                Some((reason, permanent, retry_after)) => {
                    if *permanent {
                        p.terminated = true;
                        if let Some(s) = p.settled.get_mut(index) {
                            *s = true;
                        }
                    } else {
                        p.again = true;
                        p.retry_after = p.retry_after.max(*retry_after);
                    }
                    outcomes.push(Outcome::Refused { tag, reason: reason.clone(), permanent: *permanent });
                }
            }
            if p.unanswered == 0 {
                done.push(seq);
            }
        }
        for seq in done {
            if let Some(p) = self.pending.remove(&seq) {
                self.finish(p).await;
            }
        }
        outcomes
    }

    /// Every reading of `p` answered: ack, terminate, or give it back for what must go again.
    async fn finish(&mut self, p: Pending<E>) {
        if p.settled.iter().all(|s| *s) {
            // Nothing of it is sent again either way; terminated when this delivery only
            // refused readings for good.
            let how = if p.terminated && !p.confirmed { Settle::Term } else { Settle::Ack };
            p.entry.settle(how).await;
            return;
        }
        // The growing delay, or longer when the cloud asked for it (bounded).
        let delay = p.again.then(|| {
            let asked = p.retry_after.unwrap_or_default().min(MAX_RETRY_AFTER);
            self.delays.after(p.entry.deliveries()).max(asked)
        });
        self.give_back(p, delay).await;
    }

    async fn give_back(&mut self, p: Pending<E>, delay: Option<Duration>) {
        let seq = p.entry.seq();
        let unsettled = p.settled.iter().filter(|s| !**s).count();
        if p.settled.iter().any(|s| *s) {
            if self.remembered.len() >= REMEMBERED
                && let Some(oldest) = self.remembered.keys().min().copied()
            {
                self.remembered.remove(&oldest);
            }
            self.remembered.insert(seq, p.settled);
        }
        p.entry.settle(Settle::Nak { delay, unsettled }).await;
    }

    /// Gives every entry with unanswered readings back for immediate redelivery (the link is
    /// gone); returns the readings that were in flight.
    pub async fn release_all(&mut self) -> Vec<Outcome<T>> {
        let outcomes =
            self.in_flight.drain().flat_map(|(_, parts)| parts).map(|(_, _, tag)| Outcome::Interrupted(tag)).collect();
        self.readings_in_flight = 0;
        let pending: Vec<Pending<E>> = self.pending.drain().map(|(_, p)| p).collect();
        for p in pending {
            self.give_back(p, None).await;
        }
        outcomes
    }

    /// Forgets remembered entries below stream sequence `first` (they left the buffer).
    pub fn forget_below(&mut self, first: u64) {
        self.remembered.retain(|seq, _| *seq >= first);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};

    use crate::uplinks::UplinkError;

    /// The fake consumer's log: (stream sequence, how it was settled).
    type Log = Arc<Mutex<Vec<(u64, Settle)>>>;

    struct FakeEntry {
        seq: u64,
        deliveries: i64,
        log: Log,
    }

    impl Entry for FakeEntry {
        fn seq(&self) -> u64 {
            self.seq
        }
        fn deliveries(&self) -> i64 {
            self.deliveries
        }
        async fn settle(self, how: Settle) {
            self.log.lock().unwrap().push((self.seq, how));
        }
    }

    /// A fake consumer: hands out entries of `n` readings, counts their deliveries.
    struct FakeConsumer {
        log: Log,
        deliveries: HashMap<u64, i64>,
    }

    impl FakeConsumer {
        fn new() -> Self {
            Self { log: Log::default(), deliveries: HashMap::new() }
        }
        fn deliver(&mut self, seq: u64) -> FakeEntry {
            let d = self.deliveries.entry(seq).or_default();
            *d += 1;
            FakeEntry { seq, deliveries: *d, log: Arc::clone(&self.log) }
        }
        fn settled(&self) -> Vec<(u64, Settle)> {
            self.log.lock().unwrap().clone()
        }
    }

    /// A fake link: records what is sent; refuses sends after `full`.
    #[derive(Default)]
    struct FakeLink {
        sent: Vec<(Token, Vec<String>)>,
        per: usize,
        full: Option<usize>,
        bytes: Option<usize>,
    }

    impl Link for FakeLink {
        fn max_readings(&self) -> usize {
            self.per.max(1)
        }
        fn max_bytes(&self) -> usize {
            self.bytes.unwrap_or(usize::MAX)
        }
        fn send(&mut self, delivery: Delivery) -> Result<Token, UplinkError> {
            if self.full.is_some_and(|f| self.sent.len() >= f) {
                return Err(UplinkError::Queue("full".into()));
            }
            let token = self.sent.len() as Token;
            self.sent.push((token, delivery.readings.iter().map(|r| r.message.topic.clone()).collect()));
            Ok(token)
        }
        async fn next_event(&mut self) -> LinkEvent {
            std::future::pending().await
        }
        async fn close(self) {}
    }

    /// Readings `indexes` of an entry; the tag and topic name the reading `"{seq}:{index}"`.
    fn ready(core: &Core<FakeEntry, String>, seq: u64, n: usize) -> Vec<Ready<String>> {
        (0..n)
            .filter(|i| !core.is_settled(seq, *i))
            .map(|i| Ready {
                index: i,
                outgoing: Outgoing {
                    message: crate::encoding::Publication::plain(format!("{seq}:{i}"), Vec::new(), true),
                    before: Vec::new(),
                    traceparent: None,
                },
                tag: format!("{seq}:{i}"),
            })
            .collect()
    }

    fn core() -> Core<FakeEntry, String> {
        Core::new(RetryDelays::default())
    }

    fn nak(delay_s: Option<u64>, unsettled: usize) -> Settle {
        Settle::Nak { delay: delay_s.map(Duration::from_secs), unsettled }
    }

    fn refused(token: Token, permanent: bool) -> LinkEvent {
        LinkEvent::Refused { token, reason: "NotAuthorized".into(), permanent, retry_after: None }
    }

    #[tokio::test]
    async fn confirmed_acks_exactly_the_confirmed_entries() {
        let (mut c, mut consumer, mut link) = (core(), FakeConsumer::new(), FakeLink::default());
        let r = ready(&c, 1, 2);
        c.admit(&mut link, consumer.deliver(1), 2, r, &[]).await;
        let r = ready(&c, 2, 1);
        c.admit(&mut link, consumer.deliver(2), 1, r, &[]).await;
        assert_eq!(c.in_flight(), 3);
        c.on_event(LinkEvent::Confirmed(0)).await;
        c.on_event(LinkEvent::Confirmed(2)).await;
        // Entry 1 has one reading unanswered: not acked yet; entry 2 is.
        assert_eq!(consumer.settled(), [(2, Settle::Ack)]);
        let out = c.on_event(LinkEvent::Confirmed(1)).await;
        assert_eq!(out, [Outcome::Confirmed("1:1".to_string())]);
        assert_eq!(consumer.settled(), [(2, Settle::Ack), (1, Settle::Ack)]);
        assert_eq!(c.in_flight(), 0);
        // An answer for an unknown token changes nothing.
        assert!(c.on_event(LinkEvent::Confirmed(99)).await.is_empty());
    }

    #[tokio::test]
    async fn a_permanent_refusal_terminates_the_reading_and_nothing_else() {
        let (mut c, mut consumer, mut link) = (core(), FakeConsumer::new(), FakeLink::default());
        let r = ready(&c, 1, 3);
        c.admit(&mut link, consumer.deliver(1), 3, r, &[]).await;
        c.on_event(LinkEvent::Confirmed(0)).await;
        let out = c.on_event(refused(1, true)).await;
        assert_eq!(out, [Outcome::Refused { tag: "1:1".to_string(), reason: "NotAuthorized".into(), permanent: true }]);
        c.on_event(LinkEvent::Confirmed(2)).await;
        // Settled without sending anything again: acked (two of its readings are delivered).
        assert_eq!(consumer.settled(), [(1, Settle::Ack)]);
        assert_eq!(link.sent.len(), 3);

        // An entry whose only reading is refused for good is terminated.
        let r = ready(&c, 2, 1);
        c.admit(&mut link, consumer.deliver(2), 1, r, &[]).await;
        c.on_event(refused(3, true)).await;
        assert_eq!(consumer.settled()[1], (2, Settle::Term));
    }

    #[tokio::test]
    async fn a_transient_refusal_comes_back_later_and_sends_only_the_refused_reading() {
        let (mut c, mut consumer, mut link) = (core(), FakeConsumer::new(), FakeLink::default());
        let r = ready(&c, 7, 3);
        c.admit(&mut link, consumer.deliver(7), 3, r, &[]).await;
        c.on_event(LinkEvent::Confirmed(0)).await;
        c.on_event(LinkEvent::Refused {
            token: 1,
            reason: "QuotaExceeded".into(),
            permanent: false,
            retry_after: None,
        })
        .await;
        c.on_event(LinkEvent::Confirmed(2)).await;
        // Given back with the one refused reading left to deliver.
        assert_eq!(consumer.settled(), [(7, nak(Some(1), 1))]);

        // Redelivered: only reading 1 goes again; refused again, the delay doubles.
        let r = ready(&c, 7, 3);
        assert_eq!(r.iter().map(|r| r.index).collect::<Vec<_>>(), [1]);
        c.admit(&mut link, consumer.deliver(7), 3, r, &[]).await;
        assert_eq!(link.sent.last().unwrap().1, ["7:1"]);
        c.on_event(LinkEvent::Refused {
            token: 3,
            reason: "QuotaExceeded".into(),
            permanent: false,
            retry_after: None,
        })
        .await;
        assert_eq!(consumer.settled()[1], (7, nak(Some(2), 1)));

        // Third time lucky: acked, and nothing of it was sent twice but the refused reading.
        let r = ready(&c, 7, 3);
        c.admit(&mut link, consumer.deliver(7), 3, r, &[]).await;
        c.on_event(LinkEvent::Confirmed(4)).await;
        assert_eq!(consumer.settled()[2], (7, Settle::Ack));
        let topics: Vec<&String> = link.sent.iter().flat_map(|(_, t)| t).collect();
        assert_eq!(topics, ["7:0", "7:1", "7:2", "7:1", "7:1"]);
    }

    #[tokio::test]
    async fn a_lost_link_releases_everything_in_flight_and_resends_nothing_confirmed() {
        let (mut c, mut consumer, mut link) = (core(), FakeConsumer::new(), FakeLink::default());
        let r = ready(&c, 1, 2);
        c.admit(&mut link, consumer.deliver(1), 2, r, &[]).await;
        let r = ready(&c, 2, 2);
        c.admit(&mut link, consumer.deliver(2), 2, r, &[]).await;
        c.on_event(LinkEvent::Confirmed(0)).await;
        let out = c.on_event(LinkEvent::Lost { reason: "reset".into(), refused: false }).await;
        assert_eq!(out.len(), 3);
        assert!(out.iter().all(|o| matches!(o, Outcome::Interrupted(_))));
        assert_eq!(c.in_flight(), 0);
        let mut settled = consumer.settled();
        settled.sort_by_key(|(s, _)| *s);
        // Readings 2, 3 and 4 were given back.
        assert_eq!(settled, [(1, nak(None, 1)), (2, nak(None, 2))]);

        // A new link: the entries come back; reading 1 (confirmed) is not sent again.
        let mut link2 = FakeLink::default();
        let r = ready(&c, 1, 2);
        c.admit(&mut link2, consumer.deliver(1), 2, r, &[]).await;
        let r = ready(&c, 2, 2);
        c.admit(&mut link2, consumer.deliver(2), 2, r, &[]).await;
        let topics: Vec<&String> = link2.sent.iter().flat_map(|(_, t)| t).collect();
        assert_eq!(topics, ["1:1", "2:0", "2:1"]);
        for t in 0..3 {
            c.on_event(LinkEvent::Confirmed(t)).await;
        }
        let settled = consumer.settled();
        assert!(settled.contains(&(1, Settle::Ack)) && settled.contains(&(2, Settle::Ack)), "{settled:?}");
    }

    #[tokio::test]
    async fn batches_follow_the_link_and_a_full_link_gives_the_entry_back() {
        let (mut c, mut consumer) = (core(), FakeConsumer::new());
        let mut link = FakeLink { per: 2, ..Default::default() };
        let r = ready(&c, 1, 5);
        c.admit(&mut link, consumer.deliver(1), 5, r, &[]).await;
        assert_eq!(link.sent.iter().map(|(_, t)| t.len()).collect::<Vec<_>>(), [2, 2, 1]);
        // A batch is refused as a unit.
        c.on_event(refused(1, true)).await;
        c.on_event(LinkEvent::Confirmed(0)).await;
        c.on_event(LinkEvent::Confirmed(2)).await;
        assert_eq!(consumer.settled(), [(1, Settle::Ack)]);

        // A link that takes one delivery only: the rest is not sent, the entry comes back.
        let mut full = FakeLink { full: Some(1), ..Default::default() };
        let r = ready(&c, 2, 3);
        let out = c.admit(&mut full, consumer.deliver(2), 3, r, &[]).await;
        assert_eq!(out.len(), 2);
        c.on_event(LinkEvent::Confirmed(0)).await;
        assert_eq!(consumer.settled()[1], (2, nak(Some(1), 2)));
        assert!(c.is_settled(2, 0) && !c.is_settled(2, 1));
    }

    #[tokio::test]
    async fn undecodable_readings_are_settled_and_an_entry_of_nothing_to_send_is_acked() {
        let (mut c, mut consumer, mut link) = (core(), FakeConsumer::new(), FakeLink::default());
        c.admit(&mut link, consumer.deliver(1), 2, Vec::new(), &[0, 1]).await;
        assert_eq!(consumer.settled(), [(1, Settle::Ack)]);
        assert!(link.sent.is_empty());
    }

    #[tokio::test]
    async fn deliveries_are_cut_by_size_and_a_reading_too_large_goes_alone() {
        let (mut c, mut consumer) = (core(), FakeConsumer::new());
        // 100 bytes per delivery; readings of 40, 40, 40, 300 and 10 bytes (each + 8 of framing).
        let mut link = FakeLink { per: 10, bytes: Some(100), ..Default::default() };
        let ready: Vec<Ready<String>> = [40, 40, 40, 300, 10]
            .into_iter()
            .enumerate()
            .map(|(i, len)| Ready {
                index: i,
                outgoing: Outgoing {
                    message: crate::encoding::Publication::plain(format!("1:{i}"), vec![0; len], true),
                    before: Vec::new(),
                    traceparent: None,
                },
                tag: format!("1:{i}"),
            })
            .collect();
        c.admit(&mut link, consumer.deliver(1), 5, ready, &[]).await;
        let groups: Vec<Vec<String>> = link.sent.iter().map(|(_, t)| t.clone()).collect();
        assert_eq!(groups, [vec!["1:0", "1:1"], vec!["1:2"], vec!["1:3"], vec!["1:4"]]);
    }

    #[tokio::test]
    async fn a_transient_refusal_with_retry_after_waits_as_long_as_the_cloud_asked() {
        let (mut c, mut consumer, mut link) = (core(), FakeConsumer::new(), FakeLink::default());
        let r = ready(&c, 1, 1);
        c.admit(&mut link, consumer.deliver(1), 1, r, &[]).await;
        let retry_after = Some(Duration::from_secs(7));
        c.on_event(LinkEvent::Refused { token: 0, reason: "HTTP 503".into(), permanent: false, retry_after }).await;
        assert_eq!(consumer.settled(), [(1, nak(Some(7), 1))]);
        // Never longer than the bound, whatever the cloud asks.
        let r = ready(&c, 1, 1);
        c.admit(&mut link, consumer.deliver(1), 1, r, &[]).await;
        let retry_after = Some(Duration::from_secs(86_400));
        c.on_event(LinkEvent::Refused { token: 1, reason: "HTTP 429".into(), permanent: false, retry_after }).await;
        assert_eq!(consumer.settled()[1], (1, Settle::Nak { delay: Some(MAX_RETRY_AFTER), unsettled: 1 }));
    }

    #[test]
    fn retry_delays_double_up_to_the_cap() {
        let d = RetryDelays { base: Duration::from_secs(1), cap: Duration::from_secs(60) };
        let got: Vec<u64> = (1..=8).map(|n| d.after(n).as_secs()).collect();
        assert_eq!(got, [1, 2, 4, 8, 16, 32, 60, 60]);
        assert_eq!(d.after(i64::MAX), Duration::from_secs(60));
    }
}
