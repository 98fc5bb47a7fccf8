//! Simulated Modbus TCP devices, for the demo, the tests and the benchmarks.
//!
//! [`serve`] answers Modbus TCP on a listener, any number of connections at once, for one
//! [`SimDevice`]. A device can be told to misbehave ([`Fault`]), also while it runs
//! ([`SimDevice::set_fault`]): a change drops every open connection, like a device reboot, and
//! new connections see the new behaviour.
//!
//! # Register map
//!
//! Every value derives from one counter `c` (u32): whole seconds since the device was created,
//! plus 1000 × device index (wrapping arithmetic throughout), so all typed values of one
//! reading can be checked against each other ([`expected_c_consistent`]).
//!
//! Holding registers (input registers mirror the computed values at the same addresses):
//!
//! | address | type | value |
//! |---|---|---|
//! | 0 | uint16 | `c as u16` |
//! | 1 | int16 | `-((c as i16) & 0x3fff)` |
//! | 2-3 | uint32, big-endian words | `100_000 + c` |
//! | 4-5 | int32, big-endian words | `-100_000 - c` |
//! | 6-7 | float32, big-endian words | `c as f32 * 0.5` |
//! | 8-9 | float32, **little-endian** words | `c as f32 * 0.25` |
//! | 10-13 | uint64, big-endian words | `10_000_000_000 + c` |
//! | 14-17 | int64, big-endian words | `-10_000_000_000 - c` |
//! | 18-21 | float64, big-endian words | `c as f64 * 0.125` |
//! | 22-25 | string, 8 chars | `format!("SIM{:05}", index)` |
//! | 26-27 | uint32, big-endian words | the **sample number**: 1, 2, 3, ... one per read of these registers |
//! | 28..28+extra | uint16 | `(c + i) as u16` for the i-th extra register |
//!
//! Coils 0-7: bit `i` is `(c >> i) & 1 == 1`. Discrete inputs 0-7: the negation of the coils.
//!
//! Every read of the sample number serves a new *sample*, and the device logs it
//! ([`SimDevice::served`]): its number, the connection it went out on, and when. A reading
//! that carries sample number `k` of a device is that sample; what the cloud received can be
//! judged against what the devices served, without asking the gateway. (Input registers do
//! not mirror the sample number: reading them serves no sample.)
//!
//! Writes to holding registers and coils are accepted and stored: a written address answers
//! the written value (instead of the computed one) until the process restarts. Reads and
//! writes outside the map are answered with exception `IllegalDataAddress`; a quantity of 0 or
//! above the protocol's limit with `IllegalDataValue`.
//!
//! Like many PLCs and meters, a device can be told to accept one connection at a time
//! ([`SimDevice::with_single_connection`]): a second connection is closed at once while the
//! first is open (and counted, [`SimDevice::refused_connections`]). Writes are counted
//! ([`SimDevice::writes`]); [`SimDevice::hang_after_write`] makes the device store a write and
//! then never answer it (a gateway that crashes right after the write, seen from the device).

use std::collections::HashMap;
use std::fmt;
use std::future::{Future, ready};
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::str::FromStr;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use fieldgate_crds::{
    Connection, GatewayDevice, HumanDuration, ModbusTable, ModbusTcpConnection, Point, ValueType, WordOrder,
};
use rand::Rng;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio_modbus::server::tcp::Server;
use tokio_modbus::{ExceptionCode, Request, Response};
use tokio_util::sync::CancellationToken;

pub use fieldgate_proto::v1 as pb;
use pb::point::Value;

mod check;
pub use check::{check_sim_reading, typed_points};

/// Holding (and input) registers of the fixed part of the map.
pub const FIXED_REGISTERS: u16 = 28;
/// Holding register of the sample number (two words, big-endian).
pub const SAMPLE_REGISTER: u16 = 26;
/// Most samples a device logs (older ones are forgotten past this).
pub const SAMPLE_LOG_CAPACITY: usize = 1 << 20;

/// One sample a device served: a read of its sample number.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Served {
    /// The sample number (1 for the device's first).
    pub sample: u32,
    /// The connection it went out on (numbered per device from 1).
    pub connection: u64,
    /// When, since the Unix epoch.
    pub at: std::time::SystemTime,
}
/// Coils (and discrete inputs) of the map.
pub const BITS: u16 = 8;

/// How a simulated device misbehaves.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum Fault {
    /// Answers like a healthy device.
    #[default]
    None,
    /// Reads requests and never answers.
    Timeout,
    /// Answers every request with exception `IllegalDataAddress`.
    Exception,
    /// Answers every request with random bytes that are not Modbus.
    Garbage,
    /// Resets the connection (RST) when a request arrives.
    Reset,
}

impl Fault {
    /// The name used on the command line.
    pub fn as_str(self) -> &'static str {
        match self {
            Fault::None => "none",
            Fault::Timeout => "timeout",
            Fault::Exception => "exception",
            Fault::Garbage => "garbage",
            Fault::Reset => "reset",
        }
    }

    /// Whether tokio-modbus's server answers (rather than a raw socket handler).
    fn speaks_modbus(self) -> bool {
        matches!(self, Fault::None | Fault::Exception)
    }
}

