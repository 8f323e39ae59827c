//! `simulate --tune`: per upstream, a search for the breaker settings that would have served the
//! logged traffic best, each candidate replayed through the same core as a plain `simulate`.
//!
//! What "best" means is [`OBJECTIVE`]; what counts as an outage or a blip is
//! [`super::episodes::find_episodes`]. The search moves five settings ([`Knobs`]) over fixed grids
//! (coordinate search: one setting at a time, keeping any change that scores better, until a pass
//! changes nothing), from two starting points, and replays at most [`MAX_REPLAYS`] candidates per
//! upstream: the time it takes is bounded by that many replays of the upstream's calls.
//!
//! A sixth setting, `stuck_call_duration`, is not searched but measured ([`STUCK_RULE`]): it is what
//! lets the breaker see a hang, and every candidate, and the episodes themselves, are judged with it.

use std::collections::BTreeMap;

use cb_core::classify::Outcome;
use cb_core::config::{glob_match, BreakerConfig, FilterConfig, Mode, WindowConfig};
use serde::Serialize;
use serde_json::{Map, Value};

use super::episodes::{find_episodes, Episodes, Outcomes};
use super::log::Call;
use super::proxy::{judge_all, Judged};
use super::replay::{simulate_judged, Options};
pub use super::tune_judge::{episode_of, judge, Catch, Effect};
use super::tune_search::search;

/// Default `--outage`: an episode at least this long is an outage the breaker must catch.
pub const DEFAULT_OUTAGE_MS: u64 = 30_000;
/// Most candidates replayed per upstream.
pub const MAX_REPLAYS: usize = 120;

/// The objective, as `--help` states it.
pub const OBJECTIVE: &str = "\
The recommendation, per upstream, is the candidate that best meets, in this order:
  1. every outage caught in time: the breaker opens within half of --outage after the outage began
     (or is open already);
  2. no needless trip: no trip on a blip, none in normal traffic (outside every episode);
  3. a margin, so that another day of the same traffic (which never repeats a log exactly) gets the
     same verdicts. As measured on the log (every call as if let through): every outage caught within
     a third of --outage, its window failure rate by then at least 1.25 x error_rate_threshold (or
     halfway from it to 100 %) or 1.25 x failure_threshold failures in a row, and that again within
     every third of --outage until it ends (a breaker that closes mid-outage is caught again in
     time); on every blip and in
     normal traffic, a window failure rate at most 2/3 of error_rate_threshold and at most 2/3 of
     failure_threshold failures in a row;
  4. fewest would-succeed calls rejected;
  5. fewest failures let through;
  6. closest to the defaults (fewest of the five settings changed).
Each priority narrows the candidates left by the ones before it (in 1, to those closest to catching
in time; in 3, to those short of the margin in fewest places); in 4 and 5, counts within 10 % (or 5
calls) of the fewest are taken as equal, so that small differences of one log do not outweigh the
next priority. When no candidate meets 1, 2 or 3, the report says which and why.";

/// How `stuck_call_duration` is recommended, as `--help` states it.
pub const STUCK_RULE: &str = "\
stuck_call_duration is not searched but measured: 3 x the 99.9th percentile (the slowest, with fewer
than 1000) of the time to response headers of the upstream's calls that succeeded, at least 1s,
rounded up to 100ms. Only a hang takes that long: healthy calls are that slow far less than once in a
thousand. An upstream whose settings have one keeps it unless it is shorter than that percentile.
Outages (a hang included: its calls are stuck failures) are found with it, and every candidate has it.";

/// `stuck_call_duration` is this many times the 99.9th percentile of the time to response headers.
pub const STUCK_FACTOR: u64 = 3;
/// ... at least this (ms).
pub const MIN_STUCK_MS: u64 = 1_000;

/// Settings of a tuning run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TuneOptions {
    /// Where the calls came from.
    pub source: String,
    /// Lines of the input that were skipped.
    pub malformed_lines: usize,
    /// An episode at least this long is an outage.
    pub outage_ms: u64,
    /// An episode shorter than this is a blip.
    pub blip_ms: u64,
}

impl Default for TuneOptions {
    fn default() -> Self {
        Self {
            source: String::new(),
            malformed_lines: 0,
            outage_ms: DEFAULT_OUTAGE_MS,
            blip_ms: super::replay::DEFAULT_BLIP_MS,
        }
    }
}

