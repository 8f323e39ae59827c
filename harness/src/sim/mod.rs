//! Simulated Envoy workers sharing one breaker store, under tokio.
//!
//! Envoy runs one worker thread per core; each has its own copy of the filter's VM, and the breakers
//! live in shared data that all of them read and compare-and-swap. This module rebuilds that world
//! natively: a [`Sim`] holds one [`MemoryStore`] (Envoy's shared-data semantics, CAS included) and
//! several [`Worker`]s, each with its own core [`cb_core::worker::Worker`], exactly as each VM has.
//! Every call goes through the filter's own stream logic, the core's [`Session`], over a simulated
//! host ([`host`]): the scenarios test what the filter does, not a copy of it. Calls go to scripted
//! [`Upstream`]s whose behaviour can change over time.
//!
//! Time is tokio's: under `#[tokio::test(start_paused = true)]` it only moves when every task waits, so
//! a scenario that lasts minutes of simulated time runs in milliseconds and its timings are exact. The
//! [`Clock`] turns that time into the `now_ms` the core expects from the host. When a breaker tracks
//! stuck calls, each worker runs the core's tick every 50 ms, as the wasm root's tick does, and
//! delivers the cuts it orders (`cut_stuck_calls`) to their calls, as each Envoy build does: the
//! core decides which calls to cut, the host only answers them.

mod host;
mod stats;
mod upstream;
mod worker;

use std::fmt;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, Weak};
use std::time::Duration;

use cb_core::breaker::Breaker;
use cb_core::config::{ConfigError, FilterConfig};
use cb_core::registry::{self, UpstreamHealth};
use cb_core::store::{BreakerStore, MemoryStore, Read, SharedData, SlotRead, StoreError};

pub use stats::{Stats, Totals, TransitionEvent};
pub use upstream::{Behaviour, Clock, Gauge, GaugeGuard, Reply, Upstream, DEFAULT_ROUTE_TIMEOUT};
pub use worker::{Admission, CallReport, Worker};

/// The seed of a [`Sim`] made by [`Sim::new`].
pub const DEFAULT_SEED: u64 = 0x5eed;

/// How often each worker runs the stuck-call check (the wasm filter's tick period).
pub const STUCK_CHECK_PERIOD: Duration = Duration::from_millis(50);

/// A mutex that shrugs off poisoning: the data behind these locks (counters, scripts, a worker) stay
/// valid whatever a panicking test thread was doing, and the harness must not turn one failed test into
/// a cascade of unrelated panics.
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Why a simulation could not be set up.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SimError {
    /// The filter configuration was refused.
    Config(ConfigError),
    /// The store refused to create the breaker table.
    Store(StoreError),
}

impl fmt::Display for SimError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SimError::Config(e) => write!(f, "configuration refused: {e}"),
            SimError::Store(e) => write!(f, "store: {e}"),
        }
    }
}

impl std::error::Error for SimError {}

/// One simulated Envoy: a shared store, a configuration, a clock, and its workers.
#[derive(Debug)]
pub struct Sim {
    clock: Clock,
    store: Arc<MemoryStore>,
    config: Arc<FilterConfig>,
    stats: Arc<Stats>,
    /// Never empty: [`Sim::new`] makes at least one.
    workers: Vec<Arc<Worker>>,
    first: Arc<Worker>,
    ticker: Option<tokio::task::JoinHandle<()>>,
}

impl Drop for Sim {
    fn drop(&mut self) {
        if let Some(t) = self.ticker.take() {
            t.abort();
        }
    }
}

impl Sim {
    /// A simulation with `workers` workers (at least one) on a fresh store. When a breaker tracks
    /// stuck calls and a tokio runtime is running, every worker runs its tick every
    /// [`STUCK_CHECK_PERIOD`].
    pub fn new(config: FilterConfig, workers: usize) -> Result<Self, SimError> {
        Self::seeded(config, workers, DEFAULT_SEED)
    }

