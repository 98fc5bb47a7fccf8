//! A gateway whose device listeners (CoAP push, raw TCP, raw UDP) are on free loopback
//! ports: the [`Gateway`] guard's config, secrets and metrics, started with the listener
//! flags added to its command line.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitStatus;
use std::time::Duration;

use anyhow::{Context, Result, bail};

use crate::gateway::{READY_TIMEOUT, STOP_TIMEOUT};
use crate::metrics::http_get;
use crate::process::Proc;
use crate::{CloudSubscriber, Gateway, file_tail, free_port, wait_until};

/// A gateway process with device listeners. Killed on drop.
pub struct ListeningGateway {
    /// Config, secrets, metrics (its own process handle is unused).
    pub gw: Gateway,
    /// UDP address of the CoAP push listener.
    pub coap: SocketAddr,
    /// TCP address of the raw TCP listener.
    pub tcp: SocketAddr,
    /// UDP address of the raw UDP listener.
    pub udp: SocketAddr,
    extra: Vec<String>,
    proc: Option<Proc>,
}

impl ListeningGateway {
    /// Prepares a gateway using the NATS server at `nats_url`, listeners on free ports.
    pub fn new(nats_url: &str) -> Result<Self> {
        let port = || -> Result<SocketAddr> { Ok(SocketAddr::from(([127, 0, 0, 1], free_port()?))) };
        Ok(Self {
            gw: Gateway::new(nats_url)?,
            coap: port()?,
            tcp: port()?,
            udp: port()?,
            extra: Vec::new(),
            proc: None,
        })
    }

    /// Adds command-line arguments to later starts (such as `--first-frame-timeout 1s`).
    pub fn arg(&mut self, a: &str) -> &mut Self {
        self.extra.push(a.to_string());
        self
    }

    fn log_paths(&self) -> (PathBuf, PathBuf) {
        (self.gw.dir().join("listening.stdout"), self.gw.dir().join("listening.stderr"))
    }

    /// Starts and waits until `/readyz` answers 200.
    pub async fn start_ready(&mut self) -> Result<()> {
        self.kill();
        let mut cmd = self.gw.command();
        cmd.arg("--coap-listen").arg(self.coap.to_string());
        cmd.arg("--tcp-listen").arg(self.tcp.to_string());
        cmd.arg("--udp-listen").arg(self.udp.to_string());
        cmd.args(&self.extra);
        let (out, err) = self.log_paths();
        self.proc = Some(Proc::spawn("fieldgate-gateway", cmd, &out, &err)?);
        let listen = self.gw.listen();
        let proc = &mut self.proc;
        let r = wait_until("the gateway's /readyz to answer 200", READY_TIMEOUT, || {
            let exited = proc.as_mut().map(|p| p.try_status());
            async move {
                if let Some(Ok(Some(status))) = exited {
                    return Ok(Some(Err(anyhow::anyhow!("the gateway exited: {status}"))));
                }
                Ok(match http_get(listen, "/readyz").await {
                    Ok((200, _)) => Some(Ok(())),
                    _ => None,
                })
            }
        })
        .await
        .and_then(|inner| inner);
        r.map_err(|e| e.context(self.log()))
    }

    /// The process id, while running.
    pub fn pid(&self) -> Option<u32> {
        self.proc.as_ref().map(Proc::pid)
    }

    /// Resident memory of the process in KiB (`VmRSS`), while running.
    pub fn rss_kib(&self) -> Option<u64> {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid()?)).ok()?;
        status.lines().find_map(|l| l.strip_prefix("VmRSS:"))?.split_whitespace().next()?.parse().ok()
    }

    /// SIGKILL.
    pub fn kill(&mut self) {
        if let Some(mut p) = self.proc.take() {
            let _ = p.kill();
        }
    }

    /// SIGTERM and wait for the exit.
    pub async fn terminate(&mut self) -> Result<ExitStatus> {
        let Some(mut p) = self.proc.take() else { bail!("the gateway is not running") };
        let r = p.terminate(STOP_TIMEOUT).await;
        r.with_context(|| self.log())
    }

    /// The last lines of its logs.
    pub fn log(&self) -> String {
        let (out, err) = self.log_paths();
        format!("--- gateway stdout ---\n{}\n--- gateway stderr ---\n{}", file_tail(&out, 40), file_tail(&err, 80))
    }

    /// Everything it wrote on stderr.
    pub fn stderr(&self) -> String {
        std::fs::read_to_string(self.log_paths().1).unwrap_or_default()
    }

    /// One metric (sum over matching series), 0 when absent.
    pub async fn metric(&self, name: &str, labels: &[(&str, &str)]) -> Result<f64> {
        Ok(self.gw.metric(name, labels).await?.unwrap_or(0.0))
    }

    /// Waits until the metric (0 when absent) satisfies `pred`.
    pub async fn wait_metric<P: Fn(f64) -> bool>(
        &self,
        name: &str,
        labels: &[(&str, &str)],
        timeout: Duration,
        pred: P,
    ) -> Result<f64> {
        self.gw.wait_metric(name, labels, timeout, pred).await.map_err(|e| e.context(self.log()))
    }
}

/// Waits (up to a minute) until the cloud received `value` for point `name` of `device`; the
/// error carries the gateway's log.
pub async fn wait_value(
    cloud: &CloudSubscriber,
    gw: &ListeningGateway,
    device: &str,
    name: &str,
    value: serde_json::Value,
) -> Result<()> {
    cloud.wait_value(device, name, &value, Duration::from_secs(60)).await.with_context(|| gw.log())
}
