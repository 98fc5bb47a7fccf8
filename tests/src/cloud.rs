//! The cloud side: an MQTT 3.1.1 subscriber with a persistent session that records every
//! message the broker delivers.

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use anyhow::{Context, Result, anyhow, bail};
use bytes::Bytes;
use fieldgate_gateway::reading::Reading;
use prost::Message as _;
use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS, SubscribeReasonCode};
use serde_json::Value as Json;
use tokio::task::JoinHandle;
use tokio::time::Instant;

use crate::decode::{CloudDecoder, Decoded, MAX_DECOMPRESSED};
use crate::wait_until;

/// One message the cloud received.
#[derive(Clone, Debug)]
pub struct CloudMessage {
    /// Topic it was published to.
    pub topic: String,
    /// The payload as received.
    pub payload: Bytes,
    /// When the subscriber received it.
    pub at: Instant,
    /// What it was, decoded in order of arrival like a consumer would ([`CloudDecoder`]), or
    /// why it could not be.
    pub decoded: std::result::Result<Decoded, String>,
}

/// Identity of a received reading, enough for delivery accounting.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct ReadingKey {
    /// The reading's deterministic id.
    pub id: String,
    /// `namespace/device`.
    pub device: String,
    /// Position in the uplink's buffer.
    pub buffer_seq: u64,
    /// The simulator's sample number (point `sample`), for readings of simulated devices.
    pub sample: Option<u32>,
}

impl CloudMessage {
    /// A message of a stateless encoding (json, protobuf) received on its own, decoded.
    pub fn stateless(topic: &str, payload: Bytes, at: Instant) -> Self {
        let decoded = crate::decode::CloudDecoder::default().decode(topic, &payload).map_err(|e| format!("{e:#}"));
        Self { topic: topic.to_string(), payload, at, decoded }
    }

    /// The reading as JSON (the gateway's `json` shape), whatever the encoding and compression
    /// ([`CloudDecoder`]). A Sparkplug birth or death is not a reading: an error.
    pub fn json(&self) -> Result<Json> {
        match &self.decoded {
            Ok(Decoded::Reading(j)) => Ok(j.clone()),
            Ok(Decoded::Control(kind)) => bail!("{kind} on {} is not a reading", self.topic),
            Err(e) => bail!("{e}"),
        }
    }

    /// Whether the message is a reading (not a Sparkplug birth or death).
    pub fn is_reading(&self) -> bool {
        !matches!(self.decoded, Ok(Decoded::Control(_)))
    }

    /// The payload, decompressed, decoded as protobuf `fieldgate.v1.Reading`.
    pub fn protobuf(&self) -> Result<Reading> {
        let bytes = fieldgate_gateway::encoding::compress::decompress(&self.payload, MAX_DECOMPRESSED)?;
        Reading::decode(bytes.as_slice())
            .with_context(|| format!("protobuf payload on {} ({} bytes)", self.topic, self.payload.len()))
    }

    /// Id, device and buffer sequence of the reading.
    pub fn key(&self) -> Result<ReadingKey> {
        let j = self.json()?;
        let id = j["id"].as_str().ok_or_else(|| anyhow!("no id in {j}"))?.to_string();
        let device =
            format!("{}/{}", j["namespace"].as_str().unwrap_or_default(), j["device"].as_str().unwrap_or_default());
        let buffer_seq = j["bufferSeq"].as_u64().ok_or_else(|| anyhow!("no bufferSeq in {j}"))?;
        let sample = j["points"].as_array().and_then(|points| {
            points
                .iter()
                .find(|p| p["name"] == "sample")
                .and_then(|p| p["value"].as_u64())
                .and_then(|v| u32::try_from(v).ok())
        });
        Ok(ReadingKey { id, device, buffer_seq, sample })
    }
}

#[derive(Debug, Default)]
struct State {
    messages: Vec<CloudMessage>,
    connected: bool,
    connects: u64,
    subscribed: u64,
    last_error: Option<String>,
}

