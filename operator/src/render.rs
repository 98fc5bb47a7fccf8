//! The operator's brain: every object in, one [`GatewayConfig`] per gateway node and a
//! verdict per object out. Pure: no API calls, no clock (the time is an input), no secrets
//! values (only which keys exist).
//!
//! Steps, in order:
//! 1. Profiles are checked on their own.
//! 2. Each Device is checked, its profile merged in (the profile's points in order, a device
//!    point of the same name replacing the profile's, the device's other points appended), the
//!    merged device checked again, its referenced Secrets and keys checked, and the device
//!    placed on a node ([`crate::placement`]). Any problem keeps the device off every gateway
//!    and makes its verdict `Configured=False` with the field path.
//! 3. Each Uplink is checked (spec, label selector, referenced Secrets and keys) and selects
//!    the configured Devices of its namespace by label; a node runs an uplink when it serves at
//!    least one device the uplink selects.
//! 4. Every node serving at least one device gets a config whose `version` is a hash of its
//!    content, plus the list of Secret keys its devices and uplinks need (and no other).
//!    Secret references in the config are renamed to the per-node Secret's layout
//!    ([`fieldgate_crds::node_objects`]).
//!
//! [`plan`] makes every decision but leaves each node's config unbuilt ([`NodePlan`]): the
//! controller builds, applies and drops them one node at a time, so the merged points of all
//! 10,000 devices are never in memory at once. [`render`] is [`plan`] with every config built.

use std::borrow::Cow;
use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use fieldgate_crds::node_objects::secret_dir;
use fieldgate_crds::validate::{ValidationErrors, is_dns_subdomain};
use fieldgate_crds::{
    BrokerUrl, Connection, Device, DeviceProfile, EndpointMut, GatewayConfig, GatewayDevice, GatewayUplink, HttpUplink,
    MqttAuth, MqttTls, MqttUplink, Point, Uplink, UplinkSpec,
};
use k8s_openapi::api::core::v1::Node;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;
use k8s_openapi::jiff::Timestamp;
use kube::core::{Expression, SelectorExt};
use kube::{Resource, ResourceExt};
use sha2::{Digest, Sha256};

use crate::placement::{self, FailoverPolicy, GatewayNode, Health, Placed};

/// Namespace and name of a namespaced object.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ObjectKey {
    /// Namespace (`default` when a manifest leaves it out).
    pub namespace: String,
    /// Name.
    pub name: String,
}

impl ObjectKey {
    /// A key from its parts.
    pub fn new(namespace: impl Into<String>, name: impl Into<String>) -> Self {
        Self { namespace: namespace.into(), name: name.into() }
    }

    /// The key of an object.
    pub fn of(obj: &impl ResourceExt) -> Self {
        Self::new(obj.namespace().unwrap_or_else(|| "default".into()), obj.name_any())
    }
}

impl fmt::Display for ObjectKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

/// Which keys each Secret has: `(namespace, name) -> keys`. Values never enter render.
pub type SecretIndex = BTreeMap<ObjectKey, BTreeSet<String>>;

/// Everything render looks at.
#[derive(Clone, Debug, Default)]
pub struct World {
    /// Device objects.
    pub devices: Vec<Arc<Device>>,
    /// DeviceProfile objects.
    pub profiles: Vec<Arc<DeviceProfile>>,
    /// Uplink objects.
    pub uplinks: Vec<Arc<Uplink>>,
    /// Nodes; those without the gateway label are ignored.
    pub nodes: Vec<Arc<Node>>,
    /// The Secrets Devices and Uplinks may reference. `None`: unknown, references are not
    /// checked (offline render without Secret manifests).
    pub secrets: Option<SecretIndex>,
    /// Secrets that exist but could not be read, with why: objects referencing one are
    /// refused with reason `UnreadableSecret` (that object's verdict, nobody else's).
    pub unreadable_secrets: BTreeMap<ObjectKey, String>,
}

/// Where each device was placed last time (from `Device.status` or the previous render).
pub type Placements = BTreeMap<ObjectKey, Placed>;

/// Where devices were placed according to their status.
pub fn placements_from_status(devices: &[Arc<Device>]) -> Placements {
    devices
        .iter()
        .filter_map(|d| {
            let s = d.status.as_ref()?;
            Some((
                ObjectKey::of(d.as_ref()),
                Placed { node: s.node.clone()?, failed_over_from: s.failed_over_from.clone() },
            ))
        })
        .collect()
}

