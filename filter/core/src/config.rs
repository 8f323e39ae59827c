//! Filter configuration: the JSON of the contract (section 2), parsed with serde into a raw form and
//! then *compiled* into a validated [`FilterConfig`].
//!
//! Validation is all-or-nothing: the first bad field produces a [`ConfigError`] that names the field
//! (with its path inside `upstreams`), the value that was given and what is allowed, and the whole
//! configuration is refused. The filter logs that one line and returns `false` from `on_configure`.

use std::fmt;

use serde::Deserialize;
use serde_json::{Map, Value};

use crate::classify::{grpc_code_from_name, GrpcCodeSet, HttpStatusSet};
use crate::duration::parse_duration_ms;
use crate::key::UpstreamKey;

/// Fields that only exist at the top level; everything else is a breaker field that `upstreams` can
/// override.
const TOP_LEVEL_ONLY: [&str; 4] = ["upstream_key", "upstreams", "health_path", "max_upstreams"];

/// Upper bound for `max_upstreams`: the key index lives in one shared-data value that every worker reads
/// when it first meets a key, so it must stay small enough to copy.
pub const MAX_UPSTREAMS_LIMIT: u32 = 65_536;
/// Longest upstream key that gets a breaker. Longer keys (a hostile `header:` value) pass untracked.
pub const MAX_KEY_LEN: usize = 512;
/// Most overrides accepted in `upstreams`; matching is per key and cached, but the config itself is
/// copied into every worker's VM.
pub const MAX_OVERRIDES: usize = 10_000;

/// A configuration that was refused: which field, what it held, and what would have been accepted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    /// Path of the field, e.g. `error_rate_threshold` or `upstreams."*media*".open_timeout`.
    pub field: String,
    /// The offending value as it appeared (JSON text), or empty when the problem is structural.
    pub value: String,
    /// What is allowed instead.
    pub allowed: String,
}

/// Longest part (field, value, allowed) of a [`ConfigError`]: the message is one log line, and a
/// multi-megabyte value in a refused configuration must not become a multi-megabyte line. Above
/// [`MAX_KEY_LEN`], so no real upstream key in a field path is cut.
const MAX_ERROR_PART: usize = 1024;

impl ConfigError {
    fn new(field: impl Into<String>, value: impl fmt::Display, allowed: impl Into<String>) -> Self {
        Self {
            field: cut(field.into()),
            value: cut(value.to_string()),
            allowed: cut(allowed.into()),
        }
    }
}

/// `s`, cut to [`MAX_ERROR_PART`] bytes at a character boundary, with `...` when cut.
fn cut(mut s: String) -> String {
    if s.len() > MAX_ERROR_PART {
        let mut end = MAX_ERROR_PART;
        while !s.is_char_boundary(end) {
            end -= 1;
        }
        s.truncate(end);
        s.push_str("...");
    }
    s
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.value.is_empty() {
            write!(f, "{}: {}", self.field, self.allowed)
        } else {
            write!(
                f,
                "{} must be {}, got {}",
                self.field, self.allowed, self.value
            )
        }
    }
}

impl std::error::Error for ConfigError {}

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

/// A response sent instead of the default rejection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Fallback {
    /// HTTP status of the fallback response.
    pub status: u16,
    /// Headers, in the order given.
    pub headers: Vec<(String, String)>,
    /// Body bytes.
    pub body: String,
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
    /// Time Open before probes are let through, in ms.
    pub open_timeout_ms: u64,
    /// Factor applied to the open time on each re-open straight from HalfOpen.
    pub backoff_multiplier: f64,
    /// Ceiling of the backed-off open time, in ms.
    pub max_open_timeout_ms: u64,
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
            open_timeout_ms: 60_000,
            backoff_multiplier: 1.0,
            max_open_timeout_ms: 300_000,
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

/// A glob from `upstreams`: `*` matches any run of characters, everything else matches itself.
#[derive(Debug, Clone, PartialEq)]
struct GlobOverride {
    pattern: String,
    config: BreakerConfig,
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
    /// The top-level breaker settings.
    pub defaults: BreakerConfig,
    exact: hashbrown::HashMap<String, BreakerConfig>,
    /// Sorted longest pattern first, so the first match is the most specific one.
    globs: Vec<GlobOverride>,
}

