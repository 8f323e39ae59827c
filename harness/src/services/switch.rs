//! The listener side shared by the gRPC and HTTP servers: the accept loop, the registry of open
//! connections (so [`Fault::Down`] can shut them), and going down and back up on the same port.

use std::collections::HashMap;
use std::io;
use std::net::{Ipv4Addr, Shutdown};
use std::os::fd::AsFd;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;
use tonic::transport::server::{Connected, TcpConnectInfo};

use super::Fault;

/// Locks a std mutex, carrying on after a panic elsewhere poisoned it: the data here (a fault, a set of
/// sockets) is valid whatever the panicking thread was doing.
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// State shared between a server's handle, its accept loop, its connections and its request layer.
pub(super) struct Control {
    pub(super) port: u16,
    fault: Mutex<Fault>,
    pub(super) requests: AtomicU64,
    /// Duplicates of the accepted sockets, by connection id, so `Down` can shut them from outside the
    /// tasks that own them. A connection removes itself when it is dropped.
    connections: Mutex<HashMap<u64, std::net::TcpStream>>,
    next_connection: AtomicU64,
    /// The running accept loop; `None` while `Down`.
    accept: Mutex<Option<JoinHandle<()>>>,
    /// Serialises `set_fault` calls, which await while switching the listener.
    switching: tokio::sync::Mutex<()>,
}

impl Control {
    pub(super) fn new(port: u16) -> Self {
        Self {
            port,
            fault: Mutex::new(Fault::Ok),
            requests: AtomicU64::new(0),
            connections: Mutex::new(HashMap::new()),
            next_connection: AtomicU64::new(0),
            accept: Mutex::new(None),
            switching: tokio::sync::Mutex::new(()),
        }
    }

    pub(super) fn fault(&self) -> Fault {
        *lock(&self.fault)
    }

    /// Counts a request that reached the server and returns the fault to answer it with.
    pub(super) fn arrive(&self) -> Fault {
        self.requests.fetch_add(1, Ordering::SeqCst);
        self.fault()
    }

    /// Registers an accepted socket so `Down` can reach it.
    fn track(self: &Arc<Self>, stream: TcpStream) -> io::Result<TrackedStream> {
        // Small unary calls: do not let Nagle hold back the last segment of a response.
        stream.set_nodelay(true)?;
        let dup = std::net::TcpStream::from(stream.as_fd().try_clone_to_owned()?);
        let id = self.next_connection.fetch_add(1, Ordering::Relaxed);
        lock(&self.connections).insert(id, dup);
        Ok(TrackedStream {
            inner: stream,
            _guard: ConnectionGuard {
                id,
                control: Arc::clone(self),
            },
        })
    }

    /// Shuts every open connection in both directions. The tasks serving them then read EOF and end,
    /// and the peer sees the connection close.
    fn close_connections(&self) {
        let connections: Vec<_> = lock(&self.connections).drain().map(|(_, s)| s).collect();
        for socket in connections {
            // Already closed by the peer is fine: the point is that it is closed.
            let _ = socket.shutdown(Shutdown::Both);
        }
    }

    fn stop_accepting(&self) -> Option<JoinHandle<()>> {
        let task = lock(&self.accept).take();
        if let Some(task) = &task {
            task.abort();
        }
        task
    }
}

/// Removes its connection from [`Control::connections`] when the connection is dropped.
struct ConnectionGuard {
    id: u64,
    control: Arc<Control>,
}

impl Drop for ConnectionGuard {
    fn drop(&mut self) {
        lock(&self.control.connections).remove(&self.id);
    }
}

/// An accepted TCP connection, registered with its server so [`Fault::Down`] can shut it.
pub struct TrackedStream {
    pub(super) inner: TcpStream,
    _guard: ConnectionGuard,
}

impl AsyncRead for TrackedStream {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl AsyncWrite for TrackedStream {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

impl Connected for TrackedStream {
    type ConnectInfo = TcpConnectInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.inner.connect_info()
    }
}

/// What a server does with a connection its accept loop took.
pub(super) type OnConnect = Arc<dyn Fn(TrackedStream) + Send + Sync>;

/// The listener side shared by the gRPC and HTTP servers: accepting, going down and coming back up on
/// the same port.
pub(super) struct Switch {
    pub(super) control: Arc<Control>,
    on_connect: OnConnect,
}

impl Switch {
    pub(super) fn start(
        control: Arc<Control>,
        on_connect: OnConnect,
        listener: TcpListener,
    ) -> Self {
        let switch = Self {
            control,
            on_connect,
        };
        switch.spawn_accept(listener);
        switch
    }

    fn spawn_accept(&self, listener: TcpListener) {
        let task = tokio::spawn(accept_loop(
            listener,
            Arc::clone(&self.control),
            Arc::clone(&self.on_connect),
        ));
        *lock(&self.control.accept) = Some(task);
    }

    pub(super) async fn set_fault(&self, fault: Fault) -> io::Result<()> {
        let _switching = self.control.switching.lock().await;
        let was = std::mem::replace(&mut *lock(&self.control.fault), fault);
        match (was == Fault::Down, fault == Fault::Down) {
            (false, true) => {
                if let Some(task) = self.control.stop_accepting() {
                    // Wait until the task is gone, so the listener is closed (connections refused) by the
                    // time the caller goes on.
                    let _ = task.await;
                }
                self.control.close_connections();
            }
            (true, false) => match bind_retrying(self.control.port).await {
                Ok(listener) => self.spawn_accept(listener),
                Err(e) => {
                    *lock(&self.control.fault) = Fault::Down;
                    return Err(e);
                }
            },
            _ => {}
        }
        Ok(())
    }
}

impl Drop for Switch {
    fn drop(&mut self) {
        // Connections served by tasks we do not own would otherwise outlive the server.
        let _ = self.control.stop_accepting();
        self.control.close_connections();
    }
}

/// Accepts until aborted, handing every connection to `on_connect`.
async fn accept_loop(listener: TcpListener, control: Arc<Control>, on_connect: OnConnect) {
    loop {
        match listener.accept().await {
            Ok((stream, _)) => {
                // A socket we cannot register could not be shut by `Down`; refuse it rather than serve
                // it untracked.
                if let Ok(tracked) = control.track(stream) {
                    on_connect(tracked);
                }
            }
            // Out of file descriptors and the like: pause instead of spinning on the error.
            Err(_) => tokio::time::sleep(Duration::from_millis(20)).await,
        }
    }
}

/// Binds `127.0.0.1:port` again after `Down`. The old connections may still be closing, so a busy port
/// is retried for a short while (tokio sets `SO_REUSEADDR`, so TIME_WAIT is not in the way).
async fn bind_retrying(port: u16) -> io::Result<TcpListener> {
    let mut attempt = 0;
    loop {
        match TcpListener::bind((Ipv4Addr::LOCALHOST, port)).await {
            Ok(listener) => return Ok(listener),
            Err(e) if e.kind() == io::ErrorKind::AddrInUse && attempt < 50 => {
                attempt += 1;
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            Err(e) => return Err(e),
        }
    }
}