impl fmt::Display for Fault {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A fault name that is not one of `none|timeout|exception|garbage|reset`.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("unknown fault {0:?}: expected none, timeout, exception, garbage or reset")]
pub struct UnknownFault(pub String);

impl FromStr for Fault {
    type Err = UnknownFault;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.trim().to_ascii_lowercase().as_str() {
            "none" => Ok(Fault::None),
            "timeout" => Ok(Fault::Timeout),
            "exception" => Ok(Fault::Exception),
            "garbage" => Ok(Fault::Garbage),
            "reset" => Ok(Fault::Reset),
            _ => Err(UnknownFault(s.to_string())),
        }
    }
}

/// One simulated device. Clones share the device: a test keeps a clone to change the fault.
#[derive(Clone, Debug)]
pub struct SimDevice {
    /// Index of the device: offsets its counter by 1000 × index and names it in `label`.
    pub index: u32,
    /// Registers after the fixed map (`28..28 + extra_registers`), for big devices.
    pub extra_registers: u16,
    shared: Arc<Shared>,
}

#[derive(Debug)]
struct Shared {
    started: Instant,
    fault: watch::Sender<Fault>,
    holding: Mutex<HashMap<u16, u16>>,
    coils: Mutex<HashMap<u16, bool>>,
    requests: AtomicU64,
    /// Samples served, in order.
    served: Mutex<Vec<Served>>,
    connections: AtomicU64,
    polls_served: AtomicU64,
    writes: AtomicU64,
    single_connection: AtomicBool,
    open_connections: AtomicUsize,
    refused_connections: AtomicU64,
    hang_after_write: watch::Sender<bool>,
}

impl SimDevice {
    /// A healthy device whose counter starts now.
    pub fn new(index: u32, extra_registers: u16) -> Self {
        let extra_registers = extra_registers.min(u16::MAX - FIXED_REGISTERS);
        Self {
            index,
            extra_registers,
            shared: Arc::new(Shared {
                started: Instant::now(),
                fault: watch::Sender::new(Fault::None),
                holding: Mutex::default(),
                coils: Mutex::default(),
                requests: AtomicU64::new(0),
                served: Mutex::default(),
                connections: AtomicU64::new(0),
                polls_served: AtomicU64::new(0),
                writes: AtomicU64::new(0),
                single_connection: AtomicBool::new(false),
                open_connections: AtomicUsize::new(0),
                refused_connections: AtomicU64::new(0),
                hang_after_write: watch::Sender::new(false),
            }),
        }
    }

    /// The same device with a fault.
    pub fn with_fault(self, fault: Fault) -> Self {
        self.set_fault(fault);
        self
    }

    /// The same device, accepting one connection at a time: another one is closed at once
    /// while the first is open.
    pub fn with_single_connection(self) -> Self {
        self.shared.single_connection.store(true, Ordering::Relaxed);
        self
    }

    /// Connections closed at once because one was already open.
    pub fn refused_connections(&self) -> u64 {
        self.shared.refused_connections.load(Ordering::Relaxed)
    }

    /// Write requests stored so far (registers or coils).
    pub fn writes(&self) -> u64 {
        self.shared.writes.load(Ordering::Relaxed)
    }

    /// While set, a write is stored and counted but not answered (the answer goes out once
    /// this is cleared, and the connection is served again).
    pub fn hang_after_write(&self, on: bool) {
        self.shared.hang_after_write.send_replace(on);
    }

    /// The value of holding register `address` now (written or computed). Looking is not
    /// serving: no sample is taken and no poll counted.
    pub fn holding(&self, address: u16) -> Option<u16> {
        if u32::from(address) >= self.registers() {
            return None;
        }
        if let Some(v) = lock(&self.shared.holding).get(&address) {
            return Some(*v);
        }
        self.computed(self.counter(), address, 1).first().copied()
    }

    /// The current fault.
    pub fn fault(&self) -> Fault {
        *self.shared.fault.borrow()
    }

    /// Changes the fault. A change drops every open connection of the device.
    pub fn set_fault(&self, fault: Fault) {
        self.shared.fault.send_if_modified(|f| {
            let changed = *f != fault;
            *f = fault;
            changed
        });
    }

    /// Requests received so far, answered or not (for a faulty device: reads of request
    /// bytes, which is one per request unless the client pipelines).
    pub fn requests(&self) -> u64 {
        self.shared.requests.load(Ordering::Relaxed)
    }

    /// Reads of holding register 0 answered: one per gateway poll of [`simulated_points`]
    /// (the holding registers are read in one request), so the readings this device served.
    pub fn polls_served(&self) -> u64 {
        self.shared.polls_served.load(Ordering::Relaxed)
    }

    fn count_request(&self) {
        self.shared.requests.fetch_add(1, Ordering::Relaxed);
    }

    /// Every sample served so far, in order (the last [`SAMPLE_LOG_CAPACITY`]).
    pub fn served(&self) -> Vec<Served> {
        lock(&self.shared.served).clone()
    }

    /// Serves the next sample on `connection`: logs it, returns its number.
    fn serve_sample(&self, connection: u64) -> u32 {
        let mut log = lock(&self.shared.served);
        let sample = log.last().map_or(1, |s| s.sample.wrapping_add(1));
        if log.len() >= SAMPLE_LOG_CAPACITY {
            log.remove(0);
        }
        log.push(Served { sample, connection, at: std::time::SystemTime::now() });
        sample
    }