/// Knobs of render.
#[derive(Clone, Copy, Debug)]
pub struct Settings {
    /// The time at which node health is judged.
    pub now: Timestamp,
    /// How long a node may be NotReady before its network devices move away.
    pub failover_grace: Duration,
    /// Whether failed-over devices move back to their home node once it is Ready again.
    pub fail_back: bool,
}

impl Settings {
    /// Defaults at time `now`: 5 minutes of grace, no fail-back.
    pub fn at(now: Timestamp) -> Self {
        Self { now, failover_grace: Duration::from_secs(300), fail_back: false }
    }
}

/// Why an object is not configured.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Reason {
    /// A field of the object's own spec is invalid.
    InvalidSpec,
    /// The Device names a DeviceProfile that does not exist.
    UnknownProfile,
    /// The Device's DeviceProfile is invalid, or its points do not fit the device.
    InvalidProfile,
    /// No gateway node satisfies the Device's placement.
    NoMatchingNode,
    /// The Uplink's device selector is malformed.
    InvalidSelector,
    /// The Device or Uplink references a Secret that does not exist.
    UnknownSecret,
    /// A referenced Secret lacks a key the Device or Uplink needs.
    MissingSecretKey,
    /// A referenced Secret exists but the operator could not read it.
    UnreadableSecret,
}

impl Reason {
    /// The condition reason (CamelCase, as Kubernetes wants it).
    pub fn as_str(self) -> &'static str {
        match self {
            Reason::InvalidSpec => "InvalidSpec",
            Reason::UnknownProfile => "UnknownProfile",
            Reason::InvalidProfile => "InvalidProfile",
            Reason::NoMatchingNode => "NoMatchingNode",
            Reason::InvalidSelector => "InvalidSelector",
            Reason::UnknownSecret => "UnknownSecret",
            Reason::MissingSecretKey => "MissingSecretKey",
            Reason::UnreadableSecret => "UnreadableSecret",
        }
    }
}

/// One problem with an object.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Problem {
    /// Category.
    pub reason: Reason,
    /// Field path, such as `spec.points[2].modbus.length`.
    pub path: String,
    /// What is wrong.
    pub message: String,
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.path, self.message)
    }
}

/// The outcome for one object: configured, or every problem found.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Verdict {
    /// Empty when the object is configured.
    pub problems: Vec<Problem>,
}

impl Verdict {
    /// Whether the object reaches the gateways.
    pub fn configured(&self) -> bool {
        self.problems.is_empty()
    }

    /// The condition reason: `Configured`, or the reason of the first problem.
    pub fn reason(&self) -> &'static str {
        self.problems.first().map_or("Configured", |p| p.reason.as_str())
    }

    /// A one-line message listing every problem with its path.
    pub fn message(&self) -> String {
        self.problems.iter().map(ToString::to_string).collect::<Vec<_>>().join("; ")
    }

    fn invalid_spec(errors: ValidationErrors) -> Vec<Problem> {
        errors
            .0
            .into_iter()
            .map(|e| Problem { reason: Reason::InvalidSpec, path: e.path, message: e.message })
            .collect()
    }
}

/// The outcome for one Device.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DeviceVerdict {
    /// Configured or not, and why.
    pub verdict: Verdict,
    /// Where it runs (configured devices only).
    pub placed: Option<Placed>,
    /// The Device's `metadata.generation` this verdict describes.
    pub generation: Option<i64>,
}

/// The outcome for one Uplink.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct UplinkVerdict {
    /// Configured or not, and why.
    pub verdict: Verdict,
    /// The nodes running it.
    pub nodes: BTreeSet<String>,
    /// How many devices it selects.
    pub devices: usize,
    /// The Uplink's `metadata.generation` this verdict describes.
    pub generation: Option<i64>,
}

/// One key of one Secret a node needs.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct SecretItem {
    /// The Secret.
    pub secret: ObjectKey,
    /// The key within it.
    pub key: String,
}

/// What one gateway node gets.
#[derive(Clone, Debug, PartialEq)]
pub struct NodeConfig {
    /// The config, `version` set to its content hash.
    pub config: GatewayConfig,
    /// The Secret keys its devices and uplinks reference.
    pub secrets: BTreeSet<SecretItem>,
}

/// What one gateway node gets, its config not built yet: the devices (checked, profile known)
/// and the uplinks. [`NodePlan::config`] builds the [`NodeConfig`] that [`render`] would give.
#[derive(Clone, Debug)]
pub struct NodePlan<'w> {
    node: String,
    devices: Vec<PlannedDevice<'w>>,
    uplinks: Vec<GatewayUplink>,
    secrets: BTreeSet<SecretItem>,
}