impl Default for FilterConfig {
    fn default() -> Self {
        Self {
            upstream_key: UpstreamKey::Cluster,
            health_path: None,
            max_upstreams: 1024,
            defaults: BreakerConfig::default(),
            exact: hashbrown::HashMap::new(),
            globs: Vec::new(),
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
        let Value::Object(mut top) = value else {
            return Err(ConfigError::new(
                "configuration",
                short_json(&value),
                "a JSON object",
            ));
        };
        let upstream_key = match top.remove("upstream_key") {
            None => UpstreamKey::Cluster,
            Some(Value::String(s)) => UpstreamKey::parse(&s).ok_or_else(|| {
                ConfigError::new(
                    "upstream_key",
                    json_str(&s),
                    "one of \"cluster\", \"authority\", \"grpc_service\", \"grpc_method\" or \"header:NAME\"",
                )
            })?,
            Some(other) => {
                return Err(ConfigError::new("upstream_key", short_json(&other), "a string"))
            }
        };
        let health_path = match top.remove("health_path") {
            None | Some(Value::Null) => None,
            Some(Value::String(p)) if p.starts_with('/') && !p.contains(['?', '#', ' ']) => Some(p),
            Some(other) => {
                return Err(ConfigError::new(
                    "health_path",
                    short_json(&other),
                    "null or a path starting with \"/\" (no query)",
                ))
            }
        };
        let max_upstreams = match top.remove("max_upstreams") {
            None => 1024,
            Some(v) => match v.as_u64() {
                Some(n) if (1..=u64::from(MAX_UPSTREAMS_LIMIT)).contains(&n) => n as u32,
                _ => {
                    return Err(ConfigError::new(
                        "max_upstreams",
                        short_json(&v),
                        format!("an integer from 1 to {MAX_UPSTREAMS_LIMIT}"),
                    ))
                }
            },
        };
        let upstreams = match top.remove("upstreams") {
            None | Some(Value::Null) => Map::new(),
            Some(Value::Object(m)) => m,
            Some(other) => {
                return Err(ConfigError::new(
                    "upstreams",
                    short_json(&other),
                    "an object of upstream key or glob to breaker fields",
                ))
            }
        };
        if upstreams.len() > MAX_OVERRIDES {
            return Err(ConfigError::new(
                "upstreams",
                format!("{} entries", upstreams.len()),
                format!("at most {MAX_OVERRIDES} entries"),
            ));
        }

        let base = RawBreaker::from_map(top, "")?;
        let defaults = base.apply_to(&BreakerConfig::default(), "")?;

        let mut exact = hashbrown::HashMap::new();
        let mut globs = Vec::new();
        for (pattern, body) in upstreams {
            let prefix = format!("upstreams.{}.", json_str(&pattern));
            if pattern.is_empty() {
                return Err(ConfigError::new(
                    "upstreams",
                    "\"\"",
                    "keys that are not empty",
                ));
            }
            let Value::Object(map) = body else {
                return Err(ConfigError::new(
                    prefix.trim_end_matches('.'),
                    short_json(&body),
                    "an object of breaker fields",
                ));
            };
            for field in TOP_LEVEL_ONLY {
                if map.contains_key(field) {
                    return Err(ConfigError::new(
                        format!("{prefix}{field}"),
                        "",
                        "only allowed at the top level, not inside upstreams",
                    ));
                }
            }
            let raw = RawBreaker::from_map(map, &prefix)?;
            let config = raw.apply_to(&defaults, &prefix)?;
            if pattern.contains('*') {
                globs.push(GlobOverride { pattern, config });
            } else {
                exact.insert(pattern, config);
            }
        }
        // Longest pattern first; ties broken by the pattern text so the choice never depends on the
        // order of a JSON object.
        globs.sort_by(|a, b| {
            b.pattern
                .len()
                .cmp(&a.pattern.len())
                .then(a.pattern.cmp(&b.pattern))
        });
        Ok(Self {
            upstream_key,
            health_path,
            max_upstreams,
            defaults,
            exact,
            globs,
        })
    }

    /// The settings for one upstream key: an exact override, else the longest matching glob, else the
    /// defaults.
    pub fn breaker_for(&self, key: &str) -> &BreakerConfig {
        if let Some(c) = self.exact.get(key) {
            return c;
        }
        self.globs
            .iter()
            .find(|g| glob_match(&g.pattern, key))
            .map_or(&self.defaults, |g| &g.config)
    }

    /// Number of overrides (exact and glob).
    pub fn override_count(&self) -> usize {
        self.exact.len() + self.globs.len()
    }
}

/// `*` matches any (possibly empty) run of bytes; all other bytes match themselves. Iterative with
/// single-star backtracking, so it is linear-ish and cannot blow the stack on hostile patterns.
pub fn glob_match(pattern: &str, text: &str) -> bool {
    let (p, t) = (pattern.as_bytes(), text.as_bytes());
    let (mut pi, mut ti) = (0usize, 0usize);
    let mut star: Option<(usize, usize)> = None;
    while ti < t.len() {
        match p.get(pi) {
            Some(b'*') => {
                star = Some((pi, ti));
                pi += 1;
            }
            Some(c) if Some(c) == t.get(ti) => {
                pi += 1;
                ti += 1;
            }
            _ => match star {
                Some((sp, st)) => {
                    pi = sp + 1;
                    ti = st + 1;
                    star = Some((sp, st + 1));
                }
                None => return false,
            },
        }
    }
    p.get(pi..)
        .is_some_and(|rest| rest.iter().all(|&c| c == b'*'))
}

/// Converts a fraction in (0, 1] to parts per million. Rates are then compared in integers
/// (`bad * 1e6 >= threshold_ppm * calls`), so "50 of 100 at 0.5" trips exactly, on every platform.
pub fn ratio_to_ppm(ratio: f64) -> u32 {
    (ratio * 1_000_000.0).round().clamp(0.0, 1_000_000.0) as u32
}

/// A field that may be `null` in an override (meaning "unset it") as well as absent.
type Nullable<T> = Option<Option<T>>;

fn nullable<'de, D, T>(d: D) -> Result<Nullable<T>, D::Error>
where
    D: serde::Deserializer<'de>,
    T: Deserialize<'de>,
{
    Option::<T>::deserialize(d).map(Some)
}

/// A number or a string, as status lists accept both.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
enum NameOrNumber {
    Number(i64),
    Name(String),
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawFallback {
    status: u16,
    #[serde(default)]
    headers: std::collections::BTreeMap<String, String>,
    #[serde(default)]
    body: String,
}

/// The breaker fields as written; every one optional so an override can name just a few.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawBreaker {
    failure_threshold: Option<u32>,
    error_rate_threshold: Option<f64>,
    window_size: Option<u32>,
    #[serde(default, deserialize_with = "nullable")]
    window_duration: Nullable<String>,
    minimum_requests: Option<u32>,
    #[serde(default, deserialize_with = "nullable")]
    slow_call_duration: Nullable<String>,
    slow_call_rate_threshold: Option<f64>,
    open_timeout: Option<String>,
    backoff_multiplier: Option<f64>,
    max_open_timeout: Option<String>,
    half_open_max_requests: Option<u32>,
    success_threshold: Option<u32>,
    failure_grpc_statuses: Option<Vec<NameOrNumber>>,
    failure_http_statuses: Option<Vec<NameOrNumber>>,
    #[serde(default, deserialize_with = "nullable")]
    call_timeout: Nullable<String>,
    mode: Option<Mode>,
    #[serde(default, deserialize_with = "nullable")]
    fallback: Nullable<RawFallback>,
}

impl RawBreaker {
    fn from_map(map: Map<String, Value>, prefix: &str) -> Result<Self, ConfigError> {
        serde_path_to_error::deserialize(Value::Object(map)).map_err(|e| {
            let path = e.path().to_string();
            let inner = e.into_inner().to_string();
            // serde's "unknown field `x`, expected one of ..." already lists what is allowed.
            let field = if path == "." {
                prefix.trim_end_matches('.').to_string()
            } else {
                format!("{prefix}{path}")
            };
            let field = if field.is_empty() {
                "configuration".to_string()
            } else {
                field
            };
            ConfigError::new(field, "", strip_position(&inner))
        })
    }

