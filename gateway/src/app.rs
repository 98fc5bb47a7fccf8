//! The wiring diagram of the gateway, top to bottom: load and check the config, open the
//! buffer, start the uplinks, the buffer writer and the device adapters, serve management,
//! wait for a signal, then stop in order.
//!
//! Shutdown order: not ready -> adapters stop -> the writer drains and awaits every PubAck ->
//! uplinks finish in-flight deliveries -> exit, all within `--shutdown-grace`.
//!
//! Every long-lived task is supervised (restarted with backoff and counted, its state in the
//! diagnostics: `crate::supervise`), except the buffer writer, which owns the queue the
//! adapters feed and cannot be restarted: if it stops, the gateway turns not ready, stops in
//! order and exits with status 1, so that its supervisor (the kubelet) starts it again.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream;
use fieldgate_crds::{ConfigError, GatewayConfig};
use prometheus_client::registry::Registry;
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

use crate::buffer::{self, Routes, WriterSettings};
use crate::cluster;
use crate::config_watch;
use crate::credentials::{CredentialSettings, CredentialSource};
use crate::management::{self, Management};
use crate::metrics::{Metrics, ReloadLabels, ReloadOutcome};
use crate::reading::ReadingSink;
use crate::reconcile::{Interrupted, Running, Shared};
use crate::secrets::SecretStore;
use crate::supervise::{Watched, supervise};
use crate::uplinks::LinkSettings;

/// Readings waiting for the buffer writer. Small on purpose: when JetStream falls behind,
/// adapters wait (polls run late) instead of readings piling up in memory.
const READING_QUEUE: usize = 256;

/// Command-line arguments and their environment variables.
#[derive(Clone, Debug, clap::Parser)]
#[command(name = "fieldgate-gateway", version, about = "The Fieldgate edge gateway")]
pub struct Args {
    /// GatewayConfig file to run from.
    #[arg(long, env = "FIELDGATE_CONFIG")]
    pub config: PathBuf,
    /// NATS server holding the JetStream buffer.
    #[arg(long, env = "NATS_URL", default_value = "nats://127.0.0.1:4222")]
    pub nats_url: String,
    /// Address of the management server (/metrics, /healthz, /readyz).
    #[arg(long, env = "FIELDGATE_LISTEN", default_value = "127.0.0.1:9464")]
    pub listen: SocketAddr,
    /// Directory of Secrets, laid out as `<dir>/<secret>/<key>` (like mounted Secrets).
    #[arg(long, env = "FIELDGATE_SECRETS_DIR", default_value = "/etc/fieldgate/secrets")]
    pub secrets_dir: PathBuf,
    /// Name of this gateway node, carried in every reading.
    #[arg(long, env = "NODE_NAME", default_value = "standalone")]
    pub node: String,
    /// Safety re-read of the config file and secrets: changes are seen through file-system
    /// events as they happen; this re-read only catches what the events missed.
    #[arg(long, env = "FIELDGATE_CONFIG_RESYNC", default_value = "60s", value_parser = humantime::parse_duration)]
    pub config_resync: Duration,
    /// Time allowed for a graceful stop after SIGTERM.
    #[arg(long, env = "FIELDGATE_SHUTDOWN_GRACE", default_value = "20s", value_parser = humantime::parse_duration)]
    pub shutdown_grace: Duration,
    /// In-cluster mode: name of this node's ConfigMap (rendered by the operator). The config
    /// is then watched through the API and `--config` holds its local copy.
    #[arg(long, env = "FIELDGATE_CONFIGMAP")]
    pub configmap: Option<String>,
    /// In-cluster mode: namespace of the ConfigMap (and of the gateway's DaemonSet).
    #[arg(long, env = "POD_NAMESPACE", default_value = "default")]
    pub namespace: String,
    /// In-cluster mode: the operator's credentials endpoint (`https://...`), where this node's
    /// credentials come from. Unset: the node gets none.
    #[arg(long, env = "FIELDGATE_CREDENTIALS_URL", requires_all = ["credentials_ca", "credentials_token_file"])]
    pub credentials_url: Option<String>,
    /// CA certificate (PEM) of the credentials endpoint.
    #[arg(long, env = "FIELDGATE_CREDENTIALS_CA")]
    pub credentials_ca: Option<PathBuf>,
    /// This pod's projected ServiceAccount token for the credentials endpoint.
    #[arg(long, env = "FIELDGATE_CREDENTIALS_TOKEN_FILE")]
    pub credentials_token_file: Option<PathBuf>,
    /// In-cluster mode: the gateway's DaemonSet. When it is gone as the gateway stops (the
    /// release was uninstalled), the local copies of the config and credentials are deleted.
    #[arg(long, env = "FIELDGATE_DAEMONSET")]
    pub daemonset: Option<String>,
    /// Runtime worker threads. One is plenty for hundreds of devices and spends the least CPU
    /// on thread hand-offs; raise it for very large gateways.
    #[arg(long, env = "FIELDGATE_WORKER_THREADS", default_value_t = 1)]
    pub worker_threads: usize,
    /// Log format.
    #[arg(long, env = "FIELDGATE_LOG_FORMAT", default_value = "text", value_parser = ["text", "json"])]
    pub log_format: String,
    /// Listeners field devices connect to (CoAP push, raw TCP and UDP).
    #[command(flatten)]
    pub hub: crate::adapters::hub::HubArgs,
    /// Trace sampling (export itself is configured by the standard OTEL_* variables).
    #[command(flatten)]
    pub traces: crate::telemetry::TraceArgs,
    /// Management API token and limits.
    #[command(flatten)]
    pub management: crate::management::ManagementArgs,
}

