//! Reading an Envoy access log: one [`Call`] per JSON line, and the RFC 3339 timestamps it carries.
//!
//! An access log is JSON lines with Envoy's usual keys: `start_time` (RFC 3339, or epoch ms as a
//! number), `duration` (ms), `response_code`, `grpc_status` (a number or a name in any of
//! `%GRPC_STATUS%`'s forms: `UNAVAILABLE`, `Unavailable`, `14`), `response_flags` (`-` or `UF,URX`),
//! `upstream_cluster`, `authority`, `path`, `method`, `content_type`. Numbers may be given as strings
//! (`"duration": "12"`), and `null` or `-` mean absent, as Envoy writes them. A call is gRPC when it has
//! a gRPC status or its `content_type` starts with `application/grpc`. A line that cannot be read is
//! listed with its line number and skipped.
//!
//! Two more keys let the replay judge a call the way the filter does (contract section 3):
//! - `grpc_timeout` (`%REQ(GRPC-TIMEOUT)%`, also read as `grpc-timeout` or inside a
//!   `request_headers` object): the call's deadline, for a client that cancels at it;
//! - `response_duration` (`%RESPONSE_DURATION%`) or `upstream_service_time`
//!   (`%RESP(X-ENVOY-UPSTREAM-SERVICE-TIME)%`, in Istio's default format): when the response headers
//!   came, ms after the start.
//!
//! Whether response headers came at all is `response_code`: Envoy logs 0 (or `-`) when none was sent.
//! Without either timing key, a call with a response code is taken to have had its headers at its end
//! ([`Call::response_headers_after_ms`]): an Envoy local reply is sent then, and a unary call's headers
//! come with its answer; only a long stream in such a log would then look stuck. Without
//! `grpc_timeout`, a call has no deadline, as the filter treats a call without the header: a cancel
//! before any response is then ignored, and only `stuck_call_duration` can see a hang.

use std::borrow::Cow;
use std::collections::BTreeMap;

use cb_core::classify::{grpc_code_from_name, ResponseFlags};
use cb_core::key::{normalize_authority, UpstreamKey};
use cb_core::reply::is_grpc;
use serde_json::{Map, Value};

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
    /// The request's `grpc-timeout` header as sent (`"2S"`, `"300m"`): the core reads the deadline
    /// from it as it reads the header.
    pub grpc_timeout: Option<String>,
    /// When the response headers came, ms after the start, when the log says so; see
    /// [`Call::response_headers_after_ms`] for what is assumed when it does not.
    pub response_headers_ms: Option<u64>,
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
        self.upstream_key_str(kind).map(Cow::into_owned)
    }

    /// [`Call::upstream_key`], borrowed from the call where it can be (every kind but `authority`,
    /// which the core normalises as it keys it: the log has no `:scheme`, so port 80 is the default).
    pub fn upstream_key_str(&self, kind: &UpstreamKey) -> Option<Cow<'_, str>> {
        let key = match kind {
            UpstreamKey::Cluster => self.upstream_cluster.as_deref().map(Cow::Borrowed),
            UpstreamKey::Authority => self
                .authority
                .as_deref()
                .and_then(|a| normalize_authority(a, None))
                .map(Cow::Owned),
            UpstreamKey::GrpcService | UpstreamKey::GrpcMethod => self
                .path
                .as_deref()
                .and_then(|p| kind.from_grpc_path(p))
                .map(Cow::Borrowed),
            UpstreamKey::Header(name) => self.fields.get(name).map(|v| Cow::Borrowed(v.as_str())),
        };
        key.filter(|k| !k.is_empty())
    }

    /// When the response headers came, ms after the start; `None` when none came (no response
    /// code). Without a timing in the log, at the end of the call (see the module docs).
    pub fn response_headers_after_ms(&self) -> Option<u64> {
        self.response_code?;
        Some(
            self.response_headers_ms
                .map_or(self.duration_ms, |ms| ms.min(self.duration_ms)),
        )
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
    let grpc = grpc_status.is_some() || is_grpc(content_type.as_deref().map(str::as_bytes));
    // The first timing the line has, named in the error when it is not a number.
    let timing = ["response_duration", "upstream_service_time"]
        .into_iter()
        .find_map(|name| present(&map, &[name]).map(|v| (name, v)));
    let response_headers_ms = match timing {
        None => None,
        Some((name, v)) => {
            Some(number(v).ok_or_else(|| format!("{name}: not a number of ms: {v}"))?)
        }
    };
    let grpc_timeout = header_field(&map, "grpc-timeout");

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
        grpc_timeout,
        response_headers_ms,
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
            call.grpc && call.response_flags.upstream_failed(true),
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
}
