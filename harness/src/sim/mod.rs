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
//! stuck calls, each worker runs the stuck-call check every 50 ms, as the wasm root's tick does.

mod host;
mod stats;
mod upstream;

use std::fmt;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, Weak};
use std::time::Duration;

use cb_core::breaker::{Breaker, Rejection, Transition};
use cb_core::classify::{Classification, ResponseFlags};
use cb_core::config::{BreakerConfig, ConfigError, FilterConfig};
use cb_core::host::Action;
use cb_core::registry::{self, UpstreamHealth};
use cb_core::session::Session;
use cb_core::store::{BreakerStore, MemoryStore, Read, SharedData, SlotRead, StoreError};
use cb_core::telemetry::Event;
use tokio::time::Instant;

pub use stats::{Stats, Totals, TransitionEvent};
pub use upstream::{Behaviour, Clock, Gauge, GaugeGuard, Reply, Upstream, DEFAULT_ROUTE_TIMEOUT};

use host::{SimHost, SimTelemetry};
use stats::bump;
use upstream::millis;

/// How often each worker runs the stuck-call check (the wasm filter's tick period).
pub const STUCK_CHECK_PERIOD: Duration = Duration::from_millis(50);

/// A mutex that shrugs off poisoning: the data behind these locks (counters, scripts, a worker) stay
/// valid whatever a panicking test thread was doing, and the harness must not turn one failed test into
/// a cascade of unrelated panics.
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// The core worker of one simulated Envoy worker, over shared data in memory.
type CoreWorker = cb_core::worker::Worker<SharedData<Arc<MemoryStore>>>;

/// What the breaker decided on a call, as the simulation saw it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admission {
    /// Let through with a ticket; `probe` when it holds a HalfOpen permit.
    Allow {
        /// A HalfOpen probe.
        probe: bool,
    },
    /// Answered locally.
    Reject(Rejection),
    /// `dry_run` would have rejected it: let through, marked, not recorded.
    DryRun(Rejection),
    /// Let through with no breaker (counted by the filter).
    Untracked,
    /// `mode: disabled`: let through, not counted.
    Disabled,
}

/// Everything that happened to one call.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CallReport {
    /// The breaker's decision.
    pub admission: Admission,
    /// What came back from upstream; `None` when the call was rejected and never left the worker.
    pub reply: Option<Reply>,
    /// What the call was recorded as; `None` when nothing was recorded for it (rejected, untracked,
    /// or already recorded as stuck).
    pub classification: Option<Classification>,
    /// State changes the call caused (at admission, at recording).
    pub transitions: Vec<Transition>,
    /// How long the caller waited.
    pub waited: Duration,
}

impl CallReport {
    /// The worker answered the call itself.
    pub fn rejected(&self) -> Option<&Rejection> {
        match &self.admission {
            Admission::Reject(r) => Some(r),
            _ => None,
        }
    }

    /// The call was let through to the upstream.
    pub fn forwarded(&self) -> bool {
        self.reply.is_some()
    }
}

/// What a caller does while it waits.
#[derive(Debug, Clone, Copy)]
enum Patience {
    /// Waits for whatever ends the call (the answer, or the router's timeout).
    Forever,
    /// Gives up after this long, having told nobody.
    GivesUpAfter(Duration),
    /// Sends this as its `grpc-timeout` deadline, and gives up when it passes, as gRPC clients do.
    Deadline(Duration),
}

/// One simulated Envoy worker: its own core worker (as each worker's VM has), the shared store, and
/// the filter configuration. Like an Envoy worker it serves many calls at once; the core worker sits
/// behind a mutex that is never held across an `await`, the way a VM runs one callback at a time.
#[derive(Debug)]
pub struct Worker {
    id: usize,
    core: Mutex<CoreWorker>,
    config: Arc<FilterConfig>,
    clock: Clock,
    stats: Arc<Stats>,
}

impl Worker {
    /// A worker numbered `id` on `store`, configured (its table prepared) as `on_configure` does.
    pub fn new(
        id: usize,
        store: Arc<MemoryStore>,
        config: Arc<FilterConfig>,
        clock: Clock,
        stats: Arc<Stats>,
    ) -> Result<Self, StoreError> {
        let table = SharedData::new(store, config.max_upstreams);
        // Each simulated worker draws its own reproducible sequence, as each Envoy worker draws its own.
        let seed = 0x5eed_u64 ^ (id as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15);
        let mut core = CoreWorker::new(Arc::clone(&config), clock.now_ms(), table, seed);
        core.prepare()?;
        Ok(Self {
            id,
            core: Mutex::new(core),
            config,
            clock,
            stats,
        })
    }

