//! [`HttpServer`]: the plain HTTP/1.1 server, with the same faults as the gRPC services.

use std::fmt;
use std::io;
use std::net::Ipv4Addr;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};

use super::switch::{Control, OnConnect, Switch, TrackedStream};
use super::Fault;

/// A plain HTTP/1.1 server on `127.0.0.1` for the filter's non-gRPC path: answers every request with
/// `200 ok` under [`Fault::Ok`], 503 under [`Fault::Unavailable`], 500 under [`Fault::Internal`]
/// (with a text body), and the other faults as documented there. Keep-alive is supported; request
/// bodies are read by `content-length` and discarded.
pub struct HttpServer {
    switch: Switch,
}

impl HttpServer {
    /// Starts on a free port.
    pub async fn start() -> io::Result<Self> {
        Self::start_on(0).await
    }

    /// Starts on `port` (0 picks a free one).
    pub async fn start_on(port: u16) -> io::Result<Self> {
        let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, port)).await?;
        let control = Arc::new(Control::new(listener.local_addr()?.port()));
        let served = Arc::clone(&control);
        let on_connect: OnConnect = Arc::new(move |stream| {
            tokio::spawn(serve_http1(stream, Arc::clone(&served)));
        });
        Ok(Self {
            switch: Switch::start(control, on_connect, listener),
        })
    }

    /// The port it listens on (the same across `Down` and back).
    pub fn port(&self) -> u16 {
        self.switch.control.port
    }

    /// Requests that reached the server so far.
    pub fn requests(&self) -> u64 {
        self.switch.control.requests.load(Ordering::SeqCst)
    }

    /// The current fault.
    pub fn fault(&self) -> Fault {
        self.switch.control.fault()
    }

    /// Switches the fault; see [`super::GrpcService::set_fault`].
    pub async fn set_fault(&self, fault: Fault) -> io::Result<()> {
        self.switch.set_fault(fault).await
    }
}

impl fmt::Debug for HttpServer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HttpServer")
            .field("port", &self.port())
            .field("fault", &self.fault())
            .field("requests", &self.requests())
            .finish()
    }
}

/// How an HTTP/1.1 connection ended.
enum Ending {
    /// Close normally (EOF, error, or the client asked for it).
    Close,
    /// Close with a TCP RST ([`Fault::Reset`]).
    Reset,
}

async fn serve_http1(mut stream: TrackedStream, control: Arc<Control>) {
    if let Ending::Reset = exchange_http1(&mut stream.inner, &control).await {
        // Linger 0 turns the close into a RST: the peer gets no response and no orderly FIN.
        let _ = stream.inner.set_zero_linger();
    }
}

/// Serves requests on one connection until it ends.
async fn exchange_http1(stream: &mut TcpStream, control: &Control) -> Ending {
    let (read, mut write) = stream.split();
    let mut reader = BufReader::new(read);
    loop {
        let Some(close) = read_request(&mut reader).await else {
            return Ending::Close;
        };
        let (status, reason) = match control.arrive() {
            Fault::Ok => (200, "OK"),
            Fault::Slow(delay) => {
                tokio::time::sleep(delay).await;
                (200, "OK")
            }
            Fault::Unavailable => (503, "Service Unavailable"),
            Fault::Internal => (500, "Internal Server Error"),
            Fault::Hang => {
                // Hold the request until the client closes the connection.
                let mut sink = [0u8; 1024];
                while matches!(reader.read(&mut sink).await, Ok(n) if n > 0) {}
                return Ending::Close;
            }
            Fault::Reset | Fault::Down => return Ending::Reset,
        };
        let body = if status == 200 {
            "ok\n".to_string()
        } else {
            format!("injected fault: {status}\n")
        };
        let response = format!(
            "HTTP/1.1 {status} {reason}\r\ncontent-type: text/plain\r\ncontent-length: {}\r\n{}\r\n{body}",
            body.len(),
            if close { "connection: close\r\n" } else { "" },
        );
        if write.write_all(response.as_bytes()).await.is_err() || close {
            return Ending::Close;
        }
    }
}

