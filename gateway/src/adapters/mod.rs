//! Protocol adapters: each turns one device's protocol into [`Reading`]s.
//!
//! An adapter runs one device until the device's token is cancelled. It never ends on its own
//! because the device misbehaves: failures are counted (`fieldgate_device_errors_total{kind}`),
//! state transitions are logged, and the connection is rebuilt with capped exponential backoff
//! and jitter. Readings go to the [`ReadingSink`]; the buffer writer decides when they are
//! accepted. Adapters that acknowledge to the device (CoAP, MQTT ingest, TCP, UDP) use
//! [`DeviceTask::emit_confirmed`] and acknowledge only once JetStream accepted the reading.
//! Devices that connect to the gateway (CoAP push, TCP, UDP) register with the shared
//! [`hub::DeviceHub`], whose listeners look them up; payloads map to points in [`payload`].
//! Reporting rules ([`crate::reporting`]) apply in `emit*`, the same for every protocol.
//!
//! Commands ([`crate::command::Job`]) reach the adapter that owns the device on its inbox, and
//! it executes them on its own connection: the Modbus TCP poller's connection (before the
//! reads still queued in a poll), the RTU bus scheduler (writes before queued reads), the
//! CoAP client, the device's MQTT ingest session, the TCP device's live connection, the UDP
//! listener towards the device's last authenticated source.
//!
//! Adding a protocol: `docs/adding-a-protocol.md` lists every place. In short, its typed
//! settings become a variant of `fieldgate_crds::Connection`; then the compiler points at the
//! exhaustive matches that need its arm (its label, placement, Secrets and endpoint in the
//! methods of `Connection`, its validation, and [`run`] here); and one file here holds its
//! adapter: 4 hand-edited files for a polled protocol. Protocols devices connect to also
//! need a [`hub::Listener`] variant.

use std::sync::Arc;

use fieldgate_crds::{Connection, GatewayDevice};
use tokio_util::sync::CancellationToken;

use crate::metrics::{DeviceErrorLabels, DeviceLabels, Metrics};
use crate::reading::{Reading, ReadingSink};
use crate::telemetry::ReadingTrace;

pub mod coap;
pub mod hub;
pub mod modbus_rtu;
pub mod modbus_tcp;
pub mod modbus_write;
pub mod mqtt_ingest;
pub mod payload;
pub mod tcp;
pub mod udp;

/// Everything an adapter needs to run one device.
#[derive(Clone)]
pub struct DeviceTask {
    /// The device, profile merged in, validated.
    pub device: Arc<GatewayDevice>,
    /// Name of the gateway node, carried in readings.
    pub node: String,
    /// Where readings go.
    pub sink: ReadingSink,
    /// The gateway's metrics.
    pub metrics: Arc<Metrics>,
    /// Cancelled when the device is removed or the gateway stops.
    pub cancel: CancellationToken,
    /// Listeners, device directory and Secrets shared by the adapters.
    pub hub: Arc<hub::DeviceHub>,
}

impl DeviceTask {
    /// `namespace/name`, the device's label in metrics and logs.
    pub fn key(&self) -> String {
        format!("{}/{}", self.device.namespace, self.device.name)
    }

    /// Labels of this device's metrics.
    pub fn labels(&self) -> DeviceLabels {
        DeviceLabels { device: self.key(), protocol: self.device.connection.protocol() }
    }

    /// Counts a failed request of the given kind.
    pub fn count_error(&self, kind: &'static str) {
        let device = self.key();
        self.metrics.device_error(DeviceErrorLabels { device, protocol: self.device.connection.protocol(), kind });
    }

    /// Applies the points' reporting rules ([`crate::reporting`]); `false` when nothing is
    /// left to send.
    fn report(&self, key: &str, reading: &mut Reading) -> bool {
        crate::reporting::apply(&self.hub.reporters, key, &self.device, &mut reading.points)
    }

    /// Applies the reporting rules and counts what is left: `false` when nothing is left to
    /// send. The device key is built once for both (this runs for every reading).
    fn report_and_count(&self, reading: &mut Reading) -> bool {
        let key = self.key();
        if !self.report(&key, reading) {
            return false;
        }
        let labels = DeviceLabels { device: key, protocol: self.device.connection.protocol() };
        self.count_reading(&labels, reading);
        true
    }

    fn count_reading(&self, labels: &DeviceLabels, reading: &Reading) {
        self.metrics.readings_received.get_or_create(labels).inc();
        let sampled = reading.time_unix_nano as f64 / 1e9;
        self.metrics.device_last_reading.get_or_create(labels).set(sampled);
        self.metrics.device_last_values.record(&labels.device, reading);
    }

