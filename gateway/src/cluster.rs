//! In-cluster mode: the gateway runs from its node's ConfigMap (`fieldgate-gateway-<node>`,
//! rendered by the operator) and its node's credentials (from the operator's credentials
//! endpoint, [`crate::credentials`]: a gateway cannot read Secrets).
//!
//! - **Mirror.** The ConfigMap is watched through the API. Its `fieldgate.io/secret-hash`
//!   names the credentials that go with it; when they differ from those on hand, they are
//!   fetched first and written to `--secrets-dir` as `<secret>/<key>` (plus a private copy
//!   beside the config), then the config to `--config` (on the node's disk: the last applied
//!   config survives pod and node restarts). The file watcher applies each change per device,
//!   exactly as in standalone mode, so an invalid new config is refused and the running one
//!   stays. A deleted ConfigMap means no devices and no credentials.
//! - **Edge autonomy.** At start the gateway asks for both; when the API server or the
//!   operator cannot be reached it starts from the local copies and keeps trying.
//! - **Removal.** On its way out the gateway asks whether its DaemonSet still exists
//!   ([`removal`]); when it does not (the release was uninstalled), it deletes its local
//!   copies, credentials included. The JetStream store (unsent readings) stays.
//! - **Status**: [`crate::status_report`].

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::time::Duration;

use fieldgate_crds::GatewayConfig;
use fieldgate_crds::node_objects::{CONFIG_KEY, NodeCredentials, SECRET_HASH_ANNOTATION, split_secret_key};
use futures::StreamExt;
use k8s_openapi::api::apps::v1::DaemonSet;
use k8s_openapi::api::core::v1::ConfigMap;
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Api, Client, ResourceExt};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::credentials::{CredentialError, CredentialSource};

/// How long the start waits for the API server and the operator before using the local copy.
pub const BOOTSTRAP_TIMEOUT: Duration = Duration::from_secs(10);
/// Longest wait between two attempts to fetch credentials that failed.
const MAX_RETRY: Duration = Duration::from_secs(60);

