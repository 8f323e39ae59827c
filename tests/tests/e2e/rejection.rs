//! What a rejection looks like over plain HTTP (503, `retry-after`, a JSON body), and the fallback
//! answers, HTTP and gRPC, that replace it.

use super::*;

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
