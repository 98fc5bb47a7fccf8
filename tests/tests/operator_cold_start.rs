//! The operator's `run` (leader election on) against the mocked API server of
//! `fieldgate-bench-operator --cold-start`: every node's ConfigMap and every status is written,
//! and every request is one a real API server serves.
//!
//! Needs `cargo build --workspace --bins` first (the bench runs the operator binary).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::process::Command;

#[test]
fn the_leader_applies_every_node_config_against_a_mocked_api_server() {
    let out = Command::new(env!("CARGO_BIN_EXE_fieldgate-bench-operator"))
        .args(["--cold-start", "--devices", "300", "--nodes", "5", "--timeout", "90s"])
        .env("RUST_BACKTRACE", "0")
        .output()
        .unwrap();
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(out.status.success(), "{text}\n{}", String::from_utf8_lossy(&out.stderr));
    assert!(text.contains("all 5 ConfigMaps applied"), "{text}");
    assert!(text.contains("all 300 Device + 15 Uplink statuses written"), "{text}");
    assert!(text.contains("unexpected: []"), "every request was one the mock knows: {text}");
}
