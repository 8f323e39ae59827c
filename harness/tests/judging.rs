//! `simulate` judges logged calls as the filter does (contract section 3): a cancel before any
//! response headers at the `grpc-timeout` deadline is a DEADLINE_EXCEEDED failure, a cancel after
//! response headers is ignored, a call with no response headers is stuck at `stuck_call_duration`,
//! and a log without the timing of the response headers has them at the call's end. Each case is a
//! few hand-written access-log lines, read by the same parser as a real log.

// The whole file is test code: clippy.toml allows these in `#[test]` functions, and the helpers below
// only keep those functions short.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

use std::sync::Arc;

use cb_core::classify::Outcome;
use cb_core::config::FilterConfig;
use cb_core::deadline::deadline_reached;
use cb_core::key::UpstreamKey;
use harness::simulate::{judge, load_config, parse_log, simulate, Call, Options, UpstreamReport};

/// `n` gRPC calls to `hung`, one every 100 ms from t=0, each as `line(i)` spells its other fields.
fn log(n: u64, fields: &str) -> Vec<Call> {
    let text: String = (0..n)
        .map(|i| {
            format!(
                r#"{{"start_time":{},"upstream_cluster":"hung","content_type":"application/grpc",{fields}}}"#,
                i * 100
            ) + "\n"
        })
        .collect();
    let parsed = parse_log(&text, &UpstreamKey::Cluster);
    assert!(parsed.malformed.is_empty(), "{:?}", parsed.malformed);
    parsed.calls
}

fn replay(calls: &[Call], config: &str) -> UpstreamReport {
    let r = simulate(calls, &load_config(config).unwrap(), &Options::default());
    r.upstreams.into_iter().next().unwrap()
}

fn outcome(config: &str, line: &str) -> Option<Outcome> {
    let config = Arc::new(load_config(config).unwrap());
    let call = &log(1, line)[0];
    judge(&config, call).map(|j| j.verdict.outcome)
}

/// A hung upstream as Envoy logs it: no response (code 0), the client cancelled (`DC`) at its 2s
/// deadline.
const HUNG: &str = r#""response_code":0,"response_flags":"DC","duration":2000"#;

