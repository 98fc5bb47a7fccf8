//! Supervision: a task that panics or ends unexpectedly is restarted with backoff and counted.
//! It never takes the process down and is never lost silently.

use std::collections::BTreeMap;
use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, SystemTime};

use backon::{BackoffBuilder, ExponentialBackoff, ExponentialBuilder};
use tokio_util::sync::CancellationToken;
use tracing::{error, warn};

use crate::metrics::{Metrics, TaskLabels};

/// Capped exponential backoff with jitter, never giving up: the delays between reconnect
/// attempts of devices and brokers and between task restarts.
pub fn backoff(min: Duration, max: Duration) -> ExponentialBackoff {
    ExponentialBuilder::default()
        .with_min_delay(min)
        .with_max_delay(max)
        .with_factor(2.0)
        .with_jitter()
        .without_max_times()
        .build()
}

/// What a supervised task is doing, for the diagnostics bundle.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub struct TaskState {
    /// `running`, `restarting` (waiting out its backoff after a failure), or `failed` (a task
    /// that cannot be restarted stopped: the gateway stops too).
    pub state: &'static str,
    /// When it entered that state (RFC 3339).
    pub since: String,
    /// Restarts so far.
    pub restarts: u64,
    /// How it last failed: `panicked` or `ended`.
    pub last_failure: Option<&'static str>,
}

/// The state of every supervised task, by task name. A task leaves it when it stops for good.
#[derive(Debug, Default)]
pub struct TaskStates {
    tasks: Mutex<BTreeMap<String, (u64, TaskState)>>,
    next_id: AtomicU64,
}

impl TaskStates {
    /// Every task and its state.
    pub fn snapshot(&self) -> BTreeMap<String, TaskState> {
        let tasks = self.tasks.lock().unwrap_or_else(PoisonError::into_inner);
        tasks.iter().map(|(name, (_, state))| (name.clone(), state.clone())).collect()
    }

    fn register(&self, name: &str) -> u64 {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let state = TaskState { state: "running", since: now_text(), restarts: 0, last_failure: None };
        self.tasks.lock().unwrap_or_else(PoisonError::into_inner).insert(name.to_string(), (id, state));
        id
    }

    fn update(&self, name: &str, id: u64, change: impl FnOnce(&mut TaskState)) {
        let mut tasks = self.tasks.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some((owner, state)) = tasks.get_mut(name)
            && *owner == id
        {
            change(state);
            state.since = now_text();
        }
    }

    /// Removes the task's entry; `false` when a task of the same name started since (a
    /// changed device), which keeps its entry.
    fn remove(&self, name: &str, id: u64) -> bool {
        let mut tasks = self.tasks.lock().unwrap_or_else(PoisonError::into_inner);
        let ours = tasks.get(name).is_some_and(|(owner, _)| *owner == id);
        if ours {
            tasks.remove(name);
        }
        ours
    }
}

fn now_text() -> String {
    humantime::format_rfc3339_seconds(SystemTime::now()).to_string()
}

/// A task that cannot be restarted (it owns what it works on, such as the buffer writer and
/// its queue): shown in [`TaskStates`] like a supervised one while it runs; its end is the
/// caller's to handle (the gateway stops). Leaves the task states when dropped.
pub struct Watched {
    name: String,
    id: u64,
    metrics: Arc<Metrics>,
}

impl Watched {
    /// Shows `name` as running.
    pub fn new(name: &str, metrics: &Arc<Metrics>) -> Self {
        let id = metrics.task_states.register(name);
        Self { name: name.to_string(), id, metrics: Arc::clone(metrics) }
    }

    /// Shows it as failed (`panicked` or `ended`).
    pub fn failed(&self, how: &'static str) {
        self.metrics.task_states.update(&self.name, self.id, |s| {
            s.state = "failed";
            s.last_failure = Some(how);
        });
    }
}

impl Drop for Watched {
    fn drop(&mut self) {
        self.metrics.task_states.remove(&self.name, self.id);
    }
}

