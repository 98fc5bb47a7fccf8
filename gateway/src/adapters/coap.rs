//! CoAP (RFC 7252) over UDP, with coap-lite for the messages.
//!
//! **Push.** One listener (`--coap-listen`) for every CoAP device. A device POSTs or PUTs a
//! reading to `/{namespace}/{name}` (or its `pushPath`), with `?token=...` when it has a
//! token Secret. A confirmable request is answered (2.04 Changed, piggybacked) only once
//! JetStream accepted the reading; 5.03 when it was not. Non-confirmable requests are handled
//! the same way and counted (`fieldgate_ingress_messages_total{protocol="coap",reason="non"}`).
//! A retransmitted request (same peer and message id) is answered from a bounded cache and
//! never becomes a second reading. Refusals: unknown path 4.04 (`unknown_device`), wrong
//! token 4.01 (`unauthorized`), other methods 4.05, a bad payload 4.00 with the reason as
//! diagnostic payload, bodies above `maxBodyBytes` 4.13 (Size1 or Block1 beyond the limit),
//! out-of-order blocks 4.08. Block1 transfers are reassembled in sequence, bounded per
//! device and in the number of transfers at once. Undecodable datagrams are counted
//! (`malformed`) and dropped.
//!
//! **Poll and Observe.** With `host`, the device task reads `path` every `pollInterval`
//! (GET, Block2 followed up to `maxBodyBytes`), or registers an observation (Observe 0) and
//! turns every notification into a reading; a confirmable notification is acknowledged once
//! the reading was accepted. Without a notification for Max-Age (default 60 s) plus the
//! timeout, the observation is registered again. A resource that does not accept the
//! observation is polled instead.
//!
//! Device error kinds: `timeout`, `io`, `status` (4.xx/5.xx answer), `malformed`, `too_large`,
//! `block`, `method`, `not_accepted`, and the payload kinds of [`super::payload`].

use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU16, Ordering};
use std::sync::{Arc, Mutex, OnceLock, PoisonError};
use std::time::{Duration, SystemTime};

use coap_lite::block_handler::BlockValue;
use coap_lite::option_value::OptionValueU32;
use coap_lite::{CoapOption, MessageClass, MessageType, Packet, RequestType, ResponseType};
use fieldgate_crds::CoapConnection;
use futures::StreamExt;
use prometheus_client::metrics::counter::Counter;
use tokio::net::UdpSocket;
use tokio::sync::Semaphore;
use tokio::time::Instant;

use super::hub::{Credential, DeviceHub, Listener, Registered, bind_udp};
use super::{DeviceTask, payload};
use crate::command::{Inbox, Outcome, Reason, Status};
use crate::metrics::IngressLabels;
use crate::reading::{self, Reading, pb};

const LISTENER: Listener = Listener::Coap;
const PROTOCOL: &str = LISTENER.protocol();
/// Largest datagram read; anything longer is refused as `too_large`.
const DATAGRAM: usize = 2048;
/// How long a push waits for JetStream before it is answered 5.03.
const ACCEPT_TIMEOUT: Duration = Duration::from_secs(10);
/// Pushes waiting for acceptance at once; beyond it requests get 5.03 at once.
const MAX_PENDING: usize = 8192;
/// Retransmission cache: entries and their lifetime (RFC 7252 EXCHANGE_LIFETIME is 247 s;
/// the bound on entries keeps memory flat under load).
const DEDUP_ENTRIES: usize = 32_768;
const DEDUP_LIFETIME: Duration = Duration::from_secs(120);
/// Block1 transfers in progress at once, and how long an idle one is kept.
const BLOCK_TRANSFERS: usize = 1024;
const BLOCK_IDLE: Duration = Duration::from_secs(60);
/// Default Max-Age of a notification (RFC 7252 5.10.5).
const DEFAULT_MAX_AGE: Duration = Duration::from_secs(60);

// ---------------------------------------------------------------------------------------------
// Messages

/// The path of a request: its Uri-Path options joined with `/`, with a leading `/`.
pub fn path_of(p: &Packet) -> String {
    let mut path = String::new();
    for seg in p.get_option(CoapOption::UriPath).into_iter().flatten() {
        path.push('/');
        path.push_str(&String::from_utf8_lossy(seg));
    }
    if path.is_empty() {
        path.push('/');
    }
    path
}

/// The value of query parameter `name` (`name=value` in a Uri-Query option).
pub fn query<'a>(p: &'a Packet, name: &str) -> Option<&'a [u8]> {
    p.get_option(CoapOption::UriQuery)?.iter().find_map(|q| {
        let rest = q.strip_prefix(name.as_bytes())?;
        rest.strip_prefix(b"=")
    })
}

fn set_path(p: &mut Packet, path: &str) {
    for seg in path.split('/').filter(|s| !s.is_empty()) {
        p.add_option(CoapOption::UriPath, seg.as_bytes().to_vec());
    }
}

fn block(p: &Packet, opt: CoapOption) -> Option<Result<BlockValue, ()>> {
    p.get_first_option_as::<BlockValue>(opt).map(|r| r.map_err(|_| ()))
}

