//! `GatewayConfig` documents (YAML or JSON) through the gateway's load and validation: parse,
//! strict fields, every check with its path, Secret references, uplink resolution.
#![no_main]
use std::sync::OnceLock;

use fieldgate_gateway::app;
use fieldgate_gateway::secrets::SecretStore;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    static SECRETS: OnceLock<SecretStore> = OnceLock::new();
    let secrets = SECRETS.get_or_init(|| SecretStore::new(std::env::temp_dir().join("fieldgate-fuzz-no-secrets")));
    let Ok(text) = std::str::from_utf8(data) else { return };
    let _ = app::check_config(text, "fuzz.yaml", "node-1", secrets);
});