/// A subscriber with a fixed client id and `clean_session = false`: while it is away (or the
/// broker restarts with persistence) the broker queues its QoS 1 messages. It polls its event
/// loop in a background task, subscribes again after every reconnect, and records everything.
pub struct CloudSubscriber {
    client: AsyncClient,
    state: Arc<Mutex<State>>,
    task: JoinHandle<()>,
    filter: String,
}

/// How long the first connection and subscription may take.
pub const SUBSCRIBE_TIMEOUT: Duration = Duration::from_secs(30);

fn lock(state: &Mutex<State>) -> MutexGuard<'_, State> {
    state.lock().unwrap_or_else(|e| e.into_inner())
}

/// Host and port of an `mqtt://host:port` URL.
pub fn host_port(url: &str) -> Result<(String, u16)> {
    let rest = url.split_once("://").map(|(_, r)| r).unwrap_or(url);
    let (host, port) = rest.rsplit_once(':').ok_or_else(|| anyhow!("{url} has no port"))?;
    Ok((host.to_string(), port.parse().with_context(|| format!("port of {url}"))?))
}

impl CloudSubscriber {
    /// Connects to `url` (`mqtt://host:port`) as `client_id`, subscribes to `filter` with QoS 1
    /// and returns once the broker confirmed the subscription.
    pub async fn start(url: &str, client_id: &str, filter: &str) -> Result<Self> {
        let (host, port) = host_port(url)?;
        let mut opts = MqttOptions::new(client_id, host, port);
        opts.set_clean_session(false);
        opts.set_keep_alive(Duration::from_secs(5));
        opts.set_max_packet_size(16 * 1024 * 1024, 16 * 1024 * 1024);
        let (client, mut eventloop) = AsyncClient::new(opts, 64);
        let state = Arc::new(Mutex::new(State::default()));
        let task = {
            let state = Arc::clone(&state);
            let client = client.clone();
            let filter = filter.to_string();
            tokio::spawn(async move {
                let mut decoder = CloudDecoder::default();
                loop {
                    match eventloop.poll().await {
                        Ok(Event::Incoming(Packet::ConnAck(_))) => {
                            {
                                let mut s = lock(&state);
                                s.connected = true;
                                s.connects += 1;
                            }
                            // Also after a resumed session: cheap, and covers a broker that lost it.
                            if let Err(e) = client.try_subscribe(filter.clone(), QoS::AtLeastOnce) {
                                lock(&state).last_error = Some(format!("subscribe: {e}"));
                            }
                        }
                        Ok(Event::Incoming(Packet::SubAck(ack))) => {
                            let mut s = lock(&state);
                            if ack.return_codes.iter().all(|c| !matches!(c, SubscribeReasonCode::Failure)) {
                                s.subscribed += 1;
                            } else {
                                s.last_error = Some(format!("subscription refused: {ack:?}"));
                            }
                        }
                        Ok(Event::Incoming(Packet::Publish(p))) => {
                            let decoded = decoder.decode(&p.topic, &p.payload).map_err(|e| format!("{e:#}"));
                            lock(&state).messages.push(CloudMessage {
                                topic: p.topic,
                                payload: p.payload,
                                at: Instant::now(),
                                decoded,
                            });
                        }
                        Ok(_) => {}
                        Err(e) => {
                            {
                                let mut s = lock(&state);
                                s.connected = false;
                                s.last_error = Some(e.to_string());
                            }
                            // rumqttc has no reconnect backoff of its own.
                            tokio::time::sleep(Duration::from_millis(200)).await;
                        }
                    }
                }
            })
        };
        let sub = Self { client, state, task, filter: filter.to_string() };
        let s = Arc::clone(&sub.state);
        wait_until(&format!("subscription to {filter} at {url}"), SUBSCRIBE_TIMEOUT, || {
            let st = lock(&s);
            let r = (st.subscribed > 0).then_some(());
            let err = st.last_error.clone();
            async move {
                if r.is_none()
                    && let Some(e) = err
                {
                    // Keep waiting, but say why if the wait ends.
                    return Err(anyhow!("{e}"));
                }
                Ok(r)
            }
        })
        .await?;
        Ok(sub)
    }

