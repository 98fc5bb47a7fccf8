//! Chart tests: render and lint `charts/fieldgate` with the real Helm engine (PyPI
//! `helm-python-sdk` in the project's `.venv`), for default and non-default values, and check
//! the rendered objects. They fail, saying why, when the venv lacks helm-python-sdk or
//! `promtool` is missing (`scripts/setup.sh` installs both): a skipped check is not a pass.
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
    assert!(ok, "{} lacks helm-python-sdk: run scripts/setup.sh", py.display());
    Some(py)
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
            let docs: Vec<Value> =
                serde_saphyr::from_multiple(text.as_str().unwrap()).unwrap_or_else(|e| panic!("{path}: {e}"));
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
    let bad: Vec<&Value> =
        r.lint["messages"].as_array().unwrap().iter().filter(|m| m["severity"].as_i64() >= Some(2)).collect();
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
    let containers =
        pod["containers"].as_array().unwrap().iter().chain(pod["initContainers"].as_array().into_iter().flatten());
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
        let chart =
            std::fs::read_to_string(root().join(format!("charts/fieldgate/crds/{name}.yaml"))).unwrap_or_default();
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
    assert_eq!(env_var(nats, "GOMAXPROCS"), Some(json!("1")), "nats-server runs one scheduler thread");
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
            rule(&["authentication.k8s.io"], &["tokenreviews"], &["create"]),
        ]
    );
    assert_eq!(
        rules(o, "Role", "fg-operator"),
        [
            rule(&[""], &["configmaps"], &["list", "create", "patch", "delete"]),
            rule(&[""], &["secrets"], &["create", "patch", "delete"]),
            rule(&["coordination.k8s.io"], &["leases"], &["get", "create", "update"]),
            rule(&["apps"], &["deployments"], &["get"]),
        ]
    );
    assert_eq!(find(o, "Role", "fg-operator")["rules"][3]["resourceNames"], json!(["fg-operator"]));
    // Gateways read no Secret at all: their node's credentials come from the operator.
    assert_eq!(
        rules(o, "Role", "fg-gateway"),
        [rule(&[""], &["configmaps"], &["get", "list", "watch"]), rule(&["apps"], &["daemonsets"], &["get"])]
    );
    assert_eq!(find(o, "Role", "fg-gateway")["rules"][1]["resourceNames"], json!(["fg-gateway"]));
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
        "nats": {"syncInterval": "2m", "storage": {"type": "emptyDir"}, "goMaxProcs": null},
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
    let nats = pod["initContainers"].as_array().unwrap().iter().find(|c| c["name"] == "nats").unwrap();
    assert_eq!(env_var(nats, "GOMAXPROCS"), None, "goMaxProcs null leaves nats-server its default");
    let conf = find(o, "ConfigMap", "fg-gateway-nats")["data"]["nats.conf"].as_str().unwrap();
    assert!(conf.contains("sync_interval: 2m"), "{conf}");
}

#[test]
fn invalid_values_are_refused_by_the_schema() {
    let Some(py) = python() else { return };
    for (values, word) in [
        (json!({"nats": {"syncInterval": "sometimes"}}), "syncInterval"),
        (json!({"nats": {"storage": {"type": "nfs"}}}), "type"),
        (json!({"nats": {"goMaxProcs": 0}}), "goMaxProcs"),
        (json!({"operator": {"replicas": 0}}), "replicas"),
        (json!({"unknownKey": 1}), "unknownKey"),
    ] {
        let r = helm(&py, values.clone());
        let err = r.error.unwrap_or_else(|| panic!("{values} was accepted"));
        assert!(err.contains(word), "{values}: {err}");
    }
}

// ---------------------------------------------------------------------------------------------
// Device listeners

/// The gateway container of the rendered DaemonSet.
fn gateway_container(objects: &[Value]) -> &Value {
    let ds = find(objects, "DaemonSet", "fg-gateway");
    ds["spec"]["template"]["spec"]["containers"].as_array().unwrap().iter().find(|c| c["name"] == "gateway").unwrap()
}

fn env_var(container: &Value, name: &str) -> Option<Value> {
    container["env"].as_array()?.iter().find(|e| e["name"] == name).map(|e| e["value"].clone())
}

/// `(name, port, protocol)` of the gateway's containerPorts other than metrics.
fn listener_ports(container: &Value) -> Vec<(String, i64, String)> {
    container["ports"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|p| p["name"] != "metrics")
        .map(|p| {
            let protocol = p["protocol"].as_str().unwrap_or("TCP").to_string();
            (p["name"].as_str().unwrap().to_string(), p["containerPort"].as_i64().unwrap(), protocol)
        })
        .collect()
}

