//! The management HTTP server (axum).
//!
//! | route | auth | what |
//! |---|---|---|
//! | `GET /healthz` | none | the process serves HTTP |
//! | `GET /readyz` | none | 200 when started, the NATS connection (the buffer) is up and every uplink's buffer stream answers; 503 with the reasons otherwise |
//! | `GET /metrics` | none | Prometheus/OpenMetrics text |
//! | `GET /status` | token if the API is on | the status page ([`status_page`]) and its data, `/status/data.json` |
//! | `GET /api/v1/status` | bearer | node, readiness, config version, every device and uplink |
//! | `GET /api/v1/devices` | bearer | every device: state, last reading and values, last error kind |
//! | `GET /api/v1/uplinks` | bearer | every uplink: connected, backlog, oldest unsent age, accepted, delivered, dropped by reason |
//! | `GET /api/v1/diagnostics` | bearer | versions, status, redacted config, recent warnings, tasks, metrics ([`diagnostics`]) |
//! | `GET /api/v1/config` | bearer | the applied config and its version |
//! | `PUT /api/v1/config` | bearer | standalone mode only: replace the config (YAML or JSON) |
//! | `GET`/`PUT /api/v1/log-level` | bearer | the log filter (`RUST_LOG` syntax), changeable at run time |
//!
//! `/api/v1` exists only with a token: `--api-token-file` (env `FIELDGATE_API_TOKEN_FILE`; in
//! Kubernetes a mounted Secret). Without one every `/api/v1` route answers 404. A request
//! without `Authorization: Bearer <token>` (or HTTP Basic with the token as the password, what
//! a browser sends for the status page), or with another token, gets 401 (the comparison
//! takes the same time whatever the token). The file is read again when it changes, so a
//! rotated Secret takes effect without a restart.
//!
//! Every route reads the gateway's state through [`state::StatusSource`] alone.
//!
//! A cloud outage does not make the gateway unready: buffering through it is the gateway's
//! job, and an unready DaemonSet pod would stall rollouts. `fieldgate_uplink_connected` and
//! the alerts shipped with the chart report it.
//!
//! `PUT /api/v1/config` checks the document exactly as a file change is checked (same parser,
//! same validation with field paths, secrets resolved); a refused one answers 422 with every
//! problem and its path. An accepted one is written over the config file atomically (write a
//! temp file, rename), so the config watcher applies it through the same per-device reload
//! path as any edit of the file; the answer is 200 once it is applied (202 if that takes
//! longer than a few seconds). In the cluster the config comes from the operator alone: the
//! route answers 409 there.
//!
//! Limits: request bodies up to 1 MiB (413 beyond), 10 s per request (408); connections are
//! bounded in time and number so that idle or trickling clients cannot keep the probes from
//! answering ([`connections`]).

mod connections;
mod diagnostics;
pub mod state;
mod status_page;

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, SystemTime};

