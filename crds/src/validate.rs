//! Semantic checks shared by the operator and the gateway: what a schema cannot say (relations
//! between fields, names, references, minimum durations). Structure, types, numeric ranges and
//! the grammar of text values are the schema's ([`crate::schema`]).
//!
//! Every check reports the field path of the value it refuses, and a validation reports every
//! problem it finds, not just the first.

use std::collections::BTreeSet;
use std::fmt;
use std::time::Duration;

use crate::device::{Connection, DeviceProfileSpec, DeviceSpec, ModbusTcpConnection};
use crate::gateway_config::{GatewayConfig, GatewayDevice, GatewayUplink};
use crate::point::{Access, Point, ValueType};
use crate::uplink::{BufferSpec, Compression, Encoding, HttpUplink, MqttTls, MqttUplink, SparkplugSpec, UplinkSpec};
use crate::values::HumanDuration;

/// One refused value: where it is and what is wrong with it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FieldError {
    /// Path of the field, such as `devices[2].connection.modbusTcp.port`.
    pub path: String,
    /// What is wrong, as a sentence fragment.
    pub message: String,
}

impl fmt::Display for FieldError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.path, self.message)
    }
}

/// All problems found in one object.
#[derive(Clone, Debug, Default, PartialEq, Eq, thiserror::Error)]
pub struct ValidationErrors(pub Vec<FieldError>);

impl fmt::Display for ValidationErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let n = self.0.len();
        write!(f, "{n} invalid field{}", if n == 1 { "" } else { "s" })?;
        for e in &self.0 {
            write!(f, "\n  {e}")?;
        }
        Ok(())
    }
}

impl ValidationErrors {
    /// Records one problem.
    pub fn push(&mut self, path: impl Into<String>, message: impl Into<String>) {
        self.0.push(FieldError { path: path.into(), message: message.into() });
    }

    /// `Ok` when no problem was recorded.
    pub fn into_result(self) -> Result<(), ValidationErrors> {
        if self.0.is_empty() { Ok(()) } else { Err(self) }
    }
}

/// Parses a duration such as `500ms`, `1s`, `2m30s` or `72h` (the grammar of
/// [`HumanDuration`]), for durations that arrive outside a config document.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    HumanDuration::parse(text).map(|d| d.get()).map_err(|e| e.to_string())
}

/// Smallest poll interval accepted.
pub const MIN_POLL_INTERVAL: Duration = Duration::from_millis(10);

/// Placeholders a topic template may contain.
pub const TOPIC_PLACEHOLDERS: [&str; 4] = ["namespace", "device", "uplink", "node"];

fn check_duration(
    errs: &mut ValidationErrors,
    path: &str,
    value: Option<&HumanDuration>,
    min: Duration,
) -> Option<Duration> {
    let d = value?;
    if d.get() < min {
        errs.push(path, format!("{:?} is shorter than the minimum {}", d.as_str(), HumanDuration::from(min)));
        return None;
    }
    Some(d.get())
}

/// Whether `name` is a DNS-1123 subdomain (the rule for object names).
pub fn is_dns_subdomain(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 253
        && name.split('.').all(|label| {
            !label.is_empty()
                && label.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
                && !label.starts_with('-')
                && !label.ends_with('-')
        })
}

/// Whether `name` is a DNS-1123 label (the rule for namespaces).
pub fn is_dns_label(name: &str) -> bool {
    name.len() <= 63 && !name.contains('.') && is_dns_subdomain(name)
}

/// Checks a list of points as one device will use it.
pub fn validate_points(errs: &mut ValidationErrors, path: &str, points: &[Point], modbus: bool) {
    let mut names = BTreeSet::new();
    for (i, p) in points.iter().enumerate() {
        let at = format!("{path}[{i}]");
        if p.name.is_empty() {
            errs.push(format!("{at}.name"), "must not be empty");
        } else if !names.insert(p.name.as_str()) {
            errs.push(format!("{at}.name"), format!("duplicate point name {:?}", p.name));
        }
        if p.is_scaled() && !p.value_type.is_numeric() {
            errs.push(format!("{at}.scale"), format!("scale and offset apply to numbers, not to {:?}", p.value_type));
        }
        for (field, v) in [("scale", p.scale), ("offset", p.offset)] {
            if v.is_some_and(|v| !v.is_finite()) {
                errs.push(format!("{at}.{field}"), "must be a finite number");
            }
        }
        if p.scale == Some(0.0) {
            errs.push(format!("{at}.scale"), "must not be 0");
        }
        if p.path.as_deref().is_some_and(|s| s.is_empty() || s.split('.').any(str::is_empty)) {
            errs.push(format!("{at}.path"), "must be a dotted path such as env.temp");
        }
        validate_report(errs, &at, p);
        if !modbus {
            continue;
        }
        validate_modbus_point(errs, &at, p);
    }
}

/// Checks where a point lives on a Modbus device (`at` is the point's path).
pub fn validate_modbus_point(errs: &mut ValidationErrors, at: &str, p: &Point) {
    let Some(m) = &p.modbus else {
        errs.push(format!("{at}.modbus"), "required for a Modbus device");
        return;
    };
    let mat = format!("{at}.modbus");
    if !m.table.is_register() && p.value_type != ValueType::Bool {
        errs.push(format!("{at}.type"), format!("a {:?} table holds single bits: type must be bool", m.table));
    }
    if !m.table.is_writable() && p.access == Access::ReadWrite {
        errs.push(format!("{at}.access"), format!("the {:?} table is read-only", m.table));
    }
    match (p.value_type, m.length) {
        (ValueType::String, None) => {
            errs.push(format!("{mat}.length"), "a string point needs a length of 1-125 registers")
        }
        (t, Some(_)) if t != ValueType::String => {
            errs.push(format!("{mat}.length"), "only string points have a length")
        }
        _ => {}
    }
    if m.bit.is_some() && (p.value_type != ValueType::Bool || !m.table.is_register()) {
        errs.push(format!("{mat}.bit"), "only a bool point in a register table has a bit");
    }
    if m.word_order.is_some() && p.value_type.registers().unwrap_or(0) < 2 {
        errs.push(format!("{mat}.wordOrder"), "only values of 2 or 4 registers have a word order");
    }
    let end = u32::from(m.address) + u32::from(m.span(p.value_type));
    if end > 65_536 {
        errs.push(format!("{mat}.address"), format!("the value runs past the last address 65535 (ends at {end})"));
    }
}

