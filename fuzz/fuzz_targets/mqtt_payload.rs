//! MQTT ingest (and CoAP) payloads mapped to points: JSON objects with paths, plain values
//! named by the topic's last level, or for a one-point device.
#![no_main]
use std::sync::OnceLock;

use fieldgate_crds::Point;
use fieldgate_gateway::adapters::payload;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    static POINTS: OnceLock<(Vec<Point>, Vec<Point>)> = OnceLock::new();
    let (all, one) = POINTS.get_or_init(|| {
        let all = fieldgate_fuzz::push_points();
        let one = all[..1].to_vec();
        (all, one)
    });
    // The topic is what follows the first newline: `.../<point>`.
    let (body, topic) = match data.iter().position(|b| *b == b'\n') {
        Some(i) => (&data[..i], std::str::from_utf8(&data[i + 1..]).ok()),
        None => (data, None),
    };
    let hint = topic.and_then(|t| t.rsplit('/').next());
    for points in [all, one] {
        if let Ok(out) = payload::decode(points, body, hint) {
            assert!(out.len() <= points.len());
        }
    }
});