use axum::Router;
use axum::body::Bytes;
use axum::extract::{Request, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use base64::Engine as _;
use fieldgate_crds::GatewayConfig;
use prometheus_client::registry::Registry;
use serde_json::{Value as Json, json};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use self::connections::{ConnectionLimits, ConnectionMetrics};
use self::state::StatusSource as _;
use crate::metrics::Metrics;
use crate::secrets::SecretStore;
use crate::telemetry::LogControl;

/// Largest request body accepted.
pub const MAX_BODY: usize = 1 << 20;
/// Time allowed for one request.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// How long `PUT /api/v1/config` waits for the new config to be applied before answering 202.
pub const APPLY_WAIT: Duration = Duration::from_secs(8);

/// Command-line settings of the management server.
#[derive(Clone, Debug, clap::Args)]
pub struct ManagementArgs {
    /// File holding the bearer token of `/api/v1` (a mounted Secret). Without it `/api/v1` is
    /// disabled (404).
    #[arg(long, env = "FIELDGATE_API_TOKEN_FILE")]
    pub api_token_file: Option<PathBuf>,
    /// Most management connections open at once. At the limit a new connection closes the
    /// one idle longest; it waits only while every open one is in the middle of a request.
    #[arg(long, env = "FIELDGATE_MANAGEMENT_MAX_CONNECTIONS", default_value_t = 256)]
    pub management_max_connections: usize,
    /// Time a management connection has to send a request header, and most idle time between
    /// two requests on one connection; then it is closed.
    #[arg(long, env = "FIELDGATE_MANAGEMENT_IDLE_TIMEOUT", default_value = "20s", value_parser = humantime::parse_duration)]
    pub management_idle_timeout: Duration,
}

impl ManagementArgs {
    fn limits(&self) -> ConnectionLimits {
        ConnectionLimits {
            idle_timeout: self.management_idle_timeout.max(Duration::from_millis(100)),
            max_connections: self.management_max_connections.max(1),
        }
    }
}

impl Default for ManagementArgs {
    fn default() -> Self {
        Self { api_token_file: None, management_max_connections: 256, management_idle_timeout: Duration::from_secs(20) }
    }
}

/// Where the gateway's config comes from, which decides whether `PUT /api/v1/config` exists.
#[derive(Clone, Debug)]
pub enum ConfigSource {
    /// Standalone: the config file, checked with this node's name and Secrets.
    Standalone {
        /// The `--config` file the watcher applies.
        path: PathBuf,
        /// `--node`.
        node: String,
        /// The Secrets the config may reference.
        secrets: SecretStore,
    },
    /// In the cluster: the operator's ConfigMap; the API cannot replace it.
    Cluster,
}

/// The management API could not be set up.
#[derive(Debug, thiserror::Error)]
#[error("API token file {path}: {message}")]
pub struct ApiSetupError {
    /// The token file.
    pub path: String,
    /// What is wrong.
    pub message: String,
}

/// The bearer token, read from its file and read again when the file changes.
struct Token {
    path: PathBuf,
    cached: Mutex<(Option<SystemTime>, Vec<u8>)>,
}

/// Shortest token accepted.
pub const MIN_TOKEN_LEN: usize = 16;

impl Token {
    fn read(path: &std::path::Path) -> Result<(Option<SystemTime>, Vec<u8>), ApiSetupError> {
        let err = |message: String| ApiSetupError { path: path.display().to_string(), message };
        let modified = std::fs::metadata(path).and_then(|m| m.modified()).ok();
        let bytes = std::fs::read(path).map_err(|e| err(e.to_string()))?;
        let token = bytes.trim_ascii().to_vec();
        if token.len() < MIN_TOKEN_LEN {
            return Err(err(format!("the token must be at least {MIN_TOKEN_LEN} characters")));
        }
        Ok((modified, token))
    }

    /// Whether `presented` is the token (constant time in the presented value).
    fn matches(&self, presented: &[u8]) -> bool {
        let modified = std::fs::metadata(&self.path).and_then(|m| m.modified()).ok();
        let mut cached = self.cached.lock().unwrap_or_else(PoisonError::into_inner);
        if modified != cached.0 {
            match Self::read(&self.path) {
                Ok(fresh) => *cached = fresh,
                // Keep the last good token; say why once per change.
                Err(e) => {
                    warn!(error = %e, "API token file unreadable; keeping the previous token");
                    cached.0 = modified;
                }
            }
        }
        let expected = &cached.1;
        let mut diff = u8::from(expected.len() != presented.len());
        for (i, b) in presented.iter().enumerate() {
            diff |= b ^ expected.get(i % expected.len().max(1)).copied().unwrap_or(0);
        }
        diff == 0
    }

    /// Whether the request carries the token, as `Bearer <token>` or as the password of
    /// `Basic` credentials (any user name).
    fn accepts(&self, headers: &HeaderMap) -> bool {
        presented_token(headers).is_some_and(|t| self.matches(&t))
    }
}

/// The token a request presents: `Authorization: Bearer <token>`, or the password of
/// `Authorization: Basic base64(user:password)`.
fn presented_token(headers: &HeaderMap) -> Option<Vec<u8>> {
    let value = headers.get(header::AUTHORIZATION)?.to_str().ok()?.trim();
    let (scheme, rest) = value.split_once(' ')?;
    if scheme.eq_ignore_ascii_case("bearer") {
        return Some(rest.trim().as_bytes().to_vec());
    }
    if scheme.eq_ignore_ascii_case("basic") {
        let decoded = base64::engine::general_purpose::STANDARD.decode(rest.trim()).ok()?;
        let colon = decoded.iter().position(|&b| b == b':')?;
        return Some(decoded[colon + 1..].to_vec());
    }
    None
}

/// The authenticated `/api/v1`: its token, the log control and where configs come from.
pub struct Api {
    token: Token,
    logs: Option<LogControl>,
    source: ConfigSource,
    writes: AtomicU64,
}

impl Api {
    /// The API of these settings; `None` (API disabled) without a token file.
    pub fn from_args(
        args: &ManagementArgs,
        logs: Option<LogControl>,
        source: ConfigSource,
    ) -> Result<Option<Self>, ApiSetupError> {
        let Some(path) = &args.api_token_file else { return Ok(None) };
        let cached = Token::read(path)?;
        Ok(Some(Self {
            token: Token { path: path.clone(), cached: Mutex::new(cached) },
            logs,
            source,
            writes: AtomicU64::new(0),
        }))
    }
}

/// What the management server shows.
pub struct Management {
    registry: Registry,
    ready: AtomicBool,
    metrics: Option<Arc<Metrics>>,
    api: Option<Api>,
    applied: Mutex<Option<watch::Receiver<Option<Arc<GatewayConfig>>>>>,
    node: String,
    limits: ConnectionLimits,
    connections: ConnectionMetrics,
    nats_server: Mutex<Option<String>>,
    /// Why the gateway cannot work any more (a task it cannot run without stopped).
    failed: Mutex<Option<String>>,
    started: std::time::Instant,
}

impl Management {
    /// A server over the gateway's registry alone (no `/api/v1`, readiness from the flag
    /// alone); not ready until [`Management::set_ready`].
    pub fn new(mut registry: Registry) -> Arc<Self> {
        let connections = ConnectionMetrics::register(&mut registry);
        Arc::new(Self {
            registry,
            ready: AtomicBool::new(false),
            metrics: None,
            api: None,
            applied: Mutex::new(None),
            node: String::new(),
            limits: ManagementArgs::default().limits(),
            connections,
            nats_server: Mutex::new(None),
            failed: Mutex::new(None),
            started: std::time::Instant::now(),
        })
    }

    /// The full server: readiness also checks the buffer and the uplinks, `/api/v1` is
    /// served when `api` is given.
    pub fn with_api(
        mut registry: Registry,
        metrics: Arc<Metrics>,
        api: Option<Api>,
        node: &str,
        args: &ManagementArgs,
    ) -> Arc<Self> {
        let connections = ConnectionMetrics::register(&mut registry);
        Arc::new(Self {
            registry,
            ready: AtomicBool::new(false),
            metrics: Some(metrics),
            api,
            applied: Mutex::new(None),
            node: node.to_string(),
            limits: args.limits(),
            connections,
            nats_server: Mutex::new(None),
            failed: Mutex::new(None),
            started: std::time::Instant::now(),
        })
    }

    /// Records the version of the NATS server holding the buffer (for the diagnostics).
    pub fn set_nats_server_version(&self, version: &str) {
        *self.nats_server.lock().unwrap_or_else(PoisonError::into_inner) = Some(version.to_string());
    }

    fn nats_server_version(&self) -> Option<String> {
        self.nats_server.lock().unwrap_or_else(PoisonError::into_inner).clone()
    }

    /// Marks the gateway ready (serving) or not (starting, stopping).
    pub fn set_ready(&self, ready: bool) {
        self.ready.store(ready, Ordering::SeqCst);
    }

    /// Marks the gateway failed for good (`why`): never ready again in this process.
    pub fn set_failed(&self, why: &str) {
        *self.failed.lock().unwrap_or_else(PoisonError::into_inner) = Some(why.to_string());
    }

    /// Follows the applied config (shown by `/api/v1`, and its uplinks checked by `/readyz`).
    pub fn watch_applied(&self, applied: watch::Receiver<Option<Arc<GatewayConfig>>>) {
        *self.applied.lock().unwrap_or_else(PoisonError::into_inner) = Some(applied);
    }

    fn applied(&self) -> Option<Arc<GatewayConfig>> {
        self.applied.lock().unwrap_or_else(PoisonError::into_inner).as_ref().and_then(|r| r.borrow().clone())
    }

    /// Why the gateway is not ready; empty when it is.
    pub fn not_ready_reasons(&self) -> Vec<String> {
        let mut reasons = Vec::new();
        if let Some(why) = self.failed.lock().unwrap_or_else(PoisonError::into_inner).clone() {
            reasons.push(why);
        }
        if !self.ready.load(Ordering::SeqCst) {
            reasons.push("starting or stopping".to_string());
        }
        if let Some(m) = &self.metrics {
            if m.buffer_connects.get() == 0 {
                reasons.push("the NATS server holding the buffer has not answered yet".to_string());
            }
            // Connected at least once (so the NATS events are wired) and down now.
            if m.buffer_connects.get() > 0 && m.buffer_connected.get() == 0 {
                reasons.push("the NATS connection holding the buffer is down".to_string());
            }
            if let Some(cfg) = self.applied() {
                for u in &cfg.uplinks {
                    let name = format!("{}/{}", u.namespace, u.name);
                    if m.state.get(&name).is_some_and(|s| s.snapshot().reachable == Some(false)) {
                        reasons.push(format!("uplink {name}: its buffer stream does not answer"));
                    }
                }
            }
        }
        reasons
    }
}

// ---------------------------------------------------------------------------------------------
// Open routes

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
    let reasons = m.not_ready_reasons();
    if reasons.is_empty() {
        (StatusCode::OK, "ready\n".to_string())
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, format!("not ready: {}\n", reasons.join("; ")))
    }
}

