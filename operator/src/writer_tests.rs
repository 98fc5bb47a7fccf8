//! The writer against a mocked API server: the exact requests of a pass, in order.

use std::sync::Arc;

use fieldgate_crds::{Device, GatewayConfig, Uplink};
use http::{Request, Response, StatusCode};
use k8s_openapi::api::core::v1::Node;
use kube::client::Body;
use prometheus_client::registry::Registry;
use serde_json::{Value, json};
use tower_test::mock::{self, Handle, SendResponse};

use super::*;
use crate::fixtures::*;
use crate::render::{Placements, Settings, render};

const NS: &str = "fieldgate-system";
const APPLY_QUERY: &str = "?&force=true&fieldManager=fieldgate-operator";

/// The API server side of the mock: takes the next request, checks it, answers it.
struct ApiServer(Handle<Request<Body>, Response<Body>>);

struct Seen {
    method: http::Method,
    uri: String,
    content_type: String,
    body: Value,
    send: SendResponse<Response<Body>>,
}

impl ApiServer {
    async fn next(&mut self) -> Seen {
        let (req, send) = self.0.next_request().await.expect("the writer made no further request");
        let method = req.method().clone();
        let uri = req.uri().to_string();
        let content_type =
            req.headers().get(http::header::CONTENT_TYPE).map(|v| v.to_str().unwrap().to_string()).unwrap_or_default();
        let bytes = req.into_body().collect_bytes().await.unwrap();
        let body = if bytes.is_empty() { Value::Null } else { serde_json::from_slice(&bytes).unwrap() };
        Seen { method, uri, content_type, body, send }
    }

    /// Expects `method uri` and returns the request for more checks.
    async fn expect(&mut self, method: &str, uri: &str) -> Seen {
        let seen = self.next().await;
        assert_eq!((seen.method.as_str(), seen.uri.as_str()), (method, uri), "unexpected request");
        seen
    }

    /// Asserts the writer makes no further request once it is dropped.
    async fn expect_no_more(mut self) {
        if let Some((req, _)) = self.0.next_request().await {
            panic!("unexpected request {} {}", req.method(), req.uri());
        }
    }
}

fn reply(send: SendResponse<Response<Body>>, status: StatusCode, body: &Value) {
    send.send_response(Response::builder().status(status).body(Body::from(serde_json::to_vec(body).unwrap())).unwrap());
}

fn not_found() -> Value {
    json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure", "reason": "NotFound", "code": 404, "message": "not found"})
}

fn writer() -> (Writer, ApiServer) {
    let (service, handle) = mock::pair::<Request<Body>, Response<Body>>();
    let client = Client::new(service, "default");
    let metrics = Arc::new(Metrics::new(&mut Registry::default()));
    let settings = WriterSettings { namespace: NS.into(), concurrency: 1, instance: "op-0".into(), owner: None };
    (Writer::new(client, settings, metrics), ApiServer(handle))
}

fn object_with_status<K: serde::Serialize>(obj: &K, status: &Value) -> Value {
    let mut v = serde_json::to_value(obj).unwrap();
    v["status"] = status["status"].clone();
    v
}

struct Scenario {
    world: World,
    rendered: Rendered,
    values: SecretValues,
}

fn scenario(devices: Vec<Device>) -> Scenario {
    let mut world = world(devices, vec![], vec![Uplink::test("cloud").auth("creds")], vec![Node::gateway("edge-1")]);
    let creds = secret("default", "creds", &[("username", "gw"), ("password", "hunter2"), ("unrelated", "x")]);
    let data = creds.data.clone().unwrap();
    world.secrets = Some([(ObjectKey::new("default", "creds"), data.keys().cloned().collect())].into());
    let values: SecretValues = [(ObjectKey::new("default", "creds"), data)].into();
    let rendered = render(&world, &Placements::new(), &Settings::at(k8s_openapi::jiff::Timestamp::now()));
    Scenario { world, rendered, values }
}

