//! Talking to Envoy: plain HTTP/1.1 requests (the admin interface, the listener's non-gRPC path) and
//! gRPC channels.

use std::net::SocketAddr;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use super::{Error, Result};

/// Bound on one plain HTTP exchange, so a broken test fails instead of hanging the suite.
const HTTP_TIMEOUT: Duration = Duration::from_secs(15);

/// Opens an h2c channel to `addr`, optionally with another `:authority`.
pub async fn channel_to(
    addr: SocketAddr,
    authority: Option<&str>,
) -> Result<tonic::transport::Channel> {
    let mut endpoint = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
        .map_err(|e| Error(e.to_string()))?
        .connect_timeout(Duration::from_secs(5));
    if let Some(authority) = authority {
        let origin = format!("http://{authority}")
            .parse()
            .map_err(|e| Error(format!("bad authority {authority}: {e}")))?;
        endpoint = endpoint.origin(origin);
    }
    endpoint
        .connect()
        .await
        .map_err(|e| Error(format!("cannot connect to {addr}: {e}")))
}

/// An HTTP/1.1 response, read whole.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HttpResponse {
    /// Status code.
    pub status: u16,
    /// Headers in order, names lower-cased.
    pub headers: Vec<(String, String)>,
    /// Body as text (lossy).
    pub body: String,
}

impl HttpResponse {
    /// The first value of header `name` (case-insensitive).
    pub fn header(&self, name: &str) -> Option<&str> {
        let name = name.to_ascii_lowercase();
        self.headers
            .iter()
            .find(|(k, _)| *k == name)
            .map(|(_, v)| v.as_str())
    }

    /// The body as JSON.
    pub fn json(&self) -> Result<serde_json::Value> {
        serde_json::from_str(&self.body)
            .map_err(|e| Error(format!("body is not JSON ({e}): {}", self.body)))
    }
}

/// Sends one HTTP/1.1 request with `connection: close` and reads the whole response. Enough for
/// Envoy's admin interface and for the listener's plain-HTTP path; no dependency on an HTTP client.
pub async fn http_request(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
) -> Result<HttpResponse> {
    let exchange = async {
        let mut stream = TcpStream::connect(addr).await?;
        let mut request =
            format!("{method} {path} HTTP/1.1\r\nhost: {addr}\r\nconnection: close\r\n");
        for (name, value) in headers {
            request.push_str(&format!("{name}: {value}\r\n"));
        }
        request.push_str("\r\n");
        stream.write_all(request.as_bytes()).await?;
        // Read until the response is complete rather than to the end of the stream: Envoy holds a
        // connection it asked to close open for its `delayed_close_timeout` (1 s) after a local reply.
        let mut raw = Vec::new();
        let mut chunk = [0u8; 8192];
        while !is_complete(&raw) {
            let n = stream.read(&mut chunk).await?;
            if n == 0 {
                break;
            }
            raw.extend_from_slice(chunk.get(..n).unwrap_or_default());
        }
        Ok::<_, std::io::Error>(raw)
    };
    let raw = tokio::time::timeout(HTTP_TIMEOUT, exchange)
        .await
        .map_err(|_| {
            Error(format!(
                "{method} {addr}{path}: no response within {HTTP_TIMEOUT:?}"
            ))
        })?
        .map_err(|e| Error(format!("{method} {addr}{path}: {e}")))?;
    parse_response(&raw).ok_or_else(|| {
        Error(format!(
            "{method} {addr}{path}: unparsable response: {}",
            String::from_utf8_lossy(&raw)
        ))
    })
}

/// Whether `raw` holds a whole response: its headers, and then the body its `content-length` gives, or
/// a chunked body up to its last chunk. Without either, only the end of the stream ends it.
fn is_complete(raw: &[u8]) -> bool {
    let Some(split) = raw.windows(4).position(|w| w == b"\r\n\r\n") else {
        return false;
    };
    let head = String::from_utf8_lossy(raw.get(..split).unwrap_or_default()).to_ascii_lowercase();
    let body = raw.get(split + 4..).unwrap_or_default();
    let header = |name: &str| {
        head.split("\r\n")
            .filter_map(|l| l.split_once(':'))
            .find(|(k, _)| k.trim() == name)
            .map(|(_, v)| v.trim().to_string())
    };
    if header("transfer-encoding").is_some_and(|v| v == "chunked") {
        return dechunk(body).is_some();
    }
    header("content-length")
        .and_then(|v| v.parse::<usize>().ok())
        .is_some_and(|len| body.len() >= len)
}

fn parse_response(raw: &[u8]) -> Option<HttpResponse> {
    let split = raw.windows(4).position(|w| w == b"\r\n\r\n")?;
    let head = String::from_utf8_lossy(raw.get(..split)?);
    let mut body = raw.get(split + 4..)?.to_vec();
    let mut lines = head.split("\r\n");
    let status = lines.next()?.split_whitespace().nth(1)?.parse().ok()?;
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_string()))
        .collect();
    let chunked = headers
        .iter()
        .any(|(k, v)| k == "transfer-encoding" && v.eq_ignore_ascii_case("chunked"));
    if chunked {
        body = dechunk(&body)?;
    }
    Some(HttpResponse {
        status,
        headers,
        body: String::from_utf8_lossy(&body).into_owned(),
    })
}

fn dechunk(mut raw: &[u8]) -> Option<Vec<u8>> {
    let mut out = Vec::new();
    loop {
        let line_end = raw.windows(2).position(|w| w == b"\r\n")?;
        let size_text = String::from_utf8_lossy(raw.get(..line_end)?).into_owned();
        let size = usize::from_str_radix(size_text.split(';').next()?.trim(), 16).ok()?;
        raw = raw.get(line_end + 2..)?;
        if size == 0 {
            return Some(out);
        }
        out.extend_from_slice(raw.get(..size)?);
        raw = raw.get(size + 2..)?;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_http_responses() {
        let r = parse_response(
            b"HTTP/1.1 503 Service Unavailable\r\nRetry-After: 2\r\ncontent-length: 2\r\n\r\n{}",
        )
        .unwrap();
        assert_eq!(
            (r.status, r.header("retry-after"), r.body.as_str()),
            (503, Some("2"), "{}")
        );
        let chunked = b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n";
        let r = parse_response(chunked).unwrap();
        assert_eq!(r.body, "abcde");
        assert!(is_complete(chunked));
        assert!(!is_complete(&chunked[..chunked.len() - 7]));
        let sized = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n{}";
        assert!(is_complete(sized) && !is_complete(&sized[..sized.len() - 1]));
        assert!(!is_complete(b"HTTP/1.1 200 OK\r\n\r\nuntil the end"));
    }
}
