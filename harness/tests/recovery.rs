//! Harness scenarios for a fleet's recovery (issue 19): `open_timeout_jitter` spreads the moment each
//! breaker lets its probes through, and `recovery_ramp` lets traffic back a share at a time after a
//! breaker closes, the share kept together by every worker of the Envoy. Paused tokio time and seeded
//! draws, so every figure below is reproducible.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

use std::collections::BTreeSet;
use std::time::Duration;

use cb_core::breaker::{BreakerState, Reason, StateKind};
use harness::sim::{Admission, Reply, Sim};

fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

/// How long after it opened `key`'s breaker lets probes through.
fn open_for(sim: &Sim, key: &str) -> u64 {
    match sim.breaker(key).map(|b| b.state) {
        Some(BreakerState::Open { until_ms }) => until_ms - sim.clock().now_ms(),
        other => panic!("{key} is not open: {other:?}"),
    }
}

/// One Envoy per seed, each opening its `content` breaker at the same moment; how long each stays Open.
fn open_times_across_a_fleet(json: &str, envoys: u64) -> Vec<u64> {
    (1..=envoys)
        .map(|seed| {
            let sim = Sim::from_json_seeded(json, 2, seed).unwrap();
            sim.worker(0).complete("content", Reply::Grpc(14));
            open_for(&sim, "content")
        })
        .collect()
}

#[tokio::test(start_paused = true)]
async fn jitter_spreads_the_open_times_of_a_fleet_within_open_timeout_times_one_plus_jitter() {
    let json = r#"{"failure_threshold": 1, "open_timeout": "10s", "open_timeout_jitter": 0.2}"#;
    let times = open_times_across_a_fleet(json, 100);
    assert!(
        times.iter().all(|t| (10_000..=12_000).contains(t)),
        "{times:?}"
    );
    // Spread over the whole range, not bunched: every fifth of it holds some of the 100.
    for fifth in 0..5 {
        let (from, to) = (10_000 + fifth * 400, 10_400 + fifth * 400);
        let n = times.iter().filter(|t| (from..to).contains(*t)).count();
        assert!(n >= 5, "{n} of 100 open times in [{from}, {to}): {times:?}");
    }
    let distinct: BTreeSet<_> = times.iter().collect();
    assert!(distinct.len() >= 90, "{} distinct", distinct.len());

    // Without jitter, the whole fleet probes at the same moment.
    let json = r#"{"failure_threshold": 1, "open_timeout": "10s"}"#;
    let times = open_times_across_a_fleet(json, 100);
    assert!(times.iter().all(|t| *t == 10_000), "{times:?}");
}

#[tokio::test(start_paused = true)]
async fn each_breaker_draws_its_own_jitter_and_a_backed_off_open_time_is_jittered_too() {
    let sim = Sim::from_json(
        r#"{"failure_threshold": 1, "open_timeout": "1s", "open_timeout_jitter": 0.5,
            "success_threshold": 1, "backoff_multiplier": 2}"#,
        4,
    )
    .unwrap();
    // Twenty upstreams of one Envoy opened at one moment, through different workers.
    let keys: Vec<String> = (0..20).map(|i| format!("up-{i}")).collect();
    for (i, key) in keys.iter().enumerate() {
        sim.worker(i).complete(key, Reply::Grpc(14));
    }
    let times: Vec<u64> = keys.iter().map(|k| open_for(&sim, k)).collect();
    assert!(
        times.iter().all(|t| (1_000..=1_500).contains(t)),
        "{times:?}"
    );
    let distinct: BTreeSet<_> = times.iter().collect();
    assert!(distinct.len() >= 15, "{times:?}");

    // A failed probe doubles the open time (backoff_multiplier 2); the jitter is drawn on the doubled
    // time.
    tokio::time::advance(ms(1_500)).await;
    let probe = sim.worker(0).complete("up-0", Reply::Grpc(14));
    assert_eq!(probe.admission, Admission::Allow { probe: true });
    assert_eq!(
        probe.transitions.last().map(|t| t.reason),
        Some(Reason::HalfOpenFailure)
    );
    let backed_off = open_for(&sim, "up-0");
    assert!((2_000..=3_000).contains(&backed_off), "{backed_off}");
}

