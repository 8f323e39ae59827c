//! `harness simulate`: replays an Envoy access log (or a synthetic scenario) through the breaker core,
//! offline, and reports what the breaker would have done to that traffic.
//!
//! ```text
//! harness simulate --log access.jsonl --config filter.json [--svg out.svg] [--json] [--blip 10s]
//! harness simulate --scenario scenario.json --config filter.json ...
//! ```
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
//! The decisions are the core's own: [`Registry::admit`] and [`Registry::record`] on a
//! [`MemoryStore`] with Envoy's shared-data semantics, each outcome classified by
//! [`cb_core::classify::classify`] from the logged response code, gRPC status, response flags and
//! duration. One simulated worker is enough: on one Envoy all workers share the same breaker state.
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
//! # Input
//!
//! An access log is JSON lines with Envoy's usual keys: `start_time` (RFC 3339, or epoch ms as a
//! number), `duration` (ms), `response_code`, `grpc_status` (a number or a name in any of
//! `%GRPC_STATUS%`'s forms: `UNAVAILABLE`, `Unavailable`, `14`), `response_flags` (`-` or `UF,URX`),
//! `upstream_cluster`, `authority`, `path`, `method`, `content_type`. Numbers may be given as strings
//! (`"duration": "12"`), and `null` or `-` mean absent, as Envoy writes them. A call is gRPC when it has
//! a gRPC status or its `content_type` starts with `application/grpc`. A line that cannot be read is
//! reported on stderr with its line number and skipped.
//!
//! A scenario is JSON describing synthetic traffic; see [`Scenario`].

use std::cmp::Reverse;
use std::collections::{BTreeMap, BinaryHeap};
use std::fmt::Write as _;
use std::io::Write as _;

use cb_core::breaker::{StateKind, Transition};
use cb_core::classify::{
    classify, grpc_code_from_name, CallFacts, Classification, Outcome, ResponseFlags,
};
use cb_core::config::{BreakerConfig, FilterConfig};
use cb_core::duration::parse_duration_ms;
use cb_core::host::Host;
use cb_core::key::UpstreamKey;
use cb_core::registry::Untracked;
use cb_core::reply::{is_grpc, LocalReply};
use cb_core::session::Session;
use cb_core::store::LocalStore;
use cb_core::telemetry::{Event, Level, Series, Telemetry};
use cb_core::worker::Worker;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::svg;

/// Default `--blip`: a trip whose failure episode lasted less than this is reported as a blip.
pub const DEFAULT_BLIP_MS: u64 = 10_000;

/// Most calls a scenario may generate, so a typo in a rate cannot exhaust memory.
pub const MAX_SCENARIO_CALLS: f64 = 5_000_000.0;

const USAGE: &str = "usage: harness simulate (--log FILE | --scenario FILE) [--config FILE] [--svg OUT.svg] [--json] [--blip DURATION]

  --log FILE        Envoy access log, JSON lines (`-` reads stdin)
  --scenario FILE   synthetic traffic (JSON) instead of a log
  --config FILE     the filter configuration (JSON, as the plugin gets it); contract defaults without it
  --svg OUT.svg     also draw the breaker states, error rate and p99 latency per upstream
  --json            print the report as JSON instead of a table
  --blip DURATION   a trip whose failure episode lasted less than this is a blip (default 10s)";

// ---------------------------------------------------------------------------------------------------
// Calls
// ---------------------------------------------------------------------------------------------------

/// One call as the log (or a scenario) shows it.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Call {
    /// 1-based line of the log it came from (0 for a generated call).
    pub line: usize,
    /// Start time, ms since the Unix epoch (or since the scenario's `start`).
    pub start_ms: u64,
    /// How long it took, ms.
    pub duration_ms: u64,
    /// `upstream_cluster`.
    pub upstream_cluster: Option<String>,
    /// `authority`.
    pub authority: Option<String>,
    /// `path`.
    pub path: Option<String>,
    /// `method`.
    pub method: Option<String>,
    /// `response_code`; `None` when no response came (Envoy logs 0 or `-`).
    pub response_code: Option<u16>,
    /// The gRPC status as a code (names already translated); codes above 16 are kept as given.
    pub grpc_status: Option<u16>,
    /// Envoy's response flags.
    pub response_flags: ResponseFlags,
    /// The call is gRPC.
    pub grpc: bool,
    /// Request headers by lower-case name, for `upstream_key: "header:NAME"`. From a log, only the one
    /// the key names: a top-level field `NAME` (or with `_` for `-`, as access-log keys are usually
    /// spelt), or `NAME` inside an object field such as `"request_headers": {...}`.
    pub fields: BTreeMap<String, String>,
}

impl Call {
    /// When the call ended: start + duration.
    pub fn end_ms(&self) -> u64 {
        self.start_ms.saturating_add(self.duration_ms)
    }

    /// The upstream key the filter would have computed for this call, or `None` when the log lacks the
    /// field it needs (the filter would have let the call through untracked).
    pub fn upstream_key(&self, kind: &UpstreamKey) -> Option<String> {
        let key = match kind {
            UpstreamKey::Cluster => self.upstream_cluster.clone(),
            UpstreamKey::Authority => self.authority.clone(),
            UpstreamKey::GrpcService | UpstreamKey::GrpcMethod => self
                .path
                .as_deref()
                .and_then(|p| kind.from_grpc_path(p))
                .map(str::to_string),
            UpstreamKey::Header(name) => self.fields.get(name).cloned(),
        };
        key.filter(|k| !k.is_empty())
    }

    /// What the call counts as under one breaker's settings, as the filter would classify it.
    pub fn classify(&self, cfg: &BreakerConfig) -> Classification {
        // The core takes the raw header bytes; a code from the log is turned back into them.
        let grpc_status = self.grpc_status.map(|c| c.to_string());
        let facts = CallFacts {
            grpc: self.grpc,
            http_status: self.response_code,
            grpc_status: grpc_status.as_deref().map(str::as_bytes),
            flags: self.response_flags,
            duration_ms: Some(self.duration_ms),
            ended_early: self.response_code.is_none(),
            deadline_us: None,
        };
        classify(cfg, &facts)
    }
}

/// A log line that could not be read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Malformed {
    /// 1-based line number.
    pub line: usize,
    /// What was wrong with it.
    pub error: String,
}

/// The readable calls of a log and the lines that were skipped.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct ParsedLog {
    /// Calls in log order.
    pub calls: Vec<Call>,
    /// Lines skipped, in order.
    pub malformed: Vec<Malformed>,
}

/// Parses an access log of JSON lines. Blank lines are skipped silently; every other line that cannot
/// be read is listed in [`ParsedLog::malformed`].
pub fn parse_log(text: &str, key: &UpstreamKey) -> ParsedLog {
    let mut out = ParsedLog::default();
    for (i, line) in text.lines().enumerate() {
        match parse_log_line(line, i + 1, key) {
            Ok(Some(call)) => out.calls.push(call),
            Ok(None) => {}
            Err(error) => out.malformed.push(Malformed { line: i + 1, error }),
        }
    }
    out
}

