//! After the open period: half-open admits only the probe limit, successful probes close the
//! breaker, a failed probe re-opens it with backoff.

use super::*;

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
