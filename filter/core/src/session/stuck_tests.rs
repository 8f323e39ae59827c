//! The session over a fake host, for the calls that never end (contract sections 2 to 4): stuck means
//! no response headers; a stuck call is recorded once; with `cut_stuck_calls` it gets the breaker's
//! answer, marked `cut`, while the breaker is Open or HalfOpen; the accounting still holds.

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
const STUCK: &str = "circuit_breaker_stuck_calls_total{upstream=content}";
const CUT: &str = "circuit_breaker_cut_calls_total{upstream=content}";
const UNTRACKED: &str = "circuit_breaker_untracked_calls_total";

/// Stuck after 500 ms, cut while open; opens on the third failure.
const CUTS: &str = r#"{"stuck_call_duration": "500ms", "cut_stuck_calls": true,
    "failure_threshold": 3, "open_timeout": "10s"}"#;

fn setup(json: &str) -> W {
    worker(json, &Arc::new(MemoryStore::new()))
}

/// A gRPC call admitted at `now`, whose stream the host can reach as `token`.
fn start(w: &mut W, now: u64, token: u64) -> (Session, FakeHost) {
    let mut h = FakeHost::grpc(now);
    h.token = Some(token);
    let mut s = Session::new();
    assert_eq!(s.on_request(w, &mut h, true), Action::Continue);
    assert!(s.in_flight());
    (s, h)
}

/// A gRPC call that fails at once, at `now`.
fn failing_call(w: &mut W, now: u64, t: &mut FakeHost) {
    let (mut s, mut h) = start(w, now, 0);
    h.resp(":status", "200").resp("grpc-status", "14");
    s.on_response_headers(w, &mut h, true);
    s.on_end(w, &mut h);
    t.absorb(h);
}

#[test]
fn a_stuck_call_of_a_breaker_it_opens_is_cut_once_and_counted_apart() {
    let mut w = setup(
        r#"{"stuck_call_duration": "500ms", "cut_stuck_calls": true, "failure_threshold": 1, "open_timeout": "10s"}"#,
    );
    let mut t = FakeHost::default();
    let (mut s, mut h) = start(&mut w, 1_000, 7);
    assert!(w.tick(1_499, &mut t).is_empty(), "not stuck yet");
    let orders = w.tick(1_500, &mut t);
    assert_eq!((t.counter(STUCK), t.counter(FAILURES)), (1, 1));
    assert_eq!(
        orders.len(),
        1,
        "its failure opened the breaker: cut in the same tick"
    );
    assert_eq!(orders[0].stream, 7);
    // The host reaches the stream and delivers the answer.
    let mut on_stream = FakeHost::grpc(1_500);
    assert!(deliver_cut(&mut w, &mut on_stream, orders[0].call));
    let reply = &on_stream.replies[0];
    assert_eq!(reply.status, 200);
    assert_eq!(reply.header("grpc-status"), Some("14"));
    assert_eq!(reply.header("x-circuit-breaker"), Some("cut"));
    assert_eq!(reply.header("grpc-retry-pushback-ms"), Some("10000"));
    assert_eq!(
        reply.header("grpc-message"),
        Some("circuit breaker open for content")
    );
    assert_eq!(
        (on_stream.counter(CUT), on_stream.counter(REJECTED)),
        (1, 0)
    );
    assert!(!deliver_cut(&mut w, &mut on_stream, orders[0].call), "once");
    assert!(w.tick(1_600, &mut t).is_empty(), "ordered once");
    // Envoy then runs the stream's own callbacks for the reply (wasm), or only its end (native):
    // either way nothing more is recorded for it.
    h.resp(":status", "200").resp("grpc-status", "14");
    s.on_response_headers(&mut w, &mut h, true);
    s.on_end(&mut w, &mut h);
    t.absorb(h);
    t.absorb(on_stream);
    assert_eq!(
        (
            t.counter(FAILURES),
            t.counter(SUCCESSES),
            t.counter(STUCK),
            t.counter(CUT)
        ),
        (1, 0, 1, 1),
        "the one stuck failure is its outcome"
    );
    // One request: calls + rejected + untracked = 1.
    assert_eq!(
        t.counter(FAILURES) + t.counter(SUCCESSES) + t.counter(REJECTED) + t.counter(UNTRACKED),
        1
    );
    assert_eq!(w.calls_in_flight(), 0);
}

#[test]
fn a_call_stuck_before_the_breaker_opened_is_cut_when_it_opens() {
    let mut w = setup(CUTS);
    let mut t = FakeHost::default();
    let (_s, _h) = start(&mut w, 0, 41);
    assert!(
        w.tick(500, &mut t).is_empty(),
        "stuck, but the breaker is closed"
    );
    assert_eq!(t.counter(STUCK), 1);
    failing_call(&mut w, 600, &mut t);
    assert!(w.tick(650, &mut t).is_empty(), "still closed");
    failing_call(&mut w, 700, &mut t); // the third failure opens it
    let orders = w.tick(750, &mut t);
    assert_eq!(
        orders.iter().map(|o| o.stream).collect::<Vec<_>>(),
        vec![41]
    );
    let mut on_stream = FakeHost::grpc(750);
    assert!(deliver_cut(&mut w, &mut on_stream, orders[0].call));
    assert_eq!(
        on_stream.replies[0].header("grpc-retry-pushback-ms"),
        Some("9950"),
        "the time left open"
    );
}

