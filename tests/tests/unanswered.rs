//! End-to-end: the calls that never finish (issue 10). An upstream that accepts the connection and
//! never writes a byte (a real dead host, [`DeadHost`]) behind a real Envoy: the breaker learns of it
//! from the clients' gRPC deadlines, or from `stuck_call_duration` when nobody has a deadline, and a
//! stream the client cancels after its response began says nothing about the upstream.
//!
//! Run by `make test-e2e` for both builds (`CB_BUILD`).

use std::future::Future;
use std::time::Duration;

use e2e::pb::content_service_client::ContentServiceClient;
use e2e::pb::user_service_client::UserServiceClient;
use e2e::{DeadHost, Envoy, Fault, TestBed, UpstreamPorts, Upstreams};
use serde_json::json;
use tonic::transport::Channel;
use tonic::{Code, Status};

/// Bound on anything a test waits for: far above what a passing test needs.
const BOUND: Duration = Duration::from_secs(30);

type Content = ContentServiceClient<Channel>;

async fn bounded<T>(what: &str, f: impl Future<Output = T>) -> T {
    tokio::time::timeout(BOUND, f)
        .await
        .unwrap_or_else(|_| panic!("{what}: nothing within {BOUND:?}"))
}

/// The demo services, but `content` is a dead host.
struct DeadBed {
    _upstreams: Upstreams,
    _dead: DeadHost,
    envoy: Envoy,
}

impl DeadBed {
    async fn start(name: &str, config: serde_json::Value) -> Self {
        let upstreams = Upstreams::start().await.unwrap();
        let dead = DeadHost::start().await.unwrap();
        let ports = UpstreamPorts {
            content: dead.port(),
            ..upstreams.ports()
        };
        let envoy = Envoy::start(name, &ports, &config.to_string())
            .await
            .unwrap();
        Self {
            _upstreams: upstreams,
            _dead: dead,
            envoy,
        }
    }

    async fn metric(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        self.envoy.metric(name, labels).await.unwrap()
    }
}

/// One `GetPost`; with a deadline when `deadline` is given (tonic sends it as `grpc-timeout`, and
/// cancels the call when it passes).
async fn get_post(client: &mut Content, deadline: Option<Duration>) -> Result<(), Status> {
    let mut request = tonic::Request::new(e2e::pb::GetPostRequest {
        post_id: "p1".into(),
    });
    if let Some(d) = deadline {
        request.set_timeout(d);
    }
    bounded("GetPost", client.get_post(request))
        .await
        .map(|_| ())
}

#[track_caller]
fn assert_rejected(result: Result<(), Status>) {
    let status = result.expect_err("expected the breaker to reject the call");
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");
    assert_eq!(
        status.message(),
        "circuit breaker open for content",
        "{status:?}"
    );
    assert_eq!(
        status
            .metadata()
            .get("x-circuit-breaker")
            .and_then(|v| v.to_str().ok()),
        Some("open"),
        "{status:?}"
    );
}

