//! Test builders: `Device::test("meter-1").pinned("edge-1")`, `Node::gateway("edge-1")`, ...

use std::collections::BTreeMap;
use std::sync::Arc;

use fieldgate_crds::{
    Connection, Device, DeviceProfile, DeviceProfileSpec, DeviceSpec, ModbusPoint, ModbusTable, ModbusTcpConnection,
    MqttAuth, MqttUplink, Placement, Point, SecretRef, Uplink, UplinkSpec, ValueType,
};
use k8s_openapi::api::core::v1::{Node, NodeCondition, NodeStatus, Secret};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, Time};
use k8s_openapi::jiff::Timestamp;
use kube::api::ObjectMeta;

use crate::render::World;

/// A numeric holding-register point.
pub fn point(name: &str, address: u16) -> Point {
    Point {
        name: name.into(),
        value_type: ValueType::Uint16,
        access: Default::default(),
        unit: None,
        scale: None,
        offset: None,
        modbus: Some(ModbusPoint { table: ModbusTable::Holding, address, word_order: None, length: None, bit: None }),
        path: None,
        report: None,
    }
}

fn meta(ns: &str, name: &str) -> ObjectMeta {
    ObjectMeta {
        name: Some(name.into()),
        namespace: Some(ns.into()),
        generation: Some(1),
        uid: Some(format!("uid-{ns}-{name}")),
        ..ObjectMeta::default()
    }
}

/// Builders for Devices.
pub trait DeviceFixture: Sized {
    /// A Modbus TCP device in `default` with one point.
    fn test(name: &str) -> Self;
    /// In namespace `ns`.
    fn in_ns(self, ns: &str) -> Self;
    /// With a label.
    fn label(self, k: &str, v: &str) -> Self;
    /// Pinned to a node.
    fn pinned(self, node: &str) -> Self;
    /// Placed by node labels.
    fn node_selector(self, labels: &[(&str, &str)]) -> Self;
    /// Using a profile.
    fn profile(self, name: &str) -> Self;
    /// With these inline points.
    fn points(self, points: Vec<Point>) -> Self;
    /// Mutates the spec.
    fn spec_with(self, f: impl FnOnce(&mut DeviceSpec)) -> Self;
}

impl DeviceFixture for Device {
    fn test(name: &str) -> Self {
        let mut d = Device::new(
            name,
            DeviceSpec {
                profile: None,
                points: vec![point("value", 0)],
                connection: Connection::ModbusTcp(ModbusTcpConnection {
                    host: "10.0.0.7".into(),
                    port: Some(502),
                    unit_id: Some(1),
                    timeout: None,
                }),
                poll_interval: Some("1s".parse().unwrap()),
                placement: None,
            },
        );
        d.metadata = meta("default", name);
        d
    }
    fn in_ns(mut self, ns: &str) -> Self {
        self.metadata.namespace = Some(ns.into());
        self
    }
    fn label(mut self, k: &str, v: &str) -> Self {
        self.metadata.labels.get_or_insert_with(BTreeMap::new).insert(k.into(), v.into());
        self
    }
    fn pinned(mut self, node: &str) -> Self {
        self.spec.placement = Some(Placement { node_name: Some(node.into()), node_selector: None });
        self
    }
    fn node_selector(mut self, labels: &[(&str, &str)]) -> Self {
        let sel = labels.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        self.spec.placement = Some(Placement { node_name: None, node_selector: Some(sel) });
        self
    }
    fn profile(mut self, name: &str) -> Self {
        self.spec.profile = Some(name.into());
        self
    }
    fn points(mut self, points: Vec<Point>) -> Self {
        self.spec.points = points;
        self
    }
    fn spec_with(mut self, f: impl FnOnce(&mut DeviceSpec)) -> Self {
        f(&mut self.spec);
        self
    }
}

/// A profile in `default`.
pub fn profile(name: &str, points: Vec<Point>) -> DeviceProfile {
    let mut p = DeviceProfile::new(name, DeviceProfileSpec { points });
    p.metadata = meta("default", name);
    p
}

