//! An independent Sparkplug B decoder: Eclipse Tahu's own JavaScript library (npm
//! `sparkplug-payload`, installed by `scripts/setup.sh` into `tests/sparkplug/node_modules`),
//! run by Node.js on the payloads the cloud received (`tests/sparkplug/decode.js`).

use std::io::Write;
use std::process::{Command, Stdio};

use anyhow::{Context, Result, anyhow, bail};
use serde_json::Value as Json;

use crate::{find_executable, workspace_root};

/// One message as Tahu's decoder read it.
#[derive(Clone, Debug)]
pub struct TahuMessage {
    /// The topic it arrived on.
    pub topic: String,
    /// `decodePayload`'s result: `timestamp`, `seq` (64-bit integers as decimal strings),
    /// `metrics` (each with `name`, `alias`, `timestamp`, `type` such as `"UInt64"`, `value`).
    pub payload: Json,
}

impl TahuMessage {
    /// The message type of the topic (`NBIRTH`, `DDATA`, ...).
    pub fn kind(&self) -> &str {
        self.topic.split('/').nth(2).unwrap_or_default()
    }

    /// The edge node id of the topic.
    pub fn edge_node(&self) -> &str {
        self.topic.split('/').nth(3).unwrap_or_default()
    }

    /// The device id of the topic (device messages).
    pub fn device(&self) -> Option<&str> {
        self.topic.split('/').nth(4)
    }

    /// The payload's `seq`.
    pub fn seq(&self) -> Option<u64> {
        as_u64(&self.payload["seq"])
    }

    /// The decoded metrics.
    pub fn metrics(&self) -> &[Json] {
        self.payload["metrics"].as_array().map(Vec::as_slice).unwrap_or_default()
    }

    /// The value of the metric named `name`.
    pub fn metric(&self, name: &str) -> Option<&Json> {
        self.metrics().iter().find(|m| m["name"] == name).map(|m| &m["value"])
    }
}

/// A decoded integer: a JSON number, or a decimal string (64-bit values).
pub fn as_u64(v: &Json) -> Option<u64> {
    v.as_u64().or_else(|| v.as_str().and_then(|s| s.parse().ok()))
}

/// A decoded signed integer: a JSON number, or a decimal string (64-bit values).
pub fn as_i64(v: &Json) -> Option<i64> {
    v.as_i64().or_else(|| v.as_str().and_then(|s| s.parse().ok()))
}

/// Decodes `(topic, payload)` pairs with Eclipse Tahu's `sparkplug-payload`. A missing Node.js
/// or library is an error naming what to install.
pub fn decode(messages: &[(String, bytes::Bytes)]) -> Result<Vec<TahuMessage>> {
    use base64::Engine as _;
    let dir = workspace_root().join("tests/sparkplug");
    if !dir.join("node_modules/sparkplug-payload").is_dir() {
        bail!(
            "Eclipse Tahu's sparkplug-payload is not installed in {}: run scripts/setup.sh (npm ci --prefix tests/sparkplug)",
            dir.display()
        );
    }
    let node = find_executable("FIELDGATE_NODE", &[], "node").context("Node.js runs Tahu's decoder")?;
    let mut input = Vec::new();
    for (topic, payload) in messages {
        let line = serde_json::json!({
            "topic": topic,
            "payload": base64::engine::general_purpose::STANDARD.encode(payload),
        });
        writeln!(input, "{line}")?;
    }
    let mut child = Command::new(&node)
        .arg(dir.join("decode.js"))
        .current_dir(&dir)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("starting {}", node.display()))?;
    let mut stdin = child.stdin.take().ok_or_else(|| anyhow!("no stdin"))?;
    // Written from a thread: the decoder's output is read meanwhile, so neither pipe fills up.
    let writer = std::thread::spawn(move || stdin.write_all(&input));
    let out = child.wait_with_output()?;
    writer.join().map_err(|_| anyhow!("writer thread panicked"))??;
    if !out.status.success() {
        bail!("Tahu decoder exited {}: {}", out.status, String::from_utf8_lossy(&out.stderr));
    }
    let mut decoded = Vec::with_capacity(messages.len());
    for line in String::from_utf8(out.stdout)?.lines() {
        let j: Json = serde_json::from_str(line)?;
        let topic = j["topic"].as_str().unwrap_or_default().to_string();
        if let Some(e) = j.get("error") {
            bail!("Tahu's decoder refused the payload on {topic}: {e}");
        }
        decoded.push(TahuMessage { topic, payload: j["payload"].clone() });
    }
    if decoded.len() != messages.len() {
        bail!("Tahu's decoder answered {} of {} messages", decoded.len(), messages.len());
    }
    Ok(decoded)
}
