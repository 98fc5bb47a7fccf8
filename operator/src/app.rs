//! `fieldgate-operator run`: the wiring diagram, top to bottom.
//!
//! Start the management server (not ready) -> find the owner of what the operator writes (its
//! Deployment) -> serve the credentials endpoint -> start the watches -> join the leader
//! election -> wait for the caches -> ready -> reconcile while leading -> on SIGTERM: stop
//! the loop, release the Lease, stop serving.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference;
use kube::{Api, Client, ResourceExt};
use prometheus_client::registry::Registry;
use tokio::sync::{Notify, watch};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::controller::{self, LoopSettings, Reconciler};
use crate::credentials::{self, CREDENTIALS_AUDIENCE, CredentialService, CredentialSettings};
use crate::lease::{self, API_CALL_TIMEOUT, Elector, Leadership, LeaseSettings};
use crate::management::{self, Management};
use crate::metrics::Metrics;
use crate::writer::{Writer, WriterSettings};

/// Arguments of `run`, each with its environment variable.
#[derive(Clone, Debug, clap::Args)]
pub struct Args {
    /// Namespace of the per-node ConfigMaps and Secrets, and of the Lease.
    #[arg(long, env = "POD_NAMESPACE", default_value = "fieldgate-system")]
    pub namespace: String,
    /// This replica's identity in the Lease and in Events.
    #[arg(long, env = "POD_NAME", default_value = "fieldgate-operator")]
    pub identity: String,
    /// Address of the management server (/metrics, /healthz, /readyz).
    #[arg(long, env = "FIELDGATE_LISTEN", default_value = "127.0.0.1:9465")]
    pub listen: SocketAddr,
    /// Take part in leader election (off: this replica always writes; run only one).
    #[arg(long, env = "FIELDGATE_LEADER_ELECTION", default_value_t = true, action = clap::ArgAction::Set)]
    pub leader_election: bool,
    /// Name of the Lease.
    #[arg(long, env = "FIELDGATE_LEASE_NAME", default_value = "fieldgate-operator")]
    pub lease_name: String,
    /// How long a gateway node may be NotReady before its network devices move.
    #[arg(long, env = "FIELDGATE_FAILOVER_GRACE", default_value = "5m", value_parser = humantime::parse_duration)]
    pub failover_grace: Duration,
    /// Move failed-over devices back to their home node once it is Ready again.
    #[arg(long, env = "FIELDGATE_FAIL_BACK")]
    pub fail_back: bool,
    /// Quiet time after a change before reconciling.
    #[arg(long, env = "FIELDGATE_DEBOUNCE", default_value = "500ms", value_parser = humantime::parse_duration)]
    pub debounce: Duration,
    /// Reconcile at least this often.
    #[arg(long, env = "FIELDGATE_RESYNC", default_value = "5m", value_parser = humantime::parse_duration)]
    pub resync: Duration,
    /// Status writes in flight at once.
    #[arg(long, env = "FIELDGATE_STATUS_CONCURRENCY", default_value_t = 16)]
    pub status_concurrency: usize,
    /// Time allowed for a graceful stop after SIGTERM.
    #[arg(long, env = "FIELDGATE_SHUTDOWN_GRACE", default_value = "10s", value_parser = humantime::parse_duration)]
    pub shutdown_grace: Duration,
    /// Worker threads of the async runtime (0: one per CPU). The reconcile loop runs on the
    /// main thread, the watches, the Lease and the management server on the workers. The
    /// operator mostly waits for the API server: more threads bring no speed, only memory
    /// (each allocating thread gets its own allocator arena).
    #[arg(long, env = "FIELDGATE_WORKER_THREADS", default_value_t = 1)]
    pub worker_threads: usize,
    /// The operator's Deployment (in `--namespace`): owner of the per-node ConfigMaps and
    /// Secrets and of the Lease, so that removing the release removes them. Unset: each
    /// node's objects are owned by the Node.
    #[arg(long, env = "FIELDGATE_OWNER_DEPLOYMENT")]
    pub owner_deployment: Option<String>,
    /// Address of the credentials endpoint (HTTPS) where each gateway gets its own node's
    /// credentials. Unset: not served.
    #[arg(long, env = "FIELDGATE_CREDENTIALS_LISTEN", requires_all = ["credentials_tls_cert", "credentials_tls_key", "gateway_service_account"])]
    pub credentials_listen: Option<SocketAddr>,
    /// Certificate chain (PEM) of the credentials endpoint.
    #[arg(long, env = "FIELDGATE_CREDENTIALS_TLS_CERT")]
    pub credentials_tls_cert: Option<PathBuf>,
    /// Private key (PEM) of the credentials endpoint.
    #[arg(long, env = "FIELDGATE_CREDENTIALS_TLS_KEY")]
    pub credentials_tls_key: Option<PathBuf>,
    /// The gateways' ServiceAccount, `<namespace>/<name>`: only its tokens get credentials.
    #[arg(long, env = "FIELDGATE_GATEWAY_SERVICE_ACCOUNT")]
    pub gateway_service_account: Option<String>,
    /// Audience the gateways' tokens must carry.
    #[arg(long, env = "FIELDGATE_CREDENTIALS_AUDIENCE", default_value = CREDENTIALS_AUDIENCE)]
    pub credentials_audience: String,
}

/// Why the operator could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// `--gateway-service-account` is not `<namespace>/<name>`.
    #[error("--gateway-service-account {0:?}: expected <namespace>/<name>")]
    ServiceAccount(String),
    /// The owner Deployment could not be read for a reason retrying cannot fix.
    #[error("owner Deployment {name}: {source}")]
    Owner {
        /// Its name.
        name: String,
        /// Cause.
        #[source]
        source: kube::Error,
    },
}

