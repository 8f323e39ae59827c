//! The slot table: shared by workers, bounded, evicting only idle Closed breakers, at a cost that does
//! not grow with the number of keys.

use std::sync::Arc;

use super::*;
use crate::classify::Outcome;
use crate::store::{MemoryStore, SharedData};
use crate::testing::CountingStore;
#[cfg(target_arch = "wasm32")]
use wasm_bindgen_test::wasm_bindgen_test as test;

const IDLE: u64 = 600_000;
const FAIL: Classification = Classification {
    outcome: Outcome::Failure,
    slow: false,
};

fn cfg() -> BreakerConfig {
    BreakerConfig {
        failure_threshold: 2,
        open_timeout_ms: 1_000,
        ..BreakerConfig::default()
    }
}

fn at(now: u64) -> Moment {
    Moment {
        now_ms: now,
        idle_timeout_ms: IDLE,
        shaped_ms: 0,
        entropy: 0,
    }
}

fn table(store: &Arc<MemoryStore>, capacity: u32) -> SharedData<Arc<MemoryStore>> {
    let mut t = SharedData::new(Arc::clone(store), capacity);
    t.prepare().unwrap();
    t
}

fn allow<S: BreakerStore>(t: &mut S, key: &str, now: u64) -> (u32, Ticket) {
    let slot = locate(t, key, &cfg(), now, IDLE, 0).unwrap().slot;
    match admit(t, slot, key, &cfg(), at(now))
        .unwrap()
        .value
        .unwrap()
        .decision
    {
        Decision::Allow(ticket) => (slot, ticket),
        other => panic!("expected Allow, got {other:?}"),
    }
}

#[test]
fn two_workers_share_one_breaker() {
    let store = Arc::new(MemoryStore::new());
    let (mut w1, mut w2) = (table(&store, 16), table(&store, 16));
    let (slot, t) = allow(&mut w1, "content", 0);
    record(&mut w1, slot, "content", &cfg(), t, FAIL, at(0)).unwrap();
    let (slot2, t) = allow(&mut w2, "content", 0);
    assert_eq!(slot, slot2);
    let r = record(&mut w2, slot, "content", &cfg(), t, FAIL, at(0)).unwrap();
    assert_eq!(r.value.flatten().unwrap().to, StateKind::Open);
    let a = admit(&mut w1, slot, "content", &cfg(), at(1))
        .unwrap()
        .value
        .unwrap();
    assert!(matches!(a.decision, Decision::Reject(_)));
    let h = health(&mut w1, Some(1), usize::MAX).unwrap();
    assert_eq!(h.breakers.len(), 1);
    assert_eq!(h.breakers[0].state, StateKind::Open);
    assert_eq!(h.breakers[0].retry_after_ms, Some(999));
}

#[test]
fn max_upstreams_bounds_the_breakers() {
    let store = Arc::new(MemoryStore::new());
    let (mut w1, mut w2) = (table(&store, 2), table(&store, 2));
    allow(&mut w1, "a", 0);
    allow(&mut w2, "b", 0);
    assert_eq!(
        locate(&mut w1, "c", &cfg(), 0, IDLE, 0),
        Err(Untracked::TooManyUpstreams)
    );
    // Registered keys keep working from any worker.
    allow(&mut w2, "a", 0);
    assert_eq!(
        health(&mut w1, Some(0), usize::MAX).unwrap().breakers.len(),
        2
    );
}

#[test]
fn an_idle_closed_breaker_gives_its_slot_up_and_an_open_one_never() {
    let store = Arc::new(MemoryStore::new());
    let mut t = table(&store, 2);
    let (a, ticket) = allow(&mut t, "a", 0);
    allow(&mut t, "b", 0);
    // "a" opens; "b" stays closed and idle.
    record(&mut t, a, "a", &cfg(), ticket, FAIL, at(0)).unwrap();
    let (_, ticket) = allow(&mut t, "a", 0);
    record(&mut t, a, "a", &cfg(), ticket, FAIL, at(0)).unwrap();
    assert_eq!(
        locate(&mut t, "c", &cfg(), IDLE - 1, IDLE, 0),
        Err(Untracked::TooManyUpstreams),
        "not idle long enough"
    );
    let c = locate(&mut t, "c", &cfg(), IDLE, IDLE, 0).unwrap();
    assert!(c.evicted);
    let keys: Vec<String> = health(&mut t, Some(IDLE), usize::MAX)
        .unwrap()
        .breakers
        .into_iter()
        .map(|b| b.upstream)
        .collect();
    assert_eq!(keys, ["a", "c"], "the open breaker stayed");
    // "a" is still open long after: never evicted while Open.
    assert_eq!(
        locate(&mut t, "d", &cfg(), 10 * IDLE, IDLE, 0).map(|l| l.slot),
        Ok(c.slot),
        "only the idle closed one goes"
    );
}

