//! [`Upstreams`]: every server the shipped bootstraps route to, started together. The demo and the
//! end-to-end test bed both start their services here.

use std::io;

use super::{GrpcService, HttpServer, ServiceKind};
use crate::envoy::UpstreamPorts;

/// The four demo gRPC services and the plain-HTTP server, each on a free port: what the shipped
/// bootstraps route to.
pub struct Upstreams {
    /// `social.v1.UserService`, cluster `user`.
    pub user: GrpcService,
    /// `social.v1.ContentService`, cluster `content`.
    pub content: GrpcService,
    /// `social.v1.FeedService`, cluster `feed`.
    pub feed: GrpcService,
    /// `social.v1.AuthService`, cluster `auth`.
    pub auth: GrpcService,
    /// Plain HTTP/1.1, cluster `web` (every path not under a gRPC service).
    pub web: HttpServer,
}

impl Upstreams {
    /// Starts all five.
    pub async fn start() -> io::Result<Self> {
        Ok(Self {
            user: GrpcService::start(ServiceKind::User).await?,
            content: GrpcService::start(ServiceKind::Content).await?,
            feed: GrpcService::start(ServiceKind::Feed).await?,
            auth: GrpcService::start(ServiceKind::Auth).await?,
            web: HttpServer::start().await?,
        })
    }

    /// Their ports, for a bootstrap template.
    pub fn ports(&self) -> UpstreamPorts {
        UpstreamPorts {
            user: self.user.port(),
            content: self.content.port(),
            feed: self.feed.port(),
            auth: self.auth.port(),
            web: self.web.port(),
        }
    }

    /// The service of `kind`.
    pub fn service(&self, kind: ServiceKind) -> &GrpcService {
        match kind {
            ServiceKind::User => &self.user,
            ServiceKind::Content => &self.content,
            ServiceKind::Feed => &self.feed,
            ServiceKind::Auth => &self.auth,
        }
    }
}
