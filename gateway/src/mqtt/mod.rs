//! The one MQTT client of the gateway (rumqttc, 3.1.1 and 5): an [`Endpoint`] made from a
//! [`BrokerUrl`] (parsed once, with the config), opened as a [`Session`] with its [`Events`] —
//! one typed event stream.
//!
//! Every MQTT connection the gateway makes goes through here: the uplink to the cloud, the
//! command session on the uplink's broker, field MQTT ingest and commands to MQTT devices
//! (on the device's own ingest session). That is where URL, TLS, credentials, protocol
//! version, client id, keep-alive and the maximum packet size are applied, the same way for
//! both protocol versions; and where a [`Publication`] (topic, payload, QoS, content type,
//! compression) and a session's will become rumqttc packets and MQTT 5 properties.
//!
//! rumqttc's `publish()` returning Ok only means *queued*. A publish here carries a caller
//! token; the event loop reports QoS 1 publishes in the order they were queued
//! (`Outgoing::Publish(pkid)`), which binds the token to a packet id, and the broker's PUBACK
//! for that packet id comes back as [`Event::Published`] with the token and the raw reason
//! code. This correlation happens in whichever task polls [`Events::next`]. A connection
//! error comes as [`Event::Lost`]: tokens not confirmed by then never are (the session's
//! in-flight replay is not relied on).

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use bytes::Bytes;
use fieldgate_crds::BrokerUrl;
use rumqttc::{TlsConfiguration, Transport};

use crate::secrets::SecretBytes;

/// Largest MQTT packet sent or received unless an endpoint says otherwise. rumqttc's own
/// default (10 KiB) is smaller than a batch of readings or a command message.
pub const DEFAULT_MAX_PACKET_BYTES: usize = 1 << 20;
/// Keep-alive unless an endpoint says otherwise.
pub const DEFAULT_KEEP_ALIVE: Duration = Duration::from_secs(30);
/// Session expiry asked for by persistent sessions on MQTT 5 (seconds).
pub const SESSION_EXPIRY_SECS: u32 = 24 * 3600;
/// The W3C trace context user property (MQTT 5).
const TRACEPARENT: &str = crate::telemetry::TRACEPARENT;
/// MQTT 5 user property naming a message's compression (`gzip` or `zstd`; absent: none).
pub const CONTENT_ENCODING: &str = "content-encoding";

/// One MQTT message to publish, with what MQTT 5 says about it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Publication {
    /// Topic.
    pub topic: String,
    /// Payload, as sent.
    pub payload: Bytes,
    /// QoS 1 (else 0).
    pub qos1: bool,
    /// MQTT 5 content type (not sent over MQTT 3.1.1).
    pub content_type: Option<&'static str>,
    /// Compression applied to the payload, told by the MQTT 5 user property
    /// [`CONTENT_ENCODING`] (over MQTT 3.1.1 the payload's first bytes tell).
    pub content_encoding: Option<&'static str>,
}

impl Publication {
    /// A message with neither content type nor compression.
    pub fn plain(topic: String, payload: impl Into<Bytes>, qos1: bool) -> Self {
        Self { topic, payload: payload.into(), qos1, content_type: None, content_encoding: None }
    }

    fn qos_v4(&self) -> rumqttc::QoS {
        if self.qos1 { rumqttc::QoS::AtLeastOnce } else { rumqttc::QoS::AtMostOnce }
    }

    fn qos_v5(&self) -> rumqttc::v5::mqttbytes::QoS {
        if self.qos1 { rumqttc::v5::mqttbytes::QoS::AtLeastOnce } else { rumqttc::v5::mqttbytes::QoS::AtMostOnce }
    }

