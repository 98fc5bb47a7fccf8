//! Tests against a real cluster; they run only when `KUBECONFIG` is set (else they print
//! `SKIPPED: KUBECONFIG not set` and pass).
//!
//! They apply the generated CRDs, label one node `fieldgate.io/gateway=true` (and remove the
//! label afterwards if they added it), run the operator as a local process for a fresh
//! namespace, and check: the per-node ConfigMap, the Device conditions, a change propagating,
//! an invalid Device refused with its field path, a Device's token Secret copied into the
//! per-node Secret (and copied again when it changes), a Device whose Secret is missing refused
//! with the reference's path, and deletion cleaning up. Use a cluster
//! without another Fieldgate operator: both would write Device status.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::process::{Child, Command, Stdio};
use std::time::Duration;

use fieldgate_crds::{Device, DeviceProfile, Uplink};
use fieldgate_tests::cluster::{TestCluster, skip_without_cluster};
use k8s_openapi::api::core::v1::{ConfigMap, Secret};
use kube::Api;
use kube::api::{DeleteParams, Patch, PatchParams};
use serde_json::json;
use tokio::time::Instant;

const MANAGER: &str = "fieldgate-cluster-test";

/// Polls `check` every 250 ms until it returns `Some`, or fails after `timeout`.
async fn eventually<T, F, Fut>(what: &str, timeout: Duration, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = check().await {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// The operator process; killed by PID when dropped.
struct Operator(Child);

impl Drop for Operator {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn device(name: &str, poll: &str) -> serde_json::Value {
    json!({
        "apiVersion": "fieldgate.io/v1alpha1", "kind": "Device",
        "metadata": {"name": name, "labels": {"site": "test"}},
        "spec": {
            "profile": "meter",
            "connection": {"modbusTcp": {"host": "10.0.0.7", "port": 502}},
            "pollInterval": poll
        }
    })
}

/// A raw TCP device whose token is key `token` of Secret `secret`.
fn tcp_device(name: &str, secret: &str) -> serde_json::Value {
    json!({
        "apiVersion": "fieldgate.io/v1alpha1", "kind": "Device",
        "metadata": {"name": name},
        "spec": {
            "connection": {"tcp": {"tokenSecretRef": {"name": secret}}},
            "points": [{"name": "temp", "type": "float64"}]
        }
    })
}

#[tokio::test]
async fn operator_renders_configures_propagates_refuses_and_cleans_up() {
    if skip_without_cluster() {
        return;
    }
    let cluster = TestCluster::start("fieldgate-test", MANAGER).await.unwrap();
    let (client, ns, node) = (cluster.client.clone(), cluster.namespace.clone(), cluster.node.clone());

    let _operator = Operator(
        Command::new(env!("CARGO_BIN_EXE_fieldgate-operator"))
            .args([
                "run",
                "--namespace",
                &ns,
                "--leader-election=false",
                "--listen",
                "127.0.0.1:0",
                "--debounce",
                "100ms",
            ])
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .spawn()
            .unwrap(),
    );

    let pp = PatchParams::apply(MANAGER).force();
    let profiles = Api::<DeviceProfile>::namespaced(client.clone(), &ns);
    let profile = json!({"apiVersion": "fieldgate.io/v1alpha1", "kind": "DeviceProfile", "metadata": {"name": "meter"},
        "spec": {"points": [{"name": "energy", "type": "uint32", "modbus": {"table": "holding", "address": 0}}]}});
    profiles.patch("meter", &pp, &Patch::Apply(&profile)).await.unwrap();
    let uplinks = Api::<Uplink>::namespaced(client.clone(), &ns);
    let uplink = json!({"apiVersion": "fieldgate.io/v1alpha1", "kind": "Uplink", "metadata": {"name": "cloud"},
        "spec": {"deviceSelector": {"matchLabels": {"site": "test"}}, "mqtt": {"url": "mqtt://broker.example:1883"}}});
    uplinks.patch("cloud", &pp, &Patch::Apply(&uplink)).await.unwrap();
    let devices = Api::<Device>::namespaced(client.clone(), &ns);
    devices.patch("meter-1", &pp, &Patch::Apply(device("meter-1", "1s"))).await.unwrap();

    // 1. The node's ConfigMap holds the device, and the Device says where and that it is configured.
    let cms = Api::<ConfigMap>::namespaced(client.clone(), &ns);
    let cm_name = format!("fieldgate-gateway-{node}");
    let first_version = eventually("the node's ConfigMap with meter-1", Duration::from_secs(60), || {
        let (cms, cm_name) = (cms.clone(), cm_name.clone());
        async move {
            let cm = cms.get_opt(&cm_name).await.ok()??;
            let yaml = cm.data.as_ref()?.get("gateway.yaml")?.clone();
            let cfg = fieldgate_crds::GatewayConfig::from_yaml(&yaml).ok()?;
            cfg.devices.iter().any(|d| d.name == "meter-1").then_some(cfg.version?)
        }
    })
    .await;
    eventually("meter-1 Configured=True on the node", Duration::from_secs(30), || {
        let (devices, node) = (devices.clone(), node.clone());
        async move {
            let s = devices.get("meter-1").await.ok()?.status?;
            (s.node.as_deref() == Some(node.as_str()) && s.condition("Configured")?.status == "True").then_some(())
        }
    })
    .await;

    // 2. A change propagates: new version, new poll interval.
    devices.patch("meter-1", &pp, &Patch::Apply(device("meter-1", "5s"))).await.unwrap();
    eventually("the change in the ConfigMap", Duration::from_secs(30), || {
        let (cms, cm_name, first) = (cms.clone(), cm_name.clone(), first_version.clone());
        async move {
            let cm = cms.get_opt(&cm_name).await.ok()??;
            let cfg = fieldgate_crds::GatewayConfig::from_yaml(cm.data.as_ref()?.get("gateway.yaml")?).ok()?;
            let d = cfg.devices.iter().find(|d| d.name == "meter-1")?;
            (cfg.version? != first && d.poll_interval.as_deref() == Some("5s")).then_some(())
        }
    })
    .await;

    // 3. An invalid Device is refused with its field path and never reaches the node.
    devices.patch("broken", &pp, &Patch::Apply(device("broken", "fast"))).await.unwrap();
    let message = eventually("broken Configured=False", Duration::from_secs(30), || {
        let devices = devices.clone();
        async move {
            let s = devices.get("broken").await.ok()?.status?;
            let c = s.condition("Configured")?;
            (c.status == "False").then(|| c.message.clone())
        }
    })
    .await;
    assert!(message.contains("spec.pollInterval"), "{message}");
    let cm = cms.get(&cm_name).await.unwrap();
    assert!(!cm.data.unwrap()["gateway.yaml"].contains("broken"));

    // 4. A device's token Secret reaches the node's Secret under the per-node layout, the node's
    //    config names the copy, and a change to the Secret is copied again.
    let secrets = Api::<Secret>::namespaced(client.clone(), &ns);
    let token = |value: &str| {
        json!({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "pusher-token"},
            "stringData": {"token": value, "unrelated": "never copied"}})
    };
    secrets.patch("pusher-token", &pp, &Patch::Apply(token("first"))).await.unwrap();
    devices.patch("pusher", &pp, &Patch::Apply(tcp_device("pusher", "pusher-token"))).await.unwrap();
    let data_key = format!("{ns}_pusher-token_token");
    let node_secret = |wanted: &'static str| {
        let (secrets, name, data_key) = (secrets.clone(), cm_name.clone(), data_key.clone());
        async move {
            let s = secrets.get_opt(&name).await.ok()??;
            let data = s.data?;
            (data.get(&data_key)?.0 == wanted.as_bytes() && data.len() == 1).then_some(())
        }
    };
    eventually("the token in the node's Secret", Duration::from_secs(30), || node_secret("first")).await;
    let cm = cms.get(&cm_name).await.unwrap();
    let cfg = fieldgate_crds::GatewayConfig::from_yaml(&cm.data.unwrap()["gateway.yaml"]).unwrap();
    let pusher = cfg.devices.iter().find(|d| d.name == "pusher").expect("pusher in the node's config");
    let fieldgate_crds::Connection::Tcp(raw) = &pusher.connection else { panic!("{:?}", pusher.connection) };
    assert_eq!(raw.token_secret_ref.name, format!("{ns}_pusher-token"));
    secrets.patch("pusher-token", &pp, &Patch::Apply(token("second"))).await.unwrap();
    eventually("the changed token in the node's Secret", Duration::from_secs(30), || node_secret("second")).await;

    // 5. A Device whose Secret does not exist is refused with the reference's path; the others run.
    devices.patch("no-token", &pp, &Patch::Apply(tcp_device("no-token", "missing-token"))).await.unwrap();
    let message = eventually("no-token Configured=False", Duration::from_secs(30), || {
        let devices = devices.clone();
        async move {
            let s = devices.get("no-token").await.ok()?.status?;
            let c = s.condition("Configured")?;
            (c.status == "False").then(|| c.message.clone())
        }
    })
    .await;
    assert!(message.contains("spec.connection.tcp.tokenSecretRef.name"), "{message}");
    let s = devices.get("pusher").await.unwrap().status.unwrap();
    assert_eq!(s.condition("Configured").unwrap().status, "True");

    // 6. Deleting every Device deletes the node's ConfigMap.
    for name in ["meter-1", "broken", "pusher", "no-token"] {
        devices.delete(name, &DeleteParams::default()).await.unwrap();
    }
    eventually("the ConfigMap deleted", Duration::from_secs(30), || {
        let (cms, cm_name) = (cms.clone(), cm_name.clone());
        async move { cms.get_opt(&cm_name).await.ok()?.is_none().then_some(()) }
    })
    .await;
}
