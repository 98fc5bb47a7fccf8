//! The gateway in a real cluster, with the operator: runs only when `KUBECONFIG` points at a
//! cluster (else prints `SKIPPED: KUBECONFIG not set` and passes).
//!
//! The operator and the gateway run as local processes against the cluster; nats-server,
//! mosquitto (the "cloud") and a simulated Modbus device run locally too, so the Device points
//! at 127.0.0.1. Checked: the node's ConfigMap reaches the gateway and readings reach the
//! cloud; the gateway reports `Reachable` on the Device and its entry of `Uplink.status`; a
//! changed Device propagates to the running gateway; an invalid Device is refused with its
//! field path and never reaches the gateway; deleting the Device stops its readings.
//!
//! Needs `cargo build --workspace --bins` first. Run it against a cluster without another
//! Fieldgate operator (scale a Helm-installed one to 0).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::process::{Child, Command, Stdio};
use std::time::Duration;

use fieldgate_crds::{Device, Uplink};
use fieldgate_tests::cluster::{TestCluster, skip_without_cluster};
use fieldgate_tests::{CloudSubscriber, Mosquitto, NatsServer, SimFleet, free_port, wait_until};
use k8s_openapi::api::core::v1::ConfigMap;
use kube::api::{Api, DeleteParams, Patch, PatchParams};
use serde_json::json;

const MANAGER: &str = "fieldgate-gateway-cluster-test";
const WAIT: Duration = Duration::from_secs(120);

struct Proc(Child);
impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn device_json(name: &str, node: &str, port: u16, poll: &str, points: &serde_json::Value) -> serde_json::Value {
    json!({
        "apiVersion": "fieldgate.io/v1alpha1", "kind": "Device",
        "metadata": {"name": name, "labels": {"site": "test"}},
        "spec": {
            "connection": {"modbusTcp": {"host": "127.0.0.1", "port": port, "timeout": "500ms"}},
            "pollInterval": poll,
            "placement": {"nodeName": node},
            "points": points,
        }
    })
}

