//! Time that can step: polls are scheduled on the monotonic clock, and the wall clock only
//! names them.
//!
//! A poller ticks on `tokio::time::Instant` (monotonic: an NTP correction or an RTC that was
//! ahead at boot never stops or bunches its ticks). Its first tick is placed on the next
//! wall-clock multiple of the poll interval, and each tick's *slot* — the wall-clock time
//! rounded down to the interval, in Unix milliseconds — names the reading
//! (`{namespace}/{device}/{slot}`), so ids stay deterministic.
//!
//! A slot is never issued twice by one poller: when the wall clock reads a slot at or before
//! the last one issued (it stepped backwards, or drifted against the monotonic clock by a
//! tick), the poller issues the slot after the last one instead. Ids therefore stay unique
//! and increasing, and the poll happens; while the wall clock is behind, the slots run ahead
//! of it by the size of the step (the reading's sample time is always the wall clock's).
//!
//! Every wall-clock reading of the pollers goes through the one [`WallClock`] of the
//! gateway, which compares it with the monotonic time elapsed since its previous reading: a
//! jump of more than [`STEP_TOLERANCE`] is counted once in
//! `fieldgate_wall_clock_steps_total{direction="backward"|"forward"}` and a backward one is
//! logged at warn (at most once a minute). The source of wall-clock time is injectable
//! ([`TimeSource`]) so tests can step it.

use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, SystemTime};

use tokio::time::{Instant, Interval, MissedTickBehavior};

use crate::metrics::{ClockStepLabels, Metrics, StepDirection};
use crate::telemetry::LogThrottle;

/// A jump of the wall clock against the monotonic clock larger than this is a step.
pub const STEP_TOLERANCE: Duration = Duration::from_millis(500);
/// Shortest time between two warnings about backward steps.
const LOG_EVERY: Duration = Duration::from_secs(60);

/// Where wall-clock time comes from.
pub trait TimeSource: Send + Sync {
    /// The current wall-clock time.
    fn now(&self) -> SystemTime;
}

/// The system's wall clock.
#[derive(Clone, Copy, Debug, Default)]
pub struct SystemSource;

impl TimeSource for SystemSource {
    fn now(&self) -> SystemTime {
        SystemTime::now()
    }
}

/// The gateway's wall clock: reads its [`TimeSource`] and counts its steps.
pub struct WallClock {
    source: Arc<dyn TimeSource>,
    metrics: Arc<Metrics>,
    state: Mutex<Observed>,
}

#[derive(Default)]
struct Observed {
    /// The previous reading: monotonic and wall-clock time together.
    last: Option<(Instant, SystemTime)>,
    throttle: Option<LogThrottle>,
}

impl std::fmt::Debug for WallClock {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WallClock").finish_non_exhaustive()
    }
}

impl WallClock {
    /// The system's wall clock.
    pub fn system(metrics: Arc<Metrics>) -> Arc<Self> {
        Self::with_source(Arc::new(SystemSource), metrics)
    }

    /// A wall clock reading `source`.
    pub fn with_source(source: Arc<dyn TimeSource>, metrics: Arc<Metrics>) -> Arc<Self> {
        Arc::new(Self { source, metrics, state: Mutex::default() })
    }

    /// The current wall-clock time; a step since the previous reading is counted and logged.
    pub fn now(&self) -> SystemTime {
        let mut state = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        let (mono, wall) = (Instant::now(), self.source.now());
        if let Some((mono0, wall0)) = state.last {
            let expected = wall0 + mono.duration_since(mono0);
            if let Ok(back) = expected.duration_since(wall)
                && back > STEP_TOLERANCE
            {
                self.count(StepDirection::backward);
                let throttle = state.throttle.get_or_insert_with(|| LogThrottle::new(LOG_EVERY));
                if let Some(suppressed) = throttle.allow() {
                    tracing::warn!(
                        step_ms = u64::try_from(back.as_millis()).unwrap_or(u64::MAX),
                        earlier_steps_not_logged = suppressed,
                        "the wall clock stepped backwards; polling continues on the monotonic clock and \
                         reading ids continue after the last one issued"
                    );
                }
            } else if let Ok(ahead) = wall.duration_since(expected)
                && ahead > STEP_TOLERANCE
            {
                self.count(StepDirection::forward);
                tracing::info!(
                    step_ms = u64::try_from(ahead.as_millis()).unwrap_or(u64::MAX),
                    "the wall clock stepped forwards"
                );
            }
        }
        state.last = Some((mono, wall));
        wall
    }