fn validate_modbus_tcp(errs: &mut ValidationErrors, path: &str, c: &ModbusTcpConnection) {
    if c.host.trim().is_empty() {
        errs.push(format!("{path}.host"), "must not be empty");
    }
    check_duration(errs, &format!("{path}.timeout"), c.timeout.as_ref(), Duration::from_millis(1));
}

/// Which names a device's Secret reference may carry.
#[derive(Clone, Copy)]
enum SecretNames {
    /// A Device object's: the name of a Secret in its namespace.
    Object,
    /// A GatewayConfig's: a Secret name (standalone), or the per-node name
    /// `<namespace>_<secret>` the operator renders ([`crate::node_objects::secret_dir`]).
    Config,
}

fn validate_connection(errs: &mut ValidationErrors, path: &str, c: &Connection, names: SecretNames) {
    match c {
        Connection::ModbusTcp(m) => validate_modbus_tcp(errs, &format!("{path}.modbusTcp"), m),
        Connection::Coap(c) => validate_coap(errs, &format!("{path}.coap"), c),
        Connection::Mqtt(m) => validate_mqtt_device(errs, &format!("{path}.mqtt"), m),
        Connection::Tcp(r) => validate_raw(errs, &format!("{path}.tcp"), r),
        Connection::Udp(r) => validate_raw(errs, &format!("{path}.udp"), r),
        Connection::ModbusRtu(m) => validate_modbus_rtu(errs, &format!("{path}.modbusRtu"), m),
    }
    // Every protocol's Secret references, one way.
    for r in c.secret_refs() {
        validate_secret_ref(errs, &format!("{path}.{}", r.at), r.name, r.key, names);
    }
}

fn validate_modbus_rtu(errs: &mut ValidationErrors, path: &str, c: &crate::device::ModbusRtuConnection) {
    match (&c.port, &c.address) {
        (Some(_), Some(_)) | (None, None) => {
            errs.push(path, "set exactly one of port (serial) and address (RTU over TCP)")
        }
        (Some(p), None) if !p.starts_with('/') => {
            errs.push(format!("{path}.port"), format!("{p:?} is not a device path such as /dev/ttyUSB0"))
        }
        (None, Some(a))
            if a.rsplit_once(':').is_none_or(|(h, p)| h.is_empty() || p.parse::<u16>().map_or(true, |p| p == 0)) =>
        {
            errs.push(format!("{path}.address"), format!("{a:?} is not host:port"))
        }
        _ => {}
    }
    check_duration(errs, &format!("{path}.timeout"), c.timeout.as_ref(), Duration::from_millis(1));
}

/// Whether `key` is a key of a Secret's data: `[-._a-zA-Z0-9]+`, at most 253 characters, not
/// `.` or `..` (the Kubernetes rule; it also keeps a key a plain file name).
pub fn is_secret_key(key: &str) -> bool {
    !key.is_empty()
        && key.len() <= 253
        && key != "."
        && key != ".."
        && key.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_'))
}

/// Checks one Secret reference — every kind of them (device tokens, broker credentials, CA
/// bundles, client certificates) the same way. `path` is the reference's own path.
fn validate_secret_ref(errs: &mut ValidationErrors, path: &str, name: &str, key: Option<&str>, names: SecretNames) {
    let rendered = || crate::node_objects::split_secret_dir(name).is_some();
    let valid = match names {
        SecretNames::Object => is_dns_subdomain(name),
        SecretNames::Config => is_dns_subdomain(name) || rendered(),
    };
    if !valid {
        errs.push(format!("{path}.name"), format!("{name:?} is not a Secret name (a DNS-1123 subdomain)"));
    }
    if let Some(key) = key
        && !is_secret_key(key)
    {
        errs.push(format!("{path}.key"), format!("{key:?} is not a Secret key ([-._a-zA-Z0-9]+, not . or ..)"));
    }
}

fn validate_auth(errs: &mut ValidationErrors, path: &str, auth: Option<&crate::uplink::MqttAuth>, names: SecretNames) {
    if let Some(a) = auth {
        validate_secret_ref(errs, &format!("{path}.auth.secretRef"), &a.secret_ref.name, None, names);
    }
}

fn validate_coap(errs: &mut ValidationErrors, path: &str, c: &crate::device::CoapConnection) {
    if c.host.as_deref().is_some_and(|h| h.trim().is_empty()) {
        errs.push(format!("{path}.host"), "must not be empty");
    }
    for (field, p) in [("path", &c.path), ("pushPath", &c.push_path)] {
        if let Some(p) = p
            && (!p.starts_with('/') || p.contains(['?', '#']))
        {
            errs.push(format!("{path}.{field}"), format!("{p:?} is not an absolute path such as /sensors/env"));
        }
    }
    if c.host.is_none() && (c.path.is_some() || c.observe.is_some()) {
        errs.push(format!("{path}.host"), "path and observe need the device's host");
    }
    check_duration(errs, &format!("{path}.timeout"), c.timeout.as_ref(), Duration::from_millis(1));
}

fn validate_mqtt_device(errs: &mut ValidationErrors, path: &str, m: &crate::device::MqttDeviceConnection) {
    if m.url.tls() {
        errs.push(
            format!("{path}.url"),
            format!("{:?}: TLS to a field broker is not supported (use mqtt://)", m.url.as_str()),
        );
    }
    if let Some(max) = &m.max_message_bytes
        && !crate::device::MqttDeviceConnection::MAX_MESSAGE_BYTES_RANGE.contains(&max.bytes())
    {
        errs.push(format!("{path}.maxMessageBytes"), format!("{:?} is out of range 1Ki-16Mi", max.as_str()));
    }
    if m.topics.is_empty() {
        errs.push(format!("{path}.topics"), "needs at least one topic filter");
    }
    for (i, t) in m.topics.iter().enumerate() {
        let bad_hash = t.find('#').is_some_and(|at| at + 1 != t.len() || (at > 0 && !t[..at].ends_with('/')));
        let bad_plus = t.split('/').any(|level| level.contains('+') && level != "+");
        if t.is_empty() || bad_hash || bad_plus {
            errs.push(format!("{path}.topics[{i}]"), format!("{t:?} is not a valid MQTT topic filter"));
        }
    }
    if let Some(t) = &m.command_topic
        && (t.is_empty() || t.contains(['#', '+']))
    {
        errs.push(format!("{path}.commandTopic"), format!("{t:?} must be a topic without wildcards"));
    }
    if let Some(v) = m.protocol_version
        && v != 3
        && v != 5
    {
        errs.push(format!("{path}.protocolVersion"), format!("{v} is not 3 (3.1.1) or 5"));
    }
    check_duration(errs, &format!("{path}.keepAlive"), m.keep_alive.as_ref(), Duration::from_secs(1));
}

