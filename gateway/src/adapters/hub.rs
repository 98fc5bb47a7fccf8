//! The device hub: what device adapters share beyond their own connection.
//!
//! - The listeners devices connect to (CoAP push, raw TCP, raw UDP), bound lazily when the
//!   first device of that protocol registers, and supervised until the gateway stops.
//! - The directory those listeners look devices up in: a device adapter registers itself
//!   (CoAP push path, TCP/UDP id with its token) for as long as it runs and is removed when
//!   its task ends, so per-device config changes need nothing from the listeners.
//! - The Secret store, for device tokens.
//!
//! Refusals that cannot be tied to a device (unknown device, wrong token, malformed frame
//! before identification) are counted in `fieldgate_ingress_rejected_total{protocol,reason}`.

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError, RwLock};
use std::time::{Duration, SystemTime};

use tokio_util::sync::CancellationToken;

use super::DeviceTask;
use crate::metrics::{IngressLabels, Metrics};
use crate::reading;
use crate::secrets::{SecretBytes, SecretStore};

/// Listener settings (command line / environment).
#[derive(Clone, Debug, clap::Args)]
pub struct HubArgs {
    /// UDP address of the CoAP listener devices push to (bound when a CoAP device exists).
    #[arg(long, env = "FIELDGATE_COAP_LISTEN", default_value = "0.0.0.0:5683")]
    pub coap_listen: SocketAddr,
    /// TCP address raw TCP devices connect to (bound when a TCP device exists).
    #[arg(long, env = "FIELDGATE_TCP_LISTEN", default_value = "0.0.0.0:7700")]
    pub tcp_listen: SocketAddr,
    /// UDP address raw UDP devices send to (bound when a UDP device exists).
    #[arg(long, env = "FIELDGATE_UDP_LISTEN", default_value = "0.0.0.0:7700")]
    pub udp_listen: SocketAddr,
    /// Most TCP device connections open at once; further ones are closed at once.
    #[arg(long, env = "FIELDGATE_TCP_MAX_CONNECTIONS", default_value_t = 20_000)]
    pub tcp_max_connections: usize,
    /// Time a new TCP connection has to identify itself with its first frame.
    #[arg(long, env = "FIELDGATE_FIRST_FRAME_TIMEOUT", default_value = "5s", value_parser = humantime::parse_duration)]
    pub first_frame_timeout: Duration,
    /// Longest TCP frame (line) or UDP datagram, in bytes.
    #[arg(long, env = "FIELDGATE_MAX_FRAME_BYTES", default_value_t = 4096)]
    pub max_frame_bytes: usize,
    /// A device id replaced this many times within `--flap-window` is quarantined.
    #[arg(long, env = "FIELDGATE_FLAP_LIMIT", default_value_t = 5)]
    pub flap_limit: u32,
    /// Window in which replacements of one device id are counted.
    #[arg(long, env = "FIELDGATE_FLAP_WINDOW", default_value = "60s", value_parser = humantime::parse_duration)]
    pub flap_window: Duration,
    /// How long a flapping device id is refused.
    #[arg(long, env = "FIELDGATE_QUARANTINE", default_value = "60s", value_parser = humantime::parse_duration)]
    pub quarantine: Duration,
    /// An identified TCP connection silent for this long is parked: its socket leaves the
    /// runtime for a shared epoll set, so an idle device costs a few hundred bytes. `0s`
    /// parks as soon as nothing is buffered; a longer time keeps chatty devices on the
    /// runtime (a parked connection costs a task spawn and four `epoll_ctl` calls per wake-up).
    #[arg(long, env = "FIELDGATE_TCP_PARK_AFTER", default_value = "0s", value_parser = humantime::parse_duration)]
    pub tcp_park_after: Duration,
}

impl HubArgs {
    /// Settings for tests: every listener on an ephemeral port of 127.0.0.1.
    pub fn loopback() -> Self {
        let any = SocketAddr::from(([127, 0, 0, 1], 0));
        Self {
            coap_listen: any,
            tcp_listen: any,
            udp_listen: any,
            tcp_max_connections: 1024,
            first_frame_timeout: Duration::from_secs(2),
            max_frame_bytes: 4096,
            flap_limit: 5,
            flap_window: Duration::from_secs(60),
            quarantine: Duration::from_secs(60),
            tcp_park_after: Duration::ZERO,
        }
    }
}