/// `(name, port, targetPort, protocol)` of the listeners Service.
fn service_ports(service: &Value) -> Vec<(String, i64, String, String)> {
    service["spec"]["ports"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| {
            (
                p["name"].as_str().unwrap().to_string(),
                p["port"].as_i64().unwrap(),
                p["targetPort"].as_str().unwrap().to_string(),
                p["protocol"].as_str().unwrap().to_string(),
            )
        })
        .collect()
}

fn strings(v: &[(&str, i64, &str)]) -> Vec<(String, i64, String)> {
    v.iter().map(|(n, p, proto)| (n.to_string(), *p, proto.to_string())).collect()
}

#[test]
fn the_device_listeners_are_exposed_by_default_through_a_node_local_service() {
    let Some(py) = python() else { return };
    let r = helm(&py, json!({}));
    assert_lint_clean(&r);
    let gw = gateway_container(&r.objects);
    // The gateway's own variables of --coap-listen, --tcp-listen and --udp-listen, at its defaults.
    assert_eq!(env_var(gw, "FIELDGATE_COAP_LISTEN"), Some(json!("0.0.0.0:5683")));
    assert_eq!(env_var(gw, "FIELDGATE_TCP_LISTEN"), Some(json!("0.0.0.0:7700")));
    assert_eq!(env_var(gw, "FIELDGATE_UDP_LISTEN"), Some(json!("0.0.0.0:7700")));
    assert_eq!(listener_ports(gw), strings(&[("coap", 5683, "UDP"), ("tcp", 7700, "TCP"), ("udp", 7700, "UDP")]));

    let svc = find(&r.objects, "Service", "fg-gateway-listeners");
    assert_eq!(svc["spec"]["type"], json!("ClusterIP"));
    assert_eq!(svc["spec"]["internalTrafficPolicy"], json!("Local"));
    assert!(svc["spec"]["externalTrafficPolicy"].is_null(), "only NodePort and LoadBalancer take it");
    assert_eq!(svc["spec"]["selector"]["app.kubernetes.io/name"], json!("fieldgate-gateway"));
    let ports: Vec<(String, i64, String, String)> = [("coap", 5683, "UDP"), ("tcp", 7700, "TCP"), ("udp", 7700, "UDP")]
        .iter()
        .map(|(n, p, proto)| (n.to_string(), *p, n.to_string(), proto.to_string()))
        .collect();
    assert_eq!(service_ports(svc), ports);

    // Restricted: no host port and no host network anywhere.
    let ds = find(&r.objects, "DaemonSet", "fg-gateway");
    assert!(!ds.to_string().contains("hostPort"), "{ds}");
    assert!(ds["spec"]["template"]["spec"]["hostNetwork"].is_null());
}

#[test]
fn a_disabled_listener_loses_its_port_and_listens_on_the_pods_loopback_only() {
    let Some(py) = python() else { return };
    let r = helm(
        &py,
        json!({"gateway": {"listeners": {"tcp": {"enabled": false, "port": 7700}, "coap": {"enabled": true, "port": 5684}}}}),
    );
    assert_lint_clean(&r);
    let gw = gateway_container(&r.objects);
    assert_eq!(env_var(gw, "FIELDGATE_TCP_LISTEN"), Some(json!("127.0.0.1:7700")));
    assert_eq!(env_var(gw, "FIELDGATE_COAP_LISTEN"), Some(json!("0.0.0.0:5684")));
    assert_eq!(listener_ports(gw), strings(&[("coap", 5684, "UDP"), ("udp", 7700, "UDP")]));
    let svc = find(&r.objects, "Service", "fg-gateway-listeners");
    let names: Vec<String> = service_ports(svc).into_iter().map(|p| p.0).collect();
    assert_eq!(names, ["coap", "udp"]);

    // Every listener off: no ports and no Service at all.
    let off = json!({"enabled": false, "port": 7700});
    let r = helm(
        &py,
        json!({"gateway": {"listeners": {"tcp": off, "udp": off, "coap": {"enabled": false, "port": 5683}}}}),
    );
    assert_lint_clean(&r);
    assert!(listener_ports(gateway_container(&r.objects)).is_empty());
    assert!(r.objects.iter().all(|o| o["metadata"]["name"] != "fg-gateway-listeners"));

    // The Service can be left out while the listeners stay.
    let r = helm(&py, json!({"gateway": {"listeners": {"service": {"enabled": false}}}}));
    assert_lint_clean(&r);
    assert_eq!(listener_ports(gateway_container(&r.objects)).len(), 3);
    assert!(r.objects.iter().all(|o| o["metadata"]["name"] != "fg-gateway-listeners"));
}