/// Parses one access-log line; `Ok(None)` for a blank line.
///
/// `key` is the configuration's `upstream_key`: for `header:NAME` the line's field of that name is
/// kept (see [`Call::fields`]).
pub fn parse_log_line(
    line: &str,
    line_no: usize,
    key: &UpstreamKey,
) -> Result<Option<Call>, String> {
    let line = line.trim();
    if line.is_empty() {
        return Ok(None);
    }
    let value: Value = serde_json::from_str(line).map_err(|e| format!("not JSON: {e}"))?;
    let Value::Object(map) = value else {
        return Err("not a JSON object".into());
    };
    let start_ms = match present(&map, &["start_time"]) {
        None => return Err("start_time is missing".into()),
        Some(Value::String(s)) => parse_rfc3339_ms(s).map_err(|e| format!("start_time: {e}"))?,
        Some(Value::Number(n)) => n
            .as_u64()
            .ok_or_else(|| format!("start_time: not a time: {n}"))?,
        Some(other) => return Err(format!("start_time: not a time: {other}")),
    };
    let duration_ms = match present(&map, &["duration"]) {
        None => 0,
        Some(v) => number(v).ok_or_else(|| format!("duration: not a number of ms: {v}"))?,
    };
    let response_code = match present(&map, &["response_code"]) {
        None => None,
        Some(v) => {
            let n = number(v).ok_or_else(|| format!("response_code: not an HTTP status: {v}"))?;
            // Envoy logs 0 when no response was sent upstream or downstream.
            let code = u16::try_from(n)
                .ok()
                .filter(|c| *c <= 999)
                .ok_or_else(|| format!("response_code: not an HTTP status: {v}"))?;
            (code != 0).then_some(code)
        }
    };
    let grpc_status = match present(&map, &["grpc_status"]) {
        None => None,
        Some(v) => {
            Some(grpc_status(v).ok_or_else(|| format!("grpc_status: not a gRPC status: {v}"))?)
        }
    };
    let response_flags = match present(&map, &["response_flags"]) {
        None => ResponseFlags::default(),
        Some(Value::String(s)) => {
            // Flags this core does not know (a newer Envoy's) are left out; the known ones still count.
            ResponseFlags::parse_short(s).unwrap_or_else(|known| known)
        }
        Some(other) => return Err(format!("response_flags: not a string: {other}")),
    };
    let text = |names: &[&str]| -> Result<Option<String>, String> {
        match present(&map, names) {
            None => Ok(None),
            Some(Value::String(s)) => Ok(Some(s.clone())),
            Some(other) => Err(format!(
                "{}: not a string: {other}",
                names.first().copied().unwrap_or("")
            )),
        }
    };
    let upstream_cluster = text(&["upstream_cluster"])?;
    let authority = text(&["authority", ":authority"])?;
    let path = text(&["path", ":path"])?;
    let method = text(&["method", ":method"])?;
    let content_type = text(&["content_type", "content-type"])?;
    let grpc = grpc_status.is_some() || is_grpc(content_type.as_deref());

    // Only the header a `header:NAME` key needs is kept: a log has a dozen other strings per line,
    // and copying them all would multiply the memory a long log takes.
    let mut fields = BTreeMap::new();
    if let UpstreamKey::Header(name) = key {
        if let Some(v) = header_field(&map, name) {
            fields.insert(name.clone(), v);
        }
    }
    Ok(Some(Call {
        line: line_no,
        start_ms,
        duration_ms,
        upstream_cluster,
        authority,
        path,
        method,
        response_code,
        grpc_status,
        response_flags,
        grpc,
        fields,
    }))
}

/// The value of request header `name` as a log line gives it: a top-level field, spelt with `-` or `_`
/// in any case, or an entry of a nested object (`"request_headers": {"x-tenant": "a"}`).
fn header_field(map: &Map<String, Value>, name: &str) -> Option<String> {
    let underscored = name.replace('-', "_");
    let matches = |k: &str| k.eq_ignore_ascii_case(name) || k.eq_ignore_ascii_case(&underscored);
    let top = map.iter().find(|(k, _)| matches(k)).map(|(_, v)| v);
    let nested = || {
        map.values()
            .filter_map(Value::as_object)
            .flat_map(|inner| inner.iter())
            .find(|(k, _)| matches(k))
            .map(|(_, v)| v)
    };
    match top.or_else(nested)? {
        Value::String(s) if !s.is_empty() && s != "-" => Some(s.clone()),
        _ => None,
    }
}

/// The first of `names` with a value that is there: Envoy writes absent values as `null` or `"-"`.
fn present<'a>(map: &'a Map<String, Value>, names: &[&str]) -> Option<&'a Value> {
    names.iter().filter_map(|n| map.get(*n)).find(|v| match v {
        Value::Null => false,
        Value::String(s) => !(s.is_empty() || s == "-"),
        _ => true,
    })
}

/// A whole non-negative number, given as a JSON number or as a string of digits (some access-log
/// formats quote every value). Fractions are rounded: Envoy's ms are whole, other tools' may not be.
fn number(v: &Value) -> Option<u64> {
    let f = match v {
        Value::Number(n) => n.as_u64().map(|u| u as f64).or_else(|| n.as_f64())?,
        Value::String(s) => s.trim().parse::<f64>().ok()?,
        _ => return None,
    };
    (0.0..1e15).contains(&f).then(|| f.round() as u64)
}

/// A gRPC status in any of Envoy's `%GRPC_STATUS%` forms: a number, `SNAKE_STRING`
/// (`DEADLINE_EXCEEDED`) or `CAMEL_STRING` (`DeadlineExceeded`, the default).
fn grpc_status(v: &Value) -> Option<u16> {
    if let Some(n) = number(v) {
        return u16::try_from(n).ok();
    }
    let s = v.as_str()?.trim();
    grpc_code_from_name(s)
        .or_else(|| grpc_code_from_name(&camel_to_snake(s)))
        .map(u16::from)
}

fn camel_to_snake(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 4);
    for (i, c) in s.chars().enumerate() {
        if c.is_ascii_uppercase() && i > 0 {
            out.push('_');
        }
        out.push(c.to_ascii_uppercase());
    }
    out
}

// ---------------------------------------------------------------------------------------------------
// Time
// ---------------------------------------------------------------------------------------------------

