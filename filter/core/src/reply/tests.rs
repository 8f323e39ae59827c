//! The replies' tests.
use super::*;
use crate::breaker::{Rejection, StateKind};
use crate::registry::Health;
use crate::registry::UpstreamHealth;
use crate::window::WindowStats;
#[cfg(target_arch = "wasm32")]
use wasm_bindgen_test::wasm_bindgen_test as test;

const OPEN: Rejection = Rejection {
    state: StateKind::Open,
    retry_after_ms: None,
};

fn header<'a>(r: &'a LocalReply, name: &str) -> Option<&'a str> {
    r.header(name)
}

/// The old shape of the call, kept for the tests: a rejection of `upstream` for `r`.
fn rejection_for(grpc: bool, upstream: &str, r: &Rejection, fb: Option<&Fallback>) -> LocalReply {
    rejection(
        grpc,
        &RejectParts::new(upstream),
        r.marker(),
        r.retry_after_ms,
        fb,
    )
}

#[test]
fn grpc_rejection_is_trailers_only_unavailable_with_pushback() {
    let r = rejection_for(
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
    let r = rejection_for(
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
    let r = rejection_for(
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
    let v: serde_json::Value = serde_json::from_str(r.body.as_str()).unwrap();
    assert_eq!(
        v,
        serde_json::json!({"error": "circuit breaker open", "upstream": "a\"b"})
    );
    let r = rejection_for(
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
    let fb = Fallback::new(
        200,
        vec![("x-fallback".into(), "1".into())],
        "cached".into(),
    );
    let r = rejection_for(false, "a", &OPEN, Some(&fb));
    assert_eq!((r.status, r.body.as_str()), (200, "cached"));
    assert_eq!(header(&r, "x-fallback"), Some("1"));
    assert_eq!(header(&r, "x-circuit-breaker"), Some("open"));
    assert_eq!(header(&r, "grpc-status"), None);
}

#[test]
fn a_grpc_fallback_is_trailers_only_with_the_status_the_user_means() {
    let fb = |status, headers: Vec<(&str, &str)>, body: &str| {
        Fallback::new(
            status,
            headers
                .into_iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            body.into(),
        )
    };
    let r = rejection_for(
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
    let r = rejection_for(true, "a", &OPEN, Some(&fb(503, vec![], "")));
    assert_eq!(
        header(&r, "grpc-status"),
        Some("14"),
        "503 maps to UNAVAILABLE"
    );
    assert_eq!(header(&r, "grpc-message"), None);
    let r = rejection_for(true, "a", &OPEN, Some(&fb(429, vec![], "slow down é")));
    assert_eq!(header(&r, "grpc-status"), Some("14"));
    assert_eq!(header(&r, "grpc-message"), Some("slow down %C3%A9"));
    let own = fb(
        200,
        vec![("grpc-status", "5"), ("grpc-message", "gone")],
        "x",
    );
    let r = rejection_for(true, "a", &OPEN, Some(&own));
    assert_eq!(
        header(&r, "grpc-status"),
        Some("5"),
        "the user's own status wins"
    );
    assert_eq!(header(&r, "grpc-message"), Some("gone"));
    assert_eq!(
        r.headers
            .iter()
            .filter(|(k, _)| k.as_str() == "grpc-status")
            .count(),
        1
    );
}

#[test]
fn grpc_message_is_percent_encoded() {
    assert_eq!(percent_encode("100% é\n"), "100%25 %C3%A9%0A");
}

#[test]
fn health_json_follows_the_contract() {
    let b = |upstream: &str, state, admitting_ppm| UpstreamHealth {
        upstream: upstream.into(),
        state,
        stats: WindowStats {
            calls: 57,
            failures: 7,
            slow: 0,
        },
        consecutive_failures: 0,
        retry_after_ms: None,
        admitting_ppm,
    };
    let of = |breakers: Vec<UpstreamHealth>, omitted| Health {
        not_closed: breakers
            .iter()
            .filter(|b| b.state != StateKind::Closed)
            .count() as u32,
        breakers,
        omitted,
        unreadable: 0,
    };
    let r = health(&of(vec![b("content", StateKind::Closed, 1_000_000)], 0));
    assert_eq!(r.status, 200);
    assert_eq!(r.header("content-type"), Some("application/json"));
    let v: serde_json::Value = serde_json::from_str(r.body.as_str()).unwrap();
    assert_eq!(
        v,
        serde_json::json!({"status": "healthy", "omitted": 0, "circuit_breakers": [
            {"upstream": "content", "state": "closed", "failure_rate": 0.1228,
             "slow_call_rate": 0.0, "calls_in_window": 57, "consecutive_failures": 0,
             "retry_after_ms": null, "admitting": 1.0}]})
    );
    let r = health(&of(
        vec![
            b("feed", StateKind::HalfOpen, 0),
            b("content", StateKind::Closed, 325_000),
        ],
        3,
    ));
    assert_eq!(r.status, 503);
    let v: serde_json::Value = serde_json::from_str(r.body.as_str()).unwrap();
    assert_eq!(v["status"], "degraded");
    assert_eq!(v["circuit_breakers"][0]["state"], "half_open");
    assert_eq!(v["circuit_breakers"][0]["admitting"], 0.0);
    assert_eq!(
        v["circuit_breakers"][1]["admitting"], 0.325,
        "a ramp's share"
    );
    assert_eq!(v["omitted"], 3);
    // A breaker not closed among the omitted still makes it degraded.
    let mut h = of(vec![b("content", StateKind::Closed, 1_000_000)], 1);
    h.not_closed = 1;
    assert_eq!(health(&h).status, 503);
    assert_eq!(health(&Health::default()).status, 200);
}

#[test]
fn health_never_claims_healthy_without_knowing() {
    let r = health(&Health {
        unreadable: 2,
        ..Health::default()
    });
    assert_eq!(r.status, 503);
    let v: serde_json::Value = serde_json::from_str(r.body.as_str()).unwrap();
    assert_eq!(v["status"], "unknown");
    assert!(v["error"].as_str().unwrap().contains("2 breaker states"));
    let r = health_unknown("shared data: get failed");
    assert_eq!(r.status, 503);
    let v: serde_json::Value = serde_json::from_str(r.body.as_str()).unwrap();
    assert_eq!(v["status"], "unknown");
    assert_eq!(v["error"], "shared data: get failed");
    assert_eq!(v["circuit_breakers"], serde_json::json!([]));
}

#[test]
fn grpc_detection() {
    assert!(is_grpc(Some(b"application/grpc")));
    assert!(is_grpc(Some(b"application/grpc+proto")));
    assert!(is_grpc(Some(b" Application/GRPC")));
    assert!(!is_grpc(Some(b"application/json")));
    assert!(!is_grpc(Some(b"application/grp")));
    assert!(!is_grpc(None));
}

#[test]
fn a_rejection_is_built_from_the_keys_parts_and_only_the_pushback_is_new() {
    let parts = RejectParts::new("content");
    let a = rejection(true, &parts, "open", Some(1_500), None);
    let b = rejection(true, &parts, "open", Some(900), None);
    let shared = |r: &LocalReply| match &r.headers[2].1 {
        Text::Shared(s) => Arc::as_ptr(s),
        other => panic!("{other:?}"),
    };
    assert_eq!(
        shared(&a),
        shared(&b),
        "the grpc-message is the key's, not a copy"
    );
    assert_eq!(a.header("grpc-retry-pushback-ms"), Some("1500"));
    assert_eq!(b.header("grpc-retry-pushback-ms"), Some("900"));
    assert!(!a.headers.spilled(), "the headers are inline");
    let cut = rejection(true, &parts, "cut", Some(7), None);
    assert_eq!(cut.header("x-circuit-breaker"), Some("cut"));
    let http = rejection(false, &parts, "recovering", Some(250), None);
    assert_eq!(http.header("retry-after"), Some("1"));
    assert_eq!(http.header("x-circuit-breaker"), Some("recovering"));
    // A ramp's tenth can be 5 s: HTTP still says one second, the share grows all the time.
    let http = rejection(false, &parts, "recovering", Some(5_000), None);
    assert_eq!(http.header("retry-after"), Some("1"));
    let open = rejection(false, &parts, "open", Some(5_000), None);
    assert_eq!(open.header("retry-after"), Some("5"));
}

#[test]
fn digits_write_every_u64() {
    for n in [0u64, 7, 10, 1_500, u64::MAX] {
        assert_eq!(Digits::new(n).as_str(), n.to_string());
    }
}
