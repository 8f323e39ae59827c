//! The state machine's tests.
use super::*;
use crate::config::WindowConfig;
#[cfg(target_arch = "wasm32")]
use wasm_bindgen_test::wasm_bindgen_test as test;

const OK: Classification = Classification {
    outcome: Outcome::Success,
    slow: false,
};
const FAIL: Classification = Classification {
    outcome: Outcome::Failure,
    slow: false,
};
const SLOW_OK: Classification = Classification {
    outcome: Outcome::Success,
    slow: true,
};
const IGNORED: Classification = Classification {
    outcome: Outcome::Ignored,
    slow: false,
};

fn cfg() -> BreakerConfig {
    BreakerConfig {
        open_timeout_ms: 1_000,
        ..BreakerConfig::default()
    }
}

fn allow(b: &mut Breaker, c: &BreakerConfig, now: u64) -> Ticket {
    match b.admit(c, now, 0).0 {
        Decision::Allow(t) => t,
        other => panic!("expected Allow, got {other:?}"),
    }
}

fn call(
    b: &mut Breaker,
    c: &BreakerConfig,
    now: u64,
    outcome: Classification,
) -> Option<Transition> {
    let t = allow(b, c, now);
    b.record(c, t, now, outcome, 0)
}

#[test]
fn opens_on_consecutive_failures() {
    let c = cfg();
    let mut b = Breaker::new(&c);
    for _ in 0..4 {
        assert_eq!(call(&mut b, &c, 0, FAIL), None);
    }
    let t = call(&mut b, &c, 0, FAIL).unwrap();
    assert_eq!(
        t,
        Transition {
            from: StateKind::Closed,
            to: StateKind::Open,
            reason: Reason::ConsecutiveFailures
        }
    );
    assert_eq!(
        b.admit(&c, 10, 0).0,
        Decision::Reject(Rejection {
            state: StateKind::Open,
            retry_after_ms: Some(990)
        })
    );
    assert_eq!(
        b.stats(10).failures,
        5,
        "the window that tripped it is kept while Open, for reports"
    );
}

#[test]
fn a_success_resets_the_consecutive_count() {
    let c = cfg();
    let mut b = Breaker::new(&c);
    for _ in 0..4 {
        call(&mut b, &c, 0, FAIL);
    }
    call(&mut b, &c, 0, OK);
    for _ in 0..4 {
        assert_eq!(call(&mut b, &c, 0, FAIL), None);
    }
    assert_eq!(b.consecutive_failures, 4);
    call(&mut b, &c, 0, IGNORED);
    assert_eq!(b.consecutive_failures, 4, "ignored outcomes change nothing");
}

#[test]
fn zero_failure_threshold_turns_the_trigger_off() {
    let c = BreakerConfig {
        failure_threshold: 0,
        minimum_requests: 100,
        ..cfg()
    };
    let mut b = Breaker::new(&c);
    for _ in 0..50 {
        assert_eq!(call(&mut b, &c, 0, FAIL), None);
    }
}

#[test]
fn error_rate_waits_for_minimum_requests() {
    let c = BreakerConfig {
        failure_threshold: 0,
        minimum_requests: 20,
        ..cfg()
    };
    let mut b = Breaker::new(&c);
    // Alternate: rate is 50% from the second call on, but only judged from the 20th.
    for i in 0..19 {
        assert_eq!(
            call(&mut b, &c, 0, if i % 2 == 0 { FAIL } else { OK }),
            None,
            "call {i}"
        );
    }
    let t = call(&mut b, &c, 0, OK).unwrap();
    assert_eq!(t.reason, Reason::ErrorRate);
}

#[test]
fn slow_call_rate_trips_only_when_tracked() {
    let c = BreakerConfig {
        failure_threshold: 0,
        minimum_requests: 5,
        window: WindowConfig::Count(10),
        slow_call_duration_ms: Some(100),
        slow_call_rate_threshold_ppm: 800_000,
        ..cfg()
    };
    let mut b = Breaker::new(&c);
    for _ in 0..4 {
        assert_eq!(call(&mut b, &c, 0, SLOW_OK), None);
    }
    assert_eq!(
        call(&mut b, &c, 0, SLOW_OK).unwrap().reason,
        Reason::SlowCallRate
    );
}

