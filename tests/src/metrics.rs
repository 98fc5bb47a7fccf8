//! A tiny HTTP/1.0 GET and a Prometheus text-format reader, so tests need no HTTP client crate.

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::{Context, Result, anyhow, bail};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Deadline of one HTTP request.
pub const HTTP_TIMEOUT: Duration = Duration::from_secs(10);

/// `GET path` over a fresh connection; returns the status code and the body.
pub async fn http_get(addr: SocketAddr, path: &str) -> Result<(u16, String)> {
    tokio::time::timeout(HTTP_TIMEOUT, async {
        let mut s = TcpStream::connect(addr).await.with_context(|| format!("connecting to {addr}"))?;
        let req = format!("GET {path} HTTP/1.0\r\nHost: {addr}\r\nAccept: text/plain\r\nConnection: close\r\n\r\n");
        s.write_all(req.as_bytes()).await?;
        let mut buf = Vec::new();
        s.read_to_end(&mut buf).await?;
        parse_response(&buf)
    })
    .await
    .map_err(|_| anyhow!("GET http://{addr}{path} took longer than {HTTP_TIMEOUT:?}"))?
}

fn parse_response(buf: &[u8]) -> Result<(u16, String)> {
    let text = String::from_utf8_lossy(buf);
    let (head, body) = text.split_once("\r\n\r\n").ok_or_else(|| anyhow!("incomplete HTTP response: {text:?}"))?;
    let status_line = head.lines().next().unwrap_or_default();
    let code: u16 = status_line
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| anyhow!("bad status line {status_line:?}"))?;
    let chunked = head.lines().any(|l| {
        let l = l.to_ascii_lowercase();
        l.starts_with("transfer-encoding:") && l.contains("chunked")
    });
    let body = if chunked { dechunk(body)? } else { body.to_string() };
    Ok((code, body))
}

fn dechunk(mut body: &str) -> Result<String> {
    let mut out = String::new();
    loop {
        let (size_line, rest) = body.split_once("\r\n").ok_or_else(|| anyhow!("truncated chunk"))?;
        let size = usize::from_str_radix(size_line.split(';').next().unwrap_or("").trim(), 16)
            .with_context(|| format!("chunk size {size_line:?}"))?;
        if size == 0 {
            return Ok(out);
        }
        if rest.len() < size {
            bail!("truncated chunk body");
        }
        out.push_str(&rest[..size]);
        body = rest[size..].strip_prefix("\r\n").unwrap_or(&rest[size..]);
    }
}

/// One sample line of a Prometheus/OpenMetrics text exposition.
#[derive(Clone, Debug, PartialEq)]
pub struct Sample {
    /// Metric name as exposed (counters end in `_total`).
    pub name: String,
    /// Label pairs in order.
    pub labels: Vec<(String, String)>,
    /// The value.
    pub value: f64,
}

/// Parses every sample line (comments and `# EOF` skipped; unparsable lines ignored).
pub fn samples(text: &str) -> Vec<Sample> {
    text.lines().filter_map(parse_line).collect()
}

fn parse_line(line: &str) -> Option<Sample> {
    let line = line.trim();
    if line.is_empty() || line.starts_with('#') {
        return None;
    }
    let (name, labels, rest) = match line.find(['{', ' ']) {
        Some(i) if line.as_bytes()[i] == b'{' => {
            let (labels, after) = parse_labels(&line[i + 1..])?;
            (&line[..i], labels, after)
        }
        Some(i) => (&line[..i], Vec::new(), &line[i..]),
        None => return None,
    };
    let value = rest.split_whitespace().next()?;
    let value = match value {
        "+Inf" => f64::INFINITY,
        "-Inf" => f64::NEG_INFINITY,
        v => v.parse().ok()?,
    };
    Some(Sample { name: name.to_string(), labels, value })
}