/// The five settings the search moves, and the measured `stuck_call_duration`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Knobs {
    /// `failure_threshold`.
    pub failure_threshold: u32,
    /// `error_rate_threshold`, in parts per million.
    pub error_rate_ppm: u32,
    /// `window_size` or `window_duration`.
    pub window: WindowConfig,
    /// `minimum_requests`.
    pub minimum_requests: u32,
    /// `open_timeout`, ms.
    pub open_timeout_ms: u64,
    /// `stuck_call_duration`, ms (not searched: see [`STUCK_RULE`]).
    pub stuck_call_duration_ms: Option<u64>,
}

impl Knobs {
    /// The knobs of a breaker's settings.
    pub fn of(cfg: &BreakerConfig) -> Self {
        Self {
            failure_threshold: cfg.failure_threshold,
            error_rate_ppm: cfg.error_rate_threshold_ppm,
            window: cfg.window,
            minimum_requests: cfg.minimum_requests,
            open_timeout_ms: cfg.open_timeout_ms,
            stuck_call_duration_ms: cfg.stuck_call_duration_ms,
        }
    }

    /// The fields in which `self` differs from `base`, as the filter configuration spells them.
    pub fn changes_from(&self, base: &Knobs) -> Map<String, Value> {
        let mut m = Map::new();
        if self.failure_threshold != base.failure_threshold {
            m.insert("failure_threshold".into(), self.failure_threshold.into());
        }
        if self.error_rate_ppm != base.error_rate_ppm {
            let ratio = f64::from(self.error_rate_ppm) / 1e6;
            m.insert("error_rate_threshold".into(), ratio.into());
        }
        if self.window != base.window {
            match self.window {
                WindowConfig::Count(n) => m.insert("window_size".into(), n.into()),
                WindowConfig::Time { duration_ms } => {
                    m.insert("window_duration".into(), duration(duration_ms).into())
                }
            };
        }
        if self.minimum_requests != base.minimum_requests {
            m.insert("minimum_requests".into(), self.minimum_requests.into());
        }
        if self.open_timeout_ms != base.open_timeout_ms {
            m.insert("open_timeout".into(), duration(self.open_timeout_ms).into());
        }
        if let Some(ms) = self
            .stuck_call_duration_ms
            .filter(|_| self.stuck_call_duration_ms != base.stuck_call_duration_ms)
        {
            m.insert("stuck_call_duration".into(), duration(ms).into());
        }
        m
    }

    /// How many of the five searched settings differ from `base`.
    pub fn distance(&self, base: &Knobs) -> usize {
        let mut changes = self.changes_from(base);
        changes.remove("stuck_call_duration");
        changes.len()
    }
}

/// A duration as the configuration spells it: `"10s"`, `"1500ms"`.
pub fn duration(ms: u64) -> String {
    if ms % 1000 == 0 {
        format!("{}s", ms / 1000)
    } else {
        format!("{ms}ms")
    }
}

/// A priority no candidate could meet, and why.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Unmet {
    /// 1, 2 or 3 (see [`OBJECTIVE`]).
    pub priority: u8,
    /// Why, in a sentence.
    pub why: String,
}

/// The tuning of one upstream.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct UpstreamTuning {
    /// The upstream key.
    pub upstream: String,
    /// Its calls in the input.
    pub calls: u64,
    /// How `stuck_call_duration` was measured; `None` when no call succeeded.
    pub stuck: Option<StuckAdvice>,
    /// Its noise and episodes.
    pub episodes: Episodes,
    /// Outages among the episodes.
    pub outages: usize,
    /// Blips among the episodes.
    pub blips: usize,
    /// The fields to set for it in `upstreams`; `None` keeps the base's settings.
    #[serde(rename = "override")]
    pub override_fields: Option<Map<String, Value>>,
    /// The recommended knobs.
    #[serde(skip)]
    pub recommended_knobs: Knobs,
    /// The base's knobs.
    #[serde(skip)]
    pub base_knobs: Knobs,
    /// What the recommendation would have done.
    pub recommended: Effect,
    /// What the base's settings would have done.
    pub base: Effect,
    /// Priorities the recommendation does not meet.
    pub unmet: Vec<Unmet>,
    /// Why it is what it is, in a sentence.
    pub note: String,
    /// Candidates replayed.
    pub replays: usize,
}

