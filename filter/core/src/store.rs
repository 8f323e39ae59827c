//! Where breaker state lives: a key-value store with Envoy shared-data semantics, and the bounded
//! compare-and-swap loop every change goes through.
//!
//! Envoy's shared data (per `vm_id`, shared by every worker thread's VM) offers exactly two calls: `get`
//! returns the bytes and a CAS token; `set` with a token fails with `CasMismatch` if someone wrote in
//! between. A `set` of a key that does not exist yet always succeeds, whatever token it carries; there
//! is no atomic "create" and no delete. [`MemoryStore`] reproduces all of this, so the harness and the
//! property tests exercise the same races as Envoy.

use std::fmt;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Mutex;

use crate::breaker::Breaker;
use crate::codec::{self, CodecError};

/// Envoy's CAS token. 0 means "no check".
pub type CasToken = u32;

/// A failed store call.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StoreError {
    /// Someone else wrote the key since our `get`.
    CasMismatch,
    /// The host answered something unexpected; the text says what.
    Host(String),
}

impl fmt::Display for StoreError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            StoreError::CasMismatch => write!(f, "CAS mismatch"),
            StoreError::Host(why) => write!(f, "shared data: {why}"),
        }
    }
}

impl std::error::Error for StoreError {}

/// Storage with Envoy shared-data semantics.
pub trait SharedStore {
    /// The value and its CAS token, or `None` if the key was never written.
    fn get(&self, key: &str) -> Result<Option<(Vec<u8>, CasToken)>, StoreError>;
    /// Writes `value`. With `Some(cas)`, fails with [`StoreError::CasMismatch`] when the key exists and
    /// its token is no longer `cas`.
    fn set(&self, key: &str, value: &[u8], cas: Option<CasToken>) -> Result<(), StoreError>;
}

impl<S: SharedStore + ?Sized> SharedStore for &S {
    fn get(&self, key: &str) -> Result<Option<(Vec<u8>, CasToken)>, StoreError> {
        (**self).get(key)
    }
    fn set(&self, key: &str, value: &[u8], cas: Option<CasToken>) -> Result<(), StoreError> {
        (**self).set(key, value, cas)
    }
}

impl<S: SharedStore + ?Sized> SharedStore for std::sync::Arc<S> {
    fn get(&self, key: &str) -> Result<Option<(Vec<u8>, CasToken)>, StoreError> {
        (**self).get(key)
    }
    fn set(&self, key: &str, value: &[u8], cas: Option<CasToken>) -> Result<(), StoreError> {
        (**self).set(key, value, cas)
    }
}

/// A thread-safe in-memory store that behaves like Envoy's shared data.
#[derive(Debug, Default)]
pub struct MemoryStore {
    map: Mutex<hashbrown::HashMap<String, (Vec<u8>, CasToken)>>,
    next_cas: AtomicU32,
}

impl MemoryStore {
    /// An empty store.
    pub fn new() -> Self {
        Self::default()
    }

    /// Writes raw bytes unconditionally (tests use it to plant corrupt data).
    pub fn put_raw(&self, key: &str, value: &[u8]) {
        let _ = self.set(key, value, None);
    }

    /// Number of keys.
    pub fn len(&self) -> usize {
        self.map.lock().map(|m| m.len()).unwrap_or(0)
    }

    /// True when no key was written.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Total bytes of all values.
    pub fn value_bytes(&self) -> usize {
        self.map
            .lock()
            .map(|m| m.values().map(|(v, _)| v.len()).sum())
            .unwrap_or(0)
    }

    fn token(&self) -> CasToken {
        // Like Envoy: a global counter that skips 0, which means "no check".
        loop {
            let t = self
                .next_cas
                .fetch_add(1, Ordering::Relaxed)
                .wrapping_add(1);
            if t != 0 {
                return t;
            }
        }
    }
}

impl SharedStore for MemoryStore {
    fn get(&self, key: &str) -> Result<Option<(Vec<u8>, CasToken)>, StoreError> {
        let map = self
            .map
            .lock()
            .map_err(|_| StoreError::Host("store lock poisoned".into()))?;
        Ok(map.get(key).cloned())
    }

    fn set(&self, key: &str, value: &[u8], cas: Option<CasToken>) -> Result<(), StoreError> {
        let token = self.token();
        let mut map = self
            .map
            .lock()
            .map_err(|_| StoreError::Host("store lock poisoned".into()))?;
        match map.get_mut(key) {
            Some(entry) => {
                if matches!(cas, Some(c) if c != 0 && c != entry.1) {
                    return Err(StoreError::CasMismatch);
                }
                // Reuse the buffer: a breaker's encoding keeps its size, so this never reallocates.
                entry.0.clear();
                entry.0.extend_from_slice(value);
                entry.1 = token;
            }
            None => {
                map.insert(key.to_string(), (value.to_vec(), token));
            }
        }
        Ok(())
    }
}

