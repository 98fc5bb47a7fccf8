//! The cloud side of the HTTP uplink: a real HTTP/1.1 server (hyper, optionally over TLS with
//! rustls) that records every batch of readings POSTed to it, and answers as a test tells it
//! to (a status, a `Retry-After`, a bearer token it requires).

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use anyhow::{Context, Result, anyhow};
use bytes::Bytes;
use http::header::{AUTHORIZATION, CONTENT_TYPE, RETRY_AFTER};
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio::time::Instant;

use crate::certs::TestPki;
use crate::cloud::{CloudMessage, ReadingKey};
use crate::wait_until;

/// Largest request body the server reads.
const MAX_BODY: usize = 64 << 20;

/// An answer the server gives instead of `200 OK`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Answer {
    /// Status code.
    pub status: u16,
    /// `Retry-After` (seconds), if any.
    pub retry_after: Option<u64>,
}

impl Answer {
    /// A status without `Retry-After`.
    pub fn status(status: u16) -> Self {
        Self { status, retry_after: None }
    }
}

/// One request the server answered.
#[derive(Clone, Debug)]
pub struct Received {
    /// The status it answered with.
    pub status: u16,
    /// The readings of the body, each as the gateway encoded it.
    pub readings: Vec<Bytes>,
    /// When it arrived.
    pub at: Instant,
    /// The `Content-Type` header.
    pub content_type: String,
}

#[derive(Debug, Default)]
struct State {
    received: Vec<Received>,
    /// Answers for the next requests, in order (then `200 OK`).
    planned: VecDeque<Answer>,
    /// The answer to every request while set (after `planned`).
    always: Option<Answer>,
    /// Requests refused for a missing or wrong token (401).
    unauthorized: u64,
}

/// How the server is set up.
#[derive(Clone, Debug, Default)]
pub struct HttpCloudOptions {
    /// Serve HTTPS with this PKI's server certificate.
    pub tls: Option<TestPki>,
    /// Answer 401 unless `Authorization: Bearer <token>`.
    pub token: Option<String>,
    /// Listen on this port (default: any free one).
    pub port: Option<u16>,
}

/// A recording HTTP endpoint on `127.0.0.1`, path `/ingest`.
pub struct HttpCloud {
    addr: SocketAddr,
    tls: bool,
    state: Arc<Mutex<State>>,
    task: JoinHandle<()>,
}

impl Drop for HttpCloud {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl HttpCloud {
    /// Starts a plain HTTP server without a token.
    pub async fn start() -> Result<Self> {
        Self::start_with(HttpCloudOptions::default()).await
    }

    /// Starts a server as `options` say.
    pub async fn start_with(options: HttpCloudOptions) -> Result<Self> {
        let listener = TcpListener::bind(("127.0.0.1", options.port.unwrap_or(0))).await?;
        let addr = listener.local_addr()?;
        let acceptor = match &options.tls {
            None => None,
            Some(pki) => {
                let chain =
                    CertificateDer::pem_slice_iter(pki.server_cert.as_bytes()).collect::<Result<Vec<_>, _>>()?;
                let key = PrivateKeyDer::from_pem_slice(pki.server_key.as_bytes())?;
                let provider = Arc::new(rustls::crypto::ring::default_provider());
                let config = rustls::ServerConfig::builder_with_provider(provider)
                    .with_safe_default_protocol_versions()?
                    .with_no_client_auth()
                    .with_single_cert(chain, key)?;
                Some(tokio_rustls::TlsAcceptor::from(Arc::new(config)))
            }
        };
        let state = Arc::new(Mutex::new(State::default()));
        let token = options.token.map(|t| format!("Bearer {t}"));
        let shared = Arc::clone(&state);
        let task = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else { continue };
                let (state, token, acceptor) = (Arc::clone(&shared), token.clone(), acceptor.clone());
                tokio::spawn(async move {
                    let service = service_fn(move |req| handle(req, Arc::clone(&state), token.clone()));
                    let builder = hyper::server::conn::http1::Builder::new();
                    match acceptor {
                        None => {
                            let _ = builder.serve_connection(TokioIo::new(stream), service).await;
                        }
                        Some(acceptor) => {
                            // A client that does not trust the certificate fails here.
                            let Ok(stream) = acceptor.accept(stream).await else { return };
                            let _ = builder.serve_connection(TokioIo::new(stream), service).await;
                        }
                    }
                });
            }
        });
        Ok(Self { addr, tls: options.tls.is_some(), state, task })
    }

    /// The endpoint's URL (`http://127.0.0.1:PORT/ingest`, or `https://localhost:PORT/ingest`).
    pub fn url(&self) -> String {
        if self.tls {
            format!("https://localhost:{}/ingest", self.addr.port())
        } else {
            format!("http://127.0.0.1:{}/ingest", self.addr.port())
        }
    }

    fn state(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Answers the next requests with these answers, in order.
    pub fn plan(&self, answers: impl IntoIterator<Item = Answer>) {
        self.state().planned.extend(answers);
    }

    /// Answers every request with `answer` (after the planned ones) until [`HttpCloud::recover`].
    pub fn always(&self, answer: Answer) {
        self.state().always = Some(answer);
    }

    /// Answers `200 OK` again.
    pub fn recover(&self) {
        self.state().always = None;
    }

    /// Every request answered so far.
    pub fn received(&self) -> Vec<Received> {
        self.state().received.clone()
    }

    /// Requests refused 401 for their token.
    pub fn unauthorized(&self) -> u64 {
        self.state().unauthorized
    }

    /// The readings of the requests answered 2xx, as cloud messages.
    pub fn accepted(&self) -> Vec<CloudMessage> {
        self.messages(|s| (200..300).contains(&s))
    }

    /// The readings of the requests answered with a status `keep` accepts.
    pub fn messages(&self, keep: impl Fn(u16) -> bool) -> Vec<CloudMessage> {
        self.state()
            .received
            .iter()
            .filter(|r| keep(r.status))
            .flat_map(|r| r.readings.iter().map(|p| CloudMessage::stateless("http", p.clone(), r.at)))
            .collect()
    }

    /// The keys of the readings of the requests answered 2xx.
    pub fn keys(&self) -> Result<Vec<ReadingKey>> {
        self.accepted().iter().map(CloudMessage::key).collect()
    }

    /// Waits until the readings accepted satisfy `cond`.
    pub async fn wait_for<F>(&self, what: &str, timeout: Duration, mut cond: F) -> Result<()>
    where
        F: FnMut(&[CloudMessage]) -> bool,
    {
        wait_until(what, timeout, || {
            let msgs = self.accepted();
            let done = cond(&msgs);
            async move { Ok(done.then_some(())) }
        })
        .await
    }

    /// Waits until at least `n` readings were accepted.
    pub async fn wait_for_count(&self, n: usize, timeout: Duration) -> Result<()> {
        self.wait_for(&format!("{n} readings at the HTTP endpoint"), timeout, |m| m.len() >= n).await
    }
}

