//! What the simulated filter reports: the core's events, counted across all workers, so a scenario can
//! assert on totals rather than on log lines.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

use cb_core::breaker::{StateKind, Transition};
use cb_core::classify::Outcome;
use cb_core::store::{UpdateError, MAX_CAS_ATTEMPTS};
use cb_core::telemetry::{Event, StoreEvent};

use super::lock;
use super::upstream::Gauge;

/// One state change, as the filter would log it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TransitionEvent {
    /// Simulated time of the change, in ms.
    pub at_ms: u64,
    /// The worker whose call (or stuck-call check) caused it.
    pub worker: usize,
    /// The upstream key.
    pub upstream: String,
    /// From, to, and why.
    pub transition: Transition,
}

/// Counters shared by all workers of a simulation: what the filter's metrics would show.
#[derive(Debug, Default)]
pub struct Stats {
    pub(super) calls: AtomicU64,
    admitted: AtomicU64,
    probes: AtomicU64,
    rejected_open: AtomicU64,
    rejected_half_open: AtomicU64,
    rejected_recovering: AtomicU64,
    cut: AtomicU64,
    dry_run_rejections: AtomicU64,
    untracked: AtomicU64,
    pub(super) disabled: AtomicU64,
    successes: AtomicU64,
    failures: AtomicU64,
    slow: AtomicU64,
    ignored: AtomicU64,
    stuck: AtomicU64,
    pub(super) released: AtomicU64,
    record_errors: AtomicU64,
    outcomes_lost: AtomicU64,
    cas_give_ups: AtomicU64,
    cas_retries: AtomicU64,
    corrupt: AtomicU64,
    evicted: AtomicU64,
    pub(super) wait_ms: AtomicU64,
    probes_in_flight: Gauge,
    transitions: Mutex<Vec<TransitionEvent>>,
}

/// A copy of the [`Stats`] counters at one instant, for assertions.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Totals {
    /// Calls made (every call, whatever followed).
    pub calls: u64,
    /// Calls let through with a ticket (to be recorded).
    pub admitted: u64,
    /// Of those, HalfOpen probes.
    pub probes: u64,
    /// Calls rejected, Open or HalfOpen.
    pub rejected: u64,
    /// Calls rejected while Open.
    pub rejected_open: u64,
    /// Calls rejected while HalfOpen with no probe permit free.
    pub rejected_half_open: u64,
    /// Calls the recovery ramp did not admit (`x-circuit-breaker: recovering`).
    pub rejected_recovering: u64,
    /// Stuck calls answered by the breaker (`cut_stuck_calls`); each also a stuck failure.
    pub cut: u64,
    /// `dry_run`: calls that would have been rejected (let through, not recorded).
    pub dry_run_rejections: u64,
    /// Calls let through untracked that the filter counts (store failure, too many upstreams...).
    pub untracked: u64,
    /// Calls passed through by `mode: disabled` (not counted by the filter).
    pub disabled: u64,
    /// Outcomes stored in a breaker (successes + failures + ignored).
    pub recorded: u64,
    /// Stored successes.
    pub successes: u64,
    /// Stored failures (stuck calls included).
    pub failures: u64,
    /// Stored slow outcomes (also counted as a success or failure).
    pub slow: u64,
    /// Stored ignored outcomes.
    pub ignored: u64,
    /// Failures recorded by the stuck-call check while the call was still waiting.
    pub stuck: u64,
    /// Probe permits given back without an outcome (the client cancelled).
    pub released: u64,
    /// Records that failed and were queued for a retry.
    pub record_errors: u64,
    /// Outcomes given up for good.
    pub outcomes_lost: u64,
    /// Store updates abandoned after `MAX_CAS_ATTEMPTS` lost races.
    pub cas_give_ups: u64,
    /// Lost CAS races that were retried.
    pub cas_retries: u64,
    /// Times stored bytes were undecodable and the slot restarted.
    pub corrupt: u64,
    /// Idle breakers that gave their slot to a new upstream.
    pub evicted: u64,
    /// The most HalfOpen probes ever in flight at once (between admit and record), across workers.
    pub max_probes_in_flight: u64,
    /// Total time callers waited for their calls, in ms (rejected calls wait nothing).
    pub wait_ms: u64,
}

pub(super) fn bump(counter: &AtomicU64, by: u64) {
    counter.fetch_add(by, Ordering::SeqCst);
}

fn load(counter: &AtomicU64) -> u64 {
    counter.load(Ordering::SeqCst)
}

