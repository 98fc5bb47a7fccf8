//! End-to-end test harness: real `nats-server` and `mosquitto` processes, the real
//! `fieldgate-gateway` binary, the project's device simulator in-process, and a cloud-side MQTT
//! subscriber that records everything it receives.
//!
//! Every process is held by an RAII guard that kills it in `Drop`, listens on a free port of
//! 127.0.0.1 and keeps its files (config, store, logs) in its own temp dir. Nothing waits a fixed
//! time: [`wait_until`] polls a condition until a deadline.
//!
//! The same harness serves the tests in `tests/` and benchmark binaries.
//!
//! Environment: `FIELDGATE_NATS_SERVER`, `FIELDGATE_MOSQUITTO`, `FIELDGATE_GATEWAY_BIN` point at
//! the binaries (defaults: `<repo>/.venv/bin/nats-server`, `/usr/sbin/mosquitto`, the gateway
//! next to the test executable, then `PATH`); `FIELDGATE_KEEP_TEST_DIRS=1` keeps every temp dir
//! (configs, JetStream stores, logs) for a post-mortem.

#![cfg_attr(test, allow(clippy::unwrap_used, clippy::expect_used))]

pub mod api;
pub mod bench_nats;
pub mod certs;
pub mod chromium;
pub mod cloud;
pub mod cloud_v5;
pub mod cluster;
pub mod coap_peer;
pub mod commands;
pub mod config;
pub mod decode;
pub mod delivery;
pub mod fleet;
pub mod gateway;
pub mod http_cloud;
pub mod listening;
pub mod metrics;
pub mod mosquitto;
pub mod nats;
pub mod nats_proxy;
pub mod operator_bench;
pub mod otlp;
pub mod process;
pub mod procstat;
pub mod prometheus;
pub mod pymodbus;
pub mod sim_process;
pub mod tahu;

use std::future::Future;
use std::net::{Ipv4Addr, SocketAddr, TcpListener};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use tokio::time::Instant;

pub use cloud::{CloudMessage, CloudSubscriber};
pub use config::{ConfigBuilder, stream_name, stream_subject};
pub use decode::{CloudDecoder, Decoded};
pub use delivery::{DeliveryReport, ServedLog, delivery_report};
pub use fleet::SimFleet;
pub use gateway::Gateway;
pub use metrics::metric;
pub use mosquitto::{Mosquitto, MosquittoOptions, MosquittoTls};
pub use nats::NatsServer;

/// A port on 127.0.0.1 that nothing used (TCP or UDP) a moment ago.
///
/// Taken below the kernel's ephemeral range (32768–60999 by default), from a spot that differs
/// per process and call: a port from `bind(0)` can be handed to another socket's outgoing
/// connection before the process under test binds it (seen as "Address already in use").
pub fn free_port() -> Result<u16> {
    use std::sync::atomic::{AtomicU32, Ordering};
    static CALLS: AtomicU32 = AtomicU32::new(0);
    const LOW: u32 = 10_000;
    const SPAN: u32 = 22_000;
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.subsec_nanos());
    let start = nanos
        ^ std::process::id().wrapping_mul(2_654_435_761)
        ^ CALLS.fetch_add(1, Ordering::Relaxed).wrapping_mul(7_919);
    for i in 0..SPAN {
        let Ok(port) = u16::try_from(LOW + (start.wrapping_add(i * 7_919)) % SPAN) else { continue };
        let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
        if TcpListener::bind(addr).is_ok() && std::net::UdpSocket::bind(addr).is_ok() {
            return Ok(port);
        }
    }
    let listener = TcpListener::bind(SocketAddr::from((Ipv4Addr::LOCALHOST, 0)))
        .context("binding 127.0.0.1:0 to find a free port")?;
    Ok(listener.local_addr()?.port())
}

/// A temp dir named `<prefix>XXXX`, removed on drop unless env `FIELDGATE_KEEP_TEST_DIRS` is
/// set (then logs, configs and stores stay for a post-mortem).
pub fn temp_dir(prefix: &str) -> Result<tempfile::TempDir> {
    let keep = std::env::var_os("FIELDGATE_KEEP_TEST_DIRS").is_some_and(|v| !v.is_empty() && v != "0");
    tempfile::Builder::new()
        .prefix(prefix)
        .disable_cleanup(keep)
        .tempdir()
        .with_context(|| format!("creating a temp dir {prefix}*"))
}

