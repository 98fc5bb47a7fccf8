//! The operator against a real cluster. Runs when `KUBECONFIG` is set at build time (see
//! `build.rs`); otherwise ignored, with the reason in the test runner's summary.
//!
//! Two operator processes run locally with leader election in a namespace of the test's own
//! (`fieldgate_tests::cluster::TestCluster`: one cluster test at a time, everything undone on
//! success and failure), owning what they write through a Deployment of the test. Checked:
//! one leader; the per-node ConfigMap and Secret; Device conditions (Configured, Ready waiting
//! for a gateway, the message column); a change propagating; an invalid Device refused with
//! its field path; a Device's token Secret copied into the per-node Secret (and again when it
//! changes); a missing Secret refused with the reference's path; the leader killed and the
//! other one taking over; deleting every Device deleting the per-node objects; deleting the
//! owner Deployment removing everything the operators wrote. Devices are found by namespace
//! and name (other namespaces may hold Devices of the same names).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::process::{Child, Command, Stdio};
use std::time::Duration;

use fieldgate_crds::{Device, DeviceProfile, GatewayConfig, Uplink};
use fieldgate_tests::cluster::TestCluster;
use fieldgate_tests::wait_until;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{ConfigMap, Secret};
use kube::Api;
use kube::api::{DeleteParams, Patch, PatchParams};
use serde_json::json;

const MANAGER: &str = "fieldgate-cluster-test";
const WAIT: Duration = Duration::from_secs(60);

/// An operator process; killed by PID when dropped.
struct Operator(Child);

