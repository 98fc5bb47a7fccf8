//! `GatewayConfig`: everything one gateway runs from.
//!
//! The operator renders one per edge node (profiles merged into devices, uplinks resolved to
//! device lists); a standalone gateway reads the same document from a file.

use std::collections::BTreeSet;
use std::time::Duration;

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::device::Connection;
use crate::point::Point;
use crate::uplink::{BufferSpec, Compression, Encoding, HttpUplink, MqttTls, MqttUplink, SparkplugSpec};
use crate::validate::ValidationErrors;
use crate::values::HumanDuration;

/// The configuration of one gateway.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct GatewayConfig {
    /// Always `fieldgate.io/v1alpha1`.
    #[schemars(extend("const" = "fieldgate.io/v1alpha1"))]
    pub api_version: String,
    /// Always `GatewayConfig`.
    #[schemars(extend("const" = "GatewayConfig"))]
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
    pub poll_interval: Option<HumanDuration>,
    /// All points of the device.
    pub points: Vec<Point>,
}

impl GatewayDevice {
    /// Time between two polls when none is set.
    pub const DEFAULT_POLL_INTERVAL: Duration = Duration::from_secs(1);

    /// Time between two polls, default applied.
    pub fn poll_interval(&self) -> Duration {
        self.poll_interval.as_ref().map_or(Self::DEFAULT_POLL_INTERVAL, HumanDuration::get)
    }
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
    /// An MQTT broker. Exactly one of `mqtt` and `http` is set.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mqtt: Option<MqttUplink>,
    /// An HTTP endpoint taking batches of readings. Exactly one of `mqtt` and `http` is set.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub http: Option<HttpUplink>,
    /// Message encoding. Defaults to `json`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub encoding: Option<Encoding>,
    /// Compression of each message, after encoding (not with `sparkplugB`). Defaults to `none`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub compression: Option<Compression>,
    /// Sparkplug B identity; only with `encoding: sparkplugB`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sparkplug: Option<SparkplugSpec>,
    /// Buffer limits.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub buffer: Option<BufferSpec>,
}

/// Where an uplink sends readings.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum UplinkTarget<'a> {
    /// An MQTT broker.
    Mqtt(&'a MqttUplink),
    /// An HTTP endpoint.
    Http(&'a HttpUplink),
}

impl UplinkTarget<'_> {
    /// The field name of the kind (`mqtt`, `http`).
    pub fn kind(&self) -> &'static str {
        match self {
            UplinkTarget::Mqtt(_) => "mqtt",
            UplinkTarget::Http(_) => "http",
        }
    }

    /// The TLS settings.
    pub fn tls(&self) -> Option<&MqttTls> {
        match self {
            UplinkTarget::Mqtt(m) => m.tls.as_ref(),
            UplinkTarget::Http(h) => h.tls.as_ref(),
        }
    }
}

