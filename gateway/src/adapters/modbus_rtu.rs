//! Modbus RTU on a serial line, or RTU frames over TCP (tokio-modbus `rtu`, tokio-serial).
//!
//! One scheduler per bus: every device on the same serial port (or RTU-over-TCP address)
//! hands its requests to the bus task, which owns the line and runs one request at a time,
//! so devices on one line never collide. The bus takes writes (commands) before queued reads.
//! The bus opens the line when the first device registers and closes it when the last one
//! is gone; after a timeout, an I/O or a protocol error it drops and reopens the line
//! (with capped backoff), because a late answer could otherwise be taken for the next one.
//!
//! Polling, planning and decoding are those of [`super::modbus_tcp`]: requests coalesced per
//! table, wall-clock aligned polls, deterministic reading ids. Error kinds: `connect` (the
//! line cannot be opened), `timeout` (nothing came back), `bad_frame` (bytes came back but no
//! valid RTU frame: a bad CRC, a truncated frame, noise), `protocol` (a valid frame answering
//! something else: another unit, another function, a wrong length), `exception`, `io`.
//!
//! tokio-modbus alone reports a frame with a bad CRC or a truncated one as a timeout (it drops
//! bytes and waits for a frame that never completes), so the line keeps the first bytes it
//! received since each request was sent ([`Heard`]) and a failed request is classified by
//! what actually came back.

use std::collections::HashMap;
use std::io;
use std::pin::Pin;
use std::sync::{Arc, Mutex, PoisonError, Weak};
use std::task::Poll;
use std::time::Duration;

use fieldgate_crds::{ModbusRtuConnection, Parity};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;
use tokio_modbus::Slave;
use tokio_modbus::client::{Context, rtu};
use tokio_modbus::prelude::{Request, Response, SlaveContext};

use super::DeviceTask;
use super::modbus_tcp::{self, Block, ReadRequest, RequestError};
use super::modbus_write::{self, Caller};
use crate::clock::PollSchedule;
use crate::command::{Inbox, Outcome, Reason};
use crate::reading::{self, Reading};

/// The longest RTU frame (256 bytes, "Modbus over serial line" V1.02): what [`Heard`] keeps.
const MAX_FRAME: usize = 256;

/// What a device asks the bus to do.
pub(crate) enum Op {
    /// Read these blocks.
    Read(Vec<ReadRequest>),
    /// One request (a write), answered with the device's response.
    Call(Request<'static>),
}

/// The bus's answer.
pub(crate) enum Answer {
    /// The line could not be opened.
    Unavailable(String),
    /// One result per request run (a breaking error ends the list).
    Read(Vec<Result<Block, LineError>>),
    /// The response to a call.
    Call(Result<Response, LineError>),
}

/// Why a request on the line failed.
#[derive(Debug, thiserror::Error)]
pub(crate) enum LineError {
    /// As on Modbus TCP (nothing came back, an exception, a valid frame answering something
    /// else, the connection broke).
    #[error(transparent)]
    Request(RequestError),
    /// Bytes came back, but no valid RTU frame.
    #[error("no valid RTU frame in the {received} byte(s) received ({what})")]
    BadFrame {
        /// Bytes received after the request was sent.
        received: usize,
        /// What they look like: a bad CRC, a truncated frame, noise.
        what: &'static str,
    },
}

impl LineError {
    /// A static label for metrics.
    pub(crate) fn kind(&self) -> &'static str {
        match self {
            LineError::Request(e) => e.kind(),
            LineError::BadFrame { .. } => "bad_frame",
        }
    }

    /// Whether the line must be reopened (see [`RequestError::breaks_connection`]).
    pub(crate) fn breaks_connection(&self) -> bool {
        match self {
            LineError::Request(e) => e.breaks_connection(),
            LineError::BadFrame { .. } => true,
        }
    }
}

/// CRC-16/MODBUS, sent low byte first.
const MODBUS_CRC: crc::Crc<u16> = crc::Crc::<u16>::new(&crc::CRC_16_MODBUS);

