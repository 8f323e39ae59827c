//! Which slot of the [`BreakerStore`] holds an upstream's breaker, and admit / record / health on it.
//!
//! The table has `max_upstreams` slots. A key lives in the first slot of its probe sequence (linear
//! probing from an FNV-1a hash of the key, at most [`MAX_PROBES`] slots) that holds it, or that it
//! claims while empty. Slots never go back to empty, so a lookup that meets an empty slot knows the
//! key is nowhere further along. When every probed slot is taken, the first one whose breaker is
//! Closed and has had no call for `idle_timeout` is given to the new key (eviction); Open and HalfOpen
//! breakers are never evicted, so a flood of hostile keys cannot erase an open breaker, and once the
//! junk idles out a real upstream gets its breaker again.
//!
//! Every operation touches at most [`MAX_PROBES`] slots, whatever the number of keys: registration
//! costs the same with one upstream or 65,536, and a flood of new keys costs each of them a bounded
//! walk, never a rewrite of a shared index.

use crate::breaker::{Breaker, Decision, StateKind, Ticket, Transition};
use crate::classify::Classification;
use crate::codec::CodecError;
use crate::config::BreakerConfig;
use crate::store::{BreakerStore, Read, Slot, SlotRead, UpdateError};
use crate::window::WindowStats;

/// The most slots a lookup probes. Bounded so that a full table costs a new key a fixed number of
/// reads; 64 keeps lookups under a tenth of a millisecond in wasm even then, and lets a table fill to
/// about 90% before a key can find no room in its window.
pub const MAX_PROBES: u32 = 64;

/// Why a call passed without a breaker.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Untracked {
    /// The request had no key (no cluster, not a gRPC path, header absent or not UTF-8).
    NoKey,
    /// The key is longer than [`crate::config::MAX_KEY_LEN`] bytes.
    KeyTooLong,
    /// Every slot the key may live in holds a breaker that is busy or was called recently.
    TooManyUpstreams,
    /// The host could not tell the time.
    NoClock,
    /// The call was to be rejected, but the host refused the local reply.
    ReplyFailed,
    /// Shared data failed us; the call fails open.
    Store(UpdateError),
}

/// The slot a key was found in or given.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Located {
    /// The slot.
    pub slot: u32,
    /// The key took the slot of an idle breaker.
    pub evicted: bool,
    /// Lost compare-and-swap races on the way.
    pub retries: u32,
    /// A probed slot held bytes that did not decode (and was taken over).
    pub corrupt: Option<CodecError>,
}

/// What an admission decided, and the state it left.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Admitted {
    /// Let through, rejected, or dry-run rejected.
    pub decision: Decision,
    /// A state change it caused (Open → HalfOpen, a forced opening, a probe held too long).
    pub transition: Option<Transition>,
    /// The stored state after it.
    pub state: StateKind,
}

/// An operation on a slot: its result, or `None` when the slot no longer holds the key (an idle
/// breaker evicted meanwhile, or corrupt bytes), and what the store went through.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OnSlot<T> {
    /// The result, when the slot is the key's.
    pub value: Option<T>,
    /// Lost compare-and-swap races.
    pub retries: u32,
    /// The slot's bytes did not decode (they were replaced by an empty slot).
    pub corrupt: Option<CodecError>,
}

/// One breaker as the health endpoint reports it.
#[derive(Debug, Clone, PartialEq)]
pub struct UpstreamHealth {
    /// The upstream key.
    pub upstream: String,
    /// Its state.
    pub state: StateKind,
    /// The window's totals now.
    pub stats: WindowStats,
    /// Failures in a row.
    pub consecutive_failures: u32,
    /// Ms until probes may go through, while Open (`None` when the clock is unknown).
    pub retry_after_ms: Option<u64>,
    /// The share of calls it lets through now, in parts per million (see
    /// [`Breaker::admitting_ppm`]).
    pub admitting_ppm: u32,
}

/// The breakers of the table, for the health endpoint.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Health {
    /// At most the number asked for: those not closed first, then the closed ones, each group by key.
    pub breakers: Vec<UpstreamHealth>,
    /// Breakers left out of `breakers`.
    pub omitted: u32,
    /// Breakers not closed, of all of them (listed or not).
    pub not_closed: u32,
    /// Slots whose bytes did not decode: breakers whose state nobody can tell.
    pub unreadable: u32,
}

/// The first slot of `key`'s probe sequence: FNV-1a, the same in every worker, build and version.
pub fn home_slot(key: &str, capacity: u32) -> u32 {
    (crate::store::fnv1a(key) % u64::from(capacity.max(1))) as u32
}