    /// Applies these fields on top of `base`, validating each, then the combination.
    fn apply_to(self, base: &BreakerConfig, prefix: &str) -> Result<BreakerConfig, ConfigError> {
        let f = |name: &str| format!("{prefix}{name}");
        let mut c = base.clone();
        if let Some(v) = self.failure_threshold {
            c.failure_threshold = v;
        }
        if let Some(v) = self.error_rate_threshold {
            c.error_rate_threshold_ppm = fraction(&f("error_rate_threshold"), v)?;
        }
        match (self.window_size, self.window_duration) {
            (Some(_), Some(Some(_))) => {
                return Err(ConfigError::new(
                    f("window_duration"),
                    "",
                    "cannot be given together with window_size; choose a count window (window_size) or a time window (window_duration)",
                ))
            }
            (Some(n), _) => {
                c.window = WindowConfig::Count(in_range(&f("window_size"), n, 1, 1024)? as u16);
            }
            (None, Some(Some(d))) => {
                let ms = duration(&f("window_duration"), &d)?;
                if !(1_000..=3_600_000).contains(&ms) {
                    return Err(ConfigError::new(
                        f("window_duration"),
                        json_str(&d),
                        "a duration from \"1s\" to \"1h\"",
                    ));
                }
                c.window = WindowConfig::Time { duration_ms: ms };
            }
            (None, Some(None)) => c.window = BreakerConfig::default().window,
            (None, None) => {}
        }
        if let Some(v) = self.minimum_requests {
            c.minimum_requests = in_range(&f("minimum_requests"), v, 1, u32::MAX)?;
        }
        if let Some(v) = self.slow_call_duration {
            c.slow_call_duration_ms = match v {
                None => None,
                Some(d) => Some(positive_duration(&f("slow_call_duration"), &d)?),
            };
        }
        if let Some(v) = self.slow_call_rate_threshold {
            c.slow_call_rate_threshold_ppm = fraction(&f("slow_call_rate_threshold"), v)?;
        }
        if let Some(d) = self.open_timeout {
            c.open_timeout_ms = positive_duration(&f("open_timeout"), &d)?;
        }
        if let Some(v) = self.backoff_multiplier {
            if !(v.is_finite() && (1.0..=100.0).contains(&v)) {
                return Err(ConfigError::new(
                    f("backoff_multiplier"),
                    v,
                    "a number from 1 to 100",
                ));
            }
            c.backoff_multiplier = v;
        }
        if let Some(d) = self.max_open_timeout {
            c.max_open_timeout_ms = positive_duration(&f("max_open_timeout"), &d)?;
        }
        if let Some(v) = self.half_open_max_requests {
            c.half_open_max_requests = in_range(&f("half_open_max_requests"), v, 1, 10_000)? as u16;
        }
        if let Some(v) = self.success_threshold {
            c.success_threshold = in_range(&f("success_threshold"), v, 1, 10_000)? as u16;
        }
        if let Some(list) = self.failure_grpc_statuses {
            c.failure_grpc_statuses = grpc_statuses(&f("failure_grpc_statuses"), &list)?;
        }
        if let Some(list) = self.failure_http_statuses {
            c.failure_http_statuses = http_statuses(&f("failure_http_statuses"), &list)?;
        }
        if let Some(v) = self.call_timeout {
            c.call_timeout_ms = match v {
                None => None,
                Some(d) => Some(positive_duration(&f("call_timeout"), &d)?),
            };
        }
        if let Some(m) = self.mode {
            c.mode = m;
        }
        if let Some(v) = self.fallback {
            c.fallback = match v {
                None => None,
                Some(raw) => Some(fallback(&f("fallback"), raw)?),
            };
        }
        check_combination(&c, prefix)?;
        Ok(c)
    }
}

/// Rules between fields, checked on the merged result so an override cannot create a contradiction with
/// the defaults either.
fn check_combination(c: &BreakerConfig, prefix: &str) -> Result<(), ConfigError> {
    if c.max_open_timeout_ms < c.open_timeout_ms {
        return Err(ConfigError::new(
            format!("{prefix}max_open_timeout"),
            format!("{}ms", c.max_open_timeout_ms),
            format!("at least open_timeout ({}ms)", c.open_timeout_ms),
        ));
    }
    if let WindowConfig::Count(n) = c.window {
        if c.minimum_requests > u32::from(n) {
            return Err(ConfigError::new(
                format!("{prefix}minimum_requests"),
                c.minimum_requests,
                format!("at most window_size ({n}), or the rates could never be judged"),
            ));
        }
    }
    Ok(())
}

/// `v` if it lies in `lo..=hi`, else the error that says so (`an integer from 1 to 1024`, or `an
/// integer of at least 1` when there is no upper bound worth naming).
fn in_range(field: &str, v: u32, lo: u32, hi: u32) -> Result<u32, ConfigError> {
    if (lo..=hi).contains(&v) {
        return Ok(v);
    }
    let allowed = if hi == u32::MAX {
        format!("an integer of at least {lo}")
    } else {
        format!("an integer from {lo} to {hi}")
    };
    Err(ConfigError::new(field, v, allowed))
}

fn fraction(field: &str, v: f64) -> Result<u32, ConfigError> {
    if v.is_finite() && v > 0.0 && v <= 1.0 {
        Ok(ratio_to_ppm(v).max(1))
    } else {
        Err(ConfigError::new(field, v, "a number in (0, 1]"))
    }
}

fn duration(field: &str, text: &str) -> Result<u64, ConfigError> {
    parse_duration_ms(text).map_err(|why| {
        ConfigError::new(
            field,
            json_str(text),
            format!("a duration such as \"250ms\", \"30s\", \"1.5s\" or \"2m\" ({why})"),
        )
    })
}

fn positive_duration(field: &str, text: &str) -> Result<u64, ConfigError> {
    let ms = duration(field, text)?;
    if ms == 0 {
        return Err(ConfigError::new(
            field,
            json_str(text),
            "a duration above zero",
        ));
    }
    Ok(ms)
}

fn grpc_statuses(field: &str, list: &[NameOrNumber]) -> Result<GrpcCodeSet, ConfigError> {
    let mut set = GrpcCodeSet::empty();
    for (i, item) in list.iter().enumerate() {
        let code = match item {
            NameOrNumber::Number(n) if (0..=16).contains(n) => Some(*n as u8),
            NameOrNumber::Number(_) => None,
            NameOrNumber::Name(s) => grpc_code_from_name(s),
        };
        let Some(code) = code else {
            let shown = match item {
                NameOrNumber::Number(n) => n.to_string(),
                NameOrNumber::Name(s) => json_str(s),
            };
            return Err(ConfigError::new(
                format!("{field}[{i}]"),
                shown,
                "a gRPC status name (OK, CANCELLED, UNKNOWN, INVALID_ARGUMENT, DEADLINE_EXCEEDED, NOT_FOUND, ALREADY_EXISTS, PERMISSION_DENIED, RESOURCE_EXHAUSTED, FAILED_PRECONDITION, ABORTED, OUT_OF_RANGE, UNIMPLEMENTED, INTERNAL, UNAVAILABLE, DATA_LOSS, UNAUTHENTICATED) or a number from 0 to 16",
            ));
        };
        set.insert(code);
    }
    Ok(set)
}

fn http_statuses(field: &str, list: &[NameOrNumber]) -> Result<HttpStatusSet, ConfigError> {
    let mut set = HttpStatusSet::empty();
    for (i, item) in list.iter().enumerate() {
        let ok = match item {
            NameOrNumber::Number(n) => u16::try_from(*n).ok().is_some_and(|n| set.insert(n)),
            NameOrNumber::Name(s) => {
                let s = s.trim();
                match (s.len(), s.as_bytes()) {
                    (3, [c @ b'1'..=b'5', b'x' | b'X', b'x' | b'X']) => {
                        set.insert_class(c - b'0');
                        true
                    }
                    _ => s.parse::<u16>().ok().is_some_and(|n| set.insert(n)),
                }
            }
        };
        if !ok {
            let shown = match item {
                NameOrNumber::Number(n) => n.to_string(),
                NameOrNumber::Name(s) => json_str(s),
            };
            return Err(ConfigError::new(
                format!("{field}[{i}]"),
                shown,
                "an HTTP status from 100 to 599 or a class from \"1xx\" to \"5xx\"",
            ));
        }
    }
    Ok(set)
}

fn fallback(field: &str, raw: RawFallback) -> Result<Fallback, ConfigError> {
    if !(200..=599).contains(&raw.status) {
        return Err(ConfigError::new(
            format!("{field}.status"),
            raw.status,
            "an HTTP status from 200 to 599",
        ));
    }
    let mut headers = Vec::with_capacity(raw.headers.len());
    for (k, v) in raw.headers {
        let name = k.to_ascii_lowercase();
        let valid_name = !name.is_empty()
            && !name.starts_with(':')
            && name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"-_.!#$%&'*+^`|~".contains(&b));
        if !valid_name {
            return Err(ConfigError::new(
                format!("{field}.headers"),
                json_str(&k),
                "valid HTTP header names",
            ));
        }
        if v.bytes().any(|b| b == b'\r' || b == b'\n' || b == 0) {
            return Err(ConfigError::new(
                format!("{field}.headers.{name}"),
                json_str(&v),
                "a header value without CR, LF or NUL",
            ));
        }
        headers.push((name, v));
    }
    Ok(Fallback {
        status: raw.status,
        headers,
        body: raw.body,
    })
}

