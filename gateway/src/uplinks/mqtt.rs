//! The MQTT uplink (rumqttc, MQTT 3.1.1 and 5, QoS 1, optional TLS and credentials).
//!
//! rumqttc's `publish()` returning Ok only means *queued*. Delivery is confirmed here, in the
//! task that polls the event loop: each queued publish gets the driver's token; the event loop
//! reports publishes in the order they were queued (`Outgoing::Publish(pkid)`), which binds the
//! token to a packet id, and the broker's PUBACK for that packet id confirms the token.
//! A connection error ends the link: its unconfirmed tokens are never confirmed, the driver
//! gives them back to JetStream, and a *new* link is built after a backoff (rumqttc has no
//! backoff of its own, and its in-flight replay is not used: JetStream redelivery is the one
//! retry mechanism).
//!
//! What a PUBACK means ([`puback_outcome`]): MQTT 5 carries a reason code, so a broker can
//! refuse one publish (`0x87` NotAuthorized for a topic its ACL denies) and the driver
//! terminates or retries that reading alone. **MQTT 3.1.1 cannot report a refusal**: its
//! PUBACK has no reason code, and a broker that will not take a publish either acknowledges
//! and discards it (mosquitto does so for an ACL denial) or closes the connection. The first
//! looks like a delivery and is counted as one; the second looks like a lost link, and the
//! reading is sent again after the reconnect, as often as the broker closes the connection.
//! Use MQTT 5 where the broker may refuse readings.

use std::sync::Arc;
use std::time::Duration;

use fieldgate_crds::GatewayUplink;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tracing::debug;

use super::link::{Delivery, Link, LinkEvent, Token};
use super::{SettingsError, UplinkError, settings_err};
use crate::encoding::{Inbox, Publication, SessionPlan};
use crate::mqtt::{self, Endpoint, Event, Events, MqttError, PubAckCode, Session, SessionOptions, Version};
use crate::secrets::SecretStore;

/// Everything needed to open connections to one broker, secrets resolved.
#[derive(Clone)]
pub struct MqttSettings {
    /// The broker: URL, TLS, credentials, version, client id, keep-alive.
    pub endpoint: Endpoint,
    /// Broker host (as in `endpoint`), for logs.
    pub host: String,
    /// Publishes awaiting acknowledgement at once.
    pub max_in_flight: u16,
    /// Topic template of readings.
    pub topic: String,
    /// Hash of everything these settings were resolved from, secrets included: a change
    /// (such as a rotated password) restarts the uplink.
    pub fingerprint: u64,
}

impl std::fmt::Debug for MqttSettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MqttSettings").field("endpoint", &self.endpoint).finish_non_exhaustive()
    }
}

impl MqttSettings {
    /// Resolves a validated uplink: parses its URL and reads the Secrets it references.
    /// `path` is the uplink's field path, for errors.
    pub fn resolve(u: &GatewayUplink, node: &str, secrets: &SecretStore, path: &str) -> Result<Self, SettingsError> {
        let Some(m) = &u.mqtt else { return Err(settings_err(format!("{path}.mqtt"), "not an MQTT uplink")) };
        let client_id = m.client_id.clone().unwrap_or_else(|| {
            let mut id = format!("fieldgate-{node}-{}-{}", u.namespace, u.name);
            id.truncate(64);
            id
        });
        let mut endpoint = Endpoint::new(&m.url, client_id);
        endpoint.credentials = match &m.auth {
            None => None,
            Some(a) => {
                let at = format!("{path}.mqtt.auth.secretRef");
                let user = secrets
                    .read(&a.secret_ref.name, "username")
                    .map_err(|e| settings_err(at.clone(), e.to_string()))?;
                let user =
                    user.expose_str().map_err(|_| settings_err(at.clone(), "username is not UTF-8"))?.to_string();
                let password =
                    secrets.read(&a.secret_ref.name, "password").map_err(|e| settings_err(at, e.to_string()))?;
                Some((user, password))
            }
        };
        if m.url.tls() {
            endpoint.tls =
                Some(Arc::new(super::tls::client_config(m.tls.as_ref(), secrets, &format!("{path}.mqtt.tls"))?));
        }
        let version = m.protocol_version();
        endpoint.version = Version::from_number(version).ok_or_else(|| {
            settings_err(format!("{path}.mqtt.protocolVersion"), format!("{version} is not 3 (3.1.1) or 5"))
        })?;
        endpoint.keep_alive = m.keep_alive();
        Ok(Self {
            fingerprint: super::fingerprint(u, secrets),
            host: endpoint.host.clone(),
            endpoint,
            max_in_flight: m.max_in_flight(),
            topic: m.topic().to_string(),
        })
    }
}

