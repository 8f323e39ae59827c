//! What the demo prints: a line a second while it runs, and the closing table comparing the runs.

use std::collections::HashMap;
use std::fmt::Write as _;

use cb_core::breaker::StateKind;

use super::load::{CallRecord, Ending};
use super::run::RunReport;
use crate::services::ServiceKind;

pub(super) fn header_line() -> String {
    format!(
        "{:>4}  {:>5} {:>5} {:>6} {:>7} {:>6}  {:>7} {:>7}  {:<9} {:<9} {:<9} {:<9}",
        "t",
        "calls",
        "ok",
        "failed",
        "gave up",
        "reject",
        "p50 ms",
        "p99 ms",
        "user",
        "content",
        "feed",
        "auth"
    )
}

/// The timeline line for the second that just ended.
pub(super) fn second_line(
    second: u64,
    calls: &[CallRecord],
    states: &HashMap<String, StateKind>,
) -> String {
    let lo = (second - 1) * 1000;
    let hi = second * 1000;
    let window: Vec<&CallRecord> = calls
        .iter()
        .filter(|c| c.at_ms >= lo && c.at_ms < hi)
        .collect();
    let count = |e: Ending| window.iter().filter(|c| c.ending == e).count();
    let mut latencies: Vec<f64> = window.iter().map(|c| c.latency_ms).collect();
    let mut line = format!(
        "{:>3}s  {:>5} {:>5} {:>6} {:>7} {:>6}  {:>7.1} {:>7.1} ",
        second,
        window.len(),
        count(Ending::Ok),
        count(Ending::UpstreamFailure),
        count(Ending::GaveUp),
        count(Ending::Rejected),
        percentile(&mut latencies, 0.50),
        percentile(&mut latencies, 0.99),
    );
    for kind in ServiceKind::ALL {
        let state = states.get(kind.cluster()).map_or("-", |s| match s {
            StateKind::Closed => "closed",
            StateKind::Open => "OPEN",
            StateKind::HalfOpen => "half-open",
        });
        let _ = write!(line, " {state:<9}");
    }
    line
}

/// The `q` quantile (nearest rank) of `values`; 0 when there are none.
pub(super) fn percentile(values: &mut [f64], q: f64) -> f64 {
    if values.is_empty() {
        return 0.0;
    }
    values.sort_by(f64::total_cmp);
    let rank = ((values.len() as f64 * q).ceil() as usize).clamp(1, values.len());
    values.get(rank - 1).copied().unwrap_or(0.0)
}

/// A stretch at least this long with no answer counts as the gateway going silent: healthy, it gets
/// about 200 answers a second, one every 5 ms.
const SILENCE_MS: u64 = 500;

/// The stretches of the run in which the gateway got no answer at all: no call ended with a response
/// of any kind (success or failure, fast or slow, from the service or from the breaker); a call the
/// gateway gave up on at its deadline is not an answer. Every gap between two answers, as
/// `(from_ms, to_ms)`, within the run's load, `[0, report.end_ms]`.
fn silences(report: &RunReport) -> Vec<(u64, u64)> {
    let mut answers: Vec<u64> = report
        .calls
        .iter()
        .filter(|c| c.ending.answered() && c.at_ms <= report.end_ms)
        .map(|c| c.at_ms)
        .collect();
    answers.sort_unstable();
    let mut gaps = Vec::with_capacity(answers.len() + 1);
    let mut previous = 0;
    for at in answers.into_iter().chain([report.end_ms]) {
        gaps.push((previous, at));
        previous = at;
    }
    gaps
}

/// The longest of the [`silences`].
pub(super) fn longest_silence(report: &RunReport) -> (u64, u64) {
    silences(report).into_iter().fold((0, 0), |best, gap| {
        if gap.1 - gap.0 > best.1 - best.0 {
            gap
        } else {
            best
        }
    })
}

/// The time spent in [`silences`] of at least [`SILENCE_MS`], in ms.
fn silent_ms(report: &RunReport) -> u64 {
    silences(report)
        .into_iter()
        .map(|(from, to)| to - from)
        .filter(|gap| *gap >= SILENCE_MS)
        .sum()
}

/// The time from the hang's start to the breaker opening, in seconds; "never" when it did not open.
fn time_to_open(report: &RunReport) -> String {
    report.opened_ms.map_or_else(
        || "never".to_string(),
        |at| seconds(at.saturating_sub(report.hang_ms)),
    )
}

fn seconds(ms: u64) -> String {
    format!("{:.2}", ms as f64 / 1000.0)
}

