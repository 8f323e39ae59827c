//! What the breaker costs a call, measured on the core worker as every host drives it: one `admit` and
//! one `record` of a success, Closed, default configuration.
//!
//! - `admit_record/shared_data`: through shared data in memory, as the wasm filter stores breakers
//!   (decode, decide, encode, compare-and-swap).
//! - `admit_record/local`: through the process-wide table, as the native module stores them (a lock
//!   per breaker, no encoding).
//! - `admit_record/globs_1` and `admit_record/globs_10000`: the same call under a configuration with
//!   one glob override or ten thousand (none matching the key): a key's settings are resolved once per
//!   worker and kept, so the two must cost the same.
//!
//! Criterion measures one function after the other, and on a shared machine the speed of a core moves
//! by half between seconds, so two functions measured a few seconds apart differ by more than what
//! tells them apart. The two glob configurations are therefore also measured interleaved: rounds of
//! a block of calls on each, the order alternating, written as ns per call per round to
//! `<target>/criterion/admit_record/globs_interleaved.json` (`[[1 glob, 10,000 globs], ...]`), from
//! which `make bench` reports the per-round ratio.
//!
//! `cargo bench -p circuit-breaker-core --bench admit_record`. Native only: criterion is not a wasm
//! dev-dependency, so on wasm this is an empty program.

#[cfg(not(target_arch = "wasm32"))]
#[path = "support/rounds.rs"]
mod rounds;

#[cfg(not(target_arch = "wasm32"))]
mod native {
    use super::rounds::{interleaved, write_rounds};
    use std::hint::black_box;
    use std::sync::Arc;

    use cb_core::classify::{Classification, Outcome};
    use cb_core::config::FilterConfig;
    use cb_core::host::Bare;
    use cb_core::store::{BreakerStore, LocalStore, MemoryStore, SharedData};
    use cb_core::telemetry::Discard;
    use cb_core::worker::{Admission, Worker};
    use criterion::{Criterion, Throughput};

    const KEY: &str = "outbound|8080||content.default.svc.cluster.local";
    const OK: Classification = Classification {
        outcome: Outcome::Success,
        slow: false,
    };

    fn worker<S: BreakerStore>(config: FilterConfig, store: S) -> Worker<S> {
        let mut w = Worker::new(Arc::new(config), 0, store, 0);
        let _ = w.prepare();
        w
    }

    /// One call's worth of breaker work.
    fn call<S: BreakerStore>(w: &mut Worker<S>, now_ms: u64) {
        let mut host = Bare {
            now_ms,
            telemetry: Discard,
        };
        if let Admission::Allow(c) = w.admit(KEY, &mut host) {
            w.record(c, OK, now_ms, &mut Discard);
        }
        black_box(w);
    }

    fn globs(n: usize) -> FilterConfig {
        let upstreams: serde_json::Map<String, serde_json::Value> = (0..n)
            .map(|i| {
                (
                    format!("*tenant-{i}-*"),
                    serde_json::json!({"failure_threshold": 3}),
                )
            })
            .collect();
        FilterConfig::from_value(serde_json::json!({ "upstreams": upstreams })).unwrap_or_default()
    }

    pub fn admit_record(c: &mut Criterion) {
        let mut group = c.benchmark_group("admit_record");
        group.throughput(Throughput::Elements(1));
        let memory = MemoryStore::new();
        let mut shared = worker(FilterConfig::default(), SharedData::new(&memory, 1024));
        let mut now = 0u64;
        group.bench_function("shared_data", |b| {
            b.iter(|| {
                now += 1;
                call(&mut shared, now)
            })
        });
        let table = LocalStore::new(1024);
        let mut local = worker(FilterConfig::default(), &table);
        group.bench_function("local", |b| {
            b.iter(|| {
                now += 1;
                call(&mut local, now)
            })
        });
        let (one_table, many_table) = (LocalStore::new(1024), LocalStore::new(1024));
        let mut one = worker(globs(1), &one_table);
        let mut many = worker(globs(10_000), &many_table);
        for (name, w) in [("globs_1", &mut one), ("globs_10000", &mut many)] {
            group.bench_function(name, |b| {
                b.iter(|| {
                    now += 1;
                    call(w, now)
                })
            });
        }
        group.finish();
        let clock = std::cell::Cell::new(now);
        let tick = || {
            clock.set(clock.get() + 1);
            clock.get()
        };
        let rounds = interleaved(|| call(&mut one, tick()), || call(&mut many, tick()));
        write_rounds("admit_record/globs_interleaved.json", &rounds);
    }
}

#[cfg(not(target_arch = "wasm32"))]
criterion::criterion_group!(benches, native::admit_record);
#[cfg(not(target_arch = "wasm32"))]
criterion::criterion_main!(benches);

#[cfg(target_arch = "wasm32")]
fn main() {}
