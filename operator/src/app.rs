//! `fieldgate-operator run`: the wiring diagram, top to bottom.
//!
//! Start the management server (not ready) -> start the watches -> join the leader election
//! -> wait for the caches -> ready -> reconcile while leading -> on SIGTERM: stop the loop,
//! release the Lease, stop serving.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::coordination::v1::Lease;
use kube::{Api, Client};
use prometheus_client::registry::Registry;
use tokio::sync::{Notify, watch};
use tokio_util::sync::CancellationToken;
use tracing::info;

use crate::controller::{self, LoopSettings, Reconciler};
use crate::lease::{self, Elector, LeaseSettings};
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

    let (leading_tx, leading) = watch::channel(false);
    let election = if args.leader_election {
        let elector = Elector::new(
            Api::<Lease>::namespaced(client.clone(), &args.namespace),
            LeaseSettings::new(&args.lease_name, &args.identity),
        );
        Some(tokio::spawn(lease::run(elector, leading_tx, stop.clone())))
    } else {
        leading_tx.send_replace(true);
        None
    };

    let writer = Writer::new(
        client.clone(),
        WriterSettings {
            namespace: args.namespace.clone(),
            concurrency: args.status_concurrency,
            instance: args.identity.clone(),
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