/// A listener devices connect to (or push to). Every place that differs per listener matches
/// on it exhaustively, so a new listening protocol is a variant and the compiler lists the
/// rest: its label, its address on the command line, the task that serves it. (Protocols
/// whose adapter reaches out to the device, such as Modbus, need no listener.)
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Listener {
    /// CoAP push (UDP).
    Coap,
    /// Raw TCP frames.
    Tcp,
    /// Raw UDP datagrams.
    Udp,
}

impl Listener {
    /// The protocol label (metrics, logs); the same as the devices' `Connection::protocol`.
    pub const fn protocol(self) -> &'static str {
        match self {
            Listener::Coap => "coap",
            Listener::Tcp => "tcp",
            Listener::Udp => "udp",
        }
    }

    /// The address it is bound to, from the command line.
    pub fn address(self, args: &HubArgs) -> SocketAddr {
        match self {
            Listener::Coap => args.coap_listen,
            Listener::Tcp => args.tcp_listen,
            Listener::Udp => args.udp_listen,
        }
    }

    /// Serves the listener until the hub stops (restarted by its supervisor if it fails).
    async fn serve(self, hub: Arc<DeviceHub>) {
        match self {
            Listener::Coap => super::coap::listen(hub).await,
            Listener::Tcp => super::tcp::listen(hub).await,
            Listener::Udp => super::udp::listen(hub).await,
        }
    }
}

/// What a device must present to be let in.
#[derive(Debug)]
pub enum Credential {
    /// Nothing (CoAP devices without a token Secret).
    Open,
    /// This token.
    Token(SecretBytes),
    /// The token Secret is unreadable: everything is refused.
    Unreadable,
}

/// A device registered with a listener.
pub struct Registered {
    /// The device's task (sink, metrics, labels).
    pub task: DeviceTask,
    /// What it must present.
    pub token: Credential,
    /// Largest body accepted from it.
    pub max_body: usize,
    /// The device's live TCP connection, for commands (raw TCP devices only).
    pub live: Mutex<Option<Arc<CommandSlot>>>,
    ids: IdClock,
}

impl Registered {
    /// A new registration.
    pub fn new(task: DeviceTask, token: Credential, max_body: usize) -> Self {
        Self { task, token, max_body, live: Mutex::default(), ids: IdClock::default() }
    }

    /// Whether `presented` is this device's token (constant time in the token's length).
    pub fn token_matches(&self, presented: &[u8]) -> bool {
        match &self.token {
            Credential::Open => true,
            Credential::Unreadable => false,
            Credential::Token(t) => {
                let want = t.expose_str().map(str::as_bytes).unwrap_or(t.expose());
                want.len() == presented.len() && want.iter().zip(presented).fold(0u8, |acc, (a, b)| acc | (a ^ b)) == 0
            }
        }
    }

    /// A reading of pushed points, received now, with a fresh id.
    pub fn reading(&self, points: Vec<reading::pb::Point>) -> reading::Reading {
        let d = &self.task.device;
        reading::Reading {
            id: self.next_id(),
            namespace: d.namespace.clone(),
            device: d.name.clone(),
            node: self.task.node.clone(),
            time_unix_nano: reading::unix_nanos(SystemTime::now()),
            buffer_seq: 0,
            points,
        }
    }

    /// A fresh reading id for a pushed reading (see [`IdClock`]).
    pub fn next_id(&self) -> String {
        let d = &self.task.device;
        reading::message_id(&d.namespace, &d.name, self.ids.next())
    }
}

/// Ids of pushed readings: the receive time in ms, bumped to stay strictly increasing per
/// device, so two readings in one millisecond never share an id (JetStream would drop the
/// second as a duplicate).
#[derive(Debug, Default)]
pub struct IdClock(AtomicU64);

impl IdClock {
    /// The next id value.
    pub fn next(&self) -> u64 {
        let now = reading::unix_nanos(SystemTime::now()) / 1_000_000;
        let mut last = self.0.load(Ordering::Relaxed);
        loop {
            let next = now.max(last + 1);
            match self.0.compare_exchange_weak(last, next, Ordering::Relaxed, Ordering::Relaxed) {
                Ok(_) => return next,
                Err(seen) => last = seen,
            }
        }
    }
}

/// A directory key: the listener and the name devices are found by (CoAP path, TCP/UDP id).
type Key = (Listener, String);

/// Removes a registration when the device task ends.
pub struct Registration {
    hub: Arc<DeviceHub>,
    key: Key,
    entry: Arc<Registered>,
}

impl Registration {
    /// What was registered.
    pub fn entry(&self) -> &Arc<Registered> {
        &self.entry
    }
}