#[test]
fn node_ports_keep_traffic_on_the_node_and_host_network_is_a_separate_opt_in() {
    let Some(py) = python() else { return };
    let r = helm(
        &py,
        json!({"gateway": {"listeners": {
            "coap": {"enabled": true, "port": 5683, "nodePort": 30683},
            "service": {"type": "NodePort", "annotations": {"example.com/owner": "ot"}}}}}),
    );
    assert_lint_clean(&r);
    let svc = find(&r.objects, "Service", "fg-gateway-listeners");
    assert_eq!(svc["spec"]["type"], json!("NodePort"));
    assert_eq!(svc["spec"]["externalTrafficPolicy"], json!("Local"));
    assert_eq!(svc["spec"]["internalTrafficPolicy"], json!("Local"));
    assert_eq!(svc["metadata"]["annotations"]["example.com/owner"], json!("ot"));
    let ports = svc["spec"]["ports"].as_array().unwrap();
    assert_eq!(ports[0]["nodePort"], json!(30683));
    assert!(ports[1]["nodePort"].is_null(), "0: Kubernetes picks it");
    let ds = find(&r.objects, "DaemonSet", "fg-gateway");
    assert!(ds["spec"]["template"]["spec"]["hostNetwork"].is_null(), "a NodePort does not need the host network");
    assert_restricted(ds, true);

    let r = helm(&py, json!({"gateway": {"listeners": {"service": {"type": "LoadBalancer"}}}}));
    assert_lint_clean(&r);
    let svc = find(&r.objects, "Service", "fg-gateway-listeners");
    assert_eq!(svc["spec"]["externalTrafficPolicy"], json!("Local"));

    let r = helm(&py, json!({"gateway": {"hostNetwork": true}}));
    assert_lint_clean(&r);
    let pod = &find(&r.objects, "DaemonSet", "fg-gateway")["spec"]["template"]["spec"];
    assert_eq!(pod["hostNetwork"], json!(true));
    assert_eq!(pod["dnsPolicy"], json!("ClusterFirstWithHostNet"));
}

#[test]
fn invalid_listener_values_are_refused() {
    let Some(py) = python() else { return };
    for (values, word) in [
        (json!({"gateway": {"listeners": {"coap": {"enabled": true, "port": 0}}}}), "port"),
        (json!({"gateway": {"listeners": {"tcp": {"enabled": true, "port": 70000}}}}), "port"),
        (json!({"gateway": {"listeners": {"udp": {"enabled": true, "port": "7700"}}}}), "port"),
        (json!({"gateway": {"listeners": {"udp": {"enabled": true, "port": 7700, "nodePort": 70000}}}}), "nodePort"),
        (json!({"gateway": {"listeners": {"service": {"type": "ExternalName"}}}}), "type"),
        (json!({"gateway": {"listeners": {"sctp": {"enabled": true, "port": 9}}}}), "sctp"),
        (json!({"gateway": {"hostNetwork": "yes"}}), "hostNetwork"),
        (json!({"gateway": {"listeners": {"udp": {"enabled": true, "port": 5683}}}}), "both UDP port 5683"),
        (json!({"gateway": {"listeners": {"tcp": {"enabled": true, "port": 4222}}}}), "tcp.port 4222 is taken"),
        (json!({"gateway": {"listeners": {"tcp": {"enabled": false, "port": 9464}}}}), "tcp.port 9464 is taken"),
    ] {
        let r = helm(&py, values.clone());
        let err = r.error.unwrap_or_else(|| panic!("{values} was accepted"));
        assert!(err.contains(word), "{values}: {err}");
    }
}

// ---------------------------------------------------------------------------------------------
// Dashboard, alerts, scrape objects

