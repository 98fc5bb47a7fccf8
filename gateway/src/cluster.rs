//! In-cluster mode: the gateway runs from its node's ConfigMap and Secret
//! (`fieldgate-gateway-<node>`, rendered by the operator) and reports back.
//!
//! - **Mirror.** Both objects are watched through the API and written to local files: the
//!   config to `--config` (on the node's disk: the last applied config survives pod and node
//!   restarts) and the Secret's keys to `--secrets-dir` as `<secret>/<key>`, plus a private
//!   copy beside the config. The file watcher then applies each change per device, exactly as
//!   in standalone mode, so an invalid new config is refused and the running one stays.
//! - **Edge autonomy.** At start the gateway asks the API for both objects; when the API server
//!   is unreachable it starts from the local copies and keeps trying in the background.
//! - **Status.** `Device.status` (`Reachable`, `lastSeen`) is written on transitions only,
//!   at most once per device per [`MIN_STATUS_INTERVAL`]; this node's entry of
//!   `Uplink.status.gateways` when the connection state changes or, at most every
//!   [`UPLINK_STATUS_INTERVAL`], when the backlog changed. Never telemetry values. Both by
//!   server-side apply with the field manager `fieldgate-gateway-<node>`, which owns only
//!   those fields (the operator owns `node`, `Configured`, ...).

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use fieldgate_crds::node_objects::{CONFIG_KEY, split_secret_key};
use fieldgate_crds::{Device, GatewayConfig, Uplink};
use futures::StreamExt;
use k8s_openapi::api::core::v1::{ConfigMap, Secret};
use k8s_openapi::jiff::Timestamp;
use kube::api::{Patch, PatchParams};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Api, Client};
use tokio::sync::watch;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::metrics::{DeliveryLabels, DeliveryOutcome, DeviceLabels, Metrics, UplinkLabels};

/// Least time between two status writes of one device.
pub const MIN_STATUS_INTERVAL: Duration = Duration::from_secs(10);
/// Least time between two backlog-only writes of one uplink's status entry.
pub const UPLINK_STATUS_INTERVAL: Duration = Duration::from_secs(30);
/// How long the start waits for the API server before using the local copy.
pub const BOOTSTRAP_TIMEOUT: Duration = Duration::from_secs(10);

/// Where the per-node objects are and where their copies go.
#[derive(Clone, Debug)]
pub struct ClusterSettings {
    /// Namespace of the per-node objects (the gateway's own).
    pub namespace: String,
    /// Name of the per-node ConfigMap.
    pub configmap: String,
    /// Name of the per-node Secret.
    pub secret: String,
    /// This node.
    pub node: String,
    /// The local copy of the config (`--config`).
    pub config_path: PathBuf,
    /// Where secrets are materialized (`--secrets-dir`).
    pub secrets_dir: PathBuf,
}

/// Why cluster mode could not start.
#[derive(Debug, thiserror::Error)]
pub enum ClusterError {
    /// No API server answered in time and there is no local copy to start from.
    #[error("the API server is unreachable and there is no local copy of the config at {0}")]
    NoConfig(String),
    /// Writing a local copy failed.
    #[error("writing {path}: {source}")]
    Write {
        /// The file.
        path: String,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// The Kubernetes client could not be built or a request failed.
    #[error("kubernetes API: {0}")]
    Api(#[from] kube::Error),
}

impl ClusterError {
    /// A static label for metrics.
    pub fn kind(&self) -> &'static str {
        match self {
            ClusterError::NoConfig(_) => "no_config",
            ClusterError::Write { .. } => "write",
            ClusterError::Api(_) => "api",
        }
    }
}

fn write_err(path: &Path) -> impl FnOnce(std::io::Error) -> ClusterError + '_ {
    move |source| ClusterError::Write { path: path.display().to_string(), source }
}

