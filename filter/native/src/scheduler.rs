//! Envoy's schedulers, the module's only way to run code later: an event committed to a
//! configuration's scheduler runs `config_scheduled` on the main thread (the tick, see `ticker.rs`);
//! one committed to a stream's scheduler runs `scheduled` on the stream's worker (the delivery of a
//! cut). Committing is thread-safe; deleting is the module's duty, and a commit after the delete is a
//! use-after-free inside Envoy. Each scheduler here is owned by one value whose `Drop` deletes it, and
//! the commits are arranged so that none can follow:
//!
//! - a configuration's scheduler lives in the ticker's registry; the ticker commits only under the
//!   registry's lock, and a configuration leaves the registry under that lock before its scheduler is
//!   deleted;
//! - a stream's scheduler lives in its worker's [`StreamSchedulers`], under the worker's lock, where
//!   the tick commits to it (and only there); the stream's `filter_destroy` takes it out under that
//!   lock before deleting it. The tick names the stream by a token, never by the pointer, so an order
//!   for a stream that is gone finds nothing to commit to.

use std::collections::HashMap;
use std::ffi::c_void;
use std::ptr::NonNull;

use cb_core::worker::CutOrder;

use crate::abi;
use crate::host::{ConfigEnvoy, FilterEnvoy};

/// A configuration's scheduler: events committed to it run `config_scheduled` on the main thread.
#[derive(Debug)]
pub struct ConfigScheduler(NonNull<c_void>);

// SAFETY: Envoy's commit is callable from any thread (it posts to the main dispatcher), and so is the
// delete (it frees an object holding a weak reference to the configuration and the dispatcher); the
// pointer is only handed back to Envoy.
unsafe impl Send for ConfigScheduler {}

impl ConfigScheduler {
    /// A scheduler for the configuration being made (`config_new`, main thread); `None` if Envoy gave
    /// none.
    pub fn new(envoy: ConfigEnvoy) -> Option<Self> {
        // SAFETY: `envoy` is the live configuration object of the running `config_new`.
        let ptr = unsafe {
            abi::envoy_dynamic_module_callback_http_filter_config_scheduler_new(envoy.ptr())
        };
        NonNull::new(ptr).map(Self)
    }

    /// Runs `config_scheduled(event_id)` on the main thread, soon (or never, if the configuration is
    /// gone by then: Envoy checks).
    pub fn commit(&self, event_id: u64) {
        // SAFETY: a live scheduler: deleted only in `Drop`.
        unsafe {
            abi::envoy_dynamic_module_callback_http_filter_config_scheduler_commit(
                self.0.as_ptr(),
                event_id,
            );
        }
    }
}

impl Drop for ConfigScheduler {
    fn drop(&mut self) {
        // SAFETY: deleted once, by its only owner, which can commit no more.
        unsafe {
            abi::envoy_dynamic_module_callback_http_filter_config_scheduler_delete(self.0.as_ptr());
        }
    }
}

/// A stream's scheduler: events committed to it run `scheduled` on the stream's worker, while the
/// stream lives (Envoy drops them once it is destroyed).
#[derive(Debug)]
pub struct StreamScheduler(NonNull<c_void>);

// SAFETY: as for `ConfigScheduler`: commit may be called from any thread (it posts to the stream's
// worker, holding a weak reference to the filter), and delete frees that object from any thread.
unsafe impl Send for StreamScheduler {}

impl StreamScheduler {
    /// A scheduler for the stream of `envoy`; `None` if Envoy gave none.
    pub fn new(envoy: &FilterEnvoy<'_>) -> Option<Self> {
        // SAFETY: the live filter of the running hook.
        let ptr =
            unsafe { abi::envoy_dynamic_module_callback_http_filter_scheduler_new(envoy.ptr()) };
        NonNull::new(ptr).map(Self)
    }

    fn commit(&self, event_id: u64) {
        // SAFETY: a live scheduler: deleted only in `Drop`.
        unsafe {
            abi::envoy_dynamic_module_callback_http_filter_scheduler_commit(
                self.0.as_ptr(),
                event_id,
            );
        }
    }
}

impl Drop for StreamScheduler {
    fn drop(&mut self) {
        // SAFETY: deleted once, by its only owner, which can commit no more.
        unsafe { abi::envoy_dynamic_module_callback_http_filter_scheduler_delete(self.0.as_ptr()) }
    }
}

/// The schedulers of one worker's streams that may be cut, by token. It lives with the worker's
/// breakers, under the same lock: the tick that produces cut orders delivers them here in the same
/// critical section, and a stream leaves here (in `filter_destroy`) under that lock before its
/// scheduler is deleted. So a commit only ever reaches a scheduler that is here, hence alive.
#[derive(Debug, Default)]
pub struct StreamSchedulers {
    live: HashMap<u64, StreamScheduler>,
    /// The last token given; tokens are never reused, so a stale one names nothing.
    last: u64,
}

impl StreamSchedulers {
    /// Keeps `scheduler`; the token that names it.
    pub fn insert(&mut self, scheduler: StreamScheduler) -> u64 {
        self.last = self.last.wrapping_add(1);
        self.live.insert(self.last, scheduler);
        self.last
    }

    /// Takes out the scheduler of `token`, for its stream to delete.
    pub fn remove(&mut self, token: u64) -> Option<StreamScheduler> {
        self.live.remove(&token)
    }

    /// Commits `order` (its call's id as the event) to its stream's scheduler; `false` when the stream
    /// is gone.
    pub fn commit(&self, order: CutOrder) -> bool {
        let Some(scheduler) = self.live.get(&order.stream) else {
            return false;
        };
        scheduler.commit(order.call);
        true
    }

    /// How many streams are registered.
    pub fn len(&self) -> usize {
        self.live.len()
    }

    /// Whether none is.
    pub fn is_empty(&self) -> bool {
        self.live.is_empty()
    }
}
