//! CoAP peers: libcoap's own `coap-client-notls` and `coap-server-notls` (Debian
//! `libcoap3-bin`) as third-party implementations, and [`CoapProbe`], a scripted client on
//! coap-lite for exact answers and malformed datagrams.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use coap_lite::{CoapOption, MessageClass, MessageType, Packet, RequestType, ResponseType};
use tempfile::TempDir;
use tokio::net::UdpSocket;

use crate::process::Proc;
use crate::{file_tail, find_executable, free_port, wait_until};

/// `coap-client-notls`: env `FIELDGATE_COAP_CLIENT`, else `/usr/bin`, else `PATH`.
pub fn coap_client_binary() -> Result<PathBuf> {
    find_executable("FIELDGATE_COAP_CLIENT", &[PathBuf::from("/usr/bin/coap-client-notls")], "coap-client-notls")
}

/// `coap-server-notls`: env `FIELDGATE_COAP_SERVER`, else `/usr/bin`, else `PATH`.
pub fn coap_server_binary() -> Result<PathBuf> {
    find_executable("FIELDGATE_COAP_SERVER", &[PathBuf::from("/usr/bin/coap-server-notls")], "coap-server-notls")
}

/// What one `coap-client-notls` run printed (it exits 0 whatever the answer).
#[derive(Clone, Debug)]
pub struct ClientRun {
    /// Standard output (the response payload).
    pub stdout: String,
    /// Standard error (error codes such as `4.04 Not Found`, warnings).
    pub stderr: String,
}

impl ClientRun {
    /// Both outputs.
    pub fn text(&self) -> String {
        format!("{}{}", self.stdout, self.stderr)
    }
}

/// Runs `coap-client-notls` with `args`, at most `timeout`.
pub async fn coap_client(args: &[&str], timeout: Duration) -> Result<ClientRun> {
    let mut cmd = tokio::process::Command::new(coap_client_binary()?);
    cmd.args(args).kill_on_drop(true).stdin(std::process::Stdio::null());
    let out = tokio::time::timeout(timeout, cmd.output())
        .await
        .with_context(|| format!("coap-client-notls {args:?} took longer than {timeout:?}"))??;
    Ok(ClientRun {
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    })
}

/// A `coap-server-notls` on a free loopback port allowing dynamic resources (PUT creates
/// them; they are observable and notify their observers on every PUT). Killed on drop.
pub struct CoapServer {
    dir: TempDir,
    /// Its address.
    pub addr: SocketAddr,
    _proc: Proc,
}

impl CoapServer {
    /// Starts the server and waits until it answers.
    pub async fn start() -> Result<Self> {
        let dir = tempfile::Builder::new().prefix("fieldgate-coap-server-").tempdir()?;
        let port = free_port()?;
        let mut cmd = Command::new(coap_server_binary()?);
        cmd.args(["-A", "127.0.0.1", "-p", &port.to_string(), "-d", "50", "-v", "3"]);
        let proc = Proc::spawn("coap-server-notls", cmd, &dir.path().join("stdout"), &dir.path().join("stderr"))?;
        let server = Self { dir, addr: SocketAddr::from(([127, 0, 0, 1], port)), _proc: proc };
        let uri = server.uri("/.well-known/core");
        wait_until("coap-server-notls to answer", Duration::from_secs(30), || async {
            let run = coap_client(&["-B", "1", &uri], Duration::from_secs(10)).await?;
            Ok(run.stdout.contains("</").then_some(()))
        })
        .await
        .with_context(|| server.log())?;
        Ok(server)
    }

    /// `coap://127.0.0.1:port{path}`.
    pub fn uri(&self, path: &str) -> String {
        format!("coap://{}{path}", self.addr)
    }

    /// PUTs `value` to `path` (creating the resource) with libcoap's client. A refused PUT is
    /// tried again until 20 s passed: on a busy machine the example server has answered a
    /// block-wise PUT that creates a resource with 4.04 (seen once in a full test run); this
    /// is the test's setup, not what it checks.
    pub async fn put(&self, path: &str, value: &str) -> Result<()> {
        let uri = self.uri(path);
        crate::wait_until(&format!("PUT {path} to be answered 2.xx"), Duration::from_secs(20), || async {
            let run =
                coap_client(&["-m", "put", "-b", "512", "-B", "5", "-e", value, &uri], Duration::from_secs(10)).await?;
            if run.stderr.contains(" 4.")
                || run.stderr.contains(" 5.")
                || run.stderr.starts_with('4')
                || run.stderr.starts_with('5')
            {
                bail!("PUT {path} failed: {}\n{}", run.text(), self.log());
            }
            Ok(Some(()))
        })
        .await
    }