#[test]
fn a_cancel_at_the_deadline_before_any_response_is_a_failure_and_opens_the_breaker() {
    let calls = log(40, &format!(r#"{HUNG},"grpc_timeout":"2S""#));
    let hung = replay(&calls, "{}");
    // Five failures in a row: the fifth call's end, at 0.4s + 2s, opens it. The 24 calls that
    // started before that were let through; the 16 from then on (the one starting at that very
    // millisecond too) are rejected, each a failure spared.
    assert_eq!(hung.open_periods.len(), 1, "{hung:#?}");
    assert_eq!(hung.open_periods[0].opened_at_ms, 2_400);
    assert_eq!(hung.log_failures, 40);
    assert_eq!((hung.allowed, hung.failures_let_through), (24, 24));
    assert_eq!((hung.rejected, hung.rejected_would_have_failed), (16, 16));

    // The same log without the deadline: the filter ignores a cancel it cannot tell from a client
    // changing its mind.
    let no_deadline = replay(&log(40, HUNG), "{}");
    assert_eq!(
        (no_deadline.log_failures, no_deadline.open_periods.len()),
        (0, 0),
        "{no_deadline:#?}"
    );
}

#[test]
fn a_hang_without_a_deadline_is_seen_by_stuck_call_duration_at_that_moment() {
    let calls = log(10, HUNG);
    let hung = replay(&calls, r#"{"stuck_call_duration": "1s"}"#);
    assert_eq!(hung.log_failures, 10, "{hung:#?}");
    // Recorded as stuck one second after each start: the fifth at 0.4s + 1s opens the breaker, long
    // before the calls end.
    assert_eq!(hung.open_periods.len(), 1, "{hung:#?}");
    assert_eq!(hung.open_periods[0].opened_at_ms, 1_400);
    assert_eq!(
        hung.failures_let_through, 10,
        "the calls already going are stuck too"
    );
}

#[test]
fn the_deadline_counts_from_the_cores_tolerance_before_it() {
    for ms in [1_800, 1_899, 1_900, 1_950, 2_000, 2_500] {
        let line = format!(
            r#""response_code":0,"response_flags":"DC","duration":{ms},"grpc_timeout":"2000m""#
        );
        let expected = if deadline_reached(2_000_000, ms) {
            Outcome::Failure
        } else {
            Outcome::Ignored
        };
        assert_eq!(
            outcome("{}", &line),
            Some(expected),
            "cancelled after {ms}ms"
        );
    }
    assert_eq!(
        outcome(
            r#"{"failure_grpc_statuses": ["UNAVAILABLE"]}"#,
            r#""response_code":0,"response_flags":"DC","duration":2000,"grpc_timeout":"2S""#
        ),
        Some(Outcome::Success),
        "DEADLINE_EXCEEDED counts only where failure_grpc_statuses lists it"
    );
}

#[test]
fn a_cancel_after_the_response_headers_is_ignored_and_such_a_call_is_never_stuck() {
    // A server stream: headers after 5 ms, ended by the client at its deadline.
    let stream = r#""response_code":200,"response_flags":"DC","duration":2000,"grpc_timeout":"2S","response_duration":5"#;
    let streams = log(10, stream);
    let r = replay(&streams, r#"{"stuck_call_duration": "1s"}"#);
    assert_eq!(
        (r.log_failures, r.failures_let_through, r.open_periods.len()),
        (0, 0, 0),
        "{r:#?}"
    );
    assert_eq!(outcome("{}", stream), Some(Outcome::Ignored));
    // Istio's default format gives the same timing as upstream_service_time.
    let istio = stream.replace("response_duration", "upstream_service_time");
    assert_eq!(
        outcome(r#"{"stuck_call_duration": "1s"}"#, &istio),
        Some(Outcome::Ignored)
    );

    // Headers that came only after stuck_call_duration: stuck first.
    let late = stream.replace(r#""response_duration":5"#, r#""response_duration":1500"#);
    assert_eq!(
        outcome(r#"{"stuck_call_duration": "1s"}"#, &late),
        Some(Outcome::Failure)
    );
}

#[test]
fn without_a_timing_the_response_headers_came_at_the_end() {
    // The documented fallback: a response code, no timing: headers at the end of the call. A 2s
    // call is then stuck at 1s, as a unary call that slow would be.
    let no_timing = r#""response_code":200,"grpc_status":"OK","duration":2000"#;
    let calls = log(1, no_timing);
    assert_eq!(calls[0].response_headers_after_ms(), Some(2_000));
    assert_eq!(outcome("{}", no_timing), Some(Outcome::Success));
    assert_eq!(
        outcome(r#"{"stuck_call_duration": "1s"}"#, no_timing),
        Some(Outcome::Failure)
    );
    // With the timing, the same call answered at once: a slow stream, never stuck.
    let timed = format!(r#"{no_timing},"response_duration":"3""#);
    assert_eq!(log(1, &timed)[0].response_headers_after_ms(), Some(3));
    assert_eq!(
        outcome(r#"{"stuck_call_duration": "1s"}"#, &timed),
        Some(Outcome::Success)
    );
    // A cancel after a response that carried no timing: still after the headers.
    let cancelled =
        r#""response_code":200,"response_flags":"DC","duration":2000,"grpc_timeout":"2S""#;
    assert_eq!(outcome("{}", cancelled), Some(Outcome::Ignored));
}

#[test]
fn a_bad_timing_is_named_and_the_line_skipped() {
    let text = r#"{"start_time":0,"upstream_cluster":"a","response_code":200,"upstream_service_time":"soon"}"#;
    let parsed = parse_log(text, &UpstreamKey::Cluster);
    assert!(parsed.calls.is_empty());
    assert!(
        parsed.malformed[0]
            .error
            .contains("upstream_service_time: not a number of ms"),
        "{:?}",
        parsed.malformed
    );
    // The deadline is read from request_headers too, as the core reads the header.
    let nested = r#"{"start_time":0,"upstream_cluster":"a","content_type":"application/grpc","response_code":0,"response_flags":"DC","duration":300,"request_headers":{"grpc-timeout":"300m"}}"#;
    let call = &parse_log(nested, &UpstreamKey::Cluster).calls[0];
    assert_eq!(call.grpc_timeout.as_deref(), Some("300m"));
    let judged = judge(&Arc::new(FilterConfig::default()), call).unwrap();
    assert_eq!(
        (judged.verdict.outcome, judged.at_ms),
        (Outcome::Failure, 300)
    );
}
