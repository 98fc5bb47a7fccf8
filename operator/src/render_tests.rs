//! Tests of the pure render: placement, merge, selection, and every refusal with its path.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use fieldgate_crds::{
    CoapConnection, Connection, Device, DeviceSecretRef, GatewayDevice, MqttAuth, MqttDeviceConnection, MqttTls,
    RawConnection, SecretKeyRef, SecretRef, Uplink, ValueType,
};
use k8s_openapi::api::core::v1::Node;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, LabelSelectorRequirement};
use k8s_openapi::jiff::{SignedDuration, Timestamp};

use super::*;
use crate::fixtures::*;

fn now() -> Timestamp {
    Timestamp::from_second(1_800_000_000).unwrap()
}

fn settings() -> Settings {
    Settings::at(now())
}

fn gateways(n: usize) -> Vec<Node> {
    (0..n).map(|i| Node::gateway(&format!("edge-{i:03}"))).collect()
}

fn many_devices(n: usize) -> Vec<Device> {
    (0..n).map(|i| Device::test(&format!("dev-{i:05}"))).collect()
}

fn key(name: &str) -> ObjectKey {
    ObjectKey::new("default", name)
}

fn node_of(r: &Rendered, name: &str) -> Option<String> {
    r.devices[&key(name)].placed.as_ref().map(|p| p.node.clone())
}

fn paths(v: &Verdict) -> Vec<(&'static str, String)> {
    v.problems.iter().map(|p| (p.reason.as_str(), p.path.clone())).collect()
}

fn device_paths(r: &Rendered, name: &str) -> Vec<(&'static str, String)> {
    paths(&r.devices[&key(name)].verdict)
}

fn moved(a: &Placements, b: &Placements) -> usize {
    a.iter().filter(|(k, p)| b.get(*k).map(|q| &q.node) != Some(&p.node)).count()
}

// ---- placement ----

#[test]
fn a_pinned_device_runs_on_its_node() {
    let w = world(vec![Device::test("m").pinned("edge-002")], vec![], vec![], gateways(3));
    let r = render(&w, &Placements::new(), &settings());
    assert_eq!(node_of(&r, "m").as_deref(), Some("edge-002"));
    assert_eq!(r.nodes.keys().collect::<Vec<_>>(), ["edge-002"]);
    assert_eq!(r.nodes["edge-002"].config.devices[0].name, "m");
}

#[test]
fn a_device_pinned_to_a_node_without_a_gateway_is_refused() {
    let plain = Node::gateway("worker").label("fieldgate.io/gateway", "false");
    let w = world(vec![Device::test("m").pinned("worker")], vec![], vec![], vec![plain]);
    let r = render(&w, &Placements::new(), &settings());
    assert_eq!(device_paths(&r, "m"), [("NoMatchingNode", "spec.placement.nodeName".to_string())]);
    assert!(r.devices[&key("m")].placed.is_none());
    assert!(r.nodes.is_empty());
}

#[test]
fn a_node_selector_chooses_among_matching_nodes_only() {
    let nodes = vec![
        Node::gateway("a").label("site", "north"),
        Node::gateway("b").label("site", "south"),
        Node::gateway("c").label("site", "north"),
    ];
    let devices: Vec<Device> =
        (0..50).map(|i| Device::test(&format!("d{i}")).node_selector(&[("site", "north")])).collect();
    let r = render(&world(devices, vec![], vec![], nodes), &Placements::new(), &settings());
    let used: BTreeSet<String> = r.devices.values().filter_map(|v| v.placed.clone()).map(|p| p.node).collect();
    assert_eq!(used, BTreeSet::from(["a".to_string(), "c".to_string()]));
}

#[test]
fn a_selector_no_node_matches_is_refused_with_its_path() {
    let w = world(vec![Device::test("m").node_selector(&[("site", "mars")])], vec![], vec![], gateways(2));
    let r = render(&w, &Placements::new(), &settings());
    assert_eq!(device_paths(&r, "m"), [("NoMatchingNode", "spec.placement.nodeSelector".to_string())]);
}

#[test]
fn without_gateway_nodes_devices_are_refused() {
    let w = world(vec![Device::test("m")], vec![], vec![], vec![]);
    let r = render(&w, &Placements::new(), &settings());
    assert_eq!(device_paths(&r, "m"), [("NoMatchingNode", "spec.placement".to_string())]);
}

#[test]
fn devices_without_placement_spread_over_every_gateway_node() {
    let r = render(&world(many_devices(1000), vec![], vec![], gateways(4)), &Placements::new(), &settings());
    assert_eq!(r.nodes.len(), 4);
    for nc in r.nodes.values() {
        assert!((150..350).contains(&nc.config.devices.len()), "{}", nc.config.devices.len());
    }
}

#[test]
fn adding_a_node_moves_few_devices_and_only_to_the_new_node() {
    let n = 10;
    let before = render(&world(many_devices(2000), vec![], vec![], gateways(n)), &Placements::new(), &settings());
    let after = render(&world(many_devices(2000), vec![], vec![], gateways(n + 1)), &before.placements(), &settings());
    let (a, b) = (before.placements(), after.placements());
    let fraction = moved(&a, &b) as f64 / 2000.0;
    // Ideal is 1/(N+1) ~ 0.09; a modulo hash would move ~0.9.
    assert!(fraction <= 2.0 / (n as f64 + 1.0), "moved fraction {fraction}");
    assert!(fraction > 0.0);
    for (k, p) in &b {
        if a[k].node != p.node {
            assert_eq!(p.node, "edge-010", "{k} moved between old nodes");
        }
    }
}

#[test]
fn removing_a_node_moves_only_its_devices() {
    let before = render(&world(many_devices(1000), vec![], vec![], gateways(5)), &Placements::new(), &settings());
    let mut fewer = gateways(5);
    fewer.remove(2);
    let after = render(&world(many_devices(1000), vec![], vec![], fewer), &before.placements(), &settings());
    let (a, b) = (before.placements(), after.placements());
    for (k, p) in &a {
        if p.node != "edge-002" {
            assert_eq!(b[k].node, p.node, "{k} moved although its node stayed");
        } else {
            assert_ne!(b[k].node, "edge-002");
        }
    }
    assert!(!after.nodes.contains_key("edge-002"));
}

