//! The cloud side over MQTT v5: a subscriber that records each message with its content type
//! and user properties (where the gateway puts the W3C `traceparent` and a compressed
//! message's `content-encoding`), decoded like a consumer would ([`CloudDecoder`]).

use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use anyhow::{Result, anyhow};
use bytes::Bytes;
use rumqttc::v5::mqttbytes::QoS;
use rumqttc::v5::mqttbytes::v5::Packet;
use rumqttc::v5::{AsyncClient, Event, MqttOptions};
use tokio::task::JoinHandle;

use crate::cloud::host_port;
use crate::decode::{CloudDecoder, Decoded};
use crate::wait_until;

/// One message received over MQTT v5.
#[derive(Clone, Debug)]
pub struct V5Message {
    /// Topic.
    pub topic: String,
    /// Payload.
    pub payload: Bytes,
    /// User properties, in order.
    pub user_properties: Vec<(String, String)>,
    /// The content type property.
    pub content_type: Option<String>,
    /// What it was, decoded in order of arrival, or why it could not be.
    pub decoded: std::result::Result<Decoded, String>,
}

impl V5Message {
    /// A user property's value.
    pub fn property(&self, name: &str) -> Option<&str> {
        self.user_properties.iter().find(|(k, _)| k == name).map(|(_, v)| v.as_str())
    }

    /// The reading id, whatever the encoding.
    pub fn reading_id(&self) -> Option<String> {
        match &self.decoded {
            Ok(Decoded::Reading(j)) => j["id"].as_str().map(str::to_string),
            _ => None,
        }
    }
}

#[derive(Default)]
struct State {
    messages: Vec<V5Message>,
    subscribed: bool,
    last_error: Option<String>,
}

fn lock(s: &Mutex<State>) -> MutexGuard<'_, State> {
    s.lock().unwrap_or_else(|e| e.into_inner())
}

/// A v5 subscriber with a persistent session (messages queue while it is away).
pub struct V5Subscriber {
    state: Arc<Mutex<State>>,
    task: JoinHandle<()>,
}

impl V5Subscriber {
    /// Connects to `url` as `client_id`, subscribes to `filter` (QoS 1) and returns once the
    /// broker confirmed.
    pub async fn start(url: &str, client_id: &str, filter: &str) -> Result<Self> {
        let (host, port) = host_port(url)?;
        let mut opts = MqttOptions::new(client_id, host, port);
        opts.set_clean_start(false);
        opts.set_keep_alive(Duration::from_secs(5));
        // Keep the session while away (mosquitto queues QoS 1 for it).
        opts.set_session_expiry_interval(Some(3600));
        let (client, mut eventloop) = AsyncClient::new(opts, 64);
        let state = Arc::new(Mutex::new(State::default()));
        let task = {
            let state = Arc::clone(&state);
            let filter = filter.to_string();
            tokio::spawn(async move {
                let mut decoder = CloudDecoder::default();
                loop {
                    match eventloop.poll().await {
                        Ok(Event::Incoming(Packet::ConnAck(_))) => {
                            if let Err(e) = client.try_subscribe(filter.clone(), QoS::AtLeastOnce) {
                                lock(&state).last_error = Some(format!("subscribe: {e}"));
                            }
                        }
                        Ok(Event::Incoming(Packet::SubAck(_))) => lock(&state).subscribed = true,
                        Ok(Event::Incoming(Packet::Publish(p))) => {
                            let (user_properties, content_type) =
                                p.properties.map(|pr| (pr.user_properties, pr.content_type)).unwrap_or_default();
                            let topic = String::from_utf8_lossy(&p.topic).into_owned();
                            let decoded = decoder.decode(&topic, &p.payload).map_err(|e| format!("{e:#}"));
                            lock(&state).messages.push(V5Message {
                                topic,
                                payload: p.payload,
                                user_properties,
                                content_type,
                                decoded,
                            });
                        }
                        Ok(_) => {}
                        Err(e) => {
                            lock(&state).last_error = Some(e.to_string());
                            tokio::time::sleep(Duration::from_millis(200)).await;
                        }
                    }
                }
            })
        };
        let sub = Self { state, task };
        let s = Arc::clone(&sub.state);
        wait_until(&format!("v5 subscription to {filter}"), Duration::from_secs(30), || {
            let st = lock(&s);
            let done = st.subscribed.then_some(());
            let err = st.last_error.clone();
            async move {
                match (done, err) {
                    (None, Some(e)) => Err(anyhow!("{e}")),
                    (d, _) => Ok(d),
                }
            }
        })
        .await?;
        Ok(sub)
    }

    /// Every message received so far.
    pub fn messages(&self) -> Vec<V5Message> {
        lock(&self.state).messages.clone()
    }
}

impl Drop for V5Subscriber {
    fn drop(&mut self) {
        self.task.abort();
    }
}
