//! The examples apply anywhere (`kubectl apply -n <any> -f examples/ -R`) and read only what
//! the example simulator serves. Checked without a cluster: the manifests name no namespace;
//! rendered for another namespace (as `-n` places them), every object is configured and every
//! host it reaches is a Service of the examples in that namespace, on a port that Service has;
//! and every Modbus point of every example device is read from the simulator the examples run
//! (its own arguments, the real `fieldgate_sim` register map) without an exception.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;

use fieldgate_crds::{Connection, ModbusTable};
use fieldgate_operator::offline::{assumed_gateway_node, read_manifests};
use fieldgate_operator::render::{ObjectKey, Placements, Settings, render};
use fieldgate_sim::SimDevice;
use k8s_openapi::jiff::Timestamp;
use serde_json::Value;
use tokio_modbus::client::Reader;
use tokio_util::sync::CancellationToken;

const NAMESPACE: &str = "anywhere";

fn examples() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../examples")
}

/// Every document of every manifest under examples/ (as `kubectl apply -f examples/ -R` reads).
fn documents() -> Vec<(PathBuf, Value)> {
    let mut out = Vec::new();
    let mut dirs = vec![examples()];
    while let Some(d) = dirs.pop() {
        for e in std::fs::read_dir(&d).unwrap().flatten() {
            let p = e.path();
            if p.is_dir() {
                dirs.push(p);
            } else if p.extension().is_some_and(|x| x == "yaml" || x == "yml" || x == "json") {
                let text = std::fs::read_to_string(&p).unwrap();
                let docs: Vec<Value> = serde_saphyr::from_multiple(&text).unwrap();
                out.extend(docs.into_iter().filter(|d| !d.is_null()).map(|d| (p.clone(), d)));
            }
        }
    }
    out
}

#[test]
fn the_examples_name_no_namespace_so_they_apply_anywhere() {
    let docs = documents();
    assert!(docs.len() >= 8, "{} documents", docs.len());
    for (path, d) in &docs {
        assert!(
            d["metadata"]["namespace"].is_null(),
            "{}: {} {} names a namespace",
            path.display(),
            d["kind"],
            d["metadata"]["name"]
        );
        assert!(!d.to_string().contains(".default.svc"), "{}: names the default namespace", path.display());
    }
}

/// The Services of the examples: name -> ports.
fn services() -> BTreeMap<String, Vec<u16>> {
    documents()
        .into_iter()
        .filter(|(_, d)| d["kind"] == "Service")
        .map(|(_, d)| {
            let ports = d["spec"]["ports"].as_array().unwrap().iter().map(|p| p["port"].as_u64().unwrap() as u16);
            (d["metadata"]["name"].as_str().unwrap().to_string(), ports.collect())
        })
        .collect()
}

/// `host`, `port` of the Service a rendered host names in [`NAMESPACE`].
fn service_of(host: &str, port: u16) -> (String, u16) {
    let name = host
        .strip_suffix(&format!(".{NAMESPACE}.svc"))
        .unwrap_or_else(|| panic!("{host} is not a Service of namespace {NAMESPACE}"));
    (name.to_string(), port)
}