/// How many times one change is tried against concurrent writers before giving up.
///
/// Each failed attempt means another worker's write succeeded in between. With one worker per core a
/// change rarely loses more than a few times in a row; but a worker thread can be preempted between
/// its `get` and its `set` (more threads than cores, a noisy node), and then it loses once for every
/// write the others make meanwhile. The harness measured 0.4% of updates giving up at 32 attempts with
/// 8 threads hammering one key on 2 cores; 64 leaves margin for that. The bound caps the time a request
/// can spend here (an attempt is a few microseconds): when it is reached the filter fails open for that
/// call, counts it, and logs it, rather than spin.
pub const MAX_CAS_ATTEMPTS: u32 = 64;

/// The result of a successful [`update`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Updated<R> {
    /// What the change function returned (on the attempt that was written). The breaker itself is
    /// not handed back: nobody needed it, and moving its 300 bytes out cost a tenth of an update.
    pub value: R,
    /// Attempts taken (1 = no contention).
    pub attempts: u32,
    /// The stored bytes could not be decoded and the breaker was restarted.
    pub corrupt: Option<CodecError>,
}

/// Why an [`update`] did not happen.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum UpdateError {
    /// [`MAX_CAS_ATTEMPTS`] attempts all lost the race.
    GaveUp,
    /// The breaker key has not been created (see [`crate::registry`]).
    Missing,
    /// The host refused a call.
    Store(StoreError),
}

impl fmt::Display for UpdateError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            UpdateError::GaveUp => write!(f, "gave up after {MAX_CAS_ATTEMPTS} CAS attempts"),
            UpdateError::Missing => write!(f, "breaker state missing from shared data"),
            UpdateError::Store(e) => write!(f, "{e}"),
        }
    }
}

impl std::error::Error for UpdateError {}

/// Bytes read from the store with their CAS token, kept so that a later change can spare the read
/// (see [`update_with_snapshot`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Snapshot {
    /// The stored bytes.
    pub bytes: Vec<u8>,
    /// Their CAS token.
    pub cas: CasToken,
}

/// Reads a breaker, applies `change`, and writes it back with CAS, retrying on a lost race.
///
/// `change` returns its result and whether it may have changed anything; nothing is written when it
/// did not (the common Closed-state admit costs one `get`), nor when the new state encodes to the very
/// bytes that were read (the encoding is canonical, so that is an exact test, and cheaper for a caller
/// than cloning the breaker to compare it). `change` may run several times, each time on the freshest
/// state, so it must depend only on its input. Undecodable bytes are replaced by `fresh()` (and
/// reported in [`Updated::corrupt`]).
pub fn update<S, R>(
    store: &S,
    key: &str,
    fresh: impl Fn() -> Breaker,
    change: impl FnMut(&mut Breaker) -> (R, bool),
) -> Result<Updated<R>, UpdateError>
where
    S: SharedStore + ?Sized,
{
    update_with_snapshot(store, key, &mut None, fresh, change)
}

