//! `Uplink`: where a gateway forwards readings, and how much it may buffer meanwhile.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, LabelSelector};
use kube::{CustomResource, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use std::time::Duration;

use crate::device::DeviceSecretRef;
use crate::values::{BrokerUrl, ByteSize, HttpUrl, HumanDuration};

/// A cloud endpoint that receives the readings of the devices it selects.
#[derive(CustomResource, Clone, Debug, PartialEq, Serialize, Deserialize, KubeSchema)]
#[kube(
    group = "fieldgate.io",
    version = "v1alpha1",
    kind = "Uplink",
    plural = "uplinks",
    shortname = "fgu",
    category = "fieldgate",
    namespaced,
    status = "UplinkStatus",
    validation = Rule::new("has(self.spec.mqtt) != has(self.spec.http)").message("set exactly one of spec.mqtt or spec.http"),
    printcolumn = r#"{"name":"Broker","type":"string","jsonPath":".spec.mqtt.url"}"#,
    printcolumn = r#"{"name":"Endpoint","type":"string","jsonPath":".spec.http.url"}"#,
    printcolumn = r#"{"name":"Configured","type":"string","jsonPath":".status.conditions[?(@.type==\"Configured\")].status"}"#,
    printcolumn = r#"{"name":"Ready","type":"string","jsonPath":".status.conditions[?(@.type==\"Ready\")].status"}"#,
    printcolumn = r#"{"name":"Connected","type":"string","jsonPath":".status.gateways[*].connected"}"#,
    printcolumn = r#"{"name":"Backlog","type":"string","jsonPath":".status.gateways[*].backlogMessages"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#,
    printcolumn = r#"{"name":"Message","type":"string","priority":1,"description":"Why the object is (not) ready","jsonPath":".status.conditions[?(@.type==\"Ready\")].message"}"#
)]
#[x_kube(validation = Rule::new("!has(self.sparkplug) || (has(self.encoding) && self.encoding == 'sparkplugB')").message("sparkplug settings need encoding sparkplugB"))]
#[x_kube(validation = Rule::new("!has(self.encoding) || self.encoding != 'sparkplugB' || !has(self.compression) || self.compression == 'none'").message("sparkplugB messages are not compressed"))]
#[x_kube(validation = Rule::new("!has(self.encoding) || self.encoding != 'sparkplugB' || !has(self.mqtt.topic)").message("sparkplugB decides its own topics: leave mqtt.topic unset"))]
#[serde(rename_all = "camelCase")]
#[schemars(transform = crate::schema::kubernetes_formats)]
pub struct UplinkSpec {
    /// Devices of this namespace whose readings go to this uplink. Empty: every Device.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub device_selector: Option<LabelSelector>,
    /// An MQTT broker (3.1.1 or 5) receiving readings with QoS 1. Exactly one of `mqtt` and
    /// `http` is set.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mqtt: Option<MqttUplink>,
    /// An HTTP endpoint receiving batches of readings by POST. Exactly one of `mqtt` and
    /// `http` is set.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub http: Option<HttpUplink>,
    /// Encoding of each reading (MQTT: each message; HTTP: each request is a JSON array of
    /// readings, or a protobuf `fieldgate.v1.BufferEntry`). Defaults to `json`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub encoding: Option<Encoding>,
    /// Compression of each message, applied after encoding (not with `sparkplugB`). Defaults
    /// to `none`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub compression: Option<Compression>,
    /// Sparkplug B identity of the gateway; only with `encoding: sparkplugB`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sparkplug: Option<SparkplugSpec>,
    /// Limits of the local buffer that holds readings until the broker acknowledges them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub buffer: Option<BufferSpec>,
}

