//! The worker: stuck calls recorded once, outcomes that lose every race retried, the gauge on the
//! stored state, reloads that never reshape back, bounded memory.

use std::cell::Cell;
use std::sync::Arc;

use super::*;
use crate::breaker::BreakerState;
use crate::classify::ResponseFlags;
use crate::host::Action;
use crate::session::Session;
use crate::store::{CasToken, MemoryStore, SharedData, SharedStore, StoreError};
use crate::testing::{worker, FakeHost};
#[cfg(target_arch = "wasm32")]
use wasm_bindgen_test::wasm_bindgen_test as test;

const FAILURES: &str = "circuit_breaker_calls_total{upstream=content,result=failure}";
const SUCCESSES: &str = "circuit_breaker_calls_total{upstream=content,result=success}";
const STUCK: &str = "circuit_breaker_stuck_calls_total{upstream=content}";

fn start<S: BreakerStore>(w: &mut Worker<S>, now: u64) -> (Session, FakeHost) {
    let mut h = FakeHost::grpc(now);
    let mut s = Session::new();
    assert_eq!(s.on_request(w, &mut h, true), Action::Continue);
    assert!(s.in_flight(), "admitted");
    (s, h)
}

fn answer<S: BreakerStore>(w: &mut Worker<S>, s: &mut Session, h: &mut FakeHost, status: &str) {
    h.resp(":status", "200").resp("grpc-status", status);
    s.on_response_headers(w, h, true);
    s.on_end(w, h);
}

fn state(w: &mut Worker<SharedData<Arc<MemoryStore>>>) -> BreakerState {
    let slot = crate::registry::home_slot("content", w.store().capacity());
    match w.store().read(slot).unwrap() {
        crate::store::SlotRead::Held(s) => s.breaker.state,
        other => panic!("no breaker: {other:?}"),
    }
}