/// [`update`], sparing the read when `snapshot` holds this key's bytes as the caller read them earlier.
///
/// Reads are what an update costs in Envoy: each one hands its bytes back through an allocation
/// inside the VM, a second call into it. A change that writes does not need a fresh read to be safe:
/// its compare-and-swap fails if anyone wrote since the snapshot was read, and then the update goes
/// on exactly as [`update`] does, from a fresh read (the failed attempt is not counted in
/// [`Updated::attempts`]). A change that would write nothing is never settled on a snapshot, since no
/// CAS would vouch for it: it is redone on a fresh read. A snapshot with token 0 (which would write
/// unchecked) is not used.
///
/// On return, `snapshot` holds the latest read that no write of ours followed, or `None`: a write
/// leaves the token it read stale.
pub fn update_with_snapshot<S, R>(
    store: &S,
    key: &str,
    snapshot: &mut Option<Snapshot>,
    fresh: impl Fn() -> Breaker,
    mut change: impl FnMut(&mut Breaker) -> (R, bool),
) -> Result<Updated<R>, UpdateError>
where
    S: SharedStore + ?Sized,
{
    // Encoded in place: returning a 300-byte buffer by value is a copy per update.
    let mut encoded = codec::Encoded::new();
    if let Some(Snapshot { bytes, cas }) = snapshot.take().filter(|s| s.cas != 0) {
        if let Ok(mut breaker) = codec::decode(&bytes) {
            let (value, changed) = change(&mut breaker);
            if to_write(changed, None, &breaker, &bytes, &mut encoded) {
                match store.set(key, encoded.as_bytes(), Some(cas)) {
                    Ok(()) => {
                        return Ok(Updated {
                            value,
                            attempts: 1,
                            corrupt: None,
                        })
                    }
                    // Someone wrote since the snapshot: read afresh below.
                    Err(StoreError::CasMismatch) => {}
                    Err(e) => return Err(UpdateError::Store(e)),
                }
            }
        }
    }
    for attempt in 1..=MAX_CAS_ATTEMPTS {
        let (bytes, cas) = store
            .get(key)
            .map_err(UpdateError::Store)?
            .ok_or(UpdateError::Missing)?;
        let (mut breaker, corrupt) = match codec::decode(&bytes) {
            Ok(b) => (b, None),
            Err(e) => (fresh(), Some(e)),
        };
        let (value, changed) = change(&mut breaker);
        if !to_write(changed, corrupt, &breaker, &bytes, &mut encoded) {
            *snapshot = Some(Snapshot { bytes, cas });
            return Ok(Updated {
                value,
                attempts: attempt,
                corrupt,
            });
        }
        match store.set(key, encoded.as_bytes(), Some(cas)) {
            Ok(()) => {
                return Ok(Updated {
                    value,
                    attempts: attempt,
                    corrupt,
                })
            }
            Err(StoreError::CasMismatch) => continue,
            Err(e) => return Err(UpdateError::Store(e)),
        }
    }
    Err(UpdateError::GaveUp)
}

