//! Simulated Envoy workers sharing one breaker store, under tokio.
//!
//! Envoy runs one worker thread per core; each has its own copy of the filter's VM, and the breakers
//! live in shared data that all of them read and compare-and-swap. This module rebuilds that world
//! natively: a [`Sim`] holds one [`MemoryStore`] (Envoy's shared-data semantics, CAS included) and
//! several [`Worker`]s, each with its own [`Registry`], exactly as each VM would have. Calls go to
//! scripted [`Upstream`]s whose behaviour can change over time.
//!
//! Time is tokio's: under `#[tokio::test(start_paused = true)]` it only moves when every task waits, so
//! a scenario that lasts minutes of simulated time runs in milliseconds and its timings are exact. The
//! [`Clock`] turns that time into the `now_ms` the core expects from the host.
//!
//! Everything the filter would report is counted in [`Stats`] (admissions, rejections, recorded
//! outcomes, CAS retries and give-ups, state changes with their reason), so a scenario can assert on
//! totals rather than on log lines.

use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use cb_core::breaker::{Breaker, Rejection, StateKind, Ticket, Transition};
use cb_core::classify::{classify, CallFacts, Classification, Outcome, ResponseFlags};
use cb_core::codec;
use cb_core::config::{BreakerConfig, ConfigError, FilterConfig};
use cb_core::registry::{self, Admission, Admitted, Recorded, Registry, Untracked, UpstreamHealth};
use cb_core::store::{MemoryStore, SharedStore, StoreError, UpdateError};
use tokio::time::Instant;

/// The upstream timeout when the breaker config sets no `call_timeout`: Envoy's default route timeout.
/// It also keeps a [`Behaviour::Hanging`] upstream from hanging a test forever.
pub const DEFAULT_ROUTE_TIMEOUT: Duration = Duration::from_secs(15);

/// Host time for the core: milliseconds since the simulation started, read from tokio's clock (so it
/// is simulated time when the runtime's clock is paused).
#[derive(Debug, Clone, Copy)]
pub struct Clock {
    start: Instant,
}

impl Clock {
    /// A clock whose zero is now.
    pub fn start() -> Self {
        Self {
            start: Instant::now(),
        }
    }

    /// Time since the start.
    pub fn elapsed(&self) -> Duration {
        self.start.elapsed()
    }

    /// Milliseconds since the start: the `now_ms` handed to the core.
    pub fn now_ms(&self) -> u64 {
        millis(self.elapsed())
    }
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

/// How an upstream answers the calls that reach it. The behaviour is chosen when a call arrives.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Behaviour {
    /// Answers `OK` after `latency`.
    Healthy {
        /// Time to answer.
        latency: Duration,
    },
    /// Answers `OK`, but only after `latency` (meant to be at least `slow_call_duration`). The same as
    /// `Healthy`; the name says what the scenario is about.
    Slow {
        /// Time to answer.
        latency: Duration,
    },
    /// Answers `grpc_status` after `latency`.
    Failing {
        /// The gRPC status of every answer (e.g. 14, `UNAVAILABLE`).
        grpc_status: u8,
        /// Time to answer.
        latency: Duration,
    },
    /// Fails every `n`th call that ever reached this upstream (counting from 1), answers `OK` to the
    /// others: `n = 2` is a steady 50% error rate, deterministic whatever the interleaving.
    FailEvery {
        /// One call in `n` fails; 0 never fails.
        n: u64,
        /// The gRPC status of the failures.
        grpc_status: u8,
        /// Time to answer.
        latency: Duration,
    },
    /// Healthy for `period`, failing for `period`, and so on, counted from when this behaviour took
    /// effect.
    Flapping {
        /// Length of each healthy or failing stretch.
        period: Duration,
        /// The gRPC status while failing.
        grpc_status: u8,
        /// Time to answer.
        latency: Duration,
    },
    /// Nothing listens: every call fails at once with a connect failure (Envoy's `UF` flag).
    Refusing,
    /// Accepts the call and never answers: only the router's timeout ends it.
    Hanging,
}

/// What came back to the worker for a call that was let through.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reply {
    /// The upstream answered with this `grpc-status`.
    Grpc(u8),
    /// The connection failed (response flag `UF`).
    ConnectFailure,
    /// The router's timeout fired first (response flag `UT`).
    TimedOut,
    /// The client gave up before any answer (response flag `DR`): there is nothing to judge.
    ClientCancelled,
}