    /// The MQTT 5 properties: content type, compression (user property [`CONTENT_ENCODING`])
    /// and a sampled reading's `traceparent`. `None` when there are none.
    fn properties_v5(&self, traceparent: Option<&str>) -> Option<rumqttc::v5::mqttbytes::v5::PublishProperties> {
        let mut user_properties = Vec::new();
        if let Some(c) = self.content_encoding {
            user_properties.push((CONTENT_ENCODING.to_string(), c.to_string()));
        }
        if let Some(tp) = traceparent {
            user_properties.push((TRACEPARENT.to_string(), tp.to_string()));
        }
        if self.content_type.is_none() && user_properties.is_empty() {
            return None;
        }
        Some(rumqttc::v5::mqttbytes::v5::PublishProperties {
            content_type: self.content_type.map(str::to_string),
            user_properties,
            ..Default::default()
        })
    }

    /// As the will of an MQTT 3.1.1 session.
    fn will_v4(&self) -> rumqttc::LastWill {
        rumqttc::LastWill::new(self.topic.clone(), self.payload.clone(), self.qos_v4(), false)
    }

    /// As the will of an MQTT 5 session (with its content type).
    fn will_v5(&self) -> rumqttc::v5::mqttbytes::v5::LastWill {
        let properties = self.content_type.map(|c| rumqttc::v5::mqttbytes::v5::LastWillProperties {
            content_type: Some(c.to_string()),
            delay_interval: None,
            payload_format_indicator: None,
            message_expiry_interval: None,
            response_topic: None,
            correlation_data: None,
            user_properties: Vec::new(),
        });
        rumqttc::v5::mqttbytes::v5::LastWill::new(
            self.topic.clone(),
            self.payload.clone(),
            self.qos_v5(),
            false,
            properties,
        )
    }
}

/// MQTT protocol version.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Version {
    /// MQTT 3.1.1.
    V311,
    /// MQTT 5.
    V5,
}

impl Version {
    /// `3` (3.1.1) or `5`, as configured; anything else is `None`.
    pub fn from_number(n: u8) -> Option<Self> {
        match n {
            3 | 4 => Some(Version::V311),
            5 => Some(Version::V5),
            _ => None,
        }
    }
}

/// Where and how to connect: everything but what the session does.
#[derive(Clone)]
pub struct Endpoint {
    /// Broker host (an IPv6 address without brackets).
    pub host: String,
    /// Broker port.
    pub port: u16,
    /// TLS client configuration (`mqtts://`).
    pub tls: Option<Arc<rustls::ClientConfig>>,
    /// Username and password.
    pub credentials: Option<(String, SecretBytes)>,
    /// Protocol version.
    pub version: Version,
    /// Client identifier.
    pub client_id: String,
    /// Keep-alive interval.
    pub keep_alive: Duration,
    /// Largest packet sent or received.
    pub max_packet_bytes: usize,
}

impl std::fmt::Debug for Endpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Endpoint")
            .field("host", &self.host)
            .field("port", &self.port)
            .field("tls", &self.tls.is_some())
            .field("user", &self.credentials.as_ref().map(|(u, _)| u))
            .field("version", &self.version)
            .field("client_id", &self.client_id)
            .finish_non_exhaustive()
    }
}

impl Endpoint {
    /// An endpoint at `url` (parsed once, when the config was read). The other settings start
    /// at their defaults (MQTT 5, no credentials, no TLS configuration yet: a caller whose
    /// `url.tls()` is true sets one).
    pub fn new(url: &BrokerUrl, client_id: impl Into<String>) -> Self {
        Self {
            host: url.host().to_string(),
            port: url.port(),
            tls: None,
            credentials: None,
            version: Version::V5,
            client_id: client_id.into(),
            keep_alive: DEFAULT_KEEP_ALIVE,
            max_packet_bytes: DEFAULT_MAX_PACKET_BYTES,
        }
    }

    fn transport(&self) -> Transport {
        match &self.tls {
            Some(cfg) => Transport::tls_with_config(TlsConfiguration::Rustls(Arc::clone(cfg))),
            None => Transport::tcp(),
        }
    }

