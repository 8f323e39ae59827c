//! The goals table at the top of the report: each goal's target, its measured figure (per round, then
//! median, with the min–max over the rounds) and whether it is met.

use std::fmt::Write as _;

use super::super::phases::{vname, BUILDS};
use super::super::stats::{differences, of, ratios, Spread, INTERLEAVED};
use super::{f2, f3, num, show, verdict, Report};
use crate::envoy::Build;

/// The breaker's own cost in wasm (proxy CPU per call, `ingress` − `filter_disabled`) in the report
/// issue 12 started from (BENCHMARKS.md of 2026-11-22, 5 rounds): the figure to halve.
pub(super) const WASM_BREAKER_COST_BEFORE_US: f64 = 25.8;

/// How much slower than with 1 glob a call may be with 10,000 and still count as "no slower": the
/// per-round ratio of two identical configurations moves by a few percent on this shared machine.
const GLOBS_NOISE: f64 = 1.05;

/// The most an LDS update of 20 listeners may cost with `stuck_call_duration` over without and still
/// count as "the same". Noise moves the per-round ratio by a few tenths; a teardown that waited for
/// the old ticker threads' sleeps (20 × up to 50 ms over an update of a few tens of ms) would put it
/// far above.
pub(super) const LDS_RATIO_BOUND: f64 = 1.5;

/// A row of a goals table.
fn row(md: &mut String, goal: &str, target: &str, measured: String, ok: Option<bool>) {
    // A row without a target is there for reference.
    let verdict = if target == "–" { "" } else { verdict(ok) };
    let _ = writeln!(md, "| {goal} | {target} | {measured} | {verdict} |");
}

fn show_median(s: Option<Spread>) -> String {
    s.map_or("–".into(), |s| format!("{:.1}", s.median))
}

fn us(x: f64) -> String {
    format!("{x:.1} µs")
}