#[derive(Debug, Clone, Copy)]
struct Phase {
    from: Duration,
    behaviour: Behaviour,
}

/// A gauge that remembers its high-water mark, for "never more than N at once" assertions.
#[derive(Debug, Default)]
pub struct Gauge {
    current: AtomicU64,
    max: AtomicU64,
}

impl Gauge {
    /// Adds one and updates the high-water mark.
    pub fn inc(&self) {
        let now = self
            .current
            .fetch_add(1, Ordering::SeqCst)
            .saturating_add(1);
        self.max.fetch_max(now, Ordering::SeqCst);
    }

    /// Takes one away (never below zero).
    pub fn dec(&self) {
        // A plain fetch_sub could wrap if a caller decremented twice; saturate instead.
        let _ = self
            .current
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |v| {
                Some(v.saturating_sub(1))
            });
    }

    /// The value now.
    pub fn current(&self) -> u64 {
        self.current.load(Ordering::SeqCst)
    }

    /// The highest value ever reached.
    pub fn max(&self) -> u64 {
        self.max.load(Ordering::SeqCst)
    }

    /// Adds one until the returned guard is dropped (also when the future holding it is cancelled, as
    /// a call cut short by a timeout is).
    pub fn enter(&self) -> GaugeGuard<'_> {
        self.inc();
        GaugeGuard(self)
    }
}

/// Holds one unit of a [`Gauge`]; see [`Gauge::enter`].
#[derive(Debug)]
pub struct GaugeGuard<'a>(&'a Gauge);

impl Drop for GaugeGuard<'_> {
    fn drop(&mut self) {
        self.0.dec();
    }
}

/// A scripted upstream service. Its name is the upstream key its breaker is found under, and it counts
/// the calls that actually reached it: the number a breaker exists to keep down.
#[derive(Debug)]
pub struct Upstream {
    name: String,
    clock: Clock,
    phases: Mutex<Vec<Phase>>,
    calls: AtomicU64,
    in_flight: Gauge,
}

impl Upstream {
    /// An upstream that behaves as `behaviour` from the start.
    pub fn new(name: impl Into<String>, clock: Clock, behaviour: Behaviour) -> Self {
        Self {
            name: name.into(),
            clock,
            phases: Mutex::new(vec![Phase {
                from: Duration::ZERO,
                behaviour,
            }]),
            calls: AtomicU64::new(0),
            in_flight: Gauge::default(),
        }
    }

    /// Scripts a change: from `at` (since the clock's start) on, behave as `behaviour`.
    pub fn then_at(self, at: Duration, behaviour: Behaviour) -> Self {
        lock(&self.phases).push(Phase {
            from: at,
            behaviour,
        });
        self
    }

    /// Behaves as `behaviour` from now on, until the next scripted change that is still to come.
    pub fn set(&self, behaviour: Behaviour) {
        let from = self.clock.elapsed();
        lock(&self.phases).push(Phase { from, behaviour });
    }

    /// The upstream key.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Calls that reached this upstream so far.
    pub fn calls(&self) -> u64 {
        self.calls.load(Ordering::SeqCst)
    }

    /// Calls being served right now, and the most ever served at once.
    pub fn in_flight(&self) -> &Gauge {
        &self.in_flight
    }

    /// The behaviour in force now and when it took effect. The latest start wins; between phases
    /// starting at the same time, the one added last.
    fn current(&self) -> Phase {
        let now = self.clock.elapsed();
        let phases = lock(&self.phases);
        phases
            .iter()
            .filter(|p| p.from <= now)
            .max_by_key(|p| p.from)
            .copied()
            // The first phase starts at zero, so there is always one; a healthy default keeps this total.
            .unwrap_or(Phase {
                from: Duration::ZERO,
                behaviour: Behaviour::Healthy {
                    latency: Duration::ZERO,
                },
            })
    }