fn validate_raw(errs: &mut ValidationErrors, path: &str, r: &crate::device::RawConnection) {
    if let Some(id) = &r.id
        && (id.is_empty() || id.len() > 128 || id.contains(|c: char| c.is_whitespace() || c.is_control()))
    {
        errs.push(format!("{path}.id"), format!("{id:?} must be 1-128 characters without spaces"));
    }
}

/// Checks the reporting rule of a point (`at` is the point's path).
fn validate_report(errs: &mut ValidationErrors, at: &str, p: &Point) {
    let Some(r) = &p.report else { return };
    if let Some(d) = r.deadband {
        if !d.is_finite() || d < 0.0 {
            errs.push(format!("{at}.report.deadband"), "must be a finite number >= 0");
        } else if d > 0.0 && !p.value_type.is_numeric() {
            errs.push(format!("{at}.report.deadband"), "a deadband applies to numbers only");
        }
    }
    let max =
        check_duration(errs, &format!("{at}.report.maxInterval"), r.max_interval.as_ref(), Duration::from_millis(1));
    let sampling =
        check_duration(errs, &format!("{at}.report.sampling"), r.sampling.as_ref(), Duration::from_millis(1));
    if let (Some(max), Some(sampling)) = (max, sampling)
        && sampling > max
    {
        errs.push(format!("{at}.report.sampling"), "must not be longer than maxInterval");
    }
}

/// Checks a topic template: no wildcards, known placeholders only.
pub fn validate_topic(errs: &mut ValidationErrors, path: &str, topic: &str) {
    if topic.is_empty() {
        errs.push(path, "must not be empty");
        return;
    }
    if topic.contains(['#', '+']) {
        errs.push(path, format!("{topic:?} contains an MQTT wildcard"));
    }
    let mut rest = topic;
    while let Some(open) = rest.find('{') {
        let Some(close) = rest[open..].find('}') else {
            errs.push(path, format!("{topic:?} has an unclosed '{{'"));
            return;
        };
        let name = &rest[open + 1..open + close];
        if !TOPIC_PLACEHOLDERS.contains(&name) {
            errs.push(
                path,
                format!("unknown placeholder {{{name}}} (known: {{namespace}}, {{device}}, {{uplink}}, {{node}})"),
            );
        }
        rest = &rest[open + close + 1..];
    }
}

/// A command topic template: a topic template in which `{device}` is a whole level (the
/// device a command is for comes from the topic, never from the message), as is
/// `{namespace}` where present.
pub fn validate_command_topic(errs: &mut ValidationErrors, path: &str, topic: &str) {
    validate_topic(errs, path, topic);
    let levels: Vec<&str> = topic.split('/').collect();
    for placeholder in ["{device}", "{namespace}"] {
        if topic.contains(placeholder) && !levels.contains(&placeholder) {
            errs.push(path, format!("{placeholder} must be a whole topic level in {topic:?}"));
        }
    }
    if !levels.contains(&"{device}") {
        errs.push(path, format!("{topic:?} needs a {{device}} level: commands name their device in the topic"));
    }
}

fn validate_mqtt(errs: &mut ValidationErrors, path: &str, m: &MqttUplink, names: SecretNames) {
    if let Some(v) = m.protocol_version
        && v != 3
        && v != 5
    {
        errs.push(format!("{path}.protocolVersion"), format!("{v} is not 3 (3.1.1) or 5"));
    }
    if let Some(q) = m.qos
        && q != 1
    {
        errs.push(
            format!("{path}.qos"),
            format!("{q} is not supported: readings are published with QoS 1 and acknowledged"),
        );
    }
    if let Some(t) = &m.topic {
        validate_topic(errs, &format!("{path}.topic"), t);
    }
    if let Some(t) = &m.command_topic {
        validate_command_topic(errs, &format!("{path}.commandTopic"), t);
    }
    check_duration(errs, &format!("{path}.keepAlive"), m.keep_alive.as_ref(), Duration::from_secs(1));
    validate_auth(errs, path, m.auth.as_ref(), names);
    if let Some(tls) = &m.tls {
        if !m.url.tls() {
            errs.push(format!("{path}.tls"), "TLS settings need an mqtts:// URL");
        }
        validate_tls(errs, &format!("{path}.tls"), tls, names);
    }
}

fn validate_tls(errs: &mut ValidationErrors, path: &str, tls: &MqttTls, names: SecretNames) {
    if let Some(r) = &tls.ca_secret_ref {
        validate_secret_ref(errs, &format!("{path}.caSecretRef"), &r.name, r.key.as_deref(), names);
    }
    if let Some(r) = &tls.client_cert_secret_ref {
        validate_secret_ref(errs, &format!("{path}.clientCertSecretRef"), &r.name, None, names);
    }
}

/// Smallest and largest HTTP request body accepted.
pub const HTTP_REQUEST_BYTES: std::ops::RangeInclusive<u64> = 4 * 1024..=64 * 1024 * 1024;

fn validate_http(errs: &mut ValidationErrors, path: &str, h: &HttpUplink, names: SecretNames) {
    if let Some(max) = &h.max_request_bytes
        && !HTTP_REQUEST_BYTES.contains(&max.bytes())
    {
        errs.push(format!("{path}.maxRequestBytes"), format!("{:?} is out of range 4Ki-64Mi", max.as_str()));
    }
    if let Some(t) = check_duration(errs, &format!("{path}.timeout"), h.timeout.as_ref(), Duration::from_millis(100))
        && t > Duration::from_secs(300)
    {
        errs.push(format!("{path}.timeout"), format!("{:?} is longer than the maximum 5m", h.timeout().as_secs()));
    }
    if let Some(a) = &h.auth {
        let r = &a.token_secret_ref;
        validate_secret_ref(errs, &format!("{path}.auth.tokenSecretRef"), &r.name, r.key.as_deref(), names);
    }
    if let Some(tls) = &h.tls {
        if !h.url.tls() {
            errs.push(format!("{path}.tls"), "TLS settings need an https:// URL");
        }
        validate_tls(errs, &format!("{path}.tls"), tls, names);
    }
}