/// Reads one request head and its `content-length` body. `Some(close)` when a request was read, where
/// `close` says the connection must close after the response (the client asked, or the body framing is
/// one this tiny server does not parse); `None` on EOF, error or an oversized head.
async fn read_request<R: AsyncRead + Unpin>(reader: &mut BufReader<R>) -> Option<bool> {
    // Bounds the head so a broken client cannot make the server buffer without limit.
    const MAX_HEAD: usize = 64 * 1024;
    let mut head_len = 0;
    let mut content_length: u64 = 0;
    let mut close = false;
    let mut first = true;
    loop {
        let mut line = String::new();
        let n = reader.read_line(&mut line).await.ok()?;
        head_len += n;
        if n == 0 || head_len > MAX_HEAD {
            return None;
        }
        let line = line.trim_end();
        if first {
            first = false;
            continue;
        }
        if line.is_empty() {
            break;
        }
        if let Some((name, value)) = line.split_once(':') {
            let value = value.trim();
            match name.trim().to_ascii_lowercase().as_str() {
                "content-length" => content_length = value.parse().ok()?,
                "transfer-encoding" => close = true,
                "connection" => close |= value.eq_ignore_ascii_case("close"),
                _ => {}
            }
        }
    }
    let mut body = (&mut *reader).take(content_length);
    tokio::io::copy(&mut body, &mut tokio::io::sink())
        .await
        .ok()?;
    Some(close)
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn http_get(port: u16) -> io::Result<String> {
        let mut stream = TcpStream::connect((Ipv4Addr::LOCALHOST, port)).await?;
        stream
            .write_all(b"GET /x HTTP/1.1\r\nhost: test\r\nconnection: close\r\n\r\n")
            .await?;
        let mut response = String::new();
        stream.read_to_string(&mut response).await?;
        Ok(response)
    }

    #[tokio::test]
    async fn http_server_applies_faults() {
        let server = HttpServer::start().await.unwrap();
        assert!(http_get(server.port())
            .await
            .unwrap()
            .starts_with("HTTP/1.1 200 OK\r\n"));
        server.set_fault(Fault::Unavailable).await.unwrap();
        assert!(http_get(server.port())
            .await
            .unwrap()
            .starts_with("HTTP/1.1 503 "));
        server.set_fault(Fault::Internal).await.unwrap();
        assert!(http_get(server.port())
            .await
            .unwrap()
            .starts_with("HTTP/1.1 500 "));
        server.set_fault(Fault::Reset).await.unwrap();
        assert!(http_get(server.port()).await.map_or(true, |s| s.is_empty()));
        server.set_fault(Fault::Down).await.unwrap();
        assert_eq!(
            http_get(server.port()).await.unwrap_err().kind(),
            io::ErrorKind::ConnectionRefused
        );
        server.set_fault(Fault::Ok).await.unwrap();
        assert!(http_get(server.port())
            .await
            .unwrap()
            .starts_with("HTTP/1.1 200 OK\r\n"));
        assert_eq!(server.requests(), 5);
    }

    #[tokio::test]
    async fn http_server_keeps_connections_alive() {
        let server = HttpServer::start().await.unwrap();
        let mut stream = TcpStream::connect((Ipv4Addr::LOCALHOST, server.port()))
            .await
            .unwrap();
        stream
            .write_all(b"POST /a HTTP/1.1\r\ncontent-length: 3\r\n\r\nabcGET /b HTTP/1.1\r\n\r\n")
            .await
            .unwrap();
        let mut seen = String::new();
        let mut buf = [0u8; 512];
        while seen.matches("HTTP/1.1 200").count() < 2 {
            let n = stream.read(&mut buf).await.unwrap();
            assert!(n > 0, "closed early: {seen}");
            seen.push_str(std::str::from_utf8(&buf[..n]).unwrap());
        }
        assert_eq!(server.requests(), 2);
    }
}
