//! What the fuzz targets share: a runtime, the devices whose points outside bytes are mapped to,
//! a device hub with those devices registered, and a way to cut one input into several
//! messages.

use std::sync::{Arc, OnceLock};

use fieldgate_crds::{GatewayDevice, Point};
use fieldgate_gateway::adapters::DeviceTask;
use fieldgate_gateway::adapters::hub::{Credential, DeviceHub, Listener, Registered, Registration};
use fieldgate_gateway::metrics::Metrics;
use fieldgate_gateway::reading::ReadingSink;
use fieldgate_gateway::secrets::SecretStore;
use tokio_util::sync::CancellationToken;

/// Largest frame or body the targets accept (the gateway's default `--max-frame-bytes`).
pub const MAX_FRAME: usize = 64 * 1024;

/// One current-thread runtime per process.
pub fn runtime() -> &'static tokio::runtime::Runtime {
    static RT: OnceLock<tokio::runtime::Runtime> = OnceLock::new();
    RT.get_or_init(|| {
        tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap_or_else(|e| panic!("runtime: {e}"))
    })
}

/// A device from its JSON form (start-up data of the targets).
pub fn device(json: serde_json::Value) -> GatewayDevice {
    serde_json::from_value(json).unwrap_or_else(|e| panic!("fuzz device: {e}"))
}

/// The points of a pushing device: every type, JSON paths into objects and arrays, scaling.
pub fn push_points() -> Vec<Point> {
    device(serde_json::json!({
        "name": "d", "connection": {"udp": {"tokenSecretRef": {"name": "t"}}},
        "points": [
            {"name": "temperature", "type": "float64", "scale": 0.1, "offset": -40.0},
            {"name": "count", "type": "uint32"},
            {"name": "delta", "type": "int16"},
            {"name": "big", "type": "int64"},
            {"name": "huge", "type": "uint64"},
            {"name": "f", "type": "float32"},
            {"name": "on", "type": "bool"},
            {"name": "label", "type": "string"},
            {"name": "nested", "type": "float64", "path": "a.b.0.c"},
            {"name": "listed", "type": "int32", "path": "values.2"},
            {"name": "u16", "type": "uint16", "path": "regs.u16"}
        ]
    }))
    .points
}

/// Modbus points over every table, type and word order (registers 0-39, coils and inputs
/// 0-15), as a poll plans and decodes them.
pub fn modbus_points() -> Vec<Point> {
    let points = vec![
        serde_json::json!({"name": "h_u16", "type": "uint16", "modbus": {"table": "holding", "address": 0}}),
        serde_json::json!({"name": "h_i16", "type": "int16", "scale": 0.1, "modbus": {"table": "holding", "address": 1}}),
        serde_json::json!({"name": "h_u32", "type": "uint32", "modbus": {"table": "holding", "address": 2}}),
        serde_json::json!({"name": "h_i32le", "type": "int32", "modbus": {"table": "holding", "address": 4, "wordOrder": "littleEndian"}}),
        serde_json::json!({"name": "h_f32", "type": "float32", "modbus": {"table": "holding", "address": 6}}),
        serde_json::json!({"name": "h_f64le", "type": "float64", "offset": 1.5, "modbus": {"table": "holding", "address": 8, "wordOrder": "littleEndian"}}),
        serde_json::json!({"name": "h_u64", "type": "uint64", "modbus": {"table": "holding", "address": 12}}),
        serde_json::json!({"name": "h_i64", "type": "int64", "modbus": {"table": "holding", "address": 16}}),
        serde_json::json!({"name": "h_bit", "type": "bool", "modbus": {"table": "holding", "address": 20, "bit": 15}}),
        serde_json::json!({"name": "h_text", "type": "string", "modbus": {"table": "holding", "address": 21, "length": 8}}),
        serde_json::json!({"name": "h_far", "type": "uint16", "modbus": {"table": "holding", "address": 39}}),
        serde_json::json!({"name": "i_u16", "type": "uint16", "modbus": {"table": "input", "address": 0}}),
        serde_json::json!({"name": "i_f32", "type": "float32", "modbus": {"table": "input", "address": 1}}),
        serde_json::json!({"name": "c0", "type": "bool", "modbus": {"table": "coil", "address": 0}}),
        serde_json::json!({"name": "c9", "type": "bool", "modbus": {"table": "coil", "address": 9}}),
        serde_json::json!({"name": "d3", "type": "bool", "modbus": {"table": "discrete", "address": 3}}),
        serde_json::json!({"name": "d15", "type": "bool", "modbus": {"table": "discrete", "address": 15}}),
    ];
    device(serde_json::json!({
        "name": "m", "connection": {"modbusTcp": {"host": "127.0.0.1", "port": 502, "unitId": 1}},
        "points": points
    }))
    .points
}

