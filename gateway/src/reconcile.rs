//! Applies a [`GatewayConfig`] to the running gateway, one device and one uplink at a time:
//! adding, removing or changing one device or uplink does not interrupt the others.
//!
//! Order of an apply: streams and consumers of new or changed uplinks exist first (the buffer
//! streams keep entries only while a consumer is interested), then the writer's routes switch,
//! then uplink drivers and device adapters that changed are restarted, new ones started and
//! removed ones stopped. Unchanged workers are left alone.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream;
use fieldgate_crds::{GatewayDevice, GatewayUplink};
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::adapters::{self, DeviceTask};
use crate::app::LoadedConfig;
use crate::buffer::{Routes, UplinkBuffer};
use crate::metrics::Metrics;
use crate::reading::ReadingSink;
use crate::supervise::{backoff, supervise};
use crate::uplinks::{self, LinkSettings, UplinkTask};

/// What the running workers share.
pub struct Shared {
    /// JetStream.
    pub js: jetstream::Context,
    /// The gateway's metrics.
    pub metrics: Arc<Metrics>,
    /// Name of this gateway node.
    pub node: String,
    /// Time an uplink gets to finish in-flight deliveries when it stops.
    pub uplink_grace: Duration,
    /// Device listeners, directory and Secrets shared by the adapters.
    pub hub: Arc<crate::adapters::hub::DeviceHub>,
}

struct Worker<S> {
    spec: S,
    cancel: CancellationToken,
    handle: JoinHandle<()>,
}

impl<S> Worker<S> {
    async fn stop(self) {
        self.cancel.cancel();
        let _ = self.handle.await;
    }
}

/// What an apply changed, by `namespace/name`.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Applied {
    /// Started.
    pub added: Vec<String>,
    /// Restarted with new settings.
    pub changed: Vec<String>,
    /// Stopped.
    pub removed: Vec<String>,
    /// Left running as they were.
    pub unchanged: usize,
}

impl Applied {
    /// Whether nothing changed.
    pub fn is_empty(&self) -> bool {
        self.added.is_empty() && self.changed.is_empty() && self.removed.is_empty()
    }
}

/// The apply was interrupted by shutdown before the buffer became reachable.
#[derive(Debug, thiserror::Error)]
#[error("stopped while waiting for the buffer")]
pub struct Interrupted;

/// The devices and uplinks running now.
pub struct Running {
    shared: Shared,
    sink: Option<ReadingSink>,
    routes: watch::Sender<Arc<Routes>>,
    devices: BTreeMap<String, Worker<Arc<GatewayDevice>>>,
    uplinks: BTreeMap<String, Worker<(GatewayUplink, u64)>>,
    version: Option<String>,
}

fn key(namespace: &str, name: &str) -> String {
    format!("{namespace}/{name}")
}

impl Running {
    /// Nothing running yet; readings go to `sink`, routes are published on `routes`.
    pub fn new(shared: Shared, sink: ReadingSink, routes: watch::Sender<Arc<Routes>>) -> Self {
        Self { shared, sink: Some(sink), routes, devices: BTreeMap::new(), uplinks: BTreeMap::new(), version: None }
    }

    /// The version of the applied config (the operator's content hash), if any.
    pub fn version(&self) -> Option<&str> {
        self.version.as_deref()
    }

    /// Makes the running gateway match `loaded`. Waits (retrying with backoff) until the
    /// buffer of every new or changed uplink is ready, unless `stop` fires first.
    pub async fn apply(&mut self, loaded: LoadedConfig, stop: &CancellationToken) -> Result<Applied, Interrupted> {
        let LoadedConfig { config, links } = loaded;
        let mut applied = Applied::default();
        let routes = Arc::new(Routes::new(&config));

        // 1. Buffers of new and changed uplinks.
        let wanted: HashMap<String, (&GatewayUplink, &LinkSettings, &Arc<UplinkBuffer>)> = config
            .uplinks
            .iter()
            .zip(&links)
            .zip(routes.buffers())
            .map(|((u, m), b)| (key(&u.namespace, &u.name), (u, m, b)))
            .collect();
        let fresh: Vec<(&Arc<UplinkBuffer>, &LinkSettings)> = wanted
            .iter()
            .filter(|(k, (u, m, _))| {
                self.uplinks.get(*k).is_none_or(|w| w.spec.0 != **u || w.spec.1 != m.fingerprint())
            })
            .map(|(_, (_, m, b))| (*b, *m))
            .collect();
        open_buffers(&self.shared.js, &fresh, stop).await?;

        // 2. Routes.
        self.routes.send_replace(Arc::clone(&routes));

        // 3. Uplinks.
        let running: Vec<String> = self.uplinks.keys().cloned().collect();
        let mut restarting = Vec::new();
        for k in running {
            let keep = wanted
                .get(&k)
                .zip(self.uplinks.get(&k))
                .is_some_and(|((u, m, _), w)| w.spec.0 == **u && w.spec.1 == m.fingerprint());
            if !keep && let Some(w) = self.uplinks.remove(&k) {
                w.stop().await;
                if wanted.contains_key(&k) {
                    info!(uplink = %k, "uplink changed; restarting it");
                    restarting.push(k);
                } else {
                    info!(uplink = %k, "uplink removed");
                    self.shared.metrics.forget_uplink(&k);
                    applied.removed.push(k);
                }
            }
        }
        for (k, (u, m, b)) in &wanted {
            if self.uplinks.contains_key(k) {
                applied.unchanged += 1;
                continue;
            }
            if restarting.contains(k) {
                applied.changed.push(k.clone());
            } else {
                applied.added.push(k.clone());
            }
            self.start_uplink(k.clone(), u, m, b);
        }

        // 4. Devices.
        let wanted_devices: HashMap<String, &GatewayDevice> =
            config.devices.iter().map(|d| (key(&d.namespace, &d.name), d)).collect();
        let running: Vec<String> = self.devices.keys().cloned().collect();
        let mut removed = Vec::new();
        for k in running {
            match wanted_devices.get(&k) {
                Some(d) if self.devices.get(&k).is_some_and(|w| *w.spec == **d) => {
                    applied.unchanged += 1;
                }
                Some(d) => {
                    if let Some(w) = self.devices.remove(&k) {
                        let protocol = w.spec.connection.protocol();
                        w.stop().await;
                        // Series labelled with the protocol it no longer speaks go.
                        if protocol != d.connection.protocol() {
                            self.shared.metrics.forget_device(&k, protocol);
                        }
                    }
                    info!(device = %k, "device changed; restarting it");
                    self.start_device(k.clone(), d);
                    applied.changed.push(k);
                }
                None => {
                    if let Some(w) = self.devices.remove(&k) {
                        // Stopped together below: one at a time, a thousand removals take
                        // a thousand round trips through the runtime.
                        w.cancel.cancel();
                        removed.push((k, w));
                    }
                }
            }
        }
        for (k, w) in removed {
            let protocol = w.spec.connection.protocol();
            w.stop().await;
            self.shared.metrics.forget_device(&k, protocol);
            self.shared.hub.forget_device(&k);
            info!(device = %k, "device removed");
            applied.removed.push(k);
        }
        for (k, d) in wanted_devices {
            if !self.devices.contains_key(&k) {
                self.start_device(k.clone(), d);
                applied.added.push(k);
            }
        }
        self.version = config.version.clone();
        Ok(applied)
    }