    fn count(&self, direction: StepDirection) {
        self.metrics.clock_steps.get_or_create(&ClockStepLabels { direction }).inc();
    }
}

/// Unix milliseconds of `t` (0 before the epoch).
pub fn unix_ms(t: SystemTime) -> u64 {
    crate::reading::unix_nanos(t) / 1_000_000
}

/// One poller's schedule: a monotonic ticker and the slots that name its polls.
#[derive(Debug)]
pub struct PollSchedule {
    interval_ms: u64,
    last: Option<u64>,
}

impl PollSchedule {
    /// A schedule with `interval`, and its ticker: monotonic, first tick on the next
    /// wall-clock multiple of the interval, missed ticks skipped.
    pub fn start(interval: Duration, clock: &WallClock) -> (Self, Interval) {
        let interval = interval.max(Duration::from_millis(1));
        let interval_ms = u64::try_from(interval.as_millis()).unwrap_or(u64::MAX).max(1);
        let now_ms = unix_ms(clock.now());
        let to_next_slot = Duration::from_millis(interval_ms - now_ms % interval_ms);
        let mut ticker = tokio::time::interval_at(Instant::now() + to_next_slot, interval);
        ticker.set_missed_tick_behavior(MissedTickBehavior::Skip);
        (Self { interval_ms, last: None }, ticker)
    }

    /// The slot naming a poll at wall-clock time `now`: `now` rounded down to the interval,
    /// or, when that is not after the last slot issued, the slot after the last one.
    pub fn slot(&mut self, now: SystemTime) -> u64 {
        let now_ms = unix_ms(now);
        let wall = now_ms - now_ms % self.interval_ms;
        let slot = match self.last {
            Some(last) if wall <= last => last.saturating_add(self.interval_ms),
            _ => wall,
        };
        self.last = Some(slot);
        slot
    }
}

/// A wall-clock source for tests: the system's time plus an offset that a test steps.
#[derive(Debug, Default)]
pub struct TestSource {
    offset_ms: std::sync::atomic::AtomicI64,
}

impl TestSource {
    /// Moves the clock by `ms` (negative: backwards).
    pub fn step(&self, ms: i64) {
        self.offset_ms.fetch_add(ms, std::sync::atomic::Ordering::SeqCst);
    }
}

impl TimeSource for TestSource {
    fn now(&self) -> SystemTime {
        let offset = self.offset_ms.load(std::sync::atomic::Ordering::SeqCst);
        let now = SystemTime::now();
        let by = Duration::from_millis(offset.unsigned_abs());
        if offset < 0 { now - by } else { now + by }
    }
}

/// Retry delays at least this long are placed on the shared [`RETRY_GRID`].
pub const RETRY_GRID_FROM: Duration = Duration::from_secs(5);
/// The grid long retry delays end on: every unreachable device whose retry falls in the same
/// second retries in the same wake-up of the gateway.
pub const RETRY_GRID: Duration = Duration::from_secs(1);

