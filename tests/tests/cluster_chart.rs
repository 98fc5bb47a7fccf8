//! The whole chart on a real cluster: `helm install` through the Helm v4 engine
//! (helm-python-sdk in `.venv`) into a namespace with Pod Security `restricted` and
//! `nats.storage.type=emptyDir`, the examples applied to another restricted namespace as they
//! are (`kubectl apply -n <ns> -f examples/ -R`: images replaced by the test's), readings at the
//! example broker, the gateway pod deleted mid-stream, a changed Device applied, and
//! `helm uninstall` leaving nothing of Fieldgate's but what is documented as kept.
//!
//! Runs when `KUBECONFIG` and the images (`FIELDGATE_TEST_GATEWAY_IMAGE`,
//! `FIELDGATE_TEST_OPERATOR_IMAGE`, `FIELDGATE_TEST_NATS_IMAGE`, `FIELDGATE_TEST_BROKER_IMAGE`,
//! each `repository:tag`, present on the nodes or pullable) are set at build time (see
//! `build.rs`); otherwise ignored, with the reason in the test runner's summary.
//!
//! The judge is the broker: a subscriber pod (the broker image's `mosquitto_sub`) prints what
//! the broker delivers, read through the pod's log. Nothing accepted is lost: every reading
//! carries `bufferSeq`, gap-free per uplink buffer (a gateway starting on an empty buffer
//! jumps forward once): the sequence at the broker has no hole but the one where the new pod
//! started, and the old pod's last readings were polled right before it was deleted.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, SystemTime};

use anyhow::{Context, Result, bail};
use fieldgate_crds::Device;
use fieldgate_tests::cluster::{RELEASE_PREFIX, TestCluster, pod_token, random_suffix};
use fieldgate_tests::wait_until;
use k8s_openapi::api::apps::v1::{DaemonSet, Deployment};
use k8s_openapi::api::authorization::v1::{ResourceAttributes, SubjectAccessReview, SubjectAccessReviewSpec};
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{ConfigMap, Pod, Secret, Service, ServiceAccount};
use k8s_openapi::api::rbac::v1::{ClusterRole, ClusterRoleBinding, Role, RoleBinding};
use kube::api::{Api, DeleteParams, DynamicObject, ListParams, LogParams, Patch, PatchParams, PostParams};
use kube::discovery::pinned_kind;
use kube::{Client, ResourceExt};
use serde_json::{Value, json};

const MANAGER: &str = "fieldgate-chart-cluster-test";
const WAIT: Duration = Duration::from_secs(300);
const RESTRICTED: [(&str, &str); 3] = [
    ("pod-security.kubernetes.io/enforce", "restricted"),
    ("pod-security.kubernetes.io/warn", "restricted"),
    ("pod-security.kubernetes.io/audit", "restricted"),
];

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn image(var: &str) -> Result<(String, String)> {
    let reference = std::env::var(var).with_context(|| format!("{var} is not set"))?;
    if reference.contains('@') {
        bail!("{var}={reference}: give repository:tag (the chart takes no digests)");
    }
    match reference.rsplit_once(':').filter(|(_, tag)| !tag.contains('/')) {
        Some((repo, tag)) => Ok((repo.to_string(), tag.to_string())),
        None => bail!("{var}={reference}: give repository:tag"),
    }
}

const HELM: &str = r#"
import json, sys
import helm_python as helm
action, args = sys.argv[1], json.loads(sys.argv[2])
out = {"error": None}
try:
    with helm.Config(namespace=args["namespace"]) as cfg:
        if action == "install":
            r = cfg.install(args["chart"], args["name"], args["values"], namespace=args["namespace"],
                            wait="watcher", timeout=args["timeout"])
            out["status"] = (r.get("info") or {}).get("status")
        else:
            cfg.uninstall(args["name"], wait="watcher", timeout=args["timeout"])
except helm.HelmError as e:
    out["error"] = f"{type(e).__name__}: {e}"
print(json.dumps(out))
"#;

/// Runs a Helm action through the Helm v4 engine of helm-python-sdk.
fn helm(action: &str, args: &Value) -> Result<Value> {
    let py = root().join(".venv/bin/python");
    let out = Command::new(&py).arg("-c").arg(HELM).arg(action).arg(args.to_string()).output()?;
    if !out.status.success() {
        bail!("helm {action}: {}", String::from_utf8_lossy(&out.stderr));
    }
    let v: Value = serde_json::from_slice(&out.stdout)?;
    if let Some(e) = v["error"].as_str() {
        bail!("helm {action}: {e}");
    }
    Ok(v)
}

