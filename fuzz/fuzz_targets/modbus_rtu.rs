//! A Modbus RTU line's bytes (any, then the end of the stream) answering one poll: RTU framing
//! and CRC, answers from other units, the bad-frame classification (bad CRC, truncated, noise),
//! register decoding.
#![no_main]
use std::sync::OnceLock;
use std::time::Duration;

use fieldgate_crds::Point;
use fieldgate_gateway::adapters::modbus_rtu;
use libfuzzer_sys::fuzz_target;
use tokio::io::AsyncWriteExt;

fuzz_target!(|data: &[u8]| {
    static POINTS: OnceLock<Vec<Point>> = OnceLock::new();
    let points = POINTS.get_or_init(fieldgate_fuzz::modbus_points);
    fieldgate_fuzz::runtime().block_on(async {
        let (gateway, mut line) = tokio::io::duplex(data.len() + 4096);
        let _ = line.write_all(data).await;
        // End of the answers, but the line stays open: a dropped end would refuse the
        // gateway's requests (broken pipe) before any answer is read.
        let _ = line.shutdown().await;
        let (read, _failures) = modbus_rtu::poll_once(gateway, 1, points, Duration::from_secs(5)).await;
        assert!(read.len() <= points.len());
        drop(line);
    });
});