/// Connection to an MQTT broker.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, KubeSchema)]
#[x_kube(validation = Rule::new("!has(self.tls) || self.url.startsWith('mqtts://') || self.url.startsWith('ssl://')").message("tls needs an mqtts:// url"))]
#[x_kube(validation = Rule::new("!has(self.qos) || self.qos == 1").message("only QoS 1 is supported"))]
#[x_kube(validation = Rule::new("!has(self.protocolVersion) || self.protocolVersion == 3 || self.protocolVersion == 5").message("protocolVersion is 3 (3.1.1) or 5"))]
#[serde(rename_all = "camelCase")]
pub struct MqttUplink {
    /// Broker address: `mqtt://host:port` (plain) or `mqtts://host:port` (TLS).
    pub url: BrokerUrl,
    /// MQTT protocol version: 3 (3.1.1) or 5. Defaults to 5.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub protocol_version: Option<u8>,
    /// Topic of each reading; `{namespace}`, `{device}`, `{uplink}` and `{node}` are replaced.
    /// Defaults to `fieldgate/{namespace}/{device}/telemetry`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub topic: Option<String>,
    /// Topic template the gateway subscribes to for commands, such as
    /// `fieldgate/{namespace}/{device}/commands`. `{device}` must be a whole topic level: a
    /// command names its device in the topic, never in its message. `{namespace}`, where
    /// present, must be a whole level too and stands for this Uplink's own namespace (no other
    /// is subscribed to); `{uplink}` and `{node}` are replaced. Commands act only on Devices
    /// this Uplink selects. Results go to the command's topic followed by `/result`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub command_topic: Option<String>,
    /// Quality of service of each publish. Only 1 is accepted: QoS 0 cannot be confirmed
    /// and QoS 2 adds a round trip the message id already makes unnecessary.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub qos: Option<u8>,
    /// MQTT client identifier. Defaults to `fieldgate-{node}-{namespace}-{uplink}`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client_id: Option<String>,
    /// Keep-alive interval, such as `30s`. Defaults to `30s`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub keep_alive: Option<HumanDuration>,
    /// Publishes awaiting the broker's acknowledgement at once (1-65535). Defaults to 256.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub max_in_flight: Option<u16>,
    /// Username and password, from a Secret (keys `username` and `password`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub auth: Option<MqttAuth>,
    /// TLS settings; only with an `mqtts://` URL.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls: Option<MqttTls>,
}

impl MqttUplink {
    /// Topic template when none is set.
    pub const DEFAULT_TOPIC: &'static str = "fieldgate/{namespace}/{device}/telemetry";
    /// Protocol version when none is set.
    pub const DEFAULT_PROTOCOL_VERSION: u8 = 5;
    /// Keep-alive interval when none is set.
    pub const DEFAULT_KEEP_ALIVE: Duration = Duration::from_secs(30);
    /// Publishes awaiting acknowledgement when none is set.
    pub const DEFAULT_MAX_IN_FLIGHT: u16 = 256;

    /// The topic template, default applied.
    pub fn topic(&self) -> &str {
        self.topic.as_deref().unwrap_or(Self::DEFAULT_TOPIC)
    }

    /// The protocol version, default applied.
    pub fn protocol_version(&self) -> u8 {
        self.protocol_version.unwrap_or(Self::DEFAULT_PROTOCOL_VERSION)
    }

    /// The keep-alive interval, default applied.
    pub fn keep_alive(&self) -> Duration {
        self.keep_alive.as_ref().map_or(Self::DEFAULT_KEEP_ALIVE, HumanDuration::get)
    }

    /// Publishes awaiting acknowledgement, default applied.
    pub fn max_in_flight(&self) -> u16 {
        self.max_in_flight.unwrap_or(Self::DEFAULT_MAX_IN_FLIGHT)
    }
}

/// Connection to an HTTP endpoint that takes batches of readings.
///
/// Each request is a `POST` to `url` of up to `maxBatch` readings (at most `maxRequestBytes`):
/// a JSON array of reading envelopes (`Content-Type: application/json`) or, with `encoding:
/// protobuf`, a `fieldgate.v1.BufferEntry` (`application/x-protobuf`). A 2xx answer confirms
/// every reading of the request; 408, 429 and 5xx are transient (the readings go again after a
/// growing delay, or the answer's `Retry-After`); 401 and 403 stop the uplink and retry it with
/// a growing delay (nothing is dropped); any other 4xx refuses the request's readings for good
/// (dropped and counted `refused`).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, KubeSchema)]
#[x_kube(validation = Rule::new("!has(self.tls) || self.url.startsWith('https://')").message("tls needs an https:// url"))]
#[serde(rename_all = "camelCase")]
pub struct HttpUplink {
    /// Endpoint: `https://host[:port]/path` (TLS) or `http://host[:port]/path`.
    pub url: HttpUrl,
    /// Most readings in one request (1-10000). Defaults to 500.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 10000))]
    pub max_batch: Option<u32>,
    /// Largest request body, such as `1Mi` (4Ki-64Mi). Defaults to `1Mi`. A reading larger
    /// than this on its own is refused for good (counted `refused`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_request_bytes: Option<ByteSize>,
    /// Time one request may take, answer included, such as `10s` (100ms-5m). Defaults to
    /// `10s`. A request past it counts as a lost connection: its readings go again.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout: Option<HumanDuration>,
    /// Requests awaiting their answer at once (1-64). Defaults to 4.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 64))]
    pub max_in_flight: Option<u16>,
    /// A bearer token sent in `Authorization`, from a Secret.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub auth: Option<HttpAuth>,
    /// TLS settings; only with an `https://` URL.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls: Option<MqttTls>,
}

