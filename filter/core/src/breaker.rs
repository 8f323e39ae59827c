//! The breaker state machine (contract section 4): Closed → Open → HalfOpen → Closed.
//!
//! A [`Breaker`] is plain data: it is decoded from shared data, changed by [`Breaker::admit`] or
//! [`Breaker::record`], and written back with compare-and-swap. Both functions are pure in `(state,
//! config, now)`, because the CAS loop may run them more than once on fresher copies of the state.

use crate::classify::{Classification, Outcome};
use crate::config::{BreakerConfig, Mode};
use crate::window::{Window, WindowStats};

/// The three states, as metrics and the health endpoint name them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum StateKind {
    /// Calls flow; outcomes are judged.
    Closed,
    /// Calls are rejected until the open time has passed.
    Open,
    /// A limited number of probes go through; their outcomes decide.
    HalfOpen,
}

impl StateKind {
    /// `closed`, `open`, `half_open`.
    pub fn as_str(self) -> &'static str {
        match self {
            StateKind::Closed => "closed",
            StateKind::Open => "open",
            StateKind::HalfOpen => "half_open",
        }
    }

    /// The value of the `circuit_breaker_state` gauge: 0 closed, 1 open, 2 half-open.
    pub fn gauge(self) -> u64 {
        match self {
            StateKind::Closed => 0,
            StateKind::Open => 1,
            StateKind::HalfOpen => 2,
        }
    }
}

/// The state with the data that belongs to it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BreakerState {
    /// Calls flow.
    Closed,
    /// Rejecting until `until_ms` (host time, ms).
    Open {
        /// When probes may start.
        until_ms: u64,
    },
    /// Probing.
    HalfOpen {
        /// Probe permits held right now, across all workers.
        in_flight: u16,
        /// Successful probes so far.
        successes: u16,
        /// When the last permit was handed out: a probe held longer than the open time counts as
        /// failed, so a lost permit (a worker that never settles its stream) cannot wedge HalfOpen.
        last_permit_ms: u64,
    },
}

impl BreakerState {
    /// The kind of this state.
    pub fn kind(&self) -> StateKind {
        match self {
            BreakerState::Closed => StateKind::Closed,
            BreakerState::Open { .. } => StateKind::Open,
            BreakerState::HalfOpen { .. } => StateKind::HalfOpen,
        }
    }
}

/// Why a state changed; the open reasons are the `reason` label of `circuit_breaker_open_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Reason {
    /// `failure_threshold` consecutive failures.
    ConsecutiveFailures,
    /// Failure rate over the window reached `error_rate_threshold`.
    ErrorRate,
    /// Slow-call rate over the window reached `slow_call_rate_threshold`.
    SlowCallRate,
    /// A probe failed (or was held past the open time).
    HalfOpenFailure,
    /// `mode: forced_open`.
    Forced,
    /// The open time passed and a request arrived.
    OpenTimeoutElapsed,
    /// `success_threshold` probes succeeded.
    ProbesSucceeded,
}

impl Reason {
    /// Snake-case name for logs and labels.
    pub fn as_str(self) -> &'static str {
        match self {
            Reason::ConsecutiveFailures => "consecutive_failures",
            Reason::ErrorRate => "error_rate",
            Reason::SlowCallRate => "slow_call_rate",
            Reason::HalfOpenFailure => "half_open_failure",
            Reason::Forced => "forced",
            Reason::OpenTimeoutElapsed => "open_timeout_elapsed",
            Reason::ProbesSucceeded => "probes_succeeded",
        }
    }
}

/// One state change, for metrics and the log.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Transition {
    /// State before.
    pub from: StateKind,
    /// State after.
    pub to: StateKind,
    /// Why.
    pub reason: Reason,
}

/// Proof that a call was let through, handed back to [`Breaker::record`] when it ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ticket {
    /// The breaker generation the call was admitted in. Outcomes from an older generation (a call that
    /// started before the breaker last changed state) are counted but do not move the state.
    pub generation: u32,
    /// The call holds a HalfOpen probe permit, to give back when it ends.
    pub probe: bool,
}

/// Why a call was (or would have been) turned away.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rejection {
    /// `Open`, or `HalfOpen` with no probe permit free.
    pub state: StateKind,
    /// Milliseconds until probes may go through, when known.
    pub retry_after_ms: Option<u64>,
}

