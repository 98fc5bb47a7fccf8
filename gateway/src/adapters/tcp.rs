//! Raw TCP devices: one listener (`--tcp-listen`) for all of them.
//!
//! A device connects and sends newline-terminated frames: JSON objects or `key=value` lines
//! (see [`super::payload`]). The first frame must carry `id` and `token` and arrive within
//! `--first-frame-timeout`; it may carry values too. Every frame gets one answer line: `OK`
//! once its reading was accepted by JetStream (or for a frame with credentials only), or
//! `ERR <reason>`.
//!
//! - One live connection per device id: a newer connection with valid credentials replaces
//!   the older one, which is closed (after `ERR replaced`). A wrong token is refused and the
//!   live connection is untouched.
//! - An id replaced `--flap-limit` times within `--flap-window` is quarantined for
//!   `--quarantine`: its connections are refused (`quarantined`), logged once at warn and
//!   counted for the device (`kind="quarantined"`).
//! - Frames longer than `--max-frame-bytes`, a missing first frame and connections beyond
//!   `--tcp-max-connections` are refused and counted; they never hold a slot for long.
//!
//! Refusals before identification: `fieldgate_ingress_rejected_total{protocol="tcp",reason}`
//! (`connection_cap`, `first_frame_timeout`, `too_large`, `no_id`, `unknown_device`,
//! `unauthorized`, `quarantined`, and the payload kinds). After identification, bad frames
//! count as device errors with their payload kind and keep the connection.
//!
//! Memory: an identified connection silent for `--tcp-park-after` is *parked*: its socket
//! leaves the runtime (a registered tokio socket and a task cost about 1.3 KiB of user space)
//! for one shared epoll set, and what remains is a map entry with the socket, the device and
//! any partial frame. A frame, a close, a command or a replacement wakes it back onto the
//! runtime. Reads go through a stack buffer, so partial frames are the only per-connection
//! heap data. Parked connections: `fieldgate_ingress_parked_connections{protocol="tcp"}`.

use std::collections::HashMap;
use std::io;
use std::net::SocketAddr;
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock, PoisonError};
use std::time::Duration;

use fieldgate_crds::RawConnection;
use mio::unix::SourceFd;
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::time::Instant;

use super::hub::{CommandSlot, DeviceHub, Listener, Registered};
use super::{DeviceTask, payload};
use crate::command::{Inbox, Outcome, Reason, Status};
use crate::metrics::ProtocolLabels;

const LISTENER: Listener = Listener::Tcp;
const PROTOCOL: &str = LISTENER.protocol();
/// How long a frame waits for JetStream before it is answered `ERR not_accepted`.
const ACCEPT_TIMEOUT: Duration = Duration::from_secs(10);

/// Runs one raw TCP or UDP device: registers its id with the listener until cancelled, and
/// sends its commands, in order, as the frame `{"command": id, "point", "value"}` — a TCP
/// device on its live connection, a UDP device from the listener to the source of its last
/// authenticated datagram. A frame is not sent twice (`written` once handed over).
pub async fn run(raw: Raw, settings: &RawConnection, task: DeviceTask, mut inbox: Inbox) {
    let d = &task.device;
    let id = device_id(settings, d);
    let credential = task.hub.credential(&settings.token_secret_ref, &task);
    let max = task.hub.args.max_frame_bytes;
    let registration = task.hub.register(raw.listener(), id, Registered::new(task.clone(), credential, max));
    while let Some((job, point)) = task.next_command(&mut inbox, false).await {
        let line = job.frame(point);
        let sent = match raw {
            Raw::Udp => {
                let key = task.key();
                let send = super::udp::send_command(&task.hub, &key, line);
                tokio::time::timeout_at(job.deadline, send).await.unwrap_or_else(|_| Err("timed out".into()))
            }
            Raw::Tcp => {
                let send = send_frame(&task.hub, registration.entry(), line);
                tokio::time::timeout_at(job.deadline, send)
                    .await
                    .unwrap_or(Err("the frame was not written before the command's deadline"))
                    .map_err(str::to_string)
            }
        };
        let outcome = match sent {
            Ok(()) => Outcome::of(Status::Written),
            Err(e) => {
                task.count_error("command");
                Outcome::failed(Reason::NotConnected, e)
            }
        };
        job.finish(outcome);
    }
    // Close the device's live connection, if any.
    let slot = registration.entry().live.lock().unwrap_or_else(PoisonError::into_inner).clone();
    if let Some(slot) = slot {
        slot.stop.store(true, Ordering::Release);
        task.hub.tcp_park.wake(&slot);
    }
}

