//! The metrics of contract section 6, as Envoy stats defined from the VM.
//!
//! Envoy prefixes wasm stats with `wasmcustom.`, a namespace its Prometheus output strips. Labels travel
//! inside the stat name as `.upstream=.=<key>;.;result=.=success;.;`, the delimiter style Istio uses,
//! and the shipped Envoy configs' `stats_tags` regexes turn each segment into a label. Stats are global
//! by name, so every worker's VM defining the same name updates the same stat.
//!
//! Ids are defined on first use and kept per upstream. The memory is bounded: past
//! [`MAX_UPSTREAMS_KEPT`] upstreams it is cleared and rebuilt (a stat defined again by name is the same
//! stat), so hostile keys cost re-definitions, never unbounded memory.

use cb_core::telemetry::{Metric, MetricKind, Series};
use hashbrown::HashMap;

use crate::abi;

/// Upstreams whose metric ids are kept at most.
const MAX_UPSTREAMS_KEPT: usize = 4096;

/// A series without its upstream: the metric and its other label values.
type Local = (Metric, &'static str, &'static str);

/// Metric ids of this VM.
#[derive(Default)]
pub struct Metrics {
    upstreams: HashMap<String, HashMap<Local, u32>>,
}

impl Metrics {
    /// Adds `n` to a counter.
    pub fn add(&mut self, series: &Series<'_>, n: u64) {
        if let Some(id) = self.id(series) {
            let _ = abi::increment_metric(id, i64::try_from(n).unwrap_or(i64::MAX));
        }
    }

    /// Sets a gauge.
    pub fn set(&mut self, series: &Series<'_>, value: u64) {
        if let Some(id) = self.id(series) {
            let _ = abi::record_metric(id, value);
        }
    }

    fn id(&mut self, series: &Series<'_>) -> Option<u32> {
        if self.upstreams.len() >= MAX_UPSTREAMS_KEPT
            && !self.upstreams.contains_key(series.upstream)
        {
            self.upstreams.clear();
        }
        let ids = self.upstreams.entry_ref(series.upstream).or_default();
        let local = (series.metric, series.extra[0], series.extra[1]);
        if let Some(id) = ids.get(&local) {
            return Some(*id);
        }
        // proxy-wasm's metric types: counter 0, gauge 1.
        let kind = match series.metric.kind() {
            MetricKind::Counter => 0,
            MetricKind::Gauge => 1,
        };
        let id = abi::define_metric(kind, &stat_name(series)).ok()?;
        ids.insert(local, id);
        Some(id)
    }
}

/// `circuit_breaker_calls_total.upstream=.=content;.;result=.=failure;.;`: the name, then each label
/// as a segment. `;` would end a segment early, so it is replaced in values.
pub fn stat_name(series: &Series<'_>) -> String {
    let mut name = series.metric.name().to_string();
    let labels = series.metric.labels();
    if !labels.is_empty() {
        name.push('.');
    }
    for (label, value) in labels.iter().zip(series.label_values()) {
        name.push_str(label);
        name.push_str("=.=");
        name.push_str(&value.replace(';', "_"));
        name.push_str(";.;");
    }
    name
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stat_names_carry_their_labels_as_istio_style_segments() {
        let s = Series {
            metric: Metric::Calls,
            upstream: "outbound|80||a;b",
            extra: ["failure", ""],
        };
        assert_eq!(
            stat_name(&s),
            "circuit_breaker_calls_total.upstream=.=outbound|80||a_b;.;result=.=failure;.;"
        );
        assert_eq!(
            stat_name(&Series::global(Metric::UntrackedCalls)),
            "circuit_breaker_untracked_calls_total"
        );
        let t = Series {
            metric: Metric::StateChanges,
            upstream: "c",
            extra: ["closed", "open"],
        };
        assert_eq!(
            stat_name(&t),
            "circuit_breaker_state_changes_total.upstream=.=c;.;from_state=.=closed;.;to_state=.=open;.;"
        );
    }
}
