//! A real headless Chromium (Debian `chromium`, installed by `scripts/setup.sh`), driven over
//! the DevTools protocol on `--remote-debugging-pipe`: JSON messages separated by NUL bytes on
//! file descriptors 3 (to the browser) and 4 (from it). No WebSocket, no driver crate.
//!
//! A [`Page`] can answer HTTP authentication challenges with credentials, as a person typing
//! them into the browser's own dialog would (`Fetch.authRequired` → `Fetch.continueWithAuth`).
//!
//! The browser runs in its own process group with a fresh profile in a temp dir; dropping the
//! [`Chromium`] kills that group (the browser and its helper processes) by its id.

use std::collections::HashMap;
use std::path::PathBuf;
use std::process::Stdio;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use anyhow::{Context, Result, anyhow, bail};
use serde_json::{Value as Json, json};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::process::{Child, ChildStdin};
use tokio::sync::oneshot;

/// Deadline of one DevTools call.
pub const CALL_TIMEOUT: Duration = Duration::from_secs(30);

/// The flags every run uses: headless, no sandbox (root in CI), nothing fetched from outside.
pub const FLAGS: &[&str] = &[
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--disable-dev-shm-usage",
];

/// Locates Chromium: env `FIELDGATE_CHROMIUM`, `/usr/bin/chromium`, then `chromium` on `PATH`.
pub fn chromium_binary() -> Result<PathBuf> {
    crate::find_executable("FIELDGATE_CHROMIUM", &[PathBuf::from("/usr/bin/chromium")], "chromium")
        .context("headless Chromium is needed (Debian package chromium; scripts/setup.sh installs it)")
}

type Pending = Arc<Mutex<HashMap<u64, oneshot::Sender<Json>>>>;
type Credentials = Arc<Mutex<HashMap<String, (String, String)>>>;

/// A running headless Chromium.
pub struct Chromium {
    child: Child,
    pgid: u32,
    writer: Arc<tokio::sync::Mutex<ChildStdin>>,
    pending: Pending,
    credentials: Credentials,
    next_id: AtomicU64,
    _profile: tempfile::TempDir,
    log: PathBuf,
}

/// One tab, attached with its own DevTools session.
#[derive(Clone, Debug)]
pub struct Page {
    session: String,
}

async fn send(writer: &tokio::sync::Mutex<ChildStdin>, msg: &Json) -> Result<()> {
    let mut bytes = serde_json::to_vec(msg)?;
    bytes.push(0);
    let mut w = writer.lock().await;
    w.write_all(&bytes).await?;
    w.flush().await?;
    Ok(())
}

