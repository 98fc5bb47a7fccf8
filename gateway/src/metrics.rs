//! The gateway's metrics: one registry, built once and passed down (no globals).
//!
//! Labels are bounded: device and uplink names (`namespace/name`), protocol, and fixed sets of
//! kinds, reasons and outcomes. Never an address, an error text or a topic.

use prometheus_client::encoding::{EncodeLabelSet, EncodeLabelValue};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;
use std::sync::atomic::AtomicU64;

/// Labels of a device's metrics.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DeviceLabels {
    /// `namespace/name` of the device.
    pub device: String,
    /// Protocol label, such as `modbus_tcp`.
    pub protocol: &'static str,
}

/// Labels of a device error.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DeviceErrorLabels {
    /// `namespace/name` of the device.
    pub device: String,
    /// Protocol label.
    pub protocol: &'static str,
    /// What went wrong, from a fixed set (`timeout`, `exception`, `protocol`, `connect`, `io`).
    pub kind: &'static str,
}

/// Labels of an uplink's metrics.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct UplinkLabels {
    /// `namespace/name` of the uplink.
    pub uplink: String,
}

/// Why a reading was dropped.
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq, EncodeLabelValue)]
#[allow(non_camel_case_types)]
pub enum DropReason {
    /// `onFull: rejectNew` and the uplink's buffer was full: the reading was not accepted.
    buffer_full_rejected,
    /// `onFull: dropOldest` and the buffer was full: an accepted, unsent reading was evicted.
    buffer_full_evicted,
    /// An accepted, unsent reading outlived the buffer's `maxAge`.
    max_age_expired,
    /// JetStream did not accept the reading in time (NATS down or overloaded).
    buffer_unavailable,
    /// The reading was larger than JetStream accepts.
    too_large,
    /// No uplink selects the device, so the reading has nowhere to go.
    no_uplink,
    /// A buffered entry could not be decoded (written by an incompatible version).
    undecodable,
    /// The cloud refused the reading for good (MQTT 5 PUBACK `0x87` NotAuthorized,
    /// `0x90` TopicNameInvalid, `0x99` PayloadFormatInvalid; an HTTP 4xx other than 401, 403,
    /// 408 and 429): terminated, never sent again.
    refused,
}

impl DropReason {
    /// Every reason, in the order the status page and `/api/v1` list them.
    pub const ALL: [DropReason; 8] = [
        DropReason::buffer_full_rejected,
        DropReason::buffer_full_evicted,
        DropReason::max_age_expired,
        DropReason::buffer_unavailable,
        DropReason::too_large,
        DropReason::no_uplink,
        DropReason::undecodable,
        DropReason::refused,
    ];

    /// The label value, for spans and logs.
    pub fn as_str(self) -> &'static str {
        match self {
            DropReason::buffer_full_rejected => "buffer_full_rejected",
            DropReason::buffer_full_evicted => "buffer_full_evicted",
            DropReason::max_age_expired => "max_age_expired",
            DropReason::buffer_unavailable => "buffer_unavailable",
            DropReason::too_large => "too_large",
            DropReason::no_uplink => "no_uplink",
            DropReason::undecodable => "undecodable",
            DropReason::refused => "refused",
        }
    }
}

/// Labels of a dropped reading.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DropLabels {
    /// `namespace/name` of the uplink (`none` for `no_uplink`).
    pub uplink: String,
    /// Why.
    pub reason: DropReason,
}

/// Outcome of one delivery attempt to the cloud.
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq, EncodeLabelValue)]
#[allow(non_camel_case_types)]
pub enum DeliveryOutcome {
    /// The broker acknowledged with a success reason; the buffer entry was acked.
    acked,
    /// The cloud refused the reading (a failure reason code): sent again after a growing
    /// delay when the reason is transient, dropped and counted (`refused`) when permanent.
    refused,
    /// The connection dropped before the acknowledgement; the reading will be sent again.
    interrupted,
}

impl DeliveryOutcome {
    /// Every outcome.
    pub const EVERY: [DeliveryOutcome; 3] =
        [DeliveryOutcome::acked, DeliveryOutcome::refused, DeliveryOutcome::interrupted];
}

/// Labels of a delivery.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DeliveryLabels {
    /// `namespace/name` of the uplink.
    pub uplink: String,
    /// Outcome.
    pub outcome: DeliveryOutcome,
}

/// Outcome of a configuration change.
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq, EncodeLabelValue)]
#[allow(non_camel_case_types)]
pub enum ReloadOutcome {
    /// Checked and applied.
    applied,
    /// Refused (invalid); the running configuration stays.
    refused,
}

