//! Builds the `GatewayConfig` documents the tests run the gateway with.

use std::time::Duration;

use anyhow::{Context, Result};
use fieldgate_crds::{
    BufferSpec, Encoding, GatewayConfig, GatewayDevice, GatewayUplink, HttpUplink, MqttUplink, OnFull,
};

/// The JetStream stream of an uplink's buffer, per the delivery contract.
pub fn stream_name(namespace: &str, uplink: &str) -> String {
    format!("fieldgate_{namespace}_{}", uplink.replace('.', "_"))
}

/// The subject of an uplink's buffer stream, per the delivery contract.
pub fn stream_subject(namespace: &str, uplink: &str) -> String {
    format!("fieldgate.{namespace}.{}", uplink.replace('.', "_"))
}

/// A `GatewayConfig` under construction.
#[derive(Clone, Debug)]
pub struct ConfigBuilder {
    config: GatewayConfig,
}

impl Default for ConfigBuilder {
    fn default() -> Self {
        Self::new()
    }
}

/// The namespace the tests use.
pub const NAMESPACE: &str = "default";
/// The uplink name the tests use.
pub const UPLINK: &str = "cloud";

/// An MQTT uplink in namespace `default` with test-friendly settings: protocol 5, JSON,
/// `redeliverAfter: 2s` (so a crash is recovered quickly), no device filter.
/// Panics on a `url` that is not a broker URL (a bug in the test).
#[allow(clippy::expect_used)]
pub fn mqtt_uplink(name: &str, url: &str) -> GatewayUplink {
    GatewayUplink {
        namespace: NAMESPACE.to_string(),
        name: name.to_string(),
        devices: None,
        mqtt: Some(MqttUplink {
            url: url.parse().expect("a broker URL"),
            protocol_version: Some(5),
            topic: None,
            command_topic: None,
            qos: None,
            client_id: None,
            keep_alive: Some(Duration::from_secs(5).into()),
            max_in_flight: None,
            auth: None,
            tls: None,
        }),
        http: None,
        encoding: Some(Encoding::Json),
        compression: None,
        sparkplug: None,
        buffer: Some(BufferSpec {
            max_bytes: None,
            max_age: None,
            on_full: None,
            redeliver_after: Some(Duration::from_secs(2).into()),
            linger: None,
        }),
    }
}

/// An HTTP uplink named `name` POSTing batches to `url`, otherwise as [`mqtt_uplink`].
/// Panics on a `url` that is not an HTTP URL (a bug in the test).
#[allow(clippy::expect_used)]
pub fn http_uplink(name: &str, url: &str) -> GatewayUplink {
    GatewayUplink {
        mqtt: None,
        http: Some(HttpUplink { url: url.parse().expect("an HTTP URL"), ..Default::default() }),
        ..mqtt_uplink(name, "mqtt://127.0.0.1:1")
    }
}

/// The HTTP settings of an uplink made by [`http_uplink`] (panics on another kind: a bug in
/// the test).
#[allow(clippy::expect_used)]
pub fn http_of(u: &mut GatewayUplink) -> &mut HttpUplink {
    u.http.as_mut().expect("an HTTP uplink")
}

impl ConfigBuilder {
    /// An empty, valid document.
    pub fn new() -> Self {
        Self {
            config: GatewayConfig {
                api_version: GatewayConfig::API_VERSION.to_string(),
                kind: GatewayConfig::KIND.to_string(),
                node: Some(crate::gateway::NODE.to_string()),
                version: None,
                devices: Vec::new(),
                uplinks: Vec::new(),
            },
        }
    }

    /// Adds a device.
    pub fn device(mut self, d: GatewayDevice) -> Self {
        self.config.devices.push(d);
        self
    }

    /// Adds devices.
    pub fn devices(mut self, ds: impl IntoIterator<Item = GatewayDevice>) -> Self {
        self.config.devices.extend(ds);
        self
    }

    /// Adds an uplink.
    pub fn uplink(mut self, u: GatewayUplink) -> Self {
        self.config.uplinks.push(u);
        self
    }

    /// Adds the standard test uplink `default/cloud` to `url`, changed by `edit`.
    pub fn cloud(self, url: &str, edit: impl FnOnce(&mut GatewayUplink)) -> Self {
        let mut u = mqtt_uplink(UPLINK, url);
        edit(&mut u);
        self.uplink(u)
    }

    /// The document.
    pub fn build(self) -> GatewayConfig {
        self.config
    }

    /// The document as YAML (checked to parse back).
    pub fn yaml(&self) -> Result<String> {
        to_yaml(&self.config)
    }
}

/// Serializes a config as YAML and checks it parses back to the same value.
pub fn to_yaml(cfg: &GatewayConfig) -> Result<String> {
    let text = serde_saphyr::to_string(cfg).context("serializing the gateway config")?;
    let back = GatewayConfig::from_yaml(&text).with_context(|| format!("re-reading\n{text}"))?;
    anyhow::ensure!(back == *cfg, "the config YAML does not round-trip:\n{text}");
    Ok(text)
}

/// The MQTT settings of an uplink made by [`mqtt_uplink`] (panics on another kind: a bug in
/// the test).
#[allow(clippy::expect_used)]
pub fn mqtt_of(u: &mut GatewayUplink) -> &mut MqttUplink {
    u.mqtt.as_mut().expect("an MQTT uplink")
}

/// Sets the buffer limits of an uplink (keeping `redeliverAfter`). Panics on a `max_bytes`
/// that is not a byte quantity (a bug in the test).
#[allow(clippy::expect_used)]
pub fn set_buffer(u: &mut GatewayUplink, max_bytes: &str, on_full: OnFull) {
    let b = u.buffer.get_or_insert_with(BufferSpec::default);
    b.max_bytes = Some(max_bytes.parse().expect("a byte quantity"));
    b.on_full = Some(on_full);
}