impl GatewayUplink {
    /// Where it sends readings: `None` for an uplink with neither or both kinds set (which
    /// validation refuses).
    pub fn target(&self) -> Option<UplinkTarget<'_>> {
        match (&self.mqtt, &self.http) {
            (Some(m), None) => Some(UplinkTarget::Mqtt(m)),
            (None, Some(h)) => Some(UplinkTarget::Http(h)),
            _ => None,
        }
    }

    /// The Secret keys it reads: `(path of the reference, Secret name, key)`, paths starting
    /// at the uplink (`mqtt.auth.secretRef`).
    pub fn secret_keys(&self) -> Vec<(String, String, String)> {
        let mut out = Vec::new();
        let Some(target) = self.target() else { return out };
        let at = target.kind();
        match target {
            UplinkTarget::Mqtt(m) => {
                if let Some(a) = &m.auth {
                    for key in ["username", "password"] {
                        out.push((format!("{at}.auth.secretRef"), a.secret_ref.name.clone(), key.to_string()));
                    }
                }
            }
            UplinkTarget::Http(h) => {
                if let Some(a) = &h.auth {
                    let r = &a.token_secret_ref;
                    out.push((format!("{at}.auth.tokenSecretRef"), r.name.clone(), r.key().to_string()));
                }
            }
        }
        if let Some(tls) = target.tls() {
            if let Some(r) = &tls.ca_secret_ref {
                out.push((format!("{at}.tls.caSecretRef"), r.name.clone(), r.key().to_string()));
            }
            if let Some(r) = &tls.client_cert_secret_ref {
                for key in ["tls.crt", "tls.key"] {
                    out.push((format!("{at}.tls.clientCertSecretRef"), r.name.clone(), key.to_string()));
                }
            }
        }
        out
    }

    /// The buffer limits, defaults applied.
    pub fn buffer(&self) -> BufferSpec {
        self.buffer.clone().unwrap_or_default()
    }

    /// The message encoding, default applied.
    pub fn encoding(&self) -> Encoding {
        self.encoding.unwrap_or_default()
    }

    /// The compression, default applied.
    pub fn compression(&self) -> Compression {
        self.compression.unwrap_or_default()
    }

    /// The Sparkplug identity, defaults applied.
    pub fn sparkplug(&self) -> SparkplugSpec {
        self.sparkplug.clone().unwrap_or_default()
    }

    /// Whether readings of this device go to this uplink.
    pub fn selects(&self, device: &GatewayDevice) -> bool {
        device.namespace == self.namespace && self.devices.as_ref().is_none_or(|names| names.contains(&device.name))
    }

    /// [`selects`](Self::selects) for asking about many devices: the device list is read into
    /// a set once (an operator-rendered uplink lists every device it takes, and a scan of that
    /// list per device is quadratic in the devices).
    pub fn selector(&self) -> impl Fn(&GatewayDevice) -> bool + '_ {
        let names: Option<std::collections::HashSet<&str>> =
            self.devices.as_ref().map(|names| names.iter().map(String::as_str).collect());
        move |d| d.namespace == self.namespace && names.as_ref().is_none_or(|names| names.contains(d.name.as_str()))
    }
}

fn default_namespace() -> String {
    "default".to_string()
}

/// One key of a Secret that a config reads at run time.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SecretUse {
    /// Path of the reference, such as `uplinks[0].mqtt.auth.secretRef`.
    pub path: String,
    /// Name of the Secret (as the config names it).
    pub name: String,
    /// The key read.
    pub key: String,
    /// Whether the config cannot run without it: an uplink's Secrets are; a device's are not
    /// (that device alone is refused until its Secret is there).
    pub required: bool,
}

impl GatewayConfig {
    /// Every Secret key the config reads, in document order.
    pub fn secret_uses(&self) -> Vec<SecretUse> {
        let mut out = Vec::new();
        let mut add = |path: String, name: &str, key: &str, required: bool| {
            out.push(SecretUse { path, name: name.to_string(), key: key.to_string(), required });
        };
        for (i, d) in self.devices.iter().enumerate() {
            let at = format!("devices[{i}].connection");
            for r in d.connection.secret_refs() {
                for key in &r.reads {
                    add(format!("{at}.{}", r.at), r.name, key, false);
                }
            }
        }
        for (i, u) in self.uplinks.iter().enumerate() {
            for (path, name, key) in u.secret_keys() {
                add(format!("uplinks[{i}].{path}"), &name, &key, true);
            }
        }
        out
    }
}

/// Why a `GatewayConfig` document was refused.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// Not a YAML (or JSON) document; the message names the line and column.
    #[error("{0}")]
    Syntax(#[source] serde_saphyr::Error),
    /// A well-formed document with invalid fields: every problem, each with its field path.
    #[error("{0}")]
    Invalid(#[source] ValidationErrors),
}

impl ConfigError {
    /// Label for metrics and logs.
    pub fn kind(&self) -> &'static str {
        match self {
            ConfigError::Syntax(_) => "syntax",
            ConfigError::Invalid(_) => "invalid",
        }
    }

    /// The refused fields (empty for a syntax error).
    pub fn fields(&self) -> &[crate::FieldError] {
        match self {
            ConfigError::Syntax(_) => &[],
            ConfigError::Invalid(e) => &e.0,
        }
    }
}

impl GatewayConfig {
    /// The `apiVersion` a GatewayConfig carries.
    pub const API_VERSION: &'static str = "fieldgate.io/v1alpha1";
    /// The `kind` a GatewayConfig carries.
    pub const KIND: &'static str = "GatewayConfig";

