//! Filter configuration: the JSON of the contract (section 2), parsed with serde into a raw form
//! ([`raw`]) and then *compiled* into the validated [`FilterConfig`] ([`validate`]); overrides are
//! looked up through [`overrides`].
//!
//! Validation is all-or-nothing: the first bad field produces a [`ConfigError`] that names the field
//! (with its path inside `upstreams`), the value that was given and what is allowed, and the whole
//! configuration is refused. The filter logs that one line and refuses the configuration.

mod error;
mod overrides;
mod raw;
mod validate;

use std::sync::Arc;

use serde::Deserialize;
use serde_json::Value;

pub use error::ConfigError;
pub use overrides::{glob_match, BreakerId};

use crate::classify::{GrpcCodeSet, HttpStatusSet};
use crate::key::UpstreamKey;
use overrides::Overrides;

/// Fields that only exist at the top level; everything else is a breaker field that `upstreams` can
/// override.
const TOP_LEVEL_ONLY: [&str; 5] = [
    "upstream_key",
    "upstreams",
    "health_path",
    "max_upstreams",
    "idle_timeout",
];

/// Upper bound for `max_upstreams`: each breaker takes one shared-data entry that the health endpoint
/// reads, and the whole table is created when a worker is configured.
pub const MAX_UPSTREAMS_LIMIT: u32 = 65_536;
/// `max_upstreams` when not given.
pub const DEFAULT_MAX_UPSTREAMS: u32 = 1024;
/// `idle_timeout` when not given: ten minutes.
pub const DEFAULT_IDLE_TIMEOUT_MS: u64 = 600_000;
/// Longest upstream key that gets a breaker. Longer keys (a hostile `header:` value) pass untracked,
/// refused before any lookup.
pub const MAX_KEY_LEN: usize = 512;
/// Most overrides accepted in `upstreams`: the config is copied into every worker, and a key's
/// settings are resolved once per worker and cached.
pub const MAX_OVERRIDES: usize = 10_000;

/// What the filter does with a breaker's decisions.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Mode {
    /// Reject calls while Open (and past the probe limit while HalfOpen).
    Enforce,
    /// Run the state machine and report what would have been rejected, but let everything through.
    DryRun,
    /// Reject every call, whatever the state (an operator's kill switch).
    ForcedOpen,
    /// Pass everything through and track nothing.
    Disabled,
}

impl Mode {
    /// The configuration spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            Mode::Enforce => "enforce",
            Mode::DryRun => "dry_run",
            Mode::ForcedOpen => "forced_open",
            Mode::Disabled => "disabled",
        }
    }
}

/// The sliding window rates are judged over.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WindowConfig {
    /// The last `n` calls (1..=1024).
    Count(u16),
    /// The calls of the last `duration_ms` milliseconds.
    Time {
        /// Window length in milliseconds.
        duration_ms: u64,
    },
}

/// A response sent instead of the default rejection. Its parts are shared, so that sending it copies
/// no text.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Fallback {
    /// HTTP status of the fallback response.
    pub status: u16,
    /// Headers, in the order given.
    pub headers: Vec<(Arc<str>, Arc<str>)>,
    /// Body.
    pub body: Arc<str>,
    /// The body percent-encoded as a `grpc-message`, for a gRPC call (`None` when the body is empty).
    pub grpc_message: Option<Arc<str>>,
}

impl Fallback {
    /// A fallback of `status`, `headers` (lower-case names) and `body`.
    pub fn new(status: u16, headers: Vec<(String, String)>, body: String) -> Self {
        Self {
            status,
            headers: headers
                .into_iter()
                .map(|(k, v)| (Arc::from(k), Arc::from(v)))
                .collect(),
            grpc_message: (!body.is_empty())
                .then(|| Arc::from(crate::reply::percent_encode(&body))),
            body: Arc::from(body),
        }
    }
}