/// Every sample name the gateway and the operator expose, from their real registries: a
/// counter `x` is scraped as `x_total`, a histogram as `x_bucket`, `x_sum`, `x_count`.
fn exposed_metric_names() -> std::collections::BTreeSet<String> {
    use fieldgate_gateway::metrics as gm;
    let mut registry = prometheus_client::registry::Registry::default();
    let g = gm::Metrics::new(&mut registry);
    let o = fieldgate_operator::metrics::Metrics::new(&mut registry);
    // A family is exposed once it has a series: give each one (as a running gateway would).
    let dev = gm::DeviceLabels { device: "default/d".into(), protocol: "modbus_tcp" };
    let up = gm::UplinkLabels { uplink: "default/u".into() };
    g.polls.get_or_create(&dev).inc();
    g.device_errors
        .get_or_create(&gm::DeviceErrorLabels { device: "default/d".into(), protocol: "modbus_tcp", kind: "timeout" })
        .inc();
    g.poll_duration.get_or_create(&dev).observe(0.01);
    g.device_connected.get_or_create(&dev).set(1);
    g.readings_received.get_or_create(&dev).inc();
    g.device_last_reading.get_or_create(&dev).set(1.0);
    g.readings_accepted.get_or_create(&up).inc();
    g.dropped("default/u", gm::DropReason::too_large);
    g.deliveries
        .get_or_create(&gm::DeliveryLabels { uplink: "default/u".into(), outcome: gm::DeliveryOutcome::acked })
        .inc();
    g.redeliveries.get_or_create(&up).inc();
    g.delivery_latency.get_or_create(&up).observe(0.01);
    g.sample_to_cloud_latency.get_or_create(&up).observe(0.01);
    // The buffer gauges come from the state index.
    let state = g.state.uplink("default/u");
    state.restored(1, fieldgate_gateway::index::Prior::default());
    state.stored(1, 1, 1, 100, std::time::SystemTime::now());
    state.set_connected(true);
    state.set_reachable(true);
    g.uplink_connects.get_or_create(&up).inc();
    g.task_restarts.get_or_create(&gm::TaskLabels { task: "t".into() }).inc();
    g.config_reloads.get_or_create(&gm::ReloadLabels { outcome: gm::ReloadOutcome::applied }).inc();
    g.ingress_rejected.get_or_create(&gm::IngressLabels { protocol: "coap", reason: "unknown_device" }).inc();
    g.ingress_messages.get_or_create(&gm::IngressLabels { protocol: "coap", reason: "con" }).inc();
    g.ingress_connections.get_or_create(&gm::ProtocolLabels { protocol: "tcp" }).set(1);
    o.reconciles.get_or_create(&fieldgate_operator::metrics::OutcomeLabels { outcome: "ok" }).inc();
    o.reconcile_errors.get_or_create(&fieldgate_operator::metrics::KindLabels { kind: "write" }).inc();
    o.wrote("configmap");
    o.objects
        .get_or_create(&fieldgate_operator::metrics::ObjectStateLabels { resource: "device", state: "configured" })
        .set(1);
    let mut text = String::new();
    prometheus_client::encoding::text::encode(&mut text, &registry).unwrap();
    let mut names = std::collections::BTreeSet::new();
    for line in text.lines() {
        let Some(rest) = line.strip_prefix("# TYPE ") else { continue };
        let (name, kind) = rest.split_once(' ').unwrap();
        match kind {
            "counter" => {
                names.insert(format!("{name}_total"));
            }
            "histogram" => {
                for suffix in ["_bucket", "_sum", "_count"] {
                    names.insert(format!("{name}{suffix}"));
                }
            }
            _ => {
                names.insert(name.to_string());
            }
        }
    }
    assert!(names.contains("fieldgate_readings_accepted_total"), "{names:?}");
    assert!(names.contains("fieldgate_operator_reconciles_total"), "{names:?}");
    names
}

/// The `fieldgate_*` metric names a PromQL expression uses.
fn metric_names_in(expr: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut rest = expr;
    while let Some(at) = rest.find("fieldgate_") {
        let before = rest[..at].chars().last();
        let tail = &rest[at..];
        let end = tail.find(|c: char| !(c.is_ascii_alphanumeric() || c == '_')).unwrap_or(tail.len());
        if !before.is_some_and(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':') {
            out.push(tail[..end].to_string());
        }
        rest = &tail[end..];
    }
    out
}

/// `promtool`, from the Debian `prometheus` package (scripts/setup.sh).
fn promtool() -> Option<PathBuf> {
    let p = PathBuf::from(std::env::var_os("FIELDGATE_PROMTOOL").unwrap_or_else(|| "/usr/bin/promtool".into()));
    assert!(
        p.is_file(),
        "{} not found: Debian package prometheus (scripts/setup.sh), or set FIELDGATE_PROMTOOL",
        p.display()
    );
    Some(p)
}

