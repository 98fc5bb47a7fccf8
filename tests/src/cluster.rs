//! For tests that run against a real cluster (`KUBECONFIG`): one test at a time, each in a
//! namespace of its own, everything undone on success and on failure, so a cluster can run
//! them again and again.
//!
//! - **One at a time.** Tests take the Lease `fieldgate-cluster-tests` in `default` (waiting
//!   for it; a holder that died releases it after [`LOCK_DURATION`]): they share the CRDs, a
//!   node's `fieldgate.io/gateway` label and every Device in the cluster (an operator watches
//!   all namespaces).
//! - **A namespace of its own** (`<prefix>-<random>`, labelled [`TEST_LABEL`]); namespaces and
//!   cluster-wide objects left by a test process that died are removed before the next test
//!   starts.
//! - **A gateway node**: a node already labelled `fieldgate.io/gateway=true`, or the first node,
//!   labelled for the test and unlabelled afterwards (marked [`LABELLED_BY_TESTS`], so a later
//!   run also removes a label a dead run left).
//! - **Undone**: [`TestCluster::cleanup`] at the end of a test (deletes the namespace and waits
//!   until it is gone, unlabels, releases the lock, and fails the test if it could not);
//!   `Drop` does the same on a failed test, from a thread with a runtime and a client of its
//!   own (the test's client belongs to the test's runtime, blocked in the drop), bounded in
//!   time.
//!
//! They refuse to run next to another Fieldgate operator: it would write the test's Device
//! status and run the test's devices too.

use std::time::Duration;

use anyhow::{Context, Result, bail};
use fieldgate_crds::{Device, DeviceProfile, Uplink};
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::api::core::v1::{Namespace, Node};
use k8s_openapi::api::rbac::v1::{ClusterRole, ClusterRoleBinding};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, DeleteParams, ListParams, ObjectMeta, Patch, PatchParams, PostParams};
use kube::{Client, CustomResourceExt, ResourceExt};
use serde_json::json;

use crate::wait_until;

/// Label of every namespace a cluster test creates.
pub const TEST_LABEL: &str = "test.fieldgate.io/cluster-test";
/// Annotation on a node whose gateway label the tests added.
pub const LABELLED_BY_TESTS: &str = "test.fieldgate.io/labelled";
/// Prefix of the Helm release names of the tests: cluster-wide objects of a release whose
/// test died (`app.kubernetes.io/instance=fgt-...`) are removed before the next test.
pub const RELEASE_PREFIX: &str = "fgt-";
/// How long the lock is held at most (a test that died releases it by expiring).
pub const LOCK_DURATION: Duration = Duration::from_secs(20 * 60);
/// How long a test waits for the lock.
const LOCK_WAIT: Duration = Duration::from_secs(30 * 60);
/// Namespace and name of the lock.
const LOCK: (&str, &str) = ("default", "fieldgate-cluster-tests");
/// Longest time the clean-up of a failed test takes.
const DROP_CLEANUP: Duration = Duration::from_secs(120);

/// A short random suffix for names (`[a-z0-9]`, six characters).
pub fn random_suffix() -> String {
    use rand::Rng;
    const ALPHABET: &[u8] = b"abcdefghijklmnopqrstuvwxyz0123456789";
    let mut rng = rand::rng();
    (0..6).map(|_| ALPHABET[rng.random_range(0..ALPHABET.len())] as char).collect()
}

/// A namespace and a gateway node of one test, and the lock that keeps other tests out.
pub struct TestCluster {
    /// The API client.
    pub client: Client,
    /// The test's namespace.
    pub namespace: String,
    /// A node labelled `fieldgate.io/gateway=true`.
    pub node: String,
    /// More namespaces of the test ([`TestCluster::namespace`]).
    extra: Vec<String>,
    unlabel: Option<String>,
    done: bool,
}

impl TestCluster {
    /// Takes the lock, clears what dead test runs left, applies the CRDs (waiting until
    /// established), creates the namespace `<prefix>-<random>` and picks a gateway node.
    pub async fn start(prefix: &str, manager: &str) -> Result<Self> {
        let client = Client::try_default().await.context("building a client from KUBECONFIG")?;
        let namespace = format!("{prefix}-{}", random_suffix());
        acquire_lock(&client, &namespace).await?;
        let mut cluster =
            Self { client, namespace, node: String::new(), extra: Vec::new(), unlabel: None, done: false };
        cluster.prepare(manager).await?;
        Ok(cluster)
    }

