//! Simulated Modbus devices in this process (`fieldgate_sim`), each on its own port.

use std::net::SocketAddr;

use anyhow::{Context, Result, anyhow, bail};
use fieldgate_crds::{GatewayDevice, Point, ValueType};
use fieldgate_gateway::reading::{Value, pb};
use fieldgate_sim::{self as sim, Fault, SimDevice};
use serde_json::Value as Json;
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

/// Converts the JSON points of a reading into typed protobuf points, using each point's
/// declared type: a JSON number must be exactly representable as that type. A point of the
/// reading missing from `schema`, or a value of the wrong JSON kind, is an error.
pub fn typed_points(reading: &Json, schema: &[Point]) -> Result<Vec<pb::Point>> {
    let points = reading["points"].as_array().ok_or_else(|| anyhow!("no points array in {reading}"))?;
    points
        .iter()
        .map(|p| {
            let name = p["name"].as_str().ok_or_else(|| anyhow!("point without a name: {p}"))?;
            let decl = schema
                .iter()
                .find(|d| d.name == name)
                .ok_or_else(|| anyhow!("point {name:?} is not in the device's point map"))?;
            let v = &p["value"];
            let value = match decl.value_type {
                ValueType::Bool => v.as_bool().map(Value::BoolValue),
                ValueType::String => v.as_str().map(|s| Value::StringValue(s.to_string())),
                ValueType::Uint16 | ValueType::Uint32 | ValueType::Uint64 if !decl.is_scaled() => {
                    v.as_u64().map(Value::UintValue)
                }
                ValueType::Int16 | ValueType::Int32 | ValueType::Int64 if !decl.is_scaled() => {
                    v.as_i64().map(Value::IntValue)
                }
                _ => v.as_f64().map(Value::DoubleValue),
            };
            let Some(value) = value else {
                bail!("point {name:?} of type {:?} has value {v}", decl.value_type);
            };
            Ok(pb::Point {
                name: name.to_string(),
                value: Some(value),
                unit: p["unit"].as_str().unwrap_or_default().to_string(),
            })
        })
        .collect()
}

/// Checks one decoded reading of a simulated device: every point of the map present once, in
/// map order, each value of its declared type and consistent with the others
/// ([`sim::expected_c_consistent`]). Returns the device counter `c`.
pub fn check_sim_reading(points: &[pb::Point], schema: &[Point]) -> Result<u32> {
    let got: Vec<&str> = points.iter().map(|p| p.name.as_str()).collect();
    let want: Vec<&str> = schema.iter().map(|p| p.name.as_str()).collect();
    if got != want {
        bail!("point names {got:?}, want {want:?}");
    }
    for (p, decl) in points.iter().zip(schema) {
        let ok = matches!(
            (&p.value, decl.value_type),
            (Some(Value::BoolValue(_)), ValueType::Bool)
                | (Some(Value::StringValue(_)), ValueType::String)
                | (Some(Value::UintValue(_)), ValueType::Uint16 | ValueType::Uint32 | ValueType::Uint64)
                | (Some(Value::IntValue(_)), ValueType::Int16 | ValueType::Int32 | ValueType::Int64)
                | (Some(Value::DoubleValue(_)), ValueType::Float32 | ValueType::Float64)
        );
        if !ok {
            bail!("point {:?} of type {:?} carries {:?}", p.name, decl.value_type, p.value);
        }
    }
    sim::expected_c_consistent(points).map_err(|e| anyhow!("inconsistent values: {e}"))
}
