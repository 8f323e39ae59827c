//! One Envoy of the replay: the breaker core's [`Worker`] over its own breaker table, and each logged
//! call driven through the core's [`Session`] as Envoy would have shown it to the filter. The replay,
//! the fleet and the ground truth ([`judge`]) all go through here, so every decision, and what every
//! call counts as, is the filter's own (contract section 3): nothing in `simulate` classifies a call.
//!
//! To the filter, a logged call is up to four [`Moment`]s:
//! - its request, at its start: admission;
//! - its response headers, if any came ([`Call::response_headers_after_ms`]). They complete an HTTP
//!   response, and a gRPC one whose headers came at its end without a cancel (trailers-only: the
//!   `grpc-status` is in them);
//! - the stuck-call check, `stuck_call_duration` after the start of a call still going then (the
//!   filter's tick runs it within 100 ms; the replay at that very moment). The core decides whether
//!   the call is stuck;
//! - its end: the trailers of a gRPC call that completed after its headers, with the logged
//!   `grpc-status`, then the end of the stream (`on_log`), where the core reads Envoy's response code
//!   and flags and the request's `grpc-timeout`.
//!
//! A cancelled stream (flags `DC`, `DR`) never completed its response, whatever came before.

use std::collections::HashMap;
use std::sync::Arc;

use cb_core::classify::Classification;
use cb_core::config::FilterConfig;
use cb_core::host::{Action, Host};
use cb_core::registry::Untracked;
use cb_core::reply::LocalReply;
use cb_core::session::Session;
use cb_core::store::LocalStore;
use cb_core::telemetry::{Event, Level, Series, Telemetry, Upstream};
use cb_core::worker::Worker;

use super::log::Call;

/// What happens to a call, in the order the replay runs them when they fall on the same millisecond:
/// what a response says is heard before a new call is admitted (a caller that saw the fifth failure
/// come back can only call again afterwards), and a call that answered at its stuck moment is not
/// stuck.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub(crate) enum Moment {
    /// The response headers.
    Headers,
    /// The trailers, if any, and the end of the stream.
    End,
    /// The stuck-call check.
    Stuck,
    /// The request: admission.
    Admit,
}

/// What the core decided on a new call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Admit {
    /// Let through; the core settles it later.
    Allow,
    /// Rejected (`enforce`, `forced_open`).
    Reject,
    /// Would have been rejected (`dry_run`): let through, not recorded.
    DryRun,
    /// Passed without a breaker, and why (`disabled`, `too_many_upstreams`...).
    Untracked(&'static str),
}

impl Admit {
    /// The call reached the upstream.
    pub(crate) fn reached_upstream(self) -> bool {
        self != Admit::Reject
    }
}

/// How a logged call's response reached the filter.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Response {
    /// Response headers came, this long after the start.
    headers_after_ms: Option<u64>,
    /// They completed the response (HTTP, or trailers-only gRPC).
    headers_complete_it: bool,
    /// Trailers with the logged `grpc-status` came at the end.
    trailers: bool,
}

impl Response {
    fn of(call: &Call) -> Self {
        let headers_after_ms = call.response_headers_after_ms();
        let completed = !call.response_flags.downstream_cancelled();
        let at_end = headers_after_ms == Some(call.duration_ms);
        let trailers_only = call.grpc && completed && at_end;
        Self {
            headers_after_ms,
            headers_complete_it: !call.grpc || trailers_only,
            trailers: call.grpc && completed && !at_end && call.grpc_status.is_some(),
        }
    }
}

/// The moments of a call let through, after its admission, with their times, in the order they run.
/// `stuck_ms` is its breaker's `stuck_call_duration`.
pub(crate) fn moments(call: &Call, stuck_ms: Option<u64>) -> [Option<(u64, Moment)>; 3] {
    let headers = Response::of(call)
        .headers_after_ms
        .map(|ms| (call.start_ms.saturating_add(ms), Moment::Headers));
    // Only a call still going then can be stuck; whether it is (no response headers yet) is the
    // core's rule.
    let stuck = stuck_ms
        .filter(|ms| *ms <= call.duration_ms)
        .map(|ms| (call.start_ms.saturating_add(ms), Moment::Stuck));
    let mut all = [headers, stuck, Some((call.end_ms(), Moment::End))];
    all.sort_by_key(|m| m.unwrap_or((u64::MAX, Moment::Admit)));
    all
}

/// One logged call's stream, as the filter would have seen it in Envoy at one moment.
struct StreamHost<'a> {
    call: &'a Call,
    now_ms: u64,
    /// The response headers have come.
    headers: bool,
    /// ... and completed the response: the `grpc-status` is in them.
    trailers_only: bool,
    /// The trailers have come.
    trailers: bool,
    events: Vec<Event>,
}

