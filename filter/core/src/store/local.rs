//! The breaker table in the process: the native module's store.
//!
//! Every Envoy worker is a thread of one process, so the breakers can live in memory they all share.
//! Each slot is a mutex around the decoded [`Slot`]: an update locks it, runs the change and unlocks,
//! with no encoding, decoding or retry. The alternative, the shared-data layout over an in-process
//! compare-and-swap map, pays a decode and an encode on every call; `make bench` measures both.

use std::sync::{Arc, Mutex, PoisonError};

use super::{BreakerStore, Label, Labels, Read, Slot, SlotRead, StoreError, UpdateError, Updated};

/// A process-wide table of `capacity` slots.
#[derive(Debug)]
pub struct LocalStore {
    slots: Box<[Mutex<Option<Slot>>]>,
    /// The labelled keys, shared with every other table of the process.
    labels: Arc<Labels>,
}

impl LocalStore {
    /// An empty table of `capacity` slots (at least one), with its own tally of labelled keys.
    pub fn new(capacity: u32) -> Self {
        Self::with_labels(capacity, Arc::new(Labels::new()))
    }

    /// An empty table of `capacity` slots (at least one) whose keys are labelled from `labels`, the
    /// process's one tally.
    pub fn with_labels(capacity: u32, labels: Arc<Labels>) -> Self {
        Self {
            slots: (0..capacity.max(1)).map(|_| Mutex::new(None)).collect(),
            labels,
        }
    }

    fn slot(&self, i: u32) -> Result<&Mutex<Option<Slot>>, UpdateError> {
        self.slots.get(i as usize).ok_or_else(|| {
            UpdateError::Store(StoreError::Host(format!(
                "slot {i} outside a table of {}",
                self.slots.len()
            )))
        })
    }
}

/// Each worker holds the table through a reference (an `Arc` in the native module, a plain borrow in
/// tests and benches).
impl<T: std::ops::Deref<Target = LocalStore>> BreakerStore for T {
    fn capacity(&self) -> u32 {
        self.slots.len() as u32
    }

    fn prepare(&mut self) -> Result<(), StoreError> {
        Ok(())
    }

    fn read(&mut self, i: u32) -> Result<SlotRead, UpdateError> {
        // A poisoned lock means a panic elsewhere while it was held: the slot's data is still whole
        // (changes are plain assignments), so it is used rather than failing every call after.
        let guard = self.slot(i)?.lock().unwrap_or_else(PoisonError::into_inner);
        Ok(guard.clone().map_or(SlotRead::Empty, SlotRead::Held))
    }

    fn update<R>(
        &mut self,
        i: u32,
        _read: Read,
        mut change: impl FnMut(&mut Option<Slot>) -> (R, bool),
    ) -> Result<Updated<R>, UpdateError> {
        let mut guard = self.slot(i)?.lock().unwrap_or_else(PoisonError::into_inner);
        let (value, _) = change(&mut guard);
        Ok(Updated {
            value,
            retries: 0,
            corrupt: None,
        })
    }

    fn label(&mut self, key: &str, limit: u32) -> Result<Label, UpdateError> {
        Ok(self.labels.label(key, limit))
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::breaker::Breaker;
    use crate::config::BreakerConfig;
    #[cfg(target_arch = "wasm32")]
    use wasm_bindgen_test::wasm_bindgen_test as test;

    #[cfg(not(target_arch = "wasm32"))]
    #[test]
    fn threads_share_one_table() {
        let table = Arc::new(LocalStore::new(4));
        let threads: Vec<_> = (0..4)
            .map(|_| {
                let mut t = Arc::clone(&table);
                std::thread::spawn(move || {
                    for _ in 0..1_000 {
                        t.update(2, Read::Fresh, |c| {
                            let s = c.get_or_insert_with(|| Slot {
                                key: "a".into(),
                                last_call_ms: 0,
                                shaped_ms: 0,
                                breaker: Breaker::new(&BreakerConfig::default()),
                            });
                            s.last_call_ms += 1;
                            ((), true)
                        })
                        .unwrap();
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        let mut t = Arc::clone(&table);
        match t.read(2).unwrap() {
            SlotRead::Held(s) => assert_eq!(s.last_call_ms, 4_000, "no update lost"),
            other => panic!("{other:?}"),
        }
        assert_eq!(t.read(0).unwrap(), SlotRead::Empty);
        assert!(t.read(4).is_err(), "outside the table");
        assert_eq!(t.capacity(), 4);
    }
}