impl HttpUplink {
    /// Readings per request when none is set.
    pub const DEFAULT_MAX_BATCH: u32 = 500;
    /// Largest request body when none is set.
    pub const DEFAULT_MAX_REQUEST_BYTES: u64 = 1 << 20;
    /// Request timeout when none is set.
    pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(10);
    /// Requests in flight when none is set.
    pub const DEFAULT_MAX_IN_FLIGHT: u16 = 4;

    /// Most readings per request, default applied.
    pub fn max_batch(&self) -> u32 {
        self.max_batch.unwrap_or(Self::DEFAULT_MAX_BATCH)
    }

    /// Largest request body, default applied.
    pub fn max_request_bytes(&self) -> u64 {
        self.max_request_bytes.as_ref().map_or(Self::DEFAULT_MAX_REQUEST_BYTES, ByteSize::bytes)
    }

    /// Request timeout, default applied.
    pub fn timeout(&self) -> Duration {
        self.timeout.as_ref().map_or(Self::DEFAULT_TIMEOUT, HumanDuration::get)
    }

    /// Requests in flight, default applied.
    pub fn max_in_flight(&self) -> u16 {
        self.max_in_flight.unwrap_or(Self::DEFAULT_MAX_IN_FLIGHT)
    }
}

/// The bearer token of an HTTP endpoint. Never inline: always a Secret reference.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct HttpAuth {
    /// Secret in the Uplink's namespace holding the token (key `token` unless set).
    pub token_secret_ref: DeviceSecretRef,
}

/// Credentials for the broker. Never inline: always a Secret reference.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct MqttAuth {
    /// Secret in the Uplink's namespace with the keys `username` and `password`.
    pub secret_ref: SecretRef,
}

/// TLS settings of a connection to the cloud (an MQTT broker or an HTTP endpoint).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct MqttTls {
    /// Secret with the CA bundle (key `ca.crt`) that signed the server's certificate.
    /// Without it the trust roots of the gateway's operating system are used.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca_secret_ref: Option<SecretKeyRef>,
    /// Secret of type kubernetes.io/tls (keys `tls.crt`, `tls.key`) for client authentication.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client_cert_secret_ref: Option<SecretRef>,
}

/// A reference to a Secret in the same namespace.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct SecretRef {
    /// Name of the Secret.
    pub name: String,
}

/// A reference to one key of a Secret in the same namespace.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct SecretKeyRef {
    /// Name of the Secret.
    pub name: String,
    /// Key within the Secret. Defaults to `ca.crt`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key: Option<String>,
}

impl SecretKeyRef {
    /// The key when none is set.
    pub const DEFAULT_KEY: &'static str = "ca.crt";

    /// The key, default applied.
    pub fn key(&self) -> &str {
        self.key.as_deref().unwrap_or(Self::DEFAULT_KEY)
    }
}

