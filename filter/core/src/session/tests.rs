//! The session over a fake host: every rule of contract sections 3 and 4, as every host runs them.

use std::sync::Arc;

use super::*;
use crate::store::MemoryStore;
use crate::testing::{worker, FakeHost};
#[cfg(target_arch = "wasm32")]
use wasm_bindgen_test::wasm_bindgen_test as test;

type W = Worker<crate::store::SharedData<Arc<MemoryStore>>>;

const FAILURES: &str = "circuit_breaker_calls_total{upstream=content,result=failure}";
const SUCCESSES: &str = "circuit_breaker_calls_total{upstream=content,result=success}";
const REJECTED: &str = "circuit_breaker_rejected_calls_total{upstream=content}";
const UNTRACKED: &str = "circuit_breaker_untracked_calls_total";

fn setup(json: &str) -> (Arc<MemoryStore>, W) {
    let store = Arc::new(MemoryStore::new());
    let w = worker(json, &store);
    (store, w)
}

/// A whole gRPC call that ends with `grpc-status` in its trailers; returns the host for assertions.
fn grpc_call(w: &mut W, now: u64, status: &str, telemetry: &mut FakeHost) -> Action {
    let mut h = FakeHost::grpc(now);
    let mut s = Session::new();
    let action = s.on_request(w, &mut h, true);
    if action == Action::Continue {
        h.resp(":status", "200");
        s.on_response_headers(w, &mut h, false);
        h.trailer("grpc-status", status);
        s.on_response_trailers(w, &mut h);
        s.on_end(w, &mut h);
    }
    telemetry.absorb(h);
    action
}

#[test]
fn a_grpc_outcome_is_recorded_when_its_trailers_pass_and_only_then() {
    let (_, mut w) = setup("{}");
    let mut h = FakeHost::grpc(0);
    let mut s = Session::new();
    assert_eq!(s.on_request(&mut w, &mut h, true), Action::Continue);
    assert!(s.in_flight());
    h.resp(":status", "200");
    s.on_response_headers(&mut w, &mut h, false);
    assert_eq!(
        h.counter(FAILURES),
        0,
        "headers of a gRPC response settle nothing"
    );
    h.trailer("grpc-status", "14");
    s.on_response_trailers(&mut w, &mut h);
    assert_eq!(h.counter(FAILURES), 1, "recorded as the trailers pass");
    assert!(!s.in_flight());
    s.on_end(&mut w, &mut h);
    assert_eq!(h.counter(FAILURES), 1, "and not again at the end");
}

#[test]
fn trailers_only_grpc_and_http_are_recorded_at_the_response_headers() {
    let (_, mut w) = setup("{}");
    let mut h = FakeHost::grpc(0);
    let mut s = Session::new();
    s.on_request(&mut w, &mut h, true);
    h.resp(":status", "200").resp("grpc-status", "13");
    s.on_response_headers(&mut w, &mut h, true);
    assert_eq!(
        h.counter(FAILURES),
        1,
        "INTERNAL in a trailers-only response"
    );

    for (status, series) in [("503", FAILURES), ("404", SUCCESSES), ("200", SUCCESSES)] {
        let mut h = FakeHost::http(0);
        let mut s = Session::new();
        s.on_request(&mut w, &mut h, true);
        h.resp(":status", status);
        s.on_response_headers(&mut w, &mut h, false);
        assert_eq!(h.counter(series), 1, "HTTP {status}");
    }
}

