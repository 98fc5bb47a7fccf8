//! The HTTP uplink end to end, with real processes: simulated Modbus devices -> the gateway
//! binary -> nats-server JetStream -> a real HTTP server started by the test
//! ([`fieldgate_tests::http_cloud`]).
//!
//! The judge is not the defendant: "lost" and "duplicate" are decided from the samples the
//! devices served and the readings of the requests the server answered 2xx; the gateway's
//! counters are checked against that.
//!
//! Needs `cargo build --workspace --bins` first (the tests run the gateway binary).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use anyhow::{Context, Result, bail, ensure};
use fieldgate_crds::{DeviceSecretRef, Encoding, GatewayUplink, HttpAuth, MqttTls, SecretKeyRef};
use fieldgate_tests::certs::TestPki;
use fieldgate_tests::cloud::CloudMessage;
use fieldgate_tests::config::{ConfigBuilder, NAMESPACE, http_of, http_uplink};
use fieldgate_tests::http_cloud::{Answer, HttpCloud, HttpCloudOptions};
use fieldgate_tests::metrics::metric_or_zero;
use fieldgate_tests::{DeliveryReport, Gateway, NatsServer, SimFleet, delivery_report, stream_name, wait_until};

/// Generous deadline for anything that should happen "soon" on a busy 2-core machine.
const WAIT: Duration = Duration::from_secs(90);
/// The standard uplink's name.
const UPLINK: &str = "cloud";

/// Everything one test runs.
struct Rig {
    nats: NatsServer,
    cloud: HttpCloud,
    fleet: SimFleet,
    gw: Gateway,
}

/// Starts NATS, `devices` healthy simulated devices polled every `poll`, and a ready gateway
/// with one HTTP uplink to `cloud`, changed by `edit`; `secrets` are written before it starts.
async fn rig(
    cloud: HttpCloud,
    devices: usize,
    poll: &str,
    secrets: &[(&str, &str, &str)],
    edit: impl FnOnce(&mut GatewayUplink),
) -> Result<Rig> {
    let nats = NatsServer::start().await?;
    let fleet = SimFleet::healthy(devices).await?;
    let mut u = http_uplink(UPLINK, &cloud.url());
    edit(&mut u);
    let config = ConfigBuilder::new().devices(fleet.gateway_devices(poll)).uplink(u).yaml()?;
    let mut gw = Gateway::new(&nats.url())?;
    for (name, key, value) in secrets {
        gw.write_secret(name, key, value)?;
    }
    gw.write_config(&config)?;
    gw.start_ready().await?;
    Ok(Rig { nats, cloud, fleet, gw })
}

impl Rig {
    /// What the endpoint accepted against what the devices served, now.
    fn report(&self) -> Result<DeliveryReport> {
        Ok(delivery_report(&self.fleet.served(), &self.cloud.keys()?))
    }

    /// Stops the devices, waits until the buffer is empty and every served sample is at the
    /// endpoint or counted dropped `refused` (no more than that), stops the gateway (exit 0),
    /// and returns the final accounting with the last metrics scrape.
    async fn drain_and_stop(&mut self) -> Result<(DeliveryReport, String)> {
        self.fleet.stop().await;
        let stream = stream_name(NAMESPACE, UPLINK);
        let r = wait_until("the buffer to drain to the endpoint", WAIT, || async {
            let state = self.nats.stream_state(&stream).await?;
            let m = self.gw.metrics_text().await?;
            let refused = metric_or_zero(&m, "fieldgate_readings_dropped_total", &[("reason", "refused")]);
            Ok((state.messages == 0 && self.report()?.lost_count() as f64 <= refused).then_some(()))
        })
        .await;
        let metrics = self.gw.metrics_text().await?;
        if let Err(e) = r {
            bail!("{e:#}\n{}\n{}", self.report()?, self.gw.log());
        }
        let status = self.gw.terminate().await?;
        ensure!(status.success(), "graceful stop exited with {status}\n{}", self.gw.log());
        Ok((self.report()?, metrics))
    }

    /// Waits until the endpoint accepted `n` readings.
    async fn wait_for_count(&self, n: usize) -> Result<()> {
        self.cloud.wait_for_count(n, WAIT).await.with_context(|| self.gw.log())
    }
}

