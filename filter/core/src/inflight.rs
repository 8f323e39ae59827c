//! One worker's calls in flight, for the stuck-call check and the cuts (contract sections 2 to 4).
//!
//! A call enters when it is let through with `stuck_call_duration` set, and leaves when it settles.
//! Until its response headers come it is *waiting*; past its stuck duration it is *stuck*: recorded as
//! a failure then, once, and never recorded again when it ends. A call whose response headers came
//! leaves at once: it can never be stuck (a server stream, a long download). With `cut_stuck_calls`, a
//! stuck call whose host gave a way to reach its stream waits here to be *cut*: answered by the
//! breaker while it is Open or HalfOpen.
//!
//! Every operation but the periodic sweep is O(1): calls are found by id, and each upstream's waiting
//! calls are queued in the order they become stuck. A call that leaves early stays in its queue as a
//! bare id until it reaches the front, so the queues hold at most one stuck duration's worth of ids.

use std::collections::VecDeque;
use std::sync::Arc;

use hashbrown::{HashMap, HashSet};

use crate::breaker::{Rejection, Ticket};
use crate::config::BreakerId;
use crate::telemetry::Names;

/// Where a call in flight stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Standing {
    /// No response headers yet, not stuck yet.
    Waiting,
    /// Recorded as stuck; its outcome is settled.
    Stuck,
    /// To be answered with this rejection, marked `cut`: the host was asked to deliver it.
    CutDue(Rejection),
    /// Answered: the breaker's reply went to the client.
    Cut,
}

/// One call in flight.
#[derive(Debug, Clone)]
pub(crate) struct Pending {
    pub names: Arc<Names>,
    pub slot: u32,
    pub breaker: BreakerId,
    pub ticket: Ticket,
    pub grpc: bool,
    /// The host's handle on the stream, when it gave one (only for breakers that cut).
    pub stream: Option<u64>,
    pub stuck_after_ms: u64,
    pub standing: Standing,
}

/// What settling a call found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Settled {
    /// It was waiting: its outcome is still to be recorded.
    Open,
    /// It was recorded as stuck already (and may have been cut): nothing more to record.
    Recorded,
    /// No such call (a host bug, or a table reset): record it as if it were open.
    Unknown,
}

/// A stuck call to cut: the host delivers the breaker's answer to `stream`, then hands `call` to
/// [`crate::worker::Worker::take_cut`] for the reply (see [`crate::session::deliver_cut`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CutOrder {
    /// The host's handle on the stream, as it gave it.
    pub stream: u64,
    /// The call's id in this worker.
    pub call: u64,
}

/// The calls in flight of one worker.
#[derive(Debug, Default)]
pub(crate) struct InFlight {
    calls: HashMap<u64, Pending>,
    /// Per slot, ids of calls as they entered (the order they become stuck in), with when.
    waiting: HashMap<u32, VecDeque<(u64, u64)>>,
    /// Per slot, stuck calls that may be cut and were not yet.
    cuttable: HashMap<u32, HashSet<u64>>,
    next_id: u64,
}

impl InFlight {
    /// Calls in the table.
    pub fn len(&self) -> usize {
        self.calls.len()
    }

    /// Enters a call that becomes stuck at `stuck_at_ms`; its id.
    pub fn track(&mut self, call: Pending, stuck_at_ms: u64) -> u64 {
        self.next_id = self.next_id.wrapping_add(1);
        let id = self.next_id;
        self.waiting
            .entry(call.slot)
            .or_default()
            .push_back((id, stuck_at_ms));
        self.calls.insert(id, call);
        id
    }

    /// Gives the call a handle on its stream.
    pub fn attach_stream(&mut self, id: u64, stream: u64) {
        if let Some(c) = self.calls.get_mut(&id) {
            c.stream = Some(stream);
        }
    }

