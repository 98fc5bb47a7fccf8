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
//! line cannot be opened), `timeout`, `exception`, `protocol`, `io`.

use std::collections::HashMap;
use std::io;
use std::sync::{Arc, Mutex, PoisonError, Weak};
use std::time::{Duration, SystemTime};

use fieldgate_crds::validate::parse_duration;
use fieldgate_crds::{ModbusRtuConnection, Parity};
use tokio::sync::{mpsc, oneshot};
use tokio::time::{Instant, MissedTickBehavior};
use tokio_modbus::Slave;
use tokio_modbus::client::{Context, rtu};
use tokio_modbus::prelude::{Request, Response, SlaveContext};

use super::DeviceTask;
use super::modbus_tcp::{self, Block, ReadRequest, RequestError};
use crate::reading::{self, Reading};

const DEFAULT_BAUD: u32 = 9600;
const DEFAULT_TIMEOUT: Duration = Duration::from_secs(1);
const DEFAULT_POLL_INTERVAL: Duration = Duration::from_secs(1);

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
    Read(Vec<Result<Block, RequestError>>),
    /// The response to a call.
    Call(Result<Response, RequestError>),
}

pub(crate) struct Job {
    unit: u8,
    op: Op,
    reply: oneshot::Sender<Answer>,
}

/// A handle on a bus task. The task ends when the last handle is dropped.
pub struct Bus {
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

/// Buses in use, by key.
#[derive(Default)]
pub struct Buses(Mutex<HashMap<String, Weak<Bus>>>);

impl Buses {
    /// The bus of `settings`, started if it is not running.
    pub fn get(&self, settings: &ModbusRtuConnection) -> Arc<Bus> {
        let key = bus_key(settings);
        let mut map = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(bus) = map.get(&key).and_then(Weak::upgrade) {
            return bus;
        }
        let (reads, reads_rx) = mpsc::channel(64);
        let (writes, writes_rx) = mpsc::channel(64);
        let bus = Arc::new(Bus { key: key.clone(), reads, writes });
        map.retain(|_, b| b.strong_count() > 0);
        map.insert(key.clone(), Arc::downgrade(&bus));
        tokio::spawn(run_bus(key, settings.clone(), reads_rx, writes_rx));
        bus
    }
}

async fn open(settings: &ModbusRtuConnection, timeout: Duration) -> io::Result<Context> {
    if let Some(port) = &settings.port {
        let parity = match settings.parity.unwrap_or_default() {
            Parity::None => tokio_serial::Parity::None,
            Parity::Even => tokio_serial::Parity::Even,
            Parity::Odd => tokio_serial::Parity::Odd,
        };
        let builder = tokio_serial::new(port, settings.baud_rate.unwrap_or(DEFAULT_BAUD))
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
        return Ok(rtu::attach(stream));
    }
    let address = settings.address.as_deref().unwrap_or_default();
    let stream = tokio::time::timeout(timeout, tokio::net::TcpStream::connect(address))
        .await
        .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, format!("no connection within {timeout:?}")))??;
    let _ = stream.set_nodelay(true);
    Ok(rtu::attach(stream))
}

async fn call(ctx: &mut Context, req: Request<'static>, timeout: Duration) -> Result<Response, RequestError> {
    let answer = tokio::time::timeout(timeout, tokio_modbus::client::Client::call(ctx, req))
        .await
        .map_err(|_| RequestError::Timeout(timeout))?;
    answer?.map_err(RequestError::Exception)
}

/// The bus task: one job at a time, writes first, the line reopened after a breaking error.
async fn run_bus(
    key: String,
    settings: ModbusRtuConnection,
    mut reads: mpsc::Receiver<Job>,
    mut writes: mpsc::Receiver<Job>,
) {
    let timeout = settings.timeout.as_deref().and_then(|t| parse_duration(t).ok()).unwrap_or(DEFAULT_TIMEOUT);
    let mut ctx: Option<Context> = None;
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
        if ctx.is_none() {
            if retry_at.is_some_and(|at| Instant::now() < at) {
                let _ = job.reply.send(Answer::Unavailable("backing off".into()));
                continue;
            }
            match open(&settings, timeout).await {
                Ok(c) => {
                    ctx = Some(c);
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
                    retry_at = Some(Instant::now() + delays.next().unwrap_or(Duration::from_secs(10)));
                    let _ = job.reply.send(Answer::Unavailable(e.to_string()));
                    continue;
                }
            }
        }
        let Some(c) = ctx.as_mut() else { continue };
        c.set_slave(Slave(job.unit));
        let (answer, broken) = match job.op {
            Op::Read(requests) => {
                let mut out = Vec::with_capacity(requests.len());
                let mut broken = false;
                for r in requests {
                    let result = modbus_tcp::read(c, r, timeout).await;
                    broken = result.as_ref().is_err_and(RequestError::breaks_connection);
                    out.push(result);
                    if broken {
                        break;
                    }
                }
                (Answer::Read(out), broken)
            }
            Op::Call(req) => {
                let result = call(c, req, timeout).await;
                let broken = result.as_ref().is_err_and(RequestError::breaks_connection);
                (Answer::Call(result), broken)
            }
        };
        if broken {
            // A late answer on a reused line would be taken for the next request's.
            ctx = None;
        }
        let _ = job.reply.send(answer);
    }
    tracing::debug!(bus = %key, "Modbus RTU bus stopped");
}

fn unix_ms(t: SystemTime) -> u64 {
    reading::unix_nanos(t) / 1_000_000
}

/// Runs one Modbus RTU device until `task.cancel` fires.
pub async fn run(settings: &ModbusRtuConnection, task: DeviceTask) {
    let device = Arc::clone(&task.device);
    let key = task.key();
    let bus = task.hub.buses.get(settings);
    if bus.key != bus_key(settings) {
        tracing::warn!(device = %key, "bus key mismatch");
    }
    let interval = device
        .poll_interval
        .as_deref()
        .and_then(|t| parse_duration(t).ok())
        .unwrap_or(DEFAULT_POLL_INTERVAL)
        .max(Duration::from_millis(1));
    let interval_ms = u64::try_from(interval.as_millis()).unwrap_or(u64::MAX).max(1);
    let plan = modbus_tcp::plan(&device.points);
    let labels = task.labels();
    let polls = task.metrics.polls.get_or_create(&labels).clone();
    let poll_duration = task.metrics.poll_duration.get_or_create(&labels).clone();
    let gauge = task.metrics.device_connected.get_or_create(&labels).clone();
    gauge.set(0);
    let mut up: Option<bool> = None;
    let now_ms = unix_ms(SystemTime::now());
    let mut ticker =
        tokio::time::interval_at(Instant::now() + Duration::from_millis(interval_ms - now_ms % interval_ms), interval);
    ticker.set_missed_tick_behavior(MissedTickBehavior::Skip);
    let mut last_slot = None;
    loop {
        tokio::select! {
            biased;
            () = task.cancel.cancelled() => break,
            _ = ticker.tick() => {}
        }
        let now_ms = unix_ms(SystemTime::now());
        let slot = now_ms - now_ms % interval_ms;
        if last_slot.is_some_and(|l| slot <= l) {
            continue;
        }
        last_slot = Some(slot);
        let sampled = SystemTime::now();
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
