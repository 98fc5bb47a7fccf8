//! Raw UDP devices: one listener (`--udp-listen`) for all of them.
//!
//! Every datagram is one frame (a JSON object or a `key=value` line, see
//! [`super::payload`]) carrying the device's `id` and `token` next to its values. An
//! authenticated datagram is answered `OK` once JetStream accepted its reading, or
//! `ERR <reason>`; the device may send again when no `OK` comes. Datagrams from unknown or
//! unauthenticated senders get no answer (no reflection) and are counted in
//! `fieldgate_ingress_rejected_total{protocol="udp",reason}` (`too_large`, `no_id`,
//! `unknown_device`, `unauthorized`, `overloaded` and the payload kinds).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::UdpSocket;
use tokio::sync::Semaphore;

use super::hub::{DeviceHub, bind_udp};
use super::payload;

const PROTOCOL: &str = "udp";
const ACCEPT_TIMEOUT: Duration = Duration::from_secs(10);
/// Datagrams waiting for acceptance at once; beyond it they are refused (`overloaded`).
const MAX_PENDING: usize = 8192;

/// Runs the UDP listener until the hub's token is cancelled.
pub(crate) async fn listen(hub: Arc<DeviceHub>) {
    let Some(socket) = bind_udp(&hub, PROTOCOL, hub.args.udp_listen).await else { return };
    let socket = Arc::new(socket);
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
    let Some(dev) = hub.lookup(PROTOCOL, &id) else {
        hub.reject(PROTOCOL, "unknown_device");
        return;
    };
    if !dev.token_matches(token.as_deref().unwrap_or_default().as_bytes()) {
        hub.reject(PROTOCOL, "unauthorized");
        return;
    }
    hub.count_message(PROTOCOL, "datagram");
    let reply = |text: String| {
        let mut out = text.into_bytes();
        out.push(b'\n');
        // Best effort, like the datagram itself.
        let _ = socket.try_send_to(&out, peer);
    };
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
