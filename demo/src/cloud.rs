//! The cloud side: an MQTT subscriber on the stand-in broker that decodes every reading with
//! the published schema (`fieldgate.v1.Reading`, protobuf or its JSON form), checks its values
//! against the simulator's register map, and counts distinct reading ids per device.
//!
//! Its session is persistent (clean session off, on a broker with persistence), so readings
//! the gateway delivers while the subscriber reconnects after a broker restart are kept for it.

use std::collections::{BTreeMap, HashSet};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use anyhow::{Context, Result, anyhow};
use fieldgate_crds::Point;
use fieldgate_proto::v1 as pb;
use prost::Message as _;
use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};
use serde_json::Value as Json;
use tokio_util::sync::CancellationToken;

/// How readings are encoded on the wire (the uplink's `encoding`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Wire {
    /// `encoding: json`.
    Json,
    /// `encoding: protobuf`.
    Protobuf,
}

/// What the cloud received from one device.
#[derive(Clone, Debug, Default)]
pub struct DeviceSeen {
    /// Distinct reading ids.
    pub ids: HashSet<String>,
    /// Messages, duplicates included.
    pub messages: u64,
    /// The last reading received.
    pub latest: Option<pb::Reading>,
    /// Readings whose values do not match the register map.
    pub bad_values: u64,
    /// Why the last such reading was wrong.
    pub last_bad: Option<String>,
}

/// What the cloud received.
#[derive(Clone, Debug, Default)]
pub struct Seen {
    /// By `namespace/device`.
    pub devices: BTreeMap<String, DeviceSeen>,
    /// Messages that did not decode as a reading.
    pub undecodable: u64,
    /// Why the last one did not.
    pub last_undecodable: Option<String>,
    /// Whether the subscriber is connected.
    pub connected: bool,
}

/// The running subscriber.
pub struct Cloud {
    seen: Arc<Mutex<Seen>>,
    stop: CancellationToken,
}

impl Cloud {
    /// Connects to the broker at `127.0.0.1:port`, subscribes to every reading topic, and
    /// returns once the subscription is acknowledged.
    pub async fn start(port: u16, wire: Wire, schema: Vec<Point>) -> Result<Self> {
        let mut options = MqttOptions::new("fieldgate-demo-cloud", "127.0.0.1", port);
        options.set_clean_session(false);
        options.set_keep_alive(Duration::from_secs(5));
        options.set_max_packet_size(1 << 20, 1 << 20);
        let (client, mut events) = AsyncClient::new(options, 1024);
        let seen = Arc::new(Mutex::new(Seen::default()));
        let stop = CancellationToken::new();
        let (subscribed_tx, subscribed_rx) = tokio::sync::oneshot::channel();
        let mut subscribed_tx = Some(subscribed_tx);
        let (state, cancel) = (Arc::clone(&seen), stop.clone());
        tokio::spawn(async move {
            loop {
                let event = tokio::select! {
                    () = cancel.cancelled() => return,
                    e = events.poll() => e,
                };
                match event {
                    Ok(Event::Incoming(Packet::ConnAck(_))) => {
                        lock(&state).connected = true;
                        let _ = client.subscribe("fieldgate/#", QoS::AtLeastOnce).await;
                    }
                    Ok(Event::Incoming(Packet::SubAck(_))) => {
                        if let Some(tx) = subscribed_tx.take() {
                            let _ = tx.send(());
                        }
                    }
                    Ok(Event::Incoming(Packet::Publish(p))) => record(&mut lock(&state), &p.payload, wire, &schema),
                    Ok(_) => {}
                    Err(_) => {
                        lock(&state).connected = false;
                        tokio::select! {
                            () = cancel.cancelled() => return,
                            () = tokio::time::sleep(Duration::from_millis(200)) => {}
                        }
                    }
                }
            }
        });
        tokio::time::timeout(Duration::from_secs(30), subscribed_rx)
            .await
            .map_err(|_| anyhow!("the cloud subscriber got no subscription from 127.0.0.1:{port} in 30 s"))?
            .context("the cloud subscriber stopped")?;
        Ok(Self { seen, stop })
    }

    /// What was received so far.
    pub fn seen(&self) -> Seen {
        lock(&self.seen).clone()
    }
}

impl Drop for Cloud {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

fn lock(m: &Mutex<Seen>) -> std::sync::MutexGuard<'_, Seen> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Decodes one message with the published schema.
pub fn decode(payload: &[u8], wire: Wire, schema: &[Point]) -> Result<pb::Reading> {
    match wire {
        Wire::Protobuf => pb::Reading::decode(payload).context("not a fieldgate.v1.Reading"),
        Wire::Json => {
            let j: Json = serde_json::from_slice(payload).context("not JSON")?;
            let text = |k: &str| j[k].as_str().map(str::to_string).ok_or_else(|| anyhow!("no {k:?} in {j}"));
            Ok(pb::Reading {
                id: text("id")?,
                namespace: text("namespace")?,
                device: text("device")?,
                node: j["node"].as_str().unwrap_or_default().to_string(),
                time_unix_nano: j["timeUnixNano"].as_u64().ok_or_else(|| anyhow!("no timeUnixNano in {j}"))?,
                buffer_seq: j["bufferSeq"].as_u64().unwrap_or_default(),
                points: fieldgate_sim::typed_points(&j, schema)?,
            })
        }
    }
}

fn record(seen: &mut Seen, payload: &[u8], wire: Wire, schema: &[Point]) {
    let reading = match decode(payload, wire, schema) {
        Ok(r) => r,
        Err(e) => {
            seen.undecodable += 1;
            seen.last_undecodable = Some(format!("{e:#}"));
            return;
        }
    };
    let device = seen.devices.entry(format!("{}/{}", reading.namespace, reading.device)).or_default();
    device.messages += 1;
    if let Err(e) = fieldgate_sim::check_sim_reading(&reading.points, schema) {
        device.bad_values += 1;
        device.last_bad = Some(format!("{}: {e:#}", reading.id));
    }
    device.ids.insert(reading.id.clone());
    device.latest = Some(reading);
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    #[test]
    fn both_encodings_decode_to_the_same_reading() {
        let schema = fieldgate_sim::simulated_points(0);
        let json = br#"{"id":"default/sim-0/1000","namespace":"default","device":"sim-0","timeUnixNano":1000000000,
            "bufferSeq":7,"points":[{"name":"u16","value":3},{"name":"i16","value":-3},{"name":"label","value":"SIM00000"}]}"#;
        let r = decode(json, Wire::Json, &schema).unwrap();
        assert_eq!((r.id.as_str(), r.buffer_seq, r.points.len()), ("default/sim-0/1000", 7, 3));
        assert_eq!(r.points[1].value, Some(pb::point::Value::IntValue(-3)));
        let bytes = r.encode_to_vec();
        assert_eq!(decode(&bytes, Wire::Protobuf, &schema).unwrap(), r);
        // Protobuf bytes are not JSON, and JSON bytes are no reading.
        assert!(decode(&bytes, Wire::Json, &schema).is_err());
        assert!(decode(b"\x0a\xff\xff", Wire::Protobuf, &schema).is_err());
    }
}