    fn start_uplink(&mut self, k: String, u: &GatewayUplink, m: &LinkSettings, b: &Arc<UplinkBuffer>) {
        let cancel = CancellationToken::new();
        let task = UplinkTask {
            uplink: Arc::new(u.clone()),
            buffer: UplinkBuffer::clone(b),
            link: m.clone(),
            js: self.shared.js.clone(),
            metrics: Arc::clone(&self.shared.metrics),
            node: self.shared.node.clone(),
            cancel: cancel.clone(),
            grace: self.shared.uplink_grace,
        };
        // Commands from the uplink's command topic, if it has one; stops with the uplink.
        crate::downlink::start(&task, &self.shared.hub);
        let handle = tokio::spawn(supervise(
            format!("uplink {k}"),
            Arc::clone(&self.shared.metrics),
            cancel.clone(),
            move || uplinks::run(task.clone()),
        ));
        self.uplinks.insert(k, Worker { spec: (u.clone(), m.fingerprint()), cancel, handle });
    }

    fn start_device(&mut self, k: String, d: &GatewayDevice) {
        let Some(sink) = &self.sink else { return };
        let cancel = CancellationToken::new();
        let device = Arc::new(d.clone());
        let task = DeviceTask {
            device: Arc::clone(&device),
            node: self.shared.node.clone(),
            sink: sink.clone(),
            metrics: Arc::clone(&self.shared.metrics),
            cancel: cancel.clone(),
            hub: Arc::clone(&self.shared.hub),
        };
        let handle = tokio::spawn(supervise(
            format!("device {k}"),
            Arc::clone(&self.shared.metrics),
            cancel.clone(),
            move || adapters::run(task.clone()),
        ));
        self.devices.insert(k, Worker { spec: device, cancel, handle });
    }

    /// Stops every device adapter and lets go of the reading sink, so the writer can drain.
    pub async fn stop_devices(&mut self) {
        for w in self.devices.values() {
            w.cancel.cancel();
        }
        for (_, w) in std::mem::take(&mut self.devices) {
            let _ = w.handle.await;
        }
        self.sink = None;
    }

    /// Stops every uplink; each finishes its in-flight deliveries within its grace.
    pub async fn stop_uplinks(&mut self) {
        for w in self.uplinks.values() {
            w.cancel.cancel();
        }
        for (_, w) in std::mem::take(&mut self.uplinks) {
            let _ = w.handle.await;
        }
    }
}

/// Prepares the streams and consumers of `buffers`, retrying with backoff until they are
/// ready or `stop` fires.
pub async fn open_buffers(
    js: &jetstream::Context,
    buffers: &[(&Arc<UplinkBuffer>, &LinkSettings)],
    stop: &CancellationToken,
) -> Result<(), Interrupted> {
    let mut delays = backoff(Duration::from_millis(200), Duration::from_secs(10));
    let mut i = 0;
    while i < buffers.len() {
        let (b, m) = buffers[i];
        let result = async {
            let mut s = b.ensure_stream(js).await?;
            uplinks::ensure_consumer(&mut s, b, u16::try_from(m.window()).unwrap_or(u16::MAX)).await
        }
        .await;
        match result {
            Ok(_) => i += 1,
            Err(e) => {
                warn!(uplink = %b.uplink, error = %e, "buffer not ready; retrying");
                let delay = delays.next().unwrap_or(Duration::from_secs(10));
                tokio::select! {
                    () = stop.cancelled() => return Err(Interrupted),
                    () = tokio::time::sleep(delay) => {}
                }
            }
        }
    }
    Ok(())
}
