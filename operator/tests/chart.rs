//! Chart tests: render and lint `charts/fieldgate` with the real Helm engine (PyPI
//! `helm-python-sdk` in the project's `.venv`), for default and non-default values, and check
//! the rendered objects. Skipped, saying so, when the venv lacks helm-python-sdk
//! (`scripts/setup.sh` installs it).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::{Value, json};

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap().to_path_buf()
}

const HELPER: &str = r#"
import json, sys
import helm_python as helm
chart_dir, values = sys.argv[1], json.loads(sys.argv[2])
out = {"lint": None, "manifests": None, "error": None}
try:
    out["lint"] = helm.lint(chart_dir, values, strict=True, namespace="fieldgate-system")
    chart = helm.Chart.load(chart_dir)
    chart.validate_schema(values)
    out["manifests"] = chart.render(values, name="fg", namespace="fieldgate-system", is_install=True)
except helm.HelmError as e:
    out["error"] = f"{type(e).__name__}: {e}"
print(json.dumps(out))
"#;

fn python() -> Option<PathBuf> {
    let py = root().join(".venv/bin/python");
    let ok = Command::new(&py).args(["-c", "import helm_python"]).output().is_ok_and(|o| o.status.success());
    if ok {
        Some(py)
    } else {
        println!("SKIPPED: {} lacks helm-python-sdk (run scripts/setup.sh)", py.display());
        None
    }
}

struct Rendered {
    lint: Value,
    objects: Vec<Value>,
    error: Option<String>,
}

fn helm(py: &Path, values: Value) -> Rendered {
    let chart = root().join("charts/fieldgate");
    let out = Command::new(py).arg("-c").arg(HELPER).arg(&chart).arg(values.to_string()).output().unwrap();
    assert!(out.status.success(), "helper failed: {}", String::from_utf8_lossy(&out.stderr));
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    let mut objects = Vec::new();
    if let Some(m) = v["manifests"].as_object() {
        for (path, text) in m {
            if path.ends_with("NOTES.txt") {
                continue;
            }
            let docs: Vec<Value> = serde_saphyr::from_multiple(text.as_str().unwrap()).unwrap_or_else(|e| panic!("{path}: {e}"));
            objects.extend(docs.into_iter().filter(|d| !d.is_null()));
        }
    }
    Rendered { lint: v["lint"].clone(), objects, error: v["error"].as_str().map(str::to_string) }
}

fn find<'a>(objects: &'a [Value], kind: &str, name: &str) -> &'a Value {
    objects
        .iter()
        .find(|o| o["kind"] == kind && o["metadata"]["name"] == name)
        .unwrap_or_else(|| panic!("no {kind} {name}"))
}

fn assert_lint_clean(r: &Rendered) {
    assert!(r.error.is_none(), "{:?}", r.error);
    let bad: Vec<&Value> = r.lint["messages"].as_array().unwrap().iter().filter(|m| m["severity"].as_i64() >= Some(2)).collect();
    assert!(bad.is_empty(), "lint: {bad:?}");
    assert!(r.lint["errors"].as_array().unwrap().is_empty(), "lint: {}", r.lint);
}

