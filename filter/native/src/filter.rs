//! The per-stream object: made in `filter_new` on the stream's worker, handed to every hook of that
//! stream, freed in `filter_destroy`.
//!
//! Phase A passes every stream through. The core's `Session` plugs in at the four methods marked
//! "Session:" below; each gets the stream's [`NativeHost`] and answers the host's [`Action`].
#![deny(unsafe_code)]

use cb_core::host::Action;

use crate::config::ModuleConfig;
use crate::host::{self, NativeHost};

/// One HTTP stream.
pub struct Stream {
    /// The configuration the stream was made under. Envoy keeps it alive longer than the stream (each
    /// filter holds a reference to its config), so the stream keeps a plain pointer rather than a
    /// reference count that every worker would contend on.
    config: *const ModuleConfig,
    /// A hook of this stream panicked: the rest of the stream passes through untouched, since its
    /// state may be half-updated.
    pub failed: bool,
}

impl Stream {
    /// A stream under `config`.
    pub fn new(config: &ModuleConfig) -> Self {
        Self {
            config,
            failed: false,
        }
    }

    /// The configuration the stream was made under.
    pub fn config<'a>(&self) -> Option<&'a ModuleConfig> {
        host::config_ref(self.config.cast())
    }

    /// Request headers: the health endpoint, then admission (and the upstream timeout header).
    pub fn request_headers(&mut self, _host: &mut NativeHost<'_>, _end_of_stream: bool) -> Action {
        // Session: `session.request_headers(host, end_of_stream)`.
        Action::Continue
    }

    /// Response headers: the dry-run marker; the outcome of an HTTP call or a trailers-only gRPC one.
    pub fn response_headers(&mut self, _host: &mut NativeHost<'_>, _end_of_stream: bool) -> Action {
        // Session: `session.response_headers(host, end_of_stream)`.
        Action::Continue
    }

    /// Response trailers: the outcome of a gRPC call.
    pub fn response_trailers(&mut self, _host: &mut NativeHost<'_>) -> Action {
        // Session: `session.response_trailers(host)`.
        Action::Continue
    }

    /// The stream is over (before access logs and `filter_destroy`): settles a call still open (reset,
    /// cancel), releasing a HalfOpen probe permit it held.
    pub fn stream_complete(&mut self, _host: &mut NativeHost<'_>) {
        // Session: `session.complete(host)`.
    }
}