/// The id a raw TCP or UDP device identifies itself with.
pub(crate) fn device_id(settings: &RawConnection, d: &fieldgate_crds::GatewayDevice) -> String {
    settings.id.clone().unwrap_or_else(|| format!("{}/{}", d.namespace, d.name))
}

/// Idle identified connections, parked off the runtime on one epoll set (see the module doc).
#[derive(Default)]
pub struct Park {
    /// Where parked sockets are registered; set when the listener starts.
    registry: OnceLock<mio::Registry>,
    /// Parked connections by connection number (the epoll token).
    parked: Mutex<HashMap<u64, Box<Parked>>>,
}

/// A parked connection: its socket, outside the runtime, and everything else it holds.
struct Parked {
    stream: std::net::TcpStream,
    partial: Vec<u8>,
    session: Session,
}

impl Park {
    /// Wakes the connection of `slot`, parked or not, to look at its flags and commands.
    pub(crate) fn wake(&self, slot: &CommandSlot) {
        // An active connection takes the notification; a parked one finds it stored when resumed.
        slot.notify.notify_one();
        self.unpark(slot.conn);
    }

    /// Puts a parked connection back on the runtime.
    fn unpark(&self, conn: u64) {
        let Some(p) = self.parked.lock().unwrap_or_else(PoisonError::into_inner).remove(&conn) else { return };
        if let Some(registry) = self.registry.get() {
            let _ = registry.deregister(&mut SourceFd(&p.stream.as_raw_fd()));
        }
        p.session.state.parked.dec();
        tokio::spawn(resume(*p));
    }
}

/// Parks an idle connection. Gives it back when it must stay on the runtime (work is
/// waiting, or the socket cannot be parked); `None` once it is parked or closed.
fn park(conn: Conn, s: Session) -> Option<(Conn, Session)> {
    let hub = Arc::clone(&s.state.hub);
    let Some(registry) = hub.tcp_park.registry.get() else { return Some((conn, s)) };
    let mut parked = hub.tcp_park.parked.lock().unwrap_or_else(PoisonError::into_inner);
    let slot = &s.me.slot;
    let busy = slot.stop.load(Ordering::Acquire)
        || slot.replaced.load(Ordering::Acquire)
        || !slot.pending.lock().unwrap_or_else(PoisonError::into_inner).is_empty()
        || conn.partial.contains(&b'\n');
    if busy {
        return Some((conn, s));
    }
    let id = slot.conn;
    let Conn { stream, partial } = conn;
    let Ok(stream) = stream.into_std() else {
        drop(parked);
        s.release();
        return None;
    };
    // Registered while the map is locked: a wake-up waits for the entry to be there.
    let token = mio::Token(usize::try_from(id).unwrap_or(usize::MAX));
    if registry.register(&mut SourceFd(&stream.as_raw_fd()), token, mio::Interest::READABLE).is_err() {
        drop(parked);
        return match TcpStream::from_std(stream) {
            Ok(stream) => Some((Conn { stream, partial }, s)),
            Err(_) => {
                s.release();
                None
            }
        };
    }
    s.state.parked.inc();
    parked.insert(id, Box::new(Parked { stream, partial, session: s }));
    None
}

async fn resume(p: Parked) {
    let Parked { stream, partial, session } = p;
    match TcpStream::from_std(stream) {
        Ok(stream) => serve(Conn { stream, partial }, session).await,
        Err(e) => {
            tracing::debug!(error = %e, "parked TCP connection could not resume");
            session.release();
        }
    }
}

