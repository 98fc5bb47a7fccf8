//! Memory stays bounded while devices come and go: 10,000 devices added and removed through
//! config changes leave no series in `/metrics` and the gateway's resident memory, as the
//! kernel reports it (`/proc/<pid>/status`), back near where it started.
//!
//! Needs `cargo build --workspace --bins` first (the test runs the gateway binary).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeSet;
use std::time::Duration;

use anyhow::{Context, Result};
use fieldgate_crds::GatewayDevice;
use fieldgate_tests::config::{ConfigBuilder, NAMESPACE};
use fieldgate_tests::metrics::samples;
use fieldgate_tests::procstat::proc_stats;
use fieldgate_tests::{Gateway, NatsServer, SimFleet, free_port, wait_until};

/// Devices added, and removed again, in all.
const DEVICES: usize = 10_000;
/// Devices of one round: each round's config replaces the previous round's devices.
const PER_ROUND: usize = 1_000;
/// Time one round gets to be applied (and each of its devices to show up in `/metrics`): a
/// bound, not a speed expectation (a debug build on a busy machine checks a 1,000-device
/// config slowly).
const ROUND: Duration = Duration::from_secs(240);

/// Name prefix of the devices that come and go.
const PREFIX: &str = "churn-";

/// Round `round`'s devices: even ones poll a live simulator (readings, poll histograms, last
/// values), odd ones a closed port (connection errors, last errors).
fn round_devices(round: usize, live: u16, closed: u16) -> Vec<GatewayDevice> {
    let every = "1s".parse().expect("a duration");
    (round * PER_ROUND..(round + 1) * PER_ROUND)
        .map(|i| {
            let port = if i % 2 == 0 { live } else { closed };
            fieldgate_sim::gateway_device(NAMESPACE, &format!("{PREFIX}{i:05}"), "127.0.0.1", port, &every, 0)
        })
        .collect()
}

/// The devices named in `/metrics`: every `device` label value starting with [`PREFIX`].
fn churn_devices(metrics: &str) -> BTreeSet<String> {
    samples(metrics)
        .into_iter()
        .flat_map(|s| s.labels.into_iter())
        .filter(|(k, v)| k == "device" && v.contains(PREFIX))
        .map(|(_, v)| v)
        .collect()
}

/// The gateway's resident memory in KiB, from the kernel.
fn rss_kib(gw: &Gateway) -> Result<u64> {
    let pid = gw.pid().context("the gateway is not running")?;
    Ok(proc_stats(pid)?.rss_kib)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn devices_that_come_and_go_leave_no_series_and_no_memory_behind() -> Result<()> {
    let nats = NatsServer::start().await?;
    let sim = SimFleet::healthy(1).await?;
    let live = sim.ports()[0];
    let closed = free_port()?;
    let mut gw = Gateway::new(&nats.url())?;
    gw.write_config(&ConfigBuilder::new().yaml()?)?;
    gw.start_ready().await?;
    let applied = |n: usize| {
        let gw = &gw;
        async move {
            gw.wait_metric("fieldgate_config_reloads_total", &[("outcome", "applied")], ROUND, |v| v >= n as f64).await
        }
    };
    applied(1).await?;
    let start = rss_kib(&gw)?;

    let mut peak = start;
    let rounds = DEVICES / PER_ROUND;
    for round in 0..rounds {
        let devices = round_devices(round, live, closed);
        let wanted: BTreeSet<String> = devices.iter().map(|d| format!("{}/{}", d.namespace, d.name)).collect();
        gw.write_config(&ConfigBuilder::new().devices(devices).yaml()?)?;
        applied(round + 2).await?;
        // Every device of this round has series (it polled, or failed to connect) and none of
        // the previous round's is left.
        wait_until(&format!("round {round}: exactly its {PER_ROUND} devices in /metrics"), ROUND, || async {
            let seen = churn_devices(&gw.metrics_text().await?);
            Ok((seen == wanted).then_some(()))
        })
        .await
        .map_err(|e| e.context(gw.log()))?;
        let rss = rss_kib(&gw)?;
        println!("round {round}: {PER_ROUND} devices running, RSS {rss} KiB");
        peak = peak.max(rss);
    }

    gw.write_config(&ConfigBuilder::new().yaml()?)?;
    applied(rounds + 2).await?;
    let left = wait_until("no churned device left in /metrics", ROUND, || async {
        let seen = churn_devices(&gw.metrics_text().await?);
        Ok(seen.is_empty().then_some(()))
    })
    .await;
    left.map_err(|e| e.context(gw.log()))?;
    let end = rss_kib(&gw)?;
    println!(
        "RSS (VmRSS) of the gateway: start {start} KiB, peak {peak} KiB, after {DEVICES} devices came and went {end} KiB"
    );
    // Near the start: what a gateway with no devices holds plus a small allowance for the
    // allocator's caches, far below what the devices of one round cost.
    let allowance = (peak - start) / 4;
    assert!(
        end <= start + allowance,
        "resident memory stayed up: start {start} KiB, peak {peak} KiB, end {end} KiB (allowed {} KiB)",
        start + allowance
    );
    gw.terminate().await?;
    Ok(())
}
