//! The metrics of contract section 6, as Envoy stats defined from the VM.
//!
//! Envoy prefixes wasm stats with `wasmcustom.`, a namespace its Prometheus output strips. Labels travel
//! inside the stat name as `.upstream=.=<key>;.;result=.=success;.;`, the delimiter style Istio uses,
//! and the shipped Envoy configs' `stats_tags` regexes turn each segment into a label. Stats are global
//! by name, so every worker's VM defining the same name updates the same stat.
//!
//! Ids are defined lazily and cached per upstream; only upstreams that got a breaker get metrics, so the
//! cache is bounded by `max_upstreams`.

use cb_core::breaker::{Reason, StateKind, Transition};
use proxy_wasm::hostcalls;
use proxy_wasm::types::MetricType;

const STATES: [StateKind; 3] = [StateKind::Closed, StateKind::Open, StateKind::HalfOpen];
const OPEN_REASONS: [Reason; 5] = [
    Reason::ConsecutiveFailures,
    Reason::ErrorRate,
    Reason::SlowCallRate,
    Reason::HalfOpenFailure,
    Reason::Forced,
];

/// Lazily defined ids of one upstream's metrics.
#[derive(Default)]
struct UpstreamIds {
    state: Option<u32>,
    success: Option<u32>,
    failure: Option<u32>,
    slow: Option<u32>,
    rejected: Option<u32>,
    dry_run: Option<u32>,
    changes: [[Option<u32>; 3]; 3],
    opens: [Option<u32>; 5],
}

/// Counters that are not per upstream.
#[derive(Debug, Clone, Copy)]
pub enum Global {
    /// `circuit_breaker_untracked_calls_total`.
    Untracked,
    /// Breaker state found corrupt in shared data and restarted.
    CorruptState,
    /// CAS loops that gave up (the call failed open, or the outcome was lost).
    CasGiveUps,
    /// CAS attempts beyond the first (contention between workers).
    CasRetries,
    /// Shared-data calls the host refused.
    StoreErrors,
}

impl Global {
    fn name(self) -> &'static str {
        match self {
            Global::Untracked => "circuit_breaker_untracked_calls_total",
            Global::CorruptState => "circuit_breaker_corrupt_state_total",
            Global::CasGiveUps => "circuit_breaker_cas_give_ups_total",
            Global::CasRetries => "circuit_breaker_cas_retries_total",
            Global::StoreErrors => "circuit_breaker_shared_data_errors_total",
        }
    }

    fn index(self) -> usize {
        self as usize
    }
}

/// Metric ids of this VM.
#[derive(Default)]
pub struct Metrics {
    upstreams: hashbrown::HashMap<String, UpstreamIds>,
    globals: [Option<u32>; 5],
}

impl Metrics {
    /// Adds `n` to a global counter.
    pub fn add(&mut self, which: Global, n: u64) {
        if n == 0 {
            return;
        }
        let slot = self.globals.get_mut(which.index());
        if let Some(id) =
            slot.and_then(|s| lazy(s, MetricType::Counter, || which.name().to_string()))
        {
            let _ = hostcalls::increment_metric(id, n as i64);
        }
    }

    /// Counts a call let through and recorded: `circuit_breaker_calls_total{result}` and
    /// `circuit_breaker_slow_calls_total`.
    pub fn call(&mut self, upstream: &str, failure: bool, slow: bool) {
        let ids = self.ids(upstream);
        let (slot, result) = if failure {
            (&mut ids.failure, "failure")
        } else {
            (&mut ids.success, "success")
        };
        inc(slot, || {
            format!(
                "circuit_breaker_calls_total{}result=.={result};.;",
                label(upstream)
            )
        });
        if slow {
            inc(&mut ids.slow, || {
                format!("circuit_breaker_slow_calls_total{}", label(upstream))
            });
        }
    }

    /// Counts a rejected call.
    pub fn rejected(&mut self, upstream: &str) {
        let ids = self.ids(upstream);
        inc(&mut ids.rejected, || {
            format!("circuit_breaker_rejected_calls_total{}", label(upstream))
        });
    }

    /// Counts a call `dry_run` would have rejected.
    pub fn dry_run_rejection(&mut self, upstream: &str) {
        let ids = self.ids(upstream);
        inc(&mut ids.dry_run, || {
            format!(
                "circuit_breaker_dry_run_rejections_total{}",
                label(upstream)
            )
        });
    }

    /// Sets the state gauge.
    pub fn state(&mut self, upstream: &str, state: StateKind) {
        let ids = self.ids(upstream);
        if let Some(id) = lazy(&mut ids.state, MetricType::Gauge, || {
            format!("circuit_breaker_state{}", label(upstream))
        }) {
            let _ = hostcalls::record_metric(id, state.gauge());
        }
    }

    /// Whether this VM has touched this upstream's metrics yet.
    pub fn knows(&self, upstream: &str) -> bool {
        self.upstreams.contains_key(upstream)
    }

    /// Counts a state change: `state_changes_total`, `open_total` (when it opened), and the gauge.
    pub fn transition(&mut self, upstream: &str, t: Transition) {
        let from = position(&STATES, &t.from);
        let to = position(&STATES, &t.to);
        let ids = self.ids(upstream);
        if let Some(slot) = ids.changes.get_mut(from).and_then(|row| row.get_mut(to)) {
            inc(slot, || {
                format!(
                    "circuit_breaker_state_changes_total{}from_state=.={};.;to_state=.={};.;",
                    label(upstream),
                    t.from.as_str(),
                    t.to.as_str()
                )
            });
        }
        if t.to == StateKind::Open {
            if let Some(slot) = ids.opens.get_mut(position(&OPEN_REASONS, &t.reason)) {
                inc(slot, || {
                    format!(
                        "circuit_breaker_open_total{}reason=.={};.;",
                        label(upstream),
                        t.reason.as_str()
                    )
                });
            }
        }
        self.state(upstream, t.to);
    }

    fn ids(&mut self, upstream: &str) -> &mut UpstreamIds {
        // `entry_ref` allocates the key only when it is inserted, not on every lookup.
        self.upstreams.entry_ref(upstream).or_default()
    }
}

fn position<T: PartialEq>(all: &[T], item: &T) -> usize {
    all.iter().position(|x| x == item).unwrap_or(usize::MAX)
}

/// The `upstream` label segment. `;` would end the segment early, so it is replaced.
fn label(upstream: &str) -> String {
    format!(".upstream=.={};.;", upstream.replace(';', "_"))
}

fn lazy(slot: &mut Option<u32>, kind: MetricType, name: impl FnOnce() -> String) -> Option<u32> {
    if slot.is_none() {
        *slot = hostcalls::define_metric(kind, &name()).ok();
    }
    *slot
}

fn inc(slot: &mut Option<u32>, name: impl FnOnce() -> String) {
    if let Some(id) = lazy(slot, MetricType::Counter, name) {
        let _ = hostcalls::increment_metric(id, 1);
    }
}
