//! End-to-end: the built `.wasm` inside a real Envoy (two workers), in front of the demo services,
//! driven by a real gRPC client and plain HTTP. Each test starts its own services and Envoy on free
//! ports and checks one behaviour of the contract, as the user reference in `docs/` describes it.
//!
//! The tests live in `e2e/`, one file per concern; this file holds the helpers they share.
//!
//! Run with `make test`, or `ENVOY=/path/to/envoy cargo test -p circuit-breaker-e2e` after `make build`.

#[path = "e2e/bad_configs.rs"]
mod bad_configs;
#[path = "e2e/failures.rs"]
mod failures;
#[path = "e2e/half_open.rs"]
mod half_open;
#[path = "e2e/keys.rs"]
mod keys;
#[path = "e2e/modes.rs"]
mod modes;
#[path = "e2e/observability.rs"]
mod observability;
#[path = "e2e/opening.rs"]
mod opening;
#[path = "e2e/rejection.rs"]
mod rejection;

use std::future::Future;
use std::time::Duration;

use e2e::pb::content_service_client::ContentServiceClient;
use e2e::pb::feed_service_client::FeedServiceClient;
use e2e::pb::user_service_client::UserServiceClient;
use e2e::{health_entry, raw_grpc, worker_channels, Fault, TestBed};
use serde_json::{json, Value};
use tonic::transport::Channel;
use tonic::{Code, Status};

/// Bound on one call through Envoy: far above anything a passing test needs, so a broken filter fails
/// the test instead of hanging the suite.
const CALL_BOUND: Duration = Duration::from_secs(20);

type Content = ContentServiceClient<Channel>;

async fn content(channel: &Channel) -> Content {
    ContentServiceClient::new(channel.clone())
}

async fn bounded<T>(what: &str, f: impl Future<Output = T>) -> T {
    tokio::time::timeout(CALL_BOUND, f)
        .await
        .unwrap_or_else(|_| panic!("{what}: no answer within {CALL_BOUND:?}"))
}

async fn get_post(client: &mut Content, id: &str) -> Result<e2e::pb::Post, Status> {
    bounded(
        "GetPost",
        client.get_post(e2e::pb::GetPostRequest { post_id: id.into() }),
    )
    .await
    .map(tonic::Response::into_inner)
}

async fn get_user(channel: &Channel) -> Result<e2e::pb::User, Status> {
    let mut client = UserServiceClient::new(channel.clone());
    bounded(
        "GetUser",
        client.get_user(e2e::pb::GetUserRequest {
            user_id: "u".into(),
        }),
    )
    .await
    .map(tonic::Response::into_inner)
}

async fn get_feed(channel: &Channel) -> Result<e2e::pb::Feed, Status> {
    let mut client = FeedServiceClient::new(channel.clone());
    bounded(
        "GetFeed",
        client.get_feed(e2e::pb::GetFeedRequest {
            user_id: "u".into(),
            limit: 3,
        }),
    )
    .await
    .map(tonic::Response::into_inner)
}

fn meta<'a>(status: &'a Status, name: &str) -> Option<&'a str> {
    status.metadata().get(name).and_then(|v| v.to_str().ok())
}

/// The call was answered by the breaker (contract section 4), not by the upstream.
#[track_caller]
fn assert_rejected(
    result: Result<impl std::fmt::Debug, Status>,
    key: &str,
    marker: &str,
) -> Status {
    let status = result.expect_err("expected the breaker to reject the call");
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");
    assert_eq!(
        status.message(),
        format!("circuit breaker open for {key}"),
        "{status:?}"
    );
    assert_eq!(
        meta(&status, "x-circuit-breaker"),
        Some(marker),
        "{status:?}"
    );
    status
}

/// The call reached the upstream and failed there with `code`.
#[track_caller]
fn assert_upstream_failure(result: Result<impl std::fmt::Debug, Status>, code: Code) {
    let status = result.expect_err("expected the upstream's failure");
    assert_eq!(status.code(), code, "{status:?}");
    assert!(
        !status.message().starts_with("circuit breaker open"),
        "rejected by the breaker: {status:?}"
    );
    assert_eq!(meta(&status, "x-circuit-breaker"), None, "{status:?}");
}

/// `grpc-retry-pushback-ms` of a rejection.
fn pushback_ms(status: &Status) -> u64 {
    meta(status, "grpc-retry-pushback-ms")
        .unwrap_or_else(|| panic!("no grpc-retry-pushback-ms: {status:?}"))
        .parse()
        .unwrap()
}

/// Waits out an open period the filter announced (plus a margin for two workers' clocks and
/// scheduling), so the next call is the first after `open_timeout`.
async fn wait_for_probes(pushback_ms: u64) {
    tokio::time::sleep(Duration::from_millis(pushback_ms + 150)).await;
}

async fn metric(bed: &TestBed, name: &str, labels: &[(&str, &str)]) -> f64 {
    bed.envoy.metric(name, labels).await.unwrap()
}

async fn health(bed: &TestBed, path: &str) -> (u16, Value) {
    e2e::health(&bed.envoy, path).await.unwrap()
}

fn breaker<'a>(health: &'a Value, upstream: &str) -> &'a Value {
    health_entry(health, upstream)
        .unwrap_or_else(|| panic!("no breaker for {upstream} in {health}"))
}

async fn start(name: &str, config: Value) -> TestBed {
    TestBed::start(name, &config).await.unwrap()
}

/// `GetPost` of post 1 as raw HTTP/2, to see the response's frames as they came.
async fn raw_get_post(channel: &Channel) -> e2e::RawGrpcResponse {
    let message = e2e::pb::GetPostRequest {
        post_id: "1".into(),
    };
    raw_grpc(channel, "/social.v1.ContentService/GetPost", &[], &message)
        .await
        .unwrap()
}