/// Validated settings of one breaker (the defaults, or the defaults with an override applied).
#[derive(Debug, Clone, PartialEq)]
pub struct BreakerConfig {
    /// Consecutive failures that open the breaker; 0 turns the trigger off.
    pub failure_threshold: u32,
    /// Failure fraction that opens the breaker, in parts per million (see [`ratio_to_ppm`]).
    pub error_rate_threshold_ppm: u32,
    /// The sliding window.
    pub window: WindowConfig,
    /// Calls in the window before rates are judged.
    pub minimum_requests: u32,
    /// A call at least this long (ms) is slow; `None` turns slow-call tracking off.
    pub slow_call_duration_ms: Option<u64>,
    /// Slow fraction that opens the breaker, in parts per million.
    pub slow_call_rate_threshold_ppm: u32,
    /// A call still waiting for its complete response after this long (ms) is recorded as a failure
    /// then; `None` turns it off.
    pub stuck_call_duration_ms: Option<u64>,
    /// While the breaker is Open or HalfOpen, answer this upstream's stuck calls at once (contract
    /// section 4, `x-circuit-breaker: cut`). Only with `stuck_call_duration`.
    pub cut_stuck_calls: bool,
    /// Time Open before probes are let through, in ms.
    pub open_timeout_ms: u64,
    /// Factor applied to the open time on each re-open straight from HalfOpen.
    pub backoff_multiplier: f64,
    /// Ceiling of the backed-off open time, in ms.
    pub max_open_timeout_ms: u64,
    /// Each opening adds a random extra of up to this fraction of the open time (after backoff), in
    /// parts per million, so that a fleet's probes do not arrive together.
    pub open_timeout_jitter_ppm: u32,
    /// After HalfOpen closes the breaker, admit a share of calls rising from 10 % to all over this
    /// long (ms); `None`: all calls at once.
    pub recovery_ramp_ms: Option<u64>,
    /// Probes in flight at once in HalfOpen, across all workers.
    pub half_open_max_requests: u16,
    /// Successful probes that close the breaker.
    pub success_threshold: u16,
    /// gRPC statuses that count as failures.
    pub failure_grpc_statuses: GrpcCodeSet,
    /// HTTP statuses that count as failures (non-gRPC responses).
    pub failure_http_statuses: HttpStatusSet,
    /// Upstream timeout asked of the router, in ms.
    pub call_timeout_ms: Option<u64>,
    /// What the breaker's decisions do.
    pub mode: Mode,
    /// Response sent instead of the default rejection.
    pub fallback: Option<Fallback>,
}

impl Default for BreakerConfig {
    fn default() -> Self {
        Self {
            failure_threshold: 5,
            error_rate_threshold_ppm: 500_000,
            window: WindowConfig::Count(100),
            minimum_requests: 20,
            slow_call_duration_ms: None,
            slow_call_rate_threshold_ppm: 1_000_000,
            stuck_call_duration_ms: None,
            cut_stuck_calls: false,
            open_timeout_ms: 60_000,
            backoff_multiplier: 1.0,
            max_open_timeout_ms: 300_000,
            open_timeout_jitter_ppm: 0,
            recovery_ramp_ms: None,
            half_open_max_requests: 1,
            success_threshold: 2,
            failure_grpc_statuses: GrpcCodeSet::default_failures(),
            failure_http_statuses: HttpStatusSet::server_errors(),
            call_timeout_ms: None,
            mode: Mode::Enforce,
            fallback: None,
        }
    }
}

#[cfg(test)]
thread_local! {
    /// Times [`FilterConfig::resolve`] ran on this thread, whoever called it: the worker's tests hold
    /// it to once per key.
    pub(crate) static RESOLUTIONS: std::cell::Cell<u64> = const { std::cell::Cell::new(0) };
}