#[test]
fn a_node_not_ready_within_the_grace_period_keeps_its_devices() {
    let since = now() - SignedDuration::from_secs(60);
    let mut nodes = gateways(3);
    nodes[1] = Node::gateway("edge-001").not_ready_since(since);
    let r0 = render(&world(many_devices(300), vec![], vec![], gateways(3)), &Placements::new(), &settings());
    let r = render(&world(many_devices(300), vec![], vec![], nodes), &r0.placements(), &settings());
    assert_eq!(moved(&r0.placements(), &r.placements()), 0);
    assert_eq!(r.next_review, Some(since + SignedDuration::from_secs(300)));
}

#[test]
fn network_devices_leave_a_node_not_ready_past_the_grace_period() {
    let r0 = render(
        &world(
            many_devices(300).into_iter().chain([Device::test("pinned").pinned("edge-001")]).collect(),
            vec![],
            vec![],
            gateways(3),
        ),
        &Placements::new(),
        &settings(),
    );
    let mut nodes = gateways(3);
    nodes[1] = Node::gateway("edge-001").not_ready_since(now() - SignedDuration::from_secs(301));
    let devices: Vec<Device> =
        many_devices(300).into_iter().chain([Device::test("pinned").pinned("edge-001")]).collect();
    let r = render(&world(devices, vec![], vec![], nodes), &r0.placements(), &settings());
    let (a, b) = (r0.placements(), r.placements());
    let mut targets = BTreeSet::new();
    for (k, p) in &a {
        if k.name == "pinned" {
            assert_eq!(b[k].node, "edge-001", "a pinned device stays");
        } else if p.node == "edge-001" {
            assert_ne!(b[k].node, "edge-001");
            assert_eq!(b[k].failed_over_from.as_deref(), Some("edge-001"));
            targets.insert(b[k].node.clone());
        } else {
            assert_eq!(b[k], *p, "{k} was not on the failed node");
        }
    }
    assert_eq!(targets.len(), 2, "the failed node's devices spread over both others");
    assert_eq!(r.next_review, None);
}

#[test]
fn failed_over_devices_return_only_when_fail_back_is_set() {
    let devices = || many_devices(200);
    let r0 = render(&world(devices(), vec![], vec![], gateways(3)), &Placements::new(), &settings());
    let mut failed = gateways(3);
    failed[0] = Node::gateway("edge-000").not_ready_since(now() - SignedDuration::from_secs(600));
    let r1 = render(&world(devices(), vec![], vec![], failed), &r0.placements(), &settings());
    assert!(r1.devices.values().all(|v| v.placed.as_ref().unwrap().node != "edge-000"));

    let mut recovered = gateways(3);
    recovered[0] = Node::gateway("edge-000").ready_since(now());
    let stay = render(&world(devices(), vec![], vec![], recovered.clone()), &r1.placements(), &settings());
    assert_eq!(moved(&r1.placements(), &stay.placements()), 0, "no fail-back by default");
    assert!(stay.placements().values().any(|p| p.failed_over_from.as_deref() == Some("edge-000")));

    let back = Settings { fail_back: true, ..settings() };
    let r2 = render(&world(devices(), vec![], vec![], recovered), &stay.placements(), &back);
    assert_eq!(r2.placements(), r0.placements(), "with fail-back every device is home again");
}

#[test]
fn previous_placements_are_read_from_device_status() {
    let mut d = Device::test("m");
    d.status = Some(fieldgate_crds::DeviceStatus {
        node: Some("edge-001".into()),
        failed_over_from: Some("edge-000".into()),
        ..Default::default()
    });
    let p = placements_from_status(&[std::sync::Arc::new(d)]);
    assert_eq!(p[&key("m")].node, "edge-001");
    assert_eq!(p[&key("m")].failed_over_from.as_deref(), Some("edge-000"));
}

// ---- profiles ----

#[test]
fn inline_points_override_profile_points_by_name_and_extra_ones_are_appended() {
    let mut temp = point("temperature", 10);
    temp.value_type = ValueType::Int16;
    let prof = profile("th", vec![point("humidity", 0), point("temperature", 1), point("battery", 2)]);
    let d = Device::test("m").profile("th").points(vec![temp.clone(), point("extra", 20)]);
    let r = render(&world(vec![d], vec![prof], vec![], gateways(1)), &Placements::new(), &settings());
    let dev = &r.nodes["edge-000"].config.devices[0];
    let names: Vec<&str> = dev.points.iter().map(|p| p.name.as_str()).collect();
    assert_eq!(names, ["humidity", "temperature", "battery", "extra"]);
    assert_eq!(dev.points[1], temp);
}

#[test]
fn a_device_with_an_unknown_profile_is_refused() {
    let d = Device::test("m").profile("ghost");
    let other_ns = profile("ghost", vec![point("x", 0)]);
    let mut other_ns = other_ns;
    other_ns.metadata.namespace = Some("elsewhere".into());
    let r = render(&world(vec![d], vec![other_ns], vec![], gateways(1)), &Placements::new(), &settings());
    assert_eq!(device_paths(&r, "m"), [("UnknownProfile", "spec.profile".to_string())]);
    assert!(r.nodes.is_empty());
}

#[test]
fn an_invalid_profile_is_refused_with_its_path_and_so_are_its_devices() {
    let mut bad = point("label", 0);
    bad.value_type = ValueType::String; // no length
    let prof = profile("p", vec![bad, point("label", 3)]);
    let d = Device::test("m").profile("p").points(vec![]);
    let r = render(&world(vec![d], vec![prof], vec![], gateways(1)), &Placements::new(), &settings());
    assert_eq!(
        paths(&r.profiles[&key("p")]),
        [
            ("InvalidSpec", "spec.points[1].name".to_string()),
            ("InvalidSpec", "spec.points[0].modbus.length".to_string())
        ]
    );
    assert_eq!(device_paths(&r, "m"), [("InvalidProfile", "spec.profile".to_string())]);
    assert!(r.devices[&key("m")].verdict.message().contains("spec.points[0].modbus.length"));
}