/// A fresh slot for `key`, claimed at `now_ms` under a configuration loaded at `shaped_ms`.
fn fresh(key: &str, cfg: &BreakerConfig, now_ms: u64, shaped_ms: u64) -> Slot {
    Slot {
        key: key.to_string(),
        last_call_ms: now_ms,
        shaped_ms,
        breaker: Breaker::new(cfg),
    }
}

fn evictable(slot: &Slot, now_ms: u64, idle_timeout_ms: u64) -> bool {
    slot.breaker.state.kind() == StateKind::Closed
        && now_ms.saturating_sub(slot.last_call_ms) >= idle_timeout_ms
}

/// What a claim attempt on one slot found.
enum Claim {
    /// The slot is the key's (it was, or it is now).
    Ours { evicted: bool },
    /// Another key holds it.
    Taken,
}

/// Finds `key`'s slot, claiming an empty one or evicting an idle breaker if it has none.
pub fn locate<S: BreakerStore>(
    store: &mut S,
    key: &str,
    cfg: &BreakerConfig,
    now_ms: u64,
    idle_timeout_ms: u64,
    shaped_ms: u64,
) -> Result<Located, Untracked> {
    let capacity = store.capacity();
    let home = home_slot(key, capacity);
    let mut retries = 0;
    let mut victim = None;
    for p in 0..MAX_PROBES.min(capacity) {
        let i = (home + p) % capacity;
        let read = store.read(i).map_err(Untracked::Store)?;
        match read {
            SlotRead::Held(slot) if slot.key == key => {
                return Ok(Located {
                    slot: i,
                    evicted: false,
                    retries,
                    corrupt: None,
                })
            }
            SlotRead::Held(slot) => {
                if victim.is_none() && evictable(&slot, now_ms, idle_timeout_ms) {
                    victim = Some(i);
                }
                continue;
            }
            SlotRead::Empty | SlotRead::Corrupt(_) => {}
        }
        let claimed = store
            .update(i, Read::Fresh, |content| match content {
                Some(slot) if slot.key == key => (Claim::Ours { evicted: false }, false),
                Some(_) => (Claim::Taken, false),
                None => {
                    *content = Some(fresh(key, cfg, now_ms, shaped_ms));
                    (Claim::Ours { evicted: false }, true)
                }
            })
            .map_err(Untracked::Store)?;
        retries += claimed.retries;
        if let Claim::Ours { evicted } = claimed.value {
            return Ok(Located {
                slot: i,
                evicted,
                retries,
                corrupt: claimed.corrupt,
            });
        }
    }
    let Some(i) = victim else {
        return Err(Untracked::TooManyUpstreams);
    };
    let taken = store
        .update(i, Read::Fresh, |content| match content {
            Some(slot) if slot.key == key => (Claim::Ours { evicted: false }, false),
            Some(slot) if !evictable(slot, now_ms, idle_timeout_ms) => (Claim::Taken, false),
            _ => {
                *content = Some(fresh(key, cfg, now_ms, shaped_ms));
                (Claim::Ours { evicted: true }, true)
            }
        })
        .map_err(Untracked::Store)?;
    match taken.value {
        Claim::Ours { evicted } => Ok(Located {
            slot: i,
            evicted,
            retries: retries + taken.retries,
            corrupt: taken.corrupt,
        }),
        Claim::Taken => Err(Untracked::TooManyUpstreams),
    }
}

/// Brings a stored breaker in line with the configuration loaded at `shaped_ms`, unless a newer one
/// already shaped it (see [`Slot::shaped_ms`]). Returns whether anything changed.
fn conform(slot: &mut Slot, cfg: &BreakerConfig, shaped_ms: u64) -> bool {
    if slot.shaped_ms > shaped_ms || !slot.breaker.conform(cfg) {
        return false;
    }
    slot.shaped_ms = shaped_ms;
    true
}

/// When and under what the registry works on a slot: the time, the configuration's idle timeout and
/// load time, and random bits for the jitter (drawn once per operation: a CAS retry reuses them).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Moment {
    /// Host time (ms).
    pub now_ms: u64,
    /// `idle_timeout`.
    pub idle_timeout_ms: u64,
    /// When the configuration in force was loaded (see [`Slot::shaped_ms`]).
    pub shaped_ms: u64,
    /// Random bits.
    pub entropy: u64,
}

