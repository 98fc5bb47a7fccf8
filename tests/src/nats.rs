//! `nats-server` with JetStream on a free port, its store in a temp dir.

use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{Context, Result, anyhow, bail};
use futures::TryStreamExt;
use tempfile::TempDir;

use crate::process::Proc;
use crate::{file_tail, find_executable, free_port, wait_until, workspace_root};

/// How long a nats-server may take to start on a busy machine.
pub const STARTUP_TIMEOUT: Duration = Duration::from_secs(60);

/// A nats-server process with JetStream (file storage, `sync_interval: always`, so a SIGKILL
/// loses nothing it acknowledged). Killed on drop; its store survives [`NatsServer::kill`] and
/// [`NatsServer::start_again`].
#[derive(Debug)]
pub struct NatsServer {
    // First: dropped (killed) before the temp dir is removed.
    proc: Option<Proc>,
    dir: TempDir,
    port: u16,
    monitor_port: u16,
    binary: PathBuf,
}

/// The nats-server binary: env `FIELDGATE_NATS_SERVER`, else `<repo>/.venv/bin/nats-server`,
/// else `PATH`.
pub fn nats_server_binary() -> Result<PathBuf> {
    find_executable("FIELDGATE_NATS_SERVER", &[workspace_root().join(".venv/bin/nats-server")], "nats-server")
}

/// Settings of a test nats-server beyond the defaults.
#[derive(Clone, Debug, Default)]
pub struct NatsOptions {
    /// `max_payload`: the largest message the server (and its clients) take.
    pub max_payload: Option<usize>,
}

/// nats-server runs with one Go scheduler thread, as the chart runs it (`nats.goMaxProcs`): at
/// edge loads its runtime then spends less waking threads (`fieldgate-bench --scenario
/// mqtt-ingest`: about a sixth less nats-server CPU per message).
pub const NATS_GOMAXPROCS: &str = "1";

impl NatsServer {
    /// Starts a fresh server and waits until JetStream answers.
    pub async fn start() -> Result<Self> {
        Self::start_with(NatsOptions::default()).await
    }

    /// [`NatsServer::start`] with `options`.
    pub async fn start_with(options: NatsOptions) -> Result<Self> {
        let dir = crate::temp_dir("fieldgate-nats-")?;
        let port = free_port()?;
        let monitor_port = free_port()?;
        let store = dir.path().join("store");
        std::fs::create_dir_all(&store)?;
        let mut config = format!(
            "listen: 127.0.0.1:{port}\n\
             http: 127.0.0.1:{monitor_port}\n\
             server_name: fieldgate_test\n\
             log_file: \"{log}\"\n\
             jetstream {{\n  store_dir: \"{store}\"\n  sync_interval: always\n}}\n",
            log = dir.path().join("nats.log").display(),
            store = store.display(),
        );
        if let Some(max) = options.max_payload {
            config.push_str(&format!("max_payload: {max}\n"));
        }
        std::fs::write(dir.path().join("nats.conf"), config)?;
        let mut server = Self { dir, port, monitor_port, binary: nats_server_binary()?, proc: None };
        server.start_again().await?;
        Ok(server)
    }

    /// `nats://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    /// The client port.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// Names of every client connection the server saw since its last start, open or closed
    /// (from the monitoring endpoint `/connz?state=all`; the server remembers the last 10k
    /// closed ones). Unnamed connections appear as `""`.
    pub async fn connection_names(&self) -> Result<Vec<String>> {
        let addr = std::net::SocketAddr::from(([127, 0, 0, 1], self.monitor_port));
        let (code, body) = crate::metrics::http_get(addr, "/connz?state=all&limit=100000").await?;
        if code != 200 {
            bail!("GET /connz answered {code}: {body}");
        }
        let j: serde_json::Value = serde_json::from_str(&body).context("parsing /connz")?;
        Ok(j["connections"]
            .as_array()
            .map(|cs| cs.iter().map(|c| c["name"].as_str().unwrap_or_default().to_string()).collect())
            .unwrap_or_default())
    }

    /// The temp dir holding config, store and log.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// The last lines of the server log.
    pub fn log_tail(&self) -> String {
        file_tail(&self.dir.path().join("nats.log"), 40)
    }

    /// SIGKILL and wait for the process to be gone. The store stays.
    pub fn kill(&mut self) -> Result<()> {
        if let Some(mut p) = self.proc.take() {
            p.kill()?;
        }
        Ok(())
    }

    /// Whether the process is running.
    pub fn is_running(&mut self) -> bool {
        self.proc.as_mut().is_some_and(|p| matches!(p.try_status(), Ok(None)))
    }