fn run_promtool(promtool: &Path, args: &[&str], dir: &Path) {
    let out = Command::new(promtool).args(args).current_dir(dir).output().unwrap();
    assert!(
        out.status.success(),
        "promtool {args:?} failed:\n{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

const MONITORING_ON: &str = r#"{"monitoring": {"prometheusRule": {"enabled": true, "labels": {"release": "kps"}},
    "podMonitor": {"enabled": true}, "serviceMonitor": {"enabled": true}},
    "telemetry": {"otlpEndpoint": "http://otel-collector.observability:4318", "traceSampleRatio": 0.05},
    "gateway": {"apiTokenSecret": "fieldgate-api"}}"#;

#[test]
fn the_dashboard_is_valid_json_for_the_grafana_sidecar_and_uses_only_exposed_metrics() {
    let Some(py) = python() else { return };
    let names = exposed_metric_names();
    let r = helm(&py, json!({}));
    assert_lint_clean(&r);
    // Off by default: they need the prometheus-operator CRDs.
    for kind in ["PrometheusRule", "PodMonitor", "ServiceMonitor"] {
        assert!(r.objects.iter().all(|o| o["kind"] != kind), "{kind} rendered by default");
    }
    let cm = find(&r.objects, "ConfigMap", "fg-dashboard");
    assert_eq!(cm["metadata"]["labels"]["grafana_dashboard"], json!("1"));
    let text = cm["data"]["fieldgate.json"].as_str().unwrap();
    let dashboard: Value = serde_json::from_str(text).expect("the dashboard is valid JSON");
    assert_eq!(dashboard["uid"], json!("fieldgate-overview"));
    let panels = dashboard["panels"].as_array().unwrap();
    let titles: Vec<&str> = panels.iter().filter_map(|p| p["title"].as_str()).collect();
    for wanted in ["Throughput", "Backlog", "Drops", "Latency", "Device health"] {
        assert!(titles.contains(&wanted), "no {wanted} row in {titles:?}");
    }
    let mut exprs = Vec::new();
    for p in panels {
        for t in p["targets"].as_array().into_iter().flatten() {
            exprs.push(t["expr"].as_str().unwrap().to_string());
        }
    }
    assert!(exprs.len() >= 20, "{exprs:?}");
    for e in &exprs {
        let used = metric_names_in(e);
        assert!(!used.is_empty(), "no Fieldgate metric in {e}");
        for m in used {
            assert!(
                names.contains(&m),
                "the dashboard uses {m}, which neither the gateway nor the operator exposes: {e}"
            );
        }
    }
    for v in dashboard["templating"]["list"].as_array().unwrap() {
        if let Some(q) = v["definition"].as_str() {
            for m in metric_names_in(q) {
                assert!(names.contains(&m), "variable {} uses {m}", v["name"]);
            }
        }
    }
    // Every expression parses as PromQL (with Grafana's variables filled in).
    let Some(promtool) = promtool() else { return };
    let dir = tempfile::tempdir().unwrap();
    let rules: Vec<Value> = exprs
        .iter()
        .enumerate()
        .map(|(i, e)| {
            let e = e
                .replace("$__rate_interval", "1m")
                .replace("$__range", "1h")
                .replace("$uplink", ".*")
                .replace("$device", ".*");
            json!({"record": format!("dashboard:expr_{i}"), "expr": e})
        })
        .collect();
    std::fs::write(
        dir.path().join("dashboard.yaml"),
        json!({"groups": [{"name": "dashboard", "rules": rules}]}).to_string(),
    )
    .unwrap();
    run_promtool(&promtool, &["check", "rules", "dashboard.yaml"], dir.path());
}

/// `{{ $labels.x }}` filled in, as Prometheus expands an alert's annotations.
fn expand(template: &str, labels: &serde_json::Map<String, Value>) -> String {
    let mut out = template.to_string();
    for (k, v) in labels {
        out = out.replace(&format!("{{{{ $labels.{k} }}}}"), v.as_str().unwrap());
    }
    assert!(!out.contains("{{"), "unexpanded template in {out}");
    out
}

