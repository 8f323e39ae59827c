//! The breaker table in Envoy shared data: one key per slot, each update a bounded compare-and-swap
//! loop over the slot's encoded bytes.

use super::{
    BreakerStore, CasToken, Label, Read, SharedStore, Slot, SlotRead, StoreError, UpdateError,
    Updated, MAX_CAS_ATTEMPTS,
};
use crate::codec::{decode_slot, encode_slot, encode_slot_into};

/// The tally of labelled keys (see [`super::labels`]): 4 bytes of count, little-endian, and one byte
/// set once a key was turned away. One for the whole Envoy, whatever the table's capacity.
const LABEL_TALLY: &str = "circuit_breaker.labels";
/// Under `circuit_breaker.label.<key>`: the key is labelled.
const LABEL_PREFIX: &str = "circuit_breaker.label.";

/// A [`BreakerStore`] over shared data, as one worker uses it (it keeps that worker's latest read).
///
/// Slot `i` lives under `circuit_breaker.v3.<capacity>.<i>`: the capacity is in the name because it
/// decides which slot a key hashes to, so a configuration with another `max_upstreams` starts a
/// table of its own rather than misreading this one.
#[derive(Debug)]
pub struct SharedData<S> {
    store: S,
    capacity: u32,
    prefix: String,
    /// Scratch for the key of the slot in hand, so an update does not allocate one.
    key: String,
    /// Scratch for encodings.
    encoded: Vec<u8>,
    /// The latest read that no write of ours followed: slot, bytes, token. A record usually follows
    /// an admission that read the slot and wrote nothing, and then it spares its own read.
    last: Option<(u32, Vec<u8>, CasToken)>,
}

impl<S: SharedStore> SharedData<S> {
    /// The table of `capacity` slots (at least one) in `store`.
    pub fn new(store: S, capacity: u32) -> Self {
        let capacity = capacity.max(1);
        Self {
            store,
            capacity,
            prefix: format!("circuit_breaker.v3.{capacity}."),
            key: String::new(),
            encoded: Vec::new(),
            last: None,
        }
    }

    /// The underlying store.
    pub fn inner(&self) -> &S {
        &self.store
    }

    /// The shared-data key of slot `i`.
    pub fn slot_key(&self, i: u32) -> String {
        format!("{}{i}", self.prefix)
    }

    fn set_key(&mut self, i: u32) {
        use std::fmt::Write as _;
        self.key.clear();
        self.key.push_str(&self.prefix);
        let _ = write!(self.key, "{i}");
    }

    /// A read, refusing a CAS token of 0: Envoy treats 0 as "no check", so writing back with it would
    /// overwrite whatever another worker wrote meanwhile. This is the one place reads come through.
    fn get(&self, key: &str) -> Result<Option<(Vec<u8>, CasToken)>, StoreError> {
        match self.store.get(key)? {
            Some((_, 0)) => Err(StoreError::Host(format!(
                "get({key}) answered CAS token 0, which would make the next write unchecked"
            ))),
            other => Ok(other),
        }
    }

    /// Tries `change` on the latest read of slot `i`, if there is one: `Some` when that settled it.
    fn try_last_read<R>(
        &mut self,
        i: u32,
        change: &mut impl FnMut(&mut Option<Slot>) -> (R, bool),
    ) -> Result<Option<Updated<R>>, UpdateError> {
        let Some((slot, bytes, cas)) = self.last.take().filter(|(s, _, _)| *s == i) else {
            return Ok(None);
        };
        let Ok(mut content) = decode_slot(&bytes) else {
            return Ok(None);
        };
        let (value, changed) = change(&mut content);
        encode_slot_into(content.as_ref(), &mut self.encoded);
        // A change that writes nothing is never settled here: no compare-and-swap vouches for it.
        if !changed || self.encoded == bytes {
            self.last = Some((slot, bytes, cas));
            return Ok(None);
        }
        match self.store.set(&self.key, &self.encoded, Some(cas)) {
            Ok(()) => Ok(Some(Updated {
                value,
                retries: 0,
                corrupt: None,
            })),
            // Someone wrote since: the caller reads afresh (not counted as a retry).
            Err(StoreError::CasMismatch) => Ok(None),
            Err(e) => Err(UpdateError::Store(e)),
        }
    }
}

impl<S: SharedStore> BreakerStore for SharedData<S> {
    fn capacity(&self) -> u32 {
        self.capacity
    }

