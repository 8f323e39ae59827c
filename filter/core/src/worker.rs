//! One Envoy worker's side of the breakers: the configuration it serves, its handle on the store, what
//! it remembers per upstream key, the calls it let through that are still waiting (for the stuck-call
//! check), and the outcomes that lost every compare-and-swap and wait for a retry.
//!
//! Hosts keep one [`Worker`] per configuration per worker thread (one per root context in wasm, one
//! per Envoy worker in the native module, one per simulated worker in the harness). Streams reach it
//! through their [`crate::session::Session`].

use std::collections::VecDeque;
use std::sync::Arc;

use hashbrown::HashMap;

use crate::breaker::{Decision, Rejection, StateKind, Ticket, Transition};
use crate::classify::{Classification, Outcome};
use crate::config::{BreakerConfig, BreakerId, FilterConfig, Mode};
use crate::registry::{self, Located, Untracked};
use crate::reply::{self, LocalReply};
use crate::store::{BreakerStore, UpdateError};
use crate::telemetry::{Event, StoreEvent, Telemetry};

/// Fewest upstream keys a worker remembers; it remembers twice `max_upstreams` when that is more. Past
/// the bound the memory is cleared and rebuilt as calls come: hostile keys can make a worker forget,
/// never grow beyond what its real upstreams need.
const MIN_REMEMBERED_KEYS: usize = 1024;
/// Most outcomes waiting for a retry after losing every compare-and-swap.
const MAX_RETRIES_QUEUED: usize = 256;
/// How many times a queued outcome is retried before it is given up as lost.
const MAX_RETRY_ROUNDS: u8 = 8;
/// Queued outcomes retried per admission, so a call never pays for a backlog.
const RETRIES_PER_CALL: usize = 4;

/// What the worker remembers of one upstream key.
#[derive(Debug, Clone)]
struct KeyEntry {
    /// The key, shared with the calls in flight (a call holds it without copying it).
    key: Arc<str>,
    breaker: BreakerId,
    slot: Option<u32>,
    /// The state this worker last set the gauge to.
    gauge: Option<StateKind>,
}

/// A call let through, held by its session until its outcome is recorded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Call {
    /// The upstream key.
    pub key: Arc<str>,
    /// Its breaker's slot.
    pub slot: u32,
    /// Its breaker settings.
    pub breaker: BreakerId,
    /// The admission's ticket.
    pub ticket: Ticket,
    /// When it was let through (host ms).
    pub start_ms: u64,
    /// Its entry in the stuck-call table, when its breaker tracks stuck calls.
    stuck: Option<u64>,
}

/// What the worker decided on a new call.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Admission {
    /// Let it through; record its outcome with [`Worker::record`].
    Allow(Call),
    /// Answer it locally.
    Reject(Rejection),
    /// `dry_run`: let it through, marked, not recorded.
    DryRun(Rejection),
    /// Let it through with no breaker (already reported).
    Untracked,
}

/// A call in the stuck-call table.
#[derive(Debug, Clone)]
struct InFlight {
    id: u64,
    key: Arc<str>,
    breaker: BreakerId,
    ticket: Ticket,
    stuck_after_ms: u64,
    stuck_at_ms: u64,
}

/// An outcome waiting for a retry.
#[derive(Debug, Clone)]
struct Retry {
    key: Arc<str>,
    slot: u32,
    breaker: BreakerId,
    ticket: Ticket,
    at_ms: u64,
    outcome: Classification,
    stuck: bool,
    rounds: u8,
}

/// One worker's view of the breakers, over a store `S`.
#[derive(Debug)]
pub struct Worker<S> {
    config: Arc<FilterConfig>,
    configured_ms: u64,
    store: S,
    keys: HashMap<String, KeyEntry>,
    max_keys: usize,
    /// Calls let through and still waiting, per slot, oldest first.
    in_flight: HashMap<u32, VecDeque<InFlight>>,
    next_call: u64,
    retries: VecDeque<Retry>,
}

impl<S: BreakerStore> Worker<S> {
    /// A worker serving `config`, loaded at `configured_ms` (host time), over `store`. Call
    /// [`Worker::prepare`] before traffic.
    pub fn new(config: Arc<FilterConfig>, configured_ms: u64, store: S) -> Self {
        Self {
            max_keys: (2 * config.max_upstreams as usize).max(MIN_REMEMBERED_KEYS),
            config,
            configured_ms,
            store,
            keys: HashMap::new(),
            in_flight: HashMap::new(),
            next_call: 0,
            retries: VecDeque::new(),
        }
    }

