//! [`DeadHost`]: an upstream that accepts TCP connections and never writes a byte, as a hung process or
//! a host behind a blackhole looks to Envoy. Nothing ends its calls but a timeout or the client.

use std::net::{Ipv4Addr, SocketAddr};

use tokio::net::TcpListener;
use tokio::task::JoinHandle;

/// A listener on 127.0.0.1 that holds every connection open, silent, until it is dropped.
pub struct DeadHost {
    port: u16,
    task: JoinHandle<()>,
}

impl DeadHost {
    /// Listens on a free port.
    pub async fn start() -> std::io::Result<Self> {
        let listener = TcpListener::bind(SocketAddr::from((Ipv4Addr::LOCALHOST, 0))).await?;
        let port = listener.local_addr()?.port();
        let task = tokio::spawn(async move {
            // Bounded by the test's lifetime: the task is aborted on drop, and with it every socket.
            let mut held = Vec::new();
            while let Ok((socket, _)) = listener.accept().await {
                held.push(socket);
            }
        });
        Ok(Self { port, task })
    }

    /// Its port.
    pub fn port(&self) -> u16 {
        self.port
    }
}

impl Drop for DeadHost {
    fn drop(&mut self) {
        self.task.abort();
    }
}