#[tokio::test]
async fn a_first_pass_applies_config_and_secret_deletes_stale_nodes_and_writes_status() {
    let s = scenario(vec![Device::test("meter-1")]);
    let (mut writer, mut api) = writer();
    let version = s.rendered.nodes["edge-1"].config.version.clone().unwrap();
    let expected_config = s.rendered.nodes["edge-1"].config.clone();
    let device = s.world.devices[0].clone();
    let uplink = s.world.uplinks[0].clone();

    let server = tokio::spawn(async move {
        // 1. The node's Secret first: only the referenced keys, under <namespace>_<secret>_<key>.
        let sec = api
            .expect("PATCH", &format!("/api/v1/namespaces/{NS}/secrets/fieldgate-gateway-edge-1{APPLY_QUERY}"))
            .await;
        assert_eq!(sec.content_type, "application/apply-patch+yaml");
        assert_eq!(sec.body["type"], json!("Opaque"));
        assert_eq!(
            sec.body["data"],
            json!({"default_creds_password": "aHVudGVyMg==", "default_creds_username": "Z3c="})
        );
        let secret_hash = sec.body["metadata"]["annotations"]["fieldgate.io/secret-hash"].clone();
        assert!(secret_hash.is_string(), "{}", sec.body);
        let body = sec.body.clone();
        reply(sec.send, StatusCode::OK, &body);

        // 2. Then the node's ConfigMap, naming the credentials that go with it.
        let cm = api
            .expect("PATCH", &format!("/api/v1/namespaces/{NS}/configmaps/fieldgate-gateway-edge-1{APPLY_QUERY}"))
            .await;
        assert_eq!(cm.content_type, "application/apply-patch+yaml");
        assert_eq!(cm.body["metadata"]["annotations"]["fieldgate.io/config-hash"], json!(version));
        assert_eq!(cm.body["metadata"]["annotations"]["fieldgate.io/secret-hash"], secret_hash);
        assert_eq!(cm.body["metadata"]["annotations"]["fieldgate.io/node"], json!("edge-1"));
        assert_eq!(cm.body["metadata"]["labels"]["fieldgate.io/role"], json!("gateway-config"));
        assert_eq!(
            cm.body["metadata"]["ownerReferences"],
            json!([{"apiVersion": "v1", "kind": "Node", "name": "edge-1", "uid": "uid-node-edge-1"}])
        );
        let yaml = cm.body["data"]["gateway.yaml"].as_str().unwrap();
        assert_eq!(GatewayConfig::from_yaml(yaml).unwrap(), expected_config);
        assert!(!yaml.contains("hunter2"), "no secret value in a ConfigMap");
        let body = cm.body.clone();
        reply(cm.send, StatusCode::OK, &body);

        // 3. Which per-node objects exist (first pass of this leader), metadata only.
        let list = api
            .expect(
                "GET",
                &format!("/api/v1/namespaces/{NS}/configmaps?&labelSelector=app.kubernetes.io%2Fmanaged-by%3Dfieldgate-operator%2Cfieldgate.io%2Frole%3Dgateway-config"),
            )
            .await;
        let item = |node: &str| {
            json!({"apiVersion": "meta.k8s.io/v1", "kind": "PartialObjectMetadata",
            "metadata": {"name": format!("fieldgate-gateway-{node}"), "namespace": NS, "annotations": {"fieldgate.io/node": node}}})
        };
        reply(
            list.send,
            StatusCode::OK,
            &json!({"apiVersion": "meta.k8s.io/v1", "kind": "PartialObjectMetadataList",
            "metadata": {"resourceVersion": "7"}, "items": [item("edge-1"), item("edge-gone")]}),
        );

        // 4. The node without devices loses both objects (a missing Secret is fine).
        let del =
            api.expect("DELETE", &format!("/api/v1/namespaces/{NS}/configmaps/fieldgate-gateway-edge-gone?")).await;
        reply(
            del.send,
            StatusCode::OK,
            &json!({"kind": "Status", "apiVersion": "v1", "status": "Success", "code": 200}),
        );
        let del = api.expect("DELETE", &format!("/api/v1/namespaces/{NS}/secrets/fieldgate-gateway-edge-gone?")).await;
        reply(del.send, StatusCode::NOT_FOUND, &not_found());

        // 5. Device status through the status subresource, then its events.
        let st = api
            .expect(
                "PATCH",
                &format!("/apis/fieldgate.io/v1alpha1/namespaces/default/devices/meter-1/status{APPLY_QUERY}"),
            )
            .await;
        assert_eq!(st.content_type, "application/apply-patch+yaml");
        assert_eq!(
            (st.body["apiVersion"].as_str(), st.body["kind"].as_str()),
            (Some("fieldgate.io/v1alpha1"), Some("Device"))
        );
        let status = &st.body["status"];
        assert_eq!(status["node"], json!("edge-1"));
        assert_eq!(status["observedGeneration"], json!(1));
        assert!(status.get("failedOverFrom").is_none());
        let conds = status["conditions"].as_array().unwrap();
        let summary: Vec<(&str, &str, &str)> = conds
            .iter()
            .map(|c| (c["type"].as_str().unwrap(), c["status"].as_str().unwrap(), c["reason"].as_str().unwrap()))
            .collect();
        assert_eq!(
            summary,
            [("Configured", "True", "Configured"), ("Ready", "Unknown", "AwaitingGateway")],
            "Ready waits for the gateway's Reachable"
        );
        assert!(conds.iter().all(|c| c["observedGeneration"] == json!(1)));
        let reply_body = object_with_status(device.as_ref(), &st.body);
        reply(st.send, StatusCode::OK, &reply_body);
        for reason in ["Configured", "Placed"] {
            let ev = api.expect("POST", "/apis/events.k8s.io/v1/namespaces/default/events?").await;
            assert_eq!(ev.body["reason"], json!(reason));
            assert_eq!(ev.body["regarding"]["kind"], json!("Device"));
            assert_eq!(ev.body["reportingController"], json!("fieldgate-operator"));
            let body = ev.body.clone();
            reply(ev.send, StatusCode::OK, &body);
        }

        // 6. Uplink status and its event.
        let st = api
            .expect(
                "PATCH",
                &format!("/apis/fieldgate.io/v1alpha1/namespaces/default/uplinks/cloud/status{APPLY_QUERY}"),
            )
            .await;
        assert_eq!(st.body["status"]["conditions"][0]["status"], json!("True"));
        assert_eq!(
            (&st.body["status"]["conditions"][1]["type"], &st.body["status"]["conditions"][1]["status"]),
            (&json!("Ready"), &json!("Unknown"))
        );
        assert_eq!(
            st.body["status"]["conditions"][1]["message"],
            json!("waiting for the gateway of node(s) edge-1 to report its broker connection")
        );
        let reply_body = object_with_status(uplink.as_ref(), &st.body);
        reply(st.send, StatusCode::OK, &reply_body);
        let ev = api.expect("POST", "/apis/events.k8s.io/v1/namespaces/default/events?").await;
        assert_eq!(ev.body["regarding"]["kind"], json!("Uplink"));
        let body = ev.body.clone();
        reply(ev.send, StatusCode::OK, &body);
        api
    });

    let summary = writer.write(&s.rendered, &s.world, &s.values).await.unwrap();
    assert_eq!(summary, WriteSummary { configmaps: 1, secrets: 1, deleted: 1, statuses: 2 });
    let api = server.await.unwrap();
    drop(writer);
    api.expect_no_more().await;
}

