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
    fn send_reply(&mut self, reply: &LocalReply) -> bool;
}
