//! For tests that run against a real cluster (only when `KUBECONFIG` is set): the CRDs applied
//! and established, a namespace of the test's own and a gateway node, all undone on drop.

use std::time::Duration;

use anyhow::{Context, Result};
use fieldgate_crds::{Device, DeviceProfile, Uplink};
use k8s_openapi::api::core::v1::{Namespace, Node};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{Api, DeleteParams, Patch, PatchParams};
use kube::{Client, CustomResourceExt, ResourceExt};
use serde_json::json;

use crate::wait_until;

/// Whether to skip: no `KUBECONFIG`. Prints the reason, so a run shows the test was skipped.
pub fn skip_without_cluster() -> bool {
    if std::env::var_os("KUBECONFIG").is_none() {
        println!("SKIPPED: KUBECONFIG not set (this test needs a real cluster)");
        return true;
    }
    false
}

/// A namespace and a gateway node of one test. Deleting the namespace and removing the label
/// (if the test added it) happen on drop.
pub struct TestCluster {
    /// The API client.
    pub client: Client,
    /// The test's namespace.
    pub namespace: String,
    /// A node labelled `fieldgate.io/gateway=true`.
    pub node: String,
    unlabel: Option<String>,
}

impl TestCluster {
    /// Applies the CRDs (waiting until established), creates namespace `<prefix>-<pid>` and
    /// picks a gateway node (labelling the first node if none is labelled).
    pub async fn start(prefix: &str, manager: &str) -> Result<Self> {
        let client = Client::try_default().await.context("building a client from KUBECONFIG")?;
        let crds = Api::<CustomResourceDefinition>::all(client.clone());
        for crd in [Device::crd(), DeviceProfile::crd(), Uplink::crd()] {
            let name = crd.name_any();
            crds.patch(&name, &PatchParams::apply(manager).force(), &Patch::Apply(&crd)).await?;
            wait_until(&format!("CRD {name} established"), Duration::from_secs(30), || {
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
        let namespace = format!("{prefix}-{}", std::process::id());
        let ns = json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": namespace}});
        Api::<Namespace>::all(client.clone())
            .patch(&namespace, &PatchParams::apply(manager), &Patch::Apply(ns))
            .await?;
        let nodes = Api::<Node>::all(client.clone());
        let list = nodes.list(&Default::default()).await?;
        let labelled =
            list.items.iter().find(|n| n.labels().get("fieldgate.io/gateway").map(String::as_str) == Some("true"));
        let (node, unlabel) = match labelled {
            Some(n) => (n.name_any(), None),
            None => {
                let n = list.items.first().context("the cluster has no node")?.name_any();
                let patch = json!({"metadata": {"labels": {"fieldgate.io/gateway": "true"}}});
                nodes.patch(&n, &PatchParams::default(), &Patch::Merge(&patch)).await?;
                (n.clone(), Some(n))
            }
        };
        Ok(Self { client, namespace, node, unlabel })
    }
}

impl Drop for TestCluster {
    fn drop(&mut self) {
        let (client, ns, unlabel) = (self.client.clone(), self.namespace.clone(), self.unlabel.take());
        // Best effort, on a runtime of its own (Drop cannot be async).
        let _ = std::thread::spawn(move || {
            let Ok(rt) = tokio::runtime::Runtime::new() else { return };
            rt.block_on(async move {
                let _ = Api::<Namespace>::all(client.clone()).delete(&ns, &DeleteParams::default()).await;
                if let Some(node) = unlabel {
                    let patch = json!({"metadata": {"labels": {"fieldgate.io/gateway": null}}});
                    let _ = Api::<Node>::all(client).patch(&node, &PatchParams::default(), &Patch::Merge(&patch)).await;
                }
            });
        })
        .join();
    }
}
