//! The per-stream object: made in `filter_new` on the stream's worker, lent to every hook of that
//! stream, freed in `filter_destroy`. Each hook is one call of the core's [`Session`] over this
//! worker's core worker; the session holds every rule of the stream.
//!
//! A hook's work never sends a local reply itself: it returns the reply the session asked for
//! ([`Pending`]), and the `extern "C"` hook sends it once it has let go of the stream and of the
//! worker's lock, because Envoy completes the stream inside `send_response` (see `reply.rs`).
#![deny(unsafe_code)]

use cb_core::host::Action;
use cb_core::reply::LocalReply;
use cb_core::session::{self, Session};

use crate::config::{ModuleConfig, NativeWorker, WorkerState};
use crate::host::{FilterEnvoy, NativeHost};
use crate::objects::ConfigHandle;
use crate::scheduler::StreamScheduler;

/// A local reply a hook's work asks for, to be sent by the hook once the stream is let go.
pub type Pending = Option<LocalReply>;

/// One HTTP stream.
pub struct Stream {
    config: ConfigHandle,
    session: Session,
    /// The worker running the stream, once a hook asked Envoy (`filter_destroy` is not told).
    worker: Option<u32>,
    /// The stream's scheduler's token in its worker's [`crate::scheduler::StreamSchedulers`], once it
    /// has one (a call whose breaker cuts stuck calls was let through).
    token: Option<u64>,
    /// A hook of this stream panicked: the rest of the stream passes through untouched, since its
    /// state may be half-updated.
    pub failed: bool,
}

impl Stream {
    /// A stream under the configuration of `config`.
    pub fn new(config: ConfigHandle) -> Self {
        Self {
            config,
            session: Session::new(),
            worker: None,
            token: None,
            failed: false,
        }
    }

    /// The configuration the stream was made under.
    pub fn config(&self) -> &ModuleConfig {
        self.config.get()
    }

    /// A handle on that configuration, usable while the stream is borrowed mutably.
    pub fn config_handle(&self) -> ConfigHandle {
        self.config
    }

    /// Runs `f` with this stream's session, its worker's core worker and a host for it, under the
    /// worker's lock: its result, and the local reply the session asked for.
    fn with<R: Default>(
        &mut self,
        envoy: &FilterEnvoy<'_>,
        f: impl FnOnce(&mut Session, &mut NativeWorker, &mut NativeHost<'_>) -> R,
    ) -> (R, Pending) {
        let handle = self.config;
        let config = handle.get();
        let index = *self.worker.get_or_insert_with(|| envoy.worker_index());
        let Some(mut state) = config.worker(index) else {
            return (R::default(), None);
        };
        let WorkerState { core, schedulers } = &mut *state;
        let mut host = NativeHost::new(envoy, config, Some(schedulers), self.token);
        let out = f(&mut self.session, core, &mut host);
        let (token, reply) = host.finish();
        self.token = token;
        (out, reply)
    }

    /// Request headers: the health endpoint, or admission.
    pub fn request_headers(
        &mut self,
        envoy: &FilterEnvoy<'_>,
        end_of_stream: bool,
    ) -> (Action, Pending) {
        self.with(envoy, |s, w, h| s.on_request(w, h, end_of_stream))
    }

    /// The last of the request went upstream (a body chunk that ends it, or its trailers).
    pub fn request_end(&mut self) {
        self.session.on_request_end();
    }

    /// Response headers: the dry-run marker; the outcome of an HTTP call or a trailers-only gRPC one.
    /// A stream with nothing left to do (an untracked call) takes no worker. (Envoy runs no response
    /// hook of the module for the module's own local reply.)
    pub fn response_headers(&mut self, envoy: &FilterEnvoy<'_>, end_of_stream: bool) -> Action {
        if self.session.idle() {
            return Action::Continue;
        }
        self.with(envoy, |s, w, h| s.on_response_headers(w, h, end_of_stream))
            .0
    }

    /// Response trailers: the outcome of a gRPC call.
    pub fn response_trailers(&mut self, envoy: &FilterEnvoy<'_>) -> Action {
        if self.session.idle() {
            return Action::Continue;
        }
        self.with(envoy, |s, w, h| s.on_response_trailers(w, h)).0
    }

    /// The stream is over (before access logs and `filter_destroy`): settles a call still open. Runs
    /// inside `send_response` when the module answered the stream itself.
    pub fn stream_complete(&mut self, envoy: &FilterEnvoy<'_>) {
        if !self.session.idle() {
            self.with(envoy, |s, w, h| s.on_end(w, h));
        }
    }

    /// An event on the stream's scheduler: the tick ordered its stuck call cut (the event is the
    /// call's id); the breaker's answer, to send.
    pub fn scheduled(&mut self, envoy: &FilterEnvoy<'_>, call: u64) -> Pending {
        self.with(envoy, |_, w, h| session::deliver_cut(w, h, call))
            .1
    }

    /// The stream is about to be freed (`filter_destroy`): a call its session still holds (a hook
    /// panicked before it settled) leaves the worker's calls in flight, and its scheduler leaves the
    /// worker's table, both under the worker's lock, so that no cut order can reach the scheduler
    /// any more. The scheduler, for the caller to delete.
    pub fn release(&mut self) -> Option<StreamScheduler> {
        if self.token.is_none() && !self.session.in_flight() {
            return None;
        }
        let index = self.worker?;
        let mut state = self.config.get().worker(index)?;
        if let Some(call) = self.session.call() {
            state.core.forget(call);
        }
        self.token.take().and_then(|t| state.schedulers.remove(t))
    }
}