/// A configured device while [`plan`] runs: its labels (for uplink selection), its node, and
/// what its config is built from.
struct Configured<'w> {
    labels: &'w BTreeMap<String, String>,
    node: String,
    device: &'w Device,
    profile_points: &'w [Point],
}

/// A configured device as [`plan`] left it: the object and its profile's points.
#[derive(Clone, Debug)]
struct PlannedDevice<'w> {
    key: ObjectKey,
    device: &'w Device,
    profile_points: &'w [Point],
}

impl NodePlan<'_> {
    /// How many devices the node serves.
    pub fn device_count(&self) -> usize {
        self.devices.len()
    }

    /// Builds the node's config (profiles merged, `version` = content hash).
    pub fn config(&self) -> NodeConfig {
        let mut config = GatewayConfig {
            api_version: GatewayConfig::API_VERSION.to_string(),
            kind: GatewayConfig::KIND.to_string(),
            node: Some(self.node.clone()),
            version: None,
            devices: self.devices.iter().map(|d| node_device(&d.key, d.device, d.profile_points)).collect(),
            uplinks: self.uplinks.clone(),
        };
        config.version = Some(unversioned_hash(&config));
        NodeConfig { config, secrets: self.secrets.clone() }
    }
}

/// A node's config, built ([`NodeConfig`]) or to be built on demand ([`NodePlan`]).
pub trait NodeSource {
    /// The node's config.
    fn node_config(&self) -> Cow<'_, NodeConfig>;
    /// How many devices the node serves.
    fn device_count(&self) -> usize;
}

impl NodeSource for NodeConfig {
    fn node_config(&self) -> Cow<'_, NodeConfig> {
        Cow::Borrowed(self)
    }

    fn device_count(&self) -> usize {
        self.config.devices.len()
    }
}

impl NodeSource for NodePlan<'_> {
    fn node_config(&self) -> Cow<'_, NodeConfig> {
        Cow::Owned(self.config())
    }

    fn device_count(&self) -> usize {
        self.devices.len()
    }
}

/// Everything render decided. `N` is what each node gets: its built [`NodeConfig`] (from
/// [`render`]), a [`NodePlan`] (from [`plan`]), or nothing once written.
#[derive(Clone, Debug)]
pub struct Rendered<N = NodeConfig> {
    /// Per gateway node serving at least one device.
    pub nodes: BTreeMap<String, N>,
    /// Per Device.
    pub devices: BTreeMap<ObjectKey, DeviceVerdict>,
    /// Per DeviceProfile.
    pub profiles: BTreeMap<ObjectKey, Verdict>,
    /// Per Uplink.
    pub uplinks: BTreeMap<ObjectKey, UplinkVerdict>,
    /// The gateway nodes, with their health at render time.
    pub gateway_nodes: Vec<GatewayNode>,
    /// When render must run again although nothing changed: the end of the grace period of
    /// a NotReady node.
    pub next_review: Option<Timestamp>,
}

impl<N> Default for Rendered<N> {
    fn default() -> Self {
        Self {
            nodes: BTreeMap::new(),
            devices: BTreeMap::new(),
            profiles: BTreeMap::new(),
            uplinks: BTreeMap::new(),
            gateway_nodes: Vec::new(),
            next_review: None,
        }
    }
}

impl<N> Rendered<N> {
    /// Where each configured device runs (the `previous` input of the next render).
    pub fn placements(&self) -> Placements {
        self.devices.iter().filter_map(|(k, v)| Some((k.clone(), v.placed.clone()?))).collect()
    }

    /// The same decisions with what each node gets replaced by `f` of it.
    pub fn map_nodes<M>(self, mut f: impl FnMut(N) -> M) -> Rendered<M> {
        Rendered {
            nodes: self.nodes.into_iter().map(|(k, n)| (k, f(n))).collect(),
            devices: self.devices,
            profiles: self.profiles,
            uplinks: self.uplinks,
            gateway_nodes: self.gateway_nodes,
            next_review: self.next_review,
        }
    }
}

impl Rendered<NodePlan<'_>> {
    /// Builds every node's config.
    pub fn build(self) -> Rendered {
        self.map_nodes(|n| n.config())
    }
}

/// Renders the world, every node's config built. See the module documentation for the rules.
pub fn render(world: &World, previous: &Placements, settings: &Settings) -> Rendered {
    plan(world, previous, settings).build()
}

