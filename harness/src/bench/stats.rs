//! Statistics: Envoy's own counters, medians with their min–max over rounds, per-round ratios and
//! differences between variants, and criterion's results for the core.

use std::collections::BTreeMap;
use std::fs;
use std::path::Path;

use super::load::Run;
use super::{Envoy, Result};
use crate::envoy::http_request;

/// A counter or gauge of `envoy` by its exact name (`cluster.guarded.upstream_rq_total`); 0 if absent.
pub(super) async fn stat(envoy: &Envoy, name: &str) -> Result<u64> {
    // `^name$` as a regex, percent-encoded for the query string.
    let escaped = name.replace('.', "%5C.");
    let path = format!("/stats?filter=%5E{escaped}%24");
    let r = http_request(envoy.admin(), "GET", &path, &[])
        .await
        .map_err(|e| e.to_string())?;
    Ok(r.body
        .lines()
        .find_map(|l| {
            let (k, v) = l.split_once(": ")?;
            (k == name).then(|| v.trim().parse().ok())?
        })
        .unwrap_or(0))
}

pub(super) fn percentile(sorted: &[f64], p: f64) -> Option<f64> {
    if sorted.is_empty() {
        return None;
    }
    let idx = ((sorted.len() - 1) as f64 * p).round() as usize;
    sorted.get(idx).copied()
}

// ---- phase 3: the core, from criterion's samples ----------------------------------------------

pub(super) struct CoreResults {
    /// (group, function) → ns per call: median, min, max over criterion's samples.
    pub(super) figures: BTreeMap<(String, String), Spread>,
    /// [`INTERLEAVED`] file → ns per call of (a, b), per round of the benches' interleaved runs.
    pub(super) rounds: BTreeMap<&'static str, Vec<(f64, f64)>>,
}

/// The interleaved comparisons the criterion benches write under `target/criterion/`: rounds of a
/// block of calls of `a` then of `b` (the order alternating), ns per call of each, as
/// `[[a, b], ...]`. Two criterion functions are measured seconds apart, and a shared machine's speed
/// moves more than that between them; these rounds put both sides of a ratio side by side.
pub(super) const INTERLEAVED: [&str; 2] = [
    // a = failsafe, b = core_native
    "breakers_1_thread/native_vs_failsafe.json",
    // a = 1 glob, b = 10,000 globs
    "admit_record/globs_interleaved.json",
];

/// The criterion benches `make bench` runs, by group: `harness/benches/breakers.rs` (the core against
/// other breakers, 1 thread and 2 racing) and `filter/core/benches/admit_record.rs` (the core's call
/// through each store, and under 1 or 10,000 glob overrides).
pub(super) const CORE_BENCHES: [(&str, &[&str]); 3] = [
    ("breakers_1_thread", &CORE_FUNCTIONS),
    ("breakers_2_threads", &CORE_FUNCTIONS),
    (
        "admit_record",
        &["shared_data", "local", "globs_1", "globs_10000"],
    ),
];
pub(super) const CORE_FUNCTIONS: [&str; 4] = ["core", "core_native", "failsafe", "recloser"];

impl CoreResults {
    pub(super) fn read(dir: &Path) -> Self {
        let mut figures = BTreeMap::new();
        for (group, functions) in CORE_BENCHES {
            for function in functions.iter().copied() {
                let file = dir.join(group).join(function).join("new/sample.json");
                let Some(json) = fs::read_to_string(&file)
                    .ok()
                    .and_then(|t| serde_json::from_str::<serde_json::Value>(&t).ok())
                else {
                    continue;
                };
                let (Some(iters), Some(times)) = (
                    json.get("iters").and_then(|v| v.as_array()),
                    json.get("times").and_then(|v| v.as_array()),
                ) else {
                    continue;
                };
                let per_iter = iters.iter().zip(times).filter_map(|(i, t)| {
                    let (i, t) = (i.as_f64()?, t.as_f64()?);
                    (i > 0.0).then_some(t / i)
                });
                if let Some(s) = spread(per_iter) {
                    figures.insert((group.to_string(), function.to_string()), s);
                }
            }
        }
        let rounds = INTERLEAVED
            .into_iter()
            .filter_map(|name| Some((name, read_rounds(&dir.join(name))?)))
            .collect();
        Self { figures, rounds }
    }

    /// Per round, b / a of an [`INTERLEAVED`] comparison.
    pub(super) fn round_ratio(&self, name: &str) -> Option<Spread> {
        let rounds = self.rounds.get(name)?;
        spread(rounds.iter().filter(|(a, _)| *a > 0.0).map(|(a, b)| b / a))
    }

