//! `fieldgate-bench-operator --cold-start`: cold start to every ConfigMap applied, and the
//! operator's memory while it gets there.
//!
//! This process serves a mocked API server (axum on `127.0.0.1:0`) holding the synthetic world
//! of [`super::world`] as an API server returns it (uid, resourceVersion,
//! creationTimestamp, managedFields, kubectl's last-applied-configuration annotation on
//! Devices, Nodes with a status), and starts the real operator — this executable,
//! `fieldgate-operator run`, leader election on — as a child process whose kubeconfig points at
//! the mock. The mock answers list and watch (paged like the real one), the Lease, the
//! server-side applies of ConfigMaps, Secrets and statuses (a status write comes back to the
//! operator as a watch event, as in a cluster) and Event creation, and counts them.
//!
//! The operator's memory is read from `/proc/<child>/status`, so the mock is not counted.
//! The times are the operator's own cost plus loopback HTTP: the mock answers in microseconds,
//! with no etcd, admission, TLS, authentication or API priority and fairness. A real API
//! server adds its latency to each request (the ConfigMaps are applied one after another).

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::fmt::Write as _;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::{Method, StatusCode, Uri, header};
use axum::response::Response;
use k8s_openapi::jiff::Timestamp;
use serde_json::{Value, json};
use sha2::{Digest, Sha256};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::broadcast;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::{self as bench, BenchArgs};
use fieldgate_operator::render::{self, Placements, Settings};

/// Namespace of the per-node objects and the Lease in the bench.
const NAMESPACE: &str = "fieldgate-system";
/// Page size cap of a list (the watcher asks for 500).
const MAX_PAGE: usize = 500;

/// Where a collection lives in the API.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Collection {
    Devices,
    Profiles,
    Uplinks,
    Nodes,
    Secrets,
}

impl Collection {
    fn list_kind(self) -> (&'static str, &'static str) {
        match self {
            Collection::Devices => ("fieldgate.io/v1alpha1", "DeviceList"),
            Collection::Profiles => ("fieldgate.io/v1alpha1", "DeviceProfileList"),
            Collection::Uplinks => ("fieldgate.io/v1alpha1", "UplinkList"),
            Collection::Nodes => ("v1", "NodeList"),
            Collection::Secrets => ("meta.k8s.io/v1", "PartialObjectMetadataList"),
        }
    }
}

/// One change, as a watch stream line.
#[derive(Clone, Debug)]
struct Change {
    rv: u64,
    collection: Collection,
    line: Bytes,
}

/// What the mock counted, with the time of the interesting moments.
#[derive(Clone, Debug, Default)]
struct Counts {
    requests: usize,
    lists: usize,
    watches: usize,
    lease: usize,
    lease_acquired: Option<Instant>,
    first_request: Option<Instant>,
    last_list: Option<Instant>,
    configmaps: Vec<Instant>,
    secrets: usize,
    configmap_bytes: usize,
    /// The first body applied for each ConfigMap: their digest tells two builds wrote the same.
    configmap_bodies: BTreeMap<String, Bytes>,
    device_statuses: usize,
    uplink_statuses: usize,
    last_status: Option<Instant>,
    events: usize,
    secret_reads: usize,
    deletes: usize,
    other: Vec<String>,
}

impl Counts {
    /// Writes the operator made (per-node objects and statuses).
    fn writes(&self) -> usize {
        self.configmaps.len() + self.secrets + self.device_statuses + self.uplink_statuses + self.deletes
    }
}

/// The objects the mock serves: collection -> (namespace, name) -> object.
type Objects = BTreeMap<Collection, BTreeMap<(String, String), Value>>;