/// Interval between two checks of a polled condition.
pub const POLL_INTERVAL: Duration = Duration::from_millis(100);

/// Calls `check` every [`POLL_INTERVAL`] until it returns `Some`, or fails after `timeout` with
/// `what` and the last value `describe` gave (so a failure says how far it got).
pub async fn wait_until<T, F, Fut>(what: &str, timeout: Duration, mut check: F) -> Result<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<Option<T>>>,
{
    let deadline = Instant::now() + timeout;
    let mut last_err = None;
    loop {
        match check().await {
            Ok(Some(v)) => return Ok(v),
            Ok(None) => {}
            Err(e) => last_err = Some(e),
        }
        if Instant::now() >= deadline {
            match last_err {
                Some(e) => bail!("timed out after {timeout:?} waiting for {what}; last error: {e:#}"),
                None => bail!("timed out after {timeout:?} waiting for {what}"),
            }
        }
        tokio::time::sleep(POLL_INTERVAL).await;
    }
}

/// Whether this process runs as root (effective uid 0), read from `/proc/self/status`.
pub fn running_as_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("Uid:"))
                .and_then(|rest| rest.split_whitespace().nth(1).map(|euid| euid == "0"))
        })
        .unwrap_or(false)
}

/// The last `max_lines` lines of a text file, or a note why it could not be read.
pub fn file_tail(path: &std::path::Path, max_lines: usize) -> String {
    match std::fs::read(path) {
        Ok(bytes) => {
            let text = String::from_utf8_lossy(&bytes);
            let lines: Vec<&str> = text.lines().collect();
            let start = lines.len().saturating_sub(max_lines);
            lines[start..].join("\n")
        }
        Err(e) => format!("(cannot read {}: {e})", path.display()),
    }
}

/// Finds an executable: the path in env `env_var` if set, else the first of `candidates` that
/// exists, else `name` on `PATH`.
pub fn find_executable(env_var: &str, candidates: &[std::path::PathBuf], name: &str) -> Result<std::path::PathBuf> {
    if let Some(p) = std::env::var_os(env_var) {
        let p = std::path::PathBuf::from(p);
        if p.is_file() {
            return Ok(p);
        }
        bail!("{env_var}={} is not a file", p.display());
    }
    if let Some(p) = candidates.iter().find(|p| p.is_file()) {
        return Ok(p.clone());
    }
    if let Some(path) = std::env::var_os("PATH") {
        for dir in std::env::split_paths(&path) {
            let p = dir.join(name);
            if p.is_file() {
                return Ok(p);
            }
        }
    }
    bail!("{name} not found: set {env_var}, or install it (scripts/setup.sh); looked in {candidates:?} and PATH")
}

/// The workspace root (the parent of this crate's directory).
pub fn workspace_root() -> std::path::PathBuf {
    let here = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    here.parent().map(std::path::Path::to_path_buf).unwrap_or_else(|| here.to_path_buf())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn free_ports_can_be_bound_and_lie_below_the_ephemeral_range() {
        let ports: Vec<u16> = (0..20).map(|_| free_port().unwrap()).collect();
        for &port in &ports {
            TcpListener::bind(("127.0.0.1", port)).unwrap();
            assert!((10_000..32_000).contains(&port), "{port}");
        }
        let distinct: std::collections::BTreeSet<_> = ports.iter().collect();
        assert!(distinct.len() > 15, "{ports:?}");
    }

    #[tokio::test]
    async fn wait_until_reports_what_it_waited_for() {
        let err = wait_until("the impossible", Duration::from_millis(300), async || Ok(None::<()>)).await.unwrap_err();
        assert!(err.to_string().contains("the impossible"), "{err}");
        let mut n = 0;
        let v = wait_until("three calls", Duration::from_secs(30), || {
            n += 1;
            let done = n >= 3;
            async move { Ok(done.then_some(n)) }
        })
        .await
        .unwrap();
        assert_eq!(v, 3);
    }
}