#[test]
fn the_alerts_scrape_objects_and_trace_settings_render_and_the_alerts_fire_when_they_should() {
    let Some(py) = python() else { return };
    let names = exposed_metric_names();
    let r = helm(&py, serde_json::from_str(MONITORING_ON).unwrap());
    assert_lint_clean(&r);
    let o = &r.objects;

    // Scrape objects find the pods' "metrics" ports.
    let pm = find(o, "PodMonitor", "fg");
    assert_eq!(pm["spec"]["podMetricsEndpoints"][0]["port"], json!("metrics"));
    let sm = find(o, "ServiceMonitor", "fg");
    assert_eq!(sm["spec"]["endpoints"][0]["port"], json!("metrics"));
    let svc = find(o, "Service", "fg-gateway-metrics");
    assert_eq!(svc["spec"]["selector"]["app.kubernetes.io/name"], json!("fieldgate-gateway"));

    // Traces and the API token reach the gateway; traces reach the operator.
    let ds = find(o, "DaemonSet", "fg-gateway");
    let pod = &ds["spec"]["template"]["spec"];
    let env = pod["containers"][0]["env"].as_array().unwrap();
    let var = |name: &str| env.iter().find(|e| e["name"] == name).map(|e| e["value"].clone());
    assert_eq!(var("OTEL_EXPORTER_OTLP_ENDPOINT"), Some(json!("http://otel-collector.observability:4318")));
    assert_eq!(var("FIELDGATE_TRACE_SAMPLE_RATIO"), Some(json!("0.05")));
    assert_eq!(var("FIELDGATE_API_TOKEN_FILE"), Some(json!("/run/fieldgate/api/token")));
    assert!(pod["volumes"].as_array().unwrap().iter().any(|v| v["secret"]["secretName"] == json!("fieldgate-api")));
    assert_restricted(ds, true);
    let op = find(o, "Deployment", "fg-operator");
    assert!(op["spec"]["template"]["spec"]["containers"][0]["env"].to_string().contains("OTEL_EXPORTER_OTLP_ENDPOINT"));

    // The alerts: the five the issue asks for, on metrics that exist.
    let rule = find(o, "PrometheusRule", "fg-alerts");
    assert_eq!(rule["metadata"]["labels"]["release"], json!("kps"));
    let groups = rule["spec"]["groups"].clone();
    let alerts: Vec<&Value> = groups.as_array().unwrap().iter().flat_map(|g| g["rules"].as_array().unwrap()).collect();
    let alert_names: Vec<&str> = alerts.iter().map(|a| a["alert"].as_str().unwrap()).collect();
    for wanted in [
        "FieldgateBacklogGrowing",
        "FieldgateOldestUnsentReadingTooOld",
        "FieldgateReadingsDropped",
        "FieldgateDeviceUnreachable",
        "FieldgateUplinkDisconnected",
    ] {
        assert!(alert_names.contains(&wanted), "no {wanted} in {alert_names:?}");
    }
    for a in &alerts {
        let expr = a["expr"].as_str().unwrap();
        let used = metric_names_in(expr);
        assert!(!used.is_empty(), "{expr}");
        for m in used {
            assert!(names.contains(&m), "alert {} uses {m}, which is not exposed", a["alert"]);
        }
        assert!(a["labels"]["severity"].is_string() && a["annotations"]["summary"].is_string(), "{a}");
    }

    let Some(promtool) = promtool() else { return };
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("alerts.yaml"), json!({"groups": groups}).to_string()).unwrap();
    run_promtool(&promtool, &["check", "rules", "alerts.yaml"], dir.path());

    // Unit tests of the alerts with Prometheus' own rule engine: synthetic series in, the
    // alerts that must (and must not) fire out.
    let by_name = |name: &str| *alerts.iter().find(|a| a["alert"] == name).unwrap();
    let expected = |name: &str, labels: Value| {
        let a = by_name(name);
        let mut l = labels.as_object().unwrap().clone();
        l.insert("severity".into(), a["labels"]["severity"].clone());
        let annotations: serde_json::Map<String, Value> = a["annotations"]
            .as_object()
            .unwrap()
            .iter()
            .map(|(k, v)| (k.clone(), json!(expand(v.as_str().unwrap(), &l))))
            .collect();
        json!([{"exp_labels": l, "exp_annotations": annotations}])
    };
    let up = json!({"instance": "gw-1:9464", "job": "fieldgate", "uplink": "default/cloud"});
    let dev =
        json!({"instance": "gw-1:9464", "job": "fieldgate", "device": "default/meter-1", "protocol": "modbus_tcp"});
    let drop = json!({"instance": "gw-1:9464", "job": "fieldgate", "uplink": "default/cloud", "reason": "buffer_full_rejected"});
    let series = |name: &str, labels: &Value, values: &str| {
        let l: Vec<String> = labels.as_object().unwrap().iter().map(|(k, v)| format!("{k}={v}")).collect();
        json!({"series": format!("{name}{{{}}}", l.join(",")), "values": values})
    };
    let tests = json!({
        "rule_files": ["alerts.yaml"],
        "evaluation_interval": "1m",
        "tests": [
            {
                "interval": "1m",
                "input_series": [
                    series("fieldgate_uplink_connected", &up, "1 1 0x40"),
                    series("fieldgate_device_connected", &dev, "1 0x40"),
                    series("fieldgate_readings_dropped_total", &drop, "0 0 0 5 10 10 10 10 10 10 10 10 10 10 10 10 10 10 10 10 10 10 10 10 10"),
                    series("fieldgate_buffer_messages", &up, "0+20x60"),
                    series("fieldgate_buffer_oldest_unsent_age_seconds", &up, "0+60x40"),
                    series("fieldgate_buffer_connected", &json!({"instance": "gw-1:9464", "job": "fieldgate"}), "1x40"),
                ],
                "alert_rule_test": [
                    {"eval_time": "4m", "alertname": "FieldgateUplinkDisconnected", "exp_alerts": []},
                    {"eval_time": "9m", "alertname": "FieldgateUplinkDisconnected", "exp_alerts": expected("FieldgateUplinkDisconnected", up.clone())},
                    {"eval_time": "8m", "alertname": "FieldgateDeviceUnreachable", "exp_alerts": expected("FieldgateDeviceUnreachable", dev.clone())},
                    {"eval_time": "2m", "alertname": "FieldgateReadingsDropped", "exp_alerts": []},
                    {"eval_time": "5m", "alertname": "FieldgateReadingsDropped", "exp_alerts": expected("FieldgateReadingsDropped", drop.clone())},
                    {"eval_time": "24m", "alertname": "FieldgateReadingsDropped", "exp_alerts": []},
                    {"eval_time": "30m", "alertname": "FieldgateBacklogGrowing", "exp_alerts": expected("FieldgateBacklogGrowing", up.clone())},
                    {"eval_time": "8m", "alertname": "FieldgateOldestUnsentReadingTooOld", "exp_alerts": []},
                    {"eval_time": "20m", "alertname": "FieldgateOldestUnsentReadingTooOld", "exp_alerts": expected("FieldgateOldestUnsentReadingTooOld", up.clone())},
                    {"eval_time": "20m", "alertname": "FieldgateBufferUnavailable", "exp_alerts": []},
                ]
            }
        ]
    });
    std::fs::write(dir.path().join("alerts_test.yaml"), tests.to_string()).unwrap();
    run_promtool(&promtool, &["test", "rules", "alerts_test.yaml"], dir.path());
}

