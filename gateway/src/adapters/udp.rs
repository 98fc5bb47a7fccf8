//! Raw UDP devices: one listener (`--udp-listen`) for all of them.
//!
//! Every datagram is one frame (a JSON object or a `key=value` line, see
//! [`super::payload`]) carrying the device's `id` and `token` next to its values. An
//! authenticated datagram is answered `OK` once JetStream accepted its reading, or
//! `ERR <reason>`; the device may send again when no `OK` comes. A datagram with only `id`
//! and `token` is a keep-alive, answered `OK` at once (it keeps the way open for commands).
//! Datagrams from unknown or unauthenticated senders get no answer (no reflection) and are
//! counted in `fieldgate_ingress_rejected_total{protocol="udp",reason}` (`too_large`,
//! `no_id`, `unknown_device`, `unauthorized`, `overloaded` and the payload kinds).
//!
//! **Commands** go back the way the device's datagrams came, as CoAP/LwM2M gateways do: the
//! listener remembers, per device, the source address of its last authenticated datagram and
//! when it came; a command is one datagram from the listener's socket (the port the device
//! sends to, so it passes the device's NAT) to that address, the JSON line `{"command": id,
//! "point", "value"}` (the frame TCP devices get), answered `written` once sent (UDP delivery
//! is not confirmed). A device without an authenticated datagram in the last
//! [`COMMAND_PEER_MAX_AGE`] gets none: the command `failed`, with that reason.
//!
//! The bound is 2 minutes: the shortest idle time after which RFC 4787 lets a NAT forget a
//! UDP mapping, and how long Linux conntrack (the NAT of a Kubernetes Service) keeps a UDP
//! flow that carried traffic both ways (`nf_conntrack_udp_timeout_stream`). Some NATs forget
//! sooner, and conntrack keeps a flow only 30 s until it has seen traffic both ways for over
//! 2 s: a device that expects commands should send, or keep alive, at least every 30 s. The
//! token authenticates a datagram, not its source address: a datagram replayed from
//! elsewhere moves the device's commands there.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use tokio::net::UdpSocket;
use tokio::sync::Semaphore;

use super::hub::{DeviceHub, Listener, bind_udp};
use super::payload;

const LISTENER: Listener = Listener::Udp;
const PROTOCOL: &str = LISTENER.protocol();
const ACCEPT_TIMEOUT: Duration = Duration::from_secs(10);
/// Datagrams waiting for acceptance at once; beyond it they are refused (`overloaded`).
const MAX_PENDING: usize = 8192;
/// How long after its last authenticated datagram a device is still sent commands.
pub const COMMAND_PEER_MAX_AGE: Duration = Duration::from_secs(120);

/// Where commands to UDP devices go: the listener's socket, and per device (`namespace/name`)
/// the source of its last authenticated datagram. Entries older than
/// [`COMMAND_PEER_MAX_AGE`] are pruned as new devices appear.
#[derive(Default)]
pub struct UdpPeers {
    socket: Mutex<Option<Arc<UdpSocket>>>,
    last: Mutex<Peers>,
}

#[derive(Default)]
struct Peers {
    by_device: HashMap<String, (SocketAddr, Instant)>,
    /// Size at which stale entries are pruned next (amortised: it doubles).
    prune_at: usize,
}

impl UdpPeers {
    /// Notes an authenticated datagram of device `key` from `peer`.
    fn record(&self, key: String, peer: SocketAddr, now: Instant) {
        let mut last = self.last.lock().unwrap_or_else(PoisonError::into_inner);
        if last.by_device.insert(key, (peer, now)).is_none() && last.by_device.len() > last.prune_at {
            last.by_device.retain(|_, (_, at)| now.duration_since(*at) <= COMMAND_PEER_MAX_AGE);
            last.prune_at = (2 * last.by_device.len()).max(1024);
        }
    }

