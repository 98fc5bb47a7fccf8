//! Time to read `GatewayConfig` documents, and where it goes: YAML parse, strict schema check,
//! typed read, then `validate` (which checks the schema of the typed value again, then the
//! semantics). The documents come from files, such as those `fieldgate-bench-config --save`
//! writes.
//!
//!     cargo run --release -p fieldgate-crds --example config_load -- gateway-1000.yaml ...
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::{Duration, Instant};

use fieldgate_crds::{GatewayConfig, ValidationErrors};

fn timed<T>(f: impl FnOnce() -> T) -> (T, Duration) {
    let start = Instant::now();
    let out = f();
    (out, start.elapsed())
}

fn main() {
    let (_, compile) = timed(fieldgate_crds::schema::gateway_config);
    println!("schema compiled in {compile:.1?}");
    println!("{:<28} {:>10} {:>10}  (parse  schema  typed  validate)", "document", "bytes", "from_yaml");
    for path in std::env::args().skip(1) {
        let text = std::fs::read_to_string(&path).expect("a readable document");
        let name = std::path::Path::new(&path).file_name().map(|n| n.to_string_lossy().into_owned());
        let name = name.unwrap_or_default();
        if let Err(e) = GatewayConfig::from_yaml(&text) {
            // A refused document: the time to find every problem.
            let fastest = (0..3).map(|_| timed(|| GatewayConfig::from_yaml(&text)).1).min().unwrap_or_default();
            println!("{name:<28} {:>10} {fastest:>10.1?}  refused: {} problems", text.len(), e.fields().len());
            continue;
        }
        let mut best: Option<[Duration; 5]> = None;
        for _ in 0..3 {
            let (config, total) = timed(|| GatewayConfig::from_yaml(&text));
            config.expect("a valid document");
            let mut budget = serde_saphyr::Budget::default();
            budget.max_nodes = 8_000_000;
            budget.max_events = 16_000_000;
            let mut options = serde_saphyr::Options::default();
            options.budget = Some(budget);
            let (doc, parse) = timed(|| serde_saphyr::from_str_with_options::<serde_json::Value>(&text, options));
            let doc = doc.expect("parses");
            let mut errs = ValidationErrors::default();
            let (_, schema) = timed(|| fieldgate_crds::schema::gateway_config().check(&doc, "", &mut errs));
            assert!(errs.0.is_empty(), "{errs}");
            let (config, typed) = timed(|| serde_json::from_value::<GatewayConfig>(doc));
            let config = config.expect("typed");
            let (valid, validate) = timed(|| config.validate());
            valid.expect("valid");
            let run = [total, parse, schema, typed, validate];
            if best.is_none_or(|b| run[0] < b[0]) {
                best = Some(run);
            }
        }
        if let Some([total, parse, schema, typed, validate]) = best {
            println!(
                "{name:<28} {:>10} {total:>10.1?}  ({parse:.1?}  {schema:.1?}  {typed:.1?}  {validate:.1?})",
                text.len()
            );
        }
    }
}