/// A response to `req`: piggybacked ACK for a CON, a NON (with `mid`) for a NON.
fn response(req: &Packet, status: ResponseType, mid: u16) -> Packet {
    let mut p = Packet::new();
    p.header.set_version(1);
    if req.header.get_type() == MessageType::Confirmable {
        p.header.set_type(MessageType::Acknowledgement);
        p.header.message_id = req.header.message_id;
    } else {
        p.header.set_type(MessageType::NonConfirmable);
        p.header.message_id = mid;
    }
    p.header.code = MessageClass::Response(status);
    p.set_token(req.get_token().to_vec());
    p
}

fn empty(kind: MessageType, mid: u16) -> Packet {
    let mut p = Packet::new();
    p.header.set_version(1);
    p.header.set_type(kind);
    p.header.code = MessageClass::Empty;
    p.header.message_id = mid;
    p
}

// ---------------------------------------------------------------------------------------------
// Push listener

/// Retransmissions seen recently: `None` while the first copy is being handled.
#[derive(Default)]
struct Dedup {
    answers: HashMap<(SocketAddr, u16), Option<Vec<u8>>>,
    order: VecDeque<((SocketAddr, u16), Instant)>,
    /// Entries forgotten before their lifetime because the cache was full, not yet counted.
    evicted: u64,
}

enum Seen {
    New,
    InProgress,
    Answered(Vec<u8>),
}

impl Dedup {
    fn check(&mut self, key: (SocketAddr, u16)) -> Seen {
        let now = Instant::now();
        while let Some((k, at)) = self.order.front() {
            let live = now.duration_since(*at) < DEDUP_LIFETIME;
            if self.order.len() < DEDUP_ENTRIES && live {
                break;
            }
            if live {
                // Full: a retransmission of this one would now be handled as a new request.
                self.evicted += 1;
            }
            let k = *k;
            self.order.pop_front();
            self.answers.remove(&k);
        }
        match self.answers.get(&key) {
            Some(Some(bytes)) => Seen::Answered(bytes.clone()),
            Some(None) => Seen::InProgress,
            None => {
                self.answers.insert(key, None);
                self.order.push_back((key, now));
                Seen::New
            }
        }
    }

    /// The entries evicted since the last call.
    fn take_evicted(&mut self) -> u64 {
        std::mem::take(&mut self.evicted)
    }

    fn answer(&mut self, key: (SocketAddr, u16), bytes: &[u8]) {
        if let Some(slot) = self.answers.get_mut(&key) {
            *slot = Some(bytes.to_vec());
        }
    }
}

/// One Block1 transfer being reassembled.
struct Transfer {
    body: Vec<u8>,
    size: usize,
    last: Instant,
}

/// What a Block1 block did.
enum BlockStep {
    /// More blocks expected: answer 2.31 with this Block1 value.
    More(BlockValue),
    /// The last block: the whole body.
    Done(Vec<u8>, BlockValue),
    /// Beyond the device's limit.
    TooLarge,
    /// Out of sequence, or an unknown transfer.
    Incomplete,
    /// Too many transfers at once.
    Busy,
}

#[derive(Default)]
struct Blocks {
    transfers: HashMap<(SocketAddr, String), Transfer>,
}

impl Blocks {
    fn add(&mut self, key: (SocketAddr, String), b: &BlockValue, data: &[u8], max: usize) -> BlockStep {
        let now = Instant::now();
        if b.num == 0 {
            if !self.transfers.contains_key(&key) && self.transfers.len() >= BLOCK_TRANSFERS {
                self.transfers.retain(|_, t| now.duration_since(t.last) < BLOCK_IDLE);
                if self.transfers.len() >= BLOCK_TRANSFERS {
                    return BlockStep::Busy;
                }
            }
            self.transfers.insert(key.clone(), Transfer { body: Vec::new(), size: b.size(), last: now });
        }
        let Some(t) = self.transfers.get_mut(&key) else { return BlockStep::Incomplete };
        let offset = usize::from(b.num) * b.size();
        if b.size() != t.size || offset != t.body.len() || (b.more && data.len() != b.size()) {
            self.transfers.remove(&key);
            return BlockStep::Incomplete;
        }
        if t.body.len() + data.len() > max {
            self.transfers.remove(&key);
            return BlockStep::TooLarge;
        }
        t.body.extend_from_slice(data);
        t.last = now;
        if b.more {
            return BlockStep::More(b.clone());
        }
        match self.transfers.remove(&key) {
            Some(t) => BlockStep::Done(t.body, b.clone()),
            None => BlockStep::Incomplete,
        }
    }
}

struct Server {
    socket: UdpSocket,
    hub: Arc<DeviceHub>,
    dedup: Mutex<Dedup>,
    blocks: Mutex<Blocks>,
    pending: Arc<Semaphore>,
    next_mid: AtomicU16,
    /// `fieldgate_ingress_messages_total{protocol="coap"}` for CON and NON requests, looked up
    /// on first use (every request counts one).
    con_messages: OnceLock<Counter>,
    non_messages: OnceLock<Counter>,
}