/// CRC-16/MODBUS of `data`.
fn crc16(data: &[u8]) -> u16 {
    MODBUS_CRC.checksum(data)
}

/// Whether `bytes` start with a complete RTU frame whose CRC is right.
fn starts_with_frame(bytes: &[u8]) -> bool {
    let mut digest = MODBUS_CRC.digest();
    for (i, b) in bytes.iter().enumerate() {
        // `digest` covers `bytes[..i]`: is it followed by its own CRC? (address + function at least)
        if i >= 2 && bytes.get(i..i + 2) == Some(&digest.clone().finalize().to_le_bytes()[..]) {
            return true;
        }
        digest.update(&[*b]);
    }
    false
}

/// What bytes that hold no valid frame look like, judged by the length their header implies.
fn describe_bad_frame(bytes: &[u8]) -> &'static str {
    let expected = match bytes.get(1) {
        Some(0x01..=0x04) => bytes.get(2).map(|n| 5 + usize::from(*n)),
        Some(0x05 | 0x06 | 0x0f | 0x10) => Some(8),
        Some(0x81..=0xab) => Some(5),
        _ => None,
    };
    match expected {
        Some(n) if bytes.len() < n => "a truncated frame",
        Some(n) if bytes.len() == n && crc16(&bytes[..n - 2]).to_le_bytes() != bytes[n - 2..] => "a bad CRC",
        _ if bytes.len() < 4 => "a truncated frame",
        _ => "noise",
    }
}

pub(crate) struct Job {
    unit: u8,
    op: Op,
    reply: oneshot::Sender<Answer>,
}

/// A handle on a bus task. The task ends when the last handle is dropped.
pub struct Bus {
    /// Stops the bus's supervisor when the last device lets go of the bus (dropped first, so
    /// the scheduler finds its queues closed only once it is meant to stop).
    _stop: tokio_util::sync::DropGuard,
    key: String,
    reads: mpsc::Sender<Job>,
    writes: mpsc::Sender<Job>,
}

impl Bus {
    /// Runs `op` for unit `unit`; writes go before queued reads.
    pub(crate) async fn run(&self, unit: u8, op: Op) -> Option<Answer> {
        let (reply, rx) = oneshot::channel();
        let queue = if matches!(op, Op::Call(_)) { &self.writes } else { &self.reads };
        queue.send(Job { unit, op, reply }).await.ok()?;
        rx.await.ok()
    }
}

/// Bus key of a device: its serial port or its RTU-over-TCP address.
pub fn bus_key(c: &ModbusRtuConnection) -> String {
    match (&c.port, &c.address) {
        (Some(p), _) => p.clone(),
        (None, Some(a)) => format!("tcp://{a}"),
        (None, None) => String::new(),
    }
}

/// The read and write queues of a bus (kept across restarts of its scheduler).
type Queues = (mpsc::Receiver<Job>, mpsc::Receiver<Job>);

/// Buses in use, by key.
pub struct Buses {
    running: Mutex<HashMap<String, Weak<Bus>>>,
    metrics: Arc<crate::metrics::Metrics>,
}

impl Buses {
    /// No bus running yet; their schedulers' restarts are counted in `metrics`.
    pub fn new(metrics: Arc<crate::metrics::Metrics>) -> Self {
        Self { running: Mutex::default(), metrics }
    }

    /// The bus of `settings`, started if it is not running. Its scheduler is supervised
    /// (`bus <key>`): restarted after a panic with the same queues.
    pub fn get(&self, settings: &ModbusRtuConnection) -> Arc<Bus> {
        let key = bus_key(settings);
        let mut map = self.running.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(bus) = map.get(&key).and_then(Weak::upgrade) {
            return bus;
        }
        let (reads, reads_rx) = mpsc::channel(64);
        let (writes, writes_rx) = mpsc::channel(64);
        let stop = tokio_util::sync::CancellationToken::new();
        let bus = Arc::new(Bus { _stop: stop.clone().drop_guard(), key: key.clone(), reads, writes });
        map.retain(|_, b| b.strong_count() > 0);
        map.insert(key.clone(), Arc::downgrade(&bus));
        let queues = Arc::new(tokio::sync::Mutex::new((reads_rx, writes_rx)));
        let settings = settings.clone();
        let name = format!("bus {key}");
        tokio::spawn(crate::supervise::supervise(name, Arc::clone(&self.metrics), stop, move || {
            run_bus(key.clone(), settings.clone(), Arc::clone(&queues))
        }));
        bus
    }
}

