//! The gateway's part of `Device.status` and `Uplink.status` in the cluster.
//!
//! - `Device.status`: the `Reachable` condition (with a reason: `Answering`, `ConnectFailed`,
//!   `Timeout`, ..., `NeverConnected` for a device that did not answer or connect within
//!   [`NEVER_SEEN_AFTER`] of being started) and `lastSeen`, written on transitions only and at
//!   most once per device per [`MIN_STATUS_INTERVAL`]. The operator derives `Ready` from it.
//! - This node's entry of `Uplink.status.gateways`: when the connection state changes or, at
//!   most every [`UPLINK_STATUS_INTERVAL`], when the backlog changed.
//!
//! Never telemetry values. Both by server-side apply with the field manager
//! `fieldgate-gateway-<node>`, which owns only those fields (the operator owns `node`,
//! `Configured`, `Ready`, ...). What the reporter knows of devices and uplinks it reads through
//! [`HealthSource`] alone.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use fieldgate_crds::{Device, GatewayConfig, Uplink};
use k8s_openapi::jiff::Timestamp;
use kube::api::{Patch, PatchParams};
use kube::{Api, Client};
use tokio::sync::watch;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::debug;

use crate::metrics::{DeviceLabels, Metrics};

/// Least time between two status writes of one device.
pub const MIN_STATUS_INTERVAL: Duration = Duration::from_secs(10);
/// Least time between two backlog-only writes of one uplink's status entry.
pub const UPLINK_STATUS_INTERVAL: Duration = Duration::from_secs(30);
/// A device that neither answered nor failed in a way the gateway could name this long after
/// it was started is reported `Reachable=False`, reason `NeverConnected`.
pub const NEVER_SEEN_AFTER: Duration = Duration::from_secs(30);
/// Longest time one status write may take.
const WRITE_TIMEOUT: Duration = Duration::from_secs(15);

/// What the gateway knows of one device's health.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DeviceHealth {
    /// The device's connection is up (it answers, or a pushing device is connected).
    pub connected: bool,
    /// Polls that read at least one point.
    pub polls: u64,
    /// The kind of the device's last error and when it happened (Unix milliseconds).
    pub last_error: Option<(&'static str, u64)>,
}

/// What the gateway knows of one uplink's health.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct UplinkHealth {
    /// Connected to the broker.
    pub connected: bool,
    /// Readings buffered, not yet acknowledged by the broker.
    pub backlog: u64,
    /// Age of the oldest of them, whole seconds.
    pub oldest_unsent_s: u64,
    /// Deliveries the broker acknowledged so far (only growth matters).
    pub acked: u64,
}

/// Where the reporter reads health from: one small interface, whatever keeps the state.
pub trait HealthSource: Send + Sync + 'static {
    /// The health of device `namespace/name` of `protocol`.
    fn device(&self, namespace: &str, name: &str, protocol: &'static str) -> DeviceHealth;
    /// The health of uplink `namespace/name`.
    fn uplink(&self, namespace: &str, name: &str) -> UplinkHealth;
}

impl HealthSource for Metrics {
    fn device(&self, namespace: &str, name: &str, protocol: &'static str) -> DeviceHealth {
        let device = format!("{namespace}/{name}");
        let labels = DeviceLabels { device, protocol };
        DeviceHealth {
            connected: self.device_connected.get(&labels).is_some_and(|g| g.get() == 1),
            polls: self.polls.get(&labels).map_or(0, |c| c.get()),
            last_error: self.device_last_error.get(&labels.device),
        }
    }

    fn uplink(&self, namespace: &str, name: &str) -> UplinkHealth {
        // From the state index, which the buffer writer and the uplink keep.
        let state = self.state.uplink(&format!("{namespace}/{name}"));
        let buffer = state.snapshot();
        UplinkHealth {
            connected: buffer.connected,
            backlog: buffer.backlog,
            oldest_unsent_s: buffer.oldest_unsent_age.as_secs(),
            acked: state.delivered.get(),
        }
    }
}

/// The `Reachable` condition the gateway reports for a device.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Reachability {
    /// Whether the device answers.
    pub reachable: bool,
    /// CamelCase reason.
    pub reason: &'static str,
    /// What a person reads.
    pub message: String,
}

impl Reachability {
    fn new(reachable: bool, reason: &'static str, message: impl Into<String>) -> Self {
        Self { reachable, reason, message: message.into() }
    }
}

