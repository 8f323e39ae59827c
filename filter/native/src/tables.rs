//! The breaker tables of the process: one per `max_upstreams`, shared by every worker and every
//! filter configuration, and kept for the life of the process.
//!
//! All of Envoy's workers are threads of one process, so the breakers live here rather than in a
//! store Envoy keeps: a [`LocalStore`] of one mutex per breaker, which `make bench` prices against the
//! shared-data layout (decode, encode, CAS): `core_native` 65 ns a call, `core` 605, in the run of
//! BENCHMARKS.md.
//!
//! Kept across reconfigurations: a listener update builds a new filter configuration, and its
//! workers find the same table, so every breaker keeps its state (the module is loaded with
//! `do_not_close: true`, so Envoy never unloads it and these statics live as long as Envoy). A
//! configuration with another `max_upstreams` gets a table of its own, as the wasm build does.
#![deny(unsafe_code)]

use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock, PoisonError};

use cb_core::store::LocalStore;

/// The table of `capacity` slots.
pub fn table(capacity: u32) -> Arc<LocalStore> {
    static TABLES: OnceLock<Mutex<HashMap<u32, Arc<LocalStore>>>> = OnceLock::new();
    let tables = TABLES.get_or_init(|| Mutex::new(HashMap::new()));
    // Taken on the main thread, once per configuration: never on a request's path.
    let mut tables = tables.lock().unwrap_or_else(PoisonError::into_inner);
    Arc::clone(
        tables
            .entry(capacity)
            .or_insert_with(|| Arc::new(LocalStore::new(capacity))),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_table_per_capacity_for_the_life_of_the_process() {
        assert!(Arc::ptr_eq(&table(16), &table(16)));
        assert!(!Arc::ptr_eq(&table(16), &table(32)));
    }
}
