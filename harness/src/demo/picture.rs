//! The demo's picture, `target/demo/timeline.svg`: the run without the breaker drawn against the run
//! with it on one time axis, so the cascade and its absence are what a reader sees first.
//!
//! From the top, in both runs: the calls waiting for an answer at the gateway; the answers
//! content-service's callers got per second; the gateway's p99 latency. Then the run with the breaker,
//! per service, as the simulate tool draws a replay (breaker state from the health endpoint, error
//! rate, p99). The outage is shaded, and a line marks the moment the breaker opened.

use cb_core::breaker::StateKind;

use super::load::{CallRecord, Ending};
use super::report::percentile;
use super::run::RunReport;
use super::Phases;
use crate::services::ServiceKind;
use crate::svg;

/// Width of the buckets the panels count in: one second, as the lines the demo prints.
const BUCKET_MS: u64 = 1000;
/// How often the calls in flight are sampled: often enough to show them pile up in the 0.6 s before
/// the breaker opens.
const IN_FLIGHT_EVERY_MS: u64 = 100;
const WITH: &str = "#1e88e5";
/// A run without any breaker.
pub(super) const WITHOUT: &str = "#d81b60";
/// A run with the breaker on the caller's side only (`make demo SCENARIO=replica`).
pub(super) const CALLER: &str = "#fb8c00";
/// A run with the breaker on both sides (`make demo SCENARIO=replica`): the colour of "with".
pub(super) const BOTH: &str = WITH;
const OPENED: &str = "#e53935";

/// One run as a picture draws it: its line's legend and colour.
pub(super) struct Run<'a> {
    pub(super) label: &'a str,
    pub(super) colour: &'a str,
    pub(super) report: &'a RunReport,
}

/// Both runs as one picture.
pub(super) fn picture(with: &RunReport, without: &RunReport, phases: Phases) -> svg::Comparison {
    let end_ms = phases.total() * 1000;
    let runs = [
        Run {
            label: "with breaker",
            colour: WITH,
            report: with,
        },
        Run {
            label: "without breaker",
            colour: WITHOUT,
            report: without,
        },
    ];
    let (hang_ms, back_ms) = outage(with, phases);
    svg::Comparison {
        title: format!(
            "make demo: content-service hangs from {}s to {}s; the gateway with the breaker and without",
            phases.healthy,
            phases.healthy + phases.outage
        ),
        start_ms: 0,
        end_ms,
        spans: vec![svg::Span {
            from_ms: hang_ms,
            to_ms: back_ms,
            label: "content-service hangs".to_string(),
        }],
        markers: opened_marker(with, hang_ms, "breaker opened").into_iter().collect(),
        panels: vec![
            svg::Panel {
                title: "calls waiting for an answer at the gateway (in flight)".to_string(),
                unit: String::new(),
                log_scale: false,
                lines: lines(&runs, &|r| in_flight(r, end_ms)),
            },
            svg::Panel {
                title: "content-service calls answered per second (OK, failure or the breaker's rejection; a give-up at the deadline is none)"
                    .to_string(),
                unit: "/s".to_string(),
                log_scale: false,
                lines: lines(&runs, &|r| content_answered(r, end_ms)),
            },
            svg::Panel {
                title: "the gateway's p99 latency per second, all calls (log scale; no point: no call ended that second)"
                    .to_string(),
                unit: "ms".to_string(),
                log_scale: true,
                lines: lines(&runs, &|r| p99(r, end_ms)),
            },
        ],
        rows_heading: "with the breaker, per service: breaker state, error rate, p99".to_string(),
        rows: ServiceKind::ALL
            .iter()
            .map(|&kind| {
                let name = format!("{kind}-service");
                row(with, &name, kind.cluster(), &|c| c.service == kind, end_ms)
            })
            .collect(),
    }
}

