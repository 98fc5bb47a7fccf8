//! The gateway's own view of itself: `GET /readyz` and `GET /api/v1/status` (bearer token),
//! over hyper's HTTP/1.1 client.

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::{Context, Result, anyhow};
use http_body_util::{BodyExt as _, Empty};
use hyper::body::Bytes;
use hyper_util::rt::TokioIo;
use serde_json::Value as Json;

/// Deadline of one request.
const TIMEOUT: Duration = Duration::from_secs(3);

/// The management server of one gateway.
#[derive(Clone, Debug)]
pub struct GatewayApi {
    addr: SocketAddr,
    token: String,
}

impl GatewayApi {
    /// The gateway listening on `addr`, with API token `token`.
    pub fn new(addr: SocketAddr, token: String) -> Self {
        Self { addr, token }
    }

    async fn get(&self, path: &str) -> Result<(u16, Bytes)> {
        tokio::time::timeout(TIMEOUT, async {
            let stream = tokio::net::TcpStream::connect(self.addr).await?;
            let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
            tokio::spawn(conn);
            let req = hyper::Request::get(path)
                .header(hyper::header::HOST, self.addr.to_string())
                .header(hyper::header::AUTHORIZATION, format!("Bearer {}", self.token))
                .body(Empty::<Bytes>::new())?;
            let res = sender.send_request(req).await?;
            let code = res.status().as_u16();
            let body = res.into_body().collect().await?.to_bytes();
            Ok::<_, anyhow::Error>((code, body))
        })
        .await
        .map_err(|_| anyhow!("GET {path}: no answer within {TIMEOUT:?}"))?
        .with_context(|| format!("GET http://{}{path}", self.addr))
    }

    /// Whether `/readyz` answers 200.
    pub async fn ready(&self) -> bool {
        matches!(self.get("/readyz").await, Ok((200, _)))
    }

    /// `/api/v1/status`.
    pub async fn status(&self) -> Result<Json> {
        let (code, body) = self.get("/api/v1/status").await?;
        anyhow::ensure!(code == 200, "GET /api/v1/status answered {code}: {}", String::from_utf8_lossy(&body));
        Ok(serde_json::from_slice(&body)?)
    }
}