/// Encoding of the messages sent to the cloud (schemas: `proto/fieldgate/v1/`; what each costs
/// and how a consumer decodes it: `docs/encodings.md`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub enum Encoding {
    /// The reading envelope as a JSON object, each point as `{"name", "value", "unit"}`
    /// (`proto/fieldgate/v1/reading.schema.json`).
    #[default]
    Json,
    /// The reading envelope as a JSON object with the points as one object `{"name": value}`,
    /// without units (`proto/fieldgate/v1/compact-reading.schema.json`).
    JsonCompact,
    /// The reading envelope as a protobuf `fieldgate.v1.Reading`.
    Protobuf,
    /// A protobuf `fieldgate.v1.CompactReading`: point names, kinds and units interned in a
    /// per-device table sent now and then, so that each point costs only its value.
    ProtobufCompact,
    /// Sparkplug B (Eclipse Tahu's `sparkplug_b.proto`): the gateway is a Sparkplug edge node
    /// with NBIRTH/NDEATH (the MQTT will), each device a Sparkplug device with DBIRTH and DDATA
    /// carrying metric aliases; topics are `spBv1.0/{groupId}/{type}/{edgeNodeId}/{device}`.
    SparkplugB,
}

impl Encoding {
    /// The name used in configs.
    pub fn as_str(self) -> &'static str {
        match self {
            Encoding::Json => "json",
            Encoding::JsonCompact => "jsonCompact",
            Encoding::Protobuf => "protobuf",
            Encoding::ProtobufCompact => "protobufCompact",
            Encoding::SparkplugB => "sparkplugB",
        }
    }

    /// Every encoding, in documentation order.
    pub const ALL: [Encoding; 5] =
        [Encoding::Json, Encoding::JsonCompact, Encoding::Protobuf, Encoding::ProtobufCompact, Encoding::SparkplugB];
}

/// Compression of each message, after encoding. A message is sent uncompressed when
/// compressing would not make it smaller; each message says how it is compressed (MQTT 5: the
/// user property `content-encoding`; MQTT 3.1.1: its first bytes, see `docs/encodings.md`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub enum Compression {
    /// Messages are sent as encoded.
    #[default]
    None,
    /// gzip (RFC 1952).
    Gzip,
    /// Zstandard (RFC 8878).
    Zstd,
}

impl Compression {
    /// The name used in configs and in the `content-encoding` user property.
    pub fn as_str(self) -> &'static str {
        match self {
            Compression::None => "none",
            Compression::Gzip => "gzip",
            Compression::Zstd => "zstd",
        }
    }
}

/// The Sparkplug B identity an uplink publishes under. Both ids may use the placeholders
/// `{namespace}`, `{uplink}` and `{node}`; a rendered id must not contain `/`, `+` or `#`.
/// Each (group, edge node) pair must be unique on a broker: two uplinks of one namespace to the
/// same broker need different ids.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct SparkplugSpec {
    /// Sparkplug group id. Defaults to `{namespace}`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub group_id: Option<String>,
    /// Sparkplug edge node id. Defaults to `{node}`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub edge_node_id: Option<String>,
}

impl SparkplugSpec {
    /// Group id template when none is set.
    pub const DEFAULT_GROUP_ID: &'static str = "{namespace}";
    /// Edge node id template when none is set.
    pub const DEFAULT_EDGE_NODE_ID: &'static str = "{node}";

    /// The group id template, default applied.
    pub fn group_id(&self) -> &str {
        self.group_id.as_deref().unwrap_or(Self::DEFAULT_GROUP_ID)
    }

    /// The edge node id template, default applied.
    pub fn edge_node_id(&self) -> &str {
        self.edge_node_id.as_deref().unwrap_or(Self::DEFAULT_EDGE_NODE_ID)
    }
}

/// Limits of an uplink's local buffer (a JetStream stream on the node's disk).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct BufferSpec {
    /// Most bytes kept, as a quantity such as `512Mi` or `1Gi` (at least `64Ki`). Defaults to `1Gi`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_bytes: Option<ByteSize>,
    /// Oldest reading kept, such as `72h` (at least `1s`). Defaults to `72h`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_age: Option<HumanDuration>,
    /// What happens when the buffer is full. Defaults to `dropOldest`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub on_full: Option<OnFull>,
    /// Time after which a reading sent but not acknowledged by the broker is sent again,
    /// such as `30s` (at least `100ms`). Defaults to `30s`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub redeliver_after: Option<HumanDuration>,
    /// How long a reading may wait for others to be stored with it in one buffer entry, such
    /// as `10ms` (`0s` to `1s`). Defaults to `2ms`. A longer linger stores fewer, larger
    /// entries, which costs the gateway and nats-server less CPU per reading (each entry is a
    /// disk write and an fsync, a delivery and an acknowledgement), and adds up to that much
    /// latency. An entry stops waiting early once no reading arrived for a quarter of the
    /// linger (the readings of one poll slot come together). With `0s` an entry is stored as
    /// soon as the one before it is, with every reading that arrived meanwhile.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub linger: Option<HumanDuration>,
}

