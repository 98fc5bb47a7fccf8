//! The IO side of a reconcile: turns a [`Rendered`] world into API writes.
//!
//! - Per node serving devices, with server-side apply (field manager `fieldgate-operator`,
//!   owner reference to the Node): ConfigMap `fieldgate-gateway-<node>` (key `gateway.yaml`,
//!   annotation `fieldgate.io/config-hash`) and Secret `fieldgate-gateway-<node>` with only the
//!   keys that node's devices and uplinks reference (layout: [`fieldgate_crds::node_objects`]).
//!   Applied only when their hash changed since this leader last applied them.
//! - Per-node objects of nodes that no longer serve any device are deleted.
//! - `Device` and `Uplink` status through the status subresource (server-side apply: the
//!   operator owns `node`, `observedGeneration`, `failedOverFrom` and the `Configured`
//!   condition; the gateway owns `Reachable`, `lastSeen` and its uplink entries), written only
//!   when different from what the object shows. Events for transitions.
//!
//! Secret values only pass through here, from the source Secrets to the per-node Secret; they
//! are never logged.
//!
//! Memory: a node's config is built (from a [`crate::render::NodePlan`]), hashed, serialised,
//! applied and dropped before the next node's; status patches are computed as they are sent;
//! Events go through a [`Recorder`] per object, so its series cache holds that object's
//! Events only, not every Event of the last minutes.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use fieldgate_crds::node_objects::{
    self, CONFIG_HASH_ANNOTATION, CONFIG_KEY, NODE_ANNOTATION, ROLE_CONFIG, ROLE_LABEL, SECRET_HASH_ANNOTATION,
};
use fieldgate_crds::{Device, Uplink};
use futures::StreamExt;
use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::{ConfigMap, Node, Secret};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, OwnerReference, Time};
use k8s_openapi::jiff::Timestamp;
use kube::api::{DeleteParams, ListParams, ObjectMeta, Patch, PatchParams};
use kube::runtime::events::{Event, EventType, Recorder, Reporter};
use kube::{Api, Client, Resource, ResourceExt};
use serde_json::json;
use sha2::{Digest, Sha256};
use tracing::{debug, info};

use crate::metrics::Metrics;
use crate::render::{DeviceVerdict, NodeConfig, NodeSource, ObjectKey, Rendered, UplinkVerdict, Verdict, World, hex16};

/// Field manager of every write.
pub const MANAGER: &str = "fieldgate-operator";
/// `app.kubernetes.io/managed-by` value on the per-node objects.
pub const MANAGED_BY: &str = "fieldgate-operator";

/// Values of the Secrets referenced by devices and uplinks: `(namespace, name) -> key -> value`.
pub type SecretValues = BTreeMap<ObjectKey, BTreeMap<String, ByteString>>;

/// What went wrong with one write.
#[derive(Debug, thiserror::Error)]
pub enum WriteError {
    /// Applying a per-node ConfigMap or Secret failed.
    #[error("apply {object}: {source}")]
    Apply {
        /// `ConfigMap ns/name` or `Secret ns/name`.
        object: String,
        /// Cause.
        #[source]
        source: kube::Error,
    },
    /// Listing or deleting per-node objects failed.
    #[error("clean up {object}: {source}")]
    Cleanup {
        /// What was listed or deleted.
        object: String,
        /// Cause.
        #[source]
        source: kube::Error,
    },
    /// A status write failed.
    #[error("status of {object}: {source}")]
    Status {
        /// `Device ns/name` or `Uplink ns/name`.
        object: String,
        /// Cause.
        #[source]
        source: kube::Error,
    },
    /// The per-node config could not be serialised (a bug).
    #[error("serialise the config of node {node}: {message}")]
    Serialise {
        /// The node.
        node: String,
        /// Cause.
        message: String,
    },
}

impl WriteError {
    /// Metrics label.
    pub fn kind(&self) -> &'static str {
        match self {
            WriteError::Apply { .. } => "apply",
            WriteError::Cleanup { .. } => "cleanup",
            WriteError::Status { .. } => "status",
            WriteError::Serialise { .. } => "serialise",
        }
    }

    /// Whether retrying may help (conflicts, throttling, server and transport errors).
    pub fn is_transient(&self) -> bool {
        let source = match self {
            WriteError::Apply { source, .. }
            | WriteError::Cleanup { source, .. }
            | WriteError::Status { source, .. } => source,
            WriteError::Serialise { .. } => return false,
        };
        match source {
            kube::Error::Api(s) => s.code == 409 || s.code == 429 || s.code >= 500,
            _ => true,
        }
    }
}