/// The closing table, one row per measure, and a line saying where each run's longest silence was.
pub(super) fn summary_table(with: &RunReport, without: &RunReport) -> String {
    let waited = |r: &RunReport| r.calls.iter().map(|c| c.latency_ms).sum::<f64>() / 1000.0;
    let p99_of = |r: &RunReport, f: &dyn Fn(&CallRecord) -> bool| {
        let mut v: Vec<f64> = r
            .calls
            .iter()
            .filter(|c| f(c))
            .map(|c| c.latency_ms)
            .collect();
        percentile(&mut v, 0.99)
    };
    let count = |r: &RunReport, f: &dyn Fn(&CallRecord) -> bool| {
        r.calls.iter().filter(|c| f(c)).count().to_string()
    };
    let ok = |c: &CallRecord| c.ending == Ending::Ok;
    let healthy = |c: &CallRecord| c.service != ServiceKind::Content;
    let healthy_ok = |c: &CallRecord| healthy(c) && ok(c);
    let silence = |r: &RunReport| {
        let (from, to) = longest_silence(r);
        seconds(to - from)
    };
    let both = |f: &dyn Fn(&RunReport) -> String| (f(with), f(without));
    let rows = [
        ("calls made", both(&|r| r.calls.len().to_string())),
        (
            "calls to the healthy services answered",
            both(&|r| count(r, &healthy_ok)),
        ),
        ("calls answered OK", both(&|r| count(r, &ok))),
        ("total time callers waited (s)", both(&|r| r1(waited(r)))),
        (
            "calls that reached the dead service",
            both(&|r| r.reached_dead_service.to_string()),
        ),
        (
            "p99 latency, all calls (ms)",
            both(&|r| r1(p99_of(r, &|_| true))),
        ),
        (
            "p99 latency, other services (ms)",
            both(&|r| r1(p99_of(r, &healthy))),
        ),
        (
            "breaker opened, after the hang began (s)",
            both(&time_to_open),
        ),
        ("longest stretch with no answer at all (s)", both(&silence)),
        (
            "time with no answer, in stretches >= 0.5 s (s)",
            both(&|r| seconds(silent_ms(r))),
        ),
    ];
    let mut out = format!(
        "| {:<46} | {:>14} | {:>17} |\n",
        "", "with breaker", "without breaker"
    );
    let _ = writeln!(out, "|{:-<48}|{:->16}|{:->19}|", "", "", "");
    for (name, (a, b)) in rows {
        let _ = writeln!(out, "| {name:<46} | {a:>14} | {b:>17} |");
    }
    for (label, r) in [("with breaker", with), ("without breaker", without)] {
        let (from, to) = longest_silence(r);
        let _ = writeln!(
            out,
            "longest stretch with no answer, {label}: from t={}s to t={}s",
            seconds(from),
            seconds(to)
        );
    }
    out
}

fn r1(x: f64) -> String {
    format!("{x:.1}")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn call(at_ms: u64, ending: Ending) -> CallRecord {
        CallRecord {
            at_ms,
            service: ServiceKind::User,
            latency_ms: 1.0,
            ending,
        }
    }

    #[test]
    fn percentiles() {
        let mut v = vec![5.0, 1.0, 3.0, 2.0, 4.0];
        assert_eq!(percentile(&mut v, 0.5), 3.0);
        assert_eq!(percentile(&mut v, 0.99), 5.0);
        assert_eq!(percentile(&mut [], 0.99), 0.0);
    }

    #[test]
    fn silence_is_the_longest_gap_between_answers_and_ignores_deadlines() {
        let report = RunReport {
            calls: vec![
                call(100, Ending::Ok),
                call(300, Ending::Rejected),
                // The gateway giving up is no answer: the gap runs from 300 to 2_500.
                call(2_000, Ending::GaveUp),
                call(2_500, Ending::UpstreamFailure),
                call(2_600, Ending::Ok),
            ],
            end_ms: 3_000,
            ..RunReport::default()
        };
        assert_eq!(longest_silence(&report), (300, 2_500));
        // The end of the load closes the last stretch.
        let quiet_end = RunReport {
            end_ms: 10_000,
            ..report.clone()
        };
        assert_eq!(longest_silence(&quiet_end), (2_600, 10_000));
        let nothing = RunReport {
            end_ms: 500,
            ..RunReport::default()
        };
        assert_eq!(longest_silence(&nothing), (0, 500));
        // 300 to 2_500 and 2_600 to 10_000 are long enough to count; the 100 ms gaps are not.
        assert_eq!(silent_ms(&report), 2_200);
        assert_eq!(silent_ms(&quiet_end), 2_200 + 7_400);
    }

    #[test]
    fn the_table_measures_the_hang() {
        // An answer every 100 ms up to 6.1 s, then none until 8 s.
        let mut calls: Vec<CallRecord> = (1..=61).map(|i| call(i * 100, Ending::Ok)).collect();
        calls.extend([call(8_000, Ending::Rejected), call(8_900, Ending::Ok)]);
        let with = RunReport {
            calls,
            hang_ms: 6_000,
            opened_ms: Some(6_560),
            end_ms: 9_000,
            ..RunReport::default()
        };
        let without = RunReport {
            opened_ms: None,
            ..with.clone()
        };
        let table = summary_table(&with, &without);
        let row = |name: &str| {
            table
                .lines()
                .find(|l| l.contains(name))
                .map(|l| l.split('|').map(str::trim).collect::<Vec<_>>())
                .unwrap()
        };
        assert_eq!(row("breaker opened")[2..4], ["0.56", "never"]);
        assert_eq!(row("no answer at all")[2..4], ["1.90", "1.90"]);
        // 6.1 s to 8 s, and 8 s to 8.9 s.
        assert_eq!(row("in stretches")[2..4], ["2.80", "2.80"]);
        assert!(table.contains("from t=6.10s to t=8.00s"), "{table}");
    }
}