    /// Forgets device `key` (removed from the config).
    pub(crate) fn forget(&self, key: &str) {
        self.last.lock().unwrap_or_else(PoisonError::into_inner).by_device.remove(key);
    }

    /// Where a command to device `key` goes now, or why it cannot.
    fn destination(&self, key: &str, now: Instant) -> Result<SocketAddr, String> {
        let max = COMMAND_PEER_MAX_AGE.as_secs();
        let last = self.last.lock().unwrap_or_else(PoisonError::into_inner);
        match last.by_device.get(key) {
            None => Err(format!("no authenticated datagram from the device in the last {max}s (none received yet)")),
            Some((_, at)) if now.duration_since(*at) > COMMAND_PEER_MAX_AGE => Err(format!(
                "no authenticated datagram from the device in the last {max}s (the last came {}s ago)",
                now.duration_since(*at).as_secs()
            )),
            Some((addr, _)) => Ok(*addr),
        }
    }

    fn socket(&self) -> Option<Arc<UdpSocket>> {
        self.socket.lock().unwrap_or_else(PoisonError::into_inner).clone()
    }
}

/// Clears the listener's socket from [`UdpPeers`] when the listener ends.
struct Bound<'a>(&'a UdpPeers, Arc<UdpSocket>);

impl Drop for Bound<'_> {
    fn drop(&mut self) {
        let mut socket = self.0.socket.lock().unwrap_or_else(PoisonError::into_inner);
        if socket.as_ref().is_some_and(|s| Arc::ptr_eq(s, &self.1)) {
            *socket = None;
        }
    }
}

/// Sends `line` (a command frame) to UDP device `key` (`namespace/name`) at the address of
/// its last authenticated datagram, from the listener's socket.
pub async fn send_command(hub: &DeviceHub, key: &str, line: String) -> Result<(), String> {
    let to = hub.udp_peers.destination(key, Instant::now())?;
    let socket = hub.udp_peers.socket().ok_or("the UDP listener is not bound")?;
    let mut datagram = line.into_bytes();
    datagram.push(b'\n');
    match socket.send_to(&datagram, to).await {
        Ok(_) => Ok(()),
        Err(e) => Err(format!("sending the datagram: {e}")),
    }
}

/// Runs the UDP listener until the hub's token is cancelled.
pub(crate) async fn listen(hub: Arc<DeviceHub>) {
    let Some(socket) = bind_udp(&hub, LISTENER).await else { return };
    let socket = Arc::new(socket);
    *hub.udp_peers.socket.lock().unwrap_or_else(PoisonError::into_inner) = Some(Arc::clone(&socket));
    let _bound = Bound(&hub.udp_peers, Arc::clone(&socket));
    let pending = Arc::new(Semaphore::new(MAX_PENDING));
    let max = hub.args.max_frame_bytes;
    let mut buf = vec![0u8; max + 1];
    loop {
        let received = tokio::select! {
            () = hub.cancel.cancelled() => return,
            r = socket.recv_from(&mut buf) => r,
        };
        match received {
            Ok((n, peer)) if n > max => {
                let _ = peer;
                hub.reject(PROTOCOL, "too_large");
            }
            Ok((n, peer)) => handle(&hub, &socket, &pending, &buf[..n], peer),
            Err(e) => tracing::debug!(error = %e, "UDP receive failed"),
        }
    }
}

/// Handles one datagram as the listener does (the fuzz targets' entry point, not an API).
#[doc(hidden)]
pub fn handle_datagram(hub: &Arc<DeviceHub>, socket: &Arc<UdpSocket>, datagram: &[u8], peer: SocketAddr) {
    handle(hub, socket, &Arc::new(Semaphore::new(MAX_PENDING)), datagram, peer);
}

