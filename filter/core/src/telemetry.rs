//! Metrics and log lines: the names written once, and every event of a session turned into them in one
//! place, so the wasm filter, the native module and the harness report the same things the same way.
//!
//! A host implements [`Telemetry`] with whatever its platform offers (wasm stats whose names carry the
//! labels, the native module's labelled counters, plain counters in the harness); [`report`] decides
//! what each [`Event`] counts and logs.

use std::sync::Arc;

use crate::breaker::{Rejection, StateKind, Transition};
use crate::classify::Outcome;
use crate::codec::CodecError;
use crate::registry::Untracked;
use crate::store::UpdateError;

/// Every metric the filter exports: contract section 6, then the operational counters.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Metric {
    /// `circuit_breaker_state{upstream}`: 0 closed, 1 open, 2 half-open.
    State,
    /// `circuit_breaker_calls_total{upstream, result}`: outcomes recorded, success or failure.
    Calls,
    /// `circuit_breaker_slow_calls_total{upstream}`.
    SlowCalls,
    /// `circuit_breaker_rejected_calls_total{upstream}`.
    RejectedCalls,
    /// `circuit_breaker_state_changes_total{upstream, from_state, to_state}`.
    StateChanges,
    /// `circuit_breaker_open_total{upstream, reason}`.
    Open,
    /// `circuit_breaker_dry_run_rejections_total{upstream}`.
    DryRunRejections,
    /// `circuit_breaker_untracked_calls_total`: calls let through with no breaker.
    UntrackedCalls,
    /// `circuit_breaker_stuck_calls_total{upstream}`: calls recorded as failures while still waiting.
    StuckCalls,
    /// `circuit_breaker_cut_calls_total{upstream}`: stuck calls answered by the breaker while Open or
    /// HalfOpen (`cut_stuck_calls`).
    CutCalls,
    /// `circuit_breaker_evicted_total`: idle breakers that gave their slot to a new upstream.
    Evicted,
    /// `circuit_breaker_corrupt_state_total`: stored state that did not decode and was restarted.
    CorruptState,
    /// `circuit_breaker_cas_give_ups_total`: updates abandoned after every CAS attempt lost.
    CasGiveUps,
    /// `circuit_breaker_cas_retries_total`: CAS attempts lost to another worker and retried.
    CasRetries,
    /// `circuit_breaker_shared_data_errors_total`: store calls the host refused.
    SharedDataErrors,
    /// `circuit_breaker_lost_outcomes_total`: outcomes that could not be stored (their slot went to
    /// another upstream, or their retries ran out), so that calls + rejected + untracked + lost =
    /// requests.
    LostOutcomes,
    /// `circuit_breaker_panics_total`: native hooks that panicked and failed open.
    Panics,
}

/// Counter or gauge.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MetricKind {
    /// Only goes up.
    Counter,
    /// Set to a value.
    Gauge,
}

impl Metric {
    /// All of them, in the order above.
    pub const ALL: [Metric; 17] = [
        Metric::State,
        Metric::Calls,
        Metric::SlowCalls,
        Metric::RejectedCalls,
        Metric::StateChanges,
        Metric::Open,
        Metric::DryRunRejections,
        Metric::UntrackedCalls,
        Metric::StuckCalls,
        Metric::CutCalls,
        Metric::Evicted,
        Metric::CorruptState,
        Metric::CasGiveUps,
        Metric::CasRetries,
        Metric::SharedDataErrors,
        Metric::LostOutcomes,
        Metric::Panics,
    ];