/// The reason and a sentence for a device error kind (`fieldgate_device_errors_total{kind}`).
fn error_reason(kind: &str) -> (&'static str, &'static str) {
    match kind {
        "connect" => ("ConnectFailed", "cannot connect to it (name resolution, refusal or no route)"),
        "timeout" => ("Timeout", "its answers do not come in time"),
        "io" => ("ConnectionLost", "its connection fails or is closed"),
        "exception" => ("ExceptionResponse", "it answers requests with Modbus exceptions"),
        "protocol" | "bad_frame" | "malformed" | "id_mismatch" => ("ProtocolError", "its answers are malformed"),
        "subscribe" => ("SubscribeFailed", "its broker refuses the subscription"),
        "secret" => ("MissingCredentials", "its credentials are missing on the node"),
        _ => ("Error", "its requests fail"),
    }
}

/// Whether a device is reachable, from its health: started at `started_unix_ms` and running
/// for `running_for`. `None`: nothing to say yet.
pub fn reachability(h: &DeviceHealth, started_unix_ms: u64, running_for: Duration) -> Option<Reachability> {
    if h.connected {
        return Some(Reachability::new(true, "Answering", "the device answers the gateway"));
    }
    if let Some((kind, at)) = h.last_error
        && at >= started_unix_ms
    {
        let (reason, what) = error_reason(kind);
        return Some(Reachability::new(
            false,
            reason,
            format!("the gateway cannot reach the device: {what} (errors of kind {kind})"),
        ));
    }
    if h.polls > 0 {
        return Some(Reachability::new(false, "NotAnswering", "the device stopped answering the gateway"));
    }
    if running_for >= NEVER_SEEN_AFTER {
        return Some(Reachability::new(
            false,
            "NeverConnected",
            format!(
                "the device has neither answered nor connected since the gateway started it ({}s ago at least)",
                NEVER_SEEN_AFTER.as_secs()
            ),
        ));
    }
    None
}

