//! `GatewayConfig`: everything one gateway runs from.
//!
//! The operator renders one per edge node (profiles merged into devices, uplinks resolved to
//! device lists); a standalone gateway reads the same document from a file.

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::device::Connection;
use crate::point::Point;
use crate::uplink::{BufferSpec, Encoding, MqttUplink};

/// The configuration of one gateway.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct GatewayConfig {
    /// Always `fieldgate.io/v1alpha1`.
    pub api_version: String,
    /// Always `GatewayConfig`.
    pub kind: String,
    /// The edge node this configuration is for (informational in standalone mode).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node: Option<String>,
    /// Content version, set by the operator (a hash of the rendered document).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub version: Option<String>,
    /// The devices this gateway serves, profiles already merged in.
    #[serde(default)]
    pub devices: Vec<GatewayDevice>,
    /// The uplinks this gateway forwards to.
    #[serde(default)]
    pub uplinks: Vec<GatewayUplink>,
}

/// A device as one gateway serves it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct GatewayDevice {
    /// Namespace of the Device object. Defaults to `default`.
    #[serde(default = "default_namespace")]
    pub namespace: String,
    /// Name of the Device object.
    pub name: String,
    /// How to reach the device.
    pub connection: Connection,
    /// Time between two polls. Defaults to `1s`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub poll_interval: Option<String>,
    /// All points of the device.
    pub points: Vec<Point>,
}

/// An uplink as one gateway runs it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct GatewayUplink {
    /// Namespace of the Uplink object. Defaults to `default`.
    #[serde(default = "default_namespace")]
    pub namespace: String,
    /// Name of the Uplink object.
    pub name: String,
    /// Names of the devices (in the same namespace) whose readings go here.
    /// Absent: every device of the namespace.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub devices: Option<Vec<String>>,
    /// The broker.
    pub mqtt: MqttUplink,
    /// Message encoding. Defaults to `json`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub encoding: Option<Encoding>,
    /// Buffer limits.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub buffer: Option<BufferSpec>,
}

impl GatewayUplink {
    /// Whether readings of this device go to this uplink.
    pub fn selects(&self, device: &GatewayDevice) -> bool {
        device.namespace == self.namespace && self.devices.as_ref().is_none_or(|names| names.contains(&device.name))
    }
}

fn default_namespace() -> String {
    "default".to_string()
}

impl GatewayConfig {
    /// The `apiVersion` a GatewayConfig carries.
    pub const API_VERSION: &'static str = "fieldgate.io/v1alpha1";
    /// The `kind` a GatewayConfig carries.
    pub const KIND: &'static str = "GatewayConfig";

    /// Parses a YAML (or JSON) document. Structural errors name the line and column;
    /// call [`GatewayConfig::validate`] for the semantic checks.
    pub fn from_yaml(text: &str) -> Result<Self, serde_saphyr::Error> {
        // The parser's default budget (250k nodes) refuses a node with ~13k devices; a device
        // is ~20 nodes. Allow a few hundred thousand devices; the file size bounds the rest.
        let mut budget = serde_saphyr::Budget::default();
        budget.max_nodes = 8_000_000;
        budget.max_events = 16_000_000;
        let mut options = serde_saphyr::Options::default();
        options.budget = Some(budget);
        serde_saphyr::from_str_with_options(text, options)
    }
}
