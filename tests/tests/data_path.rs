//! The data path end to end, with real processes: simulated Modbus devices (in this process)
//! -> `fieldgate-gateway` -> `nats-server` JetStream buffer -> `mosquitto` -> a cloud subscriber.
//!
//! The delivery contract under test: every reading JetStream accepted reaches the cloud, through
//! cloud outages, NATS crashes and gateway crashes; duplicates are only the same reading again;
//! a full buffer applies its policy and counts every drop; a reading the cloud refuses for good
//! is dropped and counted while the others flow.
//!
//! The judge is not the defendant: "lost" is decided from the samples the simulated devices
//! served and what the cloud received ([`fieldgate_tests::delivery`]), never from the gateway's
//! metrics or logs (those are checked *against* the judge: every drop counted).
//!
//! Needs `cargo build --workspace --bins` first (the tests run the gateway binary).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeMap;
use std::time::Duration;

use anyhow::{Context, Result, bail, ensure};
use fieldgate_crds::{Encoding, GatewayDevice, GatewayUplink, MqttAuth, MqttTls, OnFull, SecretKeyRef, SecretRef};
use fieldgate_sim::Fault;
use fieldgate_tests::certs::TestPki;
use fieldgate_tests::cloud::ReadingKey;
use fieldgate_tests::config::{ConfigBuilder, NAMESPACE, UPLINK, mqtt_of, mqtt_uplink, set_buffer};
use fieldgate_tests::fleet::{check_sim_reading, typed_points};
use fieldgate_tests::metrics::metric_or_zero;
use fieldgate_tests::mosquitto::MosquittoTls;
use fieldgate_tests::nats::NatsOptions;
use fieldgate_tests::nats_proxy::NatsProxy;
use fieldgate_tests::{
    CloudSubscriber, DeliveryReport, Gateway, Mosquitto, MosquittoOptions, NatsServer, SimFleet, delivery_report,
    stream_name, wait_until,
};
use tokio::time::Instant;

/// Generous deadline for anything that should happen "soon" on a busy 2-core machine.
const WAIT: Duration = Duration::from_secs(90);
/// `namespace/name` of the standard test uplink, as metrics label it.
const UPLINK_LABEL: &str = "default/cloud";
/// Every telemetry topic of the default template.
const TELEMETRY: &str = "fieldgate/#";

/// Everything one end-to-end test runs.
struct Rig {
    nats: NatsServer,
    broker: Mosquitto,
    cloud: CloudSubscriber,
    fleet: SimFleet,
    gw: Gateway,
}

/// Starts NATS, mosquitto, the cloud subscriber, simulated devices (one per fault) polled every
/// `poll`, and a ready gateway with the standard uplink changed by `edit`.
async fn rig(test: &str, faults: &[Fault], poll: &str, edit: impl FnOnce(&mut GatewayUplink)) -> Result<Rig> {
    rig_with(test, faults, poll, MosquittoOptions::default(), edit).await
}

/// [`rig`] with a broker started with `broker_options`.
async fn rig_with(
    test: &str,
    faults: &[Fault],
    poll: &str,
    broker_options: MosquittoOptions,
    edit: impl FnOnce(&mut GatewayUplink),
) -> Result<Rig> {
    let nats = NatsServer::start().await?;
    let fleet = SimFleet::start(faults).await?;
    let devices = fleet.gateway_devices(poll);
    let url = nats.url();
    rig_on(test, nats, &url, fleet, devices, broker_options, edit).await
}

/// A rig around a nats-server and a fleet of the caller's: a broker (`broker_options`), its
/// cloud subscriber, and a gateway that reaches nats-server at `gateway_nats` (directly or
/// through a proxy), polling `devices` and delivering to one uplink edited by `edit`.
async fn rig_on(
    test: &str,
    nats: NatsServer,
    gateway_nats: &str,
    fleet: SimFleet,
    devices: Vec<GatewayDevice>,
    broker_options: MosquittoOptions,
    edit: impl FnOnce(&mut GatewayUplink),
) -> Result<Rig> {
    let broker = Mosquitto::start_with(broker_options).await?;
    let cloud = CloudSubscriber::start(&broker.url(), &format!("cloud-{test}"), TELEMETRY).await?;
    let config = ConfigBuilder::new().devices(devices).cloud(&broker.url(), edit).yaml()?;
    let mut gw = Gateway::new(gateway_nats)?;
    gw.write_config(&config)?;
    gw.start_ready().await?;
    Ok(Rig { nats, broker, cloud, fleet, gw })
}

impl Rig {
    async fn metrics(&self) -> Result<String> {
        self.gw.metrics_text().await
    }

    fn keys(&self) -> Result<Vec<ReadingKey>> {
        self.cloud.keys()
    }

    /// What the cloud received against what the devices served, now.
    fn report(&self) -> Result<DeliveryReport> {
        Ok(delivery_report(&self.fleet.served(), &self.keys()?))
    }

    /// Waits until the cloud received a sample that some device served after this call (the
    /// data path moves again after a disruption).
    async fn wait_for_fresh(&self) -> Result<()> {
        let served = self.fleet.served();
        let newest: BTreeMap<String, u32> =
            served.iter().map(|(d, s)| (d.clone(), s.last().map_or(0, |s| s.sample))).collect();
        self.cloud
            .wait_for("a reading served after the disruption", WAIT, |msgs| {
                msgs.iter().rev().take(200).any(|m| {
                    m.key().is_ok_and(|k| k.sample.is_some_and(|s| newest.get(&k.device).is_some_and(|n| s > *n)))
                })
            })
            .await
            .with_context(|| self.gw.log())
    }

    /// Stops the devices, waits until the buffer is empty (every accepted reading acked by the
    /// cloud), stops the gateway with SIGTERM (must exit 0), and returns the final accounting
    /// together with the last metrics scrape before the stop.
    async fn drain_and_stop(&mut self) -> Result<(DeliveryReport, String)> {
        self.drain_and_stop_with(&[]).await
    }