#[test]
fn profile_points_that_do_not_fit_the_device_name_the_profile_point() {
    let mut no_modbus = point("t", 0);
    no_modbus.modbus = None;
    let prof = profile("p", vec![no_modbus]);
    let d = Device::test("m").profile("p").points(vec![]);
    let r = render(&world(vec![d], vec![prof], vec![], gateways(1)), &Placements::new(), &settings());
    assert_eq!(device_paths(&r, "m"), [("InvalidProfile", "spec.profile".to_string())]);
    let msg = r.devices[&key("m")].verdict.message();
    assert!(msg.contains("spec.points[0].modbus: required for a Modbus device"), "{msg}");
    assert!(r.profiles[&key("p")].configured(), "a profile alone does not know the protocol");
}

#[test]
fn an_overriding_point_is_reported_at_its_own_path_in_the_device() {
    let mut big = point("energy", 65_535);
    big.value_type = ValueType::Float32;
    let prof = profile("p", vec![point("energy", 0)]);
    let d = Device::test("m").profile("p").points(vec![point("other", 1), big]);
    let r = render(&world(vec![d], vec![prof], vec![], gateways(1)), &Placements::new(), &settings());
    assert_eq!(device_paths(&r, "m"), [("InvalidSpec", "spec.points[1].modbus.address".to_string())]);
}

#[test]
fn a_device_without_any_point_is_refused() {
    let d = Device::test("m").points(vec![]);
    let r = render(&world(vec![d], vec![], vec![], gateways(1)), &Placements::new(), &settings());
    assert_eq!(device_paths(&r, "m"), [("InvalidSpec", "spec.points".to_string())]);
}

#[test]
fn every_invalid_device_field_is_reported_with_its_path() {
    let d = Device::test("m").spec_with(|s| {
        s.poll_interval = Some("5ms".parse().unwrap());
        let fieldgate_crds::Connection::ModbusTcp(c) = &mut s.connection else { unreachable!() };
        c.port = Some(0);
        c.timeout = Some("0s".parse().unwrap());
        s.points[0].scale = Some(0.0);
    });
    let r = render(&world(vec![d], vec![], vec![], gateways(1)), &Placements::new(), &settings());
    assert_eq!(
        device_paths(&r, "m"),
        [
            ("InvalidSpec", "spec.connection.modbusTcp.port".to_string()),
            ("InvalidSpec", "spec.connection.modbusTcp.timeout".to_string()),
            ("InvalidSpec", "spec.pollInterval".to_string()),
            ("InvalidSpec", "spec.points[0].scale".to_string()),
        ]
    );
    let v = &r.devices[&key("m")].verdict;
    assert_eq!(v.reason(), "InvalidSpec");
    let message = v.message();
    assert!(message.contains("spec.connection.modbusTcp.port: 0 is out of range 1-65535"), "{message}");
    assert!(message.contains("spec.pollInterval: \"5ms\" is shorter than the minimum 10ms"), "{message}");
}

#[test]
fn an_invalid_device_with_a_bad_placement_reports_both() {
    let d = Device::test("m").pinned("nowhere").spec_with(|s| s.poll_interval = Some("1ms".parse().unwrap()));
    let r = render(&world(vec![d], vec![], vec![], gateways(1)), &Placements::new(), &settings());
    assert_eq!(
        device_paths(&r, "m"),
        [("InvalidSpec", "spec.pollInterval".to_string()), ("NoMatchingNode", "spec.placement.nodeName".to_string())]
    );
}

// ---- uplinks ----

fn labels_sel(pairs: &[(&str, &str)]) -> LabelSelector {
    LabelSelector {
        match_labels: Some(pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()),
        match_expressions: None,
    }
}

fn expr(key: &str, op: &str, values: Option<&[&str]>) -> LabelSelectorRequirement {
    LabelSelectorRequirement {
        key: key.into(),
        operator: op.into(),
        values: values.map(|v| v.iter().map(|s| s.to_string()).collect()),
    }
}

fn uplink_devices(r: &Rendered, node: &str, uplink: &str) -> Option<Vec<String>> {
    r.nodes.get(node)?.config.uplinks.iter().find(|u| u.name == uplink)?.devices.clone()
}

#[test]
fn uplinks_select_devices_by_labels_within_their_namespace() {
    let devices = vec![
        Device::test("a1").label("site", "a").pinned("edge-000"),
        Device::test("a2").label("site", "a").label("tier", "gold").pinned("edge-000"),
        Device::test("b1").label("site", "b").pinned("edge-000"),
        Device::test("a9").label("site", "a").in_ns("other").pinned("edge-000"),
    ];
    let uplinks = vec![
        Uplink::test("all"),
        Uplink::test("site-a").selector(labels_sel(&[("site", "a")])),
        Uplink::test("not-gold").selector(LabelSelector {
            match_labels: None,
            match_expressions: Some(vec![
                expr("site", "In", Some(&["a", "b"])),
                expr("tier", "NotIn", Some(&["gold"])),
            ]),
        }),
        Uplink::test("tiered").selector(LabelSelector {
            match_labels: None,
            match_expressions: Some(vec![expr("tier", "Exists", None)]),
        }),
        Uplink::test("untiered").selector(LabelSelector {
            match_labels: None,
            match_expressions: Some(vec![expr("tier", "DoesNotExist", None)]),
        }),
        Uplink::test("none").selector(labels_sel(&[("site", "z")])),
        Uplink::test("other").in_ns("other"),
    ];
    let r = render(&world(devices, vec![], uplinks, gateways(1)), &Placements::new(), &settings());
    let names = |v: &[&str]| Some(v.iter().map(|s| s.to_string()).collect::<Vec<_>>());
    assert_eq!(uplink_devices(&r, "edge-000", "all"), names(&["a1", "a2", "b1"]));
    assert_eq!(uplink_devices(&r, "edge-000", "site-a"), names(&["a1", "a2"]));
    assert_eq!(uplink_devices(&r, "edge-000", "not-gold"), names(&["a1", "b1"]));
    assert_eq!(uplink_devices(&r, "edge-000", "tiered"), names(&["a2"]));
    assert_eq!(uplink_devices(&r, "edge-000", "untiered"), names(&["a1", "b1"]));
    assert_eq!(uplink_devices(&r, "edge-000", "none"), None);
    let other = r.nodes["edge-000"].config.uplinks.iter().find(|u| u.name == "other").unwrap();
    assert_eq!((other.namespace.as_str(), other.devices.clone()), ("other", names(&["a9"])));
    let none = &r.uplinks[&key("none")];
    assert!(none.verdict.configured() && none.devices == 0 && none.nodes.is_empty());
    assert_eq!(r.uplinks[&key("all")].devices, 3);
}

