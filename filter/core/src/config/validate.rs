//! Compiling the raw configuration into the validated one: each field checked on its own (range,
//! syntax), then the rules between fields, on the merged result, so an override cannot contradict the
//! defaults either. The first bad field refuses the whole configuration.

use serde_json::{Map, Value};

use super::error::{json_str, short_json, ConfigError};
use super::overrides::{BreakerId, Overrides};
use super::raw::{NameOrNumber, Nullable, RawBreaker, RawFallback};
use super::{
    ratio_to_ppm, BreakerConfig, Fallback, FilterConfig, WindowConfig, DEFAULT_IDLE_TIMEOUT_MS,
    DEFAULT_MAX_UPSTREAMS, MAX_OVERRIDES, MAX_UPSTREAMS_LIMIT, TOP_LEVEL_ONLY,
};
use crate::classify::{grpc_code_from_name, GrpcCodeSet, HttpStatusSet, GRPC_CODE_NAMES};
use crate::duration::parse_duration_ms;
use crate::key::UpstreamKey;

/// Validates an already parsed JSON value (see [`FilterConfig::from_value`]).
pub(crate) fn filter_config(value: Value) -> Result<FilterConfig, ConfigError> {
    let Value::Object(mut top) = value else {
        return Err(ConfigError::new(
            "configuration",
            short_json(&value),
            "a JSON object",
        ));
    };
    let upstream_key = upstream_key(top.remove("upstream_key"))?;
    let health_path = health_path(top.remove("health_path"))?;
    let max_upstreams = max_upstreams(top.remove("max_upstreams"))?;
    let idle_timeout_ms = match top.remove("idle_timeout") {
        None => DEFAULT_IDLE_TIMEOUT_MS,
        Some(Value::String(d)) => positive_duration("idle_timeout", &d)?,
        Some(other) => {
            return Err(ConfigError::new(
                "idle_timeout",
                short_json(&other),
                "a duration such as \"10m\"",
            ))
        }
    };
    let upstreams = top.remove("upstreams");
    let defaults = RawBreaker::from_map(top, "")?.apply_to(&BreakerConfig::default(), "")?;
    let mut breakers = vec![defaults];
    let overrides = overrides(upstreams, &mut breakers)?;
    Ok(FilterConfig {
        upstream_key,
        health_path,
        max_upstreams,
        idle_timeout_ms,
        breakers,
        overrides,
    })
}

fn upstream_key(v: Option<Value>) -> Result<UpstreamKey, ConfigError> {
    match v {
        None => Ok(UpstreamKey::Cluster),
        Some(Value::String(s)) => UpstreamKey::parse(&s).ok_or_else(|| {
            ConfigError::new(
                "upstream_key",
                json_str(&s),
                "one of \"cluster\", \"authority\", \"grpc_service\", \"grpc_method\" or \"header:NAME\"",
            )
        }),
        Some(other) => Err(ConfigError::new(
            "upstream_key",
            short_json(&other),
            "a string",
        )),
    }
}

fn health_path(v: Option<Value>) -> Result<Option<String>, ConfigError> {
    match v {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(p)) if p.starts_with('/') && !p.contains(['?', '#', ' ']) => Ok(Some(p)),
        Some(other) => Err(ConfigError::new(
            "health_path",
            short_json(&other),
            "null or a path starting with \"/\" (no query)",
        )),
    }
}

fn max_upstreams(v: Option<Value>) -> Result<u32, ConfigError> {
    let Some(v) = v else {
        return Ok(DEFAULT_MAX_UPSTREAMS);
    };
    match v.as_u64() {
        Some(n) if (1..=u64::from(MAX_UPSTREAMS_LIMIT)).contains(&n) => Ok(n as u32),
        _ => Err(ConfigError::new(
            "max_upstreams",
            short_json(&v),
            format!("an integer from 1 to {MAX_UPSTREAMS_LIMIT}"),
        )),
    }
}