/// Exactly one of an uplink's kinds, each checked.
fn validate_target(
    errs: &mut ValidationErrors,
    path: &str,
    mqtt: Option<&MqttUplink>,
    http: Option<&HttpUplink>,
    names: SecretNames,
) {
    match (mqtt, http) {
        (Some(m), None) => validate_mqtt(errs, &format!("{path}.mqtt"), m, names),
        (None, Some(h)) => validate_http(errs, &format!("{path}.http"), h, names),
        (Some(_), Some(_)) => errs.push(path, "set exactly one of mqtt or http, not both"),
        (None, None) => errs.push(path, "set exactly one of mqtt or http"),
    }
}

/// Placeholders a Sparkplug group or edge node id may use.
const SPARKPLUG_PLACEHOLDERS: [&str; 3] = ["namespace", "uplink", "node"];

/// Checks how an uplink encodes its messages: compression and Sparkplug settings only where
/// they apply, and Sparkplug ids that make valid topic levels. `path` is the uplink's.
fn validate_encoding(
    errs: &mut ValidationErrors,
    path: &str,
    encoding: Option<Encoding>,
    compression: Option<Compression>,
    sparkplug: Option<&SparkplugSpec>,
    mqtt: Option<&MqttUplink>,
) {
    let sparkplug_b = encoding == Some(Encoding::SparkplugB);
    if mqtt.is_none() {
        // An HTTP uplink sends batches: a JSON array or a protobuf BufferEntry.
        if let Some(e) = encoding
            && !matches!(e, Encoding::Json | Encoding::Protobuf)
        {
            errs.push(
                format!("{path}.encoding"),
                format!("{:?} is not for an HTTP uplink: use json or protobuf", e.as_str()),
            );
        }
        if compression.is_some_and(|c| c != Compression::None) {
            errs.push(format!("{path}.compression"), "not with an HTTP uplink");
        }
        if sparkplug.is_some() {
            errs.push(format!("{path}.sparkplug"), "only with encoding sparkplugB on an MQTT uplink");
        }
        return;
    }
    if sparkplug_b {
        if compression.is_some_and(|c| c != Compression::None) {
            errs.push(
                format!("{path}.compression"),
                "not with encoding sparkplugB: Sparkplug hosts read plain Sparkplug B payloads",
            );
        }
        if mqtt.is_some_and(|m| m.topic.is_some()) {
            errs.push(
                format!("{path}.mqtt.topic"),
                "not used with encoding sparkplugB: topics are spBv1.0/{groupId}/{type}/{edgeNodeId}/{device}",
            );
        }
    } else if sparkplug.is_some() {
        errs.push(format!("{path}.sparkplug"), "only with encoding sparkplugB");
    }
    let Some(s) = sparkplug else { return };
    for (field, id) in [("groupId", &s.group_id), ("edgeNodeId", &s.edge_node_id)] {
        let Some(id) = id else { continue };
        let at = format!("{path}.sparkplug.{field}");
        if id.is_empty() {
            errs.push(at, "must not be empty");
            continue;
        }
        if id.contains(['/', '+', '#']) {
            errs.push(at.clone(), format!("{id:?} contains '/', '+' or '#', which a Sparkplug id cannot"));
        }
        let mut rest = id.as_str();
        while let Some(open) = rest.find('{') {
            let Some(close) = rest[open..].find('}') else {
                errs.push(at.clone(), format!("{id:?} has an unclosed '{{'"));
                break;
            };
            let name = &rest[open + 1..open + close];
            if !SPARKPLUG_PLACEHOLDERS.contains(&name) {
                errs.push(
                    at.clone(),
                    format!("unknown placeholder {{{name}}} (known: {{namespace}}, {{uplink}}, {{node}})"),
                );
            }
            rest = &rest[open + close + 1..];
        }
    }
}

/// Smallest buffer accepted.
pub const MIN_BUFFER_BYTES: u64 = 64 * 1024;

fn validate_buffer(errs: &mut ValidationErrors, path: &str, b: &BufferSpec) {
    // JetStream keeps the limit as an i64.
    if let Some(max) = &b.max_bytes
        && !(MIN_BUFFER_BYTES..=i64::MAX as u64).contains(&max.bytes())
    {
        errs.push(format!("{path}.maxBytes"), format!("{:?} is out of range 64Ki-8Ei", max.as_str()));
    }
    check_duration(errs, &format!("{path}.maxAge"), b.max_age.as_ref(), Duration::from_secs(1));
    check_duration(errs, &format!("{path}.redeliverAfter"), b.redeliver_after.as_ref(), Duration::from_millis(100));
    if let Some(l) = &b.linger
        && l.get() > BufferSpec::MAX_LINGER
    {
        errs.push(format!("{path}.linger"), format!("{:?} is out of range 0s-1s", l.as_str()));
    }
}

/// Checks a typed value against the strict schema of its type: what the types alone cannot
/// hold (numeric ranges), for values that did not come through a schema check (built in code,
/// or stored under an older CRD). Paths start at `prefix`.
fn check_schema<T: serde::Serialize>(
    errs: &mut ValidationErrors,
    schema: &crate::schema::DocumentSchema,
    prefix: &str,
    value: &T,
) {
    match serde_json::to_value(value) {
        Ok(doc) => schema.check(&doc, prefix, errs),
        Err(e) => errs.push(prefix, e.to_string()),
    }
}

impl UplinkSpec {
    /// Checks an Uplink's spec; paths start at `spec`.
    pub fn validate(&self) -> Result<(), ValidationErrors> {
        let mut errs = ValidationErrors::default();
        check_schema(&mut errs, crate::schema::uplink_spec(), "spec", self);
        validate_target(&mut errs, "spec", self.mqtt.as_ref(), self.http.as_ref(), SecretNames::Object);
        validate_encoding(
            &mut errs,
            "spec",
            self.encoding,
            self.compression,
            self.sparkplug.as_ref(),
            self.mqtt.as_ref(),
        );
        if let Some(b) = &self.buffer {
            validate_buffer(&mut errs, "spec.buffer", b);
        }
        errs.into_result()
    }
}

