//! `Device` and `DeviceProfile`.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use kube::{CustomResource, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::time::Duration;

use crate::point::Point;
use crate::values::{BrokerUrl, ByteSize, HumanDuration};

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
#[schemars(transform = crate::schema::kubernetes_formats)]
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
    printcolumn = r#"{"name":"Configured","type":"string","jsonPath":".status.conditions[?(@.type==\"Configured\")].status"}"#,
    printcolumn = r#"{"name":"Ready","type":"string","jsonPath":".status.conditions[?(@.type==\"Ready\")].status"}"#,
    printcolumn = r#"{"name":"Last Seen","type":"date","jsonPath":".status.lastSeen"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#,
    printcolumn = r#"{"name":"Message","type":"string","priority":1,"description":"Why the object is (not) ready","jsonPath":".status.conditions[?(@.type==\"Ready\")].message"}"#
)]
#[serde(rename_all = "camelCase")]
#[schemars(transform = crate::schema::kubernetes_formats)]
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
    pub poll_interval: Option<HumanDuration>,
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
    /// CoAP (RFC 7252) over UDP: the device pushes readings to the gateway, and/or the
    /// gateway polls or observes one of its resources.
    Coap(CoapConnection),
    /// A field MQTT broker the device publishes to; the gateway subscribes to its topics.
    Mqtt(MqttDeviceConnection),
    /// Raw TCP: the device connects to the gateway and sends line or JSON frames.
    Tcp(RawConnection),
    /// Raw UDP: the device sends line or JSON datagrams to the gateway.
    Udp(RawConnection),
    /// Modbus RTU on a serial line of the node (RS-485/RS-232), or RTU frames over TCP.
    /// Devices on one line share one scheduler, so their requests never collide.
    ModbusRtu(ModbusRtuConnection),
}

impl Connection {
    /// Short protocol label, used in metrics and logs.
    pub fn protocol(&self) -> &'static str {
        match self {
            Connection::ModbusTcp(_) => "modbus_tcp",
            Connection::Coap(_) => "coap",
            Connection::Mqtt(_) => "mqtt",
            Connection::Tcp(_) => "tcp",
            Connection::Udp(_) => "udp",
            Connection::ModbusRtu(_) => "modbus_rtu",
        }
    }

    /// Whether any gateway node on the same network can reach the device. Network devices
    /// move to another node when theirs fails; devices wired to one node (serial lines,
    /// USB) cannot and stay where they are.
    pub fn is_network(&self) -> bool {
        match self {
            Connection::ModbusTcp(_)
            | Connection::Coap(_)
            | Connection::Mqtt(_)
            | Connection::Tcp(_)
            | Connection::Udp(_) => true,
            Connection::ModbusRtu(c) => c.port.is_none(),
        }
    }

    /// The Secret references of the connection, in field order. Validation, the list of
    /// Secrets a config reads and the operator's per-node Secrets all come from here.
    pub fn secret_refs(&self) -> Vec<ConnectionSecretRef<'_>> {
        fn token<'a>(at: &'static str, r: &'a DeviceSecretRef) -> ConnectionSecretRef<'a> {
            ConnectionSecretRef { at, name: &r.name, key: r.key.as_deref(), reads: vec![r.key()] }
        }
        match self {
            Connection::Coap(c) => c.token_secret_ref.iter().map(|r| token("coap.tokenSecretRef", r)).collect(),
            Connection::Tcp(r) => vec![token("tcp.tokenSecretRef", &r.token_secret_ref)],
            Connection::Udp(r) => vec![token("udp.tokenSecretRef", &r.token_secret_ref)],
            Connection::Mqtt(m) => m
                .auth
                .iter()
                .map(|a| ConnectionSecretRef {
                    at: "mqtt.auth.secretRef",
                    name: &a.secret_ref.name,
                    key: None,
                    reads: vec!["username", "password"],
                })
                .collect(),
            Connection::ModbusTcp(_) | Connection::ModbusRtu(_) => Vec::new(),
        }
    }

    /// The names of the Secrets [`Connection::secret_refs`] lists, to rename them (the
    /// operator renders them into one Secret per node).
    pub fn secret_names_mut(&mut self) -> Vec<&mut String> {
        match self {
            Connection::Coap(c) => c.token_secret_ref.iter_mut().map(|r| &mut r.name).collect(),
            Connection::Tcp(r) | Connection::Udp(r) => vec![&mut r.token_secret_ref.name],
            Connection::Mqtt(m) => m.auth.iter_mut().map(|a| &mut a.secret_ref.name).collect(),
            Connection::ModbusTcp(_) | Connection::ModbusRtu(_) => Vec::new(),
        }
    }

    /// Where the gateway reaches out to the device, if it does (devices that connect to the
    /// gateway have none): the operator resolves the host name in the device's namespace.
    pub fn endpoint_mut(&mut self) -> Option<EndpointMut<'_>> {
        match self {
            Connection::ModbusTcp(c) => Some(EndpointMut::Host(&mut c.host)),
            Connection::Coap(c) => c.host.as_mut().map(EndpointMut::Host),
            Connection::Mqtt(m) => Some(EndpointMut::Url(&mut m.url)),
            Connection::ModbusRtu(c) => c.address.as_mut().map(EndpointMut::Address),
            Connection::Tcp(_) | Connection::Udp(_) => None,
        }
    }
}