/// Builders for Uplinks.
pub trait UplinkFixture: Sized {
    /// A plain MQTT uplink in `default` selecting every device.
    fn test(name: &str) -> Self;
    /// In namespace `ns`.
    fn in_ns(self, ns: &str) -> Self;
    /// Selecting devices by labels.
    fn selector(self, sel: LabelSelector) -> Self;
    /// With credentials from a Secret.
    fn auth(self, secret: &str) -> Self;
}

impl UplinkFixture for Uplink {
    fn test(name: &str) -> Self {
        let mut u = Uplink::new(
            name,
            UplinkSpec {
                device_selector: None,
                mqtt: Some(MqttUplink { url: "mqtt://broker.example:1883".parse().unwrap(), ..Default::default() }),
                http: None,
                encoding: None,
                compression: None,
                sparkplug: None,
                buffer: None,
            },
        );
        u.metadata = meta("default", name);
        u
    }
    fn in_ns(mut self, ns: &str) -> Self {
        self.metadata.namespace = Some(ns.into());
        self
    }
    fn selector(mut self, sel: LabelSelector) -> Self {
        self.spec.device_selector = Some(sel);
        self
    }
    fn auth(mut self, secret: &str) -> Self {
        self.spec.mqtt.as_mut().unwrap().auth = Some(MqttAuth { secret_ref: SecretRef { name: secret.into() } });
        self
    }
}

/// Builders for Nodes.
pub trait NodeFixture: Sized {
    /// A Ready node labelled `fieldgate.io/gateway=true`.
    fn gateway(name: &str) -> Self;
    /// With a label.
    fn label(self, k: &str, v: &str) -> Self;
    /// NotReady since `since`.
    fn not_ready_since(self, since: Timestamp) -> Self;
    /// Ready again, since `since`.
    fn ready_since(self, since: Timestamp) -> Self;
}

impl NodeFixture for Node {
    fn gateway(name: &str) -> Self {
        Node {
            metadata: ObjectMeta {
                name: Some(name.into()),
                uid: Some(format!("uid-node-{name}")),
                labels: Some(BTreeMap::from([("fieldgate.io/gateway".to_string(), "true".to_string())])),
                ..ObjectMeta::default()
            },
            ..Node::default()
        }
        .ready_since(Timestamp::UNIX_EPOCH)
    }
    fn label(mut self, k: &str, v: &str) -> Self {
        self.metadata.labels.get_or_insert_with(BTreeMap::new).insert(k.into(), v.into());
        self
    }
    fn not_ready_since(self, since: Timestamp) -> Self {
        with_ready(self, "False", since)
    }
    fn ready_since(self, since: Timestamp) -> Self {
        with_ready(self, "True", since)
    }
}

fn with_ready(mut node: Node, status: &str, since: Timestamp) -> Node {
    node.status = Some(NodeStatus {
        conditions: Some(vec![NodeCondition {
            type_: "Ready".into(),
            status: status.into(),
            last_transition_time: Some(Time(since)),
            ..NodeCondition::default()
        }]),
        ..NodeStatus::default()
    });
    node
}

/// A Secret with these string values.
pub fn secret(ns: &str, name: &str, data: &[(&str, &str)]) -> Secret {
    Secret {
        metadata: meta(ns, name),
        string_data: None,
        data: Some(data.iter().map(|(k, v)| (k.to_string(), k8s_openapi::ByteString(v.as_bytes().to_vec()))).collect()),
        ..Secret::default()
    }
}

/// A world from owned objects.
pub fn world(devices: Vec<Device>, profiles: Vec<DeviceProfile>, uplinks: Vec<Uplink>, nodes: Vec<Node>) -> World {
    World {
        devices: devices.into_iter().map(Arc::new).collect(),
        profiles: profiles.into_iter().map(Arc::new).collect(),
        uplinks: uplinks.into_iter().map(Arc::new).collect(),
        nodes: nodes.into_iter().map(Arc::new).collect(),
        secrets: None,
        unreadable_secrets: Default::default(),
    }
}
