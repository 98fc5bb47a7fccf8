//! The credentials endpoint: each gateway gets its own node's credentials, and nobody else's.
//!
//! A DaemonSet's pods share one ServiceAccount, so RBAC cannot tell one gateway from another:
//! a gateway allowed to read its node's Secret could read every node's. Instead gateways get
//! no access to Secrets at all, and the operator serves `GET` [`CREDENTIALS_PATH`] over TLS:
//!
//! 1. The gateway presents its projected ServiceAccount token (audience
//!    [`CREDENTIALS_AUDIENCE`] by default, bound to its pod) as a bearer token.
//! 2. The operator asks the API server about it (`TokenReview` with that audience): the token
//!    must be valid, bound to a pod that still exists, of the gateway's ServiceAccount, and its
//!    user info names the pod's node (`authentication.kubernetes.io/node-name`, Kubernetes
//!    >= 1.30).
//! 3. The operator answers with the per-node Secret of *that* node ([`NodeCredentials`]).
//!    The request names no node: there is nothing to ask for but one's own.
//!
//! Any replica answers (it reads the Secret the leader wrote). Refusals are Kubernetes
//! `Status` objects (401 for an unknown token, 403 for another identity, 503 when the API
//! server cannot be asked), so the gateway's client reports them as it reports API errors.
//! Every request is bounded: connections (count, TLS handshake, header read) and the two API
//! calls ([`API_CALL_TIMEOUT`] each).

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use fieldgate_crds::node_objects::{self, CREDENTIALS_PATH, NodeCredentials, SECRET_HASH_ANNOTATION};
use k8s_openapi::api::authentication::v1::{TokenReview, TokenReviewSpec, TokenReviewStatus};
use k8s_openapi::api::core::v1::Secret;
use kube::api::{ObjectMeta, PostParams};
use kube::{Api, Client, ResourceExt};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use serde_json::json;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

pub use fieldgate_crds::node_objects::CREDENTIALS_AUDIENCE;

use crate::lease::{API_CALL_TIMEOUT, CallError, Term};
use crate::metrics::{Metrics, OutcomeLabels};

/// The user info key carrying the node of the pod a token is bound to.
pub const NODE_NAME_EXTRA: &str = "authentication.kubernetes.io/node-name";
/// Connections served at once; more wait in the listen backlog.
const MAX_CONNECTIONS: usize = 256;
/// Time for a client's TLS handshake, and for its request head.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Who may ask and where the credentials are.
#[derive(Clone, Debug)]
pub struct CredentialSettings {
    /// Namespace of the per-node Secrets.
    pub namespace: String,
    /// Audience the gateway's token must carry.
    pub audience: String,
    /// The gateways' user name, `system:serviceaccount:<namespace>:<name>`.
    pub gateway_user: String,
}

/// Why a caller gets no credentials: the HTTP status, a `Status` reason and a message.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Refusal {
    /// 401, 403, 500 or 503.
    pub code: u16,
    /// `Unauthorized`, `Forbidden`, `ServiceUnavailable`, `InternalError`.
    pub reason: &'static str,
    /// What was wrong (never the token).
    pub message: String,
}

impl Refusal {
    fn unauthorized(message: impl Into<String>) -> Self {
        Self { code: 401, reason: "Unauthorized", message: message.into() }
    }

    fn forbidden(message: impl Into<String>) -> Self {
        Self { code: 403, reason: "Forbidden", message: message.into() }
    }

    fn api(what: &str, e: &CallError) -> Self {
        let (code, reason) = if e.is_transient() { (503, "ServiceUnavailable") } else { (500, "InternalError") };
        Self { code, reason, message: format!("{what}: {e}") }
    }

    /// The metrics outcome.
    pub fn outcome(&self) -> &'static str {
        match self.code {
            401 => "unauthenticated",
            403 => "forbidden",
            _ => "unavailable",
        }
    }
}

impl IntoResponse for Refusal {
    fn into_response(self) -> Response {
        let body = json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
            "message": self.message, "reason": self.reason, "code": self.code});
        let status = StatusCode::from_u16(self.code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        (status, [(header::CACHE_CONTROL, "no-store")], axum::Json(body)).into_response()
    }
}