/// The first bytes (up to [`MAX_FRAME`]) the line received since it was last cleared, and
/// how many there were.
#[derive(Clone, Default)]
struct Heard(Arc<Mutex<(Vec<u8>, usize)>>);

impl Heard {
    fn record(&self, bytes: &[u8]) {
        if bytes.is_empty() {
            return;
        }
        let mut heard = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        let room = MAX_FRAME.saturating_sub(heard.0.len());
        heard.0.extend_from_slice(&bytes[..room.min(bytes.len())]);
        heard.1 += bytes.len();
    }

    fn clear(&self) {
        let mut heard = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        heard.0.clear();
        heard.1 = 0;
    }

    /// `e`, or [`LineError::BadFrame`] when what came back since the request holds no valid
    /// frame (tokio-modbus says `Timeout` or `Protocol` for those).
    fn classify(&self, e: RequestError) -> LineError {
        if !matches!(e, RequestError::Timeout(_) | RequestError::Protocol(_)) {
            return LineError::Request(e);
        }
        let heard = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        let (bytes, received) = (&heard.0, heard.1);
        if received == 0 || starts_with_frame(bytes) {
            return LineError::Request(e);
        }
        LineError::BadFrame { received, what: describe_bad_frame(bytes) }
    }
}

/// The line's byte stream, telling [`Heard`] what it reads.
struct Tap<T> {
    inner: T,
    heard: Heard,
}