/// Token of the waker that ends the park thread (connection numbers never reach it).
const PARK_WAKER: mio::Token = mio::Token(usize::MAX);

/// Resumes parked connections whose sockets became readable (a frame, or the peer closed).
/// Runs on a thread of its own, blocked in `epoll_wait`; resumed connections go to the
/// runtime. The epoll set outlives the thread (a restarted thread watches the same one).
fn park_thread(hub: &DeviceHub, poll: &Mutex<mio::Poll>, runtime: &tokio::runtime::Handle) {
    let _runtime = runtime.enter();
    let mut poll = poll.lock().unwrap_or_else(PoisonError::into_inner);
    let mut events = mio::Events::with_capacity(1024);
    loop {
        if let Err(e) = poll.poll(&mut events, None) {
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            tracing::warn!(error = %e, "parked TCP connections: epoll wait failed");
            return;
        }
        for event in &events {
            if event.token() == PARK_WAKER {
                if hub.cancel.is_cancelled() {
                    return;
                }
                continue;
            }
            hub.tcp_park.unpark(event.token().0 as u64);
        }
    }
}

/// Starts the park: its epoll set and the thread that watches it, supervised (`tcp park`:
/// restarted with backoff after a panic or a failed wait, on the same epoll set).
fn start_park(hub: &Arc<DeviceHub>) -> io::Result<()> {
    let poll = mio::Poll::new()?;
    let waker = mio::Waker::new(poll.registry(), PARK_WAKER)?;
    if hub.tcp_park.registry.set(poll.registry().try_clone()?).is_err() {
        return Ok(()); // already running
    }
    let poll = Arc::new(Mutex::new(poll));
    let runtime = tokio::runtime::Handle::current();
    let thread_hub = Arc::clone(hub);
    let (metrics, cancel) = (Arc::clone(&hub.metrics), hub.cancel.clone());
    tokio::spawn(crate::supervise::supervise("tcp park".into(), metrics, cancel, move || {
        let (hub, poll, runtime) = (Arc::clone(&thread_hub), Arc::clone(&poll), runtime.clone());
        async move {
            let thread = tokio::task::spawn_blocking(move || park_thread(&hub, &poll, &runtime));
            if let Err(e) = thread.await
                && e.is_panic()
            {
                // The supervisor counts it and starts the thread again.
                std::panic::resume_unwind(e.into_panic());
            }
        }
    }));
    let hub = Arc::clone(hub);
    tokio::spawn(async move {
        hub.cancel.cancelled().await;
        let _ = waker.wake();
    });
    Ok(())
}

/// Which listener a raw device talks to.
#[derive(Clone, Copy, Debug)]
pub enum Raw {
    /// Frames on a TCP connection it opens.
    Tcp,
    /// Datagrams.
    Udp,
}

impl Raw {
    /// Its listener.
    pub fn listener(self) -> Listener {
        match self {
            Raw::Tcp => Listener::Tcp,
            Raw::Udp => Listener::Udp,
        }
    }
}

#[derive(Default)]
struct Flaps {
    window_start: Option<Instant>,
    replacements: u32,
    quarantined_until: Option<Instant>,
}

impl Flaps {
    /// Whether the entry says nothing any more: no quarantine and no window in force.
    fn spent(&self, now: Instant, window: Duration) -> bool {
        self.quarantined_until.is_none_or(|until| now >= until)
            && self.window_start.is_none_or(|s| now.duration_since(s) > window)
    }
}

/// Flapping per device id (the live connections themselves are in the hub, for commands).
struct State {
    hub: Arc<DeviceHub>,
    flaps: Mutex<HashMap<String, Flaps>>,
    next_conn: AtomicU64,
    /// `fieldgate_ingress_parked_connections{protocol="tcp"}`.
    parked: prometheus_client::metrics::gauge::Gauge,
}

