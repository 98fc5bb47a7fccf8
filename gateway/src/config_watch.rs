//! Watches the config file (standalone mode) and hands every changed, checked config to the
//! app, which applies it per device.
//!
//! Changes are seen through file-system events (inotify on Linux, through the `notify`
//! crate): the config file's directory and the secrets directory are watched, not the files
//! themselves, because a Kubernetes ConfigMap or Secret volume changes by swapping a `..data`
//! symlink inside the mounted directory, which a watch on the file would miss. After an event
//! the files are read and compared by content (the config text and every file of the secrets
//! directory; parsed only when they changed). A slow re-read (`resync`, 60 s by default)
//! catches anything the events missed (a secrets directory created after the start, a
//! watch the kernel refused); nothing is read while nothing happens.

use std::ffi::OsStr;
use std::hash::{Hash, Hasher};
use std::path::{Path, PathBuf};
use std::time::Duration;

use notify::{EventKind, RecommendedWatcher, RecursiveMode, Watcher};
use tokio::sync::mpsc;
use tokio::time::{Instant, MissedTickBehavior};
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

use crate::app::{AppError, LoadedConfig, load_config};
use crate::secrets::SecretStore;

/// A config the watcher found: checked and resolved, or refused with every problem.
pub type Candidate = Result<LoadedConfig, AppError>;

/// After an event, the watcher waits until the directory has been quiet this long (a writer
/// may still be writing) before it reads ...
const SETTLE: Duration = Duration::from_millis(50);
/// ... but never longer than this after the first event.
const SETTLE_MAX: Duration = Duration::from_secs(1);

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

/// Whether a file-system event may change what [`digest`] sees: anything under the secrets
/// directory; in the config file's directory the file itself and Kubernetes' `..data`
/// symlink and `..<timestamp>` directories (not, say, a log file written next to it). Reads
/// (our own included) are no change.
fn relevant(event: &notify::Event, config_dir: &Path, config_name: Option<&OsStr>, secrets: &Path) -> bool {
    if matches!(event.kind, EventKind::Access(_)) {
        return false;
    }
    event.paths.iter().any(|p| {
        if p.starts_with(secrets) {
            return true;
        }
        let name = p.file_name();
        p.parent() == Some(config_dir)
            && (name == config_name || name.is_some_and(|n| n.as_encoded_bytes().starts_with(b"..")))
    })
}

/// Watches the config file's directory (and the secrets directory, recursively, where it
/// exists); each relevant event wakes `wake` (coalesced: a full channel already means "look").
fn watch(config: &Path, secrets: &Path, wake: mpsc::Sender<()>) -> notify::Result<RecommendedWatcher> {
    let config_dir = config.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new(".")).to_path_buf();
    let config_name = config.file_name().map(OsStr::to_os_string);
    let secrets_dir = secrets.to_path_buf();
    let dir = config_dir.clone();
    let mut watcher = notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
        // An error (such as an event queue overflow) may hide a change: look.
        if event.is_err() || event.as_ref().is_ok_and(|e| relevant(e, &dir, config_name.as_deref(), &secrets_dir)) {
            let _ = wake.try_send(());
        }
    })?;
    watcher.watch(&config_dir, RecursiveMode::NonRecursive)?;
    if secrets.is_dir() {
        watcher.watch(secrets, RecursiveMode::Recursive)?;
    }
    Ok(watcher)
}

/// Waits until `cancel` fires; sends each config that differs from the last one seen, looking
/// after file-system events and every `resync`. `initial` is the digest of the config already
/// applied (see [`file_digest`]).
pub async fn watch_file(
    path: PathBuf,
    node: String,
    secrets: SecretStore,
    resync: Duration,
    initial: u64,
    tx: mpsc::Sender<Candidate>,
    cancel: CancellationToken,
) {
    let (wake_tx, mut wake_rx) = mpsc::channel(1);
    let _watcher = match watch(&path, secrets.dir(), wake_tx) {
        Ok(w) => Some(w),
        Err(e) => {
            warn!(config = %path.display(), error = %e, ?resync, "config changes cannot be watched; re-reading the config only every resync interval");
            None
        }
    };
    let mut last = initial;
    let mut tick = tokio::time::interval_at(Instant::now() + resync, resync);
    tick.set_missed_tick_behavior(MissedTickBehavior::Skip);
    loop {
        tokio::select! {
            () = cancel.cancelled() => return,
            _ = tick.tick() => {}
            Some(()) = wake_rx.recv() => {
                let deadline = Instant::now() + SETTLE_MAX;
                while let Ok(Some(())) = tokio::time::timeout_at(deadline.min(Instant::now() + SETTLE), wake_rx.recv()).await {}
            }
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
