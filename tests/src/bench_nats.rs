//! A `nats-server` for benchmarks whose JetStream `sync_interval` is chosen (the test guard
//! [`crate::NatsServer`] always uses `always`): to separate the cost of an fsync per message
//! from the gateway's own cost.

use std::process::Command;
use std::time::Duration;

use anyhow::Result;
use tempfile::TempDir;

use crate::nats::nats_server_binary;
use crate::process::Proc;
use crate::{free_port, wait_until};

/// A nats-server with JetStream in a temp dir. Killed on drop.
pub struct BenchNats {
    _dir: TempDir,
    port: u16,
    _proc: Proc,
}

impl BenchNats {
    /// Starts one; `sync` is the `sync_interval` (`always`, `2m`, ...), `None` for the server default.
    pub async fn start(sync: Option<&str>) -> Result<Self> {
        let dir = tempfile::Builder::new().prefix("fieldgate-bench-nats-").tempdir()?;
        let port = free_port()?;
        let store = dir.path().join("store");
        let sync = sync.map(|s| format!("  sync_interval: {s}\n")).unwrap_or_default();
        let config =
            format!("listen: 127.0.0.1:{port}\njetstream {{\n  store_dir: \"{}\"\n{sync}}}\n", store.display());
        std::fs::write(dir.path().join("nats.conf"), config)?;
        let mut cmd = Command::new(nats_server_binary()?);
        cmd.arg("-c").arg(dir.path().join("nats.conf")).env("GOMAXPROCS", crate::nats::NATS_GOMAXPROCS);
        let proc = Proc::spawn("nats-server", cmd, &dir.path().join("stdout"), &dir.path().join("stderr"))?;
        wait_until("nats-server to listen", Duration::from_secs(30), || async move {
            Ok(std::net::TcpStream::connect(("127.0.0.1", port)).is_ok().then_some(()))
        })
        .await?;
        Ok(Self { _dir: dir, port, _proc: proc })
    }

    /// The server's process id.
    pub fn pid(&self) -> u32 {
        self._proc.pid()
    }

    /// `nats://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }
}
