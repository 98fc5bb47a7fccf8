//! Modbus TCP: polls one device over one TCP connection.
//!
//! - [`plan`] (pure, computed once per run) groups the points by table and coalesces
//!   contiguous or overlapping spans into as few read requests as the protocol allows, never
//!   across a gap (an address between two points may not exist on the device).
//! - [`decode`] (pure) turns the registers or bit of one point into a reading point.
//! - [`run`] polls on a wall-clock-aligned schedule, one request in flight at a time, every
//!   request under the connection's `timeout`. After a timeout or an I/O or protocol error the
//!   connection is dropped (a reused connection can return the previous request's response)
//!   and rebuilt at a later poll, with capped exponential backoff and jitter. An exception
//!   response keeps the connection.
//!
//! Error kinds counted: `connect`, `timeout`, `exception`, `protocol` (malformed reply), `io`
//! (reset, end of stream).

use std::collections::BTreeMap;
use std::fmt;
use std::io;
use std::net::SocketAddr;
use std::time::Duration;

use backon::{BackoffBuilder, ExponentialBackoff, ExponentialBuilder};
use fieldgate_crds::{ModbusTable, ModbusTcpConnection, Point, ValueType, WordOrder};
use prometheus_client::metrics::gauge::Gauge;
use tokio::time::Instant;
use tokio_modbus::client::{Client, Context, tcp};
use tokio_modbus::{ExceptionCode, Request, Response, Slave};

use super::DeviceTask;
use super::modbus_write::{self, Caller};
use crate::clock::PollSchedule;
use crate::command::{Inbox, Job, Outcome, Reason};
use crate::reading::{self, Reading, Value, pb};
use crate::telemetry::{LogThrottle, ReadingTrace};

const BACKOFF_MIN: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(30);

// ---------------------------------------------------------------------------------------------
// Plan

/// One read request: `count` registers (or bits) of `table` from `address`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ReadRequest {
    /// The table read.
    pub table: ModbusTable,
    /// First address.
    pub address: u16,
    /// Registers (or bits) read.
    pub count: u16,
}

impl ReadRequest {
    fn request(self) -> Request<'static> {
        match self.table {
            ModbusTable::Coil => Request::ReadCoils(self.address, self.count),
            ModbusTable::Discrete => Request::ReadDiscreteInputs(self.address, self.count),
            ModbusTable::Input => Request::ReadInputRegisters(self.address, self.count),
            ModbusTable::Holding => Request::ReadHoldingRegisters(self.address, self.count),
        }
    }
}

/// Where a point's data is in the answers of a plan.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Location {
    /// Index of the request in [`ReadPlan::requests`].
    pub request: usize,
    /// Offset of the point's first register (or bit) in that request's answer.
    pub offset: u16,
    /// Registers (or bits) of the point.
    pub span: u16,
}

/// The requests of one poll, and where each point is in their answers.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ReadPlan {
    /// Requests, by table then address.
    pub requests: Vec<ReadRequest>,
    /// One entry per point, in the device's point order (`None`: the point has no Modbus
    /// location and is never read).
    pub locations: Vec<Option<Location>>,
}

/// Plans the requests reading `points`: per table, sorted by address, contiguous or
/// overlapping spans merged as long as a request stays within [`ModbusTable::max_read`].
pub fn plan(points: &[Point]) -> ReadPlan {
    let mut by_table: BTreeMap<ModbusTable, Vec<(u16, u16, usize)>> = BTreeMap::new();
    for (i, p) in points.iter().enumerate() {
        if let Some(m) = &p.modbus {
            let span = m.span(p.value_type).max(1);
            by_table.entry(m.table).or_default().push((m.address, span, i));
        }
    }
    let mut plan = ReadPlan { requests: Vec::new(), locations: vec![None; points.len()] };
    for (table, mut items) in by_table {
        // By address; at one address the longest span first.
        items.sort_by_key(|&(address, span, i)| (address, std::cmp::Reverse(span), i));
        let max = u32::from(table.max_read());
        let mut open: Option<usize> = None;
        for (address, span, i) in items {
            let start = u32::from(address);
            let end = start + u32::from(span);
            let merged = open.and_then(|r| {
                let req = &plan.requests[r];
                let req_start = u32::from(req.address);
                let req_end = req_start + u32::from(req.count);
                let new_end = req_end.max(end);
                (start <= req_end && new_end - req_start <= max).then_some((r, new_end - req_start))
            });
            let r = match merged {
                Some((r, count)) => {
                    plan.requests[r].count = u16::try_from(count).unwrap_or(u16::MAX);
                    r
                }
                None => {
                    plan.requests.push(ReadRequest { table, address, count: span });
                    plan.requests.len() - 1
                }
            };
            open = Some(r);
            plan.locations[i] = Some(Location { request: r, offset: address - plan.requests[r].address, span });
        }
    }
    plan
}

// ---------------------------------------------------------------------------------------------
// Decode

/// The raw data of one point.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Raw<'a> {
    /// A coil or discrete input.
    Bit(bool),
    /// The point's registers, in wire order.
    Registers(&'a [u16]),
}

enum Number {
    Int(i64),
    Uint(u64),
    Float(f64),
}

impl Number {
    fn as_f64(&self) -> f64 {
        match *self {
            Number::Int(i) => i as f64,
            Number::Uint(u) => u as f64,
            Number::Float(f) => f,
        }
    }
}

/// Decodes one point. Bytes within a register are big-endian; `word_order` orders the words of
/// multi-register values. `None` when the data does not fit the point (too few registers, a bit
/// for a non-bool point).
pub fn decode(point: &Point, raw: Raw<'_>) -> Option<pb::Point> {
    let modbus = point.modbus.as_ref();
    let value = match (point.value_type, raw) {
        (ValueType::Bool, Raw::Bit(b)) => Value::BoolValue(b),
        (ValueType::Bool, Raw::Registers(words)) => {
            let w = *words.first()?;
            Value::BoolValue(match modbus.and_then(|m| m.bit) {
                Some(bit) => w.checked_shr(u32::from(bit)).is_some_and(|v| v & 1 == 1),
                None => w != 0,
            })
        }
        (ValueType::String, Raw::Registers(words)) => Value::StringValue(text(words)),
        (_, Raw::Bit(_)) => return None,
        (value_type, Raw::Registers(words)) => {
            let order = modbus.and_then(|m| m.word_order).unwrap_or_default();
            let n = number(value_type, words, order)?;
            if point.is_scaled() {
                let scale = point.scale.unwrap_or(1.0);
                let offset = point.offset.unwrap_or(0.0);
                Value::DoubleValue(n.as_f64() * scale + offset)
            } else {
                match n {
                    Number::Int(i) => Value::IntValue(i),
                    Number::Uint(u) => Value::UintValue(u),
                    Number::Float(f) => Value::DoubleValue(f),
                }
            }
        }
    };
    Some(pb::Point { name: point.name.clone(), value: Some(value), unit: point.unit.clone().unwrap_or_default() })
}

