//! The real `fieldgate-gateway` binary as a child process.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use tempfile::TempDir;

use crate::metrics::{http_get, metric};
use crate::process::Proc;
use crate::{file_tail, free_port, wait_until};

/// How long the gateway may take to become ready on a busy machine.
pub const READY_TIMEOUT: Duration = Duration::from_secs(60);
/// How long a graceful stop may take (the gateway's own grace period is shorter).
pub const STOP_TIMEOUT: Duration = Duration::from_secs(60);
/// The `--node` the harness passes.
pub const NODE: &str = "test-node";

/// Locates `fieldgate-gateway`: env `FIELDGATE_GATEWAY_BIN`, else next to the running test
/// executable (`target/<profile>/deps/x` → `target/<profile>/fieldgate-gateway`).
pub fn gateway_binary() -> Result<PathBuf> {
    workspace_binary("fieldgate-gateway", "FIELDGATE_GATEWAY_BIN")
}

/// Locates a binary of this workspace: env `env_var`, else next to the running test
/// executable (`target/<profile>/deps/x` → `target/<profile>/<name>`).
pub fn workspace_binary(name: &str, env_var: &str) -> Result<PathBuf> {
    if let Some(p) = std::env::var_os(env_var) {
        let p = PathBuf::from(p);
        if p.is_file() {
            return Ok(p);
        }
        bail!("{env_var}={} is not a file", p.display());
    }
    let exe = std::env::current_exe().context("locating the test executable")?;
    let mut candidates = Vec::new();
    if let Some(dir) = exe.parent() {
        candidates.push(dir.join(name));
        if let Some(profile_dir) = dir.parent() {
            candidates.push(profile_dir.join(name));
        }
    }
    match candidates.iter().find(|p| p.is_file()) {
        Some(p) => Ok(p.clone()),
        None => bail!(
            "{name} binary not found (looked at {candidates:?}); run `cargo build --workspace --bins` first, or set \
             {env_var}"
        ),
    }
}

/// A gateway process with its config, secrets dir and logs in a temp dir. Killed on drop.
#[derive(Debug)]
pub struct Gateway {
    // First: dropped (killed) before the temp dir is removed.
    proc: Option<Proc>,
    dir: TempDir,
    binary: PathBuf,
    nats_url: String,
    listen: SocketAddr,
    starts: u32,
    extra_args: Vec<String>,
    extra_env: Vec<(String, String)>,
}

impl Gateway {
    /// Prepares (does not start) a gateway that will use the NATS server at `nats_url`.
    pub fn new(nats_url: &str) -> Result<Self> {
        let dir = crate::temp_dir("fieldgate-gateway-")?;
        std::fs::create_dir_all(dir.path().join("secrets"))?;
        Ok(Self {
            dir,
            binary: gateway_binary()?,
            nats_url: nats_url.to_string(),
            listen: SocketAddr::from(([127, 0, 0, 1], free_port()?)),
            proc: None,
            starts: 0,
            extra_args: Vec::new(),
            extra_env: Vec::new(),
        })
    }

    /// Adds a command-line argument to later starts (such as `--api-token-file=...`).
    pub fn arg(&mut self, a: impl Into<String>) -> &mut Self {
        self.extra_args.push(a.into());
        self
    }

    /// Turns `/api/v1` on for later starts: writes `token` to a file in the gateway's dir and
    /// passes it as `--api-token-file`.
    pub fn api_token(&mut self, token: &str) -> Result<&mut Self> {
        let file = self.dir.path().join("api-token");
        std::fs::write(&file, format!("{token}\n")).context("writing the API token file")?;
        Ok(self.arg(format!("--api-token-file={}", file.display())))
    }

    /// Sets an environment variable for later starts (such as `OTEL_EXPORTER_OTLP_ENDPOINT`).
    pub fn env(&mut self, key: impl Into<String>, value: impl Into<String>) -> &mut Self {
        self.extra_env.push((key.into(), value.into()));
        self
    }

    /// Writes the config file the gateway reads (`--config`).
    pub fn write_config(&self, yaml: &str) -> Result<()> {
        std::fs::write(self.config_path(), yaml).context("writing the gateway config")
    }

    /// Writes one key of a Secret: `<secrets-dir>/<name>/<key>`.
    pub fn write_secret(&self, name: &str, key: &str, value: impl AsRef<[u8]>) -> Result<()> {
        let d = self.secrets_dir().join(name);
        std::fs::create_dir_all(&d)?;
        std::fs::write(d.join(key), value).with_context(|| format!("writing secret {name}/{key}"))
    }

    /// Path of the config file.
    pub fn config_path(&self) -> PathBuf {
        self.dir.path().join("config.yaml")
    }

    /// The `--secrets-dir`.
    pub fn secrets_dir(&self) -> PathBuf {
        self.dir.path().join("secrets")
    }

    /// The temp dir of this gateway.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// The management listen address (`--listen`).
    pub fn listen(&self) -> SocketAddr {
        self.listen
    }

    /// Points the next start at another NATS URL.
    pub fn set_nats_url(&mut self, url: &str) {
        self.nats_url = url.to_string();
    }

    /// The command line of a start.
    pub fn command(&self) -> Command {
        let mut cmd = Command::new(&self.binary);
        cmd.arg("--config")
            .arg(self.config_path())
            .arg("--nats-url")
            .arg(&self.nats_url)
            .arg("--listen")
            .arg(self.listen.to_string())
            .arg("--secrets-dir")
            .arg(self.secrets_dir())
            .arg("--node")
            .arg(NODE);
        cmd.env("NO_COLOR", "1");
        if std::env::var_os("RUST_LOG").is_none() {
            cmd.env("RUST_LOG", "info");
        }
        cmd.args(&self.extra_args);
        cmd.envs(self.extra_env.iter().map(|(k, v)| (k, v)));
        cmd
    }

