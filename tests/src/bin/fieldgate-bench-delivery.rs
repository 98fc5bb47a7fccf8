//! The delivery benchmark: three figures of the delivery contract, each beside its target or
//! its peer, in one run on this machine.
//!
//!     cargo build --release --workspace --bins
//!     FIELDGATE_NATS_SERVER=.venv/bin/nats-server target/release/fieldgate-bench-delivery
//!
//! - **resume**: simulated devices -> gateway -> mosquitto; the broker stops for
//!   `--outage-secs` while a backlog builds, then starts again. Time from the broker accepting
//!   connections to the first reading the cloud subscriber receives (target <= 5 s; includes
//!   the subscriber's own reconnect, at most 200 ms).
//! - **refused**: an MQTT 5 broker denies one device's topic (ACL, PUBACK `0x87`) while three
//!   devices share buffer entries; readings the cloud received twice per refused reading
//!   (target 0). Refused readings are counted by the judge: samples of the denied device.
//! - **http**: a backlog of `--devices` devices built while the HTTP endpoint is down, then
//!   drained to it by the gateway (readings/s, first to last accepted request), beside the same
//!   server alone: a client POSTing the same request bodies with the same concurrency.

use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result, ensure};
use bytes::Bytes;
use clap::Parser;
use fieldgate_crds::Encoding;
use fieldgate_gateway::uplinks::http::batch_body;
use fieldgate_sim::Fault;
use fieldgate_tests::config::{ConfigBuilder, NAMESPACE, UPLINK, http_of, http_uplink, mqtt_of};
use fieldgate_tests::http_cloud::{HttpCloud, HttpCloudOptions};
use fieldgate_tests::procstat::machine;
use fieldgate_tests::sim_process::free_consecutive_ports;
use fieldgate_tests::{
    CloudSubscriber, Gateway, Mosquitto, MosquittoOptions, NatsServer, SimFleet, delivery_report, stream_name,
    wait_until,
};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use tokio::time::Instant;

const WAIT: Duration = Duration::from_secs(120);

#[derive(Parser, Debug, Clone)]
#[command(about = "Fieldgate delivery benchmark: resume time, duplicates per refusal, HTTP uplink rate")]
struct Args {
    /// Length of the broker outage in the resume scenario, seconds.
    #[arg(long, default_value_t = 10)]
    outage_secs: u64,
    /// Seconds the refused scenario runs.
    #[arg(long, default_value_t = 10)]
    refused_secs: u64,
    /// Devices feeding the HTTP backlog.
    #[arg(long, default_value_t = 20)]
    devices: usize,
    /// Seconds the HTTP backlog builds.
    #[arg(long, default_value_t = 20)]
    backlog_secs: u64,
    /// Readings per HTTP request (the uplink's maxBatch).
    #[arg(long, default_value_t = 500)]
    batch: u32,
    /// HTTP requests in flight (the uplink's maxInFlight).
    #[arg(long, default_value_t = 4)]
    in_flight: u16,
}

#[tokio::main]
async fn main() -> Result<()> {
    let args = Args::parse();
    println!("machine: {}", machine());
    let resume = resume(&args).await.context("resume scenario")?;
    println!(
        "resume: first delivery {:.2} s after the broker was back (target <= 5 s) [{}]; machine: {}",
        resume.as_secs_f64(),
        if resume <= Duration::from_secs(5) { "met" } else { "NOT met" },
        machine()
    );
    let (refused, duplicates) = refused(&args).await.context("refused scenario")?;
    let per = if refused == 0 { f64::NAN } else { duplicates as f64 / refused as f64 };
    println!(
        "refused: {refused} readings refused for good, {duplicates} duplicates at the cloud: {per:.3} per refused reading (target 0) [{}]; machine: {}",
        if duplicates == 0 && refused > 0 { "met" } else { "NOT met" },
        machine()
    );
    let (gateway, alone, readings) = http(&args).await.context("http scenario")?;
    println!(
        "http: gateway drained {readings} readings at {gateway:.0} readings/s; the same server alone took the same request bodies at {alone:.0} readings/s ({:.0} %); machine: {}",
        100.0 * gateway / alone,
        machine()
    );
    Ok(())
}

/// Time from the broker back to the first reading at the cloud.
async fn resume(args: &Args) -> Result<Duration> {
    let nats = NatsServer::start().await?;
    let mut broker = Mosquitto::start().await?;
    let cloud = CloudSubscriber::start(&broker.url(), "bench-resume", "fieldgate/#").await?;
    let fleet = SimFleet::healthy(4).await?;
    let config = ConfigBuilder::new().devices(fleet.gateway_devices("100ms")).cloud(&broker.url(), |_| {}).yaml()?;
    let mut gw = Gateway::new(&nats.url())?;
    gw.write_config(&config)?;
    gw.start_ready().await?;
    cloud.wait_for_count(20, WAIT).await.with_context(|| gw.log())?;
    broker.stop().await?;
    // The outage: a bench may wait a fixed time (the backlog builds meanwhile).
    tokio::time::sleep(Duration::from_secs(args.outage_secs)).await;
    broker.start_again().await?;
    let back = Instant::now();
    let before = cloud.count();
    cloud.wait_for_count(before + 1, WAIT).await.with_context(|| gw.log())?;
    let first = cloud.messages()[before..].iter().map(|m| m.at).min().unwrap_or(back);
    let _ = gw.terminate().await;
    Ok(first.saturating_duration_since(back))
}

