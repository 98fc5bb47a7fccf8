//! CoAP end to end against libcoap's own client and server (`coap-client-notls`,
//! `coap-server-notls`, Debian `libcoap3-bin`): pushes answered only after JetStream accepted
//! them, refusals with their 4.xx codes and counted reasons, block-wise bounds, polling and
//! Observe of a libcoap server's resources.
//!
//! Needs `cargo build --workspace --bins` first (the tests run the gateway binary).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use anyhow::{Context, Result, ensure};
use coap_lite::{RequestType, ResponseType};
use fieldgate_crds::GatewayDevice;
use fieldgate_tests::coap_peer::{CoapProbe, CoapServer, coap_client};
use fieldgate_tests::config::ConfigBuilder;
use fieldgate_tests::listening::{ListeningGateway, wait_value};
use fieldgate_tests::{CloudSubscriber, Mosquitto, NatsServer};
use serde_json::{Value as Json, json};

const WAIT: Duration = Duration::from_secs(60);
const CLIENT: Duration = Duration::from_secs(30);

fn device(name: &str, connection: Json, points: Json) -> GatewayDevice {
    serde_json::from_value(json!({"name": name, "connection": connection, "points": points, "pollInterval": "300ms"}))
        .unwrap()
}

struct Rig {
    _nats: NatsServer,
    _broker: Mosquitto,
    cloud: CloudSubscriber,
    gw: ListeningGateway,
}

async fn rig(test: &str, devices: Vec<GatewayDevice>, secrets: &[(&str, &str)]) -> Result<Rig> {
    let nats = NatsServer::start().await?;
    let broker = Mosquitto::start().await?;
    let cloud = CloudSubscriber::start(&broker.url(), &format!("cloud-{test}"), "fieldgate/#").await?;
    let config = ConfigBuilder::new().devices(devices).cloud(&broker.url(), |_| {}).yaml()?;
    let mut gw = ListeningGateway::new(&nats.url())?;
    for (name, value) in secrets {
        gw.gw.write_secret(name, "token", value)?;
    }
    gw.gw.write_config(&config)?;
    gw.start_ready().await?;
    Ok(Rig { _nats: nats, _broker: broker, cloud, gw })
}