#[test]
fn half_open_after_timeout_then_closes_after_successes() {
    let c = cfg();
    let mut b = Breaker::new(&c);
    for _ in 0..5 {
        call(&mut b, &c, 0, FAIL);
    }
    let (d, t) = b.admit(&c, 1_000, 0);
    assert!(matches!(d, Decision::Allow(Ticket { probe: true, .. })));
    assert_eq!(t.unwrap().reason, Reason::OpenTimeoutElapsed);
    // The single permit is taken: the next caller is turned away as half_open, told to come
    // back after a tenth of the open time (at least 100 ms).
    assert_eq!(
        b.admit(&c, 1_001, 0).0,
        Decision::Reject(Rejection {
            state: StateKind::HalfOpen,
            retry_after_ms: Some(100)
        })
    );
    let long = BreakerConfig {
        open_timeout_ms: 20_000,
        ..cfg()
    };
    let mut wait = Breaker::new(&long);
    assert_eq!(wait.probe_wait_ms(), 2_000);
    wait.open_timeout_ms = 600_000;
    assert_eq!(wait.probe_wait_ms(), 5_000, "at most 5 s");
    let Decision::Allow(ticket) = d else {
        unreachable!()
    };
    assert_eq!(b.record(&c, ticket, 1_002, OK, 0), None);
    let t = call(&mut b, &c, 1_003, OK).unwrap();
    assert_eq!(
        t,
        Transition {
            from: StateKind::HalfOpen,
            to: StateKind::Closed,
            reason: Reason::ProbesSucceeded
        }
    );
    assert_eq!(b.stats(1_003).calls, 0, "closing starts a fresh window");
    assert_eq!(b.consecutive_failures, 0);
}

#[test]
fn failed_probe_reopens_with_backoff_up_to_the_ceiling() {
    let c = BreakerConfig {
        backoff_multiplier: 2.0,
        max_open_timeout_ms: 3_000,
        ..cfg()
    };
    let mut b = Breaker::new(&c);
    for _ in 0..5 {
        call(&mut b, &c, 0, FAIL);
    }
    let mut now = 0;
    for expected in [2_000, 3_000, 3_000] {
        now += b.open_timeout_ms;
        let t = call(&mut b, &c, now, FAIL).unwrap();
        assert_eq!(
            t,
            Transition {
                from: StateKind::HalfOpen,
                to: StateKind::Open,
                reason: Reason::HalfOpenFailure
            }
        );
        assert_eq!(b.open_timeout_ms, expected);
        assert_eq!(b.retry_after_ms(now), Some(expected));
    }
    // Recovery resets the open time to the configured base.
    now += b.open_timeout_ms;
    call(&mut b, &c, now, OK);
    call(&mut b, &c, now, OK);
    assert_eq!(b.state, BreakerState::Closed);
    assert_eq!(b.open_timeout_ms, 1_000);
}

#[test]
fn half_open_permits_are_bounded_and_released() {
    let c = BreakerConfig {
        half_open_max_requests: 3,
        success_threshold: 10,
        ..cfg()
    };
    let mut b = Breaker::new(&c);
    for _ in 0..5 {
        call(&mut b, &c, 0, FAIL);
    }
    let tickets: Vec<_> = (0..3).map(|_| allow(&mut b, &c, 1_000)).collect();
    assert!(matches!(b.admit(&c, 1_000, 0).0, Decision::Reject(_)));
    // A non-probe ticket of this generation holds no permit: its outcome frees none.
    let not_a_probe = Ticket {
        probe: false,
        ..tickets[0]
    };
    assert_eq!(b.record(&c, not_a_probe, 1_000, IGNORED, 0), None);
    assert!(matches!(b.admit(&c, 1_000, 0).0, Decision::Reject(_)));
    assert_eq!(b.record(&c, tickets[0], 1_000, IGNORED, 0), None);
    allow(&mut b, &c, 1_000);
    // An ignored probe gives its permit back too.
    assert_eq!(b.record(&c, tickets[1], 1_000, IGNORED, 0), None);
    allow(&mut b, &c, 1_000);
    assert!(matches!(b.admit(&c, 1_000, 0).0, Decision::Reject(_)));
}