/// One Secret reference of a device's connection.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ConnectionSecretRef<'a> {
    /// The reference's path below the connection, such as `coap.tokenSecretRef`.
    pub at: &'static str,
    /// Name of the Secret.
    pub name: &'a str,
    /// The key as the reference names it; `None` when it names none (the default applies, or
    /// the keys are fixed, as `username` and `password` of MQTT credentials).
    pub key: Option<&'a str>,
    /// Every key of the Secret the gateway reads.
    pub reads: Vec<&'a str>,
}

/// The device's end of a connection the gateway opens.
#[derive(Debug)]
pub enum EndpointMut<'a> {
    /// A host name or IP address.
    Host(&'a mut String),
    /// `host:port`.
    Address(&'a mut String),
    /// A broker URL.
    Url(&'a mut BrokerUrl),
}

/// Settings of a Modbus TCP connection.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ModbusTcpConnection {
    /// Host name or IP address of the device.
    pub host: String,
    /// TCP port (1-65535). Defaults to 502.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub port: Option<u16>,
    /// Modbus unit identifier (slave id). Defaults to 1.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub unit_id: Option<u8>,
    /// Deadline of each request, such as `500ms`. Defaults to `1s`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout: Option<HumanDuration>,
}

impl ModbusTcpConnection {
    /// Port when none is set.
    pub const DEFAULT_PORT: u16 = 502;
    /// Unit identifier when none is set.
    pub const DEFAULT_UNIT_ID: u8 = 1;
    /// Request deadline when none is set.
    pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(1);

    /// The TCP port, default applied.
    pub fn port(&self) -> u16 {
        self.port.unwrap_or(Self::DEFAULT_PORT)
    }

    /// The unit identifier, default applied.
    pub fn unit_id(&self) -> u8 {
        self.unit_id.unwrap_or(Self::DEFAULT_UNIT_ID)
    }

    /// The request deadline, default applied.
    pub fn timeout(&self) -> Duration {
        self.timeout.as_ref().map_or(Self::DEFAULT_TIMEOUT, HumanDuration::get)
    }
}

/// Settings of a CoAP device.
///
/// A device *pushes* with POST or PUT to the gateway's CoAP listener at `/{namespace}/{name}`
/// (or `pushPath`); the gateway answers a confirmable request only once the reading is in its
/// buffer. With `host` the gateway also reads the device's resource `path` every
/// `pollInterval`, or follows it with Observe (RFC 7641). Payloads are a JSON object (points
/// found by their `path`) or a plain number, `true`/`false` or text for a one-point resource.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct CoapConnection {
    /// Host name or IP address of the device, for polling or observing. Without it the
    /// device only pushes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host: Option<String>,
    /// UDP port of the device (1-65535). Defaults to 5683.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub port: Option<u16>,
    /// Resource the gateway reads, such as `/sensors/env`. Defaults to `/`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<String>,
    /// Follow the resource with Observe instead of polling it. Defaults to false.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observe: Option<bool>,
    /// Deadline of each request to the device, such as `2s`. Defaults to `2s`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout: Option<HumanDuration>,
    /// Path the device pushes to. Defaults to `/{namespace}/{name}`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub push_path: Option<String>,
    /// Secret key with the token a pushing device sends as the query `token=<value>`.
    /// Without it any push to the device's path is accepted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token_secret_ref: Option<DeviceSecretRef>,
    /// Largest payload accepted or fetched, block-wise transfers included (bytes, 16-1048576).
    /// Defaults to 16384.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 16, max = 1_048_576))]
    pub max_body_bytes: Option<u32>,
}