/// Writes `bytes` to `path` atomically (a temp file in the same directory, then a rename).
fn write_atomic(path: &Path, bytes: &[u8], private: bool) -> Result<(), ClusterError> {
    let dir = path.parent().unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir).map_err(write_err(dir))?;
    let tmp = dir.join(format!(".{}.tmp", path.file_name().and_then(|n| n.to_str()).unwrap_or("fieldgate")));
    std::fs::write(&tmp, bytes).map_err(write_err(&tmp))?;
    #[cfg(unix)]
    if private {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o600)).map_err(write_err(&tmp))?;
    }
    #[cfg(not(unix))]
    let _ = private;
    std::fs::rename(&tmp, path).map_err(write_err(path))
}

/// The config a node without devices runs (its ConfigMap was deleted).
pub fn empty_config(node: &str) -> String {
    format!(
        "apiVersion: {}\nkind: {}\nnode: {node}\ndevices: []\nuplinks: []\n",
        GatewayConfig::API_VERSION,
        GatewayConfig::KIND
    )
}

/// Local copies of the per-node objects.
#[derive(Clone, Debug)]
pub struct Mirror {
    settings: ClusterSettings,
}

impl Mirror {
    /// A mirror writing where `settings` say.
    pub fn new(settings: ClusterSettings) -> Self {
        Self { settings }
    }

    fn backup_dir(&self) -> PathBuf {
        let dir = self.settings.config_path.parent().unwrap_or(Path::new("."));
        dir.join("secrets")
    }

    /// Writes the config of `cm` (or the empty config when it is gone).
    pub fn write_config(&self, cm: Option<&ConfigMap>) -> Result<(), ClusterError> {
        let text = cm
            .and_then(|c| c.data.as_ref())
            .and_then(|d| d.get(CONFIG_KEY))
            .cloned()
            .unwrap_or_else(|| empty_config(&self.settings.node));
        let current = std::fs::read_to_string(&self.settings.config_path).ok();
        if current.as_deref() == Some(text.as_str()) {
            return Ok(());
        }
        write_atomic(&self.settings.config_path, text.as_bytes(), false)
    }

    /// Writes the keys of `secret` (none when it is gone) to the secrets dir and the private
    /// copy: new files first, then stale ones removed, so a reader never misses a key.
    pub fn write_secrets(&self, secret: Option<&Secret>) -> Result<(), ClusterError> {
        let mut files: BTreeMap<PathBuf, Vec<u8>> = BTreeMap::new();
        for (k, v) in secret.and_then(|s| s.data.as_ref()).into_iter().flatten() {
            match split_secret_key(k) {
                Some((dir, file)) => {
                    files.insert(PathBuf::from(dir).join(file), v.0.clone());
                }
                None => debug!(key = %k, "ignoring a Secret key the operator did not write"),
            }
        }
        for root in [self.settings.secrets_dir.clone(), self.backup_dir()] {
            write_tree(&root, &files)?;
        }
        Ok(())
    }

    /// Restores the secrets dir from the private copy (start without the API).
    pub fn restore_secrets(&self) -> Result<usize, ClusterError> {
        let files = read_tree(&self.backup_dir());
        write_tree(&self.settings.secrets_dir, &files)?;
        Ok(files.len())
    }
}

fn read_tree(root: &Path) -> BTreeMap<PathBuf, Vec<u8>> {
    let mut out = BTreeMap::new();
    for dir in std::fs::read_dir(root).into_iter().flatten().flatten() {
        let Ok(name) = dir.file_name().into_string() else { continue };
        for file in std::fs::read_dir(dir.path()).into_iter().flatten().flatten() {
            let Ok(fname) = file.file_name().into_string() else { continue };
            if fname.starts_with('.') {
                continue;
            }
            if let Ok(bytes) = std::fs::read(file.path()) {
                out.insert(PathBuf::from(&name).join(fname), bytes);
            }
        }
    }
    out
}

