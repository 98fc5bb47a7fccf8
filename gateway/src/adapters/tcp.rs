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
//! Memory: an idle connection holds its socket, a task and an empty frame buffer; reads go
//! through a stack buffer, so partial frames are the only per-connection heap data.

use std::collections::HashMap;
use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use fieldgate_crds::RawConnection;
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::hub::{DeviceHub, Registered};
use super::{DeviceTask, payload};
use crate::metrics::ProtocolLabels;

const PROTOCOL: &str = "tcp";
/// How long a frame waits for JetStream before it is answered `ERR not_accepted`.
const ACCEPT_TIMEOUT: Duration = Duration::from_secs(10);

/// Runs one raw TCP or UDP device: registers its id with the listener until cancelled.
pub async fn run(protocol: &'static str, settings: &RawConnection, task: DeviceTask) {
    let d = &task.device;
    let id = settings.id.clone().unwrap_or_else(|| format!("{}/{}", d.namespace, d.name));
    let credential = task.hub.credential(&settings.token_secret_ref, &task);
    let max = task.hub.args.max_frame_bytes;
    let _registration = task.hub.register(protocol, id, Registered::new(task.clone(), credential, max));
    task.cancel.cancelled().await;
}

struct Live {
    conn: u64,
    cancel: CancellationToken,
}

#[derive(Default)]
struct Flaps {
    window_start: Option<Instant>,
    replacements: u32,
    quarantined_until: Option<Instant>,
}

/// Live connections and flapping per device id.
#[derive(Default)]
struct Ids {
    live: HashMap<String, Live>,
    flaps: HashMap<String, Flaps>,
}

struct State {
    hub: Arc<DeviceHub>,
    ids: Mutex<Ids>,
    next_conn: AtomicU64,
}

enum TakeOver {
    Live(u64, CancellationToken),
    Quarantined,
}

impl State {
    fn quarantined(&self, id: &str) -> bool {
        let ids = self.ids.lock().unwrap_or_else(PoisonError::into_inner);
        ids.flaps.get(id).and_then(|f| f.quarantined_until).is_some_and(|until| Instant::now() < until)
    }

    /// Makes this connection the live one of `id`, closing the previous one.
    fn take_over(&self, id: &str, dev: &Registered) -> TakeOver {
        let args = &self.hub.args;
        let conn = self.next_conn.fetch_add(1, Ordering::Relaxed);
        let cancel = CancellationToken::new();
        let mut ids = self.ids.lock().unwrap_or_else(PoisonError::into_inner);
        let replaced = ids.live.insert(id.to_string(), Live { conn, cancel: cancel.clone() });
        let Some(old) = replaced else { return TakeOver::Live(conn, cancel) };
        old.cancel.cancel();
        let now = Instant::now();
        let f = ids.flaps.entry(id.to_string()).or_default();
        if f.window_start.is_none_or(|s| now.duration_since(s) > args.flap_window) {
            f.window_start = Some(now);
            f.replacements = 0;
        }
        f.replacements += 1;
        tracing::debug!(device = %dev.task.key(), replacements = f.replacements, "TCP connection replaced by a newer one");
        if f.replacements < args.flap_limit {
            return TakeOver::Live(conn, cancel);
        }
        f.quarantined_until = Some(now + args.quarantine);
        f.replacements = 0;
        f.window_start = None;
        ids.live.remove(id);
        tracing::warn!(
            device = %dev.task.key(), quarantine = ?args.quarantine,
            "device id keeps reconnecting (flapping): quarantined, its connections are refused"
        );
        dev.task.count_error("quarantined");
        TakeOver::Quarantined
    }

    fn release(&self, id: &str, conn: u64) {
        let mut ids = self.ids.lock().unwrap_or_else(PoisonError::into_inner);
        if ids.live.get(id).is_some_and(|l| l.conn == conn) {
            ids.live.remove(id);
        }
    }
}

