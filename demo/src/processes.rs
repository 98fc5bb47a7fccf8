//! The processes the demo starts: each logs to its own file in the work dir, is watched for an
//! unexpected exit, and is stopped by its own process id (SIGTERM, then SIGKILL).

use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use tokio::process::{Child, Command};

/// How long a process may take to stop after SIGTERM.
const STOP_TIMEOUT: Duration = Duration::from_secs(25);

/// One started process.
struct Running {
    name: &'static str,
    child: Child,
    log: PathBuf,
}

/// A process that exited on its own.
#[derive(Debug)]
pub struct Exited {
    /// Which one.
    pub name: &'static str,
    /// Its exit status.
    pub status: ExitStatus,
    /// The last lines of its log.
    pub log_tail: String,
    /// Its log file.
    pub log: PathBuf,
}

impl std::fmt::Display for Exited {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(f, "{} exited ({}); the end of {}:", self.name, self.status, self.log.display())?;
        write!(f, "{}", self.log_tail)
    }
}

/// The last `n` lines of a file.
pub fn tail(path: &Path, n: usize) -> String {
    let text = std::fs::read(path).map(|b| String::from_utf8_lossy(&b).into_owned()).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].iter().map(|l| format!("  | {l}\n")).collect()
}

/// The started processes, in start order.
#[derive(Default)]
pub struct Processes {
    running: Vec<Running>,
}

impl Processes {
    /// Starts `cmd` as `name`, its stdout and stderr appended to `log`.
    pub fn spawn(&mut self, name: &'static str, mut cmd: Command, log: &Path) -> Result<()> {
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)
            .with_context(|| format!("opening {}", log.display()))?;
        let child = cmd
            .stdin(Stdio::null())
            .stdout(file.try_clone()?)
            .stderr(file)
            // Its own process group: Ctrl-C on the terminal reaches the demo, which stops the
            // processes in order, not every process at once.
            .process_group(0)
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("starting {name}: {cmd:?}"))?;
        self.running.push(Running { name, child, log: log.to_path_buf() });
        Ok(())
    }

    /// A process that has exited since the last check (it is forgotten).
    pub fn check(&mut self) -> Option<Exited> {
        let i = self.running.iter_mut().position(|r| matches!(r.child.try_wait(), Ok(Some(_)) | Err(_)))?;
        let mut r = self.running.remove(i);
        let status = match r.child.try_wait() {
            Ok(Some(s)) => s,
            _ => return None,
        };
        Some(Exited { name: r.name, status, log_tail: tail(&r.log, 15), log: r.log })
    }

    /// Stops `name` (SIGTERM, then SIGKILL after a while) and forgets it.
    pub async fn stop(&mut self, name: &str) -> Result<()> {
        let Some(i) = self.running.iter().position(|r| r.name == name) else {
            bail!("{name} is not running");
        };
        let r = self.running.remove(i);
        stop(r).await
    }

    /// Stops every process, the last started first (the gateway before the brokers, so it
    /// can finish its in-flight deliveries).
    pub async fn stop_all(&mut self) {
        while let Some(r) = self.running.pop() {
            let _ = stop(r).await;
        }
    }
}

async fn stop(mut r: Running) -> Result<()> {
    if r.child.try_wait()?.is_some() {
        return Ok(());
    }
    if let Some(pid) = r.child.id() {
        let _ = Command::new("kill").arg("-TERM").arg(pid.to_string()).status().await;
    }
    if tokio::time::timeout(STOP_TIMEOUT, r.child.wait()).await.is_err() {
        r.child.kill().await?;
    }
    Ok(())
}
