//! The breaker state machine (contract section 4): Closed → Open → HalfOpen → Closed.
//!
//! A [`Breaker`] is plain data: it is decoded from shared data, changed by [`Breaker::admit`] or
//! [`Breaker::record`], and written back with compare-and-swap. Both functions are pure in `(state,
//! config, now, entropy)`, because the CAS loop may run them more than once on fresher copies of the
//! state; the random bits (for `open_timeout_jitter`) come in from the caller, drawn once per call.
//!
//! After HalfOpen closes it, a breaker with `recovery_ramp` stays Closed but admits a growing share of
//! calls for that long ([`Ramp`]); the count of calls seen and admitted lives in the breaker itself,
//! so every worker of the Envoy keeps the share together.

mod ramp;

use crate::classify::{Classification, Outcome};
use crate::config::{BreakerConfig, Mode};
use crate::entropy::{share_of, uniform_up_to};
use crate::window::{Window, WindowStats};

pub use ramp::Ramp;

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
    /// `recovery_ramp` ran its course: the breaker admits every call again (Closed to Closed).
    RecoveryRampEnded,
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
            Reason::RecoveryRampEnded => "recovery_ramp_ended",
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
    /// `Open`; `HalfOpen` with no probe permit free; `Closed` while `recovery_ramp` does not admit
    /// the call.
    pub state: StateKind,
    /// Milliseconds the caller is told to wait: until probes may go through (Open, jitter
    /// included), the probe hint (HalfOpen), or at most the ramp's remaining time (recovering).
    pub retry_after_ms: Option<u64>,
}