    /// The counter now: whole seconds since the device was created + 1000 × index.
    pub fn counter(&self) -> u32 {
        let secs = u32::try_from(self.shared.started.elapsed().as_secs()).unwrap_or(u32::MAX);
        secs.wrapping_add(self.index.wrapping_mul(1000))
    }

    /// Holding and input registers in the map.
    fn registers(&self) -> u32 {
        u32::from(FIXED_REGISTERS) + u32::from(self.extra_registers)
    }

    /// Computed register values `address..address + count` (the caller checked the range).
    fn computed(&self, c: u32, address: u16, count: u16) -> Vec<u16> {
        let fixed = fixed_registers(c, self.index);
        (address..address.saturating_add(count))
            .map(|a| match fixed.get(usize::from(a)) {
                Some(w) => *w,
                None => c.wrapping_add(u32::from(a - FIXED_REGISTERS)) as u16,
            })
            .collect()
    }

    /// Answers one request as the healthy device, on connection `connection`.
    fn answer(&self, request: Request<'_>, connection: u64) -> Result<Response, ExceptionCode> {
        let c = self.counter();
        let registers = self.registers();
        let bits = u32::from(BITS);
        match request {
            Request::ReadHoldingRegisters(address, count) => {
                check(address, count, 125, registers)?;
                let mut words = self.computed(c, address, count);
                let sample_words = SAMPLE_REGISTER..SAMPLE_REGISTER + 2;
                if (address..address + count).any(|a| sample_words.contains(&a)) {
                    let sample = self.serve_sample(connection).to_be_bytes();
                    let sample =
                        [u16::from_be_bytes([sample[0], sample[1]]), u16::from_be_bytes([sample[2], sample[3]])];
                    for (a, w) in (address..).zip(words.iter_mut()) {
                        if sample_words.contains(&a) {
                            *w = sample[usize::from(a - SAMPLE_REGISTER)];
                        }
                    }
                }
                let written = lock(&self.shared.holding);
                for (a, w) in (address..).zip(words.iter_mut()) {
                    if let Some(v) = written.get(&a) {
                        *w = *v;
                    }
                }
                if address == 0 {
                    self.shared.polls_served.fetch_add(1, Ordering::Relaxed);
                }
                Ok(Response::ReadHoldingRegisters(words))
            }
            Request::ReadInputRegisters(address, count) => {
                check(address, count, 125, registers)?;
                Ok(Response::ReadInputRegisters(self.computed(c, address, count)))
            }
            Request::ReadCoils(address, count) => {
                check(address, count, 2000, bits)?;
                let written = lock(&self.shared.coils);
                let coils = (address..address + count)
                    .map(|a| written.get(&a).copied().unwrap_or_else(|| coil(c, a)))
                    .collect();
                Ok(Response::ReadCoils(coils))
            }
            Request::ReadDiscreteInputs(address, count) => {
                check(address, count, 2000, bits)?;
                let inputs = (address..address + count).map(|a| !coil(c, a)).collect();
                Ok(Response::ReadDiscreteInputs(inputs))
            }
            Request::WriteSingleRegister(address, word) => {
                check(address, 1, 1, registers)?;
                lock(&self.shared.holding).insert(address, word);
                Ok(Response::WriteSingleRegister(address, word))
            }
            Request::WriteMultipleRegisters(address, words) => {
                let count = u16::try_from(words.len()).unwrap_or(u16::MAX);
                check(address, count, 123, registers)?;
                lock(&self.shared.holding).extend((address..).zip(words.iter().copied()));
                Ok(Response::WriteMultipleRegisters(address, count))
            }
            Request::WriteSingleCoil(address, on) => {
                check(address, 1, 1, bits)?;
                lock(&self.shared.coils).insert(address, on);
                Ok(Response::WriteSingleCoil(address, on))
            }
            Request::WriteMultipleCoils(address, coils) => {
                let count = u16::try_from(coils.len()).unwrap_or(u16::MAX);
                check(address, count, 1968, bits)?;
                lock(&self.shared.coils).extend((address..).zip(coils.iter().copied()));
                Ok(Response::WriteMultipleCoils(address, count))
            }
            _ => Err(ExceptionCode::IllegalFunction),
        }
    }
}

