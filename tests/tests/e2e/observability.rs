//! What the filter reports: the health endpoint and the Prometheus metrics.

use super::*;

use e2e::Metrics;

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