/// Runs the task `make` builds until `cancel` fires, restarting it after a panic or an
/// unexpected return (counted in `fieldgate_task_restarts_total{task}`, its state in
/// [`TaskStates`]).
pub async fn supervise<F, Fut>(name: String, metrics: Arc<Metrics>, cancel: CancellationToken, make: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = ()> + Send + 'static,
{
    let id = metrics.task_states.register(&name);
    supervise_registered(&name, id, &metrics, &cancel, make).await;
    // Stopped for good (its device or uplink left the config, or the gateway stops): its
    // restart count goes with it, unless a task of the same name took over.
    if metrics.task_states.remove(&name, id) {
        metrics.task_restarts.remove(&TaskLabels { task: name });
    }
}

async fn supervise_registered<F, Fut>(name: &str, id: u64, metrics: &Metrics, cancel: &CancellationToken, mut make: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = ()> + Send + 'static,
{
    let mut delays = backoff(Duration::from_millis(200), Duration::from_secs(30));
    loop {
        let outcome = tokio::spawn(make()).await;
        if cancel.is_cancelled() {
            return;
        }
        let failure = match outcome {
            Ok(()) => {
                warn!(task = %name, "task ended unexpectedly; restarting");
                "ended"
            }
            Err(e) if e.is_panic() => {
                error!(task = %name, "task panicked; restarting");
                "panicked"
            }
            Err(_) => return,
        };
        metrics.task_restarts.get_or_create(&TaskLabels { task: name.to_string() }).inc();
        metrics.task_states.update(name, id, |s| {
            s.state = "restarting";
            s.restarts += 1;
            s.last_failure = Some(failure);
        });
        let delay = delays.next().unwrap_or(Duration::from_secs(30));
        tokio::select! {
            () = cancel.cancelled() => return,
            () = tokio::time::sleep(delay) => {}
        }
        metrics.task_states.update(name, id, |s| s.state = "running");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use prometheus_client::registry::Registry;
    use std::sync::atomic::{AtomicU32, Ordering};

    /// A supervised task named `name` that panics on its first `panics` runs, then waits for
    /// the cancel token.
    fn panicking(
        name: &str,
        panics: u32,
    ) -> (Arc<Metrics>, CancellationToken, Arc<AtomicU32>, tokio::task::JoinHandle<()>) {
        let metrics = Arc::new(Metrics::new(&mut Registry::default()));
        let cancel = CancellationToken::new();
        let runs = Arc::new(AtomicU32::new(0));
        let (r, c) = (Arc::clone(&runs), cancel.clone());
        let sup = tokio::spawn(supervise(name.into(), Arc::clone(&metrics), cancel.clone(), move || {
            let (r, c) = (Arc::clone(&r), c.clone());
            async move {
                if r.fetch_add(1, Ordering::SeqCst) < panics {
                    panic!("boom");
                }
                c.cancelled().await;
            }
        }));
        (metrics, cancel, runs, sup)
    }

    #[tokio::test]
    async fn a_panicking_task_is_restarted_and_counted() {
        let (metrics, cancel, runs, sup) = panicking("t", 2);
        let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
        while runs.load(Ordering::SeqCst) < 3 {
            assert!(tokio::time::Instant::now() < deadline, "task was not restarted");
            tokio::task::yield_now().await;
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let restarts = metrics.task_restarts.get(&TaskLabels { task: "t".into() }).map(|c| c.get());
        assert_eq!(restarts, Some(2));
        cancel.cancel();
        sup.await.unwrap();
        assert!(metrics.task_states.snapshot().is_empty(), "a stopped task leaves the task states");
        assert!(metrics.task_restarts.get(&TaskLabels { task: "t".into() }).is_none(), "and its restart series");
    }

    #[tokio::test]
    async fn a_running_task_shows_its_state_and_restarts() {
        let (metrics, cancel, _runs, sup) = panicking("device default/m", 1);
        let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
        loop {
            let states = metrics.task_states.snapshot();
            if let Some(s) = states.get("device default/m")
                && s.state == "running"
                && s.restarts == 1
            {
                assert_eq!(s.last_failure, Some("panicked"));
                break;
            }
            assert!(tokio::time::Instant::now() < deadline, "no running state after the restart: {states:?}");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        cancel.cancel();
        sup.await.unwrap();
    }
}