impl BufferSpec {
    /// Longest linger accepted.
    pub const MAX_LINGER: Duration = Duration::from_secs(1);

    /// Most bytes kept when none is set.
    pub const DEFAULT_MAX_BYTES: u64 = 1 << 30;
    /// Oldest reading kept when none is set.
    pub const DEFAULT_MAX_AGE: Duration = Duration::from_secs(72 * 3600);
    /// Redelivery time when none is set.
    pub const DEFAULT_REDELIVER_AFTER: Duration = Duration::from_secs(30);
    /// Linger when none is set: long enough for the readings that arrive together (one poll
    /// slot, a burst of MQTT messages) to share an entry, short against the 10 ms a reading
    /// may take to reach the cloud.
    pub const DEFAULT_LINGER: Duration = Duration::from_millis(2);

    /// Most bytes kept, default applied.
    pub fn max_bytes(&self) -> u64 {
        self.max_bytes.as_ref().map_or(Self::DEFAULT_MAX_BYTES, ByteSize::bytes)
    }

    /// Oldest reading kept, default applied.
    pub fn max_age(&self) -> Duration {
        self.max_age.as_ref().map_or(Self::DEFAULT_MAX_AGE, HumanDuration::get)
    }

    /// The full-buffer policy, default applied.
    pub fn on_full(&self) -> OnFull {
        self.on_full.unwrap_or_default()
    }

    /// Redelivery time, default applied.
    pub fn redeliver_after(&self) -> Duration {
        self.redeliver_after.as_ref().map_or(Self::DEFAULT_REDELIVER_AFTER, HumanDuration::get)
    }

    /// Linger, default applied.
    pub fn linger(&self) -> Duration {
        self.linger.as_ref().map_or(Self::DEFAULT_LINGER, HumanDuration::get)
    }
}

/// Policy of a full buffer. Every dropped reading is counted with its reason.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub enum OnFull {
    /// Evict the oldest unsent readings to make room for new ones.
    #[default]
    DropOldest,
    /// Keep the unsent readings and refuse new ones.
    RejectNew,
}

/// Observed state of an Uplink: health and counters only.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
#[schemars(transform = crate::schema::kubernetes_formats)]
pub struct UplinkStatus {
    /// The `metadata.generation` this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// `Configured` and `Ready` (both written by the operator, on transitions only: ready =
    /// configured and connected to the broker on every node that runs it, as `gateways`
    /// says). `kubectl get uplinks -o wide` shows Ready's message.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["type"]))]
    pub conditions: Vec<Condition>,
    /// One entry per gateway node running this uplink, written by that node's gateway.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["node"]))]
    pub gateways: Vec<UplinkGatewayStatus>,
}

impl UplinkStatus {
    /// The condition of this type, if any.
    pub fn condition(&self, type_: &str) -> Option<&Condition> {
        self.conditions.iter().find(|c| c.type_ == type_)
    }
}

/// How one gateway node's connection to the broker is doing. Counters and health only.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct UplinkGatewayStatus {
    /// The gateway node.
    pub node: String,
    /// Whether the gateway is connected to the broker.
    #[serde(default)]
    pub connected: bool,
    /// Readings buffered on the node and not yet acknowledged by the broker.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backlog_messages: Option<u64>,
    /// Age of the oldest unsent reading, such as `0s` or `5m`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub oldest_unsent_age: Option<String>,
    /// When the broker last acknowledged a reading (RFC 3339).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_ack_time: Option<String>,
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[test]
    fn an_unset_linger_is_two_milliseconds_and_an_explicit_zero_stays_zero() {
        assert_eq!(BufferSpec::default().linger(), Duration::from_millis(2));
        let none = BufferSpec { linger: Some("0s".parse().unwrap()), ..Default::default() };
        assert_eq!(none.linger(), Duration::ZERO);
        let ten = BufferSpec { linger: Some("10ms".parse().unwrap()), ..Default::default() };
        assert_eq!(ten.linger(), Duration::from_millis(10));
    }
}