    /// Serves one call. Dropping the future (a timeout) ends the call as far as the upstream knows.
    pub async fn serve(&self) -> Reply {
        let nth = self.calls.fetch_add(1, Ordering::SeqCst).saturating_add(1);
        let _serving = self.in_flight.enter();
        let phase = self.current();
        match phase.behaviour {
            Behaviour::Healthy { latency } | Behaviour::Slow { latency } => {
                tokio::time::sleep(latency).await;
                Reply::Grpc(0)
            }
            Behaviour::Failing {
                grpc_status,
                latency,
            } => {
                tokio::time::sleep(latency).await;
                Reply::Grpc(grpc_status)
            }
            Behaviour::FailEvery {
                n,
                grpc_status,
                latency,
            } => {
                tokio::time::sleep(latency).await;
                if n > 0 && nth % n == 0 {
                    Reply::Grpc(grpc_status)
                } else {
                    Reply::Grpc(0)
                }
            }
            Behaviour::Flapping {
                period,
                grpc_status,
                latency,
            } => {
                let since = self.clock.elapsed().saturating_sub(phase.from);
                let stretch = since.as_nanos().checked_div(period.as_nanos()).unwrap_or(0);
                tokio::time::sleep(latency).await;
                if stretch % 2 == 1 {
                    Reply::Grpc(grpc_status)
                } else {
                    Reply::Grpc(0)
                }
            }
            Behaviour::Refusing => Reply::ConnectFailure,
            Behaviour::Hanging => std::future::pending::<Reply>().await,
        }
    }
}

/// One state change, as the filter would log it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TransitionEvent {
    /// Simulated time of the change, in ms.
    pub at_ms: u64,
    /// The worker whose call caused it.
    pub worker: usize,
    /// The upstream key.
    pub upstream: String,
    /// From, to, and why.
    pub transition: Transition,
}

/// Counters shared by all workers of a simulation: what the filter's metrics would show.
#[derive(Debug, Default)]
pub struct Stats {
    calls: AtomicU64,
    admitted: AtomicU64,
    probes: AtomicU64,
    rejected_open: AtomicU64,
    rejected_half_open: AtomicU64,
    dry_run_rejections: AtomicU64,
    untracked: AtomicU64,
    disabled: AtomicU64,
    recorded: AtomicU64,
    successes: AtomicU64,
    failures: AtomicU64,
    slow: AtomicU64,
    ignored: AtomicU64,
    released: AtomicU64,
    record_errors: AtomicU64,
    cas_give_ups: AtomicU64,
    cas_retries: AtomicU64,
    corrupt: AtomicU64,
    wait_ms: AtomicU64,
    probes_in_flight: Gauge,
    transitions: Mutex<Vec<TransitionEvent>>,
}

/// A copy of the [`Stats`] counters at one instant, for assertions.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Totals {
    /// Calls that asked a breaker for admission (every call, whatever followed).
    pub calls: u64,
    /// Calls let through with a ticket (to be recorded).
    pub admitted: u64,
    /// Of those, HalfOpen probes.
    pub probes: u64,
    /// Calls rejected, Open or HalfOpen.
    pub rejected: u64,
    /// Calls rejected while Open.
    pub rejected_open: u64,
    /// Calls rejected while HalfOpen with no probe permit free.
    pub rejected_half_open: u64,
    /// `dry_run`: calls that would have been rejected (let through, not recorded).
    pub dry_run_rejections: u64,
    /// Calls let through untracked that the filter counts (store failure, too many upstreams...).
    pub untracked: u64,
    /// Calls passed through by `mode: disabled` (not counted by the filter).
    pub disabled: u64,
    /// Outcomes stored in a breaker (successes + failures + ignored).
    pub recorded: u64,
    /// Stored successes.
    pub successes: u64,
    /// Stored failures.
    pub failures: u64,
    /// Stored slow outcomes (also counted as a success or failure).
    pub slow: u64,
    /// Stored ignored outcomes.
    pub ignored: u64,
    /// Probe permits given back without an outcome (client cancelled).
    pub released: u64,
    /// Outcomes that could not be stored (lost and counted, as the filter does).
    pub record_errors: u64,
    /// Store updates abandoned after `MAX_CAS_ATTEMPTS` lost races (admit, record or release).
    pub cas_give_ups: u64,
    /// Lost CAS races that were retried.
    pub cas_retries: u64,
    /// Times stored bytes were undecodable and the breaker restarted.
    pub corrupt: u64,
    /// The most HalfOpen probes ever in flight at once (between admit and record), across workers.
    pub max_probes_in_flight: u64,
    /// Total time callers waited for their calls, in ms (rejected calls wait nothing).
    pub wait_ms: u64,
}

fn bump(counter: &AtomicU64, by: u64) {
    counter.fetch_add(by, Ordering::SeqCst);
}

fn load(counter: &AtomicU64) -> u64 {
    counter.load(Ordering::SeqCst)
}