    /// The same, drawing from `seed`: simulated Envoys of one fleet each get their own seed, as each
    /// real Envoy seeds itself from the operating system.
    pub fn seeded(config: FilterConfig, workers: usize, seed: u64) -> Result<Self, SimError> {
        let clock = Clock::start();
        let store = Arc::new(MemoryStore::new());
        let config = Arc::new(config);
        let stats = Arc::new(Stats::default());
        let make = |id| {
            let (store, config, stats) =
                (Arc::clone(&store), Arc::clone(&config), Arc::clone(&stats));
            Worker::new(id, store, config, clock, stats, seed).map(Arc::new)
        };
        let first = make(0).map_err(SimError::Store)?;
        let mut all = vec![Arc::clone(&first)];
        for id in 1..workers {
            all.push(make(id).map_err(SimError::Store)?);
        }
        let ticker = (config.tracks_stuck_calls())
            .then(|| tokio::runtime::Handle::try_current().ok())
            .flatten()
            .map(|rt| rt.spawn(tick(all.iter().map(Arc::downgrade).collect())));
        Ok(Self {
            clock,
            store,
            config,
            stats,
            workers: all,
            first,
            ticker,
        })
    }

    /// A simulation from the filter's JSON configuration.
    pub fn from_json(json: &str, workers: usize) -> Result<Self, SimError> {
        Self::from_json_seeded(json, workers, DEFAULT_SEED)
    }

    /// A simulation from the filter's JSON configuration, drawing from `seed` ([`Sim::seeded`]).
    pub fn from_json_seeded(json: &str, workers: usize, seed: u64) -> Result<Self, SimError> {
        let config = FilterConfig::from_json(json.as_bytes()).map_err(SimError::Config)?;
        Self::seeded(config, workers, seed)
    }

    /// The simulation's clock.
    pub fn clock(&self) -> Clock {
        self.clock
    }

    /// The shared store.
    pub fn store(&self) -> &Arc<MemoryStore> {
        &self.store
    }

    /// The filter configuration.
    pub fn config(&self) -> &Arc<FilterConfig> {
        &self.config
    }

    /// The shared counters.
    pub fn stats(&self) -> &Arc<Stats> {
        &self.stats
    }

    /// The counters now.
    pub fn totals(&self) -> Totals {
        self.stats.totals()
    }

    /// All workers.
    pub fn workers(&self) -> &[Arc<Worker>] {
        &self.workers
    }

    /// Worker `i` modulo the number of workers, so callers can be spread round-robin.
    pub fn worker(&self, i: usize) -> Arc<Worker> {
        let picked = i
            .checked_rem(self.workers.len())
            .and_then(|i| self.workers.get(i));
        Arc::clone(picked.unwrap_or(&self.first))
    }

    /// An upstream on this simulation's clock.
    pub fn upstream(&self, name: &str, behaviour: Behaviour) -> Upstream {
        Upstream::new(name, self.clock, behaviour)
    }

    fn table(&self) -> SharedData<Arc<MemoryStore>> {
        SharedData::new(Arc::clone(&self.store), self.config.max_upstreams)
    }

    /// The slot holding `key`'s breaker.
    fn slot_of(&self, key: &str) -> Option<(u32, cb_core::store::Slot)> {
        let mut table = self.table();
        (0..table.capacity()).find_map(|i| match table.read(i) {
            Ok(SlotRead::Held(slot)) if slot.key == key => Some((i, slot)),
            _ => None,
        })
    }

    /// The stored breaker of `key`, if it exists and decodes.
    pub fn breaker(&self, key: &str) -> Option<Breaker> {
        self.slot_of(key).map(|(_, slot)| slot.breaker)
    }

    /// The state of the breaker of `key`.
    pub fn state(&self, key: &str) -> Option<cb_core::breaker::StateKind> {
        self.breaker(key).map(|b| b.state.kind())
    }

    /// Overwrites the stored breaker of `key` (to start a scenario in a given state). The key must
    /// have a breaker already (a call registers it); `false` when it has none.
    pub fn plant(&self, key: &str, breaker: &Breaker) -> bool {
        let Some((i, _)) = self.slot_of(key) else {
            return false;
        };
        self.table()
            .update(i, Read::Fresh, |content| {
                if let Some(slot) = content {
                    slot.breaker = breaker.clone();
                }
                ((), true)
            })
            .is_ok()
    }

    /// What the health endpoint would report now.
    pub fn health(&self) -> Vec<UpstreamHealth> {
        registry::health(&mut self.table(), Some(self.clock.now_ms()), usize::MAX)
            .map(|h| h.breakers)
            .unwrap_or_default()
    }
}

/// Every worker's tick, every [`STUCK_CHECK_PERIOD`], until the simulation is gone.
async fn tick(workers: Vec<Weak<Worker>>) {
    let mut every = tokio::time::interval(STUCK_CHECK_PERIOD);
    loop {
        every.tick().await;
        for w in &workers {
            match w.upgrade() {
                Some(w) => {
                    w.tick();
                }
                None => return,
            }
        }
    }
}
