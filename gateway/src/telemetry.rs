//! Telemetry: logs (text or JSON, level changeable at run time) and OpenTelemetry traces
//! exported over OTLP.
//!
//! # One trace per reading
//!
//! A sampled reading is one trace, a chain of spans each the parent of the next:
//!
//! ```text
//! fieldgate.device.read | fieldgate.device.receive   (root, in the adapter)
//! └ fieldgate.decode                                  (adapter)
//!   └ fieldgate.buffer.append     (producer)          (buffer writer: publish until JetStream's PubAck)
//!     └ fieldgate.buffer.wait     (consumer)          (uplink: from the JetStream timestamp to the pull;
//!       │                                              one per delivery attempt)
//!       └ fieldgate.uplink.publish (producer)         (uplink: MQTT publish until the broker's PUBACK,
//!                                                      event `mqtt.puback`)
//! ```
//!
//! The W3C trace context of `fieldgate.buffer.append` travels in the JetStream message header
//! `traceparent`, so the chain survives a cloud outage, a gateway crash and redelivery (the
//! redelivered entry starts a new `fieldgate.buffer.wait` under the same append span). The
//! context of `fieldgate.uplink.publish` leaves the gateway as the MQTT v5 user property
//! `traceparent`, so the cloud side can continue the trace. MQTT 3.1.1 has no properties: on a
//! `protocolVersion: 3` uplink the trace ends at the gateway (the reading id in the payload
//! still correlates the cloud message with the `fieldgate.reading.id` span attribute).
//!
//! # Cost
//!
//! Tracing is off unless an OTLP exporter is configured with the standard environment variables
//! (`OTEL_EXPORTER_OTLP_ENDPOINT` or `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`, or
//! `OTEL_TRACES_EXPORTER=otlp`; `OTEL_SDK_DISABLED=true` or `OTEL_TRACES_EXPORTER=none` turn it
//! off). Off, every helper here is one atomic load and returns a value holding `None`. On, an
//! unsampled reading costs one sampling decision (a random id compared with the ratio) and
//! allocates nothing; it carries no `traceparent` header. Only sampled readings build spans.
//!
//! The sampling ratio is `--trace-sample-ratio` (env `FIELDGATE_TRACE_SAMPLE_RATIO`); without
//! it the standard `OTEL_TRACES_SAMPLER`/`OTEL_TRACES_SAMPLER_ARG` apply, and without those
//! 1% of readings are traced (`parentbased_traceidratio`, 0.01).
//!
//! The tracer is process-wide, like the log subscriber it sits next to: adapters, the buffer
//! writer and the uplinks reach it without a handle. Metrics stay in the one registry passed
//! down ([`crate::metrics`]).
//!
//! # Using the span helpers in an adapter
//!
//! ```ignore
//! let mut trace = ReadingTrace::read(&task.key(), protocol);   // or ReadingTrace::receive(..)
//! // ... talk to the device; on failure: trace.failed("timeout") ...
//! trace.decoding();                                            // the device I/O is done
//! // ... decode into a Reading ...
//! task.emit_traced(reading, trace).await                       // or emit_confirmed_traced
//! ```
//!
//! A device that sends its own W3C context (MQTT v5 user property, CoAP option, a header) can
//! continue it: `ReadingTrace::receive_with_parent(&key, protocol, Some(traceparent))`.

use std::fmt;
use std::sync::{Arc, Mutex, OnceLock, PoisonError};
use std::time::{Duration, SystemTime};

use opentelemetry::trace::{
    Span as _, SpanContext, SpanId, SpanKind, Status, TraceContextExt as _, TraceFlags, TraceId, TraceState,
    Tracer as _,
};
use opentelemetry::{Context, KeyValue};
use opentelemetry_sdk::trace::{Sampler, SdkTracer, SdkTracerProvider, Span};
use tracing::{info, warn};
use tracing_subscriber::layer::SubscriberExt as _;
use tracing_subscriber::util::SubscriberInitExt as _;
use tracing_subscriber::{EnvFilter, Layer as _, Registry, reload};

use crate::metrics::Metrics;

mod recent;
pub use recent::{RecentWarnings, Warning};

// ---------------------------------------------------------------------------------------------
// Logs

/// The log filter without `RUST_LOG`. tokio-modbus logs every undecodable byte of a noisy
/// line at warn/error; the Modbus adapters count those themselves (`bad_frame`). async-nats
/// logs every event at info ("client error: nats: IO error" on each reconnect attempt, without
/// the address or the cause); the gateway logs NATS state changes itself.
const DEFAULT_FILTER: &str = "info,tokio_modbus=off,async_nats=warn";