/// Makes every decision of [`render`], leaving each node's config to be built from the world
/// ([`NodePlan::config`]).
pub fn plan<'w>(world: &'w World, previous: &Placements, settings: &Settings) -> Rendered<NodePlan<'w>> {
    let mut out = Rendered::default();

    let mut gateway_nodes: Vec<GatewayNode> =
        world.nodes.iter().filter_map(|n| GatewayNode::from_node(n, settings.now, settings.failover_grace)).collect();
    gateway_nodes.sort_by(|a, b| a.name.cmp(&b.name));
    out.next_review = gateway_nodes
        .iter()
        .filter_map(|n| match n.health {
            Health::Suspect { until } => Some(until),
            _ => None,
        })
        .min();

    // 1. Profiles.
    let mut profiles: BTreeMap<ObjectKey, &'w DeviceProfile> = BTreeMap::new();
    for p in &world.profiles {
        let key = ObjectKey::of(p.as_ref());
        let verdict = Verdict { problems: p.spec.validate().err().map(Verdict::invalid_spec).unwrap_or_default() };
        out.profiles.insert(key.clone(), verdict);
        profiles.insert(key, p);
    }

    // 2. Devices, in key order so every output list is sorted.
    let mut devices: Vec<(ObjectKey, &'w Device)> =
        world.devices.iter().map(|d| (ObjectKey::of(d.as_ref()), d.as_ref())).collect();
    devices.sort_by(|a, b| a.0.cmp(&b.0));
    let policy = FailoverPolicy { fail_back: settings.fail_back };
    let mut configured: BTreeMap<ObjectKey, Configured<'w>> = BTreeMap::new();
    for (key, device) in devices {
        let (mut problems, merged) = check_device(&key, device, &profiles, &out.profiles);
        if let Some(index) = &world.secrets {
            let items = device_secret_items(&key.namespace, &device.spec.connection);
            check_secrets(&items, index, &world.unreadable_secrets, &mut problems);
        }
        let placed = placement::place(
            &key,
            device.spec.placement.as_ref(),
            device.spec.connection.is_network(),
            &gateway_nodes,
            previous.get(&key),
            policy,
        );
        let placed = match placed {
            Ok(p) => Some(p),
            Err(e) => {
                problems.push(Problem { reason: Reason::NoMatchingNode, path: e.path.to_string(), message: e.message });
                None
            }
        };
        let verdict = Verdict { problems };
        let placed = if verdict.configured() { placed } else { None };
        if let (Some(p), Some(profile_points)) = (&placed, merged)
            && verdict.configured()
        {
            configured.insert(
                key.clone(),
                Configured { labels: device.labels(), node: p.node.clone(), device, profile_points },
            );
        }
        out.devices.insert(key, DeviceVerdict { verdict, placed, generation: device.meta().generation });
    }

    // 3. Uplinks.
    let mut node_uplinks: BTreeMap<String, Vec<(GatewayUplink, BTreeSet<SecretItem>)>> = BTreeMap::new();
    let mut uplinks: Vec<(ObjectKey, &Uplink)> =
        world.uplinks.iter().map(|u| (ObjectKey::of(u.as_ref()), u.as_ref())).collect();
    uplinks.sort_by(|a, b| a.0.cmp(&b.0));
    for (key, uplink) in uplinks {
        let mut problems = uplink.spec.validate().err().map(Verdict::invalid_spec).unwrap_or_default();
        let selector = check_selector(uplink.spec.device_selector.as_ref(), &mut problems);
        let secrets = secret_items(&key.namespace, &uplink.spec);
        if let Some(index) = &world.secrets {
            check_secrets(&secrets, index, &world.unreadable_secrets, &mut problems);
        }
        let verdict = Verdict { problems };
        let mut per_node: BTreeMap<&str, Vec<String>> = BTreeMap::new();
        let mut selected = 0;
        if verdict.configured() {
            let in_ns = configured
                .range(ObjectKey::new(key.namespace.clone(), "")..)
                .take_while(|(k, _)| k.namespace == key.namespace);
            for (dkey, c) in in_ns {
                if selector.iter().all(|e| e.matches(c.labels)) {
                    selected += 1;
                    per_node.entry(c.node.as_str()).or_default().push(dkey.name.clone());
                }
            }
        }
        let nodes: BTreeSet<String> = per_node.keys().map(|n| n.to_string()).collect();
        for (node, names) in per_node {
            let rendered = GatewayUplink {
                namespace: key.namespace.clone(),
                name: key.name.clone(),
                devices: Some(names),
                mqtt: uplink.spec.mqtt.as_ref().map(|m| rendered_mqtt(&key.namespace, m)),
                http: uplink.spec.http.as_ref().map(|h| rendered_http(&key.namespace, h)),
                encoding: uplink.spec.encoding,
                compression: uplink.spec.compression,
                sparkplug: uplink.spec.sparkplug.clone(),
                buffer: uplink.spec.buffer.clone(),
            };
            node_uplinks
                .entry(node.to_string())
                .or_default()
                .push((rendered, secrets.iter().map(|(_, item)| item.clone()).collect()));
        }
        out.uplinks
            .insert(key, UplinkVerdict { verdict, nodes, devices: selected, generation: uplink.meta().generation });
    }

    // 4. Per-node plans (configs are built from them on demand).
    let mut per_node: BTreeMap<String, NodePlan<'w>> = BTreeMap::new();
    for (key, Configured { node, device, profile_points, .. }) in configured {
        let np = per_node.entry(node.clone()).or_insert_with(|| NodePlan {
            node,
            devices: Vec::new(),
            uplinks: Vec::new(),
            secrets: BTreeSet::new(),
        });
        np.secrets.extend(device_secret_items(&key.namespace, &device.spec.connection).into_iter().map(|(_, i)| i));
        np.devices.push(PlannedDevice { key, device, profile_points });
    }
    for (node, list) in node_uplinks {
        if let Some(np) = per_node.get_mut(&node) {
            for (uplink, secrets) in list {
                np.uplinks.push(uplink);
                np.secrets.extend(secrets);
            }
        }
    }
    out.nodes = per_node;
    out.gateway_nodes = gateway_nodes;
    out
}

