//! The demo (`fieldgate-demo`, what `scripts/demo.sh` runs) as a newcomer would run it: it
//! decodes what the cloud receives with the published schema, survives a cloud outage with
//! nothing lost (judged against what the simulated devices served), and exits non-zero with
//! the gateway's error when the gateway dies.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::process::Output;
use std::time::Duration;

use anyhow::{Context, Result, ensure};
use fieldgate_tests::gateway::{gateway_binary, workspace_binary};
use fieldgate_tests::mosquitto::mosquitto_binary;
use fieldgate_tests::nats::nats_server_binary;

/// Far above the demo's own run time: a hung demo fails here.
const DEADLINE: Duration = Duration::from_secs(300);

async fn demo(args: &[&str]) -> Result<(Output, String)> {
    let work = fieldgate_tests::temp_dir("fieldgate-demo-")?;
    let mut cmd = tokio::process::Command::new(workspace_binary("fieldgate-demo", "FIELDGATE_DEMO_BIN")?);
    cmd.arg("--gateway")
        .arg(gateway_binary()?)
        .arg("--nats-server")
        .arg(nats_server_binary()?)
        .arg("--mosquitto")
        .arg(mosquitto_binary()?)
        .arg("--work-dir")
        .arg(work.path().join("demo"))
        .args(args)
        .kill_on_drop(true);
    let out = tokio::time::timeout(DEADLINE, cmd.output()).await.context("the demo did not end")??;
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    Ok((out, text))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_demo_decodes_protobuf_and_shows_a_cloud_outage_fill_and_drain_with_nothing_lost() -> Result<()> {
    let args = ["--devices", "3", "--poll-interval", "500ms", "--encoding", "protobuf", "--outage-at", "3s"];
    let (out, text) = demo(&[&args[..], &["--outage", "6s", "--run-for", "30s"]].concat()).await?;
    ensure!(out.status.success(), "{}\n{text}", out.status);
    ensure!(text.contains("cloud broker stopped for 6s"), "{text}");
    ensure!(text.contains("DISCONNECTED"), "the outage never showed: {text}");
    let drained = text.lines().find(|l| l.contains("without the cloud: up to")).context(text.clone())?;
    ensure!(drained.ends_with("nothing lost") && !drained.contains("up to 0 readings"), "{drained}");
    ensure!(text.contains("decoded with the published schema and matching the register map"), "{text}");
    ensure!(!text.contains("LOST") && !text.contains("WRONG"), "{text}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_demo_exits_with_the_gateways_error_when_the_gateway_dies() -> Result<()> {
    let (out, text) = demo(&["--devices", "2", "--encoding", "protobuff", "--run-for", "60s"]).await?;
    ensure!(out.status.code() == Some(1), "{}\n{text}", out.status);
    ensure!(text.contains("the gateway exited (exit status: 2)"), "{text}");
    ensure!(
        text.contains("\"protobuff\" is not one of json, jsonCompact, protobuf"),
        "the gateway's error is not shown: {text}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_demo_refuses_an_encoding_its_view_cannot_decode_instead_of_showing_wrong_values() -> Result<()> {
    let (out, text) = demo(&["--devices", "1", "--encoding", "sparkplugB", "--run-for", "60s"]).await?;
    ensure!(!out.status.success(), "{}\n{text}", out.status);
    ensure!(text.contains("decodes only json and protobuf"), "{text}");
    Ok(())
}
