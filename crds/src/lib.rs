//! The `fieldgate.io/v1alpha1` API.
//!
//! - [`Device`], [`DeviceProfile`] and [`Uplink`] are the custom resources people apply.
//! - [`GatewayConfig`] is the document one gateway runs from: the operator renders one per
//!   edge node, and a standalone gateway reads it from a file.
//! - [`schema`] checks a document against the strict schema of its type (unknown fields, types,
//!   ranges, patterns) and [`validate`] holds the semantic checks both the operator and the
//!   gateway need; every check reports the field path of what it found wrong, and all problems
//!   are reported at once.
//! - [`values`]: durations, byte quantities and broker URLs, parsed once when a document is read.

#![cfg_attr(test, allow(clippy::unwrap_used, clippy::expect_used))]

pub mod device;
pub mod gateway_config;
pub mod point;
pub mod schema;
pub mod uplink;
pub mod validate;
pub mod values;

pub use device::{
    CoapConnection, Connection, ConnectionSecretRef, Device, DeviceProfile, DeviceProfileSpec, DeviceSecretRef,
    DeviceSpec, DeviceStatus, EndpointMut, ModbusRtuConnection, ModbusTcpConnection, MqttDeviceConnection, Parity,
    Placement, RawConnection,
};
pub use gateway_config::{ConfigError, GatewayConfig, GatewayDevice, GatewayUplink, SecretUse, UplinkTarget};
pub use point::{Access, ModbusPoint, ModbusTable, Point, ReportRule, ValueType, WordOrder};
pub use uplink::{
    BufferSpec, Compression, Encoding, HttpAuth, HttpUplink, MqttAuth, MqttTls, MqttUplink, OnFull, SecretKeyRef,
    SecretRef, SparkplugSpec, Uplink, UplinkGatewayStatus, UplinkSpec, UplinkStatus,
};
pub use validate::{FieldError, ValidationErrors};
pub use values::{BrokerUrl, ByteSize, HttpUrl, HumanDuration, ValueError};

/// The API group of every Fieldgate resource.
pub const GROUP: &str = "fieldgate.io";
/// The API version served now.
pub const VERSION: &str = "v1alpha1";

/// Label that marks a Node as a gateway node (value `true`).
pub const GATEWAY_NODE_LABEL: &str = "fieldgate.io/gateway";

/// Every custom resource definition, in a stable order, as YAML documents.
pub fn crd_yaml() -> Result<Vec<(&'static str, String)>, serde_saphyr::ser::Error> {
    use kube::CustomResourceExt;
    Ok(vec![
        ("device", serde_saphyr::to_string(&Device::crd())?),
        ("deviceprofile", serde_saphyr::to_string(&DeviceProfile::crd())?),
        ("uplink", serde_saphyr::to_string(&Uplink::crd())?),
    ])
}

/// The per-node objects the operator writes and the gateway reads: names, keys and the layout
/// of the per-node Secret.
///
/// In the operator's namespace, for every gateway node that serves at least one device:
///
/// - ConfigMap `fieldgate-gateway-<node>`: key [`CONFIG_KEY`] holds the node's
///   [`GatewayConfig`] as YAML; annotation [`CONFIG_HASH_ANNOTATION`] carries its version.
/// - Secret `fieldgate-gateway-<node>`: only the credentials that node's devices (token and
///   MQTT credential Secrets) and uplinks reference. Gateways cannot read it: the operator
///   serves each gateway its own node's copy ([`node_objects::NodeCredentials`] at
///   [`node_objects::CREDENTIALS_PATH`]), to a ServiceAccount token bound to a pod on that
///   node. The ConfigMap's [`node_objects::SECRET_HASH_ANNOTATION`] names the credentials
///   that go with the config; the Secret is applied before the ConfigMap.
///   Data key `<namespace>_<secret>_<key>` holds key `<key>` of Secret `<secret>` in namespace
///   `<namespace>`. The rendered config refers to that Secret as `<namespace>_<secret>`, so the
///   gateway writes data key `k` to `<secrets-dir>/<dir>/<file>` where
///   `(dir, file) = `[`node_objects::split_secret_key`]`(k)` and its usual
///   `<secrets-dir>/<secret>/<key>` lookup works unchanged. (Namespaces and Secret names cannot
///   contain `_`, so the split is unambiguous; two namespaces' Secrets of one name cannot clash.)
pub mod node_objects {
    /// Key of the GatewayConfig YAML in the per-node ConfigMap.
    pub const CONFIG_KEY: &str = "gateway.yaml";
    /// Annotation on the per-node ConfigMap with the config's content hash (its `version`).
    pub const CONFIG_HASH_ANNOTATION: &str = "fieldgate.io/config-hash";
    /// Annotation on the per-node Secret with a hash of its content, and on the per-node
    /// ConfigMap with the hash of the credentials that go with the config.
    pub const SECRET_HASH_ANNOTATION: &str = "fieldgate.io/secret-hash";
    /// Path of the operator's credentials endpoint (HTTPS, `GET`, bearer token).
    pub const CREDENTIALS_PATH: &str = "/v1/credentials";
    /// Default audience of the projected ServiceAccount token a gateway presents there.
    pub const CREDENTIALS_AUDIENCE: &str = "fieldgate-credentials";