    /// The call's response headers came: a waiting call leaves (it can no longer be stuck), and
    /// `true` says its outcome is still to be recorded by the caller; a stuck one stays, and `false`
    /// says it is recorded already.
    pub fn headers_came(&mut self, id: u64) -> bool {
        match self.calls.get(&id).map(|c| c.standing) {
            Some(Standing::Waiting) | None => {
                self.calls.remove(&id);
                true
            }
            Some(_) => false,
        }
    }

    /// The call ended: takes it out of the table.
    pub fn settle(&mut self, id: u64) -> Settled {
        let Some(call) = self.calls.remove(&id) else {
            return Settled::Unknown;
        };
        if let Some(set) = self.cuttable.get_mut(&call.slot) {
            set.remove(&id);
            if set.is_empty() {
                self.cuttable.remove(&call.slot);
            }
        }
        match call.standing {
            Standing::Waiting => Settled::Open,
            _ => Settled::Recorded,
        }
    }

    /// Slots whose oldest waiting call is due at `now_ms`.
    pub fn slots_due(&self, now_ms: u64) -> Vec<u32> {
        self.waiting
            .iter()
            .filter(|(_, q)| q.front().is_some_and(|(_, at)| *at <= now_ms))
            .map(|(slot, _)| *slot)
            .collect()
    }

    /// The next call of `slot` that is stuck at `now_ms`, marked stuck (and cuttable, when its
    /// breaker cuts and it has a stream): a copy, for the caller to record its failure.
    pub fn next_stuck(
        &mut self,
        slot: u32,
        now_ms: u64,
        cuts: impl Fn(BreakerId) -> bool,
    ) -> Option<(u64, Pending)> {
        loop {
            let queue = self.waiting.get_mut(&slot)?;
            // Calls of one upstream enter in time order with one stuck duration, so the oldest is the
            // first to be stuck; a reload changing the duration only delays the check a little.
            let Some((id, _)) = queue.front().copied().filter(|(_, at)| *at <= now_ms) else {
                if queue.is_empty() {
                    self.waiting.remove(&slot);
                }
                return None;
            };
            queue.pop_front();
            let Some(call) = self.calls.get_mut(&id) else {
                continue; // left early
            };
            if call.standing != Standing::Waiting {
                continue;
            }
            call.standing = Standing::Stuck;
            if call.stream.is_some() && cuts(call.breaker) {
                self.cuttable.entry(slot).or_default().insert(id);
            }
            return Some((id, call.clone()));
        }
    }

    /// Slots with stuck calls waiting to be cut, and one of their keys.
    pub fn cuttable_slots(&self) -> Vec<(u32, Arc<str>)> {
        self.cuttable
            .iter()
            .filter_map(|(slot, ids)| {
                let key = ids
                    .iter()
                    .find_map(|id| self.calls.get(id))?
                    .names
                    .key
                    .clone();
                Some((*slot, key))
            })
            .collect()
    }

    /// Marks every cuttable call of `slot` (of upstream `key`) to be cut with `rejection`: the
    /// orders for the host.
    pub fn cut_slot(&mut self, slot: u32, key: &str, rejection: Rejection) -> Vec<CutOrder> {
        let Some(ids) = self.cuttable.remove(&slot) else {
            return Vec::new();
        };
        let mut orders = Vec::with_capacity(ids.len());
        for id in ids {
            let Some(call) = self.calls.get_mut(&id) else {
                continue;
            };
            if &*call.names.key != key {
                // The slot went to another upstream meanwhile: this call is not that one's.
                continue;
            }
            if let (Standing::Stuck, Some(stream)) = (call.standing, call.stream) {
                call.standing = Standing::CutDue(rejection);
                orders.push(CutOrder { stream, call: id });
            }
        }
        orders
    }

