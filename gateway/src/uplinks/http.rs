//! The HTTP uplink: each delivery is one `POST` of a batch of readings (hyper's client over
//! rustls with the ring provider; HTTP/1.1).
//!
//! The body is the uplink's encoding of the batch: a JSON array of reading envelopes
//! (`application/json`) or a protobuf `fieldgate.v1.BufferEntry` (`application/x-protobuf`),
//! at most `maxRequestBytes` and `maxBatch` readings. What an answer means ([`answer`]):
//!
//! | answer | outcome |
//! |---|---|
//! | 2xx | every reading of the request confirmed |
//! | 408, 429, 5xx | transient: the readings go again after a growing delay, or after the answer's `Retry-After` when that is longer (at most 15 min) |
//! | 401, 403, 3xx | the endpoint refuses the gateway itself (credentials, a moved endpoint): the link is lost and tried again with a growing delay; nothing is dropped |
//! | other 4xx | permanent: the request's readings are dropped and counted (`refused`) |
//! | no answer within `timeout`, a connection error | the link is lost: unanswered requests go again (the endpoint may have taken them: at least once, under their ids) |
//!
//! A reading larger than `maxRequestBytes` on its own is refused for good without a request.
//! Each answer's body is read (to reuse the connection) up to 64 KiB; its start names a
//! refusal in the logs. "Connected" means the endpoint accepts connections: a link starts
//! with a connection (TCP and TLS) to it, so that an unreachable endpoint is probed on the
//! driver's short cadence while a backlog waits.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use fieldgate_crds::{Encoding, GatewayUplink};
use http::header::{AUTHORIZATION, CONTENT_TYPE, HeaderValue, RETRY_AFTER, USER_AGENT};
use http::{StatusCode, Uri};
use http_body_util::{BodyExt, Full, Limited};
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use tokio::sync::{Semaphore, mpsc};
use tokio_util::sync::CancellationToken;
use tower::ServiceExt;

use super::link::{Delivery, FRAMING_BYTES, Link, LinkEvent, Token};
use super::{SettingsError, UplinkError, settings_err};
use crate::secrets::SecretStore;

/// Most bytes of an answer's body read.
pub const MAX_RESPONSE_BYTES: usize = 64 * 1024;
/// Most characters of an answer's body quoted in a refusal's reason.
const REASON_EXCERPT: usize = 200;

/// Everything needed to send batches to one endpoint, secrets resolved.
pub struct HttpSettings {
    /// The endpoint, as configured.
    pub url: fieldgate_crds::HttpUrl,
    uri: Uri,
    /// Encoding of each reading and of the batch around them.
    pub encoding: Encoding,
    /// Most readings per request.
    pub max_batch: usize,
    /// Largest request body.
    pub max_request_bytes: usize,
    /// Time one request may take.
    pub timeout: Duration,
    /// Requests awaiting their answer at once.
    pub max_in_flight: usize,
    /// `Authorization: Bearer ...`, marked sensitive.
    authorization: Option<HeaderValue>,
    tls: Arc<rustls::ClientConfig>,
    /// Hash of everything these settings were resolved from, secrets included.
    pub fingerprint: u64,
}

impl std::fmt::Debug for HttpSettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HttpSettings")
            .field("url", &self.url.as_str())
            .field("encoding", &self.encoding)
            .field("max_batch", &self.max_batch)
            .field("max_request_bytes", &self.max_request_bytes)
            .field("timeout", &self.timeout)
            .field("max_in_flight", &self.max_in_flight)
            .field("token", &self.authorization.is_some())
            .finish_non_exhaustive()
    }
}