/// The world after a first pass: statuses as the operator wrote them.
fn settled(s: &Scenario) -> World {
    let mut w = s.world.clone();
    w.devices = w
        .devices
        .iter()
        .map(|d| {
            let v = &s.rendered.devices[&ObjectKey::of(d.as_ref())];
            let patch = device_status_change(d, v).unwrap();
            let mut d = (**d).clone();
            d.status = Some(serde_json::from_value(patch).unwrap());
            Arc::new(d)
        })
        .collect();
    w.uplinks = w
        .uplinks
        .iter()
        .map(|u| {
            let v = &s.rendered.uplinks[&ObjectKey::of(u.as_ref())];
            let patch = uplink_status_change(u, v).unwrap();
            let mut u = (**u).clone();
            u.status = Some(serde_json::from_value(patch).unwrap());
            Arc::new(u)
        })
        .collect();
    w
}

async fn first_pass_answering_everything(writer: &mut Writer, api: ApiServer, s: &Scenario) -> ApiServer {
    let server = tokio::spawn(async move {
        let mut api = api;
        let mut n = 0;
        // Answer every request of the pass; the list finds nothing stale.
        while n < 8 {
            let seen = api.next().await;
            let body = if seen.uri.contains("labelSelector") {
                json!({"apiVersion": "v1", "kind": "PartialObjectMetadataList", "metadata": {}, "items": []})
            } else if seen.uri.contains("/devices/") {
                object_with_status(&Device::test("meter-1"), &seen.body)
            } else if seen.uri.contains("/uplinks/") {
                object_with_status(&Uplink::test("cloud").auth("creds"), &seen.body)
            } else {
                seen.body.clone()
            };
            reply(seen.send, StatusCode::OK, &body);
            n += 1;
        }
        api
    });
    writer.write(&s.rendered, &s.world, &s.values).await.unwrap();
    server.await.unwrap()
}

