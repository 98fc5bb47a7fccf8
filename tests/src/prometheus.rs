//! A real Prometheus server (Debian package `prometheus`) scraping the processes under test
//! every second, on a free port with its TSDB in a temp dir; queried through its HTTP API.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use serde_json::Value as Json;
use tempfile::TempDir;

use crate::metrics::http_get;
use crate::process::Proc;
use crate::{file_tail, find_executable, free_port, wait_until};

/// How long Prometheus may take to start on a busy machine.
pub const STARTUP_TIMEOUT: Duration = Duration::from_secs(60);

/// The prometheus binary: env `FIELDGATE_PROMETHEUS`, else `/usr/bin/prometheus`, else `PATH`.
pub fn prometheus_binary() -> Result<PathBuf> {
    find_executable("FIELDGATE_PROMETHEUS", &[PathBuf::from("/usr/bin/prometheus")], "prometheus")
}

/// One sample of a query result.
#[derive(Clone, Debug, PartialEq)]
pub struct QuerySample {
    /// The series' labels (`__name__` included when the result keeps it).
    pub labels: serde_json::Map<String, Json>,
    /// The value.
    pub value: f64,
}

/// A Prometheus process. Killed on drop.
pub struct Prometheus {
    // First: dropped (killed) before the temp dir is removed.
    proc: Option<Proc>,
    dir: TempDir,
    addr: SocketAddr,
}

/// `%`-encodes a query parameter.
pub fn url_encode(s: &str) -> String {
    let mut out = String::new();
    for b in s.bytes() {
        match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => out.push(char::from(b)),
            _ => out.push_str(&format!("%{b:02X}")),
        }
    }
    out
}

impl Prometheus {
    /// Starts Prometheus scraping `targets` (`job` name, `host:port`, path `/metrics`) every
    /// second, with `rule_files` loaded (evaluated every second), and waits until it is ready.
    pub async fn start(targets: &[(&str, SocketAddr)], rule_files: &[PathBuf]) -> Result<Self> {
        let dir = crate::temp_dir("fieldgate-prometheus-")?;
        let addr = SocketAddr::from(([127, 0, 0, 1], free_port()?));
        let mut config =
            String::from("global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\n  evaluation_interval: 1s\n");
        if !rule_files.is_empty() {
            config.push_str("rule_files:\n");
            for f in rule_files {
                config.push_str(&format!("  - {:?}\n", f.display().to_string()));
            }
        }
        config.push_str("scrape_configs:\n");
        for (job, target) in targets {
            config.push_str(&format!("  - job_name: {job:?}\n    static_configs:\n      - targets: [\"{target}\"]\n"));
        }
        let config_path = dir.path().join("prometheus.yml");
        std::fs::write(&config_path, &config)?;
        let mut cmd = Command::new(prometheus_binary()?);
        cmd.arg(format!("--config.file={}", config_path.display()))
            .arg(format!("--storage.tsdb.path={}", dir.path().join("data").display()))
            .arg(format!("--web.listen-address={addr}"))
            .arg("--log.level=warn");
        let proc = Proc::spawn(
            "prometheus",
            cmd,
            &dir.path().join("prometheus.stdout"),
            &dir.path().join("prometheus.stderr"),
        )?;
        let p = Self { proc: Some(proc), dir, addr };
        let r = wait_until("Prometheus to be ready", STARTUP_TIMEOUT, || async {
            Ok(matches!(http_get(addr, "/-/ready").await, Ok((200, _))).then_some(()))
        })
        .await;
        r.with_context(|| p.log())?;
        Ok(p)
    }

    /// The last lines of its log.
    pub fn log(&self) -> String {
        format!("--- prometheus stderr ---\n{}", file_tail(&self.dir.path().join("prometheus.stderr"), 40))
    }

    /// GET on the HTTP API; the `data` of a `success` answer.
    pub async fn api(&self, path: &str) -> Result<Json> {
        let (code, body) = http_get(self.addr, path).await?;
        let j: Json = serde_json::from_str(&body).with_context(|| format!("GET {path} answered {code}: {body}"))?;
        if j["status"] != "success" {
            bail!("GET {path} answered {code}: {body}");
        }
        Ok(j["data"].clone())
    }

    /// An instant query.
    pub async fn query(&self, promql: &str) -> Result<Vec<QuerySample>> {
        let data = self.api(&format!("/api/v1/query?query={}", url_encode(promql))).await?;
        let mut out = Vec::new();
        for r in data["result"].as_array().into_iter().flatten() {
            let value = r["value"][1].as_str().and_then(|v| v.parse().ok()).unwrap_or(f64::NAN);
            out.push(QuerySample { labels: r["metric"].as_object().cloned().unwrap_or_default(), value });
        }
        Ok(out)
    }

    /// Waits until `promql` returns at least one sample and every sample satisfies `pred`.
    pub async fn wait_query<P>(&self, promql: &str, timeout: Duration, pred: P) -> Result<Vec<QuerySample>>
    where
        P: Fn(f64) -> bool,
    {
        let r = wait_until(&format!("Prometheus query {promql}"), timeout, || async {
            let samples = self.query(promql).await?;
            Ok((!samples.is_empty() && samples.iter().all(|s| pred(s.value))).then_some(samples))
        })
        .await;
        r.with_context(|| self.log())
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        if let Some(mut p) = self.proc.take() {
            let _ = p.kill();
        }
    }
}