    fn password(&self) -> Option<(String, String)> {
        self.credentials.as_ref().map(|(u, p)| {
            // Secrets written by hand often end with a newline.
            let p = String::from_utf8_lossy(p.expose()).trim_end_matches(['\r', '\n']).to_string();
            (u.clone(), p)
        })
    }
}

/// What the session does on the connection.
#[derive(Clone, Copy, Debug)]
pub struct SessionOptions {
    /// Keep the broker-side session (subscriptions, unacknowledged messages) across
    /// connections: `clean_session = false`, and on MQTT 5 a session expiry of a day.
    pub persistent: bool,
    /// Incoming QoS 1 messages are acknowledged only by [`Session::ack`].
    pub manual_acks: bool,
    /// Outgoing publishes awaiting acknowledgement at once.
    pub max_in_flight: u16,
    /// Requests queued to the event loop at once.
    pub capacity: usize,
    /// Sends each packet at once (`TCP_NODELAY`), for sessions where a packet's latency
    /// counts more than the number of packets (commands and their results). Without it, a
    /// small packet written while the previous one is unacknowledged waits for the peer's
    /// delayed TCP acknowledgement (up to 40 ms on Linux).
    pub no_delay: bool,
}

impl Default for SessionOptions {
    fn default() -> Self {
        Self { persistent: false, manual_acks: false, max_in_flight: 100, capacity: 64, no_delay: false }
    }
}

/// A client failure.
#[derive(Debug, thiserror::Error)]
pub enum MqttError {
    /// The connection failed or was lost (unreachable, reset, timed out).
    #[error("connection: {0}")]
    Connection(String),
    /// The broker answered and refused the connection (CONNACK with a failure code): trying
    /// again soon would be refused again.
    #[error("connection refused by the broker: {0}")]
    Refused(String),
    /// The request queue to the event loop refused a request (full or closed).
    #[error("request queue: {0}")]
    Queue(String),
    /// The broker sent a packet larger than the endpoint's `max_packet_bytes`: rumqttc ends
    /// the connection before reading it.
    #[error("the broker sent a packet of {0} bytes, above the client's limit")]
    PacketTooLarge(usize),
}

impl MqttError {
    /// A static label for metrics.
    pub fn kind(&self) -> &'static str {
        match self {
            MqttError::Connection(_) => "connect",
            MqttError::Refused(_) => "refused",
            MqttError::Queue(_) => "queue",
            MqttError::PacketTooLarge(_) => "packet_too_large",
        }
    }
}

/// The broker's answer to a QoS 1 publish: the raw PUBACK reason code (always 0 on 3.1.1).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PubAckCode(pub u8);

impl PubAckCode {
    /// Codes below 0x80 are successes (0x10: no matching subscribers).
    pub fn is_success(self) -> bool {
        self.0 < 0x80
    }

    /// The reason's name in the MQTT 5 specification, for logs and refusals.
    pub fn name(self) -> &'static str {
        match self.0 {
            0x00 => "Success",
            0x10 => "NoMatchingSubscribers",
            0x80 => "UnspecifiedError",
            0x83 => "ImplementationSpecificError",
            0x87 => "NotAuthorized",
            0x90 => "TopicNameInvalid",
            0x91 => "PacketIdentifierInUse",
            0x97 => "QuotaExceeded",
            0x99 => "PayloadFormatInvalid",
            _ => "Unknown",
        }
    }
}

impl From<&rumqttc::v5::mqttbytes::v5::PubAckReason> for PubAckCode {
    fn from(r: &rumqttc::v5::mqttbytes::v5::PubAckReason) -> Self {
        use rumqttc::v5::mqttbytes::v5::PubAckReason as R;
        PubAckCode(match r {
            R::Success => 0x00,
            R::NoMatchingSubscribers => 0x10,
            R::UnspecifiedError => 0x80,
            R::ImplementationSpecificError => 0x83,
            R::NotAuthorized => 0x87,
            R::TopicNameInvalid => 0x90,
            R::PacketIdentifierInUse => 0x91,
            R::QuotaExceeded => 0x97,
            R::PayloadFormatInvalid => 0x99,
        })
    }
}

