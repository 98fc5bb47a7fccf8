//! Logs and traces of the operator.
//!
//! Logs go to stderr as text or JSON, filtered by `RUST_LOG` (default `info`). Traces are
//! exported over OTLP when the standard variables ask for it (`OTEL_EXPORTER_OTLP_ENDPOINT` or
//! `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`, or `OTEL_TRACES_EXPORTER=otlp`; `OTEL_SDK_DISABLED=true`
//! or `OTEL_TRACES_EXPORTER=none` turn it off): every reconcile is one trace
//! (`fieldgate.operator.reconcile`, see [`crate::controller::run`]), with the operator's
//! `tracing` spans inside it. Without those variables nothing is exported and nothing changes.

use std::time::Duration;

use opentelemetry::KeyValue;
use opentelemetry::trace::TracerProvider as _;
use opentelemetry_sdk::trace::SdkTracerProvider;
use tracing_subscriber::layer::SubscriberExt as _;
use tracing_subscriber::util::SubscriberInitExt as _;
use tracing_subscriber::{EnvFilter, Layer as _};

fn env(name: &str) -> Option<String> {
    std::env::var(name).ok().map(|v| v.trim().to_string()).filter(|v| !v.is_empty())
}

/// Whether the standard `OTEL_*` variables ask for OTLP trace export.
pub fn otlp_configured() -> bool {
    if env("OTEL_SDK_DISABLED").is_some_and(|v| v.eq_ignore_ascii_case("true")) {
        return false;
    }
    match env("OTEL_TRACES_EXPORTER").map(|v| v.to_ascii_lowercase()) {
        Some(v) if v == "none" => false,
        Some(v) if v == "otlp" => true,
        _ => env("OTEL_EXPORTER_OTLP_ENDPOINT").is_some() || env("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT").is_some(),
    }
}

/// The trace pipeline; [`Telemetry::shutdown`] exports what is left.
#[must_use = "call shutdown at the end, or the last spans are lost"]
pub struct Telemetry {
    provider: Option<SdkTracerProvider>,
}

fn provider() -> Option<SdkTracerProvider> {
    if !otlp_configured() {
        return None;
    }
    let exporter = match opentelemetry_otlp::SpanExporter::builder().build() {
        Ok(e) => e,
        Err(e) => {
            eprintln!("fieldgate-operator: OTLP trace exporter not configured correctly ({e}); tracing stays off");
            return None;
        }
    };
    let mut resource = opentelemetry_sdk::Resource::builder()
        .with_attribute(KeyValue::new("service.version", env!("CARGO_PKG_VERSION")));
    if let Some(pod) = env("POD_NAME") {
        resource = resource.with_attribute(KeyValue::new("service.instance.id", pod));
    }
    if env("OTEL_SERVICE_NAME").is_none() {
        resource = resource.with_service_name("fieldgate-operator");
    }
    let processor = opentelemetry_sdk::trace::span_processor_with_async_runtime::BatchSpanProcessor::builder(
        exporter,
        opentelemetry_sdk::runtime::Tokio,
    )
    .build();
    Some(SdkTracerProvider::builder().with_span_processor(processor).with_resource(resource.build()).build())
}

/// Installs the log subscriber (and the OTLP trace layer when configured). Call once, inside
/// the Tokio runtime (the exporter runs on it).
pub fn init(format: &str) -> Telemetry {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into());
    let fmt = tracing_subscriber::fmt::layer().with_writer(std::io::stderr);
    let fmt = if format == "json" { fmt.json().boxed() } else { fmt.boxed() };
    let provider = provider();
    let otel = provider.as_ref().map(|p| tracing_opentelemetry::layer().with_tracer(p.tracer("fieldgate-operator")));
    tracing_subscriber::registry().with(filter).with(fmt).with(otel).init();
    if provider.is_some() {
        tracing::info!("exporting traces over OTLP");
    }
    Telemetry { provider }
}

impl Telemetry {
    /// Exports the spans still queued (at most `timeout`) and stops the pipeline.
    pub async fn shutdown(self, timeout: Duration) {
        let Some(provider) = self.provider else { return };
        let done = tokio::task::spawn_blocking(move || provider.shutdown_with_timeout(timeout));
        let _ = tokio::time::timeout(timeout + Duration::from_secs(1), done).await;
    }
}
