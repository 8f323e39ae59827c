//! The breakers of one Envoy (one `vm_id`), as seen from one worker: which upstream keys have a breaker,
//! and admit / record / release through the shared store.
//!
//! Shared data cannot list its keys, so the registry keeps an index of the upstream keys in one entry,
//! bounded by `max_upstreams`. Each worker remembers locally which keys it has seen registered, so the
//! index is read only the first time a worker meets a key; once the index is full it stays full (shared
//! data has no delete), so a worker that learns this stops reading it too, and a flood of new keys
//! (`header:` keys from a hostile client) costs one `get` of a missing key each.

use hashbrown::{HashMap, HashSet};

use crate::breaker::{Breaker, Decision, Rejection, StateKind, Ticket, Transition};
use crate::classify::Classification;
use crate::codec::{self, CodecError};
use crate::config::{BreakerConfig, Mode, MAX_KEY_LEN};
use crate::store::{self, SharedStore, Snapshot, StoreError, UpdateError, MAX_CAS_ATTEMPTS};
use crate::window::WindowStats;

/// Shared-data key of the upstream index.
pub const INDEX_KEY: &str = "circuit_breaker.v1.index";
const STATE_PREFIX: &str = "circuit_breaker.v1.state.";
const INDEX_MAGIC: [u8; 2] = [0xCA, 1];

/// Shared-data key of one upstream's breaker.
pub fn state_key(upstream: &str) -> String {
    let mut k = String::with_capacity(STATE_PREFIX.len() + upstream.len());
    k.push_str(STATE_PREFIX);
    k.push_str(upstream);
    k
}

/// Why a call passed without a breaker.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Untracked {
    /// `mode: disabled`.
    Disabled,
    /// `max_upstreams` breakers exist already.
    TooManyUpstreams,
    /// The key is longer than [`MAX_KEY_LEN`] bytes.
    KeyTooLong,
    /// The request had no key (no cluster, not a gRPC path, header absent).
    NoKey,
    /// Shared data failed us; the call fails open.
    Store(UpdateError),
}

impl Untracked {
    /// Whether `circuit_breaker_untracked_calls_total` counts this (everything but `disabled`).
    pub fn counted(&self) -> bool {
        !matches!(self, Untracked::Disabled)
    }
}

/// What the filter does with a new call.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Admission {
    /// Let it through and record it with the ticket.
    Allow(Ticket),
    /// Answer it with the rejection.
    Reject(Rejection),
    /// Let it through, mark it; not recorded (`dry_run`).
    DryRun(Rejection),
    /// Let it through; no breaker applies.
    Untracked(Untracked),
}

/// Everything that happened while admitting.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Admitted {
    /// The decision.
    pub admission: Admission,
    /// A state change it caused (Open → HalfOpen, or a forced opening).
    pub transition: Option<Transition>,
    /// Stored bytes were corrupt and the breaker was restarted.
    pub corrupt: Option<CodecError>,
    /// CAS attempts taken (0 when the store was not touched).
    pub attempts: u32,
}

impl Admitted {
    fn untracked(why: Untracked) -> Self {
        Self {
            admission: Admission::Untracked(why),
            transition: None,
            corrupt: None,
            attempts: 0,
        }
    }
}

/// Everything that happened while recording an outcome.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Recorded {
    /// A state change the outcome caused.
    pub transition: Option<Transition>,
    /// Stored bytes were corrupt and the breaker was restarted (the outcome went into the fresh one).
    pub corrupt: Option<CodecError>,
    /// CAS attempts taken.
    pub attempts: u32,
    /// The outcome could not be stored (lost, and counted by the caller).
    pub error: Option<UpdateError>,
}

/// One breaker as the health endpoint reports it.
#[derive(Debug, Clone, PartialEq)]
pub struct UpstreamHealth {
    /// The upstream key.
    pub upstream: String,
    /// Its state.
    pub state: StateKind,
    /// The window's totals now.
    pub stats: WindowStats,
    /// Failures in a row.
    pub consecutive_failures: u32,
    /// Ms until probes may go through, while Open.
    pub retry_after_ms: Option<u64>,
}

