//! Leader election through a `coordination.k8s.io/v1` Lease, so several replicas are safe:
//! only the holder writes, and it stops writing before anyone else may take over.
//!
//! The holder renews every `renew_every`. Another replica takes over when the Lease record has
//! not changed for `duration`, measured on its *own* monotonic clock (so clock skew between
//! nodes does not matter; the approach of client-go). Writes are optimistic (resourceVersion):
//! of two replicas racing for an expired Lease exactly one wins.
//!
//! Why two leaders cannot write at once:
//! - Leadership lasts `renew_deadline` (< `duration`) from the moment the last *successful*
//!   renewal was **sent** ([`Leadership::Leading`]`{until}`). Another replica can only see the
//!   record expire `duration` after it saw it change, which is after that renewal arrived, so
//!   `until` always falls at least `duration - renew_deadline` before any takeover.
//! - Every attempt (GET + PUT) runs under [`LeaseSettings::attempt_timeout`]: a hung renewal
//!   is a failed one, and the Lease API calls never wait for ever.
//! - A [`Term`] is a cancellation derived from the Lease: it ends when the elector says
//!   standby or when `until` passes without a renewal. Every API call of the writer goes
//!   through [`Term::call`], which refuses to start once the term is over, cancels a call in
//!   flight when it ends, and bounds each call by [`API_CALL_TIMEOUT`].
//!
//! On shutdown the holder releases the Lease so a standby takes over at once.

use std::future::Future;
use std::time::Duration;

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, OwnerReference};
use k8s_openapi::jiff::Timestamp;
use kube::api::{ObjectMeta, PostParams};
use kube::{Api, ResourceExt};
use tokio::sync::watch;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

/// Longest time one API call of the operator may take (connect, send, answer).
pub const API_CALL_TIMEOUT: Duration = Duration::from_secs(15);

/// Lease timing and identity.
#[derive(Clone, Debug)]
pub struct LeaseSettings {
    /// Lease name.
    pub name: String,
    /// This replica's identity (the pod name).
    pub identity: String,
    /// How long a Lease record lives without renewal.
    pub duration: Duration,
    /// How long the holder keeps leading after sending its last successful renewal.
    pub renew_deadline: Duration,
    /// Time between two attempts.
    pub renew_every: Duration,
    /// Longest time one attempt (read and write of the Lease) may take.
    pub attempt_timeout: Duration,
    /// Owner of the Lease (the operator's Deployment), so that it goes with the release.
    pub owner: Option<OwnerReference>,
}

impl LeaseSettings {
    /// 15 s lease, 10 s renew deadline, attempts every 2 s (the client-go defaults), each
    /// attempt at most 4 s.
    pub fn new(name: impl Into<String>, identity: impl Into<String>) -> Self {
        Self {
            name: name.into(),
            identity: identity.into(),
            duration: Duration::from_secs(15),
            renew_deadline: Duration::from_secs(10),
            renew_every: Duration::from_secs(2),
            attempt_timeout: Duration::from_secs(4),
            owner: None,
        }
    }
}

/// Why one attempt failed.
#[derive(Debug, thiserror::Error)]
pub enum LeaseError {
    /// The API server refused or failed a request.
    #[error("lease {name}: {source}")]
    Api {
        /// The Lease.
        name: String,
        /// Cause.
        #[source]
        source: kube::Error,
    },
    /// The attempt took longer than [`LeaseSettings::attempt_timeout`].
    #[error("lease {name}: no answer within {after:?}")]
    Timeout {
        /// The Lease.
        name: String,
        /// The attempt's limit.
        after: Duration,
    },
}

impl LeaseError {
    /// Metrics label.
    pub fn kind(&self) -> &'static str {
        match self {
            LeaseError::Api { .. } => "lease",
            LeaseError::Timeout { .. } => "lease_timeout",
        }
    }
}

/// This replica's standing, as the elector last established it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Leadership {
    /// Another replica leads, or nobody is known to.
    Standby,
    /// This replica leads until `until`, unless a renewal extends it.
    Leading {
        /// The end of leadership without a further successful renewal.
        until: Instant,
    },
}

impl Leadership {
    /// Whether this replica leads at `now`.
    pub fn leads_at(self, now: Instant) -> bool {
        matches!(self, Leadership::Leading { until } if now < until)
    }
}

/// The elector's memory between attempts.
pub struct Elector {
    api: Api<Lease>,
    settings: LeaseSettings,
    /// The last record seen (resourceVersion) and when it was first seen.
    observed: Option<(String, Instant)>,
    /// When the last successful renewal of this replica was sent.
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

    /// This replica's standing after the last attempt.
    pub fn leadership(&self) -> Leadership {
        match self.renewed {
            Some(sent) => Leadership::Leading { until: sent + self.settings.renew_deadline },
            None => Leadership::Standby,
        }
    }