    /// Starts the server (again) on the same port with the same store, and waits until
    /// JetStream answers.
    pub async fn start_again(&mut self) -> Result<()> {
        self.kill()?;
        let mut cmd = Command::new(&self.binary);
        cmd.arg("-c").arg(self.dir.path().join("nats.conf")).env("GOMAXPROCS", NATS_GOMAXPROCS);
        let proc = Proc::spawn(
            "nats-server",
            cmd,
            &self.dir.path().join("nats.stdout"),
            &self.dir.path().join("nats.stderr"),
        )?;
        self.proc = Some(proc);
        if let Err(e) = self.wait_ready().await {
            let exited = self.proc.as_mut().and_then(|p| p.try_status().ok().flatten());
            bail!(
                "nats-server on port {} did not become ready ({e:#}); exit status: {exited:?}\n\
                 --- nats.log ---\n{}\n--- stderr ---\n{}",
                self.port,
                self.log_tail(),
                file_tail(&self.dir.path().join("nats.stderr"), 20)
            );
        }
        Ok(())
    }

    async fn wait_ready(&mut self) -> Result<()> {
        let port = self.port;
        let url = self.url();
        let proc = &mut self.proc;
        wait_until("nats-server to accept JetStream requests", STARTUP_TIMEOUT, || {
            let exited = proc.as_mut().map(|p| p.try_status());
            let url = url.clone();
            async move {
                if let Some(Ok(Some(status))) = exited {
                    return Ok(Some(Err(anyhow!("nats-server exited: {status}"))));
                }
                if TcpStream::connect(("127.0.0.1", port)).is_err() {
                    return Ok(None);
                }
                let js = jetstream(&url).await?;
                js.query_account().await.map_err(|e| anyhow!("query_account: {e}"))?;
                Ok(Some(Ok(())))
            }
        })
        .await
        .and_then(|inner| inner)
    }

    /// A JetStream context on a new client connection.
    pub async fn jetstream(&self) -> Result<async_nats::jetstream::Context> {
        jetstream(&self.url()).await
    }

    /// Names of all streams.
    pub async fn stream_names(&self) -> Result<Vec<String>> {
        let js = self.jetstream().await?;
        let names: Vec<String> = js.stream_names().try_collect().await.map_err(|e| anyhow!("listing streams: {e}"))?;
        Ok(names)
    }

    /// The state (messages, first and last sequence) of a stream.
    pub async fn stream_state(&self, name: &str) -> Result<async_nats::jetstream::stream::State> {
        let js = self.jetstream().await?;
        let mut stream = js.get_stream(name).await.map_err(|e| anyhow!("getting stream {name}: {e}"))?;
        let info = stream.info().await.map_err(|e| anyhow!("stream {name} info: {e}"))?;
        Ok(info.state.clone())
    }

    /// The value of `key` in the key-value bucket `bucket`, if any.
    pub async fn kv_get(&self, bucket: &str, key: &str) -> Result<Option<Vec<u8>>> {
        let js = self.jetstream().await?;
        let Ok(kv) = js.get_key_value(bucket).await else { return Ok(None) };
        Ok(kv.get(key).await.map_err(|e| anyhow!("reading {bucket}/{key}: {e}"))?.map(|b| b.to_vec()))
    }

    /// The configuration of a stream.
    pub async fn stream_config(&self, name: &str) -> Result<async_nats::jetstream::stream::Config> {
        let js = self.jetstream().await?;
        let mut stream = js.get_stream(name).await.map_err(|e| anyhow!("getting stream {name}: {e}"))?;
        let info = stream.info().await.map_err(|e| anyhow!("stream {name} info: {e}"))?;
        Ok(info.config.clone())
    }
}

async fn jetstream(url: &str) -> Result<async_nats::jetstream::Context> {
    let client = async_nats::ConnectOptions::new()
        .connection_timeout(Duration::from_secs(5))
        .max_reconnects(Some(1))
        .connect(url)
        .await
        .with_context(|| format!("connecting to {url}"))?;
    Ok(async_nats::jetstream::new(client))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_stream_survives_sigkill_and_restart() {
        let mut nats = NatsServer::start().await.unwrap();
        let js = nats.jetstream().await.unwrap();
        js.create_stream(async_nats::jetstream::stream::Config {
            name: "harness".into(),
            subjects: vec!["harness.>".into()],
            storage: async_nats::jetstream::stream::StorageType::File,
            ..Default::default()
        })
        .await
        .unwrap();
        for i in 0..10 {
            js.publish("harness.x", format!("{i}").into()).await.unwrap().await.unwrap();
        }
        nats.kill().unwrap();
        assert!(!nats.is_running());
        nats.start_again().await.unwrap();
        assert_eq!(nats.stream_names().await.unwrap(), ["harness"]);
        let state = nats.stream_state("harness").await.unwrap();
        assert_eq!(state.last_sequence, 10, "{}", nats.log_tail());
    }
}