fn write_tree(root: &Path, files: &BTreeMap<PathBuf, Vec<u8>>) -> Result<(), ClusterError> {
    for (rel, bytes) in files {
        let path = root.join(rel);
        if std::fs::read(&path).ok().as_deref() != Some(bytes.as_slice()) {
            write_atomic(&path, bytes, true)?;
        }
    }
    let keep: BTreeSet<&PathBuf> = files.keys().collect();
    for (rel, _) in read_tree(root) {
        if !keep.contains(&rel) {
            let _ = std::fs::remove_file(root.join(&rel));
        }
    }
    for dir in std::fs::read_dir(root).into_iter().flatten().flatten() {
        // Removes directories left empty; fails harmlessly on the others.
        let _ = std::fs::remove_dir(dir.path());
    }
    Ok(())
}

/// Fetches both objects once and writes them. `Ok(false)` when the API did not answer in time
/// and a local copy exists (the gateway starts from it); an error when there is no copy.
pub async fn bootstrap(client: Option<&Client>, mirror: &Mirror) -> Result<bool, ClusterError> {
    let s = &mirror.settings;
    let fetched = match client {
        Some(client) => {
            let cms: Api<ConfigMap> = Api::namespaced(client.clone(), &s.namespace);
            let secrets: Api<Secret> = Api::namespaced(client.clone(), &s.namespace);
            tokio::time::timeout(BOOTSTRAP_TIMEOUT, async {
                let cm = cms.get_opt(&s.configmap).await?;
                let secret = secrets.get_opt(&s.secret).await?;
                Ok::<_, kube::Error>((cm, secret))
            })
            .await
            .ok()
        }
        None => None,
    };
    match fetched {
        Some(Ok((cm, secret))) => {
            mirror.write_secrets(secret.as_ref())?;
            mirror.write_config(cm.as_ref())?;
            info!(configmap = %s.configmap, found = cm.is_some(), "configuration fetched from the API");
            Ok(true)
        }
        other => {
            if let Some(Err(e)) = &other {
                warn!(error = %e, "API request failed");
            }
            if !s.config_path.exists() {
                return Err(ClusterError::NoConfig(s.config_path.display().to_string()));
            }
            let n = mirror.restore_secrets()?;
            warn!(
                config = %s.config_path.display(),
                secrets = n,
                "API server unreachable: starting from the last applied configuration"
            );
            Ok(false)
        }
    }
}

/// Keeps the local copies in step with the API until `cancel` fires. Watch errors (API down)
/// are retried with backoff; the running config stays meanwhile.
pub async fn mirror(client: Client, mirror: Mirror, cancel: CancellationToken) {
    let s = mirror.settings.clone();
    let cms: Api<ConfigMap> = Api::namespaced(client.clone(), &s.namespace);
    let secrets: Api<Secret> = Api::namespaced(client, &s.namespace);
    let by_name = |name: &str| watcher::Config::default().fields(&format!("metadata.name={name}"));
    let mut cm_events = watcher(cms, by_name(&s.configmap)).default_backoff().boxed();
    let mut secret_events = watcher(secrets, by_name(&s.secret)).default_backoff().boxed();
    let mut api_ok = true;
    loop {
        let result = tokio::select! {
            () = cancel.cancelled() => return,
            Some(ev) = cm_events.next() => ev.map(|ev| match ev {
                watcher::Event::Apply(cm) | watcher::Event::InitApply(cm) => mirror.write_config(Some(&cm)),
                watcher::Event::Delete(_) => mirror.write_config(None),
                watcher::Event::Init | watcher::Event::InitDone => Ok(()),
            }),
            Some(ev) = secret_events.next() => ev.map(|ev| match ev {
                watcher::Event::Apply(sec) | watcher::Event::InitApply(sec) => mirror.write_secrets(Some(&sec)),
                watcher::Event::Delete(_) => mirror.write_secrets(None),
                watcher::Event::Init | watcher::Event::InitDone => Ok(()),
            }),
        };
        match result {
            Ok(Ok(())) => {
                if !api_ok {
                    info!("API server reachable again");
                }
                api_ok = true;
            }
            Ok(Err(e)) => warn!(error = %e, "could not write the local copy"),
            Err(e) => {
                if api_ok {
                    warn!(error = %e, "API server unreachable; running on the last applied configuration");
                }
                api_ok = false;
            }
        }
    }
}

