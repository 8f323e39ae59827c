//! The module's clock. HTTP filters get no timers from Envoy, so one thread of the module's own, for
//! the whole process, commits an event to each live configuration's scheduler once per its period;
//! Envoy then calls `config_scheduled` on its main thread, which runs the configuration's tick over
//! every worker (`ModuleConfig::tick`): the stuck-call check and the cuts it orders, the retries of
//! queued outcomes, the state gauges' resync. Nothing of the breaker runs on the thread itself.
//!
//! Every configuration is ticked: every [`STUCK_PERIOD`] when one of its breakers tracks stuck calls
//! (a stuck call is recorded within that, plus the main thread's latency, of crossing
//! `stuck_call_duration`), else every [`RESYNC_PERIOD`], which the gauges' resync needs.
//!
//! The thread starts with the first configuration, and sleeps on a condition variable until the next
//! configuration is due. A configuration's [`Ticker`] leaves the registry when it drops, under the
//! registry's lock, and its scheduler is deleted there: the thread commits only under that lock, to
//! what the registry holds, so no commit can reach a deleted scheduler. Dropping a configuration
//! therefore waits for nothing but that lock (held for a few commits at most), never for a sleep. When
//! the last one leaves, the thread is woken and joined, so that no thread runs the module's code once
//! Envoy may unload it (without `do_not_close`, after its last configuration).
#![deny(unsafe_code)]

use std::sync::{Condvar, Mutex, MutexGuard, OnceLock, PoisonError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use cb_core::config::FilterConfig;
use cb_core::worker::GAUGE_RESYNC_MS;

use crate::scheduler::ConfigScheduler;

/// The period of a configuration that tracks stuck calls.
pub const STUCK_PERIOD: Duration = Duration::from_millis(50);

/// The period of any other configuration: the state gauges' resync.
pub const RESYNC_PERIOD: Duration = Duration::from_millis(GAUGE_RESYNC_MS);

/// The event id of the tick.
pub const TICK: u64 = 1;

/// How often `filter` needs its tick.
pub fn period(filter: &FilterConfig) -> Duration {
    if filter.tracks_stuck_calls() {
        STUCK_PERIOD
    } else {
        RESYNC_PERIOD
    }
}

/// One configuration's place in the registry.
#[derive(Debug)]
struct Entry {
    id: u64,
    scheduler: ConfigScheduler,
    period: Duration,
    due: Instant,
}

/// The live configurations, and the thread that ticks them.
#[derive(Debug, Default)]
struct Registry {
    entries: Vec<Entry>,
    last_id: u64,
    thread: Option<JoinHandle<()>>,
    /// Which thread should run: a thread whose generation is over returns.
    generation: u64,
}

struct Shared {
    registry: Mutex<Registry>,
    wake: Condvar,
}

fn shared() -> &'static Shared {
    static SHARED: OnceLock<Shared> = OnceLock::new();
    SHARED.get_or_init(|| Shared {
        registry: Mutex::new(Registry::default()),
        wake: Condvar::new(),
    })
}

fn lock(shared: &Shared) -> MutexGuard<'_, Registry> {
    // Nothing panics while holding it; if something did, the registry is still whole.
    shared
        .registry
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
}

/// A configuration's registration: ticked until this drops.
#[derive(Debug)]
pub struct Ticker {
    id: u64,
}

impl Ticker {
    /// Commits [`TICK`] to `scheduler` every `period` from now on; `None` (and the scheduler deleted)
    /// if the thread could not be started.
    pub fn start(scheduler: ConfigScheduler, period: Duration) -> Option<Self> {
        let shared = shared();
        let mut registry = lock(shared);
        if registry.thread.is_none() {
            registry.generation = registry.generation.wrapping_add(1);
            let generation = registry.generation;
            let thread = std::thread::Builder::new()
                .name("cb-ticker".into())
                .spawn(move || run(generation))
                .ok()?;
            registry.thread = Some(thread);
        }
        registry.last_id = registry.last_id.wrapping_add(1);
        let id = registry.last_id;
        let now = Instant::now();
        registry.entries.push(Entry {
            id,
            scheduler,
            period,
            due: now.checked_add(period).unwrap_or(now),
        });
        drop(registry);
        // The thread may be waiting for a later time than this one's first tick.
        shared.wake.notify_all();
        Some(Self { id })
    }
}

impl Drop for Ticker {
    fn drop(&mut self) {
        let shared = shared();
        let mut registry = lock(shared);
        if let Some(i) = registry.entries.iter().position(|e| e.id == self.id) {
            // Deleted out of the registry, under its lock: the thread commits to nothing else.
            drop(registry.entries.swap_remove(i));
        }
        let last = if registry.entries.is_empty() {
            registry.generation = registry.generation.wrapping_add(1);
            registry.thread.take()
        } else {
            None
        };
        drop(registry);
        if let Some(thread) = last {
            shared.wake.notify_all();
            // Woken now, the thread only has to see that its generation is over.
            let _ = thread.join();
        }
    }
}

/// The thread: commits each entry's tick when it is due, then sleeps until the next is.
fn run(generation: u64) {
    let shared = shared();
    let mut registry = lock(shared);
    while registry.generation == generation {
        let now = Instant::now();
        let mut next: Option<Instant> = None;
        for entry in registry.entries.iter_mut() {
            if entry.due <= now {
                entry.scheduler.commit(TICK);
                // From now, not from when it was due: a late thread does not commit a burst.
                entry.due = now.checked_add(entry.period).unwrap_or(now);
            }
            next = Some(next.map_or(entry.due, |n| n.min(entry.due)));
        }
        registry = match next {
            Some(at) => {
                let wait = at.saturating_duration_since(now);
                match shared.wake.wait_timeout(registry, wait) {
                    Ok((registry, _)) => registry,
                    Err(poisoned) => poisoned.into_inner().0,
                }
            }
            None => shared
                .wake
                .wait(registry)
                .unwrap_or_else(PoisonError::into_inner),
        };
    }
}

/// How many configurations are ticked now (for tests).
#[cfg(test)]
pub(crate) fn registered() -> usize {
    lock(shared()).entries.len()
}