/// Settings of the writer.
#[derive(Clone, Debug)]
pub struct WriterSettings {
    /// Namespace of the per-node ConfigMaps and Secrets (the gateways').
    pub namespace: String,
    /// Status writes in flight at once.
    pub concurrency: usize,
    /// Reporting instance of Events (the pod name).
    pub instance: String,
}

/// What one write pass did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct WriteSummary {
    /// Per-node ConfigMaps applied.
    pub configmaps: usize,
    /// Per-node Secrets applied.
    pub secrets: usize,
    /// Nodes whose objects were deleted.
    pub deleted: usize,
    /// Status writes.
    pub statuses: usize,
}

/// A write pass in progress: what it did so far and its first error (it goes on after one).
#[derive(Debug, Default)]
pub struct WritePass {
    summary: WriteSummary,
    first_error: Option<WriteError>,
}

impl WritePass {
    fn count_status(&mut self, r: Result<bool, WriteError>) {
        match r {
            Ok(wrote) => self.summary.statuses += usize::from(wrote),
            Err(e) => {
                self.first_error.get_or_insert(e);
            }
        }
    }

    /// What the pass did, or its first error.
    pub fn finish(self) -> Result<WriteSummary, WriteError> {
        match self.first_error {
            Some(e) => Err(e),
            None => Ok(self.summary),
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
struct AppliedHashes {
    config: String,
    secret: String,
}

/// Writes render results; remembers what it applied while this replica leads.
pub struct Writer {
    client: Client,
    settings: WriterSettings,
    metrics: Arc<Metrics>,
    reporter: Reporter,
    applied: BTreeMap<String, AppliedHashes>,
    known_nodes: Option<BTreeSet<String>>,
}

impl Writer {
    /// A writer with empty memory (applies everything on the first pass).
    pub fn new(client: Client, settings: WriterSettings, metrics: Arc<Metrics>) -> Self {
        let reporter = Reporter { controller: MANAGER.into(), instance: Some(settings.instance.clone()) };
        Self { reporter, client, settings, metrics, applied: BTreeMap::new(), known_nodes: None }
    }

    /// Forgets what was applied (on gaining leadership: another leader may have written).
    pub fn forget(&mut self) {
        self.applied.clear();
        self.known_nodes = None;
    }

    /// Brings the cluster in line with `rendered`: [`Writer::write_configs`], then
    /// [`Writer::write_statuses`]. Fails with the first error, after trying every write.
    pub async fn write<N: NodeSource>(
        &mut self,
        rendered: &Rendered<N>,
        world: &World,
        secrets: &SecretValues,
    ) -> Result<WriteSummary, WriteError> {
        let mut pass = WritePass::default();
        self.write_configs(rendered, &world.nodes, secrets, &mut pass).await;
        self.write_statuses(rendered, world.devices.iter().cloned(), world.uplinks.iter().cloned(), &mut pass).await;
        pass.finish()
    }

    /// The per-node ConfigMaps and Secrets, and the deletion of those of nodes that serve no
    /// device any more. A config not built yet is built, applied and dropped before the next.
    pub async fn write_configs<N: NodeSource>(
        &mut self,
        rendered: &Rendered<N>,
        nodes: &[Arc<Node>],
        secrets: &SecretValues,
        pass: &mut WritePass,
    ) {
        let nodes: BTreeMap<String, &Node> = nodes.iter().map(|n| (n.name_any(), n.as_ref())).collect();
        for (node, source) in &rendered.nodes {
            let nc = source.node_config();
            if let Err(e) = self.apply_node(node, &nc, nodes.get(node).copied(), secrets, &mut pass.summary).await {
                self.applied.remove(node);
                pass.first_error.get_or_insert(e);
            }
        }
        if let Err(e) = self.delete_stale(rendered, &mut pass.summary).await {
            pass.first_error.get_or_insert(e);
        }
    }

    /// The status of every Device and Uplink whose status differs from the verdict, and their
    /// Events. Each patch is computed when its turn comes (at most `concurrency` exist at once)
    /// and each object is dropped once written: given the snapshot's objects, the old version
    /// of a Device is released while the watch cache takes the new one.
    pub async fn write_statuses<N>(
        &self,
        rendered: &Rendered<N>,
        devices: impl IntoIterator<Item = Arc<Device>>,
        uplinks: impl IntoIterator<Item = Arc<Uplink>>,
        pass: &mut WritePass,
    ) {
        let device_writes = devices.into_iter().filter_map(|d| {
            let v = rendered.devices.get(&ObjectKey::of(d.as_ref()))?;
            device_status_change(&d, v).map(|patch| (d, v, patch))
        });
        let uplink_writes = uplinks.into_iter().filter_map(|u| {
            let v = rendered.uplinks.get(&ObjectKey::of(u.as_ref()))?;
            uplink_status_change(&u, v).map(|patch| (u, v, patch))
        });
        let concurrency = self.settings.concurrency.max(1);
        let mut results = futures::stream::iter(device_writes)
            .map(|(d, v, patch)| async move { self.write_device_status(&d, v, patch).await })
            .buffer_unordered(concurrency);
        while let Some(r) = results.next().await {
            pass.count_status(r);
        }
        let mut results = futures::stream::iter(uplink_writes)
            .map(|(u, v, patch)| async move { self.write_uplink_status(&u, v, patch).await })
            .buffer_unordered(concurrency);
        while let Some(r) = results.next().await {
            pass.count_status(r);
        }
    }

    async fn apply_node(
        &mut self,
        node: &str,
        nc: &NodeConfig,
        node_obj: Option<&Node>,
        secrets: &SecretValues,
        summary: &mut WriteSummary,
    ) -> Result<(), WriteError> {
        let version = nc.config.version.clone().unwrap_or_default();
        let data = node_secret_data(nc, secrets);
        let secret_hash = secret_hash(&data);
        let previous = self.applied.get(node).cloned();
        let name = node_objects::object_name(node);
        let ns = self.settings.namespace.clone();
        let pp = PatchParams::apply(MANAGER).force();
        let meta = |hash_key: &str, hash: &str| ObjectMeta {
            name: Some(name.clone()),
            namespace: Some(ns.clone()),
            labels: Some(BTreeMap::from([
                ("app.kubernetes.io/managed-by".to_string(), MANAGED_BY.to_string()),
                ("app.kubernetes.io/part-of".to_string(), "fieldgate".to_string()),
                (ROLE_LABEL.to_string(), ROLE_CONFIG.to_string()),
            ])),
            annotations: Some(BTreeMap::from([
                (hash_key.to_string(), hash.to_string()),
                (NODE_ANNOTATION.to_string(), node.to_string()),
            ])),
            owner_references: node_obj.and_then(owner_reference).map(|o| vec![o]),
            ..ObjectMeta::default()
        };
        if previous.as_ref().map(|p| &p.config) != Some(&version) {
            let yaml = serde_saphyr::to_string(&nc.config)
                .map_err(|e| WriteError::Serialise { node: node.to_string(), message: e.to_string() })?;
            let cm = ConfigMap {
                metadata: meta(CONFIG_HASH_ANNOTATION, &version),
                data: Some(BTreeMap::from([(CONFIG_KEY.to_string(), yaml)])),
                ..ConfigMap::default()
            };
            Api::<ConfigMap>::namespaced(self.client.clone(), &ns)
                .patch(&name, &pp, &Patch::Apply(&cm))
                .await
                .map_err(|source| WriteError::Apply { object: format!("ConfigMap {ns}/{name}"), source })?;
            self.metrics.wrote("configmap");
            summary.configmaps += 1;
            info!(node, version = %version, devices = nc.config.devices.len(), uplinks = nc.config.uplinks.len(), "gateway config applied");
        }
        if previous.as_ref().map(|p| &p.secret) != Some(&secret_hash) {
            let secret = Secret {
                metadata: meta(SECRET_HASH_ANNOTATION, &secret_hash),
                type_: Some("Opaque".into()),
                data: Some(data),
                ..Secret::default()
            };
            Api::<Secret>::namespaced(self.client.clone(), &ns)
                .patch(&name, &pp, &Patch::Apply(&secret))
                .await
                .map_err(|source| WriteError::Apply { object: format!("Secret {ns}/{name}"), source })?;
            self.metrics.wrote("secret");
            summary.secrets += 1;
            debug!(node, keys = nc.secrets.len(), "gateway secret applied");
        }
        self.applied.insert(node.to_string(), AppliedHashes { config: version, secret: secret_hash });
        Ok(())
    }

    async fn delete_stale<N>(&mut self, rendered: &Rendered<N>, summary: &mut WriteSummary) -> Result<(), WriteError> {
        let ns = self.settings.namespace.clone();
        let cms = Api::<ConfigMap>::namespaced(self.client.clone(), &ns);
        let known = match self.known_nodes.take() {
            Some(k) => k,
            None => {
                let lp = ListParams::default()
                    .labels(&format!("app.kubernetes.io/managed-by={MANAGED_BY},{ROLE_LABEL}={ROLE_CONFIG}"));
                let list = cms
                    .list_metadata(&lp)
                    .await
                    .map_err(|source| WriteError::Cleanup { object: format!("ConfigMaps in {ns}"), source })?;
                list.items
                    .iter()
                    .filter_map(|cm| {
                        cm.annotations()
                            .get(NODE_ANNOTATION)
                            .cloned()
                            .or_else(|| cm.name_any().strip_prefix("fieldgate-gateway-").map(str::to_string))
                    })
                    .collect()
            }
        };
        let mut remaining: BTreeSet<String> = rendered.nodes.keys().cloned().collect();
        let secrets = Api::<Secret>::namespaced(self.client.clone(), &ns);
        let mut result = Ok(());
        for node in known.difference(&remaining.clone()) {
            let name = node_objects::object_name(node);
            let deleted = async {
                ignore_not_found(cms.delete(&name, &DeleteParams::default()).await.map(|_| ()))?;
                ignore_not_found(secrets.delete(&name, &DeleteParams::default()).await.map(|_| ()))
            }
            .await;
            match deleted {
                Ok(()) => {
                    self.applied.remove(node);
                    self.metrics.wrote("delete");
                    summary.deleted += 1;
                    info!(node, "gateway config deleted: the node serves no device");
                }
                Err(source) => {
                    // Keep it known so the next pass tries again.
                    remaining.insert(node.clone());
                    result = Err(WriteError::Cleanup { object: format!("ConfigMap and Secret {ns}/{name}"), source });
                }
            }
        }
        self.known_nodes = Some(remaining);
        result
    }

    /// Server-side applies `status` to the object `key` of kind `K`; `Ok(false)` when the
    /// object is gone.
    async fn apply_status<K>(&self, key: &ObjectKey, status: serde_json::Value) -> Result<bool, WriteError>
    where
        K: kube::Resource<Scope = k8s_openapi::NamespaceResourceScope, DynamicType = ()>
            + Clone
            + serde::de::DeserializeOwned
            + std::fmt::Debug,
    {
        let kind = K::kind(&());
        let api = Api::<K>::namespaced(self.client.clone(), &key.namespace);
        let patch = json!({"apiVersion": K::api_version(&()), "kind": kind, "status": status});
        match api.patch_status(&key.name, &PatchParams::apply(MANAGER).force(), &Patch::Apply(&patch)).await {
            Ok(_) => Ok(true),
            Err(kube::Error::Api(s)) if s.code == 404 => Ok(false),
            Err(source) => Err(WriteError::Status { object: format!("{kind} {key}"), source }),
        }
    }

    async fn write_device_status(
        &self,
        d: &Device,
        v: &DeviceVerdict,
        status: serde_json::Value,
    ) -> Result<bool, WriteError> {
        if !self.apply_status::<Device>(&ObjectKey::of(d), status).await? {
            return Ok(false);
        }
        self.metrics.wrote("device_status");
        let recorder = self.recorder();
        for ev in device_events(d, v) {
            self.publish(&recorder, d, ev).await;
        }
        Ok(true)
    }

    async fn write_uplink_status(
        &self,
        u: &Uplink,
        v: &UplinkVerdict,
        status: serde_json::Value,
    ) -> Result<bool, WriteError> {
        if !self.apply_status::<Uplink>(&ObjectKey::of(u), status).await? {
            return Ok(false);
        }
        self.metrics.wrote("uplink_status");
        let was = u.status.as_ref().and_then(|s| s.condition(CONFIGURED)).map(|c| c.status.clone());
        if let Some(ev) = configured_event(was.as_deref(), &v.verdict) {
            self.publish(&self.recorder(), u, ev).await;
        }
        Ok(true)
    }

    /// A recorder for the Events of one object. kube's [`Recorder`] keeps every Event it
    /// published for 6 minutes (to count repeats of the same Event on the same object version
    /// as a series), and scans them all on each publish: one per object keeps that to the
    /// object's own Events, as kube intends ("created at the start of your reconcile fn").
    fn recorder(&self) -> Recorder {
        Recorder::new(self.client.clone(), self.reporter.clone())
    }

    /// Events are best effort: a failure is logged at debug and counted, never fails the pass.
    async fn publish<K: Resource<DynamicType = ()>>(&self, recorder: &Recorder, obj: &K, ev: Event) {
        match recorder.publish(&ev, &obj.object_ref(&())).await {
            Ok(()) => self.metrics.wrote("event"),
            Err(e) => {
                self.metrics.wrote("event_failed");
                debug!(error = %e, reason = %ev.reason, "event not published");
            }
        }
    }
}

fn ignore_not_found(r: Result<(), kube::Error>) -> Result<(), kube::Error> {
    match r {
        Err(kube::Error::Api(s)) if s.code == 404 => Ok(()),
        other => other,
    }
}

fn owner_reference(node: &Node) -> Option<OwnerReference> {
    Some(OwnerReference {
        api_version: "v1".into(),
        kind: "Node".into(),
        name: node.name_any(),
        uid: node.meta().uid.clone()?,
        ..OwnerReference::default()
    })
}

/// The per-node Secret's data: only the referenced keys, under `<namespace>_<secret>_<key>`.
pub fn node_secret_data(nc: &NodeConfig, secrets: &SecretValues) -> BTreeMap<String, ByteString> {
    nc.secrets
        .iter()
        .filter_map(|item| {
            let value = secrets.get(&item.secret)?.get(&item.key)?;
            Some((node_objects::secret_key(&item.secret.namespace, &item.secret.name, &item.key), value.clone()))
        })
        .collect()
}

fn secret_hash(data: &BTreeMap<String, ByteString>) -> String {
    let mut h = Sha256::new();
    for (k, v) in data {
        h.update((k.len() as u64).to_be_bytes());
        h.update(k.as_bytes());
        h.update((v.0.len() as u64).to_be_bytes());
        h.update(&v.0);
    }
    hex16(&h.finalize())
}

/// The `Configured` condition type.
pub const CONFIGURED: &str = "Configured";
/// The `Ready` condition type.
pub const READY: &str = "Ready";
/// Reason of `Ready=False` the operator writes for objects it refused.
pub const NOT_CONFIGURED: &str = "NotConfigured";

fn condition(
    type_: &str,
    ok: bool,
    reason: &str,
    message: String,
    generation: Option<i64>,
    previous: Option<&Condition>,
) -> Condition {
    let status = if ok { "True" } else { "False" };
    let since = previous
        .filter(|c| c.status == status)
        .map_or_else(|| Time(Timestamp::now()), |c| c.last_transition_time.clone());
    Condition {
        type_: type_.into(),
        status: status.into(),
        reason: reason.into(),
        message,
        observed_generation: generation,
        last_transition_time: since,
    }
}

/// Longest condition message written (the API allows 32 KiB; people read the start).
const MAX_MESSAGE: usize = 4096;

fn configured_message(v: &Verdict, ok_message: &str) -> String {
    if v.configured() {
        return ok_message.to_string();
    }
    shorten(v.message(), MAX_MESSAGE)
}

/// Cuts `m` to at most `max` bytes (on a character boundary), marking the cut.
fn shorten(mut m: String, max: usize) -> String {
    if m.len() > max {
        let cut = (0..=max.saturating_sub(3)).rev().find(|&i| m.is_char_boundary(i)).unwrap_or(0);
        m.truncate(cut);
        m.push_str("...");
    }
    m
}

fn same_condition(c: Option<&Condition>, status: &str, reason: &str, message: &str, generation: Option<i64>) -> bool {
    c.is_some_and(|c| {
        c.status == status && c.reason == reason && c.message == message && c.observed_generation == generation
    })
}

/// What the operator writes of an object's conditions: `Configured`, and `Ready=False` while
/// not configured.
struct Shown<'a> {
    configured: Option<&'a Condition>,
    ready: Option<&'a Condition>,
    observed_generation: Option<i64>,
}

/// The `Configured` (and, while not configured, `Ready`) conditions and `observedGeneration`
/// of `verdict`; `None` when the object already shows them and `rest_unchanged` (its other
/// operator-written fields) holds.
fn configured_status(
    shown: &Shown<'_>,
    verdict: &Verdict,
    generation: Option<i64>,
    message: String,
    rest_unchanged: bool,
) -> Option<serde_json::Value> {
    let ok = verdict.configured();
    let reason = verdict.reason();
    let status_word = if ok { "True" } else { "False" };
    let unchanged = rest_unchanged
        && shown.observed_generation == generation
        && same_condition(shown.configured, status_word, reason, &message, generation)
        && (ok || same_condition(shown.ready, "False", NOT_CONFIGURED, &message, generation))
        && (!ok || shown.ready.is_none_or(|c| c.reason != NOT_CONFIGURED));
    if unchanged {
        return None;
    }
    let mut conditions = vec![condition(CONFIGURED, ok, reason, message.clone(), generation, shown.configured)];
    if !ok {
        conditions.push(condition(READY, false, NOT_CONFIGURED, message, generation, shown.ready));
    }
    let mut status = json!({"conditions": conditions});
    if let Some(g) = generation {
        status["observedGeneration"] = json!(g);
    }
    Some(status)
}

/// The operator's part of a Device's status, when it differs from what the object shows.
pub fn device_status_change(d: &Device, v: &DeviceVerdict) -> Option<serde_json::Value> {
    let cur = d.status.clone().unwrap_or_default();
    let message = configured_message(&v.verdict, "rendered into the gateway config of its node");
    let node = v.placed.as_ref().map(|p| p.node.clone());
    let failed_over_from = v.placed.as_ref().and_then(|p| p.failed_over_from.clone());
    let shown = Shown {
        configured: cur.condition(CONFIGURED),
        ready: cur.condition(READY),
        observed_generation: cur.observed_generation,
    };
    let rest_unchanged = cur.node == node && cur.failed_over_from == failed_over_from;
    let mut status = configured_status(&shown, &v.verdict, v.generation, message, rest_unchanged)?;
    if let Some(n) = node {
        status["node"] = json!(n);
    }
    if let Some(f) = failed_over_from {
        status["failedOverFrom"] = json!(f);
    }
    Some(status)
}

/// The operator's part of an Uplink's status, when it differs from what the object shows.
pub fn uplink_status_change(u: &Uplink, v: &UplinkVerdict) -> Option<serde_json::Value> {
    let cur = u.status.clone().unwrap_or_default();
    let message = configured_message(&v.verdict, "rendered into the gateway configs of the nodes of its devices");
    let shown = Shown {
        configured: cur.condition(CONFIGURED),
        ready: cur.condition(READY),
        observed_generation: cur.observed_generation,
    };
    configured_status(&shown, &v.verdict, v.generation, message, true)
}

fn configured_event(was: Option<&str>, v: &Verdict) -> Option<Event> {
    let now = if v.configured() { "True" } else { "False" };
    if was == Some(now) && v.configured() {
        return None;
    }
    Some(if v.configured() {
        Event {
            type_: EventType::Normal,
            reason: CONFIGURED.into(),
            note: Some("configuration accepted".into()),
            action: "Render".into(),
            secondary: None,
        }
    } else {
        // Refusals are repeated when the problem changes (a new message), not on every pass:
        // this is only called when the status changed.
        let note = shorten(v.message(), 1000);
        Event {
            type_: EventType::Warning,
            reason: v.reason().into(),
            note: Some(note),
            action: "Render".into(),
            secondary: None,
        }
    })
}

fn device_events(d: &Device, v: &DeviceVerdict) -> Vec<Event> {
    let cur = d.status.clone().unwrap_or_default();
    let mut out = Vec::new();
    let was = cur.condition(CONFIGURED).map(|c| c.status.as_str());
    out.extend(configured_event(was, &v.verdict));
    if let Some(p) = &v.placed
        && cur.node.as_deref() != Some(p.node.as_str())
    {
        let note = match (&cur.node, &p.failed_over_from) {
            (None, _) => format!("placed on node {}", p.node),
            (Some(from), Some(home)) => format!("moved from node {from} to {} (node {home} is NotReady)", p.node),
            (Some(from), None) => format!("moved from node {from} to {}", p.node),
        };
        let reason = if cur.node.is_none() { "Placed" } else { "Moved" };
        out.push(Event {
            type_: EventType::Normal,
            reason: reason.into(),
            note: Some(note),
            action: "Place".into(),
            secondary: None,
        });
    }
    out
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
#[path = "writer_tests.rs"]
mod tests;