impl Drop for Operator {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn operator(ns: &str, identity: &str) -> Operator {
    Operator(
        Command::new(env!("CARGO_BIN_EXE_fieldgate-operator"))
            .args(["run", "--namespace", ns, "--identity", identity, "--owner-deployment", "fieldgate-operator"])
            .args(["--leader-election=true", "--listen", "127.0.0.1:0", "--debounce", "100ms"])
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .spawn()
            .unwrap(),
    )
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

/// The node's config as the ConfigMap holds it.
async fn node_config(cms: &Api<ConfigMap>, name: &str) -> anyhow::Result<Option<GatewayConfig>> {
    let Some(cm) = cms.get_opt(name).await? else { return Ok(None) };
    let yaml = cm.data.unwrap_or_default().remove("gateway.yaml").unwrap_or_default();
    Ok(Some(GatewayConfig::from_yaml(&yaml)?))
}

/// `(status, reason, message)` of a Device's condition.
async fn condition(devices: &Api<Device>, name: &str, type_: &str) -> anyhow::Result<Option<(String, String, String)>> {
    let s = devices.get(name).await?.status.unwrap_or_default();
    Ok(s.condition(type_).map(|c| (c.status.clone(), c.reason.clone(), c.message.clone())))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(not(fieldgate_cluster), ignore = "needs KUBECONFIG: a real cluster with a node")]
async fn operator_renders_configures_propagates_refuses_fails_over_and_cleans_up() -> anyhow::Result<()> {
    let cluster = TestCluster::start("fieldgate-op-test", MANAGER).await?;
    let (client, ns, node) = (cluster.client.clone(), cluster.namespace.clone(), cluster.node.clone());
    let pp = PatchParams::apply(MANAGER).force();

    // The owner of what the operators write (a Deployment that runs nothing).
    let deployments = Api::<Deployment>::namespaced(client.clone(), &ns);
    let owner = json!({"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "fieldgate-operator"},
        "spec": {"replicas": 0, "selector": {"matchLabels": {"app": "none"}},
            "template": {"metadata": {"labels": {"app": "none"}}, "spec": {"containers": [{"name": "none", "image": "none"}]}}}});
    deployments.patch("fieldgate-operator", &pp, &Patch::Apply(owner)).await?;
    let owner_uid = deployments.get("fieldgate-operator").await?.metadata.uid.unwrap();

    let mut operators = vec![Some(operator(&ns, "op-a")), Some(operator(&ns, "op-b"))];
    let leases = Api::<Lease>::namespaced(client.clone(), &ns);
    let leader = wait_until("a leader", WAIT, || {
        let leases = leases.clone();
        async move {
            let l = leases.get_opt("fieldgate-operator").await?;
            Ok(l.and_then(|l| l.spec?.holder_identity).filter(|h| !h.is_empty()))
        }
    })
    .await?;

    let profiles = Api::<DeviceProfile>::namespaced(client.clone(), &ns);
    let profile = json!({"apiVersion": "fieldgate.io/v1alpha1", "kind": "DeviceProfile", "metadata": {"name": "meter"},
        "spec": {"points": [{"name": "energy", "type": "uint32", "modbus": {"table": "holding", "address": 0}}]}});
    profiles.patch("meter", &pp, &Patch::Apply(&profile)).await?;
    let uplinks = Api::<Uplink>::namespaced(client.clone(), &ns);
    let uplink = json!({"apiVersion": "fieldgate.io/v1alpha1", "kind": "Uplink", "metadata": {"name": "cloud"},
        "spec": {"deviceSelector": {"matchLabels": {"site": "test"}}, "mqtt": {"url": "mqtt://broker.example:1883"}}});
    uplinks.patch("cloud", &pp, &Patch::Apply(&uplink)).await?;
    let devices = Api::<Device>::namespaced(client.clone(), &ns);
    devices.patch("meter-1", &pp, &Patch::Apply(device("meter-1", "1s"))).await?;

    // 1. The node's ConfigMap holds this namespace's meter-1, owned by the Deployment; the
    //    Device says where, that it is configured, and that Ready waits for its gateway.
    let cms = Api::<ConfigMap>::namespaced(client.clone(), &ns);
    let cm_name = format!("fieldgate-gateway-{node}");
    let ours =
        |cfg: &GatewayConfig, name: &str| cfg.devices.iter().find(|d| d.namespace == ns && d.name == name).cloned();
    let first_version = wait_until("the node's ConfigMap with meter-1", WAIT, || {
        let (cms, cm_name) = (cms.clone(), cm_name.clone());
        async move {
            let Some(cfg) = node_config(&cms, &cm_name).await? else { return Ok(None) };
            Ok(ours(&cfg, "meter-1").and(cfg.version))
        }
    })
    .await?;
    let cm = cms.get(&cm_name).await?;
    let owners = cm.metadata.owner_references.unwrap_or_default();
    assert_eq!(
        owners.iter().map(|o| (o.kind.as_str(), o.uid.as_str())).collect::<Vec<_>>(),
        [("Deployment", owner_uid.as_str())]
    );
    let lease = leases.get("fieldgate-operator").await?;
    assert!(
        lease.metadata.owner_references.unwrap_or_default().iter().any(|o| o.uid == owner_uid),
        "the Lease goes with the owner"
    );
    wait_until("meter-1 Configured=True on the node, Ready waiting for a gateway", WAIT, || {
        let (devices, node) = (devices.clone(), node.clone());
        async move {
            let s = devices.get("meter-1").await?.status.unwrap_or_default();
            let configured = s.condition("Configured").is_some_and(|c| c.status == "True");
            let ready = s.condition("Ready").is_some_and(|c| c.status == "Unknown" && c.reason == "AwaitingGateway");
            Ok((s.node.as_deref() == Some(node.as_str()) && configured && ready).then_some(()))
        }
    })
    .await?;

    // 2. A change propagates: a new version with the new poll interval.
    devices.patch("meter-1", &pp, &Patch::Apply(device("meter-1", "5s"))).await?;
    wait_until("the change in the ConfigMap", WAIT, || {
        let (cms, cm_name, first) = (cms.clone(), cm_name.clone(), first_version.clone());
        async move {
            let Some(cfg) = node_config(&cms, &cm_name).await? else { return Ok(None) };
            let changed =
                ours(&cfg, "meter-1").is_some_and(|d| d.poll_interval.as_ref().map(|p| p.as_str()) == Some("5s"));
            Ok((changed && cfg.version.is_some_and(|v| v != first)).then_some(()))
        }
    })
    .await?;

    // 3. An invalid Device is refused with its field path, in Configured and in Ready's message
    //    (the -o wide column), and never reaches the node.
    devices.patch("broken", &pp, &Patch::Apply(device("broken", "fast"))).await?;
    let (configured, ready) = wait_until("broken Configured=False", WAIT, || {
        let devices = devices.clone();
        async move {
            let c = condition(&devices, "broken", "Configured").await?;
            let r = condition(&devices, "broken", "Ready").await?;
            Ok(c.zip(r).filter(|(c, _)| c.0 == "False"))
        }
    })
    .await?;
    assert!(configured.2.contains("spec.pollInterval"), "{configured:?}");
    assert_eq!((ready.0.as_str(), ready.1.as_str()), ("False", "NotConfigured"));
    assert!(ready.2.contains("spec.pollInterval"), "{ready:?}");
    let cfg = node_config(&cms, &cm_name).await?.unwrap();
    assert!(ours(&cfg, "broken").is_none());

    // 4. A device's token Secret reaches the node's Secret under the per-node layout, the
    //    node's config names the copy, and a change to the Secret is copied again.
    let secrets = Api::<Secret>::namespaced(client.clone(), &ns);
    let token = |value: &str| {
        json!({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "pusher-token"},
            "stringData": {"token": value, "unrelated": "never copied"}})
    };
    secrets.patch("pusher-token", &pp, &Patch::Apply(token("first"))).await?;
    devices.patch("pusher", &pp, &Patch::Apply(tcp_device("pusher", "pusher-token"))).await?;
    let data_key = format!("{ns}_pusher-token_token");
    let node_secret = |wanted: &'static str| {
        let (secrets, name, data_key) = (secrets.clone(), cm_name.clone(), data_key.clone());
        async move {
            let Some(s) = secrets.get_opt(&name).await? else { return Ok(None) };
            let data = s.data.unwrap_or_default();
            Ok(data.get(&data_key).is_some_and(|v| v.0 == wanted.as_bytes()).then_some(()))
        }
    };
    wait_until("the token in the node's Secret", WAIT, || node_secret("first")).await?;
    let cfg = node_config(&cms, &cm_name).await?.unwrap();
    let pusher = ours(&cfg, "pusher").expect("pusher in the node's config");
    let fieldgate_crds::Connection::Tcp(raw) = &pusher.connection else { panic!("{:?}", pusher.connection) };
    assert_eq!(raw.token_secret_ref.name, format!("{ns}_pusher-token"));
    secrets.patch("pusher-token", &pp, &Patch::Apply(token("second"))).await?;
    wait_until("the changed token in the node's Secret", WAIT, || node_secret("second")).await?;
    let s = secrets.get(&cm_name).await?;
    assert!(!s.data.unwrap_or_default().keys().any(|k| k.ends_with("_unrelated")), "only referenced keys");

