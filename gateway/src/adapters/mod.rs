//! Protocol adapters: each turns one device's protocol into [`Reading`]s.
//!
//! An adapter runs one device until the device's token is cancelled. It never ends on its own
//! because the device misbehaves: failures are counted (`fieldgate_device_errors_total{kind}`),
//! state transitions are logged, and the connection is rebuilt with capped exponential backoff
//! and jitter. Readings go to the [`ReadingSink`]; the buffer writer decides when they are
//! accepted.
//!
//! Adding a protocol:
//! 1. add its typed settings as a variant of `fieldgate_crds::Connection` (with validation in
//!    `fieldgate_crds::validate`);
//! 2. add one file here with `pub async fn run(settings, DeviceTask)`;
//! 3. add its arm to the `match` in [`run`] — the compiler points at every other place.

use std::sync::Arc;

use fieldgate_crds::{Connection, GatewayDevice};
use tokio_util::sync::CancellationToken;

use crate::metrics::{DeviceErrorLabels, DeviceLabels, Metrics};
use crate::reading::{Reading, ReadingSink};

pub mod coap;
pub mod hub;
pub mod modbus_tcp;
pub mod mqtt_ingest;
pub mod payload;

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
        DeviceLabels {
            device: self.key(),
            protocol: self.device.connection.protocol(),
        }
    }

    /// Counts a failed request of the given kind.
    pub fn count_error(&self, kind: &'static str) {
        self.metrics
            .device_errors
            .get_or_create(&DeviceErrorLabels {
                device: self.key(),
                protocol: self.device.connection.protocol(),
                kind,
            })
            .inc();
    }

    /// Counts a reading and hands it to the buffer writer. `Err` means the gateway is stopping.
    pub async fn emit(&self, reading: Reading) -> Result<(), crate::reading::SinkClosed> {
        self.metrics.readings_received.get_or_create(&self.labels()).inc();
        self.sink.submit(reading).await
    }

    /// Like [`DeviceTask::emit`], and resolves once JetStream accepted the reading: for
    /// adapters that acknowledge to the device only then.
    pub async fn emit_confirmed(&self, reading: Reading) -> Result<crate::reading::Acceptance, crate::reading::SinkClosed> {
        self.metrics.readings_received.get_or_create(&self.labels()).inc();
        self.sink.submit_confirmed(reading).await
    }
}

/// Runs one device with the adapter of its protocol until `task.cancel` fires.
pub async fn run(task: DeviceTask) {
    let device = Arc::clone(&task.device);
    match &device.connection {
        Connection::ModbusTcp(settings) => modbus_tcp::run(settings, task).await,
        Connection::Coap(settings) => coap::run(settings, task).await,
        Connection::Mqtt(settings) => mqtt_ingest::run(settings, task).await,
        Connection::Tcp(_) | Connection::Udp(_) => {
            tracing::error!(device = %task.key(), protocol = device.connection.protocol(), "protocol not supported yet");
            task.cancel.cancelled().await;
        }
    }
}