/// A token the driver never sees: publishes an encoding asks for (births, deaths) share the
/// connection's ordered queue with the readings but nothing waits for their PUBACK.
pub const UNTRACKED: Token = Token::MAX;

/// One connection attempt to the broker and everything sent over it.
pub struct MqttLink {
    session: Session<Token>,
    task: JoinHandle<()>,
    events: mpsc::UnboundedReceiver<LinkEvent>,
    next_token: Token,
    /// Published before a clean disconnect (the encoding's farewell, such as Sparkplug NDEATH).
    farewell: Option<Publication>,
}

impl MqttLink {
    /// Opens a link; events (connected, confirmed, refused, lost) come from
    /// [`Link::next_event`]. `plan` is what the uplink's encoding needs of the session: its
    /// will, subscriptions and births are set up before any reading is sent.
    pub fn open(s: &MqttSettings, plan: SessionPlan) -> Self {
        let (events, events_rx) = mpsc::unbounded_channel();
        // The window, plus a whole buffer entry pulled while the window was not yet full, plus
        // the session's own subscriptions and births.
        let capacity = usize::from(s.max_in_flight)
            + crate::buffer::MAX_ENTRY_READINGS
            + plan.subscribe.len()
            + plan.births.len()
            + 16;
        let options = SessionOptions { max_in_flight: s.max_in_flight, capacity, ..SessionOptions::default() };
        let (session, stream) = mqtt::open_with_will(&s.endpoint, &options, plan.will.as_ref());
        let task = tokio::spawn(poll(stream, events, plan.inbox));
        let subscribed = plan.subscribe.iter().try_for_each(|filter| session.subscribe(filter));
        if let Err(e) = subscribed
            .and_then(|()| plan.births.into_iter().try_for_each(|b| session.publish_message(UNTRACKED, b, None)))
        {
            // The queue was just made: only a closed event loop refuses, and the link reports
            // itself lost.
            debug!(error = %e, "session set-up not queued");
        }
        Self { session, task, events: events_rx, next_token: 0, farewell: plan.farewell }
    }

    /// Queues `message` tagged with `token` ([`UNTRACKED`]: nobody waits for its answer).
    /// Confirmation comes as an event.
    ///
    /// On MQTT 5 the message's content type and compression go out as properties, with
    /// `traceparent` (sampled readings only) as the user property `traceparent`; MQTT 3.1.1 has
    /// no properties, so none is sent there.
    fn publish(&self, token: Token, message: Publication, traceparent: Option<&str>) -> Result<(), UplinkError> {
        self.session.publish_message(token, message, traceparent).map_err(|e| UplinkError::Queue(e.to_string()))
    }
}

impl Link for MqttLink {
    /// One reading per publish.
    fn max_readings(&self) -> usize {
        1
    }

    fn send(&mut self, delivery: Delivery) -> Result<Token, UplinkError> {
        let mut readings = delivery.readings.into_iter();
        let (Some(r), None) = (readings.next(), readings.next()) else {
            return Err(UplinkError::Queue("an MQTT delivery carries exactly one reading".into()));
        };
        // What the encoding sends first (Sparkplug births) shares the connection's order.
        for b in r.before {
            self.publish(UNTRACKED, b, None)?;
        }
        let token = self.next_token;
        self.publish(token, r.message, r.traceparent.as_deref())?;
        self.next_token += 1;
        Ok(token)
    }

    async fn next_event(&mut self) -> LinkEvent {
        self.events.recv().await.unwrap_or_else(|| LinkEvent::Lost { reason: "link task ended".into(), refused: false })
    }

    /// Disconnects politely (after in-flight publishes were confirmed or given up), after the
    /// encoding's farewell.
    async fn close(mut self) {
        if let Some(f) = self.farewell.take()
            && let Err(e) = self.publish(UNTRACKED, f, None)
        {
            debug!(error = %e, "farewell not queued");
        }
        self.session.disconnect().await;
        let deadline = tokio::time::sleep(Duration::from_secs(2));
        tokio::pin!(deadline);
        tokio::select! {
            _ = &mut self.task => {}
            () = &mut deadline => {}
        }
    }
}

