//! Running calls through the breaker core, and what it did: the [`Report`].
//!
//! # What it does
//!
//! Each call of the input is a stream of the core's [`cb_core::session::Session`], over a host that
//! shows it the logged request and response ([`super::proxy`]): admitted at its start and, if the
//! breaker let it through, settled as its response headers, its trailers and its end come, or when it
//! becomes stuck. The moments run in time order ([`super::run`]), so overlapping calls interleave as
//! they did on the wire, and every outcome is the one the filter would have recorded, when it would
//! have recorded it.
//!
//! A call the breaker would have rejected never reaches the upstream, so its logged outcome is not
//! recorded (the breaker would not have learnt it); the report counts how many of those would have
//! failed anyway and how many would have succeeded (the price of the breaker), by what the filter
//! records for each call when it lets it through ([`super::proxy::judge`]).
//!
//! # Blips
//!
//! A trip (Closed → Open) is reported as a *blip* when the failure episode that caused it lasted less
//! than `--blip` (default 10s). The episode is measured on the log, over every call to the upstream,
//! also those the breaker would have rejected (the log is the ground truth about the upstream): in
//! one-second buckets of the times the calls are recorded, a second is *bad* when its failure fraction
//! reaches the upstream's `error_rate_threshold` (or, with slow-call tracking on, its slow fraction
//! reaches `slow_call_rate_threshold`). The episode is the run of bad seconds that contains the last
//! second with calls at or before the trip; seconds without calls neither break nor extend a run. A
//! trip whose second is not bad (a handful of failures among many successes) has an episode of 0s: a
//! blip.
//!

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use cb_core::breaker::{StateKind, Transition};
use cb_core::classify::Outcome;
use cb_core::config::{BreakerConfig, FilterConfig};
use cb_core::telemetry::Event;

use super::episodes::{failure_episode_ms, second_buckets};
use super::log::{format_rfc3339_ms, Call};
use super::proxy::{judge_all, Admit, Judged, Proxy};
pub use super::report::{OpenPeriod, Report, TransitionReport, UpstreamReport};
use super::run::{run, Observer};

/// Default `--blip`: a trip whose failure episode lasted less than this is reported as a blip.
pub const DEFAULT_BLIP_MS: u64 = 10_000;
/// Default `--seed`.
pub const DEFAULT_SEED: u64 = 1;

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
    /// `--seed`: where the proxy's randomness comes from (`open_timeout_jitter`).
    pub seed: u64,
}

