//! The demo services of a small social app (users, content, feed, auth), served with tonic on
//! `127.0.0.1`, each with a [`Fault`] that can be switched while it runs; and a tiny HTTP/1.1 server
//! with the same faults, for the filter's non-gRPC path.
//!
//! The end-to-end tests and `make demo` put Envoy with the filter in front of these and break them on
//! purpose. Every server counts the requests that reached it, so a test can tell a call the breaker let
//! through from one it rejected.
//!
//! What each fault looks like on the wire is documented on [`Fault`]; a fault applies to every method of
//! the service, and is applied in a tower layer in front of the generated tonic router, so the handlers
//! stay plain.

use std::collections::HashMap;
use std::convert::Infallible;
use std::fmt;
use std::future::Future;
use std::io;
use std::net::{Ipv4Addr, Shutdown, SocketAddr};
use std::os::fd::AsFd;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{
    AsyncBufReadExt, AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader, ReadBuf,
};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_stream::wrappers::UnboundedReceiverStream;
use tonic::codegen::http;
use tonic::transport::server::{Connected, TcpConnectInfo};
use tonic::{Request, Response, Status};

/// The generated protobuf messages, clients and servers of package `social.v1`.
#[allow(missing_docs, clippy::all, clippy::pedantic)]
pub mod pb {
    tonic::include_proto!("social.v1");
}

/// Boxed error, as tower and tonic pass them around.
type BoxError = Box<dyn std::error::Error + Send + Sync + 'static>;

/// One of the four demo services.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ServiceKind {
    /// `social.v1.UserService`: `GetUser`.
    User,
    /// `social.v1.ContentService`: `GetPost`, `ListPosts`.
    Content,
    /// `social.v1.FeedService`: `GetFeed`.
    Feed,
    /// `social.v1.AuthService`: `Check`.
    Auth,
}

impl ServiceKind {
    /// All four, in a fixed order.
    pub const ALL: [ServiceKind; 4] = [
        ServiceKind::User,
        ServiceKind::Content,
        ServiceKind::Feed,
        ServiceKind::Auth,
    ];

    /// Fully-qualified gRPC service name, as it appears in `:path` (`social.v1.UserService`).
    pub fn grpc_name(self) -> &'static str {
        match self {
            ServiceKind::User => "social.v1.UserService",
            ServiceKind::Content => "social.v1.ContentService",
            ServiceKind::Feed => "social.v1.FeedService",
            ServiceKind::Auth => "social.v1.AuthService",
        }
    }

    /// Name of the Envoy cluster the shipped configs route this service to (`user`, `content`, ...).
    pub fn cluster(self) -> &'static str {
        match self {
            ServiceKind::User => "user",
            ServiceKind::Content => "content",
            ServiceKind::Feed => "feed",
            ServiceKind::Auth => "auth",
        }
    }

    /// Route prefix of the service's methods: `/social.v1.UserService/`.
    pub fn path_prefix(self) -> String {
        format!("/{}/", self.grpc_name())
    }
}

impl fmt::Display for ServiceKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.cluster())
    }
}

/// How a server answers, switchable while it runs with `set_fault`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Fault {
    /// Answer normally (gRPC `OK`; HTTP 200).
    #[default]
    Ok,
    /// gRPC: status `UNAVAILABLE` (14) in a trailers-only response. HTTP: 503.
    Unavailable,
    /// gRPC: status `INTERNAL` (13). HTTP: 500.
    Internal,
    /// Answer normally after this delay.
    Slow(Duration),
    /// Never answer; the request is dropped only when the client (Envoy) gives up on it and resets the
    /// stream or closes the connection.
    Hang,
    /// Answer with no response at all. gRPC: the HTTP/2 stream is reset (`RST_STREAM` with
    /// `INTERNAL_ERROR`, before any response headers) while the connection stays up, which is what
    /// hyper does when the service itself fails. HTTP/1.1: the connection is closed with `SO_LINGER` 0,
    /// so the peer sees a TCP RST instead of a response.
    Reset,
    /// The listener is closed, so new connections are refused, and the open connections are shut down
    /// (Envoy pools upstream connections; without this it would keep using them). Switching to any
    /// other fault listens again on the same port.
    Down,
}

