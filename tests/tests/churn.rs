//! Memory stays bounded while devices come and go: 10,000 distinct devices are added and removed
//! through config file changes, 1,000 at a time. After every round the gateway serves exactly
//! that round's devices (the API lists them and no other, `/metrics` names none of an earlier
//! round), and its resident memory as the kernel reports it (`VmRSS` in `/proc/<pid>/status`)
//! ends near where it was after the first round.
//!
//! Needs `cargo build --workspace --bins` first (the test runs the gateway binary).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, ensure};
use fieldgate_crds::{Connection, GatewayDevice, ModbusTable, ModbusTcpConnection, Point, ValueType};
use fieldgate_tests::config::{ConfigBuilder, NAMESPACE};
use fieldgate_tests::metrics::samples;
use fieldgate_tests::procstat::proc_stats;
use fieldgate_tests::{Gateway, NatsServer, SimFleet, api, free_port, wait_until};

/// Devices added, and removed again, in all.
const DEVICES: usize = 10_000;
/// Devices of one round: each round's config replaces all of the previous round's devices.
const PER_ROUND: usize = 1_000;
/// Time one round gets to be applied and to show: a bound for a debug build on a busy
/// machine, not a speed expectation.
const ROUND: Duration = Duration::from_secs(60);
/// Name prefix of the devices that come and go.
const PREFIX: &str = "churn-";
/// Token of the management API.
const TOKEN: &str = "churn-test-token-0123456789";

/// Device `i`: even ones are served by the simulator, odd ones point at a closed port (a
/// connection error). Each polls once when it starts (the next poll is an hour away), so a
/// round costs one connection per device, and every device leaves series behind: poll
/// counters and histograms, connection gauges, last values or errors and their kinds.
fn device(i: usize, live: u16, closed: u16) -> GatewayDevice {
    GatewayDevice {
        namespace: NAMESPACE.to_string(),
        name: format!("{PREFIX}{i:05}"),
        connection: Connection::ModbusTcp(ModbusTcpConnection {
            host: "127.0.0.1".to_string(),
            port: Some(if i.is_multiple_of(2) { live } else { closed }),
            unit_id: Some(1),
            timeout: Some(Duration::from_secs(5).into()),
        }),
        poll_interval: Some(Duration::from_secs(3600).into()),
        points: vec![Point::modbus("u16", ValueType::Uint16, ModbusTable::Holding, 0)],
    }
}

/// The devices of `round`, by number.
fn round_devices(round: usize) -> impl Iterator<Item = usize> {
    round * PER_ROUND..(round + 1) * PER_ROUND
}

/// `namespace/name` of device `i`, as the API and `/metrics` name it.
fn key(i: usize) -> String {
    format!("{NAMESPACE}/{PREFIX}{i:05}")
}

/// Replaces the config file at once (a rename), as an editor or a ConfigMap update does: the
/// gateway never reads half a document.
fn replace_config(gw: &Gateway, yaml: &str) -> Result<()> {
    let path = gw.config_path();
    let tmp = path.with_file_name("config.yaml.new");
    std::fs::write(&tmp, yaml).context("writing the new config")?;
    std::fs::rename(&tmp, &path).context("replacing the config")
}

/// The devices `/api/v1/devices` lists, with their state.
async fn listed(gw: &Gateway) -> Result<BTreeMap<String, String>> {
    let r = api::request(gw.listen(), "GET", "/api/v1/devices", Some(TOKEN), None, b"").await?;
    ensure!(r.code == 200, "GET /api/v1/devices answered {}: {}", r.code, r.body);
    let json = r.json()?;
    let devices = json["devices"].as_array().context("no device list")?;
    Ok(devices
        .iter()
        .filter_map(|d| Some((d["name"].as_str()?.to_string(), d["state"].as_str()?.to_string())))
        .collect())
}

/// The churned devices `/metrics` names (any series with such a `device` label).
async fn in_metrics(gw: &Gateway) -> Result<BTreeSet<String>> {
    let text = gw.metrics_text().await?;
    Ok(samples(&text)
        .into_iter()
        .flat_map(|s| s.labels.into_iter())
        .filter(|(k, v)| k == "device" && v.starts_with(&format!("{NAMESPACE}/{PREFIX}")))
        .map(|(_, v)| v)
        .collect())
}

