//! Command messages from the cloud's command topic: parsed and checked, expiry computed for a
//! reception at the epoch, in 2023 and now.
#![no_main]
use fieldgate_gateway::command::{self, CommandMessage};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(m) = CommandMessage::parse(data) {
        for now in [0, 1_700_000_000_000, command::now_ms()] {
            let _ = m.expires_unix_ms(now);
        }
    }
});
