//! The modes besides the default: `dry_run` reports but never rejects, `forced_open` rejects
//! everything, `disabled` tracks nothing.

use super::*;

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