/// What acknowledges an incoming QoS 1 message (with manual acks).
#[derive(Debug)]
pub enum AckHandle {
    /// MQTT 3.1.1.
    V4(rumqttc::Publish),
    /// MQTT 5.
    V5(rumqttc::v5::mqttbytes::v5::Publish),
}

/// A message the broker delivered.
#[derive(Debug)]
pub struct Incoming {
    /// Its topic.
    pub topic: String,
    /// Its payload.
    pub payload: Bytes,
    /// Whether it came with QoS 1 or 2 (to be acknowledged).
    pub qos1: bool,
    /// The sender's W3C trace context (MQTT 5 user property `traceparent`).
    pub traceparent: Option<String>,
    /// What acknowledges it.
    pub ack: AckHandle,
}

/// What the event stream reports.
// One at a time, straight to its consumer: boxing the message would cost an allocation per
// message for nothing.
#[allow(clippy::large_enum_variant)]
#[derive(Debug)]
pub enum Event<T> {
    /// The broker accepted the connection (CONNACK).
    Connected,
    /// The broker answered the publish tagged `token`.
    Published {
        /// The caller's token.
        token: T,
        /// The broker's reason code.
        code: PubAckCode,
    },
    /// The broker answered a subscription; `refused` filters were not granted.
    Subscribed {
        /// How many filters the broker refused.
        refused: usize,
    },
    /// A message arrived.
    Message(Incoming),
    /// The connection is gone. Polling again reconnects.
    Lost(MqttError),
}

#[derive(Clone)]
enum Client {
    V4(rumqttc::AsyncClient),
    V5(rumqttc::v5::AsyncClient),
}

// One per session: the size difference does not matter.
#[allow(clippy::large_enum_variant)]
enum Loop {
    V4(rumqttc::EventLoop),
    V5(rumqttc::v5::EventLoop),
}

/// Tokens of queued publishes whose packet id is not known yet, in queue order.
type Queued<T> = Arc<Mutex<VecDeque<T>>>;

/// The sending half of a session: publish, subscribe, acknowledge, disconnect. Cheap to clone.
pub struct Session<T> {
    client: Client,
    queued: Queued<T>,
}

impl<T> Clone for Session<T> {
    fn clone(&self) -> Self {
        Self { client: self.client.clone(), queued: Arc::clone(&self.queued) }
    }
}

/// The receiving half of a session: the one event stream. Nothing happens on the connection
/// unless it is polled.
pub struct Events<T> {
    el: Loop,
    queued: Queued<T>,
    by_pkid: HashMap<u16, T>,
}

/// Opens a session on `endpoint` (the connection is made when [`Events::next`] is polled).
pub fn open<T>(endpoint: &Endpoint, options: &SessionOptions) -> (Session<T>, Events<T>) {
    open_with_will(endpoint, options, None)
}

