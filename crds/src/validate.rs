//! Checks shared by the operator and the gateway.
//!
//! Every check reports the field path of the value it refuses, and a validation reports every
//! problem it finds, not just the first.

use std::collections::BTreeSet;
use std::fmt;
use std::time::Duration;

use crate::device::{Connection, DeviceProfileSpec, DeviceSpec, ModbusTcpConnection};
use crate::gateway_config::{GatewayConfig, GatewayDevice, GatewayUplink};
use crate::point::{Access, Point, ValueType};
use crate::quantity::parse_bytes;
use crate::uplink::{BufferSpec, MqttUplink, UplinkSpec};

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

/// Parses a duration such as `500ms`, `1s`, `2m30s` or `72h`.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    humantime::parse_duration(text.trim())
        .map_err(|e| format!("{text:?} is not a duration such as 500ms, 1s or 72h ({e})"))
}

/// Smallest poll interval accepted.
pub const MIN_POLL_INTERVAL: Duration = Duration::from_millis(10);

/// Placeholders a topic template may contain.
pub const TOPIC_PLACEHOLDERS: [&str; 4] = ["namespace", "device", "uplink", "node"];

fn check_duration(errs: &mut ValidationErrors, path: &str, value: Option<&String>, min: Duration) -> Option<Duration> {
    let text = value?;
    match parse_duration(text) {
        Ok(d) if d < min => {
            errs.push(path, format!("{text:?} is shorter than the minimum {min:?}"));
            None
        }
        Ok(d) => Some(d),
        Err(e) => {
            errs.push(path, e);
            None
        }
    }
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
        (ValueType::String, None | Some(0)) => {
            errs.push(format!("{mat}.length"), "a string point needs a length of 1-125 registers")
        }
        (ValueType::String, Some(l)) if l > 125 => {
            errs.push(format!("{mat}.length"), format!("{l} registers exceed one request (125)"))
        }
        (t, Some(_)) if t != ValueType::String => {
            errs.push(format!("{mat}.length"), "only string points have a length")
        }
        _ => {}
    }
    if let Some(bit) = m.bit {
        if p.value_type != ValueType::Bool || !m.table.is_register() {
            errs.push(format!("{mat}.bit"), "only a bool point in a register table has a bit");
        } else if bit > 15 {
            errs.push(format!("{mat}.bit"), format!("{bit} is not a bit of a 16-bit register (0-15)"));
        }
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
    if c.port == Some(0) {
        errs.push(format!("{path}.port"), "must be 1-65535");
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
        Connection::Coap(c) => validate_coap(errs, &format!("{path}.coap"), c, names),
        Connection::Mqtt(m) => validate_mqtt_device(errs, &format!("{path}.mqtt"), m),
        Connection::Tcp(r) => validate_raw(errs, &format!("{path}.tcp"), r, names),
        Connection::Udp(r) => validate_raw(errs, &format!("{path}.udp"), r, names),
        Connection::ModbusRtu(m) => validate_modbus_rtu(errs, &format!("{path}.modbusRtu"), m),
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
    if !(1..=247).contains(&c.unit_id) {
        errs.push(format!("{path}.unitId"), format!("{} is not a unit id of a serial bus (1-247)", c.unit_id));
    }
    if c.baud_rate == Some(0) {
        errs.push(format!("{path}.baudRate"), "must be positive");
    }
    if c.data_bits.is_some_and(|b| b != 7 && b != 8) {
        errs.push(format!("{path}.dataBits"), "must be 7 or 8");
    }
    if c.stop_bits.is_some_and(|b| b != 1 && b != 2) {
        errs.push(format!("{path}.stopBits"), "must be 1 or 2");
    }
    check_duration(errs, &format!("{path}.timeout"), c.timeout.as_ref(), Duration::from_millis(1));
}

fn validate_secret_ref(
    errs: &mut ValidationErrors,
    path: &str,
    r: &crate::device::DeviceSecretRef,
    names: SecretNames,
) {
    let rendered = || crate::node_objects::split_secret_dir(&r.name).is_some();
    let valid = match names {
        SecretNames::Object => is_dns_subdomain(&r.name),
        SecretNames::Config => is_dns_subdomain(&r.name) || rendered(),
    };
    if !valid {
        errs.push(format!("{path}.name"), format!("{:?} is not a Secret name", r.name));
    }
    if r.key.as_deref().is_some_and(|k| k.is_empty() || k.contains('/')) {
        errs.push(format!("{path}.key"), "must be a non-empty Secret key without '/'");
    }
}

fn validate_coap(errs: &mut ValidationErrors, path: &str, c: &crate::device::CoapConnection, names: SecretNames) {
    if c.host.as_deref().is_some_and(|h| h.trim().is_empty()) {
        errs.push(format!("{path}.host"), "must not be empty");
    }
    if c.port == Some(0) {
        errs.push(format!("{path}.port"), "must be 1-65535");
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
    if let Some(n) = c.max_body_bytes
        && !(16..=1_048_576).contains(&n)
    {
        errs.push(format!("{path}.maxBodyBytes"), format!("{n} is not within 16-1048576"));
    }
    if let Some(r) = &c.token_secret_ref {
        validate_secret_ref(errs, &format!("{path}.tokenSecretRef"), r, names);
    }
    check_duration(errs, &format!("{path}.timeout"), c.timeout.as_ref(), Duration::from_millis(1));
}

fn validate_mqtt_device(errs: &mut ValidationErrors, path: &str, m: &crate::device::MqttDeviceConnection) {
    match m.url.split_once("://") {
        Some(("mqtt" | "tcp", rest)) if !rest.is_empty() => {}
        _ => errs.push(format!("{path}.url"), format!("{:?} is not an mqtt://host:port URL", m.url)),
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
    if let Some(a) = &m.auth
        && a.secret_ref.name.is_empty()
    {
        errs.push(format!("{path}.auth.secretRef.name"), "must not be empty");
    }
    check_duration(errs, &format!("{path}.keepAlive"), m.keep_alive.as_ref(), Duration::from_secs(1));
}

fn validate_raw(errs: &mut ValidationErrors, path: &str, r: &crate::device::RawConnection, names: SecretNames) {
    if let Some(id) = &r.id
        && (id.is_empty() || id.len() > 128 || id.contains(|c: char| c.is_whitespace() || c.is_control()))
    {
        errs.push(format!("{path}.id"), format!("{id:?} must be 1-128 characters without spaces"));
    }
    validate_secret_ref(errs, &format!("{path}.tokenSecretRef"), &r.token_secret_ref, names);
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

fn validate_mqtt(errs: &mut ValidationErrors, path: &str, m: &MqttUplink) {
    let tls_url = match m.url.split_once("://") {
        Some(("mqtt" | "tcp", rest)) if !rest.is_empty() => false,
        Some(("mqtts" | "ssl", rest)) if !rest.is_empty() => true,
        _ => {
            errs.push(
                format!("{path}.url"),
                format!("{:?} is not an mqtt://host:port or mqtts://host:port URL", m.url),
            );
            false
        }
    };
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
        validate_topic(errs, &format!("{path}.commandTopic"), t);
    }
    if m.max_in_flight == Some(0) {
        errs.push(format!("{path}.maxInFlight"), "must be at least 1");
    }
    check_duration(errs, &format!("{path}.keepAlive"), m.keep_alive.as_ref(), Duration::from_secs(1));
    if let Some(a) = &m.auth
        && a.secret_ref.name.is_empty()
    {
        errs.push(format!("{path}.auth.secretRef.name"), "must not be empty");
    }
    if m.tls.is_some() && !tls_url {
        errs.push(format!("{path}.tls"), "TLS settings need an mqtts:// URL");
    }
}

fn validate_buffer(errs: &mut ValidationErrors, path: &str, b: &BufferSpec) {
    if let Some(max) = &b.max_bytes {
        match parse_bytes(max) {
            Ok(n) if n < 64 * 1024 => {
                errs.push(format!("{path}.maxBytes"), format!("{max:?} is below the minimum 64Ki"))
            }
            Ok(_) => {}
            Err(e) => errs.push(format!("{path}.maxBytes"), e),
        }
    }
    check_duration(errs, &format!("{path}.maxAge"), b.max_age.as_ref(), Duration::from_secs(1));
    check_duration(errs, &format!("{path}.redeliverAfter"), b.redeliver_after.as_ref(), Duration::from_millis(100));
}

impl UplinkSpec {
    /// Checks an Uplink's spec; paths start at `spec`.
    pub fn validate(&self) -> Result<(), ValidationErrors> {
        let mut errs = ValidationErrors::default();
        validate_mqtt(&mut errs, "spec.mqtt", &self.mqtt);
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

fn validate_uplink(errs: &mut ValidationErrors, path: &str, u: &GatewayUplink, cfg: &GatewayConfig) {
    if !is_dns_label(&u.namespace) {
        errs.push(format!("{path}.namespace"), format!("{:?} is not a DNS-1123 label", u.namespace));
    }
    if !is_dns_subdomain(&u.name) {
        errs.push(format!("{path}.name"), format!("{:?} is not a DNS-1123 subdomain", u.name));
    }
    validate_mqtt(errs, &format!("{path}.mqtt"), &u.mqtt);
    if let Some(b) = &u.buffer {
        validate_buffer(errs, &format!("{path}.buffer"), b);
    }
    for (i, name) in u.devices.iter().flatten().enumerate() {
        let known = cfg.devices.iter().any(|d| d.namespace == u.namespace && d.name == *name);
        if !known {
            errs.push(format!("{path}.devices[{i}]"), format!("no device {name:?} in namespace {:?}", u.namespace));
        }
    }
}

impl GatewayConfig {
    /// Checks the whole document; paths start at the document root.
    pub fn validate(&self) -> Result<(), ValidationErrors> {
        let mut errs = ValidationErrors::default();
        if self.api_version != Self::API_VERSION {
            errs.push("apiVersion", format!("{:?} is not {:?}", self.api_version, Self::API_VERSION));
        }
        if self.kind != Self::KIND {
            errs.push("kind", format!("{:?} is not {:?}", self.kind, Self::KIND));
        }
        let mut seen = BTreeSet::new();
        for (i, d) in self.devices.iter().enumerate() {
            let path = format!("devices[{i}]");
            if !seen.insert((d.namespace.as_str(), d.name.as_str())) {
                errs.push(format!("{path}.name"), format!("duplicate device {}/{}", d.namespace, d.name));
            }
            validate_device(&mut errs, &path, d);
        }
        let mut seen = BTreeSet::new();
        for (i, u) in self.uplinks.iter().enumerate() {
            let path = format!("uplinks[{i}]");
            if !seen.insert((u.namespace.as_str(), u.name.as_str())) {
                errs.push(format!("{path}.name"), format!("duplicate uplink {}/{}", u.namespace, u.name));
            }
            validate_uplink(&mut errs, &path, u, self);
        }
        errs.into_result()
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

    #[test]
    fn every_problem_is_reported_with_its_path() {
        let mut cfg = parse(VALID);
        cfg.devices[0].poll_interval = Some("fast".into());
        cfg.devices[0].points[1].value_type = ValueType::Float32;
        cfg.devices[0].points[2].modbus.as_mut().unwrap().length = None;
        cfg.uplinks[0].mqtt.qos = Some(0);
        cfg.uplinks[0].mqtt.topic = Some("t/{site}/#".into());
        cfg.uplinks[0].buffer.as_mut().unwrap().max_bytes = Some("1GB".into());
        assert_eq!(
            paths(&cfg),
            [
                "devices[0].pollInterval",
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
    fn messages_name_the_offending_value() {
        let mut cfg = parse(VALID);
        cfg.devices[0].connection = Connection::ModbusTcp(ModbusTcpConnection {
            host: "h".into(),
            port: Some(0),
            unit_id: None,
            timeout: Some("1 fortnight".into()),
        });
        let text = cfg.validate().unwrap_err().to_string();
        assert!(text.contains("devices[0].connection.modbusTcp.port: must be 1-65535"), "{text}");
        assert!(text.contains("devices[0].connection.modbusTcp.timeout"), "{text}");
        assert!(text.contains("1 fortnight"), "{text}");
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
        cfg.uplinks[0].mqtt.tls = Some(Default::default());
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
        let err = GatewayConfig::from_yaml("apiVersion: x\nkind: y\ndevicez: []\n").unwrap_err();
        assert!(err.to_string().contains("devicez"), "{err}");
    }
}
