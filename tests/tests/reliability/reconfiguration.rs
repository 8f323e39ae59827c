//! Live reconfiguration (section 2 of RELIABILITY.md) through file-based LDS (`envoy/lds.yaml`): new
//! filter configurations swapped in under load keep the breakers' state; bad ones are refused while
//! the last good one keeps serving; no request fails.

use super::*;

use std::sync::atomic::AtomicU64;

use e2e::channel_to;
use e2e::pb::feed_service_client::FeedServiceClient;

async fn get_feed(channel: &Channel) -> Result<(), Status> {
    let mut client = FeedServiceClient::new(channel.clone());
    let request = e2e::pb::GetFeedRequest {
        user_id: "u".into(),
        limit: 1,
    };
    bounded("GetFeed", client.get_feed(request))
        .await
        .map(|_| ())
}

/// What the load of the reconfiguration test saw: calls, and calls that did not get the answer they
/// should have.
#[derive(Debug, Default)]
struct Load {
    calls: AtomicU64,
    wrong: std::sync::Mutex<Vec<String>>,
}

impl Load {
    fn wrong(&self, what: String) {
        self.wrong.lock().unwrap().push(what);
    }
}

/// A client of the reconfiguration test: `GetUser` (healthy, must succeed) and `GetPost` (its breaker
/// is open, must be rejected), on a new connection every 25 calls so new connections keep meeting the
/// newest configuration while old ones drain.
async fn reconfig_client(addr: SocketAddr, load: Arc<Load>, stop: Arc<AtomicBool>) {
    while !stop.load(Ordering::SeqCst) {
        let channel = channel_to(addr, None).await.unwrap();
        for _ in 0..25 {
            load.calls.fetch_add(2, Ordering::SeqCst);
            if let Err(status) = get_user(&channel).await {
                load.wrong(format!("GetUser: {status:?}"));
            }
            match get_post(&channel, &[]).await {
                Err(status) if is_rejection(&status, "content") => {}
                other => load.wrong(format!("GetPost not rejected: {other:?}")),
            }
        }
    }
}

/// Good configurations swapped in, one after the other, in the reconfiguration test.
const RECONFIG_GOOD_VERSIONS: u32 = 4;