/// Why the gateway could not run.
#[derive(Debug, thiserror::Error)]
pub enum AppError {
    /// The configuration is unreadable or invalid; nothing was started.
    #[error("invalid config {path}: {message}")]
    Config {
        /// The config file.
        path: String,
        /// What is wrong: a count, then every problem on its own line.
        message: String,
        /// Every problem found, each starting with its field path (empty when `message` is
        /// one problem without a path, such as an unreadable file).
        problems: Vec<String>,
    },
    /// The management address could not be bound.
    #[error("cannot listen on {addr}: {source}")]
    Listen {
        /// The address.
        addr: SocketAddr,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// The buffer writer stopped while the gateway ran: no reading can be accepted any more.
    #[error("the buffer writer stopped: {0}")]
    BufferWriter(String),
    /// Connecting to NATS failed in a way retrying cannot fix.
    #[error("NATS {url}: {source}")]
    Nats {
        /// The URL.
        url: String,
        /// Cause.
        #[source]
        source: async_nats::ConnectError,
    },
}

impl AppError {
    /// The process exit code for this error: 2 for configuration errors, 1 otherwise.
    pub fn exit_code(&self) -> u8 {
        match self {
            AppError::Config { .. } => 2,
            _ => 1,
        }
    }
}

/// A checked config with every uplink's settings (secrets included) resolved.
#[derive(Clone)]
pub struct LoadedConfig {
    /// The document.
    pub config: GatewayConfig,
    /// Link settings (broker or endpoint), in `config.uplinks` order.
    pub links: Vec<LinkSettings>,
}

/// Reads, parses, validates and resolves a config file. Touches nothing else.
pub fn load_config(path: &std::path::Path, node: &str, secrets: &SecretStore) -> Result<LoadedConfig, AppError> {
    let text = std::fs::read_to_string(path).map_err(|e| AppError::Config {
        path: path.display().to_string(),
        message: e.to_string(),
        problems: vec![],
    })?;
    check_config(&text, &path.display().to_string(), node, secrets)
}

/// Checks the config document `text` (from `path`) as [`load_config`] does.
pub fn check_config(text: &str, path: &str, node: &str, secrets: &SecretStore) -> Result<LoadedConfig, AppError> {
    let refuse = |problems: Vec<String>| {
        let n = problems.len();
        let mut message = format!("{n} problem{}", if n == 1 { "" } else { "s" });
        for p in &problems {
            message.push_str("\n  ");
            message.push_str(p);
        }
        AppError::Config { path: path.to_string(), message, problems }
    };
    let config = GatewayConfig::from_yaml(text).map_err(|e| match e {
        ConfigError::Invalid(errs) => refuse(errs.0.iter().map(ToString::to_string).collect()),
        syntax => AppError::Config { path: path.to_string(), message: syntax.to_string(), problems: vec![] },
    })?;
    // Every Secret at once, with the file searched. A device's missing Secret refuses that
    // device alone (when it presents itself), so it is only a warning here.
    let (missing, device_missing) = secrets.unreadable(&config.secret_uses());
    for problem in &device_missing {
        warn!(problem = %problem, "a device's Secret is missing; that device will be refused");
    }
    if !missing.is_empty() {
        return Err(refuse(missing));
    }
    let mut links = Vec::new();
    let mut problems = Vec::new();
    for (i, u) in config.uplinks.iter().enumerate() {
        match LinkSettings::resolve(u, node, secrets, &format!("uplinks[{i}]")) {
            Ok(s) => links.push(s),
            Err(e) => problems.push(e.to_string()),
        }
    }
    if !problems.is_empty() {
        return Err(refuse(problems));
    }
    Ok(LoadedConfig { config, links })
}

/// In-cluster mode, once started: the API client (if there is a configuration), where the
/// credentials come from, the local copies and the hash of the credentials on hand.
struct ClusterMode {
    client: Option<kube::Client>,
    credentials: Option<CredentialSource>,
    mirror: cluster::Mirror,
    have: Option<String>,
}

/// Prepares in-cluster mode: builds the API client and the credentials client, and writes the
/// local copies of this node's config and credentials (or keeps the last ones when the API
/// server or the operator is unreachable).
async fn start_cluster_mode(args: &Args, configmap: &str) -> Result<ClusterMode, AppError> {
    let settings = cluster::ClusterSettings {
        namespace: args.namespace.clone(),
        configmap: configmap.to_string(),
        node: args.node.clone(),
        config_path: args.config.clone(),
        secrets_dir: args.secrets_dir.clone(),
    };
    let mirror = cluster::Mirror::new(settings);
    let client = match kube::Client::try_default().await {
        Ok(c) => Some(c),
        Err(e) => {
            warn!(error = %e, "no Kubernetes client configuration; running on the local copy only");
            None
        }
    };
    let err = |message: String| AppError::Config { path: args.config.display().to_string(), message, problems: vec![] };
    let credentials = match (&args.credentials_url, &args.credentials_ca, &args.credentials_token_file) {
        (Some(url), Some(ca), Some(token)) => {
            let settings = CredentialSettings { url: url.clone(), ca_file: ca.clone(), token_file: token.clone() };
            Some(CredentialSource::new(&settings).map_err(|e| err(e.to_string()))?)
        }
        _ => {
            warn!("no credentials endpoint (--credentials-url): this node gets no credentials");
            None
        }
    };
    let have =
        cluster::bootstrap(client.as_ref(), credentials.as_ref(), &mirror).await.map_err(|e| err(e.to_string()))?;
    Ok(ClusterMode { client, credentials, mirror, have })
}

async fn wait_for_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = term.recv() => {}
                    _ = tokio::signal::ctrl_c() => {}
                }
            }
            Err(_) => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}

