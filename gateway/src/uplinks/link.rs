//! The typed delivery contract between the uplink driver and an uplink kind.
//!
//! A [`Link`] is one connection to the cloud. The driver hands it [`Delivery`]s — one reading,
//! or several for a link that sends batches (an HTTP POST of many readings) — and the link
//! answers each with exactly one outcome, as a [`LinkEvent`] carrying the delivery's token:
//!
//! - [`LinkEvent::Confirmed`]: the cloud has every reading of the delivery;
//! - [`LinkEvent::Refused`]: the cloud answered and took none of them, for a `reason`;
//!   `permanent` when sending them again cannot succeed (MQTT 5 `0x87` NotAuthorized, an HTTP
//!   400), transient otherwise (`0x97` QuotaExceeded, an HTTP 503);
//! - [`LinkEvent::Lost`]: the connection is gone; no delivery still unanswered will ever be
//!   answered (it may or may not have arrived).
//!
//! The driver alone acks, naks, terminates and counts: a link never touches the buffer.

use std::future::Future;

use super::UplinkError;
use crate::encoding::Publication;

/// Identifies one delivery on one link.
pub type Token = u64;

/// Bytes a link may add around each reading of a delivery (a JSON comma, a protobuf field
/// header), for [`Link::max_bytes`].
pub const FRAMING_BYTES: usize = 8;

/// One reading on its way to the cloud, encoded for it.
#[derive(Clone, Debug)]
pub struct Outgoing {
    /// The encoded reading: where it goes (the uplink's rendered topic; a link without topics
    /// ignores it), its payload, content type and compression ([`crate::encoding`]).
    pub message: Publication,
    /// What the encoding sends first on the same connection, nothing waiting for an answer
    /// (Sparkplug births); a link that cannot send such messages ignores them.
    pub before: Vec<Publication>,
    /// W3C `traceparent` of a sampled reading, for links that carry trace context.
    pub traceparent: Option<String>,
}

/// What a link sends and answers as a unit: one reading, or several.
#[derive(Clone, Debug)]
pub struct Delivery {
    /// Its readings (at most [`Link::max_readings`]).
    pub readings: Vec<Outgoing>,
}

/// What a link reports.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum LinkEvent {
    /// The connection is up; deliveries may be sent.
    Connected,
    /// The cloud has every reading of the delivery.
    Confirmed(Token),
    /// The cloud answered and took none of the delivery's readings.
    Refused {
        /// The delivery.
        token: Token,
        /// Why, as the cloud said it (such as `NotAuthorized`).
        reason: String,
        /// Sending the same readings again cannot succeed.
        permanent: bool,
        /// When the cloud asked to be tried again at the earliest (HTTP `Retry-After`).
        retry_after: Option<std::time::Duration>,
    },
    /// The connection is gone: unanswered deliveries will never be answered.
    Lost {
        /// What happened.
        reason: String,
        /// The cloud answered and refused the connection itself (MQTT CONNACK with a failure
        /// code, HTTP 401): reconnecting soon would be refused again, so the driver backs off
        /// for long. Otherwise (unreachable, reset, timeout) it probes on a short cadence so
        /// that delivery resumes within seconds of the cloud coming back.
        refused: bool,
    },
}

/// One connection to the cloud that delivers readings.
pub trait Link: Send {
    /// Most readings one delivery may carry (MQTT: one per publish).
    fn max_readings(&self) -> usize;

    /// Most bytes one delivery may carry, counted as the readings' payloads plus
    /// [`FRAMING_BYTES`] each; a reading larger than that alone still goes alone.
    fn max_bytes(&self) -> usize {
        usize::MAX
    }

    /// Sends one delivery; its outcome arrives later as one event carrying the returned token.
    /// An error means nothing was sent.
    fn send(&mut self, delivery: Delivery) -> Result<Token, UplinkError>;

    /// The next event. After [`LinkEvent::Lost`] the link is done.
    fn next_event(&mut self) -> impl Future<Output = LinkEvent> + Send;

    /// Disconnects politely (after in-flight deliveries were answered or given up).
    fn close(self) -> impl Future<Output = ()> + Send;
}