#[test]
fn response_flags_are_read_only_when_they_could_change_the_outcome() {
    let (_, mut w) = setup(r#"{"failure_grpc_statuses": ["INTERNAL"]}"#);
    // UNAVAILABLE is not a failure status here, but a connect failure (UF) makes it one.
    let mut h = FakeHost::grpc(0);
    h.flags = Some(crate::classify::ResponseFlags::UPSTREAM_CONNECTION_FAILURE);
    let mut s = Session::new();
    s.on_request(&mut w, &mut h, true);
    h.resp(":status", "200").resp("grpc-status", "14");
    s.on_response_headers(&mut w, &mut h, true);
    assert_eq!((h.counter(FAILURES), h.flag_reads), (1, 1));
    // An upstream's OK: nothing Envoy-made, the flags are not read either.
    let mut h = FakeHost::grpc(0);
    let mut s = Session::new();
    s.on_request(&mut w, &mut h, true);
    h.resp(":status", "200").resp("grpc-status", "0");
    s.on_response_headers(&mut w, &mut h, true);
    assert_eq!((h.counter(SUCCESSES), h.flag_reads), (1, 0));
    // Already a failure by its status: the flags are not read.
    let mut h = FakeHost::grpc(0);
    let mut s = Session::new();
    s.on_request(&mut w, &mut h, true);
    h.resp(":status", "200").resp("grpc-status", "13");
    s.on_response_headers(&mut w, &mut h, true);
    assert_eq!((h.counter(FAILURES), h.flag_reads), (1, 0));
}

#[test]
fn the_fifth_failure_opens_and_the_next_grpc_call_gets_unavailable_at_once() {
    let (_, mut w) = setup(r#"{"open_timeout": "10s"}"#);
    let mut t = FakeHost::default();
    for i in 0..5 {
        assert_eq!(grpc_call(&mut w, i, "14", &mut t), Action::Continue);
    }
    assert_eq!(t.counter(FAILURES), 5);
    assert_eq!(
        t.counter("circuit_breaker_open_total{upstream=content,reason=consecutive_failures}"),
        1
    );
    assert_eq!(t.gauges["circuit_breaker_state{upstream=content}"], 1);
    assert!(t
        .logs
        .iter()
        .any(|(_, l)| l
            == "circuit breaker state change: upstream=content from=closed to=open reason=consecutive_failures"));

    let mut h = FakeHost::grpc(1_000);
    let mut s = Session::new();
    assert_eq!(s.on_request(&mut w, &mut h, true), Action::Stop);
    assert!(!s.in_flight());
    let reply = &h.replies[0];
    let header = |n: &str| reply.header(n);
    assert_eq!(reply.status, 200);
    assert_eq!(header("grpc-status"), Some("14"));
    assert_eq!(header("grpc-retry-pushback-ms"), Some("9004"));
    assert_eq!(header("x-circuit-breaker"), Some("open"));
    assert_eq!(h.counter(REJECTED), 1);
    // The end of a rejected stream records nothing.
    s.on_end(&mut w, &mut h);
    assert_eq!(h.counter(FAILURES) + h.counter(SUCCESSES), 0);

    let mut h = FakeHost::http(1_000);
    assert_eq!(
        Session::new().on_request(&mut w, &mut h, true),
        Action::Stop
    );
    let reply = &h.replies[0];
    assert_eq!(reply.status, 503);
    assert_eq!(reply.header("retry-after"), Some("10"));
}

#[test]
fn a_reset_is_a_failure_and_a_cancel_is_not() {
    use crate::classify::ResponseFlags as F;
    let (_, mut w) = setup("{}");
    let end = |w: &mut W, flags: u64, headers_first: bool| {
        let mut h = FakeHost::grpc(0);
        let mut s = Session::new();
        s.on_request(w, &mut h, true);
        if headers_first {
            h.resp(":status", "200");
            s.on_response_headers(w, &mut h, false);
        }
        h.flags = Some(flags);
        h.now = Some(50);
        s.on_end(w, &mut h);
        (h.counter(FAILURES), h.counter(SUCCESSES), h.flag_reads)
    };
    assert_eq!(end(&mut w, F::UPSTREAM_REMOTE_RESET, false), (1, 0, 1));
    assert_eq!(end(&mut w, F::UPSTREAM_REMOTE_RESET, true), (1, 0, 1));
    assert_eq!(end(&mut w, F::DOWNSTREAM_REMOTE_RESET, false), (0, 0, 1));
    // A server-streaming call cancelled after its headers came: ignored, not INTERNAL.
    assert_eq!(end(&mut w, F::DOWNSTREAM_REMOTE_RESET, true), (0, 0, 1));
    assert_eq!(
        end(&mut w, F::DOWNSTREAM_CONNECTION_TERMINATION, true),
        (0, 0, 1)
    );
}

#[test]
fn a_client_that_gives_up_at_its_deadline_records_deadline_exceeded() {
    use crate::classify::ResponseFlags as F;
    let (_, mut w) = setup("{}");
    let cancel_at = |w: &mut W, timeout: &str, at: u64| {
        let mut h = FakeHost::grpc(1_000);
        h.req("grpc-timeout", timeout);
        let mut s = Session::new();
        s.on_request(w, &mut h, true);
        h.flags = Some(F::DOWNSTREAM_REMOTE_RESET);
        h.now = Some(1_000 + at);
        s.on_end(w, &mut h);
        (h.counter(FAILURES), h.counter(SUCCESSES))
    };
    assert_eq!(cancel_at(&mut w, "300m", 300), (1, 0));
    assert_eq!(cancel_at(&mut w, "300m", 285), (1, 0), "within 20 ms of it");
    assert_eq!(cancel_at(&mut w, "300m", 150), (0, 0), "long before it");
    assert_eq!(cancel_at(&mut w, "2S", 1_950), (1, 0));
    assert_eq!(cancel_at(&mut w, "300000u", 300), (1, 0));
    assert_eq!(
        cancel_at(&mut w, "300 m", 300),
        (0, 0),
        "malformed: no deadline"
    );
    assert_eq!(
        cancel_at(&mut w, "123456789m", 300),
        (0, 0),
        "too many digits"
    );
    // Not a gRPC request: grpc-timeout means nothing.
    let mut h = FakeHost::http(0);
    h.req("grpc-timeout", "100m");
    let mut s = Session::new();
    s.on_request(&mut w, &mut h, true);
    h.flags = Some(F::DOWNSTREAM_REMOTE_RESET);
    h.now = Some(500);
    s.on_end(&mut w, &mut h);
    assert_eq!(h.counter(FAILURES), 0);
}

#[test]
fn what_the_client_sends_never_changes_an_outcome() {
    let (_, mut w) = setup("{}");
    let mut h = FakeHost::grpc(0);
    h.req("grpc-status", "0")
        .req("x-circuit-breaker", "closed")
        .req("x-envoy-upstream-rq-timeout-ms", "1");
    let mut s = Session::new();
    s.on_request(&mut w, &mut h, true);
    h.resp(":status", "200");
    s.on_response_headers(&mut w, &mut h, false);
    h.trailer("grpc-status", "14");
    s.on_response_trailers(&mut w, &mut h);
    assert_eq!(h.counter(FAILURES), 1);
    // A stream that ends with nothing: the request's grpc-status is not read as the answer.
    let mut h = FakeHost::grpc(0);
    h.req("grpc-status", "14");
    let mut s = Session::new();
    s.on_request(&mut w, &mut h, true);
    h.flags = Some(crate::classify::ResponseFlags::DOWNSTREAM_REMOTE_RESET);
    s.on_end(&mut w, &mut h);
    assert_eq!(h.counter(FAILURES) + h.counter(SUCCESSES), 0);
}

#[test]
fn the_health_endpoint_answers_get_only_and_counts_no_call() {
    let (_, mut w) = setup(r#"{"health_path": "/health/cb"}"#);
    let mut t = FakeHost::default();
    grpc_call(&mut w, 0, "0", &mut t);
    let mut h = FakeHost::http(0);
    h.req(":path", "/health/cb?verbose=1");
    let mut s = Session::new();
    assert_eq!(s.on_request(&mut w, &mut h, true), Action::Stop);
    let body: serde_json::Value = serde_json::from_str(h.replies[0].body.as_str()).unwrap();
    assert_eq!(h.replies[0].status, 200);
    assert_eq!(body["status"], "healthy");
    assert_eq!(body["circuit_breakers"][0]["upstream"], "content");
    assert_eq!(body["circuit_breakers"][0]["calls_in_window"], 1);
    s.on_end(&mut w, &mut h);
    assert_eq!(h.counters.values().sum::<u64>(), 0, "no metric moved");
    let mut h = FakeHost::http(0);
    h.req(":path", "/health/cb").req(":method", "POST");
    assert_eq!(
        Session::new().on_request(&mut w, &mut h, true),
        Action::Continue
    );
    assert!(h.replies.is_empty());
}

#[test]
fn the_health_endpoint_says_unknown_when_the_clock_fails_only_about_the_time_left() {
    let (_, mut w) = setup(r#"{"health_path": "/h", "failure_threshold": 1}"#);
    let mut t = FakeHost::default();
    grpc_call(&mut w, 0, "14", &mut t);
    let mut h = FakeHost::http(0);
    h.req(":path", "/h");
    h.now = None;
    Session::new().on_request(&mut w, &mut h, true);
    let body: serde_json::Value = serde_json::from_str(h.replies[0].body.as_str()).unwrap();
    assert_eq!(h.replies[0].status, 503);
    assert_eq!(body["status"], "degraded");
    assert_eq!(body["circuit_breakers"][0]["state"], "open");
    assert!(
        body["circuit_breakers"][0]["retry_after_ms"].is_null(),
        "no epoch-sized guess"
    );
}

#[test]
fn dry_run_marks_and_counts_but_never_rejects() {
    let (_, mut w) = setup(r#"{"mode": "dry_run", "failure_threshold": 2}"#);
    let mut t = FakeHost::default();
    grpc_call(&mut w, 0, "14", &mut t);
    grpc_call(&mut w, 1, "14", &mut t);
    let mut h = FakeHost::grpc(2);
    let mut s = Session::new();
    assert_eq!(s.on_request(&mut w, &mut h, true), Action::Continue);
    assert!(!s.in_flight(), "not recorded");
    h.resp(":status", "200");
    s.on_response_headers(&mut w, &mut h, false);
    assert_eq!(
        h.added_response,
        vec![("x-circuit-breaker-dry-run".to_string(), "open".to_string())]
    );
    assert_eq!(
        h.counter("circuit_breaker_dry_run_rejections_total{upstream=content}"),
        1
    );
    assert_eq!(h.counter(REJECTED), 0);
    assert!(h.replies.is_empty());
}

#[test]
fn a_fallback_replaces_the_rejection() {
    let (_, mut w) = setup(
        r#"{"failure_threshold": 1, "fallback": {"status": 200, "headers": {"x-from": "cache"}, "body": "[]"}}"#,
    );
    let mut t = FakeHost::default();
    grpc_call(&mut w, 0, "14", &mut t);
    let mut h = FakeHost::http(1);
    assert_eq!(
        Session::new().on_request(&mut w, &mut h, true),
        Action::Stop
    );
    assert_eq!(h.replies[0].status, 200);
    assert_eq!(h.replies[0].body.as_str(), "[]");
    assert!(h.replies[0]
        .headers
        .contains(&("x-from".to_string().into(), "cache".to_string().into())));
    let mut h = FakeHost::grpc(1);
    Session::new().on_request(&mut w, &mut h, true);
    assert!(h.replies[0]
        .headers
        .contains(&("grpc-status".to_string().into(), "0".to_string().into())));
}

#[test]
fn a_rejection_the_host_will_not_send_is_untracked_not_rejected() {
    let (_, mut w) = setup(r#"{"failure_threshold": 1}"#);
    let mut t = FakeHost::default();
    grpc_call(&mut w, 0, "14", &mut t);
    let mut h = FakeHost::grpc(1);
    h.refuse_replies = true;
    let mut s = Session::new();
    assert_eq!(s.on_request(&mut w, &mut h, true), Action::Continue);
    assert_eq!((h.counter(REJECTED), h.counter(UNTRACKED)), (0, 1));
}

#[test]
fn calls_without_a_breaker_are_untracked_and_counted() {
    let (_, mut w) = setup(r#"{"upstream_key": "header:x-tenant"}"#);
    let mut h = FakeHost::grpc(0);
    assert_eq!(
        Session::new().on_request(&mut w, &mut h, true),
        Action::Continue
    );
    assert_eq!(h.counter(UNTRACKED), 1, "no header");
    let mut h = FakeHost::grpc(0);
    h.req("x-tenant", &"x".repeat(MAX_KEY_LEN + 1));
    Session::new().on_request(&mut w, &mut h, true);
    assert_eq!(
        h.counter(UNTRACKED),
        1,
        "key too long, refused before any lookup"
    );
    assert_eq!(
        w.store().inner().len(),
        2 + 1024,
        "no slot touched: the table, its marker and the label tally"
    );
    let mut h = FakeHost::grpc(0);
    h.request.insert("x-tenant".into(), vec![0xff, 0xfe]);
    Session::new().on_request(&mut w, &mut h, true);
    assert_eq!(h.counter(UNTRACKED), 1, "not UTF-8");
    let mut h = FakeHost::grpc(0);
    h.req("x-tenant", "acme");
    h.now = None;
    let mut s = Session::new();
    s.on_request(&mut w, &mut h, true);
    assert_eq!(h.counter(UNTRACKED), 1, "no clock");
    assert!(!s.in_flight());
}

#[test]
fn grpc_keys_come_from_the_path() {
    let (_, mut w) = setup(r#"{"upstream_key": "grpc_method", "failure_threshold": 1}"#);
    let mut t = FakeHost::default();
    grpc_call(&mut w, 0, "14", &mut t);
    assert_eq!(
        t.counter("circuit_breaker_calls_total{upstream=social.Content/GetPost,result=failure}"),
        1
    );
    let mut h = FakeHost::grpc(0);
    h.req(":path", "/not-grpc");
    Session::new().on_request(&mut w, &mut h, true);
    assert_eq!(h.counter(UNTRACKED), 1);
}

#[test]
fn disabled_touches_nothing_not_even_the_clock() {
    let (store, mut w) = setup(r#"{"mode": "disabled"}"#);
    let before = store.len();
    let mut h = FakeHost::grpc(0);
    h.now = None;
    let mut s = Session::new();
    assert_eq!(s.on_request(&mut w, &mut h, true), Action::Continue);
    assert!(!s.in_flight());
    assert!(h.counters.is_empty() && h.events.is_empty());
    assert_eq!(store.len(), before);
}

#[test]
fn call_timeout_asks_the_router_for_it() {
    let (_, mut w) = setup(r#"{"call_timeout": "250ms"}"#);
    let mut h = FakeHost::grpc(0);
    Session::new().on_request(&mut w, &mut h, true);
    assert_eq!(
        h.set_request,
        vec![(
            "x-envoy-upstream-rq-timeout-ms".to_string(),
            "250".to_string()
        )]
    );
}

#[test]
fn a_cancelled_probe_gives_its_permit_back() {
    use crate::classify::ResponseFlags as F;
    let (_, mut w) = setup(r#"{"failure_threshold": 1, "open_timeout": "1s"}"#);
    let mut t = FakeHost::default();
    grpc_call(&mut w, 0, "14", &mut t);
    let mut h = FakeHost::grpc(1_000);
    let mut probe = Session::new();
    assert_eq!(probe.on_request(&mut w, &mut h, true), Action::Continue);
    let mut h2 = FakeHost::grpc(1_001);
    assert_eq!(
        Session::new().on_request(&mut w, &mut h2, true),
        Action::Stop,
        "permit taken"
    );
    h.flags = Some(F::DOWNSTREAM_REMOTE_RESET);
    probe.on_end(&mut w, &mut h);
    let mut h3 = FakeHost::grpc(1_002);
    assert_eq!(
        Session::new().on_request(&mut w, &mut h3, true),
        Action::Continue,
        "permit back"
    );
}

#[test]
fn slow_calls_are_counted_beside_their_outcome() {
    let (_, mut w) = setup(r#"{"slow_call_duration": "100ms"}"#);
    let mut h = FakeHost::grpc(0);
    let mut s = Session::new();
    s.on_request(&mut w, &mut h, true);
    h.now = Some(150);
    h.resp(":status", "200").resp("grpc-status", "0");
    s.on_response_headers(&mut w, &mut h, true);
    assert_eq!(h.counter(SUCCESSES), 1);
    assert_eq!(
        h.counter("circuit_breaker_slow_calls_total{upstream=content}"),
        1
    );
}

#[test]
fn every_request_is_a_call_a_rejection_or_untracked() {
    let (_, mut w) = setup(
        r#"{"failure_threshold": 3, "open_timeout": "100ms", "upstream_key": "header:x-up"}"#,
    );
    let mut t = FakeHost::default();
    let mut requests = 0u64;
    for i in 0..300u64 {
        let mut h = FakeHost::grpc(i * 7);
        match i % 5 {
            0 => {}
            _ => {
                h.req("x-up", if i % 2 == 0 { "a" } else { "b" });
            }
        }
        requests += 1;
        let mut s = Session::new();
        if s.on_request(&mut w, &mut h, true) == Action::Continue && s.in_flight() {
            h.resp(":status", "200");
            match i % 3 {
                0 => {
                    h.resp("grpc-status", "14");
                    s.on_response_headers(&mut w, &mut h, true);
                }
                1 => {
                    s.on_response_headers(&mut w, &mut h, false);
                    h.trailer("grpc-status", "0");
                    s.on_response_trailers(&mut w, &mut h);
                }
                _ => h.flags = Some(crate::classify::ResponseFlags::UPSTREAM_REMOTE_RESET),
            }
        }
        s.on_end(&mut w, &mut h);
        t.absorb(h);
    }
    let sum = |prefix: &str| -> u64 {
        t.counters
            .iter()
            .filter(|(k, _)| k.starts_with(prefix))
            .map(|(_, v)| v)
            .sum()
    };
    let calls = sum("circuit_breaker_calls_total");
    let rejected = sum("circuit_breaker_rejected_calls_total");
    let untracked = sum(UNTRACKED);
    assert!(rejected > 0 && untracked > 0 && calls > 0);
    assert_eq!(calls + rejected + untracked, requests);
}

#[test]
fn a_stream_is_idle_once_nothing_is_left_to_settle_or_mark() {
    let (_, mut w) = setup(r#"{"failure_threshold": 1}"#);
    let mut h = FakeHost::grpc(0);
    let mut s = Session::new();
    assert!(s.idle());
    s.on_request(&mut w, &mut h, true);
    assert!(!s.idle(), "a call to settle");
    h.resp(":status", "200").resp("grpc-status", "14");
    s.on_response_headers(&mut w, &mut h, true);
    assert!(s.idle(), "settled");
    let mut h = FakeHost::grpc(1);
    let mut rejected = Session::new();
    assert_eq!(rejected.on_request(&mut w, &mut h, true), Action::Stop);
    assert!(rejected.idle(), "a rejection has nothing left to do");
}

#[test]
fn authorities_that_spell_one_host_differently_share_one_breaker() {
    let (_, mut w) = setup(r#"{"upstream_key": "authority", "failure_threshold": 2}"#);
    let mut t = FakeHost::default();
    let with = |authority: &str, scheme: &str| {
        let mut h = FakeHost::grpc(0);
        h.req(":authority", authority).req(":scheme", scheme);
        h
    };
    for spelling in ["API.Example.com", "api.example.com.:80"] {
        let mut h = with(spelling, "http");
        let mut s = Session::new();
        assert_eq!(s.on_request(&mut w, &mut h, true), Action::Continue);
        h.resp(":status", "200").resp("grpc-status", "14");
        s.on_response_headers(&mut w, &mut h, true);
        t.absorb(h);
    }
    assert_eq!(
        t.counter(
            "circuit_breaker_open_total{upstream=api.example.com,reason=consecutive_failures}"
        ),
        1,
        "two failures of one host, however spelled"
    );
    // No spelling steps around the open breaker; another port is another upstream.
    for spelling in ["api.EXAMPLE.com:80", "api.example.com."] {
        let mut h = with(spelling, "http");
        assert_eq!(
            Session::new().on_request(&mut w, &mut h, true),
            Action::Stop,
            "{spelling}"
        );
    }
    let mut h = with("api.example.com:443", "http");
    assert_eq!(
        Session::new().on_request(&mut w, &mut h, true),
        Action::Continue
    );
    let mut h = with("api.example.com:443", "https");
    assert_eq!(
        Session::new().on_request(&mut w, &mut h, true),
        Action::Stop
    );
}