/// When a retry `delay` from `now` is due: exactly then for short delays, else rounded up onto
/// a one-second grid shared by every task of the process ([`retry_at_on_grid`]). A hundred
/// unreachable devices, each backing off by up to 30 s, then wake the gateway about once a
/// second instead of once per device retry; each delay grows by less than a second (under
/// 20 % of it, well inside the backoff's jitter).
pub fn retry_at(now: Instant, delay: Duration) -> Instant {
    static EPOCH: std::sync::OnceLock<Instant> = std::sync::OnceLock::new();
    let epoch = *EPOCH.get_or_init(|| now);
    retry_at_on_grid(now, delay, epoch)
}

/// [`retry_at`] with the grid's origin given.
pub fn retry_at_on_grid(now: Instant, delay: Duration, epoch: Instant) -> Instant {
    let at = now + delay;
    if delay < RETRY_GRID_FROM || at <= epoch {
        return at;
    }
    let grid = RETRY_GRID.as_nanos();
    let rem = at.duration_since(epoch).as_nanos() % grid;
    if rem == 0 {
        return at;
    }
    // `grid - rem` is below one second: it fits.
    at + Duration::from_nanos(u64::try_from(grid - rem).unwrap_or(0))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use prometheus_client::registry::Registry;

    fn steps(metrics: &Metrics, direction: StepDirection) -> u64 {
        metrics.clock_steps.get_or_create(&ClockStepLabels { direction }).get()
    }

    #[test]
    fn slots_follow_the_wall_clock_and_never_repeat_after_a_backward_step() {
        let mut s = PollSchedule { interval_ms: 1000, last: None };
        let b: u64 = 100_000_000;
        let at = |ms: u64| SystemTime::UNIX_EPOCH + Duration::from_millis(ms);
        assert_eq!(s.slot(at(b + 250)), b);
        assert_eq!(s.slot(at(b + 1_010)), b + 1_000);
        // The same slot again (a tick early against the wall clock): the next one.
        assert_eq!(s.slot(at(b + 1_900)), b + 2_000);
        // One hour back: the slots continue after the last one issued.
        assert_eq!(s.slot(at(b + 3_000 - 3_600_000)), b + 3_000);
        assert_eq!(s.slot(at(b + 4_000 - 3_600_000)), b + 4_000);
        // A forward step: the wall clock's slot again.
        assert_eq!(s.slot(at(b + 9_000_250)), b + 9_000_000);
    }

    #[tokio::test]
    async fn a_step_is_counted_once_in_its_direction() {
        let metrics = Arc::new(Metrics::new(&mut Registry::default()));
        let source = Arc::new(TestSource::default());
        let clock = WallClock::with_source(source.clone(), Arc::clone(&metrics));
        clock.now();
        clock.now();
        assert_eq!(steps(&metrics, StepDirection::backward), 0);
        source.step(-3_600_000);
        let after = clock.now();
        assert!(after < SystemTime::now() - Duration::from_secs(3500));
        clock.now();
        assert_eq!(steps(&metrics, StepDirection::backward), 1);
        source.step(7_200_000);
        clock.now();
        clock.now();
        assert_eq!(steps(&metrics, StepDirection::forward), 1);
        assert_eq!(steps(&metrics, StepDirection::backward), 1);
    }

    #[test]
    fn long_retries_end_on_a_shared_second_and_short_ones_exactly() {
        let epoch = Instant::now();
        let now = epoch + Duration::from_millis(12_345);
        // Short: exactly.
        assert_eq!(retry_at_on_grid(now, Duration::from_millis(800), epoch), now + Duration::from_millis(800));
        // Long: up to the next whole second after the epoch.
        let at = retry_at_on_grid(now, Duration::from_secs(20), epoch);
        assert_eq!(at, epoch + Duration::from_secs(33));
        // Two devices whose retries fall in the same second wake together.
        let other = retry_at_on_grid(now + Duration::from_millis(400), Duration::from_secs(20), epoch);
        assert_eq!(other, at);
        // Already on the grid: unchanged.
        assert_eq!(retry_at_on_grid(epoch, Duration::from_secs(10), epoch), epoch + Duration::from_secs(10));
    }
}
