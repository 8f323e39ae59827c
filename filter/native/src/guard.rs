//! The panic guard every hook runs behind: a panic must not unwind into Envoy (there is no VM between
//! them: it would take the process down), so it is caught, logged at Critical with the hook and the
//! place, counted in `circuit_breaker_panics_total`, and the stream goes on as if the filter were not
//! there. That needs the `release-native` profile (`panic = "unwind"`); under the workspace's
//! `panic = "abort"` nothing could be caught.
#![deny(unsafe_code)]

use std::cell::{Cell, RefCell};
use std::panic::{self, AssertUnwindSafe};

use cb_core::telemetry::{Level, Metric, Series, Telemetry};

use crate::config::ModuleConfig;
use crate::host::{self, ConfigTelemetry};

thread_local! {
    /// How many guarded hooks are running on this thread (a hook can be entered from another's
    /// callback): inside one, the panic hook records the panic for [`guard`] instead of printing it.
    static GUARDED: Cell<u32> = const { Cell::new(0) };
    /// What the panic hook saw of the last panic inside a guard: message and source location.
    static LAST_PANIC: RefCell<Option<String>> = const { RefCell::new(None) };
}

/// Runs a hook's `body`; on a panic returns `fail_open` instead, after a Critical log line naming the
/// hook and the panic's place, and a count in `circuit_breaker_panics_total` when `config` is known.
pub fn guard<T>(
    hook: &str,
    fail_open: T,
    config: Option<&ModuleConfig>,
    body: impl FnOnce() -> T,
) -> T {
    GUARDED.with(|g| g.set(g.get().saturating_add(1)));
    let result = panic::catch_unwind(AssertUnwindSafe(body));
    GUARDED.with(|g| g.set(g.get().saturating_sub(1)));
    let payload = match result {
        Ok(out) => return out,
        Err(payload) => payload,
    };
    let what = LAST_PANIC
        .with(|p| p.try_borrow_mut().ok().and_then(|mut p| p.take()))
        .or_else(|| payload.downcast_ref::<&str>().map(|s| s.to_string()))
        .or_else(|| payload.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "a panic with no message".into());
    // Dropping the payload runs code of whoever panicked, which could panic again, outside any guard:
    // it is leaked instead (a few bytes, once per panic).
    std::mem::forget(payload);
    host::log_with(Level::Critical, || {
        format!("circuit breaker: hook {hook} panicked ({what}); failing open: the stream goes on without the breaker")
    });
    if let Some(config) = config {
        ConfigTelemetry::new(config).add(&Series::global(Metric::Panics), 1);
    }
    fail_open
}

/// Replaces the default panic hook (which would print to Envoy's stderr) with one that hands the
/// panic's message and place to [`guard`]. A panic outside every guard still goes to the default hook.
pub fn install_panic_hook() {
    let default = panic::take_hook();
    panic::set_hook(Box::new(move |info| {
        if GUARDED.with(Cell::get) == 0 {
            return default(info);
        }
        let what = info.to_string().replace('\n', " ");
        LAST_PANIC.with(|p| {
            if let Ok(mut p) = p.try_borrow_mut() {
                *p = Some(what);
            }
        });
    }));
}
