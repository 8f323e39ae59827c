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
//!
//! Files: `grpc.rs` ([`GrpcService`], one demo service on a port) and `handlers.rs` (what the four
//! answer); `http.rs` ([`HttpServer`]); `fault.rs` ([`Fault`] and the tower layer that applies it to
//! gRPC calls); `switch.rs` (the listener both servers share: accepting, going down, coming back on
//! the same port); `upstreams.rs` ([`Upstreams`]: all five started together, for the demo and the
//! tests).

use std::fmt;

mod fault;
mod grpc;
mod handlers;
mod http;
mod switch;
mod upstreams;

pub use fault::Fault;
pub use grpc::GrpcService;
pub use handlers::MISSING_POST_ID;
pub use http::HttpServer;
pub use switch::TrackedStream;
pub use upstreams::Upstreams;

/// The generated protobuf messages, clients and servers of package `social.v1`.
#[allow(missing_docs, clippy::all, clippy::pedantic)]
pub mod pb {
    tonic::include_proto!("social.v1");
}

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