/// Runs the push listener until the hub's token is cancelled.
pub(crate) async fn listen(hub: Arc<DeviceHub>) {
    let Some(socket) = bind_udp(&hub, LISTENER).await else { return };
    let server = Server::new(socket, Arc::clone(&hub));
    let mut buf = vec![0u8; DATAGRAM];
    // Requests waiting for the buffer to accept their reading: polled here, so that a stored
    // buffer entry wakes this one task rather than a task per request.
    let mut waiting = futures::stream::FuturesUnordered::new();
    loop {
        let received = tokio::select! {
            biased;
            () = hub.cancel.cancelled() => break,
            Some(()) = waiting.next(), if !waiting.is_empty() => continue,
            r = server.socket.recv_from(&mut buf) => r,
        };
        match received {
            Ok((n, peer)) => {
                if let Some(answer) = server.handle(&buf[..n], peer) {
                    waiting.push(answer);
                }
            }
            Err(e) => tracing::debug!(error = %e, "CoAP receive failed"),
        }
    }
    // Stopping: the requests already taken are still answered (the buffer writer resolves
    // every reading it was handed).
    while waiting.next().await.is_some() {}
}

/// The push listener's handling of datagrams, answering from `socket`, without its receive
/// loop: the fuzz targets' entry point, not an API.
#[doc(hidden)]
pub struct PushListener(Arc<Server>);

impl PushListener {
    /// A listener for `hub`'s CoAP devices.
    pub fn new(socket: UdpSocket, hub: Arc<DeviceHub>) -> Self {
        Self(Server::new(socket, hub))
    }

    /// Handles one datagram from `peer`; `true` when it carried a reading to keep.
    pub fn handle(&self, data: &[u8], peer: SocketAddr) -> bool {
        self.0.handle(data, peer).is_some()
    }
}

impl Server {
    fn new(socket: UdpSocket, hub: Arc<DeviceHub>) -> Arc<Self> {
        Arc::new(Server {
            socket,
            hub,
            dedup: Mutex::default(),
            blocks: Mutex::default(),
            pending: Arc::new(Semaphore::new(MAX_PENDING)),
            next_mid: AtomicU16::new(rand::random()),
            con_messages: OnceLock::new(),
            non_messages: OnceLock::new(),
        })
    }

    fn send(&self, bytes: &[u8], peer: SocketAddr) {
        // UDP: a full socket buffer drops the answer like the network would; the client retransmits.
        if let Err(e) = self.socket.try_send_to(bytes, peer) {
            tracing::debug!(%peer, error = %e, "CoAP answer not sent");
        }
    }

    /// Counts a handled request of `kind` (`con` or `non`).
    fn count_message(&self, kind: &'static str) {
        let cell = if kind == "con" { &self.con_messages } else { &self.non_messages };
        cell.get_or_init(|| {
            let labels = IngressLabels { protocol: PROTOCOL, reason: kind };
            self.hub.metrics.ingress_messages.get_or_create(&labels).clone()
        })
        .inc();
    }

    fn mid(&self) -> u16 {
        self.next_mid.fetch_add(1, Ordering::Relaxed)
    }

    /// Answers `req` with `status` (and a diagnostic text), remembering it for retransmissions.
    fn reply(&self, req: &Packet, peer: SocketAddr, status: ResponseType, edit: impl FnOnce(&mut Packet)) {
        let mut p = response(req, status, self.mid());
        edit(&mut p);
        match p.to_bytes() {
            Ok(bytes) => {
                self.dedup.lock().unwrap_or_else(PoisonError::into_inner).answer((peer, req.header.message_id), &bytes);
                self.send(&bytes, peer);
            }
            Err(e) => tracing::debug!(error = ?e, "CoAP answer not encodable"),
        }
    }

    fn refuse(&self, req: &Packet, peer: SocketAddr, status: ResponseType, why: &str) {
        self.reply(req, peer, status, |p| p.payload = why.as_bytes().to_vec());
    }

