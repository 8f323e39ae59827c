//! One Envoy worker's side of the breakers: the configuration it serves, its handle on the store, what
//! it remembers per upstream key, and the calls it let through that are still waiting (their table in
//! [`crate::inflight`]). This file admits calls and takes their outcomes; `outcomes` stores them, and
//! queues for a retry those that lost every compare-and-swap; `periodic` is the tick: the stuck-call
//! check, the cuts, the retries and the gauges.
//!
//! Hosts keep one [`Worker`] per configuration per worker thread (one per root context in wasm, one
//! per Envoy worker in the native module, one per simulated worker in the harness), and call
//! [`Worker::tick`] periodically. Streams reach it through their [`crate::session::Session`].

use std::collections::VecDeque;
use std::sync::Arc;

use hashbrown::HashMap;

use crate::breaker::{Decision, Rejection, StateKind, Ticket, Transition};
use crate::classify::Classification;
use crate::config::{BreakerConfig, BreakerId, FilterConfig, Mode};
use crate::entropy::Entropy;
use crate::host::Host;
use crate::inflight::{InFlight, Pending, Settled, Standing};
use crate::registry::{self, Located, Moment, Untracked};
use crate::reply::{self, LocalReply, RejectParts};
use crate::store::{BreakerStore, Label};
use crate::telemetry::{Event, Names, StoreEvent, Telemetry, Upstream, OTHER_LABEL};

pub use crate::inflight::CutOrder;

use outcomes::{store_events, Retry};

mod outcomes;
mod periodic;

/// Fewest upstream keys a worker remembers; it remembers twice `max_upstreams` when that is more. Past
/// the bound the memory is cleared and rebuilt as calls come: hostile keys can make a worker forget,
/// never grow beyond what its real upstreams need.
const MIN_REMEMBERED_KEYS: usize = 1024;
/// Queued outcomes retried per admission, so a call never pays for a backlog.
const RETRIES_PER_CALL: usize = 4;
/// How often [`Worker::tick`] sets the state gauges from the stored states (ms). A gauge is one value
/// for the whole Envoy, written by every worker: a worker's write made from an older look can land
/// after another's newer one, and with no further call nothing would correct it.
pub const GAUGE_RESYNC_MS: u64 = 1_000;
/// How many upstream keys one Envoy labels in metrics, per `max_upstreams` (contract section 6).
pub const LABELS_PER_UPSTREAM: u32 = 4;

/// What the worker remembers of one upstream key.
#[derive(Debug, Clone)]
struct KeyEntry {
    /// The key, shared with the calls in flight (a call holds it without copying it).
    key: Arc<str>,
    breaker: BreakerId,
    slot: Option<u32>,
    /// The state this worker last set the gauge to.
    gauge: Option<StateKind>,
    /// The key with the `upstream` label of its series (the key, or `_other`), once asked.
    names: Option<Arc<Names>>,
    /// Its rejection's fixed parts, made at its first rejection.
    parts: Option<Arc<RejectParts>>,
}

/// A call let through, held by its session until its outcome is recorded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Call {
    /// The upstream key and its metric label.
    pub names: Arc<Names>,
    /// Its breaker's slot.
    pub slot: u32,
    /// Its breaker settings.
    pub breaker: BreakerId,
    /// The admission's ticket.
    pub ticket: Ticket,
    /// When it was let through (host ms).
    pub start_ms: u64,
    /// The request is gRPC.
    pub grpc: bool,
    /// Its id in the table of calls in flight, while it is there (its breaker tracks stuck calls, and
    /// no response headers came yet).
    pub(crate) in_flight: Option<u64>,
}

impl Call {
    /// The upstream, as telemetry names it.
    pub fn upstream(&self) -> Upstream<'_> {
        self.names.upstream()
    }
}

/// A call turned away: the reply for the host to send, and what to report once it is sent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    /// The answer.
    pub reply: LocalReply,
    /// Why.
    pub rejection: Rejection,
    /// The upstream key and its metric label.
    pub names: Arc<Names>,
}