    /// This worker's number.
    pub fn id(&self) -> usize {
        self.id
    }

    /// The breaker settings for an upstream key.
    pub fn config_for(&self, key: &str) -> &BreakerConfig {
        self.config.breaker_for(key)
    }

    /// Makes one call to `upstream` through the breaker, as the filter and Envoy's router would: admit;
    /// if rejected, answer at once; otherwise forward under the router timeout (`call_timeout`, else
    /// [`DEFAULT_ROUTE_TIMEOUT`]), and settle the call as its response comes back.
    pub async fn call(&self, upstream: &Upstream) -> CallReport {
        self.call_inner(upstream, Patience::Forever).await
    }

    /// Like [`Worker::call`], but the client gives up after `patience`, without a deadline header.
    pub async fn call_with_patience(&self, upstream: &Upstream, patience: Duration) -> CallReport {
        self.call_inner(upstream, Patience::GivesUpAfter(patience))
            .await
    }

    /// Like [`Worker::call`], from a gRPC client with a deadline: it sends `grpc-timeout` and cancels
    /// the call when the deadline passes.
    pub async fn call_with_deadline(&self, upstream: &Upstream, deadline: Duration) -> CallReport {
        self.call_inner(upstream, Patience::Deadline(deadline))
            .await
    }

    async fn call_inner(&self, upstream: &Upstream, patience: Patience) -> CallReport {
        let started = Instant::now();
        let key = upstream.name();
        let (mut session, mut host, admission) = self.start(key, patience);
        if matches!(admission, Admission::Reject(_)) {
            return self.report(admission, None, host.telemetry.events, started);
        }
        let router_timeout = self
            .config_for(key)
            .call_timeout_ms
            .map_or(DEFAULT_ROUTE_TIMEOUT, Duration::from_millis);
        let forwarded = async {
            tokio::time::timeout(router_timeout, upstream.serve())
                .await
                .unwrap_or(Reply::TimedOut)
        };
        let give_up = match patience {
            Patience::Forever => None,
            Patience::GivesUpAfter(d) | Patience::Deadline(d) => Some(d),
        };
        let reply = match give_up {
            None => forwarded.await,
            Some(after) => tokio::select! {
                // On a tie the answer wins: it arrived as the client was leaving.
                biased;
                reply = forwarded => reply,
                () = tokio::time::sleep(after) => Reply::ClientCancelled,
            },
        };
        self.finish(&mut session, &mut host, reply);
        self.report(admission, Some(reply), host.telemetry.events, started)
    }

    /// The same call, settled at once with `reply`: for tests that race OS threads, not tasks.
    pub fn complete(&self, key: &str, reply: Reply) -> CallReport {
        let started = Instant::now();
        let (mut session, mut host, admission) = self.start(key, Patience::Forever);
        if matches!(admission, Admission::Reject(_)) {
            return self.report(admission, None, host.telemetry.events, started);
        }
        self.finish(&mut session, &mut host, reply);
        self.report(admission, Some(reply), host.telemetry.events, started)
    }

    /// The request side: the session admits (or answers) the call.
    fn start(&self, key: &str, patience: Patience) -> (Session, SimHost<'_>, Admission) {
        bump(&self.stats.calls, 1);
        let mut request = vec![("content-type", "application/grpc".to_string())];
        if let Patience::Deadline(d) = patience {
            request.push(("grpc-timeout", format!("{}m", d.as_millis())));
        }
        let mut host = SimHost {
            telemetry: self.telemetry(),
            request,
            cluster: key.to_string(),
            response: Vec::new(),
            trailers: Vec::new(),
            flags: 0,
            reply: None,
        };
        let mut session = Session::new();
        let action = session.on_request(&mut lock(&self.core), &mut host, true);
        if session.holds_probe() {
            // After the permit was taken in the store: the gauge counts a subset of the permits held,
            // so its high-water mark can be held against the limit.
            self.stats.probes_in_flight().inc();
        }
        let admission = admission_of(&host.telemetry.events, action, &session);
        if admission == Admission::Disabled {
            bump(&self.stats.disabled, 1);
        }
        (session, host, admission)
    }

