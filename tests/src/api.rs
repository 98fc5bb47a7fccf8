//! A tiny HTTP/1.0 client for the gateway's management API: any method, headers and body.

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::{Context, Result, anyhow};
use serde_json::Value as Json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Deadline of one request.
pub const TIMEOUT: Duration = Duration::from_secs(20);

/// An HTTP response.
#[derive(Clone, Debug)]
pub struct Response {
    /// Status code.
    pub code: u16,
    /// Header lines, names lowercased.
    pub headers: Vec<(String, String)>,
    /// Body as text.
    pub body: String,
}

impl Response {
    /// The body as JSON.
    pub fn json(&self) -> Result<Json> {
        serde_json::from_str(&self.body).with_context(|| format!("HTTP {} body is not JSON: {}", self.code, self.body))
    }

    /// A header's value.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(k, _)| k == name).map(|(_, v)| v.as_str())
    }
}

/// Sends one request over a fresh connection. `token` adds `Authorization: Bearer <token>`.
pub async fn request(
    addr: SocketAddr,
    method: &str,
    path: &str,
    token: Option<&str>,
    content_type: Option<&str>,
    body: &[u8],
) -> Result<Response> {
    tokio::time::timeout(TIMEOUT, async {
        let mut s = TcpStream::connect(addr).await.with_context(|| format!("connecting to {addr}"))?;
        let mut head = format!(
            "{method} {path} HTTP/1.0\r\nHost: {addr}\r\nConnection: close\r\nContent-Length: {}\r\n",
            body.len()
        );
        if let Some(t) = token {
            head.push_str(&format!("Authorization: Bearer {t}\r\n"));
        }
        if let Some(ct) = content_type {
            head.push_str(&format!("Content-Type: {ct}\r\n"));
        }
        head.push_str("\r\n");
        s.write_all(head.as_bytes()).await?;
        // A server may answer (413, 401) before reading the whole body and close: that is fine.
        let _ = s.write_all(body).await;
        let mut buf = Vec::new();
        let _ = s.read_to_end(&mut buf).await;
        let text = String::from_utf8_lossy(&buf).into_owned();
        let (head, body) = text.split_once("\r\n\r\n").ok_or_else(|| anyhow!("incomplete HTTP response: {text:?}"))?;
        let mut lines = head.lines();
        let status = lines.next().unwrap_or_default();
        let code = status
            .split_whitespace()
            .nth(1)
            .and_then(|c| c.parse().ok())
            .ok_or_else(|| anyhow!("bad status line {status:?}"))?;
        let headers = lines
            .filter_map(|l| l.split_once(':'))
            .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_string()))
            .collect();
        Ok(Response { code, headers, body: body.to_string() })
    })
    .await
    .map_err(|_| anyhow!("{method} http://{addr}{path} took longer than {TIMEOUT:?}"))?
}
