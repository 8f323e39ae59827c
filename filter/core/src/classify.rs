//! What a finished call counts as (contract section 3): success, failure or ignored, and whether it was
//! slow. Kept apart from the state machine, like Envoy's admission-control `ResponseEvaluator`, so the
//! policy can be read and tested on its own.

use crate::config::BreakerConfig;
use crate::deadline::deadline_reached;

/// What one call counts as for the breaker.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Outcome {
    /// The upstream answered well (for gRPC: `OK` and client-side statuses such as `NOT_FOUND`).
    Success,
    /// The upstream failed: a configured gRPC or HTTP status, or a connect failure, reset, overflow or
    /// timeout reported by Envoy's response flags.
    Failure,
    /// Says nothing about the upstream: the client went away first, or the filter answered itself.
    Ignored,
}

/// The verdict on one call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Classification {
    /// Success, failure or ignored.
    pub outcome: Outcome,
    /// Took at least `slow_call_duration` (independent of the outcome).
    pub slow: bool,
}

/// The gRPC status names, indexed by code.
pub const GRPC_CODE_NAMES: [&str; 17] = [
    "OK",
    "CANCELLED",
    "UNKNOWN",
    "INVALID_ARGUMENT",
    "DEADLINE_EXCEEDED",
    "NOT_FOUND",
    "ALREADY_EXISTS",
    "PERMISSION_DENIED",
    "RESOURCE_EXHAUSTED",
    "FAILED_PRECONDITION",
    "ABORTED",
    "OUT_OF_RANGE",
    "UNIMPLEMENTED",
    "INTERNAL",
    "UNAVAILABLE",
    "DATA_LOSS",
    "UNAUTHENTICATED",
];

/// `DEADLINE_EXCEEDED`: what a call the client gave up on at its deadline counts as.
pub const GRPC_DEADLINE_EXCEEDED: u8 = 4;
/// `UNKNOWN`: what gRPC maps any code outside 0..=16 to.
pub const GRPC_UNKNOWN: u8 = 2;
/// `INTERNAL`: what a gRPC client reports for a malformed or missing `grpc-status`.
pub const GRPC_INTERNAL: u8 = 13;
/// `UNAVAILABLE`: what a rejected gRPC call gets.
pub const GRPC_UNAVAILABLE: u8 = 14;

/// The code of a gRPC status name (case-insensitive), or `None`.
pub fn grpc_code_from_name(name: &str) -> Option<u8> {
    GRPC_CODE_NAMES
        .iter()
        .position(|n| n.eq_ignore_ascii_case(name.trim()))
        .map(|i| i as u8)
}

/// A set of gRPC status codes 0..=16.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GrpcCodeSet(u32);

impl GrpcCodeSet {
    /// No code.
    pub fn empty() -> Self {
        Self(0)
    }

    /// The contract's default failure statuses: UNKNOWN, DEADLINE_EXCEEDED, RESOURCE_EXHAUSTED,
    /// INTERNAL, UNAVAILABLE, DATA_LOSS.
    pub fn default_failures() -> Self {
        let mut s = Self::empty();
        for c in [2, 4, 8, 13, 14, 15] {
            s.insert(c);
        }
        s
    }

    /// Adds a code (codes above 16 are ignored).
    pub fn insert(&mut self, code: u8) {
        if code <= 16 {
            self.0 |= 1 << code;
        }
    }

    /// Whether the code is in the set.
    pub fn contains(&self, code: u8) -> bool {
        code <= 16 && self.0 & (1 << code) != 0
    }
}

/// A set of HTTP statuses 100..=599.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HttpStatusSet([u64; 8]);

impl HttpStatusSet {
    /// No status.
    pub fn empty() -> Self {
        Self([0; 8])
    }

    /// `["5xx"]`, the contract's default.
    pub fn server_errors() -> Self {
        let mut s = Self::empty();
        s.insert_class(5);
        s
    }

    /// Adds a status; `false` when it is outside 100..=599.
    pub fn insert(&mut self, status: u16) -> bool {
        if !(100..=599).contains(&status) {
            return false;
        }
        let bit = usize::from(status - 100);
        if let Some(word) = self.0.get_mut(bit / 64) {
            *word |= 1 << (bit % 64);
        }
        true
    }

    /// Adds a whole class (`5` for `5xx`).
    pub fn insert_class(&mut self, class: u8) {
        let start = u16::from(class) * 100;
        for s in start..start + 100 {
            self.insert(s);
        }
    }