impl Stats {
    /// The counters now.
    pub fn totals(&self) -> Totals {
        let (rejected_open, rejected_half_open, rejected_recovering) = (
            load(&self.rejected_open),
            load(&self.rejected_half_open),
            load(&self.rejected_recovering),
        );
        let (successes, failures, ignored) = (
            load(&self.successes),
            load(&self.failures),
            load(&self.ignored),
        );
        Totals {
            calls: load(&self.calls),
            admitted: load(&self.admitted),
            probes: load(&self.probes),
            rejected: rejected_open + rejected_half_open + rejected_recovering,
            rejected_open,
            rejected_half_open,
            rejected_recovering,
            cut: load(&self.cut),
            dry_run_rejections: load(&self.dry_run_rejections),
            untracked: load(&self.untracked),
            disabled: load(&self.disabled),
            recorded: successes + failures + ignored,
            successes,
            failures,
            slow: load(&self.slow),
            ignored,
            stuck: load(&self.stuck),
            released: load(&self.released),
            record_errors: load(&self.record_errors),
            outcomes_lost: load(&self.outcomes_lost),
            cas_give_ups: load(&self.cas_give_ups),
            cas_retries: load(&self.cas_retries),
            corrupt: load(&self.corrupt),
            evicted: load(&self.evicted),
            max_probes_in_flight: self.probes_in_flight.max(),
            wait_ms: load(&self.wait_ms),
        }
    }

    /// HalfOpen probes between admit and record, across workers.
    pub fn probes_in_flight(&self) -> &Gauge {
        &self.probes_in_flight
    }

    /// Every state change so far, in the order they were stored.
    pub fn transitions(&self) -> Vec<TransitionEvent> {
        lock(&self.transitions).clone()
    }

    /// The state changes of one upstream.
    pub fn transitions_of(&self, upstream: &str) -> Vec<TransitionEvent> {
        lock(&self.transitions)
            .iter()
            .filter(|e| e.upstream == upstream)
            .cloned()
            .collect()
    }

    /// Counts one event of the core, as the filter's metrics would.
    pub fn event(&self, at_ms: u64, worker: usize, upstream: &str, event: &Event) {
        match event {
            Event::Admitted { probe } => {
                bump(&self.admitted, 1);
                bump(&self.probes, u64::from(*probe));
            }
            Event::Rejected(r) => match r.state {
                StateKind::HalfOpen => bump(&self.rejected_half_open, 1),
                StateKind::Closed => bump(&self.rejected_recovering, 1),
                StateKind::Open => bump(&self.rejected_open, 1),
            },
            Event::DryRun(_) => bump(&self.dry_run_rejections, 1),
            Event::Recorded {
                outcome,
                slow,
                stuck,
            } => {
                let counter = match outcome {
                    Outcome::Success => &self.successes,
                    Outcome::Failure => &self.failures,
                    Outcome::Ignored => &self.ignored,
                };
                bump(counter, 1);
                bump(&self.slow, u64::from(*slow));
                bump(&self.stuck, u64::from(*stuck));
            }
            Event::Transition(transition) => lock(&self.transitions).push(TransitionEvent {
                at_ms,
                worker,
                upstream: upstream.to_string(),
                transition: *transition,
            }),
            Event::State(_) => {}
            Event::Untracked(why) => {
                bump(&self.untracked, 1);
                if let cb_core::registry::Untracked::Store(e) = why {
                    self.failed(e);
                }
            }
            Event::Store(e) => self.store(e),
            Event::Evicted => bump(&self.evicted, 1),
            Event::Cut => bump(&self.cut, 1),
            Event::OtherLabel { .. } => {}
        }
    }

    fn store(&self, e: &StoreEvent) {
        match e {
            StoreEvent::Retries(n) => bump(&self.cas_retries, u64::from(*n)),
            StoreEvent::Corrupt(_) => bump(&self.corrupt, 1),
            StoreEvent::Failed { during, error } => {
                if *during == "record" {
                    bump(&self.record_errors, 1);
                }
                self.failed(error);
            }
            StoreEvent::OutcomeLost(_) => bump(&self.outcomes_lost, 1),
        }
    }

    fn failed(&self, e: &UpdateError) {
        if *e == UpdateError::GaveUp {
            bump(&self.cas_give_ups, 1);
            bump(&self.cas_retries, u64::from(MAX_CAS_ATTEMPTS - 1));
        }
    }
}
