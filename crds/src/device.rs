//! `Device` and `DeviceProfile`.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

use crate::point::Point;

/// A reusable point map shared by many identical devices.
#[derive(CustomResource, Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[kube(
    group = "fieldgate.io",
    version = "v1alpha1",
    kind = "DeviceProfile",
    plural = "deviceprofiles",
    shortname = "fgdp",
    category = "fieldgate",
    namespaced,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[serde(rename_all = "camelCase")]
pub struct DeviceProfileSpec {
    /// The points every device using this profile has.
    pub points: Vec<Point>,
}

/// A field device the gateway polls or receives readings from.
#[derive(CustomResource, Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[kube(
    group = "fieldgate.io",
    version = "v1alpha1",
    kind = "Device",
    plural = "devices",
    shortname = "fgd",
    category = "fieldgate",
    namespaced,
    status = "DeviceStatus",
    printcolumn = r#"{"name":"Node","type":"string","jsonPath":".status.node"}"#,
    printcolumn = r#"{"name":"Ready","type":"string","jsonPath":".status.conditions[?(@.type==\"Ready\")].status"}"#,
    printcolumn = r#"{"name":"Last Seen","type":"date","jsonPath":".status.lastSeen"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[serde(rename_all = "camelCase")]
pub struct DeviceSpec {
    /// Name of a DeviceProfile in the same namespace whose points this device has.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub profile: Option<String>,
    /// Points of this device. A point named like one of the profile's replaces it.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub points: Vec<Point>,
    /// How the gateway reaches the device: exactly one protocol.
    pub connection: Connection,
    /// Time between two polls, such as `500ms` or `1s`. Defaults to `1s`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub poll_interval: Option<String>,
    /// Which gateway node serves the device. Defaults to any gateway node.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub placement: Option<Placement>,
}

/// How the gateway reaches a device. Exactly one protocol is set.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub enum Connection {
    /// Modbus TCP (also Modbus TCP gateways in front of serial buses).
    ModbusTcp(ModbusTcpConnection),
}

impl Connection {
    /// Short protocol label, used in metrics and logs.
    pub fn protocol(&self) -> &'static str {
        match self {
            Connection::ModbusTcp(_) => "modbus_tcp",
        }
    }
}

/// Settings of a Modbus TCP connection.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ModbusTcpConnection {
    /// Host name or IP address of the device.
    pub host: String,
    /// TCP port. Defaults to 502.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port: Option<u16>,
    /// Modbus unit identifier (slave id). Defaults to 1.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub unit_id: Option<u8>,
    /// Deadline of each request, such as `500ms`. Defaults to `1s`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout: Option<String>,
}

/// Where a device is served.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Placement {
    /// Pin the device to this gateway node.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node_name: Option<String>,
    /// Choose among gateway nodes carrying all of these labels.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node_selector: Option<BTreeMap<String, String>>,
}

/// Observed state of a Device. Health and placement only: never telemetry values.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct DeviceStatus {
    /// The gateway node serving the device.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node: Option<String>,
    /// The `metadata.generation` this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// When the device last answered (RFC 3339), updated on transitions and rate-limited.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_seen: Option<String>,
    /// `Configured`, `Reachable` and `Ready`, written on transitions only.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<Condition>,
}
