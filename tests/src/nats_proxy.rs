//! A TCP proxy between a NATS client and `nats-server` that can drop one JetStream PubAck: the
//! publish is stored, its acknowledgement never reaches the client (an *ambiguous* publish,
//! made deterministic).
//!
//! Client-to-server bytes pass unchanged. Server-to-client bytes are read as NATS protocol
//! operations (`INFO`, `MSG`, `HMSG`, `PING`, `PONG`, `+OK`, `-ERR`) and passed on whole, except
//! the first `MSG` whose payload is a PubAck (`{"stream": <armed stream>, "seq": N, ...}`) after
//! [`NatsProxy::drop_next_pub_ack`]: that one is swallowed and its sequence recorded.

use std::sync::{Arc, Mutex, PoisonError};

use anyhow::{Context, Result, bail};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;

#[derive(Debug, Default)]
struct Shared {
    /// Drop the next PubAck of this stream.
    armed: Option<String>,
    /// Stream sequences whose PubAck was dropped.
    dropped: Vec<u64>,
}

/// The proxy: listens on a free port of 127.0.0.1, forwards to the server. Stops on drop.
pub struct NatsProxy {
    port: u16,
    shared: Arc<Mutex<Shared>>,
    task: JoinHandle<()>,
}

/// Largest operation line or payload the proxy passes (nats-server's default max payload is
/// 1 MiB).
const MAX_OP: usize = 8 << 20;

impl NatsProxy {
    /// Starts a proxy to the server at `127.0.0.1:server_port`.
    pub async fn start(server_port: u16) -> Result<Self> {
        let listener = TcpListener::bind("127.0.0.1:0").await.context("binding the NATS proxy")?;
        let port = listener.local_addr()?.port();
        let shared = Arc::new(Mutex::new(Shared::default()));
        let s = Arc::clone(&shared);
        let task = tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let s = Arc::clone(&s);
                tokio::spawn(async move {
                    if let Ok(server) = TcpStream::connect(("127.0.0.1", server_port)).await {
                        let _ = relay(client, server, s).await;
                    }
                });
            }
        });
        Ok(Self { port, shared, task })
    }

    /// `nats://127.0.0.1:PORT` of the proxy.
    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    /// Swallows the next PubAck of stream `stream`.
    pub fn drop_next_pub_ack(&self, stream: &str) {
        self.shared.lock().unwrap_or_else(PoisonError::into_inner).armed = Some(stream.to_string());
    }

    /// Stream sequences whose PubAck was swallowed so far.
    pub fn dropped(&self) -> Vec<u64> {
        self.shared.lock().unwrap_or_else(PoisonError::into_inner).dropped.clone()
    }
}

impl Drop for NatsProxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn relay(client: TcpStream, server: TcpStream, shared: Arc<Mutex<Shared>>) -> Result<()> {
    let (mut client_read, mut client_write) = client.into_split();
    let (server_read, mut server_write) = server.into_split();
    let upstream = tokio::spawn(async move { tokio::io::copy(&mut client_read, &mut server_write).await });
    let downstream = async move {
        let mut from = BufReader::new(server_read);
        let mut line = Vec::new();
        loop {
            line.clear();
            let n = (&mut from).take(MAX_OP as u64).read_until(b'\n', &mut line).await?;
            if n == 0 {
                return Ok(());
            }
            if !line.ends_with(b"\r\n") {
                bail!("NATS operation line too long or cut");
            }
            let text = String::from_utf8_lossy(&line[..line.len() - 2]).into_owned();
            let mut words = text.split_ascii_whitespace();
            let op = words.next().unwrap_or_default().to_ascii_uppercase();
            let args: Vec<&str> = words.collect();
            // `MSG subject sid [reply] size`, `HMSG subject sid [reply] hsize size`.
            let size = match op.as_str() {
                "MSG" | "HMSG" => args.last().and_then(|s| s.parse::<usize>().ok()).context("size of a message")?,
                _ => {
                    client_write.write_all(&line).await?;
                    continue;
                }
            };
            if size > MAX_OP {
                bail!("message of {size} bytes");
            }
            let mut body = vec![0u8; size + 2];
            from.read_exact(&mut body).await?;
            if op == "MSG" && swallow(&shared, &body[..size]) {
                continue;
            }
            client_write.write_all(&line).await?;
            client_write.write_all(&body).await?;
        }
    };
    let r: Result<()> = downstream.await;
    upstream.abort();
    r
}

/// Whether `payload` is the PubAck the proxy is armed for (then recorded and disarmed).
fn swallow(shared: &Mutex<Shared>, payload: &[u8]) -> bool {
    let mut s = shared.lock().unwrap_or_else(PoisonError::into_inner);
    let Some(stream) = s.armed.clone() else { return false };
    let Ok(ack) = serde_json::from_slice::<serde_json::Value>(payload) else { return false };
    let seq = ack.get("seq").and_then(serde_json::Value::as_u64);
    match (ack.get("stream").and_then(serde_json::Value::as_str), seq) {
        (Some(st), Some(seq)) if st == stream && ack.get("error").is_none() => {
            s.armed = None;
            s.dropped.push(seq);
            true
        }
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_an_armed_streams_pub_ack_is_swallowed() {
        let shared = Mutex::new(Shared::default());
        assert!(!swallow(&shared, br#"{"stream":"s","seq":3}"#));
        shared.lock().unwrap().armed = Some("s".into());
        assert!(!swallow(&shared, br#"{"stream":"other","seq":3}"#));
        assert!(!swallow(&shared, br#"{"type":"io.nats.jetstream.api.v1.stream_info_response"}"#));
        assert!(swallow(&shared, br#"{"stream":"s","seq":4,"domain":""}"#));
        assert!(!swallow(&shared, br#"{"stream":"s","seq":5}"#), "one only");
        assert_eq!(shared.lock().unwrap().dropped, [4]);
    }
}
