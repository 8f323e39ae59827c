//! The breaker core against two in-process circuit-breaker crates, in one run (issue 6, part 3).
//!
//! One "call" is what each library does around a successful call:
//! - `core`: the core worker's `admit` + `record(Success)` through shared data in memory
//!   ([`MemoryStore`]), as the wasm filter does per request: read the shared bytes, decode, decide,
//!   encode, compare-and-swap. Default configuration (count window of 100), Closed, one upstream.
//! - `core_native`: the same through the process-wide [`LocalStore`], as the native module does: a
//!   lock per breaker, no encoding.
//! - `failsafe`: `CircuitBreaker::call` with a closure that succeeds (`Config::new().build()`: a
//!   `parking_lot` mutex around the state and its policy).
//! - `recloser`: `Recloser::call` with a closure that succeeds (`Recloser::default()`: atomics and a
//!   ring buffer of 100 calls).
//!
//! Groups:
//! - `breakers_1_thread`: one thread, ns per call.
//! - `breakers_2_threads`: two OS threads racing on one shared breaker (for the core: one store, a
//!   registry per thread, as each Envoy worker has its own). One iteration is one call on *each*
//!   thread, timed from a common start to the last thread's end: the time shown is the per-call
//!   latency under contention.
//!
//! Criterion measures one function after the other, and on a shared machine the speed of a core moves
//! by half between seconds, so two functions measured a few seconds apart differ by more than what
//! tells them apart. `core_native` and `failsafe` are therefore also measured interleaved, on one
//! thread: rounds of a block of calls on each, the order alternating, written as ns per call per round
//! to `<target>/criterion/breakers_1_thread/native_vs_failsafe.json` (`[[failsafe, core_native],
//! ...]`), from which `make bench` reports the per-round ratio.
//!
//! `cargo bench -p circuit-breaker-harness --bench breakers` (`make bench` runs it and reports it in
//! BENCHMARKS.md).

use std::hint::black_box;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

use cb_core::classify::{Classification, Outcome};
use cb_core::config::FilterConfig;
use cb_core::host::Bare;
use cb_core::store::{BreakerStore, LocalStore, MemoryStore, SharedData};
use cb_core::telemetry::{Event, Level, Series, StoreEvent, Telemetry, Upstream};
use cb_core::worker::{Admission, Worker};
use criterion::{criterion_group, criterion_main, Criterion, Throughput};

// The interleaved rounds, shared with the core's admit_record bench.
#[path = "../../filter/core/benches/support/rounds.rs"]
mod rounds;
use rounds::{interleaved, write_rounds};

const KEY: &str = "outbound|8080||content.default.svc.cluster.local";
const OK: Classification = Classification {
    outcome: Outcome::Success,
    slow: false,
};

/// Calls each library did not let through: printed at the end, and 0 unless a breaker misbehaved
/// under the race.
static CORE_ANOMALIES: AtomicU64 = AtomicU64::new(0);
static FAILSAFE_ANOMALIES: AtomicU64 = AtomicU64::new(0);
static RECLOSER_ANOMALIES: AtomicU64 = AtomicU64::new(0);
/// The core's store under the race: compare-and-swap attempts lost and retried (shared data only),
/// and updates given up after [`cb_core::store::MAX_CAS_ATTEMPTS`] lost races or outcomes lost
/// otherwise (each one an outcome the breaker did not count).
static CORE_RETRIES: AtomicU64 = AtomicU64::new(0);
static CORE_GIVEN_UP: AtomicU64 = AtomicU64::new(0);

/// The metrics sink of a benchmark: counts what the breaker would report, and formats nothing.
struct Quiet;