impl HttpSettings {
    /// Resolves a validated HTTP uplink: reads the Secrets it references. `path` is the
    /// uplink's field path, for errors.
    pub fn resolve(u: &GatewayUplink, secrets: &SecretStore, path: &str) -> Result<Self, SettingsError> {
        let Some(h) = &u.http else { return Err(settings_err(format!("{path}.http"), "not an HTTP uplink")) };
        let at = format!("{path}.http");
        let uri: Uri = h.url.as_str().parse().map_err(|e| settings_err(format!("{at}.url"), format!("{e}")))?;
        let authorization = match &h.auth {
            None => None,
            Some(a) => {
                let r = &a.token_secret_ref;
                let at = format!("{at}.auth.tokenSecretRef");
                let token = secrets.read(&r.name, r.key()).map_err(|e| settings_err(at.clone(), e.to_string()))?;
                let token = token.expose().trim_ascii();
                if token.is_empty() {
                    return Err(settings_err(at, format!("key {:?} is empty", r.key())));
                }
                let mut value = HeaderValue::from_bytes(&[b"Bearer ", token].concat())
                    .map_err(|_| settings_err(at, "the token holds characters a header cannot carry"))?;
                value.set_sensitive(true);
                Some(value)
            }
        };
        let tls = if h.url.tls() {
            super::tls::client_config(h.tls.as_ref(), secrets, &format!("{at}.tls"))?
        } else {
            // Never used for an http:// endpoint, but the connector wants one.
            rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
                .with_safe_default_protocol_versions()
                .map_err(|e| settings_err(at.clone(), e.to_string()))?
                .with_root_certificates(rustls::RootCertStore::empty())
                .with_no_client_auth()
        };
        Ok(Self {
            url: h.url.clone(),
            uri,
            encoding: u.encoding(),
            max_batch: usize::try_from(h.max_batch()).unwrap_or(usize::MAX).max(1),
            max_request_bytes: usize::try_from(h.max_request_bytes()).unwrap_or(usize::MAX),
            timeout: h.timeout(),
            max_in_flight: usize::from(h.max_in_flight()).max(1),
            authorization,
            tls: Arc::new(tls),
            fingerprint: super::fingerprint(u, secrets),
        })
    }

    /// Readings in flight at once: a full batch per request in flight (at most 65,536).
    pub fn window(&self) -> usize {
        self.max_batch.saturating_mul(self.max_in_flight).min(65_536)
    }

    fn connector(&self) -> HttpsConnector<HttpConnector> {
        let mut http = HttpConnector::new();
        http.enforce_http(false);
        http.set_nodelay(true);
        http.set_connect_timeout(Some(self.timeout));
        hyper_rustls::HttpsConnectorBuilder::new()
            .with_tls_config((*self.tls).clone())
            .https_or_http()
            .enable_http1()
            .wrap_connector(http)
    }

    /// The `Content-Type` of a batch.
    fn content_type(&self) -> &'static str {
        match self.encoding {
            Encoding::Protobuf => "application/x-protobuf; messageType=fieldgate.v1.BufferEntry",
            // Validation lets an HTTP uplink use json or protobuf only.
            _ => "application/json",
        }
    }
}

/// A batch's body: a JSON array of the encoded readings, or a `BufferEntry` of them (the
/// encodings an HTTP uplink may use; validation refuses the others).
pub fn batch_body(encoding: Encoding, readings: &[Bytes]) -> Bytes {
    match encoding {
        Encoding::Protobuf => crate::buffer::encode_entry(readings.iter().map(Bytes::as_ref)),
        _ => {
            let size = readings.iter().map(|r| r.len() + 1).sum::<usize>() + 2;
            let mut out = Vec::with_capacity(size);
            out.push(b'[');
            for (i, r) in readings.iter().enumerate() {
                if i > 0 {
                    out.push(b',');
                }
                out.extend_from_slice(r);
            }
            out.push(b']');
            Bytes::from(out)
        }
    }
}

/// What an HTTP answer means for the request's readings.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Answer {
    /// The endpoint has them.
    Confirmed,
    /// Refused; `permanent`: sending them again cannot succeed.
    Refused {
        /// Sending them again cannot succeed.
        permanent: bool,
    },
    /// The endpoint refuses the gateway itself (credentials, a moved endpoint): retry the
    /// link with a growing delay, drop nothing.
    RefusesLink,
}

/// The meaning of an answer's status (see the module doc).
pub fn answer(status: StatusCode) -> Answer {
    match status.as_u16() {
        200..=299 => Answer::Confirmed,
        401 | 403 | 300..=399 => Answer::RefusesLink,
        408 | 429 | 500..=599 => Answer::Refused { permanent: false },
        _ => Answer::Refused { permanent: true },
    }
}