    /// Whether the status is in the set.
    pub fn contains(&self, status: u16) -> bool {
        if !(100..=599).contains(&status) {
            return false;
        }
        let bit = usize::from(status - 100);
        self.0
            .get(bit / 64)
            .is_some_and(|w| w & (1 << (bit % 64)) != 0)
    }
}

/// Envoy's response flags, as the `response.flags` attribute gives them (a bit mask in the order of
/// Envoy's `CoreResponseFlag`), or as the short strings of access logs (`UF,URX`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ResponseFlags(pub u64);

/// Short names of the response flags, indexed by bit.
pub const RESPONSE_FLAG_NAMES: [&str; 29] = [
    "LH", "UH", "UT", "LR", "UR", "UF", "UC", "UO", "NR", "DI", "FI", "RL", "UAEX", "RLSE", "DC",
    "URX", "SI", "IH", "DPE", "UMSDR", "RFCF", "NFCF", "DT", "UPE", "NC", "OM", "DF", "DO", "DR",
];

impl ResponseFlags {
    /// No healthy upstream host.
    pub const NO_HEALTHY_UPSTREAM: u64 = 1 << 1;
    /// Upstream request timeout (route timeout, or our `call_timeout`).
    pub const UPSTREAM_REQUEST_TIMEOUT: u64 = 1 << 2;
    /// Local codec-level reset.
    pub const LOCAL_RESET: u64 = 1 << 3;
    /// Upstream remote reset.
    pub const UPSTREAM_REMOTE_RESET: u64 = 1 << 4;
    /// Upstream connection failure.
    pub const UPSTREAM_CONNECTION_FAILURE: u64 = 1 << 5;
    /// Upstream connection termination.
    pub const UPSTREAM_CONNECTION_TERMINATION: u64 = 1 << 6;
    /// Upstream overflow (Envoy's own cluster circuit breaker).
    pub const UPSTREAM_OVERFLOW: u64 = 1 << 7;
    /// Downstream connection termination.
    pub const DOWNSTREAM_CONNECTION_TERMINATION: u64 = 1 << 14;
    /// Upstream retry limit exceeded.
    pub const UPSTREAM_RETRY_LIMIT_EXCEEDED: u64 = 1 << 15;
    /// Stream idle timeout.
    pub const STREAM_IDLE_TIMEOUT: u64 = 1 << 16;
    /// Upstream max stream duration reached.
    pub const UPSTREAM_MAX_STREAM_DURATION_REACHED: u64 = 1 << 19;
    /// Upstream protocol error.
    pub const UPSTREAM_PROTOCOL_ERROR: u64 = 1 << 23;
    /// DNS resolution failed.
    pub const DNS_RESOLUTION_FAILED: u64 = 1 << 26;
    /// Downstream remote reset.
    pub const DOWNSTREAM_REMOTE_RESET: u64 = 1 << 28;

    /// Flags that mean the upstream failed us, whatever status the client ends up seeing.
    pub const UPSTREAM_FAILURE: u64 = Self::NO_HEALTHY_UPSTREAM
        | Self::UPSTREAM_REQUEST_TIMEOUT
        | Self::LOCAL_RESET
        | Self::UPSTREAM_REMOTE_RESET
        | Self::UPSTREAM_CONNECTION_FAILURE
        | Self::UPSTREAM_CONNECTION_TERMINATION
        | Self::UPSTREAM_OVERFLOW
        | Self::UPSTREAM_RETRY_LIMIT_EXCEEDED
        | Self::STREAM_IDLE_TIMEOUT
        | Self::UPSTREAM_MAX_STREAM_DURATION_REACHED
        | Self::UPSTREAM_PROTOCOL_ERROR
        | Self::DNS_RESOLUTION_FAILED;

    /// Flags that mean the client went away.
    pub const DOWNSTREAM_CANCEL: u64 =
        Self::DOWNSTREAM_CONNECTION_TERMINATION | Self::DOWNSTREAM_REMOTE_RESET;

