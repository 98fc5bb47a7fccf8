//! `fieldgate-bench-operator`: render time and memory on a synthetic world (by default 10,000
//! Devices over 100 gateway nodes, 10 profiles, 5 uplinks, in 10 namespaces).
//!
//! Prints figures; asserts nothing. Memory is the process's resident set from
//! `/proc/self/status` (VmRSS now, VmHWM peak), so it includes the synthetic objects as the
//! operator's watch caches would hold them.

use std::fmt::Write as _;
use std::sync::Arc;
use std::time::{Duration, Instant};

use fieldgate_crds::{
    BrokerUrl, Connection, Device, DeviceProfile, DeviceProfileSpec, DeviceSpec, ModbusPoint, ModbusTable,
    ModbusTcpConnection, MqttUplink, Point, Uplink, UplinkSpec, ValueType,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;
use k8s_openapi::jiff::Timestamp;
use kube::api::ObjectMeta;

use fieldgate_operator::offline::assumed_gateway_node;
use fieldgate_operator::render::{self, Placements, Settings, World};

pub mod cold_start;

/// Arguments of `fieldgate-bench-operator`.
#[derive(Clone, Debug, clap::Args)]
pub struct BenchArgs {
    /// Devices.
    #[arg(long, default_value_t = 10_000)]
    pub devices: usize,
    /// Gateway nodes.
    #[arg(long, default_value_t = 100)]
    pub nodes: usize,
    /// Render repetitions (the figure is the median).
    #[arg(long, default_value_t = 5)]
    pub rounds: usize,
    /// Instead: run the operator (`run`, as a child process) against a mocked API server and
    /// measure cold start to all ConfigMaps applied, and the operator's memory.
    #[arg(long)]
    pub cold_start: bool,
    /// Give up the cold start after this long.
    #[arg(long, default_value = "120s", value_parser = humantime::parse_duration)]
    pub timeout: std::time::Duration,
    /// Cold start: run the operator under this program, e.g. `heaptrack` (its RSS figures are
    /// then the wrapper's, not the operator's).
    #[arg(long)]
    pub wrap: Option<String>,
}

fn meta(ns: &str, name: &str, labels: &[(&str, &str)]) -> ObjectMeta {
    ObjectMeta {
        name: Some(name.into()),
        namespace: Some(ns.into()),
        generation: Some(1),
        labels: Some(labels.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()),
        ..ObjectMeta::default()
    }
}

fn point(name: String, address: u16) -> Point {
    Point {
        name,
        value_type: ValueType::Float32,
        access: Default::default(),
        unit: Some("Cel".into()),
        scale: Some(0.1),
        offset: None,
        modbus: Some(ModbusPoint { table: ModbusTable::Holding, address, word_order: None, length: None, bit: None }),
        path: None,
        report: None,
    }
}

/// The synthetic world.
pub fn world(devices: usize, nodes: usize) -> World {
    let namespaces = 10;
    let mut w = World::default();
    for n in 0..nodes {
        let mut node = assumed_gateway_node(&format!("edge-{n:04}"));
        node.metadata.uid = Some(format!("uid-{n}"));
        w.nodes.push(Arc::new(node));
    }
    for ns in 0..namespaces {
        let ns_name = format!("site-{ns}");
        let profile = DeviceProfile {
            metadata: meta(&ns_name, "meter", &[]),
            spec: DeviceProfileSpec { points: (0..10).map(|i| point(format!("p{i}"), i * 2)).collect() },
        };
        w.profiles.push(Arc::new(profile));
        let broker = BrokerUrl::default();
        let uplink = |name: &str, selector: Option<LabelSelector>| Uplink {
            metadata: meta(&ns_name, name, &[]),
            spec: UplinkSpec {
                device_selector: selector,
                mqtt: Some(MqttUplink { url: broker.clone(), protocol_version: Some(5), ..Default::default() }),
                http: None,
                encoding: None,
                compression: None,
                sparkplug: None,
                buffer: None,
            },
            status: None,
        };
        w.uplinks.push(Arc::new(uplink("cloud", None)));
        if ns < 5 {
            let sel = LabelSelector {
                match_labels: Some([("tier".to_string(), "gold".to_string())].into()),
                match_expressions: None,
            };
            w.uplinks.push(Arc::new(uplink("gold", Some(sel))));
        }
    }
    for d in 0..devices {
        let ns_name = format!("site-{}", d % namespaces);
        let tier = if d % 3 == 0 { "gold" } else { "silver" };
        let device = Device {
            metadata: meta(&ns_name, &format!("meter-{d:05}"), &[("tier", tier)]),
            spec: DeviceSpec {
                profile: Some("meter".into()),
                points: vec![point("p0".into(), 100)],
                connection: Connection::ModbusTcp(ModbusTcpConnection {
                    host: format!("10.{}.{}.{}", d / 65_536 % 256, d / 256 % 256, d % 256),
                    port: Some(502),
                    unit_id: Some(1),
                    timeout: Some(Duration::from_millis(500).into()),
                }),
                poll_interval: Some(Duration::from_secs(1).into()),
                placement: None,
            },
            status: None,
        };
        w.devices.push(Arc::new(device));
    }
    w
}

fn proc_status(field: &str) -> String {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| s.lines().find(|l| l.starts_with(field)).map(|l| l[field.len()..].trim().to_string()))
        .unwrap_or_else(|| "n/a".into())
}