    /// Creates every slot, once per table: shared data has no atomic create, so a slot first written
    /// during traffic by two workers at once could lose one's write. Done at configuration time, before
    /// this worker's traffic; the `ready` marker spares later workers and reloads the walk.
    fn prepare(&mut self) -> Result<(), StoreError> {
        let ready = format!("{}ready", self.prefix);
        if self.get(&ready)?.is_some() {
            return Ok(());
        }
        if self.get(LABEL_TALLY)?.is_none() {
            self.store.set(LABEL_TALLY, &tally(0, false), None)?;
        }
        let empty = encode_slot(None);
        for i in 0..self.capacity {
            self.set_key(i);
            if self.get(&self.key)?.is_none() {
                self.store.set(&self.key, &empty, None)?;
            }
        }
        self.store.set(&ready, b"1", None)
    }

    fn read(&mut self, i: u32) -> Result<SlotRead, UpdateError> {
        self.set_key(i);
        let Some((bytes, _)) = self.get(&self.key).map_err(UpdateError::Store)? else {
            return Ok(SlotRead::Empty);
        };
        Ok(match decode_slot(&bytes) {
            Ok(Some(slot)) => SlotRead::Held(slot),
            Ok(None) => SlotRead::Empty,
            Err(e) => SlotRead::Corrupt(e),
        })
    }

    fn update<R>(
        &mut self,
        i: u32,
        read: Read,
        mut change: impl FnMut(&mut Option<Slot>) -> (R, bool),
    ) -> Result<Updated<R>, UpdateError> {
        self.set_key(i);
        if read == Read::Reuse {
            if let Some(done) = self.try_last_read(i, &mut change)? {
                return Ok(done);
            }
        }
        self.last = None;
        for retries in 0..MAX_CAS_ATTEMPTS {
            let stored = self.get(&self.key).map_err(UpdateError::Store)?;
            // A slot not created yet (prepare failed) is empty; its first write cannot be checked.
            let (bytes, cas) = stored.map_or((Vec::new(), None), |(b, c)| (b, Some(c)));
            let (mut content, corrupt) = match cas.map(|_| decode_slot(&bytes)) {
                None => (None, None),
                Some(Ok(content)) => (content, None),
                Some(Err(e)) => (None, Some(e)),
            };
            let (value, changed) = change(&mut content);
            let done = Updated {
                value,
                retries,
                corrupt,
            };
            if changed || corrupt.is_some() || cas.is_none() {
                encode_slot_into(content.as_ref(), &mut self.encoded);
            }
            let unchanged =
                corrupt.is_none() && cas.is_some() && (!changed || self.encoded == bytes);
            if unchanged {
                self.last = cas.map(|c| (i, bytes, c));
                return Ok(done);
            }
            match self.store.set(&self.key, &self.encoded, cas) {
                Ok(()) => return Ok(done),
                Err(StoreError::CasMismatch) => continue,
                Err(e) => return Err(UpdateError::Store(e)),
            }
        }
        Err(UpdateError::GaveUp)
    }

    /// A key is labelled when its marker is there; otherwise it takes one unit of the tally, by
    /// compare-and-swap, while any is left. Shared data cannot create a key atomically, so two
    /// workers labelling the same new key at once may both count it: the tally can only overstate,
    /// and the bound holds.
    fn label(&mut self, key: &str, limit: u32) -> Result<Label, UpdateError> {
        let marker = format!("{LABEL_PREFIX}{key}");
        if self.get(&marker).map_err(UpdateError::Store)?.is_some() {
            return Ok(Label::Own);
        }
        for _ in 0..MAX_CAS_ATTEMPTS {
            let stored = self.get(LABEL_TALLY).map_err(UpdateError::Store)?;
            let (count, overflowed, cas) = match &stored {
                Some((bytes, cas)) => match read_tally(bytes) {
                    Some((n, o)) => (n, o, Some(*cas)),
                    // Foreign bytes: start the tally over rather than fail every new key.
                    None => (0, false, Some(*cas)),
                },
                None => (0, false, None),
            };
            let (next, label) = if count < limit {
                (tally(count + 1, overflowed), Label::Own)
            } else if overflowed {
                return Ok(Label::Other { first: false });
            } else {
                (tally(count, true), Label::Other { first: true })
            };
            match self.store.set(LABEL_TALLY, &next, cas) {
                Ok(()) => {
                    if label == Label::Own {
                        self.store
                            .set(&marker, b"1", None)
                            .map_err(UpdateError::Store)?;
                    }
                    return Ok(label);
                }
                Err(StoreError::CasMismatch) => continue,
                Err(e) => return Err(UpdateError::Store(e)),
            }
        }
        Err(UpdateError::GaveUp)
    }
}

fn tally(count: u32, overflowed: bool) -> [u8; 5] {
    let [a, b, c, d] = count.to_le_bytes();
    [a, b, c, d, u8::from(overflowed)]
}