impl Default for Options {
    fn default() -> Self {
        Self {
            source: String::new(),
            malformed_lines: 0,
            blip_ms: DEFAULT_BLIP_MS,
            span_ms: None,
            seed: DEFAULT_SEED,
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

    fn reject(&mut self, judged: Option<Judged>, dry_run: bool) {
        if dry_run {
            self.report.dry_run_rejections += 1;
        } else {
            self.report.rejected += 1;
        }
        match judged.map(|j| j.verdict.outcome) {
            Some(Outcome::Failure) => self.report.rejected_would_have_failed += 1,
            Some(Outcome::Success) => self.report.rejected_would_have_succeeded += 1,
            Some(Outcome::Ignored) | None => {}
        }
        if let Some(p) = self
            .current
            .and_then(|i| self.report.open_periods.get_mut(i))
        {
            p.rejected += 1;
        }
    }
}

/// Replays calls through the breaker core under `config` and reports what it would have done.
pub fn simulate(calls: &[Call], config: &FilterConfig, opts: &Options) -> Report {
    simulate_judged(calls, config, opts, &judge_all(config, calls))
}

/// [`simulate`], with what the filter records for each call (`judged`, one per call, from
/// [`super::proxy::judge_all`]) already known: `--tune` replays the same calls many times.
pub fn simulate_judged(
    calls: &[Call],
    config: &FilterConfig,
    opts: &Options,
    judged: &[Option<Judged>],
) -> Report {
    // Each key once, with its settings and its track; a call knows its key by index, so the loop
    // never hashes, compares or allocates a key.
    let mut index: HashMap<String, usize> = HashMap::new();
    let mut keys: Vec<(String, &BreakerConfig)> = Vec::new();
    // Calls to one upstream come in runs (all of them, when `--tune` replays one upstream): the key
    // of the call before is compared first, which is much cheaper than hashing it again.
    let mut last: Option<usize> = None;
    let slots: Vec<Option<usize>> = calls
        .iter()
        .map(|c| {
            let key = c.upstream_key_str(&config.upstream_key)?;
            let same = last.filter(|s| keys.get(*s).is_some_and(|(k, _)| *k == *key));
            let slot = match same.or_else(|| index.get(key.as_ref()).copied()) {
                Some(slot) => slot,
                None => {
                    keys.push((key.to_string(), config.breaker_for(&key)));
                    index.insert(key.into_owned(), keys.len() - 1);
                    keys.len() - 1
                }
            };
            last = Some(slot);
            Some(slot)
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

    let mut tally = Tally {
        tracks: keys.iter().map(|(k, cfg)| Track::new(k, cfg)).collect(),
        untracked: BTreeMap::new(),
        slots: &slots,
        index: &index,
        judged,
        start_ms,
    };
    let mut proxy = Proxy::new(Arc::new(config.clone()), proxy_seed(opts.seed, 0));
    run(
        calls,
        0..calls.len(),
        &mut proxy,
        &config.upstream_key,
        &mut tally,
    );
    let (mut tracks, untracked) = (tally.tracks, tally.untracked);

    // The ground truth about each upstream: every logged call, whatever the breaker did with it.
    for ((call, slot), judged) in calls.iter().zip(&slots).zip(judged) {
        let (Some(track), Some(j)) = (slot.and_then(|s| tracks.get_mut(s)), judged) else {
            continue;
        };
        track.report.log_failures += u64::from(j.verdict.outcome == Outcome::Failure);
        track.report.log_slow_calls += u64::from(j.verdict.slow);
        track
            .report
            .samples
            .push((j.at_ms, j.verdict, call.duration_ms));
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

/// The seed of proxy `n` of a run seeded with `seed`: distinct for every proxy, the same on every run.
pub(crate) fn proxy_seed(seed: u64, n: u64) -> u64 {
    // splitmix64 of the pair: nearby seeds and proxy numbers give unrelated streams.
    let mut z = seed
        .wrapping_mul(0x9E37_79B9_7F4A_7C15)
        .wrapping_add(n.wrapping_add(1).wrapping_mul(0xD1B5_4A32_D192_ED03));
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// The report being built as the replay goes: one [`Track`] per upstream key.
struct Tally<'a> {
    tracks: Vec<Track>,
    untracked: BTreeMap<String, u64>,
    /// Each call's track.
    slots: &'a [Option<usize>],
    /// Each key's track.
    index: &'a HashMap<String, usize>,
    judged: &'a [Option<Judged>],
    start_ms: u64,
}

impl Tally<'_> {
    fn track(&mut self, i: usize) -> Option<&mut Track> {
        let slot = self.slots.get(i).copied().flatten()?;
        self.tracks.get_mut(slot)
    }
}

impl Track {
    /// What the core said about this upstream: state changes, and outcomes recorded.
    fn heard(&mut self, events: &[Event], at_ms: u64, input_start_ms: u64) {
        for e in events {
            match e {
                Event::Transition(t) => self.apply(*t, at_ms, input_start_ms),
                Event::Recorded {
                    outcome: Outcome::Failure,
                    ..
                } => self.report.failures_let_through += 1,
                _ => {}
            }
        }
    }
}

impl Observer for Tally<'_> {
    fn admitted(&mut self, at_ms: u64, i: usize, admit: Admit, events: &[Event]) {
        let (start, judged) = (self.start_ms, self.judged.get(i).copied().flatten());
        let Some(track) = self.track(i) else {
            *self.untracked.entry("no_key".into()).or_default() += 1;
            return;
        };
        track.report.calls += 1;
        // Events first: a transition at admission (Open → HalfOpen) comes before the decision.
        track.heard(events, at_ms, start);
        let why = match admit {
            Admit::Allow => {
                track.report.allowed += 1;
                return;
            }
            Admit::Reject => return track.reject(judged, false),
            Admit::DryRun => return track.reject(judged, true),
            Admit::Untracked(why) => why,
        };
        track.report.untracked += 1;
        *self.untracked.entry(why.into()).or_default() += 1;
    }

    fn settled(&mut self, at_ms: u64, i: usize, events: &[Event]) {
        let start = self.start_ms;
        if let Some(track) = self.track(i) {
            track.heard(events, at_ms, start);
        }
    }

    fn stuck(&mut self, at_ms: u64, events: &[(String, Event)]) {
        for (key, e) in events {
            let slot = self.index.get(key).copied();
            if let Some(track) = slot.and_then(|s| self.tracks.get_mut(s)) {
                track.heard(std::slice::from_ref(e), at_ms, self.start_ms);
            }
        }
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