/// Parses an RFC 3339 timestamp (`2026-11-22T10:00:00.123Z`, `2026-11-22T11:00:00+01:00`) into ms since
/// the Unix epoch. Fractions finer than a millisecond are cut off; a space may stand for the `T`.
pub fn parse_rfc3339_ms(s: &str) -> Result<u64, String> {
    let bad = |why: &str| format!("not an RFC 3339 time ({why}): {s:?}");
    let b = s.trim().as_bytes();
    let sep = |i: usize, allowed: &[u8]| b.get(i).is_some_and(|c| allowed.contains(c));
    if b.len() < 20
        || !sep(4, b"-")
        || !sep(7, b"-")
        || !sep(10, b"Tt ")
        || !sep(13, b":")
        || !sep(16, b":")
    {
        return Err(bad("expected YYYY-MM-DDTHH:MM:SS"));
    }
    let year = digits(b, 0, 4).ok_or_else(|| bad("year"))?;
    let month = digits(b, 5, 2).ok_or_else(|| bad("month"))?;
    let day = digits(b, 8, 2).ok_or_else(|| bad("day"))?;
    let hour = digits(b, 11, 2).ok_or_else(|| bad("hour"))?;
    let minute = digits(b, 14, 2).ok_or_else(|| bad("minute"))?;
    let second = digits(b, 17, 2).ok_or_else(|| bad("second"))?;
    if !(1..=12).contains(&month) || day < 1 || day > days_in_month(year, month) {
        return Err(bad("no such date"));
    }
    // 60 is a leap second; it is kept as the 61st second rather than refused.
    if hour > 23 || minute > 59 || second > 60 {
        return Err(bad("no such time of day"));
    }
    let mut i = 19;
    let mut millis = 0u64;
    if sep(i, b".") {
        i += 1;
        let start = i;
        while b.get(i).is_some_and(u8::is_ascii_digit) {
            if i - start < 3 {
                millis = millis * 10 + u64::from(b.get(i).copied().unwrap_or(b'0') - b'0');
            }
            i += 1;
        }
        if i == start {
            return Err(bad("empty fraction"));
        }
        for _ in (i - start)..3 {
            millis *= 10;
        }
    }
    let offset_s: i64 = match b.get(i) {
        Some(b'Z' | b'z') if i + 1 == b.len() => 0,
        Some(sign @ (b'+' | b'-')) if i + 6 == b.len() && sep(i + 3, b":") => {
            let h = digits(b, i + 1, 2).ok_or_else(|| bad("offset"))?;
            let m = digits(b, i + 4, 2).ok_or_else(|| bad("offset"))?;
            if h > 23 || m > 59 {
                return Err(bad("offset"));
            }
            let off = i64::from(h * 3600 + m * 60);
            if *sign == b'-' {
                -off
            } else {
                off
            }
        }
        _ => return Err(bad("expected Z or an offset such as +01:00 at the end")),
    };
    let days = days_from_civil(i64::from(year), month, day);
    let local_s = days * 86_400 + i64::from(hour * 3600 + minute * 60 + second);
    let utc_s = local_s - offset_s;
    let utc_s = u64::try_from(utc_s).map_err(|_| bad("before 1970"))?;
    Ok(utc_s * 1000 + millis)
}

/// Formats ms since the Unix epoch as RFC 3339 with milliseconds, in UTC.
pub fn format_rfc3339_ms(ms: u64) -> String {
    let (days, rem) = ((ms / 86_400_000) as i64, ms % 86_400_000);
    let (y, m, d) = civil_from_days(days);
    let (h, min, s, frac) = (
        rem / 3_600_000,
        rem / 60_000 % 60,
        rem / 1000 % 60,
        rem % 1000,
    );
    format!("{y:04}-{m:02}-{d:02}T{h:02}:{min:02}:{s:02}.{frac:03}Z")
}

fn digits(b: &[u8], at: usize, n: usize) -> Option<u32> {
    let part = b.get(at..at + n)?;
    part.iter().try_fold(0u32, |acc, c| {
        c.is_ascii_digit().then(|| acc * 10 + u32::from(c - b'0'))
    })
}

fn is_leap(y: u32) -> bool {
    (y % 4 == 0 && y % 100 != 0) || y % 400 == 0
}

fn days_in_month(y: u32, m: u32) -> u32 {
    match m {
        2 if is_leap(y) => 29,
        2 => 28,
        4 | 6 | 9 | 11 => 30,
        _ => 31,
    }
}

/// Days since 1970-01-01 of a proleptic Gregorian date (Howard Hinnant's `days_from_civil`).
fn days_from_civil(y: i64, m: u32, d: u32) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = i64::from((m + 9) % 12);
    let doy = (153 * mp + 2) / 5 + i64::from(d) - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// The date of a day number since 1970-01-01 (Howard Hinnant's `civil_from_days`).
fn civil_from_days(z: i64) -> (i64, i64, i64) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    (yoe + era * 400 + i64::from(m <= 2), m, d)
}

// ---------------------------------------------------------------------------------------------------
// Scenarios
// ---------------------------------------------------------------------------------------------------

/// Synthetic traffic: per upstream, a list of phases with their own rate, failure rate and latency.
///
/// ```json
/// {"seed": 7, "start": "2026-11-22T10:00:00Z", "rate_per_sec": 50, "duration_s": 120,
///  "upstreams": {
///    "content": [{"from_s": 0, "to_s": 30, "failure_rate": 0.0, "latency_ms": 20},
///                {"from_s": 30, "to_s": 60, "failure_rate": 1.0, "latency_ms": 5, "failure": "UF"}]}}
/// ```
///
/// Arrivals are a Poisson process (exponential gaps) from a seeded xorshift generator, one stream per
/// upstream, so the same file always gives the same calls and adding an upstream does not change the
/// others. Each generated call carries the upstream's name as its cluster and authority, and the path
/// `/<name>/Call`, so every `upstream_key` but `header:` finds the name as its key (`grpc_method`: the
/// name followed by `/Call`).
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Scenario {
    /// Seed of the pseudo-random generator (default 1).
    #[serde(default = "default_seed")]
    pub seed: u64,
    /// Time of second 0: epoch ms, or an RFC 3339 string (default 0).
    #[serde(default)]
    pub start: Option<Value>,
    /// Calls per second of phases that do not set their own.
    #[serde(default)]
    pub rate_per_sec: Option<f64>,
    /// Length of the run in seconds; phases are cut there (default: the end of the last phase).
    #[serde(default)]
    pub duration_s: Option<f64>,
    /// The calls are gRPC (default true); otherwise plain HTTP.
    #[serde(default = "default_true")]
    pub grpc: bool,
    /// Upstream name → its phases.
    pub upstreams: BTreeMap<String, Vec<Phase>>,
}

/// One stretch of an upstream's behaviour.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Phase {
    /// Start, seconds from the scenario's start.
    pub from_s: f64,
    /// End (exclusive), seconds.
    pub to_s: f64,
    /// Fraction of calls that fail, 0.0 to 1.0.
    #[serde(default)]
    pub failure_rate: f64,
    /// Typical latency in ms; each call takes 75 % to 125 % of it.
    #[serde(default = "default_latency")]
    pub latency_ms: f64,
    /// Calls per second in this phase (default: the scenario's `rate_per_sec`).
    #[serde(default)]
    pub rate_per_sec: Option<f64>,
    /// What a failure looks like: a gRPC status name (`"UNAVAILABLE"`, the default for gRPC), an HTTP
    /// status (`"503"`, the default for HTTP) or Envoy response flags (`"UF"`, `"UT"`, `"UF,URX"`).
    #[serde(default)]
    pub failure: Option<String>,
}