    /// The call `id`, due to be cut: marked cut, with the rejection to answer it with.
    pub fn take_cut(&mut self, id: u64) -> Option<(Pending, Rejection)> {
        let call = self.calls.get_mut(&id)?;
        let Standing::CutDue(rejection) = call.standing else {
            return None;
        };
        call.standing = Standing::Cut;
        Some((call.clone(), rejection))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::breaker::StateKind;
    #[cfg(target_arch = "wasm32")]
    use wasm_bindgen_test::wasm_bindgen_test as test;

    fn call(slot: u32, stream: Option<u64>) -> Pending {
        Pending {
            names: Arc::new(Names {
                key: Arc::from("k"),
                label: Arc::from("k"),
            }),
            slot,
            breaker: BreakerId::DEFAULTS,
            ticket: Ticket {
                generation: 0,
                probe: false,
            },
            grpc: true,
            stream,
            stuck_after_ms: 100,
            standing: Standing::Waiting,
        }
    }

    const OPEN: Rejection = Rejection {
        state: StateKind::Open,
        retry_after_ms: Some(5),
    };

    #[test]
    fn a_call_whose_headers_came_is_never_stuck() {
        let mut f = InFlight::default();
        let a = f.track(call(1, None), 100);
        let b = f.track(call(1, None), 110);
        assert!(f.headers_came(a));
        assert_eq!(f.settle(a), Settled::Unknown, "gone already");
        let (id, _) = f.next_stuck(1, 200, |_| false).unwrap();
        assert_eq!(id, b, "the left call is skipped");
        assert!(f.next_stuck(1, 200, |_| false).is_none());
        assert!(!f.headers_came(b), "stuck already: recorded");
        assert_eq!(f.settle(b), Settled::Recorded);
        assert_eq!(f.len(), 0);
        assert!(f.slots_due(1_000).is_empty(), "queues emptied");
    }

    #[test]
    fn calls_become_stuck_in_order_and_only_when_due() {
        let mut f = InFlight::default();
        let a = f.track(call(1, None), 100);
        let b = f.track(call(1, None), 150);
        assert_eq!(f.slots_due(99), Vec::<u32>::new());
        assert_eq!(f.slots_due(100), vec![1]);
        assert_eq!(f.next_stuck(1, 120, |_| false).map(|(id, _)| id), Some(a));
        assert!(f.next_stuck(1, 120, |_| false).is_none());
        assert_eq!(f.settle(b), Settled::Open);
        assert_eq!(f.settle(a), Settled::Recorded);
    }

    #[test]
    fn only_stuck_calls_with_a_stream_of_a_breaker_that_cuts_are_cut_once() {
        let mut f = InFlight::default();
        let with_stream = f.track(call(1, Some(7)), 100);
        let without = f.track(call(1, None), 100);
        let other_slot = f.track(call(2, Some(8)), 100);
        let young = f.track(call(1, Some(9)), 500);
        while f.next_stuck(1, 200, |_| true).is_some() {}
        while f.next_stuck(2, 200, |_| false).is_some() {}
        assert_eq!(f.cuttable_slots().len(), 1);
        let orders = f.cut_slot(1, "k", OPEN);
        assert_eq!(
            orders,
            vec![CutOrder {
                stream: 7,
                call: with_stream
            }]
        );
        assert!(f.cut_slot(1, "k", OPEN).is_empty(), "ordered once");
        assert_eq!(f.take_cut(with_stream).map(|(_, r)| r), Some(OPEN));
        assert!(f.take_cut(with_stream).is_none(), "delivered once");
        assert!(f.take_cut(without).is_none());
        assert!(f.take_cut(other_slot).is_none());
        assert!(f.take_cut(young).is_none());
        assert_eq!(f.settle(with_stream), Settled::Recorded);
    }

    #[test]
    fn a_settled_call_leaves_the_cut_list() {
        let mut f = InFlight::default();
        let a = f.track(call(1, Some(7)), 100);
        f.next_stuck(1, 200, |_| true);
        assert_eq!(f.settle(a), Settled::Recorded);
        assert!(f.cuttable_slots().is_empty());
        assert!(f.cut_slot(1, "k", OPEN).is_empty());
    }
}
