//! The Fieldgate gateway: field devices in, a JetStream buffer on the node's disk, the cloud
//! MQTT broker out, and nothing accepted lost on the way.
//!
//! `app` is the wiring diagram; read it first.

#![cfg_attr(test, allow(clippy::unwrap_used, clippy::expect_used))]

pub mod adapters;
pub mod app;
pub mod buffer;
pub mod clock;
pub mod cluster;
pub mod command;
pub mod config_watch;
pub mod credentials;
pub mod downlink;
pub mod encoding;
pub mod index;
pub mod management;
pub mod metrics;
pub mod mqtt;
mod ranges;
pub mod reading;
pub mod reconcile;
pub mod reporting;
pub mod secrets;
pub mod status_report;
pub mod supervise;
pub mod telemetry;
pub mod uplinks;