    /// What the credentials endpoint answers: the per-node Secret of the caller's node.
    #[derive(Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
    pub struct NodeCredentials {
        /// The node, as the caller's token names it.
        pub node: String,
        /// The Secret's content hash (its [`SECRET_HASH_ANNOTATION`]); empty when the node has
        /// no Secret (it serves no device).
        pub hash: String,
        /// The Secret's data: key `<namespace>_<secret>_<key>` (see [`split_secret_key`]).
        #[serde(default)]
        pub data: std::collections::BTreeMap<String, k8s_openapi::ByteString>,
    }

    /// Keys only: values never reach a log.
    impl std::fmt::Debug for NodeCredentials {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.debug_struct("NodeCredentials")
                .field("node", &self.node)
                .field("hash", &self.hash)
                .field("keys", &self.data.keys().collect::<Vec<_>>())
                .finish()
        }
    }
    /// Annotation on both per-node objects naming the node (node names may exceed the
    /// 63 characters of a label value).
    pub const NODE_ANNOTATION: &str = "fieldgate.io/node";
    /// Label (with value [`ROLE_CONFIG`]) that marks the per-node ConfigMaps and Secrets.
    pub const ROLE_LABEL: &str = "fieldgate.io/role";
    /// Value of [`ROLE_LABEL`] on the per-node objects.
    pub const ROLE_CONFIG: &str = "gateway-config";

    /// Name of the ConfigMap and of the Secret of one node.
    pub fn object_name(node: &str) -> String {
        format!("fieldgate-gateway-{node}")
    }

    /// The name under which a rendered config refers to Secret `name` of `namespace`.
    pub fn secret_dir(namespace: &str, name: &str) -> String {
        format!("{namespace}_{name}")
    }

    /// Splits a name made by [`secret_dir`] back into the namespace and the Secret's name.
    /// `None` for any other name (such as a plain Secret name of a standalone config).
    pub fn split_secret_dir(dir: &str) -> Option<(&str, &str)> {
        let (namespace, name) = dir.split_once('_')?;
        (crate::validate::is_dns_label(namespace) && crate::validate::is_dns_subdomain(name))
            .then_some((namespace, name))
    }

    /// Data key in the per-node Secret for `key` of Secret `name` in `namespace`.
    pub fn secret_key(namespace: &str, name: &str, key: &str) -> String {
        format!("{namespace}_{name}_{key}")
    }

    /// Splits a per-node Secret data key into the directory (as the rendered config names
    /// the Secret) and the file (the original key). `None` for keys not written by the operator.
    pub fn split_secret_key(data_key: &str) -> Option<(&str, &str)> {
        let first = data_key.find('_')?;
        let second = first + 1 + data_key[first + 1..].find('_')?;
        let (dir, file) = (&data_key[..second], &data_key[second + 1..]);
        (first > 0 && second > first + 1 && !file.is_empty()).then_some((dir, file))
    }

    #[cfg(test)]
    mod tests {
        use super::*;

        #[test]
        fn node_credentials_never_show_their_values() {
            let c = NodeCredentials {
                node: "edge-1".into(),
                hash: "h".into(),
                data: [("default_creds_password".to_string(), k8s_openapi::ByteString(b"hunter2".to_vec()))].into(),
            };
            let shown = format!("{c:?}");
            assert!(shown.contains("default_creds_password") && !shown.contains("hunter2"), "{shown}");
            let json = serde_json::to_value(&c).unwrap();
            assert_eq!(json["data"]["default_creds_password"], "aHVudGVyMg==");
        }

        #[test]
        fn secret_keys_split_back_into_directory_and_file() {
            let k = secret_key("plant-a", "cloud.creds", "tls_extra.key");
            assert_eq!(split_secret_key(&k), Some(("plant-a_cloud.creds", "tls_extra.key")));
            assert_eq!(secret_dir("plant-a", "cloud.creds"), "plant-a_cloud.creds");
            assert_eq!(split_secret_key("nounderscore"), None);
            assert_eq!(split_secret_key("a_b_"), None);
        }

        #[test]
        fn secret_dirs_split_back_into_namespace_and_name() {
            let dir = secret_dir("plant-a", "cloud.creds");
            assert_eq!(split_secret_dir(&dir), Some(("plant-a", "cloud.creds")));
            let data_key = secret_key("plant-a", "cloud.creds", "token");
            let (d, _) = split_secret_key(&data_key).unwrap();
            assert_eq!(split_secret_dir(d), Some(("plant-a", "cloud.creds")));
            for other in ["cloud-creds", "plant.a_creds", "_creds", "plant-a_", "plant-a_Creds", "a_b_c"] {
                assert_eq!(split_secret_dir(other), None, "{other}");
            }
        }
    }
}