    /// [`Rig::drain_and_stop`], where as many samples as the gateway counted as dropped for
    /// `reasons` may be lost (the caller then checks the count against the judge).
    async fn drain_and_stop_with(&mut self, reasons: &[&str]) -> Result<(DeliveryReport, String)> {
        self.fleet.stop().await;
        let stream = stream_name(NAMESPACE, UPLINK);
        let r = wait_until("the buffer to drain to the cloud", WAIT, || async {
            let state = self.nats.stream_state(&stream).await?;
            let m = self.metrics().await?;
            let report = self.report()?;
            let allowed: f64 =
                reasons.iter().map(|r| metric_or_zero(&m, "fieldgate_readings_dropped_total", &[("reason", r)])).sum();
            Ok((state.messages == 0 && report.lost_count() as f64 <= allowed).then_some(()))
        })
        .await;
        let metrics = self.metrics().await?;
        if let Err(e) = r {
            let state = self.nats.stream_state(&stream).await?;
            // What the gateway counted, beside what the judge found lost.
            let counted: Vec<&str> = metrics
                .lines()
                .filter(|l| {
                    ["fieldgate_readings_", "fieldgate_deliveries_total", "fieldgate_device_errors_total"]
                        .iter()
                        .any(|p| l.starts_with(p))
                })
                .collect();
            bail!(
                "{e:#}\nstream state {state:?}\n{}\ngateway counters:\n{}\n{}",
                self.report()?,
                counted.join("\n"),
                self.gw.log()
            );
        }
        let status = self.gw.terminate().await?;
        ensure!(status.success(), "graceful stop exited with {status}\n{}", self.gw.log());
        Ok((self.report()?, metrics))
    }
}

/// Delivery outcomes and redeliveries of the standard uplink, for the test output.
fn delivery_metrics(m: &str) -> String {
    let d = |outcome: &str| {
        metric_or_zero(m, "fieldgate_deliveries_total", &[("uplink", UPLINK_LABEL), ("outcome", outcome)])
    };
    format!(
        "deliveries acked {} refused {} interrupted {}, redeliveries {}",
        d("acked"),
        d("refused"),
        d("interrupted"),
        metric_or_zero(m, "fieldgate_redeliveries_total", &[("uplink", UPLINK_LABEL)])
    )
}

