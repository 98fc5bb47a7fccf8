//! Simulated Modbus devices in this process (`fieldgate_sim`), each on its own port.

use std::net::SocketAddr;

use anyhow::{Context, Result};
use fieldgate_crds::{GatewayDevice, Point};
use fieldgate_sim::{self as sim, Fault, SimDevice};
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::config::NAMESPACE;

/// One simulated device of a fleet.
#[derive(Clone, Debug)]
pub struct FleetDevice {
    /// Device name in the gateway config (`sim-0000`, ...).
    pub name: String,
    /// Where it listens.
    pub addr: SocketAddr,
    /// The device (clone it to change its fault while it runs).
    pub device: SimDevice,
}

impl FleetDevice {
    /// `default/sim-0000`: the device label in metrics.
    pub fn key(&self) -> String {
        format!("{NAMESPACE}/{}", self.name)
    }
}

/// Simulated devices served until [`SimFleet::stop`] or drop.
pub struct SimFleet {
    devices: Vec<FleetDevice>,
    extra_registers: u16,
    cancel: CancellationToken,
    tasks: Vec<JoinHandle<std::io::Result<()>>>,
}

/// The name of the `index`-th simulated device.
pub fn device_name(index: u32) -> String {
    format!("sim-{index:04}")
}

impl SimFleet {
    /// Starts one device per entry of `faults` (`Fault::None` for a healthy one), indexes
    /// 0, 1, ..., each on a free port of 127.0.0.1.
    pub async fn start(faults: &[Fault]) -> Result<Self> {
        Self::start_with(faults, 0).await
    }

    /// Starts `n` healthy devices.
    pub async fn healthy(n: usize) -> Result<Self> {
        Self::start(&vec![Fault::None; n]).await
    }

    /// Like [`SimFleet::start`], with `extra_registers` registers after the fixed map.
    pub async fn start_with(faults: &[Fault], extra_registers: u16) -> Result<Self> {
        let cancel = CancellationToken::new();
        let mut devices = Vec::new();
        let mut tasks = Vec::new();
        for (i, fault) in faults.iter().enumerate() {
            let index = u32::try_from(i)?;
            let listener = TcpListener::bind("127.0.0.1:0").await.context("binding a simulator port")?;
            let addr = listener.local_addr()?;
            let device = SimDevice::new(index, extra_registers).with_fault(*fault);
            tasks.push(tokio::spawn(sim::serve(listener, device.clone(), cancel.clone())));
            devices.push(FleetDevice { name: device_name(index), addr, device });
        }
        Ok(Self { devices, extra_registers, cancel, tasks })
    }

    /// The devices.
    pub fn devices(&self) -> &[FleetDevice] {
        &self.devices
    }

    /// The listening ports, in device order.
    pub fn ports(&self) -> Vec<u16> {
        self.devices.iter().map(|d| d.addr.port()).collect()
    }

    /// Gateway config entries for every device, polled every `poll_interval` (panics on a text
    /// that is not a duration: a bug in the test).
    #[allow(clippy::expect_used)]
    pub fn gateway_devices(&self, poll_interval: &str) -> Vec<GatewayDevice> {
        let poll_interval = &poll_interval.parse().expect("a duration");
        self.devices
            .iter()
            .map(|d| {
                sim::gateway_device(NAMESPACE, &d.name, "127.0.0.1", d.addr.port(), poll_interval, self.extra_registers)
            })
            .collect()
    }

    /// The point map every device of this fleet has.
    pub fn points(&self) -> Vec<Point> {
        sim::simulated_points(self.extra_registers)
    }

    /// Every sample each device served so far, by `namespace/name` (the judge's evidence).
    pub fn served(&self) -> crate::delivery::ServedLog {
        self.devices.iter().map(|d| (d.key(), d.device.served())).collect()
    }

    /// Stops serving: open connections drop, new ones are refused.
    pub async fn stop(&mut self) {
        self.cancel.cancel();
        for t in self.tasks.drain(..) {
            let _ = t.await;
        }
    }
}

impl Drop for SimFleet {
    fn drop(&mut self) {
        self.cancel.cancel();
        for t in &self.tasks {
            t.abort();
        }
    }
}

/// The checks of what a consumer received from simulated devices live with the simulator.
pub use fieldgate_sim::{check_sim_reading, typed_points};
