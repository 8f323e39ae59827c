//! Any response an upstream (or Envoy) can produce, and any `grpc-timeout` a client sends:
//! classification never panics, an upstream failure flag always makes a failure whatever the status
//! says, and a stream that ended early without one is never a failure unless it reached its deadline.
#![no_main]

use cb_core::classify::{classify, parse_grpc_status, CallFacts, Outcome, ResponseFlags};
use cb_core::deadline::parse_grpc_timeout;
use cb_core::config::BreakerConfig;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((head, rest)) = data.split_first_chunk::<12>() else { return };
    let status = u16::from_le_bytes([head[0], head[1]]);
    let flags = u64::from_le_bytes([head[2], head[3], head[4], head[5], head[6], head[7], head[8], head[9]]);
    let cfg = BreakerConfig { slow_call_duration_ms: Some(u64::from(head[11])), ..BreakerConfig::default() };
    let facts = CallFacts {
        grpc: head[10] & 1 == 1,
        http_status: (head[10] & 2 == 2).then_some(status),
        grpc_status: (head[10] & 4 == 4).then_some(rest),
        flags: ResponseFlags(flags),
        duration_ms: Some(u64::from(status)),
        ended_early: head[10] & 8 == 8,
        deadline_us: parse_grpc_timeout(rest),
        headers_came: head[10] & 16 == 16,
        request_complete: head[10] & 32 == 32,
    };
    let c = classify(&cfg, &facts);
    if ResponseFlags(flags).upstream_failed(facts.request_complete) {
        assert_eq!(c.outcome, Outcome::Failure);
    } else if facts.ended_early && ResponseFlags(flags).downstream_cancelled() && facts.deadline_us.is_none() {
        assert_eq!(c.outcome, Outcome::Ignored);
    }
    if let Some(code) = parse_grpc_status(rest) {
        assert!(code <= 16);
    }
    let _ = ResponseFlags::parse_short(&String::from_utf8_lossy(rest));
});