/// Readings per device (`namespace/name`) at the cloud, distinct ids.
fn per_device(keys: &[ReadingKey]) -> BTreeMap<String, usize> {
    let mut ids: BTreeMap<String, std::collections::BTreeSet<&str>> = BTreeMap::new();
    for k in keys {
        ids.entry(k.device.clone()).or_default().insert(&k.id);
    }
    ids.into_iter().map(|(d, s)| (d, s.len())).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn values_of_every_type_arrive_decoded() -> Result<()> {
    // One gateway, four uplinks: every combination of encoding and MQTT version, each on its
    // own topic prefix.
    let nats = NatsServer::start().await?;
    let broker = Mosquitto::start().await?;
    let cloud = CloudSubscriber::start(&broker.url(), "cloud-types", "types/#").await?;
    let fleet = SimFleet::healthy(2).await?;
    let combos = [(Encoding::Json, 3u8), (Encoding::Json, 5), (Encoding::Protobuf, 3), (Encoding::Protobuf, 5)];
    let mut builder = ConfigBuilder::new().devices(fleet.gateway_devices("300ms"));
    for (encoding, version) in combos {
        let name = format!("{}-v{version}", format!("{encoding:?}").to_lowercase());
        let mut u = mqtt_uplink(&name, &broker.url());
        u.encoding = Some(encoding);
        mqtt_of(&mut u).protocol_version = Some(version);
        mqtt_of(&mut u).topic = Some("types/{uplink}/{namespace}/{device}".into());
        builder = builder.uplink(u);
    }
    let mut gw = Gateway::new(&nats.url())?;
    gw.write_config(&builder.yaml()?)?;
    gw.start_ready().await?;

    let topic_of = |m: &fieldgate_tests::CloudMessage| m.topic.split('/').nth(1).unwrap_or_default().to_string();
    let wanted = 5;
    cloud
        .wait_for(&format!("{wanted} readings per device on each of 4 uplinks"), WAIT, |msgs| {
            let mut n: BTreeMap<(String, String), usize> = BTreeMap::new();
            for m in msgs {
                let dev = m.topic.rsplit('/').next().unwrap_or_default().to_string();
                *n.entry((topic_of(m), dev)).or_default() += 1;
            }
            n.len() == 8 && n.values().all(|c| *c >= wanted)
        })
        .await
        .with_context(|| gw.log())?;

    let points = fleet.points();
    let mut checked: BTreeMap<String, usize> = BTreeMap::new();
    for m in cloud.messages() {
        let uplink = topic_of(&m);
        let protobuf = uplink.starts_with("protobuf");
        let typed = if protobuf {
            let r = m.protobuf().with_context(|| format!("uplink {uplink}"))?;
            ensure!(r.node == "test-node" && r.namespace == NAMESPACE, "envelope of {r:?}");
            ensure!(r.buffer_seq > 0 && r.time_unix_nano > 0, "envelope of {r:?}");
            ensure!(m.topic.ends_with(&format!("/{}", r.device)), "{} carries {}", m.topic, r.device);
            r.points
        } else {
            ensure!(m.payload.first() == Some(&b'{'), "uplink {uplink} sent non-JSON {:?}", m.payload);
            let j = m.json()?;
            ensure!(j["node"] == "test-node" && j["namespace"] == NAMESPACE, "envelope of {j}");
            ensure!(j["bufferSeq"].as_u64().unwrap_or(0) > 0 && j["timeUnixNano"].as_u64().unwrap_or(0) > 0, "{j}");
            let id = j["id"].as_str().unwrap_or_default();
            ensure!(id.starts_with(&format!("{NAMESPACE}/{}/", j["device"].as_str().unwrap_or("?"))), "id {id}");
            typed_points(&j, &points).with_context(|| format!("uplink {uplink}: {j}"))?
        };
        check_sim_reading(&typed, &points).with_context(|| format!("uplink {uplink}, topic {}", m.topic))?;
        *checked.entry(uplink).or_default() += 1;
    }
    assert_eq!(checked.len(), 4, "{checked:?}");
    eprintln!("checked readings per uplink: {checked:?}");

    // Each uplink has its own buffer (beside the bucket of buffer sequence records).
    let mut names = nats.stream_names().await?;
    names.retain(|n| n != "KV_fieldgate_buffer_seq");
    names.sort();
    assert_eq!(
        names,
        [
            "fieldgate_default_json-v3",
            "fieldgate_default_json-v5",
            "fieldgate_default_protobuf-v3",
            "fieldgate_default_protobuf-v5"
        ]
    );
    let status = gw.terminate().await?;
    assert!(status.success(), "{status}\n{}", gw.log());
    drop(fleet);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readings_survive_a_cloud_outage() -> Result<()> {
    let mut rig = rig("outage", &[Fault::None; 3], "200ms", |_| {}).await?;
    rig.cloud.wait_for_count(15, WAIT).await.with_context(|| rig.gw.log())?;

    rig.broker.stop().await?;
    let outage = Instant::now();
    let accepted_at_stop = metric_or_zero(&rig.metrics().await?, "fieldgate_readings_accepted_total", &[]);
    // At least 10 s down, seen by the gateway, with readings piling up in the buffer meanwhile.
    let r = wait_until("the gateway to see the cloud down for 10 s while buffering", WAIT, || async {
        let m = rig.metrics().await?;
        let down = metric_or_zero(&m, "fieldgate_uplink_connected", &[("uplink", UPLINK_LABEL)]) == 0.0;
        let accepted = metric_or_zero(&m, "fieldgate_readings_accepted_total", &[]);
        Ok((down && outage.elapsed() >= Duration::from_secs(10) && accepted >= accepted_at_stop + 10.0).then_some(()))
    })
    .await;
    r.with_context(|| rig.gw.log())?;
    rig.broker.start_again().await?;
    let back = Instant::now();
    // The first reading reaches the cloud soon after the broker is back (a figure, not an
    // assertion: the uplink probes an unreachable broker every second).
    let count = rig.cloud.count();
    rig.cloud.wait_for_count(count + 1, WAIT).await.with_context(|| rig.gw.log())?;
    let first_delivery = back.elapsed();
    // Fresh readings flow again, past the backlog.
    rig.wait_for_fresh().await?;

    let (report, m) = rig.drain_and_stop().await?;
    eprintln!(
        "cloud outage: {report}; first delivery {:.1} s after the broker came back; {}",
        first_delivery.as_secs_f64(),
        delivery_metrics(&m)
    );
    report.assert_complete()?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readings_survive_nats_sigkill() -> Result<()> {
    let mut rig = rig("nats-kill", &[Fault::None; 3], "200ms", |_| {}).await?;
    rig.cloud.wait_for_count(15, WAIT).await.with_context(|| rig.gw.log())?;

    rig.nats.kill()?;
    let killed = Instant::now();
    // The gateway keeps polling while its buffer is gone; give it a few seconds of that.
    wait_until("5 s of NATS being down", WAIT, || async {
        Ok((killed.elapsed() >= Duration::from_secs(5)).then_some(()))
    })
    .await?;
    rig.nats.start_again().await?;
    rig.wait_for_fresh().await?;

    let (report, metrics) = rig.drain_and_stop().await?;
    eprintln!(
        "nats sigkill: {report}; dropped while NATS was down: {}",
        metric_or_zero(&metrics, "fieldgate_readings_dropped_total", &[("reason", "buffer_unavailable")])
    );
    report.assert_complete()?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readings_survive_gateway_sigkill() -> Result<()> {
    let mut rig = rig("gateway-kill", &[Fault::None; 3], "200ms", |_| {}).await?;
    rig.cloud.wait_for_count(15, WAIT).await.with_context(|| rig.gw.log())?;

    rig.gw.kill()?;
    rig.gw.start_ready().await?;
    rig.wait_for_fresh().await?;
    // And a second crash, this time right after a restart.
    rig.gw.kill()?;
    rig.gw.start_ready().await?;
    rig.wait_for_fresh().await?;
    // And a third one while a backlog is being delivered: many deliveries in flight.
    rig.broker.stop().await?;
    let stream = stream_name(NAMESPACE, UPLINK);
    let r = wait_until("a backlog of 60 readings", WAIT, || async {
        Ok((rig.nats.stream_state(&stream).await?.messages >= 60).then_some(()))
    })
    .await;
    r.with_context(|| rig.gw.log())?;
    let seen = rig.cloud.count();
    rig.broker.start_again().await?;
    rig.cloud.wait_for_count(seen + 1, WAIT).await.with_context(|| rig.gw.log())?;
    rig.gw.kill()?;
    rig.gw.start_ready().await?;
    rig.wait_for_fresh().await?;

    let (report, m) = rig.drain_and_stop().await?;
    eprintln!("gateway sigkill: {report}; {} (last run only)", delivery_metrics(&m));
    report.assert_complete()?;
    Ok(())
}

/// Fills a 64Ki buffer while the cloud is down and checks the policy and the accounting.
async fn fill_buffer(policy: OnFull) -> Result<()> {
    let name = format!("full-{policy:?}").to_lowercase();
    // A small in-flight window, so that the outage piles up far more than the gateway holds
    // in memory and the buffer really has to apply its policy.
    // Eight devices polled in the same slots: their readings reach the buffer together, so
    // entries hold several readings and evictions take several at once.
    let mut rig = rig(&name, &[Fault::None; 8], "50ms", |u| {
        set_buffer(u, "64Ki", policy);
        mqtt_of(u).max_in_flight = Some(16);
    })
    .await?;
    let (reason, other) = match policy {
        OnFull::RejectNew => ("buffer_full_rejected", "buffer_full_evicted"),
        OnFull::DropOldest => ("buffer_full_evicted", "buffer_full_rejected"),
    };
    rig.cloud.wait_for_count(10, WAIT).await.with_context(|| rig.gw.log())?;

    rig.broker.stop().await?;
    match policy {
        OnFull::RejectNew => {
            rig.gw
                .wait_metric(
                    "fieldgate_readings_dropped_total",
                    &[("uplink", UPLINK_LABEL), ("reason", reason)],
                    WAIT,
                    |v| v >= 20.0,
                )
                .await?;
        }
        OnFull::DropOldest => {
            // The gateway may count an eviction only when its consumer notices the gap, so
            // watch the buffer itself: with the cloud away nothing is acked, so a first
            // sequence moving on means JetStream evicted the oldest entries.
            let stream = stream_name(NAMESPACE, UPLINK);
            let first_at_stop = rig.nats.stream_state(&stream).await?.last_sequence + 1;
            let r = wait_until("the full buffer to evict 100 entries", WAIT, || async {
                let state = rig.nats.stream_state(&stream).await?;
                Ok((state.first_sequence >= first_at_stop + 100).then_some(()))
            })
            .await;
            r.with_context(|| rig.gw.log())?;
            // Evictions only while the cloud is away.
            rig.fleet.stop().await;
        }
    }
    rig.broker.start_again().await?;
    rig.gw.wait_metric("fieldgate_uplink_connected", &[("uplink", UPLINK_LABEL)], WAIT, |v| v == 1.0).await?;

    let entries = rig.nats.stream_state(&stream_name(NAMESPACE, UPLINK)).await?.last_sequence;
    let (report, m) = rig.drain_and_stop_with(&[reason, "max_age_expired"]).await?;
    let received = metric_or_zero(&m, "fieldgate_readings_received_total", &[]);
    let accepted = metric_or_zero(&m, "fieldgate_readings_accepted_total", &[("uplink", UPLINK_LABEL)]);
    let dropped = metric_or_zero(&m, "fieldgate_readings_dropped_total", &[]);
    let by_policy = metric_or_zero(&m, "fieldgate_readings_dropped_total", &[("reason", reason)]);
    let wrong = metric_or_zero(&m, "fieldgate_readings_dropped_total", &[("reason", other)]);
    eprintln!(
        "{policy:?}: {report}; {entries} buffer entries; received {received}, accepted {accepted}, dropped {dropped} ({reason} {by_policy})"
    );
    report.assert_consistent()?;
    ensure!(wrong == 0.0, "{policy:?} counted {wrong} drops as {other}");
    ensure!(entries < report.served as u64, "no buffer entry held more than one reading: {entries} entries, {report}");
    match policy {
        OnFull::RejectNew => {
            // What never arrived is what was refused, and the rest arrived. The devices' last
            // samples before the fleet stopped count as abandoned polls for the judge (it
            // cannot tell a poll cut short from one served), yet may have been refused; so may
            // a poll the stop cut before its sample was read (a reading without a sample).
            let (lost, abandoned) = (report.lost_count() as f64, report.abandoned_count() as f64);
            let cut = report.cut_polls_possible() as f64;
            ensure!(
                lost <= by_policy && by_policy <= lost + abandoned + cut,
                "{lost} samples never reached the cloud (and {abandoned} polls were abandoned, {cut} may have \
                 been cut) but {by_policy} were counted as {reason}: {report}"
            );
            ensure!(accepted == report.readings() as f64, "accepted {accepted} != delivered {}", report.readings());
            ensure!(
                received == report.readings() as f64 + dropped,
                "accounting does not close: received {received} != delivered {} + dropped {dropped}\n{report}",
                report.readings()
            );
        }
        OnFull::DropOldest => assert_policy_drops_close(&report, &m, reason)?,
    }
    Ok(())
}

/// Checks that the readings the buffer policy dropped (`reason`) are the ones that never
/// reached the cloud, and that the accounting closes. A delivery cut by the broker's stop can
/// reach the cloud without its PUBACK reaching the gateway; dropped afterwards, it is counted
/// as dropped. So the count may exceed what never arrived by at most the interrupted
/// deliveries, and may never fall short of it.
fn assert_policy_drops_close(report: &DeliveryReport, m: &str, reason: &str) -> Result<()> {
    let received = metric_or_zero(m, "fieldgate_readings_received_total", &[]);
    let dropped = metric_or_zero(m, "fieldgate_readings_dropped_total", &[]);
    let by_policy = metric_or_zero(m, "fieldgate_readings_dropped_total", &[("reason", reason)]);
    let interrupted =
        metric_or_zero(m, "fieldgate_deliveries_total", &[("uplink", UPLINK_LABEL), ("outcome", "interrupted")]);
    let missing = report.lost_count() as f64;
    ensure!(
        missing <= by_policy && by_policy <= missing + interrupted,
        "{missing} sequences never reached the cloud but {by_policy} drops ({reason}) were counted \
         ({interrupted} deliveries interrupted): {report}"
    );
    ensure!(
        received == report.readings() as f64 + dropped - (by_policy - missing),
        "accounting does not close: received {received} != delivered {} + dropped {dropped} \
         - dropped after reaching the cloud {}\n{report}",
        report.readings(),
        by_policy - missing
    );
    Ok(())
}

/// Delivered entries leave the buffer in one purge now and then (limits retention), so they
/// take room until released: a buffer smaller than a second of readings (`64Ki`; four
/// devices of 329 points every 50 ms, more than 64 KiB a second) with the cloud up releases them when full
/// instead of refusing new readings. Nothing is lost or counted dropped, and once drained the
/// stream holds nothing (nats-server's own count).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_buffer_smaller_than_a_second_of_readings_releases_what_was_delivered_and_refuses_nothing() -> Result<()> {
    let nats = NatsServer::start().await?;
    let fleet = SimFleet::start_with(&[Fault::None; 4], 300).await?;
    let (url, devices) = (nats.url(), fleet.gateway_devices("50ms"));
    let edit = |u: &mut GatewayUplink| set_buffer(u, "64Ki", OnFull::RejectNew);
    let mut rig = rig_on("release", nats, &url, fleet, devices, MosquittoOptions::default(), edit).await?;
    let stream = stream_name(NAMESPACE, UPLINK);
    // 200 readings: several times what the buffer holds went through it.
    let most = std::sync::atomic::AtomicU64::new(0);
    let r = wait_until("200 readings at the cloud", WAIT, || async {
        let state = rig.nats.stream_state(&stream).await?;
        most.fetch_max(state.bytes, std::sync::atomic::Ordering::Relaxed);
        Ok((rig.cloud.count() >= 200).then_some(()))
    })
    .await;
    r.with_context(|| rig.gw.log())?;
    let most = most.into_inner();
    let (report, m) = rig.drain_and_stop().await?;
    let state = rig.nats.stream_state(&stream).await?;
    let dropped = metric_or_zero(&m, "fieldgate_readings_dropped_total", &[]);
    eprintln!(
        "64Ki buffer, 4 devices of 329 points every 50ms: {report}; the stream held up to {most} bytes; \
         at the end {state:?}; dropped {dropped}"
    );
    report.assert_complete()?;
    ensure!(dropped == 0.0, "{dropped} readings counted dropped with the cloud up: {report}");
    ensure!(state.messages == 0, "delivered entries left in the stream: {state:?}");
    Ok(())
}

/// A buffer stream an earlier version left (interest retention, where each ack removed its
/// entry, and a consumer keeping its acks on disk) is taken over at start: nats-server reports
/// the stream under limits retention and the consumer in memory afterwards, and every reading
/// still arrives once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_buffer_stream_of_an_earlier_version_is_updated_in_place_and_delivers() -> Result<()> {
    let nats = NatsServer::start().await?;
    let stream = stream_name(NAMESPACE, UPLINK);
    let js = nats.jetstream().await?;
    js.create_stream(async_nats::jetstream::stream::Config {
        name: stream.clone(),
        subjects: vec![format!("fieldgate.{NAMESPACE}.{UPLINK}")],
        retention: async_nats::jetstream::stream::RetentionPolicy::Interest,
        discard: async_nats::jetstream::stream::DiscardPolicy::New,
        ..Default::default()
    })
    .await
    .map_err(|e| anyhow::anyhow!("creating the old stream: {e}"))?
    .create_consumer(async_nats::jetstream::consumer::pull::Config {
        durable_name: Some("uplink".to_string()),
        ack_policy: async_nats::jetstream::consumer::AckPolicy::Explicit,
        ..Default::default()
    })
    .await
    .map_err(|e| anyhow::anyhow!("creating the old consumer: {e}"))?;
    let fleet = SimFleet::start(&[Fault::None; 2]).await?;
    let (url, devices) = (nats.url(), fleet.gateway_devices("100ms"));
    let mut rig = rig_on("upgrade", nats, &url, fleet, devices, MosquittoOptions::default(), |_| {}).await?;
    rig.cloud.wait_for_count(20, WAIT).await.with_context(|| rig.gw.log())?;
    let (report, _) = rig.drain_and_stop().await?;
    let mut s = js.get_stream(&stream).await.map_err(|e| anyhow::anyhow!("{e}"))?;
    let retention = s.info().await.map_err(|e| anyhow::anyhow!("{e}"))?.config.retention;
    let in_memory = s.consumer_info("uplink").await.map_err(|e| anyhow::anyhow!("{e}"))?.config.memory_storage;
    eprintln!("stream of an earlier version: {report}; retention now {retention:?}, consumer in memory: {in_memory}");
    report.assert_complete()?;
    ensure!(
        retention == async_nats::jetstream::stream::RetentionPolicy::Limits,
        "the stream kept {retention:?} retention"
    );
    ensure!(in_memory, "the consumer still keeps its acknowledgements on disk");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn full_buffer_applies_policy_and_counts_every_drop() -> Result<()> {
    fill_buffer(OnFull::RejectNew).await.context("onFull: rejectNew")?;
    fill_buffer(OnFull::DropOldest).await.context("onFull: dropOldest")?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_faulty_device_does_not_disturb_the_others() -> Result<()> {
    let faults = [Fault::None, Fault::None, Fault::Timeout, Fault::Exception, Fault::Garbage, Fault::Reset];
    let mut rig = rig("faulty", &faults, "200ms", |_| {}).await?;
    let healthy: Vec<String> = rig.fleet.devices()[..2].iter().map(|d| d.key()).collect();
    let wanted = 15;
    let cloud = &rig.cloud;
    let r = wait_until(&format!("{wanted} readings of each healthy device"), WAIT, || async {
        let counts = per_device(&cloud.keys()?);
        Ok(healthy.iter().all(|d| counts.get(d).copied().unwrap_or(0) >= wanted).then_some(counts))
    })
    .await;
    let counts = r.with_context(|| rig.gw.log())?;

    let expected = [(2, "timeout"), (3, "exception"), (4, "protocol"), (5, "io")];
    let devices = rig.fleet.devices().to_vec();
    let r = wait_until("every fault to be counted with its kind", WAIT, || async {
        let m = rig.metrics().await?;
        Ok(expected
            .iter()
            .all(|(i, kind)| {
                metric_or_zero(&m, "fieldgate_device_errors_total", &[("device", &devices[*i].key()), ("kind", kind)])
                    > 0.0
            })
            .then_some(m))
    })
    .await;
    let m = match r {
        Ok(m) => m,
        Err(e) => {
            let m = rig.metrics().await?;
            let errors: Vec<&str> = m.lines().filter(|l| l.starts_with("fieldgate_device_errors")).collect();
            bail!("{e:#}\n{}\n{}", errors.join("\n"), rig.gw.log());
        }
    };
    for d in &healthy {
        // Not asserted: on a busy machine a healthy device may time out now and then.
        let errors = metric_or_zero(&m, "fieldgate_device_errors_total", &[("device", d)]);
        eprintln!("healthy device {d}: {errors} errors");
    }
    for (i, _) in expected {
        let key = devices[i].key();
        ensure!(!counts.contains_key(&key), "faulty device {key} delivered readings");
    }
    let (report, _) = rig.drain_and_stop().await?;
    report.assert_complete()?;
    eprintln!("faulty devices: healthy readings {counts:?}; {report}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_and_password_uplink_delivers() -> Result<()> {
    let pki = TestPki::generate()?;
    let nats = NatsServer::start().await?;
    let broker = Mosquitto::start_with(MosquittoOptions {
        tls: Some(MosquittoTls { pki: pki.clone(), require_certificate: true }),
        password: Some(("gateway".into(), "pa55-w0rd".into())),
        acl: None,
        bridges: Vec::new(),
    })
    .await?;
    let secure = broker.secure_url().context("secure listener")?;
    let cloud = CloudSubscriber::start(&broker.url(), "cloud-tls", TELEMETRY).await?;
    let fleet = SimFleet::healthy(2).await?;
    let config = ConfigBuilder::new()
        .devices(fleet.gateway_devices("200ms"))
        .cloud(&secure, |u| {
            mqtt_of(u).auth = Some(MqttAuth { secret_ref: SecretRef { name: "cloud-creds".into() } });
            mqtt_of(u).tls = Some(MqttTls {
                ca_secret_ref: Some(SecretKeyRef { name: "cloud-ca".into(), key: None }),
                client_cert_secret_ref: Some(SecretRef { name: "gateway-cert".into() }),
            });
        })
        .yaml()?;
    let mut gw = Gateway::new(&nats.url())?;
    gw.write_secret("cloud-creds", "username", "gateway")?;
    gw.write_secret("cloud-creds", "password", "pa55-w0rd")?;
    gw.write_secret("cloud-ca", "ca.crt", &pki.ca_cert)?;
    gw.write_secret("gateway-cert", "tls.crt", &pki.client_cert)?;
    gw.write_secret("gateway-cert", "tls.key", &pki.client_key)?;
    gw.write_config(&config)?;
    gw.start_ready().await?;
    cloud
        .wait_for_count(20, WAIT)
        .await
        .with_context(|| format!("{}\n--- mosquitto ---\n{}", gw.log(), broker.log_tail()))?;
    let j = cloud.messages()[0].json()?;
    ensure!(j["node"] == "test-node", "{j}");
    let status = gw.terminate().await?;
    ensure!(status.success(), "{status}");
    Ok(())
}

/// Readings older than the buffer's `maxAge` expire while the cloud is away: each is counted
/// as `max_age_expired`, once, and the rest arrive.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readings_past_max_age_expire_and_are_counted() -> Result<()> {
    let mut rig = rig("max-age", &[Fault::None; 4], "100ms", |u| {
        u.buffer.get_or_insert_with(Default::default).max_age = Some("2s".parse().unwrap());
    })
    .await?;
    rig.cloud.wait_for_count(10, WAIT).await.with_context(|| rig.gw.log())?;
    rig.broker.stop().await?;
    rig.gw
        .wait_metric(
            "fieldgate_readings_dropped_total",
            &[("uplink", UPLINK_LABEL), ("reason", "max_age_expired")],
            WAIT,
            |v| v >= 40.0,
        )
        .await?;
    rig.broker.start_again().await?;
    rig.gw.wait_metric("fieldgate_uplink_connected", &[("uplink", UPLINK_LABEL)], WAIT, |v| v == 1.0).await?;
    let (report, m) = rig.drain_and_stop_with(&["buffer_full_evicted", "max_age_expired"]).await?;
    eprintln!(
        "max age: {report}; expired {}, {}",
        metric_or_zero(&m, "fieldgate_readings_dropped_total", &[("reason", "max_age_expired")]),
        delivery_metrics(&m)
    );
    report.assert_consistent()?;
    ensure!(
        metric_or_zero(&m, "fieldgate_readings_dropped_total", &[("reason", "buffer_full_evicted")]) == 0.0,
        "expiry counted as eviction"
    );
    assert_policy_drops_close(&report, &m, "max_age_expired")
}

/// A broker that refuses one device's topic (ACL) to an MQTT `version` uplink: the samples
/// each device served, judged at the cloud, and the gateway's metrics at the end.
async fn refused_topic(version: u8) -> Result<(Rig, DeliveryReport, String, String)> {
    let denied = "sim-0001";
    let acl = vec![format!("topic deny fieldgate/{NAMESPACE}/{denied}/telemetry"), "topic readwrite #".to_string()];
    let options = MosquittoOptions { acl: Some(acl), ..Default::default() };
    // Three devices polled in the same slots: entries hold readings of all three, so a refused
    // reading shares its entry with readings the broker confirms.
    let mut rig = rig_with(&format!("refused-v{version}"), &[Fault::None; 3], "100ms", options, |u| {
        mqtt_of(u).protocol_version = Some(version);
    })
    .await?;
    let key = format!("{NAMESPACE}/{denied}");
    let others: Vec<String> = rig.fleet.devices().iter().map(|d| d.key()).filter(|k| *k != key).collect();
    let cloud = &rig.cloud;
    let r = wait_until("30 readings of each allowed device", WAIT, || async {
        let counts = per_device(&cloud.keys()?);
        Ok(others.iter().all(|d| counts.get(d).copied().unwrap_or(0) >= 30).then_some(()))
    })
    .await;
    r.with_context(|| rig.gw.log())?;
    let (report, m) = rig.drain_and_stop_with_lost(&key).await?;
    Ok((rig, report, m, key))
}

impl Rig {
    /// [`Rig::drain_and_stop`] where every sample of `device` may be lost.
    async fn drain_and_stop_with_lost(&mut self, device: &str) -> Result<(DeliveryReport, String)> {
        self.fleet.stop().await;
        let stream = stream_name(NAMESPACE, UPLINK);
        let r = wait_until("the buffer to drain to the cloud", WAIT, || async {
            let state = self.nats.stream_state(&stream).await?;
            let report = self.report()?;
            let others_lost = report.lost.iter().filter(|(d, _)| d.as_str() != device).count();
            Ok((state.messages == 0 && others_lost == 0).then_some(()))
        })
        .await;
        let metrics = self.metrics().await?;
        if let Err(e) = r {
            bail!("{e:#}\n{}\n{}", self.report()?, self.gw.log());
        }
        let status = self.gw.terminate().await?;
        ensure!(status.success(), "graceful stop exited with {status}\n{}", self.gw.log());
        Ok((self.report()?, metrics))
    }
}

/// MQTT 5: a broker refusing one device's topic (ACL, PUBACK `0x87` NotAuthorized). Each
/// refused reading is dropped and counted once (`refused`), not sent again, while the other
/// devices' readings — stored in the same buffer entries — flow, and nothing the broker
/// confirmed reaches the cloud twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broker_refusing_one_topic_drops_only_its_readings_and_counts_each_once() -> Result<()> {
    let (rig, report, m, denied) = refused_topic(5).await?;
    let refused =
        metric_or_zero(&m, "fieldgate_readings_dropped_total", &[("uplink", UPLINK_LABEL), ("reason", "refused")]);
    let lost_denied = report.lost.get(&denied).map_or(0, Vec::len);
    eprintln!(
        "refused topic (MQTT 5): {report}; refused and counted {refused}; {}; duplicates per refused reading {:.3}",
        delivery_metrics(&m),
        report.duplicates as f64 / refused.max(1.0)
    );
    report.assert_consistent()?;
    ensure!(report.lost.keys().all(|d| *d == denied), "readings of allowed devices were lost: {report}");
    ensure!(lost_denied > 0, "the refused device's readings were not refused: {report}\n{}", rig.gw.log());
    ensure!(!per_device(&rig.keys()?).contains_key(&denied), "a reading of the refused topic reached the cloud");
    // Every refused reading is counted exactly once: as many as the judge saw lost, plus at
    // most the device's last sample before the fleet stopped, which the judge cannot tell
    // from an abandoned poll, and per connection one poll the stop cut after its first
    // requests answered (a reading without a sample, refused like the others).
    let abandoned_denied = report.abandoned.get(&denied).map_or(0, Vec::len);
    let cut_denied = report.connections.get(&denied).copied().unwrap_or(0);
    ensure!(
        lost_denied as f64 <= refused && refused <= (lost_denied + abandoned_denied + cut_denied) as f64,
        "{lost_denied} readings refused at the cloud (and {abandoned_denied} abandoned polls, \
         {cut_denied} connections that may end in a cut poll), {refused} counted as refused"
    );
    // Nothing the broker confirmed was sent again: a duplicate at the cloud can only be a
    // reading whose PUBACK never came (mosquitto 2.0.11 drops the connection after each
    // refusal, cutting the acknowledgements of the publishes behind it).
    let interrupted =
        metric_or_zero(&m, "fieldgate_deliveries_total", &[("uplink", UPLINK_LABEL), ("outcome", "interrupted")]);
    ensure!(
        report.duplicates as f64 <= interrupted,
        "{} duplicates at the cloud but only {interrupted} deliveries were interrupted: {report}",
        report.duplicates
    );
    let log = rig.gw.log();
    let warnings = log.matches("refused a reading for good").count();
    ensure!(warnings <= 3, "{warnings} refusal warnings for {refused} refusals (rate limit)");
    Ok(())
}

/// MQTT 3.1.1 cannot report a refusal: mosquitto acknowledges a publish its ACL denies and
/// discards it. The refused device's readings are lost *invisibly to the gateway* (counted as
/// delivered, not dropped) — the documented limitation; the other devices are undisturbed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mqtt_3_1_1_cannot_report_a_refusal_so_the_gateway_counts_it_delivered() -> Result<()> {
    let (_rig, report, m, denied) = refused_topic(3).await?;
    let refused = metric_or_zero(&m, "fieldgate_readings_dropped_total", &[("reason", "refused")]);
    eprintln!("refused topic (MQTT 3.1.1): {report}; counted refused {refused}; {}", delivery_metrics(&m));
    report.assert_consistent()?;
    ensure!(report.lost.keys().all(|d| *d == denied), "readings of allowed devices were lost: {report}");
    ensure!(report.lost.get(&denied).is_some_and(|l| !l.is_empty()), "the denied topic was not denied: {report}");
    ensure!(refused == 0.0, "an MQTT 3.1.1 uplink cannot see refusals, yet counted {refused}");
    Ok(())
}

/// A gateway restarted (gracefully, then killed) inside one poll interval reads the same poll
/// slot again: the second sample of the slot shares the first one's reading id, and both
/// arrive — nothing served is lost, and no `bufferSeq` carries two samples.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gateway_restarted_inside_one_poll_interval_loses_nothing() -> Result<()> {
    let mut rig = rig("restart-in-slot", &[Fault::None; 2], "5s", |_| {}).await?;
    rig.cloud.wait_for_count(2, WAIT).await.with_context(|| rig.gw.log())?;
    let status = rig.gw.terminate().await?;
    ensure!(status.success(), "graceful stop exited with {status}\n{}", rig.gw.log());
    rig.gw.start_ready().await?;
    rig.wait_for_fresh().await?;
    rig.gw.kill()?;
    rig.gw.start_ready().await?;
    rig.wait_for_fresh().await?;
    let (report, m) = rig.drain_and_stop().await?;
    let keys = rig.keys()?;
    let mut ids: BTreeMap<&str, usize> = BTreeMap::new();
    for k in &keys {
        *ids.entry(k.id.as_str()).or_default() += 1;
    }
    let shared = ids.values().filter(|n| **n > 1).count();
    eprintln!(
        "restart inside one poll interval: {report}; reading ids carried by two samples {shared}; {}",
        delivery_metrics(&m)
    );
    report.assert_complete()
}

/// One device's readings are larger than NATS takes (`max_payload` 8 KiB, 1,029 points), the
/// others' small: the buffer stores every entry that mixes them in halves until the large
/// reading goes alone, drops it and counts it (`too_large`), and every other reading arrives.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reading_too_large_alone_is_dropped_and_counted_while_the_others_arrive() -> Result<()> {
    let nats = NatsServer::start_with(NatsOptions { max_payload: Some(8 * 1024) }).await?;
    let fleet = SimFleet::start_with(&[Fault::None; 4], 1000).await?;
    let fixed = fieldgate_sim::simulated_points(0).len();
    let mut devices = fleet.gateway_devices("200ms");
    // Device 0 reads all 1,029 points; the others only the fixed ones.
    for d in &mut devices[1..] {
        d.points.truncate(fixed);
    }
    let url = nats.url();
    let mut rig = rig_on("too-large", nats, &url, fleet, devices, MosquittoOptions::default(), |_| {}).await?;
    let big = rig.fleet.devices()[0].key();
    let small: Vec<String> = rig.fleet.devices()[1..].iter().map(|d| d.key()).collect();
    let cloud = &rig.cloud;
    let r = wait_until("20 readings of each small device", WAIT, || async {
        let counts = per_device(&cloud.keys()?);
        Ok(small.iter().all(|d| counts.get(d).copied().unwrap_or(0) >= 20).then_some(()))
    })
    .await;
    r.with_context(|| rig.gw.log())?;
    rig.gw.wait_metric("fieldgate_readings_dropped_total", &[("reason", "too_large")], WAIT, |v| v >= 5.0).await?;
    let (report, m) = rig.drain_and_stop_with_lost(&big).await?;
    let too_large = metric_or_zero(&m, "fieldgate_readings_dropped_total", &[("reason", "too_large")]);
    let (lost_big, abandoned_big) =
        (report.lost.get(&big).map_or(0, Vec::len), report.abandoned.get(&big).map_or(0, Vec::len));
    eprintln!("too large: {report}; counted too_large {too_large}; {}", delivery_metrics(&m));
    report.assert_consistent()?;
    ensure!(report.lost.keys().all(|d| *d == big), "readings of the small devices were lost: {report}");
    // A poll the stop cut before the holding registers (coils only, no sample) is small and
    // may arrive; no sample of the large device may.
    let sampled: Vec<ReadingKey> = rig.keys()?.into_iter().filter(|k| k.sample.is_some()).collect();
    ensure!(!per_device(&sampled).contains_key(&big), "a sample of the large device reached the cloud");
    ensure!(lost_big > 0, "the large device served nothing: {report}");
    // Each too-large reading is counted once: as many as the judge saw lost, plus at most the
    // last sample before the fleet stopped (which the judge counts as an abandoned poll).
    ensure!(
        lost_big as f64 <= too_large && too_large <= (lost_big + abandoned_big) as f64,
        "{lost_big} readings of the large device never arrived ({abandoned_big} abandoned), {too_large} counted too_large"
    );
    ensure!(report.duplicates == 0, "duplicates without any outage: {report}");
    Ok(())
}

