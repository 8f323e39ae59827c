//! Section 3: the core's call, from the criterion benches `make bench` runs before the Envoy phases.

use std::fmt::Write as _;

use super::super::stats::{CORE_FUNCTIONS, INTERLEAVED};
use super::{f1, f3, show, Report};

/// What each row of the breakers table is.
const WHAT: [(&str, &str); 4] = [
    (
        "core",
        "the wasm build's store: shared data (here in memory): read, decode, decide, encode, compare-and-swap",
    ),
    (
        "core_native",
        "the native build's store: the process-wide table, a mutex per slot, no encoding",
    ),
    ("failsafe", "`failsafe::CircuitBreaker::call`, a `parking_lot` mutex"),
    ("recloser", "`recloser::Recloser::call`, atomics and a ring buffer"),
];

impl Report<'_> {
    pub(super) fn core_section(&self, md: &mut String) {
        let _ = writeln!(md, "### 3. Core: admit + record against other breakers\n");
        if self.core.figures.is_empty() {
            let _ = writeln!(
                md,
                "Not measured: no criterion results under `{}` (`make bench` runs \
                 `cargo bench -p circuit-breaker-harness --bench breakers` and \
                 `cargo bench -p circuit-breaker-core --bench admit_record` first).\n",
                self.opts.criterion.display()
            );
            return;
        }
        let _ = writeln!(
            md,
            "`harness/benches/breakers.rs` (criterion; ns per call: median, min–max over its samples). \
             `core` and `core_native` are one admit + one record of a success by the core worker, as \
             each build does per call, over each build's store; `failsafe` and `recloser` call through \
             their breaker with a closure that succeeds. With 2 threads, both race on one breaker; the \
             figure is the time per call on each thread.\n"
        );
        let _ = writeln!(
            md,
            "| | store | 1 thread (ns/call) | 2 threads racing (ns/call) | vs failsafe, 1 thread |"
        );
        let _ = writeln!(md, "| --- | --- | --- | --- | --- |");
        let failsafe = self.core.get("breakers_1_thread", "failsafe");
        for f in CORE_FUNCTIONS {
            let one = self.core.get("breakers_1_thread", f);
            let what = WHAT
                .iter()
                .find(|(name, _)| *name == f)
                .map_or("", |(_, w)| w);
            let _ = writeln!(
                md,
                "| `{f}` | {what} | {} | {} | {} |",
                show(one, f1),
                show(self.core.get("breakers_2_threads", f), f1),
                ratio(one.map(|s| s.median), failsafe.map(|s| s.median), "×"),
            );
        }
        let (shared, local) = (
            self.core.get("breakers_1_thread", "core"),
            self.core.get("breakers_1_thread", "core_native"),
        );
        let _ = writeln!(
            md,
            "\nInterleaved on one thread (rounds of 20,000 calls of each, the order alternating, so a \
             change in the machine's speed hits both alike): `core_native` / `failsafe` per round {}.",
            show(self.core.round_ratio(INTERLEAVED[0]), |x| format!("{x:.2}×")),
        );
        let _ =
            writeln!(
            md,
            "The native store against the shared-data layout, the same call in the same run: {} \
             (1 thread), {} (2 threads racing).\n",
            ratio(local.map(|s| s.median), shared.map(|s| s.median), "×"),
            ratio(
                self.core
                    .get("breakers_2_threads", "core_native")
                    .map(|s| s.median),
                self.core.get("breakers_2_threads", "core").map(|s| s.median),
                "×"
            ),
        );
        self.globs_table(md);
    }

    /// `filter/core/benches/admit_record.rs`: the same call, and the cost of many glob overrides.
    fn globs_table(&self, md: &mut String) {
        let get = |f: &str| self.core.get("admit_record", f);
        if ["shared_data", "local", "globs_1", "globs_10000"]
            .iter()
            .all(|f| get(f).is_none())
        {
            return;
        }
        let _ = writeln!(
            md,
            "`filter/core/benches/admit_record.rs`: the core worker's admit + record of a success, \
             Closed, one key. `globs_1` and `globs_10000`: the native store under a configuration with \
             one glob override or ten thousand, none matching the key (a key's settings are resolved \
             once per worker and kept, so a call must not pay for the globs).\n"
        );
        let _ = writeln!(md, "| | ns per call (median, min–max) |");
        let _ = writeln!(md, "| --- | --- |");
        for f in ["shared_data", "local", "globs_1", "globs_10000"] {
            let _ = writeln!(md, "| `admit_record/{f}` | {} |", show(get(f), f1));
        }
        let _ = writeln!(
            md,
            "\n10,000 globs / 1 glob: {} from criterion's medians (measured seconds apart); {} per round \
             of the interleaved runs (rounds of 20,000 calls of each, the order alternating).\n",
            ratio(
                get("globs_10000").map(|s| s.median),
                get("globs_1").map(|s| s.median),
                ""
            ),
            show(self.core.round_ratio(INTERLEAVED[1]), f3),
        );
    }
}

/// `a / b` to two decimals with `unit` after it, or `–`.
fn ratio(a: Option<f64>, b: Option<f64>, unit: &str) -> String {
    match (a, b) {
        (Some(a), Some(b)) if b > 0.0 => format!("{:.2}{unit}", a / b),
        _ => "–".into(),
    }
}