    async fn prepare(&mut self, manager: &str) -> Result<()> {
        let client = self.client.clone();
        remove_leftovers(&client).await?;
        refuse_other_operators(&client).await?;
        let crds = Api::<CustomResourceDefinition>::all(client.clone());
        for crd in [Device::crd(), DeviceProfile::crd(), Uplink::crd()] {
            let name = crd.name_any();
            crds.patch(&name, &PatchParams::apply(manager).force(), &Patch::Apply(&crd)).await?;
            wait_until(&format!("CRD {name} established"), Duration::from_secs(60), || {
                let (crds, name) = (crds.clone(), name.clone());
                async move {
                    let c = crds.get(&name).await?;
                    let ok = c
                        .status
                        .and_then(|s| s.conditions)
                        .is_some_and(|cs| cs.iter().any(|c| c.type_ == "Established" && c.status == "True"));
                    Ok(ok.then_some(()))
                }
            })
            .await?;
        }
        create_namespace(&client, &self.namespace, &[], manager).await?;
        let nodes = Api::<Node>::all(client.clone());
        let list = nodes.list(&ListParams::default()).await?;
        let labelled = |n: &&Node| n.labels().get("fieldgate.io/gateway").map(String::as_str) == Some("true");
        let (node, unlabel) = match list.items.iter().find(labelled) {
            Some(n) if n.annotations().contains_key(LABELLED_BY_TESTS) => (n.name_any(), Some(n.name_any())),
            Some(n) => (n.name_any(), None),
            None => {
                let n = list.items.first().context("the cluster has no node")?.name_any();
                let patch = json!({"metadata": {"labels": {"fieldgate.io/gateway": "true"},
                    "annotations": {LABELLED_BY_TESTS: "true"}}});
                nodes.patch(&n, &PatchParams::default(), &Patch::Merge(&patch)).await?;
                (n.clone(), Some(n))
            }
        };
        self.node = node;
        self.unlabel = unlabel;
        Ok(())
    }

    /// Another namespace for this test, `<namespace>-<suffix>`, with `labels` (such as a Pod
    /// Security level); removed with the test's own.
    pub async fn namespace(&mut self, suffix: &str, labels: &[(&str, &str)], manager: &str) -> Result<String> {
        let name = format!("{}-{suffix}", self.namespace);
        self.extra.push(name.clone());
        create_namespace(&self.client, &name, labels, manager).await?;
        Ok(name)
    }

    /// Labels the test's own namespace (such as with a Pod Security level).
    pub async fn label_namespace(&self, labels: &[(&str, &str)], manager: &str) -> Result<()> {
        create_namespace(&self.client, &self.namespace, labels, manager).await
    }

    /// Every node of the cluster, the gateway node first.
    pub async fn nodes(&self) -> Result<Vec<String>> {
        let mut names: Vec<String> = Api::<Node>::all(self.client.clone())
            .list(&ListParams::default())
            .await?
            .items
            .iter()
            .map(|n| n.name_any())
            .collect();
        names.sort_by_key(|n| *n != self.node);
        Ok(names)
    }

    /// Undoes the test (namespace deleted and gone, node unlabelled, lock released); fails
    /// when it could not.
    pub async fn cleanup(mut self) -> Result<()> {
        self.done = true;
        let mut namespaces = std::mem::take(&mut self.extra);
        namespaces.push(self.namespace.clone());
        undo(&self.client, &namespaces, self.unlabel.take()).await
    }
}

impl Drop for TestCluster {
    fn drop(&mut self) {
        if self.done {
            return;
        }
        let mut namespaces = std::mem::take(&mut self.extra);
        namespaces.push(self.namespace.clone());
        let unlabel = self.unlabel.take();
        // The test's runtime is blocked in this drop, and its client with it: a runtime and a
        // client of our own, on a thread of our own.
        let cleaned = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().ok()?;
            rt.block_on(async move {
                let client = Client::try_default().await.ok()?;
                tokio::time::timeout(DROP_CLEANUP, undo(&client, &namespaces, unlabel)).await.ok()?.ok()
            })
        })
        .join();
        if !matches!(cleaned, Ok(Some(()))) {
            eprintln!(
                "cluster test clean-up incomplete for namespace {}; the next cluster test removes what is left",
                self.namespace
            );
        }
    }
}

/// A namespace labelled [`TEST_LABEL`] and `labels`.
async fn create_namespace(client: &Client, name: &str, labels: &[(&str, &str)], manager: &str) -> Result<()> {
    let mut all: serde_json::Map<String, serde_json::Value> =
        labels.iter().map(|(k, v)| (k.to_string(), json!(v))).collect();
    all.insert(TEST_LABEL.into(), json!("true"));
    let ns = json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name, "labels": all}});
    Api::<Namespace>::all(client.clone()).patch(name, &PatchParams::apply(manager), &Patch::Apply(ns)).await?;
    Ok(())
}