#[test]
fn a_node_runs_only_the_uplinks_of_its_devices_with_only_its_devices() {
    let devices = vec![
        Device::test("a").label("site", "a").pinned("edge-000"),
        Device::test("b").label("site", "b").pinned("edge-001"),
        Device::test("c").label("site", "a").pinned("edge-001"),
    ];
    let uplinks = vec![
        Uplink::test("to-a").selector(labels_sel(&[("site", "a")])),
        Uplink::test("to-b").selector(labels_sel(&[("site", "b")])),
    ];
    let r = render(&world(devices, vec![], uplinks, gateways(2)), &Placements::new(), &settings());
    assert_eq!(uplink_devices(&r, "edge-000", "to-a"), Some(vec!["a".to_string()]));
    assert_eq!(uplink_devices(&r, "edge-000", "to-b"), None);
    assert_eq!(uplink_devices(&r, "edge-001", "to-a"), Some(vec!["c".to_string()]));
    assert_eq!(uplink_devices(&r, "edge-001", "to-b"), Some(vec!["b".to_string()]));
    assert_eq!(r.uplinks[&key("to-a")].nodes, BTreeSet::from(["edge-000".to_string(), "edge-001".to_string()]));
}

/// What the gateway authorises commands with: the rendered uplink selects only the devices its
/// selector matches in its own namespace, also when another namespace has a device of the same
/// name on the same node.
#[test]
fn a_rendered_uplink_commands_only_the_devices_its_selector_matches_in_its_namespace() {
    let devices = vec![
        Device::test("valve").label("cmd", "yes").pinned("edge-000"),
        Device::test("pump").pinned("edge-000"),
        Device::test("valve").label("cmd", "yes").in_ns("b").pinned("edge-000"),
    ];
    let mut cmd = Uplink::test("cmd").selector(labels_sel(&[("cmd", "yes")]));
    cmd.spec.mqtt.as_mut().unwrap().command_topic = Some("fieldgate/{namespace}/{device}/commands".into());
    let r = render(&world(devices, vec![], vec![cmd], gateways(1)), &Placements::new(), &settings());
    let cfg = &r.nodes["edge-000"].config;
    let uplink = cfg.uplinks.iter().find(|u| u.name == "cmd").unwrap();
    assert_eq!(uplink.mqtt.as_ref().unwrap().command_topic.as_deref(), Some("fieldgate/{namespace}/{device}/commands"));
    let selected: Vec<String> =
        cfg.devices.iter().filter(|d| uplink.selects(d)).map(|d| format!("{}/{}", d.namespace, d.name)).collect();
    assert_eq!(selected, ["default/valve"]);
}

#[test]
fn invalid_devices_never_reach_an_uplink_or_a_gateway() {
    let devices =
        vec![Device::test("good"), Device::test("bad").spec_with(|s| s.poll_interval = Some("1ms".parse().unwrap()))];
    let r = render(&world(devices, vec![], vec![Uplink::test("all")], gateways(1)), &Placements::new(), &settings());
    let cfg = &r.nodes["edge-000"].config;
    assert_eq!(cfg.devices.iter().map(|d| d.name.as_str()).collect::<Vec<_>>(), ["good"]);
    assert_eq!(uplink_devices(&r, "edge-000", "all"), Some(vec!["good".to_string()]));
}

#[test]
fn malformed_selectors_are_refused_with_their_path() {
    let sel = LabelSelector {
        match_labels: None,
        match_expressions: Some(vec![
            expr("a", "Equals", Some(&["x"])),
            expr("b", "In", None),
            expr("c", "Exists", Some(&["x"])),
            expr("d", "NotIn", Some(&[])),
        ]),
    };
    let r = render(
        &world(vec![Device::test("m")], vec![], vec![Uplink::test("u").selector(sel)], gateways(1)),
        &Placements::new(),
        &settings(),
    );
    assert_eq!(
        paths(&r.uplinks[&key("u")].verdict),
        [
            ("InvalidSelector", "spec.deviceSelector.matchExpressions[0].operator".to_string()),
            ("InvalidSelector", "spec.deviceSelector.matchExpressions[1].values".to_string()),
            ("InvalidSelector", "spec.deviceSelector.matchExpressions[2].values".to_string()),
            ("InvalidSelector", "spec.deviceSelector.matchExpressions[3].values".to_string()),
        ]
    );
    assert!(r.nodes["edge-000"].config.uplinks.is_empty(), "an invalid uplink reaches no gateway");
}

#[test]
fn an_invalid_uplink_spec_is_refused_with_its_paths() {
    let mut u = Uplink::test("u");
    u.spec.mqtt.as_mut().unwrap().qos = Some(2);
    u.spec.mqtt.as_mut().unwrap().max_in_flight = Some(0);
    u.spec.mqtt.as_mut().unwrap().tls = Some(MqttTls::default());
    u.spec.buffer = Some(fieldgate_crds::BufferSpec { max_bytes: Some("1Ki".parse().unwrap()), ..Default::default() });
    let r = render(&world(vec![Device::test("m")], vec![], vec![u], gateways(1)), &Placements::new(), &settings());
    assert_eq!(
        paths(&r.uplinks[&key("u")].verdict),
        [
            ("InvalidSpec", "spec.mqtt.maxInFlight".to_string()),
            ("InvalidSpec", "spec.mqtt.qos".to_string()),
            ("InvalidSpec", "spec.mqtt.tls".to_string()),
            ("InvalidSpec", "spec.buffer.maxBytes".to_string()),
        ]
    );
    let message = r.uplinks[&key("u")].verdict.message();
    assert!(message.contains("spec.mqtt.maxInFlight: 0 is out of range 1-65535"), "{message}");
}

