//! [`TestBed`]: what most end-to-end tests start with.

use crate::{Envoy, GrpcService, HttpServer, Result, Upstreams};

/// The demo services, a plain-HTTP server and an Envoy in front of them.
pub struct TestBed {
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
    /// Envoy with the filter configured as asked.
    pub envoy: Envoy,
}

impl TestBed {
    /// Starts everything (the services as the demo does, with [`Upstreams`]); `filter_config` is the
    /// filter's JSON.
    pub async fn start(name: &str, filter_config: &serde_json::Value) -> Result<Self> {
        let upstreams = Upstreams::start().await?;
        let envoy = Envoy::start(name, &upstreams.ports(), &filter_config.to_string()).await?;
        let Upstreams {
            user,
            content,
            feed,
            auth,
            web,
        } = upstreams;
        Ok(Self {
            user,
            content,
            feed,
            auth,
            web,
            envoy,
        })
    }
}
