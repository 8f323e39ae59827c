//! The report's sections for the phases that run Envoy, one per phase.

use std::fmt::Write as _;

use super::super::load::Run;
use super::super::phases::{
    tenant, vname, Closed, BUILDS, CLOSED_LISTENERS, HANG_TIMEOUT, LDS_LISTENERS, LDS_VARIANTS,
    MANY_KEYS, OLD_TICK_MS, OPEN_LISTENERS, PROBES, STUCK_CALL_DURATION,
};
use super::super::stats::{differences, of, ratios};
use super::{f1, f2, f3, num, show, Report};
use crate::envoy::Build;

use std::collections::BTreeMap;

/// The per-round ratios of one pair of variants, as a row of a ratio table: throughput, CPU per call,
/// and the latencies of each load.
fn ratio_row(md: &mut String, c: &Closed, a: &str, b: &str, label: &str) {
    let _ = writeln!(
        md,
        "| {label} | {} | {} | {} | {} | {} | {} |",
        show(ratios(&c.throughput, a, b, |r| Some(r.rps)), f3),
        show(ratios(&c.throughput, a, b, |r| r.cpu_us), f2),
        show(ratios(&c.latency, a, b, |r| r.p50_us), f2),
        show(ratios(&c.latency, a, b, |r| r.p99_us), f2),
        show(ratios(&c.unloaded, a, b, |r| r.p50_us), f2),
        show(ratios(&c.unloaded, a, b, |r| r.p99_us), f2),
    );
}

/// The CPU difference per round of two variants, in µs.
fn diff(runs: &BTreeMap<String, Vec<Run>>, a: &str, b: &str) -> String {
    show(differences(runs, a, b, |r| r.cpu_us), f1)
}