/// What to do with a new call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    /// Let it through; record its outcome with the ticket.
    Allow(Ticket),
    /// Answer it locally (`enforce`, `forced_open`).
    Reject(Rejection),
    /// `dry_run`: let it through untracked, but mark it and count the would-be rejection.
    DryRunReject(Rejection),
}

/// One upstream's breaker, as kept in shared data.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Breaker {
    /// Current state.
    pub state: BreakerState,
    /// Bumped on every state change; see [`Ticket::generation`].
    pub generation: u32,
    /// Failures in a row since the last success (kept while Open, for reports).
    pub consecutive_failures: u32,
    /// The open time in force: `open_timeout`, multiplied on each re-open from HalfOpen.
    pub open_timeout_ms: u64,
    /// Outcomes while Closed.
    pub window: Window,
}

impl Breaker {
    /// A closed breaker with an empty window.
    pub fn new(cfg: &BreakerConfig) -> Self {
        Self {
            state: BreakerState::Closed,
            generation: 0,
            consecutive_failures: 0,
            open_timeout_ms: cfg.open_timeout_ms,
            window: Window::new(cfg.window),
        }
    }

    /// Brings a stored breaker in line with the configuration in force: a window of another shape is
    /// restarted (after a reconfiguration), and the open time is kept within the configured bounds.
    /// Returns whether anything changed.
    pub fn conform(&mut self, cfg: &BreakerConfig) -> bool {
        let mut changed = false;
        if !self.window.matches(cfg.window) {
            self.window = Window::new(cfg.window);
            changed = true;
        }
        let bounded = self.open_timeout_ms.clamp(
            cfg.open_timeout_ms,
            cfg.max_open_timeout_ms.max(cfg.open_timeout_ms),
        );
        if bounded != self.open_timeout_ms {
            self.open_timeout_ms = bounded;
            changed = true;
        }
        changed
    }

    /// Window totals at `now_ms`.
    pub fn stats(&self, now_ms: u64) -> WindowStats {
        self.window.stats(now_ms)
    }

    /// Milliseconds until probes may go through: `Some` while Open.
    pub fn retry_after_ms(&self, now_ms: u64) -> Option<u64> {
        match self.state {
            BreakerState::Open { until_ms } => Some(until_ms.saturating_sub(now_ms)),
            _ => None,
        }
    }

    /// How long a call turned away in HalfOpen, with every probe permit taken, is told to wait: a
    /// tenth of the open time in force, from 100 ms to 5 s.
    ///
    /// A gRPC client with a retry policy waits `grpc-retry-pushback-ms` instead of its own backoff;
    /// with no hint, grpcio spends every attempt in about 40 ms, each one rejected again. The probes
    /// need about one call's latency to report, which a tenth of any sensible open time outlasts,
    /// while staying short next to it, so a client comes back soon after the breaker closes.
    pub fn probe_wait_ms(&self) -> u64 {
        (self.open_timeout_ms / 10).clamp(100, 5_000)
    }

    /// Decides on a new call at `now_ms`. May change the state: Open → HalfOpen once the open time has
    /// passed, a probe permit taken, or (`forced_open`) Closed → Open.
    ///
    /// `mode` must not be `Disabled`; a disabled breaker is never loaded.
    pub fn admit(&mut self, cfg: &BreakerConfig, now_ms: u64) -> (Decision, Option<Transition>) {
        if cfg.mode == Mode::ForcedOpen {
            let transition = match self.state {
                BreakerState::Open { .. } => None,
                _ => Some(self.open(cfg, now_ms, Reason::Forced, false)),
            };
            return (
                Decision::Reject(Rejection {
                    state: StateKind::Open,
                    retry_after_ms: None,
                }),
                transition,
            );
        }
        let mut transition = None;
        if let BreakerState::Open { until_ms } = self.state {
            if now_ms >= until_ms {
                transition = Some(self.enter(
                    BreakerState::HalfOpen {
                        in_flight: 0,
                        successes: 0,
                        last_permit_ms: now_ms,
                    },
                    Reason::OpenTimeoutElapsed,
                ));
            }
        }
        let decision = match self.state {
            BreakerState::Closed => Decision::Allow(Ticket {
                generation: self.generation,
                probe: false,
            }),
            BreakerState::Open { until_ms } => self.refuse(
                cfg,
                Rejection {
                    state: StateKind::Open,
                    retry_after_ms: Some(until_ms.saturating_sub(now_ms)),
                },
            ),
            BreakerState::HalfOpen {
                in_flight,
                successes,
                last_permit_ms,
            } => {
                if in_flight < cfg.half_open_max_requests {
                    self.state = BreakerState::HalfOpen {
                        in_flight: in_flight + 1,
                        successes,
                        last_permit_ms: now_ms,
                    };
                    Decision::Allow(Ticket {
                        generation: self.generation,
                        probe: true,
                    })
                } else if now_ms >= last_permit_ms.saturating_add(self.open_timeout_ms) {
                    // Every permit has been out for a whole open time: the probes hang (or their
                    // streams were lost). That is as good as a failed probe.
                    // (A HalfOpen entered in this same call has no permit out, so this cannot follow
                    // the Open → HalfOpen change above.)
                    transition = Some(self.open(cfg, now_ms, Reason::HalfOpenFailure, true));
                    self.refuse(
                        cfg,
                        Rejection {
                            state: StateKind::Open,
                            retry_after_ms: self.retry_after_ms(now_ms),
                        },
                    )
                } else {
                    self.refuse(
                        cfg,
                        Rejection {
                            state: StateKind::HalfOpen,
                            retry_after_ms: Some(self.probe_wait_ms()),
                        },
                    )
                }
            }
        };
        (decision, transition)
    }