/// The node a reviewed token may have the credentials of: the token is authenticated, for
/// our audience, of the gateway ServiceAccount, and bound to a pod on exactly one node.
pub fn node_of(status: &TokenReviewStatus, settings: &CredentialSettings) -> Result<String, Refusal> {
    if status.authenticated != Some(true) {
        let why = status.error.as_deref().unwrap_or("not authenticated");
        return Err(Refusal::unauthorized(format!("the token was not accepted: {why}")));
    }
    if !status.audiences.iter().flatten().any(|a| *a == settings.audience) {
        return Err(Refusal::unauthorized(format!("the token is not for audience {:?}", settings.audience)));
    }
    let user = status.user.clone().unwrap_or_default();
    let name = user.username.unwrap_or_default();
    if name != settings.gateway_user {
        return Err(Refusal::forbidden(format!(
            "{name:?} is not the gateway ServiceAccount {:?}",
            settings.gateway_user
        )));
    }
    match user.extra.unwrap_or_default().remove(NODE_NAME_EXTRA).as_deref() {
        Some([node]) if !node.is_empty() => Ok(node.clone()),
        _ => Err(Refusal::forbidden(format!(
            "the token is not bound to a pod on one node (no {NODE_NAME_EXTRA} in its user info): present the \
             gateway pod's projected ServiceAccount token (Kubernetes >= 1.30)"
        ))),
    }
}

/// The endpoint's state: the API client and the rules.
pub struct CredentialService {
    client: Client,
    settings: CredentialSettings,
    requests: Family<OutcomeLabels, Counter>,
}

impl CredentialService {
    /// The service; counts requests in `metrics` (`fieldgate_operator_credential_requests`).
    pub fn new(client: Client, settings: CredentialSettings, metrics: &Metrics) -> Arc<Self> {
        Arc::new(Self { client, settings, requests: metrics.credential_requests.clone() })
    }

    /// The router: `GET` [`CREDENTIALS_PATH`].
    pub fn router(self: &Arc<Self>) -> Router {
        Router::new().route(CREDENTIALS_PATH, get(answer)).with_state(Arc::clone(self))
    }

    /// The credentials of the node the bearer token of `headers` is bound to.
    pub async fn credentials(&self, headers: &HeaderMap) -> Result<NodeCredentials, Refusal> {
        let token = headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .map(str::trim)
            .filter(|t| !t.is_empty())
            .ok_or_else(|| Refusal::unauthorized("a bearer token is required"))?;
        // Reads only, in a term of their own: any replica answers, leading or not.
        let calls = Term::unbounded();
        let review = TokenReview {
            metadata: ObjectMeta::default(),
            spec: TokenReviewSpec { token: token.to_string(), audiences: Some(vec![self.settings.audience.clone()]) },
            status: None,
        };
        let reviews = Api::<TokenReview>::all(self.client.clone());
        let reviewed = calls
            .call(reviews.create(&PostParams::default(), &review))
            .await
            .map_err(|e| Refusal::api("the token could not be reviewed", &e))?;
        let node = node_of(&reviewed.status.unwrap_or_default(), &self.settings)?;
        let name = node_objects::object_name(&node);
        let secrets = Api::<Secret>::namespaced(self.client.clone(), &self.settings.namespace);
        let secret = calls
            .call(secrets.get_opt(&name))
            .await
            .map_err(|e| Refusal::api(&format!("Secret {}/{name} could not be read", self.settings.namespace), &e))?;
        Ok(match secret {
            Some(s) => NodeCredentials {
                hash: s.annotations().get(SECRET_HASH_ANNOTATION).cloned().unwrap_or_default(),
                data: s.data.unwrap_or_default(),
                node,
            },
            None => NodeCredentials { node, ..NodeCredentials::default() },
        })
    }
}

