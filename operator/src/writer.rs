//! The IO side of a reconcile: turns a [`Rendered`] world into API writes.
//!
//! - Per node serving devices, with server-side apply (field manager `fieldgate-operator`,
//!   owner reference to the operator's Deployment when it runs from the chart, else to the
//!   Node): Secret `fieldgate-gateway-<node>` with only the keys that node's devices and
//!   uplinks reference (layout: [`fieldgate_crds::node_objects`]), then ConfigMap
//!   `fieldgate-gateway-<node>` (key `gateway.yaml`, annotations `fieldgate.io/config-hash` and
//!   `fieldgate.io/secret-hash`: a gateway that sees the ConfigMap finds the credentials of
//!   that hash already there). Applied only when their hash changed since this leader last
//!   applied them.
//! - Per-node objects of nodes that no longer serve any device are deleted.
//! - `Device` and `Uplink` status through the status subresource (server-side apply: the
//!   operator owns `node`, `observedGeneration`, `failedOverFrom` and the `Configured` and
//!   `Ready` conditions; the gateway owns `Reachable`, `lastSeen` and its uplink entries),
//!   written only when different from what the object shows. Events for transitions.
//! - `Ready` is derived: a Device is ready when configured and its gateway reports it
//!   `Reachable`; an Uplink when configured and connected on every node that runs it.
//! - Every call goes through the leadership [`Term`]: none is sent once this replica may no
//!   longer lead, and each has a deadline.
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

