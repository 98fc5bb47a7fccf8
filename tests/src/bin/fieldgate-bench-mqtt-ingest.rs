//! MQTT device ingest benchmark, QoS 1 end to end: a publisher on the field mosquitto ->
//! gateway (each message acked to the field broker after JetStream accepted it) -> NATS
//! (sync always) -> uplink -> cloud mosquitto -> a counting subscriber. Ceiling: the same
//! publisher straight to the cloud mosquitto with the same subscriber.
//!
//!     cargo build --release --workspace --bins && target/release/fieldgate-bench-mqtt-ingest

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use clap::Parser;
use fieldgate_crds::GatewayDevice;
use fieldgate_tests::Mosquitto;
use fieldgate_tests::config::{ConfigBuilder, mqtt_of};
use fieldgate_tests::listening::ListeningGateway;
use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};
use tokio::time::Instant;

#[derive(Parser, Debug)]
#[command(about = "Fieldgate MQTT ingest benchmark")]
struct Args {
    /// Messages per run (150,000: about 5 s per side; shorter runs are dominated by start-up).
    #[arg(long, default_value_t = 150_000)]
    messages: u64,
    /// Devices (topics) the messages are spread over.
    #[arg(long, default_value_t = 8)]
    devices: usize,
    /// Publisher's QoS 1 window.
    #[arg(long, default_value_t = 200)]
    inflight: u16,
    /// JetStream `sync_interval` of the NATS server (`always` is the delivery contract's
    /// default; `2m` shows the cost of an fsync per message).
    #[arg(long, default_value = "always")]
    nats_sync: String,
}

/// Counts QoS 1 messages matching `filter`.
async fn counter(port: u16, id: &str, filter: &str) -> Result<(Arc<AtomicU64>, tokio::task::JoinHandle<()>)> {
    let mut o = MqttOptions::new(id, "127.0.0.1", port);
    o.set_keep_alive(Duration::from_secs(30)).set_inflight(1000);
    let (client, mut el) = AsyncClient::new(o, 1024);
    client.subscribe(filter, QoS::AtLeastOnce).await?;
    let count = Arc::new(AtomicU64::new(0));
    let c = Arc::clone(&count);
    let (tx, rx) = tokio::sync::oneshot::channel();
    let mut tx = Some(tx);
    let task = tokio::spawn(async move {
        let _client = client;
        loop {
            match el.poll().await {
                Ok(Event::Incoming(Packet::SubAck(_))) => {
                    if let Some(t) = tx.take() {
                        let _ = t.send(());
                    }
                }
                Ok(Event::Incoming(Packet::Publish(_))) => {
                    c.fetch_add(1, Ordering::Relaxed);
                }
                Ok(_) => {}
                Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
            }
        }
    });
    tokio::time::timeout(Duration::from_secs(30), rx).await.context("no SUBACK")??;
    Ok((count, task))
}

/// Publishes `n` QoS 1 messages round robin over `topics`; returns when all were PUBACKed.
async fn publish(port: u16, topics: &[String], n: u64, inflight: u16) -> Result<()> {
    let mut o = MqttOptions::new(format!("bench-publisher-{port}"), "127.0.0.1", port);
    o.set_keep_alive(Duration::from_secs(30)).set_inflight(inflight);
    let (client, mut el) = AsyncClient::new(o, 4096);
    let topics = topics.to_vec();
    let sender = tokio::spawn(async move {
        for i in 0..n {
            let t = &topics[(i % topics.len() as u64) as usize];
            if client.publish(t.clone(), QoS::AtLeastOnce, false, i.to_string().into_bytes()).await.is_err() {
                return client;
            }
        }
        client
    });
    let mut acked = 0;
    while acked < n {
        match el.poll().await {
            Ok(Event::Incoming(Packet::PubAck(_))) => acked += 1,
            Ok(_) => {}
            Err(e) => bail!("publisher: {e}"),
        }
    }
    let client = sender.await?;
    let _ = client.disconnect().await;
    Ok(())
}

async fn wait_count(count: &AtomicU64, n: u64, timeout: Duration) -> Result<()> {
    let deadline = Instant::now() + timeout;
    while count.load(Ordering::Relaxed) < n {
        if Instant::now() > deadline {
            bail!("only {} of {n} messages arrived within {timeout:?}", count.load(Ordering::Relaxed));
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Ok(())
}

#[tokio::main(flavor = "multi_thread")]
async fn main() -> Result<()> {
    let args = Args::parse();
    let n = args.messages;
    let cloud = Mosquitto::start().await?;

    // Ceiling: straight to the cloud broker.
    let (count, _t) = counter(cloud.port(), "ceiling-counter", "ceiling/#").await?;
    let topics: Vec<String> = (0..args.devices).map(|i| format!("ceiling/d{i}/v")).collect();
    let started = Instant::now();
    publish(cloud.port(), &topics, n, args.inflight).await?;
    wait_count(&count, n, Duration::from_secs(300)).await?;
    let ceiling = n as f64 / started.elapsed().as_secs_f64();
    println!("ceiling: {n} QoS 1 messages publisher -> cloud mosquitto -> subscriber: {ceiling:.0} msg/s");

    // Through the gateway.
    let field = Mosquitto::start().await?;
    let nats = fieldgate_tests::bench_nats::BenchNats::start(Some(&args.nats_sync)).await?;
    let devices: Vec<GatewayDevice> = (0..args.devices)
        .map(|i| {
            serde_json::from_value(serde_json::json!({"name": format!("d{i}"),
                "connection": {"mqtt": {"url": field.url(), "topics": [format!("bench/d{i}/#")]}},
                "points": [{"name": "v", "type": "uint64"}]}))
        })
        .collect::<Result<_, _>>()?;
    let config =
        ConfigBuilder::new().devices(devices).cloud(&cloud.url(), |u| mqtt_of(u).max_in_flight = Some(1000)).yaml()?;
    let mut gw = ListeningGateway::new(&nats.url())?;
    gw.gw.write_config(&config)?;
    gw.start_ready().await?;
    gw.wait_metric("fieldgate_device_connected", &[("protocol", "mqtt")], Duration::from_secs(60), |v| {
        v >= args.devices as f64
    })
    .await?;
    let (count, _t2) = counter(cloud.port(), "gateway-counter", "fieldgate/#").await?;
    let topics: Vec<String> = (0..args.devices).map(|i| format!("bench/d{i}/v")).collect();
    let started = Instant::now();
    publish(field.port(), &topics, n, args.inflight).await?;
    let published = started.elapsed();
    gw.wait_metric("fieldgate_readings_accepted_total", &[], Duration::from_secs(600), |v| v >= n as f64).await?;
    let accepted = started.elapsed();
    wait_count(&count, n, Duration::from_secs(600)).await.with_context(|| gw.log())?;
    let through = n as f64 / started.elapsed().as_secs_f64();
    println!(
        "fieldgate (NATS sync_interval {}): {n} QoS 1 messages field broker -> gateway -> JetStream -> cloud: {through:.0} msg/s; \
         accepted by JetStream at {:.0} msg/s; field publishes acked by the field broker after {:.2} s",
        args.nats_sync,
        n as f64 / accepted.as_secs_f64(),
        published.as_secs_f64()
    );
    println!(
        "RESULT mqtt ingest -> cloud: fieldgate {through:.0} msg/s vs direct {ceiling:.0} msg/s: ratio {:.2}",
        through / ceiling
    );
    let _ = gw.terminate().await;
    Ok(())
}