impl CoapConnection {
    /// UDP port of a device when none is set.
    pub const DEFAULT_PORT: u16 = 5683;
    /// Request deadline when none is set.
    pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(2);
    /// Largest payload when none is set.
    pub const DEFAULT_MAX_BODY_BYTES: u32 = 16 * 1024;

    /// The device's UDP port, default applied.
    pub fn port(&self) -> u16 {
        self.port.unwrap_or(Self::DEFAULT_PORT)
    }

    /// The request deadline, default applied.
    pub fn timeout(&self) -> Duration {
        self.timeout.as_ref().map_or(Self::DEFAULT_TIMEOUT, HumanDuration::get)
    }

    /// The largest payload in bytes, default applied.
    pub fn max_body_bytes(&self) -> usize {
        self.max_body_bytes.unwrap_or(Self::DEFAULT_MAX_BODY_BYTES) as usize
    }
}

/// Settings of a device publishing to a field MQTT broker.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct MqttDeviceConnection {
    /// The field broker: `mqtt://host:port`.
    pub url: BrokerUrl,
    /// Topic filters the device publishes to (wildcards allowed), such as `plant/th-1/#`.
    /// A JSON object payload gives every point found at its `path`; a plain value goes to
    /// the point named like the topic's last level (or to the only point).
    pub topics: Vec<String>,
    /// MQTT protocol version: 3 (3.1.1) or 5. Defaults to 3.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub protocol_version: Option<u8>,
    /// MQTT client identifier. Defaults to `fieldgate-{node}-{namespace}-{name}`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client_id: Option<String>,
    /// Username and password, from a Secret (keys `username` and `password`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub auth: Option<crate::uplink::MqttAuth>,
    /// Topic commands to the device are published to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub command_topic: Option<String>,
    /// Keep-alive interval, such as `30s`. Defaults to `30s`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub keep_alive: Option<HumanDuration>,
    /// Largest message payload turned into a reading, as a quantity such as `64Ki`
    /// (`1Ki`-`16Mi`). Defaults to `256Ki`. A larger message is acknowledged to the broker,
    /// dropped and counted (`too_large`); the device keeps flowing.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_message_bytes: Option<ByteSize>,
}

impl MqttDeviceConnection {
    /// Protocol version when none is set.
    pub const DEFAULT_PROTOCOL_VERSION: u8 = 3;
    /// Keep-alive interval when none is set.
    pub const DEFAULT_KEEP_ALIVE: Duration = Duration::from_secs(30);
    /// Largest message payload when none is set.
    pub const DEFAULT_MAX_MESSAGE_BYTES: u64 = 256 * 1024;
    /// The allowed range of `maxMessageBytes`.
    pub const MAX_MESSAGE_BYTES_RANGE: std::ops::RangeInclusive<u64> = 1024..=16 * 1024 * 1024;

    /// The protocol version, default applied.
    pub fn protocol_version(&self) -> u8 {
        self.protocol_version.unwrap_or(Self::DEFAULT_PROTOCOL_VERSION)
    }

    /// The keep-alive interval, default applied.
    pub fn keep_alive(&self) -> Duration {
        self.keep_alive.as_ref().map_or(Self::DEFAULT_KEEP_ALIVE, HumanDuration::get)
    }