#[test]
fn secret_references_that_leave_their_directory_are_refused_in_every_kind_of_object() {
    let mut u = tls_uplink();
    u.spec.mqtt.as_mut().unwrap().auth.as_mut().unwrap().secret_ref.name = "../creds".into();
    u.spec.mqtt.as_mut().unwrap().tls.as_mut().unwrap().ca_secret_ref.as_mut().unwrap().key = Some("../ca.crt".into());
    let d = Device::test("m").spec_with(|s| {
        s.connection = fieldgate_crds::Connection::Tcp(fieldgate_crds::RawConnection {
            id: None,
            token_secret_ref: fieldgate_crds::DeviceSecretRef { name: "tok".into(), key: Some("..".into()) },
        });
        s.points[0].modbus = None;
    });
    let r = render(&world(vec![d], vec![], vec![u], gateways(1)), &Placements::new(), &settings());
    assert_eq!(
        paths(&r.uplinks[&key("u")].verdict),
        [
            ("InvalidSpec", "spec.mqtt.auth.secretRef.name".to_string()),
            ("InvalidSpec", "spec.mqtt.tls.caSecretRef.key".to_string()),
        ]
    );
    assert_eq!(device_paths(&r, "m"), [("InvalidSpec", "spec.connection.tcp.tokenSecretRef.key".to_string())]);
}

fn tls_uplink() -> Uplink {
    let mut u = Uplink::test("u").auth("creds");
    u.spec.mqtt.as_mut().unwrap().url = "mqtts://broker:8883".parse().unwrap();
    u.spec.mqtt.as_mut().unwrap().tls = Some(MqttTls {
        ca_secret_ref: Some(SecretKeyRef { name: "ca".into(), key: Some("root.pem".into()) }),
        client_cert_secret_ref: Some(SecretRef { name: "cert".into() }),
    });
    u
}

fn index(entries: &[(&str, &[&str])]) -> SecretIndex {
    entries.iter().map(|(name, keys)| (key(name), keys.iter().map(|k| k.to_string()).collect())).collect()
}

#[test]
fn unknown_secrets_and_missing_keys_are_refused_with_their_paths() {
    let mut w = world(vec![Device::test("m")], vec![], vec![tls_uplink()], gateways(1));
    w.secrets = Some(index(&[("creds", &["username"]), ("ca", &["ca.crt"])]));
    let r = render(&w, &Placements::new(), &settings());
    assert_eq!(
        paths(&r.uplinks[&key("u")].verdict),
        [
            ("MissingSecretKey", "spec.mqtt.auth.secretRef.name".to_string()),
            ("MissingSecretKey", "spec.mqtt.tls.caSecretRef.key".to_string()),
            ("UnknownSecret", "spec.mqtt.tls.clientCertSecretRef.name".to_string()),
        ]
    );
    assert!(r.uplinks[&key("u")].verdict.message().contains("Secret \"creds\" has no key \"password\""));
}

#[test]
fn a_node_gets_exactly_the_secret_keys_of_its_uplinks_under_namespaced_names() {
    let mut w = world(vec![Device::test("m")], vec![], vec![tls_uplink(), Uplink::test("plain")], gateways(1));
    w.secrets = Some(index(&[
        ("creds", &["username", "password", "unrelated"]),
        ("ca", &["root.pem"]),
        ("cert", &["tls.crt", "tls.key"]),
    ]));
    let r = render(&w, &Placements::new(), &settings());
    assert!(r.uplinks[&key("u")].verdict.configured(), "{:?}", r.uplinks[&key("u")].verdict);
    let nc = &r.nodes["edge-000"];
    let got: Vec<String> = nc.secrets.iter().map(|s| format!("{}:{}", s.secret, s.key)).collect();
    assert_eq!(
        got,
        [
            "default/ca:root.pem",
            "default/cert:tls.crt",
            "default/cert:tls.key",
            "default/creds:password",
            "default/creds:username",
        ]
    );
    let mqtt = nc.config.uplinks.iter().find(|u| u.name == "u").unwrap().mqtt.as_ref().unwrap();
    assert_eq!(mqtt.auth.as_ref().unwrap().secret_ref.name, "default_creds");
    let tls = mqtt.tls.as_ref().unwrap();
    assert_eq!(tls.ca_secret_ref.as_ref().unwrap().name, "default_ca");
    assert_eq!(tls.ca_secret_ref.as_ref().unwrap().key.as_deref(), Some("root.pem"));
    assert_eq!(tls.client_cert_secret_ref.as_ref().unwrap().name, "default_cert");
}

#[test]
fn secret_references_are_not_checked_when_secrets_are_unknown() {
    let r = render(
        &world(vec![Device::test("m")], vec![], vec![tls_uplink()], gateways(1)),
        &Placements::new(),
        &settings(),
    );
    assert!(r.uplinks[&key("u")].verdict.configured());
}

// ---- the rendered document ----

#[test]
fn every_rendered_config_is_valid_for_the_gateway_and_versioned_by_content() {
    let devices: Vec<Device> = many_devices(100).into_iter().map(|d| d.label("site", "a")).collect();
    let uplinks = vec![Uplink::test("all"), Uplink::test("a").selector(labels_sel(&[("site", "a")]))];
    let w = world(devices, vec![], uplinks, gateways(7));
    let r = render(&w, &Placements::new(), &settings());
    for (node, nc) in &r.nodes {
        nc.config.validate().unwrap_or_else(|e| panic!("{node}: {e}"));
        assert_eq!(nc.config.node.as_deref(), Some(node.as_str()));
        assert_eq!(nc.config.version.as_deref(), Some(content_hash(&nc.config).as_str()));
        let yaml = serde_saphyr::to_string(&nc.config).unwrap();
        assert_eq!(fieldgate_crds::GatewayConfig::from_yaml(&yaml).unwrap(), nc.config);
    }
    let again = render(&w, &r.placements(), &settings());
    let versions =
        |r: &Rendered| r.nodes.iter().map(|(n, c)| (n.clone(), c.config.version.clone())).collect::<BTreeMap<_, _>>();
    assert_eq!(versions(&r), versions(&again), "same input, same versions");

    let mut changed = w.clone();
    let mut d0 = (*changed.devices[0]).clone();
    d0.spec.poll_interval = Some("2s".parse().unwrap());
    changed.devices[0] = std::sync::Arc::new(d0);
    let r2 = render(&changed, &r.placements(), &settings());
    let diff: Vec<_> = versions(&r).into_iter().filter(|(n, v)| versions(&r2).get(n) != Some(v)).collect();
    assert_eq!(diff.len(), 1, "only the node of the changed device gets a new version: {diff:?}");
}

