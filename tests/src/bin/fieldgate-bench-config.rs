//! Time to load a `GatewayConfig`: the gateway's `check_config` on documents of 1, 1,000 and
//! 10,000 simulated Modbus devices (29 points each, as the end-to-end tests use), or on
//! documents from files, and where the time goes (YAML parse, strict schema check, typed read,
//! semantic checks).
//!
//!     cargo build --release -p fieldgate-tests --bin fieldgate-bench-config
//!     target/release/fieldgate-bench-config [--devices 1,1000,10000] [--runs 3] [--file F ...]

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
    /// Runs per document; the fastest is printed.
    #[arg(long, default_value_t = 3)]
    runs: usize,
    /// Also writes each generated document to `DIR/gateway-<devices>.yaml`.
    #[arg(long)]
    save: Option<std::path::PathBuf>,
    /// Documents to time instead of the generated ones (a refused one prints the time to
    /// find every problem).
    #[arg(long)]
    file: Vec<std::path::PathBuf>,
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

/// The fastest of `runs` loads of `text`: `check_config` as a whole, then its stages apart
/// (parse, schema, typed read, `validate`). An error when the document is refused.
fn stages(text: &str, runs: usize, secrets: &SecretStore) -> Result<[Duration; 5]> {
    let mut best: Option<[Duration; 5]> = None;
    for _ in 0..runs.max(1) {
        let (loaded, total) = timed(|| app::check_config(text, "bench.yaml", "node-1", secrets));
        loaded.context("the document loads")?;
        let (doc, parse) = timed(|| fieldgate_crds::gateway_config::parse_yaml(text));
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
    best.context("no run")
}

fn main() -> Result<()> {
    let args = Args::parse();
    let secrets = SecretStore::new(std::env::temp_dir().join("fieldgate-bench-config-no-secrets"));
    // Compiles the schema once, as the gateway does on its first load.
    let (_, compile) = timed(fieldgate_crds::schema::gateway_config);
    println!("schema compiled in {compile:.1?}");
    println!("{:<24} {:>10} {:>12}  (parse  schema  typed  validate)", "document", "bytes", "check_config");
    let documents: Vec<(String, String)> = if args.file.is_empty() {
        let mut generated = Vec::new();
        for &n in &args.devices {
            let text = document(n)?;
            if let Some(dir) = &args.save {
                std::fs::write(dir.join(format!("gateway-{n}.yaml")), &text).context("saving the document")?;
            }
            generated.push((format!("{n} devices"), text));
        }
        generated
    } else {
        let read =
            |p: &std::path::PathBuf| std::fs::read_to_string(p).with_context(|| format!("reading {}", p.display()));
        args.file.iter().map(|p| Ok((p.display().to_string(), read(p)?))).collect::<Result<_>>()?
    };
    for (name, text) in &documents {
        if let Err(e) = GatewayConfig::from_yaml(text) {
            // A refused document: the time to find every problem.
            let runs = (0..args.runs.max(1)).map(|_| timed(|| GatewayConfig::from_yaml(text)).1);
            let fastest = runs.min().unwrap_or_default();
            println!("{name:<24} {:>10} {fastest:>12.1?}  refused: {} problems", text.len(), e.fields().len());
            continue;
        }
        let [total, parse, schema, typed, validate] = stages(text, args.runs, &secrets)?;
        println!(
            "{name:<24} {:>10} {total:>12.1?}  ({parse:.1?}  {schema:.1?}  {typed:.1?}  {validate:.1?})",
            text.len()
        );
    }
    Ok(())
}
