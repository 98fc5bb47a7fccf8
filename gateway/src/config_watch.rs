//! Watches the config file (standalone mode) and hands every changed, checked config to the
//! app, which applies it per device.
//!
//! The file is read every `interval` and compared by content (its text and the files of the
//! secrets directory; parsed only when they changed), not by modification events: a Kubernetes ConfigMap or Secret volume changes
//! by swapping a symlink, which inotify-style watchers easily miss, and a read every couple of
//! seconds costs nothing.

use std::hash::{Hash, Hasher};
use std::path::PathBuf;
use std::time::Duration;

use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

use crate::app::{AppError, LoadedConfig, load_config};
use crate::secrets::SecretStore;

/// A config the watcher found: checked and resolved, or refused with every problem.
pub type Candidate = Result<LoadedConfig, AppError>;

/// Hash of the config text and of every file in the secrets directory (`<secret>/<key>`):
/// cheap to compute, so the document is parsed only when something changed.
fn digest(text: &str, secrets: &SecretStore) -> u64 {
    let mut h = std::collections::hash_map::DefaultHasher::new();
    text.hash(&mut h);
    let mut files: Vec<PathBuf> = std::fs::read_dir(secrets.dir())
        .into_iter()
        .flatten()
        .flatten()
        .flat_map(|d| std::fs::read_dir(d.path()).into_iter().flatten().flatten().map(|f| f.path()))
        .collect();
    files.sort();
    for f in files {
        f.hash(&mut h);
        std::fs::read(&f).unwrap_or_default().hash(&mut h);
    }
    h.finish()
}

/// Polls `path` until `cancel` fires; sends each config that differs from the last one seen.
/// `initial` is the digest of the config already applied (see [`file_digest`]).
pub async fn watch_file(
    path: PathBuf,
    node: String,
    secrets: SecretStore,
    interval: Duration,
    initial: u64,
    tx: mpsc::Sender<Candidate>,
    cancel: CancellationToken,
) {
    let mut last = initial;
    let mut tick = tokio::time::interval(interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    loop {
        tokio::select! {
            () = cancel.cancelled() => return,
            _ = tick.tick() => {}
        }
        let text = match std::fs::read_to_string(&path) {
            Ok(t) => t,
            Err(e) => {
                debug!(config = %path.display(), error = %e, "config file unreadable; keeping the running config");
                continue;
            }
        };
        let d = digest(&text, &secrets);
        if d == last {
            continue;
        }
        last = d;
        // Off the runtime: a config of thousands of devices takes a while to check, and
        // /metrics, probes and the devices go on meanwhile.
        let (p, n, s) = (path.clone(), node.clone(), secrets.clone());
        let loaded = match tokio::task::spawn_blocking(move || load_config(&p, &n, &s)).await {
            Ok(loaded) => loaded,
            Err(e) => {
                warn!(config = %path.display(), error = %e, "checking the config failed; keeping the running config");
                continue;
            }
        };
        if tx.send(loaded).await.is_err() {
            warn!("config watcher stopped: nobody applies configs any more");
            return;
        }
    }
}

/// The digest of the file's current content and secrets, as [`watch_file`] computes it.
pub fn file_digest(path: &std::path::Path, secrets: &SecretStore) -> u64 {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    digest(&text, secrets)
}
