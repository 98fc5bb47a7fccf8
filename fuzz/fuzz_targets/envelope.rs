//! What the gateway reads back from its buffer and forwards: a buffer entry split into its
//! readings, each decoded and encoded by every uplink encoding (JSON, compact JSON, protobuf
//! with its `bufferSeq` appended, compact protobuf, Sparkplug B).
#![no_main]
use std::sync::OnceLock;

use fieldgate_crds::GatewayUplink;
use fieldgate_gateway::encoding::Encoder;
use fieldgate_gateway::{buffer, reading};
use libfuzzer_sys::fuzz_target;
use prost::Message;

fuzz_target!(|data: &[u8]| {
    static UPLINKS: OnceLock<Vec<GatewayUplink>> = OnceLock::new();
    let uplinks = UPLINKS.get_or_init(|| {
        ["json", "jsonCompact", "protobuf", "protobufCompact", "sparkplugB"]
            .into_iter()
            .map(|e| {
                serde_json::from_value(serde_json::json!({
                    "name": "cloud", "mqtt": {"url": "mqtt://127.0.0.1:1883"}, "encoding": e
                }))
                .unwrap_or_else(|err| panic!("uplink {e}: {err}"))
            })
            .collect()
    });
    let Ok(readings) = buffer::entry_readings(data) else { return };
    // Fresh encoders per input: their tables and aliases live as long as an uplink's session.
    let mut encoders: Vec<Encoder> = uplinks.iter().map(|u| Encoder::new(u, "node-1")).collect();
    for e in &mut encoders {
        let _ = e.session();
    }
    for (i, stored) in readings.into_iter().enumerate() {
        let seq = i as u64 + 1;
        let Ok(r) = reading::Reading::decode(stored) else { continue };
        let sent = reading::with_buffer_seq(stored, seq);
        assert_eq!(reading::Reading::decode(sent.as_slice()).ok().map(|s| s.buffer_seq), Some(seq));
        for e in &mut encoders {
            let _ = e.encode(r.clone(), stored, seq, "fieldgate/default/d/telemetry".into());
        }
    }
});