/// Where the per-node objects are and where their copies go.
#[derive(Clone, Debug)]
pub struct ClusterSettings {
    /// Namespace of the per-node objects (the gateway's own).
    pub namespace: String,
    /// Name of the per-node ConfigMap.
    pub configmap: String,
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
    /// Neither the API server and the operator answered in time, nor is there a local copy.
    #[error("the API server or the operator is unreachable and there is no local copy of the config at {0}")]
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
    /// The node's credentials could not be had.
    #[error(transparent)]
    Credentials(#[from] CredentialError),
}

impl ClusterError {
    /// A static label for metrics.
    pub fn kind(&self) -> &'static str {
        match self {
            ClusterError::NoConfig(_) => "no_config",
            ClusterError::Write { .. } => "write",
            ClusterError::Api(_) => "api",
            ClusterError::Credentials(e) => e.kind(),
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

/// The credentials hash a ConfigMap names (`None`: it names none).
fn wanted_hash(cm: &ConfigMap) -> Option<&str> {
    cm.annotations().get(SECRET_HASH_ANNOTATION).map(String::as_str)
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

    /// Writes the node's credentials (none: every one goes) to the secrets dir and the
    /// private copy: new files first, then stale ones removed, so a reader never misses a key.
    pub fn write_credentials(&self, credentials: Option<&NodeCredentials>) -> Result<(), ClusterError> {
        let mut files: BTreeMap<PathBuf, Vec<u8>> = BTreeMap::new();
        for (k, v) in credentials.map(|c| &c.data).into_iter().flatten() {
            match split_secret_key(k) {
                Some((dir, file)) => {
                    files.insert(PathBuf::from(dir).join(file), v.0.clone());
                }
                None => debug!(key = %k, "ignoring a credentials key the operator did not write"),
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

    /// Deletes the local copies: the config and every credential (the gateway was removed).
    pub fn wipe(&self) -> Result<(), ClusterError> {
        self.write_credentials(None)?;
        match std::fs::remove_file(&self.settings.config_path) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(write_err(&self.settings.config_path)(e)),
            _ => Ok(()),
        }
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

/// Fetches the ConfigMap and the credentials once and writes them. `Ok(Some(hash))` with the
/// credentials' hash when both came; `Ok(None)` when the API server or the operator did not
/// answer in time and a local copy exists (the gateway starts from it); an error when there
/// is no copy.
pub async fn bootstrap(
    client: Option<&Client>,
    credentials: Option<&CredentialSource>,
    mirror: &Mirror,
) -> Result<Option<String>, ClusterError> {
    let s = &mirror.settings;
    let fetched = match client {
        Some(client) => {
            let cms: Api<ConfigMap> = Api::namespaced(client.clone(), &s.namespace);
            tokio::time::timeout(BOOTSTRAP_TIMEOUT, async {
                let cm = cms.get_opt(&s.configmap).await?;
                let creds = match (&cm, credentials) {
                    (Some(_), Some(source)) => Some(source.fetch().await?),
                    _ => None,
                };
                Ok::<_, ClusterError>((cm, creds))
            })
            .await
            .ok()
        }
        None => None,
    };
    match fetched {
        Some(Ok((cm, creds))) => {
            mirror.write_credentials(creds.as_ref())?;
            mirror.write_config(cm.as_ref())?;
            info!(configmap = %s.configmap, found = cm.is_some(), "configuration fetched");
            Ok(Some(creds.map(|c| c.hash).unwrap_or_default()))
        }
        other => {
            match &other {
                Some(Err(e)) => warn!(error = %e, "configuration or credentials not fetched"),
                _ => warn!(after = ?BOOTSTRAP_TIMEOUT, "configuration or credentials not fetched in time"),
            }
            if !s.config_path.exists() {
                return Err(ClusterError::NoConfig(s.config_path.display().to_string()));
            }
            let n = mirror.restore_secrets()?;
            warn!(
                config = %s.config_path.display(),
                secrets = n,
                "starting from the last applied configuration"
            );
            Ok(None)
        }
    }
}

/// Applies one ConfigMap state (`None`: deleted): the credentials it names first (fetched
/// when they differ from `have`), then the config. On error nothing of it was written but
/// possibly the credentials.
async fn apply(
    mirror: &Mirror,
    credentials: Option<&CredentialSource>,
    cm: Option<&ConfigMap>,
    have: &mut Option<String>,
) -> Result<(), ClusterError> {
    let Some(cm) = cm else {
        mirror.write_credentials(None)?;
        mirror.write_config(None)?;
        *have = Some(String::new());
        return Ok(());
    };
    let wanted = wanted_hash(cm);
    if let Some(source) = credentials
        && (wanted.is_none() || have.as_deref() != wanted)
    {
        let c = source.fetch().await?;
        mirror.write_credentials(Some(&c))?;
        if wanted.is_some_and(|w| w != c.hash) {
            debug!(wanted = ?wanted, got = %c.hash, "the credentials changed again meanwhile");
        }
        *have = Some(c.hash);
    }
    mirror.write_config(Some(cm))
}

/// Keeps the local copies in step with the ConfigMap and the credentials it names until
/// `cancel` fires. `have` is the hash of the credentials on hand (`None`: unknown). Watch
/// errors (API down) are retried with backoff, credentials that cannot be fetched with a
/// growing delay; the running config stays meanwhile.
pub async fn mirror(
    client: Client,
    credentials: Option<CredentialSource>,
    mirror: Mirror,
    mut have: Option<String>,
    cancel: CancellationToken,
) {
    let s = mirror.settings.clone();
    let cms: Api<ConfigMap> = Api::namespaced(client, &s.namespace);
    let config = watcher::Config::default().fields(&format!("metadata.name={}", s.configmap));
    let mut events = watcher(cms, config).default_backoff().boxed();
    let mut api_ok = true;
    // The latest ConfigMap state not applied yet (`Some(None)`: deleted).
    let mut pending: Option<Option<ConfigMap>> = None;
    let mut listed = false;
    let mut retry_at: Option<Instant> = None;
    let mut delay = Duration::from_secs(1);
    loop {
        tokio::select! {
            () = cancel.cancelled() => return,
            ev = events.next() => match ev {
                Some(Ok(ev)) => {
                    if !api_ok {
                        info!("API server reachable again");
                    }
                    api_ok = true;
                    match ev {
                        watcher::Event::Apply(cm) => pending = Some(Some(cm)),
                        watcher::Event::Delete(_) => pending = Some(None),
                        watcher::Event::Init => listed = false,
                        watcher::Event::InitApply(cm) => {
                            listed = true;
                            pending = Some(Some(cm));
                        }
                        // Listed again and not there: deleted while the watch was down.
                        watcher::Event::InitDone => if !listed { pending = Some(None) },
                    }
                }
                Some(Err(e)) => {
                    if api_ok {
                        warn!(error = %e, "API server unreachable; running on the last applied configuration");
                    }
                    api_ok = false;
                    continue;
                }
                None => return,
            },
            () = async { if let Some(at) = retry_at { tokio::time::sleep_until(at).await } else { std::future::pending().await } } => {}
        }
        let Some(state) = pending.take() else { continue };
        match apply(&mirror, credentials.as_ref(), state.as_ref(), &mut have).await {
            Ok(()) => {
                retry_at = None;
                delay = Duration::from_secs(1);
            }
            Err(e) => {
                warn!(error = %e, kind = e.kind(), retry_in = ?delay, "configuration not applied; the running one stays");
                pending.get_or_insert(state);
                retry_at = Some(Instant::now() + delay);
                delay = (delay * 2).min(MAX_RETRY);
            }
        }
    }
}

/// Whether this gateway was removed from the cluster, as its DaemonSet tells.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Removal {
    /// For good: the DaemonSet is gone or being deleted, or the gateway's identity or
    /// permissions are (uninstalling the release removes them too).
    Removed(&'static str),
    /// The DaemonSet is there: a restart, an update or an eviction.
    Staying,
    /// The API server could not say (unreachable, failing): keep everything.
    Unknown(String),
}

/// Asks the API server whether DaemonSet `name` of `namespace` is still there (at most
/// `timeout`).
pub async fn removal(client: &Client, namespace: &str, name: &str, timeout: Duration) -> Removal {
    let api = Api::<DaemonSet>::namespaced(client.clone(), namespace);
    match tokio::time::timeout(timeout, api.get(name)).await {
        Ok(Ok(ds)) if ds.metadata.deletion_timestamp.is_some() => Removal::Removed("its DaemonSet is being deleted"),
        Ok(Ok(_)) => Removal::Staying,
        Ok(Err(kube::Error::Api(s))) => match s.code {
            404 => Removal::Removed("its DaemonSet is gone"),
            401 => Removal::Removed("its ServiceAccount is gone"),
            403 => Removal::Removed("its permissions are gone"),
            _ => Removal::Unknown(format!("{} {}", s.code, s.message)),
        },
        Ok(Err(e)) => Removal::Unknown(e.to_string()),
        Err(_) => Removal::Unknown(format!("no answer within {timeout:?}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::{Request, Response};
    use k8s_openapi::ByteString;
    use kube::client::Body;
    use serde_json::json;
    use tower_test::mock;

    fn settings(dir: &Path) -> ClusterSettings {
        ClusterSettings {
            namespace: "fieldgate".into(),
            configmap: "fieldgate-gateway-edge-1".into(),
            node: "edge-1".into(),
            config_path: dir.join("state/gateway.yaml"),
            secrets_dir: dir.join("secrets"),
        }
    }

    fn creds(hash: &str, pairs: &[(&str, &str)]) -> NodeCredentials {
        NodeCredentials {
            node: "edge-1".into(),
            hash: hash.into(),
            data: pairs.iter().map(|(k, v)| (k.to_string(), ByteString(v.as_bytes().to_vec()))).collect(),
        }
    }

    #[test]
    fn secrets_land_where_the_rendered_config_looks_for_them_and_stale_ones_go() {
        let dir = tempfile::tempdir().unwrap();
        let m = Mirror::new(settings(dir.path()));
        m.write_credentials(Some(&creds(
            "a",
            &[("default_creds_username", "gw"), ("default_creds_password", "pw"), ("plant_ca_ca.crt", "PEM")],
        )))
        .unwrap();
        let store = crate::secrets::SecretStore::new(dir.path().join("secrets"));
        assert_eq!(store.read("default_creds", "password").unwrap().expose(), b"pw");
        assert_eq!(store.read("plant_ca", "ca.crt").unwrap().expose(), b"PEM");
        m.write_credentials(Some(&creds("b", &[("default_creds_username", "gw2")]))).unwrap();
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
        m.write_credentials(Some(&creds("a", &[("default_creds_password", "pw")]))).unwrap();
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

    #[test]
    fn a_removed_gateway_leaves_no_config_and_no_credentials_on_the_node() {
        let dir = tempfile::tempdir().unwrap();
        let m = Mirror::new(settings(dir.path()));
        m.write_credentials(Some(&creds("a", &[("default_creds_password", "pw")]))).unwrap();
        m.write_config(None).unwrap();
        let buffer = dir.path().join("state/nats-store-stays");
        std::fs::write(&buffer, "unsent readings").unwrap();
        m.wipe().unwrap();
        let mut left: Vec<String> = walk(dir.path());
        left.sort();
        assert_eq!(left, ["state/nats-store-stays"], "only what is not Fieldgate's copy of the API stays");
        m.wipe().unwrap();
    }

    fn walk(root: &Path) -> Vec<String> {
        let mut out = Vec::new();
        let mut dirs = vec![root.to_path_buf()];
        while let Some(d) = dirs.pop() {
            for e in std::fs::read_dir(&d).unwrap().flatten() {
                if e.file_type().unwrap().is_dir() {
                    dirs.push(e.path());
                } else {
                    out.push(e.path().strip_prefix(root).unwrap().display().to_string());
                }
            }
        }
        out
    }

    #[tokio::test]
    async fn without_an_api_server_the_local_copy_is_used_and_without_one_start_fails() {
        let dir = tempfile::tempdir().unwrap();
        let m = Mirror::new(settings(dir.path()));
        let err = bootstrap(None, None, &m).await.unwrap_err();
        assert_eq!(err.kind(), "no_config");
        m.write_config(None).unwrap();
        assert_eq!(bootstrap(None, None, &m).await.unwrap(), None);
    }

    fn reply(send: mock::SendResponse<Response<Body>>, code: u16, body: &serde_json::Value) {
        send.send_response(
            Response::builder().status(code).body(Body::from(serde_json::to_vec(body).unwrap())).unwrap(),
        );
    }

    fn configmap(hash: &str, yaml: &str) -> ConfigMap {
        serde_json::from_value(json!({"metadata": {"name": "fieldgate-gateway-edge-1",
            "annotations": {SECRET_HASH_ANNOTATION: hash}}, "data": {CONFIG_KEY: yaml}}))
        .unwrap()
    }

    /// The credentials endpoint played by a mocked server: the exact requests of each apply.
    #[tokio::test]
    async fn credentials_are_fetched_before_the_config_and_only_when_the_configmap_names_new_ones() {
        let dir = tempfile::tempdir().unwrap();
        let m = Mirror::new(settings(dir.path()));
        let (service, mut endpoint) = mock::pair::<Request<Body>, Response<Body>>();
        let source = CredentialSource::from_client(Client::new(service, "default"));
        let mut have = None;
        let config_text = || std::fs::read_to_string(dir.path().join("state/gateway.yaml")).ok();
        let secret_file = || std::fs::read(dir.path().join("secrets/default_creds/password")).ok();

        // 1. A new hash: one request, the credentials written, then the config.
        let fetch = tokio::spawn({
            let (m, source) = (m.clone(), source.clone());
            async move {
                let mut have = None;
                let r = apply(&m, Some(&source), Some(&configmap("h1", "devices: []\n# one\n")), &mut have).await;
                (r.map_err(|e| e.to_string()), have)
            }
        });
        let (req, send) = endpoint.next_request().await.unwrap();
        assert_eq!((req.method().as_str(), req.uri().path()), ("GET", "/v1/credentials"));
        reply(send, 200, &serde_json::to_value(creds("h1", &[("default_creds_password", "one")])).unwrap());
        let (r, got) = fetch.await.unwrap();
        r.unwrap();
        have = got.or(have);
        assert_eq!(have.as_deref(), Some("h1"));
        assert_eq!(secret_file().as_deref(), Some(&b"one"[..]));
        assert!(config_text().unwrap().contains("# one"));

        // 2. The same hash with another config: no request.
        apply(&m, Some(&source), Some(&configmap("h1", "devices: []\n# two\n")), &mut have).await.unwrap();
        assert!(config_text().unwrap().contains("# two"));

        // 3. A new hash the endpoint cannot serve now: nothing of it is written.
        let fetch = tokio::spawn({
            let (m, source, mut have) = (m.clone(), source.clone(), have.clone());
            async move {
                apply(&m, Some(&source), Some(&configmap("h2", "devices: []\n# three\n")), &mut have).await.is_err()
            }
        });
        let (_, send) = endpoint.next_request().await.unwrap();
        reply(
            send,
            503,
            &json!({"kind": "Status", "apiVersion": "v1", "status": "Failure", "code": 503, "reason": "ServiceUnavailable", "message": "no"}),
        );
        // kube's client retries a 503 itself: refuse the retries too.
        let answered = tokio::spawn(async move {
            while let Some((_, send)) = endpoint.next_request().await {
                reply(
                    send,
                    503,
                    &json!({"kind": "Status", "apiVersion": "v1", "status": "Failure", "code": 503, "reason": "ServiceUnavailable", "message": "no"}),
                );
            }
        });
        assert!(fetch.await.unwrap(), "the apply failed");
        assert!(config_text().unwrap().contains("# two"), "the running config stays");
        assert_eq!(secret_file().as_deref(), Some(&b"one"[..]));

        // 4. Deleted: no devices, no credentials.
        apply(&m, Some(&source), None, &mut have).await.unwrap();
        assert_eq!(secret_file(), None);
        assert!(config_text().unwrap().contains("devices: []"));
        drop(source);
        answered.abort();
    }

    /// The API server answers but the operator does not: the gateway starts from its last
    /// applied config and credentials rather than from a config without its credentials.
    #[tokio::test]
    async fn with_the_operator_unreachable_the_gateway_starts_from_its_local_copies() {
        let dir = tempfile::tempdir().unwrap();
        let m = Mirror::new(settings(dir.path()));
        m.write_credentials(Some(&creds("h1", &[("default_creds_password", "old")]))).unwrap();
        std::fs::create_dir_all(dir.path().join("state")).unwrap();
        std::fs::write(dir.path().join("state/gateway.yaml"), "devices: []\n# last applied\n").unwrap();
        std::fs::remove_dir_all(dir.path().join("secrets")).unwrap();

        let (api_service, mut api) = mock::pair::<Request<Body>, Response<Body>>();
        let (endpoint_service, mut endpoint) = mock::pair::<Request<Body>, Response<Body>>();
        let client = Client::new(api_service, "default");
        let source = CredentialSource::from_client(Client::new(endpoint_service, "default"));
        let servers = tokio::spawn(async move {
            let (req, send) = api.next_request().await.unwrap();
            assert_eq!(req.uri().path(), "/api/v1/namespaces/fieldgate/configmaps/fieldgate-gateway-edge-1");
            reply(send, 200, &serde_json::to_value(configmap("h2", "devices: []\n# new\n")).unwrap());
            let (_, send) = endpoint.next_request().await.unwrap();
            reply(
                send,
                503,
                &json!({"kind": "Status", "apiVersion": "v1", "status": "Failure", "code": 503, "message": "operator down"}),
            );
        });
        assert_eq!(bootstrap(Some(&client), Some(&source), &m).await.unwrap(), None);
        servers.await.unwrap();
        let config = std::fs::read_to_string(dir.path().join("state/gateway.yaml")).unwrap();
        assert!(config.contains("# last applied"), "{config}");
        assert_eq!(std::fs::read(dir.path().join("secrets/default_creds/password")).unwrap(), b"old");
    }

    #[tokio::test]
    async fn a_gateway_is_removed_only_when_the_api_server_says_its_daemonset_is_gone() {
        let status = |code: u16| json!({"kind": "Status", "apiVersion": "v1", "status": "Failure", "code": code, "message": "m"});
        let ds = json!({"apiVersion": "apps/v1", "kind": "DaemonSet", "metadata": {"name": "fg-gateway", "namespace": "fieldgate"}});
        let mut deleting = ds.clone();
        deleting["metadata"]["deletionTimestamp"] = json!("2026-01-01T00:00:00Z");
        for (code, body, expected) in [
            (200, ds, Removal::Staying),
            (200, deleting, Removal::Removed("its DaemonSet is being deleted")),
            (404, status(404), Removal::Removed("its DaemonSet is gone")),
            (401, status(401), Removal::Removed("its ServiceAccount is gone")),
            (403, status(403), Removal::Removed("its permissions are gone")),
            (500, status(500), Removal::Unknown("500 m".into())),
        ] {
            let (service, mut api) = mock::pair::<Request<Body>, Response<Body>>();
            let client = Client::new(service, "default");
            let server = tokio::spawn(async move {
                let (req, send) = api.next_request().await.unwrap();
                assert_eq!(
                    (req.method().as_str(), req.uri().path()),
                    ("GET", "/apis/apps/v1/namespaces/fieldgate/daemonsets/fg-gateway")
                );
                reply(send, code, &body);
                // kube retries some codes itself: answer those alike.
                while let Some((_, send)) = api.next_request().await {
                    reply(send, code, &body);
                }
            });
            let got = removal(&client, "fieldgate", "fg-gateway", Duration::from_secs(30)).await;
            assert_eq!(got, expected, "{code}");
            drop(client);
            server.abort();
        }
    }
}
