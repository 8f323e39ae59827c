//! Harness scenarios for the calls that never finish (issue 10), and for hostile keys (issue 11): the
//! filter's own stream logic ([`cb_core::session::Session`]) run by several simulated workers on one
//! shared store, under paused tokio time, so every timing below is exact.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

use std::sync::Arc;
use std::time::Duration;

use cb_core::breaker::{Reason, StateKind};
use harness::sim::{Admission, Behaviour, Reply, Sim, STUCK_CHECK_PERIOD};
use tokio::task::JoinSet;

fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

fn sim(json: &str, workers: usize) -> Sim {
    Sim::from_json(json, workers).unwrap()
}

#[tokio::test(start_paused = true)]
async fn a_blackholed_upstream_opens_after_failure_threshold_deadline_cancels() {
    let sim = sim(r#"{"failure_threshold": 5}"#, 4);
    let up = Arc::new(sim.upstream("content", Behaviour::Hanging));
    // Five callers with a 300 ms deadline, 10 ms apart, over four workers: every one gives up at its
    // deadline, and Envoy sees only the cancel.
    let mut callers = JoinSet::new();
    for i in 0..5u64 {
        let (worker, up) = (sim.worker(i as usize), Arc::clone(&up));
        callers.spawn(async move {
            tokio::time::sleep(ms(i * 10)).await;
            worker.call_with_deadline(&up, ms(300)).await
        });
    }
    while let Some(r) = callers.join_next().await {
        let r = r.unwrap();
        assert_eq!(r.reply, Some(Reply::ClientCancelled));
        assert!(r
            .classification
            .is_some_and(|c| c.outcome == cb_core::classify::Outcome::Failure));
    }
    let opened = sim.stats().transitions();
    assert_eq!(opened.len(), 1, "{opened:?}");
    assert_eq!(opened[0].transition.reason, Reason::ConsecutiveFailures);
    assert_eq!(opened[0].at_ms, 340, "the fifth deadline: 40 ms + 300 ms");
    let next = sim.worker(0).call_with_deadline(&up, ms(300)).await;
    assert!(next.rejected().is_some());
    assert_eq!(up.calls(), 5);
    let t = sim.totals();
    assert_eq!((t.failures, t.ignored, t.rejected), (5, 0, 1));
}

#[tokio::test(start_paused = true)]
async fn cancels_without_a_deadline_never_open_it() {
    let sim = sim(r#"{"failure_threshold": 2}"#, 2);
    let up = sim.upstream("content", Behaviour::Hanging);
    for i in 0..10 {
        let r = sim.worker(i).call_with_patience(&up, ms(300)).await;
        assert_eq!(r.reply, Some(Reply::ClientCancelled));
    }
    assert!(sim.stats().transitions().is_empty());
    assert_eq!(sim.totals().ignored, 10);
}

#[tokio::test(start_paused = true)]
async fn stuck_calls_open_it_within_the_stuck_duration_while_no_call_has_finished() {
    let sim = sim(
        r#"{"failure_threshold": 3, "stuck_call_duration": "500ms"}"#,
        3,
    );
    let up = Arc::new(sim.upstream("content", Behaviour::Hanging));
    // Three callers with no deadline at all: only the route's 15 s timeout would end their calls.
    let mut callers = JoinSet::new();
    for i in 0..3 {
        let (worker, up) = (sim.worker(i), Arc::clone(&up));
        callers.spawn(async move { worker.call(&up).await });
    }
    tokio::time::sleep(ms(600)).await;
    let opened = sim.stats().transitions();
    assert_eq!(opened.len(), 1, "{opened:?}");
    assert_eq!(opened[0].transition.reason, Reason::ConsecutiveFailures);
    let at = opened[0].at_ms;
    assert!(
        (500..=500 + STUCK_CHECK_PERIOD.as_millis() as u64).contains(&at) && at <= 600,
        "opened at {at} ms"
    );
    assert_eq!(up.in_flight().current(), 3, "no call has finished");
    let t = sim.totals();
    assert_eq!((t.stuck, t.failures), (3, 3));
    // The next caller fails fast.
    assert!(sim.worker(0).call(&up).await.rejected().is_some());
    // The stuck calls end at the route timeout: their tickets were spent, nothing is recorded again.
    while let Some(r) = callers.join_next().await {
        let r = r.unwrap();
        assert_eq!(r.reply, Some(Reply::TimedOut));
        assert_eq!(r.classification, None, "recorded once, as stuck");
    }
    let t = sim.totals();
    assert_eq!((t.stuck, t.failures, t.recorded), (3, 3, 3));
}

#[tokio::test(start_paused = true)]
async fn a_stuck_probe_frees_its_permit_as_a_failed_probe() {
    let sim = sim(
        r#"{"failure_threshold": 1, "open_timeout": "1s", "stuck_call_duration": "400ms"}"#,
        2,
    );
    let up = Arc::new(sim.upstream(
        "content",
        Behaviour::Failing {
            grpc_status: 14,
            latency: ms(0),
        },
    ));
    assert!(sim.worker(0).call(&up).await.forwarded());
    assert_eq!(sim.state("content"), Some(StateKind::Open));
    up.set(Behaviour::Hanging);
    tokio::time::sleep(ms(1_000)).await;
    let probe = {
        let (worker, up) = (sim.worker(1), Arc::clone(&up));
        tokio::spawn(async move { worker.call(&up).await })
    };
    tokio::time::sleep(ms(450)).await;
    let kinds: Vec<_> = sim
        .stats()
        .transitions()
        .iter()
        .map(|e| (e.transition.to, e.transition.reason))
        .collect();
    assert_eq!(
        kinds.last(),
        Some(&(StateKind::Open, Reason::HalfOpenFailure)),
        "{kinds:?}"
    );
    probe.abort();
}

#[tokio::test(start_paused = true)]
async fn a_real_upstream_gets_a_breaker_after_100_000_junk_keys_once_the_junk_has_idled() {
    let sim = sim(
        r#"{"max_upstreams": 16, "idle_timeout": "1m", "failure_threshold": 1}"#,
        2,
    );
    // One junk key is open: it is never evicted, whatever else happens.
    assert!(sim
        .worker(0)
        .complete("junk-open", Reply::Grpc(14))
        .forwarded());
    assert_eq!(sim.state("junk-open"), Some(StateKind::Open));
    for i in 0..100_000 {
        sim.worker(i).complete(&format!("junk-{i}"), Reply::Grpc(0));
    }
    let t = sim.totals();
    assert_eq!(sim.health().len(), 16, "max_upstreams breakers and no more");
    assert_eq!(
        t.untracked,
        100_000 - 15,
        "every junk key past the first 15 passed untracked"
    );
    // Full of junk that was just called: a real upstream passes untracked, for now.
    let now = sim.worker(0).complete("content", Reply::Grpc(0));
    assert_eq!(now.admission, Admission::Untracked);
    // Once the junk has been idle for idle_timeout, the real upstream takes one of its slots.
    tokio::time::advance(ms(60_000)).await;
    let later = sim.worker(1).complete("content", Reply::Grpc(0));
    assert_eq!(later.admission, Admission::Allow { probe: false });
    assert_eq!(sim.totals().evicted, 1);
    assert_eq!(sim.state("content"), Some(StateKind::Closed));
    assert_eq!(
        sim.state("junk-open"),
        Some(StateKind::Open),
        "an open breaker is never evicted"
    );
    // It is protected like any upstream: one failure opens it (failure_threshold 1).
    sim.worker(0).complete("content", Reply::Grpc(14));
    assert!(sim
        .worker(1)
        .complete("content", Reply::Grpc(0))
        .rejected()
        .is_some());
}