/// Connects to the NATS server holding the buffer, trying again with backoff until it answers.
/// `None` when `stop` fires first (a stop request is never held up by a missing NATS).
///
/// Each failure is logged with the address and its cause (such as `Connection refused`),
/// the first one at once and then at most every 30 s; readiness stays false meanwhile. Only a
/// URL that does not parse is fatal.
async fn connect_nats(
    args: &Args,
    metrics: &Arc<Metrics>,
    stop: &CancellationToken,
) -> Result<Option<async_nats::Client>, AppError> {
    let mut delays = crate::supervise::backoff(Duration::from_millis(250), Duration::from_secs(5));
    let mut throttle = crate::telemetry::LogThrottle::new(Duration::from_secs(30));
    let started = Instant::now();
    loop {
        let attempt = async_nats::ConnectOptions::new()
            .name(format!("fieldgate-gateway {}", args.node))
            .event_callback(crate::telemetry::nats_events(Arc::clone(metrics)))
            .connect(args.nats_url.as_str());
        let error = tokio::select! {
            () = stop.cancelled() => {
                info!(url = %args.nats_url, "stopped before NATS answered");
                return Ok(None);
            }
            connected = attempt => match connected {
                Ok(client) => {
                    info!(
                        url = %args.nats_url,
                        server_version = %client.server_info().version,
                        "connected to NATS (the buffer)"
                    );
                    return Ok(Some(client));
                }
                Err(e) if e.kind() == async_nats::ConnectErrorKind::ServerParse => {
                    return Err(AppError::Nats { url: args.nats_url.clone(), source: e });
                }
                Err(e) => e,
            },
        };
        if let Some(held_back) = throttle.allow() {
            warn!(
                url = %args.nats_url,
                error = %error,
                waited_s = started.elapsed().as_secs(),
                held_back,
                "cannot reach NATS, which holds the buffer; trying again (nothing is read from \
                 devices until it answers)"
            );
        }
        let delay = delays.next().unwrap_or(Duration::from_secs(5));
        tokio::select! {
            () = stop.cancelled() => {
                info!(url = %args.nats_url, "stopped before NATS answered");
                return Ok(None);
            }
            () = tokio::time::sleep(delay) => {}
        }
    }
}