/// Labels of a configuration change.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReloadLabels {
    /// Outcome.
    pub outcome: ReloadOutcome,
}

/// Labels of a restarted task.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TaskLabels {
    /// Task name, such as `device default/meter-1` or `uplink default/cloud`.
    pub task: String,
}

/// Labels of a refused or counted inbound message (CoAP, MQTT, TCP, UDP) that is not yet
/// tied to a device (unknown device, bad credentials, malformed frame).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct IngressLabels {
    /// Protocol label, such as `coap`.
    pub protocol: &'static str,
    /// What was wrong (or, for `ingress_messages`, what kind of message; for `ingress_evicted`,
    /// what was forgotten), from a fixed set.
    pub reason: &'static str,
}

/// Labels of an ingress listener's connection gauge.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ProtocolLabels {
    /// Protocol label, such as `tcp`.
    pub protocol: &'static str,
}

/// Which way the wall clock stepped.
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq, EncodeLabelValue)]
#[allow(non_camel_case_types)]
pub enum StepDirection {
    /// Back in time (NTP correction, an RTC that was ahead at boot).
    backward,
    /// Forward in time.
    forward,
}

/// Labels of a wall-clock step.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ClockStepLabels {
    /// Which way.
    pub direction: StepDirection,
}

/// Labels of command outcomes.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CommandLabels {
    /// `namespace/name` of the uplink the command came through.
    pub uplink: String,
    /// Final status: `duplicate`, `verified`, `written`, `failed`, `refused`, `expired`.
    pub status: &'static str,
    /// Why (failures and refusals), from a fixed set; empty otherwise.
    pub reason: &'static str,
}

/// Every metric the gateway exports.
pub struct Metrics {
    /// Commands by final status and reason.
    pub commands: Family<CommandLabels, Counter>,
    /// Device polls that read at least one point.
    pub polls: Family<DeviceLabels, Counter>,
    /// Failed requests to devices, by kind.
    pub device_errors: Family<DeviceErrorLabels, Counter>,
    /// Time of one whole device poll.
    pub poll_duration: Family<DeviceLabels, Histogram>,
    /// Whether the device's connection is up (1) or not (0).
    pub device_connected: Family<DeviceLabels, Gauge>,
    /// Readings produced by adapters.
    pub readings_received: Family<DeviceLabels, Counter>,
    /// Readings acknowledged by JetStream (accepted), per uplink buffer.
    pub readings_accepted: Family<UplinkLabels, Counter>,
    /// Readings dropped, by uplink and reason.
    pub readings_dropped: Family<DropLabels, Counter>,
    /// Delivery attempts to the cloud, by outcome.
    pub deliveries: Family<DeliveryLabels, Counter>,
    /// Readings delivered by JetStream more than once (after an outage, crash or refusal).
    pub redeliveries: Family<UplinkLabels, Counter>,
    /// Time from publish to the broker's acknowledgement.
    pub delivery_latency: Family<UplinkLabels, Histogram>,
    /// Time from the device sample to the broker's acknowledgement.
    pub sample_to_cloud_latency: Family<UplinkLabels, Histogram>,
    /// Broker connections established.
    pub uplink_connects: Family<UplinkLabels, Counter>,
    /// Tasks restarted by their supervisor after a panic or an unexpected end.
    pub task_restarts: Family<TaskLabels, Counter>,
    /// Configurations applied or refused (initial one included).
    pub config_reloads: Family<ReloadLabels, Counter>,
    /// Wall-clock steps seen by the pollers (see [`crate::clock`]).
    pub clock_steps: Family<ClockStepLabels, Counter>,
    /// Inbound messages refused before reaching a device, by protocol and reason.
    pub ingress_rejected: Family<IngressLabels, Counter>,
    /// Inbound messages handled by the listeners, by protocol and kind (`con`, `non`, ...).
    pub ingress_messages: Family<IngressLabels, Counter>,
    /// Entries a listener forgot before their time to stay within a bound, by protocol and
    /// what was forgotten (`retransmission_cache`).
    pub ingress_evicted: Family<IngressLabels, Counter>,
    /// Open inbound connections, by protocol.
    pub ingress_connections: Family<ProtocolLabels, Gauge>,
    /// Of those, the idle ones parked off the runtime (raw TCP), by protocol.
    pub ingress_parked: Family<ProtocolLabels, Gauge>,
    /// Unix time of the device's last reading (for staleness alerts and `/api/v1`).
    pub device_last_reading: Family<DeviceLabels, Gauge<f64, AtomicU64>>,
    /// Whether the gateway's NATS connection (the buffer) is up (1) or not (0).
    pub buffer_connected: Gauge,
    /// NATS connections established (1 + reconnects).
    pub buffer_connects: Counter,
    /// The last error of each device, for `/api/v1` (not exported: an error kind is a label
    /// value of `fieldgate_device_errors_total` already).
    pub device_last_error: LastErrors,
    /// The last values of each device, for the status page and `/api/v1` (not exported:
    /// telemetry values are no metric).
    pub device_last_values: LastValues,
    /// What each supervised task is doing, for the diagnostics bundle (restarts are counted
    /// in `task_restarts` too).
    pub task_states: crate::supervise::TaskStates,
    /// The `device_errors` label sets of each device, removed with it.
    error_series: LabelSets<DeviceErrorLabels>,
    /// The `commands` label sets of each uplink, removed with it.
    command_series: LabelSets<CommandLabels>,
    /// The state of every uplink and its buffer: the buffer gauges
    /// (`fieldgate_buffer_messages`, `_bytes`, `_oldest_unsent_age_seconds`, `_last_seq`,
    /// `_reachable`, `fieldgate_uplink_connected`) are read from it at each scrape.
    pub state: crate::index::StateIndex,
}

