//! Where breakers live.
//!
//! A [`BreakerStore`] is a fixed table of slots, each holding one upstream's [`Slot`] (its key, its
//! breaker, when it was last called), changed one slot at a time by [`BreakerStore::update`]. Two
//! implementations:
//!
//! - [`SharedData`] over a [`SharedStore`]: Envoy's shared data, which every worker VM of one `vm_id`
//!   sees. It offers `get` (bytes and a CAS token) and `set` (failing with `CasMismatch` if someone
//!   wrote in between), nothing more: no atomic create, no delete, no listing. Each slot is one key;
//!   an update is a bounded compare-and-swap loop over its encoded bytes. [`MemoryStore`] has exactly
//!   these semantics, so the harness and the property tests run the same races as Envoy.
//! - [`LocalStore`]: one table in the process, for the native module, where every Envoy worker is a
//!   thread of the same process; a slot is a mutex around the decoded slot.
//!
//! The registry ([`crate::registry`]) decides which slot a key lives in; the store only keeps them.

mod labels;
mod local;
mod shared_data;

use std::fmt;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Mutex;

pub(crate) use labels::fnv1a;
pub use labels::{Label, Labels};
pub use local::LocalStore;
pub use shared_data::SharedData;

use crate::breaker::Breaker;
use crate::codec::CodecError;

/// Envoy's CAS token. 0 means "no check", so a token of 0 from a read is refused.
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
    /// its token is no longer `cas`. A key that does not exist yet is written whatever the token.
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
                // Reuse the buffer: a slot's encoding keeps its size, so this rarely reallocates.
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
/// can spend here (an attempt is a few microseconds): when it is reached the call fails open (an
/// admission) or its outcome waits for a retry (a record), counted and logged, rather than spin.
pub const MAX_CAS_ATTEMPTS: u32 = 64;

/// One upstream's entry in the table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Slot {
    /// The upstream key this slot belongs to.
    pub key: String,
    /// When a call of this upstream was last admitted or recorded (host ms): a Closed breaker idle
    /// for `idle_timeout` gives its slot up to a new upstream when the table is full.
    pub last_call_ms: u64,
    /// When the configuration that last shaped this breaker's window was loaded (host ms). An older
    /// configuration still serving its last streams never reshapes it back.
    pub shaped_ms: u64,
    /// The breaker.
    pub breaker: Breaker,
}

/// What a slot holds, as read.
// Reads are short-lived values on the stack, and nearly all of them hold a slot: boxing it would add
// an allocation to every read to shrink the rare other two.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SlotRead {
    /// Nobody has claimed it.
    Empty,
    /// An upstream's breaker.
    Held(Slot),
    /// Bytes that do not decode: nobody can tell whose breaker it was.
    Corrupt(CodecError),
}

/// The result of a successful [`BreakerStore::update`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Updated<R> {
    /// What the change function returned (on the attempt that was written).
    pub value: R,
    /// Attempts lost to another worker's write and retried (0 = no contention).
    pub retries: u32,
    /// The stored bytes could not be decoded; the change saw an empty slot, and its result replaced
    /// them.
    pub corrupt: Option<CodecError>,
}

/// Why an update did not happen.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum UpdateError {
    /// [`MAX_CAS_ATTEMPTS`] attempts all lost the race.
    GaveUp,
    /// The host refused a call.
    Store(StoreError),
}

impl fmt::Display for UpdateError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            UpdateError::GaveUp => write!(f, "gave up after {MAX_CAS_ATTEMPTS} CAS attempts"),
            UpdateError::Store(e) => write!(f, "{e}"),
        }
    }
}

impl std::error::Error for UpdateError {}

/// Whether an update may start from the latest read of the slot instead of reading it again.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Read {
    /// Read the slot now: an admission must see what other workers did.
    Fresh,
    /// Start from this worker's latest read when it is of this slot: a record nearly always writes,
    /// and its compare-and-swap fails (and is redone on a fresh read) if anyone wrote since.
    Reuse,
}

/// A table of breaker slots.
pub trait BreakerStore {
    /// Slots in the table.
    fn capacity(&self) -> u32;

    /// Makes the table ready before traffic (creates the shared-data entries of every slot).
    fn prepare(&mut self) -> Result<(), StoreError>;

    /// Reads slot `i`.
    fn read(&mut self, i: u32) -> Result<SlotRead, UpdateError>;

    /// Applies `change` to slot `i` (`None`: empty) and stores the result, atomically with respect to
    /// every other worker. `change` returns its result and whether it may have changed the slot;
    /// nothing is written when it did not. It may run several times, each time on the freshest
    /// content, so it must depend only on its input.
    fn update<R>(
        &mut self,
        i: u32,
        read: Read,
        change: impl FnMut(&mut Option<Slot>) -> (R, bool),
    ) -> Result<Updated<R>, UpdateError>;

    /// Whether `key` gets metric series of its own, when at most `limit` keys may over the life of
    /// the Envoy, counted across every worker (see [`labels`]). Asked once per key by each worker,
    /// which remembers the answer.
    fn label(&mut self, key: &str, limit: u32) -> Result<Label, UpdateError>;
}
