//! The breaker tables of the process: one per `max_upstreams` in use, shared by every worker of every
//! filter configuration with that capacity; and the one tally of labelled keys they all share.
//!
//! All of Envoy's workers are threads of one process, so the breakers live here rather than in a
//! store Envoy keeps: a [`LocalStore`] of one mutex per breaker, which `make bench` prices against the
//! shared-data layout (decode, encode, CAS) as `core_native` and `core`.
//!
//! Kept across reconfigurations: a listener update builds the new filter configuration before it
//! drops the old one, so the new configuration's workers find the table the old one still holds, and
//! every breaker keeps its state (the module is loaded with `do_not_close: true`, so Envoy never
//! unloads it and these statics live as long as Envoy). A table lives while a configuration uses it:
//! the registry holds it weakly, so a capacity no configuration uses any more frees its table, and
//! the registry holds at most one entry per capacity in use (plus the dead ones the next lookup
//! sweeps). A configuration with another `max_upstreams` gets a table of its own, as the wasm build
//! does.
//!
//! The labelled keys (contract section 6: at most 4 × `max_upstreams` per Envoy over its life) are
//! one [`Labels`] for the process, shared by every table, and never freed: the limit is on the
//! series Envoy keeps, which it never frees either.
#![deny(unsafe_code)]

use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock, PoisonError, Weak};

use cb_core::store::{Labels, LocalStore};

/// The process's one tally of labelled keys.
fn labels() -> &'static Arc<Labels> {
    static LABELS: OnceLock<Arc<Labels>> = OnceLock::new();
    LABELS.get_or_init(|| Arc::new(Labels::new()))
}

fn registry() -> &'static Mutex<HashMap<u32, Weak<LocalStore>>> {
    static TABLES: OnceLock<Mutex<HashMap<u32, Weak<LocalStore>>>> = OnceLock::new();
    TABLES.get_or_init(|| Mutex::new(HashMap::new()))
}

/// The table of `capacity` slots: the live one if a configuration holds it, else a new one.
pub fn table(capacity: u32) -> Arc<LocalStore> {
    // Taken on the main thread, once per configuration: never on a request's path.
    let mut tables = registry().lock().unwrap_or_else(PoisonError::into_inner);
    tables.retain(|_, t| t.strong_count() > 0);
    if let Some(live) = tables.get(&capacity).and_then(Weak::upgrade) {
        return live;
    }
    let table = Arc::new(LocalStore::with_labels(capacity, Arc::clone(labels())));
    tables.insert(capacity, Arc::downgrade(&table));
    table
}

/// Whether the registry has an entry, live or dead, for `capacity` (for tests).
#[cfg(test)]
fn registered(capacity: u32) -> bool {
    let tables = registry().lock().unwrap_or_else(PoisonError::into_inner);
    tables.contains_key(&capacity)
}

#[cfg(test)]
mod tests {
    use super::*;
    use cb_core::breaker::Breaker;
    use cb_core::config::BreakerConfig;
    use cb_core::store::{BreakerStore, Label, Read, Slot, SlotRead};

    // Capacities no other test of the crate uses: the registry is the process's.

    #[test]
    fn a_table_in_use_is_shared_and_one_no_configuration_holds_is_freed() {
        let a = table(17);
        assert!(
            Arc::ptr_eq(&a, &table(17)),
            "a reconfiguration finds the live table"
        );
        assert!(!Arc::ptr_eq(&a, &table(19)));
        let mut held = Arc::clone(&a);
        held.update(0, Read::Fresh, |slot| {
            *slot = Some(Slot {
                key: "content".into(),
                last_call_ms: 0,
                shaped_ms: 0,
                breaker: Breaker::new(&BreakerConfig::default()),
            });
            ((), true)
        })
        .unwrap();
        assert!(matches!(table(17).read(0).unwrap(), SlotRead::Held(_)));
        drop((a, held));
        // Every holder is gone: the next lookup sweeps the dead entry and makes a fresh, empty table.
        let _other = table(23);
        assert!(
            !registered(17),
            "a capacity no configuration uses leaves the registry"
        );
        let mut fresh = table(17);
        assert!(matches!(fresh.read(0).unwrap(), SlotRead::Empty));
    }

    #[test]
    fn every_table_labels_keys_from_the_one_tally_of_the_process() {
        let (mut a, mut b) = (table(29), table(31));
        let key = "tables-test-shared-label";
        assert_eq!(a.label(key, u32::MAX).unwrap(), Label::Own);
        // With no room left for new keys, `b` still knows the key `a` labelled: one tally.
        assert_eq!(b.label(key, 0).unwrap(), Label::Own);
    }
}