    /// The name Prometheus shows.
    pub fn name(self) -> &'static str {
        match self {
            Metric::State => "circuit_breaker_state",
            Metric::Calls => "circuit_breaker_calls_total",
            Metric::SlowCalls => "circuit_breaker_slow_calls_total",
            Metric::RejectedCalls => "circuit_breaker_rejected_calls_total",
            Metric::StateChanges => "circuit_breaker_state_changes_total",
            Metric::Open => "circuit_breaker_open_total",
            Metric::DryRunRejections => "circuit_breaker_dry_run_rejections_total",
            Metric::UntrackedCalls => "circuit_breaker_untracked_calls_total",
            Metric::StuckCalls => "circuit_breaker_stuck_calls_total",
            Metric::CutCalls => "circuit_breaker_cut_calls_total",
            Metric::Evicted => "circuit_breaker_evicted_total",
            Metric::CorruptState => "circuit_breaker_corrupt_state_total",
            Metric::CasGiveUps => "circuit_breaker_cas_give_ups_total",
            Metric::CasRetries => "circuit_breaker_cas_retries_total",
            Metric::SharedDataErrors => "circuit_breaker_shared_data_errors_total",
            Metric::LostOutcomes => "circuit_breaker_lost_outcomes_total",
            Metric::Panics => "circuit_breaker_panics_total",
        }
    }

    /// Counter or gauge.
    pub fn kind(self) -> MetricKind {
        match self {
            Metric::State => MetricKind::Gauge,
            _ => MetricKind::Counter,
        }
    }

    /// Label names, in the order [`Series::label_values`] gives the values.
    pub fn labels(self) -> &'static [&'static str] {
        match self {
            Metric::State
            | Metric::SlowCalls
            | Metric::RejectedCalls
            | Metric::DryRunRejections
            | Metric::StuckCalls
            | Metric::CutCalls => &["upstream"],
            Metric::Calls => &["upstream", "result"],
            Metric::StateChanges => &["upstream", "from_state", "to_state"],
            Metric::Open => &["upstream", "reason"],
            Metric::UntrackedCalls
            | Metric::Evicted
            | Metric::CorruptState
            | Metric::CasGiveUps
            | Metric::CasRetries
            | Metric::SharedDataErrors
            | Metric::LostOutcomes
            | Metric::Panics => &[],
        }
    }

    /// Whether the first label is `upstream`.
    pub fn per_upstream(self) -> bool {
        self.labels().first() == Some(&"upstream")
    }
}

/// One series: a metric and its label values.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Series<'a> {
    /// The metric.
    pub metric: Metric,
    /// The `upstream` label, for the metrics that have one.
    pub upstream: &'a str,
    /// The values of the labels after `upstream` (`result`, `from_state` and `to_state`, `reason`);
    /// unused slots are empty.
    pub extra: [&'static str; 2],
}

impl<'a> Series<'a> {
    /// A series with no labels.
    pub fn global(metric: Metric) -> Self {
        Self {
            metric,
            upstream: "",
            extra: ["", ""],
        }
    }

    /// A series with only the `upstream` label.
    pub fn of(metric: Metric, upstream: &'a str) -> Self {
        Self {
            metric,
            upstream,
            extra: ["", ""],
        }
    }

    /// The label values, one per name of [`Metric::labels`].
    pub fn label_values(&self) -> impl Iterator<Item = &str> + '_ {
        let n = self.metric.labels().len();
        [self.upstream, self.extra[0], self.extra[1]]
            .into_iter()
            .skip(usize::from(!self.metric.per_upstream()))
            .take(n)
    }
}

/// The metric label of upstreams past the cap of contract section 6.
pub const OTHER_LABEL: &str = "_other";

/// An upstream as telemetry names it: its key, for log lines, and its label, for metric series (the
/// key itself, or [`OTHER_LABEL`] once the Envoy has labelled as many keys as it may).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Upstream<'a> {
    /// The breaker's key.
    pub key: &'a str,
    /// The `upstream` label of its series.
    pub label: &'a str,
}

impl<'a> Upstream<'a> {
    /// No upstream: events of the filter as a whole.
    pub const NONE: Upstream<'static> = Upstream { key: "", label: "" };

    /// An upstream labelled by its own key.
    pub fn same(key: &'a str) -> Self {
        Self { key, label: key }
    }
}

/// An upstream as calls and refusals carry it, owned: its key and its label, made once per key by the
/// worker, so that a call holds both through one count.
#[derive(Debug, PartialEq, Eq)]
pub struct Names {
    /// The upstream key.
    pub key: Arc<str>,
    /// Its metric label (the key, or `_other`).
    pub label: Arc<str>,
}

impl Names {
    /// The upstream, as telemetry names it.
    pub fn upstream(&self) -> Upstream<'_> {
        Upstream {
            key: &self.key,
            label: &self.label,
        }
    }
}

/// A key as log lines show it, the way logfmt writes a value: bare when it is a plain token
/// (`upstream=content`, `upstream=outbound|80||content.default.svc.cluster.local`), and quoted, with
/// quotes, backslashes and control characters escaped, when it holds a space, `=`, a quote, a
/// backslash, a control character or nothing at all. So a client-chosen key (an `authority`, a
/// header) can neither break a line nor forge a field, and the usual key reads as it always did.
pub fn quoted(key: &str) -> String {
    let plain = !key.is_empty()
        && key
            .chars()
            .all(|c| c.is_ascii_graphic() && c != '"' && c != '=' && c != '\\');
    if plain {
        key.to_owned()
    } else {
        format!("{key:?}")
    }
}

/// Log levels, as Envoy has them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Level {
    /// Very chatty.
    Trace,
    /// Chatty.
    Debug,
    /// State changes, configuration.
    Info,
    /// Something failed open.
    Warn,
    /// A configuration refused.
    Error,
    /// A panic.
    Critical,
}