/// The mocked API server's state.
struct Mock {
    objects: Mutex<Objects>,
    lease: Mutex<Option<Value>>,
    rv: Mutex<u64>,
    log: Mutex<Vec<Change>>,
    changes: broadcast::Sender<Change>,
    counts: Mutex<Counts>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Metadata a real API server adds to every object it returns.
fn server_side(mut obj: Value, rv: u64, manager: &str) -> Value {
    let name = obj["metadata"]["name"].as_str().unwrap_or_default().to_string();
    let ns = obj["metadata"]["namespace"].as_str().unwrap_or_default().to_string();
    let api_version = obj["apiVersion"].clone();
    let m = &mut obj["metadata"];
    m["uid"] = json!(format!("{:08x}-1f2e-4d3c-9b8a-{:012x}", rv, name.len() + ns.len() * 131));
    m["resourceVersion"] = json!(rv.to_string());
    m["creationTimestamp"] = json!("2025-06-01T08:00:00Z");
    m["managedFields"] = json!([{
        "manager": manager,
        "operation": "Update",
        "apiVersion": api_version,
        "time": "2025-06-01T08:00:00Z",
        "fieldsType": "FieldsV1",
        "fieldsV1": {
            "f:metadata": {"f:annotations": {".": {}, "f:kubectl.kubernetes.io/last-applied-configuration": {}}, "f:labels": {".": {}, "f:tier": {}}},
            "f:spec": {".": {}, "f:connection": {".": {}, "f:modbusTcp": {".": {}, "f:host": {}, "f:port": {}, "f:timeout": {}, "f:unitId": {}}},
                "f:points": {}, "f:pollInterval": {}, "f:profile": {}}
        }
    }]);
    obj
}

/// What `kubectl apply` leaves on an object it created.
fn last_applied(mut obj: Value) -> Value {
    let mut manifest = obj.clone();
    if let Some(m) = manifest.as_object_mut() {
        m.remove("status");
    }
    if let Some(meta) = manifest["metadata"].as_object_mut() {
        meta.remove("generation");
    }
    let text = serde_json::to_string(&manifest).unwrap_or_default();
    obj["metadata"]["annotations"] = json!({"kubectl.kubernetes.io/last-applied-configuration": format!("{text}\n")});
    obj
}

/// A Node's status as the kubelet reports it (trimmed, but of a realistic size).
fn node_status() -> Value {
    let cond = |t: &str, s: &str, reason: &str| {
        json!({"type": t, "status": s, "reason": reason, "message": format!("kubelet reports {t}={s}"),
            "lastHeartbeatTime": "2025-06-01T08:00:00Z", "lastTransitionTime": "2025-06-01T08:00:00Z"})
    };
    let images: Vec<Value> = (0..12)
        .map(|i| json!({"names": [format!("registry.example.com/edge/image-{i}@sha256:{:064x}", i), format!("registry.example.com/edge/image-{i}:v1.{i}")], "sizeBytes": 20_000_000 + i}))
        .collect();
    json!({
        "conditions": [
            cond("MemoryPressure", "False", "KubeletHasSufficientMemory"),
            cond("DiskPressure", "False", "KubeletHasNoDiskPressure"),
            cond("PIDPressure", "False", "KubeletHasSufficientPID"),
            cond("Ready", "True", "KubeletReady"),
        ],
        "addresses": [{"type": "InternalIP", "address": "192.168.10.10"}, {"type": "Hostname", "address": "edge"}],
        "capacity": {"cpu": "4", "memory": "8010284Ki", "pods": "110", "ephemeral-storage": "61255492Ki"},
        "allocatable": {"cpu": "4", "memory": "7907884Ki", "pods": "110", "ephemeral-storage": "59589235720"},
        "nodeInfo": {"architecture": "arm64", "bootID": "5d3c", "containerRuntimeVersion": "containerd://1.7.23-k3s2",
            "kernelVersion": "6.6.31", "kubeProxyVersion": "v1.33.1+k3s1", "kubeletVersion": "v1.33.1+k3s1",
            "machineID": "a1b2", "operatingSystem": "linux", "osImage": "Debian GNU/Linux 12 (bookworm)", "systemUUID": "c3d4"},
        "images": images,
    })
}

impl Mock {
    fn new(args: &BenchArgs) -> anyhow::Result<Arc<Self>> {
        let world = bench::world(args.devices, args.nodes);
        let mut rv = 1u64;
        let mut objects = Objects::new();
        let mut put = |c: Collection, v: Value| {
            rv += 1;
            let key = (
                v["metadata"]["namespace"].as_str().unwrap_or_default().to_string(),
                v["metadata"]["name"].as_str().unwrap_or_default().to_string(),
            );
            objects.entry(c).or_default().insert(key, server_side(v, rv, "kubectl-client-side-apply"));
        };
        for d in &world.devices {
            put(Collection::Devices, last_applied(serde_json::to_value(d.as_ref())?));
        }
        for p in &world.profiles {
            put(Collection::Profiles, last_applied(serde_json::to_value(p.as_ref())?));
        }
        for u in &world.uplinks {
            put(Collection::Uplinks, last_applied(serde_json::to_value(u.as_ref())?));
        }
        for n in &world.nodes {
            let mut v = serde_json::to_value(n.as_ref())?;
            v["status"] = node_status();
            let uid = v["metadata"]["uid"].clone();
            let mut v = server_side(v, 0, "k3s");
            v["metadata"]["uid"] = uid;
            put(Collection::Nodes, v);
        }
        objects.entry(Collection::Secrets).or_default();
        let (changes, _) = broadcast::channel(1 << 16);
        Ok(Arc::new(Self {
            objects: Mutex::new(objects),
            lease: Mutex::new(None),
            rv: Mutex::new(rv),
            log: Mutex::new(Vec::new()),
            changes,
            counts: Mutex::new(Counts::default()),
        }))
    }