impl Drop for Registration {
    fn drop(&mut self) {
        let mut dir = self.hub.directory.write().unwrap_or_else(PoisonError::into_inner);
        // Only our own entry: a newer registration under the same key stays.
        if dir.get(&self.key).is_some_and(|e| Arc::ptr_eq(e, &self.entry)) {
            dir.remove(&self.key);
        }
    }
}

/// The gateway's device-side shared services.
pub struct DeviceHub {
    /// Listener settings.
    pub args: HubArgs,
    /// Device tokens.
    pub secrets: SecretStore,
    /// The gateway's metrics.
    pub metrics: Arc<Metrics>,
    /// Cancelled when the gateway stops: listeners end.
    pub cancel: CancellationToken,
    directory: RwLock<HashMap<Key, Arc<Registered>>>,
    started: Mutex<HashSet<Listener>>,
    bound: Mutex<HashMap<Listener, SocketAddr>>,
    /// Modbus RTU buses in use (one scheduler per serial line).
    pub buses: super::modbus_rtu::Buses,
    /// Reporting state of the devices with reporting rules.
    pub reporters: crate::reporting::Reporters,
    /// Running devices by `namespace/name` (commands look them up here).
    running: RwLock<HashMap<String, RunningDevice>>,
    /// The UDP listener's socket and where each UDP device last sent from, for commands.
    pub udp_peers: super::udp::UdpPeers,
    /// Idle TCP device connections, parked off the runtime.
    pub tcp_park: super::tcp::Park,
    /// The wall clock pollers name their polls by (steps counted, see [`crate::clock`]).
    pub clock: Arc<crate::clock::WallClock>,
}

/// Frames waiting to be written to a live connection (commands), and what wakes it.
/// Empty and allocation-free while idle.
#[derive(Default)]
pub struct CommandSlot {
    /// Which connection of the device this is.
    pub conn: u64,
    /// Set when a newer connection of the device replaced this one.
    pub replaced: std::sync::atomic::AtomicBool,
    /// Set when the device was removed or the gateway stops: the connection closes.
    pub stop: std::sync::atomic::AtomicBool,
    /// Frames and who waits for them to be written.
    pub pending: Mutex<std::collections::VecDeque<(String, tokio::sync::oneshot::Sender<bool>)>>,
    /// Wakes the connection (commands queued, or replaced).
    pub notify: tokio::sync::Notify,
}

/// A running device: its task, and the inbox of its adapter's commands.
#[derive(Clone)]
pub struct RunningDevice {
    /// The device's task.
    pub task: DeviceTask,
    /// Where its commands go (bounded: [`crate::command::DEVICE_QUEUE`]).
    pub commands: tokio::sync::mpsc::Sender<crate::command::Job>,
}

/// Removes a running device from the hub when its task ends.
pub struct Running {
    hub: Arc<DeviceHub>,
    key: String,
    device: Arc<fieldgate_crds::GatewayDevice>,
}

impl Drop for Running {
    fn drop(&mut self) {
        let mut running = self.hub.running.write().unwrap_or_else(PoisonError::into_inner);
        if running.get(&self.key).is_some_and(|r| Arc::ptr_eq(&r.task.device, &self.device)) {
            running.remove(&self.key);
        }
    }
}

impl DeviceHub {
    /// A hub; listeners start when the first device of their protocol registers.
    pub fn new(args: HubArgs, secrets: SecretStore, metrics: Arc<Metrics>, cancel: CancellationToken) -> Arc<Self> {
        let clock = crate::clock::WallClock::system(Arc::clone(&metrics));
        Self::with_clock(args, secrets, metrics, cancel, clock)
    }

    /// A hub whose pollers read `clock` (tests step it).
    pub fn with_clock(
        args: HubArgs,
        secrets: SecretStore,
        metrics: Arc<Metrics>,
        cancel: CancellationToken,
        clock: Arc<crate::clock::WallClock>,
    ) -> Arc<Self> {
        Arc::new(Self {
            args,
            secrets,
            buses: super::modbus_rtu::Buses::new(Arc::clone(&metrics)),
            metrics,
            cancel,
            directory: RwLock::default(),
            started: Mutex::default(),
            bound: Mutex::default(),
            reporters: Default::default(),
            running: RwLock::default(),
            udp_peers: Default::default(),
            tcp_park: super::tcp::Park::default(),
            clock,
        })
    }

    /// A hub for unit tests: loopback listeners on ephemeral ports, an empty Secret store.
    pub fn for_tests(metrics: Arc<Metrics>) -> Arc<Self> {
        Self::new(HubArgs::loopback(), SecretStore::new("/nonexistent"), metrics, CancellationToken::new())
    }