impl Report<'_> {
    pub(super) fn summary(&self, md: &mut String) {
        let _ = writeln!(md, "### Goals\n");
        let _ = writeln!(
            md,
            "| goal | target | measured (median, min–max over rounds) | |"
        );
        let _ = writeln!(md, "| --- | --- | --- | --- |");
        let (wasm, native) = (Build::Wasm, Build::Native);
        if let Some(c) = &self.closed {
            let thr = |b| {
                ratios(
                    &c.throughput,
                    &vname(b, "ingress"),
                    &vname(b, "baseline"),
                    |r| Some(r.rps),
                )
            };
            let t = thr(native);
            row(
                md,
                "native: closed throughput, filter on / off",
                "≥ 0.97",
                show(t, f3),
                t.map(|s| s.median >= 0.97),
            );
            let t = thr(wasm);
            row(
                md,
                "wasm: closed throughput, filter on / off",
                "≥ 0.70",
                show(t, f3),
                t.map(|s| s.median >= 0.70),
            );
        }
        if let Some(o) = &self.open {
            let thr = |b| {
                ratios(
                    &o.throughput,
                    &vname(b, "rejected"),
                    &vname(b, "floor"),
                    |r| Some(r.rps),
                )
            };
            let t = thr(native);
            row(
                md,
                "native: rejected-call throughput / `direct_response`",
                "≥ 0.9",
                show(t, f3),
                t.map(|s| s.median >= 0.9),
            );
            let t = thr(wasm);
            row(
                md,
                "wasm: rejected-call throughput / `direct_response`",
                "≥ 0.45",
                show(t, f3),
                t.map(|s| s.median >= 0.45),
            );
        }
        let core = self.core.get("breakers_1_thread", "core_native");
        let failsafe = self.core.get("breakers_1_thread", "failsafe");
        let vs = self.core.round_ratio(INTERLEAVED[0]);
        row(
            md,
            "native: core per call (admit + record, 1 thread) vs failsafe-rs, interleaved rounds",
            "≤ 1.0×",
            format!(
                "{} (criterion: {} ns vs {} ns)",
                show(vs, |x| format!("{x:.2}×")),
                core.map_or("–".into(), |c| format!("{:.0}", c.median)),
                failsafe.map_or("–".into(), |f| format!("{:.0}", f.median)),
            ),
            vs.map(|s| s.median <= 1.0),
        );
        if let Some(c) = &self.closed {
            let cost = |b| {
                differences(
                    &c.throughput,
                    &vname(b, "ingress"),
                    &vname(b, "filter_disabled"),
                    |r| r.cpu_us,
                )
            };
            let half = WASM_BREAKER_COST_BEFORE_US / 2.0;
            let w = cost(wasm);
            row(
                md,
                "wasm: the breaker's own cost, proxy CPU per call (`ingress` − `filter_disabled`)",
                &format!("≤ {half:.1} µs (half of {WASM_BREAKER_COST_BEFORE_US} µs before)"),
                show(w, us),
                w.map(|s| s.median <= half),
            );
            row(
                md,
                "native: the breaker's own cost, the same difference",
                "–",
                show(cost(native), us),
                None,
            );
        }
        let (one, many) = (
            self.core.get("admit_record", "globs_1"),
            self.core.get("admit_record", "globs_10000"),
        );
        let globs = self.core.round_ratio(INTERLEAVED[1]);
        row(
            md,
            "core per call with 10,000 glob overrides / with 1, interleaved rounds",
            &format!("≤ {GLOBS_NOISE:.2} (no slower, within noise)"),
            format!(
                "{} (criterion `admit_record/globs_*`: {} ns vs {} ns)",
                show(globs, f3),
                many.map_or("–".into(), |m| format!("{:.0}", m.median)),
                one.map_or("–".into(), |o| format!("{:.0}", o.median)),
            ),
            globs.map(|s| s.median <= GLOBS_NOISE),
        );
        if let Some(l) = &self.lds {
            let ratio = l.ratio(|u| u.ms);
            row(
                md,
                "native: an LDS update of 20 listeners, with / without `stuck_call_duration`",
                &format!("≈ 1 (≤ {LDS_RATIO_BOUND}: the teardown waits for no sleep)"),
                format!(
                    "{} ({} ms vs {} ms)",
                    show(ratio, f2),
                    show_median(l.of("with", |u| u.ms)),
                    show_median(l.of("without", |u| u.ms)),
                ),
                ratio.map(|s| s.median <= LDS_RATIO_BOUND),
            );
        }
        let _ = writeln!(md);
        self.per_build_goals(md);
    }

    /// Issue 6's goals, kept for both builds: latency under load and alone, fail-fast latency, and
    /// isolation of the guarded upstream.
    fn per_build_goals(&self, md: &mut String) {
        if self.closed.is_none() && self.open.is_none() {
            return;
        }
        let _ = writeln!(md, "| goal (issue 6) | target | wasm | native |");
        let _ = writeln!(md, "| --- | --- | --- | --- |");
        let mut line = |goal: &str, target: &str, f: &dyn Fn(Build) -> (String, Option<bool>)| {
            let cells: Vec<String> = BUILDS
                .iter()
                .map(|b| {
                    let (measured, ok) = f(*b);
                    if measured == "–" {
                        measured
                    } else {
                        format!("{measured}, {}", verdict(ok))
                    }
                })
                .collect();
            let _ = writeln!(md, "| {goal} | {target} | {} |", cells.join(" | "));
        };
        let at_most = |s: Option<Spread>, limit: f64, f: fn(f64) -> String| {
            (show(s, f), s.map(|s| s.median <= limit))
        };
        if let Some(c) = &self.closed {
            line("closed: p99 at half capacity, on / off", "≤ 1.10", &|b| {
                let s = ratios(
                    &c.latency,
                    &vname(b, "ingress"),
                    &vname(b, "baseline"),
                    |r| r.p99_us,
                );
                at_most(s, 1.10, f2)
            });
            line(
                "closed: p99 one call at a time, on / off",
                "≤ 1.10",
                &|b| {
                    let s = ratios(
                        &c.unloaded,
                        &vname(b, "ingress"),
                        &vname(b, "baseline"),
                        |r| r.p99_us,
                    );
                    at_most(s, 1.10, f2)
                },
            );
        }
        if let Some(h) = &self.hostcalls {
            line(
                "shared-data work per call (host-call prices × calls, + the core in the VM)",
                "≤ 5 µs",
                &|b| {
                    if b != Build::Wasm {
                        return ("–".into(), None);
                    }
                    match h.shared_data_work() {
                        (Some(l), Some(hi)) => (
                            format!("{l:.1}–{hi:.1} µs (fewest–most reads)"),
                            Some(hi <= 5.0),
                        ),
                        _ => ("–".into(), None),
                    }
                },
            );
        }
        if let Some(o) = &self.open {
            let micros = |x: f64| format!("{x:.0} µs");
            line(
                "open: p99 of a rejected call, at half capacity",
                "< 1 ms",
                &|b| {
                    let s = of(&o.latency, &vname(b, "rejected"), |r| r.p99_us);
                    (show(s, micros), s.map(|s| s.median < 1000.0))
                },
            );
            line(
                "open: p99 of a rejected call, one call at a time",
                "< 1 ms",
                &|b| {
                    let s = of(&o.unloaded, &vname(b, "rejected"), |r| r.p99_us);
                    (show(s, micros), s.map(|s| s.median < 1000.0))
                },
            );
            line(
                "open: requests reaching the guarded upstream while Open",
                "0",
                &|b| match o.counts.iter().find(|c| c.build == b) {
                    Some(c) => (
                        format!(
                            "{} (of {} rejected)",
                            c.guarded_upstream_rq,
                            num(c.rejected_total as f64)
                        ),
                        Some(c.guarded_upstream_rq == 0),
                    ),
                    None => ("–".into(), None),
                },
            );
        }
        let _ = writeln!(md);
    }
}