/// Runs the gateway until SIGTERM or Ctrl-C.
pub async fn run(args: Args, logs: Option<crate::telemetry::LogControl>) -> Result<(), AppError> {
    let traces = crate::telemetry::Traces::init(&args.traces, "fieldgate-gateway", &args.node);
    let secrets = SecretStore::new(&args.secrets_dir);
    let cluster = match &args.configmap {
        Some(configmap) => Some(start_cluster_mode(&args, configmap).await?),
        None => None,
    };
    let loaded = load_config(&args.config, &args.node, &secrets)?;
    let initial_digest = config_watch::file_digest(&args.config, &secrets);
    info!(
        config = %args.config.display(),
        version = loaded.config.version.as_deref().unwrap_or("-"),
        devices = loaded.config.devices.len(),
        uplinks = loaded.config.uplinks.len(),
        "configuration loaded"
    );

    let mut registry = Registry::default();
    let metrics = Arc::new(Metrics::new(&mut registry));
    let config_source = match &args.configmap {
        None => management::ConfigSource::Standalone {
            path: args.config.clone(),
            node: args.node.clone(),
            secrets: secrets.clone(),
        },
        Some(_) => management::ConfigSource::Cluster,
    };
    let api = management::Api::from_args(&args.management, logs, config_source).map_err(|e| AppError::Config {
        path: e.path.clone(),
        message: e.message.clone(),
        problems: vec![],
    })?;
    let management = Management::with_api(registry, Arc::clone(&metrics), api, &args.node, &args.management);
    let listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .map_err(|source| AppError::Listen { addr: args.listen, source })?;
    let listen = listener.local_addr().unwrap_or(args.listen);
    let stop_serving = CancellationToken::new();
    let server = {
        let (listener, management, stop) = (Arc::new(listener), Arc::clone(&management), stop_serving.clone());
        tokio::spawn(supervise("management server".into(), Arc::clone(&metrics), stop.clone(), move || {
            let (listener, management, stop) = (Arc::clone(&listener), Arc::clone(&management), stop.clone());
            async move {
                if let Err(e) = management::serve(listener, management, stop).await {
                    warn!(error = %e, "management server failed");
                }
            }
        }))
    };
    info!(%listen, "management server listening (status page: http://{listen}/status)");

    let signal = CancellationToken::new();
    {
        let signal = signal.clone();
        tokio::spawn(async move {
            wait_for_signal().await;
            info!("stop requested");
            signal.cancel();
        });
    }

    let Some(client) = connect_nats(&args, &metrics, &signal).await? else {
        // Stopped before NATS answered: nothing else was started.
        stop_serving.cancel();
        let _ = server.await;
        traces.shutdown(Duration::from_secs(3)).await;
        info!("gateway stopped");
        return Ok(());
    };
    management.set_nats_server_version(&client.server_info().version);
    let js = jetstream::new(client.clone());

    // The buffer writer: adapters -> JetStream, along the routes in force.
    let (routes_tx, routes_rx) = watch::channel(Arc::new(Routes::default()));
    let (sink, rx) = ReadingSink::buffered(READING_QUEUE);
    let abandon = CancellationToken::new();
    let writer_task = Watched::new("buffer writer", &metrics);
    let mut writer = Some(tokio::spawn(buffer::run_writer(
        js.clone(),
        routes_rx,
        Arc::clone(&metrics),
        WriterSettings::default(),
        rx,
        abandon.clone(),
    )));
    let mut failure: Option<AppError> = None;

    // Devices and uplinks, applied per device from the config and every later change.
    let shared = Shared {
        js: js.clone(),
        metrics: Arc::clone(&metrics),
        node: args.node.clone(),
        uplink_grace: args.shutdown_grace / 2,
        // Device listeners stop taking new messages at the signal; devices stop after.
        hub: crate::adapters::hub::DeviceHub::new(
            args.hub.clone(),
            secrets.clone(),
            Arc::clone(&metrics),
            signal.clone(),
        ),
    };
    let mut running = Running::new(shared, sink, routes_tx);
    let (applied_tx, applied_rx) = watch::channel(None);
    management.watch_applied(applied_tx.subscribe());
    let background = CancellationToken::new();
    // In the cluster with a reachable client configuration: mirror the node's config and
    // credentials and report status (without one, the gateway runs on its local copy alone).
    let mut removal_check = None;
    if let Some(ClusterMode { client: Some(client), credentials, mirror, have }) = cluster {
        let (c, m, stop) = (client.clone(), mirror.clone(), background.clone());
        tokio::spawn(supervise("cluster mirror".into(), Arc::clone(&metrics), background.clone(), move || {
            cluster::mirror(c.clone(), credentials.clone(), m.clone(), have.clone(), stop.clone())
        }));
        let (c, node, health, stop) = (client.clone(), args.node.clone(), Arc::clone(&metrics), background.clone());
        tokio::spawn(supervise("status reporter".into(), Arc::clone(&metrics), background.clone(), move || {
            let applied = applied_rx.clone();
            crate::status_report::report_status(c.clone(), node.clone(), Arc::clone(&health), applied, stop.clone())
        }));
        removal_check = args.daemonset.clone().map(|ds| (client, ds, mirror));
    }
    let reloads = metrics.config_reloads.clone();
    let config_of = |l: &LoadedConfig| Some(Arc::new(l.config.clone()));
    applied_tx.send_replace(config_of(&loaded));
    let (device_count, uplink_count) = (loaded.config.devices.len(), loaded.config.uplinks.len());
    match running.apply(loaded, &signal).await {
        Ok(_) => {
            info!(node = %args.node, devices = device_count, uplinks = uplink_count, "gateway running");
            reloads.get_or_create(&ReloadLabels { outcome: ReloadOutcome::applied }).inc();
            management.set_ready(true);
        }
        Err(Interrupted) => info!("stopped before the buffer was ready"),
    }

    let (config_tx, mut config_rx) = mpsc::channel(1);
    let watcher_stop = CancellationToken::new();
    {
        let (path, node, secrets, stop) =
            (args.config.clone(), args.node.clone(), secrets.clone(), watcher_stop.clone());
        let resync = args.config_resync;
        tokio::spawn(supervise("config watcher".into(), Arc::clone(&metrics), watcher_stop.clone(), move || {
            let (path, node, secrets, tx) = (path.clone(), node.clone(), secrets.clone(), config_tx.clone());
            config_watch::watch_file(path, node, secrets, resync, initial_digest, tx, stop.clone())
        }));
    }

    while !signal.is_cancelled() && failure.is_none() {
        tokio::select! {
            () = signal.cancelled() => {}
            Some(ended) = join_some(&mut writer) => {
                writer = None;
                let e = writer_stopped(ended, &writer_task);
                error!(error = %e, "the gateway cannot accept readings any more; stopping");
                management.set_failed(&e.to_string());
                failure = Some(e);
            }
            Some(candidate) = config_rx.recv() => match candidate {
                Ok(loaded) => {
                    applied_tx.send_replace(config_of(&loaded));
                    match running.apply(loaded, &signal).await {
                        Ok(applied) if applied.is_empty() => {}
                        Ok(applied) => {
                            info!(
                                added = ?applied.added,
                                changed = ?applied.changed,
                                removed = ?applied.removed,
                                unchanged = applied.unchanged,
                                version = running.version().unwrap_or("-"),
                                "new configuration applied"
                            );
                            reloads.get_or_create(&ReloadLabels { outcome: ReloadOutcome::applied }).inc();
                            management.set_ready(true);
                        }
                        Err(Interrupted) => {}
                    }
                }
                Err(e) => {
                    warn!(error = %e, "new configuration refused; the running one stays");
                    reloads.get_or_create(&ReloadLabels { outcome: ReloadOutcome::refused }).inc();
                }
            },
        }
    }

    // Shutdown, in order.
    watcher_stop.cancel();
    background.cancel();
    let deadline = Instant::now() + args.shutdown_grace;
    management.set_ready(false);
    running.stop_devices().await;
    info!("devices stopped");
    let writer_deadline = deadline - args.shutdown_grace / 2;
    if let Some(mut writer) = writer.take() {
        tokio::select! {
            _ = &mut writer => {}
            () = tokio::time::sleep_until(writer_deadline) => {
                abandon.cancel();
                let _ = writer.await;
            }
        }
        info!("buffer writer drained");
    }
    drop(writer_task);
    running.stop_uplinks().await;
    let _ = tokio::time::timeout_at(deadline, client.flush()).await;
    // Removed from the cluster (the release uninstalled)? Then no copy of its config and
    // credentials stays on the node.
    if let Some((api, daemonset, mirror)) = removal_check {
        let left = deadline.saturating_duration_since(Instant::now()).max(Duration::from_secs(1));
        match cluster::removal(&api, &args.namespace, &daemonset, left.min(Duration::from_secs(5))).await {
            cluster::Removal::Removed(why) => match mirror.wipe() {
                Ok(()) => info!(why, "gateway removed: local config and credentials deleted"),
                Err(e) => warn!(error = %e, why, "gateway removed, but its local copies could not all be deleted"),
            },
            cluster::Removal::Staying => {}
            cluster::Removal::Unknown(e) => {
                warn!(error = %e, "could not tell whether the gateway was removed; local copies kept");
            }
        }
    }
    stop_serving.cancel();
    let _ = server.await;
    traces.shutdown(Duration::from_secs(3)).await;
    if let Some(e) = failure {
        return Err(e);
    }
    info!("gateway stopped");
    Ok(())
}