impl Refusal {
    /// The upstream, as telemetry names it.
    pub fn upstream(&self) -> Upstream<'_> {
        self.names.upstream()
    }
}

/// What the worker decided on a new call.
// A refusal carries its reply inline (the Open state's hot path): boxing it would add an allocation
// to every rejection to shrink a value that lives on the stack for one call.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Admission {
    /// Let it through; record its outcome with [`Worker::record`].
    Allow(Call),
    /// Answer it locally.
    Reject(Refusal),
    /// `dry_run`: let it through, marked, not recorded.
    DryRun(Rejection),
    /// Let it through with no breaker (already reported).
    Untracked,
    /// `mode: disabled`: let it through, nothing to report.
    Disabled,
}

/// One worker's view of the breakers, over a store `S`.
#[derive(Debug)]
pub struct Worker<S> {
    config: Arc<FilterConfig>,
    configured_ms: u64,
    store: S,
    keys: HashMap<String, KeyEntry>,
    max_keys: usize,
    in_flight: InFlight,
    retries: VecDeque<Retry>,
    entropy: Entropy,
    gauges_synced_ms: u64,
}

impl<S: BreakerStore> Worker<S> {
    /// A worker serving `config`, loaded at `configured_ms` (host time), over `store`, drawing its
    /// random bits (the jitter of open times) from `seed`: hosts seed every worker differently, from
    /// a source of real randomness (the harness from a seeded generator, to replay exactly). Call
    /// [`Worker::prepare`] before traffic.
    pub fn new(config: Arc<FilterConfig>, configured_ms: u64, store: S, seed: u64) -> Self {
        Self {
            max_keys: (2 * config.max_upstreams as usize).max(MIN_REMEMBERED_KEYS),
            config,
            configured_ms,
            store,
            keys: HashMap::new(),
            in_flight: InFlight::default(),
            retries: VecDeque::new(),
            entropy: Entropy::new(seed),
            gauges_synced_ms: configured_ms,
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

    /// Calls in the table of calls in flight (waiting, or stuck and not ended).
    pub fn calls_in_flight(&self) -> usize {
        self.in_flight.len()
    }

    /// Outcomes waiting for a retry.
    pub fn retries_queued(&self) -> usize {
        self.retries.len()
    }

    /// Upstream keys this worker remembers (bounded by twice `max_upstreams`, at least 1024).
    pub fn keys_remembered(&self) -> usize {
        self.keys.len()
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
            names: None,
            parts: None,
        })
    }

    fn moment(&mut self, now_ms: u64) -> Moment {
        Moment {
            now_ms,
            idle_timeout_ms: self.config.idle_timeout_ms,
            shaped_ms: self.configured_ms,
            entropy: self.entropy.next_u64(),
        }
    }