    /// Creates what the store needs before traffic (see [`BreakerStore::prepare`]).
    pub fn prepare(&mut self) -> Result<(), crate::store::StoreError> {
        self.store.prepare()
    }

    /// The configuration served.
    pub fn config(&self) -> &FilterConfig {
        &self.config
    }

    /// The store.
    pub fn store(&mut self) -> &mut S {
        &mut self.store
    }

    /// Calls waiting in the stuck-call table.
    pub fn calls_in_flight(&self) -> usize {
        self.in_flight.values().map(VecDeque::len).sum()
    }

    /// Outcomes waiting for a retry.
    pub fn retries_queued(&self) -> usize {
        self.retries.len()
    }

    /// The breaker settings for `key`, resolved once per key and remembered.
    pub fn settings(&mut self, key: &str) -> (BreakerId, &BreakerConfig) {
        let id = self.entry(key).breaker;
        (id, self.config.breaker(id))
    }

    fn entry(&mut self, key: &str) -> &mut KeyEntry {
        if self.keys.len() >= self.max_keys && !self.keys.contains_key(key) {
            self.keys.clear();
        }
        let config = &self.config;
        self.keys.entry_ref(key).or_insert_with(|| KeyEntry {
            key: Arc::from(key),
            breaker: config.resolve(key),
            slot: None,
            gauge: None,
        })
    }

    /// Decides on a new call of `key` at `now_ms`. Every event goes to `t`.
    pub fn admit<T: Telemetry + ?Sized>(&mut self, key: &str, now_ms: u64, t: &mut T) -> Admission {
        self.retry_queued(RETRIES_PER_CALL, t);
        let mut entry = self.entry(key).clone();
        if self.config.breaker(entry.breaker).mode == Mode::Disabled {
            return Admission::Untracked;
        }
        // A slot remembered from earlier may have gone to another key since (an idle breaker
        // evicted): then the key is looked up again, once.
        for _ in 0..2 {
            let slot = match entry.slot {
                Some(slot) => slot,
                None => match self.locate(key, entry.breaker, now_ms, t) {
                    Some(slot) => slot,
                    None => return Admission::Untracked,
                },
            };
            self.check_stuck_slot(slot, now_ms, t);
            let cfg = self.config.breaker(entry.breaker);
            let (idle, shaped) = (self.config.idle_timeout_ms, self.configured_ms);
            let on_slot =
                match registry::admit(&mut self.store, slot, key, cfg, now_ms, idle, shaped) {
                    Ok(on_slot) => on_slot,
                    Err(e) => {
                        t.event(key, &Event::Untracked(Untracked::Store(e)));
                        return Admission::Untracked;
                    }
                };
            store_events(key, on_slot.retries, on_slot.corrupt, t);
            match on_slot.value {
                None => {
                    self.forget_slot(key);
                    entry.slot = None;
                }
                Some(a) => {
                    if entry.gauge != Some(a.state) || a.transition.is_some() {
                        self.state_seen(key, a.state, a.transition, t);
                    }
                    entry.slot = Some(slot);
                    return self.decided(&entry, a.decision, now_ms, t);
                }
            }
        }
        t.event(key, &Event::Untracked(Untracked::TooManyUpstreams));
        Admission::Untracked
    }

    fn locate<T: Telemetry + ?Sized>(
        &mut self,
        key: &str,
        breaker: BreakerId,
        now_ms: u64,
        t: &mut T,
    ) -> Option<u32> {
        let cfg = self.config.breaker(breaker);
        let (idle, shaped) = (self.config.idle_timeout_ms, self.configured_ms);
        match registry::locate(&mut self.store, key, cfg, now_ms, idle, shaped) {
            Ok(Located {
                slot,
                evicted,
                retries,
                corrupt,
            }) => {
                store_events(key, retries, corrupt, t);
                if evicted {
                    t.event(key, &Event::Evicted);
                }
                self.entry(key).slot = Some(slot);
                Some(slot)
            }
            Err(why) => {
                t.event(key, &Event::Untracked(why));
                None
            }
        }
    }

    fn forget_slot(&mut self, key: &str) {
        if let Some(e) = self.keys.get_mut(key) {
            e.slot = None;
            e.gauge = None;
        }
    }