    /// Handles one datagram; a reading to keep comes back as the future that answers it once
    /// the buffer accepted the reading (the listener polls them all, no task each).
    fn handle(
        self: &Arc<Self>,
        data: &[u8],
        peer: SocketAddr,
    ) -> Option<impl std::future::Future<Output = ()> + Send + use<>> {
        let hub = &self.hub;
        if data.len() >= DATAGRAM {
            hub.reject(PROTOCOL, "too_large");
            return None;
        }
        let req = match Packet::from_bytes(data) {
            Ok(p) => p,
            Err(e) => {
                hub.reject(PROTOCOL, "malformed");
                tracing::debug!(%peer, error = ?e, "undecodable CoAP datagram");
                return None;
            }
        };
        let method = match req.header.code {
            MessageClass::Request(m) => m,
            MessageClass::Empty => {
                // A CoAP ping (empty CON) is answered with a reset; stray ACK/RST are ignored.
                if req.header.get_type() == MessageType::Confirmable
                    && let Ok(bytes) = empty(MessageType::Reset, req.header.message_id).to_bytes()
                {
                    self.send(&bytes, peer);
                }
                return None;
            }
            _ => {
                hub.reject(PROTOCOL, "unexpected_response");
                return None;
            }
        };
        let kind = match req.header.get_type() {
            MessageType::Confirmable => "con",
            MessageType::NonConfirmable => "non",
            _ => {
                hub.reject(PROTOCOL, "malformed");
                return None;
            }
        };
        let key = (peer, req.header.message_id);
        let (seen, evicted) = {
            let mut dedup = self.dedup.lock().unwrap_or_else(PoisonError::into_inner);
            (dedup.check(key), dedup.take_evicted())
        };
        if evicted > 0 {
            hub.evicted(PROTOCOL, "retransmission_cache", evicted);
        }
        match seen {
            Seen::New => {}
            Seen::InProgress => return None,
            Seen::Answered(bytes) => {
                self.send(&bytes, peer);
                return None;
            }
        }
        self.count_message(kind);
        let path = path_of(&req);
        let Some(dev) = hub.lookup(LISTENER, &path) else {
            hub.reject(PROTOCOL, "unknown_device");
            self.refuse(&req, peer, ResponseType::NotFound, "unknown device");
            return None;
        };
        if !matches!(method, RequestType::Post | RequestType::Put) {
            dev.task.count_error("method");
            self.refuse(&req, peer, ResponseType::MethodNotAllowed, "POST or PUT a reading");
            return None;
        }
        if !dev.token_matches(query(&req, "token").unwrap_or_default()) {
            hub.reject(PROTOCOL, "unauthorized");
            self.refuse(&req, peer, ResponseType::Unauthorized, "wrong or missing token");
            return None;
        }
        let too_large = |server: &Self| {
            dev.task.count_error("too_large");
            let max = u32::try_from(dev.max_body).unwrap_or(u32::MAX);
            server.reply(&req, peer, ResponseType::RequestEntityTooLarge, |p| {
                p.add_option_as(CoapOption::Size1, OptionValueU32(max));
                p.payload = b"body too large".to_vec();
            });
        };
        let size1 = req.get_first_option_as::<OptionValueU32>(CoapOption::Size1).and_then(Result::ok);
        if size1.is_some_and(|s| usize::try_from(s.0).unwrap_or(usize::MAX) > dev.max_body) {
            too_large(self);
            return None;
        }
        let (body, block1) = match block(&req, CoapOption::Block1) {
            None => (req.payload.clone(), None),
            Some(Err(())) => {
                dev.task.count_error("malformed");
                self.refuse(&req, peer, ResponseType::BadRequest, "bad Block1 option");
                return None;
            }
            Some(Ok(b)) => {
                let step = self.blocks.lock().unwrap_or_else(PoisonError::into_inner).add(
                    (peer, path.clone()),
                    &b,
                    &req.payload,
                    dev.max_body,
                );
                match step {
                    BlockStep::More(ack) => {
                        self.reply(&req, peer, ResponseType::Continue, |p| {
                            p.add_option_as(CoapOption::Block1, ack);
                        });
                        return None;
                    }
                    BlockStep::Done(body, ack) => (body, Some(ack)),
                    BlockStep::TooLarge => {
                        too_large(self);
                        return None;
                    }
                    BlockStep::Incomplete => {
                        dev.task.count_error("block");
                        self.refuse(&req, peer, ResponseType::RequestEntityIncomplete, "block out of sequence");
                        return None;
                    }
                    BlockStep::Busy => {
                        hub.reject(PROTOCOL, "overloaded");
                        self.refuse(&req, peer, ResponseType::ServiceUnavailable, "too many transfers");
                        return None;
                    }
                }
            }
        };
        if body.len() > dev.max_body {
            too_large(self);
            return None;
        }
        let points = match payload::decode(&dev.task.device.points, &body, None) {
            Ok(p) => p,
            Err(e) => {
                dev.task.count_error(e.kind());
                tracing::debug!(device = %dev.task.key(), %peer, kind = e.kind(), error = %e, "CoAP push refused");
                self.refuse(&req, peer, ResponseType::BadRequest, &e.to_string());
                return None;
            }
        };
        let Ok(permit) = Arc::clone(&self.pending).try_acquire_owned() else {
            hub.reject(PROTOCOL, "overloaded");
            self.refuse(&req, peer, ResponseType::ServiceUnavailable, "busy");
            return None;
        };
        let server = Arc::clone(self);
        Some(async move {
            let reading = dev.reading(points);
            let accepted = match dev.task.emit_confirmed(reading).await {
                Ok(rx) => matches!(tokio::time::timeout(ACCEPT_TIMEOUT, rx).await, Ok(Ok(Ok(())))),
                Err(_) => false,
            };
            if accepted {
                server.reply(&req, peer, ResponseType::Changed, |p| {
                    if let Some(b) = block1 {
                        p.add_option_as(CoapOption::Block1, b);
                    }
                });
            } else {
                dev.task.count_error("not_accepted");
                server.refuse(&req, peer, ResponseType::ServiceUnavailable, "not accepted, try again");
            }
            drop(permit);
        })
    }
}

// ---------------------------------------------------------------------------------------------
// Client: poll and observe

