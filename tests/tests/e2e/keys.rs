//! What a breaker is keyed on: upstreams kept apart, overrides by exact key and glob, each
//! `upstream_key`, and the keys past `max_upstreams`.

use super::*;

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