impl Stats {
    /// The counters now.
    pub fn totals(&self) -> Totals {
        let (rejected_open, rejected_half_open) =
            (load(&self.rejected_open), load(&self.rejected_half_open));
        Totals {
            calls: load(&self.calls),
            admitted: load(&self.admitted),
            probes: load(&self.probes),
            rejected: rejected_open.saturating_add(rejected_half_open),
            rejected_open,
            rejected_half_open,
            dry_run_rejections: load(&self.dry_run_rejections),
            untracked: load(&self.untracked),
            disabled: load(&self.disabled),
            recorded: load(&self.recorded),
            successes: load(&self.successes),
            failures: load(&self.failures),
            slow: load(&self.slow),
            ignored: load(&self.ignored),
            released: load(&self.released),
            record_errors: load(&self.record_errors),
            cas_give_ups: load(&self.cas_give_ups),
            cas_retries: load(&self.cas_retries),
            corrupt: load(&self.corrupt),
            max_probes_in_flight: self.probes_in_flight.max(),
            wait_ms: load(&self.wait_ms),
        }
    }

    /// HalfOpen probes between admit and record, across workers.
    pub fn probes_in_flight(&self) -> &Gauge {
        &self.probes_in_flight
    }

    /// Every state change so far, in the order they were stored.
    pub fn transitions(&self) -> Vec<TransitionEvent> {
        lock(&self.transitions).clone()
    }

    /// The state changes of one upstream.
    pub fn transitions_of(&self, upstream: &str) -> Vec<TransitionEvent> {
        lock(&self.transitions)
            .iter()
            .filter(|e| e.upstream == upstream)
            .cloned()
            .collect()
    }

    fn attempts(&self, attempts: u32) {
        bump(&self.cas_retries, u64::from(attempts.saturating_sub(1)));
    }

    fn transition(
        &self,
        at_ms: u64,
        worker: usize,
        upstream: &str,
        transition: Option<Transition>,
    ) {
        if let Some(transition) = transition {
            lock(&self.transitions).push(TransitionEvent {
                at_ms,
                worker,
                upstream: upstream.to_string(),
                transition,
            });
        }
    }

    fn update_error(&self, e: &UpdateError) {
        if *e == UpdateError::GaveUp {
            bump(&self.cas_give_ups, 1);
        }
    }
}