/// Why a request to a device failed.
#[derive(Debug, thiserror::Error)]
pub enum CoapError {
    /// No answer in time.
    #[error("no answer within {0:?}")]
    Timeout(Duration),
    /// The socket failed.
    #[error("socket: {0}")]
    Io(#[from] std::io::Error),
    /// The device answered with an error code.
    #[error("device answered {0:?}")]
    Status(ResponseType),
    /// A block-wise answer out of sequence or without its option.
    #[error("block-wise answer out of sequence")]
    Block,
    /// The body grew beyond `maxBodyBytes`.
    #[error("body larger than {0} bytes")]
    TooLarge(usize),
    /// The payload did not map to the points.
    #[error(transparent)]
    Payload(#[from] payload::PayloadError),
}

impl CoapError {
    /// A static label for metrics.
    pub fn kind(&self) -> &'static str {
        match self {
            CoapError::Timeout(_) => "timeout",
            CoapError::Io(_) => "io",
            CoapError::Status(_) => "status",
            CoapError::Block => "block",
            CoapError::TooLarge(_) => "too_large",
            CoapError::Payload(e) => e.kind(),
        }
    }
}

struct Client {
    method: RequestType,
    socket: UdpSocket,
    mid: u16,
    timeout: Duration,
    path: String,
    max_body: usize,
}

impl Client {
    async fn open(host: &str, port: u16, path: String, timeout: Duration, max_body: usize) -> Result<Self, CoapError> {
        let addr = tokio::time::timeout(timeout, tokio::net::lookup_host((host, port)))
            .await
            .map_err(|_| CoapError::Timeout(timeout))??
            .next()
            .ok_or_else(|| std::io::Error::new(std::io::ErrorKind::NotFound, format!("{host} has no address")))?;
        let local: SocketAddr = if addr.is_ipv4() { ([0, 0, 0, 0], 0).into() } else { ([0u16; 8], 0).into() };
        let socket = UdpSocket::bind(local).await?;
        socket.connect(addr).await?;
        Ok(Self { method: RequestType::Get, socket, mid: rand::random(), timeout, path, max_body })
    }

    fn request(&mut self, token: &[u8], observe: Option<u32>, block2: Option<BlockValue>) -> Packet {
        self.mid = self.mid.wrapping_add(1);
        let mut p = Packet::new();
        p.header.set_version(1);
        p.header.set_type(MessageType::Confirmable);
        p.header.code = MessageClass::Request(self.method);
        p.header.message_id = self.mid;
        p.set_token(token.to_vec());
        if let Some(o) = observe {
            p.add_option_as(CoapOption::Observe, OptionValueU32(o));
        }
        set_path(&mut p, &self.path);
        if let Some(b) = block2 {
            p.add_option_as(CoapOption::Block2, b);
        }
        p
    }

    async fn send(&self, p: &Packet) -> Result<(), CoapError> {
        let bytes = p.to_bytes().map_err(|_| CoapError::Block)?;
        self.socket.send(&bytes).await?;
        Ok(())
    }

    /// Receives the next message of `token` (answers and notifications); an empty ACK of a
    /// separate response is skipped; other datagrams are ignored. `None` at the deadline.
    async fn receive(&self, token: &[u8], until: Instant) -> Result<Option<Packet>, CoapError> {
        let mut buf = vec![0u8; DATAGRAM];
        loop {
            let n = match tokio::time::timeout_at(until, self.socket.recv(&mut buf)).await {
                Err(_) => return Ok(None),
                Ok(r) => r?,
            };
            let Ok(p) = Packet::from_bytes(&buf[..n]) else {
                tracing::debug!("undecodable CoAP datagram from a device");
                continue;
            };
            if matches!(p.header.code, MessageClass::Response(_)) && p.get_token() == token {
                return Ok(Some(p));
            }
        }
    }

    async fn ack(&self, p: &Packet) {
        if p.header.get_type() == MessageType::Confirmable
            && let Ok(bytes) = empty(MessageType::Acknowledgement, p.header.message_id).to_bytes()
        {
            let _ = self.socket.send(&bytes).await;
        }
    }

    /// One request (with retransmissions within the timeout) and its answer.
    async fn get(
        &mut self,
        token: &[u8],
        observe: Option<u32>,
        block2: Option<BlockValue>,
    ) -> Result<Packet, CoapError> {
        let req = self.request(token, observe, block2);
        self.exchange(req, token).await
    }

    async fn exchange(&mut self, req: Packet, token: &[u8]) -> Result<Packet, CoapError> {
        let deadline = Instant::now() + self.timeout;
        let mut wait = (self.timeout / 4).max(Duration::from_millis(50));
        loop {
            self.send(&req).await?;
            let until = (Instant::now() + wait).min(deadline);
            if let Some(p) = self.receive(token, until).await? {
                self.ack(&p).await;
                return Ok(p);
            }
            if Instant::now() >= deadline {
                return Err(CoapError::Timeout(self.timeout));
            }
            wait *= 2;
        }
    }

