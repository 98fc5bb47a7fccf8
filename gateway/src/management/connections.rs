//! Connections of the management server: HTTP/1.1 (hyper), bounded in time, size and number,
//! so that idle or slow clients cannot keep `/healthz`, `/readyz` and `/metrics` from
//! answering.
//!
//! - A connection must send a request's header within the idle timeout
//!   (`--management-idle-timeout`, hyper's header-read timeout), the first one as well as every
//!   next one on a kept-alive connection; else it is closed. That bounds idle and trickling
//!   connections in time.
//! - At most `--management-max-connections` connections are open. A new one at the limit
//!   closes the connection that has been idle longest (waiting for a request header, whether
//!   it never sent one or finished its last request): an idle connection never holds a slot
//!   that someone with a request needs. Only when every open connection is in the middle of a
//!   request (each bounded by the 10 s request timeout) does a new one wait.
//! - A request header is at most [`MAX_HEADER_BYTES`] and [`MAX_HEADERS`] fields; a
//!   connection serves at most [`MAX_REQUESTS_PER_CONNECTION`] requests, then answers with
//!   `Connection: close`.
//!
//! Counted in `fieldgate_management_connections` (open) and
//! `fieldgate_management_connections_closed_total{reason}` (`idle_timeout`, `evicted`,
//! `request_limit`).

use std::collections::HashMap;
use std::convert::Infallible;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::http::{HeaderValue, Request, Response, header};
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use prometheus_client::encoding::{EncodeLabelSet, EncodeLabelValue};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use tokio::net::TcpListener;
use tokio::sync::Notify;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tower::ServiceExt as _;
use tracing::debug;

/// Largest request header, in bytes (hyper's read buffer; its minimum is 8 KiB).
pub const MAX_HEADER_BYTES: usize = 16 * 1024;
/// Most header fields in one request.
pub const MAX_HEADERS: usize = 64;
/// Requests one connection may send; the last one is answered with `Connection: close`.
pub const MAX_REQUESTS_PER_CONNECTION: u64 = 1000;
/// How long open connections may take to finish once the server stops.
const DRAIN: Duration = Duration::from_secs(2);

/// Time and number bounds of the management connections.
#[derive(Clone, Copy, Debug)]
pub struct ConnectionLimits {
    /// Time to send a request header, and most idle time between two requests.
    pub idle_timeout: Duration,
    /// Most connections open at once.
    pub max_connections: usize,
}

/// Why the server closed a connection.
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq, EncodeLabelValue)]
#[allow(non_camel_case_types)]
pub enum CloseReason {
    /// No complete request header within the idle timeout (idle, or trickling).
    idle_timeout,
    /// Closed to make room for a new connection at the connection limit.
    evicted,
    /// It sent [`MAX_REQUESTS_PER_CONNECTION`] requests.
    request_limit,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct CloseLabels {
    reason: CloseReason,
}

/// The management server's connection metrics.
#[derive(Clone, Debug, Default)]
pub struct ConnectionMetrics {
    open: Gauge,
    closed: Family<CloseLabels, Counter>,
}

impl ConnectionMetrics {
    /// Creates the metrics in `registry` (prefix `fieldgate`).
    pub fn register(registry: &mut Registry) -> Self {
        let m = Self::default();
        let r = registry.sub_registry_with_prefix("fieldgate");
        r.register("management_connections", "Open connections to the management server", m.open.clone());
        r.register(
            "management_connections_closed",
            "Management connections closed by the server, by reason",
            m.closed.clone(),
        );
        m
    }

    fn closed(&self, reason: CloseReason) {
        self.closed.get_or_create(&CloseLabels { reason }).inc();
    }
}

/// One open connection as the slot table sees it.
#[derive(Debug)]
struct Slot {
    /// Requests in progress (0 or 1 with HTTP/1.1).
    busy: u32,
    /// When it last started or finished a request (or was accepted).
    last_active: Instant,
    /// Cancelled to close it.
    evict: CancellationToken,
}

/// The open connections.
#[derive(Debug, Default)]
struct Slots {
    open: Mutex<HashMap<u64, Slot>>,
    next_id: AtomicU64,
    freed: Notify,
}

impl Slots {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<u64, Slot>> {
        self.open.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// A slot for a new connection: at the limit, the longest-idle connection is closed to
    /// make room; when every connection is busy, waits until one finishes or closes (further
    /// connections wait in the listen queue meanwhile).
    async fn take(self: &Arc<Self>, max: usize, metrics: &ConnectionMetrics) -> (u64, CancellationToken) {
        loop {
            let freed = self.freed.notified();
            {
                let mut open = self.lock();
                while open.len() >= max {
                    let idlest = open.iter().filter(|(_, s)| s.busy == 0).min_by_key(|(_, s)| s.last_active);
                    let Some((&id, _)) = idlest else { break };
                    if let Some(victim) = open.remove(&id) {
                        victim.evict.cancel();
                        metrics.closed(CloseReason::evicted);
                    }
                }
                if open.len() < max {
                    let id = self.next_id.fetch_add(1, Ordering::Relaxed);
                    let evict = CancellationToken::new();
                    open.insert(id, Slot { busy: 0, last_active: Instant::now(), evict: evict.clone() });
                    return (id, evict);
                }
            }
            // Every connection is in the middle of a request: wait for one to finish.
            freed.await;
        }
    }