impl<T: AsyncRead + Unpin> AsyncRead for Tap<T> {
    fn poll_read(self: Pin<&mut Self>, cx: &mut std::task::Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        let r = Pin::new(&mut this.inner).poll_read(cx, buf);
        if let Poll::Ready(Ok(())) = r {
            this.heard.record(&buf.filled()[before..]);
        }
        r
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Tap<T> {
    fn poll_write(self: Pin<&mut Self>, cx: &mut std::task::Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut std::task::Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut std::task::Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

/// An open line: the Modbus client and what its stream heard.
struct Line {
    ctx: Context,
    heard: Heard,
}

fn attach<T: AsyncRead + AsyncWrite + Unpin + Send + 'static>(stream: T) -> Line {
    let heard = Heard::default();
    Line { ctx: rtu::attach(Tap { inner: stream, heard: heard.clone() }), heard }
}

/// Reads `points` once from unit `unit_id` on the line at the other end of `stream`, as the
/// bus does, and decodes what came back; also what each request's failure was classified as.
/// The fuzz targets' entry point (answers are outside bytes), not an API.
#[doc(hidden)]
pub async fn poll_once<S>(
    stream: S,
    unit_id: u8,
    points: &[fieldgate_crds::Point],
    timeout: Duration,
) -> (Vec<reading::pb::Point>, Vec<&'static str>)
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let Line { mut ctx, heard } = attach(stream);
    ctx.set_slave(Slave(unit_id));
    let plan = modbus_tcp::plan(points);
    let (mut blocks, mut failures) = (Vec::new(), Vec::new());
    for r in &plan.requests {
        heard.clear();
        match modbus_tcp::read(&mut ctx, *r, timeout).await.map_err(|e| heard.classify(e)) {
            Ok(block) => blocks.push(Some(block)),
            Err(e) => {
                failures.push(e.kind());
                if e.breaks_connection() {
                    break;
                }
                blocks.push(None);
            }
        }
    }
    (modbus_tcp::points_read(points, &plan, &blocks), failures)
}

async fn open(settings: &ModbusRtuConnection, timeout: Duration) -> io::Result<Line> {
    if let Some(port) = &settings.port {
        let parity = match settings.parity.unwrap_or_default() {
            Parity::None => tokio_serial::Parity::None,
            Parity::Even => tokio_serial::Parity::Even,
            Parity::Odd => tokio_serial::Parity::Odd,
        };
        let builder = tokio_serial::new(port, settings.baud_rate())
            .parity(parity)
            .data_bits(if settings.data_bits == Some(7) {
                tokio_serial::DataBits::Seven
            } else {
                tokio_serial::DataBits::Eight
            })
            .stop_bits(if settings.stop_bits == Some(2) {
                tokio_serial::StopBits::Two
            } else {
                tokio_serial::StopBits::One
            });
        let stream = tokio_serial::SerialStream::open(&builder).map_err(io::Error::other)?;
        return Ok(attach(stream));
    }
    let address = settings.address.as_deref().unwrap_or_default();
    let stream = tokio::time::timeout(timeout, tokio::net::TcpStream::connect(address))
        .await
        .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, format!("no connection within {timeout:?}")))??;
    let _ = stream.set_nodelay(true);
    Ok(attach(stream))
}

async fn call(ctx: &mut Context, req: Request<'static>, timeout: Duration) -> Result<Response, RequestError> {
    let answer = tokio::time::timeout(timeout, tokio_modbus::client::Client::call(ctx, req))
        .await
        .map_err(|_| RequestError::Timeout(timeout))?;
    answer?.map_err(RequestError::Exception)
}

/// The bus task: one job at a time, writes first, the line reopened after a breaking error.
async fn run_bus(key: String, settings: ModbusRtuConnection, queues: Arc<tokio::sync::Mutex<Queues>>) {
    let mut queues = queues.lock().await;
    let (reads, writes) = &mut *queues;
    let timeout = settings.timeout();
    let mut line: Option<Line> = None;
    let mut delays = crate::supervise::backoff(Duration::from_millis(100), Duration::from_secs(10));
    let mut retry_at: Option<Instant> = None;
    let mut healthy = None;
    tracing::debug!(bus = %key, "Modbus RTU bus started");
    loop {
        let job = tokio::select! {
            biased;
            Some(j) = writes.recv() => j,
            Some(j) = reads.recv() => j,
            else => break,
        };
        if line.is_none() {
            if retry_at.is_some_and(|at| Instant::now() < at) {
                let _ = job.reply.send(Answer::Unavailable("backing off".into()));
                continue;
            }
            match open(&settings, timeout).await {
                Ok(l) => {
                    line = Some(l);
                    retry_at = None;
                    delays = crate::supervise::backoff(Duration::from_millis(100), Duration::from_secs(10));
                    if healthy != Some(true) {
                        tracing::info!(bus = %key, "Modbus RTU line open");
                    }
                    healthy = Some(true);
                }
                Err(e) => {
                    if healthy != Some(false) {
                        tracing::warn!(bus = %key, error = %e, "Modbus RTU line cannot be opened; retrying with backoff");
                    }
                    healthy = Some(false);
                    retry_at =
                        Some(crate::clock::retry_at(Instant::now(), delays.next().unwrap_or(Duration::from_secs(10))));
                    let _ = job.reply.send(Answer::Unavailable(e.to_string()));
                    continue;
                }
            }
        }
        let Some(Line { ctx: c, heard }) = line.as_mut() else { continue };
        c.set_slave(Slave(job.unit));
        let (answer, broken) = match job.op {
            Op::Read(requests) => {
                let mut out = Vec::with_capacity(requests.len());
                let mut broken = false;
                for r in requests {
                    heard.clear();
                    let result = modbus_tcp::read(c, r, timeout).await.map_err(|e| heard.classify(e));
                    broken = result.as_ref().is_err_and(LineError::breaks_connection);
                    out.push(result);
                    if broken {
                        break;
                    }
                }
                (Answer::Read(out), broken)
            }
            Op::Call(req) => {
                heard.clear();
                let result = call(c, req, timeout).await.map_err(|e| heard.classify(e));
                let broken = result.as_ref().is_err_and(LineError::breaks_connection);
                (Answer::Call(result), broken)
            }
        };
        if broken {
            // A late answer on a reused line would be taken for the next request's.
            line = None;
        }
        let _ = job.reply.send(answer);
    }
    tracing::debug!(bus = %key, "Modbus RTU bus stopped");
}

/// Runs one Modbus RTU device until `task.cancel` fires: polls it, and executes its commands
/// in order through the bus scheduler, where writes go before queued reads.
pub async fn run(settings: &ModbusRtuConnection, task: DeviceTask, inbox: Inbox) {
    let bus = task.hub.buses.get(settings);
    tokio::join!(poll_device(settings, &task, &bus), commands(settings, &task, &bus, inbox));
}

/// The bus, for commands to one unit.
struct OnBus<'a> {
    bus: &'a Bus,
    unit: u8,
}

