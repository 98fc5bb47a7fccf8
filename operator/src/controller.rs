//! The control loop: watch every input, and on any change (debounced) render the whole world
//! and write the difference.
//!
//! Whole-world reconciles fit this problem: placement and uplink selection couple every
//! Device to every Node and Uplink, and render of 10,000 devices takes milliseconds. The loop
//! runs only while this replica holds the Lease; the watch caches stay warm on standbys.
//!
//! Inputs: Devices, DeviceProfiles, Uplinks (all namespaces), Nodes labelled
//! `fieldgate.io/gateway=true`, and Secret *metadata* (all namespaces): any Secret change
//! triggers a reconcile. Secret values are fetched only for Secrets that Devices or Uplinks
//! reference, and again only when their resourceVersion changes, so the operator never caches
//! every Secret of the cluster.

use std::collections::BTreeMap;
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

use crate::metrics::{KindLabels, Metrics, ObjectStateLabels, OutcomeLabels};
use crate::render::{self, ObjectKey, Placements, Rendered, SecretIndex, Settings, World};
use crate::writer::{SecretValues, WriteError, WritePass, WriteSummary, Writer};

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

/// Why a reconcile failed.
#[derive(Debug, thiserror::Error)]
pub enum ReconcileError {
    /// Reading a referenced Secret failed.
    #[error("read Secret {secret}: {source}")]
    ReadSecret {
        /// The Secret.
        secret: ObjectKey,
        /// Cause.
        #[source]
        source: kube::Error,
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
            ReconcileError::Write(e) => e.kind(),
        }
    }
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
}

impl Reconciler {
    /// A reconciler over filled (or filling) stores.
    pub fn new(client: Client, stores: Stores, writer: Writer, metrics: Arc<Metrics>, settings: LoopSettings) -> Self {
        Self { client, stores, writer, metrics, settings, secret_cache: BTreeMap::new(), placements: Placements::new() }
    }

    /// Forget everything remembered about the cluster (on gaining leadership).
    pub fn forget(&mut self) {
        self.writer.forget();
        self.placements.clear();
    }

    /// The world as the caches show it.
    fn snapshot(&self) -> World {
        World {
            devices: self.stores.devices.state(),
            profiles: self.stores.profiles.state(),
            uplinks: self.stores.uplinks.state(),
            nodes: self.stores.nodes.state(),
            secrets: None,
        }
    }

    /// Reads the Secrets devices and uplinks reference (cached by resourceVersion).
    async fn referenced_secrets(&mut self, world: &World) -> Result<(SecretIndex, SecretValues), ReconcileError> {
        let mut wanted: Vec<ObjectKey> = world.uplinks.iter().flat_map(|u| render::secret_refs(u)).collect();
        wanted.extend(world.devices.iter().flat_map(|d| render::device_secret_refs(d)));
        wanted.sort();
        wanted.dedup();
        let mut index = SecretIndex::new();
        let mut values = SecretValues::new();
        let mut cache = BTreeMap::new();
        for key in wanted {
            let meta = self.stores.secrets.get(&reflector::ObjectRef::new(&key.name).within(&key.namespace));
            let Some(meta) = meta else { continue };
            let rv = meta.resource_version().unwrap_or_default();
            let secret = match self.secret_cache.remove(&key) {
                Some((cached_rv, s)) if cached_rv == rv => s,
                _ => {
                    let api = Api::<Secret>::namespaced(self.client.clone(), &key.namespace);
                    match api.get_opt(&key.name).await {
                        Ok(Some(s)) => Arc::new(s),
                        Ok(None) => continue,
                        Err(source) => return Err(ReconcileError::ReadSecret { secret: key, source }),
                    }
                }
            };
            let mut data: BTreeMap<String, k8s_openapi::ByteString> = secret.data.clone().unwrap_or_default();
            for (k, v) in secret.string_data.iter().flatten() {
                data.insert(k.clone(), k8s_openapi::ByteString(v.clone().into_bytes()));
            }
            index.insert(key.clone(), data.keys().cloned().collect());
            values.insert(key.clone(), data);
            cache.insert(key, (rv, secret));
        }
        self.secret_cache = cache;
        Ok((index, values))
    }

