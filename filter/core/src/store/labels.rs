//! Which upstream keys get metric series of their own (contract section 6).
//!
//! Envoy never frees a stat, and with `idle_timeout` new keys keep taking the slots of idle ones, so a
//! client choosing keys (`authority`, `header:NAME`, gRPC names) could grow Envoy's memory without
//! bound one series at a time. So one Envoy labels at most a fixed number of distinct keys over its
//! life (all its workers together, across reconfigurations); every further key is counted as
//! `_other`. The stores keep the tally where all workers see it: shared data in wasm
//! ([`super::SharedData`]), the process in the native module ([`Labels`]).

use std::collections::HashSet;
use std::sync::{Mutex, PoisonError};

/// Whether a key may name its own series.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Label {
    /// It may: it is one of the labelled keys.
    Own,
    /// It may not: counted as `_other`. `first` for the first key turned away, to be logged once.
    Other {
        /// The first key turned away in this Envoy's life.
        first: bool,
    },
}

/// The labelled keys of one process (the native module: every worker is a thread of it).
#[derive(Debug, Default)]
pub struct Labels {
    inner: Mutex<Tally>,
}

#[derive(Debug, Default)]
struct Tally {
    /// Hashes of the labelled keys: 8 bytes a key however long the key, and a collision (one in 2^64
    /// a pair) only gives a key its own series without counting it.
    keys: HashSet<u64>,
    /// A key was turned away already.
    overflowed: bool,
}

impl Labels {
    /// No key labelled yet.
    pub fn new() -> Self {
        Self::default()
    }

    /// Whether `key` gets its own series, when at most `limit` keys may.
    pub fn label(&self, key: &str, limit: u32) -> Label {
        let mut tally = self.inner.lock().unwrap_or_else(PoisonError::into_inner);
        let hash = fnv1a(key);
        if tally.keys.contains(&hash) {
            return Label::Own;
        }
        if tally.keys.len() < limit as usize {
            tally.keys.insert(hash);
            return Label::Own;
        }
        let first = !tally.overflowed;
        tally.overflowed = true;
        Label::Other { first }
    }
}

/// FNV-1a, 64 bits: stable across builds and runs.
pub(crate) fn fnv1a(key: &str) -> u64 {
    key.bytes().fold(0xcbf2_9ce4_8422_2325_u64, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    #[cfg(target_arch = "wasm32")]
    use wasm_bindgen_test::wasm_bindgen_test as test;

    #[test]
    fn at_most_limit_keys_are_labelled_and_the_first_other_is_told() {
        let l = Labels::new();
        assert_eq!(l.label("a", 2), Label::Own);
        assert_eq!(l.label("b", 2), Label::Own);
        assert_eq!(l.label("a", 2), Label::Own, "asking again costs nothing");
        assert_eq!(l.label("c", 2), Label::Other { first: true });
        assert_eq!(l.label("d", 2), Label::Other { first: false });
        assert_eq!(l.label("c", 2), Label::Other { first: false });
        assert_eq!(l.label("b", 2), Label::Own, "a labelled key stays labelled");
    }
}
