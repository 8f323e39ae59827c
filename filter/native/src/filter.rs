//! The per-stream object: made in `filter_new` on the stream's worker, handed to every hook of that
//! stream, freed in `filter_destroy`. Each hook is one call of the core's [`Session`] over this
//! worker's core worker; the session holds every rule of the stream.
#![deny(unsafe_code)]

use cb_core::host::Action;
use cb_core::session::Session;

use crate::config::{ModuleConfig, NativeWorker};
use crate::host::{self, NativeHost};

/// One HTTP stream.
pub struct Stream {
    /// The configuration the stream was made under. Envoy keeps it alive longer than the stream (each
    /// filter holds a reference to its config), so the stream keeps a plain pointer rather than a
    /// reference count that every worker would contend on.
    config: *const ModuleConfig,
    session: Session,
    /// A hook of this stream panicked: the rest of the stream passes through untouched, since its
    /// state may be half-updated.
    pub failed: bool,
}

impl Stream {
    /// A stream under `config`.
    pub fn new(config: &ModuleConfig) -> Self {
        Self {
            config,
            session: Session::new(),
            failed: false,
        }
    }

    /// The configuration the stream was made under.
    pub fn config<'a>(&self) -> Option<&'a ModuleConfig> {
        host::config_ref(self.config.cast())
    }

    /// Runs `f` with this stream's session and its worker's core worker; then sends the local reply
    /// the session asked for, once the worker is released (see [`NativeHost::send_pending`]).
    fn with<R: Default>(
        &mut self,
        h: &mut NativeHost<'_>,
        f: impl FnOnce(&mut Session, &mut NativeWorker, &mut NativeHost<'_>) -> R,
    ) -> R {
        let out = match h.config().worker(h.worker_index()) {
            Some(mut worker) => f(&mut self.session, &mut worker, h),
            None => R::default(),
        };
        h.send_pending();
        out
    }

    /// Request headers: the health endpoint, or admission.
    pub fn request_headers(&mut self, h: &mut NativeHost<'_>, end_of_stream: bool) -> Action {
        self.with(h, |s, w, h| s.on_request(w, h, end_of_stream))
    }

    /// Response headers: the dry-run marker; the outcome of an HTTP call or a trailers-only gRPC one.
    /// (The response side of a stream with nothing left to do, such as a rejection's own reply, takes
    /// no worker.)
    pub fn response_headers(&mut self, h: &mut NativeHost<'_>, end_of_stream: bool) -> Action {
        if self.session.idle() {
            return Action::Continue;
        }
        self.with(h, |s, w, h| s.on_response_headers(w, h, end_of_stream))
    }

    /// Response trailers: the outcome of a gRPC call.
    pub fn response_trailers(&mut self, h: &mut NativeHost<'_>) -> Action {
        if self.session.idle() {
            return Action::Continue;
        }
        self.with(h, |s, w, h| s.on_response_trailers(w, h))
    }

    /// The stream is over (before access logs and `filter_destroy`): settles a call still open.
    pub fn stream_complete(&mut self, h: &mut NativeHost<'_>) {
        if !self.session.idle() {
            self.with(h, |s, w, h| s.on_end(w, h));
        }
    }
}