const RAMP: &str = r#"{"failure_threshold": 1, "open_timeout": "1s", "success_threshold": 1,
    "recovery_ramp": "10s", "backoff_multiplier": 2}"#;

/// A breaker that has just closed, its ramp starting now.
async fn just_closed(sim: &Sim) {
    sim.worker(0).complete("content", Reply::Grpc(14));
    tokio::time::advance(ms(1_000)).await;
    let probe = sim.worker(1).complete("content", Reply::Grpc(0));
    assert_eq!(probe.admission, Admission::Allow { probe: true });
    assert_eq!(sim.state("content"), Some(StateKind::Closed));
}

#[tokio::test(start_paused = true)]
async fn the_ramp_admits_a_share_rising_from_a_tenth_to_all_kept_by_every_worker_together() {
    let sim = Sim::from_json(RAMP, 4).unwrap();
    just_closed(&sim).await;
    // One call every 10 ms, round robin over four workers, for 12 s: a hundred calls a second.
    let mut admitted = [0u32; 12];
    let mut recovering = [0u32; 12];
    for i in 0..1_200usize {
        let r = sim.worker(i).complete("content", Reply::Grpc(0));
        match r.admission {
            Admission::Allow { probe: false } => admitted[i / 100] += 1,
            Admission::Reject(rejection) => {
                assert_eq!(rejection.marker(), "recovering");
                let wait = rejection.retry_after_ms.unwrap();
                let left = 10_000 - (i as u64) * 10;
                assert!(wait <= left.max(1) && wait <= 1_000, "{wait} at call {i}");
                recovering[i / 100] += 1;
            }
            other => panic!("call {i}: {other:?}"),
        }
        tokio::time::advance(ms(10)).await;
    }
    // Second s of the ramp admits about 10 % + 90 % × (s + 0.5) / 10 of its calls.
    for s in 0..10 {
        let expected = 10.0 + 90.0 * (s as f64 + 0.5) / 10.0;
        let got = f64::from(admitted[s]);
        assert!(
            (got - expected).abs() <= 6.0,
            "second {s}: {got} admitted, about {expected} expected: {admitted:?}"
        );
    }
    assert_eq!(
        &admitted[10..],
        &[100, 100],
        "every call once the ramp is over"
    );
    assert_eq!(&recovering[10..], &[0, 0]);
    assert_eq!(
        sim.totals().rejected_recovering,
        u64::from(recovering.iter().sum::<u32>())
    );
    let ended = sim.stats().transitions_of("content");
    assert_eq!(
        ended.last().map(|e| e.transition.reason),
        Some(Reason::RecoveryRampEnded)
    );
}

#[tokio::test(start_paused = true)]
async fn a_burst_at_the_start_of_the_ramp_gets_the_share_exactly_and_no_more() {
    let sim = Sim::from_json(RAMP, 4).unwrap();
    just_closed(&sim).await;
    let admitted = (0..1_000)
        .filter(|i| {
            sim.worker(*i)
                .complete("content", Reply::Grpc(0))
                .forwarded()
        })
        .count();
    assert_eq!(
        admitted, 100,
        "a tenth of a thousand calls from four workers"
    );
}

#[tokio::test(start_paused = true)]
async fn a_relapse_during_the_ramp_opens_again_for_longer() {
    let sim = Sim::from_json(RAMP, 2).unwrap();
    just_closed(&sim).await;
    tokio::time::advance(ms(2_000)).await;
    // The first admitted call fails: the upstream has not recovered after all.
    let failed = (0..20)
        .map(|i| sim.worker(i).complete("content", Reply::Grpc(14)))
        .find(|r| r.forwarded())
        .unwrap();
    assert_eq!(
        failed.transitions.last().map(|t| (t.to, t.reason)),
        Some((StateKind::Open, Reason::ConsecutiveFailures))
    );
    assert_eq!(
        open_for(&sim, "content"),
        2_000,
        "backed off (backoff_multiplier 2), as after a failed probe"
    );
}