impl<'a> StreamHost<'a> {
    fn at(call: &'a Call, now_ms: u64, moment: Moment) -> Self {
        let r = Response::of(call);
        let headers = moment != Moment::Admit && r.headers_after_ms.is_some();
        Self {
            call,
            now_ms,
            headers,
            trailers_only: headers && r.headers_complete_it && call.grpc,
            trailers: moment == Moment::End && r.trailers,
            events: Vec::new(),
        }
    }
}

impl Telemetry for StreamHost<'_> {
    fn add(&mut self, _: &Series<'_>, _: u64) {}
    fn set(&mut self, _: &Series<'_>, _: u64) {}
    fn log(&mut self, _: Level, _: &str) {}
    fn event(&mut self, _: Upstream<'_>, event: &Event) {
        self.events.push(event.clone());
    }
}

impl Host for StreamHost<'_> {
    fn now_ms(&mut self) -> Option<u64> {
        Some(self.now_ms)
    }
    fn request_header(&mut self, name: &str) -> Option<Vec<u8>> {
        let c = self.call;
        let value = match name {
            "content-type" => c.grpc.then(|| "application/grpc".to_string()),
            ":path" => c.path.clone(),
            ":authority" => c.authority.clone(),
            ":method" => c.method.clone(),
            "grpc-timeout" => c.grpc_timeout.clone(),
            other => c.fields.get(other).cloned(),
        };
        value.map(String::into_bytes)
    }
    fn response_header(&mut self, name: &str) -> Option<Vec<u8>> {
        if !self.headers {
            return None;
        }
        match name {
            ":status" => self.call.response_code.map(|c| c.to_string().into_bytes()),
            "grpc-status" if self.trailers_only => {
                self.call.grpc_status.map(|c| c.to_string().into_bytes())
            }
            _ => None,
        }
    }
    fn response_trailer(&mut self, name: &str) -> Option<Vec<u8>> {
        match name {
            "grpc-status" if self.trailers => {
                self.call.grpc_status.map(|c| c.to_string().into_bytes())
            }
            _ => None,
        }
    }
    fn cluster_name(&mut self) -> Option<Vec<u8>> {
        self.call.upstream_cluster.clone().map(String::into_bytes)
    }
    fn response_code(&mut self) -> Option<u16> {
        self.call.response_code
    }
    fn response_flags(&mut self) -> Option<u64> {
        Some(self.call.response_flags.0)
    }
    fn set_request_header(&mut self, _: &str, _: &str) {}
    fn add_response_header(&mut self, _: &str, _: &str) {}
    fn send_reply(&mut self, _: LocalReply) -> bool {
        true
    }
}

/// The events of a moment that belongs to no stream (the stuck-call check), with their upstream.
#[derive(Default)]
struct KeyedEvents(Vec<(String, Event)>);