/// The result of `--tune`.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct TuneReport {
    /// The block to paste: the base's own `upstreams` entries, with each recommended override added
    /// (an entry for the same key replaced). Accepted by `FilterConfig::from_json` in the base.
    pub upstreams: Map<String, Value>,
    /// Where the calls came from.
    pub source: String,
    /// Calls read.
    pub calls: u64,
    /// Lines of the input that were skipped.
    pub malformed_lines: usize,
    /// `--outage`, ms.
    pub outage_ms: u64,
    /// `--blip`, ms.
    pub blip_ms: u64,
    /// The bound on candidates replayed per upstream.
    pub max_replays_per_upstream: usize,
    /// One per upstream, by key.
    pub results: Vec<UpstreamTuning>,
    /// Upstreams left as they are, and why (`mode` disabled or forced open).
    pub skipped: BTreeMap<String, String>,
}

/// The base configuration as the search needs it: validated, and as JSON to add overrides to.
#[derive(Debug, Clone)]
pub struct Base {
    /// The validated base.
    pub config: FilterConfig,
    /// Its JSON (an object).
    pub json: Map<String, Value>,
}

impl Base {
    /// Parses and validates a base configuration (empty text: the contract's defaults). The error
    /// names the field, as the filter's does.
    pub fn parse(text: &str) -> Result<Self, String> {
        let config = super::load_config(text)?;
        if text.trim().is_empty() {
            return Ok(Self {
                config,
                json: Map::new(),
            });
        }
        // The filter accepted it, so it is a JSON object.
        match serde_json::from_str::<Value>(text) {
            Ok(Value::Object(json)) => Ok(Self { config, json }),
            _ => Err("circuit breaker configuration rejected: not a JSON object".into()),
        }
    }

    fn upstreams(&self) -> Map<String, Value> {
        match self.json.get("upstreams") {
            Some(Value::Object(m)) => m.clone(),
            _ => Map::new(),
        }
    }

    /// The base's own override entry that applies to `key`, as the filter picks it: the exact key,
    /// else the longest matching glob (ties by pattern text).
    pub fn entry_for(&self, key: &str) -> Map<String, Value> {
        let upstreams = self.upstreams();
        let exact = upstreams.get(key);
        let glob = || {
            upstreams
                .iter()
                .filter(|(p, _)| p.contains('*') && glob_match(p, key))
                .min_by(|a, b| b.0.len().cmp(&a.0.len()).then(a.0.cmp(b.0)))
                .map(|(_, v)| v)
        };
        match exact.or_else(glob) {
            Some(Value::Object(m)) => m.clone(),
            _ => Map::new(),
        }
    }

    /// The override entry for `key` that gives it `knobs`: the base's entry for it with the changed
    /// fields set; `None` when nothing changes.
    pub fn override_for(&self, key: &str, knobs: &Knobs) -> Option<Map<String, Value>> {
        let base = Knobs::of(self.config.breaker_for(key));
        let changes = knobs.changes_from(&base);
        if changes.is_empty() {
            return None;
        }
        let mut entry = self.entry_for(key);
        if changes.contains_key("window_size") || changes.contains_key("window_duration") {
            entry.remove("window_size");
            entry.remove("window_duration");
        }
        entry.extend(changes);
        Some(entry)
    }

    /// The base with `upstreams[key]` set to `entry`, validated as the filter would.
    pub fn with_override(
        &self,
        key: &str,
        entry: Map<String, Value>,
    ) -> Result<FilterConfig, String> {
        let mut json = self.json.clone();
        let mut upstreams = self.upstreams();
        upstreams.insert(key.to_string(), Value::Object(entry));
        json.insert("upstreams".into(), Value::Object(upstreams));
        FilterConfig::from_value(Value::Object(json)).map_err(|e| e.to_string())
    }
}