fn default_seed() -> u64 {
    1
}
fn default_true() -> bool {
    true
}
fn default_latency() -> f64 {
    20.0
}

/// How a failing call of a phase is logged.
#[derive(Debug, Clone, Copy, PartialEq)]
enum FailureKind {
    Grpc(u16),
    Http(u16),
    Flags(ResponseFlags),
}

impl FailureKind {
    fn parse(spec: Option<&str>, grpc: bool) -> Result<Self, String> {
        let Some(spec) = spec.map(str::trim) else {
            return Ok(if grpc {
                FailureKind::Grpc(14)
            } else {
                FailureKind::Http(503)
            });
        };
        if let Some(code) = grpc_code_from_name(spec) {
            return Ok(FailureKind::Grpc(u16::from(code)));
        }
        if let Ok(code) = spec.parse::<u16>() {
            if (100..=599).contains(&code) {
                return Ok(FailureKind::Http(code));
            }
        }
        match ResponseFlags::parse_short(spec) {
            Ok(flags) if flags.0 != 0 => Ok(FailureKind::Flags(flags)),
            _ => Err(format!(
                "failure must be a gRPC status name (\"UNAVAILABLE\"), an HTTP status (\"503\") or Envoy response flags (\"UF\"), got {spec:?}"
            )),
        }
    }
}

/// Parses and checks a scenario.
pub fn parse_scenario(text: &str) -> Result<Scenario, String> {
    let s: Scenario = serde_json::from_str(text).map_err(|e| format!("scenario: {e}"))?;
    let mut expected_calls = 0.0;
    if s.upstreams.is_empty() {
        return Err("scenario: upstreams must name at least one upstream".into());
    }
    if let Some(d) = s.duration_s {
        if !(d.is_finite() && d > 0.0) {
            return Err(format!(
                "scenario: duration_s must be a number above 0, got {d}"
            ));
        }
    }
    scenario_start_ms(&s)?;
    for (name, phases) in &s.upstreams {
        if name.is_empty() {
            return Err("scenario: upstream names must not be empty".into());
        }
        for (i, p) in phases.iter().enumerate() {
            let at = format!("scenario: upstreams.{name:?}[{i}]");
            if !(p.from_s.is_finite() && p.to_s.is_finite() && 0.0 <= p.from_s && p.from_s < p.to_s)
            {
                return Err(format!(
                    "{at}: from_s and to_s must be seconds with 0 <= from_s < to_s, got {} and {}",
                    p.from_s, p.to_s
                ));
            }
            if !(0.0..=1.0).contains(&p.failure_rate) {
                return Err(format!(
                    "{at}.failure_rate must be a number in [0, 1], got {}",
                    p.failure_rate
                ));
            }
            if !(p.latency_ms.is_finite() && p.latency_ms >= 0.0) {
                return Err(format!(
                    "{at}.latency_ms must be a number of ms >= 0, got {}",
                    p.latency_ms
                ));
            }
            let rate = p
                .rate_per_sec
                .or(s.rate_per_sec)
                .ok_or_else(|| format!("{at}: rate_per_sec is set neither here nor at the top"))?;
            if !(rate.is_finite() && rate > 0.0 && rate <= 100_000.0) {
                return Err(format!(
                    "{at}: rate_per_sec must be a number in (0, 100000], got {rate}"
                ));
            }
            FailureKind::parse(p.failure.as_deref(), s.grpc).map_err(|e| format!("{at}.{e}"))?;
            expected_calls += rate * (p.to_s - p.from_s);
        }
    }
    if expected_calls > MAX_SCENARIO_CALLS {
        return Err(format!("scenario: about {expected_calls:.0} calls; at most {MAX_SCENARIO_CALLS:.0} are simulated"));
    }
    Ok(s)
}

fn scenario_start_ms(s: &Scenario) -> Result<u64, String> {
    match &s.start {
        None | Some(Value::Null) => Ok(0),
        Some(Value::String(t)) => parse_rfc3339_ms(t).map_err(|e| format!("scenario: start: {e}")),
        Some(v) => v.as_u64().ok_or_else(|| {
            format!("scenario: start must be epoch ms or an RFC 3339 time, got {v}")
        }),
    }
}

/// The time range of a scenario (ms, same epoch as its calls): from its `start` to its `duration_s`, or
/// to the end of its last phase.
pub fn scenario_span_ms(s: &Scenario) -> (u64, u64) {
    let start = scenario_start_ms(s).unwrap_or(0);
    let last = s
        .upstreams
        .values()
        .flatten()
        .map(|p| p.to_s)
        .fold(0.0_f64, f64::max);
    (
        start,
        start.saturating_add(secs_to_ms(s.duration_s.unwrap_or(last))),
    )
}

fn secs_to_ms(s: f64) -> u64 {
    (s * 1000.0).round().max(0.0) as u64
}

/// The calls a scenario describes, in start-time order. Deterministic for a given scenario.
pub fn generate(s: &Scenario) -> Result<Vec<Call>, String> {
    let start = scenario_start_ms(s)?;
    let limit_s = s.duration_s.unwrap_or(f64::INFINITY);
    let mut calls = Vec::new();
    for (name, phases) in &s.upstreams {
        let mut rng = XorShift::new(s.seed ^ fnv1a(name.as_bytes()));
        for p in phases {
            let rate = p.rate_per_sec.or(s.rate_per_sec).unwrap_or(1.0);
            let failure = FailureKind::parse(p.failure.as_deref(), s.grpc)?;
            let to_s = p.to_s.min(limit_s);
            let mut t = p.from_s;
            loop {
                // Exponential gaps: a Poisson process, the usual model of independent callers.
                t += -(1.0 - rng.next_f64()).ln() / rate;
                if t >= to_s {
                    break;
                }
                let latency = p.latency_ms * (0.75 + 0.5 * rng.next_f64());
                let failed = rng.next_f64() < p.failure_rate;
                calls.push(synthetic_call(
                    name,
                    start.saturating_add(secs_to_ms(t)),
                    latency.round() as u64,
                    s.grpc,
                    failed.then_some(failure),
                ));
            }
        }
    }
    calls.sort_by_key(|c| c.start_ms);
    Ok(calls)
}

fn synthetic_call(
    name: &str,
    start_ms: u64,
    duration_ms: u64,
    grpc: bool,
    failure: Option<FailureKind>,
) -> Call {
    let (response_code, grpc_status, response_flags) = match failure {
        None => (Some(200), grpc.then_some(0), ResponseFlags::default()),
        Some(FailureKind::Grpc(code)) => (Some(200), Some(code), ResponseFlags::default()),
        Some(FailureKind::Http(code)) => (Some(code), None, ResponseFlags::default()),
        Some(FailureKind::Flags(flags)) => (Some(503), None, flags),
    };
    Call {
        line: 0,
        start_ms,
        duration_ms,
        upstream_cluster: Some(name.to_string()),
        authority: Some(name.to_string()),
        path: Some(format!("/{name}/Call")),
        method: Some("POST".into()),
        response_code,
        grpc_status,
        response_flags,
        grpc,
        fields: BTreeMap::new(),
    }
}

