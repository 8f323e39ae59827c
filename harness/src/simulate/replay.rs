//! Running calls through the breaker core, and what it did: the [`Report`].
//!
//! # What it does
//!
//! Each call of the input is two events: an *admit* at its start time and, if the breaker let it
//! through, a *record* of its outcome at its end (start + duration). The events run in time order
//! through a priority queue, so overlapping calls interleave as they did on the wire: a slow call that
//! started before an outage is recorded after the fast failures that tripped the breaker, exactly as the
//! filter would see it. At the same millisecond, outcomes are recorded before new calls are admitted
//! (a caller that saw a response come back can only call again afterwards), and ties keep log order.
//!
//! The decisions are the filter's own: each call is a stream of the core's [`Session`], over a host
//! that shows it the logged request and response (see [`Core`], the one type that drives it), so the
//! outcome is classified exactly as in Envoy from the logged response code, gRPC status, response
//! flags and duration.
//!
//! A call the breaker would have rejected never reaches the upstream, so its logged outcome is not
//! recorded (the breaker would not have learnt it); the report counts how many of those would have
//! failed anyway and how many would have succeeded (the price of the breaker).
//!
//! # Blips
//!
//! A trip (Closed → Open) is reported as a *blip* when the failure episode that caused it lasted less
//! than `--blip` (default 10s). The episode is measured on the log, over every call to the upstream,
//! also those the breaker would have rejected (the log is the ground truth about the upstream): in
//! one-second buckets of call end times, a second is *bad* when its failure fraction reaches the
//! upstream's `error_rate_threshold` (or, with slow-call tracking on, its slow fraction reaches
//! `slow_call_rate_threshold`). The episode is the run of bad seconds that contains the last second with
//! calls at or before the trip; seconds without calls neither break nor extend a run. A trip whose
//! second is not bad (a handful of failures among many successes) has an episode of 0s: a blip.
//!

use std::cmp::Reverse;
use std::collections::{BTreeMap, BinaryHeap, HashMap};

use std::sync::Arc;

use cb_core::breaker::{StateKind, Transition};
use cb_core::classify::{Classification, Outcome};
use cb_core::config::{BreakerConfig, FilterConfig};
use cb_core::host::{Action, Host};
use cb_core::registry::Untracked;
use cb_core::reply::LocalReply;
use cb_core::session::Session;
use cb_core::store::LocalStore;
use cb_core::telemetry::{Event, Level, Series, Telemetry, Upstream};
use cb_core::worker::Worker;

use super::episodes::{failure_episode_ms, second_buckets};
use super::log::{format_rfc3339_ms, Call};
pub use super::report::{OpenPeriod, Report, TransitionReport, UpstreamReport};

/// Default `--blip`: a trip whose failure episode lasted less than this is reported as a blip.
pub const DEFAULT_BLIP_MS: u64 = 10_000;

// ---------------------------------------------------------------------------------------------------
// Simulation
// ---------------------------------------------------------------------------------------------------

/// Settings of one replay.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Options {
    /// Where the calls came from, for the report.
    pub source: String,
    /// Lines of the input that were skipped.
    pub malformed_lines: usize,
    /// A trip whose failure episode lasted less than this is a blip.
    pub blip_ms: u64,
    /// The time range of the input, when it is known apart from the calls (a scenario's); the report
    /// covers it and every call.
    pub span_ms: Option<(u64, u64)>,
}

impl Default for Options {
    fn default() -> Self {
        Self {
            source: String::new(),
            malformed_lines: 0,
            blip_ms: DEFAULT_BLIP_MS,
            span_ms: None,
        }
    }
}

/// One upstream while replaying.
struct Track {
    report: UpstreamReport,
    state: StateKind,
    current: Option<usize>,
}