impl DeviceSpec {
    /// Checks a Device's own spec (before its profile is merged in); paths start at `spec`.
    pub fn validate(&self) -> Result<(), ValidationErrors> {
        let mut errs = ValidationErrors::default();
        check_schema(&mut errs, crate::schema::device_spec(), "spec", self);
        validate_connection(&mut errs, "spec.connection", &self.connection, SecretNames::Object);
        check_duration(&mut errs, "spec.pollInterval", self.poll_interval.as_ref(), MIN_POLL_INTERVAL);
        let modbus = matches!(self.connection, Connection::ModbusTcp(_) | Connection::ModbusRtu(_));
        validate_points(&mut errs, "spec.points", &self.points, modbus);
        errs.into_result()
    }
}

impl DeviceProfileSpec {
    /// Checks a DeviceProfile's spec; paths start at `spec`. Profiles do not know the
    /// protocol of the devices using them, so Modbus locations are checked where given.
    pub fn validate(&self) -> Result<(), ValidationErrors> {
        let mut errs = ValidationErrors::default();
        check_schema(&mut errs, crate::schema::device_profile_spec(), "spec", self);
        if self.points.is_empty() {
            errs.push("spec.points", "a profile needs at least one point");
        }
        validate_points(&mut errs, "spec.points", &self.points, false);
        for (i, p) in self.points.iter().enumerate() {
            if p.modbus.is_some() {
                validate_modbus_point(&mut errs, &format!("spec.points[{i}]"), p);
            }
        }
        errs.into_result()
    }
}

impl GatewayDevice {
    /// Checks one device as a gateway would run it; paths start at `path`.
    pub fn validate_at(&self, path: &str) -> Result<(), ValidationErrors> {
        let mut errs = ValidationErrors::default();
        validate_device(&mut errs, path, self);
        errs.into_result()
    }
}

fn validate_device(errs: &mut ValidationErrors, path: &str, d: &GatewayDevice) {
    if !is_dns_label(&d.namespace) {
        errs.push(format!("{path}.namespace"), format!("{:?} is not a DNS-1123 label", d.namespace));
    }
    if !is_dns_subdomain(&d.name) {
        errs.push(format!("{path}.name"), format!("{:?} is not a DNS-1123 subdomain", d.name));
    }
    validate_connection(errs, &format!("{path}.connection"), &d.connection, SecretNames::Config);
    check_duration(errs, &format!("{path}.pollInterval"), d.poll_interval.as_ref(), MIN_POLL_INTERVAL);
    if d.points.is_empty() {
        errs.push(format!("{path}.points"), "a device needs at least one point");
    }
    let modbus = matches!(d.connection, Connection::ModbusTcp(_) | Connection::ModbusRtu(_));
    validate_points(errs, &format!("{path}.points"), &d.points, modbus);
}

fn validate_uplink(errs: &mut ValidationErrors, path: &str, u: &GatewayUplink, known: &BTreeSet<(&str, &str)>) {
    if !is_dns_label(&u.namespace) {
        errs.push(format!("{path}.namespace"), format!("{:?} is not a DNS-1123 label", u.namespace));
    }
    if !is_dns_subdomain(&u.name) {
        errs.push(format!("{path}.name"), format!("{:?} is not a DNS-1123 subdomain", u.name));
    }
    validate_target(errs, path, u.mqtt.as_ref(), u.http.as_ref(), SecretNames::Config);
    validate_encoding(errs, path, u.encoding, u.compression, u.sparkplug.as_ref(), u.mqtt.as_ref());
    if let Some(b) = &u.buffer {
        validate_buffer(errs, &format!("{path}.buffer"), b);
    }
    for (i, name) in u.devices.iter().flatten().enumerate() {
        if !known.contains(&(u.namespace.as_str(), name.as_str())) {
            errs.push(format!("{path}.devices[{i}]"), format!("no device {name:?} in namespace {:?}", u.namespace));
        }
    }
}

impl GatewayConfig {
    /// Checks the whole document, built in code or read by [`GatewayConfig::from_yaml`]
    /// (which calls it); paths start at the document root.
    pub fn validate(&self) -> Result<(), ValidationErrors> {
        let mut errs = ValidationErrors::default();
        check_schema(&mut errs, crate::schema::gateway_config(), "", self);
        self.validate_semantics(&mut errs);
        errs.into_result()
    }

    /// The checks a schema cannot do.
    pub(crate) fn validate_semantics(&self, errs: &mut ValidationErrors) {
        if self.api_version != Self::API_VERSION {
            errs.push("apiVersion", format!("{:?} is not {:?}", self.api_version, Self::API_VERSION));
        }
        if self.kind != Self::KIND {
            errs.push("kind", format!("{:?} is not {:?}", self.kind, Self::KIND));
        }
        let known = self.devices.iter().map(|d| (d.namespace.as_str(), d.name.as_str())).collect();
        validate_parts(errs, self.devices.iter().enumerate(), self.uplinks.iter().enumerate(), &known);
    }
}

