//! The control loop: watch every input, and on any change (debounced) render the whole world
//! and write the difference.
//!
//! Whole-world reconciles fit this problem: placement and uplink selection couple every
//! Device to every Node and Uplink, and render of 10,000 devices takes milliseconds. The loop
//! runs only while this replica holds the Lease; the watch caches stay warm on standbys. Each
//! leadership term gets its own [`Term`]: the writes of a pass stop the moment it ends.
//!
//! A failure belongs to the object it concerns: a referenced Secret that cannot be read
//! refuses the Devices and Uplinks that reference it (reason `UnreadableSecret`) when the
//! refusal is permanent (403, ...); when it may pass (5xx, timeout) the last value read is
//! used, or, without one, the nodes that ran those objects keep their config and the objects
//! their status until a retry reads it. Every other node gets its update either way. After a
//! pass with a transient failure the loop retries with backoff; after only permanent ones it
//! waits for the next change (or the resync).
//!
//! Inputs: Devices, DeviceProfiles, Uplinks (all namespaces), Nodes labelled
//! `fieldgate.io/gateway=true`, and Secret *metadata* (all namespaces): any Secret change
//! triggers a reconcile. Secret values are fetched only for Secrets that Devices or Uplinks
//! reference, and again only when their resourceVersion changes, so the operator never caches
//! every Secret of the cluster.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use fieldgate_crds::{Device, DeviceProfile, GATEWAY_NODE_LABEL, Uplink};
use futures::{Stream, StreamExt};
use k8s_openapi::api::core::v1::{Node, Secret};
use k8s_openapi::jiff::Timestamp;
use kube::core::PartialObjectMeta;
use kube::runtime::reflector::{self, Store};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Api, Client, ResourceExt};
use tokio::sync::{Notify, watch};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::lease::{CallError, Leadership, Term};
use crate::metrics::{KindLabels, Metrics, ObjectStateLabels, OutcomeLabels};
use crate::render::{self, ObjectKey, Placements, Rendered, SecretIndex, Settings, World};
use crate::writer::{Held, SecretValues, WriteError, WritePass, WriteSummary, Writer};

/// The watch caches render reads.
#[derive(Clone)]
pub struct Stores {
    /// Devices.
    pub devices: Store<Device>,
    /// Profiles.
    pub profiles: Store<DeviceProfile>,
    /// Uplinks.
    pub uplinks: Store<Uplink>,
    /// Gateway nodes.
    pub nodes: Store<Node>,
    /// Metadata of every Secret.
    pub secrets: Store<PartialObjectMeta<Secret>>,
    /// Whether every cache has been filled, once known.
    filled: Arc<tokio::sync::OnceCell<bool>>,
}

impl Stores {
    /// The caches of the five watches.
    pub fn new(
        devices: Store<Device>,
        profiles: Store<DeviceProfile>,
        uplinks: Store<Uplink>,
        nodes: Store<Node>,
        secrets: Store<PartialObjectMeta<Secret>>,
    ) -> Self {
        Self { devices, profiles, uplinks, nodes, secrets, filled: Arc::default() }
    }

    /// Waits until every cache has been filled once. Any number of tasks may wait.
    pub async fn ready(&self) -> bool {
        // kube's `Store::wait_until_ready` wakes only the task that polled it last (one oneshot
        // receiver behind a mutex): with the loop and the readiness probe both waiting, one of
        // them would wait forever. So one task waits for the stores and the others for it.
        *self
            .filled
            .get_or_init(|| async {
                self.devices.wait_until_ready().await.is_ok()
                    && self.profiles.wait_until_ready().await.is_ok()
                    && self.uplinks.wait_until_ready().await.is_ok()
                    && self.nodes.wait_until_ready().await.is_ok()
                    && self.secrets.wait_until_ready().await.is_ok()
            })
            .await
    }
}

fn forward<K, S>(stream: S, trigger: Arc<Notify>, metrics: Arc<Metrics>) -> impl std::future::Future<Output = ()> + Send
where
    S: Stream<Item = Result<watcher::Event<K>, watcher::Error>> + Send,
    K: Send,
{
    stream.for_each(move |ev| {
        match ev {
            Ok(watcher::Event::Apply(_) | watcher::Event::Delete(_) | watcher::Event::InitDone) => trigger.notify_one(),
            Ok(_) => {}
            Err(e) => {
                metrics.watch_errors.inc();
                warn!(error = %e, "watch error; retrying with backoff");
            }
        }
        futures::future::ready(())
    })
}

/// managedFields and kubectl's last-applied copy of the whole object are never read and can
/// double or triple an object's size: dropped before caching.
fn slim<K: kube::Resource>(o: &mut K) {
    *o.managed_fields_mut() = Vec::new();
    let meta = o.meta_mut();
    if let Some(annotations) = &mut meta.annotations {
        annotations.remove("kubectl.kubernetes.io/last-applied-configuration");
        if annotations.is_empty() {
            meta.annotations = None;
        }
    }
}

/// Starts the watches; every change notifies `trigger`. The returned future runs them all.
pub fn watch_all(
    client: &Client,
    trigger: Arc<Notify>,
    metrics: Arc<Metrics>,
) -> (Stores, impl std::future::Future<Output = ()> + Send + use<>) {
    let (devices, w_devices) = reflector::store();
    let (profiles, w_profiles) = reflector::store();
    let (uplinks, w_uplinks) = reflector::store();
    let (nodes, w_nodes) = reflector::store();
    let (secrets, w_secrets) = reflector::store();
    let cfg = watcher::Config::default;
    let node_cfg = cfg().labels(&format!("{GATEWAY_NODE_LABEL}=true"));
    let t = || Arc::clone(&trigger);
    let m = || Arc::clone(&metrics);
    let run = futures::future::join5(
        forward(
            reflector::reflector(w_devices, watcher(Api::<Device>::all(client.clone()), cfg()).modify(slim))
                .default_backoff(),
            t(),
            m(),
        ),
        forward(
            reflector::reflector(w_profiles, watcher(Api::<DeviceProfile>::all(client.clone()), cfg()).modify(slim))
                .default_backoff(),
            t(),
            m(),
        ),
        forward(
            reflector::reflector(w_uplinks, watcher(Api::<Uplink>::all(client.clone()), cfg()).modify(slim))
                .default_backoff(),
            t(),
            m(),
        ),
        forward(
            reflector::reflector(w_nodes, watcher(Api::<Node>::all(client.clone()), node_cfg).modify(slim))
                .default_backoff(),
            t(),
            m(),
        ),
        forward(
            reflector::reflector(
                w_secrets,
                watcher(Api::<PartialObjectMeta<Secret>>::all(client.clone()), cfg()).modify(slim),
            )
            .default_backoff(),
            t(),
            m(),
        ),
    );
    let stores = Stores::new(devices, profiles, uplinks, nodes, secrets);
    (stores, async move {
        run.await;
    })
}