    fn set_busy(&self, id: u64, busy: bool) {
        if let Some(slot) = self.lock().get_mut(&id) {
            if busy {
                slot.busy += 1;
            } else {
                slot.busy = slot.busy.saturating_sub(1);
            }
            slot.last_active = Instant::now();
        }
        if !busy {
            self.freed.notify_waiters();
        }
    }

    fn release(&self, id: u64) {
        self.lock().remove(&id);
        self.freed.notify_waiters();
    }
}

/// Marks its connection busy while a request is served (also when the request is dropped).
struct Busy {
    slots: Arc<Slots>,
    id: u64,
}

impl Busy {
    fn start(slots: &Arc<Slots>, id: u64) -> Self {
        slots.set_busy(id, true);
        Self { slots: Arc::clone(slots), id }
    }
}

impl Drop for Busy {
    fn drop(&mut self) {
        self.slots.set_busy(self.id, false);
    }
}

/// Serves `app` on `listener` until `cancel` fires, within `limits`.
pub async fn serve(
    listener: Arc<TcpListener>,
    app: Router,
    limits: ConnectionLimits,
    metrics: ConnectionMetrics,
    cancel: CancellationToken,
) -> std::io::Result<()> {
    let slots = Arc::new(Slots::default());
    let tracker = TaskTracker::new();
    let max = limits.max_connections.max(1);
    loop {
        let stream = tokio::select! {
            () = cancel.cancelled() => break,
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(e) => {
                    // Out of file descriptors and the like: wait instead of spinning.
                    debug!(error = %e, "management accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        let (id, evict) = tokio::select! {
            () = cancel.cancelled() => break,
            slot = slots.take(max, &metrics) => slot,
        };
        let _ = stream.set_nodelay(true);
        metrics.open.inc();
        let (app, slots, metrics, cancel) = (app.clone(), Arc::clone(&slots), metrics.clone(), cancel.clone());
        tracker.spawn(async move {
            connection(stream, app, id, &slots, limits, &metrics, evict, cancel).await;
            slots.release(id);
            metrics.open.dec();
        });
    }
    tracker.close();
    let _ = tokio::time::timeout(DRAIN, tracker.wait()).await;
    Ok(())
}

#[allow(clippy::too_many_arguments)]
async fn connection(
    stream: tokio::net::TcpStream,
    app: Router,
    id: u64,
    slots: &Arc<Slots>,
    limits: ConnectionLimits,
    metrics: &ConnectionMetrics,
    evict: CancellationToken,
    shutdown: CancellationToken,
) {
    let served = Arc::new(AtomicU64::new(0));
    let service = {
        let (slots, metrics) = (Arc::clone(slots), metrics.clone());
        hyper::service::service_fn(move |req: Request<Incoming>| {
            let busy = Busy::start(&slots, id);
            let n = served.fetch_add(1, Ordering::Relaxed) + 1;
            let (app, metrics) = (app.clone(), metrics.clone());
            async move {
                let mut response: Response<Body> = match app.oneshot(req.map(Body::new)).await {
                    Ok(r) => r,
                    Err(never) => match never {},
                };
                if n >= MAX_REQUESTS_PER_CONNECTION {
                    response.headers_mut().insert(header::CONNECTION, HeaderValue::from_static("close"));
                    metrics.closed(CloseReason::request_limit);
                }
                drop(busy);
                Ok::<_, Infallible>(response)
            }
        })
    };
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(limits.idle_timeout)
        .max_buf_size(MAX_HEADER_BYTES)
        .max_headers(MAX_HEADERS)
        .keep_alive(true);
    let conn = builder.serve_connection(TokioIo::new(stream), service);
    tokio::pin!(conn);
    let outcome = tokio::select! {
        r = conn.as_mut() => r,
        // Dropping the connection closes it.
        () = evict.cancelled() => return,
        () = shutdown.cancelled() => {
            conn.as_mut().graceful_shutdown();
            tokio::select! {
                r = conn.as_mut() => r,
                () = evict.cancelled() => return,
            }
        }
    };
    if let Err(e) = outcome {
        if e.is_timeout() {
            metrics.closed(CloseReason::idle_timeout);
        } else {
            debug!(error = %e, "management connection ended with an error");
        }
    }
}
