//! A Modbus TCP device's answers (any bytes, then the end of the stream) to one poll of points
//! over every table and type: MBAP and PDU decoding, answer validation against the request,
//! register decoding.
#![no_main]
use std::sync::OnceLock;
use std::time::Duration;

use fieldgate_crds::Point;
use fieldgate_gateway::adapters::modbus_tcp;
use libfuzzer_sys::fuzz_target;
use tokio::io::AsyncWriteExt;

fuzz_target!(|data: &[u8]| {
    static POINTS: OnceLock<Vec<Point>> = OnceLock::new();
    let points = POINTS.get_or_init(fieldgate_fuzz::modbus_points);
    fieldgate_fuzz::runtime().block_on(async {
        let (gateway, mut device) = tokio::io::duplex(data.len() + 4096);
        let _ = device.write_all(data).await;
        // End of the answers, but the device stays open: a dropped end would refuse the
        // gateway's requests (broken pipe) before any answer is read.
        let _ = device.shutdown().await;
        let read = modbus_tcp::poll_once(gateway, 1, points, Duration::from_secs(5)).await;
        assert!(read.len() <= points.len());
        drop(device);
    });
});