impl Caller for OnBus<'_> {
    async fn call(&mut self, req: Request<'static>) -> Result<Response, (Reason, String)> {
        match self.bus.run(self.unit, Op::Call(req)).await {
            Some(Answer::Call(Ok(r))) => Ok(r),
            Some(Answer::Call(Err(e))) => {
                let reason = match &e {
                    LineError::Request(r) => r.command_reason(),
                    LineError::BadFrame { .. } => Reason::DeviceError,
                };
                Err((reason, e.to_string()))
            }
            Some(Answer::Unavailable(why)) => Err((Reason::Unreachable, format!("line unavailable: {why}"))),
            Some(Answer::Read(_)) | None => Err((Reason::Stopped, "the bus stopped".into())),
        }
    }
}

async fn commands(settings: &ModbusRtuConnection, task: &DeviceTask, bus: &Bus, mut inbox: Inbox) {
    while let Some((job, point)) = task.next_command(&mut inbox, true).await {
        let mut on_bus = OnBus { bus, unit: settings.unit_id };
        let outcome = tokio::time::timeout_at(job.deadline, modbus_write::execute(&mut on_bus, point, &job))
            .await
            .unwrap_or_else(|_| Outcome::failed(Reason::Timeout, "not done before the command's deadline"));
        if outcome.reason.is_some() {
            task.count_error("command");
        }
        job.finish(outcome);
    }
}

