//! What counts as a failure: the HTTP and gRPC statuses configured, resets and refused connections,
//! the call timeout; and never what the request headers claim.

use super::*;

use e2e::MISSING_POST_ID;

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