/// Tunes every upstream of `calls` against `base`.
pub fn tune(calls: &[Call], base: &Base, opts: &TuneOptions) -> TuneReport {
    let mut results = Vec::new();
    let mut skipped = BTreeMap::new();
    for (key, calls) in by_key(calls, &base.config) {
        match base.config.breaker_for(&key).mode {
            // Nothing to tune: every call passes untracked, or every call is rejected.
            mode @ (Mode::Disabled | Mode::ForcedOpen) => {
                skipped.insert(key, format!("mode {}: not tuned", mode.as_str()));
            }
            _ => results.extend(tune_upstream(&key, &calls, base, opts)),
        }
    }
    let mut upstreams = base.upstreams();
    for r in &results {
        if let Some(fields) = &r.override_fields {
            upstreams.insert(r.upstream.clone(), Value::Object(fields.clone()));
        }
    }
    TuneReport {
        upstreams,
        source: opts.source.clone(),
        calls: calls.len() as u64,
        malformed_lines: opts.malformed_lines,
        outage_ms: opts.outage_ms,
        blip_ms: opts.blip_ms,
        max_replays_per_upstream: MAX_REPLAYS,
        results,
        skipped,
    }
}

/// Replays `calls` (all to `key`, with what the filter records for each: `judged`) under `config`,
/// and judges the result against `episodes`.
pub fn replay(
    key: &str,
    calls: &[Call],
    judged: &[Option<Judged>],
    config: &FilterConfig,
    episodes: &Episodes,
    opts: &TuneOptions,
) -> Option<Effect> {
    let report = simulate_judged(calls, config, &Options::default(), judged);
    let u = report.upstreams.iter().find(|u| u.upstream == key)?;
    Some(judge(
        u,
        episodes,
        &Knobs::of(config.breaker_for(key)),
        opts,
    ))
}

/// Each upstream's calls in `calls`, by key, as `config` keys them.
pub(crate) fn by_key(calls: &[Call], config: &FilterConfig) -> BTreeMap<String, Vec<Call>> {
    let mut by_key: BTreeMap<String, Vec<Call>> = BTreeMap::new();
    for c in calls {
        if let Some(k) = c.upstream_key(&config.upstream_key) {
            by_key.entry(k).or_default().push(c.clone());
        }
    }
    by_key
}

/// An upstream's episodes, from what the filter records for its calls (when, and whether it failed).
pub(crate) fn episodes_of(judged: &[Option<Judged>]) -> Episodes {
    let outcomes: Vec<(u64, bool)> = judged
        .iter()
        .flatten()
        .filter(|j| j.verdict.outcome != Outcome::Ignored)
        .map(|j| (j.at_ms, j.verdict.outcome == Outcome::Failure))
        .collect();
    find_episodes(Outcomes::new(outcomes))
}

/// What `config` would have done to each upstream of `calls`, judged as `--tune` judges: its
/// episodes, and the effect. For checking a recommendation on a log it was not tuned on.
pub fn evaluate(
    calls: &[Call],
    config: &FilterConfig,
    opts: &TuneOptions,
) -> BTreeMap<String, (Episodes, Effect)> {
    by_key(calls, config)
        .into_iter()
        .filter_map(|(key, calls)| {
            let judged = judge_all(config, &calls);
            let episodes = episodes_of(&judged);
            let effect = replay(&key, &calls, &judged, config, &episodes, opts)?;
            Some((key, (episodes, effect)))
        })
        .collect()
}

/// How `stuck_call_duration` was measured for one upstream (see [`STUCK_RULE`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct StuckAdvice {
    /// Calls that succeeded.
    pub successes: u64,
    /// The 99.9th percentile of their time to response headers (the slowest, with fewer than 1000),
    /// ms.
    pub p999_ms: u64,
    /// What [`STUCK_RULE`] makes of it, ms.
    pub rule_ms: u64,
    /// What is recommended, ms: the rule's, or the upstream's own when that is long enough.
    pub recommended_ms: u64,
}

/// `stuck_call_duration` for an upstream whose breaker has `current`, from its calls and what the
/// filter records for each; `None` when none succeeded.
pub fn stuck_advice(
    calls: &[Call],
    judged: &[Option<Judged>],
    current: Option<u64>,
) -> Option<StuckAdvice> {
    let mut latencies: Vec<u64> = calls
        .iter()
        .zip(judged)
        .filter(|(_, j)| j.is_some_and(|j| j.verdict.outcome == Outcome::Success))
        .filter_map(|(c, _)| c.response_headers_after_ms())
        .collect();
    latencies.sort_unstable();
    let n = latencies.len();
    // The value 99.9 % of the calls do not exceed: the slowest, below 1000 calls.
    let rank = (n * 999).div_ceil(1000).max(1);
    let p999_ms = *latencies.get(rank - 1)?;
    let rule_ms = (p999_ms * STUCK_FACTOR).max(MIN_STUCK_MS).div_ceil(100) * 100;
    Some(StuckAdvice {
        successes: n as u64,
        p999_ms,
        rule_ms,
        recommended_ms: current.filter(|ms| *ms >= p999_ms).unwrap_or(rule_ms),
    })
}