// ---------------------------------------------------------------------------------------------
// /api/v1

fn problem(code: StatusCode, message: impl Into<String>) -> Response {
    (code, axum::Json(json!({"error": message.into()}))).into_response()
}

async fn authenticate(State(m): State<Arc<Management>>, req: Request, next: Next) -> Response {
    let Some(api) = &m.api else {
        return problem(
            StatusCode::NOT_FOUND,
            "the management API is disabled: start the gateway with --api-token-file",
        );
    };
    let (ok, challenge) = match presented_token(req.headers()) {
        None => (false, "Bearer realm=\"fieldgate\""),
        Some(t) => (api.token.matches(&t), "Bearer realm=\"fieldgate\", error=\"invalid_token\""),
    };
    if !ok {
        let mut r = problem(StatusCode::UNAUTHORIZED, "a valid bearer token is required");
        r.headers_mut().insert(header::WWW_AUTHENTICATE, HeaderValue::from_static(challenge));
        return r;
    }
    next.run(req).await
}

async fn status(State(m): State<Arc<Management>>) -> Response {
    axum::Json(m.snapshot()).into_response()
}

async fn devices(State(m): State<Arc<Management>>) -> Response {
    axum::Json(json!({"devices": m.snapshot().devices})).into_response()
}

async fn uplinks(State(m): State<Arc<Management>>) -> Response {
    axum::Json(json!({"uplinks": m.snapshot().uplinks})).into_response()
}

