//! Property tests for the core's invariants (STYLE.md, habit 8):
//!
//! - the codec round-trips every breaker the state machine can reach, and no bytes make it (or the
//!   slot decoder) panic;
//! - HalfOpen never has more probe permits out than `half_open_max_requests`, whatever the interleaving
//!   of admit, record and release across workers;
//! - no outcome is lost: every recorded outcome is in the window, in order;
//! - a rejected call leaves no trace, and an outcome can only move the breaker with a ticket of the
//!   current generation;
//! - `FilterConfig::from_json` never panics, and what it accepts is safe to run.
//!
//! Native only: proptest is not a wasm dev-dependency. Case counts are kept modest so the suite runs
//! in a few seconds; `PROPTEST_CASES=10000` digs deeper.
#![cfg(not(target_arch = "wasm32"))]
// The whole file is test code: clippy.toml allows these in `#[test]` functions, and the helpers below
// are only there to keep those functions short.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

use cb_core::breaker::Transition;
use cb_core::breaker::{Breaker, BreakerState, Decision, Ticket};
use cb_core::classify::{Classification, Outcome};
use cb_core::codec;
use cb_core::config::{BreakerConfig, FilterConfig, Mode, WindowConfig};
use cb_core::registry::{self, Admitted, Moment};
use cb_core::store::{BreakerStore, MemoryStore, SharedData, SharedStore, SlotRead};
use cb_core::window::TIME_BUCKETS;
use proptest::prelude::*;
use serde_json::{Map, Number, Value};

const KEY: &str = "outbound|8080||content.svc";

fn cases(n: u32) -> ProptestConfig {
    // An explicit PROPTEST_CASES wins, so a long run needs no code change.
    let n = std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(n);
    ProptestConfig {
        cases: n,
        ..ProptestConfig::default()
    }
}

// ---------------------------------------------------------------------------------------------------
// Strategies
// ---------------------------------------------------------------------------------------------------

fn window_config() -> impl Strategy<Value = WindowConfig> {
    prop_oneof![
        prop_oneof![1u16..=8, 1u16..=1024].prop_map(WindowConfig::Count),
        prop_oneof![Just(1_000u64), 1_000u64..=3_600_000]
            .prop_map(|duration_ms| WindowConfig::Time { duration_ms }),
    ]
}

fn ppm() -> impl Strategy<Value = u32> {
    prop_oneof![Just(1_000_000u32), Just(500_000), 1u32..=1_000_000]
}

/// Breaker settings as validation would let them through: max_open_timeout ≥ open_timeout, and
/// minimum_requests within a count window. Short open times, so random time steps reach HalfOpen.
fn breaker_config(modes: &'static [Mode]) -> impl Strategy<Value = BreakerConfig> {
    let triggers = (
        window_config(),
        0u32..=6,
        ppm(),
        1u32..=30,
        prop::option::of(1u64..=400),
        ppm(),
    );
    let timing = (
        1u64..=1_500,
        0u64..=5_000,
        1.0f64..=4.0,
        1u16..=4,
        1u16..=4,
        prop::sample::select(modes),
    );
    (triggers, timing).prop_map(
        |((window, failure_threshold, error_ppm, min, slow, slow_ppm), timing)| {
            let (open, extra, backoff_multiplier, half_open_max_requests, success_threshold, mode) =
                timing;
            let minimum_requests = match window {
                WindowConfig::Count(n) => min.min(u32::from(n)),
                WindowConfig::Time { .. } => min,
            };
            BreakerConfig {
                failure_threshold,
                error_rate_threshold_ppm: error_ppm,
                window,
                minimum_requests,
                slow_call_duration_ms: slow,
                slow_call_rate_threshold_ppm: slow_ppm,
                open_timeout_ms: open,
                backoff_multiplier,
                max_open_timeout_ms: open + extra,
                half_open_max_requests,
                success_threshold,
                mode,
                ..BreakerConfig::default()
            }
        },
    )
}

const ALL_TRACKING_MODES: &[Mode] = &[Mode::Enforce, Mode::DryRun, Mode::ForcedOpen];
const ENFORCE_OR_DRY_RUN: &[Mode] = &[Mode::Enforce, Mode::DryRun];