    /// Reads and checks a YAML (or JSON) document: its structure against the strict schema
    /// (unknown fields, types, ranges, patterns — see [`crate::schema`]), then the semantic
    /// checks of [`GatewayConfig::validate`]. Every problem is reported at once with its field
    /// path; when some devices or uplinks are malformed, the others are still checked.
    pub fn from_yaml(text: &str) -> Result<Self, ConfigError> {
        let doc = parse_yaml(text).map_err(ConfigError::Syntax)?;
        let mut errs = ValidationErrors::default();
        crate::schema::gateway_config().check(&doc, "", &mut errs);
        if errs.0.is_empty() {
            let config: GatewayConfig = serde_json::from_value(doc).map_err(|e| {
                // The schema admits only what the types read; this is a bug, still reported.
                let mut errs = ValidationErrors::default();
                errs.push("document", e.to_string());
                ConfigError::Invalid(errs)
            })?;
            config.validate_semantics(&mut errs);
            return errs.into_result().map(|()| config).map_err(ConfigError::Invalid);
        }
        check_well_formed_parts(&doc, &mut errs);
        Err(ConfigError::Invalid(errs))
    }
}

/// Runs the semantic checks on every device and uplink of a document that has no structural
/// problem of its own, so that one run reports all problems of the document.
fn check_well_formed_parts(doc: &Value, errs: &mut ValidationErrors) {
    fn parts<T: serde::de::DeserializeOwned>(doc: &Value, field: &str, errs: &ValidationErrors) -> Vec<(usize, T)> {
        let items = doc.get(field).and_then(Value::as_array).map(Vec::as_slice).unwrap_or_default();
        // The items with a problem of their own (`field[i]`, `field[i].x`, `field[i][j]`), found
        // in one pass over the problems rather than one per item.
        let malformed: BTreeSet<usize> = errs
            .0
            .iter()
            .filter_map(|e| {
                let rest = e.path.strip_prefix(field)?.strip_prefix('[')?;
                let (index, rest) = rest.split_once(']')?;
                let whole = rest.is_empty() || rest.starts_with(['.', '[']);
                // The index as the path spells it: digits, no sign or leading zero.
                let plain = index == "0" || (!index.starts_with('0') && index.bytes().all(|b| b.is_ascii_digit()));
                if whole && plain { index.parse().ok() } else { None }
            })
            .collect();
        items
            .iter()
            .enumerate()
            .filter(|(i, _)| !malformed.contains(i))
            .filter_map(|(i, v)| Some((i, T::deserialize(v).ok()?)))
            .collect()
    }
    let devices: Vec<(usize, GatewayDevice)> = parts(doc, "devices", errs);
    let uplinks: Vec<(usize, GatewayUplink)> = parts(doc, "uplinks", errs);
    // Uplinks may name any device of the document, well-formed or not.
    let names = doc.get("devices").and_then(Value::as_array).map(Vec::as_slice).unwrap_or_default();
    let known: BTreeSet<(&str, &str)> = names
        .iter()
        .filter_map(|d| {
            let ns = d.get("namespace").map_or(Some("default"), Value::as_str)?;
            Some((ns, d.get("name")?.as_str()?))
        })
        .collect();
    crate::validate::validate_parts(
        errs,
        devices.iter().map(|(i, d)| (*i, d)),
        uplinks.iter().map(|(i, u)| (*i, u)),
        &known,
    );
}

/// Parses YAML (or JSON) text into a document tree, as [`GatewayConfig::from_yaml`] does first
/// (with the same node budget).
pub fn parse_yaml(text: &str) -> Result<Value, serde_saphyr::Error> {
    // The parser's default budget (250k nodes) refuses a node with ~13k devices; a device
    // is ~20 nodes. Allow a few hundred thousand devices; the file size bounds the rest.
    let mut budget = serde_saphyr::Budget::default();
    budget.max_nodes = 8_000_000;
    budget.max_events = 16_000_000;
    let mut options = serde_saphyr::Options::default();
    options.budget = Some(budget);
    serde_saphyr::from_str_with_options(text, options)
}