    /// The topic filter.
    pub fn filter(&self) -> &str {
        &self.filter
    }

    /// A copy of every message received so far, in order of arrival.
    pub fn messages(&self) -> Vec<CloudMessage> {
        lock(&self.state).messages.clone()
    }

    /// Number of messages received so far.
    pub fn count(&self) -> usize {
        lock(&self.state).messages.len()
    }

    /// Whether the subscriber is connected now.
    pub fn is_connected(&self) -> bool {
        lock(&self.state).connected
    }

    /// Connections established so far (1 + reconnects).
    pub fn connects(&self) -> u64 {
        lock(&self.state).connects
    }

    /// Every received reading as JSON, whatever its encoding (Sparkplug births and deaths left
    /// out).
    pub fn readings(&self) -> Result<Vec<Json>> {
        self.messages().iter().filter(|m| m.is_reading()).map(CloudMessage::json).collect()
    }

    /// Id, device and buffer sequence of every received reading.
    pub fn keys(&self) -> Result<Vec<ReadingKey>> {
        self.messages().iter().filter(|m| m.is_reading()).map(CloudMessage::key).collect()
    }

    /// The distinct reading ids received.
    pub fn unique_ids(&self) -> Result<BTreeSet<String>> {
        Ok(self.keys()?.into_iter().map(|k| k.id).collect())
    }

    /// Waits until a JSON reading of `device` (`namespace/name`) carries point `name` = `value`.
    pub async fn wait_value(&self, device: &str, name: &str, value: &Json, timeout: Duration) -> Result<()> {
        self.wait_for(&format!("{device}.{name} = {value} at the cloud"), timeout, |msgs| {
            has_value(msgs, device, name, value)
        })
        .await
    }

    /// Waits until `cond` holds for the messages received so far.
    pub async fn wait_for<F>(&self, what: &str, timeout: Duration, mut cond: F) -> Result<()>
    where
        F: FnMut(&[CloudMessage]) -> bool,
    {
        let state = Arc::clone(&self.state);
        let result = wait_until(what, timeout, || {
            let s = lock(&state);
            let done = cond(&s.messages);
            async move { Ok(done.then_some(())) }
        })
        .await;
        if let Err(e) = result {
            let s = lock(&self.state);
            bail!(
                "{e:#} (cloud subscriber: {} messages, connected {}, last error {:?})",
                s.messages.len(),
                s.connected,
                s.last_error
            );
        }
        Ok(())
    }

    /// Waits until at least `n` messages arrived.
    pub async fn wait_for_count(&self, n: usize, timeout: Duration) -> Result<()> {
        self.wait_for(&format!("{n} cloud messages"), timeout, |m| m.len() >= n).await
    }

    /// Publishes a message (QoS 1) through this subscriber's own connection; for harness tests.
    pub async fn publish(&self, topic: &str, payload: Vec<u8>) -> Result<()> {
        self.client.publish(topic, QoS::AtLeastOnce, false, payload).await.map_err(|e| anyhow!("publish: {e}"))
    }

    /// Disconnects cleanly (the broker keeps the persistent session and queues for it) and
    /// stops the background task.
    pub async fn close(self) {
        if self.client.disconnect().await.is_ok() {
            let state = Arc::clone(&self.state);
            let _ = wait_until("the subscriber to disconnect", Duration::from_secs(10), || {
                let done = !lock(&state).connected;
                async move { Ok(done.then_some(())) }
            })
            .await;
        }
    }
}

impl Drop for CloudSubscriber {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Whether `msgs` hold a JSON reading of `device` (`namespace/name`) with point `name` = `value`.
pub fn has_value(msgs: &[CloudMessage], device: &str, name: &str, value: &Json) -> bool {
    msgs.iter().filter_map(|m| m.json().ok()).any(|r| {
        r["device"] == device
            && r["points"].as_array().is_some_and(|ps| ps.iter().any(|p| p["name"] == name && p["value"] == *value))
    })
}