/// Removes serde_json's " at line 1 column 7" suffix, meaningless once the value came through a `Value`.
fn strip_position(msg: &str) -> String {
    match msg.find(" at line ") {
        Some(i) => msg.get(..i).unwrap_or(msg).to_string(),
        None => msg.to_string(),
    }
}

fn json_str(s: &str) -> String {
    Value::String(s.to_string()).to_string()
}

/// A value rendered for an error message, cut short so a huge value cannot flood the log.
fn short_json(v: &Value) -> String {
    let s = v.to_string();
    if s.len() <= 80 {
        return s;
    }
    let mut end = 77;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}...", s.get(..end).unwrap_or(""))
}

#[cfg(test)]
mod tests {
    use super::*;
    #[cfg(target_arch = "wasm32")]
    use wasm_bindgen_test::wasm_bindgen_test as test;

    fn parse(s: &str) -> Result<FilterConfig, ConfigError> {
        FilterConfig::from_json(s.as_bytes())
    }

    fn err(s: &str) -> String {
        parse(s).expect_err("config should be refused").to_string()
    }

    #[test]
    fn empty_config_gives_contract_defaults() {
        let c = parse("{}").unwrap();
        let d = &c.defaults;
        assert_eq!(c.upstream_key, UpstreamKey::Cluster);
        assert_eq!(c.max_upstreams, 1024);
        assert_eq!(c.health_path, None);
        assert_eq!(d.failure_threshold, 5);
        assert_eq!(d.error_rate_threshold_ppm, 500_000);
        assert_eq!(d.window, WindowConfig::Count(100));
        assert_eq!(d.minimum_requests, 20);
        assert_eq!(d.slow_call_duration_ms, None);
        assert_eq!(d.slow_call_rate_threshold_ppm, 1_000_000);
        assert_eq!(d.open_timeout_ms, 60_000);
        assert_eq!(d.backoff_multiplier, 1.0);
        assert_eq!(d.max_open_timeout_ms, 300_000);
        assert_eq!(d.half_open_max_requests, 1);
        assert_eq!(d.success_threshold, 2);
        for code in [2u8, 4, 8, 13, 14, 15] {
            assert!(d.failure_grpc_statuses.contains(code), "code {code}");
        }
        for code in [0u8, 1, 3, 5, 6, 7, 9, 10, 11, 12, 16] {
            assert!(!d.failure_grpc_statuses.contains(code), "code {code}");
        }
        assert!(d.failure_http_statuses.contains(500) && d.failure_http_statuses.contains(599));
        assert!(!d.failure_http_statuses.contains(404));
        assert_eq!(d.mode, Mode::Enforce);
        assert_eq!(parse("").unwrap(), c);
    }