/// `upstreams`: each override is the defaults (`breakers[0]`) with its own fields applied, appended to
/// `breakers`; the returned lookup maps patterns to their index there.
fn overrides(
    v: Option<Value>,
    breakers: &mut Vec<BreakerConfig>,
) -> Result<Overrides, ConfigError> {
    let upstreams = match v {
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
    let mut out = Overrides::default();
    for (pattern, body) in upstreams {
        let config = one_override(&pattern, body, breakers.first())?;
        out.insert(pattern, BreakerId(breakers.len() as u32));
        breakers.push(config);
    }
    out.seal();
    Ok(out)
}

fn one_override(
    pattern: &str,
    body: Value,
    defaults: Option<&BreakerConfig>,
) -> Result<BreakerConfig, ConfigError> {
    let prefix = format!("upstreams.{}.", json_str(pattern));
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
    if let Some(field) = TOP_LEVEL_ONLY.iter().find(|f| map.contains_key(**f)) {
        return Err(ConfigError::new(
            format!("{prefix}{field}"),
            "",
            "only allowed at the top level, not inside upstreams",
        ));
    }
    let base = defaults.cloned().unwrap_or_default();
    RawBreaker::from_map(map, &prefix)?.apply_to(&base, &prefix)
}

impl RawBreaker {
    /// Applies these fields on top of `base`, validating each, then the combination.
    pub(crate) fn apply_to(
        self,
        base: &BreakerConfig,
        prefix: &str,
    ) -> Result<BreakerConfig, ConfigError> {
        let f = |name: &str| format!("{prefix}{name}");
        let mut c = base.clone();
        if let Some(v) = self.failure_threshold {
            c.failure_threshold = v;
        }
        if let Some(v) = self.error_rate_threshold {
            c.error_rate_threshold_ppm = fraction(&f("error_rate_threshold"), v)?;
        }
        if let Some(window) = window(self.window_size, self.window_duration, &f)? {
            c.window = window;
        }
        if let Some(v) = self.minimum_requests {
            c.minimum_requests = in_range(&f("minimum_requests"), v, 1, u32::MAX)?;
        }
        if let Some(v) = self.slow_call_duration {
            c.slow_call_duration_ms = optional_duration(&f("slow_call_duration"), v)?;
        }
        if let Some(v) = self.slow_call_rate_threshold {
            c.slow_call_rate_threshold_ppm = fraction(&f("slow_call_rate_threshold"), v)?;
        }
        if let Some(v) = self.stuck_call_duration {
            c.stuck_call_duration_ms = optional_duration(&f("stuck_call_duration"), v)?;
        }
        if let Some(v) = self.cut_stuck_calls {
            c.cut_stuck_calls = v;
        }
        apply_open_times(&mut c, self.open_timeout, self.max_open_timeout, &f)?;
        if let Some(v) = self.open_timeout_jitter {
            if !(v.is_finite() && (0.0..=1.0).contains(&v)) {
                return Err(ConfigError::new(
                    f("open_timeout_jitter"),
                    v,
                    "a number in [0, 1]",
                ));
            }
            c.open_timeout_jitter_ppm = ratio_to_ppm(v);
        }
        if let Some(v) = self.recovery_ramp {
            c.recovery_ramp_ms = optional_duration(&f("recovery_ramp"), v)?;
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
            c.call_timeout_ms = optional_duration(&f("call_timeout"), v)?;
        }
        if let Some(m) = self.mode {
            c.mode = m;
        }
        if let Some(v) = self.fallback {
            c.fallback = v.map(|raw| fallback(&f("fallback"), raw)).transpose()?;
        }
        check_combination(&c, prefix)?;
        Ok(c)
    }
}

/// The window `window_size` or `window_duration` asks for (`None`: neither was given).
fn window(
    size: Option<u32>,
    duration_text: Nullable<String>,
    f: &impl Fn(&str) -> String,
) -> Result<Option<WindowConfig>, ConfigError> {
    match (size, duration_text) {
        (Some(_), Some(Some(_))) => Err(ConfigError::new(
            f("window_duration"),
            "",
            "cannot be given together with window_size; choose a count window (window_size) or a time window (window_duration)",
        )),
        (Some(n), _) => Ok(Some(WindowConfig::Count(
            in_range(&f("window_size"), n, 1, 1024)? as u16,
        ))),
        (None, Some(Some(d))) => {
            let ms = duration(&f("window_duration"), &d)?;
            if !(1_000..=3_600_000).contains(&ms) {
                return Err(ConfigError::new(
                    f("window_duration"),
                    json_str(&d),
                    "a duration from \"1s\" to \"1h\"",
                ));
            }
            Ok(Some(WindowConfig::Time { duration_ms: ms }))
        }
        (None, Some(None)) => Ok(Some(BreakerConfig::default().window)),
        (None, None) => Ok(None),
    }
}

/// `open_timeout` and `max_open_timeout`. A user who raises `open_timeout` past the ceiling in force
/// and says nothing of `max_open_timeout` means the new open time, not an error: the ceiling is raised
/// to it. Both given and contradictory is still refused (in [`check_combination`]).
fn apply_open_times(
    c: &mut BreakerConfig,
    open: Option<String>,
    max: Option<String>,
    f: &impl Fn(&str) -> String,
) -> Result<(), ConfigError> {
    if let Some(d) = open {
        c.open_timeout_ms = positive_duration(&f("open_timeout"), &d)?;
        if max.is_none() {
            c.max_open_timeout_ms = c.max_open_timeout_ms.max(c.open_timeout_ms);
        }
    }
    if let Some(d) = max {
        c.max_open_timeout_ms = positive_duration(&f("max_open_timeout"), &d)?;
    }
    Ok(())
}

/// A duration that `null` unsets.
fn optional_duration(field: &str, v: Option<String>) -> Result<Option<u64>, ConfigError> {
    v.map(|d| positive_duration(field, &d)).transpose()
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
    if c.cut_stuck_calls && c.stuck_call_duration_ms.is_none() {
        return Err(ConfigError::new(
            format!("{prefix}cut_stuck_calls"),
            "true",
            "false unless stuck_call_duration is set in the same resolved settings (the top level, plus \
             the upstreams entry that matches): a call is cut only once it is stuck",
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
                format!(
                    "a gRPC status name ({}) or a number from 0 to 16",
                    GRPC_CODE_NAMES.join(", ")
                ),
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
    Ok(Fallback::new(raw.status, headers, raw.body))
}