/// Knobs of the loop.
#[derive(Clone, Copy, Debug)]
pub struct LoopSettings {
    /// Quiet time after a change before reconciling (changes come in bursts).
    pub debounce: Duration,
    /// Reconcile at least this often, changes or not.
    pub resync: Duration,
    /// How long a node may be NotReady before its network devices move.
    pub failover_grace: Duration,
    /// Whether failed-over devices return home.
    pub fail_back: bool,
}

/// Why a reconcile did not do everything: the weightiest failure of the pass (the end of
/// leadership, then a transient one, then a permanent one). The rest of the pass was done.
#[derive(Debug, thiserror::Error)]
pub enum ReconcileError {
    /// Reading a referenced Secret failed.
    #[error("read Secret {secret}: {source}")]
    ReadSecret {
        /// The Secret.
        secret: ObjectKey,
        /// Cause.
        #[source]
        source: CallError,
    },
    /// Writing failed.
    #[error(transparent)]
    Write(#[from] WriteError),
}

impl ReconcileError {
    /// Metrics label.
    pub fn kind(&self) -> &'static str {
        match self {
            ReconcileError::ReadSecret { .. } => "read_secret",
            ReconcileError::Write(e) if e.is_not_leading() => "not_leading",
            ReconcileError::Write(e) => e.kind(),
        }
    }

    /// Whether retrying soon may help; otherwise the loop waits for a change.
    pub fn is_transient(&self) -> bool {
        match self {
            ReconcileError::ReadSecret { source, .. } => source.is_transient(),
            ReconcileError::Write(e) => e.is_transient(),
        }
    }

    /// Whether the pass stopped because this replica stopped leading.
    pub fn is_not_leading(&self) -> bool {
        matches!(self, ReconcileError::Write(e) if e.is_not_leading())
            || matches!(self, ReconcileError::ReadSecret { source: CallError::NotLeading, .. })
    }

    fn weight(&self) -> u8 {
        if self.is_not_leading() { 2 } else { u8::from(self.is_transient()) }
    }

    /// Keeps the weightier of `current` and `new` (the first of equals).
    fn keep_weightier(current: &mut Option<ReconcileError>, new: ReconcileError) {
        if current.as_ref().is_none_or(|c| new.weight() > c.weight()) {
            *current = Some(new);
        }
    }
}

/// The referenced Secrets as far as they could be read.
#[derive(Default)]
struct SecretReads {
    index: SecretIndex,
    values: SecretValues,
    /// Secrets that could not be read and have no earlier value, with why.
    unreadable: BTreeMap<ObjectKey, String>,
    /// Of those, the ones whose failure may pass: the objects behind them are held.
    transient: BTreeSet<ObjectKey>,
    /// The weightiest failure.
    failure: Option<ReconcileError>,
}

/// The controller's state between reconciles.
pub struct Reconciler {
    client: Client,
    stores: Stores,
    writer: Writer,
    metrics: Arc<Metrics>,
    settings: LoopSettings,
    secret_cache: BTreeMap<ObjectKey, (String, Arc<Secret>)>,
    placements: Placements,
    /// The nodes each Uplink ran on after the last pass.
    uplink_nodes: BTreeMap<ObjectKey, BTreeSet<String>>,
    next_review: Option<Timestamp>,
    term: Term,
}

impl Reconciler {
    /// A reconciler over filled (or filling) stores, in a term that never ends until
    /// [`Reconciler::lead`] gives it one.
    pub fn new(client: Client, stores: Stores, writer: Writer, metrics: Arc<Metrics>, settings: LoopSettings) -> Self {
        Self {
            client,
            stores,
            writer,
            metrics,
            settings,
            secret_cache: BTreeMap::new(),
            placements: Placements::new(),
            uplink_nodes: BTreeMap::new(),
            next_review: None,
            term: Term::unbounded(),
        }
    }

    /// Starts a leadership term: every call of the following passes is made within it, and
    /// everything remembered about the cluster is forgotten (another leader may have written).
    pub fn lead(&mut self, term: Term) {
        self.writer.lead(term.clone());
        self.term = term;
        self.placements.clear();
        self.uplink_nodes.clear();
    }

    /// The world as the caches show it.
    fn snapshot(&self) -> World {
        World {
            devices: self.stores.devices.state(),
            profiles: self.stores.profiles.state(),
            uplinks: self.stores.uplinks.state(),
            nodes: self.stores.nodes.state(),
            secrets: None,
            unreadable_secrets: BTreeMap::new(),
        }
    }