/// Changes the log filter of the running process (`RUST_LOG` syntax), and holds the last
/// warnings it logged.
#[derive(Clone)]
pub struct LogControl {
    handle: reload::Handle<EnvFilter, Registry>,
    current: Arc<Mutex<String>>,
    recent: RecentWarnings,
}

impl fmt::Debug for LogControl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LogControl").field("level", &self.level()).finish()
    }
}

/// A log filter that does not parse.
#[derive(Debug, thiserror::Error)]
#[error("invalid log filter {filter:?}: {message}")]
pub struct LogFilterError {
    /// The filter given.
    pub filter: String,
    /// Why it does not parse.
    pub message: String,
}

/// Longest log filter accepted at run time.
pub const MAX_FILTER_LEN: usize = 1024;

impl LogControl {
    /// The filter in force.
    pub fn level(&self) -> String {
        self.current.lock().unwrap_or_else(PoisonError::into_inner).clone()
    }

    /// Replaces the filter, such as `debug` or `info,fieldgate_gateway::uplinks=debug`.
    pub fn set_level(&self, filter: &str) -> Result<(), LogFilterError> {
        let filter = filter.trim();
        let parsed = parse_filter(filter)?;
        self.handle
            .reload(parsed)
            .map_err(|e| LogFilterError { filter: filter.to_string(), message: e.to_string() })?;
        *self.current.lock().unwrap_or_else(PoisonError::into_inner) = filter.to_string();
        Ok(())
    }

    /// The last warnings and errors logged, oldest first.
    pub fn recent_warnings(&self) -> Vec<Warning> {
        self.recent.snapshot()
    }
}

/// Parses a log filter given at run time (`RUST_LOG` syntax, at most [`MAX_FILTER_LEN`]).
pub fn parse_filter(filter: &str) -> Result<EnvFilter, LogFilterError> {
    let err = |message: String| LogFilterError { filter: filter.to_string(), message };
    if filter.is_empty() || filter.len() > MAX_FILTER_LEN {
        return Err(err(format!("must be 1 to {MAX_FILTER_LEN} characters")));
    }
    // Field values in `[span{field=value}]` directives are matched as text, not compiled as
    // regular expressions: a filter from the API must not cost seconds of CPU to parse.
    let builder = EnvFilter::builder().with_regex(false);
    // Two directives that differ only in their level replace each other (the last one wins).
    // That is done here, before tracing-subscriber's directive set sees them: for a field value
    // matched as text its equality and its ordering disagree, which fails an internal
    // assertion in builds with debug assertions (found by the `management` fuzz target).
    // Each directive is trimmed first: tracing-subscriber walks a directive's trimmed text but
    // slices the untrimmed one, which panics (in every build) when leading whitespace shifts
    // an index into a multi-byte character (found by the `management` fuzz target).
    let mut kept: Vec<(String, &str)> = Vec::new();
    for directive in filter.split(',').map(str::trim).filter(|d| !d.is_empty()) {
        let shown = builder.parse(directive).map_err(|e| err(e.to_string()))?.to_string();
        // `target[span{field=value}]=level`, or a bare level: what precedes the level.
        let key = shown.rsplit_once('=').map_or(String::new(), |(key, _)| key.to_string());
        kept.retain(|(k, _)| *k != key);
        kept.push((key, directive));
    }
    let deduplicated = kept.iter().map(|(_, d)| *d).collect::<Vec<_>>().join(",");
    builder.parse(deduplicated).map_err(|e| err(e.to_string()))
}

/// Installs the process's log subscriber: `RUST_LOG` (default [`DEFAULT_FILTER`]) filters, `format` is
/// `text` or `json`, lines go to stderr. Call once, at start-up.
pub fn init_logs(format: &str) -> LogControl {
    use std::io::IsTerminal;
    let initial =
        std::env::var("RUST_LOG").ok().filter(|s| !s.trim().is_empty()).unwrap_or_else(|| DEFAULT_FILTER.into());
    let (filter, text) = match EnvFilter::builder().parse(&initial) {
        Ok(f) => (f, initial),
        Err(e) => {
            eprintln!("fieldgate-gateway: ignoring RUST_LOG={initial:?}: {e}");
            (EnvFilter::new(DEFAULT_FILTER), DEFAULT_FILTER.to_string())
        }
    };
    let (filter, handle) = reload::Layer::new(filter);
    let fmt = tracing_subscriber::fmt::layer().with_ansi(std::io::stderr().is_terminal()).with_writer(std::io::stderr);
    let fmt = if format == "json" { fmt.json().boxed() } else { fmt.boxed() };
    let recent = RecentWarnings::default();
    tracing_subscriber::registry().with(filter).with(fmt).with(recent.clone()).init();
    LogControl { handle, current: Arc::new(Mutex::new(text)), recent }
}