/// Parses `a="x",b="y"}` and returns the pairs and what follows the `}`.
fn parse_labels(s: &str) -> Option<(Vec<(String, String)>, &str)> {
    let mut labels = Vec::new();
    let mut rest = s;
    loop {
        rest = rest.trim_start_matches([',', ' ']);
        if let Some(after) = rest.strip_prefix('}') {
            return Some((labels, after));
        }
        let eq = rest.find('=')?;
        let key = rest[..eq].trim().to_string();
        rest = rest[eq + 1..].strip_prefix('"')?;
        let mut value = String::new();
        let mut chars = rest.char_indices();
        let end = loop {
            let (i, c) = chars.next()?;
            match c {
                '\\' => match chars.next()?.1 {
                    'n' => value.push('\n'),
                    other => value.push(other),
                },
                '"' => break i,
                c => value.push(c),
            }
        };
        labels.push((key, value));
        rest = &rest[end + 1..];
    }
}

/// The sum of every series of `name` whose labels include all of `labels`; `None` when no
/// series matches (the metric has not been created yet).
pub fn metric(text: &str, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    let mut found = None;
    for s in samples(text) {
        if s.name != name {
            continue;
        }
        let matches = labels.iter().all(|(k, v)| s.labels.iter().any(|(sk, sv)| sk == k && sv == v));
        if matches {
            *found.get_or_insert(0.0) += s.value;
        }
    }
    found
}

/// Like [`metric`], with 0 when no series matches.
pub fn metric_or_zero(text: &str, name: &str, labels: &[(&str, &str)]) -> f64 {
    metric(text, name, labels).unwrap_or(0.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    const TEXT: &str = r#"# HELP fieldgate_readings_dropped Readings dropped.
# TYPE fieldgate_readings_dropped counter
fieldgate_readings_dropped_total{uplink="default/cloud",reason="buffer_full_rejected"} 7
fieldgate_readings_dropped_total{uplink="default/cloud",reason="no_uplink"} 2
fieldgate_readings_dropped_total{uplink="other/x",reason="too_large"} 1
fieldgate_uplink_connected{uplink="default/cloud"} 1
fieldgate_weird{a="q\"uo,te}",b="x"} 3.5
fieldgate_plain 42
fieldgate_delivery_latency_seconds_bucket{uplink="default/cloud",le="+Inf"} 9
# EOF
"#;

    #[test]
    fn sums_matching_series() {
        assert_eq!(metric(TEXT, "fieldgate_readings_dropped_total", &[]), Some(10.0));
        assert_eq!(metric(TEXT, "fieldgate_readings_dropped_total", &[("uplink", "default/cloud")]), Some(9.0));
        assert_eq!(metric(TEXT, "fieldgate_readings_dropped_total", &[("reason", "buffer_full_rejected")]), Some(7.0));
        assert_eq!(metric(TEXT, "fieldgate_readings_dropped_total", &[("reason", "max_age_expired")]), None);
        assert_eq!(metric(TEXT, "fieldgate_plain", &[]), Some(42.0));
        assert_eq!(metric(TEXT, "fieldgate_weird", &[("a", "q\"uo,te}")]), Some(3.5));
        assert_eq!(metric(TEXT, "fieldgate_delivery_latency_seconds_bucket", &[("le", "+Inf")]), Some(9.0));
        assert_eq!(metric(TEXT, "fieldgate_uplink_connected", &[("uplink", "default/cloud")]), Some(1.0));
    }

    #[test]
    fn reads_plain_and_chunked_responses() {
        let (code, body) = parse_response(b"HTTP/1.0 200 OK\r\ncontent-type: text/plain\r\n\r\nhello").unwrap();
        assert_eq!((code, body.as_str()), (200, "hello"));
        let (code, body) =
            parse_response(b"HTTP/1.1 503 NA\r\ntransfer-encoding: chunked\r\n\r\n3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n")
                .unwrap();
        assert_eq!((code, body.as_str()), (503, "abcde"));
    }
}
