//! Harness scenarios: the breaker core run by several simulated Envoy workers sharing one CAS store,
//! against scripted upstreams. Most run under paused tokio time, so every timing below is exact and a
//! scenario of minutes takes milliseconds; the two race scenarios use real threads instead, with
//! bounded loops.

// The whole file is test code: clippy.toml allows these in `#[test]` functions, and the helpers below
// are only there to keep those functions short.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

use std::sync::Arc;
use std::time::Duration;

use cb_core::breaker::{BreakerState, Reason, StateKind, Transition};
use cb_core::classify::{Classification, Outcome};
use harness::sim::{Admission, Behaviour, CallReport, Reply, Sim, TransitionEvent, Upstream};
use tokio::task::JoinSet;

const UNAVAILABLE: u8 = 14;

fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

fn sim(json: &str, workers: usize) -> Sim {
    Sim::from_json(json, workers).unwrap()
}

/// Sleeps until the simulation clock reads `at_ms`.
async fn advance_to(sim: &Sim, at_ms: u64) {
    let now = sim.clock().elapsed();
    assert!(
        now <= ms(at_ms),
        "scenario is already past {at_ms}ms (at {now:?})"
    );
    tokio::time::sleep(ms(at_ms) - now).await;
}

fn failing(latency_ms: u64) -> Behaviour {
    Behaviour::Failing {
        grpc_status: UNAVAILABLE,
        latency: ms(latency_ms),
    }
}

fn healthy(latency_ms: u64) -> Behaviour {
    Behaviour::Healthy {
        latency: ms(latency_ms),
    }
}

fn kinds(events: &[TransitionEvent]) -> Vec<(StateKind, StateKind, Reason)> {
    events
        .iter()
        .map(|e| (e.transition.from, e.transition.to, e.transition.reason))
        .collect()
}

fn opened(reason: Reason) -> Transition {
    Transition {
        from: StateKind::Closed,
        to: StateKind::Open,
        reason,
    }
}

/// Calls `up` `n` times in a row, round-robin over the workers.
async fn calls_in_a_row(sim: &Sim, up: &Upstream, n: usize) -> Vec<CallReport> {
    let mut reports = Vec::with_capacity(n);
    for i in 0..n {
        reports.push(sim.worker(i).call(up).await);
    }
    reports
}