/// Lets one log line through per period and counts the ones held back: for failures that
/// can repeat on every poll (metrics count each one; the log says it is still happening).
#[derive(Debug)]
pub struct LogThrottle {
    every: Duration,
    next: Option<tokio::time::Instant>,
    suppressed: u64,
}

impl LogThrottle {
    /// At most one line per `every`.
    pub fn new(every: Duration) -> Self {
        Self { every, next: None, suppressed: 0 }
    }

    /// `Some(n)` when a line may be written now, `n` being how many were held back since the
    /// last one; `None` (and counted) otherwise.
    pub fn allow(&mut self) -> Option<u64> {
        let now = tokio::time::Instant::now();
        if self.next.is_some_and(|next| now < next) {
            self.suppressed += 1;
            return None;
        }
        self.next = Some(now + self.every);
        Some(std::mem::take(&mut self.suppressed))
    }
}

// ---------------------------------------------------------------------------------------------
// Traces: set-up

/// Trace settings on the command line (the OTLP exporter itself reads the `OTEL_*` variables).
#[derive(Clone, Debug, Default, clap::Args)]
pub struct TraceArgs {
    /// Fraction of readings traced end to end (0 to 1), when an OTLP exporter is configured.
    /// Default: `OTEL_TRACES_SAMPLER`/`OTEL_TRACES_SAMPLER_ARG`, else 0.01.
    #[arg(long, env = "FIELDGATE_TRACE_SAMPLE_RATIO", value_parser = parse_ratio)]
    pub trace_sample_ratio: Option<f64>,
}

fn parse_ratio(s: &str) -> Result<f64, String> {
    let r: f64 = s.trim().parse().map_err(|_| format!("{s:?} is not a number"))?;
    if (0.0..=1.0).contains(&r) { Ok(r) } else { Err(format!("{r} is not between 0 and 1")) }
}

/// Default share of readings traced when nothing says otherwise.
pub const DEFAULT_SAMPLE_RATIO: f64 = 0.01;

static TRACER: OnceLock<SdkTracer> = OnceLock::new();

fn tracer() -> Option<&'static SdkTracer> {
    TRACER.get()
}

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

#[cfg_attr(not(feature = "otlp"), allow(dead_code))]
fn sampler(args: &TraceArgs) -> Option<Sampler> {
    let ratio = match (args.trace_sample_ratio, env("OTEL_TRACES_SAMPLER")) {
        (Some(r), _) => r,
        // The SDK reads OTEL_TRACES_SAMPLER and its argument itself.
        (None, Some(_)) => return None,
        (None, None) => {
            env("OTEL_TRACES_SAMPLER_ARG").and_then(|a| parse_ratio(&a).ok()).unwrap_or(DEFAULT_SAMPLE_RATIO)
        }
    };
    Some(Sampler::ParentBased(Box::new(Sampler::TraceIdRatioBased(ratio))))
}

/// The trace pipeline of the process; [`Traces::shutdown`] exports what is left.
#[must_use = "keep it until the end and call shutdown, or the last spans are lost"]
pub struct Traces {
    provider: Option<SdkTracerProvider>,
}

impl Traces {
    /// Starts OTLP trace export if the `OTEL_*` variables configure it (see the module doc);
    /// otherwise does nothing. Never fails the gateway: a broken exporter setting is logged
    /// and tracing stays off. Call once, inside the Tokio runtime.
    pub fn init(args: &TraceArgs, service: &'static str, instance: &str) -> Self {
        if !otlp_configured() {
            return Self { provider: None };
        }
        #[cfg(not(feature = "otlp"))]
        {
            let _ = (args, service, instance);
            warn!(
                "OTEL_* variables ask for OTLP trace export, but this gateway was built without the `otlp` feature; tracing stays off"
            );
            Self { provider: None }
        }
        #[cfg(feature = "otlp")]
        Self::export(args, service, instance)
    }

