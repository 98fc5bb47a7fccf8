//! A raw TCP device connection's bytes (arriving in several reads, cut at `ff 00`): line
//! splitting with the frame limit, the identification frame's id and token, `key=value` and
//! JSON frames mapped to points.
#![no_main]
use std::sync::OnceLock;

use fieldgate_crds::Point;
use fieldgate_gateway::adapters::tcp;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    static POINTS: OnceLock<Vec<Point>> = OnceLock::new();
    let points = POINTS.get_or_init(fieldgate_fuzz::push_points);
    let reads = fieldgate_fuzz::messages(data);
    // The default frame limit, and a small one that the fuzzer can reach.
    for max in [fieldgate_fuzz::MAX_FRAME, 64] {
        let _ = tcp::frames(&reads, max, points);
    }
});
