//! Modbus RTU end to end against pymodbus: two devices on one serial line (a `socat`
//! pseudo-terminal pair) polled through one bus scheduler without collisions, and a device
//! behind an RTU-over-TCP gateway.
//!
//! Needs `cargo build --workspace --bins` first (the tests run the gateway binary).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeMap;
use std::time::Duration;

use anyhow::{Context, Result, ensure};
use fieldgate_crds::GatewayDevice;
use fieldgate_tests::config::ConfigBuilder;
use fieldgate_tests::listening::ListeningGateway;
use fieldgate_tests::pymodbus::{PtyPair, PyModbus, Transport};
use fieldgate_tests::{CloudSubscriber, Mosquitto, NatsServer};
use serde_json::{Value as Json, json};

const WAIT: Duration = Duration::from_secs(90);

fn device(name: &str, connection: Json) -> GatewayDevice {
    serde_json::from_value(json!({
        "name": name,
        "connection": connection,
        "pollInterval": "200ms",
        "points": [
            {"name": "r0", "type": "uint16", "modbus": {"table": "holding", "address": 0}},
            {"name": "r12", "type": "uint32", "modbus": {"table": "holding", "address": 1}},
        ],
    }))
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn devices_on_one_serial_line_and_over_tcp_are_polled_without_collisions() -> Result<()> {
    let pty = PtyPair::start().await?;
    let serial = PyModbus::start(Transport::Serial(pty.b()), &[(1, vec![100, 1, 2]), (2, vec![200, 0, 7])]).await?;
    let over_tcp = PyModbus::start_tcp(true, &[(5, vec![500, 0, 9])]).await?;
    let nats = NatsServer::start().await?;
    let broker = Mosquitto::start().await?;
    let cloud = CloudSubscriber::start(&broker.url(), "cloud-rtu", "fieldgate/#").await?;
    let port = pty.a().display().to_string();
    let devices = vec![
        device("rtu-1", json!({"modbusRtu": {"port": port, "unitId": 1, "timeout": "500ms"}})),
        device("rtu-2", json!({"modbusRtu": {"port": port, "unitId": 2, "timeout": "500ms"}})),
        device(
            "rtu-tcp",
            json!({"modbusRtu": {"address": format!("127.0.0.1:{}", over_tcp.port().unwrap()), "unitId": 5}}),
        ),
    ];
    let config = ConfigBuilder::new().devices(devices).cloud(&broker.url(), |_| {}).yaml()?;
    let mut gw = ListeningGateway::new(&nats.url())?;
    gw.gw.write_config(&config)?;
    gw.start_ready().await?;

    let expected = BTreeMap::from([("rtu-1", (100, 65538)), ("rtu-2", (200, 7)), ("rtu-tcp", (500, 9))]);
    let wanted = 10;
    let r = cloud
        .wait_for(&format!("{wanted} correct readings of each device"), WAIT, |msgs| {
            let mut n: BTreeMap<String, usize> = BTreeMap::new();
            for j in msgs.iter().filter_map(|m| m.json().ok()) {
                let dev = j["device"].as_str().unwrap_or_default().to_string();
                let Some((r0, r12)) = expected.get(dev.as_str()) else { continue };
                let v = |name: &str| {
                    j["points"]
                        .as_array()
                        .and_then(|ps| ps.iter().find(|p| p["name"] == name))
                        .map(|p| p["value"].clone())
                };
                if v("r0") == Some(json!(r0)) && v("r12") == Some(json!(r12)) {
                    *n.entry(dev).or_default() += 1;
                }
            }
            n.len() == 3 && n.values().all(|c| *c >= wanted)
        })
        .await;
    r.with_context(|| format!("{}\n{}\n{}", gw.log(), serial.log(), over_tcp.log()))?;
    // One scheduler per line: the two serial devices never garbled each other's answers.
    for d in ["default/rtu-1", "default/rtu-2", "default/rtu-tcp"] {
        let errors = gw.metric("fieldgate_device_errors_total", &[("device", d)]).await?;
        ensure!(errors == 0.0, "{d} counted {errors} errors\n{}", gw.log());
        ensure!(gw.metric("fieldgate_device_connected", &[("device", d)]).await? == 1.0, "{d} not connected");
    }
    Ok(())
}
