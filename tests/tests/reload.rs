//! A config change (here: the standalone config file) is applied per device: adding, removing
//! or changing one device does not interrupt the others, and an invalid change is refused while
//! the running config stays.
//!
//! Needs `cargo build --workspace --bins` first (the tests run the gateway binary).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeMap;
use std::time::Duration;

use anyhow::Result;
use fieldgate_tests::config::ConfigBuilder;
use fieldgate_tests::metrics::metric_or_zero;
use fieldgate_tests::{CloudSubscriber, Gateway, Mosquitto, NatsServer, SimFleet, wait_until};

const WAIT: Duration = Duration::from_secs(90);

/// Readings received per device so far.
fn per_device(cloud: &CloudSubscriber) -> Result<BTreeMap<String, usize>> {
    let mut counts = BTreeMap::new();
    for k in cloud.keys()? {
        *counts.entry(k.device).or_default() += 1;
    }
    Ok(counts)
}

/// Waits until `device` has more than `than` readings at the cloud.
async fn wait_more(cloud: &CloudSubscriber, device: &str, than: usize) -> Result<usize> {
    wait_until(&format!("more than {than} readings of {device}"), WAIT, || {
        let n = per_device(cloud).map(|c| c.get(device).copied().unwrap_or(0));
        async move { Ok(n?.checked_sub(than + 1).map(|_| than + 1)) }
    })
    .await
    .map_err(|e| e.context(format!("readings per device at the cloud: {:?}", per_device(cloud))))?;
    Ok(per_device(cloud)?.get(device).copied().unwrap_or(0))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_config_change_touches_only_the_devices_it_changes() -> Result<()> {
    let nats = NatsServer::start().await?;
    let broker = Mosquitto::start().await?;
    let cloud = CloudSubscriber::start(&broker.url(), "cloud-reload", "fieldgate/#").await?;
    let fleet = SimFleet::healthy(3).await?;
    let devices = fleet.gateway_devices("200ms");
    // The cloud names devices `namespace/name`.
    let names: Vec<String> = devices.iter().map(|d| format!("{}/{}", d.namespace, d.name)).collect();

    // Start with devices 0 and 1.
    let first = ConfigBuilder::new().devices(devices[..2].iter().cloned()).cloud(&broker.url(), |_| {}).yaml()?;
    let mut gw = Gateway::new(&nats.url())?;
    gw.write_config(&first)?;
    gw.start_ready().await?;
    wait_more(&cloud, &names[0], 3).await.map_err(|e| e.context(gw.log()))?;
    wait_more(&cloud, &names[1], 3).await?;
    let device0 = names[0].clone();
    let polls_of_0 = |text: &str| metric_or_zero(text, "fieldgate_device_polls_total", &[("device", device0.as_str())]);
    let connected_logs = |log: &str| {
        log.lines()
            .filter(|l| l.contains("Modbus device connected") && l.contains(&format!("device={device0}")))
            .count()
    };
    let before = gw.metrics_text().await?;
    assert_eq!(connected_logs(&gw.stderr()), 1);

    // Device 1 removed, device 2 added, device 0 unchanged.
    let second = ConfigBuilder::new()
        .device(devices[0].clone())
        .device(devices[2].clone())
        .cloud(&broker.url(), |_| {})
        .yaml()?;
    gw.write_config(&second)?;
    gw.wait_metric("fieldgate_config_reloads_total", &[("outcome", "applied")], WAIT, |v| v >= 2.0).await?;
    wait_more(&cloud, &names[2], 3).await?;

    // Device 1 is gone: once its last readings drained, no more arrive while device 0 goes on.
    let of = |n: &str| per_device(&cloud).map(|c| c.get(n).copied().unwrap_or(0));
    wait_more(&cloud, &names[0], of(&names[0])? + 2).await?;
    let settled = of(&names[1])?;
    wait_more(&cloud, &names[0], of(&names[0])? + 3).await?;
    assert_eq!(of(&names[1])?, settled, "a removed device still reports");

    // Device 0 kept its adapter: it polled on and never connected again.
    let after = gw.metrics_text().await?;
    assert!(polls_of_0(&after) > polls_of_0(&before), "device 0 stopped polling");
    let log = gw.stderr();
    assert_eq!(connected_logs(&log), 1, "device 0 was restarted: {log}");
    assert!(log.contains("device removed"), "{log}");
    assert!(!log.contains("device changed"), "{log}");

    // An invalid change is refused; the running config stays and keeps delivering.
    let bad = second.replace("pollInterval: 200ms", "pollInterval: soon");
    assert_ne!(bad, second);
    gw.write_config(&bad)?;
    gw.wait_metric("fieldgate_config_reloads_total", &[("outcome", "refused")], WAIT, |v| v >= 1.0).await?;
    let n0 = per_device(&cloud)?.get(&names[0]).copied().unwrap_or(0);
    wait_more(&cloud, &names[0], n0 + 2).await?;
    let log = gw.stderr();
    assert!(log.contains("new configuration refused"), "{log}");
    assert!(log.contains("pollInterval"), "the refusal names the field: {log}");

    let status = gw.terminate().await?;
    assert!(status.success(), "gateway exited with {status}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_the_api_server_unreachable_the_gateway_runs_its_last_applied_config() -> Result<()> {
    let nats = NatsServer::start().await?;
    let broker = Mosquitto::start().await?;
    let cloud = CloudSubscriber::start(&broker.url(), "cloud-autonomy", "fieldgate/#").await?;
    let fleet = SimFleet::healthy(1).await?;
    let device = format!("default/{}", fleet.devices()[0].name);
    let gw = Gateway::new(&nats.url())?;
    // The last applied config, as the mirror left it on the node's disk.
    gw.write_config(
        &ConfigBuilder::new().devices(fleet.gateway_devices("200ms")).cloud(&broker.url(), |_| {}).yaml()?,
    )?;
    // A kubeconfig whose API server does not exist.
    let dead = fieldgate_tests::free_port()?;
    let kubeconfig = gw.dir().join("kubeconfig");
    std::fs::write(
        &kubeconfig,
        format!(
            "apiVersion: v1\nkind: Config\ncurrent-context: c\n\
             clusters: [{{name: c, cluster: {{server: \"https://127.0.0.1:{dead}\", insecure-skip-tls-verify: true}}}}]\n\
             users: [{{name: u, user: {{token: t}}}}]\n\
             contexts: [{{name: c, context: {{cluster: c, user: u, namespace: fieldgate}}}}]\n"
        ),
    )?;
    let mut cmd = gw.command();
    cmd.args(["--configmap", "fieldgate-gateway-test-node", "--namespace", "fieldgate"])
        .env("KUBECONFIG", &kubeconfig)
        .stdout(std::process::Stdio::null())
        .stderr(std::fs::File::create(gw.dir().join("cluster.stderr"))?);
    let mut child = cmd.spawn()?;
    let got = wait_until("readings at the cloud", WAIT, || {
        let n = per_device(&cloud).map(|c| c.get(&device).copied().unwrap_or(0));
        async move { Ok((n? >= 3).then_some(())) }
    })
    .await;
    let log = std::fs::read_to_string(gw.dir().join("cluster.stderr")).unwrap_or_default();
    let _ = child.kill();
    let _ = child.wait();
    got.map_err(|e| e.context(log.clone()))?;
    assert!(log.contains("starting from the last applied configuration"), "{log}");
    Ok(())
}

/// Lays out `dir/config.yaml` the way a Kubernetes ConfigMap volume does: the file is a symlink
/// to `..data/config.yaml`, `..data` a symlink to a timestamped directory; a change writes a new
/// directory and swaps `..data` atomically (the file itself is never written).
fn configmap_version(dir: &std::path::Path, version: u32, yaml: &str) -> Result<()> {
    let versioned = dir.join(format!("..2026_{version:04}"));
    std::fs::create_dir_all(&versioned)?;
    std::fs::write(versioned.join("config.yaml"), yaml)?;
    let tmp = dir.join("..data_tmp");
    let _ = std::fs::remove_file(&tmp);
    std::os::unix::fs::symlink(versioned.file_name().unwrap(), &tmp)?;
    std::fs::rename(&tmp, dir.join("..data"))?;
    let link = dir.join("config.yaml");
    if std::fs::symlink_metadata(&link).is_err() {
        std::os::unix::fs::symlink("..data/config.yaml", &link)?;
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_configmap_swap_is_applied_as_it_happens_not_at_the_next_safety_reread() -> Result<()> {
    let nats = NatsServer::start().await?;
    let broker = Mosquitto::start().await?;
    let cloud = CloudSubscriber::start(&broker.url(), "cloud-reload-events", "fieldgate/#").await?;
    let fleet = SimFleet::healthy(2).await?;
    let devices = fleet.gateway_devices("200ms");
    let names: Vec<String> = devices.iter().map(|d| format!("{}/{}", d.namespace, d.name)).collect();
    let mut gw = Gateway::new(&nats.url())?;
    // The safety re-read is far beyond the test's deadline: only a file-system event can
    // bring the change in time.
    gw.env("FIELDGATE_CONFIG_RESYNC", "1h");
    let yaml =
        |n: usize| ConfigBuilder::new().devices(devices[..n].iter().cloned()).cloud(&broker.url(), |_| {}).yaml();
    configmap_version(gw.dir(), 1, &yaml(1)?)?;
    gw.start_ready().await?;
    wait_more(&cloud, &names[0], 2).await.map_err(|e| e.context(gw.log()))?;

    configmap_version(gw.dir(), 2, &yaml(2)?)?;
    gw.wait_metric("fieldgate_config_reloads_total", &[("outcome", "applied")], WAIT, |v| v >= 2.0)
        .await
        .map_err(|e| e.context(gw.log()))?;
    wait_more(&cloud, &names[1], 2).await?;

    let status = gw.terminate().await?;
    assert!(status.success(), "gateway exited with {status}");
    Ok(())
}