/// Every container is "restricted" except a root init container allowed only CAP_CHOWN.
fn assert_restricted(workload: &Value, allow_fix_permissions: bool) {
    let name = workload["metadata"]["name"].as_str().unwrap();
    let pod = &workload["spec"]["template"]["spec"];
    assert_eq!(pod["securityContext"]["runAsNonRoot"], json!(true), "{name}");
    assert_eq!(pod["securityContext"]["seccompProfile"]["type"], json!("RuntimeDefault"), "{name}");
    assert!(pod["hostNetwork"].is_null() && pod["hostPID"].is_null(), "{name}");
    let containers = pod["containers"].as_array().unwrap().iter().chain(pod["initContainers"].as_array().into_iter().flatten());
    for c in containers {
        let cname = c["name"].as_str().unwrap();
        let sc = &c["securityContext"];
        assert_eq!(sc["allowPrivilegeEscalation"], json!(false), "{name}/{cname}");
        assert_eq!(sc["readOnlyRootFilesystem"], json!(true), "{name}/{cname}");
        assert_eq!(sc["capabilities"]["drop"], json!(["ALL"]), "{name}/{cname}");
        assert!(sc["privileged"].is_null() || sc["privileged"] == json!(false), "{name}/{cname}");
        for kind in ["requests", "limits"] {
            for res in ["cpu", "memory"] {
                assert!(!c["resources"][kind][res].is_null(), "{name}/{cname} lacks resources.{kind}.{res}");
            }
        }
        if cname == "fix-permissions" {
            assert!(allow_fix_permissions, "{name}: unexpected root init container");
            assert_eq!(sc["capabilities"]["add"], json!(["CHOWN"]), "{name}/{cname}");
        } else {
            assert_ne!(sc["runAsNonRoot"], json!(false), "{name}/{cname}");
            assert!(sc["runAsUser"].is_null() || sc["runAsUser"] != json!(0), "{name}/{cname}");
            assert!(sc["capabilities"]["add"].is_null(), "{name}/{cname} adds capabilities");
        }
    }
}

fn rules(objects: &[Value], kind: &str, name: &str) -> Vec<(Vec<String>, Vec<String>, Vec<String>)> {
    let strings = |v: &Value| v.as_array().unwrap().iter().map(|s| s.as_str().unwrap().to_string()).collect::<Vec<_>>();
    find(objects, kind, name)["rules"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| (strings(&r["apiGroups"]), strings(&r["resources"]), strings(&r["verbs"])))
        .collect()
}

fn rule(groups: &[&str], resources: &[&str], verbs: &[&str]) -> (Vec<String>, Vec<String>, Vec<String>) {
    let v = |s: &[&str]| s.iter().map(|x| x.to_string()).collect();
    (v(groups), v(resources), v(verbs))
}

#[test]
fn the_charts_crds_are_the_generated_ones() {
    for name in ["device", "deviceprofile", "uplink"] {
        let generated = std::fs::read_to_string(root().join(format!("crds/yaml/{name}.yaml"))).unwrap();
        let chart = std::fs::read_to_string(root().join(format!("charts/fieldgate/crds/{name}.yaml"))).unwrap_or_default();
        assert!(
            generated == chart,
            "charts/fieldgate/crds/{name}.yaml differs from crds/yaml/{name}.yaml: cp crds/yaml/*.yaml charts/fieldgate/crds/"
        );
    }
}

#[test]
fn default_values_lint_clean_and_render_restricted_least_privilege_objects() {
    let Some(py) = python() else { return };
    let r = helm(&py, json!({}));
    assert_lint_clean(&r);
    let o = &r.objects;

    let op = find(o, "Deployment", "fg-operator");
    assert_eq!(op["spec"]["replicas"], json!(2));
    let args = &op["spec"]["template"]["spec"]["containers"][0]["args"];
    assert!(args.as_array().unwrap().contains(&json!("--leader-election=true")), "{args}");
    assert_restricted(op, false);

    let ds = find(o, "DaemonSet", "fg-gateway");
    let pod = &ds["spec"]["template"]["spec"];
    assert_eq!(pod["nodeSelector"], json!({"fieldgate.io/gateway": "true"}));
    let nats = pod["initContainers"].as_array().unwrap().iter().find(|c| c["name"] == "nats").unwrap();
    assert_eq!(nats["restartPolicy"], json!("Always"), "NATS is a native sidecar");
    assert!(pod["volumes"].as_array().unwrap().iter().any(|v| v["hostPath"]["path"] == json!("/var/lib/fieldgate")));
    assert_restricted(ds, true);
    let conf = find(o, "ConfigMap", "fg-gateway-nats")["data"]["nats.conf"].as_str().unwrap();
    assert!(conf.contains("sync_interval: always"), "{conf}");

    // Separate identities.
    assert_eq!(op["spec"]["template"]["spec"]["serviceAccountName"], json!("fg-operator"));
    assert_eq!(pod["serviceAccountName"], json!("fg-gateway"));
    find(o, "ServiceAccount", "fg-operator");
    find(o, "ServiceAccount", "fg-gateway");

    // RBAC: exactly these rules, nothing broader.
    assert_eq!(
        rules(o, "ClusterRole", "fg-operator"),
        [
            rule(&["fieldgate.io"], &["devices", "deviceprofiles", "uplinks"], &["get", "list", "watch"]),
            rule(&["fieldgate.io"], &["devices/status", "uplinks/status"], &["patch"]),
            rule(&[""], &["nodes"], &["get", "list", "watch"]),
            rule(&[""], &["secrets"], &["get", "list", "watch"]),
            rule(&["events.k8s.io"], &["events"], &["create", "patch"]),
        ]
    );
    assert_eq!(
        rules(o, "Role", "fg-operator"),
        [
            rule(&[""], &["configmaps"], &["list", "create", "patch", "delete"]),
            rule(&[""], &["secrets"], &["create", "patch", "delete"]),
            rule(&["coordination.k8s.io"], &["leases"], &["get", "create", "update"]),
        ]
    );
    assert_eq!(rules(o, "Role", "fg-gateway"), [rule(&[""], &["configmaps", "secrets"], &["get", "list", "watch"])]);
    assert_eq!(
        rules(o, "ClusterRole", "fg-gateway"),
        [
            rule(&["fieldgate.io"], &["devices/status", "uplinks/status"], &["patch"]),
            rule(&["events.k8s.io"], &["events"], &["create", "patch"]),
        ]
    );
    for role in o.iter().filter(|x| x["kind"] == "Role" || x["kind"] == "ClusterRole") {
        let text = role["rules"].to_string();
        for word in ["\"*\"", "escalate", "bind", "impersonate"] {
            assert!(!text.contains(word), "{}: {word}", role["metadata"]["name"]);
        }
    }
}