/// Locks a std mutex, carrying on after a panic elsewhere poisoned it: the data here (a fault, a set of
/// sockets) is valid whatever the panicking thread was doing.
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// State shared between a server's handle, its accept loop, its connections and its request layer.
struct Control {
    port: u16,
    fault: Mutex<Fault>,
    requests: AtomicU64,
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
    fn new(port: u16) -> Self {
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

    fn fault(&self) -> Fault {
        *lock(&self.fault)
    }

    /// Counts a request that reached the server and returns the fault to answer it with.
    fn arrive(&self) -> Fault {
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
    inner: TcpStream,
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
type OnConnect = Arc<dyn Fn(TrackedStream) + Send + Sync>;

/// The listener side shared by the gRPC and HTTP servers: accepting, going down and coming back up on
/// the same port.
struct Switch {
    control: Arc<Control>,
    on_connect: OnConnect,
}

impl Switch {
    fn start(control: Arc<Control>, on_connect: OnConnect, listener: TcpListener) -> Self {
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

    async fn set_fault(&self, fault: Fault) -> io::Result<()> {
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

/// A running demo gRPC service on `127.0.0.1`. Dropping it stops the service and closes its
/// connections.
pub struct GrpcService {
    kind: ServiceKind,
    switch: Switch,
    server: JoinHandle<()>,
}

impl GrpcService {
    /// Starts `kind` on a free port.
    pub async fn start(kind: ServiceKind) -> io::Result<Self> {
        Self::start_on(kind, 0).await
    }

    /// Starts `kind` on `port` (0 picks a free one).
    pub async fn start_on(kind: ServiceKind, port: u16) -> io::Result<Self> {
        let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, port)).await?;
        let control = Arc::new(Control::new(listener.local_addr()?.port()));
        // tonic serves one stream of connections for the server's whole life; the accept loop feeds it,
        // so the listener can close and reopen underneath without restarting tonic.
        let (tx, rx) = mpsc::unbounded_channel::<io::Result<TrackedStream>>();
        let on_connect: OnConnect = Arc::new(move |stream| {
            let _ = tx.send(Ok(stream));
        });
        let server = tokio::spawn(serve_grpc(
            kind,
            Arc::clone(&control),
            UnboundedReceiverStream::new(rx),
        ));
        Ok(Self {
            kind,
            switch: Switch::start(control, on_connect, listener),
            server,
        })
    }

    /// Which service this is.
    pub fn kind(&self) -> ServiceKind {
        self.kind
    }

    /// The port it listens on (the same across `Down` and back).
    pub fn port(&self) -> u16 {
        self.switch.control.port
    }

    /// `127.0.0.1:port`.
    pub fn addr(&self) -> SocketAddr {
        SocketAddr::from((Ipv4Addr::LOCALHOST, self.port()))
    }

    /// Requests that reached the service so far, whatever the fault answered them.
    pub fn requests(&self) -> u64 {
        self.switch.control.requests.load(Ordering::SeqCst)
    }

    /// The current fault.
    pub fn fault(&self) -> Fault {
        self.switch.control.fault()
    }

    /// Switches the fault. Going `Down` returns once the port refuses connections and the open ones are
    /// shut; leaving `Down` returns once it listens again. Fails only when the port cannot be bound
    /// again (the fault then stays `Down`).
    pub async fn set_fault(&self, fault: Fault) -> io::Result<()> {
        self.switch.set_fault(fault).await
    }
}

impl Drop for GrpcService {
    fn drop(&mut self) {
        self.server.abort();
    }
}

impl fmt::Debug for GrpcService {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("GrpcService")
            .field("kind", &self.kind)
            .field("port", &self.port())
            .field("fault", &self.fault())
            .field("requests", &self.requests())
            .finish()
    }
}

/// Serves one service over the connections the accept loop hands over.
async fn serve_grpc(
    kind: ServiceKind,
    control: Arc<Control>,
    incoming: UnboundedReceiverStream<io::Result<TrackedStream>>,
) {
    use pb::auth_service_server::AuthServiceServer;
    use pb::content_service_server::ContentServiceServer;
    use pb::feed_service_server::FeedServiceServer;
    use pb::user_service_server::UserServiceServer;

    let mut server = tonic::transport::Server::builder().layer(FaultLayer { control });
    // Each server carries only its own service, so a route sent to the wrong cluster shows up as
    // UNIMPLEMENTED instead of silently working.
    let result = match kind {
        ServiceKind::User => {
            server
                .add_service(UserServiceServer::new(Users))
                .serve_with_incoming(incoming)
                .await
        }
        ServiceKind::Content => {
            server
                .add_service(ContentServiceServer::new(Content))
                .serve_with_incoming(incoming)
                .await
        }
        ServiceKind::Feed => {
            server
                .add_service(FeedServiceServer::new(Feeds))
                .serve_with_incoming(incoming)
                .await
        }
        ServiceKind::Auth => {
            server
                .add_service(AuthServiceServer::new(Auth))
                .serve_with_incoming(incoming)
                .await
        }
    };
    if let Err(e) = result {
        eprintln!("demo service {kind} stopped: {e}");
    }
}

/// Applies the server's [`Fault`] to every request before the generated router sees it.
#[derive(Clone)]
struct FaultLayer {
    control: Arc<Control>,
}

impl<S> tower_layer::Layer<S> for FaultLayer {
    type Service = FaultService<S>;

    fn layer(&self, inner: S) -> Self::Service {
        FaultService {
            inner,
            control: Arc::clone(&self.control),
        }
    }
}

/// See [`FaultLayer`].
#[derive(Clone)]
struct FaultService<S> {
    inner: S,
    control: Arc<Control>,
}

/// The error that makes hyper reset the stream for [`Fault::Reset`]. tonic turns only `Status` (and a
/// few transport errors) back into responses; anything else reaches hyper, which answers with
/// `RST_STREAM`.
#[derive(Debug)]
struct InjectedReset;

impl fmt::Display for InjectedReset {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("injected fault: stream reset")
    }
}

impl std::error::Error for InjectedReset {}

type ResponseFuture =
    Pin<Box<dyn Future<Output = Result<http::Response<tonic::body::Body>, BoxError>> + Send>>;

impl<S, B> tower_service::Service<http::Request<B>> for FaultService<S>
where
    S: tower_service::Service<
            http::Request<B>,
            Response = http::Response<tonic::body::Body>,
            Error = Infallible,
        > + Clone
        + Send
        + 'static,
    S::Future: Send,
    B: Send + 'static,
{
    type Response = http::Response<tonic::body::Body>;
    type Error = BoxError;
    type Future = ResponseFuture;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        // Readiness is checked on the clone that serves the call, below.
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: http::Request<B>) -> Self::Future {
        let mut inner = self.inner.clone();
        let fault = self.control.arrive();
        Box::pin(async move {
            match fault {
                Fault::Ok => {}
                Fault::Slow(delay) => tokio::time::sleep(delay).await,
                Fault::Unavailable => {
                    return Ok(Status::unavailable("injected fault: unavailable").into_http())
                }
                Fault::Internal => {
                    return Ok(Status::internal("injected fault: internal").into_http())
                }
                // Cancelled (dropped) by hyper when Envoy resets the stream or the connection closes.
                Fault::Hang => std::future::pending::<()>().await,
                // A request that raced with going down gets no answer either.
                Fault::Reset | Fault::Down => return Err(Box::new(InjectedReset) as BoxError),
            }
            let never = |e: Infallible| -> BoxError { match e {} };
            std::future::poll_fn(|cx| inner.poll_ready(cx))
                .await
                .map_err(never)?;
            inner.call(request).await.map_err(never)
        })
    }
}

/// `UserService`: every user exists and is called "User <id>".
#[derive(Debug, Clone, Copy)]
struct Users;

#[tonic::async_trait]
impl pb::user_service_server::UserService for Users {
    async fn get_user(
        &self,
        request: Request<pb::GetUserRequest>,
    ) -> Result<Response<pb::User>, Status> {
        let user_id = request.into_inner().user_id;
        Ok(Response::new(pb::User {
            display_name: format!("User {user_id}"),
            user_id,
        }))
    }
}

/// Post id that [`Content`] answers with `NOT_FOUND`: a client-side status, which the breaker must
/// count as a success.
pub const MISSING_POST_ID: &str = "missing";

/// `ContentService`: every post exists but [`MISSING_POST_ID`].
#[derive(Debug, Clone, Copy)]
struct Content;

fn post(post_id: String, author_id: String) -> pb::Post {
    pb::Post {
        text: format!("post {post_id} by {author_id}"),
        post_id,
        author_id,
    }
}

#[tonic::async_trait]
impl pb::content_service_server::ContentService for Content {
    async fn get_post(
        &self,
        request: Request<pb::GetPostRequest>,
    ) -> Result<Response<pb::Post>, Status> {
        let post_id = request.into_inner().post_id;
        if post_id == MISSING_POST_ID {
            return Err(Status::not_found(format!("no post {post_id}")));
        }
        Ok(Response::new(post(post_id, "author".to_string())))
    }