impl Telemetry for KeyedEvents {
    fn add(&mut self, _: &Series<'_>, _: u64) {}
    fn set(&mut self, _: &Series<'_>, _: u64) {}
    fn log(&mut self, _: Level, _: &str) {}
    fn event(&mut self, upstream: Upstream<'_>, event: &Event) {
        self.0.push((upstream.key.to_string(), event.clone()));
    }
}

/// One Envoy: one core worker over its own breaker table in memory, as the native module keeps it.
/// One worker is enough: on one Envoy every worker shares the same breaker state. A fleet is several
/// of these, which share nothing.
pub(crate) struct Proxy {
    worker: Worker<Box<LocalStore>>,
    /// The streams of the calls let through and not ended yet, by index of the call.
    streams: HashMap<usize, Session>,
}

impl Proxy {
    /// One Envoy serving `config`, loaded at time 0, with an empty breaker table.
    ///
    /// `seed` is the one place a proxy's randomness comes from (`open_timeout_jitter`): every proxy
    /// of a fleet gets its own, derived from `--seed`, so that runs repeat exactly.
    pub(crate) fn new(config: Arc<FilterConfig>, seed: u64) -> Self {
        let capacity = config.max_upstreams;
        Self::with_table(config, capacity, seed)
    }

    /// [`Proxy::new`] with a breaker table of `capacity` slots.
    fn with_table(config: Arc<FilterConfig>, capacity: u32, seed: u64) -> Self {
        Self {
            worker: Worker::new(config, 0, Box::new(LocalStore::new(capacity)), seed),
            streams: HashMap::new(),
        }
    }

    /// The `stuck_call_duration` of `key`'s breaker (resolved once per key by the worker).
    pub(crate) fn stuck_ms(&mut self, key: &str) -> Option<u64> {
        self.worker.settings(key).1.stuck_call_duration_ms
    }

    /// Call `i` starts at `at_ms`: what the core decided, and everything it said on the way.
    pub(crate) fn admit(&mut self, i: usize, call: &Call, at_ms: u64) -> (Admit, Vec<Event>) {
        let mut host = StreamHost::at(call, at_ms, Moment::Admit);
        let mut session = Session::new();
        // A log does not say when the request ended; a unary call sends it whole at once.
        let action = session.on_request(&mut self.worker, &mut host, true);
        let mut admit = Admit::Untracked("disabled");
        for e in &host.events {
            admit = match e {
                Event::Rejected(_) if action == Action::Stop => Admit::Reject,
                Event::DryRun(_) => Admit::DryRun,
                Event::Untracked(why) => Admit::Untracked(untracked_reason(why)),
                _ => continue,
            };
        }
        if session.in_flight() {
            admit = Admit::Allow;
            self.streams.insert(i, session);
        }
        (admit, host.events)
    }

    /// A later moment ([`Moment::Headers`] or [`Moment::End`]) of call `i`, let through by
    /// [`Proxy::admit`]: what the core said.
    pub(crate) fn step(&mut self, moment: Moment, i: usize, call: &Call, at_ms: u64) -> Vec<Event> {
        let mut host = StreamHost::at(call, at_ms, moment);
        let Some(session) = self.streams.get_mut(&i) else {
            return Vec::new();
        };
        match moment {
            Moment::Headers => {
                let complete = Response::of(call).headers_complete_it;
                session.on_response_headers(&mut self.worker, &mut host, complete);
            }
            Moment::End => {
                if host.trailers {
                    session.on_response_trailers(&mut self.worker, &mut host);
                }
                session.on_end(&mut self.worker, &mut host);
                self.streams.remove(&i);
            }
            Moment::Stuck | Moment::Admit => {}
        }
        host.events
    }

    /// The stuck-call check at `at_ms` (the worker's tick): what the core said, by upstream.
    ///
    /// The answers `cut_stuck_calls` orders are not delivered: a cut call's outcome is the stuck
    /// failure already recorded, and what its client would have done next is not in the log.
    pub(crate) fn check_stuck(&mut self, at_ms: u64) -> Vec<(String, Event)> {
        let mut sink = KeyedEvents::default();
        let _cuts = self.worker.tick(at_ms, &mut sink);
        sink.0
    }
}

fn untracked_reason(why: &Untracked) -> &'static str {
    match why {
        Untracked::TooManyUpstreams => "too_many_upstreams",
        Untracked::KeyTooLong => "key_too_long",
        Untracked::NoKey => "no_key",
        Untracked::NoClock => "no_clock",
        Untracked::ReplyFailed => "reply_failed",
        Untracked::Store(_) => "store_error",
    }
}

/// What the filter records for a call it lets through: the verdict, and when.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Judged {
    /// Success, failure or ignored; slow.
    pub verdict: Classification,
    /// When it is recorded (ms): at the response headers of an HTTP call, the end of a gRPC one, the
    /// stuck moment of a stuck one.
    pub at_ms: u64,
}

/// What the filter would record for `call` under `config`, had its breaker let it through having
/// seen nothing else: the ground truth a replay is compared with. The call runs alone through a
/// fresh proxy, by the same moments as in the replay. `None` when the filter records nothing for it:
/// no upstream key, or an upstream in `disabled` or `forced_open` mode (which never lets it through).
pub fn judge(config: &Arc<FilterConfig>, call: &Call) -> Option<Judged> {
    let key = call.upstream_key_str(&config.upstream_key)?;
    let key = key.as_ref();
    // A table of one slot: the call's own breaker, fresh.
    // No jitter is ever drawn: this breaker never opens.
    let mut proxy = Proxy::with_table(Arc::clone(config), 1, 0);
    let stuck_ms = proxy.stuck_ms(key);
    let (admit, _) = proxy.admit(0, call, call.start_ms);
    if admit != Admit::Allow {
        return None;
    }
    for (at_ms, moment) in moments(call, stuck_ms).into_iter().flatten() {
        let events = match moment {
            Moment::Stuck => proxy
                .check_stuck(at_ms)
                .into_iter()
                .map(|(_, e)| e)
                .collect(),
            m => proxy.step(m, 0, call, at_ms),
        };
        let recorded = events.iter().find_map(|e| match e {
            Event::Recorded { outcome, slow, .. } => Some(Classification {
                outcome: *outcome,
                slow: *slow,
            }),
            _ => None,
        });
        if let Some(verdict) = recorded {
            return Some(Judged { verdict, at_ms });
        }
    }
    None
}

/// [`judge`] of each call, in order.
pub fn judge_all(config: &FilterConfig, calls: &[Call]) -> Vec<Option<Judged>> {
    let config = Arc::new(config.clone());
    calls.iter().map(|c| judge(&config, c)).collect()
}