    fn next_rv(&self) -> u64 {
        let mut rv = lock(&self.rv);
        *rv += 1;
        *rv
    }

    fn counts(&self) -> Counts {
        lock(&self.counts).clone()
    }
}

fn respond(status: StatusCode, body: impl Into<Body>) -> Response {
    Response::builder()
        .status(status)
        .header(header::CONTENT_TYPE, "application/json")
        .body(body.into())
        .unwrap_or_else(|_| Response::new(Body::empty()))
}

fn json_response(status: StatusCode, v: &Value) -> Response {
    respond(status, serde_json::to_vec(v).unwrap_or_default())
}

fn api_status(code: u16, reason: &str, message: &str) -> Response {
    let status = StatusCode::from_u16(code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    json_response(
        status,
        &json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": if code < 400 { "Success" } else { "Failure" },
            "message": message, "reason": reason, "code": code}),
    )
}

fn query(uri: &Uri) -> BTreeMap<String, String> {
    uri.query()
        .unwrap_or_default()
        .split('&')
        .filter_map(|kv| kv.split_once('='))
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

async fn handle(State(mock): State<Arc<Mock>>, method: Method, uri: Uri, body: Bytes) -> Response {
    let now = Instant::now();
    {
        let mut c = lock(&mock.counts);
        c.requests += 1;
        c.first_request.get_or_insert(now);
    }
    let q = query(&uri);
    let segments: Vec<&str> = uri.path().trim_matches('/').split('/').collect();
    let collection = match segments.as_slice() {
        ["apis", "fieldgate.io", "v1alpha1", "devices"] => Some(Collection::Devices),
        ["apis", "fieldgate.io", "v1alpha1", "deviceprofiles"] => Some(Collection::Profiles),
        ["apis", "fieldgate.io", "v1alpha1", "uplinks"] => Some(Collection::Uplinks),
        ["api", "v1", "nodes"] => Some(Collection::Nodes),
        ["api", "v1", "secrets"] => Some(Collection::Secrets),
        _ => None,
    };
    if let (Some(c), &Method::GET) = (collection, &method) {
        return if q.get("watch").is_some_and(|w| w == "true" || w == "1") {
            watch(&mock, c, &q)
        } else {
            list(&mock, c, &q)
        };
    }
    match (&method, segments.as_slice()) {
        (&Method::PATCH, ["api", "v1", "namespaces", _, "configmaps", name]) => {
            let mut c = lock(&mock.counts);
            c.configmaps.push(now);
            c.configmap_bytes += body.len();
            c.configmap_bodies.entry((*name).to_string()).or_insert_with(|| body.clone());
            drop(c);
            respond(StatusCode::OK, body)
        }
        (&Method::PATCH, ["api", "v1", "namespaces", _, "secrets", _]) => {
            lock(&mock.counts).secrets += 1;
            respond(StatusCode::OK, body)
        }
        (&Method::GET, ["api", "v1", "namespaces", _, "configmaps"]) => json_response(
            StatusCode::OK,
            &json!({"apiVersion": "meta.k8s.io/v1", "kind": "PartialObjectMetadataList", "metadata": {"resourceVersion": "1"}, "items": []}),
        ),
        (&Method::GET, ["api", "v1", "namespaces", _, "secrets", _]) => {
            lock(&mock.counts).secret_reads += 1;
            api_status(404, "NotFound", "secret not found")
        }
        (&Method::DELETE, ["api", "v1", "namespaces", _, "configmaps" | "secrets", _]) => {
            lock(&mock.counts).deletes += 1;
            api_status(200, "", "deleted")
        }
        (
            &Method::PATCH,
            ["apis", "fieldgate.io", "v1alpha1", "namespaces", ns, plural @ ("devices" | "uplinks"), name, "status"],
        ) => {
            let collection = if *plural == "devices" { Collection::Devices } else { Collection::Uplinks };
            status_patch(&mock, collection, ns, name, &body, now)
        }
        (&Method::POST, ["apis", "events.k8s.io", "v1", "namespaces", _, "events"]) => {
            lock(&mock.counts).events += 1;
            respond(StatusCode::CREATED, body)
        }
        (&Method::PATCH, ["apis", "events.k8s.io", "v1", "namespaces", _, "events", _]) => {
            lock(&mock.counts).events += 1;
            respond(StatusCode::OK, body)
        }
        (_, ["apis", "coordination.k8s.io", "v1", "namespaces", _, "leases", ..]) => lease(&mock, &method, &body, now),
        _ => {
            let mut c = lock(&mock.counts);
            if c.other.len() < 20 {
                c.other.push(format!("{method} {uri}"));
            }
            api_status(404, "NotFound", "not served by the bench's mock")
        }
    }
}

fn list(mock: &Mock, collection: Collection, q: &BTreeMap<String, String>) -> Response {
    let limit = q.get("limit").and_then(|l| l.parse::<usize>().ok()).unwrap_or(MAX_PAGE).clamp(1, MAX_PAGE);
    let offset = q.get("continue").and_then(|c| c.parse::<usize>().ok()).unwrap_or(0);
    let rv = *lock(&mock.rv);
    let objects = lock(&mock.objects);
    let all = objects.get(&collection);
    let total = all.map_or(0, BTreeMap::len);
    let items: Vec<&Value> = all.into_iter().flat_map(|m| m.values()).skip(offset).take(limit).collect();
    let mut meta = json!({"resourceVersion": rv.to_string()});
    let end = offset + items.len();
    if end < total {
        meta["continue"] = json!(end.to_string());
    }
    let (api_version, kind) = collection.list_kind();
    let items: Vec<Value> = if collection == Collection::Secrets {
        items
            .iter()
            .map(
                |o| json!({"apiVersion": "meta.k8s.io/v1", "kind": "PartialObjectMetadata", "metadata": o["metadata"]}),
            )
            .collect()
    } else {
        items.into_iter().cloned().collect()
    };
    let body = json!({"apiVersion": api_version, "kind": kind, "metadata": meta, "items": items});
    drop(objects);
    let response = json_response(StatusCode::OK, &body);
    let mut c = lock(&mock.counts);
    c.lists += 1;
    c.last_list = Some(Instant::now());
    response
}

fn watch(mock: &Mock, collection: Collection, q: &BTreeMap<String, String>) -> Response {
    lock(&mock.counts).watches += 1;
    let from = q.get("resourceVersion").and_then(|r| r.parse::<u64>().ok()).unwrap_or(0);
    let timeout = q.get("timeoutSeconds").and_then(|t| t.parse::<u64>().ok()).unwrap_or(290);
    // Subscribe first, then replay what happened since `from`: nothing is lost in between.
    let rx = mock.changes.subscribe();
    let replay: Vec<Change> =
        lock(&mock.log).iter().filter(|c| c.rv > from && c.collection == collection).cloned().collect();
    let deadline = Instant::now() + Duration::from_secs(timeout);
    let last = replay.last().map_or(from, |c| c.rv);
    let replayed = futures::stream::iter(replay.into_iter().map(|c| Ok::<Bytes, Infallible>(c.line)));
    let live = futures::stream::unfold((rx, last), move |(mut rx, last)| async move {
        loop {
            let change = tokio::select! {
                () = tokio::time::sleep_until(deadline) => return None,
                c = rx.recv() => c,
            };
            match change {
                Ok(c) if c.collection == collection && c.rv > last => {
                    return Some((Ok::<Bytes, Infallible>(c.line), (rx, c.rv)));
                }
                Ok(_) => {}
                // Lagged or closed: end the stream; the watcher comes back with its last version.
                Err(_) => return None,
            }
        }
    });
    Response::builder()
        .status(StatusCode::OK)
        .header(header::CONTENT_TYPE, "application/json")
        .body(Body::from_stream(futures::StreamExt::chain(replayed, live)))
        .unwrap_or_else(|_| Response::new(Body::empty()))
}

fn status_patch(mock: &Mock, collection: Collection, ns: &str, name: &str, body: &Bytes, now: Instant) -> Response {
    let Ok(patch) = serde_json::from_slice::<Value>(body) else {
        return api_status(400, "BadRequest", "patch is not JSON");
    };
    let mut objects = lock(&mock.objects);
    let Some(obj) = objects.get_mut(&collection).and_then(|m| m.get_mut(&(ns.to_string(), name.to_string()))) else {
        return api_status(404, "NotFound", "no such object");
    };
    let rv = mock.next_rv();
    obj["status"] = patch["status"].clone();
    obj["metadata"]["resourceVersion"] = json!(rv.to_string());
    let out = obj.clone();
    drop(objects);
    let line = serde_json::to_vec(&json!({"type": "MODIFIED", "object": out})).unwrap_or_default();
    let mut line = line;
    line.push(b'\n');
    let change = Change { rv, collection, line: Bytes::from(line) };
    lock(&mock.log).push(change.clone());
    let _ = mock.changes.send(change);
    let mut c = lock(&mock.counts);
    match collection {
        Collection::Devices => c.device_statuses += 1,
        _ => c.uplink_statuses += 1,
    }
    c.last_status = Some(now);
    drop(c);
    json_response(StatusCode::OK, &out)
}

fn lease(mock: &Mock, method: &Method, body: &Bytes, now: Instant) -> Response {
    let mut c = lock(&mock.counts);
    c.lease += 1;
    drop(c);
    let mut lease = lock(&mock.lease);
    match *method {
        Method::GET => match &*lease {
            Some(l) => json_response(StatusCode::OK, l),
            None => api_status(404, "NotFound", "leases not found"),
        },
        Method::POST | Method::PUT => {
            let Ok(mut l) = serde_json::from_slice::<Value>(body) else {
                return api_status(400, "BadRequest", "lease is not JSON");
            };
            let rv = mock.next_rv();
            l["metadata"]["resourceVersion"] = json!(rv.to_string());
            l["metadata"]["namespace"] = json!(NAMESPACE);
            let held = l["spec"]["holderIdentity"].as_str().is_some_and(|h| !h.is_empty());
            *lease = Some(l.clone());
            drop(lease);
            if held {
                lock(&mock.counts).lease_acquired.get_or_insert(now);
            }
            json_response(if *method == Method::POST { StatusCode::CREATED } else { StatusCode::OK }, &l)
        }
        _ => api_status(405, "MethodNotAllowed", "lease method"),
    }
}

/// Resident and peak memory of a process, in KiB.
fn proc_memory(pid: u32) -> Option<(u64, u64)> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let field = |name: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
    };
    Some((field("VmRSS:")?, field("VmHWM:")?))
}