impl State {
    fn quarantined(&self, id: &str) -> bool {
        let flaps = self.flaps.lock().unwrap_or_else(PoisonError::into_inner);
        flaps.get(id).and_then(|f| f.quarantined_until).is_some_and(|until| Instant::now() < until)
    }

    /// Makes a new connection the live one of the device, waking the previous one to close.
    /// `None`: the device id is flapping and now quarantined.
    fn take_over(&self, id: &str, dev: &Registered) -> Option<Arc<CommandSlot>> {
        let args = &self.hub.args;
        let slot = Arc::new(CommandSlot { conn: self.next_conn.fetch_add(1, Ordering::Relaxed), ..Default::default() });
        let old = dev.live.lock().unwrap_or_else(PoisonError::into_inner).replace(Arc::clone(&slot));
        let Some(old) = old else { return Some(slot) };
        let key = dev.task.key();
        old.replaced.store(true, Ordering::Release);
        self.hub.tcp_park.wake(&old);
        let now = Instant::now();
        let mut flaps = self.flaps.lock().unwrap_or_else(PoisonError::into_inner);
        if !flaps.contains_key(id) && flaps.len() >= 64 && flaps.len().is_power_of_two() {
            // Amortised: entries whose window and quarantine are over (devices that settled
            // or left the config) go each time the table doubles.
            flaps.retain(|_, f| !f.spent(now, args.flap_window));
        }
        let f = flaps.entry(id.to_string()).or_default();
        if f.window_start.is_none_or(|s| now.duration_since(s) > args.flap_window) {
            f.window_start = Some(now);
            f.replacements = 0;
        }
        f.replacements += 1;
        tracing::debug!(device = %key, replacements = f.replacements, "TCP connection replaced by a newer one");
        if f.replacements < args.flap_limit {
            return Some(slot);
        }
        f.quarantined_until = Some(now + args.quarantine);
        f.replacements = 0;
        f.window_start = None;
        drop(flaps);
        Self::release(dev, &slot);
        tracing::warn!(
            device = %key, quarantine = ?args.quarantine,
            "device id keeps reconnecting (flapping): quarantined, its connections are refused"
        );
        dev.task.count_error("quarantined");
        None
    }

    /// The connection of `slot` closed: it is no longer the device's live one.
    fn release(dev: &Registered, slot: &Arc<CommandSlot>) {
        let mut live = dev.live.lock().unwrap_or_else(PoisonError::into_inner);
        if live.as_ref().is_some_and(|s| Arc::ptr_eq(s, slot)) {
            *live = None;
        }
    }
}