/// Checks devices and uplinks of one document, each with its index in the document; uplinks may
/// name the devices in `known` (namespace, name).
pub(crate) fn validate_parts<'a>(
    errs: &mut ValidationErrors,
    devices: impl Iterator<Item = (usize, &'a GatewayDevice)>,
    uplinks: impl Iterator<Item = (usize, &'a GatewayUplink)>,
    known: &BTreeSet<(&str, &str)>,
) {
    let mut seen = BTreeSet::new();
    for (i, d) in devices {
        let path = format!("devices[{i}]");
        if !seen.insert((d.namespace.as_str(), d.name.as_str())) {
            errs.push(format!("{path}.name"), format!("duplicate device {}/{}", d.namespace, d.name));
        }
        validate_device(errs, &path, d);
    }
    let mut seen = BTreeSet::new();
    for (i, u) in uplinks {
        let path = format!("uplinks[{i}]");
        if !seen.insert((u.namespace.as_str(), u.name.as_str())) {
            errs.push(format!("{path}.name"), format!("duplicate uplink {}/{}", u.namespace, u.name));
        }
        validate_uplink(errs, &path, u, known);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::point::ModbusTable;

    const VALID: &str = r#"
apiVersion: fieldgate.io/v1alpha1
kind: GatewayConfig
devices:
- name: meter-1
  connection:
    modbusTcp: {host: 127.0.0.1, port: 5020, unitId: 1, timeout: 500ms}
  pollInterval: 1s
  points:
  - {name: energy, type: float64, unit: kW.h, modbus: {table: holding, address: 0, wordOrder: littleEndian}}
  - {name: running, type: bool, modbus: {table: coil, address: 3}}
  - {name: label, type: string, modbus: {table: input, address: 10, length: 4}}
uplinks:
- name: cloud
  mqtt: {url: "mqtt://127.0.0.1:1883", protocolVersion: 5, topic: "t/{namespace}/{device}"}
  buffer: {maxBytes: 1Gi, maxAge: 72h, onFull: rejectNew}
"#;

    fn parse(text: &str) -> GatewayConfig {
        GatewayConfig::from_yaml(text).unwrap()
    }

    fn paths(cfg: &GatewayConfig) -> Vec<String> {
        cfg.validate().unwrap_err().0.into_iter().map(|e| e.path).collect()
    }

    #[test]
    fn a_complete_config_is_valid() {
        parse(VALID).validate().unwrap();
    }

    /// Every problem of a document, as `path: message` lines.
    fn problems(text: &str) -> Vec<String> {
        match GatewayConfig::from_yaml(text) {
            Ok(_) => panic!("accepted:\n{text}"),
            Err(e) => e.fields().iter().map(ToString::to_string).collect(),
        }
    }

    #[test]
    fn a_command_topic_names_its_device_in_a_whole_level() {
        let check = |t: &str| {
            let mut errs = ValidationErrors::default();
            validate_command_topic(&mut errs, "uplinks[0].mqtt.commandTopic", t);
            errs.0.into_iter().map(|e| e.message).collect::<Vec<_>>()
        };
        assert!(check("fieldgate/{namespace}/{device}/commands").is_empty());
        assert!(check("site/{node}/{device}").is_empty());
        assert!(check("fieldgate/{namespace}/commands")[0].contains("needs a {device} level"));
        assert!(check("fieldgate/{namespace}/dev-{device}")[0].contains("whole topic level"));
        assert!(check("fieldgate/x{namespace}/{device}")[0].contains("whole topic level"));
    }

    #[test]
    fn every_problem_is_reported_with_its_path() {
        let mut cfg = parse(VALID);
        cfg.devices[0].points[1].value_type = ValueType::Float32;
        cfg.devices[0].points[2].modbus.as_mut().unwrap().length = None;
        cfg.uplinks[0].mqtt.as_mut().unwrap().qos = Some(0);
        cfg.uplinks[0].mqtt.as_mut().unwrap().topic = Some("t/{site}/#".into());
        cfg.uplinks[0].buffer.as_mut().unwrap().max_bytes = Some("32Ki".parse().unwrap());
        assert_eq!(
            paths(&cfg),
            [
                "devices[0].points[1].type",
                "devices[0].points[2].modbus.length",
                "uplinks[0].mqtt.qos",
                "uplinks[0].mqtt.topic",
                "uplinks[0].mqtt.topic",
                "uplinks[0].buffer.maxBytes",
            ]
        );
    }

    #[test]
    fn encoding_settings_apply_only_where_they_mean_something() {
        let sparkplug = VALID.replace(
            "  buffer: {maxBytes",
            "  encoding: sparkplugB\n  compression: zstd\n  sparkplug: {groupId: \"plant/{site}\", edgeNodeId: \"{node}-{uplink}\"}\n  buffer: {maxBytes",
        );
        assert_eq!(
            problems(&sparkplug),
            [
                "uplinks[0].compression: not with encoding sparkplugB: Sparkplug hosts read plain Sparkplug B payloads",
                "uplinks[0].mqtt.topic: not used with encoding sparkplugB: topics are \
                 spBv1.0/{groupId}/{type}/{edgeNodeId}/{device}",
                "uplinks[0].sparkplug.groupId: \"plant/{site}\" contains '/', '+' or '#', which a Sparkplug id cannot",
                "uplinks[0].sparkplug.groupId: unknown placeholder {site} (known: {namespace}, {uplink}, {node})",
            ]
        );
        let stray =
            VALID.replace("  buffer: {maxBytes", "  encoding: protobufCompact\n  sparkplug: {}\n  buffer: {maxBytes");
        assert_eq!(problems(&stray), ["uplinks[0].sparkplug: only with encoding sparkplugB"]);
        let fine = VALID.replace("topic: \"t/{namespace}/{device}\"", "").replace(
            "  buffer: {maxBytes",
            "  encoding: sparkplugB\n  sparkplug: {groupId: plant-1}\n  buffer: {maxBytes",
        );
        parse(&fine).validate().unwrap();
        let compressed =
            VALID.replace("  buffer: {maxBytes", "  encoding: jsonCompact\n  compression: gzip\n  buffer: {maxBytes");
        let cfg = parse(&compressed);
        assert_eq!(
            (cfg.uplinks[0].encoding(), cfg.uplinks[0].compression()),
            (Encoding::JsonCompact, Compression::Gzip)
        );
        let unknown = VALID.replace("  buffer: {maxBytes", "  encoding: cbor\n  compression: lz4\n  buffer: {maxBytes");
        let found = problems(&unknown);
        assert_eq!(found.len(), 2, "{found:#?}");
        assert!(found[0].starts_with("uplinks[0].compression: "), "{found:#?}");
        assert!(found[1].starts_with("uplinks[0].encoding: "), "{found:#?}");
    }

    #[test]
    fn misspelt_nested_fields_are_refused_with_their_paths() {
        let text = VALID
            .replace("unit: kW.h,", "unit: kW.h, scael: 0.1,")
            .replace("onFull: rejectNew", "onFul: rejectNew")
            .replace("protocolVersion: 5,", "protocolVersion: 5, qso: 1,")
            .replace("modbusTcp: {host", "modbusTcp: {hots: x, host")
            .replace("table: coil,", "tabel: coil, table: coil,");
        let found = problems(&text);
        assert_eq!(
            found,
            [
                "devices[0].connection.modbusTcp.hots: unknown field (did you mean host?); \
                 expected one of host, port, timeout, unitId",
                "devices[0].points[0].scael: unknown field (did you mean scale?); \
                 expected one of access, modbus, name, offset, path, report, scale, type, unit",
                "devices[0].points[1].modbus.tabel: unknown field (did you mean table?); \
                 expected one of address, bit, length, table, wordOrder",
                "uplinks[0].buffer.onFul: unknown field (did you mean onFull?); \
                 expected one of linger, maxAge, maxBytes, onFull, redeliverAfter",
                "uplinks[0].mqtt.qso: unknown field (did you mean qos?); expected one of auth, clientId, \
                 commandTopic, keepAlive, maxInFlight, protocolVersion, qos, tls, topic, url",
            ],
            "{found:#?}"
        );
    }

    #[test]
    fn an_mqtt_device_message_limit_outside_its_range_names_the_field_and_the_range() {
        let device = |limit: &str| {
            format!(
                "apiVersion: fieldgate.io/v1alpha1\nkind: GatewayConfig\ndevices:\n- name: m\n  connection:\n    mqtt: {{url: \"mqtt://127.0.0.1:1883\", topics: [a/#], \
                 maxMessageBytes: {limit}}}\n  points:\n  - {{name: v, type: float64}}\n"
            )
        };
        let ok = GatewayConfig::from_yaml(&device("64Ki")).unwrap();
        let crate::Connection::Mqtt(m) = &ok.devices[0].connection else { panic!("not MQTT") };
        assert_eq!(m.max_message_bytes(), 64 * 1024);
        assert_eq!(
            problems(&device("32Mi")),
            ["devices[0].connection.mqtt.maxMessageBytes: \"32Mi\" is out of range 1Ki-16Mi"]
        );
        assert_eq!(
            problems(&device("'512'")),
            ["devices[0].connection.mqtt.maxMessageBytes: \"512\" is out of range 1Ki-16Mi"]
        );
        assert!(problems(&device("1MB"))[0].starts_with("devices[0].connection.mqtt.maxMessageBytes: "));
    }

    #[test]
    fn out_of_range_numbers_name_the_field_and_the_range() {
        let text = VALID.replace("port: 5020", "port: 70000").replace("address: 10,", "address: -1,");
        let found = problems(&text);
        assert_eq!(
            found,
            [
                "devices[0].connection.modbusTcp.port: 70000 is out of range 1-65535",
                "devices[0].points[2].modbus.address: -1 is out of range 0-65535",
            ],
            "{found:#?}"
        );
    }

    #[test]
    fn a_buffer_linger_over_a_second_names_the_field_and_the_range() {
        let long = VALID.replace("onFull: rejectNew}", "onFull: rejectNew, linger: 1500ms}");
        assert_eq!(problems(&long), ["uplinks[0].buffer.linger: \"1500ms\" is out of range 0s-1s"]);
        let fine = VALID.replace("onFull: rejectNew}", "onFull: rejectNew, linger: 1s}");
        parse(&fine).validate().unwrap();
    }

    #[test]
    fn malformed_text_values_types_and_missing_fields_are_named() {
        let text = VALID
            .replace("pollInterval: 1s", "pollInterval: fast")
            .replace("timeout: 500ms", "timeout: 1 fortnight")
            .replace("maxBytes: 1Gi", "maxBytes: 1GB")
            .replace("url: \"mqtt://127.0.0.1:1883\"", "url: \"http://127.0.0.1\"")
            .replace("unitId: 1,", "unitId: \"one\",")
            .replace("- {name: running, type: bool,", "- {type: bool,")
            .replace("wordOrder: littleEndian", "wordOrder: little");
        let found = problems(&text);
        assert_eq!(
            found,
            [
                "devices[0].connection.modbusTcp.timeout: \"1 fortnight\" is not a duration such as 500ms, 1s, 2m30s or 72h",
                "devices[0].connection.modbusTcp.unitId: expected a whole number, found \"one\"",
                "devices[0].points[0].modbus.wordOrder: \"little\" is not one of bigEndian, littleEndian",
                "devices[0].points[1].name: required field is missing",
                "devices[0].pollInterval: \"fast\" is not a duration such as 500ms, 1s, 2m30s or 72h",
                "uplinks[0].buffer.maxBytes: \"1GB\" is not a byte quantity such as 512Mi or 1Gi \
                 (suffixes Ki Mi Gi Ti Pi Ei, k M G T P E)",
                "uplinks[0].mqtt.url: \"http://127.0.0.1\" is not an mqtt://host:port or mqtts://host:port URL",
            ],
            "{found:#?}"
        );
    }

    #[test]
    fn a_connection_names_exactly_one_protocol() {
        let two = VALID.replace(
            "modbusTcp: {host: 127.0.0.1, port: 5020, unitId: 1, timeout: 500ms}",
            "{modbusTcp: {host: h}, coap: {}}",
        );
        // The sentence lists every protocol; these are the ones of this test's document.
        let found = problems(&two);
        assert_eq!(found.len(), 1, "{found:#?}");
        let listed = found[0].strip_prefix("devices[0].connection: set exactly one of ").expect("the sentence");
        let listed: Vec<&str> = listed.split(", ").collect();
        for protocol in ["coap", "modbusRtu", "modbusTcp", "mqtt", "tcp", "udp"] {
            assert!(listed.contains(&protocol), "{protocol} not in {listed:?}");
        }
        let misspelt = VALID.replace("modbusTcp:", "modbusTCP:");
        let found = problems(&misspelt);
        assert_eq!(found.len(), 1, "{found:#?}");
        assert!(
            found[0].starts_with("devices[0].connection.modbusTCP: unknown field (did you mean modbusTcp?)"),
            "{found:#?}"
        );
    }

    #[test]
    fn semantic_problems_of_well_formed_parts_are_reported_with_structural_ones() {
        // Device 0 is malformed; device 1 and the uplink are well-formed but wrong.
        let text = r#"
apiVersion: fieldgate.io/v1alpha1
kind: GatewayConfig
devices:
- name: meter-1
  connection: {modbusTcp: {host: h, port: 0}}
  points: [{name: x, type: bool, modbus: {table: coil, address: 0}}]
- name: meter-2
  connection: {modbusTcp: {host: h}}
  pollInterval: 5ms
  points: [{name: x, type: int16, modbus: {table: coil, address: 0}}]
uplinks:
- name: cloud
  devices: [meter-1, meter-2, ghost]
  mqtt: {url: "mqtt://127.0.0.1:1883", qos: 2}
"#;
        let found = problems(text);
        assert_eq!(
            found,
            [
                "devices[0].connection.modbusTcp.port: 0 is out of range 1-65535",
                "devices[1].pollInterval: \"5ms\" is shorter than the minimum 10ms",
                "devices[1].points[0].type: a Coil table holds single bits: type must be bool",
                "uplinks[0].mqtt.qos: 2 is not supported: readings are published with QoS 1 and acknowledged",
                "uplinks[0].devices[2]: no device \"ghost\" in namespace \"default\"",
            ],
            "{found:#?}"
        );
    }

    #[test]
    fn secret_references_are_checked_the_same_way_everywhere() {
        let text = VALID.replace(
            "mqtt: {url: \"mqtt://127.0.0.1:1883\",",
            "mqtt: {url: \"mqtts://127.0.0.1:8883\", auth: {secretRef: {name: ../etc}}, \
             tls: {caSecretRef: {name: ca, key: ../../passwd}, clientCertSecretRef: {name: a/b}},",
        );
        let found = problems(&text);
        assert_eq!(
            found,
            [
                "uplinks[0].mqtt.auth.secretRef.name: \"../etc\" is not a Secret name (a DNS-1123 subdomain)",
                "uplinks[0].mqtt.tls.caSecretRef.key: \"../../passwd\" is not a Secret key ([-._a-zA-Z0-9]+, not . or ..)",
                "uplinks[0].mqtt.tls.clientCertSecretRef.name: \"a/b\" is not a Secret name (a DNS-1123 subdomain)",
            ],
            "{found:#?}"
        );
        let device = VALID
            .replace(
                "modbusTcp: {host: 127.0.0.1, port: 5020, unitId: 1, timeout: 500ms}",
                "tcp: {tokenSecretRef: {name: tok, key: ..}}",
            )
            .replace(", modbus: {table: holding, address: 0, wordOrder: littleEndian}", "")
            .replace(", modbus: {table: coil, address: 3}", "")
            .replace(", modbus: {table: input, address: 10, length: 4}", "");
        assert_eq!(
            problems(&device),
            ["devices[0].connection.tcp.tokenSecretRef.key: \"..\" is not a Secret key ([-._a-zA-Z0-9]+, not . or ..)"]
        );
    }

    #[test]
    fn a_document_that_is_not_yaml_names_the_line() {
        let err = GatewayConfig::from_yaml("apiVersion: x\nkind: [\n").unwrap_err();
        assert_eq!(err.kind(), "syntax");
        assert!(err.to_string().contains("line"), "{err}");
    }

    #[test]
    fn values_past_the_address_space_are_refused() {
        let mut cfg = parse(VALID);
        cfg.devices[0].points[0].modbus.as_mut().unwrap().address = 65_533;
        assert_eq!(paths(&cfg), ["devices[0].points[0].modbus.address"]);
    }

    #[test]
    fn duplicates_and_unknown_devices_are_refused() {
        let mut cfg = parse(VALID);
        cfg.devices[0].points[1].name = "energy".into();
        cfg.devices.push(cfg.devices[0].clone());
        cfg.uplinks[0].devices = Some(vec!["meter-1".into(), "ghost".into()]);
        let p = paths(&cfg);
        assert!(p.contains(&"devices[1].name".to_string()), "{p:?}");
        assert!(p.contains(&"devices[0].points[1].name".to_string()), "{p:?}");
        assert!(p.contains(&"uplinks[0].devices[1]".to_string()), "{p:?}");
    }

    #[test]
    fn read_only_tables_cannot_be_read_write() {
        let mut cfg = parse(VALID);
        cfg.devices[0].points[2].access = Access::ReadWrite;
        assert_eq!(paths(&cfg), ["devices[0].points[2].access"]);
        assert_eq!(ModbusTable::Input.max_read(), 125);
    }

    #[test]
    fn tls_needs_a_tls_url() {
        let mut cfg = parse(VALID);
        cfg.uplinks[0].mqtt.as_mut().unwrap().tls = Some(Default::default());
        assert_eq!(paths(&cfg), ["uplinks[0].mqtt.tls"]);
    }

    #[test]
    fn a_config_may_name_a_token_secret_as_the_operator_renders_it_but_a_device_may_not() {
        let raw = |name: &str| {
            Connection::Tcp(crate::device::RawConnection {
                id: None,
                token_secret_ref: crate::device::DeviceSecretRef { name: name.into(), key: None },
            })
        };
        let mut cfg = parse(VALID);
        cfg.devices[0].points.truncate(1);
        cfg.devices[0].points[0].modbus = None;
        for name in ["tok", "plant-a_tok", "plant-a_tok.v2"] {
            cfg.devices[0].connection = raw(name);
            cfg.validate().unwrap_or_else(|e| panic!("{name}: {e}"));
        }
        for name in ["Tok", "_tok", "plant-a_", "plant.a_tok"] {
            cfg.devices[0].connection = raw(name);
            assert_eq!(paths(&cfg), ["devices[0].connection.tcp.tokenSecretRef.name"], "{name}");
        }
        let spec = DeviceSpec {
            profile: None,
            points: cfg.devices[0].points.clone(),
            connection: raw("plant-a_tok"),
            poll_interval: None,
            placement: None,
        };
        let errs = spec.validate().unwrap_err().0;
        assert_eq!(
            errs.iter().map(|e| e.path.as_str()).collect::<Vec<_>>(),
            ["spec.connection.tcp.tokenSecretRef.name"]
        );
    }

    #[test]
    fn unknown_fields_are_refused_at_parse_time() {
        let found = problems("apiVersion: fieldgate.io/v1alpha1\nkind: GatewayConfig\ndevicez: []\n");
        assert_eq!(
            found,
            [
                "devicez: unknown field (did you mean devices?); expected one of apiVersion, devices, kind, node, uplinks, version"
            ]
        );
        let found = problems("apiVersion: v1\nkind: ConfigMap\n");
        assert_eq!(
            found,
            ["apiVersion: \"v1\" is not fieldgate.io/v1alpha1", "kind: \"ConfigMap\" is not GatewayConfig"]
        );
    }
}
