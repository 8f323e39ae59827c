//! The report as a table, as JSON and as an SVG timeline.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use cb_core::breaker::StateKind;
use cb_core::classify::Outcome;

use super::log::format_rfc3339_ms;
use super::replay::Report;
use crate::svg;

// ---------------------------------------------------------------------------------------------------
// Output
// ---------------------------------------------------------------------------------------------------

/// The report as the table printed on stdout.
pub fn render_table(r: &Report) -> String {
    let mut out = String::new();
    let span_s = r.end_ms.saturating_sub(r.start_ms) as f64 / 1000.0;
    let _ = writeln!(
        out,
        "Replayed {} calls from {}: {} to {} ({:.1}s); {} malformed line{} skipped.",
        r.calls,
        r.source,
        r.start,
        r.end,
        span_s,
        r.malformed_lines,
        if r.malformed_lines == 1 { "" } else { "s" }
    );
    let _ = writeln!(
        out,
        "upstream_key: {}. A trip is a blip when its failure episode lasted less than {}.",
        r.upstream_key,
        fmt_secs(r.blip_threshold_ms)
    );
    if !r.untracked.is_empty() {
        let parts: Vec<String> = r
            .untracked
            .iter()
            .map(|(why, n)| format!("{why}: {n}"))
            .collect();
        let _ = writeln!(
            out,
            "Untracked calls (passed without a breaker): {}.",
            parts.join(", ")
        );
    }
    out.push('\n');

    let width = r
        .upstreams
        .iter()
        .map(|u| u.upstream.chars().count())
        .max()
        .unwrap_or(8)
        .max(8);
    let header = [
        "calls",
        "allowed",
        "rejected",
        "would-fail",
        "would-succeed",
        "failures-passed",
        "opened",
        "blips",
    ];
    let _ = write!(out, "{:<width$}", "UPSTREAM");
    for h in header {
        let _ = write!(out, "  {:>w$}", h.to_uppercase(), w = h.len());
    }
    let _ = writeln!(out, "  FINAL");
    for u in &r.upstreams {
        let values = [
            u.calls,
            u.allowed,
            u.rejected + u.dry_run_rejections,
            u.rejected_would_have_failed,
            u.rejected_would_have_succeeded,
            u.failures_let_through,
            u.open_periods.len() as u64,
            u.blips,
        ];
        let _ = write!(out, "{:<width$}", u.upstream);
        for (h, v) in header.iter().zip(values) {
            let _ = write!(out, "  {:>w$}", v, w = h.len());
        }
        let _ = writeln!(out, "  {}", u.final_state);
    }
    let _ = writeln!(
        out,
        "\n(rejected: calls the breaker would have turned away; would-fail / would-succeed: what the log says they did;\n failures-passed: failures the breaker let through)"
    );

    for u in &r.upstreams {
        if u.transitions.is_empty() && u.mode == "enforce" {
            continue;
        }
        let _ = writeln!(
            out,
            "\n{} (mode {}, {} log failures of {} calls)",
            u.upstream, u.mode, u.log_failures, u.calls
        );
        if u.dry_run_rejections > 0 {
            let _ = writeln!(
                out,
                "  dry_run: {} calls would have been rejected; none were",
                u.dry_run_rejections
            );
        }
        for t in &u.transitions {
            let _ = writeln!(
                out,
                "  {}  {:>9}  {:<9} -> {:<9}  {}",
                time_of_day(t.at_ms),
                format!("+{}", fmt_secs(t.offset_ms)),
                t.from,
                t.to,
                t.reason
            );
        }
        for (i, p) in u.open_periods.iter().enumerate() {
            let closed = match p.closed_at_ms {
                Some(at) => format!("closed {} after {}", time_of_day(at), fmt_secs(p.open_ms)),
                None => format!("not closed by the end ({} so far)", fmt_secs(p.open_ms)),
            };
            let episode = match p.failure_episode_ms {
                Some(ms) => format!(
                    ", failure episode {}{}",
                    fmt_secs(ms),
                    if p.blip { " -> BLIP" } else { "" }
                ),
                None => String::new(),
            };
            let _ = writeln!(
                out,
                "  open period {}: opened {} ({}), {}, {} re-open{}, {} calls rejected{}",
                i + 1,
                time_of_day(p.opened_at_ms),
                p.reason,
                closed,
                p.reopens,
                if p.reopens == 1 { "" } else { "s" },
                p.rejected,
                episode
            );
        }
    }
    out
}

/// The report as pretty-printed JSON.
pub fn render_json(r: &Report) -> Result<String, String> {
    serde_json::to_string_pretty(r).map_err(|e| format!("report as JSON: {e}"))
}

/// The report as an SVG timeline: per upstream its states, error rate and p99 latency.
pub fn timeline(r: &Report) -> svg::Timeline {
    let span = r.end_ms.saturating_sub(r.start_ms);
    // About a hundred points per line: enough to see an outage's shape, few enough that each point
    // averages several calls instead of flickering between 0 and 100 %.
    let bucket_ms = [
        1_000u64, 2_000, 5_000, 10_000, 15_000, 30_000, 60_000, 300_000, 600_000, 3_600_000,
    ]
    .into_iter()
    .find(|b| span / b <= 120)
    .unwrap_or(3_600_000);
    let series = r
        .upstreams
        .iter()
        .map(|u| {
            let mut buckets: BTreeMap<u64, (u64, u64, Vec<u64>)> = BTreeMap::new();
            for (end, verdict, duration) in &u.samples {
                if verdict.outcome == Outcome::Ignored {
                    continue;
                }
                let b = buckets
                    .entry(end.saturating_sub(r.start_ms) / bucket_ms)
                    .or_default();
                b.0 += 1;
                b.1 += u64::from(verdict.outcome == Outcome::Failure);
                b.2.push(*duration);
            }
            let mut error_rate = Vec::with_capacity(buckets.len());
            let mut latency_ms = Vec::with_capacity(buckets.len());
            for (b, (judged, failures, mut durations)) in buckets {
                let mid = r
                    .start_ms
                    .saturating_add(b * bucket_ms + bucket_ms / 2)
                    .min(r.end_ms);
                error_rate.push((mid, failures as f64 / judged.max(1) as f64));
                durations.sort_unstable();
                // Nearest-rank p99.
                let rank = ((durations.len() as f64) * 0.99).ceil() as usize;
                if let Some(p99) = durations.get(rank.saturating_sub(1)) {
                    latency_ms.push((mid, *p99 as f64));
                }
            }
            let mut states = vec![(r.start_ms, StateKind::Closed)];
            states.extend(u.states.iter().copied());
            svg::Series {
                name: u.upstream.clone(),
                states,
                error_rate,
                latency_ms,
            }
        })
        .collect();
    svg::Timeline {
        title: format!("Circuit breaker replay of {} ({} calls)", r.source, r.calls),
        start_ms: r.start_ms,
        end_ms: r.end_ms,
        series,
    }
}

fn time_of_day(ms: u64) -> String {
    let full = format_rfc3339_ms(ms);
    // "2026-11-22T10:01:05.120Z" → "10:01:05.120": the table spans minutes, the date is in the header.
    full.get(11..23).map_or(full.clone(), str::to_string)
}

fn fmt_secs(ms: u64) -> String {
    if ms % 1000 == 0 {
        format!("{}s", ms / 1000)
    } else {
        format!("{:.1}s", ms as f64 / 1000.0)
    }
}