/// Where metrics and log lines go.
pub trait Telemetry {
    /// Adds `n` to a counter.
    fn add(&mut self, series: &Series<'_>, n: u64);
    /// Sets a gauge.
    fn set(&mut self, series: &Series<'_>, value: u64);
    /// Writes a log line.
    fn log(&mut self, level: Level, message: &str);
    /// Takes one event of `upstream` ([`Upstream::NONE`] for events of no upstream). The default
    /// reports it ([`report`]); a host that also wants the events themselves (the harness) overrides
    /// this and calls [`report`] too.
    fn event(&mut self, upstream: Upstream<'_>, event: &Event) {
        report(upstream, event, self);
    }
}

/// Telemetry that reports nothing, not even through [`report`]: for pricing the core's own work
/// (the criterion benches, the host-call probe's `x-probe: core`).
#[derive(Debug, Clone, Copy, Default)]
pub struct Discard;

impl Telemetry for Discard {
    fn add(&mut self, _: &Series<'_>, _: u64) {}
    fn set(&mut self, _: &Series<'_>, _: u64) {}
    fn log(&mut self, _: Level, _: &str) {}
    fn event(&mut self, _: Upstream<'_>, _: &Event) {}
}

/// Something that happened to a call or a breaker, as the session and the worker see it. Each one is
/// handed to [`Telemetry::event`] with its upstream key, and [`report`] turns it into metrics and log
/// lines.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// A call was let through with a ticket (a HalfOpen probe when `probe`).
    Admitted {
        /// It holds a probe permit.
        probe: bool,
    },
    /// A call was answered locally: Open, or HalfOpen with no probe permit free.
    Rejected(Rejection),
    /// `dry_run` would have rejected the call; it went on, marked.
    DryRun(Rejection),
    /// An outcome was stored.
    Recorded {
        /// Success, failure or ignored.
        outcome: Outcome,
        /// It took at least `slow_call_duration`.
        slow: bool,
        /// Recorded by the stuck-call check, while the call was still waiting.
        stuck: bool,
    },
    /// The breaker changed state.
    Transition(Transition),
    /// The stored state, when it differs from what this worker last set the gauge to.
    State(StateKind),
    /// The call went through with no breaker.
    Untracked(Untracked),
    /// Shared-data trouble.
    Store(StoreEvent),
    /// An idle breaker gave its slot to this upstream.
    Evicted,
    /// A stuck call was answered with the breaker's answer (`cut_stuck_calls`).
    Cut,
    /// The Envoy has labelled as many upstream keys as it may: this key and every further one are
    /// counted as `_other` (reported once, for the first such key).
    OtherLabel {
        /// How many keys may be labelled.
        limit: u32,
    },
}

/// Shared-data trouble, each kind counted apart.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StoreEvent {
    /// Compare-and-swap attempts lost to other workers and retried.
    Retries(u32),
    /// Stored bytes did not decode; the slot was restarted.
    Corrupt(CodecError),
    /// An update failed (every attempt lost, or the host refused); what was being done is in the text.
    Failed {
        /// `admit`, `record`, `register`, `health`...
        during: &'static str,
        /// Why.
        error: UpdateError,
    },
    /// An outcome could not be stored and is lost: its slot went to another upstream, or its retry
    /// queue was full.
    OutcomeLost(&'static str),
}

/// What each event counts and logs: the one place every host's metrics and log lines come from.
/// Series carry the upstream's label; log lines its key, quoted.
pub fn report<T: Telemetry + ?Sized>(upstream: Upstream<'_>, event: &Event, t: &mut T) {
    let label = upstream.label;
    match event {
        Event::Admitted { .. } => {}
        Event::Rejected(_) => t.add(&Series::of(Metric::RejectedCalls, label), 1),
        Event::DryRun(_) => t.add(&Series::of(Metric::DryRunRejections, label), 1),
        Event::Recorded {
            outcome,
            slow,
            stuck,
        } => recorded(label, *outcome, *slow, *stuck, t),
        Event::Transition(tr) => transition(upstream, tr, t),
        Event::State(state) => t.set(&Series::of(Metric::State, label), state.gauge()),
        Event::Untracked(why) => {
            t.add(&Series::global(Metric::UntrackedCalls), 1);
            if let Untracked::Store(e) = why {
                failed(upstream.key, "admit", e, t);
            }
        }
        Event::Store(e) => store(upstream.key, e, t),
        Event::Evicted => t.add(&Series::global(Metric::Evicted), 1),
        Event::Cut => t.add(&Series::of(Metric::CutCalls, label), 1),
        Event::OtherLabel { limit } => t.log(
            Level::Warn,
            &format!(
                "circuit breaker: {limit} upstream keys already have their own metric series, the most \
                 one Envoy labels (4 x max_upstreams); upstream={} and every further new key are \
                 counted as upstream={OTHER_LABEL}",
                quoted(upstream.key)
            ),
        ),
    }
}

fn recorded<T: Telemetry + ?Sized>(
    upstream: &str,
    outcome: Outcome,
    slow: bool,
    stuck: bool,
    t: &mut T,
) {
    let result = match outcome {
        Outcome::Success => "success",
        Outcome::Failure => "failure",
        Outcome::Ignored => return,
    };
    t.add(
        &Series {
            metric: Metric::Calls,
            upstream,
            extra: [result, ""],
        },
        1,
    );
    if slow {
        t.add(&Series::of(Metric::SlowCalls, upstream), 1);
    }
    if stuck {
        t.add(&Series::of(Metric::StuckCalls, upstream), 1);
    }
}

fn transition<T: Telemetry + ?Sized>(upstream: Upstream<'_>, tr: &Transition, t: &mut T) {
    t.log(
        Level::Info,
        &format!(
            "circuit breaker state change: upstream={} from={} to={} reason={}",
            quoted(upstream.key),
            tr.from.as_str(),
            tr.to.as_str(),
            tr.reason.as_str()
        ),
    );
    if tr.from == tr.to {
        // The end of a recovery ramp: logged like a change, but the state is the same.
        return;
    }
    let upstream = upstream.label;
    t.add(
        &Series {
            metric: Metric::StateChanges,
            upstream,
            extra: [tr.from.as_str(), tr.to.as_str()],
        },
        1,
    );
    if tr.to == StateKind::Open {
        t.add(
            &Series {
                metric: Metric::Open,
                upstream,
                extra: [tr.reason.as_str(), ""],
            },
            1,
        );
    }
    t.set(&Series::of(Metric::State, upstream), tr.to.gauge());
}

fn store<T: Telemetry + ?Sized>(upstream: &str, e: &StoreEvent, t: &mut T) {
    match e {
        StoreEvent::Retries(n) => t.add(&Series::global(Metric::CasRetries), u64::from(*n)),
        StoreEvent::Corrupt(why) => {
            t.log(
                Level::Warn,
                &format!("circuit breaker: corrupt state for upstream={} in shared data ({why}); restarted it closed", quoted(upstream)),
            );
            t.add(&Series::global(Metric::CorruptState), 1);
        }
        StoreEvent::Failed { during, error } => failed(upstream, during, error, t),
        StoreEvent::OutcomeLost(why) => {
            t.log(
                Level::Warn,
                &format!(
                    "circuit breaker: outcome for upstream={} lost: {why}",
                    quoted(upstream)
                ),
            );
            t.add(&Series::global(Metric::LostOutcomes), 1);
        }
    }
}

fn failed<T: Telemetry + ?Sized>(upstream: &str, during: &str, e: &UpdateError, t: &mut T) {
    t.log(
        Level::Warn,
        &format!(
            "circuit breaker: failing open, shared data ({during} upstream={}): {e}",
            quoted(upstream)
        ),
    );
    match e {
        UpdateError::GaveUp => {
            // Every attempt but the last was a real lost race.
            t.add(
                &Series::global(Metric::CasRetries),
                u64::from(crate::store::MAX_CAS_ATTEMPTS - 1),
            );
            t.add(&Series::global(Metric::CasGiveUps), 1);
        }
        UpdateError::Store(_) => t.add(&Series::global(Metric::SharedDataErrors), 1),
    }
}

#[cfg(test)]
mod tests {
    use super::quoted;

    #[test]
    fn a_plain_key_is_bare_and_anything_else_is_quoted_and_escaped() {
        assert_eq!(quoted("content"), "content");
        assert_eq!(
            quoted("outbound|80||content.default.svc.cluster.local"),
            "outbound|80||content.default.svc.cluster.local"
        );
        assert_eq!(quoted("a b"), r#""a b""#);
        assert_eq!(quoted("x from=open"), r#""x from=open""#);
        assert_eq!(quoted("k=v"), r#""k=v""#);
        assert_eq!(quoted("a\nupstream=forged"), r#""a\nupstream=forged""#);
        assert_eq!(quoted(r#"say "hi""#), r#""say \"hi\"""#);
        assert_eq!(quoted(r"back\slash"), r#""back\\slash""#);
        assert_eq!(quoted(""), r#""""#);
    }
}
