//! What a replay found: the [`Report`] and its parts, as the table, JSON and SVG show them.

use std::collections::BTreeMap;

use cb_core::breaker::StateKind;
use cb_core::classify::Classification;
use serde::Serialize;

/// What the breaker would have done to the input.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Report {
    /// Where the calls came from.
    pub source: String,
    /// Calls replayed.
    pub calls: u64,
    /// Lines of the input that were skipped.
    pub malformed_lines: usize,
    /// Start of the input: the first call, or the scenario's start (ms since the epoch).
    pub start_ms: u64,
    /// Start of the input (RFC 3339).
    pub start: String,
    /// End of the input: the end of the last call, or of the scenario (ms).
    pub end_ms: u64,
    /// End (RFC 3339).
    pub end: String,
    /// The configuration's `upstream_key`.
    pub upstream_key: String,
    /// The `--blip` threshold in ms.
    pub blip_threshold_ms: u64,
    /// Calls that passed without a breaker, by reason (`no_key`, `too_many_upstreams`, `key_too_long`,
    /// `disabled`, `store_error`).
    pub untracked: BTreeMap<String, u64>,
    /// One entry per upstream key, sorted by key.
    pub upstreams: Vec<UpstreamReport>,
}

/// One upstream's replay.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct UpstreamReport {
    /// The upstream key.
    pub upstream: String,
    /// The breaker's `mode`.
    pub mode: String,
    /// Calls to it in the input.
    pub calls: u64,
    /// Calls the breaker would have let through.
    pub allowed: u64,
    /// Calls it would have rejected (`enforce`, `forced_open`).
    pub rejected: u64,
    /// Calls `dry_run` would have rejected (let through, not recorded).
    pub dry_run_rejections: u64,
    /// Of the rejected (or dry-run rejected) calls: how many failed in the log anyway.
    pub rejected_would_have_failed: u64,
    /// Of the rejected (or dry-run rejected) calls: how many succeeded in the log.
    pub rejected_would_have_succeeded: u64,
    /// Failures among the calls let through and recorded.
    pub failures_let_through: u64,
    /// Failures among all its calls in the log.
    pub log_failures: u64,
    /// Slow calls among all its calls in the log (0 when slow-call tracking is off).
    pub log_slow_calls: u64,
    /// Calls that passed without a breaker (`disabled`, too many upstreams...).
    pub untracked: u64,
    /// The state at the end of the input.
    pub final_state: String,
    /// Every state change, in order.
    pub transitions: Vec<TransitionReport>,
    /// Each stretch from a trip (Closed → Open) to the next close.
    pub open_periods: Vec<OpenPeriod>,
    /// Open periods that were blips.
    pub blips: u64,
    /// `(time, state from then on)`, for the SVG.
    #[serde(skip)]
    pub states: Vec<(u64, StateKind)>,
    /// `(end time, verdict, duration)` of every call in the log, for the SVG and the blip measure.
    #[serde(skip)]
    pub(crate) samples: Vec<(u64, Classification, u64)>,
}

/// One state change.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct TransitionReport {
    /// When (ms since the epoch).
    pub at_ms: u64,
    /// When (RFC 3339).
    pub at: String,
    /// Ms since the start of the input.
    pub offset_ms: u64,
    /// State before.
    pub from: String,
    /// State after.
    pub to: String,
    /// Why (the contract's reason names).
    pub reason: String,
}

/// From a trip to the close that ends it (through any number of HalfOpen → Open re-opens).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct OpenPeriod {
    /// When it opened (ms).
    pub opened_at_ms: u64,
    /// When it opened (RFC 3339).
    pub opened_at: String,
    /// Why it opened.
    pub reason: String,
    /// When the first probes were let through (ms), if ever.
    pub first_probe_at_ms: Option<u64>,
    /// When it closed (ms); `None` when still open or half-open at the end of the input.
    pub closed_at_ms: Option<u64>,
    /// When it closed (RFC 3339).
    pub closed_at: Option<String>,
    /// Time not closed, ms (to the end of the input when it never closed).
    pub open_ms: u64,
    /// Failed probes that opened it again.
    pub reopens: u32,
    /// Calls rejected (or dry-run rejected) during it.
    pub rejected: u64,
    /// Length of the failure episode behind the trip, ms (see the module docs); `None` for a forced
    /// opening.
    pub failure_episode_ms: Option<u64>,
    /// The failure episode was shorter than the blip threshold.
    pub blip: bool,
}