    /// Parses the access-log form: comma-separated short names, `-` or empty for none. Unknown names
    /// are skipped (newer Envoys add flags) and reported as `Err` with the flags that were understood.
    pub fn parse_short(s: &str) -> Result<Self, Self> {
        let mut bits = 0u64;
        let mut unknown = false;
        for name in s
            .split(',')
            .map(str::trim)
            .filter(|n| !n.is_empty() && *n != "-")
        {
            match RESPONSE_FLAG_NAMES.iter().position(|n| *n == name) {
                Some(i) => bits |= 1 << i,
                None => unknown = true,
            }
        }
        if unknown {
            Err(Self(bits))
        } else {
            Ok(Self(bits))
        }
    }

    /// Whether any upstream-failure flag is set. A stream idle timeout (`SI`) is the upstream's only
    /// when the request was complete: a client that stalls its own upload makes the stream idle
    /// itself, and must not be able to make failures of a healthy upstream.
    pub fn upstream_failed(self, request_complete: bool) -> bool {
        let mask = if request_complete {
            Self::UPSTREAM_FAILURE
        } else {
            Self::UPSTREAM_FAILURE & !Self::STREAM_IDLE_TIMEOUT
        };
        self.0 & mask != 0
    }

    /// Whether the downstream cancelled or reset the stream.
    pub fn downstream_cancelled(self) -> bool {
        self.0 & Self::DOWNSTREAM_CANCEL != 0
    }
}

/// Parses a `grpc-status` header value strictly: 1 to 3 ASCII digits. Codes above 16 map to UNKNOWN
/// (as gRPC does); anything else is malformed and yields `None`.
pub fn parse_grpc_status(raw: &[u8]) -> Option<u8> {
    if raw.is_empty() || raw.len() > 3 || !raw.iter().all(u8::is_ascii_digit) {
        return None;
    }
    let n = raw
        .iter()
        .fold(0u16, |acc, d| acc * 10 + u16::from(d - b'0'));
    Some(if n <= 16 { n as u8 } else { GRPC_UNKNOWN })
}

/// The gRPC status a client derives from an HTTP status when no `grpc-status` came back (gRPC's
/// "HTTP to gRPC status code mapping").
pub fn grpc_code_for_http(status: u16) -> u8 {
    match status {
        400 => GRPC_INTERNAL,
        401 => 16,
        403 => 7,
        404 => 12,
        429 | 502 | 503 | 504 => GRPC_UNAVAILABLE,
        // An HTTP 200 gRPC response that ends without a grpc-status is a protocol violation.
        200 => GRPC_INTERNAL,
        _ => GRPC_UNKNOWN,
    }
}

/// The facts about a finished call that classification looks at.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CallFacts<'a> {
    /// The request was gRPC (`content-type: application/grpc...`).
    pub grpc: bool,
    /// The response's `:status`, if a response came.
    pub http_status: Option<u16>,
    /// The raw `grpc-status` from the trailers, or from the headers of a trailers-only response.
    pub grpc_status: Option<&'a [u8]>,
    /// Envoy's response flags.
    pub flags: ResponseFlags,
    /// How long the call took, in ms.
    pub duration_ms: Option<u64>,
    /// The stream ended before its response was complete (a reset or a cancel): judged when it ends,
    /// from what Envoy says happened.
    pub ended_early: bool,
    /// The call's deadline, from its `grpc-timeout` request header, in µs.
    pub deadline_us: Option<u64>,
    /// Response headers had come before the stream ended: the upstream was answering, so a cancel
    /// then is never its failure (a server stream the client ends, a long download).
    pub headers_came: bool,
    /// The client had sent its whole request.
    pub request_complete: bool,
}

/// Classifies a finished call under one breaker's settings (contract section 3).
pub fn classify(cfg: &BreakerConfig, facts: &CallFacts<'_>) -> Classification {
    let slow = matches!(
        (cfg.slow_call_duration_ms, facts.duration_ms),
        (Some(limit), Some(d)) if d >= limit
    );
    let outcome = outcome(cfg, facts);
    // An ignored call says nothing about the upstream, so it is not slow either.
    Classification {
        outcome,
        slow: slow && outcome != Outcome::Ignored,
    }
}