    /// Renders the world as the caches show it and writes the difference. Node configs are
    /// built, applied and dropped one node at a time, so the result has every verdict but no
    /// config: only which nodes got one.
    pub async fn reconcile(&mut self) -> Result<(Rendered<()>, WriteSummary), ReconcileError> {
        let mut world = self.snapshot();
        let (index, values) = self.referenced_secrets(&world).await?;
        world.secrets = Some(index);
        let mut previous = render::placements_from_status(&world.devices);
        previous.extend(self.placements.iter().map(|(k, v)| (k.clone(), v.clone())));
        let settings = Settings {
            now: Timestamp::now(),
            failover_grace: self.settings.failover_grace,
            fail_back: self.settings.fail_back,
        };
        let started = Instant::now();
        let rendered = render::plan(&world, &previous, &settings);
        self.metrics.render_duration.observe(started.elapsed().as_secs_f64());
        drop(previous);
        self.record(&rendered);
        let mut pass = WritePass::default();
        self.writer.write_configs(&rendered, &world.nodes, &values, &mut pass).await;
        // The node plans borrow the snapshot; without them the snapshot's Devices can go one
        // by one as their statuses are written, rather than stay alive beside the updated
        // objects the watch cache receives meanwhile (twice every Device on a cold start).
        let rendered = rendered.map_nodes(|_| ());
        let World { devices, uplinks, .. } = world;
        self.writer.write_statuses(&rendered, devices, uplinks, &mut pass).await;
        let summary = pass.finish()?;
        self.placements = rendered.placements();
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
/// period, every `resync`, and retries failures with backoff. Writes only while `leading`.
pub async fn run(
    mut reconciler: Reconciler,
    trigger: Arc<Notify>,
    mut leading: watch::Receiver<bool>,
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
    let mut was_leading = false;
    loop {
        let is_leading = *leading.borrow_and_update();
        reconciler.metrics.leader.set(i64::from(is_leading));
        if is_leading && !was_leading {
            info!("leading: reconciling every object");
            reconciler.forget();
            wake = Instant::now();
        }
        was_leading = is_leading;
        if !is_leading {
            tokio::select! {
                () = stop.cancelled() => return,
                changed = leading.changed() => if changed.is_err() { return },
            }
            continue;
        }
        tokio::select! {
            () = stop.cancelled() => return,
            () = trigger.notified() => {
                tokio::select! {
                    () = stop.cancelled() => return,
                    () = tokio::time::sleep(settings.debounce) => {}
                }
            }
            () = tokio::time::sleep_until(wake) => {}
            _ = leading.changed() => continue,
        }
        if !*leading.borrow() {
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
            Err(e) => {
                failures = failures.saturating_add(1);
                let m = &reconciler.metrics;
                m.reconciles.get_or_create(&OutcomeLabels { outcome: "error" }).inc();
                m.reconcile_errors.get_or_create(&KindLabels { kind: e.kind() }).inc();
                let delay = Duration::from_millis(500)
                    .saturating_mul(2u32.saturating_pow(failures.min(7)))
                    .min(Duration::from_secs(60));
                warn!(error = %e, kind = e.kind(), retry_in = ?delay, "reconcile failed");
                wake = Instant::now() + delay;
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
            WriterSettings { namespace: "fieldgate-system".into(), concurrency: 1, instance: "op-0".into() },
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
        assert_eq!((summary.configmaps, summary.secrets), (0, 1));
        let calls = take(&log);
        assert_eq!(calls[0].0, "GET /api/v1/namespaces/default/secrets/dev-tok");
        assert_eq!(calls[1].1, json!({"default_dev-tok_token": "dHdv"}));
        drop(reconciler);
        server.await.unwrap();
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