fn read_tally(bytes: &[u8]) -> Option<(u32, bool)> {
    let [a, b, c, d, o] = <[u8; 5]>::try_from(bytes).ok()?;
    Some((u32::from_le_bytes([a, b, c, d]), o != 0))
}

#[cfg(test)]
mod tests {
    use std::cell::Cell;

    use super::*;
    use crate::breaker::Breaker;
    use crate::codec::CodecError;
    use crate::config::BreakerConfig;
    use crate::store::MemoryStore;
    #[cfg(target_arch = "wasm32")]
    use wasm_bindgen_test::wasm_bindgen_test as test;

    fn slot(key: &str) -> Slot {
        Slot {
            key: key.into(),
            last_call_ms: 0,
            shaped_ms: 0,
            breaker: Breaker::new(&BreakerConfig::default()),
        }
    }

    fn bump(content: &mut Option<Slot>) -> ((), bool) {
        if let Some(s) = content {
            s.breaker.consecutive_failures += 1;
        }
        ((), true)
    }

    fn failures(t: &mut SharedData<impl SharedStore>) -> u32 {
        match t.read(0).unwrap() {
            SlotRead::Held(s) => s.breaker.consecutive_failures,
            other => panic!("{other:?}"),
        }
    }

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
    fn prepare_creates_every_slot_once() {
        let s = MemoryStore::new();
        let mut t = SharedData::new(&s, 8);
        t.prepare().unwrap();
        assert_eq!(s.len(), 10, "8 slots, the ready marker and the label tally");
        assert_eq!(t.read(7).unwrap(), SlotRead::Empty);
        t.update(3, Read::Fresh, |c| {
            *c = Some(slot("a"));
            ((), true)
        })
        .unwrap();
        let mut again = SharedData::new(&s, 8);
        again.prepare().unwrap();
        assert!(
            matches!(again.read(3).unwrap(), SlotRead::Held(_)),
            "a later prepare wipes nothing"
        );
        let mut other = SharedData::new(&s, 4);
        other.prepare().unwrap();
        assert_eq!(s.len(), 10 + 5, "another capacity is another table");
    }

    #[test]
    fn update_writes_only_when_changed() {
        let s = MemoryStore::new();
        let mut t = SharedData::new(&s, 1);
        t.prepare().unwrap();
        t.update(0, Read::Fresh, |c| {
            *c = Some(slot("a"));
            ((), true)
        })
        .unwrap();
        let (_, t0) = s.get(&t.slot_key(0)).unwrap().unwrap();
        let u = t.update(0, Read::Fresh, |_| ((), false)).unwrap();
        assert_eq!(u.retries, 0);
        assert_eq!(s.get(&t.slot_key(0)).unwrap().unwrap().1, t0, "no write");
        // Claims a change but encodes to the stored bytes: not written either.
        t.update(0, Read::Fresh, |_| ((), true)).unwrap();
        assert_eq!(s.get(&t.slot_key(0)).unwrap().unwrap().1, t0, "no write");
        t.update(0, Read::Fresh, bump).unwrap();
        assert_eq!(failures(&mut t), 1);
    }

    /// Shared data with a rival who writes between our reads and our writes, `rivals` times.
    struct Rival {
        inner: MemoryStore,
        rivals: Cell<u32>,
        gets: Cell<u32>,
    }

    impl SharedStore for Rival {
        fn get(&self, key: &str) -> Result<Option<(Vec<u8>, CasToken)>, StoreError> {
            self.gets.set(self.gets.get() + 1);
            let got = self.inner.get(key);
            if self.rivals.get() > 0 {
                self.rivals.set(self.rivals.get() - 1);
                if let Ok(Some((bytes, _))) = &got {
                    self.inner.put_raw(key, bytes);
                }
            }
            got
        }
        fn set(&self, key: &str, value: &[u8], cas: Option<CasToken>) -> Result<(), StoreError> {
            self.inner.set(key, value, cas)
        }
    }

    fn rival_table(rivals: u32) -> (Rival, u32) {
        let r = Rival {
            inner: MemoryStore::new(),
            rivals: Cell::new(0),
            gets: Cell::new(0),
        };
        r.inner
            .put_raw("circuit_breaker.v3.1.0", &encode_slot(Some(&slot("a"))));
        r.inner.put_raw("circuit_breaker.v3.1.ready", b"1");
        r.rivals.set(rivals);
        (r, rivals)
    }