    /// Keeps the state gauge on the stored state: it is set whenever this worker sees a state other
    /// than the one it last set, so a worker's stale view is corrected by the next call it admits.
    fn state_seen<T: Telemetry + ?Sized>(
        &mut self,
        key: &str,
        state: StateKind,
        transition: Option<Transition>,
        t: &mut T,
    ) {
        if let Some(tr) = transition {
            t.event(key, &Event::Transition(tr));
        }
        let entry = self.entry(key);
        let already = entry.gauge == Some(state) || transition.is_some_and(|tr| tr.to == state);
        entry.gauge = Some(state);
        if !already {
            t.event(key, &Event::State(state));
        }
    }

    fn decided<T: Telemetry + ?Sized>(
        &mut self,
        entry: &KeyEntry,
        decision: Decision,
        now_ms: u64,
        t: &mut T,
    ) -> Admission {
        let (key, slot, breaker) = (&entry.key, entry.slot.unwrap_or(0), entry.breaker);
        match decision {
            Decision::Allow(ticket) => {
                t.event(
                    key,
                    &Event::Admitted {
                        probe: ticket.probe,
                    },
                );
                let stuck = self.track(key, slot, breaker, ticket, now_ms);
                Admission::Allow(Call {
                    key: Arc::clone(key),
                    slot,
                    breaker,
                    ticket,
                    start_ms: now_ms,
                    stuck,
                })
            }
            Decision::Reject(r) => Admission::Reject(r),
            Decision::DryRunReject(r) => {
                t.event(key, &Event::DryRun(r));
                Admission::DryRun(r)
            }
        }
    }

    /// Enters a call in the stuck-call table, when its breaker tracks stuck calls.
    fn track(
        &mut self,
        key: &Arc<str>,
        slot: u32,
        breaker: BreakerId,
        ticket: Ticket,
        now_ms: u64,
    ) -> Option<u64> {
        let after = self.config.breaker(breaker).stuck_call_duration_ms?;
        self.next_call = self.next_call.wrapping_add(1);
        let id = self.next_call;
        self.in_flight.entry(slot).or_default().push_back(InFlight {
            id,
            key: Arc::clone(key),
            breaker,
            ticket,
            stuck_after_ms: after,
            stuck_at_ms: now_ms.saturating_add(after),
        });
        Some(id)
    }

    /// Records the outcome of a call this worker let through (its ticket is spent). A call the
    /// stuck-call check already recorded is not recorded again.
    pub fn record<T: Telemetry + ?Sized>(
        &mut self,
        call: Call,
        outcome: Classification,
        now_ms: u64,
        t: &mut T,
    ) {
        if let Some(id) = call.stuck {
            if !self.untrack(call.slot, id) {
                return;
            }
        }
        let retry = Retry {
            key: call.key,
            slot: call.slot,
            breaker: call.breaker,
            ticket: call.ticket,
            at_ms: now_ms,
            outcome,
            stuck: false,
            rounds: 0,
        };
        self.store_outcome(retry, t);
    }

    /// Takes a call out of the stuck-call table; `false` when it is no longer there (recorded as
    /// stuck). Scans only the calls in flight for that one upstream.
    fn untrack(&mut self, slot: u32, id: u64) -> bool {
        let Some(calls) = self.in_flight.get_mut(&slot) else {
            return false;
        };
        let Some(at) = calls.iter().position(|c| c.id == id) else {
            return false;
        };
        calls.remove(at);
        if calls.is_empty() {
            self.in_flight.remove(&slot);
        }
        true
    }

    /// Records, as failures, the calls of every upstream still waiting past `stuck_call_duration`
    /// (the host calls this periodically: the wasm root's tick, the native module's timer).
    pub fn check_stuck<T: Telemetry + ?Sized>(&mut self, now_ms: u64, t: &mut T) {
        let slots: Vec<u32> = self
            .in_flight
            .iter()
            .filter(|(_, calls)| calls.front().is_some_and(|c| c.stuck_at_ms <= now_ms))
            .map(|(slot, _)| *slot)
            .collect();
        for slot in slots {
            self.check_stuck_slot(slot, now_ms, t);
        }
        self.retry_queued(MAX_RETRIES_QUEUED, t);
    }