/// Every document under examples/, as `kubectl apply -f examples/ -R` reads them.
fn example_documents() -> Result<Vec<Value>> {
    let mut out = Vec::new();
    let mut dirs = vec![root().join("examples")];
    while let Some(d) = dirs.pop() {
        for e in std::fs::read_dir(&d)?.flatten() {
            let p = e.path();
            if p.is_dir() {
                dirs.push(p);
            } else if p.extension().is_some_and(|x| x == "yaml" || x == "yml") {
                let docs: Vec<Value> = serde_saphyr::from_multiple(&std::fs::read_to_string(&p)?)?;
                out.extend(docs.into_iter().filter(|d| !d.is_null()));
            }
        }
    }
    Ok(out)
}

/// Replaces the images of a workload's containers: the example simulator runs from the
/// gateway image, the example broker from the broker image.
fn with_test_images(mut doc: Value, gateway: &str, broker: &str) -> Value {
    let spec = &mut doc["spec"]["template"]["spec"];
    for list in ["initContainers", "containers"] {
        for c in spec[list].as_array_mut().into_iter().flatten() {
            let current = c["image"].as_str().unwrap_or_default().to_string();
            if current.starts_with("fieldgate-gateway") {
                c["image"] = json!(gateway);
            } else if current.starts_with("eclipse-mosquitto") {
                c["image"] = json!(broker);
            }
        }
    }
    doc
}

/// Server-side applies `doc` into `namespace` (what `kubectl apply -n` does, with its own
/// field manager).
async fn apply(client: &Client, namespace: &str, doc: &Value) -> Result<()> {
    let api_version = doc["apiVersion"].as_str().context("apiVersion")?;
    let kind = doc["kind"].as_str().context("kind")?;
    let (group, version) = api_version.rsplit_once('/').unwrap_or(("", api_version));
    let (resource, _) = pinned_kind(client, &kube::api::GroupVersionKind::gvk(group, version, kind)).await?;
    let name = doc["metadata"]["name"].as_str().context("name")?;
    let api = Api::<DynamicObject>::namespaced_with(client.clone(), namespace, &resource);
    api.patch(name, &PatchParams::apply(MANAGER).force(), &Patch::Apply(doc)).await?;
    Ok(())
}

/// What the subscriber printed: the readings the broker delivered (`topic payload` lines).
async fn delivered(pods: &Api<Pod>) -> Result<Vec<Value>> {
    let log = pods.logs("cloud-subscriber", &LogParams::default()).await?;
    Ok(log
        .lines()
        .filter(|l| l.starts_with("fieldgate/"))
        .filter_map(|l| l.split_once(' ').and_then(|(_, p)| serde_json::from_str(p).ok()))
        .collect())
}

/// The poll slots (Unix ms) of `device`'s readings.
fn slots(readings: &[Value], device: &str) -> Vec<u64> {
    readings
        .iter()
        .filter(|r| r["device"] == device)
        .filter_map(|r| r["id"].as_str()?.rsplit('/').next()?.parse().ok())
        .collect()
}

fn unix_ms() -> u64 {
    SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}

/// `Kind name` of every object `api` lists with `lp`.
async fn names<K>(api: Api<K>, lp: &ListParams) -> Result<Vec<String>>
where
    K: kube::Resource<DynamicType = ()> + Clone + serde::de::DeserializeOwned + std::fmt::Debug,
{
    let kind = K::kind(&());
    Ok(api.list(lp).await?.items.iter().map(|o| format!("{kind} {}", o.name_any())).collect())
}

/// Whether the subject may `verb` `resource` (named `name`) in `namespace`.
async fn may(
    client: &Client,
    user: &str,
    groups: &[String],
    verb: &str,
    namespace: &str,
    name: Option<&str>,
) -> Result<bool> {
    let review = SubjectAccessReview {
        spec: SubjectAccessReviewSpec {
            user: Some(user.to_string()),
            groups: Some(groups.to_vec()),
            resource_attributes: Some(ResourceAttributes {
                namespace: Some(namespace.to_string()),
                verb: Some(verb.to_string()),
                resource: Some("secrets".into()),
                name: name.map(str::to_string),
                ..ResourceAttributes::default()
            }),
            ..SubjectAccessReviewSpec::default()
        },
        ..SubjectAccessReview::default()
    };
    let answer = Api::<SubjectAccessReview>::all(client.clone()).create(&PostParams::default(), &review).await?;
    Ok(answer.status.is_some_and(|s| s.allowed))
}