    /// Counts a reading and hands it to the buffer writer. `Err` means the gateway is stopping.
    pub async fn emit(&self, mut reading: Reading) -> Result<(), crate::reading::SinkClosed> {
        if !self.report_and_count(&mut reading) {
            return Ok(());
        }
        self.sink.submit(reading).await
    }

    /// Like [`DeviceTask::emit`], and resolves once JetStream accepted the reading: for
    /// adapters that acknowledge to the device only then.
    pub async fn emit_confirmed(
        &self,
        mut reading: Reading,
    ) -> Result<crate::reading::Acceptance, crate::reading::SinkClosed> {
        if !self.report_and_count(&mut reading) {
            return Ok(nothing_to_keep());
        }
        self.sink.submit_confirmed(reading).await
    }

    /// [`DeviceTask::emit`] for a reading with its trace (see [`crate::telemetry`]): ends the
    /// adapter's spans and lets the buffer writer continue the trace.
    pub async fn emit_traced(
        &self,
        mut reading: Reading,
        trace: ReadingTrace,
    ) -> Result<(), crate::reading::SinkClosed> {
        if !self.report_and_count(&mut reading) {
            return Ok(());
        }
        let handoff = trace.finish(&reading.id, reading.points.len());
        self.sink.submit_traced(reading, handoff).await
    }

    /// [`DeviceTask::emit_confirmed`] for a reading with its trace.
    pub async fn emit_confirmed_traced(
        &self,
        mut reading: Reading,
        trace: ReadingTrace,
    ) -> Result<crate::reading::Acceptance, crate::reading::SinkClosed> {
        if !self.report_and_count(&mut reading) {
            return Ok(nothing_to_keep());
        }
        let handoff = trace.finish(&reading.id, reading.points.len());
        self.sink.submit_confirmed_traced(reading, handoff).await
    }
}

impl DeviceTask {
    /// The next command to send to the device, with its point; `None` once the device stops.
    /// Expired and late commands are answered here, and so are interrupted ones unless
    /// `resumable` (the adapter checks the device before sending again, as Modbus reads back).
    pub(crate) async fn next_command(
        &self,
        inbox: &mut crate::command::Inbox,
        resumable: bool,
    ) -> Option<(crate::command::Job, &fieldgate_crds::Point)> {
        loop {
            let job = tokio::select! {
                () = self.cancel.cancelled() => return None,
                job = inbox.recv() => job?,
            };
            let done = if resumable && job.resume && !job.expired() && !job.late() { None } else { job.precheck() };
            if let Some(outcome) = done {
                job.finish(outcome);
                continue;
            }
            match self.device.points.get(job.point) {
                Some(point) => return Some((job, point)),
                None => job.finish(crate::command::Outcome::failed(
                    crate::command::Reason::UnknownPoint,
                    "the device changed",
                )),
            }
        }
    }
}

/// An acceptance that is already resolved: the reporting rules left nothing to keep.
fn nothing_to_keep() -> crate::reading::Acceptance {
    let (tx, rx) = tokio::sync::oneshot::channel();
    let _ = tx.send(Ok(()));
    rx
}

/// Runs one device with the adapter of its protocol until `task.cancel` fires.
///
/// Each adapter runs boxed: inline, every device's task would be as large as the largest
/// adapter's state (a Modbus poller's), also for the TCP and UDP devices that only wait.
///
/// Commands for the device arrive on its bounded inbox (registered with the hub while the
/// device runs); its adapter executes them in order on its own connection or session.
pub async fn run(task: DeviceTask) {
    let (commands, inbox) = tokio::sync::mpsc::channel(crate::command::DEVICE_QUEUE);
    let _running = task.hub.running(&task, commands);
    let device = Arc::clone(&task.device);
    match &device.connection {
        Connection::ModbusTcp(settings) => Box::pin(modbus_tcp::run(settings, task, inbox)).await,
        Connection::Coap(settings) => Box::pin(coap::run(settings, task, inbox)).await,
        Connection::Mqtt(settings) => Box::pin(mqtt_ingest::run(settings, task, inbox)).await,
        Connection::Tcp(settings) => Box::pin(tcp::run(tcp::Raw::Tcp, settings, task, inbox)).await,
        Connection::Udp(settings) => Box::pin(tcp::run(tcp::Raw::Udp, settings, task, inbox)).await,
        Connection::ModbusRtu(settings) => Box::pin(modbus_rtu::run(settings, task, inbox)).await,
    }
}