// ---------------------------------------------------------------------------------------------
// Credentials, status columns, uninstall

/// The gateway reaches the operator's credentials endpoint through its Service, trusting the
/// CA the chart generated for the Service's name, with a token of the audience the operator
/// checks; the operator accepts only the gateway's ServiceAccount.
#[test]
fn gateways_get_credentials_from_the_operator_and_trust_its_certificate_for_the_service_name() {
    let Some(py) = python() else { return };
    let r = helm(&py, json!({}));
    assert_lint_clean(&r);
    let o = &r.objects;
    let op = find(o, "Deployment", "fg-operator");
    let c = &op["spec"]["template"]["spec"]["containers"][0];
    let args: Vec<&str> = c["args"].as_array().unwrap().iter().map(|a| a.as_str().unwrap()).collect();
    let arg = |name: &str| {
        args.iter()
            .find_map(|a| a.strip_prefix(&format!("--{name}=")))
            .unwrap_or_else(|| panic!("no --{name} in {args:?}"))
    };
    assert_eq!(arg("gateway-service-account"), "fieldgate-system/fg-gateway");
    assert_eq!(arg("owner-deployment"), "fg-operator");
    assert_eq!(arg("credentials-listen"), "0.0.0.0:8443");
    let audience = arg("credentials-audience");
    let svc = find(o, "Service", "fg-operator");
    assert_eq!(svc["spec"]["ports"][0]["port"], json!(443));
    assert_eq!(svc["spec"]["ports"][0]["targetPort"], json!("credentials"));
    assert!(c["ports"].as_array().unwrap().iter().any(|p| p["name"] == "credentials" && p["containerPort"] == 8443));

    let gw = gateway_container(o);
    assert_eq!(env_var(gw, "FIELDGATE_CREDENTIALS_URL"), Some(json!("https://fg-operator.fieldgate-system.svc:443")));
    assert_eq!(env_var(gw, "FIELDGATE_DAEMONSET"), Some(json!("fg-gateway")));
    assert!(env_var(gw, "FIELDGATE_SECRET").is_none());
    let pod = &find(o, "DaemonSet", "fg-gateway")["spec"]["template"]["spec"];
    let projected = pod["volumes"].as_array().unwrap().iter().find(|v| v["name"] == "credentials").unwrap();
    let sources = projected["projected"]["sources"].as_array().unwrap();
    assert_eq!(sources[0]["serviceAccountToken"]["audience"], json!(audience));
    assert_eq!(sources[1]["configMap"]["name"], json!("fg-credentials-ca"));

    // The serving certificate is valid for the Service's name under the CA gateways trust.
    let tls = find(o, "Secret", "fg-operator-credentials-tls");
    let b64 = |k: &str| {
        let text = tls["data"][k].as_str().unwrap();
        base64_decode(text)
    };
    let ca_pem = find(o, "ConfigMap", "fg-credentials-ca")["data"]["ca.crt"].as_str().unwrap().to_string();
    assert_eq!(String::from_utf8(b64("ca.crt")).unwrap().trim(), ca_pem.trim());
    verify_server_certificate(&ca_pem, &String::from_utf8(b64("tls.crt")).unwrap(), "fg-operator.fieldgate-system.svc");
}

