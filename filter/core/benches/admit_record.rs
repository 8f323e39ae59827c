//! What the breaker costs a call: one `admit` and one `record` through the store, as the filter does per
//! request (decode, decide, encode, compare-and-swap).
//!
//! - `admit_record/closed_1_worker`: one worker, Closed state, default configuration (count window of
//!   100), in-memory store. The baseline per request.
//! - `admit_record/closed_2_threads_one_key`: two OS threads, each its own registry as each Envoy
//!   worker has, racing on the same key. Measured with `iter_custom`: one iteration is one
//!   admit+record on *each* thread, timed from a common start to the last thread's end, so the time
//!   shown is the per-call latency under contention and the throughput (2 elements per iteration) is
//!   the aggregate. CAS retries and give-ups are counted and printed at the end.
//!
//! `cargo bench -p circuit-breaker-core --bench admit_record`. Native only: criterion is not a wasm
//! dev-dependency, so on wasm this is an empty program.

#[cfg(not(target_arch = "wasm32"))]
mod native {
    use std::hint::black_box;
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::sync::{Arc, Barrier};
    use std::time::{Duration, Instant};

    use cb_core::classify::{Classification, Outcome};
    use cb_core::config::BreakerConfig;
    use cb_core::registry::{Admission, Registry};
    use cb_core::store::MemoryStore;
    use criterion::{Criterion, Throughput};

    const KEY: &str = "outbound|8080||content.default.svc.cluster.local";
    const OK: Classification = Classification {
        outcome: Outcome::Success,
        slow: false,
    };

    /// A store with the index created and `KEY` registered, as after the first call.
    fn store(cfg: &BreakerConfig) -> MemoryStore {
        let store = MemoryStore::new();
        let _ = Registry::ensure_index(&store);
        let _ = Registry::new(1024).admit(&store, KEY, cfg, 0);
        store
    }

    /// One call's worth of breaker work. Returns false when the call was not let through (which a
    /// default configuration fed only successes never does; counted so the figures can be trusted).
    fn call(
        registry: &mut Registry,
        store: &MemoryStore,
        cfg: &BreakerConfig,
        now_ms: u64,
        contention: &Contention,
    ) -> bool {
        let admitted = registry.admit(store, KEY, cfg, now_ms);
        contention.note(admitted.attempts, false);
        let Admission::Allow(ticket) = admitted.admission else {
            return false;
        };
        let recorded = black_box(registry.record(store, KEY, cfg, ticket, now_ms, OK));
        contention.note(recorded.attempts, recorded.error.is_some());
        true
    }

    #[derive(Default)]
    struct Contention {
        ops: AtomicU64,
        retries: AtomicU64,
        give_ups: AtomicU64,
        not_allowed: AtomicU64,
    }

    impl Contention {
        fn note(&self, attempts: u32, gave_up: bool) {
            self.ops.fetch_add(1, Ordering::Relaxed);
            self.retries
                .fetch_add(u64::from(attempts.saturating_sub(1)), Ordering::Relaxed);
            self.give_ups
                .fetch_add(u64::from(gave_up), Ordering::Relaxed);
        }

        fn report(&self, name: &str) {
            let ops = self.ops.load(Ordering::Relaxed).max(1);
            let retries = self.retries.load(Ordering::Relaxed);
            println!(
                "{name}: {ops} store updates, {retries} CAS retries ({:.3} per update), {} give-ups, {} calls not let through",
                retries as f64 / ops as f64,
                self.give_ups.load(Ordering::Relaxed),
                self.not_allowed.load(Ordering::Relaxed),
            );
        }
    }

    pub fn closed_1_worker(c: &mut Criterion) {
        let cfg = BreakerConfig::default();
        let store = store(&cfg);
        let mut registry = Registry::new(1024);
        let contention = Contention::default();
        let mut now_ms = 0u64;
        let mut group = c.benchmark_group("admit_record");
        group.throughput(Throughput::Elements(1));
        group.bench_function("closed_1_worker", |b| {
            b.iter(|| {
                now_ms += 1;
                if !call(&mut registry, &store, &cfg, now_ms, &contention) {
                    contention.not_allowed.fetch_add(1, Ordering::Relaxed);
                }
            })
        });
        group.finish();
        contention.report("closed_1_worker");
    }

    pub fn closed_2_threads_one_key(c: &mut Criterion) {
        const THREADS: u64 = 2;
        let cfg = Arc::new(BreakerConfig::default());
        let store = Arc::new(store(&cfg));
        let contention = Arc::new(Contention::default());
        let mut group = c.benchmark_group("admit_record");
        group.throughput(Throughput::Elements(THREADS));
        group.bench_function("closed_2_threads_one_key", |b| {
            b.iter_custom(|iters| {
                let start = Arc::new(Barrier::new(THREADS as usize + 1));
                let threads: Vec<_> = (0..THREADS)
                    .map(|_| {
                        let (cfg, store, contention, start) = (
                            Arc::clone(&cfg),
                            Arc::clone(&store),
                            Arc::clone(&contention),
                            Arc::clone(&start),
                        );
                        std::thread::spawn(move || {
                            let mut registry = Registry::new(1024);
                            start.wait();
                            for i in 0..iters {
                                if !call(&mut registry, &store, &cfg, i, &contention) {
                                    contention.not_allowed.fetch_add(1, Ordering::Relaxed);
                                }
                            }
                        })
                    })
                    .collect();
                start.wait();
                let began = Instant::now();
                let mut elapsed = Duration::ZERO;
                for t in threads {
                    // A thread that panicked did less work; the counters above would show it.
                    let _ = t.join();
                    elapsed = began.elapsed();
                }
                elapsed
            })
        });
        group.finish();
        contention.report("closed_2_threads_one_key");
    }
}

#[cfg(not(target_arch = "wasm32"))]
criterion::criterion_group!(
    benches,
    native::closed_1_worker,
    native::closed_2_threads_one_key
);
#[cfg(not(target_arch = "wasm32"))]
criterion::criterion_main!(benches);

#[cfg(target_arch = "wasm32")]
fn main() {}