    /// Registers a device under `(listener, name)` and makes sure the listener runs. A
    /// previous registration under the same key is replaced.
    pub fn register(self: &Arc<Self>, listener: Listener, name: String, entry: Registered) -> Registration {
        let entry = Arc::new(entry);
        let key = (listener, name);
        self.directory.write().unwrap_or_else(PoisonError::into_inner).insert(key.clone(), Arc::clone(&entry));
        self.ensure_listener(listener);
        Registration { hub: Arc::clone(self), key, entry }
    }

    /// Records a device as running, with the inbox of its commands, until the returned guard
    /// is dropped.
    pub fn running(
        self: &Arc<Self>,
        task: &DeviceTask,
        commands: tokio::sync::mpsc::Sender<crate::command::Job>,
    ) -> Running {
        let key = task.key();
        let entry = RunningDevice { task: task.clone(), commands };
        self.running.write().unwrap_or_else(PoisonError::into_inner).insert(key.clone(), entry);
        Running { hub: Arc::clone(self), key, device: Arc::clone(&task.device) }
    }

    /// The running device `namespace/name`.
    pub fn device(&self, key: &str) -> Option<RunningDevice> {
        self.running.read().unwrap_or_else(PoisonError::into_inner).get(key).cloned()
    }

    /// Forgets what the listeners keep of a device that left the config (its adapter, and
    /// with it its registrations and command inbox, already stopped).
    pub fn forget_device(&self, key: &str) {
        self.udp_peers.forget(key);
    }

    /// Every device registered with `listener`.
    pub fn registered(&self, listener: Listener) -> Vec<Arc<Registered>> {
        let dir = self.directory.read().unwrap_or_else(PoisonError::into_inner);
        dir.iter().filter(|((l, _), _)| *l == listener).map(|(_, e)| Arc::clone(e)).collect()
    }

    /// The device registered under `(listener, name)`.
    pub fn lookup(&self, listener: Listener, name: &str) -> Option<Arc<Registered>> {
        let dir = self.directory.read().unwrap_or_else(PoisonError::into_inner);
        dir.get(&(listener, name.to_string())).cloned()
    }

    /// Counts a refusal not tied to a device.
    pub fn reject(&self, protocol: &'static str, reason: &'static str) {
        self.metrics.ingress_rejected.get_or_create(&IngressLabels { protocol, reason }).inc();
    }

    /// Counts `n` entries of `what` forgotten before their time to stay within a bound.
    pub fn evicted(&self, protocol: &'static str, what: &'static str, n: u64) {
        self.metrics.ingress_evicted.get_or_create(&IngressLabels { protocol, reason: what }).inc_by(n);
    }

    /// Counts a handled inbound message of `kind`.
    pub fn count_message(&self, protocol: &'static str, kind: &'static str) {
        self.metrics.ingress_messages.get_or_create(&IngressLabels { protocol, reason: kind }).inc();
    }

    /// The address a listener is bound to, once bound.
    pub fn bound(&self, listener: Listener) -> Option<SocketAddr> {
        self.bound.lock().unwrap_or_else(PoisonError::into_inner).get(&listener).copied()
    }

    pub(crate) fn set_bound(&self, listener: Listener, addr: SocketAddr) {
        self.bound.lock().unwrap_or_else(PoisonError::into_inner).insert(listener, addr);
    }

    /// Reads a device token Secret. Unreadable: logged, counted (`secret`), and everything
    /// the device presents is refused until its task restarts with a readable Secret.
    pub fn credential(&self, r: &fieldgate_crds::DeviceSecretRef, task: &DeviceTask) -> Credential {
        match self.secrets.read(&r.name, r.key()) {
            Ok(t) => Credential::Token(t),
            Err(e) => {
                tracing::warn!(device = %task.key(), error = %e, "token Secret unreadable; the device is refused");
                task.count_error("secret");
                Credential::Unreadable
            }
        }
    }

    fn ensure_listener(self: &Arc<Self>, listener: Listener) {
        if !self.started.lock().unwrap_or_else(PoisonError::into_inner).insert(listener) {
            return;
        }
        let hub = Arc::clone(self);
        let name = format!("listener {}", listener.protocol());
        tokio::spawn(crate::supervise::supervise(name, Arc::clone(&self.metrics), self.cancel.clone(), move || {
            listener.serve(Arc::clone(&hub))
        }));
    }
}

/// Receive buffer asked for on a device listener: many devices answering one poll round or
/// pushing at once arrive as a burst, and a datagram the buffer cannot hold is lost (the
/// kernel caps it at `net.core.rmem_max`).
const UDP_RECEIVE_BUFFER: usize = 4 << 20;

