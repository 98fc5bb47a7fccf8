//! Supervision: a task that panics or ends unexpectedly is restarted with backoff and counted.
//! It never takes the process down and is never lost silently.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

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

/// Runs the task `make` builds until `cancel` fires, restarting it after a panic or an
/// unexpected return (counted in `fieldgate_task_restarts_total{task}`).
pub async fn supervise<F, Fut>(name: String, metrics: Arc<Metrics>, cancel: CancellationToken, mut make: F)
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
        match outcome {
            Ok(()) => warn!(task = %name, "task ended unexpectedly; restarting"),
            Err(e) if e.is_panic() => error!(task = %name, "task panicked; restarting"),
            Err(_) => return,
        }
        metrics.task_restarts.get_or_create(&TaskLabels { task: name.clone() }).inc();
        let delay = delays.next().unwrap_or(Duration::from_secs(30));
        tokio::select! {
            () = cancel.cancelled() => return,
            () = tokio::time::sleep(delay) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use prometheus_client::registry::Registry;
    use std::sync::atomic::{AtomicU32, Ordering};

    #[tokio::test]
    async fn a_panicking_task_is_restarted_and_counted() {
        let metrics = Arc::new(Metrics::new(&mut Registry::default()));
        let cancel = CancellationToken::new();
        let runs = Arc::new(AtomicU32::new(0));
        let (r, c) = (Arc::clone(&runs), cancel.clone());
        let sup = tokio::spawn(supervise("t".into(), Arc::clone(&metrics), cancel.clone(), move || {
            let (r, c) = (Arc::clone(&r), c.clone());
            async move {
                if r.fetch_add(1, Ordering::SeqCst) < 2 {
                    panic!("boom");
                }
                c.cancelled().await;
            }
        }));
        let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
        while runs.load(Ordering::SeqCst) < 3 {
            assert!(tokio::time::Instant::now() < deadline, "task was not restarted");
            tokio::task::yield_now().await;
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        cancel.cancel();
        sup.await.unwrap();
        let restarts = metrics.task_restarts.get_or_create(&TaskLabels { task: "t".into() }).get();
        assert_eq!(restarts, 2);
    }
}