/// Readings refused for good (judged) and duplicates at the cloud.
async fn refused(args: &Args) -> Result<(usize, usize)> {
    let denied = "sim-0001";
    let acl = vec![format!("topic deny fieldgate/{NAMESPACE}/{denied}/telemetry"), "topic readwrite #".to_string()];
    let nats = NatsServer::start().await?;
    let broker = Mosquitto::start_with(MosquittoOptions { acl: Some(acl), ..Default::default() }).await?;
    let cloud = CloudSubscriber::start(&broker.url(), "bench-refused", "fieldgate/#").await?;
    let mut fleet = SimFleet::start(&[Fault::None; 3]).await?;
    let config = ConfigBuilder::new()
        .devices(fleet.gateway_devices("100ms"))
        .cloud(&broker.url(), |u| mqtt_of(u).protocol_version = Some(5))
        .yaml()?;
    let mut gw = Gateway::new(&nats.url())?;
    gw.write_config(&config)?;
    gw.start_ready().await?;
    tokio::time::sleep(Duration::from_secs(args.refused_secs)).await;
    fleet.stop().await;
    let key = format!("{NAMESPACE}/{denied}");
    let stream = stream_name(NAMESPACE, UPLINK);
    wait_until("the buffer to drain", WAIT, || async {
        let report = delivery_report(&fleet.served(), &cloud.keys()?);
        let others_lost = report.lost.keys().filter(|d| **d != key).count();
        Ok((nats.stream_state(&stream).await?.messages == 0 && others_lost == 0).then_some(()))
    })
    .await
    .with_context(|| gw.log())?;
    let report = delivery_report(&fleet.served(), &cloud.keys()?);
    let _ = gw.terminate().await;
    ensure!(report.seq_conflicts.is_empty() && report.unknown.is_empty(), "{report}");
    Ok((report.lost.get(&key).map_or(0, Vec::len), report.duplicates))
}

/// Gateway readings/s draining a backlog to the endpoint, the server alone, readings drained.
async fn http(args: &Args) -> Result<(f64, f64, usize)> {
    let port = free_consecutive_ports(1)?;
    let url = format!("http://127.0.0.1:{port}/ingest");
    let nats = NatsServer::start().await?;
    let mut fleet = SimFleet::healthy(args.devices).await?;
    let mut u = http_uplink(UPLINK, &url);
    u.encoding = Some(Encoding::Json);
    http_of(&mut u).max_batch = Some(args.batch);
    http_of(&mut u).max_in_flight = Some(args.in_flight);
    let config = ConfigBuilder::new().devices(fleet.gateway_devices("100ms")).uplink(u).yaml()?;
    let mut gw = Gateway::new(&nats.url())?;
    gw.write_config(&config)?;
    gw.start_ready().await?;
    // The backlog builds while nothing listens on the port.
    tokio::time::sleep(Duration::from_secs(args.backlog_secs)).await;
    fleet.stop().await;
    let served: usize = fleet.served().values().map(Vec::len).sum();
    let cloud = HttpCloud::start_with(HttpCloudOptions { port: Some(port), ..Default::default() }).await?;
    cloud.wait_for_count(served.saturating_sub(args.devices), WAIT).await.with_context(|| gw.log())?;
    let stream = stream_name(NAMESPACE, UPLINK);
    wait_until("the buffer to drain", WAIT, || async {
        Ok((nats.stream_state(&stream).await?.messages == 0).then_some(()))
    })
    .await?;
    let _ = gw.terminate().await;
    let received = cloud.received();
    let accepted: Vec<_> = received.iter().filter(|r| (200..300).contains(&r.status)).collect();
    let readings: usize = accepted.iter().map(|r| r.readings.len()).sum();
    let (first, last) = (accepted.first().map(|r| r.at), accepted.last().map(|r| r.at));
    let (Some(first), Some(last)) = (first, last) else { anyhow::bail!("nothing arrived") };
    // From the first request's arrival to the last's: all requests but the first one's readings.
    let span = (last - first).as_secs_f64().max(1e-3);
    let gateway = (readings - accepted[0].readings.len()) as f64 / span;

    // The same server alone: the same bodies, the same concurrency, a fresh recording.
    let bodies: Vec<(Bytes, usize)> =
        accepted.iter().map(|r| (batch_body(Encoding::Json, &r.readings), r.readings.len())).collect();
    let alone = HttpCloud::start().await?;
    let client: Client<_, Full<Bytes>> = Client::builder(TokioExecutor::new()).build_http();
    let uri: http::Uri = alone.url().parse()?;
    let queue = Arc::new(tokio::sync::Mutex::new(bodies.into_iter()));
    let started = Instant::now();
    let mut workers = Vec::new();
    for _ in 0..args.in_flight {
        let (client, uri, queue) = (client.clone(), uri.clone(), Arc::clone(&queue));
        workers.push(tokio::spawn(async move {
            let mut sent = 0usize;
            loop {
                let next = queue.lock().await.next();
                let Some((body, n)) = next else { break };
                let req = http::Request::post(uri.clone())
                    .header(http::header::CONTENT_TYPE, "application/json")
                    .body(Full::new(body))?;
                let res = client.request(req).await?;
                ensure!(res.status().is_success(), "{}", res.status());
                res.into_body().collect().await?;
                sent += n;
            }
            anyhow::Ok(sent)
        }));
    }
    let mut sent = 0;
    for w in workers {
        sent += w.await??;
    }
    let alone_rate = sent as f64 / started.elapsed().as_secs_f64();
    Ok((gateway, alone_rate, readings))
}