/// A short hash of a config's content (its `version` left out).
pub fn content_hash(config: &GatewayConfig) -> String {
    if config.version.is_none() {
        return unversioned_hash(config);
    }
    let mut unversioned = config.clone();
    unversioned.version = None;
    unversioned_hash(&unversioned)
}

/// [`content_hash`] of a config whose `version` is `None`: its JSON streamed into the hash.
fn unversioned_hash(config: &GatewayConfig) -> String {
    let mut hasher = Sha256::new();
    // Serialising plain data cannot fail, and writing into a hasher neither.
    let _ = serde_json::to_writer(&mut hasher, config);
    hex16(&hasher.finalize())
}

/// The first 16 hex digits of a digest.
pub fn hex16(digest: &[u8]) -> String {
    digest.iter().take(8).map(|b| format!("{b:02x}")).collect()
}

/// Where a merged point came from.
#[derive(Clone, Copy)]
enum Origin {
    Inline(usize),
    Profile(usize),
}

/// Merges the profile's points with the device's: profile order, same-named device points
/// replacing the profile's, other device points appended.
pub fn merge_points(profile: &[Point], inline: &[Point]) -> Vec<Point> {
    merge_with_origin(profile, inline).into_iter().map(|(p, _)| p.clone()).collect()
}

fn merge_with_origin<'a>(profile: &'a [Point], inline: &'a [Point]) -> Vec<(&'a Point, Origin)> {
    let mut out: Vec<(&Point, Origin)> = profile
        .iter()
        .enumerate()
        .map(|(k, p)| match inline.iter().position(|i| i.name == p.name) {
            Some(j) => (&inline[j], Origin::Inline(j)),
            None => (p, Origin::Profile(k)),
        })
        .collect();
    for (j, p) in inline.iter().enumerate() {
        if !profile.iter().any(|q| q.name == p.name) {
            out.push((p, Origin::Inline(j)));
        }
    }
    out
}