fn number(value_type: ValueType, words: &[u16], order: WordOrder) -> Option<Number> {
    let words = words.get(..usize::from(value_type.registers()?))?;
    let push = |acc: u64, w: &u16| (acc << 16) | u64::from(*w);
    let raw = match order {
        WordOrder::BigEndian => words.iter().fold(0, push),
        WordOrder::LittleEndian => words.iter().rev().fold(0, push),
    };
    Some(match value_type {
        ValueType::Int16 => Number::Int(i64::from(raw as u16 as i16)),
        ValueType::Int32 => Number::Int(i64::from(raw as u32 as i32)),
        ValueType::Int64 => Number::Int(raw as i64),
        ValueType::Uint16 | ValueType::Uint32 | ValueType::Uint64 => Number::Uint(raw),
        ValueType::Float32 => Number::Float(f64::from(f32::from_bits(raw as u32))),
        ValueType::Float64 => Number::Float(f64::from_bits(raw)),
        ValueType::Bool | ValueType::String => return None,
    })
}

/// Two characters per register, trailing NULs and spaces trimmed.
fn text(words: &[u16]) -> String {
    let bytes: Vec<u8> = words.iter().flat_map(|w| w.to_be_bytes()).collect();
    let end = bytes.iter().rposition(|&b| b != 0 && b != b' ').map_or(0, |i| i + 1);
    String::from_utf8_lossy(&bytes[..end]).into_owned()
}

// ---------------------------------------------------------------------------------------------
// Requests

/// Why a request failed.
#[derive(Debug, thiserror::Error)]
pub(crate) enum RequestError {
    #[error("no answer within {0:?}")]
    Timeout(Duration),
    #[error("exception response: {0}")]
    Exception(ExceptionCode),
    #[error("malformed reply: {0}")]
    Protocol(String),
    #[error("connection failed: {0}")]
    Io(io::Error),
    /// The device ended the connection (end of stream) while a request waited for its answer.
    #[error("connection failed: the device closed the connection")]
    Closed,
}

impl RequestError {
    pub(crate) fn kind(&self) -> &'static str {
        match self {
            RequestError::Timeout(_) => "timeout",
            RequestError::Exception(_) => "exception",
            RequestError::Protocol(_) => "protocol",
            RequestError::Io(_) | RequestError::Closed => "io",
        }
    }

    /// The command failure this is.
    pub(crate) fn command_reason(&self) -> Reason {
        match self {
            RequestError::Timeout(_) => Reason::Timeout,
            RequestError::Exception(_) | RequestError::Protocol(_) => Reason::DeviceError,
            RequestError::Io(_) | RequestError::Closed => Reason::Unreachable,
        }
    }

    /// Whether the connection must be dropped: anything but an exception response leaves it
    /// in an unknown state (a late answer may still arrive).
    pub(crate) fn breaks_connection(&self) -> bool {
        !matches!(self, RequestError::Exception(_))
    }
}

impl From<tokio_modbus::Error> for RequestError {
    fn from(e: tokio_modbus::Error) -> Self {
        match e {
            tokio_modbus::Error::Transport(e) if DeviceClosed::marks(&e) => RequestError::Closed,
            tokio_modbus::Error::Protocol(p) => RequestError::Protocol(p.to_string()),
            // tokio-modbus reports undecodable frames as these I/O kinds.
            tokio_modbus::Error::Transport(e)
                if matches!(e.kind(), io::ErrorKind::InvalidData | io::ErrorKind::UnexpectedEof) =>
            {
                RequestError::Protocol(e.to_string())
            }
            tokio_modbus::Error::Transport(e) => RequestError::Io(e),
        }
    }
}

/// The answer to one request.
pub(crate) enum Block {
    Bits(Vec<bool>),
    Words(Vec<u16>),
}

/// Sends one request and waits at most `timeout` for its answer.
pub(crate) async fn read(ctx: &mut Context, req: ReadRequest, timeout: Duration) -> Result<Block, RequestError> {
    // `Client::call` rather than the `Reader` helpers: those `debug_assert` the answer's
    // length, so a misbehaving device would panic a debug build.
    let answer =
        tokio::time::timeout(timeout, ctx.call(req.request())).await.map_err(|_| RequestError::Timeout(timeout))?;
    let response = answer?.map_err(RequestError::Exception)?;
    let n = usize::from(req.count);
    match (req.table, response) {
        (ModbusTable::Coil, Response::ReadCoils(mut bits))
        | (ModbusTable::Discrete, Response::ReadDiscreteInputs(mut bits))
            if bits.len() >= n =>
        {
            // Bits come in whole bytes: the tail is padding.
            bits.truncate(n);
            Ok(Block::Bits(bits))
        }
        (ModbusTable::Holding, Response::ReadHoldingRegisters(words))
        | (ModbusTable::Input, Response::ReadInputRegisters(words))
            if words.len() == n =>
        {
            Ok(Block::Words(words))
        }
        (_, other) => {
            Err(RequestError::Protocol(format!("asked {n} items of {:?}, got {}", req.table, describe(&other))))
        }
    }
}

fn describe(response: &Response) -> String {
    match response {
        Response::ReadCoils(b) | Response::ReadDiscreteInputs(b) => format!("{} bits", b.len()),
        Response::ReadHoldingRegisters(w) | Response::ReadInputRegisters(w) => {
            format!("{} registers", w.len())
        }
        other => format!("{other:?}"),
    }
}

/// Marks the end of the device's stream. tokio-modbus reports a stream that ended while a
/// request waited as `io::Error::last_os_error()`, whatever errno was left behind ("Success
/// (os error 0)", "Operation now in progress", ...): [`EndMarked`] reports it as this instead.
#[derive(Debug)]
struct DeviceClosed;

impl fmt::Display for DeviceClosed {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("the device closed the connection")
    }
}

impl std::error::Error for DeviceClosed {}

impl DeviceClosed {
    fn marks(e: &io::Error) -> bool {
        e.get_ref().is_some_and(|inner| inner.is::<DeviceClosed>())
    }
}