    fn refuse(&self, cfg: &BreakerConfig, rejection: Rejection) -> Decision {
        if cfg.mode == Mode::DryRun {
            Decision::DryRunReject(rejection)
        } else {
            Decision::Reject(rejection)
        }
    }

    /// Records the outcome of a call admitted with `ticket`. Returns the state change it caused.
    ///
    /// Outcomes of an older generation change nothing: the call was admitted under a state that has
    /// since been left (e.g. a slow call that started before the breaker opened), and judging the new
    /// state by it would be judging the past.
    pub fn record(
        &mut self,
        cfg: &BreakerConfig,
        ticket: Ticket,
        now_ms: u64,
        c: Classification,
    ) -> Option<Transition> {
        if ticket.generation != self.generation {
            return None;
        }
        match self.state {
            BreakerState::Closed => {
                if c.outcome == Outcome::Ignored {
                    return None;
                }
                let failure = c.outcome == Outcome::Failure;
                self.window.record(now_ms, failure, c.slow);
                self.consecutive_failures = if failure {
                    self.consecutive_failures.saturating_add(1)
                } else {
                    0
                };
                let reason = self.trip_reason(cfg, now_ms)?;
                Some(self.open(cfg, now_ms, reason, false))
            }
            BreakerState::HalfOpen {
                in_flight,
                successes,
                last_permit_ms,
            } if ticket.probe => {
                let in_flight = in_flight.saturating_sub(1);
                // A slow probe counts as failed when slow calls are tracked: closing on it would let
                // the slowness straight back in.
                let bad = c.outcome == Outcome::Failure
                    || (c.slow && cfg.slow_call_duration_ms.is_some());
                match c.outcome {
                    Outcome::Ignored => {
                        // A probe whose client went away tells nothing: give the permit back.
                        self.state = BreakerState::HalfOpen {
                            in_flight,
                            successes,
                            last_permit_ms,
                        };
                        None
                    }
                    _ if bad => {
                        self.consecutive_failures = self.consecutive_failures.saturating_add(1);
                        Some(self.open(cfg, now_ms, Reason::HalfOpenFailure, true))
                    }
                    _ => {
                        let successes = successes.saturating_add(1);
                        self.consecutive_failures = 0;
                        if successes >= cfg.success_threshold {
                            self.window = Window::new(cfg.window);
                            self.open_timeout_ms = cfg.open_timeout_ms;
                            Some(self.enter(BreakerState::Closed, Reason::ProbesSucceeded))
                        } else {
                            self.state = BreakerState::HalfOpen {
                                in_flight,
                                successes,
                                last_permit_ms,
                            };
                            None
                        }
                    }
                }
            }
            _ => None,
        }
    }