fn base64_decode(text: &str) -> Vec<u8> {
    let v: k8s_openapi::ByteString = serde_json::from_value(json!(text)).unwrap();
    v.0
}

fn verify_server_certificate(ca_pem: &str, cert_pem: &str, name: &str) {
    use rustls::client::danger::ServerCertVerifier;
    use rustls_pki_types::pem::PemObject;
    use rustls_pki_types::{CertificateDer, ServerName, UnixTime};
    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_slice_iter(ca_pem.as_bytes()) {
        roots.add(c.unwrap()).unwrap();
    }
    let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
    let verifier = rustls::client::WebPkiServerVerifier::builder_with_provider(std::sync::Arc::new(roots), provider)
        .build()
        .unwrap();
    let cert = CertificateDer::from_pem_slice(cert_pem.as_bytes()).unwrap();
    let server = ServerName::try_from(name.to_string()).unwrap();
    verifier.verify_server_cert(&cert, &[], &server, &[], UnixTime::now()).unwrap_or_else(|e| panic!("{name}: {e}"));
}

#[test]
fn the_charts_crds_show_why_an_object_is_not_ready_in_wide_output() {
    for name in ["device", "uplink"] {
        let text = std::fs::read_to_string(root().join(format!("charts/fieldgate/crds/{name}.yaml"))).unwrap();
        let crd: Value = serde_saphyr::from_str(&text).unwrap();
        let columns = crd["spec"]["versions"][0]["additionalPrinterColumns"].as_array().unwrap();
        let message = columns.iter().find(|c| c["name"] == "Message").unwrap_or_else(|| panic!("{name}: {columns:?}"));
        assert_eq!(message["priority"], json!(1), "{name}: only with -o wide");
        assert_eq!(message["jsonPath"], json!(".status.conditions[?(@.type==\"Ready\")].message"));
        let ready = columns.iter().find(|c| c["name"] == "Ready").unwrap();
        assert!(ready.get("priority").is_none_or(|p| p == &json!(0)), "{name}: READY shows without -o wide");
    }
}

/// What Helm installs it removes; what the operator writes is owned by the operator's
/// Deployment (so the garbage collector removes it with the release); nothing the chart
/// renders is kept on uninstall (no `helm.sh/resource-policy: keep`). The CRDs are in
/// `crds/`, which Helm never deletes (documented).
#[test]
fn nothing_the_release_writes_outlives_it_but_the_documented_crds() {
    let Some(py) = python() else { return };
    let r = helm(&py, serde_json::from_str(MONITORING_ON).unwrap());
    assert_lint_clean(&r);
    for o in &r.objects {
        let name = format!("{} {}", o["kind"], o["metadata"]["name"]);
        assert!(o["metadata"]["annotations"]["helm.sh/resource-policy"].is_null(), "{name} is kept on uninstall");
        assert!(
            o["metadata"]["annotations"]["helm.sh/hook"].is_null(),
            "{name}: hooks are not deleted with the release"
        );
        assert_eq!(o["metadata"]["labels"]["app.kubernetes.io/instance"], json!("fg"), "{name}");
        assert_ne!(o["kind"], "CustomResourceDefinition", "{name}: CRDs live in crds/");
    }
    let readme = std::fs::read_to_string(root().join("charts/fieldgate/README.md")).unwrap();
    assert!(readme.contains("helm uninstall"), "the chart README says what uninstall leaves");
}