fn handle(hub: &Arc<DeviceHub>, socket: &Arc<UdpSocket>, pending: &Arc<Semaphore>, datagram: &[u8], peer: SocketAddr) {
    let mut frame = match payload::parse_frame(datagram) {
        Ok(f) => f,
        Err(e) => {
            hub.reject(PROTOCOL, e.kind());
            return;
        }
    };
    let (id, token) = payload::take_credentials(&mut frame);
    let Some(id) = id else {
        hub.reject(PROTOCOL, "no_id");
        return;
    };
    let Some(dev) = hub.lookup(LISTENER, &id) else {
        hub.reject(PROTOCOL, "unknown_device");
        return;
    };
    if !dev.token_matches(token.as_deref().unwrap_or_default().as_bytes()) {
        hub.reject(PROTOCOL, "unauthorized");
        return;
    }
    hub.udp_peers.record(dev.task.key(), peer, Instant::now());
    hub.count_message(PROTOCOL, "datagram");
    let reply = |text: String| {
        let mut out = text.into_bytes();
        out.push(b'\n');
        // Best effort, like the datagram itself.
        let _ = socket.try_send_to(&out, peer);
    };
    if frame.is_empty() {
        // A keep-alive: nothing to read.
        reply("OK".into());
        return;
    }
    let points = match payload::from_object(&dev.task.device.points, &frame) {
        Ok(p) => p,
        Err(e) => {
            dev.task.count_error(e.kind());
            reply(format!("ERR {}", e.kind()));
            return;
        }
    };
    let Ok(permit) = Arc::clone(pending).try_acquire_owned() else {
        hub.reject(PROTOCOL, "overloaded");
        reply("ERR overloaded".into());
        return;
    };
    let socket = Arc::clone(socket);
    tokio::spawn(async move {
        let accepted = match dev.task.emit_confirmed(dev.reading(points)).await {
            Ok(rx) => matches!(tokio::time::timeout(ACCEPT_TIMEOUT, rx).await, Ok(Ok(Ok(())))),
            Err(_) => false,
        };
        let text: &[u8] = if accepted {
            b"OK\n"
        } else {
            dev.task.count_error("not_accepted");
            b"ERR not_accepted\n"
        };
        let _ = socket.try_send_to(text, peer);
        drop(permit);
    });
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn commands_go_to_the_last_authenticated_source_while_it_is_fresh() {
        let peers = UdpPeers::default();
        let t0 = Instant::now();
        let never = peers.destination("default/d", t0).unwrap_err();
        assert_eq!(never, "no authenticated datagram from the device in the last 120s (none received yet)");
        let (a, b): (SocketAddr, SocketAddr) = ("10.0.0.7:40000".parse().unwrap(), "10.0.0.7:40001".parse().unwrap());
        peers.record("default/d".into(), a, t0);
        assert_eq!(peers.destination("default/d", t0 + Duration::from_secs(10)), Ok(a));
        // The device's NAT mapping moved: commands follow its latest datagram.
        peers.record("default/d".into(), b, t0 + Duration::from_secs(20));
        assert_eq!(peers.destination("default/d", t0 + COMMAND_PEER_MAX_AGE), Ok(b));
        let stale = peers.destination("default/d", t0 + Duration::from_secs(20) + COMMAND_PEER_MAX_AGE * 2);
        assert_eq!(
            stale.unwrap_err(),
            "no authenticated datagram from the device in the last 120s (the last came 240s ago)"
        );
    }

    #[test]
    fn stale_peers_are_pruned_as_devices_appear() {
        let peers = UdpPeers::default();
        let t0 = Instant::now();
        let addr: SocketAddr = "127.0.0.1:9".parse().unwrap();
        for i in 0..1025 {
            peers.record(format!("default/d{i}"), addr, t0);
        }
        let later = t0 + COMMAND_PEER_MAX_AGE * 2;
        for i in 0..1100 {
            peers.record(format!("default/e{i}"), addr, later);
        }
        let last = peers.last.lock().unwrap();
        assert!(last.by_device.len() <= 1100 + 1, "{} entries", last.by_device.len());
        assert!(last.by_device.keys().all(|k| k.starts_with("default/e")));
    }
}