/// xorshift64*: tiny, fast and plenty for traffic shapes (not for anything secret).
#[derive(Debug, Clone)]
pub struct XorShift(u64);

impl XorShift {
    /// A generator from a seed (any value; it is mixed first so that nearby seeds diverge at once).
    pub fn new(seed: u64) -> Self {
        // splitmix64 of the seed: xorshift must not start from 0, and small seeds make poor states.
        let mut z = seed.wrapping_add(0x9E37_79B9_7F4A_7C15);
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^= z >> 31;
        Self(if z == 0 { 0x2545_F491_4F6C_DD1D } else { z })
    }

    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    /// A number in [0, 1).
    pub fn next_f64(&mut self) -> f64 {
        // The top 53 bits fill an f64 mantissa exactly.
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }
}

fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(*b)).wrapping_mul(0x0100_0000_01b3)
    })
}

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
    samples: Vec<(u64, Classification, u64)>,
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

/// One logged call as the filter would have seen it in Envoy: its request, then its response, and
/// the events the core's session produced for it.
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
    fn event(&mut self, _: &str, event: &Event) {
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
    fn send_reply(&mut self, _: &LocalReply) -> bool {
        true
    }
}

/// The filter's worker, replaying: the breaker table in memory, as the native module keeps it.
type ReplayWorker = Worker<Box<LocalStore>>;

