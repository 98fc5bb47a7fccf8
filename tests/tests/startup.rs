//! Starting without the NATS server that holds the buffer: the log names the address and the
//! cause, readiness says what it waits for, SIGTERM stops at once, and the gateway starts
//! when NATS comes.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use anyhow::{Context, Result, ensure};
use fieldgate_tests::api::request;
use fieldgate_tests::{ConfigBuilder, Gateway, Mosquitto, NatsServer, free_port, wait_until};

const WAIT: Duration = Duration::from_secs(60);
/// Longer than [`STOP_DEADLINE`]: a stop that waited for anything NATS-related would miss it.
const GRACE: &str = "--shutdown-grace=120s";
const STOP_DEADLINE: Duration = Duration::from_secs(30);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_nats_the_log_names_its_address_and_cause_and_sigterm_stops_at_once() -> Result<()> {
    let broker = Mosquitto::start().await?;
    let url = format!("nats://127.0.0.1:{}", free_port()?);
    let mut gw = Gateway::new(&url)?;
    gw.arg(GRACE);
    gw.write_config(&ConfigBuilder::new().cloud(&broker.url(), |_| {}).yaml()?)?;
    gw.start()?;

    wait_until("the log to name the NATS address and the cause", WAIT, || {
        let log = gw.stderr();
        let named = log
            .lines()
            .any(|l| l.contains("cannot reach NATS") && l.contains(&url) && l.contains("Connection refused"));
        async move { Ok(named.then_some(())) }
    })
    .await
    .with_context(|| gw.log())?;
    let r = request(gw.listen(), "GET", "/readyz", None, None, b"").await?;
    ensure!(r.code == 503 && r.body.contains("NATS"), "{r:?}");
    ensure!(!gw.stderr().contains("timed out"), "a misleading timeout:\n{}", gw.log());

    let status = gw.terminate_within(STOP_DEADLINE).await?;
    ensure!(status.success(), "{status}\n{}", gw.log());
    ensure!(gw.stderr().contains("stopped before NATS answered"), "{}", gw.log());
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gateway_started_before_nats_runs_once_nats_comes() -> Result<()> {
    let broker = Mosquitto::start().await?;
    let mut nats = NatsServer::start().await?;
    let url = nats.url();
    nats.kill()?;
    let mut gw = Gateway::new(&url)?;
    gw.write_config(&ConfigBuilder::new().cloud(&broker.url(), |_| {}).yaml()?)?;
    gw.start()?;
    wait_until("a failed NATS attempt in the log", WAIT, || {
        let failed = gw.stderr().contains("cannot reach NATS");
        async move { Ok(failed.then_some(())) }
    })
    .await?;
    nats.start_again().await?;
    gw.wait_ready().await?;
    ensure!(gw.stderr().contains("connected to NATS"), "{}", gw.log());
    let status = gw.terminate().await?;
    ensure!(status.success(), "{status}");
    Ok(())
}