    /// Reads the Secrets devices and uplinks reference (cached by resourceVersion). A Secret
    /// that cannot be read is that Secret's problem: on a transient failure its last value
    /// is used when there is one.
    async fn referenced_secrets(&mut self, world: &World) -> SecretReads {
        let mut wanted: Vec<ObjectKey> = world.uplinks.iter().flat_map(|u| render::secret_refs(u)).collect();
        wanted.extend(world.devices.iter().flat_map(|d| render::device_secret_refs(d)));
        wanted.sort();
        wanted.dedup();
        let mut reads = SecretReads::default();
        let mut cache = BTreeMap::new();
        for key in wanted {
            let meta = self.stores.secrets.get(&reflector::ObjectRef::new(&key.name).within(&key.namespace));
            let Some(meta) = meta else { continue };
            let rv = meta.resource_version().unwrap_or_default();
            let cached = self.secret_cache.remove(&key);
            let (rv, secret) = match cached {
                Some((cached_rv, s)) if cached_rv == rv => (rv, s),
                cached => {
                    let api = Api::<Secret>::namespaced(self.client.clone(), &key.namespace);
                    match self.term.call(api.get_opt(&key.name)).await {
                        Ok(Some(s)) => (rv, Arc::new(s)),
                        Ok(None) => continue,
                        Err(source) => {
                            let transient = source.is_transient() || matches!(source, CallError::NotLeading);
                            let stale = cached.filter(|_| transient);
                            if stale.is_none() {
                                reads.unreadable.insert(key.clone(), source.to_string());
                                if transient {
                                    reads.transient.insert(key.clone());
                                }
                            }
                            let e = ReconcileError::ReadSecret { secret: key.clone(), source };
                            ReconcileError::keep_weightier(&mut reads.failure, e);
                            // The last value read, kept under its own version: read again next time.
                            let Some(stale) = stale else { continue };
                            stale
                        }
                    }
                }
            };
            let mut data: BTreeMap<String, k8s_openapi::ByteString> = secret.data.clone().unwrap_or_default();
            for (k, v) in secret.string_data.iter().flatten() {
                data.insert(k.clone(), k8s_openapi::ByteString(v.clone().into_bytes()));
            }
            reads.index.insert(key.clone(), data.keys().cloned().collect());
            reads.values.insert(key.clone(), data);
            cache.insert(key, (rv, secret));
        }
        self.secret_cache = cache;
        reads
    }

    /// What this pass must leave alone because of Secrets that may be readable on a retry:
    /// the objects referencing them keep their status, and the nodes they ran on their config.
    fn held(&self, world: &World, transient: &BTreeSet<ObjectKey>, previous: &Placements) -> Held {
        let mut held = Held::default();
        if transient.is_empty() {
            return held;
        }
        for d in &world.devices {
            if render::device_secret_refs(d).iter().any(|k| transient.contains(k)) {
                let key = ObjectKey::of(d.as_ref());
                held.nodes.extend(previous.get(&key).map(|p| p.node.clone()));
                held.objects.insert(("Device", key));
            }
        }
        for u in &world.uplinks {
            if render::secret_refs(u).iter().any(|k| transient.contains(k)) {
                let key = ObjectKey::of(u.as_ref());
                held.nodes.extend(self.uplink_nodes.get(&key).into_iter().flatten().cloned());
                held.nodes.extend(u.status.iter().flat_map(|s| s.gateways.iter().map(|g| g.node.clone())));
                held.objects.insert(("Uplink", key));
            }
        }
        held
    }

    /// Renders the world as the caches show it and writes the difference. Node configs are
    /// built, applied and dropped one node at a time, so the result has every verdict but no
    /// config: only which nodes got one.
    pub async fn reconcile(&mut self) -> Result<(Rendered<()>, WriteSummary), ReconcileError> {
        let mut world = self.snapshot();
        let SecretReads { index, values, unreadable, transient, failure } = self.referenced_secrets(&world).await;
        world.secrets = Some(index);
        world.unreadable_secrets = unreadable;
        let mut previous = render::placements_from_status(&world.devices);
        previous.extend(self.placements.iter().map(|(k, v)| (k.clone(), v.clone())));
        let held = self.held(&world, &transient, &previous);
        let settings = Settings {
            now: Timestamp::now(),
            failover_grace: self.settings.failover_grace,
            fail_back: self.settings.fail_back,
        };
        let started = Instant::now();
        let rendered = render::plan(&world, &previous, &settings);
        self.metrics.render_duration.observe(started.elapsed().as_secs_f64());
        // Held devices keep their placement for the next pass; the rest of `previous` goes.
        let held_placements: Placements = held
            .objects
            .iter()
            .filter(|(kind, _)| *kind == "Device")
            .filter_map(|(_, key)| Some((key.clone(), previous.get(key)?.clone())))
            .collect();
        drop(previous);
        self.record(&rendered);
        let mut pass = WritePass::default();
        self.writer.write_configs(&rendered, &world.nodes, &values, &held, &mut pass).await;
        // The node plans borrow the snapshot; without them the snapshot's Devices can go one
        // by one as their statuses are written, rather than stay alive beside the updated
        // objects the watch cache receives meanwhile (twice every Device on a cold start).
        let rendered = rendered.map_nodes(|_| ());
        let World { devices, uplinks, .. } = world;
        self.writer.write_statuses(&rendered, devices, uplinks, &held, &mut pass).await;
        // Held objects keep their placement and nodes for the next pass.
        let mut placements = rendered.placements();
        placements.extend(held_placements);
        let mut uplink_nodes: BTreeMap<ObjectKey, BTreeSet<String>> =
            rendered.uplinks.iter().map(|(k, v)| (k.clone(), v.nodes.clone())).collect();
        for (_, key) in held.objects.iter().filter(|(kind, _)| *kind == "Uplink") {
            uplink_nodes.extend(self.uplink_nodes.get(key).map(|n| (key.clone(), n.clone())));
        }
        self.placements = placements;
        self.uplink_nodes = uplink_nodes;
        self.next_review = rendered.next_review;
        let mut failure = failure;
        let (summary, write_failure) = pass.into_parts();
        if let Some(e) = write_failure {
            ReconcileError::keep_weightier(&mut failure, ReconcileError::Write(e));
        }
        if let Some(e) = failure {
            return Err(e);
        }
        Ok((rendered, summary))
    }

