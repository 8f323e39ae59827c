//! What the per-stream [`crate::session::Session`] needs from the proxy it runs in: the request and
//! response as Envoy shows them, the clock, a way to answer locally, and [`Telemetry`]. Each host (the
//! wasm filter, the native module, the harness) implements this once, in one file, and translates its
//! platform's answers here; the session never sees a host status.

use crate::reply::LocalReply;
use crate::telemetry::Telemetry;

/// What the host does with the stream after a session callback. The default, when a host cannot run
/// the session at all, is to go on: the breaker fails open.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Action {
    /// Go on with the filter chain.
    #[default]
    Continue,
    /// A local reply was sent: stop the chain (wasm `Pause`, native `StopIteration`).
    Stop,
}

/// One stream's view of its host. Header names are lower case. Every getter answers `None` when the
/// host has no such value or refuses to say; the session then treats it as absent.
pub trait Host: Telemetry {
    /// Time in milliseconds, from a clock shared by every worker of this Envoy (wall time in wasm, a
    /// process-wide monotonic clock natively). `None` when the host cannot say: the call fails open.
    fn now_ms(&mut self) -> Option<u64>;
    /// A request header's value, as bytes (header values need not be UTF-8).
    fn request_header(&mut self, name: &str) -> Option<Vec<u8>>;
    /// A request header's value, unless it is longer than `max` bytes: then `Err(TooLong)`. A host
    /// that can see a value's length before copying it (the native module) overrides this, so a huge
    /// client-chosen value is never copied.
    fn request_header_up_to(&mut self, name: &str, max: usize) -> Result<Option<Vec<u8>>, TooLong> {
        match self.request_header(name) {
            Some(v) if v.len() > max => Err(TooLong),
            v => Ok(v),
        }
    }
    /// A response header's value.
    fn response_header(&mut self, name: &str) -> Option<Vec<u8>>;
    /// A response trailer's value.
    fn response_trailer(&mut self, name: &str) -> Option<Vec<u8>>;
    /// The name of the cluster the route chose (`xds.cluster_name`).
    fn cluster_name(&mut self) -> Option<Vec<u8>>;
    /// Envoy's `response.code` for the stream (0 or `None` when no response was sent).
    fn response_code(&mut self) -> Option<u16>;
    /// Envoy's `response.flags`, the legacy bit mask.
    fn response_flags(&mut self) -> Option<u64>;
    /// Sets (replaces) a request header, before the router sees the request.
    fn set_request_header(&mut self, name: &str, value: &str);
    /// Adds a response header, before the client sees the response.
    fn add_response_header(&mut self, name: &str, value: &str);
    /// Answers the stream locally; `false` when the host refused (the request then goes on).
    fn send_reply(&mut self, reply: LocalReply) -> bool;
    /// A handle by which the host can reach this stream later, outside its callbacks, to deliver the
    /// answer to a stuck call that is cut (`cut_stuck_calls`); `None` when it cannot (no cut then).
    /// Asked once per call, and only of calls whose breaker cuts.
    fn stream_token(&mut self) -> Option<u64> {
        None
    }
}

/// A header value over the length the caller accepts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TooLong;

/// A stream with a clock and nothing else (no headers, no cluster, no response), whose telemetry goes
/// to `T`: for pricing the core's own work (the criterion benches, the host-call probe), where a
/// call's cost should be the breaker's alone.
#[derive(Debug, Clone, Default)]
pub struct Bare<T> {
    /// What the clock says.
    pub now_ms: u64,
    /// Where events go.
    pub telemetry: T,
}

impl<T: Telemetry> Telemetry for Bare<T> {
    fn add(&mut self, series: &crate::telemetry::Series<'_>, n: u64) {
        self.telemetry.add(series, n);
    }
    fn set(&mut self, series: &crate::telemetry::Series<'_>, value: u64) {
        self.telemetry.set(series, value);
    }
    fn log(&mut self, level: crate::telemetry::Level, message: &str) {
        self.telemetry.log(level, message);
    }
    fn event(&mut self, upstream: crate::telemetry::Upstream<'_>, event: &crate::telemetry::Event) {
        self.telemetry.event(upstream, event);
    }
}

impl<T: Telemetry> Host for Bare<T> {
    fn now_ms(&mut self) -> Option<u64> {
        Some(self.now_ms)
    }
    fn request_header(&mut self, _: &str) -> Option<Vec<u8>> {
        None
    }
    fn response_header(&mut self, _: &str) -> Option<Vec<u8>> {
        None
    }
    fn response_trailer(&mut self, _: &str) -> Option<Vec<u8>> {
        None
    }
    fn cluster_name(&mut self) -> Option<Vec<u8>> {
        None
    }
    fn response_code(&mut self) -> Option<u16> {
        None
    }
    fn response_flags(&mut self) -> Option<u64> {
        None
    }
    fn set_request_header(&mut self, _: &str, _: &str) {}
    fn add_response_header(&mut self, _: &str, _: &str) {}
    fn send_reply(&mut self, _: LocalReply) -> bool {
        true
    }
}