    /// Starts the process (after killing a previous one) without waiting for readiness.
    pub fn start(&mut self) -> Result<()> {
        self.kill()?;
        self.starts += 1;
        let marker = format!("=== harness: start #{} ===\n", self.starts);
        for f in [self.stdout_path(), self.stderr_path()] {
            use std::io::Write as _;
            let mut file = std::fs::OpenOptions::new().create(true).append(true).open(&f)?;
            file.write_all(marker.as_bytes())?;
        }
        self.proc = Some(Proc::spawn("fieldgate-gateway", self.command(), &self.stdout_path(), &self.stderr_path())?);
        Ok(())
    }

    /// Starts and waits until `/readyz` answers 200.
    pub async fn start_ready(&mut self) -> Result<()> {
        self.start()?;
        self.wait_ready().await
    }

    /// The process id, while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.proc.as_ref().map(Proc::pid)
    }

    /// Whether the process is running.
    pub fn is_running(&mut self) -> bool {
        self.proc.as_mut().is_some_and(|p| matches!(p.try_status(), Ok(None)))
    }

    /// SIGKILL (a crash) and reap.
    pub fn kill(&mut self) -> Result<()> {
        if let Some(mut p) = self.proc.take() {
            p.kill()?;
        }
        Ok(())
    }

    /// SIGTERM (graceful stop) and wait for the exit.
    pub async fn terminate(&mut self) -> Result<ExitStatus> {
        self.terminate_within(STOP_TIMEOUT).await
    }

    /// SIGTERM and wait at most `timeout` for the exit.
    pub async fn terminate_within(&mut self, timeout: Duration) -> Result<ExitStatus> {
        let Some(mut p) = self.proc.take() else {
            bail!("the gateway is not running");
        };
        let r = p.terminate(timeout).await;
        r.with_context(|| format!("stopping the gateway\n{}", self.log()))
    }

    /// Waits for the process to exit on its own.
    pub async fn wait_exit(&mut self, timeout: Duration) -> Result<ExitStatus> {
        let Some(mut p) = self.proc.take() else {
            bail!("the gateway is not running");
        };
        match p.wait_exit(timeout).await {
            Ok(s) => Ok(s),
            Err(e) => {
                self.proc = Some(p);
                Err(e.context(self.log()))
            }
        }
    }

    fn stdout_path(&self) -> PathBuf {
        self.dir.path().join("gateway.stdout")
    }

    fn stderr_path(&self) -> PathBuf {
        self.dir.path().join("gateway.stderr")
    }

    /// Everything the gateway wrote on stderr (all starts).
    pub fn stderr(&self) -> String {
        std::fs::read_to_string(self.stderr_path()).unwrap_or_default()
    }

    /// Everything the gateway wrote on stdout (all starts).
    pub fn stdout(&self) -> String {
        std::fs::read_to_string(self.stdout_path()).unwrap_or_default()
    }

    /// The last lines of both logs, for assertion messages.
    pub fn log(&self) -> String {
        format!(
            "--- gateway stdout ({}) ---\n{}\n--- gateway stderr ({}) ---\n{}",
            self.stdout_path().display(),
            file_tail(&self.stdout_path(), 60),
            self.stderr_path().display(),
            file_tail(&self.stderr_path(), 60)
        )
    }

    /// `GET /metrics`.
    pub async fn metrics_text(&self) -> Result<String> {
        let (code, body) = http_get(self.listen, "/metrics").await?;
        if code != 200 {
            bail!("GET /metrics answered {code}: {body}");
        }
        Ok(body)
    }

    /// One metric (sum over matching series) from a fresh scrape.
    pub async fn metric(&self, name: &str, labels: &[(&str, &str)]) -> Result<Option<f64>> {
        Ok(metric(&self.metrics_text().await?, name, labels))
    }

    /// Waits until the metric (0 when absent) satisfies `pred`; returns its value.
    pub async fn wait_metric<P>(&self, name: &str, labels: &[(&str, &str)], timeout: Duration, pred: P) -> Result<f64>
    where
        P: Fn(f64) -> bool,
    {
        let what = format!("{name}{labels:?} to reach the expected value");
        let r = wait_until(&what, timeout, || async {
            let v = self.metric(name, labels).await?.unwrap_or(0.0);
            Ok(pred(v).then_some(v))
        })
        .await;
        r.map_err(|e| e.context(self.log()))
    }

    /// Waits until `/readyz` answers 200 (fails early if the process exits).
    pub async fn wait_ready(&mut self) -> Result<()> {
        let listen = self.listen;
        let proc = &mut self.proc;
        let r = wait_until("the gateway's /readyz to answer 200", READY_TIMEOUT, || {
            let exited = proc.as_mut().map(|p| p.try_status());
            async move {
                // Stop waiting at once when the process is gone.
                match exited {
                    None => return Ok(Some(Err(anyhow::anyhow!("the gateway is not running")))),
                    Some(Ok(Some(status))) => {
                        return Ok(Some(Err(anyhow::anyhow!("the gateway exited: {status}"))));
                    }
                    _ => {}
                }
                Ok(match http_get(listen, "/readyz").await {
                    Ok((200, _)) => Some(Ok(())),
                    _ => None,
                })
            }
        })
        .await;
        r.and_then(|inner| inner).map_err(|e| e.context(self.log()))
    }
}
