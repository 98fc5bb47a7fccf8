//! Seeing inside the gateway, with real processes: traces exported over OTLP to a recording
//! receiver, metrics scraped by a real Prometheus, the management API, and logs that never
//! print a secret.
//!
//! Needs `cargo build --workspace --bins` first (the tests run the gateway binary) and, for the
//! Prometheus test, the Debian package `prometheus` (scripts/setup.sh installs it).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeMap;
use std::time::Duration;

use anyhow::{Context, Result, bail, ensure};
use fieldgate_crds::{MqttAuth, SecretRef};
use fieldgate_tests::api::request;
use fieldgate_tests::cloud_v5::V5Subscriber;
use fieldgate_tests::config::{ConfigBuilder, mqtt_of};
use fieldgate_tests::mosquitto::mosquitto_passwd_binary;
use fieldgate_tests::otlp::{OtlpReceiver, RecordedSpan};
use fieldgate_tests::prometheus::{Prometheus, prometheus_binary};
use fieldgate_tests::{Gateway, Mosquitto, MosquittoOptions, NatsServer, SimFleet, wait_until};

/// Generous deadline for anything that should happen "soon" on a busy 2-core machine.
const WAIT: Duration = Duration::from_secs(90);
const TELEMETRY: &str = "fieldgate/#";

const READ: &str = "fieldgate.device.read";
const DECODE: &str = "fieldgate.decode";
const APPEND: &str = "fieldgate.buffer.append";
const BUFFER_WAIT: &str = "fieldgate.buffer.wait";
const PUBLISH: &str = "fieldgate.uplink.publish";

/// The spans of one reading's trace, from the `fieldgate.uplink.publish` span up to the root,
/// each the parent of the one before; `None` while a link of the chain is missing.
fn chain<'a>(spans: &'a [RecordedSpan], publish: &'a RecordedSpan) -> Option<Vec<&'a RecordedSpan>> {
    let by_id: BTreeMap<&str, &RecordedSpan> = spans.iter().map(|s| (s.span_id.as_str(), s)).collect();
    let mut out = vec![publish];
    let mut at = publish;
    while !at.parent_span_id.is_empty() {
        let parent = by_id.get(at.parent_span_id.as_str())?;
        if parent.trace_id != publish.trace_id {
            return None;
        }
        out.push(parent);
        at = parent;
    }
    Some(out)
}

/// Names along a chain, publish first.
fn names(chain: &[&RecordedSpan]) -> Vec<String> {
    chain.iter().map(|s| s.name.clone()).collect()
}

const CHAIN: [&str; 5] = [PUBLISH, BUFFER_WAIT, APPEND, DECODE, READ];

/// Publish spans confirmed by the broker's PUBACK whose whole chain arrived.
fn complete_chains(spans: &[RecordedSpan]) -> Vec<Vec<&RecordedSpan>> {
    spans
        .iter()
        .filter(|s| s.name == PUBLISH && s.events.iter().any(|e| e == "mqtt.puback") && s.status == 1)
        .filter_map(|p| chain(spans, p))
        .filter(|c| names(c) == CHAIN)
        .collect()
}