impl Track {
    fn new(upstream: &str, cfg: &BreakerConfig) -> Self {
        Self {
            report: UpstreamReport {
                upstream: upstream.to_string(),
                mode: cfg.mode.as_str().to_string(),
                calls: 0,
                allowed: 0,
                rejected: 0,
                dry_run_rejections: 0,
                rejected_would_have_failed: 0,
                rejected_would_have_succeeded: 0,
                failures_let_through: 0,
                log_failures: 0,
                log_slow_calls: 0,
                untracked: 0,
                final_state: String::new(),
                transitions: Vec::new(),
                open_periods: Vec::new(),
                blips: 0,
                states: Vec::new(),
                samples: Vec::new(),
            },
            state: StateKind::Closed,
            current: None,
        }
    }

    fn apply(&mut self, t: Transition, at_ms: u64, input_start_ms: u64) {
        self.report.transitions.push(TransitionReport {
            at_ms,
            at: format_rfc3339_ms(at_ms),
            offset_ms: at_ms.saturating_sub(input_start_ms),
            from: t.from.as_str().into(),
            to: t.to.as_str().into(),
            reason: t.reason.as_str().into(),
        });
        self.report.states.push((at_ms, t.to));
        self.state = t.to;
        match (t.from, t.to) {
            (StateKind::Closed, _) => {
                self.report.open_periods.push(OpenPeriod {
                    opened_at_ms: at_ms,
                    opened_at: format_rfc3339_ms(at_ms),
                    reason: t.reason.as_str().into(),
                    first_probe_at_ms: None,
                    closed_at_ms: None,
                    closed_at: None,
                    open_ms: 0,
                    reopens: 0,
                    rejected: 0,
                    failure_episode_ms: None,
                    blip: false,
                });
                self.current = Some(self.report.open_periods.len() - 1);
            }
            (from, to) => {
                let Some(p) = self
                    .current
                    .and_then(|i| self.report.open_periods.get_mut(i))
                else {
                    return;
                };
                match to {
                    StateKind::HalfOpen => {
                        p.first_probe_at_ms.get_or_insert(at_ms);
                    }
                    StateKind::Open if from == StateKind::HalfOpen => p.reopens += 1,
                    StateKind::Open => {}
                    StateKind::Closed => {
                        p.closed_at_ms = Some(at_ms);
                        p.closed_at = Some(format_rfc3339_ms(at_ms));
                        self.current = None;
                    }
                }
            }
        }
    }

    fn reject(&mut self, verdict: Classification, dry_run: bool) {
        if dry_run {
            self.report.dry_run_rejections += 1;
        } else {
            self.report.rejected += 1;
        }
        match verdict.outcome {
            Outcome::Failure => self.report.rejected_would_have_failed += 1,
            Outcome::Success => self.report.rejected_would_have_succeeded += 1,
            Outcome::Ignored => {}
        }
        if let Some(p) = self
            .current
            .and_then(|i| self.report.open_periods.get_mut(i))
        {
            p.rejected += 1;
        }
    }
}

/// The two things that happen to a call, in the order they happen at the same millisecond: an outcome
/// is recorded before a new call is admitted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum EventKind {
    Record,
    Admit,
}

/// What the core decided on a new call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Admit {
    /// Let through; its outcome is recorded when it ends.
    Allow,
    /// Rejected (`enforce`, `forced_open`).
    Reject,
    /// Would have been rejected (`dry_run`): let through, not recorded.
    DryRun,
    /// Passed without a breaker, and why (`disabled`, `too_many_upstreams`...).
    Untracked(&'static str),
}

/// One logged call as the filter would have seen it in Envoy: its request, then its response, and
/// the events the core produced for it.
struct ReplayHost<'a> {
    call: &'a Call,
    now_ms: u64,
    responded: bool,
    events: Vec<Event>,
}

