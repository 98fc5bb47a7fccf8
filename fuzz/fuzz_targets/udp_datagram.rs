//! UDP device datagrams (cut at `ff 00`) through the listener's handling: frame parsing,
//! device lookup, token check, point mapping, the answer sent.
#![no_main]
use std::net::SocketAddr;
use std::sync::{Arc, OnceLock};

use fieldgate_gateway::adapters::hub::{DeviceHub, Registration};
use fieldgate_gateway::adapters::udp;
use libfuzzer_sys::fuzz_target;
use tokio::net::UdpSocket;

struct Env {
    hub: Arc<DeviceHub>,
    socket: Arc<UdpSocket>,
    peer: SocketAddr,
    _peer_socket: std::net::UdpSocket,
    _guards: Vec<Registration>,
}

fuzz_target!(|data: &[u8]| {
    static ENV: OnceLock<Env> = OnceLock::new();
    let rt = fieldgate_fuzz::runtime();
    let env = ENV.get_or_init(|| {
        let _in_rt = rt.enter();
        let (hub, guards) = fieldgate_fuzz::hub(fieldgate_gateway::adapters::hub::Listener::Udp);
        let (socket, peer_socket, peer) = fieldgate_fuzz::answer_sockets();
        Env { hub, socket: Arc::new(socket), peer, _peer_socket: peer_socket, _guards: guards }
    });
    rt.block_on(async {
        for datagram in fieldgate_fuzz::messages(data) {
            udp::handle_datagram(&env.hub, &env.socket, datagram, env.peer);
        }
        // Let the readings' tasks run to their end.
        tokio::task::yield_now().await;
    });
});