    /// Decides on a new call of `key`. Reads the clock and the request's `content-type` from `host`
    /// only for a breaker that is not disabled. Every event goes to `host`.
    /// The key is looked up once; the entry is written again only when something about it changed.
    pub fn admit<H: Host + ?Sized>(&mut self, key: &str, host: &mut H) -> Admission {
        let entry = self.entry(key);
        let (breaker, mut slot, gauge) = (entry.breaker, entry.slot, entry.gauge);
        let mut names = entry.names.clone();
        if self.config.breaker(breaker).mode == Mode::Disabled {
            // Nothing to track or report: spare the clock and the content-type.
            return Admission::Disabled;
        }
        let Some(now_ms) = host.now_ms() else {
            host.event(Upstream::same(key), &Event::Untracked(Untracked::NoClock));
            return Admission::Untracked;
        };
        let grpc = reply::is_grpc(host.request_header("content-type").as_deref());
        self.retry_queued(RETRIES_PER_CALL, host);
        // A slot remembered from earlier may have gone to another key since (an idle breaker
        // evicted): then the key is looked up again, once.
        for _ in 0..2 {
            let i = match slot {
                Some(i) => i,
                None => match self.locate(key, breaker, now_ms, host) {
                    Some(i) => i,
                    None => return Admission::Untracked,
                },
            };
            self.check_stuck_slot(i, now_ms, host);
            let at = self.moment(now_ms);
            let cfg = self.config.breaker(breaker);
            let on_slot = match registry::admit(&mut self.store, i, key, cfg, at) {
                Ok(on_slot) => on_slot,
                Err(e) => {
                    host.event(Upstream::same(key), &Event::Untracked(Untracked::Store(e)));
                    return Admission::Untracked;
                }
            };
            // The remembered names move into the call: no second count on them.
            let names = match names.take() {
                Some(names) => names,
                None => self.names_or_ask(key, host),
            };
            let upstream = names.upstream();
            store_events(upstream, on_slot.retries, on_slot.corrupt, host);
            let Some(a) = on_slot.value else {
                self.forget_slot(key);
                slot = None;
                continue;
            };
            if gauge != Some(a.state) || a.transition.is_some() {
                self.state_seen(upstream, a.state, a.transition, host);
            }
            let call = Call {
                names,
                slot: i,
                breaker,
                ticket: Ticket {
                    generation: 0,
                    probe: false,
                },
                start_ms: now_ms,
                grpc,
                in_flight: None,
            };
            return self.decided(call, a.decision, host);
        }
        host.event(
            Upstream::same(key),
            &Event::Untracked(Untracked::TooManyUpstreams),
        );
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
                let names = self.names_or_ask(key, t);
                let upstream = names.upstream();
                store_events(upstream, retries, corrupt, t);
                if evicted {
                    t.event(upstream, &Event::Evicted);
                }
                self.entry(key).slot = Some(slot);
                Some(slot)
            }
            Err(why) => {
                t.event(Upstream::same(key), &Event::Untracked(why));
                None
            }
        }
    }

    /// `key` with its metric label, asked of the store the first time (when the key gets a slot).
    fn names_or_ask<T: Telemetry + ?Sized>(&mut self, key: &str, t: &mut T) -> Arc<Names> {
        if let Some(names) = &self.entry(key).names {
            return Arc::clone(names);
        }
        let limit = self
            .config
            .max_upstreams
            .saturating_mul(LABELS_PER_UPSTREAM);
        let label: Arc<str> = match self.store.label(key, limit) {
            Ok(Label::Own) => Arc::clone(&self.entry(key).key),
            Ok(Label::Other { first }) => {
                if first {
                    t.event(
                        Upstream {
                            key,
                            label: OTHER_LABEL,
                        },
                        &Event::OtherLabel { limit },
                    );
                }
                Arc::from(OTHER_LABEL)
            }
            Err(e) => {
                // Not knowing, the key must not risk a series of its own.
                let failed = StoreEvent::Failed {
                    during: "label",
                    error: e,
                };
                t.event(
                    Upstream {
                        key,
                        label: OTHER_LABEL,
                    },
                    &Event::Store(failed),
                );
                Arc::from(OTHER_LABEL)
            }
        };
        let entry = self.entry(key);
        let names = Arc::new(Names {
            key: Arc::clone(&entry.key),
            label,
        });
        entry.names = Some(Arc::clone(&names));
        names
    }

    fn forget_slot(&mut self, key: &str) {
        if let Some(e) = self.keys.get_mut(key) {
            e.slot = None;
            e.gauge = None;
        }
    }

    /// Keeps the state gauge on the stored state: it is set whenever this worker sees a state other
    /// than the one it last set, so a worker's stale view is corrected by the next call it admits
    /// (and by [`Worker::tick`], when no call comes).
    fn state_seen<T: Telemetry + ?Sized>(
        &mut self,
        upstream: Upstream<'_>,
        state: StateKind,
        transition: Option<Transition>,
        t: &mut T,
    ) {
        if let Some(tr) = transition {
            t.event(upstream, &Event::Transition(tr));
        }
        let entry = self.entry(upstream.key);
        let already = entry.gauge == Some(state) || transition.is_some_and(|tr| tr.to == state);
        entry.gauge = Some(state);
        if !already {
            t.event(upstream, &Event::State(state));
        }
    }

    fn decided<T: Telemetry + ?Sized>(
        &mut self,
        mut call: Call,
        decision: Decision,
        t: &mut T,
    ) -> Admission {
        match decision {
            Decision::Allow(ticket) => {
                call.ticket = ticket;
                t.event(
                    call.upstream(),
                    &Event::Admitted {
                        probe: ticket.probe,
                    },
                );
                call.in_flight = self.track(&call);
                Admission::Allow(call)
            }
            Decision::Reject(rejection) => {
                let reply = self.reply(
                    &call.names.key,
                    call.breaker,
                    call.grpc,
                    &rejection,
                    rejection.marker(),
                );
                Admission::Reject(Refusal {
                    reply,
                    rejection,
                    names: call.names,
                })
            }
            Decision::DryRunReject(r) => {
                t.event(call.upstream(), &Event::DryRun(r));
                Admission::DryRun(r)
            }
        }
    }

    /// The breaker's answer for a call of `key`, from the key's fixed parts (made once).
    fn reply(
        &mut self,
        key: &str,
        breaker: BreakerId,
        grpc: bool,
        rejection: &Rejection,
        marker: &'static str,
    ) -> LocalReply {
        let entry = self.entry(key);
        let parts = Arc::clone(
            entry
                .parts
                .get_or_insert_with(|| Arc::new(RejectParts::new(key))),
        );
        let fallback = self.config.breaker(breaker).fallback.as_ref();
        reply::rejection(grpc, &parts, marker, rejection.retry_after_ms, fallback)
    }

    /// Enters a call in the table of calls in flight, when its breaker tracks stuck calls.
    fn track(&mut self, call: &Call) -> Option<u64> {
        let after = self.config.breaker(call.breaker).stuck_call_duration_ms?;
        let pending = Pending {
            names: Arc::clone(&call.names),
            slot: call.slot,
            breaker: call.breaker,
            ticket: call.ticket,
            grpc: call.grpc,
            stream: None,
            stuck_after_ms: after,
            standing: Standing::Waiting,
        };
        Some(
            self.in_flight
                .track(pending, call.start_ms.saturating_add(after)),
        )
    }

    /// Whether the worker wants a handle on the call's stream: its breaker cuts stuck calls.
    pub fn wants_stream(&self, call: &Call) -> bool {
        call.in_flight.is_some() && self.config.breaker(call.breaker).cut_stuck_calls
    }

    /// Gives the call a handle on its stream (a context id, a scheduler...), by which the host will
    /// later deliver the answer to a cut ([`CutOrder::stream`]).
    pub fn attach_stream(&mut self, call: &Call, stream: u64) {
        if let Some(id) = call.in_flight {
            self.in_flight.attach_stream(id, stream);
        }
    }

    /// The call's response headers came: it can no longer be stuck, so it leaves the table of calls
    /// in flight (unless it was recorded as stuck already, which its record will find).
    pub fn headers_came(&mut self, call: &mut Call) {
        if let Some(id) = call.in_flight {
            if self.in_flight.headers_came(id) {
                call.in_flight = None;
            }
        }
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
        if let Some(id) = call.in_flight {
            if self.in_flight.settle(id) == Settled::Recorded {
                return;
            }
        }
        let retry = Retry {
            names: call.names,
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

    /// The stream of a call ended without its session settling it (a host that lost it): it leaves
    /// the table, so that nothing is ever delivered to its stream again.
    pub fn forget(&mut self, call: &Call) {
        if let Some(id) = call.in_flight {
            self.in_flight.settle(id);
        }
    }

    /// The health endpoint's reply: the breakers of the table (at most
    /// [`reply::MAX_HEALTH_ENTRIES`], those not closed first), or 503 and `unknown` when the store
    /// cannot be read. Never `healthy` without knowing.
    pub fn health(&mut self, now_ms: Option<u64>) -> LocalReply {
        match registry::health(&mut self.store, now_ms, reply::MAX_HEALTH_ENTRIES) {
            Ok(h) => reply::health(&h),
            Err(e) => reply::health_unknown(&e.to_string()),
        }
    }
}

#[cfg(test)]
mod tests;