    #[test]
    fn contract_example_parses_with_overrides() {
        let c = parse(
            r#"{
              "failure_threshold": 5, "error_rate_threshold": 0.5, "window_size": 100,
              "open_timeout": "30s", "success_threshold": 2,
              "health_path": "/health/circuit-breakers",
              "upstreams": {
                "outbound|8083||auth-service.nova.svc.cluster.local": { "failure_threshold": 3 },
                "*media-service*": { "open_timeout": "60s", "success_threshold": 5 }
              }
            }"#,
        )
        .unwrap();
        assert_eq!(c.health_path.as_deref(), Some("/health/circuit-breakers"));
        let auth = c.breaker_for("outbound|8083||auth-service.nova.svc.cluster.local");
        assert_eq!(auth.failure_threshold, 3);
        assert_eq!(
            auth.open_timeout_ms, 30_000,
            "unset override fields inherit the defaults"
        );
        let media = c.breaker_for("outbound|80||media-service.nova.svc.cluster.local");
        assert_eq!(
            (media.open_timeout_ms, media.success_threshold),
            (60_000, 5)
        );
        assert_eq!(c.breaker_for("other").open_timeout_ms, 30_000);
    }

    #[test]
    fn exact_beats_glob_and_longest_glob_wins() {
        let c = parse(
            r#"{"upstreams": {
                "*": {"failure_threshold": 1},
                "*media*": {"failure_threshold": 2},
                "*media-service*": {"failure_threshold": 3},
                "media-service": {"failure_threshold": 4}
            }}"#,
        )
        .unwrap();
        assert_eq!(c.breaker_for("media-service").failure_threshold, 4);
        assert_eq!(c.breaker_for("x-media-service-y").failure_threshold, 3);
        assert_eq!(c.breaker_for("media").failure_threshold, 2);
        assert_eq!(c.breaker_for("auth").failure_threshold, 1);
    }

    #[test]
    fn glob_matching() {
        assert!(glob_match("*", ""));
        assert!(glob_match("a*c", "abbbc"));
        assert!(glob_match("*svc*", "outbound|80||svc.ns"));
        assert!(!glob_match("a*c", "abd"));
        assert!(glob_match("a**", "a"));
        assert!(!glob_match("abc", "abcd"));
        assert!(glob_match("*a*a*a*b", "aaaaaaaaaaaaaab"));
        assert!(!glob_match("*a*a*a*b", "aaaaaaaaaaaaaaa"));
    }

    #[test]
    fn unknown_fields_are_refused_also_inside_upstreams() {
        let e = err(r#"{"failure_treshold": 3}"#);
        assert!(
            e.contains("failure_treshold") && e.contains("failure_threshold"),
            "{e}"
        );
        let e = err(r#"{"upstreams": {"a": {"bogus": 1}}}"#);
        assert!(
            e.starts_with("upstreams.\"a\"") && e.contains("bogus"),
            "{e}"
        );
        let e = err(r#"{"upstreams": {"a": {"health_path": "/h"}}}"#);
        assert!(
            e.contains("upstreams.\"a\".health_path") && e.contains("top level"),
            "{e}"
        );
    }

    #[test]
    fn errors_name_field_value_and_allowed_values() {
        assert_eq!(
            err(r#"{"error_rate_threshold": 2}"#),
            "error_rate_threshold must be a number in (0, 1], got 2"
        );
        assert_eq!(
            err(r#"{"error_rate_threshold": 0}"#),
            "error_rate_threshold must be a number in (0, 1], got 0"
        );
        assert_eq!(
            err(r#"{"window_size": 0}"#),
            "window_size must be an integer from 1 to 1024, got 0"
        );
        assert_eq!(
            err(r#"{"window_size": 2000}"#),
            "window_size must be an integer from 1 to 1024, got 2000"
        );
        let e = err(r#"{"failure_threshold": -1}"#);
        assert!(
            e.starts_with("failure_threshold: ") && e.contains("-1"),
            "{e}"
        );
        let e = err(r#"{"failure_threshold": "5"}"#);
        assert!(
            e.starts_with("failure_threshold: invalid type: string \"5\""),
            "{e}"
        );
        let e = err(r#"{"open_timeout": "soon"}"#);
        assert!(
            e.starts_with("open_timeout must be a duration") && e.ends_with("got \"soon\""),
            "{e}"
        );
        let e = err(r#"{"mode": "panic"}"#);
        assert!(
            e.contains("mode") && e.contains("dry_run") && e.contains("panic"),
            "{e}"
        );
        let e = err(r#"{"upstream_key": "host"}"#);
        assert!(
            e.contains("upstream_key") && e.contains("grpc_method") && e.contains("\"host\""),
            "{e}"
        );
        let e = err(r#"{"failure_grpc_statuses": ["UNAVAILABLE", "NOPE"]}"#);
        assert!(
            e.starts_with("failure_grpc_statuses[1] must be a gRPC status name"),
            "{e}"
        );
        let e = err(r#"{"failure_http_statuses": ["6xx"]}"#);
        assert!(
            e.starts_with("failure_http_statuses[0] must be an HTTP status"),
            "{e}"
        );
        let e = err(r#"{"upstreams": {"*m*": {"error_rate_threshold": 1.5}}}"#);
        assert_eq!(
            e,
            "upstreams.\"*m*\".error_rate_threshold must be a number in (0, 1], got 1.5"
        );
        let e = err(r#"{"max_upstreams": 0}"#);
        assert!(
            e.starts_with("max_upstreams must be an integer from 1"),
            "{e}"
        );
        let e = err(r#"[1, 2]"#);
        assert!(e.starts_with("configuration must be a JSON object"), "{e}");
        let e = err(r#"{"health_path": "health"}"#);
        assert!(e.starts_with("health_path must be null or a path"), "{e}");
    }

    #[test]
    fn inconsistent_combinations_are_refused() {
        let e = err(r#"{"window_size": 10, "window_duration": "10s"}"#);
        assert!(
            e.contains("window_duration") && e.contains("window_size"),
            "{e}"
        );
        let e = err(r#"{"window_size": 10}"#);
        assert!(
            e.starts_with("minimum_requests must be at most window_size (10)"),
            "{e}"
        );
        let e = err(r#"{"open_timeout": "10m"}"#);
        assert!(
            e.starts_with("max_open_timeout must be at least open_timeout"),
            "{e}"
        );
        let e = err(r#"{"upstreams": {"a": {"window_size": 5}}}"#);
        assert!(e.starts_with("upstreams.\"a\".minimum_requests"), "{e}");
    }

    #[test]
    fn durations_statuses_and_fallback() {
        let c = parse(
            r#"{"window_duration": "30s", "slow_call_duration": "1.5s", "call_timeout": "250ms",
                "open_timeout": "2m", "max_open_timeout": "10m",
                "failure_grpc_statuses": ["unavailable", 4, "INTERNAL"],
                "failure_http_statuses": ["5xx", 429, "408"],
                "fallback": {"status": 200, "headers": {"X-From": "fallback"}, "body": "{}"}}"#,
        )
        .unwrap();
        let d = &c.defaults;
        assert_eq!(
            d.window,
            WindowConfig::Time {
                duration_ms: 30_000
            }
        );
        assert_eq!(d.slow_call_duration_ms, Some(1_500));
        assert_eq!(d.call_timeout_ms, Some(250));
        assert_eq!(d.open_timeout_ms, 120_000);
        assert!(d.failure_grpc_statuses.contains(14) && d.failure_grpc_statuses.contains(4));
        assert!(!d.failure_grpc_statuses.contains(2));
        assert!(d.failure_http_statuses.contains(429) && d.failure_http_statuses.contains(408));
        assert!(d.failure_http_statuses.contains(503) && !d.failure_http_statuses.contains(404));
        let fb = d.fallback.as_ref().unwrap();
        assert_eq!(
            fb.headers,
            vec![("x-from".to_string(), "fallback".to_string())]
        );
    }

    #[test]
    fn override_can_switch_window_kind_and_unset_optional_fields() {
        let c = parse(
            r#"{"window_duration": "10s", "slow_call_duration": "1s",
                "upstreams": {"a": {"window_size": 50, "slow_call_duration": null}}}"#,
        )
        .unwrap();
        let a = c.breaker_for("a");
        assert_eq!(a.window, WindowConfig::Count(50));
        assert_eq!(a.slow_call_duration_ms, None);
        assert_eq!(
            c.breaker_for("b").window,
            WindowConfig::Time {
                duration_ms: 10_000
            }
        );
    }

    #[test]
    fn huge_values_are_cut_in_the_error_line() {
        let huge = "x".repeat(1 << 20);
        for config in [
            format!(r#"{{"open_timeout": "{huge}"}}"#),
            format!(r#"{{"{huge}": 1}}"#),
            format!(r#"{{"upstreams": {{"{huge}": {{"open_timeout": "soon"}}}}}}"#),
            format!(r#"{{"upstream_key": "é{huge}"}}"#),
        ] {
            let e = err(&config);
            assert!(e.len() < 4 * MAX_ERROR_PART, "{} bytes", e.len());
            assert!(e.contains("..."), "{}", &e[..100]);
        }
    }

    #[test]
    fn too_many_overrides_are_refused() {
        let mut m = serde_json::Map::new();
        for i in 0..=MAX_OVERRIDES {
            m.insert(
                format!("svc-{i}"),
                serde_json::json!({"failure_threshold": 1}),
            );
        }
        let e = FilterConfig::from_value(serde_json::json!({ "upstreams": m })).unwrap_err();
        assert_eq!(e.field, "upstreams");
    }
}