#[tokio::test]
async fn a_pass_with_nothing_changed_writes_nothing() {
    let s = scenario(vec![Device::test("meter-1")]);
    let (mut writer, api) = writer();
    let api = first_pass_answering_everything(&mut writer, api, &s).await;
    let summary = writer.write(&s.rendered, &settled(&s), &s.values).await.unwrap();
    assert_eq!(summary, WriteSummary::default());
    drop(writer);
    api.expect_no_more().await;
}

#[tokio::test]
async fn a_changed_secret_value_reapplies_the_secret_then_the_configmap_naming_it() {
    let s = scenario(vec![Device::test("meter-1")]);
    let (mut writer, api) = writer();
    let mut api = first_pass_answering_everything(&mut writer, api, &s).await;
    let mut values = s.values.clone();
    values
        .get_mut(&ObjectKey::new("default", "creds"))
        .unwrap()
        .insert("password".into(), k8s_openapi::ByteString(b"rotated".to_vec()));
    let world = settled(&s);
    let server = tokio::spawn(async move {
        let sec = api
            .expect("PATCH", &format!("/api/v1/namespaces/{NS}/secrets/fieldgate-gateway-edge-1{APPLY_QUERY}"))
            .await;
        assert_eq!(sec.body["data"]["default_creds_password"], json!("cm90YXRlZA=="));
        let hash = sec.body["metadata"]["annotations"]["fieldgate.io/secret-hash"].clone();
        let body = sec.body.clone();
        reply(sec.send, StatusCode::OK, &body);
        let cm = api
            .expect("PATCH", &format!("/api/v1/namespaces/{NS}/configmaps/fieldgate-gateway-edge-1{APPLY_QUERY}"))
            .await;
        assert_eq!(cm.body["metadata"]["annotations"]["fieldgate.io/secret-hash"], hash);
        let body = cm.body.clone();
        reply(cm.send, StatusCode::OK, &body);
        api
    });
    let summary = writer.write(&s.rendered, &world, &values).await.unwrap();
    assert_eq!(summary, WriteSummary { secrets: 1, configmaps: 1, ..WriteSummary::default() });
    let api = server.await.unwrap();
    drop(writer);
    api.expect_no_more().await;
}

#[tokio::test]
async fn an_invalid_device_gets_configured_false_with_its_path_and_a_warning() {
    let bad = Device::test("meter-1").spec_with(|s| {
        let fieldgate_crds::Connection::ModbusTcp(c) = &mut s.connection else { unreachable!() };
        c.port = Some(0);
    });
    let s = scenario(vec![bad]);
    assert!(s.rendered.nodes.is_empty());
    let (mut writer, mut api) = writer();
    let device = s.world.devices[0].clone();
    let server = tokio::spawn(async move {
        let list = api.next().await;
        assert!(list.uri.contains("labelSelector"), "{}", list.uri);
        reply(
            list.send,
            StatusCode::OK,
            &json!({"apiVersion": "v1", "kind": "PartialObjectMetadataList", "metadata": {}, "items": []}),
        );
        let st = api
            .expect(
                "PATCH",
                &format!("/apis/fieldgate.io/v1alpha1/namespaces/default/devices/meter-1/status{APPLY_QUERY}"),
            )
            .await;
        let status = &st.body["status"];
        assert!(status.get("node").is_none(), "an unconfigured device has no node: {status}");
        let conds = status["conditions"].as_array().unwrap();
        assert_eq!(conds[0]["type"], json!("Configured"));
        assert_eq!(conds[0]["status"], json!("False"));
        assert_eq!(conds[0]["reason"], json!("InvalidSpec"));
        let msg = conds[0]["message"].as_str().unwrap();
        assert!(msg.starts_with("spec.connection.modbusTcp.port: 0 is out of range 1-65535"), "{msg}");
        assert_eq!(
            (conds[1]["type"].as_str(), conds[1]["status"].as_str(), conds[1]["reason"].as_str()),
            (Some("Ready"), Some("False"), Some("NotConfigured"))
        );
        let reply_body = object_with_status(device.as_ref(), &st.body);
        reply(st.send, StatusCode::OK, &reply_body);
        let ev = api.expect("POST", "/apis/events.k8s.io/v1/namespaces/default/events?").await;
        assert_eq!((ev.body["type"].as_str(), ev.body["reason"].as_str()), (Some("Warning"), Some("InvalidSpec")));
        assert!(ev.body["note"].as_str().unwrap().contains("spec.connection.modbusTcp.port"));
        let body = ev.body.clone();
        reply(ev.send, StatusCode::OK, &body);
        // The uplink is valid but selects nothing: still Configured.
        let st = api
            .expect(
                "PATCH",
                &format!("/apis/fieldgate.io/v1alpha1/namespaces/default/uplinks/cloud/status{APPLY_QUERY}"),
            )
            .await;
        let reply_body = object_with_status(&Uplink::test("cloud"), &st.body);
        reply(st.send, StatusCode::OK, &reply_body);
        let ev = api.expect("POST", "/apis/events.k8s.io/v1/namespaces/default/events?").await;
        reply(ev.send, StatusCode::OK, &json!({}));
        api
    });
    let summary = writer.write(&s.rendered, &s.world, &s.values).await.unwrap();
    assert_eq!(summary.statuses, 2);
    let api = server.await.unwrap();
    drop(writer);
    api.expect_no_more().await;
}

