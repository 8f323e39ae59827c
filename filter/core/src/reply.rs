//! The responses the filter sends itself (contract section 4 and 5): the rejection of a call while the
//! breaker is open, the fallback that replaces it, and the health endpoint's JSON.

use serde::Serialize;

use crate::breaker::{Rejection, StateKind};
use crate::classify::{grpc_code_for_http, GRPC_UNAVAILABLE};
use crate::config::Fallback;
use crate::registry::Health;

/// A response for the host to send.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LocalReply {
    /// HTTP status.
    pub status: u16,
    /// Headers (lower-case names).
    pub headers: Vec<(String, String)>,
    /// Body; empty for a gRPC trailers-only response.
    pub body: Vec<u8>,
}

/// Whether a request is gRPC, from its `content-type`.
pub fn is_grpc(content_type: Option<&str>) -> bool {
    content_type.is_some_and(|ct| {
        ct.trim_start()
            .to_ascii_lowercase()
            .starts_with("application/grpc")
    })
}

/// The reply to a call rejected for `upstream`.
pub fn rejection(
    grpc: bool,
    upstream: &str,
    r: &Rejection,
    fallback: Option<&Fallback>,
) -> LocalReply {
    let marker = r.state.as_str().to_string();
    match (fallback, grpc) {
        (Some(fb), false) => {
            let mut headers = fb.headers.clone();
            set_default(&mut headers, "x-circuit-breaker", marker);
            LocalReply {
                status: fb.status,
                headers,
                body: fb.body.clone().into_bytes(),
            }
        }
        (Some(fb), true) => grpc_fallback(fb, marker),
        (None, true) => {
            let mut headers = vec![
                ("content-type".to_string(), "application/grpc".to_string()),
                ("grpc-status".to_string(), GRPC_UNAVAILABLE.to_string()),
                (
                    "grpc-message".to_string(),
                    percent_encode(&format!("circuit breaker open for {upstream}")),
                ),
            ];
            if let Some(ms) = r.retry_after_ms {
                headers.push(("grpc-retry-pushback-ms".to_string(), ms.to_string()));
            }
            headers.push(("x-circuit-breaker".to_string(), marker));
            // No body: headers with end-of-stream make a gRPC trailers-only response.
            LocalReply {
                status: 200,
                headers,
                body: Vec::new(),
            }
        }
        (None, false) => {
            let body = serde_json::json!({"error": "circuit breaker open", "upstream": upstream})
                .to_string();
            let headers = vec![
                ("content-type".to_string(), "application/json".to_string()),
                (
                    "retry-after".to_string(),
                    retry_after_seconds(r).to_string(),
                ),
                ("x-circuit-breaker".to_string(), marker),
            ];
            LocalReply {
                status: 503,
                headers,
                body: body.into_bytes(),
            }
        }
    }
}

/// A fallback for a gRPC call. Envoy turns every local reply to a gRPC request into a trailers-only
/// response, so a body can never reach the client as a message; what a user writing `status: 200`
/// means is "answer OK". So: `grpc-status` from the fallback's headers when they set it, else `0` for
/// status 200, else the code gRPC derives from that HTTP status (503 → UNAVAILABLE); the body, if
/// any, becomes the `grpc-message`.
fn grpc_fallback(fb: &Fallback, marker: String) -> LocalReply {
    let mut headers = fb.headers.clone();
    let code = match fb.status {
        200 => 0,
        other => grpc_code_for_http(other),
    };
    set_default(&mut headers, "content-type", "application/grpc".to_string());
    set_default(&mut headers, "grpc-status", code.to_string());
    if !fb.body.is_empty() {
        set_default(&mut headers, "grpc-message", percent_encode(&fb.body));
    }
    set_default(&mut headers, "x-circuit-breaker", marker);
    LocalReply {
        status: 200,
        headers,
        body: Vec::new(),
    }
}

/// Adds `name: value` unless a header of that name is there already.
fn set_default(headers: &mut Vec<(String, String)>, name: &str, value: String) {
    if !headers.iter().any(|(k, _)| k == name) {
        headers.push((name.to_string(), value));
    }
}

/// `retry-after` in whole seconds, rounded up so a client never comes back before probes start, and at
/// least 1 (when the time is unknown, a second is a fair guess).
fn retry_after_seconds(r: &Rejection) -> u64 {
    r.retry_after_ms.map_or(1, |ms| ms.div_ceil(1000)).max(1)
}

