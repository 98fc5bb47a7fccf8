//! What the gateway reads back from its buffer and forwards: a buffer entry split into its
//! readings, each given its `bufferSeq`, decoded, and encoded as JSON and protobuf.
#![no_main]
use fieldgate_crds::Encoding;
use fieldgate_gateway::{buffer, reading};
use libfuzzer_sys::fuzz_target;
use prost::Message;

fuzz_target!(|data: &[u8]| {
    let Ok(readings) = buffer::entry_readings(data) else { return };
    for (i, stored) in readings.into_iter().enumerate() {
        let sent = reading::with_buffer_seq(stored, i as u64 + 1);
        if let Ok(r) = reading::Reading::decode(sent.as_slice()) {
            assert_eq!(r.buffer_seq, i as u64 + 1);
            let _ = reading::encode(&r, Encoding::Json);
            let again = reading::encode(&r, Encoding::Protobuf);
            assert_eq!(reading::Reading::decode(again.as_slice()).ok().as_ref(), Some(&r));
        }
    }
});