impl Chromium {
    /// Starts the browser with a fresh profile.
    pub async fn start() -> Result<Self> {
        let binary = chromium_binary()?;
        let profile = crate::temp_dir("fieldgate-chromium-")?;
        let log = profile.path().join("chromium.log");
        let stderr = std::fs::File::create(&log)?;
        // fd 3 = our pipe to the browser (its stdin), fd 4 = its pipe to us (its stdout).
        let mut cmd = tokio::process::Command::new("sh");
        cmd.arg("-c")
            .arg(r#"exec "$@" 3<&0 4>&1 </dev/null >/dev/null"#)
            .arg("sh")
            .arg(&binary)
            .args(FLAGS)
            .arg(format!("--user-data-dir={}", profile.path().join("profile").display()))
            .arg("--remote-debugging-pipe")
            .arg("about:blank")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(stderr)
            .process_group(0)
            .kill_on_drop(true);
        let mut child = cmd.spawn().with_context(|| format!("starting {}", binary.display()))?;
        let pgid = child.id().ok_or_else(|| anyhow!("chromium exited at once"))?;
        let stdin = child.stdin.take().ok_or_else(|| anyhow!("no pipe to chromium"))?;
        let stdout = child.stdout.take().ok_or_else(|| anyhow!("no pipe from chromium"))?;
        let writer = Arc::new(tokio::sync::Mutex::new(stdin));
        let pending: Pending = Arc::default();
        let credentials: Credentials = Arc::default();
        tokio::spawn(read_messages(
            BufReader::new(stdout),
            Arc::clone(&writer),
            Arc::clone(&pending),
            Arc::clone(&credentials),
        ));
        let browser =
            Self { child, pgid, writer, pending, credentials, next_id: AtomicU64::new(1), _profile: profile, log };
        let version = browser.call(None, "Browser.getVersion", json!({})).await?;
        anyhow::ensure!(version["product"].is_string(), "unexpected Browser.getVersion answer: {version}");
        Ok(browser)
    }

    /// What the browser wrote on stderr, for failure messages.
    pub fn log(&self) -> String {
        format!("--- chromium stderr ({}) ---\n{}", self.log.display(), crate::file_tail(&self.log, 40))
    }

    /// Sends one DevTools command and waits for its result.
    pub async fn call(&self, page: Option<&Page>, method: &str, params: Json) -> Result<Json> {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let mut msg = json!({"id": id, "method": method, "params": params});
        if let Some(p) = page {
            msg["sessionId"] = Json::from(p.session.as_str());
        }
        let (tx, rx) = oneshot::channel();
        self.pending.lock().unwrap_or_else(PoisonError::into_inner).insert(id, tx);
        send(&self.writer, &msg).await.with_context(|| format!("sending {method}"))?;
        let answer = tokio::time::timeout(CALL_TIMEOUT, rx)
            .await
            .map_err(|_| anyhow!("{method}: no answer within {CALL_TIMEOUT:?}\n{}", self.log()))?
            .map_err(|_| anyhow!("{method}: the browser closed its pipe\n{}", self.log()))?;
        if let Some(e) = answer.get("error") {
            bail!("{method} failed: {e}");
        }
        Ok(answer["result"].clone())
    }

    /// Opens a tab at `url`. With `credentials` (user, password) the tab answers HTTP
    /// authentication challenges of `url`'s origin with them.
    pub async fn open(&self, url: &str, credentials: Option<(&str, &str)>) -> Result<Page> {
        let target = self.call(None, "Target.createTarget", json!({"url": "about:blank"})).await?;
        let target_id = target["targetId"].as_str().ok_or_else(|| anyhow!("no targetId in {target}"))?;
        let attached =
            self.call(None, "Target.attachToTarget", json!({"targetId": target_id, "flatten": true})).await?;
        let session = attached["sessionId"].as_str().ok_or_else(|| anyhow!("no sessionId in {attached}"))?;
        let page = Page { session: session.to_string() };
        if let Some((user, password)) = credentials {
            self.credentials
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .insert(page.session.clone(), (user.to_string(), password.to_string()));
            self.call(Some(&page), "Fetch.enable", json!({"handleAuthRequests": true})).await?;
        }
        self.call(Some(&page), "Page.navigate", json!({"url": url})).await?;
        Ok(page)
    }

    /// Evaluates `expression` in the page and returns its value (awaiting a promise).
    pub async fn eval(&self, page: &Page, expression: &str) -> Result<Json> {
        let r = self
            .call(
                Some(page),
                "Runtime.evaluate",
                json!({"expression": expression, "returnByValue": true, "awaitPromise": true}),
            )
            .await?;
        if let Some(e) = r.get("exceptionDetails") {
            bail!("{expression}: {e}");
        }
        Ok(r["result"]["value"].clone())
    }

    /// A PNG screenshot of the page.
    pub async fn screenshot(&self, page: &Page) -> Result<Vec<u8>> {
        use base64::Engine as _;
        let r = self.call(Some(page), "Page.captureScreenshot", json!({"format": "png"})).await?;
        let data = r["data"].as_str().ok_or_else(|| anyhow!("no screenshot data"))?;
        Ok(base64::engine::general_purpose::STANDARD.decode(data)?)
    }
}

impl Drop for Chromium {
    fn drop(&mut self) {
        // The browser and its helpers share the process group we started it in.
        let _ = std::process::Command::new("kill").arg("-KILL").arg("--").arg(format!("-{}", self.pgid)).status();
        let _ = self.child.start_kill();
    }
}

/// Reads the browser's messages: answers go to their callers; authentication challenges and
/// the requests paused for them are answered here, so a page never waits for the test.
async fn read_messages(
    mut from: BufReader<tokio::process::ChildStdout>,
    writer: Arc<tokio::sync::Mutex<ChildStdin>>,
    pending: Pending,
    credentials: Credentials,
) {
    let mut buf = Vec::new();
    loop {
        buf.clear();
        match from.read_until(0, &mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(_) => {}
        }
        if buf.last() == Some(&0) {
            buf.pop();
        }
        let Ok(msg) = serde_json::from_slice::<Json>(&buf) else { continue };
        if let Some(id) = msg["id"].as_u64() {
            if let Some(tx) = pending.lock().unwrap_or_else(PoisonError::into_inner).remove(&id) {
                let _ = tx.send(msg);
            }
            continue;
        }
        let session = msg["sessionId"].clone();
        let request_id = msg["params"]["requestId"].clone();
        let reply = match msg["method"].as_str() {
            Some("Fetch.requestPaused") => {
                json!({"id": 0, "method": "Fetch.continueRequest", "params": {"requestId": request_id}})
            }
            Some("Fetch.authRequired") => {
                let creds = session
                    .as_str()
                    .and_then(|s| credentials.lock().unwrap_or_else(PoisonError::into_inner).get(s).cloned());
                let response = match creds {
                    Some((user, password)) => {
                        json!({"response": "ProvideCredentials", "username": user, "password": password})
                    }
                    None => json!({"response": "CancelAuth"}),
                };
                json!({"id": 0, "method": "Fetch.continueWithAuth",
                       "params": {"requestId": request_id, "authChallengeResponse": response}})
            }
            _ => continue,
        };
        let mut reply = reply;
        reply["sessionId"] = session;
        if send(&writer, &reply).await.is_err() {
            break;
        }
    }
    // The browser is gone: fail every waiting call.
    pending.lock().unwrap_or_else(PoisonError::into_inner).clear();
}