/// Opens a session on `endpoint` with a will: the message the broker publishes if the
/// connection ends without a DISCONNECT (the connection is made when [`Events::next`] is
/// polled).
pub fn open_with_will<T>(
    endpoint: &Endpoint,
    options: &SessionOptions,
    will: Option<&Publication>,
) -> (Session<T>, Events<T>) {
    let queued: Queued<T> = Arc::new(Mutex::new(VecDeque::new()));
    let e = endpoint;
    let (client, el) = match e.version {
        Version::V311 => {
            let mut o = rumqttc::MqttOptions::new(&e.client_id, &e.host, e.port);
            o.set_keep_alive(e.keep_alive)
                .set_clean_session(!options.persistent)
                .set_manual_acks(options.manual_acks)
                .set_inflight(options.max_in_flight)
                .set_request_channel_capacity(options.capacity)
                .set_max_packet_size(e.max_packet_bytes, e.max_packet_bytes)
                .set_transport(e.transport());
            if let Some((u, p)) = e.password() {
                o.set_credentials(u, p);
            }
            if let Some(w) = will {
                o.set_last_will(w.will_v4());
            }
            let (c, mut el) = rumqttc::AsyncClient::new(o, options.capacity);
            let mut network = el.network_options();
            network.set_tcp_nodelay(options.no_delay);
            el.set_network_options(network);
            (Client::V4(c), Loop::V4(el))
        }
        Version::V5 => {
            let mut o = rumqttc::v5::MqttOptions::new(&e.client_id, &e.host, e.port);
            o.set_keep_alive(e.keep_alive)
                .set_clean_start(!options.persistent)
                .set_manual_acks(options.manual_acks)
                .set_outgoing_inflight_upper_limit(options.max_in_flight)
                .set_request_channel_capacity(options.capacity)
                .set_max_packet_size(Some(u32::try_from(e.max_packet_bytes).unwrap_or(u32::MAX)))
                .set_transport(e.transport());
            if options.persistent {
                o.set_session_expiry_interval(Some(SESSION_EXPIRY_SECS));
            }
            if let Some((u, p)) = e.password() {
                o.set_credentials(u, p);
            }
            if let Some(w) = will {
                o.set_last_will(w.will_v5());
            }
            let mut network = o.network_options();
            network.set_tcp_nodelay(options.no_delay);
            o.set_network_options(network);
            let (c, el) = rumqttc::v5::AsyncClient::new(o, options.capacity);
            (Client::V5(c), Loop::V5(el))
        }
    };
    (Session { client, queued: Arc::clone(&queued) }, Events { el, queued, by_pkid: HashMap::new() })
}

impl<T> Session<T> {
    /// Queues a QoS 1 publish tagged with `token`; [`Event::Published`] reports its outcome.
    /// `traceparent` goes out as the MQTT 5 user property `traceparent` (3.1.1 has no
    /// properties: not sent there).
    pub fn publish(&self, token: T, topic: String, payload: Bytes, traceparent: Option<&str>) -> Result<(), MqttError> {
        self.publish_message(token, Publication::plain(topic, payload, true), traceparent)
    }

    /// Queues `message` tagged with `token`; a QoS 1 message's outcome comes as
    /// [`Event::Published`] (a QoS 0 one has none). On MQTT 5 its content type, compression
    /// and `traceparent` go out as properties; MQTT 3.1.1 has no properties, so none is sent
    /// there.
    pub fn publish_message(&self, token: T, message: Publication, traceparent: Option<&str>) -> Result<(), MqttError> {
        let mut q = self.queued.lock().unwrap_or_else(PoisonError::into_inner);
        // Every publish, QoS 0 too, is reported as `Outgoing::Publish` in queue order.
        q.push_back(token);
        let sent = match &self.client {
            Client::V4(c) => {
                { c.try_publish(message.topic.as_str(), message.qos_v4(), false, message.payload.clone()) }
                    .map_err(|e| e.to_string())
            }
            Client::V5(c) => {
                let qos = message.qos_v5();
                match message.properties_v5(traceparent) {
                    None => c.try_publish(message.topic, qos, false, message.payload),
                    Some(p) => c.try_publish_with_properties(message.topic, qos, false, message.payload, p),
                }
                .map_err(|e| e.to_string())
            }
        };
        if sent.is_err() {
            q.pop_back();
        }
        sent.map_err(MqttError::Queue)
    }