    async fn list_posts(
        &self,
        request: Request<pb::ListPostsRequest>,
    ) -> Result<Response<pb::ListPostsResponse>, Status> {
        let request = request.into_inner();
        let posts = (0..request.limit.min(50)).map(|i| {
            post(
                format!("{}-{i}", request.author_id),
                request.author_id.clone(),
            )
        });
        Ok(Response::new(pb::ListPostsResponse {
            posts: posts.collect(),
        }))
    }
}

/// `FeedService`: a feed of `limit` (at most 50) made-up post ids.
#[derive(Debug, Clone, Copy)]
struct Feeds;

#[tonic::async_trait]
impl pb::feed_service_server::FeedService for Feeds {
    async fn get_feed(
        &self,
        request: Request<pb::GetFeedRequest>,
    ) -> Result<Response<pb::Feed>, Status> {
        let request = request.into_inner();
        let post_ids = (0..request.limit.min(50))
            .map(|i| format!("{}-{i}", request.user_id))
            .collect();
        Ok(Response::new(pb::Feed {
            user_id: request.user_id,
            post_ids,
        }))
    }
}

/// `AuthService`: a token `valid-<user>` is allowed for `<user>`; anything else is not.
#[derive(Debug, Clone, Copy)]
struct Auth;

#[tonic::async_trait]
impl pb::auth_service_server::AuthService for Auth {
    async fn check(
        &self,
        request: Request<pb::CheckRequest>,
    ) -> Result<Response<pb::CheckResponse>, Status> {
        let token = request.into_inner().token;
        let response = match token.strip_prefix("valid-") {
            Some(user) => pb::CheckResponse {
                allowed: true,
                user_id: user.to_string(),
            },
            None => pb::CheckResponse {
                allowed: false,
                user_id: String::new(),
            },
        };
        Ok(Response::new(response))
    }
}

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