    /// One attempt to acquire or renew, bounded by [`LeaseSettings::attempt_timeout`];
    /// returns whether this replica leads now. A failed or timed-out attempt leaves the
    /// standing of the last successful one, which runs out on its own.
    pub async fn try_acquire_or_renew(&mut self) -> Result<bool, LeaseError> {
        let after = self.settings.attempt_timeout;
        let name = self.settings.name.clone();
        match tokio::time::timeout(after, self.attempt()).await {
            Ok(r) => r,
            Err(_) => Err(LeaseError::Timeout { name, after }),
        }
    }

    async fn attempt(&mut self) -> Result<bool, LeaseError> {
        let err = |source| LeaseError::Api { name: self.settings.name.clone(), source };
        // Leadership is counted from here: the renewal cannot have reached the API server
        // (and other replicas) before it was sent.
        let sent = Instant::now();
        let current = self.api.get_opt(&self.settings.name).await.map_err(err)?;
        let Some(mut lease) = current else {
            let lease = Lease {
                metadata: ObjectMeta {
                    name: Some(self.settings.name.clone()),
                    owner_references: self.settings.owner.clone().map(|o| vec![o]),
                    ..ObjectMeta::default()
                },
                spec: Some(self.spec(0, None)),
            };
            return match self.api.create(&PostParams::default(), &lease).await {
                Ok(_) => {
                    self.renewed = Some(sent);
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
                self.renewed = Some(sent);
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
        let after = self.settings.attempt_timeout;
        let name = self.settings.name.clone();
        let err = |source| LeaseError::Api { name: self.settings.name.clone(), source };
        self.renewed = None;
        let released = async {
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
            Ok(())
        };
        tokio::time::timeout(after, released).await.unwrap_or(Err(LeaseError::Timeout { name, after }))
    }
}

/// Runs the election until `stop`, publishing this replica's standing on `leading`; releases
/// the Lease on the way out.
pub async fn run(mut elector: Elector, leading: watch::Sender<Leadership>, stop: CancellationToken) {
    let every = elector.settings.renew_every;
    loop {
        if let Err(e) = elector.try_acquire_or_renew().await {
            debug!(error = %e, kind = e.kind(), "lease attempt failed");
        }
        let now = elector.leadership();
        let was_leading = matches!(*leading.borrow(), Leadership::Leading { .. });
        let is_leading = now.leads_at(Instant::now());
        if is_leading && !was_leading {
            info!(identity = %elector.settings.identity, "became leader");
        } else if !is_leading && was_leading {
            warn!(identity = %elector.settings.identity, "lost leadership");
        }
        leading.send_replace(if is_leading { now } else { Leadership::Standby });
        tokio::select! {
            () = stop.cancelled() => break,
            () = tokio::time::sleep(every) => {}
        }
    }
    if matches!(*leading.borrow(), Leadership::Leading { .. }) {
        leading.send_replace(Leadership::Standby);
        match elector.release().await {
            Ok(()) => info!("lease released"),
            Err(e) => warn!(error = %e, "could not release the lease; a standby takes over when it expires"),
        }
    }
}

/// Why an API call made within a [`Term`] did not succeed.
#[derive(Debug, thiserror::Error)]
pub enum CallError {
    /// The term had ended: the call was not made, or was abandoned.
    #[error("not leading any more: the call was not made")]
    NotLeading,
    /// No answer within [`API_CALL_TIMEOUT`].
    #[error("no answer within {0:?}")]
    Timeout(Duration),
    /// The API server answered with an error, or the request failed.
    #[error(transparent)]
    Api(#[from] kube::Error),
}

impl CallError {
    /// Whether trying again soon may help: throttling, conflicts, server errors, timeouts and
    /// transport failures are; refusals (400, 401, 403, 404, 422, ...) are not, and neither is
    /// the end of leadership (the replica waits to lead again instead).
    pub fn is_transient(&self) -> bool {
        match self {
            CallError::NotLeading => false,
            CallError::Timeout(_) => true,
            CallError::Api(kube::Error::Api(s)) => s.code == 409 || s.code == 429 || s.code >= 500,
            CallError::Api(_) => true,
        }
    }

    /// The HTTP status the API server answered with, if it answered.
    pub fn code(&self) -> Option<u16> {
        match self {
            CallError::Api(kube::Error::Api(s)) => Some(s.code),
            _ => None,
        }
    }
}

/// One leadership term: a cancellation derived from the Lease. Over when the elector says
/// standby, when the last renewal's deadline passes without another, or when the election
/// stops.
#[derive(Clone, Debug)]
pub struct Term {
    over: CancellationToken,
}

impl Term {
    /// A term that never ends (a single replica without leader election, and tests).
    pub fn unbounded() -> Self {
        Self { over: CancellationToken::new() }
    }

    /// A term that lasts while `leadership` says this replica leads. Spawns its watchdog.
    pub fn start(mut leadership: watch::Receiver<Leadership>) -> Self {
        let over = CancellationToken::new();
        let watchdog = over.clone();
        tokio::spawn(async move {
            loop {
                let current = *leadership.borrow_and_update();
                let Leadership::Leading { until } = current else { break };
                tokio::select! {
                    () = watchdog.cancelled() => return,
                    () = tokio::time::sleep_until(until) => {
                        if *leadership.borrow() == current {
                            break;
                        }
                    }
                    changed = leadership.changed() => if changed.is_err() { break },
                }
            }
            watchdog.cancel();
        });
        Self { over }
    }

    /// Whether the term has ended.
    pub fn is_over(&self) -> bool {
        self.over.is_cancelled()
    }

    /// Ends the term (a replica stepping down).
    pub fn end(&self) {
        self.over.cancel();
    }

    /// Waits for the end of the term.
    pub async fn ended(&self) {
        self.over.cancelled().await;
    }

    /// Makes one API call within the term: not started once the term is over, abandoned when
    /// it ends meanwhile, and given at most [`API_CALL_TIMEOUT`].
    pub async fn call<T>(&self, call: impl Future<Output = Result<T, kube::Error>>) -> Result<T, CallError> {
        if self.over.is_cancelled() {
            return Err(CallError::NotLeading);
        }
        tokio::select! {
            biased;
            () = self.over.cancelled() => Err(CallError::NotLeading),
            r = tokio::time::timeout(API_CALL_TIMEOUT, call) => match r {
                Ok(r) => r.map_err(CallError::Api),
                Err(_) => Err(CallError::Timeout(API_CALL_TIMEOUT)),
            },
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
    #[tokio::test]
    async fn a_renewal_that_hangs_fails_within_the_attempt_timeout_and_leadership_runs_out() {
        let (mut e, mut handle) = elector();
        // First attempt: created, leading.
        let server = tokio::spawn(async move {
            let (_, send) = handle.next_request().await.unwrap();
            reply(
                send,
                StatusCode::NOT_FOUND,
                json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure", "reason": "NotFound", "code": 404}),
            );
            let (req, send) = handle.next_request().await.unwrap();
            let body: serde_json::Value =
                serde_json::from_slice(&req.into_body().collect_bytes().await.unwrap()).unwrap();
            reply(send, StatusCode::CREATED, body);
            handle
        });
        let before = Instant::now();
        assert!(e.try_acquire_or_renew().await.unwrap());
        let mut handle = server.await.unwrap();
        let Leadership::Leading { until } = e.leadership() else { panic!("leading") };
        assert!(until <= Instant::now() + e.settings.renew_deadline && until >= before + e.settings.renew_deadline);

        // Second attempt: the API server never answers.
        tokio::time::pause();
        let hung = tokio::spawn(async move {
            let (_req, send) = handle.next_request().await.unwrap();
            // Hold the response open past the attempt's limit.
            tokio::time::sleep(Duration::from_secs(3600)).await;
            drop(send);
        });
        let err = e.try_acquire_or_renew().await.unwrap_err();
        assert_eq!(err.kind(), "lease_timeout");
        assert_eq!(e.leadership(), Leadership::Leading { until }, "a failed attempt extends nothing");
        assert!(!e.leadership().leads_at(until), "leadership ends at the deadline of the last renewal");
        hung.abort();
    }

    #[tokio::test(start_paused = true)]
    async fn a_term_ends_at_the_deadline_unless_a_renewal_extends_it() {
        let start = Instant::now();
        let (tx, rx) = watch::channel(Leadership::Leading { until: start + Duration::from_secs(10) });
        let term = Term::start(rx);
        tokio::time::sleep(Duration::from_secs(6)).await;
        tx.send_replace(Leadership::Leading { until: start + Duration::from_secs(16) });
        tokio::time::sleep(Duration::from_secs(6)).await;
        assert!(!term.is_over(), "renewed at 6 s, good until 16 s");
        tokio::time::sleep(Duration::from_secs(5)).await;
        assert!(term.is_over(), "no renewal since: over at 16 s");

        let (tx, rx) = watch::channel(Leadership::Leading { until: Instant::now() + Duration::from_secs(10) });
        let term = Term::start(rx);
        tx.send_replace(Leadership::Standby);
        tokio::time::sleep(Duration::from_millis(1)).await;
        assert!(term.is_over(), "standby ends the term at once");
    }

    #[tokio::test(start_paused = true)]
    async fn a_call_in_a_term_is_not_made_after_its_end_abandoned_at_its_end_and_bounded_in_time() {
        let term = Term::unbounded();
        let slow = std::future::pending::<Result<(), kube::Error>>();
        let err = term.call(slow).await.unwrap_err();
        assert!(matches!(err, CallError::Timeout(t) if t == API_CALL_TIMEOUT), "{err}");
        assert!(err.is_transient());

        let in_flight = {
            let term = term.clone();
            tokio::spawn(async move { term.call(std::future::pending::<Result<(), kube::Error>>()).await })
        };
        tokio::time::sleep(Duration::from_secs(1)).await;
        term.end();
        assert!(matches!(in_flight.await.unwrap(), Err(CallError::NotLeading)));

        let polled = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let flag = std::sync::Arc::clone(&polled);
        let err = term
            .call(async move {
                flag.store(true, std::sync::atomic::Ordering::SeqCst);
                Ok::<_, kube::Error>(())
            })
            .await
            .unwrap_err();
        assert!(matches!(err, CallError::NotLeading));
        assert!(!polled.load(std::sync::atomic::Ordering::SeqCst), "the call was never started");
    }
}