/// The status patch of a device: its `Reachable` condition and `lastSeen`.
pub fn device_status_patch(
    namespace: &str,
    name: &str,
    r: &Reachability,
    last_seen: Option<&Timestamp>,
    now: &Timestamp,
) -> serde_json::Value {
    let cond = serde_json::json!({
        "type": "Reachable",
        "status": if r.reachable { "True" } else { "False" },
        "reason": r.reason,
        "message": r.message,
        "lastTransitionTime": now.to_string(),
    });
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
    started: Instant,
    started_unix_ms: u64,
    reported: Option<(bool, &'static str)>,
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

fn unix_ms_now() -> u64 {
    SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(0))
}

/// Reports device and uplink health of the applied config (`config`) until `cancel` fires.
pub async fn report_status<H: HealthSource>(
    client: Client,
    node: String,
    health: Arc<H>,
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
            let seen = devices.entry(key.clone()).or_insert_with(|| DeviceSeen {
                started: Instant::now(),
                started_unix_ms: unix_ms_now(),
                reported: None,
                polls: 0,
                last_seen: None,
                last_write: None,
            });
            let h = health.device(&d.namespace, &d.name, d.connection.protocol());
            if h.polls > seen.polls || (h.connected && seen.last_seen.is_none()) {
                seen.polls = h.polls;
                seen.last_seen = Some(now);
            }
            let Some(r) = reachability(&h, seen.started_unix_ms, seen.started.elapsed()) else { continue };
            let due = seen.last_write.is_none_or(|t| t.elapsed() >= MIN_STATUS_INTERVAL);
            if seen.reported != Some((r.reachable, r.reason)) && due {
                let patch = device_status_patch(&d.namespace, &d.name, &r, seen.last_seen.as_ref(), &now);
                let api: Api<Device> = Api::namespaced(client.clone(), &d.namespace);
                let patch = Patch::Apply(&patch);
                let write = api.patch_status(&d.name, &params, &patch);
                match tokio::time::timeout(WRITE_TIMEOUT, write).await {
                    Ok(Ok(_)) => {
                        seen.reported = Some((r.reachable, r.reason));
                        seen.last_write = Some(Instant::now());
                    }
                    Ok(Err(e)) => debug!(device = %key, error = %e, "device status not written"),
                    Err(_) => debug!(device = %key, "device status not written: no answer in time"),
                }
            }
        }
        for u in &cfg.uplinks {
            let key = format!("{}/{}", u.namespace, u.name);
            let seen = uplinks.entry(key.clone()).or_insert(UplinkSeen {
                reported: None,
                acked: 0,
                last_ack: None,
                last_write: None,
            });
            let h = health.uplink(&u.namespace, &u.name);
            if h.acked > seen.acked {
                seen.acked = h.acked;
                seen.last_ack = Some(now);
            }
            let entry = UplinkEntry {
                connected: h.connected,
                backlog: h.backlog,
                oldest_unsent_s: h.oldest_unsent_s,
                last_ack: seen.last_ack,
            };
            let changed_state = seen.reported.as_ref().is_none_or(|r| r.connected != entry.connected);
            let changed_backlog =
                seen.reported.as_ref().is_some_and(|r| r.backlog != entry.backlog || r.last_ack != entry.last_ack);
            let due = seen.last_write.is_none_or(|t| t.elapsed() >= UPLINK_STATUS_INTERVAL);
            if changed_state || (changed_backlog && due) {
                let patch = uplink_status_patch(&u.namespace, &u.name, &entry, &node);
                let api: Api<Uplink> = Api::namespaced(client.clone(), &u.namespace);
                let patch = Patch::Apply(&patch);
                let write = api.patch_status(&u.name, &params, &patch);
                match tokio::time::timeout(WRITE_TIMEOUT, write).await {
                    Ok(Ok(_)) => {
                        seen.reported = Some(entry);
                        seen.last_write = Some(Instant::now());
                    }
                    Ok(Err(e)) => debug!(uplink = %key, error = %e, "uplink status not written"),
                    Err(_) => debug!(uplink = %key, "uplink status not written: no answer in time"),
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

    #[test]
    fn status_patches_carry_only_what_the_gateway_owns() {
        let now: Timestamp = "2026-11-24T10:00:00Z".parse().unwrap();
        let r = Reachability::new(false, "ConnectFailed", "cannot connect");
        let p = device_status_patch("default", "meter-1", &r, Some(&now), &now);
        let status = p["status"].as_object().unwrap();
        assert_eq!(status.keys().collect::<Vec<_>>(), ["conditions", "lastSeen"]);
        let c = &p["status"]["conditions"][0];
        assert_eq!(
            (&c["type"], &c["status"], &c["reason"]),
            (&"Reachable".into(), &"False".into(), &"ConnectFailed".into())
        );
        let e = UplinkEntry { connected: true, backlog: 12, oldest_unsent_s: 90, last_ack: Some(now) };
        let u = uplink_status_patch("default", "cloud", &e, "edge-1");
        assert_eq!(u["status"]["gateways"][0]["node"], "edge-1");
        assert_eq!(u["status"]["gateways"][0]["backlogMessages"], 12);
        assert_eq!(u["status"]["gateways"][0]["oldestUnsentAge"], "1m 30s");
        assert_eq!(u["status"].as_object().unwrap().len(), 1);
    }

    #[test]
    fn a_device_that_never_connected_is_unreachable_with_the_reason_of_its_errors() {
        let started = 1_000;
        let fresh = Duration::from_secs(1);
        // Nothing known yet.
        assert_eq!(reachability(&DeviceHealth::default(), started, fresh), None);
        // An unresolvable host: connect errors from the start.
        let h = DeviceHealth { last_error: Some(("connect", 1_500)), ..DeviceHealth::default() };
        let r = reachability(&h, started, fresh).unwrap();
        assert_eq!((r.reachable, r.reason), (false, "ConnectFailed"));
        assert!(r.message.contains("cannot connect"), "{}", r.message);
        // An error of an earlier run of the device does not count.
        let h = DeviceHealth { last_error: Some(("timeout", 500)), ..DeviceHealth::default() };
        assert_eq!(reachability(&h, started, fresh), None);
        // Silence long enough: never connected.
        let r = reachability(&DeviceHealth::default(), started, NEVER_SEEN_AFTER).unwrap();
        assert_eq!((r.reachable, r.reason), (false, "NeverConnected"));
        // Up, then down.
        let up = DeviceHealth { connected: true, polls: 3, last_error: None };
        assert_eq!(reachability(&up, started, fresh).unwrap().reason, "Answering");
        let down = DeviceHealth { connected: false, polls: 3, last_error: Some(("io", 2_000)) };
        assert_eq!(reachability(&down, started, fresh).unwrap().reason, "ConnectionLost");
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
        let up = metrics.state.uplink("default/cloud");
        up.set_connected(true);
        up.restored(1, crate::index::Prior::default());
        up.stored(1, 1, 7, 100, std::time::SystemTime::now());
        let (tx, rx) = watch::channel(Some(Arc::new(cfg)));
        let cancel = CancellationToken::new();
        let reporter = tokio::spawn(report_status(client, "edge-1".into(), Arc::clone(&metrics), rx, cancel.clone()));

        for (path, check) in [
            ("/apis/fieldgate.io/v1alpha1/namespaces/default/devices/meter-1/status", "\"reason\":\"Answering\""),
            ("/apis/fieldgate.io/v1alpha1/namespaces/default/uplinks/cloud/status", "\"backlogMessages\":7"),
        ] {
            let (req, send) = tokio::time::timeout(Duration::from_secs(20), api.next_request())
                .await
                .expect("a request")
                .expect("the reporter is alive");
            assert_eq!(req.method(), http::Method::PATCH);
            assert_eq!(req.uri().path(), path);
            let q = req.uri().query().unwrap_or_default();
            assert!(q.contains("fieldManager=fieldgate-gateway-edge-1") && q.contains("force=true"), "{q}");
            assert_eq!(req.headers()["content-type"], "application/apply-patch+yaml");
            let body = req.into_body().collect_bytes().await.unwrap();
            let text = String::from_utf8(body.to_vec()).unwrap();
            assert!(text.contains(check), "{text}");
            assert!(!text.contains("\"Ready\""), "Ready is the operator's: {text}");
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

    /// Devices that never connected: `Reachable=False` with the reason, through the mocked API
    /// server. `meter-9`'s host never resolves (connect errors from its start); `meter-8` is
    /// silent (a pushing device that never sends).
    #[tokio::test(start_paused = true)]
    async fn devices_that_never_connected_get_reachable_false_with_a_reason() {
        use prometheus_client::registry::Registry;
        let (svc, mut api) =
            tower_test::mock::pair::<http::Request<kube::client::Body>, http::Response<kube::client::Body>>();
        let metrics = Arc::new(Metrics::new(&mut Registry::default()));
        let cfg = GatewayConfig::from_yaml(
            "apiVersion: fieldgate.io/v1alpha1\nkind: GatewayConfig\ndevices:\n\
             - name: meter-9\n  connection: {modbusTcp: {host: no-such-host.invalid}}\n  points: [{name: v, type: uint16, modbus: {table: holding, address: 0}}]\n\
             - name: meter-8\n  connection: {tcp: {tokenSecretRef: {name: tok}}}\n  points: [{name: v, type: float64}]\n",
        )
        .unwrap();
        let (_tx, rx) = watch::channel(Some(Arc::new(cfg)));
        let cancel = CancellationToken::new();
        let reporter = tokio::spawn(report_status(
            Client::new(svc, "default"),
            "edge-1".into(),
            Arc::clone(&metrics),
            rx,
            cancel.clone(),
        ));
        // The reporter sees both devices start; then meter-9's first connect fails.
        for _ in 0..10 {
            tokio::task::yield_now().await;
        }
        metrics.device_last_error.record("default/meter-9", "connect");
        let mut seen = Vec::new();
        for _ in 0..2 {
            let (req, send) = api.next_request().await.unwrap();
            let device = req.uri().path().rsplit('/').nth(1).unwrap().to_string();
            let body: serde_json::Value =
                serde_json::from_slice(&req.into_body().collect_bytes().await.unwrap()).unwrap();
            let c = &body["status"]["conditions"][0];
            assert_eq!((c["type"].as_str(), c["status"].as_str()), (Some("Reachable"), Some("False")), "{body}");
            assert!(body["status"].get("lastSeen").is_none(), "never seen: {body}");
            seen.push((device.clone(), c["reason"].as_str().unwrap().to_string()));
            let reply = serde_json::json!({"apiVersion": "fieldgate.io/v1alpha1", "kind": "Device",
                "metadata": {"name": device, "namespace": "default"},
                "spec": {"connection": {"modbusTcp": {"host": "no-such-host.invalid"}}}});
            send.send_response(
                http::Response::builder().body(kube::client::Body::from(serde_json::to_vec(&reply).unwrap())).unwrap(),
            );
        }
        assert_eq!(
            seen,
            [
                ("meter-9".to_string(), "ConnectFailed".to_string()),
                ("meter-8".to_string(), "NeverConnected".to_string())
            ]
        );
        cancel.cancel();
        reporter.await.unwrap();
    }
}