/// A PubAck lost on its way to the gateway (a proxy between the gateway and nats-server
/// swallows one): the entry was stored, the gateway cannot tell, retries it under its id and
/// recognises it. Every reading arrives once, nothing is counted dropped, no `bufferSeq`
/// carries two samples.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_ambiguous_publish_is_stored_once_and_delivered_once() -> Result<()> {
    let nats = NatsServer::start().await?;
    let proxy = NatsProxy::start(nats.port()).await?;
    let fleet = SimFleet::start(&[Fault::None; 3]).await?;
    let devices = fleet.gateway_devices("100ms");
    let mut rig = rig_on("ambiguous", nats, &proxy.url(), fleet, devices, MosquittoOptions::default(), |_| {}).await?;
    rig.cloud.wait_for_count(15, WAIT).await.with_context(|| rig.gw.log())?;

    proxy.drop_next_pub_ack(&stream_name(NAMESPACE, UPLINK));
    let dropped = wait_until("the proxy to swallow a PubAck of the buffer", WAIT, || async {
        Ok(proxy.dropped().first().copied())
    })
    .await?;
    // Readings flow again past the ambiguous entry (its publish timed out and was retried).
    rig.wait_for_fresh().await?;
    let (report, m) = rig.drain_and_stop().await?;
    let dropped_total = metric_or_zero(&m, "fieldgate_readings_dropped_total", &[]);
    eprintln!(
        "ambiguous publish (PubAck of stream sequence {dropped} swallowed): {report}; dropped {dropped_total}; {}",
        delivery_metrics(&m)
    );
    report.assert_complete()?;
    ensure!(report.duplicates == 0, "the ambiguous entry reached the cloud twice: {report}");
    ensure!(dropped_total == 0.0, "{dropped_total} readings counted as dropped for an entry that was stored");
    Ok(())
}

