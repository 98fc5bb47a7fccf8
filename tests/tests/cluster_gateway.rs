//! The gateway in a real cluster, with the operator. Runs when `KUBECONFIG` is set at build
//! time (see `build.rs`); otherwise ignored, with the reason in the test runner's summary.
//!
//! The operator (with its credentials endpoint on loopback, TLS) and the gateway run as local
//! processes against the cluster, in a namespace of the test's own
//! (`fieldgate_tests::cluster::TestCluster`: one cluster test at a time, everything undone on
//! success and failure); nats-server, mosquitto (the "cloud", password required) and a
//! simulated Modbus device run locally too, so the Device points at 127.0.0.1. The gateway's
//! identity is a ServiceAccount token bound to a pod on the node, as the kubelet would project
//! it. Checked: the node's config and its credentials (from the operator, for that token)
//! reach the gateway and readings reach the cloud; Reachable, Ready and the uplink's entry and
//! Ready; a changed Device applied by the running gateway (readings at the new poll interval
//! arrive); an invalid Device refused with its field path; a device that never connects
//! reported unreachable with the reason; another ServiceAccount or another audience refused
//! at the credentials endpoint; deleting the devices stops their readings.
//!
//! Needs `cargo build --workspace --bins` first.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::process::{Child, Command, Stdio};
use std::time::Duration;

use fieldgate_crds::node_objects::CREDENTIALS_AUDIENCE;
use fieldgate_crds::{Device, Uplink};
use fieldgate_gateway::credentials::{CredentialError, CredentialSettings, CredentialSource};
use fieldgate_tests::certs::TestPki;
use fieldgate_tests::cluster::{TestCluster, bound_pod, pod_token, service_account};
use fieldgate_tests::{CloudSubscriber, Mosquitto, MosquittoOptions, NatsServer, SimFleet, free_port, wait_until};
use k8s_openapi::api::core::v1::ConfigMap;
use kube::api::{Api, DeleteParams, Patch, PatchParams};
use serde_json::json;

const MANAGER: &str = "fieldgate-gateway-cluster-test";
const WAIT: Duration = Duration::from_secs(120);
const GATEWAY_SA: &str = "fieldgate-gateway";

struct Proc(Child);
impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn device_json(
    name: &str,
    node: &str,
    host: &str,
    port: u16,
    poll: &str,
    points: &serde_json::Value,
) -> serde_json::Value {
    json!({
        "apiVersion": "fieldgate.io/v1alpha1", "kind": "Device",
        "metadata": {"name": name, "labels": {"site": "test"}},
        "spec": {
            "connection": {"modbusTcp": {"host": host, "port": port, "timeout": "500ms"}},
            "pollInterval": poll,
            "placement": {"nodeName": node},
            "points": points,
        }
    })
}