    /// Switches the fault; see [`GrpcService::set_fault`].
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
    use pb::content_service_client::ContentServiceClient;
    use tonic::Code;

    async fn client(service: &GrpcService) -> ContentServiceClient<tonic::transport::Channel> {
        ContentServiceClient::connect(format!("http://{}", service.addr()))
            .await
            .unwrap()
    }

    async fn get_post(
        client: &mut ContentServiceClient<tonic::transport::Channel>,
        id: &str,
    ) -> Result<pb::Post, Status> {
        let call = client.get_post(pb::GetPostRequest { post_id: id.into() });
        tokio::time::timeout(Duration::from_secs(5), call)
            .await
            .unwrap()
            .map(Response::into_inner)
    }

    #[tokio::test]
    async fn answers_and_counts_under_each_status_fault() {
        let service = GrpcService::start(ServiceKind::Content).await.unwrap();
        let mut c = client(&service).await;
        assert_eq!(get_post(&mut c, "7").await.unwrap().post_id, "7");
        assert_eq!(
            get_post(&mut c, MISSING_POST_ID).await.unwrap_err().code(),
            Code::NotFound
        );
        service.set_fault(Fault::Unavailable).await.unwrap();
        assert_eq!(
            get_post(&mut c, "7").await.unwrap_err().code(),
            Code::Unavailable
        );
        service.set_fault(Fault::Internal).await.unwrap();
        assert_eq!(
            get_post(&mut c, "7").await.unwrap_err().code(),
            Code::Internal
        );
        service
            .set_fault(Fault::Slow(Duration::from_millis(50)))
            .await
            .unwrap();
        assert_eq!(get_post(&mut c, "8").await.unwrap().post_id, "8");
        assert_eq!(service.requests(), 5);
    }