async fn poll_device(settings: &ModbusRtuConnection, task: &DeviceTask, bus: &Bus) {
    let device = Arc::clone(&task.device);
    let key = task.key();
    if bus.key != bus_key(settings) {
        tracing::warn!(device = %key, "bus key mismatch");
    }
    let interval = device.poll_interval().max(Duration::from_millis(1));
    let plan = modbus_tcp::plan(&device.points);
    let labels = task.labels();
    let polls = task.metrics.polls.get_or_create(&labels).clone();
    let poll_duration = task.metrics.poll_duration.get_or_create(&labels).clone();
    let gauge = task.metrics.device_connected.get_or_create(&labels).clone();
    gauge.set(0);
    let mut up: Option<bool> = None;
    // Ticks on the monotonic clock; the slot names the poll (see `crate::clock`).
    let clock = Arc::clone(&task.hub.clock);
    let (mut schedule, mut ticker) = PollSchedule::start(interval, &clock);
    loop {
        tokio::select! {
            biased;
            () = task.cancel.cancelled() => break,
            _ = ticker.tick() => {}
        }
        let sampled = clock.now();
        let slot = schedule.slot(sampled);
        let started = Instant::now();
        let Some(answer) =
            task.cancel.run_until_cancelled(bus.run(settings.unit_id, Op::Read(plan.requests.clone()))).await
        else {
            break;
        };
        poll_duration.observe(started.elapsed().as_secs_f64());
        let results = match answer {
            Some(Answer::Read(r)) => r,
            Some(Answer::Unavailable(why)) => {
                task.count_error("connect");
                if up != Some(false) {
                    tracing::warn!(device = %key, error = %why, "Modbus RTU device unreachable: its line is not open");
                }
                up = Some(false);
                gauge.set(0);
                continue;
            }
            Some(Answer::Call(_)) | None => continue,
        };
        let mut blocks = Vec::with_capacity(results.len());
        let mut answered = false;
        let mut failure = None;
        for r in results {
            match r {
                Ok(b) => {
                    answered = true;
                    blocks.push(Some(b));
                }
                Err(e) => {
                    task.count_error(e.kind());
                    tracing::debug!(device = %key, kind = e.kind(), error = %e, "Modbus RTU request failed");
                    if !e.breaks_connection() {
                        answered = true;
                    }
                    failure = Some(e);
                    blocks.push(None);
                }
            }
        }
        if answered {
            gauge.set(1);
            if up != Some(true) {
                tracing::info!(device = %key, unit = settings.unit_id, "Modbus RTU device answering");
            }
            up = Some(true);
        } else if let Some(e) = failure {
            gauge.set(0);
            if up != Some(false) {
                tracing::warn!(device = %key, kind = e.kind(), error = %e, "Modbus RTU device not answering");
            }
            up = Some(false);
        }
        let points = modbus_tcp::points_read(&device.points, &plan, &blocks);
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
        if task.cancel.run_until_cancelled(task.emit(reading)).await.is_none_or(|r| r.is_err()) {
            break;
        }
    }
    gauge.set(0);
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn framed(body: &[u8]) -> Vec<u8> {
        let mut f = body.to_vec();
        f.extend_from_slice(&crc16(body).to_le_bytes());
        f
    }

    #[test]
    fn crc_is_modbus_crc16() {
        // The often-quoted request 01 03 00 00 00 0A (10 holding registers of unit 1): C5 CD.
        assert_eq!(crc16(&[0x01, 0x03, 0x00, 0x00, 0x00, 0x0a]).to_le_bytes(), [0xc5, 0xcd]);
    }

    #[test]
    fn bad_frames_are_told_from_valid_ones() {
        let answer = framed(&[0x02, 0x03, 0x04, 0x03, 0xe8, 0x03, 0xe9]);
        assert!(starts_with_frame(&answer));
        let mut trailing = answer.clone();
        trailing.extend_from_slice(b"junk");
        assert!(starts_with_frame(&trailing), "a valid frame followed by noise");
        assert!(starts_with_frame(&framed(&[0x63, 0x83, 0x02])), "an exception of another unit");

        let mut bad_crc = answer.clone();
        *bad_crc.last_mut().unwrap() ^= 0xff;
        assert!(!starts_with_frame(&bad_crc));
        assert_eq!(describe_bad_frame(&bad_crc), "a bad CRC");
        assert!(!starts_with_frame(&answer[..5]));
        assert_eq!(describe_bad_frame(&answer[..5]), "a truncated frame");
        assert_eq!(describe_bad_frame(&[0x02]), "a truncated frame");
        assert_eq!(describe_bad_frame(&[0x17, 0x55, 0xaa, 0x01, 0x02, 0x03]), "noise");
    }

    #[test]
    fn errors_are_classified_by_what_came_back() {
        let heard = Heard::default();
        let timeout = || RequestError::Timeout(Duration::from_millis(500));
        assert_eq!(heard.classify(timeout()).kind(), "timeout", "nothing came back");
        heard.record(&[0x02, 0x03, 0x04, 0x03]);
        let e = heard.classify(timeout());
        assert_eq!(e.kind(), "bad_frame");
        assert!(e.breaks_connection());
        assert_eq!(e.to_string(), "no valid RTU frame in the 4 byte(s) received (a truncated frame)");
        heard.clear();
        heard.record(&framed(&[0x63, 0x03, 0x02, 0x00, 0x01]));
        assert_eq!(heard.classify(RequestError::Protocol("header".into())).kind(), "protocol", "another unit");
        heard.clear();
        heard.record(&[0xaa; 300]);
        heard.record(&[0xaa; 300]);
        assert_eq!(heard.0.lock().unwrap().0.len(), MAX_FRAME);
        assert!(matches!(
            heard.classify(RequestError::Protocol("too many retries".into())),
            LineError::BadFrame { received: 600, what: "noise" }
        ));
        assert_eq!(
            heard.classify(RequestError::Exception(tokio_modbus::ExceptionCode::IllegalDataAddress)).kind(),
            "exception"
        );
    }
}
