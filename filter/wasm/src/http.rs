//! The per-stream context: each Envoy callback becomes one call of the core's [`Session`], which holds
//! every rule of the stream.

use std::rc::Rc;

use cb_core::host::Action as CoreAction;
use cb_core::session::Session;
use proxy_wasm::traits::{Context, HttpContext};
use proxy_wasm::types::Action;

use crate::host::WasmHost;
use crate::root::{Shared, WasmWorker};

/// One HTTP stream.
pub struct Stream {
    shared: Option<Rc<Shared>>,
    /// Envoy's id for this stream in this VM: the root's tick makes it effective to cut the call.
    context_id: u32,
    session: Session,
}

impl Stream {
    /// A stream under a configuration (`None` only if the root was never configured: pass through).
    pub fn new(shared: Option<Rc<Shared>>, context_id: u32) -> Self {
        Self {
            shared,
            context_id,
            session: Session::new(),
        }
    }

    /// Runs `f` with this worker and a host for the callback; passes through if either is busy (a
    /// callback re-entered, which Envoy does not do) or the stream has no configuration.
    fn with<R: Default>(
        &mut self,
        f: impl FnOnce(&mut Session, &mut WasmWorker, &mut WasmHost<'_>) -> R,
    ) -> R {
        let Some(shared) = self.shared.as_ref() else {
            return R::default();
        };
        let (Ok(mut worker), Ok(mut metrics)) = (
            shared.worker.try_borrow_mut(),
            shared.metrics.try_borrow_mut(),
        ) else {
            return R::default();
        };
        f(
            &mut self.session,
            &mut worker,
            &mut WasmHost {
                metrics: &mut metrics,
                stream: Some(self.context_id),
            },
        )
    }
}

fn action(a: CoreAction) -> Action {
    match a {
        CoreAction::Continue => Action::Continue,
        CoreAction::Stop => Action::Pause,
    }
}

impl Context for Stream {}

impl HttpContext for Stream {
    fn on_http_request_headers(&mut self, _headers: usize, end_of_stream: bool) -> Action {
        action(self.with(|s, w, h| s.on_request(w, h, end_of_stream)))
    }

    // The end of the request needs no worker: it only tells a stalled upload from a stalled upstream.
    fn on_http_request_body(&mut self, _body_size: usize, end_of_stream: bool) -> Action {
        if end_of_stream {
            self.session.on_request_end();
        }
        Action::Continue
    }

    fn on_http_request_trailers(&mut self, _trailers: usize) -> Action {
        self.session.on_request_end();
        Action::Continue
    }

    // The response side of a stream with nothing left to do (a rejection, an untracked call) borrows
    // nothing.
    fn on_http_response_headers(&mut self, _headers: usize, end_of_stream: bool) -> Action {
        if self.session.idle() {
            return Action::Continue;
        }
        action(self.with(|s, w, h| s.on_response_headers(w, h, end_of_stream)))
    }

    fn on_http_response_trailers(&mut self, _trailers: usize) -> Action {
        if self.session.idle() {
            return Action::Continue;
        }
        action(self.with(|s, w, h| s.on_response_trailers(w, h)))
    }

    fn on_log(&mut self) {
        if !self.session.idle() {
            self.with(|s, w, h| s.on_end(w, h));
        }
    }
}