/// A device connection whose end of stream is an error naming it ([`DeviceClosed`]).
#[derive(Debug)]
struct EndMarked(tokio::net::TcpStream);

impl tokio::io::AsyncRead for EndMarked {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<io::Result<()>> {
        let before = buf.filled().len();
        let wanted = buf.remaining() > 0;
        match std::pin::Pin::new(&mut self.0).poll_read(cx, buf) {
            std::task::Poll::Ready(Ok(())) if wanted && buf.filled().len() == before => {
                std::task::Poll::Ready(Err(io::Error::new(io::ErrorKind::UnexpectedEof, DeviceClosed)))
            }
            other => other,
        }
    }
}

impl tokio::io::AsyncWrite for EndMarked {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<io::Result<usize>> {
        std::pin::Pin::new(&mut self.0).poll_write(cx, buf)
    }

    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<io::Result<()>> {
        std::pin::Pin::new(&mut self.0).poll_flush(cx)
    }

    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<io::Result<()>> {
        std::pin::Pin::new(&mut self.0).poll_shutdown(cx)
    }
}

/// A Modbus TCP client context on `stream`, addressing `unit_id`.
fn attach(stream: tokio::net::TcpStream, unit_id: u8) -> Context {
    tcp::attach_slave(EndMarked(stream), Slave(unit_id))
}

/// Resolves and connects, within `timeout`.
async fn connect(host: &str, port: u16, unit_id: u8, timeout: Duration) -> Result<(Context, SocketAddr), io::Error> {
    let attempt = async {
        let mut last = None;
        for addr in tokio::net::lookup_host((host, port)).await? {
            match tokio::net::TcpStream::connect(addr).await {
                Ok(stream) => return Ok((attach(stream, unit_id), addr)),
                Err(e) => last = Some(e),
            }
        }
        Err(last.unwrap_or_else(|| io::Error::new(io::ErrorKind::NotFound, format!("{host} has no address"))))
    };
    tokio::time::timeout(timeout, attempt)
        .await
        .unwrap_or_else(|_| Err(io::Error::new(io::ErrorKind::TimedOut, format!("no connection within {timeout:?}"))))
}

/// What one poll read.
struct PollOutcome {
    /// One entry per request of the plan (`None`: not read).
    blocks: Vec<Option<Block>>,
    /// Whether the device answered at least one request (data or exception).
    answered: bool,
    /// The error that broke the connection and ended the poll early.
    broken: Option<RequestError>,
}

/// Runs the plan's requests one after the other.
async fn poll(
    ctx: &mut Context,
    plan: &ReadPlan,
    timeout: Duration,
    task: &DeviceTask,
    throttle: &mut LogThrottle,
    trace: &mut ReadingTrace,
    inbox: &mut Inbox,
) -> PollOutcome {
    let mut outcome = PollOutcome { blocks: Vec::with_capacity(plan.requests.len()), answered: false, broken: None };
    for req in &plan.requests {
        // Commands go before the reads still queued in this poll.
        while let Ok(job) = inbox.try_recv() {
            if let Some(e) = command(ctx, job, timeout, task).await {
                outcome.broken = Some(e);
                return outcome;
            }
        }
        match read(ctx, *req, timeout).await {
            Ok(block) => {
                outcome.answered = true;
                outcome.blocks.push(Some(block));
            }
            Err(e) => {
                task.count_error(e.kind());
                trace.failed(e.kind());
                tracing::debug!(
                    device = %task.key(), kind = e.kind(), table = ?req.table,
                    address = req.address, count = req.count, error = %e,
                    "read request failed"
                );
                if e.breaks_connection() {
                    outcome.broken = Some(e);
                    break;
                }
                // The connection stays up, so no state transition is logged: say it at most
                // once a minute (every failure is counted in fieldgate_device_errors_total).
                if let Some(suppressed) = throttle.allow() {
                    tracing::warn!(
                        device = %task.key(), kind = e.kind(), table = ?req.table, address = req.address,
                        error = %e, suppressed,
                        "Modbus device refused a read request (repeats logged at most once a minute)"
                    );
                }
                outcome.answered = true;
                outcome.blocks.push(None);
            }
        }
    }
    outcome
}

/// The poller's connection, for commands: every request under the connection's timeout; the
/// first error that leaves the connection in an unknown state is kept (the poller drops it).
struct Poller<'a> {
    ctx: &'a mut Context,
    timeout: Duration,
    broken: Option<RequestError>,
}

impl Caller for Poller<'_> {
    async fn call(&mut self, req: Request<'static>) -> Result<Response, (Reason, String)> {
        if let Some(e) = &self.broken {
            return Err((Reason::Unreachable, e.to_string()));
        }
        let answer = tokio::time::timeout(self.timeout, self.ctx.call(req)).await;
        let error = match answer {
            Ok(Ok(Ok(r))) => return Ok(r),
            Ok(Ok(Err(exception))) => RequestError::Exception(exception),
            Ok(Err(e)) => RequestError::from(e),
            Err(_) => RequestError::Timeout(self.timeout),
        };
        let reason = error.command_reason();
        let text = error.to_string();
        if error.breaks_connection() {
            self.broken = Some(error);
        }
        Err((reason, text))
    }
}

/// Executes a command on the poller's connection; returns the error that broke it, if any.
async fn command(ctx: &mut Context, job: Job, timeout: Duration, task: &DeviceTask) -> Option<RequestError> {
    let Some(point) = task.device.points.get(job.point) else {
        job.finish(Outcome::failed(Reason::UnknownPoint, "the device changed"));
        return None;
    };
    let mut poller = Poller { ctx, timeout, broken: None };
    let outcome = match tokio::time::timeout_at(job.deadline, modbus_write::execute(&mut poller, point, &job)).await {
        Ok(o) => o,
        Err(_) => {
            // Cut off mid-request: a late answer would be taken for the next request's.
            poller.broken.get_or_insert(RequestError::Timeout(timeout));
            Outcome::failed(Reason::Timeout, "not done before the command's deadline")
        }
    };
    if outcome.reason.is_some() {
        task.count_error("command");
    }
    job.finish(outcome);
    poller.broken
}

/// The reading points of the blocks read, in the device's point order.
pub(crate) fn points_read(points: &[Point], plan: &ReadPlan, blocks: &[Option<Block>]) -> Vec<pb::Point> {
    points
        .iter()
        .zip(&plan.locations)
        .filter_map(|(point, location)| {
            let loc = location.as_ref()?;
            let offset = usize::from(loc.offset);
            let raw = match blocks.get(loc.request)?.as_ref()? {
                Block::Bits(bits) => Raw::Bit(*bits.get(offset)?),
                Block::Words(words) => Raw::Registers(words.get(offset..offset + usize::from(loc.span))?),
            };
            decode(point, raw)
        })
        .collect()
}

