//! A child process held by the harness: killed on drop, signalled by its own PID only.

use std::fs::{File, OpenOptions};
use std::path::Path;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::Duration;

use anyhow::{Context, Result, bail};

use crate::wait_until;

/// A running child process with its stdout and stderr appended to files.
#[derive(Debug)]
pub struct Proc {
    name: String,
    child: Child,
}

impl Proc {
    /// Spawns `cmd` with stdout and stderr appended to `stdout` and `stderr` (created if needed).
    pub fn spawn(name: &str, mut cmd: Command, stdout: &Path, stderr: &Path) -> Result<Self> {
        let out = append(stdout)?;
        let err = append(stderr)?;
        let child = cmd
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .spawn()
            .with_context(|| format!("spawning {name}: {cmd:?}"))?;
        Ok(Self { name: name.to_string(), child })
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The exit status if the process has ended.
    pub fn try_status(&mut self) -> Result<Option<ExitStatus>> {
        Ok(self.child.try_wait()?)
    }

    /// SIGKILL, then reap it.
    pub fn kill(&mut self) -> Result<ExitStatus> {
        if let Some(status) = self.child.try_wait()? {
            return Ok(status);
        }
        // ESRCH (already gone) is fine: wait() below reaps it either way.
        let _ = self.child.kill();
        Ok(self.child.wait()?)
    }

    /// Sends `signal` (such as `TERM`) to this process only.
    pub fn signal(&mut self, signal: &str) -> Result<()> {
        if self.child.try_wait()?.is_some() {
            return Ok(());
        }
        let status = Command::new("kill")
            .arg(format!("-{signal}"))
            .arg(self.pid().to_string())
            .status()
            .with_context(|| format!("running kill -{signal} {}", self.pid()))?;
        if !status.success() && self.child.try_wait()?.is_none() {
            bail!("kill -{signal} {} ({}) failed: {status}", self.pid(), self.name);
        }
        Ok(())
    }

    /// Waits (polling) until the process exits, at most `timeout`.
    pub async fn wait_exit(&mut self, timeout: Duration) -> Result<ExitStatus> {
        let name = format!("{} (pid {}) to exit", self.name, self.pid());
        let child = &mut self.child;
        let mut check = move || {
            let r = child.try_wait().map_err(anyhow::Error::from);
            async move { r }
        };
        wait_until(&name, timeout, &mut check).await
    }

    /// SIGTERM, then wait for the exit at most `timeout`.
    pub async fn terminate(&mut self, timeout: Duration) -> Result<ExitStatus> {
        self.signal("TERM")?;
        self.wait_exit(timeout).await
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.kill();
    }
}

fn append(path: &Path) -> Result<File> {
    OpenOptions::new().create(true).append(true).open(path).with_context(|| format!("opening {}", path.display()))
}