    /// Starts the OTLP exporter and the pipeline around it.
    #[cfg(feature = "otlp")]
    fn export(args: &TraceArgs, service: &'static str, instance: &str) -> Self {
        let exporter = match opentelemetry_otlp::SpanExporter::builder().build() {
            Ok(e) => e,
            Err(e) => {
                warn!(error = %e, "OTLP trace exporter not configured correctly; tracing stays off");
                return Self { provider: None };
            }
        };
        let mut resource = opentelemetry_sdk::Resource::builder()
            .with_attribute(KeyValue::new("service.instance.id", instance.to_string()))
            .with_attribute(KeyValue::new("service.version", env!("CARGO_PKG_VERSION")));
        if env("OTEL_SERVICE_NAME").is_none() {
            resource = resource.with_service_name(service);
        }
        let processor = opentelemetry_sdk::trace::span_processor_with_async_runtime::BatchSpanProcessor::builder(
            exporter,
            opentelemetry_sdk::runtime::Tokio,
        )
        .build();
        let mut builder = SdkTracerProvider::builder().with_span_processor(processor).with_resource(resource.build());
        if let Some(s) = sampler(args) {
            builder = builder.with_sampler(s);
        }
        let provider = builder.build();
        use opentelemetry::trace::TracerProvider as _;
        let tracer = provider.tracer("fieldgate-gateway");
        if TRACER.set(tracer).is_err() {
            warn!("tracing was already initialised; keeping the first pipeline");
        }
        info!(ratio = ?args.trace_sample_ratio, "exporting traces over OTLP");
        Self { provider: Some(provider) }
    }

    /// Whether spans are exported.
    pub fn enabled(&self) -> bool {
        self.provider.is_some()
    }