async fn config(State(m): State<Arc<Management>>) -> Response {
    match m.applied() {
        None => problem(StatusCode::SERVICE_UNAVAILABLE, "no configuration applied yet"),
        Some(cfg) => axum::Json(json!({"version": cfg.version, "config": &*cfg})).into_response(),
    }
}

async fn replace_config(State(m): State<Arc<Management>>, body: Bytes) -> Response {
    let Some(api) = &m.api else { return problem(StatusCode::NOT_FOUND, "disabled") };
    let ConfigSource::Standalone { path, node, secrets } = api.source.clone() else {
        return problem(
            StatusCode::CONFLICT,
            "in the cluster the configuration comes from the operator: change the Device, DeviceProfile and Uplink objects",
        );
    };
    let Ok(text) = String::from_utf8(body.to_vec()) else {
        return problem(StatusCode::BAD_REQUEST, "the body must be UTF-8 YAML or JSON");
    };
    let n = api.writes.fetch_add(1, Ordering::Relaxed);
    let outcome = tokio::task::spawn_blocking(move || check_and_write(&path, &node, &secrets, &text, n)).await;
    let candidate = match outcome {
        Ok(Ok(candidate)) => candidate,
        Ok(Err(WriteRefusal::Invalid(problems))) => {
            let body = json!({"error": "the configuration is invalid; the running one stays", "problems": problems});
            return (StatusCode::UNPROCESSABLE_ENTITY, axum::Json(body)).into_response();
        }
        Ok(Err(WriteRefusal::Io(e))) => {
            return problem(StatusCode::INTERNAL_SERVER_ERROR, format!("writing the config file: {e}"));
        }
        Err(_) => return problem(StatusCode::INTERNAL_SERVER_ERROR, "the config check did not finish"),
    };
    info!(version = candidate.version.as_deref().unwrap_or("-"), "configuration replaced through the API");
    // The watcher applies it through the per-device reload path; wait a little for that.
    let deadline = tokio::time::Instant::now() + APPLY_WAIT;
    let applied = loop {
        if m.applied().is_some_and(|a| *a == candidate) {
            break true;
        }
        if tokio::time::Instant::now() >= deadline {
            break false;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let code = if applied { StatusCode::OK } else { StatusCode::ACCEPTED };
    (code, axum::Json(json!({"applied": applied, "version": candidate.version}))).into_response()
}

enum WriteRefusal {
    /// Every problem, each starting with its field path.
    Invalid(Vec<String>),
    Io(std::io::Error),
}

/// Checks `text` exactly as the config watcher would (through a temp file next to the config)
/// and, if it passes, renames it over the config file.
fn check_and_write(
    path: &std::path::Path,
    node: &str,
    secrets: &SecretStore,
    text: &str,
    n: u64,
) -> Result<GatewayConfig, WriteRefusal> {
    use std::io::Write as _;
    let dir = path.parent().filter(|d| !d.as_os_str().is_empty()).unwrap_or(std::path::Path::new("."));
    let name = path.file_name().map(|f| f.to_string_lossy().into_owned()).unwrap_or_default();
    let tmp = dir.join(format!(".{name}.api-{}-{n}.tmp", std::process::id()));
    let write = || -> std::io::Result<()> {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(text.as_bytes())?;
        f.sync_all()
    };
    if let Err(e) = write() {
        let _ = std::fs::remove_file(&tmp);
        return Err(WriteRefusal::Io(e));
    }
    match crate::app::load_config(&tmp, node, secrets) {
        Ok(loaded) => {
            if let Err(e) = std::fs::rename(&tmp, path) {
                let _ = std::fs::remove_file(&tmp);
                return Err(WriteRefusal::Io(e));
            }
            if let Ok(d) = std::fs::File::open(dir) {
                let _ = d.sync_all();
            }
            Ok(loaded.config)
        }
        Err(e) => {
            let _ = std::fs::remove_file(&tmp);
            let problems = match e {
                crate::app::AppError::Config { problems, .. } if !problems.is_empty() => problems,
                crate::app::AppError::Config { message, .. } => vec![message],
                other => vec![other.to_string()],
            };
            Err(WriteRefusal::Invalid(problems))
        }
    }
}

async fn log_level(State(m): State<Arc<Management>>) -> Response {
    match m.api.as_ref().and_then(|a| a.logs.as_ref()) {
        Some(logs) => axum::Json(json!({"level": logs.level()})).into_response(),
        None => problem(StatusCode::NOT_IMPLEMENTED, "the log filter cannot be changed in this process"),
    }
}

async fn set_log_level(State(m): State<Arc<Management>>, headers: HeaderMap, body: Bytes) -> Response {
    let Some(logs) = m.api.as_ref().and_then(|a| a.logs.as_ref()) else {
        return problem(StatusCode::NOT_IMPLEMENTED, "the log filter cannot be changed in this process");
    };
    let json_body = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/json"));
    let Some(filter) = requested_filter(json_body, &body) else {
        return problem(StatusCode::BAD_REQUEST, "send {\"level\": \"debug\"} as JSON or the filter as text");
    };
    match logs.set_level(&filter) {
        Ok(()) => {
            info!(level = %logs.level(), "log filter changed through the API");
            axum::Json(json!({"level": logs.level()})).into_response()
        }
        Err(e) => problem(StatusCode::BAD_REQUEST, e.to_string()),
    }
}

/// The log filter a `PUT /api/v1/log-level` body asks for: `{"level": ...}` as JSON, else the
/// body as text.
pub fn requested_filter(json_body: bool, body: &[u8]) -> Option<String> {
    if json_body {
        match serde_json::from_slice::<Json>(body) {
            Ok(v) => v["level"].as_str().map(str::to_string),
            Err(_) => None,
        }
    } else {
        String::from_utf8(body.to_vec()).ok()
    }
}

/// The routes.
pub fn router(m: Arc<Management>) -> Router {
    let api = Router::new()
        .route("/status", get(status))
        .route("/devices", get(devices))
        .route("/uplinks", get(uplinks))
        .route("/config", get(config).put(replace_config))
        .route("/log-level", get(log_level).put(set_log_level))
        .route("/diagnostics", get(diagnostics::diagnostics))
        .fallback(|| async { problem(StatusCode::NOT_FOUND, "no such API route") })
        .layer(axum::middleware::from_fn_with_state(Arc::clone(&m), authenticate));
    let mut routes = Router::new()
        .route("/metrics", get(metrics))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(ready));
    // A gateway's server (devices and uplinks to show) has the status page.
    if m.metrics.is_some() {
        routes = routes.merge(status_page::routes(Arc::clone(&m)));
    }
    routes
        .nest("/api/v1", api)
        .layer(axum::extract::DefaultBodyLimit::max(MAX_BODY))
        .layer(tower_http::limit::RequestBodyLimitLayer::new(MAX_BODY))
        .layer(tower_http::timeout::TimeoutLayer::with_status_code(StatusCode::REQUEST_TIMEOUT, REQUEST_TIMEOUT))
        .with_state(m)
}

/// Serves until `cancel` fires.
pub async fn serve(listener: Arc<TcpListener>, m: Arc<Management>, cancel: CancellationToken) -> std::io::Result<()> {
    let (limits, metrics) = (m.limits, m.connections.clone());
    connections::serve(listener, router(m), limits, metrics, cancel).await
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    /// The token `0123456789abcdef-secret`, from a file in `dir`.
    fn token_in(dir: &std::path::Path) -> Token {
        let path = dir.join("token");
        std::fs::write(&path, "0123456789abcdef-secret\n").unwrap();
        Token { path: path.clone(), cached: Mutex::new(Token::read(&path).unwrap()) }
    }

    #[test]
    fn the_token_comparison_needs_the_exact_token() {
        let dir = tempfile::tempdir().unwrap();
        let t = token_in(dir.path());
        assert!(t.matches(b"0123456789abcdef-secret"));
        for bad in [&b""[..], b"0123456789abcdef-secreT", b"0123456789abcdef-secret0", b"0123456789abcdef-secre"] {
            assert!(!t.matches(bad), "{bad:?}");
        }
        std::fs::write(dir.path().join("short"), "short").unwrap();
        assert!(Token::read(&dir.path().join("short")).is_err());
    }

    #[test]
    fn the_token_is_accepted_as_bearer_or_as_a_basic_password() {
        let dir = tempfile::tempdir().unwrap();
        let t = token_in(dir.path());
        let with = |value: &str| {
            let mut h = HeaderMap::new();
            h.insert(header::AUTHORIZATION, HeaderValue::from_str(value).unwrap());
            h
        };
        let basic = |creds: &str| format!("Basic {}", base64::engine::general_purpose::STANDARD.encode(creds));
        assert!(t.accepts(&with("Bearer 0123456789abcdef-secret")));
        assert!(t.accepts(&with("bearer 0123456789abcdef-secret")));
        assert!(t.accepts(&with(&basic("anyone:0123456789abcdef-secret"))));
        assert!(t.accepts(&with(&basic(":0123456789abcdef-secret"))));
        assert!(!t.accepts(&with(&basic("0123456789abcdef-secret:x"))));
        assert!(!t.accepts(&with(&basic("0123456789abcdef-secret"))));
        assert!(!t.accepts(&with("Basic !!!not-base64")));
        assert!(!t.accepts(&with("Digest 0123456789abcdef-secret")));
        assert!(!t.accepts(&HeaderMap::new()));
    }
}
