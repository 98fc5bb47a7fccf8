//! The Fieldgate operator: `Device`, `DeviceProfile` and `Uplink` objects in, one
//! `GatewayConfig` per gateway node out.
//!
//! - [`render`] is the brain: a pure function from every object to per-node configs and
//!   per-object verdicts; [`placement`] decides which node serves which device.
//! - [`writer`] does the API writes for one render (server-side apply, status, events);
//!   [`controller`] watches the inputs and runs render + writer on every change;
//!   [`lease`] makes sure only one replica writes, and no write outlives its leadership.
//! - [`credentials`] serves each gateway the credentials of its own node, and nobody else's.
//! - [`app`] wires `fieldgate-operator run`; [`offline`] is `render -f`. The benchmark
//!   (`fieldgate-bench-operator`, with its mocked API server) lives in the test crate.

pub mod app;
pub mod controller;
pub mod credentials;
pub mod lease;
pub mod management;
pub mod metrics;
pub mod offline;
pub mod placement;
pub mod render;
pub mod telemetry;
pub mod writer;

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod fixtures;