impl Rig {
    /// Waits until the cloud has at least `at_least` messages, the buffer is empty and the
    /// sequence record of its last entry is written (a restart then finds an empty buffer).
    async fn wait_drained(&self, at_least: usize) -> Result<()> {
        let stream = stream_name(NAMESPACE, UPLINK);
        wait_until("the buffer to drain and its sequence record to be written", WAIT, || async {
            let state = self.nats.stream_state(&stream).await?;
            let record = self.nats.kv_get("fieldgate_buffer_seq", &stream).await?;
            let current = record.is_some_and(|r| {
                String::from_utf8_lossy(&r).split(' ').next() == Some(&state.last_sequence.to_string())
            });
            Ok((state.messages == 0 && current && self.cloud.count() >= at_least).then_some(()))
        })
        .await
        .with_context(|| self.gw.log())
    }
}

/// `bufferSeq` numbers an uplink's readings without a gap across gateway restarts on an empty
/// buffer (a graceful stop, then a crash right after the buffer drained): the cloud receives
/// 1, 2, 3, ... with no number skipped and none reused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn buffer_seq_continues_without_a_gap_across_restarts_on_an_empty_buffer() -> Result<()> {
    let mut rig = rig("seq-continues", &[Fault::None; 2], "500ms", |_| {}).await?;
    rig.cloud.wait_for_count(6, WAIT).await.with_context(|| rig.gw.log())?;
    rig.wait_drained(6).await?;
    let status = rig.gw.terminate().await?;
    ensure!(status.success(), "graceful stop exited with {status}\n{}", rig.gw.log());
    rig.gw.start_ready().await?;
    rig.wait_for_fresh().await?;
    let seen = rig.cloud.count();
    rig.wait_drained(seen).await?;
    rig.gw.kill()?;
    rig.gw.start_ready().await?;
    rig.wait_for_fresh().await?;
    let (report, _) = rig.drain_and_stop().await?;
    report.assert_consistent()?;
    let mut seqs: Vec<u64> = rig.keys()?.iter().map(|k| k.buffer_seq).collect();
    seqs.sort_unstable();
    seqs.dedup();
    let expected: Vec<u64> = (1..=seqs.len() as u64).collect();
    eprintln!(
        "bufferSeq across restarts: {} distinct, 1..={}; {report}",
        seqs.len(),
        seqs.last().copied().unwrap_or(0)
    );
    ensure!(seqs == expected, "bufferSeq has gaps or jumps: [{}]", fieldgate_tests::delivery::ranges(&seqs));
    Ok(())
}

