//! (being written)
use fieldgate_crds::ModbusTcpConnection;
/// Runs one Modbus TCP device.
pub async fn run(_settings: &ModbusTcpConnection, task: super::DeviceTask) { task.cancel.cancelled().await }