#[test]
fn a_call_whose_response_headers_came_is_never_stuck_nor_cut() {
    let mut w = setup(
        r#"{"stuck_call_duration": "500ms", "cut_stuck_calls": true, "failure_threshold": 1}"#,
    );
    let mut t = FakeHost::default();
    // A server stream: headers at 100 ms, then messages for a long time.
    let (mut stream, mut h) = start(&mut w, 0, 1);
    h.resp(":status", "200");
    h.now = Some(100);
    stream.on_response_headers(&mut w, &mut h, false);
    assert_eq!(w.calls_in_flight(), 0, "it left the table");
    assert!(w.tick(5_000, &mut t).is_empty());
    assert_eq!(t.counter(STUCK), 0);
    // The client ends it at its deadline: the upstream was answering, so that is no failure.
    h.req("grpc-timeout", "5S");
    h.now = Some(5_000);
    h.flags = Some(crate::classify::ResponseFlags::DOWNSTREAM_REMOTE_RESET);
    stream.on_end(&mut w, &mut h);
    t.absorb(h);
    assert_eq!(t.counter(FAILURES) + t.counter(SUCCESSES), 0, "ignored");
    // The same cancel at the deadline with no headers is DEADLINE_EXCEEDED.
    let (mut hung, mut h) = start(&mut w, 10_000, 2);
    h.req("grpc-timeout", "300m");
    h.now = Some(10_300);
    h.flags = Some(crate::classify::ResponseFlags::DOWNSTREAM_REMOTE_RESET);
    hung.on_end(&mut w, &mut h);
    t.absorb(h);
    assert_eq!(t.counter(FAILURES), 1);
}

#[test]
fn without_cut_stuck_calls_or_a_stream_handle_nothing_is_cut() {
    let mut w = setup(r#"{"stuck_call_duration": "500ms", "failure_threshold": 1}"#);
    let mut t = FakeHost::default();
    let (_s, _h) = start(&mut w, 0, 9);
    assert!(w.tick(600, &mut t).is_empty(), "cut_stuck_calls is off");
    assert_eq!(t.counter(STUCK), 1);
    let mut w = setup(
        r#"{"stuck_call_duration": "500ms", "cut_stuck_calls": true, "failure_threshold": 1}"#,
    );
    let mut h = FakeHost::grpc(0);
    h.token = None; // a host that cannot reach the stream later
    Session::new().on_request(&mut w, &mut h, true);
    assert!(w.tick(600, &mut t).is_empty());
}

#[test]
fn a_stuck_call_that_ends_before_its_cut_is_delivered_gets_nothing() {
    let mut w = setup(
        r#"{"stuck_call_duration": "500ms", "cut_stuck_calls": true, "failure_threshold": 1}"#,
    );
    let mut t = FakeHost::default();
    let (mut s, mut h) = start(&mut w, 0, 3);
    let orders = w.tick(500, &mut t);
    assert_eq!(orders.len(), 1);
    // The client cancels before the host gets to the stream.
    h.flags = Some(crate::classify::ResponseFlags::DOWNSTREAM_REMOTE_RESET);
    s.on_end(&mut w, &mut h);
    let mut on_stream = FakeHost::grpc(510);
    assert!(!deliver_cut(&mut w, &mut on_stream, orders[0].call));
    assert!(on_stream.replies.is_empty());
    assert_eq!(on_stream.counter(CUT), 0);
}

#[test]
fn a_stream_idle_timeout_counts_only_once_the_request_was_complete() {
    let flags = crate::classify::ResponseFlags::STREAM_IDLE_TIMEOUT;
    let mut w = setup("{}");
    let mut t = FakeHost::default();
    // The client stalls its upload: the request never ended.
    let mut h = FakeHost::grpc(0);
    let mut s = Session::new();
    s.on_request(&mut w, &mut h, false);
    h.flags = Some(flags);
    h.code = Some(408);
    s.on_end(&mut w, &mut h);
    t.absorb(h);
    assert_eq!(
        t.counter(FAILURES) + t.counter(SUCCESSES),
        0,
        "the client's"
    );
    // The whole request went, and the upstream stalled.
    let mut h = FakeHost::grpc(0);
    let mut s = Session::new();
    s.on_request(&mut w, &mut h, false);
    s.on_request_end();
    h.flags = Some(flags);
    h.code = Some(408);
    s.on_end(&mut w, &mut h);
    t.absorb(h);
    assert_eq!(t.counter(FAILURES), 1, "the upstream's");
}