/// Decides on a new call of `key` in slot `i`.
pub fn admit<S: BreakerStore>(
    store: &mut S,
    i: u32,
    key: &str,
    cfg: &BreakerConfig,
    at: Moment,
) -> Result<OnSlot<Admitted>, UpdateError> {
    let Moment {
        now_ms,
        idle_timeout_ms,
        shaped_ms,
        entropy,
    } = at;
    let u = store.update(i, Read::Fresh, |content| {
        let Some(slot) = content.as_mut().filter(|s| s.key == key) else {
            return (None, false);
        };
        let conformed = conform(slot, cfg, shaped_ms);
        // `admit` moves only the state, generation, open time and ramp
        // (`admit_changes_only_the_state` holds it to that), so comparing those tells whether to
        // write.
        let b = &mut slot.breaker;
        let before = (b.state, b.generation, b.open_timeout_ms, b.ramp);
        let (decision, transition) = b.admit(cfg, now_ms, entropy);
        let moved = (b.state, b.generation, b.open_timeout_ms, b.ramp) != before;
        let state = b.state.kind();
        // The last-call time is kept fresh enough to tell idle from busy, at one extra write per
        // half idle time rather than one per call.
        let touched = now_ms.saturating_sub(slot.last_call_ms) >= idle_timeout_ms / 2;
        if touched {
            slot.last_call_ms = now_ms;
        }
        let admitted = Admitted {
            decision,
            transition,
            state,
        };
        (Some(admitted), conformed || moved || touched)
    })?;
    Ok(OnSlot {
        value: u.value,
        retries: u.retries,
        corrupt: u.corrupt,
    })
}

/// Records the outcome of a call of `key` admitted with `ticket` into slot `i`: the state change it
/// caused, if any. (`at.idle_timeout_ms` is not used: a record always refreshes the last-call time.)
pub fn record<S: BreakerStore>(
    store: &mut S,
    i: u32,
    key: &str,
    cfg: &BreakerConfig,
    ticket: Ticket,
    outcome: Classification,
    at: Moment,
) -> Result<OnSlot<Option<Transition>>, UpdateError> {
    let Moment {
        now_ms,
        shaped_ms,
        entropy,
        ..
    } = at;
    let u = store.update(i, Read::Reuse, |content| {
        let Some(slot) = content.as_mut().filter(|s| s.key == key) else {
            return (None, false);
        };
        conform(slot, cfg, shaped_ms);
        slot.last_call_ms = now_ms;
        (
            Some(slot.breaker.record(cfg, ticket, now_ms, outcome, entropy)),
            true,
        )
    })?;
    Ok(OnSlot {
        value: u.value,
        retries: u.retries,
        corrupt: u.corrupt,
    })
}

/// The breakers of the table: at most `most` of them, those not closed first, then the closed ones,
/// each group sorted by key, and how many were left out. `now_ms` is `None` when the clock failed: the
/// states are still known, the time left Open is not.
///
/// Every slot is read (the states of all are needed to choose), but at most `most` are kept at any
/// time, so the answer's memory and size stay bounded whatever the number of keys.
pub fn health<S: BreakerStore>(
    store: &mut S,
    now_ms: Option<u64>,
    most: usize,
) -> Result<Health, UpdateError> {
    let mut out = Health::default();
    let mut kept: std::collections::BinaryHeap<Ranked> = std::collections::BinaryHeap::new();
    for i in 0..store.capacity() {
        let slot = match store.read(i)? {
            SlotRead::Empty => continue,
            SlotRead::Corrupt(_) => {
                out.unreadable += 1;
                continue;
            }
            SlotRead::Held(slot) => slot,
        };
        let closed = slot.breaker.state.kind() == StateKind::Closed;
        out.not_closed += u32::from(!closed);
        let rank = (closed, slot.key);
        // The heap's top is the entry ranked last: a new one ranked after it is not kept.
        if kept.len() >= most && kept.peek().is_none_or(|top| rank >= top.rank) {
            out.omitted += 1;
            continue;
        }
        let b = &slot.breaker;
        let now = now_ms.unwrap_or(slot.last_call_ms);
        let entry = UpstreamHealth {
            state: b.state.kind(),
            stats: b.stats(now),
            consecutive_failures: b.consecutive_failures,
            retry_after_ms: now_ms.and_then(|n| b.retry_after_ms(n)),
            admitting_ppm: b.admitting_ppm(now),
            upstream: String::new(),
        };
        kept.push(Ranked { rank, entry });
        if kept.len() > most {
            kept.pop();
            out.omitted += 1;
        }
    }
    out.breakers = kept
        .into_sorted_vec()
        .into_iter()
        .map(|r| UpstreamHealth {
            upstream: r.rank.1,
            ..r.entry
        })
        .collect();
    Ok(out)
}

/// A breaker's place in the health answer: not closed before closed, then by key.
struct Ranked {
    rank: (bool, String),
    entry: UpstreamHealth,
}

impl PartialEq for Ranked {
    fn eq(&self, other: &Self) -> bool {
        self.rank == other.rank
    }
}
impl Eq for Ranked {}
impl PartialOrd for Ranked {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for Ranked {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        self.rank.cmp(&other.rank)
    }
}

#[cfg(test)]
mod tests;