/// Checks a device and merges its profile: the problems, and when there are none the points of
/// its profile (empty without one), from which [`gateway_device`] builds it as a gateway runs it.
fn check_device<'w>(
    key: &ObjectKey,
    device: &Device,
    profiles: &BTreeMap<ObjectKey, &'w DeviceProfile>,
    verdicts: &BTreeMap<ObjectKey, Verdict>,
) -> (Vec<Problem>, Option<&'w [Point]>) {
    let mut problems = device.spec.validate().err().map(Verdict::invalid_spec).unwrap_or_default();
    let mut profile_points: &'w [Point] = &[];
    if let Some(name) = &device.spec.profile {
        let pkey = ObjectKey::new(key.namespace.clone(), name.clone());
        match profiles.get(&pkey) {
            None => problems.push(Problem {
                reason: Reason::UnknownProfile,
                path: "spec.profile".into(),
                message: format!("no DeviceProfile {name:?} in namespace {:?}", key.namespace),
            }),
            Some(_) if verdicts.get(&pkey).is_some_and(|v| !v.configured()) => problems.push(Problem {
                reason: Reason::InvalidProfile,
                path: "spec.profile".into(),
                message: format!(
                    "DeviceProfile {name:?} is invalid ({})",
                    verdicts.get(&pkey).map(Verdict::message).unwrap_or_default()
                ),
            }),
            Some(p) => profile_points = &p.spec.points,
        }
    }
    if !problems.is_empty() {
        return (problems, None);
    }
    let gw = gateway_device(key, device, profile_points);
    if let Err(errs) = gw.validate_at("device") {
        let merged = merge_with_origin(profile_points, &device.spec.points);
        for e in errs.0 {
            problems.push(map_merged_error(&e.path, e.message, &merged, device.spec.profile.as_deref()));
        }
    }
    if problems.is_empty() { (problems, Some(profile_points)) } else { (problems, None) }
}

/// The device as its node's gateway runs it: [`gateway_device`] with its Secret references
/// renamed to the per-node Secret's layout (see [`fieldgate_crds::node_objects`]) and its
/// host names resolved in its namespace ([`service_host`]).
fn node_device(key: &ObjectKey, device: &Device, profile_points: &[Point]) -> GatewayDevice {
    let mut d = gateway_device(key, device, profile_points);
    let ns = key.namespace.as_str();
    for name in d.connection.secret_names_mut() {
        *name = secret_dir(ns, name);
    }
    match d.connection.endpoint_mut() {
        Some(EndpointMut::Host(h)) => *h = service_host(h, ns),
        Some(EndpointMut::Address(a)) => *a = service_address(a, ns),
        Some(EndpointMut::Url(u)) => *u = service_url(u, ns),
        None => {}
    }
    d
}

/// A host name as the gateway resolves it for an object of `namespace`: a single-label name
/// (no dot; not `localhost`, not an IP address) names a Service of that namespace, as it would
/// for a pod there, and becomes `<name>.<namespace>.svc`. Anything else is left as it is (a
/// single-label name on the node's own network is written with a trailing dot: `plc-7.`).
pub fn service_host(host: &str, namespace: &str) -> String {
    let single_label = !host.is_empty()
        && !host.contains(['.', ':', '[', '/'])
        && host != "localhost"
        && host.parse::<std::net::IpAddr>().is_err();
    if single_label { format!("{host}.{namespace}.svc") } else { host.to_string() }
}

/// `host:port` with its host resolved as [`service_host`] does.
fn service_address(address: &str, namespace: &str) -> String {
    match address.rsplit_once(':') {
        Some((host, port)) if !host.contains(':') => format!("{}:{port}", service_host(host, namespace)),
        _ => service_host(address, namespace),
    }
}

/// A broker URL with its host resolved as [`service_host`] does.
fn service_url(url: &BrokerUrl, namespace: &str) -> BrokerUrl {
    // A service host is a valid host name; were it not, the URL stays as the object has it.
    url.with_host(&service_host(url.host(), namespace)).unwrap_or_else(|_| url.clone())
}

/// The device as a gateway runs it: its profile's points merged in, its Secret references as
/// the Device names them.
fn gateway_device(key: &ObjectKey, device: &Device, profile_points: &[Point]) -> GatewayDevice {
    GatewayDevice {
        namespace: key.namespace.clone(),
        name: key.name.clone(),
        connection: device.spec.connection.clone(),
        poll_interval: device.spec.poll_interval.clone(),
        points: merge_with_origin(profile_points, &device.spec.points).into_iter().map(|(p, _)| p.clone()).collect(),
    }
}

/// Turns a path of the merged device (`device.points[3].modbus`) into one of the Device object.
fn map_merged_error(path: &str, message: String, merged: &[(&Point, Origin)], profile: Option<&str>) -> Problem {
    let rest = path.strip_prefix("device.").unwrap_or(path);
    let indexed = rest
        .strip_prefix("points[")
        .and_then(|r| r.split_once(']'))
        .and_then(|(i, tail)| Some((i.parse::<usize>().ok()?, tail)));
    match indexed.and_then(|(i, tail)| Some((merged.get(i)?.1, tail))) {
        Some((Origin::Inline(j), tail)) => {
            Problem { reason: Reason::InvalidSpec, path: format!("spec.points[{j}]{tail}"), message }
        }
        Some((Origin::Profile(k), tail)) => Problem {
            reason: Reason::InvalidProfile,
            path: "spec.profile".into(),
            message: format!("DeviceProfile {:?} spec.points[{k}]{tail}: {message}", profile.unwrap_or_default()),
        },
        None if rest == "points" => Problem {
            reason: Reason::InvalidSpec,
            path: "spec.points".into(),
            message: format!("{message} (inline or from the profile)"),
        },
        None => Problem { reason: Reason::InvalidSpec, path: format!("spec.{rest}"), message },
    }
}

