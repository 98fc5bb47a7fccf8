//! The `fieldgate.io/v1alpha1` API.
//!
//! - [`Device`], [`DeviceProfile`] and [`Uplink`] are the custom resources people apply.
//! - [`GatewayConfig`] is the document one gateway runs from: the operator renders one per
//!   edge node, and a standalone gateway reads it from a file.
//! - [`validate`] holds the checks both the operator and the gateway need; every check reports
//!   the field path of what it found wrong, and all problems are reported at once.

pub mod device;
pub mod gateway_config;
pub mod point;
pub mod quantity;
pub mod uplink;
pub mod validate;

pub use device::{
    Connection, Device, DeviceProfile, DeviceProfileSpec, DeviceSpec, DeviceStatus,
    ModbusTcpConnection, Placement,
};
pub use gateway_config::{GatewayConfig, GatewayDevice, GatewayUplink};
pub use point::{Access, ModbusPoint, ModbusTable, Point, ValueType, WordOrder};
pub use uplink::{
    BufferSpec, Encoding, MqttAuth, MqttTls, MqttUplink, OnFull, SecretKeyRef, SecretRef, Uplink,
    UplinkSpec, UplinkStatus,
};
pub use validate::{FieldError, ValidationErrors};

/// The API group of every Fieldgate resource.
pub const GROUP: &str = "fieldgate.io";
/// The API version served now.
pub const VERSION: &str = "v1alpha1";

/// Every custom resource definition, in a stable order, as YAML documents.
pub fn crd_yaml() -> Result<Vec<(&'static str, String)>, serde_saphyr::ser::Error> {
    use kube::CustomResourceExt;
    Ok(vec![
        ("device", serde_saphyr::to_string(&Device::crd())?),
        ("deviceprofile", serde_saphyr::to_string(&DeviceProfile::crd())?),
        ("uplink", serde_saphyr::to_string(&Uplink::crd())?),
    ])
}