/// Refuses a quantity out of `1..=max` and a range outside `0..size`.
fn check(address: u16, count: u16, max: u16, size: u32) -> Result<(), ExceptionCode> {
    if count == 0 || count > max {
        return Err(ExceptionCode::IllegalDataValue);
    }
    if u32::from(address) + u32::from(count) > size {
        return Err(ExceptionCode::IllegalDataAddress);
    }
    Ok(())
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

fn coil(c: u32, address: u16) -> bool {
    u32::from(address) < 32 && (c >> address) & 1 == 1
}

/// The typed values of the map for counter `c`.
#[derive(Clone, Copy, Debug, PartialEq)]
struct Expected {
    u16: u16,
    i16: i16,
    u32: u32,
    i32: i32,
    f32: f32,
    f32_le: f32,
    u64: u64,
    i64: i64,
    f64: f64,
}

impl Expected {
    fn of(c: u32) -> Self {
        Self {
            u16: c as u16,
            i16: -((c as i16) & 0x3fff),
            u32: 100_000u32.wrapping_add(c),
            i32: (-100_000i64 - i64::from(c)) as i32,
            f32: c as f32 * 0.5,
            f32_le: c as f32 * 0.25,
            u64: 10_000_000_000u64 + u64::from(c),
            i64: -10_000_000_000i64 - i64::from(c),
            f64: f64::from(c) * 0.125,
        }
    }
}

/// The text of register 22-25 of device `index`.
fn label(index: u32) -> String {
    let mut text = format!("SIM{index:05}");
    text.truncate(8);
    text
}

/// Registers 0..26 for counter `c` on device `index`.
fn fixed_registers(c: u32, index: u32) -> Vec<u16> {
    let e = Expected::of(c);
    let mut w = Vec::with_capacity(usize::from(FIXED_REGISTERS));
    let mut push_be =
        |bytes: &[u8]| w.extend(bytes.chunks(2).map(|p| u16::from_be_bytes([p[0], p.get(1).copied().unwrap_or(0)])));
    push_be(&e.u16.to_be_bytes());
    push_be(&e.i16.to_be_bytes());
    push_be(&e.u32.to_be_bytes());
    push_be(&e.i32.to_be_bytes());
    push_be(&e.f32.to_be_bytes());
    // Little-endian word order: the least significant word first.
    let le = e.f32_le.to_bits();
    push_be(&[(le >> 8) as u8, le as u8, (le >> 24) as u8, (le >> 16) as u8]);
    push_be(&e.u64.to_be_bytes());
    push_be(&e.i64.to_be_bytes());
    push_be(&e.f64.to_be_bytes());
    let mut text = label(index).into_bytes();
    text.resize(8, 0);
    push_be(&text);
    // The sample number: filled in per read of the holding registers (0 elsewhere).
    push_be(&[0, 0, 0, 0]);
    w
}

/// Serves `device` on `listener` until `cancel` fires, any number of connections at once.
///
/// Healthy and `Exception` devices are served by tokio-modbus's server; the other faults by a
/// raw socket handler. Changing the fault drops every open connection.
pub async fn serve(listener: TcpListener, device: SimDevice, cancel: CancellationToken) -> io::Result<()> {
    // Each fault epoch gets its own listener on the same socket: tokio-modbus's server takes
    // its listener by value and never gives it back.
    let socket = listener.into_std()?;
    let mut faults = device.shared.fault.subscribe();
    loop {
        let fault = *faults.borrow_and_update();
        let listener = TcpListener::from_std(socket.try_clone()?)?;
        let epoch = cancel.child_token();
        let _stop_connections = epoch.clone().drop_guard();
        let served = async {
            if fault.speaks_modbus() {
                serve_modbus(listener, &device, fault).await
            } else {
                serve_raw(listener, &device, fault, &epoch).await;
                Ok(())
            }
        };
        tokio::select! {
            () = cancel.cancelled() => return Ok(()),
            changed = faults.changed() => {
                if changed.is_err() {
                    // Unreachable: the device holds the sender. Serve until cancelled.
                    cancel.cancelled().await;
                    return Ok(());
                }
                tracing::debug!(device = device.index, fault = %device.fault(), "simulated device changes behaviour");
            }
            result = served => {
                if let Err(error) = result {
                    tracing::debug!(device = device.index, %error, "simulated device stopped accepting; restarting");
                }
                // Accepting failed (such as too many open files): pause, then accept again.
                if cancel.run_until_cancelled(tokio::time::sleep(Duration::from_millis(50))).await.is_none() {
                    return Ok(());
                }
            }
        }
    }
}

/// One connection's service; dropped when the connection ends.
struct SimService {
    device: SimDevice,
    exception: bool,
    connection: u64,
}

impl Drop for SimService {
    fn drop(&mut self) {
        self.device.shared.open_connections.fetch_sub(1, Ordering::AcqRel);
    }
}

impl tokio_modbus::server::Service for SimService {
    type Request = Request<'static>;
    type Response = Response;
    type Exception = ExceptionCode;
    type Future = Pin<Box<dyn Future<Output = Result<Response, ExceptionCode>> + Send>>;

    fn call(&self, request: Self::Request) -> Self::Future {
        self.device.count_request();
        if self.exception {
            return Box::pin(ready(Err(ExceptionCode::IllegalDataAddress)));
        }
        let write = matches!(
            request,
            Request::WriteSingleRegister(..)
                | Request::WriteMultipleRegisters(..)
                | Request::WriteSingleCoil(..)
                | Request::WriteMultipleCoils(..)
        );
        let answer = self.device.answer(request, self.connection);
        if write && answer.is_ok() {
            self.device.shared.writes.fetch_add(1, Ordering::AcqRel);
            let mut hang = self.device.shared.hang_after_write.subscribe();
            if *hang.borrow_and_update() {
                return Box::pin(async move {
                    while *hang.borrow_and_update() {
                        if hang.changed().await.is_err() {
                            break;
                        }
                    }
                    answer
                });
            }
        }
        Box::pin(ready(answer))
    }
}

async fn serve_modbus(listener: TcpListener, device: &SimDevice, fault: Fault) -> io::Result<()> {
    let exception = fault == Fault::Exception;
    let on_connected = |stream: TcpStream, _peer: SocketAddr| {
        let shared = &device.shared;
        let connection = shared.connections.fetch_add(1, Ordering::Relaxed) + 1;
        let open = shared.open_connections.fetch_add(1, Ordering::AcqRel);
        let service = Arc::new(SimService { device: device.clone(), exception, connection });
        let refuse = open > 0 && shared.single_connection.load(Ordering::Relaxed);
        if refuse {
            shared.refused_connections.fetch_add(1, Ordering::Relaxed);
        }
        async move {
            if refuse {
                // Dropping the stream (and the service) closes the connection at once.
                return Ok::<_, io::Error>(None);
            }
            // Best effort: a request/response protocol with one small write per message.
            stream.set_nodelay(true).ok();
            Ok::<_, io::Error>(Some((service, stream)))
        }
    };
    let on_process_error = |error: io::Error| {
        tracing::debug!(%error, "simulated device connection ended");
    };
    // Dropping this future (fault change, cancel) cancels every connection it serves.
    Server::new(listener).serve(&on_connected, on_process_error).await
}

async fn serve_raw(listener: TcpListener, device: &SimDevice, fault: Fault, epoch: &CancellationToken) {
    loop {
        let accepted = tokio::select! {
            () = epoch.cancelled() => return,
            accepted = listener.accept() => accepted,
        };
        match accepted {
            Ok((stream, _)) => {
                let epoch = epoch.clone();
                let device = device.clone();
                tokio::spawn(async move {
                    epoch.run_until_cancelled(misbehave(stream, &device, fault)).await;
                });
            }
            Err(error) => {
                tracing::debug!(%error, "simulated device failed to accept");
                let pause = tokio::time::sleep(Duration::from_millis(50));
                if epoch.run_until_cancelled(pause).await.is_none() {
                    return;
                }
            }
        }
    }
}

/// Handles one connection of a device with a raw fault.
async fn misbehave(mut stream: TcpStream, device: &SimDevice, fault: Fault) {
    let mut buf = [0u8; 512];
    loop {
        match stream.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(_) => device.count_request(),
        }
        match fault {
            Fault::Timeout => {}
            Fault::Garbage => {
                if stream.write_all(&garbage()).await.is_err() {
                    return;
                }
            }
            Fault::Reset => {
                // SO_LINGER 0: dropping the socket sends RST instead of FIN.
                if let Err(error) = stream.set_zero_linger() {
                    tracing::debug!(%error, "could not set SO_LINGER 0; closing normally");
                }
                return;
            }
            Fault::None | Fault::Exception => return,
        }
    }
}