/// Deletes the namespaces (waiting until they are gone), unlabels the node, releases the lock
/// (held under the name of the last namespace, the test's own).
async fn undo(client: &Client, namespaces: &[String], unlabel: Option<String>) -> Result<()> {
    let api = Api::<Namespace>::all(client.clone());
    let mut gone = Ok(());
    for ns in namespaces {
        if let Err(e) = delete_namespace(&api, ns).await {
            gone = Err(e);
        }
    }
    let namespace = namespaces.last().map(String::as_str).unwrap_or_default();
    if let Some(node) = unlabel {
        let patch =
            json!({"metadata": {"labels": {"fieldgate.io/gateway": null}, "annotations": {LABELLED_BY_TESTS: null}}});
        Api::<Node>::all(client.clone()).patch(&node, &PatchParams::default(), &Patch::Merge(&patch)).await?;
    }
    release_lock(client, namespace).await?;
    gone
}

async fn delete_namespace(namespaces: &Api<Namespace>, name: &str) -> Result<()> {
    match namespaces.delete(name, &DeleteParams::foreground()).await {
        Ok(_) => {}
        Err(kube::Error::Api(s)) if s.code == 404 => return Ok(()),
        Err(e) => return Err(e.into()),
    }
    wait_until(&format!("namespace {name} gone"), Duration::from_secs(180), || {
        let namespaces = namespaces.clone();
        let name = name.to_string();
        async move { Ok(namespaces.get_opt(&name).await?.is_none().then_some(())) }
    })
    .await
}

/// Namespaces and cluster-wide objects of test runs that died, while no test runs (the lock
/// is held).
async fn remove_leftovers(client: &Client) -> Result<()> {
    let namespaces = Api::<Namespace>::all(client.clone());
    for ns in namespaces.list(&ListParams::default().labels(&format!("{TEST_LABEL}=true"))).await?.items {
        delete_namespace(&namespaces, &ns.name_any()).await?;
    }
    let stale = |o: &ObjectMeta| {
        o.labels
            .as_ref()
            .and_then(|l| l.get("app.kubernetes.io/instance"))
            .is_some_and(|i| i.starts_with(RELEASE_PREFIX))
    };
    let lp = ListParams::default().labels("app.kubernetes.io/part-of=fieldgate");
    let roles = Api::<ClusterRole>::all(client.clone());
    for r in roles.list(&lp).await?.items.into_iter().filter(|r| stale(&r.metadata)) {
        roles.delete(&r.name_any(), &DeleteParams::default()).await?;
    }
    let bindings = Api::<ClusterRoleBinding>::all(client.clone());
    for b in bindings.list(&lp).await?.items.into_iter().filter(|b| stale(&b.metadata)) {
        bindings.delete(&b.name_any(), &DeleteParams::default()).await?;
    }
    Ok(())
}

/// Fails when a Fieldgate operator not started by a test runs in the cluster.
async fn refuse_other_operators(client: &Client) -> Result<()> {
    let deployments = Api::<Deployment>::all(client.clone());
    let lp = ListParams::default().labels("app.kubernetes.io/name=fieldgate-operator");
    if let Some(d) = deployments.list(&lp).await?.items.first() {
        bail!(
            "a Fieldgate operator runs in the cluster (Deployment {}/{}): it would manage the tests' Devices too; \
             run the cluster tests on a cluster without another Fieldgate",
            d.namespace().unwrap_or_default(),
            d.name_any()
        );
    }
    Ok(())
}

fn lock_spec(holder: &str) -> LeaseSpec {
    LeaseSpec {
        holder_identity: Some(holder.to_string()),
        lease_duration_seconds: i32::try_from(LOCK_DURATION.as_secs()).ok(),
        renew_time: Some(MicroTime(Timestamp::now())),
        ..LeaseSpec::default()
    }
}

/// Waits for the lock and takes it.
async fn acquire_lock(client: &Client, holder: &str) -> Result<()> {
    let leases = Api::<Lease>::namespaced(client.clone(), LOCK.0);
    wait_until("the cluster tests' lock", LOCK_WAIT, || {
        let leases = leases.clone();
        async move {
            let Some(mut lease) = leases.get_opt(LOCK.1).await? else {
                let lease = Lease {
                    metadata: ObjectMeta { name: Some(LOCK.1.into()), ..ObjectMeta::default() },
                    spec: Some(lock_spec(holder)),
                };
                return match leases.create(&PostParams::default(), &lease).await {
                    Ok(_) => Ok(Some(())),
                    Err(kube::Error::Api(s)) if s.code == 409 => Ok(None),
                    Err(e) => Err(e.into()),
                };
            };
            let spec = lease.spec.clone().unwrap_or_default();
            let free = spec.holder_identity.as_deref().is_none_or(str::is_empty)
                || spec.renew_time.is_none_or(|t| {
                    let expires = t.0
                        + k8s_openapi::jiff::SignedDuration::from_secs(i64::from(
                            spec.lease_duration_seconds.unwrap_or(0),
                        ));
                    expires < Timestamp::now()
                });
            if !free {
                return Ok(None);
            }
            lease.spec = Some(lock_spec(holder));
            match leases.replace(LOCK.1, &PostParams::default(), &lease).await {
                Ok(_) => Ok(Some(())),
                Err(kube::Error::Api(s)) if s.code == 409 => Ok(None),
                Err(e) => Err(e.into()),
            }
        }
    })
    .await
}

