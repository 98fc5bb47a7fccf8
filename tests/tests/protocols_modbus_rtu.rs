//! Modbus RTU end to end against pymodbus: two devices on one serial line (a `socat`
//! pseudo-terminal pair) polled through one bus scheduler without collisions, and a device
//! behind an RTU-over-TCP gateway. Malformed frames (bad CRC, truncated, another unit's,
//! another function's, noise) from a scripted RTU-over-TCP line are counted under the kind
//! naming them, never become readings, and leave the healthy unit on the same line alone.
//!
//! Needs `cargo build --workspace --bins` first (the tests run the gateway binary).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeMap;
use std::time::Duration;

use anyhow::{Context, Result, ensure};
use fieldgate_crds::GatewayDevice;
use fieldgate_tests::config::ConfigBuilder;
use fieldgate_tests::listening::ListeningGateway;
use fieldgate_tests::metrics::metric_or_zero;
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

// ---------------------------------------------------------------------------------------------
// Malformed frames

/// CRC-16/MODBUS, sent low byte first.
fn crc16(data: &[u8]) -> u16 {
    crc::Crc::<u16>::new(&crc::CRC_16_MODBUS).checksum(data)
}

/// `body` followed by its CRC.
fn rtu_frame(body: &[u8]) -> Vec<u8> {
    let mut f = body.to_vec();
    f.extend_from_slice(&crc16(body).to_le_bytes());
    f
}

/// What the faulty unit answers, in turn.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Fault {
    /// A correct answer whose CRC is wrong.
    BadCrc,
    /// The first bytes of a correct answer, then nothing.
    Truncated,
    /// A well-formed answer from another unit.
    WrongUnit,
    /// A well-formed answer to another function.
    WrongFunction,
    /// Bytes that are no frame at all.
    Garbage,
}

const FAULTS: [Fault; 5] = [Fault::BadCrc, Fault::Truncated, Fault::WrongUnit, Fault::WrongFunction, Fault::Garbage];

/// An RTU-over-TCP line with two units: `GOOD_UNIT` answers correctly (register `i` holds
/// `1000 + i`), `BAD_UNIT` answers with each of [`FAULTS`] in turn. Stops on drop.
struct FaultyLine {
    addr: std::net::SocketAddr,
    sent: std::sync::Arc<std::sync::Mutex<BTreeMap<Fault, u32>>>,
    task: tokio::task::JoinHandle<()>,
}

const GOOD_UNIT: u8 = 1;
const BAD_UNIT: u8 = 2;

impl FaultyLine {
    async fn start() -> Result<Self> {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let sent = std::sync::Arc::new(std::sync::Mutex::new(BTreeMap::new()));
        let next = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let task = tokio::spawn({
            let sent = std::sync::Arc::clone(&sent);
            async move {
                // The gateway drops the connection after a bad answer and opens a new one.
                while let Ok((conn, _)) = listener.accept().await {
                    tokio::spawn(Self::serve(conn, std::sync::Arc::clone(&sent), std::sync::Arc::clone(&next)));
                }
            }
        });
        Ok(Self { addr, sent, task })
    }

    async fn serve(
        mut conn: tokio::net::TcpStream,
        sent: std::sync::Arc<std::sync::Mutex<BTreeMap<Fault, u32>>>,
        next: std::sync::Arc<std::sync::atomic::AtomicUsize>,
    ) {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        // The gateway only reads holding registers here: 8-byte requests.
        let mut req = [0u8; 8];
        while conn.read_exact(&mut req).await.is_ok() {
            let (unit, function) = (req[0], req[1]);
            let crc_ok = crc16(&req[..6]).to_le_bytes() == [req[6], req[7]];
            assert!(crc_ok && function == 3, "unexpected request {req:02x?}");
            let (address, count) = (u16::from_be_bytes([req[2], req[3]]), u16::from_be_bytes([req[4], req[5]]));
            let answer = |unit: u8, function: u8| {
                let mut body = vec![unit, function, (count * 2) as u8];
                for i in address..address + count {
                    body.extend_from_slice(&(1000 + i).to_be_bytes());
                }
                rtu_frame(&body)
            };
            let out = match unit {
                GOOD_UNIT => answer(GOOD_UNIT, 3),
                BAD_UNIT => {
                    let fault = FAULTS[next.fetch_add(1, std::sync::atomic::Ordering::Relaxed) % FAULTS.len()];
                    *sent.lock().unwrap().entry(fault).or_default() += 1;
                    match fault {
                        Fault::BadCrc => {
                            let mut f = answer(BAD_UNIT, 3);
                            let n = f.len();
                            f[n - 1] ^= 0xff;
                            f
                        }
                        Fault::Truncated => answer(BAD_UNIT, 3)[..5].to_vec(),
                        Fault::WrongUnit => answer(99, 3),
                        Fault::WrongFunction => answer(BAD_UNIT, 4),
                        // A fixed pseudo-random sequence (an LCG), never a valid frame.
                        Fault::Garbage => (0u32..64)
                            .scan(0x1234_5678u32, |s, _| {
                                *s = s.wrapping_mul(1_103_515_245).wrapping_add(12_345);
                                Some((*s >> 16) as u8)
                            })
                            .collect(),
                    }
                }
                _ => continue,
            };
            if conn.write_all(&out).await.is_err() {
                return;
            }
        }
    }

    /// How many times each fault was sent.
    fn sent(&self) -> BTreeMap<Fault, u32> {
        self.sent.lock().unwrap().clone()
    }
}