    #[tokio::test]
    async fn hang_holds_the_call_until_the_client_gives_up() {
        let service = GrpcService::start(ServiceKind::Content).await.unwrap();
        service.set_fault(Fault::Hang).await.unwrap();
        let mut c = client(&service).await;
        let call = c.get_post(pb::GetPostRequest {
            post_id: "1".into(),
        });
        assert!(tokio::time::timeout(Duration::from_millis(300), call)
            .await
            .is_err());
        assert_eq!(service.requests(), 1);
        // The connection is still usable once the fault is lifted.
        service.set_fault(Fault::Ok).await.unwrap();
        assert!(get_post(&mut c, "1").await.is_ok());
    }

    #[tokio::test]
    async fn reset_resets_the_stream_but_keeps_the_connection() {
        let service = GrpcService::start(ServiceKind::Content).await.unwrap();
        let mut c = client(&service).await;
        service.set_fault(Fault::Reset).await.unwrap();
        let status = get_post(&mut c, "1").await.unwrap_err();
        // RST_STREAM(INTERNAL_ERROR) maps to INTERNAL on the client; what matters is that no response
        // (no grpc-status from the server) came back.
        assert_eq!(status.code(), Code::Internal, "{status:?}");
        assert!(
            format!("{status:?}").contains("Reset(StreamId(1), INTERNAL_ERROR, Remote)"),
            "{status:?}"
        );
        service.set_fault(Fault::Ok).await.unwrap();
        assert!(get_post(&mut c, "1").await.is_ok());
        assert_eq!(service.requests(), 2);
    }

    #[tokio::test]
    async fn down_refuses_connections_and_up_serves_on_the_same_port() {
        let service = GrpcService::start(ServiceKind::Content).await.unwrap();
        let port = service.port();
        let mut c = client(&service).await;
        assert!(get_post(&mut c, "1").await.is_ok());
        service.set_fault(Fault::Down).await.unwrap();
        assert_eq!(
            TcpStream::connect(service.addr()).await.unwrap_err().kind(),
            io::ErrorKind::ConnectionRefused
        );
        // The pooled connection was shut too (tonic reports the closed connection as CANCELLED, a
        // failed reconnect as UNAVAILABLE).
        let status = get_post(&mut c, "1").await.unwrap_err();
        assert!(
            matches!(status.code(), Code::Cancelled | Code::Unavailable),
            "{status:?}"
        );
        service.set_fault(Fault::Ok).await.unwrap();
        assert_eq!(service.port(), port);
        let mut c = client(&service).await;
        assert!(get_post(&mut c, "1").await.is_ok());
        assert_eq!(service.requests(), 2);
    }

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