/// A mutex that shrugs off poisoning: the data behind these locks (counters, scripts, a registry) stay
/// valid whatever a panicking test thread was doing, and the harness must not turn one failed test into
/// a cascade of unrelated panics.
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Everything that happened to one call.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CallReport {
    /// The breaker's decision.
    pub admission: Admission,
    /// What came back from upstream; `None` when the call was rejected and never left the worker.
    pub reply: Option<Reply>,
    /// What the call counts as; `None` when rejected.
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

/// One simulated Envoy worker: its own [`Registry`] (as each worker's VM has), the shared store, and the
/// filter configuration. Like an Envoy worker it serves many calls at once; the registry sits behind a
/// mutex that is never held across an `await`, the way a VM runs one callback at a time.
#[derive(Debug)]
pub struct Worker {
    id: usize,
    registry: Mutex<Registry>,
    store: Arc<MemoryStore>,
    config: Arc<FilterConfig>,
    clock: Clock,
    stats: Arc<Stats>,
}

impl Worker {
    /// A worker numbered `id` on `store`.
    pub fn new(
        id: usize,
        store: Arc<MemoryStore>,
        config: Arc<FilterConfig>,
        clock: Clock,
        stats: Arc<Stats>,
    ) -> Self {
        let registry = Mutex::new(Registry::new(config.max_upstreams));
        Self {
            id,
            registry,
            store,
            config,
            clock,
            stats,
        }
    }

    /// This worker's number.
    pub fn id(&self) -> usize {
        self.id
    }

    /// The breaker settings for an upstream key.
    pub fn config_for(&self, key: &str) -> &BreakerConfig {
        self.config.breaker_for(key)
    }

    /// Asks the breaker of `key` whether a call may go through at `now_ms`, and counts the answer.
    /// A ticket handed out here must come back through [`Worker::record`] or [`Worker::release`].
    pub fn admit(&self, key: &str, now_ms: u64) -> Admitted {
        let cfg = self.config.breaker_for(key);
        let admitted = lock(&self.registry).admit(&*self.store, key, cfg, now_ms);
        let s = &*self.stats;
        bump(&s.calls, 1);
        s.attempts(admitted.attempts);
        if admitted.corrupt.is_some() {
            bump(&s.corrupt, 1);
        }
        s.transition(now_ms, self.id, key, admitted.transition);
        match &admitted.admission {
            Admission::Allow(ticket) => {
                bump(&s.admitted, 1);
                if ticket.probe {
                    bump(&s.probes, 1);
                    // After the permit was taken in the store: the gauge counts a subset of the
                    // permits held, so its high-water mark can be held against the limit.
                    s.probes_in_flight.inc();
                }
            }
            Admission::Reject(r) => match r.state {
                StateKind::HalfOpen => bump(&s.rejected_half_open, 1),
                _ => bump(&s.rejected_open, 1),
            },
            Admission::DryRun(_) => bump(&s.dry_run_rejections, 1),
            Admission::Untracked(why) => {
                if let Untracked::Store(e) = why {
                    s.update_error(e);
                }
                if why.counted() {
                    bump(&s.untracked, 1);
                } else {
                    bump(&s.disabled, 1);
                }
            }
        }
        admitted
    }

    /// Stores the outcome of a call admitted with `ticket`, and counts it.
    pub fn record(
        &self,
        key: &str,
        ticket: Ticket,
        now_ms: u64,
        classification: Classification,
    ) -> Recorded {
        let cfg = self.config.breaker_for(key);
        let s = &*self.stats;
        if ticket.probe {
            // Before the store gives the permit back, not after: another worker may take it the moment
            // it is written, and the gauge must never count one permit twice.
            s.probes_in_flight.dec();
        }
        let recorded =
            lock(&self.registry).record(&*self.store, key, cfg, ticket, now_ms, classification);
        s.attempts(recorded.attempts);
        if recorded.corrupt.is_some() {
            bump(&s.corrupt, 1);
        }
        s.transition(now_ms, self.id, key, recorded.transition);
        match &recorded.error {
            Some(e) => {
                bump(&s.record_errors, 1);
                s.update_error(e);
            }
            None => {
                bump(&s.recorded, 1);
                bump(&s.slow, u64::from(classification.slow));
                match classification.outcome {
                    Outcome::Success => bump(&s.successes, 1),
                    Outcome::Failure => bump(&s.failures, 1),
                    Outcome::Ignored => bump(&s.ignored, 1),
                }
            }
        }
        recorded
    }

    /// Gives back the probe permit of a call that ended with nothing to judge.
    pub fn release(&self, key: &str, ticket: Ticket) -> Result<(), UpdateError> {
        let cfg = self.config.breaker_for(key);
        if ticket.probe {
            // Before the permit goes back, for the reason given in `record`.
            self.stats.probes_in_flight.dec();
        }
        let released = lock(&self.registry).release(&*self.store, key, cfg, ticket);
        match &released {
            Ok(()) => bump(&self.stats.released, u64::from(ticket.probe)),
            Err(e) => self.stats.update_error(e),
        }
        released
    }

    /// Makes one call to `upstream` through the breaker, as the filter and Envoy's router would: admit;
    /// if rejected, answer at once; otherwise forward under the router timeout (`call_timeout`, else
    /// [`DEFAULT_ROUTE_TIMEOUT`]), classify the reply and record it.
    pub async fn call(&self, upstream: &Upstream) -> CallReport {
        self.call_inner(upstream, None).await
    }

    /// Like [`Worker::call`], but the client gives up after `patience` if no answer came by then.
    pub async fn call_with_patience(&self, upstream: &Upstream, patience: Duration) -> CallReport {
        self.call_inner(upstream, Some(patience)).await
    }

    async fn call_inner(&self, upstream: &Upstream, patience: Option<Duration>) -> CallReport {
        let started = Instant::now();
        let key = upstream.name();
        let cfg = self.config.breaker_for(key);
        let admitted = self.admit(key, self.clock.now_ms());
        let mut transitions: Vec<Transition> = admitted.transition.into_iter().collect();
        let ticket = match &admitted.admission {
            Admission::Reject(_) => {
                let waited = started.elapsed();
                bump(&self.stats.wait_ms, millis(waited));
                return CallReport {
                    admission: admitted.admission,
                    reply: None,
                    classification: None,
                    transitions,
                    waited,
                };
            }
            Admission::Allow(ticket) => Some(*ticket),
            // Let through but not tracked: dry_run's would-be rejections, disabled, untracked keys.
            Admission::DryRun(_) | Admission::Untracked(_) => None,
        };

        let router_timeout = cfg
            .call_timeout_ms
            .map_or(DEFAULT_ROUTE_TIMEOUT, Duration::from_millis);
        let forwarded = async {
            tokio::time::timeout(router_timeout, upstream.serve())
                .await
                .unwrap_or(Reply::TimedOut)
        };
        let reply = match patience {
            None => forwarded.await,
            Some(patience) => tokio::select! {
                // On a tie the answer wins: it arrived as the client was leaving.
                biased;
                reply = forwarded => reply,
                () = tokio::time::sleep(patience) => Reply::ClientCancelled,
            },
        };
        let classification = classify_reply(cfg, reply, millis(started.elapsed()));

        if let Some(ticket) = ticket {
            let now_ms = self.clock.now_ms();
            if reply == Reply::ClientCancelled {
                // The stream ended with no response: nothing to judge, but a probe permit goes back.
                let _ = self.release(key, ticket);
            } else {
                transitions.extend(self.record(key, ticket, now_ms, classification).transition);
            }
        }
        let waited = started.elapsed();
        bump(&self.stats.wait_ms, millis(waited));
        CallReport {
            admission: admitted.admission,
            reply: Some(reply),
            classification: Some(classification),
            transitions,
            waited,
        }
    }
}

/// What the filter would see of a reply in `on_log`: response headers, trailers and Envoy's flags.
fn classify_reply(cfg: &BreakerConfig, reply: Reply, duration_ms: u64) -> Classification {
    let grpc_status = match reply {
        Reply::Grpc(code) => code.to_string(),
        _ => String::new(),
    };
    let mut facts = CallFacts {
        grpc: true,
        duration_ms: Some(duration_ms),
        ..CallFacts::default()
    };
    match reply {
        Reply::Grpc(_) => {
            facts.http_status = Some(200);
            facts.grpc_status = Some(grpc_status.as_bytes());
        }
        Reply::ConnectFailure => {
            facts.http_status = Some(503);
            facts.flags = ResponseFlags(ResponseFlags::UPSTREAM_CONNECTION_FAILURE);
        }
        Reply::TimedOut => {
            facts.http_status = Some(504);
            facts.flags = ResponseFlags(ResponseFlags::UPSTREAM_REQUEST_TIMEOUT);
        }
        Reply::ClientCancelled => {
            facts.flags = ResponseFlags(ResponseFlags::DOWNSTREAM_REMOTE_RESET)
        }
    }
    classify(cfg, &facts)
}

/// Why a simulation could not be set up.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SimError {
    /// The filter configuration was refused.
    Config(ConfigError),
    /// The store refused to create the upstream index.
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
}