    /// The largest message payload in bytes, default applied.
    pub fn max_message_bytes(&self) -> usize {
        let bytes = self.max_message_bytes.as_ref().map_or(Self::DEFAULT_MAX_MESSAGE_BYTES, ByteSize::bytes);
        usize::try_from(bytes).unwrap_or(usize::MAX)
    }
}

/// Settings of a raw TCP or UDP device.
///
/// Frames are lines of `key=value` pairs (`id=th-1 token=s3cret temp=21.5`) or JSON objects
/// (`{"id":"th-1","token":"s3cret","temp":21.5}`). On TCP the first frame must carry `id`
/// and `token` and later frames may omit them; every UDP datagram carries both.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RawConnection {
    /// The id the device sends. Defaults to `{namespace}/{name}`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
    /// Secret key with the token the device must send with its id.
    pub token_secret_ref: DeviceSecretRef,
}

/// Settings of a Modbus RTU device: a serial `port`, or an `address` of an RTU-over-TCP
/// gateway. Exactly one is set. Devices with the same port (or address) are one bus.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ModbusRtuConnection {
    /// Serial device of the node, such as `/dev/ttyUSB0`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port: Option<String>,
    /// `host:port` of a gateway carrying RTU frames over TCP.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub address: Option<String>,
    /// Unit identifier (slave address) on the bus, 1-247.
    #[schemars(range(min = 1, max = 247))]
    pub unit_id: u8,
    /// Line speed. Defaults to 9600.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub baud_rate: Option<u32>,
    /// Parity. Defaults to `none`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parity: Option<Parity>,
    /// Data bits, 7 or 8. Defaults to 8.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 7, max = 8))]
    pub data_bits: Option<u8>,
    /// Stop bits, 1 or 2. Defaults to 1.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 2))]
    pub stop_bits: Option<u8>,
    /// Deadline of each request, such as `500ms`. Defaults to `1s`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout: Option<HumanDuration>,
}

impl ModbusRtuConnection {
    /// Line speed when none is set.
    pub const DEFAULT_BAUD_RATE: u32 = 9600;
    /// Request deadline when none is set.
    pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(1);

    /// The line speed, default applied.
    pub fn baud_rate(&self) -> u32 {
        self.baud_rate.unwrap_or(Self::DEFAULT_BAUD_RATE)
    }

    /// The request deadline, default applied.
    pub fn timeout(&self) -> Duration {
        self.timeout.as_ref().map_or(Self::DEFAULT_TIMEOUT, HumanDuration::get)
    }
}

/// Parity of a serial line.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub enum Parity {
    /// No parity bit.
    #[default]
    None,
    /// Even parity.
    Even,
    /// Odd parity.
    Odd,
}

/// A key of a Secret in the device's namespace.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct DeviceSecretRef {
    /// Name of the Secret.
    pub name: String,
    /// Key within the Secret. Defaults to `token`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key: Option<String>,
}

impl DeviceSecretRef {
    /// The key when none is set.
    pub const DEFAULT_KEY: &'static str = "token";

    /// The key, default applied.
    pub fn key(&self) -> &str {
        self.key.as_deref().unwrap_or(Self::DEFAULT_KEY)
    }
}

/// Where a device is served.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, KubeSchema)]
#[x_kube(validation = Rule::new("!(has(self.nodeName) && has(self.nodeSelector))").message("set nodeName or nodeSelector, not both"))]
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
#[schemars(transform = crate::schema::kubernetes_formats)]
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
    /// The node the device was moved away from because that node was NotReady for longer
    /// than the operator's grace period. The device returns there only when the operator
    /// runs with `--fail-back`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub failed_over_from: Option<String>,
    /// `Configured` and `Ready` (written by the operator: ready = configured and reachable),
    /// `Reachable` (by the gateway of the node, with a reason such as `ConnectFailed` or
    /// `NeverConnected`), written on transitions only. Each writer owns its own entries
    /// (server-side apply). `kubectl get devices -o wide` shows Ready's message.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["type"]))]
    pub conditions: Vec<Condition>,
}

impl DeviceStatus {
    /// The condition of this type, if any.
    pub fn condition(&self, type_: &str) -> Option<&Condition> {
        self.conditions.iter().find(|c| c.type_ == type_)
    }
}