/// Polls until `f` holds, within [`BOUND`].
async fn eventually<Fut: Future<Output = bool>>(what: &str, mut f: impl FnMut() -> Fut) {
    let deadline = tokio::time::Instant::now() + BOUND;
    while tokio::time::Instant::now() < deadline {
        if f().await {
            return;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    panic!("timed out waiting for {what}");
}

/// Requests in progress on the listener (Envoy's `http.ingress.downstream_rq_active` gauge); `None`
/// when the admin interface does not tell.
async fn active_requests(envoy: &Envoy) -> Option<u64> {
    let stats = envoy
        .admin_get("/stats?filter=http.ingress.downstream_rq_active")
        .await
        .ok()?;
    stats.body.lines().find_map(|l| {
        l.strip_prefix("http.ingress.downstream_rq_active: ")?
            .trim()
            .parse()
            .ok()
    })
}

const FAILURES: [(&str, &str); 2] = [("upstream", "content"), ("result", "failure")];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_host_trips_the_breaker_through_client_deadlines() {
    let bed = DeadBed::start("dead_deadlines", json!({"failure_threshold": 3})).await;
    let mut client = ContentServiceClient::new(bed.envoy.channel().await.unwrap());
    for i in 0..3 {
        let status = get_post(&mut client, Some(Duration::from_millis(300)))
            .await
            .expect_err("a dead host answers nothing");
        // tonic says Cancelled ("Timeout expired") when its own deadline ends the call.
        assert!(
            matches!(status.code(), Code::DeadlineExceeded | Code::Cancelled),
            "call {i}: {status:?}"
        );
    }
    // Each cancel at the deadline is recorded as it reaches Envoy's end of the stream.
    eventually("three deadline failures", || async {
        bed.metric("circuit_breaker_calls_total", &FAILURES).await == 3.0
    })
    .await;
    assert_rejected(get_post(&mut client, Some(Duration::from_millis(300))).await);
    let opened = [("upstream", "content"), ("reason", "consecutive_failures")];
    assert_eq!(bed.metric("circuit_breaker_open_total", &opened).await, 1.0);
    assert_eq!(
        bed.metric(
            "circuit_breaker_stuck_calls_total",
            &[("upstream", "content")]
        )
        .await,
        0.0,
        "no stuck-call check configured"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancel_before_the_deadline_says_nothing_about_the_upstream() {
    let bed = DeadBed::start("dead_early_cancel", json!({"failure_threshold": 1})).await;
    let mut client = ContentServiceClient::new(bed.envoy.channel().await.unwrap());
    // The client gives up after 200 ms on calls that carry a 10 s deadline: its own impatience.
    for _ in 0..3 {
        let call = get_post(&mut client, Some(Duration::from_secs(10)));
        let gave_up = tokio::time::timeout(Duration::from_millis(200), call).await;
        assert!(gave_up.is_err(), "a dead host answers nothing");
    }
    let mut client = ContentServiceClient::new(bed.envoy.channel().await.unwrap());
    let patient = tokio::time::timeout(
        Duration::from_millis(300),
        get_post(&mut client, Some(Duration::from_secs(10))),
    )
    .await;
    assert!(
        patient.is_err(),
        "still let through to the dead host: not rejected"
    );
    assert_eq!(
        bed.metric("circuit_breaker_calls_total", &FAILURES).await,
        0.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stuck_calls_trip_the_breaker_with_no_deadline_and_are_recorded_once() {
    let config = json!({"failure_threshold": 3, "stuck_call_duration": "500ms"});
    let bed = DeadBed::start("dead_stuck", config).await;
    let channel = bed.envoy.channel().await.unwrap();
    // Three callers with no deadline: only the route's 10 s timeout would end their calls.
    let hung: Vec<_> = (0..3)
        .map(|_| {
            let mut client = ContentServiceClient::new(channel.clone());
            tokio::spawn(async move { get_post(&mut client, None).await })
        })
        .collect();
    let stuck = [("upstream", "content")];
    eventually(
        "three stuck calls recorded while they still wait",
        || async {
            bed.metric("circuit_breaker_stuck_calls_total", &stuck)
                .await
                == 3.0
        },
    )
    .await;
    assert_eq!(
        bed.metric("circuit_breaker_calls_total", &FAILURES).await,
        3.0
    );
    let mut client = ContentServiceClient::new(channel.clone());
    assert_rejected(get_post(&mut client, None).await);
    // The hung calls end at the route timeout, as failures Envoy reports (UT): their tickets are
    // spent, so nothing is recorded again.
    for call in hung {
        let status = bounded("a hung call", call).await.unwrap().unwrap_err();
        assert_eq!(status.code(), Code::Unavailable, "{status:?}");
        assert!(
            !status.message().starts_with("circuit breaker"),
            "{status:?}"
        );
    }
    assert_eq!(
        bed.metric("circuit_breaker_calls_total", &FAILURES).await,
        3.0
    );
    assert_eq!(
        bed.metric("circuit_breaker_stuck_calls_total", &stuck)
            .await,
        3.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_streaming_call_cancelled_after_its_first_message_leaves_the_breaker_closed() {
    // Three cancels and a threshold of three: were they failures, the breaker would open only as the
    // last one settles, which the settled metrics below show (no rejection of a later stream can).
    let bed = TestBed::start("stream_cancel", &json!({"failure_threshold": 3}))
        .await
        .unwrap();
    let channel = bed.envoy.channel().await.unwrap();
    let mut client = ContentServiceClient::new(channel.clone());
    for _ in 0..3 {
        let request = e2e::pb::WatchPostsRequest {
            author_id: "a".into(),
            count: 100,
            interval_ms: 100,
        };
        let mut stream = bounded("WatchPosts", client.watch_posts(request))
            .await
            .unwrap()
            .into_inner();
        let first = bounded("the first post", stream.message()).await.unwrap();
        assert!(first.is_some());
        // The client goes away mid-stream.
        drop(stream);
    }
    // An ignored call leaves no metric behind, so wait for Envoy itself to be done with the three
    // streams: no request active on the listener, and the three access log lines, which Envoy writes
    // after the filter settled the stream (its access log hook in wasm, its stream-complete hook in
    // the native module). Only then can the metrics below show what the cancels did.
    eventually(
        "Envoy to end and log the three cancelled streams",
        || async {
            let watched = bed
                .envoy
                .log()
                .lines()
                .filter(|l| l.contains("[access] POST /social.v1.ContentService/WatchPosts "))
                .count();
            watched == 3 && active_requests(&bed.envoy).await == Some(0)
        },
    )
    .await;
    assert_eq!(bed.content.requests(), 3);
    let m = bed.envoy.metrics().await.unwrap();
    let content = |result| [("upstream", "content"), ("result", result)];
    for result in ["failure", "success"] {
        assert_eq!(
            m.value("circuit_breaker_calls_total", &content(result)),
            None,
            "a cancel after the first message is recorded as nothing"
        );
    }
    // Summed over `reason`: a sample of open_total always carries one.
    assert_eq!(
        m.sum("circuit_breaker_open_total", &[("upstream", "content")]),
        0.0,
        "{}",
        m.dump("circuit_breaker_open_total")
    );
    // Still closed: the next call goes through.
    let mut client = ContentServiceClient::new(channel);
    get_post(&mut client, None).await.unwrap();
    assert_eq!(
        bed.envoy
            .metric("circuit_breaker_calls_total", &content("success"))
            .await
            .unwrap(),
        1.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_request_is_a_recorded_call_a_rejection_or_untracked() {
    let config = json!({"failure_threshold": 3, "upstream_key": "header:x-tenant"});
    let bed = TestBed::start("accounting", &config).await.unwrap();
    bed.content.set_fault(Fault::Unavailable).await.unwrap();
    let channel = bed.envoy.channel().await.unwrap();
    let mut requests = 0;
    for i in 0..12 {
        let mut client = ContentServiceClient::new(channel.clone());
        let mut request = tonic::Request::new(e2e::pb::GetPostRequest {
            post_id: "p1".into(),
        });
        if i % 4 != 3 {
            request
                .metadata_mut()
                .insert("x-tenant", "acme".parse().unwrap());
        }
        let _ = bounded("GetPost", client.get_post(request)).await;
        requests += 1;
        let mut users = UserServiceClient::new(channel.clone());
        let mut request = tonic::Request::new(e2e::pb::GetUserRequest {
            user_id: "u".into(),
        });
        request
            .metadata_mut()
            .insert("x-tenant", "globex".parse().unwrap());
        bounded("GetUser", users.get_user(request)).await.unwrap();
        requests += 1;
    }
    let m = bed.envoy.metrics().await.unwrap();
    let calls = m.sum("circuit_breaker_calls_total", &[]);
    let rejected = m.sum("circuit_breaker_rejected_calls_total", &[]);
    let untracked = m.sum("circuit_breaker_untracked_calls_total", &[]);
    assert_eq!((calls, rejected, untracked), (12.0 + 3.0, 6.0, 3.0));
    assert_eq!(calls + rejected + untracked, f64::from(requests));
}