/// Runs the TCP listener until the hub's token is cancelled.
pub(crate) async fn listen(hub: Arc<DeviceHub>) {
    let Some(listener) = bind_tcp(&hub, hub.args.tcp_listen).await else { return };
    let parked = hub.metrics.ingress_parked.get_or_create(&ProtocolLabels { protocol: PROTOCOL }).clone();
    let state =
        Arc::new(State { hub: Arc::clone(&hub), flaps: Mutex::default(), next_conn: AtomicU64::new(0), parked });
    if let Err(e) = start_park(&hub) {
        tracing::warn!(error = %e, "cannot park idle TCP connections: they stay on the runtime");
    }
    let slots = Arc::new(Semaphore::new(hub.args.tcp_max_connections));
    let gauge = hub.metrics.ingress_connections.get_or_create(&ProtocolLabels { protocol: PROTOCOL }).clone();
    loop {
        let accepted = tokio::select! {
            () = hub.cancel.cancelled() => {
                // Wake every live connection to close.
                let live = hub.registered(LISTENER).into_iter().filter_map(|dev| {
                    dev.live.lock().unwrap_or_else(PoisonError::into_inner).clone()
                });
                for slot in live.collect::<Vec<_>>() {
                    slot.stop.store(true, Ordering::Release);
                    hub.tcp_park.wake(&slot);
                }
                return;
            }
            a = listener.accept() => a,
        };
        match accepted {
            Ok((stream, peer)) => {
                let Ok(slot) = Arc::clone(&slots).try_acquire_owned() else {
                    hub.reject(PROTOCOL, "connection_cap");
                    drop(stream);
                    continue;
                };
                let _ = stream.set_nodelay(true);
                gauge.inc();
                let conn = Conn { stream, partial: Vec::new() };
                tokio::spawn(connection(conn, peer, Arc::clone(&state), slot, gauge.clone()));
            }
            Err(e) => {
                // Out of file descriptors and the like: pause rather than spin.
                tracing::debug!(error = %e, "TCP accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

async fn bind_tcp(hub: &DeviceHub, addr: SocketAddr) -> Option<TcpListener> {
    let mut delays = crate::supervise::backoff(Duration::from_millis(200), Duration::from_secs(10));
    let mut logged = false;
    loop {
        match TcpListener::bind(addr).await {
            Ok(l) => {
                let local = l.local_addr().unwrap_or(addr);
                hub.set_bound(LISTENER, local);
                tracing::info!(protocol = PROTOCOL, listen = %local, "device listener bound");
                return Some(l);
            }
            Err(e) => {
                if !logged {
                    tracing::warn!(listen = %addr, error = %e, "cannot bind the TCP device listener; retrying");
                    logged = true;
                }
                let delay = delays.next().unwrap_or(Duration::from_secs(10));
                tokio::select! {
                    () = hub.cancel.cancelled() => return None,
                    () = tokio::time::sleep(delay) => {}
                }
            }
        }
    }
}

/// Why no frame came.
#[derive(Debug)]
enum FrameError {
    TooLarge,
    Closed,
    Io,
    Payload(payload::PayloadError),
}

struct Conn {
    stream: TcpStream,
    /// Bytes of an incomplete frame; empty (no allocation) between frames.
    partial: Vec<u8>,
}

fn read_some(stream: &TcpStream, out: &mut Vec<u8>) -> io::Result<usize> {
    let mut buf = [0u8; 4096];
    let n = stream.try_read(&mut buf)?;
    out.extend_from_slice(&buf[..n]);
    Ok(n)
}

/// The next non-empty line in `partial`, without its terminator; `None` until one is complete.
fn take_frame(partial: &mut Vec<u8>, max: usize) -> Option<Result<Vec<u8>, FrameError>> {
    while let Some(pos) = partial.iter().position(|b| *b == b'\n') {
        let mut frame: Vec<u8> = partial.drain(..=pos).collect();
        if partial.is_empty() {
            *partial = Vec::new();
        }
        frame.pop();
        if frame.last() == Some(&b'\r') {
            frame.pop();
        }
        if frame.len() > max {
            return Some(Err(FrameError::TooLarge));
        }
        if !frame.iter().all(u8::is_ascii_whitespace) {
            return Some(Ok(frame));
        }
    }
    (partial.len() > max).then_some(Err(FrameError::TooLarge))
}

/// What the listener makes of a connection whose bytes arrive in `reads`: frames split as
/// [`Conn`] does, the first one's credentials taken as in identification, each frame's points
/// for `points`; one entry per frame (points, or the refusal's kind) up to the first frame
/// that closes the connection. The fuzz targets' entry point, not an API.
#[doc(hidden)]
pub fn frames(reads: &[&[u8]], max: usize, points: &[fieldgate_crds::Point]) -> Vec<Result<usize, &'static str>> {
    let mut partial = Vec::new();
    let mut out = Vec::new();
    let mut identified = false;
    for read in reads {
        partial.extend_from_slice(read);
        while let Some(frame) = take_frame(&mut partial, max) {
            let mut frame = match frame.and_then(parse) {
                Ok(frame) => frame,
                Err(FrameError::Payload(e)) if identified => {
                    out.push(Err(e.kind()));
                    continue;
                }
                Err(FrameError::Payload(e)) => {
                    out.push(Err(e.kind()));
                    return out;
                }
                Err(_) => {
                    out.push(Err("too_large"));
                    return out;
                }
            };
            let (id, _token) = payload::take_credentials(&mut frame);
            if !identified && id.is_none() {
                out.push(Err("no_id"));
                return out;
            }
            identified = true;
            if frame.is_empty() {
                out.push(Ok(0));
                continue;
            }
            out.push(payload::from_object(points, &frame).map(|p| p.len()).map_err(|e| e.kind()));
        }
    }
    out
}

impl Conn {
    /// The next non-empty line, without its terminator.
    async fn next_frame(&mut self, max: usize) -> Result<Vec<u8>, FrameError> {
        loop {
            if let Some(frame) = take_frame(&mut self.partial, max) {
                return frame;
            }
            self.stream.readable().await.map_err(|_| FrameError::Io)?;
            match read_some(&self.stream, &mut self.partial) {
                Ok(0) => return Err(FrameError::Closed),
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(_) => return Err(FrameError::Io),
            }
        }
    }

    async fn answer(&mut self, line: &str) -> bool {
        let mut out = Vec::with_capacity(line.len() + 1);
        out.extend_from_slice(line.as_bytes());
        out.push(b'\n');
        tokio::time::timeout(Duration::from_secs(5), self.stream.write_all(&out)).await.is_ok_and(|r| r.is_ok())
    }
}

struct GaugeGuard(prometheus_client::metrics::gauge::Gauge);

impl Drop for GaugeGuard {
    fn drop(&mut self) {
        self.0.dec();
    }
}

/// An identified connection.
struct Identified {
    dev: Arc<Registered>,
    id: String,
    slot: Arc<CommandSlot>,
}

/// What woke a waiting connection.
enum Wake {
    Slot,
    Frame(Result<Vec<u8>, FrameError>),
    Idle,
}

/// An identified connection's state, except its socket.
struct Session {
    state: Arc<State>,
    me: Identified,
    _permit: OwnedSemaphorePermit,
    _gauge: GaugeGuard,
}

impl Session {
    /// The connection closed: it is no longer the device's live one.
    fn release(&self) {
        State::release(&self.me.dev, &self.me.slot);
    }
}

/// One device connection: identification, then [`serve`].
async fn connection(
    mut conn: Conn,
    peer: SocketAddr,
    state: Arc<State>,
    permit: OwnedSemaphorePermit,
    gauge: prometheus_client::metrics::gauge::Gauge,
) {
    let gauge = GaugeGuard(gauge);
    let Some((me, first)) = Box::pin(identify(&mut conn, peer, &state)).await else { return };
    let session = Session { state, me, _permit: permit, _gauge: gauge };
    if let Some(frame) = first
        && !Box::pin(handle_frame(&mut conn, &session.me, Ok(frame))).await
    {
        session.release();
        return;
    }
    // Boxed: the identification state above is all a connecting device's task holds inline.
    Box::pin(serve(conn, session)).await;
}

/// An identified connection on the runtime: frames and commands until it closes, or parks
/// after `--tcp-park-after` of silence. Frame handling and command writes run boxed, so the
/// waiting state stays small.
async fn serve(mut conn: Conn, mut s: Session) {
    let max = s.state.hub.args.max_frame_bytes;
    let park_after = s.state.hub.args.tcp_park_after;
    loop {
        let wake = tokio::select! {
            biased;
            () = s.me.slot.notify.notified() => Wake::Slot,
            f = conn.next_frame(max) => Wake::Frame(f),
            () = tokio::time::sleep(park_after) => Wake::Idle,
        };
        let me = &s.me;
        let keep = match wake {
            Wake::Idle => match park(conn, s) {
                None => return,
                Some((c, back)) => {
                    (conn, s) = (c, back);
                    continue;
                }
            },
            Wake::Slot if me.slot.stop.load(Ordering::Acquire) => false,
            Wake::Slot if me.slot.replaced.load(Ordering::Acquire) => {
                Box::pin(conn.answer("ERR replaced")).await;
                false
            }
            Wake::Slot => Box::pin(write_commands(&mut conn, &me.slot)).await,
            Wake::Frame(f) => Box::pin(handle_frame(&mut conn, me, f.and_then(parse))).await,
        };
        if !keep {
            break;
        }
    }
    s.release();
}

fn parse(bytes: Vec<u8>) -> Result<serde_json::Map<String, serde_json::Value>, FrameError> {
    payload::parse_frame(&bytes).map_err(FrameError::Payload)
}

/// The first frame: credentials (and maybe values). `None`: refused, the connection closes.
async fn identify(
    conn: &mut Conn,
    peer: SocketAddr,
    state: &State,
) -> Option<(Identified, Option<serde_json::Map<String, serde_json::Value>>)> {
    let hub = &state.hub;
    let max = hub.args.max_frame_bytes;
    let first = match tokio::time::timeout(hub.args.first_frame_timeout, conn.next_frame(max)).await {
        Err(_) => {
            hub.reject(PROTOCOL, "first_frame_timeout");
            return None;
        }
        Ok(Err(FrameError::TooLarge)) => {
            hub.reject(PROTOCOL, "too_large");
            conn.answer("ERR too_large").await;
            return None;
        }
        Ok(Err(_)) => {
            hub.reject(PROTOCOL, "closed");
            return None;
        }
        Ok(Ok(f)) => f,
    };
    let mut frame = match payload::parse_frame(&first) {
        Ok(m) => m,
        Err(e) => {
            hub.reject(PROTOCOL, e.kind());
            conn.answer(&format!("ERR {}", e.kind())).await;
            return None;
        }
    };
    let (id, token) = payload::take_credentials(&mut frame);
    let Some(id) = id else {
        hub.reject(PROTOCOL, "no_id");
        conn.answer("ERR no_id").await;
        return None;
    };
    if state.quarantined(&id) {
        hub.reject(PROTOCOL, "quarantined");
        conn.answer("ERR quarantined").await;
        return None;
    }
    let Some(dev) = hub.lookup(LISTENER, &id) else {
        hub.reject(PROTOCOL, "unknown_device");
        conn.answer("ERR unknown_device").await;
        return None;
    };
    if !dev.token_matches(token.as_deref().unwrap_or_default().as_bytes()) {
        hub.reject(PROTOCOL, "unauthorized");
        conn.answer("ERR unauthorized").await;
        return None;
    }
    let Some(slot) = state.take_over(&id, &dev) else {
        hub.reject(PROTOCOL, "quarantined");
        conn.answer("ERR quarantined").await;
        return None;
    };
    tracing::debug!(device = %dev.task.key(), %peer, "TCP device identified");
    let me = Identified { dev, id, slot };
    if frame.is_empty() {
        if !conn.answer("OK").await {
            State::release(&me.dev, &me.slot);
            return None;
        }
        return Some((me, None));
    }
    Some((me, Some(frame)))
}

/// Writes queued command frames; `false` when the connection broke.
async fn write_commands(conn: &mut Conn, slot: &CommandSlot) -> bool {
    let queued = std::mem::take(&mut *slot.pending.lock().unwrap_or_else(PoisonError::into_inner));
    let mut ok = true;
    for (line, done) in queued {
        ok = ok && conn.answer(&line).await;
        let _ = done.send(ok);
    }
    ok
}

/// One frame after identification: a reading answered `OK` once accepted, or `ERR <reason>`.
/// `false` when the connection must close.
async fn handle_frame(
    conn: &mut Conn,
    me: &Identified,
    frame: Result<serde_json::Map<String, serde_json::Value>, FrameError>,
) -> bool {
    let dev = &me.dev;
    let mut frame = match frame {
        Ok(m) => m,
        Err(FrameError::Payload(e)) => {
            dev.task.count_error(e.kind());
            return conn.answer(&format!("ERR {}", e.kind())).await;
        }
        Err(FrameError::TooLarge) => {
            dev.task.count_error("too_large");
            conn.answer("ERR too_large").await;
            return false;
        }
        Err(_) => return false,
    };
    let (other, _) = payload::take_credentials(&mut frame);
    if other.is_some_and(|o| o != me.id) {
        dev.task.count_error("id_mismatch");
        return conn.answer("ERR id_mismatch").await;
    }
    let answer = match payload::from_object(&dev.task.device.points, &frame) {
        Err(e) => {
            dev.task.count_error(e.kind());
            format!("ERR {}", e.kind())
        }
        Ok(points) => {
            let accepted = match dev.task.emit_confirmed(dev.reading(points)).await {
                Ok(rx) => matches!(tokio::time::timeout(ACCEPT_TIMEOUT, rx).await, Ok(Ok(Ok(())))),
                Err(_) => false,
            };
            if accepted {
                "OK".to_string()
            } else {
                dev.task.count_error("not_accepted");
                "ERR not_accepted".to_string()
            }
        }
    };
    conn.answer(&answer).await
}

/// Writes a command frame to the device's live connection; `Ok` once written.
async fn send_frame(hub: &DeviceHub, dev: &Registered, line: String) -> Result<(), &'static str> {
    let slot = dev.live.lock().unwrap_or_else(PoisonError::into_inner).clone();
    let Some(slot) = slot else { return Err("the device is not connected") };
    let (tx, rx) = tokio::sync::oneshot::channel();
    slot.pending.lock().unwrap_or_else(PoisonError::into_inner).push_back((line, tx));
    hub.tcp_park.wake(&slot);
    match rx.await {
        Ok(true) => Ok(()),
        _ => Err("the connection closed before the frame was written"),
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;
    use tokio::io::{AsyncBufReadExt, BufReader};

    #[tokio::test]
    async fn frames_are_split_on_newlines_and_bounded() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let client = tokio::spawn(async move {
            let mut s = TcpStream::connect(addr).await.unwrap();
            s.write_all(b"a=1\r\n\n  \nb=2\nc=").await.unwrap();
            s.write_all(&[b'x'; 100]).await.unwrap();
            s.write_all(b"\n").await.unwrap();
            let mut lines = BufReader::new(s).lines();
            lines.next_line().await.unwrap()
        });
        let (stream, _) = listener.accept().await.unwrap();
        let mut conn = Conn { stream, partial: Vec::new() };
        assert_eq!(conn.next_frame(64).await.unwrap(), b"a=1");
        assert_eq!(conn.next_frame(64).await.unwrap(), b"b=2");
        assert!(matches!(conn.next_frame(64).await, Err(FrameError::TooLarge)));
        assert!(conn.answer("ERR too_large").await);
        assert_eq!(client.await.unwrap().as_deref(), Some("ERR too_large"));
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod size {
    /// A connection waiting for its first frame (or not yet parked) is a task holding this
    /// future: keep it small.
    #[tokio::test]
    async fn an_idle_connection_future_stays_small() {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let a = l.local_addr().unwrap();
        let _c = tokio::net::TcpStream::connect(a).await.unwrap();
        let (s, peer) = l.accept().await.unwrap();
        let metrics =
            std::sync::Arc::new(crate::metrics::Metrics::new(&mut prometheus_client::registry::Registry::default()));
        let hub = crate::adapters::hub::DeviceHub::for_tests(std::sync::Arc::clone(&metrics));
        let state = std::sync::Arc::new(super::State {
            hub,
            flaps: Default::default(),
            next_conn: Default::default(),
            parked: Default::default(),
        });
        let slot = std::sync::Arc::new(tokio::sync::Semaphore::new(1)).try_acquire_owned().unwrap();
        let g = metrics.ingress_connections.get_or_create(&crate::metrics::ProtocolLabels { protocol: "tcp" }).clone();
        let fut = super::connection(super::Conn { stream: s, partial: Vec::new() }, peer, state, slot, g);
        let size = std::mem::size_of_val(&fut);
        assert!(size <= 768, "the connection future grew to {size} bytes");
    }
}