    /// Queues a QoS 1 subscription to `filter`.
    pub fn subscribe(&self, filter: &str) -> Result<(), MqttError> {
        match &self.client {
            Client::V4(c) => c.try_subscribe(filter, rumqttc::QoS::AtLeastOnce).map_err(|e| e.to_string()),
            Client::V5(c) => {
                c.try_subscribe(filter, rumqttc::v5::mqttbytes::QoS::AtLeastOnce).map_err(|e| e.to_string())
            }
        }
        .map_err(MqttError::Queue)
    }

    /// Acknowledges an incoming message (sessions with manual acks).
    pub async fn ack(&self, handle: &AckHandle) -> Result<(), MqttError> {
        match (&self.client, handle) {
            (Client::V4(c), AckHandle::V4(p)) => c.ack(p).await.map_err(|e| e.to_string()),
            (Client::V5(c), AckHandle::V5(p)) => c.ack(p).await.map_err(|e| e.to_string()),
            _ => Err("acknowledgement of another protocol version".into()),
        }
        .map_err(MqttError::Queue)
    }

    /// Asks the event loop to disconnect politely.
    pub async fn disconnect(&self) {
        let r = match &self.client {
            Client::V4(c) => c.disconnect().await.map_err(|e| e.to_string()),
            Client::V5(c) => c.disconnect().await.map_err(|e| e.to_string()),
        };
        if let Err(e) = r {
            tracing::debug!(error = %e, "disconnect not queued");
        }
    }
}

impl<T> Events<T> {
    /// The next event. Packets nobody acts on (pings, subscription and acknowledgement
    /// bookkeeping) are skipped.
    pub async fn next(&mut self) -> Event<T> {
        loop {
            if let Some(ev) = self.step().await {
                return ev;
            }
        }
    }

    fn published(&mut self, pkid: u16) {
        let token = self.queued.lock().unwrap_or_else(PoisonError::into_inner).pop_front();
        // Packet id 0: a QoS 0 publish, which no PUBACK answers.
        if let Some(token) = token
            && pkid != 0
        {
            self.by_pkid.insert(pkid, token);
        }
    }

    fn acked(&mut self, pkid: u16, code: PubAckCode) -> Option<Event<T>> {
        self.by_pkid.remove(&pkid).map(|token| Event::Published { token, code })
    }

    fn lost(&mut self, e: MqttError) -> Event<T> {
        // Unconfirmed tokens are never confirmed now.
        self.by_pkid.clear();
        self.queued.lock().unwrap_or_else(PoisonError::into_inner).clear();
        Event::Lost(e)
    }

