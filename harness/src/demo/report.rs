//! What the demo prints: a line a second while it runs, and the closing table comparing the runs.

use std::collections::HashMap;
use std::fmt::Write as _;

use cb_core::breaker::StateKind;

use super::load::{CallRecord, Ending};
use super::run::RunReport;
use crate::services::ServiceKind;

/// The timeline's heading, with one column per breaker shown (`columns`, in order).
pub(super) fn header_line(columns: &[&str]) -> String {
    let mut line = format!(
        "{:>4}  {:>5} {:>5} {:>6} {:>6} {:>7} {:>4} {:>7}  {:>7} {:>7} ",
        "t", "ended", "ok", "failed", "reject", "gave up", "shed", "waiting", "p50 ms", "p99 ms",
    );
    for column in columns {
        let _ = write!(line, " {column:<9}");
    }
    line.trim_end().to_string()
}

/// The timeline line for the second that just ended: the requests that ended in it, how, and their
/// latency; the calls still waiting for an answer at its end (`in_flight`); the state of each breaker
/// of `columns` (`-` when unknown: no breaker there).
pub(super) fn second_line(
    second: u64,
    calls: &[CallRecord],
    in_flight: usize,
    states: &HashMap<String, StateKind>,
    columns: &[&str],
) -> String {
    let lo = (second - 1) * 1000;
    let hi = second * 1000;
    let window: Vec<&CallRecord> = calls
        .iter()
        .filter(|c| c.at_ms >= lo && c.at_ms < hi)
        .collect();
    let count = |e: Ending| window.iter().filter(|c| c.ending == e).count();
    let mut latencies: Vec<f64> = window
        .iter()
        .filter(|c| c.made())
        .map(|c| c.latency_ms)
        .collect();
    let mut line = format!(
        "{:>3}s  {:>5} {:>5} {:>6} {:>6} {:>7} {:>4} {:>7}  {:>7.1} {:>7.1} ",
        second,
        window.len(),
        count(Ending::Ok),
        count(Ending::UpstreamFailure),
        count(Ending::Rejected),
        count(Ending::GaveUp),
        count(Ending::Shed),
        in_flight,
        percentile(&mut latencies, 0.50),
        percentile(&mut latencies, 0.99),
    );
    for column in columns {
        let state = states.get(*column).map_or("-", |s| match s {
            StateKind::Closed => "closed",
            StateKind::Open => "OPEN",
            StateKind::HalfOpen => "half-open",
        });
        let _ = write!(line, " {state:<9}");
    }
    line.trim_end().to_string()
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

/// The stretches of the run in which the gateway got no answer to any request `of` picks: no such
/// request ended with a complete response of any kind (success or failure, fast or slow, from the
/// service or from the breaker); a call the gateway gave up on at its deadline, or a request it shed,
/// is not an answer. Every gap between two answers, as `(from_ms, to_ms)`, within the run's load,
/// `[0, report.end_ms]`.
fn silences(report: &RunReport, of: &dyn Fn(&CallRecord) -> bool) -> Vec<(u64, u64)> {
    let mut answers: Vec<u64> = report
        .calls
        .iter()
        .filter(|c| of(c) && c.ending.answered() && c.at_ms <= report.end_ms)
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

/// The longest of the [`silences`] of the requests to `service`, or of every request for `None`.
pub(super) fn longest_silence(report: &RunReport, service: Option<ServiceKind>) -> (u64, u64) {
    let of = |c: &CallRecord| service.is_none_or(|s| c.service == s);
    silences(report, &of).into_iter().fold((0, 0), |best, gap| {
        if gap.1 - gap.0 > best.1 - best.0 {
            gap
        } else {
            best
        }
    })
}

/// The most calls waiting for an answer at once: a call waits from its arrival to its end (a shed
/// request never waits).
fn peak_in_flight(calls: &[CallRecord]) -> usize {
    // Ends sort before starts at the same millisecond: a call that ended as another began did not
    // overlap it.
    let mut events: Vec<(u64, i64)> = calls
        .iter()
        .filter(|c| c.made())
        .flat_map(|c| [(c.started_ms, 1), (c.at_ms, -1)])
        .collect();
    events.sort_unstable();
    let mut now = 0i64;
    let mut peak = 0i64;
    for (_, step) in events {
        now += step;
        peak = peak.max(now);
    }
    usize::try_from(peak).unwrap_or(0)
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

/// The closing table, one row per measure, and lines saying where each run's longest silences were.
pub(super) fn summary_table(with: &RunReport, without: &RunReport) -> String {
    // Only calls wait and have a latency; a shed request was refused before it became one.
    let waited = |r: &RunReport| r.calls.iter().map(|c| c.latency_ms).sum::<f64>() / 1000.0;
    let p99_of = |r: &RunReport, f: &dyn Fn(&CallRecord) -> bool| {
        let mut v: Vec<f64> = r
            .calls
            .iter()
            .filter(|c| c.made() && f(c))
            .map(|c| c.latency_ms)
            .collect();
        percentile(&mut v, 0.99)
    };
    let count = |r: &RunReport, f: &dyn Fn(&CallRecord) -> bool| {
        r.calls.iter().filter(|c| f(c)).count().to_string()
    };
    let ended = |e: Ending| move |c: &CallRecord| c.ending == e;
    let healthy = |c: &CallRecord| c.service != ServiceKind::Content;
    let healthy_answered = |c: &CallRecord| healthy(c) && c.ending.answered();
    let silence = |r: &RunReport, service| {
        let (from, to) = longest_silence(r, service);
        seconds(to - from)
    };
    let both = |f: &dyn Fn(&RunReport) -> String| (f(with), f(without));
    let rows = [
        (
            "requests to the gateway",
            both(&|r| r.calls.len().to_string()),
        ),
        (
            "shed by the gateway (no answer)",
            both(&|r| count(r, &ended(Ending::Shed))),
        ),
        ("calls answered OK", both(&|r| count(r, &ended(Ending::Ok)))),
        (
            "calls to the healthy services answered",
            both(&|r| count(r, &healthy_answered)),
        ),
        (
            "calls rejected by the breaker (an answer)",
            both(&|r| count(r, &ended(Ending::Rejected))),
        ),
        (
            "calls given up at the deadline (no answer)",
            both(&|r| count(r, &ended(Ending::GaveUp))),
        ),
        (
            "calls that reached the dead service",
            both(&|r| r.reached_dead_service.to_string()),
        ),
        (
            "most calls waiting at once",
            both(&|r| peak_in_flight(&r.calls).to_string()),
        ),
        ("total time callers waited (s)", both(&|r| r1(waited(r)))),
        (
            "p99 latency, all calls (ms)",
            both(&|r| r1(p99_of(r, &|_| true))),
        ),
        (
            "p99 latency, healthy services (ms)",
            both(&|r| r1(p99_of(r, &healthy))),
        ),
        (
            "breaker opened, after the hang began (s)",
            both(&time_to_open),
        ),
        (
            "longest no answer from content-service (s)",
            both(&|r| silence(r, Some(ServiceKind::Content))),
        ),
        (
            "longest no answer at all, any service (s)",
            both(&|r| silence(r, None)),
        ),
        (
            "arrivals behind schedule, at most (ms)",
            both(&|r| r1(r.max_lag_ms)),
        ),
    ];
    let mut out = table(
        &["with breaker", "without breaker"],
        &rows.map(|(name, (a, b))| (name, vec![a, b])),
    );
    for (what, service) in [
        ("from content-service", Some(ServiceKind::Content)),
        ("at all", None),
    ] {
        for (label, r) in [("with breaker", with), ("without breaker", without)] {
            let (from, to) = longest_silence(r, service);
            let _ = writeln!(
                out,
                "longest no answer {what}, {label}: from t={}s to t={}s",
                seconds(from),
                seconds(to)
            );
        }
    }
    out
}

/// A Markdown table: one row per measure, one column per run (`runs`, their headings), the values
/// right-aligned.
pub(super) fn table(runs: &[&str], rows: &[(&str, Vec<String>)]) -> String {
    let name_width = rows
        .iter()
        .map(|(name, _)| name.chars().count())
        .max()
        .unwrap_or(0);
    let widths: Vec<usize> = runs
        .iter()
        .enumerate()
        .map(|(i, heading)| {
            rows.iter()
                .filter_map(|(_, values)| values.get(i))
                .map(|v| v.chars().count())
                .chain([heading.chars().count()])
                .max()
                .unwrap_or(0)
        })
        .collect();
    let mut out = format!("| {:<name_width$} |", "");
    for (heading, width) in runs.iter().zip(&widths) {
        let _ = write!(out, " {heading:>width$} |");
    }
    let _ = write!(out, "\n|{:-<w$}|", "", w = name_width + 2);
    for width in &widths {
        let _ = write!(out, "{:->w$}|", "", w = width + 2);
    }
    out.push('\n');
    for (name, values) in rows {
        let _ = write!(out, "| {name:<name_width$} |");
        for (value, width) in values.iter().zip(&widths) {
            let _ = write!(out, " {value:>width$} |");
        }
        out.push('\n');
    }
    out
}

pub(super) fn r1(x: f64) -> String {
    format!("{x:.1}")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn call_to(service: ServiceKind, at_ms: u64, ending: Ending) -> CallRecord {
        let latency_ms = match ending {
            Ending::GaveUp => 2_000.0,
            Ending::Shed => 0.0,
            _ => 1.0,
        };
        CallRecord {
            started_ms: at_ms.saturating_sub(latency_ms as u64),
            at_ms,
            service,
            latency_ms,
            ending,
        }
    }

    fn call(at_ms: u64, ending: Ending) -> CallRecord {
        call_to(ServiceKind::User, at_ms, ending)
    }

    #[test]
    fn percentiles() {
        let mut v = vec![5.0, 1.0, 3.0, 2.0, 4.0];
        assert_eq!(percentile(&mut v, 0.5), 3.0);
        assert_eq!(percentile(&mut v, 0.99), 5.0);
        assert_eq!(percentile(&mut [], 0.99), 0.0);
    }

    #[test]
    fn silence_is_the_longest_gap_between_answers_and_ignores_deadlines_and_shedding() {
        let report = RunReport {
            calls: vec![
                call(100, Ending::Ok),
                call(300, Ending::Rejected),
                // Giving up and shedding are no answers: the gap runs from 300 to 2_500.
                call(2_000, Ending::GaveUp),
                call(2_200, Ending::Shed),
                call(2_500, Ending::UpstreamFailure),
                call(2_600, Ending::Ok),
            ],
            end_ms: 3_000,
            ..RunReport::default()
        };
        assert_eq!(longest_silence(&report, None), (300, 2_500));
        // The end of the load closes the last stretch.
        let quiet_end = RunReport {
            end_ms: 10_000,
            ..report.clone()
        };
        assert_eq!(longest_silence(&quiet_end, None), (2_600, 10_000));
        let nothing = RunReport {
            end_ms: 500,
            ..RunReport::default()
        };
        assert_eq!(longest_silence(&nothing, None), (0, 500));
    }

    #[test]
    fn a_service_silence_counts_only_that_service() {
        let report = RunReport {
            calls: vec![
                call_to(ServiceKind::Content, 100, Ending::Ok),
                call(500, Ending::Ok),
                call_to(ServiceKind::Content, 900, Ending::GaveUp),
                call(1_000, Ending::Ok),
                call_to(ServiceKind::Content, 1_200, Ending::Rejected),
            ],
            end_ms: 1_300,
            ..RunReport::default()
        };
        assert_eq!(
            longest_silence(&report, Some(ServiceKind::Content)),
            (100, 1_200)
        );
        // Every service: the content call given up at 900 is no answer either.
        assert_eq!(longest_silence(&report, None), (500, 1_000));
    }

    #[test]
    fn peak_in_flight_counts_overlapping_calls_only() {
        let calls = [
            call(2_000, Ending::GaveUp), // waits 0 to 2_000
            call(2_100, Ending::GaveUp), // 100 to 2_100
            call(1_000, Ending::Ok),     // 999 to 1_000
            call(3_000, Ending::Ok),     // 2_999 to 3_000: after the others
            call(1_500, Ending::Shed),   // never waits
        ];
        assert_eq!(peak_in_flight(&calls), 3);
        assert_eq!(peak_in_flight(&[]), 0);
    }

    #[test]
    fn the_table_measures_the_hang() {
        // Healthy answers every 100 ms throughout; content answers until 6 s, then gives up until
        // the breaker's first rejection at 6.6 s.
        let mut calls: Vec<CallRecord> = (1..=89).map(|i| call(i * 100, Ending::Ok)).collect();
        calls.extend((1..=59).map(|i| call_to(ServiceKind::Content, i * 100, Ending::Ok)));
        calls.extend([
            call_to(ServiceKind::Content, 8_000, Ending::GaveUp),
            call_to(ServiceKind::Content, 6_600, Ending::Rejected),
            call_to(ServiceKind::Content, 8_900, Ending::Rejected),
            call(8_950, Ending::Shed),
        ]);
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
        assert_eq!(row("from content-service (s)")[2..4], ["2.30", "2.30"]);
        assert_eq!(row("at all, any service")[2..4], ["0.10", "0.10"]);
        assert_eq!(row("requests to the gateway")[2], "152");
        assert_eq!(row("shed by the gateway")[2], "1");
        assert_eq!(row("given up at the deadline")[2], "1");
        assert_eq!(row("rejected by the breaker")[2], "2");
        assert_eq!(row("healthy services answered")[2], "89");
        assert!(
            table.contains("from content-service, with breaker: from t=6.60s to t=8.90s"),
            "{table}"
        );
    }
}