/// One worker's view of the breakers.
#[derive(Debug)]
pub struct Registry {
    max_upstreams: u32,
    known: HashSet<String>,
    full: bool,
    /// Registered keys whose state was not there yet, and since when (see [`MISSING_GRACE_MS`]).
    missing_since: HashMap<String, u64>,
    /// Scratch for the state key of the call in hand, so a call does not allocate one.
    state_key: String,
    /// The latest read of one upstream's state (the last one touched) that no write of this worker
    /// followed. The record of a call usually comes after some admit read the state and before
    /// anything wrote it, and then it spares its own read (see [`store::update_with_snapshot`]).
    last_read: Option<(String, Snapshot)>,
}

/// How long a registered key's state may be missing before a worker other than its creator writes it.
///
/// Only the worker that added a key to the index writes its first state: shared data has no atomic
/// create, so a second writer could wipe an outcome the creator had already recorded. The creator's two
/// writes are microseconds apart; a state still missing a second later means the creator's VM went
/// away in between, and then it is safe (and needed) for anyone to create it.
pub const MISSING_GRACE_MS: u64 = 1_000;

impl Registry {
    /// A registry for a configuration's `max_upstreams`.
    pub fn new(max_upstreams: u32) -> Self {
        Self {
            max_upstreams,
            known: HashSet::new(),
            full: false,
            missing_since: HashMap::new(),
            state_key: String::new(),
            last_read: None,
        }
    }

    /// Creates the (empty) index if it does not exist yet. Call once per worker at configuration time:
    /// shared data has no atomic create, so two first writers could overwrite each other; doing it
    /// before traffic flows keeps that race away from registrations.
    pub fn ensure_index<S: SharedStore + ?Sized>(store: &S) -> Result<(), StoreError> {
        if store.get(INDEX_KEY)?.is_none() {
            store.set(INDEX_KEY, &encode_index(&[]), None)?;
        }
        Ok(())
    }

    /// Decides on a new call for upstream `key` at `now_ms`.
    pub fn admit<S: SharedStore + ?Sized>(
        &mut self,
        store: &S,
        key: &str,
        cfg: &BreakerConfig,
        now_ms: u64,
    ) -> Admitted {
        if cfg.mode == Mode::Disabled {
            return Admitted::untracked(Untracked::Disabled);
        }
        if let Err(why) = self.register(store, key, cfg) {
            return Admitted::untracked(why);
        }
        // An admit must see the state as it is now (another worker may have opened the breaker): it
        // always reads.
        let result = self.update_state(store, key, cfg, now_ms, false, |b| {
            let conformed = b.conform(cfg);
            // `admit` moves the state and, with it, the generation and the open time; never the
            // window or the failure count (`admit_changes_only_the_state` holds it to that). Comparing
            // those three tells whether to write, without cloning the breaker, whose window alone is
            // 270 bytes: this is the path every call takes.
            let before = (b.state, b.generation, b.open_timeout_ms);
            let (decision, transition) = b.admit(cfg, now_ms);
            let after = (b.state, b.generation, b.open_timeout_ms);
            ((decision, transition), conformed || after != before)
        });
        match result {
            Ok(u) => {
                let (decision, transition) = u.value;
                let admission = match decision {
                    Decision::Allow(t) => Admission::Allow(t),
                    Decision::Reject(r) => Admission::Reject(r),
                    Decision::DryRunReject(r) => Admission::DryRun(r),
                };
                Admitted {
                    admission,
                    transition,
                    corrupt: u.corrupt,
                    attempts: u.attempts,
                }
            }
            Err(e) => Admitted {
                attempts: MAX_CAS_ATTEMPTS,
                ..Admitted::untracked(Untracked::Store(e))
            },
        }
    }