/// Reads `points` once, as the poller does, from the device at the other end of `stream` and
/// decodes what came back. The fuzz targets' entry point (answers are outside bytes), not an
/// API.
#[doc(hidden)]
pub async fn poll_once<S>(stream: S, unit_id: u8, points: &[Point], timeout: Duration) -> Vec<pb::Point>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + fmt::Debug + Unpin + Send + 'static,
{
    let mut ctx = tcp::attach_slave(stream, Slave(unit_id));
    let plan = plan(points);
    let mut blocks = Vec::with_capacity(plan.requests.len());
    for req in &plan.requests {
        match read(&mut ctx, *req, timeout).await {
            Ok(block) => blocks.push(Some(block)),
            Err(e) if e.breaks_connection() => break,
            Err(_) => blocks.push(None),
        }
    }
    points_read(points, &plan, &blocks)
}

// ---------------------------------------------------------------------------------------------
// Run

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Health {
    Starting,
    Up,
    Down,
}

/// The device's reachability: the gauge and the transition logs.
struct Link {
    device: String,
    gauge: Gauge,
    health: Health,
    peer: Option<SocketAddr>,
}

impl Link {
    /// The device answered.
    fn up(&mut self) {
        self.gauge.set(1);
        let peer = self.peer.map(|p| p.to_string()).unwrap_or_default();
        match self.health {
            Health::Starting => {
                tracing::info!(device = %self.device, %peer, "Modbus device connected")
            }
            Health::Down => tracing::info!(device = %self.device, %peer, "Modbus device recovered"),
            Health::Up => {}
        }
        self.health = Health::Up;
    }

    /// The connection failed or was dropped.
    fn down(&mut self, kind: &'static str, error: &dyn fmt::Display, retry_in: Duration) {
        self.gauge.set(0);
        if self.health == Health::Down {
            tracing::debug!(device = %self.device, kind, %error, ?retry_in, "Modbus device still unreachable");
        } else {
            tracing::warn!(device = %self.device, kind, %error, ?retry_in, "Modbus device unreachable; retrying with backoff");
        }
        self.health = Health::Down;
    }
}

/// Capped exponential backoff with jitter; `reset` after a success.
struct Backoff {
    delays: ExponentialBackoff,
}

impl Backoff {
    fn builder() -> ExponentialBuilder {
        ExponentialBuilder::default()
            .with_min_delay(BACKOFF_MIN)
            .with_max_delay(BACKOFF_MAX)
            .with_jitter()
            .without_max_times()
    }

    fn new() -> Self {
        Self { delays: Self::builder().build() }
    }

    fn next(&mut self) -> Duration {
        // backon adds the jitter after capping: cap again.
        self.delays.next().unwrap_or(BACKOFF_MAX).min(BACKOFF_MAX)
    }

    fn reset(&mut self) {
        *self = Self::new();
    }
}