/// Runs the benchmark; returns the figures as text.
pub fn run(args: &BenchArgs) -> anyhow::Result<String> {
    let mut out = String::new();
    let profile =
        if cfg!(debug_assertions) { "debug build (slow; use --release for real figures)" } else { "release build" };
    writeln!(out, "fieldgate-bench-operator: {} devices, {} gateway nodes, {profile}", args.devices, args.nodes)?;
    writeln!(
        out,
        "(in-process: objects + render + serialised configs; for the whole operator against an API server, see --cold-start)"
    )?;
    writeln!(out, "RSS at start: {}", proc_status("VmRSS:"))?;
    let t = Instant::now();
    let w = world(args.devices, args.nodes);
    writeln!(out, "build synthetic objects: {:?}; RSS {}", t.elapsed(), proc_status("VmRSS:"))?;

    let settings = Settings::at(Timestamp::now());
    // Like the controller: plan, then per node build the config, hash, serialise, drop.
    let t = Instant::now();
    let cold = render::plan(&w, &Placements::new(), &settings);
    writeln!(out, "cold plan (every decision, configs not built): {:?} -> {} nodes", t.elapsed(), cold.nodes.len())?;
    let per_node: Vec<usize> = cold.nodes.values().map(|n| n.device_count()).collect();
    writeln!(
        out,
        "devices per node: min {} max {}",
        per_node.iter().min().copied().unwrap_or(0),
        per_node.iter().max().copied().unwrap_or(0)
    )?;
    let t = Instant::now();
    let mut bytes = 0;
    let mut peak_node = 0;
    for plan in cold.nodes.values() {
        let nc = plan.config();
        let yaml = serde_saphyr::to_string(&nc.config)?;
        bytes += yaml.len();
        peak_node = peak_node.max(yaml.len());
    }
    writeln!(
        out,
        "build + hash + serialise every node's config (YAML, one node at a time, as the writer does): {:?}, {} KiB total, largest {} KiB",
        t.elapsed(),
        bytes / 1024,
        peak_node / 1024
    )?;
    writeln!(out, "RSS with the objects and one plan: {}", proc_status("VmRSS:"))?;
    let previous = cold.placements();
    drop(cold);
    let mut times = Vec::new();
    for _ in 0..args.rounds.max(1) {
        let t = Instant::now();
        let r = render::plan(&w, &previous, &settings);
        let built: usize = r.nodes.values().map(|n| n.config().config.devices.len()).sum();
        times.push(t.elapsed());
        drop((r, built));
    }
    times.sort();
    writeln!(out, "warm plan + build every config (median of {}): {:?}", times.len(), times[times.len() / 2])?;
    writeln!(
        out,
        "RSS after {} more plans: {}; peak (VmHWM): {}",
        times.len(),
        proc_status("VmRSS:"),
        proc_status("VmHWM:")
    )?;
    let t = Instant::now();
    let all = render::render(&w, &previous, &settings);
    let took = t.elapsed();
    writeln!(
        out,
        "for comparison, every config built at once (`render -f`, not the controller): {took:?}; RSS {}, peak (VmHWM) {}",
        proc_status("VmRSS:"),
        proc_status("VmHWM:")
    )?;
    drop(all);
    writeln!(
        out,
        "sizes: Device {} B, Point {} B, GatewayDevice {} B (stack part; strings and vectors extra)",
        std::mem::size_of::<Device>(),
        std::mem::size_of::<Point>(),
        std::mem::size_of::<fieldgate_crds::GatewayDevice>()
    )?;
    Ok(out)
}