async fn handle(
    req: Request<Incoming>,
    state: Arc<Mutex<State>>,
    token: Option<String>,
) -> Result<Response<Full<Bytes>>, std::convert::Infallible> {
    let reply = |status: StatusCode, retry_after: Option<u64>, body: &'static str| {
        let mut r = Response::new(Full::new(Bytes::from_static(body.as_bytes())));
        *r.status_mut() = status;
        if let Some(s) = retry_after
            && let Ok(v) = http::HeaderValue::from_str(&s.to_string())
        {
            r.headers_mut().insert(RETRY_AFTER, v);
        }
        Ok(r)
    };
    let lock = || state.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
    if req.method() != http::Method::POST || req.uri().path() != "/ingest" {
        return reply(StatusCode::NOT_FOUND, None, "no such endpoint");
    }
    if let Some(want) = &token
        && req.headers().get(AUTHORIZATION).and_then(|v| v.to_str().ok()) != Some(want.as_str())
    {
        lock().unauthorized += 1;
        return reply(StatusCode::UNAUTHORIZED, None, "bad token");
    }
    let content_type = req.headers().get(CONTENT_TYPE).and_then(|v| v.to_str().ok()).unwrap_or_default().to_string();
    let Ok(body) = Limited::new(req.into_body(), MAX_BODY).collect().await else {
        return reply(StatusCode::PAYLOAD_TOO_LARGE, None, "body too large or cut");
    };
    let readings = match split(&content_type, &body.to_bytes()) {
        Ok(r) => r,
        Err(_) => return reply(StatusCode::UNPROCESSABLE_ENTITY, None, "not a batch of readings"),
    };
    let mut s = lock();
    let answer = s.planned.pop_front().or_else(|| s.always.clone()).unwrap_or(Answer::status(200));
    s.received.push(Received { status: answer.status, readings, at: Instant::now(), content_type });
    drop(s);
    let status = StatusCode::from_u16(answer.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    reply(status, answer.retry_after, "answered as planned")
}

/// The readings of a batch: a JSON array of readings, or a protobuf `BufferEntry`.
fn split(content_type: &str, body: &Bytes) -> Result<Vec<Bytes>> {
    if content_type.starts_with("application/json") {
        let values: Vec<serde_json::Value> = serde_json::from_slice(body).context("a JSON array")?;
        values.iter().map(|v| Ok(Bytes::from(serde_json::to_vec(v)?))).collect()
    } else if content_type.starts_with("application/x-protobuf") {
        let readings = fieldgate_gateway::buffer::entry_readings(body).map_err(|e| anyhow!("{e}"))?;
        Ok(readings.into_iter().map(Bytes::copy_from_slice).collect())
    } else {
        Err(anyhow!("content type {content_type:?}"))
    }
}