/// Runs one Modbus TCP device until `task.cancel` fires.
pub async fn run(settings: &ModbusTcpConnection, task: DeviceTask, mut inbox: Inbox) {
    let device = std::sync::Arc::clone(&task.device);
    let key = task.key();
    let labels = task.labels();
    let timeout = settings.timeout();
    let interval = device.poll_interval();
    let port = settings.port();
    let unit_id = settings.unit_id();
    let plan = plan(&device.points);

    // Metric handles, cloned out of their families (never hold a family lock across awaits).
    let polls = task.metrics.polls.get_or_create(&labels).clone();
    let poll_duration = task.metrics.poll_duration.get_or_create(&labels).clone();
    let mut link = Link {
        device: key.clone(),
        gauge: task.metrics.device_connected.get_or_create(&labels).clone(),
        health: Health::Starting,
        peer: None,
    };
    link.gauge.set(0);

    // Ticks on the monotonic clock from a wall-clock multiple of the interval; the slot
    // names the poll (see `crate::clock`).
    let clock = std::sync::Arc::clone(&task.hub.clock);
    let (mut schedule, mut ticker) = PollSchedule::start(interval, &clock);

    let mut conn: Option<Context> = None;
    let mut backoff = Backoff::new();
    let mut retry_at: Option<Instant> = None;
    let mut first = true;
    let mut throttle = LogThrottle::new(Duration::from_secs(60));
    tracing::debug!(device = %key, requests = plan.requests.len(), ?interval, "polling Modbus device");

    loop {
        // The first poll right away, then on the ticks.
        if !std::mem::take(&mut first) {
            // While backing off the ticker is not polled: an unreachable device costs one
            // wake-up per retry, not one per interval.
            let resume = retry_at.unwrap_or_else(Instant::now);
            tokio::select! {
                biased;
                () = task.cancel.cancelled() => break,
                Some(job) = inbox.recv() => {
                    // Between polls: on the poller's connection, made now if there is none.
                    if conn.is_none() {
                        let attempt = connect(&settings.host, port, unit_id, timeout);
                        let Some(result) = task.cancel.run_until_cancelled(attempt).await else { break };
                        match result {
                            Ok((ctx, peer)) => {
                                link.peer = Some(peer);
                                conn = Some(ctx);
                            }
                            Err(e) => {
                                task.count_error("connect");
                                job.finish(Outcome::failed(Reason::Unreachable, format!("connect: {e}")));
                                continue;
                            }
                        }
                    }
                    if let Some(ctx) = conn.as_mut() {
                        let done = task.cancel.run_until_cancelled(command(ctx, job, timeout, &task)).await;
                        match done {
                            None => break,
                            Some(Some(e)) => {
                                task.count_error(e.kind());
                                conn = None;
                            }
                            Some(None) => {}
                        }
                    }
                    continue;
                }
                () = tokio::time::sleep_until(resume), if retry_at.is_some() => {
                    // The backoff is over: the ticker's missed tick fires at once (the
                    // schedule keeps its wall-clock phase), then the ticks come as before.
                    retry_at = None;
                    continue;
                }
                _ = ticker.tick(), if retry_at.is_none() => {}
            }
        }
        if task.cancel.is_cancelled() {
            break;
        }
        let slot = schedule.slot(clock.now());

        if conn.is_none() {
            let attempt = connect(&settings.host, port, unit_id, timeout);
            let Some(result) = task.cancel.run_until_cancelled(attempt).await else {
                break;
            };
            match result {
                Ok((ctx, peer)) => {
                    tracing::debug!(device = %key, %peer, "Modbus connection opened");
                    link.peer = Some(peer);
                    conn = Some(ctx);
                }
                Err(error) => {
                    task.count_error("connect");
                    let delay = backoff.next();
                    link.down("connect", &error, delay);
                    retry_at = Some(crate::clock::retry_at(Instant::now(), delay));
                    continue;
                }
            }
        }
        let Some(ctx) = conn.as_mut() else { continue };

        let sampled = clock.now();
        let started = Instant::now();
        let mut trace = ReadingTrace::read(&key, labels.protocol);
        let Some(outcome) = task
            .cancel
            .run_until_cancelled(poll(ctx, &plan, timeout, &task, &mut throttle, &mut trace, &mut inbox))
            .await
        else {
            break;
        };
        poll_duration.observe(started.elapsed().as_secs_f64());

        match &outcome.broken {
            None => {
                if outcome.answered {
                    link.up();
                    backoff.reset();
                    retry_at = None;
                }
            }
            Some(error) => {
                conn = None;
                let delay = backoff.next();
                link.down(error.kind(), error, delay);
                retry_at = Some(crate::clock::retry_at(Instant::now(), delay));
            }
        }

        trace.decoding();
        let points = points_read(&device.points, &plan, &outcome.blocks);
        if points.is_empty() {
            continue;
        }
        polls.inc();
        let reading = Reading {
            id: reading::message_id(&device.namespace, &device.name, slot),
            namespace: device.namespace.clone(),
            device: device.name.clone(),
            node: task.node.clone(),
            time_unix_nano: reading::unix_nanos(sampled),
            buffer_seq: 0,
            points,
        };
        match task.cancel.run_until_cancelled(task.emit_traced(reading, trace)).await {
            Some(Ok(())) => {}
            Some(Err(_)) | None => break,
        }
    }
    link.gauge.set(0);
    tracing::debug!(device = %key, "stopped polling Modbus device");
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use std::sync::Arc;

    use fieldgate_crds::{Connection, GatewayDevice};
    use prometheus_client::registry::Registry;
    use tokio::net::TcpListener;
    use tokio::sync::mpsc;
    use tokio_util::sync::CancellationToken;

    use super::*;
    use crate::metrics::{DeviceErrorLabels, Metrics};
    use crate::reading::ReadingSink;
    use fieldgate_sim::{self as sim, Fault, SimDevice};

    // ---- plan -----------------------------------------------------------------------------

    fn p(name: &str, value_type: ValueType, table: ModbusTable, address: u16) -> Point {
        Point::modbus(name, value_type, table, address)
    }

    fn req(table: ModbusTable, address: u16, count: u16) -> ReadRequest {
        ReadRequest { table, address, count }
    }

    use ModbusTable::{Coil, Discrete, Holding, Input};

    #[test]
    fn plan_merges_contiguous_points_into_one_request() {
        let points = vec![
            p("b", ValueType::Float32, Holding, 2),
            p("a", ValueType::Uint16, Holding, 0),
            p("a2", ValueType::Int16, Holding, 1),
            p("c", ValueType::Float64, Holding, 4),
        ];
        let plan = plan(&points);
        assert_eq!(plan.requests, vec![req(Holding, 0, 8)]);
        assert_eq!(
            plan.locations,
            vec![
                Some(Location { request: 0, offset: 2, span: 2 }),
                Some(Location { request: 0, offset: 0, span: 1 }),
                Some(Location { request: 0, offset: 1, span: 1 }),
                Some(Location { request: 0, offset: 4, span: 4 }),
            ]
        );
    }

    #[test]
    fn plan_merges_overlapping_points() {
        let mut bit = p("flag", ValueType::Bool, Holding, 11);
        if let Some(m) = bit.modbus.as_mut() {
            m.bit = Some(3);
        }
        let points = vec![p("wide", ValueType::Uint64, Holding, 10), p("low", ValueType::Uint32, Holding, 12), bit];
        let plan = plan(&points);
        assert_eq!(plan.requests, vec![req(Holding, 10, 4)]);
        assert_eq!(plan.locations[1], Some(Location { request: 0, offset: 2, span: 2 }));
        assert_eq!(plan.locations[2], Some(Location { request: 0, offset: 1, span: 1 }));
    }

    #[test]
    fn plan_never_reads_across_a_gap_or_across_tables() {
        let points = vec![
            p("a", ValueType::Uint16, Holding, 0),
            p("b", ValueType::Uint16, Holding, 2),
            p("c", ValueType::Uint16, Input, 1),
            p("d", ValueType::Bool, Coil, 0),
            p("e", ValueType::Bool, Coil, 1),
            p("f", ValueType::Bool, Coil, 3),
            p("g", ValueType::Bool, Discrete, 0),
        ];
        let plan = plan(&points);
        assert_eq!(
            plan.requests,
            vec![
                req(Coil, 0, 2),
                req(Coil, 3, 1),
                req(Discrete, 0, 1),
                req(Input, 1, 1),
                req(Holding, 0, 1),
                req(Holding, 2, 1),
            ]
        );
    }

    #[test]
    fn plan_splits_registers_at_125() {
        let points: Vec<Point> = (0..130)
            .map(|i| p(&format!("r{i}"), ValueType::Uint16, Holding, i))
            .chain([p("f", ValueType::Float32, Holding, 249)]) // 249-250: does not fit 125..250
            .collect();
        let plan = plan(&points);
        assert_eq!(plan.requests, vec![req(Holding, 0, 125), req(Holding, 125, 5), req(Holding, 249, 2)]);
        assert_eq!(plan.locations[126], Some(Location { request: 1, offset: 1, span: 1 }));

        // A value straddling the 125 boundary moves whole to the next request.
        let mut points = vec![p("x", ValueType::Uint64, Holding, 122)];
        points.extend((0..122).map(|i| p(&format!("r{i}"), ValueType::Uint16, Holding, i)));
        let straddling = super::plan(&points);
        assert_eq!(straddling.requests, vec![req(Holding, 0, 122), req(Holding, 122, 4)]);
        assert_eq!(straddling.locations[0], Some(Location { request: 1, offset: 0, span: 4 }));
    }

    #[test]
    fn plan_reads_up_to_2000_coils_per_request() {
        let points: Vec<Point> = (0..2001).map(|i| p(&format!("c{i}"), ValueType::Bool, Coil, i)).collect();
        let plan = plan(&points);
        assert_eq!(plan.requests, vec![req(Coil, 0, 2000), req(Coil, 2000, 1)]);
        assert_eq!(plan.locations[2000], Some(Location { request: 1, offset: 0, span: 1 }));
    }

    #[test]
    fn plan_skips_points_without_a_modbus_location() {
        let mut bare = p("bare", ValueType::Uint16, Holding, 0);
        bare.modbus = None;
        let plan = plan(&[bare]);
        assert!(plan.requests.is_empty());
        assert_eq!(plan.locations, vec![None]);
    }

    // ---- decode ---------------------------------------------------------------------------

    fn value(point: &Point, words: &[u16]) -> Option<Value> {
        decode(point, Raw::Registers(words)).and_then(|p| p.value)
    }

    fn with_order(mut point: Point, order: WordOrder) -> Point {
        if let Some(m) = point.modbus.as_mut() {
            m.word_order = Some(order);
        }
        point
    }

    #[test]
    fn decode_reads_every_integer_type_big_endian() {
        let v = |t| value(&p("x", t, Holding, 0), &[0xfffe, 0x1234, 0x5678, 0x9abc]);
        assert_eq!(v(ValueType::Int16), Some(Value::IntValue(-2)));
        assert_eq!(v(ValueType::Uint16), Some(Value::UintValue(0xfffe)));
        assert_eq!(v(ValueType::Int32), Some(Value::IntValue(0xfffe_1234_u32 as i32 as i64)));
        assert_eq!(v(ValueType::Uint32), Some(Value::UintValue(0xfffe_1234)));
        assert_eq!(v(ValueType::Int64), Some(Value::IntValue(0xfffe_1234_5678_9abc_u64 as i64)));
        assert_eq!(v(ValueType::Uint64), Some(Value::UintValue(0xfffe_1234_5678_9abc)));
    }

    #[test]
    fn decode_reads_floats_in_both_word_orders() {
        let f32_bits = 1.5f32.to_bits();
        let (hi, lo) = ((f32_bits >> 16) as u16, f32_bits as u16);
        let f = p("f", ValueType::Float32, Holding, 0);
        assert_eq!(value(&f, &[hi, lo]), Some(Value::DoubleValue(1.5)));
        let f_le = with_order(f, WordOrder::LittleEndian);
        assert_eq!(value(&f_le, &[lo, hi]), Some(Value::DoubleValue(1.5)));

        let d = (-1234.125f64).to_bits();
        let words: Vec<u16> = (0..4).rev().map(|i| (d >> (16 * i)) as u16).collect();
        let f64p = p("d", ValueType::Float64, Holding, 0);
        assert_eq!(value(&f64p, &words), Some(Value::DoubleValue(-1234.125)));
        let reversed: Vec<u16> = words.iter().rev().copied().collect();
        let f64_le = with_order(f64p, WordOrder::LittleEndian);
        assert_eq!(value(&f64_le, &reversed), Some(Value::DoubleValue(-1234.125)));
    }

    #[test]
    fn decode_honours_little_endian_word_order_for_integers() {
        let u32_le = with_order(p("x", ValueType::Uint32, Holding, 0), WordOrder::LittleEndian);
        assert_eq!(value(&u32_le, &[0x5678, 0x1234]), Some(Value::UintValue(0x1234_5678)));
        let i64_le = with_order(p("x", ValueType::Int64, Holding, 0), WordOrder::LittleEndian);
        assert_eq!(value(&i64_le, &[0xfffe, 0xffff, 0xffff, 0xffff]), Some(Value::IntValue(-2)));
    }

    #[test]
    fn decode_applies_scale_and_offset_as_a_double() {
        let mut t = p("t", ValueType::Int16, Holding, 0);
        t.scale = Some(0.1);
        t.offset = Some(-5.0);
        t.unit = Some("Cel".into());
        let out = decode(&t, Raw::Registers(&[(-250i16) as u16])).unwrap();
        assert_eq!(out.unit, "Cel");
        let Some(Value::DoubleValue(d)) = out.value else { panic!("not a double: {out:?}") };
        assert!((d - -30.0).abs() < 1e-9, "{d}");

        let mut u = p("u", ValueType::Uint32, Holding, 0);
        u.offset = Some(0.5);
        assert_eq!(value(&u, &[0, 2]), Some(Value::DoubleValue(2.5)));

        // scale 1 and offset 0 change nothing: the raw type is kept.
        let mut same = p("s", ValueType::Uint16, Holding, 0);
        same.scale = Some(1.0);
        same.offset = Some(0.0);
        assert_eq!(value(&same, &[7]), Some(Value::UintValue(7)));
    }

    #[test]
    fn decode_reads_bools_from_bits_and_registers() {
        let coil = p("c", ValueType::Bool, Coil, 0);
        let out = decode(&coil, Raw::Bit(true)).unwrap();
        assert_eq!(out.value, Some(Value::BoolValue(true)));
        assert_eq!(out.unit, "");

        let whole = p("r", ValueType::Bool, Holding, 0);
        assert_eq!(value(&whole, &[0]), Some(Value::BoolValue(false)));
        assert_eq!(value(&whole, &[0x0100]), Some(Value::BoolValue(true)));

        let mut bit = p("b", ValueType::Bool, Holding, 0);
        if let Some(m) = bit.modbus.as_mut() {
            m.bit = Some(3);
        }
        assert_eq!(value(&bit, &[0b1000]), Some(Value::BoolValue(true)));
        assert_eq!(value(&bit, &[0b0111]), Some(Value::BoolValue(false)));
        if let Some(m) = bit.modbus.as_mut() {
            m.bit = Some(15);
        }
        assert_eq!(value(&bit, &[0x8000]), Some(Value::BoolValue(true)));
    }

    #[test]
    fn decode_reads_strings_and_trims_trailing_nul_and_space() {
        let mut s = p("s", ValueType::String, Holding, 0);
        if let Some(m) = s.modbus.as_mut() {
            m.length = Some(4);
        }
        let words = |text: &[u8; 8]| -> Vec<u16> { text.chunks(2).map(|c| u16::from_be_bytes([c[0], c[1]])).collect() };
        assert_eq!(value(&s, &words(b"AB C\0\0\0\0")), Some(Value::StringValue("AB C".into())));
        assert_eq!(value(&s, &words(b" PUMP1  ")), Some(Value::StringValue(" PUMP1".into())));
        assert_eq!(value(&s, &words(b"\0\0\0\0\0\0\0\0")), Some(Value::StringValue(String::new())));
    }

    #[test]
    fn decode_refuses_data_that_does_not_fit_the_point() {
        assert_eq!(value(&p("x", ValueType::Uint32, Holding, 0), &[1]), None);
        assert!(decode(&p("x", ValueType::Uint16, Holding, 0), Raw::Bit(true)).is_none());
    }

    // ---- against the simulator -----------------------------------------------------------

    const WAIT: Duration = Duration::from_secs(15);

    async fn start_sim(device: SimDevice) -> (u16, CancellationToken) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let cancel = CancellationToken::new();
        tokio::spawn(sim::serve(listener, device, cancel.clone()));
        (port, cancel)
    }

    fn sim_device(index: u32, port: u16, extra: u16, timeout: &str) -> GatewayDevice {
        let mut d =
            sim::gateway_device("default", &format!("sim-{index}"), "127.0.0.1", port, &"50ms".parse().unwrap(), extra);
        let Connection::ModbusTcp(c) = &mut d.connection else { unreachable!() };
        c.timeout = Some(timeout.parse().unwrap());
        d
    }

    struct Harness {
        readings: mpsc::Receiver<Reading>,
        metrics: Arc<Metrics>,
        cancel: CancellationToken,
        adapter: tokio::task::JoinHandle<()>,
        key: String,
    }

    impl Harness {
        fn start(device: GatewayDevice) -> Self {
            Self::start_with(device, Arc::new(crate::clock::SystemSource))
        }

        /// Started with its wall clock reading `source`.
        fn start_with(device: GatewayDevice, source: Arc<dyn crate::clock::TimeSource>) -> Self {
            let metrics = Arc::new(Metrics::new(&mut Registry::default()));
            let (sink, readings) = ReadingSink::channel(256);
            let cancel = CancellationToken::new();
            let hub = crate::adapters::hub::DeviceHub::with_clock(
                crate::adapters::hub::HubArgs::loopback(),
                crate::secrets::SecretStore::new("/nonexistent"),
                Arc::clone(&metrics),
                CancellationToken::new(),
                crate::clock::WallClock::with_source(source, Arc::clone(&metrics)),
            );
            let task = DeviceTask {
                device: Arc::new(device),
                node: "node-1".into(),
                sink,
                metrics: Arc::clone(&metrics),
                cancel: cancel.clone(),
                hub,
            };
            let key = task.key();
            let adapter = tokio::spawn(crate::adapters::run(task));
            Self { readings, metrics, cancel, adapter, key }
        }

        fn errors(&self, kind: &'static str) -> u64 {
            let labels = DeviceErrorLabels { device: self.key.clone(), protocol: "modbus_tcp", kind };
            self.metrics.device_errors.get_or_create(&labels).get()
        }

        fn connected(&self) -> i64 {
            let labels = crate::metrics::DeviceLabels { device: self.key.clone(), protocol: "modbus_tcp" };
            self.metrics.device_connected.get_or_create(&labels).get()
        }

        async fn reading(&mut self) -> Reading {
            tokio::time::timeout(WAIT, self.readings.recv())
                .await
                .expect("no reading in time")
                .expect("adapter stopped")
        }

        /// Waits for `condition`, polling, until a deadline.
        async fn until(&self, what: &str, condition: impl Fn(&Self) -> bool) {
            let deadline = tokio::time::Instant::now() + WAIT;
            while !condition(self) {
                assert!(tokio::time::Instant::now() < deadline, "timed out waiting for {what}");
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }

        async fn stop(self) {
            self.cancel.cancel();
            tokio::time::timeout(Duration::from_secs(2), self.adapter)
                .await
                .expect("adapter did not stop promptly")
                .expect("adapter panicked");
        }
    }

    #[tokio::test]
    async fn a_wall_clock_stepped_back_an_hour_is_counted_and_polling_continues_with_unique_ids() {
        let (port, sim_cancel) = start_sim(SimDevice::new(4, 0)).await;
        let clock = Arc::new(crate::clock::TestSource::default());
        let mut h = Harness::start_with(sim_device(4, port, 0, "1s"), clock.clone());
        let slot = |r: &Reading| -> u64 { r.id.strip_prefix("default/sim-4/").unwrap().parse().unwrap() };
        let mut slots = Vec::new();
        for _ in 0..3 {
            slots.push(slot(&h.reading().await));
        }
        let metrics = Arc::clone(&h.metrics);
        let steps = || {
            let labels = crate::metrics::ClockStepLabels { direction: crate::metrics::StepDirection::backward };
            metrics.clock_steps.get_or_create(&labels).get()
        };
        assert_eq!(steps(), 0);

        clock.step(-3_600_000);
        // Polling continues: readings keep coming, sampled on the stepped clock.
        let mut after = Vec::new();
        while after.len() < 10 {
            let r = h.reading().await;
            if reading::age(r.time_unix_nano) > Duration::from_secs(3000) {
                after.push(slot(&r));
            } else {
                slots.push(slot(&r));
            }
        }
        assert_eq!(steps(), 1, "the step was not counted once");
        // Ids stay unique, increasing and on the interval's grid (deterministic from the
        // last slot issued before the step).
        slots.extend(&after);
        for pair in slots.windows(2) {
            assert!(pair[1] > pair[0], "slots not increasing: {slots:?}");
        }
        assert!(slots.iter().all(|s| s % 50 == 0), "{slots:?}");
        h.stop().await;
        sim_cancel.cancel();
    }

    #[tokio::test]
    async fn reads_and_decodes_every_simulated_value() {
        let (port, sim_cancel) = start_sim(SimDevice::new(3, 0)).await;
        let device = sim_device(3, port, 0, "1s");
        let names: Vec<String> = device.points.iter().map(|p| p.name.clone()).collect();
        let mut h = Harness::start(device);

        let r = h.reading().await;
        let c = sim::expected_c_consistent(&r.points).unwrap_or_else(|e| panic!("{e}: {r:?}"));
        assert!((3000..3100).contains(&c), "c = {c}");
        assert_eq!(r.points.iter().map(|p| p.name.clone()).collect::<Vec<_>>(), names);
        let label = r.points.iter().find(|p| p.name == "label").unwrap();
        assert_eq!(label.value, Some(Value::StringValue("SIM00003".into())));
        assert_eq!((r.namespace.as_str(), r.device.as_str(), r.node.as_str()), ("default", "sim-3", "node-1"));
        assert_eq!(r.buffer_seq, 0);
        let slot: u64 = r.id.strip_prefix("default/sim-3/").unwrap().parse().unwrap();
        assert_eq!(slot % 50, 0, "slot {slot} is not a multiple of the interval");
        assert!(reading::age(r.time_unix_nano) < Duration::from_secs(5));
        assert!(r.time_unix_nano / 1_000_000 >= slot);

        // Later readings are in later slots.
        let r2 = h.reading().await;
        let slot2: u64 = r2.id.strip_prefix("default/sim-3/").unwrap().parse().unwrap();
        assert!(slot2 > slot, "{} then {}", r.id, r2.id);
        assert_eq!(h.connected(), 1);
        assert_eq!(h.errors("io") + h.errors("timeout") + h.errors("protocol"), 0);

        // The checker notices a value that does not fit.
        let mut wrong = r2.points.clone();
        for p in &mut wrong {
            if p.name == "f64" {
                p.value = Some(Value::DoubleValue(-1.0));
            }
        }
        let err = sim::expected_c_consistent(&wrong).unwrap_err();
        assert!(err.contains("f64"), "{err}");

        h.stop().await;
        sim_cancel.cancel();
    }

    #[tokio::test]
    async fn big_device_is_read_in_requests_of_at_most_125_registers() {
        let (port, sim_cancel) = start_sim(SimDevice::new(1, 300)).await;
        let device = sim_device(1, port, 300, "1s");
        assert_eq!(
            plan(&device.points).requests.iter().filter(|r| r.table == Holding).count(),
            3,
            "326 holding registers"
        );
        let mut h = Harness::start(device);
        let r = h.reading().await;
        assert_eq!(r.points.iter().filter(|p| p.name.starts_with("reg")).count(), 300);
        sim::expected_c_consistent(&r.points).unwrap_or_else(|e| panic!("{e}"));
        h.stop().await;
        sim_cancel.cancel();
    }

    #[tokio::test]
    async fn reading_keeps_the_points_of_requests_that_succeeded() {
        let (port, sim_cancel) = start_sim(SimDevice::new(0, 0)).await;
        let mut device = sim_device(0, port, 0, "1s");
        device.points.push(p("missing", ValueType::Uint16, Holding, 1000));
        device.points.push(p("missing_coil", ValueType::Bool, Coil, 100));
        let mut h = Harness::start(device);

        let r = h.reading().await;
        assert!(r.points.iter().all(|p| !p.name.starts_with("missing")));
        assert!(r.points.iter().any(|p| p.name == "u16"));
        sim::expected_c_consistent(&r.points).unwrap_or_else(|e| panic!("{e}"));
        h.until("exceptions counted", |h| h.errors("exception") >= 2).await;
        // An exception keeps the connection.
        assert_eq!(h.errors("io") + h.errors("connect"), 0);
        assert_eq!(h.connected(), 1);
        h.stop().await;
        sim_cancel.cancel();
    }

    /// A device with `fault` counts `kind`, keeps polling, and recovers when the fault goes.
    async fn fault_is_counted_and_polling_recovers(fault: Fault, kind: &'static str) {
        let sim = SimDevice::new(0, 0).with_fault(fault);
        let (port, sim_cancel) = start_sim(sim.clone()).await;
        let mut h = Harness::start(sim_device(0, port, 0, "200ms"));

        h.until(&format!("{kind} errors"), |h| h.errors(kind) >= 3).await;
        assert!(h.readings.try_recv().is_err(), "no reading while every request fails");
        if kind != "exception" {
            assert_eq!(h.connected(), 0);
        }

        sim.set_fault(Fault::None);
        let r = h.reading().await;
        sim::expected_c_consistent(&r.points).unwrap_or_else(|e| panic!("{e}"));
        h.until("connected gauge", |h| h.connected() == 1).await;
        h.stop().await;
        sim_cancel.cancel();
    }

    #[tokio::test]
    async fn silent_device_counts_timeouts_and_recovers() {
        fault_is_counted_and_polling_recovers(Fault::Timeout, "timeout").await;
    }

    #[tokio::test]
    async fn exception_answers_are_counted_and_polling_recovers() {
        fault_is_counted_and_polling_recovers(Fault::Exception, "exception").await;
    }

    #[tokio::test]
    async fn garbage_answers_count_as_protocol_errors_and_polling_recovers() {
        fault_is_counted_and_polling_recovers(Fault::Garbage, "protocol").await;
    }

    #[tokio::test]
    async fn reset_connections_count_as_io_errors_and_polling_recovers() {
        fault_is_counted_and_polling_recovers(Fault::Reset, "io").await;
    }

    #[tokio::test]
    async fn a_device_closing_the_connection_is_reported_as_closed_not_as_success() {
        use tokio::io::AsyncReadExt;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let peer = tokio::spawn(async move {
            let (mut s, _) = listener.accept().await.unwrap();
            let mut request = [0u8; 12];
            s.read_exact(&mut request).await.unwrap();
            // No answer: an orderly close (FIN), as a device that drops the session does.
        });
        let mut ctx = attach(tokio::net::TcpStream::connect(addr).await.unwrap(), 1);
        let req = ReadRequest { table: ModbusTable::Holding, address: 0, count: 1 };
        let err = match read(&mut ctx, req, Duration::from_secs(10)).await {
            Err(e) => e,
            Ok(_) => panic!("a closed connection answered"),
        };
        peer.await.unwrap();
        assert_eq!(err.to_string(), "connection failed: the device closed the connection");
        assert_eq!(err.kind(), "io");
        assert!(err.breaks_connection());
    }

    #[tokio::test]
    async fn unreachable_device_counts_connect_errors_and_is_polled_once_it_listens() {
        // A port nobody listens on (taken, then released).
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        drop(listener);
        let mut h = Harness::start(sim_device(0, addr.port(), 0, "200ms"));
        h.until("connect errors", |h| h.errors("connect") >= 2).await;
        assert_eq!(h.connected(), 0);

        let listener = TcpListener::bind(addr).await.unwrap();
        let sim_cancel = CancellationToken::new();
        tokio::spawn(sim::serve(listener, SimDevice::new(0, 0), sim_cancel.clone()));
        let r = h.reading().await;
        sim::expected_c_consistent(&r.points).unwrap_or_else(|e| panic!("{e}"));
        h.stop().await;
        sim_cancel.cancel();
    }

    #[tokio::test]
    async fn adapter_stops_promptly_while_a_request_hangs() {
        let sim = SimDevice::new(0, 0).with_fault(Fault::Timeout);
        let (port, sim_cancel) = start_sim(sim.clone()).await;
        let h = Harness::start(sim_device(0, port, 0, "60s"));
        // Connected and waiting for an answer that never comes; stop() allows 2s.
        h.until("a request in flight", |_| sim.requests() >= 1).await;
        h.stop().await;
        sim_cancel.cancel();
    }
}