impl Drop for FaultyLine {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Correct readings (`r0` = 1000, `r12` = 1001 << 16 | 1002 for the fake line) per device.
fn correct_readings(
    msgs: &[fieldgate_tests::CloudMessage],
    expected: &BTreeMap<&str, (u64, u64)>,
) -> BTreeMap<String, usize> {
    let mut n = BTreeMap::new();
    for j in msgs.iter().filter(|m| m.topic.ends_with("/telemetry")).filter_map(|m| m.json().ok()) {
        let dev = j["device"].as_str().unwrap_or_default().to_string();
        let Some((r0, r12)) = expected.get(dev.as_str()) else { continue };
        let v = |name: &str| {
            j["points"].as_array().and_then(|ps| ps.iter().find(|p| p["name"] == name)).map(|p| p["value"].clone())
        };
        if v("r0") == Some(json!(r0)) && v("r12") == Some(json!(r12)) {
            *n.entry(dev).or_default() += 1;
        }
    }
    n
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_rtu_frames_are_counted_and_spare_the_neighbours() -> Result<()> {
    let line = FaultyLine::start().await?;
    let steady = PyModbus::start_tcp(true, &[(5, vec![500, 0, 9])]).await?;
    let nats = NatsServer::start().await?;
    let broker = Mosquitto::start().await?;
    let cloud = CloudSubscriber::start(&broker.url(), "cloud-rtu-faults", "fieldgate/#").await?;
    let on_line =
        |unit: u8| json!({"modbusRtu": {"address": line.addr.to_string(), "unitId": unit, "timeout": "500ms"}});
    let devices = vec![
        device("good", on_line(GOOD_UNIT)),
        device("bad", on_line(BAD_UNIT)),
        device(
            "steady",
            json!({"modbusRtu": {"address": format!("127.0.0.1:{}", steady.port().unwrap()), "unitId": 5, "timeout": "500ms"}}),
        ),
    ];
    let config = ConfigBuilder::new().devices(devices).cloud(&broker.url(), |_| {}).yaml()?;
    let mut gw = ListeningGateway::new(&nats.url())?;
    gw.gw.write_config(&config)?;
    gw.start_ready().await?;
    let context = |gw: &ListeningGateway, line: &FaultyLine| format!("faults sent {:?}\n{}", line.sent(), gw.log());

    // Every fault goes out at least twice, and each is counted under the kind naming it: no
    // valid RTU frame (bad CRC, truncated, garbage) is `bad_frame`, a valid frame answering
    // something else (another unit, another function) is `protocol`; none is a `timeout`.
    let kind_of = |f: &Fault| match f {
        Fault::BadCrc | Fault::Truncated | Fault::Garbage => "bad_frame",
        Fault::WrongUnit | Fault::WrongFunction => "protocol",
    };
    let sent_as = |kind: &str| -> f64 {
        line.sent().iter().filter(|(f, _)| kind_of(f) == kind).map(|(_, n)| f64::from(*n)).sum()
    };
    fieldgate_tests::wait_until("every fault sent twice", WAIT, || {
        let sent = line.sent();
        async move { Ok((sent.len() == FAULTS.len() && sent.values().all(|n| *n >= 2)).then_some(())) }
    })
    .await
    .with_context(|| context(&gw, &line))?;
    let errors = |kind| [("device", "default/bad"), ("kind", kind)];
    for kind in ["bad_frame", "protocol"] {
        let sent = sent_as(kind);
        gw.wait_metric("fieldgate_device_errors_total", &errors(kind), WAIT, |v| v >= sent)
            .await
            .with_context(|| context(&gw, &line))?;
        // And no more than were sent of that kind (counted after sending).
        let counted = gw.metric("fieldgate_device_errors_total", &errors(kind)).await?;
        let sent = sent_as(kind);
        ensure!(counted <= sent, "{counted} {kind} errors counted for {sent} sent\n{}", context(&gw, &line));
    }
    // One scrape: every error of the faulty unit is one of these two kinds.
    let text = gw.gw.metrics_text().await?;
    let count = |labels: &[(&str, &str)]| metric_or_zero(&text, "fieldgate_device_errors_total", labels);
    let (all, classified) =
        (count(&[("device", "default/bad")]), count(&errors("bad_frame")) + count(&errors("protocol")));
    ensure!(all == classified, "{} errors of other kinds (a timeout?)\n{}", all - classified, context(&gw, &line));

    // Meanwhile the neighbour on the same line and the device on another line keep delivering
    // correct readings, without a single error.
    let expected = BTreeMap::from([("good", (1000, (1001 << 16) + 1002)), ("steady", (500, 9))]);
    let before = correct_readings(&cloud.messages(), &expected);
    let more = 10;
    cloud
        .wait_for(&format!("{more} more correct readings of good and steady"), WAIT, |msgs| {
            let now = correct_readings(msgs, &expected);
            ["good", "steady"]
                .iter()
                .all(|d| now.get(*d).copied().unwrap_or(0) >= before.get(*d).copied().unwrap_or(0) + more)
        })
        .await
        .with_context(|| context(&gw, &line))?;
    for d in ["default/good", "default/steady"] {
        let errors = gw.metric("fieldgate_device_errors_total", &[("device", d)]).await?;
        ensure!(errors == 0.0, "{d} counted {errors} errors\n{}", context(&gw, &line));
        ensure!(gw.metric("fieldgate_device_connected", &[("device", d)]).await? == 1.0, "{d} not connected");
    }
    // Nothing the faulty unit sent became a reading; nothing crashed or restarted.
    ensure!(
        !cloud.messages().iter().filter_map(|m| m.json().ok()).any(|j| j["device"] == "bad"),
        "a reading of the faulty unit reached the cloud"
    );
    ensure!(gw.metric("fieldgate_task_restarts_total", &[]).await? == 0.0, "a task restarted\n{}", gw.log());
    ensure!(!gw.stderr().contains("panicked"), "{}", gw.log());
    Ok(())
}