/// The outcome of a task, once it ends (never, without one).
async fn join_some<T>(task: &mut Option<tokio::task::JoinHandle<T>>) -> Option<Result<T, tokio::task::JoinError>> {
    match task {
        Some(t) => Some(t.await),
        None => std::future::pending().await,
    }
}

/// The gateway's error for a buffer writer that stopped while the gateway ran (it only stops
/// by itself once every adapter is gone, at shutdown); its task state shows how.
fn writer_stopped(ended: Result<Result<(), buffer::WriterError>, tokio::task::JoinError>, task: &Watched) -> AppError {
    let (how, why) = match ended {
        Ok(Ok(())) => ("ended", "it ended".to_string()),
        Ok(Err(e)) => ("ended", e.to_string()),
        Err(e) if e.is_panic() => ("panicked", "it panicked".to_string()),
        Err(e) => ("ended", e.to_string()),
    };
    task.failed(how);
    AppError::BufferWriter(why)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_buffer_writer_that_dies_makes_the_gateway_unready_and_exit_with_an_error() {
        let mut registry = Registry::default();
        let metrics = Arc::new(Metrics::new(&mut registry));
        let management = Management::with_api(
            Registry::default(),
            Arc::clone(&metrics),
            None,
            "n",
            &management::ManagementArgs::default(),
        );
        management.set_ready(true);
        let task = Watched::new("buffer writer", &metrics);
        let mut writer: Option<tokio::task::JoinHandle<Result<(), buffer::WriterError>>> =
            Some(tokio::spawn(async { panic!("a bug in the writer") }));
        let ended = join_some(&mut writer).await.expect("a writer outcome");
        let e = writer_stopped(ended, &task);
        management.set_failed(&e.to_string());
        assert_eq!(e.exit_code(), 1);
        assert!(e.to_string().contains("buffer writer stopped: it panicked"), "{e}");
        let reasons = management.not_ready_reasons();
        assert!(reasons.iter().any(|r| r.contains("buffer writer stopped")), "{reasons:?}");
        let state = &metrics.task_states.snapshot()["buffer writer"];
        assert_eq!((state.state, state.last_failure), ("failed", Some("panicked")));

        // A lane that stopped is named.
        let e = writer_stopped(Ok(Err(buffer::WriterError { uplink: "default/cloud".into() })), &task);
        assert!(e.to_string().contains("lane of uplink default/cloud"), "{e}");
        drop(task);
        assert!(metrics.task_states.snapshot().is_empty());
    }
}