/// Percent-encodes a `grpc-message` as the gRPC spec asks: every byte outside printable ASCII
/// (0x20..=0x7E), and `%` itself.
pub fn percent_encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if (0x20..=0x7E).contains(&b) && b != b'%' {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

#[derive(Serialize)]
struct HealthBody<'a> {
    status: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    error: Option<String>,
    circuit_breakers: Vec<HealthEntry<'a>>,
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
}

/// The health endpoint's reply: 200 and `healthy` when every breaker is closed; 503 and `degraded`
/// when one is not; 503 and `unknown` when some breaker's state could not be read, because health
/// must never claim healthy without knowing.
pub fn health(h: &Health) -> LocalReply {
    let closed = h.breakers.iter().all(|b| b.state == StateKind::Closed);
    let status = match (h.unreadable, closed) {
        (0, true) => "healthy",
        (0, false) => "degraded",
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
            })
            .collect(),
    };
    json_reply(if status == "healthy" { 200 } else { 503 }, &body)
}

/// The health endpoint's reply when the breakers could not be read at all: 503, `unknown`.
pub fn health_unknown(error: &str) -> LocalReply {
    let body = HealthBody {
        status: "unknown",
        error: Some(error.to_string()),
        circuit_breakers: Vec::new(),
    };
    json_reply(503, &body)
}

fn json_reply(status: u16, body: &HealthBody<'_>) -> LocalReply {
    let json = serde_json::to_vec(body)
        .unwrap_or_else(|_| b"{\"status\":\"unknown\",\"circuit_breakers\":[]}".to_vec());
    LocalReply {
        status,
        headers: vec![
            ("content-type".into(), "application/json".into()),
            ("cache-control".into(), "no-store".into()),
        ],
        body: json,
    }
}