async fn answer(State(svc): State<Arc<CredentialService>>, headers: HeaderMap) -> Response {
    let outcome = svc.credentials(&headers).await;
    let label = outcome.as_ref().map_or_else(Refusal::outcome, |_| "ok");
    svc.requests.get_or_create(&OutcomeLabels { outcome: label }).inc();
    match outcome {
        Ok(c) => {
            debug!(node = %c.node, keys = c.data.len(), "credentials served");
            ([(header::CACHE_CONTROL, "no-store")], axum::Json(c)).into_response()
        }
        Err(r) => {
            if r.code == 403 {
                warn!(reason = r.reason, message = %r.message, "credentials refused");
            } else {
                debug!(code = r.code, message = %r.message, "credentials refused");
            }
            r.into_response()
        }
    }
}

/// Why the endpoint could not start.
#[derive(Debug, thiserror::Error)]
pub enum CredentialError {
    /// The certificate or key file could not be read or used.
    #[error("TLS certificate {path}: {message}")]
    Tls {
        /// The file.
        path: String,
        /// Cause.
        message: String,
    },
}

impl CredentialError {
    /// Metrics label.
    pub fn kind(&self) -> &'static str {
        "tls"
    }
}

/// The server's TLS settings from PEM files (a certificate chain and its private key).
pub fn tls_config(cert: &Path, key: &Path) -> Result<rustls::ServerConfig, CredentialError> {
    use rustls_pki_types::pem::PemObject;
    use rustls_pki_types::{CertificateDer, PrivateKeyDer};
    let err = |path: &Path| {
        let path = path.display().to_string();
        move |e: &dyn std::fmt::Display| CredentialError::Tls { path: path.clone(), message: e.to_string() }
    };
    let certs = CertificateDer::pem_file_iter(cert)
        .and_then(|i| i.collect::<Result<Vec<_>, _>>())
        .map_err(|e| err(cert)(&e))?;
    if certs.is_empty() {
        return Err(err(cert)(&"no certificate in the file"));
    }
    let key_der = PrivateKeyDer::from_pem_file(key).map_err(|e| err(key)(&e))?;
    rustls::ServerConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()
        .map_err(|e| err(cert)(&e))?
        .with_no_client_auth()
        .with_single_cert(certs, key_der)
        .map_err(|e| err(cert)(&e))
}