    /// The response side: what Envoy would show the filter for `reply`, then the end of the stream.
    fn finish(&self, session: &mut Session, host: &mut SimHost<'_>, reply: Reply) {
        let mut core = lock(&self.core);
        let probe = session.holds_probe();
        if probe {
            // Before the store gives the permit back, not after: another worker may take it the moment
            // it is written, and the gauge must never count one permit twice.
            self.stats.probes_in_flight().dec();
        }
        let local_reply = |flag: u64| {
            (
                flag,
                vec![
                    (":status", "200".to_string()),
                    ("grpc-status", "14".to_string()),
                ],
            )
        };
        match reply {
            Reply::Grpc(code) => {
                host.response = vec![(":status", "200".to_string())];
                session.on_response_headers(&mut core, host, false);
                host.trailers = vec![("grpc-status", code.to_string())];
                session.on_response_trailers(&mut core, host);
            }
            Reply::ConnectFailure | Reply::TimedOut => {
                // Envoy answers with a trailers-only UNAVAILABLE of its own, and says why in the flags.
                let flag = if reply == Reply::TimedOut {
                    ResponseFlags::UPSTREAM_REQUEST_TIMEOUT
                } else {
                    ResponseFlags::UPSTREAM_CONNECTION_FAILURE
                };
                (host.flags, host.response) = local_reply(flag);
                session.on_response_headers(&mut core, host, true);
            }
            Reply::ClientCancelled => host.flags = ResponseFlags::DOWNSTREAM_REMOTE_RESET,
        }
        session.on_end(&mut core, host);
        let released = host.telemetry.events.iter().any(|e| {
            matches!(e, Event::Recorded { outcome, .. } if *outcome == cb_core::classify::Outcome::Ignored)
        });
        bump(&self.stats.released, u64::from(probe && released));
    }

    fn report(
        &self,
        admission: Admission,
        reply: Option<Reply>,
        events: Vec<Event>,
        started: Instant,
    ) -> CallReport {
        let waited = started.elapsed();
        bump(&self.stats.wait_ms, millis(waited));
        let mut classification = None;
        let mut transitions = Vec::new();
        for e in events {
            match e {
                Event::Recorded { outcome, slow, .. } => {
                    classification = Some(Classification { outcome, slow });
                }
                Event::Transition(t) => transitions.push(t),
                _ => {}
            }
        }
        CallReport {
            admission,
            reply,
            classification,
            transitions,
            waited,
        }
    }

    fn telemetry(&self) -> SimTelemetry<'_> {
        SimTelemetry {
            clock: self.clock,
            worker: self.id,
            stats: &self.stats,
            events: Vec::new(),
        }
    }

    /// One run of the stuck-call check (what the wasm root's tick does).
    pub fn check_stuck(&self) -> Vec<Event> {
        let mut t = self.telemetry();
        lock(&self.core).tick(self.clock.now_ms(), &mut t);
        t.events
    }
}

/// The admission, from the events the request side produced.
fn admission_of(events: &[Event], action: Action, session: &Session) -> Admission {
    for e in events {
        match e {
            Event::Rejected(r) if action == Action::Stop => return Admission::Reject(*r),
            Event::DryRun(r) => return Admission::DryRun(*r),
            Event::Untracked(_) => return Admission::Untracked,
            _ => {}
        }
    }
    if session.in_flight() {
        Admission::Allow {
            probe: session.holds_probe(),
        }
    } else {
        Admission::Disabled
    }
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
    /// stuck calls and a tokio runtime is running, every worker runs the stuck-call check every
    /// [`STUCK_CHECK_PERIOD`].
    pub fn new(config: FilterConfig, workers: usize) -> Result<Self, SimError> {
        let clock = Clock::start();
        let store = Arc::new(MemoryStore::new());
        let config = Arc::new(config);
        let stats = Arc::new(Stats::default());
        let make = |id| {
            let (store, config, stats) =
                (Arc::clone(&store), Arc::clone(&config), Arc::clone(&stats));
            Worker::new(id, store, config, clock, stats).map(Arc::new)
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
        let config = FilterConfig::from_json(json.as_bytes()).map_err(SimError::Config)?;
        Self::new(config, workers)
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

/// Every worker's stuck-call check, every [`STUCK_CHECK_PERIOD`], until the simulation is gone.
async fn tick(workers: Vec<Weak<Worker>>) {
    let mut every = tokio::time::interval(STUCK_CHECK_PERIOD);
    loop {
        every.tick().await;
        for w in &workers {
            match w.upgrade() {
                Some(w) => {
                    w.check_stuck();
                }
                None => return,
            }
        }
    }
}