/// Random bytes that a Modbus TCP client reads as one complete frame and refuses: the length
/// field matches the bytes sent (so the client does not wait for more) and the protocol
/// identifier is not 0.
fn garbage() -> Vec<u8> {
    let mut rng = rand::rng();
    let len = rng.random_range(8..=64usize);
    let mut bytes = vec![0u8; len];
    rng.fill(&mut bytes[..]);
    let protocol: u16 = rng.random_range(1..=u16::MAX);
    bytes[2..4].copy_from_slice(&protocol.to_be_bytes());
    bytes[4..6].copy_from_slice(&((len - 6) as u16).to_be_bytes());
    bytes
}

fn point(name: &str, value_type: ValueType, table: ModbusTable, address: u16) -> Point {
    Point::modbus(name, value_type, table, address)
}

/// Points covering the whole map, named `u16`, `i16`, `u32`, `i32`, `f32`, `f32_le`, `u64`,
/// `i64`, `f64`, `label`, `coil0..coil7`, `discrete0..discrete7`, `in_u16`, `in_f32`, then
/// `reg0..reg{extra_registers-1}` (holding 26..).
pub fn simulated_points(extra_registers: u16) -> Vec<Point> {
    use ModbusTable::{Coil, Discrete, Holding, Input};
    let mut points = vec![
        point("u16", ValueType::Uint16, Holding, 0),
        point("i16", ValueType::Int16, Holding, 1),
        point("u32", ValueType::Uint32, Holding, 2),
        point("i32", ValueType::Int32, Holding, 4),
        point("f32", ValueType::Float32, Holding, 6),
        point("f32_le", ValueType::Float32, Holding, 8),
        point("u64", ValueType::Uint64, Holding, 10),
        point("i64", ValueType::Int64, Holding, 14),
        point("f64", ValueType::Float64, Holding, 18),
        point("label", ValueType::String, Holding, 22),
        point("sample", ValueType::Uint32, Holding, SAMPLE_REGISTER),
    ];
    if let Some(m) = points[5].modbus.as_mut() {
        m.word_order = Some(WordOrder::LittleEndian);
    }
    if let Some(m) = points[9].modbus.as_mut() {
        m.length = Some(4);
    }
    for i in 0..BITS {
        points.push(point(&format!("coil{i}"), ValueType::Bool, Coil, i));
    }
    for i in 0..BITS {
        points.push(point(&format!("discrete{i}"), ValueType::Bool, Discrete, i));
    }
    points.push(point("in_u16", ValueType::Uint16, Input, 0));
    points.push(point("in_f32", ValueType::Float32, Input, 6));
    let extra = extra_registers.min(u16::MAX - FIXED_REGISTERS);
    for i in 0..extra {
        points.push(point(&format!("reg{i}"), ValueType::Uint16, Holding, FIXED_REGISTERS + i));
    }
    points
}