#[tokio::test]
async fn a_refused_apply_fails_the_pass_and_is_retried_on_the_next() {
    let s = scenario(vec![Device::test("meter-1")]);
    let (mut writer, mut api) = writer();
    let server = tokio::spawn(async move {
        let sec = api
            .expect("PATCH", &format!("/api/v1/namespaces/{NS}/secrets/fieldgate-gateway-edge-1{APPLY_QUERY}"))
            .await;
        reply(
            sec.send,
            StatusCode::CONFLICT,
            &json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure", "reason": "Conflict", "code": 409, "message": "conflict"}),
        );
        // The pass goes on with the rest; answer it all.
        for _ in 0..6 {
            let seen = api.next().await;
            let body = if seen.uri.contains("labelSelector") {
                json!({"apiVersion": "v1", "kind": "PartialObjectMetadataList", "metadata": {}, "items": []})
            } else if seen.uri.contains("/devices/") {
                object_with_status(&Device::test("meter-1"), &seen.body)
            } else if seen.uri.contains("/uplinks/") {
                object_with_status(&Uplink::test("cloud"), &seen.body)
            } else {
                seen.body.clone()
            };
            reply(seen.send, StatusCode::OK, &body);
        }
        // The next pass applies the Secret and the ConfigMap again.
        let sec = api
            .expect("PATCH", &format!("/api/v1/namespaces/{NS}/secrets/fieldgate-gateway-edge-1{APPLY_QUERY}"))
            .await;
        let body = sec.body.clone();
        reply(sec.send, StatusCode::OK, &body);
        let cm = api
            .expect("PATCH", &format!("/api/v1/namespaces/{NS}/configmaps/fieldgate-gateway-edge-1{APPLY_QUERY}"))
            .await;
        let body = cm.body.clone();
        reply(cm.send, StatusCode::OK, &body);
        api
    });
    let err = writer.write(&s.rendered, &s.world, &s.values).await.unwrap_err();
    assert_eq!(err.kind(), "apply");
    assert!(err.is_transient());
    let summary = writer.write(&s.rendered, &settled(&s), &s.values).await.unwrap();
    assert_eq!(summary, WriteSummary { configmaps: 1, secrets: 1, ..WriteSummary::default() });
    let api = server.await.unwrap();
    drop(writer);
    api.expect_no_more().await;
}

#[test]
fn a_failed_over_device_reports_its_home_and_a_move_event() {
    let mut d = Device::test("m");
    d.status = Some(fieldgate_crds::DeviceStatus {
        node: Some("a".into()),
        observed_generation: Some(1),
        ..Default::default()
    });
    let v = DeviceVerdict {
        verdict: Verdict::default(),
        placed: Some(crate::placement::Placed { node: "b".into(), failed_over_from: Some("a".into()) }),
        generation: Some(1),
    };
    let patch = device_status_change(&d, &v).unwrap();
    assert_eq!(patch["failedOverFrom"], json!("a"));
    assert_eq!(patch["node"], json!("b"));
    let events = device_events(&d, &v);
    let moved = events.iter().find(|e| e.reason == "Moved").unwrap();
    assert_eq!(moved.note.as_deref(), Some("moved from node a to b (node a is NotReady)"));
}

#[test]
fn long_messages_are_cut_on_a_character_boundary() {
    let m = shorten("é".repeat(3000), 1000);
    assert!(m.len() <= 1000 && m.ends_with("..."), "{}", m.len());
    assert_eq!(shorten("short".into(), 1000), "short");
}