/// The delay a `Retry-After` value asks for (seconds, or an HTTP date) at `now`.
pub fn retry_after(value: &HeaderValue, now: SystemTime) -> Option<Duration> {
    let text = value.to_str().ok()?.trim();
    if let Ok(s) = text.parse::<u64>() {
        return Some(Duration::from_secs(s));
    }
    let at = httpdate::parse_http_date(text).ok()?;
    Some(at.duration_since(now).unwrap_or_default())
}

/// Whether a connection error comes from TLS (a certificate the gateway does not trust, a
/// client certificate the endpoint refuses): a configuration problem, retried slowly.
fn is_tls_error(e: &(dyn std::error::Error + 'static)) -> bool {
    let mut at = Some(e);
    while let Some(e) = at {
        if e.downcast_ref::<rustls::Error>().is_some() {
            return true;
        }
        if let Some(io) = e.downcast_ref::<std::io::Error>()
            && io.get_ref().is_some_and(|inner| inner.downcast_ref::<rustls::Error>().is_some())
        {
            return true;
        }
        at = e.source();
    }
    false
}

type HttpClient = Client<HttpsConnector<HttpConnector>, Full<Bytes>>;

/// The requests of one link: events go out once, a lost link says so once.
#[derive(Clone)]
struct Sender {
    events: mpsc::UnboundedSender<LinkEvent>,
    lost: Arc<AtomicBool>,
}

impl Sender {
    fn send(&self, ev: LinkEvent) {
        if matches!(ev, LinkEvent::Lost { .. }) {
            if self.lost.swap(true, Ordering::SeqCst) {
                return;
            }
        } else if self.lost.load(Ordering::SeqCst) {
            return;
        }
        let _ = self.events.send(ev);
    }
}

/// A link to one HTTP endpoint: every delivery is one request.
pub struct HttpLink {
    settings: Arc<HttpSettings>,
    client: HttpClient,
    sender: Sender,
    events: mpsc::UnboundedReceiver<LinkEvent>,
    permits: Arc<Semaphore>,
    stop: CancellationToken,
    next_token: Token,
}

impl HttpLink {
    /// Opens a link: connects to the endpoint once (its outcome is the first event), then
    /// sends requests on pooled connections.
    pub fn open(settings: &Arc<HttpSettings>) -> Self {
        let (events_tx, events) = mpsc::unbounded_channel();
        let sender = Sender { events: events_tx, lost: Arc::default() };
        let connector = settings.connector();
        let client = Client::builder(TokioExecutor::new())
            .pool_max_idle_per_host(settings.max_in_flight)
            .pool_idle_timeout(Duration::from_secs(60))
            .build(connector.clone());
        let stop = CancellationToken::new();
        let probe = {
            let (sender, uri, timeout, stop) = (sender.clone(), settings.uri.clone(), settings.timeout, stop.clone());
            async move {
                let connected = tokio::time::timeout(timeout, connector.oneshot(uri)).await;
                let ev = match connected {
                    Ok(Ok(_)) => LinkEvent::Connected,
                    Ok(Err(e)) => {
                        let refused = is_tls_error(e.as_ref());
                        LinkEvent::Lost { reason: format!("cannot connect: {e}"), refused }
                    }
                    Err(_) => LinkEvent::Lost { reason: "cannot connect: timed out".into(), refused: false },
                };
                if !stop.is_cancelled() {
                    sender.send(ev);
                }
            }
        };
        tokio::spawn(probe);
        Self {
            permits: Arc::new(Semaphore::new(settings.max_in_flight)),
            settings: Arc::clone(settings),
            client,
            sender,
            events,
            stop,
            next_token: 0,
        }
    }
}

impl Drop for HttpLink {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

/// Sends one batch and turns the answer into the delivery's event.
async fn post(
    settings: Arc<HttpSettings>,
    client: HttpClient,
    permits: Arc<Semaphore>,
    token: Token,
    body: Bytes,
    readings: usize,
) -> LinkEvent {
    let Ok(_permit) = permits.acquire_owned().await else {
        return LinkEvent::Lost { reason: "link closed".into(), refused: false };
    };
    let mut request = http::Request::post(settings.uri.clone())
        .header(CONTENT_TYPE, settings.content_type())
        .header(USER_AGENT, concat!("fieldgate-gateway/", env!("CARGO_PKG_VERSION")))
        .header("Fieldgate-Readings", readings);
    if let Some(auth) = &settings.authorization {
        request = request.header(AUTHORIZATION, auth.clone());
    }
    let request = match request.body(Full::new(body)) {
        Ok(r) => r,
        Err(e) => return LinkEvent::Refused { token, reason: e.to_string(), permanent: true, retry_after: None },
    };
    let deadline = tokio::time::Instant::now() + settings.timeout;
    let response = match tokio::time::timeout_at(deadline, client.request(request)).await {
        Err(_) => {
            return LinkEvent::Lost { reason: format!("no answer within {:?}", settings.timeout), refused: false };
        }
        Ok(Err(e)) => return LinkEvent::Lost { reason: e.to_string(), refused: is_tls_error(&e) },
        Ok(Ok(r)) => r,
    };
    let status = response.status();
    let asked = response.headers().get(RETRY_AFTER).and_then(|v| retry_after(v, SystemTime::now()));
    // Read the answer (bounded in size and time) so that the connection can be reused.
    let body = tokio::time::timeout_at(deadline, Limited::new(response.into_body(), MAX_RESPONSE_BYTES).collect())
        .await
        .ok()
        .and_then(Result::ok)
        .map(|b| b.to_bytes())
        .unwrap_or_default();
    let reason = || {
        let mut r = format!("HTTP {status}");
        let text = String::from_utf8_lossy(&body);
        let text: String = text.chars().filter(|c| !c.is_control()).take(REASON_EXCERPT).collect();
        if !text.trim().is_empty() {
            r.push_str(": ");
            r.push_str(text.trim());
        }
        r
    };
    match answer(status) {
        Answer::Confirmed => LinkEvent::Confirmed(token),
        Answer::Refused { permanent } => LinkEvent::Refused { token, reason: reason(), permanent, retry_after: asked },
        Answer::RefusesLink => LinkEvent::Lost { reason: reason(), refused: true },
    }
}

impl Link for HttpLink {
    fn max_readings(&self) -> usize {
        self.settings.max_batch
    }

    fn max_bytes(&self) -> usize {
        self.settings.max_request_bytes
    }

    fn send(&mut self, delivery: Delivery) -> Result<Token, UplinkError> {
        if self.sender.lost.load(Ordering::SeqCst) {
            return Err(UplinkError::Queue("the link is lost".into()));
        }
        let token = self.next_token;
        self.next_token += 1;
        let readings: Vec<Bytes> = delivery.readings.into_iter().map(|r| r.message.payload).collect();
        let n = readings.len();
        let body = batch_body(self.settings.encoding, &readings);
        if body.len() > self.settings.max_request_bytes {
            // A reading too large for a request alone (the driver cuts deliveries to fit).
            let reason = format!(
                "RequestTooLarge: {} bytes for {n} reading(s), more than maxRequestBytes {} (framing {FRAMING_BYTES} per reading)",
                body.len(),
                self.settings.max_request_bytes
            );
            self.sender.send(LinkEvent::Refused { token, reason, permanent: true, retry_after: None });
            return Ok(token);
        }
        let (settings, client, permits, sender, stop) = (
            Arc::clone(&self.settings),
            self.client.clone(),
            Arc::clone(&self.permits),
            self.sender.clone(),
            self.stop.clone(),
        );
        tokio::spawn(async move {
            tokio::select! {
                () = stop.cancelled() => {}
                ev = post(settings, client, permits, token, body, n) => sender.send(ev),
            }
        });
        Ok(token)
    }

    async fn next_event(&mut self) -> LinkEvent {
        self.events.recv().await.unwrap_or_else(|| LinkEvent::Lost { reason: "link closed".into(), refused: false })
    }

    async fn close(self) {
        // Requests still out are cut (the driver gave their readings back already).
        self.stop.cancel();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_answer_is_confirmed_transient_permanent_or_a_refused_link() {
        for (code, want) in [
            (200, Answer::Confirmed),
            (202, Answer::Confirmed),
            (204, Answer::Confirmed),
            (301, Answer::RefusesLink),
            (401, Answer::RefusesLink),
            (403, Answer::RefusesLink),
            (400, Answer::Refused { permanent: true }),
            (404, Answer::Refused { permanent: true }),
            (413, Answer::Refused { permanent: true }),
            (422, Answer::Refused { permanent: true }),
            (408, Answer::Refused { permanent: false }),
            (429, Answer::Refused { permanent: false }),
            (500, Answer::Refused { permanent: false }),
            (503, Answer::Refused { permanent: false }),
        ] {
            assert_eq!(answer(StatusCode::from_u16(code).unwrap()), want, "{code}");
        }
    }

    #[test]
    fn retry_after_is_read_in_seconds_or_as_a_date() {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000);
        assert_eq!(retry_after(&HeaderValue::from_static("5"), now), Some(Duration::from_secs(5)));
        let date = httpdate::fmt_http_date(now + Duration::from_secs(30));
        assert_eq!(retry_after(&HeaderValue::from_str(&date).unwrap(), now), Some(Duration::from_secs(30)));
        // A date in the past: at once.
        let past = httpdate::fmt_http_date(now - Duration::from_secs(30));
        assert_eq!(retry_after(&HeaderValue::from_str(&past).unwrap(), now), Some(Duration::ZERO));
        assert_eq!(retry_after(&HeaderValue::from_static("soon"), now), None);
        assert_eq!(retry_after(&HeaderValue::from_static("-1"), now), None);
    }

    #[test]
    fn a_batch_is_a_json_array_or_a_buffer_entry() {
        let readings = [Bytes::from_static(br#"{"a":1}"#), Bytes::from_static(br#"{"b":2}"#)];
        assert_eq!(batch_body(Encoding::Json, &readings), Bytes::from_static(br#"[{"a":1},{"b":2}]"#));
        assert_eq!(batch_body(Encoding::Json, &[]), Bytes::from_static(b"[]"));
        let pb: Vec<Bytes> = (0..3u64)
            .map(|i| {
                let r = crate::reading::Reading { id: format!("ns/d/{i}"), buffer_seq: i + 1, ..Default::default() };
                Bytes::from(prost::Message::encode_to_vec(&r))
            })
            .collect();
        let entry: crate::reading::pb::BufferEntry =
            prost::Message::decode(batch_body(Encoding::Protobuf, &pb).as_ref()).unwrap();
        assert_eq!(entry.readings.iter().map(|r| r.buffer_seq).collect::<Vec<_>>(), [1, 2, 3]);
    }

    #[test]
    fn missing_token_secrets_name_the_field_and_the_token_never_shows() {
        let u: GatewayUplink = serde_json::from_value(serde_json::json!({
            "name": "cloud",
            "http": {"url": "https://ingest.example.com/v1", "auth": {"tokenSecretRef": {"name": "tok"}}}
        }))
        .unwrap();
        let dir = tempfile::tempdir().unwrap();
        let store = SecretStore::new(dir.path());
        let err = HttpSettings::resolve(&u, &store, "uplinks[0]").unwrap_err();
        assert_eq!(err.path, "uplinks[0].http.auth.tokenSecretRef");
        std::fs::create_dir_all(dir.path().join("tok")).unwrap();
        std::fs::write(dir.path().join("tok/token"), "s3cret-token\n").unwrap();
        let s = HttpSettings::resolve(&u, &store, "uplinks[0]").unwrap();
        assert_eq!(s.authorization.as_ref().map(|v| v.as_bytes().to_vec()), Some(b"Bearer s3cret-token".to_vec()));
        assert!(s.authorization.as_ref().unwrap().is_sensitive());
        assert!(!format!("{s:?}").contains("s3cret"), "{s:?}");
        assert_eq!(s.window(), 500 * 4);
    }
}
