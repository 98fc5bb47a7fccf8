//! `fieldgate-operator render` and `crds` as a user runs them.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::Path;
use std::process::Command;

fn operator() -> Command {
    Command::new(env!("CARGO_BIN_EXE_fieldgate-operator"))
}

fn examples() -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples")
}

#[test]
fn the_examples_render_for_a_node_and_every_object_is_configured() {
    let out = operator().args(["render", "-f"]).arg(examples()).args(["--gateway-nodes", "edge-1"]).output().unwrap();
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(out.status.success(), "{text}\n{}", String::from_utf8_lossy(&out.stderr));
    assert!(text.contains("kind: GatewayConfig") && text.contains("node: edge-1"), "{text}");
    assert!(text.contains("# Device default/meter-1: Configured on edge-1"), "{text}");
    assert!(text.contains("# Uplink default/cloud: Configured selects 2 devices on 1 nodes"), "{text}");
    assert!(text.contains("name: default_cloud-creds"), "secret references use the per-node layout: {text}");
    assert!(!text.contains("change-me"), "no secret value is printed");
    // The whole output is a YAML stream.
    let docs: Vec<serde_json::Value> = serde_saphyr::from_multiple(&text).unwrap();
    assert!(docs.iter().any(|d| d["kind"] == "GatewayConfig"));
}

#[test]
fn an_invalid_device_exits_2_and_names_the_field() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("bad.yaml"),
        "apiVersion: fieldgate.io/v1alpha1\nkind: Device\nmetadata: {name: bad}\nspec:\n  profile: nope\n  connection: {modbusTcp: {host: h}}\n  placement: {nodeName: edge-9}\n",
    )
    .unwrap();
    let out = operator().args(["render", "-f"]).arg(dir.path()).args(["--gateway-nodes", "edge-1"]).output().unwrap();
    let text = String::from_utf8(out.stdout).unwrap();
    assert_eq!(out.status.code(), Some(2), "{text}");
    assert!(text.contains("# Device default/bad: NOT configured: spec.profile: no DeviceProfile \"nope\""), "{text}");
    assert!(text.contains("spec.placement.nodeName: node \"edge-9\" is not a gateway node"), "{text}");
}

#[test]
fn crds_prints_the_committed_definitions() {
    let out = operator().arg("crds").output().unwrap();
    assert!(out.status.success());
    let text = String::from_utf8(out.stdout).unwrap();
    for name in ["device", "deviceprofile", "uplink"] {
        let committed =
            std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join(format!("../crds/yaml/{name}.yaml")))
                .unwrap();
        assert!(text.contains(&committed), "{name}");
    }
}

#[test]
fn a_manifest_the_api_server_would_refuse_names_every_problem_with_its_path() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("bad.yaml"),
        "apiVersion: fieldgate.io/v1alpha1\nkind: Device\nmetadata: {name: bad}\nspec:\n  pollIntervall: 1s\n  \
         connection: {modbusTcp: {host: h, port: 70000, timeout: soon}}\n  \
         points: [{name: p, type: int16, scael: 2, modbus: {table: holding, address: 0}}]\n",
    )
    .unwrap();
    let out = operator().args(["render", "-f"]).arg(dir.path()).args(["--gateway-nodes", "edge-1"]).output().unwrap();
    let text = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{text}");
    for line in [
        "Device bad: 4 invalid fields",
        "spec.connection.modbusTcp.port: 70000 is out of range 1-65535",
        "spec.connection.modbusTcp.timeout: \"soon\" is not a duration such as 500ms, 1s, 2m30s or 72h",
        "spec.pollIntervall: unknown field (did you mean pollInterval?)",
        "spec.points[0].scael: unknown field (did you mean scale?)",
    ] {
        assert!(text.contains(line), "{line:?} missing from:\n{text}");
    }
}