    // 5. A Device whose Secret does not exist is refused with the reference's path; the others run.
    devices.patch("no-token", &pp, &Patch::Apply(tcp_device("no-token", "missing-token"))).await?;
    let c = wait_until("no-token Configured=False", WAIT, || {
        let devices = devices.clone();
        async move { Ok(condition(&devices, "no-token", "Configured").await?.filter(|c| c.0 == "False")) }
    })
    .await?;
    assert!(c.2.contains("spec.connection.tcp.tokenSecretRef.name"), "{c:?}");
    assert_eq!(condition(&devices, "pusher", "Configured").await?.unwrap().0, "True");

    // 6. The leader dies: the other operator takes over (within the Lease's 15 s and a
    //    renewal) and applies the next change.
    let index = usize::from(leader == "op-b");
    operators[index] = None;
    let follower = if leader == "op-a" { "op-b" } else { "op-a" };
    wait_until("the other operator holding the Lease", Duration::from_secs(90), || {
        let leases = leases.clone();
        async move {
            let l = leases.get("fieldgate-operator").await?;
            Ok((l.spec.and_then(|s| s.holder_identity).as_deref() == Some(follower)).then_some(()))
        }
    })
    .await?;
    devices.patch("meter-1", &pp, &Patch::Apply(device("meter-1", "7s"))).await?;
    wait_until("the new leader's change in the ConfigMap", WAIT, || {
        let (cms, cm_name) = (cms.clone(), cm_name.clone());
        async move {
            let Some(cfg) = node_config(&cms, &cm_name).await? else { return Ok(None) };
            Ok(ours(&cfg, "meter-1").filter(|d| d.poll_interval.as_ref().map(|p| p.as_str()) == Some("7s")).map(|_| ()))
        }
    })
    .await?;

    // 7. Deleting every Device deletes the node's ConfigMap and Secret.
    for name in ["meter-1", "broken", "pusher", "no-token"] {
        devices.delete(name, &DeleteParams::default()).await?;
    }
    wait_until("the node's objects deleted", WAIT, || {
        let (cms, secrets, name) = (cms.clone(), secrets.clone(), cm_name.clone());
        async move { Ok((cms.get_opt(&name).await?.is_none() && secrets.get_opt(&name).await?.is_none()).then_some(())) }
    })
    .await?;

    // 8. Removing the owner removes what the operators wrote: recreate a config, stop the
    //    operators, delete the Deployment, and the garbage collector takes the rest.
    devices.patch("meter-1", &pp, &Patch::Apply(device("meter-1", "1s"))).await?;
    wait_until("the node's ConfigMap again", WAIT, || {
        let (cms, cm_name) = (cms.clone(), cm_name.clone());
        async move { Ok(cms.get_opt(&cm_name).await?.map(|_| ())) }
    })
    .await?;
    operators.clear();
    deployments.delete("fieldgate-operator", &DeleteParams::background()).await?;
    wait_until("nothing the operators wrote left", Duration::from_secs(120), || {
        let (cms, secrets, leases, name) = (cms.clone(), secrets.clone(), leases.clone(), cm_name.clone());
        async move {
            let left = cms.get_opt(&name).await?.is_some()
                || secrets.get_opt(&name).await?.is_some()
                || leases.get_opt("fieldgate-operator").await?.is_some();
            Ok((!left).then_some(()))
        }
    })
    .await?;

    cluster.cleanup().await
}