#[test]
fn probes_held_past_the_open_time_count_as_failed() {
    let c = cfg();
    let mut b = Breaker::new(&c);
    for _ in 0..5 {
        call(&mut b, &c, 0, FAIL);
    }
    let lost = allow(&mut b, &c, 1_000);
    assert!(matches!(
        b.admit(&c, 1_999, 0).0,
        Decision::Reject(Rejection {
            state: StateKind::HalfOpen,
            ..
        })
    ));
    let (d, t) = b.admit(&c, 2_000, 0);
    assert!(matches!(
        d,
        Decision::Reject(Rejection {
            state: StateKind::Open,
            ..
        })
    ));
    assert_eq!(t.unwrap().reason, Reason::HalfOpenFailure);
    // The lost probe's late outcome belongs to an old generation and changes nothing.
    assert_eq!(b.record(&c, lost, 2_500, OK, 0), None);
    assert!(matches!(b.state, BreakerState::Open { .. }));
}

#[test]
fn stale_outcomes_do_not_move_the_state() {
    let c = cfg();
    let mut b = Breaker::new(&c);
    let slow_call = allow(&mut b, &c, 0);
    for _ in 0..5 {
        call(&mut b, &c, 0, FAIL);
    }
    // Probe phase: a failure that started while Closed must not reopen HalfOpen.
    allow(&mut b, &c, 1_000);
    assert_eq!(b.record(&c, slow_call, 1_001, FAIL, 0), None);
    assert!(matches!(b.state, BreakerState::HalfOpen { .. }));
}

#[test]
fn dry_run_judges_but_never_rejects() {
    let c = BreakerConfig {
        mode: Mode::DryRun,
        ..cfg()
    };
    let mut b = Breaker::new(&c);
    for _ in 0..5 {
        call(&mut b, &c, 0, FAIL);
    }
    assert!(matches!(b.state, BreakerState::Open { .. }));
    assert_eq!(
        b.admit(&c, 10, 0).0,
        Decision::DryRunReject(Rejection {
            state: StateKind::Open,
            retry_after_ms: Some(990)
        })
    );
}

#[test]
fn forced_open_rejects_everything_and_opens_once() {
    let c = BreakerConfig {
        mode: Mode::ForcedOpen,
        ..cfg()
    };
    let mut b = Breaker::new(&c);
    let (d, t) = b.admit(&c, 0, 0);
    assert_eq!(
        d,
        Decision::Reject(Rejection {
            state: StateKind::Open,
            retry_after_ms: None
        })
    );
    assert_eq!(t.unwrap().reason, Reason::Forced);
    let (d, t) = b.admit(&c, 5_000, 0);
    assert!(matches!(d, Decision::Reject(_)));
    assert_eq!(t, None, "already open: no second transition, no HalfOpen");
}

#[test]
fn conform_restarts_a_window_of_another_shape_and_keeps_state() {
    let c = cfg();
    let mut b = Breaker::new(&c);
    for _ in 0..5 {
        call(&mut b, &c, 0, FAIL);
    }
    let c2 = BreakerConfig {
        window: WindowConfig::Time {
            duration_ms: 10_000,
        },
        ..c.clone()
    };
    assert!(b.conform(&c2));
    assert!(matches!(b.state, BreakerState::Open { .. }));
    assert!(!b.conform(&c2));
}

/// The registry decides whether an admit must be written by comparing only the state, generation
/// and open time (cloning the whole breaker on every call costs more than the decision): `admit`
/// must never touch anything else, in any state, mode or moment.
#[test]
fn admit_changes_only_the_state() {
    let c = cfg();
    let mut closed = Breaker::new(&c);
    for i in 0..30 {
        call(&mut closed, &c, i, if i % 3 == 0 { FAIL } else { OK });
    }
    let mut open = closed.clone();
    for _ in 0..5 {
        call(&mut open, &c, 40, FAIL);
    }
    assert_eq!(open.state.kind(), StateKind::Open);
    let mut half_open = open.clone();
    allow(&mut half_open, &c, 2_000);
    assert_eq!(half_open.state.kind(), StateKind::HalfOpen);
    let modes = [Mode::Enforce, Mode::DryRun, Mode::ForcedOpen];
    for start in [&closed, &open, &half_open] {
        for mode in modes {
            let c = BreakerConfig { mode, ..cfg() };
            for now in [0, 41, 1_040, 2_000, 3_500, 10_000] {
                let mut b = start.clone();
                b.admit(&c, now, 0);
                assert_eq!(
                    (&b.window, b.consecutive_failures),
                    (&start.window, start.consecutive_failures),
                    "admit from {:?} in {mode:?} at {now}",
                    start.state
                );
            }
        }
    }
}