fn classification() -> impl Strategy<Value = Classification> {
    let outcome = prop_oneof![4 => Just(Outcome::Success), 4 => Just(Outcome::Failure), 1 => Just(Outcome::Ignored)];
    (outcome, any::<bool>()).prop_map(|(outcome, slow)| Classification { outcome, slow })
}

/// Mostly small steps (calls close together), sometimes long ones (past an open time, out of a window).
fn step() -> impl Strategy<Value = u64> {
    prop_oneof![4 => 0u64..=5, 2 => 0u64..=400, 1 => 0u64..=5_000]
}

/// One thing a worker does. `pick` chooses among the outstanding tickets (modulo their number).
#[derive(Debug, Clone)]
enum Op {
    Admit {
        worker: usize,
        dt: u64,
    },
    Record {
        pick: usize,
        outcome: Classification,
        dt: u64,
    },
    Release {
        pick: usize,
        dt: u64,
    },
}

impl Op {
    /// Time that passes before this step.
    fn dt(&self) -> u64 {
        match *self {
            Op::Admit { dt, .. } | Op::Record { dt, .. } | Op::Release { dt, .. } => dt,
        }
    }
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        5 => (0usize..4, step()).prop_map(|(worker, dt)| Op::Admit { worker, dt }),
        5 => (any::<usize>(), classification(), step()).prop_map(|(pick, outcome, dt)| Op::Record { pick, outcome, dt }),
        1 => (any::<usize>(), step()).prop_map(|(pick, dt)| Op::Release { pick, dt }),
    ]
}

fn ops(max: usize) -> impl Strategy<Value = Vec<Op>> {
    prop::collection::vec(op(), 0..max)
}

fn take(tickets: &mut Vec<Ticket>, pick: usize) -> Option<Ticket> {
    (!tickets.is_empty()).then(|| tickets.swap_remove(pick % tickets.len()))
}

// ---------------------------------------------------------------------------------------------------
// Helpers over the store
// ---------------------------------------------------------------------------------------------------

/// How long a breaker must idle to be evicted: never, in these tests.
const IDLE: u64 = u64::MAX;

/// One worker's handle on the table.
type Table<'a> = SharedData<&'a MemoryStore>;

/// A table with `workers` handles on it, prepared as after every worker's configuration, and the slot
/// that holds [`KEY`].
fn world<'a>(store: &'a MemoryStore, workers: usize, cfg: &BreakerConfig) -> (Vec<Table<'a>>, u32) {
    let mut tables: Vec<Table<'a>> = (0..workers).map(|_| SharedData::new(store, 16)).collect();
    tables[0].prepare().unwrap();
    let slot = registry::locate(&mut tables[0], KEY, cfg, 0, IDLE, 0)
        .unwrap()
        .slot;
    (tables, slot)
}

/// The moment `now`, under the tests' idle timeout, with no jitter drawn.
fn at(now: u64) -> Moment {
    Moment {
        now_ms: now,
        idle_timeout_ms: IDLE,
        shaped_ms: 0,
        entropy: 0,
    }
}

fn admit(t: &mut Table<'_>, slot: u32, cfg: &BreakerConfig, now: u64) -> Admitted {
    registry::admit(t, slot, KEY, cfg, at(now))
        .unwrap()
        .value
        .unwrap()
}

/// What a record did: `Err(())` when the slot was no longer the key's.
type Recorded = Result<Option<Transition>, ()>;

fn record(
    t: &mut Table<'_>,
    slot: u32,
    cfg: &BreakerConfig,
    ticket: Ticket,
    now: u64,
    c: Classification,
) -> Recorded {
    registry::record(t, slot, KEY, cfg, ticket, c, at(now))
        .unwrap()
        .value
        .ok_or(())
}

/// A call that ended with nothing to judge: its probe permit goes back.
const IGNORED: Classification = Classification {
    outcome: Outcome::Ignored,
    slow: false,
};

fn stored(store: &MemoryStore, slot: u32) -> Option<(Vec<u8>, u32)> {
    store
        .get(&SharedData::new(store, 16).slot_key(slot))
        .unwrap()
}