/// The gateway's resident memory in KiB.
fn rss_kib(gw: &Gateway) -> Result<u64> {
    let pid = gw.pid().context("the gateway is not running")?;
    Ok(proc_stats(pid)?.rss_kib)
}

fn config_of(devices: impl IntoIterator<Item = GatewayDevice>) -> Result<String> {
    ConfigBuilder::new().devices(devices).yaml()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn devices_that_come_and_go_leave_no_series_and_no_memory_behind() -> Result<()> {
    let started = Instant::now();
    let nats = NatsServer::start().await?;
    let sim = SimFleet::healthy(1).await?;
    let live = sim.ports()[0];
    let served = &sim.devices()[0].device;
    let closed = free_port()?;
    let mut gw = Gateway::new(&nats.url())?;
    gw.api_token(TOKEN)?;
    gw.write_config(&config_of([])?)?;
    gw.start_ready().await?;
    let empty_rss = rss_kib(&gw)?;

    let rounds = DEVICES / PER_ROUND;
    let mut rss = Vec::new();
    for round in 0..rounds {
        let t = Instant::now();
        let requests_before = served.requests();
        replace_config(&gw, &config_of(round_devices(round).map(|i| device(i, live, closed)))?)?;
        // The API lists exactly this round's devices, each up (served by the simulator) or
        // down (its port refused the connection): every one of them ran.
        let wanted: BTreeMap<String, String> = round_devices(round)
            .map(|i| (key(i), if i.is_multiple_of(2) { "up" } else { "down" }.to_string()))
            .collect();
        let shown = wait_until(
            &format!("round {round}: the API lists exactly its devices, each up or down"),
            ROUND,
            || async {
                let now = listed(&gw).await?;
                Ok((now == wanted).then_some(()))
            },
        )
        .await;
        shown.map_err(|e| e.context(gw.log()))?;
        // No series of an earlier round is left; this round's devices have theirs.
        let names: BTreeSet<String> = wanted.keys().cloned().collect();
        let series = wait_until(&format!("round {round}: /metrics names exactly its devices"), ROUND, || async {
            Ok((in_metrics(&gw).await? == names).then_some(()))
        })
        .await;
        series.map_err(|e| e.context(gw.log()))?;
        // The simulator answered every served device of the round.
        let answered = served.requests() - requests_before;
        ensure!(answered >= (PER_ROUND / 2) as u64, "round {round}: the simulator answered {answered} requests");
        let now = rss_kib(&gw)?;
        println!("round {round}: {PER_ROUND} devices up or down in {:.1?}, gateway RSS {now} KiB", t.elapsed());
        rss.push(now);
    }

    // All of them gone.
    replace_config(&gw, &config_of([])?)?;
    wait_until("no device listed and none in /metrics", ROUND, || async {
        Ok((listed(&gw).await?.is_empty() && in_metrics(&gw).await?.is_empty()).then_some(()))
    })
    .await
    .map_err(|e| e.context(gw.log()))?;
    let end_empty = rss_kib(&gw)?;

    // After the first (warm-up) round the gateway holds 1,000 running devices with their
    // tasks, connections, series and maps, plus its allocator's working set; after the last
    // round it holds the same number. A running device costs tens of KiB (the first round's
    // growth over the empty gateway, printed below): had each of the 9,000 removed devices
    // left even a tenth of that behind, the last round would be well past the allowance. The
    // allocator keeps freed memory and fragments, hence a quarter rather than nothing.
    let (warm, last) = (rss[0], rss[rounds - 1]);
    let allowed = warm + warm / 4;
    let per_device = warm.saturating_sub(empty_rss) / PER_ROUND as u64;
    println!(
        "gateway RSS (VmRSS): {empty_rss} KiB with no device, {warm} KiB after the first {PER_ROUND}, \
         {last} KiB after {DEVICES} came and went ({PER_ROUND} running), {end_empty} KiB with none again; \
         ~{per_device} KiB per running device; allowed {allowed} KiB; test took {:.1?}",
        started.elapsed()
    );
    ensure!(
        last <= allowed,
        "resident memory grew with the devices that came and went: {warm} KiB after the first round, \
         {last} KiB after the last (allowed {allowed} KiB); per round: {rss:?}"
    );
    ensure!(
        end_empty <= allowed,
        "resident memory stayed up with no device: {end_empty} KiB (allowed {allowed} KiB); per round: {rss:?}"
    );
    gw.terminate().await?;
    Ok(())
}
