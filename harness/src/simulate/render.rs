//! The report as a table, as JSON and as an SVG timeline.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use cb_core::breaker::StateKind;
use cb_core::classify::Outcome;
use cb_core::config::WindowConfig;
use serde_json::Value;

use super::log::format_rfc3339_ms;
use super::replay::Report;
use super::tune::{duration, Catch, Knobs, TuneReport, UpstreamTuning};
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
pub fn render_json<T: serde::Serialize>(r: &T) -> Result<String, String> {
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

/// The `--tune` report as text: the block to paste, then per upstream what the recommendation and the
/// defaults would have done.
pub fn render_tune(r: &TuneReport) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "Tuned {} upstream{} on {} ({} calls; {} malformed line{} skipped).",
        r.results.len(),
        if r.results.len() == 1 { "" } else { "s" },
        r.source,
        r.calls,
        r.malformed_lines,
        if r.malformed_lines == 1 { "" } else { "s" }
    );
    let _ = writeln!(
        out,
        "An outage is an episode of at least {}, a blip one shorter than {} (see --help); \"defaults\" are\nan upstream's settings now. At most {} candidates replayed per upstream.\n",
        fmt_secs(r.outage_ms),
        fmt_secs(r.blip_ms),
        r.max_replays_per_upstream
    );
    let block = serde_json::to_string_pretty(&Value::Object(r.upstreams.clone()))
        .unwrap_or_else(|_| "{}".into());
    if r.results.iter().all(|u| u.override_fields.is_none()) {
        let _ = writeln!(
            out,
            "No upstream needs an override: the configuration can stay as it is."
        );
    } else {
        let _ = writeln!(
            out,
            "Paste into the filter configuration (it replaces the \"upstreams\" there):\n\n\"upstreams\": {block}"
        );
    }
    for u in &r.results {
        tune_upstream(&mut out, u, r.outage_ms);
    }
    for (key, why) in &r.skipped {
        let _ = writeln!(out, "\n{key}: {why}");
    }
    out
}

fn tune_upstream(out: &mut String, u: &UpstreamTuning, outage_ms: u64) {
    let e = &u.episodes;
    let _ = writeln!(
        out,
        "\n{}: {} calls, noise {:.1} %, a second is bad from {:.0} % errors; {} outage{}, {} blip{}",
        u.upstream,
        u.calls,
        e.noise * 100.0,
        e.threshold * 100.0,
        u.outages,
        if u.outages == 1 { "" } else { "s" },
        u.blips,
        if u.blips == 1 { "" } else { "s" }
    );
    let _ = writeln!(
        out,
        "  {} ({} candidate{} replayed)",
        u.note,
        u.replays,
        if u.replays == 1 { "" } else { "s" }
    );
    let changes = settings_changed(&u.recommended_knobs, &u.base_knobs);
    if !changes.is_empty() {
        let _ = writeln!(out, "  settings: {}", changes.join(", "));
    }
    if let Some(a) = &u.stuck {
        let _ = writeln!(
            out,
            "  stuck_call_duration by the rule (see --help): {}, from a 99.9th percentile of {}ms to response headers over {} successful calls",
            duration(a.rule_ms),
            a.p999_ms,
            a.successes
        );
    }
    let _ = writeln!(out, "  {:<44}{:<16}defaults", "", "recommended");
    let (rec, base) = (&u.recommended, &u.base);
    for (i, c) in rec.outages.iter().enumerate() {
        let label = format!(
            "outage {}, {}, {:.0} % errors",
            time_of_day(c.start_ms).get(..8).unwrap_or(""),
            fmt_secs(c.length_ms),
            c.error_rate * 100.0
        );
        let _ = writeln!(
            out,
            "  {label:<44}{:<16}{}   (in time: within {})",
            caught(Some(c)),
            caught(base.outages.get(i)),
            fmt_secs(outage_ms / 2)
        );
    }
    let rows: [(&str, u64, u64); 4] = [
        ("blip trips", rec.blip_trips.into(), base.blip_trips.into()),
        (
            "trips in normal traffic",
            rec.normal_traffic_trips.into(),
            base.normal_traffic_trips.into(),
        ),
        (
            "would-succeed calls rejected",
            rec.would_succeed_rejected,
            base.would_succeed_rejected,
        ),
        (
            "failures let through",
            rec.failures_let_through,
            base.failures_let_through,
        ),
    ];
    for (label, a, b) in rows {
        let _ = writeln!(out, "  {label:<44}{a:<16}{b}");
    }
    for m in &u.unmet {
        let _ = writeln!(out, "  priority {} not met: {}", m.priority, m.why);
    }
}

fn caught(c: Option<&Catch>) -> String {
    match c {
        Some(Catch {
            caught_after_ms: Some(ms),
            in_time,
            ..
        }) => format!("{}{}", fmt_secs(*ms), if *in_time { "" } else { " LATE" }),
        Some(_) => "MISSED".into(),
        None => "-".into(),
    }
}

/// `name value (was old)` for each setting that changed.
fn settings_changed(new: &Knobs, old: &Knobs) -> Vec<String> {
    let window = |w: &WindowConfig| match w {
        WindowConfig::Count(n) => format!("window_size {n}"),
        WindowConfig::Time { duration_ms } => {
            format!("window_duration \"{}\"", duration(*duration_ms))
        }
    };
    let mut v = Vec::new();
    let mut change = |name: &str, a: String, b: String| {
        if a != b {
            v.push(format!("{name}{a} (was {b})"));
        }
    };
    change(
        "failure_threshold ",
        new.failure_threshold.to_string(),
        old.failure_threshold.to_string(),
    );
    let rate = |ppm: u32| format!("{}", f64::from(ppm) / 1e6);
    change(
        "error_rate_threshold ",
        rate(new.error_rate_ppm),
        rate(old.error_rate_ppm),
    );
    change("", window(&new.window), window(&old.window));
    change(
        "minimum_requests ",
        new.minimum_requests.to_string(),
        old.minimum_requests.to_string(),
    );
    let open = |ms: u64| format!("\"{}\"", duration(ms));
    change(
        "open_timeout ",
        open(new.open_timeout_ms),
        open(old.open_timeout_ms),
    );
    let stuck = |ms: Option<u64>| ms.map_or("unset".into(), open);
    change(
        "stuck_call_duration ",
        stuck(new.stuck_call_duration_ms),
        stuck(old.stuck_call_duration_ms),
    );
    v
}