    #[test]
    fn update_retries_on_a_lost_race_and_gives_up_eventually() {
        let (r, _) = rival_table(2);
        let mut t = SharedData::new(&r, 1);
        let u = t.update(0, Read::Fresh, bump).unwrap();
        assert_eq!(u.retries, 2);
        assert_eq!(failures(&mut t), 1);
        let (r, _) = rival_table(u32::MAX);
        let mut t = SharedData::new(&r, 1);
        assert_eq!(t.update(0, Read::Fresh, bump), Err(UpdateError::GaveUp));
    }

    #[test]
    fn the_last_read_is_reused_only_when_a_compare_and_swap_vouches_for_it() {
        let (r, _) = rival_table(0);
        let mut t = SharedData::new(&r, 1);
        // A read that wrote nothing is kept...
        t.update(0, Read::Fresh, |_| ((), false)).unwrap();
        assert_eq!(r.gets.get(), 1);
        // ...and the next change that writes starts from it instead of reading.
        t.update(0, Read::Reuse, bump).unwrap();
        assert_eq!((r.gets.get(), failures(&mut t)), (1, 1));
        let gets = r.gets.get();
        // Someone wrote since the kept read: the write fails and the change is redone on a fresh
        // read, from the rival's state, so nothing is lost.
        t.update(0, Read::Fresh, |_| ((), false)).unwrap();
        let mut rival = SharedData::new(&r.inner, 1);
        rival.update(0, Read::Fresh, bump).unwrap();
        let u = t.update(0, Read::Reuse, bump).unwrap();
        assert_eq!(u.retries, 0, "the stale attempt is not a retry");
        assert_eq!(r.gets.get(), gets + 2);
        assert_eq!(failures(&mut SharedData::new(&r.inner, 1)), 3);
        // A change that would write nothing is never settled on a kept read: it reads.
        t.update(0, Read::Fresh, |_| ((), false)).unwrap();
        let gets = r.gets.get();
        t.update(0, Read::Reuse, |_| ((), false)).unwrap();
        assert_eq!(r.gets.get(), gets + 1);
    }

    #[test]
    fn corrupt_bytes_are_seen_as_empty_and_replaced() {
        let s = MemoryStore::new();
        let mut t = SharedData::new(&s, 1);
        t.prepare().unwrap();
        s.put_raw(&t.slot_key(0), b"\x00garbage");
        assert!(matches!(t.read(0).unwrap(), SlotRead::Corrupt(_)));
        let u = t
            .update(0, Read::Fresh, |c| {
                assert!(c.is_none());
                ((), false)
            })
            .unwrap();
        assert_eq!(u.corrupt, Some(CodecError::Malformed));
        assert_eq!(t.read(0).unwrap(), SlotRead::Empty, "rewritten");
    }

    #[test]
    fn every_worker_draws_labels_from_one_tally() {
        let s = MemoryStore::new();
        let mut a = SharedData::new(&s, 8);
        let mut b = SharedData::new(&s, 16);
        a.prepare().unwrap();
        assert_eq!(a.label("x", 2).unwrap(), Label::Own);
        assert_eq!(
            b.label("x", 2).unwrap(),
            Label::Own,
            "seen by another worker"
        );
        assert_eq!(b.label("y", 2).unwrap(), Label::Own);
        assert_eq!(a.label("z", 2).unwrap(), Label::Other { first: true });
        assert_eq!(b.label("w", 2).unwrap(), Label::Other { first: false });
        assert_eq!(a.label("y", 2).unwrap(), Label::Own);
        // A configuration with a larger limit labels more, from the same tally.
        assert_eq!(b.label("z", 3).unwrap(), Label::Own);
        assert_eq!(a.label("v", 3).unwrap(), Label::Other { first: false });
    }

    #[test]
    fn a_cas_token_of_zero_is_refused_on_every_path() {
        struct ZeroToken(MemoryStore);
        impl SharedStore for ZeroToken {
            fn get(&self, key: &str) -> Result<Option<(Vec<u8>, CasToken)>, StoreError> {
                Ok(self.0.get(key)?.map(|(v, _)| (v, 0)))
            }
            fn set(&self, key: &str, v: &[u8], cas: Option<CasToken>) -> Result<(), StoreError> {
                self.0.set(key, v, cas)
            }
        }
        let z = ZeroToken(MemoryStore::new());
        z.0.put_raw("circuit_breaker.v3.1.0", &encode_slot(Some(&slot("a"))));
        let mut t = SharedData::new(&z, 1);
        assert!(matches!(
            t.read(0),
            Err(UpdateError::Store(StoreError::Host(_)))
        ));
        assert!(matches!(
            t.update(0, Read::Fresh, bump),
            Err(UpdateError::Store(StoreError::Host(_)))
        ));
        assert!(matches!(
            t.update(0, Read::Reuse, bump),
            Err(UpdateError::Store(StoreError::Host(_)))
        ));
    }
}
