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

#[test]
fn committed_crd_yaml_reads_back_as_the_generated_definitions() {
    // The text comparison above cannot tell a folded pattern from a changed one.
    use kube::CustomResourceExt;
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("yaml");
    for (name, crd) in [
        ("device", fieldgate_crds::Device::crd()),
        ("deviceprofile", fieldgate_crds::DeviceProfile::crd()),
        ("uplink", fieldgate_crds::Uplink::crd()),
    ] {
        let text = std::fs::read_to_string(dir.join(format!("{name}.yaml"))).unwrap();
        let back: k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition =
            serde_saphyr::from_str(&text).unwrap();
        assert_eq!(back, crd, "{name}");
    }
}

#[test]
fn crd_schemas_use_only_formats_the_api_server_knows() {
    // `kubectl apply` warns about any other format (such as uint16); ranges stay as
    // minimum/maximum.
    fn walk(path: &str, v: &serde_json::Value, found: &mut Vec<String>) {
        match v {
            serde_json::Value::Object(o) => {
                if let Some(f) = o.get("format").and_then(|f| f.as_str())
                    && !["int32", "int64", "float", "double", "byte", "date-time"].contains(&f)
                {
                    found.push(format!("{path}: {f}"));
                }
                for (k, child) in o {
                    walk(&format!("{path}.{k}"), child, found);
                }
            }
            serde_json::Value::Array(items) => items.iter().for_each(|c| walk(path, c, found)),
            _ => {}
        }
    }
    use kube::CustomResourceExt;
    let mut found = Vec::new();
    for crd in [fieldgate_crds::Device::crd(), fieldgate_crds::DeviceProfile::crd(), fieldgate_crds::Uplink::crd()] {
        walk(&crd.spec.names.kind.clone(), &serde_json::to_value(&crd).unwrap(), &mut found);
    }
    assert!(found.is_empty(), "formats the API server does not know: {found:#?}");
    let device = serde_json::to_value(fieldgate_crds::Device::crd()).unwrap();
    let port = device.pointer(
        "/spec/versions/0/schema/openAPIV3Schema/properties/spec/properties/connection/properties/modbusTcp/properties/port",
    );
    let port = port.unwrap();
    assert_eq!((port["minimum"].as_f64(), port["maximum"].as_f64()), (Some(1.0), Some(65535.0)), "{port}");
}