#[test]
fn nodes_without_the_gateway_label_or_being_deleted_get_nothing() {
    let mut deleting = Node::gateway("going");
    deleting.metadata.deletion_timestamp = Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(now()));
    let mut unlabelled = Node::gateway("plain");
    unlabelled.metadata.labels = None;
    let r = render(
        &world(many_devices(20), vec![], vec![], vec![deleting, unlabelled, Node::gateway("edge")]),
        &Placements::new(),
        &settings(),
    );
    assert_eq!(r.nodes.keys().collect::<Vec<_>>(), ["edge"]);
    assert_eq!(r.gateway_nodes.len(), 1);
}

#[test]
fn the_grace_period_is_a_setting() {
    let mut nodes = gateways(2);
    nodes[0] = Node::gateway("edge-000").not_ready_since(now() - SignedDuration::from_secs(20));
    let short = Settings { failover_grace: Duration::from_secs(10), ..settings() };
    let r = render(&world(many_devices(50), vec![], vec![], nodes), &Placements::new(), &short);
    assert_eq!(r.nodes.keys().collect::<Vec<_>>(), ["edge-001"]);
}

// ---- device credentials ----

/// A point read from a JSON message (CoAP, MQTT, TCP, UDP devices).
fn field_point(name: &str) -> fieldgate_crds::Point {
    fieldgate_crds::Point { modbus: None, ..point(name, 0) }
}

fn token_ref(name: &str, key: Option<&str>) -> DeviceSecretRef {
    DeviceSecretRef { name: name.into(), key: key.map(str::to_string) }
}

/// A device on `node` whose connection is `connection`.
fn field_device(name: &str, node: &str, connection: Connection) -> Device {
    Device::test(name).pinned(node).spec_with(|s| {
        s.connection = connection;
        s.points = vec![field_point("temp")];
    })
}

fn coap_device(name: &str, node: &str, token: Option<DeviceSecretRef>) -> Device {
    field_device(name, node, Connection::Coap(CoapConnection { token_secret_ref: token, ..Default::default() }))
}

fn tcp_device(name: &str, node: &str, token: DeviceSecretRef) -> Device {
    field_device(name, node, Connection::Tcp(RawConnection { id: None, token_secret_ref: token }))
}

fn udp_device(name: &str, node: &str, token: DeviceSecretRef) -> Device {
    field_device(name, node, Connection::Udp(RawConnection { id: None, token_secret_ref: token }))
}

fn mqtt_device(name: &str, node: &str, secret: &str) -> Device {
    field_device(
        name,
        node,
        Connection::Mqtt(MqttDeviceConnection {
            url: "mqtt://field-broker:1883".parse().unwrap(),
            topics: vec![format!("plant/{name}/#")],
            auth: Some(MqttAuth { secret_ref: SecretRef { name: secret.into() } }),
            ..Default::default()
        }),
    )
}

/// `namespace/secret:key` of every Secret key a node gets.
fn node_secrets(r: &Rendered, node: &str) -> Vec<String> {
    r.nodes[node].secrets.iter().map(|s| format!("{}:{}", s.secret, s.key)).collect()
}

fn rendered_device<'r>(r: &'r Rendered, node: &str, name: &str) -> &'r GatewayDevice {
    r.nodes[node].config.devices.iter().find(|d| d.name == name).unwrap_or_else(|| panic!("{name} not on {node}"))
}

/// The token reference of a rendered CoAP, TCP or UDP device.
fn rendered_token<'r>(r: &'r Rendered, node: &str, name: &str) -> &'r DeviceSecretRef {
    match &rendered_device(r, node, name).connection {
        Connection::Coap(c) => c.token_secret_ref.as_ref().unwrap(),
        Connection::Tcp(raw) | Connection::Udp(raw) => &raw.token_secret_ref,
        other => panic!("{name} has no token: {other:?}"),
    }
}

#[test]
fn a_coap_device_token_is_copied_to_its_node_and_the_config_names_the_copy() {
    let d = coap_device("th-1", "edge-000", Some(token_ref("coap-tok", None)));
    let mut w = world(vec![d], vec![], vec![], gateways(1));
    w.secrets = Some(index(&[("coap-tok", &["token", "unrelated"])]));
    let r = render(&w, &Placements::new(), &settings());
    assert!(r.devices[&key("th-1")].verdict.configured(), "{:?}", r.devices[&key("th-1")].verdict);
    assert_eq!(node_secrets(&r, "edge-000"), ["default/coap-tok:token"]);
    // The key stays unset: the gateway reads `token` then, which is the key copied.
    assert_eq!(rendered_token(&r, "edge-000", "th-1"), &token_ref("default_coap-tok", None));
}

#[test]
fn a_coap_device_without_a_token_needs_no_secret() {
    let mut w = world(vec![coap_device("open", "edge-000", None)], vec![], vec![], gateways(1));
    w.secrets = Some(SecretIndex::new());
    let r = render(&w, &Placements::new(), &settings());
    assert!(r.devices[&key("open")].verdict.configured());
    assert!(node_secrets(&r, "edge-000").is_empty());
}

#[test]
fn a_tcp_device_token_is_copied_with_its_named_key() {
    let d = tcp_device("meter-tcp", "edge-000", token_ref("tcp-tok", Some("meter-1")));
    let mut w = world(vec![d], vec![], vec![], gateways(1));
    w.secrets = Some(index(&[("tcp-tok", &["meter-1", "meter-2"])]));
    let r = render(&w, &Placements::new(), &settings());
    assert!(r.devices[&key("meter-tcp")].verdict.configured());
    assert_eq!(node_secrets(&r, "edge-000"), ["default/tcp-tok:meter-1"]);
    assert_eq!(rendered_token(&r, "edge-000", "meter-tcp"), &token_ref("default_tcp-tok", Some("meter-1")));
}

#[test]
fn a_udp_device_token_is_copied_under_its_namespace() {
    let d = udp_device("beacon", "edge-000", token_ref("udp-tok", None)).in_ns("plant-a");
    let mut w = world(vec![d], vec![], vec![], gateways(1));
    w.secrets =
        Some([(ObjectKey::new("plant-a", "udp-tok"), BTreeSet::from(["token".to_string()]))].into_iter().collect());
    let r = render(&w, &Placements::new(), &settings());
    assert!(r.devices[&ObjectKey::new("plant-a", "beacon")].verdict.configured());
    assert_eq!(node_secrets(&r, "edge-000"), ["plant-a/udp-tok:token"]);
    assert_eq!(rendered_token(&r, "edge-000", "beacon"), &token_ref("plant-a_udp-tok", None));
}