impl Rejection {
    /// The `x-circuit-breaker` (and `x-circuit-breaker-dry-run`) value: `open`, `half_open`, or
    /// `recovering` for a call the ramp did not admit.
    pub fn marker(&self) -> &'static str {
        match self.state {
            StateKind::Closed => "recovering",
            other => other.as_str(),
        }
    }
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
    /// The open time in force: `open_timeout`, multiplied on each re-open from HalfOpen (kept
    /// through a recovery ramp, so that a relapse backs off as a re-open does). The jitter is not in
    /// it: it is drawn afresh at each opening.
    pub open_timeout_ms: u64,
    /// Outcomes while Closed.
    pub window: Window,
    /// `recovery_ramp` in progress (Closed only).
    pub ramp: Option<Ramp>,
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
            ramp: None,
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
        if self.ramp.is_some() && cfg.recovery_ramp_ms.is_none() {
            // The ramp was turned off: admit everything now.
            self.ramp = None;
            self.open_timeout_ms = cfg.open_timeout_ms;
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

    /// The share of calls the breaker lets through now, in parts per million: all when Closed, the
    /// ramp's share while it runs, none when Open or HalfOpen (probes are the exception, not a share).
    pub fn admitting_ppm(&self, now_ms: u64) -> u32 {
        match (self.state, &self.ramp) {
            (BreakerState::Closed, Some(r)) => r.share_ppm(now_ms),
            (BreakerState::Closed, None) => 1_000_000,
            _ => 0,
        }
    }

    /// Decides on a new call at `now_ms`. May change the state: Open → HalfOpen once the open time has
    /// passed, a probe permit taken, (`forced_open`) Closed → Open, or a recovery ramp's count moved
    /// or ended. `entropy`: random bits, for the jitter of an opening or of the HalfOpen hint.
    ///
    /// `mode` must not be `Disabled`; a disabled breaker is never loaded.
    pub fn admit(
        &mut self,
        cfg: &BreakerConfig,
        now_ms: u64,
        entropy: u64,
    ) -> (Decision, Option<Transition>) {
        if cfg.mode == Mode::ForcedOpen {
            let transition = match self.state {
                BreakerState::Open { .. } => None,
                _ => Some(self.open(cfg, now_ms, Reason::Forced, false, entropy)),
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
            BreakerState::Closed => match self.ramp.as_mut() {
                None => self.allow(false),
                Some(r) if now_ms >= r.until_ms => {
                    transition = Some(self.end_ramp(cfg));
                    self.allow(false)
                }
                Some(r) => match r.admit(now_ms) {
                    None => self.allow(false),
                    Some(wait_ms) => self.refuse(
                        cfg,
                        Rejection {
                            state: StateKind::Closed,
                            retry_after_ms: Some(wait_ms),
                        },
                    ),
                },
            },
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
                    self.allow(true)
                } else if now_ms >= last_permit_ms.saturating_add(self.open_timeout_ms) {
                    // Every permit has been out for a whole open time: the probes hang (or their
                    // streams were lost). That is as good as a failed probe.
                    // (A HalfOpen entered in this same call has no permit out, so this cannot follow
                    // the Open → HalfOpen change above.)
                    transition =
                        Some(self.open(cfg, now_ms, Reason::HalfOpenFailure, true, entropy));
                    self.refuse(
                        cfg,
                        Rejection {
                            state: StateKind::Open,
                            retry_after_ms: self.retry_after_ms(now_ms),
                        },
                    )
                } else {
                    // Jittered like the open time, so that clients turned away together do not
                    // come back together.
                    let wait = self.probe_wait_ms();
                    let extra = uniform_up_to(entropy, share_of(wait, cfg.open_timeout_jitter_ppm));
                    self.refuse(
                        cfg,
                        Rejection {
                            state: StateKind::HalfOpen,
                            retry_after_ms: Some(wait.saturating_add(extra)),
                        },
                    )
                }
            }
        };
        (decision, transition)
    }

    fn allow(&self, probe: bool) -> Decision {
        Decision::Allow(Ticket {
            generation: self.generation,
            probe,
        })
    }

    /// The recovery ramp is over: every call is admitted, and the open time starts again from
    /// `open_timeout`. Not a change of state (the generation stays: calls admitted during the ramp
    /// still count), but reported like one, so the log shows when the ramp ended.
    fn end_ramp(&mut self, cfg: &BreakerConfig) -> Transition {
        self.ramp = None;
        self.open_timeout_ms = cfg.open_timeout_ms;
        Transition {
            from: StateKind::Closed,
            to: StateKind::Closed,
            reason: Reason::RecoveryRampEnded,
        }
    }

    fn refuse(&self, cfg: &BreakerConfig, rejection: Rejection) -> Decision {
        if cfg.mode == Mode::DryRun {
            Decision::DryRunReject(rejection)
        } else {
            Decision::Reject(rejection)
        }
    }

    /// Records the outcome of a call admitted with `ticket`. Returns the state change it caused.
    /// `entropy`: random bits, for the jitter of an opening.
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
        entropy: u64,
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
                // A relapse during the recovery ramp is a re-open: it backs off.
                let backoff = self.ramp.is_some();
                Some(self.open(cfg, now_ms, reason, backoff, entropy))
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
                        Some(self.open(cfg, now_ms, Reason::HalfOpenFailure, true, entropy))
                    }
                    _ => {
                        let successes = successes.saturating_add(1);
                        self.consecutive_failures = 0;
                        if successes >= cfg.success_threshold {
                            self.window = Window::new(cfg.window);
                            match cfg.recovery_ramp_ms {
                                // The open time in force stays until the ramp ends.
                                Some(ms) => self.ramp = Some(Ramp::new(now_ms, ms)),
                                None => self.open_timeout_ms = cfg.open_timeout_ms,
                            }
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

    /// Opens the breaker. `backoff` (a re-open straight from HalfOpen, or a relapse during the
    /// recovery ramp) multiplies the open time first; then `open_timeout_jitter` adds a random extra
    /// of up to that fraction of it, drawn from `entropy`, to this opening only.
    fn open(
        &mut self,
        cfg: &BreakerConfig,
        now_ms: u64,
        reason: Reason,
        backoff: bool,
        entropy: u64,
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
        let jitter = uniform_up_to(
            entropy,
            share_of(self.open_timeout_ms, cfg.open_timeout_jitter_ppm),
        );
        self.ramp = None;
        // The window is kept while Open, so the health endpoint shows the rates that tripped it.
        // Nothing is recorded into it meanwhile (outcomes of older generations are ignored), and
        // closing starts a fresh one, so what it holds cannot trip the breaker again.
        self.enter(
            BreakerState::Open {
                until_ms: now_ms
                    .saturating_add(self.open_timeout_ms)
                    .saturating_add(jitter),
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
mod tests;