    /// Exports the spans still queued (at most `timeout`), then stops the pipeline.
    pub async fn shutdown(self, timeout: Duration) {
        let Some(provider) = self.provider else { return };
        // The batch processor runs on this runtime: block a pool thread, not a worker.
        let done = tokio::task::spawn_blocking(move || provider.shutdown_with_timeout(timeout));
        match tokio::time::timeout(timeout + Duration::from_secs(1), done).await {
            Ok(Ok(Ok(()))) => {}
            Ok(Ok(Err(e))) => warn!(error = %e, "trace export at shutdown failed"),
            _ => warn!("trace export at shutdown did not finish in time"),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// W3C trace context

/// Name of the header (NATS) and user property (MQTT v5) carrying the W3C trace context.
pub const TRACEPARENT: &str = "traceparent";

/// A W3C `traceparent`: the span a message continues from. Copy, no allocation.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TraceParent {
    /// Trace id.
    pub trace_id: TraceId,
    /// Parent span id.
    pub span_id: SpanId,
    /// Trace flags (bit 0: sampled).
    pub flags: TraceFlags,
}

/// The 55 characters of a version-00 `traceparent`, on the stack.
#[derive(Clone, Copy)]
pub struct TraceparentText([u8; 55]);

impl TraceparentText {
    /// The text.
    pub fn as_str(&self) -> &str {
        // Built from ASCII hex digits and dashes only.
        std::str::from_utf8(&self.0).unwrap_or_default()
    }
}

impl fmt::Debug for TraceparentText {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

fn hex_into(out: &mut [u8], bytes: &[u8]) {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    for (i, b) in bytes.iter().enumerate() {
        out[2 * i] = HEX[usize::from(b >> 4)];
        out[2 * i + 1] = HEX[usize::from(b & 0xf)];
    }
}

fn parse_hex<const N: usize>(s: &str) -> Option<[u8; N]> {
    if s.len() != 2 * N {
        return None;
    }
    let mut out = [0u8; N];
    let digits = s.as_bytes();
    for i in 0..N {
        let d = |c: u8| match c {
            b'0'..=b'9' => Some(c - b'0'),
            b'a'..=b'f' => Some(c - b'a' + 10),
            _ => None,
        };
        out[i] = (d(digits[2 * i])? << 4) | d(digits[2 * i + 1])?;
    }
    Some(out)
}

impl TraceParent {
    /// Parses a `traceparent` (W3C Trace Context level 1: lowercase hex, ids not all zero,
    /// version `ff` refused, later versions read by their first four fields).
    pub fn parse(s: &str) -> Option<Self> {
        let s = s.trim();
        let mut parts = s.split('-');
        let version = parse_hex::<1>(parts.next()?)?[0];
        let trace_id = parse_hex::<16>(parts.next()?)?;
        let span_id = parse_hex::<8>(parts.next()?)?;
        let flags = parse_hex::<1>(parts.next()?)?[0];
        let rest = parts.next();
        if version == 0xff || (version == 0 && rest.is_some()) {
            return None;
        }
        let trace_id = TraceId::from_bytes(trace_id);
        let span_id = SpanId::from_bytes(span_id);
        if trace_id == TraceId::INVALID || span_id == SpanId::INVALID {
            return None;
        }
        Some(Self { trace_id, span_id, flags: TraceFlags::new(flags & 1) })
    }

    /// The version-00 text form.
    pub fn text(&self) -> TraceparentText {
        let mut out = [b'-'; 55];
        out[0] = b'0';
        out[1] = b'0';
        hex_into(&mut out[3..35], &self.trace_id.to_bytes());
        hex_into(&mut out[36..52], &self.span_id.to_bytes());
        hex_into(&mut out[53..55], &[self.flags.to_u8()]);
        TraceparentText(out)
    }

    /// Whether the parent was sampled.
    pub fn is_sampled(&self) -> bool {
        self.flags.is_sampled()
    }

    fn of(span: &Span) -> Self {
        let sc = span.span_context();
        Self { trace_id: sc.trace_id(), span_id: sc.span_id(), flags: sc.trace_flags() }
    }

    fn context(&self, remote: bool) -> Context {
        Context::new().with_remote_span_context(SpanContext::new(
            self.trace_id,
            self.span_id,
            self.flags,
            remote,
            TraceState::NONE,
        ))
    }
}

// ---------------------------------------------------------------------------------------------
// Spans of a reading

/// A span that may not exist: `None` when tracing is off or the reading is not sampled.
#[derive(Debug, Default)]
pub struct StageSpan(Option<Span>);

impl StageSpan {
    fn start(
        name: &'static str,
        kind: SpanKind,
        parent: Option<(TraceParent, bool)>,
        start: Option<SystemTime>,
    ) -> Self {
        let Some(tracer) = tracer() else { return Self(None) };
        let mut builder = tracer.span_builder(name).with_kind(kind);
        if let Some(t) = start {
            builder = builder.with_start_time(t);
        }
        let span = match parent {
            Some((p, remote)) => builder.start_with_context(tracer, &p.context(remote)),
            None => builder.start_with_context(tracer, &Context::new()),
        };
        if span.is_recording() { Self(Some(span)) } else { Self(None) }
    }

    /// Whether this span is recorded (tracing on, reading sampled).
    pub fn is_recording(&self) -> bool {
        self.0.is_some()
    }

    /// The context children continue from.
    pub fn parent(&self) -> Option<TraceParent> {
        self.0.as_ref().map(TraceParent::of)
    }

    /// The `traceparent` to send along, when recorded.
    pub fn traceparent(&self) -> Option<TraceparentText> {
        self.parent().map(|p| p.text())
    }

    /// Sets attributes, built only when recorded.
    pub fn attributes(&mut self, make: impl FnOnce() -> Vec<KeyValue>) {
        if let Some(s) = &mut self.0 {
            s.set_attributes(make());
        }
    }

    /// Adds an event, built only when recorded.
    pub fn event(&mut self, name: &'static str, make: impl FnOnce() -> Vec<KeyValue>) {
        if let Some(s) = &mut self.0 {
            s.add_event(name, make());
        }
    }

    /// Marks the span failed with a static reason (an error kind or a drop reason).
    pub fn fail(&mut self, reason: &'static str) {
        if let Some(s) = &mut self.0 {
            s.set_status(Status::error(reason));
            s.set_attribute(KeyValue::new("fieldgate.error.kind", reason));
        }
    }

    /// Marks the span successful.
    pub fn ok(&mut self) {
        if let Some(s) = &mut self.0 {
            s.set_status(Status::Ok);
        }
    }

    /// Ends the span now (also done on drop).
    pub fn end(mut self) {
        if let Some(s) = &mut self.0 {
            s.end();
        }
    }

    fn end_at(&mut self, t: SystemTime) {
        if let Some(s) = &mut self.0 {
            s.end_with_timestamp(t);
        }
    }
}

/// What the adapter hands to the buffer writer with a sampled reading.
#[derive(Clone, Copy, Debug)]
pub struct TraceHandoff {
    /// The span the append continues from (`fieldgate.decode`).
    pub parent: TraceParent,
    /// When the adapter handed the reading over (the append span starts here, so time in the
    /// writer's queue is part of it).
    pub at: SystemTime,
}

/// The adapter's part of a reading's trace: the root span (`fieldgate.device.read` or
/// `fieldgate.device.receive`) and its `fieldgate.decode` child.
#[derive(Debug)]
pub struct ReadingTrace {
    root: StageSpan,
    decode: StageSpan,
}

fn device_attributes(device: &str, protocol: &'static str) -> Vec<KeyValue> {
    vec![KeyValue::new("fieldgate.device", device.to_string()), KeyValue::new("fieldgate.protocol", protocol)]
}

impl ReadingTrace {
    /// A reading the gateway polls for (Modbus, CoAP GET): the root span starts now.
    pub fn read(device: &str, protocol: &'static str) -> Self {
        Self::begin("fieldgate.device.read", SpanKind::Client, device, protocol, None)
    }

    /// A reading the device pushes (CoAP, MQTT, TCP, UDP listeners): the root span starts now.
    pub fn receive(device: &str, protocol: &'static str) -> Self {
        Self::begin("fieldgate.device.receive", SpanKind::Server, device, protocol, None)
    }

    /// A pushed reading that carries its sender's W3C `traceparent`: continues that trace
    /// (sampled as the sender decided); an absent or malformed one starts a new trace.
    pub fn receive_with_parent(device: &str, protocol: &'static str, traceparent: Option<&str>) -> Self {
        let parent = traceparent.and_then(TraceParent::parse);
        Self::begin("fieldgate.device.receive", SpanKind::Server, device, protocol, parent)
    }

    /// No trace (tests, tools).
    pub fn none() -> Self {
        Self { root: StageSpan(None), decode: StageSpan(None) }
    }

    fn begin(
        name: &'static str,
        kind: SpanKind,
        device: &str,
        protocol: &'static str,
        parent: Option<TraceParent>,
    ) -> Self {
        let mut root = StageSpan::start(name, kind, parent.map(|p| (p, true)), None);
        root.attributes(|| device_attributes(device, protocol));
        Self { root, decode: StageSpan(None) }
    }

    /// Whether this reading is traced.
    pub fn is_recording(&self) -> bool {
        self.root.is_recording()
    }

    /// Records a failed request to the device (an error kind such as `timeout`).
    pub fn failed(&mut self, kind: &'static str) {
        self.root.fail(kind);
    }

    /// The device I/O is done: ends the root span and starts `fieldgate.decode`.
    pub fn decoding(&mut self) {
        if !self.root.is_recording() || self.decode.is_recording() {
            return;
        }
        let parent = self.root.parent();
        if let Some(s) = &mut self.root.0 {
            s.end();
        }
        self.decode = StageSpan::start("fieldgate.decode", SpanKind::Internal, parent.map(|p| (p, false)), None);
    }

    /// The reading is ready: ends the spans and returns what the buffer writer continues from
    /// (`None` when not sampled). `id` is the reading id, recorded on the spans.
    pub fn finish(mut self, id: &str, points: usize) -> Option<TraceHandoff> {
        if !self.root.is_recording() {
            return None;
        }
        let attrs = || {
            vec![
                KeyValue::new("fieldgate.reading.id", id.to_string()),
                KeyValue::new("fieldgate.points", points as i64),
            ]
        };
        if !self.decode.is_recording() {
            // Not ended yet: it gets the reading's id too.
            self.root.attributes(attrs);
        }
        self.decoding();
        self.decode.attributes(attrs);
        let parent = self.decode.parent()?;
        self.decode.end();
        Some(TraceHandoff { parent, at: SystemTime::now() })
    }
}

/// `fieldgate.buffer.append`: from the hand-over to JetStream's PubAck, for one uplink buffer.
pub fn append_span(handoff: Option<&TraceHandoff>, uplink: &str, subject: &str, id: &str) -> StageSpan {
    let Some(h) = handoff else { return StageSpan(None) };
    let mut span = StageSpan::start("fieldgate.buffer.append", SpanKind::Producer, Some((h.parent, false)), Some(h.at));
    span.attributes(|| {
        vec![
            KeyValue::new("fieldgate.uplink", uplink.to_string()),
            KeyValue::new("fieldgate.reading.id", id.to_string()),
            KeyValue::new("messaging.system", "nats"),
            KeyValue::new("messaging.operation.type", "send"),
            KeyValue::new("messaging.destination.name", subject.to_string()),
        ]
    });
    span
}

/// A JetStream entry pulled by an uplink.
#[derive(Clone, Copy, Debug)]
pub struct BufferEntry<'a> {
    /// Its `traceparent` header, if any.
    pub traceparent: Option<&'a str>,
    /// When JetStream stored it.
    pub stored: SystemTime,
    /// Stream sequence.
    pub seq: u64,
    /// Delivery attempt (1 the first time).
    pub delivered: i64,
}

/// `fieldgate.buffer.wait` (from the JetStream timestamp to now, ended at once) and the
/// `fieldgate.uplink.publish` span under it, started now. Both `None` for an entry without a
/// sampled `traceparent` or with tracing off.
pub fn delivery_spans(entry: BufferEntry<'_>, uplink: &str) -> StageSpan {
    if tracer().is_none() {
        return StageSpan(None);
    }
    let Some(parent) = entry.traceparent.and_then(TraceParent::parse).filter(TraceParent::is_sampled) else {
        return StageSpan(None);
    };
    let now = SystemTime::now();
    let mut wait = StageSpan::start(
        "fieldgate.buffer.wait",
        SpanKind::Consumer,
        Some((parent, true)),
        Some(entry.stored.min(now)),
    );
    wait.attributes(|| {
        vec![
            KeyValue::new("fieldgate.uplink", uplink.to_string()),
            KeyValue::new("messaging.system", "nats"),
            KeyValue::new("messaging.operation.type", "receive"),
            KeyValue::new("fieldgate.buffer.seq", i64::try_from(entry.seq).unwrap_or(i64::MAX)),
            KeyValue::new("fieldgate.delivery.attempt", entry.delivered),
        ]
    });
    let wait_ctx = wait.parent();
    wait.end_at(now);
    let mut publish =
        StageSpan::start("fieldgate.uplink.publish", SpanKind::Producer, wait_ctx.map(|p| (p, false)), Some(now));
    publish.attributes(|| {
        vec![
            KeyValue::new("fieldgate.uplink", uplink.to_string()),
            KeyValue::new("messaging.system", "mqtt"),
            KeyValue::new("messaging.operation.type", "send"),
            KeyValue::new("fieldgate.delivery.attempt", entry.delivered),
        ]
    });
    publish
}

// ---------------------------------------------------------------------------------------------
// Commands (cloud -> device)

/// The span of one step of a command from the cloud (`fieldgate.command.receive`,
/// `fieldgate.command.execute`, ...). `traceparent` is the context the step continues from:
/// the cloud's MQTT v5 user property `traceparent` for the first step, the JetStream header
/// for the next one (carry [`StageSpan::traceparent`] along); without one a new trace starts,
/// sampled like readings. `None` inside when not recorded.
pub fn command_span(name: &'static str, kind: SpanKind, traceparent: Option<&str>, device: &str) -> StageSpan {
    if tracer().is_none() {
        return StageSpan(None);
    }
    let parent = traceparent.and_then(TraceParent::parse);
    let mut span = StageSpan::start(name, kind, parent.map(|p| (p, true)), None);
    span.attributes(|| vec![KeyValue::new("fieldgate.device", device.to_string())]);
    span
}

/// A child of `parent` in this process (such as `fieldgate.device.write` and
/// `fieldgate.device.readback` under `fieldgate.command.execute`); `None` inside when the
/// parent is not recorded.
pub fn child_span(parent: &StageSpan, name: &'static str, kind: SpanKind) -> StageSpan {
    child_of(parent.parent(), name, kind)
}

/// A child of the span `parent` names, in this process (handed to another task, such as a
/// device adapter executing a command); `None` inside when there is no parent.
pub fn child_of(parent: Option<TraceParent>, name: &'static str, kind: SpanKind) -> StageSpan {
    match parent {
        Some(p) => StageSpan::start(name, kind, Some((p, false)), None),
        None => StageSpan(None),
    }
}

// ---------------------------------------------------------------------------------------------
// NATS connection state

/// An `async_nats` event callback that keeps `fieldgate_buffer_connected` and
/// `fieldgate_buffer_connects_total` and logs the transitions:
/// `ConnectOptions::new().event_callback(telemetry::nats_events(metrics))`.
pub fn nats_events(
    metrics: Arc<Metrics>,
) -> impl Fn(async_nats::Event) -> std::future::Ready<()> + Send + Sync + 'static {
    move |event| {
        match event {
            async_nats::Event::Connected => {
                if metrics.buffer_connects.get() > 0 {
                    info!("NATS connection restored");
                }
                metrics.buffer_connected.set(1);
                metrics.buffer_connects.inc();
            }
            async_nats::Event::Disconnected => {
                metrics.buffer_connected.set(0);
                warn!("NATS connection lost; reconnecting");
            }
            other => tracing::debug!(event = %other, "NATS event"),
        }
        std::future::ready(())
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    /// Found by the `management` fuzz target: a filter whose span field value, compiled as a
    /// regular expression, took 103 s of CPU to parse. Field values are text now.
    #[test]
    fn a_filter_from_the_api_is_parsed_without_compiling_its_field_values() {
        let body: &[u8] = b"warA,hyper=off,[spa){vvs:\x0a- name: meter-1\x0a  connection:\x0a= \x00\x00\x00\x00\x00\x01\x00\x00........................................................................\x00\x00\x00\x00\x01s3cret-token\x00\x00\x00\x00devices\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00pointmaxByt\x00\x00\x00\x00\x00\x00\x00vs3cret-tokenalue\x5cu0000}]=trace";
        let filter = crate::management::requested_filter(false, body).unwrap_or_default();
        let _ = parse_filter(filter.trim());
        let literal = parse_filter("[read{device=sim-00.*}]=debug").unwrap();
        assert!(literal.to_string().contains("device=sim-00.*"), "{literal}");
    }

    /// Found by the `management` fuzz target: the same span field directive twice (once `off`,
    /// once `trace`) failed an assertion inside tracing-subscriber in debug builds. The last
    /// one wins, as for any other repeated directive.
    #[test]
    fn a_directive_repeated_with_another_level_is_replaced_by_the_last_one() {
        let body: &[u8] = b"\x01wrn,hyperrn,hyper=off,[spappath{f\x00\x00\x00\x7f=184kind45\x00\x00\x0016}]=off,[spappath{f\x00\x00\x00\x7f=184kind45\x00\x00\x0016}]=trace";
        let filter = crate::management::requested_filter(false, &body[1..]).unwrap_or_default();
        let _ = parse_filter(filter.trim());
        let f = parse_filter("info,[poll{device=a}]=off,fieldgate=debug,[poll{device=a}]=trace,warn").unwrap();
        let shown = f.to_string();
        assert!(shown.contains("[poll{device=a}]=trace") && !shown.contains("=off"), "{shown}");
        assert!(shown.contains("fieldgate=debug") && shown.contains("warn") && !shown.contains("info"), "{shown}");
        assert!(parse_filter("[poll{device=a}]=loud").is_err());
    }

    /// Found by the `management` fuzz target: a directive with leading whitespace and a
    /// multi-byte character made tracing-subscriber slice inside that character and panic.
    #[test]
    fn a_directive_with_leading_whitespace_and_multibyte_text_is_refused_or_parsed_without_a_panic() {
        let body: &[u8] = b"\"le<el\": \"info\xd4\x8fiYldvaluesal-velenfo\xd4\x8fiYldvaluesalvalul\"!: \"inble: holding, address: 10, l\"info\xd4\x8fiYldvaluesalpush--velenfo\xd4\x8f[i\x08{\",e Yldnielt l,e  \n\n\n\n\n\n\n\n\n\n\n\n  \n\n\n\n\nga*te\x7fga\x00\x00\x00false\x00\x00\x00\x00\x00}\x03\n\n\x00\x00u\x00g\"-t}-token}";
        let filter = crate::management::requested_filter(false, &body[1..]).unwrap_or_default();
        let _ = parse_filter(filter.trim());
        let spaced = parse_filter("info, \u{50f}[s]=debug").unwrap().to_string();
        assert!(spaced.contains("\u{50f}[s]=debug"), "{spaced}");
        assert_eq!(parse_filter("info,  fieldgate=debug").unwrap().to_string(), "fieldgate=debug,info");
    }

    #[test]
    fn traceparent_round_trips_and_refuses_malformed_ones() {
        let text = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        let tp = TraceParent::parse(text).unwrap();
        assert!(tp.is_sampled());
        assert_eq!(tp.text().as_str(), text);
        assert_eq!(
            TraceParent::parse("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-00").map(|t| t.is_sampled()),
            Some(false)
        );
        for bad in [
            "",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra",
            "00-4bf92f3577b34da6a3ce929d0e0e473-00f067aa0ba902b7-01",
        ] {
            assert_eq!(TraceParent::parse(bad), None, "{bad:?}");
        }
        // A later version is read by its first four fields.
        assert!(TraceParent::parse("01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-what").is_some());
    }

    #[test]
    fn without_a_tracer_nothing_is_recorded() {
        let mut t = ReadingTrace::read("default/m1", "modbus_tcp");
        assert!(!t.is_recording());
        t.failed("timeout");
        t.decoding();
        assert!(t.finish("id", 3).is_none());
        let entry = BufferEntry {
            traceparent: Some("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"),
            stored: SystemTime::now(),
            seq: 1,
            delivered: 1,
        };
        assert!(!delivery_spans(entry, "default/cloud").is_recording());
        assert!(!append_span(None, "u", "s", "id").is_recording());
    }

    #[tokio::test(start_paused = true)]
    async fn the_throttle_lets_one_line_through_per_period_and_counts_the_rest() {
        let mut t = LogThrottle::new(Duration::from_secs(60));
        assert_eq!(t.allow(), Some(0));
        assert_eq!(t.allow(), None);
        assert_eq!(t.allow(), None);
        tokio::time::advance(Duration::from_secs(61)).await;
        assert_eq!(t.allow(), Some(2));
        assert_eq!(t.allow(), None);
    }
}
