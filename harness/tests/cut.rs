//! Harness scenarios for `cut_stuck_calls` (issue 17): the core decides which stuck calls to cut, and
//! each simulated worker's tick delivers the answers to its own calls, as each Envoy build does. Paused
//! tokio time, so every wait below is exact.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

use std::sync::Arc;
use std::time::Duration;

use cb_core::breaker::{Reason, StateKind};
use cb_core::classify::Outcome;
use harness::sim::{Behaviour, CallReport, Reply, Sim, Upstream};
use tokio::task::JoinSet;

fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

/// Five callers 10 ms apart over three workers into a hung upstream, each with a 10 s deadline.
async fn five_callers_into_a_hang(sim: &Sim, up: &Arc<Upstream>) -> Vec<CallReport> {
    let mut callers = JoinSet::new();
    for i in 0..5u64 {
        let (worker, up) = (sim.worker(i as usize), Arc::clone(up));
        callers.spawn(async move {
            tokio::time::sleep(ms(i * 10)).await;
            worker.call_with_deadline(&up, ms(10_000)).await
        });
    }
    let mut reports = Vec::new();
    while let Some(r) = callers.join_next().await {
        reports.push(r.unwrap());
    }
    reports
}

const STUCK: &str =
    r#""failure_threshold": 3, "stuck_call_duration": "500ms", "open_timeout": "30s""#;

#[tokio::test(start_paused = true)]
async fn the_calls_a_hung_upstream_holds_are_answered_once_it_opens_not_at_their_deadline() {
    let sim = Sim::from_json(&format!(r#"{{{STUCK}, "cut_stuck_calls": true}}"#), 3).unwrap();
    let up = Arc::new(sim.upstream("content", Behaviour::Hanging));
    let reports = five_callers_into_a_hang(&sim, &up).await;
    // The third call is stuck at 520 ms; the tick at 550 ms records the first three, opens the
    // breaker, and every worker's tick cuts the calls it holds: the two younger ones once they are
    // stuck too (at 530 and 540 ms, so by the same tick).
    for r in &reports {
        assert_eq!(r.reply, Some(Reply::Cut), "{r:?}");
        assert_eq!(r.classification, None, "recorded once, as stuck");
        assert!(r.waited <= ms(600), "waited {:?}", r.waited);
    }
    let opened = sim.stats().transitions_of("content");
    assert_eq!(opened.len(), 1, "{opened:?}");
    assert_eq!(opened[0].transition.reason, Reason::ConsecutiveFailures);
    let t = sim.totals();
    assert_eq!((t.cut, t.stuck, t.failures), (5, 5, 5));
    assert_eq!(up.calls(), 5);
}

#[tokio::test(start_paused = true)]
async fn without_cut_stuck_calls_the_same_calls_wait_out_their_deadline() {
    let sim = Sim::from_json(&format!("{{{STUCK}}}"), 3).unwrap();
    let up = Arc::new(sim.upstream("content", Behaviour::Hanging));
    let reports = five_callers_into_a_hang(&sim, &up).await;
    for r in &reports {
        assert_eq!(r.reply, Some(Reply::ClientCancelled), "{r:?}");
        assert_eq!(r.waited, ms(10_000));
    }
    assert_eq!(sim.state("content"), Some(StateKind::Open));
    assert_eq!(sim.totals().cut, 0);
}

#[tokio::test(start_paused = true)]
async fn a_call_still_young_when_the_breaker_opens_is_cut_once_it_is_stuck_too() {
    let sim = Sim::from_json(
        r#"{"failure_threshold": 1, "stuck_call_duration": "500ms", "open_timeout": "30s",
            "cut_stuck_calls": true}"#,
        2,
    )
    .unwrap();
    let up = Arc::new(sim.upstream("content", Behaviour::Hanging));
    let old = {
        let (w, up) = (sim.worker(0), Arc::clone(&up));
        tokio::spawn(async move { w.call(&up).await })
    };
    tokio::time::sleep(ms(300)).await;
    let young = {
        let (w, up) = (sim.worker(1), Arc::clone(&up));
        tokio::spawn(async move { w.call(&up).await })
    };
    let old = old.await.unwrap();
    assert_eq!(old.reply, Some(Reply::Cut));
    assert_eq!(sim.state("content"), Some(StateKind::Open));
    // Open since about 550 ms, but the younger call is not stuck until 800 ms: it is not cut before.
    let young = young.await.unwrap();
    assert_eq!(young.reply, Some(Reply::Cut));
    assert!(
        young.waited >= ms(500) && young.waited <= ms(600),
        "{:?}",
        young.waited
    );
    assert_eq!(sim.totals().cut, 2);
}

#[tokio::test(start_paused = true)]
async fn only_the_calls_of_an_open_breaker_are_cut() {
    // `feed` needs five failures to open: one stuck call of its own is a failure, not a cut.
    let sim = Sim::from_json(
        r#"{"failure_threshold": 1, "stuck_call_duration": "500ms", "open_timeout": "30s",
            "cut_stuck_calls": true, "upstreams": {"feed": {"failure_threshold": 5}}}"#,
        1,
    )
    .unwrap();
    let hung = Arc::new(sim.upstream("content", Behaviour::Hanging));
    let slow = sim.upstream("feed", Behaviour::Healthy { latency: ms(2_000) });
    let stuck = {
        let (w, up) = (sim.worker(0), Arc::clone(&hung));
        tokio::spawn(async move { w.call(&up).await })
    };
    let r = sim.worker(0).call(&slow).await;
    assert_eq!(r.reply, Some(Reply::Grpc(0)), "feed's breaker is closed");
    assert_eq!(r.waited, ms(2_000));
    assert_eq!(sim.state("feed"), Some(StateKind::Closed));
    assert_eq!(stuck.await.unwrap().reply, Some(Reply::Cut));
    let t = sim.totals();
    assert_eq!((t.cut, t.stuck), (1, 2));
    assert!(
        !r.classification
            .is_some_and(|c| c.outcome == Outcome::Success),
        "recorded once, as stuck"
    );
}