/// The owner reference of Deployment `name`, read once at start (retried while the API
/// server is unreachable or failing; each attempt bounded). `None` when stopped meanwhile.
async fn owner_of(
    client: &Client,
    namespace: &str,
    name: &str,
    stop: &CancellationToken,
) -> Result<Option<OwnerReference>, StartError> {
    let api = Api::<Deployment>::namespaced(client.clone(), namespace);
    let mut delay = Duration::from_millis(500);
    loop {
        match tokio::time::timeout(API_CALL_TIMEOUT, api.get(name)).await {
            Ok(Ok(d)) => {
                return Ok(Some(OwnerReference {
                    api_version: "apps/v1".into(),
                    kind: "Deployment".into(),
                    name: d.name_any(),
                    uid: d.uid().unwrap_or_default(),
                    ..OwnerReference::default()
                }));
            }
            Ok(Err(kube::Error::Api(s))) if s.code < 500 && s.code != 429 => {
                return Err(StartError::Owner { name: name.to_string(), source: kube::Error::Api(s) });
            }
            Ok(Err(e)) => warn!(error = %e, deployment = name, retry_in = ?delay, "owner Deployment not readable yet"),
            Err(_) => warn!(deployment = name, retry_in = ?delay, "owner Deployment: no answer in time"),
        }
        tokio::select! {
            () = stop.cancelled() => return Ok(None),
            () = tokio::time::sleep(delay) => {}
        }
        delay = (delay * 2).min(Duration::from_secs(30));
    }
}

async fn wait_for_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        if let Ok(mut term) = signal(SignalKind::terminate()) {
            tokio::select! {
                _ = term.recv() => {}
                _ = tokio::signal::ctrl_c() => {}
            }
            return;
        }
    }
    let _ = tokio::signal::ctrl_c().await;
}

/// Runs the controller until SIGTERM or Ctrl-C.
pub async fn run(args: Args) -> anyhow::Result<()> {
    let client = Client::try_default().await?;
    let mut registry = Registry::default();
    let metrics = Arc::new(Metrics::new(&mut registry));
    let management = Management::new(registry);
    let listener = tokio::net::TcpListener::bind(args.listen).await?;
    let stop_serving = CancellationToken::new();
    let server = tokio::spawn(management::serve(listener, Arc::clone(&management), stop_serving.clone()));
    info!(listen = %args.listen, "management server listening");

    let stop = CancellationToken::new();
    {
        let stop = stop.clone();
        tokio::spawn(async move {
            wait_for_signal().await;
            info!("stop requested");
            stop.cancel();
        });
    }

    let owner = match &args.owner_deployment {
        Some(name) => match owner_of(&client, &args.namespace, name, &stop).await? {
            Some(o) => Some(o),
            None => return Ok(()),
        },
        None => None,
    };

    if let Some(listen) = args.credentials_listen {
        let sa = args.gateway_service_account.clone().unwrap_or_default();
        let Some((sa_ns, sa_name)) = sa.split_once('/') else {
            return Err(StartError::ServiceAccount(sa).into());
        };
        let settings = CredentialSettings {
            namespace: args.namespace.clone(),
            audience: args.credentials_audience.clone(),
            gateway_user: format!("system:serviceaccount:{sa_ns}:{sa_name}"),
        };
        let (cert, key) = (
            args.credentials_tls_cert.clone().unwrap_or_default(),
            args.credentials_tls_key.clone().unwrap_or_default(),
        );
        let tls = credentials::tls_config(&cert, &key)?;
        let router = CredentialService::new(client.clone(), settings, &metrics).router();
        let listener = tokio::net::TcpListener::bind(listen).await?;
        tokio::spawn(credentials::serve(listener, tls, router, stop_serving.clone()));
    }

    let trigger = Arc::new(Notify::new());
    let (stores, watches) = controller::watch_all(&client, Arc::clone(&trigger), Arc::clone(&metrics));
    let watches = tokio::spawn(watches);
    {
        let (stores, management) = (stores.clone(), Arc::clone(&management));
        tokio::spawn(async move {
            if stores.ready().await {
                info!("caches filled");
                management.set_ready(true);
            }
        });
    }

    let (leading_tx, leading) = watch::channel(Leadership::Standby);
    let election = if args.leader_election {
        let mut settings = LeaseSettings::new(&args.lease_name, &args.identity);
        settings.owner = owner.clone();
        let elector = Elector::new(Api::<Lease>::namespaced(client.clone(), &args.namespace), settings);
        Some(tokio::spawn(lease::run(elector, leading_tx, stop.clone())))
    } else {
        // Alone: leading for as long as the process runs (a century).
        leading_tx
            .send_replace(Leadership::Leading { until: Instant::now() + Duration::from_secs(100 * 365 * 86_400) });
        None
    };

    let writer = Writer::new(
        client.clone(),
        WriterSettings {
            namespace: args.namespace.clone(),
            concurrency: args.status_concurrency,
            instance: args.identity.clone(),
            owner,
        },
        Arc::clone(&metrics),
    );
    let settings = LoopSettings {
        debounce: args.debounce,
        resync: args.resync,
        failover_grace: args.failover_grace,
        fail_back: args.fail_back,
    };
    let reconciler = Reconciler::new(client, stores, writer, metrics, settings);
    controller::run(reconciler, trigger, leading, stop.clone()).await;

    // Stopping: the loop has finished its pass; give up the Lease, stop serving.
    management.set_ready(false);
    if let Some(election) = election {
        let _ = tokio::time::timeout(args.shutdown_grace, election).await;
    }
    watches.abort();
    stop_serving.cancel();
    let _ = server.await;
    info!("operator stopped");
    Ok(())
}