/// Checks an uplink's device selector; returns its expressions (empty: selects everything).
fn check_selector(selector: Option<&LabelSelector>, problems: &mut Vec<Problem>) -> Vec<Expression> {
    let Some(sel) = selector else { return Vec::new() };
    let mut exprs: Vec<Expression> =
        sel.match_labels.iter().flatten().map(|(k, v)| Expression::Equal(k.clone(), v.clone())).collect();
    for (i, req) in sel.match_expressions.iter().flatten().enumerate() {
        let at = format!("spec.deviceSelector.matchExpressions[{i}]");
        let values = req.values.as_deref().unwrap_or_default();
        let (values_wanted, known) = match req.operator.as_str() {
            "In" | "NotIn" => (true, true),
            "Exists" | "DoesNotExist" => (false, true),
            _ => (false, false),
        };
        if !known {
            problems.push(Problem {
                reason: Reason::InvalidSelector,
                path: format!("{at}.operator"),
                message: format!("{:?} is not In, NotIn, Exists or DoesNotExist", req.operator),
            });
        } else if values_wanted == values.is_empty() {
            problems.push(Problem {
                reason: Reason::InvalidSelector,
                path: format!("{at}.values"),
                message: if values_wanted {
                    format!("{} needs at least one value", req.operator)
                } else {
                    format!("{} takes no values", req.operator)
                },
            });
        } else {
            match Expression::try_from(req.clone()) {
                Ok(e) => exprs.push(e),
                Err(e) => problems.push(Problem { reason: Reason::InvalidSelector, path: at, message: e.0 }),
            }
        }
    }
    exprs
}

/// The Secrets an Uplink references (they need not exist).
pub fn secret_refs(uplink: &Uplink) -> Vec<ObjectKey> {
    let namespace = ObjectKey::of(uplink).namespace;
    secret_items(&namespace, &uplink.spec).into_iter().map(|(_, item)| item.secret).collect()
}

/// The Secrets a Device references (they need not exist).
pub fn device_secret_refs(device: &Device) -> Vec<ObjectKey> {
    let namespace = ObjectKey::of(device).namespace;
    device_secret_items(&namespace, &device.spec.connection).into_iter().map(|(_, item)| item.secret).collect()
}

/// The key of `name` in `namespace` a reference needs.
fn item(namespace: &str, name: &str, key: &str) -> SecretItem {
    SecretItem { secret: ObjectKey::new(namespace, name), key: key.to_string() }
}

/// The keys `username` and `password` of MQTT credentials, each with the path of the reference.
fn auth_items(namespace: &str, at: &str, auth: &MqttAuth) -> [(String, SecretItem); 2] {
    ["username", "password"].map(|key| (format!("{at}.secretRef.name"), item(namespace, &auth.secret_ref.name, key)))
}

/// The Secret keys a device needs, each with the path of its reference. A reference the spec
/// check refuses (a token Secret name that is not a Secret name, empty MQTT credentials) is
/// left out: it is reported once, as an invalid spec.
fn device_secret_items(namespace: &str, connection: &Connection) -> Vec<(String, SecretItem)> {
    let mut out = Vec::new();
    for r in connection.secret_refs().into_iter().filter(|r| is_dns_subdomain(r.name)) {
        let path = format!("spec.connection.{}.{}", r.at, if r.key.is_some() { "key" } else { "name" });
        out.extend(r.reads.iter().map(|key| (path.clone(), item(namespace, r.name, key))));
    }
    out
}