impl Report<'_> {
    pub(super) fn closed_section(&self, md: &mut String) {
        let Some(c) = &self.closed else {
            return;
        };
        let _ = writeln!(
            md,
            "### 1. Closed state: what the filter costs a call
"
        );
        let _ = writeln!(
            md,
            "Two Envoys, one per build (`envoy/bench.yaml` and its native twin `envoy/bench-native.yaml`), \
             each with one worker, both pinned to the same core and measured in the same interleaved \
             rounds (only one is loaded at a time); in each, three listeners identical but for the \
             filter, in front of an upstream Envoy answering every call with a trailers-only gRPC OK. \
             `baseline`: router only, each build's floor; `filter_disabled`: the filter in `mode: \
             disabled` (Envoy still enters the wasm VM, or calls the module's hooks, for every stream); \
             `ingress`: the filter, configured `{}` (defaults: `upstream_key: cluster`, count window of \
             100).\n",
            c.filter_config
        );
        let _ = writeln!(
            md,
            "| build | listener | saturated throughput (req/s) | proxy CPU per call (µs) | proxy busy (cores) | p50 at {} req/s (µs) | p99 (µs) | p50, one call at a time (µs) | p99 (µs) |",
            num(c.rate)
        );
        let _ = writeln!(
            md,
            "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"
        );
        for b in BUILDS {
            for l in CLOSED_LISTENERS {
                let v = vname(b, l);
                let _ = writeln!(
                    md,
                    "| {} | `{l}` | {} | {} | {} | {} | {} | {} | {} |",
                    b.name(),
                    show(of(&c.throughput, &v, |r| Some(r.rps)), num),
                    show(of(&c.throughput, &v, |r| r.cpu_us), f1),
                    show(of(&c.throughput, &v, |r| r.busy), f2),
                    show(of(&c.latency, &v, |r| r.p50_us), num),
                    show(of(&c.latency, &v, |r| r.p99_us), num),
                    show(of(&c.unloaded, &v, |r| r.p50_us), num),
                    show(of(&c.unloaded, &v, |r| r.p99_us), num),
                );
            }
        }
        let _ = writeln!(md);
        let _ = writeln!(
            md,
            "| ratio (per round, then median) | throughput | CPU per call | p50 | p99 | p50, one at a time | p99, one at a time |"
        );
        let _ = writeln!(md, "| --- | --- | --- | --- | --- | --- | --- |");
        for b in BUILDS {
            for (x, y) in [
                ("ingress", "baseline"),
                ("filter_disabled", "baseline"),
                ("ingress", "filter_disabled"),
            ] {
                let label = format!("{}: `{x}` / `{y}`", b.name());
                ratio_row(md, c, &vname(b, x), &vname(b, y), &label);
            }
        }
        let (w, n) = (Build::Wasm, Build::Native);
        ratio_row(
            md,
            c,
            &vname(n, "ingress"),
            &vname(w, "ingress"),
            "`ingress`, native / wasm",
        );
        ratio_row(
            md,
            c,
            &vname(n, "baseline"),
            &vname(w, "baseline"),
            "`baseline`, native Envoy / wasm Envoy (the floors agree?)",
        );
        let _ = writeln!(md);
        for b in BUILDS {
            let (on, off, floor) = (
                vname(b, "ingress"),
                vname(b, "filter_disabled"),
                vname(b, "baseline"),
            );
            let _ = writeln!(
                md,
                "**{}**: proxy CPU per call, difference per round: the whole filter (`ingress` − `baseline`) \
                 {} µs; the breaker's own work (`ingress` − `filter_disabled`) {} µs; the filter doing \
                 nothing (`filter_disabled` − `baseline`) {} µs. At the fixed rate: {} µs, {} µs and {} µs.\n",
                b.name(),
                diff(&c.throughput, &on, &floor),
                diff(&c.throughput, &on, &off),
                diff(&c.throughput, &off, &floor),
                diff(&c.latency, &on, &floor),
                diff(&c.latency, &on, &off),
                diff(&c.latency, &off, &floor),
            );
        }
    }

    pub(super) fn open_section(&self, md: &mut String) {
        let Some(o) = &self.open else {
            return;
        };
        let _ = writeln!(
            md,
            "### 2. Open state: failing fast
"
        );
        let _ = writeln!(
            md,
            "Two Envoys, one per build (`envoy/bench-open.yaml` and `envoy/bench-open-native.yaml`), one \
             worker each, pinned to the same core, in the same rounds. `rejected`: the filter (`{}`) in \
             front of a hanging upstream, opened by one call that timed out before the runs, and Open \
             throughout them; `floor`: Envoy's own `direct_response` with the same trailers-only \
             UNAVAILABLE; `hanging` (wasm Envoy): no breaker, the hanging upstream, route timeout \
             {HANG_TIMEOUT}.\n",
            o.filter_config
        );
        let _ = writeln!(
            md,
            "| build | listener | saturated throughput (req/s) | proxy CPU per call (µs) | p50 at {} req/s (µs) | p99 (µs) | max (µs) | p50, one call at a time (µs) | p99 (µs) |",
            num(o.rate)
        );
        let _ = writeln!(
            md,
            "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"
        );
        for b in BUILDS {
            for l in OPEN_LISTENERS {
                let v = vname(b, l);
                let _ = writeln!(
                    md,
                    "| {} | `{l}` | {} | {} | {} | {} | {} | {} | {} |",
                    b.name(),
                    show(of(&o.throughput, &v, |r| Some(r.rps)), num),
                    show(of(&o.throughput, &v, |r| r.cpu_us), f1),
                    show(of(&o.latency, &v, |r| r.p50_us), num),
                    show(of(&o.latency, &v, |r| r.p99_us), num),
                    show(of(&o.latency, &v, |r| r.max_us), num),
                    show(of(&o.unloaded, &v, |r| r.p50_us), num),
                    show(of(&o.unloaded, &v, |r| r.p99_us), num),
                );
            }
        }
        let h = &o.hanging;
        let _ = writeln!(
            md,
            "| – | `hanging` (no breaker; {} calls, 100 in flight) | {} | – | {} | {} | {} | – | – |\n",
            o.hanging_requests,
            num(h.rps),
            h.p50_us.map_or("–".into(), num),
            h.p99_us.map_or("–".into(), num),
            h.max_us.map_or("–".into(), num),
        );
        for b in BUILDS {
            let (r, f) = (vname(b, "rejected"), vname(b, "floor"));
            let _ = writeln!(
                md,
                "Ratios per round, {} `rejected` / `floor`: throughput {}, CPU per call {}, p50 {}, p99 {}.",
                b.name(),
                show(ratios(&o.throughput, &r, &f, |r| Some(r.rps)), f3),
                show(ratios(&o.throughput, &r, &f, |r| r.cpu_us), f2),
                show(ratios(&o.latency, &r, &f, |r| r.p50_us), f2),
                show(ratios(&o.latency, &r, &f, |r| r.p99_us), f2),
            );
        }
        let _ = writeln!(
            md,
            "The two floors, native Envoy / wasm Envoy: throughput {}. Without a breaker every call waits \
             for the route timeout: {} of a (wasm) rejected call's p50.\n",
            show(
                ratios(
                    &o.throughput,
                    &vname(Build::Native, "floor"),
                    &vname(Build::Wasm, "floor"),
                    |r| Some(r.rps)
                ),
                f3
            ),
            match (h.p50_us, of(&o.latency, &vname(Build::Wasm, "rejected"), |r| r.p50_us)) {
                (Some(hp), Some(rp)) if rp.median > 0.0 => format!("{}×", num(hp / rp.median)),
                _ => "–".into(),
            }
        );
        let counts: Vec<String> = o
            .counts
            .iter()
            .map(|c| {
                format!(
                    "{}: **{}** while Open, after {} rejected calls ({} before: the call that opened it)",
                    c.build.name(),
                    c.guarded_upstream_rq,
                    num(c.rejected_total as f64),
                    c.tripping_rq
                )
            })
            .collect();
        let _ = writeln!(
            md,
            "Upstream requests: `cluster.guarded.upstream_rq_total` ({}, counted by \
             `circuit_breaker_rejected_calls_total`); the unguarded `cluster.hang.upstream_rq_total` = {}.\n",
            counts.join("; "),
            o.hang_upstream_rq
        );
        let _ = writeln!(md, "What a gRPC client gets (one `GetPost` each):\n");
        for s in &o.sanity {
            let _ = writeln!(md, "- {s}");
        }
        let _ = writeln!(md);
    }

    pub(super) fn contention_section(&self, md: &mut String) {
        let Some(cs) = &self.contention else {
            return;
        };
        let _ = writeln!(
            md,
            "### 4. Contention: 1, 2, 4 Envoy workers on one breaker\n"
        );
        let _ = writeln!(
            md,
            "`envoy/bench.yaml` and `envoy/bench-native.yaml` with N workers each, in the same rounds, \
             not pinned (the {} cores are shared with the load generator and the upstream), 8 \
             connections spread evenly over the workers. Every call goes to one upstream key, so all \
             workers update the same breaker: one shared-data entry (wasm, compare-and-swap), one \
             slot's mutex (native, no retries to count).\n",
            self.machine.nproc
        );
        let _ = writeln!(
            md,
            "| workers | build | `baseline` (req/s) | `ingress` (req/s) | on / off | proxy CPU per call, on (µs) | CAS retries per call | give-ups |"
        );
        let _ = writeln!(md, "| --- | --- | --- | --- | --- | --- | --- | --- |");
        for c in cs {
            for counts in &c.counts {
                let b = counts.build;
                let (on, off) = (vname(b, "ingress"), vname(b, "baseline"));
                let retries = match b {
                    Build::Native => "– (a lock per slot)".to_string(),
                    Build::Wasm if counts.calls > 0 => format!(
                        "{:.4} ({} in {} calls)",
                        counts.cas_retries as f64 / counts.calls as f64,
                        num(counts.cas_retries as f64),
                        num(counts.calls as f64)
                    ),
                    Build::Wasm => "–".to_string(),
                };
                let _ = writeln!(
                    md,
                    "| {} | {} | {} | {} | {} | {} | {retries} | {} |",
                    c.workers,
                    b.name(),
                    show(of(&c.throughput, &off, |r| Some(r.rps)), num),
                    show(of(&c.throughput, &on, |r| Some(r.rps)), num),
                    show(ratios(&c.throughput, &on, &off, |r| Some(r.rps)), f3),
                    show(of(&c.throughput, &on, |r| r.cpu_us), f1),
                    counts.give_ups
                );
            }
        }
        let _ = writeln!(md);
    }

    pub(super) fn memory_section(&self, md: &mut String) {
        let Some(m) = &self.memory else {
            return;
        };
        let _ = writeln!(md, "### 5. Memory\n");
        let _ = writeln!(md, "| | |\n| --- | --- |");
        let _ = writeln!(
            md,
            "| `.wasm` size | {} bytes ({:.0} KiB) |",
            num(m.wasm_bytes as f64),
            m.wasm_bytes as f64 / 1024.0
        );
        let _ = writeln!(
            md,
            "| `libcircuit_breaker.so` size | {} bytes ({:.0} KiB) |",
            num(m.native_bytes as f64),
            m.native_bytes as f64 / 1024.0
        );
        let _ = writeln!(
            md,
            "| shared data per upstream | one slot: {} bytes (the key `{}`, its times, and the state \
             of a count window of 100) under a key of at most {} bytes \
             (`circuit_breaker.v3.<capacity>.<slot>`) |",
            m.state_bytes,
            tenant(0),
            m.state_key_bytes,
        );
        let _ = writeln!(
            md,
            "| the table | {} bytes per empty slot; {} bytes for the {} slots of this run, created \
             when a worker is configured |",
            num(m.index_bytes_1 as f64),
            num(m.index_bytes_many as f64),
            num((MANY_KEYS * 2) as f64)
        );
        let kib = |v: Option<u64>| v.map_or("–".into(), |k| format!("{} KiB", num(k as f64)));
        let _ = writeln!(
            md,
            "| Envoy RSS, wasm build ({} workers), idle after start | {} |",
            m.workers,
            kib(m.rss_idle_kib)
        );
        let _ = writeln!(
            md,
            "| … after {} calls with 1 upstream key | {} |",
            num((MANY_KEYS * m.workers as usize) as f64),
            kib(m.rss_one_kib)
        );
        let _ = writeln!(
            md,
            "| … then {} calls over {} keys | {} ({} breakers tracked, {} calls untracked) |",
            num((MANY_KEYS * m.workers as usize) as f64),
            num(MANY_KEYS as f64),
            kib(m.rss_many_kib),
            num(m.tracked_keys as f64),
            m.untracked
        );
        if let (Some(one), Some(many)) = (m.rss_one_kib, m.rss_many_kib) {
            let per_key = (many as f64 - one as f64) * 1024.0 / (MANY_KEYS - 1) as f64;
            let _ = writeln!(
                md,
                "| RSS per additional upstream key | ≈ {} bytes (everything: shared data, each worker's \
                 registry entry and metric ids, Envoy's stats for the key's metrics) |",
                num(per_key)
            );
        }
        let _ = writeln!(md);
    }

    pub(super) fn hostcalls_section(&self, md: &mut String) {
        let Some(h) = &self.hostcalls else {
            return;
        };
        let _ = writeln!(md, "### 6. What bounds the filter: host calls, priced\n");
        let _ = writeln!(
            md,
            "`harness/benches/hostcall-probe`, a proxy-wasm module that makes one kind of host call {} \
             times per request (chosen by an `x-probe` header), in one Envoy worker pinned to one core \
             (`envoy/bench-hostcalls.yaml`). A call's price is the proxy CPU per request with it minus \
             that with `x-probe: none`, divided by {}, per round. The last columns count the calls the \
             filter makes for one gRPC call through a Closed breaker.\n",
            h.times, h.times
        );
        let _ = writeln!(
            md,
            "| call | µs per call (median, min–max) | hands data back | per filtered call | µs per filtered call |"
        );
        let _ = writeln!(md, "| --- | --- | --- | --- | --- |");
        for (kind, what, (fewest, most), data) in PROBES {
            let price = h.price(kind);
            let count = if fewest == most {
                format!("{fewest}")
            } else {
                format!("{fewest}–{most}")
            };
            let cost = price.map_or("–".into(), |p| {
                let p = p.median.max(0.0);
                if fewest == most {
                    format!("{:.1}", p * fewest)
                } else {
                    format!("{:.1}–{:.1}", p * fewest, p * most)
                }
            });
            let _ = writeln!(
                md,
                "| {what} | {} | {} | {count} | {cost} |",
                show(price, f2),
                if data { "yes" } else { "no" },
            );
        }
        let floor = differences(&h.runs, "none", "baseline", |r| r.cpu_us);
        let (low, high) = h.estimate(None);
        let (sd_low, sd_high) = h.shared_data_work();
        let _ = writeln!(
            md,
            "\nA wasm filter that reads one request header and nothing else (`x-probe: none`) costs {} µs \
             per request over no filter at all (`baseline`): Envoy enters the VM for every callback of \
             every stream (context create, request headers, request body, response headers, log, done, \
             delete), and once more for each host call that hands data back, to allocate it. On top of \
             that floor, the calls above add up to {}–{} µs for one filtered call, of which the \
             shared-data work (reads, write, and the core's decode, decide, encode) is {}–{} µs.\n",
            show(floor, f1),
            low.map_or("–".into(), f1),
            high.map_or("–".into(), f1),
            sd_low.map_or("–".into(), f1),
            sd_high.map_or("–".into(), f1),
        );
    }

    pub(super) fn lds_section(&self, md: &mut String) {
        let Some(l) = &self.lds else {
            return;
        };
        let rounds = l.updates.values().map(Vec::len).max().unwrap_or(0);
        let _ = writeln!(
            md,
            "### 7. LDS update: {LDS_LISTENERS} listeners, with and without `stuck_call_duration`\n"
        );
        let _ = writeln!(
            md,
            "One native Envoy (`envoy/bench-lds.yaml`, one worker, pinned like the proxies above, \
             `--drain-time-s 0`) whose {LDS_LISTENERS} listeners come from LDS on a file, each with the \
             filter and its own filter configuration (`envoy/bench-lds-listener-native.yaml`). An update \
             renames a new file over it that changes every listener's filter configuration \
             (`open_timeout` alternates between 30 s and 31 s): Envoy builds {LDS_LISTENERS} new \
             configurations, drains the old filter chains at once and destroys them with their \
             configurations, on its main thread. It is timed from the rename until the admin's stats show \
             `listener_manager.lds.update_success` counted and nothing warming or draining \
             (`total_listeners_warming`, `total_listeners_draining`, `total_filter_chains_draining` all \
             0), asked every 2 ms (the figure is when that answer arrived). The main thread serves \
             every admin request, so the longest answer during the update is how long it kept the \
             admin waiting. {rounds} rounds, the variants interleaved; before each measured update an \
             unmeasured one puts the variant's configurations in place, and they run for 300 ms.\n"
        );
        let _ = writeln!(
            md,
            "| filter configuration | update of {LDS_LISTENERS} listeners (ms) | longest admin answer during it (ms) | admin answer before it (ms) | filter chains / listeners seen draining |"
        );
        let _ = writeln!(md, "| --- | --- | --- | --- | --- |");
        for (name, config) in &l.configs {
            let ups = l.updates.get(name).map(Vec::as_slice).unwrap_or_default();
            let chains = ups.iter().map(|u| u.chains_draining).max().unwrap_or(0);
            let listeners = ups.iter().map(|u| u.listeners_draining).max().unwrap_or(0);
            let _ = writeln!(
                md,
                "| {name}: `{config}` | {} | {} | {} | up to {chains} / {listeners} |",
                show(l.of(name, |u| u.ms), f1),
                show(l.of(name, |u| u.admin_max_ms), f1),
                show(l.of(name, |u| u.admin_idle_ms), f2),
            );
        }
        let _ = writeln!(
            md,
            "\n| with / without (per round, then median) | update | longest admin answer |\n| --- | --- | --- |"
        );
        let _ = writeln!(
            md,
            "| `stuck_call_duration: {STUCK_CALL_DURATION}` / none | {} | {} |\n",
            show(l.ratio(|u| u.ms), f2),
            show(l.ratio(|u| u.admin_max_ms), f2),
        );
        let old_max = LDS_LISTENERS as f64 * OLD_TICK_MS;
        let _ = writeln!(
            md,
            "Goal: with / without ≈ 1 (the teardown waits for no sleep). Before the module's clock was \
             shared, each configuration with `stuck_call_duration` had a ticker thread of its own, \
             asleep for up to {OLD_TICK_MS:.0} ms, which dropping the configuration joined: the \
             `{}` update would have added {LDS_LISTENERS} × up to {OLD_TICK_MS:.0} ms = up to \
             {old_max:.0} ms (about {:.0} ms on average) on the main thread.\n",
            LDS_VARIANTS[1].0,
            old_max / 2.0
        );
    }
}
