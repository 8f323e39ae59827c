//! [`GrpcService`]: one demo gRPC service on a port, its fault switchable while it runs.

use std::fmt;
use std::io;
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::atomic::Ordering;
use std::sync::Arc;

use tokio::net::TcpListener;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_stream::wrappers::UnboundedReceiverStream;

use super::fault::FaultLayer;
use super::handlers::{Auth, Content, Feeds, Users};
use super::switch::{Control, OnConnect, Switch, TrackedStream};
use super::{pb, Fault, ServiceKind};

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

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use tokio::net::TcpStream;
    use tonic::{Code, Response, Status};

    use super::*;
    use crate::services::MISSING_POST_ID;
    use pb::content_service_client::ContentServiceClient;

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
}
