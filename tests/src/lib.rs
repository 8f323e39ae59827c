//! Support for the end-to-end tests: a real Envoy with the built `.wasm` filter in front of the demo
//! services.
//!
//! The runner itself lives in [`harness::envoy`] (the demo and the bench use it too) and is
//! re-exported here: [`Envoy`] renders `envoy/e2e.yaml`, starts Envoy with two workers, waits until it
//! serves and kills it on drop; [`Metrics`] reads `/stats/prometheus`. So are the demo services of
//! [`harness::services`], started together by [`Upstreams`]. This crate adds what only the tests need:
//! [`TestBed`], the services with an Envoy in front; [`worker_channels`], one connection on each Envoy
//! worker; [`raw_grpc`], a gRPC call sent and read by hand; and [`health`], the health endpoint's
//! answer.
//!
//! Envoy comes from `ENVOY`, else the project virtualenv (`make test` installs it); the filter from
//! `CB_WASM`, else `dist/circuit_breaker.wasm` (`make build`).
#![forbid(unsafe_code)]

use std::time::{Duration, Instant};

use http_body_util::BodyExt;
use tonic::codegen::{http, Bytes, Service};
use tonic::transport::Channel;

mod bed;
mod dead;
mod health;

pub use bed::TestBed;
pub use dead::DeadHost;
pub use harness::envoy::*;
pub use harness::services::{
    pb, Fault, GrpcService, HttpServer, ServiceKind, Upstreams, MISSING_POST_ID,
};
pub use health::{health, health_entry};

/// Bound on one raw gRPC exchange, so a broken filter fails the test instead of hanging the suite.
const RAW_GRPC_TIMEOUT: Duration = Duration::from_secs(15);

/// Two gRPC channels (two connections) served by the two different Envoy workers.
///
/// The e2e listener balances connections exactly (each new one goes to the worker with the fewest),
/// so opening two while no other connection is open puts one on each. This checks it with Envoy's
/// per-worker listener stats rather than trusting it: a test that claims to run across workers must.
pub async fn worker_channels(envoy: &Envoy) -> Result<[Channel; 2]> {
    let first = envoy.channel().await?;
    let second = envoy.channel().await?;
    // The client's connect returns once the kernel has the connection; a worker counts it a moment
    // later, so poll the stats for a while.
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let metrics = envoy.metrics().await?;
        let active = |worker: &str| {
            metrics.sum(
                "envoy_listener_worker_downstream_cx_active",
                &[("envoy_worker_id", worker)],
            )
        };
        if active("0") >= 1.0 && active("1") >= 1.0 {
            return Ok([first, second]);
        }
        if Instant::now() > deadline {
            return Err(Error(format!(
                "expected one connection on each worker:\n{}",
                metrics.dump("envoy_listener_worker_downstream_cx_active")
            )));
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A gRPC response as it came over the wire: status, headers, body and trailers apart, so a test can
/// tell a trailers-only response from one with a trailers frame.
#[derive(Debug)]
pub struct RawGrpcResponse {
    /// HTTP status.
    pub status: u16,
    /// Response headers (for a trailers-only response, these carry `grpc-status`).
    pub headers: http::HeaderMap,
    /// The body bytes (length-prefixed messages).
    pub body: Vec<u8>,
    /// Trailers, if a trailers frame came.
    pub trailers: Option<http::HeaderMap>,
}

impl RawGrpcResponse {
    /// Header `name` as text.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }

    /// `grpc-status`, from the trailers or else the headers.
    pub fn grpc_status(&self) -> Option<&str> {
        self.trailers
            .as_ref()
            .and_then(|t| t.get("grpc-status"))
            .or_else(|| self.headers.get("grpc-status"))
            .and_then(|v| v.to_str().ok())
    }
}

/// Sends one unary gRPC call by hand over `channel`: `POST path` with `message` framed as gRPC and
/// `headers` added verbatim. tonic's own client drops reserved request headers such as `grpc-status`;
/// the spoofing tests need to send them.
pub async fn raw_grpc(
    channel: &Channel,
    path: &str,
    headers: &[(&str, &str)],
    message: &impl prost::Message,
) -> Result<RawGrpcResponse> {
    let payload = message.encode_to_vec();
    let len = u32::try_from(payload.len()).map_err(|_| Error("message too large".into()))?;
    // gRPC framing: a compression flag byte (0: none), the big-endian length, the message.
    let mut framed = vec![0u8];
    framed.extend_from_slice(&len.to_be_bytes());
    framed.extend_from_slice(&payload);
    let mut request = http::Request::builder()
        .method("POST")
        .uri(format!("http://127.0.0.1{path}"))
        .header("content-type", "application/grpc")
        .header("te", "trailers");
    for (name, value) in headers {
        request = request.header(*name, *value);
    }
    let body = tonic::body::Body::new(http_body_util::Full::new(Bytes::from(framed)));
    let request = request
        .body(body)
        .map_err(|e| Error(format!("bad request: {e}")))?;
    let mut channel = channel.clone();
    let exchange = async {
        std::future::poll_fn(|cx| channel.poll_ready(cx))
            .await
            .map_err(|e| Error(e.to_string()))?;
        let response = channel
            .call(request)
            .await
            .map_err(|e| Error(format!("{path}: {e}")))?;
        let (parts, body) = response.into_parts();
        let collected = body
            .collect()
            .await
            .map_err(|e| Error(format!("{path}: body: {e}")))?;
        let trailers = collected.trailers().cloned();
        Ok(RawGrpcResponse {
            status: parts.status.as_u16(),
            headers: parts.headers,
            body: collected.to_bytes().to_vec(),
            trailers,
        })
    };
    tokio::time::timeout(RAW_GRPC_TIMEOUT, exchange)
        .await
        .map_err(|_| Error(format!("{path}: no response within {RAW_GRPC_TIMEOUT:?}")))?
}