/// A bound, non-blocking UDP socket with a receive buffer sized for bursts.
fn udp_listener(addr: SocketAddr) -> std::io::Result<tokio::net::UdpSocket> {
    let socket = socket2::Socket::new(socket2::Domain::for_address(addr), socket2::Type::DGRAM, None)?;
    if let Err(e) = socket.set_recv_buffer_size(UDP_RECEIVE_BUFFER) {
        tracing::debug!(listen = %addr, error = %e, "receive buffer size not raised");
    }
    socket.bind(&addr.into())?;
    socket.set_nonblocking(true)?;
    tokio::net::UdpSocket::from_std(socket.into())
}

/// Binds with retries (another process may hold the port for a moment) until `cancel`.
pub(crate) async fn bind_udp(hub: &DeviceHub, listener: Listener) -> Option<tokio::net::UdpSocket> {
    let (protocol, addr) = (listener.protocol(), listener.address(&hub.args));
    let mut delays = crate::supervise::backoff(Duration::from_millis(200), Duration::from_secs(10));
    let mut logged = false;
    loop {
        match udp_listener(addr) {
            Ok(s) => {
                let local = s.local_addr().unwrap_or(addr);
                hub.set_bound(listener, local);
                tracing::info!(protocol, listen = %local, "device listener bound");
                return Some(s);
            }
            Err(e) => {
                if !logged {
                    tracing::warn!(protocol, listen = %addr, error = %e, "cannot bind the device listener; retrying");
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

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use prometheus_client::registry::Registry;

    fn task(hub: &Arc<DeviceHub>, metrics: &Arc<Metrics>) -> DeviceTask {
        let device: fieldgate_crds::GatewayDevice = serde_json::from_value(serde_json::json!({
            "name": "d", "connection": {"coap": {}}, "points": [{"name": "t", "type": "float64"}]
        }))
        .unwrap();
        DeviceTask {
            device: Arc::new(device),
            node: "n".into(),
            sink: crate::reading::ReadingSink::channel(1).0,
            metrics: Arc::clone(metrics),
            cancel: CancellationToken::new(),
            hub: Arc::clone(hub),
        }
    }

    /// Every configured device is a task holding this future (and a supervisor holding its
    /// maker): thousands of push devices that only wait must stay cheap.
    #[test]
    fn a_device_task_stays_small() {
        let metrics = Arc::new(Metrics::new(&mut Registry::default()));
        let hub = DeviceHub::for_tests(Arc::clone(&metrics));
        let size = std::mem::size_of_val(&super::super::run(task(&hub, &metrics)));
        assert!(size <= 512, "the device future grew to {size} bytes");
    }

    #[test]
    fn pushed_reading_ids_never_repeat() {
        let clock = IdClock::default();
        let ids: Vec<u64> = (0..1000).map(|_| clock.next()).collect();
        assert!(ids.windows(2).all(|w| w[0] < w[1]));
    }

    #[tokio::test]
    async fn registrations_end_with_their_guard_and_check_tokens() {
        let metrics = Arc::new(Metrics::new(&mut Registry::default()));
        let hub = DeviceHub::for_tests(Arc::clone(&metrics));
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("s")).unwrap();
        std::fs::write(dir.path().join("s/token"), "abc\n").unwrap();
        let store = SecretStore::new(dir.path());
        let t = task(&hub, &metrics);
        let cred = match store.read("s", "token") {
            Ok(v) => Credential::Token(v),
            Err(_) => Credential::Unreadable,
        };
        let first = hub.register(Listener::Udp, "dev".into(), Registered::new(t.clone(), cred, 64));
        let dev = hub.lookup(Listener::Udp, "dev").unwrap();
        assert!(dev.token_matches(b"abc"));
        assert!(!dev.token_matches(b"abd") && !dev.token_matches(b"ab") && !dev.token_matches(b""));
        // A newer registration under the same key survives the older guard.
        let second = hub.register(Listener::Udp, "dev".into(), Registered::new(t.clone(), Credential::Unreadable, 64));
        drop(first);
        assert!(!hub.lookup(Listener::Udp, "dev").unwrap().token_matches(b"abc"));
        drop(second);
        assert!(hub.lookup(Listener::Udp, "dev").is_none());
        let missing = hub.credential(&fieldgate_crds::DeviceSecretRef { name: "nope".into(), key: None }, &t);
        assert!(matches!(missing, Credential::Unreadable));
    }
}