/// One line per run of `f` of the run.
pub(super) fn lines(runs: &[Run<'_>], f: &dyn Fn(&RunReport) -> Vec<(u64, f64)>) -> Vec<svg::Line> {
    runs.iter()
        .map(|run| svg::Line {
            label: run.label.to_string(),
            colour: run.colour.to_string(),
            points: f(run.report),
        })
        .collect()
}

/// When the outage began and ended in `r`, or as `phases` planned it when the run did not say.
pub(super) fn outage(r: &RunReport, phases: Phases) -> (u64, u64) {
    if r.back_ms > r.hang_ms {
        (r.hang_ms, r.back_ms)
    } else {
        (
            phases.healthy * 1000,
            (phases.healthy + phases.outage) * 1000,
        )
    }
}

/// A line at the moment `r`'s watched breaker opened, labelled `what` and how far into the hang.
pub(super) fn opened_marker(r: &RunReport, hang_ms: u64, what: &str) -> Option<svg::Marker> {
    r.opened_ms.map(|at| svg::Marker {
        at_ms: at,
        label: format!(
            "{what}, {:.2}s into the hang",
            at.saturating_sub(hang_ms) as f64 / 1000.0
        ),
        colour: OPENED.to_string(),
    })
}

/// The buckets of the run: `(start, middle)` in ms.
fn buckets(end_ms: u64) -> impl Iterator<Item = (u64, u64)> {
    (0..end_ms / BUCKET_MS).map(|b| (b * BUCKET_MS, b * BUCKET_MS + BUCKET_MS / 2))
}

/// Every [`IN_FLIGHT_EVERY_MS`], the calls that had arrived and not yet ended.
pub(super) fn in_flight(r: &RunReport, end_ms: u64) -> Vec<(u64, f64)> {
    (0..=end_ms / IN_FLIGHT_EVERY_MS)
        .map(|i| {
            let t = i * IN_FLIGHT_EVERY_MS;
            let n = r
                .calls
                .iter()
                .filter(|c| c.made() && c.started_ms <= t && t < c.at_ms)
                .count();
            (t, n as f64)
        })
        .collect()
}

/// Per bucket, the calls `of` picks that ended in it, as a rate per second.
pub(super) fn per_second(
    r: &RunReport,
    end_ms: u64,
    of: &dyn Fn(&CallRecord) -> bool,
) -> Vec<(u64, f64)> {
    buckets(end_ms)
        .map(|(from, mid)| {
            let n = r
                .calls
                .iter()
                .filter(|c| c.at_ms / BUCKET_MS == from / BUCKET_MS && of(c))
                .count();
            (mid, n as f64 * 1000.0 / BUCKET_MS as f64)
        })
        .collect()
}

/// Per bucket, calls to content-service that got an answer, as a rate per second.
fn content_answered(r: &RunReport, end_ms: u64) -> Vec<(u64, f64)> {
    per_second(r, end_ms, &|c| {
        c.service == ServiceKind::Content && c.ending.answered()
    })
}

/// Per bucket, the `q` quantile of the latency of the calls `of` picks that ended in it (NaN when
/// none did).
pub(super) fn latency(
    r: &RunReport,
    end_ms: u64,
    q: f64,
    of: &dyn Fn(&CallRecord) -> bool,
) -> Vec<(u64, f64)> {
    buckets(end_ms)
        .map(|(from, mid)| {
            let mut latencies: Vec<f64> = r
                .calls
                .iter()
                .filter(|c| c.made() && c.at_ms / BUCKET_MS == from / BUCKET_MS && of(c))
                .map(|c| c.latency_ms)
                .collect();
            let v = if latencies.is_empty() {
                f64::NAN
            } else {
                percentile(&mut latencies, q)
            };
            (mid, v)
        })
        .collect()
}

/// Per bucket, the p99 latency of every call that ended in it (NaN when none did).
fn p99(r: &RunReport, end_ms: u64) -> Vec<(u64, f64)> {
    latency(r, end_ms, 0.99, &|_| true)
}

/// A row named `name`: the states of the breaker in `column` of the timeline, and the error rate
/// (anything but OK) and p99 per second of the calls `of` picks.
pub(super) fn row(
    report: &RunReport,
    name: &str,
    column: &str,
    of: &dyn Fn(&CallRecord) -> bool,
    end_ms: u64,
) -> svg::Series {
    let mut error_rate = Vec::new();
    let mut latency_ms = Vec::new();
    for second in 0..end_ms / 1000 {
        let mut lat: Vec<f64> = Vec::new();
        let (mut n, mut bad) = (0usize, 0usize);
        for c in report
            .calls
            .iter()
            .filter(|c| of(c) && c.at_ms / 1000 == second)
        {
            n += 1;
            bad += usize::from(c.ending != Ending::Ok);
            if c.made() {
                lat.push(c.latency_ms);
            }
        }
        if n > 0 {
            error_rate.push((second * 1000 + 500, bad as f64 / n as f64));
        }
        if !lat.is_empty() {
            latency_ms.push((second * 1000 + 500, percentile(&mut lat, 0.99)));
        }
    }
    svg::Series {
        name: name.to_string(),
        states: state_changes(report, column),
        error_rate,
        latency_ms,
    }
}

/// The state changes of the breaker in `column`, from the health endpoint read once a second: a
/// change is drawn at the start of the second in which it was seen, except the watched breaker's first
/// opening, whose time was measured.
fn state_changes(report: &RunReport, column: &str) -> Vec<(u64, StateKind)> {
    let mut states = vec![(0, StateKind::Closed)];
    let mut opened = report.opened_ms.filter(|_| column == report.watched_column);
    for (at, s) in &report.states {
        let state = s.get(column).copied().unwrap_or(StateKind::Closed);
        if states.last().map(|(_, last)| *last) == Some(state) {
            continue;
        }
        let from = at.saturating_sub(1000);
        let when = match opened {
            Some(o) if state == StateKind::Open && (from..=*at).contains(&o) => {
                opened = None;
                o
            }
            _ => from,
        };
        states.push((when, state));
    }
    states
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;
    use std::process::Command;

    use super::*;

    const PHASES: Phases = Phases {
        healthy: 2,
        outage: 4,
        recovery: 2,
    };

    /// A small made-up pair of runs shaped like the real ones: a request to each service every 50 ms,
    /// whatever became of the earlier ones; from 2 s to 6 s content hangs. With the breaker it opens at
    /// 2.54 s and content calls are rejected at once from 2.5 s; without it, every content call waits
    /// its 2 s deadline.
    fn runs() -> (RunReport, RunReport) {
        let mut with = RunReport {
            hang_ms: 2_000,
            back_ms: 6_000,
            opened_ms: Some(2_540),
            watched_column: "content".to_string(),
            end_ms: 8_000,
            ..RunReport::default()
        };
        let mut without = RunReport {
            opened_ms: None,
            ..with.clone()
        };
        for started_ms in (0..8_000).step_by(50) {
            let hang = (2_000..6_000).contains(&started_ms);
            for service in ServiceKind::ALL {
                let call = |latency_ms: u64, ending| CallRecord {
                    started_ms,
                    at_ms: started_ms + latency_ms,
                    service,
                    latency_ms: latency_ms as f64,
                    ending,
                };
                let dead = hang && service == ServiceKind::Content;
                with.calls.push(match (dead, started_ms < 2_500) {
                    (true, true) => call(2_000, Ending::GaveUp),
                    (true, false) => call(0, Ending::Rejected),
                    (false, _) => call(3, Ending::Ok),
                });
                without.calls.push(if dead {
                    call(2_000, Ending::GaveUp)
                } else {
                    call(3, Ending::Ok)
                });
            }
            let content = if (2_540..5_000).contains(&started_ms) {
                StateKind::Open
            } else {
                StateKind::Closed
            };
            // Read at whole seconds, as a run reads the health endpoint.
            if started_ms % 1_000 == 0 && started_ms > 0 {
                let states = HashMap::from([("content".to_string(), content)]);
                with.states.push((started_ms, states));
            }
        }
        (with, without)
    }

    #[test]
    fn the_picture_compares_the_runs() {
        let (with, without) = runs();
        let c = picture(&with, &without, PHASES);
        assert_eq!(c.panels.len(), 3);
        let waiting = &c.panels[0].lines;
        // At 5 s: with the breaker, only the three healthy calls that began then; without it, also the
        // 40 content calls of the last 2 s (3.05 s to 5 s).
        assert_eq!(waiting[0].points[50], (5_000, 3.0));
        assert_eq!(waiting[1].points[50], (5_000, 43.0));
        let answered = &c.panels[1].lines;
        // Content: 20 calls a second; during the hang, answered by the breaker's rejections, or not at
        // all without it.
        assert_eq!(answered[0].points[0], (500, 20.0));
        assert_eq!(answered[0].points[3], (3_500, 20.0));
        assert_eq!(answered[1].points[3], (3_500, 0.0));
        let p99 = &c.panels[2].lines;
        assert_eq!(
            p99[1].points[4].1, 2_000.0,
            "the deadlines of the calls from 2 s to 3 s"
        );
        assert_eq!(p99[0].points[6].1, 3.0);
        assert_eq!(c.markers.len(), 1);
        assert!(c.markers[0].label.contains("0.54s"), "{:?}", c.markers);
        assert_eq!(c.spans[0].from_ms, 2_000);
        let content = &c.rows[1];
        assert_eq!(
            content.states,
            vec![
                (0, StateKind::Closed),
                (2_540, StateKind::Open),
                // Closed again at 5 s: seen at the read of 5 s, so drawn from 4 s.
                (4_000, StateKind::Closed)
            ],
            "the measured opening; the others in the second before they were seen"
        );
        let svg = svg::render_comparison(&c);
        assert!(svg.contains("without breaker") && svg.contains("content-service"));
    }

    /// The picture renders in a real SVG renderer: librsvg (`rsvg-convert`, Debian's `librsvg2-bin`,
    /// which `make test` installs) parses it and writes a PNG. Skips when the tool is missing.
    #[test]
    fn the_picture_renders_with_rsvg_convert() {
        let (with, without) = runs();
        let doc = svg::render_comparison(&picture(&with, &without, PHASES));
        let dir = std::env::temp_dir().join(format!("cb-demo-picture-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let (svg_path, png_path) = (dir.join("timeline.svg"), dir.join("timeline.png"));
        std::fs::write(&svg_path, doc).unwrap();
        let output = match Command::new("rsvg-convert")
            .arg("--format=png")
            .arg("--output")
            .arg(&png_path)
            .arg(&svg_path)
            .output()
        {
            Ok(output) => output,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                println!("skipped: rsvg-convert not found (install Debian's librsvg2-bin)");
                let _ = std::fs::remove_dir_all(&dir);
                return;
            }
            Err(e) => panic!("cannot run rsvg-convert: {e}"),
        };
        assert!(
            output.status.success(),
            "rsvg-convert failed ({}): {}",
            output.status,
            String::from_utf8_lossy(&output.stderr)
        );
        let png = std::fs::read(&png_path).unwrap();
        assert!(png.starts_with(b"\x89PNG\r\n\x1a\n"), "not a PNG");
        assert!(png.len() > 1_000, "a near-empty PNG: {} bytes", png.len());
        let _ = std::fs::remove_dir_all(&dir);
    }
}