#[test]
fn an_mqtt_device_gets_its_username_and_password_like_an_uplink() {
    let mut w = world(vec![mqtt_device("th-mqtt", "edge-000", "field-creds")], vec![], vec![], gateways(1));
    w.secrets = Some(index(&[("field-creds", &["username", "password", "unrelated"])]));
    let r = render(&w, &Placements::new(), &settings());
    assert!(r.devices[&key("th-mqtt")].verdict.configured());
    assert_eq!(node_secrets(&r, "edge-000"), ["default/field-creds:password", "default/field-creds:username"]);
    let Connection::Mqtt(m) = &rendered_device(&r, "edge-000", "th-mqtt").connection else { unreachable!() };
    assert_eq!(m.auth.as_ref().unwrap().secret_ref.name, "default_field-creds");
}

#[test]
fn missing_device_secrets_and_keys_refuse_only_that_device_with_the_path() {
    let devices = vec![
        tcp_device("no-secret", "edge-000", token_ref("ghost", None)),
        coap_device("no-key", "edge-000", Some(token_ref("coap-tok", Some("th-9")))),
        udp_device("no-token", "edge-000", token_ref("udp-tok", None)),
        mqtt_device("no-password", "edge-000", "field-creds"),
        tcp_device("fine", "edge-000", token_ref("tcp-tok", None)),
    ];
    let mut w = world(devices, vec![], vec![Uplink::test("all")], gateways(1));
    w.secrets = Some(index(&[
        ("coap-tok", &["th-1"]),
        ("udp-tok", &["other"]),
        ("field-creds", &["username"]),
        ("tcp-tok", &["token"]),
    ]));
    let r = render(&w, &Placements::new(), &settings());
    assert_eq!(
        device_paths(&r, "no-secret"),
        [("UnknownSecret", "spec.connection.tcp.tokenSecretRef.name".to_string())]
    );
    assert_eq!(
        device_paths(&r, "no-key"),
        [("MissingSecretKey", "spec.connection.coap.tokenSecretRef.key".to_string())]
    );
    assert_eq!(
        device_paths(&r, "no-token"),
        [("MissingSecretKey", "spec.connection.udp.tokenSecretRef.name".to_string())]
    );
    assert_eq!(
        device_paths(&r, "no-password"),
        [("MissingSecretKey", "spec.connection.mqtt.auth.secretRef.name".to_string())]
    );
    let v = &r.devices[&key("no-secret")].verdict;
    assert_eq!(v.reason(), "UnknownSecret");
    assert_eq!(
        v.message(),
        "spec.connection.tcp.tokenSecretRef.name: no Secret \"ghost\" in namespace \"default\"",
        "the Configured condition's message"
    );
    assert!(r.devices[&key("no-key")].verdict.message().contains("Secret \"coap-tok\" has no key \"th-9\""));
    assert!(r.devices[&key("no-secret")].placed.is_none());

    // The other device runs, alone, with only its own Secret; the uplink carries only it.
    let cfg = &r.nodes["edge-000"].config;
    assert_eq!(cfg.devices.iter().map(|d| d.name.as_str()).collect::<Vec<_>>(), ["fine"]);
    assert_eq!(uplink_devices(&r, "edge-000", "all"), Some(vec!["fine".to_string()]));
    assert_eq!(node_secrets(&r, "edge-000"), ["default/tcp-tok:token"]);
}

#[test]
fn an_invalid_token_secret_name_is_reported_once_as_an_invalid_spec() {
    let mut w = world(vec![tcp_device("m", "edge-000", token_ref("Not_A_Name", None))], vec![], vec![], gateways(1));
    w.secrets = Some(SecretIndex::new());
    let r = render(&w, &Placements::new(), &settings());
    assert_eq!(device_paths(&r, "m"), [("InvalidSpec", "spec.connection.tcp.tokenSecretRef.name".to_string())]);
}

#[test]
fn a_device_secret_reaches_only_the_node_of_its_device() {
    let devices = vec![
        tcp_device("on-a", "edge-000", token_ref("a-tok", None)),
        mqtt_device("mqtt-on-a", "edge-000", "a-creds"),
        udp_device("on-b", "edge-001", token_ref("b-tok", None)),
        tcp_device("also-on-b", "edge-001", token_ref("shared-tok", None)),
        coap_device("also-on-c", "edge-002", Some(token_ref("shared-tok", None))),
    ];
    let secrets = index(&[
        ("a-tok", &["token"]),
        ("a-creds", &["username", "password"]),
        ("b-tok", &["token"]),
        ("shared-tok", &["token"]),
        ("creds", &["username", "password"]),
    ]);
    for known in [Some(secrets), None] {
        let mut w = world(devices.clone(), vec![], vec![Uplink::test("cloud").auth("creds")], gateways(3));
        w.secrets = known.clone();
        let r = render(&w, &Placements::new(), &settings());
        assert!(r.devices.values().all(|v| v.verdict.configured()), "{:?}", r.devices);
        assert_eq!(
            node_secrets(&r, "edge-000"),
            [
                "default/a-creds:password",
                "default/a-creds:username",
                "default/a-tok:token",
                "default/creds:password",
                "default/creds:username",
            ],
            "secrets known: {}",
            known.is_some()
        );
        assert_eq!(
            node_secrets(&r, "edge-001"),
            ["default/b-tok:token", "default/creds:password", "default/creds:username", "default/shared-tok:token"]
        );
        assert_eq!(
            node_secrets(&r, "edge-002"),
            ["default/creds:password", "default/creds:username", "default/shared-tok:token"]
        );
    }
}

/// Devices of every kind with credentials, on two nodes, with every Secret present.
fn credentialed_world() -> World {
    let devices = vec![
        coap_device("coap", "edge-000", Some(token_ref("coap-tok", None))),
        tcp_device("tcp", "edge-000", token_ref("tcp-tok", Some("meter-1"))),
        udp_device("udp", "edge-001", token_ref("udp-tok", None)),
        mqtt_device("mqtt", "edge-001", "field-creds"),
        Device::test("modbus").pinned("edge-001"),
    ];
    let mut w = world(devices, vec![], vec![Uplink::test("cloud").auth("creds")], gateways(2));
    w.secrets = Some(index(&[
        ("coap-tok", &["token"]),
        ("tcp-tok", &["meter-1"]),
        ("udp-tok", &["token"]),
        ("field-creds", &["username", "password"]),
        ("creds", &["username", "password"]),
    ]));
    w
}