fn mib(kib: u64) -> String {
    format!("{:.1} MiB", kib as f64 / 1024.0)
}

/// The operator's `/metrics` text.
async fn scrape(port: u16) -> Option<String> {
    let mut s = tokio::net::TcpStream::connect(("127.0.0.1", port)).await.ok()?;
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n").await.ok()?;
    let mut text = String::new();
    s.read_to_string(&mut text).await.ok()?;
    Some(text)
}

/// The value of the series `name` (with its labels) in a metrics text.
fn metric(text: &str, name: &str) -> Option<f64> {
    text.lines().find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
}

/// `fieldgate_operator_reconciles_total{outcome="ok"}`.
async fn reconciles_ok(port: u16) -> Option<u64> {
    let text = scrape(port).await?;
    // A counter's value is a whole number.
    metric(&text, "fieldgate_operator_reconciles_total{outcome=\"ok\"}").map(|v| v as u64)
}

/// Stops the operator with SIGTERM (a graceful stop; the whole process group, so a `--wrap`
/// program and the operator under it alike), and kills it if it is still there after `grace`.
async fn stop_child(child: &mut tokio::process::Child, pid: u32, grace: Duration) {
    let _ = tokio::process::Command::new("kill").args(["-TERM", "--", &format!("-{pid}")]).status().await;
    if tokio::time::timeout(grace, child.wait()).await.is_err() {
        let _ = child.start_kill();
        let _ = child.wait().await;
    }
}