use crate::lease::{CallError, Term};
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
        source: CallError,
    },
    /// Listing or deleting per-node objects failed.
    #[error("clean up {object}: {source}")]
    Cleanup {
        /// What was listed or deleted.
        object: String,
        /// Cause.
        #[source]
        source: CallError,
    },
    /// A status write failed.
    #[error("status of {object}: {source}")]
    Status {
        /// `Device ns/name` or `Uplink ns/name`.
        object: String,
        /// Cause.
        #[source]
        source: CallError,
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

    fn source(&self) -> Option<&CallError> {
        match self {
            WriteError::Apply { source, .. }
            | WriteError::Cleanup { source, .. }
            | WriteError::Status { source, .. } => Some(source),
            WriteError::Serialise { .. } => None,
        }
    }

    /// Whether retrying soon may help (conflicts, throttling, server and transport errors,
    /// timeouts); a refusal waits for the next change instead.
    pub fn is_transient(&self) -> bool {
        self.source().is_some_and(CallError::is_transient)
    }

    /// Whether the write was not made because this replica stopped leading.
    pub fn is_not_leading(&self) -> bool {
        matches!(self.source(), Some(CallError::NotLeading))
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
    /// Owner of the per-node objects: the operator's Deployment, so that uninstalling the
    /// release removes them. `None`: each node's objects are owned by the Node.
    pub owner: Option<OwnerReference>,
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

/// A write pass in progress: what it did so far and its failures (it goes on after one: a
/// failed write is that object's, not the pass's).
#[derive(Debug, Default)]
pub struct WritePass {
    summary: WriteSummary,
    first_error: Option<WriteError>,
}

impl WritePass {
    fn count_status(&mut self, r: Result<bool, WriteError>) {
        match r {
            Ok(wrote) => self.summary.statuses += usize::from(wrote),
            Err(e) => self.failed(e),
        }
    }

    /// Records a failed write. The weightiest is kept for the report (the end of leadership,
    /// then a transient failure, then a permanent one, the first of equals).
    pub fn failed(&mut self, e: WriteError) {
        let weight = |e: &WriteError| if e.is_not_leading() { 2 } else { u8::from(e.is_transient()) };
        if self.first_error.as_ref().is_none_or(|f| weight(&e) > weight(f)) {
            self.first_error = Some(e);
        }
    }

    /// Whether this replica stopped leading during the pass.
    pub fn lost_leadership(&self) -> bool {
        self.first_error.as_ref().is_some_and(WriteError::is_not_leading)
    }

    /// What the pass did, and its weightiest failure.
    pub fn into_parts(self) -> (WriteSummary, Option<WriteError>) {
        (self.summary, self.first_error)
    }

    /// What the pass did, or its weightiest failure.
    pub fn finish(self) -> Result<WriteSummary, WriteError> {
        match self.first_error {
            Some(e) => Err(e),
            None => Ok(self.summary),
        }
    }
}

/// What a pass must leave alone: nodes whose config could not be rendered completely (a
/// Secret they need could not be read for a transient reason and no earlier copy is known)
/// keep what they have, and the objects behind them keep their status.
#[derive(Clone, Debug, Default)]
pub struct Held {
    /// Nodes whose objects are neither applied nor deleted.
    pub nodes: BTreeSet<String>,
    /// Devices and Uplinks whose status is not written.
    pub objects: BTreeSet<(&'static str, ObjectKey)>,
}

impl Held {
    /// Whether the object of `kind` (`Device` or `Uplink`) is held.
    pub fn holds(&self, kind: &'static str, key: &ObjectKey) -> bool {
        self.objects.contains(&(kind, key.clone()))
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
    term: Term,
}

impl Writer {
    /// A writer with empty memory (applies everything on the first pass), writing in a term
    /// that never ends until [`Writer::lead`] gives it one.
    pub fn new(client: Client, settings: WriterSettings, metrics: Arc<Metrics>) -> Self {
        let reporter = Reporter { controller: MANAGER.into(), instance: Some(settings.instance.clone()) };
        Self {
            reporter,
            client,
            settings,
            metrics,
            applied: BTreeMap::new(),
            known_nodes: None,
            term: Term::unbounded(),
        }
    }

    /// Starts writing in a new leadership term, forgetting what was applied (another leader
    /// may have written meanwhile).
    pub fn lead(&mut self, term: Term) {
        self.term = term;
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
        let held = Held::default();
        self.write_configs(rendered, &world.nodes, secrets, &held, &mut pass).await;
        self.write_statuses(rendered, world.devices.iter().cloned(), world.uplinks.iter().cloned(), &held, &mut pass)
            .await;
        pass.finish()
    }

    /// The per-node ConfigMaps and Secrets, and the deletion of those of nodes that serve no
    /// device any more; `held` nodes are left as they are. A config not built yet is built,
    /// applied and dropped before the next. Stops at the end of the leadership term.
    pub async fn write_configs<N: NodeSource>(
        &mut self,
        rendered: &Rendered<N>,
        nodes: &[Arc<Node>],
        secrets: &SecretValues,
        held: &Held,
        pass: &mut WritePass,
    ) {
        let nodes: BTreeMap<String, &Node> = nodes.iter().map(|n| (n.name_any(), n.as_ref())).collect();
        for (node, source) in &rendered.nodes {
            if held.nodes.contains(node) {
                continue;
            }
            if pass.lost_leadership() {
                return;
            }
            let nc = source.node_config();
            if let Err(e) = self.apply_node(node, &nc, nodes.get(node).copied(), secrets, &mut pass.summary).await {
                self.applied.remove(node);
                pass.failed(e);
            }
        }
        if pass.lost_leadership() {
            return;
        }
        if let Err(e) = self.delete_stale(rendered, held, &mut pass.summary).await {
            pass.failed(e);
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
        held: &Held,
        pass: &mut WritePass,
    ) {
        if pass.lost_leadership() {
            return;
        }
        let device_writes = devices.into_iter().filter_map(|d| {
            let key = ObjectKey::of(d.as_ref());
            let v = rendered.devices.get(&key).filter(|_| !held.holds("Device", &key))?;
            device_status_change(&d, v).map(|patch| (d, v, patch))
        });
        let uplink_writes = uplinks.into_iter().filter_map(|u| {
            let key = ObjectKey::of(u.as_ref());
            let v = rendered.uplinks.get(&key).filter(|_| !held.holds("Uplink", &key))?;
            uplink_status_change(&u, v).map(|patch| (u, v, patch))
        });
        let concurrency = self.settings.concurrency.max(1);
        let mut results = futures::stream::iter(device_writes)
            .map(|(d, v, patch)| async move { self.write_device_status(&d, v, patch).await })
            .buffer_unordered(concurrency);
        while let Some(r) = results.next().await {
            pass.count_status(r);
        }
        drop(results);
        if pass.lost_leadership() {
            return;
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
        let owner = self.settings.owner.clone().or_else(|| node_obj.and_then(owner_reference));
        let meta = |hashes: &[(&str, &str)]| ObjectMeta {
            name: Some(name.clone()),
            namespace: Some(ns.clone()),
            labels: Some(BTreeMap::from([
                ("app.kubernetes.io/managed-by".to_string(), MANAGED_BY.to_string()),
                ("app.kubernetes.io/part-of".to_string(), "fieldgate".to_string()),
                (ROLE_LABEL.to_string(), ROLE_CONFIG.to_string()),
            ])),
            annotations: Some(
                hashes
                    .iter()
                    .map(|(k, v)| (k.to_string(), v.to_string()))
                    .chain([(NODE_ANNOTATION.to_string(), node.to_string())])
                    .collect(),
            ),
            owner_references: owner.clone().map(|o| vec![o]),
            ..ObjectMeta::default()
        };
        let secret_changed = previous.as_ref().map(|p| &p.secret) != Some(&secret_hash);
        // The Secret first: a gateway reading the ConfigMap's secret hash finds those
        // credentials already in place.
        if secret_changed {
            let secret = Secret {
                metadata: meta(&[(SECRET_HASH_ANNOTATION, &secret_hash)]),
                type_: Some("Opaque".into()),
                data: Some(data),
                ..Secret::default()
            };
            let api = Api::<Secret>::namespaced(self.client.clone(), &ns);
            self.term
                .call(api.patch(&name, &pp, &Patch::Apply(&secret)))
                .await
                .map_err(|source| WriteError::Apply { object: format!("Secret {ns}/{name}"), source })?;
            self.metrics.wrote("secret");
            summary.secrets += 1;
            debug!(node, keys = nc.secrets.len(), "gateway secret applied");
        }
        if secret_changed || previous.as_ref().map(|p| &p.config) != Some(&version) {
            let yaml = serde_saphyr::to_string(&nc.config)
                .map_err(|e| WriteError::Serialise { node: node.to_string(), message: e.to_string() })?;
            let cm = ConfigMap {
                metadata: meta(&[(CONFIG_HASH_ANNOTATION, &version), (SECRET_HASH_ANNOTATION, &secret_hash)]),
                data: Some(BTreeMap::from([(CONFIG_KEY.to_string(), yaml)])),
                ..ConfigMap::default()
            };
            let api = Api::<ConfigMap>::namespaced(self.client.clone(), &ns);
            self.term
                .call(api.patch(&name, &pp, &Patch::Apply(&cm)))
                .await
                .map_err(|source| WriteError::Apply { object: format!("ConfigMap {ns}/{name}"), source })?;
            self.metrics.wrote("configmap");
            summary.configmaps += 1;
            info!(node, version = %version, devices = nc.config.devices.len(), uplinks = nc.config.uplinks.len(), "gateway config applied");
        }
        self.applied.insert(node.to_string(), AppliedHashes { config: version, secret: secret_hash });
        Ok(())
    }

    async fn delete_stale<N>(
        &mut self,
        rendered: &Rendered<N>,
        held: &Held,
        summary: &mut WriteSummary,
    ) -> Result<(), WriteError> {
        let ns = self.settings.namespace.clone();
        let cms = Api::<ConfigMap>::namespaced(self.client.clone(), &ns);
        let known = match self.known_nodes.take() {
            Some(k) => k,
            None => {
                let lp = ListParams::default()
                    .labels(&format!("app.kubernetes.io/managed-by={MANAGED_BY},{ROLE_LABEL}={ROLE_CONFIG}"));
                let list = self
                    .term
                    .call(cms.list_metadata(&lp))
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
        let mut remaining: BTreeSet<String> = rendered.nodes.keys().chain(&held.nodes).cloned().collect();
        let secrets = Api::<Secret>::namespaced(self.client.clone(), &ns);
        let mut result = Ok(());
        for node in known.difference(&remaining.clone()) {
            let name = node_objects::object_name(node);
            let deleted = async {
                ignore_not_found(self.term.call(cms.delete(&name, &DeleteParams::default())).await.map(|_| ()))?;
                ignore_not_found(self.term.call(secrets.delete(&name, &DeleteParams::default())).await.map(|_| ()))
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
        let params = PatchParams::apply(MANAGER).force();
        match self.term.call(api.patch_status(&key.name, &params, &Patch::Apply(&patch))).await {
            Ok(_) => Ok(true),
            Err(e) if e.code() == Some(404) => Ok(false),
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
        match self.term.call(recorder.publish(&ev, &obj.object_ref(&()))).await {
            Ok(()) => self.metrics.wrote("event"),
            Err(e) => {
                self.metrics.wrote("event_failed");
                debug!(error = %e, reason = %ev.reason, "event not published");
            }
        }
    }
}

fn ignore_not_found(r: Result<(), CallError>) -> Result<(), CallError> {
    match r {
        Err(e) if e.code() == Some(404) => Ok(()),
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
/// The `Reachable` condition type (a gateway writes it on its devices).
pub const REACHABLE: &str = "Reachable";
/// Reason of `Ready=False` the operator writes for objects it refused.
pub const NOT_CONFIGURED: &str = "NotConfigured";

/// A condition as the operator wants it shown; its transition time is settled on writing.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Wanted {
    /// Condition type.
    pub type_: &'static str,
    /// `True`, `False` or `Unknown`.
    pub status: &'static str,
    /// CamelCase reason.
    pub reason: String,
    /// What a person reads (`kubectl get -o wide` shows Ready's).
    pub message: String,
}

impl Wanted {
    fn new(type_: &'static str, status: &'static str, reason: &str, message: String) -> Self {
        Self { type_, status, reason: reason.to_string(), message: shorten(message, MAX_MESSAGE) }
    }

    /// Whether `shown` says the same (for the generation `generation`).
    fn shown_as(&self, shown: Option<&Condition>, generation: Option<i64>) -> bool {
        shown.is_some_and(|c| {
            c.status == self.status
                && c.reason == self.reason
                && c.message == self.message
                && c.observed_generation == generation
        })
    }

    /// The condition, keeping the transition time of `previous` when the status is the same.
    fn condition(&self, generation: Option<i64>, previous: Option<&Condition>) -> Condition {
        let since = previous
            .filter(|c| c.status == self.status)
            .map_or_else(|| Time(Timestamp::now()), |c| c.last_transition_time.clone());
        Condition {
            type_: self.type_.into(),
            status: self.status.into(),
            reason: self.reason.clone(),
            message: self.message.clone(),
            observed_generation: generation,
            last_transition_time: since,
        }
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

/// `Configured` of a verdict.
fn configured(v: &Verdict, ok_message: &str) -> Wanted {
    let status = if v.configured() { "True" } else { "False" };
    Wanted::new(CONFIGURED, status, v.reason(), configured_message(v, ok_message))
}

/// `Ready=False` of a refused object: the refusal is why it is not ready.
fn not_configured(v: &Verdict) -> Wanted {
    Wanted::new(READY, "False", NOT_CONFIGURED, configured_message(v, ""))
}

/// A Device's `Ready`: configured, and its gateway says it answers.
pub fn device_ready(d: &Device, v: &DeviceVerdict) -> Wanted {
    let Some(node) = v.placed.as_ref().map(|p| p.node.as_str()).filter(|_| v.verdict.configured()) else {
        return not_configured(&v.verdict);
    };
    let reachable = d.status.as_ref().and_then(|s| s.condition(REACHABLE));
    match reachable.map(|c| c.status.as_str()) {
        Some("True") => Wanted::new(
            READY,
            "True",
            "Reachable",
            format!("configured on node {node}; the device answers its gateway"),
        ),
        Some("False") => {
            let c = reachable.map(|c| (c.reason.as_str(), c.message.as_str())).unwrap_or_default();
            Wanted::new(READY, "False", "Unreachable", format!("node {node}: {} ({})", c.1, c.0))
        }
        _ => Wanted::new(
            READY,
            "Unknown",
            "AwaitingGateway",
            format!("configured on node {node}; waiting for its gateway to report whether the device answers"),
        ),
    }
}

/// An Uplink's `Ready`: configured, and connected to its broker on every node that runs it
/// (as each node's entry of `status.gateways` says; entries of other nodes do not count).
pub fn uplink_ready(u: &Uplink, v: &UplinkVerdict) -> Wanted {
    if !v.verdict.configured() {
        return not_configured(&v.verdict);
    }
    if v.nodes.is_empty() {
        return Wanted::new(READY, "False", "NoDevices", "selects no configured Device, so no gateway runs it".into());
    }
    let entries = u.status.as_ref().map(|s| s.gateways.as_slice()).unwrap_or_default();
    let (mut up, mut down, mut waiting) = (Vec::new(), Vec::new(), Vec::new());
    for node in &v.nodes {
        match entries.iter().find(|g| g.node == *node) {
            Some(g) if g.connected => up.push(node.as_str()),
            Some(_) => down.push(node.as_str()),
            None => waiting.push(node.as_str()),
        }
    }
    let list = |nodes: &[&str]| nodes.join(", ");
    if !down.is_empty() {
        let mut m = format!("not connected to the broker on node(s) {}", list(&down));
        if !up.is_empty() {
            m.push_str(&format!("; connected on {}", list(&up)));
        }
        return Wanted::new(READY, "False", "Disconnected", m);
    }
    if !waiting.is_empty() {
        return Wanted::new(
            READY,
            "Unknown",
            "AwaitingGateway",
            format!("waiting for the gateway of node(s) {} to report its broker connection", list(&waiting)),
        );
    }
    Wanted::new(READY, "True", "Connected", format!("connected to the broker on node(s) {}", list(&up)))
}

/// The operator's conditions and `observedGeneration`; `None` when the object already shows
/// them and `rest_unchanged` (its other operator-written fields) holds.
fn conditions_status(
    shown: &[Condition],
    shown_generation: Option<i64>,
    wanted: &[Wanted],
    generation: Option<i64>,
    rest_unchanged: bool,
) -> Option<serde_json::Value> {
    let find = |t: &str| shown.iter().find(|c| c.type_ == t);
    let unchanged = rest_unchanged
        && shown_generation == generation
        && wanted.iter().all(|w| w.shown_as(find(w.type_), generation));
    if unchanged {
        return None;
    }
    let conditions: Vec<Condition> = wanted.iter().map(|w| w.condition(generation, find(w.type_))).collect();
    let mut status = json!({"conditions": conditions});
    if let Some(g) = generation {
        status["observedGeneration"] = json!(g);
    }
    Some(status)
}

/// The operator's part of a Device's status, when it differs from what the object shows.
pub fn device_status_change(d: &Device, v: &DeviceVerdict) -> Option<serde_json::Value> {
    let cur = d.status.clone().unwrap_or_default();
    let node = v.placed.as_ref().map(|p| p.node.clone());
    let failed_over_from = v.placed.as_ref().and_then(|p| p.failed_over_from.clone());
    let wanted = [configured(&v.verdict, "rendered into the gateway config of its node"), device_ready(d, v)];
    let rest_unchanged = cur.node == node && cur.failed_over_from == failed_over_from;
    let mut status =
        conditions_status(&cur.conditions, cur.observed_generation, &wanted, v.generation, rest_unchanged)?;
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
    let wanted =
        [configured(&v.verdict, "rendered into the gateway configs of the nodes of its devices"), uplink_ready(u, v)];
    conditions_status(&cur.conditions, cur.observed_generation, &wanted, v.generation, true)
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