#[tokio::test]
async fn in_any_namespace_the_example_devices_read_only_registers_the_example_simulator_serves() {
    // As `kubectl apply -n anywhere` would place them.
    let mut m = read_manifests(&[examples()]).unwrap();
    let w = &mut m.world;
    let moved = |mut meta: kube::api::ObjectMeta| {
        meta.namespace = Some(NAMESPACE.into());
        meta
    };
    w.devices = w
        .devices
        .iter()
        .map(|d| Arc::new(fieldgate_crds::Device { metadata: moved(d.metadata.clone()), ..(**d).clone() }))
        .collect();
    w.profiles = w
        .profiles
        .iter()
        .map(|p| Arc::new(fieldgate_crds::DeviceProfile { metadata: moved(p.metadata.clone()), ..(**p).clone() }))
        .collect();
    w.uplinks = w
        .uplinks
        .iter()
        .map(|u| Arc::new(fieldgate_crds::Uplink { metadata: moved(u.metadata.clone()), ..(**u).clone() }))
        .collect();
    w.secrets =
        w.secrets.take().map(|index| index.into_iter().map(|(k, v)| (ObjectKey::new(NAMESPACE, k.name), v)).collect());
    w.nodes = vec![Arc::new(assumed_gateway_node("edge-1"))];
    let r = render(w, &Placements::new(), &Settings::at(Timestamp::now()));
    for (k, v) in &r.devices {
        assert!(v.verdict.configured(), "{k}: {}", v.verdict.message());
    }
    for (k, v) in &r.uplinks {
        assert!(v.verdict.configured(), "{k}: {}", v.verdict.message());
        assert_eq!(v.devices, r.devices.len(), "{k} selects every example device");
    }
    let config = &r.nodes["edge-1"].config;
    assert_eq!(config.devices.len(), 2);
    let services = services();

    // The broker: a Service of the examples.
    let url = &config.uplinks[0].mqtt.as_ref().expect("an MQTT uplink").url;
    let (svc, port) = service_of(url.host(), url.port());
    assert!(services.get(&svc).is_some_and(|p| p.contains(&port)), "{url}: no Service {svc} with port {port}");

    // The simulator as the examples run it.
    let sim = documents()
        .into_iter()
        .find(|(_, d)| d["kind"] == "Deployment" && d["metadata"]["name"] == "fieldgate-sim")
        .unwrap()
        .1;
    let args: Vec<String> = sim["spec"]["template"]["spec"]["containers"][0]["args"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a.as_str().unwrap().to_string())
        .collect();
    let arg = |name: &str, default: u16| {
        args.iter().position(|a| a == name).map_or(default, |i| args[i + 1].parse().unwrap())
    };
    let (count, base_port, extra) = (arg("--devices", 1), arg("--base-port", 5020), arg("--extra-registers", 0));

    let cancel = CancellationToken::new();
    let mut served = BTreeMap::new();
    for i in 0..count {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        served.insert(base_port + i, listener.local_addr().unwrap());
        tokio::spawn(fieldgate_sim::serve(listener, SimDevice::new(u32::from(i), extra), cancel.clone()));
    }
    let mut reads = 0;
    for d in &config.devices {
        let Connection::ModbusTcp(c) = &d.connection else { panic!("{}: not Modbus TCP", d.name) };
        let (svc, port) = service_of(&c.host, c.port.unwrap_or(502));
        assert!(services.get(&svc).is_some_and(|p| p.contains(&port)), "{}: no Service {svc} with port {port}", d.name);
        let addr = served.get(&port).unwrap_or_else(|| panic!("{}: the simulator serves no device on {port}", d.name));
        let mut ctx =
            tokio_modbus::client::tcp::connect_slave(*addr, tokio_modbus::Slave(c.unit_id.unwrap_or(1))).await.unwrap();
        for p in &d.points {
            let Some(m) = &p.modbus else { continue };
            let n = m.span(p.value_type);
            let answer = match m.table {
                ModbusTable::Holding => ctx.read_holding_registers(m.address, n).await.unwrap().map(|_| ()),
                ModbusTable::Input => ctx.read_input_registers(m.address, n).await.unwrap().map(|_| ()),
                ModbusTable::Coil => ctx.read_coils(m.address, n).await.unwrap().map(|_| ()),
                ModbusTable::Discrete => ctx.read_discrete_inputs(m.address, n).await.unwrap().map(|_| ()),
            };
            answer.unwrap_or_else(|e| panic!("{}/{}: {:?} {} x{n}: {e}", d.name, p.name, m.table, m.address));
            reads += 1;
        }
    }
    assert!(reads >= 13, "{reads} points read");
    cancel.cancel();
}