/// Releases the lock if `holder` holds it.
async fn release_lock(client: &Client, holder: &str) -> Result<()> {
    let leases = Api::<Lease>::namespaced(client.clone(), LOCK.0);
    let Some(mut lease) = leases.get_opt(LOCK.1).await? else { return Ok(()) };
    let mut spec = lease.spec.clone().unwrap_or_default();
    if spec.holder_identity.as_deref() != Some(holder) {
        return Ok(());
    }
    spec.holder_identity = None;
    lease.spec = Some(spec);
    leases.replace(LOCK.1, &PostParams::default(), &lease).await?;
    Ok(())
}

/// A ServiceAccount `name` in `namespace` (created if missing).
pub async fn service_account(client: &Client, namespace: &str, name: &str, manager: &str) -> Result<()> {
    let sa = json!({"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": name}});
    Api::<k8s_openapi::api::core::v1::ServiceAccount>::namespaced(client.clone(), namespace)
        .patch(name, &PatchParams::apply(manager), &Patch::Apply(sa))
        .await?;
    Ok(())
}

/// A pod of ServiceAccount `sa` bound to `node` (it need not run: it is what a token is bound
/// to). Image: `FIELDGATE_TEST_PAUSE_IMAGE`, else `registry.k8s.io/pause:3.10` (the sandbox
/// image of most nodes); Pod Security "restricted" settings.
pub async fn bound_pod(
    client: &Client,
    namespace: &str,
    name: &str,
    sa: &str,
    node: &str,
    manager: &str,
) -> Result<k8s_openapi::api::core::v1::Pod> {
    let image = std::env::var("FIELDGATE_TEST_PAUSE_IMAGE").unwrap_or_else(|_| "registry.k8s.io/pause:3.10".into());
    let pod = json!({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name},
        "spec": {"nodeName": node, "serviceAccountName": sa, "automountServiceAccountToken": false,
            "securityContext": {"runAsNonRoot": true, "runAsUser": 65535, "seccompProfile": {"type": "RuntimeDefault"}},
            "containers": [{"name": "pause", "image": image, "imagePullPolicy": "IfNotPresent",
                "resources": {"requests": {"cpu": "1m", "memory": "4Mi"}, "limits": {"cpu": "10m", "memory": "16Mi"}},
                "securityContext": {"allowPrivilegeEscalation": false, "readOnlyRootFilesystem": true,
                    "capabilities": {"drop": ["ALL"]}}}]}});
    let pods = Api::<k8s_openapi::api::core::v1::Pod>::namespaced(client.clone(), namespace);
    Ok(pods.patch(name, &PatchParams::apply(manager), &Patch::Apply(pod)).await?)
}

/// A token of ServiceAccount `sa` for `audience` (`None`: the API server's own), bound to
/// `pod` (so it names the pod's node).
pub async fn pod_token(
    client: &Client,
    namespace: &str,
    sa: &str,
    pod: &k8s_openapi::api::core::v1::Pod,
    audience: Option<&str>,
) -> Result<String> {
    use k8s_openapi::api::authentication::v1::{BoundObjectReference, TokenRequest, TokenRequestSpec};
    let request = TokenRequest {
        spec: Some(TokenRequestSpec {
            audiences: audience.map(|a| vec![a.to_string()]),
            expiration_seconds: Some(3600),
            bound_object_ref: Some(BoundObjectReference {
                api_version: Some("v1".into()),
                kind: Some("Pod".into()),
                name: Some(pod.name_any()),
                uid: pod.uid(),
            }),
            ..TokenRequestSpec::default()
        }),
        ..TokenRequest::default()
    };
    let api = Api::<k8s_openapi::api::core::v1::ServiceAccount>::namespaced(client.clone(), namespace);
    let answer = api.create_token_request(sa, &PostParams::default(), &request).await?;
    answer.status.and_then(|s| s.token).context("the TokenRequest came back without a token")
}