fn outcome(cfg: &BreakerConfig, facts: &CallFacts<'_>) -> Outcome {
    if facts.flags.upstream_failed(facts.request_complete) {
        return Outcome::Failure;
    }
    if facts.flags.0 & ResponseFlags::STREAM_IDLE_TIMEOUT != 0 && !facts.request_complete {
        // Envoy timed the stream out while the client was still sending: its answer (408, or a
        // gRPC status made from it) is about the client, not the upstream.
        return Outcome::Ignored;
    }
    let status = facts.http_status.filter(|s| *s != 0);
    let nothing_came = status.is_none() && facts.grpc_status.is_none();
    if facts.ended_early && (facts.flags.downstream_cancelled() || nothing_came) {
        // The client left before the response was complete. That says nothing about the upstream,
        // unless the client left because its deadline had come with no answer begun: then the
        // upstream was too slow to answer in time, which is what a hung service looks like from here.
        // Once response headers came, the upstream was answering: a cancel then is never its fault.
        return match facts.deadline_us {
            Some(d)
                if facts.grpc
                    && !facts.headers_came
                    && deadline_reached(d, facts.duration_ms.unwrap_or(0)) =>
            {
                grpc_outcome(cfg, GRPC_DEADLINE_EXCEEDED)
            }
            _ => Outcome::Ignored,
        };
    }
    if nothing_came {
        // No response and no flag to say why: nothing to judge the upstream by.
        return Outcome::Ignored;
    }
    if facts.grpc {
        let code = match facts.grpc_status {
            // A malformed value is never trusted as OK: a gRPC client reports it as INTERNAL.
            Some(raw) => parse_grpc_status(raw).unwrap_or(GRPC_INTERNAL),
            None => status.map_or(GRPC_UNKNOWN, grpc_code_for_http),
        };
        grpc_outcome(cfg, code)
    } else {
        match status {
            Some(s) if cfg.failure_http_statuses.contains(s) => Outcome::Failure,
            // A status outside 100..=599 is not a valid HTTP response: count it against the upstream.
            Some(s) if !(100..=599).contains(&s) => Outcome::Failure,
            _ => Outcome::Success,
        }
    }
}