#[test]
fn registration_costs_the_same_however_many_keys_exist() {
    let store = CountingStore::default();
    let mut t = SharedData::new(&store, 4096);
    t.prepare().unwrap();
    let cost = |t: &mut SharedData<&CountingStore>, key: &str| {
        let before = store.gets.get();
        let _ = locate(t, key, &cfg(), 0, IDLE, 0);
        store.gets.get() - before
    };
    let first = cost(&mut t, "first");
    for i in 0..3_500 {
        cost(&mut t, &format!("key-{i}"));
    }
    let late = cost(&mut t, "late");
    assert!(first <= 2, "{first}");
    assert!(
        late <= u64::from(MAX_PROBES) + 2,
        "{late} reads at 86% full"
    );
    // Full of busy keys: a new key costs a bounded walk and goes untracked.
    for i in 3_500..5_000 {
        cost(&mut t, &format!("key-{i}"));
    }
    assert!(cost(&mut t, "hostile") <= u64::from(MAX_PROBES) + 2);
}

#[test]
fn a_slot_that_went_to_another_key_answers_none_and_loses_the_outcome_visibly() {
    let store = Arc::new(MemoryStore::new());
    let mut t = table(&store, 1);
    let (slot, ticket) = allow(&mut t, "a", 0);
    let b = locate(&mut t, "b", &cfg(), IDLE, IDLE, 0).unwrap();
    assert_eq!((b.slot, b.evicted), (slot, true));
    assert_eq!(
        admit(&mut t, slot, "a", &cfg(), at(IDLE)).unwrap().value,
        None
    );
    let r = record(&mut t, slot, "a", &cfg(), ticket, FAIL, at(IDLE)).unwrap();
    assert_eq!(r.value, None, "the outcome went nowhere");
}

#[test]
fn health_lists_breakers_by_key_and_counts_the_unreadable() {
    let store = Arc::new(MemoryStore::new());
    let mut t = table(&store, 8);
    for key in ["zeta", "alpha", "mid"] {
        allow(&mut t, key, 0);
    }
    let h = health(&mut t, Some(0), usize::MAX).unwrap();
    let keys: Vec<&str> = h.breakers.iter().map(|b| b.upstream.as_str()).collect();
    assert_eq!(keys, ["alpha", "mid", "zeta"]);
    assert_eq!(h.unreadable, 0);
    let slot = locate(&mut t, "mid", &cfg(), 0, IDLE, 0).unwrap().slot;
    store.put_raw(&t.slot_key(slot), b"\xde\xad");
    let h = health(&mut t, Some(0), usize::MAX).unwrap();
    assert_eq!((h.breakers.len(), h.unreadable), (2, 1));
}

#[test]
fn a_corrupt_slot_is_taken_over_and_reported() {
    let store = Arc::new(MemoryStore::new());
    let mut t = table(&store, 4);
    let home = home_slot("a", 4);
    store.put_raw(&t.slot_key(home), b"\xde\xad\xbe\xef");
    let l = locate(&mut t, "a", &cfg(), 0, IDLE, 0).unwrap();
    assert_eq!(l.slot, home);
    assert_eq!(l.corrupt, Some(CodecError::Malformed));
    let h = health(&mut t, Some(0), usize::MAX).unwrap();
    assert_eq!((h.breakers.len(), h.unreadable), (1, 0));
}

#[test]
fn the_home_slot_is_stable() {
    // The same in every build: changing the hash would move every key of a running table.
    assert_eq!(home_slot("content", 1024), home_slot("content", 1024));
    assert_eq!(home_slot("", 7), (0xcbf2_9ce4_8422_2325_u64 % 7) as u32);
    assert!(home_slot("anything", 1) == 0);
}

#[test]
fn an_admission_on_a_corrupt_slot_says_so_and_leaves_it_empty_for_a_fresh_claim() {
    let store = Arc::new(MemoryStore::new());
    let mut t = table(&store, 4);
    let (slot, _) = allow(&mut t, "a", 0);
    store.put_raw(&t.slot_key(slot), b"");
    let on = admit(&mut t, slot, "a", &cfg(), at(1)).unwrap();
    assert_eq!((on.value, on.corrupt), (None, Some(CodecError::Malformed)));
    assert_eq!(t.read(slot).unwrap(), SlotRead::Empty);
    let again = locate(&mut t, "a", &cfg(), 1, IDLE, 0).unwrap();
    assert_eq!((again.slot, again.corrupt), (slot, None));
}