/// Opens `b` at `now` on five failures, drawing `entropy` for the opening.
fn open_at(b: &mut Breaker, c: &BreakerConfig, now: u64, entropy: u64) -> u64 {
    for _ in 0..4 {
        call(b, c, now, FAIL);
    }
    let t = allow(b, c, now);
    b.record(c, t, now, FAIL, entropy);
    match b.state {
        BreakerState::Open { until_ms } => until_ms,
        other => panic!("{other:?}"),
    }
}

#[test]
fn jitter_adds_up_to_its_fraction_of_the_open_time_drawn_per_opening() {
    let c = BreakerConfig {
        open_timeout_ms: 10_000,
        open_timeout_jitter_ppm: 200_000,
        ..cfg()
    };
    let until = |entropy| open_at(&mut Breaker::new(&c), &c, 0, entropy);
    assert_eq!(until(0), 10_000, "the least draw adds nothing");
    assert_eq!(until(u64::MAX), 12_000, "the most adds the whole fraction");
    assert_eq!(until(u64::MAX / 2), 11_000);
    // Spread: 1,000 breakers opened at once come out over the whole interval.
    let mut e = crate::entropy::Entropy::new(1);
    let mut buckets = [0u32; 4];
    for _ in 0..1_000 {
        let extra = until(e.next_u64()) - 10_000;
        assert!(extra <= 2_000);
        buckets[(extra.min(1_999) / 500) as usize] += 1;
    }
    assert!(
        buckets.iter().all(|n| (180..=320).contains(n)),
        "{buckets:?}"
    );
    // The pushback tells the real time left, jitter included.
    let mut b = Breaker::new(&c);
    let until = open_at(&mut b, &c, 0, u64::MAX);
    assert_eq!(
        b.admit(&c, 4_000, 0).0,
        Decision::Reject(Rejection {
            state: StateKind::Open,
            retry_after_ms: Some(until - 4_000)
        })
    );
    // Without jitter the draw changes nothing.
    assert_eq!(
        open_at(&mut Breaker::new(&cfg()), &cfg(), 0, u64::MAX),
        1_000
    );
}

#[test]
fn jitter_applies_after_the_backoff_and_never_compounds() {
    let c = BreakerConfig {
        open_timeout_ms: 1_000,
        backoff_multiplier: 2.0,
        max_open_timeout_ms: 100_000,
        open_timeout_jitter_ppm: 500_000,
        ..cfg()
    };
    let mut b = Breaker::new(&c);
    let until = open_at(&mut b, &c, 0, u64::MAX);
    assert_eq!(until, 1_500);
    // The probe fails: re-open with backoff (2 s), then half of that drawn on top.
    let t = allow(&mut b, &c, until);
    b.record(&c, t, until, FAIL, u64::MAX);
    assert_eq!(
        b.open_timeout_ms, 2_000,
        "the open time in force holds no jitter"
    );
    assert_eq!(b.retry_after_ms(until), Some(3_000));
    // The HalfOpen hint is jittered too, from a tenth of the open time.
    let t = allow(&mut b, &c, until + 3_000);
    let hint = |e| match b.clone().admit(&c, until + 3_001, e).0 {
        Decision::Reject(r) => r.retry_after_ms,
        other => panic!("{other:?}"),
    };
    assert_eq!(hint(0), Some(200));
    assert_eq!(hint(u64::MAX), Some(300));
    b.record(&c, t, until + 3_002, IGNORED, 0);
}

fn ramped() -> BreakerConfig {
    BreakerConfig {
        open_timeout_ms: 1_000,
        backoff_multiplier: 2.0,
        max_open_timeout_ms: 60_000,
        success_threshold: 1,
        recovery_ramp_ms: Some(10_000),
        ..cfg()
    }
}

/// Opens, then closes by one good probe at `at`: the ramp starts there.
fn close_into_ramp(b: &mut Breaker, c: &BreakerConfig, at: u64) {
    open_at(b, c, at - 1_000, 0);
    let t = call(b, c, at, OK).unwrap();
    assert_eq!(
        (t.to, t.reason),
        (StateKind::Closed, Reason::ProbesSucceeded)
    );
}

