//! Time to load a `GatewayConfig`: the gateway's `check_config` on documents of 1, 1,000 and
//! 10,000 simulated Modbus devices (29 points each, as the end-to-end tests use), and where the
//! time goes (YAML parse, strict schema check, typed read, semantic checks).
//!
//!     cargo build --release -p fieldgate-tests --bin fieldgate-bench-config
//!     target/release/fieldgate-bench-config [--devices 1,1000,10000] [--runs 3]

use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use clap::Parser;
use fieldgate_crds::{GatewayConfig, HumanDuration, ValidationErrors};
use fieldgate_gateway::app;
use fieldgate_gateway::secrets::SecretStore;
use fieldgate_tests::config::{ConfigBuilder, NAMESPACE, mqtt_uplink};

#[derive(Parser, Debug)]
struct Args {
    /// Document sizes, in devices.
    #[arg(long, value_delimiter = ',', default_value = "1,1000,10000")]
    devices: Vec<usize>,
    /// Runs per size; the fastest is printed.
    #[arg(long, default_value_t = 3)]
    runs: usize,
    /// Also writes each document to `DIR/gateway-<devices>.yaml` (for the crate-level
    /// harness, `cargo run --release -p fieldgate-crds --example config_load`).
    #[arg(long)]
    save: Option<std::path::PathBuf>,
}

/// A document of `n` simulated devices and one MQTT uplink, as YAML.
fn document(n: usize) -> Result<String> {
    let every: HumanDuration = "1s".parse().context("a duration")?;
    let devices =
        (0..n).map(|i| fieldgate_sim::gateway_device(NAMESPACE, &format!("dev-{i:05}"), "127.0.0.1", 5020, &every, 0));
    let config = ConfigBuilder::new().devices(devices).uplink(mqtt_uplink("cloud", "mqtt://127.0.0.1:1883")).build();
    serde_saphyr::to_string(&config).context("serializing")
}

fn timed<T>(f: impl FnOnce() -> T) -> (T, Duration) {
    let start = Instant::now();
    let out = f();
    (out, start.elapsed())
}

fn main() -> Result<()> {
    let args = Args::parse();
    let secrets = SecretStore::new(std::env::temp_dir().join("fieldgate-bench-config-no-secrets"));
    // Compiles the schema once, as the gateway does on its first load.
    let (_, compile) = timed(fieldgate_crds::schema::gateway_config);
    println!("schema compiled in {compile:.1?}");
    println!("devices  bytes       check_config  (parse  schema  typed  validate)");
    for &n in &args.devices {
        let text = document(n)?;
        if let Some(dir) = &args.save {
            std::fs::write(dir.join(format!("gateway-{n}.yaml")), &text).context("saving the document")?;
        }
        let mut best: Option<[Duration; 5]> = None;
        for _ in 0..args.runs.max(1) {
            let (loaded, total) = timed(|| app::check_config(&text, "bench.yaml", "node-1", &secrets));
            loaded.context("the document loads")?;
            let mut budget = serde_saphyr::Budget::default();
            budget.max_nodes = 8_000_000;
            budget.max_events = 16_000_000;
            let mut options = serde_saphyr::Options::default();
            options.budget = Some(budget);
            let (doc, parse) =
                timed(|| serde_saphyr::from_str_with_options::<serde_json::Value>(&text, options.clone()));
            let doc = doc.context("parses")?;
            let mut errs = ValidationErrors::default();
            let (_, schema) = timed(|| fieldgate_crds::schema::gateway_config().check(&doc, "", &mut errs));
            anyhow::ensure!(errs.0.is_empty(), "{errs}");
            let (config, typed) = timed(|| serde_json::from_value::<GatewayConfig>(doc));
            let config = config.context("typed")?;
            // `validate` checks the schema of the typed value again, then the semantics.
            let (valid, validate) = timed(|| config.validate());
            valid.context("valid")?;
            let run = [total, parse, schema, typed, validate];
            if best.is_none_or(|b| run[0] < b[0]) {
                best = Some(run);
            }
        }
        if let Some([total, parse, schema, typed, validate]) = best {
            println!(
                "{n:>7}  {:>10}  {total:>12.1?}  ({parse:.1?}  {schema:.1?}  {typed:.1?}  {validate:.1?})",
                text.len()
            );
        }
    }
    Ok(())
}