impl Telemetry for ReplayHost<'_> {
    fn add(&mut self, _: &Series<'_>, _: u64) {}
    fn set(&mut self, _: &Series<'_>, _: u64) {}
    fn log(&mut self, _: Level, _: &str) {}
    fn event(&mut self, _: Upstream<'_>, event: &Event) {
        self.events.push(event.clone());
    }
}

impl Host for ReplayHost<'_> {
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
            other => c.fields.get(other).cloned(),
        };
        value.map(String::into_bytes)
    }
    fn response_header(&mut self, name: &str) -> Option<Vec<u8>> {
        if !self.responded {
            return None;
        }
        match name {
            ":status" => self.call.response_code.map(|c| c.to_string().into_bytes()),
            "grpc-status" => self.call.grpc_status.map(|c| c.to_string().into_bytes()),
            _ => None,
        }
    }
    fn response_trailer(&mut self, _: &str) -> Option<Vec<u8>> {
        None
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

/// The one place the replay drives the breaker core, as the filter does: each call is a stream of the
/// core's [`Session`], admitted when it starts and settled when it ends, over a host that shows the
/// logged call ([`ReplayHost`]). Everything else here only sees [`Admit`] and the transitions.
///
/// One worker is enough (on one Envoy all workers share the same breaker state), over the breaker
/// table in memory, as the native module keeps it: the replay runs hundreds of times in `--tune`.
struct Core {
    worker: Worker<Box<LocalStore>>,
    /// Per call (by index into the replayed calls): the stream of a call let through.
    sessions: Vec<Option<Session>>,
}

impl Core {
    fn new(config: &FilterConfig, calls: usize) -> Self {
        let table = Box::new(LocalStore::new(config.max_upstreams));
        Self {
            worker: Worker::new(Arc::new(config.clone()), 0, table, 0x5eed),
            sessions: (0..calls).map(|_| None).collect(),
        }
    }

    /// Call `i` starts at `at_ms`.
    fn admit(&mut self, i: usize, call: &Call, at_ms: u64) -> (Admit, Vec<Transition>) {
        let mut host = ReplayHost {
            call,
            now_ms: at_ms,
            responded: false,
            events: Vec::new(),
        };
        let mut session = Session::new();
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
            if let Some(slot) = self.sessions.get_mut(i) {
                *slot = Some(session);
            }
        }
        (admit, transitions(&host.events))
    }

    /// Call `i`, let through by [`Core::admit`], ends at `at_ms`: what it was recorded as, and the
    /// state changes its outcome caused. `None` for a call that was not let through.
    fn settle(
        &mut self,
        i: usize,
        call: &Call,
        at_ms: u64,
    ) -> Option<(Classification, Vec<Transition>)> {
        let mut session = self.sessions.get_mut(i)?.take()?;
        let mut host = ReplayHost {
            call,
            now_ms: at_ms,
            responded: call.response_code.is_some(),
            events: Vec::new(),
        };
        if host.responded {
            // As Envoy shows a logged response: its headers end it (trailers-only for gRPC).
            session.on_response_headers(&mut self.worker, &mut host, true);
        }
        session.on_end(&mut self.worker, &mut host);
        let recorded = host.events.iter().find_map(|e| match e {
            Event::Recorded { outcome, slow, .. } => Some(Classification {
                outcome: *outcome,
                slow: *slow,
            }),
            _ => None,
        })?;
        Some((recorded, transitions(&host.events)))
    }
}