/// Calls the load makes between two steps of the reconfiguration test.
const RECONFIG_CALLS_BETWEEN: u64 = 1_000;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn live_reconfiguration_keeps_state_and_refuses_a_bad_config() {
    let v1 = json!({"failure_threshold": 3, "open_timeout": "60s", "health_path": "/health"});
    let mut bed = LdsBed::start("reconfig", "envoy/lds-listener.yaml", &v1).await;
    let mut sent = 0u64;
    let channel = bed.envoy.channel().await.unwrap();

    // content's breaker opens.
    bed.content.set_fault(Fault::Unavailable).await.unwrap();
    for _ in 0..3 {
        let status = get_post(&channel, &[]).await.unwrap_err();
        assert!(!is_rejection(&status, "content"), "{status:?}");
    }
    let status = get_post(&channel, &[]).await.unwrap_err();
    assert!(is_rejection(&status, "content"), "{status:?}");
    get_feed(&channel).await.unwrap();
    sent += 5;
    let (_, before) = health(&bed.envoy, "/health").await;
    let retry_before = health_entry(&before, "content").unwrap()["retry_after_ms"]
        .as_u64()
        .unwrap();
    let m0 = bed.envoy.metrics().await.unwrap();

    // Load on both workers for the whole test.
    let load = Arc::new(Load::default());
    let stop = Arc::new(AtomicBool::new(false));
    let clients: Vec<JoinHandle<()>> = (0..4)
        .map(|_| {
            tokio::spawn(reconfig_client(
                bed.envoy.listener(),
                Arc::clone(&load),
                Arc::clone(&stop),
            ))
        })
        .collect();
    let wait_load = |more: u64| {
        let load = Arc::clone(&load);
        async move {
            let from = load.calls.load(Ordering::SeqCst);
            eventually("load", 600, || async {
                load.calls.load(Ordering::SeqCst) >= from + more
            })
            .await;
        }
    };
    wait_load(RECONFIG_CALLS_BETWEEN).await;

    // New configurations, one after the other under load: another threshold each time, an override
    // that forces `feed` open, and one more override that changes with the version.
    let mut retry_before = retry_before;
    for version in 2..=RECONFIG_GOOD_VERSIONS + 1 {
        let config = json!({
            "failure_threshold": 8 + version, "open_timeout": "60s", "health_path": "/health",
            "upstreams": {"feed": {"mode": "forced_open"}, format!("extra-{version}"): {"failure_threshold": 1}}
        });
        bed.publish(&config.to_string(), "update_success").await;
        assert_eq!(bed.listener_version().await, version.to_string());
        // New connections get it: feed is rejected (the forced opening), ...
        let mut fresh_feed_calls = 0;
        eventually("the new configuration on new connections", 200, || {
            fresh_feed_calls += 1;
            let addr = bed.envoy.listener();
            async move {
                let channel = channel_to(addr, None).await.unwrap();
                matches!(get_feed(&channel).await, Err(s) if is_rejection(&s, "feed"))
            }
        })
        .await;
        sent += fresh_feed_calls;
        // ... while content's breaker kept its state: still open, in the same open period (not
        // restarted, nor re-opened), with the failures it had.
        let fresh = channel_to(bed.envoy.listener(), None).await.unwrap();
        let status = get_post(&fresh, &[]).await.unwrap_err();
        assert!(is_rejection(&status, "content"), "{status:?}");
        sent += 1;
        let (code, after) = health(&bed.envoy, "/health").await;
        assert_eq!(code, 503, "{after}");
        let content = health_entry(&after, "content").unwrap();
        assert_eq!(content["state"], "open", "{after}");
        assert_eq!(content["consecutive_failures"], 3, "{after}");
        let retry_after = content["retry_after_ms"].as_u64().unwrap();
        assert!(
            retry_after < retry_before,
            "version {version}: the open period restarted: {retry_before} ms left before, {retry_after} ms after"
        );
        retry_before = retry_after;
        assert_eq!(bed.content.requests(), 3, "content was called while open");
        wait_load(RECONFIG_CALLS_BETWEEN).await;
    }
    assert!(bed.envoy.log().contains("overrides=2"));
    let last_good = (RECONFIG_GOOD_VERSIONS + 1).to_string();

    // Bad configurations: each refused (Envoy NACKs the whole update), naming the problem, while the
    // last good one keeps serving.
    let bad = [
        (
            json!({"error_rate_threshold": 2, "health_path": "/health"}).to_string(),
            "error_rate_threshold must be a number in (0, 1], got 2",
        ),
        ("{not json".to_string(), "must be a JSON object"),
    ];
    for (config, names) in bad {
        bed.publish(&config, "update_rejected").await;
        let log = bed.envoy.log();
        assert!(
            log.lines()
                .filter(|l| l.contains("circuit breaker configuration rejected"))
                .any(|l| l.contains(names)),
            "no rejection line naming {names:?}; log: {}",
            bed.envoy.log_path().display()
        );
        assert_eq!(bed.listener_version().await, last_good);
        let fresh = channel_to(bed.envoy.listener(), None).await.unwrap();
        let status = get_feed(&fresh).await.unwrap_err();
        assert!(is_rejection(&status, "feed"), "{status:?}");
        get_user(&fresh).await.unwrap();
        sent += 2;
        wait_load(RECONFIG_CALLS_BETWEEN / 2).await;
    }

    // More load on the surviving configuration, then stop.
    wait_load(RECONFIG_CALLS_BETWEEN).await;
    stop.store(true, Ordering::SeqCst);
    for client in clients {
        client.await.unwrap();
    }
    let wrong = load.wrong.lock().unwrap().clone();
    let load_calls = load.calls.load(Ordering::SeqCst);
    sent += load_calls;
    assert!(
        wrong.is_empty(),
        "{} of {load_calls} calls under reconfiguration got a wrong answer, e.g. {:?}",
        wrong.len(),
        wrong.iter().take(5).collect::<Vec<_>>()
    );

    // Counters continued through both updates (stats are global by name, the state is in shared data).
    let m = bed.envoy.metrics().await.unwrap();
    let user_ok = [("upstream", "user"), ("result", "success")];
    let rejected_content = [("upstream", "content")];
    assert!(m.sum("circuit_breaker_calls_total", &user_ok) > 0.0);
    assert!(
        m.sum("circuit_breaker_rejected_calls_total", &rejected_content)
            > m0.sum("circuit_breaker_rejected_calls_total", &rejected_content)
    );
    assert_eq!(
        m.value(
            "circuit_breaker_open_total",
            &[("upstream", "content"), ("reason", "consecutive_failures")]
        ),
        Some(1.0),
        "content re-opened: its state was lost"
    );
    assert_eq!(bed.content.requests(), 3);
    assert!(bed.user.requests() > 0 && bed.feed.requests() == 1);
    eventually("every call accounted", 100, || {
        let envoy = &bed.envoy;
        async move { accounted(&envoy.metrics().await.unwrap()) as u64 == sent }
    })
    .await;
    assert_eq!(global(&m, "circuit_breaker_cas_give_ups_total"), 0.0);
    println!(
        "reconfiguration: {sent} calls ({load_calls} under load by 4 clients on fresh connections every 25 \
         calls), 0 wrong; lds update_success {}, update_rejected {}",
        bed.lds_counter("update_success").await,
        bed.lds_counter("update_rejected").await
    );
    assert_no_trap(&bed.envoy);
}