#[test]
fn every_device_secret_reference_names_a_file_the_gateway_writes_from_the_node_secret() {
    use fieldgate_crds::node_objects::{secret_key, split_secret_key};
    let r = render(&credentialed_world(), &Placements::new(), &settings());
    assert!(r.devices.values().all(|v| v.verdict.configured()), "{:?}", r.devices);
    for (node, nc) in &r.nodes {
        // The files the gateway writes from the node's Secret: `<dir>/<file>`.
        let data_keys: Vec<String> =
            nc.secrets.iter().map(|s| secret_key(&s.secret.namespace, &s.secret.name, &s.key)).collect();
        let files: BTreeSet<(String, String)> = data_keys
            .iter()
            .map(|k| split_secret_key(k).map(|(d, f)| (d.to_string(), f.to_string())).unwrap())
            .collect();
        for d in &nc.config.devices {
            let wanted: Vec<(String, String)> = match &d.connection {
                Connection::Coap(c) => c
                    .token_secret_ref
                    .iter()
                    .map(|t| (t.name.clone(), t.key.clone().unwrap_or_else(|| "token".into())))
                    .collect(),
                Connection::Tcp(raw) | Connection::Udp(raw) => {
                    let t = &raw.token_secret_ref;
                    vec![(t.name.clone(), t.key.clone().unwrap_or_else(|| "token".into()))]
                }
                Connection::Mqtt(m) => m
                    .auth
                    .iter()
                    .flat_map(|a| ["username", "password"].map(|k| (a.secret_ref.name.clone(), k.to_string())))
                    .collect(),
                Connection::ModbusTcp(_) | Connection::ModbusRtu(_) => Vec::new(),
                // A protocol added later: the Secrets it declares.
                #[allow(unreachable_patterns)]
                other => other
                    .secret_refs()
                    .iter()
                    .flat_map(|r| r.reads.iter().map(|k| (r.name.to_string(), k.to_string())))
                    .collect(),
            };
            for f in wanted {
                assert!(files.contains(&f), "{node}: {} reads {f:?}, not in {files:?}", d.name);
            }
        }
    }
}

#[test]
fn rendered_device_secret_references_pass_the_gateways_validation() {
    let r = render(&credentialed_world(), &Placements::new(), &settings());
    assert_eq!(r.nodes.len(), 2);
    for (node, nc) in &r.nodes {
        nc.config.validate().unwrap_or_else(|e| panic!("{node}: {e}"));
    }
}

#[test]
fn an_unreadable_secret_refuses_only_the_objects_that_reference_it() {
    let mut w = credentialed_world();
    w.unreadable_secrets.insert(ObjectKey::new("default", "tcp-tok"), "403 Forbidden".into());
    let r = render(&w, &Placements::new(), &settings());
    let tcp = &r.devices[&ObjectKey::new("default", "tcp")];
    assert_eq!(tcp.verdict.reason(), "UnreadableSecret");
    assert_eq!(
        tcp.verdict.message(),
        "spec.connection.tcp.tokenSecretRef.name: Secret \"tcp-tok\" in namespace \"default\" could not be read: 403 Forbidden"
    );
    let others: Vec<&ObjectKey> = r.devices.iter().filter(|(_, v)| !v.verdict.configured()).map(|(k, _)| k).collect();
    assert_eq!(others, [&ObjectKey::new("default", "tcp")], "every other device stays configured");
    assert!(r.uplinks.values().all(|v| v.verdict.configured()));
    assert!(r.nodes["edge-000"].config.devices.iter().all(|d| d.name != "tcp"));
    assert!(r.nodes["edge-000"].secrets.iter().all(|s| s.secret.name != "tcp-tok"));
}

#[test]
fn single_label_hosts_name_services_of_the_objects_namespace() {
    for (host, wanted) in [
        ("fieldgate-sim", "fieldgate-sim.plant-a.svc"),
        ("sim.other.svc", "sim.other.svc"),
        ("plc-7.", "plc-7."),
        ("10.0.0.7", "10.0.0.7"),
        ("localhost", "localhost"),
        ("::1", "::1"),
        ("", ""),
    ] {
        assert_eq!(service_host(host, "plant-a"), wanted, "{host}");
    }
    let url = |text: &str| service_url(&text.parse().unwrap(), "plant-a").to_string();
    assert_eq!(url("mqtt://mosquitto:1883"), "mqtt://mosquitto.plant-a.svc:1883");
    assert_eq!(url("mqtts://broker/"), "mqtts://broker.plant-a.svc/");
    assert_eq!(url("mqtt://[::1]:1883"), "mqtt://[::1]:1883");
    assert_eq!(url("mqtt://broker.example.com:8883"), "mqtt://broker.example.com:8883");
    assert_eq!(url("mqtt://plc-7.:1883"), "mqtt://plc-7.:1883");
    assert_eq!(service_address("rtu-gw:502", "plant-a"), "rtu-gw.plant-a.svc:502");

    let device = Device::test("sim-1").in_ns("plant-a").spec_with(|s| {
        s.connection = Connection::ModbusTcp(fieldgate_crds::ModbusTcpConnection {
            host: "fieldgate-sim".into(),
            port: Some(5020),
            unit_id: None,
            timeout: None,
        });
    });
    let mut uplink = Uplink::test("cloud").in_ns("plant-a");
    uplink.spec.mqtt.as_mut().unwrap().url = "mqtt://mosquitto:1883".parse().unwrap();
    let w = world(vec![device], vec![], vec![uplink], gateways(1));
    let r = render(&w, &Placements::new(), &settings());
    let config = &r.nodes.values().next().unwrap().config;
    let Connection::ModbusTcp(c) = &config.devices[0].connection else { panic!() };
    assert_eq!(c.host, "fieldgate-sim.plant-a.svc");
    assert_eq!(config.uplinks[0].mqtt.as_ref().unwrap().url.as_str(), "mqtt://mosquitto.plant-a.svc:1883");
}