    /// Records the outcome of a call admitted with `ticket`.
    pub fn record<S: SharedStore + ?Sized>(
        &mut self,
        store: &S,
        key: &str,
        cfg: &BreakerConfig,
        ticket: Ticket,
        now_ms: u64,
        outcome: Classification,
    ) -> Recorded {
        // A record nearly always writes, so it may start from this worker's latest read: its CAS
        // fails if anyone wrote since (and one that would write nothing is redone on a fresh read).
        let result = self.update_state(store, key, cfg, now_ms, true, |b| {
            b.conform(cfg);
            // An outcome nearly always changes the window, so there is no point cloning the breaker
            // to compare: `store::update` skips the write if the new encoding equals the stored bytes.
            (b.record(cfg, ticket, now_ms, outcome), true)
        });
        match result {
            Ok(u) => Recorded {
                transition: u.value,
                corrupt: u.corrupt,
                attempts: u.attempts,
                error: None,
            },
            Err(e) => Recorded {
                transition: None,
                corrupt: None,
                attempts: MAX_CAS_ATTEMPTS,
                error: Some(e),
            },
        }
    }

    /// Gives back a probe permit of a call that ended with nothing to judge.
    pub fn release<S: SharedStore + ?Sized>(
        &self,
        store: &S,
        key: &str,
        cfg: &BreakerConfig,
        ticket: Ticket,
    ) -> Result<(), UpdateError> {
        if !ticket.probe {
            return Ok(());
        }
        // A probe permit exists only in a stored state, so there is nothing to create here.
        store::update(
            store,
            &state_key(key),
            || Breaker::new(cfg),
            |b| ((), b.release(ticket)),
        )
        .map(|_| ())
    }

    /// Every registered breaker, for the health endpoint, in registration order. Keys whose state is
    /// missing or corrupt are left out (the next call to them restarts them).
    pub fn snapshot<S: SharedStore + ?Sized>(
        store: &S,
        now_ms: u64,
    ) -> Result<Vec<UpstreamHealth>, StoreError> {
        let keys = match store.get(INDEX_KEY)? {
            Some((bytes, _)) => decode_index(&bytes).unwrap_or_default(),
            None => Vec::new(),
        };
        let mut out = Vec::with_capacity(keys.len());
        for key in keys {
            let Some((bytes, _)) = store.get(&state_key(&key))? else {
                continue;
            };
            let Ok(b) = codec::decode(&bytes) else {
                continue;
            };
            out.push(UpstreamHealth {
                state: b.state.kind(),
                stats: b.stats(now_ms),
                consecutive_failures: b.consecutive_failures,
                retry_after_ms: b.retry_after_ms(now_ms),
                upstream: key,
            });
        }
        Ok(out)
    }

    /// Number of keys this worker has seen registered.
    pub fn known_len(&self) -> usize {
        self.known.len()
    }

    /// Makes sure `key` has a breaker, registering it in the index if this is its first call anywhere.
    fn register<S: SharedStore + ?Sized>(
        &mut self,
        store: &S,
        key: &str,
        cfg: &BreakerConfig,
    ) -> Result<(), Untracked> {
        if self.known.contains(key) {
            return Ok(());
        }
        if key.is_empty() {
            return Err(Untracked::NoKey);
        }
        if key.len() > MAX_KEY_LEN {
            return Err(Untracked::KeyTooLong);
        }
        let skey = state_key(key);
        if store
            .get(&skey)
            .map_err(|e| Untracked::Store(UpdateError::Store(e)))?
            .is_some()
        {
            self.remember(key);
            return Ok(());
        }
        if self.full {
            return Err(Untracked::TooManyUpstreams);
        }
        for _ in 0..MAX_CAS_ATTEMPTS {
            let stored = store
                .get(INDEX_KEY)
                .map_err(|e| Untracked::Store(UpdateError::Store(e)))?;
            let (mut keys, cas) = match stored {
                // A corrupt index is rebuilt from scratch: breakers stay reachable through their own
                // keys; only the listing (and the count toward the bound) restarts.
                Some((bytes, cas)) => (decode_index(&bytes).unwrap_or_default(), Some(cas)),
                None => (Vec::new(), None),
            };
            if keys.iter().any(|k| k == key) {
                // Another worker registered it and is creating its state right now.
                self.remember(key);
                return Ok(());
            }
            if keys.len() >= self.max_upstreams as usize {
                self.full = true;
                return Err(Untracked::TooManyUpstreams);
            }
            keys.push(key.to_string());
            match store.set(INDEX_KEY, &encode_index(&keys), cas) {
                Ok(()) => {
                    // The CAS on the index makes this worker the key's only creator.
                    store
                        .set(&skey, &codec::encode(&Breaker::new(cfg)), None)
                        .map_err(|e| Untracked::Store(UpdateError::Store(e)))?;
                    self.remember(key);
                    return Ok(());
                }
                Err(StoreError::CasMismatch) => continue,
                Err(e) => return Err(Untracked::Store(UpdateError::Store(e))),
            }
        }
        Err(Untracked::Store(UpdateError::GaveUp))
    }

