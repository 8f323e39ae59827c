//! End-to-end: the built `.wasm` inside a real Envoy (two workers), in front of the demo services,
//! driven by a real gRPC client and plain HTTP. Each test starts its own services and Envoy on free
//! ports and checks one behaviour of the contract, as the user reference in `docs/` describes it.
//!
//! Run with `make test`, or `ENVOY=/path/to/envoy cargo test -p circuit-breaker-e2e` after `make build`.

use std::future::Future;
use std::time::Duration;

use e2e::pb::content_service_client::ContentServiceClient;
use e2e::pb::feed_service_client::FeedServiceClient;
use e2e::pb::user_service_client::UserServiceClient;
use e2e::{
    health_entry, raw_grpc, worker_channels, Envoy, Fault, Metrics, TestBed, MISSING_POST_ID,
};
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

async fn list_posts(client: &mut Content) -> Result<e2e::pb::ListPostsResponse, Status> {
    bounded(
        "ListPosts",
        client.list_posts(e2e::pb::ListPostsRequest {
            author_id: "a".into(),
            limit: 2,
        }),
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

/// A `GetPost` with extra request metadata (tonic sends what it allows; see [`raw_grpc`] for the rest).
async fn get_post_with(
    client: &mut Content,
    id: &str,
    metadata: &[(&'static str, &str)],
) -> Result<e2e::pb::Post, Status> {
    let mut request = tonic::Request::new(e2e::pb::GetPostRequest { post_id: id.into() });
    for (k, v) in metadata {
        request.metadata_mut().insert(*k, v.parse().unwrap());
    }
    bounded("GetPost", client.get_post(request))
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

/// Polls `f` until it returns true, for at most 10 s.
async fn eventually<F, Fut>(what: &str, mut f: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    for _ in 0..200 {
        if f().await {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("timed out waiting for {what}");
}

async fn metric(bed: &TestBed, name: &str, labels: &[(&str, &str)]) -> f64 {
    bed.envoy.metric(name, labels).await.unwrap()
}

async fn health(bed: &TestBed, path: &str) -> (u16, Value) {
    e2e::health(&bed.envoy, path).await.unwrap()
}

/// The health answer lists exactly the breakers of `keys` (in any order).
async fn assert_tracked<const N: usize>(bed: &TestBed, keys: [&str; N]) {
    let (_, body) = health(bed, "/health").await;
    let mut tracked: Vec<&str> = body["circuit_breakers"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|b| b["upstream"].as_str())
        .collect();
    tracked.sort_unstable();
    let mut expected = keys.to_vec();
    expected.sort_unstable();
    assert_eq!(tracked, expected, "{body}");
}

fn breaker<'a>(health: &'a Value, upstream: &str) -> &'a Value {
    health_entry(health, upstream)
        .unwrap_or_else(|| panic!("no breaker for {upstream} in {health}"))
}

async fn start(name: &str, config: Value) -> TestBed {
    TestBed::start(name, &config).await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn calls_pass_through_and_are_counted() {
    let bed = start("pass_through", json!({})).await;
    let channel = bed.envoy.channel().await.unwrap();
    let post = get_post(&mut content(&channel).await, "1").await.unwrap();
    assert_eq!(post.post_id, "1");
    assert_eq!(get_user(&channel).await.unwrap().user_id, "u");
    let r = bed.envoy.get("/hello").await.unwrap();
    assert_eq!((r.status, r.body.as_str()), (200, "ok\n"));
    assert_eq!(r.header("x-circuit-breaker"), None);
    assert_eq!(
        (
            bed.content.requests(),
            bed.user.requests(),
            bed.web.requests()
        ),
        (1, 1, 1)
    );
    let m = bed.envoy.metrics().await.unwrap();
    for upstream in ["content", "user", "web"] {
        assert_eq!(
            m.value(
                "circuit_breaker_calls_total",
                &[("upstream", upstream), ("result", "success")]
            ),
            Some(1.0)
        );
        assert_eq!(
            m.value("circuit_breaker_state", &[("upstream", upstream)]),
            Some(0.0)
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn consecutive_failures_open_the_breaker_across_workers() {
    let bed = start(
        "consecutive",
        json!({"failure_threshold": 3, "open_timeout": "30s"}),
    )
    .await;
    // One connection per Envoy worker; calls alternate between them, so the failures recorded by one
    // worker open the breaker for the other.
    let [a, b] = worker_channels(&bed.envoy).await.unwrap();
    let mut clients = [content(&a).await, content(&b).await];
    bed.content.set_fault(Fault::Unavailable).await.unwrap();
    for i in 0..3 {
        assert_upstream_failure(get_post(&mut clients[i % 2], "1").await, Code::Unavailable);
    }
    assert_eq!(bed.content.requests(), 3);
    for i in 0..4 {
        let status = assert_rejected(get_post(&mut clients[i % 2], "1").await, "content", "open");
        let ms = pushback_ms(&status);
        assert!(ms > 0 && ms <= 30_000, "pushback {ms}");
    }
    assert_eq!(
        bed.content.requests(),
        3,
        "rejected calls must not reach the upstream"
    );

    // The rejection on the wire: a trailers-only response (grpc-status in the headers, no body, no
    // trailers frame), HTTP 200, application/grpc.
    let raw = raw_get_post(&a).await;
    assert_eq!(raw.status, 200, "{raw:?}");
    assert_eq!(
        raw.header("content-type"),
        Some("application/grpc"),
        "{raw:?}"
    );
    assert_eq!(raw.header("grpc-status"), Some("14"), "{raw:?}");
    assert_eq!(
        raw.header("grpc-message"),
        Some("circuit breaker open for content"),
        "{raw:?}"
    );
    assert_eq!(raw.header("x-circuit-breaker"), Some("open"), "{raw:?}");
    assert!(raw.header("grpc-retry-pushback-ms").is_some(), "{raw:?}");
    assert!(
        raw.body.is_empty() && raw.trailers.is_none(),
        "not trailers-only: {raw:?}"
    );

    let m = bed.envoy.metrics().await.unwrap();
    assert_eq!(
        m.value(
            "circuit_breaker_calls_total",
            &[("upstream", "content"), ("result", "failure")]
        ),
        Some(3.0)
    );
    assert_eq!(
        m.value(
            "circuit_breaker_rejected_calls_total",
            &[("upstream", "content")]
        ),
        Some(5.0)
    );
    assert_eq!(
        m.value(
            "circuit_breaker_open_total",
            &[("upstream", "content"), ("reason", "consecutive_failures")]
        ),
        Some(1.0)
    );
    assert_eq!(
        m.value(
            "circuit_breaker_state_changes_total",
            &[
                ("upstream", "content"),
                ("from_state", "closed"),
                ("to_state", "open")
            ]
        ),
        Some(1.0)
    );
    assert_eq!(
        m.value("circuit_breaker_state", &[("upstream", "content")]),
        Some(1.0)
    );
    let log = bed.envoy.log();
    assert!(
        log.contains("upstream=content from=closed to=open reason=consecutive_failures"),
        "state change not logged at info; log: {}",
        bed.envoy.log_path().display()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn error_rate_opens_the_breaker() {
    let config = json!({
        "failure_threshold": 0, "error_rate_threshold": 0.5, "window_size": 10, "minimum_requests": 10,
        "open_timeout": "30s"
    });
    let bed = start("error_rate", config).await;
    let [a, b] = worker_channels(&bed.envoy).await.unwrap();
    let mut clients = [content(&a).await, content(&b).await];
    // Success and failure alternate, so no run of failures matters: only the rate over the window.
    for i in 0..10 {
        let fault = if i % 2 == 0 {
            Fault::Ok
        } else {
            Fault::Unavailable
        };
        bed.content.set_fault(fault).await.unwrap();
        let result = get_post(&mut clients[i % 2], "1").await;
        if fault == Fault::Ok {
            result.unwrap();
        } else {
            assert_upstream_failure(result, Code::Unavailable);
        }
    }
    assert_eq!(
        bed.content.requests(),
        10,
        "the breaker opened before minimum_requests"
    );
    bed.content.set_fault(Fault::Ok).await.unwrap();
    assert_rejected(get_post(&mut clients[0], "1").await, "content", "open");
    assert_eq!(bed.content.requests(), 10);
    assert_eq!(
        metric(
            &bed,
            "circuit_breaker_open_total",
            &[("upstream", "content"), ("reason", "error_rate")]
        )
        .await,
        1.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn error_rate_over_a_time_window_opens_the_breaker() {
    let config = json!({
        "failure_threshold": 0, "error_rate_threshold": 0.5, "window_duration": "30s",
        "minimum_requests": 4, "open_timeout": "30s"
    });
    let bed = start("time_window", config).await;
    let [a, b] = worker_channels(&bed.envoy).await.unwrap();
    let mut clients = [content(&a).await, content(&b).await];
    for i in 0..2 {
        get_post(&mut clients[i % 2], "1").await.unwrap();
    }
    bed.content.set_fault(Fault::Unavailable).await.unwrap();
    for i in 0..2 {
        assert_upstream_failure(get_post(&mut clients[i % 2], "1").await, Code::Unavailable);
    }
    assert_rejected(get_post(&mut clients[0], "1").await, "content", "open");
    assert_eq!(bed.content.requests(), 4);
    assert_eq!(
        metric(
            &bed,
            "circuit_breaker_open_total",
            &[("upstream", "content"), ("reason", "error_rate")]
        )
        .await,
        1.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_calls_open_the_breaker() {
    let config = json!({
        "failure_threshold": 0, "slow_call_duration": "200ms", "slow_call_rate_threshold": 0.5,
        "window_size": 4, "minimum_requests": 4, "open_timeout": "30s"
    });
    let bed = start("slow_calls", config).await;
    let [a, b] = worker_channels(&bed.envoy).await.unwrap();
    let mut clients = [content(&a).await, content(&b).await];
    bed.content
        .set_fault(Fault::Slow(Duration::from_millis(400)))
        .await
        .unwrap();
    for i in 0..4 {
        get_post(&mut clients[i % 2], "1").await.unwrap();
    }
    assert_rejected(get_post(&mut clients[0], "1").await, "content", "open");
    assert_eq!(bed.content.requests(), 4);
    let m = bed.envoy.metrics().await.unwrap();
    assert_eq!(
        m.value(
            "circuit_breaker_slow_calls_total",
            &[("upstream", "content")]
        ),
        Some(4.0)
    );
    assert_eq!(
        m.value(
            "circuit_breaker_calls_total",
            &[("upstream", "content"), ("result", "success")]
        ),
        Some(4.0)
    );
    assert_eq!(
        m.value(
            "circuit_breaker_open_total",
            &[("upstream", "content"), ("reason", "slow_call_rate")]
        ),
        Some(1.0)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn half_open_lets_only_the_probe_limit_through() {
    let config = json!({
        "failure_threshold": 2, "open_timeout": "1s", "half_open_max_requests": 2, "success_threshold": 2
    });
    let bed = start("half_open_limit", config).await;
    let [a, b] = worker_channels(&bed.envoy).await.unwrap();
    let mut clients = [content(&a).await, content(&b).await];
    bed.content.set_fault(Fault::Unavailable).await.unwrap();
    for i in 0..2 {
        assert_upstream_failure(get_post(&mut clients[i % 2], "1").await, Code::Unavailable);
    }
    let status = assert_rejected(get_post(&mut clients[0], "1").await, "content", "open");
    bed.content.set_fault(Fault::Hang).await.unwrap();
    wait_for_probes(pushback_ms(&status)).await;

    // Two probes, one from each worker, held by the hanging upstream.
    let probes: Vec<_> = (0..2)
        .map(|i| {
            let mut client = clients[i].clone();
            tokio::spawn(async move {
                client
                    .get_post(e2e::pb::GetPostRequest {
                        post_id: "p".into(),
                    })
                    .await
            })
        })
        .collect();
    eventually("both probes to reach the upstream", || async {
        bed.content.requests() == 4
    })
    .await;
    assert_eq!(
        metric(&bed, "circuit_breaker_state", &[("upstream", "content")]).await,
        2.0
    );

    // No probe slot left on either worker.
    for client in &mut clients {
        assert_rejected(get_post(client, "1").await, "content", "half_open");
    }
    assert_eq!(bed.content.requests(), 4);

    // Cancelling the probes (the client gives up) releases their slots: the next call is a probe again.
    for probe in probes {
        probe.abort();
    }
    bed.content.set_fault(Fault::Ok).await.unwrap();
    eventually("a released probe slot", || {
        let mut client = clients[1].clone();
        async move { get_post(&mut client, "1").await.is_ok() }
    })
    .await;
    assert_eq!(bed.content.requests(), 5);
    // The cancelled probes were ignored, not failures: the breaker is still HalfOpen, never re-opened.
    let m = bed.envoy.metrics().await.unwrap();
    assert_eq!(
        m.value("circuit_breaker_state", &[("upstream", "content")]),
        Some(2.0)
    );
    let reopened = [
        ("upstream", "content"),
        ("from_state", "half_open"),
        ("to_state", "open"),
    ];
    assert_eq!(
        m.value("circuit_breaker_state_changes_total", &reopened),
        None,
        "{}",
        m.dump("circuit_breaker")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn successful_probes_close_the_breaker() {
    let config = json!({
        "failure_threshold": 2, "open_timeout": "1s", "success_threshold": 2,
        "health_path": "/health/circuit-breakers"
    });
    let bed = start("recovery", config).await;
    let [a, b] = worker_channels(&bed.envoy).await.unwrap();
    let mut clients = [content(&a).await, content(&b).await];
    bed.content.set_fault(Fault::Unavailable).await.unwrap();
    for i in 0..2 {
        assert_upstream_failure(get_post(&mut clients[i % 2], "1").await, Code::Unavailable);
    }
    let status = assert_rejected(get_post(&mut clients[0], "1").await, "content", "open");
    bed.content.set_fault(Fault::Ok).await.unwrap();
    wait_for_probes(pushback_ms(&status)).await;

    // Probes from alternating workers: two successes close it.
    get_post(&mut clients[1], "1").await.unwrap();
    get_post(&mut clients[0], "1").await.unwrap();
    for i in 0..4 {
        get_post(&mut clients[i % 2], "1").await.unwrap();
    }
    assert_eq!(bed.content.requests(), 8);

    let m = bed.envoy.metrics().await.unwrap();
    let change = |from: &str, to: &str| {
        m.value(
            "circuit_breaker_state_changes_total",
            &[
                ("upstream", "content"),
                ("from_state", from),
                ("to_state", to),
            ],
        )
    };
    assert_eq!(change("closed", "open"), Some(1.0));
    assert_eq!(change("open", "half_open"), Some(1.0));
    assert_eq!(change("half_open", "closed"), Some(1.0));
    assert_eq!(
        m.value("circuit_breaker_state", &[("upstream", "content")]),
        Some(0.0)
    );

    let (code, body) = health(&bed, "/health/circuit-breakers").await;
    assert_eq!(code, 200, "{body}");
    let content = breaker(&body, "content");
    assert_eq!(content["state"], "closed");
    assert_eq!(content["consecutive_failures"], 0);
    // A closed breaker starts a fresh window: only the calls since it closed.
    assert_eq!(content["failure_rate"], 0.0, "{body}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_probe_reopens_with_backoff() {
    let config = json!({
        "failure_threshold": 1, "open_timeout": "1s", "backoff_multiplier": 2.0, "max_open_timeout": "10s"
    });
    let bed = start("backoff", config).await;
    let channel = bed.envoy.channel().await.unwrap();
    let mut client = content(&channel).await;
    bed.content.set_fault(Fault::Unavailable).await.unwrap();
    assert_upstream_failure(get_post(&mut client, "1").await, Code::Unavailable);
    let first = pushback_ms(&assert_rejected(
        get_post(&mut client, "1").await,
        "content",
        "open",
    ));
    assert!(first <= 1_000, "first open period is open_timeout: {first}");
    wait_for_probes(first).await;

    // The probe fails: open again, for twice as long.
    assert_upstream_failure(get_post(&mut client, "1").await, Code::Unavailable);
    let second = pushback_ms(&assert_rejected(
        get_post(&mut client, "1").await,
        "content",
        "open",
    ));
    assert!(
        second > 1_000 && second <= 2_000,
        "second open period is 2 x open_timeout: {second}"
    );
    assert_eq!(bed.content.requests(), 2);
    assert_eq!(
        metric(
            &bed,
            "circuit_breaker_open_total",
            &[("upstream", "content"), ("reason", "half_open_failure")]
        )
        .await,
        1.0
    );
    let log = bed.envoy.log();
    assert!(
        log.contains("upstream=content from=half_open to=open reason=half_open_failure"),
        "{log}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstreams_are_isolated() {
    let bed = start(
        "isolation",
        json!({"failure_threshold": 2, "open_timeout": "30s"}),
    )
    .await;
    let channel = bed.envoy.channel().await.unwrap();
    let mut client = content(&channel).await;
    bed.content.set_fault(Fault::Unavailable).await.unwrap();
    for _ in 0..2 {
        assert_upstream_failure(get_post(&mut client, "1").await, Code::Unavailable);
    }
    assert_rejected(get_post(&mut client, "1").await, "content", "open");
    for _ in 0..3 {
        get_user(&channel).await.unwrap();
        get_feed(&channel).await.unwrap();
        assert_eq!(bed.envoy.get("/page").await.unwrap().status, 200);
    }
    assert_eq!(
        (bed.user.requests(), bed.feed.requests(), bed.web.requests()),
        (3, 3, 3)
    );
    let m = bed.envoy.metrics().await.unwrap();
    assert_eq!(
        m.value("circuit_breaker_state", &[("upstream", "content")]),
        Some(1.0)
    );
    for upstream in ["user", "feed", "web"] {
        assert_eq!(
            m.value("circuit_breaker_state", &[("upstream", upstream)]),
            Some(0.0),
            "{upstream}"
        );
        assert_eq!(
            m.value(
                "circuit_breaker_rejected_calls_total",
                &[("upstream", upstream)]
            ),
            None,
            "{upstream}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn overrides_apply_by_exact_key_and_glob() {
    let config = json!({
        "failure_threshold": 5, "open_timeout": "30s",
        "upstreams": {
            "content": {"failure_threshold": 1},
            "fe*": {"failure_threshold": 3},
            "auth": {"mode": "forced_open"}
        }
    });
    let bed = start("overrides", config).await;
    let channel = bed.envoy.channel().await.unwrap();
    let mut client = content(&channel).await;
    for service in [&bed.content, &bed.feed, &bed.user] {
        service.set_fault(Fault::Unavailable).await.unwrap();
    }
    for _ in 0..7 {
        let _ = get_post(&mut client, "1").await;
        let _ = get_feed(&channel).await;
        let _ = get_user(&channel).await;
    }
    // Each upstream saw exactly its own threshold of calls before its breaker opened.
    assert_eq!(
        (
            bed.content.requests(),
            bed.feed.requests(),
            bed.user.requests()
        ),
        (1, 3, 5)
    );
    assert_rejected(get_feed(&channel).await, "feed", "open");

    let mut auth = e2e::pb::auth_service_client::AuthServiceClient::new(channel.clone());
    let result = bounded(
        "Check",
        auth.check(e2e::pb::CheckRequest {
            token: "valid-u".into(),
        }),
    )
    .await;
    assert_rejected(result, "auth", "open");
    assert_eq!(bed.auth.requests(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_key_authority() {
    let bed = start(
        "key_authority",
        json!({"upstream_key": "authority", "failure_threshold": 2, "open_timeout": "30s"}),
    )
    .await;
    let mut a = content(&bed.envoy.channel_with_authority("a.example").await.unwrap()).await;
    let mut b = content(&bed.envoy.channel_with_authority("b.example").await.unwrap()).await;
    bed.content.set_fault(Fault::Unavailable).await.unwrap();
    for _ in 0..2 {
        assert_upstream_failure(get_post(&mut a, "1").await, Code::Unavailable);
    }
    assert_rejected(get_post(&mut a, "1").await, "a.example", "open");
    assert_upstream_failure(get_post(&mut b, "1").await, Code::Unavailable);
    assert_eq!(bed.content.requests(), 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_key_grpc_service() {
    let bed = start(
        "key_service",
        json!({"upstream_key": "grpc_service", "failure_threshold": 2, "open_timeout": "30s"}),
    )
    .await;
    let channel = bed.envoy.channel().await.unwrap();
    let mut client = content(&channel).await;
    bed.content.set_fault(Fault::Unavailable).await.unwrap();
    for _ in 0..2 {
        assert_upstream_failure(get_post(&mut client, "1").await, Code::Unavailable);
    }
    bed.content.set_fault(Fault::Ok).await.unwrap();
    // Every method of the service shares the breaker; other services do not.
    assert_rejected(
        get_post(&mut client, "1").await,
        "social.v1.ContentService",
        "open",
    );
    assert_rejected(
        list_posts(&mut client).await,
        "social.v1.ContentService",
        "open",
    );
    get_user(&channel).await.unwrap();
    assert_eq!(bed.content.requests(), 2);
    assert_eq!(
        metric(
            &bed,
            "circuit_breaker_state",
            &[("upstream", "social.v1.ContentService")]
        )
        .await,
        1.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_key_grpc_method() {
    let bed = start(
        "key_method",
        json!({"upstream_key": "grpc_method", "failure_threshold": 2, "open_timeout": "30s"}),
    )
    .await;
    let channel = bed.envoy.channel().await.unwrap();
    let mut client = content(&channel).await;
    bed.content.set_fault(Fault::Unavailable).await.unwrap();
    for _ in 0..2 {
        assert_upstream_failure(get_post(&mut client, "1").await, Code::Unavailable);
    }
    bed.content.set_fault(Fault::Ok).await.unwrap();
    assert_rejected(
        get_post(&mut client, "1").await,
        "social.v1.ContentService/GetPost",
        "open",
    );
    // Another method of the same service has its own breaker.
    assert_eq!(list_posts(&mut client).await.unwrap().posts.len(), 2);
    assert_eq!(bed.content.requests(), 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_key_header() {
    let bed = start(
        "key_header",
        json!({"upstream_key": "header:x-tenant", "failure_threshold": 2, "open_timeout": "30s"}),
    )
    .await;
    let channel = bed.envoy.channel().await.unwrap();
    let mut client = content(&channel).await;
    bed.content.set_fault(Fault::Unavailable).await.unwrap();
    for _ in 0..2 {
        assert_upstream_failure(
            get_post_with(&mut client, "1", &[("x-tenant", "acme")]).await,
            Code::Unavailable,
        );
    }
    assert_rejected(
        get_post_with(&mut client, "1", &[("x-tenant", "acme")]).await,
        "acme",
        "open",
    );
    assert_upstream_failure(
        get_post_with(&mut client, "1", &[("x-tenant", "globex")]).await,
        Code::Unavailable,
    );
    assert_eq!(bed.content.requests(), 3);
    // The same tenant over plain HTTP is the same breaker.
    let r = bed
        .envoy
        .get_with("/page", &[("x-tenant", "acme")])
        .await
        .unwrap();
    assert_eq!(
        (r.status, r.header("x-circuit-breaker")),
        (503, Some("open")),
        "{r:?}"
    );
    assert_eq!(bed.web.requests(), 0);

    // The key goes into grpc-message percent-encoded, as gRPC requires ('%' itself included).
    let path = "/social.v1.ContentService/GetPost";
    let message = e2e::pb::GetPostRequest {
        post_id: "1".into(),
    };
    for _ in 0..2 {
        let r = raw_grpc(&channel, path, &[("x-tenant", "50%off")], &message)
            .await
            .unwrap();
        assert_eq!(r.grpc_status(), Some("14"), "{r:?}");
    }
    let r = raw_grpc(&channel, path, &[("x-tenant", "50%off")], &message)
        .await
        .unwrap();
    assert_eq!(r.header("x-circuit-breaker"), Some("open"), "{r:?}");
    assert_eq!(
        r.header("grpc-message"),
        Some("circuit breaker open for 50%25off"),
        "{r:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_rejection_is_503_with_retry_after_and_json() {
    let bed = start(
        "http_503",
        json!({"failure_threshold": 2, "open_timeout": "30s"}),
    )
    .await;
    bed.web.set_fault(Fault::Unavailable).await.unwrap();
    for _ in 0..2 {
        let r = bed.envoy.get("/page").await.unwrap();
        assert_eq!(
            (r.status, r.body.as_str()),
            (503, "injected fault: 503\n"),
            "{r:?}"
        );
    }
    let r = bed.envoy.get("/page").await.unwrap();
    assert_eq!(r.status, 503, "{r:?}");
    assert_eq!(r.header("x-circuit-breaker"), Some("open"), "{r:?}");
    let retry_after: u64 = r
        .header("retry-after")
        .expect("retry-after")
        .parse()
        .unwrap();
    assert!((1..=30).contains(&retry_after), "{r:?}");
    assert_eq!(
        r.json().unwrap(),
        json!({"error": "circuit breaker open", "upstream": "web"})
    );
    assert_eq!(bed.web.requests(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failure_http_statuses_choose_what_fails() {
    let bed = start(
        "http_statuses",
        json!({"failure_threshold": 2, "failure_http_statuses": [500], "open_timeout": "30s"}),
    )
    .await;
    bed.web.set_fault(Fault::Unavailable).await.unwrap();
    for _ in 0..3 {
        assert_eq!(bed.envoy.get("/page").await.unwrap().status, 503);
    }
    assert_eq!(bed.web.requests(), 3, "503 is not in failure_http_statuses");
    bed.web.set_fault(Fault::Internal).await.unwrap();
    for _ in 0..2 {
        assert_eq!(bed.envoy.get("/page").await.unwrap().status, 500);
    }
    let r = bed.envoy.get("/page").await.unwrap();
    assert_eq!(
        (r.status, r.header("x-circuit-breaker")),
        (503, Some("open")),
        "{r:?}"
    );
    assert_eq!(bed.web.requests(), 5);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_statuses_choose_what_fails() {
    let bed = start(
        "grpc_statuses",
        json!({"failure_threshold": 2, "failure_grpc_statuses": ["INTERNAL"], "open_timeout": "30s"}),
    )
    .await;
    let channel = bed.envoy.channel().await.unwrap();
    let mut client = content(&channel).await;
    // A client-side status (NOT_FOUND) is a success under any configuration.
    for _ in 0..3 {
        assert_eq!(
            get_post(&mut client, MISSING_POST_ID)
                .await
                .unwrap_err()
                .code(),
            Code::NotFound
        );
    }
    bed.content.set_fault(Fault::Unavailable).await.unwrap();
    for _ in 0..3 {
        assert_upstream_failure(get_post(&mut client, "1").await, Code::Unavailable);
    }
    assert_eq!(
        bed.content.requests(),
        6,
        "UNAVAILABLE is not in failure_grpc_statuses"
    );
    bed.content.set_fault(Fault::Internal).await.unwrap();
    for _ in 0..2 {
        assert_upstream_failure(get_post(&mut client, "1").await, Code::Internal);
    }
    assert_rejected(get_post(&mut client, "1").await, "content", "open");
    assert_eq!(bed.content.requests(), 8);
    let m = bed.envoy.metrics().await.unwrap();
    assert_eq!(
        m.value(
            "circuit_breaker_calls_total",
            &[("upstream", "content"), ("result", "success")]
        ),
        Some(6.0)
    );
    assert_eq!(
        m.value(
            "circuit_breaker_calls_total",
            &[("upstream", "content"), ("result", "failure")]
        ),
        Some(2.0)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resets_and_refused_connections_are_failures() {
    // Envoy answers a reset or a refused connection with UNAVAILABLE, a failure status by default.
    // Counting only DATA_LOSS takes the status out: only Envoy's response flags (UR, UF) can make
    // these calls failures, as contract section 3 says they do whatever the status.
    let bed = start(
        "resets",
        json!({"failure_threshold": 2, "open_timeout": "30s", "failure_grpc_statuses": ["DATA_LOSS"]}),
    )
    .await;
    let channel = bed.envoy.channel().await.unwrap();
    let mut client = content(&channel).await;
    // The upstream resets the stream: Envoy answers 503 (flag UR), the client sees UNAVAILABLE.
    bed.content.set_fault(Fault::Reset).await.unwrap();
    assert_upstream_failure(get_post(&mut client, "1").await, Code::Unavailable);
    // The upstream is gone: connection refused (flag UF).
    bed.content.set_fault(Fault::Down).await.unwrap();
    assert_upstream_failure(get_post(&mut client, "1").await, Code::Unavailable);
    assert_rejected(get_post(&mut client, "1").await, "content", "open");
    assert_eq!(bed.content.requests(), 1);
    assert_eq!(
        metric(
            &bed,
            "circuit_breaker_calls_total",
            &[("upstream", "content"), ("result", "failure")]
        )
        .await,
        2.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn call_timeout_cuts_a_hanging_upstream_and_counts_as_failure() {
    let bed = start(
        "call_timeout",
        json!({"failure_threshold": 2, "call_timeout": "300ms", "open_timeout": "30s"}),
    )
    .await;
    let channel = bed.envoy.channel().await.unwrap();
    let mut client = content(&channel).await;
    bed.content.set_fault(Fault::Hang).await.unwrap();
    // The route's own timeout is 10 s; an answer well before that is the call_timeout at work.
    for _ in 0..2 {
        let call = get_post(&mut client, "1");
        let result = tokio::time::timeout(Duration::from_secs(5), call)
            .await
            .expect("call_timeout (300ms) did not cut the hanging call within 5s");
        let status = result.unwrap_err();
        assert_ne!(status.code(), Code::Ok);
        assert!(
            status.message().contains("upstream request timeout"),
            "{status:?}"
        );
    }
    assert_rejected(get_post(&mut client, "1").await, "content", "open");
    assert_eq!(bed.content.requests(), 2);
    assert_eq!(
        metric(
            &bed,
            "circuit_breaker_calls_total",
            &[("upstream", "content"), ("result", "failure")]
        )
        .await,
        2.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fallback_replaces_the_rejection() {
    let config = json!({
        "failure_threshold": 1, "open_timeout": "30s",
        "fallback": {"status": 200, "headers": {"x-fallback": "1"}, "body": "cached page"}
    });
    let bed = start("fallback", config).await;
    bed.web.set_fault(Fault::Internal).await.unwrap();
    assert_eq!(bed.envoy.get("/page").await.unwrap().status, 500);
    let r = bed.envoy.get("/page").await.unwrap();
    assert_eq!((r.status, r.body.as_str()), (200, "cached page"), "{r:?}");
    assert_eq!(r.header("x-fallback"), Some("1"), "{r:?}");
    assert_eq!(r.header("x-circuit-breaker"), Some("open"), "{r:?}");
    assert_eq!(bed.web.requests(), 1);
}

/// A gRPC fallback is what a user writing `status: 200` means, as far as gRPC allows: Envoy turns every
/// local reply to a gRPC request into trailers-only, so the body cannot be a message; the call ends
/// `OK` (or with the fallback's own `grpc-status`), the body as `grpc-message`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_grpc_fallback_is_a_trailers_only_answer_with_the_status_meant() {
    let config = json!({
        "failure_threshold": 1, "open_timeout": "30s",
        "upstreams": {
            "content": {"fallback": {"status": 200, "headers": {"x-fallback": "1"}, "body": "cached"}},
            "feed": {"fallback": {"status": 200, "headers": {"grpc-status": "5"}}}
        }
    });
    let bed = start("grpc_fallback", config).await;
    bed.content.set_fault(Fault::Unavailable).await.unwrap();
    bed.feed.set_fault(Fault::Unavailable).await.unwrap();
    let channel = bed.envoy.channel().await.unwrap();
    let mut client = content(&channel).await;
    assert_upstream_failure(get_post(&mut client, "1").await, Code::Unavailable);
    let raw = raw_get_post(&channel).await;
    assert_eq!(raw.status, 200, "{raw:?}");
    assert_eq!(raw.header("grpc-status"), Some("0"), "{raw:?}");
    assert_eq!(raw.header("grpc-message"), Some("cached"), "{raw:?}");
    assert_eq!(raw.header("x-fallback"), Some("1"), "{raw:?}");
    assert_eq!(raw.header("x-circuit-breaker"), Some("open"), "{raw:?}");
    assert!(
        raw.body.is_empty() && raw.trailers.is_none(),
        "trailers-only: {raw:?}"
    );
    // The fallback's own grpc-status wins: a client sees NOT_FOUND.
    assert_upstream_failure(get_feed(&channel).await, Code::Unavailable);
    let status = get_feed(&channel).await.unwrap_err();
    assert_eq!(status.code(), Code::NotFound, "{status:?}");
    assert_eq!(bed.content.requests(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dry_run_reports_but_never_rejects() {
    let bed = start(
        "dry_run",
        json!({"mode": "dry_run", "failure_threshold": 2, "open_timeout": "30s"}),
    )
    .await;
    let channel = bed.envoy.channel().await.unwrap();
    let mut client = content(&channel).await;
    bed.content.set_fault(Fault::Unavailable).await.unwrap();
    for i in 0..5 {
        let status = get_post(&mut client, "1").await.unwrap_err();
        assert_eq!(status.code(), Code::Unavailable);
        assert!(
            status.message().starts_with("injected fault"),
            "call {i} was rejected: {status:?}"
        );
        let marker = if i < 2 { None } else { Some("open") };
        assert_eq!(
            meta(&status, "x-circuit-breaker-dry-run"),
            marker,
            "call {i}: {status:?}"
        );
    }
    assert_eq!(bed.content.requests(), 5);

    bed.web.set_fault(Fault::Unavailable).await.unwrap();
    for _ in 0..2 {
        assert_eq!(
            bed.envoy
                .get("/page")
                .await
                .unwrap()
                .header("x-circuit-breaker-dry-run"),
            None
        );
    }
    let r = bed.envoy.get("/page").await.unwrap();
    assert_eq!(
        (r.status, r.body.as_str()),
        (503, "injected fault: 503\n"),
        "{r:?}"
    );
    assert_eq!(r.header("x-circuit-breaker-dry-run"), Some("open"), "{r:?}");
    assert_eq!(bed.web.requests(), 3);

    let m = bed.envoy.metrics().await.unwrap();
    assert_eq!(
        m.value(
            "circuit_breaker_dry_run_rejections_total",
            &[("upstream", "content")]
        ),
        Some(3.0)
    );
    assert_eq!(
        m.value(
            "circuit_breaker_dry_run_rejections_total",
            &[("upstream", "web")]
        ),
        Some(1.0)
    );
    assert_eq!(m.sum("circuit_breaker_rejected_calls_total", &[]), 0.0);
    assert_eq!(
        m.value("circuit_breaker_state", &[("upstream", "content")]),
        Some(1.0)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forced_open_rejects_everything() {
    let bed = start("forced_open", json!({"mode": "forced_open"})).await;
    let channel = bed.envoy.channel().await.unwrap();
    let mut client = content(&channel).await;
    assert_rejected(get_post(&mut client, "1").await, "content", "open");
    let r = bed.envoy.get("/page").await.unwrap();
    assert_eq!(
        (r.status, r.header("x-circuit-breaker")),
        (503, Some("open")),
        "{r:?}"
    );
    assert_eq!((bed.content.requests(), bed.web.requests()), (0, 0));
    let m = bed.envoy.metrics().await.unwrap();
    assert_eq!(
        m.value(
            "circuit_breaker_open_total",
            &[("upstream", "content"), ("reason", "forced")]
        ),
        Some(1.0)
    );
    assert_eq!(
        m.value(
            "circuit_breaker_rejected_calls_total",
            &[("upstream", "content")]
        ),
        Some(1.0)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn disabled_passes_through_and_tracks_nothing() {
    let bed = start(
        "disabled",
        json!({"mode": "disabled", "failure_threshold": 1}),
    )
    .await;
    let channel = bed.envoy.channel().await.unwrap();
    let mut client = content(&channel).await;
    bed.content.set_fault(Fault::Unavailable).await.unwrap();
    for _ in 0..4 {
        assert_upstream_failure(get_post(&mut client, "1").await, Code::Unavailable);
    }
    assert_eq!(bed.content.requests(), 4);
    let m = bed.envoy.metrics().await.unwrap();
    assert_eq!(
        m.sum("circuit_breaker_calls_total", &[]),
        0.0,
        "{}",
        m.dump("circuit_breaker")
    );
    assert_eq!(m.sum("circuit_breaker_rejected_calls_total", &[]), 0.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_endpoint_reports_every_breaker() {
    let path = "/health/circuit-breakers";
    let bed = start(
        "health",
        json!({"failure_threshold": 2, "open_timeout": "30s", "health_path": path}),
    )
    .await;
    let (code, body) = health(&bed, path).await;
    assert_eq!(
        (code, &body),
        (
            200,
            &json!({"status": "healthy", "circuit_breakers": [], "omitted": 0})
        )
    );

    let channel = bed.envoy.channel().await.unwrap();
    get_user(&channel).await.unwrap();
    let (code, body) = health(&bed, path).await;
    assert_eq!(code, 200, "{body}");
    assert_eq!(
        breaker(&body, "user"),
        &json!({"upstream": "user", "state": "closed", "failure_rate": 0.0, "slow_call_rate": 0.0,
                "calls_in_window": 1, "consecutive_failures": 0, "retry_after_ms": null,
                "admitting": 1.0})
    );

    // A closed breaker with failures in its window: still healthy, with the rates of the window.
    get_feed(&channel).await.unwrap();
    bed.feed.set_fault(Fault::Unavailable).await.unwrap();
    assert_upstream_failure(get_feed(&channel).await, Code::Unavailable);
    let (code, body) = health(&bed, path).await;
    assert_eq!(code, 200, "{body}");
    assert_eq!(
        breaker(&body, "feed"),
        &json!({"upstream": "feed", "state": "closed", "failure_rate": 0.5, "slow_call_rate": 0.0,
                "calls_in_window": 2, "consecutive_failures": 1, "retry_after_ms": null,
                "admitting": 1.0})
    );

    bed.content.set_fault(Fault::Unavailable).await.unwrap();
    let mut client = content(&channel).await;
    for _ in 0..2 {
        assert_upstream_failure(get_post(&mut client, "1").await, Code::Unavailable);
    }
    let (code, body) = health(&bed, path).await;
    assert_eq!(code, 503, "{body}");
    assert_eq!(body["status"], "degraded");
    let content = breaker(&body, "content");
    assert_eq!(content["state"], "open", "{body}");
    assert_eq!(content["consecutive_failures"], 2, "{body}");
    assert_eq!(content["admitting"], 0.0, "{body}");
    let retry_after = content["retry_after_ms"]
        .as_u64()
        .unwrap_or_else(|| panic!("retry_after_ms: {body}"));
    assert!(retry_after > 0 && retry_after <= 30_000, "{body}");
    assert_eq!(breaker(&body, "user")["state"], "closed");
    // The health endpoint answers itself: it is not an upstream, and never reaches one.
    let keys: Vec<_> = body["circuit_breakers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|b| b["upstream"].as_str().unwrap())
        .collect();
    // The breakers not closed come first, then the rest, each group sorted by key.
    assert_eq!(keys, ["content", "feed", "user"], "{body}");
    assert_eq!(body["omitted"], 0, "{body}");
    assert_eq!(bed.web.requests(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prometheus_metrics_carry_labels_through_a_full_cycle() {
    let config = json!({
        "failure_threshold": 2, "open_timeout": "1s", "success_threshold": 1,
        "slow_call_duration": "500ms", "slow_call_rate_threshold": 1.0, "minimum_requests": 50
    });
    let bed = start("metrics", config).await;
    let channel = bed.envoy.channel().await.unwrap();
    let mut client = content(&channel).await;
    bed.content
        .set_fault(Fault::Slow(Duration::from_millis(600)))
        .await
        .unwrap();
    get_post(&mut client, "1").await.unwrap();
    bed.content.set_fault(Fault::Unavailable).await.unwrap();
    for _ in 0..2 {
        assert_upstream_failure(get_post(&mut client, "1").await, Code::Unavailable);
    }
    let status = assert_rejected(get_post(&mut client, "1").await, "content", "open");
    bed.content.set_fault(Fault::Ok).await.unwrap();
    wait_for_probes(pushback_ms(&status)).await;
    get_post(&mut client, "1").await.unwrap();

    let text = bed.envoy.admin_get("/stats/prometheus").await.unwrap().body;
    // Tag extraction took every label out of the name: no raw `label=.=value;.;` segments remain, and
    // the wasm namespace is stripped (no `envoy_` or `wasmcustom` prefix).
    assert!(!text.contains("=.="), "untagged metric names:\n{text}");
    assert!(!text.contains("wasmcustom"), "{text}");
    for (name, kind) in [
        ("circuit_breaker_state", "gauge"),
        ("circuit_breaker_calls_total", "counter"),
        ("circuit_breaker_slow_calls_total", "counter"),
        ("circuit_breaker_rejected_calls_total", "counter"),
        ("circuit_breaker_state_changes_total", "counter"),
        ("circuit_breaker_open_total", "counter"),
    ] {
        assert!(
            text.contains(&format!("# TYPE {name} {kind}\n")),
            "{name} is not a {kind}:\n{text}"
        );
    }
    let m = Metrics::parse(&text);
    let expect = |name: &str, labels: &[(&str, &str)], value: f64| {
        assert_eq!(
            m.value(name, labels),
            Some(value),
            "{name}{labels:?}\n{}",
            m.dump("circuit_breaker")
        );
    };
    expect(
        "circuit_breaker_calls_total",
        &[("upstream", "content"), ("result", "success")],
        2.0,
    );
    expect(
        "circuit_breaker_calls_total",
        &[("upstream", "content"), ("result", "failure")],
        2.0,
    );
    expect(
        "circuit_breaker_slow_calls_total",
        &[("upstream", "content")],
        1.0,
    );
    expect(
        "circuit_breaker_rejected_calls_total",
        &[("upstream", "content")],
        1.0,
    );
    expect(
        "circuit_breaker_open_total",
        &[("upstream", "content"), ("reason", "consecutive_failures")],
        1.0,
    );
    let changes = [
        ("closed", "open"),
        ("open", "half_open"),
        ("half_open", "closed"),
    ];
    for (from, to) in changes {
        expect(
            "circuit_breaker_state_changes_total",
            &[
                ("upstream", "content"),
                ("from_state", from),
                ("to_state", to),
            ],
            1.0,
        );
    }
    expect("circuit_breaker_state", &[("upstream", "content")], 0.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_configs_are_refused_naming_the_field() {
    let cases = [
        (
            json!({"error_rate_threshold": 2}).to_string(),
            "error_rate_threshold",
        ),
        (json!({"window_size": 0}).to_string(), "window_size"),
        (
            json!({"window_size": 10, "window_duration": "10s"}).to_string(),
            "window_duration",
        ),
        (json!({"upstream_key": "bogus"}).to_string(), "upstream_key"),
        (json!({"mode": "sometimes"}).to_string(), "mode"),
        (
            json!({"failure_treshold": 3}).to_string(),
            "failure_treshold",
        ),
        (
            json!({"upstreams": {"content": {"open_timeout": "soon"}}}).to_string(),
            "open_timeout",
        ),
        (
            json!({"upstreams": {"content": {"health_path": "/h"}}}).to_string(),
            "health_path",
        ),
        (
            "{not json".to_string(),
            "circuit breaker configuration rejected",
        ),
    ];
    for (i, (config, field)) in cases.iter().enumerate() {
        let log = Envoy::start_expecting_failure(&format!("bad_config_{i}"), config)
            .await
            .unwrap();
        let line = log
            .lines()
            .find(|l| l.contains("circuit breaker configuration rejected"));
        let line = line.unwrap_or_else(|| panic!("no rejection line for {config}; log:\n{log}"));
        assert!(
            line.contains(field),
            "rejection of {config} does not name {field}: {line}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keys_past_max_upstreams_pass_untracked_and_are_counted() {
    let config = json!({
        "upstream_key": "header:x-tenant", "max_upstreams": 2, "failure_threshold": 1, "open_timeout": "30s",
        "health_path": "/health", "idle_timeout": "1s"
    });
    let bed = start("max_upstreams", config).await;
    let channel = bed.envoy.channel().await.unwrap();
    let mut client = content(&channel).await;
    for tenant in ["t1", "t2"] {
        get_post_with(&mut client, "1", &[("x-tenant", tenant)])
            .await
            .unwrap();
    }
    bed.content.set_fault(Fault::Unavailable).await.unwrap();
    for _ in 0..3 {
        // t1 and t2 are called just before (through `web`, which answers): no slot is idle for t3.
        for tenant in ["t1", "t2"] {
            let r = bed.envoy.get_with("/hello", &[("x-tenant", tenant)]).await;
            assert_eq!(r.unwrap().status, 200);
        }
        assert_upstream_failure(
            get_post_with(&mut client, "1", &[("x-tenant", "t3")]).await,
            Code::Unavailable,
        );
    }
    assert_eq!(
        bed.content.requests(),
        5,
        "an untracked key must never be rejected"
    );
    assert_eq!(
        metric(&bed, "circuit_breaker_untracked_calls_total", &[]).await,
        3.0
    );
    assert_tracked(&bed, ["t1", "t2"]).await;
    assert_eq!(
        metric(&bed, "circuit_breaker_evicted_total", &[]).await,
        0.0
    );

    // Idle breakers give their slots to new keys: four waves of two new keys, each after every
    // breaker idled past idle_timeout (1 s), so each new key evicts one.
    let waves = 4;
    for wave in 0..waves {
        tokio::time::sleep(Duration::from_millis(1_500)).await;
        for k in 0..2 {
            let tenant = format!("w{wave}-{k}");
            let r = bed.envoy.get_with("/hello", &[("x-tenant", &tenant)]).await;
            assert_eq!(r.unwrap().status, 200, "{tenant}");
        }
    }
    let m = bed.envoy.metrics().await.unwrap();
    assert_eq!(
        m.value("circuit_breaker_evicted_total", &[]),
        Some(f64::from(2 * waves)),
        "{}",
        m.dump("circuit_breaker_")
    );
    assert_tracked(&bed, ["w3-0", "w3-1"]).await;

    // Ten keys had breakers; one Envoy labels 4 x max_upstreams = 8 of them, in order, in every
    // metric. The last wave's calls are counted as _other, and the first key turned away is logged.
    let labelled: std::collections::BTreeSet<&str> = m
        .samples
        .iter()
        .filter(|s| s.name.starts_with("circuit_breaker_"))
        .filter_map(|s| s.labels.get("upstream").map(String::as_str))
        .collect();
    let expected: std::collections::BTreeSet<&str> = [
        "t1", "t2", "w0-0", "w0-1", "w1-0", "w1-1", "w2-0", "w2-1", "_other",
    ]
    .into();
    assert_eq!(labelled, expected, "{}", m.dump("circuit_breaker_"));
    assert_eq!(
        m.value(
            "circuit_breaker_calls_total",
            &[("upstream", "_other"), ("result", "success")]
        ),
        Some(2.0),
        "{}",
        m.dump("circuit_breaker_calls_total")
    );
    let log = bed.envoy.log();
    let told: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("counted as upstream=_other"))
        .collect();
    assert_eq!(told.len(), 1, "logged once: {told:?}");
    assert!(
        told[0].contains("8 upstream keys") && told[0].contains("w3-0"),
        "{}",
        told[0]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spoofed_request_headers_change_nothing() {
    let bed = start(
        "spoofing",
        json!({"failure_threshold": 2, "open_timeout": "30s"}),
    )
    .await;
    let channel = bed.envoy.channel().await.unwrap();
    let path = "/social.v1.ContentService/GetPost";
    let message = e2e::pb::GetPostRequest {
        post_id: "1".into(),
    };

    // Successful calls that claim to have failed stay successes.
    let liar = [
        ("grpc-status", "14"),
        ("x-circuit-breaker", "open"),
        ("x-circuit-breaker-dry-run", "open"),
    ];
    for _ in 0..3 {
        let r = raw_grpc(&channel, path, &liar, &message).await.unwrap();
        assert_eq!(r.grpc_status(), Some("0"), "{r:?}");
        assert_eq!(r.header("x-circuit-breaker"), None, "{r:?}");
    }
    // Failing calls that claim to have succeeded stay failures.
    bed.content.set_fault(Fault::Unavailable).await.unwrap();
    let optimist = [("grpc-status", "0"), ("x-circuit-breaker", "closed")];
    for _ in 0..2 {
        let r = raw_grpc(&channel, path, &optimist, &message).await.unwrap();
        assert_eq!(r.grpc_status(), Some("14"), "{r:?}");
    }
    let r = raw_grpc(&channel, path, &optimist, &message).await.unwrap();
    assert_eq!(r.header("x-circuit-breaker"), Some("open"), "{r:?}");
    assert_eq!(bed.content.requests(), 5);

    // Plain HTTP: a client cannot talk its way past an open breaker either.
    bed.web.set_fault(Fault::Internal).await.unwrap();
    for _ in 0..2 {
        let r = bed
            .envoy
            .get_with(
                "/page",
                &[("x-circuit-breaker", "closed"), ("grpc-status", "0")],
            )
            .await
            .unwrap();
        assert_eq!(r.status, 500, "{r:?}");
    }
    let r = bed
        .envoy
        .get_with("/page", &[("x-circuit-breaker", "closed")])
        .await
        .unwrap();
    assert_eq!(
        (r.status, r.header("x-circuit-breaker")),
        (503, Some("open")),
        "{r:?}"
    );
    assert_eq!(bed.web.requests(), 2);
    let m = bed.envoy.metrics().await.unwrap();
    assert_eq!(
        m.value(
            "circuit_breaker_calls_total",
            &[("upstream", "content"), ("result", "success")]
        ),
        Some(3.0)
    );
    assert_eq!(
        m.value(
            "circuit_breaker_calls_total",
            &[("upstream", "content"), ("result", "failure")]
        ),
        Some(2.0)
    );
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
