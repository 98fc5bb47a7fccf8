//! The management API's request bodies: `PUT /api/v1/log-level` (JSON or text, then the
//! filter parsed) and `PUT /api/v1/config` (UTF-8, then the same checks as the config file).
//! The first byte picks the endpoint and content type.
#![no_main]
use std::sync::OnceLock;

use fieldgate_gateway::secrets::SecretStore;
use fieldgate_gateway::{app, management, telemetry};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    static SECRETS: OnceLock<SecretStore> = OnceLock::new();
    let Some((&selector, body)) = data.split_first() else { return };
    match selector % 3 {
        0 | 1 => {
            if let Some(filter) = management::requested_filter(selector % 3 == 0, body) {
                let _ = telemetry::parse_filter(filter.trim());
            }
        }
        _ => {
            let secrets =
                SECRETS.get_or_init(|| SecretStore::new(std::env::temp_dir().join("fieldgate-fuzz-no-secrets")));
            if let Ok(text) = std::str::from_utf8(body) {
                let _ = app::check_config(text, "api", "node-1", secrets);
            }
        }
    }
});