    fn record<N>(&self, r: &Rendered<N>) {
        let count = |resource, state, n: usize| {
            self.metrics
                .objects
                .get_or_create(&ObjectStateLabels { resource, state })
                .set(i64::try_from(n).unwrap_or(i64::MAX));
        };
        let ok_devices = r.devices.values().filter(|v| v.verdict.configured()).count();
        count("device", "configured", ok_devices);
        count("device", "invalid", r.devices.len() - ok_devices);
        let ok_uplinks = r.uplinks.values().filter(|v| v.verdict.configured()).count();
        count("uplink", "configured", ok_uplinks);
        count("uplink", "invalid", r.uplinks.len() - ok_uplinks);
        self.metrics.gateway_nodes.set(i64::try_from(r.gateway_nodes.len()).unwrap_or(i64::MAX));
        self.metrics.configured_nodes.set(i64::try_from(r.nodes.len()).unwrap_or(i64::MAX));
    }
}

fn next_wake(next_review: Option<Timestamp>, resync: Duration) -> Instant {
    let resync_at = Instant::now() + resync;
    let Some(at) = next_review else { return resync_at };
    let until = at.duration_since(Timestamp::now());
    let until = Duration::try_from(until).unwrap_or(Duration::ZERO) + Duration::from_millis(100);
    resync_at.min(Instant::now() + until)
}

/// One reconcile as one trace: the span `fieldgate.operator.reconcile` (exported when OTLP is
/// configured, see [`crate::telemetry`]) with its outcome, error kind and size; the API calls
/// of the reconcile are inside it.
pub async fn traced_reconcile(reconciler: &mut Reconciler) -> Result<(Rendered<()>, WriteSummary), ReconcileError> {
    let span = tracing::info_span!(
        "reconcile",
        otel.name = "fieldgate.operator.reconcile",
        otel.status_code = tracing::field::Empty,
        outcome = tracing::field::Empty,
        error.kind = tracing::field::Empty,
        nodes = tracing::field::Empty,
        devices = tracing::field::Empty,
    );
    let result = tracing::Instrument::instrument(reconciler.reconcile(), span.clone()).await;
    match &result {
        Ok((rendered, _)) => {
            span.record("outcome", "ok");
            span.record("otel.status_code", "OK");
            span.record("nodes", rendered.nodes.len());
            span.record("devices", rendered.devices.len());
        }
        Err(e) => {
            span.record("outcome", "error");
            span.record("otel.status_code", "ERROR");
            span.record("error.kind", e.kind());
        }
    }
    result
}