/// Replays calls through the breaker core under `config` and reports what it would have done: each
/// call is a stream of the core's own session, admitted when it started and settled when it ended.
pub fn simulate(calls: &[Call], config: &FilterConfig, opts: &Options) -> Report {
    let table = Box::new(LocalStore::new(config.max_upstreams));
    let mut worker: ReplayWorker = Worker::new(std::sync::Arc::new(config.clone()), 0, table);
    let keys: Vec<Option<String>> = calls
        .iter()
        .map(|c| c.upstream_key(&config.upstream_key))
        .collect();
    let verdicts: Vec<Classification> = calls
        .iter()
        .zip(&keys)
        .map(|(c, k)| {
            c.classify(
                k.as_deref()
                    .map_or(config.defaults(), |k| config.breaker_for(k)),
            )
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

    let mut tracks: BTreeMap<String, Track> = BTreeMap::new();
    let mut untracked: BTreeMap<String, u64> = BTreeMap::new();
    let mut sessions: Vec<Option<Session>> = (0..calls.len()).map(|_| None).collect();
    let mut queue: BinaryHeap<Reverse<(u64, EventKind, usize)>> = calls
        .iter()
        .enumerate()
        .map(|(i, c)| Reverse((c.start_ms, EventKind::Admit, i)))
        .collect();

    while let Some(Reverse((at, kind, i))) = queue.pop() {
        let (Some(call), Some(verdict)) = (calls.get(i), verdicts.get(i).copied()) else {
            continue;
        };
        let Some(key) = keys.get(i).and_then(Option::as_deref) else {
            if kind == EventKind::Admit {
                *untracked.entry("no_key".into()).or_default() += 1;
            }
            continue;
        };
        let cfg = config.breaker_for(key);
        // Looked up before inserting: `entry` would allocate the key on every event.
        if !tracks.contains_key(key) {
            tracks.insert(key.to_string(), Track::new(key, cfg));
        }
        let Some(track) = tracks.get_mut(key) else {
            continue;
        };
        let mut host = ReplayHost {
            call,
            now_ms: at,
            responded: false,
            events: Vec::new(),
        };
        match kind {
            EventKind::Admit => {
                track.report.calls += 1;
                let mut session = Session::new();
                session.on_request(&mut worker, &mut host);
                if session.in_flight() {
                    track.report.allowed += 1;
                    queue.push(Reverse((call.end_ms(), EventKind::Record, i)));
                    if let Some(slot) = sessions.get_mut(i) {
                        *slot = Some(session);
                    }
                } else if host.events.is_empty() {
                    track.report.untracked += 1;
                    *untracked.entry("disabled".into()).or_default() += 1;
                }
            }
            EventKind::Record => {
                let Some(mut session) = sessions.get_mut(i).and_then(Option::take) else {
                    continue;
                };
                if verdict.outcome == Outcome::Failure {
                    track.report.failures_let_through += 1;
                }
                if call.response_code.is_some() {
                    host.responded = true;
                    session.on_response_headers(&mut worker, &mut host, true);
                }
                session.on_end(&mut worker, &mut host);
            }
        }
        for e in host.events {
            match e {
                Event::Transition(t) => track.apply(t, at, start_ms),
                Event::Rejected(_) => track.reject(verdict, false),
                Event::DryRun(_) => track.reject(verdict, true),
                Event::Untracked(why) => {
                    track.report.untracked += 1;
                    *untracked.entry(untracked_reason(&why).into()).or_default() += 1;
                }
                _ => {}
            }
        }
    }

    // The ground truth about each upstream: every logged call, whatever the breaker did with it.
    for ((call, key), verdict) in calls.iter().zip(&keys).zip(&verdicts) {
        let Some(track) = key.as_deref().and_then(|k| tracks.get_mut(k)) else {
            continue;
        };
        track.report.log_failures += u64::from(verdict.outcome == Outcome::Failure);
        track.report.log_slow_calls += u64::from(verdict.slow);
        track
            .report
            .samples
            .push((call.end_ms(), *verdict, call.duration_ms));
    }

    let upstreams = tracks
        .into_iter()
        .map(|(key, track)| finish(track, config.breaker_for(&key), end_ms, opts.blip_ms))
        .collect();
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

/// Judged calls, failures and slow calls per second of end time (ignored calls say nothing).
#[derive(Debug, Clone, Copy, Default)]
struct SecondBucket {
    judged: u64,
    failures: u64,
    slow: u64,
}

fn second_buckets(samples: &[(u64, Classification, u64)]) -> BTreeMap<u64, SecondBucket> {
    let mut buckets: BTreeMap<u64, SecondBucket> = BTreeMap::new();
    for (end, verdict, _) in samples {
        if verdict.outcome == Outcome::Ignored {
            continue;
        }
        let b = buckets.entry(end / 1000).or_default();
        b.judged += 1;
        b.failures += u64::from(verdict.outcome == Outcome::Failure);
        b.slow += u64::from(verdict.slow);
    }
    buckets
}

/// The failure episode behind a trip at `trip_ms`, as the module docs define it.
fn failure_episode_ms(
    buckets: &BTreeMap<u64, SecondBucket>,
    cfg: &BreakerConfig,
    trip_ms: u64,
) -> u64 {
    // Exact integer comparison, like the core's window: failures / judged >= ppm / 1e6.
    let reaches = |part: u64, whole: u64, ppm: u32| {
        part.saturating_mul(1_000_000) >= u64::from(ppm).saturating_mul(whole)
    };
    let bad = |b: &SecondBucket| {
        b.judged > 0
            && (reaches(b.failures, b.judged, cfg.error_rate_threshold_ppm)
                || (cfg.slow_call_duration_ms.is_some()
                    && reaches(b.slow, b.judged, cfg.slow_call_rate_threshold_ppm)))
    };
    let Some((&at, bucket)) = buckets.range(..=trip_ms / 1000).next_back() else {
        return 0;
    };
    if !bad(bucket) {
        return 0;
    }
    let first = buckets
        .range(..at)
        .rev()
        .take_while(|(_, b)| bad(b))
        .last()
        .map_or(at, |(s, _)| *s);
    let last = buckets
        .range(at + 1..)
        .take_while(|(_, b)| bad(b))
        .last()
        .map_or(at, |(s, _)| *s);
    (last + 1 - first) * 1000
}

// ---------------------------------------------------------------------------------------------------
// Output
// ---------------------------------------------------------------------------------------------------

/// The report as the table printed on stdout.
pub fn render_table(r: &Report) -> String {
    let mut out = String::new();
    let span_s = r.end_ms.saturating_sub(r.start_ms) as f64 / 1000.0;
    let _ = writeln!(
        out,
        "Replayed {} calls from {}: {} to {} ({:.1}s); {} malformed line{} skipped.",
        r.calls,
        r.source,
        r.start,
        r.end,
        span_s,
        r.malformed_lines,
        if r.malformed_lines == 1 { "" } else { "s" }
    );
    let _ = writeln!(
        out,
        "upstream_key: {}. A trip is a blip when its failure episode lasted less than {}.",
        r.upstream_key,
        fmt_secs(r.blip_threshold_ms)
    );
    if !r.untracked.is_empty() {
        let parts: Vec<String> = r
            .untracked
            .iter()
            .map(|(why, n)| format!("{why}: {n}"))
            .collect();
        let _ = writeln!(
            out,
            "Untracked calls (passed without a breaker): {}.",
            parts.join(", ")
        );
    }
    out.push('\n');

    let width = r
        .upstreams
        .iter()
        .map(|u| u.upstream.chars().count())
        .max()
        .unwrap_or(8)
        .max(8);
    let header = [
        "calls",
        "allowed",
        "rejected",
        "would-fail",
        "would-succeed",
        "failures-passed",
        "opened",
        "blips",
    ];
    let _ = write!(out, "{:<width$}", "UPSTREAM");
    for h in header {
        let _ = write!(out, "  {:>w$}", h.to_uppercase(), w = h.len());
    }
    let _ = writeln!(out, "  FINAL");
    for u in &r.upstreams {
        let values = [
            u.calls,
            u.allowed,
            u.rejected + u.dry_run_rejections,
            u.rejected_would_have_failed,
            u.rejected_would_have_succeeded,
            u.failures_let_through,
            u.open_periods.len() as u64,
            u.blips,
        ];
        let _ = write!(out, "{:<width$}", u.upstream);
        for (h, v) in header.iter().zip(values) {
            let _ = write!(out, "  {:>w$}", v, w = h.len());
        }
        let _ = writeln!(out, "  {}", u.final_state);
    }
    let _ = writeln!(
        out,
        "\n(rejected: calls the breaker would have turned away; would-fail / would-succeed: what the log says they did;\n failures-passed: failures the breaker let through)"
    );

    for u in &r.upstreams {
        if u.transitions.is_empty() && u.mode == "enforce" {
            continue;
        }
        let _ = writeln!(
            out,
            "\n{} (mode {}, {} log failures of {} calls)",
            u.upstream, u.mode, u.log_failures, u.calls
        );
        if u.dry_run_rejections > 0 {
            let _ = writeln!(
                out,
                "  dry_run: {} calls would have been rejected; none were",
                u.dry_run_rejections
            );
        }
        for t in &u.transitions {
            let _ = writeln!(
                out,
                "  {}  {:>9}  {:<9} -> {:<9}  {}",
                time_of_day(t.at_ms),
                format!("+{}", fmt_secs(t.offset_ms)),
                t.from,
                t.to,
                t.reason
            );
        }
        for (i, p) in u.open_periods.iter().enumerate() {
            let closed = match p.closed_at_ms {
                Some(at) => format!("closed {} after {}", time_of_day(at), fmt_secs(p.open_ms)),
                None => format!("not closed by the end ({} so far)", fmt_secs(p.open_ms)),
            };
            let episode = match p.failure_episode_ms {
                Some(ms) => format!(
                    ", failure episode {}{}",
                    fmt_secs(ms),
                    if p.blip { " -> BLIP" } else { "" }
                ),
                None => String::new(),
            };
            let _ = writeln!(
                out,
                "  open period {}: opened {} ({}), {}, {} re-open{}, {} calls rejected{}",
                i + 1,
                time_of_day(p.opened_at_ms),
                p.reason,
                closed,
                p.reopens,
                if p.reopens == 1 { "" } else { "s" },
                p.rejected,
                episode
            );
        }
    }
    out
}

/// The report as pretty-printed JSON.
pub fn render_json(r: &Report) -> Result<String, String> {
    serde_json::to_string_pretty(r).map_err(|e| format!("report as JSON: {e}"))
}

/// The report as an SVG timeline: per upstream its states, error rate and p99 latency.
pub fn timeline(r: &Report) -> svg::Timeline {
    let span = r.end_ms.saturating_sub(r.start_ms);
    // About a hundred points per line: enough to see an outage's shape, few enough that each point
    // averages several calls instead of flickering between 0 and 100 %.
    let bucket_ms = [
        1_000u64, 2_000, 5_000, 10_000, 15_000, 30_000, 60_000, 300_000, 600_000, 3_600_000,
    ]
    .into_iter()
    .find(|b| span / b <= 120)
    .unwrap_or(3_600_000);
    let series = r
        .upstreams
        .iter()
        .map(|u| {
            let mut buckets: BTreeMap<u64, (u64, u64, Vec<u64>)> = BTreeMap::new();
            for (end, verdict, duration) in &u.samples {
                if verdict.outcome == Outcome::Ignored {
                    continue;
                }
                let b = buckets
                    .entry(end.saturating_sub(r.start_ms) / bucket_ms)
                    .or_default();
                b.0 += 1;
                b.1 += u64::from(verdict.outcome == Outcome::Failure);
                b.2.push(*duration);
            }
            let mut error_rate = Vec::with_capacity(buckets.len());
            let mut latency_ms = Vec::with_capacity(buckets.len());
            for (b, (judged, failures, mut durations)) in buckets {
                let mid = r
                    .start_ms
                    .saturating_add(b * bucket_ms + bucket_ms / 2)
                    .min(r.end_ms);
                error_rate.push((mid, failures as f64 / judged.max(1) as f64));
                durations.sort_unstable();
                // Nearest-rank p99.
                let rank = ((durations.len() as f64) * 0.99).ceil() as usize;
                if let Some(p99) = durations.get(rank.saturating_sub(1)) {
                    latency_ms.push((mid, *p99 as f64));
                }
            }
            let mut states = vec![(r.start_ms, StateKind::Closed)];
            states.extend(u.states.iter().copied());
            svg::Series {
                name: u.upstream.clone(),
                states,
                error_rate,
                latency_ms,
            }
        })
        .collect();
    svg::Timeline {
        title: format!("Circuit breaker replay of {} ({} calls)", r.source, r.calls),
        start_ms: r.start_ms,
        end_ms: r.end_ms,
        series,
    }
}

fn time_of_day(ms: u64) -> String {
    let full = format_rfc3339_ms(ms);
    // "2026-11-22T10:01:05.120Z" → "10:01:05.120": the table spans minutes, the date is in the header.
    full.get(11..23).map_or(full.clone(), str::to_string)
}

fn fmt_secs(ms: u64) -> String {
    if ms % 1000 == 0 {
        format!("{}s", ms / 1000)
    } else {
        format!("{:.1}s", ms as f64 / 1000.0)
    }
}

// ---------------------------------------------------------------------------------------------------
// Command line
// ---------------------------------------------------------------------------------------------------

/// Parsed command-line arguments.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Args {
    /// `--log FILE`.
    pub log: Option<String>,
    /// `--scenario FILE`.
    pub scenario: Option<String>,
    /// `--config FILE`.
    pub config: Option<String>,
    /// `--svg OUT.svg`.
    pub svg: Option<String>,
    /// `--json`.
    pub json: bool,
    /// `--blip DURATION`, in ms.
    pub blip_ms: u64,
    /// `--help`.
    pub help: bool,
}

impl Args {
    /// Parses the arguments after `simulate`.
    pub fn parse(args: &[String]) -> Result<Self, String> {
        let mut a = Args {
            blip_ms: DEFAULT_BLIP_MS,
            ..Args::default()
        };
        let mut it = args.iter();
        while let Some(arg) = it.next() {
            let (flag, inline) = match arg.split_once('=') {
                Some((f, v)) if f.starts_with("--") => (f, Some(v.to_string())),
                _ => (arg.as_str(), None),
            };
            let mut value = || {
                inline
                    .clone()
                    .or_else(|| it.next().cloned())
                    .ok_or_else(|| format!("{flag} needs a value\n{USAGE}"))
            };
            match flag {
                "--log" => a.log = Some(value()?),
                "--scenario" => a.scenario = Some(value()?),
                "--config" => a.config = Some(value()?),
                "--svg" => a.svg = Some(value()?),
                "--blip" => {
                    let v = value()?;
                    a.blip_ms = parse_duration_ms(&v).map_err(|why| {
                        format!("--blip must be a duration such as \"10s\" ({why}), got {v:?}")
                    })?;
                }
                "--json" => a.json = true,
                "-h" | "--help" => a.help = true,
                other => return Err(format!("unknown argument {other:?}\n{USAGE}")),
            }
        }
        if !a.help && a.log.is_some() == a.scenario.is_some() {
            return Err(format!("give exactly one of --log and --scenario\n{USAGE}"));
        }
        Ok(a)
    }
}

/// Runs `harness simulate`.
pub fn run(args: &[String]) -> Result<(), String> {
    let args = Args::parse(args)?;
    if args.help {
        return emit(&format!("{USAGE}\n"));
    }
    let config = match &args.config {
        Some(path) => load_config(&read(path)?).map_err(|e| format!("{path}: {e}"))?,
        None => FilterConfig::default(),
    };
    let (calls, source, malformed, span_ms) = if let Some(path) = &args.log {
        let parsed = parse_log(&read(path)?, &config.upstream_key);
        for m in &parsed.malformed {
            eprintln!("{path}: line {}: skipped: {}", m.line, m.error);
        }
        (parsed.calls, path.clone(), parsed.malformed.len(), None)
    } else if let Some(path) = &args.scenario {
        let scenario = parse_scenario(&read(path)?).map_err(|e| format!("{path}: {e}"))?;
        (
            generate(&scenario)?,
            path.clone(),
            0,
            Some(scenario_span_ms(&scenario)),
        )
    } else {
        return Err(USAGE.into());
    };
    if calls.is_empty() {
        return Err(format!(
            "{source}: no calls to replay ({malformed} malformed lines)"
        ));
    }
    let report = simulate(
        &calls,
        &config,
        &Options {
            source,
            malformed_lines: malformed,
            blip_ms: args.blip_ms,
            span_ms,
        },
    );
    if let Some(out) = &args.svg {
        std::fs::write(out, svg::render(&timeline(&report))).map_err(|e| format!("{out}: {e}"))?;
        eprintln!("wrote {out}");
    }
    if args.json {
        emit(&(render_json(&report)? + "\n"))
    } else {
        emit(&render_table(&report))
    }
}

/// Validates the filter configuration exactly as the filter does; the error is the line the filter
/// logs when Envoy refuses the configuration.
pub fn load_config(text: &str) -> Result<FilterConfig, String> {
    FilterConfig::from_json(text.as_bytes())
        .map_err(|e| format!("circuit breaker configuration rejected: {e}"))
}

fn read(path: &str) -> Result<String, String> {
    if path == "-" {
        let mut s = String::new();
        std::io::Read::read_to_string(&mut std::io::stdin(), &mut s)
            .map_err(|e| format!("stdin: {e}"))?;
        return Ok(s);
    }
    std::fs::read_to_string(path).map_err(|e| format!("{path}: {e}"))
}

fn emit(text: &str) -> Result<(), String> {
    let mut out = std::io::stdout().lock();
    match out.write_all(text.as_bytes()).and_then(|()| out.flush()) {
        // A reader that went away (`| head`) is not an error of ours.
        Err(e) if e.kind() != std::io::ErrorKind::BrokenPipe => Err(format!("stdout: {e}")),
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc3339_round_trips_and_handles_offsets() {
        let ms = parse_rfc3339_ms("2026-11-22T10:00:00.123Z").unwrap();
        assert_eq!(format_rfc3339_ms(ms), "2026-11-22T10:00:00.123Z");
        assert_eq!(parse_rfc3339_ms("1970-01-01T00:00:00Z").unwrap(), 0);
        assert_eq!(
            parse_rfc3339_ms("2000-03-01T00:00:00Z").unwrap(),
            951_868_800_000
        );
        assert_eq!(
            parse_rfc3339_ms("2026-11-22T11:00:00.5+01:00").unwrap(),
            ms - 123 + 500
        );
        assert_eq!(
            parse_rfc3339_ms("2026-11-22 10:00:00.123456789z").unwrap(),
            ms
        );
        assert_eq!(
            parse_rfc3339_ms("2024-02-29T00:00:00Z")
                .map(format_rfc3339_ms)
                .unwrap(),
            "2024-02-29T00:00:00.000Z"
        );
        for bad in [
            "2026-11-22",
            "2026-13-01T00:00:00Z",
            "2023-02-29T00:00:00Z",
            "2026-11-22T10:00:00",
            "2026-11-22T10:00:00.Z",
            "1969-12-31T23:59:59Z",
            "2026-11-22T24:00:00Z",
            "2026-11-22T10:00:00+1:00",
        ] {
            assert!(parse_rfc3339_ms(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn log_lines_accept_envoy_spellings() {
        let line = r#"{"start_time":"2026-11-22T10:00:00.000Z","duration":"12","response_code":"200","grpc_status":"DeadlineExceeded","response_flags":"UT,XYZ","upstream_cluster":"c","path":"/a.B/C","x_tenant":"t1","request_headers":{"X-Team":"blue"}}"#;
        let parse = |key: &UpstreamKey| parse_log_line(line, 4, key).unwrap().unwrap();
        let call = parse(&UpstreamKey::Cluster);
        assert_eq!(
            (
                call.line,
                call.duration_ms,
                call.response_code,
                call.grpc_status
            ),
            (4, 12, Some(200), Some(4))
        );
        assert!(
            call.grpc && call.response_flags.upstream_failed(),
            "unknown flags do not hide known ones"
        );
        assert!(
            call.fields.is_empty(),
            "nothing kept that the key does not need"
        );
        assert_eq!(
            call.upstream_key(&UpstreamKey::Cluster).as_deref(),
            Some("c")
        );
        assert_eq!(
            call.upstream_key(&UpstreamKey::GrpcService).as_deref(),
            Some("a.B")
        );
        assert_eq!(
            call.upstream_key(&UpstreamKey::GrpcMethod).as_deref(),
            Some("a.B/C")
        );
        assert_eq!(call.upstream_key(&UpstreamKey::Authority), None);
        for (name, value) in [
            ("x-tenant", Some("t1")),
            ("x-team", Some("blue")),
            ("x-other", None),
        ] {
            let key = UpstreamKey::Header(name.into());
            assert_eq!(parse(&key).upstream_key(&key).as_deref(), value, "{name}");
        }

        let cluster = UpstreamKey::Cluster;
        let call = parse_log_line(
            r#"{"start_time":1000,"duration":null,"response_code":0,"grpc_status":"-","response_flags":"-","content_type":"application/grpc+proto"}"#,
            1,
            &cluster,
        )
        .unwrap()
        .unwrap();
        assert_eq!(
            (call.duration_ms, call.response_code, call.grpc_status),
            (0, None, None)
        );
        assert!(call.grpc, "content type alone makes it gRPC");
        assert_eq!(parse_log_line("   ", 2, &cluster), Ok(None));
        let err = |l: &str| parse_log_line(l, 3, &cluster).unwrap_err();
        assert!(err(r#"{"duration":1}"#).contains("start_time is missing"));
        assert!(err(r#"{"start_time":"x","duration":1}"#)
            .starts_with("start_time: not an RFC 3339 time"));
        assert!(err(r#"{"start_time":0,"grpc_status":"Nope"}"#).contains("grpc_status"));
        assert!(err(r#"{"start_time":0,"response_code":"abc"}"#).contains("response_code"));
        assert!(err("[1]").contains("not a JSON object"));
    }

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

    #[test]
    fn failure_episode_spans_bad_seconds_and_bridges_silence() {
        let cfg = BreakerConfig::default();
        let mut b = BTreeMap::new();
        let bucket = |judged, failures| SecondBucket {
            judged,
            failures,
            slow: 0,
        };
        b.insert(1, bucket(10, 0));
        b.insert(2, bucket(10, 6));
        b.insert(3, bucket(4, 4));
        b.insert(6, bucket(1, 1)); // 4 and 5 had no calls
        b.insert(7, bucket(10, 1));
        assert_eq!(failure_episode_ms(&b, &cfg, 3_500), 5_000, "seconds 2 to 6");
        assert_eq!(
            failure_episode_ms(&b, &cfg, 4_500),
            5_000,
            "the last second with calls counts"
        );
        assert_eq!(
            failure_episode_ms(&b, &cfg, 7_200),
            0,
            "a good second: no episode"
        );
        assert_eq!(failure_episode_ms(&b, &cfg, 500), 0);
    }

    #[test]
    fn generated_traffic_is_deterministic_and_follows_phases() {
        let s = parse_scenario(
            r#"{"seed": 3, "rate_per_sec": 100, "duration_s": 20, "upstreams": {
                "a": [{"from_s": 0, "to_s": 10, "latency_ms": 40}, {"from_s": 10, "to_s": 30, "failure_rate": 1, "failure": "UF"}]}}"#,
        )
        .unwrap();
        let calls = generate(&s).unwrap();
        assert_eq!(calls, generate(&s).unwrap());
        assert!((1_700..2_300).contains(&calls.len()), "{}", calls.len());
        assert!(
            calls.iter().all(|c| c.start_ms < 20_000),
            "cut at duration_s"
        );
        let cfg = BreakerConfig::default();
        for c in &calls {
            let failed = c.classify(&cfg).outcome == Outcome::Failure;
            assert_eq!(failed, c.start_ms >= 10_000, "call at {}", c.start_ms);
            if c.start_ms < 10_000 {
                assert!((30..=50).contains(&c.duration_ms));
            }
        }
        assert_eq!(scenario_span_ms(&s), (0, 20_000));
        assert!(
            parse_scenario(r#"{"upstreams": {"a": [{"from_s": 0, "to_s": 1}]}}"#)
                .unwrap_err()
                .contains("rate_per_sec")
        );
        assert!(parse_scenario(r#"{"rate_per_sec": 1, "upstreams": {"a": [{"from_s": 0, "to_s": 1, "failure_rate": 2}]}}"#).unwrap_err().contains("failure_rate"));
        assert!(parse_scenario(r#"{"rate_per_sec": 1, "upstreams": {"a": [{"from_s": 0, "to_s": 1, "failure": "BOOM"}]}}"#).unwrap_err().contains("BOOM"));
        assert!(parse_scenario(r#"{"rate": 1, "upstreams": {}}"#)
            .unwrap_err()
            .contains("unknown field"));
    }

    #[test]
    fn args_need_one_input() {
        let args = |v: &[&str]| Args::parse(&v.iter().map(|s| s.to_string()).collect::<Vec<_>>());
        assert!(args(&[]).is_err());
        assert!(args(&["--log", "a", "--scenario", "b"]).is_err());
        let a = args(&["--log=a", "--json", "--blip", "2.5s"]).unwrap();
        assert_eq!(
            (a.log.as_deref(), a.json, a.blip_ms),
            (Some("a"), true, 2_500)
        );
        assert!(args(&["--log", "a", "--blip", "soon"])
            .unwrap_err()
            .contains("--blip"));
        assert!(args(&["--log"]).unwrap_err().contains("needs a value"));
    }
}