/// A client acting with `token` alone (no client certificate of the kubeconfig).
async fn client_with_token(token: &str) -> Result<Client> {
    let mut config = kube::Config::infer().await?;
    config.auth_info = serde_json::from_value(json!({"token": token}))?;
    Ok(Client::try_from(config)?)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(
    not(fieldgate_cluster_images),
    ignore = "needs KUBECONFIG and FIELDGATE_TEST_GATEWAY_IMAGE, FIELDGATE_TEST_OPERATOR_IMAGE, FIELDGATE_TEST_NATS_IMAGE, FIELDGATE_TEST_BROKER_IMAGE"
)]
async fn the_chart_installs_restricted_runs_the_examples_loses_nothing_and_uninstalls_clean() -> Result<()> {
    let (gw_image, op_image, nats_image, broker_image) = (
        image("FIELDGATE_TEST_GATEWAY_IMAGE")?,
        image("FIELDGATE_TEST_OPERATOR_IMAGE")?,
        image("FIELDGATE_TEST_NATS_IMAGE")?,
        image("FIELDGATE_TEST_BROKER_IMAGE")?,
    );
    let mut cluster = TestCluster::start("fgt-chart", MANAGER).await?;
    cluster.label_namespace(&RESTRICTED, MANAGER).await?;
    let examples_ns = cluster.namespace("examples", &RESTRICTED, MANAGER).await?;
    let (client, ns, node) = (cluster.client.clone(), cluster.namespace.clone(), cluster.node.clone());
    let release = format!("{RELEASE_PREFIX}{}", random_suffix());

    // 1. helm install, restricted, emptyDir, waiting until everything is ready.
    let values = json!({
        "operator": {"image": {"repository": op_image.0, "tag": op_image.1}, "logFormat": "text"},
        "gateway": {"image": {"repository": gw_image.0, "tag": gw_image.1}, "logFormat": "text"},
        "nats": {"image": {"repository": nats_image.0, "tag": nats_image.1}, "storage": {"type": "emptyDir"}},
    });
    let chart = root().join("charts/fieldgate");
    let installed =
        helm("install", &json!({"chart": chart, "name": release, "namespace": ns, "values": values, "timeout": 600}))?;
    assert_eq!(installed["status"], "deployed", "{installed}");

    // 2. No gateway identity may read a per-node Secret (its own node's or any other): RBAC
    //    says no, and a real request with the gateway ServiceAccount's token is refused.
    let gateway_sa = format!("{release}-gateway");
    let user = format!("system:serviceaccount:{ns}:{gateway_sa}");
    let groups = vec![
        "system:serviceaccounts".to_string(),
        format!("system:serviceaccounts:{ns}"),
        "system:authenticated".into(),
    ];
    for other in cluster.nodes().await? {
        let secret = format!("fieldgate-gateway-{other}");
        assert!(!may(&client, &user, &groups, "get", &ns, Some(&secret)).await?, "{user} may get {secret}");
    }
    assert!(!may(&client, &user, &groups, "list", &ns, None).await?, "{user} may list Secrets");
    assert!(!may(&client, &user, &groups, "watch", &ns, None).await?, "{user} may watch Secrets");
    let pods = Api::<Pod>::namespaced(client.clone(), &ns);
    let gateway_pod = |pods: Api<Pod>, node: String| async move {
        let lp = ListParams::default().labels("app.kubernetes.io/name=fieldgate-gateway");
        Ok::<_, anyhow::Error>(pods.list(&lp).await?.items.into_iter().find(|p| {
            p.spec.as_ref().and_then(|s| s.node_name.as_deref()) == Some(node.as_str())
                && p.metadata.deletion_timestamp.is_none()
        }))
    };
    let first_pod = gateway_pod(pods.clone(), node.clone()).await?.context("no gateway pod on the node")?;
    let token = pod_token(&client, &ns, &gateway_sa, &first_pod, None).await?;
    let as_gateway = client_with_token(&token).await?;
    let secrets_as_gateway = Api::<Secret>::namespaced(as_gateway, &ns);
    match secrets_as_gateway.get(&format!("fieldgate-gateway-{node}")).await {
        Err(kube::Error::Api(s)) => assert_eq!(s.code, 403, "{s:?}"),
        other => panic!("the gateway's identity read a per-node Secret: {:?}", other.map(|s| s.name_any())),
    }
    assert!(matches!(secrets_as_gateway.list(&ListParams::default()).await, Err(kube::Error::Api(s)) if s.code == 403));

    // 3. The subscriber first (the broker delivers to it from its first subscription on),
    //    then every example, as they are, into the other restricted namespace.
    let docs = example_documents()?;
    for doc in docs.iter().filter(|d| d["kind"] == "Secret" || d["kind"] == "ConfigMap") {
        apply(&client, &examples_ns, doc).await?;
    }
    let broker_ref = format!("{}:{}", broker_image.0, broker_image.1);
    let subscriber = json!({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "cloud-subscriber"},
        "spec": {"securityContext": {"runAsNonRoot": true, "runAsUser": 1883, "runAsGroup": 1883, "seccompProfile": {"type": "RuntimeDefault"}},
            "containers": [{"name": "sub", "image": broker_ref, "imagePullPolicy": "IfNotPresent",
                "command": ["sh", "-c", "until mosquitto_sub -h mosquitto -p 1883 -u \"$U\" -P \"$P\" -i fieldgate-test-sub -c -q 1 -v -t 'fieldgate/#'; do sleep 1; done"],
                "env": [{"name": "U", "valueFrom": {"secretKeyRef": {"name": "cloud-creds", "key": "username"}}},
                        {"name": "P", "valueFrom": {"secretKeyRef": {"name": "cloud-creds", "key": "password"}}}],
                "resources": {"requests": {"cpu": "10m", "memory": "16Mi"}, "limits": {"cpu": "200m", "memory": "64Mi"}},
                "securityContext": {"allowPrivilegeEscalation": false, "readOnlyRootFilesystem": true, "capabilities": {"drop": ["ALL"]}}}]}});
    apply(&client, &examples_ns, &subscriber).await?;
    for doc in docs.iter().filter(|d| d["kind"] != "Secret" && d["kind"] != "ConfigMap") {
        let gw_ref = format!("{}:{}", gw_image.0, gw_image.1);
        apply(&client, &examples_ns, &with_test_images(doc.clone(), &gw_ref, &broker_ref)).await?;
    }

    // 4. Readings of both example devices at the broker; Devices and the Uplink Ready.
    let ex_pods = Api::<Pod>::namespaced(client.clone(), &examples_ns);
    let (meter1, meter2) = ("meter-1", "meter-2");
    wait_until("readings of both example devices at the broker", WAIT, || {
        let ex_pods = ex_pods.clone();
        async move {
            let r = delivered(&ex_pods).await?;
            Ok((slots(&r, meter1).len() >= 5 && slots(&r, meter2).len() >= 3).then_some(()))
        }
    })
    .await?;
    let devices = Api::<Device>::namespaced(client.clone(), &examples_ns);
    wait_until("both example Devices Ready=True", WAIT, || {
        let devices = devices.clone();
        async move {
            let mut ready = 0;
            for d in devices.list(&ListParams::default()).await?.items {
                ready +=
                    usize::from(d.status.unwrap_or_default().condition("Ready").is_some_and(|c| c.status == "True"));
            }
            Ok((ready == 2).then_some(()))
        }
    })
    .await?;

    // 5. The gateway pod deleted mid-stream: readings resume from its successor, and nothing
    //    the old one delivered has a hole; its last readings were polled just before.
    let deleted_at = unix_ms();
    pods.delete(&first_pod.name_any(), &DeleteParams::default()).await?;
    let first_uid = first_pod.uid();
    wait_until("a new gateway pod ready on the node", WAIT, || {
        let (pods, node, first_uid) = (pods.clone(), node.clone(), first_uid.clone());
        async move {
            let Some(p) = gateway_pod(pods, node).await? else { return Ok(None) };
            let ready = p
                .status
                .as_ref()
                .and_then(|s| s.conditions.as_ref())
                .is_some_and(|cs| cs.iter().any(|c| c.type_ == "Ready" && c.status == "True"));
            Ok((p.uid() != first_uid && ready).then_some(()))
        }
    })
    .await?;
    let resumed_after = unix_ms();
    wait_until("readings polled by the new gateway pod", WAIT, || {
        let ex_pods = ex_pods.clone();
        async move {
            let r = delivered(&ex_pods).await?;
            Ok((slots(&r, meter1).iter().filter(|s| **s > resumed_after).count() >= 3).then_some(()))
        }
    })
    .await?;
    let readings = delivered(&ex_pods).await?;
    let seqs: BTreeSet<u64> = readings.iter().filter_map(|r| r["bufferSeq"].as_u64()).collect();
    let holes: Vec<(u64, u64)> =
        seqs.iter().zip(seqs.iter().skip(1)).filter(|(a, b)| **b != **a + 1).map(|(a, b)| (*a, *b)).collect();
    assert!(holes.len() <= 1, "bufferSeq has holes other than the new pod's start: {holes:?}");
    let before: Vec<u64> = slots(&readings, meter1).into_iter().filter(|s| *s < deleted_at).collect();
    let last_before = before.iter().max().copied().unwrap_or(0);
    assert!(
        last_before + 3_000 >= deleted_at,
        "the old pod's last delivered reading was polled {} ms before its deletion",
        deleted_at.saturating_sub(last_before)
    );

    // 6. A changed Device is applied: meter-1 polled every 500 ms.
    devices.patch(meter1, &PatchParams::default(), &Patch::Merge(json!({"spec": {"pollInterval": "500ms"}}))).await?;
    wait_until("readings of meter-1 at the changed interval", WAIT, || {
        let ex_pods = ex_pods.clone();
        async move {
            let r = delivered(&ex_pods).await?;
            Ok((slots(&r, meter1).iter().filter(|s| **s % 1000 == 500).count() >= 3).then_some(()))
        }
    })
    .await?;

    // 7. helm uninstall: nothing of the release or of what Fieldgate wrote stays in its
    //    namespace or cluster-wide; the CRDs and the user's objects stay (documented).
    helm("uninstall", &json!({"name": release, "namespace": ns, "timeout": 300}))?;
    let instance = format!("app.kubernetes.io/instance={release}");
    let left = || {
        let (client, ns, instance, release) = (client.clone(), ns.clone(), instance.clone(), release.clone());
        async move {
            let by_release = ListParams::default().labels(&instance);
            let written = ListParams::default().labels("app.kubernetes.io/managed-by=fieldgate-operator");
            let all = ListParams::default();
            let mut left = Vec::new();
            left.extend(names(Api::<ConfigMap>::namespaced(client.clone(), &ns), &written).await?);
            left.extend(names(Api::<Secret>::namespaced(client.clone(), &ns), &written).await?);
            left.extend(names(Api::<Lease>::namespaced(client.clone(), &ns), &all).await?);
            let release_secrets = names(Api::<Secret>::namespaced(client.clone(), &ns), &all).await?;
            left.extend(release_secrets.into_iter().filter(|n| n.contains(&release)));
            left.extend(names(Api::<ConfigMap>::namespaced(client.clone(), &ns), &by_release).await?);
            left.extend(names(Api::<Deployment>::namespaced(client.clone(), &ns), &by_release).await?);
            left.extend(names(Api::<DaemonSet>::namespaced(client.clone(), &ns), &by_release).await?);
            left.extend(names(Api::<Service>::namespaced(client.clone(), &ns), &by_release).await?);
            left.extend(names(Api::<ServiceAccount>::namespaced(client.clone(), &ns), &by_release).await?);
            left.extend(names(Api::<Role>::namespaced(client.clone(), &ns), &by_release).await?);
            left.extend(names(Api::<RoleBinding>::namespaced(client.clone(), &ns), &by_release).await?);
            left.extend(names(Api::<ClusterRole>::all(client.clone()), &by_release).await?);
            left.extend(names(Api::<ClusterRoleBinding>::all(client.clone()), &by_release).await?);
            left.extend(names(Api::<Pod>::namespaced(client.clone(), &ns), &all).await?);
            Ok::<_, anyhow::Error>(left)
        }
    };
    let after = wait_until("nothing of Fieldgate's left after helm uninstall", WAIT, || {
        let left = left();
        async move { Ok(left.await.ok().filter(Vec::is_empty)) }
    })
    .await;
    if after.is_err() {
        bail!("left after helm uninstall: {:?}", left().await?);
    }
    // Kept, as documented: the user's objects (with their status) and the CRDs.
    assert_eq!(devices.list(&ListParams::default()).await?.items.len(), 2);

    cluster.cleanup().await
}