/// `(status, reason, message)` of a condition of an object (as JSON).
fn condition(obj: &serde_json::Value, type_: &str) -> Option<(String, String, String)> {
    obj["status"]["conditions"].as_array()?.iter().find(|c| c["type"] == type_).map(|c| {
        let s = |k: &str| c[k].as_str().unwrap_or_default().to_string();
        (s("status"), s("reason"), s("message"))
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(not(fieldgate_cluster), ignore = "needs KUBECONFIG: a real cluster with a node (Kubernetes >= 1.30)")]
async fn operator_and_gateway_run_a_device_end_to_end_in_the_cluster() -> anyhow::Result<()> {
    let cluster = TestCluster::start("fieldgate-gw-test", MANAGER).await?;
    let (client, ns, node) = (cluster.client.clone(), cluster.namespace.clone(), cluster.node.clone());
    let state = tempfile::tempdir()?;

    // Local data path: NATS, the "cloud" (the gateway must log in) and one simulated device.
    let nats = NatsServer::start().await?;
    let options = MosquittoOptions { password: Some(("gw".into(), "s3cret".into())), ..MosquittoOptions::default() };
    let broker = Mosquitto::start_with(options).await?;
    let cloud = CloudSubscriber::start(&broker.url(), "cloud-cluster", "fieldgate/#").await?;
    let fleet = SimFleet::healthy(2).await?;
    let (port, port2) = (fleet.ports()[0], fleet.ports()[1]);
    let points = serde_json::to_value(fleet.points())?;

    // The credentials endpoint's TLS, and the gateway's identity: a token of its
    // ServiceAccount bound to a pod on the node.
    let pki = TestPki::generate()?;
    let file = |name: &str, text: &str| -> anyhow::Result<std::path::PathBuf> {
        let p = state.path().join(name);
        std::fs::write(&p, text)?;
        Ok(p)
    };
    let (cert, key, ca) =
        (file("tls.crt", &pki.server_cert)?, file("tls.key", &pki.server_key)?, file("ca.crt", &pki.ca_cert)?);
    service_account(&client, &ns, GATEWAY_SA, MANAGER).await?;
    let gateway_pod = bound_pod(&client, &ns, "gateway-identity", GATEWAY_SA, &node, MANAGER).await?;
    let token = file("token", &pod_token(&client, &ns, GATEWAY_SA, &gateway_pod, Some(CREDENTIALS_AUDIENCE)).await?)?;
    let credentials_port = free_port()?;
    let credentials_url = format!("https://127.0.0.1:{credentials_port}");

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
            .args(["--credentials-listen", &format!("127.0.0.1:{credentials_port}")])
            .arg("--credentials-tls-cert")
            .arg(&cert)
            .arg("--credentials-tls-key")
            .arg(&key)
            .args(["--gateway-service-account", &format!("{ns}/{GATEWAY_SA}")])
            .stdout(Stdio::null())
            .spawn()?,
    );

    let pp = PatchParams::apply(MANAGER).force();
    let secrets = Api::<k8s_openapi::api::core::v1::Secret>::namespaced(client.clone(), &ns);
    secrets
        .patch(
            "cloud-creds",
            &pp,
            &Patch::Apply(json!({"apiVersion": "v1", "kind": "Secret",
            "metadata": {"name": "cloud-creds"}, "stringData": {"username": "gw", "password": "s3cret"}})),
        )
        .await?;
    let uplinks = Api::<Uplink>::namespaced(client.clone(), &ns);
    uplinks
        .patch("cloud", &pp, &Patch::Apply(json!({
            "apiVersion": "fieldgate.io/v1alpha1", "kind": "Uplink", "metadata": {"name": "cloud"},
            "spec": {"deviceSelector": {"matchLabels": {"site": "test"}},
                     "mqtt": {"url": broker.secure_url().unwrap(), "protocolVersion": 5, "auth": {"secretRef": {"name": "cloud-creds"}}},
                     "buffer": {"redeliverAfter": "2s"}}})))
        .await?;
    let devices = Api::<Device>::namespaced(client.clone(), &ns);
    devices
        .patch("meter-1", &pp, &Patch::Apply(device_json("meter-1", &node, "127.0.0.1", port, "1s", &points)))
        .await?;
    devices
        .patch("meter-2", &pp, &Patch::Apply(device_json("meter-2", &node, "127.0.0.1", port2, "1s", &points)))
        .await?;

    // The gateway of `node`, run locally, from its ConfigMap and the credentials endpoint.
    let listen: std::net::SocketAddr = ([127, 0, 0, 1], free_port()?).into();
    let _gateway = Proc(
        Command::new(bin_dir.join("fieldgate-gateway"))
            .args(["--configmap", &format!("fieldgate-gateway-{node}"), "--namespace", &ns, "--node", &node])
            .arg("--config")
            .arg(state.path().join("state/gateway.yaml"))
            .arg("--secrets-dir")
            .arg(state.path().join("secrets"))
            .args(["--credentials-url", &credentials_url])
            .arg("--credentials-ca")
            .arg(&ca)
            .arg("--credentials-token-file")
            .arg(&token)
            .args(["--nats-url", &nats.url(), "--listen", &listen.to_string()])
            .stdout(Stdio::null())
            .spawn()?,
    );

    // 1. Readings of meter-1 reach the cloud, through the password the gateway got from the
    //    operator for its token.
    let slots_of = |cloud: &CloudSubscriber, device: &str| -> anyhow::Result<Vec<u64>> {
        let prefix = format!("{ns}/{device}/");
        Ok(cloud.keys()?.iter().filter_map(|k| k.id.strip_prefix(&prefix)?.parse().ok()).collect())
    };
    let slots = |cloud: &CloudSubscriber| slots_of(cloud, "meter-1");
    wait_until("readings of meter-1 at the cloud", WAIT, || {
        let n = slots(&cloud).map(|s| s.len());
        async move { Ok((n? >= 3).then_some(())) }
    })
    .await?;

    // 2. Reachable, Ready, the uplink's entry of the node, and the uplink's Ready.
    wait_until("Device meter-1 Reachable=True and Ready=True", WAIT, || {
        let devices = devices.clone();
        async move {
            let d = serde_json::to_value(devices.get("meter-1").await?)?;
            let ok = |t| condition(&d, t).is_some_and(|c| c.0 == "True");
            Ok((ok("Reachable") && ok("Ready")).then_some(()))
        }
    })
    .await?;
    wait_until("Uplink entry of the node connected, Uplink Ready=True", WAIT, || {
        let (uplinks, node) = (uplinks.clone(), node.clone());
        async move {
            let u = serde_json::to_value(uplinks.get("cloud").await?)?;
            let entry = u["status"]["gateways"]
                .as_array()
                .into_iter()
                .flatten()
                .any(|g| g["node"] == node.as_str() && g["connected"] == true);
            Ok((entry && condition(&u, "Ready").is_some_and(|c| c.0 == "True")).then_some(()))
        }
    })
    .await?;

    // 3. A change reaches the running gateway: at 200 ms, readings of poll slots that are no
    //    whole second arrive (at 1 s every slot is one).
    assert!(slots(&cloud)?.iter().all(|s| s % 1000 == 0), "1 s polls fall on whole seconds");
    devices
        .patch("meter-1", &pp, &Patch::Apply(device_json("meter-1", &node, "127.0.0.1", port, "200ms", &points)))
        .await?;
    wait_until("a reading polled at the changed interval", WAIT, || {
        let fast = slots(&cloud).map(|s| s.iter().filter(|s| *s % 1000 != 0).count());
        async move { Ok((fast? >= 3).then_some(())) }
    })
    .await?;

    // 4. An invalid Device is refused with its field path and never reaches the gateway.
    devices
        .patch("broken", &pp, &Patch::Apply(device_json("broken", &node, "127.0.0.1", port, "fast", &points)))
        .await?;
    wait_until("Device broken Configured=False naming spec.pollInterval", WAIT, || {
        let devices = devices.clone();
        async move {
            let d = serde_json::to_value(devices.get("broken").await?)?;
            Ok(condition(&d, "Configured").filter(|c| c.0 == "False" && c.2.contains("spec.pollInterval")).map(|_| ()))
        }
    })
    .await?;
    let cms = Api::<ConfigMap>::namespaced(client.clone(), &ns);
    let cm = cms.get(&format!("fieldgate-gateway-{node}")).await?;
    let yaml = cm.data.unwrap_or_default().remove("gateway.yaml").unwrap_or_default();
    let cfg = fieldgate_crds::GatewayConfig::from_yaml(&yaml)?;
    assert!(!cfg.devices.iter().any(|d| d.namespace == ns && d.name == "broken"));

    // 5. A device that never connects (its host does not resolve): Reachable=False with the
    //    reason, and Ready=False saying so.
    devices
        .patch("ghost", &pp, &Patch::Apply(device_json("ghost", &node, "no-such-host.invalid", 502, "1s", &points)))
        .await?;
    let (reachable, ready) = wait_until("Device ghost Reachable=False and Ready=False", WAIT, || {
        let devices = devices.clone();
        async move {
            let d = serde_json::to_value(devices.get("ghost").await?)?;
            let (r, ready) = (condition(&d, "Reachable"), condition(&d, "Ready"));
            Ok(r.zip(ready).filter(|(r, ready)| r.0 == "False" && ready.0 == "False"))
        }
    })
    .await?;
    assert_eq!(reachable.1, "ConnectFailed", "{reachable:?}");
    assert_eq!(ready.1, "Unreachable", "{ready:?}");
    assert!(ready.2.contains(&node) && ready.2.contains("ConnectFailed"), "{ready:?}");

    // 6. The credentials endpoint: the gateway's token gets its node's credentials and
    //    nothing else; another ServiceAccount's token bound to a pod on the same node, and a
    //    token for another audience, are refused.
    let ask = |token_file: std::path::PathBuf| {
        let settings = CredentialSettings { url: credentials_url.clone(), ca_file: ca.clone(), token_file };
        async move { CredentialSource::new(&settings)?.fetch().await }
    };
    let mine = ask(token.clone()).await?;
    assert_eq!(mine.node, node);
    assert!(mine.data.keys().all(|k| k.starts_with(&format!("{ns}_cloud-creds_"))), "{mine:?}");
    service_account(&client, &ns, "intruder", MANAGER).await?;
    let other_pod = bound_pod(&client, &ns, "intruder", "intruder", &node, MANAGER).await?;
    let other =
        file("other-token", &pod_token(&client, &ns, "intruder", &other_pod, Some(CREDENTIALS_AUDIENCE)).await?)?;
    let api_audience = file("api-token", &pod_token(&client, &ns, GATEWAY_SA, &gateway_pod, None).await?)?;
    for (token_file, code) in [(other, 403), (api_audience, 401)] {
        match ask(token_file.clone()).await {
            Err(CredentialError::Request(kube::Error::Api(s))) => {
                assert_eq!(s.code, code, "{}: {s:?}", token_file.display())
            }
            other => panic!("{}: expected a refusal ({code}), got {other:?}", token_file.display()),
        }
    }

    // 7. Deleting a device stops its readings at the cloud: once the gateway's config lost
    //    it (at `gone`), readings of meter-2 polled well after arrive, and none of meter-1
    //    polled after the gateway had time to apply the change (its watcher reads every 2 s).
    for name in ["broken", "ghost", "meter-1"] {
        devices.delete(name, &DeleteParams::default()).await?;
    }
    let config_copy = state.path().join("state/gateway.yaml");
    wait_until("the gateway's config without meter-1", WAIT, || {
        let path = config_copy.clone();
        async move {
            let cfg = fieldgate_crds::GatewayConfig::from_yaml(&std::fs::read_to_string(&path)?)?;
            Ok((cfg.devices.len() == 1 && cfg.devices[0].name == "meter-2").then_some(()))
        }
    })
    .await?;
    let gone = u64::try_from(std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH)?.as_millis())?;
    wait_until("a reading of meter-2 polled 8 s after meter-1 was gone", WAIT, || {
        let later = slots_of(&cloud, "meter-2").map(|s| s.iter().any(|t| *t >= gone + 8_000));
        async move { Ok(later?.then_some(())) }
    })
    .await?;
    let last = slots(&cloud)?.into_iter().max().unwrap_or(0);
    assert!(last < gone + 5_000, "meter-1 polled at {last}, {} ms after it was gone", last.saturating_sub(gone));

    drop((_gateway, _operator));
    cluster.cleanup().await
}
