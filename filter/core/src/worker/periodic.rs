//! What a worker does on the host's tick: the stuck-call check, the cuts of stuck calls whose
//! breaker is Open or HalfOpen, the retry of queued outcomes, and the state gauges set again from the
//! stored states.

use std::sync::Arc;

use super::outcomes::{Retry, MAX_RETRIES_QUEUED};
use super::{Refusal, Worker, GAUGE_RESYNC_MS};
use crate::breaker::{BreakerState, Rejection};
use crate::classify::{Classification, Outcome};
use crate::config::BreakerId;
use crate::inflight::CutOrder;
use crate::store::{BreakerStore, SlotRead};
use crate::telemetry::{Event, Telemetry};

impl<S: BreakerStore> Worker<S> {
    /// What the host runs periodically (the wasm root's tick, the native module's timer, the
    /// harness's clock): records, as failures, the calls of every upstream waiting past
    /// `stuck_call_duration`; retries queued outcomes; every [`GAUGE_RESYNC_MS`], sets the state
    /// gauges from the stored states. Returns the stuck calls to cut now: the host delivers each with
    /// [`crate::session::deliver_cut`].
    pub fn tick<T: Telemetry + ?Sized>(&mut self, now_ms: u64, t: &mut T) -> Vec<CutOrder> {
        for slot in self.in_flight.slots_due(now_ms) {
            self.check_stuck_slot(slot, now_ms, t);
        }
        self.retry_queued(MAX_RETRIES_QUEUED, t);
        let orders = self.cuts(now_ms);
        if now_ms.saturating_sub(self.gauges_synced_ms) >= GAUGE_RESYNC_MS {
            self.gauges_synced_ms = now_ms;
            self.resync_gauges(t);
        }
        orders
    }

    /// The stuck-call check for one upstream's calls, oldest first.
    pub(super) fn check_stuck_slot<T: Telemetry + ?Sized>(
        &mut self,
        slot: u32,
        now_ms: u64,
        t: &mut T,
    ) {
        // Runs on every admission: the closure borrows the configuration rather than counting a
        // reference to it.
        while let Some((_, call)) = self.in_flight.next_stuck(slot, now_ms, |b: BreakerId| {
            self.config.breaker(b).cut_stuck_calls
        }) {
            let slow_ms = self.config.breaker(call.breaker).slow_call_duration_ms;
            let outcome = Classification {
                outcome: Outcome::Failure,
                slow: slow_ms.is_some_and(|s| call.stuck_after_ms >= s),
            };
            let retry = Retry {
                names: call.names,
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

    /// The stuck calls to cut now: those of every upstream whose breaker is Open or HalfOpen.
    fn cuts(&mut self, now_ms: u64) -> Vec<CutOrder> {
        let mut orders = Vec::new();
        for (slot, key) in self.in_flight.cuttable_slots() {
            let Ok(SlotRead::Held(held)) = self.store.read(slot) else {
                continue;
            };
            if *held.key != *key {
                continue;
            }
            let b = &held.breaker;
            let retry_after_ms = match b.state {
                BreakerState::Closed => continue,
                BreakerState::Open { until_ms } => until_ms.saturating_sub(now_ms),
                BreakerState::HalfOpen { .. } => b.probe_wait_ms(),
            };
            let rejection = Rejection {
                state: b.state.kind(),
                retry_after_ms: Some(retry_after_ms),
            };
            orders.extend(self.in_flight.cut_slot(slot, &key, rejection));
        }
        orders
    }

    /// The answer to a stuck call the host was told to cut ([`CutOrder::call`]): `None` when there is
    /// nothing to answer (it ended meanwhile, or was answered already).
    pub fn take_cut(&mut self, call: u64) -> Option<Refusal> {
        let (pending, rejection) = self.in_flight.take_cut(call)?;
        let reply = self.reply(
            &pending.names.key,
            pending.breaker,
            pending.grpc,
            &rejection,
            "cut",
        );
        Some(Refusal {
            reply,
            rejection,
            names: pending.names,
        })
    }

    /// Sets every gauge this worker set from the state stored now.
    fn resync_gauges<T: Telemetry + ?Sized>(&mut self, t: &mut T) {
        let known: Vec<(Arc<str>, u32)> = self
            .keys
            .values()
            .filter(|e| e.gauge.is_some())
            .filter_map(|e| Some((Arc::clone(&e.key), e.slot?)))
            .collect();
        for (key, slot) in known {
            let Ok(SlotRead::Held(held)) = self.store.read(slot) else {
                continue;
            };
            if *held.key != *key {
                continue;
            }
            let state = held.breaker.state.kind();
            let names = self.names_or_ask(&key, t);
            self.entry(&key).gauge = Some(state);
            t.event(names.upstream(), &Event::State(state));
        }
    }
}
