//! Leader election through a `coordination.k8s.io/v1` Lease, so several replicas are safe:
//! only the holder writes.
//!
//! The holder renews every `renew_every`. Another replica takes over when the Lease record has
//! not changed for `duration`, measured on its *own* monotonic clock (so clock skew between
//! nodes does not matter; the approach of client-go). Writes are optimistic (resourceVersion):
//! of two replicas racing for an expired Lease exactly one wins. A holder that cannot renew for
//! `renew_deadline` (< `duration`) steps down before anyone else may take over. On shutdown
//! the holder releases the Lease so a standby takes over at once.

use std::time::Duration;

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;
use k8s_openapi::jiff::Timestamp;
use kube::api::{ObjectMeta, PostParams};
use kube::{Api, ResourceExt};
use tokio::sync::watch;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

/// Lease timing and identity.
#[derive(Clone, Debug)]
pub struct LeaseSettings {
    /// Lease name.
    pub name: String,
    /// This replica's identity (the pod name).
    pub identity: String,
    /// How long a Lease record lives without renewal.
    pub duration: Duration,
    /// How long the holder keeps leading without a successful renewal.
    pub renew_deadline: Duration,
    /// Time between two attempts.
    pub renew_every: Duration,
}

impl LeaseSettings {
    /// 15 s lease, 10 s renew deadline, attempts every 2 s (the client-go defaults).
    pub fn new(name: impl Into<String>, identity: impl Into<String>) -> Self {
        Self {
            name: name.into(),
            identity: identity.into(),
            duration: Duration::from_secs(15),
            renew_deadline: Duration::from_secs(10),
            renew_every: Duration::from_secs(2),
        }
    }
}

/// Why one attempt failed.
#[derive(Debug, thiserror::Error)]
#[error("lease {name}: {source}")]
pub struct LeaseError {
    name: String,
    #[source]
    source: kube::Error,
}

impl LeaseError {
    /// Metrics label.
    pub fn kind(&self) -> &'static str {
        "lease"
    }
}

/// The elector's memory between attempts.
pub struct Elector {
    api: Api<Lease>,
    settings: LeaseSettings,
    /// The last record seen (resourceVersion) and when it was first seen.
    observed: Option<(String, Instant)>,
    /// When this replica last renewed successfully while leading.
    renewed: Option<Instant>,
}

impl Elector {
    /// An elector over Leases in one namespace.
    pub fn new(api: Api<Lease>, settings: LeaseSettings) -> Self {
        Self { api, settings, observed: None, renewed: None }
    }

    fn spec(&self, transitions: i32, acquired: Option<MicroTime>) -> LeaseSpec {
        let now = MicroTime(Timestamp::now());
        LeaseSpec {
            holder_identity: Some(self.settings.identity.clone()),
            lease_duration_seconds: Some(i32::try_from(self.settings.duration.as_secs()).unwrap_or(15)),
            acquire_time: Some(acquired.unwrap_or_else(|| now.clone())),
            renew_time: Some(now),
            lease_transitions: Some(transitions),
            ..LeaseSpec::default()
        }
    }