fn traced_gateway(nats: &NatsServer, otlp: &OtlpReceiver, ratio: &str) -> Result<Gateway> {
    let mut gw = Gateway::new(&nats.url())?;
    for (k, v) in otlp.env() {
        gw.env(k, v);
    }
    gw.arg(format!("--trace-sample-ratio={ratio}"));
    Ok(gw)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sampled_reading_is_one_trace_from_the_device_read_to_the_cloud_puback() -> Result<()> {
    let nats = NatsServer::start().await?;
    let broker = Mosquitto::start().await?;
    let cloud = V5Subscriber::start(&broker.url(), "cloud-trace", TELEMETRY).await?;
    let otlp = OtlpReceiver::start().await?;
    let fleet = SimFleet::healthy(1).await?;
    let config = ConfigBuilder::new().devices(fleet.gateway_devices("300ms")).cloud(&broker.url(), |_| {}).yaml()?;
    let mut gw = traced_gateway(&nats, &otlp, "1")?;
    gw.write_config(&config)?;
    gw.start_ready().await?;

    let chains = otlp
        .wait_for("3 complete reading traces", WAIT, |spans| {
            let n = complete_chains(spans).len();
            (n >= 3).then(|| spans.to_vec())
        })
        .await
        .with_context(|| gw.log())?;
    let complete = complete_chains(&chains);
    let c = &complete[0];
    let (publish, wait, append, decode, read) = (c[0], c[1], c[2], c[3], c[4]);
    ensure!(read.parent_span_id.is_empty(), "the device read is the root: {read:?}");
    ensure!(c.iter().all(|s| s.service == "fieldgate-gateway" && s.instance == "test-node"), "{c:?}");
    let device = &fleet.devices()[0];
    ensure!(read.attr("fieldgate.device") == Some(&format!("default/{}", device.name)), "{read:?}");
    ensure!(read.attr("fieldgate.protocol") == Some("modbus_tcp"), "{read:?}");
    let id = decode.attr("fieldgate.reading.id").context("reading id on decode")?.to_string();
    ensure!(append.attr("fieldgate.reading.id") == Some(id.as_str()), "{append:?}");
    ensure!(append.attr("fieldgate.uplink") == Some("default/cloud") && append.status == 1, "{append:?}");
    ensure!(append.kind == 4 && wait.kind == 5 && publish.kind == 4, "kinds: {c:?}");
    ensure!(wait.attr("fieldgate.delivery.attempt") == Some("1"), "{wait:?}");
    // In time order: read, decode, append (to the PubAck), wait (from the stored time), publish.
    ensure!(read.end_unix_nano <= decode.start_unix_nano + 1_000_000, "{read:?} {decode:?}");
    ensure!(wait.end_unix_nano <= publish.start_unix_nano + 1_000_000, "{wait:?} {publish:?}");

    // The trace leaves the gateway as the MQTT v5 user property, naming the publish span.
    let expected = format!("00-{}-{}-01", publish.trace_id, publish.span_id);
    wait_until("the cloud message of the traced reading", WAIT, || {
        let found = cloud.messages().iter().find(|m| m.reading_id().as_deref() == Some(id.as_str())).cloned();
        async move { Ok(found) }
    })
    .await
    .and_then(|m| {
        ensure!(m.property("traceparent") == Some(expected.as_str()), "{m:?} (expected {expected})");
        Ok(())
    })?;
    let status = gw.terminate().await?;
    ensure!(status.success(), "{status}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unsampled_readings_carry_no_trace_context_and_build_no_spans() -> Result<()> {
    let nats = NatsServer::start().await?;
    let broker = Mosquitto::start().await?;
    let cloud = V5Subscriber::start(&broker.url(), "cloud-unsampled", TELEMETRY).await?;
    let otlp = OtlpReceiver::start().await?;
    let fleet = SimFleet::healthy(1).await?;
    let config = ConfigBuilder::new().devices(fleet.gateway_devices("200ms")).cloud(&broker.url(), |_| {}).yaml()?;
    let mut gw = traced_gateway(&nats, &otlp, "0")?;
    gw.write_config(&config)?;
    gw.start_ready().await?;
    wait_until("10 readings at the cloud", WAIT, || {
        let n = cloud.messages().len();
        async move { Ok((n >= 10).then_some(())) }
    })
    .await
    .with_context(|| gw.log())?;
    let status = gw.terminate().await?;
    ensure!(status.success(), "{status}");
    ensure!(cloud.messages().iter().all(|m| m.property("traceparent").is_none()), "{:?}", cloud.messages()[0]);
    let reading_spans: Vec<_> = otlp.spans().into_iter().filter(|s| CHAIN.contains(&s.name.as_str())).collect();
    ensure!(reading_spans.is_empty(), "unsampled readings exported spans: {reading_spans:?}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_trace_chain_survives_a_cloud_outage_and_a_gateway_crash() -> Result<()> {
    let nats = NatsServer::start().await?;
    let mut broker = Mosquitto::start().await?;
    let otlp = OtlpReceiver::start().await?;
    let fleet = SimFleet::healthy(1).await?;
    let config = ConfigBuilder::new().devices(fleet.gateway_devices("250ms")).cloud(&broker.url(), |_| {}).yaml()?;
    let mut gw = traced_gateway(&nats, &otlp, "1")?;
    gw.write_config(&config)?;
    gw.start_ready().await?;
    otlp.wait_for("a first complete trace", WAIT, |s| (!complete_chains(s).is_empty()).then_some(()))
        .await
        .with_context(|| gw.log())?;

    // Cloud outage: readings are accepted into the buffer and wait there.
    broker.stop().await?;
    gw.wait_metric("fieldgate_uplink_connected", &[("uplink", "default/cloud")], WAIT, |v| v == 0.0).await?;
    let outage_started = std::time::SystemTime::now();
    let appended_during_outage = otlp
        .wait_for("4 readings appended during the outage", WAIT, |spans| {
            let since = fieldgate_gateway::reading::unix_nanos(outage_started);
            let ids: Vec<String> = spans
                .iter()
                .filter(|s| s.name == APPEND && s.status == 1 && s.start_unix_nano > since)
                .map(|s| s.span_id.clone())
                .collect();
            (ids.len() >= 4).then_some(ids)
        })
        .await
        .with_context(|| gw.log())?;

    // The gateway crashes with those readings in the buffer; the cloud comes back; a new
    // gateway process delivers them.
    gw.kill()?;
    let killed_at = fieldgate_gateway::reading::unix_nanos(std::time::SystemTime::now());
    broker.start_again().await?;
    gw.start_ready().await?;
    let delivered = otlp
        .wait_for("every reading appended during the outage delivered with its whole chain", WAIT, |spans| {
            let chains = complete_chains(spans);
            let by_append: BTreeMap<String, Vec<&RecordedSpan>> =
                chains.into_iter().map(|c| (c[2].span_id.clone(), c)).collect();
            let all: Option<Vec<Vec<RecordedSpan>>> = appended_during_outage
                .iter()
                .map(|a| by_append.get(a).map(|c| c.iter().map(|s| (*s).clone()).collect()))
                .collect();
            all
        })
        .await
        .with_context(|| gw.log())?;
    for c in &delivered {
        let (publish, wait, append) = (&c[0], &c[1], &c[2]);
        // The append span comes from the crashed process, the wait and publish spans from
        // the new one; the JetStream header carried the context between them.
        ensure!(wait.parent_span_id == append.span_id && publish.parent_span_id == wait.span_id, "{c:?}");
        // The wait starts when JetStream stored the entry (between the publish and its
        // PubAck) and ends when the new process pulled it, after the crash.
        ensure!(
            (append.start_unix_nano..=append.end_unix_nano).contains(&wait.start_unix_nano),
            "the wait starts at the stored time: {c:#?}"
        );
        ensure!(wait.end_unix_nano > killed_at, "delivered after the crash: {c:#?}");
    }
    // Deliveries cut by the outage were redelivered: their first publish span failed, and the
    // redelivery continued under the same append span.
    let spans = otlp.spans();
    for failed in spans.iter().filter(|s| s.name == PUBLISH && s.status == 2) {
        let Some(wait) = spans.iter().find(|w| w.span_id == failed.parent_span_id) else { continue };
        let retried = spans.iter().any(|w| {
            w.name == BUFFER_WAIT
                && w.parent_span_id == wait.parent_span_id
                && w.attr("fieldgate.delivery.attempt").and_then(|a| a.parse::<u32>().ok()) > Some(1)
        });
        ensure!(retried || failed.attr("fieldgate.error.kind") != Some("interrupted"), "no redelivery for {failed:?}");
    }
    let status = gw.terminate().await?;
    ensure!(status.success(), "{status}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_real_prometheus_scrapes_the_gateway_and_answers_queries() -> Result<()> {
    // Fails here, naming what to install, when prometheus is missing.
    prometheus_binary()?;
    let nats = NatsServer::start().await?;
    let mut broker = Mosquitto::start().await?;
    let fleet = SimFleet::healthy(2).await?;
    let config = ConfigBuilder::new().devices(fleet.gateway_devices("200ms")).cloud(&broker.url(), |_| {}).yaml()?;
    let mut gw = Gateway::new(&nats.url())?;
    gw.write_config(&config)?;
    gw.start_ready().await?;
    let prom = Prometheus::start(&[("fieldgate-gateway", gw.listen())], &[]).await?;

    prom.wait_query("up{job=\"fieldgate-gateway\"}", WAIT, |v| v == 1.0).await?;
    let rate = prom
        .wait_query("sum(rate(fieldgate_readings_accepted_total[5s]))", WAIT, |v| v > 1.0)
        .await
        .with_context(|| gw.log())?;
    eprintln!("accepted readings per second: {}", rate[0].value);
    prom.wait_query("fieldgate_device_connected", WAIT, |v| v == 1.0).await?;
    let devices = prom.query("count(fieldgate_device_connected)").await?;
    ensure!(devices[0].value == 2.0, "{devices:?}");
    prom.wait_query("fieldgate_uplink_connected{uplink=\"default/cloud\"}", WAIT, |v| v == 1.0).await?;
    prom.wait_query("fieldgate_buffer_connected", WAIT, |v| v == 1.0).await?;
    prom.wait_query("fieldgate_buffer_reachable", WAIT, |v| v == 1.0).await?;
    prom.wait_query("time() - max(fieldgate_device_last_reading_timestamp_seconds)", WAIT, |v| {
        (0.0..10.0).contains(&v)
    })
    .await?;
    prom.wait_query(
        "histogram_quantile(0.99, sum by (le) (rate(fieldgate_sample_to_cloud_latency_seconds_bucket[10s])))",
        WAIT,
        |v| v.is_finite() && v > 0.0,
    )
    .await?;
    prom.wait_query("fieldgate_build_info", WAIT, |v| v == 1.0).await?;
    prom.wait_query("sum(rate(fieldgate_deliveries_total{outcome=\"acked\"}[5s]))", WAIT, |v| v > 1.0).await?;

    // A cloud outage shows as a disconnected uplink and a growing backlog.
    broker.stop().await?;
    prom.wait_query("fieldgate_uplink_connected{uplink=\"default/cloud\"}", WAIT, |v| v == 0.0).await?;
    prom.wait_query("fieldgate_buffer_messages{uplink=\"default/cloud\"}", WAIT, |v| v >= 5.0).await?;
    prom.wait_query("fieldgate_buffer_oldest_unsent_age_seconds{uplink=\"default/cloud\"}", WAIT, |v| v >= 1.0).await?;
    broker.start_again().await?;
    prom.wait_query("fieldgate_uplink_connected{uplink=\"default/cloud\"}", WAIT, |v| v == 1.0).await?;
    prom.wait_query("fieldgate_uplink_connects_total{uplink=\"default/cloud\"}", WAIT, |v| v >= 2.0).await?;
    let status = gw.terminate().await?;
    ensure!(status.success(), "{status}");
    Ok(())
}

const TOKEN: &str = "test-token-0123456789abcdef";

async fn api(
    gw: &Gateway,
    method: &str,
    path: &str,
    token: Option<&str>,
    body: &[u8],
) -> Result<fieldgate_tests::api::Response> {
    let ct = if body.is_empty() { None } else { Some("application/yaml") };
    request(gw.listen(), method, path, token, ct, body).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_management_api_needs_its_token_limits_requests_and_replaces_the_config() -> Result<()> {
    let mut nats = NatsServer::start().await?;
    let broker = Mosquitto::start().await?;
    let fleet = SimFleet::healthy(2).await?;
    let devices = fleet.gateway_devices("300ms");
    let config = ConfigBuilder::new().device(devices[0].clone()).cloud(&broker.url(), |_| {});
    let mut gw = Gateway::new(&nats.url())?;
    gw.api_token(TOKEN)?;
    gw.write_config(&config.yaml()?)?;
    gw.start_ready().await?;

    // Open routes.
    ensure!(api(&gw, "GET", "/healthz", None, b"").await?.code == 200);
    ensure!(api(&gw, "GET", "/readyz", None, b"").await?.code == 200);

    // No token, a wrong token, a malformed header: 401 with a challenge.
    let r = api(&gw, "GET", "/api/v1/status", None, b"").await?;
    ensure!(r.code == 401 && r.header("www-authenticate").is_some_and(|h| h.starts_with("Bearer")), "{r:?}");
    let r = api(&gw, "GET", "/api/v1/status", Some("test-token-0123456789abcdeX"), b"").await?;
    ensure!(r.code == 401 && r.header("www-authenticate").is_some_and(|h| h.contains("invalid_token")), "{r:?}");
    let r = request(gw.listen(), "GET", "/api/v1/config", None, None, b"").await?;
    ensure!(r.code == 401, "{r:?}");
    let r = api(&gw, "PUT", "/api/v1/log-level", Some("wrong"), b"debug").await?;
    ensure!(r.code == 401, "{r:?}");

    // Status of every device and uplink.
    let device = format!("default/{}", devices[0].name);
    let status = wait_until("the device to be up in /api/v1/status", WAIT, || async {
        let j = api(&gw, "GET", "/api/v1/status", Some(TOKEN), b"").await?.json()?;
        let up = j["devices"][0]["state"] == "up"
            && j["uplinks"][0]["connected"] == true
            && !j["devices"][0]["lastReading"].is_null();
        Ok(up.then_some(j))
    })
    .await
    .with_context(|| gw.log())?;
    ensure!(status["ready"] == true && status["node"] == "test-node", "{status}");
    ensure!(status["devices"][0]["name"] == device.as_str(), "{status}");
    ensure!(status["devices"][0]["protocol"] == "modbus_tcp", "{status}");
    ensure!(status["uplinks"][0]["name"] == "default/cloud", "{status}");
    ensure!(status["uplinks"][0]["backlogMessages"].is_i64(), "{status}");
    ensure!(status["buffer"]["connected"] == true, "{status}");

    // Oversized bodies are refused before they are read.
    let big = vec![b'#'; 2 << 20];
    let r = api(&gw, "PUT", "/api/v1/config", Some(TOKEN), &big).await?;
    ensure!(r.code == 413, "{r:?}");

    // An invalid config is refused with the field path; the running one stays.
    let mut bad = config.clone().device(devices[1].clone()).build();
    bad.devices[1].poll_interval = Some("7s".parse()?);
    let bad = fieldgate_tests::config::to_yaml(&bad)?.replacen("pollInterval: 7s", "pollInterval: soon", 1);
    let r = api(&gw, "PUT", "/api/v1/config", Some(TOKEN), bad.as_bytes()).await?;
    ensure!(r.code == 422, "{r:?}");
    let problems = r.json()?["problems"].to_string();
    ensure!(problems.contains("devices[1].pollInterval"), "{problems}");
    let r = api(&gw, "PUT", "/api/v1/config", Some(TOKEN), b"devices: [this is not a config").await?;
    ensure!(r.code == 422, "{r:?}");

    // A valid one is applied through the per-device reload path.
    let mut good = config.clone().device(devices[1].clone()).build();
    good.version = Some("api-1".into());
    let r = api(&gw, "PUT", "/api/v1/config", Some(TOKEN), fieldgate_tests::config::to_yaml(&good)?.as_bytes()).await?;
    ensure!(r.code == 200 && r.json()?["applied"] == true, "{r:?}\n{}", gw.log());
    let j = api(&gw, "GET", "/api/v1/config", Some(TOKEN), b"").await?.json()?;
    ensure!(j["version"] == "api-1" && j["config"]["devices"].as_array().map(Vec::len) == Some(2), "{j}");
    wait_until("both devices in /api/v1/devices", WAIT, || async {
        let j = api(&gw, "GET", "/api/v1/devices", Some(TOKEN), b"").await?.json()?;
        let n = j["devices"].as_array().map_or(0, |d| d.iter().filter(|d| d["state"] == "up").count());
        Ok((n == 2).then_some(()))
    })
    .await?;
    ensure!(gw.stderr().contains("new configuration applied"), "{}", gw.log());

    // The log level changes at run time; a bad filter is refused.
    let r = api(&gw, "GET", "/api/v1/log-level", Some(TOKEN), b"").await?;
    ensure!(r.code == 200 && r.json()?["level"].as_str().is_some_and(|l| l.starts_with("info")), "{r:?}");
    let r = request(
        gw.listen(),
        "PUT",
        "/api/v1/log-level",
        Some(TOKEN),
        Some("application/json"),
        br#"{"level":"debug"}"#,
    )
    .await?;
    ensure!(r.code == 200 && r.json()?["level"] == "debug", "{r:?}");
    wait_until("debug lines in the log", WAIT, || {
        let found = gw.stderr().contains("DEBUG");
        async move { Ok(found.then_some(())) }
    })
    .await?;
    let r = api(&gw, "PUT", "/api/v1/log-level", Some(TOKEN), b"info,[broken").await?;
    ensure!(r.code == 400, "{r:?}");
    ensure!(api(&gw, "GET", "/api/v1/log-level", Some(TOKEN), b"").await?.json()?["level"] == "debug");
    ensure!(api(&gw, "GET", "/api/v1/nothing-here", Some(TOKEN), b"").await?.code == 404);

    // Readiness follows the buffer: NATS down -> 503 with the reason, back -> 200.
    nats.kill()?;
    let r = wait_until("/readyz to answer 503", WAIT, || async {
        let r = api(&gw, "GET", "/readyz", None, b"").await?;
        Ok((r.code == 503).then_some(r))
    })
    .await?;
    ensure!(r.body.contains("NATS"), "{r:?}");
    nats.start_again().await?;
    gw.wait_ready().await?;
    let status = gw.terminate().await?;
    ensure!(status.success(), "{status}");

    // Without a token file there is no API at all.
    let mut plain = Gateway::new(&nats.url())?;
    plain.write_config(&config.yaml()?)?;
    plain.start_ready().await?;
    let r = api(&plain, "GET", "/api/v1/status", Some(TOKEN), b"").await?;
    ensure!(r.code == 404, "{r:?}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_secret_is_ever_printed_in_logs_or_the_api() -> Result<()> {
    mosquitto_passwd_binary()?;
    const RIGHT: &str = "right-pa55w0rd-Xq7";
    const WRONG: &str = "wrong-pa55w0rd-Zk9";
    let nats = NatsServer::start().await?;
    let broker = Mosquitto::start_with(MosquittoOptions {
        tls: None,
        password: Some(("gateway".into(), RIGHT.into())),
        acl: None,
        bridges: Vec::new(),
    })
    .await?;
    let secured = broker.secure_url().context("password listener")?;
    let fleet = SimFleet::healthy(1).await?;
    let config = ConfigBuilder::new()
        .devices(fleet.gateway_devices("300ms"))
        .cloud(&secured, |u| mqtt_of(u).auth = Some(MqttAuth { secret_ref: SecretRef { name: "cloud-creds".into() } }))
        .yaml()?;
    for format in ["json", "text"] {
        let mut gw = Gateway::new(&nats.url())?;
        gw.write_secret("cloud-creds", "username", "gateway")?;
        gw.write_secret("cloud-creds", "password", WRONG)?;
        gw.api_token(TOKEN)?;
        gw.arg(format!("--log-format={format}"));
        // The most verbose level the gateway's own code and its libraries log at.
        gw.env("RUST_LOG", "debug");
        gw.write_config(&config)?;
        gw.start_ready().await?;
        // The broker refuses the credentials again and again.
        wait_until("the gateway to try its wrong credentials 3 times", WAIT, || {
            let tries = gw.stderr().matches("uplink connect failed").count();
            async move { Ok((tries >= 2).then_some(())) }
        })
        .await
        .with_context(|| format!("{}\n--- mosquitto ---\n{}", gw.log(), broker.log_tail()))?;
        let mut seen = String::new();
        for path in ["/api/v1/status", "/api/v1/config", "/api/v1/uplinks", "/api/v1/devices", "/api/v1/log-level"] {
            let r = api(&gw, "GET", path, Some(TOKEN), b"").await?;
            ensure!(r.code == 200, "{path}: {r:?}");
            seen.push_str(&r.body);
        }
        seen.push_str(&gw.metrics_text().await?);
        let status = gw.terminate().await?;
        ensure!(status.success(), "{status}");
        seen.push_str(&gw.stderr());
        seen.push_str(&gw.stdout());
        ensure!(seen.contains("cloud-creds"), "the API shows the secret's name (not its value)");
        ensure!(gw.stderr().contains("uplink"), "the logs say something about the uplink:\n{}", gw.log());
        for secret in [WRONG, RIGHT, TOKEN] {
            if let Some(at) = seen.find(secret) {
                bail!("{format}: secret printed: ...{}...", &seen[at.saturating_sub(200)..(at + 50).min(seen.len())]);
            }
        }
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_command_is_traced_from_the_cloud_message_to_the_device_write_and_read_back() -> Result<()> {
    let nats = NatsServer::start().await?;
    let broker = Mosquitto::start().await?;
    let otlp = OtlpReceiver::start().await?;
    let fleet = SimFleet::healthy(1).await?;
    let mut device = fleet.gateway_devices("1s").remove(0);
    let point = device.points.iter_mut().find(|p| p.name == "u16").context("the sim has a u16 point")?;
    point.access = fieldgate_crds::Access::ReadWrite;
    let config = ConfigBuilder::new()
        .device(device.clone())
        .cloud(&broker.url(), |u| mqtt_of(u).command_topic = Some("fieldgate/{namespace}/{device}/commands".into()))
        .yaml()?;
    let mut gw = traced_gateway(&nats, &otlp, "1")?;
    gw.write_config(&config)?;
    gw.start_ready().await?;
    wait_until("the gateway to subscribe to commands", WAIT, || async {
        Ok(gw.stderr().contains("subscribed to commands").then_some(()))
    })
    .await
    .with_context(|| gw.log())?;

    // The cloud's own trace, handed over as an MQTT v5 user property.
    let (trace_id, cloud_span) = ("4bf92f3577b34da6a3ce929d0e0e4736", "00f067aa0ba902b7");
    let mut o = rumqttc::v5::MqttOptions::new("cloud-commander", "127.0.0.1", broker.port());
    o.set_keep_alive(Duration::from_secs(10));
    let (client, mut events) = rumqttc::v5::AsyncClient::new(o, 10);
    let poller = tokio::spawn(async move { while events.poll().await.is_ok() {} });
    let props = rumqttc::v5::mqttbytes::v5::PublishProperties {
        user_properties: vec![("traceparent".into(), format!("00-{trace_id}-{cloud_span}-01"))],
        ..Default::default()
    };
    let body = serde_json::json!({"id": "traced-1", "point": "u16", "value": 1234}).to_string();
    client
        .publish_with_properties(
            format!("fieldgate/default/{}/commands", device.name),
            rumqttc::v5::mqttbytes::QoS::AtLeastOnce,
            false,
            body.into_bytes(),
            props,
        )
        .await?;

    let spans = otlp
        .wait_for("the command's spans", WAIT, |spans| {
            let of = |name: &str| spans.iter().find(|s| s.name == name && s.trace_id == trace_id).cloned();
            let (receive, execute) = (of("fieldgate.command.receive")?, of("fieldgate.command.execute")?);
            let (write, readback) = (of("fieldgate.device.write")?, of("fieldgate.device.readback")?);
            Some((receive, execute, write, readback))
        })
        .await
        .with_context(|| gw.log())?;
    poller.abort();
    let (receive, execute, write, readback) = spans;
    ensure!(receive.parent_span_id == cloud_span, "receive continues the cloud's span: {receive:?}");
    ensure!(execute.parent_span_id == receive.span_id, "execute follows receive across the buffer: {execute:?}");
    ensure!(write.parent_span_id == execute.span_id && readback.parent_span_id == execute.span_id);
    ensure!(write.end_unix_nano <= readback.start_unix_nano, "the read-back follows the write");
    ensure!(readback.status == 1, "the read-back verified the write: {readback:?}");
    ensure!(gw.terminate().await?.success());
    Ok(())
}