/// A gateway device reading a simulated device at `host:port` (unit 1, timeout 500ms).
pub fn gateway_device(
    namespace: &str,
    name: &str,
    host: &str,
    port: u16,
    poll_interval: &HumanDuration,
    extra_registers: u16,
) -> GatewayDevice {
    GatewayDevice {
        namespace: namespace.to_string(),
        name: name.to_string(),
        connection: Connection::ModbusTcp(ModbusTcpConnection {
            host: host.to_string(),
            port: Some(port),
            unit_id: Some(1),
            timeout: Some(HumanDuration::from(Duration::from_millis(500))),
        }),
        poll_interval: Some(poll_interval.clone()),
        points: simulated_points(extra_registers),
    }
}

/// Checks that a decoded reading of [`simulated_points`] is consistent: derives `c` from `u32`
/// (and checks `u16` against it), then checks every other typed value against the formulas.
///
/// Points read by the same request as `u32` (holding 0-25) must match `c` exactly. Points read
/// by other requests (coils, discrete inputs, input registers, extra registers past the first
/// request) may come from the neighbouring second, so `c - 1 ..= c + 1` is accepted for them.
/// Points absent from the reading are not checked. Returns `c`, or every mismatch found.
pub fn expected_c_consistent(points: &[pb::Point]) -> Result<u32, String> {
    let value = |name: &str| points.iter().find(|p| p.name == name).and_then(|p| p.value.clone());
    let c = match value("u32") {
        Some(Value::UintValue(v)) => {
            u32::try_from(v).map_err(|_| format!("u32 = {v} does not fit 32 bits"))?.wrapping_sub(100_000)
        }
        other => return Err(format!("u32 missing or not an unsigned integer: {other:?}")),
    };
    let e = Expected::of(c);
    let mut errors = Vec::new();
    let mut expect = |name: &str, want: Value| match value(name) {
        Some(got) if got == want => {}
        None => {}
        Some(got) => errors.push(format!("{name}: got {got:?}, want {want:?} (c = {c})")),
    };
    expect("u16", Value::UintValue(u64::from(e.u16)));
    expect("i16", Value::IntValue(i64::from(e.i16)));
    expect("i32", Value::IntValue(i64::from(e.i32)));
    expect("f32", Value::DoubleValue(f64::from(e.f32)));
    expect("f32_le", Value::DoubleValue(f64::from(e.f32_le)));
    expect("u64", Value::UintValue(e.u64));
    expect("i64", Value::IntValue(e.i64));
    expect("f64", Value::DoubleValue(e.f64));
    match value("label") {
        None => {}
        Some(Value::StringValue(s))
            if s.len() == 8
                && s.starts_with("SIM")
                && s.get(3..)
                    .and_then(|d| d.parse::<u32>().ok())
                    .is_some_and(|i| u64::from(i) * 1000 <= u64::from(c)) => {}
        Some(got) => errors.push(format!("label: got {got:?}, want \"SIM\" + 5 digits (c = {c})")),
    }

    // Values of other requests: some c' within one second of c must explain them all.
    let near = [c.wrapping_sub(1), c, c.wrapping_add(1)];
    let mut within = |what: &str, fits: &dyn Fn(u32) -> bool| {
        if !near.iter().any(|&c2| fits(c2)) {
            errors.push(format!("{what}: matches no counter in {}..={} (c = {c})", near[0], near[2]));
        }
    };
    let bit = |prefix: &str, i: u16| match value(&format!("{prefix}{i}")) {
        Some(Value::BoolValue(b)) => Some(Some(b)),
        None => None,
        Some(_) => Some(None),
    };
    let coils: Vec<_> = (0..BITS).filter_map(|i| bit("coil", i).map(|b| (i, b))).collect();
    if !coils.is_empty() {
        within("coils", &|c2| coils.iter().all(|&(i, b)| b == Some(coil(c2, i))));
    }
    let discretes: Vec<_> = (0..BITS).filter_map(|i| bit("discrete", i).map(|b| (i, b))).collect();
    if !discretes.is_empty() {
        within("discrete inputs", &|c2| discretes.iter().all(|&(i, b)| b == Some(!coil(c2, i))));
    }
    if let Some(v) = value("in_u16") {
        within("in_u16", &|c2| v == Value::UintValue(u64::from(c2 as u16)));
    }
    if let Some(v) = value("in_f32") {
        within("in_f32", &|c2| v == Value::DoubleValue(f64::from(c2 as f32 * 0.5)));
    }
    for p in points.iter().filter(|p| p.name.starts_with("reg")) {
        let Ok(i) = p.name[3..].parse::<u32>() else {
            continue;
        };
        let v = p.value.clone();
        within(&p.name, &|c2| v == Some(Value::UintValue(u64::from(c2.wrapping_add(i) as u16))));
    }

    if errors.is_empty() { Ok(c) } else { Err(errors.join("; ")) }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;
    use tokio_modbus::client::{Client, Context, tcp};
    use tokio_modbus::{Error as ModbusError, Slave};

    async fn start(device: SimDevice) -> (SocketAddr, CancellationToken) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let cancel = CancellationToken::new();
        tokio::spawn(serve(listener, device, cancel.clone()));
        (addr, cancel)
    }

    async fn call(ctx: &mut Context, req: Request<'static>) -> Result<Response, ExceptionCode> {
        tokio::time::timeout(Duration::from_secs(5), ctx.call(req)).await.unwrap().unwrap()
    }

    #[test]
    fn fault_parses_from_its_command_line_name() {
        for f in [Fault::None, Fault::Timeout, Fault::Exception, Fault::Garbage, Fault::Reset] {
            assert_eq!(f.as_str().parse::<Fault>(), Ok(f));
        }
        assert_eq!("Timeout".parse::<Fault>(), Ok(Fault::Timeout));
        assert!("slow".parse::<Fault>().is_err());
    }

    #[test]
    fn register_map_follows_the_documented_formulas() {
        let w = fixed_registers(7, 3);
        assert_eq!(w.len(), usize::from(FIXED_REGISTERS));
        assert_eq!(w[0], 7);
        assert_eq!(w[1] as i16, -7);
        assert_eq!((u32::from(w[2]) << 16) | u32::from(w[3]), 100_007);
        assert_eq!(((u32::from(w[4]) << 16) | u32::from(w[5])) as i32, -100_007);
        assert_eq!(f32::from_bits((u32::from(w[6]) << 16) | u32::from(w[7])), 3.5);
        // little-endian word order: low word at 8
        assert_eq!(f32::from_bits((u32::from(w[9]) << 16) | u32::from(w[8])), 1.75);
        let u64_of = |s: &[u16]| s.iter().fold(0u64, |a, &x| (a << 16) | u64::from(x));
        assert_eq!(u64_of(&w[10..14]), 10_000_000_007);
        assert_eq!(u64_of(&w[14..18]) as i64, -10_000_000_007);
        assert_eq!(f64::from_bits(u64_of(&w[18..22])), 0.875);
        let text: Vec<u8> = w[22..26].iter().flat_map(|x| x.to_be_bytes()).collect();
        assert_eq!(text, b"SIM00003");
        assert_eq!(Expected::of(0x4001).i16, -1, "int16 keeps only 14 bits");
    }

    #[test]
    fn simulated_device_config_is_valid_and_round_trips_through_yaml() {
        let config = fieldgate_crds::GatewayConfig {
            api_version: fieldgate_crds::GatewayConfig::API_VERSION.into(),
            kind: fieldgate_crds::GatewayConfig::KIND.into(),
            devices: vec![
                gateway_device("default", "sim-0000", "127.0.0.1", 5020, &"1s".parse().unwrap(), 0),
                gateway_device("default", "sim-0001", "127.0.0.1", 5021, &"250ms".parse().unwrap(), 200),
            ],
            ..Default::default()
        };
        config.validate().unwrap();
        let yaml = serde_saphyr::to_string(&config).unwrap();
        assert_eq!(fieldgate_crds::GatewayConfig::from_yaml(&yaml).unwrap(), config);
        assert_eq!(config.devices[1].points.len(), 29 + 200);
    }

    #[tokio::test]
    async fn a_single_connection_device_closes_a_second_connection_while_the_first_is_open() {
        let device = SimDevice::new(0, 0).with_single_connection();
        let (addr, cancel) = start(device.clone()).await;
        let mut first = tcp::connect_slave(addr, Slave(1)).await.unwrap();
        call(&mut first, Request::WriteSingleRegister(0, 7)).await.unwrap();
        let mut second = tcp::connect_slave(addr, Slave(1)).await.unwrap();
        assert!(
            tokio::time::timeout(Duration::from_secs(10), second.call(Request::ReadHoldingRegisters(0, 1)))
                .await
                .unwrap()
                .is_err(),
            "the second connection was served"
        );
        assert_eq!(device.refused_connections(), 1);
        assert_eq!(
            call(&mut first, Request::ReadHoldingRegisters(0, 1)).await,
            Ok(Response::ReadHoldingRegisters(vec![7]))
        );
        assert_eq!((device.writes(), device.holding(0)), (1, Some(7)));
        // Once the first is closed, a new one is served.
        drop(first);
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        loop {
            let mut again = tcp::connect_slave(addr, Slave(1)).await.unwrap();
            let served =
                tokio::time::timeout(Duration::from_secs(5), again.call(Request::ReadHoldingRegisters(0, 1))).await;
            if matches!(served, Ok(Ok(Ok(_)))) {
                break;
            }
            assert!(tokio::time::Instant::now() < deadline, "never served again");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        cancel.cancel();
    }

    #[tokio::test]
    async fn simulator_serves_the_map_and_stores_writes() {
        let device = SimDevice::new(2, 4);
        let (addr, cancel) = start(device.clone()).await;
        let mut ctx = tcp::connect_slave(addr, Slave(1)).await.unwrap();

        let Response::ReadHoldingRegisters(words) = call(&mut ctx, Request::ReadHoldingRegisters(0, 32)).await.unwrap()
        else {
            panic!("wrong response")
        };
        let c = ((u32::from(words[2]) << 16) | u32::from(words[3])) - 100_000;
        assert!((2000..2010).contains(&c), "c = {c}");
        assert_eq!((words[26], words[27]), (0, 1), "the first sample");
        assert_eq!(words[28], c as u16);
        assert_eq!(words[31], (c + 3) as u16);
        // Each read of the sample number serves the next sample; other reads serve none.
        let Response::ReadHoldingRegisters(again) = call(&mut ctx, Request::ReadHoldingRegisters(27, 1)).await.unwrap()
        else {
            panic!("wrong response")
        };
        assert_eq!(again, [2]);
        call(&mut ctx, Request::ReadHoldingRegisters(0, 4)).await.unwrap();
        let served = device.served();
        assert_eq!(served.iter().map(|s| (s.sample, s.connection)).collect::<Vec<_>>(), [(1, 1), (2, 1)]);

        let Response::ReadInputRegisters(input) = call(&mut ctx, Request::ReadInputRegisters(0, 1)).await.unwrap()
        else {
            panic!("wrong response")
        };
        assert!(input[0] == c as u16 || input[0] == (c + 1) as u16);

        let Response::ReadCoils(coils) = call(&mut ctx, Request::ReadCoils(0, 8)).await.unwrap() else {
            panic!("wrong response")
        };
        let Response::ReadDiscreteInputs(inputs) = call(&mut ctx, Request::ReadDiscreteInputs(0, 8)).await.unwrap()
        else {
            panic!("wrong response")
        };
        assert_eq!(coils.len(), 8);
        assert_eq!(inputs.len(), 8);

        call(&mut ctx, Request::WriteSingleRegister(1, 0xbeef)).await.unwrap();
        call(&mut ctx, Request::WriteSingleCoil(7, true)).await.unwrap();
        assert_eq!(
            call(&mut ctx, Request::ReadHoldingRegisters(1, 1)).await,
            Ok(Response::ReadHoldingRegisters(vec![0xbeef]))
        );
        let Response::ReadCoils(coils) = call(&mut ctx, Request::ReadCoils(7, 1)).await.unwrap() else {
            panic!("wrong response")
        };
        assert!(coils[0]);

        assert_eq!(call(&mut ctx, Request::ReadHoldingRegisters(30, 3)).await, Err(ExceptionCode::IllegalDataAddress));
        assert_eq!(call(&mut ctx, Request::ReadCoils(8, 1)).await, Err(ExceptionCode::IllegalDataAddress));
        assert_eq!(call(&mut ctx, Request::ReadHoldingRegisters(0, 126)).await, Err(ExceptionCode::IllegalDataValue));
        cancel.cancel();
    }

    #[tokio::test]
    async fn exception_fault_answers_illegal_data_address_and_can_be_removed() {
        let device = SimDevice::new(0, 0).with_fault(Fault::Exception);
        let (addr, cancel) = start(device.clone()).await;
        let mut ctx = tcp::connect_slave(addr, Slave(1)).await.unwrap();
        assert_eq!(call(&mut ctx, Request::ReadHoldingRegisters(0, 1)).await, Err(ExceptionCode::IllegalDataAddress));

        device.set_fault(Fault::None);
        // The change drops open connections: a new one sees the healthy device.
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        loop {
            let mut ctx = tcp::connect_slave(addr, Slave(1)).await.unwrap();
            if let Ok(Ok(Ok(Response::ReadHoldingRegisters(_)))) =
                tokio::time::timeout(Duration::from_secs(1), ctx.call(Request::ReadHoldingRegisters(0, 1))).await
            {
                break;
            }
            assert!(tokio::time::Instant::now() < deadline, "fault was not removed");
            tokio::task::yield_now().await;
        }
        cancel.cancel();
    }

    #[tokio::test]
    async fn garbage_fault_answers_bytes_a_client_refuses_at_once() {
        let (addr, cancel) = start(SimDevice::new(0, 0).with_fault(Fault::Garbage)).await;
        let mut ctx = tcp::connect_slave(addr, Slave(1)).await.unwrap();
        let result = tokio::time::timeout(Duration::from_secs(5), ctx.call(Request::ReadHoldingRegisters(0, 1)))
            .await
            .expect("garbage must not look like a partial frame");
        match result {
            Err(ModbusError::Transport(e)) => assert_eq!(e.kind(), io::ErrorKind::InvalidData),
            other => panic!("expected a decoding error, got {other:?}"),
        }
        cancel.cancel();
    }

    #[tokio::test]
    async fn reset_fault_breaks_the_connection_when_a_request_arrives() {
        let (addr, cancel) = start(SimDevice::new(0, 0).with_fault(Fault::Reset)).await;
        let mut ctx = tcp::connect_slave(addr, Slave(1)).await.unwrap();
        let result = tokio::time::timeout(Duration::from_secs(5), ctx.call(Request::ReadHoldingRegisters(0, 1)))
            .await
            .expect("a reset must not look like a timeout");
        assert!(matches!(result, Err(ModbusError::Transport(_))), "got {result:?}");
        cancel.cancel();
    }
}