fn condition(type_: &str, ok: bool, reason: &str, message: &str, at: &Timestamp) -> serde_json::Value {
    serde_json::json!({
        "type": type_,
        "status": if ok { "True" } else { "False" },
        "reason": reason,
        "message": message,
        "lastTransitionTime": at.to_string(),
    })
}

/// The status patch of a device that became reachable (or not).
pub fn device_status_patch(
    namespace: &str,
    name: &str,
    reachable: bool,
    last_seen: Option<&Timestamp>,
    now: &Timestamp,
) -> serde_json::Value {
    let cond = if reachable {
        condition("Reachable", true, "Answering", "the device answers the gateway", now)
    } else {
        condition("Reachable", false, "NotAnswering", "the gateway cannot reach the device", now)
    };
    let mut status = serde_json::json!({ "conditions": [cond] });
    if let Some(t) = last_seen {
        status["lastSeen"] = serde_json::Value::String(t.to_string());
    }
    serde_json::json!({
        "apiVersion": "fieldgate.io/v1alpha1",
        "kind": "Device",
        "metadata": { "name": name, "namespace": namespace },
        "status": status,
    })
}

/// The status patch of this node's entry of an uplink.
pub fn uplink_status_patch(namespace: &str, name: &str, entry: &UplinkEntry, node: &str) -> serde_json::Value {
    let mut g = serde_json::json!({
        "node": node,
        "connected": entry.connected,
        "backlogMessages": entry.backlog,
        "oldestUnsentAge": humantime::format_duration(Duration::from_secs(entry.oldest_unsent_s)).to_string(),
    });
    if let Some(t) = &entry.last_ack {
        g["lastAckTime"] = serde_json::Value::String(t.to_string());
    }
    serde_json::json!({
        "apiVersion": "fieldgate.io/v1alpha1",
        "kind": "Uplink",
        "metadata": { "name": name, "namespace": namespace },
        "status": { "gateways": [g] },
    })
}

/// What this node reports of one uplink.
#[derive(Clone, Debug, PartialEq)]
pub struct UplinkEntry {
    /// Broker connection up.
    pub connected: bool,
    /// Readings buffered, not yet acknowledged by the cloud.
    pub backlog: u64,
    /// Age of the oldest of them, whole seconds.
    pub oldest_unsent_s: u64,
    /// When the broker last acknowledged a reading (as far as this reporter saw).
    pub last_ack: Option<Timestamp>,
}

struct DeviceSeen {
    reachable: Option<bool>,
    reported: Option<bool>,
    polls: u64,
    last_seen: Option<Timestamp>,
    last_write: Option<Instant>,
}

struct UplinkSeen {
    reported: Option<UplinkEntry>,
    acked: u64,
    last_ack: Option<Timestamp>,
    last_write: Option<Instant>,
}