/// The token the registered devices present (`token=...`).
pub const TOKEN: &str = "s3cret-token";

/// A hub with devices of `listener` registered: `open` (no token) and `dev` (token [`TOKEN`]),
/// both with [`push_points`] (for CoAP, at the paths `/open` and `/dev`); the guards keep them
/// registered. Call inside the runtime.
pub fn hub(listener: Listener) -> (Arc<DeviceHub>, Vec<Registration>) {
    let metrics = Arc::new(Metrics::new(&mut prometheus_client::registry::Registry::default()));
    let hub = DeviceHub::for_tests(Arc::clone(&metrics));
    let dir = std::env::temp_dir().join(format!("fieldgate-fuzz-secrets-{}", std::process::id()));
    let _ = std::fs::create_dir_all(dir.join("t"));
    let _ = std::fs::write(dir.join("t/token"), TOKEN);
    let token = match SecretStore::new(&dir).read("t", "token") {
        Ok(v) => Credential::Token(v),
        Err(e) => panic!("fuzz token: {e}"),
    };
    let task = |name: &str| {
        let mut d = device(serde_json::json!({
            "name": name, "connection": {"udp": {"tokenSecretRef": {"name": "t"}}}, "points": []
        }));
        d.points = push_points();
        DeviceTask {
            device: Arc::new(d),
            node: "fuzz".into(),
            // Nothing reads the readings: an emit is refused at once.
            sink: ReadingSink::channel(1).0,
            metrics: Arc::clone(&metrics),
            cancel: CancellationToken::new(),
            hub: Arc::clone(&hub),
        }
    };
    let prefix = if listener == Listener::Coap { "/" } else { "" };
    let guards = vec![
        hub.register(listener, format!("{prefix}open"), Registered::new(task("open"), Credential::Open, 1024)),
        hub.register(listener, format!("{prefix}dev"), Registered::new(task("dev"), token, 1024)),
    ];
    (hub, guards)
}

/// A socket for the gateway's answers, and a peer address whose socket nobody reads (its
/// buffer fills; answers are best effort, as on the network). Call inside the runtime.
pub fn answer_sockets() -> (tokio::net::UdpSocket, std::net::UdpSocket, std::net::SocketAddr) {
    let bind = || std::net::UdpSocket::bind("127.0.0.1:0").unwrap_or_else(|e| panic!("bind: {e}"));
    let ours = bind();
    let _ = ours.set_nonblocking(true);
    let socket = tokio::net::UdpSocket::from_std(ours).unwrap_or_else(|e| panic!("socket: {e}"));
    let peer_socket = bind();
    let peer = peer_socket.local_addr().unwrap_or_else(|e| panic!("addr: {e}"));
    (socket, peer_socket, peer)
}

/// Cuts `data` into messages at every `0xff 0x00` pair (a split chosen by the fuzzer; the
/// seeds use it between datagrams or reads).
pub fn messages(data: &[u8]) -> Vec<&[u8]> {
    let mut out = Vec::new();
    let mut start = 0;
    let mut i = 0;
    while i + 1 < data.len() {
        if data[i] == 0xff && data[i + 1] == 0x00 {
            out.push(&data[start..i]);
            start = i + 2;
            i += 2;
        } else {
            i += 1;
        }
    }
    out.push(&data[start..]);
    out
}
