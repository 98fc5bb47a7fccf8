//! Cluster tests run only when a cluster is given: `KUBECONFIG` sets `cfg(fieldgate_cluster)`,
//! and with the image references of the whole-chart test also `cfg(fieldgate_cluster_images)`.
//! Without them the tests are `#[ignore]`d with the reason, so the test runner's own summary
//! shows them as skipped, not passed.

const IMAGES: [&str; 4] = [
    "FIELDGATE_TEST_GATEWAY_IMAGE",
    "FIELDGATE_TEST_OPERATOR_IMAGE",
    "FIELDGATE_TEST_NATS_IMAGE",
    "FIELDGATE_TEST_BROKER_IMAGE",
];

fn main() {
    println!("cargo::rustc-check-cfg=cfg(fieldgate_cluster)");
    println!("cargo::rustc-check-cfg=cfg(fieldgate_cluster_images)");
    println!("cargo::rerun-if-changed=build.rs");
    let set = |v: &str| {
        println!("cargo::rerun-if-env-changed={v}");
        std::env::var_os(v).is_some_and(|x| !x.is_empty())
    };
    let cluster = set("KUBECONFIG");
    let images = IMAGES.iter().filter(|v| set(v)).count() == IMAGES.len();
    if cluster {
        println!("cargo::rustc-cfg=fieldgate_cluster");
        if images {
            println!("cargo::rustc-cfg=fieldgate_cluster_images");
        }
    }
}