#[test]
fn non_default_values_change_what_they_should() {
    let Some(py) = python() else { return };
    let values = json!({
        "imageRegistry": "registry.example.com/fg/",
        "operator": {"replicas": 3, "failBack": true, "failoverGrace": "90s", "image": {"repository": "fieldgate-operator", "tag": "1.2.3"}},
        "gateway": {"extraArgs": ["--shutdown-grace=5s"]},
        "nats": {"syncInterval": "2m", "storage": {"type": "emptyDir"}},
    });
    let r = helm(&py, values);
    assert_lint_clean(&r);
    let o = &r.objects;
    let op = find(o, "Deployment", "fg-operator");
    assert_eq!(op["spec"]["replicas"], json!(3));
    let c = &op["spec"]["template"]["spec"]["containers"][0];
    assert_eq!(c["image"], json!("registry.example.com/fg/fieldgate-operator:1.2.3"));
    let args = c["args"].as_array().unwrap();
    assert!(args.contains(&json!("--fail-back")) && args.contains(&json!("--failover-grace=90s")), "{args:?}");

    let ds = find(o, "DaemonSet", "fg-gateway");
    let pod = &ds["spec"]["template"]["spec"];
    // emptyDir storage: no hostPath, no root init container: the whole pod is "restricted".
    assert!(!pod["volumes"].to_string().contains("hostPath"));
    assert!(pod["initContainers"].as_array().unwrap().iter().all(|c| c["name"] != "fix-permissions"));
    assert_restricted(ds, false);
    assert_eq!(pod["containers"][0]["args"], json!(["--shutdown-grace=5s"]));
    let conf = find(o, "ConfigMap", "fg-gateway-nats")["data"]["nats.conf"].as_str().unwrap();
    assert!(conf.contains("sync_interval: 2m"), "{conf}");
}

#[test]
fn invalid_values_are_refused_by_the_schema() {
    let Some(py) = python() else { return };
    for (values, word) in [
        (json!({"nats": {"syncInterval": "sometimes"}}), "syncInterval"),
        (json!({"nats": {"storage": {"type": "nfs"}}}), "type"),
        (json!({"operator": {"replicas": 0}}), "replicas"),
        (json!({"unknownKey": 1}), "unknownKey"),
    ] {
        let r = helm(&py, values.clone());
        let err = r.error.unwrap_or_else(|| panic!("{values} was accepted"));
        assert!(err.contains(word), "{values}: {err}");
    }
}