    /// [`store::update_with_snapshot`] on an upstream's state key, from this worker's latest read of it
    /// when `from_last_read` and there is one. A registered key whose state is not there yet fails open
    /// (see [`MISSING_GRACE_MS`]), unless it has been missing for the grace period.
    fn update_state<S, R>(
        &mut self,
        store: &S,
        key: &str,
        cfg: &BreakerConfig,
        now_ms: u64,
        from_last_read: bool,
        change: impl FnMut(&mut Breaker) -> (R, bool),
    ) -> Result<store::Updated<R>, UpdateError>
    where
        S: SharedStore + ?Sized,
    {
        let mut skey = std::mem::take(&mut self.state_key);
        skey.clear();
        skey.push_str(STATE_PREFIX);
        skey.push_str(key);
        // The cached entry's key string is reused for the next one, so caching allocates nothing.
        let (mut read_key, read) = self
            .last_read
            .take()
            .map_or((String::new(), None), |(k, s)| (k, Some(s)));
        let mut snapshot = read.filter(|_| from_last_read && read_key == key);
        let result = self.update_state_at(store, key, &skey, cfg, now_ms, &mut snapshot, change);
        if let Some(snapshot) = snapshot {
            if read_key != key {
                read_key.clear();
                read_key.push_str(key);
            }
            self.last_read = Some((read_key, snapshot));
        }
        self.state_key = skey;
        result
    }

    #[allow(clippy::too_many_arguments)]
    fn update_state_at<S, R>(
        &mut self,
        store: &S,
        key: &str,
        skey: &str,
        cfg: &BreakerConfig,
        now_ms: u64,
        snapshot: &mut Option<Snapshot>,
        mut change: impl FnMut(&mut Breaker) -> (R, bool),
    ) -> Result<store::Updated<R>, UpdateError>
    where
        S: SharedStore + ?Sized,
    {
        let result =
            store::update_with_snapshot(store, skey, snapshot, || Breaker::new(cfg), &mut change);
        if !matches!(result, Err(UpdateError::Missing)) {
            if !self.missing_since.is_empty() {
                self.missing_since.remove(key);
            }
            return result;
        }
        let since = *self.missing_since.entry(key.to_string()).or_insert(now_ms);
        if now_ms.saturating_sub(since) < MISSING_GRACE_MS {
            return result;
        }
        self.missing_since.remove(key);
        store
            .set(skey, &codec::encode(&Breaker::new(cfg)), None)
            .map_err(UpdateError::Store)?;
        store::update_with_snapshot(store, skey, snapshot, || Breaker::new(cfg), &mut change)
    }

    fn remember(&mut self, key: &str) {
        // Bounded: only registered keys are remembered, and there are at most max_upstreams of them
        // (plus the few a corrupt index may have let through twice).
        if self.known.len() < (self.max_upstreams as usize).saturating_mul(2) {
            self.known.insert(key.to_string());
        }
    }
}

