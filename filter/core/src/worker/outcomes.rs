//! A worker's outcomes on their way to the store: each recorded by compare-and-swap on its breaker's
//! slot, and one that loses every race kept in a bounded queue and retried, from the next admissions
//! and from the tick, rather than lost.

use std::sync::Arc;

use super::Worker;
use crate::breaker::Ticket;
use crate::classify::Classification;
use crate::config::BreakerId;
use crate::registry;
use crate::store::{BreakerStore, UpdateError};
use crate::telemetry::{Event, Names, StoreEvent, Telemetry, Upstream};

/// Most outcomes waiting for a retry after losing every compare-and-swap.
pub(super) const MAX_RETRIES_QUEUED: usize = 256;
/// How many times a queued outcome is retried before it is given up as lost.
pub(super) const MAX_RETRY_ROUNDS: u8 = 8;

/// An outcome waiting for a retry.
#[derive(Debug, Clone)]
pub(super) struct Retry {
    pub(super) names: Arc<Names>,
    pub(super) slot: u32,
    pub(super) breaker: BreakerId,
    pub(super) ticket: Ticket,
    pub(super) at_ms: u64,
    pub(super) outcome: Classification,
    pub(super) stuck: bool,
    pub(super) rounds: u8,
}

impl<S: BreakerStore> Worker<S> {
    /// Stores one outcome; one that loses every compare-and-swap waits in the retry queue rather than
    /// being lost (a probe's outcome lost there would leave its permit held until it counted as a
    /// failed probe).
    pub(super) fn store_outcome<T: Telemetry + ?Sized>(&mut self, r: Retry, t: &mut T) {
        let at = self.moment(r.at_ms);
        let cfg = self.config.breaker(r.breaker);
        let recorded = registry::record(
            &mut self.store,
            r.slot,
            &r.names.key,
            cfg,
            r.ticket,
            r.outcome,
            at,
        );
        let on_slot = match recorded {
            Ok(on_slot) => on_slot,
            Err(e) => return self.queue_retry(r, e, t),
        };
        let upstream = r.names.upstream();
        store_events(upstream, on_slot.retries, on_slot.corrupt, t);
        let Some(transition) = on_slot.value else {
            let lost = StoreEvent::OutcomeLost("its breaker's slot went to another upstream");
            t.event(upstream, &Event::Store(lost));
            return;
        };
        let event = Event::Recorded {
            outcome: r.outcome.outcome,
            slow: r.outcome.slow,
            stuck: r.stuck,
        };
        t.event(upstream, &event);
        if let Some(tr) = transition {
            self.state_seen(upstream, tr.to, Some(tr), t);
        }
    }

    fn queue_retry<T: Telemetry + ?Sized>(&mut self, mut r: Retry, e: UpdateError, t: &mut T) {
        let failed = StoreEvent::Failed {
            during: "record",
            error: e,
        };
        let upstream = r.names.upstream();
        t.event(upstream, &Event::Store(failed));
        r.rounds = r.rounds.saturating_add(1);
        if r.rounds > MAX_RETRY_ROUNDS {
            t.event(
                upstream,
                &Event::Store(StoreEvent::OutcomeLost("retried too often")),
            );
            return;
        }
        if self.retries.len() >= MAX_RETRIES_QUEUED {
            if let Some(old) = self.retries.pop_front() {
                t.event(
                    old.names.upstream(),
                    &Event::Store(StoreEvent::OutcomeLost("retry queue full")),
                );
            }
        }
        self.retries.push_back(r);
    }

    pub(super) fn retry_queued<T: Telemetry + ?Sized>(&mut self, most: usize, t: &mut T) {
        for _ in 0..most.min(self.retries.len()) {
            if let Some(r) = self.retries.pop_front() {
                self.store_outcome(r, t);
            }
        }
    }
}

/// The events every store answer may carry: lost races, corrupt bytes.
pub(super) fn store_events<T: Telemetry + ?Sized>(
    upstream: Upstream<'_>,
    retries: u32,
    corrupt: Option<crate::codec::CodecError>,
    t: &mut T,
) {
    if retries > 0 {
        t.event(upstream, &Event::Store(StoreEvent::Retries(retries)));
    }
    if let Some(e) = corrupt {
        t.event(upstream, &Event::Store(StoreEvent::Corrupt(e)));
    }
}