    fn trip_reason(&self, cfg: &BreakerConfig, now_ms: u64) -> Option<Reason> {
        if cfg.failure_threshold > 0 && self.consecutive_failures >= cfg.failure_threshold {
            return Some(Reason::ConsecutiveFailures);
        }
        let stats = self.window.stats(now_ms);
        if stats.calls < cfg.minimum_requests {
            return None;
        }
        if stats.failure_rate_reaches(cfg.error_rate_threshold_ppm) {
            return Some(Reason::ErrorRate);
        }
        if cfg.slow_call_duration_ms.is_some()
            && stats.slow_rate_reaches(cfg.slow_call_rate_threshold_ppm)
        {
            return Some(Reason::SlowCallRate);
        }
        None
    }

    /// Opens the breaker. `backoff` (a re-open straight from HalfOpen) multiplies the open time first.
    fn open(
        &mut self,
        cfg: &BreakerConfig,
        now_ms: u64,
        reason: Reason,
        backoff: bool,
    ) -> Transition {
        if backoff {
            let next = (self.open_timeout_ms as f64 * cfg.backoff_multiplier).round();
            // `as` saturates on overflow; min-then-max (not `clamp`, which panics on an inverted
            // range only a hand-built config could have) keeps it within the configured bounds.
            self.open_timeout_ms = (next as u64)
                .min(cfg.max_open_timeout_ms)
                .max(cfg.open_timeout_ms);
        } else {
            self.open_timeout_ms = cfg.open_timeout_ms;
        }
        // The window is kept while Open, so the health endpoint shows the rates that tripped it.
        // Nothing is recorded into it meanwhile (outcomes of older generations are ignored), and
        // closing starts a fresh one, so what it holds cannot trip the breaker again.
        self.enter(
            BreakerState::Open {
                until_ms: now_ms.saturating_add(self.open_timeout_ms),
            },
            reason,
        )
    }

    fn enter(&mut self, state: BreakerState, reason: Reason) -> Transition {
        let from = self.state.kind();
        self.state = state;
        self.generation = self.generation.wrapping_add(1);
        Transition {
            from,
            to: state.kind(),
            reason,
        }
    }
}

#[cfg(test)]
mod tests {
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
        match b.admit(c, now).0 {
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
        b.record(c, t, now, outcome)
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
            b.admit(&c, 10).0,
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
        let (d, t) = b.admit(&c, 1_000);
        assert!(matches!(d, Decision::Allow(Ticket { probe: true, .. })));
        assert_eq!(t.unwrap().reason, Reason::OpenTimeoutElapsed);
        // The single permit is taken: the next caller is turned away as half_open, told to come
        // back after a tenth of the open time (at least 100 ms).
        assert_eq!(
            b.admit(&c, 1_001).0,
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
        assert_eq!(b.record(&c, ticket, 1_002, OK), None);
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
        assert!(matches!(b.admit(&c, 1_000).0, Decision::Reject(_)));
        // A non-probe ticket of this generation holds no permit: its outcome frees none.
        let not_a_probe = Ticket {
            probe: false,
            ..tickets[0]
        };
        assert_eq!(b.record(&c, not_a_probe, 1_000, IGNORED), None);
        assert!(matches!(b.admit(&c, 1_000).0, Decision::Reject(_)));
        assert_eq!(b.record(&c, tickets[0], 1_000, IGNORED), None);
        allow(&mut b, &c, 1_000);
        // An ignored probe gives its permit back too.
        assert_eq!(b.record(&c, tickets[1], 1_000, IGNORED), None);
        allow(&mut b, &c, 1_000);
        assert!(matches!(b.admit(&c, 1_000).0, Decision::Reject(_)));
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
            b.admit(&c, 1_999).0,
            Decision::Reject(Rejection {
                state: StateKind::HalfOpen,
                ..
            })
        ));
        let (d, t) = b.admit(&c, 2_000);
        assert!(matches!(
            d,
            Decision::Reject(Rejection {
                state: StateKind::Open,
                ..
            })
        ));
        assert_eq!(t.unwrap().reason, Reason::HalfOpenFailure);
        // The lost probe's late outcome belongs to an old generation and changes nothing.
        assert_eq!(b.record(&c, lost, 2_500, OK), None);
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
        assert_eq!(b.record(&c, slow_call, 1_001, FAIL), None);
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
            b.admit(&c, 10).0,
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
        let (d, t) = b.admit(&c, 0);
        assert_eq!(
            d,
            Decision::Reject(Rejection {
                state: StateKind::Open,
                retry_after_ms: None
            })
        );
        assert_eq!(t.unwrap().reason, Reason::Forced);
        let (d, t) = b.admit(&c, 5_000);
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
                    b.admit(&c, now);
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
}
