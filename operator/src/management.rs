//! The management HTTP server (axum): `/metrics`, `/healthz`, `/readyz`.
//!
//! Ready means the watch caches are filled, on the leader and on standby replicas alike: a
//! standby is a warm spare, not a broken pod.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;
use prometheus_client::registry::Registry;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

/// What the management server shows.
pub struct Management {
    registry: Registry,
    ready: AtomicBool,
}

impl Management {
    /// A server state over the operator's registry; not ready until [`Management::set_ready`].
    pub fn new(registry: Registry) -> Arc<Self> {
        Arc::new(Self { registry, ready: AtomicBool::new(false) })
    }

    /// Marks the operator ready or not.
    pub fn set_ready(&self, ready: bool) {
        self.ready.store(ready, Ordering::SeqCst);
    }
}

async fn metrics(State(m): State<Arc<Management>>) -> impl IntoResponse {
    let mut body = String::new();
    match prometheus_client::encoding::text::encode(&mut body, &m.registry) {
        Ok(()) => (
            StatusCode::OK,
            [(header::CONTENT_TYPE, "application/openmetrics-text; version=1.0.0; charset=utf-8")],
            body,
        ),
        Err(e) => (
            StatusCode::INTERNAL_SERVER_ERROR,
            [(header::CONTENT_TYPE, "text/plain; charset=utf-8")],
            format!("encoding metrics failed: {e}\n"),
        ),
    }
}

async fn ready(State(m): State<Arc<Management>>) -> impl IntoResponse {
    if m.ready.load(Ordering::SeqCst) {
        (StatusCode::OK, "ready\n")
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "not ready\n")
    }
}

/// The routes.
pub fn router(m: Arc<Management>) -> Router {
    Router::new()
        .route("/metrics", get(metrics))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(ready))
        .with_state(m)
}

/// Serves until `cancel` fires.
pub async fn serve(listener: TcpListener, m: Arc<Management>, cancel: CancellationToken) -> std::io::Result<()> {
    axum::serve(listener, router(m)).with_graceful_shutdown(async move { cancel.cancelled().await }).await
}
