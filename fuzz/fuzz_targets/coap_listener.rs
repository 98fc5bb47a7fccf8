//! CoAP datagrams (cut at `ff 00`) through the push listener: message decoding, pings,
//! duplicate detection, device lookup by path, token query, Size1, Block1 reassembly and the
//! payload mapped to points.
#![no_main]
use std::net::SocketAddr;
use std::sync::{Arc, OnceLock};

use fieldgate_gateway::adapters::coap::PushListener;
use fieldgate_gateway::adapters::hub::{DeviceHub, Registration};
use libfuzzer_sys::fuzz_target;

struct Env {
    listener: PushListener,
    _hub: Arc<DeviceHub>,
    _peer_socket: std::net::UdpSocket,
    peer: SocketAddr,
    _guards: Vec<Registration>,
}

fuzz_target!(|data: &[u8]| {
    static ENV: OnceLock<Env> = OnceLock::new();
    static ROUND: std::sync::atomic::AtomicU16 = std::sync::atomic::AtomicU16::new(0);
    let rt = fieldgate_fuzz::runtime();
    let env = ENV.get_or_init(|| {
        let _in_rt = rt.enter();
        let (hub, guards) = fieldgate_fuzz::hub(fieldgate_gateway::adapters::hub::Listener::Coap);
        let (socket, peer_socket, peer) = fieldgate_fuzz::answer_sockets();
        let listener = PushListener::new(socket, Arc::clone(&hub));
        Env { listener, _hub: hub, _peer_socket: peer_socket, peer, _guards: guards }
    });
    // A new source port per input: one input's message ids and block transfers do not make
    // the next one a duplicate (the listener's memory is bounded either way).
    let round = ROUND.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let peer = SocketAddr::new(env.peer.ip(), 1024 + round % 60000);
    let _in_rt = rt.enter();
    for datagram in fieldgate_fuzz::messages(data) {
        let _ = env.listener.handle(datagram, peer);
    }
});