/// Encodes the index: magic, version, count (u32), then each key as u16 length + bytes.
pub fn encode_index(keys: &[String]) -> Vec<u8> {
    let mut out = Vec::with_capacity(6 + keys.iter().map(|k| k.len() + 2).sum::<usize>());
    out.extend_from_slice(&INDEX_MAGIC);
    out.extend_from_slice(&(keys.len() as u32).to_le_bytes());
    for k in keys {
        out.extend_from_slice(&(k.len() as u16).to_le_bytes());
        out.extend_from_slice(k.as_bytes());
    }
    out
}

/// Decodes the index; `None` for bytes that are not an index.
pub fn decode_index(bytes: &[u8]) -> Option<Vec<String>> {
    let rest = bytes.strip_prefix(&INDEX_MAGIC)?;
    let (count, mut rest) = rest.split_first_chunk::<4>()?;
    let count = u32::from_le_bytes(*count) as usize;
    // Each entry takes at least 2 bytes: a count larger than that is a lie, not an allocation to make.
    if count > rest.len() / 2 {
        return None;
    }
    let mut keys = Vec::with_capacity(count);
    for _ in 0..count {
        let (len, tail) = rest.split_first_chunk::<2>()?;
        let (key, tail) = tail.split_at_checked(usize::from(u16::from_le_bytes(*len)))?;
        keys.push(String::from_utf8(key.to_vec()).ok()?);
        rest = tail;
    }
    rest.is_empty().then_some(keys)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::classify::Outcome;
    use crate::store::MemoryStore;
    #[cfg(target_arch = "wasm32")]
    use wasm_bindgen_test::wasm_bindgen_test as test;

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

    fn allow(r: &mut Registry, s: &MemoryStore, key: &str, c: &BreakerConfig, now: u64) -> Ticket {
        match r.admit(s, key, c, now).admission {
            Admission::Allow(t) => t,
            other => panic!("expected Allow, got {other:?}"),
        }
    }

    #[test]
    fn two_workers_share_one_breaker() {
        let s = MemoryStore::new();
        Registry::ensure_index(&s).unwrap();
        let (mut w1, mut w2) = (Registry::new(10), Registry::new(10));
        let c = cfg();
        let t = allow(&mut w1, &s, "content", &c, 0);
        assert_eq!(w1.record(&s, "content", &c, t, 0, FAIL).transition, None);
        let t = allow(&mut w2, &s, "content", &c, 0);
        let rec = w2.record(&s, "content", &c, t, 0, FAIL);
        assert_eq!(rec.transition.unwrap().to, StateKind::Open);
        assert!(matches!(
            w1.admit(&s, "content", &c, 1).admission,
            Admission::Reject(_)
        ));
        let health = Registry::snapshot(&s, 1).unwrap();
        assert_eq!(health.len(), 1);
        assert_eq!(health[0].state, StateKind::Open);
        assert_eq!(health[0].retry_after_ms, Some(999));
    }

    #[test]
    fn max_upstreams_bounds_the_breakers() {
        let s = MemoryStore::new();
        Registry::ensure_index(&s).unwrap();
        let mut w1 = Registry::new(2);
        let mut w2 = Registry::new(2);
        let c = cfg();
        allow(&mut w1, &s, "a", &c, 0);
        allow(&mut w2, &s, "b", &c, 0);
        assert_eq!(
            w1.admit(&s, "c", &c, 0).admission,
            Admission::Untracked(Untracked::TooManyUpstreams)
        );
        assert_eq!(
            w2.admit(&s, "d", &c, 0).admission,
            Admission::Untracked(Untracked::TooManyUpstreams)
        );
        // Registered keys keep working from any worker.
        allow(&mut w1, &s, "b", &c, 0);
        assert_eq!(Registry::snapshot(&s, 0).unwrap().len(), 2);
        let long = "x".repeat(MAX_KEY_LEN + 1);
        assert_eq!(
            w1.admit(&s, &long, &c, 0).admission,
            Admission::Untracked(Untracked::KeyTooLong)
        );
        assert_eq!(
            w1.admit(&s, "", &c, 0).admission,
            Admission::Untracked(Untracked::NoKey)
        );
    }

    #[test]
    fn a_record_right_after_its_admit_spares_its_read_and_loses_nothing_to_a_rival() {
        let s = MemoryStore::new();
        Registry::ensure_index(&s).unwrap();
        let c = BreakerConfig {
            failure_threshold: 10,
            ..cfg()
        };
        let (mut w1, mut w2) = (Registry::new(10), Registry::new(10));
        let t1 = allow(&mut w1, &s, "a", &c, 0);
        let (_, cas) = s.get(&state_key("a")).unwrap().unwrap();
        let r = w1.record(&s, "a", &c, t1, 1, FAIL);
        assert_eq!((r.attempts, r.error), (1, None));
        assert_ne!(s.get(&state_key("a")).unwrap().unwrap().1, cas, "written");
        // w1 reads, w2 writes, then w1 records from its (now stale) read: the CAS catches it.
        let t1 = allow(&mut w1, &s, "a", &c, 2);
        let t2 = allow(&mut w2, &s, "a", &c, 2);
        w2.record(&s, "a", &c, t2, 3, FAIL);
        let r = w1.record(&s, "a", &c, t1, 4, FAIL);
        assert_eq!((r.attempts, r.error), (1, None));
        let b = codec::decode(&s.get(&state_key("a")).unwrap().unwrap().0).unwrap();
        assert_eq!((b.consecutive_failures, b.stats(4).calls), (3, 3));
    }

    #[test]
    fn disabled_mode_touches_nothing() {
        let s = MemoryStore::new();
        let c = BreakerConfig {
            mode: Mode::Disabled,
            ..cfg()
        };
        let a = Registry::new(10).admit(&s, "a", &c, 0);
        assert_eq!(a.admission, Admission::Untracked(Untracked::Disabled));
        assert!(!Untracked::Disabled.counted());
        assert!(s.is_empty());
    }

    #[test]
    fn corrupt_state_fails_open_and_restarts() {
        let s = MemoryStore::new();
        Registry::ensure_index(&s).unwrap();
        let mut w = Registry::new(10);
        let c = cfg();
        allow(&mut w, &s, "a", &c, 0);
        s.put_raw(&state_key("a"), b"\xde\xad\xbe\xef");
        let a = w.admit(&s, "a", &c, 0);
        assert!(matches!(a.admission, Admission::Allow(_)));
        assert_eq!(a.corrupt, Some(CodecError::Malformed));
        assert!(codec::decode(&s.get(&state_key("a")).unwrap().unwrap().0).is_ok());
    }

    #[test]
    fn missing_state_fails_open_and_is_recreated_only_after_the_grace_period() {
        let s = MemoryStore::new();
        // Registered by another worker that has not written the state yet.
        s.put_raw(INDEX_KEY, &encode_index(&["a".to_string()]));
        let mut w = Registry::new(10);
        let c = cfg();
        let a = w.admit(&s, "a", &c, 0);
        assert_eq!(
            a.admission,
            Admission::Untracked(Untracked::Store(UpdateError::Missing))
        );
        assert!(
            s.get(&state_key("a")).unwrap().is_none(),
            "only the creator writes first"
        );
        let a = w.admit(&s, "a", &c, MISSING_GRACE_MS - 1);
        assert!(matches!(a.admission, Admission::Untracked(_)));
        allow(&mut w, &s, "a", &c, MISSING_GRACE_MS);
        assert!(s.get(&state_key("a")).unwrap().is_some());
    }

    #[test]
    fn index_round_trips_and_rejects_garbage() {
        let keys = vec![
            "a".to_string(),
            "outbound|8083||auth.svc".to_string(),
            String::new(),
        ];
        assert_eq!(decode_index(&encode_index(&keys)), Some(keys));
        assert_eq!(decode_index(b""), None);
        assert_eq!(decode_index(&[0xCA, 1, 255, 255, 255, 255]), None);
        let mut trailing = encode_index(&[]);
        trailing.push(0);
        assert_eq!(decode_index(&trailing), None);
    }
}