fn transitions(events: &[Event]) -> Vec<Transition> {
    events
        .iter()
        .filter_map(|e| match e {
            Event::Transition(t) => Some(*t),
            _ => None,
        })
        .collect()
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

/// The events of a replay in the order they happen: by time, a record before an admit at the same
/// millisecond, ties in log order. Admits are known up front and sorted once; only the records of
/// calls in flight wait in a heap, which stays as small as the concurrency.
struct Events {
    admits: Vec<(u64, usize)>,
    next: usize,
    records: BinaryHeap<Reverse<(u64, usize)>>,
}

impl Events {
    fn new(calls: &[Call]) -> Self {
        let mut admits: Vec<(u64, usize)> = calls
            .iter()
            .enumerate()
            .map(|(i, c)| (c.start_ms, i))
            .collect();
        admits.sort_unstable();
        Self {
            admits,
            next: 0,
            records: BinaryHeap::new(),
        }
    }

    fn push_record(&mut self, at_ms: u64, i: usize) {
        self.records.push(Reverse((at_ms, i)));
    }

    fn pop(&mut self) -> Option<(u64, EventKind, usize)> {
        let admit = self.admits.get(self.next).copied();
        let record = self.records.peek().map(|Reverse(r)| *r);
        match (admit, record) {
            (Some((a, _)), Some((r, i))) if (r, EventKind::Record) <= (a, EventKind::Admit) => {
                self.records.pop();
                Some((r, EventKind::Record, i))
            }
            (None, Some((r, i))) => {
                self.records.pop();
                Some((r, EventKind::Record, i))
            }
            (Some((a, i)), _) => {
                self.next += 1;
                Some((a, EventKind::Admit, i))
            }
            (None, None) => None,
        }
    }
}

/// Replays calls through the breaker core under `config` and reports what it would have done.
pub fn simulate(calls: &[Call], config: &FilterConfig, opts: &Options) -> Report {
    let mut core = Core::new(config, calls.len());
    // Each key once, with its settings and its track; a call knows its key by index, so the loop
    // below never hashes, compares or allocates a key.
    let mut index: HashMap<&str, usize> = HashMap::new();
    let mut keys: Vec<(&str, &BreakerConfig)> = Vec::new();
    // Calls to one upstream come in runs (all of them, when `--tune` replays one upstream): the key
    // of the call before is compared first, which is much cheaper than hashing it again.
    let mut last: Option<(&str, usize)> = None;
    let slots: Vec<Option<usize>> = calls
        .iter()
        .map(|c| {
            let key = c.upstream_key_str(&config.upstream_key)?;
            let slot = match last {
                Some((k, slot)) if k == key => slot,
                _ => *index.entry(key).or_insert_with(|| {
                    keys.push((key, config.breaker_for(key)));
                    keys.len() - 1
                }),
            };
            last = Some((key, slot));
            Some(slot)
        })
        .collect();
    // What each call was, by the log: the ground truth the report compares the breaker with.
    let verdicts: Vec<Classification> = calls
        .iter()
        .zip(&slots)
        .map(|(c, slot)| {
            let cfg = slot.and_then(|s| keys.get(s)).map(|(_, cfg)| *cfg);
            c.classify(cfg.unwrap_or(config.defaults()))
        })
        .collect();
    let first = calls.iter().map(|c| c.start_ms).min();
    let last = calls.iter().map(Call::end_ms).max();
    let (start_ms, end_ms) = match (opts.span_ms, first, last) {
        (Some((s, e)), Some(f), Some(l)) => (s.min(f), e.max(l)),
        (Some(span), _, _) => span,
        (None, Some(f), Some(l)) => (f, l),
        _ => (0, 0),
    };

    let mut tracks: Vec<Track> = keys.iter().map(|(k, cfg)| Track::new(k, cfg)).collect();
    let mut untracked: BTreeMap<String, u64> = BTreeMap::new();
    let mut queue = Events::new(calls);
    while let Some((at, kind, i)) = queue.pop() {
        let slot = slots.get(i).copied().flatten();
        let (Some(_), Some(track), Some(verdict)) = (
            slot.and_then(|s| keys.get(s)),
            slot.and_then(|s| tracks.get_mut(s)),
            verdicts.get(i).copied(),
        ) else {
            if kind == EventKind::Admit {
                *untracked.entry("no_key".into()).or_default() += 1;
            }
            continue;
        };
        match kind {
            EventKind::Admit => {
                track.report.calls += 1;
                let Some(call) = calls.get(i) else {
                    continue;
                };
                let (admit, transitions) = core.admit(i, call, at);
                for t in transitions {
                    track.apply(t, at, start_ms);
                }
                match admit {
                    Admit::Allow => {
                        track.report.allowed += 1;
                        let end = calls.get(i).map_or(at, Call::end_ms);
                        queue.push_record(end, i);
                    }
                    Admit::Reject => track.reject(verdict, false),
                    Admit::DryRun => track.reject(verdict, true),
                    Admit::Untracked(why) => {
                        track.report.untracked += 1;
                        *untracked.entry(why.into()).or_default() += 1;
                    }
                }
            }
            EventKind::Record => {
                let Some(call) = calls.get(i) else {
                    continue;
                };
                let Some((outcome, transitions)) = core.settle(i, call, at) else {
                    continue;
                };
                if outcome.outcome == Outcome::Failure {
                    track.report.failures_let_through += 1;
                }
                for t in transitions {
                    track.apply(t, at, start_ms);
                }
            }
        }
    }

    // The ground truth about each upstream: every logged call, whatever the breaker did with it.
    for ((call, slot), verdict) in calls.iter().zip(&slots).zip(&verdicts) {
        let Some(track) = slot.and_then(|s| tracks.get_mut(s)) else {
            continue;
        };
        track.report.log_failures += u64::from(verdict.outcome == Outcome::Failure);
        track.report.log_slow_calls += u64::from(verdict.slow);
        track
            .report
            .samples
            .push((call.end_ms(), *verdict, call.duration_ms));
    }

    let mut upstreams: Vec<UpstreamReport> = tracks
        .into_iter()
        .zip(&keys)
        .map(|(track, (_, cfg))| finish(track, cfg, end_ms, opts.blip_ms))
        .collect();
    upstreams.sort_by(|a, b| a.upstream.cmp(&b.upstream));
    Report {
        source: opts.source.clone(),
        calls: calls.len() as u64,
        malformed_lines: opts.malformed_lines,
        start_ms,
        start: format_rfc3339_ms(start_ms),
        end_ms,
        end: format_rfc3339_ms(end_ms),
        upstream_key: config.upstream_key.to_string(),
        blip_threshold_ms: opts.blip_ms,
        untracked,
        upstreams,
    }
}

fn finish(mut track: Track, cfg: &BreakerConfig, end_ms: u64, blip_ms: u64) -> UpstreamReport {
    let buckets = second_buckets(&track.report.samples);
    let mut blips = 0;
    for p in &mut track.report.open_periods {
        p.open_ms = p
            .closed_at_ms
            .unwrap_or(end_ms)
            .saturating_sub(p.opened_at_ms);
        if p.reason != "forced" {
            let episode = failure_episode_ms(&buckets, cfg, p.opened_at_ms);
            p.failure_episode_ms = Some(episode);
            p.blip = episode < blip_ms;
            blips += u64::from(p.blip);
        }
    }
    track.report.blips = blips;
    track.report.final_state = track.state.as_str().into();
    track.report
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_come_before_admits_at_the_same_millisecond() {
        // Five failures end at t=10; the sixth call starts at t=10 and must already be rejected.
        let mut calls: Vec<Call> = (0..5)
            .map(|i| Call {
                start_ms: i,
                duration_ms: 10 - i,
                upstream_cluster: Some("a".into()),
                response_code: Some(503),
                ..Call::default()
            })
            .collect();
        calls.push(Call {
            start_ms: 10,
            duration_ms: 1,
            upstream_cluster: Some("a".into()),
            response_code: Some(200),
            ..Call::default()
        });
        let r = simulate(&calls, &FilterConfig::default(), &Options::default());
        let a = &r.upstreams[0];
        assert_eq!(
            (a.allowed, a.rejected, a.rejected_would_have_succeeded),
            (5, 1, 1)
        );
        assert_eq!(a.open_periods.len(), 1);
        assert_eq!(a.open_periods[0].opened_at_ms, 10);
    }
}