/// A file removed on drop.
struct TempFile(PathBuf);

impl Drop for TempFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// Runs the cold-start benchmark; returns the figures as text.
pub fn run(args: &BenchArgs) -> anyhow::Result<String> {
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    runtime.block_on(cold_start(args))
}

async fn cold_start(args: &BenchArgs) -> anyhow::Result<String> {
    // What a correct operator must write: one ConfigMap per node serving devices, and a status
    // for every Device and Uplink (none has one yet).
    let (expect_nodes, expect_devices, expect_uplinks) = {
        let w = bench::world(args.devices, args.nodes);
        let r = render::render(&w, &Placements::new(), &Settings::at(Timestamp::now()));
        (r.nodes.len(), r.devices.len(), r.uplinks.len())
    };
    let mock = Mock::new(args)?;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let stop = CancellationToken::new();
    let server = {
        let app = Router::new().fallback(handle).with_state(Arc::clone(&mock));
        let stop = stop.clone();
        tokio::spawn(async move {
            axum::serve(listener, app).with_graceful_shutdown(async move { stop.cancelled().await }).await
        })
    };

    let dir = std::env::temp_dir();
    let pid = std::process::id();
    let kubeconfig = TempFile(dir.join(format!("fieldgate-bench-{pid}.kubeconfig")));
    std::fs::write(
        &kubeconfig.0,
        format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: mock\n  cluster:\n    server: http://{addr}\nusers:\n- name: mock\n  user: {{}}\n\
             contexts:\n- name: mock\n  context: {{cluster: mock, user: mock, namespace: default}}\ncurrent-context: mock\n"
        ),
    )?;
    let log = TempFile(dir.join(format!("fieldgate-bench-{pid}.log")));
    let metrics_port = crate::free_port()?;

    let started = Instant::now();
    // The operator binary built next to this bench (`cargo build --release --workspace --bins`).
    let exe = std::env::current_exe()?.with_file_name("fieldgate-operator");
    anyhow::ensure!(exe.is_file(), "{} not found: run `cargo build --release --workspace --bins`", exe.display());
    let mut command = match &args.wrap {
        Some(wrapper) => {
            let mut c = tokio::process::Command::new(wrapper);
            c.arg(&exe);
            c
        }
        None => tokio::process::Command::new(&exe),
    };
    let mut child = command
        .args([
            "run",
            "--namespace",
            NAMESPACE,
            "--identity",
            "bench-operator",
            "--listen",
            &format!("127.0.0.1:{metrics_port}"),
        ])
        .env("KUBECONFIG", &kubeconfig.0)
        .env_remove("KUBERNETES_SERVICE_HOST")
        .env_remove("OTEL_EXPORTER_OTLP_ENDPOINT")
        .env("RUST_LOG", std::env::var("RUST_LOG").unwrap_or_else(|_| "info".into()))
        .stdout(std::process::Stdio::null())
        .stderr(std::fs::File::create(&log.0)?)
        .process_group(0)
        .kill_on_drop(true)
        .spawn()?;
    let child_pid = child.id().ok_or_else(|| anyhow::anyhow!("operator exited at once"))?;

    let deadline = started + args.timeout;
    let mut tick = tokio::time::interval(Duration::from_millis(10));
    let mut at_configmaps: Option<(Instant, u64)> = None;
    let mut at_statuses: Option<(Instant, u64, Counts)> = None;
    let mut settled: Option<(Instant, u64, Counts, u64)> = None;
    // Reconciles seen so far, and the writes the mock had counted then.
    let mut seen: Option<(u64, usize)> = None;
    let mut peak_sampled = 0u64;
    let outcome: anyhow::Result<()> = loop {
        tick.tick().await;
        if let Some(status) = child.try_wait()? {
            break Err(anyhow::anyhow!("the operator exited ({status})"));
        }
        let Some((rss, _)) = proc_memory(child_pid) else { continue };
        peak_sampled = peak_sampled.max(rss);
        let c = mock.counts();
        let now = Instant::now();
        if at_configmaps.is_none() && c.configmaps.len() >= expect_nodes {
            at_configmaps = Some((now, rss));
        }
        if at_configmaps.is_some()
            && at_statuses.is_none()
            && c.device_statuses >= expect_devices
            && c.uplink_statuses >= expect_uplinks
        {
            at_statuses = Some((now, rss, c.clone()));
        }
        // Settled: a reconcile after the first that wrote nothing (the status writes come back
        // as watch events and trigger more; a write the cache had not seen yet is repeated).
        if at_statuses.is_some() {
            let passes = reconciles_ok(metrics_port).await.unwrap_or(0);
            match seen {
                Some((n, writes)) if passes > n => {
                    if passes >= 2 && c.writes() == writes {
                        settled = Some((Instant::now(), rss, c, passes));
                        break Ok(());
                    }
                    seen = Some((passes, c.writes()));
                }
                Some(_) => {}
                None => seen = Some((passes, c.writes())),
            }
        }
        if now >= deadline {
            break Err(anyhow::anyhow!("not done within {:?}", args.timeout));
        }
    };
    let memory = proc_memory(child_pid);
    let operator_metrics = scrape(metrics_port).await.unwrap_or_default();
    stop_child(&mut child, child_pid, Duration::from_secs(10)).await;
    stop.cancel();
    let _ = server.await;
    let c = mock.counts();
    if let Err(e) = outcome {
        let kept = dir.join("fieldgate-bench-failed.log");
        let kept =
            std::fs::rename(&log.0, &kept).map_or_else(|e| format!("(lost: {e})"), |()| kept.display().to_string());
        anyhow::bail!(
            "{e}; mock saw {} requests, {} ConfigMaps (of {expect_nodes}), {} Device statuses, unexpected requests {:?}; \
             operator log: {kept}",
            c.requests,
            c.configmaps.len(),
            c.device_statuses,
            c.other,
        );
    }

    let since = |t: Option<Instant>| {
        t.map_or_else(|| "n/a".to_string(), |t| format!("{:?}", t.saturating_duration_since(started)))
    };
    let mut out = String::new();
    let build =
        if cfg!(debug_assertions) { "debug build (slow; use --release for real figures)" } else { "release build" };
    writeln!(
        out,
        "fieldgate-bench-operator --cold-start: {} devices, {} gateway nodes, {build}",
        args.devices, args.nodes
    )?;
    writeln!(
        out,
        "measures: the real operator (`fieldgate-operator run`, leader election on) as a child process against a mocked API \
         server in this process on loopback. Times = the operator's own work + loopback HTTP; a real API server adds its \
         latency to every request (etcd, admission, TLS, auth, API priority and fairness: none here). RSS = the operator \
         process alone (/proc/<pid>/status)."
    )?;
    if let Ok(v) = std::env::var("MALLOC_ARENA_MAX") {
        writeln!(out, "environment: MALLOC_ARENA_MAX={v}")?;
    }
    writeln!(out, "from process start:")?;
    writeln!(out, "  first API request               {}", since(c.first_request))?;
    writeln!(out, "  Lease acquired                  {}", since(c.lease_acquired))?;
    writeln!(
        out,
        "  last list page served           {}  ({} lists, {} watches)",
        since(c.last_list),
        c.lists,
        c.watches
    )?;
    writeln!(out, "  first ConfigMap applied         {}", since(c.configmaps.first().copied()))?;
    writeln!(
        out,
        "  all {expect_nodes} ConfigMaps applied       {}  <- cold start to all ConfigMaps applied (target <= 30 s)",
        since(c.configmaps.get(expect_nodes.saturating_sub(1)).copied())
    )?;
    if let Some((_, _, s)) = &at_statuses {
        writeln!(
            out,
            "  all {} Device + {} Uplink statuses written   {}  ({} Secrets applied, {} Events)",
            s.device_statuses,
            s.uplink_statuses,
            since(s.last_status),
            s.secrets,
            s.events
        )?;
    }
    if let (Some((t, _, s, passes)), Some((_, _, before))) = (&settled, &at_statuses) {
        writeln!(
            out,
            "  settled                         {}  (reconcile {passes} wrote nothing; after the first: {} ConfigMaps, {} statuses \
             written again, for Devices whose own status write had not reached the watch cache yet)",
            since(Some(*t)),
            s.configmaps.len() - before.configmaps.len(),
            (s.device_statuses + s.uplink_statuses) - (before.device_statuses + before.uplink_statuses)
        )?;
    }
    let mut digest = Sha256::new();
    for (name, body) in &c.configmap_bodies {
        digest.update(name.as_bytes());
        digest.update(body);
    }
    writeln!(
        out,
        "ConfigMap apply bodies: {} KiB in total; digest of the first body of each: {}",
        c.configmap_bytes / 1024,
        render::hex16(&digest.finalize())
    )?;
    let series = |name: &str| metric(&operator_metrics, name).unwrap_or(f64::NAN);
    let (renders, render_s) = (
        series("fieldgate_operator_render_duration_seconds_count"),
        series("fieldgate_operator_render_duration_seconds_sum"),
    );
    let (reconciles, reconcile_s) = (
        series("fieldgate_operator_reconcile_duration_seconds_count"),
        series("fieldgate_operator_reconcile_duration_seconds_sum"),
    );
    writeln!(
        out,
        "operator metrics: {renders} renders (plan), {:.0} ms each on average; {reconciles} reconciles, {:.0} ms on average",
        render_s * 1000.0 / renders,
        reconcile_s * 1000.0 / reconciles
    )?;
    let rss_at = |x: Option<u64>| x.map_or_else(|| "n/a".to_string(), mib);
    writeln!(
        out,
        "operator RSS: all ConfigMaps applied {}; all statuses written {}; settled {}; peak (VmHWM) {} (target <= 64 MiB)",
        rss_at(at_configmaps.map(|(_, r)| r)),
        rss_at(at_statuses.as_ref().map(|(_, r, _)| *r)),
        memory.map_or_else(|| "n/a".to_string(), |(r, _)| mib(r)),
        memory.map_or_else(|| mib(peak_sampled), |(_, h)| mib(h.max(peak_sampled))),
    )?;
    writeln!(
        out,
        "mock: {} requests; {} Events; {} Lease requests; unexpected: {:?}",
        c.requests, c.events, c.lease, c.other
    )?;
    Ok(out)
}
