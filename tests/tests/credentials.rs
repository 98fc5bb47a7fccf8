//! The credentials path end to end, without a cluster: the gateway's client
//! (`fieldgate_gateway::credentials`) over real TLS to the operator's endpoint
//! (`fieldgate_operator::credentials`), whose API server is mocked (the exact TokenReview and
//! Secret read). A gateway gets its own node's credentials; another identity gets a refusal.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use fieldgate_crds::node_objects::CREDENTIALS_AUDIENCE;
use fieldgate_gateway::credentials::{CredentialSettings, CredentialSource};
use fieldgate_operator::credentials::{self as endpoint, CredentialService};
use fieldgate_operator::metrics::Metrics;
use fieldgate_tests::certs::TestPki;
use http::{Request, Response};
use kube::client::Body;
use prometheus_client::registry::Registry;
use serde_json::json;
use tokio_util::sync::CancellationToken;
use tower_test::mock;

const GATEWAY: &str = "system:serviceaccount:fieldgate-system:fg-gateway";

fn reply(send: mock::SendResponse<Response<Body>>, code: u16, body: &serde_json::Value) {
    send.send_response(Response::builder().status(code).body(Body::from(serde_json::to_vec(body).unwrap())).unwrap());
}

#[tokio::test]
async fn a_gateway_fetches_its_nodes_credentials_over_tls_and_another_identity_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let pki = TestPki::generate().unwrap();
    let (cert, key, ca, token) =
        (dir.path().join("tls.crt"), dir.path().join("tls.key"), dir.path().join("ca.crt"), dir.path().join("token"));
    std::fs::write(&cert, &pki.server_cert).unwrap();
    std::fs::write(&key, &pki.server_key).unwrap();
    std::fs::write(&ca, &pki.ca_cert).unwrap();
    std::fs::write(&token, "token-of-edge-1").unwrap();

    // The operator's endpoint on loopback, its API server mocked.
    let (service, mut api) = mock::pair::<Request<Body>, Response<Body>>();
    let settings = endpoint::CredentialSettings {
        namespace: "fieldgate-system".into(),
        audience: CREDENTIALS_AUDIENCE.into(),
        gateway_user: GATEWAY.into(),
    };
    let metrics = Metrics::new(&mut Registry::default());
    let router = CredentialService::new(kube::Client::new(service, "default"), settings, &metrics).router();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let stop = CancellationToken::new();
    let server =
        tokio::spawn(endpoint::serve(listener, endpoint::tls_config(&cert, &key).unwrap(), router, stop.clone()));

    let api_server = tokio::spawn(async move {
        let mut tokens = Vec::new();
        while let Some((req, send)) = api.next_request().await {
            let uri = req.uri().to_string();
            let body: serde_json::Value =
                serde_json::from_slice(&req.into_body().collect_bytes().await.unwrap()).unwrap_or_default();
            if uri.starts_with("/apis/authentication.k8s.io/v1/tokenreviews") {
                let token = body["spec"]["token"].as_str().unwrap().to_string();
                assert_eq!(body["spec"]["audiences"], json!([CREDENTIALS_AUDIENCE]));
                let user =
                    if token == "token-of-edge-1" { GATEWAY } else { "system:serviceaccount:fieldgate-system:default" };
                tokens.push(token);
                reply(
                    send,
                    201,
                    &json!({"apiVersion": "authentication.k8s.io/v1", "kind": "TokenReview", "metadata": {}, "spec": {},
                        "status": {"authenticated": true, "audiences": [CREDENTIALS_AUDIENCE],
                            "user": {"username": user, "extra": {"authentication.kubernetes.io/node-name": ["edge-1"]}}}}),
                );
            } else {
                assert_eq!(uri, "/api/v1/namespaces/fieldgate-system/secrets/fieldgate-gateway-edge-1");
                reply(
                    send,
                    200,
                    &json!({"apiVersion": "v1", "kind": "Secret",
                        "metadata": {"name": "fieldgate-gateway-edge-1", "annotations": {"fieldgate.io/secret-hash": "h1"}},
                        "data": {"default_creds_password": "aHVudGVyMg=="}}),
                );
            }
        }
        tokens
    });

    // The gateway's client: CA file, token file, the endpoint's address.
    let source = |token: &std::path::Path| {
        CredentialSource::new(&CredentialSettings {
            url: format!("https://{addr}"),
            ca_file: ca.clone(),
            token_file: token.to_path_buf(),
        })
        .unwrap()
    };
    let got = tokio::time::timeout(Duration::from_secs(30), source(&token).fetch()).await.unwrap().unwrap();
    assert_eq!((got.node.as_str(), got.hash.as_str()), ("edge-1", "h1"));
    assert_eq!(got.data["default_creds_password"].0, b"hunter2");

    // Another ServiceAccount's token: refused, no Secret read.
    let other = dir.path().join("other-token");
    std::fs::write(&other, "token-of-default").unwrap();
    let err = tokio::time::timeout(Duration::from_secs(30), source(&other).fetch()).await.unwrap().unwrap_err();
    match &err {
        fieldgate_gateway::credentials::CredentialError::Request(kube::Error::Api(s)) => {
            assert_eq!(s.code, 403, "{s:?}");
            assert!(s.message.contains("is not the gateway ServiceAccount"), "{s:?}");
        }
        other => panic!("expected a 403, got {other}"),
    }

    // A client that does not trust the endpoint's CA gets nowhere.
    let wrong_ca = dir.path().join("wrong-ca.crt");
    std::fs::write(&wrong_ca, TestPki::generate().unwrap().ca_cert).unwrap();
    let untrusting = CredentialSource::new(&CredentialSettings {
        url: format!("https://{addr}"),
        ca_file: wrong_ca,
        token_file: token.clone(),
    })
    .unwrap();
    assert!(tokio::time::timeout(Duration::from_secs(30), untrusting.fetch()).await.unwrap().is_err());

    stop.cancel();
    server.await.unwrap();
    let tokens = api_server.await.unwrap();
    assert_eq!(
        tokens,
        ["token-of-edge-1", "token-of-default"],
        "one review per request, with the token file's content"
    );
}
