//! An OTLP/HTTP trace receiver that records every span it is sent: the stand-in for a
//! collector, Tempo or Jaeger. It speaks `http/protobuf` (`POST /v1/traces` with an
//! `ExportTraceServiceRequest`), the transport the tests select with
//! `OTEL_EXPORTER_OTLP_PROTOCOL=http/protobuf`.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use anyhow::{Context, Result};
use axum::body::Bytes;
use axum::extract::State;
use axum::http::StatusCode;
use opentelemetry_proto::tonic::collector::trace::v1::{ExportTraceServiceRequest, ExportTraceServiceResponse};
use opentelemetry_proto::tonic::common::v1::any_value::Value as AnyValue;
use prost::Message as _;
use tokio::task::JoinHandle;

use crate::wait_until;

/// One exported span, flattened.
#[derive(Clone, Debug, PartialEq)]
pub struct RecordedSpan {
    /// `service.name` of the exporting process.
    pub service: String,
    /// `service.instance.id` of the exporting process, if any.
    pub instance: String,
    /// Trace id, lowercase hex.
    pub trace_id: String,
    /// Span id, lowercase hex.
    pub span_id: String,
    /// Parent span id, lowercase hex (empty for a root span).
    pub parent_span_id: String,
    /// Span name.
    pub name: String,
    /// OTLP span kind (1 internal, 2 server, 3 client, 4 producer, 5 consumer).
    pub kind: i32,
    /// Start, Unix nanoseconds.
    pub start_unix_nano: u64,
    /// End, Unix nanoseconds.
    pub end_unix_nano: u64,
    /// Attributes, values as text.
    pub attributes: BTreeMap<String, String>,
    /// Event names.
    pub events: Vec<String>,
    /// Status code (0 unset, 1 ok, 2 error).
    pub status: i32,
}

impl RecordedSpan {
    /// An attribute as text.
    pub fn attr(&self, key: &str) -> Option<&str> {
        self.attributes.get(key).map(String::as_str)
    }

    /// Duration in seconds.
    pub fn seconds(&self) -> f64 {
        self.end_unix_nano.saturating_sub(self.start_unix_nano) as f64 / 1e9
    }
}

#[derive(Default)]
struct Recorded {
    spans: Vec<RecordedSpan>,
    requests: u64,
}

/// The receiver, listening on a free port of 127.0.0.1. Stops on drop.
pub struct OtlpReceiver {
    addr: SocketAddr,
    state: Arc<Mutex<Recorded>>,
    task: JoinHandle<()>,
}

fn lock(m: &Mutex<Recorded>) -> MutexGuard<'_, Recorded> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

fn text(v: Option<&AnyValue>) -> String {
    match v {
        Some(AnyValue::StringValue(s)) => s.clone(),
        Some(AnyValue::BoolValue(b)) => b.to_string(),
        Some(AnyValue::IntValue(i)) => i.to_string(),
        Some(AnyValue::DoubleValue(d)) => d.to_string(),
        Some(other) => format!("{other:?}"),
        None => String::new(),
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn flatten(req: ExportTraceServiceRequest) -> Vec<RecordedSpan> {
    let mut out = Vec::new();
    for rs in req.resource_spans {
        let resource: BTreeMap<String, String> = rs
            .resource
            .map(|r| {
                r.attributes
                    .into_iter()
                    .map(|kv| (kv.key, text(kv.value.as_ref().and_then(|v| v.value.as_ref()))))
                    .collect()
            })
            .unwrap_or_default();
        for ss in rs.scope_spans {
            for s in ss.spans {
                out.push(RecordedSpan {
                    service: resource.get("service.name").cloned().unwrap_or_default(),
                    instance: resource.get("service.instance.id").cloned().unwrap_or_default(),
                    trace_id: hex(&s.trace_id),
                    span_id: hex(&s.span_id),
                    parent_span_id: hex(&s.parent_span_id),
                    name: s.name,
                    kind: s.kind,
                    start_unix_nano: s.start_time_unix_nano,
                    end_unix_nano: s.end_time_unix_nano,
                    attributes: s
                        .attributes
                        .into_iter()
                        .map(|kv| (kv.key, text(kv.value.as_ref().and_then(|v| v.value.as_ref()))))
                        .collect(),
                    events: s.events.into_iter().map(|e| e.name).collect(),
                    status: s.status.map_or(0, |st| st.code),
                });
            }
        }
    }
    out
}

async fn traces(State(state): State<Arc<Mutex<Recorded>>>, body: Bytes) -> (StatusCode, Vec<u8>) {
    match ExportTraceServiceRequest::decode(body.as_ref()) {
        Ok(req) => {
            let spans = flatten(req);
            let mut s = lock(&state);
            s.requests += 1;
            s.spans.extend(spans);
            (StatusCode::OK, ExportTraceServiceResponse::default().encode_to_vec())
        }
        Err(_) => (StatusCode::BAD_REQUEST, Vec::new()),
    }
}

impl OtlpReceiver {
    /// Starts listening.
    pub async fn start() -> Result<Self> {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.context("binding the OTLP receiver")?;
        let addr = listener.local_addr()?;
        let state = Arc::new(Mutex::new(Recorded::default()));
        let app = axum::Router::new()
            .route("/v1/traces", axum::routing::post(traces))
            .layer(axum::extract::DefaultBodyLimit::max(64 << 20))
            .with_state(Arc::clone(&state));
        let task = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        Ok(Self { addr, state, task })
    }

    /// `http://127.0.0.1:PORT`, for `OTEL_EXPORTER_OTLP_ENDPOINT`.
    pub fn endpoint(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// The environment that makes a Fieldgate process export here quickly: OTLP over
    /// HTTP/protobuf, batches every 100 ms.
    pub fn env(&self) -> Vec<(String, String)> {
        vec![
            ("OTEL_EXPORTER_OTLP_ENDPOINT".into(), self.endpoint()),
            ("OTEL_EXPORTER_OTLP_PROTOCOL".into(), "http/protobuf".into()),
            ("OTEL_BSP_SCHEDULE_DELAY".into(), "100".into()),
        ]
    }

    /// Every span received so far.
    pub fn spans(&self) -> Vec<RecordedSpan> {
        lock(&self.state).spans.clone()
    }

    /// Export requests received so far.
    pub fn requests(&self) -> u64 {
        lock(&self.state).requests
    }

    /// Waits until `cond` holds for the spans received so far.
    pub async fn wait_for<T, F>(&self, what: &str, timeout: Duration, mut cond: F) -> Result<T>
    where
        F: FnMut(&[RecordedSpan]) -> Option<T>,
    {
        let state = Arc::clone(&self.state);
        wait_until(what, timeout, || {
            let r = cond(&lock(&state).spans);
            async move { Ok(r) }
        })
        .await
        .with_context(|| format!("{} spans received", lock(&self.state).spans.len()))
    }
}

impl Drop for OtlpReceiver {
    fn drop(&mut self) {
        self.task.abort();
    }
}