/// The label sets each owner (a device or an uplink, `namespace/name`) created in a family
/// whose label values cannot be listed up front (error kinds, command reasons), so that its
/// series can be removed when the owner leaves the config.
#[derive(Debug)]
struct LabelSets<S>(std::sync::Mutex<std::collections::HashMap<String, Vec<S>>>);

impl<S> Default for LabelSets<S> {
    fn default() -> Self {
        Self(std::sync::Mutex::default())
    }
}

impl<S: PartialEq + Clone> LabelSets<S> {
    /// Notes that `owner` has a series labelled `labels`.
    fn note(&self, owner: &str, labels: &S) {
        let mut m = self.0.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        match m.get_mut(owner) {
            Some(sets) if sets.contains(labels) => {}
            Some(sets) => sets.push(labels.clone()),
            None => {
                m.insert(owner.to_string(), vec![labels.clone()]);
            }
        }
    }

    /// The label sets of `owner`, forgotten here.
    fn take(&self, owner: &str) -> Vec<S> {
        self.0.lock().unwrap_or_else(std::sync::PoisonError::into_inner).remove(owner).unwrap_or_default()
    }
}

/// The last error of each device: kind and Unix milliseconds, by `namespace/name`.
#[derive(Debug, Default)]
pub struct LastErrors(std::sync::Mutex<std::collections::HashMap<String, (&'static str, u64)>>);

impl LastErrors {
    /// Records an error of `kind` now.
    pub fn record(&self, device: &str, kind: &'static str) {
        let now = crate::reading::unix_nanos(std::time::SystemTime::now()) / 1_000_000;
        let mut m = self.0.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        match m.get_mut(device) {
            Some(e) => *e = (kind, now),
            None => {
                m.insert(device.to_string(), (kind, now));
            }
        }
    }

    /// Kind and Unix milliseconds of the device's last error.
    pub fn get(&self, device: &str) -> Option<(&'static str, u64)> {
        self.0.lock().unwrap_or_else(std::sync::PoisonError::into_inner).get(device).copied()
    }

    /// Forgets the device (removed from the config).
    pub fn forget(&self, device: &str) {
        self.0.lock().unwrap_or_else(std::sync::PoisonError::into_inner).remove(device);
    }
}

/// The points of each device's last reading, by `namespace/name`, refreshed at most every
/// [`LastValues::REFRESH`] per device (this runs for every reading; a status page refreshes
/// every second or two).
#[derive(Debug, Default)]
pub struct LastValues(std::sync::Mutex<std::collections::HashMap<String, LastReading>>);

/// A device's last recorded reading.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct LastReading {
    /// When the device was sampled, nanoseconds since the Unix epoch.
    pub time_unix_nano: u64,
    /// Its points.
    pub points: Vec<crate::reading::Point>,
}

impl LastValues {
    /// Shortest time between two recorded readings of one device.
    pub const REFRESH: std::time::Duration = std::time::Duration::from_millis(500);

    /// Records `reading` as the device's last one unless the recorded one is younger than
    /// [`LastValues::REFRESH`].
    pub fn record(&self, device: &str, reading: &crate::reading::Reading) {
        let refresh = Self::REFRESH.as_nanos() as u64;
        let mut m = self.0.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        match m.get_mut(device) {
            Some(last) if reading.time_unix_nano.saturating_sub(last.time_unix_nano) < refresh => {}
            Some(last) => {
                last.time_unix_nano = reading.time_unix_nano;
                last.points.clone_from(&reading.points);
            }
            None => {
                let last = LastReading { time_unix_nano: reading.time_unix_nano, points: reading.points.clone() };
                m.insert(device.to_string(), last);
            }
        }
    }

    /// The device's last recorded reading.
    pub fn get(&self, device: &str) -> Option<LastReading> {
        self.0.lock().unwrap_or_else(std::sync::PoisonError::into_inner).get(device).cloned()
    }

    /// Forgets the device (removed from the config).
    pub fn forget(&self, device: &str) {
        self.0.lock().unwrap_or_else(std::sync::PoisonError::into_inner).remove(device);
    }

    /// Forgets the devices `keep` says no to (devices removed from the config).
    pub fn retain(&self, keep: impl Fn(&str) -> bool) {
        self.0.lock().unwrap_or_else(std::sync::PoisonError::into_inner).retain(|k, _| keep(k));
    }
}

/// Labels of `fieldgate_build_info`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct BuildLabels {
    version: &'static str,
}