#[test]
fn the_ramp_admits_a_rising_share_then_everything_and_says_when_it_ended() {
    let c = ramped();
    let mut b = Breaker::new(&c);
    close_into_ramp(&mut b, &c, 1_000);
    assert_eq!(b.admitting_ppm(1_000), 100_000);
    let admitted = |b: &mut Breaker, now| {
        (0..100)
            .filter(|_| match b.admit(&c, now, 0).0 {
                Decision::Allow(t) => {
                    b.record(&c, t, now, OK, 0);
                    true
                }
                Decision::Reject(r) => {
                    assert_eq!(r.state, StateKind::Closed);
                    assert_eq!(r.marker(), "recovering");
                    assert!(r.retry_after_ms.is_some_and(|w| w <= 11_000 - now));
                    false
                }
                other => panic!("{other:?}"),
            })
            .count()
    };
    assert_eq!(admitted(&mut b, 1_000), 10, "10 % at first");
    assert_eq!(b.admitting_ppm(6_000), 550_000);
    let half = admitted(&mut b, 6_000);
    assert!((50..=65).contains(&half), "about 55 % half-way: {half}");
    assert_eq!(b.state, BreakerState::Closed);
    // At the end, the first call ends the ramp (logged as closed → closed), and all are admitted.
    let (d, t) = b.admit(&c, 11_000, 0);
    assert!(matches!(d, Decision::Allow(_)));
    assert_eq!(
        t,
        Some(Transition {
            from: StateKind::Closed,
            to: StateKind::Closed,
            reason: Reason::RecoveryRampEnded
        })
    );
    assert_eq!(b.ramp, None);
    assert_eq!(b.open_timeout_ms, 1_000, "the open time starts over");
    assert_eq!(admitted(&mut b, 11_001), 100);
}

#[test]
fn a_relapse_during_the_ramp_reopens_with_backoff_and_ends_it() {
    let c = ramped();
    let mut b = Breaker::new(&c);
    close_into_ramp(&mut b, &c, 1_000);
    let generation = b.generation;
    // Outcomes are judged as in Closed, on a fresh window: five failures reopen it.
    let mut reopened = None;
    for i in 0..50 {
        if let Decision::Allow(t) = b.admit(&c, 2_000 + i, 0).0 {
            reopened = reopened.or(b.record(&c, t, 2_000 + i, FAIL, 0));
        }
    }
    let reopened = reopened.unwrap();
    assert_eq!(
        (reopened.to, reopened.reason),
        (StateKind::Open, Reason::ConsecutiveFailures)
    );
    assert!(b.generation > generation);
    assert_eq!(b.ramp, None, "the ramp ends there");
    assert_eq!(b.open_timeout_ms, 2_000, "with the backoff of a re-open");
    // The next close starts a new ramp.
    let BreakerState::Open { until_ms } = b.state else {
        panic!("{:?}", b.state)
    };
    call(&mut b, &c, until_ms, OK);
    assert_eq!(b.ramp.map(|r| r.start_ms), Some(until_ms));
}

#[test]
fn without_a_ramp_closing_admits_everything_at_once() {
    let c = BreakerConfig {
        recovery_ramp_ms: None,
        ..ramped()
    };
    let mut b = Breaker::new(&c);
    close_into_ramp(&mut b, &c, 1_000);
    assert_eq!(b.ramp, None);
    assert_eq!(b.admitting_ppm(1_000), 1_000_000);
    assert!((0..100).all(|_| matches!(b.admit(&c, 1_000, 0).0, Decision::Allow(_))));
    // A ramp in progress ends when a reconfiguration turns it off.
    let mut b = Breaker::new(&ramped());
    close_into_ramp(&mut b, &ramped(), 1_000);
    assert!(b.conform(&c));
    assert_eq!(b.ramp, None);
}

#[test]
fn dry_run_counts_the_ramp_but_lets_everything_through() {
    let c = BreakerConfig {
        mode: Mode::DryRun,
        ..ramped()
    };
    let mut b = Breaker::new(&c);
    close_into_ramp(&mut b, &c, 1_000);
    let refused = (0..10)
        .filter(|_| matches!(b.admit(&c, 1_000, 0).0, Decision::DryRunReject(r) if r.marker() == "recovering"))
        .count();
    assert_eq!(refused, 9);
}