    pub(super) fn get(&self, group: &str, function: &str) -> Option<Spread> {
        self.figures
            .get(&(group.to_string(), function.to_string()))
            .copied()
    }
}

/// `[[a, b], ...]`, as the benches write it.
fn read_rounds(path: &Path) -> Option<Vec<(f64, f64)>> {
    let json: serde_json::Value = serde_json::from_str(&fs::read_to_string(path).ok()?).ok()?;
    let rounds: Vec<(f64, f64)> = json
        .as_array()?
        .iter()
        .filter_map(|pair| {
            let pair = pair.as_array()?;
            Some((pair.first()?.as_f64()?, pair.get(1)?.as_f64()?))
        })
        .collect();
    (!rounds.is_empty()).then_some(rounds)
}

// ---- medians, ratios, differences ---------------------------------------------------------------

#[derive(Debug, Clone, Copy, PartialEq)]
pub(super) struct Spread {
    pub(super) median: f64,
    pub(super) min: f64,
    pub(super) max: f64,
}

pub(super) fn spread(values: impl IntoIterator<Item = f64>) -> Option<Spread> {
    let mut v: Vec<f64> = values.into_iter().filter(|x| x.is_finite()).collect();
    if v.is_empty() {
        return None;
    }
    v.sort_by(f64::total_cmp);
    let n = v.len();
    let median = if n % 2 == 1 {
        *v.get(n / 2)?
    } else {
        (*v.get(n / 2 - 1)? + *v.get(n / 2)?) / 2.0
    };
    Some(Spread {
        median,
        min: *v.first()?,
        max: *v.last()?,
    })
}

/// Per-round ratios of `field` between two listeners' runs (runs of one round sit side by side).
pub(super) fn ratios(
    runs: &BTreeMap<String, Vec<Run>>,
    num: &str,
    den: &str,
    field: impl Fn(&Run) -> Option<f64>,
) -> Option<Spread> {
    per_round(runs, num, den, field, |x, y| (y > 0.0).then_some(x / y))
}

/// Per-round differences of `field` (num − den).
pub(super) fn differences(
    runs: &BTreeMap<String, Vec<Run>>,
    num: &str,
    den: &str,
    field: impl Fn(&Run) -> Option<f64>,
) -> Option<Spread> {
    per_round(runs, num, den, field, |x, y| Some(x - y))
}

/// `combine` of `field` in the two listeners' runs of each round, spread over the rounds.
fn per_round(
    runs: &BTreeMap<String, Vec<Run>>,
    num: &str,
    den: &str,
    field: impl Fn(&Run) -> Option<f64>,
    combine: impl Fn(f64, f64) -> Option<f64>,
) -> Option<Spread> {
    let (a, b) = (runs.get(num)?, runs.get(den)?);
    spread(
        a.iter()
            .zip(b)
            .filter_map(|(x, y)| combine(field(x)?, field(y)?)),
    )
}

pub(super) fn of(
    runs: &BTreeMap<String, Vec<Run>>,
    listener: &str,
    field: impl Fn(&Run) -> Option<f64>,
) -> Option<Spread> {
    spread(runs.get(listener)?.iter().filter_map(field))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn interleaved_rounds_give_per_round_ratios() {
        let dir = std::env::temp_dir().join(format!("bench-rounds-{}", std::process::id()));
        let file = dir.join(INTERLEAVED[1]);
        fs::create_dir_all(file.parent().unwrap()).unwrap();
        fs::write(&file, "[[100.0,110.0],[200.0,180.0],[100.0,100.0]]\n").unwrap();
        let core = CoreResults::read(&dir);
        let r = core.round_ratio(INTERLEAVED[1]).unwrap();
        assert_eq!((r.median, r.min, r.max), (1.0, 0.9, 1.1));
        assert!(
            core.round_ratio(INTERLEAVED[0]).is_none(),
            "no file, no figure"
        );
        let _ = fs::remove_dir_all(&dir);
    }

    #[test]
    fn spreads_and_percentiles() {
        let s = spread([3.0, 1.0, 2.0, 10.0]).unwrap();
        assert_eq!((s.median, s.min, s.max), (2.5, 1.0, 10.0));
        let sorted: Vec<f64> = (1..=100).map(f64::from).collect();
        assert_eq!(percentile(&sorted, 0.99), Some(99.0));
        assert_eq!(percentile(&sorted, 0.5), Some(51.0));
    }
}