    /// The stuck-call check for one upstream's calls, oldest first.
    fn check_stuck_slot<T: Telemetry + ?Sized>(&mut self, slot: u32, now_ms: u64, t: &mut T) {
        loop {
            let Some(calls) = self.in_flight.get_mut(&slot) else {
                return;
            };
            // Calls of one upstream enter in time order with one stuck duration, so the oldest is
            // the first to be stuck; a reload changing the duration only delays the check a little.
            if calls.front().is_none_or(|c| c.stuck_at_ms > now_ms) {
                return;
            }
            let Some(call) = calls.pop_front() else {
                return;
            };
            if calls.is_empty() {
                self.in_flight.remove(&slot);
            }
            let slow_ms = self.config.breaker(call.breaker).slow_call_duration_ms;
            let outcome = Classification {
                outcome: Outcome::Failure,
                slow: slow_ms.is_some_and(|s| call.stuck_after_ms >= s),
            };
            let retry = Retry {
                key: call.key,
                slot,
                breaker: call.breaker,
                ticket: call.ticket,
                at_ms: now_ms,
                outcome,
                stuck: true,
                rounds: 0,
            };
            self.store_outcome(retry, t);
        }
    }

    /// Stores one outcome; one that loses every compare-and-swap waits in the retry queue rather than
    /// being lost (a probe's outcome lost there would leave its permit held until it counted as a
    /// failed probe).
    fn store_outcome<T: Telemetry + ?Sized>(&mut self, r: Retry, t: &mut T) {
        let cfg = self.config.breaker(r.breaker);
        let shaped = self.configured_ms;
        let recorded = registry::record(
            &mut self.store,
            r.slot,
            &r.key,
            cfg,
            r.ticket,
            r.at_ms,
            r.outcome,
            shaped,
        );
        let on_slot = match recorded {
            Ok(on_slot) => on_slot,
            Err(e) => return self.queue_retry(r, e, t),
        };
        store_events(&r.key, on_slot.retries, on_slot.corrupt, t);
        let Some(transition) = on_slot.value else {
            let lost = StoreEvent::OutcomeLost("its breaker's slot went to another upstream");
            t.event(&r.key, &Event::Store(lost));
            return;
        };
        let event = Event::Recorded {
            outcome: r.outcome.outcome,
            slow: r.outcome.slow,
            stuck: r.stuck,
        };
        t.event(&r.key, &event);
        if let Some(tr) = transition {
            self.state_seen(&r.key, tr.to, Some(tr), t);
        }
    }

    fn queue_retry<T: Telemetry + ?Sized>(&mut self, mut r: Retry, e: UpdateError, t: &mut T) {
        let failed = StoreEvent::Failed {
            during: "record",
            error: e,
        };
        t.event(&r.key, &Event::Store(failed));
        r.rounds = r.rounds.saturating_add(1);
        if r.rounds > MAX_RETRY_ROUNDS {
            t.event(
                &r.key,
                &Event::Store(StoreEvent::OutcomeLost("retried too often")),
            );
            return;
        }
        if self.retries.len() >= MAX_RETRIES_QUEUED {
            if let Some(old) = self.retries.pop_front() {
                t.event(
                    &old.key,
                    &Event::Store(StoreEvent::OutcomeLost("retry queue full")),
                );
            }
        }
        self.retries.push_back(r);
    }

    fn retry_queued<T: Telemetry + ?Sized>(&mut self, most: usize, t: &mut T) {
        for _ in 0..most.min(self.retries.len()) {
            if let Some(r) = self.retries.pop_front() {
                self.store_outcome(r, t);
            }
        }
    }

    /// The health endpoint's reply: every breaker of the table, or 503 and `unknown` when the store
    /// cannot be read. Never `healthy` without knowing.
    pub fn health(&mut self, now_ms: Option<u64>) -> LocalReply {
        match registry::health(&mut self.store, now_ms) {
            Ok(h) => reply::health(&h),
            Err(e) => reply::health_unknown(&e.to_string()),
        }
    }
}

/// The events every store answer may carry: lost races, corrupt bytes.
fn store_events<T: Telemetry + ?Sized>(
    key: &str,
    retries: u32,
    corrupt: Option<crate::codec::CodecError>,
    t: &mut T,
) {
    if retries > 0 {
        t.event(key, &Event::Store(StoreEvent::Retries(retries)));
    }
    if let Some(e) = corrupt {
        t.event(key, &Event::Store(StoreEvent::Corrupt(e)));
    }
}

#[cfg(test)]
mod tests;