    /// Its log.
    pub fn log(&self) -> String {
        format!(
            "--- coap-server ---\n{}\n{}",
            file_tail(&self.dir.path().join("stdout"), 20),
            file_tail(&self.dir.path().join("stderr"), 20)
        )
    }
}

/// A scripted CoAP client on coap-lite.
pub struct CoapProbe {
    socket: UdpSocket,
    mid: u16,
}

impl CoapProbe {
    /// A client socket connected to `server`.
    pub async fn connect(server: SocketAddr) -> Result<Self> {
        let socket = UdpSocket::bind("127.0.0.1:0").await?;
        socket.connect(server).await?;
        Ok(Self { socket, mid: rand::random() })
    }

    /// A request packet: `method` on `path` (query after `?`), confirmable or not.
    pub fn packet(&mut self, method: RequestType, path_and_query: &str, payload: &[u8], confirmable: bool) -> Packet {
        self.mid = self.mid.wrapping_add(1);
        let mut p = Packet::new();
        p.header.set_version(1);
        p.header.set_type(if confirmable { MessageType::Confirmable } else { MessageType::NonConfirmable });
        p.header.code = MessageClass::Request(method);
        p.header.message_id = self.mid;
        p.set_token(self.mid.to_be_bytes().to_vec());
        let (path, query) = path_and_query.split_once('?').unwrap_or((path_and_query, ""));
        for seg in path.split('/').filter(|s| !s.is_empty()) {
            p.add_option(CoapOption::UriPath, seg.as_bytes().to_vec());
        }
        for q in query.split('&').filter(|s| !s.is_empty()) {
            p.add_option(CoapOption::UriQuery, q.as_bytes().to_vec());
        }
        p.payload = payload.to_vec();
        p
    }

    /// Sends raw bytes.
    pub async fn send_raw(&self, bytes: &[u8]) -> Result<()> {
        self.socket.send(bytes).await?;
        Ok(())
    }

    /// Sends `p` (again every second) until an answer with its token arrives, at most `timeout`.
    pub async fn exchange(&self, p: &Packet, timeout: Duration) -> Result<Packet> {
        let bytes = p.to_bytes().map_err(|e| anyhow::anyhow!("encoding: {e:?}"))?;
        let deadline = tokio::time::Instant::now() + timeout;
        let mut buf = vec![0u8; 4096];
        loop {
            self.socket.send(&bytes).await?;
            let until = (tokio::time::Instant::now() + Duration::from_secs(1)).min(deadline);
            loop {
                match tokio::time::timeout_at(until, self.socket.recv(&mut buf)).await {
                    Err(_) => break,
                    Ok(n) => {
                        let answer =
                            Packet::from_bytes(&buf[..n?]).map_err(|e| anyhow::anyhow!("bad answer: {e:?}"))?;
                        if answer.get_token() == p.get_token()
                            && matches!(answer.header.code, MessageClass::Response(_))
                        {
                            return Ok(answer);
                        }
                    }
                }
            }
            if tokio::time::Instant::now() >= deadline {
                bail!("no answer within {timeout:?}");
            }
        }
    }

    /// One request and the answer's status and payload.
    pub async fn request(
        &mut self,
        method: RequestType,
        path: &str,
        payload: &[u8],
        confirmable: bool,
    ) -> Result<(ResponseType, String)> {
        let p = self.packet(method, path, payload, confirmable);
        let a = self.exchange(&p, Duration::from_secs(30)).await?;
        Ok((status(&a), String::from_utf8_lossy(&a.payload).into_owned()))
    }
}

/// The response code of an answer.
pub fn status(p: &Packet) -> ResponseType {
    match p.header.code {
        MessageClass::Response(s) => s,
        _ => ResponseType::UnKnown,
    }
}