    /// One attempt to acquire or renew; returns whether this replica leads now.
    pub async fn try_acquire_or_renew(&mut self) -> Result<bool, LeaseError> {
        let err = |source| LeaseError { name: self.settings.name.clone(), source };
        let current = self.api.get_opt(&self.settings.name).await.map_err(err)?;
        let Some(mut lease) = current else {
            let lease = Lease {
                metadata: ObjectMeta { name: Some(self.settings.name.clone()), ..ObjectMeta::default() },
                spec: Some(self.spec(0, None)),
            };
            return match self.api.create(&PostParams::default(), &lease).await {
                Ok(_) => {
                    self.renewed = Some(Instant::now());
                    Ok(true)
                }
                Err(kube::Error::Api(s)) if s.code == 409 => Ok(false),
                Err(e) => Err(err(e)),
            };
        };
        let spec = lease.spec.clone().unwrap_or_default();
        let holder = spec.holder_identity.clone().unwrap_or_default();
        let rv = lease.resource_version().unwrap_or_default();
        let now = Instant::now();
        let first_seen = match &self.observed {
            Some((seen_rv, at)) if *seen_rv == rv => *at,
            _ => {
                self.observed = Some((rv.clone(), now));
                now
            }
        };
        let duration = spec
            .lease_duration_seconds
            .and_then(|s| u64::try_from(s).ok())
            .map_or(self.settings.duration, Duration::from_secs);
        let mine = holder == self.settings.identity;
        let expired = holder.is_empty() || now.duration_since(first_seen) >= duration;
        if !mine && !expired {
            self.renewed = None;
            return Ok(false);
        }
        let transitions = spec.lease_transitions.unwrap_or(0) + i32::from(!mine);
        lease.spec = Some(self.spec(transitions, if mine { spec.acquire_time } else { None }));
        match self.api.replace(&self.settings.name, &PostParams::default(), &lease).await {
            Ok(updated) => {
                self.observed = Some((updated.resource_version().unwrap_or_default(), Instant::now()));
                self.renewed = Some(Instant::now());
                Ok(true)
            }
            // Somebody else wrote first: they lead.
            Err(kube::Error::Api(s)) if s.code == 409 => {
                self.renewed = None;
                Ok(false)
            }
            Err(e) => Err(err(e)),
        }
    }

    /// Gives the Lease up (holder cleared) if this replica holds it.
    pub async fn release(&mut self) -> Result<(), LeaseError> {
        let err = |source| LeaseError { name: self.settings.name.clone(), source };
        let Some(mut lease) = self.api.get_opt(&self.settings.name).await.map_err(err)? else {
            return Ok(());
        };
        let mut spec = lease.spec.clone().unwrap_or_default();
        if spec.holder_identity.as_deref() != Some(self.settings.identity.as_str()) {
            return Ok(());
        }
        spec.holder_identity = None;
        spec.lease_duration_seconds = Some(1);
        lease.spec = Some(spec);
        self.api.replace(&self.settings.name, &PostParams::default(), &lease).await.map_err(err)?;
        self.renewed = None;
        Ok(())
    }

    /// Whether a leader whose last renewal was at `self.renewed` may still act.
    fn within_deadline(&self) -> bool {
        self.renewed.is_some_and(|t| t.elapsed() < self.settings.renew_deadline)
    }
}