    /// Completes a block-wise answer whose first block is `first`, up to `max_body`.
    async fn rest_of_body(&mut self, first: &Packet) -> Result<Vec<u8>, CoapError> {
        let mut body = first.payload.clone();
        let mut b = match block(first, CoapOption::Block2) {
            Some(b) => b.map_err(|()| CoapError::Block)?,
            None => BlockValue { num: 0, more: false, size_exponent: 6 },
        };
        while b.more {
            if body.len() > self.max_body {
                return Err(CoapError::TooLarge(self.max_body));
            }
            let next = BlockValue {
                num: b.num.checked_add(1).ok_or(CoapError::Block)?,
                more: false,
                size_exponent: b.size_exponent,
            };
            let token: [u8; 4] = rand::random();
            let p = self.get(&token, None, Some(next.clone())).await?;
            check_status(&p)?;
            let got = block(&p, CoapOption::Block2).ok_or(CoapError::Block)?.map_err(|()| CoapError::Block)?;
            if got.num != next.num || usize::from(got.num) * got.size() != body.len() {
                return Err(CoapError::Block);
            }
            body.extend_from_slice(&p.payload);
            b = got;
        }
        if body.len() > self.max_body {
            return Err(CoapError::TooLarge(self.max_body));
        }
        Ok(body)
    }
}

/// Sends a command to a CoAP device: `method` (PUT or POST) of `payload` to its resource.
pub(crate) async fn send_command(
    settings: &CoapConnection,
    method: RequestType,
    payload: Vec<u8>,
) -> Result<(), CoapError> {
    let Some(host) = &settings.host else {
        return Err(CoapError::Io(std::io::Error::new(
            std::io::ErrorKind::Unsupported,
            "the device has no host to send to",
        )));
    };
    let timeout = settings.timeout();
    let path = settings.path.clone().unwrap_or_else(|| "/".to_string());
    let max_body = settings.max_body_bytes();
    let mut c = Client::open(host, settings.port(), path, timeout, max_body).await?;
    c.method = method;
    let token: [u8; 4] = rand::random();
    let mut req = c.request(&token, None, None);
    req.payload = payload;
    let answer = c.exchange(req, &token).await?;
    check_status(&answer)
}

fn check_status(p: &Packet) -> Result<(), CoapError> {
    match p.header.code {
        MessageClass::Response(s) if s.is_error() => Err(CoapError::Status(s)),
        _ => Ok(()),
    }
}

fn max_age(p: &Packet) -> Duration {
    p.get_first_option_as::<OptionValueU32>(CoapOption::MaxAge)
        .and_then(Result::ok)
        .map_or(DEFAULT_MAX_AGE, |v| Duration::from_secs(u64::from(v.0)))
}

fn last_segment(path: &str) -> Option<&str> {
    path.rsplit('/').find(|s| !s.is_empty())
}

/// The device's reachability: gauge and transition logs.
struct Health {
    gauge: prometheus_client::metrics::gauge::Gauge,
    up: Option<bool>,
    device: String,
}

impl Health {
    fn set(&mut self, up: bool, error: Option<&CoapError>) {
        self.gauge.set(i64::from(up));
        if self.up != Some(up) {
            match (up, error) {
                (true, _) => tracing::info!(device = %self.device, "CoAP device answering"),
                (false, Some(e)) => {
                    tracing::warn!(device = %self.device, kind = e.kind(), error = %e, "CoAP device not answering")
                }
                (false, None) => {}
            }
        }
        self.up = Some(up);
    }
}

/// Runs one CoAP device until `task.cancel` fires: registers its push path with the
/// listener, and polls or observes its resource when it has a `host`.
pub async fn run(settings: &CoapConnection, task: DeviceTask, inbox: Inbox) {
    tokio::join!(serve(settings, &task), commands(settings, &task, inbox));
}

/// Executes the device's commands in order: a confirmable PUT of the value to its resource
/// (plain text for a one-point device, else `{<path or name>: value}`), `written` once the
/// device answered with a success code. Not sent again after an interruption (at most once).
async fn commands(settings: &CoapConnection, task: &DeviceTask, mut inbox: Inbox) {
    while let Some((job, point)) = task.next_command(&mut inbox, false).await {
        let body = if task.device.points.len() == 1 {
            job.value.to_text()
        } else {
            serde_json::Value::Object(job.object(point)).to_string()
        };
        let sent = tokio::time::timeout_at(job.deadline, send_command(settings, RequestType::Put, body.into_bytes()));
        let outcome = match sent.await {
            Ok(Ok(())) => Outcome::of(Status::Written),
            Ok(Err(e)) => {
                task.count_error("command");
                let reason = match e {
                    CoapError::Timeout(_) => Reason::Timeout,
                    CoapError::Io(_) => Reason::Unreachable,
                    _ => Reason::DeviceError,
                };
                Outcome::failed(reason, e.to_string())
            }
            Err(_) => Outcome::failed(Reason::Timeout, "not done before the command's deadline"),
        };
        job.finish(outcome);
    }
}

async fn serve(settings: &CoapConnection, task: &DeviceTask) {
    let d = Arc::clone(&task.device);
    let push_path = settings.push_path.clone().unwrap_or_else(|| format!("/{}/{}", d.namespace, d.name));
    let max_body = settings.max_body_bytes();
    let token = match &settings.token_secret_ref {
        None => Credential::Open,
        Some(r) => task.hub.credential(r, task),
    };
    let _registration = task.hub.register(LISTENER, push_path, Registered::new(task.clone(), token, max_body));
    match &settings.host {
        Some(host) => client_loop(settings, host, max_body, task).await,
        None => task.cancel.cancelled().await,
    }
}

async fn client_loop(settings: &CoapConnection, host: &str, max_body: usize, task: &DeviceTask) {
    let timeout = settings.timeout();
    let interval = task.device.poll_interval().max(Duration::from_millis(1));
    let path = settings.path.clone().unwrap_or_else(|| "/".to_string());
    let port = settings.port();
    let mut observe = settings.observe.unwrap_or(false);
    let labels = task.labels();
    let mut health =
        Health { gauge: task.metrics.device_connected.get_or_create(&labels).clone(), up: None, device: task.key() };
    health.gauge.set(0);
    let mut delays = crate::supervise::backoff(Duration::from_millis(200), Duration::from_secs(30));
    let mut client: Option<Client> = None;
    // Ticks on the monotonic clock; the slot names the poll (see `crate::clock`).
    let clock = Arc::clone(&task.hub.clock);
    let (mut schedule, mut ticker) = crate::clock::PollSchedule::start(interval, &clock);
    let ids = super::hub::IdClock::default();

    while !task.cancel.is_cancelled() {
        if client.is_none() {
            match Client::open(host, port, path.clone(), timeout, max_body).await {
                Ok(c) => client = Some(c),
                Err(e) => {
                    task.count_error(e.kind());
                    health.set(false, Some(&e));
                    let delay = delays.next().unwrap_or(Duration::from_secs(30));
                    tokio::select! {
                        () = task.cancel.cancelled() => break,
                        () = tokio::time::sleep(delay) => continue,
                    }
                }
            }
        }
        let Some(c) = client.as_mut() else { continue };
        let result = if observe {
            let r = task.cancel.run_until_cancelled(observe_once(c, task, &ids, &mut health)).await;
            match r {
                None => break,
                Some(Ok(false)) => {
                    tracing::warn!(device = %task.key(), "resource does not accept Observe; polling it instead");
                    observe = false;
                    Ok(())
                }
                Some(Ok(true)) => Ok(()),
                Some(Err(e)) => Err(e),
            }
        } else {
            tokio::select! {
                () = task.cancel.cancelled() => break,
                _ = ticker.tick() => {}
            }
            let slot = schedule.slot(clock.now());
            match task.cancel.run_until_cancelled(poll_once(c, task, slot)).await {
                None => break,
                Some(r) => r,
            }
        };
        match result {
            Ok(()) => {
                health.set(true, None);
                delays = crate::supervise::backoff(Duration::from_millis(200), Duration::from_secs(30));
            }
            Err(e) => {
                task.count_error(e.kind());
                tracing::debug!(device = %task.key(), kind = e.kind(), error = %e, "CoAP request failed");
                if matches!(e, CoapError::Timeout(_) | CoapError::Io(_)) {
                    health.set(false, Some(&e));
                    client = None;
                    let delay = delays.next().unwrap_or(Duration::from_secs(30));
                    tokio::select! {
                        () = task.cancel.cancelled() => break,
                        () = tokio::time::sleep(delay) => {}
                    }
                } else {
                    health.set(true, None);
                    if observe {
                        // Re-register after a pause rather than spinning on a bad resource.
                        tokio::select! {
                            () = task.cancel.cancelled() => break,
                            () = tokio::time::sleep(interval) => {}
                        }
                    }
                }
            }
        }
    }
    health.gauge.set(0);
}

fn polled_reading(task: &DeviceTask, id: String, points: Vec<pb::Point>) -> Reading {
    Reading {
        id,
        namespace: task.device.namespace.clone(),
        device: task.device.name.clone(),
        node: task.node.clone(),
        time_unix_nano: reading::unix_nanos(SystemTime::now()),
        buffer_seq: 0,
        points,
    }
}

async fn poll_once(c: &mut Client, task: &DeviceTask, slot: u64) -> Result<(), CoapError> {
    let token: [u8; 4] = rand::random();
    let p = c.get(&token, None, None).await?;
    check_status(&p)?;
    let body = c.rest_of_body(&p).await?;
    let points = payload::decode(&task.device.points, &body, last_segment(&c.path))?;
    task.metrics.polls.get_or_create(&task.labels()).inc();
    let d = &task.device;
    let reading = polled_reading(task, reading::message_id(&d.namespace, &d.name, slot), points);
    // A stopping gateway: nothing more to do with this reading.
    let _ = task.emit(reading).await;
    Ok(())
}

/// Registers an observation and turns notifications into readings until the observation
/// goes silent. `Ok(false)`: the resource does not accept Observe.
async fn observe_once(
    c: &mut Client,
    task: &DeviceTask,
    ids: &super::hub::IdClock,
    health: &mut Health,
) -> Result<bool, CoapError> {
    let token: [u8; 8] = rand::random();
    let first = c.get(&token, Some(0), None).await?;
    check_status(&first)?;
    let observing = first.get_observe_value().is_some();
    let mut next = Some(first);
    while let Some(p) = next.take() {
        health.set(true, None);
        let silence = max_age(&p) + c.timeout;
        match notification(c, task, ids, &p).await {
            Ok(()) => {}
            Err(e @ (CoapError::Timeout(_) | CoapError::Io(_))) => return Err(e),
            Err(e) => {
                task.count_error(e.kind());
                tracing::debug!(device = %task.key(), kind = e.kind(), error = %e, "CoAP notification refused");
                c.ack(&p).await;
            }
        }
        if !observing {
            return Ok(false);
        }
        next = c.receive(&token, Instant::now() + silence).await?;
        if let Some(n) = &next {
            check_status(n)?;
        }
    }
    tracing::debug!(device = %task.key(), "observation silent; registering again");
    Ok(true)
}

/// One notification (or the registration's answer): a reading, acknowledged once accepted.
async fn notification(
    c: &mut Client,
    task: &DeviceTask,
    ids: &super::hub::IdClock,
    p: &Packet,
) -> Result<(), CoapError> {
    let body = c.rest_of_body(p).await?;
    let points = payload::decode(&task.device.points, &body, last_segment(&c.path))?;
    let d = &task.device;
    let reading = polled_reading(task, reading::message_id(&d.namespace, &d.name, ids.next()), points);
    if let Ok(rx) = task.emit_confirmed(reading).await
        && matches!(tokio::time::timeout(ACCEPT_TIMEOUT, rx).await, Ok(Ok(Ok(()))))
    {
        c.ack(p).await;
    } else {
        // Not acknowledged: a confirmable notification is retransmitted by the device.
        task.count_error("not_accepted");
    }
    Ok(())
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    fn bv(num: u16, more: bool) -> BlockValue {
        BlockValue { num, more, size_exponent: 0 } // 16-byte blocks
    }

    #[test]
    fn block1_transfers_are_reassembled_in_order_and_bounded() {
        let mut b = Blocks::default();
        let peer: SocketAddr = "127.0.0.1:1".parse().unwrap();
        let key = || (peer, "/d".to_string());
        assert!(matches!(b.add(key(), &bv(0, true), &[1; 16], 40), BlockStep::More(_)));
        assert!(matches!(b.add(key(), &bv(1, true), &[2; 16], 40), BlockStep::More(_)));
        let BlockStep::Done(body, _) = b.add(key(), &bv(2, false), &[3; 4], 40) else { panic!() };
        assert_eq!(body.len(), 36);
        // Out of order, and unknown transfers.
        assert!(matches!(b.add(key(), &bv(0, true), &[1; 16], 40), BlockStep::More(_)));
        assert!(matches!(b.add(key(), &bv(2, true), &[1; 16], 40), BlockStep::Incomplete));
        assert!(matches!(b.add(key(), &bv(1, false), &[1; 3], 40), BlockStep::Incomplete));
        // Beyond the limit.
        assert!(matches!(b.add(key(), &bv(0, true), &[1; 16], 20), BlockStep::More(_)));
        assert!(matches!(b.add(key(), &bv(1, true), &[1; 16], 20), BlockStep::TooLarge));
        assert!(b.transfers.is_empty());
    }

    #[test]
    fn retransmissions_are_recognised() {
        let mut d = Dedup::default();
        let k: (SocketAddr, u16) = ("127.0.0.1:1".parse().unwrap(), 7);
        assert!(matches!(d.check(k), Seen::New));
        assert!(matches!(d.check(k), Seen::InProgress));
        d.answer(k, b"x");
        assert!(matches!(d.check(k), Seen::Answered(b) if b == b"x"));
    }

    #[test]
    fn a_full_retransmission_cache_counts_what_it_forgets_early() {
        let mut d = Dedup::default();
        let peer: SocketAddr = "127.0.0.1:1".parse().unwrap();
        let key = |i: usize| ((peer.ip(), 1 + (i / 65_536) as u16).into(), (i % 65_536) as u16);
        for i in 0..DEDUP_ENTRIES {
            assert!(matches!(d.check(key(i)), Seen::New));
        }
        assert_eq!(d.take_evicted(), 0);
        // One more: the oldest goes, within its lifetime.
        assert!(matches!(d.check(key(DEDUP_ENTRIES)), Seen::New));
        assert_eq!(d.take_evicted(), 1);
        assert_eq!(d.take_evicted(), 0);
        assert_eq!(d.answers.len(), DEDUP_ENTRIES);
        // So its retransmission is new again.
        assert!(matches!(d.check(key(0)), Seen::New));
        assert_eq!(d.take_evicted(), 1);
    }

    #[test]
    fn paths_and_queries_are_read_from_options() {
        let mut p = Packet::new();
        set_path(&mut p, "/default/th-1");
        p.add_option(CoapOption::UriQuery, b"token=abc".to_vec());
        assert_eq!(path_of(&p), "/default/th-1");
        assert_eq!(query(&p, "token"), Some(&b"abc"[..]));
        assert_eq!(query(&p, "tok"), None);
        assert_eq!(path_of(&Packet::new()), "/");
        assert_eq!(last_segment("/sensors/temp/"), Some("temp"));
    }
}
