//! The calls of a replay in time order through one [`Proxy`]: each call's moments run as they happened
//! on the wire, so overlapping calls interleave as the filter saw them (a slow call that started
//! before an outage is recorded after the fast failures that tripped the breaker). Ties at one
//! millisecond run in [`Moment`] order, then in log order. What the core says at each moment goes to
//! an [`Observer`]: the report of a replay, or the figures of a fleet.

use std::cmp::Reverse;
use std::collections::BinaryHeap;

use cb_core::telemetry::Event;

use super::log::Call;
use super::proxy::{moments, Admit, Moment, Proxy};

/// What a replay is told, moment by moment.
pub(crate) trait Observer {
    /// Call `i` asked to be let through at `at_ms`: what the core decided and said.
    fn admitted(&mut self, at_ms: u64, i: usize, admit: Admit, events: &[Event]);
    /// A later moment of call `i`, let through: what the core said.
    fn settled(&mut self, at_ms: u64, i: usize, events: &[Event]);
    /// The stuck-call check at `at_ms` recorded something: what the core said, by upstream.
    fn stuck(&mut self, at_ms: u64, events: &[(String, Event)]);
}

/// The moments of a replay in the order they happen. Admissions are known up front and sorted once;
/// only the later moments of calls let through wait in a heap, which stays as small as the
/// concurrency.
struct Queue {
    admits: Vec<(u64, usize)>,
    next: usize,
    later: BinaryHeap<Reverse<(u64, Moment, usize)>>,
}

impl Queue {
    fn new(calls: &[Call], picked: impl Iterator<Item = usize>) -> Self {
        let mut admits: Vec<(u64, usize)> = picked
            .filter_map(|i| calls.get(i).map(|c| (c.start_ms, i)))
            .collect();
        admits.sort_unstable();
        Self {
            admits,
            next: 0,
            later: BinaryHeap::new(),
        }
    }

    fn push(&mut self, at_ms: u64, moment: Moment, i: usize) {
        self.later.push(Reverse((at_ms, moment, i)));
    }

    fn pop(&mut self) -> Option<(u64, Moment, usize)> {
        let admit = self
            .admits
            .get(self.next)
            .map(|(at, i)| (*at, Moment::Admit, *i));
        let later = self.later.peek().map(|Reverse(m)| *m);
        match (admit, later) {
            (Some(a), Some(l)) if l < a => {
                self.later.pop();
                Some(l)
            }
            (None, Some(l)) => {
                self.later.pop();
                Some(l)
            }
            (Some(a), _) => {
                self.next += 1;
                Some(a)
            }
            (None, None) => None,
        }
    }
}

/// Replays the calls of `calls` that `picked` names (indices, in any order) through `proxy`.
pub(crate) fn run(
    calls: &[Call],
    picked: impl Iterator<Item = usize>,
    proxy: &mut Proxy,
    upstream_key: &cb_core::key::UpstreamKey,
    observer: &mut impl Observer,
) {
    let mut queue = Queue::new(calls, picked);
    while let Some((at, moment, i)) = queue.pop() {
        let Some(call) = calls.get(i) else {
            continue;
        };
        match moment {
            Moment::Admit => {
                let (admit, events) = proxy.admit(i, call, at);
                if admit == Admit::Allow {
                    let stuck_ms = call
                        .upstream_key_str(upstream_key)
                        .and_then(|key| proxy.stuck_ms(&key));
                    for (t, m) in moments(call, stuck_ms).into_iter().flatten() {
                        queue.push(t, m, i);
                    }
                }
                observer.admitted(at, i, admit, &events);
            }
            Moment::Stuck => {
                let events = proxy.check_stuck(at);
                if !events.is_empty() {
                    observer.stuck(at, &events);
                }
            }
            Moment::Headers | Moment::End => {
                let events = proxy.step(moment, i, call, at);
                observer.settled(at, i, &events);
            }
        }
    }
}