fn grpc_outcome(cfg: &BreakerConfig, code: u8) -> Outcome {
    if cfg.failure_grpc_statuses.contains(code) {
        Outcome::Failure
    } else {
        Outcome::Success
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    #[cfg(target_arch = "wasm32")]
    use wasm_bindgen_test::wasm_bindgen_test as test;

    fn cfg() -> BreakerConfig {
        BreakerConfig {
            slow_call_duration_ms: Some(1_000),
            ..BreakerConfig::default()
        }
    }

    fn grpc(status: &'static [u8]) -> CallFacts<'static> {
        CallFacts {
            grpc: true,
            http_status: Some(200),
            grpc_status: Some(status),
            ..Default::default()
        }
    }

    #[test]
    fn grpc_statuses_from_trailers() {
        let c = cfg();
        assert_eq!(classify(&c, &grpc(b"0")).outcome, Outcome::Success);
        assert_eq!(
            classify(&c, &grpc(b"5")).outcome,
            Outcome::Success,
            "NOT_FOUND is the client's fault"
        );
        assert_eq!(classify(&c, &grpc(b"14")).outcome, Outcome::Failure);
        assert_eq!(classify(&c, &grpc(b"13")).outcome, Outcome::Failure);
        assert_eq!(classify(&c, &grpc(b"4")).outcome, Outcome::Failure);
        assert_eq!(
            classify(&c, &grpc(b"99")).outcome,
            Outcome::Failure,
            "unknown codes are UNKNOWN"
        );
    }

    #[test]
    fn malformed_grpc_status_is_not_trusted() {
        let c = cfg();
        for raw in [&b""[..], b"OK", b"0 ", b"-1", b"1e1", b"00000", b"\xff"] {
            assert_eq!(
                classify(&c, &grpc(raw)).outcome,
                Outcome::Failure,
                "{raw:?}"
            );
        }
        let mut lenient = cfg();
        lenient.failure_grpc_statuses = GrpcCodeSet::empty();
        assert_eq!(classify(&lenient, &grpc(b"OK")).outcome, Outcome::Success);
    }

    #[test]
    fn grpc_without_status_maps_from_http() {
        let c = cfg();
        let f = CallFacts {
            grpc: true,
            http_status: Some(503),
            ..Default::default()
        };
        assert_eq!(classify(&c, &f).outcome, Outcome::Failure);
        let f = CallFacts {
            grpc: true,
            http_status: Some(404),
            ..Default::default()
        };
        assert_eq!(
            classify(&c, &f).outcome,
            Outcome::Success,
            "UNIMPLEMENTED is not a failure by default"
        );
        let f = CallFacts {
            grpc: true,
            http_status: Some(200),
            ..Default::default()
        };
        assert_eq!(
            classify(&c, &f).outcome,
            Outcome::Failure,
            "200 without grpc-status is INTERNAL"
        );
    }

    #[test]
    fn http_statuses() {
        let c = cfg();
        let h = |s| CallFacts {
            http_status: Some(s),
            ..Default::default()
        };
        assert_eq!(classify(&c, &h(200)).outcome, Outcome::Success);
        assert_eq!(classify(&c, &h(404)).outcome, Outcome::Success);
        assert_eq!(classify(&c, &h(503)).outcome, Outcome::Failure);
        assert_eq!(classify(&c, &h(999)).outcome, Outcome::Failure);
        assert_eq!(classify(&c, &h(0)).outcome, Outcome::Ignored);
    }

    #[test]
    fn response_flags_win_over_status() {
        let c = cfg();
        for flag in [
            "UF", "UC", "UO", "UR", "UT", "URX", "UH", "LR", "SI", "UPE", "UMSDR", "DF",
        ] {
            let flags = ResponseFlags::parse_short(flag).unwrap();
            let f = CallFacts {
                grpc: true,
                http_status: Some(200),
                grpc_status: Some(b"0"),
                flags,
                request_complete: true,
                ..Default::default()
            };
            assert_eq!(classify(&c, &f).outcome, Outcome::Failure, "{flag}");
        }
    }

    #[test]
    fn a_stream_idle_timeout_before_the_request_was_complete_is_the_clients() {
        let c = cfg();
        let si = CallFacts {
            grpc: true,
            flags: ResponseFlags::parse_short("SI").unwrap(),
            ended_early: true,
            http_status: Some(408),
            ..Default::default()
        };
        assert_eq!(
            classify(&c, &si).outcome,
            Outcome::Ignored,
            "a client stalling its upload makes no failure"
        );
        let complete = CallFacts {
            request_complete: true,
            ..si
        };
        assert_eq!(classify(&c, &complete).outcome, Outcome::Failure);
        // Other upstream flags count however much of the request went.
        let uf = CallFacts {
            flags: ResponseFlags::parse_short("UF").unwrap(),
            ..si
        };
        assert_eq!(classify(&c, &uf).outcome, Outcome::Failure);
    }

    #[test]
    fn a_cancel_after_response_headers_is_never_a_deadline() {
        let c = cfg();
        let f = CallFacts {
            grpc: true,
            flags: ResponseFlags::parse_short("DR").unwrap(),
            ended_early: true,
            deadline_us: Some(300_000),
            duration_ms: Some(400),
            ..Default::default()
        };
        assert_eq!(
            classify(&c, &f).outcome,
            Outcome::Failure,
            "no answer begun"
        );
        let answering = CallFacts {
            headers_came: true,
            http_status: Some(200),
            ..f
        };
        assert_eq!(
            classify(&c, &answering).outcome,
            Outcome::Ignored,
            "a server stream the client ends at its deadline"
        );
    }

    #[test]
    fn a_cancel_before_the_deadline_or_without_one_is_ignored() {
        let c = cfg();
        for flags in ["DC", "DR"] {
            let f = CallFacts {
                grpc: true,
                flags: ResponseFlags::parse_short(flags).unwrap(),
                duration_ms: Some(5_000),
                ended_early: true,
                ..Default::default()
            };
            assert_eq!(
                classify(&c, &f),
                Classification {
                    outcome: Outcome::Ignored,
                    slow: false
                },
                "{flags}, no deadline"
            );
            let early = CallFacts {
                deadline_us: Some(10_000_000),
                ..f
            };
            assert_eq!(classify(&c, &early).outcome, Outcome::Ignored, "{flags}");
        }
    }

    #[test]
    fn a_cancel_at_the_deadline_is_deadline_exceeded() {
        let c = cfg();
        let cancel = CallFacts {
            grpc: true,
            flags: ResponseFlags(ResponseFlags::DOWNSTREAM_REMOTE_RESET),
            ended_early: true,
            deadline_us: Some(300_000),
            duration_ms: Some(290),
            ..Default::default()
        };
        assert_eq!(classify(&c, &cancel).outcome, Outcome::Failure);
        // No flag, nothing came: the stream just ended, at the deadline.
        let silent = CallFacts {
            flags: ResponseFlags::default(),
            ..cancel
        };
        assert_eq!(classify(&c, &silent).outcome, Outcome::Failure);
        // Only when DEADLINE_EXCEEDED is a failure status.
        let lenient = BreakerConfig {
            failure_grpc_statuses: GrpcCodeSet::empty(),
            ..cfg()
        };
        assert_eq!(classify(&lenient, &cancel).outcome, Outcome::Success);
        // Not for plain HTTP (grpc-timeout means nothing there).
        let http = CallFacts {
            grpc: false,
            ..cancel
        };
        assert_eq!(classify(&c, &http).outcome, Outcome::Ignored);
        // 21 ms early on a 300 ms deadline is outside the tolerance.
        let early = CallFacts {
            duration_ms: Some(279),
            ..cancel
        };
        assert_eq!(classify(&c, &early).outcome, Outcome::Ignored);
    }

    #[test]
    fn a_stream_cancelled_after_its_headers_is_ignored_but_a_reset_is_not() {
        let c = cfg();
        // Response headers (200) came, then the client cancelled: without the cancel rule, the
        // missing grpc-status would read as INTERNAL.
        let cancelled = CallFacts {
            grpc: true,
            http_status: Some(200),
            flags: ResponseFlags(ResponseFlags::DOWNSTREAM_REMOTE_RESET),
            ended_early: true,
            duration_ms: Some(50),
            ..Default::default()
        };
        assert_eq!(classify(&c, &cancelled).outcome, Outcome::Ignored);
        let past_deadline = CallFacts {
            deadline_us: Some(40_000),
            ..cancelled
        };
        assert_eq!(classify(&c, &past_deadline).outcome, Outcome::Failure);
        // The upstream reset the stream: a failure, headers or not, cancel flag or not.
        for flags in [
            ResponseFlags::UPSTREAM_REMOTE_RESET,
            ResponseFlags::UPSTREAM_REMOTE_RESET | ResponseFlags::DOWNSTREAM_REMOTE_RESET,
            ResponseFlags::UPSTREAM_CONNECTION_TERMINATION,
        ] {
            let reset = CallFacts {
                flags: ResponseFlags(flags),
                ..cancelled
            };
            assert_eq!(classify(&c, &reset).outcome, Outcome::Failure, "{flags:#x}");
        }
        // Ended early with headers and no flag at all: the response ended without its trailers,
        // which a gRPC client reports as INTERNAL.
        let truncated = CallFacts {
            flags: ResponseFlags::default(),
            ..cancelled
        };
        assert_eq!(classify(&c, &truncated).outcome, Outcome::Failure);
    }

    #[test]
    fn slow_is_independent_of_outcome() {
        let c = cfg();
        let mut f = grpc(b"0");
        f.duration_ms = Some(1_000);
        assert_eq!(
            classify(&c, &f),
            Classification {
                outcome: Outcome::Success,
                slow: true
            }
        );
        f.duration_ms = Some(999);
        assert!(!classify(&c, &f).slow);
        let mut f = grpc(b"14");
        f.duration_ms = Some(2_000);
        assert_eq!(
            classify(&c, &f),
            Classification {
                outcome: Outcome::Failure,
                slow: true
            }
        );
        assert!(
            !classify(&BreakerConfig::default(), &f).slow,
            "slow tracking off by default"
        );
    }

    #[test]
    fn flag_bits_follow_envoy_order() {
        assert_eq!(ResponseFlags::parse_short("UF").unwrap().0, 0x20);
        assert_eq!(ResponseFlags::parse_short("URX").unwrap().0, 0x8000);
        assert_eq!(ResponseFlags::parse_short("DR").unwrap().0, 0x1000_0000);
        assert_eq!(ResponseFlags::parse_short("-").unwrap().0, 0);
        assert_eq!(
            ResponseFlags::parse_short("UF,NEW"),
            Err(ResponseFlags(0x20))
        );
    }

    #[test]
    fn status_sets() {
        let mut s = HttpStatusSet::empty();
        assert!(!s.insert(99) && !s.insert(600));
        assert!(s.insert(599) && s.contains(599) && !s.contains(598));
        assert_eq!(grpc_code_from_name("unavailable"), Some(14));
        assert_eq!(grpc_code_from_name("nope"), None);
        let g = GrpcCodeSet::default_failures();
        assert!(!g.contains(0) && !g.contains(200));
    }
}