/// Serves `router` over TLS on `listener` until `stop`: at most [`MAX_CONNECTIONS`] at once,
/// each with [`HANDSHAKE_TIMEOUT`] for its handshake and request head. A failing connection
/// is that connection's problem only.
pub async fn serve(listener: TcpListener, tls: rustls::ServerConfig, router: Router, stop: CancellationToken) {
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(tls));
    let slots = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
    if let Ok(addr) = listener.local_addr() {
        info!(listen = %addr, "credentials endpoint listening");
    }
    loop {
        let permit = tokio::select! {
            () = stop.cancelled() => return,
            p = Arc::clone(&slots).acquire_owned() => match p { Ok(p) => p, Err(_) => return },
        };
        let (stream, peer) = tokio::select! {
            () = stop.cancelled() => return,
            r = listener.accept() => match r {
                Ok(c) => c,
                Err(e) => {
                    debug!(error = %e, "accept failed");
                    continue;
                }
            },
        };
        let (acceptor, router, stop) = (acceptor.clone(), router.clone(), stop.clone());
        tokio::spawn(async move {
            let _permit = permit;
            let tls = match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(stream)).await {
                Ok(Ok(tls)) => tls,
                Ok(Err(e)) => return debug!(%peer, error = %e, "TLS handshake failed"),
                Err(_) => return debug!(%peer, "TLS handshake timed out"),
            };
            let service = hyper_util::service::TowerToHyperService::new(router);
            let mut builder = hyper::server::conn::http1::Builder::new();
            builder.timer(hyper_util::rt::TokioTimer::new()).header_read_timeout(HANDSHAKE_TIMEOUT);
            let conn = builder.serve_connection(hyper_util::rt::TokioIo::new(tls), service);
            let mut conn = std::pin::pin!(conn);
            // A request is two API calls at most; a connection lives a little longer.
            let limit = tokio::time::sleep(API_CALL_TIMEOUT * 4);
            tokio::select! {
                r = conn.as_mut() => if let Err(e) = r { debug!(%peer, error = %e, "connection ended") },
                () = limit => debug!(%peer, "connection closed: too long"),
                () = stop.cancelled() => {
                    conn.as_mut().graceful_shutdown();
                    let _ = tokio::time::timeout(HANDSHAKE_TIMEOUT, conn).await;
                }
            }
        });
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;
    use http::{Request, Response};
    use kube::client::Body;
    use prometheus_client::registry::Registry;
    use tower::ServiceExt;
    use tower_test::mock;

    const NS: &str = "fieldgate-system";
    const GATEWAY: &str = "system:serviceaccount:fieldgate-system:fg-gateway";

    fn settings() -> CredentialSettings {
        CredentialSettings { namespace: NS.into(), audience: CREDENTIALS_AUDIENCE.into(), gateway_user: GATEWAY.into() }
    }

    fn reviewed(user: &str, node: Option<&str>) -> serde_json::Value {
        let mut extra = json!({"authentication.kubernetes.io/pod-name": ["fg-gateway-x2x"]});
        if let Some(n) = node {
            extra[NODE_NAME_EXTRA] = json!([n]);
        }
        json!({"apiVersion": "authentication.k8s.io/v1", "kind": "TokenReview", "metadata": {},
            "spec": {}, "status": {"authenticated": true, "audiences": [CREDENTIALS_AUDIENCE],
            "user": {"username": user, "uid": "u-1", "groups": ["system:serviceaccounts"], "extra": extra}}})
    }

    fn reply(send: mock::SendResponse<Response<Body>>, code: u16, body: &serde_json::Value) {
        send.send_response(
            Response::builder().status(code).body(Body::from(serde_json::to_vec(body).unwrap())).unwrap(),
        );
    }

    /// The endpoint in front of a mocked API server; `script` plays the API server.
    async fn ask<F, Fut>(authorization: Option<&str>, script: F) -> (u16, serde_json::Value)
    where
        F: FnOnce(mock::Handle<Request<Body>, Response<Body>>) -> Fut + Send + 'static,
        Fut: std::future::Future<Output = mock::Handle<Request<Body>, Response<Body>>> + Send + 'static,
    {
        let (service, handle) = mock::pair::<Request<Body>, Response<Body>>();
        let metrics = Metrics::new(&mut Registry::default());
        let svc = CredentialService::new(Client::new(service, "default"), settings(), &metrics);
        let server = tokio::spawn(script(handle));
        let mut req = axum::http::Request::get(CREDENTIALS_PATH);
        if let Some(a) = authorization {
            req = req.header(header::AUTHORIZATION, a);
        }
        let response = svc.router().oneshot(req.body(axum::body::Body::empty()).unwrap()).await.unwrap();
        let code = response.status().as_u16();
        assert_eq!(response.headers()[header::CACHE_CONTROL], "no-store");
        let bytes = axum::body::to_bytes(response.into_body(), 1 << 20).await.unwrap();
        let mut handle = server.await.unwrap();
        drop(svc);
        assert!(handle.next_request().await.is_none(), "no request beyond the script");
        (code, serde_json::from_slice(&bytes).unwrap())
    }

    async fn expect_review(handle: &mut mock::Handle<Request<Body>, Response<Body>>, answer: serde_json::Value) {
        let (req, send) = handle.next_request().await.unwrap();
        assert_eq!(
            (req.method().as_str(), req.uri().to_string()),
            ("POST", "/apis/authentication.k8s.io/v1/tokenreviews?".to_string())
        );
        let body: serde_json::Value = serde_json::from_slice(&req.into_body().collect_bytes().await.unwrap()).unwrap();
        assert_eq!(body["spec"], json!({"token": "the-token", "audiences": [CREDENTIALS_AUDIENCE]}));
        reply(send, 201, &answer);
    }

    #[tokio::test]
    async fn a_gateway_gets_the_credentials_of_the_node_its_token_is_bound_to() {
        let (code, body) = ask(Some("Bearer the-token"), |mut api| async move {
            expect_review(&mut api, reviewed(GATEWAY, Some("edge-2"))).await;
            let (req, send) = api.next_request().await.unwrap();
            assert_eq!(
                (req.method().as_str(), req.uri().to_string()),
                ("GET", format!("/api/v1/namespaces/{NS}/secrets/fieldgate-gateway-edge-2"))
            );
            reply(
                send,
                200,
                &json!({"apiVersion": "v1", "kind": "Secret",
                "metadata": {"name": "fieldgate-gateway-edge-2", "namespace": NS, "annotations": {SECRET_HASH_ANNOTATION: "abc"}},
                "data": {"default_creds_password": "aHVudGVyMg=="}}),
            );
            api
        })
        .await;
        assert_eq!(code, 200, "{body}");
        assert_eq!(body, json!({"node": "edge-2", "hash": "abc", "data": {"default_creds_password": "aHVudGVyMg=="}}));
    }

    #[tokio::test]
    async fn a_node_without_a_secret_gets_no_credentials() {
        let (code, body) = ask(Some("Bearer the-token"), |mut api| async move {
            expect_review(&mut api, reviewed(GATEWAY, Some("edge-3"))).await;
            let (_, send) = api.next_request().await.unwrap();
            reply(
                send,
                404,
                &json!({"kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": "NotFound", "code": 404}),
            );
            api
        })
        .await;
        assert_eq!((code, body), (200, json!({"node": "edge-3", "hash": "", "data": {}})));
    }

    #[tokio::test]
    async fn another_identity_is_refused_before_any_secret_is_read() {
        for (user, node, code, word) in [
            (
                "system:serviceaccount:fieldgate-system:default",
                Some("edge-1"),
                403,
                "is not the gateway ServiceAccount",
            ),
            ("system:serviceaccount:other-ns:fg-gateway", Some("edge-1"), 403, "is not the gateway ServiceAccount"),
            ("system:node:edge-1", Some("edge-1"), 403, "is not the gateway ServiceAccount"),
            (GATEWAY, None, 403, "not bound to a pod on one node"),
        ] {
            let (got, body) = ask(Some("Bearer the-token"), move |mut api| async move {
                expect_review(&mut api, reviewed(user, node)).await;
                api
            })
            .await;
            assert_eq!(got, code, "{user}: {body}");
            assert_eq!((body["kind"].as_str(), body["code"].as_u64()), (Some("Status"), Some(u64::from(code))));
            assert!(body["message"].as_str().unwrap().contains(word), "{user}: {body}");
        }
    }

    #[tokio::test]
    async fn unknown_tokens_and_requests_without_one_are_unauthorized() {
        let (code, body) = ask(None, |api| async move { api }).await;
        assert_eq!(code, 401, "no TokenReview without a token: {body}");
        let (code, body) = ask(Some("Bearer the-token"), |mut api| async move {
            expect_review(
                &mut api,
                json!({"apiVersion": "authentication.k8s.io/v1", "kind": "TokenReview", "metadata": {}, "spec": {},
                    "status": {"authenticated": false, "error": "token has expired"}}),
            )
            .await;
            api
        })
        .await;
        assert_eq!(code, 401);
        assert!(body["message"].as_str().unwrap().contains("token has expired"), "{body}");
    }

    #[tokio::test]
    async fn an_api_server_that_cannot_review_makes_the_endpoint_unavailable_not_open() {
        let (code, body) = ask(Some("Bearer the-token"), |mut api| async move {
            let (_, send) = api.next_request().await.unwrap();
            reply(send, 500, &json!({"kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": "InternalError", "code": 500, "message": "etcd"}));
            api
        })
        .await;
        assert_eq!(code, 503, "{body}");
    }

    #[test]
    fn a_token_for_another_audience_is_not_accepted() {
        let status: TokenReviewStatus = serde_json::from_value(json!({"authenticated": true,
            "audiences": ["https://kubernetes.default.svc"], "user": {"username": GATEWAY,
            "extra": {NODE_NAME_EXTRA: ["edge-1"]}}}))
        .unwrap();
        assert_eq!(node_of(&status, &settings()).unwrap_err().code, 401);
    }
}
