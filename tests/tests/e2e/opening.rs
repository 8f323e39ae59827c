//! Calls pass through and are counted; what opens a breaker: consecutive failures across workers,
//! the error rate over a count or a time window, the slow-call rate.

use super::*;

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