/// Reports device and uplink health of the applied config (`config`) until `cancel` fires.
pub async fn report_status(
    client: Client,
    node: String,
    metrics: Arc<Metrics>,
    mut config: watch::Receiver<Option<Arc<GatewayConfig>>>,
    cancel: CancellationToken,
) {
    let params = PatchParams::apply(&format!("fieldgate-gateway-{node}")).force();
    let mut devices: HashMap<String, DeviceSeen> = HashMap::new();
    let mut uplinks: HashMap<String, UplinkSeen> = HashMap::new();
    let mut tick = tokio::time::interval(Duration::from_secs(5));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    loop {
        tokio::select! {
            () = cancel.cancelled() => return,
            _ = tick.tick() => {}
            r = config.changed() => if r.is_err() { return },
        }
        let Some(cfg) = config.borrow().clone() else { continue };
        let now = Timestamp::now();
        for d in &cfg.devices {
            let key = format!("{}/{}", d.namespace, d.name);
            let labels = DeviceLabels { device: key.clone(), protocol: d.connection.protocol() };
            let seen = devices.entry(key.clone()).or_insert(DeviceSeen {
                reachable: None,
                reported: None,
                polls: 0,
                last_seen: None,
                last_write: None,
            });
            let polls = metrics.polls.get_or_create(&labels).get();
            if polls > seen.polls {
                seen.polls = polls;
                seen.last_seen = Some(now);
            }
            // The adapter sets the gauge once it knows; before that there is nothing to say.
            let connected = metrics.device_connected.get_or_create(&labels).get();
            seen.reachable = match (connected, seen.reachable, polls) {
                (1, _, _) => Some(true),
                (_, Some(_), _) | (_, None, 1..) => Some(false),
                _ => seen.reachable,
            };
            let due = seen.last_write.is_none_or(|t| t.elapsed() >= MIN_STATUS_INTERVAL);
            if let Some(r) = seen.reachable
                && seen.reported != Some(r)
                && due
            {
                let patch = device_status_patch(&d.namespace, &d.name, r, seen.last_seen.as_ref(), &now);
                let api: Api<Device> = Api::namespaced(client.clone(), &d.namespace);
                match api.patch_status(&d.name, &params, &Patch::Apply(&patch)).await {
                    Ok(_) => {
                        seen.reported = Some(r);
                        seen.last_write = Some(Instant::now());
                    }
                    Err(e) => debug!(device = %key, error = %e, "device status not written"),
                }
            }
        }
        for u in &cfg.uplinks {
            let key = format!("{}/{}", u.namespace, u.name);
            let labels = UplinkLabels { uplink: key.clone() };
            let seen = uplinks.entry(key.clone()).or_insert(UplinkSeen {
                reported: None,
                acked: 0,
                last_ack: None,
                last_write: None,
            });
            let acked = metrics
                .deliveries
                .get_or_create(&DeliveryLabels { uplink: key.clone(), outcome: DeliveryOutcome::acked })
                .get();
            if acked > seen.acked {
                seen.acked = acked;
                seen.last_ack = Some(now);
            }
            let entry = UplinkEntry {
                connected: metrics.uplink_connected.get_or_create(&labels).get() == 1,
                backlog: u64::try_from(metrics.buffer_messages.get_or_create(&labels).get()).unwrap_or(0),
                oldest_unsent_s: metrics.buffer_oldest_unsent_age.get_or_create(&labels).get().max(0.0) as u64,
                last_ack: seen.last_ack,
            };
            let changed_state = seen.reported.as_ref().is_none_or(|r| r.connected != entry.connected);
            let changed_backlog =
                seen.reported.as_ref().is_some_and(|r| r.backlog != entry.backlog || r.last_ack != entry.last_ack);
            let due = seen.last_write.is_none_or(|t| t.elapsed() >= UPLINK_STATUS_INTERVAL);
            if changed_state || (changed_backlog && due) {
                let patch = uplink_status_patch(&u.namespace, &u.name, &entry, &node);
                let api: Api<Uplink> = Api::namespaced(client.clone(), &u.namespace);
                match api.patch_status(&u.name, &params, &Patch::Apply(&patch)).await {
                    Ok(_) => {
                        seen.reported = Some(entry);
                        seen.last_write = Some(Instant::now());
                    }
                    Err(e) => debug!(uplink = %key, error = %e, "uplink status not written"),
                }
            }
        }
        devices.retain(|k, _| cfg.devices.iter().any(|d| format!("{}/{}", d.namespace, d.name) == *k));
        uplinks.retain(|k, _| cfg.uplinks.iter().any(|u| format!("{}/{}", u.namespace, u.name) == *k));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::ByteString;

    fn settings(dir: &Path) -> ClusterSettings {
        ClusterSettings {
            namespace: "fieldgate".into(),
            configmap: "fieldgate-gateway-edge-1".into(),
            secret: "fieldgate-gateway-edge-1".into(),
            node: "edge-1".into(),
            config_path: dir.join("state/gateway.yaml"),
            secrets_dir: dir.join("secrets"),
        }
    }

    fn secret(pairs: &[(&str, &str)]) -> Secret {
        Secret {
            data: Some(pairs.iter().map(|(k, v)| (k.to_string(), ByteString(v.as_bytes().to_vec()))).collect()),
            ..Default::default()
        }
    }

    #[test]
    fn secrets_land_where_the_rendered_config_looks_for_them_and_stale_ones_go() {
        let dir = tempfile::tempdir().unwrap();
        let m = Mirror::new(settings(dir.path()));
        m.write_secrets(Some(&secret(&[
            ("default_creds_username", "gw"),
            ("default_creds_password", "pw"),
            ("plant_ca_ca.crt", "PEM"),
        ])))
        .unwrap();
        let store = crate::secrets::SecretStore::new(dir.path().join("secrets"));
        assert_eq!(store.read("default_creds", "password").unwrap().expose(), b"pw");
        assert_eq!(store.read("plant_ca", "ca.crt").unwrap().expose(), b"PEM");
        m.write_secrets(Some(&secret(&[("default_creds_username", "gw2")]))).unwrap();
        assert_eq!(store.read("default_creds", "username").unwrap().expose(), b"gw2");
        assert!(store.read("default_creds", "password").is_err());
        assert!(store.read("plant_ca", "ca.crt").is_err());
    }

    #[cfg(unix)]
    #[test]
    fn the_private_copy_is_owner_only_and_restores_the_secrets() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let m = Mirror::new(settings(dir.path()));
        m.write_secrets(Some(&secret(&[("default_creds_password", "pw")]))).unwrap();
        let copy = dir.path().join("state/secrets/default_creds/password");
        assert_eq!(std::fs::metadata(&copy).unwrap().permissions().mode() & 0o777, 0o600);
        std::fs::remove_dir_all(dir.path().join("secrets")).unwrap();
        assert_eq!(m.restore_secrets().unwrap(), 1);
        assert_eq!(std::fs::read(dir.path().join("secrets/default_creds/password")).unwrap(), b"pw");
    }

    #[test]
    fn a_deleted_configmap_means_no_devices() {
        let dir = tempfile::tempdir().unwrap();
        let m = Mirror::new(settings(dir.path()));
        m.write_config(None).unwrap();
        let cfg =
            GatewayConfig::from_yaml(&std::fs::read_to_string(dir.path().join("state/gateway.yaml")).unwrap()).unwrap();
        cfg.validate().unwrap();
        assert!(cfg.devices.is_empty() && cfg.uplinks.is_empty());
    }

    #[tokio::test]
    async fn without_an_api_server_the_local_copy_is_used_and_without_one_start_fails() {
        let dir = tempfile::tempdir().unwrap();
        let m = Mirror::new(settings(dir.path()));
        let err = bootstrap(None, &m).await.unwrap_err();
        assert_eq!(err.kind(), "no_config");
        m.write_config(None).unwrap();
        assert!(!bootstrap(None, &m).await.unwrap());
    }

    #[test]
    fn status_patches_carry_only_what_the_gateway_owns() {
        let now: Timestamp = "2026-11-24T10:00:00Z".parse().unwrap();
        let p = device_status_patch("default", "meter-1", false, Some(&now), &now);
        let status = p["status"].as_object().unwrap();
        assert_eq!(status.keys().collect::<Vec<_>>(), ["conditions", "lastSeen"]);
        assert_eq!(p["status"]["conditions"][0]["type"], "Reachable");
        assert_eq!(p["status"]["conditions"][0]["status"], "False");
        let e = UplinkEntry { connected: true, backlog: 12, oldest_unsent_s: 90, last_ack: Some(now) };
        let u = uplink_status_patch("default", "cloud", &e, "edge-1");
        assert_eq!(u["status"]["gateways"][0]["node"], "edge-1");
        assert_eq!(u["status"]["gateways"][0]["backlogMessages"], 12);
        assert_eq!(u["status"]["gateways"][0]["oldestUnsentAge"], "1m 30s");
        assert_eq!(u["status"].as_object().unwrap().len(), 1);
    }

    /// The reporter against a mocked API server: the exact requests it makes.
    #[tokio::test]
    async fn reporter_applies_device_and_uplink_status_with_its_own_field_manager() {
        use prometheus_client::registry::Registry;
        let (svc, mut api) =
            tower_test::mock::pair::<http::Request<kube::client::Body>, http::Response<kube::client::Body>>();
        let client = Client::new(svc, "default");
        let metrics = Arc::new(Metrics::new(&mut Registry::default()));
        let cfg: GatewayConfig = GatewayConfig::from_yaml(
            r#"
apiVersion: fieldgate.io/v1alpha1
kind: GatewayConfig
devices:
- name: meter-1
  connection: {modbusTcp: {host: 10.0.0.7}}
  points: [{name: v, type: uint16, modbus: {table: holding, address: 0}}]
uplinks:
- name: cloud
  mqtt: {url: "mqtt://broker:1883"}
"#,
        )
        .unwrap();
        let labels = DeviceLabels { device: "default/meter-1".into(), protocol: "modbus_tcp" };
        metrics.device_connected.get_or_create(&labels).set(1);
        metrics.polls.get_or_create(&labels).inc();
        let up = UplinkLabels { uplink: "default/cloud".into() };
        metrics.uplink_connected.get_or_create(&up).set(1);
        metrics.buffer_messages.get_or_create(&up).set(7);
        let (tx, rx) = watch::channel(Some(Arc::new(cfg)));
        let cancel = CancellationToken::new();
        let reporter = tokio::spawn(report_status(client, "edge-1".into(), Arc::clone(&metrics), rx, cancel.clone()));

        let expect = |path: &str| {
            let path = path.to_string();
            move |req: &http::Request<kube::client::Body>| {
                assert_eq!(req.method(), http::Method::PATCH);
                assert_eq!(req.uri().path(), path);
                let q = req.uri().query().unwrap_or_default();
                assert!(q.contains("fieldManager=fieldgate-gateway-edge-1") && q.contains("force=true"), "{q}");
                assert_eq!(req.headers()["content-type"], "application/apply-patch+yaml");
            }
        };
        for (path, check) in [
            ("/apis/fieldgate.io/v1alpha1/namespaces/default/devices/meter-1/status", "\"Reachable\""),
            ("/apis/fieldgate.io/v1alpha1/namespaces/default/uplinks/cloud/status", "\"backlogMessages\":7"),
        ] {
            let (req, send) = tokio::time::timeout(Duration::from_secs(20), api.next_request())
                .await
                .expect("a request")
                .expect("the reporter is alive");
            expect(path)(&req);
            let body = req.into_body().collect_bytes().await.unwrap();
            let text = String::from_utf8(body.to_vec()).unwrap();
            assert!(text.contains(check), "{text}");
            assert!(
                !text.contains("\"node\":\"edge-1\"") || path.contains("uplinks"),
                "device patch must not claim node: {text}"
            );
            let kind = if path.contains("devices") { "Device" } else { "Uplink" };
            let name = if path.contains("devices") { "meter-1" } else { "cloud" };
            let reply = serde_json::json!({
                "apiVersion": "fieldgate.io/v1alpha1", "kind": kind,
                "metadata": {"name": name, "namespace": "default"},
                "spec": if kind == "Device" {
                    serde_json::json!({"connection": {"modbusTcp": {"host": "10.0.0.7"}}})
                } else {
                    serde_json::json!({"mqtt": {"url": "mqtt://broker:1883"}})
                },
            });
            send.send_response(
                http::Response::builder().body(kube::client::Body::from(serde_json::to_vec(&reply).unwrap())).unwrap(),
            );
        }
        // Nothing changed: no further writes on the next ticks.
        tokio::time::pause();
        tokio::time::advance(Duration::from_secs(20)).await;
        tokio::time::resume();
        assert!(
            tokio::time::timeout(Duration::from_millis(200), api.next_request()).await.is_err(),
            "an unchanged status was written again"
        );
        cancel.cancel();
        drop(tx);
        reporter.await.unwrap();
    }
}