    async fn step(&mut self) -> Option<Event<T>> {
        match &mut self.el {
            Loop::V4(el) => {
                use rumqttc::{Event as E, Outgoing, Packet, QoS, SubscribeReasonCode};
                match el.poll().await {
                    Ok(E::Incoming(Packet::ConnAck(_))) => Some(Event::Connected),
                    Ok(E::Outgoing(Outgoing::Publish(pkid))) => {
                        self.published(pkid);
                        None
                    }
                    Ok(E::Incoming(Packet::PubAck(a))) => self.acked(a.pkid, PubAckCode(0)),
                    Ok(E::Incoming(Packet::SubAck(a))) => Some(Event::Subscribed {
                        refused: a.return_codes.iter().filter(|c| matches!(c, SubscribeReasonCode::Failure)).count(),
                    }),
                    Ok(E::Incoming(Packet::Publish(p))) => Some(Event::Message(Incoming {
                        topic: p.topic.clone(),
                        payload: p.payload.clone(),
                        qos1: p.qos != QoS::AtMostOnce,
                        traceparent: None,
                        ack: AckHandle::V4(p),
                    })),
                    Ok(_) => None,
                    Err(e @ rumqttc::ConnectionError::ConnectionRefused(_)) => {
                        Some(self.lost(MqttError::Refused(e.to_string())))
                    }
                    Err(rumqttc::ConnectionError::MqttState(rumqttc::StateError::Deserialization(
                        rumqttc::Error::PayloadSizeLimitExceeded(n),
                    ))) => Some(self.lost(MqttError::PacketTooLarge(n))),
                    Err(e) => Some(self.lost(MqttError::Connection(e.to_string()))),
                }
            }
            Loop::V5(el) => {
                use rumqttc::Outgoing;
                use rumqttc::v5::Event as E;
                use rumqttc::v5::mqttbytes::QoS;
                use rumqttc::v5::mqttbytes::v5::{Packet, SubscribeReasonCode};
                match el.poll().await {
                    Ok(E::Incoming(Packet::ConnAck(_))) => Some(Event::Connected),
                    Ok(E::Outgoing(Outgoing::Publish(pkid))) => {
                        self.published(pkid);
                        None
                    }
                    Ok(E::Incoming(Packet::PubAck(a))) => self.acked(a.pkid, PubAckCode::from(&a.reason)),
                    Ok(E::Incoming(Packet::SubAck(a))) => Some(Event::Subscribed {
                        refused: a
                            .return_codes
                            .iter()
                            .filter(|c| !matches!(c, SubscribeReasonCode::Success(_)))
                            .count(),
                    }),
                    Ok(E::Incoming(Packet::Publish(p))) => {
                        let traceparent = p.properties.as_ref().and_then(|props| {
                            props.user_properties.iter().find(|(k, _)| k == TRACEPARENT).map(|(_, v)| v.clone())
                        });
                        Some(Event::Message(Incoming {
                            topic: String::from_utf8_lossy(&p.topic).into_owned(),
                            payload: p.payload.clone(),
                            qos1: p.qos != QoS::AtMostOnce,
                            traceparent,
                            ack: AckHandle::V5(p),
                        }))
                    }
                    Ok(_) => None,
                    Err(e @ rumqttc::v5::ConnectionError::ConnectionRefused(_)) => {
                        Some(self.lost(MqttError::Refused(e.to_string())))
                    }
                    Err(rumqttc::v5::ConnectionError::MqttState(rumqttc::v5::StateError::Deserialization(
                        rumqttc::v5::mqttbytes::Error::PayloadSizeLimitExceeded { pkt_size, .. },
                    ))) => Some(self.lost(MqttError::PacketTooLarge(pkt_size))),
                    Err(e) => Some(self.lost(MqttError::Connection(e.to_string()))),
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_endpoint_takes_host_and_port_from_the_broker_url() {
        let at = |url: &str| {
            let e = Endpoint::new(&url.parse().unwrap(), "c");
            (e.host, e.port)
        };
        assert_eq!(at("mqtt://broker:1884"), ("broker".to_string(), 1884));
        assert_eq!(at("mqtts://broker.example.com"), ("broker.example.com".to_string(), 8883));
        assert_eq!(at("mqtt://[::1]:1883/"), ("::1".to_string(), 1883));
        assert_eq!(at("tcp://10.0.0.7"), ("10.0.0.7".to_string(), 1883));
    }

    #[test]
    fn mqtt5_properties_say_content_type_compression_and_trace() {
        let mut p = Publication::plain("t".into(), b"x".to_vec(), true);
        assert!(p.properties_v5(None).is_none(), "nothing to say: no properties at all");
        p.content_type = Some("application/json");
        p.content_encoding = Some("zstd");
        let props = p.properties_v5(Some("00-abc-def-01")).unwrap();
        assert_eq!(props.content_type.as_deref(), Some("application/json"));
        assert_eq!(
            props.user_properties,
            [
                ("content-encoding".to_string(), "zstd".to_string()),
                ("traceparent".to_string(), "00-abc-def-01".to_string())
            ]
        );
    }

    #[test]
    fn reason_codes_below_0x80_are_successes() {
        assert!(PubAckCode(0).is_success() && PubAckCode(0x10).is_success());
        assert!(!PubAckCode(0x87).is_success());
        assert_eq!(PubAckCode(0x87).name(), "NotAuthorized");
    }
}