/// Runs the TCP listener until the hub's token is cancelled.
pub(crate) async fn listen(hub: Arc<DeviceHub>) {
    let Some(listener) = bind_tcp(&hub, hub.args.tcp_listen).await else { return };
    let state = Arc::new(State { hub: Arc::clone(&hub), ids: Mutex::default(), next_conn: AtomicU64::new(0) });
    let slots = Arc::new(Semaphore::new(hub.args.tcp_max_connections));
    let gauge = hub.metrics.ingress_connections.get_or_create(&ProtocolLabels { protocol: PROTOCOL }).clone();
    loop {
        let accepted = tokio::select! {
            () = hub.cancel.cancelled() => return,
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
                hub.set_bound(PROTOCOL, local);
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

impl Conn {
    /// The next non-empty line, without its terminator.
    async fn next_frame(&mut self, max: usize) -> Result<Vec<u8>, FrameError> {
        loop {
            if let Some(pos) = self.partial.iter().position(|b| *b == b'\n') {
                let mut frame: Vec<u8> = self.partial.drain(..=pos).collect();
                if self.partial.is_empty() {
                    self.partial = Vec::new();
                }
                frame.pop();
                if frame.last() == Some(&b'\r') {
                    frame.pop();
                }
                if frame.len() > max {
                    return Err(FrameError::TooLarge);
                }
                if frame.iter().all(u8::is_ascii_whitespace) {
                    continue;
                }
                return Ok(frame);
            }
            if self.partial.len() > max {
                return Err(FrameError::TooLarge);
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

async fn connection(mut conn: Conn, peer: SocketAddr, state: Arc<State>, _slot: OwnedSemaphorePermit, gauge: prometheus_client::metrics::gauge::Gauge) {
    let _gauge = GaugeGuard(gauge);
    let hub = Arc::clone(&state.hub);
    let max = hub.args.max_frame_bytes;
    let first = match tokio::time::timeout(hub.args.first_frame_timeout, conn.next_frame(max)).await {
        Err(_) => {
            hub.reject(PROTOCOL, "first_frame_timeout");
            return;
        }
        Ok(Err(FrameError::TooLarge)) => {
            hub.reject(PROTOCOL, "too_large");
            conn.answer("ERR too_large").await;
            return;
        }
        Ok(Err(_)) => {
            hub.reject(PROTOCOL, "closed");
            return;
        }
        Ok(Ok(f)) => f,
    };
    let mut frame = match payload::parse_frame(&first) {
        Ok(m) => m,
        Err(e) => {
            hub.reject(PROTOCOL, e.kind());
            conn.answer(&format!("ERR {}", e.kind())).await;
            return;
        }
    };
    let (id, token) = payload::take_credentials(&mut frame);
    let Some(id) = id else {
        hub.reject(PROTOCOL, "no_id");
        conn.answer("ERR no_id").await;
        return;
    };
    if state.quarantined(&id) {
        hub.reject(PROTOCOL, "quarantined");
        conn.answer("ERR quarantined").await;
        return;
    }
    let Some(dev) = hub.lookup(PROTOCOL, &id) else {
        hub.reject(PROTOCOL, "unknown_device");
        conn.answer("ERR unknown_device").await;
        return;
    };
    if !dev.token_matches(token.as_deref().unwrap_or_default().as_bytes()) {
        hub.reject(PROTOCOL, "unauthorized");
        conn.answer("ERR unauthorized").await;
        return;
    }
    let (conn_id, replaced) = match state.take_over(&id, &dev) {
        TakeOver::Live(c, cancel) => (c, cancel),
        TakeOver::Quarantined => {
            hub.reject(PROTOCOL, "quarantined");
            conn.answer("ERR quarantined").await;
            return;
        }
    };
    tracing::debug!(device = %dev.task.key(), %peer, "TCP device identified");
    let slot = Arc::new(super::hub::CommandSlot::default());
    hub.tcp_live.lock().unwrap_or_else(PoisonError::into_inner).insert(dev.task.key(), Arc::clone(&slot));
    let mut next = if frame.is_empty() {
        if !conn.answer("OK").await {
            state.release(&id, conn_id);
            return;
        }
        None
    } else {
        Some(frame)
    };
    loop {
        let frame = match next.take() {
            Some(f) => f,
            None => {
                let got = tokio::select! {
                    () = replaced.cancelled() => {
                        conn.answer("ERR replaced").await;
                        break;
                    }
                    () = dev.task.cancel.cancelled() => break,
                    () = hub.cancel.cancelled() => break,
                    () = slot.notify.notified() => {
                        let queued = std::mem::take(&mut *slot.pending.lock().unwrap_or_else(PoisonError::into_inner));
                        let mut ok = true;
                        for (line, done) in queued {
                            ok = ok && conn.answer(&line).await;
                            let _ = done.send(ok);
                        }
                        if !ok {
                            break;
                        }
                        continue;
                    }
                    f = conn.next_frame(max) => f,
                };
                match got {
                    Ok(bytes) => match payload::parse_frame(&bytes) {
                        Ok(mut m) => {
                            let (other, _) = payload::take_credentials(&mut m);
                            if other.is_some_and(|o| o != id) {
                                dev.task.count_error("id_mismatch");
                                if !conn.answer("ERR id_mismatch").await {
                                    break;
                                }
                                continue;
                            }
                            m
                        }
                        Err(e) => {
                            dev.task.count_error(e.kind());
                            if !conn.answer(&format!("ERR {}", e.kind())).await {
                                break;
                            }
                            continue;
                        }
                    },
                    Err(FrameError::TooLarge) => {
                        dev.task.count_error("too_large");
                        conn.answer("ERR too_large").await;
                        break;
                    }
                    Err(_) => break,
                }
            }
        };
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
        if !conn.answer(&answer).await {
            break;
        }
    }
    state.release(&id, conn_id);
    let mut live = hub.tcp_live.lock().unwrap_or_else(PoisonError::into_inner);
    if live.get(&dev.task.key()).is_some_and(|s| Arc::ptr_eq(s, &slot)) {
        live.remove(&dev.task.key());
    }
}

/// Writes a command frame to the device's live connection; `Ok` once written.
pub(crate) async fn send_command(hub: &DeviceHub, device: &str, line: String) -> Result<(), &'static str> {
    let slot = hub.tcp_live.lock().unwrap_or_else(PoisonError::into_inner).get(device).cloned();
    let Some(slot) = slot else { return Err("the device is not connected") };
    let (tx, rx) = tokio::sync::oneshot::channel();
    slot.pending.lock().unwrap_or_else(PoisonError::into_inner).push_back((line, tx));
    slot.notify.notify_one();
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
