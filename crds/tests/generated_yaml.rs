//! The committed CRD YAML (`crds/yaml/`) must match what the Rust types generate.
//! After changing the types, regenerate with (also updates the chart's copies):
//!     FIELDGATE_BLESS=1 cargo test -p fieldgate-crds --test generated_yaml

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::PathBuf;

#[test]
fn committed_crd_yaml_matches_the_rust_types() {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("yaml");
    let bless = std::env::var_os("FIELDGATE_BLESS").is_some();
    let mut drifted = Vec::new();
    for (name, yaml) in fieldgate_crds::crd_yaml().unwrap() {
        let path = dir.join(format!("{name}.yaml"));
        if bless {
            std::fs::write(&path, &yaml).unwrap();
            // The Helm chart ships the same files (operator/tests/chart.rs checks they match).
            let chart = dir.join("../../charts/fieldgate/crds");
            if chart.is_dir() {
                std::fs::write(chart.join(format!("{name}.yaml")), &yaml).unwrap();
            }
            continue;
        }
        let committed = std::fs::read_to_string(&path).unwrap_or_default();
        if committed != yaml {
            drifted.push(path.display().to_string());
        }
    }
    assert!(
        drifted.is_empty(),
        "CRD YAML drifted from the Rust types: {drifted:?}\n\
         regenerate with: FIELDGATE_BLESS=1 cargo test -p fieldgate-crds --test generated_yaml"
    );
}

#[test]
fn every_spec_field_is_documented() {
    // `kubectl explain` shows these descriptions; an undocumented field is a bug.
    fn walk(path: &str, v: &serde_json::Value, missing: &mut Vec<String>) {
        if let Some(props) = v.get("properties").and_then(|p| p.as_object()) {
            for (k, child) in props {
                let p = format!("{path}.{k}");
                if child.get("description").is_none() && !p.ends_with(".metadata") {
                    missing.push(p.clone());
                }
                walk(&p, child, missing);
            }
        }
        for key in ["items", "additionalProperties"] {
            if let Some(child) = v.get(key) {
                walk(path, child, missing);
            }
        }
        for key in ["oneOf", "anyOf", "allOf"] {
            for child in v.get(key).and_then(|c| c.as_array()).into_iter().flatten() {
                walk(path, child, missing);
            }
        }
    }
    use kube::CustomResourceExt;
    let mut missing = Vec::new();
    for crd in [fieldgate_crds::Device::crd(), fieldgate_crds::DeviceProfile::crd(), fieldgate_crds::Uplink::crd()] {
        let kind = crd.spec.names.kind.clone();
        for v in &crd.spec.versions {
            let schema = serde_json::to_value(&v.schema).unwrap();
            let root = &schema["openAPIV3Schema"]["properties"]["spec"];
            walk(&format!("{kind}.spec"), root, &mut missing);
        }
    }
    assert!(missing.is_empty(), "fields without a description: {missing:#?}");
}

#[test]
fn cel_rules_and_list_keys_are_in_the_schemas() {
    // The API server enforces these; this checks they reach the generated CRDs.
    use kube::CustomResourceExt;
    let device = serde_json::to_string(&fieldgate_crds::Device::crd()).unwrap();
    assert!(device.contains("!(has(self.nodeName) && has(self.nodeSelector))"), "{device}");
    assert!(device.contains(r#""x-kubernetes-list-map-keys":["type"]"#), "{device}");
    let uplink = serde_json::to_string(&fieldgate_crds::Uplink::crd()).unwrap();
    assert!(uplink.contains("self.url.startsWith('mqtts://')"), "{uplink}");
    assert!(uplink.contains(r#""x-kubernetes-list-map-keys":["node"]"#), "{uplink}");
}
