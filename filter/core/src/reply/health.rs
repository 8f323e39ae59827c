//! The health endpoint's JSON (contract section 5): every breaker's state, at most
//! [`MAX_HEALTH_ENTRIES`] of them, so the answer stays small whatever clients do to the keys.

use serde::Serialize;

use super::{LocalReply, Text};
use crate::registry::Health;

/// Most breakers one health answer lists: those not closed first, then the closed ones, each group by
/// key; the rest are counted in `omitted`.
pub const MAX_HEALTH_ENTRIES: usize = 100;

#[derive(Serialize)]
struct HealthBody<'a> {
    status: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    error: Option<String>,
    circuit_breakers: Vec<HealthEntry<'a>>,
    omitted: u32,
}

#[derive(Serialize)]
struct HealthEntry<'a> {
    upstream: &'a str,
    state: &'static str,
    failure_rate: f64,
    slow_call_rate: f64,
    calls_in_window: u32,
    consecutive_failures: u32,
    retry_after_ms: Option<u64>,
    admitting: f64,
}

/// The health endpoint's reply: 200 and `healthy` when every breaker is closed; 503 and `degraded`
/// when one is not; 503 and `unknown` when some breaker's state could not be read, because health
/// must never claim healthy without knowing.
pub fn health(h: &Health) -> LocalReply {
    let status = match (h.unreadable, h.not_closed) {
        (0, 0) => "healthy",
        (0, _) => "degraded",
        _ => "unknown",
    };
    let body = HealthBody {
        status,
        error: (h.unreadable > 0).then(|| {
            format!(
                "{} breaker states in shared data could not be read",
                h.unreadable
            )
        }),
        circuit_breakers: h
            .breakers
            .iter()
            .map(|b| HealthEntry {
                upstream: &b.upstream,
                state: b.state.as_str(),
                failure_rate: round4(b.stats.failure_rate()),
                slow_call_rate: round4(b.stats.slow_call_rate()),
                calls_in_window: b.stats.calls,
                consecutive_failures: b.consecutive_failures,
                retry_after_ms: b.retry_after_ms,
                admitting: round4(f64::from(b.admitting_ppm) / 1_000_000.0),
            })
            .collect(),
        omitted: h.omitted,
    };
    json_reply(if status == "healthy" { 200 } else { 503 }, &body)
}

/// The health endpoint's reply when the breakers could not be read at all: 503, `unknown`.
pub fn health_unknown(error: &str) -> LocalReply {
    let body = HealthBody {
        status: "unknown",
        error: Some(error.to_string()),
        circuit_breakers: Vec::new(),
        omitted: 0,
    };
    json_reply(503, &body)
}

fn json_reply(status: u16, body: &HealthBody<'_>) -> LocalReply {
    let json = serde_json::to_string(body).unwrap_or_else(|_| {
        "{\"status\":\"unknown\",\"circuit_breakers\":[],\"omitted\":0}".to_string()
    });
    let mut headers = super::Headers::new();
    headers.push((
        Text::Static("content-type"),
        Text::Static("application/json"),
    ));
    headers.push((Text::Static("cache-control"), Text::Static("no-store")));
    LocalReply {
        status,
        headers,
        body: json.into(),
    }
}

fn round4(x: f64) -> f64 {
    (x * 10_000.0).round() / 10_000.0
}