/// `buffer.linger`: the readings of one poll slot (four devices polled together) wait for
/// each other and are stored as one buffer entry, and every one of them still arrives once.
/// Entries are counted by nats-server (the stream's last sequence), readings by the cloud.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_buffer_linger_stores_the_readings_of_a_poll_slot_together_and_loses_none() -> Result<()> {
    let mut rig = rig("linger", &[Fault::None; 4], "500ms", |u| {
        u.buffer.get_or_insert_with(Default::default).linger = Some("300ms".parse().expect("a duration"));
    })
    .await?;
    rig.cloud.wait_for_count(40, WAIT).await.with_context(|| rig.gw.log())?;
    let (report, _) = rig.drain_and_stop().await?;
    let entries = rig.nats.stream_state(&stream_name(NAMESPACE, UPLINK)).await?.last_sequence;
    eprintln!("linger 300ms, 4 devices every 500ms: {report}; {entries} buffer entries");
    report.assert_complete()?;
    ensure!(report.duplicates == 0, "duplicates without any outage: {report}");
    // Without a linger the first reading of a slot goes alone and the other three follow in
    // a second entry (or more); with it, a slot's four readings share one entry.
    ensure!(
        entries * 3 <= report.served as u64,
        "{entries} entries for {} readings: the slot's readings were not stored together",
        report.served
    );
    Ok(())
}