#[test]
fn a_stuck_call_is_recorded_once_when_it_crosses_the_limit_and_not_again_when_it_ends() {
    let store = Arc::new(MemoryStore::new());
    let mut w = worker(r#"{"stuck_call_duration": "500ms"}"#, &store);
    for late in ["0", "14"] {
        let mut t = FakeHost::default();
        let (mut s, mut h) = start(&mut w, 1_000);
        w.tick(1_499, &mut t);
        assert_eq!(t.counter(STUCK), 0, "not yet");
        w.tick(1_500, &mut t);
        assert_eq!((t.counter(STUCK), t.counter(FAILURES)), (1, 1));
        w.tick(1_600, &mut t);
        assert_eq!(t.counter(STUCK), 1, "once");
        assert_eq!(w.calls_in_flight(), 1, "stuck, kept until it ends");
        // The call ends later (a success, or a failure): its ticket is spent.
        h.now = Some(3_000);
        answer(&mut w, &mut s, &mut h, late);
        assert_eq!(h.counter(FAILURES) + h.counter(SUCCESSES), 0, "late {late}");
        assert_eq!(w.calls_in_flight(), 0);
    }
    // Or it is reset in the end.
    let mut t = FakeHost::default();
    let (mut s, mut h) = start(&mut w, 10_000);
    w.tick(10_500, &mut t);
    h.flags = Some(ResponseFlags::UPSTREAM_REMOTE_RESET);
    s.on_end(&mut w, &mut h);
    assert_eq!((t.counter(STUCK), h.counter(FAILURES)), (1, 0));
}

#[test]
fn a_call_that_ends_in_time_leaves_the_table_and_is_recorded_normally() {
    let store = Arc::new(MemoryStore::new());
    let mut w = worker(r#"{"stuck_call_duration": "500ms"}"#, &store);
    let (mut s, mut h) = start(&mut w, 0);
    assert_eq!(w.calls_in_flight(), 1);
    h.now = Some(499);
    answer(&mut w, &mut s, &mut h, "0");
    assert_eq!((h.counter(SUCCESSES), w.calls_in_flight()), (1, 0));
    let mut t = FakeHost::default();
    w.tick(10_000, &mut t);
    assert_eq!(t.counter(STUCK), 0);
}

#[test]
fn stuck_calls_open_the_breaker_while_no_call_has_finished_and_the_next_request_checks_too() {
    let store = Arc::new(MemoryStore::new());
    let mut w = worker(
        r#"{"stuck_call_duration": "500ms", "failure_threshold": 3}"#,
        &store,
    );
    let hung: Vec<_> = (0..3).map(|i| start(&mut w, i)).collect();
    // No tick: the next request for the upstream finds the three stuck ones first, and is rejected.
    let mut h = FakeHost::grpc(502);
    assert_eq!(
        Session::new().on_request(&mut w, &mut h, true),
        Action::Stop
    );
    assert_eq!(h.counter(STUCK), 3);
    assert_eq!(
        h.counter("circuit_breaker_open_total{upstream=content,reason=consecutive_failures}"),
        1
    );
    drop(hung);
}

#[test]
fn a_stuck_probe_frees_its_permit_as_a_failed_probe() {
    let store = Arc::new(MemoryStore::new());
    let mut w = worker(
        r#"{"stuck_call_duration": "500ms", "failure_threshold": 1, "open_timeout": "1s"}"#,
        &store,
    );
    let (mut s, mut h) = start(&mut w, 0);
    answer(&mut w, &mut s, &mut h, "14");
    let (mut probe, mut ph) = start(&mut w, 1_000);
    assert!(matches!(
        state(&mut w),
        BreakerState::HalfOpen { in_flight: 1, .. }
    ));
    let mut t = FakeHost::default();
    w.tick(1_500, &mut t);
    assert_eq!(
        t.counter("circuit_breaker_open_total{upstream=content,reason=half_open_failure}"),
        1
    );
    assert!(matches!(state(&mut w), BreakerState::Open { .. }));
    ph.now = Some(1_600);
    answer(&mut w, &mut probe, &mut ph, "0");
    assert_eq!(ph.counter(SUCCESSES), 0, "the late answer is not recorded");
}

/// Shared data whose writes lose the race a given number of times.
struct Contended {
    inner: MemoryStore,
    lose: Cell<u32>,
}

impl SharedStore for Contended {
    fn get(&self, key: &str) -> Result<Option<(Vec<u8>, CasToken)>, StoreError> {
        self.inner.get(key)
    }
    fn set(&self, key: &str, value: &[u8], cas: Option<CasToken>) -> Result<(), StoreError> {
        if cas.is_some() && self.lose.get() > 0 {
            self.lose.set(self.lose.get() - 1);
            return Err(StoreError::CasMismatch);
        }
        self.inner.set(key, value, cas)
    }
}

#[test]
fn a_probe_whose_record_loses_every_race_is_retried_not_taken_for_a_failure() {
    let store = Contended {
        inner: MemoryStore::new(),
        lose: Cell::new(0),
    };
    let config = FilterConfig::from_json(
        br#"{"failure_threshold": 1, "open_timeout": "1s", "success_threshold": 1}"#,
    )
    .unwrap();
    let mut w = Worker::new(Arc::new(config), 0, SharedData::new(&store, 1024), 0);
    w.prepare().unwrap();
    let (mut s, mut h) = start(&mut w, 0);
    answer(&mut w, &mut s, &mut h, "14");
    let (mut probe, mut ph) = start(&mut w, 1_000);
    store.lose.set(crate::store::MAX_CAS_ATTEMPTS + 1);
    answer(&mut w, &mut probe, &mut ph, "0");
    assert_eq!(ph.counter(SUCCESSES), 0, "not stored yet");
    assert_eq!(ph.counter("circuit_breaker_cas_give_ups_total"), 1);
    assert_eq!(w.retries_queued(), 1);
    // The next call retries it first: the probe's success closes the breaker.
    let mut t = FakeHost::grpc(1_100);
    let mut next = Session::new();
    assert_eq!(next.on_request(&mut w, &mut t, true), Action::Continue);
    assert_eq!(t.counter(SUCCESSES), 1);
    assert_eq!(
        t.counter("circuit_breaker_state_changes_total{upstream=content,from_state=half_open,to_state=closed}"),
        1
    );
    assert_eq!(w.retries_queued(), 0);
    assert_eq!(
        t.counter("circuit_breaker_open_total{upstream=content,reason=half_open_failure}"),
        0
    );
}

#[test]
fn the_state_gauge_follows_the_stored_state_not_a_workers_first_look() {
    let store = Arc::new(MemoryStore::new());
    let json = r#"{"failure_threshold": 1, "open_timeout": "1s"}"#;
    let mut w1 = worker(json, &store);
    let mut w2 = worker(json, &store);
    // w1 sees the upstream first, closed.
    let (mut s, mut h) = start(&mut w1, 0);
    answer(&mut w1, &mut s, &mut h, "0");
    assert_eq!(h.gauges["circuit_breaker_state{upstream=content}"], 0);
    // w2 opens it.
    let (mut s, mut h2) = start(&mut w2, 1);
    answer(&mut w2, &mut s, &mut h2, "14");
    assert_eq!(h2.gauges["circuit_breaker_state{upstream=content}"], 1);
    // w1's next look sets the gauge to what is stored (open), and a worker that only ever saw it
    // open never writes closed.
    let mut h = FakeHost::grpc(2);
    assert_eq!(
        Session::new().on_request(&mut w1, &mut h, true),
        Action::Stop
    );
    assert_eq!(h.gauges["circuit_breaker_state{upstream=content}"], 1);
    let mut w3 = worker(json, &store);
    let mut h3 = FakeHost::grpc(3);
    Session::new().on_request(&mut w3, &mut h3, true);
    assert_eq!(h3.gauges["circuit_breaker_state{upstream=content}"], 1);
}

/// Shared data that refuses every call.
struct Broken;

impl SharedStore for Broken {
    fn get(&self, _: &str) -> Result<Option<(Vec<u8>, CasToken)>, StoreError> {
        Err(StoreError::Host("get: BadArgument".into()))
    }
    fn set(&self, _: &str, _: &[u8], _: Option<CasToken>) -> Result<(), StoreError> {
        Err(StoreError::Host("set: BadArgument".into()))
    }
}

#[test]
fn health_answers_unknown_when_the_store_cannot_be_read() {
    let mut w = Worker::new(
        Arc::new(FilterConfig::default()),
        0,
        SharedData::new(Broken, 16),
        0,
    );
    let reply = w.health(Some(0));
    assert_eq!(reply.status, 503);
    let body: serde_json::Value = serde_json::from_str(reply.body.as_str()).unwrap();
    assert_eq!(body["status"], "unknown", "never healthy without knowing");
    assert!(body["error"].as_str().unwrap().contains("BadArgument"));
}

#[test]
fn store_errors_are_not_counted_as_cas_retries() {
    let config = FilterConfig::default();
    let mut w = Worker::new(Arc::new(config), 0, SharedData::new(Broken, 1024), 0);
    let mut h = FakeHost::grpc(0);
    assert_eq!(
        Session::new().on_request(&mut w, &mut h, true),
        Action::Continue
    );
    assert_eq!(h.counter("circuit_breaker_untracked_calls_total"), 1);
    assert_eq!(h.counter("circuit_breaker_shared_data_errors_total"), 1);
    assert_eq!(h.counter("circuit_breaker_cas_retries_total"), 0);
}

#[test]
fn an_older_configuration_never_reshapes_what_a_newer_one_shaped() {
    let store = Arc::new(MemoryStore::new());
    let old_cfg =
        FilterConfig::from_json(br#"{"window_size": 50, "minimum_requests": 5}"#).unwrap();
    let new_cfg = FilterConfig::from_json(br#"{"window_duration": "10s"}"#).unwrap();
    let table = |s: &Arc<MemoryStore>| SharedData::new(Arc::clone(s), 1024);
    let mut old = Worker::new(Arc::new(old_cfg), 1_000, table(&store), 0);
    let mut new = Worker::new(Arc::new(new_cfg), 2_000, table(&store), 0);
    old.prepare().unwrap();
    let window_kind = |w: &mut Worker<SharedData<Arc<MemoryStore>>>| {
        let slot = crate::registry::home_slot("content", 1024);
        match w.store().read(slot).unwrap() {
            crate::store::SlotRead::Held(s) => {
                matches!(s.breaker.window, crate::window::Window::Time(_))
            }
            other => panic!("{other:?}"),
        }
    };
    // A stream of the old configuration is still in flight when the new one takes over.
    let (mut old_stream, mut oh) = start(&mut old, 3_000);
    let (mut s, mut h) = start(&mut new, 3_001);
    answer(&mut new, &mut s, &mut h, "0");
    assert!(window_kind(&mut new), "the new configuration's time window");
    answer(&mut old, &mut old_stream, &mut oh, "0");
    assert!(
        window_kind(&mut new),
        "the old stream's record did not reshape it back"
    );
    let (mut s, mut oh) = start(&mut old, 3_002);
    answer(&mut old, &mut s, &mut oh, "14");
    assert!(
        window_kind(&mut new),
        "nor did a new admission on the old configuration"
    );
}

#[test]
fn resolved_settings_are_kept_per_key_and_the_memory_is_bounded() {
    let store = Arc::new(MemoryStore::new());
    let mut w = worker(r#"{"upstreams": {"a*": {"failure_threshold": 1}}}"#, &store);
    // Every glob scan on this thread, whoever asks for it (`FilterConfig::resolve` counts itself).
    let start = crate::config::RESOLUTIONS.with(Cell::get);
    let resolutions = || crate::config::RESOLUTIONS.with(Cell::get) - start;
    assert_eq!(w.settings("abc").1.failure_threshold, 1);
    assert_eq!(w.settings("xyz").1.failure_threshold, 5);
    assert_eq!(resolutions(), 2);
    // Calls of a known key resolve nothing again: admitted, rejected or settled.
    for i in 0..10 {
        let mut h = FakeHost::grpc(i);
        h.cluster = Some(b"abc".to_vec());
        let mut s = Session::new();
        s.on_request(&mut w, &mut h, true);
        h.resp(":status", "200").resp("grpc-status", "14");
        s.on_response_headers(&mut w, &mut h, true);
    }
    assert_eq!(w.settings("abc").1.failure_threshold, 1);
    assert_eq!(resolutions(), 2, "resolved once per key");
    // 2 × max_upstreams (1024) keys at most.
    assert_eq!(w.max_keys, 2_048);
    for i in 0..5_000 {
        w.settings(&format!("junk-{i}"));
    }
    assert!(w.keys.len() <= 2_048);
    assert_eq!(w.settings("abc").1.failure_threshold, 1);
}

#[test]
fn forced_open_rejects_and_reports_the_forced_opening_once() {
    let store = Arc::new(MemoryStore::new());
    let mut w = worker(r#"{"mode": "forced_open"}"#, &store);
    let mut t = FakeHost::default();
    for i in 0..3 {
        let mut h = FakeHost::grpc(i);
        assert_eq!(
            Session::new().on_request(&mut w, &mut h, true),
            Action::Stop
        );
        t.absorb(h);
    }
    assert_eq!(
        t.counter("circuit_breaker_open_total{upstream=content,reason=forced}"),
        1
    );
    assert_eq!(
        t.counter("circuit_breaker_rejected_calls_total{upstream=content}"),
        3
    );
}

/// A call of upstream `key` (by header) at `now`, answered with `status`.
fn call_of<S: BreakerStore>(
    w: &mut Worker<S>,
    key: &str,
    now: u64,
    status: &str,
    t: &mut FakeHost,
) {
    let mut h = FakeHost::grpc(now);
    h.req("x-tenant", key);
    let mut s = Session::new();
    if s.on_request(w, &mut h, true) == Action::Continue {
        h.resp(":status", "200").resp("grpc-status", status);
        s.on_response_headers(w, &mut h, true);
    }
    t.absorb(h);
}

/// A call of upstream `key` that fails at `now`.
fn failing_call_of<S: BreakerStore>(w: &mut Worker<S>, key: &str, now: u64, t: &mut FakeHost) {
    call_of(w, key, now, "14", t);
}

#[test]
fn keys_past_the_label_limit_are_counted_as_other_and_told_once() {
    let store = Arc::new(MemoryStore::new());
    // max_upstreams 2: at most 8 labelled keys in this Envoy's life.
    let json = r#"{"upstream_key": "header:x-tenant", "max_upstreams": 2, "idle_timeout": "1s",
                  "failure_threshold": 2, "open_timeout": "1s"}"#;
    let mut w1 = worker(json, &store);
    let mut w2 = worker(json, &store);
    let mut t = FakeHost::default();
    // Keys come and idle out, each taking a slot in turn, from both workers.
    for i in 0..12u64 {
        let w = if i % 2 == 0 { &mut w1 } else { &mut w2 };
        call_of(w, &format!("Tenant \"{i}\""), 10_000 * i, "0", &mut t);
    }
    assert_eq!(t.counter("circuit_breaker_evicted_total"), 10);
    let labelled: Vec<&String> = t
        .counters
        .keys()
        .filter(|k| k.starts_with("circuit_breaker_calls_total{"))
        .collect();
    assert_eq!(
        labelled.len(),
        9,
        "8 keys of their own and _other: {labelled:?}"
    );
    assert_eq!(
        t.counter("circuit_breaker_calls_total{upstream=_other,result=success}"),
        4
    );
    failing_call_of(&mut w2, "Tenant \"11\"", 120_001, &mut t);
    failing_call_of(&mut w1, "Tenant \"11\"", 120_002, &mut t);
    let told: Vec<&String> = t
        .logs
        .iter()
        .map(|(_, l)| l)
        .filter(|l| l.contains("_other"))
        .collect();
    assert_eq!(
        told.len(),
        1,
        "the first key past the limit is logged once: {told:?}"
    );
    assert!(
        told[0].contains(r#"upstream="Tenant \"8\"""#),
        "{}",
        told[0]
    );
    // Log lines name the real key, quoted, even when its series is _other.
    assert!(t.logs.iter().any(|(_, l)| l
        == r#"circuit breaker state change: upstream="Tenant \"11\"" from=closed to=open reason=consecutive_failures"#));
}

#[test]
fn the_tick_sets_again_a_gauge_that_a_stale_write_left_wrong() {
    let store = Arc::new(MemoryStore::new());
    let json = r#"{"failure_threshold": 1, "open_timeout": "1h"}"#;
    let mut w1 = worker(json, &store);
    // One Envoy, one gauge: both workers report into `t`.
    let mut t = FakeHost::default();
    let (mut s, mut h) = start(&mut w1, 0);
    answer(&mut w1, &mut s, &mut h, "14");
    t.absorb(h);
    assert_eq!(t.gauges["circuit_breaker_state{upstream=content}"], 1);
    // Another worker's write made from an older look lands after it.
    t.gauges
        .insert("circuit_breaker_state{upstream=content}".into(), 0);
    w1.tick(500, &mut t);
    assert_eq!(
        t.gauges["circuit_breaker_state{upstream=content}"], 0,
        "not yet"
    );
    w1.tick(1_000, &mut t);
    assert_eq!(
        t.gauges["circuit_breaker_state{upstream=content}"], 1,
        "set again from the stored state"
    );
}

#[test]
fn health_lists_at_most_100_breakers_those_not_closed_first() {
    let store = Arc::new(MemoryStore::new());
    let json = r#"{"upstream_key": "header:x-tenant", "failure_threshold": 2,
                  "health_path": "/health"}"#;
    let mut w = worker(json, &store);
    let mut t = FakeHost::default();
    for i in 0..150 {
        let key = format!("t{i:03}");
        failing_call_of(&mut w, &key, 0, &mut t);
        if i % 30 == 7 {
            failing_call_of(&mut w, &key, 0, &mut t); // the second failure opens it
        }
    }
    let reply = w.health(Some(1));
    assert_eq!(reply.status, 503);
    let v: serde_json::Value = serde_json::from_str(reply.body.as_str()).unwrap();
    let listed = v["circuit_breakers"].as_array().unwrap();
    assert_eq!(listed.len(), 100);
    assert_eq!(v["omitted"], 50);
    let keys: Vec<&str> = listed
        .iter()
        .map(|b| b["upstream"].as_str().unwrap())
        .collect();
    assert_eq!(
        &keys[..5],
        ["t007", "t037", "t067", "t097", "t127"],
        "open ones first"
    );
    assert!(listed[..5]
        .iter()
        .all(|b| b["state"] == "open" && b["admitting"] == 0.0));
    assert_eq!(keys[5], "t000", "then the closed ones by key");
    assert_eq!(keys[99], "t098", "95 closed ones: t098 is the last listed");
    assert!(
        reply.body.as_str().len() < 30_000,
        "{} bytes",
        reply.body.as_str().len()
    );
}

#[test]
fn an_outcome_whose_slot_went_to_another_upstream_is_counted_as_lost() {
    let store = Arc::new(MemoryStore::new());
    let json = r#"{"upstream_key": "header:x-tenant", "max_upstreams": 1, "idle_timeout": "1s"}"#;
    let mut w = worker(json, &store);
    let mut h = FakeHost::grpc(0);
    h.req("x-tenant", "a");
    let mut s = Session::new();
    assert_eq!(s.on_request(&mut w, &mut h, true), Action::Continue);
    // While a's call is out, a has been idle long enough for b to take the one slot.
    let mut t = FakeHost::default();
    failing_call_of(&mut w, "b", 5_000, &mut t);
    assert_eq!(t.counter("circuit_breaker_evicted_total"), 1);
    h.now = Some(6_000);
    h.resp(":status", "200").resp("grpc-status", "0");
    s.on_response_headers(&mut w, &mut h, true);
    assert_eq!(h.counter("circuit_breaker_lost_outcomes_total"), 1);
    assert_eq!(
        h.counter("circuit_breaker_calls_total{upstream=a,result=success}"),
        0
    );
}