/// Runs the election until `stop`, publishing leadership on `leading`; releases on the way out.
pub async fn run(mut elector: Elector, leading: watch::Sender<bool>, stop: CancellationToken) {
    let every = elector.settings.renew_every;
    loop {
        let now_leading = match elector.try_acquire_or_renew().await {
            Ok(l) => l,
            Err(e) => {
                debug!(error = %e, "lease attempt failed");
                elector.within_deadline()
            }
        };
        leading.send_if_modified(|l| {
            if *l == now_leading {
                return false;
            }
            if now_leading {
                info!(identity = %elector.settings.identity, "became leader");
            } else {
                warn!(identity = %elector.settings.identity, "lost leadership");
            }
            *l = now_leading;
            true
        });
        tokio::select! {
            () = stop.cancelled() => break,
            () = tokio::time::sleep(every) => {}
        }
    }
    if *leading.borrow() {
        leading.send_replace(false);
        match elector.release().await {
            Ok(()) => info!("lease released"),
            Err(e) => warn!(error = %e, "could not release the lease; a standby takes over when it expires"),
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;
    use http::{Request, Response, StatusCode};
    use kube::Client;
    use kube::client::Body;
    use serde_json::json;
    use tower_test::mock;

    fn elector() -> (Elector, mock::Handle<Request<Body>, Response<Body>>) {
        let (service, handle) = mock::pair::<Request<Body>, Response<Body>>();
        let api = Api::namespaced(Client::new(service, "default"), "fieldgate-system");
        (Elector::new(api, LeaseSettings::new("fieldgate-operator", "op-0")), handle)
    }

    fn reply(send: mock::SendResponse<Response<Body>>, status: StatusCode, body: serde_json::Value) {
        send.send_response(
            Response::builder().status(status).body(Body::from(serde_json::to_vec(&body).unwrap())).unwrap(),
        );
    }

    const PATH: &str = "/apis/coordination.k8s.io/v1/namespaces/fieldgate-system/leases";

    #[tokio::test]
    async fn a_missing_lease_is_created_and_held() {
        let (mut e, mut handle) = elector();
        let server = tokio::spawn(async move {
            let (req, send) = handle.next_request().await.unwrap();
            assert_eq!((req.method().as_str(), req.uri().to_string()), ("GET", format!("{PATH}/fieldgate-operator")));
            reply(
                send,
                StatusCode::NOT_FOUND,
                json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure", "reason": "NotFound", "code": 404}),
            );
            let (req, send) = handle.next_request().await.unwrap();
            assert_eq!((req.method().as_str(), req.uri().to_string()), ("POST", format!("{PATH}?")));
            let body: serde_json::Value =
                serde_json::from_slice(&req.into_body().collect_bytes().await.unwrap()).unwrap();
            assert_eq!(body["spec"]["holderIdentity"], json!("op-0"));
            assert_eq!(body["spec"]["leaseDurationSeconds"], json!(15));
            reply(send, StatusCode::CREATED, body);
        });
        assert!(e.try_acquire_or_renew().await.unwrap());
        server.await.unwrap();
    }

    #[tokio::test]
    async fn a_lease_renewed_by_another_replica_is_left_alone() {
        let (mut e, mut handle) = elector();
        let server = tokio::spawn(async move {
            for rv in ["1", "2"] {
                let (req, send) = handle.next_request().await.unwrap();
                assert_eq!(req.method().as_str(), "GET");
                reply(
                    send,
                    StatusCode::OK,
                    json!({"apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
                    "metadata": {"name": "fieldgate-operator", "resourceVersion": rv},
                    "spec": {"holderIdentity": "op-1", "leaseDurationSeconds": 15}}),
                );
            }
        });
        assert!(!e.try_acquire_or_renew().await.unwrap());
        assert!(!e.try_acquire_or_renew().await.unwrap(), "a fresh record is not expired");
        server.await.unwrap();
    }

    #[tokio::test]
    async fn a_released_lease_is_taken_over_at_once_and_a_conflict_means_someone_else_won() {
        let (mut e, mut handle) = elector();
        let server = tokio::spawn(async move {
            for outcome in [StatusCode::OK, StatusCode::CONFLICT] {
                let (req, send) = handle.next_request().await.unwrap();
                assert_eq!(req.method().as_str(), "GET");
                reply(
                    send,
                    StatusCode::OK,
                    json!({"apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
                    "metadata": {"name": "fieldgate-operator", "resourceVersion": "5"},
                    "spec": {"leaseDurationSeconds": 1, "leaseTransitions": 3}}),
                );
                let (req, send) = handle.next_request().await.unwrap();
                assert_eq!(
                    (req.method().as_str(), req.uri().to_string()),
                    ("PUT", format!("{PATH}/fieldgate-operator?"))
                );
                let body: serde_json::Value =
                    serde_json::from_slice(&req.into_body().collect_bytes().await.unwrap()).unwrap();
                assert_eq!(body["metadata"]["resourceVersion"], json!("5"), "optimistic concurrency");
                assert_eq!(body["spec"]["holderIdentity"], json!("op-0"));
                assert_eq!(body["spec"]["leaseTransitions"], json!(4));
                if outcome == StatusCode::OK {
                    reply(send, outcome, body);
                } else {
                    reply(
                        send,
                        outcome,
                        json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure", "reason": "Conflict", "code": 409}),
                    );
                }
            }
        });
        assert!(e.try_acquire_or_renew().await.unwrap());
        assert!(!e.try_acquire_or_renew().await.unwrap());
        server.await.unwrap();
    }
}
