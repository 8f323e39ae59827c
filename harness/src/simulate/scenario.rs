//! Synthetic traffic: a [`Scenario`] file turned into [`Call`]s, deterministically.

use std::collections::BTreeMap;

use cb_core::classify::{grpc_code_from_name, ResponseFlags};
use serde::Deserialize;
use serde_json::Value;

use super::log::{parse_rfc3339_ms, Call};

/// Most calls a scenario may generate, so a typo in a rate cannot exhaust memory.
pub const MAX_SCENARIO_CALLS: f64 = 5_000_000.0;
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
    /// status (`"503"`, the default for HTTP), Envoy response flags (`"UF"`, `"UT"`, `"UF,URX"`), or
    /// `"hang"`: the upstream answers nothing, and the client cancels (`DC`, no response code) at its
    /// deadline, or after `latency_ms` when the phase sets none.
    #[serde(default)]
    pub failure: Option<String>,
    /// The clients' deadline in ms, sent as `grpc-timeout` on every call of the phase (gRPC only). A
    /// call not answered by then is cancelled then, with no response.
    #[serde(default)]
    pub deadline_ms: Option<f64>,
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
    Hang,
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
        if spec.eq_ignore_ascii_case("hang") {
            return Ok(FailureKind::Hang);
        }
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
                "failure must be a gRPC status name (\"UNAVAILABLE\"), an HTTP status (\"503\"), Envoy response flags (\"UF\") or \"hang\", got {spec:?}"
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
            if let Some(d) = p.deadline_ms {
                if !(d.is_finite() && d >= 1.0 && s.grpc) {
                    return Err(format!(
                        "{at}.deadline_ms must be a number of ms >= 1, in a gRPC scenario, got {d}"
                    ));
                }
            }
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
                let mut call = synthetic_call(
                    name,
                    start.saturating_add(secs_to_ms(t)),
                    latency.round() as u64,
                    s.grpc,
                    failed.then_some(failure),
                );
                if let Some(deadline) = p.deadline_ms {
                    with_deadline(&mut call, deadline.round() as u64);
                }
                calls.push(call);
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
        Some(FailureKind::Hang) => (None, None, cancelled()),
    };
    Call {
        line: 0,
        start_ms,
        duration_ms,
        upstream_cluster: Some(name.to_string()),
        authority: Some(name.to_string()),
        path: Some(format!("/{name}/Call")),
        method: Some("POST".into()),
        // A unary call: its response headers come with its answer.
        response_headers_ms: response_code.map(|_| duration_ms),
        response_code,
        grpc_status,
        response_flags,
        grpc,
        grpc_timeout: None,
        fields: BTreeMap::new(),
    }
}

/// The client sends its deadline, and gives up at it: a hung call, or one slower than it, ends then
/// with a cancel and no response.
fn with_deadline(call: &mut Call, deadline_ms: u64) {
    call.grpc_timeout = Some(format!("{deadline_ms}m"));
    let hung = call.response_code.is_none();
    if hung || call.duration_ms >= deadline_ms {
        call.duration_ms = deadline_ms;
        call.response_code = None;
        call.response_headers_ms = None;
        call.grpc_status = None;
        call.response_flags = cancelled();
    }
}

/// A downstream cancel, as Envoy flags it.
fn cancelled() -> ResponseFlags {
    ResponseFlags(ResponseFlags::DOWNSTREAM_CONNECTION_TERMINATION)
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

#[cfg(test)]
mod tests {
    use super::*;
    use cb_core::classify::Outcome;
    use cb_core::config::FilterConfig;

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
        let judged = crate::simulate::judge_all(&FilterConfig::default(), &calls);
        for (c, j) in calls.iter().zip(judged) {
            let failed = j.unwrap().verdict.outcome == Outcome::Failure;
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
}
