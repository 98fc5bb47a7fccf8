//! The operator's metrics (prometheus-client, one registry passed down, bounded labels).

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

/// `outcome`: `ok` or `error` (reconciles); `ok`, `unauthenticated`, `forbidden` or
/// `unavailable` (credential requests).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OutcomeLabels {
    /// Outcome.
    pub outcome: &'static str,
}

/// `kind`: an error kind ([`crate::writer::WriteError::kind`]).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct KindLabels {
    /// Kind.
    pub kind: &'static str,
}

/// `object`: `configmap`, `secret`, `device_status`, `uplink_status`, `event`, `delete`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct WriteLabels {
    /// What was written.
    pub object: &'static str,
}

/// `state`: `configured` or `invalid`; `resource`: `device` or `uplink`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ObjectStateLabels {
    /// Resource kind.
    pub resource: &'static str,
    /// State.
    pub state: &'static str,
}

/// Every metric of the operator.
pub struct Metrics {
    /// Reconciles of the whole world, by outcome.
    pub reconciles: Family<OutcomeLabels, Counter>,
    /// Failed reconciles, by error kind.
    pub reconcile_errors: Family<KindLabels, Counter>,
    /// Duration of a reconcile (render and writes).
    pub reconcile_duration: Histogram,
    /// Duration of render alone.
    pub render_duration: Histogram,
    /// API writes, by object.
    pub writes: Family<WriteLabels, Counter>,
    /// Objects by state at the last render.
    pub objects: Family<ObjectStateLabels, Gauge>,
    /// Gateway nodes at the last render.
    pub gateway_nodes: Gauge,
    /// Nodes with a config at the last render.
    pub configured_nodes: Gauge,
    /// 1 while this replica holds the leader Lease.
    pub leader: Gauge,
    /// Watch stream errors (the watcher retries with backoff).
    pub watch_errors: Counter,
    /// Requests to the credentials endpoint, by outcome (`ok`, `unauthenticated`,
    /// `forbidden`, `unavailable`).
    pub credential_requests: Family<OutcomeLabels, Counter>,
}

impl Metrics {
    /// Creates the metrics and registers them under `fieldgate_operator_`.
    pub fn new(registry: &mut Registry) -> Self {
        let m = Self {
            reconciles: Family::default(),
            reconcile_errors: Family::default(),
            reconcile_duration: Histogram::new(exponential_buckets(0.005, 2.0, 14)),
            render_duration: Histogram::new(exponential_buckets(0.001, 2.0, 14)),
            writes: Family::default(),
            objects: Family::default(),
            gateway_nodes: Gauge::default(),
            configured_nodes: Gauge::default(),
            leader: Gauge::default(),
            watch_errors: Counter::default(),
            credential_requests: Family::default(),
        };
        let r = registry.sub_registry_with_prefix("fieldgate_operator");
        r.register("reconciles", "Reconciles of the whole world", m.reconciles.clone());
        r.register("reconcile_errors", "Failed reconciles by error kind", m.reconcile_errors.clone());
        r.register("reconcile_duration_seconds", "Duration of a reconcile", m.reconcile_duration.clone());
        r.register("render_duration_seconds", "Duration of render", m.render_duration.clone());
        r.register("writes", "API writes by object", m.writes.clone());
        r.register("objects", "Objects by state at the last render", m.objects.clone());
        r.register("gateway_nodes", "Gateway nodes at the last render", m.gateway_nodes.clone());
        r.register("configured_nodes", "Nodes with a config at the last render", m.configured_nodes.clone());
        r.register("leader", "1 while this replica holds the leader Lease", m.leader.clone());
        r.register("watch_errors", "Watch stream errors", m.watch_errors.clone());
        r.register(
            "credential_requests",
            "Requests for a node's credentials by outcome",
            m.credential_requests.clone(),
        );
        m
    }

    /// Counts one write.
    pub fn wrote(&self, object: &'static str) {
        self.writes.get_or_create(&WriteLabels { object }).inc();
    }
}