#[tokio::test(start_paused = true)]
async fn five_consecutive_failures_open_the_breaker_and_later_calls_fail_fast() {
    let sim = sim(r#"{"open_timeout": "60s"}"#, 4);
    let up = sim.upstream("content", failing(20));

    let first = calls_in_a_row(&sim, &up, 5).await;
    for (i, r) in first.iter().enumerate() {
        assert!(r.forwarded(), "call {i} must reach the upstream");
        assert_eq!(r.classification.unwrap().outcome, Outcome::Failure);
        let expected: Vec<Transition> = if i == 4 {
            vec![opened(Reason::ConsecutiveFailures)]
        } else {
            vec![]
        };
        assert_eq!(r.transitions, expected, "call {i}");
    }
    assert_eq!(sim.state("content"), Some(StateKind::Open));

    // From the next call on, every worker answers at once, and the upstream sees nothing more.
    let later = calls_in_a_row(&sim, &up, 45).await;
    for r in &later {
        let rejection = r.rejected().expect("rejected while open");
        assert_eq!(rejection.state, StateKind::Open);
        assert_eq!(
            rejection.retry_after_ms,
            Some(60_000),
            "no time passes while failing fast"
        );
        assert_eq!(r.waited, Duration::ZERO);
    }
    assert_eq!(up.calls(), 5);
    let t = sim.totals();
    assert_eq!(
        (t.calls, t.admitted, t.rejected_open, t.failures),
        (50, 5, 45, 5)
    );
    assert_eq!(
        t.wait_ms,
        5 * 20,
        "only the five forwarded calls took any time"
    );
    assert_eq!(sim.stats().transitions().len(), 1);
    let health = sim.health();
    assert_eq!(health.len(), 1);
    assert_eq!(
        (health[0].state, health[0].consecutive_failures),
        (StateKind::Open, 5)
    );
}

#[tokio::test(start_paused = true)]
async fn after_open_timeout_success_threshold_good_probes_close_it() {
    let sim = sim(r#"{"open_timeout": "10s", "success_threshold": 2}"#, 4);
    let up = Arc::new(
        sim.upstream("content", failing(10))
            .then_at(ms(5_000), healthy(10)),
    );

    // Calls at 0, 10, ..., 40 ms; the fifth failure comes back at 50 ms and opens until 10 050 ms.
    calls_in_a_row(&sim, &up, 5).await;
    assert_eq!(sim.clock().now_ms(), 50);

    advance_to(&sim, 10_049).await;
    let early = sim.worker(0).call(&up).await;
    assert_eq!(
        early.rejected().unwrap().retry_after_ms,
        Some(1),
        "one ms short of the open time"
    );

    advance_to(&sim, 10_050).await;
    // While the first probe is out, a concurrent call finds no permit free.
    let (w1, w2) = (sim.worker(1), sim.worker(2));
    let (probe, concurrent) = tokio::join!(w1.call(&up), async {
        tokio::time::sleep(ms(5)).await;
        w2.call(&up).await
    });
    assert!(matches!(probe.admission, Admission::Allow { probe: true }));
    assert_eq!(
        probe.transitions,
        vec![Transition {
            from: StateKind::Open,
            to: StateKind::HalfOpen,
            reason: Reason::OpenTimeoutElapsed
        }]
    );
    assert_eq!(concurrent.rejected().unwrap().state, StateKind::HalfOpen);
    assert_eq!(
        sim.state("content"),
        Some(StateKind::HalfOpen),
        "one good probe is not enough"
    );

    let second = sim.worker(3).call(&up).await;
    assert_eq!(
        second.transitions,
        vec![Transition {
            from: StateKind::HalfOpen,
            to: StateKind::Closed,
            reason: Reason::ProbesSucceeded
        }]
    );
    let after = sim.worker(0).call(&up).await;
    assert!(
        matches!(after.admission, Admission::Allow { probe: false }),
        "closed again: plain calls flow"
    );

    let events = sim.stats().transitions();
    let at: Vec<u64> = events.iter().map(|e| e.at_ms).collect();
    assert_eq!(at, vec![50, 10_050, 10_070]);
    assert_eq!(up.calls(), 5 + 2 + 1);
    let b = sim.breaker("content").unwrap();
    assert_eq!(
        (b.state, b.stats(sim.clock().now_ms()).calls),
        (BreakerState::Closed, 1),
        "closing starts a fresh window"
    );
}

#[tokio::test(start_paused = true)]
async fn a_failed_probe_reopens_it_with_backoff_capped_by_max_open_timeout() {
    let sim = sim(
        r#"{"open_timeout": "10s", "backoff_multiplier": 2, "max_open_timeout": "25s", "success_threshold": 2}"#,
        2,
    );
    let up = sim.upstream("content", failing(10));
    calls_in_a_row(&sim, &up, 5).await; // open at 50 ms until 10 050 ms

    // Each failed probe reopens for the open time in force times two, at most 25 s.
    let mut until = 10_050;
    for expected_open_ms in [20_000, 25_000, 25_000] {
        advance_to(&sim, until - 1).await;
        assert_eq!(
            sim.worker(0)
                .call(&up)
                .await
                .rejected()
                .unwrap()
                .retry_after_ms,
            Some(1)
        );
        advance_to(&sim, until).await;
        let probe = sim.worker(1).call(&up).await;
        assert_eq!(
            kinds_of(&probe.transitions),
            vec![
                (
                    StateKind::Open,
                    StateKind::HalfOpen,
                    Reason::OpenTimeoutElapsed
                ),
                (
                    StateKind::HalfOpen,
                    StateKind::Open,
                    Reason::HalfOpenFailure
                )
            ],
        );
        let next = sim.worker(0).call(&up).await;
        assert_eq!(
            next.rejected().unwrap().retry_after_ms,
            Some(expected_open_ms)
        );
        assert_eq!(
            sim.breaker("content").unwrap().open_timeout_ms,
            expected_open_ms
        );
        until += 10 + expected_open_ms; // the probe took 10 ms
    }

    // The upstream recovers: two good probes close it, and the open time goes back to its base.
    up.set(healthy(10));
    advance_to(&sim, until).await;
    sim.worker(0).call(&up).await;
    let closing = sim.worker(1).call(&up).await;
    assert_eq!(closing.transitions.last().unwrap().to, StateKind::Closed);
    assert_eq!(sim.breaker("content").unwrap().open_timeout_ms, 10_000);

    // Measured from the log: how long each opening lasted.
    let events = sim.stats().transitions();
    let open_for: Vec<u64> = events
        .windows(2)
        .filter(|w| {
            w[0].transition.to == StateKind::Open && w[1].transition.to == StateKind::HalfOpen
        })
        .map(|w| w[1].at_ms - w[0].at_ms)
        .collect();
    assert_eq!(open_for, vec![10_000, 20_000, 25_000, 25_000]);
    assert_eq!(up.calls(), 5 + 3 + 2);
}

fn kinds_of(ts: &[Transition]) -> Vec<(StateKind, StateKind, Reason)> {
    ts.iter().map(|t| (t.from, t.to, t.reason)).collect()
}

#[tokio::test(start_paused = true)]
async fn error_rate_of_half_over_a_100_call_window_trips_only_once_minimum_requests_are_in() {
    let json = r#"{"failure_threshold": 0, "error_rate_threshold": 0.5, "window_size": 100, "minimum_requests": 20}"#;
    let sim = sim(json, 4);
    // Every second call fails: the rate is 50% after every even call, from the second on.
    let up = sim.upstream(
        "content",
        Behaviour::FailEvery {
            n: 2,
            grpc_status: UNAVAILABLE,
            latency: ms(5),
        },
    );

    for i in 1..20u64 {
        let r = sim.worker(i as usize).call(&up).await;
        assert!(r.forwarded() && r.transitions.is_empty(), "call {i}: {r:?}");
        if i % 2 == 0 {
            let stats = sim.breaker("content").unwrap().stats(sim.clock().now_ms());
            assert_eq!((stats.calls, stats.failures), (i as u32, i as u32 / 2));
            assert!(
                stats.failure_rate_reaches(500_000),
                "the rate is there; the calls are not"
            );
        }
    }
    let twentieth = sim.worker(0).call(&up).await;
    assert_eq!(twentieth.transitions, vec![opened(Reason::ErrorRate)]);
    assert!(calls_in_a_row(&sim, &up, 10)
        .await
        .iter()
        .all(|r| r.rejected().is_some()));
    assert_eq!(up.calls(), 20);
    let t = sim.totals();
    assert_eq!((t.successes, t.failures, t.rejected), (10, 10, 10));
}

#[tokio::test(start_paused = true)]
async fn error_rate_below_the_threshold_never_trips() {
    let json = r#"{"failure_threshold": 0, "error_rate_threshold": 0.5, "window_size": 100, "minimum_requests": 20}"#;
    let sim = sim(json, 4);
    let up = sim.upstream(
        "content",
        Behaviour::FailEvery {
            n: 3,
            grpc_status: UNAVAILABLE,
            latency: ms(5),
        },
    );
    let reports = calls_in_a_row(&sim, &up, 300).await;
    assert!(reports.iter().all(CallReport::forwarded));
    assert!(sim.stats().transitions().is_empty());
    assert_eq!(up.calls(), 300);
    let stats = sim.breaker("content").unwrap().stats(sim.clock().now_ms());
    assert_eq!(
        (stats.calls, stats.failures),
        (100, 34),
        "the window holds the last 100 calls"
    );
}

#[tokio::test(start_paused = true)]
async fn slow_call_rate_trips_once_slow_call_duration_is_set() {
    let base = r#""failure_threshold": 0, "window_size": 20, "minimum_requests": 10, "slow_call_rate_threshold": 0.5"#;
    let slow = Behaviour::Slow { latency: ms(1_500) };

    let tracked = sim(&format!(r#"{{{base}, "slow_call_duration": "1s"}}"#), 2);
    let up = tracked.upstream("content", slow);
    let reports = calls_in_a_row(&tracked, &up, 12).await;
    for (i, r) in reports.iter().take(9).enumerate() {
        assert_eq!(
            r.classification,
            Some(Classification {
                outcome: Outcome::Success,
                slow: true
            }),
            "call {i}"
        );
        assert!(r.transitions.is_empty(), "call {i}");
    }
    assert_eq!(reports[9].transitions, vec![opened(Reason::SlowCallRate)]);
    assert!(reports[10..].iter().all(|r| r.rejected().is_some()));
    assert_eq!(up.calls(), 10);
    assert_eq!(tracked.totals().slow, 10);

    // The same traffic without slow_call_duration: slowness is not tracked and nothing trips.
    let untracked = sim(&format!("{{{base}}}"), 2);
    let up = untracked.upstream("content", slow);
    let reports = calls_in_a_row(&untracked, &up, 30).await;
    assert!(reports
        .iter()
        .all(|r| r.forwarded() && r.classification.is_some_and(|c| !c.slow)));
    assert!(untracked.stats().transitions().is_empty());
    assert_eq!(untracked.totals().slow, 0);
}

/// Trips `up`'s breaker with five quick failures; returns the time it opened until.
async fn trip(sim: &Sim, up: &Upstream) -> u64 {
    calls_in_a_row(sim, up, 5).await;
    match sim.breaker(up.name()).unwrap().state {
        BreakerState::Open { until_ms } => until_ms,
        other => panic!("expected open, got {other:?}"),
    }
}

#[tokio::test(start_paused = true)]
async fn eight_workers_in_half_open_never_have_more_probes_in_flight_than_allowed() {
    let sim = sim(
        r#"{"open_timeout": "10s", "half_open_max_requests": 3, "success_threshold": 1000}"#,
        8,
    );
    let up = Arc::new(
        sim.upstream("media", failing(10))
            .then_at(ms(5_000), healthy(100)),
    );
    let until = trip(&sim, &up).await;
    advance_to(&sim, until).await;

    // 80 callers on 8 workers, 10 calls each, with jittered pauses: many calls meet in HalfOpen.
    let mut callers = JoinSet::new();
    for c in 0..80usize {
        let (worker, up) = (sim.worker(c), Arc::clone(&up));
        callers.spawn(async move {
            for _ in 0..10 {
                worker.call(&up).await;
                tokio::time::sleep(ms(7 + (c % 13) as u64)).await;
            }
        });
    }
    while let Some(done) = callers.join_next().await {
        done.unwrap();
    }

    let t = sim.totals();
    assert_eq!(
        t.max_probes_in_flight, 3,
        "the limit is reached, never passed"
    );
    assert!(up.in_flight().max() <= 3);
    assert!(t.probes > 3 && t.rejected_half_open > 0, "{t:?}");
    assert_eq!(t.probes + t.rejected_half_open, 800);
    match sim.breaker("media").unwrap().state {
        BreakerState::HalfOpen {
            in_flight,
            successes,
            ..
        } => {
            assert_eq!(in_flight, 0, "every permit came back");
            assert_eq!(u64::from(successes), t.probes);
        }
        other => panic!("expected HalfOpen, got {other:?}"),
    }
}

/// The same invariant with real threads racing on the store's CAS: 8 workers as tasks of a 2-thread
/// runtime, the breaker planted in HalfOpen so the race starts at once (real time, bounded loops).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn eight_racing_workers_in_half_open_respect_the_probe_limit() {
    let sim = Arc::new(sim(
        r#"{"open_timeout": "60s", "half_open_max_requests": 2, "success_threshold": 10000}"#,
        8,
    ));
    let up = Arc::new(sim.upstream(
        "media",
        Behaviour::Healthy {
            latency: Duration::from_micros(300),
        },
    ));
    sim.worker(0).call(&up).await; // registers the key
    let mut b = sim.breaker("media").unwrap();
    b.state = BreakerState::HalfOpen {
        in_flight: 0,
        successes: 0,
        last_permit_ms: sim.clock().now_ms(),
    };
    b.generation += 1;
    sim.plant("media", &b);

    let mut tasks = JoinSet::new();
    for w in 0..8 {
        let (worker, up) = (sim.worker(w), Arc::clone(&up));
        tasks.spawn(async move {
            for _ in 0..250 {
                worker.call(&up).await;
                tokio::task::yield_now().await;
            }
        });
    }
    while let Some(done) = tasks.join_next().await {
        done.unwrap();
    }

    let t = sim.totals();
    assert!(t.max_probes_in_flight <= 2, "{t:?}");
    assert!(up.in_flight().max() <= 2);
    assert!(
        t.probes > 2,
        "permits were given back and taken again: {t:?}"
    );
    assert_eq!((t.record_errors, t.cas_give_ups), (0, 0));
    match sim.breaker("media").unwrap().state {
        BreakerState::HalfOpen {
            in_flight,
            successes,
            ..
        } => {
            assert_eq!(in_flight, 0);
            assert_eq!(u64::from(successes), t.probes);
        }
        other => panic!("expected HalfOpen, got {other:?}"),
    }
}

/// 8 OS threads, 100 000 calls on one key, each through the filter's stream logic. The configuration
/// never trips (no consecutive trigger, rates never judged), and the time window is long enough to hold
/// everything, so the stored window must account for exactly the outcomes that were stored; an outcome
/// that lost every compare-and-swap waits in its worker's retry queue and is stored later, and the rest
/// are counted.
#[test]
fn one_hundred_thousand_outcomes_through_cas_on_one_key_are_all_accounted_for() {
    const THREADS: u64 = 8;
    const PER_THREAD: u64 = 12_500;
    let json = r#"{"failure_threshold": 0, "error_rate_threshold": 1.0, "minimum_requests": 1000000, "window_duration": "1h"}"#;
    let sim = sim(json, THREADS as usize);
    // Register the key before the race, as any first call does.
    assert!(sim
        .worker(0)
        .complete("content", Reply::Grpc(0))
        .forwarded());

    let sent: Vec<(u64, u64)> = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..THREADS)
            .map(|t| {
                let worker = sim.worker(t as usize);
                scope.spawn(move || {
                    let (mut allowed, mut failing) = (0, 0);
                    for i in 0..PER_THREAD {
                        let n = t * PER_THREAD + i;
                        let fails = n % 4 == 0;
                        let reply = Reply::Grpc(if fails { 14 } else { 0 });
                        let r = worker.complete("content", reply);
                        assert!(r.transitions.is_empty(), "this configuration never trips");
                        if r.admission == (Admission::Allow { probe: false }) {
                            allowed += 1;
                            failing += u64::from(fails);
                        }
                    }
                    (allowed, failing)
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let allowed: u64 = sent.iter().map(|s| s.0).sum();
    // What is still queued for a retry is stored by the next stuck-call check.
    for w in sim.workers() {
        w.tick();
    }
    let t = sim.totals();
    println!("100k CAS race: {t:?}");
    assert_eq!(t.calls, THREADS * PER_THREAD + 1);
    assert_eq!(
        allowed + t.untracked,
        THREADS * PER_THREAD,
        "an admission that gave up passes untracked"
    );
    assert_eq!(
        t.recorded + t.outcomes_lost,
        allowed + 1,
        "every outcome stored or counted lost"
    );
    let stats = sim.breaker("content").unwrap().stats(sim.clock().now_ms());
    assert_eq!(
        u64::from(stats.calls),
        t.recorded,
        "no stored outcome lost, none counted twice"
    );
    assert_eq!(u64::from(stats.failures), t.failures);
    if t.outcomes_lost == 0 {
        assert_eq!(t.failures, sent.iter().map(|s| s.1).sum::<u64>());
    }
    if std::thread::available_parallelism().map_or(1, |n| n.get()) > 1 {
        assert!(t.cas_retries > 0, "the threads did race: {t:?}");
    }
}

/// Runs 100 callers into a hanging upstream, one arriving every 50 ms, each call cut at 500 ms by the
/// router; returns the upstream and the callers' reports.
async fn callers_into_a_dead_service(json: &str) -> (Sim, Arc<Upstream>, Vec<CallReport>) {
    let sim = sim(json, 4);
    let up = Arc::new(sim.upstream("content", Behaviour::Hanging));
    let mut callers = JoinSet::new();
    for i in 0..100u64 {
        let (worker, up) = (sim.worker(i as usize), Arc::clone(&up));
        callers.spawn(async move {
            tokio::time::sleep(ms(i * 50)).await;
            worker.call(&up).await
        });
    }
    let mut reports = Vec::new();
    while let Some(r) = callers.join_next().await {
        reports.push(r.unwrap());
    }
    (sim, up, reports)
}

#[tokio::test(start_paused = true)]
async fn a_dead_service_is_reached_only_until_the_breaker_opens() {
    let (sim, up, reports) =
        callers_into_a_dead_service(r#"{"call_timeout": "500ms", "open_timeout": "60s"}"#).await;
    let forwarded: Vec<_> = reports.iter().filter(|r| r.forwarded()).collect();
    // The fifth timeout (the call that arrived at 200 ms) opens the breaker at 700 ms. Whatever had
    // arrived by then was already waiting on the upstream; nothing after it reaches it.
    let in_flight = up.in_flight().max();
    assert!(
        in_flight <= 11,
        "about ten calls overlap with a 500 ms timeout every 50 ms: {in_flight}"
    );
    assert!(
        up.calls() <= 5 + in_flight,
        "calls {} > 5 + {in_flight}",
        up.calls()
    );
    assert!(up.calls() <= 15);
    assert_eq!(forwarded.len() as u64, up.calls());
    assert!(forwarded
        .iter()
        .all(|r| r.reply == Some(harness::sim::Reply::TimedOut) && r.waited == ms(500)));
    let rejected: Vec<_> = reports
        .iter()
        .filter_map(|r| r.rejected().map(|rej| (rej, r.waited)))
        .collect();
    assert_eq!(rejected.len() as u64, 100 - up.calls());
    assert!(rejected
        .iter()
        .all(|(rej, waited)| rej.state == StateKind::Open && *waited == Duration::ZERO));
    let t = sim.totals();
    assert_eq!(
        t.wait_ms,
        500 * up.calls(),
        "only the forwarded calls waited, each the full timeout"
    );
    assert_eq!(
        kinds(&sim.stats().transitions()),
        vec![(
            StateKind::Closed,
            StateKind::Open,
            Reason::ConsecutiveFailures
        )]
    );
    assert_eq!(sim.stats().transitions()[0].at_ms, 700);
}

#[tokio::test(start_paused = true)]
async fn without_the_breaker_every_caller_reaches_the_dead_service_and_waits_the_full_timeout() {
    let (sim, up, reports) =
        callers_into_a_dead_service(r#"{"call_timeout": "500ms", "mode": "disabled"}"#).await;
    assert_eq!(up.calls(), 100);
    assert!(reports
        .iter()
        .all(|r| r.reply == Some(harness::sim::Reply::TimedOut) && r.waited == ms(500)));
    let t = sim.totals();
    assert_eq!(t.wait_ms, 100 * 500);
    assert_eq!(
        (t.disabled, t.admitted, t.rejected, t.recorded, t.untracked),
        (100, 0, 0, 0, 0)
    );
    assert_eq!(sim.breaker("content"), None, "disabled tracks nothing");
    assert_eq!(
        sim.store().len(),
        1024 + 2,
        "the store holds the empty table, its marker and the label tally, and nothing else"
    );
}

#[tokio::test(start_paused = true)]
async fn upstreams_have_their_own_breakers() {
    let sim = sim(
        r#"{"open_timeout": "30s", "upstreams": {"*media*": {"failure_threshold": 3}}}"#,
        4,
    );
    let media = sim.upstream("outbound|80||media-service", Behaviour::Refusing);
    let content = sim.upstream("outbound|80||content-service", healthy(20));
    // One failure in four: below the 50% rate, and never five in a row.
    let auth = sim.upstream(
        "outbound|80||auth-service",
        Behaviour::FailEvery {
            n: 4,
            grpc_status: UNAVAILABLE,
            latency: ms(5),
        },
    );

    for round in 0..30usize {
        for (j, up) in [&media, &content, &auth].into_iter().enumerate() {
            sim.worker(round + j).call(up).await;
        }
        tokio::time::sleep(ms(100)).await;
    }

    assert_eq!(
        media.calls(),
        3,
        "the *media* override opens after three failures"
    );
    assert_eq!(
        (content.calls(), auth.calls()),
        (30, 30),
        "the others are not affected"
    );
    let events = sim.stats().transitions();
    assert_eq!(events.len(), 1);
    assert_eq!(events[0].upstream, "outbound|80||media-service");
    assert_eq!(events[0].transition, opened(Reason::ConsecutiveFailures));

    let health = sim.health();
    let state = |k: &str| {
        health
            .iter()
            .find(|h| h.upstream == k)
            .map(|h| (h.state, h.stats.calls, h.stats.failures))
    };
    // An open breaker keeps the window that tripped it, so the health endpoint can show why.
    assert_eq!(
        state("outbound|80||media-service"),
        Some((StateKind::Open, 3, 3))
    );
    assert_eq!(
        state("outbound|80||content-service"),
        Some((StateKind::Closed, 30, 0))
    );
    assert_eq!(
        state("outbound|80||auth-service"),
        Some((StateKind::Closed, 30, 7))
    );
}

#[tokio::test(start_paused = true)]
async fn dry_run_rejects_nothing_and_counts_what_it_would_have_rejected() {
    let sim = sim(r#"{"mode": "dry_run", "open_timeout": "10s"}"#, 4);
    let up = sim.upstream("content", failing(10));
    let reports = calls_in_a_row(&sim, &up, 30).await;

    assert!(
        reports.iter().all(CallReport::forwarded),
        "nothing is rejected"
    );
    assert_eq!(up.calls(), 30);
    assert_eq!(
        reports[4].transitions,
        vec![opened(Reason::ConsecutiveFailures)],
        "the breaker still judges"
    );
    for r in &reports[5..] {
        assert!(
            matches!(r.admission, Admission::DryRun(rej) if rej.state == StateKind::Open),
            "{r:?}"
        );
    }
    let t = sim.totals();
    assert_eq!(
        (t.rejected, t.dry_run_rejections, t.admitted, t.recorded),
        (0, 25, 5, 5)
    );
    assert_eq!(sim.state("content"), Some(StateKind::Open));
}

#[tokio::test(start_paused = true)]
async fn an_outage_opens_the_breaker_and_recovery_closes_it() {
    let sim = Arc::new(sim(r#"{"open_timeout": "5s", "success_threshold": 2}"#, 4));
    let up = Arc::new(
        sim.upstream("feed", healthy(20))
            .then_at(ms(10_000), Behaviour::Refusing)
            .then_at(ms(30_000), healthy(20)),
    );
    // 4 workers, each sending a call every 100 ms for 60 s.
    let mut traffic = JoinSet::new();
    for w in 0..4 {
        let (sim, up) = (Arc::clone(&sim), Arc::clone(&up));
        traffic.spawn(async move {
            let mut log = Vec::new();
            for round in 0..600 {
                let at = sim.clock().now_ms();
                log.push((at, sim.worker(w).call(&up).await));
                advance_to(&sim, (round + 1) * 100).await;
            }
            log
        });
    }
    let mut calls = Vec::new();
    while let Some(log) = traffic.join_next().await {
        calls.extend(log.unwrap());
    }

    let events = sim.stats().transitions_of("feed");
    let first = &events[0];
    assert_eq!(first.transition, opened(Reason::ConsecutiveFailures));
    assert!(
        (10_000..10_200).contains(&first.at_ms),
        "opens within two rounds of the outage: {first:?}"
    );
    let last = events.last().unwrap();
    assert_eq!(last.transition.to, StateKind::Closed);
    assert!(
        (30_000..35_500).contains(&last.at_ms),
        "closes within an open time of recovery: {last:?}"
    );
    let reopened = events
        .iter()
        .filter(|e| e.transition.reason == Reason::HalfOpenFailure)
        .count() as u64;
    assert_eq!(reopened, 3, "probes at about 15, 20 and 25 s fail");

    // During the outage the upstream saw the five failures that opened it and one probe per opening.
    let outage_calls = calls
        .iter()
        .filter(|(at, r)| (10_000..30_000).contains(at) && r.forwarded())
        .count() as u64;
    assert_eq!(outage_calls, 5 + reopened);
    assert!(
        calls
            .iter()
            .filter(|(at, _)| *at > last.at_ms)
            .all(|(_, r)| r.forwarded()),
        "all flows once closed"
    );
    let t = sim.totals();
    assert_eq!(t.calls, 2_400);
    assert_eq!(t.admitted + t.rejected, 2_400);
}

#[tokio::test(start_paused = true)]
async fn a_flapping_upstream_opens_and_closes_with_its_phases() {
    let sim = sim(r#"{"open_timeout": "5s", "success_threshold": 2}"#, 2);
    let period = ms(20_000);
    let up = sim.upstream(
        "feed",
        Behaviour::Flapping {
            period,
            grpc_status: UNAVAILABLE,
            latency: ms(10),
        },
    );
    for i in 0..400 {
        sim.worker(i).call(&up).await;
        advance_to(&sim, (i as u64 + 1) * 200).await;
    }
    let events = sim.stats().transitions_of("feed");
    let opens: Vec<u64> = events
        .iter()
        .filter(|e| e.transition.from == StateKind::Closed)
        .map(|e| e.at_ms)
        .collect();
    let closes: Vec<u64> = events
        .iter()
        .filter(|e| e.transition.to == StateKind::Closed)
        .map(|e| e.at_ms)
        .collect();
    assert_eq!(opens.len(), 2, "{events:?}");
    assert!(
        (20_000..21_000).contains(&opens[0]) && (60_000..61_000).contains(&opens[1]),
        "{opens:?}"
    );
    assert_eq!(closes.len(), 1, "{events:?}");
    assert!((40_000..45_500).contains(&closes[0]), "{closes:?}");
}

#[tokio::test(start_paused = true)]
async fn a_probe_whose_client_gives_up_gives_its_permit_back() {
    let sim = sim(r#"{"open_timeout": "10s", "call_timeout": "30s"}"#, 2);
    let up = sim.upstream("content", failing(10));
    let until = trip(&sim, &up).await;
    up.set(Behaviour::Hanging);
    advance_to(&sim, until).await;

    // The probe hangs; its client leaves after 1 s, long before the router's 30 s timeout.
    let abandoned = sim.worker(0).call_with_patience(&up, ms(1_000)).await;
    assert_eq!(abandoned.reply, Some(harness::sim::Reply::ClientCancelled));
    assert_eq!(abandoned.classification.unwrap().outcome, Outcome::Ignored);
    assert_eq!(abandoned.waited, ms(1_000));
    assert_eq!(up.in_flight().current(), 0, "the upstream call was cut too");

    // The permit is free again at once: the next call is a probe, not a half_open rejection.
    up.set(healthy(10));
    let next = sim.worker(1).call(&up).await;
    assert!(
        matches!(next.admission, Admission::Allow { probe: true }),
        "{next:?}"
    );
    let t = sim.totals();
    assert_eq!((t.released, t.rejected_half_open), (1, 0));
    assert_eq!(sim.state("content"), Some(StateKind::HalfOpen));
}