impl Sim {
    /// A simulation with `workers` workers (at least one) on a fresh store. Like each worker's
    /// `on_configure`, it creates the upstream index before any traffic.
    pub fn new(config: FilterConfig, workers: usize) -> Result<Self, SimError> {
        let clock = Clock::start();
        let store = Arc::new(MemoryStore::new());
        Registry::ensure_index(&*store).map_err(SimError::Store)?;
        let config = Arc::new(config);
        let stats = Arc::new(Stats::default());
        let make = |id| {
            Arc::new(Worker::new(
                id,
                Arc::clone(&store),
                Arc::clone(&config),
                clock,
                Arc::clone(&stats),
            ))
        };
        let first = make(0);
        let mut all = vec![Arc::clone(&first)];
        all.extend((1..workers).map(make));
        Ok(Self {
            clock,
            store,
            config,
            stats,
            workers: all,
            first,
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

    /// The stored breaker of `key`, if it exists and decodes.
    pub fn breaker(&self, key: &str) -> Option<Breaker> {
        let (bytes, _) = self.store.get(&registry::state_key(key)).ok().flatten()?;
        codec::decode(&bytes).ok()
    }

    /// The state of the breaker of `key`.
    pub fn state(&self, key: &str) -> Option<StateKind> {
        self.breaker(key).map(|b| b.state.kind())
    }

    /// Overwrites the stored breaker of `key` (to start a scenario in a given state). The key should
    /// have been registered by a call first, or the health report will not list it.
    pub fn plant(&self, key: &str, breaker: &Breaker) {
        self.store
            .put_raw(&registry::state_key(key), &codec::encode(breaker));
    }

    /// What the health endpoint would report now.
    pub fn health(&self) -> Vec<UpstreamHealth> {
        Registry::snapshot(&*self.store, self.clock.now_ms()).unwrap_or_default()
    }
}
