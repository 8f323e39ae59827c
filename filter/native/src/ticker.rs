//! The stuck-call check's clock. HTTP filters get no timers from Envoy, so a thread of the module's
//! own wakes every [`PERIOD`] and commits an event to the configuration's scheduler; Envoy then calls
//! `config_scheduled` on its main thread, which runs the check over every worker's calls in flight.
//! Nothing of the breaker runs on the thread itself.
//!
//! The thread only exists for configurations that track stuck calls, and stops when its
//! configuration is dropped: `Drop` joins it before the scheduler is deleted, so no commit can reach
//! a deleted scheduler.
#![deny(unsafe_code)]

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use crate::host::ConfigScheduler;

/// How often the check runs: a call is recorded within this (plus the main thread's latency) of
/// crossing `stuck_call_duration`.
pub const PERIOD: Duration = Duration::from_millis(50);

/// The event id of the check.
pub const STUCK_CHECK: u64 = 1;

/// The running thread, and its scheduler.
#[derive(Debug)]
pub struct Ticker {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
    /// Held so the scheduler outlives the thread: it is deleted when this, the last reference,
    /// drops after `Drop::drop` joined the thread.
    _scheduler: Arc<ConfigScheduler>,
}

impl Ticker {
    /// Starts committing [`STUCK_CHECK`] to `scheduler` every [`PERIOD`]; `None` if no thread could
    /// be started (the check then runs only when a request comes for the upstream).
    pub fn start(scheduler: ConfigScheduler) -> Option<Self> {
        let stop = Arc::new(AtomicBool::new(false));
        let scheduler = Arc::new(scheduler);
        let (flag, target) = (Arc::clone(&stop), Arc::clone(&scheduler));
        let thread = std::thread::Builder::new()
            .name("cb-stuck-check".into())
            .spawn(move || {
                while !flag.load(Ordering::Acquire) {
                    std::thread::sleep(PERIOD);
                    if !flag.load(Ordering::Acquire) {
                        target.commit(STUCK_CHECK);
                    }
                }
            })
            .ok()?;
        Some(Self {
            stop,
            thread: Some(thread),
            _scheduler: scheduler,
        })
    }
}

impl Drop for Ticker {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
        if let Some(t) = self.thread.take() {
            // At most one period: the thread checks the flag before each commit.
            let _ = t.join();
        }
    }
}