/// What a PUBACK says about its publish: `None` when the broker has it, else
/// `Some((reason, permanent))`. Every MQTT 5 PUBACK reason code is classified:
///
/// | code | reason | outcome |
/// |---|---|---|
/// | `0x00` | Success | confirmed |
/// | `0x10` | NoMatchingSubscribers | confirmed (the broker took it; nobody listens yet) |
/// | `0x80` | UnspecifiedError | transient: retried with backoff |
/// | `0x83` | ImplementationSpecificError | transient |
/// | `0x87` | NotAuthorized | **permanent**: terminated and counted (`refused`) |
/// | `0x90` | TopicNameInvalid | **permanent** |
/// | `0x91` | PacketIdentifierInUse | transient (a session glitch, not the reading) |
/// | `0x97` | QuotaExceeded | transient: a quota or rate limit that lifts; dropping readings for it would turn every throttling episode into data loss |
/// | `0x99` | PayloadFormatInvalid | **permanent** |
pub fn puback_outcome(code: PubAckCode) -> Option<(&'static str, bool)> {
    match code.0 {
        0x00 | 0x10 => None,
        0x87 | 0x90 | 0x99 => Some((code.name(), true)),
        // 0x80, 0x83, 0x91, 0x97; and a code MQTT 5 does not define for PUBACK (never sent by
        // a conforming broker): retried, never dropped.
        _ => Some((code.name(), false)),
    }
}

impl Drop for MqttLink {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Turns the session's events into link events (the facade binds tokens to packet ids); what
/// arrives on the encoding's subscriptions goes to its `inbox`.
async fn poll(mut stream: Events<Token>, events: mpsc::UnboundedSender<LinkEvent>, inbox: Option<Inbox>) {
    loop {
        let ev = match stream.next().await {
            Event::Connected => LinkEvent::Connected,
            Event::Published { token: UNTRACKED, .. } => continue,
            Event::Message(m) => {
                match &inbox {
                    Some(f) => f(&m.topic, &m.payload),
                    None => debug!(topic = %m.topic, "message on a session without subscriptions ignored"),
                }
                continue;
            }
            Event::Published { token, code } => match puback_outcome(code) {
                None => LinkEvent::Confirmed(token),
                Some((reason, permanent)) => {
                    LinkEvent::Refused { token, reason: reason.to_string(), permanent, retry_after: None }
                }
            },
            Event::Lost(e) => {
                let refused = matches!(e, MqttError::Refused(_));
                let _ = events.send(LinkEvent::Lost { reason: e.to_string(), refused });
                return;
            }
            other => {
                debug!(event = ?other, "mqtt event");
                continue;
            }
        };
        if events.send(ev).is_err() {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_puback_reason_is_confirmed_transient_or_permanent() {
        use rumqttc::v5::mqttbytes::v5::PubAckReason as R;
        assert_eq!(puback_outcome(PubAckCode::from(&R::Success)), None);
        assert_eq!(puback_outcome(PubAckCode::from(&R::NoMatchingSubscribers)), None);
        for (reason, permanent) in [
            (R::NotAuthorized, true),
            (R::TopicNameInvalid, true),
            (R::PayloadFormatInvalid, true),
            (R::UnspecifiedError, false),
            (R::ImplementationSpecificError, false),
            (R::PacketIdentifierInUse, false),
            (R::QuotaExceeded, false),
        ] {
            let (name, p) = puback_outcome(PubAckCode::from(&reason)).unwrap();
            assert_eq!(p, permanent, "{reason:?}");
            assert_eq!(name, format!("{reason:?}"));
        }
        // MQTT 3.1.1 PUBACKs carry no reason: always a success.
        assert_eq!(puback_outcome(PubAckCode(0)), None);
    }

    #[test]
    fn missing_secrets_name_the_field() {
        let u: GatewayUplink = serde_json::from_value(serde_json::json!({
            "name": "cloud",
            "mqtt": {"url": "mqtt://h:1883", "auth": {"secretRef": {"name": "creds"}}}
        }))
        .unwrap();
        let dir = tempfile::tempdir().unwrap();
        let err = MqttSettings::resolve(&u, "n", &SecretStore::new(dir.path()), "uplinks[0]").unwrap_err();
        assert_eq!(err.path, "uplinks[0].mqtt.auth.secretRef");
        assert!(err.message.contains("creds"), "{err}");
    }
}