fn tune_upstream(
    key: &str,
    calls: &[Call],
    base: &Base,
    opts: &TuneOptions,
) -> Option<UpstreamTuning> {
    let cfg = base.config.breaker_for(key);
    let base_knobs = Knobs::of(cfg);
    let judged_base = judge_all(&base.config, calls);
    let stuck = stuck_advice(calls, &judged_base, cfg.stuck_call_duration_ms);
    let start_knobs = Knobs {
        stuck_call_duration_ms: stuck
            .map(|a| a.recommended_ms)
            .or(base_knobs.stuck_call_duration_ms),
        ..base_knobs
    };
    // The start: the upstream's own settings with the measured stuck_call_duration. What the filter
    // records under it is the ground truth for every candidate: a hang is then a run of failures.
    let start_config = base
        .override_for(key, &start_knobs)
        .and_then(|entry| base.with_override(key, entry).ok());
    let (start_knobs, judged) = match &start_config {
        Some(config) => (start_knobs, judge_all(config, calls)),
        None => (base_knobs, judged_base),
    };
    let episodes = episodes_of(&judged);
    let base_effect = replay(key, calls, &judged, &base.config, &episodes, opts)?;
    let start_effect = match &start_config {
        Some(config) => replay(key, calls, &judged, config, &episodes, opts)?,
        None => base_effect.clone(),
    };
    let outages = episodes
        .episodes
        .iter()
        .filter(|e| e.len_ms() >= opts.outage_ms)
        .count();
    let blips = episodes
        .episodes
        .iter()
        .filter(|e| e.len_ms() < opts.blip_ms)
        .count();
    let mut result = UpstreamTuning {
        upstream: key.to_string(),
        calls: calls.len() as u64,
        stuck,
        episodes: episodes.clone(),
        outages,
        blips,
        override_fields: base.override_for(key, &start_knobs),
        recommended_knobs: start_knobs,
        base_knobs,
        recommended: start_effect.clone(),
        base: base_effect,
        unmet: Vec::new(),
        note: String::new(),
        replays: 1 + usize::from(start_config.is_some()),
    };
    if outages == 0 && start_effect.needless_trips() == 0 {
        result.note = what(&result, outages);
        return Some(result);
    }
    let tried = search(
        key,
        calls,
        &judged,
        base,
        &episodes,
        opts,
        start_knobs,
        start_effect,
    );
    result.replays += tried.len() - 1;
    // Never empty: the start is the first candidate.
    let (best_knobs, best) = tried.best(opts)?;
    result.unmet = super::tune_search::unmet(&tried, (best_knobs, best), &episodes, opts);
    result.override_fields = base.override_for(key, &best_knobs);
    result.recommended_knobs = best_knobs;
    result.recommended = best.clone();
    let met = if result.unmet.is_empty() {
        "it meets every priority"
    } else {
        "it does not meet every priority (below)"
    };
    result.note = format!("{}; {met}", what(&result, outages));
    Some(result)
}

/// What the recommendation is, in words.
fn what(r: &UpstreamTuning, outages: usize) -> String {
    let thresholds = r.recommended_knobs.distance(&r.base_knobs) > 0;
    let stuck = r.recommended_knobs.stuck_call_duration_ms != r.base_knobs.stuck_call_duration_ms;
    let what = match (thresholds, outages, r.base.needless_trips()) {
        (false, 0, 0) => {
            "no outage in the log, and the defaults trip on nothing: keeps the defaults"
        }
        (false, 0, _) => "no outage in the log; the defaults are the best candidate: keeps them",
        (false, _, _) => "the defaults are the best candidate: keeps them",
        (true, 0, _) => "no outage in the log, but the defaults trip needlessly: an override",
        (true, _, _) => "an override",
    };
    let how = match (thresholds, stuck) {
        (false, false) => " (no override)",
        (false, true) => ", with stuck_call_duration added (see --help)",
        (true, true) => ", stuck_call_duration included",
        (true, false) => "",
    };
    format!("{what}{how}")
}