fn latency_histogram() -> Histogram {
    // 100 µs .. ~105 s
    Histogram::new(exponential_buckets(0.0001, 2.0, 21))
}

impl Metrics {
    /// Creates the metrics and registers them in `registry` under the `fieldgate` prefix.
    pub fn new(registry: &mut Registry) -> Self {
        let readings_accepted: Family<UplinkLabels, Counter> = Family::default();
        let readings_dropped: Family<DropLabels, Counter> = Family::default();
        let deliveries: Family<DeliveryLabels, Counter> = Family::default();
        let redeliveries: Family<UplinkLabels, Counter> = Family::default();
        let state = crate::index::StateIndex::new(
            readings_accepted.clone(),
            deliveries.clone(),
            redeliveries.clone(),
            readings_dropped.clone(),
        );
        let m = Self {
            commands: Family::default(),
            polls: Family::default(),
            device_errors: Family::default(),
            poll_duration: Family::new_with_constructor(latency_histogram),
            device_connected: Family::default(),
            readings_received: Family::default(),
            readings_accepted,
            readings_dropped,
            deliveries,
            redeliveries,
            delivery_latency: Family::new_with_constructor(latency_histogram),
            sample_to_cloud_latency: Family::new_with_constructor(latency_histogram),
            uplink_connects: Family::default(),
            task_restarts: Family::default(),
            config_reloads: Family::default(),
            clock_steps: Family::default(),
            ingress_rejected: Family::default(),
            ingress_messages: Family::default(),
            ingress_evicted: Family::default(),
            ingress_connections: Family::default(),
            ingress_parked: Family::default(),
            device_last_reading: Family::default(),
            buffer_connected: Gauge::default(),
            buffer_connects: Counter::default(),
            device_last_error: LastErrors::default(),
            device_last_values: LastValues::default(),
            task_states: crate::supervise::TaskStates::default(),
            error_series: LabelSets::default(),
            command_series: LabelSets::default(),
            state,
        };
        let r = registry.sub_registry_with_prefix("fieldgate");
        r.register("device_polls", "Device polls that read at least one point", m.polls.clone());
        r.register("device_errors", "Failed device requests by kind", m.device_errors.clone());
        r.register_with_unit(
            "device_poll_duration",
            "Time of one whole device poll",
            prometheus_client::registry::Unit::Seconds,
            m.poll_duration.clone(),
        );
        r.register("device_connected", "Whether the device connection is up", m.device_connected.clone());
        r.register("readings_received", "Readings produced by device adapters", m.readings_received.clone());
        r.register(
            "readings_accepted",
            "Readings acknowledged by JetStream, per uplink buffer",
            m.readings_accepted.clone(),
        );
        r.register("readings_dropped", "Readings dropped, by uplink and reason", m.readings_dropped.clone());
        r.register("deliveries", "Delivery attempts to the cloud broker by outcome", m.deliveries.clone());
        r.register("redeliveries", "Readings delivered from the buffer more than once", m.redeliveries.clone());
        r.register_with_unit(
            "delivery_latency",
            "Time from publish to the broker's acknowledgement",
            prometheus_client::registry::Unit::Seconds,
            m.delivery_latency.clone(),
        );
        r.register_with_unit(
            "sample_to_cloud_latency",
            "Time from the device sample to the broker's acknowledgement",
            prometheus_client::registry::Unit::Seconds,
            m.sample_to_cloud_latency.clone(),
        );
        r.register("uplink_connects", "Broker connections established", m.uplink_connects.clone());
        r.register("task_restarts", "Tasks restarted by their supervisor", m.task_restarts.clone());
        r.register("config_reloads", "Configurations applied or refused", m.config_reloads.clone());
        r.register(
            "wall_clock_steps",
            "Steps of the wall clock against the monotonic clock, by direction",
            m.clock_steps.clone(),
        );
        r.register("ingress_rejected", "Inbound messages refused before reaching a device", m.ingress_rejected.clone());
        r.register(
            "ingress_messages",
            "Inbound messages handled by the listeners, by kind",
            m.ingress_messages.clone(),
        );
        r.register(
            "ingress_evicted",
            "Entries a device listener forgot before their time to stay within a bound, by what was forgotten",
            m.ingress_evicted.clone(),
        );
        r.register(
            "commands",
            "Commands from the cloud by final status and reason (refusals and failures from a fixed set)",
            m.commands.clone(),
        );
        r.register("ingress_connections", "Open inbound device connections", m.ingress_connections.clone());
        r.register(
            "ingress_parked_connections",
            "Idle inbound device connections parked off the runtime",
            m.ingress_parked.clone(),
        );
        r.register(
            "device_last_reading_timestamp_seconds",
            "Unix time of the device's last reading",
            m.device_last_reading.clone(),
        );
        r.register(
            "buffer_connected",
            "Whether the NATS connection holding the buffer is up",
            m.buffer_connected.clone(),
        );
        r.register("buffer_connects", "NATS connections established", m.buffer_connects.clone());
        r.register_collector(Box::new(m.state.clone()));
        let build: Family<BuildLabels, Gauge> = Family::default();
        build.get_or_create(&BuildLabels { version: env!("CARGO_PKG_VERSION") }).set(1);
        r.register("build_info", "Version of the running gateway", build);
        m
    }