fn condition(obj: &serde_json::Value, type_: &str) -> Option<(String, String)> {
    obj["status"]["conditions"].as_array()?.iter().find(|c| c["type"] == type_).map(|c| {
        (c["status"].as_str().unwrap_or_default().to_string(), c["message"].as_str().unwrap_or_default().to_string())
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn operator_and_gateway_run_a_device_end_to_end_in_the_cluster() -> anyhow::Result<()> {
    if skip_without_cluster() {
        return Ok(());
    }
    let cluster = TestCluster::start("fieldgate-gw-test", MANAGER).await?;
    let (client, ns, node) = (cluster.client.clone(), cluster.namespace.clone(), cluster.node.clone());

    // Local data path: NATS, the "cloud" and one simulated device.
    let nats = NatsServer::start().await?;
    let broker = Mosquitto::start().await?;
    let cloud = CloudSubscriber::start(&broker.url(), "cloud-cluster", "fieldgate/#").await?;
    let fleet = SimFleet::healthy(1).await?;
    let port = fleet.ports()[0];
    let points = serde_json::to_value(fleet.points())?;

    let bin_dir = fieldgate_tests::gateway::gateway_binary()?.parent().map(std::path::Path::to_path_buf).unwrap();
    let _operator = Proc(
        Command::new(bin_dir.join("fieldgate-operator"))
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
            .stdout(Stdio::null())
            .spawn()?,
    );

    let pp = PatchParams::apply(MANAGER).force();
    let uplinks = Api::<Uplink>::namespaced(client.clone(), &ns);
    uplinks
        .patch("cloud", &pp, &Patch::Apply(json!({
            "apiVersion": "fieldgate.io/v1alpha1", "kind": "Uplink", "metadata": {"name": "cloud"},
            "spec": {"deviceSelector": {"matchLabels": {"site": "test"}}, "mqtt": {"url": broker.url(), "protocolVersion": 5},
                     "buffer": {"redeliverAfter": "2s"}}})))
        .await?;
    let devices = Api::<Device>::namespaced(client.clone(), &ns);
    devices.patch("meter-1", &pp, &Patch::Apply(device_json("meter-1", &node, port, "1s", &points))).await?;

    // The gateway of `node`, run locally, from its ConfigMap.
    let state = tempfile::tempdir()?;
    let listen: std::net::SocketAddr = ([127, 0, 0, 1], free_port()?).into();
    let listen_arg = listen.to_string();
    let _gateway = Proc(
        Command::new(bin_dir.join("fieldgate-gateway"))
            .args(["--configmap", &format!("fieldgate-gateway-{node}"), "--namespace", &ns, "--node", &node])
            .arg("--config")
            .arg(state.path().join("gateway.yaml"))
            .arg("--secrets-dir")
            .arg(state.path().join("secrets"))
            .args(["--nats-url", &nats.url(), "--listen", &listen_arg])
            .stdout(Stdio::null())
            .spawn()?,
    );

    // 1. Readings of meter-1 reach the cloud.
    let key = format!("{ns}/meter-1");
    let count = |cloud: &CloudSubscriber| cloud.keys().map(|ks| ks.iter().filter(|k| k.device == key).count());
    wait_until("readings of meter-1 at the cloud", WAIT, || {
        let n = count(&cloud);
        async move { Ok((n? >= 3).then_some(())) }
    })
    .await?;

    // 2. The gateway reports Reachable and its uplink entry.
    let d_api = devices.clone();
    wait_until("Device meter-1 Reachable=True", WAIT, || {
        let d_api = d_api.clone();
        async move {
            let d = serde_json::to_value(d_api.get("meter-1").await?)?;
            Ok((condition(&d, "Reachable").map(|c| c.0) == Some("True".into())).then_some(()))
        }
    })
    .await?;
    let u_api = uplinks.clone();
    let node2 = node.clone();
    wait_until("Uplink status entry of the node, connected", WAIT, || {
        let (u_api, node) = (u_api.clone(), node2.clone());
        async move {
            let u = serde_json::to_value(u_api.get("cloud").await?)?;
            let ok = u["status"]["gateways"]
                .as_array()
                .into_iter()
                .flatten()
                .any(|g| g["node"] == node.as_str() && g["connected"] == true);
            Ok(ok.then_some(()))
        }
    })
    .await?;

    // 3. A change propagates: a faster poll interval reaches the running gateway.
    devices.patch("meter-1", &pp, &Patch::Apply(device_json("meter-1", &node, port, "200ms", &points))).await?;
    let metrics_url = listen;
    wait_until("the gateway applied the changed config", WAIT, || {
        let addr = metrics_url;
        async move {
            let (_, text) = fieldgate_tests::metrics::http_get(addr, "/metrics").await?;
            let applied = fieldgate_tests::metric(&text, "fieldgate_config_reloads_total", &[("outcome", "applied")])
                .unwrap_or(0.0);
            Ok((applied >= 2.0).then_some(()))
        }
    })
    .await?;

    // 4. An invalid Device is refused with its field path and never reaches the gateway.
    devices.patch("broken", &pp, &Patch::Apply(device_json("broken", &node, port, "fast", &points))).await?;
    let d_api = devices.clone();
    wait_until("Device broken Configured=False naming spec.pollInterval", WAIT, || {
        let d_api = d_api.clone();
        async move {
            let d = serde_json::to_value(d_api.get("broken").await?)?;
            Ok(condition(&d, "Configured").filter(|c| c.0 == "False" && c.1.contains("spec.pollInterval")).map(|_| ()))
        }
    })
    .await?;
    let cms = Api::<ConfigMap>::namespaced(client.clone(), &ns);
    let cm = cms.get(&format!("fieldgate-gateway-{node}")).await?;
    assert!(!cm.data.unwrap_or_default()["gateway.yaml"].contains("broken"));

    // 5. Deleting the devices stops their readings at the cloud.
    devices.delete("broken", &DeleteParams::default()).await?;
    devices.delete("meter-1", &DeleteParams::default()).await?;
    let addr = listen;
    wait_until("the gateway applied the config without meter-1", WAIT, || async move {
        let (_, text) = fieldgate_tests::metrics::http_get(addr, "/metrics").await?;
        let applied =
            fieldgate_tests::metric(&text, "fieldgate_config_reloads_total", &[("outcome", "applied")]).unwrap_or(0.0);
        Ok((applied >= 3.0).then_some(()))
    })
    .await?;
    let settled = count(&cloud)?;
    let more = wait_until("no new readings of the deleted device", Duration::from_secs(10), || {
        let n = count(&cloud);
        async move { Ok((n? > settled + 1).then_some(())) }
    })
    .await;
    assert!(more.is_err(), "readings of a deleted device kept arriving");
    Ok(())
}