fn ids(msgs: &[CloudMessage]) -> Result<BTreeSet<String>> {
    msgs.iter().map(|m| Ok(m.key()?.id)).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_reading_served_arrives_at_the_http_endpoint_once_in_json_batches() -> Result<()> {
    let mut rig = rig(HttpCloud::start().await?, 4, "100ms", &[], |_| {}).await?;
    rig.wait_for_count(100).await?;
    let (report, _) = rig.drain_and_stop().await?;
    eprintln!("json batches: {report}");
    report.assert_consistent()?;
    report.assert_complete()?;
    ensure!(report.duplicates == 0, "duplicates without any outage: {report}");
    let received = rig.cloud.received();
    ensure!(received.iter().all(|r| r.content_type == "application/json"), "a batch was not JSON");
    // Batches, not a request per reading: four devices polled every 100 ms fill requests.
    ensure!(received.iter().any(|r| r.readings.len() > 1), "every request carried one reading");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_503_with_retry_after_delays_its_readings_and_after_recovery_nothing_is_lost() -> Result<()> {
    const RETRY_AFTER: u64 = 3;
    let mut rig = rig(HttpCloud::start().await?, 3, "100ms", &[], |_| {}).await?;
    rig.wait_for_count(20).await?;
    rig.cloud.always(Answer { status: 503, retry_after: Some(RETRY_AFTER) });
    // Readings meet the 503 more than once (each time after the wait it asked for).
    let r = wait_until("a reading to be refused 503 three times", WAIT, || async {
        let mut seen: BTreeMap<String, usize> = BTreeMap::new();
        for m in rig.cloud.messages(|s| s == 503) {
            *seen.entry(m.key()?.id).or_default() += 1;
        }
        Ok(seen.values().any(|n| *n >= 3).then_some(()))
    })
    .await;
    r.with_context(|| rig.gw.log())?;
    rig.cloud.recover();
    let (report, m) = rig.drain_and_stop().await?;
    eprintln!("503 + Retry-After: {report}");
    report.assert_consistent()?;
    report.assert_complete()?;
    ensure!(report.duplicates == 0, "a reading refused 503 arrived twice: {report}");
    let refused = metric_or_zero(&m, "fieldgate_readings_dropped_total", &[("reason", "refused")]);
    ensure!(refused == 0.0, "{refused} readings counted dropped for a transient refusal");
    // No reading was sent again sooner than the endpoint asked.
    let mut last: BTreeMap<String, tokio::time::Instant> = BTreeMap::new();
    for r in rig.cloud.received() {
        for p in &r.readings {
            let id = CloudMessage::stateless("http", p.clone(), r.at).key()?.id;
            if let Some(before) = last.insert(id.clone(), r.at) {
                let gap = r.at - before;
                ensure!(gap >= Duration::from_secs(RETRY_AFTER), "{id} was sent again after {gap:?}");
            }
        }
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_400_refuses_its_batch_for_good_counted_and_never_sent_again() -> Result<()> {
    let mut rig = rig(HttpCloud::start().await?, 3, "100ms", &[], |_| {}).await?;
    rig.wait_for_count(20).await?;
    rig.cloud.plan([Answer::status(400), Answer::status(400)]);
    let r = wait_until("two requests answered 400 and readings accepted after them", WAIT, || async {
        let received = rig.cloud.received();
        let refused = received.iter().filter(|r| r.status == 400).count();
        let after = received.iter().skip_while(|r| r.status != 400).filter(|r| r.status == 200).count();
        Ok((refused == 2 && after >= 2).then_some(()))
    })
    .await;
    r.with_context(|| rig.gw.log())?;
    let (report, m) = rig.drain_and_stop().await?;
    let refused_ids = ids(&rig.cloud.messages(|s| s == 400))?;
    let counted = metric_or_zero(&m, "fieldgate_readings_dropped_total", &[("reason", "refused")]);
    eprintln!("400: {report}; {} readings refused, counted refused {counted}", refused_ids.len());
    report.assert_consistent()?;
    ensure!(!refused_ids.is_empty(), "the refused requests carried no readings");
    // Not looped: the refused readings never went out again, and are the only ones lost.
    let posted = rig.cloud.messages(|_| true);
    ensure!(posted.len() == ids(&posted)?.len(), "a reading was POSTed twice");
    ensure!(
        report.lost_count() == refused_ids.len(),
        "lost {} but refused {}: {report}",
        report.lost_count(),
        refused_ids.len()
    );
    ensure!(
        counted == refused_ids.len() as f64,
        "counted {counted} refused, the endpoint refused {}",
        refused_ids.len()
    );
    ensure!(report.duplicates == 0, "{report}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bearer_token_from_a_secret_is_required_and_sent() -> Result<()> {
    const TOKEN: &str = "t0ken-for-the-cloud";
    let options = HttpCloudOptions { token: Some(TOKEN.into()), ..Default::default() };
    let token_ref = |name: &str| HttpAuth { token_secret_ref: DeviceSecretRef { name: name.into(), key: None } };
    // An endpoint the gateway holds the wrong token for: it refuses every request (401), the
    // gateway keeps the readings (nothing dropped) and tries again.
    let wrong = HttpCloud::start_with(options.clone()).await?;
    let wrong_url = wrong.url();
    let mut rig = rig(HttpCloud::start_with(options).await?, 2, "100ms", &[("cloud-token", "token", TOKEN)], |u| {
        http_of(u).auth = Some(token_ref("cloud-token"));
    })
    .await?;
    rig.wait_for_count(20).await?;
    ensure!(rig.cloud.unauthorized() == 0, "the right token was refused");
    let (report, _) = rig.drain_and_stop().await?;
    report.assert_consistent()?;
    report.assert_complete()?;

    // The same devices to the endpoint with the wrong token.
    let nats = NatsServer::start().await?;
    let fleet = SimFleet::healthy(1).await?;
    let mut u = http_uplink(UPLINK, &wrong_url);
    http_of(&mut u).auth = Some(token_ref("cloud-token"));
    let config = ConfigBuilder::new().devices(fleet.gateway_devices("100ms")).uplink(u).yaml()?;
    let mut gw = Gateway::new(&nats.url())?;
    gw.write_secret("cloud-token", "token", "not-the-token")?;
    gw.write_config(&config)?;
    gw.start_ready().await?;
    wait_until("the endpoint to refuse the wrong token", WAIT, || async {
        Ok((wrong.unauthorized() >= 1).then_some(()))
    })
    .await
    .with_context(|| gw.log())?;
    ensure!(wrong.received().is_empty(), "a request with the wrong token was taken");
    let m = gw.metrics_text().await?;
    let refused = metric_or_zero(&m, "fieldgate_readings_dropped_total", &[("reason", "refused")]);
    ensure!(refused == 0.0, "readings were dropped for the gateway's own credentials");
    ensure!(nats.stream_state(&stream_name(NAMESPACE, UPLINK)).await?.messages > 0, "the readings were not kept");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn https_with_a_ca_from_a_secret_delivers_protobuf_batches() -> Result<()> {
    let pki = TestPki::generate()?;
    let cloud = HttpCloud::start_with(HttpCloudOptions { tls: Some(pki.clone()), ..Default::default() }).await?;
    ensure!(cloud.url().starts_with("https://"), "{}", cloud.url());
    let mut rig = rig(cloud, 2, "100ms", &[("cloud-ca", "ca.crt", &pki.ca_cert)], |u| {
        u.encoding = Some(Encoding::Protobuf);
        http_of(u).tls = Some(MqttTls {
            ca_secret_ref: Some(SecretKeyRef { name: "cloud-ca".into(), key: None }),
            client_cert_secret_ref: None,
        });
    })
    .await?;
    rig.wait_for_count(20).await?;
    let (report, _) = rig.drain_and_stop().await?;
    eprintln!("https protobuf: {report}");
    report.assert_consistent()?;
    report.assert_complete()?;
    ensure!(report.duplicates == 0, "{report}");
    let received = rig.cloud.received();
    ensure!(received.iter().all(|r| r.content_type.starts_with("application/x-protobuf")), "a batch was not protobuf");
    Ok(())
}