/// Runs the loop until `stop`: reconciles on changes (debounced), at the end of a node's grace
/// period, every `resync`, and retries transient failures with backoff (a permanent one waits
/// for the next change). Writes only while `leading`, each pass within the leadership term.
pub async fn run(
    mut reconciler: Reconciler,
    trigger: Arc<Notify>,
    mut leading: watch::Receiver<Leadership>,
    stop: CancellationToken,
) {
    let settings = reconciler.settings;
    // Never render a half-filled cache: it would look like every object was deleted.
    tokio::select! {
        () = stop.cancelled() => return,
        filled = reconciler.stores.ready() => if !filled { return },
    }
    let mut wake = Instant::now();
    let mut failures: u32 = 0;
    let mut term: Option<Term> = None;
    loop {
        let leads = leading.borrow_and_update().leads_at(Instant::now());
        match (&term, leads) {
            (Some(t), true) if !t.is_over() => {}
            (_, true) => {
                info!("leading: reconciling every object");
                let t = Term::start(leading.clone());
                reconciler.lead(t.clone());
                term = Some(t);
                wake = Instant::now();
                failures = 0;
            }
            (_, false) => {
                if let Some(t) = term.take() {
                    t.end();
                }
            }
        }
        reconciler.metrics.leader.set(i64::from(term.is_some()));
        let Some(current) = term.clone() else {
            tokio::select! {
                () = stop.cancelled() => return,
                changed = leading.changed() => if changed.is_err() { return },
            }
            continue;
        };
        tokio::select! {
            () = stop.cancelled() => return,
            () = current.ended() => continue,
            () = trigger.notified() => {
                tokio::select! {
                    () = stop.cancelled() => return,
                    () = tokio::time::sleep(settings.debounce) => {}
                }
            }
            () = tokio::time::sleep_until(wake) => {}
        }
        if current.is_over() {
            continue;
        }
        let started = Instant::now();
        let result = traced_reconcile(&mut reconciler).await;
        reconciler.metrics.reconcile_duration.observe(started.elapsed().as_secs_f64());
        match result {
            Ok((rendered, summary)) => {
                failures = 0;
                reconciler.metrics.reconciles.get_or_create(&OutcomeLabels { outcome: "ok" }).inc();
                if summary != WriteSummary::default() {
                    info!(
                        configmaps = summary.configmaps,
                        secrets = summary.secrets,
                        deleted = summary.deleted,
                        statuses = summary.statuses,
                        nodes = rendered.nodes.len(),
                        devices = rendered.devices.len(),
                        "reconciled"
                    );
                }
                wake = next_wake(rendered.next_review, settings.resync);
            }
            Err(e) if e.is_not_leading() => {
                warn!("leadership ended during a reconcile; its remaining writes were not made");
            }
            Err(e) => {
                let m = &reconciler.metrics;
                m.reconciles.get_or_create(&OutcomeLabels { outcome: "error" }).inc();
                m.reconcile_errors.get_or_create(&KindLabels { kind: e.kind() }).inc();
                if e.is_transient() {
                    failures = failures.saturating_add(1);
                    let delay = Duration::from_millis(500)
                        .saturating_mul(2u32.saturating_pow(failures.min(7)))
                        .min(Duration::from_secs(60));
                    warn!(error = %e, kind = e.kind(), retry_in = ?delay, "reconcile failed; retrying");
                    wake = Instant::now() + delay;
                } else {
                    failures = 0;
                    warn!(
                        error = %e, kind = e.kind(),
                        "reconcile refused; the objects concerned say why, and the next change (or the resync) tries again"
                    );
                    wake = next_wake(reconciler.next_review, settings.resync);
                }
            }
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;
    use crate::fixtures::*;
    use crate::writer::WriterSettings;
    use fieldgate_crds::Uplink;
    use http::{Request, Response, StatusCode};
    use kube::api::ObjectMeta;
    use kube::client::Body;
    use kube::core::PartialObjectMetaExt;
    use prometheus_client::registry::Registry;
    use serde_json::{Value, json};
    use tower_test::mock;

    /// The mocked API server's answer to a status write: the object with the written status.
    fn echo_status(uri: &str, body: Value) -> Value {
        let mut object = if uri.contains("/devices/") {
            serde_json::to_value(Device::test("meter-1")).unwrap()
        } else if uri.contains("/uplinks/") {
            serde_json::to_value(Uplink::test("cloud").auth("creds")).unwrap()
        } else {
            return body;
        };
        object["status"] = body["status"].clone();
        object
    }

    fn filled<K>(objects: Vec<K>) -> Store<K>
    where
        K: kube::Resource + Clone + 'static,
        K::DynamicType: Default + Eq + std::hash::Hash + Clone,
    {
        let (store, mut writer) = reflector::store();
        for o in objects {
            writer.apply_watcher_event(&watcher::Event::Apply(o));
        }
        store
    }

    /// A reconciler of `stores` writing through `client`, without debounce.
    fn test_reconciler(client: Client, stores: Stores, metrics: Arc<Metrics>) -> Reconciler {
        let writer = Writer::new(
            client.clone(),
            WriterSettings {
                namespace: "fieldgate-system".into(),
                concurrency: 1,
                instance: "op-0".into(),
                owner: None,
            },
            Arc::clone(&metrics),
        );
        let settings = LoopSettings {
            debounce: Duration::ZERO,
            resync: Duration::from_secs(300),
            failover_grace: Duration::from_secs(300),
            fail_back: false,
        };
        Reconciler::new(client, stores, writer, metrics, settings)
    }

    fn secret_meta(ns: &str, name: &str, rv: &str) -> PartialObjectMeta<Secret> {
        ObjectMeta {
            name: Some(name.into()),
            namespace: Some(ns.into()),
            resource_version: Some(rv.into()),
            ..ObjectMeta::default()
        }
        .into_response_partial::<Secret>()
    }

    #[tokio::test]
    async fn each_reconcile_is_one_trace_with_its_outcome() {
        use opentelemetry::trace::TracerProvider as _;
        use tracing_subscriber::layer::SubscriberExt as _;
        let exporter = opentelemetry_sdk::trace::InMemorySpanExporter::default();
        let provider =
            opentelemetry_sdk::trace::SdkTracerProvider::builder().with_simple_exporter(exporter.clone()).build();
        let subscriber =
            tracing_subscriber::registry().with(tracing_opentelemetry::layer().with_tracer(provider.tracer("test")));
        let _guard = tracing::subscriber::set_default(subscriber);

        let (service, mut handle) = mock::pair::<Request<Body>, Response<Body>>();
        let client = Client::new(service, "default");
        let metrics = Arc::new(Metrics::new(&mut Registry::default()));
        let stores = Stores::new(
            filled(vec![Device::test("meter-1")]),
            filled(vec![]),
            filled(vec![Uplink::test("cloud").auth("creds")]),
            filled(vec![Node::gateway("edge-1")]),
            filled(vec![secret_meta("default", "creds", "10")]),
        );
        let mut reconciler = test_reconciler(client, stores, metrics);
        // The API server fails the Secret read: the reconcile fails, and its trace says so.
        let server = tokio::spawn(async move {
            let (_req, send) = handle.next_request().await.unwrap();
            let status = json!({"kind": "Status", "apiVersion": "v1", "status": "Failure", "message": "boom", "reason": "InternalError", "code": 500});
            send.send_response(
                Response::builder()
                    .status(StatusCode::INTERNAL_SERVER_ERROR)
                    .body(Body::from(serde_json::to_vec(&status).unwrap()))
                    .unwrap(),
            );
        });
        let err = traced_reconcile(&mut reconciler).await.unwrap_err();
        server.await.unwrap();
        provider.force_flush().unwrap();
        let spans = exporter.get_finished_spans().unwrap();
        let span = spans.iter().find(|s| s.name == "fieldgate.operator.reconcile").expect("a reconcile span");
        assert_eq!(span.parent_span_id, opentelemetry::trace::SpanId::INVALID, "each reconcile is its own trace");
        assert!(matches!(span.status, opentelemetry::trace::Status::Error { .. }), "{:?}", span.status);
        let attr = |k: &str| span.attributes.iter().find(|kv| kv.key.as_str() == k).map(|kv| kv.value.to_string());
        assert_eq!(attr("outcome").as_deref(), Some("error"));
        assert_eq!(attr("error.kind").as_deref(), Some(err.kind()));
    }

    #[tokio::test]
    async fn only_referenced_secrets_are_read_and_only_when_they_changed() {
        let (service, mut handle) = mock::pair::<Request<Body>, Response<Body>>();
        let client = Client::new(service, "default");
        let metrics = Arc::new(Metrics::new(&mut Registry::default()));
        let stores = Stores::new(
            filled(vec![Device::test("meter-1")]),
            filled(vec![]),
            filled(vec![Uplink::test("cloud").auth("creds")]),
            filled(vec![Node::gateway("edge-1")]),
            filled(vec![secret_meta("default", "creds", "10"), secret_meta("default", "unrelated", "3")]),
        );
        let mut reconciler = test_reconciler(client, stores, metrics);

        let server = tokio::spawn(async move {
            let mut gets = Vec::new();
            // Two passes: 1 GET + 8 writes, then nothing new to read (same resourceVersion)
            // and, with statuses not updated in the stores, the same status writes again.
            for _ in 0..9 {
                let (req, send) = handle.next_request().await.unwrap();
                let uri = req.uri().to_string();
                let method = req.method().clone();
                let bytes = req.into_body().collect_bytes().await.unwrap();
                let body: Value = if bytes.is_empty() { Value::Null } else { serde_json::from_slice(&bytes).unwrap() };
                let reply = if method == http::Method::GET && uri.contains("/secrets/") {
                    gets.push(uri.clone());
                    serde_json::to_value(secret("default", "creds", &[("username", "u"), ("password", "p")])).unwrap()
                } else if uri.contains("labelSelector") {
                    json!({"apiVersion": "v1", "kind": "PartialObjectMetadataList", "metadata": {}, "items": []})
                } else {
                    echo_status(&uri, body)
                };
                send.send_response(
                    Response::builder()
                        .status(StatusCode::OK)
                        .body(Body::from(serde_json::to_vec(&reply).unwrap()))
                        .unwrap(),
                );
            }
            (handle, gets)
        });
        let (rendered, summary) = reconciler.reconcile().await.unwrap();
        assert!(rendered.uplinks.values().all(|v| v.verdict.configured()));
        assert_eq!((summary.configmaps, summary.secrets), (1, 1));
        let (mut handle, gets) = server.await.unwrap();
        assert_eq!(gets, ["/api/v1/namespaces/default/secrets/creds"]);

        // Second pass: the Secret is cached (same resourceVersion); only status writes remain
        // (the stores here do not see the first pass's writes).
        let server = tokio::spawn(async move {
            let mut uris = Vec::new();
            while let Some((req, send)) = handle.next_request().await {
                let uri = req.uri().to_string();
                let bytes = req.into_body().collect_bytes().await.unwrap();
                let body: Value = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
                let reply = echo_status(&uri, body);
                send.send_response(
                    Response::builder()
                        .status(StatusCode::OK)
                        .body(Body::from(serde_json::to_vec(&reply).unwrap()))
                        .unwrap(),
                );
                uris.push(uri);
            }
            uris
        });
        reconciler.reconcile().await.unwrap();
        drop(reconciler);
        let uris = server.await.unwrap();
        assert!(uris.iter().all(|u| !u.contains("/secrets/") && !u.contains("/configmaps")), "{uris:?}");
    }

    #[tokio::test]
    async fn a_device_token_secret_reaches_its_nodes_secret_and_a_change_to_it_is_copied_again() {
        use fieldgate_crds::{Connection, DeviceSecretRef, RawConnection};
        let (service, mut handle) = mock::pair::<Request<Body>, Response<Body>>();
        let client = Client::new(service, "default");
        let metrics = Arc::new(Metrics::new(&mut Registry::default()));
        let device = Device::test("meter-1").spec_with(|s| {
            s.connection = Connection::Tcp(RawConnection {
                id: None,
                token_secret_ref: DeviceSecretRef { name: "dev-tok".into(), key: None },
            });
            s.points[0].modbus = None;
        });
        let (secrets, mut w_secrets) = reflector::store::<PartialObjectMeta<Secret>>();
        w_secrets.apply_watcher_event(&watcher::Event::Apply(secret_meta("default", "dev-tok", "1")));
        w_secrets.apply_watcher_event(&watcher::Event::Apply(secret_meta("default", "unrelated", "1")));
        let stores = Stores::new(
            filled(vec![device]),
            filled(vec![]),
            filled(vec![]),
            filled(vec![Node::gateway("edge-1")]),
            secrets,
        );
        let mut reconciler = test_reconciler(client, stores, metrics);

        // The API server: the token Secret's value changes between its two reads; every Secret
        // read and every per-node Secret written is recorded.
        let log: Arc<std::sync::Mutex<Vec<(String, Value)>>> = Arc::default();
        let server_log = Arc::clone(&log);
        let server = tokio::spawn(async move {
            let mut reads = 0;
            while let Some((req, send)) = handle.next_request().await {
                let uri = req.uri().to_string();
                let method = req.method().clone();
                let bytes = req.into_body().collect_bytes().await.unwrap();
                let body: Value = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
                let reply = if method == http::Method::GET && uri.contains("/secrets/") {
                    reads += 1;
                    let token = if reads == 1 { "one" } else { "two" };
                    server_log.lock().unwrap().push((format!("GET {uri}"), Value::Null));
                    serde_json::to_value(secret("default", "dev-tok", &[("token", token), ("other", "x")])).unwrap()
                } else if uri.contains("labelSelector") {
                    json!({"apiVersion": "v1", "kind": "PartialObjectMetadataList", "metadata": {}, "items": []})
                } else {
                    if uri.contains("/secrets/fieldgate-gateway-") {
                        server_log.lock().unwrap().push((format!("{method} {uri}"), body["data"].clone()));
                    }
                    echo_status(&uri, body)
                };
                send.send_response(
                    Response::builder()
                        .status(StatusCode::OK)
                        .body(Body::from(serde_json::to_vec(&reply).unwrap()))
                        .unwrap(),
                );
            }
        });
        let take = |log: &std::sync::Mutex<Vec<(String, Value)>>| std::mem::take(&mut *log.lock().unwrap());

        let (rendered, summary) = reconciler.reconcile().await.unwrap();
        assert!(rendered.devices.values().all(|v| v.verdict.configured()), "{:?}", rendered.devices);
        assert_eq!(summary.secrets, 1);
        let calls = take(&log);
        assert_eq!(calls[0].0, "GET /api/v1/namespaces/default/secrets/dev-tok", "only the referenced Secret");
        assert_eq!(calls.len(), 2, "{calls:?}");
        assert!(calls[1].0.contains("/namespaces/fieldgate-system/secrets/fieldgate-gateway-edge-1"), "{calls:?}");
        // Only the referenced key, under the per-node layout; "one" in base64.
        assert_eq!(calls[1].1, json!({"default_dev-tok_token": "b25l"}));

        // The Secret changes (a new resourceVersion, as its metadata watch shows): read again and
        // the node's Secret rewritten.
        w_secrets.apply_watcher_event(&watcher::Event::Apply(secret_meta("default", "dev-tok", "2")));
        let (_, summary) = reconciler.reconcile().await.unwrap();
        assert_eq!((summary.configmaps, summary.secrets), (1, 1), "the ConfigMap names the new credentials");
        let calls = take(&log);
        assert_eq!(calls[0].0, "GET /api/v1/namespaces/default/secrets/dev-tok");
        assert_eq!(calls[1].1, json!({"default_dev-tok_token": "dHdv"}));
        drop(reconciler);
        server.await.unwrap();
    }

    /// A TCP device pinned to `node` whose token is Secret `secret`.
    fn token_device(name: &str, node: &str, secret: &str) -> Device {
        use fieldgate_crds::{Connection, DeviceSecretRef, RawConnection};
        Device::test(name).pinned(node).spec_with(|s| {
            s.connection = Connection::Tcp(RawConnection {
                id: None,
                token_secret_ref: DeviceSecretRef { name: secret.into(), key: None },
            });
            s.points[0].modbus = None;
        })
    }

    /// A mocked API server answering Secret reads from `reads` (name -> HTTP status; 200
    /// serves a token) and everything else as echo; records `METHOD path` of every request.
    fn recording_server(
        mut handle: mock::Handle<Request<Body>, Response<Body>>,
        reads: std::collections::HashMap<&'static str, u16>,
    ) -> (Arc<std::sync::Mutex<Vec<String>>>, tokio::task::JoinHandle<()>) {
        let log: Arc<std::sync::Mutex<Vec<String>>> = Arc::default();
        let server_log = Arc::clone(&log);
        let server = tokio::spawn(async move {
            while let Some((req, send)) = handle.next_request().await {
                let uri = req.uri().to_string();
                let method = req.method().clone();
                let bytes = req.into_body().collect_bytes().await.unwrap();
                let body: Value = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
                server_log.lock().unwrap().push(format!("{method} {}", uri.split('?').next().unwrap()));
                let read = uri.rsplit('/').next().and_then(|name| reads.get(name)).copied();
                let (code, reply) = match read {
                    Some(200) if method == http::Method::GET => {
                        let name = uri.rsplit('/').next().unwrap();
                        (200, serde_json::to_value(secret("default", name, &[("token", "t")])).unwrap())
                    }
                    Some(code) if method == http::Method::GET => (
                        code,
                        json!({"kind": "Status", "apiVersion": "v1", "status": "Failure", "code": code,
                            "reason": if code == 403 { "Forbidden" } else { "InternalError" }, "message": "refused"}),
                    ),
                    _ if uri.contains("labelSelector") => (
                        200,
                        json!({"apiVersion": "v1", "kind": "PartialObjectMetadataList", "metadata": {}, "items": []}),
                    ),
                    _ => (200, echo_status(&uri, body)),
                };
                send.send_response(
                    Response::builder().status(code).body(Body::from(serde_json::to_vec(&reply).unwrap())).unwrap(),
                );
            }
        });
        (log, server)
    }

    fn two_nodes_two_secrets(a_node_status: Option<&str>) -> Stores {
        let mut a = token_device("a", "edge-1", "tok-a");
        a.status = a_node_status.map(|n| fieldgate_crds::DeviceStatus { node: Some(n.into()), ..Default::default() });
        Stores::new(
            filled(vec![a, token_device("b", "edge-2", "tok-b")]),
            filled(vec![]),
            filled(vec![]),
            filled(vec![Node::gateway("edge-1"), Node::gateway("edge-2")]),
            filled(vec![secret_meta("default", "tok-a", "1"), secret_meta("default", "tok-b", "1")]),
        )
    }

    #[tokio::test]
    async fn a_forbidden_secret_refuses_only_its_devices_and_every_other_node_gets_its_update() {
        let (service, handle) = mock::pair::<Request<Body>, Response<Body>>();
        let metrics = Arc::new(Metrics::new(&mut Registry::default()));
        let mut reconciler = test_reconciler(Client::new(service, "default"), two_nodes_two_secrets(None), metrics);
        let (log, server) = recording_server(handle, [("tok-a", 403), ("tok-b", 200)].into());

        let err = reconciler.reconcile().await.unwrap_err();
        assert_eq!(err.kind(), "read_secret");
        assert!(!err.is_transient(), "a refusal waits for a change instead of a retry loop");
        drop(reconciler);
        server.await.unwrap();
        let calls = log.lock().unwrap().clone();
        for wanted in [
            "PATCH /api/v1/namespaces/fieldgate-system/secrets/fieldgate-gateway-edge-2",
            "PATCH /api/v1/namespaces/fieldgate-system/configmaps/fieldgate-gateway-edge-2",
            "PATCH /apis/fieldgate.io/v1alpha1/namespaces/default/devices/a/status",
            "PATCH /apis/fieldgate.io/v1alpha1/namespaces/default/devices/b/status",
        ] {
            assert!(calls.iter().any(|c| c == wanted), "{wanted} missing from {calls:?}");
        }
        assert!(!calls.iter().any(|c| c.contains("gateway-edge-1")), "edge-1 serves nothing readable: {calls:?}");
    }

    #[tokio::test]
    async fn the_refused_device_says_which_secret_could_not_be_read() {
        let d = token_device("a", "edge-1", "tok-a");
        let v = render::DeviceVerdict {
            verdict: render::Verdict {
                problems: vec![render::Problem {
                    reason: render::Reason::UnreadableSecret,
                    path: "spec.connection.tcp.tokenSecretRef.name".into(),
                    message: "Secret \"tok-a\" in namespace \"default\" could not be read: forbidden".into(),
                }],
            },
            placed: None,
            generation: Some(1),
        };
        let status = crate::writer::device_status_change(&d, &v).unwrap();
        let ready = &status["conditions"][1];
        assert_eq!(
            (&ready["type"], &ready["status"], &ready["reason"]),
            (&json!("Ready"), &json!("False"), &json!("NotConfigured"))
        );
        assert!(ready["message"].as_str().unwrap().contains("could not be read"), "{ready}");
        assert_eq!(status["conditions"][0]["reason"], json!("UnreadableSecret"));
    }

    #[tokio::test]
    async fn a_secret_read_that_may_pass_holds_the_node_of_its_device_and_updates_the_others() {
        let (service, handle) = mock::pair::<Request<Body>, Response<Body>>();
        let metrics = Arc::new(Metrics::new(&mut Registry::default()));
        let stores = two_nodes_two_secrets(Some("edge-1"));
        let mut reconciler = test_reconciler(Client::new(service, "default"), stores, metrics);
        let (log, server) = recording_server(handle, [("tok-a", 503), ("tok-b", 200)].into());

        let err = reconciler.reconcile().await.unwrap_err();
        assert!(err.is_transient(), "retried soon: {err}");
        drop(reconciler);
        server.await.unwrap();
        let calls = log.lock().unwrap().clone();
        assert!(
            calls.iter().any(|c| c == "PATCH /api/v1/namespaces/fieldgate-system/configmaps/fieldgate-gateway-edge-2"),
            "{calls:?}"
        );
        assert!(
            !calls.iter().any(|c| c.contains("gateway-edge-1") || c.contains("/devices/a/")),
            "edge-1 keeps its config and device a its status until the Secret reads: {calls:?}"
        );
    }

    #[tokio::test]
    async fn a_secret_read_that_may_pass_uses_the_value_read_before() {
        let (service, handle) = mock::pair::<Request<Body>, Response<Body>>();
        let metrics = Arc::new(Metrics::new(&mut Registry::default()));
        let (secrets, mut w_secrets) = reflector::store::<PartialObjectMeta<Secret>>();
        w_secrets.apply_watcher_event(&watcher::Event::Apply(secret_meta("default", "tok-a", "1")));
        let stores = Stores::new(
            filled(vec![token_device("a", "edge-1", "tok-a")]),
            filled(vec![]),
            filled(vec![]),
            filled(vec![Node::gateway("edge-1")]),
            secrets,
        );
        let mut reconciler = test_reconciler(Client::new(service, "default"), stores, metrics);
        let reads = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let counted = Arc::clone(&reads);
        let mut handle = handle;
        let server = tokio::spawn(async move {
            while let Some((req, send)) = handle.next_request().await {
                let uri = req.uri().to_string();
                let is_read = req.method() == http::Method::GET && uri.contains("/secrets/tok-a");
                let bytes = req.into_body().collect_bytes().await.unwrap();
                let body: Value = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
                let (code, reply) = if is_read {
                    // The first read answers, the second fails.
                    if counted.fetch_add(1, std::sync::atomic::Ordering::SeqCst) == 0 {
                        (200, serde_json::to_value(secret("default", "tok-a", &[("token", "t")])).unwrap())
                    } else {
                        (
                            500,
                            json!({"kind": "Status", "apiVersion": "v1", "status": "Failure", "code": 500, "message": "etcd"}),
                        )
                    }
                } else if uri.contains("labelSelector") {
                    (200, json!({"apiVersion": "v1", "kind": "PartialObjectMetadataList", "metadata": {}, "items": []}))
                } else {
                    (200, echo_status(&uri, body))
                };
                send.send_response(
                    Response::builder().status(code).body(Body::from(serde_json::to_vec(&reply).unwrap())).unwrap(),
                );
            }
        });
        let (rendered, _) = reconciler.reconcile().await.unwrap();
        assert!(rendered.devices.values().all(|v| v.verdict.configured()));
        // A new version that cannot be read: the device stays configured with the value known.
        w_secrets.apply_watcher_event(&watcher::Event::Apply(secret_meta("default", "tok-a", "2")));
        let err = reconciler.reconcile().await.unwrap_err();
        assert!(err.is_transient());
        assert_eq!(reads.load(std::sync::atomic::Ordering::SeqCst), 2);
        assert!(reconciler.placements.contains_key(&ObjectKey::new("default", "a")), "still placed");
        drop(reconciler);
        server.await.unwrap();
    }

    #[tokio::test]
    async fn no_write_is_made_once_the_term_is_over() {
        let (service, mut handle) = mock::pair::<Request<Body>, Response<Body>>();
        let metrics = Arc::new(Metrics::new(&mut Registry::default()));
        let stores = Stores::new(
            filled(vec![Device::test("meter-1")]),
            filled(vec![]),
            filled(vec![]),
            filled(vec![Node::gateway("edge-1")]),
            filled(vec![]),
        );
        let mut reconciler = test_reconciler(Client::new(service, "default"), stores, metrics);
        let term = Term::unbounded();
        reconciler.lead(term.clone());
        term.end();
        let err = reconciler.reconcile().await.unwrap_err();
        assert!(err.is_not_leading(), "{err}");
        drop(reconciler);
        assert!(handle.next_request().await.is_none(), "a request was sent after the term ended");
    }

    #[tokio::test]
    async fn every_task_waiting_for_the_caches_sees_them_filled() {
        let (devices, mut w_devices) = reflector::store::<Device>();
        let (profiles, mut w_profiles) = reflector::store::<DeviceProfile>();
        let (uplinks, mut w_uplinks) = reflector::store::<Uplink>();
        let (nodes, mut w_nodes) = reflector::store::<Node>();
        let (secrets, mut w_secrets) = reflector::store::<PartialObjectMeta<Secret>>();
        let stores = Stores::new(devices, profiles, uplinks, nodes, secrets);
        // The readiness probe and the loop both wait, in their own tasks, before the caches fill.
        let started = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let waiter = |stores: Stores| {
            let started = Arc::clone(&started);
            tokio::spawn(async move {
                started.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                stores.ready().await
            })
        };
        let (probe, looping) = (waiter(stores.clone()), waiter(stores.clone()));
        while started.load(std::sync::atomic::Ordering::SeqCst) < 2 {
            tokio::task::yield_now().await;
        }
        w_devices.apply_watcher_event(&watcher::Event::InitDone);
        w_profiles.apply_watcher_event(&watcher::Event::InitDone);
        w_uplinks.apply_watcher_event(&watcher::Event::InitDone);
        w_nodes.apply_watcher_event(&watcher::Event::InitDone);
        w_secrets.apply_watcher_event(&watcher::Event::InitDone);
        let both = async { (looping.await.unwrap(), probe.await.unwrap()) };
        assert_eq!(
            tokio::time::timeout(Duration::from_secs(5), both).await.expect("a waiter was never woken"),
            (true, true)
        );
    }
}