/// The whole validated filter configuration.
#[derive(Debug, Clone, PartialEq)]
pub struct FilterConfig {
    /// What one breaker guards.
    pub upstream_key: UpstreamKey,
    /// Path answered with the health JSON, if any.
    pub health_path: Option<String>,
    /// Breakers kept at most.
    pub max_upstreams: u32,
    /// How long a Closed breaker must go without a call before its slot may go to a new upstream.
    pub idle_timeout_ms: u64,
    /// Index 0: the top-level settings; then one per override, in [`BreakerId`] order.
    breakers: Vec<BreakerConfig>,
    overrides: Overrides,
}

impl Default for FilterConfig {
    fn default() -> Self {
        Self {
            upstream_key: UpstreamKey::Cluster,
            health_path: None,
            max_upstreams: DEFAULT_MAX_UPSTREAMS,
            idle_timeout_ms: DEFAULT_IDLE_TIMEOUT_MS,
            breakers: vec![BreakerConfig::default()],
            overrides: Overrides::default(),
        }
    }
}

impl FilterConfig {
    /// Parses and validates the plugin configuration. Empty input means "all defaults".
    pub fn from_json(bytes: &[u8]) -> Result<Self, ConfigError> {
        if bytes.iter().all(u8::is_ascii_whitespace) {
            return Ok(Self::default());
        }
        let value: Value = serde_json::from_slice(bytes).map_err(|e| {
            ConfigError::new("configuration", "", format!("must be a JSON object: {e}"))
        })?;
        Self::from_value(value)
    }

    /// Validates an already parsed JSON value.
    pub fn from_value(value: Value) -> Result<Self, ConfigError> {
        validate::filter_config(value)
    }

    /// The top-level breaker settings.
    pub fn defaults(&self) -> &BreakerConfig {
        self.breaker(BreakerId::DEFAULTS)
    }

    /// Which settings apply to an upstream key: an exact override, else the longest matching glob,
    /// else the defaults. This scans the globs: resolve once per key and keep the id.
    pub fn resolve(&self, key: &str) -> BreakerId {
        #[cfg(test)]
        RESOLUTIONS.with(|n| n.set(n.get() + 1));
        self.overrides.resolve(key)
    }

    /// The settings of an id from [`FilterConfig::resolve`] (an id of another configuration falls
    /// back to the defaults).
    pub fn breaker(&self, id: BreakerId) -> &BreakerConfig {
        static FALLBACK: std::sync::OnceLock<BreakerConfig> = std::sync::OnceLock::new();
        self.breakers
            .get(id.0 as usize)
            .or_else(|| self.breakers.first())
            .unwrap_or_else(|| FALLBACK.get_or_init(BreakerConfig::default))
    }

    /// The settings for one upstream key ([`FilterConfig::resolve`] then [`FilterConfig::breaker`]).
    pub fn breaker_for(&self, key: &str) -> &BreakerConfig {
        self.breaker(self.resolve(key))
    }

    /// Number of overrides (exact and glob).
    pub fn override_count(&self) -> usize {
        self.overrides.len()
    }

    /// The line every host logs when it accepts this configuration.
    pub fn configured_line(&self) -> String {
        format!(
            "circuit breaker configured: upstream_key={} mode={} overrides={} max_upstreams={}",
            self.upstream_key,
            self.defaults().mode.as_str(),
            self.override_count(),
            self.max_upstreams
        )
    }

    /// Whether any breaker tracks stuck calls (the host then runs the periodic check).
    pub fn tracks_stuck_calls(&self) -> bool {
        self.breakers
            .iter()
            .any(|b| b.stuck_call_duration_ms.is_some() && b.mode != Mode::Disabled)
    }
}

/// Converts a fraction in (0, 1] to parts per million. Rates are then compared in integers
/// (`bad * 1e6 >= threshold_ppm * calls`), so "50 of 100 at 0.5" trips exactly, on every platform.
pub fn ratio_to_ppm(ratio: f64) -> u32 {
    (ratio * 1_000_000.0).round().clamp(0.0, 1_000_000.0) as u32
}

#[cfg(test)]
mod tests;