impl Telemetry for Quiet {
    fn add(&mut self, _: &Series<'_>, _: u64) {}
    fn set(&mut self, _: &Series<'_>, _: u64) {}
    fn log(&mut self, _: Level, _: &str) {}
    fn event(&mut self, _: Upstream<'_>, event: &Event) {
        match event {
            Event::Store(StoreEvent::Retries(n)) => {
                CORE_RETRIES.fetch_add(u64::from(*n), Ordering::Relaxed);
            }
            Event::Store(StoreEvent::Failed { .. } | StoreEvent::OutcomeLost(_)) => {
                CORE_GIVEN_UP.fetch_add(1, Ordering::Relaxed);
            }
            _ => {}
        }
    }
}

/// One worker of the core, as each Envoy worker (or VM) has, over store `S`.
struct CoreWorker<S> {
    worker: Worker<S>,
    now_ms: u64,
}

impl<S: BreakerStore> CoreWorker<S> {
    fn new(store: S) -> Self {
        let mut worker = Worker::new(Arc::new(FilterConfig::default()), 0, store, 0);
        let _ = worker.prepare();
        Self { worker, now_ms: 1 }
    }

    fn call(&mut self) {
        self.now_ms += 1;
        let mut host = Bare {
            now_ms: self.now_ms,
            telemetry: Quiet,
        };
        let Admission::Allow(call) = self.worker.admit(KEY, &mut host) else {
            CORE_ANOMALIES.fetch_add(1, Ordering::Relaxed);
            return;
        };
        self.worker.record(call, OK, self.now_ms, &mut Quiet);
        black_box(&self.worker);
    }
}

fn shared_data(store: &Arc<MemoryStore>) -> SharedData<Arc<MemoryStore>> {
    SharedData::new(Arc::clone(store), 1024)
}

fn failsafe_call(cb: &impl failsafe::CircuitBreaker) {
    if cb.call(|| Ok::<u32, ()>(black_box(1))).is_err() {
        FAILSAFE_ANOMALIES.fetch_add(1, Ordering::Relaxed);
    }
}

fn recloser_call(r: &recloser::Recloser) {
    if r.call(|| Ok::<u32, ()>(black_box(1))).is_err() {
        RECLOSER_ANOMALIES.fetch_add(1, Ordering::Relaxed);
    }
}

fn one_thread(c: &mut Criterion) {
    let mut group = c.benchmark_group("breakers_1_thread");
    group.throughput(Throughput::Elements(1));

    let store = Arc::new(MemoryStore::new());
    let mut worker = CoreWorker::new(shared_data(&store));
    group.bench_function("core", |b| b.iter(|| worker.call()));

    let table = Arc::new(LocalStore::new(1024));
    let mut native = CoreWorker::new(Arc::clone(&table));
    group.bench_function("core_native", |b| b.iter(|| native.call()));

    let failsafe = failsafe::Config::new().build();
    group.bench_function("failsafe", |b| b.iter(|| failsafe_call(&failsafe)));

    let recloser = recloser::Recloser::default();
    group.bench_function("recloser", |b| b.iter(|| recloser_call(&recloser)));

    group.finish();
    let rounds = interleaved(|| failsafe_call(&failsafe), || native.call());
    write_rounds("breakers_1_thread/native_vs_failsafe.json", &rounds);
}

/// Runs `iters` calls on each of `THREADS` threads from a common start; the time until the last one
/// ends. `worker(i)` makes thread `i`'s call function.
fn race<F>(iters: u64, worker: impl Fn() -> F) -> Duration
where
    F: FnMut() + Send + 'static,
{
    const THREADS: usize = 2;
    let start = Arc::new(Barrier::new(THREADS + 1));
    let threads: Vec<_> = (0..THREADS)
        .map(|_| {
            let mut call = worker();
            let start = Arc::clone(&start);
            std::thread::spawn(move || {
                start.wait();
                for _ in 0..iters {
                    call();
                }
            })
        })
        .collect();
    start.wait();
    let began = Instant::now();
    for t in threads {
        // A thread that panicked did less work; the bench's output shows the panic.
        let _ = t.join();
    }
    began.elapsed()
}

fn two_threads(c: &mut Criterion) {
    let mut group = c.benchmark_group("breakers_2_threads");
    group.throughput(Throughput::Elements(2));

    let store = Arc::new(MemoryStore::new());
    group.bench_function("core", |b| {
        b.iter_custom(|iters| {
            race(iters, || {
                let mut worker = CoreWorker::new(shared_data(&store));
                move || worker.call()
            })
        })
    });

    let table = Arc::new(LocalStore::new(1024));
    group.bench_function("core_native", |b| {
        b.iter_custom(|iters| {
            race(iters, || {
                let mut worker = CoreWorker::new(Arc::clone(&table));
                move || worker.call()
            })
        })
    });

    let failsafe = failsafe::Config::new().build();
    group.bench_function("failsafe", |b| {
        b.iter_custom(|iters| {
            race(iters, || {
                let cb = failsafe.clone();
                move || failsafe_call(&cb)
            })
        })
    });

    let recloser = Arc::new(recloser::Recloser::default());
    group.bench_function("recloser", |b| {
        b.iter_custom(|iters| {
            race(iters, || {
                let r = Arc::clone(&recloser);
                move || recloser_call(&r)
            })
        })
    });

    group.finish();
    println!(
        "calls not let through: core {}, failsafe {}, recloser {}; the core's store: {} CAS retries, {} updates given up or outcomes lost",
        CORE_ANOMALIES.load(Ordering::Relaxed),
        FAILSAFE_ANOMALIES.load(Ordering::Relaxed),
        RECLOSER_ANOMALIES.load(Ordering::Relaxed),
        CORE_RETRIES.load(Ordering::Relaxed),
        CORE_GIVEN_UP.load(Ordering::Relaxed)
    );
}

criterion_group!(benches, one_thread, two_threads);
criterion_main!(benches);