/// The Secret keys an uplink needs, each with the path of its reference.
fn secret_items(namespace: &str, spec: &UplinkSpec) -> Vec<(String, SecretItem)> {
    let mut out = Vec::new();
    let (at, tls) = match (&spec.mqtt, &spec.http) {
        (Some(m), _) => {
            if let Some(auth) = &m.auth {
                out.extend(auth_items(namespace, "spec.mqtt.auth", auth));
            }
            ("spec.mqtt", m.tls.as_ref())
        }
        (None, Some(h)) => {
            if let Some(a) = &h.auth {
                let r = &a.token_secret_ref;
                let at = "spec.http.auth.tokenSecretRef";
                let path = if r.key.is_some() { format!("{at}.key") } else { format!("{at}.name") };
                out.push((path, item(namespace, &r.name, r.key())));
            }
            ("spec.http", h.tls.as_ref())
        }
        (None, None) => return out,
    };
    if let Some(tls) = tls {
        if let Some(ca) = &tls.ca_secret_ref {
            let field = if ca.key.is_some() { "key" } else { "name" };
            out.push((format!("{at}.tls.caSecretRef.{field}"), item(namespace, &ca.name, ca.key())));
        }
        if let Some(cert) = &tls.client_cert_secret_ref {
            for key in ["tls.crt", "tls.key"] {
                out.push((format!("{at}.tls.clientCertSecretRef.name"), item(namespace, &cert.name, key)));
            }
        }
    }
    out
}

fn check_secrets(
    items: &[(String, SecretItem)],
    index: &SecretIndex,
    unreadable: &BTreeMap<ObjectKey, String>,
    problems: &mut Vec<Problem>,
) {
    let mut reported = BTreeSet::new();
    for (path, item) in items {
        let name_path = path.strip_suffix(".key").map_or_else(|| path.clone(), |p| format!("{p}.name"));
        if let Some(why) = unreadable.get(&item.secret) {
            if reported.insert(item.secret.clone()) {
                problems.push(Problem {
                    reason: Reason::UnreadableSecret,
                    path: name_path,
                    message: format!(
                        "Secret {:?} in namespace {:?} could not be read: {why}",
                        item.secret.name, item.secret.namespace
                    ),
                });
            }
            continue;
        }
        match index.get(&item.secret) {
            None => {
                if reported.insert(item.secret.clone()) {
                    problems.push(Problem {
                        reason: Reason::UnknownSecret,
                        path: name_path,
                        message: format!("no Secret {:?} in namespace {:?}", item.secret.name, item.secret.namespace),
                    });
                }
            }
            Some(keys) if !keys.contains(&item.key) => problems.push(Problem {
                reason: Reason::MissingSecretKey,
                path: path.clone(),
                message: format!("Secret {:?} has no key {:?}", item.secret.name, item.key),
            }),
            Some(_) => {}
        }
    }
}

/// The broker settings as the node's gateway sees them: Secret references renamed to the
/// per-node Secret's layout (see [`fieldgate_crds::node_objects`]), the broker's host name
/// resolved in the Uplink's namespace ([`service_host`]).
fn rendered_mqtt(namespace: &str, mqtt: &MqttUplink) -> MqttUplink {
    let mut m = mqtt.clone();
    m.url = service_url(&m.url, namespace);
    if let Some(auth) = &mut m.auth {
        rename_auth(namespace, auth);
    }
    if let Some(tls) = &mut m.tls {
        rename_tls(namespace, tls);
    }
    m
}

/// The HTTP endpoint as the node's gateway sees it: Secret references renamed to the per-node
/// Secret's layout, the host resolved in the Uplink's namespace.
fn rendered_http(namespace: &str, http: &HttpUplink) -> HttpUplink {
    let mut h = http.clone();
    // A service host is a valid host name; were it not, the URL stays as the object has it.
    h.url = h.url.with_host(&service_host(h.url.host(), namespace)).unwrap_or_else(|_| h.url.clone());
    if let Some(auth) = &mut h.auth {
        auth.token_secret_ref.name = secret_dir(namespace, &auth.token_secret_ref.name);
    }
    if let Some(tls) = &mut h.tls {
        rename_tls(namespace, tls);
    }
    h
}

/// TLS Secret references renamed to the per-node Secret's layout.
fn rename_tls(namespace: &str, tls: &mut MqttTls) {
    if let Some(ca) = &mut tls.ca_secret_ref {
        ca.name = secret_dir(namespace, &ca.name);
    }
    if let Some(cert) = &mut tls.client_cert_secret_ref {
        cert.name = secret_dir(namespace, &cert.name);
    }
}

/// MQTT credentials renamed to the per-node Secret's layout.
fn rename_auth(namespace: &str, auth: &mut MqttAuth) {
    auth.secret_ref.name = secret_dir(namespace, &auth.secret_ref.name);
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
#[path = "render_tests.rs"]
mod tests;