/// Whether to write after a change, with the bytes to write left in `encoded`: not when the change
/// says it changed nothing, nor when the new encoding is the one read. Corrupt bytes are always
/// overwritten.
fn to_write(
    changed: bool,
    corrupt: Option<CodecError>,
    breaker: &Breaker,
    read: &[u8],
    encoded: &mut codec::Encoded,
) -> bool {
    if !changed && corrupt.is_none() {
        return false;
    }
    codec::encode_into(breaker, encoded);
    corrupt.is_some() || encoded.as_bytes() != read
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::BreakerConfig;
    #[cfg(target_arch = "wasm32")]
    use wasm_bindgen_test::wasm_bindgen_test as test;

    #[test]
    fn memory_store_has_envoy_cas_semantics() {
        let s = MemoryStore::new();
        assert_eq!(s.get("k").unwrap(), None);
        s.set("k", b"a", Some(12345)).unwrap(); // absent key: the token is not checked
        let (v, t1) = s.get("k").unwrap().unwrap();
        assert_eq!(v, b"a");
        s.set("k", b"b", Some(t1)).unwrap();
        assert_eq!(s.set("k", b"c", Some(t1)), Err(StoreError::CasMismatch));
        s.set("k", b"d", None).unwrap();
        s.set("k", b"e", Some(0)).unwrap();
        assert_eq!(s.get("k").unwrap().unwrap().0, b"e");
    }

    #[test]
    fn update_writes_only_when_changed() {
        let s = MemoryStore::new();
        let cfg = BreakerConfig::default();
        s.put_raw("b", &codec::encode(&Breaker::new(&cfg)));
        let (_, t0) = s.get("b").unwrap().unwrap();
        let u = update(&s, "b", || Breaker::new(&cfg), |_| ((), false)).unwrap();
        assert_eq!(u.attempts, 1);
        assert_eq!(s.get("b").unwrap().unwrap().1, t0, "no write");
        update(
            &s,
            "b",
            || Breaker::new(&cfg),
            |b| {
                b.consecutive_failures += 1;
                ((), true)
            },
        )
        .unwrap();
        assert_eq!(
            codec::decode(&s.get("b").unwrap().unwrap().0)
                .unwrap()
                .consecutive_failures,
            1
        );
    }

    #[test]
    fn update_retries_on_a_lost_race_and_gives_up_eventually() {
        let s = MemoryStore::new();
        let cfg = BreakerConfig::default();
        s.put_raw("b", &codec::encode(&Breaker::new(&cfg)));
        // A rival writes between our get and our set on the first two attempts.
        let mut rivals = 2;
        let u = update(
            &s,
            "b",
            || Breaker::new(&cfg),
            |b| {
                if rivals > 0 {
                    rivals -= 1;
                    s.put_raw("b", &codec::encode(&Breaker::new(&cfg)));
                }
                b.consecutive_failures += 1;
                ((), true)
            },
        )
        .unwrap();
        assert_eq!(u.attempts, 3);
        let always = update(
            &s,
            "b",
            || Breaker::new(&cfg),
            |b| {
                s.put_raw("b", &codec::encode(&Breaker::new(&cfg)));
                b.consecutive_failures += 1;
                ((), true)
            },
        );
        assert_eq!(always, Err(UpdateError::GaveUp));
        // A change that claims to have changed something but encodes to the stored bytes is not
        // written, so no rival can make it lose.
        let (_, t0) = s.get("b").unwrap().unwrap();
        let same = update(&s, "b", || Breaker::new(&cfg), |_| ((), true)).unwrap();
        assert_eq!(same.attempts, 1);
        assert_eq!(s.get("b").unwrap().unwrap().1, t0, "no write");
    }

    /// Counts reads, to see which ones a snapshot spares.
    struct CountingStore {
        inner: MemoryStore,
        gets: std::cell::Cell<u32>,
    }

    impl SharedStore for CountingStore {
        fn get(&self, key: &str) -> Result<Option<(Vec<u8>, CasToken)>, StoreError> {
            self.gets.set(self.gets.get() + 1);
            self.inner.get(key)
        }
        fn set(&self, key: &str, value: &[u8], cas: Option<CasToken>) -> Result<(), StoreError> {
            self.inner.set(key, value, cas)
        }
    }

    fn failures(s: &impl SharedStore) -> u32 {
        codec::decode(&s.get("b").unwrap().unwrap().0)
            .unwrap()
            .consecutive_failures
    }

    #[test]
    fn a_snapshot_spares_the_read_only_when_its_cas_vouches_for_it() {
        let s = CountingStore {
            inner: MemoryStore::new(),
            gets: std::cell::Cell::new(0),
        };
        let cfg = BreakerConfig::default();
        s.inner.put_raw("b", &codec::encode(&Breaker::new(&cfg)));
        let fail = |b: &mut Breaker| {
            b.consecutive_failures += 1;
            ((), true)
        };
        // A read that wrote nothing leaves its snapshot...
        let mut snap = None;
        update_with_snapshot(&s, "b", &mut snap, || Breaker::new(&cfg), |_| ((), false)).unwrap();
        assert!(snap.is_some());
        assert_eq!(s.gets.get(), 1);
        // ...which the next change that writes uses instead of reading; its write makes it stale.
        let u = update_with_snapshot(&s, "b", &mut snap, || Breaker::new(&cfg), fail).unwrap();
        assert_eq!((u.attempts, s.gets.get(), failures(&s.inner)), (1, 1, 1));
        assert!(snap.is_none());
        // Someone else wrote since the snapshot: its CAS fails, and the change is redone on a fresh
        // read, from the rival's state (no outcome lost, nothing overwritten).
        update_with_snapshot(&s, "b", &mut snap, || Breaker::new(&cfg), |_| ((), false)).unwrap();
        let rival = update(&s.inner, "b", || Breaker::new(&cfg), fail).unwrap();
        assert_eq!(rival.attempts, 1);
        let gets = s.gets.get();
        let u = update_with_snapshot(&s, "b", &mut snap, || Breaker::new(&cfg), fail).unwrap();
        assert_eq!(
            (u.attempts, s.gets.get(), failures(&s.inner)),
            (1, gets + 1, 3)
        );
        // A change that would write nothing is never settled on a snapshot: it reads.
        update_with_snapshot(&s, "b", &mut snap, || Breaker::new(&cfg), |_| ((), false)).unwrap();
        let gets = s.gets.get();
        update_with_snapshot(&s, "b", &mut snap, || Breaker::new(&cfg), |_| ((), false)).unwrap();
        assert_eq!(s.gets.get(), gets + 1);
    }

    #[test]
    fn corrupt_bytes_restart_the_breaker() {
        let s = MemoryStore::new();
        let cfg = BreakerConfig::default();
        s.put_raw("b", b"\x00garbage");
        let u = update(&s, "b", || Breaker::new(&cfg), |_| ((), false)).unwrap();
        assert_eq!(u.corrupt, Some(CodecError::Malformed));
        assert!(
            codec::decode(&s.get("b").unwrap().unwrap().0).is_ok(),
            "fresh state written back"
        );
        assert_eq!(
            update(&s, "missing", || Breaker::new(&cfg), |_| ((), false)),
            Err(UpdateError::Missing)
        );
    }
}
