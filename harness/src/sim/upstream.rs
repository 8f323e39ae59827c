//! The simulated world around the workers: a clock on tokio's (paused) time, and scripted upstreams
//! whose behaviour changes over time.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use tokio::time::Instant;

use super::lock;

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

pub(crate) fn millis(d: Duration) -> u64 {
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
    /// The client gave up before any answer (response flag `DR`): nothing to judge, unless it gave
    /// up at the deadline it had sent.
    ClientCancelled,
    /// The breaker answered the call while it was stuck (`cut_stuck_calls`): the caller got the
    /// breaker's `UNAVAILABLE` and the upstream request was reset. Its outcome is the stuck failure
    /// recorded before.
    Cut,
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