fn round4(x: f64) -> f64 {
    (x * 10_000.0).round() / 10_000.0
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::registry::UpstreamHealth;
    use crate::window::WindowStats;
    #[cfg(target_arch = "wasm32")]
    use wasm_bindgen_test::wasm_bindgen_test as test;

    const OPEN: Rejection = Rejection {
        state: StateKind::Open,
        retry_after_ms: None,
    };

    fn header<'a>(r: &'a LocalReply, name: &str) -> Option<&'a str> {
        r.headers
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }

    #[test]
    fn grpc_rejection_is_trailers_only_unavailable_with_pushback() {
        let r = rejection(
            true,
            "content",
            &Rejection {
                state: StateKind::Open,
                retry_after_ms: Some(1500),
            },
            None,
        );
        assert_eq!(r.status, 200);
        assert!(r.body.is_empty());
        assert_eq!(header(&r, "content-type"), Some("application/grpc"));
        assert_eq!(header(&r, "grpc-status"), Some("14"));
        assert_eq!(
            header(&r, "grpc-message"),
            Some("circuit breaker open for content")
        );
        assert_eq!(header(&r, "grpc-retry-pushback-ms"), Some("1500"));
        assert_eq!(header(&r, "x-circuit-breaker"), Some("open"));
        let r = rejection(
            true,
            "c",
            &Rejection {
                state: StateKind::HalfOpen,
                retry_after_ms: None,
            },
            None,
        );
        assert_eq!(header(&r, "grpc-retry-pushback-ms"), None);
        assert_eq!(header(&r, "x-circuit-breaker"), Some("half_open"));
    }

    #[test]
    fn http_rejection_is_503_with_retry_after_and_json() {
        let r = rejection(
            false,
            "a\"b",
            &Rejection {
                state: StateKind::Open,
                retry_after_ms: Some(1001),
            },
            None,
        );
        assert_eq!(r.status, 503);
        assert_eq!(header(&r, "retry-after"), Some("2"));
        assert_eq!(header(&r, "x-circuit-breaker"), Some("open"));
        let v: serde_json::Value = serde_json::from_slice(&r.body).unwrap();
        assert_eq!(
            v,
            serde_json::json!({"error": "circuit breaker open", "upstream": "a\"b"})
        );
        let r = rejection(
            false,
            "a",
            &Rejection {
                state: StateKind::Open,
                retry_after_ms: Some(0),
            },
            None,
        );
        assert_eq!(header(&r, "retry-after"), Some("1"));
    }

    #[test]
    fn fallback_replaces_the_http_rejection() {
        let fb = Fallback {
            status: 200,
            headers: vec![("x-fallback".into(), "1".into())],
            body: "cached".into(),
        };
        let r = rejection(false, "a", &OPEN, Some(&fb));
        assert_eq!((r.status, r.body.as_slice()), (200, &b"cached"[..]));
        assert_eq!(header(&r, "x-fallback"), Some("1"));
        assert_eq!(header(&r, "x-circuit-breaker"), Some("open"));
        assert_eq!(header(&r, "grpc-status"), None);
    }

    #[test]
    fn a_grpc_fallback_is_trailers_only_with_the_status_the_user_means() {
        let fb = |status, headers: Vec<(&str, &str)>, body: &str| Fallback {
            status,
            headers: headers
                .into_iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            body: body.into(),
        };
        let r = rejection(
            true,
            "a",
            &OPEN,
            Some(&fb(200, vec![("x-fallback", "1")], "cached")),
        );
        assert_eq!((r.status, r.body.is_empty()), (200, true));
        assert_eq!(header(&r, "content-type"), Some("application/grpc"));
        assert_eq!(header(&r, "grpc-status"), Some("0"), "200 means OK");
        assert_eq!(header(&r, "grpc-message"), Some("cached"));
        assert_eq!(header(&r, "x-fallback"), Some("1"));
        assert_eq!(header(&r, "x-circuit-breaker"), Some("open"));
        let r = rejection(true, "a", &OPEN, Some(&fb(503, vec![], "")));
        assert_eq!(
            header(&r, "grpc-status"),
            Some("14"),
            "503 maps to UNAVAILABLE"
        );
        assert_eq!(header(&r, "grpc-message"), None);
        let r = rejection(true, "a", &OPEN, Some(&fb(429, vec![], "slow down é")));
        assert_eq!(header(&r, "grpc-status"), Some("14"));
        assert_eq!(header(&r, "grpc-message"), Some("slow down %C3%A9"));
        let own = fb(
            200,
            vec![("grpc-status", "5"), ("grpc-message", "gone")],
            "x",
        );
        let r = rejection(true, "a", &OPEN, Some(&own));
        assert_eq!(
            header(&r, "grpc-status"),
            Some("5"),
            "the user's own status wins"
        );
        assert_eq!(header(&r, "grpc-message"), Some("gone"));
        assert_eq!(
            r.headers.iter().filter(|(k, _)| k == "grpc-status").count(),
            1
        );
    }

    #[test]
    fn grpc_message_is_percent_encoded() {
        assert_eq!(percent_encode("100% é\n"), "100%25 %C3%A9%0A");
    }

    #[test]
    fn health_json_follows_the_contract() {
        let b = |upstream: &str, state| UpstreamHealth {
            upstream: upstream.into(),
            state,
            stats: WindowStats {
                calls: 57,
                failures: 7,
                slow: 0,
            },
            consecutive_failures: 0,
            retry_after_ms: None,
        };
        let of = |breakers, unreadable| Health {
            breakers,
            unreadable,
        };
        let r = health(&of(vec![b("content", StateKind::Closed)], 0));
        assert_eq!(r.status, 200);
        let v: serde_json::Value = serde_json::from_slice(&r.body).unwrap();
        assert_eq!(v["status"], "healthy");
        assert!(v.get("error").is_none());
        assert_eq!(v["circuit_breakers"][0]["failure_rate"], 0.1228);
        assert_eq!(v["circuit_breakers"][0]["calls_in_window"], 57);
        assert!(v["circuit_breakers"][0]["retry_after_ms"].is_null());
        let r = health(&of(
            vec![
                b("content", StateKind::Closed),
                b("feed", StateKind::HalfOpen),
            ],
            0,
        ));
        assert_eq!(r.status, 503);
        let v: serde_json::Value = serde_json::from_slice(&r.body).unwrap();
        assert_eq!(v["status"], "degraded");
        assert_eq!(v["circuit_breakers"][1]["state"], "half_open");
        assert_eq!(health(&Health::default()).status, 200);
    }

    #[test]
    fn health_never_claims_healthy_without_knowing() {
        let r = health(&Health {
            breakers: Vec::new(),
            unreadable: 2,
        });
        assert_eq!(r.status, 503);
        let v: serde_json::Value = serde_json::from_slice(&r.body).unwrap();
        assert_eq!(v["status"], "unknown");
        assert!(v["error"].as_str().unwrap().contains("2 breaker states"));
        let r = health_unknown("shared data: get failed");
        assert_eq!(r.status, 503);
        let v: serde_json::Value = serde_json::from_slice(&r.body).unwrap();
        assert_eq!(v["status"], "unknown");
        assert_eq!(v["error"], "shared data: get failed");
        assert_eq!(v["circuit_breakers"], serde_json::json!([]));
    }

    #[test]
    fn grpc_detection() {
        assert!(is_grpc(Some("application/grpc")));
        assert!(is_grpc(Some("application/grpc+proto")));
        assert!(!is_grpc(Some("application/json")));
        assert!(!is_grpc(None));
    }
}