fn push_devices() -> Vec<GatewayDevice> {
    vec![
        device(
            "th-1",
            json!({"coap": {"tokenSecretRef": {"name": "th-1-token"}}}),
            json!([{"name": "temp", "type": "float32", "unit": "Cel"}, {"name": "hum", "type": "uint16"}]),
        ),
        device("plain-1", json!({"coap": {}}), json!([{"name": "level", "type": "float64"}])),
        device("big-1", json!({"coap": {"maxBodyBytes": 256}}), json!([{"name": "blob", "type": "string"}])),
    ]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn coap_pushes_from_libcoap_reach_the_cloud_and_bad_ones_are_refused_and_counted() -> Result<()> {
    let rig = rig("coap-push", push_devices(), &[("th-1-token", "s3cret")]).await?;
    let (gw, cloud) = (&rig.gw, &rig.cloud);
    let base = format!("coap://{}", gw.coap);

    // A confirmable JSON push with its token: answered (no error) and delivered.
    let run = coap_client(
        &["-m", "post", "-e", r#"{"temp":21.5,"hum":40}"#, &format!("{base}/default/th-1?token=s3cret")],
        CLIENT,
    )
    .await?;
    ensure!(!run.text().contains("4.") && !run.text().contains("5."), "push answered with an error: {}", run.text());
    wait_value(cloud, gw, "th-1", "temp", json!(21.5)).await?;
    wait_value(cloud, gw, "th-1", "hum", json!(40)).await?;

    // A non-confirmable plain number: delivered and counted as NON.
    coap_client(&["-N", "-B", "3", "-m", "post", "-e", "7.25", &format!("{base}/default/plain-1")], CLIENT).await?;
    wait_value(cloud, gw, "plain-1", "level", json!(7.25)).await?;
    gw.wait_metric("fieldgate_ingress_messages_total", &[("protocol", "coap"), ("reason", "non")], WAIT, |v| v >= 1.0)
        .await?;

    // Block-wise (Block1, 64-byte blocks) within the device's 256-byte limit, then beyond it.
    let dir = tempfile::tempdir()?;
    let small = dir.path().join("small.json");
    let text = "x".repeat(180);
    std::fs::write(&small, json!({"blob": text}).to_string())?;
    let run = coap_client(
        &["-m", "post", "-b", "64", "-f", small.to_str().unwrap(), &format!("{base}/default/big-1")],
        CLIENT,
    )
    .await?;
    ensure!(!run.text().contains("4."), "block-wise push refused: {}", run.text());
    wait_value(cloud, gw, "big-1", "blob", json!(text)).await?;
    let large = dir.path().join("large.json");
    std::fs::write(&large, json!({"blob": "y".repeat(600)}).to_string())?;
    let run = coap_client(
        &["-m", "post", "-b", "64", "-f", large.to_str().unwrap(), &format!("{base}/default/big-1")],
        CLIENT,
    )
    .await?;
    ensure!(run.text().contains("4.13"), "an oversized transfer was not refused with 4.13: {}", run.text());
    gw.wait_metric("fieldgate_device_errors_total", &[("device", "default/big-1"), ("kind", "too_large")], WAIT, |v| {
        v >= 1.0
    })
    .await?;

    // Unknown device, wrong token, malformed payload: 4.04, 4.01, 4.00, each counted.
    let run = coap_client(&["-m", "post", "-e", "1", &format!("{base}/default/ghost")], CLIENT).await?;
    ensure!(run.text().contains("4.04"), "unknown device: {}", run.text());
    let run = coap_client(&["-m", "post", "-e", r#"{"temp":1}"#, &format!("{base}/default/th-1?token=wrong")], CLIENT)
        .await?;
    ensure!(run.text().contains("4.01"), "wrong token: {}", run.text());
    let run =
        coap_client(&["-m", "post", "-e", r#"{"temp":"#, &format!("{base}/default/th-1?token=s3cret")], CLIENT).await?;
    ensure!(run.text().contains("4.00"), "malformed JSON: {}", run.text());
    gw.wait_metric(
        "fieldgate_ingress_rejected_total",
        &[("protocol", "coap"), ("reason", "unknown_device")],
        WAIT,
        |v| v >= 1.0,
    )
    .await?;
    gw.wait_metric(
        "fieldgate_ingress_rejected_total",
        &[("protocol", "coap"), ("reason", "unauthorized")],
        WAIT,
        |v| v >= 1.0,
    )
    .await?;
    gw.wait_metric("fieldgate_device_errors_total", &[("device", "default/th-1"), ("kind", "json")], WAIT, |v| {
        v >= 1.0
    })
    .await?;

    // Scripted: garbage datagrams, a wrong method, a retransmitted request.
    let mut probe = CoapProbe::connect(gw.coap).await?;
    probe.send_raw(&[0xff, 0x00, 0x13]).await?;
    probe.send_raw(&[0x40, 0x02]).await?;
    gw.wait_metric("fieldgate_ingress_rejected_total", &[("protocol", "coap"), ("reason", "malformed")], WAIT, |v| {
        v >= 2.0
    })
    .await?;
    let (code, _) = probe.request(RequestType::Get, "/default/plain-1", b"", true).await?;
    ensure!(code == ResponseType::MethodNotAllowed, "GET answered {code:?}");
    let received = || gw.metric("fieldgate_readings_received_total", &[("device", "default/plain-1")]);
    let before = received().await?;
    let p = probe.packet(RequestType::Post, "/default/plain-1", b"8.5", true);
    let first = probe.exchange(&p, CLIENT).await?;
    let again = probe.exchange(&p, CLIENT).await?;
    ensure!(first == again, "a retransmission got a different answer: {first:?} vs {again:?}");
    ensure!(fieldgate_tests::coap_peer::status(&first) == ResponseType::Changed, "{first:?}");
    ensure!(received().await? == before + 1.0, "a retransmitted request became two readings");

    // After all that, the honest device still gets through.
    let run = coap_client(
        &["-m", "put", "-e", r#"{"temp":19.0,"hum":41}"#, &format!("{base}/default/th-1?token=s3cret")],
        CLIENT,
    )
    .await?;
    ensure!(!run.text().contains("4."), "{}", run.text());
    wait_value(cloud, gw, "th-1", "hum", json!(41)).await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn coap_push_is_answered_503_while_the_buffer_is_down() -> Result<()> {
    let mut rig = rig("coap-down", push_devices(), &[("th-1-token", "s3cret")]).await?;
    let mut probe = CoapProbe::connect(rig.gw.coap).await?;
    let (code, _) = probe.request(RequestType::Post, "/default/plain-1", b"1.0", true).await?;
    ensure!(code == ResponseType::Changed, "first push answered {code:?}\n{}", rig.gw.log());
    rig._nats.kill()?;
    let (code, text) = probe.request(RequestType::Post, "/default/plain-1", b"2.0", true).await?;
    ensure!(code == ResponseType::ServiceUnavailable, "push with the buffer down answered {code:?} {text}");
    rig._nats.start_again().await?;
    fieldgate_tests::wait_until("pushes to be accepted again", WAIT, || async {
        let mut probe = CoapProbe::connect(rig.gw.coap).await?;
        let (code, _) = probe.request(RequestType::Post, "/default/plain-1", b"3.0", true).await?;
        Ok((code == ResponseType::Changed).then_some(()))
    })
    .await?;
    wait_value(&rig.cloud, &rig.gw, "plain-1", "level", json!(3.0)).await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn libcoap_server_resources_are_polled_and_observed() -> Result<()> {
    let server = CoapServer::start().await?;
    server.put("/temp", "21.5").await?;
    server.put("/note", &json!({"note": "n".repeat(1500)}).to_string()).await?;
    let host = json!("127.0.0.1");
    let port = server.addr.port();
    let devices = vec![
        device(
            "poller",
            json!({"coap": {"host": host, "port": port, "path": "/temp"}}),
            json!([{"name": "temp", "type": "float64"}]),
        ),
        device(
            "observer",
            json!({"coap": {"host": host, "port": port, "path": "/temp", "observe": true}}),
            json!([{"name": "temp", "type": "float64"}]),
        ),
        device(
            "noter",
            json!({"coap": {"host": host, "port": port, "path": "/note"}}),
            json!([{"name": "note", "type": "string"}]),
        ),
        device(
            "small",
            json!({"coap": {"host": host, "port": port, "path": "/note", "maxBodyBytes": 64}}),
            json!([{"name": "note", "type": "string"}]),
        ),
    ];
    let rig = rig("coap-poll", devices, &[]).await?;
    let (gw, cloud) = (&rig.gw, &rig.cloud);
    wait_value(cloud, gw, "poller", "temp", json!(21.5)).await?;
    wait_value(cloud, gw, "observer", "temp", json!(21.5)).await?;
    // A block-wise answer read whole, and refused beyond the device's limit.
    wait_value(cloud, gw, "noter", "note", json!("n".repeat(1500))).await.with_context(|| server.log())?;
    gw.wait_metric("fieldgate_device_errors_total", &[("device", "default/small"), ("kind", "too_large")], WAIT, |v| {
        v >= 1.0
    })
    .await?;

    // A change reaches the observer as a notification (and the poller at its next poll).
    server.put("/temp", "23.25").await?;
    wait_value(cloud, gw, "observer", "temp", json!(23.25)).await?;
    wait_value(cloud, gw, "poller", "temp", json!(23.25)).await?;
    let polls = gw.metric("fieldgate_device_polls_total", &[("device", "default/observer")]).await?;
    ensure!(polls == 0.0, "the observer polled ({polls} polls) instead of observing");
    ensure!(gw.metric("fieldgate_device_connected", &[("device", "default/poller")]).await? == 1.0);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reporting_rules_send_only_changes_beyond_the_deadband() -> Result<()> {
    let devices = vec![device(
        "rated",
        json!({"coap": {}}),
        json!([{"name": "t", "type": "float64", "report": {"onChange": true, "deadband": 1.0}}]),
    )];
    let rig = rig("coap-report", devices, &[]).await?;
    let mut probe = CoapProbe::connect(rig.gw.coap).await?;
    for v in ["20.0", "20.5", "20.9", "22.0"] {
        let (code, text) = probe.request(RequestType::Post, "/default/rated", v.as_bytes(), true).await?;
        // Suppressed values are acknowledged too: there is nothing to keep.
        ensure!(code == ResponseType::Changed, "{v} answered {code:?} {text}");
    }
    wait_value(&rig.cloud, &rig.gw, "rated", "t", json!(22.0)).await?;
    let values: Vec<Json> = rig
        .cloud
        .readings()?
        .iter()
        .filter(|r| r["device"] == "rated")
        .map(|r| r["points"][0]["value"].clone())
        .collect();
    ensure!(values == [json!(20.0), json!(22.0)], "reported {values:?}");
    Ok(())
}