    /// Counts a failed request of `kind` to a device and records it as the device's last error.
    pub fn device_error(&self, labels: DeviceErrorLabels) {
        self.device_last_error.record(&labels.device, labels.kind);
        self.error_series.note(&labels.device, &labels);
        self.device_errors.get_or_create(&labels).inc();
    }

    /// Counts a command's final status.
    pub fn command(&self, labels: CommandLabels) {
        self.command_series.note(&labels.uplink, &labels);
        self.commands.get_or_create(&labels).inc();
    }

    /// Removes every series and entry of a device that left the config (`protocol` is the
    /// protocol it ran with), once its adapter stopped: a gateway whose devices come and go
    /// keeps only the series of the devices it runs.
    pub fn forget_device(&self, device: &str, protocol: &'static str) {
        let labels = DeviceLabels { device: device.to_string(), protocol };
        self.polls.remove(&labels);
        self.poll_duration.remove(&labels);
        self.device_connected.remove(&labels);
        self.readings_received.remove(&labels);
        self.device_last_reading.remove(&labels);
        for errors in self.error_series.take(device) {
            self.device_errors.remove(&errors);
        }
        self.device_last_error.forget(device);
        self.device_last_values.forget(device);
    }

    /// Removes every series of an uplink that left the config, once its driver stopped.
    pub fn forget_uplink(&self, uplink: &str) {
        let labels = UplinkLabels { uplink: uplink.to_string() };
        for family in [&self.readings_accepted, &self.redeliveries, &self.uplink_connects] {
            family.remove(&labels);
        }
        self.delivery_latency.remove(&labels);
        self.sample_to_cloud_latency.remove(&labels);
        // The buffer gauges are read from the state index, whose entry stays with the uplink's
        // lane (a lane outlives its uplink leaving the config, see buffer.rs).
        for reason in DropReason::ALL {
            self.readings_dropped.remove(&DropLabels { uplink: uplink.to_string(), reason });
        }
        for outcome in DeliveryOutcome::EVERY {
            self.deliveries.remove(&DeliveryLabels { uplink: uplink.to_string(), outcome });
        }
        for commands in self.command_series.take(uplink) {
            self.commands.remove(&commands);
        }
    }

    /// Counts a dropped reading.
    pub fn dropped(&self, uplink: &str, reason: DropReason) {
        self.readings_dropped.get_or_create(&DropLabels { uplink: uplink.to_string(), reason }).inc();
    }

    /// Counts `n` dropped readings of `uplink`.
    pub fn dropped_n(&self, uplink: &str, reason: DropReason, n: u64) {
        if n > 0 {
            self.readings_dropped.get_or_create(&DropLabels { uplink: uplink.to_string(), reason }).inc_by(n);
        }
    }
}