fn breaker(store: &MemoryStore, slot: u32) -> Option<Breaker> {
    match SharedData::new(store, 16).read(slot).unwrap() {
        SlotRead::Held(s) => Some(s.breaker),
        _ => None,
    }
}

// ---------------------------------------------------------------------------------------------------
// Codec
// ---------------------------------------------------------------------------------------------------

proptest! {
    #![proptest_config(cases(256))]

    /// Every breaker the state machine reaches, through any sequence of admits, records and releases
    /// on any configuration and either window kind, encodes and decodes to itself.
    #[test]
    fn codec_round_trips_every_reachable_breaker(cfg in breaker_config(ALL_TRACKING_MODES), ops in ops(120)) {
        let mut b = Breaker::new(&cfg);
        let mut tickets = Vec::new();
        let mut now = 0u64;
        prop_assert_eq!(codec::decode(&codec::encode(&b)), Ok(b.clone()));
        for op in ops {
            match op {
                Op::Admit { dt, .. } => {
                    now += dt;
                    if let (Decision::Allow(t), _) = b.admit(&cfg, now, 0) {
                        tickets.push(t);
                    }
                }
                Op::Record { pick, outcome, dt } => {
                    now += dt;
                    if let Some(t) = take(&mut tickets, pick) {
                        b.record(&cfg, t, now, outcome, 0);
                    }
                }
                Op::Release { pick, dt } => {
                    now += dt;
                    if let Some(t) = take(&mut tickets, pick) {
                        b.record(&cfg, t, now, IGNORED, 0);
                    }
                }
            }
            let bytes = codec::encode(&b);
            prop_assert_eq!(codec::decode(&bytes), Ok(b.clone()), "{:?}", b.state);
        }
    }

    /// Arbitrary bytes never panic either decoder; whatever decodes re-encodes to something that decodes
    /// to the same breaker.
    #[test]
    fn random_bytes_never_panic_the_decoders(bytes in prop::collection::vec(any::<u8>(), 0..400)) {
        if let Ok(b) = codec::decode(&bytes) {
            prop_assert_eq!(codec::decode(&codec::encode(&b)), Ok(b));
        }
        if let Ok(slot) = codec::decode_slot(&bytes) {
            prop_assert_eq!(codec::decode_slot(&codec::encode_slot(slot.as_ref())), Ok(slot));
        }
    }

    /// Valid encodings with a few bytes changed, cut or added (what a torn or foreign write looks like)
    /// never panic the decoder, and a breaker that still decodes is safe to run: admit, record and
    /// release on it do not panic either.
    #[test]
    fn damaged_state_never_panics_and_what_decodes_is_safe_to_run(
        cfg in breaker_config(ALL_TRACKING_MODES),
        ops in ops(40),
        damage in prop::collection::vec((any::<usize>(), any::<u8>()), 1..4),
        // Mostly same-length damage, so that a good share still decodes and gets run.
        cut in prop::option::weighted(0.1, any::<usize>()),
        extra in prop::option::weighted(0.1, prop::collection::vec(any::<u8>(), 1..3)),
        run in prop::collection::vec((classification(), step()), 0..10),
    ) {
        let mut b = Breaker::new(&cfg);
        let mut now = 0;
        for op in ops {
            now += op.dt();
            if let (Decision::Allow(t), _) = b.admit(&cfg, now, 0) {
                if let Op::Record { outcome, .. } = op {
                    b.record(&cfg, t, now, outcome, 0);
                }
            }
        }
        let mut bytes = codec::encode(&b);
        for (at, value) in damage {
            let len = bytes.len();
            bytes[at % len] = value;
        }
        if let Some(cut) = cut {
            bytes.truncate(cut % (bytes.len() + 1));
        }
        bytes.extend(extra.unwrap_or_default());
        let _ = codec::decode_slot(&bytes);
        if let Ok(mut damaged) = codec::decode(&bytes) {
            damaged.conform(&cfg);
            for (outcome, dt) in run {
                now = now.saturating_add(dt);
                if let (Decision::Allow(t), _) = damaged.admit(&cfg, now, 0) {
                    damaged.record(&cfg, t, now, outcome, 0);
                }
                prop_assert_eq!(codec::decode(&codec::encode(&damaged)), Ok(damaged.clone()));
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------------
// HalfOpen permits
// ---------------------------------------------------------------------------------------------------

proptest! {
    #![proptest_config(cases(256))]

    /// Whatever the interleaving of admits, records and releases across up to four workers sharing the
    /// store, HalfOpen never has more permits out than `half_open_max_requests`, and the stored count is
    /// exactly the number of probe tickets of the current generation still out.
    #[test]
    fn half_open_permits_never_exceed_the_limit(cfg in breaker_config(ENFORCE_OR_DRY_RUN), ops in ops(200)) {
        let store = MemoryStore::new();
        let (mut workers, slot) = world(&store, 4, &cfg);
        let mut tickets: Vec<Ticket> = Vec::new();
        let mut now = 0u64;
        for op in ops {
            match op {
                Op::Admit { worker, dt } => {
                    now += dt;
                    if let Decision::Allow(t) = admit(&mut workers[worker], slot, &cfg, now).decision {
                        tickets.push(t);
                    }
                }
                Op::Record { pick, outcome, dt } => {
                    now += dt;
                    if let Some(t) = take(&mut tickets, pick) {
                        let rec = record(&mut workers[pick % 4], slot, &cfg, t, now, outcome);
                        prop_assert!(rec.is_ok());
                    }
                }
                Op::Release { pick, dt } => {
                    now += dt;
                    if let Some(t) = take(&mut tickets, pick) {
                        prop_assert!(record(&mut workers[pick % 4], slot, &cfg, t, now, IGNORED).is_ok());
                    }
                }
            }
            let Some(b) = breaker(&store, slot) else { continue };
            let current_probes = tickets.iter().filter(|t| t.probe && t.generation == b.generation).count();
            prop_assert!(current_probes <= usize::from(cfg.half_open_max_requests));
            if let BreakerState::HalfOpen { in_flight, .. } = b.state {
                prop_assert!(in_flight <= cfg.half_open_max_requests, "{} > {}", in_flight, cfg.half_open_max_requests);
                prop_assert_eq!(usize::from(in_flight), current_probes);
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------------
// No outcome lost
// ---------------------------------------------------------------------------------------------------

proptest! {
    #![proptest_config(cases(128))]

    /// With a configuration that never trips (no consecutive trigger, rates never judged), every
    /// outcome recorded with a ticket lands in the window, whatever order the calls end in and whichever
    /// worker records them: the window totals are those of the last `window_size` non-ignored outcomes
    /// (count window) or of the outcomes in the buckets still covered (time window), and the consecutive
    /// failure count is the trailing run of failures.
    #[test]
    fn no_recorded_outcome_is_lost(window in window_config(), ops in ops(300)) {
        let cfg = BreakerConfig {
            failure_threshold: 0,
            minimum_requests: u32::MAX,
            window,
            ..BreakerConfig::default()
        };
        let store = MemoryStore::new();
        let (mut workers, slot) = world(&store, 4, &cfg);
        let mut tickets = Vec::new();
        let mut now = 0u64;
        // (time, failure, slow) of each stored non-ignored outcome, in record order.
        let mut model: Vec<(u64, bool, bool)> = Vec::new();
        let mut run = 0u32;
        let mut record = |t: Ticket, c: Classification, now: u64, w: &mut Table<'_>| {
            let rec = record(w, slot, &cfg, t, now, c);
            assert_eq!(rec, Ok(None));
            if c.outcome != Outcome::Ignored {
                model.push((now, c.outcome == Outcome::Failure, c.slow));
                run = if c.outcome == Outcome::Failure { run + 1 } else { 0 };
            }
        };
        for op in ops {
            match op {
                Op::Admit { worker, dt } => {
                    now += dt;
                    match admit(&mut workers[worker], slot, &cfg, now).decision {
                        Decision::Allow(t) => tickets.push(t),
                        other => prop_assert!(false, "a closed breaker refused the call: {:?}", other),
                    }
                }
                Op::Record { pick, outcome, dt } => {
                    now += dt;
                    if let Some(t) = take(&mut tickets, pick) {
                        record(t, outcome, now, &mut workers[pick % 4]);
                    }
                }
                // A call that ends with nothing to judge.
                Op::Release { pick, dt } => {
                    now += dt;
                    if let Some(t) = take(&mut tickets, pick) {
                        record(t, IGNORED, now, &mut workers[0]);
                    }
                }
            }
        }
        // Every call ends.
        for t in std::mem::take(&mut tickets) {
            record(t, Classification { outcome: Outcome::Success, slow: false }, now, &mut workers[1]);
        }

        let Some(b) = breaker(&store, slot) else { return Ok(()) };
        prop_assert_eq!(b.state, BreakerState::Closed);
        prop_assert_eq!(b.generation, 0);
        let covered: Vec<&(u64, bool, bool)> = match window {
            WindowConfig::Count(n) => model.iter().rev().take(usize::from(n)).collect(),
            WindowConfig::Time { duration_ms } => {
                let bucket = duration_ms.div_ceil(TIME_BUCKETS as u64).max(1);
                let oldest = (now / bucket).saturating_sub(TIME_BUCKETS as u64 - 1);
                model.iter().filter(|(at, _, _)| at / bucket >= oldest).collect()
            }
        };
        let stats = b.stats(now);
        prop_assert_eq!(stats.calls as usize, covered.len());
        prop_assert_eq!(stats.failures as usize, covered.iter().filter(|c| c.1).count());
        prop_assert_eq!(stats.slow as usize, covered.iter().filter(|c| c.2).count());
        prop_assert_eq!(b.consecutive_failures, run);
    }
}

// ---------------------------------------------------------------------------------------------------
// A rejected call is never recorded
// ---------------------------------------------------------------------------------------------------

proptest! {
    #![proptest_config(cases(128))]

    /// A rejection carries no ticket, and leaves no trace: an admit that rejects (or, in dry_run, would
    /// have) without a state change writes nothing to the store. The only handle a caller could still
    /// record with is some other call's ticket from an earlier generation, and such an outcome changes
    /// nothing either: not a byte, not the CAS token.
    #[test]
    fn a_rejected_call_leaves_no_trace(cfg in breaker_config(ALL_TRACKING_MODES), ops in ops(200)) {
        let store = MemoryStore::new();
        let (mut workers, slot) = world(&store, 3, &cfg);
        let mut tickets: Vec<Ticket> = Vec::new();
        let mut seen: Vec<Ticket> = Vec::new();
        let mut now = 0u64;
        for op in ops {
            match op {
                Op::Admit { worker, dt } => {
                    now += dt;
                    let before = stored(&store, slot);
                    let admitted = admit(&mut workers[worker % 3], slot, &cfg, now);
                    match admitted.decision {
                        Decision::Allow(t) => {
                            tickets.push(t);
                            seen.push(t);
                        }
                        Decision::Reject(_) | Decision::DryRunReject(_) => {
                            if admitted.transition.is_none() {
                                prop_assert_eq!(stored(&store, slot), before, "a rejection wrote to the store");
                            }
                        }
                    }
                }
                Op::Record { pick, outcome, dt } => {
                    now += dt;
                    if let Some(t) = take(&mut tickets, pick) {
                        prop_assert!(record(&mut workers[pick % 3], slot, &cfg, t, now, outcome).is_ok());
                    }
                }
                Op::Release { pick, dt } => {
                    now += dt;
                    if let Some(t) = take(&mut tickets, pick) {
                        prop_assert!(record(&mut workers[pick % 3], slot, &cfg, t, now, IGNORED).is_ok());
                    }
                }
            }
            // Try every stale ticket ever handed out, with the worst outcome: it changes the breaker in
            // nothing (the slot's last-call time aside).
            let Some(b) = breaker(&store, slot) else { continue };
            for stale in seen.iter().filter(|t| t.generation != b.generation).take(8) {
                let bad = Classification { outcome: Outcome::Failure, slow: true };
                let rec = record(&mut workers[0], slot, &cfg, *stale, now, bad);
                prop_assert_eq!(rec, Ok(None));
                prop_assert_eq!(breaker(&store, slot), Some(b.clone()), "a stale outcome changed the breaker");
                prop_assert!(record(&mut workers[1], slot, &cfg, *stale, now, IGNORED).is_ok());
                prop_assert_eq!(breaker(&store, slot), Some(b.clone()), "a stale release changed the breaker");
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------------
// Configuration
// ---------------------------------------------------------------------------------------------------

const FIELDS: &[&str] = &[
    "upstream_key",
    "failure_threshold",
    "error_rate_threshold",
    "window_size",
    "window_duration",
    "minimum_requests",
    "slow_call_duration",
    "slow_call_rate_threshold",
    "stuck_call_duration",
    "open_timeout",
    "backoff_multiplier",
    "max_open_timeout",
    "half_open_max_requests",
    "success_threshold",
    "failure_grpc_statuses",
    "failure_http_statuses",
    "call_timeout",
    "mode",
    "fallback",
    "upstreams",
    "health_path",
    "max_upstreams",
    "idle_timeout",
    "status",
    "headers",
    "body",
];

fn number() -> impl Strategy<Value = Value> {
    prop_oneof![
        (-3i64..=2_000).prop_map(Value::from),
        any::<i64>().prop_map(Value::from),
        any::<u64>().prop_map(Value::from),
        prop_oneof![0.0f64..=1.5, any::<f64>()]
            .prop_map(|f| Number::from_f64(f).map_or(Value::Null, Value::Number)),
    ]
}

fn text() -> impl Strategy<Value = Value> {
    prop_oneof![
        "[0-9]{0,10}(\\.[0-9]{0,7})?(ms|s|m|h|us|)",
        prop::sample::select(vec![
            "cluster",
            "authority",
            "grpc_service",
            "grpc_method",
            "header:x-tenant",
            "header:",
            "enforce",
            "dry_run",
            "forced_open",
            "disabled",
            "UNAVAILABLE",
            "unavailable",
            "OK",
            "5xx",
            "4XX",
            "6xx",
            "503",
            "/health",
            "/h?x",
            "*",
            "*media*",
            "",
            " ",
            "\u{e9}\u{1F600}",
        ])
        .prop_map(str::to_string),
        ".{0,12}",
    ]
    .prop_map(Value::String)
}

fn leaf() -> impl Strategy<Value = Value> {
    prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        number(),
        text()
    ]
}

fn key() -> impl Strategy<Value = String> {
    prop_oneof![8 => prop::sample::select(FIELDS).prop_map(str::to_string), 1 => "[a-z*_|.]{0,10}"]
}

/// JSON values shaped like filter configurations: objects keyed mostly by real field names, with
/// values of every type, nested (for `upstreams`, `fallback`, `headers`).
fn config_value() -> impl Strategy<Value = Value> {
    leaf().prop_recursive(3, 48, 8, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..5).prop_map(Value::Array),
            prop::collection::vec((key(), inner), 0..8)
                .prop_map(|entries| Value::Object(entries.into_iter().collect::<Map<_, _>>())),
        ]
    })
}

/// A value for one breaker field: usually of the right type and range, sometimes not.
fn field_value(field: &'static str) -> BoxedStrategy<Value> {
    let duration = || {
        prop_oneof![
            (1u64..=600).prop_map(|n| format!("{n}s")),
            (1u64..=90_000).prop_map(|n| format!("{n}ms")),
            (1u64..=10).prop_map(|n| format!("{n}m")),
            (0u64..=9, 1u64..=9).prop_map(|(a, b)| format!("{a}.{b}s")),
        ]
        .prop_map(Value::String)
    };
    let right: BoxedStrategy<Value> = match field {
        "failure_threshold" => (0u64..=10).prop_map(Value::from).boxed(),
        "error_rate_threshold" | "slow_call_rate_threshold" => (0.01f64..=1.0).prop_map(Value::from).boxed(),
        "window_size" => (1u64..=1024).prop_map(Value::from).boxed(),
        "minimum_requests" => (1u64..=200).prop_map(Value::from).boxed(),
        "backoff_multiplier" => (1.0f64..=5.0).prop_map(Value::from).boxed(),
        "half_open_max_requests" | "success_threshold" => (1u64..=20).prop_map(Value::from).boxed(),
        "window_duration" => (1u64..=3_600).prop_map(|n| Value::String(format!("{n}s"))).boxed(),
        "slow_call_duration" | "call_timeout" | "stuck_call_duration" => {
            prop_oneof![Just(Value::Null), duration()].boxed()
        }
        "open_timeout" | "max_open_timeout" => duration().boxed(),
        "mode" => prop::sample::select(vec!["enforce", "dry_run", "forced_open", "disabled"])
            .prop_map(Value::from)
            .boxed(),
        "failure_grpc_statuses" => prop::collection::vec(
            prop_oneof![(0u64..=16).prop_map(Value::from), Just(Value::from("UNAVAILABLE")), Just(Value::from("internal"))],
            0..4,
        )
        .prop_map(Value::Array)
        .boxed(),
        "failure_http_statuses" => prop::collection::vec(
            prop_oneof![(100u64..=599).prop_map(Value::from), Just(Value::from("5xx")), Just(Value::from("429"))],
            0..4,
        )
        .prop_map(Value::Array)
        .boxed(),
        "fallback" => (200u64..=599, "[a-z-]{1,8}", "[ -~]{0,8}", ".{0,10}")
            .prop_map(|(status, k, v, body)| serde_json::json!({"status": status, "headers": {k: v}, "body": body}))
            .boxed(),
        _ => leaf().boxed(),
    };
    prop_oneof![9 => right, 1 => leaf()].boxed()
}

const BREAKER_FIELDS: &[&str] = &[
    "failure_threshold",
    "error_rate_threshold",
    "window_size",
    "window_duration",
    "minimum_requests",
    "slow_call_duration",
    "slow_call_rate_threshold",
    "stuck_call_duration",
    "open_timeout",
    "backoff_multiplier",
    "max_open_timeout",
    "half_open_max_requests",
    "success_threshold",
    "failure_grpc_statuses",
    "failure_http_statuses",
    "call_timeout",
    "mode",
    "fallback",
];

/// A few breaker fields with plausible values.
fn breaker_fields() -> impl Strategy<Value = Map<String, Value>> {
    prop::collection::vec(
        prop::sample::select(BREAKER_FIELDS).prop_flat_map(|f| (Just(f), field_value(f))),
        0..5,
    )
    .prop_map(|entries| {
        entries
            .into_iter()
            .map(|(k, v)| (k.to_string(), v))
            .collect()
    })
}

/// Plausible whole configurations: top-level fields and overrides in `upstreams`, exact and glob.
fn plausible_config() -> impl Strategy<Value = Value> {
    let top = (
        breaker_fields(),
        prop::collection::vec(
            (
                "[a-z]{1,6}|\\*[a-z]{0,4}\\*|[a-z|]{0,6}\\*",
                breaker_fields(),
            ),
            0..4,
        ),
        prop::option::of(prop_oneof![
            Just(Value::from("/health")),
            Just(Value::Null),
            leaf()
        ]),
        prop::option::of(prop_oneof![(1u64..=2048).prop_map(Value::from), leaf()]),
        prop::option::of(prop_oneof![
            Just(Value::from("grpc_method")),
            Just(Value::from("header:x-tenant")),
            leaf()
        ]),
    );
    let idle = prop::option::of(prop_oneof![
        (1u64..=60).prop_map(|n| Value::String(format!("{n}m"))),
        leaf()
    ]);
    (top, idle).prop_map(
        |((mut map, upstreams, health_path, max_upstreams, upstream_key), idle_timeout)| {
            let overrides: Map<String, Value> = upstreams
                .into_iter()
                .map(|(k, v)| (k, Value::Object(v)))
                .collect();
            map.insert("upstreams".to_string(), Value::Object(overrides));
            for (k, v) in [
                ("health_path", health_path),
                ("max_upstreams", max_upstreams),
                ("upstream_key", upstream_key),
                ("idle_timeout", idle_timeout),
            ] {
                if let Some(v) = v {
                    map.insert(k.to_string(), v);
                }
            }
            Value::Object(map)
        },
    )
}

/// What a configuration that was accepted must hold, for the defaults and any override.
fn check_accepted(c: &BreakerConfig) -> Result<(), TestCaseError> {
    prop_assert!(c.max_open_timeout_ms >= c.open_timeout_ms && c.open_timeout_ms > 0);
    prop_assert!((1..=1_000_000).contains(&c.error_rate_threshold_ppm));
    prop_assert!((1..=1_000_000).contains(&c.slow_call_rate_threshold_ppm));
    prop_assert!(c.backoff_multiplier.is_finite() && c.backoff_multiplier >= 1.0);
    prop_assert!(
        c.half_open_max_requests >= 1 && c.success_threshold >= 1 && c.minimum_requests >= 1
    );
    match c.window {
        WindowConfig::Count(n) => {
            prop_assert!((1..=1024).contains(&n) && c.minimum_requests <= u32::from(n))
        }
        WindowConfig::Time { duration_ms } => {
            prop_assert!((1_000..=3_600_000).contains(&duration_ms))
        }
    }
    Ok(())
}

/// An accepted configuration drives a breaker through opening, backoff and recovery without a panic.
fn exercise(c: &BreakerConfig) {
    if c.mode == Mode::Disabled {
        return;
    }
    let mut b = Breaker::new(c);
    let mut now = 0u64;
    let fail = Classification {
        outcome: Outcome::Failure,
        slow: true,
    };
    for i in 0..40u64 {
        now = now.saturating_add(c.open_timeout_ms.min(1 << 40) / 2 + i);
        if let (Decision::Allow(t), _) = b.admit(c, now, 0) {
            b.record(c, t, now, fail, 0);
        }
    }
}

proptest! {
    #![proptest_config(cases(512))]

    /// Structured JSON-ish configurations: refused with an error naming a field, or accepted with
    /// every invariant of a valid configuration, and then safe to run.
    #[test]
    fn from_json_never_panics_on_config_shaped_json(v in config_value(), probe in "[a-z*|.]{0,12}") {
        let text = v.to_string();
        match FilterConfig::from_json(text.as_bytes()) {
            Ok(cfg) => {
                check_accepted(cfg.defaults())?;
                let o = cfg.breaker_for(&probe);
                check_accepted(o)?;
                exercise(o);
            }
            Err(e) => prop_assert!(!e.field.is_empty() && !e.to_string().is_empty()),
        }
    }

    /// Object configurations made only of real fields: most get past the JSON layer, so validation
    /// itself is what gets exercised.
    #[test]
    fn from_json_never_panics_on_objects_of_real_fields(
        entries in prop::collection::vec((prop::sample::select(FIELDS), config_value()), 0..10),
    ) {
        let v = Value::Object(entries.into_iter().map(|(k, v)| (k.to_string(), v)).collect());
        if let Ok(cfg) = FilterConfig::from_json(v.to_string().as_bytes()) {
            check_accepted(cfg.defaults())?;
            exercise(cfg.defaults());
        }
    }

    /// Plausible configurations, most of them valid: what is accepted holds every invariant, for the
    /// defaults and for each override, and runs; what is refused names a field.
    #[test]
    fn from_json_accepts_only_consistent_plausible_configs(v in plausible_config(), probe in "[a-z|*]{0,8}") {
        match FilterConfig::from_json(v.to_string().as_bytes()) {
            Ok(cfg) => {
                check_accepted(cfg.defaults())?;
                exercise(cfg.defaults());
                let keys = v["upstreams"].as_object().map(|m| m.keys().cloned().collect::<Vec<_>>()).unwrap_or_default();
                for key in keys.iter().map(String::as_str).chain([probe.as_str()]) {
                    check_accepted(cfg.breaker_for(key))?;
                    exercise(cfg.breaker_for(key));
                }
            }
            Err(e) => prop_assert!(!e.field.is_empty(), "{}", e),
        }
    }

    /// Arbitrary text and arbitrary bytes (not UTF-8, truncated JSON, huge numbers) are refused or
    /// accepted, never a panic.
    #[test]
    fn from_json_never_panics_on_arbitrary_input(
        text in "[{}\\[\\]\":,0-9a-z_.* -]{0,120}",
        bytes in prop::collection::vec(any::<u8>(), 0..200),
    ) {
        if let Ok(cfg) = FilterConfig::from_json(text.as_bytes()) {
            check_accepted(cfg.defaults())?;
        }
        if let Ok(cfg) = FilterConfig::from_json(&bytes) {
            check_accepted(cfg.defaults())?;
        }
    }
}
